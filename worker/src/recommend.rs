//! `thaw recommend`: measures a dataset and picks one of the four transfer strategies for it, with
//! a ready job spec.
//!
//! The choice follows the classic 2x2 of transfer learning (size of the data x similarity to the
//! pretraining data, ImageNet): small + similar trains only a new head (`feature_extract`), small +
//! different freezes the generic early groups (`freeze_bottom`), large + similar fine-tunes
//! everything at a lower learning rate (`finetune_all`). Large + different would classically train
//! from a random init; measured on Fashion-MNIST, the pretrained init wins all the same, so it
//! fine-tunes everything but the first third of the trunk (`freeze_bottom`) at a high learning
//! rate on one cycle ([`DIFFERENT_FINETUNE_LR_FACTOR`]), and only `--weights none` trains from
//! scratch. Both axes are measured, not guessed:
//!
//! - **Size** ([`SIZE_RULE`]): *large* when the training split has at least [`LARGE_TOTAL`] images
//!   and the median class at least [`LARGE_PER_CLASS`]. ImageNet-1k has about 1,300 images per
//!   class, and CIFAR-10 (5,000 per class) or Fashion-MNIST (6,000) are routinely trained from
//!   scratch; with a few hundred per class a from-scratch CNN overfits.
//! - **Similarity** ([`SIMILARITY_RULE`]), from the pretrained network at the image size the job
//!   would train with:
//!   1. *linear probe*: pooled trunk features (eval mode, no grad, the trainer's preprocessing) of
//!      up to `probe_samples` training images; a multinomial logistic regression (standardized
//!      features, L2 penalty `|W|^2 / 2n` as scikit-learn's `C = 1`, full batch, Adam, a fixed
//!      number of steps from a zero init, so deterministic) is fit on a stratified 80% and scored
//!      on the other 20%. The same probe on the features of the same architecture with a random
//!      init (seeded) is the baseline; the *error reduction* is the share of the random probe's
//!      error that the pretrained features remove: `(acc_pre - acc_rand) / (1 - acc_rand)`.
//!   2. *ImageNet classifier confidence* (only with `weights = imagenet`, the 1000-class head):
//!      the mean maximum softmax probability (Hendrycks & Gimpel, 2017, a baseline
//!      out-of-distribution score) and the mean normalized entropy `H / ln 1000` over the same
//!      images.
//!
//!   Similar ("high") when the pretrained features remove at least half of the random probe's
//!   error ([`MIN_ERROR_REDUCTION`]) *and*, where the classifier numbers exist, its mean
//!   normalized entropy is at most [`MAX_ENTROPY`]. The probe is the criterion: it asks directly
//!   whether ImageNet's features separate these classes better than an untrained network's. On
//!   photographs of objects, ImageNet features under a linear classifier come close to fine-tuned
//!   accuracy (Kornblith et al., 2019), so most of the error should go; Fashion-MNIST, measured
//!   here with MobileNetV2, loses about a quarter (0.75 vs 0.66 at 32 pixels, 0.82 vs 0.77 at
//!   224). The entropy is a guard, not a detector: ImageNet has clothing classes, so its
//!   classifier is fairly sure of Fashion-MNIST at 96 pixels (0.27) yet near-uniform at 32 (0.94),
//!   as it is for any image far below the 224 pixels it was trained at (scikit-image's photos:
//!   0.40 at 224, 0.87 at 32). Above 0.8 the network does not recognise the inputs at all,
//!   whatever the probe says.
//!
//! Everything is measured at the image size the job would train with, since that is what the
//! pretrained trunk will see.
//!
//! The learning rates, epochs and `k` come from documented rules too (see [`base_lr`],
//! [`epochs_for`], [`freeze_k`]). Nothing here trains the model or writes a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use thaw_coordinator::spec::{DataFormat, DataSpec, JobSpec, SpecError, IMAGE_SIDES};

use crate::data::loader::{Loader, LoaderConfig};
use crate::data::transform::Transform;
use crate::data::{self, DataError, Dataset};
use crate::progress::Progress;
use crate::weights::{self, WeightsError};
use crate::zoo::{Arch, GroupMode, Network, UnknownArch};

/// A dataset is large with at least this many training images...
pub const LARGE_TOTAL: usize = 10_000;
/// ... and at least this many in its median class.
pub const LARGE_PER_CLASS: usize = 1_000;
/// The size rule, as printed.
pub const SIZE_RULE: &str =
    "large if training images >= 10000 and median images per class >= 1000 (ImageNet has ~1300 per class); else small";
/// Similar when the pretrained features remove at least this share of the random probe's error...
pub const MIN_ERROR_REDUCTION: f64 = 0.5;
/// ... and ImageNet's classifier recognises the images (mean normalized entropy at most this).
pub const MAX_ENTROPY: f64 = 0.8;
/// The similarity rule, as printed.
pub const SIMILARITY_RULE: &str = "high if the linear probe on pretrained features removes at least half of the \
     random-init probe's error, (acc_pre - acc_rand) / (1 - acc_rand) >= 0.5, and (with ImageNet weights) the \
     ImageNet classifier's mean normalized entropy H/ln(1000) <= 0.8; else low";

/// Images decoded to measure sizes and colour.
const SIZE_SAMPLES: usize = 200;
/// The fewest readable images a probe needs.
const MIN_PROBE: usize = 20;
/// Full-batch steps of the logistic-regression probe, and its Adam learning rate.
const PROBE_STEPS: usize = 300;
const PROBE_LR: f64 = 0.01;

/// What to measure and recommend for.
#[derive(Clone, Debug)]
pub struct RecommendOptions {
    pub data: PathBuf,
    /// `None`: IDX when the directory holds `train-images-idx3-ubyte[.gz]`, else an image folder.
    pub format: Option<DataFormat>,
    pub arch: String,
    /// `"imagenet"`, `"none"`, or a path to a weights file (as in a job spec).
    pub weights: String,
    /// Side of the network input; `None`: the architecture's default.
    pub image_size: Option<i64>,
    /// Use at most this many training images (a seeded subset, as `data.train_limit`).
    pub limit: Option<usize>,
    /// Training images the similarity probe uses (at most).
    pub probe_samples: usize,
    pub seed: u64,
    pub device: Device,
    /// Threads that decode images.
    pub threads: usize,
}

impl RecommendOptions {
    /// Defaults: detected format, ImageNet weights, the model's image size, every image, 1000
    /// probe samples, seed 0, CPU, 2 decoding threads.
    pub fn new(data: impl Into<PathBuf>, arch: impl Into<String>) -> Self {
        RecommendOptions {
            data: data.into(),
            format: None,
            arch: arch.into(),
            weights: "imagenet".into(),
            image_size: None,
            limit: None,
            probe_samples: 1000,
            seed: 0,
            device: Device::Cpu,
            threads: 2,
        }
    }
}

/// Why no recommendation could be made; each names the offending value.
#[derive(Debug, thiserror::Error)]
pub enum RecommendError {
    #[error(transparent)]
    Arch(#[from] UnknownArch),
    #[error("data directory {} does not exist", .0.display())]
    MissingData(PathBuf),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{}: the training split is empty{}", path.display(), limit.map(|l| format!(" (limit {l})")).unwrap_or_default())]
    EmptyDataset { path: PathBuf, limit: Option<usize> },
    #[error("{}: {classes} class{}; a classifier needs at least 2", path.display(), if *classes == 1 { "" } else { "es" })]
    TooFewClasses { path: PathBuf, classes: usize },
    #[error("--limit {0}: must be at least 1 (omit it to use every image)")]
    Limit(usize),
    #[error("--image-size {0}: must be between 8 and 1024 pixels")]
    ImageSize(i64),
    #[error("--probe-samples {0}: must be at least {MIN_PROBE}")]
    ProbeSamples(usize),
    #[error("weights {0:?}: expected \"imagenet\", \"none\" or a path to a .safetensors file")]
    WeightsArg(String),
    #[error("weights file {} does not exist", .0.display())]
    MissingWeights(PathBuf),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{}: only {usable} of {asked} probe images could be read (need {MIN_PROBE}); first error: {first}", path.display())]
    TooFewReadable { path: PathBuf, usable: usize, asked: usize, first: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("the recommended spec does not validate (a bug in thaw recommend): {0}\n{1}")]
    Spec(SpecError, String),
}

/// Minimum, median and maximum of a list of counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Spread {
    pub min: usize,
    pub median: usize,
    pub max: usize,
}

impl Spread {
    fn of(mut v: Vec<usize>) -> Spread {
        if v.is_empty() {
            return Spread { min: 0, median: 0, max: 0 };
        }
        v.sort_unstable();
        Spread { min: v[0], median: v[v.len() / 2], max: v[v.len() - 1] }
    }
}

/// What the dataset is made of.
#[derive(Clone, Debug, Serialize)]
pub struct DatasetStats {
    pub root: PathBuf,
    pub format: DataFormat,
    /// The `--limit` that was applied, if any.
    pub limit: Option<usize>,
    pub train_samples: usize,
    pub classes: usize,
    pub per_class: Spread,
    /// Over `sampled_images` decoded training images.
    pub width: Spread,
    pub height: Spread,
    pub sampled_images: usize,
    /// Sampled images with no colour (grayscale files, or colour files whose channels agree).
    pub grayscale_images: usize,
    /// `"grayscale"`, `"colour"` or `"mixed"`.
    pub channels: String,
}

/// How close the data is to ImageNet, as the pretrained network sees it.
#[derive(Clone, Debug, Serialize)]
pub struct SimilarityStats {
    pub weights: String,
    /// Side of the network input the measures were taken at.
    pub image_size: i64,
    /// Images the probe fit on and was scored on (unreadable ones are left out).
    pub probe_train: usize,
    pub probe_test: usize,
    pub probe_skipped: usize,
    /// Linear-probe test accuracy on the pretrained features.
    pub probe_accuracy_pretrained: f64,
    /// The same probe on the features of a random init (the baseline).
    pub probe_accuracy_random: f64,
    /// `probe_accuracy_pretrained - probe_accuracy_random`.
    pub probe_gain: f64,
    /// `probe_gain / (1 - probe_accuracy_random)`: the share of the baseline's error removed.
    pub error_reduction: f64,
    /// ImageNet classifier: mean maximum softmax probability (ImageNet weights only).
    pub imagenet_max_prob: Option<f64>,
    /// ImageNet classifier: mean entropy of its prediction over ln(1000) (ImageNet weights only).
    pub imagenet_entropy: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn as_str(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Similarity {
    High,
    Low,
}

impl Similarity {
    pub fn as_str(self) -> &'static str {
        match self {
            Similarity::High => "high",
            Similarity::Low => "low",
        }
    }
}

/// The measurements, the quadrant, the strategy with its hyper-parameters, and a job spec.
#[derive(Clone, Debug, Serialize)]
pub struct Recommendation {
    pub arch: String,
    pub dataset: DatasetStats,
    /// `None` with `weights = "none"`: there is nothing pretrained to measure.
    pub measures: Option<SimilarityStats>,
    pub size: Size,
    pub similarity: Similarity,
    pub size_rule: String,
    pub similarity_rule: String,
    /// A `[schedule] strategy` name.
    pub strategy: String,
    /// Frozen groups for `freeze_bottom`.
    pub k: Option<usize>,
    /// `model.weights` of the spec.
    pub weights: String,
    pub lr: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub reasons: Vec<String>,
    /// A complete job spec (TOML) that `JobSpec::from_toml` accepts.
    pub spec_toml: String,
}

/// Where the pretrained weights come from (a resolved `RecommendOptions::weights`).
enum Weights {
    Imagenet(PathBuf),
    None,
    File(PathBuf),
}

/// Measures the dataset and the pretrained model's fit to it, and recommends a strategy.
pub fn recommend(opts: &RecommendOptions) -> Result<Recommendation, RecommendError> {
    let arch = Arch::from_name(&opts.arch)?;
    if !opts.data.is_dir() {
        return Err(RecommendError::MissingData(opts.data.clone()));
    }
    if opts.limit == Some(0) {
        return Err(RecommendError::Limit(0));
    }
    if let Some(s) = opts.image_size {
        if !IMAGE_SIDES.contains(&s) {
            return Err(RecommendError::ImageSize(s));
        }
    }
    if opts.probe_samples < MIN_PROBE {
        return Err(RecommendError::ProbeSamples(opts.probe_samples));
    }
    // Weights are checked (and found) before the data is read.
    let weights = match opts.weights.as_str() {
        "none" => Weights::None,
        "imagenet" => Weights::Imagenet(weights::resolve_imagenet(arch, &weights::FetchOptions::from_env())?),
        "" => return Err(RecommendError::WeightsArg(String::new())),
        p => {
            let p = std::path::absolute(p).unwrap_or_else(|_| PathBuf::from(p));
            if !p.is_file() {
                return Err(RecommendError::MissingWeights(p));
            }
            Weights::File(p)
        }
    };
    let root = std::path::absolute(&opts.data).unwrap_or_else(|_| opts.data.clone());
    let format = opts.format.unwrap_or_else(|| detect_format(&root));
    let mut data_spec = DataSpec {
        format,
        root: root.clone(),
        image_size: opts.image_size,
        train_limit: opts.limit,
        val_limit: None,
        val_fraction: 0.1,
        hflip: false,
        loader_threads: opts.threads.max(1),
        random_resized_crop: false,
        read_block: 256,
        shuffle_window: 1024,
        max_skipped: None,
        holdout: None,
        tta_hflip: false,
        tta_shift: 0,
        tta_sizes: Vec::new(),
        random_shift: 0,
        random_erase: 0.0,
        cutmix: 0.0,
        progressive_sizes: Vec::new(),
    };
    let splits = data::open_splits(&data_spec, opts.seed)?;
    let train = splits.train;
    if train.is_empty() {
        return Err(RecommendError::EmptyDataset { path: root, limit: opts.limit });
    }
    let dataset = measure_dataset(train.as_ref(), &root, format, opts.limit, opts.seed);
    if dataset.classes < 2 {
        return Err(RecommendError::TooFewClasses { path: root, classes: dataset.classes });
    }
    tracing::info!(
        root = %root.display(),
        images = dataset.train_samples,
        classes = dataset.classes,
        per_class_median = dataset.per_class.median,
        channels = %dataset.channels,
        "measured the dataset"
    );

    // Small images train (and so are probed) at a small side unless --image-size says.
    let small_side = if opts.image_size.is_none() { small_image_side(arch, &dataset) } else { None };
    let image_size = opts.image_size.or(small_side);
    let transform = Transform::new(&arch.preprocess(), image_size, train.resize_whole());
    // With the 1000-class head of the ImageNet weights, which measure (b) uses.
    let net = Network::new(arch, 1000, opts.device);
    let trunk_groups = net.groups().len() - 1;
    let measures = match &weights {
        Weights::None => None,
        w => Some(measure_similarity(net, opts, w, train.clone(), &transform)?),
    };
    if let Some(m) = &measures {
        tracing::info!(
            pretrained = m.probe_accuracy_pretrained,
            random = m.probe_accuracy_random,
            error_reduction = m.error_reduction,
            max_prob = ?m.imagenet_max_prob,
            entropy = ?m.imagenet_entropy,
            "measured the similarity to ImageNet"
        );
    }

    let weights_spec = match &weights {
        Weights::File(p) => p.display().to_string(),
        _ => opts.weights.clone(),
    };
    let mut rec = decide(arch, dataset, measures, trunk_groups, &weights_spec);
    if let Some(side) = small_side {
        data_spec.image_size = Some(side);
        rec.reasons.push(format!(
            "the images are small ({}x{}): the spec trains (and the probe measured) at {side}x{side} rather than \
             {arch}'s {n}x{n}, {:.0}x fewer pixels per image (README, \"Time to accuracy\"); --image-size sets another",
            rec.dataset.width.median,
            rec.dataset.height.median,
            (arch.preprocess().input_size as f64 / side as f64).powi(2),
            n = arch.preprocess().input_size,
        ));
    }
    rec.spec_toml = spec_toml(&rec, &data_spec, opts.seed);
    // The spec is the product: check it the way `thaw train` will.
    if let Err(e) = JobSpec::from_toml(&rec.spec_toml, &std::env::current_dir().unwrap_or_default()) {
        return Err(RecommendError::Spec(e, rec.spec_toml));
    }
    Ok(rec)
}

/// IDX when the directory holds MNIST-style training files, shards when it is packed, else an
/// image folder.
fn detect_format(dir: &Path) -> DataFormat {
    let idx = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"].iter().any(|f| dir.join(f).is_file());
    let packed = [dir.join("index.json"), dir.join("train").join("index.json")].iter().any(|f| f.is_file());
    if idx {
        DataFormat::Idx
    } else if packed {
        DataFormat::Shards
    } else {
        DataFormat::Folder
    }
}

fn measure_dataset(ds: &dyn Dataset, root: &Path, format: DataFormat, limit: Option<usize>, seed: u64) -> DatasetStats {
    let classes = ds.class_names().len();
    let mut counts = vec![0usize; classes];
    for i in 0..ds.len() {
        if let Some(c) = counts.get_mut(ds.label(i) as usize) {
            *c += 1;
        }
    }
    let (mut widths, mut heights, mut gray) = (Vec::new(), Vec::new(), 0);
    for &i in data::permutation(ds.len(), seed, 0x512E).iter().take(SIZE_SAMPLES) {
        match ds.load(i) {
            Ok(img) => {
                widths.push(img.width() as usize);
                heights.push(img.height() as usize);
                gray += usize::from(is_grayscale(&img));
            }
            Err(e) => tracing::warn!(key = %e.key, reason = %e.reason, "skipping unreadable sample"),
        }
    }
    let sampled = widths.len();
    let channels = match gray {
        g if g == sampled => "grayscale",
        0 => "colour",
        _ => "mixed",
    };
    DatasetStats {
        root: root.to_path_buf(),
        format,
        limit,
        train_samples: ds.len(),
        classes,
        per_class: Spread::of(counts),
        width: Spread::of(widths),
        height: Spread::of(heights),
        sampled_images: sampled,
        grayscale_images: gray,
        channels: channels.into(),
    }
}

/// No colour: a grayscale image, or one whose channels differ by more than 16 levels in under 1%
/// of its pixels (JPEG noise aside, a gray picture saved as RGB).
fn is_grayscale(img: &image::DynamicImage) -> bool {
    if !img.color().has_color() {
        return true;
    }
    let rgb = img.to_rgb8();
    let coloured =
        rgb.pixels().filter(|p| p.0.iter().max().unwrap_or(&0) - p.0.iter().min().unwrap_or(&0) > 16).count();
    (coloured as f64) < 0.01 * (rgb.width() as f64 * rgb.height() as f64)
}

/// The probe's images: a seeded choice of `n` training images, then every fifth image of each class
/// (in class order) held out for scoring: a stratified 80/20 split.
fn probe_split(ds: &dyn Dataset, n: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut chosen: Vec<(i64, usize, usize)> = data::permutation(ds.len(), seed, 0x9B0E)
        .into_iter()
        .take(n)
        .enumerate()
        .map(|(rank, i)| (ds.label(i), rank, i))
        .collect();
    chosen.sort_unstable();
    let (mut fit, mut score) = (Vec::new(), Vec::new());
    for (k, (_, _, i)) in chosen.into_iter().enumerate() {
        if k % 5 == 4 {
            score.push(i);
        } else {
            fit.push(i);
        }
    }
    (fit, score)
}

/// Pooled features (and the ImageNet head's softmax statistics) of the probe images, for the
/// pretrained network and a random init of the same architecture.
struct Features {
    pretrained: Tensor,
    random: Tensor,
    labels: Tensor,
    /// Sum over images of the max softmax probability and of the normalized entropy.
    confidence: Option<(f64, f64)>,
    /// Dataset indices of the images in the rows, in order.
    used: Vec<usize>,
    /// The images that could not be read (`key: reason`).
    skipped: Vec<String>,
}

/// Loads the weights into `pretrained` (a network with 1000 classes), then probes.
fn measure_similarity(
    pretrained: Network,
    opts: &RecommendOptions,
    weights: &Weights,
    train: Arc<dyn Dataset>,
    transform: &Transform,
) -> Result<SimilarityStats, RecommendError> {
    let (arch, device) = (pretrained.arch, opts.device);
    let imagenet_head = match weights {
        Weights::Imagenet(path) => {
            weights::load_into(&pretrained, path, false)?;
            true
        }
        Weights::File(path) => {
            if weights::load_into(&pretrained, path, false).is_err() {
                weights::load_into(&pretrained, path, true)?;
            }
            false
        }
        Weights::None => false,
    };
    tch::manual_seed(opts.seed as i64);
    let random = Network::new(arch, 1000, device);

    let (fit, score) = probe_split(train.as_ref(), opts.probe_samples.min(train.len()), opts.seed);
    let fit_set: std::collections::HashSet<usize> = fit.iter().copied().collect();
    // In a seeded order, not class by class.
    let mut order: Vec<usize> = fit.iter().chain(&score).copied().collect();
    order = data::permutation(order.len(), opts.seed, 0x0DE7).into_iter().map(|p| order[p]).collect();
    let f = extract(&pretrained, &random, imagenet_head, train.clone(), order, transform, opts)?;
    let (fit_rows, score_rows): (Vec<i64>, Vec<i64>) =
        (0..f.used.len() as i64).partition(|&r| fit_set.contains(&f.used[r as usize]));
    let usable = f.used.len();
    if usable < MIN_PROBE || fit_rows.is_empty() || score_rows.is_empty() {
        return Err(RecommendError::TooFewReadable {
            path: opts.data.clone(),
            usable,
            asked: fit.len() + score.len(),
            first: f.skipped.first().cloned().unwrap_or_else(|| "none".into()),
        });
    }
    let classes = train.class_names().len() as i64;
    let (fit_rows, score_rows) = (Tensor::from_slice(&fit_rows), Tensor::from_slice(&score_rows));
    let split = |t: &Tensor| (t.index_select(0, &fit_rows), t.index_select(0, &score_rows));
    let (ytr, yte) = split(&f.labels);
    let (ptr, pte) = split(&f.pretrained);
    let (rtr, rte) = split(&f.random);
    // The probe's ops are too small to share out: on a busy machine, libtorch's spinning worker
    // threads made it 14x slower than one thread (7.8 s vs 0.56 s for 400 x 1280 features).
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let probes = linear_probe(&ptr, &ytr, &pte, &yte, classes)
        .and_then(|pre| Ok((pre, linear_probe(&rtr, &ytr, &rte, &yte, classes)?)));
    tch::set_num_threads(threads);
    let (acc_pre, acc_rand) = probes?;
    let gain = acc_pre - acc_rand;
    let error_reduction = if acc_rand < 1.0 { gain / (1.0 - acc_rand) } else { 0.0 };
    let (max_prob, entropy) = match f.confidence {
        Some((p, h)) => (Some(p / usable as f64), Some(h / usable as f64)),
        None => (None, None),
    };
    Ok(SimilarityStats {
        weights: match weights {
            Weights::File(p) => p.display().to_string(),
            _ => "imagenet".into(),
        },
        image_size: transform.size as i64,
        probe_train: fit_rows.size()[0] as usize,
        probe_test: score_rows.size()[0] as usize,
        probe_skipped: f.skipped.len(),
        probe_accuracy_pretrained: acc_pre,
        probe_accuracy_random: acc_rand,
        probe_gain: gain,
        error_reduction,
        imagenet_max_prob: max_prob,
        imagenet_entropy: entropy,
    })
}

/// Runs both trunks (and the ImageNet head, if `imagenet_head`) over the images `order` names.
fn extract(
    pretrained: &Network,
    random: &Network,
    imagenet_head: bool,
    ds: Arc<dyn Dataset>,
    order: Vec<usize>,
    transform: &Transform,
    opts: &RecommendOptions,
) -> Result<Features, RecommendError> {
    let n = order.len();
    let cfg = LoaderConfig::eval(50, opts.threads.max(1));
    let mut progress = Progress::new("probe", n as u64, "img");
    let modes = vec![GroupMode::Frozen; pretrained.groups().len()];
    let head = pretrained.groups().len() - 1;
    let (mut pre, mut rnd, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    let (mut used, mut skipped) = (Vec::new(), Vec::new());
    let (mut sum_p, mut sum_h) = (0.0, 0.0);
    let mut done = 0;
    let device = opts.device;
    let ln_classes = (pretrained.num_classes as f64).ln();
    tch::no_grad(|| {
        for batch in Loader::start(ds, order, 0, transform.clone(), cfg) {
            done += batch.indices.len() + batch.skipped.len();
            for e in &batch.skipped {
                tracing::warn!(key = %e.key, reason = %e.reason, "skipping unreadable sample");
            }
            skipped.extend(batch.skipped.iter().map(ToString::to_string));
            used.extend_from_slice(&batch.indices);
            if batch.indices.is_empty() {
                continue;
            }
            let x = batch.images.to_device(device);
            let fp = pretrained.features(&x);
            if imagenet_head {
                let probs = pretrained.forward_range(&fp, &modes, head..head + 1).softmax(-1, Kind::Float);
                let maxp = probs.max_dim(-1, false).0.sum(Kind::Double).double_value(&[]);
                let ent = -(&probs * probs.clamp_min(1e-12).log()).sum_dim_intlist(-1, false, Kind::Double);
                sum_p += maxp;
                sum_h += ent.sum(Kind::Double).double_value(&[]) / ln_classes;
            }
            pre.push(fp.to_device(Device::Cpu));
            rnd.push(random.features(&x).to_device(Device::Cpu));
            labels.push(batch.labels);
            progress.update(done as u64, String::new);
        }
    });
    progress.finish();
    let cat = |v: &[Tensor], d: i64| {
        if v.is_empty() {
            Tensor::zeros([0, d], (Kind::Float, Device::Cpu))
        } else {
            Tensor::cat(v, 0)
        }
    };
    Ok(Features {
        pretrained: cat(&pre, pretrained.feature_dim),
        random: cat(&rnd, random.feature_dim),
        labels: if labels.is_empty() {
            Tensor::zeros([0], (Kind::Int64, Device::Cpu))
        } else {
            Tensor::cat(&labels, 0)
        },
        confidence: imagenet_head.then_some((sum_p, sum_h)),
        used,
        skipped,
    })
}

/// Test accuracy of a multinomial logistic regression fit on (`xtr`, `ytr`): features standardized
/// with the fit part's statistics, zero init, full-batch Adam for [`PROBE_STEPS`] steps on the mean
/// cross-entropy plus `|W|^2 / 2n` (scikit-learn's `C = 1`).
pub fn linear_probe(
    xtr: &Tensor,
    ytr: &Tensor,
    xte: &Tensor,
    yte: &Tensor,
    classes: i64,
) -> Result<f64, tch::TchError> {
    let (xtr, xte) = (xtr.to_kind(Kind::Float), xte.to_kind(Kind::Float));
    let mean = xtr.mean_dim(0, true, Kind::Float);
    // Scale-free: a random init's features can be tiny (1e-10) and still informative; features
    // that barely vary relative to the most varying one count as constant.
    let std = xtr.std_dim(0, false, true);
    let floor = (std.max().double_value(&[]) * 1e-6).max(f64::from(f32::MIN_POSITIVE));
    let std = std.clamp_min(floor);
    let xtr = (&xtr - &mean) / &std;
    let xte = (&xte - &mean) / &std;
    let n = xtr.size()[0].max(1) as f64;
    let vs = nn::VarStore::new(xtr.device());
    let w = vs.root().zeros("w", &[xtr.size()[1], classes]);
    let b = vs.root().zeros("b", &[classes]);
    let mut opt = nn::Adam::default().build(&vs, PROBE_LR)?;
    // Gradients are needed here even when a caller runs under `no_grad`.
    tch::with_grad(|| {
        for _ in 0..PROBE_STEPS {
            let logits = xtr.matmul(&w) + &b;
            let loss = logits.cross_entropy_for_logits(ytr) + w.square().sum(Kind::Float) * (0.5 / n);
            opt.backward_step(&loss);
        }
    });
    let acc = tch::no_grad(|| (xte.matmul(&w) + &b).accuracy_for_logits(yte).double_value(&[]));
    Ok(acc)
}

/// SGD learning rate (momentum 0.9) at batch 64; scaled linearly with the batch size.
/// From scratch: 0.05 (thaw's LeNet-5 example trains Fashion-MNIST from scratch with it, and its
/// head-only example uses it too). Fine-tuning all
/// from a pretrained init: 0.1x that, so the pretrained features move gently. Frozen bottom: 0.2x
/// (the trainable upper groups start pretrained but must move further, the data being different).
/// A new head alone: the from-scratch rate, as it starts from nothing.
pub fn base_lr(strategy: &str) -> f64 {
    SCRATCH_LR * lr_factor(strategy)
}

/// The from-scratch SGD learning rate at batch 64.
pub const SCRATCH_LR: f64 = 0.05;

/// Fine-tuning everything on large data unlike ImageNet: the LR relative to [`SCRATCH_LR`] (0.02
/// at batch 64, the best recipe's), since the trunk must move far from ImageNet's features. Twice
/// that (0.04) trained unstably: bursts of bad steps near the one-cycle peak cost 2 points on a
/// holdout (README, "Time to accuracy").
pub const DIFFERENT_FINETUNE_LR_FACTOR: f64 = 0.4;

/// ... and the images it should see: 420k, the best recipe's seven epochs of Fashion-MNIST (which
/// fit 20 minutes on a slow 2-core machine at 64x64 with the stem and stage2 frozen; on a holdout,
/// seven epochs of its 54k images scored 0.9518 and eight 0.9513).
pub const DIFFERENT_FINETUNE_IMAGES: usize = 420_000;

/// The side small images train at when no `--image-size` is given: on Fashion-MNIST's 28x28
/// images, ImageNet MobileNetV2 at 64x64 with its stem and stage2 frozen gave the best accuracy a
/// 2-core machine reaches in 20 minutes (README, "Time to accuracy"; 48x48 fine-tuning everything
/// costs the same step and scores 0.3 points lower); the native 224 costs 12x the pixels.
pub const SMALL_IMAGE_SIDE: i64 = 64;

/// [`SMALL_IMAGE_SIDE`] when the images are at most 64 pixels on their longer median side and the
/// model's native input is larger; `None` otherwise (the model's own size).
fn small_image_side(arch: Arch, d: &DatasetStats) -> Option<i64> {
    let side = d.width.median.max(d.height.median) as i64;
    (d.sampled_images > 0 && side <= 64 && arch.preprocess().input_size > SMALL_IMAGE_SIDE).then_some(SMALL_IMAGE_SIDE)
}

/// Whether the large-and-different recipe applies: one-cycle at [`DIFFERENT_FINETUNE_LR_FACTOR`]
/// for [`DIFFERENT_FINETUNE_IMAGES`], Nesterov momentum and label smoothing (the best recipe's).
fn large_and_different(size: Size, similarity: Similarity, strategy: &str) -> bool {
    size == Size::Large && similarity == Similarity::Low && strategy != "scratch"
}

/// A strategy's learning rate relative to [`SCRATCH_LR`].
fn lr_factor(strategy: &str) -> f64 {
    match strategy {
        "finetune_all" => 0.1,
        "freeze_bottom" => 0.2,
        _ => 1.0,
    }
}

/// `x` to 6 significant digits, so that specs read `0.005`, not `0.005000000000000001`.
fn round_sig(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(5 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// Epochs: enough to see about B images, `ceil(B / images)` clamped to [2, 50], where B is 50k
/// for a head alone, 100k with a frozen bottom, 150k to fine-tune all and 600k from scratch (a
/// random init needs the most updates; 10 epochs of Fashion-MNIST for LeNet-5).
pub fn epochs_for(strategy: &str, images: usize) -> usize {
    let budget: usize = match strategy {
        "feature_extract" => 50_000,
        "freeze_bottom" => 100_000,
        "finetune_all" => 150_000,
        _ => 600_000,
    };
    budget.div_ceil(images.max(1)).clamp(2, 50)
}

/// Frozen groups for `freeze_bottom`: the first third of the trunk's groups (at least one, and at
/// least one trunk group left to train). Early layers learn generic edges and textures that
/// transfer even to different data; transferability falls off in the upper layers (Yosinski et
/// al., 2014), which different data must retrain. MobileNetV2: 2 of 7 (stem, stage2); ResNets: 1
/// of 5 (stem); VGG: 2 of 6.
pub fn freeze_k(trunk_groups: usize) -> usize {
    (trunk_groups / 3).clamp(1, trunk_groups.saturating_sub(1).max(1))
}

fn decide(
    arch: Arch,
    dataset: DatasetStats,
    measures: Option<SimilarityStats>,
    trunk_groups: usize,
    weights: &str,
) -> Recommendation {
    let mut reasons = Vec::new();
    let large = dataset.train_samples >= LARGE_TOTAL && dataset.per_class.median >= LARGE_PER_CLASS;
    let size = if large { Size::Large } else { Size::Small };
    reasons.push(format!(
        "size {}: {} training images, median {} per class (min {}, max {}); large needs >= {LARGE_TOTAL} and >= {LARGE_PER_CLASS} per class",
        size.as_str(),
        dataset.train_samples,
        dataset.per_class.median,
        dataset.per_class.min,
        dataset.per_class.max
    ));
    let similarity = match &measures {
        None => {
            reasons.push(format!(
                "similarity low: weights = \"{weights}\", so nothing pretrained can transfer; only training from scratch applies"
            ));
            Similarity::Low
        }
        Some(m) => {
            let transfers = m.error_reduction >= MIN_ERROR_REDUCTION;
            let recognised = m.imagenet_entropy.is_none_or(|h| h <= MAX_ENTROPY);
            let sim = if transfers && recognised { Similarity::High } else { Similarity::Low };
            reasons.push(format!(
                "similarity {}: linear probe {:.3} on pretrained features vs {:.3} on random ones removes {:.0}% of the error (needs >= {:.0}%){}",
                sim.as_str(),
                m.probe_accuracy_pretrained,
                m.probe_accuracy_random,
                100.0 * m.error_reduction,
                100.0 * MIN_ERROR_REDUCTION,
                match (m.imagenet_entropy, m.imagenet_max_prob) {
                    (Some(h), Some(p)) => format!(
                        "; ImageNet classifier: mean max probability {p:.3}, normalized entropy {h:.3} (needs <= {MAX_ENTROPY})"
                    ),
                    _ => String::new(),
                }
            ));
            sim
        }
    };
    let native = arch.preprocess().input_size;
    if let Some(m) = measures.as_ref().filter(|m| 2 * m.image_size <= native) {
        reasons.push(format!(
            "measured at {0}x{0} pixels, the size the job trains at; {arch} was pretrained at {native}x{native}, and \
             features transfer less to inputs this much smaller (--image-size {native} measures the content apart from the scale)",
            m.image_size
        ));
    }
    if dataset.channels == "grayscale" && arch.preprocess().channels == 3 {
        reasons.push(
            "the images are grayscale; ImageNet is colour photographs (each gray image is fed as three equal channels)"
                .into(),
        );
    }
    if dataset.per_class.min * 10 < dataset.per_class.median {
        reasons.push(format!(
            "classes are imbalanced: the smallest has {} images, the median {}",
            dataset.per_class.min, dataset.per_class.median
        ));
    }
    if let Some(m) = &measures {
        if (m.probe_train as f64) < 5.0 * dataset.classes as f64 {
            reasons.push(format!(
                "the probe saw {} images for {} classes (under 5 per class): its accuracies are noisy; raise --probe-samples",
                m.probe_train, dataset.classes
            ));
        }
    }

    let pretrained = measures.is_some();
    let (strategy, k) = match (size, similarity, pretrained) {
        (_, _, false) => ("scratch", None),
        (Size::Small, Similarity::High, _) => ("feature_extract", None),
        (Size::Small, Similarity::Low, _) => ("freeze_bottom", Some(freeze_k(trunk_groups))),
        (Size::Large, Similarity::High, _) => ("finetune_all", None),
        // Large and different, with pretrained weights: fine-tune from the pretrained init anyway,
        // at a high LR, with the first third of the trunk frozen. Measured on Fashion-MNIST
        // (README, "Time to accuracy"): ImageNet MobileNetV2 trained this way at 64x64 reaches
        // 0.952 on a holdout in seven epochs, above every from-scratch run the README records;
        // freezing its stem and stage2 costs no accuracy and a quarter of the step, which pays for
        // the pixels.
        (Size::Large, Similarity::Low, _) => ("freeze_bottom", Some(freeze_k(trunk_groups))),
    };
    let weights = if strategy == "scratch" { "none".to_string() } else { weights.to_string() };
    let different = large_and_different(size, similarity, strategy);
    let batch_size = if dataset.train_samples < 1000 { 32 } else { 64 };
    let factor = if different { DIFFERENT_FINETUNE_LR_FACTOR } else { lr_factor(strategy) };
    let lr = round_sig(SCRATCH_LR * factor * batch_size as f64 / 64.0);
    let epochs = if different {
        DIFFERENT_FINETUNE_IMAGES.div_ceil(dataset.train_samples.max(1)).clamp(2, 50)
    } else {
        epochs_for(strategy, dataset.train_samples)
    };
    reasons.push(match strategy {
        "feature_extract" => "small and similar: the pretrained features already separate the classes; train only a new head (the frozen trunk cannot overfit)".to_string(),
        "freeze_bottom" if different => format!(
            "large and different: fine-tune from the pretrained init all the same (on Fashion-MNIST it beats training from \
             scratch), every group but the first {} of {trunk_groups} (generic edges; no backward through them, a quarter \
             of MobileNetV2's step), at {DIFFERENT_FINETUNE_LR_FACTOR}x the from-scratch learning rate so the trunk can move, \
             on a one-cycle schedule with label smoothing 0.1",
            k.unwrap_or(1)
        ),
        "freeze_bottom" => format!(
            "small and different: keep the first {} of {trunk_groups} trunk groups (generic edges and textures) frozen and retrain the upper groups and the head",
            k.unwrap_or(1)
        ),
        "finetune_all" => "large and similar: fine-tune every group from the pretrained init, at 0.1x the from-scratch learning rate".into(),
        _ if !pretrained => "no pretrained weights: train from a random init".into(),
        _ => "large and different: enough data to learn features of its own; train from a random init".into(),
    });
    if strategy == "scratch" && size == Size::Small {
        reasons.push("warning: a small dataset from scratch overfits; pretrained weights would help".into());
    }
    reasons.push(format!(
        "SGD, momentum 0.9, batch {batch_size}, lr {lr} ({factor}x the from-scratch {SCRATCH_LR} at batch 64, scaled with the batch), {}, {epochs} epochs (about {} images seen)",
        if different { "one-cycle" } else { "cosine decay" },
        epochs * dataset.train_samples
    ));
    Recommendation {
        arch: arch.name().to_string(),
        dataset,
        measures,
        size,
        similarity,
        size_rule: SIZE_RULE.into(),
        similarity_rule: SIMILARITY_RULE.into(),
        strategy: strategy.into(),
        k,
        weights,
        lr,
        epochs,
        batch_size,
        reasons,
        spec_toml: String::new(),
    }
}

/// `s` with every character a job name may not hold replaced by `-`.
fn job_name(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '-' })
        .collect();
    let n = n.trim_matches(|c| c == '-' || c == '.').to_string();
    if n.is_empty() {
        "data".into()
    } else {
        n
    }
}

fn spec_toml(rec: &Recommendation, data: &DataSpec, seed: u64) -> String {
    let q = |v: &str| toml::Value::String(v.to_string()).to_string();
    let dir_name = data.root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = format!("{}-{}-{}", job_name(&dir_name), rec.arch, rec.strategy);
    let fmt = data.format.as_str();
    let mut s = format!(
        "# Written by `thaw recommend`: {} data, {} similarity to ImageNet -> {}.\nname = {}\nseed = {seed}\n\n",
        rec.size.as_str(),
        rec.similarity.as_str(),
        rec.strategy,
        q(&name)
    );
    s += &format!("[model]\narch = {}\nweights = {}\n\n", q(&rec.arch), q(&rec.weights));
    s += &format!("[data]\nformat = {}\nroot = {}\n", q(fmt), q(&data.root.display().to_string()));
    if let Some(v) = data.image_size {
        s += &format!("image_size = {v}\n");
    }
    if let Some(v) = data.train_limit {
        s += &format!("train_limit = {v}\n");
    }
    let steps = rec.dataset.train_samples.div_ceil(rec.batch_size) * rec.epochs;
    let warmup = if matches!(rec.strategy.as_str(), "finetune_all" | "scratch") { (steps / 10).min(100) } else { 0 };
    s += &format!(
        "\n[train]\nepochs = {}\nbatch_size = {}\noptimizer = \"sgd\"\nlr = {:?}\nmomentum = 0.9\n",
        rec.epochs, rec.batch_size, rec.lr
    );
    if large_and_different(rec.size, rec.similarity, &rec.strategy) {
        // The best recipe's (examples/fashion-mnist-best.toml): one-cycle, Nesterov, smoothing.
        s += "nesterov = true\nweight_decay = 0.00005\nlr_schedule = \"one_cycle\"\nlabel_smoothing = 0.1\n\n";
    } else {
        s += &format!("weight_decay = 0.0001\nlr_schedule = \"cosine\"\nwarmup_steps = {warmup}\n\n");
    }
    s += &format!("[schedule]\nstrategy = {}\n", q(&rec.strategy));
    if let Some(k) = rec.k {
        s += &format!("k = {k}\n");
    }
    s += &format!("\n[output]\ndir = {}\n", q(&format!("runs/{name}")));
    s
}

impl Recommendation {
    /// The report for people: every line a TOML comment, followed by the spec, so that the whole
    /// text can be saved as a job file.
    pub fn to_text(&self) -> String {
        let d = &self.dataset;
        let mut lines = vec![
            format!("thaw recommend: {} on {}", self.arch, d.root.display()),
            String::new(),
            "dataset".into(),
            format!(
                "  training images   {}{}",
                d.train_samples,
                d.limit.map(|l| format!(" (--limit {l})")).unwrap_or_default()
            ),
            format!(
                "  classes           {} (images per class: min {}, median {}, max {})",
                d.classes, d.per_class.min, d.per_class.median, d.per_class.max
            ),
            format!(
                "  image size        {}x{} .. {}x{} (median {}x{}, {} sampled)",
                d.width.min, d.height.min, d.width.max, d.height.max, d.width.median, d.height.median, d.sampled_images
            ),
            format!(
                "  channels          {} ({} of {} sampled images grayscale)",
                d.channels, d.grayscale_images, d.sampled_images
            ),
            String::new(),
        ];
        match &self.measures {
            Some(m) => {
                lines.push(format!("similarity to ImageNet ({}, {}x{} inputs)", m.weights, m.image_size, m.image_size));
                lines.push(format!(
                    "  linear probe      pretrained {:.3}, random init {:.3}, gain {:+.3}, error reduction {:.0}% ({} fit / {} scored)",
                    m.probe_accuracy_pretrained,
                    m.probe_accuracy_random,
                    m.probe_gain,
                    100.0 * m.error_reduction,
                    m.probe_train,
                    m.probe_test
                ));
                if let (Some(p), Some(h)) = (m.imagenet_max_prob, m.imagenet_entropy) {
                    lines.push(format!(
                        "  ImageNet head     mean max probability {p:.3}, mean normalized entropy {h:.3}"
                    ));
                }
            }
            None => lines.push("similarity to ImageNet: not measured (no pretrained weights)".into()),
        }
        lines.push(String::new());
        lines.push(format!("rule  size:       {}", self.size_rule));
        lines.push(format!("rule  similarity: {}", self.similarity_rule));
        lines.push(String::new());
        lines.push(format!(
            "quadrant: {} data, {} similarity -> strategy {}{}",
            self.size.as_str(),
            self.similarity.as_str(),
            self.strategy,
            self.k.map(|k| format!(" (k = {k})")).unwrap_or_default()
        ));
        for r in &self.reasons {
            lines.push(format!("  - {r}"));
        }
        lines.push(String::new());
        lines.push("job spec (save this output as job.toml, then `thaw train job.toml`):".into());
        let mut out: String =
            lines.iter().map(|l| if l.is_empty() { "#\n".to_string() } else { format!("# {l}\n") }).collect();
        out.push('\n');
        out += &self.spec_toml;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(images: usize, classes: usize) -> DatasetStats {
        let per = images / classes;
        DatasetStats {
            root: PathBuf::from("/data/things"),
            format: DataFormat::Folder,
            limit: None,
            train_samples: images,
            classes,
            per_class: Spread { min: per, median: per, max: per },
            width: Spread { min: 64, median: 64, max: 64 },
            height: Spread { min: 64, median: 64, max: 64 },
            sampled_images: 10,
            grayscale_images: 0,
            channels: "colour".into(),
        }
    }

    fn measures(pre: f64, rand: f64, entropy: Option<f64>) -> SimilarityStats {
        SimilarityStats {
            weights: "imagenet".into(),
            image_size: 64,
            probe_train: 800,
            probe_test: 200,
            probe_skipped: 0,
            probe_accuracy_pretrained: pre,
            probe_accuracy_random: rand,
            probe_gain: pre - rand,
            error_reduction: (pre - rand) / (1.0 - rand),
            imagenet_max_prob: entropy.map(|h| 1.0 - h),
            imagenet_entropy: entropy,
        }
    }

    fn spec_of(rec: &Recommendation) -> JobSpec {
        let data = DataSpec {
            format: DataFormat::Folder,
            root: PathBuf::from("/data/things"),
            image_size: Some(64),
            train_limit: None,
            val_limit: None,
            val_fraction: 0.1,
            hflip: false,
            loader_threads: 2,
            random_resized_crop: false,
            read_block: 256,
            shuffle_window: 1024,
            max_skipped: None,
            holdout: None,
            tta_hflip: false,
            tta_shift: 0,
            tta_sizes: Vec::new(),
            random_shift: 0,
            random_erase: 0.0,
            cutmix: 0.0,
            progressive_sizes: Vec::new(),
        };
        let text = spec_toml(rec, &data, 3);
        JobSpec::from_toml(&text, Path::new("/tmp")).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_four_quadrants_map_to_the_four_strategies_with_valid_specs() {
        let cases = [
            (stats(500, 10), Some(measures(0.9, 0.5, Some(0.2))), "feature_extract", "imagenet"),
            (stats(500, 10), Some(measures(0.6, 0.55, Some(0.2))), "freeze_bottom", "imagenet"),
            (stats(50_000, 10), Some(measures(0.9, 0.5, Some(0.3))), "finetune_all", "imagenet"),
            (stats(50_000, 10), Some(measures(0.9, 0.5, Some(0.9))), "freeze_bottom", "imagenet"),
            (stats(50_000, 10), None, "scratch", "none"),
        ];
        for (d, m, strategy, weights) in cases {
            let mut rec = decide(Arch::MobilenetV2, d, m, 7, "imagenet");
            assert_eq!(rec.strategy, strategy, "{:?}", rec.reasons);
            assert_eq!(rec.weights, weights);
            rec.spec_toml = String::new();
            let spec = spec_of(&rec);
            assert_eq!(spec.schedule.name(), strategy);
            assert_eq!(spec.train.epochs, rec.epochs);
            assert!((spec.train.lr - rec.lr).abs() < 1e-12);
        }
    }

    #[test]
    fn large_different_data_fine_tunes_above_the_stem_at_a_high_lr_on_one_cycle() {
        let same = decide(Arch::MobilenetV2, stats(60_000, 10), Some(measures(0.9, 0.5, Some(0.3))), 7, "imagenet");
        let diff = decide(Arch::MobilenetV2, stats(60_000, 10), Some(measures(0.75, 0.66, Some(0.94))), 7, "imagenet");
        assert_eq!((same.strategy.as_str(), diff.strategy.as_str()), ("finetune_all", "freeze_bottom"));
        assert_eq!((same.k, diff.k), (None, Some(2)), "MobileNetV2's stem and stage2, as in the best recipe");
        assert_eq!(diff.similarity, Similarity::Low);
        assert!((same.lr - 0.005).abs() < 1e-12 && (diff.lr - 0.02).abs() < 1e-12, "{} {}", same.lr, diff.lr);
        assert_eq!((same.epochs, diff.epochs), (3, 7));
        let mut diff = diff;
        diff.spec_toml = String::new();
        let spec = spec_of(&diff);
        assert_eq!(spec.schedule.name(), "freeze_bottom");
        assert!(
            matches!(spec.train.optimizer, thaw_coordinator::spec::OptimizerSpec::Sgd { nesterov: true, .. }),
            "{:?}",
            spec.train.optimizer
        );
        assert_eq!(spec.train.lr_schedule, thaw_coordinator::spec::LrSchedule::OneCycle);
        assert_eq!(spec.train.label_smoothing, 0.1);
        assert_eq!(spec.train.warmup_steps, 0, "one-cycle has its own warm-up");
    }

    #[test]
    fn small_images_train_at_64_pixels_unless_told() {
        let mut d = stats(60_000, 10);
        (d.width, d.height) = (Spread { min: 28, median: 28, max: 28 }, Spread { min: 28, median: 28, max: 28 });
        assert_eq!(small_image_side(Arch::MobilenetV2, &d), Some(64));
        assert_eq!(small_image_side(Arch::Lenet5, &d), None, "LeNet-5's own input is 32");
        assert_eq!(small_image_side(Arch::MobilenetV2, &stats(60_000, 10)), Some(64), "64x64 is small too");
        d.width = Spread { min: 28, median: 96, max: 300 };
        assert_eq!(small_image_side(Arch::MobilenetV2, &d), None);
    }

    #[test]
    fn rules_have_their_documented_edges() {
        let at = |images, classes| decide(Arch::Resnet18, stats(images, classes), None, 5, "none").size;
        assert_eq!(at(10_000, 10), Size::Large);
        assert_eq!(at(9_990, 9), Size::Small, "1110 per class but under 10k in total");
        assert_eq!(at(20_000, 40), Size::Small, "500 per class");
        assert_eq!(freeze_k(7), 2);
        assert_eq!(freeze_k(5), 1);
        assert_eq!(freeze_k(2), 1);
        assert_eq!(freeze_k(1), 1);
        assert_eq!(epochs_for("scratch", 60_000), 10);
        assert_eq!(epochs_for("feature_extract", 500), 50);
        assert_eq!(epochs_for("finetune_all", 1_000_000), 2);
        let rec = decide(Arch::MobilenetV2, stats(300, 3), Some(measures(0.79, 0.6, None)), 7, "/w.safetensors");
        assert_eq!((rec.strategy.as_str(), rec.k), ("freeze_bottom", Some(2)), "under half of the error removed");
        let rec = decide(Arch::MobilenetV2, stats(300, 3), Some(measures(0.81, 0.6, None)), 7, "/w.safetensors");
        assert_eq!(rec.strategy, "feature_extract", "no ImageNet head: the probe decides alone");
        assert_eq!(rec.batch_size, 32);
        assert!((rec.lr - 0.025).abs() < 1e-12, "lr scales with the batch: {}", rec.lr);
    }

    #[test]
    fn a_probe_separates_separable_features_and_not_noise() {
        tch::manual_seed(0);
        let y = Tensor::arange(200, (Kind::Int64, Device::Cpu)).remainder(2);
        let signal = y.to_kind(Kind::Float).unsqueeze(1) * 3.0;
        let x = Tensor::randn([200, 8], (Kind::Float, Device::Cpu)) + signal;
        let (xtr, xte) = (x.narrow(0, 0, 160), x.narrow(0, 160, 40));
        let (ytr, yte) = (y.narrow(0, 0, 160), y.narrow(0, 160, 40));
        let good = linear_probe(&xtr, &ytr, &xte, &yte, 2).unwrap();
        assert!(good > 0.9, "{good}");
        let noise = Tensor::randn([200, 8], (Kind::Float, Device::Cpu));
        let bad = linear_probe(&noise.narrow(0, 0, 160), &ytr, &noise.narrow(0, 160, 40), &yte, 2).unwrap();
        assert!(bad < 0.8, "{bad}");
    }

    #[test]
    fn probe_split_is_stratified_and_seeded() {
        struct Labels(usize);
        impl Dataset for Labels {
            fn len(&self) -> usize {
                self.0
            }
            fn label(&self, i: usize) -> i64 {
                (i % 4) as i64
            }
            fn class_names(&self) -> &[String] {
                &[]
            }
            fn key(&self, i: usize) -> String {
                i.to_string()
            }
            fn load(&self, _: usize) -> Result<image::DynamicImage, data::SampleError> {
                Ok(image::DynamicImage::new_luma8(1, 1))
            }
        }
        let (fit, score) = probe_split(&Labels(1000), 400, 9);
        assert_eq!((fit.len(), score.len()), (320, 80));
        for c in 0..4 {
            let held = score.iter().filter(|&&i| i % 4 == c).count() as i64;
            let all = held + fit.iter().filter(|&&i| i % 4 == c).count() as i64;
            assert!((held - all / 5).abs() <= 1, "class {c}: {held} of {all} held out");
        }
        assert_eq!(probe_split(&Labels(1000), 400, 9), (fit, score));
    }
}
