//! The gRPC services: thin adapters over [`Coordinator`]. Each handler takes the lock, calls one
//! core method, converts the result; the only logic here is waiting (a worker long-polling the
//! rendezvous, a client watching a job) and the one mapping of error kinds to `tonic::Code`.
//!
//! No tonic or proto type crosses into the core; the server takes an already-bound listener and
//! a shutdown future, so tests bind 127.0.0.1:0 and never sleep to wait for it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thaw_proto::v1 as pb;
use thaw_proto::v1::jobs_server::{Jobs, JobsServer};
use thaw_proto::v1::workers_server::{Workers, WorkersServer};
use tokio::sync::{broadcast, Notify};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::auth::Role;
use crate::core::{Command, Coordinator, CoreError, ErrorKind, JobView, JoinInfo, JoinPoll};
use crate::job::JobState;
use crate::metrics::EpochMetrics;
use crate::plan::{Cut, EpochCursor};
use crate::spec::{BnPolicy, LrSchedule, Stage};
use crate::store::StateStore;

/// The one mapping from core errors to gRPC status codes.
pub fn status(e: CoreError) -> Status {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(msg),
        ErrorKind::AlreadyExists => Status::already_exists(msg),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::FailedPrecondition => Status::failed_precondition(msg),
        ErrorKind::DeadlineExceeded => Status::deadline_exceeded(msg),
        ErrorKind::Unavailable => Status::unavailable(msg),
        ErrorKind::Internal => Status::internal(msg),
    }
}

/// The metadata key of a standby's answer that names the leader's URL.
pub const LEADER_HEADER: &str = "thaw-leader";

/// How often the coordinator checks heartbeats and regroup deadlines.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// HTTP/2 keepalive on both ends of every channel: a peer that goes silent without closing its
/// connection is noticed within interval + timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Shared state of both services.
pub struct State {
    core: Mutex<Coordinator>,
    /// With several coordinators on etcd: whether this one leads (and may answer).
    leadership: Option<Arc<crate::etcd::Leadership>>,
    /// Woken on every membership change, so long-polling joins re-check at once.
    changed: Notify,
    /// Job ids whose status changed, for watchers.
    events: broadcast::Sender<String>,
    /// Finished jobs are deleted this many seconds after their last change (0: kept).
    retention_secs: std::sync::atomic::AtomicU64,
    /// Client tokens; unset, every call is allowed (`--insecure`, or loopback only).
    tokens: std::sync::OnceLock<crate::auth::Tokens>,
    /// Whether the last sweep found this coordinator refusing calls (a standby, or a leader whose
    /// lease ran out): heartbeats were refused meanwhile, so deadlines restart when it serves again.
    was_refused: std::sync::atomic::AtomicBool,
    limits: std::sync::RwLock<Limits>,
    /// Open watch streams per client (its token, or its address without tokens).
    watchers: Mutex<HashMap<String, usize>>,
    /// Joins waiting for their group to form.
    pending_joins: std::sync::atomic::AtomicUsize,
    /// RPCs answered, by method and status, and their latency.
    rpc: Arc<RpcMetrics>,
}

/// RPC counts and latency by method (the gRPC path's last segment) and status code.
#[derive(Debug)]
pub struct RpcMetrics {
    requests: prometheus_client::metrics::family::Family<Vec<(&'static str, String)>, prometheus_client::metrics::counter::Counter>,
    seconds: prometheus_client::metrics::family::Family<
        Vec<(&'static str, String)>,
        prometheus_client::metrics::histogram::Histogram,
        fn() -> prometheus_client::metrics::histogram::Histogram,
    >,
}

fn latency_buckets() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 4.0, 10,
    ))
}

impl RpcMetrics {
    fn new() -> RpcMetrics {
        RpcMetrics { requests: Default::default(), seconds: prometheus_client::metrics::family::Family::new_with_constructor(latency_buckets) }
    }

    fn observe(&self, path: &str, code: &str, seconds: f64) {
        let method = path.rsplit('/').next().unwrap_or(path).to_string();
        self.requests.get_or_create(&vec![("method", method.clone()), ("code", code.to_string())]).inc();
        self.seconds.get_or_create(&vec![("method", method)]).observe(seconds);
    }
}

/// Wraps the gRPC routes to count and time every call ([`RpcMetrics`]); the status is the
/// response's `grpc-status` header when the call ended there (errors), else OK.
#[derive(Clone)]
struct Timed<S> {
    inner: S,
    rpc: Arc<RpcMetrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let (rpc, start) = (self.rpc.clone(), Instant::now());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            let code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK".to_string(), |c| format!("{:?}", tonic::Code::from(c))),
                Err(_) => "transport".to_string(),
            };
            if !path.starts_with("/grpc.health") {
                rpc.observe(&path, &code, start.elapsed().as_secs_f64());
            }
            r
        })
    }
}

/// The most a coordinator holds for its callers, so that none of them (authenticated, but buggy
/// or compromised) can grow its memory or tasks without bound. Request sizes are capped apart
/// ([`thaw_proto::MAX_MESSAGE_BYTES`]). Past a limit, a call is answered RESOURCE_EXHAUSTED
/// naming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Jobs kept, live and finished (finished ones go after the retention period or `thaw delete`).
    pub max_jobs: usize,
    /// Watch streams open at once per client.
    pub max_watches_per_client: usize,
    /// Joins waiting for a group at once, all jobs together.
    pub max_pending_joins: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_jobs: 1000, max_watches_per_client: 16, max_pending_joins: 1024 }
    }
}

/// A watch stream's place in its client's count, given back when the stream ends.
struct WatchSlot {
    state: Arc<State>,
    client: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = self.state.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.client);
            }
        }
    }
}

/// A waiting join's place in the count.
struct JoinSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for JoinSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl State {
    /// A coordinator whose jobs live in memory only, as `thaw launch` runs one: its jobs end
    /// with the process that owns them.
    pub fn new() -> Arc<State> {
        Self::with_core(Coordinator::new())
    }

    /// A coordinator on `store`, with every job already in it restored (see
    /// [`Coordinator::restore`]: jobs that were running or forming a group are failed).
    pub fn with_store(store: Box<dyn StateStore>) -> Result<Arc<State>, CoreError> {
        Ok(Self::with_core(Coordinator::restore(store, Instant::now(), now_ms())?))
    }

    fn with_core(core: Coordinator) -> Arc<State> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(State {
            core: Mutex::new(core),
            leadership: None,
            changed: Notify::new(),
            events,
            retention_secs: Default::default(),
            tokens: Default::default(),
            was_refused: Default::default(),
            limits: Default::default(),
            watchers: Default::default(),
            pending_joins: Default::default(),
            rpc: Arc::new(RpcMetrics::new()),
        })
    }

    /// One of several coordinators on etcd: a standby (no jobs, every call refused with the
    /// leader's address) until [`State::install`] gives it the jobs of the store it won.
    pub fn standby(leadership: Arc<crate::etcd::Leadership>) -> Arc<State> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(State {
            core: Mutex::new(Coordinator::new()),
            leadership: Some(leadership),
            changed: Notify::new(),
            events,
            retention_secs: Default::default(),
            tokens: Default::default(),
            was_refused: Default::default(),
            limits: Default::default(),
            watchers: Default::default(),
            pending_joins: Default::default(),
            rpc: Arc::new(RpcMetrics::new()),
        })
    }

    /// Deletes finished jobs `retention` after their last change (`None`: keeps them), at the
    /// sweep: the store does not grow without bound.
    pub fn set_retention(&self, retention: Option<Duration>) {
        let secs = retention.map_or(0, |d| d.as_secs().max(1));
        self.retention_secs.store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    /// Replaces the limits (see [`Limits`]).
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    fn limits(&self) -> Limits {
        *self.limits.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Who a caller is, for per-client limits: its bearer token (as a digest), or its address.
    fn client_of<T>(req: &Request<T>) -> String {
        use sha2::Digest;
        match req.metadata().get("authorization") {
            Some(v) => {
                let d = sha2::Sha256::digest(v.as_bytes());
                format!("token {:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
            }
            None => req.remote_addr().map_or_else(|| "unknown".to_string(), |a| a.ip().to_string()),
        }
    }

    /// A watch slot for the caller of `req`, if it has one left.
    fn watch_slot<T>(self: &Arc<Self>, req: &Request<T>) -> Result<WatchSlot, Status> {
        let client = Self::client_of(req);
        let max = self.limits().max_watches_per_client;
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let n = w.entry(client.clone()).or_insert(0);
        if *n >= max {
            return Err(Status::resource_exhausted(format!(
                "{client} has {n} watch streams open, the most a client may (--max-watches-per-client {max})"
            )));
        }
        *n += 1;
        Ok(WatchSlot { state: self.clone(), client })
    }

    /// Checks every client call against `tokens` from now on, and workers' joins against their
    /// job's credential (issued at submit).
    pub fn require_tokens(&self, tokens: crate::auth::Tokens) {
        let _ = self.tokens.set(tokens);
    }

    /// Whether the caller's bearer token allows `need` (always, without tokens).
    fn authorize<T>(&self, req: &Request<T>, need: crate::auth::Role) -> Result<(), Status> {
        match self.tokens.get() {
            Some(t) => t.check(req.metadata(), need).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Whether the caller presents `job_id`'s worker credential (always, without tokens).
    fn authorize_worker<T>(&self, req: &Request<T>, job_id: &str) -> Result<(), Status> {
        if self.tokens.get().is_none() {
            return Ok(());
        }
        let expected = self.core().worker_token(job_id).map_err(status)?;
        let presented = req.metadata().get(crate::auth::JOB_TOKEN_HEADER).and_then(|v| v.to_str().ok());
        match (expected, presented) {
            (Some(e), Some(p)) if crate::auth::same_secret(p, &e) => Ok(()),
            (_, None) => {
                Err(Status::unauthenticated(format!("job `{job_id}` needs its worker credential (THAW_JOB_TOKEN)")))
            }
            _ => Err(Status::unauthenticated(format!("wrong worker credential for job `{job_id}`"))),
        }
    }

    /// Replaces the jobs this coordinator serves (a takeover, or stepping down to none).
    pub fn install(&self, core: Coordinator) {
        *self.core() = core;
        self.changed.notify_waiters();
    }

    /// Why this coordinator must not answer now (a standby, or a leader whose lease ran out),
    /// as the status to answer with: UNAVAILABLE, with the leader's URL in `thaw-leader`.
    /// Every metric in Prometheus text format (`/metrics`): the jobs as the core holds them now
    /// ([`crate::exposition`]) and the RPC counters.
    pub fn metrics_text(self: &Arc<Self>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        let state = self.clone();
        registry.register_collector(Box::new(crate::exposition::JobsCollector::new(move || state.core().observe())));
        registry.register("thaw_rpc_requests", "gRPC calls answered, by method and status.", self.rpc.requests.clone());
        registry.register_with_unit(
            "thaw_rpc_duration",
            "Time to answer gRPC calls, by method.",
            prometheus_client::registry::Unit::Seconds,
            self.rpc.seconds.clone(),
        );
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Every job's detail for the web view (see [`crate::core::Coordinator::detail`]).
    pub fn details(&self) -> Vec<crate::core::JobDetail> {
        let core = self.core();
        core.list().iter().filter_map(|v| core.detail(v.record.job_id()).ok()).collect()
    }

    /// Whether `meta` carries a reader token (always, without tokens): the web view's check.
    pub fn authorize_reader(&self, meta: &tonic::metadata::MetadataMap) -> Result<(), String> {
        match self.tokens.get() {
            Some(t) => t.check(meta, crate::auth::Role::Reader).map(|_| ()).map_err(|s| s.message().to_string()),
            None => Ok(()),
        }
    }

    /// Whether calls can be answered usefully: no refusal, or a refusal that points at the
    /// leader (a standby redirects).
    pub fn ready(&self) -> bool {
        match self.leadership.as_ref().and_then(|l| l.refusal()) {
            None => true,
            Some((_, leader)) => leader.is_some(),
        }
    }

    pub fn refusal(&self) -> Option<Status> {
        let (why, leader) = self.leadership.as_ref()?.refusal()?;
        let mut s = Status::unavailable(why);
        if let Some(url) = leader.and_then(|l| l.parse().ok()) {
            s.metadata_mut().insert(LEADER_HEADER, url);
        }
        Some(s)
    }

    fn core(&self) -> MutexGuard<'_, Coordinator> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touched(&self, job_id: &str) {
        self.changed.notify_waiters();
        let _ = self.events.send(job_id.to_string());
    }

    /// Re-forms groups around workers that went silent, moves rendezvous and regroups on, and
    /// writes what the store is missing (throttled progress, failed writes); run every
    /// [`SWEEP_EVERY`].
    pub fn sweep(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.refusal().is_some() {
            self.was_refused.store(true, Relaxed);
            return;
        }
        let changed = {
            let mut core = self.core();
            if self.was_refused.swap(false, Relaxed) {
                // Every heartbeat was refused while this coordinator could not serve: no worker
                // is late for it. Deadlines start again from now.
                core.restart_deadlines(Instant::now());
                tracing::info!("serving again: every heartbeat deadline starts afresh");
            }
            let changed = core.check_liveness(Instant::now(), now_ms());
            core.flush(now_ms());
            let keep = self.retention_secs.load(std::sync::atomic::Ordering::Relaxed);
            if keep > 0 {
                for id in core.expire(Duration::from_secs(keep), now_ms()) {
                    tracing::info!(job = %id, retention_secs = keep, "deleted a finished job past its retention");
                }
            }
            changed
        };
        for id in changed {
            tracing::warn!(job = %id, "liveness changed the job");
            self.touched(&id);
        }
    }
}

fn state_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Rendezvous => pb::JobState::Rendezvous,
        JobState::Running => pb::JobState::Running,
        JobState::Recovering => pb::JobState::Recovering,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn job_pb(v: &JobView) -> pb::Job {
    let p = v.record.progress();
    pb::Job {
        id: v.record.job_id().to_string(),
        name: v.name.clone(),
        state: state_pb(v.record.state()) as i32,
        transitions: v
            .record
            .history()
            .iter()
            .map(|t| pb::Transition {
                from: t.from.map_or(pb::JobState::Unspecified, state_pb) as i32,
                to: state_pb(t.to) as i32,
                reason: t.reason.clone(),
                at_unix_ms: t.at_ms,
            })
            .collect(),
        progress: Some(pb::Progress {
            epoch: p.epoch,
            step: p.step,
            steps_per_epoch: v.steps_per_epoch,
            samples_done: p.samples_done,
            workers: v.workers,
            generation: v.generation,
            restarts: v.restarts,
        }),
        metrics: v.metrics.iter().map(pb::EpochMetrics::from).collect(),
        spec_toml: v.spec_toml.clone(),
    }
}

#[derive(Clone)]
pub struct JobsService(pub Arc<State>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn submit(&self, req: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        self.0.authorize(&req, Role::Operator)?;
        let r = req.into_inner();
        let resume = if r.resume_from.is_empty() {
            None
        } else {
            let cursor: EpochCursor = serde_json::from_str(&r.resume_cursor_json).map_err(|e| {
                Status::invalid_argument(format!("resume_cursor_json {:?} is not a cursor: {e}", r.resume_cursor_json))
            })?;
            Some((r.resume_from.clone(), cursor))
        };
        let job_token = {
            let mut core = self.0.core();
            let max = self.0.limits().max_jobs;
            if core.job_count() >= max {
                return Err(Status::resource_exhausted(format!(
                    "this coordinator keeps {} jobs, its most (--max-jobs {max}): delete finished ones (`thaw delete`)",
                    core.job_count()
                )));
            }
            let id = core.submit_resumed(&r.spec_toml, resume, Instant::now(), now_ms()).map_err(status)?;
            let token = self.0.tokens.get().map(|_| crate::auth::new_job_token());
            if let Some(t) = &token {
                core.set_worker_token(&id, t.clone(), now_ms()).map_err(status)?;
            }
            tracing::info!(job = %id, "job submitted");
            (id, token.unwrap_or_default())
        };
        let (id, job_token) = job_token;
        self.0.touched(&id);
        Ok(Response::new(pb::SubmitResponse { job_id: id, job_token }))
    }

    async fn get(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        // A reader, or a worker of this job (it reads its spec before joining).
        let id = req.get_ref().job_id.clone();
        if self.0.authorize(&req, Role::Reader).is_err() {
            if req.metadata().get(crate::auth::JOB_TOKEN_HEADER).is_some() && !id.is_empty() {
                self.0.authorize_worker(&req, &id)?;
            } else {
                self.0.authorize(&req, Role::Reader)?;
            }
        }
        let v = self.0.core().get(&id).map_err(status)?;
        Ok(Response::new(job_pb(&v)))
    }

    async fn list(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.0.authorize(&req, Role::Reader)?;
        let r = req.into_inner();
        let (views, next) = self.0.core().page(r.page_size as usize, &r.page_token);
        let jobs = views.iter().map(job_pb).collect();
        Ok(Response::new(pb::ListJobsResponse { jobs, next_page_token: next.unwrap_or_default() }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        self.0.authorize(&req, Role::Operator)?;
        let id = req.into_inner().job_id;
        self.0.core().delete(&id).map_err(status)?;
        tracing::info!(job = %id, "job deleted");
        self.0.touched(&id);
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::Job>, Status> {
        self.0.authorize(&req, Role::Operator)?;
        let r = req.into_inner();
        let v = self.0.core().cancel(&r.job_id, &r.reason, now_ms()).map_err(status)?;
        tracing::info!(job = %r.job_id, "job cancelled");
        self.0.touched(&r.job_id);
        Ok(Response::new(job_pb(&v)))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        self.0.authorize(&req, Role::Reader)?;
        let slot = self.0.watch_slot(&req)?;
        let id = req.into_inner().job_id;
        let state = self.0.clone();
        let mut rx = state.events.subscribe();
        let first = state.core().get(&id).map_err(status)?;
        let stream = async_stream(move |tx| async move {
            let _slot = slot;
            let mut seen_metrics = first.metrics.len();
            let mut done = first.record.state().is_terminal();
            if tx.send(Ok(pb::JobEvent { event: Some(pb::job_event::Event::Status(job_pb(&first))) })).await.is_err() {
                return;
            }
            while !done {
                // A client that went away ends the stream (and frees its slot) at once, not at
                // the job's next change.
                let next = tokio::select! {
                    r = rx.recv() => r,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(changed) if changed != id => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                let Ok(v) = state.core().get(&id) else { return };
                for m in &v.metrics[seen_metrics.min(v.metrics.len())..] {
                    let ev = pb::JobEvent { event: Some(pb::job_event::Event::Metrics(pb::EpochMetrics::from(m))) };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                seen_metrics = v.metrics.len();
                done = v.record.state().is_terminal();
                if tx.send(Ok(pb::JobEvent { event: Some(pb::job_event::Event::Status(job_pb(&v))) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::JobEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[derive(Clone)]
pub struct WorkersService(pub Arc<State>);

#[tonic::async_trait]
impl Workers for WorkersService {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        self.0.authorize_worker(&req, &req.get_ref().job_id)?;
        // Counted before anything changes: a refused join leaves no trace.
        let max = self.0.limits().max_pending_joins;
        if self.0.pending_joins.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= max {
            self.0.pending_joins.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return Err(Status::resource_exhausted(format!(
                "{max} joins are already waiting for their groups, the most (--max-pending-joins {max}); try again"
            )));
        }
        let _slot = JoinSlot(&self.0.pending_joins);
        let r = req.into_inner();
        let info = join_info(&r);
        self.0.core().join_with(&r.job_id, &info, Instant::now(), now_ms()).map_err(status)?;
        tracing::info!(job = %r.job_id, worker = %r.worker_id, addr = %r.collective_addr, "worker joined");
        self.0.touched(&r.job_id);
        loop {
            // Register interest before checking, so a change between the check and the wait is seen.
            let notified = self.0.changed.notified();
            let poll = self.0.core().poll_join(&r.job_id, &r.worker_id, Instant::now(), now_ms());
            match poll {
                Ok(JoinPoll::Ready(a)) => {
                    self.0.touched(&r.job_id);
                    return Ok(Response::new(pb::JoinResponse {
                        rank: a.rank,
                        world_size: a.world_size,
                        peer_addrs: a.peers,
                        collective: a.collective,
                        nccl_unique_id: a.nccl_unique_id,
                        spec_toml: a.spec_toml,
                        start_epoch: 0,
                        start_step: 0,
                        generation: a.generation,
                        source_rank: a.source_rank,
                        cursor: Some(cursor_to_proto(&a.cursor)),
                        resume_from: a.resume_from.unwrap_or_default(),
                        ring_secret: a.ring_secret,
                    }));
                }
                Ok(JoinPoll::Waiting { until }) => {
                    let wait = until.map_or(Duration::from_secs(1), |u| u.saturating_duration_since(Instant::now()));
                    let _ = tokio::time::timeout(wait.min(Duration::from_secs(1)), notified).await;
                }
                Err(e) => {
                    self.0.touched(&r.job_id);
                    return Err(status(e));
                }
            }
        }
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let telemetry = r.telemetry.map(telemetry_of);
        let cmd = self.0.core().heartbeat(&r.job_id, &r.worker_id, telemetry, Instant::now()).map_err(status)?;
        Ok(Response::new(match cmd {
            Command::Continue => {
                pb::HeartbeatResponse { command: pb::WorkerCommand::Continue as i32, reason: String::new() }
            }
            Command::Stop { reason } => pb::HeartbeatResponse { command: pb::WorkerCommand::Stop as i32, reason },
            Command::Reform { reason } => pb::HeartbeatResponse { command: pb::WorkerCommand::Reform as i32, reason },
        }))
    }

    async fn get_epoch_plan(&self, req: Request<pb::EpochPlanRequest>) -> Result<Response<pb::EpochPlan>, Status> {
        let r = req.into_inner();
        let p = {
            let core = self.0.core();
            core.check_member(&r.job_id, &r.worker_id, r.rank, r.generation).map_err(status)?;
            core.epoch_plan(&r.job_id, r.epoch).map_err(status)?
        };
        Ok(Response::new(pb::EpochPlan {
            epoch: p.epoch,
            seed: p.seed,
            num_samples: p.num_samples,
            world_size: p.world_size,
            batch_size: p.batch_size,
            steps: p.steps,
            stage: p.stage.as_ref().map(stage_to_proto),
            affinity_epoch: p.affinity_epoch,
            read_block: p.blocks.map(|b| b.0),
            shuffle_window: p.blocks.map(|b| b.1),
            cut: p.cut.as_ref().map(cut_to_proto),
        }))
    }

    async fn report_progress(&self, req: Request<pb::ProgressReport>) -> Result<Response<pb::ProgressAck>, Status> {
        let r = req.into_inner();
        let p = r.progress.unwrap_or_default();
        let m = r.metrics.as_ref().map(EpochMetrics::from);
        {
            let mut core = self.0.core();
            core.check_member(&r.job_id, &r.worker_id, r.rank, r.generation).map_err(status)?;
            core.report_progress(&r.job_id, r.rank, p.epoch, p.step, p.samples_done, m, now_ms()).map_err(status)?;
        }
        self.0.touched(&r.job_id);
        Ok(Response::new(pb::ProgressAck {}))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let r = req.into_inner();
        if r.graceful {
            self.0.core().leave_gracefully(&r.job_id, &r.worker_id, &r.error, Instant::now(), now_ms())
        } else {
            self.0.core().leave(&r.job_id, &r.worker_id, r.succeeded, &r.error, Instant::now(), now_ms())
        }
        .map_err(status)?;
        tracing::info!(job = %r.job_id, worker = %r.worker_id, succeeded = r.succeeded, "worker left");
        self.0.touched(&r.job_id);
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

/// Serves both services on `listener` until `shutdown` resolves, over mutual TLS when `tls` is
/// given (see `tls.rs`); sweeps liveness (and flushes the store) every second, and flushes the
/// store once more on the way out.
/// The name under which [`health_service`] reports readiness.
pub const READY_SERVICE: &str = "thaw.v1.Jobs";

/// The gRPC health protocol (`grpc.health.v1`), for Kubernetes probes and `thaw health`:
/// - `""` is SERVING while the process serves (liveness);
/// - [`READY_SERVICE`] is SERVING when calls can be answered usefully: by the leader (or the only
///   coordinator), or by a standby that knows where the leader is; NOT_SERVING while nobody is
///   known to lead or this leader's lease ran out (readiness). Checked every second.
///
/// Health calls need no token: they reveal one bit. Over TLS they are answered like any call;
/// `thaw coordinator --health-listen` also serves them alone in plaintext, since kubelet's gRPC
/// probes cannot present a client certificate.
pub fn health_service(
    state: Arc<State>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, server) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = None;
        loop {
            tick.tick().await;
            let ready = state.ready();
            if last != Some(ready) {
                let status = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(READY_SERVICE, status).await;
                last = Some(ready);
            }
        }
    });
    server
}

/// Serves `GET /metrics` (Prometheus text format, [`State::metrics_text`]) and the web view
/// ([`crate::web`]) on `listener` until `shutdown`. Read-only.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let web = crate::web::routes(state.clone());
    let app = axum::Router::new().merge(web).route(
        "/metrics",
        get(move || {
            let state = state.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    state.metrics_text(),
                )
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Serves [`health_service`] alone on `listener`, in plaintext, until `shutdown`.
pub async fn serve_health(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(health_service(state))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<crate::tls::ServerTls>>,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let sweeper = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                state.sweep();
            }
        })
    };
    let max = thaw_proto::MAX_MESSAGE_BYTES;
    // A standby (or a leader whose lease ran out) answers every call with where the leader is.
    let gate = |state: Arc<State>| {
        move |req: Request<()>| match state.refusal() {
            Some(s) => Err(s),
            None => Ok(req),
        }
    };
    let rpc = state.rpc.clone();
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(tower::layer::layer_fn(move |inner| Timed { inner, rpc: rpc.clone() }))
        .add_service(health_service(state.clone()))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            JobsServer::new(JobsService(state.clone())).max_decoding_message_size(max).max_encoding_message_size(max),
            gate(state.clone()),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            WorkersServer::new(WorkersService(state.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            gate(state.clone()),
        ));
    let result = match tls {
        Some(tls) => router.serve_with_incoming_shutdown(crate::tls::incoming(listener, tls), shutdown).await,
        None => {
            router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown).await
        }
    };
    sweeper.abort();
    let unsaved = state.core().flush(now_ms());
    if unsaved > 0 {
        tracing::error!(jobs = unsaved, "stopping with jobs the state store could not write");
    }
    result
}

/// A schedule stage as the worker protocol carries it.
pub fn stage_to_proto(s: &Stage) -> pb::FreezeStage {
    pb::FreezeStage {
        index: s.index as u32,
        first_epoch: s.epochs.start as u32,
        end_epoch: s.epochs.end as u32,
        trainable: s.trainable.clone(),
        group_lr: s.group_lr.clone(),
        bn_policy: s.bn.as_str().to_string(),
        warmup_steps: s.warmup_steps as u64,
        lr_schedule: s.lr_schedule.as_str().to_string(),
    }
}

/// The stage a coordinator sent, checked.
pub fn stage_from_proto(p: &pb::FreezeStage) -> Result<Stage, String> {
    let bn = BnPolicy::parse(&p.bn_policy).ok_or_else(|| format!("unknown BatchNorm policy `{}`", p.bn_policy))?;
    let lr_schedule = match p.lr_schedule.as_str() {
        "constant" => LrSchedule::Constant,
        "cosine" => LrSchedule::Cosine,
        "one_cycle" => LrSchedule::OneCycle,
        other => return Err(format!("unknown lr schedule `{other}`")),
    };
    if p.trainable.len() != p.group_lr.len() || p.first_epoch >= p.end_epoch {
        return Err(format!(
            "malformed stage {}: {} groups, {} rates, epochs {}..{}",
            p.index,
            p.trainable.len(),
            p.group_lr.len(),
            p.first_epoch,
            p.end_epoch
        ));
    }
    Ok(Stage {
        index: p.index as usize,
        epochs: p.first_epoch as usize..p.end_epoch as usize,
        trainable: p.trainable.clone(),
        group_lr: p.group_lr.clone(),
        bn,
        warmup_steps: p.warmup_steps as usize,
        lr_schedule,
    })
}

/// A join request as the core takes it.
pub fn join_info(r: &pb::JoinRequest) -> JoinInfo<'_> {
    JoinInfo {
        worker_id: &r.worker_id,
        collective_addr: &r.collective_addr,
        num_samples: r.num_train_samples,
        nccl_unique_id: &r.nccl_unique_id,
        groups: &r.layer_groups,
        generation: r.generation,
        cursor: r.cursor.as_ref().map(cursor_from_proto),
        reason: &r.reason,
        failed: r.failed,
        closed_ranks: &r.closed_ranks,
    }
}

pub fn cut_to_proto(c: &Cut) -> pb::Cut {
    pb::Cut { base_world: c.base_world, base_steps: c.base_steps, offset: c.offset }
}

pub fn cut_from_proto(c: &pb::Cut) -> Cut {
    Cut { base_world: c.base_world, base_steps: c.base_steps, offset: c.offset }
}

pub fn cursor_to_proto(c: &EpochCursor) -> pb::EpochCursor {
    pb::EpochCursor { epoch: c.epoch, world: c.world, step: c.step, cut: c.cut.as_ref().map(cut_to_proto) }
}

pub fn cursor_from_proto(c: &pb::EpochCursor) -> EpochCursor {
    EpochCursor { epoch: c.epoch, world: c.world.max(1), step: c.step, cut: c.cut.as_ref().map(cut_from_proto) }
}

/// A heartbeat's telemetry as the core keeps it: non-finite figures become 0 and at most 64
/// learning rates are kept (a model has a handful of groups), so a worker cannot bloat the view.
fn telemetry_of(t: pb::RankTelemetry) -> crate::telemetry::RankTelemetry {
    let f = |x: f64| if x.is_finite() { x } else { 0.0 };
    crate::telemetry::RankTelemetry {
        steps: t.steps,
        step_seconds: f(t.step_seconds),
        data_wait_seconds: f(t.data_wait_seconds),
        allreduce_seconds: f(t.allreduce_seconds),
        allreduce_exposed_seconds: f(t.allreduce_exposed_seconds),
        samples: t.samples,
        skipped: t.skipped,
        loss: f(t.loss),
        group_lr: t.group_lr.into_iter().take(64).map(f).collect(),
        stage: t.stage,
    }
}
