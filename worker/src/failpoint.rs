//! Named points where a fault drill kills this process for real, to test recovery from a failure
//! at an exact moment that a signal sent from outside would only hit by luck (the middle of a
//! checkpoint write, a stage change, an evaluation pass).
//!
//! `THAW_FAILPOINT=NAME[@RANK]:MARKER[,...]` arms point NAME (on every rank, or on RANK only). The
//! first process to reach it creates MARKER (`create_new`, so the point fires once across all the
//! processes of a drill, respawned ones included) and sends itself SIGKILL: no destructor, no
//! flush, exactly as `kill -9`. Unset, a point costs one relaxed load.
//!
//! Points: `checkpoint-write` (in the writing process, which is rank 0; half the checkpoint's bytes are in the temporary file),
//! `stage-change` (the new stage is set, before its first step), `evaluate` (this rank has scored
//! its share of the validation set; the others wait in the reduction).

use std::path::PathBuf;
use std::sync::OnceLock;

struct Armed {
    name: String,
    rank: Option<u32>,
    marker: PathBuf,
}

fn parse(one: &str) -> Option<Armed> {
    let (point, marker) = one.split_once(':')?;
    let (name, rank) = match point.split_once('@') {
        Some((n, r)) => (n, Some(r.parse().ok()?)),
        None => (point, None),
    };
    Some(Armed { name: name.to_string(), rank, marker: PathBuf::from(marker) })
}

fn armed() -> &'static [Armed] {
    static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var("THAW_FAILPOINT").unwrap_or_default();
        spec.split(',')
            .filter(|s| !s.is_empty())
            .filter_map(|one| {
                let a = parse(one);
                if a.is_none() {
                    tracing::warn!(failpoint = one, "THAW_FAILPOINT: expected NAME[@RANK]:MARKER; ignored");
                }
                a
            })
            .collect()
    })
}

/// Kills this process with SIGKILL if point `name` is armed for `rank` and has not fired yet.
pub fn hit(name: &str, rank: u32) {
    for a in armed() {
        if a.name != name || a.rank.is_some_and(|r| r != rank) {
            continue;
        }
        if std::fs::OpenOptions::new().write(true).create_new(true).open(&a.marker).is_err() {
            continue;
        }
        tracing::warn!(point = name, rank, "failpoint: killing this process");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_names_its_rank_and_marker() {
        let a = parse("evaluate@1:/tmp/m").unwrap();
        assert_eq!((a.name.as_str(), a.rank, a.marker.to_str()), ("evaluate", Some(1), Some("/tmp/m")));
        let a = parse("checkpoint-write:/tmp/m").unwrap();
        assert_eq!(a.rank, None);
        assert!(parse("evaluate@x:/tmp/m").is_none());
        assert!(parse("evaluate").is_none());
    }
}
