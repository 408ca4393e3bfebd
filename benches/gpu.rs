//! thaw on one GPU: correctness checks, then ResNet50 bf16 training throughput against the same
//! loop in the machine's own PyTorch (`gpu_torch.py`), side by side in the same run.
//!
//! 1. **GPU against CPU**: MobileNetV2 and ResNet50 (random init, seeded), the same batch, three
//!    SGD steps on `cuda:0` and on the CPU from the same weights; the losses must agree within
//!    1% (cuDNN and oneDNN round differently, and libtorch lets cuDNN use TF32 by default).
//! 2. **NCCL, world of 1, device-resident**: a bucket on the GPU reduced in place through
//!    `Collective::all_reduce_mean_tensor` (no host copy), and a training step of ResNet50
//!    through `ddp::reduce_step` with overlap on NCCL, against the same step without.
//! 3. **Throughput**: ResNet50, batch 128, 224x224, channels-last, bf16 autocast with f32
//!    master weights, SGD with momentum: images/s after warm-up, thaw's `Network` + `Optimizer`
//!    against torchvision's resnet50 + `torch.optim.SGD` under `torch.autocast` in the
//!    machine's PyTorch. The ratio thaw/torch is the figure of merit (goal: at least 1.0).
//!
//! Needs a CUDA build (`scripts/gpu-lent.sh build` here, or `setup.sh --cuda` on a GPU machine)
//! and a GPU; without one it says so and exits 0 having checked nothing. `THAW_GPU_TORCH_PY`
//! is the Python of the baseline (unset: no baseline); `THAW_BENCH_STEPS` the timed steps (20).

use std::process::Command;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use thaw_coordinator::spec::{OptimizerSpec, Precision};
use thaw_worker::amp::autocast;
use thaw_worker::optim::{Optimizer, Param};
use thaw_worker::zoo::{Arch, GroupMode, Network};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn params_of(net: &Network) -> Vec<Param> {
    (0..net.groups().len())
        .flat_map(|g| net.group_parameters(g).into_iter().map(move |(name, tensor)| Param { name, tensor, group: g }))
        .collect()
}

fn sgd(net: &Network) -> Optimizer {
    Optimizer::new(OptimizerSpec::Sgd { momentum: 0.9, nesterov: false, weight_decay: 0.0 }, params_of(net))
}

/// Losses of `steps` SGD steps of `arch` on `device` from the weights in `init`, on `xs`/`ys`.
fn losses(arch: Arch, init: &Network, device: Device, xs: &Tensor, ys: &Tensor, steps: usize) -> Vec<f64> {
    let mut net = Network::new(arch, 10, device);
    net.vs.copy(&init.vs).expect("same architecture");
    // Stored BatchNorm statistics: batch statistics of a random network amplify rounding.
    net.set_bn_policy(thaw_coordinator::spec::BnPolicy::FrozenStats);
    let modes = vec![GroupMode::Train; net.groups().len()];
    net.set_modes(&modes);
    let mut opt = sgd(&net);
    let (xs, ys) = (xs.to_device(device), ys.to_device(device));
    (0..steps)
        .map(|_| {
            opt.zero_grad();
            let loss = net.forward_modes(&xs, &modes).cross_entropy_for_logits(&ys);
            loss.backward();
            opt.step(&|_| 0.01);
            loss.double_value(&[])
        })
        .collect()
}

fn check_against_cpu(gpu: Device) {
    for arch in [Arch::MobilenetV2, Arch::Resnet50] {
        tch::manual_seed(3);
        let init = Network::new(arch, 10, Device::Cpu);
        let xs = Tensor::randn([8, 3, 96, 96], (Kind::Float, Device::Cpu));
        let ys = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
        let on_cpu = losses(arch, &init, Device::Cpu, &xs, &ys, 3);
        let on_gpu = losses(arch, &init, gpu, &xs, &ys, 3);
        let worst = on_cpu.iter().zip(&on_gpu).map(|(c, g)| (c - g).abs() / c.abs().max(1e-6)).fold(0.0, f64::max);
        println!("check: {arch} GPU vs CPU losses {on_gpu:.5?} vs {on_cpu:.5?} (largest relative difference {worst:.2e})");
        assert!(worst < 1e-2, "{arch}: the GPU's losses differ from the CPU's by {worst:.2e}");
    }
}

#[cfg(feature = "nccl")]
fn check_nccl(gpu: Device) {
    use thaw_worker::buckets::Buckets;
    use thaw_worker::collective::{new_unique_id, Collective, NcclCollective};
    let Device::Cuda(ordinal) = gpu else { unreachable!() };
    let id = new_unique_id().expect("an NCCL unique id");
    let mut c = NcclCollective::new(0, 1, ordinal, &id, std::time::Duration::from_secs(60)).expect("an NCCL group of 1");
    let mut t = Tensor::arange(1 << 20, (Kind::Float, gpu));
    let want = t.copy();
    let before = t.data_ptr();
    c.all_reduce_mean_tensor(&mut t).expect("all-reduce on the GPU");
    assert_eq!(t.data_ptr(), before, "reduced in place");
    assert!(t.equal(&want), "a mean over one rank is the tensor itself");
    // One ResNet50 step through the overlapped reduction, against the plain one.
    tch::manual_seed(5);
    let net = Network::new(Arch::Resnet50, 10, gpu);
    let modes = vec![GroupMode::Train; net.groups().len()];
    let params = params_of(&net);
    Buckets::ensure_grads(&params);
    let buckets = Buckets::new(&params, 25 << 20);
    let xs = Tensor::randn([16, 3, 128, 128], (Kind::Float, gpu));
    let ys = Tensor::randint(10, [16], (Kind::Int64, gpu));
    let mut grads = Vec::new();
    for overlap in [false, true] {
        for p in &params {
            let mut g = p.tensor.grad();
            let _ = g.zero_();
        }
        let n = modes.len();
        let fwd = if overlap {
            net.forward_range_cut(&xs, &modes, 0..n)
        } else {
            thaw_worker::zoo::CutForward::uncut(net.forward_range(&xs, &modes, 0..n))
        };
        let loss = fwd.output.cross_entropy_for_logits(&ys);
        let mut stats = [0f32; 1];
        thaw_worker::ddp::reduce_step(&mut c, &mut stats, &buckets, &params, overlap, |ready| fwd.backward(&loss, ready))
            .expect("the step's reduction over NCCL");
        grads.push(Tensor::cat(&params.iter().map(|p| p.tensor.grad().flatten(0, -1)).collect::<Vec<_>>(), 0));
    }
    let diff = (&grads[0] - &grads[1]).abs().max().double_value(&[]);
    println!("check: NCCL world of 1 on {gpu:?}: in-place device all-reduce ok; overlapped vs plain step, largest gradient difference {diff:.2e}");
    assert!(diff < 1e-3, "overlapped and plain steps differ by {diff}");
}

#[cfg(not(feature = "nccl"))]
fn check_nccl(_: Device) {
    println!("check: NCCL skipped: this binary was built without --features nccl");
}

/// thaw's ResNet50 bf16 training images/s at `batch` x 224 x 224.
fn thaw_images_per_sec(gpu: Device, batch: i64, steps: usize) -> f64 {
    tch::manual_seed(0);
    let net = Network::with_layout(Arch::Resnet50, 1000, gpu, true);
    let modes = vec![GroupMode::Train; net.groups().len()];
    let mut opt = sgd(&net);
    let xs = Tensor::randn([batch, 3, 224, 224], (Kind::Float, gpu));
    let ys = Tensor::randint(1000, [batch], (Kind::Int64, gpu));
    let step = |opt: &mut Optimizer| {
        opt.zero_grad();
        let loss = autocast(Precision::Bf16, gpu, || net.forward_modes(&xs, &modes).cross_entropy_for_logits(&ys));
        loss.backward();
        opt.step(&|_| 0.01);
    };
    for _ in 0..5 {
        step(&mut opt);
    }
    tch::Cuda::synchronize(0);
    let t = Instant::now();
    for _ in 0..steps {
        step(&mut opt);
    }
    tch::Cuda::synchronize(0);
    (batch as f64 * steps as f64) / t.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !tch::Cuda::is_available() {
        println!("gpu: no CUDA device visible to libtorch; nothing checked or measured (run it where a GPU is lent)");
        return;
    }
    let gpu = Device::Cuda(0);
    // cuDNN picks its fastest algorithms, as `torch.backends.cudnn.benchmark = True` does in
    // the baseline.
    tch::Cuda::cudnn_set_benchmark(true);
    println!("gpu: {} CUDA device(s); checks on cuda:0", tch::Cuda::device_count());
    check_against_cpu(gpu);
    check_nccl(gpu);
    let (batch, steps) = (128, env_usize("THAW_BENCH_STEPS", 20));
    let ours = thaw_images_per_sec(gpu, batch, steps);
    let torch = std::env::var("THAW_GPU_TORCH_PY").ok().and_then(|py| {
        let script = std::env::var("THAW_GPU_TORCH_SCRIPT")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/benches/gpu_torch.py").into());
        let out = Command::new(py).args([&script, &batch.to_string(), &steps.to_string()]).output().ok()?;
        if !out.status.success() {
            eprintln!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().lines().last()?.parse::<f64>().ok()
    });
    println!("| ResNet50 bf16 training, batch {batch}, 224x224, {steps} steps | images/s |");
    println!("|---|---|");
    println!("| thaw (tch, channels-last, autocast bf16) | {ours:.0} |");
    match torch {
        Some(t) => {
            println!("| PyTorch eager (torchvision, channels-last, torch.autocast bf16) | {t:.0} |");
            println!("thaw / PyTorch: {:.2}x", ours / t);
        }
        None => println!("| PyTorch eager | not run (set THAW_GPU_TORCH_PY) |"),
    }
}
