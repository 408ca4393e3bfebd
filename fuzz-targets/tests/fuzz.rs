//! The stable-Rust fuzz driver that CI runs: for every target, the committed regression corpus
//! (`fuzz/regressions/<target>/*`) and the seeds (`fuzz/seeds/<target>/*`) are replayed, then a
//! deterministic mutation fuzzer runs from them for a fixed time (`THAW_FUZZ_SECS`, 4 s a target
//! by default).
//!
//! Every input runs under `catch_unwind` and must finish within `SLOW` (2 s); a panic or a slow
//! input fails the test, and the input is written to `target/fuzz-failures/<target>/` to be added
//! to the regressions. An input still running after `HANG` is written there by a watchdog, which
//! then ends the process. A stack overflow or an abort cannot be caught: a SIGABRT handler writes
//! the input the aborting thread was running (and its target) before the process dies, and each
//! target prints its name to stderr before it starts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use thaw_fuzz_targets::mutate::{mutate, Rng};
use thaw_fuzz_targets::TARGETS;

/// An input that takes longer than this is a finding.
const SLOW: Duration = Duration::from_secs(2);
/// An input still running after this is a hang: the watchdog records it and ends the process.
const HANG: Duration = Duration::from_secs(20);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn failures_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("../fuzz-failures").join(target)
}

/// The files of a corpus directory, sorted by name.
fn corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    paths.sort();
    paths.into_iter().filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b))).collect()
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Writes a failing input where it can be picked up; returns its path.
fn save_failure(target: &str, kind: &str, data: &[u8]) -> PathBuf {
    let dir = failures_dir(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{kind}-{:016x}", fnv(data)));
    let _ = std::fs::write(&path, data);
    path
}

/// Goes straight to fd 2: libtest captures `eprintln!`, and what it captured is lost on abort.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

// ---- what the aborting thread was running ----------------------------------------------------

thread_local! {
    /// (input pointer, input length, target index + 1; 0 = idle) of this thread's current input.
    /// `Cell`s of plain values with a const initializer: readable from a signal handler.
    static IN_FLIGHT: std::cell::Cell<(usize, usize, usize)> = const { std::cell::Cell::new((0, 0, 0)) };
}

/// For each target, the NUL-terminated path its aborting input is written to.
static ABORT_PATHS: OnceLock<Vec<std::ffi::CString>> = OnceLock::new();

extern "C" fn on_abort(_: libc::c_int) {
    let (ptr, len, t) = IN_FLIGHT.with(|c| c.get());
    if t == 0 {
        return;
    }
    let Some(path) = ABORT_PATHS.get().and_then(|p| p.get(t - 1)) else { return };
    // SAFETY: only async-signal-safe calls, on a buffer the aborting thread still owns.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644);
        if fd >= 0 {
            libc::write(fd, ptr as *const libc::c_void, len);
            libc::close(fd);
        }
        let msg = b"\nfuzz: the process aborted inside a harness; its input is in ";
        libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
        libc::write(2, path.as_ptr() as *const libc::c_void, path.as_bytes().len());
        libc::write(2, b"\n".as_ptr() as *const libc::c_void, 1);
    }
}

fn install_abort_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let paths = TARGETS
            .iter()
            .map(|(name, _)| {
                let dir = failures_dir(name);
                let _ = std::fs::create_dir_all(&dir);
                std::ffi::CString::new(dir.join("abort-last").to_string_lossy().into_owned()).unwrap_or_default()
            })
            .collect();
        let _ = ABORT_PATHS.set(paths);
        // SAFETY: installs a handler that only makes async-signal-safe calls; glibc's abort()
        // restores the default action and raises again after it returns.
        unsafe {
            libc::signal(libc::SIGABRT, on_abort as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    });
}

// ---- the driver -----------------------------------------------------------------------------

struct Outcome {
    inputs: usize,
    failures: Vec<String>,
}

/// Runs `f` on every input `next` yields until it yields `None`, each under `catch_unwind`,
/// timed, and watched for hangs.
fn drive(target: &str, f: fn(&[u8]), mut next: impl FnMut() -> Option<(String, Vec<u8>)>) -> Outcome {
    let index = TARGETS.iter().position(|(n, _)| *n == target).expect("a known target") + 1;
    let current: Arc<Mutex<Option<(Instant, Vec<u8>)>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (current, stop, target) = (current.clone(), stop.clone(), target.to_string());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let guard = current.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((t0, data)) = guard.as_ref() {
                    if t0.elapsed() > HANG {
                        let path = save_failure(&target, "hang", data);
                        say(&format!("fuzz {target}: an input ran for {HANG:?}; it is in {}", path.display()));
                        std::process::exit(101);
                    }
                }
            }
        })
    };
    let mut out = Outcome { inputs: 0, failures: Vec::new() };
    while let Some((what, data)) = next() {
        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), data.clone()));
        IN_FLIGHT.with(|c| c.set((data.as_ptr() as usize, data.len(), index)));
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data)));
        let took = t0.elapsed();
        IN_FLIGHT.with(|c| c.set((0, 0, 0)));
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        out.inputs += 1;
        let failure = match result {
            Err(_) => Some(("panic", format!("{what} panicked"))),
            Ok(()) if took > SLOW => Some(("slow", format!("{what} took {took:.2?}"))),
            Ok(()) => None,
        };
        if let Some((kind, msg)) = failure {
            let path = save_failure(target, kind, &data);
            out.failures.push(format!("{msg}; input in {}", path.display()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    out
}

fn secs_per_target() -> f64 {
    std::env::var("THAW_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(4.0)
}

fn run_target(target: &str) {
    install_abort_handler();
    let f = thaw_fuzz_targets::harness(target).expect("a known target");
    say(&format!("fuzz {target}: starting"));
    let seeds = corpus(&fuzz_dir().join("seeds").join(target));
    let regressions = corpus(&fuzz_dir().join("regressions").join(target));
    assert!(!seeds.is_empty(), "no seeds in fuzz/seeds/{target}");

    // The corpus first: every regression and every seed.
    let mut replay = regressions.iter().chain(&seeds).map(|(p, b)| (p.display().to_string(), b.clone()));
    let replayed = drive(target, f, || replay.next());

    // Then mutations of them, for a fixed time.
    let pool: Vec<Vec<u8>> = seeds.iter().chain(&regressions).map(|(_, b)| b.clone()).collect();
    let mut rng = Rng::new(fnv(target.as_bytes()));
    let (t0, budget) = (Instant::now(), Duration::from_secs_f64(secs_per_target()));
    let mut n = 0usize;
    let fuzzed = drive(target, f, || {
        (t0.elapsed() < budget).then(|| {
            n += 1;
            (format!("mutation {n} (rng {:016x})", fnv(target.as_bytes())), mutate(&mut rng, &pool))
        })
    });
    say(&format!(
        "fuzz {target}: {} regressions, {} seeds, {} mutated inputs in {:.1} s, {} failures",
        regressions.len(),
        seeds.len(),
        fuzzed.inputs,
        t0.elapsed().as_secs_f64(),
        replayed.failures.len() + fuzzed.failures.len()
    ));
    let failures: Vec<String> = replayed.failures.into_iter().chain(fuzzed.failures).collect();
    assert!(failures.is_empty(), "fuzz {target}: {} failing inputs:\n{}", failures.len(), failures.join("\n"));
}

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_target(stringify!($name));
            }
        )*

        #[test]
        fn every_target_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for (name, _) in TARGETS {
                assert!(tested.contains(name), "target {name} has no test in tests/fuzz.rs");
            }
        }
    };
}

targets!(pickle, torch_checkpoint, safetensors, shard_index, shard_tar, idx, image_decode, job_spec, grpc_core);

/// The seeds are what they claim to be: real files that the readers accept (else mutations would
/// start from garbage and reach nothing deep). The MobileNetV2 head is cut, so it fails late.
#[test]
fn seeds_are_files_the_readers_accept() {
    use thaw_fuzz_targets::parts;
    let seeds = |t: &str| corpus(&fuzz_dir().join("seeds").join(t));
    for (p, b) in seeds("torch_checkpoint") {
        let r = thaw_worker::weights::read_torch_checkpoint_bytes(&p, &b);
        if p.to_string_lossy().contains(".head.") {
            assert!(r.is_err(), "{}", p.display());
        } else {
            assert!(r.is_ok_and(|t| !t.is_empty()), "{}", p.display());
        }
    }
    for (p, b) in seeds("shard_index").into_iter().chain(seeds("shard_tar")) {
        let f = parts(&b, 3);
        let r = thaw_worker::data::shards::ShardIndex::from_bytes(Path::new("/seed"), f[0], f[1]);
        assert!(r.is_ok_and(|i| i.num_samples() > 0), "{}", p.display());
    }
    for (p, b) in seeds("idx") {
        let f = parts(&b, 2);
        let r = thaw_worker::data::idx::IdxDataset::from_bytes(
            thaw_worker::data::idx::Split::Train,
            (Path::new("i"), f[0]),
            (Path::new("l"), f[1]),
        );
        assert!(r.is_ok_and(|d| thaw_worker::data::Dataset::len(&d) > 0), "{}", p.display());
    }
    for (p, b) in seeds("image_decode") {
        assert!(thaw_worker::data::decode_image(&b).is_ok(), "{}", p.display());
    }
    for (p, b) in seeds("job_spec") {
        let text = String::from_utf8(b).expect("UTF-8");
        let r = thaw_coordinator::spec::JobSpec::from_toml(&text, Path::new("/seed"));
        assert!(r.is_ok(), "{}: {:?}", p.display(), r.err());
    }
    for (p, b) in seeds("pickle") {
        if !p.to_string_lossy().contains(".head.") {
            assert!(thaw_worker::weights::pickle::loads(&b).is_ok(), "{}", p.display());
        }
    }
    // The call sequences reach the end of a job's life: a success, a cancel after a regroup, a
    // failure; each example spec is accepted.
    let state = |seed: &str, job: &str| {
        let b = std::fs::read(fuzz_dir().join("seeds/grpc_core").join(seed)).expect("seed");
        let core = thaw_fuzz_targets::grpc_core::replay(&b);
        core.get(job).map(|v| format!("{:?}", v.record.state())).unwrap_or_else(|e| e.to_string())
    };
    assert_eq!(state("life", "j"), "Succeeded");
    assert!(state("failure-regroup-restore", "f").starts_with("no job"), "deleted after its cancel");
    assert_eq!(state("resumed-then-failed", "r"), "Failed");
    for (p, b) in seeds("grpc_core").into_iter().filter(|(p, _)| p.to_string_lossy().contains("submit-example")) {
        assert_eq!(thaw_fuzz_targets::grpc_core::replay(&b).job_count(), 1, "{}", p.display());
    }
    for (p, b) in seeds("safetensors") {
        assert!(thaw_worker::tensor_io::parse_safetensors(&b).is_ok(), "{}", p.display());
    }
}
