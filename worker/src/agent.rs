//! The worker agent: one process of a data-parallel job. It asks the coordinator for the job,
//! prepares it (every check before joining), joins, forms the collective with its peers, takes
//! the group's state from the source rank, heartbeats on the control plane, and trains its share
//! with [`Trainer::run_distributed`]. When the group fails (a peer died or hung: the collective
//! errs) or re-forms at a step boundary (a rank left, a worker is admitted), it joins again with
//! its progress and goes on in the next generation; only the job's end, a fatal error or a
//! graceful leave ends it.
//!
//! gRPC runs on a small tokio runtime owned by the agent; training runs on the calling thread,
//! which only ever `block_on`s short control calls with deadlines (a plan per epoch), never the
//! other way round. Progress reports go through a bounded queue and are dropped, not waited on,
//! when the coordinator is slow.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use thaw_coordinator::client::{Coordinators, WorkersApi};
use thaw_coordinator::core::PlanInfo;
use thaw_coordinator::plan::EpochPlan;
use thaw_coordinator::service::{cursor_from_proto, cursor_to_proto, cut_from_proto, LEADER_HEADER};
use thaw_coordinator::spec::{CollectiveKind, JobSpec};
use thaw_proto::v1 as pb;

use crate::checkpoint::EpochMetrics;
use crate::collective::{Collective, RingCollective, RingOptions};
use crate::train::{Control, DistEnd, DistOutcome, TrainError, Trainer};
use thaw_coordinator::service::stage_from_proto;
use thaw_coordinator::spec::Stage;

/// Deadline of every short control call (plans, progress, heartbeats, leave, job lookups).
pub const RPC_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the coordinator at {url} after {attempts} attempts: {last}")]
    Unreachable { url: String, attempts: u32, last: String },
    #[error("coordinator refused {what}: {message}")]
    Rpc { what: &'static str, code: tonic::Code, message: String },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("{0}")]
    Setup(String),
}

impl AgentError {
    /// Whether starting this worker again could help: no for a job it can never run (invalid
    /// spec, data, weights or device; an unknown, full or finished job; no credential), yes for
    /// an unreachable coordinator, a lost group or a failed collective. Supervisors read it from
    /// the exit status (`thaw worker`: 3 permanent, 1 retryable).
    pub fn is_permanent(&self) -> bool {
        use tonic::Code;
        match self {
            AgentError::Unreachable { .. } => false,
            AgentError::Rpc { code, .. } => matches!(
                code,
                Code::NotFound
                    | Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted
                    | Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::AlreadyExists
            ),
            AgentError::Train(e) => !matches!(
                e,
                TrainError::Collective(_) | TrainError::Control(_) | TrainError::Io(_)
            ),
            AgentError::Setup(_) => true,
        }
    }
}

fn rpc(what: &'static str) -> impl Fn(tonic::Status) -> AgentError {
    move |s| AgentError::Rpc { what, code: s.code(), message: s.message().to_string() }
}

/// Whether `s` says the coordinator could not be reached or gave no answer (it is restarting, or
/// a standby is taking over), rather than answering.
fn is_outage(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
}

/// Calls `call` until the coordinator answers, for up to `outage` of it being unreachable
/// (backoff with jitter, up to 2 s between tries; one log line when the outage starts and one
/// when it ends). An answer, error or not, is returned as it is.
async fn through_outage<T, F, Fut>(
    what: &str,
    outage: Duration,
    coords: &Coordinators,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut(WorkersApi) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut waiting = false;
    loop {
        match call(coords.workers()).await {
            Err(s) if is_outage(&s) && started.elapsed() < outage => {
                // A standby names the leader (go there at once); an unreachable address gives way
                // to the next one after the pause.
                if coords.after_error(&s) && s.metadata().contains_key(LEADER_HEADER) {
                    continue;
                }
                if !waiting {
                    tracing::warn!(what, error = %s.message(), deadline = ?outage, "the coordinator is unreachable; waiting for it");
                    waiting = true;
                }
                let jitter = rand::rng().random_range(0..=pause.as_millis() as u64 / 2);
                tokio::time::sleep(pause + Duration::from_millis(jitter)).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            answer => {
                if waiting && answer.as_ref().is_ok() {
                    tracing::info!(what, after = ?started.elapsed(), "the coordinator answers again");
                }
                return answer;
            }
        }
    }
}

/// Runs `call` with a deadline; a call past it is a DEADLINE_EXCEEDED status.
async fn within<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer within {deadline:?}"))),
    }
}

pub struct AgentOptions {
    /// The coordinator, e.g. `http://127.0.0.1:7070`.
    pub coordinator: String,
    pub job: String,
    /// A name for this worker (a pod name, `local-0`); a random suffix makes its id unguessable.
    pub worker_name: String,
    /// Host this worker's collective listens on (a port is chosen).
    pub bind_host: String,
    pub device: tch::Device,
    /// Attempts to reach the coordinator before giving up (with backoff and jitter).
    pub connect_attempts: u32,
    /// Keep trying to reach the coordinator this long instead (`--connect-timeout-secs`).
    pub connect_wait: Option<Duration>,
}

/// What the run amounted to, for the exit status.
pub struct AgentOutcome {
    pub rank: u32,
    pub world_size: u32,
    pub outcome: DistOutcome,
}

/// A worker id: the name and 64 random bits, so no other process can speak for this one.
pub fn worker_id(name: &str) -> String {
    format!("{name}-{:016x}", rand::rng().random::<u64>())
}

/// Finds the coordinator that answers for `job` among `list` (comma-separated URLs: a standby
/// points at the leader), with `attempts` tries (backoff with jitter) while none answers.
async fn connect(
    list: &str,
    attempts: u32,
    wait: Option<Duration>,
    job: &str,
) -> Result<(Arc<Coordinators>, pb::Job), AgentError> {
    let coords = Coordinators::parse(list).map_err(AgentError::Setup)?;
    // With `wait`, tries until it is spent (a name that does not resolve yet, as a Kubernetes
    // Service's before its pods are ready, is an outage like any other), else `attempts` times.
    let until = wait.map(|w| Instant::now() + w);
    let attempts = if until.is_some() { u32::MAX } else { attempts.max(1) };
    let mut last = String::new();
    let mut tried = 0;
    for i in 0..attempts {
        if until.is_some_and(|u| i > 0 && Instant::now() >= u) {
            break;
        }
        tried = i + 1;
        match within(RPC_DEADLINE, coords.jobs().get(pb::GetJobRequest { job_id: job.to_string() })).await {
            Ok(j) => return Ok((coords, j)),
            Err(s) if is_outage(&s) => {
                last = s.message().to_string();
                if coords.after_error(&s) && s.metadata().contains_key(LEADER_HEADER) {
                    continue;
                }
                match until {
                    Some(u) => tracing::warn!(url = %coords.url(), attempt = i + 1, error = %last,
                        waiting_secs = u.saturating_duration_since(Instant::now()).as_secs(), "coordinator not reachable yet"),
                    None => tracing::warn!(url = %coords.url(), attempt = i + 1, attempts, error = %last,
                        "coordinator not reachable yet"),
                }
            }
            Err(s) => return Err(rpc("the job lookup")(s)),
        }
        if i + 1 < attempts {
            // Exponential backoff with jitter, capped at 5 s (and at the deadline).
            let base = (200u64 << i.min(5)).min(5_000);
            let jitter = rand::rng().random_range(0..=base / 2);
            let mut pause = Duration::from_millis(base + jitter);
            if let Some(u) = until {
                pause = pause.min(u.saturating_duration_since(Instant::now()));
            }
            tokio::time::sleep(pause).await;
        }
    }
    Err(AgentError::Unreachable { url: list.to_string(), attempts: tried, last })
}

/// What the control tasks (heartbeats, signals) tell the training thread, and who this worker is
/// in the current generation.
#[derive(Default)]
struct Flags {
    /// The job ended (cancelled, failed) or the coordinator is lost: the group stops.
    stop: Option<String>,
    /// SIGTERM or SIGINT: this worker leaves after the step.
    leave: Option<String>,
    /// The coordinator asked the group to re-form.
    reform: Option<String>,
    rank: u32,
    generation: u32,
    /// This worker's figures since it started, sent with every heartbeat.
    telemetry: pb::RankTelemetry,
}

type Shared = Arc<Mutex<Flags>>;

fn flags(s: &Shared) -> std::sync::MutexGuard<'_, Flags> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The exactly-once ledger a worker writes when `THAW_LEDGER_DIR` is set: one JSON line per step
/// it computed gradients for (written before the step's all-reduce, with its unix time in ms), and one per generation it
/// joined with its position before joining. A checker keeps the steps of each generation below
/// the next generation's source position (see `tests/faults.rs`).
struct Ledger(Option<std::fs::File>);

impl Ledger {
    fn open(worker: &str) -> Ledger {
        let Some(dir) = std::env::var_os("THAW_LEDGER_DIR").map(PathBuf::from) else { return Ledger(None) };
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{worker}.jsonl"));
        match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => Ledger(Some(f)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open the ledger");
                Ledger(None)
            }
        }
    }

    fn line(&mut self, v: serde_json::Value) {
        if let Some(f) = &mut self.0 {
            // One write per line, unbuffered: a killed process loses nothing it wrote.
            let _ = f.write_all(format!("{v}\n").as_bytes());
        }
    }
}

struct GrpcControl {
    rt: Arc<tokio::runtime::Runtime>,
    coords: Arc<Coordinators>,
    job: String,
    worker: String,
    rank: u32,
    generation: u32,
    shared: Shared,
    reports: tokio::sync::mpsc::Sender<pb::ProgressReport>,
    ledger: Arc<Mutex<Ledger>>,
    /// The stage the coordinator sent with the last epoch plan.
    stage: Option<(u32, pb::FreezeStage)>,
    /// How long to wait for an unreachable coordinator.
    outage: Duration,
}

impl Control for GrpcControl {
    fn epoch_plan(&mut self, epoch: u32) -> Result<EpochPlan, TrainError> {
        let req = pb::EpochPlanRequest {
            job_id: self.job.clone(),
            rank: self.rank,
            epoch,
            worker_id: self.worker.clone(),
            generation: self.generation,
        };
        // Through a coordinator outage (a restart, a takeover) the plan is waited for, up to the
        // job's coordinator_timeout_secs; the step in flight is already done.
        let p = self
            .rt
            .block_on(through_outage("the epoch plan", self.outage, &self.coords, |mut w| {
                let req = req.clone();
                async move { within(RPC_DEADLINE, w.get_epoch_plan(req)).await }
            }))
            .map_err(|s| TrainError::Control(format!("epoch plan {}: {}", epoch + 1, s.message())))?;
        self.stage = p.stage.clone().map(|s| (epoch, s));
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
        info.plan().map_err(|e| TrainError::Invalid(e.to_string()))
    }

    fn stage(&mut self, epoch: u32) -> Option<Stage> {
        let (at, stage) = self.stage.as_ref().filter(|(at, _)| *at == epoch)?;
        match stage_from_proto(stage) {
            Ok(stage) => Some(stage),
            Err(e) => {
                // The local expansion of the same spec takes over; say so.
                tracing::warn!(epoch = at + 1, error = %e, "ignoring a malformed stage from the coordinator");
                None
            }
        }
    }

    fn progress(&mut self, epoch: u32, step: u64, samples_done: u64, metrics: Option<&EpochMetrics>) {
        let req = pb::ProgressReport {
            job_id: self.job.clone(),
            rank: self.rank,
            progress: Some(pb::Progress { epoch, step, samples_done, ..Default::default() }),
            metrics: metrics.map(pb::EpochMetrics::from),
            worker_id: self.worker.clone(),
            generation: self.generation,
        };
        // Never wait on the coordinator from a training step: a full queue drops the report (the
        // next one carries newer progress); a dropped epoch's metrics are logged.
        if let Err(e) = self.reports.try_send(req) {
            if metrics.is_some() {
                tracing::warn!(error = %e, "dropped an epoch's metrics report: the coordinator is slow");
            }
        }
    }

    fn stop_requested(&self) -> Option<String> {
        flags(&self.shared).stop.clone()
    }

    fn leave_requested(&self) -> Option<String> {
        flags(&self.shared).leave.clone()
    }

    fn reform_requested(&self) -> Option<String> {
        flags(&self.shared).reform.clone()
    }

    fn step_done(&mut self, s: &crate::train::StepTelemetry) {
        add_step(&mut flags(&self.shared).telemetry, s);
    }

    fn trained(&mut self, epoch: u32, step: u64, samples: &[usize]) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        ledger.line(serde_json::json!({ "gen": self.generation, "e": epoch, "s": step, "t": t, "x": samples }));
    }
}

/// Adds one finished step to a worker's totals (what its heartbeats carry).
pub fn add_step(t: &mut pb::RankTelemetry, s: &crate::train::StepTelemetry) {
    t.steps += 1;
    t.step_seconds += s.seconds;
    t.data_wait_seconds += s.data_wait;
    t.allreduce_seconds += s.allreduce;
    t.allreduce_exposed_seconds += s.allreduce_exposed;
    t.samples += s.samples;
    t.skipped += s.skipped;
    t.loss = s.loss;
    t.group_lr.clone_from(&s.group_lr);
    t.stage = s.stage;
}

/// Runs one worker of `opts.job` to the end: joins, trains, and joins again whenever its group
/// fails or re-forms, until the job ends for it.
pub fn run(opts: AgentOptions) -> Result<AgentOutcome, AgentError> {
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("thaw-control")
            .enable_all()
            .build()
            .map_err(|e| AgentError::Setup(format!("cannot start the control runtime: {e}")))?,
    );
    let me = worker_id(&opts.worker_name);
    let (coords, job) = rt.block_on(connect(&opts.coordinator, opts.connect_attempts, opts.connect_wait, &opts.job))?;
    let spec = JobSpec::from_toml(&job.spec_toml, std::path::Path::new("/")).map_err(TrainError::from)?;
    let nccl = spec.distributed.collective == CollectiveKind::Nccl;
    // Before anything heavy: a job that wants NCCL fails here, clearly, where NCCL cannot run.
    if nccl {
        nccl_offer()?;
    }
    let d = spec.distributed.clone();
    let timeout = Duration::from_secs_f64(d.step_timeout_secs);
    let bucket_bytes = (d.bucket_mb * 1024.0 * 1024.0) as usize;
    // A join waits for the rendezvous, or for a regroup that may wait for replacements.
    let join_deadline = Duration::from_secs_f64(d.join_timeout_secs + d.rejoin_timeout_secs + 30.0);
    let beat_every = Duration::from_secs_f64(d.heartbeat_timeout_secs / 4.0)
        .clamp(Duration::from_millis(100), Duration::from_secs(1));
    let outage = Duration::from_secs_f64(d.coordinator_timeout_secs);
    // Every check (data, weights, groups) happens before joining, so a bad worker never holds up
    // the group.
    let mut trainer = Trainer::prepare(spec, opts.device)?;
    let shared: Shared = Arc::new(Mutex::new(Flags::default()));
    let ledger = Arc::new(Mutex::new(Ledger::open(&me)));

    // Heartbeats on the control runtime: a stop or re-form command sets the flag that the
    // training loop agrees on at the next step; a coordinator silent for long stops the worker.
    let hb = {
        let (shared, coords, job, worker) = (shared.clone(), coords.clone(), opts.job.clone(), me.clone());
        rt.spawn(async move {
            let mut failures = 0;
            let lost_after = (outage.as_secs_f64() / beat_every.as_secs_f64()).ceil() as u32;
            loop {
                tokio::time::sleep(beat_every).await;
                let (rank, generation, telemetry) = {
                    let f = flags(&shared);
                    (f.rank, f.generation, f.telemetry.clone())
                };
                let req = pb::HeartbeatRequest {
                    job_id: job.clone(),
                    worker_id: worker.clone(),
                    rank,
                    generation,
                    telemetry: Some(telemetry),
                };
                let answer = within(RPC_DEADLINE, coords.workers().heartbeat(req)).await;
                if let Err(e) = &answer {
                    coords.after_error(e);
                }
                let mut f = flags(&shared);
                match answer {
                    Ok(r) if r.command == pb::WorkerCommand::Stop as i32 => f.stop = Some(r.reason),
                    Ok(r) if r.command == pb::WorkerCommand::Reform as i32 => {
                        failures = 0;
                        if f.generation == generation {
                            f.reform = Some(r.reason);
                        }
                    }
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 {
                            tracing::warn!(error = %e.message(), "heartbeat unanswered; training on until the coordinator is back");
                        }
                        if failures >= lost_after {
                            f.stop = Some(format!("lost the coordinator: {}", e.message()));
                        }
                    }
                }
            }
        })
    };
    // SIGTERM / Ctrl-C: this worker leaves after finishing its step with the others (a
    // preemption notice, a drain); if every rank gets it, the group stops and rank 0 checkpoints.
    let signals = {
        let shared = shared.clone();
        rt.spawn(async move {
            loop {
                let why = wait_for_signal().await;
                tracing::warn!(signal = why, "leaving the group after the step in flight");
                flags(&shared).leave.get_or_insert_with(|| format!("worker received {why}"));
            }
        })
    };
    // Progress and metrics: a bounded queue, drained here with deadlines.
    let (reports, mut queue) = tokio::sync::mpsc::channel::<pb::ProgressReport>(64);
    let reporter = {
        let coords = coords.clone();
        rt.spawn(async move {
            while let Some(r) = queue.recv().await {
                // An epoch's metrics wait out an outage; plain progress is superseded by the next
                // report and is dropped instead.
                let answer = if r.metrics.is_some() {
                    through_outage("an epoch's metrics", outage, &coords, |mut w| {
                        let r = r.clone();
                        async move { within(RPC_DEADLINE, w.report_progress(r)).await }
                    })
                    .await
                } else {
                    within(RPC_DEADLINE, coords.workers().report_progress(r)).await
                };
                if let Err(e) = answer {
                    tracing::debug!(error = %e.message(), "progress report failed");
                }
            }
        })
    };

    let mut generation = 0u32;
    // Why this worker joins again, and whether that was a failure.
    let mut again: Option<(String, bool, Vec<u32>)> = None;
    let (mut rank, mut world) = (0, 0);
    let result: Result<DistOutcome, AgentError> = loop {
        if let Some(why) = flags(&shared).stop.clone() {
            break Ok(DistOutcome { history: trainer.history().to_vec(), end: DistEnd::Stopped(why) });
        }
        let listener = TcpListener::bind((opts.bind_host.as_str(), 0))
            .map_err(|e| AgentError::Setup(format!("cannot listen on {}: {e}", opts.bind_host)))?;
        let addr = listener.local_addr().map_err(|e| AgentError::Setup(e.to_string()))?;
        let before = trainer.cursor().position();
        let (reason, failed, closed_ranks) = again.take().unwrap_or_default();
        let join = pb::JoinRequest {
            job_id: opts.job.clone(),
            worker_id: me.clone(),
            collective_addr: addr.to_string(),
            nccl_unique_id: if nccl { nccl_offer()? } else { Vec::new() },
            num_train_samples: trainer.splits.train.len() as u64,
            layer_groups: trainer.net.group_names().iter().map(|g| g.to_string()).collect(),
            generation,
            cursor: (generation > 0).then(|| cursor_to_proto(&before)),
            reason,
            failed,
            closed_ranks,
        };
        let a = match rt.block_on(through_outage("the join", outage, &coords, |mut w| {
            let join = join.clone();
            async move { within(join_deadline, w.join(join)).await }
        })) {
            Ok(a) => a,
            Err(e) if generation == 0 => break Err(rpc("the join")(e)),
            // The job ended or failed while this worker was away: say why and stop.
            Err(e) => break Err(rpc("the re-join")(e)),
        };
        if generation == 0 && !a.resume_from.is_empty() {
            trainer.load_checkpoint(std::path::Path::new(&a.resume_from))?;
        }
        (rank, world, generation) = (a.rank, a.world_size, a.generation);
        {
            let mut f = flags(&shared);
            (f.rank, f.generation, f.reform) = (rank, generation, None);
        }
        tracing::info!(rank, world_size = world, generation, source = a.source_rank, peers = ?a.peer_addrs, "joined");
        let formed = form_group(&a, listener, nccl, opts.device, timeout).and_then(|mut c| {
            trainer.sync_state(c.as_mut(), a.source_rank)?;
            Ok(c)
        });
        let mut collective = match formed {
            Ok(c) => c,
            Err(TrainError::Collective(e)) => {
                tracing::warn!(error = %e, "the group failed while forming; joining again");
                again = Some((e.to_string(), true, e.closed_peer().map(|p| p as u32).into_iter().collect()));
                continue;
            }
            Err(e) => break Err(e.into()),
        };
        trainer.set_position(a.cursor.as_ref().map(cursor_from_proto).unwrap_or_default());
        ledger.lock().unwrap_or_else(|p| p.into_inner()).line(serde_json::json!({
            "gen": generation, "rank": rank, "source": rank == a.source_rank,
            "before": [before.epoch, before.step], "start": serde_json::to_value(trainer.cursor().position()).unwrap_or_default(),
        }));
        let mut ctl = GrpcControl {
            rt: rt.clone(),
            coords: coords.clone(),
            job: opts.job.clone(),
            worker: me.clone(),
            rank,
            generation,
            shared: shared.clone(),
            reports: reports.clone(),
            ledger: ledger.clone(),
            stage: None,
            outage,
        };
        let outcome = trainer.run_distributed(rank, collective.as_mut(), &mut ctl, bucket_bytes);
        drop(collective);
        match outcome {
            Ok(DistOutcome { end: DistEnd::Reform(why), .. }) => {
                tracing::info!(reason = %why, "the group re-forms at this step");
                again = Some((why, false, Vec::new()));
            }
            Err(TrainError::Collective(e)) => {
                tracing::warn!(error = %e, "the group failed; dropping the step in flight and joining again");
                again = Some((e.to_string(), true, e.closed_peer().map(|p| p as u32).into_iter().collect()));
            }
            Err(TrainError::Control(e)) => {
                tracing::warn!(error = %e, "the coordinator did not answer; joining again");
                again = Some((e, true, Vec::new()));
            }
            other => break other.map_err(AgentError::from),
        }
    };
    hb.abort();
    signals.abort();
    drop(reports);
    // Let queued reports (the last epoch's metrics) go out before saying goodbye.
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), reporter).await });
    let (succeeded, graceful, error) = match &result {
        Ok(o) => match &o.end {
            DistEnd::Finished => (true, false, String::new()),
            DistEnd::Left(why) => (true, true, why.clone()),
            DistEnd::Stopped(why) | DistEnd::Reform(why) => (false, false, why.clone()),
        },
        Err(e) => (false, false, e.to_string()),
    };
    // A worker stopped because the job already ended has nothing to report.
    let leave = pb::LeaveRequest {
        job_id: opts.job.clone(),
        worker_id: me.clone(),
        rank,
        succeeded,
        error,
        graceful,
        generation,
    };
    // Rank 0's goodbye ends the job: it waits out an outage too.
    let said = rt.block_on(through_outage("the goodbye", outage, &coords, |mut w| {
        let leave = leave.clone();
        async move { within(RPC_DEADLINE, w.leave(leave)).await }
    }));
    if let Err(e) = said {
        tracing::warn!(error = %e.message(), "could not tell the coordinator we left");
    }
    Ok(AgentOutcome { rank, world_size: world, outcome: result? })
}

/// Forms this generation's collective: the ring on `listener`, or NCCL.
fn form_group(
    a: &pb::JoinResponse,
    listener: TcpListener,
    nccl: bool,
    device: tch::Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>, TrainError> {
    if nccl {
        drop(listener);
        return nccl_group(a.rank, a.world_size, &a.nccl_unique_id, device, timeout)
            .map_err(|e| TrainError::Invalid(e.to_string()));
    }
    let peers: Vec<SocketAddr> = a
        .peer_addrs
        .iter()
        .map(|p| p.parse().map_err(|e| TrainError::Invalid(format!("bad peer address `{p}`: {e}"))))
        .collect::<Result<_, _>>()?;
    let options = RingOptions::new(timeout).with_secret(&a.ring_secret);
    let ring = RingCollective::connect_with(a.rank as usize, a.world_size as usize, listener, &peers, options)?;
    if let Some((to_next, from_prev)) = ring.transports() {
        tracing::info!(to_next, from_prev, "ring formed");
    }
    Ok(Box::new(ring))
}

/// Resolves on SIGINT or SIGTERM with the signal's name.
async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// The NCCL unique id this worker offers the rendezvous (the first offered, rank 0's, is used).
#[cfg(feature = "nccl")]
fn nccl_offer() -> Result<Vec<u8>, AgentError> {
    crate::collective::nccl_available().map_err(TrainError::from)?;
    Ok(crate::collective::new_unique_id().map_err(TrainError::from)?)
}

#[cfg(not(feature = "nccl"))]
fn nccl_offer() -> Result<Vec<u8>, AgentError> {
    Err(AgentError::Setup(
        "the job asks for collective = \"nccl\", but this thaw was built without NCCL; build with \
         `cargo build --release --features nccl` (GPU machines) or use collective = \"ring\""
            .into(),
    ))
}

/// Forms the NCCL group on this worker's GPU.
#[cfg(feature = "nccl")]
fn nccl_group(
    rank: u32,
    world: u32,
    id: &[u8],
    device: tch::Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>, AgentError> {
    let ordinal = match device {
        tch::Device::Cuda(i) => i,
        other => {
            return Err(AgentError::Setup(format!(
                "collective \"nccl\" needs a CUDA device, the worker runs on {other:?}"
            )))
        }
    };
    let c = crate::collective::NcclCollective::new(rank as usize, world as usize, ordinal, id, timeout)
        .map_err(TrainError::from)?;
    Ok(Box::new(c))
}

#[cfg(not(feature = "nccl"))]
fn nccl_group(_: u32, _: u32, _: &[u8], _: tch::Device, _: Duration) -> Result<Box<dyn Collective>, AgentError> {
    nccl_offer().map(|_| unreachable!("nccl_offer always fails without the feature"))
}
