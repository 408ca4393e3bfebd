//! `thaw train` end to end on real Fashion-MNIST and real weights: learning, checkpoints, exact
//! resume, frozen groups that stay bit-identical, and bad input rejected before anything starts.

mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use thaw_coordinator::spec::{DataFormat, JobSpec};

fn fmnist_spec(name: &str, out: &Path, model: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
seed = 7
[model]
{model}
[data]
format = "idx"
root = "{root}"
{extra}
[output]
dir = "{out}"
"#,
        root = fashion_mnist().display(),
        out = out.display(),
    )
}

/// Writes a Fashion-MNIST job named `name` into `dir`; returns the spec path and its output dir.
fn fmnist_job(dir: &Path, name: &str, model: &str, extra: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    (write_spec(dir, name, &fmnist_spec(name, &out, model, extra)), out)
}

/// Model variables of a checkpoint or weights file, by name (prefix `model.` stripped).
fn tensors(path: &Path) -> HashMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("optim."))
        .map(|(n, v)| (n.strip_prefix("model.").unwrap_or(&n).to_string(), v.data().to_vec()))
        .collect()
}

fn final_accuracy(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("final validation accuracy:"))
        .unwrap_or_else(|| panic!("no accuracy in:\n{stdout}"));
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn lenet5_from_scratch_learns_and_leaves_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, out) = fmnist_job(
        dir.path(),
        "lenet",
        "arch = \"lenet5\"\nweights = \"none\"",
        "train_limit = 4000\nval_limit = 1000\n[train]\nepochs = 2\nbatch_size = 32\nlr = 0.05\n[schedule]\nstrategy = \"scratch\"",
    );
    let o = ok(thaw(&["train", spec.to_str().unwrap()]));
    let acc = final_accuracy(&stdout(&o));
    // 10 classes: chance is 0.10; LeNet-5 reaches ~0.75 on 4000 images in 2 epochs.
    assert!(acc > 0.6, "accuracy {acc}\n{}", stdout(&o));
    assert!(stdout(&o).contains("epoch train_loss"), "{}", stdout(&o));
    assert!(out.join("checkpoint.safetensors").is_file());
    let resolved = std::fs::read_to_string(out.join("spec.toml")).unwrap();
    assert!(
        resolved.contains("strategy = \"scratch\"") && resolved.contains(&fashion_mnist().display().to_string()),
        "{resolved}"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics.as_array().unwrap().len(), 2);
    assert_eq!(metrics[1]["images"], 4000);

    // The checkpoint serves `thaw predict` with the dataset's class names.
    let img = dir.path().join("x.png");
    image::GrayImage::from_pixel(28, 28, image::Luma([128])).save(&img).unwrap();
    let ck = out.join("checkpoint.safetensors");
    let o = ok(thaw(&[
        "predict",
        "--model",
        "lenet5",
        "--weights",
        ck.to_str().unwrap(),
        "--top-k",
        "3",
        "--json",
        img.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["top"].as_array().unwrap().len(), 3);
}

/// Two runs of one LeNet-5 job on 640 images (`data_and_train`: the rest of `[data]`, then
/// `[train]` with 2 epochs of 10 steps): one uninterrupted, one stopped after 13 steps and
/// resumed. Their output directories (whole, split).
fn whole_and_resumed(dir: &Path, data_and_train: &str) -> (PathBuf, PathBuf) {
    let job = |name: &str| {
        fmnist_job(
            dir,
            name,
            "arch = \"lenet5\"\nweights = \"none\"",
            &format!("train_limit = 640\nval_limit = 200\n{data_and_train}\n[schedule]\nstrategy = \"scratch\""),
        )
    };
    let (whole_spec, whole) = job("whole");
    ok(thaw(&["train", whole_spec.to_str().unwrap()]));
    let (split_spec, split) = job("split");
    let o = ok(thaw(&["train", split_spec.to_str().unwrap(), "--max-steps", "13"]));
    assert!(stdout(&o).contains("stopped at epoch 2, step 3"), "{}", stdout(&o));
    let o = ok(thaw(&["train", "--resume", split.join("checkpoint.safetensors").to_str().unwrap()]));
    assert!(stderr(&o).contains("resuming at epoch 2, step 3"), "{}", stderr(&o));
    (whole, split)
}

#[test]
fn resume_mid_epoch_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) = whole_and_resumed(
        dir.path(),
        "hflip = true\n[train]\nepochs = 2\nbatch_size = 64\nlr = 0.05\nnesterov = true\nweight_decay = 0.0001",
    );
    let (a, b) = (tensors(&whole.join("checkpoint.safetensors")), tensors(&split.join("checkpoint.safetensors")));
    assert_eq!(a.len(), b.len());
    for (name, bytes) in &a {
        assert!(Some(bytes) == b.get(name), "variable {name} differs after resume");
    }
}

#[test]
fn weight_averages_are_scored_and_resume_exactly() {
    // `train.ema_decay`: evaluations score the moving average; it is saved with the optimizer
    // state and a run stopped mid-epoch and resumed ends with the same average, bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) =
        whole_and_resumed(dir.path(), "[train]\nepochs = 2\nbatch_size = 64\nlr = 0.05\nema_decay = 0.9");
    let averages = |out: &Path| -> HashMap<String, Vec<u8>> {
        let bytes = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors().into_iter().filter(|(n, _)| n.starts_with("optim.ema.")).map(|(n, v)| (n, v.data().to_vec())).collect()
    };
    let (a, b) = (averages(&whole), averages(&split));
    // Every variable of LeNet-5 (10 tensors) has an average, and the update count is kept:
    // 2 epochs of 10 steps.
    assert_eq!(a.len(), tensors(&whole.join("checkpoint.safetensors")).len() + 1, "{:?}", a.keys());
    assert_eq!(a["optim.ema.updates"], 20f64.to_le_bytes().to_vec());
    for (name, bytes) in &a {
        assert!(Some(bytes) == b.get(name), "average {name} differs after resume");
    }
    let resolved = std::fs::read_to_string(whole.join("spec.toml")).unwrap();
    assert!(resolved.contains("ema_decay = 0.9"), "{resolved}");

    // The run logged the average's score; `thaw eval` scores it too, and `--ema false` the
    // weights as trained, which differ from it.
    let ck = whole.join("checkpoint.safetensors");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("metrics.json")).unwrap()).unwrap();
    let eval = |args: &[&str]| stdout(&ok(thaw(&[&["eval", ck.to_str().unwrap()], args].concat())));
    let field = |line: &str, key: &str| -> f64 {
        line.split(key).nth(1).and_then(|r| r.split([' ', ',']).next()).unwrap().parse().unwrap()
    };
    let (averaged, trained) = (eval(&[]), eval(&["--ema", "false"]));
    assert!(averaged.contains("averaged weights") && trained.contains("weights as trained"), "{averaged}\n{trained}");
    let logged = metrics[1]["val_acc"].as_f64().unwrap();
    assert!((field(&averaged, "accuracy ") - logged).abs() < 1e-3, "eval {averaged} vs the run's {logged}");
    assert!(field(&averaged, "loss ") != field(&trained, "loss "), "{averaged}\n{trained}");

    // A checkpoint of a run without averages cannot be asked for one.
    let (plain_spec, plain) = fmnist_job(
        dir.path(),
        "plain",
        "arch = \"lenet5\"\nweights = \"none\"",
        "train_limit = 64\nval_limit = 64\n[train]\nepochs = 1\nbatch_size = 64\n[schedule]\nstrategy = \"scratch\"",
    );
    ok(thaw(&["train", plain_spec.to_str().unwrap()]));
    let o = thaw(&["eval", plain.join("checkpoint.safetensors").to_str().unwrap(), "--ema", "true"]);
    assert!(!o.status.success() && stderr(&o).contains("train.ema_decay"), "{}", stderr(&o));

    // Ensembles (`thaw eval A B`). A model with itself scores what it scores alone.
    let twice = eval(&[ck.to_str().unwrap()]);
    assert!(twice.contains("ensemble of 2") && twice.contains("test: 200 images"), "{twice}");
    let last = |out: &str| out.lines().last().unwrap().to_string();
    assert_eq!(twice.lines().filter(|l| l.starts_with("member ")).count(), 2, "{twice}");
    assert!((field(&last(&twice), "accuracy ") - field(&averaged, "accuracy ")).abs() < 1e-9, "{twice}\n{averaged}");
    assert!((field(&last(&twice), "loss ") - field(&averaged, "loss ")).abs() < 1e-3, "{twice}\n{averaged}");
    // With a different model on the same 200 images, the probabilities are averaged: by Jensen's
    // inequality the ensemble's loss is at most the mean of its members'.
    let (other_spec, other) = fmnist_job(
        dir.path(),
        "other",
        "arch = \"lenet5\"\nweights = \"none\"",
        "train_limit = 64\nval_limit = 200\n[train]\nepochs = 1\nbatch_size = 64\n[schedule]\nstrategy = \"scratch\"",
    );
    ok(thaw(&["train", other_spec.to_str().unwrap()]));
    let pair = eval(&[other.join("checkpoint.safetensors").to_str().unwrap()]);
    let members: Vec<f64> = pair.lines().filter(|l| l.starts_with("member ")).map(|l| field(l, "loss ")).collect();
    assert_eq!(members.len(), 2, "{pair}");
    let ensemble = field(&last(&pair), "loss ");
    assert!(ensemble <= (members[0] + members[1]) / 2.0 + 1e-4, "{pair}");
    assert!((ensemble - members[0]).abs() > 1e-4 && (ensemble - members[1]).abs() > 1e-4, "{pair}");
    // Members scored on different images are an error naming both.
    let o = thaw(&["eval", ck.to_str().unwrap(), plain.join("checkpoint.safetensors").to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("scores another split than") && err.contains("64 test images"), "{err}");
}

#[test]
fn frozen_groups_stay_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let imported = thaw_home().join("weights").join("mobilenet_v2-b0353104.safetensors");
    let before = tensors(&imported);
    for (name, schedule, frozen_prefixes) in [
        ("head-only", "strategy = \"feature_extract\"", &["features."][..]),
        (
            "bottom3",
            "strategy = \"freeze_bottom\"\nk = 3",
            &["features.0.", "features.1.", "features.2.", "features.3.", "features.4.", "features.5.", "features.6."]
                [..],
        ),
    ] {
        let (spec, out) = fmnist_job(
            dir.path(),
            name,
            "arch = \"mobilenet_v2\"\nweights = \"imagenet\"",
            &format!("image_size = 32\ntrain_limit = 192\nval_limit = 64\n[train]\nepochs = 1\nbatch_size = 64\nlr = 0.01\n[schedule]\n{schedule}"),
        );
        ok(thaw(&["train", spec.to_str().unwrap()]));
        let after = tensors(&out.join("checkpoint.safetensors"));
        let mut frozen = 0;
        let mut trained_changed = 0;
        for (n, bytes) in &after {
            let is_frozen = frozen_prefixes.iter().any(|p| n.starts_with(p));
            if is_frozen {
                frozen += 1;
                assert!(Some(bytes) == before.get(n), "{name}: frozen {n} changed");
            } else if !n.starts_with("classifier.") && before.get(n) != Some(bytes) {
                trained_changed += 1;
            }
        }
        assert!(frozen > 0);
        if name == "bottom3" {
            // features.7.. train: their weights and BatchNorm statistics move.
            assert!(trained_changed > 50, "{name}: only {trained_changed} trainable tensors changed");
        } else {
            assert_eq!(trained_changed, 0);
        }
        assert_eq!(after["classifier.1.weight"].len(), 10 * 1280 * 4, "head rebuilt for 10 classes");
    }
}

#[test]
fn corrupt_images_are_skipped_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shapes");
    for split in ["train", "val"] {
        for (class, color) in [("red", [220u8, 20, 20]), ("blue", [20, 20, 220])] {
            let d = data.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..8u8 {
                let mut img = image::RgbImage::from_pixel(40, 30, image::Rgb(color));
                img.put_pixel(i as u32, 0, image::Rgb([i * 30, 255, 0]));
                img.save(d.join(format!("{i}.jpg"))).unwrap();
            }
        }
    }
    let good = std::fs::read(data.join("train/red/0.jpg")).unwrap();
    std::fs::write(data.join("train/red/truncated.jpg"), &good[..good.len() / 2]).unwrap();
    let out = dir.path().join("run");
    let spec = write_spec(
        dir.path(),
        "shapes",
        &format!(
            "name = \"shapes\"\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"folder\"\nroot = \"shapes\"\n[train]\nepochs = 1\nbatch_size = 4\n[output]\ndir = \"{}\"\n",
            out.display()
        ),
    );
    let o = ok(thaw(&["train", spec.to_str().unwrap()]));
    let s = stdout(&o);
    assert!(s.contains("skipped 1 unreadable samples") && s.contains("truncated.jpg"), "{s}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics[0]["images"], 16);
    assert_eq!(metrics[0]["skipped"], 1);
}

#[test]
fn bad_jobs_are_rejected_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let imported: PathBuf = thaw_home().join("weights").join("mobilenet_v2-b0353104.safetensors");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "missing-data",
            fmnist_spec("missing-data", &out, "arch = \"lenet5\"\nweights = \"none\"", "")
                .replace(&fashion_mnist().display().to_string(), "/nonexistent/fmnist"),
            vec!["/nonexistent/fmnist", "does not exist"],
        ),
        (
            "zero-classes",
            fmnist_spec("zero-classes", &out, "arch = \"lenet5\"\nweights = \"none\"\nnum_classes = 0", ""),
            vec!["model.num_classes", "= 0"],
        ),
        (
            "unknown-arch",
            fmnist_spec("unknown-arch", &out, "arch = \"resnt50\"", ""),
            vec!["unknown model `resnt50`", "resnet50"],
        ),
        (
            "bad-precision",
            fmnist_spec("bad-precision", &out, "arch = \"lenet5\"\nweights = \"none\"", "[train]\nprecision = \"fp8\""),
            vec!["fp8", "fp32", "bf16", "fp16"],
        ),
        (
            "typo-field",
            fmnist_spec("typo-field", &out, "arch = \"lenet5\"\nweights = \"none\"", "[train]\nepochz = 3"),
            vec!["epochz"],
        ),
        (
            "wrong-weights",
            fmnist_spec(
                "wrong-weights",
                &out,
                &format!("arch = \"resnet18\"\nweights = \"{}\"", imported.display()),
                "",
            ),
            vec!["resnet18", "mobilenet_v2"],
        ),
        (
            "unknown-group",
            fmnist_spec(
                "unknown-group",
                &out,
                "arch = \"lenet5\"\nweights = \"imagenet\"",
                "[schedule]\nstrategy = \"freeze\"\ngroups = [\"layer9\"]",
            ),
            vec!["\"layer9\"", "conv, fc, head"],
        ),
        (
            "too-few-classes",
            fmnist_spec("too-few-classes", &out, "arch = \"lenet5\"\nweights = \"none\"\nnum_classes = 5", ""),
            vec!["num_classes = 5", "10 classes"],
        ),
    ];
    for (name, text, expect) in cases {
        let spec = write_spec(dir.path(), name, &text);
        let err = fails(thaw(&["train", spec.to_str().unwrap()]));
        for e in expect {
            assert!(err.contains(e), "{name}: `{e}` not in: {err}");
        }
        assert!(!out.exists(), "{name}: the rejected job wrote {}", out.display());
    }
}

#[test]
fn bf16_and_fp16_train_on_cpu_close_to_fp32() {
    // LeNet-5 from scratch, the same job in each precision: autocast computes the convolutions
    // and matrix products in the reduced type; the weights, gradients and the optimizer stay f32.
    let dir = tempfile::tempdir().unwrap();
    let run = |precision: &str| {
        let (spec, out) = fmnist_job(
            dir.path(),
            precision,
            "arch = \"lenet5\"\nweights = \"none\"",
            &format!(
                "train_limit = 4000\nval_limit = 1000\n[train]\nepochs = 2\nbatch_size = 32\nlr = 0.05\n\
                 precision = \"{precision}\"\n[schedule]\nstrategy = \"scratch\""
            ),
        );
        let o = ok(thaw(&["train", spec.to_str().unwrap()]));
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
        let loss = |e: usize| metrics[e]["train_loss"].as_f64().unwrap();
        assert!(loss(1) < loss(0) && loss(0) < 10f64.ln(), "{precision}: the loss goes down: {metrics}");
        let resolved = std::fs::read_to_string(out.join("spec.toml")).unwrap();
        assert!(resolved.contains(&format!("precision = \"{precision}\"")), "{resolved}");
        (final_accuracy(&stdout(&o)), out)
    };
    let (fp32, _) = run("fp32");
    let (bf16, _) = run("bf16");
    let (fp16, out) = run("fp16");
    assert!(fp32 > 0.6, "fp32 learns: {fp32}");
    assert!((bf16 - fp32).abs() < 0.05, "bf16 {bf16} is close to fp32 {fp32}");
    assert!((fp16 - fp32).abs() < 0.05, "fp16 {fp16} is close to fp32 {fp32}");
    // fp16's loss scale is part of the state: in the checkpoint, and positive.
    let bytes = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let scale = st.tensor("optim.amp.loss_scale").expect("the loss scale is saved");
    let scale = f64::from_le_bytes(scale.data()[..8].try_into().unwrap());
    assert!(scale > 0.0 && scale <= 65536.0, "{scale}");
}

#[test]
fn progressive_sizes_train_each_epoch_at_its_size_with_random_shifts_erasing_and_cutmix() {
    // MobileNetV2 (any input size) at 16 pixels in epoch 1, then at image_size (24) in epoch 2,
    // with random shifts, random erasing and CutMix; each epoch is evaluated at the size it
    // trained at.
    let dir = tempfile::tempdir().unwrap();
    let (spec, out) = fmnist_job(
        dir.path(),
        "progressive",
        "arch = \"mobilenet_v2\"\nweights = \"none\"",
        "image_size = 24\nprogressive_sizes = [16]\nrandom_shift = 2\nrandom_erase = 0.5\ncutmix = 0.5\nhflip = true\ntrain_limit = 512\nval_limit = 256\n\
         [train]\nepochs = 2\nbatch_size = 32\nlr = 0.05\n[schedule]\nstrategy = \"scratch\"",
    );
    let o = ok(thaw(&["train", spec.to_str().unwrap()]));
    let log = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    let sizes: Vec<&str> = log.lines().filter(|l| l.contains("input size")).collect();
    assert!(sizes.len() == 2, "one size line per change:\n{log}");
    assert!(sizes[0].contains("epoch=1") && sizes[0].contains("image_size=16"), "{}", sizes[0]);
    assert!(sizes[1].contains("epoch=2") && sizes[1].contains("image_size=24"), "{}", sizes[1]);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics.as_array().map(Vec::len), Some(2), "{metrics}");
    assert!(metrics[1]["train_loss"].as_f64().is_some_and(f64::is_finite), "{metrics}");
    let resolved = std::fs::read_to_string(out.join("spec.toml")).unwrap();
    assert!(resolved.contains("progressive_sizes = [16]") && resolved.contains("random_shift = 2"), "{resolved}");
    assert!(resolved.contains("random_erase = 0.5") && resolved.contains("cutmix = 0.5"), "{resolved}");

    // `thaw eval` scores the checkpoint at the final size, flips on and off; the plain score is
    // the one the last epoch logged (the spec has no test-time flips).
    let ck = out.join("checkpoint.safetensors");
    let eval = |flips: &str| stdout(&ok(thaw(&["eval", ck.to_str().unwrap(), "--tta-hflip", flips])));
    let (plain, flipped) = (eval("false"), eval("true"));
    assert!(plain.contains("test: 256 images") && plain.contains("24x24 inputs"), "{plain}");
    assert!(flipped.contains("test-time flips on"), "{flipped}");
    let acc = |line: &str| -> f64 {
        line.split("accuracy ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap()
    };
    let logged = metrics[1]["val_acc"].as_f64().unwrap();
    assert!((acc(&plain) - logged).abs() < 1e-3, "eval {plain} vs the run's {logged}");
    // Precise BatchNorm statistics: recomputed over 4 batches of the training split (logged),
    // then scored; the statistics change, so the loss does.
    let precise = thaw(&["eval", ck.to_str().unwrap(), "--tta-hflip", "false", "--precise-bn", "4"]);
    let (out_p, err_p) = (stdout(&ok(precise.clone())), String::from_utf8_lossy(&precise.stderr).into_owned());
    assert!(err_p.contains("recomputed BatchNorm statistics") && err_p.contains("batches=4"), "{err_p}");
    let loss = |line: &str| -> f64 {
        line.split("loss ").nth(1).and_then(|r| r.split(',').next()).unwrap().parse().unwrap()
    };
    assert!((loss(&out_p) - loss(&plain)).abs() > 1e-4, "precise statistics changed nothing: {out_p} / {plain}");
    // Test-time sizes: the images also scored resized to 32x32, the logits averaged; a side out
    // of range is refused, naming it.
    let sized = stdout(&ok(thaw(&["eval", ck.to_str().unwrap(), "--tta-hflip", "false", "--tta-sizes", "32"])));
    assert!(sized.contains("24x24 inputs and resized to [32]"), "{sized}");
    assert!((loss(&sized) - loss(&plain)).abs() > 1e-4, "the second side changed nothing: {sized} / {plain}");
    let bad = thaw(&["eval", ck.to_str().unwrap(), "--tta-sizes", "32,5000"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--tta-sizes 5000"));
    let many = thaw(&["eval", ck.to_str().unwrap(), "--tta-sizes", "40,48,56,72,80"]);
    let err = String::from_utf8_lossy(&many.stderr);
    assert!(!many.status.success() && err.contains("--tta-sizes [40, 48, 56, 72, 80]: takes at most 4"), "{err}");
    let missing = thaw(&["eval", "/nonexistent/checkpoint.safetensors"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/checkpoint.safetensors"));
}

#[test]
fn example_specs_parse_and_ablations_choose_on_a_holdout() {
    // The README's recipes are files users run as they are: each parses, and finds the data set-up
    // unpacks. The ablations were chosen on a holdout, never on the test images.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let specs = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        v
    };
    let ablations = specs(&examples.join("ablations"));
    assert!(ablations.len() >= 4, "{ablations:?}");
    for path in specs(&examples).iter().chain(&ablations) {
        let spec = JobSpec::from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if spec.data.format == DataFormat::Idx {
            let images = spec.data.root.join("train-images-idx3-ubyte.gz");
            assert!(images.exists(), "{}: no {}", path.display(), images.display());
        }
    }
    for path in &ablations {
        let spec = JobSpec::from_file(path).unwrap();
        assert_eq!(spec.data.holdout, Some(0.1), "{}", path.display());
    }
}
