//! Shared helpers for the end-to-end tests: the real `thaw` binary, the data and weights that
//! `scripts/setup.sh` installs, and a per-binary weights cache (`THAW_HOME`) filled once by
//! `thaw weights import` from torchvision's real MobileNetV2 file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file installed by `scripts/setup.sh`; a missing one fails the test with the fix.
pub fn setup_file(rel: &str) -> PathBuf {
    let p = repo().join(".thaw").join(rel);
    assert!(p.exists(), "{} is missing: run `bash scripts/setup.sh` first", p.display());
    p
}

pub fn fashion_mnist() -> PathBuf {
    setup_file("data/fashion-mnist")
}

pub fn photo(name: &str) -> PathBuf {
    setup_file(&format!("data/photos/{name}"))
}

/// A THAW_HOME shared by the tests of one binary, holding the imported MobileNetV2 weights.
pub fn thaw_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(["weights", "import"])
            .arg(setup_file("weights/mobilenet_v2-b0353104.pth"))
            .args(["--arch", "mobilenet_v2"])
            .env("THAW_HOME", dir.path())
            .output()
            .expect("run thaw");
        assert!(out.status.success(), "weights import failed: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
    .path()
}

/// `thaw ARGS` with the shared weights cache, offline, on the CPU.
pub fn thaw(args: &[&str]) -> Output {
    thaw_in(args, None)
}

pub fn thaw_in(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
    cmd.args(args).env("THAW_HOME", thaw_home()).env("THAW_OFFLINE", "1").env("RUST_LOG", "info");
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().expect("run thaw")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `thaw ARGS` against the coordinator(s) at `url` (`THAW_COORDINATOR`).
/// The credentials `thaw launch` printed for its coordinator at each URL.
static LAUNCH_CREDENTIALS: std::sync::Mutex<Vec<(String, Vec<(String, String)>)>> = std::sync::Mutex::new(Vec::new());

/// `cmd` with the credentials of the launch whose coordinator is `url` (none for other URLs).
pub fn authorize<'a>(cmd: &'a mut Command, url: &str) -> &'a mut Command {
    let all = LAUNCH_CREDENTIALS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, vars)) = all.iter().find(|(u, _)| u == url) {
        for (k, v) in vars {
            cmd.env(k, v);
        }
    }
    cmd
}

/// A credential variable (`THAW_TOKEN_FILE`, ...) that the launch whose coordinator is `url` printed.
pub fn launch_var(url: &str, name: &str) -> Option<String> {
    let all = LAUNCH_CREDENTIALS.lock().unwrap_or_else(|p| p.into_inner());
    all.iter().find(|(u, _)| u == url)?.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

pub fn thaw_url(args: &[&str], url: &str) -> Output {
    authorize(&mut Command::new(env!("CARGO_BIN_EXE_thaw")), url)
        .args(args)
        .env("THAW_COORDINATOR", url)
        .env("THAW_HOME", thaw_home())
        .env("THAW_OFFLINE", "1")
        .output()
        .expect("run thaw")
}

/// Asserts success, showing both streams otherwise.
pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "thaw failed\nstdout:\n{}\nstderr:\n{}", stdout(&o), stderr(&o));
    o
}

/// Asserts failure and returns stderr.
pub fn fails(o: Output) -> String {
    assert!(!o.status.success(), "thaw unexpectedly succeeded\nstdout:\n{}\nstderr:\n{}", stdout(&o), stderr(&o));
    stderr(&o)
}

/// Writes a job spec into `dir` and returns its path.
pub fn write_spec(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).expect("write spec");
    p
}

/// Starts `thaw coordinator` on a free port with its state in `state_dir`; returns the process and
/// its URL (the first line it prints).
pub fn start_coordinator(state_dir: &Path) -> (std::process::Child, String) {
    start_coordinator_on(state_dir, "127.0.0.1:0")
}

/// [`start_coordinator`] on `listen` (a restarted coordinator takes its old port again).
pub fn start_coordinator_on(state_dir: &Path, listen: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["coordinator", "--listen", listen, "--state-dir"])
        .arg(state_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start thaw coordinator");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line).expect("read url");
    let url = line.trim().rsplit(' ').next().unwrap_or_default().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "no url from the coordinator: {line:?}");
    (child, url)
}

/// Starts `thaw launch ARGS SPEC` with `envs` set; returns the process and its coordinator's URL
/// (read from stderr, which is then drained so the launcher never blocks on a full pipe).
pub fn spawn_launch(spec: &Path, args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
    cmd.arg("launch")
        .args(args)
        .arg(spec)
        .env("THAW_HOME", thaw_home())
        .env("THAW_OFFLINE", "1")
        .env("RUST_LOG", "info");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start thaw launch");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut line = String::new();
    let mut vars = Vec::new();
    while !line.contains("coordinator http") {
        line.clear();
        assert!(err.read_line(&mut line).expect("read stderr") > 0, "launch ended before printing its coordinator");
        if let Some(rest) = line.strip_prefix("credentials (this launch's, private to you): ") {
            vars = rest
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
    }
    let url =
        line.split_whitespace().find(|w| w.starts_with("http")).expect("url").trim_end_matches(',').to_string();
    if url.starts_with("https://") {
        assert_eq!(vars.len(), 3, "a TLS launch prints its credentials");
    }
    LAUNCH_CREDENTIALS.lock().unwrap_or_else(|p| p.into_inner()).push((url.clone(), vars));
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (child, url)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An etcd 3.4 cluster (set-up's binary) on 127.0.0.1; every member killed on drop.
pub struct Etcd {
    members: Vec<Option<std::process::Child>>,
    args: Vec<Vec<String>>,
    pub clients: Vec<String>,
}

impl Etcd {
    /// `n` members (1 or 3) with data under `dir`.
    pub fn start(dir: &Path, n: usize) -> Etcd {
        std::fs::create_dir_all(dir).expect("etcd data directory");
        let peers: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let clients: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let cluster: Vec<String> = (0..n).map(|i| format!("m{i}=http://127.0.0.1:{}", peers[i])).collect();
        let args: Vec<Vec<String>> = (0..n)
            .map(|i| {
                let c = format!("http://127.0.0.1:{}", clients[i]);
                let p = format!("http://127.0.0.1:{}", peers[i]);
                vec![
                    "--name".into(),
                    format!("m{i}"),
                    "--data-dir".into(),
                    dir.join(format!("m{i}")).display().to_string(),
                    "--listen-client-urls".into(),
                    c.clone(),
                    "--advertise-client-urls".into(),
                    c,
                    "--listen-peer-urls".into(),
                    p.clone(),
                    "--initial-advertise-peer-urls".into(),
                    p,
                    "--initial-cluster".into(),
                    cluster.join(","),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--heartbeat-interval".into(),
                    "50".into(),
                    "--election-timeout".into(),
                    "500".into(),
                ]
            })
            .collect();
        let mut e = Etcd {
            members: (0..n).map(|_| None).collect(),
            args,
            clients: clients.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        };
        for i in 0..n {
            e.start_member(i);
        }
        e.wait_ready();
        e
    }

    pub fn start_member(&mut self, i: usize) {
        let log = std::fs::File::create(format!("{}.log", self.args[i][3])).unwrap();
        self.members[i] = Some(
            Command::new(setup_file("bin/etcd"))
                .args(&self.args[i])
                .env("ETCD_UNSUPPORTED_ARCH", "")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd (run scripts/setup.sh)"),
        );
    }

    /// Waits until every running member accepts connections.
    pub fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        for (i, c) in self.clients.iter().enumerate() {
            if self.members[i].is_none() {
                continue;
            }
            while std::net::TcpStream::connect(c).is_err() {
                assert!(std::time::Instant::now() < deadline, "etcd member {i} never listened on {c}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcd://h:p,h:p,...`, as `thaw coordinator --store` takes it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.clients.join(","))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}

// --- The exactly-once ledger (`THAW_LEDGER_DIR`) the workers write, read back by the fault,
// restart and failover tests. ---

/// One run's ledger: sample ids per (generation, epoch, step), and each generation's source
/// position before it joined (which ends what the previous generation committed).
#[derive(Default)]
pub struct Ledger {
    pub steps: std::collections::BTreeMap<(u64, u64, u64), Vec<u64>>,
    pub committed_by_next: std::collections::HashMap<u64, (u64, u64)>,
}

pub fn read_ledger(dir: &Path) -> Ledger {
    let mut l = Ledger::default();
    for f in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let g = v["gen"].as_u64().unwrap();
            if let Some(x) = v["x"].as_array() {
                let key = (g, v["e"].as_u64().unwrap(), v["s"].as_u64().unwrap());
                l.steps.entry(key).or_default().extend(x.iter().map(|i| i.as_u64().unwrap()));
            } else if v["source"] == true && g > 1 {
                let b = v["before"].as_array().unwrap();
                l.committed_by_next.insert(g - 1, (b[0].as_u64().unwrap(), b[1].as_u64().unwrap()));
            }
        }
    }
    l
}

/// Counts, per epoch, how often each sample was trained in committed steps of the runs (in order;
/// `cutoff` ends the last generation of an interrupted run at its checkpoint's position), and the
/// steps lost (computed, not committed) per generation change.
pub fn tally(
    runs: &[(Ledger, Option<(u64, u64)>)],
) -> (std::collections::BTreeMap<u64, std::collections::HashMap<u64, u32>>, Vec<usize>) {
    let mut counts: std::collections::BTreeMap<u64, std::collections::HashMap<u64, u32>> =
        std::collections::BTreeMap::new();
    let mut lost = Vec::new();
    for (l, cutoff) in runs {
        let last_gen = l.steps.keys().map(|k| k.0).max().unwrap_or(0);
        let mut lost_in: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
        for (&(g, e, s), xs) in &l.steps {
            let end = if g == last_gen { *cutoff } else { Some(l.committed_by_next[&g]) };
            if end.is_none_or(|c| (e, s) < c) {
                for &x in xs {
                    *counts.entry(e).or_default().entry(x).or_default() += 1;
                }
            } else {
                *lost_in.entry(g).or_default() += 1;
            }
        }
        // Each rank logs the same (gen, epoch, step) into one key: distinct keys are steps.
        lost.extend(lost_in.values());
    }
    (counts, lost)
}

pub fn assert_exactly_once(
    counts: &std::collections::BTreeMap<u64, std::collections::HashMap<u64, u32>>,
    n: u64,
    epochs: u64,
) {
    assert_eq!(counts.len() as u64, epochs, "epochs in the ledger: {:?}", counts.keys().collect::<Vec<_>>());
    for (e, c) in counts {
        let twice: Vec<_> = c.iter().filter(|(_, k)| **k > 1).map(|(x, _)| *x).take(5).collect();
        assert!(twice.is_empty(), "epoch {e}: samples trained twice: {twice:?}");
        assert_eq!(c.len() as u64, n, "epoch {e}: {} of {n} samples trained", c.len());
    }
}
