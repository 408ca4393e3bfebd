//! All-reduce time of thaw's TCP ring against PyTorch's gloo, between two local processes, in the
//! same run.
//!
//! For 4, 44 (about ResNet18's gradients) and 100 MiB of `f32`: this process is rank 0 and runs
//! itself again as rank 1 (`THAW_RING_BENCH_PEER` carries rank 0's address; rank 1 answers with its
//! own on stdout). Each iteration is a barrier (not timed), then a timed `all_reduce_mean`; the first
//! result is checked; after warm-up iterations the median is reported with the algorithmic
//! bandwidth (buffer bytes / time). gloo's side (`ring_allreduce_gloo.py`) does the same with
//! `torch.distributed`, timing `all_reduce` alone (a sum: gloo has no mean, and the division it would
//! need is not counted). `gloo/thaw` is the time ratio (above 1: thaw is faster).
//!
//! The baseline's torch is installed on demand into `.thaw/bench-venv` (see `common`).
//! `THAW_BENCH_NO_BASELINE=1` runs thaw's side alone; `THAW_BENCH_WARMUP` and `THAW_BENCH_ITERS` set
//! the iterations; `THAW_BENCH_SIZES_MIB` (comma-separated) the sizes; `THAW_RING_SEGMENT_BYTES` the
//! ring's segment size.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thaw_worker::collective::{Collective, RingCollective, RingOptions, DEFAULT_SEGMENT_BYTES};

const SIZES_MIB: [usize; 3] = [4, 44, 100];

/// The sizes to run: `SIZES_MIB`, or `THAW_BENCH_SIZES_MIB` (comma-separated).
fn sizes_mib() -> Vec<usize> {
    match std::env::var("THAW_BENCH_SIZES_MIB") {
        Ok(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).filter(|&s| s > 0).collect(),
        Err(_) => SIZES_MIB.to_vec(),
    }
}
const PEER_ENV: &str = "THAW_RING_BENCH_PEER";
const TIMEOUT: Duration = Duration::from_secs(60);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn options() -> RingOptions {
    RingOptions { timeout: TIMEOUT, segment_bytes: env_usize("THAW_RING_SEGMENT_BYTES", DEFAULT_SEGMENT_BYTES) }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The same schedule on both ranks; the median ms of each size.
fn schedule(ring: &mut RingCollective, warmup: usize, iters: usize) -> Result<Vec<f64>, String> {
    let mut medians = Vec::new();
    for mib in sizes_mib() {
        let len = (mib << 20) / 4;
        let offset = 2.0 * ring.rank() as f32;
        let mut buf: Vec<f32> = (0..len).map(|i| (i % 1000) as f32 + offset).collect();
        let mut times = Vec::new();
        for i in 0..warmup + iters {
            ring.barrier().map_err(|e| e.to_string())?;
            let t = Instant::now();
            ring.all_reduce_mean(&mut buf).map_err(|e| e.to_string())?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            // The mean of x and x + 2 is x + 1, exactly; later iterations average equal buffers.
            if i == 0 {
                if let Some(j) = buf.iter().enumerate().position(|(j, &x)| x != (j % 1000) as f32 + 1.0) {
                    return Err(format!("wrong mean at {j} of {mib} MiB: {}", buf[j]));
                }
            }
            if i >= warmup {
                times.push(ms);
            }
        }
        medians.push(median(times));
    }
    Ok(medians)
}

/// Rank 1, in the process rank 0 started.
fn rank1(peer0: &str, warmup: usize, iters: usize) -> Result<(), String> {
    let peer0: SocketAddr = peer0.parse().map_err(|e| format!("bad {PEER_ENV} `{peer0}`: {e}"))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let me = listener.local_addr().map_err(|e| e.to_string())?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{me}").and_then(|()| stdout.flush()).map_err(|e| e.to_string())?;
    let mut ring = RingCollective::connect_with(1, 2, listener, &[peer0, me], options()).map_err(|e| e.to_string())?;
    schedule(&mut ring, warmup, iters).map(|_| ())
}

fn thaw_side(warmup: usize, iters: usize) -> Result<Vec<f64>, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let me = listener.local_addr().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(PEER_ENV, me.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start rank 1: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let result = match line.trim().parse::<SocketAddr>() {
        Ok(peer1) => RingCollective::connect_with(0, 2, listener, &[me, peer1], options())
            .map_err(|e| e.to_string())
            .and_then(|mut ring| schedule(&mut ring, warmup, iters)),
        Err(_) => {
            let _ = child.kill();
            Err(format!("rank 1 did not report its address (got `{}`)", line.trim()))
        }
    };
    match child.wait() {
        Ok(status) if status.success() => result,
        Ok(status) => Err(result.err().unwrap_or_else(|| format!("rank 1 failed: {status}"))),
        Err(e) => Err(format!("rank 1: {e}")),
    }
}

fn gloo_side(py: &Path, warmup: usize, iters: usize) -> Option<Vec<f64>> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/ring_allreduce_gloo.py");
    let sizes = sizes_mib().iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let out = Command::new(py).arg(script).args([sizes, warmup.to_string(), iters.to_string()]).output().ok()?;
    if !out.status.success() {
        eprintln!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    sizes_mib().iter().map(|mib| json.get(mib.to_string())?.as_f64()).collect()
}

fn gb_per_s(mib: usize, ms: f64) -> f64 {
    (mib << 20) as f64 / (ms * 1e-3) / 1e9
}

fn main() {
    let warmup = env_usize("THAW_BENCH_WARMUP", 3);
    let iters = env_usize("THAW_BENCH_ITERS", 15).max(1);
    if let Ok(peer0) = std::env::var(PEER_ENV) {
        if let Err(e) = rank1(&peer0, warmup, iters) {
            eprintln!("ring bench rank 1: {e}");
            std::process::exit(1);
        }
        return;
    }
    // `cargo test --benches` runs bench binaries with `--bench`-less args; only time under `cargo bench`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let ours = match thaw_side(warmup, iters) {
        Ok(ms) => ms,
        Err(e) => {
            eprintln!("ring bench: {e}");
            std::process::exit(1);
        }
    };
    let py = if std::env::var("THAW_BENCH_NO_BASELINE").is_ok() { None } else { common::baseline_python() };
    let theirs = py.as_ref().and_then(|py| gloo_side(py, warmup, iters));
    println!(
        "all-reduce (mean) of f32, 2 local processes over loopback TCP, {} B segments; median of {iters} after {warmup} warm-up",
        options().segment_bytes
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "size_MiB", "thaw_ms", "thaw_GB/s", "gloo_ms", "gloo_GB/s", "gloo/thaw"
    );
    for (i, mib) in sizes_mib().into_iter().enumerate() {
        let ms = ours[i];
        match &theirs {
            Some(t) => println!(
                "{mib:>8} {ms:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                gb_per_s(mib, ms),
                t[i],
                gb_per_s(mib, t[i]),
                t[i] / ms
            ),
            None => println!("{mib:>8} {ms:>10.2} {:>10.2} {:>10} {:>10} {:>10}", gb_per_s(mib, ms), "-", "-", "-"),
        }
    }
}
