//! Fault injection with real processes on 127.0.0.1: `thaw launch` jobs whose workers are killed
//! (kill -9), stopped (SIGSTOP) or interrupted, then resumed on another world size. Every run
//! checks the exactly-once ledger the workers write (`THAW_LEDGER_DIR`): every sample of every
//! epoch trained exactly once, at most one step lost per failure. `scripts/faults.sh N` runs many
//! seeded drills of the same kinds; this is the CI share.

mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use thaw_worker::checkpoint::Checkpoint;

/// A LeNet-5 job on `limit` Fashion-MNIST samples with short failure deadlines.
fn job(name: &str, out: &Path, limit: usize, epochs: usize, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nseed = 21\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
         train_limit = {limit}\nval_limit = 200\n[train]\nepochs = {epochs}\nbatch_size = 16\nlr = 0.05\nmomentum = 0.9\n\
         [output]\ndir = \"{}\"\n{extra}\n[distributed]\nheartbeat_timeout_secs = 1.5\nstep_timeout_secs = 4.0\n\
         rejoin_timeout_secs = 60.0\n",
        fashion_mnist().display(),
        out.display()
    )
}

/// A running `thaw launch`, its coordinator's URL and its ledger directory.
struct Launch {
    child: Child,
    url: String,
    ledger: PathBuf,
}

fn start_launch(spec: &Path, args: &[&str], ledger: &Path) -> Launch {
    start_launch_with(spec, args, ledger, &[])
}

fn start_launch_with(spec: &Path, args: &[&str], ledger: &Path, envs: &[(&str, &std::ffi::OsStr)]) -> Launch {
    let mut all = vec![("THAW_LEDGER_DIR", ledger.as_os_str())];
    all.extend_from_slice(envs);
    let (child, url) = spawn_launch(spec, args, &all);
    Launch { child, url, ledger: ledger.to_path_buf() }
}

fn status(url: &str, job: &str) -> serde_json::Value {
    let o = authorize(&mut Command::new(env!("CARGO_BIN_EXE_thaw")), url)
        .args(["status", job, "--json", "--coordinator", url])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    if v.is_array() {
        v[0].clone()
    } else {
        v
    }
}

/// Waits until the job runs with `workers` workers at step `step` or later of its first epoch.
fn wait_running(l: &Launch, job: &str, workers: u64, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(&l.url, job);
        let p = &s["progress"];
        if s["state"] == "running" && p["workers"].as_u64() == Some(workers) && p["step"].as_u64() >= Some(step) {
            return;
        }
        assert!(Instant::now() < deadline, "job never got to step {step}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The worker processes of a launch (its children).
fn workers_of(l: &Launch) -> Vec<u32> {
    let o = Command::new("pgrep").args(["-P", &l.child.id().to_string()]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().filter_map(|p| p.trim().parse().ok()).collect()
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

fn finish(mut l: Launch) -> (i32, serde_json::Value) {
    let code = l.child.wait().unwrap().code().unwrap_or(-1);
    let out = l.child.stdout.take().map(|mut o| {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut o, &mut s).unwrap();
        s
    });
    (code, serde_json::json!({ "stdout": out }))
}

/// Every tensor of a checkpoint, by name.
fn tensors(path: &Path) -> HashMap<String, tch::Tensor> {
    Checkpoint::load(path).unwrap().model
}

#[test]
fn a_killed_worker_is_respawned_and_the_job_ends_bit_identical_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (n, epochs) = (24000u64, 2u64);
    // The reference: the same job, never interrupted.
    let ref_out = dir.path().join("ref");
    let spec = write_spec(dir.path(), "ref", &job("kill", &ref_out, n as usize, epochs as usize, ""));
    let (code, o) = finish(start_launch(&spec, &["--nproc", "2"], &dir.path().join("ref-ledger")));
    assert_eq!(code, 0, "{o}");

    let out = dir.path().join("kill");
    let spec = write_spec(dir.path(), "kill", &job("kill", &out, n as usize, epochs as usize, ""));
    let l = start_launch(&spec, &["--nproc", "2", "--max-restarts", "1"], &dir.path().join("ledger"));
    wait_running(&l, "kill", 2, 40);
    let victim = workers_of(&l)[1];
    signal(victim, "-KILL");
    let killed_at = Instant::now();
    // The job recovers: a new generation of 2 (the respawned worker took the survivor's state).
    let deadline = Instant::now() + Duration::from_secs(60);
    let recovered = loop {
        let s = status(&l.url, "kill");
        if s["progress"]["generation"].as_u64() >= Some(2) && s["state"] == "running" {
            break s;
        }
        assert!(Instant::now() < deadline, "no recovery: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("recovered in {:?}: {}", killed_at.elapsed(), recovered["transitions"]);
    let ledger = l.ledger.clone();
    let (code, o) = finish(l);
    assert_eq!(code, 0, "{o}");

    let runs = [(read_ledger(&ledger), None)];
    let (counts, lost) = tally(&runs);
    assert_exactly_once(&counts, n, epochs);
    assert!(lost.iter().all(|&k| k <= 1), "at most one step lost per failure: {lost:?}");
    // Order alone decides a LeNet-5 run: the recovered job's weights are the uninterrupted one's.
    let (a, b) = (tensors(&ref_out.join("checkpoint.safetensors")), tensors(&out.join("checkpoint.safetensors")));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs from the uninterrupted run");
    }
}

#[test]
fn a_stopped_worker_is_dropped_and_the_others_finish_every_sample_once() {
    let dir = tempfile::tempdir().unwrap();
    let (n, epochs) = (24000u64, 2u64);
    let out = dir.path().join("stop");
    let spec = write_spec(dir.path(), "stop", &job("stop", &out, n as usize, epochs as usize, ""));
    let l = start_launch(&spec, &["--nproc", "3", "--min-nproc", "2"], &dir.path().join("ledger"));
    wait_running(&l, "stop", 3, 20);
    let victim = workers_of(&l)[2];
    signal(victim, "-STOP");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&l.url, "stop");
        if s["progress"]["generation"].as_u64() >= Some(2) && s["progress"]["workers"].as_u64() == Some(2) {
            let why: Vec<String> =
                s["transitions"].as_array().unwrap().iter().map(|t| t["reason"].to_string()).collect();
            assert!(why.iter().any(|r| r.contains("no heartbeat") || r.contains("timed out")), "{why:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the stopped worker was never dropped: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let it die for good; the launch has no restarts left and goes on with 2.
    signal(victim, "-KILL");
    let ledger = l.ledger.clone();
    let (code, o) = finish(l);
    assert_eq!(code, 0, "{o}");
    let (counts, lost) = tally(&[(read_ledger(&ledger), None)]);
    assert_exactly_once(&counts, n, epochs);
    assert!(lost.iter().all(|&k| k <= 1), "{lost:?}");
}

#[test]
fn a_run_stopped_mid_epoch_resumes_on_one_and_on_three_workers_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (n, epochs) = (24000u64, 2u64);
    let out = dir.path().join("first");
    let spec = write_spec(
        dir.path(),
        "first",
        &job("res", &out, n as usize, epochs as usize, "checkpoint_every_steps = 20\nkeep_checkpoints = 3"),
    );
    let l = start_launch(&spec, &["--nproc", "2"], &dir.path().join("ledger0"));
    wait_running(&l, "res", 2, 60);
    // Ctrl-C: the job is cancelled at a step boundary and rank 0 checkpoints there.
    signal(l.child.id(), "-INT");
    let ledger0 = l.ledger.clone();
    let (code, _) = finish(l);
    assert_eq!(code, 130);
    let ck = out.join("checkpoint.safetensors");
    let at = Checkpoint::cursor_of(&ck).unwrap();
    assert!(at.epoch == 0 && at.step > 0, "stopped mid-epoch 1: {at:?}");
    let kept: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-e"))
        .collect();
    assert!(!kept.is_empty() && kept.len() <= 2, "keep_checkpoints = 3 keeps the latest and 2 before: {kept:?}");
    let cutoff = Some((u64::from(at.epoch), at.step));

    for nproc in [1u32, 3] {
        let resumed_out = dir.path().join(format!("resumed{nproc}"));
        std::fs::copy(&ck, dir.path().join(format!("ck{nproc}.safetensors"))).unwrap();
        let spec =
            write_spec(dir.path(), &format!("r{nproc}"), &job("res", &resumed_out, n as usize, epochs as usize, ""));
        let ck_copy = dir.path().join(format!("ck{nproc}.safetensors"));
        let ledger = dir.path().join(format!("ledger{nproc}"));
        let l = start_launch(&spec, &["--nproc", &nproc.to_string(), "--resume", ck_copy.to_str().unwrap()], &ledger);
        let (code, o) = finish(l);
        assert_eq!(code, 0, "resume on {nproc}: {o}");
        let runs = [(read_ledger(&ledger0), cutoff), (read_ledger(&ledger), None)];
        let (counts, _) = tally(&runs);
        assert_exactly_once(&counts, n, epochs);
    }
}

/// Every checkpoint in `dir` loads, and no partial write is left beside them.
fn assert_checkpoints_load(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".tmp"), "a partial write was left: {name}");
        if name.starts_with("checkpoint") && name.ends_with(".safetensors") {
            Checkpoint::load(&dir.join(&name)).unwrap_or_else(|e| panic!("{name} does not load: {e}"));
            n += 1;
        }
    }
    n
}

#[test]
fn kills_during_a_checkpoint_write_an_evaluation_and_a_stage_change_each_cost_one_respawn() {
    // A MobileNetV2 subset under progressive unfreezing (epoch 1 trains the head, epoch 2 one more
    // group), checkpointing every 10 steps. Three failpoints kill a worker with SIGKILL at exact
    // moments: rank 0 half-way through a checkpoint write (epoch 1), rank 1 after scoring its
    // share of the validation set (end of epoch 1), rank 0 as stage 2 begins. Each time the launch
    // respawns the worker, which rejoins and receives the survivor's state.
    let dir = tempfile::tempdir().unwrap();
    let (n, epochs) = (1536u64, 2u64);
    let out = dir.path().join("out");
    let text = format!(
        "name = \"points\"\nseed = 5\n[model]\narch = \"mobilenet_v2\"\nweights = \"imagenet\"\n[data]\nformat = \"idx\"\n\
         root = \"{}\"\nimage_size = 32\ntrain_limit = {n}\nval_limit = 256\n[train]\nepochs = {epochs}\nbatch_size = 16\n\
         lr = 0.01\nmomentum = 0.9\n[schedule]\nstrategy = \"progressive\"\nevery = 1\n[output]\ndir = \"{}\"\n\
         checkpoint_every_steps = 10\nkeep_checkpoints = 3\n[distributed]\nheartbeat_timeout_secs = 3\n\
         step_timeout_secs = 10\nrejoin_timeout_secs = 60\n",
        fashion_mnist().display(),
        out.display()
    );
    let spec = write_spec(dir.path(), "points", &text);
    let m = |name: &str| dir.path().join(name);
    let points = format!(
        "checkpoint-write:{},evaluate@1:{},stage-change@0:{}",
        m("fired-ckpt").display(),
        m("fired-eval").display(),
        m("fired-stage").display()
    );
    let l = start_launch_with(
        &spec,
        &["--nproc", "2", "--max-restarts", "3"],
        &dir.path().join("ledger"),
        &[("THAW_FAILPOINT", std::ffi::OsStr::new(&points))],
    );
    let ledger = l.ledger.clone();
    let (code, o) = finish(l);
    assert_eq!(code, 0, "{o}");
    for f in ["fired-ckpt", "fired-eval", "fired-stage"] {
        assert!(m(f).exists(), "failpoint {f} never fired");
    }
    let ledger = read_ledger(&ledger);
    let generations = ledger.steps.keys().map(|k| k.0).max().unwrap();
    assert!(generations >= 4, "three failures, three re-formed groups: {generations} generations");
    let (counts, lost) = tally(&[(ledger, None)]);
    assert_exactly_once(&counts, n, epochs);
    assert!(lost.iter().all(|&k| k <= 1), "at most one step lost per failure: {lost:?}");
    assert!(assert_checkpoints_load(&out) >= 2, "the final checkpoint and the kept ones");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics.as_array().map(|a| a.len()), Some(epochs as usize), "one evaluation per epoch: {metrics}");
}

#[test]
fn a_worker_added_mid_epoch_is_admitted_at_a_step_boundary_and_trains_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let (n, epochs) = (24000u64, 1u64);
    let out = dir.path().join("add");
    let spec = write_spec(dir.path(), "add", &job("add", &out, n as usize, epochs as usize, ""));
    let ledger = dir.path().join("ledger");
    let l = start_launch(&spec, &["--nproc", "2", "--max-nproc", "3"], &ledger);
    wait_running(&l, "add", 2, 40);
    let mut extra = authorize(&mut Command::new(env!("CARGO_BIN_EXE_thaw")), &l.url)
        .args(["worker", "--job", "add", "--coordinator", &l.url])
        .env("THAW_HOME", thaw_home())
        .env("THAW_LEDGER_DIR", &ledger)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_running(&l, "add", 3, 0);
    let s = status(&l.url, "add");
    assert_eq!(s["progress"]["restarts"].as_u64(), Some(0), "an added worker is not a failure: {s}");
    let (code, o) = finish(l);
    assert_eq!(code, 0, "{o}");
    assert!(extra.wait().unwrap().success(), "the added worker ends with the job");
    let ledger = read_ledger(&ledger);
    // The last generation is the group of three: each rank logged its joining.
    let last = ledger.steps.keys().map(|k| k.0).max().unwrap();
    let mut ranks = std::collections::BTreeSet::new();
    for f in std::fs::read_dir(dir.path().join("ledger")).unwrap() {
        for line in std::fs::read_to_string(f.unwrap().path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["gen"].as_u64() == Some(last) && v.get("rank").is_some() {
                ranks.insert(v["rank"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(ranks, (0..3).collect(), "generation {last} has three ranks");
    let (counts, lost) = tally(&[(ledger, None)]);
    assert_exactly_once(&counts, n, epochs);
    assert!(lost.iter().all(|&k| k <= 1), "{lost:?}");
}
