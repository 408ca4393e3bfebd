//! Training checkpoints: one safetensors file holding the model's variables (`model.<name>`), the
//! optimizer state (`optim.<name>.<buffer>`), and in its metadata the resolved job spec, the data
//! cursor and the metrics so far, so `thaw train --resume` continues exactly where a run stopped,
//! mid-epoch included.
//!
//! Written atomically ([`crate::tensor_io::write_atomic`]): an interrupted write never leaves a
//! torn checkpoint. *When* to checkpoint is decided by [`CheckpointPolicy`], apart from the writing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::tensor_io::{self, TensorIoError};
use thaw_coordinator::plan::{Cut, EpochCursor};

pub const FORMAT: &str = "thaw-checkpoint-v1";

/// Where training resumes: the next step of the given epoch, with the running sums of the
/// partial epoch so its metrics come out exact. `step` counts steps of the plan laid out for
/// `world` ranks after `cut` (see [`EpochCursor`]), so a checkpoint resumes on any world size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: usize,
    pub step: usize,
    pub loss_sum: f64,
    pub correct: u64,
    pub seen: u64,
    pub skipped: u64,
    #[serde(default = "one")]
    pub world: u32,
    #[serde(default)]
    pub cut: Option<Cut>,
}

fn one() -> u32 {
    1
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor { epoch: 0, step: 0, loss_sum: 0.0, correct: 0, seen: 0, skipped: 0, world: 1, cut: None }
    }
}

impl Cursor {
    /// Where the epoch stands, in the terms every rank and the coordinator share.
    pub fn position(&self) -> EpochCursor {
        EpochCursor { epoch: self.epoch as u32, world: self.world, step: self.step as u64, cut: self.cut }
    }

    /// Moves to `at` (the same epoch for a new group, or a later one), keeping the epoch's sums
    /// when it is the same epoch.
    pub fn move_to(&mut self, at: EpochCursor) {
        if at.epoch as usize != self.epoch {
            *self = Cursor::default();
        }
        self.epoch = at.epoch as usize;
        self.step = at.step as usize;
        self.world = at.world;
        self.cut = at.cut;
    }

    /// The metrics of the epoch this cursor has just finished (`epoch` counted from 0).
    pub fn epoch_metrics(
        &self,
        epoch: usize,
        (val_loss, val_acc): (f64, f64),
        skipped: u64,
        seconds: f64,
        data_wait: f64,
    ) -> EpochMetrics {
        let seen = self.seen.max(1) as f64;
        EpochMetrics {
            epoch: epoch as u32 + 1,
            train_loss: self.loss_sum / seen,
            train_acc: self.correct as f64 / seen,
            val_loss,
            val_acc,
            images: self.seen,
            skipped,
            seconds,
            data_wait,
        }
    }
}

/// Metrics of one finished epoch (the coordinator's type: checkpoints, reports and the store share it).
pub use thaw_coordinator::metrics::EpochMetrics;

pub struct Checkpoint {
    pub spec_toml: String,
    pub arch: String,
    pub num_classes: i64,
    pub class_names: Vec<String>,
    pub cursor: Cursor,
    pub history: Vec<EpochMetrics>,
    pub model: HashMap<String, Tensor>,
    pub optim: HashMap<String, Tensor>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Io(#[from] TensorIoError),
    #[error("checkpoint of {arch} does not fit: {reason}")]
    Mismatch { arch: String, reason: String },
    #[error("{path} is not a thaw checkpoint: {reason}")]
    NotACheckpoint { path: PathBuf, reason: String },
}

impl Checkpoint {
    /// Writes the checkpoint atomically: a process killed during the write leaves the previous
    /// file at `path` whole (the `checkpoint-write` failpoint tests exactly that).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let bytes = self.to_bytes()?;
        tensor_io::write_atomic(path, |f| {
            use std::io::Write;
            let half = bytes.len() / 2;
            f.write_all(&bytes[..half])?;
            f.flush()?;
            crate::failpoint::hit("checkpoint-write", 0);
            f.write_all(&bytes[half..])
        })?;
        Ok(())
    }

    /// The checkpoint as the bytes of its file: what a recovering group broadcasts.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let (tensors, meta) = self.parts();
        tensor_io::safetensors_bytes(&tensors, meta)
            .map_err(|reason| CheckpointError::NotACheckpoint { path: "<state in memory>".into(), reason })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        let path = Path::new("<state received from the source rank>");
        let bad = |reason: String| CheckpointError::NotACheckpoint { path: path.to_path_buf(), reason };
        let (tensors, meta) = tensor_io::parse_safetensors(bytes).map_err(bad)?;
        Self::from_parts(path, tensors, meta)
    }

    fn parts(&self) -> (Vec<(String, Tensor)>, HashMap<String, String>) {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(self.model.len() + self.optim.len());
        tensors.extend(self.model.iter().map(|(n, t)| (format!("model.{n}"), t.shallow_clone())));
        tensors.extend(self.optim.iter().map(|(n, t)| (format!("optim.{n}"), t.shallow_clone())));
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("spec".to_string(), self.spec_toml.clone()),
            ("arch".to_string(), self.arch.clone()),
            ("num_classes".to_string(), self.num_classes.to_string()),
            ("class_names".to_string(), json(&self.class_names)),
            ("cursor".to_string(), json(&self.cursor)),
            ("history".to_string(), json(&self.history)),
        ]);
        (tensors, meta)
    }

    /// The cursor of the checkpoint at `path`, read from its header alone.
    pub fn cursor_of(path: &Path) -> Result<EpochCursor, CheckpointError> {
        use std::io::Read;
        let bad = |reason: String| CheckpointError::NotACheckpoint { path: path.to_path_buf(), reason };
        let io = |source| CheckpointError::Io(TensorIoError::Read { path: path.to_path_buf(), source });
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io)?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(bad(format!("a header of {len} bytes")));
        }
        let mut header = Vec::new();
        f.take(len).read_to_end(&mut header).map_err(io)?;
        let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        let meta = &header["__metadata__"];
        if meta["format"].as_str() != Some(FORMAT) {
            return Err(bad(format!("metadata `format` is {}, expected {FORMAT:?}", meta["format"])));
        }
        let cursor = meta["cursor"].as_str().ok_or_else(|| bad("metadata lacks `cursor`".into()))?;
        let cursor: Cursor =
            serde_json::from_str(cursor).map_err(|e| bad(format!("metadata `cursor` is malformed: {e}")))?;
        Ok(cursor.position())
    }

    pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let (tensors, meta) = tensor_io::read_safetensors(path)?;
        Self::from_parts(path, tensors, meta)
    }

    fn from_parts(
        path: &Path,
        tensors: Vec<(String, Tensor)>,
        meta: HashMap<String, String>,
    ) -> Result<Checkpoint, CheckpointError> {
        let bad = |reason: String| CheckpointError::NotACheckpoint { path: path.to_path_buf(), reason };
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("metadata `format` is {:?}, expected {FORMAT:?}", meta.get("format"))));
        }
        let get = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("metadata lacks `{k}`")));
        let parse = |k: &str, v: String| bad(format!("metadata `{k}` is malformed: {v}"));
        let mut model = HashMap::new();
        let mut optim = HashMap::new();
        for (name, t) in tensors {
            if let Some(n) = name.strip_prefix("model.") {
                model.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix("optim.") {
                optim.insert(n.to_string(), t);
            }
        }
        Ok(Checkpoint {
            spec_toml: get("spec")?,
            arch: get("arch")?,
            num_classes: get("num_classes")?
                .parse()
                .map_err(|e: std::num::ParseIntError| parse("num_classes", e.to_string()))?,
            class_names: serde_json::from_str(&get("class_names")?).map_err(|e| parse("class_names", e.to_string()))?,
            cursor: serde_json::from_str(&get("cursor")?).map_err(|e| parse("cursor", e.to_string()))?,
            history: serde_json::from_str(&get("history")?).map_err(|e| parse("history", e.to_string()))?,
            model,
            optim,
        })
    }
}

impl Checkpoint {
    /// Copies the saved model variables into `net`; every variable must be present with its shape.
    pub fn restore_model(&self, net: &crate::zoo::Network) -> Result<(), CheckpointError> {
        let mismatch = |reason: String| CheckpointError::Mismatch { arch: self.arch.clone(), reason };
        if self.arch != net.arch.name() || self.num_classes != net.num_classes {
            return Err(mismatch(format!(
                "the model to restore is {} with {} classes, the checkpoint {} with {}",
                net.arch, net.num_classes, self.arch, self.num_classes
            )));
        }
        tch::no_grad(|| {
            for (name, var) in net.vs.variables() {
                let saved =
                    self.model.get(&name).ok_or_else(|| mismatch(format!("it lacks model variable `{name}`")))?;
                if saved.size() != var.size() {
                    return Err(mismatch(format!("`{name}` has shape {:?}, the model {:?}", saved.size(), var.size())));
                }
                var.shallow_clone().copy_(saved);
            }
            Ok(())
        })
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

/// When to write a checkpoint: a pure decision, apart from the writing.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointPolicy {
    /// Also every this many steps within an epoch (0: only at epoch ends).
    pub every_steps: usize,
}

impl CheckpointPolicy {
    /// Whether to checkpoint after finishing step `step` (0-based) of an epoch of `steps` steps.
    pub fn after_step(&self, step: usize, steps: usize) -> bool {
        step + 1 == steps || (self.every_steps > 0 && (step + 1) % self.every_steps == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_checkpoints_at_epoch_end_and_every_n() {
        let p = CheckpointPolicy { every_steps: 0 };
        assert_eq!((0..10).filter(|&s| p.after_step(s, 10)).collect::<Vec<_>>(), [9]);
        let p = CheckpointPolicy { every_steps: 4 };
        assert_eq!((0..10).filter(|&s| p.after_step(s, 10)).collect::<Vec<_>>(), [3, 7, 9]);
    }

    #[test]
    fn round_trip_and_rejects_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let ck = Checkpoint {
            spec_toml: "name = \"x\"".into(),
            arch: "lenet5".into(),
            num_classes: 10,
            class_names: vec!["a".into(), "b".into()],
            cursor: Cursor { epoch: 2, step: 7, loss_sum: 1.5, correct: 3, seen: 9, skipped: 1, world: 3, cut: None },
            history: vec![],
            model: HashMap::from([("fc.weight".to_string(), Tensor::from_slice(&[1f32, 2.]))]),
            optim: HashMap::from([("fc.weight.step".to_string(), Tensor::from_slice(&[4i64]))]),
        };
        ck.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.cursor, ck.cursor);
        assert_eq!(back.class_names, ck.class_names);
        assert!(back.model["fc.weight"].equal(&ck.model["fc.weight"]));
        assert_eq!(back.optim["fc.weight.step"].int64_value(&[0]), 4);
        assert_eq!(Checkpoint::cursor_of(&path).unwrap(), EpochCursor { epoch: 2, world: 3, step: 7, cut: None });
        let again = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
        assert_eq!((again.cursor, again.spec_toml), (ck.cursor.clone(), ck.spec_toml.clone()));
        assert!(again.model["fc.weight"].equal(&ck.model["fc.weight"]));
        // A checkpoint written before cursors had a world reads as one process's.
        let old: Cursor =
            serde_json::from_str(r#"{"epoch":1,"step":2,"loss_sum":0.0,"correct":0,"seen":0,"skipped":0}"#).unwrap();
        assert_eq!((old.world, old.cut), (1, None));

        let other = dir.path().join("w.safetensors");
        tensor_io::write_safetensors(&other, &[("a".into(), Tensor::from_slice(&[1f32]))], HashMap::new()).unwrap();
        let err = Checkpoint::load(&other).err().unwrap().to_string();
        assert!(err.contains("not a thaw checkpoint"), "{err}");
    }
}
