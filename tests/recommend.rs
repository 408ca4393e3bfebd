//! `thaw recommend` end to end: real Fashion-MNIST and torchvision's real ImageNet MobileNetV2,
//! at 32x32 and with a small probe to stay fast; the printed specs must be ready to train.

mod common;
use common::*;
use std::process::{Command, Output};
use thaw_coordinator::spec::JobSpec;

/// `thaw ARGS` as [`common::thaw`] runs it, on one libtorch thread: these tests run side by side,
/// and on a 2-core machine oversubscribed libtorch threads spin (2.4x slower).
fn thaw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(args)
        .env("THAW_HOME", thaw_home())
        .env("THAW_OFFLINE", "1")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run thaw")
}

/// The strategy the README's 2x2 gives a quadrant.
fn quadrant(size: &str, similarity: &str) -> &'static str {
    match (size, similarity) {
        ("small", "high") => "feature_extract",
        ("small", _) => "freeze_bottom",
        ("large", "high") => "finetune_all",
        // Large and different still fine-tunes above the first third of the trunk when pretrained
        // weights exist (issue 16).
        ("large", _) => "freeze_bottom",
        _ => "scratch",
    }
}

fn recommend_fmnist(extra: &[&str]) -> std::process::Output {
    let data = fashion_mnist();
    let mut args = vec!["recommend", "--data", data.to_str().unwrap(), "--model", "mobilenet_v2", "--image-size", "32"];
    args.extend_from_slice(extra);
    ok(thaw(&args))
}

#[test]
fn full_fashion_mnist_is_large_and_the_json_carries_the_measures() {
    let o = recommend_fmnist(&["--probe-samples", "500", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    let d = &v["dataset"];
    assert_eq!(d["train_samples"], 60_000);
    assert_eq!(d["classes"], 10);
    assert_eq!(d["per_class"]["min"], 6_000);
    assert_eq!((d["width"]["median"].as_u64(), d["height"]["max"].as_u64()), (Some(28), Some(28)));
    assert_eq!(d["channels"], "grayscale");
    assert_eq!(v["size"], "large");

    let m = &v["measures"];
    let pre = m["probe_accuracy_pretrained"].as_f64().unwrap();
    let rand = m["probe_accuracy_random"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&pre) && (0.0..=1.0).contains(&rand), "{m}");
    assert!(pre > rand, "ImageNet features should beat random ones on Fashion-MNIST: {m}");
    assert!(pre > 0.5, "10 classes, chance is 0.1: {m}");
    assert_eq!(m["probe_train"].as_u64().unwrap() + m["probe_test"].as_u64().unwrap(), 500);
    let p = m["imagenet_max_prob"].as_f64().unwrap();
    let h = m["imagenet_entropy"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0 && (0.0..=1.0).contains(&h), "{m}");

    let (size, similarity) = (v["size"].as_str().unwrap(), v["similarity"].as_str().unwrap());
    let strategy = v["strategy"].as_str().unwrap();
    assert_eq!(strategy, quadrant(size, similarity));
    assert!(v["reasons"].as_array().is_some_and(|r| r.len() >= 3), "{}", v["reasons"]);

    let spec = JobSpec::from_toml(v["spec_toml"].as_str().unwrap(), &repo()).expect("the spec validates");
    assert_eq!(spec.schedule.name(), strategy);
    assert_eq!(spec.model.arch, "mobilenet_v2");
    assert_eq!(spec.model.weights.as_spec_str(), v["weights"].as_str().unwrap());
    assert_eq!(spec.data.root, fashion_mnist());
    assert_eq!((spec.data.image_size, spec.data.train_limit), (Some(32), None));
    assert_eq!(spec.train.epochs as u64, v["epochs"].as_u64().unwrap());
    assert!((spec.train.lr - v["lr"].as_f64().unwrap()).abs() < 1e-12);
}

#[test]
fn five_hundred_images_are_small_and_the_printed_spec_trains() {
    let o = recommend_fmnist(&["--limit", "500", "--probe-samples", "300"]);
    let text = stdout(&o);
    assert!(text.contains("training images   500 (--limit 500)"), "{text}");
    assert!(text.contains("# quadrant: small data"), "{text}");
    assert!(text.contains("rule  similarity:") && text.contains("linear probe"), "{text}");
    // The whole report is TOML comments: the output itself is the job file.
    let spec = JobSpec::from_toml(&text, &repo()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let strategy = spec.schedule.name();
    assert!(["feature_extract", "freeze_bottom"].contains(&strategy), "small data got {strategy}");
    assert!(text.contains(&format!("-> strategy {strategy}")), "{text}");
    assert_eq!(spec.data.train_limit, Some(500));

    // Ready as printed: `thaw train --check` validates it against the model, data and weights.
    let dir = tempfile::tempdir().unwrap();
    let path = write_spec(dir.path(), "recommended", &text);
    let check = ok(thaw(&["train", "--check", path.to_str().unwrap()]));
    assert!(stdout(&check).contains("is valid"), "{}", stdout(&check));
}

#[test]
fn a_colour_folder_is_measured_and_gets_a_small_data_strategy() {
    let dir = tempfile::tempdir().unwrap();
    for (class, tint) in [("red", [200u8, 30, 30]), ("blue", [30, 30, 200])] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        for i in 0..15u8 {
            let img = image::RgbImage::from_fn(40 + u32::from(i % 3), 30, |x, y| {
                let n = ((x * 7 + y * 13 + u32::from(i) * 29) % 50) as u8;
                image::Rgb([tint[0].saturating_add(n), tint[1].saturating_add(n), tint[2].saturating_add(n)])
            });
            img.save(dir.path().join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let recommend = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["recommend", "--data", dir.path().to_str().unwrap(), "--model", "mobilenet_v2"];
        args.extend(["--probe-samples", "20", "--json"].iter().chain(extra));
        serde_json::from_str(&stdout(&ok(thaw(&args)))).unwrap()
    };
    let v = recommend(&["--image-size", "32"]);
    let d = &v["dataset"];
    assert_eq!(d["format"], "folder");
    assert_eq!(d["channels"], "colour");
    assert_eq!(d["classes"], 2);
    // 30 images, 10% held out for validation.
    assert_eq!(d["train_samples"], 27);
    assert_eq!((d["width"]["min"].as_u64(), d["width"]["max"].as_u64()), (Some(40), Some(42)));
    assert_eq!(d["height"]["median"], 30);
    assert_eq!(v["size"], "small");
    let strategy = v["strategy"].as_str().unwrap();
    assert_eq!(strategy, quadrant("small", v["similarity"].as_str().unwrap()));
    let spec = JobSpec::from_toml(v["spec_toml"].as_str().unwrap(), dir.path()).unwrap();
    assert_eq!(spec.schedule.name(), strategy);

    // Without --image-size, images this small are probed and trained at 64x64, not 224x224.
    let v = recommend(&[]);
    assert_eq!(v["measures"]["image_size"], 64, "{v}");
    assert!(v["reasons"].to_string().contains("the images are small"), "{}", v["reasons"]);
    let spec = JobSpec::from_toml(v["spec_toml"].as_str().unwrap(), dir.path()).unwrap();
    assert_eq!(spec.data.image_size, Some(64));
}

#[test]
fn weights_none_means_scratch_with_a_warning() {
    let data = fashion_mnist();
    let o = ok(thaw(&[
        "recommend",
        "--data",
        data.to_str().unwrap(),
        "--model",
        "lenet5",
        "--weights",
        "none",
        "--limit",
        "2000",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((v["strategy"].as_str(), v["weights"].as_str()), (Some("scratch"), Some("none")));
    assert!(v["measures"].is_null());
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("overfits"), "{reasons}");
    let spec = JobSpec::from_toml(v["spec_toml"].as_str().unwrap(), &repo()).unwrap();
    assert_eq!(spec.model.arch, "lenet5");
}

#[test]
fn bad_input_names_the_value() {
    let data = fashion_mnist();
    let err = fails(thaw(&["recommend", "--data", data.to_str().unwrap(), "--model", "resnt50"]));
    assert!(err.contains("unknown model `resnt50`") && err.contains("mobilenet_v2"), "{err}");

    let missing = tempfile::tempdir().unwrap().path().join("no-such-data");
    let err = fails(thaw(&["recommend", "--data", missing.to_str().unwrap(), "--model", "mobilenet_v2"]));
    assert!(err.contains("no-such-data") && err.contains("does not exist"), "{err}");

    let err = fails(thaw(&["recommend", "--data", data.to_str().unwrap(), "--model", "lenet5"]));
    assert!(err.contains("lenet5 has no ImageNet weights"), "{err}");

    let err = fails(thaw(&[
        "recommend",
        "--data",
        data.to_str().unwrap(),
        "--model",
        "mobilenet_v2",
        "--probe-samples",
        "5",
    ]));
    assert!(err.contains("--probe-samples 5"), "{err}");
}
