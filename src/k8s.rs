//! `thaw k8s render JOB.toml`: a job's worker manifests for Kubernetes, from its spec, the way
//! torchx or the Kubeflow SDK write them, so nobody hand-edits YAML per job.
//!
//! For a job `NAME` (made a DNS-1123 label: `my_job.v2` becomes `my-job-v2`):
//! - a ConfigMap `thaw-NAME-spec` with the resolved spec (`job.toml`), for `thaw submit` from
//!   inside the cluster and for the record;
//! - a headless Service `thaw-NAME` (stable pod names `thaw-NAME-<index>.thaw-NAME`);
//! - an Indexed Job `thaw-NAME` of `distributed.max_workers / gpus-per-worker` pods, each
//!   running `thaw worker`, which waits for the coordinator's name to resolve
//!   (`THAW_CONNECT_TIMEOUT_SECS`) instead of crash-looping. `restartPolicy: Never` with a
//!   `podFailurePolicy`: evictions and preemptions (`DisruptionTarget`) are ignored (the pod is
//!   replaced and rejoins; they do not count against `backoffLimit`), thaw's permanent exit
//!   statuses (3: the job can never run, 4: it ended) fail the Job at once, anything else is
//!   retried up to `backoffLimit` = `distributed.max_restarts`; only the failed index's pod is
//!   replaced. `activeDeadlineSeconds` and `ttlSecondsAfterFinished` bound its life, so a
//!   finished job leaves no pods;
//! - `/dev/shm` as a memory `emptyDir` with a size limit (NCCL's and the ring's shared memory);
//! - with `--gpus-per-worker N`: `nvidia.com/gpu: N` and `--device cuda`; N > 1 runs N ranks in
//!   the pod (`thaw worker --local-ranks N`);
//! - a NetworkPolicy that lets only the job's own pods reach its pods (the ring's ports).
//!
//! The job's credential and the TLS directory come from Secrets when they exist
//! (`thaw-NAME-token`, key `token`; `thaw-worker-tls`), both optional, so the same manifests work
//! with an `--insecure` coordinator on a trusted network.

use anyhow::{bail, Result};
use serde_json::{json, Value};
use thaw_coordinator::spec::JobSpec;

/// What `thaw k8s render` was asked for (its flags).
#[derive(clap::Args, Clone, Debug)]
pub struct RenderOptions {
    /// The image (a pinned tag; default thaw:VERSION-cpu, or -cuda with GPUs).
    #[arg(long)]
    pub image: Option<String>,
    /// GPUs per pod (nvidia.com/gpu); above 1 the pod runs that many ranks.
    #[arg(long, default_value_t = 0)]
    pub gpus_per_worker: u32,
    /// The coordinator's URL as pods reach it.
    #[arg(long, default_value = "https://thaw-coordinator:7070")]
    pub coordinator: String,
    #[arg(long)]
    pub namespace: Option<String>,
    /// A PersistentVolumeClaim mounted read-only at the spec's data.root.
    #[arg(long)]
    pub data_pvc: Option<String>,
    /// A PersistentVolumeClaim mounted at the spec's output.dir (checkpoints, metrics).
    #[arg(long)]
    pub runs_pvc: Option<String>,
    /// /dev/shm's size limit per pod (a memory emptyDir).
    #[arg(long, default_value = "2Gi")]
    pub shm_size: String,
    #[arg(long, default_value = "2")]
    pub cpu: String,
    #[arg(long, default_value = "8Gi")]
    pub memory: String,
    /// The Job's activeDeadlineSeconds, in hours.
    #[arg(long, default_value_t = 72.0)]
    pub deadline_hours: f64,
}

/// `name` as a DNS-1123 label (lowercase alphanumerics and `-`), or an error naming it.
pub fn dns_label(name: &str) -> Result<String> {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let out = out.trim_matches('-').to_string();
    // `thaw-` + name + `-NNN` (a pod's index) must fit in 63.
    if out.is_empty() || out.len() > 50 {
        bail!("job name `{name}` cannot name Kubernetes objects: it needs 1 to 50 letters or digits once made a DNS label (`{out}`)");
    }
    Ok(out)
}

/// The manifests, as a list of Kubernetes objects.
pub fn render(spec: &JobSpec, o: &RenderOptions) -> Result<Vec<Value>> {
    if o.gpus_per_worker > 16 {
        bail!("--gpus-per-worker {}: at most 16", o.gpus_per_worker);
    }
    let variant = if o.gpus_per_worker > 0 { "cuda" } else { "cpu" };
    let image = o.image.clone().unwrap_or_else(|| format!("thaw:{}-{variant}", env!("CARGO_PKG_VERSION")));
    if image.is_empty() || image.ends_with(":latest") || !image.rsplit('/').next().unwrap_or("").contains(':') {
        bail!("--image {image:?}: give a pinned tag (name:version), not latest");
    }
    if !(o.deadline_hours > 0.0 && o.deadline_hours.is_finite()) {
        bail!("--deadline-hours {}: must be positive", o.deadline_hours);
    }
    let per_pod = o.gpus_per_worker.max(1);
    let ranks = spec.distributed.max_workers;
    if ranks % per_pod != 0 {
        bail!(
            "distributed.max_workers = {ranks} is not a multiple of --gpus-per-worker {per_pod}: every pod runs \
             {per_pod} ranks"
        );
    }
    let pods = ranks / per_pod;
    let name = format!("thaw-{}", dns_label(&spec.name)?);
    let labels = json!({
        "app.kubernetes.io/name": "thaw",
        "app.kubernetes.io/component": "worker",
        "thaw.dev/job": spec.name.clone(),
    });
    let meta = |n: &str| {
        let mut m = json!({ "name": n, "labels": labels.clone() });
        if let Some(ns) = &o.namespace {
            m["namespace"] = json!(ns);
        }
        m
    };
    let gpu = o.gpus_per_worker > 0;
    let mut args = vec![
        json!("worker"),
        json!("--job"),
        json!(spec.name.clone()),
        json!("--coordinator"),
        json!(o.coordinator.clone()),
        json!("--bind-host"),
        json!("$(POD_IP)"),
        json!("--device"),
        json!(if gpu { "cuda" } else { "cpu" }),
    ];
    if per_pod > 1 {
        args.push(json!("--local-ranks"));
        args.push(json!(per_pod.to_string()));
    }
    let mut limits = json!({ "cpu": o.cpu.clone(), "memory": o.memory.clone() });
    if gpu {
        limits["nvidia.com/gpu"] = json!(o.gpus_per_worker.to_string());
    }
    // The root filesystem is read-only: THAW_HOME (the weights cache) and /tmp are scratch.
    let mut mounts = vec![
        json!({ "name": "dshm", "mountPath": "/dev/shm" }),
        json!({ "name": "home", "mountPath": "/home/thaw" }),
        json!({ "name": "tmp", "mountPath": "/tmp" }),
        json!({ "name": "tls", "mountPath": "/etc/thaw/tls", "readOnly": true }),
    ];
    let mut volumes = vec![
        json!({ "name": "dshm", "emptyDir": { "medium": "Memory", "sizeLimit": o.shm_size.clone() } }),
        json!({ "name": "home", "emptyDir": {} }),
        json!({ "name": "tmp", "emptyDir": {} }),
        json!({ "name": "tls", "secret": { "secretName": "thaw-worker-tls", "optional": true } }),
    ];
    if let Some(pvc) = &o.data_pvc {
        mounts.push(json!({ "name": "data", "mountPath": spec.data.root.display().to_string(), "readOnly": true }));
        volumes.push(json!({ "name": "data", "persistentVolumeClaim": { "claimName": pvc, "readOnly": true } }));
    }
    if let Some(pvc) = &o.runs_pvc {
        mounts.push(json!({ "name": "runs", "mountPath": spec.output.dir.display().to_string() }));
        volumes.push(json!({ "name": "runs", "persistentVolumeClaim": { "claimName": pvc } }));
    }
    let container = json!({
        "name": "worker",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": [
            { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
            { "name": "THAW_CONNECT_TIMEOUT_SECS", "value": "300" },
            { "name": "THAW_TLS_DIR", "value": "/etc/thaw/tls" },
            { "name": "THAW_JOB_TOKEN", "valueFrom": { "secretKeyRef": {
                "name": format!("{name}-token"), "key": "token", "optional": true } } },
        ],
        "resources": { "requests": limits.clone(), "limits": limits },
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 10001,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        },
    });
    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "subdomain": name.clone(),
        "terminationGracePeriodSeconds": 60,
        "securityContext": { "runAsNonRoot": true, "fsGroup": 10001, "seccompProfile": { "type": "RuntimeDefault" } },
        "containers": [container],
        "volumes": volumes,
    });
    if gpu {
        pod_spec["tolerations"] =
            json!([{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }]);
    }
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(&name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": { "thaw.dev/job": spec.name.clone() },
        },
    });
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta(&name),
        "spec": {
            "completionMode": "Indexed",
            "completions": pods,
            "parallelism": pods,
            "backoffLimit": spec.distributed.max_restarts,
            "activeDeadlineSeconds": (o.deadline_hours * 3600.0).round() as i64,
            "ttlSecondsAfterFinished": 3600,
            "podFailurePolicy": { "rules": [
                { "action": "Ignore", "onPodConditions": [{ "type": "DisruptionTarget" }] },
                { "action": "FailJob", "onExitCodes": {
                    "containerName": "worker", "operator": "In", "values": [3, 4] } },
            ] },
            "template": {
                "metadata": { "labels": labels.clone() },
                "spec": pod_spec,
            },
        },
    });
    let policy = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(&format!("{name}-ring")),
        "spec": {
            "podSelector": { "matchLabels": { "thaw.dev/job": spec.name.clone() } },
            "policyTypes": ["Ingress"],
            "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "thaw.dev/job": spec.name.clone() } } }] }],
        },
    });
    let config = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(&format!("{name}-spec")),
        "data": { "job.toml": spec.to_toml() },
    });
    Ok(vec![config, service, job, policy])
}

/// The objects as one YAML stream (`---` between documents).
pub fn to_yaml(objects: &[Value]) -> Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(o)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_become_dns_labels_or_are_refused() {
        assert_eq!(dns_label("My_Job.v2").unwrap(), "my-job-v2");
        assert_eq!(dns_label("fmnist--head").unwrap(), "fmnist-head");
        assert!(dns_label("___").unwrap_err().to_string().contains("`___`"));
        assert!(dns_label(&"x".repeat(51)).is_err());
    }
}
