//! AlexNet (Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural
//! Networks", 2012), in torchvision's single-tower variant (Krizhevsky, "One weird trick for
//! parallelizing convolutional neural networks", 2014): 64/192/384/256/256 filters, no local
//! response normalization.
//!
//! Input `[N, 3, 224, 224]`; output `[N, num_classes]`.
//! Groups: `conv1` (`features.0` 11x11 stride 4, ReLU, 3x3/2 max pool), `conv2` (`features.3` 5x5,
//! ReLU, max pool), `conv3_5` (`features.6`, `.8`, `.10` 3x3 with ReLUs, max pool), `fc` (adaptive
//! average pool to 6x6, flatten, dropout 0.5, `classifier.1` 9216 -> 4096, ReLU, dropout 0.5,
//! `classifier.4` 4096 -> 4096, ReLU: features `[N, 4096]`), `head` (`classifier.6`).
//! 61,100,840 parameters with 1000 classes, as torchvision.
//! From scratch, convolutions get He init (torchvision keeps PyTorch's default here) and linear layers
//! PyTorch's default.

use tch::nn;

use super::layers;
use super::GroupsBuilder;

fn max_pool(xs: &tch::Tensor) -> tch::Tensor {
    xs.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// Builds AlexNet; returns the feature width (4096).
pub fn build(b: &mut GroupsBuilder, num_classes: i64) -> i64 {
    let p = b.root();
    let f = &p / "features";
    let conv1 = layers::conv(&f / 0, 3, 64, 11, 4, 2, 1, true);
    b.push("conv1", nn::seq_t().add(conv1).add_fn(|xs| max_pool(&xs.relu())));
    let conv2 = layers::conv(&f / 3, 64, 192, 5, 1, 2, 1, true);
    b.push("conv2", nn::seq_t().add(conv2).add_fn(|xs| max_pool(&xs.relu())));
    let conv3 = layers::conv(&f / 6, 192, 384, 3, 1, 1, 1, true);
    let conv4 = layers::conv(&f / 8, 384, 256, 3, 1, 1, 1, true);
    let conv5 = layers::conv(&f / 10, 256, 256, 3, 1, 1, 1, true);
    b.push(
        "conv3_5",
        nn::seq_t()
            .add(conv3)
            .add_fn(|xs| xs.relu())
            .add(conv4)
            .add_fn(|xs| xs.relu())
            .add(conv5)
            .add_fn(|xs| max_pool(&xs.relu())),
    );

    let c = &p / "classifier";
    let fc1 = layers::linear_default(&c / 1, 256 * 6 * 6, 4096);
    let fc2 = layers::linear_default(&c / 4, 4096, 4096);
    b.push(
        "fc",
        nn::func_t(move |xs, train| {
            xs.adaptive_avg_pool2d([6, 6])
                .flatten(1, -1)
                .dropout(0.5, train)
                .apply(&fc1)
                .relu()
                .dropout(0.5, train)
                .apply(&fc2)
                .relu()
        }),
    );
    let head = layers::linear_default(&c / 6, 4096, num_classes);
    b.push("head", head);
    4096
}
