//! The attack table, against a real `thaw coordinator --tokens FILE` and real workers: each
//! attack gets its status code or refusal, and nothing changes.

mod common;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use thaw_proto::v1 as pb;

const OPERATOR: &str = "op-3f9a1c7e5b2d4a60";
const READER: &str = "rd-8e2b6d4f0a1c3e57";

/// `thaw ARGS` against `url` with `token` (or none) in the environment.
fn thaw_as(url: &str, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
    cmd.args(args).env("THAW_COORDINATOR", url).env("THAW_HOME", thaw_home()).env("THAW_OFFLINE", "1");
    cmd.env_remove("THAW_TOKEN").env_remove("THAW_TOKEN_FILE").env_remove("THAW_JOB_TOKEN");
    if let Some(t) = token {
        cmd.env("THAW_TOKEN", t);
    }
    cmd.output().unwrap()
}

struct Coord(Child, String);

impl Drop for Coord {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path) -> Coord {
    use std::io::BufRead;
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("# who may call\noperator {OPERATOR} ops\nreader {READER} dash\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--store", "memory", "--tokens"])
        .arg(&tokens)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    Coord(child, url)
}

fn state_of(url: &str, job: &str) -> Value {
    let o = thaw_as(url, Some(READER), &["status", job, "--json"]);
    serde_json::from_slice::<Value>(&o.stdout).unwrap()[0].clone()
}

#[test]
fn every_attack_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let spec = write_spec(
        dir.path(),
        "sec",
        &format!(
            "name = \"sec\"\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
             train_limit = 512\nval_limit = 64\n[output]\ndir = \"{}\"\n",
            fashion_mnist().display(),
            dir.path().join("out").display()
        ),
    );
    let spec = spec.to_str().unwrap();

    // Submit: no token, a wrong one, a reader's. Nothing is created.
    for (token, expect) in [
        (None, "a bearer token is required"),
        (Some("not-a-token-at-all-0000"), "unknown token"),
        (Some(READER), "token `dash` is a reader token; this call needs operator"),
    ] {
        let err = fails(thaw_as(&c.1, token, &["submit", spec]));
        assert!(err.contains(expect), "submit with {token:?}: {err}");
    }
    let list = stdout(&ok(thaw_as(&c.1, Some(READER), &["status", "--json"])));
    assert_eq!(list.trim(), "[]", "no job was created");
    // Status without a token is refused too.
    assert!(fails(thaw_as(&c.1, None, &["status"])).contains("a bearer token is required"));

    // The operator submits; the job's worker credential comes back to it alone.
    let o = ok(thaw_as(&c.1, Some(OPERATOR), &["submit", spec]));
    let credential = stderr(&o).rsplit(' ').next().unwrap().trim().to_string();
    assert_eq!(credential.len(), 64, "{}", stderr(&o));
    let before = state_of(&c.1, "sec");

    // Cancel as nobody or as a reader: refused, the job unchanged.
    assert!(fails(thaw_as(&c.1, None, &["cancel", "sec"])).contains("bearer token"));
    assert!(fails(thaw_as(&c.1, Some(READER), &["cancel", "sec"])).contains("needs operator"));
    assert!(fails(thaw_as(&c.1, Some(READER), &["delete", "sec"])).contains("needs operator"));
    assert_eq!(state_of(&c.1, "sec"), before);

    // Join without the job's credential, or with another job's: refused before anything is read.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let join = |token: Option<&str>| {
        rt.block_on(async {
            let mut w = pb::workers_client::WorkersClient::connect(c.1.clone()).await.unwrap();
            let mut req = tonic::Request::new(pb::JoinRequest {
                job_id: "sec".into(),
                worker_id: "rogue".into(),
                collective_addr: "127.0.0.1:9".into(),
                num_train_samples: 512,
                ..Default::default()
            });
            if let Some(t) = token {
                req.metadata_mut().insert("thaw-job-token", t.parse().unwrap());
            }
            tokio::time::timeout(Duration::from_secs(5), w.join(req)).await.map(|r| r.map(|_| ()))
        })
    };
    for t in [None, Some("0".repeat(64).as_str())] {
        match join(t) {
            Ok(Err(s)) => assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}"),
            other => panic!("a join with {t:?} was not refused: {other:?}"),
        }
    }
    // Leave and progress as a non-member: refused, the job unchanged.
    let (leave, progress) = rt.block_on(async {
        let mut w = pb::workers_client::WorkersClient::connect(c.1.clone()).await.unwrap();
        let leave = w
            .leave(pb::LeaveRequest {
                job_id: "sec".into(),
                worker_id: "local-0".into(),
                succeeded: true,
                ..Default::default()
            })
            .await;
        let progress = w
            .report_progress(pb::ProgressReport {
                job_id: "sec".into(),
                worker_id: "local-0".into(),
                ..Default::default()
            })
            .await;
        (leave, progress)
    });
    assert!(leave.is_err() && progress.is_err(), "{leave:?} {progress:?}");
    assert_eq!(state_of(&c.1, "sec"), before);

    // The real worker, with the credential, joins and trains the job to the end.
    let status = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["worker", "--job", "sec", "--coordinator", &c.1])
        .env("THAW_HOME", thaw_home())
        .env("THAW_OFFLINE", "1")
        .env("THAW_JOB_TOKEN", &credential)
        .env_remove("THAW_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(&c.1, "sec")["state"] != "succeeded" {
        assert!(Instant::now() < deadline, "{}", state_of(&c.1, "sec"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_exposed_coordinator_without_tokens_refuses_to_start() {
    let err = fails(thaw(&["coordinator", "--listen", "0.0.0.0:0", "--store", "memory"]));
    assert!(
        err.contains("refusing to listen on 0.0.0.0") && err.contains("--tokens FILE") && err.contains("--insecure"),
        "{err}"
    );
    // With --insecure it starts, and says it is insecure.
    let mut c = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["coordinator", "--listen", "0.0.0.0:0", "--store", "memory", "--insecure"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.take().unwrap()), &mut line).unwrap();
    assert!(line.contains("coordinator listening on http://0.0.0.0:"), "{line}");
    let _ = c.kill();
    let _ = c.wait();
    // A tokens file that does not parse is named.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t"), "admin 0123456789abcdefgh\n").unwrap();
    let err = fails(thaw(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--store",
        "memory",
        "--tokens",
        dir.path().join("t").to_str().unwrap(),
    ]));
    assert!(err.contains(":1: role `admin` is not `reader` or `operator`"), "{err}");
}
