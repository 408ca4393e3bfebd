//! Building blocks shared by the architectures: initialization schemes and conv + BatchNorm.

use std::cell::Cell;

use tch::nn::{self, init, Init, ModuleT};
use tch::Tensor;

thread_local! {
    /// Overrides the train flag of BatchNorm layers (not of dropout) while set; see [`with_bn_mode`].
    static BN_TRAIN: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Runs `f` with every BatchNorm in training (`Some(true)`) or eval (`Some(false)`) mode whatever
/// the train flag its module is called with, or following that flag (`None`). This is how a
/// stage's BatchNorm policy reaches the layers without threading it through every architecture.
pub fn with_bn_mode<T>(mode: Option<bool>, f: impl FnOnce() -> T) -> T {
    let before = BN_TRAIN.with(|c| c.replace(mode));
    let out = f();
    BN_TRAIN.with(|c| c.set(before));
    out
}

fn bn_train(train: bool) -> bool {
    BN_TRAIN.with(|c| c.get()).unwrap_or(train)
}

/// He (Kaiming) normal init, fan-out, for convolutions followed by ReLU (torchvision's choice for
/// ResNet, VGG and MobileNetV2).
pub const HE_FAN_OUT: Init = Init::Kaiming {
    dist: init::NormalOrUniform::Normal,
    fan: init::FanInOut::FanOut,
    non_linearity: init::NonLinearity::ReLU,
};

/// A convolution with He init and zero bias.
pub fn conv(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    k: i64,
    stride: i64,
    padding: i64,
    groups: i64,
    bias: bool,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        groups,
        bias,
        ws_init: HE_FAN_OUT,
        bs_init: Init::Const(0.),
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, cfg)
}

/// A convolution with a rectangular `[kh, kw]` kernel and stride 1 (Inception's factorized 1x7, 7x1,
/// 1x3 and 3x1 convolutions), He init and zero bias.
pub fn conv_rect(p: nn::Path, c_in: i64, c_out: i64, k: [i64; 2], padding: [i64; 2], bias: bool) -> nn::Conv2D {
    let cfg = nn::ConvConfigND::<[i64; 2]> {
        padding,
        bias,
        ws_init: HE_FAN_OUT,
        bs_init: Init::Const(0.),
        ..Default::default()
    };
    nn::conv(p, c_in, c_out, k, cfg)
}

/// BatchNorm with torchvision's defaults (eps 1e-5, momentum 0.1, weight 1, bias 0).
pub fn batch_norm(p: nn::Path, c: i64, eps: f64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig { eps, ws_init: Init::Const(1.), bs_init: Init::Const(0.), ..Default::default() };
    nn::batch_norm2d(p, c, cfg)
}

/// A linear layer drawn from N(0, std) with zero bias (torchvision's VGG/MobileNetV2 classifiers).
pub fn linear_normal(p: nn::Path, d_in: i64, d_out: i64, std: f64) -> nn::Linear {
    let cfg =
        nn::LinearConfig { ws_init: Init::Randn { mean: 0., stdev: std }, bs_init: Some(Init::Const(0.)), bias: true };
    nn::linear(p, d_in, d_out, cfg)
}

/// A linear layer with PyTorch's default init (Kaiming uniform, a = sqrt(5); bias U(+-1/sqrt(fan_in))).
pub fn linear_default(p: nn::Path, d_in: i64, d_out: i64) -> nn::Linear {
    nn::linear(p, d_in, d_out, Default::default())
}

/// The activation that follows a convolution and its BatchNorm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// None (the projection before a residual sum).
    Identity,
    Relu,
    /// min(max(x, 0), 6), MobileNetV2's activation.
    Relu6,
}

/// Convolution, BatchNorm and an activation as one module: torchvision's `Conv2dNormActivation`
/// (`<i>.0`, `<i>.1`), Inception's `BasicConv2d` (`conv`, `bn`) and ResNet's `convK`/`bnK` pairs.
/// The caller names the two paths, so each architecture keeps its torchvision keys.
#[derive(Debug)]
pub struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    act: Act,
    /// A depthwise convolution (MobileNetV2's 3x3 ones): under CPU autocast it runs in f32.
    /// oneDNN's bf16 depthwise kernels are slow: MobileNetV2's training step at 48x48 on one
    /// thread took 212 ms in bf16 against 128 ms in f32, and 115 ms in bf16 with only these in
    /// f32 (`OMP_NUM_THREADS=1 cargo bench --bench train_step`).
    depthwise: bool,
}

impl ConvBn {
    pub fn new(conv: nn::Conv2D, bn: nn::BatchNorm, act: Act) -> Self {
        ConvBn { conv, bn, act, depthwise: false }
    }

    /// A depthwise convolution (`groups` = its input channels), kept in f32 under CPU autocast.
    pub fn depthwise(conv: nn::Conv2D, bn: nn::BatchNorm, act: Act) -> Self {
        ConvBn { conv, bn, act, depthwise: true }
    }
}

impl ModuleT for ConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = if self.depthwise && crate::amp::cpu_autocast_enabled() {
            crate::amp::cpu_autocast_off(|| xs.to_kind(tch::Kind::Float).apply(&self.conv))
        } else {
            xs.apply(&self.conv)
        };
        let mut ys = ys.apply_t(&self.bn, bn_train(train));
        // In place, as torchvision does: BatchNorm's backward needs its input, not its output, so
        // overwriting the output is safe and saves an allocation and a pass over memory.
        match self.act {
            Act::Identity => ys,
            Act::Relu => ys.relu_(),
            Act::Relu6 => ys.relu6_(),
        }
    }
}

/// Layers run in sequence, their input added to their output when `residual` (the inverted
/// bottlenecks of MobileNetV2 and EfficientNet: stride 1, equal widths).
#[derive(Debug)]
pub struct Residual<M> {
    pub layers: Vec<M>,
    pub residual: bool,
}

impl<M: ModuleT> ModuleT for Residual<M> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = self.layers.iter().fold(xs.shallow_clone(), |ys, l| ys.apply_t(l, train));
        if self.residual {
            ys + xs
        } else {
            ys
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amp::autocast;
    use thaw_coordinator::spec::Precision;
    use tch::{Device, Kind};

    #[test]
    fn depthwise_convolutions_stay_f32_under_cpu_autocast_and_agree_with_f32() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let dw = ConvBn::depthwise(
            conv(&root / "dw" / 0, 8, 8, 3, 1, 1, 8, false),
            batch_norm(&root / "dw" / 1, 8, 1e-5),
            Act::Relu6,
        );
        let pw = ConvBn::new(conv(&root / "pw" / 0, 8, 8, 1, 1, 0, 1, false), batch_norm(&root / "pw" / 1, 8, 1e-5), Act::Relu6);
        let x = Tensor::randn([2, 8, 6, 6], (Kind::Float, Device::Cpu));
        let (d, p) = autocast(Precision::Bf16, Device::Cpu, || {
            let xb = x.to_kind(Kind::BFloat16);
            (dw.forward_t(&xb, false), pw.forward_t(&x, false))
        });
        assert_eq!(d.kind(), Kind::Float, "the depthwise convolution ran in f32 (from a bf16 input)");
        assert_eq!(p.kind(), Kind::BFloat16, "the pointwise one in bf16");
        let exact = dw.forward_t(&x.to_kind(Kind::BFloat16).to_kind(Kind::Float), false);
        assert!(d.allclose(&exact, 1e-5, 1e-5, false), "the same numbers as f32 on the same input");
        // Gradients flow back through the cast to a bf16 input and to the f32 weights.
        let xs = x.to_kind(Kind::BFloat16).set_requires_grad(true);
        let y = autocast(Precision::Bf16, Device::Cpu, || dw.forward_t(&xs, true));
        y.sum(Kind::Float).backward();
        assert_eq!(xs.grad().kind(), Kind::BFloat16);
        assert!(dw.conv.ws.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
