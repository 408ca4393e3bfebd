//! How clients (the CLI, workers) reach the coordinator when there are several: `--coordinator`
//! (or `THAW_COORDINATOR`) takes a comma-separated list. A client talks to one of them; when it
//! is a standby, its UNAVAILABLE answer names the leader in the `thaw-leader` metadata and the
//! client moves there; when it cannot be reached, the client moves to the next address. Behind a
//! Kubernetes Service that routes only to the ready (leading) coordinator, the list is that one
//! Service URL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use thaw_proto::v1::jobs_client::JobsClient;
use thaw_proto::v1::workers_client::WorkersClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::auth::JOB_TOKEN_HEADER;
use crate::tls::ClientTls;
use crate::service::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, LEADER_HEADER};

/// What a client presents: its TLS directory (`THAW_TLS_DIR`, for `https://` coordinators), and
/// on every call its bearer token (`THAW_TOKEN`, or the file named by `THAW_TOKEN_FILE`) and, for
/// a worker, its job's credential (`THAW_JOB_TOKEN` or `THAW_JOB_TOKEN_FILE`). Never taken from
/// the command line.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
    job: Option<MetadataValue<Ascii>>,
    tls: Option<ClientTls>,
}

impl Credentials {
    /// From the environment; errors name the variable or the file.
    pub fn from_env() -> Result<Credentials, String> {
        let token = match (std::env::var("THAW_TOKEN").ok(), std::env::var("THAW_TOKEN_FILE").ok()) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(
                std::fs::read_to_string(&path).map_err(|e| format!("THAW_TOKEN_FILE {path}: {e}"))?.trim().to_string(),
            ),
            (None, None) => None,
        };
        let value = |what: &str, v: String| -> Result<MetadataValue<Ascii>, String> {
            v.parse().map_err(|_| format!("{what} is not a valid header value"))
        };
        Ok(Credentials {
            bearer: token.filter(|t| !t.is_empty()).map(|t| value("THAW_TOKEN", format!("Bearer {t}"))).transpose()?,
            job: match (std::env::var("THAW_JOB_TOKEN").ok(), std::env::var("THAW_JOB_TOKEN_FILE").ok()) {
                (Some(t), _) => Some(t),
                (None, Some(path)) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| format!("THAW_JOB_TOKEN_FILE {path}: {e}"))?
                        .trim()
                        .to_string(),
                ),
                (None, None) => None,
            }
            .filter(|t| !t.is_empty())
            .map(|t| value("THAW_JOB_TOKEN", t))
            .transpose()?,
            tls: ClientTls::from_env()?,
        })
    }

    /// These credentials with another TLS directory.
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// These credentials with another bearer token.
    pub fn with_token(mut self, token: &str) -> Result<Self, String> {
        self.bearer = Some(format!("Bearer {token}").parse().map_err(|_| "the token is not a valid header value")?);
        Ok(self)
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(b) = &self.bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        if let Some(j) = &self.job {
            req.metadata_mut().insert(JOB_TOKEN_HEADER, j.clone());
        }
        Ok(req)
    }
}

/// A status and the chain of errors under it (a transport failure's cause is in the chain, not in
/// the message).
pub fn describe(s: &Status) -> String {
    let mut out = s.message().to_string();
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Whether `s` is a connection the server closed during or right after the TLS handshake (TLS 1.3
/// clients learn that their certificate was refused only then), as opposed to an answer or an
/// unreachable address.
pub fn is_tls_refusal(s: &Status) -> bool {
    let d = describe(s).to_lowercase();
    std::error::Error::source(s).is_some()
        && ["certificate", "tls", "handshake", "alert"].iter().any(|w| d.contains(w))
}

/// The jobs API as a client calls it (with its credentials).
pub type JobsApi = JobsClient<InterceptedService<Channel, Credentials>>;
/// The workers API as a worker calls it (with its job's credential).
pub type WorkersApi = WorkersClient<InterceptedService<Channel, Credentials>>;

/// The coordinators a client may talk to, and the one it talks to now.
#[derive(Debug)]
pub struct Coordinators {
    urls: Vec<String>,
    current: Mutex<(String, Channel)>,
    credentials: Credentials,
}

fn channel(url: &str, tls: Option<&ClientTls>) -> Result<Channel, String> {
    let mut endpoint =
        Endpoint::from_shared(url.to_string()).map_err(|e| format!("bad coordinator url `{url}`: {e}"))?;
    match (url.starts_with("https://"), tls) {
        (true, Some(t)) => {
            endpoint = endpoint.tls_config(t.tonic_config()?).map_err(|e| format!("TLS for `{url}`: {e}"))?;
        }
        (true, None) => {
            return Err(format!(
                "`{url}` is a TLS coordinator: set THAW_TLS_DIR to a directory with ca.crt, tls.crt and tls.key \
                 (`thaw certs init` makes one)"
            ))
        }
        (false, Some(t)) => {
            return Err(format!(
                "THAW_TLS_DIR ({}) is set but `{url}` is plaintext: use https://",
                t.dir().display()
            ))
        }
        (false, None) => {}
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

impl Coordinators {
    /// `http://a:7070,http://b:7070`: every URL is checked; the first is used first. Calls carry
    /// the credentials of the environment ([`Credentials::from_env`]).
    pub fn parse(list: &str) -> Result<Arc<Coordinators>, String> {
        Self::with_credentials(list, Credentials::from_env()?)
    }

    pub fn with_credentials(list: &str, credentials: Credentials) -> Result<Arc<Coordinators>, String> {
        let urls: Vec<String> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        let first = urls.first().ok_or_else(|| format!("`{list}`: no coordinator url"))?;
        for u in &urls {
            channel(u, credentials.tls.as_ref())?;
        }
        let ch = channel(first, credentials.tls.as_ref())?;
        Ok(Arc::new(Coordinators { current: Mutex::new((first.clone(), ch)), urls, credentials }))
    }

    fn current(&self) -> std::sync::MutexGuard<'_, (String, Channel)> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL talked to now.
    pub fn url(&self) -> String {
        self.current().0.clone()
    }

    /// Every URL given, in order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn jobs(&self) -> JobsApi {
        JobsClient::with_interceptor(self.current().1.clone(), self.credentials.clone())
            .max_decoding_message_size(thaw_proto::MAX_MESSAGE_BYTES)
    }

    pub fn workers(&self) -> WorkersApi {
        WorkersClient::with_interceptor(self.current().1.clone(), self.credentials.clone())
            .max_decoding_message_size(thaw_proto::MAX_MESSAGE_BYTES)
    }

    /// After a failed call: follow a standby's pointer to the leader, or move on to the next
    /// address when this one gave no answer. Returns whether the target changed.
    pub fn after_error(&self, s: &Status) -> bool {
        if s.code() != tonic::Code::Unavailable
            && s.code() != tonic::Code::DeadlineExceeded
            && s.code() != tonic::Code::Unknown
        {
            return false;
        }
        let mut cur = self.current();
        let leader = s.metadata().get(LEADER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let next = match leader {
            Some(l) if l != cur.0 => l,
            Some(_) => return false,
            None if self.urls.len() > 1 => {
                let i = self.urls.iter().position(|u| *u == cur.0).map_or(0, |i| (i + 1) % self.urls.len());
                self.urls[i].clone()
            }
            None => return false,
        };
        match channel(&next, self.credentials.tls.as_ref()) {
            Ok(ch) => {
                tracing::info!(from = %cur.0, to = %next, "following the coordinator");
                *cur = (next, ch);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "a standby named a leader url that does not parse");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follows_the_leader_named_by_a_standby_and_rotates_when_unreachable() {
        let c =
            Coordinators::with_credentials("http://127.0.0.1:1, http://127.0.0.1:2", Credentials::default()).unwrap();
        assert_eq!(c.url(), "http://127.0.0.1:1");
        assert!(!c.after_error(&Status::invalid_argument("bad spec")), "an answer is not an outage");
        assert!(c.after_error(&Status::unavailable("connection refused")));
        assert_eq!(c.url(), "http://127.0.0.1:2");
        let mut s = Status::unavailable("standby coordinator; the leader is http://127.0.0.1:3");
        s.metadata_mut().insert(LEADER_HEADER, "http://127.0.0.1:3".parse().unwrap());
        assert!(c.after_error(&s));
        assert_eq!(c.url(), "http://127.0.0.1:3");
        assert!(c.after_error(&Status::unavailable("down")));
        assert_eq!(c.url(), "http://127.0.0.1:1", "an unlisted leader that went away: back to the list");
        assert!(Coordinators::with_credentials(" , ", Credentials::default()).is_err());
        assert!(Coordinators::with_credentials("not a url", Credentials::default()).unwrap_err().contains("not a url"));
    }
}
