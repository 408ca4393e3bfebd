//! Collectives: how data-parallel workers agree on numbers. All-reduce (sum or mean) of a flat `f32`
//! buffer, broadcast from one rank, barrier.
//!
//! [`Collective`] is what the trainer sees; an engine implements it:
//! - [`SingleProcess`]: a world of one, where every operation is a no-op that succeeds;
//! - [`RingCollective`] (`ring.rs`): CPU workers over TCP, with the bandwidth-optimal ring
//!   all-reduce (reduce-scatter then all-gather, segments pipelined in both directions). Two
//!   neighbours on one host pass the data through a shared-memory pipe instead (`shm.rs`, Linux).
//!
//! `nccl.rs` (cargo feature `nccl`) is NCCL between GPUs through cudarc, loaded at run time: on a
//! machine without libcuda/libnccl it fails with a clear error, never a panic.
//!
//! The contract of every engine:
//! - An operation blocks the calling thread until it is complete on this rank (helper threads it
//!   starts are joined before it returns). It never runs on an async runtime's worker threads: call
//!   it from the training thread, or through `spawn_blocking`.
//! - Every rank calls the same operations in the same order, with the same lengths (and root). A
//!   mismatch is detected and reported as [`CollectiveError::Mismatch`], never silently mixed.
//! - Every operation has a deadline. A timeout names the operation and the rank it was waiting for;
//!   a failed rank is named by every rank whose operation fails because of it.
//! - All or nothing: `Ok` means every element of the buffer holds the result, bitwise identical on
//!   every rank, so replicas never drift apart. It never silently returns a partial result: on `Err`
//!   the buffer's contents are unspecified (partly reduced) and must not be used, and the engine
//!   refuses every later operation ([`CollectiveError::Broken`]); form a new group.

use std::net::SocketAddr;
use std::time::Duration;

#[cfg(feature = "nccl")]
mod nccl;
mod ring;
#[cfg(target_os = "linux")]
mod shm;

#[cfg(feature = "nccl")]
pub use nccl::{nccl_available, new_unique_id, NcclCollective, NCCL_UNIQUE_ID_BYTES};
pub use ring::{RingCollective, RingOptions, DEFAULT_SEGMENT_BYTES};

/// The operations of a group of `world_size` ranks; see the module documentation for the contract.
pub trait Collective: Send {
    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Replaces `buf` on every rank by the element-wise sum over all ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// Replaces `buf` on every rank by the element-wise mean over all ranks (the sum, divided once by
    /// the world size).
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// [`Collective::all_reduce_mean`] of a tensor's elements, in place: `t` is an `f32` tensor.
    /// A contiguous CPU tensor is reduced where it lies (no copy); anything else goes through a
    /// host buffer. The NCCL engine overrides it to reduce CUDA tensors on the GPU.
    fn all_reduce_mean_tensor(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        with_host_f32(self.rank(), t, |buf| self.all_reduce_mean(buf))
    }

    /// Replaces `buf` on every rank by `root`'s `buf`. Every rank passes a buffer of the same length.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// Runs `f` on the elements of the `f32` tensor `t` as a host slice, and leaves what `f` wrote
/// in `t`: in place for a contiguous CPU tensor, through a copy otherwise.
pub fn with_host_f32(
    rank: usize,
    t: &mut tch::Tensor,
    f: impl FnOnce(&mut [f32]) -> Result<(), CollectiveError>,
) -> Result<(), CollectiveError> {
    if t.kind() != tch::Kind::Float {
        return Err(CollectiveError::InvalidArgument { rank, reason: format!("needs an f32 tensor, got {:?}", t.kind()) });
    }
    let n = t.numel();
    if t.device() == tch::Device::Cpu && t.is_contiguous() {
        if n == 0 {
            return f(&mut []);
        }
        // SAFETY: a contiguous CPU f32 tensor holds `n` f32 at `data_ptr`; `t` is borrowed
        // mutably for the whole call, so nothing else reads or writes them meanwhile.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) };
        return f(buf);
    }
    let mut buf = vec![0f32; n];
    t.to_device(tch::Device::Cpu).contiguous().copy_data(&mut buf, n);
    f(&mut buf)?;
    let back = tch::Tensor::from_slice(&buf).view(t.size().as_slice()).to_device(t.device());
    tch::no_grad(|| t.copy_(&back));
    Ok(())
}

/// A group of one process: every operation leaves the buffer as it is and succeeds.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_mean(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn broadcast(&mut self, _buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root != 0 {
            return Err(CollectiveError::InvalidArgument {
                rank: 0,
                reason: format!("broadcast root {root} is out of range for a world of 1"),
            });
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// The operation an error happened in, as it appears in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Forming the group: connecting, accepting and the handshake.
    Connect,
    AllReduce,
    Broadcast,
    Barrier,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Connect => "connect",
            Operation::AllReduce => "all_reduce",
            Operation::Broadcast => "broadcast",
            Operation::Barrier => "barrier",
        })
    }
}

/// What a rank observed when it aborted an operation, as passed on to the other ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// The culprit closed its connection (it exited, crashed or dropped its collective).
    Closed,
    /// The culprit did not send or receive within the deadline.
    Timeout,
    /// The culprit called a different operation, length or root.
    Mismatch,
    /// The culprit sent bytes that are not the protocol.
    Protocol,
    /// Another network error on the connection with the culprit.
    Io,
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AbortReason::Closed => "saw the connection closed by",
            AbortReason::Timeout => "timed out waiting for",
            AbortReason::Mismatch => "found a mismatched call on",
            AbortReason::Protocol => "received invalid data from",
            AbortReason::Io => "had a network error with",
        })
    }
}

/// Errors of a collective group. `rank` is always the rank that reports the error; `peer` and
/// `culprit` the rank it blames.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank}: invalid collective call: {reason}")]
    InvalidArgument { rank: usize, reason: String },

    #[error("rank {rank}: could not connect to rank {peer} at {addr} within {timeout:?}: connection refused")]
    ConnectionRefused { rank: usize, peer: usize, addr: SocketAddr, timeout: Duration },

    #[error("rank {rank}: rank {peer} ({addr}) did not connect within {timeout:?}")]
    NotConnected { rank: usize, peer: usize, addr: SocketAddr, timeout: Duration },

    #[error("rank {rank}: handshake with {addr} rejected: {reason}")]
    Handshake { rank: usize, addr: SocketAddr, reason: String },

    #[error("rank {rank}: {op} timed out after {timeout:?} waiting for rank {peer} ({addr})")]
    Timeout { rank: usize, op: Operation, peer: usize, addr: SocketAddr, timeout: Duration },

    #[error("rank {rank}: rank {peer} ({addr}) closed the connection during {op}")]
    PeerClosed { rank: usize, op: Operation, peer: usize, addr: SocketAddr },

    #[error("rank {rank}: {op} aborted: rank {observer} {reason} rank {culprit} ({culprit_addr})")]
    Aborted {
        rank: usize,
        op: Operation,
        observer: usize,
        reason: AbortReason,
        culprit: usize,
        culprit_addr: SocketAddr,
    },

    #[error("rank {rank}: {op} does not match rank {peer} ({addr}): {detail}")]
    Mismatch { rank: usize, op: Operation, peer: usize, addr: SocketAddr, detail: String },

    #[error("rank {rank}: invalid data from rank {peer} ({addr}) during {op}: {detail}")]
    Protocol { rank: usize, op: Operation, peer: usize, addr: SocketAddr, detail: String },

    #[error("rank {rank}: {op} with rank {peer} ({addr}) failed: {source}")]
    Io {
        rank: usize,
        op: Operation,
        peer: usize,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("rank {rank}: {op} refused: the group is unusable after an earlier error ({first}); form a new one")]
    Broken { rank: usize, op: Operation, first: String },
}

impl CollectiveError {
    /// The peer whose connection closed (end of stream, reset, broken pipe), when that is the
    /// error: its process is gone, which a timeout does not prove.
    pub fn closed_peer(&self) -> Option<usize> {
        use std::io::ErrorKind as K;
        match self {
            CollectiveError::PeerClosed { peer, .. } => Some(*peer),
            CollectiveError::Aborted { reason: AbortReason::Closed, culprit, .. } => Some(*culprit),
            CollectiveError::Io { peer, source, .. }
                if matches!(
                    source.kind(),
                    K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted
                ) =>
            {
                Some(*peer)
            }
            _ => None,
        }
    }

    /// Whether forming the group again and retrying may succeed: a peer that is late, died, was slow
    /// or had a network error. Configuration and programming errors (invalid arguments, handshake
    /// rejections, mismatched calls) fail again, as does any call on a broken group.
    pub fn is_retryable(&self) -> bool {
        match self {
            CollectiveError::ConnectionRefused { .. }
            | CollectiveError::NotConnected { .. }
            | CollectiveError::Timeout { .. }
            | CollectiveError::PeerClosed { .. }
            | CollectiveError::Io { .. } => true,
            CollectiveError::Aborted { reason, .. } => {
                matches!(reason, AbortReason::Closed | AbortReason::Timeout | AbortReason::Io)
            }
            CollectiveError::InvalidArgument { .. }
            | CollectiveError::Handshake { .. }
            | CollectiveError::Mismatch { .. }
            | CollectiveError::Protocol { .. }
            | CollectiveError::Broken { .. } => false,
        }
    }

    /// The rank this error blames: the one that did not connect, did not answer, closed its
    /// connection or called something else; for an aborted operation, the rank the observer blamed.
    pub fn culprit(&self) -> Option<usize> {
        match self {
            CollectiveError::ConnectionRefused { peer, .. }
            | CollectiveError::NotConnected { peer, .. }
            | CollectiveError::Timeout { peer, .. }
            | CollectiveError::PeerClosed { peer, .. }
            | CollectiveError::Mismatch { peer, .. }
            | CollectiveError::Protocol { peer, .. }
            | CollectiveError::Io { peer, .. } => Some(*peer),
            CollectiveError::Aborted { culprit, .. } => Some(*culprit),
            CollectiveError::InvalidArgument { .. }
            | CollectiveError::Handshake { .. }
            | CollectiveError::Broken { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_is_a_working_no_op() {
        let mut c = SingleProcess;
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let mut buf = vec![1.5, -2.0, 3.25];
        c.all_reduce_mean(&mut buf).unwrap();
        c.all_reduce_sum(&mut buf).unwrap();
        c.broadcast(&mut buf, 0).unwrap();
        c.barrier().unwrap();
        assert_eq!(buf, [1.5, -2.0, 3.25]);
        let err = c.broadcast(&mut buf, 1).unwrap_err();
        assert!(err.to_string().contains("root 1 is out of range"), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn timeout_message_names_operation_rank_and_address() {
        let err = CollectiveError::Timeout {
            rank: 0,
            op: Operation::AllReduce,
            peer: 1,
            addr: "127.0.0.1:4567".parse().unwrap(),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(err.to_string(), "rank 0: all_reduce timed out after 30s waiting for rank 1 (127.0.0.1:4567)");
        assert!(err.is_retryable());
        assert_eq!(err.culprit(), Some(1));
    }
}

/// An operation as the engines' call checks see it (ranks making different calls must fail, not
/// mix data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Sum,
    Mean,
    Broadcast(usize),
    Barrier,
}

impl Call {
    pub(crate) fn op(self) -> Operation {
        match self {
            Call::Sum | Call::Mean => Operation::AllReduce,
            Call::Broadcast(_) => Operation::Broadcast,
            Call::Barrier => Operation::Barrier,
        }
    }

    /// A stable number per kind of call, for the wire.
    pub(crate) fn code(self) -> u32 {
        match self {
            Call::Sum => 1,
            Call::Mean => 2,
            Call::Broadcast(_) => 3,
            Call::Barrier => 4,
        }
    }
}
