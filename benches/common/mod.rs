//! Helpers shared by the benches (`mod common;` in each).

use std::path::PathBuf;
use std::process::Command;

/// The Python of the PyTorch baselines: full torch==2.13.0 and torchvision==0.28.0 in
/// `.thaw/bench-venv` (about 4.7 GB), installed on first use. `None` (after saying why) when the
/// install fails, so a bench can report thaw's side alone.
pub fn baseline_python() -> Option<PathBuf> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = repo.join(".thaw/bench-venv");
    let py = venv.join("bin/python");
    let marker = venv.join(".thaw-torch-2.13.0-torchvision-0.28.0");
    if !marker.exists() {
        eprintln!("installing the PyTorch baseline (torch==2.13.0, torchvision==0.28.0) into {}", venv.display());
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success())
            && Command::new(&py)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "torch==2.13.0", "numpy"])
                .status()
                .is_ok_and(|s| s.success())
            && Command::new(&py)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-deps",
                    "torchvision==0.28.0",
                    "pillow",
                ])
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("could not install the PyTorch baseline; reporting thaw alone");
            return None;
        }
        let _ = std::fs::write(&marker, "");
    }
    Some(py)
}
