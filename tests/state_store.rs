//! The coordinator's state store end to end: a real `thaw coordinator` on a state directory,
//! killed with SIGKILL and started again on the same directory, keeps every job — a waiting one
//! and a running one fail with the restart as their reason, a finished one comes back unchanged,
//! metrics included.

mod common;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn lenet_job(name: &str, out: &Path, limit: usize, epochs: usize) -> String {
    format!(
        "name = \"{name}\"\nseed = 11\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
         train_limit = {limit}\nval_limit = 200\n[train]\nepochs = {epochs}\nbatch_size = 32\nlr = 0.05\n[output]\ndir = \"{}\"\n",
        fashion_mnist().display(),
        out.display()
    )
}

/// A `thaw coordinator` on a free port; killed (SIGKILL) when dropped.
struct Coordinator {
    child: Child,
    url: String,
}

impl Coordinator {
    fn start(state_dir: &Path) -> Coordinator {
        let (child, url) = start_coordinator(state_dir);
        Coordinator { child, url }
    }

    /// SIGKILL: no shutdown path runs, nothing is flushed.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn thaw(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(args)
            .env("THAW_COORDINATOR", &self.url)
            .env("THAW_HOME", thaw_home())
            .env("THAW_OFFLINE", "1")
            .output()
            .unwrap()
    }

    fn status(&self, job: &str) -> Value {
        let out = ok(self.thaw(&["status", job, "--json"]));
        let all: Value = serde_json::from_str(&stdout(&out)).unwrap();
        all.as_array().and_then(|a| a.first()).cloned().unwrap_or_else(|| panic!("no job in {all}"))
    }

    /// Polls `thaw status JOB` until `done` holds; fails after `secs`.
    fn wait_for(&self, job: &str, secs: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status(job);
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{job}: {what} did not happen in {secs}s: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn worker(&self, job: &str) -> Child {
        Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(["worker", "--job", job, "--worker-id", &format!("{job}-w"), "--coordinator", &self.url])
            .env("THAW_HOME", thaw_home())
            .env("THAW_OFFLINE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state(j: &Value) -> &str {
    j["state"].as_str().unwrap()
}

fn path(j: &Value) -> Vec<&str> {
    j["transitions"].as_array().unwrap().iter().map(|t| t["to"].as_str().unwrap()).collect()
}

fn last_reason(j: &Value) -> &str {
    j["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap()
}

#[test]
fn a_restarted_coordinator_still_knows_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let c = Coordinator::start(&state_dir);

    // A second coordinator on the same directory is refused.
    let o = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state_dir)
        .output()
        .unwrap();
    let err = fails(o);
    assert!(err.contains("in use by another coordinator"), "{err}");

    // 1. A job still forming its group.
    let spec = write_spec(dir.path(), "waiting", &lenet_job("waiting", &dir.path().join("w"), 256, 1));
    assert_eq!(stdout(&ok(c.thaw(&["submit", spec.to_str().unwrap()]))).trim(), "waiting");
    let before = c.status("waiting");
    assert_eq!((state(&before), path(&before)), ("rendezvous", vec!["pending", "rendezvous"]));

    // 2. A job run to completion by one worker.
    let spec = write_spec(dir.path(), "finished", &lenet_job("finished", &dir.path().join("f"), 256, 1));
    ok(c.thaw(&["submit", spec.to_str().unwrap()]));
    let status = c.worker("finished").wait_with_output().unwrap().status;
    assert!(status.success(), "the worker of `finished` failed");
    let finished = c.status("finished");
    assert_eq!(path(&finished), ["pending", "rendezvous", "running", "succeeded"]);
    assert_eq!(finished["metrics"].as_array().unwrap().len(), 1, "{finished:#}");
    assert_eq!(finished["progress"]["samples_done"], 256, "{finished:#}");

    // 3. A job killed in the middle of its training, after its first epoch's metrics.
    let spec = write_spec(dir.path(), "running", &lenet_job("running", &dir.path().join("r"), 512, 100));
    ok(c.thaw(&["submit", spec.to_str().unwrap()]));
    let mut worker = c.worker("running");
    let running = c.wait_for("running", 120, "a first epoch", |j| {
        assert_ne!(state(j), "failed", "{j:#}");
        !j["metrics"].as_array().unwrap().is_empty()
    });
    assert_eq!(state(&running), "running");

    c.kill();
    let c = Coordinator::start(&state_dir);

    let after = c.status("waiting");
    assert_eq!(state(&after), "failed");
    assert_eq!(path(&after), ["pending", "rendezvous", "failed"]);
    assert_eq!(
        last_reason(&after),
        "coordinator restarted while the job was rendezvous; resubmit or resume from its checkpoint"
    );
    assert_eq!(after["transitions"][1], before["transitions"][1], "the history is kept as it was");

    assert_eq!(c.status("finished"), finished, "a finished job comes back unchanged, metrics and all");

    let after = c.status("running");
    assert_eq!(path(&after), ["pending", "rendezvous", "running", "failed"]);
    assert!(last_reason(&after).starts_with("coordinator restarted while the job was running"), "{after:#}");
    let metrics = after["metrics"].as_array().unwrap();
    assert!(!metrics.is_empty(), "{after:#}");
    assert_eq!(metrics[0], running["metrics"][0], "the stored epoch metrics are the reported ones");
    assert_eq!(after["progress"]["workers"], 1);
    assert!(after["progress"]["samples_done"].as_u64().unwrap() > 0, "the progress is kept: {after:#}");

    // The orphaned worker points at the dead coordinator's port; it must not outlive the test.
    let _ = worker.kill();
    let _ = worker.wait();

    // A failed job's name can be used again.
    ok(c.thaw(&["submit", spec.to_str().unwrap()]));
    assert_eq!(state(&c.status("running")), "rendezvous");
    ok(c.thaw(&["cancel", "running"]));
    let listed = stdout(&ok(c.thaw(&["status", "--json"])));
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["finished", "running", "waiting"]);
    assert!(state_dir.join("jobs/finished.json").is_file());
}
