//! Watching a training job: the coordinator's `/metrics` scraped during a real 2-worker job and
//! read back with an independent Prometheus text-format parser.

mod common;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

/// `GET /metrics` over plain HTTP/1.1.
fn scrape(addr: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// (name, labels) -> value, from the parser's view of `text`.
fn parse(text: &str) -> HashMap<(String, Vec<(String, String)>), f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    scrape
        .samples
        .into_iter()
        .filter_map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<(String, String)> = s.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            labels.sort();
            Some(((s.metric, labels), v))
        })
        .collect()
}

fn get(m: &HashMap<(String, Vec<(String, String)>), f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    want.sort();
    m.get(&(name.to_string(), want)).copied()
}

#[test]
fn a_running_two_worker_job_can_be_scraped() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let spec = write_spec(
        dir.path(),
        "watched",
        &format!(
            "name = \"watched\"\nseed = 3\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\n\
             root = \"{}\"\nval_limit = 1000\n[train]\nepochs = 2\nbatch_size = 32\nlr = 0.05\n[schedule]\n\
             strategy = \"scratch\"\n[output]\ndir = \"{}\"\n",
            fashion_mnist().display(),
            out.display()
        ),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let (mut launch, _url) = spawn_launch(&spec, &["--nproc", "2", "--metrics-addr", &addr], &[]);
    // Scrape until both ranks have reported a few steps through their heartbeats.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (text, m) = loop {
        if let Some(text) = scrape(&addr) {
            let m = parse(&text);
            let steps = |r: &str| get(&m, "thaw_rank_steps_total", &[("job", "watched"), ("rank", r)]).unwrap_or(0.0);
            if steps("0") >= 50.0 && steps("1") >= 50.0 {
                break (text, m);
            }
        }
        assert!(Instant::now() < deadline, "no per-rank figures within 120 s");
        std::thread::sleep(Duration::from_millis(300));
    };
    let job = [("job", "watched")];
    assert_eq!(get(&m, "thaw_jobs", &[("state", "running")]), Some(1.0), "{text}");
    assert_eq!(get(&m, "thaw_jobs", &[("state", "failed")]), Some(0.0));
    assert_eq!(get(&m, "thaw_job_workers", &job), Some(2.0));
    assert_eq!(get(&m, "thaw_job_state_transitions_total", &[("job", "watched"), ("to", "running")]), Some(1.0));
    assert!(get(&m, "thaw_job_rendezvous_duration_seconds", &job).is_some_and(|s| (0.0..60.0).contains(&s)));
    for rank in ["0", "1"] {
        let r = [("job", "watched"), ("rank", rank)];
        let steps = get(&m, "thaw_rank_steps_total", &r).unwrap();
        let seconds = get(&m, "thaw_rank_step_seconds_total", &r).unwrap();
        let allreduce = get(&m, "thaw_rank_allreduce_seconds_total", &r).unwrap();
        let exposed = get(&m, "thaw_rank_allreduce_exposed_seconds_total", &r).unwrap();
        let wait = get(&m, "thaw_rank_data_wait_seconds_total", &r).unwrap();
        let samples = get(&m, "thaw_rank_samples_total", &r).unwrap();
        assert!(seconds > 0.0 && allreduce > 0.0 && exposed > 0.0 && wait >= 0.0, "rank {rank}: {text}");
        assert!(allreduce + wait < seconds * 1.5, "rank {rank}: parts within the step time");
        assert!((samples - steps * 32.0).abs() <= 32.0 * 2.0, "rank {rank}: 32 samples a step ({samples}, {steps})");
        assert!(get(&m, "thaw_rank_samples_per_second", &r).unwrap() > 0.0);
    }
    let loss = get(&m, "thaw_job_loss", &job).unwrap();
    assert!(loss.is_finite() && loss > 0.0 && loss < 10.0, "{loss}");
    assert_eq!(get(&m, "thaw_job_stage", &job), Some(1.0));
    for group in ["conv", "fc", "head"] {
        assert_eq!(get(&m, "thaw_job_learning_rate", &[("job", "watched"), ("group", group)]), Some(0.05), "{group}");
    }
    assert!(get(&m, "thaw_rpc_requests_total", &[("method", "Heartbeat"), ("code", "OK")]).unwrap() >= 2.0);
    assert!(get(&m, "thaw_rpc_requests_total", &[("method", "Join"), ("code", "OK")]) == Some(2.0));
    // Low-cardinality labels only: no sample, step or worker-process label.
    for ((name, labels), _) in &m {
        for (k, _) in labels {
            assert!(["job", "rank", "state", "to", "group", "method", "code", "le"].contains(&k.as_str()), "{name}: {k}");
        }
    }
    let status = launch.wait().unwrap();
    assert!(status.success(), "the job finishes");

    // Rank 0 wrote TensorBoard events: TensorBoard's own reader finds every step and epoch.
    let tags = tensorboard_scalars(&out.join("tb"));
    let steps = tags.get("train/step_loss").expect("per-step loss");
    assert_eq!(steps.len(), 2 * 938, "one loss per step of 2 epochs of 60,000 / 64");
    assert!(steps.last().unwrap().1 < steps[0].1, "the loss falls: {:?} -> {:?}", steps[0], steps.last());
    for group in ["conv", "fc", "head"] {
        assert_eq!(tags[&format!("lr/{group}")].len(), 2 * 938);
    }
    let val = &tags["epoch/val_acc"];
    assert_eq!(val.iter().map(|p| p.0).collect::<Vec<_>>(), [938, 1876], "one point per epoch, at its last step");
    assert!(val[1].1 > 0.5, "{val:?}");

    // thaw plot draws the run, as PNG and SVG.
    let png = dir.path().join("curves.png");
    ok(thaw(&["plot", out.to_str().unwrap(), "--out", png.to_str().unwrap()]));
    let img = image::open(&png).expect("a PNG").to_rgb8();
    assert_eq!(img.dimensions(), (1400, 900));
    let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
    assert!(blue > 500, "the run's curves are drawn in its colour ({blue} pixels)");
    let svg = dir.path().join("curves.svg");
    ok(thaw(&["plot", out.to_str().unwrap(), "--out", svg.to_str().unwrap()]));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("loss per epoch") && text.contains("watched"), "{}", &text[..200]);
    let err = fails(thaw(&["plot", dir.path().to_str().unwrap(), "--out", png.to_str().unwrap()]));
    assert!(err.contains("not a run directory (no readable metrics.json)"), "{err}");
    let err = fails(thaw(&["plot", out.to_str().unwrap(), "--out", "x.jpg"]));
    assert!(err.contains("--out x.jpg: give a .png or .svg file"), "{err}");
}

/// Every scalar series of the event files in `dir`, as TensorBoard's EventAccumulator reads them:
/// tag -> [(step, value)].
fn tensorboard_scalars(dir: &std::path::Path) -> HashMap<String, Vec<(i64, f64)>> {
    let py = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".thaw/tb-venv/bin/python");
    assert!(py.is_file(), "{} is missing: run scripts/setup.sh", py.display());
    let script = "import json, sys\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        ea = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0}); ea.Reload()\n\
        print(json.dumps({t: [(s.step, s.value) for s in ea.Scalars(t)] for t in ea.Tags()['scalars']}))\n";
    let o = std::process::Command::new(py).args(["-c", script]).arg(dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        "logs",
        &format!(
            "name = \"logs\"\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\nroot = \"{}\"\n\
             train_limit = 256\nval_limit = 64\n[train]\nepochs = 1\nbatch_size = 32\n[output]\ndir = \"{}\"\n",
            fashion_mnist().display(),
            dir.path().join("out").display()
        ),
    );
    let o = ok(thaw(&["--log-format", "json", "train", spec.to_str().unwrap()]));
    let err = stderr(&o);
    let events: Vec<serde_json::Value> =
        err.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect(l)).collect();
    assert!(events.len() >= 2, "{err}");
    for e in &events {
        assert!(e["timestamp"].is_string() && e["level"].is_string() && e["message"].is_string(), "{e}");
    }
    let prepared = events.iter().find(|e| e["message"] == "prepared").expect("the prepared event");
    assert_eq!(prepared["arch"], "lenet5", "fields are top-level keys: {prepared}");
    assert!(!err.lines().any(|l| l.contains(" INFO ") || l.contains(" WARN ")), "no text log line:\n{err}");
}

/// The page at `url` after its scripts ran for about `ms`, as headless Chromium sees it.
fn browser_dom(url: &str, ms: u32) -> String {
    let o = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", &format!("--virtual-time-budget={ms}"), "--dump-dom", url])
        .output()
        .expect("chromium (scripts/setup.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn the_web_view_shows_a_running_job_in_a_real_browser_and_keeps_it_current() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let spec = write_spec(
        dir.path(),
        "seen",
        &format!(
            "name = \"seen\"\nseed = 5\n[model]\narch = \"lenet5\"\nweights = \"none\"\n[data]\nformat = \"idx\"\n\
             root = \"{}\"\nval_limit = 1000\n[train]\nepochs = 3\nbatch_size = 16\nlr = 0.05\n[schedule]\n\
             strategy = \"scratch\"\n[output]\ndir = \"{}\"\n",
            fashion_mnist().display(),
            out.display()
        ),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let (mut launch, url) = spawn_launch(&spec, &["--nproc", "2", "--metrics-addr", &addr], &[]);
    // thaw launch's coordinator has tokens: the page needs one (the launch's operator token).
    let token_file = launch_var(&url, "THAW_TOKEN_FILE").expect("the launch's token file");
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    // Without the token the API refuses.
    let o = std::process::Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{addr}/api/jobs")]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "401");
    let page = format!("http://{addr}/?job=seen&token={token}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let points = |dom: &str| -> usize {
        dom.split("id=\"loss\"").nth(1).and_then(|s| s.split("data-points=\"").nth(1)).and_then(|s| s.split('"').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let first = loop {
        let dom = browser_dom(&page, 3000);
        if points(&dom) >= 2 {
            break dom;
        }
        assert!(Instant::now() < deadline, "no loss curve within 120 s:\n{dom}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(first.contains("seen") && first.contains("running"), "{first}");
    assert!(first.contains("stage 1: epochs 1-3: conv, fc, head"), "the stage timeline");
    assert!(first.contains("where a step's time goes") && first.contains("<td>1</td>"), "both ranks' split");
    std::thread::sleep(Duration::from_secs(3));
    let later = browser_dom(&page, 3000);
    assert!(points(&later) > points(&first), "the curve grows: {} then {}", points(&first), points(&later));
    let list = browser_dom(&format!("http://{addr}/?token={token}"), 3000);
    assert!(list.contains("data-job=\"seen\"") && list.contains("ETA"), "{list}");
    let screenshot = out.join("web.png");
    let o = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100", "--virtual-time-budget=3000"])
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&page)
        .output()
        .unwrap();
    assert!(o.status.success() && image::open(&screenshot).is_ok(), "a screenshot");
    assert!(launch.wait().unwrap().success());
}
