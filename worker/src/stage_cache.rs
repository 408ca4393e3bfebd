//! Feature caching for the trainer: while a stage keeps a prefix of the network frozen with fixed
//! BatchNorm statistics, and the training inputs are not randomly augmented, the prefix computes the
//! same output for a sample in every epoch. The first epoch of the stage stores those outputs
//! ([`FeatureCache`], memory-bounded, spilling to disk); later epochs read them instead of decoding
//! the images and running the prefix, so a `feature_extract` epoch costs the head alone.
//!
//! The same holds for the validation split (evaluation always runs the prefix in eval mode).
//!
//! A [`StageCache`] belongs to one stage: a new stage gets a new, empty one (the trainer drops the
//! old one), so nothing cached under one frozen set is ever read under another. Samples that
//! could not be read are remembered, so a dataset with a corrupt image still counts as fully
//! cached.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::data::loader::{Batch, Loader, LoaderConfig};
use crate::data::transform::Transform;
use crate::data::Dataset;
use crate::feature_cache::{CacheError, FeatureCache};
use crate::train::{EvalSums, Scores, TrainError};
use crate::zoo::Network;

impl From<CacheError> for TrainError {
    fn from(e: CacheError) -> Self {
        TrainError::Invalid(format!("feature cache: {e}"))
    }
}

/// The caches of one stage: groups `0..prefix` frozen.
pub struct StageCache {
    pub stage: usize,
    pub prefix: usize,
    pub train: FeatureCache,
    pub val: FeatureCache,
    /// Samples that could not be read (never cached).
    bad_train: HashSet<usize>,
    bad_val: HashSet<usize>,
}

impl StageCache {
    /// Empty caches for the stage; `budget_bytes` is shared by the splits in proportion to their
    /// sizes; spill files go under `dir`.
    pub fn new(stage: usize, prefix: usize, dir: PathBuf, budget_bytes: usize, n_train: usize, n_val: usize) -> Self {
        let share = |n: usize| (budget_bytes as f64 * n as f64 / (n_train + n_val).max(1) as f64) as usize;
        let key = format!("stage {}: groups 1-{prefix} frozen", stage + 1);
        let mut train = FeatureCache::new(dir.join("train"), share(n_train), n_train);
        let mut val = FeatureCache::new(dir.join("val"), share(n_val), n_val);
        train.reset(key.clone());
        val.reset(key);
        StageCache { stage, prefix, train, val, bad_train: HashSet::new(), bad_val: HashSet::new() }
    }

    /// Whether every sample of `batches` is cached (or known unreadable): the epoch can run from
    /// the cache without touching an image.
    pub fn covers(&self, batches: &[Vec<usize>]) -> bool {
        batches.iter().flatten().all(|&i| self.train.contains(i) || self.bad_train.contains(&i))
    }

    /// Remembers samples the loader could not read.
    pub fn mark_bad(&mut self, indices: impl IntoIterator<Item = usize>) {
        self.bad_train.extend(indices);
    }

    /// Step `step` of an epoch read from the cache: `images` holds the prefix's outputs. Call only
    /// when [`StageCache::covers`] the epoch.
    pub fn batch(&self, ds: &Arc<dyn Dataset>, step: usize, planned: &[usize]) -> Result<Batch, TrainError> {
        let indices: Vec<usize> = planned.iter().copied().filter(|i| !self.bad_train.contains(i)).collect();
        let labels: Vec<i64> = indices.iter().map(|&i| ds.label(i)).collect();
        let images = if indices.is_empty() {
            Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))
        } else {
            self.train.try_get_batch(&indices)?.ok_or_else(|| {
                TrainError::Invalid(format!("feature cache lost an entry of step {step}; this is a bug"))
            })?
        };
        Ok(Batch {
            step,
            images,
            labels: Tensor::from_slice(&labels),
            indices,
            skipped: Vec::new(),
            skipped_indices: Vec::new(),
        })
    }

    /// Evaluation through the cached prefix: loss and accuracy on the validation split.
    /// Scores `net` on the samples `order` of the validation set `ds`, through the cache.
    pub fn evaluate(
        &mut self,
        net: &Network,
        ds: Arc<dyn Dataset>,
        order: Vec<usize>,
        t: &Transform,
        batch_size: usize,
        threads: usize,
    ) -> Result<EvalSums, TrainError> {
        let n = net.groups().len();
        let device = net.vs.device();
        let mut scores = Scores::new(order.len());
        let complete = order.iter().all(|&i| self.val.contains(i) || self.bad_val.contains(&i));
        if complete {
            for chunk in order.chunks(batch_size) {
                let indices: Vec<usize> = chunk.iter().copied().filter(|i| !self.bad_val.contains(i)).collect();
                if indices.is_empty() {
                    continue;
                }
                let feats = self.val.try_get_batch(&indices)?.ok_or_else(|| {
                    TrainError::Invalid("feature cache lost a validation entry; this is a bug".into())
                })?;
                let labels: Vec<i64> = indices.iter().map(|&i| ds.label(i)).collect();
                let logits = net.eval_range(&feats.to_device(device), self.prefix..n);
                scores.add(&logits, &Tensor::from_slice(&labels).to_device(device));
            }
        } else {
            let cfg = LoaderConfig::eval(batch_size, threads);
            for batch in Loader::start(ds.clone(), order, 0, t.clone(), cfg) {
                self.bad_val.extend(batch.skipped_indices.iter().copied());
                if batch.indices.is_empty() {
                    continue;
                }
                let feats = net.eval_range(&batch.images.to_device(device), 0..self.prefix);
                self.val.put_batch(&batch.indices, &feats)?;
                let logits = net.eval_range(&feats, self.prefix..n);
                scores.add(&logits, &batch.labels.to_device(device));
            }
        }
        Ok(scores.sums())
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let s = self.train.stats();
        format!(
            "{} training entries ({} MB in memory, {} MB on disk), {} hits, {} misses",
            s.entries,
            s.bytes_in_memory >> 20,
            s.bytes_on_disk >> 20,
            s.hits,
            s.misses
        )
    }
}
