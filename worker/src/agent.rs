//! The worker agent: one process of a data-parallel job. It asks the coordinator for the job,
//! prepares it (every check before joining), joins the rendezvous, forms the collective with its
//! peers, heartbeats on the control plane, and trains its share with
//! [`Trainer::run_distributed`].
//!
//! gRPC runs on a small tokio runtime owned by the agent; training runs on the calling thread,
//! which only ever `block_on`s short control calls between steps, never the other way round.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use thaw_coordinator::core::PlanInfo;
use thaw_coordinator::plan::EpochPlan;
use thaw_coordinator::spec::{CollectiveKind, JobSpec};
use thaw_proto::v1 as pb;
use thaw_proto::v1::jobs_client::JobsClient;
use thaw_proto::v1::workers_client::WorkersClient;
use tonic::transport::Channel;

use crate::checkpoint::EpochMetrics;
use crate::collective::{Collective, RingCollective};
use crate::train::{Control, DistOutcome, TrainError, Trainer};
use thaw_coordinator::service::stage_from_proto;
use thaw_coordinator::spec::Stage;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the coordinator at {url} after {attempts} attempts: {last}")]
    Unreachable { url: String, attempts: u32, last: String },
    #[error("coordinator refused {what}: {message}")]
    Rpc { what: &'static str, message: String },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("{0}")]
    Setup(String),
}

fn rpc(what: &'static str) -> impl Fn(tonic::Status) -> AgentError {
    move |s| AgentError::Rpc { what, message: s.message().to_string() }
}

pub struct AgentOptions {
    /// The coordinator, e.g. `http://127.0.0.1:7070`.
    pub coordinator: String,
    pub job: String,
    /// Unique per worker process.
    pub worker_id: String,
    /// Host this worker's collective listens on (a port is chosen).
    pub bind_host: String,
    pub device: tch::Device,
    /// Attempts to reach the coordinator before giving up (with backoff and jitter).
    pub connect_attempts: u32,
}

/// What the run amounted to, for the exit status.
pub struct AgentOutcome {
    pub rank: u32,
    pub world_size: u32,
    pub outcome: DistOutcome,
}

struct Clients {
    jobs: JobsClient<Channel>,
    workers: WorkersClient<Channel>,
}

async fn connect(url: &str, attempts: u32) -> Result<Clients, AgentError> {
    let attempts = attempts.max(1);
    let mut last = String::new();
    for i in 0..attempts {
        match Channel::from_shared(url.to_string()) {
            Err(e) => return Err(AgentError::Setup(format!("bad coordinator url `{url}`: {e}"))),
            Ok(ep) => match ep.connect_timeout(Duration::from_secs(5)).connect().await {
                Ok(ch) => {
                    let max = thaw_proto::MAX_MESSAGE_BYTES;
                    return Ok(Clients {
                        jobs: JobsClient::new(ch.clone()).max_decoding_message_size(max),
                        workers: WorkersClient::new(ch).max_decoding_message_size(max),
                    });
                }
                Err(e) => {
                    last = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
                    tracing::warn!(url, attempt = i + 1, attempts, error = %last, "coordinator not reachable yet");
                }
            },
        }
        if i + 1 < attempts {
            // Exponential backoff with jitter, capped at 5 s.
            let base = (200u64 << i.min(5)).min(5_000);
            let jitter = rand::rng().random_range(0..=base / 2);
            tokio::time::sleep(Duration::from_millis(base + jitter)).await;
        }
    }
    Err(AgentError::Unreachable { url: url.to_string(), attempts, last })
}

struct GrpcControl {
    rt: Arc<tokio::runtime::Runtime>,
    workers: WorkersClient<Channel>,
    job: String,
    rank: u32,
    stop: Arc<Mutex<Option<String>>>,
    /// The stage the coordinator sent with the last epoch plan.
    stage: Option<(u32, pb::FreezeStage)>,
}

impl Control for GrpcControl {
    fn epoch_plan(&mut self, epoch: u32) -> Result<EpochPlan, TrainError> {
        let req = pb::EpochPlanRequest { job_id: self.job.clone(), rank: self.rank, epoch };
        let mut w = self.workers.clone();
        let p = self
            .rt
            .block_on(w.get_epoch_plan(req))
            .map_err(|s| TrainError::Invalid(format!("epoch plan {epoch}: {}", s.message())))?
            .into_inner();
        self.stage = p.stage.clone().map(|s| (epoch, s));
        let info = PlanInfo {
            seed: p.seed,
            epoch: p.epoch,
            num_samples: p.num_samples,
            world_size: p.world_size,
            batch_size: p.batch_size,
            steps: p.steps,
            stage: None,
            affinity_epoch: p.affinity_epoch,
            blocks: p.read_block.zip(p.shuffle_window),
        };
        info.plan().map_err(|e| TrainError::Invalid(e.to_string()))
    }

    fn stage(&mut self, epoch: u32) -> Option<Stage> {
        let (at, stage) = self.stage.as_ref().filter(|(at, _)| *at == epoch)?;
        match stage_from_proto(stage) {
            Ok(stage) => Some(stage),
            Err(e) => {
                // The local expansion of the same spec takes over; say so.
                tracing::warn!(epoch = at + 1, error = %e, "ignoring a malformed stage from the coordinator");
                None
            }
        }
    }

    fn progress(&mut self, epoch: u32, step: u64, samples_done: u64, metrics: Option<&EpochMetrics>) {
        let req = pb::ProgressReport {
            job_id: self.job.clone(),
            rank: self.rank,
            progress: Some(pb::Progress { epoch, step, steps_per_epoch: 0, samples_done, workers: 0 }),
            metrics: metrics.map(pb::EpochMetrics::from),
        };
        let mut w = self.workers.clone();
        if let Err(e) = self.rt.block_on(w.report_progress(req)) {
            tracing::warn!(error = %e.message(), "progress report failed");
        }
    }

    fn stop_requested(&self) -> Option<String> {
        self.stop.lock().map(|s| s.clone()).unwrap_or(None)
    }
}

/// Runs one worker of `opts.job` to the end.
pub fn run(opts: AgentOptions) -> Result<AgentOutcome, AgentError> {
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("thaw-control")
            .enable_all()
            .build()
            .map_err(|e| AgentError::Setup(format!("cannot start the control runtime: {e}")))?,
    );
    let mut clients = rt.block_on(connect(&opts.coordinator, opts.connect_attempts))?;
    let job = rt
        .block_on(clients.jobs.get(pb::GetJobRequest { job_id: opts.job.clone() }))
        .map_err(rpc("the job lookup"))?
        .into_inner();
    let spec = JobSpec::from_toml(&job.spec_toml, std::path::Path::new("/")).map_err(TrainError::from)?;
    let nccl = spec.distributed.collective == CollectiveKind::Nccl;
    // Before anything heavy: a job that wants NCCL fails here, clearly, where NCCL cannot run.
    let nccl_unique_id = if nccl { nccl_offer()? } else { Vec::new() };
    let timeout = Duration::from_secs_f64(spec.distributed.collective_timeout_secs);
    let bucket_bytes = (spec.distributed.bucket_mb * 1024.0 * 1024.0) as usize;
    // Every check (data, weights, groups) happens before joining, so a bad worker never holds up
    // the group.
    let mut trainer = Trainer::prepare(spec, opts.device)?;
    let listener = TcpListener::bind((opts.bind_host.as_str(), 0))
        .map_err(|e| AgentError::Setup(format!("cannot listen on {}: {e}", opts.bind_host)))?;
    let addr = listener.local_addr().map_err(|e| AgentError::Setup(e.to_string()))?;
    let join = pb::JoinRequest {
        job_id: opts.job.clone(),
        worker_id: opts.worker_id.clone(),
        collective_addr: addr.to_string(),
        nccl_unique_id,
        num_train_samples: trainer.splits.train.len() as u64,
        layer_groups: trainer.net.group_names().iter().map(|g| g.to_string()).collect(),
    };
    let a = rt.block_on(clients.workers.join(join)).map_err(rpc("the join"))?.into_inner();
    tracing::info!(rank = a.rank, world_size = a.world_size, peers = ?a.peer_addrs, "joined");
    let peers: Vec<SocketAddr> = a
        .peer_addrs
        .iter()
        .map(|p| p.parse().map_err(|e| AgentError::Setup(format!("bad peer address `{p}`: {e}"))))
        .collect::<Result<_, _>>()?;
    let mut collective: Box<dyn Collective> = if nccl {
        drop(listener);
        nccl_group(a.rank, a.world_size, &a.nccl_unique_id, opts.device, timeout)?
    } else {
        let ring = RingCollective::connect(a.rank as usize, a.world_size as usize, listener, &peers, timeout)
            .map_err(TrainError::from)?;
        if let Some((to_next, from_prev)) = ring.transports() {
            tracing::info!(to_next, from_prev, "ring formed");
        }
        Box::new(ring)
    };

    // Heartbeats on the control runtime; a stop command or a lost coordinator sets the flag that
    // the training loop agrees on at the next step.
    let stop = Arc::new(Mutex::new(None::<String>));
    let hb = {
        let (stop, mut w, job, worker, rank) =
            (stop.clone(), clients.workers.clone(), opts.job.clone(), opts.worker_id.clone(), a.rank);
        rt.spawn(async move {
            let mut failures = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let req = pb::HeartbeatRequest { job_id: job.clone(), worker_id: worker.clone(), rank };
                let why = match w.heartbeat(req).await {
                    Ok(r) if r.get_ref().command == pb::WorkerCommand::Stop as i32 => Some(r.into_inner().reason),
                    Ok(_) => {
                        failures = 0;
                        None
                    }
                    Err(e) => {
                        failures += 1;
                        (failures >= 10).then(|| format!("lost the coordinator: {}", e.message()))
                    }
                };
                if let Some(why) = why {
                    if let Ok(mut s) = stop.lock() {
                        *s = Some(why);
                    }
                }
            }
        })
    };
    // Ctrl-C / SIGTERM: the same stop flag, so every rank stops at the next step and rank 0
    // checkpoints, instead of the process dying mid-step.
    let signals = {
        let stop = stop.clone();
        rt.spawn(async move {
            let why = wait_for_signal().await;
            tracing::warn!(signal = why, "stopping at the next step");
            if let Ok(mut s) = stop.lock() {
                s.get_or_insert_with(|| format!("worker received {why}"));
            }
        })
    };
    let mut ctl = GrpcControl {
        rt: rt.clone(),
        workers: clients.workers.clone(),
        job: opts.job.clone(),
        rank: a.rank,
        stop,
        stage: None,
    };
    let result = trainer.run_distributed(a.rank, collective.as_mut(), &mut ctl, bucket_bytes);
    hb.abort();
    signals.abort();
    drop(collective);
    let (succeeded, error) = match &result {
        Ok(o) => (o.stopped.is_none(), o.stopped.clone().unwrap_or_default()),
        Err(e) => (false, e.to_string()),
    };
    let leave = pb::LeaveRequest {
        job_id: opts.job.clone(),
        worker_id: opts.worker_id.clone(),
        rank: a.rank,
        succeeded,
        error,
    };
    if let Err(e) = rt.block_on(clients.workers.leave(leave)) {
        tracing::warn!(error = %e.message(), "could not tell the coordinator we left");
    }
    Ok(AgentOutcome { rank: a.rank, world_size: a.world_size, outcome: result? })
}

/// Resolves on SIGINT or SIGTERM with the signal's name.
async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// The NCCL unique id this worker offers the rendezvous (the first offered, rank 0's, is used).
#[cfg(feature = "nccl")]
fn nccl_offer() -> Result<Vec<u8>, AgentError> {
    crate::collective::nccl_available().map_err(TrainError::from)?;
    Ok(crate::collective::new_unique_id().map_err(TrainError::from)?)
}

#[cfg(not(feature = "nccl"))]
fn nccl_offer() -> Result<Vec<u8>, AgentError> {
    Err(AgentError::Setup(
        "the job asks for collective = \"nccl\", but this thaw was built without NCCL; build with \
         `cargo build --release --features nccl` (GPU machines) or use collective = \"ring\""
            .into(),
    ))
}

/// Forms the NCCL group on this worker's GPU.
#[cfg(feature = "nccl")]
fn nccl_group(
    rank: u32,
    world: u32,
    id: &[u8],
    device: tch::Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>, AgentError> {
    let ordinal = match device {
        tch::Device::Cuda(i) => i,
        other => {
            return Err(AgentError::Setup(format!(
                "collective \"nccl\" needs a CUDA device, the worker runs on {other:?}"
            )))
        }
    };
    let c = crate::collective::NcclCollective::new(rank as usize, world as usize, ordinal, id, timeout)
        .map_err(TrainError::from)?;
    Ok(Box::new(c))
}

#[cfg(not(feature = "nccl"))]
fn nccl_group(_: u32, _: u32, _: &[u8], _: tch::Device, _: Duration) -> Result<Box<dyn Collective>, AgentError> {
    nccl_offer().map(|_| unreachable!("nccl_offer always fails without the feature"))
}
