//! The metrics of one finished epoch: what rank 0 reports, the coordinator keeps and stores,
//! checkpoints carry and the CLI prints. One type for all of them, and the one place where it is
//! converted to and from the wire.

use serde::{Deserialize, Serialize};
use thaw_proto::v1 as pb;

/// Metrics of one finished epoch. Non-finite values (a diverged loss) serialize as the strings
/// `"NaN"`, `"inf"` and `"-inf"`, which JSON numbers cannot express.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Counted from 1.
    pub epoch: u32,
    #[serde(with = "float")]
    pub train_loss: f64,
    #[serde(with = "float")]
    pub train_acc: f64,
    #[serde(with = "float")]
    pub val_loss: f64,
    #[serde(with = "float")]
    pub val_acc: f64,
    /// Training images used (all ranks together).
    pub images: u64,
    /// Unreadable samples skipped.
    pub skipped: u64,
    #[serde(with = "float")]
    pub seconds: f64,
    /// Seconds the trainer waited for its loader.
    #[serde(with = "float")]
    pub data_wait: f64,
}

impl From<&EpochMetrics> for pb::EpochMetrics {
    fn from(m: &EpochMetrics) -> Self {
        pb::EpochMetrics {
            epoch: m.epoch,
            train_loss: m.train_loss,
            train_acc: m.train_acc,
            val_loss: m.val_loss,
            val_acc: m.val_acc,
            images: m.images,
            skipped: m.skipped,
            seconds: m.seconds,
            data_wait: m.data_wait,
        }
    }
}

impl From<&pb::EpochMetrics> for EpochMetrics {
    fn from(m: &pb::EpochMetrics) -> Self {
        EpochMetrics {
            epoch: m.epoch,
            train_loss: m.train_loss,
            train_acc: m.train_acc,
            val_loss: m.val_loss,
            val_acc: m.val_acc,
            images: m.images,
            skipped: m.skipped,
            seconds: m.seconds,
            data_wait: m.data_wait,
        }
    }
}

mod float {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *v {
            v if v.is_finite() => s.serialize_f64(v),
            v if v.is_nan() => s.serialize_str("NaN"),
            v if v > 0.0 => s.serialize_str("inf"),
            _ => s.serialize_str("-inf"),
        }
    }

    struct F64;

    impl Visitor<'_> for F64 {
        type Value = f64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number, \"NaN\", \"inf\" or \"-inf\"")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            match v {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(F64)
    }
}
