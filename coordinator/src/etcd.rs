//! The highly available control plane on etcd: [`EtcdStore`] (the jobs under `<prefix>/jobs/<id>`,
//! every write fenced by the writer's leadership) and [`campaign`] (one active coordinator among
//! several, elected on a lease; the others stand by and say who leads).
//!
//! Leadership is etcd's election (`<prefix>/leader`) on a lease of `lease_secs`. The leader key's
//! create revision is the **fence**: every write is a transaction that compares it, so a deposed
//! coordinator (paused past its lease, cut off from etcd) can change nothing once another one
//! won. Before that, it stops serving by its own clock: a leader serves only while the lease's
//! last confirmed renewal plus its TTL lies ahead ([`Leadership::refusal`]); a process woken from
//! SIGSTOP finds that time passed and refuses everything until it learns, from etcd, that it lost.
//!
//! The lease keep-alive stream ends whenever the etcd member it runs through goes away (a leader
//! change, a member killed); it is opened again on the same lease as long as the lease lives. A
//! lease that etcd reports gone (TTL 0, or "lease not found") means leadership is lost: the
//! coordinator steps down, says so in its log, drops its jobs from memory and campaigns again.
//!
//! No watches are used: a standby asks etcd for the current leader every second (to point clients
//! at it), and a new leader reads the jobs once when it takes over. Values are JSON, checked
//! against [`MAX_VALUE_BYTES`] (under etcd's default 1.5 MiB request limit) before any write.
//!
//! The [`crate::store::StateStore`] trait is synchronous (the core calls it under its lock), so
//! the store runs etcd calls on its own small runtime and waits for each with a deadline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use etcd_client::Client;
use etcd_client::{Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use crate::store::{decode, encode, validate_job_id, StateStore, StoreError, StoredJob};

/// The largest job value written (etcd's default request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Deadline of one etcd call from the store.
const CALL_DEADLINE: Duration = Duration::from_secs(3);

/// Where and how to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix of this control plane, e.g. `/thaw` (no trailing slash).
    pub prefix: String,
    /// TTL of the leadership lease, in seconds: how long a dead leader holds the election.
    pub lease_secs: i64,
}

impl EtcdOptions {
    /// Parses `etcd://h1:2379,h2:2379` with `prefix`.
    pub fn parse(url: &str, prefix: &str, lease_secs: i64) -> Result<EtcdOptions, String> {
        let list = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("`{url}`: an etcd store is etcd://HOST:PORT[,HOST:PORT...]"))?;
        let endpoints: Vec<String> =
            list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if endpoints.is_empty() {
            return Err(format!("`{url}`: no etcd endpoint"));
        }
        if let Some(bad) = endpoints.iter().find(|e| !e.contains(':')) {
            return Err(format!("`{url}`: endpoint `{bad}` has no port"));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.starts_with('/') {
            return Err(format!("--prefix `{prefix}`: must start with `/`"));
        }
        if !(1..=3600).contains(&lease_secs) {
            return Err(format!("--lease-secs {lease_secs}: must be between 1 and 3600"));
        }
        Ok(EtcdOptions { endpoints, prefix: prefix.to_string(), lease_secs })
    }

    fn jobs_prefix(&self) -> String {
        format!("{}/jobs/", self.prefix)
    }

    fn election(&self) -> String {
        format!("{}/leader", self.prefix)
    }
}

/// Connects to etcd with HTTP/2 keepalive and, when given, a deadline on every call (not for a
/// campaign, which blocks for as long as another coordinator leads). The client's connection
/// tasks run on the runtime this is called from: a client must be used on the runtime that
/// made it, or a blocked runtime stalls it.
pub async fn connect(opts: &EtcdOptions, call_deadline: Option<Duration>) -> Result<Client, etcd_client::Error> {
    let mut o = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if let Some(d) = call_deadline {
        o = o.with_timeout(d);
    }
    Client::connect(&opts.endpoints, Some(o)).await
}

/// The leader key whose create revision every write compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub rev: i64,
}

#[derive(Clone, Debug)]
enum Lead {
    Standby { leader: Option<String> },
    Leader { fence: Fence, valid_until: Instant },
}

/// This coordinator's standing in the election, shared by the store (fencing), the services
/// (whether to answer) and the campaign (which changes it).
#[derive(Debug)]
pub struct Leadership {
    lead: Mutex<Lead>,
    me: String,
}

impl Leadership {
    /// A standby that advertises `me` (the URL clients use to reach it).
    pub fn new(me: &str) -> Arc<Leadership> {
        Arc::new(Leadership { lead: Mutex::new(Lead::Standby { leader: None }), me: me.to_string() })
    }

    fn lead(&self) -> std::sync::MutexGuard<'_, Lead> {
        self.lead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `None` while this coordinator leads and its lease is valid by its own clock; otherwise
    /// why it must not answer, naming the leader when it knows it.
    pub fn refusal(&self) -> Option<(String, Option<String>)> {
        match &*self.lead() {
            Lead::Leader { valid_until, .. } if Instant::now() < *valid_until => None,
            Lead::Leader { .. } => {
                Some(("this coordinator's leadership lease ran out; it is checking with etcd".into(), None))
            }
            Lead::Standby { leader: Some(l) } if *l != self.me => {
                Some((format!("standby coordinator; the leader is {l}"), Some(l.clone())))
            }
            Lead::Standby { .. } => Some(("standby coordinator; no leader is elected yet".into(), None)),
        }
    }

    /// The fence of a valid leadership.
    pub fn fence(&self) -> Result<Fence, StoreError> {
        match &*self.lead() {
            Lead::Leader { fence, valid_until } if Instant::now() < *valid_until => Ok(fence.clone()),
            Lead::Leader { .. } => Err(StoreError::Fenced { reason: "the leadership lease ran out".into() }),
            Lead::Standby { .. } => Err(StoreError::Fenced { reason: "this coordinator is a standby".into() }),
        }
    }

    pub fn is_leader(&self) -> bool {
        matches!(&*self.lead(), Lead::Leader { .. })
    }

    /// This coordinator won the election with `fence`, its lease good until `valid_until`
    /// ([`campaign`] calls it; a test of fencing calls it with a fence etcd has moved past).
    pub fn elected(&self, fence: Fence, valid_until: Instant) {
        *self.lead() = Lead::Leader { fence, valid_until };
    }

    /// A renewal etcd confirmed: the lease is good until `until`.
    fn renewed(&self, until: Instant) {
        if let Lead::Leader { valid_until, .. } = &mut *self.lead() {
            *valid_until = until;
        }
    }

    fn stand_by(&self, leader: Option<String>) {
        *self.lead() = Lead::Standby { leader };
    }

    fn saw_leader(&self, leader: Option<String>) {
        if let Lead::Standby { leader: l } = &mut *self.lead() {
            *l = leader;
        }
    }
}

/// The jobs in etcd, written only under a valid [`Fence`]. Its client lives on its own runtime:
/// the core calls it under a lock, and must never wait on a runtime that waits on that lock.
pub struct EtcdStore {
    client: Client,
    opts: EtcdOptions,
    lead: Arc<Leadership>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropped from async code (a coordinator stepping down): never block there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl EtcdStore {
    /// Connects a store to etcd, fenced by `lead`. Callable from async code or not.
    pub fn open(opts: EtcdOptions, lead: Arc<Leadership>) -> Result<EtcdStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("thaw-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable { what: "start the etcd runtime".into(), reason: e.to_string() })?;
        let (tx, rx) = std::sync::mpsc::channel();
        let o = opts.clone();
        rt.spawn(async move {
            let _ = tx.send(connect(&o, Some(CALL_DEADLINE)).await);
        });
        let unavailable = |reason: String| StoreError::Unavailable { what: "connect to etcd".into(), reason };
        let client = match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                rt.shutdown_background();
                return Err(unavailable(e.to_string()));
            }
            Err(_) => {
                rt.shutdown_background();
                return Err(unavailable("no answer within 5s".into()));
            }
        };
        Ok(EtcdStore { client, opts, lead, rt: Some(rt) })
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.opts.jobs_prefix())
    }

    /// Runs `fut` on the store's runtime and waits for it (from any thread, async or not).
    fn call<T: Send + 'static>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let Some(rt) = self.rt.as_ref() else {
            return Err(StoreError::Unavailable { what: what.to_string(), reason: "the store is closed".into() });
        };
        rt.spawn(async move {
            let r = tokio::time::timeout(CALL_DEADLINE, fut).await;
            let _ = tx.send(r);
        });
        let unavailable = |reason: String| StoreError::Unavailable { what: what.to_string(), reason };
        match rx.recv_timeout(CALL_DEADLINE + Duration::from_millis(500)) {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(unavailable(e.to_string())),
            Ok(Err(_)) | Err(_) => Err(unavailable(format!("no answer within {CALL_DEADLINE:?}"))),
        }
    }

    /// A write under the fence; a failed comparison deposes this coordinator.
    fn fenced(&self, what: &str, op: TxnOp) -> Result<(), StoreError> {
        let fence = self.lead.fence()?;
        let txn =
            Txn::new().when([Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.rev)]).and_then([op]);
        let mut kv = self.client.kv_client();
        let r = self.call(what, async move { kv.txn(txn).await })?;
        if r.succeeded() {
            return Ok(());
        }
        let reason = "the leader key changed: another coordinator won the election".to_string();
        tracing::error!(reason, "write fenced off; stepping down");
        self.lead.stand_by(None);
        Err(StoreError::Fenced { reason })
    }
}

impl StateStore for EtcdStore {
    fn put_job(&self, rec: &StoredJob) -> Result<(), StoreError> {
        let (id, bytes) = encode(rec)?;
        if bytes.len() > MAX_VALUE_BYTES {
            return Err(StoreError::TooLarge { id, bytes: bytes.len(), max: MAX_VALUE_BYTES });
        }
        self.fenced(&format!("write job `{id}`"), TxnOp::put(self.key(&id), bytes, None))
    }

    fn delete_job(&self, id: &str) -> Result<(), StoreError> {
        validate_job_id(id)?;
        self.fenced(&format!("delete job `{id}`"), TxnOp::delete(self.key(id), None))
    }

    fn load_all(&self) -> Result<Vec<StoredJob>, StoreError> {
        let prefix = self.opts.jobs_prefix();
        let mut kv = self.client.kv_client();
        let p = prefix.clone();
        let r = self.call("read the jobs", async move { kv.get(p, Some(GetOptions::new().with_prefix())).await })?;
        let mut out = Vec::new();
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let id = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            match decode(&id, kv.value()) {
                Ok(job) => out.push(job),
                Err(reason) => tracing::warn!(job = %id, %reason, "skipping a stored job that does not parse"),
            }
        }
        out.sort_by(|a, b| a.record.job_id().cmp(b.record.job_id()));
        Ok(out)
    }
}

/// What the campaign tells its owner.
pub trait Takeover: Send + Sync {
    /// This coordinator was elected: load the jobs and serve.
    fn elected(&self) -> Result<(), String>;
    /// It lost the election it held: drop the jobs from memory, stop serving.
    fn deposed(&self, why: &str);
}

/// Campaigns for leadership forever: standby (pointing clients at the leader) until elected,
/// leader until the lease is lost, then standby again. Returns only if etcd cannot be reached to
/// start with.
///
/// Run it on a runtime of its own: the lease must be renewed however busy the services are.
pub async fn campaign(opts: EtcdOptions, lead: Arc<Leadership>, owner: Arc<dyn Takeover>) -> Result<(), String> {
    let mut client = loop {
        match connect(&opts, None).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, endpoints = ?opts.endpoints, "cannot reach etcd; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let ttl = Duration::from_secs(opts.lease_secs as u64);
    loop {
        let lease = match tokio::time::timeout(CALL_DEADLINE, client.lease_grant(opts.lease_secs, None)).await {
            Ok(Ok(l)) => l.id(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot get a lease from etcd; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => {
                let e = "no answer in time";
                tracing::warn!(error = %e, "cannot get a lease from etcd; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // The lease lives while this task keeps it alive; it ends when etcd says the lease is gone.
        let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(None::<String>);
        let keeper = tokio::spawn(keep_alive(client.clone(), lease, ttl, lead.clone(), lost_tx));
        // Standby: learn who leads, for clients, until the campaign returns.
        let observer = {
            let (mut c, name, lead) = (client.clone(), opts.election(), lead.clone());
            tokio::spawn(async move {
                loop {
                    let answer = tokio::time::timeout(CALL_DEADLINE, c.leader(name.clone())).await;
                    let leader = answer
                        .ok()
                        .and_then(Result::ok)
                        .and_then(|r| r.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()));
                    lead.saw_leader(leader);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let started = Instant::now();
        let won = tokio::select! {
            r = client.campaign(opts.election(), lead.me.clone(), lease) => r.map_err(|e| e.to_string()),
            _ = lost_rx.changed() => Err(lost_rx.borrow().clone().unwrap_or_default()),
        };
        observer.abort();
        let fence = match won.as_ref().ok().and_then(|r| r.leader()) {
            Some(k) => Fence { key: k.key().to_vec(), rev: k.rev() },
            None => {
                tracing::warn!(error = ?won.err(), "campaign ended without leadership; campaigning again");
                keeper.abort();
                let _ = tokio::time::timeout(CALL_DEADLINE, client.lease_revoke(lease)).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // The lease was renewed at most a third of its TTL ago: half of it is a safe start.
        lead.elected(fence.clone(), Instant::now() + ttl / 2);
        tracing::debug!(waited = ?started.elapsed(), "campaign won");
        tracing::info!(rev = fence.rev, lease, "elected: this coordinator leads");
        if let Err(e) = owner.elected() {
            tracing::error!(error = %e, "cannot take over; resigning");
            lead.stand_by(None);
            owner.deposed(&e);
            keeper.abort();
            let _ = tokio::time::timeout(CALL_DEADLINE, client.lease_revoke(lease)).await;
            continue;
        }
        // Lead until the lease is lost (or a write found itself fenced off).
        let why = loop {
            tokio::select! {
                _ = lost_rx.changed() => break lost_rx.borrow().clone().unwrap_or_else(|| "the lease was lost".into()),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if !lead.is_leader() {
                        break "a write was fenced off: another coordinator leads".into();
                    }
                }
            }
        };
        keeper.abort();
        tracing::warn!(reason = %why, "lost leadership; stepping down to standby");
        lead.stand_by(None);
        owner.deposed(&why);
        let _ = tokio::time::timeout(CALL_DEADLINE, client.lease_revoke(lease)).await;
    }
}

/// Keeps `lease` alive at a third of its TTL, re-opening the keep-alive stream whenever it ends
/// (an etcd member went away); confirms each renewal to `lead`; reports on `lost` when etcd says
/// the lease is gone.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    lead: Arc<Leadership>,
    lost: tokio::sync::watch::Sender<Option<String>>,
) {
    let every = ttl / 3;
    loop {
        let opened = tokio::time::timeout(CALL_DEADLINE, client.lease_keep_alive(lease)).await;
        let (mut keeper, mut stream) =
            match opened.unwrap_or_else(|_| Err(etcd_client::Error::InvalidArgs("no answer in time".into()))) {
                Ok(pair) => pair,
                Err(e) => {
                    if e.to_string().contains("lease not found") {
                        let _ = lost.send(Some("etcd no longer has this coordinator's lease".into()));
                        return;
                    }
                    tracing::warn!(error = %e, "cannot open the lease keep-alive; retrying");
                    tokio::time::sleep(every.min(Duration::from_millis(500))).await;
                    continue;
                }
            };
        loop {
            let sent = Instant::now();
            if let Err(e) = keeper.keep_alive().await {
                tracing::warn!(error = %e, "lease keep-alive failed; re-opening the stream");
                break;
            }
            match tokio::time::timeout(every.max(Duration::from_millis(500)), stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => lead.renewed(sent + Duration::from_secs(r.ttl() as u64).min(ttl)),
                Ok(Ok(Some(_))) => {
                    let _ = lost.send(Some("the lease expired before it was renewed".into()));
                    return;
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    tracing::warn!("the lease keep-alive stream ended (an etcd member went away); re-opening it");
                    break;
                }
                Err(_) => {
                    tracing::warn!("no keep-alive answer in time; re-opening the stream");
                    break;
                }
            }
            tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
        }
    }
}
