//! Reading `torch.save` state dicts without Python, in both of torch's file formats:
//!
//! - the **zip** format (torch >= 1.6): `<prefix>/data.pkl` is a pickle whose persistent ids are
//!   `('storage', torch.<Type>Storage, key, location, numel)`, and each storage's raw bytes are the
//!   entry `<prefix>/data/<key>` (`<prefix>/byteorder` says their byte order, little when absent);
//! - the **legacy** format (before 1.6; torchvision's `mobilenet_v2-b0353104.pth` is one): a
//!   sequence of pickles — the magic number `0x1950a86a20f9469cfc6c`, the protocol version 1001,
//!   a `sys_info` dict, the object itself (persistent ids `('storage', type, root_key, location,
//!   numel, view_metadata)`), the list of storage keys — then, for each key in that order, an
//!   8-byte little-endian element count and the storage's raw little-endian bytes.
//!
//! Tensors are rebuilt from `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
//! (and `_rebuild_tensor`, `_rebuild_tensor_v3`, `_rebuild_parameter`), honouring the storage
//! offset and strides, into contiguous little-endian [`RawTensor`]s.
//!
//! This module reads files only: it never writes, never touches libtorch, and never executes
//! anything from the pickle (see [`super::pickle`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use safetensors::Dtype;

use super::pickle::{self, Value};
use super::{RawTensor, WeightsError};

const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
const LEGACY_PROTOCOL: i64 = 1001;

/// Reads the state dict (tensor name -> tensor, in the file's order) of a `torch.save` file in
/// either format. A checkpoint dict with a `state_dict`, `model_state_dict` or `model` entry
/// holding a dict of tensors is unwrapped to that entry.
pub fn read_torch_checkpoint(path: &Path) -> Result<Vec<(String, RawTensor)>, WeightsError> {
    let file = File::open(path).map_err(|e| WeightsError::io("opening", path, e))?;
    let len = file.metadata().map_err(|e| WeightsError::io("reading", path, e))?.len();
    read_torch_checkpoint_from(path, BufReader::new(file), len)
}

/// [`read_torch_checkpoint`] of a checkpoint held in memory; `name` stands for its path in errors.
pub fn read_torch_checkpoint_bytes(name: &Path, bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, WeightsError> {
    read_torch_checkpoint_from(name, io::Cursor::new(bytes), bytes.len() as u64)
}

/// Reads a checkpoint of `len` bytes from `r` (positioned at its start); `path` names it in errors.
fn read_torch_checkpoint_from<R: Read + Seek>(
    path: &Path,
    mut r: R,
    len: u64,
) -> Result<Vec<(String, RawTensor)>, WeightsError> {
    let mut head = [0u8; 4];
    let n = read_up_to(&mut r, &mut head).map_err(|e| WeightsError::io("reading", path, e))?;
    r.seek(SeekFrom::Start(0)).map_err(|e| WeightsError::io("reading", path, e))?;
    match &head[..n] {
        [b'P', b'K', 3, 4] => read_zip(path, r, len),
        [0x80, ..] => read_legacy(path, r, len),
        _ => Err(WeightsError::format(
            path,
            "not a torch checkpoint (neither a zip archive nor a pickle stream; the tar format of torch < 0.4 is not supported)",
        )),
    }
}

/// Bytes per element; every dtype a torch storage can have is byte-sized.
pub(crate) fn element_size(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A storage as a persistent id describes it.
#[derive(Clone, Debug)]
struct StorageSpec {
    dtype: Dtype,
    /// Elements of `dtype` (bytes for untyped storages).
    numel: u64,
}

/// A tensor as its rebuild call describes it.
#[derive(Debug)]
struct TensorSpec {
    dtype: Dtype,
    /// Key of the storage holding the data.
    key: String,
    /// Legacy storage views: the storage is elements `start..start + len` of the root storage.
    view: Option<(u64, u64)>,
    /// In elements of `dtype`.
    offset: u64,
    shape: Vec<usize>,
    stride: Vec<u64>,
}

fn storage_dtype(global: &Value) -> Result<Dtype, String> {
    let (module, name) = match global {
        Value::Global { module, name } => (module.as_str(), name.as_str()),
        other => return Err(format!("storage type is a {}, not a torch storage class", other.type_name())),
    };
    if module != "torch" && module != "torch.cuda" {
        return Err(format!("unknown storage type {module}.{name}"));
    }
    Ok(match name {
        "FloatStorage" => Dtype::F32,
        "DoubleStorage" => Dtype::F64,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" | "UntypedStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        _ => return Err(format!("unsupported storage type {module}.{name}")),
    })
}

/// `torch.<dtype>` globals, as `_rebuild_tensor_v3` receives them.
fn torch_dtype(global: &Value) -> Result<Dtype, String> {
    let name = match global {
        Value::Global { module, name } if module == "torch" => name.as_str(),
        other => return Err(format!("tensor dtype is a {}, not a torch dtype", other.type_name())),
    };
    Ok(match name {
        "float32" | "float" => Dtype::F32,
        "float64" | "double" => Dtype::F64,
        "float16" | "half" => Dtype::F16,
        "bfloat16" => Dtype::BF16,
        "int64" | "long" => Dtype::I64,
        "int32" | "int" => Dtype::I32,
        "int16" | "short" => Dtype::I16,
        "int8" => Dtype::I8,
        "uint8" => Dtype::U8,
        "bool" => Dtype::BOOL,
        "uint16" => Dtype::U16,
        "uint32" => Dtype::U32,
        "uint64" => Dtype::U64,
        "float8_e5m2" => Dtype::F8_E5M2,
        "float8_e4m3fn" => Dtype::F8_E4M3,
        _ => return Err(format!("unsupported tensor dtype torch.{name}")),
    })
}

fn int_arg(v: &Value, what: &str) -> Result<i64, String> {
    v.as_int().ok_or_else(|| format!("{what} is a {}, not an int", v.type_name()))
}

fn non_negative(v: &Value, what: &str) -> Result<u64, String> {
    let i = int_arg(v, what)?;
    u64::try_from(i).map_err(|_| format!("{what} is negative ({i})"))
}

fn key_of(v: &Value) -> Result<String, String> {
    match v {
        Value::Str(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(format!("storage key is a {}", other.type_name())),
    }
}

/// The key of a root storage, its description, and the view of it (legacy files only).
type StorageRef = (String, StorageSpec, Option<(u64, u64)>);

/// A persistent id: `('storage', type, key, location, numel[, view_metadata])`.
fn parse_pid(pid: &Value) -> Result<StorageRef, String> {
    let items = pid.as_seq().ok_or_else(|| format!("persistent id is a {}, not a tuple", pid.type_name()))?;
    match items.first() {
        Some(Value::Str(s)) if s == "storage" => {}
        Some(Value::Bytes(b)) if b == b"storage" => {}
        _ => return Err(format!("persistent id {pid:?} does not describe a storage")),
    }
    if items.len() != 5 && items.len() != 6 {
        return Err(format!("storage persistent id has {} fields, expected 5 or 6", items.len()));
    }
    let dtype = storage_dtype(&items[1])?;
    let key = key_of(&items[2])?;
    let numel = non_negative(&items[4], "storage size")?;
    let view = match items.get(5) {
        None | Some(Value::None) => None,
        Some(v) => {
            let m = v.as_seq().filter(|m| m.len() == 3).ok_or("storage view metadata is not a 3-tuple")?;
            let (start, len) = (non_negative(&m[1], "view offset")?, non_negative(&m[2], "view size")?);
            if start.checked_add(len).is_none_or(|end| end > numel) {
                return Err(format!("storage view {start}..+{len} exceeds its storage of {numel} elements"));
            }
            Some((start, len))
        }
    };
    Ok((key, StorageSpec { dtype, numel }, view))
}

fn dims(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    let items = v.as_seq().ok_or_else(|| format!("tensor {what} is a {}, not a tuple", v.type_name()))?;
    items.iter().map(|x| non_negative(x, what)).collect()
}

/// How many `_rebuild_parameter` calls may wrap a tensor (torch writes one; a pickle can nest
/// them without end, or make one its own argument).
const MAX_WRAPPERS: usize = 4;

/// The tensor a value rebuilds, or `None` if it is not a tensor.
fn parse_tensor(v: &Value) -> Result<Option<TensorSpec>, String> {
    parse_tensor_in(v, 0)
}

fn parse_tensor_in(v: &Value, wrappers: usize) -> Result<Option<TensorSpec>, String> {
    let Value::Object(obj) = v else { return Ok(None) };
    let obj = obj.borrow();
    let Some(callable) = obj.callable.global_name() else { return Ok(None) };
    let args = obj.args.as_seq().unwrap_or_default();
    match callable.as_str() {
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" | "torch._utils._rebuild_tensor_v3" => {
            if args.len() < 4 {
                return Err(format!("{callable} called with {} arguments", args.len()));
            }
            let Value::Persistent(pid) = &args[0] else {
                return Err(format!("{callable}'s storage is a {}", args[0].type_name()));
            };
            let (key, storage, view) = parse_pid(pid)?;
            let dtype = if callable.ends_with("_v3") {
                torch_dtype(args.get(6).ok_or("_rebuild_tensor_v3 without its dtype argument")?)?
            } else {
                storage.dtype
            };
            let shape = dims(&args[2], "size")?;
            let stride = dims(&args[3], "stride")?;
            if shape.len() != stride.len() {
                return Err(format!("tensor has {} sizes but {} strides", shape.len(), stride.len()));
            }
            let shape = shape
                .into_iter()
                .map(|d| usize::try_from(d).map_err(|_| format!("tensor dimension {d} is too large")))
                .collect::<Result<_, _>>()?;
            Ok(Some(TensorSpec { dtype, key, view, offset: non_negative(&args[1], "storage offset")?, shape, stride }))
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => match args.first() {
            Some(_) if wrappers >= MAX_WRAPPERS => Err(format!("{callable} nested more than {MAX_WRAPPERS} deep")),
            Some(inner) => parse_tensor_in(inner, wrappers + 1),
            None => Err(format!("{callable} called without arguments")),
        },
        _ => Ok(None),
    }
}

/// The `(name, tensor)` entries of the state dict inside the unpickled object.
fn state_dict(root: &Value) -> Result<Vec<(String, TensorSpec)>, String> {
    fn entries(d: &Value) -> Option<Vec<(Value, Value)>> {
        match d {
            Value::Dict(d) => Some(d.borrow().clone()),
            _ => None,
        }
    }
    fn all_tensors(d: &[(Value, Value)]) -> bool {
        !d.is_empty() && d.iter().all(|(_, v)| matches!(parse_tensor(v), Ok(Some(_))))
    }
    let top = entries(root).ok_or_else(|| format!("the file holds a {}, not a state dict", root.type_name()))?;
    let mut chosen = top;
    for wrapper in ["state_dict", "model_state_dict", "model"] {
        if let Some(inner) = root.dict_get(wrapper).as_ref().and_then(entries) {
            if all_tensors(&inner) {
                chosen = inner;
                break;
            }
        }
    }
    let mut out = Vec::with_capacity(chosen.len());
    for (k, v) in &chosen {
        let name = k.as_str().ok_or_else(|| format!("state dict key is a {}, not a string", k.type_name()))?;
        match parse_tensor(v).map_err(|e| format!("entry `{name}`: {e}"))? {
            Some(t) => out.push((name.to_string(), t)),
            None => return Err(format!("entry `{name}` is a {}, not a tensor", v.type_name())),
        }
    }
    Ok(out)
}

/// Copies the elements a tensor describes out of its storage, in row-major order.
fn gather(storage: &[u8], es: usize, offset: u64, shape: &[usize], stride: &[u64]) -> Result<Vec<u8>, String> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("tensor size overflows")?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let available = (storage.len() / es) as u64;
    let last = shape
        .iter()
        .zip(stride)
        .try_fold(offset, |a, (&d, &s)| (d as u64 - 1).checked_mul(s).and_then(|x| a.checked_add(x)))
        .ok_or("tensor extent overflows")?;
    if last >= available {
        return Err(format!("tensor reaches element {last} of a storage of {available} elements"));
    }
    let offset = offset as usize;
    let mut contiguous = true;
    let mut expected = 1u64;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            contiguous = false;
        }
        expected *= d as u64;
    }
    if contiguous {
        return Ok(storage[offset * es..(offset + numel) * es].to_vec());
    }
    let nd = shape.len();
    let (inner_n, inner_s) = (shape[nd - 1], stride[nd - 1] as usize);
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; nd - 1];
    loop {
        let base = offset + idx.iter().zip(stride).map(|(&i, &s)| i * s as usize).sum::<usize>();
        if inner_s == 1 {
            out.extend_from_slice(&storage[base * es..(base + inner_n) * es]);
        } else {
            for j in 0..inner_n {
                let p = (base + j * inner_s) * es;
                out.extend_from_slice(&storage[p..p + es]);
            }
        }
        let mut d = idx.len();
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Builds the tensors from their specs and the loaded storages (key -> bytes). A storage that one
/// tensor covers exactly is moved into it instead of copied.
/// What the tensors of a file may hold in all, as a multiple of the file's size: storages are
/// stored whole, so only overlapping views (`expand`, stride 0) make tensors larger than their
/// file, and a pickle of a few bytes must not expand into terabytes.
const MAX_TENSOR_RATIO: u64 = 64;

fn build(
    path: &Path,
    specs: Vec<(String, TensorSpec)>,
    mut storages: HashMap<String, Vec<u8>>,
    file_len: u64,
) -> Result<Vec<(String, RawTensor)>, WeightsError> {
    let mut budget = file_len.saturating_mul(MAX_TENSOR_RATIO);
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (_, t) in &specs {
        *uses.entry(t.key.as_str()).or_default() += 1;
    }
    let uses: HashMap<String, usize> = uses.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let mut out = Vec::with_capacity(specs.len());
    for (name, t) in specs {
        let es = element_size(t.dtype);
        let bytes = storages
            .get(&t.key)
            .ok_or_else(|| WeightsError::format(path, format!("tensor `{name}`: storage `{}` is missing", t.key)))?;
        let nbytes = t
            .shape
            .iter()
            .try_fold(es, |a, &d| a.checked_mul(d))
            .filter(|&n| n as u64 <= budget)
            .ok_or_else(|| {
                WeightsError::format(
                    path,
                    format!(
                        "tensor `{name}` of shape {:?}: the tensors would hold more than {MAX_TENSOR_RATIO} times the file's {file_len} bytes",
                        t.shape
                    ),
                )
            })?;
        budget -= nbytes as u64;
        let whole = t.view.is_none() && t.offset == 0 && nbytes == bytes.len() && uses[&t.key] == 1;
        let data = if whole && is_row_major(&t.shape, &t.stride) {
            storages.remove(&t.key).unwrap_or_default()
        } else {
            let slice = match t.view {
                Some((start, len)) => {
                    let range = start.checked_add(len).and_then(|end| {
                        Some(
                            usize::try_from(start).ok()?.checked_mul(es)?
                                ..usize::try_from(end).ok()?.checked_mul(es)?,
                        )
                    });
                    range.and_then(|r| bytes.get(r)).ok_or_else(|| {
                        WeightsError::format(path, format!("tensor `{name}`: storage view beyond storage `{}`", t.key))
                    })?
                }
                None => bytes.as_slice(),
            };
            gather(slice, es, t.offset, &t.shape, &t.stride)
                .map_err(|e| WeightsError::format(path, format!("tensor `{name}` (storage `{}`): {e}", t.key)))?
        };
        out.push((name, RawTensor { dtype: t.dtype, shape: t.shape, data }));
    }
    Ok(out)
}

fn is_row_major(shape: &[usize], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d as u64);
    }
    true
}

/// Storage descriptions of every persistent id, checking that a key always has one type.
fn storage_specs(path: &Path, pids: &[Value]) -> Result<HashMap<String, StorageSpec>, WeightsError> {
    let mut specs: HashMap<String, StorageSpec> = HashMap::new();
    for pid in pids {
        let (key, spec, _) = parse_pid(pid).map_err(|e| WeightsError::format(path, e))?;
        if let Some(prev) = specs.get(&key) {
            if prev.dtype != spec.dtype {
                return Err(WeightsError::format(
                    path,
                    format!("storage `{key}` is used as {:?} and as {:?}", prev.dtype, spec.dtype),
                ));
            }
        } else {
            specs.insert(key, spec);
        }
    }
    Ok(specs)
}

/// How much larger than the whole file one inflated zip entry may be (deflate's own limit is about
/// 1032:1; torch.save stores entries uncompressed).
const MAX_INFLATE_RATIO: u64 = 64;

fn read_zip<R: Read + Seek>(path: &Path, r: R, file_len: u64) -> Result<Vec<(String, RawTensor)>, WeightsError> {
    let zip_err = |e: zip::result::ZipError| WeightsError::format(path, format!("zip archive: {e}"));
    let mut archive = zip::ZipArchive::new(r).map_err(zip_err)?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let prefix = names
        .iter()
        .filter_map(|n| n.strip_suffix("/data.pkl"))
        .filter(|p| !p.contains('/'))
        .min_by_key(|p| p.len())
        .map(str::to_string)
        .ok_or_else(|| {
            WeightsError::format(path, "zip archive without a `<name>/data.pkl` entry: not written by torch.save")
        })?;
    if names.iter().any(|n| *n == format!("{prefix}/constants.pkl")) {
        return Err(WeightsError::format(
            path,
            "a TorchScript archive (torch.jit.save); save the model's state_dict() with torch.save instead",
        ));
    }
    let read_entry = |archive: &mut zip::ZipArchive<R>, name: &str| -> Result<Vec<u8>, WeightsError> {
        let mut entry =
            archive.by_name(name).map_err(|e| WeightsError::format(path, format!("entry `{name}`: {e}")))?;
        // A declared size is a claim: memory is reserved for at most the file's size, an entry may
        // not declare more than MAX_INFLATE_RATIO times it, and none may inflate past its claim.
        let declared = entry.size();
        let limit = file_len.saturating_mul(MAX_INFLATE_RATIO);
        if declared > limit {
            return Err(WeightsError::format(
                path,
                format!(
                    "entry `{name}` declares {declared} bytes, over {MAX_INFLATE_RATIO} times the file's {file_len}"
                ),
            ));
        }
        let mut buf = Vec::with_capacity(declared.min(file_len) as usize);
        (&mut entry).take(declared + 1).read_to_end(&mut buf).map_err(|e| WeightsError::io("reading", path, e))?;
        if buf.len() as u64 != declared {
            return Err(WeightsError::format(
                path,
                format!("entry `{name}` holds {} bytes, it declares {declared}", buf.len()),
            ));
        }
        Ok(buf)
    };
    let big_endian = if names.iter().any(|n| *n == format!("{prefix}/byteorder")) {
        match read_entry(&mut archive, &format!("{prefix}/byteorder"))?.as_slice() {
            b"little" => false,
            b"big" => true,
            other => {
                return Err(WeightsError::format(
                    path,
                    format!("unknown byte order `{}`", String::from_utf8_lossy(other)),
                ))
            }
        }
    } else {
        false
    };
    let pkl = read_entry(&mut archive, &format!("{prefix}/data.pkl"))?;
    let (root, pids) = pickle::loads(&pkl).map_err(|e| WeightsError::pickle(path, e))?;
    let specs = storage_specs(path, &pids)?;
    let tensors = state_dict(&root).map_err(|e| WeightsError::format(path, e))?;
    let needed: HashSet<&str> = tensors.iter().map(|(_, t)| t.key.as_str()).collect();
    let mut storages = HashMap::new();
    for key in needed {
        let spec = specs
            .get(key)
            .ok_or_else(|| WeightsError::format(path, format!("storage `{key}` has no persistent id")))?;
        let mut bytes = read_entry(&mut archive, &format!("{prefix}/data/{key}"))?;
        let want = spec.numel.saturating_mul(element_size(spec.dtype) as u64);
        if (bytes.len() as u64) < want {
            return Err(WeightsError::format(
                path,
                format!("storage `{key}` has {} bytes, its persistent id says {want}", bytes.len()),
            ));
        }
        if big_endian {
            let es = element_size(spec.dtype);
            bytes.chunks_exact_mut(es).for_each(|c| c.reverse());
        }
        storages.insert(key.to_string(), bytes);
    }
    build(path, tensors, storages, file_len)
}

fn read_legacy<R: Read>(path: &Path, mut r: R, file_len: u64) -> Result<Vec<(String, RawTensor)>, WeightsError> {
    let next = |r: &mut R| pickle::load(r).map_err(|e| WeightsError::pickle(path, e));
    let (magic, _) = next(&mut r)?;
    let magic_ok = match &magic {
        Value::BigInt(b) => b.as_slice() == &LEGACY_MAGIC.to_le_bytes()[..10],
        _ => false,
    };
    if !magic_ok {
        return Err(WeightsError::format(path, "a pickle, but not a torch.save file (no legacy magic number)"));
    }
    let (proto, _) = next(&mut r)?;
    if proto.as_int() != Some(LEGACY_PROTOCOL) {
        return Err(WeightsError::format(path, format!("legacy protocol version {proto:?}, expected 1001")));
    }
    let (sys_info, _) = next(&mut r)?;
    if !matches!(sys_info.dict_get("little_endian"), Some(Value::Bool(true))) {
        return Err(WeightsError::format(path, "saved on a big-endian machine, which is not supported"));
    }
    let (root, pids) = next(&mut r)?;
    let (keys, _) = next(&mut r)?;
    let keys = keys
        .as_seq()
        .ok_or_else(|| WeightsError::format(path, "the storage key list is not a list"))?
        .iter()
        .map(key_of)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WeightsError::format(path, e))?;
    let specs = storage_specs(path, &pids)?;
    let tensors = state_dict(&root).map_err(|e| WeightsError::format(path, e))?;
    let needed: HashSet<&str> = tensors.iter().map(|(_, t)| t.key.as_str()).collect();
    let mut storages = HashMap::new();
    for key in &keys {
        let spec = specs
            .get(key)
            .ok_or_else(|| WeightsError::format(path, format!("storage `{key}` is listed but never referenced")))?;
        let mut count = [0u8; 8];
        r.read_exact(&mut count).map_err(|e| WeightsError::io("reading the storages of", path, e))?;
        let count = u64::from_le_bytes(count);
        if count != spec.numel {
            return Err(WeightsError::format(
                path,
                format!("storage `{key}` has {count} elements, its persistent id says {}", spec.numel),
            ));
        }
        let nbytes = count
            .checked_mul(element_size(spec.dtype) as u64)
            .ok_or_else(|| WeightsError::format(path, format!("storage `{key}` is too large")))?;
        // Never reserve more than the file holds: the count is the file's claim.
        let mut buf = Vec::with_capacity(if needed.contains(key.as_str()) { nbytes.min(file_len) as usize } else { 0 });
        let got = if needed.contains(key.as_str()) {
            (&mut r).take(nbytes).read_to_end(&mut buf)
        } else {
            io::copy(&mut (&mut r).take(nbytes), &mut io::sink()).map(|n| n as usize)
        }
        .map_err(|e| WeightsError::io("reading the storages of", path, e))?;
        if got as u64 != nbytes {
            return Err(WeightsError::format(path, format!("file ends inside storage `{key}`: truncated download?")));
        }
        if needed.contains(key.as_str()) {
            storages.insert(key.clone(), buf);
        }
    }
    build(path, tensors, storages, file_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn gather_honours_offset_and_strides() {
        // A 3x4 row-major matrix 0..12.
        let s = f32s(&(0..12).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(gather(&s, 4, 0, &[3, 4], &[4, 1]).unwrap(), s);
        // Transpose.
        let t: Vec<f32> = vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.];
        assert_eq!(gather(&s, 4, 0, &[4, 3], &[1, 4]).unwrap(), f32s(&t));
        // Rows 1..3, columns 1..3, with an offset.
        assert_eq!(gather(&s, 4, 5, &[2, 2], &[4, 1]).unwrap(), f32s(&[5., 6., 9., 10.]));
        // A scalar, an expanded row, an empty tensor.
        assert_eq!(gather(&s, 4, 7, &[], &[]).unwrap(), f32s(&[7.]));
        assert_eq!(gather(&s, 4, 2, &[2, 2], &[0, 1]).unwrap(), f32s(&[2., 3., 2., 3.]));
        assert!(gather(&s, 4, 11, &[0, 5], &[5, 1]).unwrap().is_empty());
    }

    #[test]
    fn gather_rejects_tensors_beyond_their_storage() {
        let s = f32s(&[0.; 12]);
        let err = gather(&s, 4, 1, &[3, 4], &[4, 1]).unwrap_err();
        assert!(err.contains("element 12 of a storage of 12"), "{err}");
        assert!(gather(&s, 4, 0, &[2, usize::MAX], &[1, 1]).is_err());
    }
}
