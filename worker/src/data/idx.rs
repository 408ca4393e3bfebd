//! The IDX format of MNIST and Fashion-MNIST (LeCun et al.): big-endian headers, then raw bytes.
//! Files may be gzip-compressed (`.gz`), as distributed. The whole split is held in memory
//! (47 MB for the 60k Fashion-MNIST training images).

use std::io::Read;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage};

use super::{io_err, DataError, Dataset, SampleError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

pub struct IdxDataset {
    split: Split,
    rows: usize,
    cols: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    class_names: Vec<String>,
}

/// Finds `name` or `name.gz` under `root`.
fn find(root: &Path, name: &str) -> Result<PathBuf, DataError> {
    for candidate in [root.join(name), root.join(format!("{name}.gz"))] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(DataError::Invalid { path: root.to_path_buf(), reason: format!("no {name} or {name}.gz (IDX dataset files)") })
}

/// The most an IDX file may inflate to (Fashion-MNIST's largest is 47 MB).
const MAX_INFLATED: u64 = 4 << 30;

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(io_err(path))?;
    maybe_gunzip(path, raw)
}

/// `raw` inflated if it is gzip data, else as it is; `path` names it in errors.
fn maybe_gunzip(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, DataError> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).take(MAX_INFLATED + 1).read_to_end(&mut out).map_err(io_err(path))?;
        if out.len() as u64 > MAX_INFLATED {
            return Err(DataError::Invalid {
                path: path.to_path_buf(),
                reason: format!("inflates to more than {MAX_INFLATED} bytes; not an IDX file"),
            });
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX header: returns the dimensions and the payload.
fn parse_idx(path: &Path, bytes: &[u8], expect_dims: usize) -> Result<(Vec<usize>, usize), DataError> {
    let bad = |reason: String| DataError::Invalid { path: path.to_path_buf(), reason };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("unsupported IDX element type 0x{:02x} (only unsigned bytes)", bytes[2])));
    }
    let ndim = bytes[3] as usize;
    if ndim != expect_dims {
        return Err(bad(format!("expected {expect_dims} dimensions, found {ndim}")));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let want = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    if bytes.len() - header != want {
        return Err(bad(format!("payload has {} bytes, dimensions {:?} need {want}", bytes.len() - header, dims)));
    }
    Ok((dims, header))
}

impl IdxDataset {
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        let images_path = find(root, &format!("{}-images-idx3-ubyte", split.prefix()))?;
        let labels_path = find(root, &format!("{}-labels-idx1-ubyte", split.prefix()))?;
        let images = read_maybe_gz(&images_path)?;
        let labels = read_maybe_gz(&labels_path)?;
        Self::parse(split, (&images_path, images), (&labels_path, labels))
    }

    /// A split from the bytes of its images and labels files (each raw or gzip'd), as [`open`]
    /// reads them; the paths name the files in errors.
    ///
    /// [`open`]: IdxDataset::open
    pub fn from_bytes(split: Split, images: (&Path, &[u8]), labels: (&Path, &[u8])) -> Result<Self, DataError> {
        let images_bytes = maybe_gunzip(images.0, images.1.to_vec())?;
        let labels_bytes = maybe_gunzip(labels.0, labels.1.to_vec())?;
        Self::parse(split, (images.0, images_bytes), (labels.0, labels_bytes))
    }

    fn parse(split: Split, images: (&Path, Vec<u8>), labels: (&Path, Vec<u8>)) -> Result<Self, DataError> {
        let ((images_path, images), (labels_path, labels)) = (images, labels);
        let (idims, ih) = parse_idx(images_path, &images, 3)?;
        let (ldims, lh) = parse_idx(labels_path, &labels, 1)?;
        if idims[0] != ldims[0] {
            return Err(DataError::Invalid {
                path: labels_path.to_path_buf(),
                reason: format!("{} labels for {} images in {}", ldims[0], idims[0], images_path.display()),
            });
        }
        let labels = labels[lh..].to_vec();
        let num_classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
        Ok(IdxDataset {
            split,
            rows: idims[1],
            cols: idims[2],
            pixels: images[ih..].to_vec(),
            labels,
            class_names: (0..num_classes).map(|c| c.to_string()).collect(),
        })
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn label(&self, i: usize) -> i64 {
        self.labels[i] as i64
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn key(&self, i: usize) -> String {
        format!("{}[{i}]", self.split.prefix())
    }
    fn load(&self, i: usize) -> Result<DynamicImage, SampleError> {
        let n = self.rows * self.cols;
        let px = self.pixels[i * n..(i + 1) * n].to_vec();
        GrayImage::from_raw(self.cols as u32, self.rows as u32, px)
            .map(DynamicImage::ImageLuma8)
            .ok_or_else(|| SampleError { key: self.key(i), reason: "bad image size".into() })
    }
    fn resize_whole(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_idx(dir: &Path, name: &str, dims: &[u32], payload: &[u8]) {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(payload);
        std::fs::write(dir.join(name), b).unwrap();
    }

    #[test]
    fn dimensions_whose_product_overflows_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_idx(dir.path(), "train-images-idx3-ubyte", &[u32::MAX, u32::MAX, u32::MAX], &[0; 16]);
        write_idx(dir.path(), "train-labels-idx1-ubyte", &[1], &[0]);
        let Err(err) = IdxDataset::open(dir.path(), Split::Train) else { panic!("opened") };
        assert!(err.to_string().contains("overflow"), "{err}");
    }

    #[test]
    fn reads_raw_idx_and_rejects_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        write_idx(dir.path(), "train-images-idx3-ubyte", &[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        write_idx(dir.path(), "train-labels-idx1-ubyte", &[2], &[4, 1]);
        let ds = IdxDataset::open(dir.path(), Split::Train).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.label(0), 4);
        assert_eq!(ds.class_names().len(), 5);
        let img = ds.load(1).unwrap().to_luma8();
        assert_eq!((img.width(), img.height()), (3, 2));
        assert_eq!(img.as_raw(), &[7, 8, 9, 10, 11, 12]);

        write_idx(dir.path(), "train-labels-idx1-ubyte", &[3], &[4, 1, 2]);
        let err = IdxDataset::open(dir.path(), Split::Train).err().unwrap().to_string();
        assert!(err.contains("3 labels for 2 images"), "{err}");
        let err = IdxDataset::open(dir.path(), Split::Test).err().unwrap().to_string();
        assert!(err.contains("t10k-images-idx3-ubyte"), "{err}");
    }
}
