//! Transport security of the gRPC services: TLS with client certificates (mutual TLS).
//!
//! A **TLS directory** holds three PEM files, named as a Kubernetes `kubernetes.io/tls` Secret
//! names them (so a mounted Secret is one): `ca.crt` (the cluster CA, which every peer's
//! certificate must chain to), `tls.crt` (this process's certificate chain) and `tls.key` (its
//! private key). `thaw certs init DIR` makes a CA and one such directory each for the coordinator,
//! the workers and the clients ([`init_cluster`]).
//!
//! - The coordinator (`--tls DIR`) serves TLS 1.2/1.3 only and requires a client certificate
//!   signed by the CA on every connection. A plaintext client, or one whose certificate another CA
//!   signed (or that expired), fails the handshake: no request reaches a service. It re-reads the
//!   three files when they change on disk (checked at most once a second, as connections arrive),
//!   so a renewed certificate takes effect without a restart; a broken renewal is logged and the
//!   previous certificate stays in use.
//! - Clients (the CLI, workers) read their directory from `THAW_TLS_DIR` and talk `https://`
//!   coordinator URLs with it; they verify the coordinator's certificate against `ca.crt` and the
//!   URL's host name or IP address (both kinds go into the SANs).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// The files of a TLS directory.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes at once; more connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;
/// The files are checked for changes at most this often.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, String> {
    let p = dir.join(name);
    fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(dir, name)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", dir.join(name).display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", dir.join(name).display()));
    }
    Ok(certs)
}

fn key(dir: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(dir, KEY_FILE)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| format!("{}: not a PEM private key: {e}", dir.join(KEY_FILE).display()))
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(dir, CA_FILE)? {
        roots.add(c).map_err(|e| format!("{}: {e}", dir.join(CA_FILE).display()))?;
    }
    Ok(roots)
}

/// The server side of a TLS directory: requires client certificates from its CA.
pub fn server_config(dir: &Path) -> Result<rustls::ServerConfig, String> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
        .build()
        .map_err(|e| format!("{}: {e}", dir.join(CA_FILE).display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(dir, CERT_FILE)?, key(dir)?)
        .map_err(|e| format!("{}: the certificate and key do not go together: {e}", dir.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The three files' sizes and modification times: what a change on disk changes.
type Stamp = Vec<Option<(u64, SystemTime)>>;

fn stamp(dir: &Path) -> Stamp {
    [CA_FILE, CERT_FILE, KEY_FILE]
        .iter()
        .map(|f| fs::metadata(dir.join(f)).ok().and_then(|m| Some((m.len(), m.modified().ok()?))))
        .collect()
}

/// A coordinator's TLS: the server configuration of a directory, reloaded when the files change.
pub struct ServerTls {
    dir: PathBuf,
    current: Mutex<Current>,
}

struct Current {
    config: Arc<rustls::ServerConfig>,
    stamp: Stamp,
    checked: Instant,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads `dir`; errors name the file and what is wrong with it.
    pub fn load(dir: &Path) -> Result<Arc<ServerTls>, String> {
        let stamp = stamp(dir);
        let config = Arc::new(server_config(dir)?);
        Ok(Arc::new(ServerTls {
            dir: dir.to_path_buf(),
            current: Mutex::new(Current { config, stamp, checked: Instant::now() }),
        }))
    }

    /// The configuration for a new connection: the files' current one.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.checked.elapsed() >= RELOAD_CHECK {
            cur.checked = Instant::now();
            let now = stamp(&self.dir);
            if now != cur.stamp {
                match server_config(&self.dir) {
                    Ok(c) => {
                        tracing::info!(dir = %self.dir.display(), "TLS certificates reloaded");
                        cur.config = Arc::new(c);
                        cur.stamp = now;
                    }
                    // Half-written files (a renewal in progress) fail too: try again next time.
                    Err(e) => tracing::warn!(error = %e, "TLS certificates changed but do not load; keeping the previous ones"),
                }
            }
        }
        cur.config.clone()
    }
}

/// The TLS connections of `listener`: each accepted connection completes its handshake on a task
/// of its own (bounded in time and in number), so a slow or hostile client delays nobody else. A
/// failed handshake (plaintext, an unknown CA, an expired certificate) is logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let (tcp, from) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%from, error = %e, "refused a connection: TLS handshake failed"),
                    Err(_) => tracing::warn!(%from, "refused a connection: no TLS handshake within 10 s"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A client's TLS directory, read when a connection is made (so renewed files are used by the
/// next connection).
#[derive(Clone, Debug)]
pub struct ClientTls {
    dir: PathBuf,
}

impl ClientTls {
    /// Checks that `dir` loads now (errors name the file).
    pub fn new(dir: &Path) -> Result<ClientTls, String> {
        let t = ClientTls { dir: dir.to_path_buf() };
        t.tonic_config()?;
        Ok(t)
    }

    /// `THAW_TLS_DIR`, when set.
    pub fn from_env() -> Result<Option<ClientTls>, String> {
        match std::env::var_os("THAW_TLS_DIR") {
            Some(d) if !d.is_empty() => ClientTls::new(Path::new(&d)).map(Some).map_err(|e| format!("THAW_TLS_DIR: {e}")),
            _ => Ok(None),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration of a tonic channel: the CA to verify the coordinator with, and this
    /// client's certificate.
    pub fn tonic_config(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        let dir = &self.dir;
        // Parsed here so that a bad file is named now, not as a handshake failure later.
        roots(dir)?;
        key(dir)?;
        certs(dir, CERT_FILE)?;
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(dir, CA_FILE)?))
            .identity(tonic::transport::Identity::from_pem(read(dir, CERT_FILE)?, read(dir, KEY_FILE)?)))
    }
}

// ---------------------------------------------------------------------------------------------
// `thaw certs init`

/// What [`init_cluster`] makes, besides the CA.
pub const ROLES: [&str; 3] = ["coordinator", "worker", "client"];

/// Names every coordinator certificate carries besides the ones given: how it is reached on
/// this machine.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o.open(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents.as_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn params(common_name: &str, sans: Vec<String>, days: u32, now: time::OffsetDateTime) -> Result<CertificateParams, String> {
    let mut p = CertificateParams::new(sans).map_err(|e| format!("bad name: {e}"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "thaw");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    // An hour of slack for clocks that are a little behind.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
    Ok(p)
}

/// A CA of its own and certificates signed by it, in memory: what [`init_cluster`] writes, and
/// what tests use to make certificates a cluster should refuse.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
    pub cert_pem: String,
}

impl Authority {
    pub fn new(name: &str, days: u32) -> Result<Authority, String> {
        let mut params = params(name, Vec::new(), days, time::OffsetDateTime::now_utc())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert_pem = params.self_signed(&key).map_err(|e| e.to_string())?.pem();
        Ok(Authority { key_pem: key.serialize_pem(), issuer: Issuer::new(params, key), cert_pem })
    }

    /// An existing CA: its certificate and private key (PEM), as `thaw certs init` wrote them.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("the CA key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| format!("the CA certificate: {e}"))?;
        Ok(Authority { issuer, key_pem: key_pem.to_string(), cert_pem: cert_pem.to_string() })
    }

    /// The CA of a `thaw certs init` directory (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Authority, String> {
        let cert = String::from_utf8(read(dir, CA_FILE)?).map_err(|_| format!("{}/ca.crt is not PEM", dir.display()))?;
        let key = String::from_utf8(read(dir, "ca.key")?).map_err(|_| format!("{}/ca.key is not PEM", dir.display()))?;
        Authority::from_pem(&cert, &key).map_err(|e| format!("{}: {e}", dir.display()))
    }

    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// A certificate for `common_name` with `sans` (DNS names and IP addresses), for servers and
    /// clients both, valid from `start` for `days`: (certificate PEM, key PEM).
    pub fn issue(&self, common_name: &str, sans: &[String], days: u32, start: SystemTime) -> Result<(String, String), String> {
        let mut p = params(common_name, sans.to_vec(), days, time::OffsetDateTime::from(start))?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = p.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes a TLS directory (`ca.crt`, `tls.crt`, `tls.key`) for a certificate of this CA. An
    /// existing directory's files are replaced each in one step (written beside, then renamed),
    /// so a coordinator that reloads them never reads half a file.
    pub fn write_dir(&self, dir: &Path, common_name: &str, sans: &[String], days: u32) -> Result<(), String> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (cert, key) = self.issue(common_name, sans, days, SystemTime::now())?;
        let replace = |name: &str, text: &str, private: bool| -> Result<(), String> {
            let tmp = dir.join(format!(".{name}.new"));
            let _ = fs::remove_file(&tmp);
            if private {
                write_private(&tmp, text)?;
            } else {
                fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
            }
            fs::rename(&tmp, dir.join(name)).map_err(|e| format!("replacing {}: {e}", dir.join(name).display()))
        };
        // The key first: until the certificate follows, the pair does not load and the old one stays.
        replace(KEY_FILE, &key, true)?;
        replace(CA_FILE, &self.cert_pem, false)?;
        replace(CERT_FILE, &cert, false)
    }
}

/// `thaw certs init DIR`: a new CA (`DIR/ca.crt`, `DIR/ca.key`) and a TLS directory each for the
/// coordinator, the workers and the clients (`DIR/coordinator/`, `DIR/worker/`, `DIR/client/`).
/// The coordinator's certificate names `localhost`, `127.0.0.1`, `::1` and every name in `sans`
/// (DNS names, wildcards such as `*.thaw.svc`, IP addresses). Refuses to overwrite an existing CA.
pub fn init_cluster(dir: &Path, sans: &[String], days: u32) -> Result<(), String> {
    if days == 0 {
        return Err("--days 0: certificates must be valid for at least a day".into());
    }
    for s in sans {
        if s.is_empty() || s.contains(char::is_whitespace) || s.contains(',') {
            return Err(format!("--san `{s}` is not a DNS name or an IP address"));
        }
    }
    let ca_key = dir.join("ca.key");
    if ca_key.exists() {
        return Err(format!("{} exists: refusing to replace a cluster's CA (remove the directory first)", ca_key.display()));
    }
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let ca = Authority::new("thaw cluster CA", days.saturating_mul(2))?;
    write_private(&ca_key, &ca.key_pem())?;
    fs::write(dir.join(CA_FILE), &ca.cert_pem).map_err(|e| format!("writing {}: {e}", dir.display()))?;
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    names.extend(sans.iter().cloned());
    for role in ROLES {
        let sans = if role == "coordinator" { names.clone() } else { Vec::new() };
        ca.write_dir(&dir.join(role), &format!("thaw-{role}"), &sans, days)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_loadable_directories_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        init_cluster(&dir, &["thaw-coordinator.thaw.svc".into(), "10.0.0.7".into()], 30).unwrap();
        ServerTls::load(&dir.join("coordinator")).unwrap();
        for role in ["worker", "client"] {
            ClientTls::new(&dir.join(role)).unwrap();
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join("ca.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the CA key is private: {mode:o}");
        }
        let err = init_cluster(&dir, &[], 30).unwrap_err();
        assert!(err.contains("ca.key exists"), "{err}");
        assert!(init_cluster(&tmp.path().join("x"), &["a b".into()], 30).unwrap_err().contains("`a b`"));
        assert!(init_cluster(&tmp.path().join("y"), &[], 0).unwrap_err().contains("--days 0"));
    }

    #[test]
    fn bad_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = ServerTls::load(tmp.path()).unwrap_err();
        assert!(err.contains("ca.crt"), "{err}");
        init_cluster(&tmp.path().join("c"), &[], 1).unwrap();
        let d = tmp.path().join("c/coordinator");
        fs::write(d.join(KEY_FILE), "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n").unwrap();
        let err = ServerTls::load(&d).unwrap_err();
        assert!(err.contains("tls.key"), "{err}");
        let err = ClientTls::new(&d).unwrap_err();
        assert!(err.contains("tls.key"), "{err}");
    }

    #[test]
    fn changed_files_are_reloaded_and_broken_ones_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        init_cluster(&tmp.path().join("c"), &[], 1).unwrap();
        let d = tmp.path().join("c/coordinator");
        let tls = ServerTls::load(&d).unwrap();
        let first = tls.config();
        std::thread::sleep(RELOAD_CHECK);
        assert!(Arc::ptr_eq(&first, &tls.config()), "unchanged files: the same configuration");
        // A renewal: a new certificate from another CA run.
        let ca = Authority::load(&tmp.path().join("c")).unwrap();
        ca.write_dir(&d, "thaw-coordinator", &["localhost".into()], 1).unwrap();
        std::thread::sleep(RELOAD_CHECK);
        let second = tls.config();
        assert!(!Arc::ptr_eq(&first, &second), "renewed files are picked up");
        // A broken write keeps the last good configuration.
        fs::write(d.join(CERT_FILE), "garbage").unwrap();
        std::thread::sleep(RELOAD_CHECK);
        assert!(Arc::ptr_eq(&second, &tls.config()));
    }
}
