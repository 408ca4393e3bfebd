//! Step time saved by not back-propagating through a frozen prefix, against freezing by the
//! optimizer alone, in the same run.
//!
//! For ResNet18 and MobileNetV2 at batch 32 (64x64 and 224x224 inputs), every group but the head
//! frozen, SGD with momentum on the head's parameters only:
//!
//! - `frozen`: thaw's way. `set_modes` stops the trunk's parameters requiring gradients and
//!   `forward_modes` runs the trunk under `no_grad` in eval mode, so backward stops at the head.
//! - `full_backward`: what a script gets when it only leaves the trunk out of the optimizer (many
//!   Keras and PyTorch fine-tuning scripts): every parameter requires gradients, the trunk runs in
//!   eval mode with autograd on (`Network::forward_t(.., false)`, the zoo's one such entry point),
//!   backward computes every gradient (accumulating into the trunk's, which its optimizer never
//!   zeroes, as in PyTorch) and the optimizer updates the head only.
//!
//! Both start from the same weights (same seed) on the same random batch; the first step checks
//! that they compute the same loss, and the bench exits non-zero if not. MobileNetV2's head has a
//! dropout that `frozen` trains with and `full_backward` (all in eval mode) does not, so the check
//! compares the losses with the head in eval mode: `frozen`'s from the output of its own `no_grad`
//! prefix. Steps of the two variants alternate, so load on a shared machine hits both alike; the
//! median over the timed steps is reported, and the ratio full_backward/frozen (above 1: the frozen
//! prefix saves time).
//!
//! `THAW_BENCH_SIZES` (comma-separated) sets the input sizes; `THAW_BENCH_STEPS` the number of timed
//! steps (default 6 at 64 px, 3 above 100 px), after 2 warm-up steps.

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use thaw_coordinator::spec::OptimizerSpec;
use thaw_worker::optim::{Optimizer, Param};
use thaw_worker::zoo::{Arch, GroupMode, Network};

const ARCHS: [Arch; 2] = [Arch::Resnet18, Arch::MobilenetV2];
const SIZES: [i64; 2] = [64, 224];
const BATCH: i64 = 32;
const CLASSES: i64 = 1000;
const WARMUP: usize = 2;

fn sizes() -> Vec<i64> {
    match std::env::var("THAW_BENCH_SIZES") {
        Ok(s) => s.split(',').filter_map(|v| v.trim().parse().ok()).filter(|&v| v > 0).collect(),
        Err(_) => SIZES.to_vec(),
    }
}

fn steps_for(size: i64) -> usize {
    std::env::var("THAW_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).filter(|&n| n > 0).unwrap_or(if size > 100 {
        3
    } else {
        10
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One way of training the head of a network whose trunk is frozen.
struct Variant {
    net: Network,
    opt: Optimizer,
    /// Modes `forward_modes` runs with (`frozen`), or `None` for the all-eval forward with autograd
    /// on (`full_backward`).
    modes: Option<Vec<GroupMode>>,
}

impl Variant {
    /// A network from seed 0 (so both variants start from the same weights), an SGD on its head.
    fn new(arch: Arch, thaw_frozen: bool) -> Variant {
        tch::manual_seed(0);
        let net = Network::new(arch, CLASSES, Device::Cpu);
        let n = net.groups().len();
        let mut frozen = vec![GroupMode::Frozen; n];
        frozen[n - 1] = GroupMode::Train;
        let modes = if thaw_frozen {
            net.set_modes(&frozen);
            Some(frozen)
        } else {
            net.set_modes(&vec![GroupMode::Train; n]);
            None
        };
        let params = net
            .group_parameters(n - 1)
            .into_iter()
            .map(|(name, tensor)| Param { name, tensor, group: n - 1 })
            .collect();
        let opt = Optimizer::new(OptimizerSpec::Sgd { momentum: 0.9, nesterov: false, weight_decay: 0.0 }, params);
        Variant { net, opt, modes }
    }

    /// One training step: its loss, and on `check` also the loss with the head in eval mode.
    fn step(&mut self, xs: &Tensor, ys: &Tensor, check: bool) -> (f64, Option<f64>) {
        self.opt.zero_grad();
        let (loss, eval_loss) = match &self.modes {
            Some(modes) if check => {
                // forward_modes split at the head, to see the head's eval-mode output too.
                let n = modes.len();
                let feats = self.net.forward_range(xs, modes, 0..n - 1);
                let loss = self.net.forward_range(&feats, modes, n - 1..n).cross_entropy_for_logits(ys);
                let eval_modes = vec![GroupMode::Frozen; n];
                let eval = tch::no_grad(|| self.net.forward_range(&feats, &eval_modes, n - 1..n));
                (loss, Some(eval.cross_entropy_for_logits(ys).double_value(&[])))
            }
            Some(modes) => (self.net.forward_modes(xs, modes).cross_entropy_for_logits(ys), None),
            None => {
                let loss = self.net.forward_t(xs, false).cross_entropy_for_logits(ys);
                let eval_loss = check.then(|| loss.double_value(&[]));
                (loss, eval_loss)
            }
        };
        loss.backward();
        self.opt.step(&|_| 0.01);
        (loss.double_value(&[]), eval_loss)
    }
}

/// Median ms per step of (`frozen`, `full_backward`), or the two first-step losses if they differ.
fn compare(arch: Arch, size: i64, steps: usize) -> Result<(f64, f64), String> {
    let mut frozen = Variant::new(arch, true);
    let mut full = Variant::new(arch, false);
    tch::manual_seed(1);
    let xs = Tensor::randn([BATCH, 3, size, size], (Kind::Float, Device::Cpu));
    let ys = Tensor::randint(CLASSES, [BATCH], (Kind::Int64, Device::Cpu));
    let (mut t_frozen, mut t_full) = (Vec::new(), Vec::new());
    for i in 0..WARMUP + steps {
        let t = Instant::now();
        let (_, a) = frozen.step(&xs, &ys, i == 0);
        let ms_frozen = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let (_, b) = full.step(&xs, &ys, i == 0);
        let ms_full = t.elapsed().as_secs_f64() * 1e3;
        if let (Some(a), Some(b)) = (a, b) {
            if !a.is_finite() || (a - b).abs() > 1e-5 * a.abs().max(1.0) {
                return Err(format!(
                    "{arch} {size}px: first-step losses differ (frozen {a:.7}, full_backward {b:.7}): \
                     the variants do not compute the same function"
                ));
            }
        }
        if i >= WARMUP {
            t_frozen.push(ms_frozen);
            t_full.push(ms_full);
        }
    }
    Ok((median(t_frozen), median(t_full)))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs a `harness = false` bench with no
    // arguments (not `--test`), so time only under `--bench`.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let threads = tch::get_num_threads();
    println!("head-only training step, batch {BATCH}, SGD momentum, {threads} threads, median ms/step");
    println!(
        "{:<13} {:>5} {:>10} {:>17} {:>21}",
        "model", "size", "frozen_ms", "full_backward_ms", "full_backward/frozen"
    );
    for size in sizes() {
        for arch in ARCHS {
            match compare(arch, size, steps_for(size)) {
                Ok((a, b)) => println!("{:<13} {:>5} {:>10.1} {:>17.1} {:>21.2}", arch.name(), size, a, b, b / a),
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
