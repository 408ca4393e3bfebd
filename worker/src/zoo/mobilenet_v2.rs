//! MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", 2018,
//! <https://arxiv.org/abs/1801.04381>), width multiplier 1.0, as torchvision builds it: ReLU6,
//! BatchNorm eps 1e-5, linear bottlenecks, a residual sum where stride is 1 and widths match.
//!
//! Input `[N, 3, 224, 224]`; output `[N, num_classes]`.
//! Groups follow the paper's table 2: `stem` (`features.0` 3x3/2 conv to 32, `features.1` the
//! t = 1 bottleneck to 16), `stage2` (`features.2-3`, 24), `stage3` (`features.4-6`, 32), `stage4`
//! (`features.7-10`, 64), `stage5` (`features.11-13`, 96), `stage6` (`features.14-16`, 160),
//! `stage7` (`features.17` to 320, `features.18` 1x1 to 1280, global average pool, flatten:
//! `[N, 1280]`), `head` (dropout 0.2, `classifier.1`).
//! 3,504,872 parameters with 1000 classes, as torchvision.

use tch::nn;

use super::layers::{self, Act, ConvBn, Residual};
use super::GroupsBuilder;

/// Expansion t, output channels c, repeats n, first stride s (the paper's table 2); one row per
/// group, `stem` to `stage7`.
const SETTINGS: [(i64, i64, i64, i64); 7] =
    [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];

const GROUPS: [&str; 7] = ["stem", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7"];

const LAST_CHANNELS: i64 = 1280;

/// torchvision's `Conv2dNormActivation`: `<p>.0` the convolution, `<p>.1` the BatchNorm.
fn conv_norm(p: &nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, groups: i64, act: Act) -> ConvBn {
    let conv = layers::conv(p / 0, c_in, c_out, k, stride, (k - 1) / 2, groups, false);
    let bn = layers::batch_norm(p / 1, c_out, 1e-5);
    if groups > 1 {
        ConvBn::depthwise(conv, bn, act)
    } else {
        ConvBn::new(conv, bn, act)
    }
}

/// The inverted residual block: 1x1 expansion (absent when t = 1), 3x3 depthwise, 1x1 linear
/// projection, all under `<p>.conv`.
fn inverted_residual(p: &nn::Path, c_in: i64, c_out: i64, stride: i64, expand: i64) -> Residual<ConvBn> {
    let p = p / "conv";
    let hidden = c_in * expand;
    let mut layers = Vec::new();
    if expand != 1 {
        layers.push(conv_norm(&(&p / 0), c_in, hidden, 1, 1, 1, Act::Relu6));
    }
    let i = layers.len();
    layers.push(conv_norm(&(&p / i), hidden, hidden, 3, stride, hidden, Act::Relu6));
    let project = layers::conv(&p / (i + 1), hidden, c_out, 1, 1, 0, 1, false);
    layers.push(ConvBn::new(project, layers::batch_norm(&p / (i + 2), c_out, 1e-5), Act::Identity));
    Residual { layers, residual: stride == 1 && c_in == c_out }
}

/// Builds MobileNetV2; returns the feature width (1280).
pub fn build(b: &mut GroupsBuilder, num_classes: i64) -> i64 {
    let p = b.root();
    let f = &p / "features";
    let mut index = 0;
    let mut c_in = 32;
    for (row, &(t, c, n, s)) in SETTINGS.iter().enumerate() {
        let mut group = nn::seq_t();
        if row == 0 {
            group = group.add(conv_norm(&(&f / index), 3, c_in, 3, 2, 1, Act::Relu6));
            index += 1;
        }
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            group = group.add(inverted_residual(&(&f / index), c_in, c, stride, t));
            index += 1;
            c_in = c;
        }
        if row == SETTINGS.len() - 1 {
            group = group
                .add(conv_norm(&(&f / index), c_in, LAST_CHANNELS, 1, 1, 1, Act::Relu6))
                .add_fn(|xs| xs.adaptive_avg_pool2d([1, 1]).flatten(1, -1));
        }
        b.push(GROUPS[row], group);
    }

    let fc = layers::linear_normal(&p / "classifier" / 1, LAST_CHANNELS, num_classes, 0.01);
    b.push("head", nn::func_t(move |xs, train| xs.dropout(0.2, train).apply(&fc)));
    LAST_CHANNELS
}
