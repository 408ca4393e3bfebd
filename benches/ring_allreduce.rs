//! All-reduce time of thaw's ring against PyTorch's gloo, between two local processes, in the same
//! run. thaw's ring runs twice: with TCP links only (`THAW_RING_SHM=0`, what two hosts use) and with
//! the shared-memory links that neighbours on one host use by default.
//!
//! For 4, 44 (about ResNet18's gradients) and 100 MiB of `f32`: this process is rank 0 and runs
//! itself again as rank 1 (`THAW_RING_BENCH_PEER` carries rank 0's address; rank 1 answers with its
//! own on stdout). Each iteration is a barrier (not timed), then a timed `all_reduce_mean`; the first
//! result is checked; after warm-up iterations the median is reported with the algorithmic
//! bandwidth (buffer bytes / time). gloo's side (`ring_allreduce_gloo.py`) does the same with
//! `torch.distributed`, timing `all_reduce` alone (a sum: gloo has no mean, and the division it would
//! need is not counted). `gloo/tcp` and `gloo/shm` are time ratios (above 1: thaw is faster).
//!
//! The ring's links are authenticated (an HMAC-SHA256 challenge-response when it forms; nothing per
//! operation), so the all-reduce times include no authentication cost by construction; what it
//! costs is in the ring's formation, printed for rank 0 (dialing, both handshakes, the transport
//! offer) beside a bare TCP connect and one 96-byte round trip on the same loopback.
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

fn options(shm: bool) -> RingOptions {
    RingOptions {
        timeout: TIMEOUT,
        segment_bytes: env_usize("THAW_RING_SEGMENT_BYTES", DEFAULT_SEGMENT_BYTES),
        shm,
        secret: b"ring bench key".to_vec(),
    }
}

/// A TCP connect and one 96-byte round trip on loopback, in ms: the floor under any handshake.
fn bare_round_trip() -> f64 {
    use std::io::Read;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut b = [0u8; 96];
        s.read_exact(&mut b).expect("read");
        s.write_all(&b).expect("write");
    });
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(&[1u8; 96]).expect("write");
    let mut b = [0u8; 96];
    s.read_exact(&mut b).expect("read");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    echo.join().expect("echo");
    ms
}

/// Rank 1 learns the transport from rank 0 through this variable.
const SHM_ENV: &str = "THAW_RING_SHM";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The same schedule on both ranks; the median ms of each size.
fn schedule(ring: &mut RingCollective, shm: bool, warmup: usize, iters: usize) -> Result<Vec<f64>, String> {
    let want = if shm { "shm" } else { "tcp" };
    if ring.transports() != Some((want, want)) {
        return Err(format!("rank {} formed its ring over {:?}, not {want}", ring.rank(), ring.transports()));
    }
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
    let shm = std::env::var(SHM_ENV).is_ok_and(|v| v != "0");
    let mut ring =
        RingCollective::connect_with(1, 2, listener, &[peer0, me], options(shm)).map_err(|e| e.to_string())?;
    schedule(&mut ring, shm, warmup, iters).map(|_| ())
}

/// (formation ms, median ms per size).
fn thaw_side(shm: bool, warmup: usize, iters: usize) -> Result<(f64, Vec<f64>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let me = listener.local_addr().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(PEER_ENV, me.to_string())
        .env(SHM_ENV, if shm { "1" } else { "0" })
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start rank 1: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let result = match line.trim().parse::<SocketAddr>() {
        Ok(peer1) => {
            let t = Instant::now();
            RingCollective::connect_with(0, 2, listener, &[me, peer1], options(shm)).map_err(|e| e.to_string()).and_then(
                |mut ring| {
                    let formed = t.elapsed().as_secs_f64() * 1e3;
                    schedule(&mut ring, shm, warmup, iters).map(|m| (formed, m))
                },
            )
        }
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
    let run = |shm: bool| match thaw_side(shm, warmup, iters) {
        Ok(ms) => ms,
        Err(e) => {
            eprintln!("ring bench (shm {shm}): {e}");
            std::process::exit(1);
        }
    };
    let ((tcp_formed, tcp), (shm_formed, shm)) = (run(false), run(true));
    let bare = median((0..15).map(|_| bare_round_trip()).collect());
    let py = if std::env::var("THAW_BENCH_NO_BASELINE").is_ok() { None } else { common::baseline_python() };
    let theirs = py.as_ref().and_then(|py| gloo_side(py, warmup, iters));
    println!(
        "all-reduce (mean) of f32, 2 local processes, {} B segments; median of {iters} after {warmup} warm-up",
        options(false).segment_bytes
    );
    println!("thaw over TCP loopback (tcp), thaw over shared memory (shm), gloo over TCP loopback");
    println!(
        "{:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "size_MiB", "tcp_ms", "tcp_GB/s", "shm_ms", "shm_GB/s", "gloo_ms", "gloo_GB/s", "gloo/tcp", "gloo/shm"
    );
    println!(
        "ring formation on rank 0, authenticated (HMAC challenge-response on both links): tcp {tcp_formed:.2} ms, \
         shm {shm_formed:.2} ms; a bare TCP connect + 96-byte round trip: {bare:.3} ms; per all-reduce: 0 (no per-message MAC)"
    );
    for (i, mib) in sizes_mib().into_iter().enumerate() {
        let (t, m) = (tcp[i], shm[i]);
        let ours = format!("{mib:>8} {t:>8.2} {:>8.2} {m:>8.2} {:>8.2}", gb_per_s(mib, t), gb_per_s(mib, m));
        match &theirs {
            Some(g) => {
                println!("{ours} {:>8.2} {:>8.2} {:>9.2} {:>9.2}", g[i], gb_per_s(mib, g[i]), g[i] / t, g[i] / m)
            }
            None => println!("{ours} {:>8} {:>8} {:>9} {:>9}", "-", "-", "-", "-"),
        }
    }
}
