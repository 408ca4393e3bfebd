//! `thaw data pack | inspect | verify | synth`: packed WebDataset shards (see
//! `worker/src/data/shards.rs`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use thaw_worker::data::idx::Split;
use thaw_worker::data::shards::{self, ShardIndex};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Pack an image-folder tree (`SRC/<class>/<image>`) or an IDX dataset (MNIST-style files)
    /// into WebDataset tar shards plus an index.
    Pack {
        src: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// For IDX data: `train` or `test`.
        #[arg(long, default_value = "train")]
        split: String,
        /// Target shard size: bytes, or with a KB/MB/GB suffix.
        #[arg(long, default_value = "256MB")]
        shard_size: String,
    },
    /// Counts, classes and sizes of a packed directory.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check every shard's checksum and decode every sample; bad samples are named by key.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write an ImageNet-shaped tree of real JPEG files (about 500x375) for tests and benchmarks.
    Synth {
        #[arg(long, default_value_t = 1000)]
        classes: usize,
        #[arg(long)]
        images: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// `256MB` and the like, in bytes.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t.as_str(), ""),
    };
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "K" => 1 << 10,
        "MB" | "M" => 1 << 20,
        "GB" | "G" => 1 << 30,
        other => bail!("--shard-size {s}: unknown unit `{other}` (use B, KB, MB or GB)"),
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok((n * mult as f64) as u64),
        _ => bail!("--shard-size {s}: expected a positive size such as 256MB"),
    }
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Pack { src, out, shard_size, split } => {
            let bytes = parse_size(&shard_size)?;
            let split = match split.as_str() {
                "train" => Split::Train,
                "test" => Split::Test,
                other => bail!("--split {other}: expected `train` or `test`"),
            };
            let r = shards::pack(&src, &out, bytes, split)?;
            println!(
                "packed {} images of {} classes into {} shards ({} bytes) in {}",
                r.samples,
                r.classes,
                r.shards,
                r.bytes,
                out.display()
            );
        }
        DataCommand::Inspect { dir, json } => {
            let index = ShardIndex::load(&dir)?;
            let mut per_class = vec![0usize; index.classes.len()];
            for e in index.shards.iter().flat_map(|s| &s.samples) {
                if let Some(c) = per_class.get_mut(e.label as usize) {
                    *c += 1;
                }
            }
            let bytes: u64 = index.shards.iter().map(|s| s.bytes).sum();
            if json {
                let v = serde_json::json!({
                    "samples": index.num_samples(), "classes": index.classes.len(), "shards": index.shards.len(),
                    "bytes": bytes, "per_class": index.classes.iter().zip(&per_class).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let (min, max) =
                    (per_class.iter().min().copied().unwrap_or(0), per_class.iter().max().copied().unwrap_or(0));
                println!(
                    "{}: {} samples, {} classes ({min}..{max} per class), {} shards, {:.1} MB",
                    dir.display(),
                    index.num_samples(),
                    index.classes.len(),
                    index.shards.len(),
                    bytes as f64 / 1e6
                );
            }
        }
        DataCommand::Verify { dir, json } => {
            let r = shards::verify(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.problems {
                    println!(
                        "{}{}: {}",
                        p.shard,
                        p.key.as_ref().map(|k| format!(" {k}")).unwrap_or_default(),
                        p.reason
                    );
                }
                println!(
                    "{} shards, {} samples, {} decoded, {} problems",
                    r.shards,
                    r.samples,
                    r.decoded,
                    r.problems.len()
                );
            }
            if !r.problems.is_empty() {
                bail!("{}: {} problems found", dir.display(), r.problems.len());
            }
        }
        DataCommand::Synth { classes, images, out, seed } => {
            let n = shards::synth(&out, classes, images, seed)?;
            println!("wrote {n} JPEG images of {classes} classes under {}", out.display());
        }
    }
    Ok(())
}
