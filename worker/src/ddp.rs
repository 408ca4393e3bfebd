//! One data-parallel step's communication: the step's statistics and every gradient bucket,
//! averaged across ranks, overlapped with the backward pass or after it.
//!
//! With overlap, a communication thread owns the collective for the length of the step. The
//! training thread runs backward one layer group at a time from the top
//! ([`crate::zoo::CutForward::backward`]); as soon as every parameter of a bucket has its final
//! gradient, the bucket is flattened and handed over, and its all-reduce runs while backward goes
//! on through the groups below (on the ring, over TCP; with NCCL, on the GPU's communication
//! stream). Buckets are filled from the output side, so the first ones are ready first.
//!
//! What never changes, with or without overlap:
//! - every rank issues the same operations in the same order (the statistics, then bucket 0,
//!   1, ...), so the reduced values are bitwise the same as the sequential path's;
//! - the reduced gradients are written back, and the caller may step the optimizer, only once
//!   every bucket of the step is reduced: a rank whose step fails mid-way has applied nothing,
//!   which recovery relies on (ARCHITECTURE.md, "Job states and recovery").

use std::sync::mpsc;
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::buckets::Buckets;
use crate::collective::{Collective, CollectiveError};
use crate::optim::Param;

/// Reduces one step: `stats` (summed) and every bucket of `params`' gradients (averaged), after
/// running `backward`.
///
/// `backward` computes the step's gradients and calls `ready(g)` whenever the gradients of
/// groups `g..` are final (`g` decreasing). With `overlap`, the statistics and the buckets made
/// ready are reduced on a communication thread meanwhile; without it, backward runs to its end
/// first and everything is reduced after it on the calling thread. Either way, on `Ok` the
/// gradients hold the averages and `stats` the sums; on `Err` nothing can be trusted but the
/// parameters, which this never touches.
pub fn reduce_step(
    c: &mut dyn Collective,
    stats: &mut [f32],
    buckets: &Buckets,
    params: &[Param],
    overlap: bool,
    backward: impl FnOnce(&mut dyn FnMut(usize)),
) -> Result<CommTime, CollectiveError> {
    let n = buckets.buckets.len();
    if !overlap {
        backward(&mut |_| {});
        let start = Instant::now();
        c.all_reduce_sum(stats)?;
        for b in 0..n {
            let mut flat = buckets.gather(b, params);
            c.all_reduce_mean_tensor(&mut flat)?;
            buckets.scatter(b, params, &flat);
        }
        let all = start.elapsed();
        return Ok(CommTime { busy: all, exposed: all });
    }
    let ready_from: Vec<usize> = (0..n).map(|b| buckets.lowest_group(b, params)).collect();
    let reduced = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, Tensor)>();
        let mut sums = stats.to_vec();
        let comm = s.spawn(move || -> Result<(Vec<f32>, Vec<(usize, Tensor)>, Duration), CollectiveError> {
            let start = Instant::now();
            c.all_reduce_sum(&mut sums)?;
            let mut busy = start.elapsed();
            let mut done = Vec::with_capacity(n);
            let mut failed = None;
            // Every bucket is received even after a failure, so the sender never blocks.
            for (b, mut flat) in rx {
                if failed.is_none() {
                    let start = Instant::now();
                    match c.all_reduce_mean_tensor(&mut flat) {
                        Ok(()) => done.push((b, flat)),
                        Err(e) => failed = Some(e),
                    }
                    busy += start.elapsed();
                }
            }
            failed.map_or(Ok((sums, done, busy)), Err)
        });
        let mut next = 0;
        let mut hand_over = |g: usize| {
            while next < n && ready_from[next] >= g {
                // The receiver lives until every bucket is sent, so this cannot fail.
                let _ = tx.send((next, buckets.gather(next, params)));
                next += 1;
            }
        };
        backward(&mut hand_over);
        hand_over(0);
        drop(tx);
        let waited = Instant::now();
        let r = match comm.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        r.map(|r| (r, waited.elapsed()))
    });
    let ((sums, done, busy), waited) = reduced?;
    stats.copy_from_slice(&sums);
    let scatter = Instant::now();
    for (b, flat) in done {
        buckets.scatter(b, params, &flat);
    }
    Ok(CommTime { busy, exposed: waited + scatter.elapsed() })
}

/// Where a step's communication time went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommTime {
    /// Time spent in collective operations (on the communication thread, with overlap).
    pub busy: Duration,
    /// Time the training thread waited for them after its backward pass: all of `busy` without
    /// overlap, what overlap did not hide with it.
    pub exposed: Duration,
}
