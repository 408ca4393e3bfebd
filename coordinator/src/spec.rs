//! The job spec: a TOML file deserialized with unknown fields rejected, then validated in one step
//! into [`JobSpec`], whose every field is known good. Each rejection names the field and the value.
//!
//! Relative paths in a spec file are resolved against the directory that holds the file, so a spec
//! means the same thing from any working directory; the resolved spec (absolute paths, defaults
//! filled in) is what a run saves beside its outputs and inside its checkpoints.
//!
//! This module never touches tensors or the network; model-specific checks (architecture names,
//! layer-group names) happen where the model zoo is known, before anything starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::schedule::RawSchedule;
pub use crate::schedule::{BnPolicy, GroupSel, Schedule, Stage, StageSpec, Strategy};

/// A rejected spec: which field, which value, and why.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read job spec {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid job spec{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Parse { path: Option<PathBuf>, message: String },
    #[error("invalid job spec: `{field}` = {value}: {reason}")]
    Invalid { field: &'static str, value: String, reason: String },
}

pub fn invalid(field: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid { field, value: value.to_string(), reason: reason.into() }
}

/// The image sides a spec or a command accepts, in pixels (`data.image_size`, the sides of
/// `data.progressive_sizes` and `data.tta_sizes`, `--image-size`, `--tta-sizes`).
pub const IMAGE_SIDES: std::ops::RangeInclusive<i64> = 8..=1024;

/// Every side of the list `field` within [`IMAGE_SIDES`], or the error naming the first that is not.
fn check_sides(field: &'static str, sides: &[i64]) -> Result<(), SpecError> {
    match sides.iter().find(|s| !IMAGE_SIDES.contains(*s)) {
        Some(s) => Err(invalid(field, s, "every side must be between 8 and 1024 pixels")),
        None => Ok(()),
    }
}

/// The further sides of test-time scoring (`data.tta_sizes`, `thaw eval --tta-sizes`): each within
/// [`IMAGE_SIDES`], at most 4 of them (each is one more forward pass of the whole split).
pub fn check_tta_sizes(sizes: &[i64]) -> Result<(), SpecError> {
    check_sides("data.tta_sizes", sizes)?;
    if sizes.len() > 4 {
        return Err(invalid("data.tta_sizes", format!("{sizes:?}"), "takes at most 4 further sides"));
    }
    Ok(())
}

/// Where the initial weights come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "path")]
pub enum WeightsSpec {
    /// torchvision's ImageNet weights for the architecture (from the cache, or downloaded).
    Imagenet,
    /// Random initialization: training from scratch.
    None,
    /// A safetensors file made by `thaw weights import` or saved by a previous run.
    File(PathBuf),
}

impl WeightsSpec {
    fn parse(s: &str, base: &Path) -> Result<Self, SpecError> {
        match s {
            "imagenet" => Ok(WeightsSpec::Imagenet),
            "none" => Ok(WeightsSpec::None),
            "" => Err(invalid(
                "model.weights",
                "\"\"",
                "expected \"imagenet\", \"none\" or a path to a .safetensors file",
            )),
            path => Ok(WeightsSpec::File(resolve(base, path))),
        }
    }

    pub fn as_spec_str(&self) -> String {
        match self {
            WeightsSpec::Imagenet => "imagenet".into(),
            WeightsSpec::None => "none".into(),
            WeightsSpec::File(p) => p.display().to_string(),
        }
    }

    pub fn is_pretrained(&self) -> bool {
        !matches!(self, WeightsSpec::None)
    }
}

/// On-disk layout of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// MNIST-style IDX files: `train-images-idx3-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]` and labels.
    Idx,
    /// An image-folder tree: `root/train/<class>/<image>` and `root/val/<class>/...` (or `test/`);
    /// without a `val` or `test` tree, `val_fraction` of `train` is held out.
    Folder,
    /// Packed WebDataset shards (`thaw data pack`): `root` is a packed directory (`index.json`),
    /// or holds packed `train/` and `val/` directories. Epochs use the blocked plan layout
    /// (`read_block`, `shuffle_window`), so each worker reads long sequential runs.
    Shards,
}

impl DataFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Idx => "idx",
            DataFormat::Folder => "folder",
            DataFormat::Shards => "shards",
        }
    }
}

impl DataSpec {
    /// The blocked epoch layout's (read block, shuffle window) for packed shards; `None` for the
    /// other formats, which use the interleaved layout.
    pub fn blocks(&self) -> Option<(u32, u32)> {
        (self.format == DataFormat::Shards).then_some((self.read_block, self.shuffle_window))
    }

    /// The input side of 0-based `epoch`: its `progressive_sizes` entry, else `image_size`
    /// (`None`: the architecture's default).
    pub fn size_for_epoch(&self, epoch: usize) -> Option<i64> {
        self.progressive_sizes.get(epoch).copied().or(self.image_size)
    }
}

/// The optimizer and its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum OptimizerSpec {
    /// SGD with momentum, PyTorch semantics (dampening 0).
    Sgd { momentum: f64, nesterov: bool, weight_decay: f64 },
    /// AdamW (decoupled weight decay), PyTorch semantics.
    Adamw { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
}

/// Learning-rate decay over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    /// Cosine decay from `lr` to 0 over all steps, after `warmup_steps` of linear warm-up.
    Cosine,
    /// fastai's one-cycle: up from lr/25 to lr over 30% of the steps, then down to lr/250000.
    OneCycle,
}

impl LrSchedule {
    pub fn as_str(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Cosine => "cosine",
            LrSchedule::OneCycle => "one_cycle",
        }
    }
}

/// A validated job spec: every field is present and known good; paths are absolute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub seed: u64,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub schedule: Schedule,
    pub output: OutputSpec,
    pub distributed: DistributedSpec,
}

/// The arithmetic of training's forward pass (`[train] precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    Fp32,
    /// Autocast to bfloat16 (convolutions, matrix products) with f32 master weights; f32's range,
    /// so no loss scaling.
    Bf16,
    /// Autocast to float16 with f32 master weights and dynamic loss scaling.
    Fp16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

/// The collective engine that averages gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveKind {
    /// TCP ring all-reduce between CPU workers.
    Ring,
    /// NCCL between GPUs.
    Nccl,
}

impl CollectiveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CollectiveKind::Ring => "ring",
            CollectiveKind::Nccl => "nccl",
        }
    }
}

/// How a job runs on several workers (ignored by `thaw train`, which is one process).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistributedSpec {
    /// The rendezvous closes once at least `min_workers` have joined (after a last call for more)
    /// and at once at `max_workers`.
    pub min_workers: u32,
    pub max_workers: u32,
    /// Fewer than `min_workers` within this time fails the job.
    pub join_timeout_secs: f64,
    /// How long to wait for more workers once `min_workers` are in.
    pub last_call_secs: f64,
    pub collective: CollectiveKind,
    /// Gradient bucket size for the all-reduce, in MB.
    pub bucket_mb: f64,
    /// Reduce each gradient bucket while backward computes the layer groups below it (on), or
    /// after backward (off). Results are bitwise the same; on is faster wherever communication
    /// takes time.
    pub overlap: bool,
    /// Deadline of every collective call (a step's all-reduce), in seconds: a rank waits no longer
    /// for a hung peer before the group re-forms without it.
    pub step_timeout_secs: f64,
    /// A worker whose heartbeat is older than this is lost; the group re-forms without it.
    pub heartbeat_timeout_secs: f64,
    /// How long a group below `min_workers` waits for replacements before the job fails.
    pub rejoin_timeout_secs: f64,
    /// How long workers train on, and wait, while the coordinator is unreachable (restarting, a
    /// standby taking over) before they stop.
    pub coordinator_timeout_secs: f64,
    /// Failures (lost workers) the job survives; a graceful leave or an added worker is not one.
    pub max_restarts: u32,
}

impl Default for DistributedSpec {
    fn default() -> Self {
        DistributedSpec {
            min_workers: 1,
            max_workers: 1,
            join_timeout_secs: 300.0,
            last_call_secs: 2.0,
            collective: CollectiveKind::Ring,
            bucket_mb: 25.0,
            overlap: true,
            step_timeout_secs: 30.0,
            heartbeat_timeout_secs: 10.0,
            rejoin_timeout_secs: 120.0,
            coordinator_timeout_secs: 60.0,
            max_restarts: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: String,
    pub weights: WeightsSpec,
    /// `None` means "as many as the dataset has".
    pub num_classes: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    pub format: DataFormat,
    pub root: PathBuf,
    /// Side of the square network input; `None` means the architecture's default.
    pub image_size: Option<i64>,
    /// Use at most this many training images (a fixed, seeded subset).
    pub train_limit: Option<usize>,
    /// Evaluate on at most this many validation images (a fixed, seeded subset).
    pub val_limit: Option<usize>,
    pub val_fraction: f64,
    /// Random horizontal flips while training.
    pub hflip: bool,
    /// Threads that decode and transform images.
    pub loader_threads: usize,
    /// torchvision's RandomResizedCrop (area 8–100 %, aspect 3/4–4/3) for training photos,
    /// instead of resize + centre crop.
    pub random_resized_crop: bool,
    /// Shards only: samples per sequential run of the blocked epoch plan.
    pub read_block: u32,
    /// Shards only: positions shuffled together within a rank's range (the shuffle buffer).
    pub shuffle_window: u32,
    /// Unreadable samples tolerated per epoch (over all workers); more fails the job, naming
    /// them. `None`: no limit (they are always skipped, counted and named).
    pub max_skipped: Option<u64>,
    /// Tuning runs: this fraction of the *training* images (seeded) is held out and becomes the
    /// validation split, so that choices are made without ever looking at the test set.
    #[serde(default)]
    pub holdout: Option<f64>,
    /// Test-time flips: the run's final evaluation (and `thaw eval`) averages the logits of each
    /// image and of its mirror image; the epochs before it are scored plainly, at half the cost.
    #[serde(default)]
    pub tta_hflip: bool,
    /// Test-time shifts: the final evaluation also averages copies of each image moved by this
    /// many pixels of the network's input left, right, up and down (edges repeated), each
    /// mirrored too with `tta_hflip`. 0 (the default) is none.
    #[serde(default)]
    pub tta_shift: u32,
    /// Test-time scales: the final evaluation also scores each image resized to these sides
    /// (its flips and shifts too), and averages the logits over the sides. Empty (the default)
    /// is none.
    #[serde(default)]
    pub tta_sizes: Vec<i64>,
    /// Random translations while training: each stored image moves by up to this many of its own
    /// pixels each way, the border black (torchvision's `RandomCrop(padding=n)`). IDX only.
    #[serde(default)]
    pub random_shift: u32,
    /// Random erasing while training (torchvision's `RandomErasing`): the probability that an
    /// image has one rectangle of 2-33% of its area set to the mean. 0 (the default) is none.
    #[serde(default)]
    pub random_erase: f64,
    /// CutMix while training (Yun et al., 2019): the probability that a batch has a rectangle of
    /// each image replaced by another image's, the loss weighing the two labels by area. 0 (the
    /// default) is none.
    #[serde(default)]
    pub cutmix: f64,
    /// Progressive resizing: the input side of the first epochs, one entry per epoch; the epochs
    /// after the list, evaluation at the end and predictions use `image_size`. Each epoch is
    /// evaluated at the side it trained at.
    #[serde(default)]
    pub progressive_sizes: Vec<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: OptimizerSpec,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: usize,
    /// Label smoothing for the cross-entropy loss, in [0, 1).
    pub label_smoothing: f64,
    /// Memory for cached outputs of a frozen prefix (per worker, both splits), in MB; beyond it
    /// they spill to disk under the output directory. 0 turns feature caching off.
    pub feature_cache_mb: f64,
    /// The forward pass's arithmetic: fp32, or bf16/fp16 autocast with f32 master weights.
    #[serde(default)]
    pub precision: Precision,
    /// Channels-last (NHWC) activations and convolution weights; unset: the faster layout for the
    /// architecture and device (`Arch::channels_last_on`), unless `THAW_CHANNELS_LAST` says.
    #[serde(default)]
    pub channels_last: Option<bool>,
    /// An exponential moving average of the weights (BatchNorm statistics included), updated after
    /// every step with this decay, in (0, 1): evaluations, `thaw eval` and `thaw predict` use it.
    #[serde(default)]
    pub ema_decay: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub dir: PathBuf,
    /// Also checkpoint every this many steps (0: only at the end of each epoch).
    pub checkpoint_every_steps: usize,
    /// Checkpoints kept: `checkpoint.safetensors` (the latest) and, above 1, the K - 1 before it
    /// as `checkpoint-eEEEE-sSSSSSSS.safetensors`.
    pub keep_checkpoints: usize,
}

// ---- the file format ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    #[serde(default)]
    seed: u64,
    model: RawModel,
    data: RawData,
    #[serde(default)]
    train: RawTrain,
    #[serde(default)]
    schedule: Option<RawSchedule>,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    distributed: RawDistributed,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDistributed {
    workers: Option<u32>,
    min_workers: Option<u32>,
    max_workers: Option<u32>,
    join_timeout_secs: Option<f64>,
    last_call_secs: Option<f64>,
    collective: Option<CollectiveKind>,
    bucket_mb: Option<f64>,
    overlap: Option<bool>,
    #[serde(alias = "collective_timeout_secs")]
    step_timeout_secs: Option<f64>,
    heartbeat_timeout_secs: Option<f64>,
    rejoin_timeout_secs: Option<f64>,
    coordinator_timeout_secs: Option<f64>,
    max_restarts: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    arch: String,
    #[serde(default = "default_weights")]
    weights: String,
    num_classes: Option<i64>,
}

fn default_weights() -> String {
    "imagenet".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    format: DataFormat,
    root: String,
    image_size: Option<i64>,
    train_limit: Option<usize>,
    val_limit: Option<usize>,
    val_fraction: Option<f64>,
    #[serde(default)]
    hflip: bool,
    loader_threads: Option<usize>,
    #[serde(default)]
    random_resized_crop: bool,
    read_block: Option<u32>,
    shuffle_window: Option<u32>,
    max_skipped: Option<u64>,
    holdout: Option<f64>,
    #[serde(default)]
    tta_hflip: bool,
    tta_shift: Option<u32>,
    tta_sizes: Option<Vec<i64>>,
    random_shift: Option<u32>,
    random_erase: Option<f64>,
    cutmix: Option<f64>,
    progressive_sizes: Option<Vec<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTrain {
    epochs: Option<usize>,
    batch_size: Option<usize>,
    lr: Option<f64>,
    optimizer: Option<String>,
    momentum: Option<f64>,
    nesterov: Option<bool>,
    weight_decay: Option<f64>,
    betas: Option<[f64; 2]>,
    eps: Option<f64>,
    lr_schedule: Option<LrSchedule>,
    warmup_steps: Option<usize>,
    label_smoothing: Option<f64>,
    feature_cache_mb: Option<f64>,
    precision: Option<Precision>,
    channels_last: Option<bool>,
    ema_decay: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    dir: Option<String>,
    checkpoint_every_steps: Option<usize>,
    keep_checkpoints: Option<usize>,
}

/// `p` taken relative to `base` (unless absolute), with `.` and `..` folded lexically so that
/// paths read cleanly in logs and in the resolved spec.
fn resolve(base: &Path, p: &str) -> PathBuf {
    use std::path::Component;
    let joined = base.join(p);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn check_finite(
    field: &'static str,
    v: f64,
    min: f64,
    min_inclusive: bool,
    max: Option<f64>,
) -> Result<f64, SpecError> {
    let low_ok = if min_inclusive { v >= min } else { v > min };
    if !v.is_finite() || !low_ok || max.is_some_and(|m| v >= m) {
        let range = match (min_inclusive, max) {
            (true, Some(m)) => format!("must be in [{min}, {m})"),
            (false, Some(m)) => format!("must be in ({min}, {m})"),
            (true, None) => format!("must be at least {min}"),
            (false, None) => format!("must be greater than {min}"),
        };
        return Err(invalid(field, v, range));
    }
    Ok(v)
}

impl JobSpec {
    /// Reads and validates a spec file; relative paths are taken from the file's directory.
    pub fn from_file(path: &Path) -> Result<JobSpec, SpecError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: path.to_path_buf(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let base = std::path::absolute(&base).unwrap_or(base);
        Self::from_toml(&text, &base).map_err(|e| match e {
            SpecError::Parse { message, .. } => SpecError::Parse { path: Some(path.to_path_buf()), message },
            other => other,
        })
    }

    /// Parses and validates spec text; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<JobSpec, SpecError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| SpecError::Parse { path: None, message: e.to_string() })?;
        Self::validate(raw, base)
    }

    fn validate(raw: RawSpec, base: &Path) -> Result<JobSpec, SpecError> {
        let name = raw.name.trim().to_string();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
            return Err(invalid(
                "name",
                format!("\"{}\"", raw.name),
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }

        let weights = WeightsSpec::parse(&raw.model.weights, base)?;
        if let Some(n) = raw.model.num_classes {
            if n < 1 {
                return Err(invalid("model.num_classes", n, "must be at least 1"));
            }
        }
        if raw.model.arch.trim().is_empty() {
            return Err(invalid("model.arch", "\"\"", "name an architecture, e.g. \"mobilenet_v2\""));
        }
        let model = ModelSpec { arch: raw.model.arch.trim().to_string(), weights, num_classes: raw.model.num_classes };

        let d = raw.data;
        if let Some(s) = d.image_size {
            if !IMAGE_SIDES.contains(&s) {
                return Err(invalid("data.image_size", s, "must be between 8 and 1024 pixels"));
            }
        }
        if d.train_limit == Some(0) {
            return Err(invalid("data.train_limit", 0, "must be at least 1 (omit it to use every image)"));
        }
        if d.val_limit == Some(0) {
            return Err(invalid("data.val_limit", 0, "must be at least 1 (omit it to use every image)"));
        }
        let val_fraction = check_finite("data.val_fraction", d.val_fraction.unwrap_or(0.1), 0.0, false, Some(1.0))?;
        let loader_threads = d.loader_threads.unwrap_or(2);
        if loader_threads == 0 || loader_threads > 256 {
            return Err(invalid("data.loader_threads", loader_threads, "must be between 1 and 256"));
        }
        if d.format != DataFormat::Shards {
            if let Some(v) = d.read_block {
                return Err(invalid("data.read_block", v, "applies to format = \"shards\" only"));
            }
            if let Some(v) = d.shuffle_window {
                return Err(invalid("data.shuffle_window", v, "applies to format = \"shards\" only"));
            }
        }
        let read_block = d.read_block.unwrap_or(256);
        if read_block == 0 || read_block > 1 << 20 {
            return Err(invalid("data.read_block", read_block, "must be between 1 and 1048576 samples"));
        }
        let shuffle_window = d.shuffle_window.unwrap_or(1024);
        if shuffle_window == 0 || shuffle_window > 1 << 24 {
            return Err(invalid("data.shuffle_window", shuffle_window, "must be between 1 and 16777216 samples"));
        }
        if d.root.trim().is_empty() {
            return Err(invalid("data.root", "\"\"", "name the dataset directory"));
        }
        let holdout = match d.holdout {
            Some(f) => Some(check_finite("data.holdout", f, 0.0, false, Some(0.5))?),
            None => None,
        };
        let random_shift = d.random_shift.unwrap_or(0);
        if random_shift > 0 && d.format != DataFormat::Idx {
            return Err(invalid("data.random_shift", random_shift, "applies to format = \"idx\" only (photos: random_resized_crop)"));
        }
        if random_shift > 16 {
            return Err(invalid("data.random_shift", random_shift, "must be between 0 and 16 pixels"));
        }
        let random_erase = d.random_erase.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&random_erase) {
            return Err(invalid("data.random_erase", random_erase, "is a probability: between 0 and 1"));
        }
        let cutmix = d.cutmix.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&cutmix) {
            return Err(invalid("data.cutmix", cutmix, "is a probability: between 0 and 1"));
        }
        let tta_shift = d.tta_shift.unwrap_or(0);
        if tta_shift > 8 {
            return Err(invalid("data.tta_shift", tta_shift, "must be between 0 and 8 pixels"));
        }
        let tta_sizes = d.tta_sizes.unwrap_or_default();
        check_tta_sizes(&tta_sizes)?;
        let progressive_sizes = d.progressive_sizes.unwrap_or_default();
        check_sides("data.progressive_sizes", &progressive_sizes)?;
        if !progressive_sizes.is_empty() && d.image_size.is_none() {
            return Err(invalid(
                "data.progressive_sizes",
                format!("{progressive_sizes:?}"),
                "needs data.image_size, the side of the epochs after the list and of evaluation",
            ));
        }
        let data = DataSpec {
            format: d.format,
            root: resolve(base, &d.root),
            image_size: d.image_size,
            train_limit: d.train_limit,
            val_limit: d.val_limit,
            val_fraction,
            hflip: d.hflip,
            loader_threads,
            random_resized_crop: d.random_resized_crop,
            read_block,
            shuffle_window,
            max_skipped: d.max_skipped,
            holdout,
            tta_hflip: d.tta_hflip,
            tta_shift,
            tta_sizes,
            random_shift,
            random_erase,
            cutmix,
            progressive_sizes,
        };

        let t = raw.train;
        let epochs = t.epochs.unwrap_or(1);
        if epochs == 0 || epochs > 100_000 {
            return Err(invalid("train.epochs", epochs, "must be between 1 and 100000"));
        }
        let batch_size = t.batch_size.unwrap_or(32);
        if batch_size == 0 || batch_size > 65_536 {
            return Err(invalid("train.batch_size", batch_size, "must be between 1 and 65536"));
        }
        let lr = check_finite("train.lr", t.lr.unwrap_or(0.01), 0.0, false, Some(10.0))?;
        let weight_decay = check_finite("train.weight_decay", t.weight_decay.unwrap_or(0.0), 0.0, true, Some(1.0))?;
        let optimizer = match t.optimizer.as_deref().unwrap_or("sgd") {
            "sgd" => {
                if t.betas.is_some() || t.eps.is_some() {
                    return Err(invalid("train.betas", "set", "`betas` and `eps` apply to adamw, not sgd"));
                }
                OptimizerSpec::Sgd {
                    momentum: check_finite("train.momentum", t.momentum.unwrap_or(0.9), 0.0, true, Some(1.0))?,
                    nesterov: t.nesterov.unwrap_or(false),
                    weight_decay,
                }
            }
            "adamw" => {
                if t.momentum.is_some() || t.nesterov.is_some() {
                    return Err(invalid("train.momentum", "set", "`momentum` and `nesterov` apply to sgd, not adamw"));
                }
                let [b1, b2] = t.betas.unwrap_or([0.9, 0.999]);
                OptimizerSpec::Adamw {
                    beta1: check_finite("train.betas", b1, 0.0, true, Some(1.0))?,
                    beta2: check_finite("train.betas", b2, 0.0, true, Some(1.0))?,
                    eps: check_finite("train.eps", t.eps.unwrap_or(1e-8), 0.0, false, Some(1.0))?,
                    weight_decay,
                }
            }
            other => return Err(invalid("train.optimizer", format!("\"{other}\""), "expected \"sgd\" or \"adamw\"")),
        };
        let label_smoothing =
            check_finite("train.label_smoothing", t.label_smoothing.unwrap_or(0.0), 0.0, true, Some(1.0))?;
        let train = TrainSpec {
            epochs,
            batch_size,
            lr,
            optimizer,
            lr_schedule: t.lr_schedule.unwrap_or(LrSchedule::Constant),
            warmup_steps: t.warmup_steps.unwrap_or(0),
            label_smoothing,
            feature_cache_mb: check_finite(
                "train.feature_cache_mb",
                t.feature_cache_mb.unwrap_or(2048.0),
                0.0,
                true,
                Some(1e7),
            )?,
            precision: t.precision.unwrap_or_default(),
            channels_last: t.channels_last,
            ema_decay: t.ema_decay.map(|d| check_finite("train.ema_decay", d, 0.0, false, Some(1.0))).transpose()?,
        };

        if train.lr_schedule == LrSchedule::OneCycle && train.warmup_steps > 0 {
            return Err(invalid(
                "train.warmup_steps",
                train.warmup_steps,
                "one_cycle has its own warm-up; set it to 0",
            ));
        }
        let schedule = Schedule::from_raw(raw.schedule, &model.weights)?;

        let output = OutputSpec {
            dir: resolve(base, raw.output.dir.as_deref().unwrap_or(&format!("runs/{name}"))),
            checkpoint_every_steps: raw.output.checkpoint_every_steps.unwrap_or(0),
            keep_checkpoints: match raw.output.keep_checkpoints.unwrap_or(1) {
                0 => return Err(invalid("output.keep_checkpoints", 0, "keep at least the latest checkpoint (1)")),
                k => k,
            },
        };
        let d = raw.distributed;
        let defaults = DistributedSpec::default();
        if d.workers.is_some() && (d.min_workers.is_some() || d.max_workers.is_some()) {
            return Err(invalid("distributed.workers", "set", "give either `workers` or `min_workers`/`max_workers`"));
        }
        let min_workers = d.workers.or(d.min_workers).unwrap_or(defaults.min_workers);
        let max_workers = d.workers.or(d.max_workers).unwrap_or(min_workers.max(defaults.max_workers));
        if min_workers == 0 || min_workers > 65_536 {
            return Err(invalid("distributed.min_workers", min_workers, "must be between 1 and 65536"));
        }
        if max_workers < min_workers || max_workers > 65_536 {
            return Err(invalid(
                "distributed.max_workers",
                max_workers,
                format!("must be between min_workers ({min_workers}) and 65536"),
            ));
        }
        let distributed = DistributedSpec {
            min_workers,
            max_workers,
            join_timeout_secs: check_finite(
                "distributed.join_timeout_secs",
                d.join_timeout_secs.unwrap_or(defaults.join_timeout_secs),
                0.0,
                false,
                Some(86_400.0),
            )?,
            last_call_secs: check_finite(
                "distributed.last_call_secs",
                d.last_call_secs.unwrap_or(defaults.last_call_secs),
                0.0,
                true,
                Some(3_600.0),
            )?,
            collective: d.collective.unwrap_or(defaults.collective),
            bucket_mb: check_finite(
                "distributed.bucket_mb",
                d.bucket_mb.unwrap_or(defaults.bucket_mb),
                0.0,
                false,
                Some(4096.0),
            )?,
            overlap: d.overlap.unwrap_or(defaults.overlap),
            step_timeout_secs: check_finite(
                "distributed.step_timeout_secs",
                d.step_timeout_secs.unwrap_or(defaults.step_timeout_secs),
                0.0,
                false,
                Some(86_400.0),
            )?,
            heartbeat_timeout_secs: check_finite(
                "distributed.heartbeat_timeout_secs",
                d.heartbeat_timeout_secs.unwrap_or(defaults.heartbeat_timeout_secs),
                0.5,
                true,
                Some(3_600.0),
            )?,
            rejoin_timeout_secs: check_finite(
                "distributed.rejoin_timeout_secs",
                d.rejoin_timeout_secs.unwrap_or(defaults.rejoin_timeout_secs),
                0.0,
                true,
                Some(86_400.0),
            )?,
            coordinator_timeout_secs: check_finite(
                "distributed.coordinator_timeout_secs",
                d.coordinator_timeout_secs.unwrap_or(defaults.coordinator_timeout_secs),
                1.0,
                true,
                Some(86_400.0),
            )?,
            max_restarts: d.max_restarts.unwrap_or(defaults.max_restarts),
        };
        Ok(JobSpec { name, seed: raw.seed, model, data, train, schedule, output, distributed })
    }

    /// The resolved spec as TOML in the same format the file uses (absolute paths, defaults
    /// filled in), so that it parses back into an equal [`JobSpec`].
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        s += &format!(
            "name = {}\nseed = {}\n\n[model]\narch = {}\nweights = {}\n",
            q(&self.name),
            self.seed,
            q(&self.model.arch),
            q(&self.model.weights.as_spec_str())
        );
        if let Some(n) = self.model.num_classes {
            s += &format!("num_classes = {n}\n");
        }
        let d = &self.data;
        s += &format!("\n[data]\nformat = {}\nroot = {}\n", q(d.format.as_str()), q(&d.root.display().to_string()));
        if let Some(v) = d.image_size {
            s += &format!("image_size = {v}\n");
        }
        if let Some(v) = d.train_limit {
            s += &format!("train_limit = {v}\n");
        }
        if let Some(v) = d.val_limit {
            s += &format!("val_limit = {v}\n");
        }
        s += &format!(
            "val_fraction = {:?}\nhflip = {}\nloader_threads = {}\n",
            d.val_fraction, d.hflip, d.loader_threads
        );
        if d.random_resized_crop {
            s += "random_resized_crop = true\n";
        }
        if d.format == DataFormat::Shards {
            s += &format!("read_block = {}\nshuffle_window = {}\n", d.read_block, d.shuffle_window);
        }
        if let Some(v) = d.max_skipped {
            s += &format!("max_skipped = {v}\n");
        }
        if let Some(v) = d.holdout {
            s += &format!("holdout = {v:?}\n");
        }
        if d.tta_hflip {
            s += "tta_hflip = true\n";
        }
        if d.tta_shift > 0 {
            s += &format!("tta_shift = {}\n", d.tta_shift);
        }
        if !d.tta_sizes.is_empty() {
            s += &format!("tta_sizes = {:?}\n", d.tta_sizes);
        }
        if d.random_shift > 0 {
            s += &format!("random_shift = {}\n", d.random_shift);
        }
        if d.random_erase > 0.0 {
            s += &format!("random_erase = {:?}\n", d.random_erase);
        }
        if d.cutmix > 0.0 {
            s += &format!("cutmix = {:?}\n", d.cutmix);
        }
        if !d.progressive_sizes.is_empty() {
            s += &format!("progressive_sizes = {:?}\n", d.progressive_sizes);
        }
        let t = &self.train;
        s += &format!("\n[train]\nepochs = {}\nbatch_size = {}\nlr = {:?}\n", t.epochs, t.batch_size, t.lr);
        match t.optimizer {
            OptimizerSpec::Sgd { momentum, nesterov, weight_decay } => {
                s += &format!("optimizer = \"sgd\"\nmomentum = {momentum:?}\nnesterov = {nesterov}\nweight_decay = {weight_decay:?}\n")
            }
            OptimizerSpec::Adamw { beta1, beta2, eps, weight_decay } => {
                s += &format!("optimizer = \"adamw\"\nbetas = [{beta1:?}, {beta2:?}]\neps = {eps:?}\nweight_decay = {weight_decay:?}\n")
            }
        }
        s += &format!(
            "lr_schedule = {}\nwarmup_steps = {}\nlabel_smoothing = {:?}\nfeature_cache_mb = {:?}\n",
            q(t.lr_schedule.as_str()),
            t.warmup_steps,
            t.label_smoothing,
            t.feature_cache_mb
        );
        s += &format!("precision = {}\n", q(t.precision.as_str()));
        if let Some(cl) = t.channels_last {
            s += &format!("channels_last = {cl}\n");
        }
        if let Some(d) = t.ema_decay {
            s += &format!("ema_decay = {d:?}\n");
        }
        s += &self.schedule.to_toml();
        s += &format!(
            "\n[output]\ndir = {}\ncheckpoint_every_steps = {}\nkeep_checkpoints = {}\n",
            q(&self.output.dir.display().to_string()),
            self.output.checkpoint_every_steps,
            self.output.keep_checkpoints
        );
        let d = &self.distributed;
        s += &format!(
            "\n[distributed]\nmin_workers = {}\nmax_workers = {}\njoin_timeout_secs = {:?}\nlast_call_secs = {:?}\ncollective = {}\nbucket_mb = {:?}\noverlap = {}\nstep_timeout_secs = {:?}\nheartbeat_timeout_secs = {:?}\nrejoin_timeout_secs = {:?}\ncoordinator_timeout_secs = {:?}\nmax_restarts = {}\n",
            d.min_workers,
            d.max_workers,
            d.join_timeout_secs,
            d.last_call_secs,
            q(d.collective.as_str()),
            d.bucket_mb,
            d.overlap,
            d.step_timeout_secs,
            d.heartbeat_timeout_secs,
            d.rejoin_timeout_secs,
            d.coordinator_timeout_secs,
            d.max_restarts
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "fmnist"
[model]
arch = "mobilenet_v2"
num_classes = 10
[data]
format = "idx"
root = "data/fmnist"
image_size = 64
[train]
epochs = 2
batch_size = 64
lr = 0.05
[schedule]
strategy = "feature_extract"
"#;

    fn parse(text: &str) -> Result<JobSpec, SpecError> {
        JobSpec::from_toml(text, Path::new("/base"))
    }

    #[test]
    fn good_spec_resolves_paths_and_defaults() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.data.root, PathBuf::from("/base/data/fmnist"));
        assert_eq!(s.output.dir, PathBuf::from("/base/runs/fmnist"));
        let up = parse(&GOOD.replace("data/fmnist", "../data/./fmnist")).unwrap();
        assert_eq!(up.data.root, PathBuf::from("/data/fmnist"));
        assert_eq!(s.model.weights, WeightsSpec::Imagenet);
        assert_eq!(s.schedule.strategy, Strategy::FeatureExtract);
        assert_eq!(s.train.optimizer, OptimizerSpec::Sgd { momentum: 0.9, nesterov: false, weight_decay: 0.0 });
    }

    #[test]
    fn resolved_spec_round_trips_through_toml() {
        let s = parse(GOOD).unwrap();
        let again = JobSpec::from_toml(&s.to_toml(), Path::new("/elsewhere")).unwrap();
        assert_eq!(s, again);
        let dist = parse(&GOOD.replace("[schedule]", "[distributed]\nworkers = 4\ncollective = \"nccl\"\n[schedule]"))
            .unwrap();
        assert_eq!((dist.distributed.min_workers, dist.distributed.max_workers), (4, 4));
        assert_eq!(dist, JobSpec::from_toml(&dist.to_toml(), Path::new("/x")).unwrap());
        let adam = parse(&GOOD.replace("lr = 0.05", "lr = 0.001\noptimizer = \"adamw\"\nbetas = [0.8, 0.99]")).unwrap();
        assert_eq!(adam, JobSpec::from_toml(&adam.to_toml(), Path::new("/x")).unwrap());
        let shards = parse(&GOOD.replace(
            "format = \"idx\"",
            "format = \"shards\"\nrandom_resized_crop = true\nread_block = 64\nshuffle_window = 512\nmax_skipped = 3",
        ))
        .unwrap();
        assert_eq!((shards.data.read_block, shards.data.shuffle_window, shards.data.max_skipped), (64, 512, Some(3)));
        assert!(shards.data.random_resized_crop);
        assert_eq!(shards, JobSpec::from_toml(&shards.to_toml(), Path::new("/x")).unwrap());
        let tuned = parse(&GOOD.replace(
            "format = \"idx\"",
            "format = \"idx\"\nholdout = 0.1\ntta_hflip = true\ntta_shift = 2\ntta_sizes = [72]\nrandom_shift = 2\nrandom_erase = 0.25\ncutmix = 0.5\nprogressive_sizes = [32, 48]",
        ))
        .unwrap();
        assert_eq!((tuned.data.holdout, tuned.data.tta_hflip, tuned.data.random_shift), (Some(0.1), true, 2));
        assert_eq!((tuned.data.tta_shift, tuned.data.random_erase, tuned.data.cutmix), (2, 0.25, 0.5));
        assert_eq!(tuned.data.tta_sizes, [72]);
        let sizes: Vec<_> = (0..4).map(|e| tuned.data.size_for_epoch(e)).collect();
        assert_eq!(sizes, [Some(32), Some(48), Some(64), Some(64)]);
        assert_eq!(tuned, JobSpec::from_toml(&tuned.to_toml(), Path::new("/x")).unwrap());
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let err = parse(&GOOD.replace("epochs = 2", "epochs = 2\nepochz = 3")).unwrap_err().to_string();
        assert!(err.contains("epochz"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field_and_value() {
        let cases = [
            ("num_classes = 10", "num_classes = 0", "model.num_classes` = 0"),
            ("lr = 0.05", "lr = -1.0", "train.lr` = -1"),
            ("batch_size = 64", "batch_size = 0", "train.batch_size` = 0"),
            ("batch_size = 64", "batch_size = 64\nema_decay = 1.0", "train.ema_decay` = 1"),
            ("batch_size = 64", "batch_size = 64\nema_decay = 0.0", "train.ema_decay` = 0"),
            ("image_size = 64", "image_size = 4", "data.image_size` = 4"),
            ("image_size = 64", "image_size = 64\nholdout = 0.7", "data.holdout` = 0.7"),
            ("image_size = 64", "image_size = 64\nholdout = 0.0", "data.holdout` = 0"),
            ("image_size = 64", "image_size = 64\nrandom_shift = 17", "data.random_shift` = 17"),
            ("image_size = 64", "image_size = 64\nrandom_erase = 1.5", "data.random_erase` = 1.5"),
            ("image_size = 64", "image_size = 64\nrandom_erase = -0.1", "data.random_erase` = -0.1"),
            ("image_size = 64", "image_size = 64\ncutmix = 2.0", "data.cutmix` = 2"),
            ("image_size = 64", "image_size = 64\ntta_shift = 9", "data.tta_shift` = 9"),
            ("image_size = 64", "image_size = 64\ntta_sizes = [72, 4]", "data.tta_sizes` = 4"),
            ("image_size = 64", "image_size = 64\ntta_sizes = [40, 48, 56, 72, 80]", "tta_sizes` = [40, 48, 56, 72"),
            ("image_size = 64", "image_size = 64\nprogressive_sizes = [32, 2000]", "data.progressive_sizes` = 2000"),
            ("image_size = 64", "progressive_sizes = [32]", "data.progressive_sizes` = [32]"),
            ("format = \"idx\"", "format = \"folder\"\nrandom_shift = 2", "data.random_shift` = 2"),
            ("strategy = \"feature_extract\"", "strategy = \"frozen_soup\"", "\"frozen_soup\""),
            ("strategy = \"feature_extract\"", "strategy = \"freeze_bottom\"", "schedule.k` = missing"),
            ("name = \"fmnist\"", "name = \"a b\"", "`name` = \"a b\""),
            (
                "[schedule]",
                "[distributed]\nmin_workers = 3\nmax_workers = 2\n[schedule]",
                "distributed.max_workers` = 2",
            ),
            ("[schedule]", "[distributed]\nworkers = 0\n[schedule]", "distributed.min_workers` = 0"),
            (
                "image_size = 64",
                "image_size = 64\nread_block = 8",
                "data.read_block` = 8: applies to format = \"shards\"",
            ),
            ("format = \"idx\"", "format = \"shards\"\nshuffle_window = 0", "data.shuffle_window` = 0"),
        ];
        for (from, to, expect) in cases {
            let err = parse(&GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(expect), "{to}: {err}");
        }
    }

    #[test]
    fn scratch_with_pretrained_weights_is_rejected() {
        let err = parse(&GOOD.replace("\"feature_extract\"", "\"scratch\"")).unwrap_err().to_string();
        assert!(err.contains("model.weights") && err.contains("scratch"), "{err}");
        let ok = parse(
            &GOOD.replace("\"feature_extract\"", "\"scratch\"").replace("arch = ", "weights = \"none\"\narch = "),
        );
        assert_eq!(ok.unwrap().schedule.strategy, Strategy::Scratch);
    }
}
