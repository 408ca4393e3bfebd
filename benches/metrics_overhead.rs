//! What watching a job costs a training step: the per-step work that metrics add on a rank —
//! building its `StepTelemetry`, adding it to the totals that heartbeats carry (the agent's own
//! `add_step`, under a lock as the agent takes it), and rank 0's TensorBoard scalars (the loss and each group's learning rate) —
//! against the training step itself, in the same run.
//!
//! The step is LeNet-5's on a batch of 32 (forward, backward, SGD with momentum): thaw's
//! smallest, so the worst case for the ratio. Reported: the median step without the metrics work,
//! the median with it, and the metrics work alone (timed over many repetitions, since it is far
//! below the step's noise). `THAW_BENCH_STEPS` sets the timed steps (200).

use std::sync::Mutex;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use thaw_coordinator::spec::OptimizerSpec;
use thaw_proto::v1::RankTelemetry;
use thaw_worker::optim::{Optimizer, Param};
use thaw_worker::tensorboard::EventWriter;
use thaw_worker::train::StepTelemetry;
use thaw_worker::zoo::{Arch, GroupMode, Network};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The metrics work of one step.
fn metrics_work(totals: &Mutex<RankTelemetry>, events: &mut EventWriter, step: u64, loss: f64, lrs: &[f64], secs: f64) {
    let t = StepTelemetry {
        seconds: secs,
        data_wait: secs * 0.01,
        allreduce: secs * 0.2,
        allreduce_exposed: secs * 0.1,
        samples: 32,
        skipped: 0,
        loss,
        group_lr: lrs.to_vec(),
        stage: 1,
    };
    thaw_worker::agent::add_step(&mut totals.lock().unwrap_or_else(|p| p.into_inner()), &t);
    let values = [("train/step_loss", loss), ("lr/conv", lrs[0]), ("lr/fc", lrs[1]), ("lr/head", lrs[2])];
    events.scalars(step, &values);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let steps = std::env::var("THAW_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(200usize);
    tch::manual_seed(0);
    let net = Network::new(Arch::Lenet5, 10, Device::Cpu);
    let modes = vec![GroupMode::Train; net.groups().len()];
    let params: Vec<Param> = (0..modes.len())
        .flat_map(|g| net.group_parameters(g).into_iter().map(move |(name, tensor)| Param { name, tensor, group: g }))
        .collect();
    let mut opt = Optimizer::new(OptimizerSpec::Sgd { momentum: 0.9, nesterov: false, weight_decay: 0.0 }, params);
    let xs = Tensor::randn([32, 1, 32, 32], (Kind::Float, Device::Cpu));
    let ys = Tensor::randint(10, [32], (Kind::Int64, Device::Cpu));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut events = EventWriter::create(dir.path()).expect("an event file");
    let totals = Mutex::new(RankTelemetry::default());
    let lrs = [0.05, 0.05, 0.05];
    let mut plain = Vec::new();
    let mut watched = Vec::new();
    // Alternate the two forms step by step, so that drift affects both alike.
    for i in 0..2 * (steps + 10) {
        let with = i % 2 == 1;
        let t = Instant::now();
        opt.zero_grad();
        let loss = net.forward_modes(&xs, &modes).cross_entropy_for_logits(&ys);
        loss.backward();
        opt.step(&|_| 0.05);
        let loss = loss.double_value(&[]);
        if with {
            metrics_work(&totals, &mut events, i as u64, loss, &lrs, t.elapsed().as_secs_f64());
        }
        if i >= 20 {
            (if with { &mut watched } else { &mut plain }).push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let reps = 20_000;
    let t = Instant::now();
    for i in 0..reps {
        metrics_work(&totals, &mut events, i, 0.5, &lrs, 0.01);
    }
    let alone_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let (p, w) = (median(plain), median(watched));
    println!("metrics overhead on a LeNet-5 step (batch 32, {} torch threads), {steps} steps each, alternating", tch::get_num_threads());
    println!("| step | median ms |");
    println!("|---|---|");
    println!("| without metrics work | {p:.3} |");
    println!("| with it (telemetry totals + TensorBoard scalars) | {w:.3} |");
    println!("metrics work alone: {alone_us:.2} us per step = {:.3}% of the plain step", alone_us / (p * 1e3) * 100.0);
}
