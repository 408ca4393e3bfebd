//! The coordinator's view of its jobs in Prometheus text format (`/metrics`), encoded at each
//! scrape from a snapshot of the core (no metric is kept twice), with `prometheus-client`.
//!
//! Names follow Prometheus's rules: base units (`_seconds`), `_total` for counters, and
//! low-cardinality labels: `job` (a job's id), `rank`, `state`, `to`, `group` (a layer group),
//! never a sample, worker process or step. Per-rank figures are the workers' own (cumulative
//! since the worker process started; they arrive with heartbeats), so rates come out of
//! `rate()`: step time is `rate(thaw_rank_step_seconds_total) / rate(thaw_rank_steps_total)`,
//! and a job is communication-bound when `thaw_rank_allreduce_exposed_seconds_total` grows
//! like `thaw_rank_step_seconds_total`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::core::JobView;
use crate::job::JobState;
use crate::telemetry::RankView;

/// A job as a scrape sees it: its view, its layer groups, its ranks' telemetry.
pub type Observed = (JobView, Vec<String>, Vec<RankView>);

/// Encodes the snapshot `observe` returns at each scrape.
pub struct JobsCollector {
    observe: Box<dyn Fn() -> Vec<Observed> + Send + Sync>,
}

impl std::fmt::Debug for JobsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobsCollector")
    }
}

impl JobsCollector {
    pub fn new(observe: impl Fn() -> Vec<Observed> + Send + Sync + 'static) -> JobsCollector {
        JobsCollector { observe: Box::new(observe) }
    }
}

const STATES: [JobState; 7] = JobState::ALL;

type Labels = Vec<(&'static str, String)>;

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, rows: &[(Labels, f64)]) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for JobsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let jobs = (self.observe)();
        let by_state: Vec<(Labels, f64)> = STATES
            .iter()
            .map(|s| {
                let n = jobs.iter().filter(|(v, _, _)| v.record.state() == *s).count();
                (vec![("state", s.as_str().to_string())], n as f64)
            })
            .collect();
        gauge(&mut enc, "thaw_jobs", "Jobs the coordinator holds, by state.", &by_state)?;

        let job = |v: &JobView| vec![("job", v.record.job_id().to_string())];
        let mut transitions = Vec::new();
        let mut rendezvous = Vec::new();
        let mut recoveries = Vec::new();
        for (v, _, _) in &jobs {
            for s in STATES {
                let n = v.record.history().iter().filter(|t| t.to == s).count();
                if n > 0 {
                    let mut l = job(v);
                    l.push(("to", s.as_str().to_string()));
                    transitions.push((l, n as f64));
                }
            }
            // The last rendezvous: from entering it to the group running.
            let h = v.record.history();
            if let Some(start) = h.iter().rposition(|t| t.to == JobState::Rendezvous) {
                if let Some(end) = h[start..].iter().find(|t| t.to == JobState::Running) {
                    rendezvous.push((job(v), end.at_ms.saturating_sub(h[start].at_ms) as f64 / 1e3));
                }
            }
            let n = h.iter().filter(|t| t.to == JobState::Recovering).count();
            recoveries.push((job(v), n as f64));
        }
        counter(&mut enc, "thaw_job_state_transitions", "State changes of each job, by the state entered.", &transitions)?;
        gauge(
            &mut enc,
            "thaw_job_rendezvous_duration_seconds",
            "How long the job's last rendezvous took, from opening to the group running.",
            &rendezvous,
        )?;
        counter(&mut enc, "thaw_job_recoveries", "Times the job's group re-formed after losing a member.", &recoveries)?;
        let each = |f: &dyn Fn(&JobView) -> f64| jobs.iter().map(|(v, _, _)| (job(v), f(v))).collect::<Vec<_>>();
        counter(
            &mut enc,
            "thaw_job_restarts",
            "Failures counted against the job's restart budget (distributed.max_restarts).",
            &each(&|v| v.restarts as f64),
        )?;
        gauge(&mut enc, "thaw_job_generation", "The job's group generation (1 for the first group).", &each(&|v| v.generation as f64))?;
        gauge(&mut enc, "thaw_job_workers", "Workers in the job's group.", &each(&|v| v.workers as f64))?;
        gauge(&mut enc, "thaw_job_epoch", "The epoch in progress (0-based).", &each(&|v| v.record.progress().epoch as f64))?;
        gauge(&mut enc, "thaw_job_step", "Steps done in the epoch in progress.", &each(&|v| v.record.progress().step as f64))?;
        let last = |f: &dyn Fn(&crate::metrics::EpochMetrics) -> f64| {
            jobs.iter().filter_map(|(v, _, _)| v.metrics.last().map(|m| (job(v), f(m)))).collect::<Vec<_>>()
        };
        gauge(&mut enc, "thaw_job_train_loss", "Training loss of the last finished epoch.", &last(&|m| m.train_loss))?;
        gauge(&mut enc, "thaw_job_validation_loss", "Validation loss of the last finished epoch.", &last(&|m| m.val_loss))?;
        gauge(
            &mut enc,
            "thaw_job_validation_accuracy_ratio",
            "Validation accuracy of the last finished epoch.",
            &last(&|m| m.val_acc),
        )?;

        // Per rank, from the workers' heartbeats.
        let ranks: Vec<(Labels, &RankView)> = jobs
            .iter()
            .flat_map(|(v, _, rs)| {
                rs.iter().map(move |r| (vec![("job", v.record.job_id().to_string()), ("rank", r.rank.to_string())], r))
            })
            .collect();
        let per = |f: &dyn Fn(&RankView) -> f64| ranks.iter().map(|(l, r)| (l.clone(), f(r))).collect::<Vec<_>>();
        counter(&mut enc, "thaw_rank_steps", "Training steps the rank finished.", &per(&|r| r.telemetry.steps as f64))?;
        counter(&mut enc, "thaw_rank_step_seconds", "Wall time of those steps.", &per(&|r| r.telemetry.step_seconds))?;
        counter(
            &mut enc,
            "thaw_rank_data_wait_seconds",
            "Time the rank waited for its next batch.",
            &per(&|r| r.telemetry.data_wait_seconds),
        )?;
        counter(
            &mut enc,
            "thaw_rank_allreduce_seconds",
            "Time the collective spent on the rank's gradient all-reduces (overlapped or not).",
            &per(&|r| r.telemetry.allreduce_seconds),
        )?;
        counter(
            &mut enc,
            "thaw_rank_allreduce_exposed_seconds",
            "Time the rank's training thread waited for its all-reduces (what overlap did not hide).",
            &per(&|r| r.telemetry.allreduce_exposed_seconds),
        )?;
        counter(&mut enc, "thaw_rank_samples", "Samples the rank trained on.", &per(&|r| r.telemetry.samples as f64))?;
        counter(
            &mut enc,
            "thaw_rank_skipped_samples",
            "Samples the rank could not read or decode.",
            &per(&|r| r.telemetry.skipped as f64),
        )?;
        gauge(
            &mut enc,
            "thaw_rank_samples_per_second",
            "The rank's samples per second of step time, since it started.",
            &per(&|r| r.telemetry.samples as f64 / r.telemetry.step_seconds.max(1e-9)),
        )?;
        // The training state, from rank 0 (every rank sees the same reduced loss).
        let rank0: Vec<(&JobView, &Vec<String>, &RankView)> = jobs
            .iter()
            .filter_map(|(v, g, rs)| rs.iter().find(|r| r.rank == 0).map(|r| (v, g, r)))
            .collect();
        let loss: Vec<(Labels, f64)> = rank0.iter().map(|(v, _, r)| (job(v), r.telemetry.loss)).collect();
        gauge(&mut enc, "thaw_job_loss", "Mean training loss of the job's last step.", &loss)?;
        let stage: Vec<(Labels, f64)> = rank0.iter().map(|(v, _, r)| (job(v), r.telemetry.stage as f64)).collect();
        gauge(&mut enc, "thaw_job_stage", "The freeze-schedule stage in force (1-based).", &stage)?;
        let lrs: Vec<(Labels, f64)> = rank0
            .iter()
            .flat_map(|(v, groups, r)| {
                r.telemetry.group_lr.iter().enumerate().map(move |(i, lr)| {
                    let group = groups.get(i).cloned().unwrap_or_else(|| i.to_string());
                    (vec![("job", v.record.job_id().to_string()), ("group", group)], *lr)
                })
            })
            .collect();
        gauge(&mut enc, "thaw_job_learning_rate", "Learning rate of each layer group at the last step.", &lrs)?;
        Ok(())
    }
}
