//! Rendezvous: how the workers of one job find each other, in the manner of torchrun's c10d
//! rendezvous, as a pure state machine.
//!
//! Workers [`Rendezvous::join`] with their id and the address their collective engine listens on.
//! The round stays open until `min_workers` have joined within `join_timeout` of its opening
//! (otherwise it times out); from the moment the `min_workers`-th worker joins it waits at most
//! `last_call` more for late workers, and it closes at once when `max_workers` have joined. On
//! closing, ranks are assigned in join order (the first worker to join is rank 0), and the member
//! list is what every worker needs to set up its collectives. A worker that arrives after the close
//! gets an error that names the job and the size at which it closed.
//!
//! Time is passed in: every method takes `now`, so deadlines are tested with synthetic instants,
//! and the caller (the coordinator's service) asks [`Rendezvous::next_deadline`] when to poll
//! again instead of sleeping in a loop. This module never reads the clock, never touches the
//! network and never blocks.

use std::time::{Duration, Instant};

/// A rendezvous that cannot be joined or configured: names the job, the worker and the counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RendezvousError {
    #[error("invalid rendezvous config for job `{job}`: {reason}")]
    InvalidConfig { job: String, reason: String },
    #[error("invalid join to the rendezvous for job `{job}`: {reason}")]
    InvalidJoin { job: String, reason: String },
    #[error(
        "rendezvous for job `{job}` closed at {workers} workers; worker `{worker}` arrived too late \
         and is not part of this round (start a new round to admit it)"
    )]
    Closed { job: String, workers: u32, worker: String },
    #[error(
        "rendezvous for job `{job}` timed out after {timeout:?} with {joined} of at least {min_workers} \
         workers; worker `{worker}` cannot join it"
    )]
    TimedOut { job: String, joined: u32, min_workers: u32, timeout: Duration, worker: String },
    #[error("worker `{worker}` already joined the rendezvous for job `{job}` (as arrival #{arrival})")]
    DuplicateWorker { job: String, worker: String, arrival: u32 },
    #[error("worker `{worker}` is not waiting in the rendezvous for job `{job}`")]
    UnknownWorker { job: String, worker: String },
}

/// The bounds of one rendezvous round. Build it with [`RendezvousConfig::new`], which validates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousConfig {
    job_id: String,
    min_workers: u32,
    max_workers: u32,
    join_timeout: Duration,
    last_call: Duration,
}

impl RendezvousConfig {
    /// `1 <= min_workers <= max_workers`, `join_timeout > 0`; `last_call` may be zero (close as
    /// soon as `min_workers` have joined).
    pub fn new(
        job_id: impl Into<String>,
        min_workers: u32,
        max_workers: u32,
        join_timeout: Duration,
        last_call: Duration,
    ) -> Result<Self, RendezvousError> {
        let job = job_id.into();
        let invalid = |reason: String| Err(RendezvousError::InvalidConfig { job: job.clone(), reason });
        if job.is_empty() {
            return invalid("the job id is empty".into());
        }
        if min_workers == 0 {
            return invalid("min_workers = 0: must be at least 1".into());
        }
        if max_workers < min_workers {
            return invalid(format!("max_workers = {max_workers} is below min_workers = {min_workers}"));
        }
        if join_timeout.is_zero() {
            return invalid("join_timeout = 0s: must be positive".into());
        }
        Ok(RendezvousConfig { job_id: job, min_workers, max_workers, join_timeout, last_call })
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    pub fn min_workers(&self) -> u32 {
        self.min_workers
    }

    pub fn max_workers(&self) -> u32 {
        self.max_workers
    }

    pub fn join_timeout(&self) -> Duration {
        self.join_timeout
    }

    pub fn last_call(&self) -> Duration {
        self.last_call
    }
}

/// A worker of a closed rendezvous.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// Position in the collective: join order, 0 first.
    pub rank: u32,
    pub worker_id: String,
    /// Where the worker's collective engine listens (a ring address, for instance).
    pub collective_addr: String,
}

/// What a worker gets back from a successful join: its place in the queue. Ranks are assigned only
/// when the round closes (see [`RendezvousState::Closed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinTicket {
    pub job_id: String,
    pub worker_id: String,
    /// 0 for the first worker to join; the rank this worker gets if nobody ahead of it leaves.
    pub arrival: u32,
    /// Workers joined so far, this one included.
    pub joined: u32,
    /// True if this join closed the round (it was the `max_workers`-th, or `last_call` is zero).
    pub closed_round: bool,
}

/// Where a rendezvous round stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RendezvousState {
    /// Accepting workers. `last_call_deadline` is set once `min_workers` have joined.
    Open { joined: u32, min_workers: u32, max_workers: u32, last_call_deadline: Option<Instant> },
    /// Membership is final: ranks `0..members.len()` in join order.
    Closed { members: Vec<Member> },
    /// Fewer than `min_workers` joined within `join_timeout`.
    TimedOut { joined: u32, min_workers: u32 },
}

#[derive(Clone, Debug)]
struct Waiting {
    worker_id: String,
    collective_addr: String,
}

/// One rendezvous round of one job.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    config: RendezvousConfig,
    opened_at: Instant,
    waiting: Vec<Waiting>,
    last_call_deadline: Option<Instant>,
    state: RendezvousState,
}

impl Rendezvous {
    /// A round that opens at `now`.
    pub fn new(config: RendezvousConfig, now: Instant) -> Self {
        let state = RendezvousState::Open {
            joined: 0,
            min_workers: config.min_workers,
            max_workers: config.max_workers,
            last_call_deadline: None,
        };
        Rendezvous { config, opened_at: now, waiting: Vec::new(), last_call_deadline: None, state }
    }

    pub fn config(&self) -> &RendezvousConfig {
        &self.config
    }

    /// Adds a worker. Fails if the round has closed or timed out by `now`, if the id is already in,
    /// or if the id or address is empty.
    pub fn join(
        &mut self,
        worker_id: &str,
        collective_addr: &str,
        now: Instant,
    ) -> Result<JoinTicket, RendezvousError> {
        self.advance(now);
        let job = &self.config.job_id;
        match &self.state {
            RendezvousState::Open { .. } => {}
            RendezvousState::Closed { members } => {
                return Err(RendezvousError::Closed {
                    job: job.clone(),
                    workers: members.len() as u32,
                    worker: worker_id.into(),
                })
            }
            RendezvousState::TimedOut { joined, min_workers } => {
                return Err(RendezvousError::TimedOut {
                    job: job.clone(),
                    joined: *joined,
                    min_workers: *min_workers,
                    timeout: self.config.join_timeout,
                    worker: worker_id.into(),
                })
            }
        }
        if worker_id.is_empty() {
            return Err(RendezvousError::InvalidJoin { job: job.clone(), reason: "the worker id is empty".into() });
        }
        if collective_addr.is_empty() {
            return Err(RendezvousError::InvalidJoin {
                job: job.clone(),
                reason: format!("worker `{worker_id}` gave an empty collective address"),
            });
        }
        if let Some(arrival) = self.waiting.iter().position(|w| w.worker_id == worker_id) {
            return Err(RendezvousError::DuplicateWorker {
                job: job.clone(),
                worker: worker_id.into(),
                arrival: arrival as u32,
            });
        }
        self.waiting.push(Waiting { worker_id: worker_id.into(), collective_addr: collective_addr.into() });
        // `waiting` never exceeds max_workers (a u32): the round closes when it reaches it.
        let joined = self.waiting.len() as u32;
        if joined == self.config.min_workers {
            // The last call starts once, when the minimum is first reached; later joins do not extend it.
            self.last_call_deadline.get_or_insert(now + self.config.last_call);
        }
        self.advance(now);
        Ok(JoinTicket {
            job_id: self.config.job_id.clone(),
            worker_id: worker_id.into(),
            arrival: joined - 1,
            joined,
            closed_round: matches!(self.state, RendezvousState::Closed { .. }),
        })
    }

    /// Removes a worker that gave up (or whose liveness lease expired) before the round closed.
    /// Below `min_workers` again, the last call is cancelled and the join timeout applies anew
    /// from the round's opening.
    pub fn leave(&mut self, worker_id: &str, now: Instant) -> Result<(), RendezvousError> {
        self.advance(now);
        let unknown = || RendezvousError::UnknownWorker { job: self.config.job_id.clone(), worker: worker_id.into() };
        if !matches!(self.state, RendezvousState::Open { .. }) {
            return Err(unknown());
        }
        let Some(i) = self.waiting.iter().position(|w| w.worker_id == worker_id) else {
            return Err(unknown());
        };
        self.waiting.remove(i);
        if (self.waiting.len() as u32) < self.config.min_workers {
            self.last_call_deadline = None;
        }
        self.advance(now);
        Ok(())
    }

    /// The state of the round at `now` (closing or timing it out if a deadline has passed).
    pub fn poll(&mut self, now: Instant) -> &RendezvousState {
        self.advance(now);
        &self.state
    }

    /// The next instant at which [`Rendezvous::poll`] may change the state without a join: the last
    /// call's end if the minimum is reached, the join timeout otherwise; `None` once final.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            RendezvousState::Open { .. } => {
                Some(self.last_call_deadline.unwrap_or(self.opened_at + self.config.join_timeout))
            }
            _ => None,
        }
    }

    fn advance(&mut self, now: Instant) {
        if !matches!(self.state, RendezvousState::Open { .. }) {
            return;
        }
        let joined = self.waiting.len() as u32;
        let close = joined >= self.config.max_workers || self.last_call_deadline.is_some_and(|d| now >= d);
        if close {
            let members = self
                .waiting
                .drain(..)
                .enumerate()
                .map(|(rank, w)| Member {
                    rank: rank as u32,
                    worker_id: w.worker_id,
                    collective_addr: w.collective_addr,
                })
                .collect();
            self.state = RendezvousState::Closed { members };
        } else if self.last_call_deadline.is_none() && now >= self.opened_at + self.config.join_timeout {
            self.state = RendezvousState::TimedOut { joined, min_workers: self.config.min_workers };
        } else {
            self.state = RendezvousState::Open {
                joined,
                min_workers: self.config.min_workers,
                max_workers: self.config.max_workers,
                last_call_deadline: self.last_call_deadline,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A round for job "j" opened at `t0`: 2..4 workers, 30 s to reach 2, then 5 s of last call.
    fn round(t0: Instant) -> Rendezvous {
        Rendezvous::new(RendezvousConfig::new("j", 2, 4, secs(30), secs(5)).unwrap(), t0)
    }

    fn members(state: &RendezvousState) -> Vec<(u32, &str, &str)> {
        match state {
            RendezvousState::Closed { members } => {
                members.iter().map(|m| (m.rank, m.worker_id.as_str(), m.collective_addr.as_str())).collect()
            }
            other => panic!("expected closed, got {other:?}"),
        }
    }

    #[test]
    fn closes_at_max_immediately_with_ranks_in_join_order() {
        let t0 = Instant::now();
        let mut r = round(t0);
        for (i, w) in ["c", "a", "d"].into_iter().enumerate() {
            let ticket = r.join(w, &format!("10.0.0.{i}:29500"), t0 + secs(i as u64)).unwrap();
            assert_eq!((ticket.arrival, ticket.joined, ticket.closed_round), (i as u32, i as u32 + 1, false));
        }
        // The 4th worker arrives within the last call (which ends at t0+6 s): the round closes now.
        let ticket = r.join("b", "10.0.0.3:29500", t0 + secs(3)).unwrap();
        assert!(ticket.closed_round);
        assert_eq!(r.next_deadline(), None);
        assert_eq!(
            members(r.poll(t0 + secs(3))),
            vec![
                (0, "c", "10.0.0.0:29500"),
                (1, "a", "10.0.0.1:29500"),
                (2, "d", "10.0.0.2:29500"),
                (3, "b", "10.0.0.3:29500")
            ]
        );
    }

    #[test]
    fn last_call_closes_between_min_and_max() {
        let t0 = Instant::now();
        let mut r = round(t0);
        r.join("w0", "h0:1", t0 + secs(10)).unwrap();
        assert!(matches!(r.poll(t0 + secs(11)), RendezvousState::Open { joined: 1, last_call_deadline: None, .. }));
        assert_eq!(r.next_deadline(), Some(t0 + secs(30)));
        r.join("w1", "h1:1", t0 + secs(20)).unwrap();
        // The minimum is reached at 20 s: the last call ends at 25 s, however long the join timeout.
        assert_eq!(r.next_deadline(), Some(t0 + secs(25)));
        r.join("w2", "h2:1", t0 + secs(24)).unwrap();
        // A join after the minimum does not extend the last call.
        assert_eq!(r.next_deadline(), Some(t0 + secs(25)));
        assert!(matches!(r.poll(t0 + secs(24)), RendezvousState::Open { joined: 3, .. }));
        assert_eq!(members(r.poll(t0 + secs(25))).len(), 3);
        assert_eq!(members(r.poll(t0 + secs(100)))[2], (2, "w2", "h2:1"));
    }

    #[test]
    fn join_after_close_names_job_and_size() {
        let t0 = Instant::now();
        let mut r = round(t0);
        r.join("w0", "h0:1", t0).unwrap();
        r.join("w1", "h1:1", t0 + secs(1)).unwrap();
        // No poll in between: the join itself notices that the last call ended at 6 s.
        let err = r.join("late", "h9:1", t0 + secs(7)).unwrap_err();
        assert_eq!(err, RendezvousError::Closed { job: "j".into(), workers: 2, worker: "late".into() });
        assert!(err
            .to_string()
            .starts_with("rendezvous for job `j` closed at 2 workers; worker `late` arrived too late"));
        assert_eq!(members(r.poll(t0 + secs(7))).len(), 2);
    }

    #[test]
    fn times_out_below_min() {
        let t0 = Instant::now();
        let mut r = round(t0);
        r.join("w0", "h0:1", t0 + secs(1)).unwrap();
        assert!(matches!(r.poll(t0 + secs(29)), RendezvousState::Open { .. }));
        assert_eq!(r.poll(t0 + secs(30)), &RendezvousState::TimedOut { joined: 1, min_workers: 2 });
        assert_eq!(r.next_deadline(), None);
        let err = r.join("w1", "h1:1", t0 + secs(31)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rendezvous for job `j` timed out after 30s with 1 of at least 2 workers; worker `w1` cannot join it"
        );
        // Final: a later poll does not revive it.
        assert!(matches!(r.poll(t0 + secs(1000)), RendezvousState::TimedOut { .. }));
    }

    #[test]
    fn reaching_min_before_the_timeout_wins_over_it() {
        let t0 = Instant::now();
        let mut r = round(t0);
        r.join("w0", "h0:1", t0).unwrap();
        r.join("w1", "h1:1", t0 + secs(29)).unwrap();
        // The last call (29 s + 5 s) runs past the join timeout (30 s).
        assert!(matches!(r.poll(t0 + secs(31)), RendezvousState::Open { joined: 2, .. }));
        assert_eq!(members(r.poll(t0 + secs(34))).len(), 2);
    }

    #[test]
    fn duplicate_worker_is_rejected() {
        let t0 = Instant::now();
        let mut r = round(t0);
        r.join("w0", "h0:1", t0).unwrap();
        let err = r.join("w0", "other:1", t0 + secs(1)).unwrap_err();
        assert_eq!(err.to_string(), "worker `w0` already joined the rendezvous for job `j` (as arrival #0)");
        assert!(matches!(r.poll(t0 + secs(1)), RendezvousState::Open { joined: 1, .. }));
    }

    #[test]
    fn zero_last_call_closes_at_min() {
        let t0 = Instant::now();
        let cfg = RendezvousConfig::new("j", 2, 8, secs(30), Duration::ZERO).unwrap();
        let mut r = Rendezvous::new(cfg, t0);
        assert!(!r.join("a", "h:1", t0).unwrap().closed_round);
        assert!(r.join("b", "h:2", t0).unwrap().closed_round);
        assert_eq!(members(r.poll(t0)).len(), 2);
    }

    #[test]
    fn single_worker_round() {
        let t0 = Instant::now();
        let cfg = RendezvousConfig::new("solo", 1, 1, secs(1), secs(60)).unwrap();
        let mut r = Rendezvous::new(cfg, t0);
        assert!(r.join("only", "127.0.0.1:1", t0).unwrap().closed_round);
        assert_eq!(members(r.poll(t0)), vec![(0, "only", "127.0.0.1:1")]);
    }

    #[test]
    fn leaving_below_min_cancels_the_last_call() {
        let t0 = Instant::now();
        let mut r = round(t0);
        r.join("w0", "h0:1", t0).unwrap();
        r.join("w1", "h1:1", t0 + secs(1)).unwrap();
        r.leave("w0", t0 + secs(2)).unwrap();
        assert_eq!(r.next_deadline(), Some(t0 + secs(30)));
        assert!(matches!(r.poll(t0 + secs(10)), RendezvousState::Open { joined: 1, last_call_deadline: None, .. }));
        r.join("w2", "h2:1", t0 + secs(12)).unwrap();
        // w1 joined before w2, so it is rank 0 now that w0 left.
        assert_eq!(members(r.poll(t0 + secs(17))), vec![(0, "w1", "h1:1"), (1, "w2", "h2:1")]);
        let err = r.leave("w1", t0 + secs(18)).unwrap_err();
        assert_eq!(err.to_string(), "worker `w1` is not waiting in the rendezvous for job `j`");
    }

    #[test]
    fn invalid_configs_and_joins_are_named() {
        let err = |min, max, timeout| RendezvousConfig::new("j", min, max, timeout, secs(1)).unwrap_err().to_string();
        assert_eq!(err(0, 1, secs(1)), "invalid rendezvous config for job `j`: min_workers = 0: must be at least 1");
        assert_eq!(
            err(3, 2, secs(1)),
            "invalid rendezvous config for job `j`: max_workers = 2 is below min_workers = 3"
        );
        assert_eq!(
            err(1, 2, Duration::ZERO),
            "invalid rendezvous config for job `j`: join_timeout = 0s: must be positive"
        );
        assert!(RendezvousConfig::new("", 1, 1, secs(1), secs(1)).is_err());
        let t0 = Instant::now();
        let mut r = round(t0);
        assert_eq!(
            r.join("", "h:1", t0).unwrap_err().to_string(),
            "invalid join to the rendezvous for job `j`: the worker id is empty"
        );
        assert_eq!(
            r.join("w", "", t0).unwrap_err().to_string(),
            "invalid join to the rendezvous for job `j`: worker `w` gave an empty collective address"
        );
    }
}
