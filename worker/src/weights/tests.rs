//! Tests of the weights module on torchvision's real MobileNetV2 checkpoint (legacy format) and on
//! zip-format files that `tests/fixtures/to_zip_format.py` derives from it with Python's standard
//! library alone, an implementation independent of the Rust reader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::*;
use tch::Kind;

const MOBILENET_TENSORS: usize = 314;
const MOBILENET_PARAMETERS: u64 = 3_504_872;

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// torchvision's `mobilenet_v2-b0353104.pth`, which `scripts/setup.sh` fetches.
pub(crate) fn mobilenet_pth() -> PathBuf {
    let p = repo_root().join(".thaw/weights/mobilenet_v2-b0353104.pth");
    assert!(p.is_file(), "{} is missing: run `bash scripts/setup.sh` first", p.display());
    p
}

/// Runs the fixture script with `args`; returns its stdout.
fn fixture(args: &[&str]) -> Vec<u8> {
    let script = repo_root().join("tests/fixtures/to_zip_format.py");
    let out = Command::new("python3").arg(&script).args(args).output().expect("python3 runs");
    assert!(out.status.success(), "{} {args:?} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The mobilenet file rewritten in the zip format, with extra script arguments.
fn zip_version(dir: &Path, extra: &[&str]) -> PathBuf {
    let dst = dir.join("mobilenet_v2-zip.pth");
    let src = mobilenet_pth();
    let mut args = vec![src.to_str().unwrap(), dst.to_str().unwrap()];
    args.extend_from_slice(extra);
    fixture(&args);
    dst
}

fn f32s(t: &RawTensor) -> Vec<f32> {
    t.to_f32_vec().unwrap_or_else(|| panic!("expected F32, got {:?}", t.dtype))
}

fn by_name(tensors: Vec<(String, RawTensor)>) -> HashMap<String, RawTensor> {
    tensors.into_iter().collect()
}

fn tensor_values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn import_mobilenet(dir: &Path) -> PathBuf {
    let dst = dir.join("mobilenet_v2.safetensors");
    import_checkpoint(&mobilenet_pth(), Arch::MobilenetV2, &dst).unwrap();
    dst
}

#[test]
fn legacy_mobilenet_reads_every_tensor() {
    let tensors = read_torch_checkpoint(&mobilenet_pth()).unwrap();
    assert_eq!(tensors.len(), MOBILENET_TENSORS);
    // The file's order is kept.
    assert_eq!(tensors[0].0, "features.0.0.weight");
    assert_eq!(tensors[MOBILENET_TENSORS - 1].0, "classifier.1.bias");
    let f32_count = tensors.iter().filter(|(_, t)| t.dtype == Dtype::F32).count();
    let i64_count = tensors.iter().filter(|(n, t)| t.dtype == Dtype::I64 && n.ends_with("num_batches_tracked")).count();
    assert_eq!((f32_count, i64_count), (262, 52));
    for (name, t) in &tensors {
        assert_eq!(t.data.len(), t.numel() * super::torch_file::element_size(t.dtype), "{name}");
    }
    let t = by_name(tensors);
    assert_eq!(t["features.0.0.weight"].shape, vec![32, 3, 3, 3]);
    assert_eq!(t["classifier.1.weight"].shape, vec![1000, 1280]);
    assert_eq!(t["features.18.0.weight"].shape, vec![1280, 320, 1, 1]);
    // Values checked with Python's pickle module (tests/fixtures/to_zip_format.py's reader).
    assert_eq!(&t["features.0.0.weight"].data[..4], &[0x53, 0x07, 0x58, 0x3c]);
    let w = f32s(&t["features.0.0.weight"]);
    // 0.013185339979827404, -0.004321294371038675, 0.014823135919868946
    assert_eq!(w[..3].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), vec![0x3c580753, 0xbb8d99a5, 0x3c72dcbd]);
    let sum: f64 = w.iter().map(|&x| x as f64).sum();
    assert!((sum - -0.7730716340520303).abs() < 1e-9, "{sum}");
    let bias_sum: f64 = f32s(&t["classifier.1.bias"]).iter().map(|&x| x as f64).sum();
    assert!((bias_sum - -0.00010184831626247615).abs() < 1e-12, "{bias_sum}");
    let nbt = &t["features.0.1.num_batches_tracked"];
    assert!(nbt.shape.is_empty());
    assert_eq!(i64::from_le_bytes(nbt.data.as_slice().try_into().unwrap()), 1431430);
}

#[test]
fn legacy_mobilenet_matches_python_reference_digests() {
    let json = fixture(&["--digest", mobilenet_pth().to_str().unwrap()]);
    let reference: HashMap<String, (String, Vec<usize>, String)> = serde_json::from_slice(&json).unwrap();
    let tensors = read_torch_checkpoint(&mobilenet_pth()).unwrap();
    assert_eq!(reference.len(), tensors.len());
    for (name, t) in &tensors {
        let (storage, shape, digest) = reference.get(name).unwrap_or_else(|| panic!("python lacks {name}"));
        let dtype = match storage.as_str() {
            "FloatStorage" => Dtype::F32,
            "LongStorage" => Dtype::I64,
            other => panic!("unexpected storage {other}"),
        };
        assert_eq!((&t.dtype, &t.shape), (&dtype, shape), "{name}");
        let ours: String = Sha256::digest(&t.data).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&ours, digest, "{name}");
    }
}

#[test]
fn zip_format_is_read_byte_identical_to_legacy() {
    let dir = tempfile::tempdir().unwrap();
    let zip = zip_version(dir.path(), &[]);
    assert_eq!(&std::fs::read(&zip).unwrap()[..4], b"PK\x03\x04");
    let legacy = read_torch_checkpoint(&mobilenet_pth()).unwrap();
    let zipped = read_torch_checkpoint(&zip).unwrap();
    assert_eq!(legacy.len(), zipped.len());
    for ((ln, lt), (zn, zt)) in legacy.iter().zip(&zipped) {
        assert_eq!(ln, zn);
        assert!(lt == zt, "{ln} differs");
    }
}

#[test]
fn zip_views_honour_offsets_and_strides() {
    let dir = tempfile::tempdir().unwrap();
    let t = by_name(read_torch_checkpoint(&zip_version(dir.path(), &["--views"])).unwrap());
    let base = f32s(&t["classifier.1.weight"]);
    let at = |r: usize, c: usize| base[r * 1280 + c];

    let tr = &t["view.transposed"];
    assert_eq!(tr.shape, vec![1280, 1000]);
    let tv = f32s(tr);
    for (i, j) in [(0, 0), (1, 0), (0, 1), (1279, 999), (17, 423)] {
        assert_eq!(tv[i * 1000 + j], at(j, i), "transposed[{i}, {j}]");
    }
    let expected: Vec<f32> = (3..7).flat_map(|r| (10..20).map(move |c| (r, c))).map(|(r, c)| at(r, c)).collect();
    assert_eq!((t["view.slice"].shape.clone(), f32s(&t["view.slice"])), (vec![4, 10], expected));
    // Offset 5, shape (3, 4), strides (2 rows, 3 columns).
    let expected: Vec<f32> =
        (0..3).flat_map(|r| (0..4).map(move |c| (2 * r, 5 + 3 * c))).map(|(r, c)| at(r, c)).collect();
    assert_eq!(f32s(&t["view.step"]), expected);
    assert_eq!((t["view.scalar"].shape.clone(), f32s(&t["view.scalar"])), (vec![], vec![at(7, 9)]));
    assert_eq!(f32s(&t["view.expand"]), vec![at(0, 11), at(0, 12), at(0, 13), at(0, 11), at(0, 12), at(0, 13)]);
}

#[test]
fn zip_storage_types_are_read_and_floats_convert_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let t = by_name(read_torch_checkpoint(&zip_version(dir.path(), &["--views"])).unwrap());
    let dtypes: Vec<(&str, Dtype)> = vec![
        ("double", Dtype::F64),
        ("half", Dtype::F16),
        ("bfloat16", Dtype::BF16),
        ("long", Dtype::I64),
        ("int", Dtype::I32),
        ("short", Dtype::I16),
        ("char", Dtype::I8),
        ("byte", Dtype::U8),
        ("bool", Dtype::BOOL),
    ];
    for (name, dtype) in dtypes {
        assert_eq!(t[&format!("dtype.{name}")].dtype, dtype, "{name}");
    }
    let f = |n: &str| f32s(&t[n].clone().into_f32());
    assert_eq!(f("dtype.double"), vec![0.1f64 as f32, -2.5, f32::INFINITY]);
    assert_eq!(f("dtype.half"), vec![0.5, -1.25, 65504.0, 2f32.powi(-24)]);
    assert_eq!(f("dtype.bfloat16"), vec![1.0, -2.5, 3.140625, 2f32.powi(100)]);
    let ints = |n: &str, es: usize| -> Vec<i64> {
        t[n].data
            .chunks_exact(es)
            .map(|c| {
                let mut b = [if c[es - 1] & 0x80 != 0 { 0xff } else { 0 }; 8];
                b[..es].copy_from_slice(c);
                i64::from_le_bytes(b)
            })
            .collect()
    };
    assert_eq!(ints("dtype.long", 8), vec![-(1i64 << 40), 7]);
    assert_eq!(ints("dtype.int", 4), vec![i32::MIN as i64, i32::MAX as i64]);
    assert_eq!(ints("dtype.short", 2), vec![-300, 300]);
    assert_eq!(ints("dtype.char", 1), vec![-128, 127]);
    assert_eq!(t["dtype.byte"].data, vec![0, 255]);
    assert_eq!(t["dtype.bool"].data, vec![1, 0, 1]);
    // Integer tensors are not converted.
    assert_eq!(t["dtype.long"].clone().into_f32().dtype, Dtype::I64);
}

#[test]
fn f16_conversion_covers_special_values() {
    for (bits, v) in [(0x0000u16, 0.0f32), (0x3c00, 1.0), (0xc000, -2.0), (0x7bff, 65504.0), (0x0001, 2f32.powi(-24))] {
        assert_eq!(f16_to_f32(bits), v, "{bits:#06x}");
    }
    assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    assert!(f16_to_f32(0x7e00).is_nan());
}

#[test]
fn damaged_and_foreign_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(mobilenet_pth()).unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    // Cut inside the main pickle, then inside the storages.
    let p = write("cut-pickle.pth", &bytes[..30_000]);
    let err = read_torch_checkpoint(&p).unwrap_err();
    assert!(matches!(err, WeightsError::Pickle { source: pickle::PickleError::Truncated { .. }, .. }), "{err:?}");
    assert!(err.to_string().contains("cut-pickle.pth"), "{err}");
    let p = write("cut-data.pth", &bytes[..bytes.len() - 1000]);
    let err = read_torch_checkpoint(&p).unwrap_err().to_string();
    assert!(err.contains("cut-data.pth") && err.contains("ends inside storage"), "{err}");
    let p = write("text.pth", b"hello, world");
    let err = read_torch_checkpoint(&p).unwrap_err().to_string();
    assert!(err.contains("text.pth") && err.contains("not a torch checkpoint"), "{err}");
    // A pickle that is not a torch file.
    let p = write("plain.pkl", b"\x80\x02K\x07.");
    let err = read_torch_checkpoint(&p).unwrap_err().to_string();
    assert!(err.contains("no legacy magic number"), "{err}");
    let err = read_torch_checkpoint(&dir.path().join("absent.pth")).unwrap_err();
    assert!(matches!(err, WeightsError::Io { .. }) && err.to_string().contains("absent.pth"), "{err}");
}

#[test]
fn import_mobilenet_writes_f32_safetensors_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("mobilenet_v2.safetensors");
    let report = import_checkpoint(&mobilenet_pth(), Arch::MobilenetV2, &dst).unwrap();
    assert_eq!(report.arch, Arch::MobilenetV2);
    assert_eq!(report.num_classes, 1000);
    assert_eq!(report.tensors, MOBILENET_TENSORS - 52);
    assert_eq!(report.parameters, MOBILENET_PARAMETERS);
    assert_eq!(report.ignored.len(), 52);
    assert!(report.ignored.iter().all(|n| n.ends_with(".num_batches_tracked")));
    // Nothing but the file itself is left in the directory.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("mobilenet_v2.safetensors")]);

    let bytes = std::fs::read(&dst).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["arch"], "mobilenet_v2");
    assert_eq!(meta["source"], "mobilenet_v2-b0353104.pth");
    assert_eq!(meta["format"], FORMAT);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensors().len(), report.tensors);
    assert!(st.tensors().iter().all(|(_, v)| v.dtype() == Dtype::F32));
    let original = by_name(read_torch_checkpoint(&mobilenet_pth()).unwrap());
    let w = st.tensor("features.0.0.weight").unwrap();
    assert_eq!(w.shape(), &[32, 3, 3, 3]);
    assert_eq!(w.data(), original["features.0.0.weight"].data.as_slice());
}

#[test]
fn import_of_another_architecture_lists_names_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("wrong.safetensors");
    let err = import_checkpoint(&mobilenet_pth(), Arch::Lenet5, &dst).unwrap_err();
    assert!(matches!(err, WeightsError::DoesNotFit { arch: Arch::Lenet5, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("weights file `mobilenet_v2-b0353104.pth` does not fit lenet5: "), "{msg}");
    assert!(msg.contains("10 missing: conv1.bias [6], conv1.weight [6, 1, 5, 5]"), "{msg}");
    assert!(msg.contains("262 unexpected: classifier.1.bias [1000], classifier.1.weight [1000, 1280]"), "{msg}");
    assert!(msg.contains("features.0.0.weight [32, 3, 3, 3]"), "{msg}");
    assert!(msg.contains("(257 more)"), "{msg}");
    assert!(!dst.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is written on failure");

    let err = import_checkpoint(&mobilenet_pth(), Arch::Resnet18, &dst).unwrap_err().to_string();
    let expected = Network::new(Arch::Resnet18, 1000, Device::Cpu).expected_tensors().len();
    assert!(err.contains(&format!("{expected} missing: bn1.bias [64], ")), "{err}");
    assert!(err.contains("conv1.weight [64, 3, 7, 7]"), "{err}");
    assert!(err.contains("262 unexpected: classifier.1.bias [1000], "), "{err}");
    assert!(!dst.exists());
}

#[test]
fn import_takes_the_class_count_from_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let src = zip_version(dir.path(), &["--head", "10"]);
    let dst = dir.path().join("ten.safetensors");
    let report = import_checkpoint(&src, Arch::MobilenetV2, &dst).unwrap();
    assert_eq!(report.num_classes, 10);
    assert_eq!(report.parameters, MOBILENET_PARAMETERS - 990 * 1281);

    let net = Network::new(Arch::MobilenetV2, 10, Device::Cpu);
    let loaded = load_into(&net, &dst, false).unwrap();
    assert_eq!(loaded.loaded, report.tensors);
    let original = by_name(read_torch_checkpoint(&mobilenet_pth()).unwrap());
    let head = tensor_values(&net.vs.variables()["classifier.1.weight"]);
    assert_eq!(head, f32s(&original["classifier.1.weight"])[..10 * 1280]);

    let imagenet_sized = Network::new(Arch::MobilenetV2, 1000, Device::Cpu);
    let err = load_into(&imagenet_sized, &dst, false).unwrap_err();
    assert!(matches!(err, WeightsError::ClassCount { file_classes: 10, model_classes: 1000, .. }), "{err:?}");
    assert!(err.to_string().contains("have 10 classes and the model 1000"), "{err}");
}

#[test]
fn load_into_copies_every_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = import_mobilenet(dir.path());
    let net = Network::new(Arch::MobilenetV2, 1000, Device::Cpu);
    let report = load_into(&net, &path, false).unwrap();
    assert_eq!(report.loaded, MOBILENET_TENSORS - 52);
    assert!(report.skipped.is_empty());
    let original = by_name(read_torch_checkpoint(&mobilenet_pth()).unwrap());
    let vars = net.vs.variables();
    for name in ["features.0.0.weight", "features.1.conv.0.1.running_var", "classifier.1.weight", "classifier.1.bias"] {
        assert_eq!(tensor_values(&vars[name]), f32s(&original[name]), "{name}");
    }
    // Loading does not make frozen statistics trainable or trainable weights frozen.
    assert!(vars["features.0.0.weight"].requires_grad());
    assert!(!vars["features.0.1.running_mean"].requires_grad());
}

#[test]
fn load_into_with_skip_head_keeps_the_new_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = import_mobilenet(dir.path());
    let net = Network::new(Arch::MobilenetV2, 10, Device::Cpu);
    let vars = net.vs.variables();
    let head_before = tensor_values(&vars["classifier.1.weight"]);
    let report = load_into(&net, &path, true).unwrap();
    assert_eq!(report.skipped, vec!["classifier.1.bias".to_string(), "classifier.1.weight".to_string()]);
    assert_eq!(report.loaded, MOBILENET_TENSORS - 52 - 2);
    assert_eq!(tensor_values(&vars["classifier.1.weight"]), head_before);
    let original = by_name(read_torch_checkpoint(&mobilenet_pth()).unwrap());
    assert_eq!(tensor_values(&vars["features.18.0.weight"]), f32s(&original["features.18.0.weight"]));

    // Without skip_head, the class counts disagree.
    let err = load_into(&net, &path, false).unwrap_err().to_string();
    assert!(err.contains("have 1000 classes and the model 10"), "{err}");
}

#[test]
fn load_into_rejects_another_architecture_and_missing_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = import_mobilenet(dir.path());
    let lenet = Network::new(Arch::Lenet5, 10, Device::Cpu);
    let err = load_into(&lenet, &path, true).unwrap_err();
    assert!(matches!(err, WeightsError::ArchMismatch { model_arch: Arch::Lenet5, .. }), "{err:?}");
    assert!(err.to_string().contains("are for mobilenet_v2, not lenet5"), "{err}");

    // A file without metadata and without one tensor.
    let mut tensors: Vec<(String, RawTensor)> = read_torch_checkpoint(&mobilenet_pth())
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "features.3.conv.1.0.weight")
        .collect();
    tensors.push(("extra.weight".into(), RawTensor { dtype: Dtype::F32, shape: vec![2], data: vec![0; 8] }));
    let partial = dir.path().join("partial.safetensors");
    write_safetensors_atomic(&partial, &tensors, HashMap::new()).unwrap();
    let net = Network::new(Arch::MobilenetV2, 1000, Device::Cpu);
    let err = load_into(&net, &partial, false).unwrap_err().to_string();
    assert!(err.contains("1 missing: features.3.conv.1.0.weight [144, 1, 3, 3]"), "{err}");
    assert!(err.contains("1 unexpected: extra.weight [2]"), "{err}");
}

#[test]
fn fit_details_lists_a_few_names_of_each_kind() {
    let expected: Vec<(String, Vec<i64>)> = (0..8).map(|i| (format!("m{i}"), vec![i])).collect();
    let found = vec![("m0".to_string(), vec![5]), ("x".to_string(), vec![1, 2])];
    let msg = fit_details(&expected, &found).unwrap();
    assert_eq!(
        msg,
        "7 missing: m1 [1], m2 [2], m3 [3], m4 [4], m5 [5], ... (2 more); 1 unexpected: x [1, 2]; \
         1 wrong shape: m0 (model [0], file [5])"
    );
    assert_eq!(fit_details(&expected, &expected), None);
}

#[test]
fn torchscript_archives_are_refused_with_advice() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scripted.pt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in [("scripted/data.pkl", &b"\x80\x02}q\x00."[..]), ("scripted/constants.pkl", b"\x80\x02).")] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap();
    let err = read_torch_checkpoint(&path).unwrap_err().to_string();
    assert!(err.contains("scripted.pt") && err.contains("TorchScript") && err.contains("state_dict()"), "{err}");
}

#[test]
fn a_zip_entry_that_inflates_far_beyond_the_file_is_refused_without_inflating_it() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.pt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).large_file(true);
    // 256 MiB of zeros deflates to about 250 KiB: a ratio far above what torch.save writes.
    zip.start_file("bomb/data.pkl", opts).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        zip.write_all(&zeros).unwrap();
    }
    zip.finish().unwrap();
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert!(file_len < 1 << 20, "{file_len}");
    let t = std::time::Instant::now();
    let err = read_torch_checkpoint(&path).unwrap_err().to_string();
    assert!(err.contains("bomb.pt") && err.contains("entry `bomb/data.pkl` declares 268435456 bytes"), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(2), "refused before inflating: {:?}", t.elapsed());
}
