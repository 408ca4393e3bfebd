//! Decode + RandomResizedCrop(224) + horizontal flip + normalize, images per second: thaw's
//! `Augment::apply_encoded` against torchvision (Pillow) in a `DataLoader`, in the same run.
//!
//! ImageNet-sized JPEGs (~500x375, written by `shards::synth`) are read into memory first, so both
//! sides measure decoding and augmentation, not the disk. thaw runs T threads, each over its share
//! of the images into its own output buffer; torchvision runs `DataLoader(batch_size=64,
//! num_workers=T)` over a `Dataset` holding the same bytes (`benches/decode_augment_torch.py`),
//! plus Pillow + torchvision on one thread without a `DataLoader`. Per-core rates divide by T.
//! The like-for-like comparison with the `DataLoader` is thaw's own [`Loader`] with T threads over
//! a dataset holding the same bytes, producing batches of 64 as tensors (`loader` columns); the
//! bare pipeline's rate (`thaw` columns) shows what batching costs.
//!
//! `THAW_BENCH_IMAGES` (default 400), `THAW_BENCH_PASSES` (timed passes, default 5) and
//! `THAW_BENCH_THREADS` (comma-separated, default 1,2) change the workload;
//! `THAW_BENCH_NO_BASELINE` skips the Python side.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use std::sync::Arc;

use image::DynamicImage;
use thaw_worker::data::decode::{sample_key, Augment, CropMode};
use thaw_worker::data::loader::{Loader, LoaderConfig};
use thaw_worker::data::transform::Transform;
use thaw_worker::data::{Dataset, SampleError};
use thaw_worker::zoo::Preprocess;

/// The JPEG bytes in memory, as the Python side's `Dataset` holds them.
struct InMemory(Vec<Vec<u8>>);

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn label(&self, i: usize) -> i64 {
        (i % 10) as i64
    }
    fn class_names(&self) -> &[String] {
        &[]
    }
    fn key(&self, i: usize) -> String {
        format!("image {i}")
    }
    fn load(&self, i: usize) -> Result<DynamicImage, SampleError> {
        image::load_from_memory(&self.0[i]).map_err(|e| SampleError { key: self.key(i), reason: e.to_string() })
    }
    fn encoded(&self, i: usize) -> Option<Result<Vec<u8>, SampleError>> {
        Some(Ok(self.0[i].clone()))
    }
}

/// Images per second of thaw's loader with `threads` threads: batches of 64 tensors, RandomResizedCrop
/// and flips, `passes` epochs after one warm-up.
fn loader_rate(ds: &Arc<dyn Dataset>, threads: usize, passes: usize) -> f64 {
    let t = Transform::new(&Preprocess::imagenet(224), None, false);
    let epoch = |e: u64| {
        let cfg = LoaderConfig { hflip: true, random_crop: true, seed: 1, epoch: e, ..LoaderConfig::eval(64, threads) };
        Loader::start(ds.clone(), (0..ds.len()).collect(), 0, t.clone(), cfg).map(|b| b.indices.len()).sum::<usize>()
    };
    epoch(0);
    let start = Instant::now();
    let n: usize = (1..=passes as u64).map(epoch).sum();
    n as f64 / start.elapsed().as_secs_f64()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).expect("read dir").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Images per second of `threads` threads over `passes` passes of `images` (after one warm-up).
fn thaw_rate(aug: &Augment, images: &[Vec<u8>], threads: usize, passes: usize) -> f64 {
    let chunk = images.len().div_ceil(threads);
    let run = |pass: u64| {
        std::thread::scope(|s| {
            for (t, part) in images.chunks(chunk).enumerate() {
                s.spawn(move || {
                    let mut out = vec![0f32; aug.sample_len()];
                    for (i, bytes) in part.iter().enumerate() {
                        let index = (t * chunk + i) as u64;
                        aug.apply_encoded(bytes, sample_key(1, pass, index), &mut out).expect("decode");
                        std::hint::black_box(&out);
                    }
                });
            }
        })
    };
    run(0);
    let start = Instant::now();
    for pass in 1..=passes as u64 {
        run(pass);
    }
    (images.len() * passes) as f64 / start.elapsed().as_secs_f64()
}

/// The baseline's rates: (`pillow` single-thread rate, [(threads, DataLoader rate)]).
fn torch_rates(py: &Path, list: &Path, threads: &[usize], passes: usize) -> Option<(f64, Vec<(usize, f64)>)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/decode_augment_torch.py");
    let t: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    let out = Command::new(py).arg(script).arg(list).arg(t.join(",")).arg(passes.to_string()).output().ok()?;
    if !out.status.success() {
        eprintln!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let (mut pillow, mut loader) = (None, Vec::new());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["pillow", rate] => pillow = rate.parse().ok(),
            ["loader", t, rate] => loader.push((t.parse().ok()?, rate.parse().ok()?)),
            _ => {}
        }
    }
    Some((pillow?, loader))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs the binary without it.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n = env_usize("THAW_BENCH_IMAGES", 400);
    let passes = env_usize("THAW_BENCH_PASSES", 5).max(1);
    let threads: Vec<usize> = std::env::var("THAW_BENCH_THREADS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).filter(|&t| t > 0).collect())
        .unwrap_or_else(|| vec![1, 2]);
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    thaw_worker::data::shards::synth(&data, 10, n, 7).expect("synth");
    let mut paths = Vec::new();
    files(&data, &mut paths);
    let images: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).expect("read")).collect();
    let bytes: usize = images.iter().map(Vec::len).sum();
    let list = dir.path().join("files.txt");
    let text: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    std::fs::write(&list, text.join("\n")).expect("write list");

    let aug = Augment {
        size: 224,
        crop: CropMode::RandomResized { scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) },
        hflip: true,
        channels: 3,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let ours: Vec<(usize, f64)> = threads.iter().map(|&t| (t, thaw_rate(&aug, &images, t, passes))).collect();
    let ds: Arc<dyn Dataset> = Arc::new(InMemory(images.clone()));
    let loaders: Vec<f64> = threads.iter().map(|&t| loader_rate(&ds, t, passes)).collect();
    let py = if std::env::var("THAW_BENCH_NO_BASELINE").is_ok() { None } else { common::baseline_python() };
    let theirs = py.and_then(|py| torch_rates(&py, &list, &threads, passes));

    println!(
        "decode + RandomResizedCrop(224) + flip + normalize: {} in-memory JPEGs (~500x375, {:.0} KB mean), \
         {passes} timed passes after 1 warm-up",
        images.len(),
        bytes as f64 / images.len() as f64 / 1024.0
    );
    println!("torchvision: Pillow + torchvision transforms in DataLoader(batch_size=64, num_workers=threads)");
    println!(
        "{:>7} {:>10} {:>15} {:>12} {:>17} {:>15} {:>20} {:>10}",
        "threads",
        "thaw_img_s",
        "thaw_img_s_core",
        "loader_img_s",
        "loader_img_s_core",
        "torchvision_img_s",
        "torchvision_img_s_core",
        "ratio_core"
    );
    for (&(t, rate), &lr) in ours.iter().zip(&loaders) {
        let tv = theirs.as_ref().and_then(|(_, l)| l.iter().find(|(x, _)| *x == t).map(|&(_, r)| r));
        let (per, lper) = (rate / t as f64, lr / t as f64);
        match tv {
            Some(r) => println!(
                "{t:>7} {rate:>10.0} {per:>15.0} {lr:>12.0} {lper:>17.0} {r:>15.0} {:>20.0} {:>10.2}",
                r / t as f64,
                lper / (r / t as f64)
            ),
            None => {
                println!("{t:>7} {rate:>10.0} {per:>15.0} {lr:>12.0} {lper:>17.0} {:>15} {:>20} {:>10}", "-", "-", "-")
            }
        }
    }
    if let Some((pillow, _)) = &theirs {
        let one = ours.iter().find(|(t, _)| *t == 1).map(|&(_, r)| r);
        let ratio = one.map(|r| format!("{:.2}", r / pillow)).unwrap_or_else(|| "-".into());
        println!(
            "{:>7} {:>10} {:>15} {:>12} {:>17} {pillow:>15.0} {pillow:>20.0} {ratio:>10}   (Pillow + transforms, one thread, no DataLoader; ratio: thaw_img_s)",
            "1*", "", "", "", ""
        );
    }
    println!("ratio_core: thaw's loader per core against torchvision's DataLoader per core");
}
