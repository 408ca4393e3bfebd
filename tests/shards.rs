//! Packed shards end to end with the real binary: synth -> pack -> verify -> read back, and the
//! damage `verify` must name (a truncated shard, a corrupt JPEG), and packing over leftovers.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use thaw_worker::data::shards::{self, ShardIndex};

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The source tree as (class name, file bytes) per file, keyed by bytes for matching.
fn source(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut classes: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    classes.sort();
    for c in classes {
        for f in std::fs::read_dir(&c).unwrap() {
            out.push((
                c.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(f.unwrap().path()).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn pack_verify_and_read_back_every_sample_exactly_once_with_its_label() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("packed"));
    ok(thaw(&["data", "synth", "--classes", "4", "--images", "30", "--out", path(&src), "--seed", "9"]));
    let o = ok(thaw(&["data", "pack", path(&src), "--out", path(&out), "--shard-size", "200KB"]));
    assert!(stdout(&o).contains("packed 30 images of 4 classes"), "{}", stdout(&o));
    let index = ShardIndex::load(&out).unwrap();
    assert!(index.shards.len() > 2, "200 KB shards: {} shards", index.shards.len());
    let o = ok(thaw(&["data", "verify", path(&out)]));
    assert!(stdout(&o).contains("30 samples, 30 decoded, 0 problems"), "{}", stdout(&o));
    let o = ok(thaw(&["data", "inspect", path(&out)]));
    assert!(stdout(&o).contains("30 samples, 4 classes"), "{}", stdout(&o));

    // Read back from the tar members themselves: each source image once, with its folder's class.
    let back = shards::read_all(&out).unwrap();
    assert_eq!(back.len(), 30);
    let mut wanted: BTreeMap<Vec<u8>, String> = source(&src).into_iter().map(|(c, b)| (b, c)).collect();
    for (key, label, bytes) in &back {
        let class = wanted.remove(bytes).unwrap_or_else(|| panic!("{key}: not a source image, or read twice"));
        assert_eq!(index.classes[*label as usize], class, "{key}");
    }
    assert!(wanted.is_empty(), "{} source images missing", wanted.len());
    // The same seed writes the same images.
    let again = dir.path().join("again");
    ok(thaw(&["data", "synth", "--classes", "4", "--images", "30", "--out", path(&again), "--seed", "9"]));
    assert_eq!(source(&src), source(&again));
}

#[test]
fn verify_names_a_truncated_shard_and_a_corrupt_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("packed"));
    ok(thaw(&["data", "synth", "--classes", "2", "--images", "12", "--out", path(&src)]));
    // A JPEG cut short: packed as it is, found by verify under its key.
    let victim = src.join("n00000001").join("img_00000003.JPEG");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 3]).unwrap();
    ok(thaw(&["data", "pack", path(&src), "--out", path(&out), "--shard-size", "150KB"]));
    let index = ShardIndex::load(&out).unwrap();
    let bad_key =
        index.shards.iter().flat_map(|s| &s.samples).find(|e| e.size == (bytes.len() / 3) as u64).unwrap().key.clone();
    let err = fails(thaw(&["data", "verify", path(&out)]));
    assert!(err.contains("1 problems found"), "{err}");
    let o = thaw(&["data", "verify", path(&out)]);
    assert!(stdout(&o).contains(&bad_key) && stdout(&o).contains("cannot decode"), "{}", stdout(&o));

    // A shard cut short: its checksum fails and its lost samples are named.
    let last = index.shards.last().unwrap();
    let shard = out.join(&last.file);
    let data = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &data[..data.len() / 2]).unwrap();
    let o = thaw(&["data", "verify", path(&out), "--json"]);
    assert!(!o.status.success());
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert!(problems
        .iter()
        .any(|p| p["shard"] == last.file.as_str() && p["reason"].as_str().unwrap().contains("checksum")));
    let lost = &last.samples.last().unwrap().key;
    assert!(problems.iter().any(|p| p["key"] == lost.as_str()), "{problems:?}");
}

#[test]
fn packing_restarts_cleanly_over_leftovers_and_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("packed"));
    ok(thaw(&["data", "synth", "--classes", "2", "--images", "6", "--out", path(&src)]));
    // What an interrupted pack leaves: a partial shard and a stale complete-looking one.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("shard-000007.tar.partial"), b"half").unwrap();
    std::fs::write(out.join("shard-000009.tar"), b"stale").unwrap();
    ok(thaw(&["data", "pack", path(&src), "--out", path(&out)]));
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["index.json", "shard-000000.tar"]);
    ok(thaw(&["data", "verify", path(&out)]));

    let err = fails(thaw(&["data", "pack", path(&dir.path().join("nope")), "--out", path(&out)]));
    assert!(err.contains("nope"), "{err}");
    let err = fails(thaw(&["data", "pack", path(&src), "--out", path(&out), "--shard-size", "12XB"]));
    assert!(err.contains("--shard-size 12XB"), "{err}");
    let err = fails(thaw(&["data", "verify", path(&src)]));
    assert!(err.contains("not a packed directory"), "{err}");
}

#[test]
fn fashion_mnist_packs_as_png_with_its_labels() {
    use thaw_worker::data::idx::{IdxDataset, Split};
    use thaw_worker::data::Dataset;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fmnist-test");
    let o = ok(thaw(&[
        "data",
        "pack",
        path(&fashion_mnist()),
        "--split",
        "test",
        "--out",
        path(&out),
        "--shard-size",
        "1MB",
    ]));
    assert!(stdout(&o).contains("packed 10000 images of 10 classes"), "{}", stdout(&o));
    let o = ok(thaw(&["data", "verify", path(&out)]));
    assert!(stdout(&o).contains("10000 samples, 10000 decoded, 0 problems"), "{}", stdout(&o));
    let ds = IdxDataset::open(&fashion_mnist(), Split::Test).unwrap();
    let back = shards::read_all(&out).unwrap();
    assert_eq!(back.len(), ds.len());
    for (i, (key, label, bytes)) in back.iter().enumerate() {
        assert_eq!(*label, ds.label(i), "{key}");
        if i % 997 == 0 {
            // Lossless: the PNG decodes to the IDX pixels.
            let png = image::load_from_memory(bytes).unwrap().to_luma8();
            assert_eq!(png.as_raw(), ds.load(i).unwrap().to_luma8().as_raw(), "{key}");
        }
    }
    let err = fails(thaw(&["data", "pack", path(&fashion_mnist()), "--split", "dev", "--out", path(&out)]));
    assert!(err.contains("--split dev"), "{err}");
}
