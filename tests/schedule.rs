//! Freeze schedules end to end: `thaw plan`, stage boundaries (what the optimizer and the gradient
//! buckets hold), BatchNorm policies, and the feature cache (hits, spilling, invalidation), on real
//! Fashion-MNIST with torchvision's real MobileNetV2 weights.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::*;
use thaw_coordinator::spec::{BnPolicy, JobSpec};
use thaw_worker::buckets::Buckets;
use thaw_worker::train::Trainer;

fn weights_file() -> PathBuf {
    thaw_home().join("weights").join("mobilenet_v2-b0353104.safetensors")
}

/// A MobileNetV2 job on a small seeded subset of Fashion-MNIST at 32x32.
fn job(dir: &Path, name: &str, train: &str, schedule: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let text = format!(
        "name = \"{name}\"\nseed = 3\n[model]\narch = \"mobilenet_v2\"\nweights = \"imagenet\"\n\
         [data]\nformat = \"idx\"\nroot = \"{}\"\nimage_size = 32\ntrain_limit = 320\nval_limit = 96\n\
         [train]\nbatch_size = 64\nlr = 0.01\n{train}\n[schedule]\n{schedule}\n[output]\ndir = \"{}\"\n",
        fashion_mnist().display(),
        out.display()
    );
    (write_spec(dir, name, &text), out)
}

fn tensors(path: &Path) -> HashMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect()
}

/// The model's variables in a checkpoint (optimizer state left out).
fn model_vars(path: &Path) -> HashMap<String, Vec<u8>> {
    tensors(path).into_iter().filter_map(|(n, v)| Some((n.strip_prefix("model.")?.to_string(), v))).collect()
}

#[test]
fn thaw_plan_prints_each_stage_and_rejects_unknown_groups() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, _) = job(
        dir.path(),
        "plan",
        "epochs = 5",
        "strategy = \"progressive\"\nevery = 2\nunfreeze_lr_factor = 0.5\nlayer_decay = 0.1\nbn = \"frozen_stats\"",
    );
    let o = ok(thaw(&["plan", spec.to_str().unwrap(), "--json"]));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let stages = plan["stages"].as_array().unwrap();
    let groups = |s: &serde_json::Value| -> Vec<String> {
        s["trainable_groups"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(stages.len(), 3);
    assert_eq!(groups(&stages[0]), ["head"]);
    assert_eq!(groups(&stages[1]), ["stage7", "head"]);
    assert_eq!(groups(&stages[2]), ["stage6", "stage7", "head"]);
    assert_eq!((stages[2]["first_epoch"].as_u64(), stages[2]["last_epoch"].as_u64()), (Some(5), Some(5)));
    // The head of MobileNetV2 for 10 classes: 1280 x 10 + 10.
    assert_eq!(stages[0]["trainable_parameters"], 12_810);
    let head_lr = |s: &serde_json::Value| s["lr"].as_array().unwrap().last().unwrap()[1].as_f64().unwrap();
    assert_eq!([head_lr(&stages[0]), head_lr(&stages[1]), head_lr(&stages[2])], [0.01, 0.005, 0.0025]);
    // Layer-wise decay: stage7 at a tenth of the head's rate.
    assert!((stages[1]["lr"][0][1].as_f64().unwrap() - 0.0005).abs() < 1e-12, "{}", stages[1]["lr"]);
    assert_eq!(stages[0]["bn"], "frozen_stats");
    assert_eq!(stages[0]["frozen_prefix"], 7);
    let text = stdout(&ok(thaw(&["plan", spec.to_str().unwrap()])));
    assert!(text.contains("stage 2  epochs 3-4") && text.contains("trains stage7, head"), "{text}");

    let (bad, _) = job(dir.path(), "bad", "epochs = 2", "strategy = \"finetune_all\"\nlr_mult = { layer4 = 0.1 }");
    let err = fails(thaw(&["plan", bad.to_str().unwrap()]));
    assert!(err.contains("\"layer4\"") && err.contains("stem, stage2, stage3"), "{err}");
}

#[test]
fn optimizer_and_buckets_hold_exactly_the_trainable_parameters_at_each_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"bounds\"\n[model]\narch = \"mobilenet_v2\"\nweights = \"{}\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
         image_size = 32\ntrain_limit = 128\nval_limit = 32\n[train]\nepochs = 3\nbatch_size = 32\n[schedule]\n\
         strategy = \"stages\"\n[[schedule.stages]]\nepochs = 1\ntrain = [\"head\"]\n\
         [[schedule.stages]]\nepochs = 2\ntrain = {{ top = 3 }}\nbn = \"train_affine\"\n\
         [[schedule.stages]]\nepochs = 3\ntrain = \"all\"\n[output]\ndir = \"{}\"\n",
        weights_file().display(),
        fashion_mnist().display(),
        dir.path().join("out").display()
    );
    let spec = JobSpec::from_toml(&text, Path::new("/")).unwrap();
    let mut t = Trainer::prepare(spec, tch::Device::Cpu).unwrap();
    let stages = t.stages.clone();
    assert_eq!(stages.len(), 3);
    // One step in the first stage, so the head has momentum to keep.
    t.run(Some(1)).unwrap();
    let with_state = |t: &Trainer| -> BTreeSet<String> {
        t.optimizer_state()
            .into_iter()
            .filter_map(|(n, _)| n.strip_suffix(".momentum_buffer").map(str::to_string))
            .collect()
    };
    assert_eq!(with_state(&t), BTreeSet::from(["classifier.1.bias".to_string(), "classifier.1.weight".to_string()]));
    for stage in stages {
        t.set_stage(stage.clone()).unwrap();
        let mut expected = BTreeSet::new();
        for g in 0..t.net.groups().len() {
            let vars = if stage.trainable[g] {
                t.net.group_parameters(g)
            } else if stage.bn == BnPolicy::TrainAffine {
                t.net.bn_parameters(g)
            } else {
                Vec::new()
            };
            expected.extend(vars.into_iter().map(|(n, _)| n));
        }
        let optimized: BTreeSet<String> = t.trainable_names().into_iter().collect();
        assert_eq!(optimized, expected, "stage {}", stage.index + 1);
        let params = t.bucket_params();
        let bucketed: BTreeSet<String> =
            Buckets::new(&params, 1 << 20).parameter_names().into_iter().map(str::to_string).collect();
        assert_eq!(bucketed, expected, "stage {}: buckets", stage.index + 1);
        // The head trains throughout: its momentum survives every boundary.
        assert!(with_state(&t).contains("classifier.1.weight"), "stage {}", stage.index + 1);
        if stage.bn == BnPolicy::TrainAffine {
            // BatchNorm of the frozen stem trains, its convolution does not.
            assert!(expected.contains("features.0.1.weight") && !expected.contains("features.0.0.weight"));
        }
    }
}

#[test]
fn batchnorm_policies_decide_what_moves() {
    let dir = tempfile::tempdir().unwrap();
    let before = tensors(&weights_file());
    // feature_extract + train_affine: the frozen trunk's BatchNorm trains (affine and statistics),
    // its convolutions do not.
    let (spec, out) = job(dir.path(), "affine", "epochs = 1", "strategy = \"feature_extract\"\nbn = \"train_affine\"");
    ok(thaw(&["train", spec.to_str().unwrap()]));
    let after = model_vars(&out.join("checkpoint.safetensors"));
    assert!(after["features.3.conv.0.0.weight"] == before["features.3.conv.0.0.weight"], "frozen conv moved");
    for moved in ["features.3.conv.0.1.weight", "features.3.conv.0.1.bias", "features.3.conv.0.1.running_mean"] {
        assert!(after[moved] != before[moved], "{moved} should train under train_affine");
    }
    // feature_extract + adapt_stats: the frozen trunk's BatchNorm statistics follow the new data,
    // nothing of it learns, and its outputs are not cached (they change).
    let (spec, out) = job(dir.path(), "adabn", "epochs = 1", "strategy = \"feature_extract\"\nbn = \"adapt_stats\"");
    let log = stderr(&ok(thaw(&["train", spec.to_str().unwrap()])));
    assert!(!log.contains("caching the frozen prefix"), "{log}");
    let after = model_vars(&out.join("checkpoint.safetensors"));
    for kept in ["features.3.conv.0.0.weight", "features.3.conv.0.1.weight", "features.3.conv.0.1.bias"] {
        assert!(after[kept] == before[kept], "{kept} moved under adapt_stats");
    }
    assert!(after["features.3.conv.0.1.running_mean"] != before["features.3.conv.0.1.running_mean"]);
    assert!(after["classifier.1.weight"] != before["classifier.1.weight"], "the head trains");
    // finetune_all + frozen_stats: everything trains except the stored statistics.
    let (spec, out) = job(dir.path(), "fstats", "epochs = 1", "strategy = \"finetune_all\"\nbn = \"frozen_stats\"");
    ok(thaw(&["train", spec.to_str().unwrap()]));
    let after = model_vars(&out.join("checkpoint.safetensors"));
    let (mut stats, mut moved) = (0, 0);
    for (n, bytes) in &after {
        if n.ends_with("running_mean") || n.ends_with("running_var") {
            stats += 1;
            assert!(Some(bytes) == before.get(n), "{n} changed under frozen_stats");
        } else if n.ends_with(".weight") && !n.starts_with("classifier") && Some(bytes) != before.get(n) {
            moved += 1;
        }
    }
    assert!(stats > 50 && moved > 50, "{stats} statistics, {moved} trained weights");
}

/// Runs a job three ways (cache in memory, cache spilling to disk, no cache) and returns the three
/// final checkpoints' variables and the cached run's log.
fn three_ways(dir: &Path, name: &str, train: &str, schedule: &str) -> (Vec<HashMap<String, Vec<u8>>>, String, String) {
    let mut vars = Vec::new();
    let mut logs = Vec::new();
    for (tag, mb) in [("mem", "2048"), ("spill", "0.5"), ("off", "0")] {
        let (spec, out) = job(dir, &format!("{name}-{tag}"), &format!("{train}\nfeature_cache_mb = {mb}"), schedule);
        let o = ok(thaw(&["train", spec.to_str().unwrap()]));
        vars.push(model_vars(&out.join("checkpoint.safetensors")));
        logs.push(stderr(&o));
    }
    (vars, logs.remove(0), logs.remove(0))
}

#[test]
fn the_feature_cache_hits_from_the_second_epoch_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (vars, log, spill_log) = three_ways(dir.path(), "fe", "epochs = 3", "strategy = \"feature_extract\"");
    // 320 samples cached in epoch 1, read in epochs 2 and 3.
    assert!(log.contains("320 training entries") && log.contains("640 hits, 0 misses"), "{log}");
    assert!(!spill_log.contains("0 MB on disk") && spill_log.contains("MB on disk"), "{spill_log}");
    assert!(vars[0] == vars[2], "training from cached features differs from training without the cache");
    assert!(vars[1] == vars[2], "features spilled to disk differ");
    // Random flips change the inputs every epoch: no cache.
    let (spec, _) = job(dir.path(), "flips", "epochs = 2", "strategy = \"feature_extract\"");
    let text = std::fs::read_to_string(&spec).unwrap().replace("image_size = 32", "image_size = 32\nhflip = true");
    std::fs::write(&spec, text).unwrap();
    let log = stderr(&ok(thaw(&["train", spec.to_str().unwrap()])));
    assert!(!log.contains("caching the frozen prefix"), "{log}");
}

#[test]
fn a_stage_change_invalidates_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    // Stage 1 (epochs 1-2) freezes 7 groups, stage 2 (epochs 3-4) six: each stage fills a new
    // cache in its first epoch and reads it in its second; the first stage's features, which
    // stage 2 would get wrong, are never reused.
    let (vars, log, _) = three_ways(dir.path(), "prog", "epochs = 4", "strategy = \"progressive\"\nevery = 2");
    assert!(vars[0] == vars[2] && vars[1] == vars[2], "cached progressive training differs");
    let caching: Vec<&str> = log.lines().filter(|l| l.contains("caching the frozen prefix")).collect();
    assert_eq!(caching.len(), 2, "{log}");
    assert!(caching[0].contains("frozen_groups=7") && caching[1].contains("frozen_groups=6"), "{caching:?}");
    let hits: Vec<&str> = log.lines().filter(|l| l.contains("320 hits")).collect();
    assert_eq!(hits.len(), 2, "one cached epoch per stage: {log}");
}

#[test]
fn strategy_auto_is_resolved_by_the_recommendation_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    // 320 images of 10 classes: small data, whatever the similarity.
    let (spec, _) = job(dir.path(), "auto", "epochs = 2", "strategy = \"auto\"");
    let o = ok(thaw(&["plan", spec.to_str().unwrap(), "--json"]));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let strategy = plan["strategy"].as_str().unwrap();
    assert!(["feature_extract", "freeze_bottom"].contains(&strategy), "{strategy}");
    assert!(stderr(&o).contains("strategy \"auto\" resolved"), "{}", stderr(&o));
    assert!(plan["stages"][0]["frozen_prefix"].as_u64().unwrap() >= 1);

    // A spec without an image size takes the recommendation's: 64 for 28x28 images, not 224.
    let text = std::fs::read_to_string(&spec).unwrap().replace("image_size = 32\n", "");
    let open_size = write_spec(dir.path(), "auto-size", &text);
    let o = ok(thaw(&["plan", open_size.to_str().unwrap()]));
    assert!(stderr(&o).contains("image_size=Some(64)"), "{}", stderr(&o));
}

#[test]
fn a_time_budget_ends_the_run_at_a_step_with_an_evaluated_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("budget");
    let text = format!(
        "name = \"budget\"\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
         train_limit = 2000\nval_limit = 200\n[train]\nepochs = 10000\nbatch_size = 32\nlr = 0.05\n\
         [schedule]\nstrategy = \"scratch\"\n[output]\ndir = \"{}\"\n",
        fashion_mnist().display(),
        out.display()
    );
    let spec = write_spec(dir.path(), "budget", &text);
    let started = std::time::Instant::now();
    ok(thaw(&["train", spec.to_str().unwrap(), "--time-budget", "3"]));
    assert!(started.elapsed().as_secs() < 120, "took {:?}", started.elapsed());
    let history: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(!history.is_empty() && history.len() < 10_000, "{} epochs", history.len());
    assert!(history.last().unwrap()["val_acc"].as_f64().unwrap() > 0.0);
    let err = fails(thaw(&["train", spec.to_str().unwrap(), "--time-budget=0"]));
    assert!(err.contains("--time-budget 0"), "{err}");
}
