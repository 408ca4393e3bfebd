//! The attack table, against a real `thaw coordinator --tls DIR --tokens FILE` (certificates from
//! `thaw certs init`) and real workers: each attack gets its status code or refusal, and nothing
//! changes.

mod common;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use thaw_coordinator::client::{Coordinators, Credentials};
use thaw_coordinator::tls::{Authority, ClientTls};
use thaw_proto::v1 as pb;

const OPERATOR: &str = "op-3f9a1c7e5b2d4a60";
const READER: &str = "rd-8e2b6d4f0a1c3e57";

/// `thaw ARGS` against `c` with its client certificate and `token` (or none) in the environment.
fn thaw_as(c: &Coord, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
    cmd.args(args).env("THAW_COORDINATOR", &c.1).env("THAW_HOME", thaw_home()).env("THAW_OFFLINE", "1");
    cmd.env_remove("THAW_TOKEN").env_remove("THAW_TOKEN_FILE").env_remove("THAW_JOB_TOKEN");
    cmd.env("THAW_TLS_DIR", c.2.join("client"));
    if let Some(t) = token {
        cmd.env("THAW_TOKEN", t);
    }
    cmd.output().unwrap()
}

/// A coordinator process, its URL and its certificates' directory.
struct Coord(Child, String, std::path::PathBuf);

impl Drop for Coord {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const EXPIRED: &str = "op-0ld0ld0ld0ld0ld0";

fn start(dir: &std::path::Path) -> Coord {
    start_with(dir, &[])
}

fn start_with(dir: &std::path::Path, extra: &[&str]) -> Coord {
    use std::io::BufRead;
    let certs = dir.join("certs");
    ok(thaw(&["certs", "init", certs.to_str().unwrap(), "--san", "thaw-coordinator.thaw.svc", "--days", "2"]));
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("# who may call\noperator {OPERATOR} ops\nreader {READER} dash\noperator {EXPIRED} gone expires=2025-06-30\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--store", "memory", "--tokens"])
        .arg(&tokens)
        .arg("--tls")
        .arg(certs.join("coordinator"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{line}");
    Coord(child, url, certs)
}

fn state_of(c: &Coord, job: &str) -> Value {
    let o = thaw_as(c, Some(READER), &["status", job, "--json"]);
    serde_json::from_slice::<Value>(&o.stdout).unwrap()[0].clone()
}

/// A gRPC client of `c` that presents the TLS directory `tls` (none: plaintext to an http URL).
fn api(c: &Coord, tls: Option<&std::path::Path>, token: Option<&str>) -> std::sync::Arc<Coordinators> {
    let url = if tls.is_some() { c.1.clone() } else { c.1.replace("https://", "http://") };
    let mut creds = Credentials::default().with_tls(tls.map(|d| ClientTls::new(d).unwrap()));
    if let Some(t) = token {
        creds = creds.with_token(t).unwrap();
    }
    Coordinators::with_credentials(&url, creds).unwrap()
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
        (Some(EXPIRED), "token `gone` expired at 2025-06-30T00:00:00Z"),
    ] {
        let err = fails(thaw_as(&c, token, &["submit", spec]));
        assert!(err.contains(expect), "submit with {token:?}: {err}");
    }
    let list = stdout(&ok(thaw_as(&c, Some(READER), &["status", "--json"])));
    assert_eq!(list.trim(), "[]", "no job was created");
    // Status without a token is refused too.
    assert!(fails(thaw_as(&c, None, &["status"])).contains("a bearer token is required"));

    // The operator submits; the job's worker credential comes back to it alone.
    let o = ok(thaw_as(&c, Some(OPERATOR), &["submit", spec]));
    let credential = stderr(&o).rsplit(' ').next().unwrap().trim().to_string();
    assert_eq!(credential.len(), 64, "{}", stderr(&o));
    let before = state_of(&c, "sec");

    // Cancel as nobody or as a reader: refused, the job unchanged.
    assert!(fails(thaw_as(&c, None, &["cancel", "sec"])).contains("bearer token"));
    assert!(fails(thaw_as(&c, Some(READER), &["cancel", "sec"])).contains("needs operator"));
    assert!(fails(thaw_as(&c, Some(READER), &["delete", "sec"])).contains("needs operator"));
    assert_eq!(state_of(&c, "sec"), before);

    // Join without the job's credential, with a wrong one, or with a client token (even an
    // operator's) instead: refused before anything is read.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let join = |token: Option<&str>, bearer: Option<&str>| {
        rt.block_on(async {
            let mut w = api(&c, Some(&c.2.join("worker")), bearer).workers();
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
    let wrong = "0".repeat(64);
    for (t, bearer) in [(None, None), (Some(wrong.as_str()), None), (None, Some(READER)), (None, Some(OPERATOR))] {
        match join(t, bearer) {
            Ok(Err(s)) => assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}"),
            other => panic!("a join with {t:?} and bearer {bearer:?} was not refused: {other:?}"),
        }
    }
    // Leave and progress as a non-member: refused, the job unchanged.
    let (leave, progress) = rt.block_on(async {
        let mut w = api(&c, Some(&c.2.join("worker")), None).workers();
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
    for r in [leave.map(|_| ()), progress.map(|_| ())] {
        let s = r.expect_err("a non-member's call was accepted");
        // Not a member of the running group, or (during the rendezvous) not among those waiting.
        assert!(
            (s.code() == tonic::Code::NotFound && s.message().contains("is not a member"))
                || (s.code() == tonic::Code::FailedPrecondition && s.message().contains("is not waiting")),
            "{s:?}"
        );
    }
    assert_eq!(state_of(&c, "sec"), before);

    // The real worker, with the credential, joins and trains the job to the end.
    let status = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["worker", "--job", "sec", "--coordinator", &c.1])
        .env("THAW_TLS_DIR", c.2.join("worker"))
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
    while state_of(&c, "sec")["state"] != "succeeded" {
        assert!(Instant::now() < deadline, "{}", state_of(&c, "sec"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lenet_spec(dir: &std::path::Path, name: &str, workers: u32, train: usize) -> std::path::PathBuf {
    write_spec(
        dir,
        name,
        &format!(
            "name = \"{name}\"\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
             train_limit = {train}\nval_limit = 64\n[distributed]\nworkers = {workers}\n[output]\ndir = \"{}\"\n",
            fashion_mnist().display(),
            dir.join(name).display()
        ),
    )
}

#[test]
fn plaintext_another_ca_and_expired_certificates_get_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let spec = lenet_spec(dir.path(), "tls", 1, 256);
    let submit = pb::SubmitRequest { spec_toml: std::fs::read_to_string(&spec).unwrap(), ..Default::default() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let try_submit = |tls: Option<&std::path::Path>, token| {
        rt.block_on(async {
            let client = api(&c, tls, token);
            tokio::time::timeout(Duration::from_secs(5), client.jobs().submit(submit.clone()))
                .await
                .expect("an answer or a refusal within 5 s")
        })
    };
    // A certificate from another CA, and one of the cluster's CA that expired: the handshake
    // fails, so the operator token they carry is never even read.
    let intruder = Authority::new("intruder CA", 2).unwrap();
    intruder.write_dir(&dir.path().join("intruder"), "thaw-client", &[], 2).unwrap();
    let ours = dir.path().join("certs/client");
    let expired = dir.path().join("expired");
    std::fs::create_dir_all(&expired).unwrap();
    // The cluster's CA key signs an expired certificate (as an insider with an old one holds).
    let ca = Authority::from_pem(
        &std::fs::read_to_string(dir.path().join("certs/ca.crt")).unwrap(),
        &std::fs::read_to_string(dir.path().join("certs/ca.key")).unwrap(),
    )
    .unwrap();
    let forty_days_ago = std::time::SystemTime::now() - Duration::from_secs(40 * 86400);
    let (cert, key) = ca.issue("thaw-client", &[], 30, forty_days_ago).unwrap();
    std::fs::copy(ours.join("ca.crt"), expired.join("ca.crt")).unwrap();
    std::fs::write(expired.join("tls.crt"), cert).unwrap();
    std::fs::write(expired.join("tls.key"), key).unwrap();
    for (what, tls) in [("another CA's", Some(dir.path().join("intruder"))), ("an expired", Some(expired)), ("no", None)] {
        let r = try_submit(tls.as_deref(), Some(OPERATOR));
        let s = r.expect_err(&format!("a client with {what} certificate was served"));
        // A transport failure (the kind depends on when the connection drops), never an answer
        // from a service.
        assert!(
            matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal
            ) && std::error::Error::source(&s).is_some(),
            "{what}: {s:?}"
        );
    }
    // Plaintext HTTP/2 on the TLS port: the connection is closed without an HTTP/2 answer.
    {
        use std::io::{Read, Write};
        let addr = c.1.trim_start_matches("https://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        // At most a TLS alert record (type 21), never an HTTP/2 SETTINGS frame.
        assert!(answer.is_empty() || answer[0] == 0x15, "plaintext got an answer: {answer:?}");
    }
    // Nothing was created; the cluster's own client certificate with the token is served.
    assert_eq!(stdout(&ok(thaw_as(&c, Some(READER), &["status", "--json"]))).trim(), "[]");
    try_submit(Some(&ours), Some(OPERATOR)).expect("the cluster's client is served");
    assert_eq!(state_of(&c, "tls")["state"], "rendezvous", "submitted, waiting for its worker");
    // The CLI says what is wrong when the TLS directory is missing or the URL is plaintext.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
    let o = cmd.args(["status", "--coordinator", &c.1]).env_remove("THAW_TLS_DIR").env("THAW_TOKEN", READER).output().unwrap();
    assert!(stderr(&o).contains("is a TLS coordinator: set THAW_TLS_DIR"), "{}", stderr(&o));
}

#[test]
fn past_its_limits_a_coordinator_refuses_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = start_with(dir.path(), &["--max-jobs", "2", "--max-watches-per-client", "1", "--max-pending-joins", "1"]);
    let specs: Vec<_> = (0..3).map(|i| lenet_spec(dir.path(), &format!("j{i}"), 2, 256)).collect();
    let mut credentials = Vec::new();
    for s in &specs[..2] {
        let o = ok(thaw_as(&c, Some(OPERATOR), &["submit", s.to_str().unwrap()]));
        credentials.push(stderr(&o).rsplit(' ').next().unwrap().trim().to_string());
    }
    let err = fails(thaw_as(&c, Some(OPERATOR), &["submit", specs[2].to_str().unwrap()]));
    assert!(err.contains("keeps 2 jobs, its most (--max-jobs 2)"), "{err}");
    let listed = stdout(&ok(thaw_as(&c, Some(READER), &["status", "--json"])));
    assert!(!listed.contains("\"j2\""), "{listed}");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // One watch stream per client: a second from the same token is refused, another
        // client's is not.
        let reader = api(&c, Some(&c.2.join("client")), Some(READER));
        let first = reader.jobs().watch(pb::WatchRequest { job_id: "j0".into() }).await.expect("the first watch");
        let s = reader.jobs().watch(pb::WatchRequest { job_id: "j0".into() }).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("--max-watches-per-client 1"), "{}", s.message());
        let operator = api(&c, Some(&c.2.join("client")), Some(OPERATOR));
        operator.jobs().watch(pb::WatchRequest { job_id: "j0".into() }).await.expect("another client's watch");
        // Closing the stream gives its slot back.
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        while reader.jobs().watch(pb::WatchRequest { job_id: "j0".into() }).await.is_err() {
            assert!(Instant::now() < deadline, "a closed watch kept its slot");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // One pending join: j0's first worker waits for a second; a join to j1 meanwhile is
        // refused and leaves no trace.
        let join = |job: &str, worker: &str, token: &str| {
            let w = api(&c, Some(&c.2.join("worker")), None).workers();
            let mut req = tonic::Request::new(pb::JoinRequest {
                job_id: job.into(),
                worker_id: worker.into(),
                collective_addr: "127.0.0.1:9".into(),
                num_train_samples: 256,
                ..Default::default()
            });
            req.metadata_mut().insert("thaw-job-token", token.parse().unwrap());
            let mut w = w;
            async move { w.join(req).await }
        };
        let waiting = tokio::spawn(join("j0", "a", &credentials[0]));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = join("j1", "b", &credentials[1]).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("--max-pending-joins 1"), "{}", s.message());
        waiting.abort();
    });
    let j1 = state_of(&c, "j1");
    assert_eq!(j1["state"], "rendezvous");
    assert_eq!(j1["progress"]["workers"].as_u64().unwrap_or(0), 0, "the refused join left no trace: {j1}");
}

/// The TCP ports `pid` listens on.
fn listening_ports(pid: u32) -> Vec<u16> {
    let o = Command::new("ss").args(["-Hltnp"]).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| l.split_whitespace().nth(3)?.rsplit(':').next()?.parse().ok())
        .collect()
}

#[test]
fn a_port_scan_and_a_rogue_peer_during_ring_formation_change_nothing() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let spec = lenet_spec(dir.path(), "ring", 2, 1024);
    let o = ok(thaw_as(&c, Some(OPERATOR), &["submit", spec.to_str().unwrap()]));
    let credential = stderr(&o).rsplit(' ').next().unwrap().trim().to_string();
    let worker = |i: u32| {
        let log = std::fs::File::create(dir.path().join(format!("w{i}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(["worker", "--job", "ring", "--worker-id", &format!("w{i}"), "--coordinator", &c.1])
            .env("THAW_TLS_DIR", c.2.join("worker"))
            .env("THAW_JOB_TOKEN", &credential)
            .env("THAW_HOME", thaw_home())
            .env("THAW_OFFLINE", "1")
            .env("RUST_LOG", "info")
            .env_remove("THAW_TOKEN")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    // The first worker joins and listens for its ring neighbour; the group waits for the second.
    let mut first = worker(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ports = loop {
        let p = listening_ports(first.id());
        if !p.is_empty() {
            break p;
        }
        assert!(Instant::now() < deadline, "the worker never listened");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Scans of every port it listens on (connect and close; send garbage; connect and say
    // nothing), and a rogue peer that speaks the ring protocol without the job's key.
    let mut held = Vec::new();
    for &p in &ports {
        let addr = format!("127.0.0.1:{p}");
        drop(std::net::TcpStream::connect(&addr).unwrap());
        let _ = std::net::TcpStream::connect(&addr).unwrap().write_all(b"\x16\x03\x01garbage");
        held.push(std::net::TcpStream::connect(&addr).unwrap());
    }
    let rogue: Vec<_> = ports
        .iter()
        .map(|&p| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut hello = [0u8; 64];
                hello[..8].copy_from_slice(b"THAWRNG2");
                hello[8..12].copy_from_slice(&1u32.to_le_bytes()); // rank 1
                hello[12..16].copy_from_slice(&2u32.to_le_bytes()); // of 2
                hello[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
                let _ = s.write_all(&hello);
                let mut answer = [0u8; 96];
                if s.read_exact(&mut answer).is_err() {
                    return false;
                }
                let _ = s.write_all(&[0x42; 32]);
                // Taken in, it would be sent a shared-memory offer; dropped, it reads nothing.
                let mut more = [0u8; 1];
                matches!(s.read(&mut more), Ok(n) if n > 0)
            })
        })
        .collect();
    let mut second = worker(1);
    assert!(first.wait().unwrap().success() && second.wait().unwrap().success());
    assert!(rogue.into_iter().all(|r| !r.join().unwrap()), "a rogue peer was taken into the ring");
    drop(held);
    assert_eq!(state_of(&c, "ring")["state"], "succeeded");
    let logs = std::fs::read_to_string(dir.path().join("w0.log")).unwrap()
        + &std::fs::read_to_string(dir.path().join("w1.log")).unwrap();
    assert!(logs.contains("dropped a ring connection that failed the handshake"), "{logs}");
}

/// Starts `thaw coordinator ARGS`, returns the first line it prints, and stops it.
fn first_line_of_coordinator(args: &[&str]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .arg("coordinator")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.take().unwrap()), &mut line).unwrap();
    let _ = c.kill();
    let _ = c.wait();
    line
}

#[test]
fn an_exposed_coordinator_without_tokens_refuses_to_start() {
    let err = fails(thaw(&["coordinator", "--listen", "0.0.0.0:0", "--store", "memory"]));
    assert!(
        err.contains("refusing to listen on 0.0.0.0") && err.contains("--tokens FILE") && err.contains("--insecure"),
        "{err}"
    );
    // With --insecure it starts, and says it is insecure.
    let line = first_line_of_coordinator(&["--listen", "0.0.0.0:0", "--store", "memory", "--insecure"]);
    assert!(line.contains("coordinator listening on http://0.0.0.0:"), "{line}");
    // Tokens without TLS are not enough (they would cross the network in the clear); with both it
    // serves TLS on the exposed address.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokens"), format!("operator {OPERATOR}\n")).unwrap();
    let tokens = dir.path().join("tokens");
    let err = fails(thaw(&["coordinator", "--listen", "0.0.0.0:0", "--store", "memory", "--tokens", tokens.to_str().unwrap()]));
    assert!(err.contains("refusing to listen on 0.0.0.0") && err.contains("without TLS (--tls DIR)"), "{err}");
    let certs = dir.path().join("certs");
    ok(thaw(&["certs", "init", certs.to_str().unwrap()]));
    let tls = certs.join("coordinator");
    let line = first_line_of_coordinator(&[
        "--listen",
        "0.0.0.0:0",
        "--store",
        "memory",
        "--tokens",
        tokens.to_str().unwrap(),
        "--tls",
        tls.to_str().unwrap(),
    ]);
    assert!(line.contains("coordinator listening on https://0.0.0.0:"), "{line}");
    // A TLS directory that does not load is named.
    let err = fails(thaw(&["coordinator", "--listen", "127.0.0.1:0", "--store", "memory", "--tls", dir.path().to_str().unwrap()]));
    assert!(err.contains("--tls") && err.contains("ca.crt"), "{err}");
    // A tokens file that does not parse is named.
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
