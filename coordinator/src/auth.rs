//! Who may call the coordinator: bearer tokens with roles for clients, and a credential per job
//! for its workers.
//!
//! - A **tokens file** (`thaw coordinator --tokens FILE`, or the file named by `THAW_TOKENS_FILE`)
//!   holds one token per line: `ROLE TOKEN [NAME] [expires=DATE]`, `#` comments. Roles: `reader`
//!   (status, watch) and `operator` (also submit, cancel, delete). Tokens are at least 16
//!   characters. `DATE` is RFC 3339 (`2027-01-31T00:00:00Z`) or a day (`2027-01-31`, midnight
//!   UTC); a token is refused from then on. Only their SHA-256 is kept in memory, and a presented
//!   token is compared against every entry in constant time.
//! - Clients send `authorization: Bearer TOKEN`; the CLI reads the token from `THAW_TOKEN` or the
//!   file named by `THAW_TOKEN_FILE`, never from its command line (which `ps` shows to everyone).
//! - Each job gets a random **worker credential** at submit, returned to the submitter only. A
//!   worker presents it (`thaw-job-token` metadata; `THAW_JOB_TOKEN` for `thaw worker`) to join;
//!   every later worker call is checked by membership (random worker id, rank, generation).
//!
//! Without a tokens file every call is allowed: that is what `--insecure` (or a loopback-only
//! coordinator, such as `thaw launch`'s) means.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// What a client token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Status and watch.
    Reader,
    /// Everything a reader may do, and submit, cancel, delete.
    Operator,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "reader" => Some(Role::Reader),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
        }
    }
}

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// The metadata key of a worker's job credential.
pub const JOB_TOKEN_HEADER: &str = "thaw-job-token";

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The client tokens a coordinator accepts.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    digest: [u8; 32],
    role: Role,
    name: String,
    expires: Option<time::OffsetDateTime>,
}

fn parse_expiry(s: &str) -> Option<time::OffsetDateTime> {
    let full = if s.len() == 10 { format!("{s}T00:00:00Z") } else { s.to_string() };
    time::OffsetDateTime::parse(&full, &time::format_description::well_known::Rfc3339).ok()
}

impl Tokens {
    /// Parses a tokens file's text; errors name the line.
    pub fn parse(text: &str, origin: &str) -> Result<Tokens, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (role, token) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
            let (mut name, mut expires) = (String::new(), None);
            for w in words {
                match w.strip_prefix("expires=") {
                    Some(d) => {
                        expires = Some(parse_expiry(d).ok_or_else(|| {
                            format!("{origin}:{}: expires=`{d}` is not a date (2027-01-31 or RFC 3339)", i + 1)
                        })?)
                    }
                    None if name.is_empty() => name = w.to_string(),
                    None => return Err(format!("{origin}:{}: unexpected `{w}` after the name", i + 1)),
                }
            }
            let role = Role::parse(role)
                .ok_or_else(|| format!("{origin}:{}: role `{role}` is not `reader` or `operator`", i + 1))?;
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!("{origin}:{}: the token is shorter than {MIN_TOKEN_LEN} characters", i + 1));
            }
            entries.push(Entry {
                digest: digest(token.as_bytes()),
                role,
                name: if name.is_empty() { format!("line {}", i + 1) } else { name },
                expires,
            });
        }
        if entries.is_empty() {
            return Err(format!("{origin}: no token"));
        }
        Ok(Tokens { entries })
    }

    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Tokens::parse(&text, &path.display().to_string())
    }

    /// The role of the bearer token in `meta`, if it is at least `need`; UNAUTHENTICATED without
    /// a known token, PERMISSION_DENIED with a known one of a lesser role.
    pub fn check(&self, meta: &MetadataMap, need: Role) -> Result<Role, Status> {
        let presented = meta
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("a bearer token is required (THAW_TOKEN or THAW_TOKEN_FILE)"))?;
        let d = digest(presented.trim().as_bytes());
        // Every entry is compared, whatever matched, in constant time.
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&d)) {
                found = Some(e);
            }
        }
        let found = match found {
            Some(e) if e.expires.is_some_and(|t| t <= time::OffsetDateTime::now_utc()) => {
                let when = e.expires.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
                return Err(Status::unauthenticated(format!(
                    "token `{}` expired at {}",
                    e.name,
                    when.unwrap_or_default()
                )));
            }
            other => other.map(|e| (e.role, e.name.as_str())),
        };
        match found {
            None => Err(Status::unauthenticated("unknown token")),
            Some((role, name)) if role < need => Err(Status::permission_denied(format!(
                "token `{name}` is a {} token; this call needs {}",
                role.as_str(),
                need.as_str()
            ))),
            Some((role, _)) => Ok(role),
        }
    }
}

/// A new random job credential (256 bits, hex).
pub fn new_job_token() -> String {
    use std::fmt::Write;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source");
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The ring key of a job's `generation`: SHA-256 over a label, the job's ring secret and the
/// generation, so that each generation's ranks prove a key of their own.
pub fn ring_key(job_secret: &str, generation: u32) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"thaw ring key v1\0");
    h.update(job_secret.as_bytes());
    h.update(generation.to_le_bytes());
    h.finalize().to_vec()
}

/// Whether `presented` is `expected`, in constant time.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    bool::from(digest(presented.as_bytes()).ct_eq(&digest(expected.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[test]
    fn roles_and_refusals() {
        let t =
            Tokens::parse("# ops\noperator op-0123456789abcdef alice\nreader rd-0123456789abcdef\n", "tokens").unwrap();
        assert_eq!(t.check(&meta("op-0123456789abcdef"), Role::Operator).unwrap(), Role::Operator);
        assert_eq!(t.check(&meta("rd-0123456789abcdef"), Role::Reader).unwrap(), Role::Reader);
        let s = t.check(&meta("rd-0123456789abcdef"), Role::Operator).unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert!(s.message().contains("token `line 3` is a reader token"), "{}", s.message());
        assert_eq!(
            t.check(&meta("nope-0123456789abcdef"), Role::Reader).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(t.check(&MetadataMap::new(), Role::Reader).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(Tokens::parse("admin x0123456789abcdefg", "f").unwrap_err().contains("f:1: role `admin`"));
        assert!(Tokens::parse("reader short", "f").unwrap_err().contains("shorter than 16"));
        assert!(Tokens::parse("# nothing\n", "f").unwrap_err().contains("no token"));
        let t = Tokens::parse(
            "operator old-0123456789abcdef bob expires=2020-01-01\nreader new-0123456789abcdef carol expires=2999-01-01T00:00:00Z\n",
            "f",
        )
        .unwrap();
        let s = t.check(&meta("old-0123456789abcdef"), Role::Reader).unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains("token `bob` expired at 2020-01-01T00:00:00Z"), "{}", s.message());
        assert_eq!(t.check(&meta("new-0123456789abcdef"), Role::Reader).unwrap(), Role::Reader);
        assert!(Tokens::parse("reader x0123456789abcdefg n expires=soon", "f").unwrap_err().contains("expires=`soon`"));
        let a = new_job_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, new_job_token());
        assert!(same_secret(&a, &a.clone()) && !same_secret(&a, "x"));
    }
}
