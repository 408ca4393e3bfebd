//! Packed shards end to end with the real binary: synth -> pack (shuffled, on threads) -> verify
//! -> read back, splits (a train/val tree, both IDX splits), and the damage `verify` must name (a
//! truncated shard, a corrupt JPEG), and packing over leftovers.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use thaw_worker::data::shards::{self, ShardIndex};

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The source tree in the packer's listing order (classes, then files, sorted): (class name, file
/// bytes) per file, so that a record's `source` indexes it.
fn source(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut classes: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    classes.sort();
    for c in classes {
        let mut files: Vec<_> = std::fs::read_dir(&c).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            out.push((c.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(f).unwrap()));
        }
    }
    out
}

/// Every file of a directory, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    files(dir).into_keys().collect()
}

/// Checks that `out` holds every sample of the tree `src` exactly once, with its class, in the
/// index's order, read back from the tar members; returns the records' sources in order.
fn check_read_back(src: &Path, out: &Path) -> Vec<u32> {
    let index = ShardIndex::load(out).unwrap();
    let want = source(src);
    let back = shards::read_all(out).unwrap();
    assert_eq!(back.len(), want.len());
    assert_eq!(index.num_samples(), want.len());
    let mut seen = vec![false; want.len()];
    for (i, (key, label, bytes)) in back.iter().enumerate() {
        let r = index.record(i);
        assert_eq!(key, &index.key(i));
        assert_eq!(*label, r.label as i64, "{key}");
        let (class, data) = &want[r.source as usize];
        assert!(!std::mem::replace(&mut seen[r.source as usize], true), "{key}: read twice");
        assert_eq!(bytes, data, "{key}");
        assert_eq!(&index.classes[r.label as usize], class, "{key}");
    }
    (0..index.num_samples()).map(|i| index.record(i).source).collect()
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
    assert_eq!(
        names(&out).iter().filter(|n| !n.starts_with("shard-")).collect::<Vec<_>>(),
        ["index.json", "samples.bin"]
    );
    // Shards are contiguous runs of the global order.
    for (s, info) in index.shards.iter().enumerate() {
        assert_eq!(index.shard_of(info.first as usize), s);
        assert_eq!(index.shard_of((info.first + info.count - 1) as usize), s);
    }
    let o = ok(thaw(&["data", "verify", path(&out)]));
    assert!(stdout(&o).contains("30 samples, 30 decoded, 0 problems"), "{}", stdout(&o));
    let o = ok(thaw(&["data", "inspect", path(&out)]));
    assert!(stdout(&o).contains("30 samples, 4 classes") && stdout(&o).contains("index loaded in"), "{}", stdout(&o));

    // Read back from the tar members themselves: each source image once, with its folder's class,
    // in a shuffled order that mixes classes.
    let sources = check_read_back(&src, &out);
    assert_ne!(sources, (0..30).collect::<Vec<u32>>(), "packed in source order");
    let labels: Vec<u32> = (0..30).map(|i| index.record(i).label).collect();
    assert!(labels.windows(2).filter(|w| w[0] != w[1]).count() > 10, "classes not mixed: {labels:?}");
    // The same seed writes the same images.
    let again = dir.path().join("again");
    ok(thaw(&["data", "synth", "--classes", "4", "--images", "30", "--out", path(&again), "--seed", "9"]));
    assert_eq!(source(&src), source(&again));
}

#[test]
fn the_seed_fixes_the_shards_whatever_the_threads_and_no_shuffle_keeps_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    ok(thaw(&["data", "synth", "--classes", "3", "--images", "24", "--out", path(&src)]));
    let pack = |name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.path().join(name);
        let mut args = vec!["data", "pack", path(&src), "--out", path(&out), "--shard-size", "300KB"];
        args.extend_from_slice(extra);
        ok(thaw(&args));
        out
    };
    let one = pack("one", &["--seed", "5", "--threads", "1"]);
    let two = pack("two", &["--seed", "5", "--threads", "2"]);
    let many = pack("many", &["--seed", "5", "--threads", "7"]);
    assert_eq!(files(&one), files(&two), "--threads 1 vs 2");
    assert_eq!(files(&one), files(&many), "--threads 1 vs 7");
    let other = pack("other", &["--seed", "6", "--threads", "2"]);
    assert_ne!(files(&one).get("samples.bin"), files(&other).get("samples.bin"), "seeds 5 and 6");
    check_read_back(&src, &other);

    let plain = pack("plain", &["--no-shuffle"]);
    assert_eq!(check_read_back(&src, &plain), (0..24).collect::<Vec<u32>>());
    let index = ShardIndex::load(&plain).unwrap();
    let labels: Vec<u32> = (0..24).map(|i| index.record(i).label).collect();
    assert!(labels.windows(2).all(|w| w[0] <= w[1]), "{labels:?}");
    assert_eq!(index.key(0), "00000_000000000");
    let err = fails(thaw(&["data", "pack", path(&src), "--out", path(&plain), "--threads", "0"]));
    assert!(err.contains("--threads 0"), "{err}");
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
    let bad = (0..index.num_samples()).find(|&i| index.record(i).size as usize == bytes.len() / 3).unwrap();
    let bad_key = index.key(bad);
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
    let lost = index.key((last.first + last.count - 1) as usize);
    assert!(problems.iter().any(|p| p["key"] == lost.as_str()), "{problems:?}");

    // samples.bin that disagrees with the shards: loading names it.
    let samples = out.join("samples.bin");
    let data = std::fs::read(&samples).unwrap();
    std::fs::write(&samples, &data[..data.len() - 24]).unwrap();
    let err = fails(thaw(&["data", "inspect", path(&out)]));
    assert!(err.contains("samples.bin"), "{err}");
}

#[test]
fn packing_restarts_cleanly_over_leftovers_and_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("packed"));
    ok(thaw(&["data", "synth", "--classes", "2", "--images", "6", "--out", path(&src)]));
    // What an interrupted pack leaves: a partial shard, a stale complete-looking one, a stale
    // samples.bin and the temporary file of an atomic write.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("shard-000007.tar.partial"), b"half").unwrap();
    std::fs::write(out.join("shard-000009.tar"), b"stale").unwrap();
    std::fs::write(out.join("samples.bin"), b"stale").unwrap();
    std::fs::write(out.join(".samples.bin.123-0.tmp"), b"half").unwrap();
    ok(thaw(&["data", "pack", path(&src), "--out", path(&out)]));
    assert_eq!(names(&out), ["index.json", "samples.bin", "shard-000000.tar"]);
    ok(thaw(&["data", "verify", path(&out)]));
    // Packing again over a complete pack gives the same files.
    let before = files(&out);
    ok(thaw(&["data", "pack", path(&src), "--out", path(&out)]));
    assert_eq!(files(&out), before);

    let err = fails(thaw(&["data", "pack", path(&dir.path().join("nope")), "--out", path(&out)]));
    assert!(err.contains("nope"), "{err}");
    let err = fails(thaw(&["data", "pack", path(&src), "--out", path(&out), "--shard-size", "12XB"]));
    assert!(err.contains("--shard-size 12XB"), "{err}");
    let err = fails(thaw(&["data", "pack", path(&src), "--out", path(&out), "--split", "test"]));
    assert!(err.contains("no test split"), "{err}");
    let err = fails(thaw(&["data", "verify", path(&src)]));
    assert!(err.contains("not a packed directory"), "{err}");
}

#[test]
fn a_train_val_tree_packs_into_two_splits_with_trains_classes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("packed"));
    ok(thaw(&["data", "synth", "--classes", "3", "--images", "12", "--out", path(&src.join("train"))]));
    ok(thaw(&["data", "synth", "--classes", "3", "--images", "6", "--out", path(&src.join("val")), "--seed", "1"]));
    // Val lacks the first class: its labels must still be train's.
    std::fs::remove_dir_all(src.join("val").join("n00000000")).unwrap();
    // A previous single-directory pack in `out` must not shadow the splits.
    ok(thaw(&["data", "pack", path(&src.join("train")), "--out", path(&out)]));
    let o = ok(thaw(&["data", "pack", path(&src), "--out", path(&out), "--threads", "2"]));
    assert!(stdout(&o).contains("packed 12 images of 3 classes") && stdout(&o).contains("(train)"), "{}", stdout(&o));
    assert!(stdout(&o).contains("packed 4 images of 3 classes") && stdout(&o).contains("(val)"), "{}", stdout(&o));
    assert!(!out.join("index.json").exists());
    let (train, val) = shards::packed_splits(&out).unwrap();
    assert_eq!((train.clone(), val.clone()), (out.join("train"), Some(out.join("val"))));
    check_read_back(&src.join("train"), &train);
    let val = val.unwrap();
    let index = ShardIndex::load(&val).unwrap();
    assert_eq!(index.classes, ShardIndex::load(&train).unwrap().classes);
    for (key, label, _) in shards::read_all(&val).unwrap() {
        assert!(label == 1 || label == 2, "{key}: label {label}");
        assert!(key.starts_with(&format!("{label:05}_")), "{key}");
    }
    let o = ok(thaw(&["data", "inspect", path(&out)]));
    assert!(
        stdout(&o).contains("12 samples, 3 classes") && stdout(&o).contains("4 samples, 3 classes"),
        "{}",
        stdout(&o)
    );
    let o = ok(thaw(&["data", "verify", path(&out)]));
    assert!(
        stdout(&o).contains("12 decoded, 0 problems") && stdout(&o).contains("4 decoded, 0 problems"),
        "{}",
        stdout(&o)
    );
    let o = ok(thaw(&["data", "inspect", path(&out), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((v["train"]["samples"].as_u64(), v["val"]["samples"].as_u64()), (Some(12), Some(4)));

    // One split into `out` itself.
    let only = dir.path().join("only-val");
    let o = ok(thaw(&["data", "pack", path(&src), "--out", path(&only), "--split", "test"]));
    assert!(stdout(&o).contains("packed 4 images of 3 classes"), "{}", stdout(&o));
    assert_eq!(shards::packed_splits(&only).unwrap(), (only.clone(), None));

    // A val class that train lacks is named.
    std::fs::create_dir_all(src.join("val").join("n00000042")).unwrap();
    std::fs::copy(src.join("val").join("n00000001").join("img_00000001.JPEG"), src.join("val/n00000042/x.jpg"))
        .unwrap();
    let err = fails(thaw(&["data", "pack", path(&src), "--out", path(&out)]));
    assert!(err.contains("n00000042"), "{err}");
}

/// Writes IDX files for `prefix` (`train` or `t10k`): `n` 4x4 images whose pixels encode their
/// index, labels `i % classes`.
fn write_idx(dir: &Path, prefix: &str, n: usize, classes: usize) {
    let mut images = vec![0, 0, 8, 3];
    for d in [n as u32, 4, 4] {
        images.extend_from_slice(&d.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend_from_slice(&(n as u32).to_be_bytes());
    for i in 0..n {
        images.extend((0..16).map(|p| (i * 7 + p) as u8));
        labels.push((i % classes) as u8);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

#[test]
fn an_idx_dataset_packs_both_splits_as_png() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("idx"), dir.path().join("packed"));
    std::fs::create_dir_all(&src).unwrap();
    write_idx(&src, "train", 50, 5);
    write_idx(&src, "t10k", 8, 4);
    let o = ok(thaw(&["data", "pack", path(&src), "--out", path(&out), "--shard-size", "2KB"]));
    assert!(stdout(&o).contains("packed 50 images of 5 classes"), "{}", stdout(&o));
    assert!(stdout(&o).contains("packed 8 images of 5 classes"), "{}", stdout(&o));
    let (train, val) = shards::packed_splits(&out).unwrap();
    let val = val.unwrap();
    for (split, dir, n, classes) in [("train", &train, 50, 5), ("val", &val, 8, 4)] {
        let index = ShardIndex::load(dir).unwrap();
        let back = shards::read_all(dir).unwrap();
        assert_eq!(back.len(), n, "{split}");
        let mut seen = vec![false; n];
        for (i, (key, label, bytes)) in back.iter().enumerate() {
            let s = index.record(i).source as usize;
            assert!(!std::mem::replace(&mut seen[s], true), "{split} {key}");
            assert_eq!(*label, (s % classes) as i64, "{split} {key}");
            assert_eq!(index.ext(i), "png");
            let px = image::load_from_memory(bytes).unwrap().to_luma8();
            assert_eq!(px.as_raw(), &(0..16).map(|p| (s * 7 + p) as u8).collect::<Vec<_>>(), "{split} {key}");
        }
    }
    let o = ok(thaw(&["data", "verify", path(&out)]));
    assert!(
        stdout(&o).contains("50 decoded, 0 problems") && stdout(&o).contains("8 decoded, 0 problems"),
        "{}",
        stdout(&o)
    );
    // Without t10k files: train only, and a stale val is removed.
    std::fs::remove_file(src.join("t10k-images-idx3-ubyte")).unwrap();
    std::fs::remove_file(src.join("t10k-labels-idx1-ubyte")).unwrap();
    ok(thaw(&["data", "pack", path(&src), "--out", path(&out)]));
    assert_eq!(shards::packed_splits(&out).unwrap(), (out.join("train"), None));
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
    let index = ShardIndex::load(&out).unwrap();
    let back = shards::read_all(&out).unwrap();
    assert_eq!(back.len(), ds.len());
    let mut seen = vec![false; ds.len()];
    for (i, (key, label, bytes)) in back.iter().enumerate() {
        let s = index.record(i).source as usize;
        assert!(!std::mem::replace(&mut seen[s], true), "{key}");
        assert_eq!(*label, ds.label(s), "{key}");
        if i % 997 == 0 {
            // Lossless: the PNG decodes to the IDX pixels.
            let png = image::load_from_memory(bytes).unwrap().to_luma8();
            assert_eq!(png.as_raw(), ds.load(s).unwrap().to_luma8().as_raw(), "{key}");
        }
    }
    let err = fails(thaw(&["data", "pack", path(&fashion_mnist()), "--split", "dev", "--out", path(&out)]));
    assert!(err.contains("--split dev"), "{err}");
}
