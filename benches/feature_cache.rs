//! Epoch time of `feature_extract` with and without the feature cache, in the same run.
//!
//! ImageNet MobileNetV2 (torchvision's real weights) on real Fashion-MNIST, head only, batch 64,
//! 2 loader threads, for 32x32 and 64x64 inputs. The same job runs twice through `Trainer::run`:
//! with the cache (the first epoch decodes images and runs the frozen trunk, storing its outputs;
//! later epochs read them) and with `feature_cache_mb = 0` (every epoch decodes and runs the trunk).
//! An epoch's time includes its evaluation on the validation images (cached the same way). The
//! two runs end with bit-identical weights (checked), so the speed-up is free.
//!
//! `THAW_BENCH_IMAGES` (training images, default 10000), `THAW_BENCH_EPOCHS` (default 3) and
//! `THAW_BENCH_SIZES` (comma-separated sides, default 32,64) change the workload.

use std::path::{Path, PathBuf};

use thaw_coordinator::spec::JobSpec;
use thaw_worker::train::Trainer;
use thaw_worker::zoo::Arch;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// The imported MobileNetV2 weights (made once from the `.pth` that `scripts/setup.sh` installs).
fn weights(dir: &Path) -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let pth = repo.join(".thaw/weights/mobilenet_v2-b0353104.pth");
    let out = dir.join("mobilenet_v2.safetensors");
    thaw_worker::weights::import_checkpoint(&pth, Arch::MobilenetV2, &out)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", pth.display()));
    out
}

/// Seconds of each epoch and the final variables.
fn run(
    dir: &Path,
    weights: &Path,
    size: usize,
    images: usize,
    epochs: usize,
    cache_mb: f64,
) -> (Vec<f64>, Vec<Vec<u8>>) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join(format!("run-{size}-{cache_mb}"));
    let text = format!(
        "name = \"bench\"\nseed = 1\n[model]\narch = \"mobilenet_v2\"\nweights = \"{}\"\n[data]\nformat = \"idx\"\n\
         root = \"{}\"\nimage_size = {size}\ntrain_limit = {images}\nval_limit = 2000\nloader_threads = 2\n\
         [train]\nepochs = {epochs}\nbatch_size = 64\nlr = 0.01\nfeature_cache_mb = {cache_mb:?}\n\
         [schedule]\nstrategy = \"feature_extract\"\n[output]\ndir = \"{}\"\n",
        weights.display(),
        repo.join(".thaw/data/fashion-mnist").display(),
        out.display()
    );
    let spec = JobSpec::from_toml(&text, Path::new("/")).expect("spec");
    let mut t = Trainer::prepare(spec, tch::Device::Cpu).expect("prepare");
    let summary = t.run(None).expect("run");
    let mut vars: Vec<(String, tch::Tensor)> = t.net.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = vars.iter().map(|(_, v)| thaw_worker::tensor_io::tensor_bytes(v)).collect();
    (summary.history.iter().map(|m| m.seconds).collect(), bytes)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs the binary without it.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    tch::set_num_threads(2);
    let images = env_usize("THAW_BENCH_IMAGES", 10_000);
    let epochs = env_usize("THAW_BENCH_EPOCHS", 3).max(2);
    let sizes: Vec<usize> = std::env::var("THAW_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![32, 64]);
    let dir = tempfile::tempdir().expect("temp dir");
    let w = weights(dir.path());
    println!(
        "feature_extract, MobileNetV2 (ImageNet), Fashion-MNIST: {images} training + 2000 validation images per epoch,"
    );
    println!("batch 64, 2 threads; seconds per epoch including evaluation; later = mean of epochs 2..{epochs}");
    println!(
        "{:>5} {:>14} {:>14} {:>14} {:>14} {:>12}",
        "size", "cached_first_s", "cached_later_s", "uncached_first", "uncached_later", "later_ratio"
    );
    for size in sizes {
        let (cached, a) = run(dir.path(), &w, size, images, epochs, 2048.0);
        let (plain, b) = run(dir.path(), &w, size, images, epochs, 0.0);
        assert!(a == b, "the cached run's weights differ from the uncached run's");
        let later = |v: &[f64]| v[1..].iter().sum::<f64>() / (v.len() - 1) as f64;
        println!(
            "{size:>5} {:>14.2} {:>14.3} {:>14.2} {:>14.2} {:>12.1}",
            cached[0],
            later(&cached),
            plain[0],
            later(&plain),
            later(&plain) / later(&cached)
        );
    }
}
