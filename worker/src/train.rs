//! The single-process trainer: prepares a job (every check before any work), then runs epochs of
//! forward/backward/update with the frozen groups the schedule names, evaluates each epoch,
//! checkpoints atomically, and resumes from a checkpoint exactly where it stopped.
//!
//! Preparation validates the whole job first: architecture, data, class count, weights, frozen
//! groups. A bad spec fails in [`Trainer::prepare`], before an epoch starts. libtorch runs on the
//! calling thread; decoding runs on the loader's threads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use thaw_coordinator::schedule::stage_of;
use thaw_coordinator::spec::{BnPolicy, DataSpec, JobSpec, Precision, SpecError, Stage, WeightsSpec};

use thaw_coordinator::core::PlanInfo;
use thaw_coordinator::plan::{EpochCursor, EpochPlan};

use crate::amp::{autocast, LossScaler};
use crate::buckets::Buckets;
use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointPolicy, Cursor, EpochMetrics};
use crate::collective::{Collective, CollectiveError};
use crate::data::loader::{Batch, Loader, LoaderConfig};
use crate::data::transform::Transform;
use crate::data::{self, DataError, Dataset, SampleError, Splits};
use crate::ddp;
use crate::ema::Ema;
use crate::mix::{cutmix, mixed_loss};
use crate::optim::{Optimizer, Param};
use crate::progress::Progress;
use crate::stage_cache::StageCache;
use crate::tensorboard::EventWriter;
use crate::weights::{self, WeightsError};
use crate::zoo::{Arch, CutForward, GroupMode, Network, UnknownArch};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Arch(#[from] UnknownArch),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Invalid(String),
    #[error("epoch {epoch}: {skipped} unreadable samples, over the limit data.max_skipped = {limit} (first: {first})")]
    TooManySkipped { epoch: usize, skipped: u64, limit: u64, first: String },
    #[error(transparent)]
    Io(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The coordinator could not be asked (a plan): the group re-forms or the worker gives up.
    #[error("{0}")]
    Control(String),
}

/// A job ready to run: everything validated and loaded.
pub struct Trainer {
    pub spec: JobSpec,
    pub arch: Arch,
    pub net: Network,
    pub splits: Splits,
    pub modes: Vec<GroupMode>,
    /// The schedule's stages for this model, and the one in force.
    pub stages: Vec<Stage>,
    pub stage: Stage,
    /// Preprocessing for training and evaluation (random flips are the loader's, per epoch).
    pub transform: Transform,
    optimizer: Optimizer,
    cursor: Cursor,
    history: Vec<EpochMetrics>,
    /// Where the weights came from, for the log.
    pub weights_source: String,
    /// Outputs of the stage's frozen prefix, when it can be cached (see `stage_cache.rs`).
    cache: Option<StageCache>,
    /// `run` stops at the first step boundary after this much training, then evaluates.
    time_budget: Option<std::time::Duration>,
    /// fp16's loss scale (unused in fp32 and bf16); part of the state, like the optimizer's.
    scaler: LossScaler,
    /// TensorBoard events under `output.dir/tb` (rank 0, or the one process), opened at the
    /// first step.
    events: Option<EventWriter>,
    /// The moving average of the weights that evaluations score (`train.ema_decay`).
    ema: Option<Ema>,
}

/// Where an epoch's batches come from: decoded by the loader, or prefix outputs from the cache.
enum Source {
    Loader(Loader),
    Cached { planned: Vec<Vec<usize>>, next: usize },
}

/// An epoch's batches as the training loop takes them: from `source`, with the next one
/// already sent to the GPU (`ahead`, device runs only).
struct Feed {
    source: Source,
    ahead: Option<Option<Result<Batch, TrainError>>>,
}

impl Feed {
    fn new(source: Source) -> Feed {
        Feed { source, ahead: None }
    }

    fn cached(&self) -> bool {
        matches!(self.source, Source::Cached { .. })
    }
}

/// One finished distributed step, as measured by its rank.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepTelemetry {
    /// Wall time from the end of the previous step: waiting for data included.
    pub seconds: f64,
    pub data_wait: f64,
    /// The step's reductions: time in the collective, and the part the training thread waited.
    pub allreduce: f64,
    pub allreduce_exposed: f64,
    /// This rank's samples and unreadable samples in the step.
    pub samples: u64,
    pub skipped: u64,
    /// Mean loss over the global batch, the learning rate per layer group, the stage (1-based).
    pub loss: f64,
    pub group_lr: Vec<f64>,
    pub stage: u32,
}

/// What a finished run reports.
pub struct RunSummary {
    pub history: Vec<EpochMetrics>,
    pub checkpoint: PathBuf,
    pub skipped_keys: Vec<String>,
}

impl Trainer {
    /// Validates and loads everything a job needs; nothing is trained yet.
    pub fn prepare(spec: JobSpec, device: Device) -> Result<Trainer, TrainError> {
        Self::prepare_inner(spec, device, None)
    }

    /// Rebuilds the job saved in a checkpoint and restores its weights, optimizer and cursor.
    pub fn resume(path: &Path, device: Device) -> Result<Trainer, TrainError> {
        let ck = Checkpoint::load(path)?;
        let spec = JobSpec::from_toml(&ck.spec_toml, Path::new("/"))?;
        Self::prepare_inner(spec, device, Some(ck))
    }

    fn prepare_inner(spec: JobSpec, device: Device, ck: Option<Checkpoint>) -> Result<Trainer, TrainError> {
        let arch = Arch::from_name(&spec.model.arch)?;
        let splits = data::open_splits(&spec.data, spec.seed)?;
        let data_classes = splits.train.class_names().len() as i64;
        let num_classes = spec.model.num_classes.unwrap_or(data_classes);
        if data_classes > num_classes {
            return Err(TrainError::Invalid(format!(
                "model.num_classes = {num_classes}, but the data in {} has {data_classes} classes",
                spec.data.root.display()
            )));
        }
        if splits.train.is_empty() || splits.val.is_empty() {
            return Err(TrainError::Invalid(format!(
                "{}: the training or validation split is empty ({} / {} samples)",
                spec.data.root.display(),
                splits.train.len(),
                splits.val.len()
            )));
        }

        // Random init (and everything else drawn from libtorch's RNG) follows the spec's seed.
        tch::manual_seed(spec.seed as i64);
        let side = spec.data.image_size.unwrap_or(arch.preprocess().input_size);
        let channels_last =
            spec.train.channels_last.unwrap_or_else(|| crate::zoo::channels_last_default(arch, device, side));
        let mut net = Network::with_layout(arch, num_classes, device, channels_last);
        let groups = net.group_names();
        let stages = spec.schedule.expand(&groups, &spec.train)?;
        let groups = groups.len();
        // The stage of the epoch a resumed run starts in (the last one once the run is over).
        let start_epoch = ck.as_ref().map_or(0, |ck| ck.cursor.epoch);
        let stage = stage_of(&stages, start_epoch).unwrap_or(&stages[stages.len() - 1]).clone();
        let modes = modes_of(&stage);

        let weights_source = match (&ck, &spec.model.weights) {
            (Some(_), _) => "checkpoint".to_string(),
            (None, WeightsSpec::None) => "random init".to_string(),
            (None, WeightsSpec::Imagenet) => {
                let path = weights::resolve_imagenet(arch, &weights::FetchOptions::from_env())?;
                weights::load_into(&net, &path, true)?;
                format!("imagenet ({})", path.display())
            }
            (None, WeightsSpec::File(path)) => {
                let head_fits = weights::load_into(&net, path, false).is_ok();
                if !head_fits {
                    weights::load_into(&net, path, true)?;
                }
                format!("{}{}", path.display(), if head_fits { "" } else { " (new head)" })
            }
        };
        net.set_bn_policy(stage.bn);
        net.set_modes(&modes);
        debug_assert_eq!(modes.len(), groups);
        let mut optimizer = Optimizer::new(spec.train.optimizer, trainable_params(&net, &modes));

        let pre = arch.preprocess();
        let whole = splits.train.resize_whole();
        let transform = Transform::new(&pre, spec.data.image_size, whole);

        let (cursor, history, scaler) = match &ck {
            None => (Cursor::default(), Vec::new(), LossScaler::default()),
            Some(ck) => {
                ck.restore_model(&net)?;
                optimizer.load_state(&ck.optim);
                (ck.cursor.clone(), ck.history.clone(), scaler_of(&ck.optim))
            }
        };
        // The average starts at the weights just loaded, or continues the checkpoint's.
        let ema = spec.train.ema_decay.map(|d| {
            let mut ema = Ema::new(&net, d);
            if let Some(ck) = &ck {
                ema.load_state(&ck.optim);
            }
            ema
        });

        Ok(Trainer {
            spec,
            arch,
            net,
            splits,
            modes,
            stages,
            stage,
            transform,
            optimizer,
            cursor,
            history,
            weights_source,
            cache: None,
            time_budget: None,
            scaler,
            events: None,
            ema,
        })
    }

    /// The error for a loss that stopped being finite.
    fn diverged(&self, loss: f64, epoch: usize, step: usize) -> TrainError {
        TrainError::Invalid(format!(
            "loss became {loss} at epoch {} step {step}; lower train.lr (now {})",
            epoch + 1,
            self.spec.train.lr
        ))
    }

    pub fn history(&self) -> &[EpochMetrics] {
        &self.history
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Number of parameters that train under the current modes.
    pub fn trainable_parameters(&self) -> i64 {
        self.optimizer.params().iter().map(|p| p.tensor.numel() as i64).sum()
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.spec.output.dir.join("checkpoint.safetensors")
    }

    /// The loader settings of a training epoch.
    fn train_loader_config(&self, batch_size: usize, epoch: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            threads: self.spec.data.loader_threads,
            prefetch: 2,
            hflip: self.spec.data.hflip,
            random_crop: self.spec.data.random_resized_crop,
            shift: self.spec.data.random_shift,
            erase: self.spec.data.random_erase as f32,
            seed: self.spec.seed,
            epoch: epoch as u64,
        }
    }

    /// One process's plan of `epoch`: the same plan a distributed job uses, for a world of one
    /// (with the cut a checkpoint from another world left, in the epoch it stopped in).
    fn local_plan(&self, epoch: usize) -> Result<EpochPlan, TrainError> {
        let cut = if epoch == self.cursor.epoch { self.cursor.cut } else { None };
        let n = self.splits.train.len() as u64;
        PlanInfo::for_spec(&self.spec, &self.stages, epoch as u32, n, 1, cut)
            .and_then(|mut info| {
                // One rank holds every sample anyway: the epoch's own order, cache or no cache
                // (a cut keeps the layout the distributed run cut it from).
                if cut.is_none() {
                    info.affinity_epoch = None;
                }
                info.plan()
            })
            .map_err(|e| TrainError::Invalid(e.to_string()))
    }

    /// Logs a batch's unreadable samples, counts them in the cursor and remembers the epoch's first.
    fn note_skipped(&mut self, skipped: &[SampleError], first: &mut Option<String>) {
        for e in skipped {
            tracing::warn!(key = %e.key, reason = %e.reason, "skipping unreadable sample");
            first.get_or_insert_with(|| e.key.clone());
        }
        self.cursor.skipped += skipped.len() as u64;
    }

    /// Fails the run once an epoch's unreadable samples (over all ranks) pass `data.max_skipped`.
    fn check_skipped(&self, epoch: usize, skipped: u64, first: Option<&str>) -> Result<(), TrainError> {
        match self.spec.data.max_skipped {
            Some(limit) if skipped > limit => Err(TrainError::TooManySkipped {
                epoch: epoch + 1,
                skipped,
                limit,
                first: first.unwrap_or("on another rank").to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// The learning rate of each group at `step` of `epoch` (epochs of `steps_per_epoch` steps):
    /// the stage's peak rate of the group times the stage's warm-up and decay at that point.
    pub fn group_lrs(&self, epoch: usize, step: usize, steps_per_epoch: usize) -> Vec<f64> {
        let st = &self.stage;
        let at = (epoch.saturating_sub(st.epochs.start)) * steps_per_epoch + step;
        let factor = st.lr_factor(at, st.epochs.len() * steps_per_epoch);
        st.group_lr.iter().map(|lr| lr * factor).collect()
    }

    /// Sets the input side of `epoch` (progressive resizing), for its training and evaluation.
    fn size_epoch(&mut self, epoch: usize) {
        let whole = self.splits.train.resize_whole();
        let t = Transform::new(&self.arch.preprocess(), self.spec.data.size_for_epoch(epoch), whole);
        if t.size != self.transform.size {
            tracing::info!(epoch = epoch + 1, image_size = t.size, "input size");
        }
        self.transform = t;
    }

    /// Moves to the stage of `epoch` if it is not the one in force; whether it changed.
    fn enter_stage_of(&mut self, epoch: usize) -> Result<bool, TrainError> {
        match stage_of(&self.stages, epoch) {
            Some(st) if *st != self.stage => {
                self.set_stage(st.clone())?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Sets up (or drops) the feature cache for the stage in force, before an epoch of `rank`.
    fn cache_for_stage(&mut self, rank: u32) {
        let prefix = self.stage.frozen_prefix();
        let budget = self.spec.train.feature_cache_mb;
        if let Some(reason) = self.stage.why_not_cached(&self.spec.data, budget) {
            if let Some(old) = self.cache.take() {
                tracing::info!(stage = old.stage + 1, "feature cache dropped");
            }
            tracing::debug!(stage = self.stage.index + 1, reason, "no feature cache");
            return;
        }
        if self.cache.as_ref().is_some_and(|c| c.stage == self.stage.index) {
            return;
        }
        let dir = self.spec.output.dir.join(format!("feature-cache-rank{rank}"));
        let bytes = (budget * (1u64 << 20) as f64) as usize;
        let (n_train, n_val) = (self.splits.train.len(), self.splits.val.len());
        self.cache = Some(StageCache::new(self.stage.index, prefix, dir, bytes, n_train, n_val));
        tracing::info!(
            stage = self.stage.index + 1,
            frozen_groups = prefix,
            budget_mb = budget,
            "caching the frozen prefix's outputs"
        );
    }

    /// Logs the feature cache's state (after an epoch).
    fn log_cache(&self) {
        if let Some(c) = &self.cache {
            tracing::info!(cache = %c.describe(), "feature cache");
        }
    }

    /// The source of an epoch whose batches (dataset indices) are `planned`, from `start_step`.
    fn source(&self, planned: Vec<Vec<usize>>, start_step: usize, cfg: LoaderConfig) -> Source {
        if self.cache.as_ref().is_some_and(|c| c.covers(&planned)) {
            Source::Cached { planned, next: start_step }
        } else {
            Source::Loader(Loader::start_batches(
                self.splits.train.clone(),
                planned,
                start_step,
                self.transform.clone(),
                cfg,
            ))
        }
    }

    /// The next batch, on the training device. On a GPU the batch after it is already on its
    /// way: copied from pinned host memory without blocking, so the transfer overlaps this
    /// step's compute (the copy is queued before the step's kernels).
    fn next_batch(&self, feed: &mut Feed) -> Option<Result<Batch, TrainError>> {
        let device = self.net.vs.device();
        if !device.is_cuda() {
            return self.next_host_batch(&mut feed.source);
        }
        let to_device = |b: Batch| Batch {
            images: b.images.pin_memory(device).to_device_(device, b.images.kind(), true, false),
            labels: b.labels.pin_memory(device).to_device_(device, b.labels.kind(), true, false),
            ..b
        };
        let current = match feed.ahead.take() {
            Some(ahead) => ahead,
            None => self.next_host_batch(&mut feed.source).map(|b| b.map(to_device)),
        };
        if current.is_some() {
            feed.ahead = Some(self.next_host_batch(&mut feed.source).map(|b| b.map(to_device)));
        }
        current
    }

    fn next_host_batch(&self, source: &mut Source) -> Option<Result<Batch, TrainError>> {
        match source {
            Source::Loader(loader) => loader.next().map(Ok),
            Source::Cached { planned, next } => {
                let step = *next;
                let indices = planned.get(step)?;
                *next += 1;
                let cache = self.cache.as_ref()?;
                Some(cache.batch(&self.splits.train, step, indices))
            }
        }
    }

    /// The training forward pass of a batch: from cached prefix outputs, or through the prefix
    /// (storing its outputs) when the stage caches, or through the whole network.
    fn forward_batch(&mut self, xs: &Tensor, batch: &Batch, cached: bool) -> Result<Tensor, TrainError> {
        Ok(self.forward_pass(xs, batch, cached, false)?.output)
    }

    /// [`Trainer::forward_batch`], cut at the layer groups' boundaries when `cut` (for a backward
    /// pass group by group that overlaps the all-reduce, `ddp.rs`).
    fn forward_pass(&mut self, xs: &Tensor, batch: &Batch, cached: bool, cut: bool) -> Result<CutForward, TrainError> {
        let n = self.modes.len();
        let net = &self.net;
        let rest = |x: &Tensor, from: usize| {
            if cut {
                net.forward_range_cut(x, &self.modes, from..n)
            } else {
                CutForward::uncut(net.forward_range(x, &self.modes, from..n))
            }
        };
        match &mut self.cache {
            Some(c) if cached => Ok(rest(xs, c.prefix)),
            Some(c) => {
                c.mark_bad(batch.skipped_indices.iter().copied());
                let feats = net.forward_range(xs, &self.modes, 0..c.prefix);
                c.train.put_batch(&batch.indices, &feats)?;
                Ok(rest(&feats, c.prefix))
            }
            None => Ok(rest(xs, 0)),
        }
    }

    /// Everything a run's state is: the checkpoint file's contents, and what a recovering group
    /// broadcasts from its source rank.
    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            spec_toml: self.spec.to_toml(),
            arch: self.arch.name().to_string(),
            num_classes: self.net.num_classes,
            class_names: self.splits.train.class_names().to_vec(),
            cursor: self.cursor.clone(),
            history: self.history.clone(),
            model: self.net.vs.variables(),
            optim: self
                .optimizer
                .state_tensors()
                .into_iter()
                .chain(scaler_tensors(&self.scaler))
                .chain(self.ema.iter().flat_map(Ema::state_tensors))
                .collect(),
        }
    }

    /// Writes `checkpoint.safetensors` atomically and, with `output.keep_checkpoints = K > 1`,
    /// keeps it also as `checkpoint-eEEEE-sSSSSSSS.safetensors`, deleting all but the newest K - 1
    /// of those.
    fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        let path = self.checkpoint_path();
        self.checkpoint().save(&path)?;
        crate::tensor_io::remove_stale_temps(&path);
        let keep = self.spec.output.keep_checkpoints;
        if keep > 1 {
            let dir = &self.spec.output.dir;
            let name = format!("checkpoint-e{:04}-s{:08}.safetensors", self.cursor.epoch, self.cursor.step);
            let kept = dir.join(name);
            let _ = std::fs::remove_file(&kept);
            std::fs::hard_link(&path, &kept)
                .or_else(|_| std::fs::copy(&path, &kept).map(|_| ()))
                .map_err(|e| TrainError::Invalid(format!("cannot keep checkpoint {}: {e}", kept.display())))?;
            let mut old: Vec<PathBuf> = std::fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            old.retain(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("checkpoint-e") && n.ends_with(".safetensors"))
            });
            old.sort();
            for p in old.iter().take(old.len().saturating_sub(keep - 1)) {
                let _ = std::fs::remove_file(p);
            }
        }
        // The history as plain JSON beside it, for people and scripts.
        let json = serde_json::to_string_pretty(&self.history).unwrap_or_default();
        let metrics = self.spec.output.dir.join("metrics.json");
        crate::tensor_io::write_atomic(&metrics, |f| std::io::Write::write_all(f, json.as_bytes()))?;
        Ok(path)
    }

    /// Takes `ck`'s model, optimizer state, cursor and metrics, in the stage of its epoch.
    fn restore(&mut self, ck: &Checkpoint) -> Result<(), TrainError> {
        ck.restore_model(&self.net)?;
        self.cursor = ck.cursor.clone();
        self.history = ck.history.clone();
        // The optimizer keeps state only for the parameters of the stage in force.
        self.enter_stage_of(self.cursor.epoch.min(self.spec.train.epochs.saturating_sub(1)))?;
        self.optimizer.load_state(&ck.optim);
        self.scaler = scaler_of(&ck.optim);
        if let Some(ema) = &mut self.ema {
            ema.load_state(&ck.optim);
        }
        Ok(())
    }

    /// Loads a checkpoint into this prepared job (a resumed distributed job's first group).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<(), TrainError> {
        let ck = Checkpoint::load(path)?;
        self.restore(&ck)
    }

    /// Makes every rank's state `source`'s: model, optimizer state, cursor and metrics, broadcast
    /// as the bytes of a checkpoint. This is how a re-formed group continues without reading a
    /// checkpoint, and how the first group starts from identical replicas.
    pub fn sync_state(&mut self, c: &mut dyn Collective, source: u32) -> Result<(), TrainError> {
        let bytes = if c.rank() == source as usize { self.checkpoint().to_bytes()? } else { Vec::new() };
        let mut len = [f32::from_bits(bytes.len() as u32), f32::from_bits((bytes.len() as u64 >> 32) as u32)];
        c.broadcast(&mut len, source as usize)?;
        let n = (len[0].to_bits() as u64 | (len[1].to_bits() as u64) << 32) as usize;
        let mut words: Vec<f32> = vec![0.0; n.div_ceil(4)];
        if c.rank() == source as usize {
            for (w, chunk) in words.iter_mut().zip(bytes.chunks(4)) {
                let mut b = [0u8; 4];
                b[..chunk.len()].copy_from_slice(chunk);
                *w = f32::from_bits(u32::from_le_bytes(b));
            }
        }
        c.broadcast(&mut words, source as usize)?;
        if c.rank() != source as usize {
            let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_bits().to_le_bytes()).collect();
            bytes.truncate(n);
            let ck = Checkpoint::from_bytes(&bytes)?;
            self.restore(&ck)?;
        }
        Ok(())
    }

    /// Moves the cursor to where a (re-formed) group starts.
    pub fn set_position(&mut self, at: EpochCursor) {
        self.cursor.move_to(at);
    }

    /// Writes the resolved spec beside the outputs.
    fn write_resolved_spec(&self) -> Result<(), TrainError> {
        let path = self.spec.output.dir.join("spec.toml");
        let text = self.spec.to_toml();
        Ok(crate::tensor_io::write_atomic(&path, |f| std::io::Write::write_all(f, text.as_bytes()))?)
    }

    /// Makes [`Trainer::run`] stop at the first step boundary after `budget` of wall-clock time:
    /// the epoch in progress ends there (it is evaluated and checkpointed as finished, with the
    /// images it saw), and so does the run. For comparing strategies at equal cost.
    pub fn set_time_budget(&mut self, budget: std::time::Duration) {
        self.time_budget = Some(budget);
    }

    /// Trains up to `max_steps` more steps (or to the end), evaluating and checkpointing each epoch.
    pub fn run(&mut self, max_steps: Option<usize>) -> Result<RunSummary, TrainError> {
        let deadline = self.time_budget.map(|b| Instant::now() + b);
        let out_of_time = || deadline.is_some_and(|d| Instant::now() >= d);
        self.write_resolved_spec()?;
        let policy = CheckpointPolicy { every_steps: self.spec.output.checkpoint_every_steps };
        let bs = self.spec.train.batch_size;
        // A checkpoint from another world continues from its cut (the same samples, once).
        let at = self.cursor.position().for_world(1, bs as u32);
        self.cursor.move_to(at);
        let mut budget = max_steps.unwrap_or(usize::MAX);
        let mut skipped_keys = Vec::new();
        let device = self.net.vs.device();
        while self.cursor.epoch < self.spec.train.epochs && budget > 0 {
            let epoch = self.cursor.epoch;
            if self.enter_stage_of(epoch)? {
                self.log_stage();
            }
            let plan = self.local_plan(epoch)?;
            let steps = plan.steps_per_rank() as usize;
            let cfg = self.train_loader_config(bs, epoch);
            self.size_epoch(epoch);
            self.cache_for_stage(0);
            let planned = rank_batches(&plan, 0)?;
            let mut source = Feed::new(self.source(planned, self.cursor.step, cfg));
            let cached = source.cached();
            let started = Instant::now();
            let mut data_wait = 0.0;
            let mut progress =
                Progress::new(format!("epoch {}/{}", epoch + 1, self.spec.train.epochs), (steps * bs) as u64, "img");
            let mut waited = Instant::now();
            let mut first_skipped = None;
            while let Some(batch) = self.next_batch(&mut source) {
                let batch = batch?;
                data_wait += waited.elapsed().as_secs_f64();
                self.note_skipped(&batch.skipped, &mut first_skipped);
                skipped_keys.extend(batch.skipped.iter().map(|e| e.key.clone()));
                self.check_skipped(epoch, self.cursor.skipped, first_skipped.as_deref())?;
                let n = batch.labels.size()[0];
                if n > 0 {
                    let at = plan.schedule_step(batch.step as u64) as usize;
                    let lrs = self.group_lrs(epoch, at, plan.schedule_steps() as usize);
                    // Dropout masks are a function of (seed, epoch, step), so a resumed run
                    // draws exactly what an uninterrupted one would.
                    tch::manual_seed(step_seed(self.spec.seed, epoch, at));
                    let xs = batch.images.to_device(device);
                    let ys = batch.labels.to_device(device);
                    let mixed = cutmix(&xs, &ys, self.spec.data.cutmix);
                    let xs = mixed.as_ref().map_or(xs, |m| m.images.shallow_clone());
                    self.optimizer.zero_grad();
                    let (precision, smoothing) = (self.spec.train.precision, self.spec.train.label_smoothing);
                    let (logits, loss) = autocast(precision, device, || {
                        let logits = self.forward_batch(&xs, &batch, cached)?;
                        let loss = mixed_loss(&logits, &ys, mixed.as_ref(), tch::Reduction::Mean, smoothing);
                        Ok::<_, TrainError>((logits, loss))
                    })?;
                    if precision == Precision::Fp16 {
                        (&loss * self.scaler.factor()).backward();
                        if self.scaler.unscale(self.optimizer.params()) {
                            self.optimizer.step(&|g| lrs[g]);
                            self.update_ema();
                        }
                    } else {
                        loss.backward();
                        self.optimizer.step(&|g| lrs[g]);
                        self.update_ema();
                    }
                    let loss_v = loss.double_value(&[]);
                    if !loss_v.is_finite() {
                        return Err(self.diverged(loss_v, epoch, batch.step));
                    }
                    let correct = logits.argmax(-1, false).eq_tensor(&ys).sum(Kind::Int64).int64_value(&[]);
                    let global_step = (epoch * plan.schedule_steps() as usize + at) as u64;
                    self.log_step(global_step, loss_v, &lrs);
                    self.cursor.loss_sum += loss_v * n as f64;
                    self.cursor.correct += correct as u64;
                    self.cursor.seen += n as u64;
                }
                self.cursor.step = batch.step + 1;
                let c = &self.cursor;
                progress.update(((batch.step + 1) * bs).min(self.splits.train.len()) as u64, || {
                    format!(
                        "loss {:.4} acc {:.3}",
                        c.loss_sum / c.seen.max(1) as f64,
                        c.correct as f64 / c.seen.max(1) as f64
                    )
                });
                budget -= 1;
                let epoch_done = self.cursor.step == steps;
                if !epoch_done && out_of_time() {
                    tracing::info!(
                        epoch = epoch + 1,
                        step = self.cursor.step,
                        "time budget spent; ending the run here"
                    );
                    break;
                }
                if !epoch_done && (policy.after_step(batch.step, steps) || budget == 0) {
                    self.save_checkpoint()?;
                }
                if budget == 0 && !epoch_done {
                    break;
                }
                waited = Instant::now();
            }
            progress.finish();
            self.log_cache();
            let timed_out = out_of_time();
            if self.cursor.step < steps && !timed_out {
                break; // out of steps mid-epoch; the checkpoint above holds the cursor
            }
            // Test-time flips (when asked for) at the run's last evaluation only.
            let last = timed_out || epoch + 1 == self.spec.train.epochs;
            let (val_loss, val_acc) = self.evaluate_all(last)?;
            let m = self.cursor.epoch_metrics(
                epoch,
                (val_loss, val_acc),
                self.cursor.skipped,
                started.elapsed().as_secs_f64(),
                data_wait,
            );
            tracing::info!(
                epoch = m.epoch,
                train_loss = m.train_loss,
                train_acc = m.train_acc,
                val_loss = m.val_loss,
                val_acc = m.val_acc,
                images = m.images,
                skipped = m.skipped,
                seconds = m.seconds,
                data_wait_ms_per_step = m.data_wait * 1e3 / steps.max(1) as f64,
                step_ms = m.seconds * 1e3 / steps.max(1) as f64,
                "epoch done"
            );
            self.log_epoch(((epoch + 1) * plan.schedule_steps() as usize) as u64, &m);
            self.history.push(m);
            self.cursor = Cursor { epoch: epoch + 1, ..Cursor::default() };
            self.save_checkpoint()?;
            if timed_out {
                break;
            }
        }
        Ok(RunSummary { history: self.history.clone(), checkpoint: self.checkpoint_path(), skipped_keys })
    }

    /// Loss and accuracy on the validation split (eval mode, no gradients), through the feature
    /// cache when the stage has one; with test-time flips when the spec asks for them.
    pub fn evaluate(&mut self) -> Result<(f64, f64), TrainError> {
        self.evaluate_all(true)
    }

    /// [`Trainer::evaluate`] over the whole validation split; `last` as in `evaluate_on`.
    fn evaluate_all(&mut self, last: bool) -> Result<(f64, f64), TrainError> {
        self.evaluate_on((0..self.splits.val.len()).collect(), last)?.mean()
    }

    /// Loss and correct counts over the validation samples `order`. `last`: the run's final
    /// evaluation, the one `data.tta_hflip` applies to (the epochs before it are scored plainly,
    /// at half the cost; their accuracies are progress, the last one is the result).
    fn evaluate_on(&mut self, order: Vec<usize>, last: bool) -> Result<EvalSums, TrainError> {
        let (bs, threads) = (self.spec.train.batch_size, self.spec.data.loader_threads);
        let tta = if last { Tta::of(&self.spec.data) } else { Tta::NONE };
        let (device, precision) = (self.net.vs.device(), self.spec.train.precision);
        let (net, val, transform, cache) = (&self.net, self.splits.val.clone(), &self.transform, &mut self.cache);
        // With `train.ema_decay`, the average is what is scored (the frozen prefix a cache holds
        // the outputs of does not change, so its average is itself).
        Ema::scored(self.ema.as_mut(), || {
            // Evaluation computes in the precision training does.
            autocast(precision, device, || match cache {
                // Cached prefix outputs cannot be mirrored or moved: test-time views run the whole
                // network.
                Some(c) if tta == Tta::NONE => c.evaluate(net, val, order, transform, bs, threads),
                _ => evaluate_on(net, val, order, transform, bs, threads, &tta),
            })
        })
    }

    /// Class probabilities of every validation image, as the final evaluation scores them (the
    /// moving average of the weights where the run kept one, the test-time views of
    /// `data.tta_hflip` and `data.tta_shift`): for averaging the members of an ensemble
    /// (`thaw eval A B ...`).
    pub fn val_probabilities(&mut self) -> Result<ValProbabilities, TrainError> {
        let (bs, threads) = (self.spec.train.batch_size, self.spec.data.loader_threads);
        let tta = Tta::of(&self.spec.data);
        let (device, precision) = (self.net.vs.device(), self.spec.train.precision);
        let (net, val, transform) = (&self.net, self.splits.val.clone(), &self.transform);
        Ema::scored(self.ema.as_mut(), || {
            autocast(precision, device, || probabilities_on(net, val, transform, bs, threads, &tta))
        })
    }

    /// Precise BatchNorm statistics (`precise_bn.rs`) from up to `batches` full batches of a
    /// seeded shuffle of the training images, read without augmentation. Returns how many
    /// batches were averaged.
    pub fn recalibrate_bn(&mut self, batches: usize) -> Result<usize, TrainError> {
        let bs = self.spec.train.batch_size;
        let mut order = crate::data::permutation(self.splits.train.len(), self.spec.seed, 0xB4);
        order.truncate(batches * bs);
        let device = self.net.vs.device();
        let cfg = LoaderConfig::eval(bs, self.spec.data.loader_threads);
        let loader = Loader::start(self.splits.train.clone(), order, 0, self.transform.clone(), cfg);
        let images = loader.filter(|b| b.indices.len() == bs).map(|b| b.images.to_device(device));
        let (net, precision) = (&self.net, self.spec.train.precision);
        // With `train.ema_decay` the average is what is scored: its statistics are recomputed.
        Ok(Ema::scored(self.ema.as_mut(), || {
            crate::precise_bn::recalibrate(net, images, |xs| {
                autocast(precision, device, || {
                    let _ = net.forward_t(xs, false);
                })
            })
        }))
    }

    /// Whether evaluations score a moving average of the weights (`train.ema_decay`).
    pub fn scores_average(&self) -> bool {
        self.ema.is_some()
    }

    /// From now on evaluations score the weights as trained, not their average (for ablations:
    /// `thaw eval --ema false`).
    pub fn score_trained_weights(&mut self) {
        self.ema = None;
    }

    /// One step of the weights' moving average, after an optimizer step.
    fn update_ema(&mut self) {
        if let Some(ema) = &mut self.ema {
            ema.update();
        }
    }

    /// Every rank scores its share of the validation set (every `world`-th sample from its rank)
    /// and the sums are reduced: all ranks work and wait alike, so evaluation never races the
    /// step deadline, and it is `world` times faster.
    fn evaluate_distributed(&mut self, c: &mut dyn Collective, last: bool) -> Result<(f64, f64), TrainError> {
        let (rank, world) = (c.rank(), c.world_size());
        let share: Vec<usize> = (rank..self.splits.val.len()).step_by(world).collect();
        let s = self.evaluate_on(share, last)?;
        crate::failpoint::hit("evaluate", rank as u32);
        let mut sums = [s.loss_sum as f32, s.correct as f32, s.seen as f32];
        c.all_reduce_sum(&mut sums)?;
        EvalSums { loss_sum: sums[0] as f64, correct: sums[1] as i64, seen: sums[2] as i64 }.mean()
    }
}

impl Trainer {
    /// Where this run's TensorBoard event files go: `output.dir/tb`.
    pub fn tensorboard_dir(&self) -> PathBuf {
        self.spec.output.dir.join("tb")
    }

    /// Writes one step's scalars (the loss and each group's learning rate) at global step `at`.
    fn log_step(&mut self, at: u64, loss: f64, lrs: &[f64]) {
        if self.events.is_none() {
            if at == 0 && self.history.is_empty() {
                // A run from its start: the event files of an earlier run in this directory go.
                if let Ok(rd) = std::fs::read_dir(self.tensorboard_dir()) {
                    for e in rd.flatten() {
                        if e.file_name().to_string_lossy().starts_with("events.out.tfevents.") {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
            }
            match EventWriter::create(&self.tensorboard_dir()) {
                Ok(w) => self.events = Some(w),
                Err(e) => {
                    tracing::warn!(dir = %self.tensorboard_dir().display(), error = %e, "no TensorBoard events");
                    return;
                }
            }
        }
        let groups = self.net.group_names();
        let tags: Vec<String> = groups.iter().map(|g| format!("lr/{g}")).collect();
        let mut values: Vec<(&str, f64)> = vec![("train/step_loss", loss)];
        // A frozen group's learning rate is 0: it does not train, whatever the schedule's curve.
        let effective = lrs.iter().zip(&self.modes).map(|(lr, m)| if *m == GroupMode::Train { *lr } else { 0.0 });
        values.extend(tags.iter().map(String::as_str).zip(effective));
        if let Some(w) = &mut self.events {
            w.scalars(at, &values);
        }
    }

    /// Writes an epoch's metrics at global step `at`.
    fn log_epoch(&mut self, at: u64, m: &EpochMetrics) {
        if let Some(w) = &mut self.events {
            w.scalars(
                at,
                &[
                    ("epoch/train_loss", m.train_loss),
                    ("epoch/train_acc", m.train_acc),
                    ("epoch/val_loss", m.val_loss),
                    ("epoch/val_acc", m.val_acc),
                ],
            );
            w.flush();
        }
    }
}

/// The loss scaler as two entries of a checkpoint's optimizer state (f64 scalars).
fn scaler_tensors(s: &LossScaler) -> [(String, Tensor); 2] {
    [
        ("amp.loss_scale".into(), Tensor::from_slice(&[s.scale])),
        ("amp.good_steps".into(), Tensor::from_slice(&[s.good_steps as f64])),
    ]
}

/// The loss scaler saved by [`scaler_tensors`] (the initial one for older checkpoints).
fn scaler_of(optim: &HashMap<String, Tensor>) -> LossScaler {
    let value = |k: &str| optim.get(k).map(|t| t.to_kind(Kind::Double).double_value(&[0]));
    match (value("amp.loss_scale"), value("amp.good_steps")) {
        (Some(scale), Some(good)) if scale.is_finite() && scale > 0.0 => LossScaler { scale, good_steps: good as u32 },
        _ => LossScaler::default(),
    }
}

/// Group modes of a stage.
fn modes_of(stage: &Stage) -> Vec<GroupMode> {
    stage.trainable.iter().map(|&t| if t { GroupMode::Train } else { GroupMode::Frozen }).collect()
}

/// The parameters that train under `modes` and the network's BatchNorm policy, input to output:
/// every parameter of a trainable group and, under `train_affine`, the BatchNorm parameters of
/// frozen groups.
fn trainable_params(net: &Network, modes: &[GroupMode]) -> Vec<Param> {
    let affine = net.bn_policy() == BnPolicy::TrainAffine;
    (0..modes.len())
        .flat_map(|g| {
            match modes[g] {
                GroupMode::Train => net.group_parameters(g),
                GroupMode::Frozen if affine => net.bn_parameters(g),
                GroupMode::Frozen => Vec::new(),
            }
            .into_iter()
            .map(move |(name, tensor)| Param { name, tensor, group: g })
        })
        .collect()
}

/// The libtorch seed for one training step.
fn step_seed(seed: u64, epoch: usize, step: usize) -> i64 {
    let mut h = seed ^ 0x5EED_u64.wrapping_mul(epoch as u64 + 1);
    h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64;
    (h.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 1) as i64
}

/// Running loss and accuracy of an evaluation, with its progress display.
pub(crate) struct Scores {
    loss_sum: f64,
    correct: i64,
    seen: i64,
    progress: Progress,
}

impl Scores {
    pub(crate) fn new(total: usize) -> Scores {
        Scores { loss_sum: 0.0, correct: 0, seen: 0, progress: Progress::new("evaluate", total as u64, "img") }
    }

    /// Adds a batch's logits against its labels (both on the same device).
    pub(crate) fn add(&mut self, logits: &Tensor, ys: &Tensor) {
        let n = ys.size()[0];
        self.loss_sum += logits.cross_entropy_for_logits(ys).double_value(&[]) * n as f64;
        self.correct += logits.argmax(-1, false).eq_tensor(ys).sum(Kind::Int64).int64_value(&[]);
        self.seen += n;
        let (correct, seen) = (self.correct, self.seen);
        self.progress.update(seen as u64, || format!("acc {:.3}", correct as f64 / seen as f64));
    }

    /// The sums so far.
    pub(crate) fn sums(self) -> EvalSums {
        self.progress.finish();
        EvalSums { loss_sum: self.loss_sum, correct: self.correct, seen: self.seen }
    }
}

/// Summed loss and correct predictions over `seen` samples of an evaluation.
#[derive(Clone, Copy, Debug, Default)]
pub struct EvalSums {
    pub loss_sum: f64,
    pub correct: i64,
    pub seen: i64,
}

impl EvalSums {
    /// (mean loss, accuracy); an error if no sample could be read.
    pub fn mean(self) -> Result<(f64, f64), TrainError> {
        if self.seen == 0 {
            return Err(TrainError::Invalid("no validation sample could be read".into()));
        }
        Ok((self.loss_sum / self.seen as f64, self.correct as f64 / self.seen as f64))
    }
}

/// Loss and accuracy of `net` on `ds` (eval mode, no gradients).
pub fn evaluate(
    net: &Network,
    ds: Arc<dyn Dataset>,
    t: &Transform,
    batch_size: usize,
    threads: usize,
) -> Result<(f64, f64), TrainError> {
    let order = (0..ds.len()).collect();
    evaluate_on(net, ds, order, t, batch_size, threads, &Tta::NONE)?.mean()
}

/// Per-image class probabilities over a validation split ([`Trainer::val_probabilities`]).
pub struct ValProbabilities {
    /// `[images, classes]`, f32 on the CPU; row i is validation image i (zeros where it could not
    /// be read).
    pub probs: Tensor,
    /// Label of each image; `None` where it could not be read.
    pub labels: Vec<Option<i64>>,
}

impl ValProbabilities {
    /// (mean loss, accuracy) of these probabilities over the readable images: the loss is the
    /// negative log of the true class's probability.
    pub fn score(&self) -> Result<(f64, f64), TrainError> {
        let rows: Vec<i64> = (0..self.labels.len() as i64).filter(|&i| self.labels[i as usize].is_some()).collect();
        if rows.is_empty() {
            return Err(TrainError::Invalid("no validation image could be read".into()));
        }
        let labels: Vec<i64> = self.labels.iter().flatten().copied().collect();
        let (rows, labels) = (Tensor::from_slice(&rows), Tensor::from_slice(&labels));
        let p = self.probs.index_select(0, &rows);
        let correct = p.argmax(-1, false).eq_tensor(&labels).sum(Kind::Int64).int64_value(&[]);
        let p_true = p.gather(1, &labels.unsqueeze(1), false).clamp_min(1e-12);
        let loss = -p_true.log().mean(Kind::Double).double_value(&[]);
        Ok((loss, correct as f64 / labels.size()[0] as f64))
    }
}

fn probabilities_on(
    net: &Network,
    ds: Arc<dyn Dataset>,
    t: &Transform,
    batch_size: usize,
    threads: usize,
    tta: &Tta,
) -> Result<ValProbabilities, TrainError> {
    let n = ds.len();
    let mut probs = Tensor::zeros([n as i64, net.num_classes], (Kind::Float, Device::Cpu));
    let mut labels = vec![None; n];
    let (mut progress, mut done) = (Progress::new("evaluate", n as u64, "img"), 0);
    let device = net.vs.device();
    tch::no_grad(|| {
        let cfg = LoaderConfig::eval(batch_size, threads);
        for batch in Loader::start(ds.clone(), (0..n).collect(), 0, t.clone(), cfg) {
            if batch.indices.is_empty() {
                continue;
            }
            let logits = eval_logits(net, &batch.images.to_device(device), tta);
            let p = logits.to_kind(Kind::Float).softmax(-1, Kind::Float).to_device(Device::Cpu);
            let rows: Vec<i64> = batch.indices.iter().map(|&i| i as i64).collect();
            let _ = probs.index_copy_(0, &Tensor::from_slice(&rows), &p);
            let ys = Vec::<i64>::try_from(batch.labels.to_device(Device::Cpu)).map_err(|e| TrainError::Invalid(e.to_string()))?;
            for (&i, y) in batch.indices.iter().zip(ys) {
                labels[i] = Some(y);
            }
            done += batch.indices.len();
            progress.update(done as u64, String::new);
        }
        Ok::<(), TrainError>(())
    })?;
    progress.finish();
    Ok(ValProbabilities { probs, labels })
}

/// Test-time augmentation of the final evaluation: mirror images (`data.tta_hflip`) and copies
/// moved by `shift` pixels left, right, up and down (`data.tta_shift`, edges repeated).
#[derive(Clone, Debug, PartialEq)]
pub struct Tta {
    pub hflip: bool,
    pub shift: i64,
    /// Further sides the images are scored at (`data.tta_sizes`), each resized from the batch
    /// with the other views of its own.
    pub sizes: Vec<i64>,
}

impl Tta {
    pub const NONE: Tta = Tta { hflip: false, shift: 0, sizes: Vec::new() };

    /// The final evaluation's views as `data` asks for them.
    pub fn of(data: &DataSpec) -> Tta {
        Tta { hflip: data.tta_hflip, shift: data.tta_shift as i64, sizes: data.tta_sizes.clone() }
    }
}

/// Eval-mode logits of `xs`: with test-time augmentation, the mean of the logits of every view
/// (the image, its shifted copies, and the mirror of each with `hflip`), all of them in one
/// forward pass; with `sizes`, the mean of that over the batch's side and each of `sizes` (the
/// batch resized bilinearly, one forward pass a side).
pub fn eval_logits(net: &Network, xs: &Tensor, tta: &Tta) -> Tensor {
    let mut sum = side_logits(net, xs, tta);
    if tta.sizes.is_empty() {
        return sum;
    }
    for &side in &tta.sizes {
        let resized = xs.upsample_bilinear2d([side, side], false, None, None);
        sum += side_logits(net, &resized, tta);
    }
    sum / (tta.sizes.len() + 1) as f64
}

/// [`eval_logits`] at the side of `xs`: its flips and shifts.
fn side_logits(net: &Network, xs: &Tensor, tta: &Tta) -> Tensor {
    if !tta.hflip && tta.shift == 0 {
        return net.forward_t(xs, false);
    }
    let (n, h, w) = (xs.size()[0], xs.size()[2], xs.size()[3]);
    let mut views = vec![xs.shallow_clone()];
    let s = tta.shift;
    if s > 0 {
        let padded = xs.pad([s, s, s, s], "replicate", None);
        for (dx, dy) in [(s, 0), (-s, 0), (0, s), (0, -s)] {
            // A view moved by (dx, dy): the window of the padded image that starts at (s - dx, s - dy).
            views.push(padded.narrow(2, s - dy, h).narrow(3, s - dx, w));
        }
    }
    if tta.hflip {
        let mirrored: Vec<Tensor> = views.iter().map(|v| v.flip([3])).collect();
        views.extend(mirrored);
    }
    let k = views.len() as i64;
    let all = net.forward_t(&Tensor::cat(&views, 0), false);
    all.view([k, n, -1]).mean_dim(0, false, Kind::Float)
}

/// Loss and correct counts of `net` on the samples `order` of `ds`.
fn evaluate_on(
    net: &Network,
    ds: Arc<dyn Dataset>,
    order: Vec<usize>,
    t: &Transform,
    batch_size: usize,
    threads: usize,
    tta: &Tta,
) -> Result<EvalSums, TrainError> {
    let cfg = LoaderConfig::eval(batch_size, threads);
    let mut scores = Scores::new(order.len());
    let device = net.vs.device();
    tch::no_grad(|| {
        for batch in Loader::start(ds.clone(), order, 0, t.clone(), cfg) {
            if batch.indices.is_empty() {
                continue;
            }
            let logits = eval_logits(net, &batch.images.to_device(device), tta);
            scores.add(&logits, &batch.labels.to_device(device));
        }
    });
    Ok(scores.sums())
}

/// A rank's batches (dataset indices, pads left out) of a whole epoch of `plan`.
fn rank_batches(plan: &EpochPlan, rank: u32) -> Result<Vec<Vec<usize>>, TrainError> {
    (0..plan.steps_per_rank())
        .map(|s| {
            plan.rank_batch(rank, s).map(|slots| slots.iter().filter_map(|s| s.sample()).map(|i| i as usize).collect())
        })
        .collect::<Result<_, _>>()
        .map_err(|e| TrainError::Invalid(e.to_string()))
}

/// The coordinator as the data-parallel trainer sees it; the worker agent implements it over gRPC.
/// Keeping it a trait keeps the training loop free of transport types.
pub trait Control {
    /// The plan of `epoch` (the same on every rank).
    fn epoch_plan(&mut self, epoch: u32) -> Result<EpochPlan, TrainError>;
    /// Progress within the current epoch; `metrics` once the epoch is done (rank 0 reports both).
    fn progress(&mut self, epoch: u32, step: u64, samples_done: u64, metrics: Option<&EpochMetrics>);
    /// Set when the coordinator asked this worker to stop (job cancelled or failed).
    fn stop_requested(&self) -> Option<String>;
    /// Set when this worker should leave the group gracefully (SIGTERM: a preemption notice, a
    /// drain): it finishes the step with the others, then leaves; they re-form without it.
    fn leave_requested(&self) -> Option<String> {
        None
    }
    /// Set when the coordinator asked the group to re-form at the next step boundary (a worker
    /// is being admitted).
    fn reform_requested(&self) -> Option<String> {
        None
    }
    /// The stage of `epoch` as the coordinator decided it (asked after `epoch_plan`); `None`
    /// leaves it to the trainer's own expansion of the spec's schedule.
    fn stage(&mut self, _epoch: u32) -> Option<Stage> {
        None
    }
    /// The dataset indices this rank computed gradients for at `step` of `epoch`, before they
    /// enter the step's all-reduce (for the exactly-once ledger and tests): whether the step
    /// counts is the group's decision, which a later re-form records.
    fn trained(&mut self, _epoch: u32, _step: u64, _samples: &[usize]) {}

    /// After every finished step: what it took (for metrics; heartbeats carry the sums).
    fn step_done(&mut self, _t: &StepTelemetry) {}
}

/// How a data-parallel run ended. Every rank of the group ends at the same step boundary, for
/// the same reason (the reasons travel in each step's reduced statistics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DistEnd {
    /// Every epoch is done.
    Finished,
    /// The job was cancelled or failed, or every rank was asked to leave: rank 0 checkpointed.
    Stopped(String),
    /// This rank leaves gracefully; the others re-form without it.
    Left(String),
    /// The group re-forms at this step boundary (a rank left, a worker is admitted).
    Reform(String),
}

pub struct DistOutcome {
    pub history: Vec<EpochMetrics>,
    pub end: DistEnd,
}

impl Trainer {
    /// Applies a stage in place: frozen groups stop training, the BatchNorm policy and learning
    /// rates change, the optimizer keeps the state of parameters that stay trainable. Callers
    /// rebuild their gradient buckets after this.
    pub fn set_stage(&mut self, stage: Stage) -> Result<(), TrainError> {
        if stage.trainable.len() != self.modes.len() || stage.group_lr.len() != self.modes.len() {
            return Err(TrainError::Invalid(format!(
                "stage {} names {} groups, the model has {} ({})",
                stage.index + 1,
                stage.trainable.len(),
                self.modes.len(),
                self.net.group_names().join(", ")
            )));
        }
        self.modes = modes_of(&stage);
        self.net.set_bn_policy(stage.bn);
        self.net.set_modes(&self.modes);
        self.optimizer.set_params(trainable_params(&self.net, &self.modes));
        self.stage = stage;
        Ok(())
    }

    /// Logs the stage in force.
    fn log_stage(&self) {
        let groups = self.net.group_names();
        tracing::info!(
            stage = self.stage.index + 1,
            epochs = format!("{}-{}", self.stage.epochs.start + 1, self.stage.epochs.end),
            trainable = self.stage.trainable_names(&groups).join(","),
            parameters = self.trainable_parameters(),
            bn = self.stage.bn.as_str(),
            "stage"
        );
    }

    /// Names of the parameters the optimizer updates in the stage in force.
    pub fn trainable_names(&self) -> Vec<String> {
        self.optimizer.params().iter().map(|p| p.name.clone()).collect()
    }

    /// The optimizer's state tensors (momentum or Adam moments, step counts) by name.
    pub fn optimizer_state(&self) -> Vec<(String, Tensor)> {
        self.optimizer.state_tensors()
    }

    /// The trainable parameters (handles onto the optimizer's), for bucketing.
    pub fn bucket_params(&self) -> Vec<Param> {
        self.optimizer
            .params()
            .iter()
            .map(|p| Param { name: p.name.clone(), tensor: p.tensor.shallow_clone(), group: p.group })
            .collect()
    }

    /// Data-parallel training from the cursor on: this rank trains its share of every epoch's
    /// plan, gradients of the trainable parameters are averaged across ranks in buckets, every
    /// rank evaluates its share of the validation set, rank 0 checkpoints and reports. The caller
    /// makes the replicas identical first ([`Trainer::sync_state`]) and sets the cursor
    /// ([`Trainer::set_position`]).
    ///
    /// The loss of a step is the sum over this rank's real samples divided by the number of real
    /// samples in the whole global batch (times the world size, since the all-reduce averages), so
    /// the averaged gradient equals a single process's on the global batch, padded tail included.
    ///
    /// A step is all or nothing: the step's statistics and every gradient bucket are reduced
    /// first, and only then are the optimizer and the cursor updated, so a rank whose collective
    /// fails (an error is returned) is exactly at the step before; a rank that returns normally
    /// finished the step. Requests to stop, leave or re-form are summed with the statistics, so
    /// every rank acts on them after the same step.
    pub fn run_distributed(
        &mut self,
        rank: u32,
        c: &mut dyn Collective,
        ctl: &mut dyn Control,
        bucket_bytes: usize,
    ) -> Result<DistOutcome, TrainError> {
        let world = c.world_size() as f64;
        if rank == 0 {
            self.write_resolved_spec()?;
        }
        let mut params = self.bucket_params();
        Buckets::ensure_grads(&params);
        let mut buckets = Buckets::new(&params, bucket_bytes);
        let device = self.net.vs.device();
        let overlap = self.spec.distributed.overlap && c.world_size() > 1;
        let precision = self.spec.train.precision;
        let policy = CheckpointPolicy { every_steps: self.spec.output.checkpoint_every_steps };
        let mut end = DistEnd::Finished;
        while self.cursor.epoch < self.spec.train.epochs {
            let epoch = self.cursor.epoch;
            let plan = ctl.epoch_plan(epoch as u32)?;
            let wanted = ctl.stage(epoch as u32).or_else(|| stage_of(&self.stages, epoch).cloned());
            if let Some(stage) = wanted.filter(|st| *st != self.stage) {
                // A stage boundary: optimizer groups and buckets follow the trainable set.
                self.set_stage(stage)?;
                params = self.bucket_params();
                Buckets::ensure_grads(&params);
                buckets = Buckets::new(&params, bucket_bytes);
                if rank == 0 {
                    self.log_stage();
                }
                crate::failpoint::hit("stage-change", rank);
                tracing::debug!(trainable = params.len(), buckets = buckets.buckets.len(), "buckets rebuilt");
            }
            self.cursor.world = plan.world_size();
            self.cursor.cut = plan.cut();
            let steps = plan.steps_per_rank() as usize;
            let batches = rank_batches(&plan, rank)?;
            let cfg = self.train_loader_config(self.spec.train.batch_size, epoch);
            self.size_epoch(epoch);
            self.cache_for_stage(rank);
            let mut source = Feed::new(self.source(batches, self.cursor.step, cfg));
            let cached = source.cached();
            let started = Instant::now();
            let mut progress = Progress::new(
                format!("rank {rank} epoch {}/{}", epoch + 1, self.spec.train.epochs),
                steps as u64,
                "step",
            );
            let (mut skipped_all, mut first_skipped) = (0u64, None::<String>);
            let mut data_wait = 0.0;
            let mut waited = Instant::now();
            let mut last_report = Instant::now();
            while let Some(batch) = self.next_batch(&mut source) {
                let batch = batch?;
                let this_wait = waited.elapsed().as_secs_f64();
                let step_started = waited;
                data_wait += this_wait;
                self.note_skipped(&batch.skipped, &mut first_skipped);
                let global =
                    plan.step_real_count(batch.step as u64).map_err(|e| TrainError::Invalid(e.to_string()))? as f64;
                // The step of the uncut epoch this one stands for: the unit of the schedule and of
                // the dropout seeds, so a change of world neither restarts nor skips them.
                let at = plan.schedule_step(batch.step as u64) as usize;
                let n = batch.labels.size()[0];
                self.optimizer.zero_grad();
                let loss_factor = if precision == Precision::Fp16 { self.scaler.factor() } else { 1.0 };
                let (mut loss_sum, mut correct) = (0.0, 0i64);
                // The forward pass and its loss; backward runs inside the reduction below.
                let mut pass = None;
                if n > 0 {
                    tch::manual_seed(step_seed(self.spec.seed, epoch, at) ^ rank as i64);
                    let xs = batch.images.to_device(device);
                    let ys = batch.labels.to_device(device);
                    let mixed = cutmix(&xs, &ys, self.spec.data.cutmix);
                    let xs = mixed.as_ref().map_or(xs, |m| m.images.shallow_clone());
                    let smoothing = self.spec.train.label_smoothing;
                    let (fwd, sum) = autocast(precision, device, || {
                        let fwd = self.forward_pass(&xs, &batch, cached, overlap)?;
                        let sum = mixed_loss(&fwd.output, &ys, mixed.as_ref(), tch::Reduction::Sum, smoothing);
                        Ok::<_, TrainError>((fwd, sum))
                    })?;
                    loss_sum = sum.double_value(&[]);
                    correct = fwd.output.argmax(-1, false).eq_tensor(&ys).sum(Kind::Int64).int64_value(&[]);
                    pass = Some((&sum * (world / global.max(1.0) * loss_factor), fwd));
                }
                ctl.trained(epoch as u32, batch.step as u64, &batch.indices);
                // Step statistics and requests, summed over ranks: every rank sees the same.
                let (stop_local, leave_local, reform_local) =
                    (ctl.stop_requested(), ctl.leave_requested(), ctl.reform_requested());
                let flag = |b: bool| if b { 1.0 } else { 0.0 };
                // [loss, correct, samples, ranks asking to stop, sum of (asking rank + 1), skipped,
                //  ranks leaving, ranks asked to re-form]
                let mut stats = [
                    loss_sum as f32,
                    correct as f32,
                    n as f32,
                    flag(stop_local.is_some()),
                    if stop_local.is_some() { rank as f32 + 1.0 } else { 0.0 },
                    batch.skipped.len() as f32,
                    flag(leave_local.is_some()),
                    flag(reform_local.is_some()),
                ];
                // Backward, with each bucket's all-reduce started as soon as its gradients are
                // final (or after backward, without overlap); returns once every bucket is in.
                let comm = ddp::reduce_step(c, &mut stats, &buckets, &params, overlap, |ready| {
                    if let Some((loss, fwd)) = pass {
                        fwd.backward(&loss, ready);
                    }
                })?;
                // Every rank sees the same totals, so all stop together over a limit.
                skipped_all += stats[5] as u64;
                self.check_skipped(epoch, skipped_all, first_skipped.as_deref())?;
                if !stats[0].is_finite() {
                    return Err(self.diverged(stats[0] as f64, epoch, batch.step));
                }
                // The step is complete on every rank that gets here: apply it, with the cursor.
                // (fp16: every rank sees the same reduced gradients, so all skip an overflow.)
                let lrs = self.group_lrs(epoch, at, plan.schedule_steps() as usize);
                if precision != Precision::Fp16 || self.scaler.unscale(&params) {
                    self.optimizer.step(&|g| lrs[g]);
                    self.update_ema();
                } else {
                    tracing::debug!(epoch, step = batch.step, scale = self.scaler.scale, "fp16 overflow: step skipped");
                }
                if rank == 0 {
                    let global_step = (epoch * plan.schedule_steps() as usize + at) as u64;
                    self.log_step(global_step, stats[0] as f64 / (stats[2] as f64).max(1.0), &lrs);
                }
                ctl.step_done(&StepTelemetry {
                    seconds: step_started.elapsed().as_secs_f64(),
                    data_wait: this_wait,
                    allreduce: comm.busy.as_secs_f64(),
                    allreduce_exposed: comm.exposed.as_secs_f64(),
                    samples: n as u64,
                    skipped: batch.skipped.len() as u64,
                    loss: stats[0] as f64 / (stats[2] as f64).max(1.0),
                    group_lr: lrs.clone(),
                    stage: self.stage.index as u32 + 1,
                });
                self.cursor.loss_sum += stats[0] as f64;
                self.cursor.correct += stats[1] as u64;
                self.cursor.seen += stats[2] as u64;
                self.cursor.step = batch.step + 1;
                let cur = &self.cursor;
                progress.update(self.cursor.step as u64, || {
                    format!(
                        "loss {:.4} acc {:.3}",
                        cur.loss_sum / cur.seen.max(1) as f64,
                        cur.correct as f64 / cur.seen.max(1) as f64
                    )
                });
                if rank == 0 && last_report.elapsed().as_secs_f64() >= 1.0 {
                    last_report = Instant::now();
                    ctl.progress(epoch as u32, self.cursor.step as u64, self.cursor.seen, None);
                }
                let leaving = stats[6] as u32;
                if stats[3] > 0.0 {
                    end = DistEnd::Stopped(stop_local.unwrap_or_else(|| match stats[3] as u32 {
                        1 => format!("rank {} asked the group to stop", stats[4] as u32 - 1),
                        k => format!("{k} ranks asked the group to stop"),
                    }));
                } else if leaving as usize == c.world_size() {
                    end = DistEnd::Stopped(leave_local.unwrap_or_else(|| "every rank was asked to leave".into()));
                } else if let Some(why) = leave_local {
                    end = DistEnd::Left(why);
                } else if leaving > 0 {
                    end = DistEnd::Reform(format!("{leaving} rank(s) left the group"));
                } else if stats[7] > 0.0 {
                    end = DistEnd::Reform(reform_local.unwrap_or_else(|| "the coordinator asked to re-form".into()));
                }
                if end != DistEnd::Finished {
                    break;
                }
                if rank == 0 && self.cursor.step < steps && policy.after_step(batch.step, steps) {
                    self.save_checkpoint()?;
                }
                waited = Instant::now();
            }
            progress.finish();
            if end != DistEnd::Finished {
                if rank == 0 && matches!(end, DistEnd::Stopped(_)) {
                    self.save_checkpoint()?;
                }
                break;
            }
            self.log_cache();
            let seconds = started.elapsed().as_secs_f64();
            // Whether the loader kept up: time this rank waited for a batch, per step.
            let done = (self.cursor.step.max(1)) as f64;
            tracing::info!(
                rank,
                epoch = epoch + 1,
                data_wait_ms_per_step = format!("{:.2}", data_wait * 1e3 / done),
                step_ms = format!("{:.1}", seconds * 1e3 / done),
                skipped = self.cursor.skipped,
                "rank epoch data"
            );
            let mut totals = [self.cursor.skipped as f32];
            c.all_reduce_sum(&mut totals)?;
            let (val_loss, val_acc) = self.evaluate_distributed(c, epoch + 1 == self.spec.train.epochs)?;
            let m = self.cursor.epoch_metrics(epoch, (val_loss, val_acc), totals[0] as u64, seconds, data_wait);
            if rank == 0 {
                tracing::info!(
                    epoch = m.epoch,
                    train_loss = m.train_loss,
                    val_acc = m.val_acc,
                    images = m.images,
                    "epoch done"
                );
                ctl.progress(epoch as u32, steps as u64, self.cursor.seen, Some(&m));
                self.log_epoch(((epoch + 1) * plan.schedule_steps() as usize) as u64, &m);
            }
            self.history.push(m);
            self.cursor = Cursor { epoch: epoch + 1, world: plan.world_size(), ..Cursor::default() };
            if rank == 0 {
                self.save_checkpoint()?;
            }
        }
        Ok(DistOutcome { history: self.history.clone(), end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_time_shifts_average_the_moved_copies_and_their_mirrors() {
        let net = Network::new(Arch::Lenet5, 10, Device::Cpu);
        let x = Tensor::randn([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        // A copy moved right by 2: column c shows column c - 2, the first two repeat column 0.
        let right = Tensor::cat(&[x.narrow(3, 0, 1), x.narrow(3, 0, 1), x.narrow(3, 0, 30)], 3);
        let down = Tensor::cat(&[x.narrow(2, 0, 1), x.narrow(2, 0, 1), x.narrow(2, 0, 30)], 2);
        let left = Tensor::cat(&[x.narrow(3, 2, 30), x.narrow(3, 31, 1), x.narrow(3, 31, 1)], 3);
        let up = Tensor::cat(&[x.narrow(2, 2, 30), x.narrow(2, 31, 1), x.narrow(2, 31, 1)], 2);
        tch::no_grad(|| {
            let one = |v: &Tensor| eval_logits(&net, v, &Tta::NONE);
            let views = [&x, &right, &left, &down, &up];
            let want =
                views.iter().map(|v| one(v)).fold(Tensor::zeros([2, 10], (Kind::Float, Device::Cpu)), |a, b| a + b)
                    / 5.0;
            let got = eval_logits(&net, &x, &Tta { hflip: false, shift: 2, sizes: vec![] });
            assert!((&got - &want).abs().max().double_value(&[]) < 1e-5, "five views, edges repeated");
            let mirrored = views
                .iter()
                .map(|v| one(&v.flip([3])))
                .fold(Tensor::zeros([2, 10], (Kind::Float, Device::Cpu)), |a, b| a + b);
            let want_both = (want * 5.0 + mirrored) / 10.0;
            let both = eval_logits(&net, &x, &Tta { hflip: true, shift: 2, sizes: vec![] });
            assert!((&both - &want_both).abs().max().double_value(&[]) < 1e-5, "and the mirror of each");
        });
    }

    #[test]
    fn test_time_sizes_average_the_logits_over_the_sides() {
        let net = Network::new(Arch::Resnet18, 10, Device::Cpu);
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        tch::no_grad(|| {
            let one = |v: &Tensor, hflip: bool| eval_logits(&net, v, &Tta { hflip, shift: 0, sizes: vec![] });
            let resized = |side: i64| x.upsample_bilinear2d([side, side], false, None, None);
            let (at40, at48) = (resized(40), resized(48));
            for hflip in [false, true] {
                let want = (one(&x, hflip) + one(&at40, hflip) + one(&at48, hflip)) / 3.0;
                let got = eval_logits(&net, &x, &Tta { hflip, shift: 0, sizes: vec![40, 48] });
                let off = (&got - &want).abs().max().double_value(&[]);
                assert!(off < 1e-4, "hflip {hflip}: the mean over three sides, off by {off}");
                let moved = (&got - one(&x, hflip)).abs().max().double_value(&[]);
                assert!(moved > 1e-4, "the other sides count: {moved}");
            }
        });
    }

    #[test]
    fn test_time_flips_average_an_image_and_its_mirror() {
        let net = Network::new(Arch::Lenet5, 10, Device::Cpu);
        let x = Tensor::randn([3, 1, 32, 32], (Kind::Float, Device::Cpu));
        let mirrored = x.flip([3]);
        tch::no_grad(|| {
            let flips = Tta { hflip: true, shift: 0, sizes: vec![] };
            let (plain, flipped) = (eval_logits(&net, &x, &Tta::NONE), eval_logits(&net, &mirrored, &Tta::NONE));
            let tta = eval_logits(&net, &x, &flips);
            let want = (&plain + &flipped) * 0.5;
            assert!((&tta - &want).abs().max().double_value(&[]) < 1e-5);
            // Flip-invariant by construction, unlike the plain logits.
            let tta_mirrored = eval_logits(&net, &mirrored, &flips);
            assert!((&tta - &tta_mirrored).abs().max().double_value(&[]) < 1e-5);
            assert!((&plain - &flipped).abs().max().double_value(&[]) > 1e-6);
        });
    }
}
