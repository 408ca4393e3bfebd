//! `thaw data pack | inspect | verify | synth`: packed WebDataset shards (see
//! `worker/src/data/shards.rs`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;
use thaw_worker::data::idx::Split;
use thaw_worker::data::shards::{self, PackOptions, ShardIndex};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Pack a dataset into WebDataset tar shards plus an index (`samples.bin`, then `index.json`),
    /// in a seeded random order, reading on all cores. SRC is an IDX dataset (MNIST-style files:
    /// both splits into OUT/train and OUT/val), a tree with splits (`SRC/train/<class>/<image>`
    /// and `SRC/val/` or `SRC/test/`: into OUT/train and OUT/val with train's classes), or an
    /// image-folder tree (`SRC/<class>/<image>`: into OUT).
    Pack {
        src: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Pack only this split (`train` or `test`), into OUT itself.
        #[arg(long)]
        split: Option<String>,
        /// Target shard size: bytes, or with a KB/MB/GB suffix.
        #[arg(long, default_value = "256MB")]
        shard_size: String,
        /// Seed of the pack-time shuffle.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep the source order (classes and files sorted, or the IDX order) instead of shuffling.
        #[arg(long)]
        no_shuffle: bool,
        /// Threads reading (and for IDX PNG-encoding) samples; default: the available cores. The
        /// shards are identical whatever the number.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Counts, classes and sizes of a packed directory (or of both splits of one), and how long
    /// its index takes to load.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check every shard's checksum and decode every sample (of both splits of a packed dataset
    /// with splits); bad samples are named by key.
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
        DataCommand::Pack { src, out, shard_size, split, seed, no_shuffle, threads } => {
            let split = match split.as_deref() {
                None => None,
                Some("train") => Some(Split::Train),
                Some("test") => Some(Split::Test),
                Some(other) => bail!("--split {other}: expected `train` or `test`"),
            };
            if threads == Some(0) {
                bail!("--threads 0: expected at least one thread");
            }
            let opts = PackOptions {
                shard_bytes: parse_size(&shard_size)?,
                seed,
                shuffle: !no_shuffle,
                threads: threads.unwrap_or(0),
                split,
            };
            for (name, r) in shards::pack_dataset(&src, &out, &opts)? {
                println!(
                    "packed {} images of {} classes into {} shards ({} bytes) in {}{}: {:.1} s, {:.0} img/s",
                    r.samples,
                    r.classes,
                    r.shards,
                    r.bytes,
                    r.dir.display(),
                    if name.is_empty() { String::new() } else { format!(" ({name})") },
                    r.seconds,
                    r.samples as f64 / r.seconds.max(1e-9)
                );
            }
        }
        DataCommand::Inspect { dir, json } => {
            let (train, val) = shards::packed_splits(&dir)?;
            let mut reports = vec![("train", inspect(&train)?)];
            if let Some(v) = &val {
                reports.push(("val", inspect(v)?));
            }
            if json {
                let v = if train == dir {
                    reports.remove(0).1
                } else {
                    serde_json::Value::Object(reports.into_iter().map(|(n, r)| (n.to_string(), r)).collect())
                };
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (_, r) in &reports {
                    println!(
                        "{}: {} samples, {} classes ({}..{} per class), {} shards, {:.1} MB; index loaded in {:.1} ms, {:.1} MB in memory",
                        r["dir"].as_str().unwrap_or_default(),
                        r["samples"],
                        r["classes"],
                        r["min_per_class"],
                        r["max_per_class"],
                        r["shards"],
                        r["bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
                        r["load_ms"].as_f64().unwrap_or(0.0),
                        r["memory_bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
                    );
                }
            }
        }
        DataCommand::Verify { dir, json } => {
            let (train, val) = shards::packed_splits(&dir)?;
            let mut reports = vec![("train", train.clone(), shards::verify(&train)?)];
            if let Some(v) = val {
                let r = shards::verify(&v)?;
                reports.push(("val", v, r));
            }
            let problems: usize = reports.iter().map(|(_, _, r)| r.problems.len()).sum();
            if json {
                let v = if train == dir {
                    serde_json::to_value(&reports[0].2)?
                } else {
                    serde_json::Value::Object(
                        reports
                            .iter()
                            .map(|(n, _, r)| Ok((n.to_string(), serde_json::to_value(r)?)))
                            .collect::<Result<_>>()?,
                    )
                };
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (_, d, r) in &reports {
                    for p in &r.problems {
                        println!(
                            "{}/{}{}: {}",
                            d.display(),
                            p.shard,
                            p.key.as_ref().map(|k| format!(" {k}")).unwrap_or_default(),
                            p.reason
                        );
                    }
                    println!(
                        "{}: {} shards, {} samples, {} decoded, {} problems",
                        d.display(),
                        r.shards,
                        r.samples,
                        r.decoded,
                        r.problems.len()
                    );
                }
            }
            if problems > 0 {
                bail!("{}: {problems} problems found", dir.display());
            }
        }
        DataCommand::Synth { classes, images, out, seed } => {
            let n = shards::synth(&out, classes, images, seed)?;
            println!("wrote {n} JPEG images of {classes} classes under {}", out.display());
        }
    }
    Ok(())
}

/// One packed directory's counts, per-class counts, and its index's load time and memory.
fn inspect(dir: &Path) -> Result<serde_json::Value> {
    let start = Instant::now();
    let index = ShardIndex::load(dir)?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut per_class = vec![0usize; index.classes.len()];
    for r in index.records() {
        if let Some(c) = per_class.get_mut(r.label as usize) {
            *c += 1;
        }
    }
    let bytes: u64 = index.shards.iter().map(|s| s.bytes).sum();
    Ok(serde_json::json!({
        "dir": dir.display().to_string(),
        "samples": index.num_samples(), "classes": index.classes.len(), "shards": index.shards.len(),
        "bytes": bytes,
        "min_per_class": per_class.iter().min().copied().unwrap_or(0),
        "max_per_class": per_class.iter().max().copied().unwrap_or(0),
        "load_ms": load_ms, "memory_bytes": index.memory_bytes(),
        "per_class": index.classes.iter().zip(&per_class).collect::<Vec<_>>(),
    }))
}
