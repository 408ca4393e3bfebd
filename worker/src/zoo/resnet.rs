//! ResNet-18, -34 and -50 (He et al., "Deep Residual Learning for Image Recognition", 2015,
//! <https://arxiv.org/abs/1512.03385>), as torchvision builds them: ResNet-50's bottleneck puts its
//! stride on the 3x3 convolution ("ResNet v1.5"), and a projection shortcut (`downsample`) appears
//! where the shape changes.
//!
//! Input `[N, 3, 224, 224]` (any size from 32 up works: the pooling is adaptive); output
//! `[N, num_classes]`.
//! Groups: `stem` (`conv1`, `bn1`, ReLU, 3x3 max pool), `layer1` .. `layer4` (`layer4` ends with a
//! global average pool and a flatten to `[N, 512]`, or `[N, 2048]` for ResNet-50), `head` (`fc`).
//! Parameters with 1000 classes: 11,689,512 (18), 21,797,672 (34), 25,557,032 (50), as torchvision.
//! Variable names are torchvision's (`layer1.0.conv1.weight`, `layer2.0.downsample.1.running_mean`).

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::layers::{self, Act, ConvBn};
use super::GroupsBuilder;

/// Which ResNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    R18,
    R34,
    R50,
}

impl Depth {
    /// Blocks per stage (`layer1` .. `layer4`).
    fn blocks(self) -> [i64; 4] {
        match self {
            Depth::R18 => [2, 2, 2, 2],
            Depth::R34 | Depth::R50 => [3, 4, 6, 3],
        }
    }

    /// Output channels of a block over its width (`planes`): 1 for basic blocks, 4 for bottlenecks.
    fn expansion(self) -> i64 {
        match self {
            Depth::R18 | Depth::R34 => 1,
            Depth::R50 => 4,
        }
    }
}

/// A residual block: a chain of conv + BN (ReLU between them, none after the last), added to the
/// shortcut, then ReLU.
#[derive(Debug)]
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl ModuleT for Block {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = self.convs.iter().fold(xs.shallow_clone(), |ys, c| ys.apply_t(c, train));
        let shortcut = match &self.downsample {
            Some(d) => xs.apply_t(d, train),
            None => xs.shallow_clone(),
        };
        // `out += identity; relu_(out)` in place, as torchvision does.
        let mut ys = ys;
        let _ = ys.g_add_(&shortcut);
        ys.relu_()
    }
}

fn conv_bn(p: &nn::Path, i: usize, c_in: i64, c_out: i64, k: i64, stride: i64, act: Act) -> ConvBn {
    let conv = layers::conv(p / format!("conv{i}"), c_in, c_out, k, stride, k / 2, 1, false);
    let bn = layers::batch_norm(p / format!("bn{i}"), c_out, 1e-5);
    ConvBn::new(conv, bn, act)
}

fn block(p: &nn::Path, depth: Depth, c_in: i64, planes: i64, stride: i64) -> Block {
    let c_out = planes * depth.expansion();
    let convs = match depth {
        Depth::R18 | Depth::R34 => {
            vec![conv_bn(p, 1, c_in, planes, 3, stride, Act::Relu), conv_bn(p, 2, planes, planes, 3, 1, Act::Identity)]
        }
        Depth::R50 => vec![
            conv_bn(p, 1, c_in, planes, 1, 1, Act::Relu),
            conv_bn(p, 2, planes, planes, 3, stride, Act::Relu),
            conv_bn(p, 3, planes, c_out, 1, 1, Act::Identity),
        ],
    };
    let downsample = (stride != 1 || c_in != c_out).then(|| {
        let d = p / "downsample";
        let conv = layers::conv(&d / 0, c_in, c_out, 1, stride, 0, 1, false);
        let bn = layers::batch_norm(&d / 1, c_out, 1e-5);
        ConvBn::new(conv, bn, Act::Identity)
    });
    Block { convs, downsample }
}

/// Builds a ResNet; returns the feature width (512, or 2048 for ResNet-50).
pub fn build(b: &mut GroupsBuilder, depth: Depth, num_classes: i64) -> i64 {
    let p = b.root();
    let stem = ConvBn::new(
        layers::conv(&p / "conv1", 3, 64, 7, 2, 3, 1, false),
        layers::batch_norm(&p / "bn1", 64, 1e-5),
        Act::Relu,
    );
    b.push(
        "stem",
        nn::func_t(move |xs, train| xs.apply_t(&stem, train).max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)),
    );

    let mut c_in = 64;
    for (i, n) in depth.blocks().into_iter().enumerate() {
        let name = format!("layer{}", i + 1);
        let lp = &p / name.as_str();
        let planes = 64 << i;
        let mut layer = nn::seq_t();
        for j in 0..n {
            let stride = if i > 0 && j == 0 { 2 } else { 1 };
            layer = layer.add(block(&(&lp / j), depth, c_in, planes, stride));
            c_in = planes * depth.expansion();
        }
        if i == 3 {
            layer = layer.add_fn(|xs| xs.adaptive_avg_pool2d([1, 1]).flatten(1, -1));
        }
        b.push(&name, layer);
    }

    let feature_dim = c_in;
    let fc = layers::linear_default(&p / "fc", feature_dim, num_classes);
    b.push("head", fc);
    feature_dim
}
