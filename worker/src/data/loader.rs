//! The batch loader: decodes and transforms samples on a pool of threads and hands finished batches
//! to the trainer in order, so data preparation overlaps the model's compute and memory stays
//! bounded.
//!
//! Each of the `threads` workers builds whole batches (steps `w, w + T, w + 2T, ...` for worker `w`
//! of `T`) into its own bounded queue of `prefetch` batches; the consumer takes the queues in turn.
//! No locks, no barrier between batches, and at most `T·prefetch` batches exist ahead of the
//! trainer. Before a batch a worker hints its next batch's samples to the dataset
//! ([`Dataset::will_need`]), so file data is read ahead.
//!
//! Samples stored encoded (JPEG/PNG files, shards) are decoded and augmented in one pass
//! ([`Augment`]); datasets held decoded (IDX) go through [`Transform::apply`].
//!
//! Deterministic: the order is given, and the only randomness (crops, flips, shifts, erasing) is a pure
//! function of (seed, epoch, sample index), so a resumed epoch sees exactly the batches it would
//! have seen, whatever the thread count.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use tch::Tensor;

use super::decode::{sample_key, Augment};
use super::transform::{random_erase, Transform};
use super::{Dataset, SampleError};

/// One batch of inputs `[n, c, s, s]` and labels `[n]`; `n` may be less than the batch size when
/// samples were skipped.
pub struct Batch {
    pub step: usize,
    pub images: Tensor,
    pub labels: Tensor,
    /// Dataset indices of the samples in the batch, in order.
    pub indices: Vec<usize>,
    /// Samples of this batch that could not be used.
    pub skipped: Vec<SampleError>,
    /// Dataset indices of the skipped samples, in the order of `skipped`.
    pub skipped_indices: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub threads: usize,
    /// Batches each thread prepares ahead of the consumer.
    pub prefetch: usize,
    /// Random horizontal flips (training only).
    pub hflip: bool,
    /// RandomResizedCrop instead of resize + centre crop (training only; encoded samples).
    pub random_crop: bool,
    /// Random translations of up to this many stored pixels each way (training only; decoded
    /// samples such as IDX images).
    pub shift: u32,
    /// Random erasing: the probability that a sample has one rectangle blanked (training only).
    pub erase: f32,
    pub seed: u64,
    pub epoch: u64,
}

impl LoaderConfig {
    /// Deterministic evaluation order and transforms: no flips, no random crops.
    pub fn eval(batch_size: usize, threads: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            threads,
            prefetch: 2,
            hflip: false,
            random_crop: false,
            shift: 0,
            erase: 0.0,
            seed: 0,
            epoch: 0,
        }
    }
}

/// splitmix64: a well-mixed 64-bit hash, used as a per-sample coin.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether sample `index` is flipped in `epoch` (decoded datasets; encoded ones take their coin
/// from [`sample_key`]).
pub fn flip_coin(seed: u64, epoch: u64, index: usize) -> bool {
    mix(seed ^ mix(epoch ^ mix(index as u64))) & 1 == 1
}

/// The translation of sample `index` in `epoch`: (dx, dy), each in `-max..=max`, independent of
/// its flip coin.
pub fn shift_of(seed: u64, epoch: u64, index: usize, max: u32) -> (i32, i32) {
    if max == 0 {
        return (0, 0);
    }
    let h = mix(mix(seed ^ 0x5348_4946_5400_0000) ^ mix(epoch ^ mix(index as u64)));
    let span = 2 * max as u64 + 1;
    ((h % span) as i32 - max as i32, ((h >> 32) % span) as i32 - max as i32)
}

pub struct Loader {
    queues: Vec<Receiver<Batch>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    steps: usize,
}

impl Loader {
    /// Starts producing batches of `order` (dataset indices) in chunks of `cfg.batch_size`, from
    /// batch `start_step` on.
    pub fn start(
        ds: Arc<dyn Dataset>,
        order: Vec<usize>,
        start_step: usize,
        transform: Transform,
        cfg: LoaderConfig,
    ) -> Loader {
        let batches = order.chunks(cfg.batch_size.max(1)).map(<[usize]>::to_vec).collect();
        Self::start_batches(ds, batches, start_step, transform, cfg)
    }

    /// Starts producing the given batches (dataset indices; a batch may be short or empty, as the
    /// padded tail of a distributed epoch is), from batch `start_step` on.
    pub fn start_batches(
        ds: Arc<dyn Dataset>,
        batches: Vec<Vec<usize>>,
        start_step: usize,
        transform: Transform,
        cfg: LoaderConfig,
    ) -> Loader {
        let steps = batches.len();
        let threads = cfg.threads.clamp(1, steps.saturating_sub(start_step).max(1));
        let batches = Arc::new(batches);
        let (mut queues, mut handles) = (Vec::new(), Vec::new());
        for w in 0..threads {
            let (tx, rx) = sync_channel(cfg.prefetch.max(1));
            let (ds, batches, t, cfg) = (ds.clone(), batches.clone(), transform.clone(), cfg.clone());
            let handle = std::thread::Builder::new()
                .name(format!("thaw-loader-{w}"))
                .spawn(move || {
                    let aug = t.augment(cfg.random_crop, cfg.hflip);
                    for step in (start_step + w..batches.len()).step_by(threads) {
                        if let Some(next) = batches.get(step + threads) {
                            ds.will_need(next);
                        }
                        let batch = make_batch(ds.as_ref(), &batches[step], step, &t, &aug, &cfg);
                        if tx.send(batch).is_err() {
                            return; // the consumer stopped early
                        }
                    }
                })
                .expect("spawn loader thread");
            queues.push(rx);
            handles.push(handle);
        }
        Loader { queues, handles, next: 0, steps }
    }

    /// Total batches in the epoch (including any skipped by `start_step`).
    pub fn steps(&self) -> usize {
        self.steps
    }
}

impl Iterator for Loader {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        let q = self.queues.get(self.next % self.queues.len().max(1))?;
        let batch = q.recv().ok()?;
        self.next += 1;
        Some(batch)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.queues.clear(); // unblocks the producers
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Reads, decodes and transforms sample `i` into `out`, then erases part of it if `cfg.erase`
/// says so.
fn prepare(
    ds: &dyn Dataset,
    i: usize,
    t: &Transform,
    aug: &Augment,
    cfg: &LoaderConfig,
    out: &mut [f32],
) -> Result<(), SampleError> {
    let key = sample_key(cfg.seed, cfg.epoch, i as u64);
    match ds.encoded(i) {
        Some(Ok(bytes)) => {
            aug.apply_encoded(&bytes, key, out).map_err(|reason| SampleError { key: ds.key(i), reason })?
        }
        Some(Err(e)) => return Err(e),
        None => {
            let img = ds.load(i)?;
            let shift = shift_of(cfg.seed, cfg.epoch, i, cfg.shift);
            t.apply_shifted(&img, cfg.hflip && flip_coin(cfg.seed, cfg.epoch, i), shift, out);
        }
    }
    if cfg.erase > 0.0 {
        random_erase(out, t.channels, t.size as usize, cfg.erase, key);
    }
    Ok(())
}

/// Decodes and transforms `idx` into one batch, skipping (and naming) samples that fail.
pub fn make_batch(
    ds: &dyn Dataset,
    idx: &[usize],
    step: usize,
    t: &Transform,
    aug: &Augment,
    cfg: &LoaderConfig,
) -> Batch {
    let len = t.sample_len();
    let side = t.size as i64;
    // Samples are written straight into the batch tensor's memory: no staging buffer, no copy.
    let images = Tensor::empty([idx.len() as i64, t.channels as i64, side, side], (tch::Kind::Float, tch::Device::Cpu));
    let flat: &mut [f32] = if idx.is_empty() {
        &mut []
    } else {
        // SAFETY: a new contiguous CPU float tensor of idx.len() * len elements, owned here and
        // not aliased until this function returns it.
        unsafe { std::slice::from_raw_parts_mut(images.data_ptr() as *mut f32, idx.len() * len) }
    };
    let (mut skipped, mut skipped_indices) = (Vec::new(), Vec::new());
    let mut indices = Vec::with_capacity(idx.len());
    let mut labels = Vec::with_capacity(idx.len());
    let mut write = 0;
    for &i in idx {
        match prepare(ds, i, t, aug, cfg, &mut flat[write * len..(write + 1) * len]) {
            Ok(()) => {
                write += 1;
                indices.push(i);
                labels.push(ds.label(i));
            }
            Err(e) => {
                skipped.push(e);
                skipped_indices.push(i);
            }
        }
    }
    let images = if write < idx.len() { images.narrow(0, 0, write as i64) } else { images };
    Batch { step, images, labels: Tensor::from_slice(&labels), indices, skipped, skipped_indices }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::DynamicImage;

    /// Sample `i` is a flat gray image of value `i`; every third sample is "corrupt".
    struct Toy(usize);
    impl Dataset for Toy {
        fn len(&self) -> usize {
            self.0
        }
        fn label(&self, i: usize) -> i64 {
            (i % 2) as i64
        }
        fn class_names(&self) -> &[String] {
            &[]
        }
        fn key(&self, i: usize) -> String {
            format!("toy[{i}]")
        }
        fn load(&self, i: usize) -> Result<DynamicImage, SampleError> {
            if i % 3 == 2 {
                return Err(SampleError { key: self.key(i), reason: "corrupt".into() });
            }
            Ok(DynamicImage::ImageLuma8(image::GrayImage::from_pixel(2, 2, image::Luma([i as u8]))))
        }
    }

    fn transform() -> Transform {
        Transform { size: 2, resize: 2, whole: true, channels: 1, mean: vec![0.], std: vec![1. / 255.] }
    }

    #[test]
    fn batches_skip_corrupt_samples_and_keep_order() {
        let cfg = LoaderConfig { threads: 3, ..LoaderConfig::eval(4, 1) };
        let order: Vec<usize> = (0..10).rev().collect();
        let batches: Vec<Batch> = Loader::start(Arc::new(Toy(10)), order, 0, transform(), cfg).collect();
        assert_eq!(batches.len(), 3);
        let used: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(used, [9, 7, 6, 4, 3, 1, 0]);
        let skipped: Vec<String> = batches.iter().flat_map(|b| b.skipped.iter().map(|e| e.key.clone())).collect();
        assert_eq!(skipped, ["toy[8]", "toy[5]", "toy[2]"]);
        let first = Vec::<f32>::try_from(batches[0].images.flatten(0, -1)).unwrap();
        let firsts: Vec<i64> = first.chunks(4).map(|c| c[0].round() as i64).collect();
        assert_eq!(firsts, [9, 7, 6], "pixel values follow the batch order after compaction");
        assert_eq!(Vec::<i64>::try_from(&batches[0].labels).unwrap(), [1, 1, 0]);
    }

    #[test]
    fn resuming_from_a_step_gives_the_same_batches() {
        let cfg = LoaderConfig { hflip: true, seed: 5, epoch: 2, prefetch: 1, ..LoaderConfig::eval(3, 2) };
        let order: Vec<usize> = (0..9).collect();
        let all: Vec<Vec<usize>> =
            Loader::start(Arc::new(Toy(9)), order.clone(), 0, transform(), cfg.clone()).map(|b| b.indices).collect();
        let tail: Vec<Vec<usize>> =
            Loader::start(Arc::new(Toy(9)), order, 2, transform(), cfg).map(|b| b.indices).collect();
        assert_eq!(&all[2..], &tail[..]);
        let flips = (0..1000).filter(|&i| flip_coin(5, 2, i)).count();
        assert!((400..600).contains(&flips), "coin is fair-ish: {flips}");
    }

    #[test]
    fn shifts_cover_the_range_and_change_with_the_epoch() {
        let shifts: Vec<(i32, i32)> = (0..2000).map(|i| shift_of(5, 2, i, 2)).collect();
        for v in -2..=2 {
            assert!(shifts.iter().any(|s| s.0 == v) && shifts.iter().any(|s| s.1 == v), "{v} never drawn");
        }
        assert!(shifts.iter().all(|s| s.0.abs() <= 2 && s.1.abs() <= 2));
        let centred = shifts.iter().filter(|s| **s == (0, 0)).count();
        assert!((40..130).contains(&centred), "about 1 in 25 unshifted: {centred}");
        let other: Vec<(i32, i32)> = (0..2000).map(|i| shift_of(5, 3, i, 2)).collect();
        assert!(shifts.iter().zip(&other).filter(|(a, b)| a != b).count() > 1500);
        assert_eq!(shift_of(5, 2, 7, 0), (0, 0));
    }
}
