//! The coordinator's core: every job it knows, with its rendezvous, membership, epoch plans,
//! progress and worker liveness, as plain Rust over the domain types.
//!
//! The gRPC services are thin adapters over [`Coordinator`]: they take the lock, call one method,
//! and convert the result. Time is passed in (`now` for deadlines, `now_ms` for the record), so
//! every path is tested without a clock or a network. This module never blocks, never sleeps and
//! never touches the network; waiting (a worker long-polling the rendezvous) is the service's job,
//! guided by [`JoinPoll::Waiting`]'s deadline.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::job::{JobError, JobRecord, JobState};
use crate::plan::{EpochPlan, PlanError};
use crate::rendezvous::{Member, Rendezvous, RendezvousConfig, RendezvousError, RendezvousState};
use crate::spec::{JobSpec, SpecError};

/// What kind of failure, for the one place that maps errors to transport status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    AlreadyExists,
    NotFound,
    FailedPrecondition,
    DeadlineExceeded,
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
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::Spec(_) | CoreError::Plan(_) | CoreError::DataMismatch { .. } => ErrorKind::InvalidArgument,
            CoreError::DuplicateJob(_) => ErrorKind::AlreadyExists,
            CoreError::UnknownJob(_) | CoreError::NotAMember { .. } => ErrorKind::NotFound,
            CoreError::Rendezvous(RendezvousError::TimedOut { .. }) => ErrorKind::DeadlineExceeded,
            CoreError::Rendezvous(RendezvousError::InvalidConfig { .. } | RendezvousError::InvalidJoin { .. }) => {
                ErrorKind::InvalidArgument
            }
            CoreError::Rendezvous(RendezvousError::DuplicateWorker { .. }) => ErrorKind::AlreadyExists,
            CoreError::Rendezvous(_) | CoreError::Job(_) | CoreError::WrongState { .. } => {
                ErrorKind::FailedPrecondition
            }
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
    pub spec_toml: String,
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
    Stop { reason: String },
}

/// Metrics of one finished epoch, as rank 0 reports them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochSummary {
    pub epoch: u32,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_loss: f64,
    pub val_acc: f64,
    pub images: u64,
    pub skipped: u64,
    pub seconds: f64,
    pub data_wait: f64,
}

/// The parameters of one epoch's plan; a worker rebuilds the [`EpochPlan`] from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanInfo {
    pub seed: u64,
    pub epoch: u32,
    pub num_samples: u64,
    pub world_size: u32,
    pub batch_size: u32,
    pub steps: u64,
}

/// A read-only view of a job.
#[derive(Clone, Debug)]
pub struct JobView {
    pub record: JobRecord,
    pub name: String,
    pub spec_toml: String,
    pub workers: u32,
    pub steps_per_epoch: u64,
    pub metrics: Vec<EpochSummary>,
}

struct Job {
    record: JobRecord,
    spec: JobSpec,
    spec_toml: String,
    rendezvous: Rendezvous,
    members: Vec<Member>,
    num_samples: Option<u64>,
    nccl_unique_id: Vec<u8>,
    metrics: Vec<EpochSummary>,
    last_seen: HashMap<String, Instant>,
}

impl Job {
    fn is_member(&self, worker: &str) -> bool {
        self.members.iter().any(|m| m.worker_id == worker)
    }

    fn steps_per_epoch(&self) -> u64 {
        match (self.num_samples, self.members.len()) {
            (Some(n), w) if w > 0 => n.div_ceil(w as u64 * self.spec.train.batch_size as u64),
            _ => 0,
        }
    }
}

/// Every job of one coordinator.
#[derive(Default)]
pub struct Coordinator {
    jobs: BTreeMap<String, Job>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl Coordinator {
    pub fn new() -> Self {
        Self::default()
    }

    fn job(&self, id: &str) -> Result<&Job, CoreError> {
        self.jobs.get(id).ok_or_else(|| CoreError::UnknownJob(id.to_string()))
    }

    fn job_mut(&mut self, id: &str) -> Result<&mut Job, CoreError> {
        self.jobs.get_mut(id).ok_or_else(|| CoreError::UnknownJob(id.to_string()))
    }

    /// Validates a spec (absolute paths; as `thaw submit` resolves it) and opens its rendezvous.
    /// The job id is the spec's name, unique among the coordinator's jobs.
    pub fn submit(&mut self, spec_toml: &str, now: Instant, now_ms: u64) -> Result<String, CoreError> {
        let spec = JobSpec::from_toml(spec_toml, Path::new("/"))?;
        if self.jobs.contains_key(&spec.name) {
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
        self.jobs.insert(
            id.clone(),
            Job {
                record,
                spec,
                spec_toml,
                rendezvous: Rendezvous::new(config, now),
                members: Vec::new(),
                num_samples: None,
                nccl_unique_id: Vec::new(),
                metrics: Vec::new(),
                last_seen: HashMap::new(),
            },
        );
        Ok(id)
    }

    /// A worker joins a job's rendezvous. `num_samples` is the size of the training split the
    /// worker sees; all workers must agree. The first NCCL id offered is the one handed out.
    pub fn join(
        &mut self,
        job_id: &str,
        worker_id: &str,
        collective_addr: &str,
        num_samples: u64,
        nccl_unique_id: &[u8],
        now: Instant,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let job = self.job_mut(job_id)?;
        if job.record.state() != JobState::Rendezvous {
            return Err(CoreError::WrongState {
                job: job_id.into(),
                state: job.record.state(),
                what: format!("worker `{worker_id}` cannot join"),
            });
        }
        match job.num_samples {
            Some(expected) if expected != num_samples => {
                return Err(CoreError::DataMismatch {
                    job: job_id.into(),
                    worker: worker_id.into(),
                    expected,
                    found: num_samples,
                })
            }
            _ => {}
        }
        job.rendezvous.join(worker_id, collective_addr, now)?;
        job.num_samples = Some(num_samples);
        if job.nccl_unique_id.is_empty() && !nccl_unique_id.is_empty() {
            job.nccl_unique_id = nccl_unique_id.to_vec();
        }
        job.last_seen.insert(worker_id.to_string(), now);
        Self::advance_rendezvous(job, now, now_ms)?;
        Ok(())
    }

    /// Moves a job out of `Rendezvous` when its round has closed or timed out.
    fn advance_rendezvous(job: &mut Job, now: Instant, now_ms: u64) -> Result<(), CoreError> {
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
                job.members = members;
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
        let job = self.job_mut(job_id)?;
        Self::advance_rendezvous(job, now, now_ms)?;
        match job.record.state() {
            JobState::Rendezvous => Ok(JoinPoll::Waiting { until: job.rendezvous.next_deadline() }),
            JobState::Running => {
                let Some(me) = job.members.iter().find(|m| m.worker_id == worker_id) else {
                    return Err(CoreError::NotAMember { job: job_id.into(), worker: worker_id.into() });
                };
                Ok(JoinPoll::Ready(Assignment {
                    rank: me.rank,
                    world_size: job.members.len() as u32,
                    peers: job.members.iter().map(|m| m.collective_addr.clone()).collect(),
                    collective: job.spec.distributed.collective.as_str().to_string(),
                    nccl_unique_id: job.nccl_unique_id.clone(),
                    spec_toml: job.spec_toml.clone(),
                }))
            }
            state => Err(CoreError::WrongState {
                job: job_id.into(),
                state,
                what: job.record.history().last().map(|t| t.reason.clone()).unwrap_or_default(),
            }),
        }
    }

    /// A member is alive; the answer says whether to go on.
    pub fn heartbeat(&mut self, job_id: &str, worker_id: &str, now: Instant) -> Result<Command, CoreError> {
        let job = self.job_mut(job_id)?;
        if !job.is_member(worker_id) {
            return Err(CoreError::NotAMember { job: job_id.into(), worker: worker_id.into() });
        }
        job.last_seen.insert(worker_id.to_string(), now);
        Ok(match job.record.state() {
            JobState::Running => Command::Continue,
            state => Command::Stop {
                reason: format!(
                    "job is {state}: {}",
                    job.record.history().last().map(|t| t.reason.as_str()).unwrap_or_default()
                ),
            },
        })
    }

    /// The plan parameters of `epoch` for a running job.
    pub fn epoch_plan(&self, job_id: &str, epoch: u32) -> Result<PlanInfo, CoreError> {
        let job = self.job(job_id)?;
        if job.record.state() != JobState::Running {
            return Err(CoreError::WrongState {
                job: job_id.into(),
                state: job.record.state(),
                what: format!("no plan for epoch {epoch}"),
            });
        }
        let n = job.num_samples.unwrap_or(0);
        let plan = EpochPlan::new(job.spec.seed, epoch, n, job.members.len() as u32, job.spec.train.batch_size as u32)?;
        Ok(PlanInfo {
            seed: plan.seed(),
            epoch,
            num_samples: n,
            world_size: plan.world_size(),
            batch_size: plan.batch_size(),
            steps: plan.steps_per_rank(),
        })
    }

    /// Progress from a rank (rank 0's is recorded); `metrics` once per finished epoch.
    pub fn report_progress(
        &mut self,
        job_id: &str,
        rank: u32,
        epoch: u32,
        step: u64,
        samples_done: u64,
        metrics: Option<EpochSummary>,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let job = self.job_mut(job_id)?;
        if rank == 0 && job.record.state() == JobState::Running {
            job.record.record_progress(epoch, step, samples_done, now_ms)?;
            if let Some(m) = metrics {
                job.metrics.retain(|old| old.epoch != m.epoch);
                job.metrics.push(m);
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
        let job = self.job_mut(job_id)?;
        if job.record.state() == JobState::Rendezvous {
            job.rendezvous.leave(worker_id, now)?;
            return Ok(());
        }
        let Some(rank) = job.members.iter().find(|m| m.worker_id == worker_id).map(|m| m.rank) else {
            return Err(CoreError::NotAMember { job: job_id.into(), worker: worker_id.into() });
        };
        job.last_seen.remove(worker_id);
        if job.record.state().is_terminal() {
            return Ok(());
        }
        if !succeeded {
            job.record.fail(format!("rank {rank} ({worker_id}) failed: {error}"), now_ms)?;
        } else if rank == 0 {
            job.record.succeed(format!("rank 0 ({worker_id}) finished"), now_ms)?;
        }
        Ok(())
    }

    /// Cancels a non-terminal job; its workers stop at their next heartbeat.
    pub fn cancel(&mut self, job_id: &str, reason: &str, now_ms: u64) -> Result<JobView, CoreError> {
        let job = self.job_mut(job_id)?;
        let reason = if reason.is_empty() { "cancelled by the user" } else { reason };
        job.record.cancel(reason, now_ms)?;
        self.get(job_id)
    }

    /// Fails running jobs with a member silent for longer than `timeout`; returns their ids.
    pub fn check_liveness(&mut self, now: Instant, timeout: Duration, now_ms: u64) -> Vec<String> {
        let mut failed = Vec::new();
        for (id, job) in &mut self.jobs {
            if Self::advance_rendezvous(job, now, now_ms).is_err() || job.record.state() != JobState::Running {
                continue;
            }
            let silent = job
                .members
                .iter()
                .find(|m| job.last_seen.get(&m.worker_id).is_some_and(|t| now.saturating_duration_since(*t) > timeout));
            if let Some(m) = silent {
                let reason = format!("rank {} ({}) sent no heartbeat for {timeout:?}", m.rank, m.worker_id);
                if job.record.fail(reason, now_ms).is_ok() {
                    failed.push(id.clone());
                }
            }
        }
        failed
    }

    pub fn get(&self, job_id: &str) -> Result<JobView, CoreError> {
        let job = self.job(job_id)?;
        Ok(JobView {
            record: job.record.clone(),
            name: job.spec.name.clone(),
            spec_toml: job.spec_toml.clone(),
            workers: job.members.len() as u32,
            steps_per_epoch: job.steps_per_epoch(),
            metrics: job.metrics.clone(),
        })
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
             [train]\nbatch_size = 4\n[distributed]\nworkers = {workers}\njoin_timeout_secs = 10.0\nlast_call_secs = 1.0\n"
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
        c.join(&id, "w-a", "127.0.0.1:1000", 10, &[], t0, 1).unwrap();
        assert!(matches!(c.poll_join(&id, "w-a", t0, 1).unwrap(), JoinPoll::Waiting { .. }));
        c.join(&id, "w-b", "127.0.0.1:1001", 10, &[], t0, 2).unwrap();
        let a = ready(c.poll_join(&id, "w-a", t0, 3).unwrap());
        let b = ready(c.poll_join(&id, "w-b", t0, 3).unwrap());
        assert_eq!((a.rank, b.rank, a.world_size), (0, 1, 2));
        assert_eq!(a.peers, ["127.0.0.1:1000", "127.0.0.1:1001"]);
        assert_eq!(c.get(&id).unwrap().record.state(), JobState::Running);

        // 10 samples, 2 ranks x batch 4: 2 steps each.
        let plan = c.epoch_plan(&id, 0).unwrap();
        assert_eq!((plan.num_samples, plan.world_size, plan.steps), (10, 2, 2));
        assert_eq!(c.heartbeat(&id, "w-b", t0).unwrap(), Command::Continue);
        c.report_progress(&id, 0, 0, 2, 10, Some(EpochSummary { epoch: 1, val_acc: 0.5, ..Default::default() }), 5)
            .unwrap();
        assert_eq!(c.get(&id).unwrap().record.progress().samples_done, 10);
        c.leave(&id, "w-b", true, "", t0, 6).unwrap();
        assert_eq!(c.get(&id).unwrap().record.state(), JobState::Running, "only rank 0 ends the job");
        c.leave(&id, "w-a", true, "", t0, 7).unwrap();
        let v = c.get(&id).unwrap();
        assert_eq!(v.record.state(), JobState::Succeeded);
        assert_eq!(v.metrics.len(), 1);
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
        c.join(&id, "w-a", "a:1", 10, &[], t0, 0).unwrap();
        let err = c.join(&id, "w-late", "a:2", 10, &[], t0, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("cannot join"), "{err}");

        let id2 = c.submit(&spec("k", 2), t0, 0).unwrap();
        c.join(&id2, "w-a", "a:1", 10, &[], t0, 0).unwrap();
        let err = c.join(&id2, "w-b", "a:2", 11, &[], t0, 0).unwrap_err();
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
        c.join(&id, "w-a", "a:1", 8, &[], t0, 0).unwrap();
        c.join(&id, "w-b", "a:2", 8, &[], t0, 0).unwrap();
        ready(c.poll_join(&id, "w-a", t0, 0).unwrap());
        c.cancel(&id, "", 1).unwrap();
        assert!(
            matches!(c.heartbeat(&id, "w-a", t0).unwrap(), Command::Stop { reason } if reason.contains("cancelled"))
        );
        assert!(c.cancel(&id, "", 2).is_err(), "terminal states are final");

        let id2 = c.submit(&spec("k", 2), t0, 0).unwrap();
        c.join(&id2, "w-a", "a:1", 8, &[], t0, 0).unwrap();
        c.join(&id2, "w-b", "a:2", 8, &[], t0, 0).unwrap();
        ready(c.poll_join(&id2, "w-b", t0, 0).unwrap());
        let t1 = t0 + Duration::from_secs(5);
        c.heartbeat(&id2, "w-a", t1).unwrap();
        let failed = c.check_liveness(t1 + Duration::from_secs(1), Duration::from_secs(3), 10);
        assert_eq!(failed, ["k"]);
        let view = c.get(&id2).unwrap();
        let why = &view.record.history().last().unwrap().reason;
        assert!(why.contains("rank 1 (w-b) sent no heartbeat"), "{why}");
    }
}
