//! Epoch plans at ImageNet scale: thaw's `EpochPlan` (a keyed Feistel permutation evaluated on
//! demand) against the naive sampler (materialize every index, shuffle, split), in the same run.
//!
//! 1,281,167 samples, 1024 ranks, batch 32 per rank. For each approach: the time to build the
//! plan, for one rank to enumerate its whole epoch, for all ranks to enumerate theirs (one after
//! the other, on one thread), the bytes of state each rank holds, and the process's peak RSS
//! (VmHWM, reset between approaches through /proc/self/clear_refs where the kernel allows it).
//! Both use the same layout (global batch k is positions [k·W·B, (k+1)·W·B), rank r takes its
//! B-slice), and each checks that it covered every sample exactly once by summing the indices.
//!
//! A third row is the blocked layout of packed shards (`with_blocks(256, 1024)`): the same
//! measures, and for every approach the mean length of the runs of consecutive sample indices in
//! one rank's epoch (consecutive indices are consecutive bytes in the shards: the sequential read
//! size, in samples).
//!
//! `THAW_BENCH_REPS` overrides the number of timed repetitions (median reported).

use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use thaw_coordinator::plan::{EpochPlan, PlanError, Slot};

const N: u64 = 1_281_167;
const WORLD: u32 = 1024;
const BATCH: u32 = 32;
const SEED: u64 = 0x7468_6177;
const EPOCH: u32 = 3;

fn reps() -> usize {
    std::env::var("THAW_BENCH_REPS").ok().and_then(|s| s.parse().ok()).filter(|&n| n > 0).unwrap_or(5)
}

/// Median wall time of `reps` runs of `f` (after one warm-up run), and `f`'s last result. Each
/// result is dropped before the next run, so peak RSS sees one result at a time.
fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut out = black_box(f());
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        drop(out);
        let t = Instant::now();
        out = black_box(f());
        times.push(t.elapsed());
    }
    times.sort();
    (times[times.len() / 2], out)
}

/// Peak resident set size in bytes (VmHWM), if /proc says.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux >= 4.0); false if not allowed.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else if s >= 1e-6 {
        format!("{:.2} us", s * 1e6)
    } else {
        format!("{:.0} ns", s * 1e9)
    }
}

fn fmt_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

struct Row {
    name: &'static str,
    mean_run: f64,
    build: Duration,
    one_rank: Duration,
    all_ranks: Duration,
    state_bytes: u64,
    peak: Option<u64>,
}

/// Sum of the sample indices a rank trains on, and its pad count.
fn fold_slots(slots: impl Iterator<Item = Slot>) -> (u64, u64) {
    slots.fold((0, 0), |(sum, pads), s| match s {
        Slot::Sample(i) => (sum + i, pads),
        Slot::Pad => (sum, pads + 1),
    })
}

/// The naive sampler's slots for one rank: the same layout over a materialized permutation.
fn naive_rank_slots(order: &[u64], rank: u32) -> impl Iterator<Item = Slot> + '_ {
    let (g, b) = (u64::from(WORLD) * u64::from(BATCH), u64::from(BATCH));
    let steps = (order.len() as u64).div_ceil(g);
    (0..steps).flat_map(move |step| {
        let start = step * g + u64::from(rank) * b;
        (start..start + b).map(move |p| order.get(p as usize).map_or(Slot::Pad, |&i| Slot::Sample(i)))
    })
}

fn naive_build() -> Vec<u64> {
    let mut order: Vec<u64> = (0..N).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ u64::from(EPOCH).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// Mean length of the runs of consecutive indices among a rank's samples.
fn mean_run(slots: impl Iterator<Item = Slot>) -> f64 {
    let mut v: Vec<u64> = slots.filter_map(Slot::sample).collect();
    v.sort_unstable();
    let runs = 1 + v.windows(2).filter(|w| w[1] != w[0] + 1).count();
    v.len() as f64 / runs as f64
}

fn check_cover(name: &str, (sum, pads): (u64, u64), steps: u64) {
    let expected_pads = steps * u64::from(WORLD) * u64::from(BATCH) - N;
    assert_eq!(sum, N * (N - 1) / 2, "{name}: samples are missing or repeated");
    assert_eq!(pads, expected_pads, "{name}: wrong number of pads");
}

/// A row for thaw's plan as `make` builds it for an epoch: build time (of one plan, timed over a
/// thousand), one rank's epoch, every rank's, coverage checked.
fn measure_plan(name: &'static str, reps: usize, make: impl Fn(u32) -> Result<EpochPlan, PlanError>) -> Row {
    let plan = make(EPOCH).expect("the benchmark's plan is valid");
    let (build, _) = time(reps, || {
        // One plan takes nanoseconds: time a thousand to see it.
        for epoch in 0..1000 {
            black_box(make(black_box(epoch)).ok());
        }
    });
    let (one_rank, _) = time(reps, || fold_slots(plan.rank_slots(WORLD / 2).expect("rank in range")));
    let (all_ranks, cover) = time(reps.min(3), || {
        (0..WORLD)
            .map(|r| fold_slots(plan.rank_slots(r).expect("rank in range")))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    check_cover(name, cover, plan.steps_per_rank());
    Row {
        name,
        mean_run: mean_run(plan.rank_slots(WORLD / 2).expect("rank in range")),
        build: build / 1000,
        one_rank,
        all_ranks,
        state_bytes: std::mem::size_of::<EpochPlan>() as u64,
        peak: peak_rss(),
    }
}

fn main() {
    // `cargo test --benches` runs bench targets with `--test`; listing asks with `--list`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let reps = reps();
    let mid_rank = WORLD / 2;

    let can_reset = reset_peak_rss();
    let plan = EpochPlan::new(SEED, EPOCH, N, WORLD, BATCH).expect("the benchmark's plan is valid");
    let steps = plan.steps_per_rank();
    println!(
        "epoch plan: {N} samples, {WORLD} ranks x batch {BATCH} = {} per global step, {steps} steps per rank, {} pads",
        plan.global_batch(),
        steps * plan.global_batch() - N
    );
    let thaw = measure_plan("thaw EpochPlan (Feistel)", reps, |epoch| EpochPlan::new(SEED, epoch, N, WORLD, BATCH));
    reset_peak_rss();
    let block_row = measure_plan("thaw blocked (256, 1024)", reps, |epoch| {
        EpochPlan::new(SEED, epoch, N, WORLD, BATCH).and_then(|p| p.with_blocks(256, 1024))
    });

    reset_peak_rss();
    let (build, order) = time(reps, naive_build);
    let (one_rank, _) = time(reps, || fold_slots(naive_rank_slots(&order, mid_rank)));
    let (all_ranks, cover) = time(reps.min(3), || {
        (0..WORLD).map(|r| fold_slots(naive_rank_slots(&order, r))).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    check_cover("naive", cover, steps);
    let naive = Row {
        name: "naive Vec + shuffle + split",
        mean_run: mean_run(naive_rank_slots(&order, mid_rank)),
        build,
        one_rank,
        all_ranks,
        state_bytes: (order.capacity() * std::mem::size_of::<u64>()) as u64,
        peak: peak_rss(),
    };
    drop(order);

    println!(
        "\n{:<28} {:>12} {:>16} {:>14} {:>16} {:>12} {:>10}",
        "approach", "build", "one rank epoch", "all ranks", "state per rank", "peak RSS", "mean run"
    );
    for row in [&thaw, &block_row, &naive] {
        println!(
            "{:<28} {:>12} {:>16} {:>14} {:>16} {:>12} {:>10.1}",
            row.name,
            fmt_duration(row.build),
            fmt_duration(row.one_rank),
            fmt_duration(row.all_ranks),
            fmt_bytes(row.state_bytes),
            row.peak.map_or("n/a".into(), fmt_bytes),
            row.mean_run
        );
    }
    let slots = steps * plan.global_batch();
    println!(
        "\nper slot: thaw {:.1} ns, naive {:.1} ns; a naive rank must first build the whole order: {} + {} = {}",
        thaw.all_ranks.as_secs_f64() * 1e9 / slots as f64,
        naive.all_ranks.as_secs_f64() * 1e9 / slots as f64,
        fmt_duration(naive.build),
        fmt_duration(naive.one_rank),
        fmt_duration(naive.build + naive.one_rank)
    );
    println!(
        "state over all {WORLD} ranks: thaw {}, naive {}; median of {reps} runs (all ranks: {}){}",
        fmt_bytes(thaw.state_bytes * u64::from(WORLD)),
        fmt_bytes(naive.state_bytes * u64::from(WORLD)),
        reps.min(3),
        if can_reset {
            "; peak RSS reset before each approach"
        } else {
            "; peak RSS is cumulative (clear_refs refused)"
        }
    );
}
