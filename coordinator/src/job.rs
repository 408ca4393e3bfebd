//! The job state machine and the record a state store persists for each job.
//!
//! ```text
//! Pending ──> Rendezvous ──> Running ──> Succeeded
//!    │            │          │    ^
//!    │            │          v    │      (a member lost, left or added: the group re-forms)
//!    │            │        Recovering
//!    └────────────┴──────────┴──────────> Failed | Cancelled
//! ```
//!
//! Every change of state is a [`Transition`] with a reason and a timestamp, appended to the job's
//! history; the current state is the last transition's target, so the two can never disagree.
//! `Failed` and `Cancelled` are reachable from every non-terminal state; the three terminal states
//! are final. Progress (epoch, step, samples done) is recorded while the job runs.
//!
//! Timestamps are passed in (unix milliseconds from the caller's wall clock) and stored as given;
//! they are not required to increase, so a clock step can never make a cancel fail. This module
//! never reads the clock, never touches the network and never writes files: persisting a
//! [`JobRecord`] is the state store's business.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted and validated, waiting for workers to be started.
    Pending,
    /// Workers are joining; ranks are not assigned yet.
    Rendezvous,
    /// Ranks are assigned and training runs.
    Running,
    /// A member was lost, left or is being added: the group re-forms from the survivors' state.
    Recovering,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Pending,
        JobState::Rendezvous,
        JobState::Running,
        JobState::Recovering,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Succeeded, Failed and Cancelled are final.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// Whether the machine allows `self -> to`.
    pub fn can_move_to(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (from, _) if from.is_terminal() => false,
            (_, Failed | Cancelled) => true,
            (Pending, Rendezvous)
            | (Rendezvous, Running)
            | (Running, Recovering)
            | (Recovering, Running)
            | (Running, Succeeded) => true,
            _ => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Rendezvous => "rendezvous",
            JobState::Running => "running",
            JobState::Recovering => "recovering",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused change to a job, naming the job and the states or values involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("job `{job}`: illegal transition from {from} to {to}")]
    IllegalTransition { job: String, from: JobState, to: JobState },
    #[error("job `{job}` is {state}, which is final; it cannot move to {to}")]
    Final { job: String, state: JobState, to: JobState },
    #[error("job `{job}`: transition to {to} without a reason")]
    MissingReason { job: String, to: JobState },
    #[error("job `{job}` is {state}: progress can only be recorded while running")]
    NotRunning { job: String, state: JobState },
    #[error("invalid job id {0:?}: must be non-empty")]
    InvalidId(String),
    #[error("invalid job record `{job}`: {reason}")]
    InvalidRecord { job: String, reason: String },
}

/// One entry of a job's history. The first entry of every record has `from: None` and `to:
/// Pending` (the submission).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from: Option<JobState>,
    pub to: JobState,
    pub reason: String,
    /// Unix time in milliseconds, as given by the caller.
    pub at_ms: u64,
}

/// How far training has got: the data cursor of the current epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The epoch in progress, from 0.
    pub epoch: u32,
    /// Steps of `epoch` completed (every rank takes the same number of steps).
    pub step: u64,
    /// Real samples of `epoch` done by all ranks together (pads excluded).
    pub samples_done: u64,
    /// When this progress was reported, unix milliseconds; 0 before any report.
    pub updated_at_ms: u64,
}

/// A job's persistent record: id, history of transitions and progress.
///
/// Serialized with serde, it carries the current `state` too (for people and queries); on
/// deserialization the history is replayed and must be a legal path that ends in that state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawJobRecord")]
pub struct JobRecord {
    job_id: String,
    state: JobState,
    history: Vec<Transition>,
    progress: Progress,
}

/// The serialized shape of a [`JobRecord`], before its history is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobRecord {
    job_id: String,
    state: JobState,
    history: Vec<Transition>,
    progress: Progress,
}

impl TryFrom<RawJobRecord> for JobRecord {
    type Error = JobError;

    fn try_from(raw: RawJobRecord) -> Result<Self, JobError> {
        if raw.job_id.is_empty() {
            return Err(JobError::InvalidId(raw.job_id));
        }
        let invalid = |reason: String| JobError::InvalidRecord { job: raw.job_id.clone(), reason };
        let Some((first, rest)) = raw.history.split_first() else {
            return Err(invalid("empty history".into()));
        };
        if first.from.is_some() || first.to != JobState::Pending {
            return Err(invalid(format!(
                "history must start with the submission (none -> pending), not {} -> {}",
                first.from.map_or("none", JobState::as_str),
                first.to
            )));
        }
        let mut state = JobState::Pending;
        for (i, t) in rest.iter().enumerate() {
            if t.from != Some(state) || !state.can_move_to(t.to) {
                return Err(invalid(format!(
                    "history entry {}: {} -> {} does not follow from {state}",
                    i + 1,
                    t.from.map_or("none", JobState::as_str),
                    t.to
                )));
            }
            state = t.to;
        }
        if state != raw.state {
            return Err(invalid(format!("state is {} but the history ends in {state}", raw.state)));
        }
        Ok(JobRecord { job_id: raw.job_id, state, history: raw.history, progress: raw.progress })
    }
}

impl JobRecord {
    /// A newly submitted job, `Pending` since `now_ms`.
    pub fn new(job_id: impl Into<String>, now_ms: u64) -> Result<Self, JobError> {
        let job_id = job_id.into();
        if job_id.is_empty() {
            return Err(JobError::InvalidId(job_id));
        }
        let submitted = Transition { from: None, to: JobState::Pending, reason: "submitted".into(), at_ms: now_ms };
        Ok(JobRecord { job_id, state: JobState::Pending, history: vec![submitted], progress: Progress::default() })
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    pub fn state(&self) -> JobState {
        self.state
    }

    /// Every transition, oldest first; the first is the submission.
    pub fn history(&self) -> &[Transition] {
        &self.history
    }

    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// When the job entered its current state.
    pub fn since_ms(&self) -> u64 {
        self.history.last().map_or(0, |t| t.at_ms)
    }

    /// Moves the job to `to`, recording `reason` and `now_ms`. Refused (and nothing recorded) if
    /// the machine does not allow it, if the job is final, or if the reason is blank.
    pub fn transition(&mut self, to: JobState, reason: impl Into<String>, now_ms: u64) -> Result<(), JobError> {
        let from = self.state;
        if from.is_terminal() {
            return Err(JobError::Final { job: self.job_id.clone(), state: from, to });
        }
        if !from.can_move_to(to) {
            return Err(JobError::IllegalTransition { job: self.job_id.clone(), from, to });
        }
        let reason = reason.into();
        if reason.trim().is_empty() {
            return Err(JobError::MissingReason { job: self.job_id.clone(), to });
        }
        self.history.push(Transition { from: Some(from), to, reason, at_ms: now_ms });
        self.state = to;
        Ok(())
    }

    /// Pending -> Rendezvous.
    pub fn start_rendezvous(&mut self, reason: impl Into<String>, now_ms: u64) -> Result<(), JobError> {
        self.transition(JobState::Rendezvous, reason, now_ms)
    }

    /// Running -> Recovering: the group re-forms.
    pub fn start_recovering(&mut self, reason: impl Into<String>, now_ms: u64) -> Result<(), JobError> {
        self.transition(JobState::Recovering, reason, now_ms)
    }

    /// Rendezvous (or Recovering) -> Running.
    pub fn start_running(&mut self, reason: impl Into<String>, now_ms: u64) -> Result<(), JobError> {
        self.transition(JobState::Running, reason, now_ms)
    }

    /// Running -> Succeeded.
    pub fn succeed(&mut self, reason: impl Into<String>, now_ms: u64) -> Result<(), JobError> {
        self.transition(JobState::Succeeded, reason, now_ms)
    }

    /// Any non-terminal state -> Failed.
    pub fn fail(&mut self, reason: impl Into<String>, now_ms: u64) -> Result<(), JobError> {
        self.transition(JobState::Failed, reason, now_ms)
    }

    /// Any non-terminal state -> Cancelled.
    pub fn cancel(&mut self, reason: impl Into<String>, now_ms: u64) -> Result<(), JobError> {
        self.transition(JobState::Cancelled, reason, now_ms)
    }

    /// Records the data cursor reported by the workers; only while `Running`. A cursor may move
    /// back (a restarted worker resumes from its last checkpoint); the latest report wins.
    pub fn record_progress(&mut self, epoch: u32, step: u64, samples_done: u64, now_ms: u64) -> Result<(), JobError> {
        if self.state != JobState::Running {
            return Err(JobError::NotRunning { job: self.job_id.clone(), state: self.state });
        }
        self.progress = Progress { epoch, step, samples_done, updated_at_ms: now_ms };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    fn running(id: &str) -> JobRecord {
        let mut job = JobRecord::new(id, 1_000).unwrap();
        job.start_rendezvous("workers requested", 1_100).unwrap();
        job.start_running("rendezvous closed at 2 workers", 1_200).unwrap();
        job
    }

    #[test]
    fn happy_path_records_every_transition() {
        let mut job = running("j1");
        job.record_progress(0, 10, 640, 1_300).unwrap();
        job.succeed("all 3 epochs done", 1_400).unwrap();
        assert_eq!(job.state(), Succeeded);
        assert_eq!(job.since_ms(), 1_400);
        let path: Vec<(Option<JobState>, JobState, &str, u64)> =
            job.history().iter().map(|t| (t.from, t.to, t.reason.as_str(), t.at_ms)).collect();
        assert_eq!(
            path,
            vec![
                (None, Pending, "submitted", 1_000),
                (Some(Pending), Rendezvous, "workers requested", 1_100),
                (Some(Rendezvous), Running, "rendezvous closed at 2 workers", 1_200),
                (Some(Running), Succeeded, "all 3 epochs done", 1_400),
            ]
        );
        assert_eq!(job.progress(), Progress { epoch: 0, step: 10, samples_done: 640, updated_at_ms: 1_300 });
    }

    #[test]
    fn transition_table() {
        let legal = [
            (Pending, Rendezvous),
            (Pending, Failed),
            (Pending, Cancelled),
            (Rendezvous, Running),
            (Rendezvous, Failed),
            (Rendezvous, Cancelled),
            (Running, Recovering),
            (Recovering, Running),
            (Recovering, Failed),
            (Recovering, Cancelled),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Cancelled),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(from.can_move_to(to), legal.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn illegal_transitions_name_both_states_and_record_nothing() {
        let mut job = JobRecord::new("j2", 0).unwrap();
        let err = job.start_running("skip the rendezvous", 5).unwrap_err();
        assert_eq!(err.to_string(), "job `j2`: illegal transition from pending to running");
        assert_eq!(
            job.succeed("done?", 5).unwrap_err(),
            JobError::IllegalTransition { job: "j2".into(), from: Pending, to: Succeeded }
        );
        job.start_rendezvous("go", 6).unwrap();
        let err = job.transition(Pending, "back", 7).unwrap_err();
        assert_eq!(err.to_string(), "job `j2`: illegal transition from rendezvous to pending");
        assert_eq!(job.state(), Rendezvous);
        assert_eq!(job.history().len(), 2);
    }

    #[test]
    fn cancel_from_every_non_terminal_state() {
        let mut pending = JobRecord::new("a", 0).unwrap();
        pending.cancel("user asked", 1).unwrap();
        let mut rdzv = JobRecord::new("b", 0).unwrap();
        rdzv.start_rendezvous("go", 1).unwrap();
        rdzv.cancel("user asked", 2).unwrap();
        let mut run = running("c");
        run.cancel("user asked", 3_000).unwrap();
        for job in [pending, rdzv, run] {
            assert_eq!(job.state(), Cancelled);
            let last = job.history().last().unwrap();
            assert_eq!((last.to, last.reason.as_str()), (Cancelled, "user asked"));
        }
    }

    #[test]
    fn terminal_states_are_final() {
        let mut done = running("d");
        done.succeed("ok", 2_000).unwrap();
        let mut failed = running("f");
        failed.fail("worker 1 exited with status 137", 2_000).unwrap();
        let mut cancelled = JobRecord::new("c", 0).unwrap();
        cancelled.cancel("user asked", 1).unwrap();
        for mut job in [done, failed, cancelled] {
            let state = job.state();
            for to in JobState::ALL {
                let err = job.transition(to, "again", 9_999).unwrap_err();
                assert_eq!(err, JobError::Final { job: job.job_id().into(), state, to });
            }
            assert!(job.record_progress(1, 1, 1, 9_999).is_err());
            assert_eq!(job.state(), state);
        }
        let mut job = running("x");
        job.succeed("ok", 5).unwrap();
        assert_eq!(
            job.cancel("late", 6).unwrap_err().to_string(),
            "job `x` is succeeded, which is final; it cannot move to cancelled"
        );
    }

    #[test]
    fn elastic_rerendezvous_keeps_progress() {
        let mut job = running("e");
        job.record_progress(2, 17, 1_088, 1_500).unwrap();
        job.start_recovering("rank 3 (w-d) lost: no heartbeat for 5s", 1_600).unwrap();
        assert_eq!(
            job.record_progress(2, 18, 1_152, 1_650).unwrap_err().to_string(),
            "job `e` is recovering: progress can only be recorded while running"
        );
        job.start_running("generation 2 formed with 3 workers", 1_700).unwrap();
        assert_eq!(job.progress().step, 17);
    }

    #[test]
    fn reasons_and_ids_are_required() {
        assert_eq!(JobRecord::new("", 0).unwrap_err().to_string(), "invalid job id \"\": must be non-empty");
        let mut job = JobRecord::new("r", 0).unwrap();
        assert_eq!(job.cancel("  ", 1).unwrap_err().to_string(), "job `r`: transition to cancelled without a reason");
        assert_eq!(job.state(), Pending);
    }

    #[test]
    fn record_round_trips_through_json() {
        let mut job = running("j/7");
        job.record_progress(1, 3, 192, 1_250).unwrap();
        let json = serde_json::to_string(&job).unwrap();
        assert!(json.contains(r#""state":"running""#), "{json}");
        assert!(json.contains(r#""from":"rendezvous","to":"running""#), "{json}");
        let back: JobRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn inconsistent_records_are_rejected_on_load() {
        let job = running("j");
        let json = serde_json::to_string(&job).unwrap();
        let load = |text: &str| serde_json::from_str::<JobRecord>(text).unwrap_err().to_string();
        let wrong_state = json.replace(r#""state":"running""#, r#""state":"succeeded""#);
        assert!(
            load(&wrong_state).contains("state is succeeded but the history ends in running"),
            "{}",
            load(&wrong_state)
        );
        let skipped = json.replace(r#""from":"rendezvous","to":"running""#, r#""from":"pending","to":"running""#);
        assert!(load(&skipped).contains("history entry 2: pending -> running does not follow from rendezvous"));
        let unknown = json.replace(r#""state":"running""#, r#""state":"running","owner":"me""#);
        assert!(load(&unknown).contains("unknown field `owner`"));
        let empty = r#"{"job_id":"j","state":"pending","history":[],"progress":{"epoch":0,"step":0,"samples_done":0,"updated_at_ms":0}}"#;
        assert!(load(empty).contains("invalid job record `j`: empty history"));
    }
}
