//! The pretrained model as a classifier (`thaw predict`) and as a standalone feature extractor
//! (`thaw extract`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::transform::Transform;
use crate::data::{Dataset, SampleError};
use crate::progress::Progress;
use crate::tensor_io;
use crate::train::TrainError;
use crate::weights;
use crate::zoo::{Arch, Network};

/// A network ready for inference, with the names of its classes.
pub struct Classifier {
    pub net: Network,
    pub class_names: Vec<String>,
}

impl Classifier {
    /// `weights`: "imagenet" (torchvision's, 1000 ImageNet classes), "none" (random init, for
    /// testing), or a path to a thaw checkpoint or an imported weights file.
    pub fn load(arch: Arch, weights_arg: &str, device: Device) -> Result<Classifier, TrainError> {
        match weights_arg {
            "imagenet" => {
                let path = weights::resolve_imagenet(arch, &weights::FetchOptions::from_env())?;
                let net = Network::new(arch, 1000, device);
                weights::load_into(&net, &path, false)?;
                Ok(Classifier { net, class_names: imagenet_names() })
            }
            "none" => {
                let net = Network::new(arch, 1000, device);
                Ok(Classifier { net, class_names: imagenet_names() })
            }
            path => {
                let path = Path::new(path);
                match Checkpoint::load(path) {
                    Ok(ck) => {
                        let net = Network::new(arch, ck.num_classes, device);
                        ck.restore_model(&net)?;
                        // A run with `train.ema_decay` was scored with its average: predict with it too.
                        crate::ema::overlay(&net, &ck.optim);
                        let mut names = ck.class_names.clone();
                        names.resize_with(ck.num_classes as usize, || "?".into());
                        Ok(Classifier { net, class_names: names })
                    }
                    // Not a checkpoint: an imported weights file with the ImageNet head.
                    Err(CheckpointError::NotACheckpoint { .. }) => {
                        let net = Network::new(arch, 1000, device);
                        weights::load_into(&net, path, false)?;
                        Ok(Classifier { net, class_names: imagenet_names() })
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Top-`k` (class index, name, probability) for each image file.
    pub fn predict_files(
        &self,
        files: &[impl AsRef<Path>],
        k: usize,
    ) -> Vec<Result<Vec<(usize, String, f64)>, SampleError>> {
        let t = Transform::new(&self.net.arch.preprocess(), None, false);
        files
            .iter()
            .map(|f| {
                let f = f.as_ref();
                let err = |reason: String| SampleError { key: f.display().to_string(), reason };
                let img = image::open(f).map_err(|e| err(e.to_string()))?;
                let mut buf = vec![0f32; t.sample_len()];
                t.apply(&img, false, &mut buf);
                let s = t.size as i64;
                let x = Tensor::from_slice(&buf).view([1, t.channels as i64, s, s]).to_device(self.net.vs.device());
                let probs = tch::no_grad(|| self.net.forward_t(&x, false).softmax(-1, Kind::Float));
                let (p, i) = probs.topk(k.min(self.class_names.len()) as i64, -1, true, true);
                let p = Vec::<f64>::try_from(p.flatten(0, -1).to_kind(Kind::Double)).unwrap_or_default();
                let i = Vec::<i64>::try_from(i.flatten(0, -1)).unwrap_or_default();
                Ok(i.iter().zip(p).map(|(&i, p)| (i as usize, self.class_names[i as usize].clone(), p)).collect())
            })
            .collect()
    }
}

fn imagenet_names() -> Vec<String> {
    crate::imagenet_classes::CLASSES.iter().map(|s| s.to_string()).collect()
}

/// What [`extract_features`] wrote.
pub struct ExtractReport {
    pub samples: usize,
    pub feature_dim: i64,
    pub skipped: Vec<SampleError>,
}

/// Runs the trunk over every sample of `ds` and writes `features` `[N, D]` (f32), `labels` `[N]`
/// (i64) and `indices` `[N]` to `out` as safetensors; unreadable samples are skipped and reported.
pub fn extract_features(
    net: &Network,
    ds: Arc<dyn Dataset>,
    t: &Transform,
    batch_size: usize,
    threads: usize,
    out: &Path,
) -> Result<ExtractReport, TrainError> {
    let cfg = LoaderConfig::eval(batch_size, threads);
    let n = ds.len();
    let class_names = ds.class_names().to_vec();
    let mut progress = Progress::new("extract", n as u64, "img");
    let (mut feats, mut labels, mut indices, mut skipped) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let device = net.vs.device();
    let mut done = 0;
    tch::no_grad(|| {
        for batch in Loader::start(ds, (0..n).collect(), 0, t.clone(), cfg) {
            done += batch.indices.len() + batch.skipped.len();
            skipped.extend(batch.skipped);
            if batch.indices.is_empty() {
                continue;
            }
            feats.push(net.features(&batch.images.to_device(device)).to_device(Device::Cpu));
            labels.push(batch.labels);
            indices.extend(batch.indices.iter().map(|&i| i as i64));
            progress.update(done as u64, String::new);
        }
    });
    progress.finish();
    let features = if feats.is_empty() {
        Tensor::zeros([0, net.feature_dim], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(&feats, 0)
    };
    let labels =
        if labels.is_empty() { Tensor::zeros([0], (Kind::Int64, Device::Cpu)) } else { Tensor::cat(&labels, 0) };
    let meta = HashMap::from([
        ("format".to_string(), "thaw-features-v1".to_string()),
        ("arch".to_string(), net.arch.name().to_string()),
        ("class_names".to_string(), serde_json::to_string(&class_names).expect("strings serialize")),
        ("skipped".to_string(), skipped.len().to_string()),
    ]);
    let samples = indices.len();
    tensor_io::write_safetensors(
        out,
        &[("features".into(), features), ("labels".into(), labels), ("indices".into(), Tensor::from_slice(&indices))],
        meta,
    )?;
    Ok(ExtractReport { samples, feature_dim: net.feature_dim, skipped })
}
