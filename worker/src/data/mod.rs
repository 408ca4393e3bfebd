//! Datasets and the batch loader.
//!
//! A [`Dataset`] is an indexable list of labelled samples that decodes one sample at a time:
//! [`idx::IdxDataset`] (MNIST/Fashion-MNIST files, held in memory) and [`folder::FolderDataset`]
//! (an image-folder tree of JPEG/PNG files). [`loader::Loader`] turns an ordered list of indices
//! into batches of tensors on its own threads, ahead of the trainer.
//!
//! A sample that cannot be read or decoded is never fatal: the loader skips it, counts it and
//! reports its key. Nothing here touches the model.

pub mod decode;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod sharded;
pub mod shards;
pub mod transform;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::DynamicImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use thaw_coordinator::spec::{DataFormat, DataSpec};

/// Errors opening a dataset (per-sample failures are [`SampleError`]s and are skipped).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data directory {0} does not exist")]
    MissingRoot(PathBuf),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// One sample that could not be used; the loader skips it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SampleError {
    pub key: String,
    pub reason: String,
}

/// An indexable, labelled image dataset. Implementations must be cheap to share across threads.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn label(&self, i: usize) -> i64;
    fn class_names(&self) -> &[String];
    /// A stable, human-readable name of sample `i` (a file path, or `split[i]`).
    fn key(&self, i: usize) -> String;
    /// Reads and decodes sample `i`.
    fn load(&self, i: usize) -> Result<DynamicImage, SampleError>;
    /// The encoded bytes (JPEG or PNG) of sample `i`, for datasets that store files: the loader
    /// then decodes and augments in one pass ([`decode::Augment`]). `None` for datasets held
    /// decoded (IDX).
    fn encoded(&self, _i: usize) -> Option<Result<Vec<u8>, SampleError>> {
        None
    }
    /// A hint that samples `indices` are read soon (read-ahead); may do nothing.
    fn will_need(&self, _indices: &[usize]) {}
    /// Whether samples are small centred objects to be resized whole (IDX digits and clothes)
    /// rather than photos to be resized and centre-cropped.
    fn resize_whole(&self) -> bool {
        false
    }
}

/// A subset of another dataset, by index.
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Self {
        Subset { inner, indices }
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn label(&self, i: usize) -> i64 {
        self.inner.label(self.indices[i])
    }
    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }
    fn key(&self, i: usize) -> String {
        self.inner.key(self.indices[i])
    }
    fn load(&self, i: usize) -> Result<DynamicImage, SampleError> {
        self.inner.load(self.indices[i])
    }
    fn encoded(&self, i: usize) -> Option<Result<Vec<u8>, SampleError>> {
        self.inner.encoded(self.indices[i])
    }
    fn will_need(&self, indices: &[usize]) {
        self.inner.will_need(&indices.iter().map(|&i| self.indices[i]).collect::<Vec<_>>())
    }
    fn resize_whole(&self) -> bool {
        self.inner.resize_whole()
    }
}

/// The training and validation splits of a job.
pub struct Splits {
    pub train: Arc<dyn Dataset>,
    pub val: Arc<dyn Dataset>,
}

/// A seeded permutation of `0..n`: the same (seed, stream) always gives the same order.
pub fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    v.shuffle(&mut rng);
    v
}

fn limit(ds: Arc<dyn Dataset>, limit: Option<usize>, seed: u64, stream: u64) -> Arc<dyn Dataset> {
    match limit {
        Some(n) if n < ds.len() => {
            let mut idx = permutation(ds.len(), seed, stream);
            idx.truncate(n);
            idx.sort_unstable();
            Arc::new(Subset::new(ds, idx))
        }
        _ => ds,
    }
}

/// `all` split into training and validation subsets, a seeded `val_fraction` held out (`root`
/// names the data in the error when there are too few samples).
pub fn hold_out(all: Arc<dyn Dataset>, root: &Path, val_fraction: f64, seed: u64) -> Result<Splits, DataError> {
    let n_val = ((all.len() as f64) * val_fraction).round().max(1.0) as usize;
    if n_val >= all.len() {
        return Err(DataError::Invalid {
            path: root.to_path_buf(),
            reason: format!("{} images are too few to hold out a validation split of {val_fraction}", all.len()),
        });
    }
    let perm = permutation(all.len(), seed, 0xF01D);
    let (mut val, mut train) = (perm[..n_val].to_vec(), perm[n_val..].to_vec());
    val.sort_unstable();
    train.sort_unstable();
    Ok(Splits { train: Arc::new(Subset::new(all.clone(), train)), val: Arc::new(Subset::new(all, val)) })
}

/// Whether JPEG data ends with its end-of-image marker (within its last 32 bytes, to allow for
/// trailing padding). Decoders fill a JPEG that was cut short with grey rather than fail, so a
/// truncated file is only caught by looking.
pub fn jpeg_complete(data: &[u8]) -> bool {
    data[data.len().saturating_sub(32)..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decodes an encoded image, refusing a JPEG that was cut short (see [`jpeg_complete`]).
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage, String> {
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_complete(bytes) {
        return Err("truncated JPEG (no end-of-image marker)".into());
    }
    image::load_from_memory(bytes).map_err(|e| e.to_string())
}

/// Opens the splits a job spec names, applying its limits (seeded subsets).
pub fn open_splits(spec: &DataSpec, seed: u64) -> Result<Splits, DataError> {
    if !spec.root.is_dir() {
        return Err(DataError::MissingRoot(spec.root.clone()));
    }
    let (train, val): (Arc<dyn Dataset>, Arc<dyn Dataset>) = match spec.format {
        DataFormat::Idx => (
            Arc::new(idx::IdxDataset::open(&spec.root, idx::Split::Train)?),
            Arc::new(idx::IdxDataset::open(&spec.root, idx::Split::Test)?),
        ),
        DataFormat::Folder => folder::open_splits(&spec.root, spec.val_fraction, seed)?,
        DataFormat::Shards => {
            let s = sharded::open_splits(&spec.root, spec.val_fraction, seed)?;
            (s.train, s.val)
        }
    };
    if train.class_names() != val.class_names() {
        return Err(DataError::Invalid {
            path: spec.root.clone(),
            reason: format!(
                "training classes ({}) differ from validation classes ({})",
                train.class_names().join(", "),
                val.class_names().join(", ")
            ),
        });
    }
    // A tuning run never sees the validation (test) split: part of the training images stands in.
    let (train, val) = match spec.holdout {
        Some(f) => {
            let s = hold_out(train, &spec.root, f, seed)?;
            (s.train, s.val)
        }
        None => (train, val),
    };
    Ok(Splits { train: limit(train, spec.train_limit, seed, 1), val: limit(val, spec.val_limit, seed, 2) })
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_seeded_and_complete() {
        let a = permutation(1000, 7, 3);
        assert_eq!(a, permutation(1000, 7, 3));
        assert_ne!(a, permutation(1000, 7, 4));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn holdout_replaces_the_test_split_with_part_of_train() {
        // train/ (20 images) and val/ (4): with holdout = 0.25 the val/ tree is never opened as
        // the validation split; 5 training images stand in for it, disjoint from the other 15.
        let dir = tempfile::tempdir().unwrap();
        for (split, n) in [("train", 10), ("val", 2)] {
            for class in ["a", "b"] {
                let d = dir.path().join(split).join(class);
                std::fs::create_dir_all(&d).unwrap();
                for i in 0..n {
                    image::RgbImage::new(4, 4).save(d.join(format!("{split}{i}.png"))).unwrap();
                }
            }
        }
        let mut spec = DataSpec {
            format: DataFormat::Folder,
            root: dir.path().to_path_buf(),
            image_size: None,
            train_limit: None,
            val_limit: None,
            val_fraction: 0.1,
            hflip: false,
            loader_threads: 1,
            random_resized_crop: false,
            read_block: 256,
            shuffle_window: 1024,
            max_skipped: None,
            holdout: None,
            tta_hflip: false,
            tta_shift: 0,
            tta_sizes: Vec::new(),
            random_shift: 0,
        random_erase: 0.0,
        cutmix: 0.0,
            progressive_sizes: Vec::new(),
        };
        let plain = open_splits(&spec, 7).unwrap();
        assert_eq!((plain.train.len(), plain.val.len()), (20, 4));
        spec.holdout = Some(0.25);
        let tuned = open_splits(&spec, 7).unwrap();
        assert_eq!((tuned.train.len(), tuned.val.len()), (15, 5));
        let keys = |ds: &Arc<dyn Dataset>| (0..ds.len()).map(|i| ds.key(i)).collect::<std::collections::HashSet<_>>();
        let (train, val) = (keys(&tuned.train), keys(&tuned.val));
        assert!(val.iter().all(|k| k.contains("train") && !train.contains(k)), "{val:?}");
    }
}
