//! Kubernetes deployment: every manifest under deploy/kubernetes (the base and each overlay) and
//! what `thaw k8s render` prints pass the schemas of the pinned Kubernetes version (strict, offline,
//! through `scripts/k8s-check.py` and kubernetes-validate) and thaw's lint rules; the checker
//! itself rejects what it should; the example job in the base is what thaw renders today.

mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the checker on `paths`.
fn check(paths: &[&Path]) -> Output {
    let py = repo().join(".thaw/k8s-venv/bin/python");
    assert!(py.is_file(), "{} is missing: run scripts/setup.sh", py.display());
    Command::new(py).arg(repo().join("scripts/k8s-check.py")).args(paths).output().expect("run k8s-check.py")
}

fn render(args: &[&str]) -> Output {
    let mut all = vec!["k8s", "render"];
    all.extend_from_slice(args);
    thaw(&all)
}

#[test]
fn every_manifest_and_render_passes_the_schemas_and_the_lint() {
    let k = repo().join("deploy/kubernetes");
    let dir = tempfile::tempdir().unwrap();
    let example = k.join("example-job.toml");
    let example = example.to_str().unwrap();
    let mut paths = vec![k.join("base"), k.join("overlays/cpu"), k.join("overlays/gpu")];
    let renders: [&[&str]; 4] = [
        &[example],
        &[example, "--gpus-per-worker", "1", "--namespace", "ml"],
        &[example, "--gpus-per-worker", "2", "--image", "registry.example.org/thaw:0.1.0-cuda"],
        &[example, "--data-pvc", "d", "--runs-pvc", "r", "--coordinator", "http://c:7070"],
    ];
    for (i, args) in renders.iter().enumerate() {
        let out = ok(render(args));
        let p = dir.path().join(format!("render-{i}.yaml"));
        std::fs::write(&p, &out.stdout).unwrap();
        paths.push(p);
    }
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let o = check(&refs);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "{text}");
    for p in &paths {
        assert!(text.contains(&format!("OK {}", p.display())), "{} not checked:\n{text}", p.display());
    }
    // What the overlays and options change really is in the output.
    assert!(text.contains("OK") && !text.contains("FAIL"), "{text}");
    let gpu2 = std::fs::read_to_string(dir.path().join("render-2.yaml")).unwrap();
    for want in ["nvidia.com/gpu: '2'", "--local-ranks", "completions: 1", "medium: Memory", "values:\n        - 3\n        - 4"] {
        assert!(gpu2.contains(want), "{want:?} missing from:\n{gpu2}");
    }
}

#[test]
fn the_checker_rejects_a_typo_an_unpinned_image_and_a_job_without_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let good = String::from_utf8(ok(render(&[repo().join("deploy/kubernetes/example-job.toml").to_str().unwrap()])).stdout)
        .unwrap();
    let cases = [
        ("typo", good.replace("completionMode: Indexed", "completionMode: Indexed\n  paralelism: 2"), "paralelism"),
        ("latest", good.replace("image: thaw:0.1.0-cpu", "image: thaw:latest"), "has no pinned tag"),
        ("no-deadline", good.replace("  activeDeadlineSeconds: 259200\n", ""), "no spec.activeDeadlineSeconds"),
        ("root", good.replace("runAsNonRoot: true", "runAsNonRoot: false"), "may run as root"),
        ("shm", good.replace("medium: Memory", "medium: ''"), "/dev/shm is not a memory emptyDir"),
    ];
    for (name, text, want) in cases {
        assert_ne!(text, good, "{name}: the mutation applied");
        let p = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&p, text).unwrap();
        let o = check(&[&p]);
        let out = format!("{}{}", stdout(&o), stderr(&o));
        assert!(!o.status.success(), "{name}: accepted:\n{out}");
        assert!(out.contains(want), "{name}: {want:?} not named:\n{out}");
    }
}

#[test]
fn the_example_job_in_the_base_is_what_thaw_renders() {
    let k = repo().join("deploy/kubernetes");
    let o = ok(render(&[
        k.join("example-job.toml").to_str().unwrap(),
        "--data-pvc",
        "thaw-data",
        "--runs-pvc",
        "thaw-runs",
    ]));
    let kept = std::fs::read_to_string(k.join("base/job-example.yaml")).unwrap();
    let kept: String = kept.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    assert_eq!(stdout(&o), kept, "re-render deploy/kubernetes/base/job-example.yaml (its first line says how)");
}

#[test]
fn render_refuses_what_kubernetes_could_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let example = repo().join("deploy/kubernetes/example-job.toml");
    let example = example.to_str().unwrap();
    // 2 workers cannot be split into pods of 3 GPUs.
    let err = fails(render(&[example, "--gpus-per-worker", "3"]));
    assert!(err.contains("distributed.max_workers = 2 is not a multiple of --gpus-per-worker 3"), "{err}");
    let err = fails(render(&[example, "--image", "thaw:latest"]));
    assert!(err.contains("--image \"thaw:latest\": give a pinned tag"), "{err}");
    let err = fails(render(&[example, "--image", "thaw"]));
    assert!(err.contains("pinned tag"), "{err}");
    let text = std::fs::read_to_string(&example).unwrap().replace("name = \"fmnist-example\"", "name = \"___\"");
    let bad = write_spec(dir.path(), "bad", &text);
    let err = fails(render(&[bad.to_str().unwrap()]));
    assert!(err.contains("job name `___` cannot name Kubernetes objects"), "{err}");
}
