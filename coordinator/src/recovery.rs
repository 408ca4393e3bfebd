//! Re-forming a running job's group: who is expected back, who has come, when the new group
//! closes and whose state it starts from. A pure state machine, as `rendezvous.rs` is for the
//! first group: time is passed in, nothing here waits, reads the clock or touches the network.
//!
//! A regroup expects every member of the old generation that is still alive (the coordinator
//! drops one with [`Regroup::drop_member`] when its heartbeat lapses or it leaves) and takes any
//! newcomer up to `max_workers`. It closes as soon as every expected member has arrived and at
//! least `min_workers` are in. Below `min_workers` it waits for replacements, up to
//! `rejoin_timeout` from the moment the last expected member arrived or was dropped, then fails
//! naming who is missing.
//!
//! The new ranks keep the survivors' order (old rank order), then the newcomers in arrival order.
//! The **source** is the survivor with the most completed work, the highest (epoch, step): a rank
//! is never half-stepped (it applies the optimizer only after the whole step is reduced), so that
//! survivor's state is a state every rank reached or would have reached.

use std::time::{Duration, Instant};

use crate::plan::EpochCursor;

/// A worker back (or new) in a regroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub worker_id: String,
    pub collective_addr: String,
    /// A survivor's completed progress; `None` for a newcomer (it holds no trained state).
    pub cursor: Option<EpochCursor>,
    /// The survivor's rank in the old generation (orders the new ranks).
    pub old_rank: Option<u32>,
}

/// The group a regroup formed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Formed {
    /// In rank order.
    pub members: Vec<Arrival>,
    /// The rank (in the new group) whose state every rank takes.
    pub source: u32,
    /// The source's progress (for the old world; the caller re-cuts it for the new one).
    pub cursor: EpochCursor,
}

/// Where a regroup stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegroupState {
    Waiting,
    Closed(Formed),
    /// Not enough workers came back within the rejoin timeout.
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegroupError {
    #[error("job `{job}` is full: {max} workers (distributed.max_workers); worker `{worker}` cannot join")]
    Full { job: String, worker: String, max: u32 },
}

#[derive(Clone, Debug)]
pub struct Regroup {
    job: String,
    min_workers: u32,
    max_workers: u32,
    rejoin_timeout: Duration,
    /// Survivors not back yet, with their old ranks.
    expected: Vec<(String, u32)>,
    arrived: Vec<Arrival>,
    /// Newcomers beyond `max_workers` while survivors are still expected: a respawned worker can
    /// come back before its dead predecessor's heartbeat lapses. They take the places of members
    /// dropped; those left over when the group closes are turned away.
    waiting: Vec<Arrival>,
    /// Members dropped (lost or left) since the regroup began, for the record.
    dropped: Vec<String>,
    /// When the wait for replacements began (every expected member in or dropped, too few).
    short_since: Option<Instant>,
    /// The newest progress any survivor reported (also kept when a survivor is dropped after
    /// arriving).
    best: Option<EpochCursor>,
    state: RegroupState,
}

impl Regroup {
    /// A regroup of job `job` that expects `expected` (worker id, old rank) back.
    pub fn new(
        job: &str,
        expected: Vec<(String, u32)>,
        min_workers: u32,
        max_workers: u32,
        rejoin_timeout: Duration,
    ) -> Regroup {
        Regroup {
            job: job.to_string(),
            min_workers,
            max_workers,
            rejoin_timeout,
            expected,
            arrived: Vec::new(),
            waiting: Vec::new(),
            dropped: Vec::new(),
            short_since: None,
            best: None,
            state: RegroupState::Waiting,
        }
    }

    /// Whether `worker` is expected back (a live survivor not yet arrived).
    pub fn expects(&self, worker: &str) -> bool {
        self.expected.iter().any(|(w, _)| w == worker)
    }

    pub fn expected(&self) -> impl Iterator<Item = &str> {
        self.expected.iter().map(|(w, _)| w.as_str())
    }

    pub fn has_arrived(&self, worker: &str) -> bool {
        self.arrived.iter().chain(&self.waiting).any(|a| a.worker_id == worker)
    }

    /// Newcomers that found no place when the group closed.
    pub fn turned_away(&self) -> impl Iterator<Item = &str> {
        self.waiting.iter().map(|a| a.worker_id.as_str())
    }

    /// Workers dropped since the regroup began.
    pub fn dropped(&self) -> &[String] {
        &self.dropped
    }

    /// A survivor comes back, or a newcomer asks in. A survivor arriving again (a retried call)
    /// replaces its earlier arrival.
    pub fn arrive(&mut self, mut a: Arrival, now: Instant) -> Result<(), RegroupError> {
        if let Some(i) = self.expected.iter().position(|(w, _)| *w == a.worker_id) {
            let (_, rank) = self.expected.remove(i);
            a.old_rank = Some(rank);
        } else if let Some(old) = self.arrived.iter_mut().find(|x| x.worker_id == a.worker_id) {
            a.old_rank = old.old_rank;
            *old = a;
            self.note_progress();
            self.poll(now);
            return Ok(());
        } else {
            a.cursor = None;
            a.old_rank = None;
            self.waiting.retain(|w| w.worker_id != a.worker_id);
            if self.arrived.len() + self.expected.len() >= self.max_workers as usize {
                if self.expected.is_empty() {
                    return Err(RegroupError::Full {
                        job: self.job.clone(),
                        worker: a.worker_id,
                        max: self.max_workers,
                    });
                }
                self.waiting.push(a);
                return Ok(());
            }
        }
        self.arrived.push(a);
        self.note_progress();
        self.poll(now);
        Ok(())
    }

    fn note_progress(&mut self) {
        let key = |c: &EpochCursor| (c.epoch, c.step);
        for c in self.arrived.iter().filter_map(|a| a.cursor) {
            if self.best.is_none_or(|b| key(&c) > key(&b)) {
                self.best = Some(c);
            }
        }
    }

    /// Whether `worker`, a member of the old generation, is still awaited.
    pub fn is_expected(&self, worker: &str) -> bool {
        self.expected.iter().any(|(w, _)| w == worker)
    }

    /// A member is gone (heartbeat lapsed, left, or failed): no longer expected, nor counted if it
    /// had arrived.
    pub fn drop_member(&mut self, worker: &str, now: Instant) {
        let before = self.expected.len() + self.arrived.len();
        self.expected.retain(|(w, _)| w != worker);
        self.arrived.retain(|a| a.worker_id != worker);
        self.waiting.retain(|a| a.worker_id != worker);
        if self.expected.len() + self.arrived.len() != before {
            self.dropped.push(worker.to_string());
        }
        while !self.waiting.is_empty() && self.arrived.len() + self.expected.len() < self.max_workers as usize {
            let a = self.waiting.remove(0);
            self.arrived.push(a);
        }
        self.poll(now);
    }

    /// Advances the regroup to `now`.
    pub fn poll(&mut self, now: Instant) -> &RegroupState {
        if self.state != RegroupState::Waiting || !self.expected.is_empty() {
            return &self.state;
        }
        let n = self.arrived.len() as u32;
        let source = self
            .arrived
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.cursor.map(|c| (i, c)))
            .max_by_key(|(i, c)| (c.epoch, c.step, std::cmp::Reverse(*i)));
        match source {
            Some(_) if n >= self.min_workers => {
                let mut members = self.arrived.clone();
                // Survivors in their old order, then newcomers in arrival order (a stable sort).
                members.sort_by_key(|a| a.old_rank.map_or((1, 0), |r| (0, r)));
                let best = self.best.unwrap_or_default();
                let key = |c: &EpochCursor| (c.epoch, c.step);
                let src = members.iter().position(|a| a.cursor.is_some_and(|c| key(&c) == key(&best)));
                // A survivor that held the best progress may have been dropped after arriving; the
                // best one still here is then the source (its state is at most one step behind).
                let (src, cursor) = match src {
                    Some(i) => (i, best),
                    None => {
                        let (i, c) = members
                            .iter()
                            .enumerate()
                            .filter_map(|(i, a)| a.cursor.map(|c| (i, c)))
                            .max_by_key(|(i, c)| (c.epoch, c.step, std::cmp::Reverse(*i)))
                            .expect("a survivor is present");
                        (i, c)
                    }
                };
                self.state = RegroupState::Closed(Formed { members, source: src as u32, cursor });
            }
            _ => {
                let since = *self.short_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.rejoin_timeout {
                    let why = if source.is_none() {
                        "no survivor holds the job's state".to_string()
                    } else {
                        format!("{n} of at least {} workers", self.min_workers)
                    };
                    let lost = if self.dropped.is_empty() { "none".to_string() } else { self.dropped.join(", ") };
                    self.state = RegroupState::Failed {
                        reason: format!(
                            "the group could not re-form within {:?}: {why} (lost: {lost}); resume from the last checkpoint",
                            self.rejoin_timeout
                        ),
                    };
                }
            }
        }
        &self.state
    }

    /// When the regroup next changes by itself (the rejoin timeout), if it is waiting for
    /// replacements.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.short_since.map(|s| s + self.rejoin_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn survivor(w: &str, epoch: u32, step: u64) -> Arrival {
        Arrival {
            worker_id: w.into(),
            collective_addr: format!("{w}:1"),
            cursor: Some(EpochCursor { epoch, world: 3, step, cut: None }),
            old_rank: None,
        }
    }

    fn newcomer(w: &str) -> Arrival {
        Arrival { worker_id: w.into(), collective_addr: format!("{w}:1"), cursor: None, old_rank: None }
    }

    fn expected(ws: &[&str]) -> Vec<(String, u32)> {
        ws.iter().enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect()
    }

    #[test]
    fn closes_when_every_survivor_is_back_and_takes_the_most_advanced_state() {
        let t0 = Instant::now();
        let mut g = Regroup::new("j", expected(&["a", "b", "c"]), 1, 4, Duration::from_secs(5));
        g.drop_member("b", t0);
        g.arrive(survivor("c", 1, 7), t0).unwrap();
        assert_eq!(g.poll(t0), &RegroupState::Waiting, "a is still expected");
        g.arrive(survivor("a", 1, 6), t0).unwrap();
        let RegroupState::Closed(f) = g.poll(t0).clone() else { panic!("{:?}", g.poll(t0)) };
        let ids: Vec<&str> = f.members.iter().map(|m| m.worker_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"], "survivors keep their old order");
        assert_eq!((f.source, f.cursor.step), (1, 7), "c finished one more step than a");
        assert_eq!(g.dropped(), ["b"]);
    }

    #[test]
    fn waits_for_replacements_below_min_workers_then_fails_naming_the_lost() {
        let t0 = Instant::now();
        let mut g = Regroup::new("j", expected(&["a", "b"]), 2, 2, Duration::from_secs(5));
        g.arrive(survivor("a", 0, 3), t0).unwrap();
        g.drop_member("b", t0 + Duration::from_secs(1));
        assert_eq!(g.poll(t0 + Duration::from_secs(2)), &RegroupState::Waiting);
        assert_eq!(g.next_deadline(), Some(t0 + Duration::from_secs(6)));
        // A replacement in time forms the group; it gets the survivor's state.
        let mut ok = g.clone();
        ok.arrive(newcomer("b2"), t0 + Duration::from_secs(3)).unwrap();
        let RegroupState::Closed(f) = ok.poll(t0 + Duration::from_secs(3)).clone() else { panic!() };
        assert_eq!((f.members.len(), f.source, f.cursor.step), (2, 0, 3));
        assert_eq!(f.members[1].worker_id, "b2");
        // None: the job fails with who was lost.
        let RegroupState::Failed { reason } = g.poll(t0 + Duration::from_secs(6)).clone() else { panic!() };
        assert!(reason.contains("1 of at least 2 workers") && reason.contains("lost: b"), "{reason}");
    }

    #[test]
    fn newcomers_fill_up_to_max_workers_and_never_bring_state() {
        let t0 = Instant::now();
        let mut g = Regroup::new("j", expected(&["a"]), 1, 2, Duration::from_secs(5));
        // A newcomer claiming progress is still a newcomer.
        g.arrive(survivor("x", 9, 9), t0).unwrap();
        // Full while `a` is expected: `y` waits for a place, and gets none when `a` comes back.
        g.arrive(newcomer("y"), t0).unwrap();
        assert!(g.has_arrived("y"));
        g.arrive(survivor("a", 0, 1), t0).unwrap();
        let RegroupState::Closed(f) = g.poll(t0).clone() else { panic!() };
        assert_eq!((f.members[0].worker_id.as_str(), f.source, f.cursor.epoch), ("a", 0, 0));
        assert_eq!(g.turned_away().collect::<Vec<_>>(), ["y"]);
        // Once every survivor is in, a newcomer over the limit is refused at once.
        let mut g = Regroup::new("j", expected(&["a"]), 1, 1, Duration::from_secs(5));
        let err = g.arrive(newcomer("z"), t0);
        assert!(err.is_ok(), "a is still expected: z waits");
        g.arrive(survivor("a", 0, 1), t0).unwrap();
        assert_eq!(g.turned_away().collect::<Vec<_>>(), ["z"]);
        // A dead member's place goes to the newcomer that came back in its stead.
        let mut g = Regroup::new("j", expected(&["a", "b"]), 2, 2, Duration::from_secs(5));
        g.arrive(survivor("a", 0, 4), t0).unwrap();
        g.arrive(newcomer("b2"), t0).unwrap();
        g.drop_member("b", t0);
        let RegroupState::Closed(f) = g.poll(t0).clone() else { panic!("{:?}", g.poll(t0)) };
        assert_eq!(f.members.iter().map(|m| m.worker_id.as_str()).collect::<Vec<_>>(), ["a", "b2"]);
        let mut full = Regroup::new("j", expected(&["a"]), 1, 1, Duration::from_secs(5));
        full.arrive(survivor("a", 0, 1), t0).unwrap();
        let err = full.arrive(newcomer("y"), t0).unwrap_err();
        assert_eq!(err.to_string(), "job `j` is full: 1 workers (distributed.max_workers); worker `y` cannot join");
        // Only newcomers, no survivor: nothing to take the state from, so the job fails.
        let mut g = Regroup::new("j", expected(&["a"]), 1, 2, Duration::from_secs(1));
        g.drop_member("a", t0);
        g.arrive(newcomer("n"), t0).unwrap();
        let RegroupState::Failed { reason } = g.poll(t0 + Duration::from_secs(1)).clone() else { panic!() };
        assert!(reason.contains("no survivor"), "{reason}");
    }
}
