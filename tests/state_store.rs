//! The coordinator's state store end to end: a real `thaw coordinator` on a state directory,
//! killed with SIGKILL mid-epoch and started again on the same directory and port, keeps every
//! job — a finished one comes back unchanged, metrics included; a waiting one waits on; a running
//! one carries on (its two workers train through the outage) and finishes, every sample of every
//! epoch trained exactly once.

mod common;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn lenet_job(name: &str, out: &Path, limit: usize, epochs: usize) -> String {
    lenet_job_on(name, out, limit, epochs, 1)
}

fn lenet_job_on(name: &str, out: &Path, limit: usize, epochs: usize, workers: u32) -> String {
    format!(
        "name = \"{name}\"\nseed = 11\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
         train_limit = {limit}\nval_limit = 200\n[train]\nepochs = {epochs}\nbatch_size = 16\nlr = 0.05\n[output]\ndir = \"{}\"\n\
         [distributed]\nworkers = {workers}\n",
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

    /// Starts again on the same state directory and the same port.
    fn restart(state_dir: &Path, url: &str) -> Coordinator {
        let (child, url) = start_coordinator_on(state_dir, url.trim_start_matches("http://"));
        Coordinator { child, url }
    }

    /// SIGKILL: no shutdown path runs, nothing is flushed.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn thaw(&self, args: &[&str]) -> std::process::Output {
        thaw_url(args, &self.url)
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
        self.worker_with_ledger(job, None)
    }

    fn worker_with_ledger(&self, job: &str, ledger: Option<&Path>) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
        if let Some(dir) = ledger {
            cmd.env("THAW_LEDGER_DIR", dir);
        }
        cmd.args(["worker", "--job", job, "--worker-id", &format!("{job}-w"), "--coordinator", &self.url])
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

#[test]
fn a_coordinator_killed_mid_epoch_and_restarted_carries_on_with_every_job() {
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
    // Its rendezvous waits an hour: however slow this machine, it is still forming at the end.
    let waiting = lenet_job("waiting", &dir.path().join("w"), 256, 1) + "join_timeout_secs = 3600\n";
    let spec = write_spec(dir.path(), "waiting", &waiting);
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

    // 3. A job of two workers, in the middle of its training when the coordinator is killed.
    let ledger = dir.path().join("ledger");
    let n = 12000u64;
    let spec = write_spec(dir.path(), "running", &lenet_job_on("running", &dir.path().join("r"), n as usize, 2, 2));
    ok(c.thaw(&["submit", spec.to_str().unwrap()]));
    let mut workers = [c.worker_with_ledger("running", Some(&ledger)), c.worker_with_ledger("running", Some(&ledger))];
    let running = c.wait_for("running", 120, "step 40", |j| {
        assert_ne!(state(j), "failed", "{j:#}");
        j["progress"]["step"].as_u64() >= Some(40)
    });
    assert_eq!(state(&running), "running");

    let url = c.url.clone();
    c.kill();
    // The workers train on through the outage, on the ring they hold.
    std::thread::sleep(Duration::from_secs(2));
    let c = Coordinator::restart(&state_dir, &url);

    let after = c.status("waiting");
    assert_eq!(path(&after), ["pending", "rendezvous"], "a waiting job waits on: {after:#}");
    assert_eq!(after["transitions"][1], before["transitions"][1], "the history is kept as it was");
    assert_eq!(c.status("finished"), finished, "a finished job comes back unchanged, metrics and all");

    for w in &mut workers {
        assert!(w.wait().unwrap().success(), "a worker of `running` failed");
    }
    let done = c.status("running");
    assert_eq!(path(&done), ["pending", "rendezvous", "running", "succeeded"], "{done:#}");
    assert_eq!(done["progress"]["generation"], 1, "no re-form was needed: {done:#}");
    assert_eq!(done["metrics"].as_array().unwrap().len(), 2, "both epochs' metrics reached a coordinator: {done:#}");
    // Every sample of every epoch trained exactly once, by the ledger.
    let (counts, _) = tally(&[(read_ledger(&ledger), None)]);
    assert_exactly_once(&counts, n, 2);

    // A finished job's name can be used again.
    ok(c.thaw(&["submit", spec.to_str().unwrap()]));
    assert_eq!(state(&c.status("running")), "rendezvous");
    ok(c.thaw(&["cancel", "running"]));
    ok(c.thaw(&["cancel", "waiting"]));
    let listed = stdout(&ok(c.thaw(&["status", "--json"])));
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["finished", "running", "waiting"]);
    assert!(state_dir.join("jobs/finished.json").is_file());

    // Paging: one page of 2, and the command for the next.
    let o = ok(c.thaw(&["status", "--json", "--limit", "2"]));
    let page: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(page.as_array().unwrap().len(), 2);
    assert!(stderr(&o).contains("--after running"), "{}", stderr(&o));
    let o = ok(c.thaw(&["status", "--json", "--after", "running"]));
    assert_eq!(serde_json::from_str::<Value>(&stdout(&o)).unwrap()[0]["id"], "waiting");
    // A finished job is deleted, record and all; a live one is refused.
    ok(c.thaw(&["delete", "finished"]));
    assert!(!state_dir.join("jobs/finished.json").exists());
    let err = fails(c.thaw(&["status", "finished"]));
    assert!(err.contains("finished"), "{err}");
}
