//! A fast decode + augmentation pipeline for encoded (JPEG or PNG) training images.
//!
//! [`Augment::apply_encoded`] turns the bytes of one image into one normalized CHW `f32` sample:
//!
//! 1. JPEG: the header alone gives the dimensions, from which the crop rectangle is computed in
//!    source pixels. When the crop is at least 8x the output side, the image is decoded at 1/8
//!    scale in the DCT domain (`jpeg-decoder`'s reduced IDCT); otherwise fully with `zune-jpeg`
//!    (SIMD), which is cheaper than `jpeg-decoder` at 1/2 or 1/4 (see [`DCT_MIN_SCALE`]).
//!    PNG: the `image` crate.
//! 2. One crop + resize pass (`fast_image_resize`, bilinear convolution, which antialiases when
//!    downscaling like PIL/torchvision) from the crop rectangle of the decoded image straight into
//!    a `size x size` buffer.
//! 3. Flip and normalization fused while writing the CHW output, through a 256-entry table per
//!    channel computed exactly like torchvision's `ToTensor` + `Normalize` in `f32`.
//!
//! The random crop and the flip come from the sample's key alone ([`sample_key`]), so the same
//! key always gives a bit-identical sample. Per-thread scratch buffers (decoded pixels, resized
//! pixels, the resizer) are reused across calls; `Augment` itself is immutable and shared.

use std::cell::RefCell;

use fast_image_resize as fir;
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

/// How the output square is cut from the image.
#[derive(Clone, Debug, PartialEq)]
pub enum CropMode {
    /// torchvision RandomResizedCrop: area scale in [scale.0, scale.1], aspect ratio log-uniform
    /// in [ratio.0, ratio.1], 10 attempts then the central-crop fallback exactly like
    /// torchvision's `get_params`.
    RandomResized { scale: (f64, f64), ratio: (f64, f64) },
    /// Resize the shorter side to `resize`, then center crop `size` (torchvision eval:
    /// Resize(256)+CenterCrop(224)). The crop is computed in source coordinates and resized once.
    /// A crop larger than the resized image (`size > resize`) is clamped to the image (torchvision
    /// would pad with zeros).
    Center { resize: u32 },
    /// Resize the whole image to size x size.
    Whole,
}

/// One sample's augmentation: crop mode, output side, flip, channels and normalization.
#[derive(Clone, Debug)]
pub struct Augment {
    pub size: u32,
    pub crop: CropMode,
    pub hflip: bool,
    /// 1 (luma) or 3 (RGB).
    pub channels: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// A crop rectangle in (possibly fractional) pixel coordinates of an image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rect {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

/// The smallest DCT scale-down factor worth decoding with `jpeg-decoder` rather than fully with
/// `zune-jpeg`. Measured CPU time per sample (release, one thread, RRC or Center to 224): 1000x750
/// at 1/2, 7.3-8.7 ms against 4.3-4.8 ms full; 2000x1500 at 1/2-1/4, 23-24 ms against 18 ms full;
/// 4000x3000 at 1/4-1/8, 78-81 ms against 91-95 ms full. `jpeg-decoder`'s entropy decoding is about
/// 3x slower than `zune-jpeg`'s and it hands components to helper threads, which eats the reduced
/// IDCT's saving except at 1/8.
pub(crate) const DCT_MIN_SCALE: u32 = 8;

/// Images whose decoded pixels exceed this many bytes do not keep their buffer in the thread's
/// scratch after the call.
const KEEP_SCRATCH_BYTES: usize = 32 << 20;

struct Scratch {
    /// Decoded pixels (interleaved, 1 or 3 channels).
    decoded: Vec<u8>,
    /// The `size x size` crop, interleaved.
    resized: Vec<u8>,
    resizer: fir::Resizer,
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

enum Format {
    Jpeg,
    Png,
}

/// What a decode produced in the scratch buffer.
struct Decoded {
    width: u32,
    height: u32,
    /// 1 or 3 interleaved channels.
    channels: usize,
    /// The crop rectangle in this (possibly DCT-scaled) image's pixels.
    rect: Rect,
    /// The DCT scale-down factor used (1 = full decode).
    scale: u32,
}

impl Augment {
    /// Number of `f32`s one sample takes: channels x size x size.
    pub fn sample_len(&self) -> usize {
        self.channels * self.size as usize * self.size as usize
    }

    /// Decodes `bytes` (JPEG or PNG, detected by magic bytes) and writes the CHW, normalized
    /// ((x/255 - mean)/std) f32 sample into `out` (len sample_len). `rng_key` alone drives the
    /// random crop and the flip (flip with probability 1/2 when self.hflip), so the same key gives
    /// bit-identical output. Errors name what is wrong (e.g. "truncated JPEG (no end-of-image
    /// marker)", "not a JPEG or PNG", the decoder's message).
    pub fn apply_encoded(&self, bytes: &[u8], rng_key: u64, out: &mut [f32]) -> Result<(), String> {
        self.apply_with(bytes, rng_key, out, DCT_MIN_SCALE).map(|_| ())
    }

    /// [`Augment::apply_encoded`], decoding JPEGs at 1/s in the DCT domain only when the factor s
    /// it would use is at least `min_dct_scale` (`u32::MAX`: always fully); returns the DCT
    /// scale-down factor that was used (1 = full decode).
    pub(crate) fn apply_with(
        &self,
        bytes: &[u8],
        rng_key: u64,
        out: &mut [f32],
        min_dct_scale: u32,
    ) -> Result<u32, String> {
        self.check(out.len())?;
        let format = sniff(bytes)?;
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let s = guard.get_or_insert_with(|| Scratch {
                decoded: Vec::new(),
                resized: Vec::new(),
                resizer: fir::Resizer::new(),
            });
            let d = match format {
                Format::Jpeg => self.decode_jpeg(bytes, rng_key, min_dct_scale, &mut s.decoded)?,
                Format::Png => self.decode_png(bytes, rng_key, &mut s.decoded)?,
            };
            let result = self.resize_and_write(&d, s, rng_key, out);
            if s.decoded.capacity() > KEEP_SCRATCH_BYTES {
                s.decoded = Vec::new();
            }
            result.map(|_| d.scale)
        })
    }

    fn check(&self, out_len: usize) -> Result<(), String> {
        if self.channels != 1 && self.channels != 3 {
            return Err(format!("channels must be 1 or 3, not {}", self.channels));
        }
        if self.size == 0 {
            return Err("output size must be positive".into());
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return Err(format!(
                "mean ({}) and std ({}) need one value per channel ({})",
                self.mean.len(),
                self.std.len(),
                self.channels
            ));
        }
        if out_len != self.sample_len() {
            return Err(format!("output buffer holds {out_len} values, a sample is {}", self.sample_len()));
        }
        if let CropMode::RandomResized { scale, ratio } = &self.crop {
            if !(scale.0 > 0.0 && scale.0 <= scale.1 && ratio.0 > 0.0 && ratio.0 <= ratio.1) {
                return Err(format!("invalid RandomResized scale {scale:?} or ratio {ratio:?}"));
            }
        }
        Ok(())
    }

    /// The crop rectangle of a `width x height` image in its pixels, from the key.
    pub(crate) fn crop_rect(&self, width: u32, height: u32, rng_key: u64) -> Rect {
        let (w, h) = (width as f64, height as f64);
        match &self.crop {
            CropMode::Whole => Rect { left: 0.0, top: 0.0, width: w, height: h },
            CropMode::RandomResized { scale, ratio } => {
                let mut rng = Rng(rng_key ^ 0x243F_6A88_85A3_08D3);
                let (i, j, ch, cw) = rrc_params(width, height, *scale, *ratio, &mut rng);
                Rect { left: j as f64, top: i as f64, width: cw as f64, height: ch as f64 }
            }
            CropMode::Center { resize } => center_rect(width, height, *resize, self.size),
        }
    }

    fn flip(&self, rng_key: u64) -> bool {
        self.hflip && mix(rng_key ^ 0x1319_8A2E_0370_7344) >> 63 == 1
    }

    /// The largest factor s in {1, 2, 4, 8} at which the image, decoded at 1/s, still has the
    /// detail the output needs.
    fn dct_scale(&self, width: u32, height: u32, rect: &Rect) -> u32 {
        let ok = |s: f64| match self.crop {
            CropMode::Center { resize } => (width.min(height) as f64) / s >= resize.max(self.size) as f64,
            _ => rect.width / s >= self.size as f64 && rect.height / s >= self.size as f64,
        };
        [8u32, 4, 2].into_iter().find(|&s| ok(s as f64)).unwrap_or(1)
    }

    fn decode_jpeg(&self, bytes: &[u8], key: u64, min_dct_scale: u32, buf: &mut Vec<u8>) -> Result<Decoded, String> {
        if !super::jpeg_complete(bytes) {
            return Err("truncated JPEG (no end-of-image marker)".into());
        }
        let mut dec = zune_jpeg::JpegDecoder::new(ZCursor::new(bytes));
        dec.decode_headers().map_err(|e| format!("JPEG: {e}"))?;
        let info = dec.info().ok_or("JPEG: no header")?;
        let (width, height) = (info.width as u32, info.height as u32);
        if width == 0 || height == 0 {
            return Err(format!("JPEG: empty image ({width}x{height})"));
        }
        let rect = self.crop_rect(width, height, key);
        let scale = self.dct_scale(width, height, &rect);
        let input_gray = matches!(dec.input_colorspace(), Some(ColorSpace::Luma | ColorSpace::LumaA));
        if scale > 1 && scale >= min_dct_scale && info.components != 4 {
            if let Some(d) = self.decode_jpeg_scaled(bytes, width, height, rect, scale, buf) {
                return Ok(d);
            }
        }
        // Full decode with zune-jpeg: luma for gray sources or 1-channel outputs, else RGB.
        let out_cs = if input_gray || self.channels == 1 { ColorSpace::Luma } else { ColorSpace::RGB };
        let channels = out_cs.num_components();
        dec.set_options(DecoderOptions::default().jpeg_set_out_colorspace(out_cs));
        let n = dec.output_buffer_size().ok_or("JPEG: image too large")?;
        debug_assert_eq!(n, width as usize * height as usize * channels);
        if buf.len() < n {
            buf.resize(n, 0);
        }
        dec.decode_into(&mut buf[..n]).map_err(|e| format!("JPEG: {e}"))?;
        Ok(Decoded { width, height, channels, rect, scale: 1 })
    }

    /// Decodes at 1/`scale` in the DCT domain; `None` (the caller decodes fully) when
    /// jpeg-decoder cannot, or gives a size or pixel format this does not handle.
    fn decode_jpeg_scaled(
        &self,
        bytes: &[u8],
        width: u32,
        height: u32,
        rect: Rect,
        scale: u32,
        buf: &mut Vec<u8>,
    ) -> Option<Decoded> {
        let scaled = |len: u32, k: u32| (len * k).div_ceil(8);
        let k = 8 / scale;
        let mut dec = jpeg_decoder::Decoder::new(bytes);
        let (ow, oh) = dec.scale(scaled(width, k) as u16, scaled(height, k) as u16).ok()?;
        let (ow, oh) = (ow as u32, oh as u32);
        // The reduced IDCT the decoder chose: block of 8 source pixels -> k output pixels.
        let k = [1u32, 2, 4, 8].into_iter().find(|&k| scaled(width, k) == ow && scaled(height, k) == oh)?;
        let pixels = dec.decode().ok()?;
        let channels = match dec.info()?.pixel_format {
            jpeg_decoder::PixelFormat::L8 => 1,
            jpeg_decoder::PixelFormat::RGB24 => 3,
            _ => return None,
        };
        if pixels.len() < (ow * oh) as usize * channels {
            return None;
        }
        *buf = pixels;
        let channels = if channels == 3 && self.channels == 1 {
            rgb_to_luma_in_place(buf, (ow * oh) as usize);
            1
        } else {
            channels
        };
        // Output pixel x covers source pixels [x*s, (x+1)*s).
        let s = (8 / k) as f64;
        let rect = Rect {
            left: rect.left / s,
            top: rect.top / s,
            width: (rect.width / s).min(ow as f64 - rect.left / s),
            height: (rect.height / s).min(oh as f64 - rect.top / s),
        };
        Some(Decoded { width: ow, height: oh, channels, rect, scale: 8 / k })
    }

    fn decode_png(&self, bytes: &[u8], key: u64, buf: &mut Vec<u8>) -> Result<Decoded, String> {
        let img =
            image::load_from_memory_with_format(bytes, image::ImageFormat::Png).map_err(|e| format!("PNG: {e}"))?;
        let (width, height) = (img.width(), img.height());
        if width == 0 || height == 0 {
            return Err(format!("PNG: empty image ({width}x{height})"));
        }
        let gray = !img.color().has_color();
        let channels = if gray || self.channels == 1 { 1 } else { 3 };
        *buf = if channels == 1 { img.into_luma8().into_raw() } else { img.into_rgb8().into_raw() };
        let rect = self.crop_rect(width, height, key);
        Ok(Decoded { width, height, channels, rect, scale: 1 })
    }

    fn resize_and_write(&self, d: &Decoded, s: &mut Scratch, key: u64, out: &mut [f32]) -> Result<(), String> {
        let size = self.size as usize;
        let pt = if d.channels == 1 { fir::PixelType::U8 } else { fir::PixelType::U8x3 };
        let n_src = d.width as usize * d.height as usize * d.channels;
        let src = fir::images::ImageRef::new(d.width, d.height, &s.decoded[..n_src], pt).map_err(|e| e.to_string())?;
        let n = size * size * d.channels;
        if s.resized.len() < n {
            s.resized.resize(n, 0);
        }
        let mut dst = fir::images::Image::from_slice_u8(self.size, self.size, &mut s.resized[..n], pt)
            .map_err(|e| e.to_string())?;
        let r = d.rect;
        let opts = fir::ResizeOptions::new()
            .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear))
            .crop(r.left, r.top, r.width, r.height);
        s.resizer.resize(&src, &mut dst, &opts).map_err(|e| format!("resize: {e}"))?;
        write_chw(&s.resized[..n], d.channels, size, self.flip(key), &self.luts(), out);
        Ok(())
    }

    /// Per channel, the normalized value of each byte, computed like torchvision in `f32`.
    fn luts(&self) -> Vec<[f32; 256]> {
        (0..self.channels)
            .map(|c| {
                let mut t = [0f32; 256];
                for (v, x) in t.iter_mut().enumerate() {
                    *x = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
                }
                t
            })
            .collect()
    }
}

/// Writes the `size x size` interleaved `src` (1 or 3 channels) as CHW through the per-channel
/// tables, mirrored left-right when `flip`; a 1-channel source fills every output channel.
fn write_chw(src: &[u8], src_channels: usize, size: usize, flip: bool, luts: &[[f32; 256]], out: &mut [f32]) {
    let plane = size * size;
    for (c, lut) in luts.iter().enumerate() {
        let sc = if src_channels == 1 { 0 } else { c };
        let dst = &mut out[c * plane..(c + 1) * plane];
        for (drow, srow) in dst.chunks_exact_mut(size).zip(src.chunks_exact(size * src_channels)) {
            if src_channels == 1 {
                if flip {
                    for (d, &v) in drow.iter_mut().zip(srow.iter().rev()) {
                        *d = lut[v as usize];
                    }
                } else {
                    for (d, &v) in drow.iter_mut().zip(srow) {
                        *d = lut[v as usize];
                    }
                }
            } else if flip {
                for (d, px) in drow.iter_mut().zip(srow.chunks_exact(3).rev()) {
                    *d = lut[px[sc] as usize];
                }
            } else {
                for (d, px) in drow.iter_mut().zip(srow.chunks_exact(3)) {
                    *d = lut[px[sc] as usize];
                }
            }
        }
    }
}

/// ITU-R 601-2 luma (PIL's `convert('L')`), compacting `n` RGB pixels into the first `n` bytes.
fn rgb_to_luma_in_place(buf: &mut Vec<u8>, n: usize) {
    for i in 0..n {
        let (r, g, b) = (buf[3 * i] as u32, buf[3 * i + 1] as u32, buf[3 * i + 2] as u32);
        buf[i] = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8;
    }
    buf.truncate(n);
}

fn sniff(bytes: &[u8]) -> Result<Format, String> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(Format::Png)
    } else {
        let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        Err(format!(
            "not a JPEG or PNG (starts with {})",
            if head.is_empty() { "nothing".into() } else { head.join(" ") }
        ))
    }
}

/// torchvision's `RandomResizedCrop.get_params`: (top, left, height, width) of the crop.
pub(crate) fn rrc_params(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Rng,
) -> (u32, u32, u32, u32) {
    let (wf, hf) = (width as f64, height as f64);
    let area = wf * hf;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(lr0, lr1).exp();
        // Python's round() rounds half to even.
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= wf && h > 0.0 && h <= hf {
            let (w, h) = (w as u32, h as u32);
            let i = rng.below((height - h + 1) as u64) as u32;
            let j = rng.below((width - w + 1) as u64) as u32;
            return (i, j, h, w);
        }
    }
    // Fallback to a central crop.
    let in_ratio = wf / hf;
    let (w, h) = if in_ratio < ratio.0 {
        (width, ((wf / ratio.0).round_ties_even() as u32).clamp(1, height))
    } else if in_ratio > ratio.1 {
        (((hf * ratio.1).round_ties_even() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// torchvision's Resize(resize) + CenterCrop(size) as one rectangle in source pixels.
fn center_rect(width: u32, height: u32, resize: u32, size: u32) -> Rect {
    let (w, h) = (width as f64, height as f64);
    // Resize: the shorter side becomes `resize`, the longer int(resize * long / short).
    let (nw, nh) = if width <= height {
        (resize as f64, (resize as f64 * h / w).floor())
    } else {
        ((resize as f64 * w / h).floor(), resize as f64)
    };
    let (nw, nh) = (nw.max(1.0), nh.max(1.0));
    // CenterCrop: top = int(round((h - size) / 2)), clamped to the resized image.
    let (cw, ch) = ((size as f64).min(nw), (size as f64).min(nh));
    let left = ((nw - cw) / 2.0).round_ties_even();
    let top = ((nh - ch) / 2.0).round_ties_even();
    let (sx, sy) = (w / nw, h / nh);
    Rect { left: left * sx, top: top * sy, width: cw * sx, height: ch * sy }
}

/// splitmix64's finalizer: a well-mixed 64-bit hash.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-sample RNG key from (seed, epoch, sample index): a well-mixed 64-bit hash (splitmix64 chain).
pub fn sample_key(seed: u64, epoch: u64, index: u64) -> u64 {
    mix(mix(mix(seed) ^ epoch) ^ index)
}

/// A splitmix64 stream.
pub(crate) struct Rng(pub u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    /// Uniform in [a, b).
    pub(crate) fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * ((self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64))
    }
    /// Uniform in 0..n (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];

    fn rrc(size: u32) -> Augment {
        Augment {
            size,
            crop: CropMode::RandomResized { scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) },
            hflip: true,
            channels: 3,
            mean: MEAN.to_vec(),
            std: STD.to_vec(),
        }
    }

    fn jpeg(img: &image::RgbImage, quality: u8) -> Vec<u8> {
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality).encode_image(img).unwrap();
        buf
    }

    /// Gradients and a disc: smooth enough that scaled and full decodes agree.
    fn scene(w: u32, h: u32) -> image::RgbImage {
        let (cx, cy, r) = (w as f32 * 0.4, h as f32 * 0.55, h as f32 * 0.25);
        image::RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let inside = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) < r * r;
            let d = if inside { 80.0 } else { 0.0 };
            image::Rgb([(200.0 * fx + d * 0.5) as u8, (60.0 + 150.0 * fy) as u8, (255.0 - 200.0 * fx * fy - d) as u8])
        })
    }

    fn run(a: &Augment, bytes: &[u8], key: u64) -> Vec<f32> {
        let mut out = vec![0f32; a.sample_len()];
        a.apply_encoded(bytes, key, &mut out).unwrap();
        out
    }

    #[test]
    fn same_key_is_bit_identical_and_keys_differ() {
        let bytes = jpeg(&scene(500, 375), 90);
        let a = rrc(224);
        let x = run(&a, &bytes, sample_key(1, 0, 5));
        assert_eq!(x, run(&a, &bytes, sample_key(1, 0, 5)));
        // From another thread (fresh scratch) too.
        let (a2, b2) = (a.clone(), bytes.clone());
        let y = std::thread::spawn(move || run(&a2, &b2, sample_key(1, 0, 5))).join().unwrap();
        assert_eq!(x, y);
        assert_ne!(x, run(&a, &bytes, sample_key(1, 0, 6)));
        assert_ne!(x, run(&a, &bytes, sample_key(1, 1, 5)));
        assert_ne!(x, run(&a, &bytes, sample_key(2, 0, 5)));
        assert!(x.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn sample_keys_are_distinct() {
        let mut keys: Vec<u64> = (0..4u64)
            .flat_map(|s| (0..8u64).flat_map(move |e| (0..500u64).map(move |i| sample_key(s, e, i))))
            .collect();
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n);
    }

    #[test]
    fn rrc_params_stay_inside_and_within_bounds() {
        let (scale, ratio) = ((0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0));
        let mut fallbacks = 0;
        for (w, h) in [(500u32, 375u32), (375, 500), (224, 224), (2000, 1500), (37, 29)] {
            let area = (w * h) as f64;
            for key in 0..3000u64 {
                let mut rng = Rng(sample_key(9, 0, key));
                let (i, j, ch, cw) = rrc_params(w, h, scale, ratio, &mut rng);
                assert!(ch >= 1 && cw >= 1 && i + ch <= h && j + cw <= w, "{w}x{h}: {i} {j} {ch} {cw}");
                if (cw, ch) == (w, h) {
                    fallbacks += 1;
                    continue;
                }
                // w and h are rounded from real values within half a pixel, whose area and ratio
                // were within bounds.
                let (fw, fh) = (cw as f64, ch as f64);
                assert!((fw + 0.5) * (fh + 0.5) >= scale.0 * area, "{w}x{h}: {cw}x{ch} too small");
                assert!((fw - 0.5) * (fh - 0.5) <= scale.1 * area, "{w}x{h}: {cw}x{ch} too large");
                assert!((fw + 0.5) / (fh - 0.5) >= ratio.0, "{w}x{h}: {cw}x{ch} too tall");
                assert!((fw - 0.5) / (fh + 0.5) <= ratio.1, "{w}x{h}: {cw}x{ch} too wide");
            }
        }
        assert!(fallbacks < 100, "{fallbacks} whole-image crops");
        // A very wide image never fits a 4/3 crop of 8..100% area: torchvision's fallback.
        let mut rng = Rng(3);
        assert_eq!(rrc_params(1000, 10, scale, ratio, &mut rng), (0, (1000 - 13) / 2, 10, 13));
        let mut rng = Rng(3);
        assert_eq!(rrc_params(10, 1000, scale, ratio, &mut rng), ((1000 - 13) / 2, 0, 13, 10));
    }

    #[test]
    fn rrc_crop_rect_matches_the_params() {
        let a = rrc(224);
        for key in 0..200u64 {
            let r = a.crop_rect(500, 375, key);
            assert!(r.left >= 0.0 && r.top >= 0.0 && r.left + r.width <= 500.0 && r.top + r.height <= 375.0);
            assert_eq!(r, a.crop_rect(500, 375, key));
        }
    }

    /// Left half dark, right half bright, with a bright bar at the far left edge.
    fn halves(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, _| {
            let v = if x < 20 || x >= w / 2 { 230 } else { 20 };
            image::Rgb([v, v, v])
        })
    }

    #[test]
    fn center_keeps_the_middle_and_flip_mirrors() {
        let bytes = jpeg(&halves(600, 300), 95);
        let mut a = Augment { crop: CropMode::Center { resize: 64 }, hflip: false, ..rrc(56) };
        let plain = run(&a, &bytes, 1);
        let s = 56usize;
        let px = |v: &[f32], x: usize, y: usize| v[y * s + x];
        // Resized to 128x64, cropping 56 from the middle: the dark/bright edge sits at the centre,
        // and the bright bar at the far left is cut away.
        for y in [0, 28, 55] {
            assert!(px(&plain, 2, y) < -1.0, "left of the middle is dark: {}", px(&plain, 2, y));
            assert!(px(&plain, 53, y) > 1.0, "right of the middle is bright");
        }
        // Every key flips with hflip on; find one that does and check the mirror image.
        a.hflip = true;
        let flipped = (0..64).map(|k| run(&a, &bytes, k)).find(|o| o != &plain).expect("some key flips");
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    assert_eq!(flipped[c * s * s + y * s + x], plain[c * s * s + y * s + (s - 1 - x)]);
                }
            }
        }
        // About half the keys flip.
        let flips = (0..200).filter(|&k| a.flip(k)).count();
        assert!((70..130).contains(&flips), "{flips}/200 flips");
    }

    #[test]
    fn center_rect_matches_torchvision() {
        // 500x375 -> Resize(256) = 341x256, CenterCrop(224): left round(58.5)=58, top 16.
        let r = center_rect(500, 375, 256, 224);
        let (sx, sy) = (500.0 / 341.0, 375.0 / 256.0);
        assert!((r.left - 58.0 * sx).abs() < 1e-9 && (r.top - 16.0 * sy).abs() < 1e-9);
        assert!((r.width - 224.0 * sx).abs() < 1e-9 && (r.height - 224.0 * sy).abs() < 1e-9);
    }

    #[test]
    fn whole_mode_keeps_the_picture() {
        let bytes = jpeg(&halves(400, 100), 95);
        let a = Augment { crop: CropMode::Whole, hflip: false, ..rrc(32) };
        let out = run(&a, &bytes, 0);
        let px = |x: usize, y: usize| out[y * 32 + x];
        assert!(px(0, 16) > 1.0, "the left bar survives a whole resize");
        assert!(px(10, 16) < -1.0 && px(28, 16) > 1.0);
    }

    fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
    }

    #[test]
    fn dct_scaled_decode_is_close_to_the_full_decode() {
        let bytes = jpeg(&scene(2000, 1500), 90);
        let mut scales = std::collections::BTreeSet::new();
        for a in [
            rrc(224),
            Augment { crop: CropMode::Center { resize: 256 }, hflip: false, ..rrc(224) },
            Augment { crop: CropMode::Whole, ..rrc(224) },
        ] {
            for key in 0..6u64 {
                let mut fast = vec![0f32; a.sample_len()];
                let mut full = vec![0f32; a.sample_len()];
                let s = a.apply_with(&bytes, key, &mut fast, 2).unwrap();
                assert_eq!(a.apply_with(&bytes, key, &mut full, u32::MAX).unwrap(), 1);
                let d = mean_abs_diff(&fast, &full);
                // About 0.002 when the crop maps right; a crop off by a few source pixels is far more.
                assert!(d < 0.02, "{:?} key {key}: scale {s}, mean abs diff {d}", a.crop);
                scales.insert(s);
            }
        }
        assert!(scales.iter().any(|&s| s > 1), "the DCT path was never used: {scales:?}");
        // Center (shorter side 1500 >= 256*4) can decode at 1/4, but by default decodes fully.
        let a = Augment { crop: CropMode::Center { resize: 256 }, ..rrc(224) };
        assert_eq!(a.apply_with(&bytes, 0, &mut vec![0f32; a.sample_len()], 2).unwrap(), 4);
        assert_eq!(a.apply_with(&bytes, 0, &mut vec![0f32; a.sample_len()], DCT_MIN_SCALE).unwrap(), 1);
        // 2000x1500 to 128 (Whole): 1/8 is used by default, and close to the full decode.
        let a = Augment { crop: CropMode::Whole, ..rrc(128) };
        let (mut fast, mut full) = (vec![0f32; a.sample_len()], vec![0f32; a.sample_len()]);
        assert_eq!(a.apply_with(&bytes, 3, &mut fast, DCT_MIN_SCALE).unwrap(), 8);
        a.apply_with(&bytes, 3, &mut full, u32::MAX).unwrap();
        let d = mean_abs_diff(&fast, &full);
        assert!(d < 0.02, "1/8: mean abs diff {d}");
        let mut out = vec![0f32; a.sample_len()];
        a.apply_encoded(&bytes, 3, &mut out).unwrap();
        assert_eq!(out, fast);
    }

    #[test]
    fn odd_sized_dct_decode_maps_the_crop() {
        // 1001x777 is not a multiple of 8: at 1/4 the scaled image is ceil(w/4) x ceil(h/4).
        let bytes = jpeg(&scene(1001, 777), 90);
        let a = Augment { crop: CropMode::Whole, hflip: false, ..rrc(100) };
        let mut fast = vec![0f32; a.sample_len()];
        let mut full = vec![0f32; a.sample_len()];
        assert_eq!(a.apply_with(&bytes, 0, &mut fast, 2).unwrap(), 4);
        a.apply_with(&bytes, 0, &mut full, u32::MAX).unwrap();
        assert!(mean_abs_diff(&fast, &full) < 0.02);
    }

    #[test]
    fn truncated_jpeg_is_an_error() {
        let bytes = jpeg(&scene(500, 375), 90);
        let a = rrc(224);
        let mut out = vec![0f32; a.sample_len()];
        let e = a.apply_encoded(&bytes[..bytes.len() / 2], 0, &mut out).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn garbage_is_an_error() {
        let a = rrc(224);
        let mut out = vec![0f32; a.sample_len()];
        let e = a.apply_encoded(b"hello, this is not an image at all", 0, &mut out).unwrap_err();
        assert!(e.contains("not a JPEG or PNG"), "{e}");
        assert!(a.apply_encoded(&[], 0, &mut out).is_err());
        // A JPEG start followed by noise, with an end marker: the decoder's own error.
        let mut bad = vec![0xFF, 0xD8, 0xFF, 0xE0];
        bad.extend((0..500u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        bad.extend([0xFF, 0xD9]);
        let e = a.apply_encoded(&bad, 0, &mut out).unwrap_err();
        assert!(e.starts_with("JPEG"), "{e}");
        // A wrong output length.
        assert!(a.apply_encoded(&jpeg(&scene(64, 64), 90), 0, &mut out[1..]).is_err());
    }

    #[test]
    fn grayscale_jpeg_expands_to_three_channels() {
        let gray = image::GrayImage::from_fn(300, 200, |x, _| image::Luma([(x * 255 / 299) as u8]));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95).encode_image(&gray).unwrap();
        let a = Augment { crop: CropMode::Whole, hflip: false, ..rrc(64) };
        let out = run(&a, &bytes, 0);
        let p = 64 * 64;
        for i in 0..p {
            // The same byte through each channel's table.
            let v = out[i] * STD[0] + MEAN[0];
            for c in 1..3 {
                assert!((out[c * p + i] * STD[c] + MEAN[c] - v).abs() < 1e-5);
            }
        }
        assert!(out[32 * 64] < out[32 * 64 + 63], "the gradient survives");
        // And an RGB JPEG to one channel.
        let a1 = Augment { channels: 1, mean: vec![0.5], std: vec![0.5], ..a };
        let o1 = run(&a1, &jpeg(&scene(300, 200), 90), 0);
        assert_eq!(o1.len(), 64 * 64);
    }

    #[test]
    fn png_matches_the_same_pixels_as_jpeg_path() {
        let img = scene(320, 240);
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let a = rrc(96);
        let from_png = run(&a, &png, 7);
        let from_jpeg = run(&a, &jpeg(&img, 98), 7);
        assert!(mean_abs_diff(&from_png, &from_jpeg) < 0.05);
    }

    #[test]
    fn normalization_matches_torchvision_in_f32() {
        let img = image::RgbImage::from_pixel(64, 64, image::Rgb([10, 128, 250]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let a = Augment { crop: CropMode::Whole, hflip: false, ..rrc(16) };
        let out = run(&a, &png, 0);
        for (c, v) in [10u8, 128, 250].into_iter().enumerate() {
            assert_eq!(out[c * 256 + 5], (v as f32 / 255.0 - MEAN[c]) / STD[c]);
        }
    }
}
