//! `thaw plan JOB.toml`: the schedule of a job expanded into its stages against the model, with
//! what trains in each stage, how many parameters, at which learning rates, with which BatchNorm
//! policy. Nothing is trained and no weights are loaded.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use thaw_coordinator::spec::{BnPolicy, JobSpec, Stage};
use thaw_worker::data;
use thaw_worker::zoo::{Arch, Network};

#[derive(Serialize)]
struct PlannedStage {
    stage: usize,
    /// 1-based, inclusive.
    first_epoch: usize,
    last_epoch: usize,
    trainable_groups: Vec<String>,
    trainable_parameters: i64,
    /// Peak learning rate of each trainable group (and of frozen groups' BatchNorm parameters
    /// under `train_affine`).
    lr: Vec<(String, f64)>,
    bn: &'static str,
    lr_schedule: &'static str,
    warmup_steps: usize,
    /// Groups `0..frozen_prefix` are frozen with fixed statistics.
    frozen_prefix: usize,
    /// Whether workers cache the frozen prefix's outputs in this stage (no random flips, cache on).
    caches: bool,
}

#[derive(Serialize)]
struct Plan {
    job: String,
    arch: String,
    strategy: &'static str,
    groups: Vec<String>,
    group_parameters: Vec<i64>,
    stages: Vec<PlannedStage>,
}

fn plan(spec: &JobSpec) -> Result<Plan> {
    let arch = Arch::from_name(&spec.model.arch)?;
    let num_classes = match spec.model.num_classes {
        Some(n) => n,
        None => data::open_splits(&spec.data, spec.seed)?.train.class_names().len() as i64,
    };
    let net = Network::new(arch, num_classes, tch::Device::Cpu);
    let groups = net.group_names();
    let stages = spec.schedule.expand(&groups, &spec.train)?;
    let count = |ts: Vec<(String, tch::Tensor)>| ts.iter().map(|(_, t)| t.numel() as i64).sum::<i64>();
    let group_parameters: Vec<i64> = (0..groups.len()).map(|g| count(net.group_parameters(g))).collect();
    let bn_parameters: Vec<i64> = (0..groups.len()).map(|g| count(net.bn_parameters(g))).collect();
    let planned = |s: &Stage| {
        let affine = s.bn == BnPolicy::TrainAffine;
        let trains = |g: usize| s.trainable[g] || (affine && bn_parameters[g] > 0);
        PlannedStage {
            stage: s.index + 1,
            first_epoch: s.epochs.start + 1,
            last_epoch: s.epochs.end,
            trainable_groups: s.trainable_names(&groups).iter().map(|g| g.to_string()).collect(),
            trainable_parameters: (0..groups.len())
                .map(|g| {
                    if s.trainable[g] {
                        group_parameters[g]
                    } else if affine {
                        bn_parameters[g]
                    } else {
                        0
                    }
                })
                .sum(),
            lr: (0..groups.len()).filter(|&g| trains(g)).map(|g| (groups[g].to_string(), s.group_lr[g])).collect(),
            bn: s.bn.as_str(),
            lr_schedule: s.lr_schedule.as_str(),
            warmup_steps: s.warmup_steps,
            frozen_prefix: s.frozen_prefix(),
            caches: s.caches(&spec.data, spec.train.feature_cache_mb),
        }
    };
    let stages = stages.iter().map(planned).collect();
    Ok(Plan {
        job: spec.name.clone(),
        arch: arch.name().to_string(),
        strategy: spec.schedule.name(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        group_parameters,
        stages,
    })
}

/// Prints the plan of the job spec at `path`.
pub fn print(path: &Path, json: bool) -> Result<()> {
    let spec = crate::resolve_auto(JobSpec::from_file(path)?)?;
    let p = plan(&spec)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let total: i64 = p.group_parameters.iter().sum();
    println!(
        "job {}: {} ({} groups, {total} parameters), strategy {}, {} epochs",
        p.job,
        p.arch,
        p.groups.len(),
        p.strategy,
        spec.train.epochs
    );
    for s in &p.stages {
        let decay = match (s.lr_schedule, s.warmup_steps) {
            ("one_cycle", _) => "one-cycle".to_string(),
            (sched, 0) => sched.to_string(),
            (sched, w) => format!("{sched}, warm-up {w} steps"),
        };
        println!(
            "\nstage {}  epochs {}-{}  bn {}  lr {decay}{}",
            s.stage,
            s.first_epoch,
            s.last_epoch,
            s.bn,
            if s.frozen_prefix > 0 {
                format!("  (groups 1-{} frozen: cacheable)", s.frozen_prefix)
            } else {
                String::new()
            }
        );
        println!("  trains {} ({} parameters)", s.trainable_groups.join(", "), s.trainable_parameters);
        let lrs: Vec<String> = s.lr.iter().map(|(g, lr)| format!("{g} {lr:.3e}")).collect();
        println!("  peak lr: {}", lrs.join(", "));
    }
    Ok(())
}
