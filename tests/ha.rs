//! The highly available coordinator, with real processes on 127.0.0.1: a 3-member etcd 3.4 cluster
//! (set-up's binary, started and stopped here), two `thaw coordinator --store etcd://...` and two
//! workers. Killing the active coordinator mid-epoch hands the job to the standby, which carries
//! it to the end, every sample trained exactly once; a leader paused past its lease is replaced,
//! and when it wakes it writes nothing, steps down and says so.

mod common;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A `thaw coordinator` on etcd, its URL and its log file; killed on drop.
struct Coord {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Coord {
    fn start(etcd: &Etcd, dir: &Path, name: &str) -> Coord {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args([
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--store",
                &etcd.url(),
                "--prefix",
                "/ha",
                "--lease-secs",
                "3",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "{line:?}");
        Coord { child, url, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn thaw_at(url: &str, args: &[&str]) -> std::process::Output {
    thaw_url(args, url)
}

/// Whether the coordinator at `url` itself answers as the leader (a standby, or a leader whose
/// lease ran out, answers UNAVAILABLE; nothing is followed here).
fn leads(url: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let call = async {
            let mut c = thaw_proto::v1::jobs_client::JobsClient::connect(url.to_string()).await.ok()?;
            Some(c.get(thaw_proto::v1::GetJobRequest { job_id: String::new() }).await)
        };
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Some(Ok(_))) => true,
            Ok(Some(Err(s))) => s.code() != tonic::Code::Unavailable,
            _ => false,
        }
    })
}

/// Waits until exactly one of `coords` leads; returns its index.
fn leader(coords: &[&Coord], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let leading: Vec<usize> = (0..coords.len()).filter(|&i| leads(&coords[i].url)).collect();
        if leading.len() == 1 {
            return leading[0];
        }
        assert!(Instant::now() < deadline, "no single leader: {leading:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status(urls: &str, job: &str) -> Value {
    let o = thaw_at(urls, &["status", job, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v.as_array().and_then(|a| a.first()).cloned().unwrap_or(Value::Null)
}

/// A 2-worker LeNet-5 job of `n` samples x `epochs`, submitted through `urls`, its workers
/// started with the same list; returns them once the job is at step 40 of its first epoch.
fn start_job(dir: &Path, urls: &str, n: u64, epochs: u64, logs: &dyn Fn() -> String) -> Vec<Child> {
    let spec = write_spec(
        dir,
        "ha",
        &format!(
            "name = \"ha\"\nseed = 3\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
             train_limit = {n}\nval_limit = 200\n[train]\nepochs = {epochs}\nbatch_size = 16\nlr = 0.05\n[output]\ndir = \"{}\"\n\
             [distributed]\nworkers = 2\n",
            fashion_mnist().display(),
            dir.join("out").display()
        ),
    );
    let o = thaw_at(urls, &["submit", spec.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let workers: Vec<Child> = (0..2)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_thaw"))
                .args(["worker", "--job", "ha", "--worker-id", &format!("w{i}"), "--coordinator", urls])
                .env("THAW_HOME", thaw_home())
                .env("THAW_OFFLINE", "1")
                .env("THAW_LEDGER_DIR", dir.join("ledger"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("w{i}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(urls, "ha");
        if s["state"] == "running" && s["progress"]["step"].as_u64() >= Some(40) {
            return workers;
        }
        assert!(Instant::now() < deadline, "the job never got going: {s}\n{}\n{}", worker_logs(dir), logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of both workers' logs.
fn worker_logs(dir: &Path) -> String {
    let tail =
        |s: String| s.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    (0..2)
        .map(|i| tail(std::fs::read_to_string(dir.join(format!("w{i}.log"))).unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Waits for both workers to succeed and checks, by the ledger, that every one of the `n`
/// samples of each epoch was trained exactly once.
fn finish_exactly_once(dir: &Path, workers: &mut [Child], n: u64, epochs: u64, logs: &dyn Fn() -> String) {
    for w in workers.iter_mut() {
        assert!(w.wait().unwrap().success(), "a worker failed:\n{}\ncoordinators:\n{}", worker_logs(dir), logs());
    }
    let (counts, _) = tally(&[(read_ledger(&dir.join("ledger")), None)]);
    assert_exactly_once(&counts, n, epochs);
}

fn assert_succeeded(url: &str, epochs: usize) {
    let done = status(url, "ha");
    assert_eq!(done["state"], "succeeded", "{done}");
    let path: Vec<&str> = done["transitions"].as_array().unwrap().iter().map(|t| t["to"].as_str().unwrap()).collect();
    assert!(!path.contains(&"failed"), "{path:?}");
    assert_eq!(done["metrics"].as_array().map(Vec::len), Some(epochs), "every epoch's metrics: {done}");
}

#[test]
fn killing_the_active_coordinator_hands_the_running_job_to_the_standby() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"), 3);
    let (mut a, mut b) = (Coord::start(&etcd, dir.path(), "a"), Coord::start(&etcd, dir.path(), "b"));
    let first = leader(&[&a, &b], Duration::from_secs(30));
    let urls = format!("{},{}", a.url, b.url);

    // A standby answers UNAVAILABLE and names the leader; the CLI follows it.
    let standby = if first == 0 { &b } else { &a };
    assert!(!leads(&standby.url));
    let o = thaw_at(&standby.url, &["status", "--json"]);
    assert!(o.status.success(), "the CLI follows the standby to the leader: {}", stderr(&o));

    let n = 12000u64;
    let logs = || String::new();
    let mut workers = start_job(dir.path(), &urls, n, 2, &logs);

    // kill -9 the leader mid-epoch: the standby takes over within about the lease.
    let killed_at = Instant::now();
    let survivor_url = if first == 0 { b.url.clone() } else { a.url.clone() };
    if first == 0 {
        a.child.kill().unwrap()
    } else {
        b.child.kill().unwrap()
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !leads(&survivor_url) {
        assert!(Instant::now() < deadline, "the standby never took over");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("failover: the standby serves {:?} after the kill", killed_at.elapsed());
    finish_exactly_once(dir.path(), &mut workers, n, 2, &|| format!("{}\n---\n{}", a.log(), b.log()));
    assert_succeeded(&survivor_url, 2);
}

#[test]
fn losing_etcd_quorum_pauses_the_coordinator_not_the_training() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&dir.path().join("etcd"), 3);
    let c = Coord::start(&etcd, dir.path(), "c");
    leader(&[&c], Duration::from_secs(30));
    // One epoch long enough that the outage below falls inside it.
    let n = 40000u64;
    let mut workers = start_job(dir.path(), &c.url, n, 1, &|| c.log());
    let lines = || -> usize {
        std::fs::read_dir(dir.path().join("ledger"))
            .unwrap()
            .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap().lines().count())
            .sum()
    };
    // Two of three members gone: no quorum. The coordinator's lease cannot be renewed; it
    // stops answering (UNAVAILABLE) within its lease, and says why.
    etcd.kill_member(1);
    etcd.kill_member(2);
    let deadline = Instant::now() + Duration::from_secs(15);
    while leads(&c.url) {
        assert!(Instant::now() < deadline, "the coordinator kept answering without etcd");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = thaw_at(&c.url, &["status", "ha", "--json"]);
    assert!(!o.status.success());
    // The workers train on meanwhile, on the plan of their epoch, for longer than the heartbeat
    // deadline (10 s): when the coordinator serves again, no worker is late for it.
    let before = lines();
    std::thread::sleep(Duration::from_secs(12));
    assert!(lines() > before, "training stopped with the coordinator");
    // etcd back: the coordinator leads again (the same lease, or a new election) and the job
    // finishes, every sample once.
    etcd.start_member(1);
    etcd.start_member(2);
    leader(&[&c], Duration::from_secs(60));
    finish_exactly_once(dir.path(), &mut workers, n, 1, &|| c.log());
    assert_succeeded(&c.url, 1);
}

#[test]
fn a_leader_paused_past_its_lease_is_replaced_and_steps_down_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&dir.path().join("etcd"), 3);
    let (a, b) = (Coord::start(&etcd, dir.path(), "a"), Coord::start(&etcd, dir.path(), "b"));
    let coords = [&a, &b];
    let first = leader(&coords, Duration::from_secs(30));
    let (old, new) = (coords[first], coords[1 - first]);
    // A job for the new leader to carry: written by the old one before its pause.
    let spec = write_spec(dir.path(), "j", &format!(
        "name = \"j\"\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n[output]\ndir = \"{}\"\n",
        fashion_mnist().display(),
        dir.path().join("j").display()
    ));
    assert!(thaw_at(&old.url, &["submit", spec.to_str().unwrap()]).status.success());

    assert!(Command::new("kill").args(["-STOP", &old.child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !leads(&new.url) {
        assert!(Instant::now() < deadline, "the standby never took over from the paused leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(&new.url, "j")["state"], "rendezvous", "the new leader has the job");
    assert!(Command::new("kill").args(["-CONT", &old.child.id().to_string()]).status().unwrap().success());
    // Awake, the old leader knows its lease ran out: it answers as a standby pointing at the new
    // one, never as the leader, and says in its log that it stepped down.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(!leads(&old.url), "the old leader answered as the leader after its lease ran out");
        let log = old.log();
        if log.contains("stepping down") {
            break;
        }
        assert!(Instant::now() < deadline, "the old leader never said it stepped down:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!old.log().contains("write fenced off"), "it never tried to write: its own clock stopped it first");
    let o = thaw_at(&old.url, &["status", "j", "--json"]);
    assert!(o.status.success(), "the CLI is sent on to the new leader: {}\n{}", stderr(&o), old.log());
    assert_eq!(leader(&coords, Duration::from_secs(5)), 1 - first);

    // One etcd member of three lost: the leader goes on (a log line at most).
    etcd.kill_member(0);
    let o = thaw_at(&new.url, &["cancel", "j"]);
    assert!(o.status.success(), "a write with 2 of 3 etcd members: {}", stderr(&o));
    assert_eq!(status(&new.url, "j")["state"], "cancelled");
}
