//! What overlapping the gradient all-reduce with backward saves: the data-parallel step of two
//! local processes over the TCP ring (`THAW_RING_SHM=0`, what two hosts use), in three forms, in
//! the same run and on the same model, batch and buckets:
//! - `no comm`: the step with communication skipped (a world of one: forward, backward, the
//!   buckets gathered and written back, no all-reduce), both processes computing at once;
//! - `plain`: backward, then every bucket's all-reduce;
//! - `overlap`: backward group by group, each bucket's all-reduce started as soon as its
//!   gradients are final (`ddp::reduce_step`, what training uses by default).
//!
//! The figure of merit is the **exposed communication time**: step time minus the `no comm`
//! step time, with and without overlap; their ratio is what overlap buys. The step is what
//! `Trainer::run_distributed` does minus the optimizer's update (the same in every form).
//!
//! This process is rank 0 and runs itself again as rank 1 (`THAW_OVERLAP_BENCH_PEER` carries
//! rank 0's address; rank 1 answers with its own on stdout). The forms take turns, one step
//! each per round (warm-up rounds, then timed ones; a barrier, not timed, before each step), and
//! each form's median is reported. Both ranks use
//! `THAW_TORCH_THREADS` threads (default 1: two ranks on two cores, as `thaw launch` does).
//!
//! Two measurements: the ranks' links direct on loopback, where the ring's TCP copies compete
//! with compute for the same two cores, and through a relay that carries `THAW_BENCH_LINK_MBIT`
//! (1000, a 1 Gbit/s link between hosts; 0 skips it) each way, where communication is mostly
//! waiting for the wire, as between hosts.
//!
//! `THAW_BENCH_ARCH` (resnet18), `THAW_BENCH_BATCH` (32 per rank), `THAW_BENCH_SIZE` (64 px),
//! `THAW_BENCH_BUCKET_MB` (25, the spec's default), `THAW_BENCH_WARMUP` (2) and
//! `THAW_BENCH_ITERS` (8) change the set-up.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use thaw_worker::buckets::Buckets;
use thaw_worker::collective::{Collective, RingCollective, RingOptions, SingleProcess};
use thaw_worker::ddp;
use thaw_worker::optim::Param;
use thaw_worker::zoo::{Arch, CutForward, GroupMode, Network};

const PEER_ENV: &str = "THAW_OVERLAP_BENCH_PEER";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One rank's model, batch and buckets.
struct Rank {
    net: Network,
    modes: Vec<GroupMode>,
    params: Vec<Param>,
    buckets: Buckets,
    xs: Tensor,
    ys: Tensor,
}

impl Rank {
    fn new(rank: usize) -> Rank {
        let arch = Arch::from_name(&std::env::var("THAW_BENCH_ARCH").unwrap_or_else(|_| "resnet18".into()))
            .expect("THAW_BENCH_ARCH names a model of the zoo");
        let (batch, size) = (env_usize("THAW_BENCH_BATCH", 32) as i64, env_usize("THAW_BENCH_SIZE", 64) as i64);
        tch::manual_seed(1);
        let net = Network::new(arch, 10, Device::Cpu);
        let modes = vec![GroupMode::Train; net.groups().len()];
        net.set_modes(&modes);
        let params: Vec<Param> = (0..modes.len())
            .flat_map(|g| net.group_parameters(g).into_iter().map(move |(name, tensor)| Param { name, tensor, group: g }))
            .collect();
        Buckets::ensure_grads(&params);
        let buckets = Buckets::new(&params, (env_usize("THAW_BENCH_BUCKET_MB", 25) << 20).max(4));
        tch::manual_seed(100 + rank as i64);
        let channels = if arch == Arch::Lenet5 { 1 } else { 3 };
        let xs = Tensor::randn([batch, channels, size, size], (Kind::Float, Device::Cpu));
        let ys = Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu));
        Rank { net, modes, params, buckets, xs, ys }
    }

    /// One step: forward, loss, backward and the reduction of the statistics and every bucket.
    fn step(&self, c: &mut dyn Collective, overlap: bool) {
        for p in &self.params {
            let mut t = p.tensor.shallow_clone();
            t.zero_grad();
        }
        let n = self.modes.len();
        let fwd = if overlap {
            self.net.forward_range_cut(&self.xs, &self.modes, 0..n)
        } else {
            CutForward::uncut(self.net.forward_range(&self.xs, &self.modes, 0..n))
        };
        let loss = fwd.output.cross_entropy_for_logits(&self.ys);
        let mut stats = [loss.double_value(&[]) as f32, 0.0, 0.0];
        ddp::reduce_step(c, &mut stats, &self.buckets, &self.params, overlap, |ready| fwd.backward(&loss, ready))
            .expect("the step's reduction");
    }
}

/// The three forms' step times (ms, medians), taken in rounds of one step of each so that a
/// machine's drift affects all alike; warm-up rounds first, a barrier on `ring` before each step.
fn time_forms(r: &Rank, ring: &mut RingCollective) -> [f64; 3] {
    let (warmup, iters) = (env_usize("THAW_BENCH_WARMUP", 2), env_usize("THAW_BENCH_ITERS", 8).max(1));
    let mut times: [Vec<f64>; 3] = Default::default();
    for i in 0..warmup + iters {
        for (form, out) in times.iter_mut().enumerate() {
            ring.barrier().expect("barrier");
            let t = Instant::now();
            match form {
                0 => r.step(&mut SingleProcess, false),
                1 => r.step(ring, false),
                _ => r.step(ring, true),
            }
            if i >= warmup {
                out.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    times.map(median)
}

fn options() -> RingOptions {
    RingOptions { shm: false, secret: b"overlap bench".to_vec(), ..RingOptions::new(Duration::from_secs(120)) }
}

/// Both ranks run the forms in the same order; returns rank's medians (ms).
fn run_rank(rank: usize, listener: TcpListener, peers: &[SocketAddr]) -> [f64; 3] {
    let r = Rank::new(rank);
    let mut ring = RingCollective::connect_with(rank, 2, listener, peers, options()).expect("forming the ring");
    time_forms(&r, &mut ring)
}

/// A one-connection TCP relay to `target` that carries each direction at `mbit` Mbit/s (it
/// sleeps between 64 KiB chunks, burning no CPU): a link between two hosts, emulated on one.
fn throttled_relay(target: SocketAddr, mbit: f64) -> SocketAddr {
    use std::io::Read;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let (inbound, _) = l.accept().expect("accept");
        let outbound = std::net::TcpStream::connect(target).expect("connect");
        for s in [&inbound, &outbound] {
            s.set_nodelay(true).expect("nodelay");
        }
        let pipe = move |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
            let bytes_per_sec = mbit * 1e6 / 8.0;
            // When the wire is free again: a chunk occupies it for its size / rate, from the
            // moment it arrives or the previous one is through, whichever is later (an idle
            // link saves up no credit).
            let mut free_at = Instant::now();
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                free_at = free_at.max(Instant::now()) + Duration::from_secs_f64(n as f64 / bytes_per_sec);
                std::thread::sleep(free_at.saturating_duration_since(Instant::now()));
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        };
        let (a, b) = (inbound.try_clone().expect("clone"), outbound.try_clone().expect("clone"));
        std::thread::spawn(move || pipe(a, b));
        pipe(outbound, inbound);
    });
    addr
}

/// One measurement: rank 1 in a child process, links direct or through [`throttled_relay`]s.
fn measure(threads: usize, link_mbit: Option<f64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let me = listener.local_addr().expect("addr");
    // Rank 1 dials rank 0 at `toward_me`; rank 0 dials rank 1 at `toward_peer`.
    let toward_me = link_mbit.map_or(me, |m| throttled_relay(me, m));
    let mut child = Command::new(std::env::current_exe().expect("this bench's path"))
        .env(PEER_ENV, toward_me.to_string())
        .env("THAW_TORCH_THREADS", threads.to_string())
        .env("THAW_RING_SHM", "0")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting rank 1");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("rank 1's address");
    let peer: SocketAddr = line.trim().parse().expect("rank 1 prints its address");
    let toward_peer = link_mbit.map_or(peer, |m| throttled_relay(peer, m));
    let r = Rank::new(0);
    let grads: i64 = r.params.iter().map(|p| p.tensor.numel() as i64).sum();
    let link = link_mbit.map_or("direct loopback".to_string(), |m| format!("a {m} Mbit/s link each way (emulated)"));
    println!(
        "\noverlap: {} batch {} at {}px per rank, 2 ranks over the TCP ring on {link}, {} torch thread(s) each; \
         {:.1} MB of gradients in {} bucket(s)",
        std::env::var("THAW_BENCH_ARCH").unwrap_or_else(|_| "resnet18".into()),
        env_usize("THAW_BENCH_BATCH", 32),
        env_usize("THAW_BENCH_SIZE", 64),
        threads,
        grads as f64 * 4.0 / 1e6,
        r.buckets.buckets.len()
    );
    drop(r);
    let [none, plain, overlap] = run_rank(0, listener, &[me, toward_peer]);
    let status = child.wait().expect("rank 1");
    assert!(status.success(), "rank 1 failed: {status}");
    let (exposed_plain, exposed_overlap) = (plain - none, overlap - none);
    println!("| step | ms (median) | exposed communication, ms |");
    println!("|---|---|---|");
    println!("| no comm (baseline) | {none:.1} | 0 |");
    println!("| plain: backward, then all-reduce | {plain:.1} | {exposed_plain:.1} |");
    println!("| overlap: all-reduce during backward | {overlap:.1} | {exposed_overlap:.1} |");
    let ratio = if exposed_plain > 0.0 { format!("{:.2}", exposed_overlap / exposed_plain) } else { "n/a".into() };
    println!(
        "exposed communication with overlap / without: {ratio} ({:.1} ms hidden per step); step time plain / overlap: \
         {:.2}x",
        exposed_plain - exposed_overlap,
        plain / overlap
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let threads = env_usize("THAW_TORCH_THREADS", 1);
    tch::set_num_threads(threads as i32);
    if let Ok(peer) = std::env::var(PEER_ENV) {
        // Rank 1: announce the address, run, and report nothing (rank 0 reports).
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let me = listener.local_addr().expect("addr");
        println!("{me}");
        std::io::stdout().flush().expect("stdout");
        let peer: SocketAddr = peer.parse().expect("peer address");
        run_rank(1, listener, &[peer, me]);
        return;
    }
    measure(threads, None);
    let mbit: f64 = std::env::var("THAW_BENCH_LINK_MBIT").ok().and_then(|v| v.parse().ok()).unwrap_or(1000.0);
    if mbit > 0.0 {
        measure(threads, Some(mbit));
    }
}
