//! The GPU engine: NCCL through `cudarc`, one rank per GPU (cargo feature `nccl`).
//!
//! `libcuda.so` and `libnccl.so` are opened at run time (cudarc's `dynamic-loading`), so this
//! module builds on any machine and [`nccl_available`] tells, before any cudarc call that could
//! panic, whether this one can run it. PyPI's `nvidia-nccl-cu13` ships `libnccl.so.2`, a name
//! cudarc does not try: link it as `libnccl.so` (`scripts/gpu-check.sh` shows how).
//!
//! [`Collective`] works on host buffers, so an operation copies the buffer to a device buffer (kept
//! and grown as needed), runs NCCL on this engine's own stream, and copies the result back. The
//! mean is NCCL's sum divided once on the host, as the contract says. For gradients already on
//! the GPU, [`Collective::all_reduce_mean_tensor`] skips both copies: the bucket is summed in place
//! on the engine's stream, which first waits (an event, on the GPU: the host does not block) for
//! the work torch had queued, so the training thread can go on queueing backward kernels while
//! NCCL reduces the buckets it already handed over.
//!
//! How the contract of `collective/mod.rs` is met with NCCL:
//! - Deadlines: the communicator is non-blocking (`ncclConfig_t.blocking = 0`); the calling thread
//!   polls `ncclCommGetAsyncError` and the stream until the operation is done, and at the deadline
//!   calls `ncclCommAbort`, which also stops kernels waiting for a lost peer (NCCL's documented
//!   recipe). NCCL does not say which rank it was waiting for, so a timeout names none. Waits that
//!   only involve this GPU (the copies, and the stream's wait for torch's work in the tensor path)
//!   are not bounded.
//! - Mismatched calls: NCCL itself would hang or mix data. Before each operation every rank
//!   all-reduces a small header (operation, length, root, call number) to its maximum and minimum
//!   (one extra 64-byte NCCL call); if they differ, every rank sees it and fails before any data
//!   moves. This is also the barrier, since an all-reduce needs every rank.
//! - Errors: `CollectiveError` has no variant for an engine without peer addresses yet, so set-up
//!   failures (libraries, arguments, CUDA) are `InvalidArgument`, and a failure after NCCL started
//!   talking (timeout, remote error, mismatch) aborts the communicator and is `Broken`, whose "form
//!   a new one" is exactly what is left to do. Both say `is_retryable() == false`.
//! - Panics: cudarc panics where a library or a symbol is missing. [`nccl_available`] checks the
//!   libraries first, and every cudarc call runs under `catch_unwind` as a last resort, so a panic
//!   becomes an error (the panic hook still prints it to stderr).
//!
//! Never: blocks past the deadline waiting for another rank; returns `Ok` with partial data; runs
//! an operation after a failed one; calls into cudarc before the libraries are known to load.

use std::ffi::{c_int, c_void, CStr};
use std::mem::MaybeUninit;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use cudarc::driver::result as cu;
use cudarc::driver::sys as cu_sys;
use cudarc::nccl::sys as nccl;

use super::Call;
use super::{Collective, CollectiveError, Operation};

/// Bytes of an NCCL unique id (`ncclUniqueId`), as carried by `JoinRequest.nccl_unique_id`.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// The oldest NCCL accepted: non-blocking communicators that can be aborted while they form.
const MIN_NCCL_VERSION: c_int = 2_14_00;

/// `NCCL_VERSION(2, 30, 0)`: the header cudarc's `nccl` feature was generated from, stamped into
/// `ncclConfig_t`. An older library copies only the prefix of the struct it knows (its `size`).
const NCCL_CONFIG_VERSION: u32 = 2_30_00;
const NCCL_CONFIG_MAGIC: u32 = 0xcafe_beef;
const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;

/// The calling thread yields between polls for this long, then sleeps [`POLL_SLEEP`] each time:
/// small operations return fast, long ones do not burn a core.
const SPIN: Duration = Duration::from_millis(1);
const POLL_SLEEP: Duration = Duration::from_micros(50);

/// Elements of the call header, and the header twice (negated for the minimum).
const HEADER: usize = 4;

const INSTALL_HINT: &str = "install NVIDIA's driver and `pip install nvidia-nccl-cu13`, then link \
    libnccl.so.2 as libnccl.so in a directory on LD_LIBRARY_PATH (scripts/gpu-check.sh does both)";

/// Checks that this machine can run the NCCL engine: `libcuda.so` and `libnccl.so` load, the
/// driver initialises and sees a GPU, and NCCL is 2.14 or newer. Calls into cudarc only after
/// both libraries are known to load. The error reports rank 0; [`NcclCollective::new`] runs the
/// same check and reports its own rank.
pub fn nccl_available() -> Result<(), CollectiveError> {
    probe().map(|_| ()).map_err(|reason| CollectiveError::InvalidArgument { rank: 0, reason })
}

/// A new NCCL unique id, for rank 0 to hand to every rank through the rendezvous
/// (`JoinRequest.nccl_unique_id`). It holds rank 0's bootstrap address: create it on the machine of
/// rank 0, and a new one for every group.
pub fn new_unique_id() -> Result<Vec<u8>, CollectiveError> {
    let setup = |reason| CollectiveError::InvalidArgument { rank: 0, reason };
    probe().map_err(setup)?;
    guarded("ncclGetUniqueId", || {
        let mut id = MaybeUninit::<nccl::ncclUniqueId>::uninit();
        // SAFETY: NCCL writes the whole id.
        let id = unsafe {
            nccl_ok(nccl::ncclGetUniqueId(id.as_mut_ptr()), "ncclGetUniqueId", std::ptr::null_mut())?;
            id.assume_init()
        };
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    })
    .map_err(setup)
}

/// A [`Collective`] over NCCL for one rank on one GPU; see the module documentation.
pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    ordinal: usize,
    timeout: Duration,
    gpu: Gpu,
    /// Number of the last operation; all ranks must agree on it.
    seq: u64,
    /// The error that broke the group, if one did.
    broken: Option<String>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &format_args!("cuda:{}", self.ordinal))
            .field("timeout", &self.timeout)
            .field("calls", &self.seq)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl NcclCollective {
    /// Joins the group `unique_id` (from [`new_unique_id`] on rank 0) as `rank` of `world_size`, on
    /// GPU `device_ordinal`. Returns once every rank has joined, or fails after `timeout`, which is
    /// also the deadline of each later operation.
    pub fn new(
        rank: usize,
        world_size: usize,
        device_ordinal: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let invalid = |reason: String| CollectiveError::InvalidArgument { rank, reason };
        if world_size == 0 || c_int::try_from(world_size).is_err() {
            return Err(invalid(format!("world size {world_size} is out of range")));
        }
        if rank >= world_size {
            return Err(invalid(format!("rank {rank} is out of range for a world of {world_size}")));
        }
        if unique_id.len() != NCCL_UNIQUE_ID_BYTES {
            return Err(invalid(format!(
                "an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, not {} (is the rendezvous passing it on?)",
                unique_id.len()
            )));
        }
        if timeout.is_zero() {
            return Err(invalid("the timeout must be positive".into()));
        }
        let devices = probe().map_err(invalid)?;
        if device_ordinal >= devices {
            return Err(invalid(format!("GPU {device_ordinal} does not exist: this machine has {devices}")));
        }
        let deadline = Instant::now() + timeout;
        let mut gpu = Gpu::new(device_ordinal).map_err(invalid)?;
        guarded("ncclCommInitRankConfig", || gpu.init_comm(rank, world_size, unique_id, deadline, timeout))
            .map_err(|first| CollectiveError::Broken { rank, op: Operation::Connect, first })?;
        tracing::info!(rank, world_size, device = device_ordinal, "NCCL group formed");
        Ok(NcclCollective { rank, world_size, ordinal: device_ordinal, timeout, gpu, seq: 0, broken: None })
    }

    /// Replaces the CUDA tensor `t` on every rank by the element-wise mean over all ranks, in place
    /// on the GPU: no host copies. `t` must be a contiguous `f32` tensor on this engine's GPU.
    ///
    /// The engine's stream first waits for the work torch queued on its default stream before
    /// this call (an event recorded there; the host does not block), so whatever produced `t` is
    /// finished before NCCL reads it; NCCL sums in place, the calling thread polls to the end,
    /// and torch divides by the world size. Replicas stay bitwise identical; the result can differ
    /// from [`Collective::all_reduce_mean`] by an ulp, since torch multiplies by the inverse. The
    /// write bypasses autograd's version counter: use it on gradients, not on inputs of a graph.
    fn all_reduce_mean_device(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        let len = check_tensor(self.rank, self.ordinal, t)?;
        // An earlier failure is reported before touching torch.
        if let Some(first) = &self.broken {
            return Err(CollectiveError::Broken { rank: self.rank, op: Operation::AllReduce, first: first.clone() });
        }
        let ptr = t.data_ptr() as cu_sys::CUdeviceptr;
        self.run(Call::Mean, len, |gpu, deadline, timeout| {
            gpu.after_torch()?;
            if len > 0 {
                // SAFETY: `ptr` holds `len` f32 on this GPU (checked above), borrowed mutably
                // until this returns.
                unsafe { gpu.sum_in_place(ptr, len, deadline, timeout)? };
            }
            Ok(())
        })?;
        let _quotient = t.f_div_scalar_(self.world_size as f64).map_err(|e| CollectiveError::InvalidArgument {
            rank: self.rank,
            reason: format!("dividing the reduced tensor by the world size failed: {e}"),
        })?;
        Ok(())
    }

    /// Runs one operation: refuses it on a broken group, checks that every rank makes the same
    /// call, runs `body`, and on any failure aborts the communicator and breaks the group.
    fn run(
        &mut self,
        call: Call,
        len: usize,
        body: impl FnOnce(&mut Gpu, Instant, Duration) -> Result<(), String>,
    ) -> Result<(), CollectiveError> {
        let op = call.op();
        if let Some(first) = &self.broken {
            return Err(CollectiveError::Broken { rank: self.rank, op, first: first.clone() });
        }
        self.seq += 1;
        let (timeout, seq) = (self.timeout, self.seq);
        let deadline = Instant::now() + timeout;
        let gpu = &mut self.gpu;
        let result = guarded(&op.to_string(), || {
            gpu.bind()?;
            gpu.check_call(call.header(len, seq), deadline, timeout)?;
            body(gpu, deadline, timeout)
        });
        result.map_err(|detail| {
            let first = format!("{op} #{seq} failed: {detail}");
            self.gpu.abort();
            self.broken = Some(first.clone());
            CollectiveError::Broken { rank: self.rank, op, first }
        })
    }

    /// All-reduce (sum) of a host buffer through the device buffer.
    fn all_reduce_host(&mut self, buf: &mut [f32], call: Call) -> Result<(), CollectiveError> {
        let len = buf.len();
        self.run(call, len, |gpu, deadline, timeout| {
            if len == 0 {
                return Ok(());
            }
            let dev = gpu.staging(len)?;
            gpu.upload(dev, buf)?;
            // SAFETY: `dev` holds at least `len` f32 and is only used by this operation.
            unsafe { gpu.sum_in_place(dev, len, deadline, timeout)? };
            gpu.download(buf, dev, deadline, timeout)
        })
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_host(buf, Call::Sum)
    }

    /// CUDA tensors are reduced where they lie ([`NcclCollective::all_reduce_mean_device`]); CPU
    /// tensors through the host path.
    fn all_reduce_mean_tensor(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        if t.device().is_cuda() {
            return self.all_reduce_mean_device(t);
        }
        let rank = self.rank;
        super::with_host_f32(rank, t, |buf| self.all_reduce_mean(buf))
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_host(buf, Call::Mean)?;
        // The sum is bitwise identical on every rank, so the quotient is too.
        let n = self.world_size as f32;
        buf.iter_mut().for_each(|x| *x /= n);
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument {
                rank: self.rank,
                reason: format!("broadcast root {root} is out of range for a world of {}", self.world_size),
            });
        }
        let (len, is_root) = (buf.len(), root == self.rank);
        self.run(Call::Broadcast(root), len, |gpu, deadline, timeout| {
            if len == 0 {
                return Ok(());
            }
            let dev = gpu.staging(len)?;
            if is_root {
                gpu.upload(dev, buf)?;
            }
            // SAFETY: as in `all_reduce_host`; `root` fits in c_int since the world size does.
            gpu.enqueue(deadline, timeout, "ncclBroadcast", |comm, stream| unsafe {
                nccl::ncclBroadcast(
                    dev as *const c_void,
                    dev as *mut c_void,
                    len,
                    nccl::ncclDataType_t::ncclFloat32,
                    root as c_int,
                    comm,
                    stream,
                )
            })?;
            gpu.wait(deadline, timeout)?;
            if !is_root {
                gpu.download(buf, dev, deadline, timeout)?;
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // The call check is an all-reduce, which completes on no rank before every rank entered.
        self.run(Call::Barrier, 0, |_, _, _| Ok(()))
    }
}

fn describe(h: &[i64; HEADER]) -> String {
    let kind = match h[0] {
        1 => "all_reduce_sum",
        2 => "all_reduce_mean",
        3 => "broadcast",
        4 => "barrier",
        _ => "an unknown operation",
    };
    let root = if h[2] >= 0 { format!(" from root {}", h[2]) } else { String::new() };
    format!("call #{} {kind} of {} elements{root}", h[3], h[1])
}

/// The CUDA and NCCL objects of one rank. Every field is null (0) until created, so `Drop` can
/// clean up after a constructor that failed half-way.
struct Gpu {
    device: cu_sys::CUdevice,
    /// The device's primary context (the one torch uses), retained.
    ctx: cu_sys::CUcontext,
    stream: cu_sys::CUstream,
    /// Recorded on torch's stream so that `stream` waits for torch's work on the GPU.
    torch_done: cu_sys::CUevent,
    comm: nccl::ncclComm_t,
    /// The staging buffer for host data, `data_len` f32 (grown, never shrunk).
    data: cu_sys::CUdeviceptr,
    data_len: usize,
    /// `2 * HEADER` i64 for the call check.
    header: cu_sys::CUdeviceptr,
}

// SAFETY: CUDA contexts, streams, device memory and NCCL communicators may be used from any thread
// as long as calls do not overlap; `&mut self` on every operation guarantees that, and the context
// is made current on the calling thread first.
unsafe impl Send for Gpu {}

impl Gpu {
    /// Retains the primary context of GPU `ordinal` and creates the stream and the header buffer.
    fn new(ordinal: usize) -> Result<Gpu, String> {
        let mut gpu = Gpu {
            device: 0,
            ctx: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            torch_done: std::ptr::null_mut(),
            comm: std::ptr::null_mut(),
            data: 0,
            data_len: 0,
            header: 0,
        };
        guarded("setting up the GPU", || {
            let cuda = |what: &'static str| move |e: cu::DriverError| format!("{what} on GPU {ordinal} failed: {e}");
            gpu.device = cu::device::get(ordinal as c_int).map_err(cuda("cuDeviceGet"))?;
            // SAFETY: plain driver calls on a valid device; each result is stored for `Drop`.
            unsafe {
                gpu.ctx = cu::primary_ctx::retain(gpu.device).map_err(cuda("cuDevicePrimaryCtxRetain"))?;
                cu::ctx::set_current(gpu.ctx).map_err(cuda("cuCtxSetCurrent"))?;
                gpu.stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(cuda("cuStreamCreate"))?;
                gpu.torch_done = cu::event::create(cu_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                    .map_err(cuda("cuEventCreate"))?;
                gpu.header = cu::malloc_sync(2 * HEADER * size_of::<i64>()).map_err(cuda("cuMemAlloc"))?;
            }
            Ok(())
        })?;
        Ok(gpu)
    }

    /// Makes this GPU's context current on the calling thread (operations may come from any thread).
    fn bind(&self) -> Result<(), String> {
        // SAFETY: `ctx` is a retained context.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| format!("cuCtxSetCurrent failed: {e}"))
    }

    fn init_comm(
        &mut self,
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), String> {
        let mut id = nccl::ncclUniqueId { internal: [0; NCCL_UNIQUE_ID_BYTES] };
        for (dst, &src) in id.internal.iter_mut().zip(unique_id) {
            *dst = src as std::ffi::c_char;
        }
        let mut config = non_blocking_config();
        self.bind()?;
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; NCCL copies the config.
        let status =
            unsafe { nccl::ncclCommInitRankConfig(&mut comm, world_size as c_int, id, rank as c_int, &mut config) };
        match status {
            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress => self.comm = comm,
            // NCCL frees a communicator whose initialisation fails synchronously.
            e => return Err(nccl_failure(e, "ncclCommInitRankConfig", comm)),
        }
        self.wait_comm(deadline, timeout, "forming the group (ncclCommInitRankConfig)").map_err(|e| {
            format!("{e}; check that all {world_size} ranks were started with the same unique id and can reach rank 0")
        })
    }

    /// Makes the stream wait, on the GPU, for everything queued so far on torch's stream (the
    /// legacy default stream, which torch uses unless told otherwise), from any thread.
    fn after_torch(&self) -> Result<(), String> {
        // SAFETY: the event and the stream are ours and live; the null stream is the legacy one.
        unsafe {
            cu::event::record(self.torch_done, std::ptr::null_mut())
                .map_err(|e| format!("cuEventRecord on torch's stream failed: {e}"))?;
            cu::stream::wait_event(self.stream, self.torch_done, cu_sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(|e| format!("cuStreamWaitEvent failed: {e}"))
        }
    }

    /// Grows the staging buffer to at least `len` f32 and returns it.
    fn staging(&mut self, len: usize) -> Result<cu_sys::CUdeviceptr, String> {
        if self.data_len < len {
            // SAFETY: `data` is ours and no operation is in flight.
            unsafe {
                if self.data != 0 {
                    cu::free_sync(self.data).map_err(|e| format!("cuMemFree failed: {e}"))?;
                    self.data = 0;
                    self.data_len = 0;
                }
                self.data = cu::malloc_sync(len * size_of::<f32>())
                    .map_err(|e| format!("allocating {len} f32 on the GPU failed: {e}"))?;
            }
            self.data_len = len;
        }
        Ok(self.data)
    }

    /// Copies `src` to `dst` on the stream. The stream is idle (every operation waits for its
    /// work), so the copy waits for nothing else; the source is consumed before this returns.
    fn upload<T>(&self, dst: cu_sys::CUdeviceptr, src: &[T]) -> Result<(), String> {
        // SAFETY: `dst` holds at least `src.len()` elements (staging or header buffer).
        unsafe { cu::memcpy_htod_async(dst, src, self.stream) }.map_err(|e| format!("copy to the GPU failed: {e}"))
    }

    /// Copies `src` into `dst` once the stream is done with it.
    fn download<T>(
        &self,
        dst: &mut [T],
        src: cu_sys::CUdeviceptr,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), String> {
        // SAFETY: `src` holds at least `dst.len()` elements; `wait` returns only when the copy is
        // complete, before `dst` can be used.
        unsafe { cu::memcpy_dtoh_async(dst, src, self.stream) }
            .map_err(|e| format!("copy from the GPU failed: {e}"))?;
        self.wait(deadline, timeout)
    }

    /// Issues an NCCL call on the stream; a non-blocking communicator may still be enqueueing it
    /// in the background, which is waited for.
    fn enqueue(
        &self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
        call: impl FnOnce(nccl::ncclComm_t, nccl::cudaStream_t) -> nccl::ncclResult_t,
    ) -> Result<(), String> {
        match call(self.comm, self.stream as nccl::cudaStream_t) {
            nccl::ncclResult_t::ncclSuccess => Ok(()),
            nccl::ncclResult_t::ncclInProgress => self.wait_comm(deadline, timeout, what),
            e => Err(nccl_failure(e, what, self.comm)),
        }
    }

    /// Sums `len` f32 at `ptr` over the group, in place, and waits until it is done.
    ///
    /// # Safety
    /// `ptr` must hold at least `len` f32 on this GPU, used by nothing else until this returns.
    unsafe fn sum_in_place(
        &self,
        ptr: cu_sys::CUdeviceptr,
        len: usize,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), String> {
        // SAFETY: the caller's guarantee; the operation is complete when `wait` returns.
        self.enqueue(deadline, timeout, "ncclAllReduce", |comm, stream| unsafe {
            nccl::ncclAllReduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                len,
                nccl::ncclDataType_t::ncclFloat32,
                nccl::ncclRedOp_t::ncclSum,
                comm,
                stream,
            )
        })?;
        self.wait(deadline, timeout)
    }

    /// The communicator's state: `Ok(true)` when idle, `Ok(false)` while it is still working in the
    /// background, `Err` when it failed (a peer died, a network error...).
    fn comm_state(&self, what: &str) -> Result<bool, String> {
        let mut state = nccl::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a live communicator.
        let status = unsafe { nccl::ncclCommGetAsyncError(self.comm, &mut state) };
        if status != nccl::ncclResult_t::ncclSuccess {
            return Err(nccl_failure(status, "ncclCommGetAsyncError", self.comm));
        }
        match state {
            nccl::ncclResult_t::ncclSuccess => Ok(true),
            nccl::ncclResult_t::ncclInProgress => Ok(false),
            e => Err(nccl_failure(e, what, self.comm)),
        }
    }

    /// Waits until the communicator has finished its background work (initialisation, enqueueing).
    fn wait_comm(&self, deadline: Instant, timeout: Duration, what: &str) -> Result<(), String> {
        let started = Instant::now();
        while !self.comm_state(what)? {
            pause(started, deadline, timeout, what)?;
        }
        Ok(())
    }

    /// Waits until the stream is idle: every NCCL kernel and copy of the operation is complete.
    fn wait(&self, deadline: Instant, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            // SAFETY: `stream` is a live stream of the current context.
            match unsafe { cu_sys::cuStreamQuery(self.stream) } {
                cu_sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cu_sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(format!("the GPU stream failed: {}", cu::DriverError(e))),
            }
            // A lost peer shows up here, long before the deadline.
            self.comm_state("the NCCL operation")?;
            pause(started, deadline, timeout, "the NCCL operation")?;
        }
    }

    /// The call check: max and min over ranks of (header, -header) in one all-reduce.
    fn check_call(&mut self, mine: [i64; HEADER], deadline: Instant, timeout: Duration) -> Result<(), String> {
        let mut both = [0i64; 2 * HEADER];
        for i in 0..HEADER {
            both[i] = mine[i];
            both[HEADER + i] = -mine[i];
        }
        self.upload(self.header, &both)?;
        let header = self.header;
        // SAFETY: `header` holds 2 * HEADER i64; complete when `wait` returns.
        self.enqueue(deadline, timeout, "the call check (ncclAllReduce)", |comm, stream| unsafe {
            nccl::ncclAllReduce(
                header as *const c_void,
                header as *mut c_void,
                2 * HEADER,
                nccl::ncclDataType_t::ncclInt64,
                nccl::ncclRedOp_t::ncclMax,
                comm,
                stream,
            )
        })?;
        self.wait(deadline, timeout)?;
        self.download(&mut both, header, deadline, timeout)?;
        let max: [i64; HEADER] = std::array::from_fn(|i| both[i]);
        let min: [i64; HEADER] = std::array::from_fn(|i| -both[HEADER + i]);
        if max != mine || min != mine {
            return Err(format!(
                "ranks made different calls: this rank made {}; element-wise over the ranks, the calls range \
                 from ({}) to ({})",
                describe(&mine),
                describe(&min),
                describe(&max)
            ));
        }
        Ok(())
    }

    /// Aborts the communicator: stops its kernels and frees it. Local, and bounded even when a peer
    /// is gone.
    fn abort(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        let result = guarded("ncclCommAbort", || {
            self.bind()?;
            // SAFETY: `comm` is live and, once replaced by null above, never used again.
            match unsafe { nccl::ncclCommAbort(comm) } {
                nccl::ncclResult_t::ncclSuccess => Ok(()),
                e => Err(nccl_failure(e, "ncclCommAbort", std::ptr::null_mut())),
            }
        });
        if let Err(e) = result {
            tracing::warn!("aborting the NCCL communicator: {e}");
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Nothing is in flight (every operation waits for its work, and a failed one aborted the
        // communicator), so abort is the bounded way to free it: `ncclCommDestroy` may wait for peers.
        self.abort();
        let result = guarded("releasing the GPU", || {
            if self.ctx.is_null() {
                return Ok(());
            }
            // SAFETY: each handle is ours, used by nothing else, and released once.
            unsafe {
                cu::ctx::set_current(self.ctx).map_err(|e| e.to_string())?;
                for ptr in [self.data, self.header] {
                    if ptr != 0 {
                        cu::free_sync(ptr).map_err(|e| e.to_string())?;
                    }
                }
                if !self.stream.is_null() {
                    cu::stream::destroy(self.stream).map_err(|e| e.to_string())?;
                }
                if !self.torch_done.is_null() {
                    cu::event::destroy(self.torch_done).map_err(|e| e.to_string())?;
                }
                cu::primary_ctx::release(self.device).map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!("releasing the GPU of the NCCL collective: {e}");
        }
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`, so that forming the group and every operation can
/// be polled and aborted.
fn non_blocking_config() -> nccl::ncclConfig_t {
    let undef = NCCL_CONFIG_UNDEF_INT;
    nccl::ncclConfig_t {
        size: size_of::<nccl::ncclConfig_t>(),
        magic: NCCL_CONFIG_MAGIC,
        version: NCCL_CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: undef,
        minCTAs: undef,
        maxCTAs: undef,
        netName: std::ptr::null(),
        splitShare: undef,
        trafficClass: undef,
        commName: std::ptr::null(),
        collnetEnable: undef,
        CTAPolicy: undef,
        shrinkShare: undef,
        nvlsCTAs: undef,
        nChannelsPerNetPeer: undef,
        nvlinkCentricSched: undef,
        graphUsageMode: undef,
        numRmaCtx: undef,
        maxP2pPeers: undef,
    }
}

/// Checks that `libcuda.so` and `libnccl.so` load before calling into either, then that the driver
/// sees a GPU and NCCL is recent enough. Returns the number of GPUs.
fn probe() -> Result<usize, String> {
    // SAFETY: these only try to open the libraries (and close them again).
    let (cuda, nccl_lib) = unsafe { (cu_sys::is_culib_present(), nccl::is_culib_present()) };
    if !cuda || !nccl_lib {
        let state = |present: bool, name: &str, what: &str, note: &str| {
            if present {
                return format!("lib{name}.so ({what}) loads");
            }
            // The interesting names are the versioned ones: they show which sonames are looked for.
            let names = cudarc::get_lib_name_candidates(name);
            let (versioned, other): (Vec<_>, Vec<_>) =
                names.iter().skip(1).partition(|n| n.starts_with(&format!("lib{name}.so.")));
            let versioned: Vec<&str> = versioned.iter().map(|n| n.as_str()).collect();
            format!(
                "lib{name}.so ({what}) was not found: cudarc tries {}, {} and {} other names{note}",
                names[0],
                versioned.join(", "),
                other.len()
            )
        };
        return Err(format!(
            "nccl collective requested but libnccl.so / libcuda.so is not loadable on this machine: {}; {}; {INSTALL_HINT}",
            state(cuda, "cuda", "NVIDIA's driver", ""),
            state(nccl_lib, "nccl", "NCCL", ", but the nvidia-nccl-cu13 wheel ships libnccl.so.2"),
        ));
    }
    guarded("probing CUDA and NCCL", || {
        cu::init().map_err(|e| {
            format!("libcuda.so loads but cuInit failed: {e}; is an NVIDIA GPU visible to this process?")
        })?;
        let devices = cu::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
        if devices < 1 {
            return Err("libcuda.so loads but the driver sees no GPU".into());
        }
        let mut version: c_int = 0;
        // SAFETY: NCCL writes one int.
        unsafe { nccl_ok(nccl::ncclGetVersion(&mut version), "ncclGetVersion", std::ptr::null_mut())? };
        if version < MIN_NCCL_VERSION {
            return Err(format!("libnccl.so is version code {version}; the nccl collective needs 2.14 or newer"));
        }
        Ok(devices as usize)
    })
}

/// Checks the tensor of [`NcclCollective::all_reduce_mean_device`]; returns its length.
fn check_tensor(rank: usize, ordinal: usize, t: &tch::Tensor) -> Result<usize, CollectiveError> {
    let invalid = |reason: String| Err(CollectiveError::InvalidArgument { rank, reason });
    if !t.defined() {
        return invalid("all_reduce_mean_tensor needs a defined tensor".into());
    }
    let device = t.device();
    if device != tch::Device::Cuda(ordinal) {
        return invalid(format!(
            "all_reduce_mean_tensor needs a tensor on cuda:{ordinal}, the collective's GPU; this one is on {device:?}"
        ));
    }
    match t.f_kind() {
        Ok(tch::Kind::Float) => {}
        kind => return invalid(format!("all_reduce_mean_tensor needs an f32 tensor; this one is {kind:?}")),
    }
    if !t.is_contiguous() {
        return invalid("all_reduce_mean_tensor needs a contiguous tensor".into());
    }
    Ok(t.numel())
}

/// Runs `f`, turning a panic (cudarc panics when a library or symbol is missing) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Err(format!("{what}: cudarc panicked: {message}"))
    })
}

/// Sleeps between polls, or fails once the deadline has passed.
fn pause(started: Instant, deadline: Instant, timeout: Duration, what: &str) -> Result<(), String> {
    let now = Instant::now();
    if now >= deadline {
        return Err(format!(
            "{what} did not complete within {timeout:?}: a rank is late, stuck or gone (NCCL does not say which); \
             the communicator was aborted"
        ));
    }
    if now - started < SPIN {
        std::thread::yield_now();
    } else {
        std::thread::sleep(POLL_SLEEP.min(deadline - now));
    }
    Ok(())
}

fn nccl_ok(status: nccl::ncclResult_t, what: &str, comm: nccl::ncclComm_t) -> Result<(), String> {
    match status {
        nccl::ncclResult_t::ncclSuccess => Ok(()),
        e => Err(nccl_failure(e, what, comm)),
    }
}

/// "what failed: NCCL's name for the error (NCCL's last message)".
fn nccl_failure(status: nccl::ncclResult_t, what: &str, comm: nccl::ncclComm_t) -> String {
    let text = |p: *const std::ffi::c_char| {
        // SAFETY: NCCL returns null or a NUL-terminated static or thread-local string.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()).filter(|s| !s.is_empty())
    };
    // SAFETY: both accept any status and any (even null) communicator.
    let (name, last) = unsafe { (text(nccl::ncclGetErrorString(status)), text(nccl::ncclGetLastError(comm))) };
    let mut message = format!("{what} failed: {}", name.unwrap_or_else(|| format!("{status:?}")));
    if let Some(last) = last {
        message.push_str(&format!(" ({last})"));
    }
    message
}

#[cfg(all(test, feature = "nccl"))]
mod tests {
    use super::*;

    /// What cudarc itself would find; `nccl_available` must agree with it.
    fn libraries_load() -> bool {
        // SAFETY: only opens and closes the libraries.
        unsafe { cu_sys::is_culib_present() && nccl::is_culib_present() }
    }

    #[test]
    fn availability_names_the_missing_libraries_and_the_fix() {
        match nccl_available() {
            // Only a machine with both libraries may say yes.
            Ok(()) => assert!(libraries_load(), "nccl_available() is Ok but cudarc cannot load the libraries"),
            Err(e) => {
                let msg = e.to_string();
                if !libraries_load() {
                    for needle in ["libnccl.so", "libcuda.so", "not loadable", "nvidia-nccl-cu13", "libnccl.so.2"] {
                        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
                    }
                }
                assert!(!e.is_retryable());
            }
        }
    }

    #[test]
    fn without_the_libraries_constructing_and_new_ids_fail_cleanly() {
        let id = [7u8; NCCL_UNIQUE_ID_BYTES];
        let started = Instant::now();
        let built = NcclCollective::new(1, 2, 0, &id, Duration::from_millis(500));
        match nccl_available() {
            Err(expected) => {
                let err = built.expect_err("constructed an NCCL collective where NCCL is unavailable");
                assert!(matches!(err, CollectiveError::InvalidArgument { rank: 1, .. }), "{err:?}");
                // Same reason as nccl_available, reported by this rank.
                let reason = |e: &CollectiveError| e.to_string().split_once(": ").map(|(_, r)| r.to_owned());
                assert_eq!(reason(&err), reason(&expected));
                let id_err = new_unique_id().expect_err("made an NCCL unique id without NCCL");
                assert_eq!(id_err.to_string(), expected.to_string());
            }
            // On a GPU machine the id leads nowhere and rank 0 never comes: forming the group must
            // fail or time out, not hang.
            Ok(()) => {
                let err = built.expect_err("formed a group of 2 without rank 0");
                assert!(matches!(err, CollectiveError::Broken { rank: 1, op: Operation::Connect, .. }), "{err:?}");
                assert!(started.elapsed() < Duration::from_secs(20), "took {:?}: {err}", started.elapsed());
            }
        }
    }

    #[test]
    fn bad_arguments_are_rejected_before_touching_cuda() {
        let id = [0u8; NCCL_UNIQUE_ID_BYTES];
        let t = Duration::from_secs(1);
        let cases: [(Result<NcclCollective, _>, &str); 4] = [
            (NcclCollective::new(2, 2, 0, &id, t), "rank 2 is out of range for a world of 2"),
            (NcclCollective::new(0, 0, 0, &id, t), "world size 0 is out of range"),
            (NcclCollective::new(0, 1, 0, &id[..16], t), "has 128 bytes, not 16"),
            (NcclCollective::new(0, 1, 0, &id, Duration::ZERO), "the timeout must be positive"),
        ];
        for (result, expected) in cases {
            let err = result.expect_err(expected);
            assert!(err.to_string().contains(expected), "{err}");
            assert!(matches!(err, CollectiveError::InvalidArgument { .. }));
        }
    }

    #[test]
    fn tensor_path_rejects_what_nccl_cannot_reduce_in_place() {
        let cpu = tch::Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu));
        let err = check_tensor(0, 0, &cpu).unwrap_err();
        assert!(err.to_string().contains("needs a tensor on cuda:0") && err.to_string().contains("Cpu"), "{err}");
        if tch::Cuda::is_available() {
            let gpu = tch::Device::Cuda(0);
            let cases = [
                (tch::Tensor::zeros([3], (tch::Kind::Double, gpu)), "needs an f32 tensor"),
                (tch::Tensor::zeros([3, 2], (tch::Kind::Float, gpu)).transpose(0, 1), "needs a contiguous tensor"),
            ];
            for (t, expected) in cases {
                let err = check_tensor(0, 0, &t).unwrap_err();
                assert!(err.to_string().contains(expected), "{err}");
            }
            assert_eq!(check_tensor(0, 0, &tch::Tensor::zeros([3, 2], (tch::Kind::Float, gpu))).unwrap(), 6);
        }
    }

    #[test]
    fn a_panic_in_cudarc_becomes_an_error() {
        let caught = guarded("probing", || -> Result<(), String> { panic!("Missing symbol cuInit: dlsym failed") });
        assert_eq!(caught.unwrap_err(), "probing: cudarc panicked: Missing symbol cuInit: dlsym failed");
        assert_eq!(guarded("probing", || Ok(3)), Ok(3));
    }

    #[test]
    fn call_headers_describe_the_call() {
        assert_eq!(describe(&Call::Broadcast(1).header(10, 3)), "call #3 broadcast of 10 elements from root 1");
        assert_eq!(describe(&Call::Mean.header(5, 1)), "call #1 all_reduce_mean of 5 elements");
        assert_eq!(Call::Barrier.op(), Operation::Barrier);
    }

    /// A world of one on GPU 0, where there is one: every operation, through NCCL for real.
    /// `THAW_REQUIRE_NCCL=1` (scripts/gpu-check.sh) makes a missing GPU, NCCL or CUDA libtorch fail
    /// it instead of skipping it.
    #[test]
    fn world_of_one_runs_every_operation_where_a_gpu_is_present() {
        let required = std::env::var_os("THAW_REQUIRE_NCCL").is_some();
        if let Err(e) = nccl_available() {
            assert!(!required, "THAW_REQUIRE_NCCL is set but {e}");
            return; // covered by the tests above
        }
        assert!(!required || tch::Cuda::is_available(), "THAW_REQUIRE_NCCL is set but libtorch sees no GPU");
        let id = new_unique_id().unwrap();
        assert_eq!(id.len(), NCCL_UNIQUE_ID_BYTES);
        let mut c = NcclCollective::new(0, 1, 0, &id, Duration::from_secs(60)).unwrap();
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let mut buf: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let expected = buf.clone();
        c.all_reduce_sum(&mut buf).unwrap();
        c.all_reduce_mean(&mut buf).unwrap();
        c.broadcast(&mut buf, 0).unwrap();
        c.barrier().unwrap();
        c.all_reduce_sum(&mut []).unwrap();
        assert_eq!(buf, expected);
        // A larger buffer grows the staging buffer.
        let mut big = vec![1.25f32; 1 << 20];
        c.all_reduce_mean(&mut big).unwrap();
        assert!(big.iter().all(|&x| x == 1.25));
        assert!(c.broadcast(&mut buf, 1).unwrap_err().to_string().contains("root 1 is out of range"));
        if tch::Cuda::is_available() {
            let mut t = tch::Tensor::arange(8, (tch::Kind::Float, tch::Device::Cuda(0)));
            c.all_reduce_mean_tensor(&mut t).unwrap();
            assert_eq!(
                Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu)).unwrap(),
                (0..8).map(|i| i as f32).collect::<Vec<_>>()
            );
        }
    }
}

impl Call {
    /// Kind, length, root (-1 for none) and call number.
    fn header(self, len: usize, seq: u64) -> [i64; HEADER] {
        let root = match self {
            Call::Broadcast(root) => root as i64,
            _ => -1,
        };
        [i64::from(self.code()), len as i64, root, seq as i64]
    }
}
