//! Packed shards: an image-folder tree (or one split of an IDX dataset) packed into
//! WebDataset-compatible tar files, so that workers read a few large files sequentially instead of
//! millions of small ones.
//!
//! Layout of a packed directory:
//! - `shard-000000.tar`, `shard-000001.tar`, ...: each sample is two tar members with the same key,
//!   `<key>.<ext>` (the original image bytes, `jpg` or `png`) and `<key>.cls` (the class index in
//!   decimal), which is what the Python `webdataset` library reads;
//! - `index.json` ([`ShardIndex`]): the class names (index = label), and per shard its file name,
//!   size, sha256 and its samples (key, label, byte offset and size of the image member's data).
//!
//! Packing never leaves a shard that looks complete and is not: a shard is written as
//! `<name>.partial`, synced, then renamed; `index.json` is written last, atomically, and is what
//! marks the directory as packed. An interrupted pack is restarted cleanly: leftovers (partial
//! files, shards without an index) are removed first.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::folder::FolderDataset;
use super::idx::{IdxDataset, Split};
use super::{DataError, Dataset};
use crate::progress::Progress;

pub const INDEX_FILE: &str = "index.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleEntry {
    pub key: String,
    pub label: i64,
    /// Byte offset of the image member's data in the shard, and its size.
    pub offset: u64,
    pub size: u64,
    /// `jpg` or `png`.
    pub ext: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub samples: Vec<SampleEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    pub classes: Vec<String>,
    pub shards: Vec<ShardInfo>,
}

impl ShardIndex {
    pub fn load(dir: &Path) -> Result<ShardIndex, DataError> {
        let path = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::Invalid {
            path: path.clone(),
            reason: format!("not a packed directory (no readable {INDEX_FILE}: {e}); run `thaw data pack`"),
        })?;
        serde_json::from_str(&text).map_err(|e| DataError::Invalid { path, reason: format!("bad index: {e}") })
    }

    pub fn num_samples(&self) -> usize {
        self.shards.iter().map(|s| s.samples.len()).sum()
    }
}

/// What `pack` did.
#[derive(Debug, Serialize)]
pub struct PackReport {
    pub samples: usize,
    pub shards: usize,
    pub bytes: u64,
    pub classes: usize,
}

fn invalid(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Invalid { path: path.to_path_buf(), reason: reason.into() }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// Removes what an interrupted pack may have left in `out`: partial files and shards.
fn clean(out: &Path) -> Result<(), DataError> {
    for e in std::fs::read_dir(out).map_err(io(out))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".partial") || (name.starts_with("shard-") && name.ends_with(".tar")) || name == INDEX_FILE {
            std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
        }
    }
    Ok(())
}

/// A shard being written: the tar builder over a `.partial` file, and what it holds.
struct OpenShard {
    path: PathBuf,
    partial: PathBuf,
    tar: tar::Builder<BufWriter<File>>,
    samples: Vec<SampleEntry>,
    written: u64,
}

impl OpenShard {
    fn create(out: &Path, n: usize) -> Result<OpenShard, DataError> {
        let path = out.join(format!("shard-{n:06}.tar"));
        let partial = out.join(format!("shard-{n:06}.tar.partial"));
        let file = File::create(&partial).map_err(io(&partial))?;
        Ok(OpenShard { path, partial, tar: tar::Builder::new(BufWriter::new(file)), samples: Vec::new(), written: 0 })
    }

    fn append(&mut self, name: &str, data: &[u8]) -> Result<u64, DataError> {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        let offset = self.written + 512;
        self.tar.append_data(&mut header, name, data).map_err(io(&self.partial))?;
        self.written += 512 + (data.len() as u64).div_ceil(512) * 512;
        Ok(offset)
    }

    /// Finishes the tar, syncs it, renames it into place and hashes it.
    fn finish(self) -> Result<ShardInfo, DataError> {
        let writer = self.tar.into_inner().map_err(io(&self.partial))?;
        let file =
            writer.into_inner().map_err(|e| DataError::Io { path: self.partial.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io(&self.partial))?;
        drop(file);
        std::fs::rename(&self.partial, &self.path).map_err(io(&self.path))?;
        let (bytes, sha256) = hash_file(&self.path)?;
        let file = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(ShardInfo { file, bytes, sha256, samples: self.samples })
    }
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

/// A sample's bytes as packed, and their extension: a folder's files as they are, IDX images
/// encoded as PNG (lossless).
fn sample_bytes(ds: &dyn Dataset, idx: bool, i: usize) -> Result<(Vec<u8>, &'static str), DataError> {
    if idx {
        let img = ds.load(i).map_err(|e| invalid(Path::new(&e.key), e.reason))?;
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).map_err(|e| invalid(Path::new(&ds.key(i)), e.to_string()))?;
        return Ok((buf.into_inner(), "png"));
    }
    let path = PathBuf::from(ds.key(i));
    let data = std::fs::read(&path).map_err(io(&path))?;
    let ext = match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "png",
        _ => "jpg",
    };
    Ok((data, ext))
}

/// Packs `src` into shards of about `shard_bytes` in `out`: an image-folder tree
/// (`<class>/<image>`; samples in the folder's order, classes and files sorted, labels the
/// folder's), or the `split` of an IDX dataset.
pub fn pack(src: &Path, out: &Path, shard_bytes: u64, split: Split) -> Result<PackReport, DataError> {
    let idx = is_idx(src);
    let ds: Box<dyn Dataset> =
        if idx { Box::new(IdxDataset::open(src, split)?) } else { Box::new(FolderDataset::open(src)?) };
    std::fs::create_dir_all(out).map_err(io(out))?;
    clean(out)?;
    let mut progress = Progress::new("pack", ds.len() as u64, "img");
    let mut shards = Vec::new();
    let mut open: Option<OpenShard> = None;
    for i in 0..ds.len() {
        let (data, ext) = sample_bytes(ds.as_ref(), idx, i)?;
        if open.as_ref().is_some_and(|s| s.written > 0 && s.written + data.len() as u64 > shard_bytes) {
            if let Some(s) = open.take() {
                shards.push(s.finish()?);
            }
        }
        let shard = match &mut open {
            Some(s) => s,
            None => open.insert(OpenShard::create(out, shards.len())?),
        };
        let label = ds.label(i);
        let key = format!("{label:05}_{i:09}");
        let offset = shard.append(&format!("{key}.{ext}"), &data)?;
        shard.append(&format!("{key}.cls"), label.to_string().as_bytes())?;
        shard.samples.push(SampleEntry { key, label, offset, size: data.len() as u64, ext: ext.to_string() });
        progress.update(i as u64 + 1, String::new);
    }
    if let Some(s) = open.take() {
        shards.push(s.finish()?);
    }
    progress.finish();
    let index =
        ShardIndex { format: "thaw-shards/1 (webdataset tar)".into(), classes: ds.class_names().to_vec(), shards };
    let json = serde_json::to_vec_pretty(&index).map_err(|e| invalid(out, e.to_string()))?;
    crate::tensor_io::write_atomic(&out.join(INDEX_FILE), |f| f.write_all(&json))
        .map_err(|e| invalid(&out.join(INDEX_FILE), e.to_string()))?;
    let bytes = index.shards.iter().map(|s| s.bytes).sum();
    Ok(PackReport { samples: index.num_samples(), shards: index.shards.len(), bytes, classes: index.classes.len() })
}

/// One problem `verify` found: in which shard, which sample (if one), and what.
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

/// Checks every shard against the index (size, sha256) and decodes every sample.
pub fn verify(dir: &Path) -> Result<VerifyReport, DataError> {
    let index = ShardIndex::load(dir)?;
    let mut progress = Progress::new("verify", index.num_samples() as u64, "img");
    let (mut decoded, mut done) = (0, 0u64);
    let mut problems = Vec::new();
    for s in &index.shards {
        let path = dir.join(&s.file);
        let problem =
            |key: Option<&str>, reason: String| Problem { shard: s.file.clone(), key: key.map(str::to_string), reason };
        match hash_file(&path) {
            Err(e) => {
                problems.push(problem(None, e.to_string()));
                continue;
            }
            Ok((bytes, sha)) if bytes != s.bytes || sha != s.sha256 => problems.push(problem(
                None,
                format!(
                    "checksum mismatch: {bytes} bytes, sha256 {sha}; the index says {} bytes, {}",
                    s.bytes, s.sha256
                ),
            )),
            Ok(_) => {}
        }
        let mut f = File::open(&path).map_err(io(&path))?;
        for e in &s.samples {
            done += 1;
            let mut data = vec![0u8; e.size as usize];
            let read = f.seek(SeekFrom::Start(e.offset)).and_then(|_| f.read_exact(&mut data));
            if let Err(err) = read {
                problems
                    .push(problem(Some(&e.key), format!("cannot read {} bytes at offset {}: {err}", e.size, e.offset)));
                continue;
            }
            // Decoders fill a JPEG that was cut short with grey rather than fail: look for its
            // end-of-image marker too.
            let tail = &data[data.len().saturating_sub(32)..];
            let truncated = e.ext == "jpg" && !tail.windows(2).any(|w| w == [0xFF, 0xD9]);
            match image::load_from_memory(&data) {
                Ok(_) if truncated => problems.push(problem(
                    Some(&e.key),
                    format!("cannot decode {}.{}: truncated JPEG (no end-of-image marker)", e.key, e.ext),
                )),
                Ok(_) => decoded += 1,
                Err(err) => problems.push(problem(Some(&e.key), format!("cannot decode {}.{}: {err}", e.key, e.ext))),
            }
            progress.update(done, String::new);
        }
    }
    progress.finish();
    Ok(VerifyReport { shards: index.shards.len(), samples: index.num_samples(), decoded, problems })
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
