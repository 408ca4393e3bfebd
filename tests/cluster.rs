//! Distributed training end to end: real worker processes, a real coordinator and the TCP ring on
//! 127.0.0.1, real Fashion-MNIST.

mod common;
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use thaw_coordinator::plan::EpochPlan;
use thaw_coordinator::spec::{JobSpec, Stage};
use thaw_worker::collective::{RingCollective, RingOptions};
use thaw_worker::train::{Control, TrainError, Trainer};

fn lenet_job(name: &str, out: &Path, extra_train: &str, limit: usize, epochs: usize) -> String {
    format!(
        "name = \"{name}\"\nseed = 11\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
         train_limit = {limit}\nval_limit = 200\n[train]\nepochs = {epochs}\nlr = 0.05\n{extra_train}\n[output]\ndir = \"{}\"\n",
        fashion_mnist().display(),
        out.display()
    )
}

/// A coordinator stand-in for in-process ranks: plans from the spec, records what each rank trained.
struct Recorder {
    seed: u64,
    n: u64,
    world: u32,
    batch: u32,
    /// The stage of each epoch, when the test changes it.
    stages: Vec<Stage>,
    seen: Vec<(u32, u64, Vec<usize>)>,
}

impl Control for Recorder {
    fn epoch_plan(&mut self, epoch: u32) -> Result<EpochPlan, TrainError> {
        EpochPlan::new(self.seed, epoch, self.n, self.world, self.batch).map_err(|e| TrainError::Invalid(e.to_string()))
    }
    fn progress(&mut self, _: u32, _: u64, _: u64, _: Option<&thaw_worker::checkpoint::EpochMetrics>) {}
    fn stop_requested(&self) -> Option<String> {
        None
    }
    fn trained(&mut self, epoch: u32, step: u64, samples: &[usize]) {
        self.seen.push((epoch, step, samples.to_vec()));
    }
    fn stage(&mut self, epoch: u32) -> Option<Stage> {
        self.stages.get(epoch as usize).cloned()
    }
}

/// What one in-process rank ends with: its variables and the samples it trained on.
struct RankRun {
    vars: HashMap<String, Vec<f32>>,
    seen: Vec<(u32, u64, Vec<usize>)>,
}

fn vars_of(t: &Trainer) -> HashMap<String, Vec<f32>> {
    t.net.vs.variables().into_iter().map(|(n, v)| (n, Vec::<f32>::try_from(v.flatten(0, -1)).unwrap())).collect()
}

/// One stage per epoch: the spec's stage with the groups of `frozen` (one mask per epoch) frozen.
fn stages_of(base: &Stage, frozen: &[Vec<bool>]) -> Vec<Stage> {
    frozen
        .iter()
        .enumerate()
        .map(|(i, mask)| Stage {
            index: i,
            epochs: i..i + 1,
            trainable: mask.iter().map(|f| !f).collect(),
            ..base.clone()
        })
        .collect()
}

/// Trains `world` ranks as threads of this process over a real ring on 127.0.0.1.
fn run_ranks(world: usize, batch: u32, limit: usize, epochs: usize, frozen: Vec<Vec<bool>>) -> Vec<RankRun> {
    run_ranks_with(world, batch, limit, epochs, frozen, 1 << 20, true)
}

/// [`run_ranks`] with the gradient buckets' size and whether their all-reduce overlaps backward.
fn run_ranks_with(
    world: usize,
    batch: u32,
    limit: usize,
    epochs: usize,
    frozen: Vec<Vec<bool>>,
    bucket_bytes: usize,
    overlap: bool,
) -> Vec<RankRun> {
    let dir = tempfile::tempdir().unwrap();
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    // Prepare one after another: random init draws from libtorch's one global RNG, which threads
    // preparing at once would interleave (separate processes, as `thaw launch` uses, do not).
    let trainers: Vec<Trainer> = (0..world)
        .map(|rank| {
            let out = dir.path().join(format!("rank{rank}"));
            let mut text = lenet_job("inproc", &out, &format!("batch_size = {batch}\nmomentum = 0.9"), limit, epochs);
            text.push_str(&format!("[distributed]\noverlap = {overlap}\n"));
            let mut t = Trainer::prepare(JobSpec::from_toml(&text, Path::new("/")).unwrap(), tch::Device::Cpu).unwrap();
            // The first stage applies from the start, so the initial buckets hold its trainable set.
            if let Some(first) = stages_of(&t.stage, &frozen).first() {
                t.set_stage(first.clone()).unwrap();
            }
            t
        })
        .collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .zip(trainers)
        .enumerate()
        .map(|(rank, (listener, mut t))| {
            let (peers, stages) = (peers.clone(), stages_of(&t.stage, &frozen));
            std::thread::spawn(move || {
                let n = t.splits.train.len() as u64;
                let mut ctl = Recorder { seed: 11, n, world: world as u32, batch, stages, seen: Vec::new() };
                // TCP, as between hosts (two threads of one process could share memory).
                let options = RingOptions { shm: false, ..RingOptions::new(Duration::from_secs(60)) };
                let mut ring = RingCollective::connect_with(rank, world, listener, &peers, options).unwrap();
                t.sync_state(&mut ring, 0).unwrap();
                t.run_distributed(rank as u32, &mut ring, &mut ctl, bucket_bytes).unwrap();
                RankRun { vars: vars_of(&t), seen: ctl.seen }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn max_diff(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>, prefix: &str) -> f32 {
    a.iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .flat_map(|(n, x)| x.iter().zip(&b[n]).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn every_sample_exactly_once_per_epoch_and_equal_steps() {
    // 1000 samples over 2 ranks x batch 64 (global 128): 8 steps each, the last one padded.
    let runs = run_ranks(2, 64, 1000, 2, Vec::new());
    let per_rank: Vec<Vec<(u32, u64, Vec<usize>)>> = runs.into_iter().map(|r| r.seen).collect();
    for epoch in 0..2u32 {
        let mut count: HashMap<usize, u32> = HashMap::new();
        for rank in &per_rank {
            let steps: Vec<u64> = rank.iter().filter(|r| r.0 == epoch).map(|r| r.1).collect();
            assert_eq!(steps, (0..8).collect::<Vec<_>>(), "epoch {epoch}: every rank takes the same 8 steps");
            for (_, _, s) in rank.iter().filter(|r| r.0 == epoch) {
                for &i in s {
                    *count.entry(i).or_default() += 1;
                }
            }
        }
        assert_eq!(count.len(), 1000, "epoch {epoch}: every sample trained");
        assert!(count.values().all(|&c| c == 1), "epoch {epoch}: no sample twice");
    }
    let order = |e: u32| per_rank[0].iter().filter(|r| r.0 == e).flat_map(|r| r.2.clone()).collect::<Vec<_>>();
    assert_ne!(order(0), order(1), "a new order every epoch");
}

#[test]
fn a_group_unfrozen_mid_run_is_averaged_like_one_process() {
    // Epoch 1: LeNet-5's `conv` group frozen; epoch 2: everything trains. After the change the
    // rebuilt buckets must carry `conv`'s gradients: 2 ranks x 16 end where 1 rank x 32 ends.
    let stages = vec![vec![true, false, false], vec![false, false, false]];
    let two = run_ranks(2, 16, 300, 2, stages.clone());
    let one = run_ranks(1, 32, 300, 2, stages.clone());
    assert!(max_diff(&two[0].vars, &two[1].vars, "") == 0.0, "replicas are identical");
    let d = max_diff(&two[0].vars, &one[0].vars, "");
    assert!(d < 1e-4, "2 x 16 and 1 x 32 differ by {d} after the unfreeze");

    // The conv group really was frozen in epoch 1 and really trained in epoch 2.
    let first_epoch = run_ranks(1, 32, 300, 1, stages);
    let init = {
        let spec =
            JobSpec::from_toml(&lenet_job("init", Path::new("/tmp/unused"), "batch_size = 32", 300, 1), Path::new("/"))
                .unwrap();
        vars_of(&Trainer::prepare(spec, tch::Device::Cpu).unwrap())
    };
    assert_eq!(max_diff(&first_epoch[0].vars, &init, "conv"), 0.0, "conv stays bit-identical while frozen");
    assert!(max_diff(&first_epoch[0].vars, &init, "fc") > 0.0, "the rest trains in epoch 1");
    assert!(max_diff(&one[0].vars, &first_epoch[0].vars, "conv") > 1e-4, "conv trains after the unfreeze");
}

#[test]
fn overlapping_the_all_reduce_with_backward_changes_no_bit() {
    // 2 ranks over the TCP ring (threads of this test use TCP, never shared memory), 5 steps per epoch, small buckets (LeNet-5's 61,706 parameters in
    // several of them, so some are reduced while backward still runs); epoch 1 with `conv` frozen,
    // epoch 2 with everything training (the buckets are rebuilt at the stage change).
    let stages = vec![vec![true, false, false], vec![false, false, false]];
    let overlapped = run_ranks_with(2, 16, 160, 2, stages.clone(), 16 << 10, true);
    let plain = run_ranks_with(2, 16, 160, 2, stages, 16 << 10, false);
    for rank in 0..2 {
        let (a, b) = (&overlapped[rank].vars, &plain[rank].vars);
        assert_eq!(a.len(), b.len());
        for (name, x) in a {
            let same = x.iter().zip(&b[name]).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "rank {rank}: {name} differs between the overlapped and the plain step");
        }
        assert_eq!(overlapped[rank].seen, plain[rank].seen, "the same samples in the same steps");
    }
    assert_eq!(max_diff(&overlapped[0].vars, &overlapped[1].vars, ""), 0.0, "replicas are identical");
    let init = {
        let spec = JobSpec::from_toml(&lenet_job("init", Path::new("/tmp/unused"), "", 160, 1), Path::new("/")).unwrap();
        vars_of(&Trainer::prepare(spec, tch::Device::Cpu).unwrap())
    };
    assert!(max_diff(&overlapped[0].vars, &init, "conv") > 0.0, "conv trained after the stage change");
}

fn launch(spec: &Path, nproc: u32) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["launch", "--nproc", &nproc.to_string()])
        .arg(spec)
        .env("THAW_HOME", thaw_home())
        .env("THAW_OFFLINE", "1")
        .output()
        .unwrap()
}

fn f32s(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(n, v)| n.starts_with("model.") && v.dtype() == safetensors::Dtype::F32)
        .map(|(n, v)| (n, v.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect()
}

#[test]
fn two_workers_with_batch_b_match_one_worker_with_batch_2b() {
    // LeNet-5 has no BatchNorm, so replicas see no per-replica statistics: the averaged gradient of
    // 2 x 16 must equal the gradient of 1 x 32. 500 samples: 16 steps, the last one padded.
    let dir = tempfile::tempdir().unwrap();
    let mut cks = Vec::new();
    for (nproc, batch) in [(2u32, 16), (1, 32)] {
        let out = dir.path().join(format!("w{nproc}"));
        let spec = write_spec(
            dir.path(),
            &format!("w{nproc}"),
            &lenet_job(&format!("eq{nproc}"), &out, &format!("batch_size = {batch}\nmomentum = 0.9"), 500, 1),
        );
        let o = ok(launch(&spec, nproc));
        assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));
        cks.push(f32s(&out.join("checkpoint.safetensors")));
        if nproc == 2 {
            // Two processes on one host: the ring's data goes through shared memory.
            for rank in 0..2 {
                let log = std::fs::read_to_string(out.join(format!("logs/worker-{rank}.log"))).unwrap();
                let formed = log.lines().find(|l| l.contains("ring formed")).unwrap_or_else(|| panic!("{log}"));
                assert!(formed.contains("to_next=\"shm\"") && formed.contains("from_prev=\"shm\""), "{formed}");
            }
        }
    }
    let (two, one) = (&cks[0], &cks[1]);
    assert_eq!(two.len(), one.len());
    let mut worst = 0f32;
    let mut moved = 0f32;
    for (name, a) in two {
        let b = &one[name];
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
            moved = moved.max(x.abs());
        }
    }
    assert!(worst < 1e-4, "parameters differ by up to {worst}");
    assert!(moved > 0.0);
}

#[test]
fn device_requests_that_cannot_be_met_fail_before_anything_starts() {
    // This machine may have no GPU (CI never does): what each request gets depends on how many
    // libtorch sees, and the rules themselves are unit-tested in thaw_worker::device.
    let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let spec = write_spec(dir.path(), "dev", &lenet_job("dev", &out, "batch_size = 32", 200, 1));
    let spec = spec.to_str().unwrap();
    let too_many = (gpus + 1).to_string();
    let err = fails(thaw(&["launch", "--nproc", &too_many, "--device", "cuda", spec]));
    if gpus == 0 {
        assert!(err.contains("no GPU is visible"), "{err}");
    } else {
        assert!(err.contains(&format!("--nproc {too_many} with --device cuda needs {too_many} GPUs")), "{err}");
    }
    let err = fails(thaw(&["launch", "--nproc", "2", "--device", "cuda:0", spec]));
    assert!(err.contains("--device cuda:0 puts all 2 ranks on one GPU"), "{err}");
    assert!(!out.exists(), "nothing started: no output directory");
    let err = fails(thaw(&["worker", "--job", "x", "--device", "tpu"]));
    assert!(err.contains("unknown device `tpu`"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["worker", "--job", "x", "--device", "cpu"])
        .env("THAW_LOCAL_RANK", "first")
        .output()
        .unwrap();
    assert!(fails(o).contains("THAW_LOCAL_RANK=\"first\" is not a local rank"));
}

#[test]
fn the_health_endpoint_answers_probes_and_workers_exit_with_what_a_supervisor_needs() {
    // The plaintext health port (what kubelet's gRPC probes reach) on a port chosen here.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let health = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let mut coord = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--health-listen", &health, "--state-dir"])
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(coord.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    // Readiness is checked every second: the first answers may still be NOT_SERVING.
    let deadline = Instant::now() + Duration::from_secs(20);
    for service in ["", "thaw.v1.Jobs"] {
        loop {
            let o = thaw(&["health", &health, "--service", service]);
            if o.status.success() {
                assert!(stdout(&o).contains("SERVING"), "{}", stdout(&o));
                break;
            }
            assert!(Instant::now() < deadline, "{service:?} never SERVING: {}", stderr(&o));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The same protocol on the main port, no token needed.
    ok(thaw(&["health", url.trim_start_matches("http://")]));

    // Exit statuses: 3 for a job that can never run here, 1 for what a restart may cure.
    let o = thaw_url(&["worker", "--job", "no-such-job"], &url);
    assert_eq!(o.status.code(), Some(3), "an unknown job is permanent: {}", stderr(&o));
    assert!(stderr(&o).contains("no-such-job"), "{}", stderr(&o));
    let o = thaw(&["worker", "--job", "x", "--device", "cuda:7"]);
    assert_eq!(o.status.code(), Some(3), "a device that does not exist is permanent: {}", stderr(&o));
    let started = Instant::now();
    let o = thaw(&[
        "worker",
        "--job",
        "x",
        "--coordinator",
        "http://thaw-coordinator.invalid:7070",
        "--connect-timeout-secs",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(1), "an unreachable coordinator is retryable: {}", stderr(&o));
    assert!(stderr(&o).contains("cannot reach the coordinator at http://thaw-coordinator.invalid:7070"), "{}", stderr(&o));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(20), "waited {waited:?}");
    let err = fails(thaw(&["worker", "--job", "x", "--connect-timeout-secs", "0"]));
    assert!(err.contains("--connect-timeout-secs 0: must be a positive"), "{err}");

    let _ = coord.kill();
    let _ = coord.wait();
    let err = fails(thaw(&["health", &health, "--timeout-secs", "2"]));
    assert!(err.contains(&health), "a closed port is named: {err}");
}

#[test]
fn one_worker_process_runs_several_local_ranks() {
    // `thaw worker --local-ranks 2` (k ranks in a k-GPU pod, here on CPU): one process starts
    // both ranks of a 2-worker job, each with its own THAW_LOCAL_RANK and worker id.
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, url) = start_coordinator(&dir.path().join("state"));
    let out = dir.path().join("out");
    let spec = write_spec(
        dir.path(),
        "pair",
        &lenet_job("pair", &out, "batch_size = 32", 600, 1).replace("[output]", "[distributed]\nworkers = 2\n[output]"),
    );
    ok(thaw_url(&["submit", spec.to_str().unwrap()], &url));
    let o = thaw_url(&["worker", "--job", "pair", "--local-ranks", "2", "--worker-id", "pod-a"], &url);
    assert!(o.status.success(), "{}", stderr(&o));
    let status = stdout(&ok(thaw_url(&["status", "pair", "--json"], &url)));
    assert!(status.contains("\"succeeded\""), "{status}");
    assert!(stdout(&o).contains("final validation accuracy"), "rank 0 reports: {}", stdout(&o));
    // The coordinator names rank 0 by its worker id.
    let text = stdout(&ok(thaw_url(&["status", "pair"], &url)));
    assert!(text.contains("pod-a-0") || text.contains("pod-a-1"), "{text}");
    assert!(stderr(&o).matches("joined rank=").count() == 2, "two ranks joined:\n{}", stderr(&o));
    let err = fails(thaw_url(&["worker", "--job", "pair", "--local-ranks", "0"], &url));
    assert!(err.contains("--local-ranks 0: must be between 1 and 64"), "{err}");
    let _ = coord.kill();
    let _ = coord.wait();
}

#[test]
fn bad_input_to_the_cluster_gets_clear_errors() {
    // A worker pointed at an address where nothing listens: bounded retries, then a clear error.
    let started = Instant::now();
    let err = fails(thaw_url(&["worker", "--job", "x", "--coordinator", "http://127.0.0.1:9"], "http://127.0.0.1:9"));
    assert!(err.contains("cannot reach the coordinator at http://127.0.0.1:9 after 5 attempts"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));

    let dir = tempfile::tempdir().unwrap();
    let (mut coord, url) = start_coordinator(&dir.path().join("state"));
    let out = dir.path().join("out");
    let spec = write_spec(dir.path(), "solo", &lenet_job("solo", &out, "batch_size = 32", 4000, 3));
    let o = ok(thaw_url(&["submit", spec.to_str().unwrap()], &url));
    assert_eq!(stdout(&o).trim(), "solo");
    let err = fails(thaw_url(&["submit", spec.to_str().unwrap()], &url));
    assert!(err.contains("a job named `solo` already exists"), "{err}");

    // A malformed spec sent straight over gRPC (bypassing the CLI's own check).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let mut c = thaw_proto::v1::jobs_client::JobsClient::connect(url.clone()).await.unwrap();
        c.submit(thaw_proto::v1::SubmitRequest {
            spec_toml: "name = \"m\"\n[model]\narch = \"lenet5\"\nepochz = 1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("model") || status.message().contains("epochz"), "{}", status.message());

    // One worker forms the 1-worker group; a second one arrives after the rendezvous closed.
    let mut first = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["worker", "--job", "solo", "--worker-id", "first", "--coordinator", &url])
        .env("THAW_HOME", thaw_home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stdout(&thaw_url(&["status", "solo", "--json"], &url));
        if s.contains("\"running\"") {
            break;
        }
        assert!(Instant::now() < deadline, "job never started: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let err = fails(thaw_url(&["worker", "--job", "solo", "--worker-id", "late", "--coordinator", &url], &url));
    assert!(err.contains("job `solo` is full: 1 workers (distributed.max_workers)"), "{err}");
    ok(thaw_url(&["cancel", "solo"], &url));
    let status = first.wait().unwrap();
    assert!(!status.success(), "a cancelled worker exits non-zero");
    let _ = coord.kill();
    let _ = coord.wait();
}

#[test]
fn a_worker_that_cannot_start_ends_the_launch_with_its_error() {
    // This build has no NCCL (or no GPU): the workers fail before joining; launch must not wait for
    // the join timeout, and must show why.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let spec = write_spec(
        dir.path(),
        "nccl",
        &format!(
            "{}[distributed]\ncollective = \"nccl\"\njoin_timeout_secs = 600.0\n",
            lenet_job("nccl", &out, "batch_size = 16", 256, 1)
        ),
    );
    let started = Instant::now();
    let o = launch(&spec, 2);
    let err = fails(o);
    assert!(started.elapsed() < Duration::from_secs(120), "launch waited for the join timeout");
    assert!(err.contains("built without NCCL") || err.contains("not loadable"), "{err}");
}

#[test]
fn sigterm_on_a_worker_is_a_graceful_leave_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (mut coord, url) = start_coordinator(&dir.path().join("state"));
    let spec = write_spec(
        dir.path(),
        "term",
        &lenet_job("term", &out, "batch_size = 16\n[distributed]\nmin_workers = 1\nmax_workers = 2", 6000, 2),
    );
    ok(thaw_url(&["submit", spec.to_str().unwrap()], &url));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_thaw"))
                .args(["worker", "--job", "term", "--worker-id", &format!("w{i}"), "--coordinator", &url])
                .env("THAW_HOME", thaw_home())
                .env("THAW_TORCH_THREADS", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = stdout(&thaw_url(&["status", "term", "--json"], &url));
        if s.contains("\"running\"") && s.contains("\"workers\": 2") && !s.contains("\"step\": 0,") {
            break;
        }
        assert!(Instant::now() < deadline, "job never got going: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Command::new("kill").args(["-TERM", &workers[1].id().to_string()]).status().unwrap();
    for mut w in workers {
        let st = w.wait().unwrap();
        assert!(st.success(), "the leaver finishes its step and exits 0; the other finishes the job");
    }
    let s = stdout(&thaw_url(&["status", "term", "--json"], &url));
    let job: serde_json::Value = serde_json::from_str(&s).unwrap();
    let job = if job.is_array() { job[0].clone() } else { job };
    assert_eq!(job["state"], "succeeded", "{s}");
    assert_eq!(
        (job["progress"]["generation"].as_u64(), job["progress"]["restarts"].as_u64()),
        (Some(2), Some(0)),
        "{s}"
    );
    let reasons: Vec<&str> =
        job["transitions"].as_array().unwrap().iter().filter_map(|t| t["reason"].as_str()).collect();
    // The leaver's goodbye or the survivor's re-join reaches the coordinator first; either names it.
    assert!(reasons.iter().any(|r| r.contains("left")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("generation 2 formed with 1 workers")), "{reasons:?}");
    let _ = coord.kill();
    let _ = coord.wait();
}

#[test]
fn interrupting_launch_cancels_keeps_a_checkpoint_and_leaves_no_worker() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let spec = write_spec(dir.path(), "long", &lenet_job("long", &out, "batch_size = 16", 20000, 5));
    let (mut child, url) = spawn_launch(&spec, &["--nproc", "2"], &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = stdout(&thaw_url(&["status", "long", "--json"], &url));
        if s.contains("\"running\"") && !s.contains("\"step\": 0,") {
            break;
        }
        assert!(Instant::now() < deadline, "job never got going: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "a cancelled launch exits 130");
    assert!(out.join("checkpoint.safetensors").is_file(), "rank 0 checkpointed on the way out");
    let left = Command::new("pgrep").args(["-f", &format!("coordinator {url}")]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "orphan workers: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    let _: PathBuf = out;
}

#[test]
fn the_coordinators_schedule_reaches_every_worker_with_cached_affine_epochs() {
    // Progressive unfreezing over 3 epochs on 2 workers: stage 1 (epochs 1-2) trains the head from
    // cached trunk outputs, stage 2 (epoch 3) also trains stage7. Every worker applies the stages
    // the coordinator sends, and caches only its own samples (rank affinity): its second epoch
    // hits on every sample it cached.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("prog");
    let text = format!(
        "name = \"prog2\"\nseed = 5\n[model]\narch = \"mobilenet_v2\"\nweights = \"imagenet\"\n[data]\nformat = \"idx\"\n\
         root = \"{}\"\nimage_size = 32\ntrain_limit = 256\nval_limit = 64\n[train]\nepochs = 3\nbatch_size = 32\nlr = 0.01\n\
         [schedule]\nstrategy = \"progressive\"\nevery = 2\n[distributed]\nworkers = 2\n[output]\ndir = \"{}\"\n",
        fashion_mnist().display(),
        out.display()
    );
    let spec = write_spec(dir.path(), "prog2", &text);
    let o = ok(launch(&spec, 2));
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));
    // Worker i is not necessarily rank i: ranks follow the order of joining.
    let logs: Vec<String> =
        (0..2).map(|i| std::fs::read_to_string(out.join(format!("logs/worker-{i}.log"))).unwrap()).collect();
    for log in &logs {
        // 256 samples, 2 ranks x 32: each rank caches its 128 and reads them all in epoch 2.
        assert!(log.contains("128 training entries") && log.contains("128 hits"), "{log}");
    }
    // Rank 0 logs the stage change of epoch 3.
    let stage2 = logs.iter().flat_map(|l| l.lines()).find(|l| l.contains("INFO stage") && l.contains("stage=2"));
    assert!(stage2.is_some_and(|l| l.contains("trainable=\"stage7,head\"")), "{logs:?}");
}
