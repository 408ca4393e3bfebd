//! Training from packed shards: a [`Dataset`] over a packed directory (`thaw data pack`) whose
//! samples are read straight from the tar files at the offsets of the index, with positioned reads
//! (`pread`) that any number of loader threads share, and read-ahead hints for what comes next.
//!
//! Sample `i` is the index's global sample `i`: consecutive indices are consecutive bytes of a
//! shard, which is what the blocked epoch plan ([`thaw_coordinator::plan::EpochPlan::with_blocks`])
//! turns into long sequential reads per worker.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use image::DynamicImage;

use super::shards::{self, ShardIndex};
use super::{DataError, Dataset, SampleError, Splits};

/// Images at most this many pixels on a side are small centred objects (a packed IDX dataset), to
/// be resized whole like [`super::idx::IdxDataset`]'s rather than centre-cropped.
const WHOLE_MAX_SIDE: u32 = 64;

pub struct ShardDataset {
    dir: PathBuf,
    index: ShardIndex,
    /// Each shard's file and its length, opened on first use.
    files: Vec<OnceLock<Result<(File, u64), String>>>,
    whole: bool,
}

impl ShardDataset {
    pub fn open(dir: &Path) -> Result<ShardDataset, DataError> {
        let index = ShardIndex::load(dir)?;
        if index.num_samples() == 0 {
            return Err(DataError::Invalid {
                path: dir.to_path_buf(),
                reason: "the packed directory has no samples".into(),
            });
        }
        let files = index.shards.iter().map(|_| OnceLock::new()).collect();
        let mut ds = ShardDataset { dir: dir.to_path_buf(), index, files, whole: false };
        // Small images are whole objects (packed IDX): decide from the first readable sample.
        ds.whole = ds
            .encoded_bytes(0)
            .ok()
            .and_then(|b| {
                image::ImageReader::new(std::io::Cursor::new(b)).with_guessed_format().ok()?.into_dimensions().ok()
            })
            .is_some_and(|(w, h)| w.max(h) <= WHOLE_MAX_SIDE);
        Ok(ds)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn index(&self) -> &ShardIndex {
        &self.index
    }

    fn file(&self, shard: usize) -> Result<(&File, u64), String> {
        let path = || self.dir.join(&self.index.shards[shard].file);
        self.files[shard]
            .get_or_init(|| {
                let open = || File::open(path()).and_then(|f| Ok((f.metadata()?.len(), f)));
                open().map(|(len, f)| (f, len)).map_err(|e| format!("cannot open {}: {e}", path().display()))
            })
            .as_ref()
            .map(|(f, len)| (f, *len))
            .map_err(Clone::clone)
    }

    fn encoded_bytes(&self, i: usize) -> Result<Vec<u8>, String> {
        let r = self.index.record(i);
        let shard = self.index.shard_of(i);
        let (file, len) = self.file(shard)?;
        // The index's sizes are claims: nothing is allocated for bytes the file does not hold.
        if r.offset.checked_add(u64::from(r.size)).is_none_or(|end| end > len) {
            return Err(format!(
                "{} bytes at offset {} lie beyond the end of {} ({len} bytes): truncated shard?",
                r.size, r.offset, self.index.shards[shard].file
            ));
        }
        let mut buf = vec![0u8; r.size as usize];
        file.read_exact_at(&mut buf, r.offset).map_err(|e| {
            format!("cannot read {} bytes at offset {} of {}: {e}", r.size, r.offset, self.index.shards[shard].file)
        })?;
        Ok(buf)
    }
}

impl Dataset for ShardDataset {
    fn len(&self) -> usize {
        self.index.num_samples()
    }
    fn label(&self, i: usize) -> i64 {
        i64::from(self.index.record(i).label)
    }
    fn class_names(&self) -> &[String] {
        &self.index.classes
    }
    fn key(&self, i: usize) -> String {
        format!("{}:{}.{}", self.index.shards[self.index.shard_of(i)].file, self.index.key(i), self.index.ext(i))
    }
    fn load(&self, i: usize) -> Result<DynamicImage, SampleError> {
        let err = |reason: String| SampleError { key: self.key(i), reason };
        let bytes = self.encoded_bytes(i).map_err(err)?;
        super::decode_image(&bytes).map_err(|e| err(format!("cannot decode: {e}")))
    }
    fn encoded(&self, i: usize) -> Option<Result<Vec<u8>, SampleError>> {
        Some(self.encoded_bytes(i).map_err(|reason| SampleError { key: self.key(i), reason }))
    }
    fn will_need(&self, indices: &[usize]) {
        for &i in indices {
            let r = self.index.record(i);
            if let Ok((f, _)) = self.file(self.index.shard_of(i)) {
                // A hint: the kernel reads these pages ahead, merging neighbours into long reads.
                // SAFETY: fadvise on an open descriptor has no memory effects.
                unsafe {
                    libc::posix_fadvise(f.as_raw_fd(), r.offset as i64, i64::from(r.size), libc::POSIX_FADV_WILLNEED);
                }
            }
        }
    }
    fn resize_whole(&self) -> bool {
        self.whole
    }
}

/// The splits of a `format = "shards"` job: packed `train/` and `val/` directories, or one packed
/// directory of which `val_fraction` is held out.
pub fn open_splits(root: &Path, val_fraction: f64, seed: u64) -> Result<Splits, DataError> {
    let (train, val) = shards::packed_splits(root)?;
    let train: Arc<dyn Dataset> = Arc::new(ShardDataset::open(&train)?);
    match val {
        Some(val) => Ok(Splits { train, val: Arc::new(ShardDataset::open(&val)?) }),
        None => super::hold_out(train, root, val_fraction, seed),
    }
}
