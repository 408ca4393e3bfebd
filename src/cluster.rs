//! The cluster commands: `coordinator`, `worker`, `submit`, `status`, `watch`, `cancel`, and
//! `launch` (an in-process coordinator plus N local worker processes, like `torchrun --standalone`).
//! Thin: they parse, call the coordinator over gRPC or the worker agent, and print.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use thaw_coordinator::client::JobsApi;
use thaw_coordinator::service::{self, State};
use thaw_coordinator::spec::JobSpec;
use thaw_coordinator::store::FileStore;
use thaw_proto::v1 as pb;
use thaw_worker::device::DeviceRequest;
use thaw_worker::train::DistEnd;

pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// A client of the coordinator that answers among `list` (comma-separated URLs): each is asked
/// about no job in particular (a leader answers NOT_FOUND; a standby UNAVAILABLE, naming the
/// leader, which is followed). While none leads (an election under way) it keeps asking for up
/// to 15 s.
async fn jobs_client(list: &str) -> Result<JobsApi> {
    let coords = thaw_coordinator::client::Coordinators::parse(list).map_err(|e| anyhow::anyhow!(e))?;
    leading_jobs_client(list, &coords).await
}

async fn leading_jobs_client(list: &str, coords: &thaw_coordinator::client::Coordinators) -> Result<JobsApi> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut c = coords.jobs();
        let answer = tokio::time::timeout(Duration::from_secs(5), c.get(pb::GetJobRequest { job_id: String::new() }))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within 5s")));
        let s = match answer {
            // A TLS handshake the coordinator refused (a certificate of another CA, an expired
            // one) does not heal by retrying: say so now, with the cause.
            Err(s) if thaw_coordinator::client::is_tls_refusal(&s) => {
                bail!("the TLS handshake with {list} failed: {}", thaw_coordinator::client::describe(&s))
            }
            Err(s) if s.code() == tonic::Code::Internal && list.contains("http://") && s.message().contains("h2 protocol") => {
                bail!(
                    "{list} does not speak plaintext gRPC ({}): a TLS coordinator needs https:// and THAW_TLS_DIR",
                    s.message()
                )
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
                ) =>
            {
                s
            }
            _ => return Ok(c),
        };
        let followed = coords.after_error(&s) && s.metadata().contains_key(service::LEADER_HEADER);
        if Instant::now() > deadline {
            bail!("cannot reach a coordinator that leads at {list}: {}", thaw_coordinator::client::describe(&s));
        }
        if !followed {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Pending => "pending",
        pb::JobState::Rendezvous => "rendezvous",
        pb::JobState::Running => "running",
        pb::JobState::Recovering => "recovering",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Unspecified => "unknown",
    }
}

fn is_terminal(s: i32) -> bool {
    matches!(state_name(s), "succeeded" | "failed" | "cancelled")
}

/// Exit status for a finished job: 0 succeeded, 1 failed, 130 cancelled.
fn exit_code(s: i32) -> i32 {
    match state_name(s) {
        "succeeded" => 0,
        "cancelled" => 130,
        _ => 1,
    }
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    let p = j.progress.unwrap_or_default();
    serde_json::json!({
        "id": j.id,
        "state": state_name(j.state),
        "progress": {"epoch": p.epoch, "step": p.step, "steps_per_epoch": p.steps_per_epoch, "samples_done": p.samples_done, "workers": p.workers, "generation": p.generation, "restarts": p.restarts},
        "transitions": j.transitions.iter().map(|t| serde_json::json!({"to": state_name(t.to), "reason": t.reason, "at_unix_ms": t.at_unix_ms})).collect::<Vec<_>>(),
        "metrics": j.metrics.iter().map(|m| serde_json::json!({"epoch": m.epoch, "train_loss": m.train_loss, "train_acc": m.train_acc, "val_loss": m.val_loss, "val_acc": m.val_acc, "images": m.images, "seconds": m.seconds})).collect::<Vec<_>>(),
    })
}

fn print_job(j: &pb::Job) {
    let p = j.progress.unwrap_or_default();
    let why = j.transitions.last().map(|t| t.reason.as_str()).unwrap_or("");
    println!(
        "{:<24} {:<10} workers {:>3}  gen {:>2}  restarts {:>2}  epoch {:>3}  step {:>6}/{:<6} {}",
        j.id,
        state_name(j.state),
        p.workers,
        p.generation,
        p.restarts,
        p.epoch + 1,
        p.step,
        p.steps_per_epoch,
        why
    );
}

/// Who may call a coordinator and how: its client tokens and TLS directory, or neither with
/// `--insecure`.
pub struct Security {
    pub tokens: Option<thaw_coordinator::auth::Tokens>,
    pub tls: Option<std::sync::Arc<thaw_coordinator::tls::ServerTls>>,
    pub insecure: bool,
    /// What it holds at most for its callers.
    pub limits: service::Limits,
    /// Where the plaintext health port listens, if anywhere (`--health-listen`).
    pub health_listen: Option<String>,
    /// Where `/metrics` is served, if anywhere (`--metrics-addr`).
    pub metrics_addr: Option<String>,
}

impl Security {
    /// Binds `--health-listen` and serves the health protocol there until shutdown.
    async fn spawn_health(&self, state: &std::sync::Arc<State>) -> Result<()> {
        let Some(addr) = &self.health_listen else { return Ok(()) };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-listen: cannot listen on {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "health endpoint listening (grpc.health.v1, plaintext)");
        tokio::spawn(service::serve_health(listener, state.clone(), shutdown_signal()));
        Ok(())
    }

    /// Binds `--metrics-addr` and serves `/metrics` there until shutdown.
    async fn spawn_metrics(&self, state: &std::sync::Arc<State>) -> Result<()> {
        let Some(addr) = &self.metrics_addr else { return Ok(()) };
        spawn_metrics(addr, state).await
    }
}

impl Security {
    /// `http` or `https`.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Refuses to serve on a non-loopback address without both tokens and TLS unless `--insecure`
    /// was given; an insecure exposed coordinator says so every minute.
    fn guard(&self, addr: std::net::SocketAddr, state: &std::sync::Arc<State>) -> Result<()> {
        state.set_limits(self.limits);
        if let Some(t) = &self.tokens {
            state.require_tokens(t.clone());
        }
        let missing: Vec<&str> = [
            self.tokens.is_none().then_some("client tokens (--tokens FILE)"),
            self.tls.is_none().then_some("TLS (--tls DIR)"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if missing.is_empty() || addr.ip().is_loopback() {
            return Ok(());
        }
        if !self.insecure {
            bail!(
                "refusing to listen on {addr} without {}: anyone who reaches it could submit, cancel or join jobs, or read \
                 them off the wire. Give them (`thaw certs init` makes a TLS directory), or --insecure on a trusted network",
                missing.join(" and ")
            );
        }
        let missing = missing.join(", ");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                tracing::warn!(%addr, %missing, "INSECURE: this coordinator runs without security (--insecure)");
            }
        });
        Ok(())
    }
}

/// `thaw coordinator`: restores the jobs of `state_dir` (a `FileStore`; live jobs carry on) or
/// keeps them in memory (`None`), then serves until Ctrl-C / SIGTERM.
pub fn coordinator(
    listen: &str,
    state_dir: Option<&Path>,
    retention: Option<Duration>,
    security: &Security,
) -> Result<()> {
    let state = match state_dir {
        Some(dir) => {
            let store = FileStore::open(dir)
                .with_context(|| format!("cannot open the coordinator's state directory {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), "coordinator state");
            State::with_store(Box::new(store))
                .with_context(|| format!("cannot restore the jobs of {}", dir.display()))?
        }
        None => {
            tracing::warn!("jobs are kept in memory only (--store memory): they end with this process");
            State::new()
        }
    };
    state.set_retention(retention);
    let rt = runtime()?;
    rt.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        security.guard(addr, &state)?;
        security.spawn_health(&state).await?;
        security.spawn_metrics(&state).await?;
        tracing::info!(%addr, "coordinator listening");
        println!("coordinator listening on {}://{addr}", security.scheme());
        service::serve(listener, security.tls.clone(), state, shutdown_signal()).await?;
        tracing::info!("coordinator stopped");
        Ok(())
    })
}

/// `thaw coordinator --store etcd://...`: one of several coordinators on etcd. It serves as a
/// standby (every call answered UNAVAILABLE with the leader's URL) until it wins the election,
/// then takes the jobs from etcd and carries them on; it steps down to standby when it loses the
/// lease.
pub fn coordinator_ha(
    listen: &str,
    store: &str,
    prefix: &str,
    advertise: Option<&str>,
    lease_secs: i64,
    retention: Option<Duration>,
    security: &Security,
) -> Result<()> {
    use thaw_coordinator::etcd::{self, EtcdOptions, EtcdStore, Leadership, Takeover};
    let opts = EtcdOptions::parse(store, prefix, lease_secs).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
    struct Owner {
        state: std::sync::Arc<State>,
        opts: EtcdOptions,
        lead: std::sync::Arc<Leadership>,
    }
    impl Takeover for Owner {
        fn elected(&self) -> std::result::Result<(), String> {
            let store = EtcdStore::open(self.opts.clone(), self.lead.clone()).map_err(|e| e.to_string())?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let core = thaw_coordinator::core::Coordinator::restore(Box::new(store), Instant::now(), now_ms)
                .map_err(|e| format!("cannot load the jobs from etcd: {e}"))?;
            self.state.install(core);
            Ok(())
        }
        fn deposed(&self, why: &str) {
            tracing::warn!(reason = why, "standing by: this coordinator's jobs are dropped from memory");
            self.state.install(thaw_coordinator::core::Coordinator::new());
        }
    }
    let rt = runtime()?;
    // The election keeps its lease alive on a runtime of its own, however busy the services are.
    let election = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("thaw-election")
        .enable_all()
        .build()
        .context("starting the election runtime")?;
    let result = rt.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let me = advertise.map(str::to_string).unwrap_or_else(|| format!("{}://{addr}", security.scheme()));
        let lead = Leadership::new(&me);
        let state = State::standby(lead.clone());
        state.set_retention(retention);
        security.guard(addr, &state)?;
        security.spawn_health(&state).await?;
        security.spawn_metrics(&state).await?;
        let owner = std::sync::Arc::new(Owner { state: state.clone(), opts: opts.clone(), lead: lead.clone() });
        let campaign = election.spawn(etcd::campaign(opts.clone(), lead, owner));
        tracing::info!(%addr, advertise = %me, etcd = %opts.endpoints.join(","), prefix = %opts.prefix, "coordinator listening (standing by until elected)");
        println!("coordinator listening on {}://{addr}", security.scheme());
        service::serve(listener, security.tls.clone(), state, shutdown_signal()).await?;
        campaign.abort();
        tracing::info!("coordinator stopped");
        Ok(())
    });
    election.shutdown_background();
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Reads and validates a spec file (with `strategy = "auto"` resolved); the coordinator gets it
/// with absolute paths.
fn resolved_spec(path: &Path) -> Result<JobSpec> {
    crate::resolve_auto(JobSpec::from_file(path)?)
}

/// The submission of `spec`, resumed from the checkpoint `resume` when given: its path (made
/// absolute: every worker reads it) and the cursor in its metadata.
fn submission(spec: &JobSpec, resume: Option<&Path>) -> Result<pb::SubmitRequest> {
    let mut req = pb::SubmitRequest { spec_toml: spec.to_toml(), ..Default::default() };
    if let Some(ck) = resume {
        let ck = std::path::absolute(ck).with_context(|| format!("resolving {}", ck.display()))?;
        let cursor = thaw_worker::checkpoint::Checkpoint::cursor_of(&ck)
            .with_context(|| format!("cannot resume from {}", ck.display()))?;
        if cursor.epoch as usize >= spec.train.epochs {
            bail!(
                "{} is at the end of epoch {}: the job has {} epochs, nothing is left to train",
                ck.display(),
                cursor.epoch,
                spec.train.epochs
            );
        }
        eprintln!(
            "resuming from {}: epoch {} step {} (of a world of {})",
            ck.display(),
            cursor.epoch + 1,
            cursor.step,
            cursor.world
        );
        req.resume_from = ck.display().to_string();
        req.resume_cursor_json = serde_json::to_string(&cursor)?;
    }
    Ok(req)
}

/// `thaw submit [--resume CKPT]`.
pub fn submit(spec: &Path, url: &str, resume: Option<&Path>) -> Result<()> {
    let spec = resolved_spec(spec)?;
    let req = submission(&spec, resume)?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = jobs_client(url).await?;
        let r = c.submit(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        let r = r.into_inner();
        println!("{}", r.job_id);
        if !r.job_token.is_empty() {
            eprintln!(
                "worker credential of `{}` (give it to its workers as THAW_JOB_TOKEN): {}",
                r.job_id, r.job_token
            );
        }
        Ok(())
    })
}

/// `thaw status [JOB] [--limit N --after ID]`: one job, one page of jobs (in id order), or every
/// job, fetched a page of 100 at a time.
pub fn status(job: Option<&str>, url: &str, json: bool, limit: Option<u32>, after: Option<&str>) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = jobs_client(url).await?;
        let jobs = match job {
            Some(id) => vec![c
                .get(pb::GetJobRequest { job_id: id.into() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()],
            None => {
                let mut jobs = Vec::new();
                let mut token = after.unwrap_or_default().to_string();
                loop {
                    let page_size = limit.unwrap_or(100);
                    let r = c
                        .list(pb::ListJobsRequest { page_size, page_token: token.clone() })
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                        .into_inner();
                    jobs.extend(r.jobs);
                    token = r.next_page_token;
                    if token.is_empty() {
                        break;
                    }
                    if limit.is_some() {
                        eprintln!("more: thaw status --limit {page_size} --after {token}");
                        break;
                    }
                }
                jobs
            }
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&jobs.iter().map(job_json).collect::<Vec<_>>())?);
        } else {
            for j in &jobs {
                print_job(j);
            }
        }
        Ok(())
    })
}

/// `thaw delete JOB`: forgets a finished job (its record and metrics; not its output files).
pub fn delete(job: &str, url: &str) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = jobs_client(url).await?;
        c.delete(pb::DeleteRequest { job_id: job.into() }).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        println!("deleted {job}");
        Ok(())
    })
}

/// `thaw cancel JOB`.
pub fn cancel(job: &str, url: &str) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = jobs_client(url).await?;
        let j = c
            .cancel(pb::CancelRequest { job_id: job.into(), reason: "cancelled with thaw cancel".into() })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        print_job(&j);
        Ok(())
    })
}

/// Follows a job's events until it ends, with a progress bar (or periodic lines) and a metrics
/// line per epoch; returns the final job.
async fn follow(c: &mut JobsApi, job: &str, json: bool) -> Result<pb::Job> {
    let mut stream = c
        .watch(pb::WatchRequest { job_id: job.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let term = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = ProgressBar::with_draw_target(
        None,
        if term { ProgressDrawTarget::stderr_with_hz(4) } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {per_sec} ETA {eta} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut last = None;
    let mut last_line = Instant::now();
    let mut epoch_seen = u32::MAX;
    while let Some(ev) = stream.message().await.map_err(|s| anyhow::anyhow!("watch: {}", s.message()))? {
        match ev.event {
            Some(pb::job_event::Event::Metrics(m)) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"epoch": m.epoch, "train_loss": m.train_loss, "train_acc": m.train_acc, "val_loss": m.val_loss, "val_acc": m.val_acc, "images": m.images, "seconds": m.seconds})
                    );
                } else {
                    bar.suspend(|| {
                        println!(
                            "epoch {:>3}  train_loss {:.4}  train_acc {:.4}  val_loss {:.4}  val_acc {:.4}  images {}  {:.1}s",
                            m.epoch, m.train_loss, m.train_acc, m.val_loss, m.val_acc, m.images, m.seconds
                        )
                    });
                }
            }
            Some(pb::job_event::Event::Status(j)) => {
                let p = j.progress.unwrap_or_default();
                if p.epoch != epoch_seen && p.steps_per_epoch > 0 {
                    epoch_seen = p.epoch;
                    bar.reset();
                    bar.set_length(p.steps_per_epoch);
                    bar.set_prefix(format!("epoch {}", p.epoch + 1));
                }
                bar.set_position(p.step);
                bar.set_message(format!("{} ({} workers)", state_name(j.state), p.workers));
                if !term && !json && last_line.elapsed() >= Duration::from_secs(10) {
                    last_line = Instant::now();
                    eprintln!(
                        "{}: {} epoch {} step {}/{}",
                        j.id,
                        state_name(j.state),
                        p.epoch + 1,
                        p.step,
                        p.steps_per_epoch
                    );
                }
                let done = is_terminal(j.state);
                last = Some(j);
                if done {
                    break;
                }
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    last.context("the coordinator closed the watch without a status")
}

/// `thaw watch JOB`: exit status follows the job's end state.
pub fn watch(job: &str, url: &str, json: bool) -> Result<i32> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = jobs_client(url).await?;
        let j = follow(&mut c, job, json).await?;
        print_job(&j);
        Ok(exit_code(j.state))
    })
}

/// `thaw worker`: one worker process of a job.
/// Exit statuses of `thaw worker`, for supervisors (a Kubernetes Job's `podFailurePolicy`):
/// 0 the job finished, or this worker left it gracefully; 1 a failure that starting the worker
/// again may cure (the coordinator unreachable past `--connect-timeout-secs`, a lost group, a
/// crash); [`EXIT_PERMANENT`] the job can never run on this worker; [`EXIT_JOB_ENDED`] the job
/// ended (failed or cancelled) while this worker was in it.
pub const EXIT_PERMANENT: i32 = 3;
pub const EXIT_JOB_ENDED: i32 = 4;

/// `thaw worker`: joins the job and trains until it ends; returns the exit status.
pub fn worker(
    url: &str,
    job: &str,
    worker_id: Option<String>,
    bind_host: &str,
    device: tch::Device,
    connect_wait: Option<Duration>,
) -> Result<i32> {
    if let Some(n) = std::env::var("THAW_TORCH_THREADS").ok().and_then(|s| s.parse::<i32>().ok()) {
        tch::set_num_threads(n.max(1));
    }
    let worker_name = worker_id.unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()));
    let out = match thaw_worker::agent::run(thaw_worker::agent::AgentOptions {
        coordinator: url.to_string(),
        job: job.to_string(),
        worker_name,
        bind_host: bind_host.to_string(),
        device,
        connect_attempts: 5,
        connect_wait,
    }) {
        Ok(out) => out,
        Err(e) => {
            let code = if e.is_permanent() { EXIT_PERMANENT } else { 1 };
            eprintln!("error: {e}");
            return Ok(code);
        }
    };
    match out.outcome.end {
        DistEnd::Stopped(why) => {
            eprintln!("error: rank {} of {} stopped: {why}", out.rank, out.world_size);
            Ok(EXIT_JOB_ENDED)
        }
        DistEnd::Reform(why) => {
            eprintln!("error: rank {} of {} stopped: {why}", out.rank, out.world_size);
            Ok(1)
        }
        DistEnd::Left(why) => {
            eprintln!("rank {} left the group: {why}", out.rank);
            Ok(0)
        }
        DistEnd::Finished => {
            if out.rank == 0 {
                if let Some(m) = out.outcome.history.last() {
                    println!("final validation accuracy: {:.4}", m.val_acc);
                }
            }
            Ok(0)
        }
    }
}

/// Resolves when a worker not yet `done` exits, with its index and status.
async fn next_exit(children: &mut [Child], done: &[bool]) -> (usize, std::process::ExitStatus) {
    loop {
        for (i, ch) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Ok(Some(status)) = ch.try_wait() {
                return (i, status);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How `thaw launch` runs its workers.
pub struct LaunchOptions {
    /// Worker processes.
    pub nproc: u32,
    /// The job goes on while at least this many are left (default: all of them).
    pub min_nproc: Option<u32>,
    /// Workers the job admits in all (default: `nproc`): more than `nproc` lets workers started
    /// elsewhere (`thaw worker --job J --coordinator URL`) join the running job.
    pub max_nproc: Option<u32>,
    /// Worker processes that died are started again, up to this many times in all (torchrun's
    /// `--max-restarts`); also the job's failure budget when larger than the spec's.
    pub max_restarts: u32,
    /// A checkpoint to resume from (any world size wrote it).
    pub resume: Option<PathBuf>,
    /// Serve the launch's coordinator's `/metrics` on this address.
    pub metrics_addr: Option<String>,
    /// No ephemeral credentials: plaintext gRPC and no tokens (for comparisons and debugging).
    pub insecure: bool,
}

/// What `thaw launch` makes for its one job, unless `--insecure`: a CA and certificates that
/// live in a private temporary directory for as long as the launch (the coordinator's for
/// 127.0.0.1, one client certificate for the launcher and its workers), and an operator token.
/// The launch prints where they are, so that `thaw status` or an extra `thaw worker` (with
/// `--max-nproc`) can reach its coordinator from another shell of the same user.
struct Ephemeral {
    _dir: tempfile::TempDir,
    server: std::sync::Arc<thaw_coordinator::tls::ServerTls>,
    client: thaw_coordinator::tls::ClientTls,
    token: String,
}

impl Ephemeral {
    fn new() -> Result<Ephemeral> {
        use thaw_coordinator::tls::{Authority, ClientTls, ServerTls};
        let dir = tempfile::Builder::new().prefix("thaw-launch-").tempdir().context("creating a private directory")?;
        let ca = Authority::new("thaw launch (ephemeral)", 30).map_err(anyhow::Error::msg)?;
        let local = ["127.0.0.1".to_string(), "localhost".to_string()];
        ca.write_dir(&dir.path().join("coordinator"), "thaw-coordinator", &local, 30).map_err(anyhow::Error::msg)?;
        ca.write_dir(&dir.path().join("client"), "thaw-launch", &[], 30).map_err(anyhow::Error::msg)?;
        Ok(Ephemeral {
            server: ServerTls::load(&dir.path().join("coordinator")).map_err(anyhow::Error::msg)?,
            client: ClientTls::new(&dir.path().join("client")).map_err(anyhow::Error::msg)?,
            token: thaw_coordinator::auth::new_job_token(),
            _dir: dir,
        })
    }

    /// Writes the operator token and the job's worker credential next to the certificates;
    /// returns the environment that reaches the coordinator with them.
    fn publish(&self, job_token: &str) -> Result<String> {
        let root = self._dir.path();
        for (name, secret) in [("token", &self.token), ("job-token", &job_token.to_string())] {
            std::fs::write(root.join(name), secret).with_context(|| format!("writing {}", root.join(name).display()))?;
        }
        Ok(format!(
            "THAW_TLS_DIR={} THAW_TOKEN_FILE={} THAW_JOB_TOKEN_FILE={}",
            self.client.dir().display(),
            root.join("token").display(),
            root.join("job-token").display()
        ))
    }
}

/// `thaw launch --nproc N JOB.toml`: an in-process coordinator on 127.0.0.1 and N worker
/// processes; one combined progress display; exits with the job's status. A worker that dies is
/// started again while `--max-restarts` allows (it joins the running job and receives the
/// group's state); without restarts left the job goes on with the others down to `--min-nproc`,
/// and is cancelled below. Ctrl-C cancels the job (rank 0 checkpoints), waits for the workers,
/// and kills any that outlive the grace period.
pub fn launch(spec_path: &Path, opts: &LaunchOptions, device: DeviceRequest) -> Result<i32> {
    let nproc = opts.nproc;
    if nproc == 0 {
        bail!("--nproc 0: a job needs at least 1 worker");
    }
    // Every rank gets a device of its own, or nothing starts.
    let visible = thaw_worker::device::Visible::probe();
    let devices = thaw_worker::device::assign_launch(device, nproc as usize, &visible)?;
    let device_arg = device.to_string();
    let min_nproc = opts.min_nproc.unwrap_or(nproc);
    if min_nproc == 0 || min_nproc > nproc {
        bail!("--min-nproc {min_nproc}: must be between 1 and --nproc ({nproc})");
    }
    let max_nproc = opts.max_nproc.unwrap_or(nproc);
    if max_nproc < nproc {
        bail!("--max-nproc {max_nproc}: must be at least --nproc ({nproc})");
    }
    let mut spec = resolved_spec(spec_path)?;
    spec.distributed.min_workers = min_nproc;
    spec.distributed.max_workers = max_nproc;
    spec.distributed.max_restarts = spec.distributed.max_restarts.max(opts.max_restarts);
    let submit = submission(&spec, opts.resume.as_deref())?;
    let logs: PathBuf = spec.output.dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let rt = runtime()?;
    let exe = std::env::current_exe().context("locating the thaw binary")?;
    let ephemeral = if opts.insecure { None } else { Some(Ephemeral::new()?) };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let scheme = if ephemeral.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr()?);
        // The job lives and dies with this process: an in-memory store, nothing under THAW_HOME.
        let state = State::new();
        if let Some(addr) = &opts.metrics_addr {
            spawn_metrics(addr, &state).await?;
        }
        let mut credentials = thaw_coordinator::client::Credentials::default();
        if let Some(e) = &ephemeral {
            let line = format!("operator {} launch", e.token);
            state.require_tokens(thaw_coordinator::auth::Tokens::parse(&line, "launch").map_err(anyhow::Error::msg)?);
            credentials = credentials.with_tls(Some(e.client.clone())).with_token(&e.token).map_err(anyhow::Error::msg)?;
        }
        let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(service::serve(listener, ephemeral.as_ref().map(|e| e.server.clone()), state, async {
            let _ = server_stopped.await;
        }));
        let coords = thaw_coordinator::client::Coordinators::with_credentials(&url, credentials)
            .map_err(anyhow::Error::msg)?;
        let mut c = leading_jobs_client(&url, &coords).await?;
        let submitted = c.submit(submit).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
        let (id, job_token) = (submitted.job_id, submitted.job_token);
        if let Some(e) = &ephemeral {
            eprintln!("credentials (this launch's, private to you): {}", e.publish(&job_token)?);
        }
        eprintln!("job {id}: coordinator {url}, {nproc} workers, logs in {}", logs.display());
        if devices.iter().any(|d| d.is_cuda()) {
            let each: Vec<String> = devices
                .iter()
                .enumerate()
                .map(|(i, d)| match (d, d_physical(&visible, *d)) {
                    (tch::Device::Cuda(k), Some(p)) => format!("rank {i} on cuda:{k} (GPU {p})"),
                    (d, _) => format!("rank {i} on {}", device_name(*d)),
                })
                .collect();
            eprintln!("devices: {}", each.join(", "));
        }
        // Share the cores: each worker's libtorch gets its part instead of all of them.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let threads = (cores / nproc).max(1).to_string();
        let spawn = |i: u32| -> Result<Child> {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(logs.join(format!("worker-{i}.log")))?;
            let mut cmd = Command::new(&exe);
            cmd.args(["worker", "--coordinator", &url, "--job", &id, "--worker-id", &format!("local-{i}")])
                .args(["--device", &device_arg])
                // Like torchrun's LOCAL_RANK: the worker's device follows it (`--device cuda`).
                .env("THAW_LOCAL_RANK", i.to_string())
                .env("THAW_LOCAL_WORLD_SIZE", nproc.to_string())
                .env("THAW_TORCH_THREADS", &threads)
                // A worker presents its job's credential and the launch's client certificate, and
                // nothing of the caller's.
                .env_remove("THAW_TOKEN")
                .env_remove("THAW_TOKEN_FILE")
                .env_remove("THAW_TLS_DIR")
                .env_remove("THAW_JOB_TOKEN")
                .env_remove("THAW_JOB_TOKEN_FILE");
            if let Some(e) = &ephemeral {
                cmd.env("THAW_TLS_DIR", e.client.dir()).env("THAW_JOB_TOKEN", &job_token);
            }
            cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting a worker process")
        };
        let mut children: Vec<Child> = (0..nproc).map(&spawn).collect::<Result<_>>()?;
        let mut done = vec![false; children.len()];
        let mut restarts_left = opts.max_restarts;
        let mut follower = c.clone();
        let follow_job = id.clone();
        let mut followed = tokio::spawn(async move { follow(&mut follower, &follow_job, false).await });
        let mut failed_worker = None;
        let final_job = loop {
            tokio::select! {
                r = &mut followed => break r??,
                _ = shutdown_signal() => {
                    eprintln!("interrupted: cancelling job {id} (rank 0 checkpoints), waiting for the workers");
                    let _ = c.cancel(pb::CancelRequest { job_id: id.clone(), reason: "interrupted (Ctrl-C)".into() }).await;
                    break followed.await??;
                }
                (i, status) = next_exit(&mut children, &done) => {
                    done[i] = true;
                    if status.success() {
                        continue; // it left gracefully, or the job is ending
                    }
                    let alive = done.iter().filter(|d| !**d).count() as u32;
                    // A worker that can never run the job, or whose job ended, is not restarted.
                    let retryable = !matches!(status.code(), Some(EXIT_PERMANENT | EXIT_JOB_ENDED));
                    if retryable && restarts_left > 0 {
                        restarts_left -= 1;
                        eprintln!("worker {i} exited with {status}; starting it again ({restarts_left} restarts left)");
                        children[i] = spawn(i as u32)?;
                        done[i] = false;
                    } else if alive >= min_nproc {
                        eprintln!("worker {i} exited with {status}; the job goes on with {alive} workers");
                    } else {
                        // The group can never form or finish: end the job now instead of waiting
                        // for a timeout.
                        let reason = format!("worker {i} exited with {status}");
                        let _ = c.cancel(pb::CancelRequest { job_id: id.clone(), reason: reason.clone() }).await;
                        failed_worker = Some(i);
                        break followed.await??;
                    }
                }
            }
        };
        // Workers leave on their own once the job ends; give them a grace period, then kill.
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, ch) in children.iter_mut().enumerate() {
            loop {
                match ch.try_wait()? {
                    Some(s) => {
                        if !s.success() && exit_code(final_job.state) == 0 {
                            eprintln!(
                                "worker {i} exited with {s}; see {}",
                                logs.join(format!("worker-{i}.log")).display()
                            );
                        }
                        break;
                    }
                    None if Instant::now() > deadline => {
                        eprintln!("worker {i} did not exit in time; killing it");
                        let _ = ch.kill();
                        let _ = ch.wait();
                        break;
                    }
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        let _ = stop_server.send(());
        let _ = server.await;
        print_job(&final_job);
        if let Some(i) = failed_worker {
            let log = logs.join(format!("worker-{i}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            eprintln!("worker {i} failed; the end of {}:", log.display());
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
            return Ok(1);
        }
        if let Some(m) = final_job.metrics.last() {
            println!("final validation accuracy: {:.4}", m.val_acc);
        }
        println!("curves: tensorboard --logdir {}", spec.output.dir.join("tb").display());
        if exit_code(final_job.state) == 1 {
            eprintln!("worker logs: {}", logs.display());
        }
        Ok(exit_code(final_job.state))
    })
}

/// `cpu` or `cuda:K`, as `--device` spells it.
fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".into(),
    }
}

/// The physical id of a GPU where CUDA_VISIBLE_DEVICES names it.
fn d_physical(visible: &thaw_worker::device::Visible, d: tch::Device) -> Option<String> {
    match d {
        tch::Device::Cuda(k) => visible.physical(k),
        _ => None,
    }
}

/// `thaw health ADDR`: one grpc.health.v1 check; Ok when SERVING, an error naming the status
/// (or why no answer came) otherwise.
pub fn health(addr: &str, service: &str, timeout_secs: f64) -> Result<()> {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    if !(timeout_secs > 0.0 && timeout_secs.is_finite()) {
        bail!("--timeout-secs {timeout_secs}: must be positive");
    }
    let timeout = Duration::from_secs_f64(timeout_secs);
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    runtime()?.block_on(async {
        let answer = tokio::time::timeout(timeout, async {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?.connect().await?;
            let reply = HealthClient::new(channel).check(HealthCheckRequest { service: service.to_string() }).await?;
            anyhow::Ok(reply.into_inner().status())
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {url} within {timeout_secs} s"))?
        .with_context(|| format!("health check of {url}"))?;
        if answer != ServingStatus::Serving {
            bail!("{url}: service {service:?} is {}", answer.as_str_name());
        }
        println!("{url}: {service:?} SERVING");
        Ok(())
    })
}

/// `thaw worker --local-ranks K`: this process runs K workers, itself again with the same
/// arguments and `THAW_LOCAL_RANK=i` (so `--device cuda` gives each its GPU) and worker ids
/// `ID-i`; SIGTERM and SIGINT are passed on to them; the exit status is the first non-zero one of
/// theirs, or 0.
pub fn local_ranks(k: u32, worker_id: Option<&str>) -> Result<i32> {
    if k == 0 || k > 64 {
        bail!("--local-ranks {k}: must be between 1 and 64");
    }
    let exe = std::env::current_exe().context("locating the thaw binary")?;
    // Our own arguments, without --local-ranks and --worker-id (set per child below).
    let mut args = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--local-ranks" || a == "--worker-id" {
            it.next();
        } else if !(a.starts_with("--local-ranks=") || a.starts_with("--worker-id=")) {
            args.push(a);
        }
    }
    let base = worker_id
        .map(str::to_string)
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let mut children = Vec::new();
    for i in 0..k {
        let child = Command::new(&exe)
            .args(&args)
            .args(["--worker-id", &format!("{base}-{i}")])
            .env("THAW_LOCAL_RANK", i.to_string())
            .env("THAW_LOCAL_WORLD_SIZE", k.to_string())
            .spawn()
            .with_context(|| format!("starting local rank {i}"))?;
        children.push(child);
    }
    let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    let rt = runtime()?;
    rt.spawn(async move {
        shutdown_signal().await;
        tracing::info!(ranks = pids.len(), "passing the signal on to the local ranks");
        for pid in pids {
            // SAFETY: kill(2) on our own children's pids.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    });
    let mut code = 0;
    for (i, mut c) in children.into_iter().enumerate() {
        let status = c.wait().with_context(|| format!("waiting for local rank {i}"))?;
        let this = status.code().unwrap_or(1);
        if code == 0 && this != 0 {
            code = this;
        }
    }
    Ok(code)
}

/// Serves `/metrics` for `state` on `addr` until shutdown; says where on stderr.
async fn spawn_metrics(addr: &str, state: &std::sync::Arc<State>) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr: cannot listen on {addr}"))?;
    let at = listener.local_addr()?;
    tracing::info!(addr = %at, "metrics at http://{at}/metrics");
    eprintln!("metrics: http://{at}/metrics");
    tokio::spawn(service::serve_metrics(listener, state.clone(), shutdown_signal()));
    Ok(())
}
