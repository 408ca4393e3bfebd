//! `thaw weights` and `thaw models` end to end.

mod common;
use common::*;

#[test]
fn importing_weights_for_another_architecture_names_the_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let pth = setup_file("weights/mobilenet_v2-b0353104.pth");
    let err = fails(thaw(&[
        "weights",
        "import",
        pth.to_str().unwrap(),
        "--arch",
        "resnet18",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("resnet18"), "{err}");
    assert!(err.contains("conv1.weight [64, 3, 7, 7]"), "missing tensors are named with shapes: {err}");
    assert!(err.contains("features.0.0.weight [32, 3, 3, 3]"), "unexpected tensors are named with shapes: {err}");
    assert!(!out.exists(), "a rejected import writes nothing");
}

#[test]
fn a_truncated_checkpoint_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("cut.pth");
    let bytes = std::fs::read(setup_file("weights/mobilenet_v2-b0353104.pth")).unwrap();
    std::fs::write(&pth, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("x.safetensors");
    let err = fails(thaw(&[
        "weights",
        "import",
        pth.to_str().unwrap(),
        "--arch",
        "mobilenet_v2",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("cut.pth"), "{err}");
    assert!(!out.exists());
}

#[test]
fn weights_path_reports_the_cache_entry() {
    let o = ok(thaw(&["weights", "path", "--arch", "mobilenet_v2"]));
    assert!(stdout(&o).contains("mobilenet_v2-b0353104.safetensors (present)"), "{}", stdout(&o));
    let o = ok(thaw(&["weights", "path", "--arch", "vgg16"]));
    assert!(stdout(&o).contains("vgg16-397923af.safetensors (absent)"), "{}", stdout(&o));
    let err = fails(thaw(&["weights", "path", "--arch", "lenet5"]));
    assert!(err.contains("lenet5 has no ImageNet weights"), "{err}");
}

#[test]
fn models_lists_every_architecture_with_published_sizes() {
    let o = ok(thaw(&["models", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let params =
        |arch: &str| v.as_array().unwrap().iter().find(|r| r["arch"] == arch).unwrap()["parameters"].as_i64().unwrap();
    assert_eq!(params("resnet50"), 25_557_032);
    assert_eq!(params("vgg16"), 138_357_544);
    assert_eq!(params("mobilenet_v2"), 3_504_872);
    assert_eq!(params("lenet5"), 61_706);
    assert_eq!(params("efficientnet_lite0"), 4_652_008);
    assert_eq!(v.as_array().unwrap().len(), 10);
}
