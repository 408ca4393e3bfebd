//! thaw's coordinator: the job spec and, as the distributed work lands, the job state machine,
//! rendezvous, epoch plans, freeze schedules and the state store.
//!
//! Everything here is plain Rust over domain types: no libtorch, no network types. Logic that
//! both the coordinator and the workers need (the job spec, schedule types) lives here only;
//! `thaw-worker` depends on this crate, never the other way round.

pub mod auth;
pub mod client;
pub mod core;
pub mod etcd;
pub mod exposition;
pub mod job;
pub mod metrics;
pub mod plan;
pub mod recovery;
pub mod rendezvous;
pub mod schedule;
pub mod service;
pub mod spec;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod web;
