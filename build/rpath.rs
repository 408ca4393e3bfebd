//! Shared build script for every crate that links libtorch: records an rpath to `$LIBTORCH/lib`
//! so that `cargo run` / `cargo test` find `libtorch_cpu.so` without `LD_LIBRARY_PATH`.
//! `LIBTORCH` comes from `.cargo/config.toml` (`[env]`, made absolute by cargo).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
