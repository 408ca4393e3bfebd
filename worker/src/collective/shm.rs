//! The ring's same-host link: a one-way byte pipe in shared memory between two processes.
//!
//! Two ring neighbours on one machine need not pay for TCP over loopback, where every byte is copied
//! into a kernel buffer and out again with two system calls and the socket machinery in between. A
//! pipe is a ring buffer in a file in `/dev/shm` that both processes map: the writer copies bytes in,
//! the reader copies (or adds) them out, and the only system calls are futex waits and wakes when
//! one side has to wait for the other. (NCCL does the same between GPUs of one host.)
//!
//! It is set up over the TCP connection the ring has formed anyway, which stays open beside it: the
//! writer creates the file, reserves its pages (so a full `/dev/shm` is an error now, not a `SIGBUS`
//! later) and offers its path with a random nonce; the reader maps it and accepts only if it finds
//! the nonce, which proves both see the same file (same host, same `/dev/shm`); the writer then
//! unlinks the file, so nothing is left behind whatever happens to either process. Otherwise both
//! stay on TCP.
//!
//! Failure: each end marks the pipe closed when dropped and wakes the other; a process that dies
//! without that closes its TCP socket, which a waiting end checks whenever a wait times out (every
//! [`WAIT_SLICE`]). So a dead peer is seen within milliseconds, as on TCP, and every wait is bounded
//! by the caller's deadline.
//!
//! Layout: a 4 KiB header (magic, nonce, capacity; the writer's and the reader's counters on their
//! own cache lines) and `capacity` bytes of data. `head` counts bytes ever written, `tail` bytes ever
//! read; the writer alone stores `head`, the reader alone `tail`. Every message is a multiple of 4
//! bytes and so is the capacity, so the data the reader sees is always `f32`-aligned.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ring::LinkError;

const MAGIC: u64 = u64::from_le_bytes(*b"THAWSHM1");
const HEADER_BYTES: usize = 4096;
/// Bytes of data in a pipe: four default segments, so a segment can be written while the one before
/// is still being read.
pub const CAPACITY: usize = 4 << 20;
/// Longest a waiting end sleeps before it checks the deadline and whether its peer still lives.
const WAIT_SLICE: Duration = Duration::from_millis(5);
/// Checks of the other end's counter before going to sleep: a neighbour that is about to publish
/// usually does so within this, and a futex round trip costs more.
const SPINS: u32 = 200;

/// The offer's fixed size on the wire: magic, nonce, path length, path.
pub const OFFER_BYTES: usize = 256;
const MAX_PATH: usize = OFFER_BYTES - 20;

// Header offsets. The writer's and the reader's words sit on separate cache lines.
const OFF_MAGIC: usize = 0;
const OFF_NONCE: usize = 8;
const OFF_CAPACITY: usize = 16;
const OFF_HEAD: usize = 64;
const OFF_HEAD_SEQ: usize = 72;
const OFF_READER_SLEEPS: usize = 76;
const OFF_WRITER_CLOSED: usize = 80;
const OFF_TAIL: usize = 128;
const OFF_TAIL_SEQ: usize = 136;
const OFF_WRITER_SLEEPS: usize = 140;
const OFF_READER_CLOSED: usize = 144;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Writer,
    Reader,
}

/// One end of a pipe. The mapping is shared with exactly one other process, which holds the other
/// end; the socket is the TCP connection to it, kept open to notice its death.
pub struct Pipe {
    base: *mut u8,
    capacity: usize,
    role: Role,
    socket: TcpStream,
}

// The mapping is only reached through the atomics of the header and the data area, whose ownership
// the head and tail counters hand over between the two ends.
unsafe impl Send for Pipe {}
unsafe impl Sync for Pipe {}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe").field("role", &self.role).field("capacity", &self.capacity).finish()
    }
}

/// Whether this process should offer or accept shared-memory links: yes unless `THAW_RING_SHM=0`.
pub fn enabled_by_env() -> bool {
    std::env::var("THAW_RING_SHM").map_or(true, |v| v != "0")
}

/// Where pipes are created; `None` where there is no shared-memory file system.
fn shm_dir() -> Option<&'static Path> {
    let dir = Path::new("/dev/shm");
    dir.is_dir().then_some(dir)
}

/// The writer's half-built pipe: mapped and filled in, offered, not yet accepted.
pub struct Offer {
    path: PathBuf,
    nonce: u64,
    /// Taken when the offer is accepted.
    map: Option<Mapping>,
}

impl Offer {
    /// Creates and maps a fresh pipe file; `None` (with the reason logged) where that is impossible,
    /// in which case the link stays on TCP.
    pub fn create(rank: usize) -> Option<Offer> {
        let dir = shm_dir()?;
        let nonce: u64 = rand::random();
        let path = dir.join(format!("thaw-ring-{}-{rank}-{nonce:016x}", std::process::id()));
        let made = (|| {
            let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
            let len = HEADER_BYTES + CAPACITY;
            // Reserve every page now: tmpfs would otherwise allocate on first touch and a full
            // /dev/shm would kill the process with SIGBUS in the middle of an all-reduce.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let map = Mapping::new(&file, len)?;
            unsafe {
                word64(map.ptr, OFF_CAPACITY).store(CAPACITY as u64, Ordering::Relaxed);
                word64(map.ptr, OFF_NONCE).store(nonce, Ordering::Relaxed);
                word64(map.ptr, OFF_MAGIC).store(MAGIC, Ordering::Release);
            }
            Ok::<_, io::Error>(map)
        })();
        match made {
            Ok(map) if path.as_os_str().len() <= MAX_PATH => Some(Offer { path, nonce, map: Some(map) }),
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
                None
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::debug!(path = %path.display(), error = %e, "no shared-memory link; staying on TCP");
                None
            }
        }
    }

    /// The offer as sent to the reader.
    pub fn encode(&self) -> [u8; OFFER_BYTES] {
        encode_offer(Some((&self.path, self.nonce)))
    }

    /// The reader accepted: the file is unlinked (both ends have it mapped) and the pipe is live.
    pub fn accepted(mut self, socket: TcpStream) -> io::Result<Pipe> {
        let _ = std::fs::remove_file(&self.path);
        let map = self.map.take().ok_or_else(|| io::Error::other("offer already accepted"))?;
        Pipe::new(map, Role::Writer, socket)
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        // Declined or abandoned: the file must not outlive the offer. (After `accepted` it is gone.)
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The offer of a writer that has no pipe to offer.
pub fn no_offer() -> [u8; OFFER_BYTES] {
    encode_offer(None)
}

fn encode_offer(offer: Option<(&Path, u64)>) -> [u8; OFFER_BYTES] {
    let mut out = [0u8; OFFER_BYTES];
    out[..8].copy_from_slice(&MAGIC.to_le_bytes());
    if let Some((path, nonce)) = offer {
        let bytes = path.as_os_str().as_encoded_bytes();
        out[8..16].copy_from_slice(&nonce.to_le_bytes());
        out[16..20].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        out[20..20 + bytes.len()].copy_from_slice(bytes);
    }
    out
}

/// What a reader makes of an offer.
pub enum Answer {
    /// Not an offer at all: the peer does not speak this protocol.
    Malformed,
    /// The writer offered nothing, or the offered file is not reachable from here.
    Declined,
    Mapped(Mapping),
}

/// The reader's side: maps the offered file if it is the one the writer made (the nonce matches).
pub fn answer(offer: &[u8; OFFER_BYTES]) -> Answer {
    if offer[..8] != MAGIC.to_le_bytes() {
        return Answer::Malformed;
    }
    let len = u32::from_le_bytes(offer[16..20].try_into().unwrap_or_default()) as usize;
    if len == 0 {
        return Answer::Declined;
    }
    if len > MAX_PATH {
        return Answer::Malformed;
    }
    let nonce = u64::from_le_bytes(offer[8..16].try_into().unwrap_or_default());
    let Ok(path) = std::str::from_utf8(&offer[20..20 + len]) else { return Answer::Malformed };
    // Only a pipe file in this machine's shared-memory directory, never an arbitrary path.
    let path = Path::new(path);
    if shm_dir().is_none_or(|dir| path.parent() != Some(dir)) {
        return Answer::Declined;
    }
    let mapped = (|| {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = HEADER_BYTES + CAPACITY;
        if file.metadata()?.len() != len as u64 {
            return Err(io::Error::other("wrong size"));
        }
        Mapping::new(&file, len)
    })();
    match mapped {
        Ok(map) => unsafe {
            let ok = word64(map.ptr, OFF_MAGIC).load(Ordering::Acquire) == MAGIC
                && word64(map.ptr, OFF_NONCE).load(Ordering::Relaxed) == nonce
                && word64(map.ptr, OFF_CAPACITY).load(Ordering::Relaxed) == CAPACITY as u64;
            if ok {
                Answer::Mapped(map)
            } else {
                Answer::Declined
            }
        },
        Err(_) => Answer::Declined,
    }
}

impl Pipe {
    pub fn new(map: Mapping, role: Role, socket: TcpStream) -> io::Result<Pipe> {
        // From now on the socket only tells whether the peer lives: a non-blocking peek that returns
        // 0 bytes means it has gone.
        socket.set_nonblocking(true)?;
        let base = map.ptr;
        std::mem::forget(map);
        Ok(Pipe { base, capacity: CAPACITY, role, socket })
    }

    fn word64(&self, off: usize) -> &AtomicU64 {
        unsafe { word64(self.base, off) }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn data(&self) -> *mut u8 {
        unsafe { self.base.add(HEADER_BYTES) }
    }

    /// Writes all of `src` (a multiple of 4 bytes), waiting for room until `deadline`.
    pub fn write_all(&self, mut src: &[u8], deadline: Instant) -> Result<(), LinkError> {
        debug_assert_eq!(self.role, Role::Writer);
        debug_assert_eq!(src.len() % 4, 0);
        let (head, tail) = (self.word64(OFF_HEAD), self.word64(OFF_TAIL));
        while !src.is_empty() {
            let h = head.load(Ordering::Relaxed);
            let free = self.capacity - (h - tail.load(Ordering::Acquire)) as usize;
            if free == 0 {
                self.wait(OFF_TAIL_SEQ, OFF_WRITER_SLEEPS, OFF_READER_CLOSED, deadline, || {
                    tail.load(Ordering::Acquire) != h - self.capacity as u64
                })?;
                continue;
            }
            let at = (h % self.capacity as u64) as usize;
            let k = free.min(src.len()).min(self.capacity - at);
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.data().add(at), k) };
            head.store(h + k as u64, Ordering::Release);
            self.publish(OFF_HEAD_SEQ, OFF_READER_SLEEPS);
            src = &src[k..];
        }
        Ok(())
    }

    /// Reads exactly `len` bytes (a multiple of 4), handing them to `take` in contiguous pieces as
    /// they arrive, waiting until `deadline`. The pieces are `f32`-aligned.
    pub fn read_with(&self, mut len: usize, deadline: Instant, mut take: impl FnMut(&[u8])) -> Result<(), LinkError> {
        debug_assert_eq!(self.role, Role::Reader);
        debug_assert_eq!(len % 4, 0);
        let (head, tail) = (self.word64(OFF_HEAD), self.word64(OFF_TAIL));
        while len > 0 {
            let t = tail.load(Ordering::Relaxed);
            let avail = (head.load(Ordering::Acquire) - t) as usize;
            if avail == 0 {
                self.wait(OFF_HEAD_SEQ, OFF_READER_SLEEPS, OFF_WRITER_CLOSED, deadline, || {
                    head.load(Ordering::Acquire) != t
                })?;
                continue;
            }
            let at = (t % self.capacity as u64) as usize;
            let k = avail.min(len).min(self.capacity - at);
            take(unsafe { std::slice::from_raw_parts(self.data().add(at), k) });
            tail.store(t + k as u64, Ordering::Release);
            self.publish(OFF_TAIL_SEQ, OFF_WRITER_SLEEPS);
            len -= k;
        }
        Ok(())
    }

    /// Reads exactly `dst.len()` bytes.
    pub fn read_exact(&self, dst: &mut [u8], deadline: Instant) -> Result<(), LinkError> {
        let mut done = 0;
        self.read_with(dst.len(), deadline, |piece| {
            dst[done..done + piece.len()].copy_from_slice(piece);
            done += piece.len();
        })
    }

    /// After moving a counter: bumps the futex word and wakes the other end if it sleeps on it.
    fn publish(&self, seq: usize, sleeps: usize) {
        self.word32(seq).fetch_add(1, Ordering::SeqCst);
        if self.word32(sleeps).load(Ordering::SeqCst) != 0 {
            futex_wake(self.word32(seq));
        }
    }

    /// Waits until `ready()`: spins briefly, then sleeps on the futex word `seq` in slices, checking
    /// the deadline, the other end's closed flag and its socket between slices.
    fn wait(
        &self,
        seq: usize,
        sleeps: usize,
        peer_closed: usize,
        deadline: Instant,
        ready: impl Fn() -> bool,
    ) -> Result<(), LinkError> {
        for _ in 0..SPINS {
            if ready() {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let (seq, sleeps) = (self.word32(seq), self.word32(sleeps));
        loop {
            let s = seq.load(Ordering::SeqCst);
            sleeps.store(1, Ordering::SeqCst);
            if ready() {
                sleeps.store(0, Ordering::SeqCst);
                return Ok(());
            }
            // Closed with nothing left to take: what the peer wrote before closing has been read.
            if self.word32(peer_closed).load(Ordering::Acquire) != 0 {
                sleeps.store(0, Ordering::SeqCst);
                return Err(LinkError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                sleeps.store(0, Ordering::SeqCst);
                return Err(LinkError::TimedOut);
            }
            let woken = futex_wait(seq, s, left.min(WAIT_SLICE));
            sleeps.store(0, Ordering::SeqCst);
            if !woken && self.peer_gone() && !ready() {
                return Err(LinkError::Closed);
            }
        }
    }

    /// Whether the peer's end of the TCP connection is closed (the process exited or was killed).
    fn peer_gone(&self) -> bool {
        match self.socket.peek(&mut [0u8; 1]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let (closed, seq) = match self.role {
            Role::Writer => (OFF_WRITER_CLOSED, OFF_HEAD_SEQ),
            Role::Reader => (OFF_READER_CLOSED, OFF_TAIL_SEQ),
        };
        self.word32(closed).store(1, Ordering::Release);
        self.word32(seq).fetch_add(1, Ordering::SeqCst);
        futex_wake(self.word32(seq));
        unsafe { libc::munmap(self.base.cast(), HEADER_BYTES + self.capacity) };
    }
}

/// A shared mapping of a whole file, unmapped on drop unless a [`Pipe`] took it over.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: usize) -> io::Result<Mapping> {
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// # Safety
/// `base + off` must lie in a live mapping and be 8-aligned.
unsafe fn word64<'a>(base: *mut u8, off: usize) -> &'a AtomicU64 {
    unsafe { &*(base.add(off) as *const AtomicU64) }
}

/// Sleeps while `*word == expected`, at most `timeout`; whether it was woken (or the word had
/// already changed) rather than timed out.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> bool {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // Not FUTEX_PRIVATE_FLAG: the word is shared between processes.
    let rc = unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec)
    };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ETIMEDOUT)
}

fn futex_wake(word: &AtomicU32) {
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// The reader's answers to an offer.
pub const YES: [u8; 8] = *b"SHMYES\0\0";
pub const NO: [u8; 8] = *b"SHMNO\0\0\0";
