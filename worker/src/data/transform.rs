//! Image preprocessing: resize, crop, flip, channel conversion and normalization into a CHW
//! `f32` buffer, matching torchvision's eval transforms (resize the shorter side, centre crop,
//! `ToTensor`, `Normalize`).

use image::imageops::FilterType;
use image::DynamicImage;

use super::decode::{Augment, CropMode, Rng};
use crate::zoo::Preprocess;

/// How samples become network inputs.
#[derive(Clone, Debug)]
pub struct Transform {
    /// Side of the square output.
    pub size: u32,
    /// Shorter side before the centre crop (ignored when `whole`).
    pub resize: u32,
    /// Resize the whole image to `size` x `size` (small centred objects such as IDX images).
    pub whole: bool,
    pub channels: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Transform {
    /// The transform for a model's preprocessing at `size` (the model's own input size if `None`).
    pub fn new(pre: &Preprocess, size: Option<i64>, whole: bool) -> Transform {
        let size = size.unwrap_or(pre.input_size);
        let resize = (size * pre.resize_size + pre.input_size / 2) / pre.input_size;
        Transform {
            size: size as u32,
            resize: resize as u32,
            whole,
            channels: pre.channels as usize,
            mean: pre.mean.iter().map(|&m| m as f32).collect(),
            std: pre.std.iter().map(|&s| s as f32).collect(),
        }
    }

    /// The one-pass decode + augment pipeline for encoded samples with this transform's size,
    /// channels and normalization: RandomResizedCrop (torchvision's defaults) when `random_crop`,
    /// else resize + centre crop, or the whole image for small centred objects.
    pub fn augment(&self, random_crop: bool, hflip: bool) -> Augment {
        let crop = if self.whole {
            CropMode::Whole
        } else if random_crop {
            CropMode::RandomResized { scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) }
        } else {
            CropMode::Center { resize: self.resize.max(self.size) }
        };
        Augment {
            size: self.size,
            crop,
            hflip,
            channels: self.channels,
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }

    /// Number of `f32`s one sample takes.
    pub fn sample_len(&self) -> usize {
        self.channels * (self.size as usize) * (self.size as usize)
    }

    /// Applies the transform, writing `channels x size x size` normalized values into `out`.
    pub fn apply(&self, img: &DynamicImage, hflip: bool, out: &mut [f32]) {
        self.apply_shifted(img, hflip, (0, 0), out)
    }

    /// [`Transform::apply`] with the stored image first translated by `shift` = (dx, dy) of its
    /// own pixels, the uncovered border black (torchvision's `RandomCrop(padding=n)` on the
    /// stored image).
    pub fn apply_shifted(&self, img: &DynamicImage, hflip: bool, shift: (i32, i32), out: &mut [f32]) {
        let s = self.size;
        let shifted;
        let img = if shift == (0, 0) {
            img
        } else {
            shifted = translate(img, shift);
            &shifted
        };
        let img = if self.whole {
            if img.width() == s && img.height() == s {
                img.clone()
            } else {
                img.resize_exact(s, s, FilterType::Triangle)
            }
        } else {
            let (w, h) = (img.width().max(1), img.height().max(1));
            // The long side is truncated, as torchvision's Resize does (`int(...)`).
            let r = self.resize.max(s) as f64;
            let (nw, nh) = if w <= h {
                (r as u32, ((h as f64) * r / (w as f64)).floor().max(r) as u32)
            } else {
                (((w as f64) * r / (h as f64)).floor().max(r) as u32, r as u32)
            };
            let resized = img.resize_exact(nw, nh, FilterType::Triangle);
            resized.crop_imm((nw - s) / 2, (nh - s) / 2, s, s)
        };
        let img = if hflip { img.fliph() } else { img };
        let plane = (s * s) as usize;
        match self.channels {
            1 => {
                let g = img.to_luma8();
                for (i, p) in g.as_raw().iter().enumerate() {
                    out[i] = (*p as f32 / 255.0 - self.mean[0]) / self.std[0];
                }
            }
            _ => {
                let rgb = img.to_rgb8();
                for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        out[c * plane + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
                    }
                }
            }
        }
    }
}

/// Random erasing (Zhong et al., 2017; torchvision's `RandomErasing` with its defaults): with
/// probability `p`, one rectangle of 2-33% of the image's area, aspect ratio 0.3-3.3, is set to 0
/// in every channel of the normalized sample `out` (`channels x side x side`), i.e. to the
/// dataset's mean. `key` draws everything, so a sample's erasure is a pure function of it.
pub fn random_erase(out: &mut [f32], channels: usize, side: usize, p: f32, key: u64) {
    let mut rng = Rng(key ^ 0x4552_4153_4500_0000);
    if p <= 0.0 || rng.uniform(0.0, 1.0) >= p as f64 {
        return;
    }
    let area = (side * side) as f64;
    for _ in 0..10 {
        let target = area * rng.uniform(0.02, 0.33);
        let ratio = rng.uniform(0.3f64.ln(), 3.3f64.ln()).exp();
        let h = (target * ratio).sqrt().round() as usize;
        let w = (target / ratio).sqrt().round() as usize;
        if h == 0 || w == 0 || h >= side || w >= side {
            continue;
        }
        let (top, left) = (rng.below((side - h + 1) as u64) as usize, rng.below((side - w + 1) as u64) as usize);
        for c in 0..channels {
            for y in top..top + h {
                let row = c * side * side + y * side;
                out[row + left..row + left + w].fill(0.0);
            }
        }
        return;
    }
}

/// `img` moved by (dx, dy) pixels, filled with black where nothing moved in.
fn translate(img: &DynamicImage, (dx, dy): (i32, i32)) -> DynamicImage {
    let (w, h) = (img.width() as i32, img.height() as i32);
    let moved = |x: i32, y: i32| {
        (x - dx >= 0 && x - dx < w && y - dy >= 0 && y - dy < h).then(|| ((x - dx) as u32, (y - dy) as u32))
    };
    match img {
        DynamicImage::ImageLuma8(g) => {
            DynamicImage::ImageLuma8(image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
                moved(x as i32, y as i32).map_or(image::Luma([0]), |(sx, sy)| *g.get_pixel(sx, sy))
            }))
        }
        other => {
            let rgb = other.to_rgb8();
            DynamicImage::ImageRgb8(image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                moved(x as i32, y as i32).map_or(image::Rgb([0, 0, 0]), |(sx, sy)| *rgb.get_pixel(sx, sy))
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, RgbImage};

    #[test]
    fn gray_expands_to_three_normalized_channels() {
        let t = Transform::new(&Preprocess::imagenet(224), Some(8), true);
        let img = DynamicImage::ImageLuma8(GrayImage::from_pixel(4, 4, image::Luma([255])));
        let mut out = vec![0f32; t.sample_len()];
        t.apply(&img, false, &mut out);
        assert_eq!(out.len(), 3 * 64);
        let expect = (1.0 - 0.485) / 0.229;
        assert!((out[0] - expect).abs() < 1e-5, "{}", out[0]);
        assert!((out[64] - (1.0 - 0.456) / 0.224).abs() < 1e-5);
    }

    #[test]
    fn centre_crop_keeps_the_middle_and_flip_mirrors() {
        let mut img = RgbImage::new(40, 20);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([if x < 20 { 0 } else { 255 }, 0, 0]);
        }
        let pre = Preprocess { input_size: 10, resize_size: 10, mean: vec![0.; 3], std: vec![1.; 3], channels: 3 };
        let t = Transform::new(&pre, None, false);
        let mut a = vec![0f32; t.sample_len()];
        t.apply(&DynamicImage::ImageRgb8(img.clone()), false, &mut a);
        // 40x20 -> 20x10, crop the middle 10 columns: left half dark, right half bright.
        assert!(a[0] < 0.1 && a[9] > 0.9, "{:?}", &a[..10]);
        let mut b = vec![0f32; t.sample_len()];
        t.apply(&DynamicImage::ImageRgb8(img), true, &mut b);
        assert!(b[0] > 0.9 && b[9] < 0.1, "{:?}", &b[..10]);
    }

    #[test]
    fn shift_moves_the_stored_image_and_fills_black() {
        let img =
            DynamicImage::ImageLuma8(GrayImage::from_fn(4, 4, |x, y| image::Luma([(10 * (y * 4 + x) + 1) as u8])));
        let pre = Preprocess { input_size: 4, resize_size: 4, mean: vec![0.], std: vec![1.], channels: 1 };
        let t = Transform::new(&pre, None, true);
        let mut out = vec![0f32; 16];
        t.apply_shifted(&img, false, (1, -1), &mut out);
        let px = |v: f32| (v * 255.0).round() as u8;
        // Row 0 of the output is the input's row 1 moved right by one; column 0 is black.
        assert_eq!((px(out[0]), px(out[1]), px(out[2])), (0, 41, 51));
        // The last row came from below the image: black.
        assert!(out[12..].iter().all(|&v| v == 0.0), "{:?}", &out[12..]);
        let mut same = vec![0f32; 16];
        t.apply_shifted(&img, false, (0, 0), &mut same);
        assert_eq!(px(same[5]), 51);
    }

    #[test]
    fn random_erase_blanks_one_rectangle_in_every_channel_at_its_rate() {
        let (c, side) = (3, 20);
        let mut erased = 0;
        for key in 0..1000u64 {
            let mut out = vec![1f32; c * side * side];
            random_erase(&mut out, c, side, 0.5, key);
            let zeros: Vec<usize> = (0..side * side).filter(|&i| out[i] == 0.0).collect();
            if zeros.is_empty() {
                assert!(out.iter().all(|&v| v == 1.0));
                continue;
            }
            erased += 1;
            // Every channel blanks the same pixels, and they form one rectangle of 2-33% of the area.
            for ch in 1..c {
                assert!(zeros.iter().all(|&i| out[ch * side * side + i] == 0.0), "key {key}");
            }
            let (ys, xs): (Vec<usize>, Vec<usize>) = zeros.iter().map(|&i| (i / side, i % side)).unzip();
            let h = ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1;
            let w = xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1;
            assert_eq!(h * w, zeros.len(), "key {key}: not a rectangle");
            assert!((3..=160).contains(&zeros.len()), "key {key}: {} pixels", zeros.len());
            let mut again = vec![1f32; c * side * side];
            random_erase(&mut again, c, side, 0.5, key);
            assert_eq!(out, again, "the key decides");
        }
        assert!((430..570).contains(&erased), "about half erased: {erased}");
        let mut none = vec![1f32; side * side];
        random_erase(&mut none, 1, side, 0.0, 3);
        assert!(none.iter().all(|&v| v == 1.0));
    }
}
