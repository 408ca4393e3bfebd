//! Packed shards: an image-folder tree or an IDX dataset packed into WebDataset-compatible tar
//! files, so that workers read a few large files sequentially instead of millions of small ones.
//!
//! Layout of a packed directory:
//! - `shard-000000.tar`, `shard-000001.tar`, ...: each sample is two tar members with the same key,
//!   `<key>.<ext>` (the original image bytes, `jpg` or `png`) and `<key>.cls` (the class index in
//!   decimal), which is what the Python `webdataset` library reads. The key is
//!   `<label:05>_<source:09>` ([`ShardIndex::key`]), `source` being the sample's index in the
//!   source listing (classes and files sorted, or the IDX order);
//! - `samples.bin`: one fixed-size little-endian record per sample in global order (shards in
//!   order, samples in file order, so consecutive global indices are consecutive bytes of a shard):
//!   a 24-byte header (magic `THAWSMPL`, version u32, record size u32, count u64), then per sample
//!   offset u64 and size u32 of the image member's data in its shard, label u32, source u32 and
//!   flags u32 (bit 0: PNG, else JPEG) — 24 bytes, about 31 MB for ImageNet's 1.28M samples;
//! - `index.json` (small): format, class names (index = label), `samples.bin`'s record count, size
//!   and sha256, and per shard its file name, size, sha256, `first` (global index of its first
//!   sample) and `count`. [`ShardIndex::load`] reads both files and checks them against each other.
//!
//! Samples are packed in a seeded random order by default (what WebDataset users do, so that a run
//! of consecutive samples mixes classes); the permutation depends only on the seed and the source
//! listing. Samples are read (and IDX images PNG-encoded) on a pool of threads while one writer
//! appends them to the tar in order through a bounded reorder window: the output is byte-identical
//! whatever the number of threads, and memory stays bounded.
//!
//! Packing never leaves a directory that looks complete and is not: a shard is written as
//! `<name>.partial`, synced, then renamed; `samples.bin` and then `index.json` are written
//! atomically, `index.json` last: it marks the directory as packed. An interrupted pack is
//! restarted cleanly: leftovers (`index.json` first, then partial and temporary files, shards and
//! `samples.bin`) are removed before packing.
//!
//! [`verify`] checks `samples.bin` and every shard against their checksums, that each image member
//! carries its sample's key, and decodes every image, naming bad samples by key; [`read_all`]
//! reads a directory back from the tar members alone.
//!
//! A dataset with splits is packed as `OUT/train` and `OUT/val`, each a packed directory with the
//! same class list; `val` is packed first, so `train/index.json` marks the pair as complete
//! ([`packed_splits`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::folder::FolderDataset;
use super::idx::{IdxDataset, Split};
use super::{DataError, Dataset};
use crate::progress::Progress;

pub const INDEX_FILE: &str = "index.json";
pub const SAMPLES_FILE: &str = "samples.bin";
/// The `format` of the indexes this version writes and reads.
pub const FORMAT: &str = "thaw-shards/2 (webdataset tar + samples.bin)";
const FORMAT_PREFIX: &str = "thaw-shards/2 ";
const MAGIC: &[u8; 8] = b"THAWSMPL";
const SAMPLES_VERSION: u32 = 1;
const HEADER_BYTES: usize = 24;
const RECORD_BYTES: usize = 24;
const FLAG_PNG: u32 = 1;
/// The stream of [`super::permutation`] that pack-time shuffling uses.
const SHUFFLE_STREAM: u64 = 0x7061_636b; // "pack"

/// One sample of a packed directory: where its image member's data lies in its shard, its label,
/// its index in the source listing, and whether it is a PNG (else a JPEG).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleRecord {
    pub offset: u64,
    pub size: u32,
    pub label: u32,
    pub source: u32,
    pub png: bool,
}

impl SampleRecord {
    /// The sample's key: the name of its tar members without the extension.
    pub fn key(&self) -> String {
        format!("{:05}_{:09}", self.label, self.source)
    }

    /// `jpg` or `png`.
    pub fn ext(&self) -> &'static str {
        if self.png {
            "png"
        } else {
            "jpg"
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.label.to_le_bytes());
        out.extend_from_slice(&self.source.to_le_bytes());
        out.extend_from_slice(&(if self.png { FLAG_PNG } else { 0 }).to_le_bytes());
    }

    fn decode(b: &[u8]) -> SampleRecord {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        SampleRecord {
            offset: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            size: u32_at(8),
            label: u32_at(12),
            source: u32_at(16),
            png: u32_at(20) & FLAG_PNG != 0,
        }
    }
}

/// One shard as `index.json` lists it: its samples are the global indices `first..first + count`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub first: u64,
    pub count: u64,
}

/// `samples.bin` as `index.json` describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplesFile {
    pub file: String,
    pub count: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// What `index.json` holds.
#[derive(Serialize, Deserialize)]
struct IndexJson {
    format: String,
    classes: Vec<String>,
    samples: SamplesFile,
    shards: Vec<ShardInfo>,
}

/// A packed directory's index: `index.json` plus the per-sample records of `samples.bin`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardIndex {
    pub format: String,
    pub classes: Vec<String>,
    pub shards: Vec<ShardInfo>,
    samples_file: SamplesFile,
    records: Vec<SampleRecord>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Invalid { path: path.to_path_buf(), reason: reason.into() }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

impl ShardIndex {
    /// Reads `dir/index.json` and `dir/samples.bin` and checks them against each other: shards
    /// contiguous, as many records as the shards count, labels among the classes, every image
    /// inside its shard. (The checksums are `verify`'s.)
    pub fn load(dir: &Path) -> Result<ShardIndex, DataError> {
        let path = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            invalid(&path, format!("not a packed directory (no readable {INDEX_FILE}: {e}); run `thaw data pack`"))
        })?;
        let (json, total) = parse_index(&path, &text)?;
        let samples_path = dir.join(&json.samples.file);
        let records = {
            let mut f = File::open(&samples_path).map_err(io(&samples_path))?;
            let len = f.metadata().map_err(io(&samples_path))?.len();
            read_samples(&samples_path, &mut f, len, total)?
        };
        Self::check(json, records, &samples_path)
    }

    /// [`ShardIndex::load`] of a directory whose `index.json` and `samples.bin` (whatever name
    /// the index gives it) hold these bytes; `dir` names them in errors.
    pub fn from_bytes(dir: &Path, index_json: &[u8], samples_bin: &[u8]) -> Result<ShardIndex, DataError> {
        let path = dir.join(INDEX_FILE);
        let text = std::str::from_utf8(index_json).map_err(|e| invalid(&path, format!("bad index: {e}")))?;
        let (json, total) = parse_index(&path, text)?;
        let samples_path = dir.join(&json.samples.file);
        let records = read_samples(&samples_path, &mut &samples_bin[..], samples_bin.len() as u64, total)?;
        Self::check(json, records, &samples_path)
    }

    fn check(json: IndexJson, records: Vec<SampleRecord>, samples_path: &Path) -> Result<ShardIndex, DataError> {
        // Every record inside its shard, every label a class.
        for s in &json.shards {
            for (k, r) in records[s.first as usize..(s.first + s.count) as usize].iter().enumerate() {
                let end = r.offset.checked_add(r.size as u64);
                if r.offset < 512 || end.is_none_or(|e| e > s.bytes) || r.label as usize >= json.classes.len() {
                    return Err(invalid(
                        samples_path,
                        format!(
                            "record {} ({r:?}) lies outside shard {} ({} bytes) or has no class ({} classes); \
                             re-run `thaw data pack`",
                            s.first as usize + k,
                            s.file,
                            s.bytes,
                            json.classes.len()
                        ),
                    ));
                }
            }
        }
        Ok(ShardIndex {
            format: json.format,
            classes: json.classes,
            shards: json.shards,
            samples_file: json.samples,
            records,
        })
    }

    pub fn num_samples(&self) -> usize {
        self.records.len()
    }

    /// Sample `i` in global order (shards in order, samples in file order). Panics past the end.
    pub fn record(&self, i: usize) -> SampleRecord {
        self.records[i]
    }

    /// All records in global order.
    pub fn records(&self) -> &[SampleRecord] {
        &self.records
    }

    /// The shard that holds sample `i` (an index into `shards`). Panics past the end.
    pub fn shard_of(&self, i: usize) -> usize {
        assert!(i < self.records.len(), "sample {i} of {}", self.records.len());
        self.shards.partition_point(|s| s.first <= i as u64) - 1
    }

    /// Sample `i`'s key (see [`SampleRecord::key`]).
    pub fn key(&self, i: usize) -> String {
        self.records[i].key()
    }

    /// Sample `i`'s extension, `jpg` or `png`.
    pub fn ext(&self, i: usize) -> &'static str {
        self.records[i].ext()
    }

    /// `samples.bin` as `index.json` describes it.
    pub fn samples_file(&self) -> &SamplesFile {
        &self.samples_file
    }

    /// About how many bytes the loaded index holds on the heap (and inline).
    pub fn memory_bytes(&self) -> usize {
        let strings = |v: &[String]| v.iter().map(|s| s.capacity() + std::mem::size_of::<String>()).sum::<usize>();
        std::mem::size_of::<Self>()
            + self.format.capacity()
            + strings(&self.classes)
            + self
                .shards
                .iter()
                .map(|s| std::mem::size_of::<ShardInfo>() + s.file.capacity() + s.sha256.capacity())
                .sum::<usize>()
            + self.samples_file.file.capacity()
            + self.samples_file.sha256.capacity()
            + self.records.capacity() * std::mem::size_of::<SampleRecord>()
    }
}

/// Parses `index.json` (at `path`) and checks its shards against each other: contiguous, and as
/// many samples in all as `samples.bin` is said to hold. Returns the index and that total.
fn parse_index(path: &Path, text: &str) -> Result<(IndexJson, u64), DataError> {
    #[derive(Deserialize)]
    struct Format {
        format: String,
    }
    let format: Format = serde_json::from_str(text).map_err(|e| invalid(path, format!("bad index: {e}")))?;
    if !format.format.starts_with(FORMAT_PREFIX) {
        return Err(invalid(
            path,
            format!(
                "index format `{}` is not the one this thaw reads (`{FORMAT}`); re-run `thaw data pack`",
                format.format
            ),
        ));
    }
    let json: IndexJson = serde_json::from_str(text).map_err(|e| invalid(path, format!("bad index: {e}")))?;
    // The files an index names are read from its directory: plain names only, never a path out of it.
    for file in json.shards.iter().map(|s| &s.file).chain([&json.samples.file]) {
        let mut parts = Path::new(file).components();
        if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) {
            return Err(invalid(path, format!("file name {file:?} is not a plain name inside the directory")));
        }
    }
    let mut total = 0u64;
    for s in &json.shards {
        if s.first != total {
            return Err(invalid(
                path,
                format!("shard {} starts at sample {}, expected {total}: damaged index", s.file, s.first),
            ));
        }
        total = total
            .checked_add(s.count)
            .ok_or_else(|| invalid(path, format!("shard {} holds {} samples: the total overflows", s.file, s.count)))?;
    }
    if json.samples.count != total {
        return Err(invalid(
            path,
            format!("lists {} samples in {} but its shards hold {total}", json.samples.count, json.samples.file),
        ));
    }
    Ok((json, total))
}

/// Reads `samples.bin` (`len` bytes from `f`; `path` names it in errors), which must hold `expect` records.
fn read_samples(path: &Path, f: &mut impl Read, len: u64, expect: u64) -> Result<Vec<SampleRecord>, DataError> {
    let damaged =
        |reason: String| invalid(path, format!("{reason}; the packed directory is damaged: re-run `thaw data pack`"));
    let mut header = [0u8; HEADER_BYTES];
    f.read_exact(&mut header).map_err(|e| damaged(format!("cannot read its header: {e}")))?;
    if &header[..8] != MAGIC {
        return Err(damaged("not a thaw samples file (bad magic)".into()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let record = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
    let count = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if version != SAMPLES_VERSION || record != RECORD_BYTES {
        return Err(damaged(format!(
            "version {version} with {record}-byte records; this thaw reads version {SAMPLES_VERSION}"
        )));
    }
    if count != expect {
        return Err(damaged(format!(
            "holds {count} sample records but the shards in {INDEX_FILE} hold {expect} samples"
        )));
    }
    let want = count.checked_mul(RECORD_BYTES as u64).and_then(|b| b.checked_add(HEADER_BYTES as u64));
    if want != Some(len) {
        return Err(damaged(format!(
            "{len} bytes, but {count} records need {}",
            want.map_or("more than 2^64".into(), |w| w.to_string())
        )));
    }
    let mut records = Vec::with_capacity(count as usize);
    let mut buf = vec![0u8; RECORD_BYTES * 65536];
    let mut left = count as usize;
    while left > 0 {
        let k = left.min(65536);
        let chunk = &mut buf[..k * RECORD_BYTES];
        f.read_exact(chunk).map_err(io(path))?;
        records.extend(chunk.chunks_exact(RECORD_BYTES).map(SampleRecord::decode));
        left -= k;
    }
    Ok(records)
}

/// Writes `samples.bin` atomically; returns what `index.json` says of it.
fn write_samples(dir: &Path, records: &[SampleRecord]) -> Result<SamplesFile, DataError> {
    let path = dir.join(SAMPLES_FILE);
    let mut summary = None;
    crate::tensor_io::write_atomic(&path, |f| {
        let mut w = HashingWriter { inner: BufWriter::new(f), hasher: Sha256::new(), bytes: 0 };
        let mut buf = Vec::with_capacity(HEADER_BYTES.max(RECORD_BYTES));
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&SAMPLES_VERSION.to_le_bytes());
        buf.extend_from_slice(&(RECORD_BYTES as u32).to_le_bytes());
        buf.extend_from_slice(&(records.len() as u64).to_le_bytes());
        w.write_all(&buf)?;
        for r in records {
            buf.clear();
            r.encode(&mut buf);
            w.write_all(&buf)?;
        }
        w.flush()?;
        summary = Some((w.bytes, w.hasher.finalize()));
        Ok(())
    })
    .map_err(|e| invalid(&path, e.to_string()))?;
    let (bytes, sha256) = summary.expect("written");
    Ok(SamplesFile { file: SAMPLES_FILE.into(), count: records.len() as u64, bytes, sha256: format!("{sha256:x}") })
}

/// Writes `samples.bin`, then `index.json` (atomically, last: the directory is now packed).
fn write_index(
    dir: &Path,
    classes: &[String],
    shards: &[ShardInfo],
    records: &[SampleRecord],
) -> Result<(), DataError> {
    let samples = write_samples(dir, records)?;
    let json = IndexJson { format: FORMAT.into(), classes: classes.to_vec(), samples, shards: shards.to_vec() };
    let text = serde_json::to_vec_pretty(&json).map_err(|e| invalid(dir, e.to_string()))?;
    let path = dir.join(INDEX_FILE);
    crate::tensor_io::write_atomic(&path, |f| f.write_all(&text)).map_err(|e| invalid(&path, e.to_string()))
}

/// What packing one directory did.
#[derive(Debug, Serialize)]
pub struct PackReport {
    pub dir: PathBuf,
    pub samples: usize,
    pub shards: usize,
    pub bytes: u64,
    pub classes: usize,
    pub seconds: f64,
}

/// How to pack.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Target shard size in bytes (a shard holds at least one sample).
    pub shard_bytes: u64,
    /// Seed of the pack-time shuffle.
    pub seed: u64,
    /// Pack in a seeded random order (default); `false` keeps the source order.
    pub shuffle: bool,
    /// Reader threads; 0 = the available cores.
    pub threads: usize,
    /// Pack only this split, into `out` itself; `None` packs every split the source has.
    pub split: Option<Split>,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions { shard_bytes: 256 << 20, seed: 0, shuffle: true, threads: 0, split: None }
    }
}

/// Removes what an interrupted pack may have left in `out`: `index.json` first (so the directory
/// stops looking packed), then `samples.bin`, shards, partial and temporary files.
fn clean(out: &Path) -> Result<(), DataError> {
    let index = out.join(INDEX_FILE);
    if index.exists() {
        std::fs::remove_file(&index).map_err(io(&index))?;
    }
    for e in std::fs::read_dir(out).map_err(io(out))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let temp = (name.starts_with(&format!(".{INDEX_FILE}.")) || name.starts_with(&format!(".{SAMPLES_FILE}.")))
            && name.ends_with(".tmp");
        if name.ends_with(".partial")
            || (name.starts_with("shard-") && name.ends_with(".tar"))
            || name == SAMPLES_FILE
            || temp
        {
            std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
        }
    }
    Ok(())
}

/// A writer that hashes and counts what goes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A shard being written: the tar builder over a `.partial` file, hashed as it is written.
struct OpenShard {
    path: PathBuf,
    partial: PathBuf,
    tar: tar::Builder<BufWriter<HashingWriter<File>>>,
    first: u64,
    count: u64,
    written: u64,
}

/// The bytes a tar member of `size` bytes takes: its header and its data padded to 512.
fn member_bytes(size: u64) -> u64 {
    512 + size.div_ceil(512) * 512
}

impl OpenShard {
    fn create(out: &Path, n: usize, first: u64) -> Result<OpenShard, DataError> {
        let path = out.join(format!("shard-{n:06}.tar"));
        let partial = out.join(format!("shard-{n:06}.tar.partial"));
        let file = File::create(&partial).map_err(io(&partial))?;
        let writer = BufWriter::with_capacity(1 << 20, HashingWriter { inner: file, hasher: Sha256::new(), bytes: 0 });
        Ok(OpenShard { path, partial, tar: tar::Builder::new(writer), first, count: 0, written: 0 })
    }

    /// Appends a member; returns the offset of its data.
    fn append(&mut self, name: &str, data: &[u8]) -> Result<u64, DataError> {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        let offset = self.written + 512;
        self.tar.append_data(&mut header, name, data).map_err(io(&self.partial))?;
        self.written += member_bytes(data.len() as u64);
        Ok(offset)
    }

    /// Finishes the tar, syncs it and renames it into place.
    fn finish(self) -> Result<ShardInfo, DataError> {
        let writer = self.tar.into_inner().map_err(io(&self.partial))?;
        let hashed =
            writer.into_inner().map_err(|e| DataError::Io { path: self.partial.clone(), source: e.into_error() })?;
        // The tar ends with two zero blocks; anything else means the offsets are wrong.
        if hashed.bytes != self.written + 1024 {
            return Err(invalid(
                &self.partial,
                format!("wrote {} bytes where the tar layout says {}", hashed.bytes, self.written + 1024),
            ));
        }
        hashed.inner.sync_all().map_err(io(&self.partial))?;
        drop(hashed.inner);
        std::fs::rename(&self.partial, &self.path).map_err(io(&self.path))?;
        let file = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(ShardInfo {
            file,
            bytes: hashed.bytes,
            sha256: format!("{:x}", hashed.hasher.finalize()),
            first: self.first,
            count: self.count,
        })
    }
}

/// Why `path` is not the file the index describes (`bytes` long, with this sha256), if it is not.
fn mismatch(path: &Path, bytes: u64, sha256: &str) -> Result<Option<String>, DataError> {
    let (b, sha) = hash_file(path)?;
    Ok((b != bytes || sha != sha256)
        .then(|| format!("checksum mismatch: {b} bytes, sha256 {sha}; the index says {bytes} bytes, {sha256}")))
}

fn hash_file(path: &Path) -> Result<(u64, String), DataError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        total += k as u64;
    }
    Ok((total, format!("{:x}", h.finalize())))
}

/// Whether `dir` holds IDX files (MNIST-style).
pub fn is_idx(dir: &Path) -> bool {
    ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"]
        .iter()
        .any(|f| dir.join(f).is_file())
}

fn has_idx_split(dir: &Path, prefix: &str) -> bool {
    [format!("{prefix}-images-idx3-ubyte"), format!("{prefix}-images-idx3-ubyte.gz")]
        .iter()
        .any(|f| dir.join(f).is_file())
}

/// One listing to pack: a dataset, its labels in the class list being packed, and that list.
struct Source<'a> {
    ds: &'a dyn Dataset,
    /// IDX images are PNG-encoded; folder files are packed as they are.
    idx: bool,
    /// The dataset's label -> the packed label (a val tree mapped onto train's classes).
    relabel: Option<Vec<u32>>,
    classes: Vec<String>,
}

impl Source<'_> {
    fn label(&self, i: usize) -> u32 {
        let l = self.ds.label(i) as usize;
        match &self.relabel {
            Some(map) => map[l],
            None => l as u32,
        }
    }

    /// A sample's bytes as packed, and whether they are a PNG: a folder's files as they are, IDX
    /// images encoded as PNG (lossless).
    fn bytes(&self, i: usize) -> Result<(Vec<u8>, bool), DataError> {
        if self.idx {
            let img = self.ds.load(i).map_err(|e| invalid(Path::new(&e.key), e.reason))?;
            let mut buf = std::io::Cursor::new(Vec::new());
            img.write_to(&mut buf, image::ImageFormat::Png)
                .map_err(|e| invalid(Path::new(&self.ds.key(i)), e.to_string()))?;
            return Ok((buf.into_inner(), true));
        }
        let path = PathBuf::from(self.ds.key(i));
        let data = std::fs::read(&path).map_err(io(&path))?;
        let png = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("png"));
        Ok((data, png))
    }
}

/// The `train/` directory of an image-folder tree with splits (`SRC/train/<class>/<image>`), and
/// its `val/` (or `validation/`, `test/`) directory if it has one.
fn split_tree(src: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    let train = src.join("train");
    let has_classes = std::fs::read_dir(&train).ok()?.flatten().any(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    if !has_classes {
        return None;
    }
    let val = ["val", "validation", "test"].iter().map(|d| src.join(d)).find(|d| d.is_dir());
    Some((train, val))
}

/// `val`'s labels mapped onto `train`'s classes (by name).
fn relabel(train: &FolderDataset, val: &FolderDataset, val_dir: &Path) -> Result<Vec<u32>, DataError> {
    val.class_names()
        .iter()
        .map(|name| {
            train.class_names().iter().position(|c| c == name).map(|p| p as u32).ok_or_else(|| {
                invalid(
                    val_dir,
                    format!(
                        "class `{name}` is not a class of {} ({} classes); train and val need the same class folders",
                        train.root().display(),
                        train.class_names().len()
                    ),
                )
            })
        })
        .collect()
}

/// Packs `src` under `out`; returns what each split's packing did, named `train`/`val` (or `""`
/// for a single directory packed into `out` itself).
///
/// - An IDX dataset (MNIST-style files): with `opts.split`, that split into `out`; otherwise the
///   train files into `out/train` and the t10k files (if any) into `out/val`.
/// - A tree with splits (`src/train/<class>/<image>` and `src/val/` or `src/test/`, the ImageNet
///   layout): `train` into `out/train` and val into `out/val` with train's class list (an error
///   names a val class that train lacks); with `opts.split`, that split into `out`.
/// - An image-folder tree `src/<class>/<image>` into `out` (classes and files sorted, labels the
///   folders').
pub fn pack_dataset(src: &Path, out: &Path, opts: &PackOptions) -> Result<Vec<(String, PackReport)>, DataError> {
    if !src.is_dir() {
        return Err(DataError::MissingRoot(src.to_path_buf()));
    }
    if is_idx(src) {
        fn source(ds: &IdxDataset) -> Source<'_> {
            Source { ds, idx: true, relabel: None, classes: ds.class_names().to_vec() }
        }
        if let Some(split) = opts.split {
            let ds = IdxDataset::open(src, split)?;
            return Ok(vec![(String::new(), pack_source(&source(&ds), out, opts, "pack")?)]);
        }
        let train = IdxDataset::open(src, Split::Train)?;
        let val = if has_idx_split(src, "t10k") { Some(IdxDataset::open(src, Split::Test)?) } else { None };
        let (mut train, mut val) = (source(&train), val.as_ref().map(source));
        // IDX classes are the labels `0..=max`: one list for both splits, the longer.
        if let Some(v) = &mut val {
            if v.classes.len() > train.classes.len() {
                train.classes = v.classes.clone();
            } else {
                v.classes = train.classes.clone();
            }
        }
        return pack_pair(out, &train, val.as_ref(), opts);
    }
    if let Some((train_dir, val_dir)) = split_tree(src) {
        let train_ds = FolderDataset::open(&train_dir)?;
        let classes = train_ds.class_names().to_vec();
        let train = Source { ds: &train_ds, idx: false, relabel: None, classes: classes.clone() };
        let val_ds = val_dir.as_deref().map(FolderDataset::open).transpose()?;
        let val = match (&val_ds, &val_dir) {
            (Some(ds), Some(dir)) => {
                Some(Source { ds, idx: false, relabel: Some(relabel(&train_ds, ds, dir)?), classes: classes.clone() })
            }
            _ => None,
        };
        return match opts.split {
            Some(Split::Train) => Ok(vec![(String::new(), pack_source(&train, out, opts, "pack")?)]),
            Some(Split::Test) => {
                let val = val.ok_or_else(|| invalid(src, "no val/, validation/ or test/ directory to pack"))?;
                Ok(vec![(String::new(), pack_source(&val, out, opts, "pack")?)])
            }
            None => pack_pair(out, &train, val.as_ref(), opts),
        };
    }
    if opts.split == Some(Split::Test) {
        return Err(invalid(
            src,
            "an image-folder tree <class>/<image> has no test split (a tree with splits has train/ and val/)",
        ));
    }
    let ds = FolderDataset::open(src)?;
    let classes = ds.class_names().to_vec();
    let source = Source { ds: &ds, idx: false, relabel: None, classes };
    Ok(vec![(String::new(), pack_source(&source, out, opts, "pack")?)])
}

/// Packs `train` into `out/train` and `val` into `out/val`. Val first, so that `train/index.json`,
/// written last, marks the pair as complete.
fn pack_pair(
    out: &Path,
    train: &Source,
    val: Option<&Source>,
    opts: &PackOptions,
) -> Result<Vec<(String, PackReport)>, DataError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    // A single packed directory here would shadow the splits.
    clean(out)?;
    let (train_dir, val_dir) = (out.join("train"), out.join("val"));
    if train_dir.is_dir() {
        clean(&train_dir)?;
    }
    let val_report = match val {
        Some(v) => Some(pack_source(v, &val_dir, opts, "pack val")?),
        None if val_dir.is_dir() => {
            clean(&val_dir)?;
            None
        }
        None => None,
    };
    let mut reports = vec![("train".to_string(), pack_source(train, &train_dir, opts, "pack train")?)];
    if let Some(r) = val_report {
        reports.push(("val".to_string(), r));
    }
    Ok(reports)
}

/// Sets the stop flag and wakes every reader, whichever way the writer leaves.
struct StopOnDrop<'a> {
    stop: &'a AtomicBool,
    written: &'a Mutex<usize>,
    wake: &'a Condvar,
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        // Under the lock, so that no reader checks the flag and then misses the wake-up.
        let guard = self.written.lock().unwrap_or_else(|e| e.into_inner());
        self.stop.store(true, Ordering::SeqCst);
        drop(guard);
        self.wake.notify_all();
    }
}

type Item = (usize, Result<(Vec<u8>, bool), DataError>);

/// Packs one listing into `out`: readers claim positions of the (shuffled) order in turn, at most
/// `window` ahead of the writer, which appends them to the shards in order.
fn pack_source(src: &Source, out: &Path, opts: &PackOptions, what: &str) -> Result<PackReport, DataError> {
    let start = Instant::now();
    let n = src.ds.len();
    if n > u32::MAX as usize {
        return Err(invalid(out, format!("{n} samples: more than a samples.bin record can index")));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    clean(out)?;
    let order: Vec<usize> =
        if opts.shuffle { super::permutation(n, opts.seed, SHUFFLE_STREAM) } else { (0..n).collect() };
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        t => t,
    }
    .clamp(1, n.max(1));
    let window = (threads * 8).max(16);
    let claimed = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let written = Mutex::new(0usize);
    let wake = Condvar::new();
    let (tx, rx) = mpsc::sync_channel::<Item>(window);
    let (shards, records) = std::thread::scope(|scope| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (claimed, stop, written, wake, order) = (&claimed, &stop, &written, &wake, &order);
            scope.spawn(move || loop {
                let j = claimed.fetch_add(1, Ordering::SeqCst);
                if j >= n || stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
                while j >= *w + window && !stop.load(Ordering::SeqCst) {
                    w = wake.wait(w).unwrap_or_else(|e| e.into_inner());
                }
                drop(w);
                if stop.load(Ordering::SeqCst) || tx.send((j, src.bytes(order[j]))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        // Moved in, so that an early return drops it and unblocks readers waiting to send.
        let rx = rx;
        let _stop = StopOnDrop { stop: &stop, written: &written, wake: &wake };
        let mut progress = Progress::new(what, n as u64, "img");
        let mut pending: BTreeMap<usize, Result<(Vec<u8>, bool), DataError>> = BTreeMap::new();
        let mut shards: Vec<ShardInfo> = Vec::new();
        let mut records: Vec<SampleRecord> = Vec::with_capacity(n);
        let mut open: Option<OpenShard> = None;
        for (pos, &source) in order.iter().enumerate() {
            let item = loop {
                if let Some(item) = pending.remove(&pos) {
                    break item;
                }
                let (j, item) = rx.recv().map_err(|_| invalid(out, "the packing threads stopped early"))?;
                if j == pos {
                    break item;
                }
                pending.insert(j, item);
            };
            let (data, png) = item?;
            let size =
                u32::try_from(data.len()).map_err(|_| invalid(Path::new(&src.ds.key(source)), "larger than 4 GiB"))?;
            if open.as_ref().is_some_and(|s| s.written > 0 && s.written + data.len() as u64 > opts.shard_bytes) {
                if let Some(s) = open.take() {
                    shards.push(s.finish()?);
                }
            }
            let shard = match &mut open {
                Some(s) => s,
                None => open.insert(OpenShard::create(out, shards.len(), records.len() as u64)?),
            };
            let mut record = SampleRecord { offset: 0, size, label: src.label(source), source: source as u32, png };
            let key = record.key();
            record.offset = shard.append(&format!("{key}.{}", record.ext()), &data)?;
            shard.append(&format!("{key}.cls"), record.label.to_string().as_bytes())?;
            shard.count += 1;
            records.push(record);
            *written.lock().unwrap_or_else(|e| e.into_inner()) = pos + 1;
            wake.notify_all();
            progress.update(pos as u64 + 1, || format!("shard {}", shards.len()));
        }
        if let Some(s) = open.take() {
            shards.push(s.finish()?);
        }
        progress.finish();
        Ok::<_, DataError>((shards, records))
    })?;
    write_index(out, &src.classes, &shards, &records)?;
    Ok(PackReport {
        dir: out.to_path_buf(),
        samples: records.len(),
        shards: shards.len(),
        bytes: shards.iter().map(|s| s.bytes).sum(),
        classes: src.classes.len(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The packed directories under `root`: `(root, None)` if `root` is one; `(root/train,
/// root/val)` for a packed dataset with splits (val if it has an index).
pub fn packed_splits(root: &Path) -> Result<(PathBuf, Option<PathBuf>), DataError> {
    if root.join(INDEX_FILE).is_file() {
        return Ok((root.to_path_buf(), None));
    }
    let train = root.join("train");
    if train.join(INDEX_FILE).is_file() {
        let val = root.join("val");
        return Ok((train, val.join(INDEX_FILE).is_file().then_some(val)));
    }
    Err(invalid(
        root,
        format!("not a packed directory (no {INDEX_FILE}, nor train/{INDEX_FILE}); run `thaw data pack`"),
    ))
}

/// Writes a made-up index of `samples` samples over `shards` shards and `classes` classes, with
/// no shard files (placeholder sizes and checksums): for testing the index at scale. `verify`
/// fails on it.
pub fn write_synthetic_index(dir: &Path, samples: usize, shards: usize, classes: usize) -> Result<(), DataError> {
    if shards == 0 || samples < shards || classes == 0 || samples > u32::MAX as usize {
        return Err(invalid(
            dir,
            format!("{samples} samples, {shards} shards, {classes} classes: need 0 < shards <= samples, classes > 0"),
        ));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    clean(dir)?;
    let names: Vec<String> = (0..classes).map(|c| format!("n{c:08}")).collect();
    let mut records = Vec::with_capacity(samples);
    let mut infos = Vec::with_capacity(shards);
    for s in 0..shards {
        let count = samples / shards + usize::from(s < samples % shards);
        let first = records.len() as u64;
        let mut written = 0u64;
        for _ in 0..count {
            let i = records.len() as u64;
            // About ImageNet's sizes (110 KB on average); one in ten a PNG.
            let size = 20_000 + (i.wrapping_mul(7919) % 180_000) as u32;
            let label = (i.wrapping_mul(2_654_435_761) % classes as u64) as u32;
            let source = (samples as u64 - 1 - i) as u32;
            records.push(SampleRecord { offset: written + 512, size, label, source, png: i.is_multiple_of(10) });
            written += member_bytes(size as u64) + member_bytes(label.to_string().len() as u64);
        }
        infos.push(ShardInfo {
            file: format!("shard-{s:06}.tar"),
            bytes: written + 1024,
            sha256: "0".repeat(64),
            first,
            count: count as u64,
        });
    }
    write_index(dir, &names, &infos, &records)
}

/// One problem `verify` found: in which file, which sample (if one), and what.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub shard: String,
    pub key: Option<String>,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub shards: usize,
    pub samples: usize,
    pub decoded: usize,
    pub problems: Vec<Problem>,
}

/// What a verifying thread reports: samples done, or a whole shard's outcome.
enum VerifyMsg {
    Done(u64),
    Shard(usize, usize, Vec<Problem>),
}

/// Checks `samples.bin` and every shard against the index (size, sha256), that each sample's tar
/// member carries its key, and decodes every sample; shards are checked on the available cores.
pub fn verify(dir: &Path) -> Result<VerifyReport, DataError> {
    let index = ShardIndex::load(dir)?;
    let mut problems = Vec::new();
    let sf = index.samples_file();
    match mismatch(&dir.join(&sf.file), sf.bytes, &sf.sha256) {
        Ok(None) => {}
        Ok(Some(reason)) => problems.push(Problem { shard: sf.file.clone(), key: None, reason }),
        Err(e) => problems.push(Problem { shard: sf.file.clone(), key: None, reason: e.to_string() }),
    }
    let threads =
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, index.shards.len().max(1));
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<VerifyMsg>();
    let mut per_shard: Vec<Option<(usize, Vec<Problem>)>> = vec![None; index.shards.len()];
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (tx, next, index) = (tx.clone(), &next, &index);
            scope.spawn(move || loop {
                let s = next.fetch_add(1, Ordering::SeqCst);
                if s >= index.shards.len() {
                    break;
                }
                let (decoded, problems) = verify_shard(dir, index, s, &tx);
                if tx.send(VerifyMsg::Shard(s, decoded, problems)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut progress = Progress::new("verify", index.num_samples() as u64, "img");
        let mut done = 0u64;
        for msg in rx {
            match msg {
                VerifyMsg::Done(k) => {
                    done += k;
                    progress.update(done, String::new);
                }
                VerifyMsg::Shard(s, decoded, problems) => per_shard[s] = Some((decoded, problems)),
            }
        }
        progress.finish();
    });
    let mut decoded = 0;
    for (d, p) in per_shard.into_iter().flatten() {
        decoded += d;
        problems.extend(p);
    }
    Ok(VerifyReport { shards: index.shards.len(), samples: index.num_samples(), decoded, problems })
}

/// Verifies shard `s`: its checksum, then each sample's member name and image.
fn verify_shard(dir: &Path, index: &ShardIndex, s: usize, tx: &mpsc::Sender<VerifyMsg>) -> (usize, Vec<Problem>) {
    let info = &index.shards[s];
    let path = dir.join(&info.file);
    let mut problems = Vec::new();
    let problem = |key: Option<String>, reason: String| Problem { shard: info.file.clone(), key, reason };
    match mismatch(&path, info.bytes, &info.sha256) {
        Ok(None) => {}
        Ok(Some(reason)) => problems.push(problem(None, reason)),
        Err(e) => {
            problems.push(problem(None, e.to_string()));
            let _ = tx.send(VerifyMsg::Done(info.count));
            return (0, problems);
        }
    }
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            problems.push(problem(None, e.to_string()));
            return (0, problems);
        }
    };
    let len = match f.metadata() {
        Ok(m) => m.len(),
        Err(e) => {
            problems.push(problem(None, e.to_string()));
            return (0, problems);
        }
    };
    let mut decoded = 0;
    let mut since = 0u64;
    for i in info.first as usize..(info.first + info.count) as usize {
        since += 1;
        if since == 64 {
            let _ = tx.send(VerifyMsg::Done(since));
            since = 0;
        }
        let (r, key, ext) = (index.record(i), index.key(i), index.ext(i));
        // The index's sizes are claims: nothing is allocated for bytes the file does not hold.
        if r.offset.checked_add(u64::from(r.size)).is_none_or(|end| end > len) {
            problems.push(problem(
                Some(key),
                format!("{} bytes at offset {} lie beyond the shard's {len} bytes", r.size, r.offset),
            ));
            continue;
        }
        // The member's header and data.
        let mut data = vec![0u8; 512 + r.size as usize];
        let read = f.seek(SeekFrom::Start(r.offset - 512)).and_then(|_| f.read_exact(&mut data));
        if let Err(err) = read {
            problems.push(problem(Some(key), format!("cannot read {} bytes at offset {}: {err}", r.size, r.offset)));
            continue;
        }
        let name_field = &data[..100];
        let name = String::from_utf8_lossy(&name_field[..name_field.iter().position(|&b| b == 0).unwrap_or(100)]);
        if name != format!("{key}.{ext}") {
            problems.push(problem(
                Some(key.clone()),
                format!("the tar member at offset {} is `{name}`, the index says `{key}.{ext}`", r.offset - 512),
            ));
            continue;
        }
        match super::decode_image(&data[512..]) {
            Ok(_) => decoded += 1,
            Err(err) => problems.push(problem(Some(key.clone()), format!("cannot decode {key}.{ext}: {err}"))),
        }
    }
    let _ = tx.send(VerifyMsg::Done(since));
    (decoded, problems)
}

/// Every sample of a packed directory read back from the tar members themselves (not the index's
/// offsets): (key, label from the `.cls` member, image bytes), in shard order.
pub fn read_all(dir: &Path) -> Result<Vec<(String, i64, Vec<u8>)>, DataError> {
    let index = ShardIndex::load(dir)?;
    let mut out: Vec<(String, i64, Vec<u8>)> = Vec::new();
    for s in &index.shards {
        let path = dir.join(&s.file);
        let mut archive = tar::Archive::new(File::open(&path).map_err(io(&path))?);
        let mut pending: Option<(String, Vec<u8>)> = None;
        for entry in archive.entries().map_err(io(&path))? {
            let mut entry = entry.map_err(io(&path))?;
            let name = entry.path().map_err(io(&path))?.to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).map_err(io(&path))?;
            let (key, ext) =
                name.rsplit_once('.').ok_or_else(|| invalid(&path, format!("member `{name}` has no extension")))?;
            if ext == "cls" {
                let label: i64 = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .ok_or_else(|| invalid(&path, format!("{name}: not a class index")))?;
                match pending.take() {
                    Some((k, bytes)) if k == key => out.push((k, label, bytes)),
                    _ => return Err(invalid(&path, format!("{name} without its image"))),
                }
            } else {
                pending = Some((key.to_string(), data));
            }
        }
    }
    Ok(out)
}

/// Writes an ImageNet-shaped tree of real JPEG files: `classes` class directories with `images`
/// images in all, of typical ImageNet sizes (around 500x375, varied), each a different mix of
/// gradients, shapes and noise, deterministic in `seed`.
pub fn synth(out: &Path, classes: usize, images: usize, seed: u64) -> Result<usize, DataError> {
    use rand::{Rng, SeedableRng};
    if classes == 0 || images < classes {
        return Err(invalid(out, format!("need at least one image per class ({images} images, {classes} classes)")));
    }
    let mut progress = Progress::new("synth", images as u64, "img");
    for i in 0..images {
        let class = i % classes;
        let dir = out.join(format!("n{class:08}"));
        if i < classes {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (w, h) = if rng.random_bool(0.7) {
            (rng.random_range(400..=520), rng.random_range(300..=400))
        } else {
            (rng.random_range(300..=400), rng.random_range(400..=520))
        };
        // A class colour, per-image gradient and circles, and noise.
        let base = [(class * 73 % 256) as f32, (class * 151 % 256) as f32, (class * 29 % 256) as f32];
        let (cx, cy, r) =
            (rng.random_range(0..w) as f32, rng.random_range(0..h) as f32, rng.random_range(20..150) as f32);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let inside = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)) < r * r;
            let noise: f32 = rng.random_range(-12.0..12.0);
            let px = |c: usize| {
                let v = base[c] * (0.5 + 0.5 * fx) + 80.0 * fy + if inside { 90.0 } else { 0.0 } + noise;
                v.clamp(0.0, 255.0) as u8
            };
            image::Rgb([px(0), px(1), px(2)])
        });
        let path = dir.join(format!("img_{i:08}.JPEG"));
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 85)
            .encode_image(&img)
            .map_err(|e| invalid(&path, e.to_string()))?;
        std::fs::write(&path, &buf).map_err(io(&path))?;
        progress.update(i as u64 + 1, String::new);
    }
    progress.finish();
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_24_bytes() {
        let r = SampleRecord { offset: (1 << 40) + 3, size: 123_456, label: 999, source: 1_281_166, png: true };
        let mut buf = Vec::new();
        r.encode(&mut buf);
        assert_eq!(buf.len(), RECORD_BYTES);
        assert_eq!(SampleRecord::decode(&buf), r);
        let j = SampleRecord { png: false, ..r };
        buf.clear();
        j.encode(&mut buf);
        assert_eq!(SampleRecord::decode(&buf), j);
    }

    #[test]
    fn shard_of_key_and_ext_follow_the_global_order() {
        let dir = tempfile::tempdir().unwrap();
        // 10 samples over 3 shards: 4, 3, 3.
        write_synthetic_index(dir.path(), 10, 3, 4).unwrap();
        let index = ShardIndex::load(dir.path()).unwrap();
        assert_eq!(index.num_samples(), 10);
        assert_eq!(index.shards.iter().map(|s| (s.first, s.count)).collect::<Vec<_>>(), [(0, 4), (4, 3), (7, 3)]);
        let shards: Vec<usize> = (0..10).map(|i| index.shard_of(i)).collect();
        assert_eq!(shards, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]);
        // Offsets restart in each shard and grow within one.
        assert_eq!(index.record(0).offset, 512);
        assert_eq!(index.record(4).offset, 512);
        assert!(index.record(5).offset > index.record(4).offset + index.record(4).size as u64);
        let r = index.record(3);
        assert_eq!(index.key(3), format!("{:05}_{:09}", r.label, r.source));
        assert_eq!(r.source, 6);
        assert_eq!((index.ext(0), index.ext(1)), ("png", "jpg"));
        assert!(index.memory_bytes() >= 10 * std::mem::size_of::<SampleRecord>());
    }

    #[test]
    fn load_names_samples_bin_when_its_count_disagrees_with_the_shards() {
        let dir = tempfile::tempdir().unwrap();
        write_synthetic_index(dir.path(), 10, 2, 3).unwrap();
        let other = tempfile::tempdir().unwrap();
        write_synthetic_index(other.path(), 11, 2, 3).unwrap();
        std::fs::copy(other.path().join(SAMPLES_FILE), dir.path().join(SAMPLES_FILE)).unwrap();
        let err = ShardIndex::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(SAMPLES_FILE) && err.contains("11 sample records") && err.contains("hold 10"), "{err}");
        // Cut short.
        let bytes = std::fs::read(other.path().join(SAMPLES_FILE)).unwrap();
        std::fs::write(other.path().join(SAMPLES_FILE), &bytes[..bytes.len() - 5]).unwrap();
        let err = ShardIndex::load(other.path()).unwrap_err().to_string();
        assert!(err.contains(SAMPLES_FILE) && err.contains("bytes"), "{err}");
        // Missing.
        std::fs::remove_file(other.path().join(SAMPLES_FILE)).unwrap();
        let err = ShardIndex::load(other.path()).unwrap_err().to_string();
        assert!(err.contains(SAMPLES_FILE), "{err}");
    }

    #[test]
    fn an_old_per_sample_json_index_asks_for_a_repack() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"format": "thaw-shards/1 (webdataset tar)", "classes": ["a"], "shards": []}"#,
        )
        .unwrap();
        let err = ShardIndex::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("thaw-shards/1") && err.contains("thaw data pack"), "{err}");
    }

    #[test]
    fn clean_removes_the_index_first_and_every_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [INDEX_FILE, SAMPLES_FILE, "shard-000000.tar", "shard-000001.tar.partial", ".samples.bin.12-0.tmp"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::fs::write(d.join("notes.txt"), b"kept").unwrap();
        clean(d).unwrap();
        let left: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["notes.txt"]);
    }

    #[test]
    fn packed_splits_finds_a_single_dir_or_train_and_val() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let err = packed_splits(root).unwrap_err().to_string();
        assert!(err.contains("not a packed directory") && err.contains("thaw data pack"), "{err}");
        write_synthetic_index(&root.join("train"), 4, 1, 2).unwrap();
        assert_eq!(packed_splits(root).unwrap(), (root.join("train"), None));
        write_synthetic_index(&root.join("val"), 2, 1, 2).unwrap();
        assert_eq!(packed_splits(root).unwrap(), (root.join("train"), Some(root.join("val"))));
        write_synthetic_index(root, 2, 1, 2).unwrap();
        assert_eq!(packed_splits(root).unwrap(), (root.to_path_buf(), None));
    }
}
