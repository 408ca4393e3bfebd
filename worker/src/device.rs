//! Which device a rank computes on.
//!
//! The rules, as torchrun's users know them:
//! - `cpu` is the CPU for every rank.
//! - `cuda` gives **local rank i the i-th visible GPU**. The local rank is `THAW_LOCAL_RANK`
//!   (`thaw launch` exports it to each child, 0..nproc; torchrun's `LOCAL_RANK` is read too), or 0.
//!   "Visible" is what CUDA shows the process: with `CUDA_VISIBLE_DEVICES=2,3`, local rank 0 runs
//!   on physical GPU 2 as `cuda:0`.
//! - `cuda:K` pins the process to the K-th visible GPU, whatever its local rank.
//! - `auto` is `cuda` where a GPU is visible, else `cpu`.
//! - More local ranks than visible GPUs is an error before anything starts: NCCL refuses two ranks
//!   on one GPU, and even without NCCL two ranks would share one device's memory.
//!
//! Everything here is a pure function of the request and what the process sees ([`Visible`]), so
//! every combination is unit-tested on machines without a GPU; [`Visible::probe`] asks libtorch.

use std::fmt;
use std::str::FromStr;

use tch::Device;

/// What `--device` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA (by local rank) where a GPU is visible, else CPU.
    Auto,
    Cpu,
    /// The GPU of this process's local rank.
    Cuda,
    /// The K-th visible GPU.
    CudaOrdinal(usize),
}

impl FromStr for DeviceRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s.trim() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda),
            other => other
                .strip_prefix("cuda:")
                .and_then(|k| k.parse().ok())
                .map(DeviceRequest::CudaOrdinal)
                .ok_or_else(|| DeviceError(format!("unknown device `{s}`; expected auto, cpu, cuda or cuda:K"))),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda => f.write_str("cuda"),
            DeviceRequest::CudaOrdinal(k) => write!(f, "cuda:{k}"),
        }
    }
}

/// A device that cannot be given, and why (names the values involved).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

/// The GPUs this process sees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Visible {
    /// How many GPUs CUDA shows the process (after `CUDA_VISIBLE_DEVICES`).
    pub count: usize,
    /// `CUDA_VISIBLE_DEVICES` as set, for messages and for naming physical GPUs.
    pub cuda_visible_devices: Option<String>,
}

impl Visible {
    /// Asks libtorch how many GPUs it sees, and reads `CUDA_VISIBLE_DEVICES`.
    pub fn probe() -> Visible {
        let count = if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
        Visible { count, cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok() }
    }

    /// "2 GPUs are visible (CUDA_VISIBLE_DEVICES=2,3)", for error messages.
    fn describe(&self) -> String {
        let n = match self.count {
            0 => "no GPU is visible".to_string(),
            1 => "1 GPU is visible".to_string(),
            n => format!("{n} GPUs are visible"),
        };
        match &self.cuda_visible_devices {
            Some(v) => format!("{n} (CUDA_VISIBLE_DEVICES={v:?})"),
            None => n,
        }
    }

    /// The physical id of visible GPU `k` where `CUDA_VISIBLE_DEVICES` says it, for logs.
    pub fn physical(&self, k: usize) -> Option<String> {
        let list = self.cuda_visible_devices.as_deref()?;
        list.split(',').map(str::trim).nth(k).map(str::to_string)
    }
}

/// This process's local rank: `THAW_LOCAL_RANK`, else torchrun's `LOCAL_RANK`, else none.
pub fn local_rank_from_env() -> Result<Option<usize>, DeviceError> {
    for var in ["THAW_LOCAL_RANK", "LOCAL_RANK"] {
        if let Ok(v) = std::env::var(var) {
            return parse_local_rank(var, &v).map(Some);
        }
    }
    Ok(None)
}

fn parse_local_rank(var: &str, v: &str) -> Result<usize, DeviceError> {
    v.trim().parse().map_err(|_| DeviceError(format!("{var}={v:?} is not a local rank (a number from 0)")))
}

/// The device of one process: `request` for local rank `local_rank` (0 when unset).
pub fn assign(request: DeviceRequest, local_rank: Option<usize>, visible: &Visible) -> Result<Device, DeviceError> {
    let rank = local_rank.unwrap_or(0);
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto if visible.count == 0 => Ok(Device::Cpu),
        DeviceRequest::Auto | DeviceRequest::Cuda => {
            if visible.count == 0 {
                return Err(DeviceError(format!("--device {request}: {}", visible.describe())));
            }
            if rank >= visible.count {
                return Err(DeviceError(format!(
                    "--device {request}: local rank {rank} takes the GPU at index {rank}, but {}; run at most \
                     {} rank(s) on this host, or give each process its own GPU with --device cuda:K",
                    visible.describe(),
                    visible.count
                )));
            }
            Ok(Device::Cuda(rank))
        }
        DeviceRequest::CudaOrdinal(k) => {
            if k >= visible.count {
                return Err(DeviceError(format!("--device cuda:{k}: no GPU at index {k}; {}", visible.describe())));
            }
            Ok(Device::Cuda(k))
        }
    }
}

/// `thaw launch --nproc N --device D`: checks before any process starts that every local rank
/// gets a device of its own, and returns each rank's device (for the launch's log line).
pub fn assign_launch(request: DeviceRequest, nproc: usize, visible: &Visible) -> Result<Vec<Device>, DeviceError> {
    if let DeviceRequest::CudaOrdinal(k) = request {
        if nproc > 1 {
            return Err(DeviceError(format!(
                "--device cuda:{k} puts all {nproc} ranks on one GPU, which NCCL refuses; use --device cuda \
                 (local rank i runs on the i-th visible GPU) and CUDA_VISIBLE_DEVICES to choose the GPUs"
            )));
        }
    }
    if matches!(request, DeviceRequest::Cuda | DeviceRequest::Auto) && visible.count > 0 && nproc > visible.count {
        return Err(DeviceError(format!(
            "--nproc {nproc} with --device {request} needs {nproc} GPUs (one per rank), but {}; lower --nproc \
             or use --device cpu",
            visible.describe()
        )));
    }
    (0..nproc).map(|i| assign(request, Some(i), visible)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(count: usize, env: Option<&str>) -> Visible {
        Visible { count, cuda_visible_devices: env.map(str::to_string) }
    }

    #[test]
    fn requests_parse_and_bad_ones_are_named() {
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!("auto".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
        assert_eq!("cuda".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda);
        assert_eq!("cuda:3".parse::<DeviceRequest>().unwrap(), DeviceRequest::CudaOrdinal(3));
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let e = bad.parse::<DeviceRequest>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
        for r in [DeviceRequest::Auto, DeviceRequest::Cpu, DeviceRequest::Cuda, DeviceRequest::CudaOrdinal(7)] {
            assert_eq!(r.to_string().parse::<DeviceRequest>().unwrap(), r);
        }
    }

    #[test]
    fn every_combination_of_request_local_rank_and_visible_gpus() {
        use DeviceRequest::*;
        // (request, local rank, visible GPUs, CUDA_VISIBLE_DEVICES, expected device or error text)
        let table: &[(DeviceRequest, Option<usize>, usize, Option<&str>, Result<Device, &str>)] = &[
            (Cpu, None, 0, None, Ok(Device::Cpu)),
            (Cpu, Some(5), 8, None, Ok(Device::Cpu)),
            (Auto, None, 0, None, Ok(Device::Cpu)),
            (Auto, Some(3), 0, None, Ok(Device::Cpu)),
            (Auto, Some(1), 2, None, Ok(Device::Cuda(1))),
            (Auto, Some(2), 2, None, Err("local rank 2 takes the GPU at index 2, but 2 GPUs are visible")),
            (Cuda, None, 1, None, Ok(Device::Cuda(0))),
            (Cuda, Some(0), 8, None, Ok(Device::Cuda(0))),
            (Cuda, Some(7), 8, None, Ok(Device::Cuda(7))),
            (Cuda, Some(8), 8, None, Err("local rank 8 takes the GPU at index 8, but 8 GPUs are visible")),
            (Cuda, Some(1), 2, Some("4,6"), Ok(Device::Cuda(1))),
            (Cuda, Some(2), 2, Some("4,6"), Err("2 GPUs are visible (CUDA_VISIBLE_DEVICES=\"4,6\")")),
            (Cuda, None, 0, None, Err("--device cuda: no GPU is visible")),
            (Cuda, Some(0), 0, Some(""), Err("no GPU is visible (CUDA_VISIBLE_DEVICES=\"\")")),
            (CudaOrdinal(3), Some(0), 4, None, Ok(Device::Cuda(3))),
            (CudaOrdinal(3), Some(2), 4, None, Ok(Device::Cuda(3))),
            (CudaOrdinal(0), None, 1, Some("5"), Ok(Device::Cuda(0))),
            (CudaOrdinal(1), None, 1, Some("5"), Err("--device cuda:1: no GPU at index 1; 1 GPU is visible")),
            (CudaOrdinal(0), None, 0, None, Err("no GPU at index 0; no GPU is visible")),
        ];
        for (req, rank, count, env, want) in table {
            let got = assign(*req, *rank, &gpus(*count, *env));
            match (want, got) {
                (Ok(d), Ok(g)) => assert_eq!(*d, g, "{req} rank {rank:?} with {count} GPUs"),
                (Err(text), Err(e)) => assert!(e.0.contains(text), "{req} rank {rank:?}: {e}"),
                (w, g) => panic!("{req} rank {rank:?} with {count} GPUs ({env:?}): wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn launch_gives_each_local_rank_its_own_gpu_or_refuses_before_starting() {
        use DeviceRequest::*;
        assert_eq!(assign_launch(Cuda, 4, &gpus(4, None)).unwrap(), (0..4).map(Device::Cuda).collect::<Vec<_>>());
        assert_eq!(assign_launch(Cuda, 2, &gpus(8, Some("0,1,2,3,4,5,6,7"))).unwrap(), [Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(assign_launch(Auto, 3, &gpus(0, None)).unwrap(), [Device::Cpu; 3]);
        assert_eq!(assign_launch(Auto, 2, &gpus(2, None)).unwrap(), [Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(assign_launch(Cpu, 3, &gpus(8, None)).unwrap(), [Device::Cpu; 3]);
        assert_eq!(assign_launch(CudaOrdinal(2), 1, &gpus(4, None)).unwrap(), [Device::Cuda(2)]);
        let more_ranks = assign_launch(Cuda, 3, &gpus(2, Some("0,1"))).unwrap_err().0;
        assert!(more_ranks.contains("--nproc 3 with --device cuda needs 3 GPUs"), "{more_ranks}");
        assert!(more_ranks.contains("CUDA_VISIBLE_DEVICES=\"0,1\""), "{more_ranks}");
        let auto_short = assign_launch(Auto, 4, &gpus(1, None)).unwrap_err().0;
        assert!(auto_short.contains("needs 4 GPUs (one per rank), but 1 GPU is visible"), "{auto_short}");
        let pinned = assign_launch(CudaOrdinal(0), 2, &gpus(2, None)).unwrap_err().0;
        assert!(pinned.contains("puts all 2 ranks on one GPU"), "{pinned}");
        let none = assign_launch(Cuda, 1, &gpus(0, None)).unwrap_err().0;
        assert!(none.contains("no GPU is visible"), "{none}");
    }

    #[test]
    fn local_ranks_parse_and_bad_ones_are_named() {
        assert_eq!(parse_local_rank("THAW_LOCAL_RANK", " 3 ").unwrap(), 3);
        let e = parse_local_rank("LOCAL_RANK", "one").unwrap_err().0;
        assert_eq!(e, "LOCAL_RANK=\"one\" is not a local rank (a number from 0)");
        assert!(parse_local_rank("THAW_LOCAL_RANK", "-1").is_err());
    }

    #[test]
    fn physical_ids_follow_cuda_visible_devices() {
        let v = gpus(2, Some("4, 6"));
        assert_eq!(v.physical(1).as_deref(), Some("6"));
        assert_eq!(v.physical(2), None);
        assert_eq!(gpus(2, None).physical(0), None);
    }
}
