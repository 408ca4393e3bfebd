//! gRPC requests into the coordinator core: a sequence of calls, each a request message decoded
//! with prost from the input and handed to [`Coordinator`] the way `coordinator/src/service.rs`
//! does (the same conversions, the same core calls), on a clock the input moves forward.
//!
//! Input: records of `[op: u8][len: u16 LE][len bytes: the request message]` until the input
//! ends (a short last record takes what is left). The job id of a request is the spec's name, so
//! seeds that submit a spec and then join it reach deep into rendezvous, plans and recovery.

use std::time::{Duration, Instant};

use prost::Message;
use thaw_coordinator::core::{Coordinator, JoinPoll, PlanInfo};
use thaw_coordinator::metrics::EpochMetrics;
use thaw_coordinator::plan::{EpochCursor, EpochPlan};
use thaw_coordinator::service::{cut_from_proto, join_info, stage_from_proto, stage_to_proto, status};
use thaw_coordinator::store::MemoryStore;
use thaw_proto::v1 as pb;

/// The calls a record can be, by `op % OPS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Submit = 0,
    Get = 1,
    List = 2,
    Cancel = 3,
    Delete = 4,
    Join = 5,
    Heartbeat = 6,
    EpochPlan = 7,
    Progress = 8,
    Leave = 9,
    /// Time passes (`len` bytes as a little-endian count of 10 ms) and the sweeper runs.
    Tick = 10,
    /// A worker polls its rendezvous again (a `JoinRequest`).
    PollJoin = 11,
    /// Finished jobs older than the retention (an `u16` of seconds) are deleted.
    Expire = 12,
    /// The coordinator restarts on its store (every job taken back, as a new leader does).
    Restore = 13,
    /// What a worker makes of a plan the coordinator sent (an `EpochPlan`).
    WorkerPlan = 14,
}

const OPS: u8 = 15;

impl Op {
    fn from_byte(b: u8) -> Op {
        match b % OPS {
            0 => Op::Submit,
            1 => Op::Get,
            2 => Op::List,
            3 => Op::Cancel,
            4 => Op::Delete,
            5 => Op::Join,
            6 => Op::Heartbeat,
            7 => Op::EpochPlan,
            8 => Op::Progress,
            9 => Op::Leave,
            10 => Op::Tick,
            11 => Op::PollJoin,
            12 => Op::Expire,
            13 => Op::Restore,
            _ => Op::WorkerPlan,
        }
    }
}

/// One record of an input (for writing seeds).
pub fn record(op: Op, msg: &[u8]) -> Vec<u8> {
    let len = u16::try_from(msg.len()).expect("a seed message under 64 KiB");
    let mut out = vec![op as u8];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(msg);
    out
}

/// One record holding a prost message.
pub fn message(op: Op, m: &impl Message) -> Vec<u8> {
    record(op, &m.encode_to_vec())
}

/// Runs the calls of `data` against a fresh coordinator.
pub fn run(data: &[u8]) {
    drop(replay(data));
}

/// [`run`], returning the coordinator as the calls left it.
pub fn replay(data: &[u8]) -> Coordinator {
    let store = MemoryStore::new();
    let mut core = Coordinator::with_store(Box::new(store.clone()));
    let start = Instant::now();
    let mut elapsed = Duration::ZERO;
    let base_ms = 1_700_000_000_000u64;
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        let len = match tail {
            [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
            _ => 0,
        };
        let tail = tail.get(2..).unwrap_or_default();
        let (msg, next) = tail.split_at(len.min(tail.len()));
        rest = next;
        let now = start + elapsed;
        let now_ms = base_ms + elapsed.as_millis() as u64;
        call(&mut core, &store, Op::from_byte(op), msg, &mut elapsed, now, now_ms);
    }
    core
}

fn call(
    core: &mut Coordinator,
    store: &MemoryStore,
    op: Op,
    msg: &[u8],
    elapsed: &mut Duration,
    now: Instant,
    now_ms: u64,
) {
    // Every error must map to a status, as the service maps it.
    let done = |r: Result<(), thaw_coordinator::core::CoreError>| {
        if let Err(e) = r {
            let _ = status(e);
        }
    };
    match op {
        Op::Submit => {
            let Ok(r) = pb::SubmitRequest::decode(msg) else { return };
            let resume = if r.resume_from.is_empty() {
                None
            } else {
                match serde_json::from_str::<EpochCursor>(&r.resume_cursor_json) {
                    Ok(c) => Some((r.resume_from.clone(), c)),
                    Err(_) => return,
                }
            };
            match core.submit_resumed(&r.spec_toml, resume, now, now_ms) {
                Ok(id) => done(core.set_worker_token(&id, "token".into(), now_ms)),
                Err(e) => {
                    let _ = status(e);
                }
            }
        }
        Op::Get => {
            let Ok(r) = pb::GetJobRequest::decode(msg) else { return };
            done(core.get(&r.job_id).map(|v| drop(format!("{v:?}"))));
            let _ = core.worker_token(&r.job_id);
        }
        Op::List => {
            let Ok(r) = pb::ListJobsRequest::decode(msg) else { return };
            let (views, _) = core.page(r.page_size as usize, &r.page_token);
            assert!(views.len() <= core.job_count());
        }
        Op::Cancel => {
            let Ok(r) = pb::CancelRequest::decode(msg) else { return };
            done(core.cancel(&r.job_id, &r.reason, now_ms).map(drop));
        }
        Op::Delete => {
            let Ok(r) = pb::DeleteRequest::decode(msg) else { return };
            done(core.delete(&r.job_id));
        }
        Op::Join | Op::PollJoin => {
            let Ok(r) = pb::JoinRequest::decode(msg) else { return };
            if op == Op::Join {
                let info = join_info(&r);
                if let Err(e) = core.join_with(&r.job_id, &info, now, now_ms) {
                    let _ = status(e);
                    return;
                }
            }
            match core.poll_join(&r.job_id, &r.worker_id, now, now_ms) {
                Ok(JoinPoll::Ready(a)) => {
                    assert!(a.rank < a.world_size, "rank {} of a world of {}", a.rank, a.world_size);
                    assert_eq!(a.peers.len(), a.world_size as usize, "peers of a world of {}", a.world_size);
                }
                Ok(JoinPoll::Waiting { .. }) => {}
                Err(e) => {
                    let _ = status(e);
                }
            }
        }
        Op::Heartbeat => {
            let Ok(r) = pb::HeartbeatRequest::decode(msg) else { return };
            done(core.heartbeat(&r.job_id, &r.worker_id, None, now).map(drop));
        }
        Op::EpochPlan => {
            let Ok(r) = pb::EpochPlanRequest::decode(msg) else { return };
            let plan = core
                .check_member(&r.job_id, &r.worker_id, r.rank, r.generation)
                .and_then(|()| core.epoch_plan(&r.job_id, r.epoch));
            match plan {
                Ok(p) => {
                    // What the service sends, and what the worker makes of it.
                    if let Some(s) = p.stage.as_ref() {
                        let _ = stage_from_proto(&stage_to_proto(s));
                    }
                    if let Ok(plan) = p.plan() {
                        use_plan(&plan);
                    }
                }
                Err(e) => {
                    let _ = status(e);
                }
            }
        }
        Op::Progress => {
            let Ok(r) = pb::ProgressReport::decode(msg) else { return };
            let p = r.progress.unwrap_or_default();
            let m = r.metrics.as_ref().map(EpochMetrics::from);
            done(
                core.check_member(&r.job_id, &r.worker_id, r.rank, r.generation)
                    .and_then(|()| core.report_progress(&r.job_id, r.rank, p.epoch, p.step, p.samples_done, m, now_ms)),
            );
        }
        Op::Leave => {
            let Ok(r) = pb::LeaveRequest::decode(msg) else { return };
            done(if r.graceful {
                core.leave_gracefully(&r.job_id, &r.worker_id, &r.error, now, now_ms)
            } else {
                core.leave(&r.job_id, &r.worker_id, r.succeeded, &r.error, now, now_ms)
            });
        }
        Op::Tick => {
            let ticks = msg.iter().take(2).rev().fold(0u64, |a, &b| a << 8 | u64::from(b));
            *elapsed += Duration::from_millis(ticks * 10);
            let (now, now_ms) = (now + Duration::from_millis(ticks * 10), now_ms + ticks * 10);
            let _ = core.check_liveness(now, now_ms);
            let _ = core.flush(now_ms);
        }
        Op::Expire => {
            let secs = msg.iter().take(2).rev().fold(0u64, |a, &b| a << 8 | u64::from(b));
            let _ = core.expire(Duration::from_secs(secs), now_ms);
        }
        Op::Restore => {
            let _ = core.flush(now_ms);
            match Coordinator::restore(Box::new(store.clone()), now, now_ms) {
                Ok(c) => *core = c,
                Err(e) => {
                    let _ = status(e);
                }
            }
        }
        Op::WorkerPlan => {
            // As `worker/src/agent.rs` (GrpcControl::epoch_plan) rebuilds the plan it was sent.
            let Ok(p) = pb::EpochPlan::decode(msg) else { return };
            if let Some(s) = p.stage.as_ref() {
                let _ = stage_from_proto(s);
            }
            let info = PlanInfo {
                seed: p.seed,
                epoch: p.epoch,
                num_samples: p.num_samples,
                world_size: p.world_size,
                batch_size: p.batch_size,
                steps: p.steps,
                stage: None,
                affinity_epoch: p.affinity_epoch,
                blocks: p.read_block.zip(p.shuffle_window),
                cut: p.cut.as_ref().map(cut_from_proto),
            };
            if let Ok(plan) = info.plan() {
                use_plan(&plan);
            }
        }
    }
}

/// What a rank asks of its plan: the first and last steps of every rank (a few at most). A
/// batch is a `Vec` of `batch_size` slots: a plan the coordinator sent with a batch of 2^32 is
/// trusted by the worker (the spec it came from bounds it), so it is not asked for here.
fn use_plan(plan: &EpochPlan) {
    if plan.batch_size() > 1 << 16 {
        return;
    }
    let steps = plan.steps_per_rank();
    for rank in 0..plan.world_size().min(4) {
        for step in [0, 1, steps.saturating_sub(1)] {
            if step < steps {
                let _ = plan.rank_batch(rank, step);
                let _ = plan.rank_real_count(rank, step);
            }
        }
    }
    let _ = (plan.sample_at(0), plan.schedule_steps(), plan.global_batch());
}
