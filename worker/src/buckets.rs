//! Gradient buckets for data-parallel training: the gradients of the *trainable* parameters,
//! flattened into buffers of about `bucket_bytes` each and averaged across ranks with one
//! collective call per bucket (as PyTorch DDP does, buckets are filled from the output side, whose
//! gradients are ready first).
//!
//! Buckets are rebuilt whenever the set of trainable parameters changes (a freeze-stage boundary);
//! frozen parameters are never in a bucket, so they are never reduced. A trainable parameter that
//! got no gradient this step (unused in the forward pass) contributes zeros, so every rank always
//! sends the same layout and no rank waits for a gradient that never comes.

use tch::{Kind, Tensor};

use crate::optim::Param;

/// One bucket: a contiguous range of parameters (by index into the trainable list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Indices into the parameter list this bucket was built from.
    pub params: Vec<usize>,
    /// Total elements.
    pub numel: usize,
}

/// The bucket layout of a parameter list.
#[derive(Clone, Debug)]
pub struct Buckets {
    pub buckets: Vec<Bucket>,
    names: Vec<String>,
}

impl Buckets {
    /// Lays out `params` (input to output order) into buckets of at most `bucket_bytes` (a single
    /// parameter larger than that gets a bucket of its own), starting from the output side.
    pub fn new(params: &[Param], bucket_bytes: usize) -> Buckets {
        let cap = (bucket_bytes / 4).max(1);
        let mut buckets = Vec::new();
        let mut cur = Bucket { params: Vec::new(), numel: 0 };
        for i in (0..params.len()).rev() {
            let n = params[i].tensor.numel();
            if !cur.params.is_empty() && cur.numel + n > cap {
                buckets.push(std::mem::replace(&mut cur, Bucket { params: Vec::new(), numel: 0 }));
            }
            cur.params.push(i);
            cur.numel += n;
        }
        if !cur.params.is_empty() {
            buckets.push(cur);
        }
        Buckets { buckets, names: params.iter().map(|p| p.name.clone()).collect() }
    }

    /// Gives every parameter a (zero) gradient, so that `scatter` can always write one back even
    /// for a parameter the local forward pass did not use. Call when the buckets are rebuilt.
    pub fn ensure_grads(params: &[Param]) {
        for p in params {
            if !p.tensor.grad().defined() {
                (&p.tensor * 0.0).sum(Kind::Float).backward();
            }
        }
    }

    /// The lowest layer group bucket `b` has a parameter of: its gradients are all final once
    /// backward has gone through that group.
    pub fn lowest_group(&self, b: usize, params: &[Param]) -> usize {
        self.buckets[b].params.iter().map(|&i| params[i].group).min().unwrap_or(0)
    }

    /// Names of the parameters in bucket order (every trainable parameter exactly once).
    pub fn parameter_names(&self) -> Vec<&str> {
        self.buckets.iter().flat_map(|b| b.params.iter().map(|&i| self.names[i].as_str())).collect()
    }

    /// Flattens the gradients of bucket `b` into one f32 tensor (zeros where a gradient is
    /// undefined).
    pub fn gather(&self, b: usize, params: &[Param]) -> Tensor {
        let parts: Vec<Tensor> = self.buckets[b]
            .params
            .iter()
            .map(|&i| {
                let g = params[i].tensor.grad();
                if g.defined() {
                    g.to_kind(Kind::Float).flatten(0, -1)
                } else {
                    params[i].tensor.zeros_like().to_kind(Kind::Float).flatten(0, -1).detach()
                }
            })
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// Writes a reduced flat bucket back into the parameters' gradients.
    pub fn scatter(&self, b: usize, params: &[Param], flat: &Tensor) {
        let mut off = 0i64;
        tch::no_grad(|| {
            for &i in &self.buckets[b].params {
                let p = &params[i].tensor;
                let n = p.numel() as i64;
                let src = flat.narrow(0, off, n).view_as(p).to_kind(p.kind());
                let mut g = p.grad();
                // `ensure_grads` ran when the buckets were built, so every gradient is defined.
                if g.defined() {
                    g.copy_(&src);
                }
                off += n;
            }
        });
    }
}
