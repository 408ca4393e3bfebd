//! Shared build script for every crate that links libtorch: records an rpath to `$LIBTORCH/lib`
//! so that `cargo run` / `cargo test` find `libtorch_cpu.so` without `LD_LIBRARY_PATH`.
//! `LIBTORCH` comes from `.cargo/config.toml` (`[env]`, made absolute by cargo).
//!
//! After `scripts/setup.sh --cuda` (the torch wheel with its CUDA libraries from PyPI) it also:
//! - links `libtorch_cuda.so` whatever `--as-needed` thinks: nothing references it by symbol,
//!   and without it libtorch sees no GPU (tch-rs issues 907, 980);
//! - records an rpath to the NCCL wheel's `lib`, where cudarc's run-time loader finds
//!   `libnccl.so` (the link set-up makes to the wheel's `libnccl.so.2`).
//!
//! The CPU set-up installs the same torch wheel without its CUDA libraries, so the CUDA part is
//! keyed on cuDNN's directory being there, not on `libtorch_cuda.so` (always there).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    let site = Path::new(&libtorch).join("..");
    // site-packages changes when set-up installs or removes the CUDA wheels.
    println!("cargo:rerun-if-changed={}", site.display());
    let nvidia = site.join("nvidia");
    let cuda = nvidia.join("cudnn/lib").is_dir() && Path::new(&libtorch).join("lib/libtorch_cuda.so").is_file();
    if cuda {
        println!("cargo:rustc-link-search=native={libtorch}/lib");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        let nccl = nvidia.join("nccl/lib");
        if nccl.is_dir() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
        }
    }
}
