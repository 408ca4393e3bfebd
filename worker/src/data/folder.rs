//! An image-folder tree: `root/<class>/<image>` with JPEG or PNG files, classes sorted by name
//! (torchvision's `ImageFolder` convention, so class indices agree with it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::DynamicImage;

use super::{hold_out, io_err, DataError, Dataset, SampleError};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

pub struct FolderDataset {
    root: PathBuf,
    class_names: Vec<String>,
    samples: Vec<(PathBuf, i64)>,
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(io_err(dir))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

impl FolderDataset {
    /// Scans `root/<class>/<image>`. Files that are not JPEG/PNG by extension are ignored.
    pub fn open(root: &Path) -> Result<Self, DataError> {
        if !root.is_dir() {
            return Err(DataError::MissingRoot(root.to_path_buf()));
        }
        let class_dirs: Vec<PathBuf> = sorted_entries(root)?.into_iter().filter(|p| p.is_dir()).collect();
        if class_dirs.is_empty() {
            return Err(DataError::Invalid {
                path: root.to_path_buf(),
                reason: "no class directories (expected root/<class>/<image>.jpg)".into(),
            });
        }
        let mut class_names = Vec::new();
        let mut samples = Vec::new();
        for (label, dir) in class_dirs.iter().enumerate() {
            class_names.push(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            for f in sorted_entries(dir)? {
                if f.is_file() && is_image(&f) {
                    samples.push((f, label as i64));
                }
            }
        }
        if samples.is_empty() {
            return Err(DataError::Invalid {
                path: root.to_path_buf(),
                reason: "no .jpg, .jpeg or .png images".into(),
            });
        }
        Ok(FolderDataset { root: root.to_path_buf(), class_names, samples })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Dataset for FolderDataset {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn label(&self, i: usize) -> i64 {
        self.samples[i].1
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn key(&self, i: usize) -> String {
        self.samples[i].0.display().to_string()
    }
    fn load(&self, i: usize) -> Result<DynamicImage, SampleError> {
        let path = &self.samples[i].0;
        let err = |reason: String| SampleError { key: path.display().to_string(), reason };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        image::load_from_memory(&bytes).map_err(|e| err(e.to_string()))
    }
    fn encoded(&self, i: usize) -> Option<Result<Vec<u8>, SampleError>> {
        let path = &self.samples[i].0;
        Some(std::fs::read(path).map_err(|e| SampleError { key: path.display().to_string(), reason: e.to_string() }))
    }
}

/// `root/train` with `root/val` (or `root/test`); without those, `root` itself (or `root/train`)
/// with a seeded `val_fraction` held out.
pub fn open_splits(
    root: &Path,
    val_fraction: f64,
    seed: u64,
) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>), DataError> {
    let train_dir = root.join("train");
    let val_dir = ["val", "test"].iter().map(|d| root.join(d)).find(|d| d.is_dir());
    if train_dir.is_dir() {
        if let Some(val_dir) = val_dir {
            return Ok((Arc::new(FolderDataset::open(&train_dir)?), Arc::new(FolderDataset::open(&val_dir)?)));
        }
    }
    let all: Arc<dyn Dataset> = Arc::new(FolderDataset::open(if train_dir.is_dir() { &train_dir } else { root })?);
    let s = hold_out(all, root, val_fraction, seed)?;
    Ok((s.train, s.val))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_classes_in_order_and_holds_out_validation() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("cat", 6), ("ant", 4)] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            for i in 0..n {
                image::RgbImage::new(8, 8).save(dir.path().join(class).join(format!("{i}.png"))).unwrap();
            }
        }
        std::fs::write(dir.path().join("cat").join("notes.txt"), "not an image").unwrap();
        let ds = FolderDataset::open(dir.path()).unwrap();
        assert_eq!(ds.class_names(), ["ant", "cat"]);
        assert_eq!(ds.len(), 10);
        assert_eq!(ds.label(0), 0);
        assert_eq!(ds.label(9), 1);
        let (train, val) = open_splits(dir.path(), 0.2, 1).unwrap();
        assert_eq!((train.len(), val.len()), (8, 2));
        let mut keys: Vec<String> = (0..8).map(|i| train.key(i)).chain((0..2).map(|i| val.key(i))).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 10, "train and validation are disjoint and cover everything");
    }

    #[test]
    fn missing_and_empty_roots_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = FolderDataset::open(&missing).err().unwrap().to_string();
        assert!(err.contains("nope") && err.contains("does not exist"), "{err}");
        let err = FolderDataset::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("no class directories"), "{err}");
    }
}
