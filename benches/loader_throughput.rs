//! The training loader end to end (read + decode + RandomResizedCrop(224) + flip + normalize +
//! batching into tensors), from packed shards against the same images as a loose folder of JPEG
//! files, in the same run.
//!
//! An ImageNet-shaped tree of real JPEGs (about 500x375) is written with `thaw data synth` and
//! packed with `thaw data pack` (64 MB shards). Each source then feeds one epoch through
//! [`Loader`] with the thread counts below, batch 64:
//! - **warm**: the files are in the page cache (what a second epoch on a small dataset sees);
//! - **cold**: before each epoch every file's cached pages are dropped with
//!   `posix_fadvise(DONTNEED)` (no root needed), so the epoch reads from the device, as the first
//!   epoch of a dataset larger than memory does. The folder is read in a random order (a shuffled
//!   epoch), the shards in the order of a blocked plan of one rank (runs of 256 samples, shuffled
//!   within windows of 1024), which is how thaw trains from them.
//!
//! `THAW_BENCH_IMAGES` sets the number of images (default 3000).

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use thaw_coordinator::plan::EpochPlan;
use thaw_worker::data::folder::FolderDataset;
use thaw_worker::data::loader::{Loader, LoaderConfig};
use thaw_worker::data::sharded::ShardDataset;
use thaw_worker::data::shards::{self, PackOptions};
use thaw_worker::data::transform::Transform;
use thaw_worker::data::{permutation, Dataset};
use thaw_worker::zoo::Preprocess;

const BATCH: usize = 64;

/// Drops the page cache of every file under `dir` (clean pages only, which these are).
fn drop_cache(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            drop_cache(&p);
        } else if let Ok(f) = std::fs::File::open(&p) {
            // SAFETY: fadvise on an open descriptor has no memory effects.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// Images per second of one epoch of `order` through the loader.
fn epoch(ds: &Arc<dyn Dataset>, order: &[usize], threads: usize) -> f64 {
    let t = Transform::new(&Preprocess::imagenet(224), None, false);
    let cfg = LoaderConfig {
        hflip: true,
        random_crop: true,
        seed: 1,
        epoch: 0,
        prefetch: 2,
        ..LoaderConfig::eval(BATCH, threads)
    };
    let started = Instant::now();
    let mut n = 0;
    for b in Loader::start(ds.clone(), order.to_vec(), 0, t, cfg) {
        assert!(b.skipped.is_empty(), "{:?}", b.skipped);
        n += b.indices.len();
    }
    assert_eq!(n, order.len());
    n as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // built and run by `cargo test --benches`: nothing to time
    }
    let images: usize = std::env::var("THAW_BENCH_IMAGES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (tree, packed) = (dir.path().join("tree"), dir.path().join("packed"));
    shards::synth(&tree, 100, images, 3).unwrap();
    shards::pack_dataset(&tree, &packed, &PackOptions { shard_bytes: 64 << 20, ..PackOptions::default() }).unwrap();
    let folder: Arc<dyn Dataset> = Arc::new(FolderDataset::open(&tree).unwrap());
    let sharded: Arc<dyn Dataset> = Arc::new(ShardDataset::open(&packed).unwrap());
    let bytes: u64 = std::fs::read_dir(&packed)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    println!("{images} JPEGs of about 500x375 ({:.0} MB), 100 classes; batch {BATCH}, RandomResizedCrop(224) + flip + normalize", bytes as f64 / 1e6);
    let folder_order = permutation(images, 1, 0);
    let plan = EpochPlan::new(1, 0, images as u64, 1, 1).and_then(|p| p.with_blocks(256, 1024)).unwrap();
    let shard_order: Vec<usize> = plan.rank_samples(0).unwrap().map(|i| i as usize).collect();
    println!("\n{:>7} {:>6} {:>14} {:>14} {:>8}", "threads", "cache", "folder img/s", "shards img/s", "ratio");
    for threads in [1, 2] {
        for cold in [false, true] {
            let rate = |ds: &Arc<dyn Dataset>, order: &[usize], root: &Path| {
                if cold {
                    drop_cache(root);
                } else {
                    epoch(ds, order, threads); // warm the cache
                }
                epoch(ds, order, threads)
            };
            let f = rate(&folder, &folder_order, &tree);
            let s = rate(&sharded, &shard_order, &packed);
            println!("{threads:>7} {:>6} {f:>14.0} {s:>14.0} {:>8.2}", if cold { "cold" } else { "warm" }, s / f);
        }
    }
}
