//! Time to accuracy on Fashion-MNIST, thaw against a PyTorch DDP script, one after the other on
//! the same machine: the wall time from starting each job to its first evaluation on the 10k test
//! images at or above the target (0.88 unless `THAW_TTA_TARGET` says otherwise), start-up included.
//!
//! 1. PyTorch: `torchrun --nproc-per-node 2 benches/time_to_accuracy_torch.py` (gloo, torchvision's
//!    MobileNetV2 with ImageNet weights, 64x64, batch 64 per rank, one head-only epoch then
//!    everything with the trunk at 0.1x the LR on one cosine; see the script).
//! 2. thaw's best recipe, `examples/fashion-mnist-best.toml`, under `thaw launch --nproc 2`.
//! 3. thaw running PyTorch's recipe exactly, `examples/fashion-mnist-torch-recipe.toml`: the
//!    difference to 1 is engine speed alone, the difference to 2 the recipe.
//!
//! Both sides evaluate once per epoch (each rank half of the test set) and stop at the target;
//! every side runs one thread per rank. Each run prints the load average before and after, since
//! a busy machine slows every side. The PyTorch side needs `.thaw/bench-venv` (installed on
//! demand, about 4.7 GB); `THAW_TTA_ONLY=torch|best|recipe` runs one side.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::baseline_python;

/// One side's run: its evaluations (epoch or step, accuracy, seconds since start) and the first
/// time it reached the target.
struct Outcome {
    evals: Vec<(String, f64, f64)>,
    reached: Option<f64>,
    wall: f64,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or("?".into(), |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Runs `cmd`, reading its output line by line; `parse` turns a line into an evaluation
/// (label, accuracy). Stops the job (SIGINT to its process group, then SIGKILL) once the target is
/// reached.
fn run(mut cmd: Command, target: f64, parse: &dyn Fn(&str) -> Option<(String, f64)>) -> Outcome {
    use std::os::unix::process::CommandExt;
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    // stderr and stdout both carry progress; read them on two threads into one channel.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let tx2 = tx.clone();
    std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    std::thread::spawn(move || BufReader::new(err).lines().map_while(Result::ok).for_each(|l| drop(tx2.send(l))));
    let mut evals = Vec::new();
    let mut reached = None;
    for line in rx {
        if let Some((label, acc)) = parse(&line) {
            let t = start.elapsed().as_secs_f64();
            eprintln!("  {label}: {acc:.4} at {t:.1}s");
            evals.push((label, acc, t));
            if acc >= target && reached.is_none() {
                reached = Some(t);
                // The job's whole process group (`kill -INT -PGID` would read the group as an
                // option and signal nothing, which left the job running to its end).
                let group = -(child.id() as libc::pid_t);
                unsafe { libc::kill(group, libc::SIGINT) };
                std::thread::sleep(std::time::Duration::from_secs(5));
                unsafe { libc::kill(group, libc::SIGKILL) };
                break;
            }
        } else if line.contains("rror") {
            eprintln!("  | {line}");
        }
    }
    let _ = child.wait();
    Outcome { evals, reached, wall: start.elapsed().as_secs_f64() }
}

/// A copy of the example spec `name` with absolute data and a temporary output directory.
fn spec_copy(repo: &Path, name: &str, tmp: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo.join("examples").join(name)).expect("example spec");
    let data = repo.join(".thaw/data/fashion-mnist");
    let out = tmp.join(name.trim_end_matches(".toml"));
    let _ = std::fs::remove_dir_all(&out);
    let text = text
        .replace("\"../.thaw/data/fashion-mnist\"", &format!("{:?}", data.display().to_string()))
        .lines()
        .map(|l| if l.starts_with("dir = ") { format!("dir = {:?}", out.display().to_string()) } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    let path = tmp.join(name);
    std::fs::write(&path, text).expect("write spec copy");
    path
}

/// `epoch   3  ...  val_acc 0.9012 ...` from `thaw launch`.
fn thaw_eval(line: &str) -> Option<(String, f64)> {
    let epoch = line.trim_start().strip_prefix("epoch")?.split_whitespace().next()?.parse::<u32>().ok()?;
    let acc = line.split("val_acc").nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some((format!("epoch {epoch}"), acc))
}

/// `eval EPOCH STEP ACC SECONDS` from the PyTorch script.
fn torch_eval(line: &str) -> Option<(String, f64)> {
    let mut f = line.strip_prefix("eval ")?.split_whitespace();
    let (epoch, step, acc) = (f.next()?, f.next()?, f.next()?.parse().ok()?);
    Some((format!("epoch {epoch} (step {step})"), acc))
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let thaw = PathBuf::from(env!("CARGO_BIN_EXE_thaw"));
    let target: f64 = std::env::var("THAW_TTA_TARGET").ok().and_then(|s| s.parse().ok()).unwrap_or(0.88);
    let only = std::env::var("THAW_TTA_ONLY").ok();
    let wanted = |side: &str| only.as_deref().is_none_or(|o| o == side);
    let tmp = std::env::temp_dir().join("thaw-time-to-accuracy");
    std::fs::create_dir_all(&tmp).expect("temp dir");

    let mut rows: Vec<(&str, Outcome, String, String)> = Vec::new();
    if wanted("torch") {
        match baseline_python() {
            Some(py) => {
                let torchrun = py.with_file_name("torchrun");
                let mut cmd = Command::new(torchrun);
                cmd.args(["--nproc-per-node", "2", "--master-port", "29517"])
                    .arg(repo.join("benches/time_to_accuracy_torch.py"))
                    .arg(repo.join(".thaw/data/fashion-mnist"))
                    .arg(repo.join(".thaw/weights/mobilenet_v2-b0353104.pth"))
                    .args(["3", "0.1", &target.to_string()])
                    .env("OMP_NUM_THREADS", "1");
                eprintln!("PyTorch DDP (torchrun, gloo), load {}", loadavg());
                let before = loadavg();
                let o = run(cmd, target, &torch_eval);
                rows.push(("PyTorch DDP, torchrun + gloo", o, before, loadavg()));
            }
            None => eprintln!("no PyTorch baseline (bench venv missing); skipping it"),
        }
    }
    for (side, label, spec) in [
        ("best", "thaw, best recipe", "fashion-mnist-best.toml"),
        ("recipe", "thaw, PyTorch's recipe", "fashion-mnist-torch-recipe.toml"),
    ] {
        if !wanted(side) {
            continue;
        }
        let spec = spec_copy(&repo, spec, &tmp);
        let mut cmd = Command::new(&thaw);
        cmd.args(["launch", "--nproc", "2"]).arg(&spec);
        eprintln!("{label} ({}), load {}", spec.display(), loadavg());
        let before = loadavg();
        let o = run(cmd, target, &thaw_eval);
        rows.push((label, o, before, loadavg()));
    }

    println!("time to {target} test accuracy, Fashion-MNIST, 2 ranks x 1 thread, one after the other");
    println!("{:<30} {:>10} {:>9} {:>16} {:>16}  evaluations", "run", "reached_s", "wall_s", "load_before", "load_after");
    for (label, o, before, after) in &rows {
        let evals: Vec<String> = o.evals.iter().map(|(l, a, t)| format!("{l}: {a:.4} @ {t:.0}s")).collect();
        println!(
            "{:<30} {:>10} {:>9.1} {:>16} {:>16}  {}",
            label,
            o.reached.map_or("not".to_string(), |t| format!("{t:.1}")),
            o.wall,
            before,
            after,
            evals.join(", ")
        );
    }
    let time_of = |l: &str| rows.iter().find(|r| r.0 == l).and_then(|r| r.1.reached);
    let torch = rows.iter().find(|r| r.0 == "PyTorch DDP, torchrun + gloo").map(|r| (r.1.reached, r.1.wall));
    for l in ["thaw, best recipe", "thaw, PyTorch's recipe"] {
        match (torch, time_of(l)) {
            (Some((Some(torch), _)), Some(t)) => {
                println!("{l}: {:.2}x PyTorch's speed to {target} ({torch:.1} s / {t:.1} s)", torch / t)
            }
            // PyTorch's schedule ended below the target: its whole run is a lower bound.
            (Some((None, wall)), Some(t)) => println!(
                "{l}: over {:.2}x PyTorch's speed to {target} (PyTorch did not reach it in its {wall:.1} s; thaw {t:.1} s)",
                wall / t
            ),
            _ => {}
        }
    }
}
