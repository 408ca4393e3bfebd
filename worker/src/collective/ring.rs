//! The CPU engine: a ring of TCP connections and the bandwidth-optimal ring all-reduce.
//!
//! Rank `r` of `n` holds two connections: one it dialed to rank `r+1` ("next", it only writes
//! there) and one it accepted from rank `r-1` ("prev", it only reads there). All-reduce cuts the
//! buffer into `n` chunks: `n-1` reduce-scatter steps (send a chunk, receive another and add it)
//! leave rank `r` with the complete sum of chunk `r+1`, then `n-1` all-gather steps pass the
//! finished chunks around. Every rank sends and receives `2(n-1)/n` of the buffer whatever `n` is,
//! which is optimal. Chunks are cut into segments ([`RingOptions::segment_bytes`]), and a segment is
//! sent on as soon as it has been received and reduced, ahead of the rank's own data, while it is
//! still in cache; so consecutive steps overlap. A helper thread writes while the calling thread
//! reads and adds, so both directions of every link are busy at once and no buffer size can
//! deadlock. Reduced data is read in cache-sized pieces into a scratch buffer and added at once;
//! all-gather and broadcast data are read straight into the caller's buffer, and everything is sent
//! straight from it: no copies besides the kernel's. The mean's division happens once, by the rank
//! that completes a chunk, so every rank receives the same bits.
//!
//! Same-host links: when the ring forms, a rank offers its next neighbour a shared-memory pipe
//! (`shm.rs`); if the neighbour can map it (same host), the data of that link flows through it and
//! the TCP connection stays open only to tell whether the neighbour lives. The frames are the same
//! on both transports. `RingOptions::shm` (default: on unless `THAW_RING_SHM=0`) turns this off.
//!
//! Authentication: every link's handshake is a mutual HMAC-SHA256 challenge-response over the
//! group's ring secret, which the coordinator hands each rank with its assignment (over the
//! authenticated control plane). The acceptor drops a connection that does not prove the secret
//! within [`AUTH_WINDOW`] (a port scan, a rogue or stale process) and goes on accepting, so strangers
//! can neither join a ring nor stop one forming; the dialer refuses a listener that cannot prove
//! it. The payload after the handshake is neither encrypted nor MACed: an attacker on the network
//! path could still read or alter gradients (see the README's threat model).
//!
//! Wire format, little-endian: when the ring forms, the dialer sends a 32-byte hello (magic, rank,
//! world size, segment size) and a 32-byte nonce; the acceptor answers its own hello, nonce and tag;
//! the dialer answers its tag (each tag covers both hellos and both nonces, under a label for its
//! side). A peer that proves the secret but is set up differently is rejected at once, naming the
//! difference. Then the dialer's 256-byte shared-memory offer
//! (empty when it has none) with the acceptor's 8-byte answer; then per operation a START frame (operation,
//! length, root, call number) that the receiver checks against its own call, DATA frames (step,
//! segment and byte length, then the raw `f32` bytes; their order depends on timing, each is filed
//! by its tag and checked to be expected once) and, when a rank fails, an ABORT frame (which rank
//! failed, who saw it, why) that every rank forwards, so that ranks far from a failure name the
//! culprit too.
//!
//! Never: runs on an async runtime; blocks past its deadline (every read and write carries a socket
//! timeout derived from it); returns `Ok` with partial data; runs an operation on a ring that failed
//! an earlier one (it closes its connections at the first failure, after sending its abort).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use super::shm;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Call;
use super::{AbortReason, Collective, CollectiveError, Operation};

// The wire format is little-endian `f32`, read and written in place; a big-endian build would need
// byte swaps on both paths.
const _: () = assert!(cfg!(target_endian = "little"), "the ring's wire format is little-endian f32");

/// Default bytes per pipelined segment.
pub const DEFAULT_SEGMENT_BYTES: usize = 1 << 20;

/// Elements per read when adding received data: small enough to stay in L2 between the read and
/// the addition.
const SCRATCH_ELEMS: usize = 64 << 10;

/// A socket timeout is refreshed at most this often (a system call per read would cost more than
/// the read); a blocking call may therefore outlive the deadline by at most this much.
const REARM_EVERY: Duration = Duration::from_millis(2);

const MAX_DIAL_BACKOFF: Duration = Duration::from_millis(250);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_millis(20);

const MAGIC: [u8; 8] = *b"THAWRNG2";
const HELLO_BYTES: usize = 32;
/// Bytes of a handshake nonce and of an HMAC-SHA256 tag.
const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 32;
/// How long an accepted connection has to prove itself before it is dropped and the rank accepts
/// again: a port scanner or a stuck stranger delays the ring by at most this much.
const AUTH_WINDOW: Duration = Duration::from_secs(2);
const DIALER_LABEL: &[u8] = b"thaw ring v2: dialer";
const ACCEPTOR_LABEL: &[u8] = b"thaw ring v2: acceptor";
const FRAME_BYTES: usize = 32;
const KIND_START: u32 = u32::from_le_bytes(*b"STRT");
const KIND_DATA: u32 = u32::from_le_bytes(*b"DATA");
const KIND_ABORT: u32 = u32::from_le_bytes(*b"ABRT");

/// Settings of a ring; every rank must use the same ones (checked by the handshake).
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// Deadline of forming the ring, and of each operation.
    pub timeout: Duration,
    /// Bytes per pipelined segment: a positive multiple of 4.
    pub segment_bytes: usize,
    /// Whether neighbours on the same host may use a shared-memory pipe instead of TCP for data
    /// (each link uses it only if both ends allow it). Default: yes, unless `THAW_RING_SHM=0`.
    pub shm: bool,
    /// The group's ring secret (from the coordinator's assignment): each link's handshake is an
    /// HMAC-SHA256 challenge-response over it, both ways. Empty authenticates nothing, but the
    /// handshake is the same (strangers that do not speak it are still dropped).
    pub secret: Vec<u8>,
}

impl RingOptions {
    pub fn new(timeout: Duration) -> Self {
        RingOptions { timeout, segment_bytes: DEFAULT_SEGMENT_BYTES, shm: shm_enabled_by_env(), secret: Vec::new() }
    }

    pub fn with_secret(mut self, secret: &[u8]) -> Self {
        self.secret = secret.to_vec();
        self
    }
}

#[cfg(target_os = "linux")]
fn shm_enabled_by_env() -> bool {
    shm::enabled_by_env()
}

#[cfg(not(target_os = "linux"))]
fn shm_enabled_by_env() -> bool {
    false
}

/// A [`Collective`] over TCP between CPU processes; see the module documentation.
pub struct RingCollective {
    ring: Ring,
    /// `None` for a world of one.
    links: Option<Links>,
    /// Number of the last operation; both ends of a link must agree on it.
    seq: u64,
    /// The error that broke the ring, if one did.
    broken: Option<String>,
    scratch: Vec<f32>,
}

/// Who this rank is and whom it talks to; shared by both threads of an operation.
struct Ring {
    rank: usize,
    world: usize,
    peers: Vec<SocketAddr>,
    timeout: Duration,
    segment_bytes: usize,
    shm: bool,
    secret: Vec<u8>,
}

struct Links {
    next: Link,
    prev: Link,
}

/// One direction of a ring link: where this rank writes to next, or reads from prev.
enum Link {
    Tcp(TcpStream),
    #[cfg(target_os = "linux")]
    Shm(shm::Pipe),
}

impl fmt::Debug for RingCollective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingCollective")
            .field("rank", &self.ring.rank)
            .field("world_size", &self.ring.world)
            .field("peers", &self.ring.peers)
            .field("timeout", &self.ring.timeout)
            .field("segment_bytes", &self.ring.segment_bytes)
            .field("transports", &self.transports())
            .field("calls", &self.seq)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl RingCollective {
    /// Forms the ring with default options: see [`RingCollective::connect_with`].
    pub fn connect(
        rank: usize,
        world_size: usize,
        listener: TcpListener,
        peers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        Self::connect_with(rank, world_size, listener, peers, RingOptions::new(timeout))
    }

    /// Forms the ring: dials rank `rank+1` at `peers[rank+1]` (retrying with backoff while it is not
    /// listening yet, since processes start at different times) and accepts one connection, from rank
    /// `rank-1`, on `listener` (bound by the caller to `peers[rank]`; closed when this returns). Both
    /// connections are checked by a handshake. Fails after `options.timeout` naming the missing rank.
    pub fn connect_with(
        rank: usize,
        world_size: usize,
        listener: TcpListener,
        peers: &[SocketAddr],
        options: RingOptions,
    ) -> Result<Self, CollectiveError> {
        let invalid = |reason: String| Err(CollectiveError::InvalidArgument { rank, reason });
        if world_size == 0 || u32::try_from(world_size).is_err() {
            return invalid(format!("world size {world_size} is out of range"));
        }
        if rank >= world_size {
            return invalid(format!("rank {rank} is out of range for a world of {world_size}"));
        }
        if peers.len() != world_size {
            return invalid(format!("{} peer addresses for a world of {world_size}; need one per rank", peers.len()));
        }
        if options.segment_bytes < 4 || options.segment_bytes / 4 * 4 != options.segment_bytes {
            return invalid(format!("segment size {} bytes is not a positive multiple of 4", options.segment_bytes));
        }
        if options.timeout.is_zero() {
            return invalid("the timeout must be positive".into());
        }
        let ring = Ring {
            rank,
            world: world_size,
            peers: peers.to_vec(),
            timeout: options.timeout,
            segment_bytes: options.segment_bytes,
            shm: options.shm,
            secret: options.secret,
        };
        let links = if world_size == 1 { None } else { Some(establish(&ring, listener)?) };
        let scratch = vec![0.0; (options.segment_bytes / 4).min(SCRATCH_ELEMS)];
        Ok(RingCollective { ring, links, seq: 0, broken: None, scratch })
    }

    /// How this rank's two links carry data, as (to next, from prev): `"tcp"` or `"shm"`; `None`
    /// for a world of one or a broken ring.
    pub fn transports(&self) -> Option<(&'static str, &'static str)> {
        self.links.as_ref().map(|l| (l.next.kind(), l.prev.kind()))
    }

    fn run(&mut self, buf: &mut [f32], call: Call) -> Result<(), CollectiveError> {
        let op = call.op();
        if let Some(first) = &self.broken {
            return Err(CollectiveError::Broken { rank: self.ring.rank, op, first: first.clone() });
        }
        if let Call::Broadcast(root) = call {
            if root >= self.ring.world {
                return Err(CollectiveError::InvalidArgument {
                    rank: self.ring.rank,
                    reason: format!("broadcast root {root} is out of range for a world of {}", self.ring.world),
                });
            }
        }
        // No links: a world of one (a broken ring has returned above).
        let Some(links) = &self.links else { return Ok(()) };
        self.seq += 1;
        let seg = self.ring.segment_bytes / 4;
        let (n, rank) = (self.ring.world, self.ring.rank);
        let plan = match call {
            Call::Broadcast(root) => Plan::broadcast(buf.len(), n, rank, root, seg),
            Call::Sum | Call::Barrier => Plan::all_reduce(buf.len(), n, rank, seg, false),
            Call::Mean => Plan::all_reduce(buf.len(), n, rank, seg, true),
        };
        let start = Frame::start(self.seq, call, buf.len());
        let result = run_pipeline(&self.ring, links, op, start, &plan, buf, &mut self.scratch);
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
            // The streams stopped mid-operation and are never used again. Closing them now makes a
            // peer still writing to this rank fail at once rather than at its deadline; what this rank
            // sent, its abort included, is delivered before the close.
            self.links = None;
        }
        result
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.ring.rank
    }

    fn world_size(&self) -> usize {
        self.ring.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.run(buf, Call::Sum)
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.run(buf, Call::Mean)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.run(buf, Call::Broadcast(root))
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // An all-reduce of nothing still passes a frame at each of its 2(n-1) steps, and the last
        // one a rank receives depends on every rank having entered.
        self.run(&mut [], Call::Barrier)
    }
}

impl Ring {
    fn next(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn link_error(&self, e: LinkError, op: Operation, peer: usize) -> CollectiveError {
        let (rank, addr) = (self.rank, self.peers[peer]);
        match e {
            LinkError::Closed => CollectiveError::PeerClosed { rank, op, peer, addr },
            LinkError::TimedOut => CollectiveError::Timeout { rank, op, peer, addr, timeout: self.timeout },
            LinkError::Io(source) => CollectiveError::Io { rank, op, peer, addr, source },
        }
    }

    fn protocol(&self, op: Operation, detail: String) -> CollectiveError {
        let peer = self.prev();
        CollectiveError::Protocol { rank: self.rank, op, peer, addr: self.peers[peer], detail }
    }

    /// The error for an ABORT frame received from prev.
    fn aborted(&self, op: Operation, frame: &Frame) -> CollectiveError {
        let reason = match frame.a {
            1 => AbortReason::Closed,
            2 => AbortReason::Timeout,
            3 => AbortReason::Mismatch,
            4 => AbortReason::Protocol,
            5 => AbortReason::Io,
            other => return self.protocol(op, format!("abort with unknown reason {other}")),
        };
        let (culprit, observer) = (frame.b as usize, frame.c as usize);
        if culprit >= self.world || observer >= self.world {
            return self.protocol(op, format!("abort blaming rank {culprit} seen by rank {observer}"));
        }
        CollectiveError::Aborted { rank: self.rank, op, observer, reason, culprit, culprit_addr: self.peers[culprit] }
    }

    /// What is wrong with a peer's handshake, if anything, when `expected` should be speaking.
    fn compare(&self, hello: &Hello, expected: usize) -> Option<String> {
        if hello.world != self.world {
            Some(format!(
                "the peer is rank {} of world size {}, this rank ({}) has world size {}",
                hello.rank, hello.world, self.rank, self.world
            ))
        } else if hello.rank != expected {
            Some(format!("the peer is rank {}, expected rank {expected}", hello.rank))
        } else if hello.segment_bytes != self.segment_bytes {
            Some(format!(
                "the peer uses {}-byte segments, this rank {}-byte segments",
                hello.segment_bytes, self.segment_bytes
            ))
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forming the ring

/// The handshake message, the same both ways: the dialer introduces itself, the acceptor answers
/// with itself and whether it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    rank: usize,
    world: usize,
    segment_bytes: usize,
    accepted: bool,
    /// The rank the sender accepts connections from.
    expects: usize,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&(self.rank as u32).to_le_bytes());
        out[12..16].copy_from_slice(&(self.world as u32).to_le_bytes());
        out[16..24].copy_from_slice(&(self.segment_bytes as u64).to_le_bytes());
        out[24..28].copy_from_slice(&u32::from(!self.accepted).to_le_bytes());
        out[28..32].copy_from_slice(&(self.expects as u32).to_le_bytes());
        out
    }

    /// `None` when the bytes are not a thaw ring handshake.
    fn decode(bytes: &[u8; HELLO_BYTES]) -> Option<Hello> {
        if bytes[..8] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize;
        let mut seg = [0u8; 8];
        seg.copy_from_slice(&bytes[16..24]);
        Some(Hello {
            rank: u32_at(8),
            world: u32_at(12),
            segment_bytes: usize::try_from(u64::from_le_bytes(seg)).unwrap_or(usize::MAX),
            accepted: u32_at(24) == 0,
            expects: u32_at(28),
        })
    }
}

fn establish(ring: &Ring, listener: TcpListener) -> Result<Links, CollectiveError> {
    let deadline = Instant::now() + ring.timeout;
    let give_up = GiveUp::default();
    // Dialing and accepting run at once: every rank dials before it accepts, and a dialer waits for
    // its peer's answer, so doing them one after the other would deadlock.
    let (dialed, accepted) = std::thread::scope(|s| {
        let dialer = s.spawn(|| {
            let r = dial(ring, deadline, &give_up);
            if let Err(e) = &r {
                give_up.other_side_failed(e.as_ref());
            }
            r
        });
        let accepted = accept(ring, &listener, deadline, &give_up);
        if let Err(e) = &accepted {
            give_up.other_side_failed(e.as_ref());
        }
        let dialed = dialer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (dialed, accepted)
    });
    match (dialed, accepted) {
        (Ok(next), Ok(prev)) => Ok(Links { next, prev }),
        (dialed, accepted) => {
            let errors = [dialed.err().flatten(), accepted.err().flatten()];
            // A configuration error (a rejected handshake) explains more than a peer that hung up
            // because of its own; otherwise the dialer's: a refused connection names the address.
            let [d, a] = errors;
            let pick = match (d, a) {
                (Some(d), Some(a)) if d.is_retryable() && !a.is_retryable() => Some(a),
                (Some(d), _) => Some(d),
                (None, a) => a,
            };
            // Only a failure of the other side makes one side give up, so one of them failed.
            Err(pick.unwrap_or_else(|| ring.link_error(LinkError::TimedOut, Operation::Connect, ring.next())))
        }
    }
}

/// When the dialing or the accepting side of `establish` should stop because the other failed: at
/// once after a configuration error; after a grace period after a peer hung up or timed out, which
/// may be the consequence of the peer's own configuration error, still to be seen on this side.
#[derive(Default)]
struct GiveUp(Mutex<Option<Instant>>);

impl GiveUp {
    const GRACE: Duration = Duration::from_millis(500);

    fn other_side_failed(&self, e: Option<&CollectiveError>) {
        let at = match e {
            Some(e) if e.is_retryable() => Instant::now() + Self::GRACE,
            _ => Instant::now(),
        };
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(slot.map_or(at, |t| t.min(at)));
    }

    fn now(&self) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).is_some_and(|t| Instant::now() >= t)
    }
}

fn dial(ring: &Ring, deadline: Instant, give_up: &GiveUp) -> Result<Link, Option<CollectiveError>> {
    let peer = ring.next();
    let addr = ring.peers[peer];
    let mut backoff = Duration::from_millis(2);
    let mut last: Option<io::Error> = None;
    let stream = loop {
        if give_up.now() {
            return Err(None);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let (rank, timeout) = (ring.rank, ring.timeout);
            return Err(Some(match last {
                Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    CollectiveError::ConnectionRefused { rank, peer, addr, timeout }
                }
                Some(e) if !matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                    CollectiveError::Io { rank, op: Operation::Connect, peer, addr, source: e }
                }
                _ => CollectiveError::Timeout { rank, op: Operation::Connect, peer, addr, timeout },
            }));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => break s,
            // An address that cannot be dialed at all stays so.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                return Err(Some(ring.link_error(LinkError::Io(e), Operation::Connect, peer)));
            }
            // Anything else may be a peer that is not listening yet: retry until the deadline.
            Err(e) => {
                last = Some(e);
                std::thread::sleep(backoff.mul_f64(rand::random_range(0.5..1.0)).min(left));
                backoff = (backoff * 2).min(MAX_DIAL_BACKOFF);
            }
        }
    };
    handshake_dial(ring, &stream, deadline).map_err(Some)?;
    offer_link(ring, stream, deadline).map_err(Some)
}

/// The HMAC-SHA256 tag of one side of a link's handshake: `label` says which side, so neither
/// side's tag can be reflected back as the other's; the transcript binds both hellos (ranks, world
/// size, segment size) and both fresh nonces, so no tag can be replayed.
fn handshake_mac(secret: &[u8], label: &[u8], transcript: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(label);
    for part in transcript {
        mac.update(part);
    }
    mac
}

fn handshake_dial(ring: &Ring, stream: &TcpStream, deadline: Instant) -> Result<(), CollectiveError> {
    let peer = ring.next();
    let addr = ring.peers[peer];
    let link = |e| ring.link_error(e, Operation::Connect, peer);
    stream.set_nodelay(true).map_err(|e| link(LinkError::Io(e)))?;
    let hello = Hello {
        rank: ring.rank,
        world: ring.world,
        segment_bytes: ring.segment_bytes,
        accepted: true,
        expects: ring.prev(),
    }
    .encode();
    let nonce: [u8; NONCE_BYTES] = rand::random();
    let mut out = [0u8; HELLO_BYTES + NONCE_BYTES];
    out[..HELLO_BYTES].copy_from_slice(&hello);
    out[HELLO_BYTES..].copy_from_slice(&nonce);
    write_all_timed(stream, &out, &mut Timer::new(deadline, Direction::Write)).map_err(link)?;
    let mut bytes = [0u8; HELLO_BYTES + NONCE_BYTES + MAC_BYTES];
    read_exact_timed(stream, &mut bytes, &mut Timer::new(deadline, Direction::Read)).map_err(link)?;
    let reject = |reason: String| Err(CollectiveError::Handshake { rank: ring.rank, addr, reason });
    let (their_hello, rest) = bytes.split_at(HELLO_BYTES);
    let (their_nonce, their_mac) = rest.split_at(NONCE_BYTES);
    let Some(reply) = Hello::decode(their_hello.try_into().expect("32 bytes")) else {
        return reject(format!("the process at {addr} is not a thaw ring peer (bad magic)"));
    };
    let transcript: [&[u8]; 4] = [&hello, &nonce, their_hello, their_nonce];
    if handshake_mac(&ring.secret, ACCEPTOR_LABEL, &transcript).verify_slice(their_mac).is_err() {
        return reject(format!(
            "the process at {addr} does not hold this group's ring secret: it is not rank {peer} of this job's \
             current generation"
        ));
    }
    let mine = handshake_mac(&ring.secret, DIALER_LABEL, &transcript).finalize().into_bytes();
    write_all_timed(stream, &mine, &mut Timer::new(deadline, Direction::Write)).map_err(link)?;
    if let Some(reason) = ring.compare(&reply, peer) {
        return reject(reason);
    }
    if !reply.accepted {
        return reject(format!(
            "rank {} expects rank {} to connect to it, not rank {}",
            reply.rank, reply.expects, ring.rank
        ));
    }
    Ok(())
}

fn accept(
    ring: &Ring,
    listener: &TcpListener,
    deadline: Instant,
    give_up: &GiveUp,
) -> Result<Link, Option<CollectiveError>> {
    let peer = ring.prev();
    let addr = ring.peers[peer];
    let io_error = |e| Some(ring.link_error(LinkError::Io(e), Operation::Connect, peer));
    // std has no accept with a timeout: poll a non-blocking listener.
    listener.set_nonblocking(true).map_err(io_error)?;
    let mut pause = Duration::from_millis(1);
    loop {
        if give_up.now() {
            return Err(None);
        }
        match listener.accept() {
            Ok((stream, from)) => match handshake_accept(ring, &stream, from, deadline) {
                Accepted::Peer => return answer_link(ring, stream, from, deadline).map_err(Some),
                Accepted::Misconfigured(e) => return Err(Some(e)),
                // A stranger (a port scan, a rogue or stale process) proves nothing: drop it and
                // go on accepting; the ring forms when the real neighbour arrives.
                Accepted::Stranger(why) => {
                    tracing::warn!(rank = ring.rank, %from, reason = %why, "dropped a ring connection that failed the handshake");
                }
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Some(CollectiveError::NotConnected {
                        rank: ring.rank,
                        peer,
                        addr,
                        timeout: ring.timeout,
                    }));
                }
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(MAX_ACCEPT_PAUSE);
            }
            Err(e) => return Err(io_error(e)),
        }
    }
}

/// What an accepted connection turned out to be.
enum Accepted {
    /// The expected neighbour, authenticated.
    Peer,
    /// A process holding the ring secret but set up differently (another rank, world or segment
    /// size): a configuration error that fails the ring at once, as it would not heal.
    Misconfigured(CollectiveError),
    /// Anything that did not prove the secret in time: dropped.
    Stranger(String),
}

fn handshake_accept(ring: &Ring, stream: &TcpStream, from: SocketAddr, deadline: Instant) -> Accepted {
    let peer = ring.prev();
    let window = deadline.min(Instant::now() + AUTH_WINDOW);
    let io = |what: &str, e: LinkError| Accepted::Stranger(format!("{what}: {e:?}"));
    // Accepted sockets inherit non-blocking mode on some platforms.
    if let Err(e) = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true)) {
        return io("setting up the socket", LinkError::Io(e));
    }
    let mut bytes = [0u8; HELLO_BYTES + NONCE_BYTES];
    if let Err(e) = read_exact_timed(stream, &mut bytes, &mut Timer::new(window, Direction::Read)) {
        return io("reading its hello", e);
    }
    let (their_hello, their_nonce) = bytes.split_at(HELLO_BYTES);
    let Some(hello) = Hello::decode(their_hello.try_into().expect("32 bytes")) else {
        return Accepted::Stranger("not a thaw ring peer (bad magic)".into());
    };
    let problem = ring.compare(&hello, peer);
    let reply = Hello {
        rank: ring.rank,
        world: ring.world,
        segment_bytes: ring.segment_bytes,
        accepted: problem.is_none(),
        expects: peer,
    }
    .encode();
    let nonce: [u8; NONCE_BYTES] = rand::random();
    let transcript: [&[u8]; 4] = [their_hello, their_nonce, &reply, &nonce];
    let mut out = [0u8; HELLO_BYTES + NONCE_BYTES + MAC_BYTES];
    out[..HELLO_BYTES].copy_from_slice(&reply);
    out[HELLO_BYTES..HELLO_BYTES + NONCE_BYTES].copy_from_slice(&nonce);
    out[HELLO_BYTES + NONCE_BYTES..]
        .copy_from_slice(&handshake_mac(&ring.secret, ACCEPTOR_LABEL, &transcript).finalize().into_bytes());
    if let Err(e) = write_all_timed(stream, &out, &mut Timer::new(window, Direction::Write)) {
        return io("answering", e);
    }
    let mut their_mac = [0u8; MAC_BYTES];
    if let Err(e) = read_exact_timed(stream, &mut their_mac, &mut Timer::new(window, Direction::Read)) {
        // A real peer that rejected this rank's answer hangs up here: its own error explains.
        return io("reading its proof", e);
    }
    if handshake_mac(&ring.secret, DIALER_LABEL, &transcript).verify_slice(&their_mac).is_err() {
        return Accepted::Stranger(format!(
            "claims to be rank {} but does not hold this group's ring secret",
            hello.rank
        ));
    }
    match problem {
        Some(reason) => Accepted::Misconfigured(CollectiveError::Handshake { rank: ring.rank, addr: from, reason }),
        None => Accepted::Peer,
    }
}

/// The dialer's side of choosing the transport of its link to next: offers a shared-memory pipe
/// (or nothing) and switches to it if next accepts.
fn offer_link(ring: &Ring, stream: TcpStream, deadline: Instant) -> Result<Link, CollectiveError> {
    let link = |e| ring.link_error(e, Operation::Connect, ring.next());
    #[cfg(target_os = "linux")]
    {
        let offer = if ring.shm { shm::Offer::create(ring.rank) } else { None };
        let bytes = offer.as_ref().map_or_else(shm::no_offer, shm::Offer::encode);
        write_all_timed(&stream, &bytes, &mut Timer::new(deadline, Direction::Write)).map_err(link)?;
        let mut answer = [0u8; 8];
        read_exact_timed(&stream, &mut answer, &mut Timer::new(deadline, Direction::Read)).map_err(link)?;
        match offer {
            Some(offer) if answer == shm::YES => {
                Ok(Link::Shm(offer.accepted(stream).map_err(|e| link(LinkError::Io(e)))?))
            }
            _ => Ok(Link::Tcp(stream)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let mut bytes = [0u8; 256];
        bytes[..8].copy_from_slice(b"THAWSHM1");
        write_all_timed(&stream, &bytes, &mut Timer::new(deadline, Direction::Write)).map_err(link)?;
        read_exact_timed(&stream, &mut [0u8; 8], &mut Timer::new(deadline, Direction::Read)).map_err(link)?;
        Ok(Link::Tcp(stream))
    }
}

/// The acceptor's side: maps the offered pipe if it can (same host) and says so.
fn answer_link(ring: &Ring, stream: TcpStream, from: SocketAddr, deadline: Instant) -> Result<Link, CollectiveError> {
    let link = |e| ring.link_error(e, Operation::Connect, ring.prev());
    #[cfg(target_os = "linux")]
    {
        let mut offer = [0u8; shm::OFFER_BYTES];
        read_exact_timed(&stream, &mut offer, &mut Timer::new(deadline, Direction::Read)).map_err(link)?;
        let mapped = match shm::answer(&offer) {
            shm::Answer::Malformed => {
                let reason = format!("the connection from {from} sent a malformed transport offer");
                return Err(CollectiveError::Handshake { rank: ring.rank, addr: from, reason });
            }
            shm::Answer::Declined => None,
            shm::Answer::Mapped(map) => ring.shm.then_some(map),
        };
        let answer = if mapped.is_some() { shm::YES } else { shm::NO };
        write_all_timed(&stream, &answer, &mut Timer::new(deadline, Direction::Write)).map_err(link)?;
        match mapped {
            Some(map) => {
                let pipe = shm::Pipe::new(map, shm::Role::Reader, stream).map_err(|e| link(LinkError::Io(e)))?;
                Ok(Link::Shm(pipe))
            }
            None => Ok(Link::Tcp(stream)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = from;
        read_exact_timed(&stream, &mut [0u8; 256], &mut Timer::new(deadline, Direction::Read)).map_err(link)?;
        write_all_timed(&stream, b"SHMNO\0\0\0", &mut Timer::new(deadline, Direction::Write)).map_err(link)?;
        Ok(Link::Tcp(stream))
    }
}

// ---------------------------------------------------------------------------------------------
// Operations

/// A call as a message names it, from a START frame.
fn describe_call(start: &Frame) -> String {
    let what = match start.a {
        1 => "all_reduce (sum)".to_string(),
        2 => "all_reduce (mean)".to_string(),
        3 => format!("broadcast from rank {}", start.c),
        4 => return format!("barrier as call #{}", start.seq),
        other => format!("unknown operation {other}"),
    };
    format!("{what} of {} values as call #{}", start.b, start.seq)
}

/// The 32-byte frame header: `kind`, then fields whose meaning depends on it.
/// START: `a` operation, `b` length in elements, `c` root. DATA: `a` segment, `b` payload bytes,
/// `c` step. ABORT: `a` reason, `b` culprit rank, `c` observing rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    kind: u32,
    a: u32,
    seq: u64,
    b: u64,
    c: u32,
}

impl Frame {
    fn start(seq: u64, call: Call, len: usize) -> Frame {
        let root = if let Call::Broadcast(root) = call { root as u32 } else { 0 };
        Frame { kind: KIND_START, a: call.code(), seq, b: len as u64, c: root }
    }

    fn data(seq: u64, step: usize, segment: usize, bytes: usize) -> Frame {
        Frame { kind: KIND_DATA, a: segment as u32, seq, b: bytes as u64, c: step as u32 }
    }

    fn encode(&self) -> [u8; FRAME_BYTES] {
        let mut out = [0u8; FRAME_BYTES];
        out[0..4].copy_from_slice(&self.kind.to_le_bytes());
        out[4..8].copy_from_slice(&self.a.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.b.to_le_bytes());
        out[24..28].copy_from_slice(&self.c.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; FRAME_BYTES]) -> Frame {
        let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Frame { kind: u32_at(0), a: u32_at(4), seq: u64_at(8), b: u64_at(16), c: u32_at(24) }
    }

    fn describe(&self) -> String {
        match self.kind {
            KIND_START => format!("the start of {}", describe_call(self)),
            KIND_DATA => format!("segment {} of step {} of call #{} ({} bytes)", self.a, self.c, self.seq, self.b),
            KIND_ABORT => format!("an abort of call #{}", self.seq),
            other => format!("a frame of unknown kind {other:#010x}"),
        }
    }
}

/// What to do with a received segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `dst += received`
    Add,
    /// `dst = (dst + received) / n`: the last reduce-scatter step of a mean.
    AddMean,
    /// `dst = received`
    Copy,
}

/// One step of an operation as the receiving rank sees it: which segments arrive, what to do with
/// them, and whether they are then sent on (as the next step).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    segs: Range<usize>,
    mode: Mode,
    forward: bool,
}

/// One rank's part of an operation: the buffer cut into segments (in buffer order), the segments it
/// sends at step 0 (its own data), and the steps it receives. Every other segment it sends is one
/// received at step `s` of a `forward` step, sent on as step `s + 1`; which is exactly what the next
/// rank's steps expect (`plans_agree_between_neighbours` checks it).
///
/// Frames carry their step and segment, and a rank sends a received segment on as soon as it has
/// been reduced, ahead of its own data, while it is still in cache: so frames arrive in an order
/// that depends on timing, and the receiver files each by its tag.
#[derive(Debug)]
struct Plan {
    ranges: Vec<Range<usize>>,
    first_sends: Vec<usize>,
    steps: Vec<Step>,
}

/// `j * len / k` without overflow.
fn split_point(len: usize, k: usize, j: usize) -> usize {
    (j as u128 * len as u128 / k as u128) as usize
}

/// Cuts `lo..hi` into at least one segment (possibly empty: an empty chunk still sends a frame,
/// which keeps every step a synchronisation point) of at most `seg` elements each.
fn push_segments(ranges: &mut Vec<Range<usize>>, lo: usize, hi: usize, seg: usize) -> Range<usize> {
    let len = hi - lo;
    let k = len.div_ceil(seg).max(1);
    let first = ranges.len();
    ranges.extend((0..k).map(|j| lo + split_point(len, k, j)..lo + split_point(len, k, j + 1)));
    first..ranges.len()
}

impl Plan {
    fn all_reduce(len: usize, n: usize, rank: usize, seg: usize, mean: bool) -> Plan {
        let mut ranges = Vec::new();
        let chunks: Vec<Range<usize>> = (0..n)
            .map(|c| push_segments(&mut ranges, split_point(len, n, c), split_point(len, n, c + 1), seg))
            .collect();
        let count = 2 * (n - 1);
        let steps = (0..count)
            .map(|s| {
                // Reduce-scatter step s receives chunk r-s-1 (and sends r-s, received at step s-1);
                // after step n-2, rank r holds the whole of chunk r+1. All-gather step t receives
                // chunk r-t.
                let (chunk, mode) = if s < n - 1 {
                    let last = s == n - 2;
                    ((rank + 2 * n - s - 1) % n, if last && mean { Mode::AddMean } else { Mode::Add })
                } else {
                    ((rank + 2 * n - (s - (n - 1))) % n, Mode::Copy)
                };
                Step { segs: chunks[chunk].clone(), mode, forward: s + 1 < count }
            })
            .collect();
        Plan { ranges, first_sends: chunks[rank].clone().collect(), steps }
    }

    fn broadcast(len: usize, n: usize, rank: usize, root: usize, seg: usize) -> Plan {
        let mut ranges = Vec::new();
        let all = push_segments(&mut ranges, 0, len, seg);
        // Data flows root -> root+1 -> ... -> root-1, which forwards nothing. Each hop is a step:
        // rank root+d receives the data as step d-1, its d-1 earlier steps are empty.
        let distance = (rank + n - root) % n;
        if distance == 0 {
            Plan { ranges, first_sends: all.collect(), steps: Vec::new() }
        } else {
            let mut steps = vec![Step { segs: 0..0, mode: Mode::Copy, forward: true }; distance - 1];
            steps.push(Step { segs: all, mode: Mode::Copy, forward: distance < n - 1 });
            Plan { ranges, first_sends: Vec::new(), steps }
        }
    }

    /// The number of frames this rank receives.
    fn frames(&self) -> usize {
        self.steps.iter().map(|s| s.segs.len()).sum()
    }
}

/// State shared by the two threads of an operation.
#[derive(Default)]
struct Shared {
    /// Set by the reading thread when the operation fails: the writer stops at the next frame
    /// boundary and sends an ABORT frame instead.
    abort: AtomicBool,
    /// Set by the writing thread when writing to next failed: the reader stops storing data and only
    /// drains what prev still sends, so prev is not left blocked (and can pass on an abort).
    send_failed: AtomicBool,
    /// The first error of the operation, which is the one reported.
    first_error: Mutex<Option<CollectiveError>>,
}

impl Shared {
    fn record(&self, e: CollectiveError) {
        let mut slot = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// The ABORT frame passing on the first error: an abort received is forwarded as it is.
    fn abort_frame(&self, ring: &Ring, seq: u64) -> Frame {
        let slot = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
        let (reason, culprit, observer) = match &*slot {
            Some(CollectiveError::Aborted { observer, reason, culprit, .. }) => (*reason, *culprit, *observer),
            Some(CollectiveError::PeerClosed { peer, .. }) => (AbortReason::Closed, *peer, ring.rank),
            Some(CollectiveError::Timeout { peer, .. }) => (AbortReason::Timeout, *peer, ring.rank),
            Some(CollectiveError::Mismatch { peer, .. }) => (AbortReason::Mismatch, *peer, ring.rank),
            Some(CollectiveError::Protocol { peer, .. }) => (AbortReason::Protocol, *peer, ring.rank),
            _ => (AbortReason::Io, ring.prev(), ring.rank),
        };
        let code = match reason {
            AbortReason::Closed => 1,
            AbortReason::Timeout => 2,
            AbortReason::Mismatch => 3,
            AbortReason::Protocol => 4,
            AbortReason::Io => 5,
        };
        Frame { kind: KIND_ABORT, a: code, seq, b: culprit as u64, c: observer as u32 }
    }
}

/// Cuts `buf` into the plan's segments, which are contiguous and in order.
fn split_segments<'a>(mut buf: &'a mut [f32], ranges: &[Range<usize>]) -> Vec<Option<&'a mut [f32]>> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(r.len());
        out.push(Some(head));
        buf = tail;
    }
    out
}

/// After the reader fails: whether to keep reading (and discarding) what prev sends.
enum AfterError {
    /// The stream from prev is over (closed, aborted or timed out).
    Stop,
    /// prev is alive but out of step: read until its abort arrives, so that it is not left blocked
    /// writing to this rank and can pass the abort on.
    Drain,
}

/// Runs one operation: a writer thread sends this rank's own segments and, ahead of them, every
/// received segment that goes on, while this thread receives from prev, reduces and hands segments
/// over. Segments pass between the threads as `&mut` slices through channels, so each is owned by
/// exactly one thread at a time.
fn run_pipeline(
    ring: &Ring,
    links: &Links,
    op: Operation,
    start: Frame,
    plan: &Plan,
    buf: &mut [f32],
    scratch: &mut [f32],
) -> Result<(), CollectiveError> {
    let deadline = Instant::now() + ring.timeout;
    let shared = Shared::default();
    let mut segs = split_segments(buf, &plan.ranges);
    let own: Vec<Segment<'_>> = plan.first_sends.iter().filter_map(|&id| Some((id, segs[id].take()?))).collect();
    let (to_send, forwards) = mpsc::channel();
    let (give_back, returned) = mpsc::channel();
    std::thread::scope(|s| {
        let shared = &shared;
        let writer = s.spawn(move || {
            send_all(ring, op, &links.next, deadline, start, own, forwards, give_back, shared);
        });
        let mut to_send = Some(to_send);
        let mut timer = Timer::new(deadline, Direction::Read);
        let received = receive_all(
            ring,
            op,
            &links.prev,
            &mut timer,
            &start,
            plan,
            &mut segs,
            &mut to_send,
            &returned,
            shared,
            scratch,
        );
        if let Err((e, after)) = received {
            shared.record(e);
            shared.abort.store(true, Ordering::Release);
            // Closing the queue wakes the writer if it is idle, so it sends the abort now.
            drop(to_send.take());
            if let AfterError::Drain = after {
                links.prev.drain(&mut timer, scratch);
            }
        }
        drop(to_send);
        writer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    });
    match shared.first_error.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

type Segment<'a> = (usize, &'a mut [f32]);

/// A received segment to send on: (step it is sent as, segment, data).
type Forward<'a> = (usize, usize, &'a mut [f32]);

/// The writer thread: START, then segments, each given back once sent: a forwarded segment whenever
/// one is waiting (it was just reduced, so it is still in cache, and the ranks further on wait for
/// it), else the next of this rank's own. An ABORT instead of the rest once the reader failed.
#[allow(clippy::too_many_arguments)]
fn send_all<'a>(
    ring: &Ring,
    op: Operation,
    link: &Link,
    deadline: Instant,
    start: Frame,
    own: Vec<Segment<'a>>,
    forwards: mpsc::Receiver<Forward<'a>>,
    give_back: mpsc::Sender<Segment<'a>>,
    shared: &Shared,
) {
    let next = ring.next();
    let mut timer = Timer::new(deadline, Direction::Write);
    let fail = |e| {
        shared.record(ring.link_error(e, op, next));
        shared.send_failed.store(true, Ordering::Release);
    };
    if let Err(e) = link.write_all(&start.encode(), &mut timer) {
        return fail(e);
    }
    let mut own = own.into_iter().map(|(id, seg)| (0, id, seg));
    loop {
        let item = match forwards.try_recv() {
            Ok(forward) => Some(forward),
            Err(mpsc::TryRecvError::Empty) => own.next().or_else(|| forwards.recv().ok()),
            Err(mpsc::TryRecvError::Disconnected) => own.next(),
        };
        if shared.abort.load(Ordering::Acquire) {
            // Best effort: next may be the rank that failed.
            let _ = link.write_all(&shared.abort_frame(ring, start.seq).encode(), &mut timer);
            return;
        }
        let Some((step, id, seg)) = item else { return };
        let header = Frame::data(start.seq, step, id, seg.len() * 4).encode();
        if let Err(e) = link.write_frame(&header, bytemuck::cast_slice::<f32, u8>(&*seg), &mut timer) {
            return fail(e);
        }
        // The reader may have finished and no longer want it.
        let _ = give_back.send((id, seg));
    }
}

/// The reading side of an operation, on the calling thread.
#[allow(clippy::too_many_arguments)]
fn receive_all<'a>(
    ring: &Ring,
    op: Operation,
    link: &Link,
    timer: &mut Timer,
    start: &Frame,
    plan: &Plan,
    segs: &mut [Option<&'a mut [f32]>],
    to_send: &mut Option<mpsc::Sender<Forward<'a>>>,
    returned: &mpsc::Receiver<Segment<'a>>,
    shared: &Shared,
    scratch: &mut [f32],
) -> Result<(), (CollectiveError, AfterError)> {
    let prev = ring.prev();
    let lost = |e| (ring.link_error(e, op, prev), AfterError::Stop);
    let first = link.read_frame(timer).map_err(lost)?;
    match first.kind {
        KIND_START if first == *start => {}
        KIND_START => {
            let detail =
                format!("this rank called {}, rank {prev} called {}", describe_call(start), describe_call(&first));
            let e = CollectiveError::Mismatch { rank: ring.rank, op, peer: prev, addr: ring.peers[prev], detail };
            return Err((e, AfterError::Drain));
        }
        KIND_ABORT => return Err((ring.aborted(op, &first), AfterError::Stop)),
        _ => {
            let detail = format!("expected the start of call #{}, got {}", start.seq, first.describe());
            return Err((ring.protocol(op, detail), AfterError::Drain));
        }
    }
    // Frame (step, segment) is slot `offsets[step] + segment - steps[step].segs.start`.
    let offsets: Vec<usize> = plan
        .steps
        .iter()
        .scan(0, |next, step| {
            let offset = *next;
            *next += step.segs.len();
            Some(offset)
        })
        .collect();
    let mut seen = vec![false; plan.frames()];
    let n = ring.world;
    for _ in 0..seen.len() {
        if to_send.is_some() && shared.send_failed.load(Ordering::Acquire) {
            // The operation has failed; keep prev unblocked until it is done or aborts.
            *to_send = None;
        }
        let frame = link.read_frame(timer).map_err(lost)?;
        if frame.kind == KIND_ABORT {
            return Err((ring.aborted(op, &frame), AfterError::Stop));
        }
        let (s, id) = (frame.c as usize, frame.a as usize);
        let expected = plan.steps.get(s).filter(|step| step.segs.contains(&id)).and_then(|step| {
            let slot = offsets[s] + id - step.segs.start;
            let bytes = plan.ranges[id].len() * 4;
            (frame == Frame::data(start.seq, s, id, bytes) && !seen[slot]).then_some((step, slot, bytes))
        });
        let Some((step, slot, bytes)) = expected else {
            let detail = format!("unexpected {} during call #{}", frame.describe(), start.seq);
            return Err((ring.protocol(op, detail), AfterError::Drain));
        };
        seen[slot] = true;
        // A segment received again (in all-gather) may still be with the writer; it has been sent,
        // since what arrives now was computed from it, so it is given back promptly.
        let dst = if to_send.is_some() { take_back(segs, id, returned) } else { None };
        let Some(dst) = dst else {
            *to_send = None;
            link.skip(timer, bytes as u64, scratch).map_err(lost)?;
            continue;
        };
        let received = match step.mode {
            Mode::Copy => link.read_exact(bytemuck::cast_slice_mut::<f32, u8>(&mut *dst), timer),
            Mode::Add => link.read_combine(timer, &mut *dst, scratch, add_into),
            // x * (1/n) is x / n, bit for bit, when 1/n is exact, and cheaper.
            Mode::AddMean if n.is_power_of_two() => {
                link.read_combine(timer, &mut *dst, scratch, |d, s| add_scale_into(d, s, 1.0 / n as f32))
            }
            Mode::AddMean => link.read_combine(timer, &mut *dst, scratch, |d, s| add_div_into(d, s, n as f32)),
        };
        received.map_err(lost)?;
        if step.forward {
            if let Some(tx) = to_send.as_ref() {
                if tx.send((s + 1, id, dst)).is_err() {
                    *to_send = None;
                }
            }
        } else {
            segs[id] = Some(dst);
        }
    }
    Ok(())
}

/// Segment `id`, waiting for the writer to give it back if it has it; `None` if the writer is gone.
fn take_back<'a>(
    segs: &mut [Option<&'a mut [f32]>],
    id: usize,
    returned: &mpsc::Receiver<Segment<'a>>,
) -> Option<&'a mut [f32]> {
    loop {
        if let Some(seg) = segs[id].take() {
            return Some(seg);
        }
        let (i, seg) = returned.recv().ok()?;
        segs[i] = Some(seg);
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

fn add_scale_into(dst: &mut [f32], src: &[f32], scale: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = (*d + *s) * scale;
    }
}

fn add_div_into(dst: &mut [f32], src: &[f32], n: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = (*d + *s) / n;
    }
}

impl Link {
    fn kind(&self) -> &'static str {
        match self {
            Link::Tcp(_) => "tcp",
            #[cfg(target_os = "linux")]
            Link::Shm(_) => "shm",
        }
    }

    fn read_exact(&self, buf: &mut [u8], timer: &mut Timer) -> Result<(), LinkError> {
        match self {
            Link::Tcp(stream) => read_exact_timed(stream, buf, timer),
            #[cfg(target_os = "linux")]
            Link::Shm(pipe) => pipe.read_exact(buf, timer.deadline),
        }
    }

    fn write_all(&self, buf: &[u8], timer: &mut Timer) -> Result<(), LinkError> {
        match self {
            Link::Tcp(stream) => write_all_timed(stream, buf, timer),
            #[cfg(target_os = "linux")]
            Link::Shm(pipe) => pipe.write_all(buf, timer.deadline),
        }
    }

    fn write_frame(&self, header: &[u8], payload: &[u8], timer: &mut Timer) -> Result<(), LinkError> {
        match self {
            Link::Tcp(stream) => write_frame_timed(stream, header, payload, timer),
            #[cfg(target_os = "linux")]
            Link::Shm(pipe) => {
                pipe.write_all(header, timer.deadline)?;
                pipe.write_all(payload, timer.deadline)
            }
        }
    }

    fn read_frame(&self, timer: &mut Timer) -> Result<Frame, LinkError> {
        let mut bytes = [0u8; FRAME_BYTES];
        self.read_exact(&mut bytes, timer)?;
        Ok(Frame::decode(&bytes))
    }

    /// Reads `dst.len()` values and combines them into `dst` as they arrive: over TCP in
    /// scratch-sized pieces (each added while the next is still arriving), from a pipe straight out
    /// of shared memory.
    fn read_combine(
        &self,
        timer: &mut Timer,
        dst: &mut [f32],
        scratch: &mut [f32],
        combine: impl Fn(&mut [f32], &[f32]),
    ) -> Result<(), LinkError> {
        match self {
            Link::Tcp(stream) => {
                for d in dst.chunks_mut(scratch.len()) {
                    let s = &mut scratch[..d.len()];
                    read_exact_timed(stream, bytemuck::cast_slice_mut(s), timer)?;
                    combine(d, s);
                }
                Ok(())
            }
            #[cfg(target_os = "linux")]
            Link::Shm(pipe) => {
                let mut done = 0;
                pipe.read_with(dst.len() * 4, timer.deadline, |piece| {
                    // Pieces are f32-aligned and whole values (see shm.rs).
                    let src: &[f32] = bytemuck::cast_slice(piece);
                    combine(&mut dst[done..done + src.len()], src);
                    done += src.len();
                })
            }
        }
    }

    /// Reads and drops `bytes` bytes.
    fn skip(&self, timer: &mut Timer, mut bytes: u64, scratch: &mut [f32]) -> Result<(), LinkError> {
        let space: &mut [u8] = bytemuck::cast_slice_mut(scratch);
        while bytes > 0 {
            let k = usize::try_from(bytes).unwrap_or(usize::MAX).min(space.len());
            self.read_exact(&mut space[..k], timer)?;
            bytes -= k as u64;
        }
        Ok(())
    }

    /// Reads and drops data frames until an abort, anything else, an error or the deadline.
    fn drain(&self, timer: &mut Timer, scratch: &mut [f32]) {
        while let Ok(frame) = self.read_frame(timer) {
            if frame.kind != KIND_DATA || self.skip(timer, frame.b, scratch).is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reads and writes bounded by a deadline

#[derive(Debug)]
pub(super) enum LinkError {
    /// The peer closed or reset the connection.
    Closed,
    TimedOut,
    Io(io::Error),
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => LinkError::TimedOut,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
            | io::ErrorKind::WriteZero => LinkError::Closed,
            _ => LinkError::Io(e),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Keeps one direction of a socket's timeout at the time left before a deadline.
struct Timer {
    deadline: Instant,
    direction: Direction,
    armed_at: Option<Instant>,
}

impl Timer {
    fn new(deadline: Instant, direction: Direction) -> Self {
        Timer { deadline, direction, armed_at: None }
    }

    /// Bounds the next blocking call on `stream` by the deadline (up to [`REARM_EVERY`] late).
    fn arm(&mut self, stream: &TcpStream) -> Result<(), LinkError> {
        let now = Instant::now();
        let left = self.deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(LinkError::TimedOut);
        }
        if self.armed_at.is_none_or(|t| now.duration_since(t) >= REARM_EVERY) {
            let set = match self.direction {
                Direction::Read => stream.set_read_timeout(Some(left)),
                Direction::Write => stream.set_write_timeout(Some(left)),
            };
            set.map_err(LinkError::Io)?;
            self.armed_at = Some(now);
        }
        Ok(())
    }

    /// Whether a failed call may be retried: interrupted, or timed out before the deadline.
    fn retry(&mut self, e: io::Error) -> Result<(), LinkError> {
        match e.kind() {
            io::ErrorKind::Interrupted => Ok(()),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut if Instant::now() < self.deadline => {
                self.armed_at = None;
                Ok(())
            }
            _ => Err(e.into()),
        }
    }
}

fn read_exact_timed(mut stream: &TcpStream, mut buf: &mut [u8], timer: &mut Timer) -> Result<(), LinkError> {
    while !buf.is_empty() {
        timer.arm(stream)?;
        match stream.read(buf) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(k) => buf = &mut std::mem::take(&mut buf)[k..],
            Err(e) => timer.retry(e)?,
        }
    }
    Ok(())
}

fn write_all_timed(mut stream: &TcpStream, mut buf: &[u8], timer: &mut Timer) -> Result<(), LinkError> {
    while !buf.is_empty() {
        timer.arm(stream)?;
        match stream.write(buf) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(k) => buf = &buf[k..],
            Err(e) => timer.retry(e)?,
        }
    }
    Ok(())
}

/// Writes a header and its payload with one system call where possible: with `TCP_NODELAY`, a
/// header written alone would leave as a packet of its own.
fn write_frame_timed(
    mut stream: &TcpStream,
    header: &[u8],
    payload: &[u8],
    timer: &mut Timer,
) -> Result<(), LinkError> {
    let mut done = 0;
    while done < header.len() {
        timer.arm(stream)?;
        match stream.write_vectored(&[io::IoSlice::new(&header[done..]), io::IoSlice::new(payload)]) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(k) => done += k,
            Err(e) => timer.retry(e)?,
        }
    }
    write_all_timed(stream, &payload[(done - header.len()).min(payload.len())..], timer)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
        let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        (listeners, addrs)
    }

    /// An address nothing listens on.
    fn closed_port() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    }

    /// Forms a ring of `n` ranks on loopback, one thread each, and runs `body` on every rank.
    fn with_ring<T: Send>(n: usize, options: RingOptions, body: impl Fn(&mut RingCollective) -> T + Sync) -> Vec<T> {
        let (listeners, addrs) = listeners(n);
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (addrs, body, options) = (&addrs, &body, options.clone());
                    s.spawn(move || {
                        let mut ring = RingCollective::connect_with(rank, n, listener, addrs, options).unwrap();
                        assert_eq!((ring.rank(), ring.world_size()), (rank, n));
                        body(&mut ring)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Both data transports: TCP, and the shared-memory pipes that local neighbours use.
    const SHM: [bool; 2] = [false, true];

    fn opts(timeout: Duration, segment_bytes: usize, shm: bool) -> RingOptions {
        RingOptions { timeout, segment_bytes, shm, secret: b"test ring secret".to_vec() }
    }

    fn expect_transport(ring: &RingCollective, shm: bool) {
        let kind = if shm { "shm" } else { "tcp" };
        assert_eq!(ring.transports(), Some((kind, kind)), "rank {}", ring.rank());
    }

    /// Small integers, so that every partial sum is exact and the expected mean is one rounding.
    fn value(i: usize, rank: usize) -> f32 {
        ((i * 31 + rank * 7) % 23) as f32 - 11.0
    }

    fn expected_mean(len: usize, n: usize) -> Vec<f32> {
        (0..len).map(|i| (0..n).map(|r| value(i, r)).sum::<f32>() / n as f32).collect()
    }

    fn check_all_reduce_mean(n: usize, sizes: &[usize], segment_bytes: usize) {
        let expected: Vec<Vec<f32>> = sizes.iter().map(|&len| expected_mean(len, n)).collect();
        for shm in SHM {
            with_ring(n, opts(Duration::from_secs(10), segment_bytes, shm), |ring| {
                expect_transport(ring, shm);
                for (&len, want) in sizes.iter().zip(&expected) {
                    let mut buf: Vec<f32> = (0..len).map(|i| value(i, ring.rank())).collect();
                    ring.all_reduce_mean(&mut buf).unwrap();
                    assert!(buf == *want, "rank {} of {n}, shm {shm}: wrong mean of {len} values", ring.rank());
                }
            });
        }
    }

    fn small_sizes(n: usize) -> Vec<usize> {
        vec![0, 1, n - 1, n + 1, 7, 13, 1001, 10_007]
    }

    #[test]
    fn all_reduce_mean_is_exact_on_2_3_4_ranks() {
        for n in 2..=4 {
            check_all_reduce_mean(n, &small_sizes(n), DEFAULT_SEGMENT_BYTES);
        }
    }

    #[test]
    fn all_reduce_mean_is_exact_with_many_small_segments() {
        // 12-byte segments: many frames per step, segments forwarded while the step is still
        // arriving, and all-gather overwriting segments the writer may still hold.
        for n in 2..=4 {
            check_all_reduce_mean(n, &small_sizes(n), 12);
        }
    }

    #[test]
    fn all_reduce_mean_of_10_mb_is_exact_on_2_ranks() {
        check_all_reduce_mean(2, &[2_621_447], DEFAULT_SEGMENT_BYTES);
    }

    #[test]
    fn all_reduce_mean_of_10_mb_is_exact_on_3_ranks() {
        check_all_reduce_mean(3, &[2_621_447], DEFAULT_SEGMENT_BYTES);
    }

    #[test]
    fn all_reduce_mean_of_10_mb_is_exact_on_4_ranks() {
        check_all_reduce_mean(4, &[2_621_447], 256 << 10);
    }

    #[test]
    fn a_link_uses_shared_memory_only_when_both_ends_allow_it() {
        // Rank 1 refuses: its links (0 -> 1 and 1 -> 2) stay on TCP, 2 -> 0 uses a pipe, and the
        // mixed ring still computes the exact mean.
        let n = 3;
        let (ls, addrs) = listeners(n);
        let want = expected_mean(1_000_003, n);
        let kinds: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let (addrs, want) = (&addrs, &want);
                    s.spawn(move || {
                        let options = opts(Duration::from_secs(10), 64 << 10, rank != 1);
                        let mut ring = RingCollective::connect_with(rank, n, l, addrs, options).unwrap();
                        let mut buf: Vec<f32> = (0..want.len()).map(|i| value(i, rank)).collect();
                        ring.all_reduce_mean(&mut buf).unwrap();
                        assert!(buf == *want, "rank {rank}: wrong mean");
                        ring.transports().unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(kinds, [("tcp", "shm"), ("tcp", "tcp"), ("shm", "tcp")]);
    }

    #[test]
    fn all_reduce_sum_adds_and_repeated_calls_stay_in_step() {
        let sums = with_ring(3, RingOptions::new(Duration::from_secs(10)), |ring| {
            let r = ring.rank() as f32;
            let mut out = Vec::new();
            for len in [5usize, 0, 3, 5] {
                let mut buf: Vec<f32> = (0..len).map(|i| i as f32 + 10.0 * r).collect();
                ring.all_reduce_sum(&mut buf).unwrap();
                out.push(buf);
            }
            out
        });
        for per_rank in &sums {
            assert_eq!(per_rank[0], [30.0, 33.0, 36.0, 39.0, 42.0]);
            assert!(per_rank[1].is_empty());
            assert_eq!(per_rank[2], [30.0, 33.0, 36.0]);
            assert_eq!(per_rank[3], per_rank[0]);
        }
    }

    #[test]
    fn broadcast_from_a_non_zero_root_reaches_every_rank() {
        for (n, root, segment_bytes, shm) in
            [(3, 2, DEFAULT_SEGMENT_BYTES, true), (4, 1, 20, true), (2, 1, 4096, false), (3, 1, 20, false)]
        {
            with_ring(n, opts(Duration::from_secs(10), segment_bytes, shm), |ring| {
                for len in [0, 1, 5, 100_003] {
                    let data: Vec<f32> = (0..len).map(|i| value(i, root)).collect();
                    let mut buf = if ring.rank() == root { data.clone() } else { vec![-99.0; len] };
                    ring.broadcast(&mut buf, root).unwrap();
                    assert!(buf == data, "rank {} of {n}: wrong broadcast of {len} values from {root}", ring.rank());
                }
            });
        }
    }

    #[test]
    fn barrier_waits_for_every_rank() {
        let n = 3;
        let arrived = AtomicUsize::new(0);
        with_ring(n, RingOptions::new(Duration::from_secs(10)), |ring| {
            for round in 1..=3 {
                if ring.rank() == 0 {
                    // Rank 0 comes late: the others must wait for it.
                    std::thread::sleep(Duration::from_millis(30));
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                ring.barrier().unwrap();
                assert!(arrived.load(Ordering::SeqCst) >= n * round, "rank {} left barrier {round} early", ring.rank());
            }
        });
    }

    #[test]
    fn a_world_of_one_is_a_working_no_op() {
        let (mut listeners, addrs) = listeners(1);
        let mut ring = RingCollective::connect(0, 1, listeners.pop().unwrap(), &addrs, Duration::from_secs(1)).unwrap();
        let mut buf = vec![1.0, 2.5];
        ring.all_reduce_mean(&mut buf).unwrap();
        ring.all_reduce_sum(&mut buf).unwrap();
        ring.broadcast(&mut buf, 0).unwrap();
        ring.barrier().unwrap();
        assert_eq!(buf, [1.0, 2.5]);
        let err = ring.broadcast(&mut buf, 1).unwrap_err();
        assert!(matches!(err, CollectiveError::InvalidArgument { .. }), "{err}");
        // An invalid call does not break the ring.
        ring.barrier().unwrap();
    }

    #[test]
    fn invalid_setups_are_rejected_with_the_reason() {
        let (mut ls, addrs) = listeners(2);
        let err = RingCollective::connect(2, 2, ls.pop().unwrap(), &addrs, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("rank 2 is out of range for a world of 2"), "{err}");
        let err = RingCollective::connect(0, 3, ls.pop().unwrap(), &addrs, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("2 peer addresses for a world of 3"), "{err}");
        let (mut ls, addrs) = listeners(1);
        let options = opts(Duration::from_secs(1), 6, true);
        let err = RingCollective::connect_with(0, 1, ls.pop().unwrap(), &addrs, options).unwrap_err();
        assert!(err.to_string().contains("segment size 6 bytes"), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn a_rank_that_never_answers_is_named_after_the_timeout() {
        // Rank 1's port is open (connections queue) but nobody accepts or answers.
        let (mut ls, addrs) = listeners(2);
        let _silent = ls.pop().unwrap();
        let timeout = Duration::from_millis(300);
        let t = Instant::now();
        let err = RingCollective::connect(0, 2, ls.pop().unwrap(), &addrs, timeout).unwrap_err();
        let elapsed = t.elapsed();
        assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(1), "{elapsed:?}");
        assert_eq!(err.culprit(), Some(1), "{err}");
        assert!(err.to_string().contains(&format!("rank 1 ({})", addrs[1])), "{err}");
        assert!(err.is_retryable());
    }

    #[test]
    fn a_rank_that_never_starts_is_named_with_its_address() {
        let (ls, mut addrs) = listeners(2);
        addrs.push(closed_port());
        let timeout = Duration::from_millis(300);
        let errs: Vec<CollectiveError> = std::thread::scope(|s| {
            let handles: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || RingCollective::connect(rank, 3, l, addrs, timeout).unwrap_err())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Rank 0 waits for rank 2 to connect; rank 1 cannot connect to it.
        assert_eq!(errs[0].to_string(), format!("rank 0: rank 2 ({}) did not connect within 300ms", addrs[2]));
        assert_eq!(
            errs[1].to_string(),
            format!("rank 1: could not connect to rank 2 at {} within 300ms: connection refused", addrs[2])
        );
        assert!(errs.iter().all(|e| e.culprit() == Some(2) && e.is_retryable()));
    }

    #[test]
    fn a_wrong_world_size_is_rejected_by_the_handshake() {
        // Rank 0 thinks the world has 2 ranks; rank 1 thinks 3, and that rank 2 is at rank 0's port.
        let (mut ls, addrs) = listeners(2);
        let l1 = ls.pop().unwrap();
        let l0 = ls.pop().unwrap();
        let addrs3 = [addrs[0], addrs[1], addrs[0]];
        let timeout = Duration::from_secs(5);
        let t = Instant::now();
        let (e0, e1) = std::thread::scope(|s| {
            let r1 = s.spawn(|| RingCollective::connect(1, 3, l1, &addrs3, timeout).unwrap_err());
            let e0 = RingCollective::connect(0, 2, l0, &addrs, timeout).unwrap_err();
            (e0, r1.join().unwrap())
        });
        assert!(t.elapsed() < Duration::from_secs(2), "rejection took {:?}", t.elapsed());
        for e in [&e0, &e1] {
            assert!(matches!(e, CollectiveError::Handshake { .. }), "{e}");
            assert!(e.to_string().contains("world size"), "{e}");
            assert!(!e.is_retryable());
        }
    }

    /// A process that speaks the ring protocol, claims to be `rank`, and does not know the secret:
    /// it answers the acceptor's challenge with a made-up tag. Returns whether it got past.
    fn rogue_dial(addr: SocketAddr, rank: usize, world: usize) -> bool {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let hello = Hello { rank, world, segment_bytes: DEFAULT_SEGMENT_BYTES, accepted: true, expects: 0 };
        s.write_all(&hello.encode()).unwrap();
        s.write_all(&[7u8; NONCE_BYTES]).unwrap();
        let mut answer = [0u8; HELLO_BYTES + NONCE_BYTES + MAC_BYTES];
        if s.read_exact(&mut answer).is_err() {
            return false;
        }
        s.write_all(&[0x5a; MAC_BYTES]).unwrap();
        // An acceptor that took the rogue would now wait for its shared-memory offer; one that
        // dropped it closes the connection.
        let mut one = [0u8; 1];
        !matches!(s.read(&mut one), Ok(0) | Err(_))
    }

    #[test]
    fn a_port_scan_and_a_rogue_peer_neither_join_nor_stop_a_forming_ring() {
        let (listeners, addrs) = listeners(2);
        // Before the real rank 0 dials rank 1, rank 1's backlog holds: a scan that connects and
        // closes, one that sends garbage, one that connects and says nothing, and a rogue rank 0.
        drop(TcpStream::connect(addrs[1]).unwrap());
        TcpStream::connect(addrs[1]).unwrap().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let _silent = TcpStream::connect(addrs[1]).unwrap();
        let t = Instant::now();
        let (rogue, sums) = std::thread::scope(|s| {
            let rogue = s.spawn(|| rogue_dial(addrs[1], 0, 2));
            // The rogue gets in line first.
            std::thread::sleep(Duration::from_millis(100));
            let rings: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || {
                        let o = opts(Duration::from_secs(10), DEFAULT_SEGMENT_BYTES, false);
                        let mut ring = RingCollective::connect_with(rank, 2, l, addrs, o).unwrap();
                        let mut buf = vec![rank as f32 + 1.0; 5];
                        ring.all_reduce_sum(&mut buf).unwrap();
                        buf
                    })
                })
                .collect();
            let sums: Vec<Vec<f32>> = rings.into_iter().map(|h| h.join().unwrap()).collect();
            (rogue.join().unwrap(), sums)
        });
        assert!(!rogue, "a peer without the secret was taken into the ring");
        assert!(sums.iter().all(|b| b == &vec![3.0; 5]), "{sums:?}");
        // The silent connection costs one authentication window, no more.
        assert!(t.elapsed() < AUTH_WINDOW + Duration::from_secs(3), "formation took {:?}", t.elapsed());
    }

    #[test]
    fn a_listener_without_the_secret_is_refused_by_name() {
        // Rank 1 is a process of another job (or an old generation) holding rank 1's address.
        let (mut ls, addrs) = listeners(2);
        let l1 = ls.pop().unwrap();
        let l0 = ls.pop().unwrap();
        let timeout = Duration::from_secs(3);
        let (e0, r1) = std::thread::scope(|s| {
            let r1 = s.spawn(|| {
                let o = RingOptions { secret: b"another job".to_vec(), ..opts(timeout, DEFAULT_SEGMENT_BYTES, false) };
                RingCollective::connect_with(1, 2, l1, &addrs, o)
            });
            let e0 = RingCollective::connect_with(0, 2, l0, &addrs, opts(timeout, DEFAULT_SEGMENT_BYTES, false));
            (e0.unwrap_err(), r1.join().unwrap().unwrap_err())
        });
        // Whoever dials first is refused by name and gives up; the other side may then find no
        // listener at all (a retryable failure) rather than a wrong one.
        let refused = |e: &CollectiveError| {
            matches!(e, CollectiveError::Handshake { .. })
                && e.to_string().contains("does not hold this group's ring secret")
                && !e.is_retryable()
        };
        assert!(refused(&e0) || refused(&r1), "{e0} / {r1}");
        for e in [&e0, &r1] {
            assert!(refused(e) || e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn a_timeout_names_the_operation_and_the_silent_rank() {
        let (ls, addrs) = listeners(2);
        let timeout = Duration::from_millis(300);
        let (done_tx, done_rx) = mpsc::channel::<()>();
        std::thread::scope(|s| {
            let mut ls = ls.into_iter();
            let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
            let addrs = &addrs;
            // Rank 1 forms the ring, then never calls all_reduce (until rank 0 is done).
            s.spawn(move || {
                let _ring = RingCollective::connect(1, 2, l1, addrs, timeout).unwrap();
                let _ = done_rx.recv();
            });
            let mut ring = RingCollective::connect(0, 2, l0, addrs, timeout).unwrap();
            let mut buf = vec![1.0; 10];
            let t = Instant::now();
            let err = ring.all_reduce_mean(&mut buf).unwrap_err();
            assert!(t.elapsed() >= timeout && t.elapsed() < timeout + Duration::from_secs(1), "{:?}", t.elapsed());
            assert_eq!(
                err.to_string(),
                format!("rank 0: all_reduce timed out after 300ms waiting for rank 1 ({})", addrs[1])
            );
            assert!(err.is_retryable());
            // The ring is not reused after a failure.
            let again = ring.barrier().unwrap_err();
            assert!(matches!(again, CollectiveError::Broken { .. }), "{again}");
            assert!(again.to_string().contains("timed out"), "{again}");
            done_tx.send(()).unwrap();
        });
    }

    #[test]
    fn a_rank_that_dies_mid_all_reduce_is_named_by_every_other_rank() {
        for shm in SHM {
            a_rank_dies_mid_all_reduce(shm);
        }
    }

    fn a_rank_dies_mid_all_reduce(shm: bool) {
        let n = 3;
        let (ls, addrs) = listeners(n);
        let timeout = Duration::from_secs(10);
        let len = 2_621_447;
        let t = Instant::now();
        let errs: Vec<Option<CollectiveError>> = std::thread::scope(|s| {
            let handles: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || {
                        let options = opts(timeout, DEFAULT_SEGMENT_BYTES, shm);
                        let ring = RingCollective::connect_with(rank, n, l, addrs, options).unwrap();
                        expect_transport(&ring, shm);
                        if rank == 2 {
                            // Take part in the first megabyte of the all-reduce, then die.
                            let prev = &ring.links.as_ref().unwrap().prev;
                            let mut got = vec![0u8; 1 << 20];
                            prev.read_exact(&mut got, &mut Timer::new(Instant::now() + timeout, Direction::Read))
                                .unwrap();
                            drop(ring);
                            return None;
                        }
                        let mut ring = ring;
                        let mut buf: Vec<f32> = (0..len).map(|i| value(i, rank)).collect();
                        Some(ring.all_reduce_mean(&mut buf).unwrap_err())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Failures are seen when they happen, not when the deadline passes.
        assert!(t.elapsed() < Duration::from_secs(5), "shm {shm}: took {:?}", t.elapsed());
        for (rank, err) in errs.iter().enumerate().take(2) {
            let err = err.as_ref().unwrap();
            assert_eq!(err.culprit(), Some(2), "shm {shm}, rank {rank}: {err}");
            assert!(err.to_string().contains(&format!("rank 2 ({})", addrs[2])), "rank {rank}: {err}");
            assert!(err.is_retryable(), "rank {rank}: {err}");
        }
    }

    #[test]
    fn a_rank_that_gave_up_fails_its_peers_next_call_at_once() {
        // Rank 1 times out (rank 0 is late) and closes its ring; rank 0's late call, much larger
        // than the socket buffers, must fail at once rather than at its own, long, deadline.
        let (ls, addrs) = listeners(2);
        let (gave_up_tx, gave_up_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let len = 3_000_000;
        std::thread::scope(|s| {
            let mut ls = ls.into_iter();
            let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
            let addrs = &addrs;
            s.spawn(move || {
                let options = RingOptions::new(Duration::from_millis(200));
                let mut ring = RingCollective::connect_with(1, 2, l1, addrs, options).unwrap();
                let err = ring.all_reduce_mean(&mut vec![1.0; len]).unwrap_err();
                assert!(matches!(err, CollectiveError::Timeout { peer: 0, .. }), "{err}");
                gave_up_tx.send(()).unwrap();
                // The failed collective stays alive until rank 0 is done: its connections must be
                // closed all the same.
                let _ = done_rx.recv_timeout(Duration::from_secs(10));
                drop(ring);
            });
            let mut ring = RingCollective::connect(0, 2, l0, addrs, Duration::from_secs(10)).unwrap();
            gave_up_rx.recv().unwrap();
            let t = Instant::now();
            let err = ring.all_reduce_mean(&mut vec![1.0; len]).unwrap_err();
            let elapsed = t.elapsed();
            done_tx.send(()).unwrap();
            assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}: {err}");
            let blames_a_rank = matches!(
                &err,
                CollectiveError::PeerClosed { peer: 1, .. }
                    | CollectiveError::Aborted { observer: 1, culprit: 0, reason: AbortReason::Timeout, .. }
            );
            assert!(blames_a_rank, "{err}");
        });
    }

    #[test]
    fn mismatched_calls_fail_on_both_sides_without_waiting_for_the_deadline() {
        let t = Instant::now();
        let errs = with_ring(2, RingOptions::new(Duration::from_secs(10)), |ring| {
            // Large enough that neither side's data fits in the socket buffers.
            let mut buf = vec![1.0; if ring.rank() == 0 { 3_000_000 } else { 3_000_001 }];
            ring.all_reduce_mean(&mut buf).unwrap_err()
        });
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        for e in &errs {
            assert!(matches!(e, CollectiveError::Mismatch { .. }), "{e}");
            let text = e.to_string();
            assert!(text.contains("3000000 values") && text.contains("3000001 values"), "{text}");
            assert!(!e.is_retryable());
        }
    }

    #[test]
    fn scaling_by_an_exact_reciprocal_is_dividing_bit_for_bit() {
        // Finite values of every magnitude, subnormals included.
        let src: Vec<f32> =
            (0..4096u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))).filter(|x| x.is_finite()).collect();
        let dst: Vec<f32> = src.iter().rev().map(|x| x * 0.75 + 1e-39).collect();
        for n in [2usize, 4, 8, 64] {
            let (mut scaled, mut divided) = (dst.clone(), dst.clone());
            add_scale_into(&mut scaled, &src, 1.0 / n as f32);
            add_div_into(&mut divided, &src, n as f32);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&scaled), bits(&divided), "n {n}");
        }
    }

    /// The (step, segment) frames a rank sends: its own at step 0, every forwarded one a step later.
    fn sent(plan: &Plan) -> Vec<(usize, usize)> {
        let forwarded = plan.steps.iter().enumerate().filter(|(_, st)| st.forward);
        let mut tags: Vec<(usize, usize)> = plan
            .first_sends
            .iter()
            .map(|&id| (0, id))
            .chain(forwarded.flat_map(|(s, st)| st.segs.clone().map(move |id| (s + 1, id))))
            .collect();
        tags.sort_unstable();
        tags
    }

    fn expected(plan: &Plan) -> Vec<(usize, usize)> {
        let mut tags: Vec<(usize, usize)> =
            plan.steps.iter().enumerate().flat_map(|(s, st)| st.segs.clone().map(move |id| (s, id))).collect();
        tags.sort_unstable();
        tags
    }

    #[test]
    fn plans_agree_between_neighbours() {
        // What rank r sends must be exactly what rank r+1 expects, each frame once.
        for n in 2..=5 {
            for (len, seg) in [(0, 4), (1, 4), (10, 3), (1000, 7)] {
                let plans: Vec<Plan> = (0..n).map(|r| Plan::all_reduce(len, n, r, seg, true)).collect();
                for r in 0..n {
                    let sent = sent(&plans[r]);
                    assert_eq!(sent, expected(&plans[(r + 1) % n]), "n {n}, len {len}, seg {seg}, rank {r}");
                    assert!(sent.windows(2).all(|w| w[0] != w[1]), "a frame sent twice");
                    // Every value is received in all-gather except those of the chunk the rank
                    // completes itself.
                    let copied: usize = plans[r]
                        .steps
                        .iter()
                        .filter(|st| st.mode == Mode::Copy)
                        .flat_map(|st| st.segs.clone())
                        .map(|id| plans[r].ranges[id].len())
                        .sum();
                    let own = (r + 1) % n;
                    assert_eq!(copied, len - (split_point(len, n, own + 1) - split_point(len, n, own)));
                }
                for root in [0, n - 1] {
                    let plans: Vec<Plan> = (0..n).map(|r| Plan::broadcast(len, n, r, root, seg)).collect();
                    for r in 0..n {
                        let next = (r + 1) % n;
                        assert_eq!(sent(&plans[r]), expected(&plans[next]), "broadcast from {root}: n {n}, rank {r}");
                    }
                }
            }
        }
    }
}
