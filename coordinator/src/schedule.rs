//! Freeze schedules: which layer groups train in which epochs, at what learning rate, and how
//! BatchNorm behaves.
//!
//! A spec's `[schedule]` names a strategy, which [`Schedule::expand`] turns into an explicit list
//! of [`Stage`]s against a model's layer groups (input to output, the last being the new head):
//!
//! | strategy | scenario | stages |
//! |---|---|---|
//! | `feature_extract` | small data, similar to ImageNet | one: the head trains |
//! | `freeze_bottom` (`k`) | small data, different | one: groups `k..` train |
//! | `finetune_all` | large data, similar | one: everything trains from the pretrained init |
//! | `scratch` | large data, different | one: everything trains from a random init |
//! | `freeze` (`groups`) | | one: all but the named groups train |
//! | `progressive` (`every`, `unfreeze_lr_factor`) | | the head, then one more group from the top every `every` epochs (ULMFiT's gradual unfreezing), the base LR times the factor at each unfreeze |
//! | `stages` (`[[schedule.stages]]`) | | exactly as written |
//! | `auto` | | what `thaw recommend` picks, resolved before the job starts |
//!
//! Discriminative learning rates: a group's LR is the stage's LR times its multiplier, which is
//! `lr_mult.<group>` when given, else `layer_decay^(steps below the head)`, else 1. Each stage has
//! its own warm-up and decay (constant, cosine or one-cycle) over its own steps; a single-stage
//! schedule therefore decays over the whole run.
//!
//! BatchNorm ([`BnPolicy`]): `train` (trainable groups use batch statistics and update their
//! running statistics, per replica as in DDP; frozen groups use their stored statistics), `frozen_stats`
//! (every BatchNorm uses its stored statistics and never updates them, as Keras does with a
//! pretrained base: the affine parameters of trainable groups still learn), `train_affine` (as
//! fastai's `train_bn`: the BatchNorm layers of frozen groups keep training their affine
//! parameters and statistics, the rest of those groups stays frozen), `adapt_stats` (AdaBN, Li
//! et al. 2016: the BatchNorm layers of frozen groups normalise with batch statistics and update
//! their running statistics to the new data while training, with no gradient: nothing of a frozen
//! group learns and no backward pass runs through it).
//!
//! Everything here is model independent: the caller passes the group names (the worker from its
//! model, the coordinator from what the workers reported when they joined).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::spec::{invalid, DataSpec, LrSchedule, SpecError, TrainSpec, WeightsSpec};

/// Which layer groups train (the fixed patterns, and the ways of describing stages).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "strategy")]
pub enum Strategy {
    /// Small data, similar to ImageNet: only the new head trains; the pretrained trunk is frozen.
    FeatureExtract,
    /// Small data, different from ImageNet: the first `k` groups are frozen, the rest train.
    FreezeBottom { k: usize },
    /// Large data, similar: everything trains from the pretrained init (at a lower learning rate).
    FinetuneAll,
    /// Large data, different: everything trains from a random init (architecture only).
    Scratch,
    /// Explicitly named frozen groups.
    Freeze { groups: Vec<String> },
    /// The head first, then one more group from the top every `every` epochs.
    Progressive { every: usize, unfreeze_lr_factor: f64 },
    /// Explicit stages.
    Stages { stages: Vec<StageSpec> },
    /// What `thaw recommend` would choose; must be resolved before the job starts.
    Auto,
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::FeatureExtract => "feature_extract",
            Strategy::FreezeBottom { .. } => "freeze_bottom",
            Strategy::FinetuneAll => "finetune_all",
            Strategy::Scratch => "scratch",
            Strategy::Freeze { .. } => "freeze",
            Strategy::Progressive { .. } => "progressive",
            Strategy::Stages { .. } => "stages",
            Strategy::Auto => "auto",
        }
    }

    /// Whether some stage keeps pretrained layers frozen (which needs pretrained weights).
    fn freezes(&self) -> bool {
        match self {
            Strategy::FinetuneAll | Strategy::Scratch | Strategy::Auto => false,
            Strategy::Stages { stages } => stages.iter().any(|s| s.train != GroupSel::All),
            _ => true,
        }
    }
}

/// BatchNorm behaviour in a stage; see the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BnPolicy {
    #[default]
    Train,
    FrozenStats,
    TrainAffine,
    AdaptStats,
}

impl BnPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            BnPolicy::Train => "train",
            BnPolicy::FrozenStats => "frozen_stats",
            BnPolicy::TrainAffine => "train_affine",
            BnPolicy::AdaptStats => "adapt_stats",
        }
    }

    pub fn parse(s: &str) -> Option<BnPolicy> {
        match s {
            "train" => Some(BnPolicy::Train),
            "frozen_stats" => Some(BnPolicy::FrozenStats),
            "train_affine" => Some(BnPolicy::TrainAffine),
            "adapt_stats" => Some(BnPolicy::AdaptStats),
            _ => None,
        }
    }
}

/// Which groups a written stage trains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSel {
    All,
    Named(Vec<String>),
    /// The top `n` groups (the head counts as one).
    Top(usize),
}

/// One stage as written in `[[schedule.stages]]`: epochs are 1-based and inclusive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    pub first_epoch: usize,
    pub last_epoch: usize,
    pub train: GroupSel,
    pub lr: Option<f64>,
    pub layer_decay: Option<f64>,
    pub lr_mult: Vec<(String, f64)>,
    pub bn: Option<BnPolicy>,
    pub warmup_steps: Option<usize>,
    pub lr_schedule: Option<LrSchedule>,
}

/// The validated `[schedule]` of a spec: a strategy and the options every stage inherits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub strategy: Strategy,
    pub bn: BnPolicy,
    pub layer_decay: Option<f64>,
    /// Per-group LR multipliers by group name; they win over `layer_decay`.
    pub lr_mult: Vec<(String, f64)>,
}

impl Schedule {
    pub fn of(strategy: Strategy) -> Schedule {
        Schedule { strategy, bn: BnPolicy::Train, layer_decay: None, lr_mult: Vec::new() }
    }

    pub fn name(&self) -> &'static str {
        self.strategy.name()
    }
}

/// One stage resolved against a model: what trains, at which rates, over which epochs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Position in the schedule, from 0.
    pub index: usize,
    /// 0-based epochs, end exclusive.
    pub epochs: Range<usize>,
    /// One entry per group, input to output.
    pub trainable: Vec<bool>,
    /// Peak learning rate of each group (the stage's LR times the group's multiplier); frozen
    /// groups keep theirs for BatchNorm parameters under `train_affine`.
    pub group_lr: Vec<f64>,
    pub bn: BnPolicy,
    pub warmup_steps: usize,
    pub lr_schedule: LrSchedule,
}

impl Stage {
    /// Multiplier of the peak LR at `step` of a stage of `total` steps: linear warm-up, then
    /// constant, cosine to 0, or one-cycle (fastai's: from peak/25 up to the peak over the first
    /// 30% of the steps, then down to peak/250000, both on cosines; it has its own warm-up).
    pub fn lr_factor(&self, step: usize, total: usize) -> f64 {
        let total = total.max(1);
        let cos = |from: f64, to: f64, t: f64| to + (from - to) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        if self.lr_schedule == LrSchedule::OneCycle {
            let up = ((total as f64) * 0.3).max(1.0);
            let s = step as f64;
            return if s < up {
                cos(1.0 / 25.0, 1.0, s / up)
            } else {
                cos(1.0, 1.0 / 25.0 / 1e4, ((s - up) / (total as f64 - up).max(1.0)).min(1.0))
            };
        }
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.lr_schedule {
            LrSchedule::Constant | LrSchedule::OneCycle => 1.0,
            LrSchedule::Cosine => {
                let span = (total - self.warmup_steps.min(total)).max(1) as f64;
                let done = (step - self.warmup_steps) as f64 / span;
                0.5 * (1.0 + (std::f64::consts::PI * done.min(1.0)).cos())
            }
        }
    }

    /// Names of the trainable groups.
    pub fn trainable_names<'a>(&self, groups: &[&'a str]) -> Vec<&'a str> {
        groups.iter().zip(&self.trainable).filter(|(_, &t)| t).map(|(g, _)| *g).collect()
    }

    /// The frozen mask (true = frozen), one entry per group.
    pub fn frozen(&self) -> Vec<bool> {
        self.trainable.iter().map(|t| !t).collect()
    }

    /// Whether a worker caches the frozen prefix's outputs in this stage: there is a prefix, the
    /// training inputs are not randomly flipped or cropped, and caching is not turned off. Such a
    /// stage is planned with rank affinity (each rank keeps its samples, so its cache hits).
    pub fn caches(&self, data: &DataSpec, feature_cache_mb: f64) -> bool {
        self.why_not_cached(data, feature_cache_mb).is_none()
    }

    /// Why this stage does not cache (see [`Stage::caches`]), or `None` if it does.
    pub fn why_not_cached(&self, data: &DataSpec, feature_cache_mb: f64) -> Option<&'static str> {
        if feature_cache_mb <= 0.0 {
            Some("train.feature_cache_mb = 0")
        } else if self.frozen_prefix() == 0 {
            Some("the stage has no frozen prefix with fixed BatchNorm statistics")
        } else if data.hflip {
            Some("random flips change the prefix's input every epoch (data.hflip)")
        } else if data.random_resized_crop {
            Some("random crops change the prefix's input every epoch (data.random_resized_crop)")
        } else if data.random_shift > 0 {
            Some("random shifts change the prefix's input every epoch (data.random_shift)")
        } else if data.random_erase > 0.0 {
            Some("random erasing changes the prefix's input every epoch (data.random_erase)")
        } else if data.cutmix > 0.0 {
            Some("CutMix changes the prefix's input every epoch (data.cutmix)")
        } else if !data.progressive_sizes.is_empty() {
            Some("the input size changes from epoch to epoch (data.progressive_sizes)")
        } else {
            None
        }
    }

    /// Groups `0..p` are frozen and their outputs deterministic per sample (their BatchNorm
    /// statistics are not updated): the longest such prefix.
    pub fn frozen_prefix(&self) -> usize {
        if matches!(self.bn, BnPolicy::TrainAffine | BnPolicy::AdaptStats) {
            return 0;
        }
        self.trainable.iter().take_while(|t| !**t).count()
    }
}

/// The stage that `epoch` (0-based) is in.
pub fn stage_of(stages: &[Stage], epoch: usize) -> Option<&Stage> {
    stages.iter().find(|s| s.epochs.contains(&epoch))
}

fn unknown_group(field: &'static str, name: &str, groups: &[&str]) -> SpecError {
    invalid(field, format!("\"{name}\""), format!("unknown layer group; the model's groups are: {}", groups.join(", ")))
}

impl Schedule {
    /// The explicit stages of this schedule for a model with `groups`, over `train.epochs`.
    /// Every check that needs the model's groups happens here.
    pub fn expand(&self, groups: &[&str], train: &TrainSpec) -> Result<Vec<Stage>, SpecError> {
        let n = groups.len();
        let epochs = train.epochs;
        if n == 0 {
            return Err(invalid("model.arch", "(no groups)", "the model has no layer groups"));
        }
        for (name, _) in &self.lr_mult {
            if !groups.contains(&name.as_str()) {
                return Err(unknown_group("schedule.lr_mult", name, groups));
            }
        }
        let whole = |trainable: Vec<bool>| {
            vec![StageSpec {
                first_epoch: 1,
                last_epoch: epochs,
                train: GroupSel::Named(
                    groups.iter().zip(&trainable).filter(|(_, t)| **t).map(|(g, _)| g.to_string()).collect(),
                ),
                lr: None,
                layer_decay: None,
                lr_mult: Vec::new(),
                bn: None,
                warmup_steps: None,
                lr_schedule: None,
            }]
        };
        let written: Vec<StageSpec> =
            match &self.strategy {
                Strategy::FeatureExtract => whole((0..n).map(|i| i + 1 == n).collect()),
                Strategy::FreezeBottom { k } => {
                    if *k >= n {
                        return Err(invalid(
                            "schedule.k",
                            k,
                            format!(
                                "the model has {n} groups ({}); k must leave at least the head trainable",
                                groups.join(", ")
                            ),
                        ));
                    }
                    whole((0..n).map(|i| i >= *k).collect())
                }
                Strategy::FinetuneAll | Strategy::Scratch => whole(vec![true; n]),
                Strategy::Freeze { groups: frozen } => {
                    for g in frozen {
                        if !groups.contains(&g.as_str()) {
                            return Err(unknown_group("schedule.groups", g, groups));
                        }
                    }
                    if frozen.len() >= n && groups.iter().all(|g| frozen.iter().any(|f| f == g)) {
                        return Err(invalid(
                            "schedule.groups",
                            frozen.join(", "),
                            "freezes every group; nothing would train",
                        ));
                    }
                    whole(groups.iter().map(|g| !frozen.iter().any(|f| f == g)).collect())
                }
                Strategy::Progressive { every, unfreeze_lr_factor } => {
                    let mut out = Vec::new();
                    let mut first = 1;
                    let mut i = 0;
                    while first <= epochs {
                        let top = (i + 1).min(n);
                        // Once everything trains, the rest of the run is one stage.
                        let last = if top == n { epochs } else { first.saturating_add(every - 1).min(epochs) };
                        out.push(StageSpec {
                            first_epoch: first,
                            last_epoch: last,
                            train: GroupSel::Top(top),
                            lr: Some(train.lr * unfreeze_lr_factor.powi(i as i32)),
                            layer_decay: None,
                            lr_mult: Vec::new(),
                            bn: None,
                            warmup_steps: None,
                            lr_schedule: None,
                        });
                        first = last + 1;
                        i += 1;
                    }
                    out
                }
                Strategy::Stages { stages } => stages.clone(),
                Strategy::Auto => return Err(invalid(
                    "schedule.strategy",
                    "\"auto\"",
                    "must be resolved by `thaw recommend` before the job starts (thaw train, launch and submit do it)",
                )),
            };
        // The stages must cover 1..=epochs in order, without gaps or overlaps.
        let mut next = 1;
        for (i, s) in written.iter().enumerate() {
            if s.first_epoch != next || s.last_epoch < s.first_epoch {
                let reason = if s.first_epoch < next {
                    format!("overlaps the stage before it (epochs up to {} are taken)", next - 1)
                } else if s.last_epoch < s.first_epoch {
                    "ends before it starts".to_string()
                } else {
                    format!("leaves epochs {next}..{} without a stage", s.first_epoch - 1)
                };
                return Err(invalid(
                    "schedule.stages",
                    format!("stage {} (epochs {}-{})", i + 1, s.first_epoch, s.last_epoch),
                    reason,
                ));
            }
            next = s.last_epoch + 1;
        }
        if next != epochs + 1 {
            return Err(invalid(
                "schedule.stages",
                format!("epochs 1-{}", next - 1),
                format!("the stages must cover every epoch of train.epochs = {epochs}"),
            ));
        }
        written.iter().enumerate().map(|(index, s)| self.resolve(index, s, groups, train)).collect()
    }

    fn resolve(&self, index: usize, s: &StageSpec, groups: &[&str], train: &TrainSpec) -> Result<Stage, SpecError> {
        let n = groups.len();
        let trainable: Vec<bool> = match &s.train {
            GroupSel::All => vec![true; n],
            GroupSel::Top(k) => (0..n).map(|i| i + k >= n).collect(),
            GroupSel::Named(names) => {
                for g in names {
                    if !groups.contains(&g.as_str()) {
                        return Err(unknown_group("schedule.stages.train", g, groups));
                    }
                }
                groups.iter().map(|g| names.iter().any(|t| t == g)).collect()
            }
        };
        if !trainable.iter().any(|t| *t) {
            return Err(invalid("schedule.stages.train", "[]", format!("stage {} trains no group", index + 1)));
        }
        for (name, _) in &s.lr_mult {
            if !groups.contains(&name.as_str()) {
                return Err(unknown_group("schedule.stages.lr_mult", name, groups));
            }
        }
        let lr = s.lr.unwrap_or(train.lr);
        let decay = s.layer_decay.or(self.layer_decay);
        let group_lr = (0..n)
            .map(|g| {
                let named = s.lr_mult.iter().chain(&self.lr_mult).find(|(name, _)| name == groups[g]).map(|(_, m)| *m);
                lr * named.unwrap_or_else(|| decay.map_or(1.0, |d| d.powi((n - 1 - g) as i32)))
            })
            .collect();
        Ok(Stage {
            index,
            epochs: s.first_epoch - 1..s.last_epoch,
            trainable,
            group_lr,
            bn: s.bn.unwrap_or(self.bn),
            warmup_steps: s.warmup_steps.unwrap_or(train.warmup_steps),
            lr_schedule: s.lr_schedule.unwrap_or(train.lr_schedule),
        })
    }
}

// ---- the file format ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedule {
    strategy: String,
    k: Option<usize>,
    groups: Option<Vec<String>>,
    every: Option<usize>,
    unfreeze_lr_factor: Option<f64>,
    bn: Option<String>,
    layer_decay: Option<f64>,
    lr_mult: Option<toml::Table>,
    stages: Option<Vec<RawStage>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    /// `[first, last]` (1-based, inclusive) or one epoch.
    epochs: toml::Value,
    /// `"all"`, a list of group names, or `{ top = N }`.
    train: toml::Value,
    lr: Option<f64>,
    layer_decay: Option<f64>,
    lr_mult: Option<toml::Table>,
    bn: Option<String>,
    warmup_steps: Option<usize>,
    lr_schedule: Option<LrSchedule>,
}

fn positive(field: &'static str, v: f64) -> Result<f64, SpecError> {
    if v.is_finite() && v > 0.0 && v <= 1e3 {
        Ok(v)
    } else {
        Err(invalid(field, v, "must be a positive number (at most 1000)"))
    }
}

fn parse_lr_mult(field: &'static str, t: Option<toml::Table>) -> Result<Vec<(String, f64)>, SpecError> {
    let mut out = Vec::new();
    for (name, v) in t.unwrap_or_default() {
        let m = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        let Some(m) = m else { return Err(invalid(field, format!("{name} = {v}"), "must be a number")) };
        out.push((name, positive(field, m)?));
    }
    Ok(out)
}

fn parse_bn(field: &'static str, s: Option<String>) -> Result<Option<BnPolicy>, SpecError> {
    s.map(|s| {
        BnPolicy::parse(&s).ok_or_else(|| {
            invalid(
                field,
                format!("\"{s}\""),
                "expected \"train\", \"frozen_stats\", \"train_affine\" or \"adapt_stats\"",
            )
        })
    })
    .transpose()
}

impl RawStage {
    fn parse(self, i: usize) -> Result<StageSpec, SpecError> {
        let field = "schedule.stages";
        let epoch = |v: &toml::Value| v.as_integer().filter(|e| *e >= 1).map(|e| e as usize);
        let (first, last) = match &self.epochs {
            toml::Value::Integer(_) => (epoch(&self.epochs), epoch(&self.epochs)),
            toml::Value::Array(a) if a.len() == 2 => (epoch(&a[0]), epoch(&a[1])),
            _ => (None, None),
        };
        let (Some(first_epoch), Some(last_epoch)) = (first, last) else {
            return Err(invalid(
                "schedule.stages.epochs",
                &self.epochs,
                format!("stage {}: expected an epoch (from 1) or [first, last]", i + 1),
            ));
        };
        let train = match &self.train {
            toml::Value::String(s) if s == "all" => GroupSel::All,
            toml::Value::Array(a) => GroupSel::Named(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid("schedule.stages.train", &self.train, "expected group names"))?,
            ),
            toml::Value::Table(t)
                if t.len() == 1 && t.get("top").and_then(|v| v.as_integer()).is_some_and(|k| k >= 1) =>
            {
                GroupSel::Top(t["top"].as_integer().unwrap_or(1) as usize)
            }
            other => {
                return Err(invalid(
                    "schedule.stages.train",
                    other,
                    format!("stage {}: expected \"all\", a list of group names, or {{ top = N }}", i + 1),
                ))
            }
        };
        if self.lr_schedule == Some(LrSchedule::OneCycle) && self.warmup_steps.is_some_and(|w| w > 0) {
            return Err(invalid(
                "schedule.stages.warmup_steps",
                self.warmup_steps.unwrap_or(0),
                "one_cycle has its own warm-up",
            ));
        }
        Ok(StageSpec {
            first_epoch,
            last_epoch,
            train,
            lr: self.lr.map(|v| positive("schedule.stages.lr", v)).transpose()?,
            layer_decay: self.layer_decay.map(|v| positive("schedule.stages.layer_decay", v)).transpose()?,
            lr_mult: parse_lr_mult("schedule.stages.lr_mult", self.lr_mult)?,
            bn: parse_bn(field, self.bn)?,
            warmup_steps: self.warmup_steps,
            lr_schedule: self.lr_schedule,
        })
    }
}

impl Schedule {
    /// Validates a `[schedule]` section (or its absence) against the weights it will start from.
    pub(crate) fn from_raw(raw: Option<RawSchedule>, weights: &WeightsSpec) -> Result<Schedule, SpecError> {
        let Some(s) = raw else {
            return Ok(Schedule::of(if weights.is_pretrained() { Strategy::FinetuneAll } else { Strategy::Scratch }));
        };
        let name = s.strategy.as_str();
        let only = |field: &'static str, set: bool, allowed: &[&str]| -> Result<(), SpecError> {
            if set && !allowed.contains(&name) {
                Err(invalid(field, "set", format!("does not apply to strategy \"{name}\"")))
            } else {
                Ok(())
            }
        };
        only("schedule.k", s.k.is_some(), &["freeze_bottom"])?;
        only("schedule.groups", s.groups.is_some(), &["freeze"])?;
        only("schedule.every", s.every.is_some(), &["progressive"])?;
        only("schedule.unfreeze_lr_factor", s.unfreeze_lr_factor.is_some(), &["progressive"])?;
        only("schedule.stages", s.stages.is_some(), &["stages"])?;
        let strategy = match name {
            "feature_extract" => Strategy::FeatureExtract,
            "finetune_all" => Strategy::FinetuneAll,
            "scratch" => Strategy::Scratch,
            "auto" => Strategy::Auto,
            "freeze_bottom" => match s.k {
                Some(k) if k >= 1 => Strategy::FreezeBottom { k },
                Some(k) => {
                    return Err(invalid("schedule.k", k, "freeze_bottom needs k >= 1 frozen groups (k = 0 is finetune_all)"))
                }
                None => {
                    return Err(invalid(
                        "schedule.k",
                        "missing",
                        "freeze_bottom needs k, the number of frozen groups from the input",
                    ))
                }
            },
            "freeze" => match s.groups {
                Some(g) if !g.is_empty() => Strategy::Freeze { groups: g },
                _ => {
                    return Err(invalid(
                        "schedule.groups",
                        "missing",
                        "strategy \"freeze\" needs a non-empty list of group names",
                    ))
                }
            },
            "progressive" => {
                let every = s.every.unwrap_or(1);
                if every == 0 {
                    return Err(invalid("schedule.every", 0, "must be at least 1 epoch per stage"));
                }
                let factor = positive("schedule.unfreeze_lr_factor", s.unfreeze_lr_factor.unwrap_or(1.0))?;
                Strategy::Progressive { every, unfreeze_lr_factor: factor }
            }
            "stages" => {
                let raw = s.stages.unwrap_or_default();
                if raw.is_empty() {
                    return Err(invalid("schedule.stages", "missing", "strategy \"stages\" needs [[schedule.stages]]"));
                }
                Strategy::Stages { stages: raw.into_iter().enumerate().map(|(i, r)| r.parse(i)).collect::<Result<_, _>>()? }
            }
            other => {
                return Err(invalid(
                    "schedule.strategy",
                    format!("\"{other}\""),
                    "expected one of feature_extract, freeze_bottom, finetune_all, scratch, freeze, progressive, stages, auto",
                ))
            }
        };
        let schedule = Schedule {
            bn: parse_bn("schedule.bn", s.bn)?.unwrap_or_default(),
            layer_decay: s.layer_decay.map(|v| positive("schedule.layer_decay", v)).transpose()?,
            lr_mult: parse_lr_mult("schedule.lr_mult", s.lr_mult)?,
            strategy,
        };
        match (&schedule.strategy, weights) {
            (Strategy::Scratch, w) if w.is_pretrained() => Err(invalid(
                "model.weights",
                format!("\"{}\"", w.as_spec_str()),
                "strategy \"scratch\" trains from a random init; set weights = \"none\"",
            )),
            (strategy, WeightsSpec::None) if strategy.freezes() => Err(invalid(
                "model.weights",
                "\"none\"",
                format!(
                    "strategy \"{}\" freezes layers, which only makes sense with pretrained weights",
                    strategy.name()
                ),
            )),
            (_, WeightsSpec::None) if schedule.bn == BnPolicy::FrozenStats => Err(invalid(
                "schedule.bn",
                "\"frozen_stats\"",
                "keeps the stored BatchNorm statistics, which a random init does not have",
            )),
            _ => Ok(schedule),
        }
    }

    /// The `[schedule]` section as the file format writes it.
    pub(crate) fn to_toml(&self) -> String {
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        let mult =
            |m: &[(String, f64)]| m.iter().map(|(g, v)| format!("{} = {v:?}", q(g))).collect::<Vec<_>>().join(", ");
        let mut s = format!("\n[schedule]\nstrategy = {}\nbn = {}\n", q(self.name()), q(self.bn.as_str()));
        if let Some(d) = self.layer_decay {
            s += &format!("layer_decay = {d:?}\n");
        }
        if !self.lr_mult.is_empty() {
            s += &format!("lr_mult = {{ {} }}\n", mult(&self.lr_mult));
        }
        match &self.strategy {
            Strategy::FreezeBottom { k } => s += &format!("k = {k}\n"),
            Strategy::Freeze { groups } => {
                s += &format!("groups = [{}]\n", groups.iter().map(|g| q(g)).collect::<Vec<_>>().join(", "))
            }
            Strategy::Progressive { every, unfreeze_lr_factor } => {
                s += &format!("every = {every}\nunfreeze_lr_factor = {unfreeze_lr_factor:?}\n")
            }
            Strategy::Stages { stages } => {
                for st in stages {
                    s += &format!("\n[[schedule.stages]]\nepochs = [{}, {}]\n", st.first_epoch, st.last_epoch);
                    s += &match &st.train {
                        GroupSel::All => "train = \"all\"\n".to_string(),
                        GroupSel::Top(k) => format!("train = {{ top = {k} }}\n"),
                        GroupSel::Named(g) => {
                            format!("train = [{}]\n", g.iter().map(|g| q(g)).collect::<Vec<_>>().join(", "))
                        }
                    };
                    if let Some(v) = st.lr {
                        s += &format!("lr = {v:?}\n");
                    }
                    if let Some(v) = st.layer_decay {
                        s += &format!("layer_decay = {v:?}\n");
                    }
                    if !st.lr_mult.is_empty() {
                        s += &format!("lr_mult = {{ {} }}\n", mult(&st.lr_mult));
                    }
                    if let Some(v) = st.bn {
                        s += &format!("bn = {}\n", q(v.as_str()));
                    }
                    if let Some(v) = st.warmup_steps {
                        s += &format!("warmup_steps = {v}\n");
                    }
                    if let Some(v) = st.lr_schedule {
                        s += &format!("lr_schedule = {}\n", q(v.as_str()));
                    }
                }
            }
            _ => {}
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::spec::JobSpec;

    const GROUPS: [&str; 4] = ["stem", "layer1", "layer2", "head"];

    fn spec(schedule: &str, weights: &str, epochs: usize) -> Result<JobSpec, SpecError> {
        let text = format!(
            "name = \"s\"\n[model]\narch = \"resnet18\"\nweights = \"{weights}\"\n[data]\nformat = \"idx\"\nroot = \"d\"\n\
             [train]\nepochs = {epochs}\nlr = 0.1\nwarmup_steps = 5\nlr_schedule = \"cosine\"\n[schedule]\n{schedule}"
        );
        JobSpec::from_toml(&text, Path::new("/x"))
    }

    fn stages(schedule: &str, epochs: usize) -> Result<Vec<Stage>, SpecError> {
        let s = spec(schedule, "imagenet", epochs)?;
        s.schedule.expand(&GROUPS, &s.train)
    }

    fn trainable(stages: &[Stage]) -> Vec<(Range<usize>, Vec<&'static str>)> {
        stages.iter().map(|s| (s.epochs.clone(), s.trainable_names(&GROUPS))).collect()
    }

    #[test]
    fn each_strategy_expands_into_its_stages() {
        let one = |s: &str| trainable(&stages(s, 3).unwrap());
        assert_eq!(one("strategy = \"feature_extract\""), [(0..3, vec!["head"])]);
        assert_eq!(one("strategy = \"freeze_bottom\"\nk = 2"), [(0..3, vec!["layer2", "head"])]);
        assert_eq!(one("strategy = \"finetune_all\""), [(0..3, GROUPS.to_vec())]);
        assert_eq!(one("strategy = \"freeze\"\ngroups = [\"stem\"]"), [(0..3, vec!["layer1", "layer2", "head"])]);
        let s = spec("strategy = \"scratch\"", "none", 2).unwrap();
        let st = s.schedule.expand(&GROUPS, &s.train).unwrap();
        assert_eq!(trainable(&st), [(0..2, GROUPS.to_vec())]);
        // One stage over the run: warm-up and decay from the train section, every group at lr.
        assert_eq!(
            (st[0].warmup_steps, st[0].lr_schedule, st[0].group_lr.clone()),
            (5, LrSchedule::Cosine, vec![0.1; 4])
        );
    }

    #[test]
    fn progressive_unfreezes_one_group_from_the_top_every_n_epochs() {
        let st = stages("strategy = \"progressive\"\nevery = 2\nunfreeze_lr_factor = 0.5", 9).unwrap();
        assert_eq!(
            trainable(&st),
            [
                (0..2, vec!["head"]),
                (2..4, vec!["layer2", "head"]),
                (4..6, vec!["layer1", "layer2", "head"]),
                // Everything trains from here: the rest of the run is one stage.
                (6..9, GROUPS.to_vec()),
            ]
        );
        let lrs: Vec<f64> = st.iter().map(|s| s.group_lr[3]).collect();
        assert_eq!(lrs, [0.1, 0.05, 0.025, 0.0125]);
        // Fewer epochs than groups: the schedule stops where the run does.
        assert_eq!(
            trainable(&stages("strategy = \"progressive\"", 2).unwrap()),
            [(0..1, vec!["head"]), (1..2, vec!["layer2", "head"])]
        );
        let err = stages("strategy = \"progressive\"\nevery = 0", 2).unwrap_err().to_string();
        assert!(err.contains("schedule.every` = 0"), "{err}");
    }

    #[test]
    fn explicit_stages_with_discriminative_rates_and_bn_policies() {
        let st = stages(
            "strategy = \"stages\"\nlayer_decay = 0.5\nbn = \"frozen_stats\"\n\
             [[schedule.stages]]\nepochs = [1, 2]\ntrain = [\"head\"]\nlr = 0.2\nlr_schedule = \"one_cycle\"\nwarmup_steps = 0\n\
             [[schedule.stages]]\nepochs = 3\ntrain = { top = 3 }\nlr_mult = { layer1 = 0.01 }\nbn = \"train_affine\"\n\
             [[schedule.stages]]\nepochs = [4, 4]\ntrain = \"all\"\nlayer_decay = 0.1",
            4,
        )
        .unwrap();
        assert_eq!(
            trainable(&st),
            [(0..2, vec!["head"]), (2..3, vec!["layer1", "layer2", "head"]), (3..4, GROUPS.to_vec())]
        );
        assert_eq!(st[0].group_lr, [0.2 * 0.125, 0.2 * 0.25, 0.2 * 0.5, 0.2]);
        assert_eq!(st[1].group_lr, [0.1 * 0.125, 0.1 * 0.01, 0.1 * 0.5, 0.1]);
        assert!((st[2].group_lr[0] - 0.1 * 1e-3).abs() < 1e-15);
        assert_eq!(
            [st[0].bn, st[1].bn, st[2].bn],
            [BnPolicy::FrozenStats, BnPolicy::TrainAffine, BnPolicy::FrozenStats]
        );
        assert_eq!([st[0].lr_schedule, st[1].lr_schedule], [LrSchedule::OneCycle, LrSchedule::Cosine]);
        assert_eq!((st[0].frozen_prefix(), st[1].frozen_prefix(), st[2].frozen_prefix()), (3, 0, 0));
    }

    #[test]
    fn adapt_stats_keeps_the_prefix_frozen_but_not_cacheable() {
        let st = stages("strategy = \"freeze_bottom\"\nk = 2\nbn = \"adapt_stats\"", 2).unwrap();
        assert_eq!(trainable(&st), [(0..2, vec!["layer2", "head"])]);
        assert_eq!(st[0].bn, BnPolicy::AdaptStats);
        assert_eq!(st[0].frozen_prefix(), 0, "its BatchNorm statistics move: outputs are not fixed");
        let plain = stages("strategy = \"freeze_bottom\"\nk = 2", 2).unwrap();
        assert_eq!(plain[0].frozen_prefix(), 2);
    }

    #[test]
    fn bad_schedules_are_rejected_naming_the_value() {
        let cases = [
            ("strategy = \"freeze\"\ngroups = [\"layer9\"]", "\"layer9\""),
            ("strategy = \"finetune_all\"\nlr_mult = { layer7 = 0.1 }", "schedule.lr_mult"),
            ("strategy = \"finetune_all\"\nlayer_decay = -0.5", "schedule.layer_decay` = -0.5"),
            ("strategy = \"finetune_all\"\nbn = \"sometimes\"", "\"sometimes\""),
            ("strategy = \"stages\"\n[[schedule.stages]]\nepochs = [1, 2]\ntrain = \"all\"\n[[schedule.stages]]\nepochs = [2, 3]\ntrain = \"all\"", "overlaps"),
            ("strategy = \"stages\"\n[[schedule.stages]]\nepochs = [1, 1]\ntrain = \"all\"\n[[schedule.stages]]\nepochs = 3\ntrain = \"all\"", "leaves epochs 2..2"),
            ("strategy = \"stages\"\n[[schedule.stages]]\nepochs = [1, 2]\ntrain = \"all\"", "cover every epoch"),
            ("strategy = \"stages\"\n[[schedule.stages]]\nepochs = [1, 3]\ntrain = [\"neck\"]", "\"neck\""),
            ("strategy = \"stages\"\n[[schedule.stages]]\nepochs = [1, 3]\ntrain = \"all\"\nlr = 0.0", "schedule.stages.lr` = 0"),
            ("strategy = \"stages\"\n[[schedule.stages]]\nepochs = [1, 3]\ntrain = []", "trains no group"),
            ("strategy = \"auto\"", "thaw recommend"),
            ("strategy = \"feature_extract\"\nevery = 2", "schedule.every"),
        ];
        for (schedule, expect) in cases {
            let err = stages(schedule, 3).unwrap_err().to_string();
            assert!(err.contains(expect), "{schedule}: {err}");
        }
        // The unknown-group error lists the model's groups.
        let err = stages("strategy = \"freeze\"\ngroups = [\"layer9\"]", 3).unwrap_err().to_string();
        assert!(err.contains("stem, layer1, layer2, head"), "{err}");
        let err = spec("strategy = \"finetune_all\"\nbn = \"frozen_stats\"", "none", 1).unwrap_err().to_string();
        assert!(err.contains("schedule.bn"), "{err}");
        let err = spec("strategy = \"progressive\"", "none", 1).unwrap_err().to_string();
        assert!(err.contains("pretrained weights"), "{err}");
    }

    #[test]
    fn schedules_round_trip_through_the_resolved_toml() {
        for schedule in [
            "strategy = \"progressive\"\nevery = 3\nunfreeze_lr_factor = 0.3\nbn = \"train_affine\"\nlayer_decay = 0.7",
            "strategy = \"stages\"\nlr_mult = { stem = 0.01 }\n[[schedule.stages]]\nepochs = [1, 2]\ntrain = { top = 1 }\nlr = 0.3\nbn = \"frozen_stats\"\nwarmup_steps = 7\nlr_schedule = \"constant\"\n[[schedule.stages]]\nepochs = [3, 3]\ntrain = [\"layer2\", \"head\"]\nlr_mult = { layer2 = 0.5 }",
        ] {
            let s = spec(schedule, "imagenet", 3).unwrap();
            assert_eq!(s, JobSpec::from_toml(&s.to_toml(), Path::new("/y")).unwrap(), "{}", s.to_toml());
        }
    }

    #[test]
    fn lr_factors_follow_warmup_cosine_and_one_cycle() {
        let mut st = stages("strategy = \"finetune_all\"", 1).unwrap().remove(0);
        assert_eq!(st.lr_factor(0, 105), 0.2); // warm-up: 1/5
        assert_eq!(st.lr_factor(4, 105), 1.0);
        assert_eq!(st.lr_factor(5, 105), 1.0); // cosine starts at the peak
        assert!((st.lr_factor(55, 105) - 0.5).abs() < 1e-12);
        st.lr_schedule = LrSchedule::OneCycle;
        assert!((st.lr_factor(0, 100) - 1.0 / 25.0).abs() < 1e-12);
        assert!((st.lr_factor(30, 100) - 1.0).abs() < 1e-12);
        assert!(st.lr_factor(99, 100) < 1e-3);
    }
}
