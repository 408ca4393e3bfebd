//! The coordinator's core: every job it knows, with its rendezvous, membership, epoch plans,
//! progress and worker liveness, as plain Rust over the domain types.
//!
//! The gRPC services are thin adapters over [`Coordinator`]: they take the lock, call one method,
//! and convert the result. Time is passed in (`now` for deadlines, `now_ms` for the record), so
//! every path is tested without a clock or a network. This module never sleeps and never touches
//! the network; waiting (a worker long-polling the rendezvous) is the service's job, guided by
//! [`JoinPoll::Waiting`]'s deadline.
//!
//! Persistence: every change to a job's record, metrics or settled facts is written through the
//! [`StateStore`] before the method returns (one small file write with the `FileStore`), so a
//! coordinator restarted with [`Coordinator::restore`] knows every job again. Progress alone is
//! written at most once per second per job ([`PROGRESS_SAVE_INTERVAL_MS`]) to keep the hot path
//! cheap; the latest progress is written by the next [`Coordinator::flush`] (the service runs it
//! every second and on shutdown). Once a job is accepted, a write that fails does not undo the
//! change: the job stays dirty, the failure is logged, and `flush` tries again. The store is the
//! only I/O here.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::job::{JobError, JobRecord, JobState};
use crate::metrics::EpochMetrics;
use crate::plan::{Cut, EpochCursor, EpochPlan, PlanError};
use crate::recovery::{Arrival, Regroup, RegroupError, RegroupState};
use crate::rendezvous::{Member, Rendezvous, RendezvousConfig, RendezvousError, RendezvousState};
use crate::spec::{JobSpec, SpecError, Stage};
use crate::store::{LiveState, MemoryStore, StateStore, StoreError, StoredJob};
use crate::telemetry::{RankTelemetry, RankView};

/// Progress alone (no state change, no finished epoch) is written to the store at most this often
/// per job; [`Coordinator::flush`] writes what was held back.
pub const PROGRESS_SAVE_INTERVAL_MS: u64 = 1_000;

/// What kind of failure, for the one place that maps errors to transport status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    AlreadyExists,
    NotFound,
    FailedPrecondition,
    DeadlineExceeded,
    /// The state store could not write; retrying may succeed.
    Unavailable,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("a job named `{0}` already exists; choose another name or cancel it first")]
    DuplicateJob(String),
    #[error("no job `{0}`")]
    UnknownJob(String),
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("job `{job}` is {state}: {what}")]
    WrongState { job: String, state: JobState, what: String },
    #[error("worker `{worker}` is not a member of job `{job}`")]
    NotAMember { job: String, worker: String },
    #[error(
        "worker `{worker}` of job `{job}` sees {found} training samples but the job has {expected}; \
         every worker must read the same data"
    )]
    DataMismatch { job: String, worker: String, expected: u64, found: u64 },
    #[error(
        "worker `{worker}` of job `{job}` has the layer groups [{}] but the job's workers have [{}]; \
         every worker must build the same model",
        found.join(", "),
        expected.join(", ")
    )]
    GroupMismatch { job: String, worker: String, expected: Vec<String>, found: Vec<String> },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Regroup(#[from] RegroupError),
    #[error("worker `{worker}` of job `{job}` speaks for generation {found}, the group is at generation {current}; join again")]
    StaleGeneration { job: String, worker: String, found: u32, current: u32 },
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::Spec(_)
            | CoreError::Plan(_)
            | CoreError::DataMismatch { .. }
            | CoreError::GroupMismatch { .. } => ErrorKind::InvalidArgument,
            CoreError::DuplicateJob(_) => ErrorKind::AlreadyExists,
            CoreError::UnknownJob(_) | CoreError::NotAMember { .. } => ErrorKind::NotFound,
            CoreError::Rendezvous(RendezvousError::TimedOut { .. }) => ErrorKind::DeadlineExceeded,
            CoreError::Rendezvous(RendezvousError::InvalidConfig { .. } | RendezvousError::InvalidJoin { .. }) => {
                ErrorKind::InvalidArgument
            }
            CoreError::Rendezvous(RendezvousError::DuplicateWorker { .. }) => ErrorKind::AlreadyExists,
            CoreError::Rendezvous(_)
            | CoreError::Job(_)
            | CoreError::WrongState { .. }
            | CoreError::Regroup(_)
            | CoreError::StaleGeneration { .. } => ErrorKind::FailedPrecondition,
            CoreError::Store(StoreError::InvalidId { .. }) => ErrorKind::InvalidArgument,
            CoreError::Store(e) if e.is_retryable() => ErrorKind::Unavailable,
            CoreError::Store(_) => ErrorKind::Internal,
        }
    }
}

/// A worker's place in a formed group: everything it needs to set up its collective and train.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub rank: u32,
    pub world_size: u32,
    /// Collective addresses of every rank, index = rank.
    pub peers: Vec<String>,
    pub collective: String,
    /// Rank 0's NCCL unique id (empty for the ring).
    pub nccl_unique_id: Vec<u8>,
    /// The key the ring's link handshakes prove (a fresh one per generation: ranks of an old
    /// generation cannot join a new ring).
    pub ring_secret: Vec<u8>,
    pub spec_toml: String,
    /// The group's generation: 1 for the first, +1 at every re-form.
    pub generation: u32,
    /// The rank whose model, optimizer state, cursor and metrics every rank takes before training.
    pub source_rank: u32,
    /// Where the group starts, for its world.
    pub cursor: EpochCursor,
    /// A checkpoint the first generation loads (a resumed job).
    pub resume_from: Option<String>,
}

/// A worker asking to join (or re-join) a job.
#[derive(Clone, Debug, Default)]
pub struct JoinInfo<'a> {
    pub worker_id: &'a str,
    pub collective_addr: &'a str,
    /// The training split's size as the worker sees it.
    pub num_samples: u64,
    pub nccl_unique_id: &'a [u8],
    /// The model's layer groups, input to output.
    pub groups: &'a [String],
    /// The generation the worker last trained in (0: none).
    pub generation: u32,
    /// A survivor's completed progress.
    pub cursor: Option<EpochCursor>,
    /// Why a survivor joins again (its collective's error, or the agreed re-form).
    pub reason: &'a str,
    /// Whether that was a failure (a collective error), as opposed to an agreed re-form (a
    /// graceful leave, an admission): only failures count against `max_restarts`.
    pub failed: bool,
    /// Ranks of the survivor's generation whose connection closed (their process is gone): not
    /// waited for in the regroup.
    pub closed_ranks: &'a [u32],
}

/// The answer to a worker waiting in the rendezvous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinPoll {
    /// Not closed yet: ask again when something changes, or at the latest at `until`.
    Waiting {
        until: Option<Instant>,
    },
    Ready(Assignment),
}

/// What a heartbeat tells a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Continue,
    Stop {
        reason: String,
    },
    /// Finish the step in flight (agreed with the other ranks) and join again.
    Reform {
        reason: String,
    },
}

/// The parameters of one epoch's plan; a worker rebuilds the [`EpochPlan`] from them.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInfo {
    pub seed: u64,
    pub epoch: u32,
    pub num_samples: u64,
    pub world_size: u32,
    pub batch_size: u32,
    pub steps: u64,
    /// The schedule's stage for this epoch: which groups train, at which rates, with which
    /// BatchNorm policy. `None` when the workers did not report their model's groups.
    pub stage: Option<Stage>,
    /// Set in a stage that caches prefix outputs: plan with rank affinity to this epoch (the
    /// stage's first), see [`EpochPlan::with_affinity`].
    pub affinity_epoch: Option<u32>,
    /// The blocked layout's (read block, shuffle window), for packed shards; see
    /// [`EpochPlan::with_blocks`].
    pub blocks: Option<(u32, u32)>,
    /// The rest of the epoch after its world changed; see [`EpochPlan::with_cut`].
    pub cut: Option<Cut>,
}

impl PlanInfo {
    /// The plan these parameters describe, as every rank rebuilds it.
    pub fn plan(&self) -> Result<EpochPlan, PlanError> {
        let mut plan = EpochPlan::new(self.seed, self.epoch, self.num_samples, self.world_size, self.batch_size)?;
        if let Some((block, window)) = self.blocks {
            plan = plan.with_blocks(block, window)?;
        }
        if let Some(anchor) = self.affinity_epoch {
            plan = plan.with_affinity(anchor)?;
        }
        match self.cut {
            Some(cut) => plan.with_cut(cut),
            None => Ok(plan),
        }
    }

    /// The plan parameters of `epoch` of `spec` for `world` ranks: the spec's layout, and the
    /// affinity of a stage that caches. The one place a plan's parameters are decided, for the
    /// coordinator and for a one-process run alike.
    pub fn for_spec(
        spec: &JobSpec,
        stages: &[Stage],
        epoch: u32,
        num_samples: u64,
        world: u32,
        cut: Option<Cut>,
    ) -> Result<PlanInfo, PlanError> {
        let stage = crate::schedule::stage_of(stages, epoch as usize);
        let mut info = PlanInfo {
            seed: spec.seed,
            epoch,
            num_samples,
            world_size: world,
            batch_size: spec.train.batch_size as u32,
            steps: 0,
            stage: stage.cloned(),
            affinity_epoch: stage
                .filter(|s| s.caches(&spec.data, spec.train.feature_cache_mb))
                .map(|s| s.epochs.start as u32),
            blocks: spec.data.blocks(),
            cut,
        };
        info.steps = info.plan()?.steps_per_rank();
        Ok(info)
    }
}

/// A read-only view of a job.
/// Rank 0's loss points kept per job for the web view.
const LOSS_TRACE: usize = 4096;

/// A stage as the web view shows it: 1-based, its epochs (0-based, end exclusive), what trains.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageView {
    pub index: usize,
    pub epochs: (usize, usize),
    pub trainable: Vec<String>,
}

/// Everything a job's web page shows (see [`Coordinator::detail`]).
#[derive(Clone, Debug)]
pub struct JobDetail {
    pub view: JobView,
    pub epochs: usize,
    pub stages: Vec<StageView>,
    pub groups: Vec<String>,
    pub ranks: Vec<RankView>,
    pub loss_trace: Vec<(u64, f64)>,
}

#[derive(Clone, Debug)]
pub struct JobView {
    pub record: JobRecord,
    pub name: String,
    pub spec_toml: String,
    pub workers: u32,
    pub steps_per_epoch: u64,
    pub metrics: Vec<EpochMetrics>,
    pub generation: u32,
    pub restarts: u32,
}

struct Job {
    record: JobRecord,
    spec: JobSpec,
    spec_toml: String,
    rendezvous: Rendezvous,
    members: Vec<Member>,
    num_samples: Option<u64>,
    /// The model's layer groups as the first worker reported them, and the schedule expanded
    /// against them (empty until then).
    groups: Vec<String>,
    stages: Vec<Stage>,
    nccl_unique_id: Vec<u8>,
    metrics: Vec<EpochMetrics>,
    last_seen: HashMap<String, Instant>,
    /// The last figures each worker sent with its heartbeat, with its rank then.
    telemetry: BTreeMap<String, (u32, RankTelemetry)>,
    /// Rank 0's loss at each heartbeat: (its steps so far, loss), the last `LOSS_TRACE` of them.
    loss_trace: std::collections::VecDeque<(u64, f64)>,
    /// Members that finished the job and said goodbye before rank 0 did: done, not lost.
    finished: Vec<String>,
    /// The credential its workers must present to join, when one was issued.
    worker_token: Option<String>,
    /// The job's ring secret (random, never leaves the coordinator): each generation's ring key
    /// is derived from it.
    ring_secret: String,
    /// Size of the group the rendezvous formed (kept when the members are not, after a restore).
    world_size: u32,
    /// The group's generation (0 before the first group forms) and where it started.
    generation: u32,
    cursor: EpochCursor,
    /// The rank whose state the current generation started from.
    source: u32,
    /// Failures counted against `max_restarts`.
    restarts: u32,
    /// The re-forming group, while `Recovering`.
    regroup: Option<Regroup>,
    /// Newcomers to a running job, admitted at the next re-form.
    admitting: Vec<Arrival>,
    /// Newcomers a regroup had no place for when it closed; told so when they ask.
    turned_away: Vec<String>,
    /// A resumed job's checkpoint and its cursor.
    resume_from: Option<String>,
    resume_cursor: Option<EpochCursor>,
    /// `now_ms` of the last successful write to the store.
    saved_ms: Option<u64>,
    /// Changed since the last successful write.
    dirty: bool,
}

impl Job {
    fn is_member(&self, worker: &str) -> bool {
        self.members.iter().any(|m| m.worker_id == worker)
    }

    /// The plan parameters of `epoch` with `world` ranks (the spec's layout, the stage's affinity).
    /// The epoch the current generation started in carries its cut.
    fn plan_info(&self, epoch: u32, world: u32) -> Result<PlanInfo, PlanError> {
        let cut = if epoch == self.cursor.epoch { self.cursor.cut } else { None };
        PlanInfo::for_spec(&self.spec, &self.stages, epoch, self.num_samples.unwrap_or(0), world, cut)
    }

    fn rank_of(&self, worker: &str) -> Option<u32> {
        self.members.iter().find(|m| m.worker_id == worker).map(|m| m.rank)
    }

    /// Whether `worker` is anyone the job knows now: a member, a survivor re-forming, a newcomer.
    fn knows(&self, worker: &str) -> bool {
        self.is_member(worker)
            || self.admitting.iter().any(|a| a.worker_id == worker)
            || self.regroup.as_ref().is_some_and(|g| g.expects(worker) || g.has_arrived(worker))
    }

    fn heartbeat_timeout(&self) -> Duration {
        secs(self.spec.distributed.heartbeat_timeout_secs)
    }

    /// Running -> Recovering: the group re-forms without `gone` (if any), with the newcomers
    /// waiting for admission. A failure counts against the restart budget; past it the job fails.
    fn begin_recovery(
        &mut self,
        reason: String,
        failure: bool,
        gone: Option<&str>,
        now: Instant,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        if self.record.state() != JobState::Running {
            return Ok(());
        }
        let d = &self.spec.distributed;
        if failure {
            self.restarts += 1;
            if self.restarts > d.max_restarts {
                self.record.fail(
                    format!("{reason}; the restart budget (distributed.max_restarts = {}) is spent", d.max_restarts),
                    now_ms,
                )?;
                return Ok(());
            }
        }
        let counted =
            if failure { format!(" (failure {} of {} allowed)", self.restarts, d.max_restarts) } else { String::new() };
        self.record.start_recovering(format!("{reason}{counted}"), now_ms)?;
        let mut g = self.new_regroup();
        if let Some(w) = gone {
            g.drop_member(w, now);
        }
        for a in self.admitting.drain(..) {
            if let Err(e) = g.arrive(a, now) {
                tracing::warn!(job = %self.spec.name, error = %e, "newcomer not admitted");
            }
        }
        self.regroup = Some(g);
        self.nccl_unique_id.clear();
        Ok(())
    }

    /// A regroup round that expects every member of the current generation.
    fn new_regroup(&self) -> Regroup {
        let d = &self.spec.distributed;
        let expected = self.members.iter().map(|m| (m.worker_id.clone(), m.rank)).collect();
        Regroup::new(&self.spec.name, expected, d.min_workers, d.max_workers, secs(d.rejoin_timeout_secs))
    }

    /// Moves a recovering job on when its regroup closed (a new generation) or failed.
    fn advance_regroup(&mut self, now: Instant, now_ms: u64) -> Result<(), CoreError> {
        if self.record.state() != JobState::Recovering {
            return Ok(());
        }
        let Some(g) = self.regroup.as_mut() else { return Ok(()) };
        match g.poll(now).clone() {
            RegroupState::Waiting => {}
            RegroupState::Failed { reason } => {
                self.regroup = None;
                self.record.fail(reason, now_ms)?;
            }
            RegroupState::Closed(f) => {
                let lost = g.dropped().to_vec();
                self.turned_away.extend(g.turned_away().map(str::to_string));
                self.regroup = None;
                let world = f.members.len() as u32;
                self.generation += 1;
                self.source = f.source;
                self.cursor = f.cursor.for_world(world, self.spec.train.batch_size as u32);
                self.members = f
                    .members
                    .iter()
                    .enumerate()
                    .map(|(i, a)| Member {
                        rank: i as u32,
                        worker_id: a.worker_id.clone(),
                        collective_addr: a.collective_addr.clone(),
                    })
                    .collect();
                for m in &self.members {
                    self.last_seen.insert(m.worker_id.clone(), now);
                }
                self.world_size = world;
                let lost = if lost.is_empty() { String::new() } else { format!("; lost: {}", lost.join(", ")) };
                self.record.start_running(
                    format!(
                        "generation {} formed with {world} workers from rank {}'s state at epoch {} step {}{lost}",
                        self.generation,
                        f.source,
                        f.cursor.epoch + 1,
                        f.cursor.step
                    ),
                    now_ms,
                )?;
            }
        }
        Ok(())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.plan_info(0, self.world_size).map(|p| p.steps).unwrap_or(0)
    }

    fn stored(&self) -> StoredJob {
        StoredJob {
            record: self.record.clone(),
            spec_toml: self.spec_toml.clone(),
            metrics: self.metrics.clone(),
            num_samples: self.num_samples,
            workers: self.world_size,
            generation: self.generation,
            restarts: self.restarts,
            worker_token: self.worker_token.clone(),
            ring_secret: self.ring_secret.clone(),
            live: (!self.record.state().is_terminal()).then(|| LiveState {
                members: self.members.clone(),
                cursor: self.cursor,
                source: self.source,
                groups: self.groups.clone(),
                nccl_unique_id: self.nccl_unique_id.clone(),
                resume_from: self.resume_from.clone(),
                resume_cursor: self.resume_cursor,
            }),
        }
    }

    /// Writes the job to `store` now; on failure it stays dirty for the next flush.
    fn save(&mut self, store: &dyn StateStore, now_ms: u64) -> Result<(), StoreError> {
        match store.put_job(&self.stored()) {
            Ok(()) => {
                self.dirty = false;
                self.saved_ms = Some(now_ms);
                Ok(())
            }
            Err(e) => {
                self.dirty = true;
                Err(e)
            }
        }
    }

    /// [`Job::save`] for a change already made: a failure is logged, not returned.
    fn save_or_defer(&mut self, store: &dyn StateStore, now_ms: u64) {
        if let Err(e) = self.save(store, now_ms) {
            tracing::warn!(job = %self.record.job_id(), error = %e, "cannot persist the job; will retry");
        }
    }
}

/// Every job of one coordinator, and the store that keeps them across restarts.
pub struct Coordinator {
    jobs: BTreeMap<String, Job>,
    store: Box<dyn StateStore>,
}

impl Default for Coordinator {
    fn default() -> Self {
        Self::new()
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl Coordinator {
    /// A coordinator whose jobs live in memory only (a [`MemoryStore`]): nothing outlives it.
    pub fn new() -> Self {
        Self::with_store(Box::new(MemoryStore::new()))
    }

    /// An empty coordinator that writes its jobs to `store`. To pick up the jobs already in a
    /// store, use [`Coordinator::restore`].
    pub fn with_store(store: Box<dyn StateStore>) -> Self {
        Coordinator { jobs: BTreeMap::new(), store }
    }

    /// A coordinator with every job of `store`, as a restarted coordinator (or a standby taking
    /// over) sees them.
    ///
    /// Terminal jobs come back as they were: history, progress, metrics. Live jobs carry on from
    /// their stored [`LiveState`]: a running job keeps its members, ranks, generation and epoch
    /// position, and every member gets a fresh heartbeat deadline (its workers trained on through
    /// the outage, on the ring they hold); a recovering job opens its regroup again and its
    /// survivors join again; a job still in its rendezvous opens it again, empty, and its workers
    /// join again. A live job stored without that state (by an older version) cannot go on and is
    /// failed with a reason that says so. A stored job whose spec no longer validates is skipped
    /// with a warning; its stored value stays until a job of that name is submitted.
    pub fn restore(store: Box<dyn StateStore>, now: Instant, now_ms: u64) -> Result<Self, CoreError> {
        let mut c = Self::with_store(store);
        let (mut interrupted, mut resumed) = (0, 0);
        for stored in c.store.load_all()? {
            let id = stored.record.job_id().to_string();
            let spec = match JobSpec::from_toml(&stored.spec_toml, Path::new("/")) {
                Ok(spec) if spec.name == id => spec,
                Ok(spec) => {
                    tracing::warn!(job = %id, name = %spec.name, "skipping a stored job whose spec has another name");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "skipping a stored job whose spec is no longer valid");
                    continue;
                }
            };
            let d = &spec.distributed;
            let config = match RendezvousConfig::new(
                id.clone(),
                d.min_workers,
                d.max_workers,
                secs(d.join_timeout_secs),
                secs(d.last_call_secs),
            ) {
                Ok(config) => config,
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "skipping a stored job whose rendezvous is no longer valid");
                    continue;
                }
            };
            let mut record = stored.record;
            let was = record.state();
            let live = stored.live.filter(|_| !was.is_terminal());
            let lost = !was.is_terminal() && live.is_none();
            if lost {
                record.fail(
                    format!("coordinator restarted while the job was {was}; resubmit or resume from its checkpoint"),
                    now_ms,
                )?;
                interrupted += 1;
                tracing::warn!(job = %id, state = %was, "the job was interrupted by the coordinator's restart; failed");
            }
            let live = live.unwrap_or_default();
            let mut job = Job {
                record,
                spec_toml: stored.spec_toml,
                spec,
                rendezvous: Rendezvous::new(config, now),
                members: live.members,
                num_samples: stored.num_samples,
                groups: Vec::new(),
                stages: Vec::new(),
                nccl_unique_id: live.nccl_unique_id,
                metrics: stored.metrics.clone(),
                last_seen: HashMap::new(),
                telemetry: BTreeMap::new(),
                loss_trace: Default::default(),
                finished: Vec::new(),
                worker_token: stored.worker_token.clone(),
                ring_secret: if stored.ring_secret.is_empty() {
                    crate::auth::new_job_token()
                } else {
                    stored.ring_secret.clone()
                },
                world_size: stored.workers,
                generation: stored.generation,
                cursor: live.cursor,
                source: live.source,
                restarts: stored.restarts,
                regroup: None,
                admitting: Vec::new(),
                turned_away: Vec::new(),
                resume_from: live.resume_from,
                resume_cursor: live.resume_cursor,
                saved_ms: Some(now_ms),
                dirty: false,
            };
            if !live.groups.is_empty() {
                let names: Vec<&str> = live.groups.iter().map(String::as_str).collect();
                match job.spec.schedule.expand(&names, &job.spec.train) {
                    Ok(stages) => (job.stages, job.groups) = (stages, live.groups),
                    Err(e) => tracing::warn!(job = %id, error = %e, "cannot expand the stored job's schedule"),
                }
            }
            for m in &job.members {
                job.last_seen.insert(m.worker_id.clone(), now);
            }
            match was {
                _ if lost => job.save(&*c.store, now_ms)?,
                JobState::Recovering => job.regroup = Some(job.new_regroup()),
                _ => {}
            }
            if !was.is_terminal() && !lost {
                resumed += 1;
                tracing::info!(
                    job = %id, state = %was, generation = job.generation, workers = job.members.len(),
                    epoch = job.record.progress().epoch + 1, "carrying on with a live job"
                );
            }
            c.jobs.insert(id, job);
        }
        tracing::info!(jobs = c.jobs.len(), resumed, interrupted, "restored the jobs of the state store");
        Ok(c)
    }

    fn job(&self, id: &str) -> Result<&Job, CoreError> {
        self.jobs.get(id).ok_or_else(|| CoreError::UnknownJob(id.to_string()))
    }

    /// The job and the store, borrowed together so that a method can change and save a job.
    fn job_mut(&mut self, id: &str) -> Result<(&mut Job, &dyn StateStore), CoreError> {
        let job = self.jobs.get_mut(id).ok_or_else(|| CoreError::UnknownJob(id.to_string()))?;
        Ok((job, &*self.store))
    }

    /// Validates a spec (absolute paths; as `thaw submit` resolves it) and opens its rendezvous.
    /// The job id is the spec's name, unique among the coordinator's live jobs: a finished,
    /// failed or cancelled job of the same name is replaced (history, metrics and all). The job
    /// is accepted only once the store has it.
    pub fn submit(&mut self, spec_toml: &str, now: Instant, now_ms: u64) -> Result<String, CoreError> {
        self.submit_resumed(spec_toml, None, now, now_ms)
    }

    /// [`Coordinator::submit`] for a job that resumes from a checkpoint: `resume` is its path
    /// (every worker reads it) and cursor; the first group starts there, whatever its world.
    pub fn submit_resumed(
        &mut self,
        spec_toml: &str,
        resume: Option<(String, EpochCursor)>,
        now: Instant,
        now_ms: u64,
    ) -> Result<String, CoreError> {
        let spec = JobSpec::from_toml(spec_toml, Path::new("/"))?;
        if spec.schedule.strategy == crate::spec::Strategy::Auto {
            // Choosing needs the model and the data, which only a worker or the CLI has.
            return Err(CoreError::Spec(crate::spec::invalid(
                "schedule.strategy",
                "\"auto\"",
                "the coordinator cannot choose a strategy; `thaw submit` and `thaw launch` resolve it before submitting",
            )));
        }
        if self.jobs.get(&spec.name).is_some_and(|old| !old.record.state().is_terminal()) {
            return Err(CoreError::DuplicateJob(spec.name));
        }
        let d = &spec.distributed;
        let config = RendezvousConfig::new(
            spec.name.clone(),
            d.min_workers,
            d.max_workers,
            secs(d.join_timeout_secs),
            secs(d.last_call_secs),
        )?;
        let mut record = JobRecord::new(spec.name.clone(), now_ms)?;
        record.start_rendezvous(format!("waiting for {}..{} workers", d.min_workers, d.max_workers), now_ms)?;
        let id = spec.name.clone();
        let spec_toml = spec.to_toml();
        let mut job = Job {
            record,
            spec,
            spec_toml,
            rendezvous: Rendezvous::new(config, now),
            members: Vec::new(),
            num_samples: None,
            groups: Vec::new(),
            stages: Vec::new(),
            nccl_unique_id: Vec::new(),
            metrics: Vec::new(),
            last_seen: HashMap::new(),
            telemetry: BTreeMap::new(),
            loss_trace: Default::default(),
            finished: Vec::new(),
            worker_token: None,
            ring_secret: crate::auth::new_job_token(),
            world_size: 0,
            generation: 0,
            cursor: EpochCursor::default(),
            source: 0,
            restarts: 0,
            regroup: None,
            admitting: Vec::new(),
            turned_away: Vec::new(),
            resume_cursor: resume.as_ref().map(|r| r.1),
            resume_from: resume.map(|r| r.0),
            saved_ms: None,
            dirty: true,
        };
        job.save(&*self.store, now_ms)?;
        self.jobs.insert(id.clone(), job);
        Ok(id)
    }

    /// A worker joins a job's rendezvous with nothing trained yet: [`Coordinator::join_with`] for
    /// a fresh worker.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        job_id: &str,
        worker_id: &str,
        collective_addr: &str,
        num_samples: u64,
        nccl_unique_id: &[u8],
        groups: &[String],
        now: Instant,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let info = JoinInfo { worker_id, collective_addr, num_samples, nccl_unique_id, groups, ..Default::default() };
        self.join_with(job_id, &info, now, now_ms)
    }

    /// A worker joins: into the first rendezvous; or, while the job runs, as a survivor whose
    /// group failed (the job starts recovering) or as a newcomer (admitted at the next step
    /// boundary, when the members re-form); or into a regroup under way. `num_samples` and
    /// `groups` must agree with the other workers'. The schedule is expanded against the groups of
    /// the first worker. The first NCCL id offered to a forming group is the one handed out.
    pub fn join_with(&mut self, job_id: &str, j: &JoinInfo, now: Instant, now_ms: u64) -> Result<(), CoreError> {
        let (job, store) = self.job_mut(job_id)?;
        let worker_id = j.worker_id;
        let state = job.record.state();
        if !matches!(state, JobState::Rendezvous | JobState::Running | JobState::Recovering) {
            return Err(CoreError::WrongState {
                job: job_id.into(),
                state,
                what: format!("worker `{worker_id}` cannot join"),
            });
        }
        match job.num_samples {
            Some(expected) if expected != j.num_samples => {
                return Err(CoreError::DataMismatch {
                    job: job_id.into(),
                    worker: worker_id.into(),
                    expected,
                    found: j.num_samples,
                })
            }
            _ => {}
        }
        if !j.groups.is_empty() {
            if job.groups.is_empty() {
                let names: Vec<&str> = j.groups.iter().map(String::as_str).collect();
                job.stages = job.spec.schedule.expand(&names, &job.spec.train)?;
                job.groups = j.groups.to_vec();
            } else if job.groups != j.groups {
                return Err(CoreError::GroupMismatch {
                    job: job_id.into(),
                    worker: worker_id.into(),
                    expected: job.groups.clone(),
                    found: j.groups.to_vec(),
                });
            }
        }
        let arrival = Arrival {
            worker_id: worker_id.to_string(),
            collective_addr: j.collective_addr.to_string(),
            cursor: j.cursor,
            old_rank: None,
        };
        let survivor = j.generation > 0 && j.generation == job.generation && job.is_member(worker_id);
        match state {
            JobState::Rendezvous => {
                job.rendezvous.join(worker_id, j.collective_addr, now)?;
            }
            JobState::Running if survivor => {
                let rank = job.rank_of(worker_id).unwrap_or(0);
                let why = if j.reason.is_empty() { "its group failed" } else { j.reason };
                job.begin_recovery(format!("rank {rank} ({worker_id}) re-joins: {why}"), j.failed, None, now, now_ms)?;
                if let Some(g) = job.regroup.as_mut() {
                    g.arrive(arrival, now)?;
                    // A peer whose connection closed is gone: a process that died does not come
                    // back under its id, so waiting for its heartbeat to lapse would only delay.
                    for &r in j.closed_ranks.iter().filter(|&&r| r != rank) {
                        let Some(m) = job.members.iter().find(|m| m.rank == r) else { continue };
                        if g.is_expected(&m.worker_id) {
                            tracing::info!(job = %job_id, rank = r, worker = %m.worker_id, by = rank, "its connection closed: not waited for");
                            g.drop_member(&m.worker_id, now);
                        }
                    }
                }
            }
            JobState::Running => {
                let max = job.spec.distributed.max_workers;
                job.admitting.retain(|a| a.worker_id != worker_id);
                if job.members.len() + job.admitting.len() >= max as usize {
                    return Err(RegroupError::Full { job: job_id.into(), worker: worker_id.into(), max }.into());
                }
                tracing::info!(job = %job_id, worker = %worker_id, "a newcomer waits to be admitted at the next step");
                job.admitting.push(Arrival { cursor: None, ..arrival });
            }
            _ => {
                let Some(g) = job.regroup.as_mut() else {
                    return Err(CoreError::WrongState {
                        job: job_id.into(),
                        state,
                        what: format!("worker `{worker_id}` cannot join"),
                    });
                };
                g.arrive(arrival, now)?;
            }
        }
        job.num_samples = Some(j.num_samples);
        if job.nccl_unique_id.is_empty() && !j.nccl_unique_id.is_empty() {
            job.nccl_unique_id = j.nccl_unique_id.to_vec();
        }
        job.last_seen.insert(worker_id.to_string(), now);
        let advanced = Self::advance(job, now, now_ms);
        job.save_or_defer(store, now_ms);
        advanced
    }

    /// Moves a job out of `Rendezvous` (round closed or timed out) or `Recovering` (regroup
    /// closed or failed) when it is time.
    fn advance(job: &mut Job, now: Instant, now_ms: u64) -> Result<(), CoreError> {
        job.advance_regroup(now, now_ms)?;
        if job.record.state() != JobState::Rendezvous {
            return Ok(());
        }
        match job.rendezvous.poll(now).clone() {
            RendezvousState::Open { .. } => {}
            RendezvousState::Closed { members } => {
                job.record.start_running(format!("rendezvous closed with {} workers", members.len()), now_ms)?;
                for m in &members {
                    job.last_seen.insert(m.worker_id.clone(), now);
                }
                job.world_size = members.len() as u32;
                job.members = members;
                job.generation = 1;
                job.source = 0;
                job.cursor =
                    job.resume_cursor.unwrap_or_default().for_world(job.world_size, job.spec.train.batch_size as u32);
            }
            RendezvousState::TimedOut { joined, min_workers } => {
                job.record
                    .fail(format!("rendezvous timed out with {joined} of at least {min_workers} workers"), now_ms)?;
            }
        }
        Ok(())
    }

    /// Where a waiting worker stands: still waiting (and until when), or its assignment.
    pub fn poll_join(
        &mut self,
        job_id: &str,
        worker_id: &str,
        now: Instant,
        now_ms: u64,
    ) -> Result<JoinPoll, CoreError> {
        let (job, store) = self.job_mut(job_id)?;
        let before = job.record.history().len();
        let advanced = Self::advance(job, now, now_ms);
        if job.record.history().len() != before {
            job.save_or_defer(store, now_ms);
        }
        advanced?;
        match job.record.state() {
            JobState::Rendezvous => Ok(JoinPoll::Waiting { until: job.rendezvous.next_deadline() }),
            JobState::Recovering => {
                Ok(JoinPoll::Waiting { until: job.regroup.as_ref().and_then(Regroup::next_deadline) })
            }
            JobState::Running if job.admitting.iter().any(|a| a.worker_id == worker_id) => {
                Ok(JoinPoll::Waiting { until: None })
            }
            JobState::Running => {
                let Some(me) = job.members.iter().find(|m| m.worker_id == worker_id) else {
                    if job.turned_away.iter().any(|w| w == worker_id) {
                        let max = job.spec.distributed.max_workers;
                        return Err(RegroupError::Full { job: job_id.into(), worker: worker_id.into(), max }.into());
                    }
                    return Err(CoreError::NotAMember { job: job_id.into(), worker: worker_id.into() });
                };
                Ok(JoinPoll::Ready(Assignment {
                    rank: me.rank,
                    world_size: job.members.len() as u32,
                    peers: job.members.iter().map(|m| m.collective_addr.clone()).collect(),
                    collective: job.spec.distributed.collective.as_str().to_string(),
                    nccl_unique_id: job.nccl_unique_id.clone(),
                    ring_secret: crate::auth::ring_key(&job.ring_secret, job.generation),
                    spec_toml: job.spec_toml.clone(),
                    generation: job.generation,
                    source_rank: job.source,
                    cursor: job.cursor,
                    resume_from: if job.generation == 1 { job.resume_from.clone() } else { None },
                }))
            }
            state => Err(CoreError::WrongState {
                job: job_id.into(),
                state,
                what: job.record.history().last().map(|t| t.reason.clone()).unwrap_or_default(),
            }),
        }
    }

    /// A worker is alive; the answer says whether to go on, re-form or stop. Any worker of a job
    /// that has ended is told to stop, known or not: after a restart the coordinator no longer
    /// knows the members of the jobs it failed, and their workers must still learn why.
    pub fn heartbeat(
        &mut self,
        job_id: &str,
        worker_id: &str,
        telemetry: Option<RankTelemetry>,
        now: Instant,
    ) -> Result<Command, CoreError> {
        let (job, _) = self.job_mut(job_id)?;
        if let (Some(t), Some(rank)) = (telemetry, job.rank_of(worker_id)) {
            if rank == 0 && t.steps > job.loss_trace.back().map_or(0, |p| p.0) && t.loss.is_finite() {
                if job.loss_trace.len() == LOSS_TRACE {
                    job.loss_trace.pop_front();
                }
                job.loss_trace.push_back((t.steps, t.loss));
            }
            job.telemetry.insert(worker_id.to_string(), (rank, t));
        }
        let state = job.record.state();
        let last_reason = || job.record.history().last().map(|t| t.reason.clone()).unwrap_or_default();
        if state.is_terminal() {
            return Ok(Command::Stop { reason: format!("job is {state}: {}", last_reason()) });
        }
        if !job.knows(worker_id) {
            return Err(CoreError::NotAMember { job: job_id.into(), worker: worker_id.into() });
        }
        job.last_seen.insert(worker_id.to_string(), now);
        Ok(match state {
            JobState::Running if !job.admitting.is_empty() && job.is_member(worker_id) => {
                let who: Vec<&str> = job.admitting.iter().map(|a| a.worker_id.as_str()).collect();
                Command::Reform { reason: format!("admitting {}", who.join(", ")) }
            }
            JobState::Recovering if job.regroup.as_ref().is_some_and(|g| g.expects(worker_id)) => {
                Command::Reform { reason: last_reason() }
            }
            _ => Command::Continue,
        })
    }

    /// Whether `worker` is rank `rank` of the current generation `generation` of a running job:
    /// progress and plans are taken from current members only.
    pub fn check_member(&self, job_id: &str, worker_id: &str, rank: u32, generation: u32) -> Result<(), CoreError> {
        let job = self.job(job_id)?;
        if job.rank_of(worker_id) != Some(rank) {
            return Err(CoreError::NotAMember { job: job_id.into(), worker: format!("{worker_id} (rank {rank})") });
        }
        if generation != job.generation {
            return Err(CoreError::StaleGeneration {
                job: job_id.into(),
                worker: worker_id.into(),
                found: generation,
                current: job.generation,
            });
        }
        Ok(())
    }

    /// The plan parameters of `epoch` for a running job (with the cut of the epoch the current
    /// generation started in).
    pub fn epoch_plan(&self, job_id: &str, epoch: u32) -> Result<PlanInfo, CoreError> {
        let job = self.job(job_id)?;
        if job.record.state() != JobState::Running {
            return Err(CoreError::WrongState {
                job: job_id.into(),
                state: job.record.state(),
                what: format!("no plan for epoch {epoch}"),
            });
        }
        Ok(job.plan_info(epoch, job.members.len() as u32)?)
    }

    /// Progress from a rank (rank 0's is recorded); `metrics` once per finished epoch. Metrics are
    /// written to the store at once; progress alone at most every [`PROGRESS_SAVE_INTERVAL_MS`].
    #[allow(clippy::too_many_arguments)]
    pub fn report_progress(
        &mut self,
        job_id: &str,
        rank: u32,
        epoch: u32,
        step: u64,
        samples_done: u64,
        metrics: Option<EpochMetrics>,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let (job, store) = self.job_mut(job_id)?;
        if rank == 0 && job.record.state() == JobState::Running {
            job.record.record_progress(epoch, step, samples_done, now_ms)?;
            let epoch_done = metrics.is_some();
            if let Some(m) = metrics {
                job.metrics.retain(|old| old.epoch != m.epoch);
                job.metrics.push(m);
            }
            // A clock that went back also saves, so a step never holds progress back for long.
            let due = job.saved_ms.is_none_or(|t| now_ms < t || now_ms - t >= PROGRESS_SAVE_INTERVAL_MS);
            if epoch_done || due {
                job.save_or_defer(store, now_ms);
            } else {
                job.dirty = true;
            }
        }
        Ok(())
    }

    /// A worker exits. Rank 0 leaving with success ends the job; any worker leaving with an error
    /// fails it (the others learn it from their next heartbeat).
    pub fn leave(
        &mut self,
        job_id: &str,
        worker_id: &str,
        succeeded: bool,
        error: &str,
        now: Instant,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let (job, store) = self.job_mut(job_id)?;
        if job.record.state() == JobState::Rendezvous {
            job.rendezvous.leave(worker_id, now)?;
            return Ok(());
        }
        job.last_seen.remove(worker_id);
        // A job that has ended (perhaps before a restart that forgot its members) has nothing to
        // record; any worker may say goodbye.
        if job.record.state().is_terminal() {
            return Ok(());
        }
        job.admitting.retain(|a| a.worker_id != worker_id);
        let known = job.knows(worker_id);
        let Some(rank) = job.rank_of(worker_id).or(known.then_some(u32::MAX)) else {
            return Err(CoreError::NotAMember { job: job_id.into(), worker: worker_id.into() });
        };
        let who = if rank == u32::MAX { worker_id.to_string() } else { format!("rank {rank} ({worker_id})") };
        if !succeeded {
            job.regroup = None;
            job.record.fail(format!("{who} failed: {error}"), now_ms)?;
        } else if rank == 0 && job.record.state() == JobState::Running {
            job.record.succeed(format!("rank 0 ({worker_id}) finished"), now_ms)?;
        } else {
            // Finished ahead of rank 0: its silence from now on is not a failure.
            job.finished.push(worker_id.to_string());
            return Ok(());
        }
        job.save_or_defer(store, now_ms);
        Ok(())
    }

    /// A worker leaves gracefully (SIGTERM: a preemption notice, a node drain) after finishing
    /// its step: the group re-forms without it, and no failure is counted.
    pub fn leave_gracefully(
        &mut self,
        job_id: &str,
        worker_id: &str,
        reason: &str,
        now: Instant,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let (job, store) = self.job_mut(job_id)?;
        job.last_seen.remove(worker_id);
        job.admitting.retain(|a| a.worker_id != worker_id);
        match job.record.state() {
            JobState::Rendezvous => {
                job.rendezvous.leave(worker_id, now)?;
                return Ok(());
            }
            JobState::Running if job.is_member(worker_id) => {
                let rank = job.rank_of(worker_id).unwrap_or(0);
                job.begin_recovery(
                    format!("rank {rank} ({worker_id}) left: {reason}"),
                    false,
                    Some(worker_id),
                    now,
                    now_ms,
                )?;
            }
            JobState::Recovering => {
                if let Some(g) = job.regroup.as_mut() {
                    g.drop_member(worker_id, now);
                }
            }
            _ => return Ok(()),
        }
        let advanced = Self::advance(job, now, now_ms);
        job.save_or_defer(store, now_ms);
        advanced
    }

    /// Cancels a non-terminal job; its workers stop at their next heartbeat.
    pub fn cancel(&mut self, job_id: &str, reason: &str, now_ms: u64) -> Result<JobView, CoreError> {
        let (job, store) = self.job_mut(job_id)?;
        let reason = if reason.is_empty() { "cancelled by the user" } else { reason };
        job.record.cancel(reason, now_ms)?;
        job.regroup = None;
        job.save_or_defer(store, now_ms);
        self.get(job_id)
    }

    /// Finds the workers whose heartbeat is older than their job's `heartbeat_timeout_secs`: a
    /// running job re-forms without a silent member, a regroup stops waiting for one, a newcomer
    /// is forgotten; moves rendezvous and regroups on. Returns the ids of the jobs that changed.
    pub fn check_liveness(&mut self, now: Instant, now_ms: u64) -> Vec<String> {
        let mut changed = Vec::new();
        let store = &*self.store;
        for (id, job) in &mut self.jobs {
            let before = job.record.history().len();
            let timeout = job.heartbeat_timeout();
            let silent = |job: &Job, w: &str| {
                !job.finished.iter().any(|f| f == w)
                    && job.last_seen.get(w).is_none_or(|t| now.saturating_duration_since(*t) > timeout)
            };
            let quiet: Vec<String> =
                job.admitting.iter().filter(|a| silent(job, &a.worker_id)).map(|a| a.worker_id.clone()).collect();
            job.admitting.retain(|a| !quiet.contains(&a.worker_id));
            let _ = Self::advance(job, now, now_ms);
            match job.record.state() {
                JobState::Running => {
                    let lost = job.members.iter().find(|m| silent(job, &m.worker_id)).cloned();
                    if let Some(m) = lost {
                        let reason = format!("rank {} ({}) sent no heartbeat for {timeout:?}", m.rank, m.worker_id);
                        if let Err(e) = job.begin_recovery(reason, true, Some(&m.worker_id), now, now_ms) {
                            tracing::warn!(job = %id, error = %e, "cannot start recovering");
                        }
                    }
                }
                JobState::Recovering => {
                    let lost: Vec<String> = job
                        .regroup
                        .as_ref()
                        .map(|g| g.expected().filter(|w| silent(job, w)).map(str::to_string).collect())
                        .unwrap_or_default();
                    if let Some(g) = job.regroup.as_mut() {
                        for w in &lost {
                            tracing::warn!(job = %id, worker = %w, "no heartbeat while re-forming; dropped");
                            g.drop_member(w, now);
                        }
                    }
                }
                _ => {}
            }
            let _ = Self::advance(job, now, now_ms);
            if job.record.history().len() != before {
                job.save_or_defer(store, now_ms);
                changed.push(id.clone());
            }
        }
        changed
    }

    /// Writes every job changed since its last write (progress held back by the throttle, writes
    /// that failed); returns how many still could not be written. Run it every second and before
    /// shutting down.
    pub fn flush(&mut self, now_ms: u64) -> usize {
        let store = &*self.store;
        let mut failed = 0;
        for job in self.jobs.values_mut().filter(|j| j.dirty) {
            if let Err(e) = job.save(store, now_ms) {
                tracing::warn!(job = %job.record.job_id(), error = %e, "cannot persist the job; will retry");
                failed += 1;
            }
        }
        failed
    }

    /// Every job as `/metrics` and the web view show it: its view, its layer groups, and its
    /// current members' last telemetry by rank (none for a finished job).
    pub fn observe(&self) -> Vec<(JobView, Vec<String>, Vec<RankView>)> {
        self.jobs
            .keys()
            .filter_map(|id| {
                let job = self.job(id).ok()?;
                let live = !job.record.state().is_terminal();
                let ranks = job
                    .telemetry
                    .iter()
                    .filter(|(w, _)| live && job.is_member(w))
                    .map(|(w, (rank, t))| RankView { rank: *rank, worker: w.clone(), telemetry: t.clone() })
                    .collect();
                Some((self.get(id).ok()?, job.groups.clone(), ranks))
            })
            .collect()
    }

    /// One job as its web page shows it: the view, the stages against the layer groups, the
    /// ranks' telemetry and rank 0's loss over steps.
    pub fn detail(&self, job_id: &str) -> Result<JobDetail, CoreError> {
        let job = self.job(job_id)?;
        let names: Vec<&str> = job.groups.iter().map(String::as_str).collect();
        let live = !job.record.state().is_terminal();
        Ok(JobDetail {
            view: self.get(job_id)?,
            epochs: job.spec.train.epochs,
            stages: job
                .stages
                .iter()
                .map(|st| StageView {
                    index: st.index + 1,
                    epochs: (st.epochs.start, st.epochs.end),
                    trainable: st.trainable_names(&names).iter().map(|g| g.to_string()).collect(),
                })
                .collect(),
            groups: job.groups.clone(),
            ranks: job
                .telemetry
                .iter()
                .filter(|(w, _)| live && job.is_member(w))
                .map(|(w, (rank, t))| RankView { rank: *rank, worker: w.clone(), telemetry: t.clone() })
                .collect(),
            loss_trace: job.loss_trace.iter().copied().collect(),
        })
    }

    pub fn get(&self, job_id: &str) -> Result<JobView, CoreError> {
        let job = self.job(job_id)?;
        Ok(JobView {
            record: job.record.clone(),
            name: job.spec.name.clone(),
            spec_toml: job.spec_toml.clone(),
            workers: job.world_size,
            steps_per_epoch: job.steps_per_epoch(),
            metrics: job.metrics.clone(),
            generation: job.generation,
            restarts: job.restarts,
        })
    }

    /// Gives every member, survivor and newcomer of every job a full heartbeat deadline from
    /// `now`: after a time when this coordinator could not hear them (its lease ran out, etcd was
    /// down), silence is not theirs.
    pub fn restart_deadlines(&mut self, now: Instant) {
        for job in self.jobs.values_mut() {
            let ids: Vec<String> = job
                .members
                .iter()
                .map(|m| m.worker_id.clone())
                .chain(job.admitting.iter().map(|a| a.worker_id.clone()))
                .chain(job.regroup.iter().flat_map(|g| g.expected().map(str::to_string).collect::<Vec<_>>()))
                .chain(job.last_seen.keys().cloned())
                .collect();
            for id in ids {
                job.last_seen.insert(id, now);
            }
        }
    }

    /// Issues `token` as the credential `job_id`'s workers present to join (stored with the job).
    pub fn set_worker_token(&mut self, job_id: &str, token: String, now_ms: u64) -> Result<(), CoreError> {
        let (job, store) = self.job_mut(job_id)?;
        job.worker_token = Some(token);
        job.save(store, now_ms)?;
        Ok(())
    }

    /// The credential of `job_id`'s workers, if one was issued.
    pub fn worker_token(&self, job_id: &str) -> Result<Option<String>, CoreError> {
        Ok(self.job(job_id)?.worker_token.clone())
    }

    /// Forgets a finished job, here and in the store. A live job must be cancelled first.
    pub fn delete(&mut self, job_id: &str) -> Result<(), CoreError> {
        let state = self.job(job_id)?.record.state();
        if !state.is_terminal() {
            return Err(CoreError::WrongState {
                job: job_id.into(),
                state,
                what: "only a finished job can be deleted; cancel it first".into(),
            });
        }
        self.store.delete_job(job_id)?;
        self.jobs.remove(job_id);
        Ok(())
    }

    /// Deletes the finished jobs whose last change is older than `retention` (at `now_ms`);
    /// returns their ids. A job the store cannot delete yet is kept and tried again next time.
    pub fn expire(&mut self, retention: Duration, now_ms: u64) -> Vec<String> {
        let cutoff = now_ms.saturating_sub(retention.as_millis() as u64);
        let old: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.record.state().is_terminal() && j.record.history().last().is_some_and(|t| t.at_ms < cutoff)
            })
            .map(|(id, _)| id.clone())
            .collect();
        old.into_iter()
            .filter(|id| match self.delete(id) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "cannot delete an expired job yet");
                    false
                }
            })
            .collect()
    }

    /// A page of jobs in id order: at most `size` (0: all) after the id `after`.
    pub fn page(&self, size: usize, after: &str) -> (Vec<JobView>, Option<String>) {
        // Ids are never empty, so after "" is the start.
        let mut it = self.jobs.range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded));
        let take = if size == 0 { usize::MAX } else { size };
        let views: Vec<JobView> = it.by_ref().take(take).filter_map(|(id, _)| self.get(id).ok()).collect();
        let next = (size > 0 && views.len() == size && it.next().is_some())
            .then(|| views.last().map(|v| v.record.job_id().to_string()))
            .flatten();
        (views, next)
    }

    /// Jobs kept, live and finished.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn list(&self) -> Vec<JobView> {
        self.jobs.keys().filter_map(|id| self.get(id).ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, workers: u32) -> String {
        format!(
            "name = \"{name}\"\nseed = 3\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"/data\"\n\
             [train]\nbatch_size = 4\n[distributed]\nworkers = {workers}\njoin_timeout_secs = 10.0\nlast_call_secs = 1.0\n\
             heartbeat_timeout_secs = 3.0\nrejoin_timeout_secs = 2.0\nmax_restarts = 2\n"
        )
    }

    fn ready(p: JoinPoll) -> Assignment {
        match p {
            JoinPoll::Ready(a) => a,
            other => panic!("not ready: {other:?}"),
        }
    }

    #[test]
    fn two_workers_form_a_group_train_and_finish() {
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let id = c.submit(&spec("j", 2), t0, 0).unwrap();
        c.join(&id, "w-a", "127.0.0.1:1000", 10, &[], &[], t0, 1).unwrap();
        assert!(matches!(c.poll_join(&id, "w-a", t0, 1).unwrap(), JoinPoll::Waiting { .. }));
        c.join(&id, "w-b", "127.0.0.1:1001", 10, &[], &[], t0, 2).unwrap();
        let a = ready(c.poll_join(&id, "w-a", t0, 3).unwrap());
        let b = ready(c.poll_join(&id, "w-b", t0, 3).unwrap());
        assert_eq!((a.rank, b.rank, a.world_size), (0, 1, 2));
        assert_eq!(a.peers, ["127.0.0.1:1000", "127.0.0.1:1001"]);
        assert_eq!(c.get(&id).unwrap().record.state(), JobState::Running);

        // 10 samples, 2 ranks x batch 4: 2 steps each.
        let plan = c.epoch_plan(&id, 0).unwrap();
        assert_eq!((plan.num_samples, plan.world_size, plan.steps), (10, 2, 2));
        assert_eq!(c.heartbeat(&id, "w-b", None, t0).unwrap(), Command::Continue);
        c.report_progress(&id, 0, 0, 2, 10, Some(EpochMetrics { epoch: 1, val_acc: 0.5, ..Default::default() }), 5)
            .unwrap();
        assert_eq!(c.get(&id).unwrap().record.progress().samples_done, 10);
        c.leave(&id, "w-b", true, "", t0, 6).unwrap();
        assert_eq!(c.get(&id).unwrap().record.state(), JobState::Running, "only rank 0 ends the job");
        // A liveness sweep between the two goodbyes: w-b is done, not lost.
        assert!(c.check_liveness(t0 + Duration::from_millis(500), 6).is_empty());
        assert_eq!(c.get(&id).unwrap().record.state(), JobState::Running);
        c.leave(&id, "w-a", true, "", t0, 7).unwrap();
        let v = c.get(&id).unwrap();
        assert_eq!(v.record.state(), JobState::Succeeded);
        assert_eq!(v.metrics.len(), 1);
    }

    #[test]
    fn the_coordinator_hands_out_the_stage_of_each_epoch_and_affinity_when_it_caches() {
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let text = spec("prog", 2).replace("weights = \"none\"", "weights = \"imagenet\"").replace(
            "[train]\nbatch_size = 4\n",
            "[train]\nbatch_size = 4\nepochs = 3\n[schedule]\nstrategy = \"progressive\"\nevery = 2\n",
        );
        let id = c.submit(&text, t0, 0).unwrap();
        let groups: Vec<String> = ["conv", "fc", "head"].iter().map(|g| g.to_string()).collect();
        c.join(&id, "w-a", "a:1", 10, &[], &groups, t0, 1).unwrap();
        // A worker with another model is turned away, naming both group lists.
        let err = c.join(&id, "w-x", "a:3", 10, &[], &groups[1..], t0, 1).unwrap_err();
        assert!(err.to_string().contains("[fc, head]") && err.to_string().contains("[conv, fc, head]"), "{err}");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        c.join(&id, "w-b", "a:2", 10, &[], &groups, t0, 2).unwrap();
        ready(c.poll_join(&id, "w-a", t0, 3).unwrap());
        let trainable = |e: u32| c.epoch_plan(&id, e).unwrap().stage.unwrap().trainable;
        assert_eq!(
            [trainable(0), trainable(1), trainable(2)],
            [vec![false, false, true], vec![false, false, true], vec![false, true, true]]
        );
        // Stages 1 and 2 cache their frozen prefix: planned with affinity to their first epoch.
        let affinity = |e: u32| c.epoch_plan(&id, e).unwrap().affinity_epoch;
        assert_eq!([affinity(0), affinity(1), affinity(2)], [Some(0), Some(0), Some(2)]);
        // `auto` needs the data and the model: the coordinator refuses it.
        let auto = spec("auto", 1).replace("weights = \"none\"", "weights = \"imagenet\"")
            + "[schedule]\nstrategy = \"auto\"\n";
        let err = c.submit(&auto, t0, 4).unwrap_err();
        assert!(err.to_string().contains("thaw submit"), "{err}");
    }

    #[test]
    fn duplicate_names_and_bad_specs_are_rejected() {
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        c.submit(&spec("j", 1), t0, 0).unwrap();
        let err = c.submit(&spec("j", 1), t0, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("`j` already exists"), "{err}");
        let err = c.submit("name = \"x\"\n[model]\narch = 3", t0, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let err = c.submit(&spec("k", 1).replace("batch_size = 4", "batch_size = 0"), t0, 0).unwrap_err();
        assert!(err.to_string().contains("train.batch_size"), "{err}");
    }

    #[test]
    fn late_joiners_mismatched_data_and_timeouts() {
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let id = c.submit(&spec("j", 1), t0, 0).unwrap();
        c.join(&id, "w-a", "a:1", 10, &[], &[], t0, 0).unwrap();
        let err = c.join(&id, "w-late", "a:2", 10, &[], &[], t0, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("cannot join"), "{err}");

        let id2 = c.submit(&spec("k", 2), t0, 0).unwrap();
        c.join(&id2, "w-a", "a:1", 10, &[], &[], t0, 0).unwrap();
        let err = c.join(&id2, "w-b", "a:2", 11, &[], &[], t0, 0).unwrap_err();
        assert!(err.to_string().contains("sees 11 training samples but the job has 10"), "{err}");
        let later = t0 + Duration::from_secs(11);
        let err = c.poll_join(&id2, "w-a", later, 9).unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
        assert_eq!(c.get(&id2).unwrap().record.state(), JobState::Failed);
    }

    #[test]
    fn cancel_stops_workers_and_silence_fails_the_job() {
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let id = c.submit(&spec("j", 2), t0, 0).unwrap();
        c.join(&id, "w-a", "a:1", 8, &[], &[], t0, 0).unwrap();
        c.join(&id, "w-b", "a:2", 8, &[], &[], t0, 0).unwrap();
        ready(c.poll_join(&id, "w-a", t0, 0).unwrap());
        c.cancel(&id, "", 1).unwrap();
        assert!(
            matches!(c.heartbeat(&id, "w-a", None, t0).unwrap(), Command::Stop { reason } if reason.contains("cancelled"))
        );
        assert!(c.cancel(&id, "", 2).is_err(), "terminal states are final");

        let id2 = c.submit(&spec("k", 2), t0, 0).unwrap();
        c.join(&id2, "w-a", "a:1", 8, &[], &[], t0, 0).unwrap();
        c.join(&id2, "w-b", "a:2", 8, &[], &[], t0, 0).unwrap();
        ready(c.poll_join(&id2, "w-b", t0, 0).unwrap());
        let t1 = t0 + Duration::from_secs(5);
        c.heartbeat(&id2, "w-a", None, t1).unwrap();
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(c.check_liveness(t2, 10), ["k"]);
        let view = c.get(&id2).unwrap();
        assert_eq!(view.record.state(), JobState::Recovering);
        let why = &view.record.history().last().unwrap().reason;
        assert!(why.contains("rank 1 (w-b) sent no heartbeat for 3s (failure 1 of 2 allowed)"), "{why}");
        // The survivor is told to re-form and comes back; alone it is below min_workers = 2, so
        // the regroup waits rejoin_timeout_secs for a replacement, then fails naming who was lost.
        assert!(matches!(c.heartbeat(&id2, "w-a", None, t2).unwrap(), Command::Reform { .. }));
        let cursor = EpochCursor { epoch: 0, world: 2, step: 1, cut: None };
        let back = JoinInfo {
            worker_id: "w-a",
            collective_addr: "a:9",
            num_samples: 8,
            generation: 1,
            cursor: Some(cursor),
            reason: "rank 1 closed the connection",
            failed: true,
            ..Default::default()
        };
        c.join_with(&id2, &back, t2, 11).unwrap();
        assert!(matches!(c.poll_join(&id2, "w-a", t2, 11).unwrap(), JoinPoll::Waiting { .. }));
        c.heartbeat(&id2, "w-a", None, t2 + Duration::from_secs(2)).unwrap();
        c.check_liveness(t2 + Duration::from_secs(2), 12);
        let view = c.get(&id2).unwrap();
        assert_eq!(view.record.state(), JobState::Failed);
        let why = &view.record.history().last().unwrap().reason;
        assert!(why.contains("1 of at least 2 workers") && why.contains("lost: w-b"), "{why}");
    }

    fn stored(store: &MemoryStore, id: &str) -> StoredJob {
        store.load_all().unwrap().into_iter().find(|j| j.record.job_id() == id).expect("job stored")
    }

    fn states(r: &JobRecord) -> Vec<JobState> {
        r.history().iter().map(|t| t.to).collect()
    }

    #[test]
    fn every_change_is_stored_and_progress_is_throttled() {
        use JobState::*;
        let t0 = Instant::now();
        let store = MemoryStore::new();
        let mut c = Coordinator::with_store(Box::new(store.clone()));
        let id = c.submit(&spec("j", 2), t0, 1_000).unwrap();
        assert_eq!(states(&stored(&store, &id).record), [Pending, Rendezvous]);
        c.join(&id, "w-a", "a:1", 10, &[], &[], t0, 1_001).unwrap();
        assert_eq!(stored(&store, &id).num_samples, Some(10), "the agreed data size is stored at the first join");
        c.join(&id, "w-b", "a:2", 10, &[], &[], t0, 1_002).unwrap();
        let s = stored(&store, &id);
        assert_eq!((states(&s.record).last(), s.workers), (Some(&Running), 2));

        // Progress: the first report after the interval is written, the next ones held back...
        c.report_progress(&id, 0, 0, 1, 8, None, 2_500).unwrap();
        c.report_progress(&id, 0, 0, 2, 10, None, 2_600).unwrap();
        c.report_progress(&id, 1, 0, 2, 10, None, 2_600).unwrap();
        assert_eq!(stored(&store, &id).record.progress().step, 1, "held back for a second");
        // ...until a flush, or the next report a second later.
        assert_eq!(c.flush(2_700), 0);
        assert_eq!(stored(&store, &id).record.progress().step, 2);
        c.report_progress(&id, 0, 1, 1, 8, None, 2_800).unwrap();
        assert_eq!(stored(&store, &id).record.progress().epoch, 0);
        c.report_progress(&id, 0, 1, 2, 9, None, 3_700).unwrap();
        assert_eq!(stored(&store, &id).record.progress().samples_done, 9);
        // A finished epoch's metrics are written at once.
        let m = EpochMetrics { epoch: 1, train_loss: f64::NAN, val_acc: 0.75, ..Default::default() };
        c.report_progress(&id, 0, 1, 2, 10, Some(m), 3_701).unwrap();
        let s = stored(&store, &id);
        assert_eq!((s.metrics.len(), s.metrics[0].val_acc, s.record.progress().samples_done), (1, 0.75, 10));
        assert!(s.metrics[0].train_loss.is_nan());

        c.leave(&id, "w-a", true, "", t0, 4_000).unwrap();
        let s = stored(&store, &id);
        assert_eq!(states(&s.record).last(), Some(&Succeeded));
        assert_eq!(s.record.history().last().unwrap().at_ms, 4_000);

        // Cancels and liveness failures are stored too.
        let k = c.submit(&spec("k", 1), t0, 5_000).unwrap();
        c.cancel(&k, "", 5_001).unwrap();
        assert_eq!(states(&stored(&store, &k).record).last(), Some(&Cancelled));
        let l = c.submit(&spec("l", 2), t0, 6_000).unwrap();
        c.join(&l, "w-a", "a:1", 8, &[], &[], t0, 6_001).unwrap();
        c.join(&l, "w-b", "a:2", 8, &[], &[], t0, 6_002).unwrap();
        assert_eq!(c.check_liveness(t0 + Duration::from_secs(9), 6_003), ["l"]);
        let s = stored(&store, &l);
        assert!(s.record.history().last().unwrap().reason.contains("sent no heartbeat"), "{:?}", s.record);
        // A rendezvous that times out while polled.
        let m = c.submit(&spec("m", 2), t0, 7_000).unwrap();
        c.join(&m, "w-a", "a:1", 8, &[], &[], t0, 7_001).unwrap();
        assert!(c.poll_join(&m, "w-a", t0 + Duration::from_secs(11), 7_002).is_err());
        assert_eq!(states(&stored(&store, &m).record).last(), Some(&Failed));
    }

    #[test]
    fn a_restarted_coordinator_keeps_finished_jobs_and_carries_on_with_live_ones() {
        use JobState::*;
        let t0 = Instant::now();
        let store = MemoryStore::new();
        let mut c = Coordinator::with_store(Box::new(store.clone()));
        let done = c.submit(&spec("done", 1), t0, 1_000).unwrap();
        c.join(&done, "w-a", "a:1", 10, &[], &[], t0, 1_001).unwrap();
        let m = EpochMetrics { epoch: 1, train_loss: 0.25, val_acc: 0.5, images: 10, ..Default::default() };
        c.report_progress(&done, 0, 0, 3, 10, Some(m.clone()), 1_002).unwrap();
        c.leave(&done, "w-a", true, "", t0, 1_003).unwrap();
        let running = three(&mut c, "running", "", t0);
        c.report_progress(&running, 0, 0, 2, 24, None, 3_500).unwrap();
        let plan_before = c.epoch_plan(&running, 0).unwrap();
        let waiting = c.submit(&spec("waiting", 2), t0, 4_000).unwrap();
        c.join(&waiting, "w-c", "c:1", 10, &[], &[], t0, 4_001).unwrap();
        let recovering = three(&mut c, "recovering", "", t0);
        let at = EpochCursor { epoch: 0, world: 3, step: 1, cut: None };
        c.join_with(&recovering, &survivor("w-a", "a:2", 1, at, true), t0, 4_002).unwrap();
        let before = c.get(&done).unwrap();
        drop(c);

        let t1 = t0 + Duration::from_secs(60);
        let mut c = Coordinator::restore(Box::new(store.clone()), t1, 9_000).unwrap();
        assert_eq!(c.list().len(), 4);
        let after = c.get(&done).unwrap();
        assert_eq!(after.record, before.record, "a finished job comes back as it was");
        assert_eq!(after.metrics, [m]);
        assert_eq!((after.workers, after.steps_per_epoch), (before.workers, before.steps_per_epoch));

        // The recovering job's regroup starts over: the survivors join again.
        assert_eq!(c.get(&recovering).unwrap().record.state(), Recovering);
        for (w, a, step) in [("w-a", "a:3", 1), ("w-b", "b:3", 2), ("w-c", "c:3", 1)] {
            let at = EpochCursor { epoch: 0, world: 3, step, cut: None };
            c.join_with(&recovering, &survivor(w, a, 1, at, true), t1, 9_005).unwrap();
        }
        let g = ready(c.poll_join(&recovering, "w-a", t1, 9_006).unwrap());
        assert_eq!((g.generation, g.world_size, g.source_rank), (2, 3, 1));
        assert_eq!(c.get(&recovering).unwrap().restarts, 1, "the takeover is not a failure");

        // The running job carries on: same members, ranks, generation and plan; every member has
        // a fresh heartbeat deadline from the takeover.
        let v = c.get(&running).unwrap();
        assert_eq!((v.record.state(), v.generation, v.workers), (Running, 1, 3));
        assert_eq!(v.record.progress().samples_done, 24, "progress survives");
        assert_eq!(c.epoch_plan(&running, 0).unwrap(), plan_before, "the same plan from the new coordinator");
        assert!(c.check_member(&running, "w-b", 1, 1).is_ok());
        assert_eq!(c.heartbeat(&running, "w-a", None, t1).unwrap(), Command::Continue);
        assert!(c.check_liveness(t1 + Duration::from_secs(1), 9_001).is_empty(), "no heartbeat missed yet");
        c.heartbeat(&running, "w-a", None, t1 + Duration::from_secs(4)).unwrap();
        c.heartbeat(&running, "w-b", None, t1 + Duration::from_secs(4)).unwrap();
        assert!(c.check_liveness(t1 + Duration::from_secs(4), 9_002).contains(&running));
        let why = c.get(&running).unwrap().record.history().last().unwrap().reason.clone();
        assert!(why.contains("rank 2 (w-c) sent no heartbeat"), "w-c never came back: {why}");

        // The rendezvous opens again, empty: its worker joins again.
        assert_eq!(c.get(&waiting).unwrap().record.state(), Rendezvous);
        c.join(&waiting, "w-c", "c:1", 10, &[], &[], t1, 9_003).unwrap();
        c.join(&waiting, "w-d", "d:1", 10, &[], &[], t1, 9_004).unwrap();
        assert_eq!(c.get(&waiting).unwrap().record.state(), Running);

        // A live job stored by a version without live state cannot go on: failed, with the reason.
        let mut old = stored(&store, &waiting);
        old.live = None;
        store.put_job(&old).unwrap();
        let c = Coordinator::restore(Box::new(store.clone()), t1, 10_000).unwrap();
        let v = c.get(&waiting).unwrap();
        assert_eq!(v.record.state(), Failed);
        assert_eq!(
            v.record.history().last().unwrap().reason,
            "coordinator restarted while the job was running; resubmit or resume from its checkpoint"
        );
        assert_eq!(states(&stored(&store, &waiting).record).last(), Some(&Failed), "the failure is written back");
    }

    #[test]
    fn finished_jobs_are_deleted_on_request_or_after_their_retention_and_listed_by_page() {
        let t0 = Instant::now();
        let store = MemoryStore::new();
        let mut c = Coordinator::with_store(Box::new(store.clone()));
        for (i, name) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            c.submit(&spec(name, 1), t0, 1_000 * i as u64).unwrap();
        }
        c.cancel("a", "done", 1_000).unwrap();
        c.cancel("b", "done", 50_000).unwrap();
        // A live job cannot be deleted; a finished one can, here and in the store.
        let err = c.delete("c").unwrap_err();
        assert!(err.to_string().contains("cancel it first"), "{err}");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(c.delete("nope").unwrap_err().kind(), ErrorKind::NotFound);
        // Pages of 2 in id order, each naming the next.
        let (p1, next) = c.page(2, "");
        let ids = |v: &[JobView]| v.iter().map(|j| j.record.job_id().to_string()).collect::<Vec<_>>();
        assert_eq!((ids(&p1), next.as_deref()), (vec!["a".to_string(), "b".into()], Some("b")));
        let (p2, next) = c.page(2, "b");
        assert_eq!((ids(&p2), next.as_deref()), (vec!["c".to_string(), "d".into()], Some("d")));
        let (p3, next) = c.page(2, "d");
        assert_eq!((ids(&p3), next), (vec!["e".to_string()], None));
        assert_eq!(c.page(0, "").0.len(), 5, "0: everything");
        // Retention: only finished jobs whose last change is older than it go.
        assert_eq!(c.expire(Duration::from_secs(10), 20_000), ["a"]);
        assert!(c.get("a").is_err() && store.load_all().unwrap().iter().all(|j| j.record.job_id() != "a"));
        assert!(c.expire(Duration::from_secs(10), 20_000).is_empty());
        c.delete("b").unwrap();
        assert_eq!(ids(&c.page(0, "").0), ["c", "d", "e"]);
        assert_eq!(store.load_all().unwrap().len(), 3);
    }

    #[test]
    fn a_stored_job_whose_spec_no_longer_validates_is_skipped() {
        let t0 = Instant::now();
        let store = MemoryStore::new();
        let mut c = Coordinator::with_store(Box::new(store.clone()));
        c.submit(&spec("ok", 1), t0, 0).unwrap();
        let mut bad = stored(&store, "ok");
        bad.record = JobRecord::new("bad", 0).unwrap();
        bad.spec_toml = bad.spec_toml.replace("name = \"ok\"", "name = \"bad\"").replace("lenet5", "");
        store.put_job(&bad).unwrap();
        let c = Coordinator::restore(Box::new(store), t0, 1).unwrap();
        let ids: Vec<String> = c.list().iter().map(|v| v.record.job_id().to_string()).collect();
        assert_eq!(ids, ["ok"]);
    }

    /// A store whose writes fail while `broken` is set.
    struct Flaky {
        inner: MemoryStore,
        broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl StateStore for Flaky {
        fn put_job(&self, rec: &StoredJob) -> Result<(), StoreError> {
            if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Io {
                    what: "write",
                    path: "/state/jobs/x.json".into(),
                    source: std::io::Error::other("disk full"),
                });
            }
            self.inner.put_job(rec)
        }
        fn delete_job(&self, id: &str) -> Result<(), StoreError> {
            self.inner.delete_job(id)
        }
        fn load_all(&self) -> Result<Vec<StoredJob>, StoreError> {
            self.inner.load_all()
        }
    }

    #[test]
    fn failed_writes_refuse_new_jobs_and_are_retried_for_accepted_ones() {
        let t0 = Instant::now();
        let inner = MemoryStore::new();
        let broken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut c = Coordinator::with_store(Box::new(Flaky { inner: inner.clone(), broken: broken.clone() }));
        let err = c.submit(&spec("j", 1), t0, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(c.list().is_empty(), "a job the store does not have is not accepted");

        broken.store(false, std::sync::atomic::Ordering::SeqCst);
        let id = c.submit(&spec("j", 1), t0, 1).unwrap();
        broken.store(true, std::sync::atomic::Ordering::SeqCst);
        c.join(&id, "w", "a:1", 10, &[], &[], t0, 2).unwrap();
        assert_eq!(c.get(&id).unwrap().record.state(), JobState::Running, "the change stands");
        assert_eq!(stored(&inner, &id).record.state(), JobState::Rendezvous);
        assert_eq!(c.flush(3), 1);
        broken.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(c.flush(4), 0);
        assert_eq!(stored(&inner, &id).record.state(), JobState::Running);

        let err = c.submit(&spec(&"x".repeat(201), 1), t0, 5).unwrap_err();
        assert!(err.to_string().contains("longer than 200 bytes"), "{err}");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    fn survivor<'a>(w: &'a str, addr: &'a str, generation: u32, cursor: EpochCursor, failed: bool) -> JoinInfo<'a> {
        JoinInfo {
            worker_id: w,
            collective_addr: addr,
            num_samples: 40,
            generation,
            cursor: Some(cursor),
            reason: "rank 2 closed the connection during all_reduce",
            failed,
            ..Default::default()
        }
    }

    /// A running job of three workers w-a, w-b, w-c on 40 samples, batch 4.
    fn three(c: &mut Coordinator, name: &str, extra: &str, t0: Instant) -> String {
        let text = spec(name, 3).replace("workers = 3", &format!("min_workers = 2\nmax_workers = 3\n{extra}"));
        let id = c.submit(&text, t0, 0).unwrap();
        for (w, a) in [("w-a", "a:1"), ("w-b", "b:1"), ("w-c", "c:1")] {
            c.join(&id, w, a, 40, &[], &[], t0, 1).unwrap();
        }
        ready(c.poll_join(&id, "w-a", t0, 2).unwrap());
        id
    }

    #[test]
    fn a_lost_worker_re_forms_the_group_from_the_most_advanced_survivor() {
        use JobState::*;
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let id = three(&mut c, "j", "", t0);
        assert_eq!(c.get(&id).unwrap().generation, 1);
        // w-c dies in step 2 of epoch 0; w-b had finished that step, w-a not.
        let at = |step| EpochCursor { epoch: 0, world: 3, step, cut: None };
        c.join_with(&id, &survivor("w-a", "a:2", 1, at(0), true), t0, 3).unwrap();
        assert_eq!(c.get(&id).unwrap().record.state(), Recovering);
        assert!(matches!(c.heartbeat(&id, "w-b", None, t0).unwrap(), Command::Reform { .. }), "w-b is still in its step");
        assert!(c.check_member(&id, "w-a", 0, 1).is_ok(), "members are kept until the group re-forms");
        c.join_with(&id, &survivor("w-b", "b:2", 1, at(1), true), t0, 4).unwrap();
        assert!(matches!(c.poll_join(&id, "w-a", t0, 5).unwrap(), JoinPoll::Waiting { .. }), "w-c is expected");
        // w-c's heartbeat lapses: dropped, and the group forms without it.
        let later = t0 + Duration::from_secs(4);
        c.heartbeat(&id, "w-a", None, later).unwrap();
        c.heartbeat(&id, "w-b", None, later).unwrap();
        c.check_liveness(later, 6);
        let a = ready(c.poll_join(&id, "w-a", later, 7).unwrap());
        let b = ready(c.poll_join(&id, "w-b", later, 7).unwrap());
        assert_eq!((a.rank, b.rank, a.world_size, a.generation), (0, 1, 2, 2));
        assert_eq!(a.peers, ["a:2", "b:2"]);
        assert_eq!(a.source_rank, 1, "w-b finished one more step");
        // One step of 3 x 4 done: the rest of the epoch is re-planned for 2 ranks.
        let cut = Cut { base_world: 3, base_steps: 1, offset: 0 };
        assert_eq!(a.cursor, EpochCursor { epoch: 0, world: 2, step: 0, cut: Some(cut) });
        let p = c.epoch_plan(&id, 0).unwrap();
        assert_eq!((p.cut, p.world_size, p.steps), (Some(cut), 2, 4), "28 samples left, 8 per step");
        assert_eq!(c.epoch_plan(&id, 1).unwrap().cut, None, "later epochs start whole");
        let v = c.get(&id).unwrap();
        assert_eq!((v.generation, v.restarts, v.workers), (2, 1, 2));
        let why = &v.record.history().last().unwrap().reason;
        assert!(
            why.contains("generation 2 formed with 2 workers from rank 1's state at epoch 1 step 1; lost: w-c"),
            "{why}"
        );
        // Only current members of the current generation speak for the job.
        let err = c.check_member(&id, "w-a", 0, 1).unwrap_err();
        assert!(err.to_string().contains("generation 1, the group is at generation 2"), "{err}");
        assert!(c.check_member(&id, "w-c", 2, 2).is_err());
        assert!(c.check_member(&id, "w-b", 0, 2).is_err(), "w-b is rank 1 now");
        assert!(c.heartbeat(&id, "w-c", None, later).is_err(), "a dropped worker is no longer known");
    }

    #[test]
    fn deadlines_restart_after_a_time_the_coordinator_could_not_hear_anyone() {
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let id = three(&mut c, "j", "", t0);
        // 60 s without heartbeats (etcd was down): as of now, nobody is late.
        let later = t0 + Duration::from_secs(60);
        c.restart_deadlines(later);
        assert!(c.check_liveness(later + Duration::from_secs(1), 1).is_empty());
        assert_eq!(c.get(&id).unwrap().record.state(), JobState::Running);
        assert_eq!(c.check_liveness(later + Duration::from_secs(4), 2), ["j"], "but deadlines still apply after");
    }

    #[test]
    fn a_peer_whose_connection_closed_is_not_waited_for() {
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let id = three(&mut c, "j", "", t0);
        let at = |step| EpochCursor { epoch: 0, world: 3, step, cut: None };
        // w-c (rank 2) is killed: its neighbours see the connection close, and say so.
        let closed = [2u32];
        let a = JoinInfo { closed_ranks: &closed, ..survivor("w-a", "a:2", 1, at(1), true) };
        c.join_with(&id, &a, t0, 3).unwrap();
        assert!(matches!(c.poll_join(&id, "w-a", t0, 4).unwrap(), JoinPoll::Waiting { .. }), "w-b is still expected");
        // A rank that reports itself, or one that timed out, changes nothing.
        let b = JoinInfo { closed_ranks: &[1], ..survivor("w-b", "b:2", 1, at(1), true) };
        c.join_with(&id, &b, t0, 5).unwrap();
        // No heartbeat had to lapse: the group forms at once, without w-c.
        let g = ready(c.poll_join(&id, "w-a", t0, 6).unwrap());
        assert_eq!((g.world_size, g.generation), (2, 2));
        assert!(c.get(&id).unwrap().record.history().last().unwrap().reason.contains("lost: w-c"));
    }

    #[test]
    fn newcomers_are_admitted_at_a_step_boundary_and_graceful_leaves_are_not_failures() {
        use JobState::*;
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let id = three(&mut c, "j", "", t0);
        let at = |world, step| EpochCursor { epoch: 1, world, step, cut: None };
        // w-c is drained (SIGTERM): it leaves after its step, the others re-form without counting it.
        c.leave_gracefully(&id, "w-c", "worker received SIGTERM", t0, 3).unwrap();
        assert_eq!(c.get(&id).unwrap().record.state(), Recovering);
        c.join_with(&id, &survivor("w-a", "a:2", 1, at(3, 5), false), t0, 4).unwrap();
        c.join_with(&id, &survivor("w-b", "b:2", 1, at(3, 5), false), t0, 4).unwrap();
        let a = ready(c.poll_join(&id, "w-a", t0, 5).unwrap());
        assert_eq!((a.world_size, a.generation, c.get(&id).unwrap().restarts), (2, 2, 0));
        // A newcomer waits while the members finish their step; heartbeats tell them to re-form.
        c.join(&id, "w-n", "n:1", 40, &[], &[], t0, 6).unwrap();
        assert!(matches!(c.poll_join(&id, "w-n", t0, 6).unwrap(), JoinPoll::Waiting { .. }));
        assert_eq!(c.get(&id).unwrap().record.state(), Running);
        match c.heartbeat(&id, "w-b", None, t0).unwrap() {
            Command::Reform { reason } => assert_eq!(reason, "admitting w-n"),
            other => panic!("{other:?}"),
        }
        // A fourth worker does not fit max_workers = 3.
        let err = c.join(&id, "w-x", "x:1", 40, &[], &[], t0, 6).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("is full: 3 workers"), "{err}");
        let step = EpochCursor { epoch: 1, world: 2, step: 7, cut: a.cursor.cut };
        c.join_with(&id, &survivor("w-b", "b:3", 2, step, false), t0, 7).unwrap();
        c.join_with(&id, &survivor("w-a", "a:3", 2, step, false), t0, 7).unwrap();
        let n = ready(c.poll_join(&id, "w-n", t0, 8).unwrap());
        assert_eq!((n.rank, n.world_size, n.generation, n.source_rank), (2, 3, 3, 0));
        assert_eq!(c.get(&id).unwrap().restarts, 0, "leaves and admissions are not failures");
    }

    #[test]
    fn failures_past_the_restart_budget_fail_the_job() {
        let t0 = Instant::now();
        let mut c = Coordinator::new();
        let id = three(&mut c, "j", "", t0);
        let at = EpochCursor { epoch: 0, world: 3, step: 1, cut: None };
        for (generation, addr) in [(1, "a:2"), (2, "a:3")] {
            c.join_with(&id, &survivor("w-a", addr, generation, at, true), t0, 3).unwrap();
            c.join_with(&id, &survivor("w-b", addr, generation, at, true), t0, 3).unwrap();
            if generation == 1 {
                c.leave_gracefully(&id, "w-c", "SIGTERM", t0, 3).unwrap();
            }
            assert!(matches!(c.poll_join(&id, "w-a", t0, 4).unwrap(), JoinPoll::Ready(_)));
        }
        c.join_with(&id, &survivor("w-a", "a:4", 3, at, true), t0, 5).unwrap();
        let v = c.get(&id).unwrap();
        assert_eq!(v.record.state(), JobState::Failed);
        let why = &v.record.history().last().unwrap().reason;
        assert!(why.contains("the restart budget (distributed.max_restarts = 2) is spent"), "{why}");
    }
}
