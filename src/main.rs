//! `thaw`: the command line. Parses arguments, sets up logging, and calls into the worker and
//! coordinator crates; no training logic lives here.

mod cluster;
mod k8s;
mod data_cli;
mod plan;
mod plot;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use thaw_coordinator::spec::{check_tta_sizes, JobSpec, SpecError};
use thaw_worker::device::{self, DeviceRequest};
use thaw_worker::data::idx::{IdxDataset, Split};
use thaw_worker::data::transform::Transform;
use thaw_worker::data::{folder::FolderDataset, Dataset};
use thaw_worker::predict::{extract_features, Classifier};
use thaw_worker::train::Trainer;
use thaw_worker::weights;
use thaw_worker::zoo::{Arch, Network};

#[derive(Parser)]
#[command(name = "thaw", version, about = "Transfer learning for computer vision, from one CPU to a GPU cluster")]
struct Cli {
    /// Log lines as text, or as one JSON object per line (for log shippers). `thaw launch`
    /// passes it on to its workers.
    #[arg(long, global = true, env = "THAW_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--device`: auto, cpu, cuda (local rank i on the i-th visible GPU) or cuda:K; the rules are in
/// `thaw_worker::device`.
#[derive(Clone, Copy, Debug)]
struct DeviceArg(DeviceRequest);

impl std::str::FromStr for DeviceArg {
    type Err = thaw_worker::device::DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(DeviceArg)
    }
}

impl DeviceArg {
    /// This process's device: the request for its local rank (`THAW_LOCAL_RANK`), against the
    /// GPUs libtorch sees.
    fn device(self) -> Result<tch::Device> {
        let local_rank = device::local_rank_from_env()?;
        Ok(device::assign(self.0, local_rank, &device::Visible::probe())?)
    }
}

#[derive(Subcommand)]
enum K8sCommand {
    /// Print the job's workers as Kubernetes objects (YAML): a headless Service, an Indexed Job
    /// and a NetworkPolicy; `kubectl apply -f -` takes them.
    Render {
        spec: PathBuf,
        #[command(flatten)]
        opts: k8s::RenderOptions,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    /// `idx` if the directory holds IDX files, else `folder`.
    Auto,
    Folder,
    Idx,
    /// Packed shards (`thaw data pack`).
    Shards,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a CA and certificates for the coordinator, the workers and the clients in DIR (one
    /// TLS directory each: ca.crt, tls.crt, tls.key). The coordinator's certificate names
    /// localhost, 127.0.0.1, ::1 and every --san.
    Init {
        dir: PathBuf,
        /// A DNS name (wildcards allowed: `*.thaw-coordinator.thaw.svc`) or IP address the
        /// coordinator is reached at; repeat for several.
        #[arg(long)]
        san: Vec<String>,
        /// Days the certificates are valid (the CA: twice as long).
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Sign a new certificate with the CA of CA_DIR (made by `certs init`) into the TLS directory
    /// OUT: a renewal (a coordinator reloads its files when they change) or one more identity.
    Issue {
        ca_dir: PathBuf,
        out: PathBuf,
        /// The certificate's common name, e.g. thaw-coordinator or thaw-worker.
        #[arg(long)]
        name: String,
        /// DNS names and IP addresses it is valid for (a coordinator's); repeat for several.
        #[arg(long)]
        san: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Train a job in this process: `thaw train JOB.toml`, or `thaw train --resume CHECKPOINT`.
    Train {
        /// The job spec (TOML).
        spec: Option<PathBuf>,
        /// Continue the run saved in this checkpoint (its spec is inside it).
        #[arg(long, conflicts_with = "spec")]
        resume: Option<PathBuf>,
        #[arg(long, default_value = "auto")]
        device: DeviceArg,
        /// Stop after this many steps (a checkpoint is written); resume later with --resume.
        #[arg(long)]
        max_steps: Option<usize>,
        /// End the run at the first step after this many seconds of training: that epoch is
        /// evaluated and checkpointed with the images it saw. For comparing strategies at equal cost.
        #[arg(long)]
        time_budget: Option<f64>,
        /// Validate the spec, data and weights, print the plan, and exit without training.
        #[arg(long)]
        check: bool,
    },
    /// Evaluate a checkpoint on its job's validation split (or the test split): loss and accuracy.
    /// For reporting and ablations: test-time flips on or off, the test images of a run that
    /// was tuned on a holdout. With several checkpoints, their ensemble: the mean of the
    /// members' class probabilities, on a split they must share; the options apply to each.
    Eval {
        #[arg(required = true)]
        checkpoints: Vec<PathBuf>,
        /// Average each image's logits with its mirror's (default: as the job's spec says).
        #[arg(long)]
        tta_hflip: Option<bool>,
        /// Also average copies moved by this many pixels each way (default: as the spec says).
        #[arg(long)]
        tta_shift: Option<u32>,
        /// Also score the images resized to these sides and average over the sides, e.g.
        /// `--tta-sizes 72,88` (default: as the spec says; `0`: none).
        #[arg(long, value_delimiter = ',')]
        tta_sizes: Option<Vec<i64>>,
        /// Score the moving average of the weights (`train.ema_decay`; the default when the run
        /// kept one) or, with `false`, the weights as trained.
        #[arg(long)]
        ema: Option<bool>,
        /// Score the dataset's test images even when the job held out part of the training set
        /// (`data.holdout`) as its validation split.
        #[arg(long)]
        test: bool,
        /// First recompute BatchNorm's statistics over this many batches of the training split
        /// (precise BatchNorm; 0: as saved).
        #[arg(long)]
        precise_bn: Option<usize>,
        #[arg(long, default_value = "auto")]
        device: DeviceArg,
    },
    /// Show a job's schedule expanded into stages: what trains when, how many parameters, at which
    /// learning rates, with which BatchNorm policy. Trains nothing.
    Plan {
        /// The job spec (TOML).
        spec: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Classify images with a model: top-k classes with probabilities.
    Predict {
        #[arg(long)]
        model: String,
        /// `imagenet`, `none`, or a path to a thaw checkpoint / imported weights file.
        #[arg(long, default_value = "imagenet")]
        weights: String,
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "auto")]
        device: DeviceArg,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Standalone feature extractor: pooled trunk features (+ labels) of a dataset, as safetensors.
    Extract {
        #[arg(long)]
        model: String,
        #[arg(long, default_value = "imagenet")]
        weights: String,
        /// An image-folder tree (`DIR/<class>/<image>`), a directory of IDX files, or packed shards.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        format: FormatArg,
        /// For IDX data and packed splits: `train` or `test` (`val`).
        #[arg(long, default_value = "train")]
        split: String,
        #[arg(long)]
        out: PathBuf,
        /// Input side (default: the model's).
        #[arg(long)]
        image_size: Option<i64>,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value = "auto")]
        device: DeviceArg,
    },
    /// Packed datasets: pack an image tree into WebDataset shards, inspect, verify, or synthesize one.
    Data {
        #[command(subcommand)]
        command: data_cli::DataCommand,
    },
    /// Manage pretrained weights.
    Weights {
        #[command(subcommand)]
        command: WeightsCommand,
    },
    /// List the model zoo: architectures, layer groups, parameters, input sizes.
    Models {
        #[arg(long)]
        json: bool,
    },
    /// Data-parallel training on this machine: an in-process coordinator and N worker processes.
    Launch {
        /// Worker processes.
        #[arg(long, default_value_t = 2)]
        nproc: u32,
        /// Go on while at least this many workers are left (default: --nproc).
        #[arg(long)]
        min_nproc: Option<u32>,
        /// Admit up to this many workers (default: --nproc); the others join from elsewhere with
        /// `thaw worker --job NAME --coordinator URL`, at the next step, and get the group's state.
        #[arg(long)]
        max_nproc: Option<u32>,
        /// Start a worker that died again, up to this many times in all (torchrun's
        /// --max-restarts); it rejoins and receives the group's state.
        #[arg(long, default_value_t = 0)]
        max_restarts: u32,
        /// Resume from a checkpoint (written by any number of workers), mid-epoch included.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Plaintext gRPC and no tokens between the launcher and its workers (by default the
        /// launch makes ephemeral certificates and tokens; everything stays on 127.0.0.1 either way).
        #[arg(long)]
        insecure: bool,
        /// Serve the job's Prometheus metrics (`GET /metrics`) on this address.
        #[arg(long)]
        metrics_addr: Option<String>,
        spec: PathBuf,
        /// cpu, cuda (local rank i runs on the i-th visible GPU; CUDA_VISIBLE_DEVICES chooses
        /// which), auto, or cuda:K for a single rank. Each worker gets THAW_LOCAL_RANK.
        #[arg(long, default_value = "cpu")]
        device: DeviceArg,
    },
    /// Ask a coordinator's health endpoint (grpc.health.v1, plaintext: `--health-listen`); exits
    /// 0 when SERVING. For container health checks without a shell.
    Health {
        /// HOST:PORT of the health endpoint.
        #[arg(default_value = "127.0.0.1:7071")]
        addr: String,
        /// "" (liveness) or "thaw.v1.Jobs" (readiness).
        #[arg(long, default_value = "")]
        service: String,
        #[arg(long, default_value_t = 3.0)]
        timeout_secs: f64,
    },
    /// Draw runs' curves: loss and accuracy per epoch, learning rates per group over steps, the
    /// stages as bands; several runs are overlaid.
    Plot {
        /// Run directories (a job's output.dir: metrics.json, tb/, spec.toml).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// A .png or .svg file.
        #[arg(long, default_value = "curves.png")]
        out: PathBuf,
    },
    /// Kubernetes: a job's worker manifests from its spec.
    #[command(subcommand)]
    K8s(K8sCommand),
    /// Run a coordinator (jobs, rendezvous, epoch plans) until Ctrl-C or SIGTERM.
    Coordinator {
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// Where the jobs are kept across restarts (default: $THAW_HOME/coordinator); one
        /// coordinator at a time.
        #[arg(long, conflicts_with = "store")]
        state_dir: Option<PathBuf>,
        /// Where jobs are kept: `file://DIR` (the default, `$THAW_HOME/coordinator`; one
        /// coordinator), `memory` (nothing outlives the process), or
        /// `etcd://HOST:PORT[,HOST:PORT...]`: several coordinators share the jobs in etcd; one
        /// is elected and serves, the others stand by and take over when it is lost.
        #[arg(long)]
        store: Option<String>,
        /// Key prefix in etcd (jobs under PREFIX/jobs/, the election at PREFIX/leader).
        #[arg(long, default_value = "/thaw")]
        prefix: String,
        /// The URL clients reach this coordinator at (default: http://LISTEN-ADDRESS).
        #[arg(long)]
        advertise: Option<String>,
        /// TTL of the leadership lease: a lost leader is replaced within about this long.
        #[arg(long, default_value_t = 5)]
        lease_secs: i64,
        /// Finished jobs are deleted this many hours after they ended (0: kept forever).
        #[arg(long, default_value_t = 72.0)]
        retention_hours: f64,
        /// Client tokens, one per line: `reader|operator TOKEN [NAME] [expires=DATE]`. Required to
        /// listen on a non-loopback address (unless --insecure).
        #[arg(long, env = "THAW_TOKENS_FILE")]
        tokens: Option<PathBuf>,
        /// Serve over mutual TLS with the certificates of this directory (ca.crt, tls.crt,
        /// tls.key: `thaw certs init` makes one; a Kubernetes TLS Secret is one). Reloaded when
        /// the files change. Required to listen on a non-loopback address (unless --insecure).
        #[arg(long, env = "THAW_COORDINATOR_TLS_DIR")]
        tls: Option<PathBuf>,
        /// Serve without tokens or TLS on a non-loopback address (a trusted network only).
        #[arg(long)]
        insecure: bool,
        /// Jobs kept at most, live and finished: past it, submits are refused until finished
        /// jobs are deleted (or expire, --retention-hours).
        #[arg(long, default_value_t = 1000)]
        max_jobs: usize,
        /// Watch streams (`thaw watch`) one client may hold open at once.
        #[arg(long, default_value_t = 16)]
        max_watches_per_client: usize,
        /// Worker joins that may wait for their groups at once, all jobs together.
        #[arg(long, default_value_t = 1024)]
        max_pending_joins: usize,
        /// Also serve the gRPC health protocol alone, in plaintext, on this address (for
        /// Kubernetes probes, which present no client certificate): "" is liveness,
        /// "thaw.v1.Jobs" readiness (the leader, or a standby that knows it).
        #[arg(long, env = "THAW_HEALTH_LISTEN")]
        health_listen: Option<String>,
        /// Serve Prometheus metrics (`GET /metrics`) on this address.
        #[arg(long, env = "THAW_METRICS_ADDR")]
        metrics_addr: Option<String>,
    },
    /// Certificates for a cluster's mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run one worker of a job.
    Worker {
        #[arg(long, env = "THAW_COORDINATOR", default_value = cluster::DEFAULT_COORDINATOR)]
        coordinator: String,
        #[arg(long)]
        job: String,
        /// Unique per worker (default: host:pid).
        #[arg(long)]
        worker_id: Option<String>,
        /// Address the collective engine listens on (a free port is chosen).
        #[arg(long, default_value = "127.0.0.1")]
        bind_host: String,
        /// cpu, cuda (the GPU of this process's local rank, THAW_LOCAL_RANK or LOCAL_RANK, else
        /// 0), cuda:K (the K-th visible GPU) or auto.
        #[arg(long, default_value = "cpu")]
        device: DeviceArg,
        /// Keep trying to reach the coordinator this long (its name may not resolve yet, as a
        /// Kubernetes Service's before its pods are ready) instead of giving up after 5 tries.
        #[arg(long, env = "THAW_CONNECT_TIMEOUT_SECS")]
        connect_timeout_secs: Option<f64>,
        /// Run this many workers (ranks) from this one process, local ranks 0..K (THAW_LOCAL_RANK),
        /// e.g. one per GPU of a Kubernetes pod; signals are passed on to them.
        #[arg(long, default_value_t = 1)]
        local_ranks: u32,
    },
    /// Submit a job to a coordinator; prints its id.
    Submit {
        spec: PathBuf,
        #[arg(long, env = "THAW_COORDINATOR", default_value = cluster::DEFAULT_COORDINATOR)]
        coordinator: String,
        /// Resume from a checkpoint every worker can read (any world size wrote it).
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Show one job, or all.
    Status {
        job: Option<String>,
        #[arg(long, env = "THAW_COORDINATOR", default_value = cluster::DEFAULT_COORDINATOR)]
        coordinator: String,
        #[arg(long)]
        json: bool,
        /// One page of at most this many jobs (in id order); the next page's command is printed.
        #[arg(long, conflicts_with = "job")]
        limit: Option<u32>,
        /// Start the listing after this job id.
        #[arg(long, conflicts_with = "job")]
        after: Option<String>,
    },
    /// Delete a finished job's record (and metrics) from the coordinator.
    Delete {
        job: String,
        #[arg(long, env = "THAW_COORDINATOR", default_value = cluster::DEFAULT_COORDINATOR)]
        coordinator: String,
    },
    /// Follow a job until it ends; the exit status follows its state (0 succeeded, 1 failed, 130 cancelled).
    Watch {
        job: String,
        #[arg(long, env = "THAW_COORDINATOR", default_value = cluster::DEFAULT_COORDINATOR)]
        coordinator: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job; its workers stop at their next heartbeat and rank 0 checkpoints.
    Cancel {
        job: String,
        #[arg(long, env = "THAW_COORDINATOR", default_value = cluster::DEFAULT_COORDINATOR)]
        coordinator: String,
    },
    /// Recommend a transfer strategy for a dataset (its size, its similarity to ImageNet) and
    /// print a ready job spec.
    Recommend {
        /// An IDX directory or an image-folder tree, as `data.root` of a job spec.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        model: String,
        #[arg(long, value_enum, default_value = "auto")]
        format: FormatArg,
        /// `imagenet`, `none`, or a path to a weights file.
        #[arg(long, default_value = "imagenet")]
        weights: String,
        /// Input side (default: the model's).
        #[arg(long)]
        image_size: Option<i64>,
        /// Use at most this many training images (a seeded subset): "what if I only had N?".
        #[arg(long)]
        limit: Option<usize>,
        /// Training images the similarity probe uses (at most).
        #[arg(long, default_value_t = 1000)]
        probe_samples: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object instead of the report and spec.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "auto")]
        device: DeviceArg,
    },
}

#[derive(Subcommand)]
enum WeightsCommand {
    /// Convert a torchvision checkpoint (.pth, zip or legacy format) into the weights cache.
    Import {
        file: PathBuf,
        #[arg(long)]
        arch: String,
        /// Where to write (default: the cache entry that `--weights imagenet` uses).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print where the ImageNet weights of an architecture are cached, and whether they are there.
    Path {
        #[arg(long)]
        arch: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match cli.log_format {
        LogFormat::Json => {
            // Workers started by `thaw launch` inherit it.
            std::env::set_var("THAW_LOG_FORMAT", "json");
            logs.json().flatten_event(true).init()
        }
        // Worker logs go to files under `thaw launch`: colour codes only on a terminal.
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A spec whose strategy is `auto`, with the strategy `thaw recommend` picks for its data and
/// model written in; any other spec as it is.
pub fn resolve_auto(mut spec: JobSpec) -> Result<JobSpec> {
    use thaw_coordinator::spec::{Strategy, WeightsSpec};
    use thaw_worker::recommend::{recommend, RecommendOptions};
    if spec.schedule.strategy != Strategy::Auto {
        return Ok(spec);
    }
    let opts = RecommendOptions {
        format: Some(spec.data.format),
        weights: spec.model.weights.as_spec_str(),
        image_size: spec.data.image_size,
        limit: spec.data.train_limit,
        seed: spec.seed,
        threads: spec.data.loader_threads,
        ..RecommendOptions::new(&spec.data.root, &spec.model.arch)
    };
    let r = recommend(&opts).context("resolving strategy \"auto\"")?;
    spec.schedule.strategy = match (r.strategy.as_str(), r.k) {
        ("feature_extract", _) => Strategy::FeatureExtract,
        ("freeze_bottom", Some(k)) => Strategy::FreezeBottom { k },
        ("finetune_all", _) => Strategy::FinetuneAll,
        ("scratch", _) => Strategy::Scratch,
        (other, k) => bail!("thaw recommend chose an unknown strategy `{other}` (k = {k:?})"),
    };
    if spec.schedule.strategy == Strategy::Scratch {
        spec.model.weights = WeightsSpec::None;
    }
    // A spec that leaves the image size open takes the recommendation's (48 for small images).
    if spec.data.image_size.is_none() {
        spec.data.image_size = JobSpec::from_toml(&r.spec_toml, Path::new("/"))?.data.image_size;
    }
    tracing::info!(
        strategy = r.strategy,
        image_size = ?spec.data.image_size,
        k = ?r.k,
        size = r.size.as_str(),
        similarity = r.similarity.as_str(),
        recommended_lr = r.lr,
        "strategy \"auto\" resolved: {}",
        r.reasons.join("; ")
    );
    // Through the file format again, so every check of a written spec applies to the result.
    Ok(JobSpec::from_toml(&spec.to_toml(), Path::new("/"))?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train { spec, resume, device, max_steps, time_budget, check } => {
            train(spec, resume, device.device()?, max_steps, time_budget, check)
        }
        Command::Eval { checkpoints, tta_hflip, tta_shift, tta_sizes, ema, test, precise_bn, device } => {
            let opts = EvalOptions { tta_hflip, tta_shift, tta_sizes, ema, test, precise_bn, device: device.device()? };
            match checkpoints.as_slice() {
                [one] => eval(one, &opts),
                many => eval_ensemble(many, &opts),
            }
        }
        Command::Plan { spec, json } => plan::print(&spec, json),
        Command::Predict { model, weights, top_k, json, device, images } => {
            predict(&model, &weights, top_k, json, device.device()?, &images)
        }
        Command::Extract { model, weights, data, format, split, out, image_size, batch_size, threads, device } => {
            let arch = Arch::from_name(&model)?;
            let ds = open_dataset(&data, format, &split)?;
            let clf = Classifier::load(arch, &weights, device.device()?)?;
            let t = Transform::new(&arch.preprocess(), image_size, ds.resize_whole());
            let report = extract_features(&clf.net, ds, &t, batch_size, threads, &out)?;
            for e in &report.skipped {
                eprintln!("skipped {}: {}", e.key, e.reason);
            }
            println!(
                "wrote {} features of width {} to {} ({} unreadable samples skipped)",
                report.samples,
                report.feature_dim,
                out.display(),
                report.skipped.len()
            );
            Ok(())
        }
        Command::Data { command } => data_cli::run(command),
        Command::Weights { command: WeightsCommand::Import { file, arch, out } } => {
            let arch = Arch::from_name(&arch)?;
            let out = match out {
                Some(o) => o,
                None => weights::cached_imagenet_path(arch)
                    .with_context(|| format!("{arch} has no ImageNet weights; pass --out PATH"))?,
            };
            let report = weights::import_checkpoint(&file, arch, &out)?;
            println!(
                "imported {} tensors ({} parameters) for {arch} into {}",
                report.tensors,
                report.parameters,
                out.display()
            );
            Ok(())
        }
        Command::Weights { command: WeightsCommand::Path { arch } } => {
            let arch = Arch::from_name(&arch)?;
            let p = weights::cached_imagenet_path(arch).with_context(|| format!("{arch} has no ImageNet weights"))?;
            println!("{} ({})", p.display(), if p.is_file() { "present" } else { "absent" });
            Ok(())
        }
        Command::Models { json } => models(json),
        Command::Plot { runs, out } => {
            plot::plot(&runs, &out)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::K8s(K8sCommand::Render { spec, opts }) => {
            let job = JobSpec::from_file(&spec)?;
            print!("{}", k8s::to_yaml(&k8s::render(&job, &opts)?)?);
            Ok(())
        }
        Command::Health { addr, service, timeout_secs } => cluster::health(&addr, &service, timeout_secs),
        Command::Launch { nproc, min_nproc, max_nproc, max_restarts, resume, insecure, metrics_addr, spec, device } => {
            let opts =
                cluster::LaunchOptions { nproc, min_nproc, max_nproc, max_restarts, resume, insecure, metrics_addr };
            exit_with(cluster::launch(&spec, &opts, device.0)?)
        }
        Command::Coordinator {
            listen,
            state_dir,
            store,
            prefix,
            advertise,
            lease_secs,
            retention_hours,
            tokens,
            tls,
            insecure,
            max_jobs,
            max_watches_per_client,
            max_pending_joins,
            health_listen,
            metrics_addr,
        } => {
            for (flag, v) in [
                ("--max-jobs", max_jobs),
                ("--max-watches-per-client", max_watches_per_client),
                ("--max-pending-joins", max_pending_joins),
            ] {
                if v == 0 {
                    anyhow::bail!("{flag} 0: must be at least 1");
                }
            }
            let limits = thaw_coordinator::service::Limits { max_jobs, max_watches_per_client, max_pending_joins };
            let tokens =
                tokens.map(|p| thaw_coordinator::auth::Tokens::load(&p)).transpose().map_err(anyhow::Error::msg)?;
            let tls = tls
                .map(|d| thaw_coordinator::tls::ServerTls::load(&d))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--tls: {e}"))?;
            let security = cluster::Security { tokens, tls, insecure, limits, health_listen, metrics_addr };
            if !(retention_hours >= 0.0 && retention_hours.is_finite()) {
                anyhow::bail!("--retention-hours {retention_hours}: must be 0 (keep) or more");
            }
            let retention =
                (retention_hours > 0.0).then(|| std::time::Duration::from_secs_f64(retention_hours * 3600.0));
            match store.as_deref() {
                Some(s) if s.starts_with("etcd://") => {
                    cluster::coordinator_ha(&listen, s, &prefix, advertise.as_deref(), lease_secs, retention, &security)
                }
                Some("memory") => cluster::coordinator(&listen, None, retention, &security),
                Some(s) if s.starts_with("file://") => cluster::coordinator(
                    &listen,
                    Some(std::path::Path::new(&s["file://".len()..])),
                    retention,
                    &security,
                ),
                Some(other) => anyhow::bail!("--store {other}: expected file://DIR, memory or etcd://HOST:PORT[,...]"),
                None => cluster::coordinator(
                    &listen,
                    Some(&state_dir.unwrap_or_else(|| weights::thaw_home().join("coordinator"))),
                    retention,
                    &security,
                ),
            }
        }
        Command::Certs(CertsCommand::Init { dir, san, days }) => {
            thaw_coordinator::tls::init_cluster(&dir, &san, days).map_err(anyhow::Error::msg)?;
            println!(
                "CA in {0}/ca.crt (its key {0}/ca.key: keep it offline); TLS directories for the coordinator (--tls), \
                 workers and clients (THAW_TLS_DIR) in {0}/coordinator, {0}/worker, {0}/client",
                dir.display()
            );
            Ok(())
        }
        Command::Certs(CertsCommand::Issue { ca_dir, out, name, san, days }) => {
            use thaw_coordinator::tls::Authority;
            if days == 0 {
                anyhow::bail!("--days 0: certificates must be valid for at least a day");
            }
            let ca = Authority::load(&ca_dir).map_err(anyhow::Error::msg)?;
            ca.write_dir(&out, &name, &san, days).map_err(anyhow::Error::msg)?;
            println!("{} signed by {}/ca.crt in {}", name, ca_dir.display(), out.display());
            Ok(())
        }
        Command::Worker { local_ranks, worker_id, .. } if local_ranks != 1 => {
            exit_with(cluster::local_ranks(local_ranks, worker_id.as_deref())?)
        }
        Command::Worker { coordinator, job, worker_id, bind_host, device, connect_timeout_secs, .. } => {
            let wait = match connect_timeout_secs {
                Some(s) if !(s > 0.0 && s.is_finite()) => {
                    bail!("--connect-timeout-secs {s}: must be a positive number of seconds")
                }
                s => s.map(std::time::Duration::from_secs_f64),
            };
            let device = match device.device() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::exit(cluster::EXIT_PERMANENT);
                }
            };
            exit_with(cluster::worker(&coordinator, &job, worker_id, &bind_host, device, wait)?)
        }
        Command::Submit { spec, coordinator, resume } => cluster::submit(&spec, &coordinator, resume.as_deref()),
        Command::Status { job, coordinator, json, limit, after } => {
            cluster::status(job.as_deref(), &coordinator, json, limit, after.as_deref())
        }
        Command::Delete { job, coordinator } => cluster::delete(&job, &coordinator),
        Command::Watch { job, coordinator, json } => exit_with(cluster::watch(&job, &coordinator, json)?),
        Command::Cancel { job, coordinator } => cluster::cancel(&job, &coordinator),
        Command::Recommend { data, model, format, weights, image_size, limit, probe_samples, seed, json, device } => {
            let format = match format {
                FormatArg::Auto => None,
                FormatArg::Idx => Some(thaw_coordinator::spec::DataFormat::Idx),
                FormatArg::Folder => Some(thaw_coordinator::spec::DataFormat::Folder),
                FormatArg::Shards => Some(thaw_coordinator::spec::DataFormat::Shards),
            };
            let opts = thaw_worker::recommend::RecommendOptions {
                format,
                weights,
                image_size,
                limit,
                probe_samples,
                seed,
                device: device.device()?,
                ..thaw_worker::recommend::RecommendOptions::new(data, model)
            };
            recommend(&opts, json)
        }
    }
}

/// `thaw recommend`: the report (as TOML comments) and the spec, or one JSON object.
fn recommend(opts: &thaw_worker::recommend::RecommendOptions, json: bool) -> Result<()> {
    let rec = thaw_worker::recommend::recommend(opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
    } else {
        print!("{}", rec.to_text());
    }
    Ok(())
}

/// Ends the process with `code` when it is not 0 (a job that failed or was cancelled).
fn exit_with(code: i32) -> Result<()> {
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

fn open_dataset(dir: &Path, format: FormatArg, split: &str) -> Result<Arc<dyn Dataset>> {
    let is_idx = ["train", "t10k"].iter().any(|p| {
        let f = format!("{p}-images-idx3-ubyte");
        dir.join(&f).is_file() || dir.join(format!("{f}.gz")).is_file()
    });
    let packed = dir.join("index.json").is_file() || dir.join("train/index.json").is_file();
    Ok(match (format, is_idx) {
        (FormatArg::Shards, _) | (FormatArg::Auto, false) if packed => {
            let (train, val) = thaw_worker::data::shards::packed_splits(dir)?;
            let chosen = match (split, val) {
                ("train", _) => train,
                ("test" | "val", Some(val)) => val,
                (other, _) => bail!("--split {other:?}: {} has no such split (train, val)", dir.display()),
            };
            Arc::new(thaw_worker::data::sharded::ShardDataset::open(&chosen)?)
        }
        (FormatArg::Shards, _) => bail!("{} is not a packed directory (run `thaw data pack`)", dir.display()),
        (FormatArg::Idx, _) | (FormatArg::Auto, true) => {
            let split = match split {
                "train" => Split::Train,
                "test" => Split::Test,
                other => bail!("--split {other:?}: expected \"train\" or \"test\""),
            };
            if !dir.is_dir() {
                bail!("data directory {} does not exist", dir.display());
            }
            Arc::new(IdxDataset::open(dir, split)?)
        }
        _ => Arc::new(FolderDataset::open(dir)?),
    })
}

/// `thaw eval`: one evaluation of a checkpoint, printed as `split images loss accuracy`.
/// What `thaw eval` does to each checkpoint before scoring it.
struct EvalOptions {
    tta_hflip: Option<bool>,
    tta_shift: Option<u32>,
    tta_sizes: Option<Vec<i64>>,
    ema: Option<bool>,
    test: bool,
    precise_bn: Option<usize>,
    device: tch::Device,
}

/// A checkpoint's trainer, ready to score as `opts` say: test-time views, which weights, precise
/// BatchNorm statistics, the test split. Returns it with the split's name.
fn open_for_eval(checkpoint: &Path, opts: &EvalOptions) -> Result<(Trainer, &'static str)> {
    let mut trainer = Trainer::resume(checkpoint, opts.device)?;
    if let Some(t) = opts.tta_hflip {
        trainer.spec.data.tta_hflip = t;
    }
    if let Some(s) = opts.tta_shift {
        trainer.spec.data.tta_shift = s;
    }
    if let Some(sizes) = &opts.tta_sizes {
        let sizes: Vec<i64> = sizes.iter().copied().filter(|&s| s != 0).collect();
        // The spec's check, named by the flag the user typed.
        check_tta_sizes(&sizes).map_err(|e| match e {
            SpecError::Invalid { value, reason, .. } => anyhow::anyhow!("--tta-sizes {value}: {reason} (0: none)"),
            other => other.into(),
        })?;
        trainer.spec.data.tta_sizes = sizes;
    }
    match opts.ema {
        Some(true) if !trainer.scores_average() => {
            anyhow::bail!("{}: the run kept no moving average of its weights (train.ema_decay)", checkpoint.display())
        }
        Some(false) => trainer.score_trained_weights(),
        _ => {}
    }
    if let Some(n) = opts.precise_bn.filter(|n| *n > 0) {
        let started = std::time::Instant::now();
        let done = trainer.recalibrate_bn(n)?;
        tracing::info!(batches = done, seconds = started.elapsed().as_secs_f64(), "recomputed BatchNorm statistics");
    }
    let split = if opts.test || trainer.spec.data.holdout.is_none() { "test" } else { "holdout" };
    if opts.test && trainer.spec.data.holdout.is_some() {
        let mut data = trainer.spec.data.clone();
        data.holdout = None;
        trainer.splits = thaw_worker::data::open_splits(&data, trainer.spec.seed)?;
    }
    Ok((trainer, split))
}

/// How a trainer scores: which weights, test-time views, input size.
fn scoring(trainer: &Trainer) -> String {
    format!(
        "{}, test-time flips {}, shifts {}, {}x{} inputs{}",
        if trainer.scores_average() { "averaged weights" } else { "weights as trained" },
        if trainer.spec.data.tta_hflip { "on" } else { "off" },
        trainer.spec.data.tta_shift,
        trainer.transform.size,
        trainer.transform.size,
        if trainer.spec.data.tta_sizes.is_empty() {
            String::new()
        } else {
            format!(" and resized to {:?}", trainer.spec.data.tta_sizes)
        }
    )
}

fn eval(checkpoint: &Path, opts: &EvalOptions) -> Result<()> {
    let (mut trainer, split) = open_for_eval(checkpoint, opts)?;
    let started = std::time::Instant::now();
    let (loss, acc) = trainer.evaluate()?;
    println!(
        "{split}: {} images, loss {loss:.4}, accuracy {acc:.4} ({}, {:.1}s)",
        trainer.splits.val.len(),
        scoring(&trainer),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `thaw eval A B ...`: each member scored alone, then the mean of their class probabilities.
/// The members must score the same images with the same labels (the same data, holdout and
/// seed), else the error names the first that differs.
fn eval_ensemble(checkpoints: &[PathBuf], opts: &EvalOptions) -> Result<()> {
    let started = std::time::Instant::now();
    let mut first: Option<(&Path, &'static str, Vec<Option<i64>>)> = None;
    let mut sum: Option<tch::Tensor> = None;
    for ck in checkpoints {
        let (mut trainer, split) = open_for_eval(ck, opts)?;
        let p = trainer.val_probabilities()?;
        let (loss, acc) = p.score()?;
        println!("member {}: {split}, loss {loss:.4}, accuracy {acc:.4} ({})", ck.display(), scoring(&trainer));
        match &first {
            None => first = Some((ck, split, p.labels.clone())),
            Some((f, f_split, labels)) if *f_split != split || *labels != p.labels => anyhow::bail!(
                "{} scores another split than {} ({} {} images against {} {}): an ensemble is scored on the split its members share (the same data, holdout and seed)",
                ck.display(),
                f.display(),
                p.labels.len(),
                split,
                labels.len(),
                f_split
            ),
            Some(_) => {}
        }
        sum = Some(match sum {
            None => p.probs,
            Some(s) => s + p.probs,
        });
    }
    let (_, split, labels) = first.expect("at least one checkpoint");
    let probs = sum.expect("at least one member") / checkpoints.len() as f64;
    let n = labels.len();
    let (loss, acc) = thaw_worker::train::ValProbabilities { probs, labels }.score()?;
    println!(
        "{split}: {n} images, loss {loss:.4}, accuracy {acc:.4} (ensemble of {}: mean of the members' probabilities, {:.1}s)",
        checkpoints.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn train(
    spec: Option<PathBuf>,
    resume: Option<PathBuf>,
    device: tch::Device,
    max_steps: Option<usize>,
    time_budget: Option<f64>,
    check: bool,
) -> Result<()> {
    let mut trainer = match (spec, resume) {
        (Some(spec), None) => Trainer::prepare(resolve_auto(JobSpec::from_file(&spec)?)?, device)?,
        (None, Some(ck)) => Trainer::resume(&ck, device)?,
        _ => bail!("give a job spec (`thaw train JOB.toml`) or `--resume CHECKPOINT`"),
    };
    let groups = trainer.net.group_names().join(", ");
    let frozen: Vec<&str> = trainer
        .net
        .group_names()
        .into_iter()
        .zip(&trainer.modes)
        .filter(|(_, m)| **m == thaw_worker::zoo::GroupMode::Frozen)
        .map(|(g, _)| g)
        .collect();
    tracing::info!(
        job = %trainer.spec.name,
        arch = %trainer.arch,
        weights = %trainer.weights_source,
        strategy = trainer.spec.schedule.name(),
        train_images = trainer.splits.train.len(),
        val_images = trainer.splits.val.len(),
        classes = trainer.net.num_classes,
        image_size = trainer.transform.size,
        trainable_params = trainer.trainable_parameters(),
        total_params = trainer.net.num_parameters(),
        device = ?device,
        "prepared"
    );
    eprintln!("groups: {groups}; frozen: {}", if frozen.is_empty() { "none".to_string() } else { frozen.join(", ") });
    if check {
        println!(
            "job {} is valid; {} steps per epoch",
            trainer.spec.name,
            trainer.splits.train.len().div_ceil(trainer.spec.train.batch_size)
        );
        return Ok(());
    }
    if trainer.cursor().epoch > 0 || trainer.cursor().step > 0 {
        eprintln!("resuming at epoch {}, step {}", trainer.cursor().epoch + 1, trainer.cursor().step);
    }
    if let Some(secs) = time_budget {
        if !(secs.is_finite() && secs > 0.0) {
            bail!("--time-budget {secs}: must be a positive number of seconds");
        }
        trainer.set_time_budget(std::time::Duration::from_secs_f64(secs));
    }
    let summary = trainer.run(max_steps)?;
    if !summary.history.is_empty() {
        println!(
            "{:>5} {:>10} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8} {:>9}",
            "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "images", "skipped", "time_s", "data_wait"
        );
        for m in &summary.history {
            println!(
                "{:>5} {:>10.4} {:>9.4} {:>9.4} {:>8.4} {:>8} {:>7} {:>8.1} {:>9.1}",
                m.epoch, m.train_loss, m.train_acc, m.val_loss, m.val_acc, m.images, m.skipped, m.seconds, m.data_wait
            );
        }
    }
    if !summary.skipped_keys.is_empty() {
        println!("skipped {} unreadable samples: {}", summary.skipped_keys.len(), summary.skipped_keys.join(", "));
    }
    match summary.history.last() {
        Some(m) if trainer.cursor().epoch == trainer.spec.train.epochs => {
            println!("final validation accuracy: {:.4} ({} images)", m.val_acc, trainer.splits.val.len())
        }
        _ => println!(
            "stopped at epoch {}, step {}; continue with --resume",
            trainer.cursor().epoch + 1,
            trainer.cursor().step
        ),
    }
    println!("checkpoint: {}", summary.checkpoint.display());
    println!("curves: tensorboard --logdir {}", trainer.tensorboard_dir().display());
    Ok(())
}

fn predict(
    model: &str,
    weights: &str,
    top_k: usize,
    json: bool,
    device: tch::Device,
    images: &[PathBuf],
) -> Result<()> {
    let arch = Arch::from_name(model)?;
    let clf = Classifier::load(arch, weights, device)?;
    let results = clf.predict_files(images, top_k);
    let mut failed = 0;
    let mut out = Vec::new();
    for (path, r) in images.iter().zip(results) {
        match r {
            Ok(top) => {
                if json {
                    out.push(serde_json::json!({
                        "image": path.display().to_string(),
                        "top": top.iter().map(|(i, n, p)| serde_json::json!({"class": i, "name": n, "probability": p})).collect::<Vec<_>>(),
                    }));
                } else {
                    println!("{}", path.display());
                    for (i, n, p) in top {
                        println!("  {p:>7.4}  {i:>4}  {n}");
                    }
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
                if json {
                    out.push(serde_json::json!({"image": path.display().to_string(), "error": e.reason}));
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    if failed > 0 {
        bail!("{failed} of {} images could not be read", images.len());
    }
    Ok(())
}

fn models(json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for arch in Arch::ALL {
        let net = Network::new(arch, if arch == Arch::Lenet5 { 10 } else { 1000 }, tch::Device::Cpu);
        let pre = arch.preprocess();
        rows.push(serde_json::json!({
            "arch": arch.name(),
            "groups": net.group_names(),
            "parameters": net.num_parameters(),
            "feature_dim": net.feature_dim,
            "input_size": pre.input_size,
            "channels": pre.channels,
            "imagenet_weights": arch.imagenet_weights().map(|w| w.file_name),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<18} {:>12} {:>6} {:>8}  groups", "arch", "parameters", "input", "features");
        for r in &rows {
            let groups: Vec<&str> = r["groups"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
            println!(
                "{:<18} {:>12} {:>6} {:>8}  {}",
                r["arch"].as_str().unwrap_or_default(),
                r["parameters"].as_i64().unwrap_or_default(),
                r["input_size"].as_i64().unwrap_or_default(),
                r["feature_dim"].as_i64().unwrap_or_default(),
                groups.join(" ")
            );
        }
    }
    Ok(())
}
