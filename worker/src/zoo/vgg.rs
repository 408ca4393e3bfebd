//! VGG-16 and VGG-19 (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
//! Recognition", 2014, <https://arxiv.org/abs/1409.1556>), configurations D and E without
//! BatchNorm, as torchvision builds them.
//!
//! Input `[N, 3, 224, 224]`; output `[N, num_classes]`.
//! Groups: `block1` .. `block5` (3x3 convolutions with ReLU, each block ending with its 2x2 max
//! pool; `features.<i>` numbers every conv, ReLU and pool, as torchvision's `nn.Sequential`), `fc`
//! (adaptive average pool to 7x7, flatten, `classifier.0` 25088 -> 4096, ReLU, dropout 0.5,
//! `classifier.3` 4096 -> 4096, ReLU, dropout 0.5: features `[N, 4096]`), `head` (`classifier.6`).
//! Parameters with 1000 classes: 138,357,544 (16), 143,667,240 (19), as torchvision.

use tch::nn;

use super::layers;
use super::GroupsBuilder;

/// Which VGG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    D16,
    D19,
}

impl Depth {
    /// Convolutions per block; every block doubles the width up to 512.
    fn convs_per_block(self) -> [usize; 5] {
        match self {
            Depth::D16 => [2, 2, 3, 3, 3],
            Depth::D19 => [2, 2, 4, 4, 4],
        }
    }
}

/// Builds a VGG; returns the feature width (4096).
pub fn build(b: &mut GroupsBuilder, depth: Depth, num_classes: i64) -> i64 {
    let p = b.root();
    let features = &p / "features";
    // Index in torchvision's `features` Sequential: a conv and its ReLU take two slots, a pool one.
    let mut index = 0;
    let mut c_in = 3;
    for (i, n) in depth.convs_per_block().into_iter().enumerate() {
        let c_out = (64 << i).min(512);
        let mut block = nn::seq_t();
        for _ in 0..n {
            let conv = layers::conv(&features / index, c_in, c_out, 3, 1, 1, 1, true);
            block = block.add(conv).add_fn(|xs| xs.relu());
            index += 2;
            c_in = c_out;
        }
        block = block.add_fn(|xs| xs.max_pool2d_default(2));
        index += 1;
        b.push(&format!("block{}", i + 1), block);
    }

    let classifier = &p / "classifier";
    let fc1 = layers::linear_normal(&classifier / 0, 512 * 7 * 7, 4096, 0.01);
    let fc2 = layers::linear_normal(&classifier / 3, 4096, 4096, 0.01);
    b.push(
        "fc",
        nn::func_t(move |xs, train| {
            xs.adaptive_avg_pool2d([7, 7])
                .flatten(1, -1)
                .apply(&fc1)
                .relu()
                .dropout(0.5, train)
                .apply(&fc2)
                .relu()
                .dropout(0.5, train)
        }),
    );
    let head = layers::linear_normal(&classifier / 6, 4096, num_classes, 0.01);
    b.push("head", head);
    4096
}
