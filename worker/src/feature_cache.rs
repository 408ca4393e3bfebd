//! A cache of a frozen network prefix's outputs, one entry per dataset sample, so that epochs after
//! the first skip the frozen trunk entirely.
//!
//! Entries are keyed by sample index in `0..num_samples`; all have the shape of the first one put
//! and are stored as `f32`. They live in memory up to a byte budget and spill beyond it to one
//! file of fixed-size records in the cache's directory (created on the first spill, named uniquely
//! per cache, removed on [`FeatureCache::reset`] and on drop), read back with positioned reads.
//! The cache never evicts: once every sample has been put it is complete and stays so until
//! `reset`. Memory holds at most the budget in entries plus an index of `num_samples` slots.
//!
//! The cache has a *key*, the caller's description of what is frozen (groups, input size, stage);
//! it does not interpret the key, and a caller whose frozen prefix changes must `reset` it with the
//! new key. What is cached must be deterministic per sample (no random augmentation before the
//! frozen prefix), which the cache cannot check.
//!
//! This module must never run a network or know about data loading; it stores tensors it is given.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// Bytes of one in-memory chunk of entries: memory grows chunk by chunk (never by reallocation, so
/// a copy never holds two buffers at once) and never past the budget.
const CHUNK_BYTES: usize = 4 << 20;

/// Distinguishes the spill files of the caches of one process.
static SPILL_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("sample index {index} out of range: the cache holds {num_samples} samples")]
    IndexOutOfRange { index: usize, num_samples: usize },
    #[error("feature entry shape {got:?} differs from the cache's entry shape {expected:?}")]
    ShapeMismatch { expected: Vec<i64>, got: Vec<i64> },
    #[error("{indices} sample indices for features of shape {shape:?} (one row per index expected)")]
    BatchSize { indices: usize, shape: Vec<i64> },
    #[error("features of shape {shape:?} have no per-sample entries to cache (a 0-d tensor or an empty entry)")]
    EmptyEntry { shape: Vec<i64> },
    #[error("feature cache spill file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("feature cache: cannot read the feature tensor: {0}")]
    Tensor(#[from] tch::TchError),
}

impl CacheError {
    /// Only disk errors may go away on their own (a full disk being cleaned up); the others are
    /// the caller's mistakes and repeat.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CacheError::Io { .. })
    }
}

/// Counts of a cache, for logs and progress reports. `hits` are samples served by
/// [`FeatureCache::get_batch`]; `misses` are samples requested but not served: absent ones, and
/// present ones in a batch that was not complete (the caller recomputes the whole batch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub entries: usize,
    pub in_memory: usize,
    pub on_disk: usize,
    pub bytes_in_memory: u64,
    pub bytes_on_disk: u64,
    pub hits: u64,
    pub misses: u64,
}

/// Where a sample's entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Absent,
    /// Index among the in-memory entries.
    Memory(u32),
    /// Record number in the spill file.
    Disk(u32),
}

/// The spill file: records `0..records`, each `entry_len` f32s at `record * entry_bytes`.
struct Spill {
    path: PathBuf,
    file: File,
    records: u32,
}

pub struct FeatureCache {
    dir: PathBuf,
    mem_budget_bytes: usize,
    key: String,
    slots: Vec<Slot>,
    /// Shape of one entry (a row of what `put_batch` takes), set by the first put.
    shape: Option<Vec<i64>>,
    /// f32 elements per entry.
    entry_len: usize,
    /// How many entries the budget holds (at most `num_samples`).
    max_in_memory: usize,
    /// In-memory entries, `chunk_entries` per chunk.
    chunks: Vec<Vec<f32>>,
    chunk_entries: usize,
    in_memory: u32,
    spill: Option<Spill>,
    present: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl FeatureCache {
    /// An empty cache for samples `0..num_samples` holding at most `mem_budget_bytes` of entries
    /// in memory and spilling the rest to a file in `dir` (created when first needed).
    pub fn new(dir: PathBuf, mem_budget_bytes: usize, num_samples: usize) -> FeatureCache {
        FeatureCache {
            dir,
            mem_budget_bytes,
            key: String::new(),
            slots: vec![Slot::Absent; num_samples],
            shape: None,
            entry_len: 0,
            max_in_memory: 0,
            chunks: Vec::new(),
            chunk_entries: 0,
            in_memory: 0,
            spill: None,
            present: 0,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The description of what the cached features were computed with (empty until the first
    /// `reset`).
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn num_samples(&self) -> usize {
        self.slots.len()
    }

    /// The shape of one entry, once the first put has set it.
    pub fn entry_shape(&self) -> Option<&[i64]> {
        self.shape.as_deref()
    }

    /// The spill file, while there is one.
    pub fn spill_path(&self) -> Option<&Path> {
        self.spill.as_ref().map(|s| s.path.as_path())
    }

    /// Drops every entry, the entry shape, the counters and the spill file, and sets a new key.
    pub fn reset(&mut self, key: String) {
        self.key = key;
        self.slots.iter_mut().for_each(|s| *s = Slot::Absent);
        self.shape = None;
        self.entry_len = 0;
        self.max_in_memory = 0;
        self.chunks = Vec::new();
        self.chunk_entries = 0;
        self.in_memory = 0;
        self.present = 0;
        self.hits.store(0, Ordering::Relaxed);
        self.misses.store(0, Ordering::Relaxed);
        self.remove_spill();
    }

    /// Whether sample `index` has an entry (false when out of range).
    pub fn contains(&self, index: usize) -> bool {
        self.slots.get(index).is_some_and(|s| *s != Slot::Absent)
    }

    /// Whether every sample has an entry.
    pub fn is_complete(&self) -> bool {
        self.present == self.slots.len()
    }

    /// Number of samples with an entry.
    pub fn len(&self) -> usize {
        self.present
    }

    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    pub fn stats(&self) -> CacheStats {
        let entry_bytes = (self.entry_len * 4) as u64;
        let on_disk = self.present - self.in_memory as usize;
        CacheStats {
            entries: self.present,
            in_memory: self.in_memory as usize,
            on_disk,
            bytes_in_memory: self.in_memory as u64 * entry_bytes,
            bytes_on_disk: self.spill.as_ref().map_or(0, |s| s.records as u64 * entry_bytes),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Stores row `k` of `feats` (`[N, ...]`, any kind and device) as the entry of sample
    /// `indices[k]`, replacing an entry already there. Every index is checked, and the shape, before
    /// anything is stored.
    pub fn put_batch(&mut self, indices: &[usize], feats: &Tensor) -> Result<(), CacheError> {
        let size = feats.size();
        if size.is_empty() || size[0] != indices.len() as i64 {
            return Err(CacheError::BatchSize { indices: indices.len(), shape: size });
        }
        let entry_shape = size[1..].to_vec();
        match &self.shape {
            Some(expected) if *expected != entry_shape => {
                return Err(CacheError::ShapeMismatch { expected: expected.clone(), got: entry_shape })
            }
            _ => {}
        }
        let entry_len = entry_shape.iter().product::<i64>() as usize;
        if entry_len == 0 {
            return Err(CacheError::EmptyEntry { shape: size });
        }
        for &index in indices {
            self.check_index(index)?;
        }
        if indices.is_empty() {
            return Ok(());
        }

        let data = feats.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let mut rows = vec![0f32; indices.len() * entry_len];
        let numel = rows.len();
        data.f_copy_data(&mut rows, numel)?;

        if self.shape.is_none() {
            self.set_shape(entry_shape, entry_len);
        }
        // Rows that need a new spill record go into one buffer, written with one positioned write;
        // their slots point at records `first..` from now on, and go back to absent if it fails.
        let first = self.spill.as_ref().map_or(0, |s| s.records);
        let mut appended: Vec<usize> = Vec::new();
        let mut buf: Vec<f32> = Vec::new();
        for (k, &index) in indices.iter().enumerate() {
            let row = &rows[k * entry_len..(k + 1) * entry_len];
            match self.slots[index] {
                Slot::Memory(m) => self.entry_mut(m as usize).copy_from_slice(row),
                // A sample repeated within the batch: its last row wins.
                Slot::Disk(r) if r >= first => {
                    let at = (r - first) as usize * entry_len;
                    buf[at..at + entry_len].copy_from_slice(row);
                }
                Slot::Disk(r) => {
                    if let Err(e) = self.write_records(r, bytemuck::cast_slice(row)) {
                        self.forget(&appended);
                        return Err(e);
                    }
                }
                Slot::Absent if (self.in_memory as usize) < self.max_in_memory => {
                    let m = self.in_memory;
                    if m as usize == self.chunks.len() * self.chunk_entries {
                        let left = self.max_in_memory - m as usize;
                        self.chunks.push(vec![0f32; left.min(self.chunk_entries) * entry_len]);
                    }
                    self.in_memory += 1;
                    self.entry_mut(m as usize).copy_from_slice(row);
                    self.slots[index] = Slot::Memory(m);
                    self.present += 1;
                }
                Slot::Absent => {
                    self.slots[index] = Slot::Disk(first + appended.len() as u32);
                    appended.push(index);
                    buf.extend_from_slice(row);
                }
            }
        }
        if !appended.is_empty() {
            if let Err(e) = self.write_records(first, bytemuck::cast_slice(&buf)) {
                self.forget(&appended);
                return Err(e);
            }
            if let Some(spill) = &mut self.spill {
                spill.records += appended.len() as u32;
            }
            self.present += appended.len();
        }
        Ok(())
    }

    /// The entries of `indices` stacked into one `[N, ...]` Float tensor on the CPU, if all are
    /// present; `None` if any is absent or on any error (then logged; [`Self::try_get_batch`]
    /// returns it), so that the caller recomputes the batch.
    pub fn get_batch(&self, indices: &[usize]) -> Option<Tensor> {
        match self.try_get_batch(indices) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("feature cache: {e}; recomputing the batch");
                None
            }
        }
    }

    /// [`Self::get_batch`], with its errors (an index out of range, a failed read).
    pub fn try_get_batch(&self, indices: &[usize]) -> Result<Option<Tensor>, CacheError> {
        for &index in indices {
            self.check_index(index)?;
        }
        let n = indices.len() as u64;
        let shape = match &self.shape {
            Some(shape) if indices.iter().all(|&i| self.slots[i] != Slot::Absent) => shape,
            _ => {
                self.misses.fetch_add(n, Ordering::Relaxed);
                return Ok(None);
            }
        };
        let len = self.entry_len;
        let mut out = vec![0f32; indices.len() * len];
        for (dst, &index) in out.chunks_exact_mut(len).zip(indices) {
            match self.slots[index] {
                Slot::Memory(m) => dst.copy_from_slice(self.entry(m as usize)),
                Slot::Disk(r) => {
                    if let Err(e) = self.read_record(r, dst) {
                        self.misses.fetch_add(n, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Slot::Absent => unreachable!("checked above"),
            }
        }
        self.hits.fetch_add(n, Ordering::Relaxed);
        let mut dims = Vec::with_capacity(shape.len() + 1);
        dims.push(indices.len() as i64);
        dims.extend_from_slice(shape);
        Ok(Some(Tensor::from_slice(&out).reshape(dims)))
    }

    /// Undoes the slots of records a failed put did not write, and the entry shape if nothing
    /// was stored under it.
    fn forget(&mut self, appended: &[usize]) {
        for &index in appended {
            self.slots[index] = Slot::Absent;
        }
        if self.present == 0 {
            self.shape = None;
        }
    }

    fn check_index(&self, index: usize) -> Result<(), CacheError> {
        if index < self.slots.len() {
            Ok(())
        } else {
            Err(CacheError::IndexOutOfRange { index, num_samples: self.slots.len() })
        }
    }

    fn set_shape(&mut self, shape: Vec<i64>, entry_len: usize) {
        let entry_bytes = entry_len * 4;
        self.max_in_memory = (self.mem_budget_bytes / entry_bytes).min(self.slots.len()).min(u32::MAX as usize);
        self.chunk_entries = (CHUNK_BYTES / entry_bytes).max(1);
        self.entry_len = entry_len;
        self.shape = Some(shape);
    }

    fn entry(&self, m: usize) -> &[f32] {
        let (c, i) = (m / self.chunk_entries, m % self.chunk_entries);
        &self.chunks[c][i * self.entry_len..(i + 1) * self.entry_len]
    }

    fn entry_mut(&mut self, m: usize) -> &mut [f32] {
        let (c, i) = (m / self.chunk_entries, m % self.chunk_entries);
        &mut self.chunks[c][i * self.entry_len..(i + 1) * self.entry_len]
    }

    /// The spill file, created on first use under a name no other cache has.
    fn spill(&mut self) -> Result<&mut Spill, CacheError> {
        if self.spill.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(|source| CacheError::Io { path: self.dir.clone(), source })?;
            let mut attempt = 0;
            let (path, file) = loop {
                let n = SPILL_COUNTER.fetch_add(1, Ordering::Relaxed);
                let path = self.dir.join(format!("thaw-feature-cache-{}-{n}.f32", std::process::id()));
                match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
                    Ok(file) => break (path, file),
                    // Left behind by a process that had the same id and crashed.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
                    Err(source) => return Err(CacheError::Io { path, source }),
                }
            };
            self.spill = Some(Spill { path, file, records: 0 });
        }
        Ok(self.spill.as_mut().expect("created above"))
    }

    fn write_records(&mut self, first: u32, bytes: &[u8]) -> Result<(), CacheError> {
        let offset = first as u64 * (self.entry_len * 4) as u64;
        let spill = self.spill()?;
        spill.file.write_all_at(bytes, offset).map_err(|source| CacheError::Io { path: spill.path.clone(), source })
    }

    fn read_record(&self, record: u32, dst: &mut [f32]) -> Result<(), CacheError> {
        let spill = self.spill.as_ref().expect("a disk slot implies a spill file");
        let offset = record as u64 * (self.entry_len * 4) as u64;
        spill
            .file
            .read_exact_at(bytemuck::cast_slice_mut(dst), offset)
            .map_err(|source| CacheError::Io { path: spill.path.clone(), source })
    }

    fn remove_spill(&mut self) {
        if let Some(spill) = self.spill.take() {
            drop(spill.file);
            if let Err(e) = std::fs::remove_file(&spill.path) {
                tracing::warn!("feature cache: cannot remove spill file {}: {e}", spill.path.display());
            }
        }
    }
}

impl Drop for FeatureCache {
    fn drop(&mut self) {
        self.remove_spill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: [i64; 3] = [3, 2, 2];
    const ENTRY_BYTES: usize = 12 * 4;

    /// Entry of sample `i`: distinct, non-round values (bit-exactness is checked on them).
    fn rows(indices: &[usize]) -> Tensor {
        let data: Vec<f32> =
            indices.iter().flat_map(|&i| (0..12).map(move |j| (i as f32 + 1.0) * 0.1 + j as f32 / 7.0 - 0.3)).collect();
        Tensor::from_slice(&data).reshape([indices.len() as i64, SHAPE[0], SHAPE[1], SHAPE[2]])
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 tensor");
        v.into_iter().map(f32::to_bits).collect()
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir).map(|d| d.map(|e| e.expect("entry").path()).collect()).unwrap_or_default()
    }

    #[test]
    fn round_trip_is_exact_and_converts_to_f32_on_cpu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = FeatureCache::new(dir.path().to_path_buf(), 1 << 20, 6);
        cache.reset("groups 0..4 frozen, 64 px".into());
        assert_eq!(cache.key(), "groups 0..4 frozen, 64 px");
        // Stored from f64: the f32 of each value comes back.
        cache.put_batch(&[4, 1], &rows(&[4, 1]).to_kind(Kind::Double)).expect("put");
        assert_eq!(cache.entry_shape(), Some(&SHAPE[..]));
        let got = cache.get_batch(&[1, 4, 1]).expect("all present");
        assert_eq!(got.kind(), Kind::Float);
        assert_eq!(got.device(), Device::Cpu);
        assert_eq!(got.size(), vec![3, 3, 2, 2]);
        assert_eq!(bits(&got), bits(&rows(&[1, 4, 1])));
        assert!(cache.contains(4) && cache.contains(1) && !cache.contains(0) && !cache.contains(99));
        assert_eq!(cache.len(), 2);
        // A put replaces an entry without adding one.
        cache.put_batch(&[4], &(rows(&[4]) * 2.0)).expect("put");
        assert_eq!(cache.len(), 2);
        assert_eq!(bits(&cache.get_batch(&[4]).expect("present")), bits(&(rows(&[4]) * 2.0)));
        assert!(cache.spill_path().is_none(), "everything fits in memory");
    }

    #[test]
    fn memory_budget_is_respected_and_spilled_entries_read_back_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = FeatureCache::new(dir.path().to_path_buf(), ENTRY_BYTES * 5 / 2, 10);
        // Out of order, in three batches, one sample twice in a batch (its last row counts).
        cache.put_batch(&[7, 2, 9], &rows(&[7, 2, 9])).expect("put");
        let dup = rows(&[0, 0, 5, 3]);
        let _ = dup.get(0).fill_(42.0);
        cache.put_batch(&[0, 0, 5, 3], &dup).expect("put");
        cache.put_batch(&[8, 1, 6, 4], &rows(&[8, 1, 6, 4])).expect("put");
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.in_memory, stats.on_disk), (10, 2, 8), "{stats:?}");
        assert_eq!(stats.bytes_in_memory, 2 * ENTRY_BYTES as u64);
        assert_eq!(stats.bytes_on_disk, 8 * ENTRY_BYTES as u64);
        let allocated: usize = cache.chunks.iter().map(|c| c.len() * 4).sum();
        assert!(allocated <= ENTRY_BYTES * 5 / 2, "{allocated} bytes allocated");
        assert!(cache.is_complete());

        let spill = cache.spill_path().expect("a spill file").to_path_buf();
        assert_eq!(spill.parent(), Some(dir.path()));
        assert_eq!(std::fs::metadata(&spill).expect("spill file").len(), 8 * ENTRY_BYTES as u64);

        let order = [3, 9, 0, 1, 2, 8, 4, 7, 5, 6];
        let got = cache.get_batch(&order).expect("complete");
        assert_eq!(bits(&got), bits(&rows(&order)));
        // Overwriting a spilled entry rewrites its record in place.
        cache.put_batch(&[9], &(rows(&[9]) - 1.0)).expect("put");
        assert_eq!(bits(&cache.get_batch(&[9]).expect("present")), bits(&(rows(&[9]) - 1.0)));
        assert_eq!(cache.stats().on_disk, 8);
        assert_eq!(std::fs::metadata(&spill).expect("spill file").len(), 8 * ENTRY_BYTES as u64);
    }

    #[test]
    fn a_batch_is_served_only_when_complete_and_counted_per_sample() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = FeatureCache::new(dir.path().to_path_buf(), ENTRY_BYTES, 4);
        assert!(cache.get_batch(&[0, 1]).is_none(), "empty cache");
        cache.put_batch(&[0, 2], &rows(&[0, 2])).expect("put");
        assert!(cache.get_batch(&[0, 1, 2]).is_none(), "sample 1 is absent");
        assert!(!cache.is_complete());
        assert_eq!(bits(&cache.get_batch(&[2, 0]).expect("both present")), bits(&rows(&[2, 0])));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (2, 5), "{stats:?}");
        cache.put_batch(&[1, 3], &rows(&[1, 3])).expect("put");
        assert!(cache.is_complete());
        assert_eq!(cache.len(), 4);

        let err = cache.try_get_batch(&[1, 4]).unwrap_err();
        assert!(matches!(err, CacheError::IndexOutOfRange { index: 4, num_samples: 4 }), "{err}");
        assert!(cache.get_batch(&[4]).is_none());
        let err = cache.put_batch(&[0, 17], &rows(&[0, 1])).unwrap_err().to_string();
        assert!(err.contains("17") && err.contains('4'), "{err}");
        // The failed put stored nothing: sample 0 keeps its entry.
        assert_eq!(bits(&cache.get_batch(&[0]).expect("present")), bits(&rows(&[0])));
        let err = cache.put_batch(&[0, 1, 2], &rows(&[0, 1])).unwrap_err();
        assert!(matches!(err, CacheError::BatchSize { indices: 3, .. }), "{err}");
    }

    #[test]
    fn reset_invalidates_everything_and_removes_the_spill_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = FeatureCache::new(dir.path().to_path_buf(), ENTRY_BYTES, 3);
        cache.reset("stage 0".into());
        cache.put_batch(&[0, 1, 2], &rows(&[0, 1, 2])).expect("put");
        let _ = cache.get_batch(&[0]);
        let spill = cache.spill_path().expect("spilled").to_path_buf();
        assert!(spill.exists());

        cache.reset("stage 1".into());
        assert_eq!(cache.key(), "stage 1");
        assert!(!spill.exists(), "spill file left behind");
        assert!(cache.spill_path().is_none());
        assert!(cache.is_empty() && !cache.is_complete() && !cache.contains(0));
        assert_eq!(cache.stats(), CacheStats::default());
        assert!(cache.get_batch(&[0]).is_none());
        // A new shape is accepted after a reset, and spills to a new file.
        let wide = Tensor::ones([3, 40], (Kind::Float, Device::Cpu));
        cache.put_batch(&[0, 1, 2], &wide).expect("put after reset");
        assert_eq!(cache.entry_shape(), Some(&[40i64][..]));
        let spill2 = cache.spill_path().expect("spilled again").to_path_buf();
        assert_ne!(spill2, spill);
        assert_eq!(files_in(dir.path()), vec![spill2]);
    }

    #[test]
    fn a_put_with_another_shape_is_an_error_naming_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = FeatureCache::new(dir.path().to_path_buf(), 1 << 20, 4);
        cache.put_batch(&[0], &rows(&[0])).expect("put");
        let err = cache.put_batch(&[1], &Tensor::zeros([1, 3, 4, 4], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(matches!(err, CacheError::ShapeMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("[3, 4, 4]") && msg.contains("[3, 2, 2]"), "{msg}");
        assert!(!cache.contains(1));
        assert!(!err.is_retryable());
        let err = cache.put_batch(&[1], &Tensor::zeros([1, 0], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(matches!(err, CacheError::ShapeMismatch { .. }), "{err}");
    }

    #[test]
    fn spill_file_is_removed_on_drop_and_each_cache_has_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = FeatureCache::new(dir.path().join("cache"), 0, 2);
        let mut b = FeatureCache::new(dir.path().join("cache"), 0, 2);
        a.put_batch(&[0, 1], &rows(&[0, 1])).expect("put");
        b.put_batch(&[1, 0], &rows(&[0, 1])).expect("put");
        let (pa, pb) = (a.spill_path().expect("a").to_path_buf(), b.spill_path().expect("b").to_path_buf());
        assert_ne!(pa, pb);
        assert_eq!(a.stats().in_memory, 0, "a zero budget keeps nothing in memory");
        assert_eq!(bits(&a.get_batch(&[1, 0]).expect("a")), bits(&rows(&[1, 0])));
        assert_eq!(bits(&b.get_batch(&[1, 0]).expect("b")), bits(&rows(&[0, 1])));
        drop(a);
        assert!(!pa.exists() && pb.exists());
        drop(b);
        assert!(files_in(&dir.path().join("cache")).is_empty());
    }

    #[test]
    fn disk_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"").expect("write");
        let mut cache = FeatureCache::new(blocker.join("cache"), 0, 1);
        let err = cache.put_batch(&[0], &rows(&[0])).unwrap_err();
        assert!(err.is_retryable());
        assert!(err.to_string().contains("not-a-dir"), "{err}");
        assert!(!cache.contains(0), "a failed spill stores nothing");
        assert!(cache.entry_shape().is_none(), "nor sets the entry shape");
    }
}
