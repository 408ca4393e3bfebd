//! LeNet-5 (LeCun et al., "Gradient-based learning applied to document recognition", 1998), in its
//! common modern form: ReLU and max pooling instead of scaled tanh and subsampling.
//!
//! Input `[N, 1, 32, 32]` (28x28 digits are resized to 32); output `[N, num_classes]`.
//! 61,706 parameters for 10 classes. LeNet-5 has no torchvision weights; its variable names are
//! thaw's own: `conv1`, `conv2` (group `conv`), `fc1`, `fc2` (group `fc`), `fc3` (group `head`).

use tch::nn::{self, ModuleT};

use super::{layers, GroupsBuilder};

/// Builds LeNet-5; returns the feature width (84).
pub fn build(b: &mut GroupsBuilder, num_classes: i64) -> i64 {
    let p = b.root();
    let conv1 = layers::conv(&p / "conv1", 1, 6, 5, 1, 0, 1, true);
    let conv2 = layers::conv(&p / "conv2", 6, 16, 5, 1, 0, 1, true);
    b.push(
        "conv",
        nn::func_t(move |xs, _train| {
            xs.apply(&conv1).relu().max_pool2d_default(2).apply(&conv2).relu().max_pool2d_default(2).flatten(1, -1)
        }),
    );
    let fc1 = layers::linear_default(&p / "fc1", 16 * 5 * 5, 120);
    let fc2 = layers::linear_default(&p / "fc2", 120, 84);
    b.push("fc", nn::func_t(move |xs, _train| xs.apply(&fc1).relu().apply(&fc2).relu()));
    let fc3 = layers::linear_default(&p / "fc3", 84, num_classes);
    b.push("head", nn::func_t(move |xs, train| fc3.forward_t(xs, train)));
    84
}
