//! Training-step time of thaw against the equivalent PyTorch eager loop, in the same run.
//!
//! For ResNet18 and MobileNetV2 at batch 32, 64x64 and 224x224: one step is forward, cross-entropy,
//! backward and an SGD-with-momentum update of every parameter. thaw's side uses the same
//! `Network` and `Optimizer` the trainer uses; PyTorch's side (`train_step_torch.py`) uses
//! torchvision's models and `torch.optim.SGD`. Both run with the same number of threads on random
//! inputs, after warm-up steps; the median step time is reported and the ratio torch/thaw
//! (above 1: thaw is faster).
//!
//! thaw computes in its default layout for the architecture (`layout`: channels-last `nhwc` for
//! MobileNetV2, `nchw` for ResNet18 below 128 px; see `Arch::channels_last_on`), and `other_layout_ms` is its
//! step in the other one, which shows the choice. PyTorch's loop runs as users write it (NCHW,
//! the default), and a second PyTorch column runs it with `model.to(memory_format=
//! torch.channels_last)`, so the layout's share of the difference is visible. `opt_ms` is the
//! part of thaw's step spent in `Optimizer::step` (and `zero_grad`), with libtorch's fused SGD
//! kernel (the default); `loop_ms` and `loop_opt_ms` are the same step with the per-parameter
//! loop instead (`Optimizer::set_fused(false)`, thaw's optimizer before the fused kernel).
//! `thaw_bf16_ms` is thaw's step with `precision = "bf16"` (autocast, f32 master weights) and
//! `bf16/fp32` what it costs against thaw's f32 step (above 1: slower) on this CPU.
//!
//! The baseline needs the full torch==2.13.0 and torchvision==0.28.0, installed on demand into
//! `.thaw/bench-venv` (about 4.7 GB). `THAW_BENCH_NO_BASELINE=1` runs thaw's side alone.
//! `THAW_BENCH_STEPS` overrides the number of timed steps; `THAW_BENCH_ONLY=mobilenet_v2:64`
//! (comma-separated `arch:size`) runs only those cases.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use thaw_coordinator::spec::{OptimizerSpec, Precision};
use thaw_worker::amp::autocast;
use thaw_worker::optim::{Optimizer, Param};
use thaw_worker::zoo::{channels_last_default, Arch, GroupMode, Network};

use common::baseline_python;

const CASES: [(Arch, i64); 5] =
    [(Arch::MobilenetV2, 48), (Arch::Resnet18, 64), (Arch::Resnet18, 224), (Arch::MobilenetV2, 64), (Arch::MobilenetV2, 224)];
const BATCH: i64 = 32;

fn steps_for(size: i64) -> usize {
    std::env::var("THAW_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(if size > 100 { 5 } else { 20 })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median (step, optimizer) milliseconds of thaw's training step, its forward pass computing in
/// `precision` (`[train] precision`: autocast with f32 master weights).
fn thaw_step_ms(arch: Arch, size: i64, steps: usize, precision: Precision, fused: bool, channels_last: bool) -> (f64, f64) {
    tch::manual_seed(0);
    let net = Network::with_layout(arch, 1000, Device::Cpu, channels_last);
    let modes = vec![GroupMode::Train; net.groups().len()];
    let params: Vec<Param> = (0..net.groups().len())
        .flat_map(|g| net.group_parameters(g).into_iter().map(move |(name, tensor)| Param { name, tensor, group: g }))
        .collect();
    let mut opt = Optimizer::new(OptimizerSpec::Sgd { momentum: 0.9, nesterov: false, weight_decay: 0.0 }, params);
    opt.set_fused(fused);
    let xs = Tensor::randn([BATCH, 3, size, size], (Kind::Float, Device::Cpu));
    let ys = Tensor::randint(1000, [BATCH], (Kind::Int64, Device::Cpu));
    let (mut times, mut opt_times) = (Vec::new(), Vec::new());
    for i in 0..steps + 2 {
        let t = Instant::now();
        opt.zero_grad();
        let zeroed = t.elapsed();
        let loss = autocast(precision, Device::Cpu, || net.forward_modes(&xs, &modes).cross_entropy_for_logits(&ys));
        loss.backward();
        let o = Instant::now();
        opt.step(&|_| 0.01);
        let stepped = o.elapsed();
        let _ = loss.double_value(&[]);
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
            opt_times.push((zeroed + stepped).as_secs_f64() * 1e3);
        }
    }
    (median(times), median(opt_times))
}

/// PyTorch's median ms per step, NCHW or channels-last.
fn torch_step_ms(py: &std::path::Path, arch: Arch, size: i64, steps: usize, threads: i32, layout: &str) -> Option<f64> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/train_step_torch.py");
    let out = Command::new(py)
        .arg(script)
        .args([arch.name(), &size.to_string(), &BATCH.to_string(), &steps.to_string(), &threads.to_string(), layout])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().ok()
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench`-less args; only time under `cargo bench`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let threads = tch::get_num_threads();
    let py = if std::env::var("THAW_BENCH_NO_BASELINE").is_ok() { None } else { baseline_python() };
    println!("training step, batch {BATCH}, SGD momentum, {threads} threads, median ms/step");
    println!(
        "{:<13} {:>5} {:>6} {:>9} {:>7} {:>15} {:>9} {:>11} {:>10} {:>12} {:>12} {:>14} {:>13} {:>10}",
        "model", "size", "layout", "thaw_ms", "opt_ms", "other_layout_ms", "loop_ms", "loop_opt_ms", "torch_ms", "torch/thaw", "torch_cl_ms", "torch_cl/thaw", "thaw_bf16_ms",
        "bf16/fp32"
    );
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let ratio = |v: Option<f64>, ours: f64| v.map_or("-".to_string(), |v| format!("{:.2}", v / ours));
    let only = std::env::var("THAW_BENCH_ONLY").ok();
    for (arch, size) in CASES {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|c| c == format!("{}:{size}", arch.name()))) {
            continue;
        }
        let steps = steps_for(size);
        let cl = channels_last_default(arch, Device::Cpu, size);
        // Untimed: the first steps at a new shape create oneDNN's primitives and grow the
        // allocator's pools in this process, which would otherwise favour whatever runs second.
        for layout in [cl, !cl] {
            thaw_step_ms(arch, size, 1, Precision::Fp32, true, layout);
        }
        let (ours, opt) = thaw_step_ms(arch, size, steps, Precision::Fp32, true, cl);
        let (other, _) = thaw_step_ms(arch, size, steps, Precision::Fp32, true, !cl);
        let (looped, loop_opt) = thaw_step_ms(arch, size, steps, Precision::Fp32, false, cl);
        let (bf16, _) = thaw_step_ms(arch, size, steps, Precision::Bf16, true, cl);
        let nchw = py.as_ref().and_then(|py| torch_step_ms(py, arch, size, steps, threads, "nchw"));
        let torch_cl = py.as_ref().and_then(|py| torch_step_ms(py, arch, size, steps, threads, "channels_last"));
        println!(
            "{:<13} {:>5} {:>6} {:>9.1} {:>7.1} {:>15.1} {:>9.1} {:>11.1} {:>10} {:>12} {:>12} {:>14} {:>13.1} {:>10.2}",
            arch.name(),
            size,
            if cl { "nhwc" } else { "nchw" },
            ours,
            opt,
            other,
            looped,
            loop_opt,
            show(nchw),
            ratio(nchw, ours),
            show(torch_cl),
            ratio(torch_cl, ours),
            bf16,
            bf16 / ours
        );
    }
}
