//! thaw's worker: everything that touches tensors.
//!
//! - [`zoo`]: the architectures, as named layer groups with torchvision variable names;
//! - [`weights`]: reading torchvision checkpoints (zip and legacy formats), the weights cache,
//!   downloads with hash checks, loading into a network;
//! - [`imagenet_classes`]: the ImageNet-1k class names, in the pretrained heads' index order;
//!
//! libtorch runs on the calling thread; nothing here is async.

pub mod agent;
pub mod amp;
pub mod buckets;
pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod ddp;
pub mod device;
pub mod ema;
pub mod failpoint;
pub mod feature_cache;
pub mod imagenet_classes;
pub mod mix;
pub mod optim;
pub mod precise_bn;
pub mod predict;
pub mod progress;
pub mod recommend;
pub mod stage_cache;
pub mod tensor_io;
pub mod tensorboard;
pub mod train;
pub mod weights;
pub mod zoo;
