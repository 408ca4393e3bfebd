//! What one killed worker costs: thaw's recovery in place against `torchrun --max-restarts 1` with
//! a PyTorch DDP script that checkpoints every `CKPT_EVERY` steps (`recovery_torch.py`), on the
//! same job (LeNet-5, 24,000 Fashion-MNIST samples, 2 epochs, 2 workers x batch 16, SGD) and the
//! same kill (`kill -9` of rank 1 once it has computed step `KILL_AT` of epoch 1), in the same run.
//!
//! Each side runs twice, uninterrupted and with the kill. Reported per side: wall time of both,
//! time lost (the difference), steps computed twice (from per-step logs: thaw's exactly-once
//! ledger, the baseline's per-rank step log), and recovery time (kill to the first step computed
//! after it by the new group). thaw also checkpoints every `CKPT_EVERY` steps, but recovers from
//! the survivors' memory, not from the file.
//!
//! `THAW_BENCH_KILL_AT` and `THAW_BENCH_CKPT_EVERY` change the two points; the baseline's torch is
//! installed on demand into `.thaw/bench-venv` (see `common`); `THAW_BENCH_NO_BASELINE=1` runs
//! thaw's side alone.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LIMIT: usize = 24000;
const EPOCHS: usize = 2;
const BATCH: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// One run's figures.
struct Run {
    wall: f64,
    redone: usize,
    recovery: Option<f64>,
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// How long a run may take before the bench gives up on it (and says so).
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// Polls `hit` every 20 ms until it answers, or `child` ends (None); kills `child` and panics
/// past [`RUN_LIMIT`].
fn poll<T>(child: &mut Child, mut hit: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        if let Some(v) = hit() {
            return Some(v);
        }
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if Instant::now() > deadline {
            let _ = Command::new("pkill").args(["-9", "-P", &child.id().to_string()]).status();
            let _ = child.kill();
            panic!("no progress within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The (generation, epoch, step) keys of thaw's ledger, one per step a rank computed.
fn thaw_ledger(dir: &Path) -> Vec<(u64, u64, u64)> {
    let mut keys = Vec::new();
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for line in std::fs::read_to_string(f.path()).unwrap_or_default().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if v.get("x").is_some() {
                keys.push((v["gen"].as_u64().unwrap(), v["e"].as_u64().unwrap(), v["s"].as_u64().unwrap()));
            }
        }
    }
    keys
}

fn thaw_run(thaw_home: &Path, work: &Path, kill_at: Option<usize>, every: usize) -> Run {
    let tag = if kill_at.is_some() { "kill" } else { "clean" };
    eprintln!("thaw, {tag} run");
    let out = work.join(format!("thaw-{tag}"));
    let ledger = work.join(format!("thaw-{tag}-ledger"));
    let spec = work.join(format!("thaw-{tag}.toml"));
    std::fs::write(
        &spec,
        format!(
            "name = \"recovery\"\nseed = 21\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\n\
             root = \"{}\"\ntrain_limit = {LIMIT}\nval_limit = 500\n[train]\nepochs = {EPOCHS}\nbatch_size = {BATCH}\n\
             lr = 0.05\nmomentum = 0.9\n[output]\ndir = \"{}\"\ncheckpoint_every_steps = {every}\n",
            repo().join(".thaw/data/fashion-mnist").display(),
            out.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["launch", "--nproc", "2", "--max-restarts", "1"])
        .arg(&spec)
        .env("THAW_HOME", thaw_home)
        .env("THAW_LEDGER_DIR", &ledger)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut recovery = None;
    if let Some(k) = kill_at {
        let hit =
            poll(&mut child, || thaw_ledger(&ledger).iter().any(|&(_, e, s)| e == 0 && s >= k as u64).then_some(()));
        assert!(hit.is_some(), "thaw's job ended before step {k}");
        let pids = Command::new("pgrep").args(["-P", &child.id().to_string()]).output().unwrap();
        let victim: u32 = String::from_utf8_lossy(&pids.stdout).lines().last().unwrap().trim().parse().unwrap();
        kill9(victim);
        let killed = Instant::now();
        poll(&mut child, || thaw_ledger(&ledger).iter().any(|k| k.0 >= 2).then_some(()));
        recovery = Some(killed.elapsed().as_secs_f64());
    }
    assert!(child.wait().unwrap().success(), "thaw launch failed (see {})", out.join("logs").display());
    let wall = started.elapsed().as_secs_f64();
    // A step computed by two generations was computed twice (the world came back to 2, so the
    // plan and its step numbers are the same).
    let mut gens: HashMap<(u64, u64), std::collections::BTreeSet<u64>> = HashMap::new();
    for (g, e, s) in thaw_ledger(&ledger) {
        gens.entry((e, s)).or_default().insert(g);
    }
    let redone = gens.values().map(|g| g.len() - 1).sum();
    Run { wall, redone, recovery }
}

/// The baseline's per-step log lines of every rank: (time, epoch, step, restart).
fn torch_log(dir: &Path) -> Vec<(usize, f64, u64, u64, u64)> {
    let mut v = Vec::new();
    for r in 0..2 {
        for line in std::fs::read_to_string(dir.join(format!("rank-{r}.log"))).unwrap_or_default().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 4 {
                v.push((r, f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap()));
            }
        }
    }
    v
}

fn torch_run(py: &Path, work: &Path, kill_at: Option<usize>, every: usize) -> Run {
    let tag = if kill_at.is_some() { "kill" } else { "clean" };
    eprintln!("torchrun, {tag} run");
    let out = work.join(format!("torch-{tag}"));
    let logs = work.join(format!("torch-{tag}-logs"));
    std::fs::create_dir_all(&out).unwrap();
    let started = Instant::now();
    let mut child = Command::new(py)
        .args(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1"])
        .args(["--monitor-interval", "0.1"])
        .arg(repo().join("benches/recovery_torch.py"))
        .arg(repo().join(".thaw/data/fashion-mnist"))
        .args([LIMIT.to_string(), EPOCHS.to_string(), BATCH.to_string(), every.to_string()])
        .arg(&out)
        .arg(&logs)
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut recovery = None;
    if let Some(k) = kill_at {
        let hit =
            poll(&mut child, || torch_log(&logs).iter().any(|l| l.0 == 1 && l.2 == 0 && l.3 >= k as u64).then_some(()));
        assert!(hit.is_some(), "the baseline ended before step {k}");
        let pid: u32 = std::fs::read_to_string(logs.join("rank-1.pid")).unwrap().trim().parse().unwrap();
        let killed_at = now_s();
        kill9(pid);
        let first = poll(&mut child, || {
            torch_log(&logs).iter().filter(|l| l.4 >= 1).map(|l| l.1).min_by(|a, b| a.total_cmp(b))
        });
        recovery = first.map(|t| t - killed_at);
    }
    assert!(child.wait().unwrap().success(), "torchrun failed (logs in {})", logs.display());
    let wall = started.elapsed().as_secs_f64();
    let mut seen: HashMap<(usize, u64, u64), usize> = HashMap::new();
    for (r, _, e, s, _) in torch_log(&logs) {
        *seen.entry((r, e, s)).or_default() += 1;
    }
    // Steps of rank 0 computed more than once (every rank redoes the same steps).
    let redone = seen.iter().filter(|(k, _)| k.0 == 0).map(|(_, n)| n - 1).sum();
    Run { wall, redone, recovery }
}

fn row(name: &str, clean: &Run, kill: &Run) {
    println!(
        "| {name} | {:.1} | {:.1} | {:.1} | {} | {} |",
        clean.wall,
        kill.wall,
        kill.wall - clean.wall,
        kill.redone,
        kill.recovery.map_or("-".into(), |r| format!("{r:.2}"))
    );
    assert_eq!(clean.redone, 0, "{name}: an uninterrupted run computes each step once");
}

fn main() {
    let kill_at = env_usize("THAW_BENCH_KILL_AT", 450);
    let every = env_usize("THAW_BENCH_CKPT_EVERY", 100);
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    println!(
        "LeNet-5, {LIMIT} Fashion-MNIST samples, {EPOCHS} epochs, 2 workers x batch {BATCH} \
         ({} steps per epoch); kill -9 of rank 1 at step {kill_at} of epoch 1; checkpoints every {every} steps\n",
        LIMIT / (2 * BATCH)
    );
    let baseline = if std::env::var_os("THAW_BENCH_NO_BASELINE").is_some() { None } else { common::baseline_python() };
    let thaw = (thaw_run(&home, work.path(), None, every), thaw_run(&home, work.path(), Some(kill_at), every));
    let torch = baseline
        .map(|py| (torch_run(&py, work.path(), None, every), torch_run(&py, work.path(), Some(kill_at), every)));
    println!("| | uninterrupted s | with the kill s | time lost s | steps computed twice | kill to next step s |");
    println!("|---|---|---|---|---|---|");
    row("thaw launch --max-restarts 1", &thaw.0, &thaw.1);
    if let Some((c, k)) = &torch {
        row("torchrun --max-restarts 1 (DDP, gloo)", c, k);
    }
}
