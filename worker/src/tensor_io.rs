//! Safetensors files from and to tch tensors, with string metadata, written atomically.
//!
//! Every file thaw writes (imported weights, checkpoints, extracted features) goes through
//! [`write_atomic`]: a temp file in the same directory, fsync, rename, fsync of the directory, so
//! a crash or a killed process leaves either the old file or the new one, never a torn one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("tensor `{name}` has unsupported type {kind:?}")]
    Kind { name: String, kind: String },
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary name beside `dst` (same directory, so a rename is atomic), unique per process and
/// call: several workers of one machine may write the same file at once (for example import the
/// same weights), and must not write into each other's temporary file.
pub fn temp_path_beside(dst: &Path, ext: &str) -> PathBuf {
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dst.with_file_name(format!(".{name}.{}-{n}.{ext}", std::process::id()))
}

/// Removes the temporary files that processes killed while writing `dst` left beside it (named
/// by [`temp_path_beside`] with the writer's pid; a writer still alive keeps its file).
pub fn remove_stale_temps(dst: &Path) {
    let (Some(dir), Some(name)) = (dst.parent(), dst.file_name().and_then(|n| n.to_str())) else { return };
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) else { return };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        // SAFETY: kill(2) with signal 0 only checks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            tracing::info!(file = %e.path().display(), pid, "removing a partial write of a process that died");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Writes a file atomically through `write`: temp file beside `path`, fsync, rename, fsync of
/// the directory. On any error the temp file is removed and `path` is untouched.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), TensorIoError> {
    let err = |source| TensorIoError::Write { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = temp_path_beside(path, "tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

fn dtype_of(name: &str, kind: Kind) -> Result<Dtype, TensorIoError> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => return Err(TensorIoError::Kind { name: name.to_string(), kind: format!("{other:?}") }),
    })
}

/// The tch kind of a safetensors dtype, where libtorch has one.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Raw little-endian bytes of a tensor (moved to the CPU, made contiguous).
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut buf, numel);
    buf
}

/// Named tensors and metadata as the bytes of one safetensors file.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<Vec<u8>, String> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), dtype_of(name, t.kind()).map_err(|e| e.to_string())?, shape, tensor_bytes(t)));
    }
    let mut views = Vec::with_capacity(owned.len());
    for (n, d, s, b) in &owned {
        views.push((n.clone(), TensorView::new(*d, s.clone(), b).map_err(|e| e.to_string())?));
    }
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

/// Writes named tensors and metadata as one safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<(), TensorIoError> {
    for (name, t) in tensors {
        dtype_of(name, t.kind())?;
    }
    let bytes = safetensors_bytes(tensors, metadata)
        .map_err(|reason| TensorIoError::Format { path: path.to_path_buf(), reason })?;
    write_atomic(path, |f| f.write_all(&bytes))
}

/// Reads every tensor (on the CPU) and the metadata of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<(Vec<(String, Tensor)>, HashMap<String, String>), TensorIoError> {
    let bytes = std::fs::read(path).map_err(|source| TensorIoError::Read { path: path.to_path_buf(), source })?;
    parse_safetensors(&bytes).map_err(|reason| TensorIoError::Format { path: path.to_path_buf(), reason })
}

/// Every tensor (on the CPU) and the metadata of safetensors bytes, sorted by name.
pub fn parse_safetensors(bytes: &[u8]) -> Result<(Vec<(String, Tensor)>, HashMap<String, String>), String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind =
            kind_of(view.dtype()).ok_or_else(|| format!("tensor `{name}` has unsupported type {:?}", view.dtype()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("x.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0, 3.25, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[7i64, 8]);
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&p, &[("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())], meta.clone())
            .unwrap();
        let (tensors, m) = read_safetensors(&p).unwrap();
        assert_eq!(m, meta);
        assert_eq!(tensors[0].0, "a");
        assert!(tensors[0].1.equal(&a));
        assert!(tensors[1].1.equal(&b));
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file is left behind");
    }

    #[test]
    fn garbage_is_a_format_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b"definitely not safetensors").unwrap();
        let err = read_safetensors(&p).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors"), "{err}");
    }

    #[test]
    fn temp_names_are_unique_and_beside_the_destination() {
        let dst = Path::new("/cache/weights/x.safetensors");
        let (a, b) = (temp_path_beside(dst, "tmp"), temp_path_beside(dst, "tmp"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), dst.parent());
        assert!(a.to_string_lossy().ends_with(".tmp"));
    }
}
