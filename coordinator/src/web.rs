//! The coordinator's web view, on the metrics port: the jobs with state, progress and ETA, and a
//! page per job with rank 0's loss over steps, accuracy per epoch, the stage timeline, each rank's
//! step time split into compute, data wait and exposed all-reduce, and the job's history. One
//! HTML page embedded in the binary (`web/index.html`, no external assets) polls the JSON API
//! (`/api/jobs`, `/api/jobs/{id}`) every second. Read-only; when the coordinator has client
//! tokens, every request needs a reader token (`Authorization: Bearer`, or the page's `?token=`).

use std::sync::Arc;

use axum::extract::{Path, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde_json::{json, Value};

use crate::core::JobView;
use crate::service::State;

const INDEX: &str = include_str!("web/index.html");

/// The routes, to merge into the metrics server's router.
pub fn routes(state: Arc<State>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(index))
        .route("/api/jobs", axum::routing::get(jobs))
        .route("/api/jobs/{id}", axum::routing::get(job))
        .with_state(state)
}

fn denied(state: &State, headers: &HeaderMap) -> Option<Response> {
    let meta = tonic::metadata::MetadataMap::from_headers(headers.clone());
    state.authorize_reader(&meta).err().map(|e| (StatusCode::UNAUTHORIZED, e).into_response())
}

async fn index() -> Html<&'static str> {
    Html(INDEX)
}

/// Progress as a fraction of the run, and the time left at the rate since it started running.
fn progress(v: &JobView, epochs: usize, now_ms: u64) -> (f64, Option<f64>) {
    let p = v.record.progress();
    let spe = v.steps_per_epoch.max(1) as f64;
    let done = (p.epoch as f64 * spe + p.step as f64) / (epochs.max(1) as f64 * spe);
    let fraction = if v.record.state() == crate::job::JobState::Succeeded { 1.0 } else { done.clamp(0.0, 1.0) };
    let started = v.record.history().iter().find(|t| t.to == crate::job::JobState::Running).map(|t| t.at_ms);
    let eta = match (started, v.record.state().is_terminal()) {
        (Some(s), false) if fraction > 0.0 => Some(now_ms.saturating_sub(s) as f64 / 1e3 * (1.0 - fraction) / fraction),
        _ => None,
    };
    (fraction, eta)
}

fn summary(v: &JobView, epochs: usize, now_ms: u64) -> Value {
    let p = v.record.progress();
    let (fraction, eta) = progress(v, epochs, now_ms);
    json!({
        "id": v.record.job_id(), "state": v.record.state().as_str(), "epoch": p.epoch, "epochs": epochs,
        "step": p.step, "steps_per_epoch": v.steps_per_epoch, "fraction": fraction, "eta_seconds": eta,
        "workers": v.workers, "generation": v.generation, "restarts": v.restarts,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn jobs(AxumState(state): AxumState<Arc<State>>, headers: HeaderMap) -> Response {
    if let Some(r) = denied(&state, &headers) {
        return r;
    }
    let now = now_ms();
    let list: Vec<Value> = state
        .details()
        .iter()
        .map(|d| summary(&d.view, d.epochs, now))
        .collect();
    axum::Json(list).into_response()
}

async fn job(AxumState(state): AxumState<Arc<State>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = denied(&state, &headers) {
        return r;
    }
    let Some(d) = state.details().into_iter().find(|d| d.view.record.job_id() == id) else {
        return (StatusCode::NOT_FOUND, format!("no job `{id}`")).into_response();
    };
    let mut out = summary(&d.view, d.epochs, now_ms());
    let mut by_rank = d.ranks.clone();
    by_rank.sort_by_key(|r| r.rank);
    let ranks: Vec<Value> = by_rank
        .iter()
        .map(|r| {
            let t = &r.telemetry;
            let n = t.steps.max(1) as f64;
            let (step, wait, exposed) = (t.step_seconds / n, t.data_wait_seconds / n, t.allreduce_exposed_seconds / n);
            json!({
                "rank": r.rank, "step": step, "data_wait": wait, "allreduce": t.allreduce_seconds / n,
                "allreduce_exposed": exposed, "compute": (step - wait - exposed).max(0.0),
                "samples_per_second": t.samples as f64 / t.step_seconds.max(1e-9),
            })
        })
        .collect();
    out["ranks"] = json!(ranks);
    out["stages"] = json!(d.stages);
    out["groups"] = json!(d.groups);
    out["metrics"] = json!(d.view.metrics);
    out["loss_trace"] = json!(d.loss_trace);
    out["history"] = json!(d
        .view
        .record
        .history()
        .iter()
        .map(|t| json!({ "to": t.to.as_str(), "reason": t.reason, "at_ms": t.at_ms }))
        .collect::<Vec<_>>());
    axum::Json(out).into_response()
}
