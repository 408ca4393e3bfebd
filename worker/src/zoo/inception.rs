//! Inception v3 (Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", 2015,
//! <https://arxiv.org/abs/1512.00567>), as torchvision builds it: every convolution is a
//! `BasicConv2d` (conv without bias, BatchNorm eps 0.001, ReLU) named `<block>.conv` / `<block>.bn`.
//!
//! Input `[N, 3, 299, 299]` (at least 75x75), normalized to [-1, 1]: torchvision's
//! `transform_input` is left to preprocessing and never applied here. Output `[N, num_classes]`.
//! Groups: `stem` (`Conv2d_1a_3x3` .. `Conv2d_4a_3x3` with two 3x3/2 max pools), `mixed5`
//! (`Mixed_5b` .. `Mixed_5d`), `mixed6` (`Mixed_6a` .. `Mixed_6e`), `mixed7` (`Mixed_7a` ..
//! `Mixed_7c`, global average pool, flatten: `[N, 2048]`), `head` (dropout 0.5, `fc`).
//!
//! The auxiliary classifier (`AuxLogits.*`) is built so that torchvision checkpoints load whole, but
//! it belongs to no group, never runs and never trains; its `fc` keeps 1000 outputs whatever
//! `num_classes` is. 27,161,264 parameters with 1000 classes, auxiliary classifier included, as
//! torchvision counts them.
//! From scratch, convolutions get He init and linear layers PyTorch's default (torchvision draws all
//! of them from a truncated normal, std 0.1).

use tch::nn;
use tch::Tensor;

use super::layers::{self, Act, ConvBn};
use super::GroupsBuilder;

/// Outputs of the auxiliary classifier in torchvision's ImageNet checkpoint.
const AUX_CLASSES: i64 = 1000;

/// `BasicConv2d` with a square kernel.
fn basic(p: &nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> ConvBn {
    let conv = layers::conv(p / "conv", c_in, c_out, k, stride, padding, 1, false);
    ConvBn::new(conv, layers::batch_norm(p / "bn", c_out, 0.001), Act::Relu)
}

/// `BasicConv2d` with a rectangular `[kh, kw]` kernel and stride 1.
fn basic_rect(p: &nn::Path, c_in: i64, c_out: i64, k: [i64; 2], padding: [i64; 2]) -> ConvBn {
    let conv = layers::conv_rect(p / "conv", c_in, c_out, k, padding, false);
    ConvBn::new(conv, layers::batch_norm(p / "bn", c_out, 0.001), Act::Relu)
}

fn max_pool(xs: &Tensor) -> Tensor {
    xs.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// 3x3 average pool, stride 1, padding counted in the mean (PyTorch's default).
fn avg_pool(xs: &Tensor) -> Tensor {
    xs.avg_pool2d([3, 3], [1, 1], [1, 1], false, true, None::<i64>)
}

fn chain(xs: &Tensor, convs: &[ConvBn], train: bool) -> Tensor {
    convs.iter().fold(xs.shallow_clone(), |ys, c| ys.apply_t(c, train))
}

/// 35x35 block: 1x1, 5x5, double 3x3 and pooled branches.
fn inception_a(p: &nn::Path, c_in: i64, pool_features: i64) -> nn::FuncT<'static> {
    let b1 = basic(&(p / "branch1x1"), c_in, 64, 1, 1, 0);
    let b5 = [basic(&(p / "branch5x5_1"), c_in, 48, 1, 1, 0), basic(&(p / "branch5x5_2"), 48, 64, 5, 1, 2)];
    let b3 = [
        basic(&(p / "branch3x3dbl_1"), c_in, 64, 1, 1, 0),
        basic(&(p / "branch3x3dbl_2"), 64, 96, 3, 1, 1),
        basic(&(p / "branch3x3dbl_3"), 96, 96, 3, 1, 1),
    ];
    let bp = basic(&(p / "branch_pool"), c_in, pool_features, 1, 1, 0);
    nn::func_t(move |xs, t| {
        Tensor::cat(&[xs.apply_t(&b1, t), chain(xs, &b5, t), chain(xs, &b3, t), avg_pool(xs).apply_t(&bp, t)], 1)
    })
}

/// Grid reduction 35x35 -> 17x17.
fn inception_b(p: &nn::Path, c_in: i64) -> nn::FuncT<'static> {
    let b3 = basic(&(p / "branch3x3"), c_in, 384, 3, 2, 0);
    let bd = [
        basic(&(p / "branch3x3dbl_1"), c_in, 64, 1, 1, 0),
        basic(&(p / "branch3x3dbl_2"), 64, 96, 3, 1, 1),
        basic(&(p / "branch3x3dbl_3"), 96, 96, 3, 2, 0),
    ];
    nn::func_t(move |xs, t| Tensor::cat(&[xs.apply_t(&b3, t), chain(xs, &bd, t), max_pool(xs)], 1))
}

/// 17x17 block with factorized 7x7 convolutions (1x7 then 7x1).
fn inception_c(p: &nn::Path, c_in: i64, c7: i64) -> nn::FuncT<'static> {
    let b1 = basic(&(p / "branch1x1"), c_in, 192, 1, 1, 0);
    let b7 = [
        basic(&(p / "branch7x7_1"), c_in, c7, 1, 1, 0),
        basic_rect(&(p / "branch7x7_2"), c7, c7, [1, 7], [0, 3]),
        basic_rect(&(p / "branch7x7_3"), c7, 192, [7, 1], [3, 0]),
    ];
    let bd = [
        basic(&(p / "branch7x7dbl_1"), c_in, c7, 1, 1, 0),
        basic_rect(&(p / "branch7x7dbl_2"), c7, c7, [7, 1], [3, 0]),
        basic_rect(&(p / "branch7x7dbl_3"), c7, c7, [1, 7], [0, 3]),
        basic_rect(&(p / "branch7x7dbl_4"), c7, c7, [7, 1], [3, 0]),
        basic_rect(&(p / "branch7x7dbl_5"), c7, 192, [1, 7], [0, 3]),
    ];
    let bp = basic(&(p / "branch_pool"), c_in, 192, 1, 1, 0);
    nn::func_t(move |xs, t| {
        Tensor::cat(&[xs.apply_t(&b1, t), chain(xs, &b7, t), chain(xs, &bd, t), avg_pool(xs).apply_t(&bp, t)], 1)
    })
}

/// Grid reduction 17x17 -> 8x8.
fn inception_d(p: &nn::Path, c_in: i64) -> nn::FuncT<'static> {
    let b3 = [basic(&(p / "branch3x3_1"), c_in, 192, 1, 1, 0), basic(&(p / "branch3x3_2"), 192, 320, 3, 2, 0)];
    let b7 = [
        basic(&(p / "branch7x7x3_1"), c_in, 192, 1, 1, 0),
        basic_rect(&(p / "branch7x7x3_2"), 192, 192, [1, 7], [0, 3]),
        basic_rect(&(p / "branch7x7x3_3"), 192, 192, [7, 1], [3, 0]),
        basic(&(p / "branch7x7x3_4"), 192, 192, 3, 2, 0),
    ];
    nn::func_t(move |xs, t| Tensor::cat(&[chain(xs, &b3, t), chain(xs, &b7, t), max_pool(xs)], 1))
}

/// 8x8 block with expanded filter banks (1x3 and 3x1 side by side).
fn inception_e(p: &nn::Path, c_in: i64) -> nn::FuncT<'static> {
    let b1 = basic(&(p / "branch1x1"), c_in, 320, 1, 1, 0);
    let b3_1 = basic(&(p / "branch3x3_1"), c_in, 384, 1, 1, 0);
    let b3_2a = basic_rect(&(p / "branch3x3_2a"), 384, 384, [1, 3], [0, 1]);
    let b3_2b = basic_rect(&(p / "branch3x3_2b"), 384, 384, [3, 1], [1, 0]);
    let bd = [basic(&(p / "branch3x3dbl_1"), c_in, 448, 1, 1, 0), basic(&(p / "branch3x3dbl_2"), 448, 384, 3, 1, 1)];
    let bd_3a = basic_rect(&(p / "branch3x3dbl_3a"), 384, 384, [1, 3], [0, 1]);
    let bd_3b = basic_rect(&(p / "branch3x3dbl_3b"), 384, 384, [3, 1], [1, 0]);
    let bp = basic(&(p / "branch_pool"), c_in, 192, 1, 1, 0);
    nn::func_t(move |xs, t| {
        let y3 = xs.apply_t(&b3_1, t);
        let yd = chain(xs, &bd, t);
        Tensor::cat(
            &[
                xs.apply_t(&b1, t),
                y3.apply_t(&b3_2a, t),
                y3.apply_t(&b3_2b, t),
                yd.apply_t(&bd_3a, t),
                yd.apply_t(&bd_3b, t),
                avg_pool(xs).apply_t(&bp, t),
            ],
            1,
        )
    })
}

/// Builds Inception v3; returns the feature width (2048).
pub fn build(b: &mut GroupsBuilder, num_classes: i64) -> i64 {
    let p = b.root();
    let stem = nn::seq_t()
        .add(basic(&(&p / "Conv2d_1a_3x3"), 3, 32, 3, 2, 0))
        .add(basic(&(&p / "Conv2d_2a_3x3"), 32, 32, 3, 1, 0))
        .add(basic(&(&p / "Conv2d_2b_3x3"), 32, 64, 3, 1, 1))
        .add_fn(max_pool)
        .add(basic(&(&p / "Conv2d_3b_1x1"), 64, 80, 1, 1, 0))
        .add(basic(&(&p / "Conv2d_4a_3x3"), 80, 192, 3, 1, 0))
        .add_fn(max_pool);
    b.push("stem", stem);

    let mixed5 = nn::seq_t()
        .add(inception_a(&(&p / "Mixed_5b"), 192, 32))
        .add(inception_a(&(&p / "Mixed_5c"), 256, 64))
        .add(inception_a(&(&p / "Mixed_5d"), 288, 64));
    b.push("mixed5", mixed5);

    let mixed6 = nn::seq_t()
        .add(inception_b(&(&p / "Mixed_6a"), 288))
        .add(inception_c(&(&p / "Mixed_6b"), 768, 128))
        .add(inception_c(&(&p / "Mixed_6c"), 768, 160))
        .add(inception_c(&(&p / "Mixed_6d"), 768, 160))
        .add(inception_c(&(&p / "Mixed_6e"), 768, 192));
    b.push("mixed6", mixed6);

    // The auxiliary classifier only exists to hold torchvision's weights: its modules are dropped.
    let aux = &p / "AuxLogits";
    let _ = basic(&(&aux / "conv0"), 768, 128, 1, 1, 0);
    let _ = basic(&(&aux / "conv1"), 128, 768, 5, 1, 0);
    let _ = layers::linear_default(&aux / "fc", 768, AUX_CLASSES);
    b.push_unused();

    let mixed7 = nn::seq_t()
        .add(inception_d(&(&p / "Mixed_7a"), 768))
        .add(inception_e(&(&p / "Mixed_7b"), 1280))
        .add(inception_e(&(&p / "Mixed_7c"), 2048))
        .add_fn(|xs| xs.adaptive_avg_pool2d([1, 1]).flatten(1, -1));
    b.push("mixed7", mixed7);

    let fc = layers::linear_default(&p / "fc", 2048, num_classes);
    b.push("head", nn::func_t(move |xs, train| xs.dropout(0.5, train).apply(&fc)));
    2048
}
