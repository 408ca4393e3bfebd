//! Mixed precision: autocast regions (bf16 or fp16 on CPU and CUDA) and fp16's dynamic loss
//! scaling. Master weights, gradients and optimizer state stay f32; only the forward pass's
//! convolutions and matrix products run in the reduced type (libtorch's autocast op lists decide
//! which ops, as in PyTorch).
//!
//! torch-sys exposes only CUDA's fp16 autocast switch, so the four functions of libtorch's
//! `at::autocast` that choose the device and the type are called by their C++ symbols. They take
//! `c10::DeviceType` and `c10::ScalarType`, both `enum class : int8_t`, and a `bool`, which the
//! x86-64 and AArch64 C++ ABIs pass exactly like C's `int8_t` and `bool`; the symbols have had
//! these signatures since libtorch 2.3, and `tests` below checks that autocast really switches.
//! Autocast state is per thread: a region covers the calling thread only.

use tch::{Device, Kind, Tensor};
use thaw_coordinator::spec::Precision;

use crate::optim::Param;

mod ffi {
    extern "C" {
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device_type: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device_type: i8) -> bool;
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device_type: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device_type: i8) -> i8;
    }
}

/// `c10::DeviceType` values.
const CPU: i8 = 0;
const CUDA: i8 = 1;
/// `c10::ScalarType` values.
const HALF: i8 = 5;
const BFLOAT16: i8 = 15;

/// Runs `f` with autocast to `precision`'s reduced type on `device`'s kind of device (on this
/// thread); fp32 runs `f` as it is. The previous autocast state is restored afterwards, panics
/// included.
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    let dtype = match precision {
        Precision::Fp32 => return f(),
        Precision::Bf16 => BFLOAT16,
        Precision::Fp16 => HALF,
    };
    let device_type = if device.is_cuda() { CUDA } else { CPU };
    struct Restore {
        device_type: i8,
        enabled: bool,
        dtype: i8,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: see the module documentation; plain setters of thread-local state.
            unsafe {
                if torch_sys::at_autocast_decrement_nesting() == 0 {
                    torch_sys::at_autocast_clear_cache();
                }
                ffi::set_autocast_enabled(self.device_type, self.enabled);
                ffi::set_autocast_dtype(self.device_type, self.dtype);
            }
        }
    }
    // SAFETY: as above.
    let _restore = unsafe {
        let saved = Restore {
            device_type,
            enabled: ffi::is_autocast_enabled(device_type),
            dtype: ffi::get_autocast_dtype(device_type),
        };
        ffi::set_autocast_dtype(device_type, dtype);
        ffi::set_autocast_enabled(device_type, true);
        torch_sys::at_autocast_increment_nesting();
        saved
    };
    f()
}

/// Runs `f` in f32 when CPU autocast is on (its inputs are cast up by the caller), as
/// `torch.autocast("cpu", enabled=False)` does; the state is restored afterwards, panics included.
/// Used for depthwise convolutions, whose bf16 kernels in oneDNN are far slower than its f32 ones
/// ([`crate::zoo::layers::ConvBn`]).
pub fn cpu_autocast_off<T>(f: impl FnOnce() -> T) -> T {
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: see the module documentation; a plain setter of thread-local state.
            unsafe { ffi::set_autocast_enabled(CPU, true) }
        }
    }
    // SAFETY: as above.
    if !unsafe { ffi::is_autocast_enabled(CPU) } {
        return f();
    }
    unsafe { ffi::set_autocast_enabled(CPU, false) };
    let _restore = Restore;
    f()
}

/// Whether CPU autocast is on on this thread.
pub fn cpu_autocast_enabled() -> bool {
    // SAFETY: see the module documentation; a plain getter of thread-local state.
    unsafe { ffi::is_autocast_enabled(CPU) }
}

/// fp16's dynamic loss scaling, as PyTorch's `GradScaler`: the loss is multiplied by `scale`
/// before backward so that small gradients survive in fp16; after the all-reduce, gradients
/// with an inf or NaN skip the step and halve the scale, and `GROWTH_INTERVAL` good steps in a
/// row double it. Every rank sees the same reduced gradients, so every rank decides the same.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler { scale: LossScaler::INITIAL, good_steps: 0 }
    }
}

impl LossScaler {
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u32 = 2000;

    /// The factor the loss is multiplied by before backward.
    pub fn factor(&self) -> f64 {
        self.scale
    }

    /// After the gradients are reduced: if any is not finite, returns false (skip the step) and
    /// halves the scale; else divides every gradient by the scale, returns true (step), and
    /// grows the scale after [`LossScaler::GROWTH_INTERVAL`] good steps.
    pub fn unscale(&mut self, params: &[Param]) -> bool {
        let grads: Vec<Tensor> = params.iter().map(|p| p.tensor.grad()).filter(|g| g.defined()).collect();
        let finite = grads.is_empty()
            || Tensor::stack(&grads.iter().map(|g| g.isfinite().all()).collect::<Vec<_>>(), 0)
                .all()
                .int64_value(&[])
                != 0;
        if !finite {
            self.scale = (self.scale * 0.5).max(f64::MIN_POSITIVE);
            self.good_steps = 0;
            return false;
        }
        let inv = 1.0 / self.scale;
        tch::no_grad(|| {
            for mut g in grads {
                let _ = g.g_mul_scalar_(inv);
            }
        });
        self.good_steps += 1;
        if self.good_steps >= Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// The kind autocast computes convolutions in under `precision` (for tests and logs).
pub fn compute_kind(precision: Precision) -> Kind {
    match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Fp16 => Kind::Half,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autocast_runs_convolutions_in_the_reduced_type_and_restores_the_state() {
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        let conv = || x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        for p in [Precision::Bf16, Precision::Fp16] {
            let y = autocast(p, Device::Cpu, conv);
            assert_eq!(y.kind(), compute_kind(p), "{p:?}: the convolution ran in the reduced type");
            // Nested regions restore their outer state.
            let inner = autocast(p, Device::Cpu, || autocast(Precision::Fp32, Device::Cpu, conv).kind());
            assert_eq!(inner, compute_kind(p));
        }
        assert_eq!(conv().kind(), Kind::Float, "outside a region, f32 again");
        assert_eq!(autocast(Precision::Fp32, Device::Cpu, conv).kind(), Kind::Float);
        // A panic inside a region restores the state too.
        let _ = std::panic::catch_unwind(|| autocast(Precision::Bf16, Device::Cpu, || panic!("inside")));
        assert_eq!(conv().kind(), Kind::Float);
    }

    #[test]
    fn cpu_autocast_off_runs_in_f32_inside_a_region_and_restores_it() {
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        let conv = || x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        let (off, after, on) = autocast(Precision::Bf16, Device::Cpu, || {
            let off = cpu_autocast_off(conv).kind();
            let _ = std::panic::catch_unwind(|| cpu_autocast_off(|| panic!("inside")));
            (off, conv().kind(), cpu_autocast_enabled())
        });
        assert_eq!((off, after, on), (Kind::Float, Kind::BFloat16, true));
        assert!(!cpu_autocast_enabled());
        assert_eq!(cpu_autocast_off(conv).kind(), Kind::Float, "outside a region it changes nothing");
    }

    #[test]
    fn bf16_gradients_reach_f32_master_weights() {
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let y = autocast(Precision::Bf16, Device::Cpu, || x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1));
        y.to_kind(Kind::Float).sum(Kind::Float).backward();
        assert_eq!(w.grad().kind(), Kind::Float);
        assert!(w.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn the_loss_scale_halves_on_overflow_skips_and_grows_after_good_steps() {
        let p = Param { name: "w".into(), tensor: Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true), group: 0 };
        let params = [p];
        let mut s = LossScaler::default();
        (&params[0].tensor * 4.0 * s.factor()).sum(Kind::Float).backward();
        assert!(s.unscale(&params));
        let g = Vec::<f32>::try_from(params[0].tensor.grad()).unwrap();
        assert_eq!(g, [4.0, 4.0, 4.0], "gradients divided by the scale");
        assert_eq!((s.scale, s.good_steps), (LossScaler::INITIAL, 1));
        let _ = params[0].tensor.grad().fill_(f64::INFINITY);
        assert!(!s.unscale(&params), "an inf skips the step");
        assert_eq!((s.scale, s.good_steps), (LossScaler::INITIAL / 2.0, 0));
        let _ = params[0].tensor.grad().fill_(1.0);
        s.good_steps = LossScaler::GROWTH_INTERVAL - 1;
        assert!(s.unscale(&params));
        assert_eq!((s.scale, s.good_steps), (LossScaler::INITIAL, 0), "doubled after the interval");
    }
}
