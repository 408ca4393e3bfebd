//! The packed index at ImageNet scale: 1,281,167 samples over 550 shards and 1000 classes
//! (`samples.bin` + `index.json`, no image data), loaded in well under a few seconds and held in
//! well under 64 MB, and `thaw data inspect` on it.

mod common;

use std::time::Instant;

use common::*;
use thaw_worker::data::shards::{self, ShardIndex};

const SAMPLES: usize = 1_281_167;
const SHARDS: usize = 550;
const CLASSES: usize = 1000;

#[test]
fn an_imagenet_sized_index_loads_fast_and_small() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    shards::write_synthetic_index(dir.path(), SAMPLES, SHARDS, CLASSES).unwrap();
    println!("wrote the synthetic index in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    let bin = std::fs::metadata(dir.path().join("samples.bin")).unwrap().len();
    let json = std::fs::metadata(dir.path().join("index.json")).unwrap().len();
    println!("samples.bin {bin} bytes, index.json {json} bytes");
    assert_eq!(bin, 24 + 24 * SAMPLES as u64);
    assert!(json < 200_000, "index.json is {json} bytes");

    let t = Instant::now();
    let index = ShardIndex::load(dir.path()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let mem = index.memory_bytes();
    println!("loaded {} samples in {:.0} ms, {:.1} MB in memory", index.num_samples(), secs * 1e3, mem as f64 / 1e6);
    assert_eq!(index.num_samples(), SAMPLES);
    assert_eq!((index.shards.len(), index.classes.len()), (SHARDS, CLASSES));
    // Measured: ~30 MB (24 bytes a record); load ~0.1 s in release, a few hundred ms in a debug build.
    assert!(secs < 3.0, "load took {secs:.2} s");
    assert!(mem < 64 << 20, "{mem} bytes in memory");
    assert!(mem >= SAMPLES * 24, "{mem} bytes in memory: the records alone are {}", SAMPLES * 24);

    // First, last, and both sides of every shard boundary.
    let last = SAMPLES - 1;
    assert_eq!(index.shard_of(0), 0);
    assert_eq!(index.shard_of(last), SHARDS - 1);
    for (s, info) in index.shards.iter().enumerate() {
        let (a, b) = (info.first as usize, (info.first + info.count - 1) as usize);
        assert_eq!((index.shard_of(a), index.shard_of(b)), (s, s), "shard {s}");
        assert_eq!(index.record(a).offset, 512, "shard {s} starts at its first member's data");
        if s > 0 {
            assert_eq!(index.shard_of(a - 1), s - 1);
        }
        let r = index.record(b);
        assert!(r.offset + r.size as u64 <= info.bytes);
    }
    assert_eq!(index.shards.iter().map(|s| s.count).sum::<u64>(), SAMPLES as u64);
    for i in [0, 1, 2329, 2330, SAMPLES / 2, last] {
        let r = index.record(i);
        assert_eq!(index.key(i), format!("{:05}_{:09}", r.label, r.source));
        assert_eq!(r.source as usize, SAMPLES - 1 - i);
        assert!((r.label as usize) < CLASSES);
        assert_eq!(index.ext(i), if r.png { "png" } else { "jpg" });
    }
    assert_eq!(index.key(last), format!("{:05}_000000000", index.record(last).label));

    let o = ok(thaw(&["data", "inspect", dir.path().to_str().unwrap()]));
    let out = stdout(&o);
    println!("{out}");
    assert!(out.contains("1281167 samples, 1000 classes") && out.contains("550 shards"), "{out}");
    assert!(out.contains("index loaded in") && out.contains("MB in memory"), "{out}");
}
