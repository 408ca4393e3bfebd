//! What workers measure, as the coordinator keeps it: the last figures each worker sent with its
//! heartbeat (cumulative over the worker process's life). Volatile: a coordinator that takes a job
//! over has them again from the next heartbeats. Plain data, no transport.

use serde::Serialize;

/// One rank's training figures (`RankTelemetry` on the wire).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RankTelemetry {
    pub steps: u64,
    pub step_seconds: f64,
    pub data_wait_seconds: f64,
    /// Time the collective spent on the steps' gradient reductions, and the part of it the
    /// training thread waited for (what overlap with backward did not hide).
    pub allreduce_seconds: f64,
    pub allreduce_exposed_seconds: f64,
    pub samples: u64,
    pub skipped: u64,
    /// The last step's mean loss over the global batch.
    pub loss: f64,
    /// The last step's learning rate per layer group.
    pub group_lr: Vec<f64>,
    /// The stage in force (1-based; 0 before the first step).
    pub stage: u32,
}

/// A rank of a live job as `/metrics` and the web view see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankView {
    pub rank: u32,
    pub worker: String,
    pub telemetry: RankTelemetry,
}
