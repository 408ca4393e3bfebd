//! CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
//! Localizable Features", 2019; `data.cutmix`): with probability `p` a training batch has a
//! rectangle of each image replaced by the same rectangle of another image of the batch (the batch
//! rolled by one), and the loss weighs the two labels by the areas they hold.
//!
//! The kept fraction `lam` is drawn uniformly (Beta(1, 1), the paper's choice); the rectangle has
//! sides `sqrt(1 - lam)` of the image's, a uniformly drawn centre, and is clipped at the borders,
//! so the weight the loss uses is recomputed from the area actually pasted. Random numbers come
//! from libtorch's generator, which the training loop seeds per (seed, epoch, step): a resumed run
//! draws what an uninterrupted one would.

use tch::{Device, Kind, Tensor};

/// A batch after CutMix: the mixed images, the labels of the pasted rectangles, and the fraction
/// of every image that is still its own.
pub struct Mixed {
    pub images: Tensor,
    pub partner_labels: Tensor,
    pub lam: f64,
}

/// Applies CutMix to `xs` (`[N, C, H, W]`, labels `ys`) with probability `p`; `None` when the
/// draw says no (or the rectangle came out empty): the batch trains as it is.
pub fn cutmix(xs: &Tensor, ys: &Tensor, p: f64) -> Option<Mixed> {
    if p <= 0.0 {
        return None;
    }
    let u = Tensor::rand([4], (Kind::Double, Device::Cpu));
    let u: Vec<f64> = Vec::try_from(&u).ok()?;
    if u[0] >= p {
        return None;
    }
    let (h, w) = (xs.size()[2], xs.size()[3]);
    let r = (1.0 - u[1]).sqrt();
    let (ch, cw) = ((h as f64 * r) as i64, (w as f64 * r) as i64);
    let (cy, cx) = ((u[2] * h as f64) as i64, (u[3] * w as f64) as i64);
    let (y0, y1) = ((cy - ch / 2).clamp(0, h), (cy + ch / 2).clamp(0, h));
    let (x0, x1) = ((cx - cw / 2).clamp(0, w), (cx + cw / 2).clamp(0, w));
    if y1 <= y0 || x1 <= x0 {
        return None;
    }
    let partner = xs.roll([1], [0]);
    let images = xs.copy();
    tch::no_grad(|| {
        images.narrow(2, y0, y1 - y0).narrow(3, x0, x1 - x0).copy_(&partner.narrow(2, y0, y1 - y0).narrow(3, x0, x1 - x0));
    });
    let lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
    Some(Mixed { images, partner_labels: ys.roll([1], [0]), lam })
}

/// The cross-entropy of `logits` against a batch's labels, mixed or not: `lam` times the loss
/// against its own labels plus `1 - lam` times the loss against the pasted images' labels.
pub fn mixed_loss(logits: &Tensor, ys: &Tensor, mixed: Option<&Mixed>, reduction: tch::Reduction, smoothing: f64) -> Tensor {
    let ce = |y: &Tensor| logits.cross_entropy_loss::<Tensor>(y, None, reduction, -100, smoothing);
    match mixed {
        None => ce(ys),
        Some(m) => ce(ys) * m.lam + ce(&m.partner_labels) * (1.0 - m.lam),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> (Tensor, Tensor) {
        // Image i is filled with the value i: where a pixel came from is its value.
        let xs = Tensor::arange(4, (Kind::Float, Device::Cpu)).view([4, 1, 1, 1]).expand([4, 3, 16, 16], false).copy();
        (xs, Tensor::from_slice(&[0i64, 1, 2, 3]))
    }

    /// A mixed image holds its own pixels outside one rectangle and its neighbour's inside it,
    /// in every channel, and `lam` is the fraction of its own.
    #[test]
    fn a_rectangle_comes_from_the_previous_image_and_lam_is_what_is_left() {
        let (xs, ys) = batch();
        let mut mixed_batches = 0;
        for seed in 0..20 {
            tch::manual_seed(seed);
            let Some(m) = cutmix(&xs, &ys, 1.0) else { continue };
            mixed_batches += 1;
            assert_eq!(Vec::<i64>::try_from(&m.partner_labels).unwrap(), vec![3, 0, 1, 2]);
            for i in 0..4i64 {
                let img = m.images.get(i);
                let own = img.eq(i as f64).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
                let pasted = img.eq(((i + 3) % 4) as f64).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
                assert!((own - m.lam).abs() < 1e-9, "seed {seed} image {i}: own {own} against lam {}", m.lam);
                assert!((own + pasted - 1.0).abs() < 1e-9, "seed {seed} image {i}: pixels from elsewhere");
            }
            assert!(m.lam > 0.0 && m.lam < 1.0);
        }
        assert!(mixed_batches >= 15, "p = 1 mixed only {mixed_batches} of 20 batches");
        // The input is untouched.
        assert!(xs.equal(&batch().0));
    }

    /// p = 0 never mixes; p = 0.5 mixes about half the batches; the same seed draws the same mix.
    #[test]
    fn the_probability_and_the_seed_decide() {
        let (xs, ys) = batch();
        assert!(cutmix(&xs, &ys, 0.0).is_none());
        let mixed = (0..200)
            .filter(|s| {
                tch::manual_seed(*s);
                cutmix(&xs, &ys, 0.5).is_some()
            })
            .count();
        assert!((70..=130).contains(&mixed), "p = 0.5 mixed {mixed} of 200");
        tch::manual_seed(7);
        let a = cutmix(&xs, &ys, 1.0).unwrap();
        tch::manual_seed(7);
        let b = cutmix(&xs, &ys, 1.0).unwrap();
        assert!(a.images.equal(&b.images) && a.lam == b.lam);
    }

    /// The mixed loss is the area-weighted sum of the two labels' losses.
    #[test]
    fn the_loss_weighs_both_labels() {
        let logits = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let ys = Tensor::from_slice(&[0i64, 0]);
        let m = Mixed { images: Tensor::zeros([2, 1, 1, 1], (Kind::Float, Device::Cpu)), partner_labels: Tensor::from_slice(&[1i64, 1]), lam: 0.25 };
        let r = tch::Reduction::Sum;
        let got = mixed_loss(&logits, &ys, Some(&m), r, 0.0).double_value(&[]);
        let own = logits.cross_entropy_loss::<Tensor>(&ys, None, r, -100, 0.0).double_value(&[]);
        let other = logits.cross_entropy_loss::<Tensor>(&m.partner_labels, None, r, -100, 0.0).double_value(&[]);
        assert!((got - (0.25 * own + 0.75 * other)).abs() < 1e-5);
        assert!((mixed_loss(&logits, &ys, None, r, 0.0).double_value(&[]) - own).abs() < 1e-6);
    }
}
