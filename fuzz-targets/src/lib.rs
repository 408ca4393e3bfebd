//! One fuzz harness per reader of outside bytes: `fn(&[u8])`, called by the stable-Rust driver
//! (`tests/fuzz.rs`: the regression corpus and a short deterministic mutation run, in CI) and by
//! cargo-fuzz (`../fuzz`, coverage-guided, for the long runs of `scripts/fuzz.sh`).
//!
//! A harness feeds its input to a reader exactly as thaw does and looks at what comes back. It
//! must never panic: every reader returns an error on any input, so a panic (or an abort, a stack
//! overflow, memory or time out of proportion to the input) is a bug in the reader, found.
//! Harnesses may assert invariants of what a reader accepted (a tensor's bytes match its shape, a
//! spec round-trips): a broken invariant is a finding too.
//!
//! Readers that take several files get them from one input cut at [`SPLIT`], so that each part
//! mutates on its own; the seeds under `fuzz/seeds/<target>/` are real files joined that way.
//!
//! Nothing here writes outside a temporary directory or talks to the network.

use std::path::Path;

pub mod mutate;

/// Separates the files of a multi-file input (see [`parts`]).
pub const SPLIT: &[u8] = b"\n--THAW-FUZZ-SPLIT--\n";

/// Every target: its name (the directory under `fuzz/seeds` and `fuzz/regressions`, and the
/// cargo-fuzz target) and its harness.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("pickle", pickle),
    ("torch_checkpoint", torch_checkpoint),
    ("safetensors", safetensors),
    ("shard_index", shard_index),
    ("shard_tar", shard_tar),
    ("idx", idx),
    ("image_decode", image_decode),
    ("job_spec", job_spec),
    ("grpc_core", grpc_core::run),
];

/// The harness of `name`.
pub fn harness(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// The first `n` parts of `data` cut at [`SPLIT`] (missing parts are empty; the last part takes
/// the rest, separators included).
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(SPLIT.len()).position(|w| w == SPLIT) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + SPLIT.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[]);
    out
}

/// Joins files into one input (the inverse of [`parts`]).
pub fn join(files: &[&[u8]]) -> Vec<u8> {
    files.join(SPLIT)
}

/// The pickle VM: one pickle, then a stream of pickles as the legacy torch format holds them.
pub fn pickle(data: &[u8]) {
    use thaw_worker::weights::pickle;
    if let Ok((v, pids)) = pickle::loads(data) {
        // Debug output is what error messages show: bounded whatever the value.
        let shown = format!("{v:?} {pids:?}");
        assert!(
            shown.len() <= 64 * 1024 + 64 * data.len(),
            "Debug of a {}-byte pickle is {} bytes",
            data.len(),
            shown.len()
        );
        let _ = (v.type_name(), v.as_seq(), v.dict_get("state_dict"), v.global_name());
    }
    let mut r = data;
    for _ in 0..8 {
        if pickle::load(&mut r).is_err() {
            break;
        }
    }
}

/// Both torch checkpoint formats (zip and legacy), through the bytes entry point.
pub fn torch_checkpoint(data: &[u8]) {
    let Ok(tensors) = thaw_worker::weights::read_torch_checkpoint_bytes(Path::new("fuzz.pth"), data) else { return };
    for (name, t) in tensors {
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let want = numel.and_then(|n| n.checked_mul(t.dtype.bitsize() / 8));
        assert_eq!(
            want,
            Some(t.data.len()),
            "tensor `{name}`: {:?} {:?} with {} bytes",
            t.dtype,
            t.shape,
            t.data.len()
        );
        let _ = t.into_f32();
    }
}

/// Safetensors bytes as a weights file and as a checkpoint received from a source rank.
pub fn safetensors(data: &[u8]) {
    let _ = thaw_worker::tensor_io::parse_safetensors(data);
    let _ = thaw_worker::checkpoint::Checkpoint::from_bytes(data);
}

/// A packed directory's `index.json` and `samples.bin`.
pub fn shard_index(data: &[u8]) {
    let p = parts(data, 2);
    let Ok(index) = thaw_worker::data::shards::ShardIndex::from_bytes(Path::new("/fuzz"), p[0], p[1]) else {
        return;
    };
    for i in 0..index.num_samples().min(1024) {
        let s = index.shard_of(i);
        assert!(s < index.shards.len());
        let r = index.record(i);
        assert!(r.offset.checked_add(u64::from(r.size)).is_some_and(|e| e <= index.shards[s].bytes));
        let _ = (index.key(i), index.ext(i));
    }
    let _ = index.memory_bytes();
}

thread_local! {
    static SCRATCH_DIR: std::cell::RefCell<Option<tempfile::TempDir>> = const { std::cell::RefCell::new(None) };
}

/// A packed directory on disk: `index.json`, `samples.bin` and one shard's tar, read back by
/// every reader of packed data (the training dataset's positioned reads, `verify`, `read_all`).
pub fn shard_tar(data: &[u8]) {
    use thaw_worker::data::{sharded::ShardDataset, shards, Dataset};
    let p = parts(data, 3);
    SCRATCH_DIR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let Some(dir) = cell.as_ref().map(|d| d.path().to_path_buf()).or_else(|| {
            *cell = tempfile::Builder::new().prefix("thaw-fuzz-").tempdir().ok();
            cell.as_ref().map(|d| d.path().to_path_buf())
        }) else {
            return;
        };
        for (name, bytes) in [("index.json", p[0]), ("samples.bin", p[1]), ("shard-000000.tar", p[2])] {
            if std::fs::write(dir.join(name), bytes).is_err() {
                return;
            }
        }
        if let Ok(ds) = ShardDataset::open(&dir) {
            for i in 0..ds.len().min(16) {
                let _ = (ds.key(i), ds.label(i), ds.load(i), ds.encoded(i));
                ds.will_need(&[i]);
            }
        }
        let _ = shards::verify(&dir);
        let _ = shards::read_all(&dir);
    });
}

/// An IDX split: images and labels files, raw or gzip'd.
pub fn idx(data: &[u8]) {
    use thaw_worker::data::{idx::IdxDataset, idx::Split, Dataset};
    let p = parts(data, 2);
    let images = (Path::new("train-images-idx3-ubyte"), p[0]);
    let labels = (Path::new("train-labels-idx1-ubyte"), p[1]);
    let Ok(ds) = IdxDataset::from_bytes(Split::Train, images, labels) else { return };
    for i in 0..ds.len().min(16) {
        let _ = (ds.load(i), ds.label(i), ds.key(i));
    }
    let _ = ds.class_names();
}

/// JPEG/PNG decoding: `decode_image` (packing, verify, one-process loading) and the augmentation
/// pipeline's own decoders (zune-jpeg, jpeg-decoder's DCT scaling, png) with each crop mode.
pub fn image_decode(data: &[u8]) {
    use thaw_worker::data::decode::{Augment, CropMode};
    let _ = thaw_worker::data::decode_image(data);
    let key = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let rgb = |size, crop| Augment {
        size,
        crop,
        hflip: true,
        channels: 3,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let augments = [
        rgb(64, CropMode::RandomResized { scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) }),
        rgb(32, CropMode::Center { resize: 40 }),
        Augment { size: 28, crop: CropMode::Whole, hflip: false, channels: 1, mean: vec![0.5], std: vec![0.5] },
    ];
    for a in &augments {
        let mut out = vec![0f32; a.sample_len()];
        if a.apply_encoded(data, key, &mut out).is_ok() {
            assert!(out.iter().all(|x| x.is_finite()), "non-finite output for {:?}", a.crop);
        }
    }
}

/// Layer groups of a ResNet, for expanding a spec's schedule as a worker's join does.
const GROUPS: &[&str] = &["stem", "layer1", "layer2", "layer3", "layer4", "head"];

/// A job spec (TOML): parsed and validated, written back and parsed again to the same spec,
/// its schedule expanded and its first plans made.
pub fn job_spec(data: &[u8]) {
    use thaw_coordinator::spec::JobSpec;
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(spec) = JobSpec::from_toml(text, Path::new("/fuzz")) else { return };
    let again = spec.to_toml();
    match JobSpec::from_toml(&again, Path::new("/elsewhere")) {
        Ok(back) => assert_eq!(back, spec, "the resolved spec does not round-trip:\n{again}"),
        Err(e) => panic!("the resolved spec does not parse again: {e}\n{again}"),
    }
    if let Ok(stages) = spec.schedule.expand(GROUPS, &spec.train) {
        for epoch in [0, 1, u32::try_from(spec.train.epochs.saturating_sub(1)).unwrap_or(u32::MAX)] {
            if let Ok(info) = thaw_coordinator::core::PlanInfo::for_spec(&spec, &stages, epoch, 1000, 2, None) {
                let _ = info.plan();
            }
        }
    }
}

pub mod grpc_core;
