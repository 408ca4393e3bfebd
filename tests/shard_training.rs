//! Training from packed shards end to end with the real binary: an ImageNet-shaped tree of real
//! JPEGs and Fashion-MNIST packed, trained from with `thaw train` and `thaw launch --nproc 2`;
//! determinism across runs, corrupt samples skipped and named, the skip limit, and the loader's
//! data wait per step.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A synthetic tree of `images` JPEGs in 4 classes, one of them cut short, packed into small shards.
fn packed_tree(dir: &Path, images: usize) -> std::path::PathBuf {
    let (src, out) = (dir.join("src"), dir.join("packed"));
    ok(thaw(&["data", "synth", "--classes", "4", "--images", &images.to_string(), "--out", path(&src), "--seed", "5"]));
    let victim = src.join("n00000002").join("img_00000006.JPEG");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    ok(thaw(&["data", "pack", path(&src), "--out", path(&out), "--shard-size", "1MB"]));
    out
}

fn photo_spec(name: &str, data: &Path, out: &Path, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nseed = 4\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"shards\"\n\
         root = \"{}\"\nval_fraction = 0.25\nhflip = true\nrandom_resized_crop = true\nread_block = 8\nshuffle_window = 32\n\
         {extra}\n[train]\nepochs = 2\nbatch_size = 8\nlr = 0.05\n[output]\ndir = \"{}\"\n",
        data.display(),
        out.display()
    )
}

/// The checkpoint's tensors (model and optimizer state) by name; its metadata holds timings.
fn checkpoint(out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(name, t)| (name, t.data().to_vec())).collect()
}

#[test]
fn training_from_shards_is_deterministic_and_skips_and_names_a_corrupt_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    let data = packed_tree(dir.path(), 64);
    let mut outputs = Vec::new();
    for run in ["a", "b"] {
        let out = dir.path().join(run);
        let spec = write_spec(dir.path(), run, &photo_spec(run, &data, &out, ""));
        let o = ok(thaw(&["train", path(&spec)]));
        let log = stderr(&o);
        // The truncated JPEG is named by its shard and key, skipped, and counted in its epoch.
        assert!(log.contains("truncated JPEG"), "{log}");
        assert!(log.contains("shard-") && log.contains("skipping unreadable sample"), "{log}");
        let done: Vec<&str> = log.lines().filter(|l| l.contains("epoch done")).collect();
        assert_eq!(done.len(), 2, "{log}");
        assert!(done.iter().all(|l| l.contains("data_wait_ms_per_step")), "{log}");
        outputs.push(checkpoint(&out));
    }
    assert!(outputs[0] == outputs[1], "two runs with the same seed end with identical weights");

    // Stopped mid-epoch and resumed, a run sees the crops, flips and order it would have seen.
    let out = dir.path().join("r");
    let spec = write_spec(dir.path(), "r", &photo_spec("r", &data, &out, ""));
    ok(thaw(&["train", path(&spec), "--max-steps", "3"]));
    ok(thaw(&["train", "--resume", path(&out.join("checkpoint.safetensors"))]));
    assert!(checkpoint(&out) == outputs[0], "a resumed run ends where an uninterrupted one does");

    // Another seed draws other crops, flips and orders.
    let out = dir.path().join("c");
    let spec = write_spec(dir.path(), "c", &photo_spec("c", &data, &out, "").replace("seed = 4", "seed = 5"));
    ok(thaw(&["train", path(&spec)]));
    assert!(checkpoint(&out) != outputs[0]);

    // A shards job over a directory that was never packed is rejected before anything starts.
    let out = dir.path().join("unpacked");
    let spec = write_spec(dir.path(), "unpacked", &photo_spec("unpacked", &dir.path().join("src"), &out, ""));
    let err = fails(thaw(&["train", path(&spec)]));
    assert!(err.contains("not a packed directory") && err.contains("thaw data pack"), "{err}");
    assert!(!out.exists(), "a rejected job writes nothing");

    // Over the limit, the job stops and names the sample.
    let out = dir.path().join("strict");
    let spec = write_spec(dir.path(), "strict", &photo_spec("strict", &data, &out, "max_skipped = 0"));
    let err = fails(thaw(&["train", path(&spec)]));
    assert!(err.contains("data.max_skipped = 0") && err.contains("00002_"), "{err}");
}

#[test]
fn fashion_mnist_from_shards_on_two_workers_with_the_loader_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fmnist");
    let o = ok(thaw(&["data", "pack", path(&fashion_mnist()), "--out", path(&data), "--shard-size", "4MB"]));
    assert!(stdout(&o).contains("train") && stdout(&o).contains("val"), "{}", stdout(&o));
    let out = dir.path().join("out");
    let spec = write_spec(
        dir.path(),
        "fm",
        &format!(
            "name = \"fm-shards\"\nseed = 2\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"shards\"\n\
             root = \"{}\"\ntrain_limit = 6000\nval_limit = 1000\nloader_threads = 1\n[train]\nepochs = 1\nbatch_size = 32\n\
             lr = 0.05\n[distributed]\nworkers = 2\n[output]\ndir = \"{}\"\n",
            data.display(),
            out.display()
        ),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["launch", "--nproc", "2"])
        .arg(&spec)
        .env("THAW_HOME", thaw_home())
        .env("THAW_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let mut log = String::new();
    for e in std::fs::read_dir(out.join("logs")).unwrap() {
        log += &std::fs::read_to_string(e.unwrap().path()).unwrap();
    }
    // Both ranks report their wait for data per step; the loader keeps ahead of LeNet-5.
    let waits: Vec<(f64, f64)> = log
        .lines()
        .filter(|l| l.contains("rank epoch data"))
        .map(|l| (field(l, "data_wait_ms_per_step"), field(l, "step_ms")))
        .collect();
    assert_eq!(waits.len(), 2, "{log}");
    for (wait, step) in &waits {
        assert!(wait < step, "waited {wait} ms for data in a {step} ms step\n{log}");
    }
    // The packed test split also feeds the standalone feature extractor.
    let feats = dir.path().join("feats.safetensors");
    let o = ok(thaw(&[
        "extract",
        "--model",
        "lenet5",
        "--weights",
        "none",
        "--data",
        path(&data),
        "--split",
        "val",
        "--out",
        path(&feats),
    ]));
    assert!(stdout(&o).contains("wrote 10000 features"), "{}", stdout(&o));
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let acc = history[0]["val_acc"].as_f64().unwrap();
    assert!(acc > 0.6, "LeNet-5 learns Fashion-MNIST from shards: val_acc {acc}");
}

/// The number after `name=` in a log line (tracing's `key=value` or `key="value"`).
fn field(line: &str, name: &str) -> f64 {
    let rest = line.split(&format!("{name}=")).nth(1).unwrap_or_else(|| panic!("no {name} in {line}"));
    rest.trim_start_matches('"').split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap().parse().unwrap()
}
