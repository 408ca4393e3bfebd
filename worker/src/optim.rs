//! Optimizers over named parameters with per-group learning rates: SGD with momentum and AdamW,
//! with PyTorch's update rules.
//!
//! Written here rather than using tch's `nn::Optimizer` because a checkpoint must hold the
//! optimizer state (momentum and moment buffers) so a run resumes exactly, and tch's C++ optimizers
//! do not expose it. Parameters whose gradient is undefined (frozen groups) are skipped, as in
//! PyTorch, and their state is left as it was.

use std::collections::HashMap;

use tch::Tensor;
use thaw_coordinator::spec::OptimizerSpec;

/// A parameter the optimizer updates, with the index of its layer group (for per-group LRs).
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub group: usize,
}

pub struct Optimizer {
    spec: OptimizerSpec,
    params: Vec<Param>,
    /// Per-parameter buffers: SGD `[momentum]`, AdamW `[exp_avg, exp_avg_sq]`.
    state: HashMap<String, Vec<Tensor>>,
    /// Per-parameter step counts (AdamW bias correction).
    steps: HashMap<String, i64>,
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec, params: Vec<Param>) -> Self {
        Optimizer { spec, params, state: HashMap::new(), steps: HashMap::new() }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Replaces the parameter list (a freeze-stage boundary): state of parameters that stay
    /// trainable is kept, state of parameters that leave is dropped.
    pub fn set_params(&mut self, params: Vec<Param>) {
        let keep: std::collections::HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
        self.state.retain(|n, _| keep.contains(n.as_str()));
        self.steps.retain(|n, _| keep.contains(n.as_str()));
        self.params = params;
    }

    /// Clears the gradients of every parameter.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// One update; `lr(group)` gives the learning rate of a layer group.
    ///
    /// SGD works in place, as torch's foreach implementation does: the weight decay and the
    /// Nesterov term are added into the gradient (which the next step clears anyway) and the
    /// update is one `addcmul_` with a scalar tensor, so a step allocates nothing the size of a
    /// parameter (the first step's momentum buffers aside).
    pub fn step(&mut self, lr: &dyn Fn(usize) -> f64) {
        tch::no_grad(|| {
            for p in &self.params {
                let mut grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let lr = lr(p.group);
                let mut w = p.tensor.shallow_clone();
                let count = self.steps.entry(p.name.clone()).or_insert(0);
                *count += 1;
                let scalar = |v: f64| Tensor::from(v).to_kind(w.kind());
                match self.spec {
                    OptimizerSpec::Sgd { momentum, nesterov, weight_decay } => {
                        if weight_decay != 0.0 {
                            let _ = grad.addcmul_(&w, &scalar(weight_decay));
                        }
                        let mut d = grad.shallow_clone();
                        if momentum != 0.0 {
                            let state = self.state.entry(p.name.clone()).or_default();
                            if state.is_empty() {
                                state.push(grad.detach().copy());
                            } else {
                                let _ = state[0].g_mul_scalar_(momentum).g_add_(&grad);
                            }
                            if nesterov {
                                let _ = grad.addcmul_(&state[0], &scalar(momentum));
                            } else {
                                d = state[0].shallow_clone();
                            }
                        }
                        let _ = w.addcmul_(&d, &scalar(-lr));
                    }
                    OptimizerSpec::Adamw { beta1, beta2, eps, weight_decay } => {
                        if weight_decay != 0.0 {
                            let _ = w.g_mul_scalar_(1.0 - lr * weight_decay);
                        }
                        let state = self.state.entry(p.name.clone()).or_default();
                        if state.is_empty() {
                            state.push(grad.zeros_like());
                            state.push(grad.zeros_like());
                        }
                        let _ = state[0].g_mul_scalar_(beta1).g_add_(&(&grad * (1.0 - beta1)));
                        let _ = state[1].g_mul_scalar_(beta2).g_add_(&(&grad * &grad * (1.0 - beta2)));
                        let t = *count as i32;
                        let bc1 = 1.0 - beta1.powi(t);
                        let bc2 = 1.0 - beta2.powi(t);
                        let denom = (&state[1] / bc2).sqrt() + eps;
                        let _ = w.g_sub_(&((&state[0] / &denom) * (lr / bc1)));
                    }
                }
            }
        });
    }

    /// The optimizer state as named tensors (`<param>.<buffer>`), plus step counts (`<param>.step`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let names: [&str; 2] = match self.spec {
            OptimizerSpec::Sgd { .. } => ["momentum_buffer", ""],
            OptimizerSpec::Adamw { .. } => ["exp_avg", "exp_avg_sq"],
        };
        let mut out = Vec::new();
        for p in &self.params {
            if let Some(bufs) = self.state.get(&p.name) {
                for (b, n) in bufs.iter().zip(names) {
                    out.push((format!("{}.{n}", p.name), b.shallow_clone()));
                }
            }
            if let Some(s) = self.steps.get(&p.name) {
                out.push((format!("{}.step", p.name), Tensor::from_slice(&[*s])));
            }
        }
        out
    }

    /// Restores state saved by [`Optimizer::state_tensors`]; unknown names are ignored, so a
    /// parameter that was frozen when the state was saved simply starts fresh.
    pub fn load_state(&mut self, saved: &HashMap<String, Tensor>) {
        let names: &[&str] = match self.spec {
            OptimizerSpec::Sgd { .. } => &["momentum_buffer"],
            OptimizerSpec::Adamw { .. } => &["exp_avg", "exp_avg_sq"],
        };
        for p in &self.params {
            let bufs: Option<Vec<Tensor>> = names
                .iter()
                .map(|n| saved.get(&format!("{}.{n}", p.name)).map(|t| t.to_device(p.tensor.device()).copy()))
                .collect();
            if let Some(bufs) = bufs {
                self.state.insert(p.name.clone(), bufs);
            }
            if let Some(s) = saved.get(&format!("{}.step", p.name)) {
                self.steps.insert(p.name.clone(), s.int64_value(&[0]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn quadratic_param(v: &[f32]) -> Param {
        Param { name: "w".into(), tensor: Tensor::from_slice(v).set_requires_grad(true), group: 0 }
    }

    fn loss_step(opt: &mut Optimizer, lr: f64) {
        opt.zero_grad();
        let w = &opt.params()[0].tensor;
        (w * w).sum(Kind::Float).backward();
        opt.step(&|_| lr);
    }

    #[test]
    fn sgd_momentum_matches_pytorch_rule() {
        // loss = sum(w^2), grad = 2w. With momentum 0.9, lr 0.1 from w = 1:
        // step 1: buf = 2, w = 1 - 0.2 = 0.8; step 2: g = 1.6, buf = 0.9*2 + 1.6 = 3.4, w = 0.8 - 0.34 = 0.46.
        let spec = OptimizerSpec::Sgd { momentum: 0.9, nesterov: false, weight_decay: 0.0 };
        let mut opt = Optimizer::new(spec, vec![quadratic_param(&[1.0])]);
        loss_step(&mut opt, 0.1);
        loss_step(&mut opt, 0.1);
        let w = opt.params()[0].tensor.double_value(&[0]);
        assert!((w - 0.46).abs() < 1e-6, "{w}");
    }

    #[test]
    fn sgd_nesterov_with_weight_decay_matches_pytorch_rule() {
        // torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), loss sum(w^2):
        // step 1: d = 2 + 0.01 = 2.01, buf = 2.01, d = 2.01 + 0.9 * 2.01 = 3.819, w = 1 - 0.3819 = 0.6181;
        // step 2: d = 1.2362 + 0.006181 = 1.242381, buf = 0.9 * 2.01 + 1.242381 = 3.051381,
        //         d = 1.242381 + 0.9 * 3.051381 = 3.9886239, w = 0.6181 - 0.39886239 = 0.21923761.
        let spec = OptimizerSpec::Sgd { momentum: 0.9, nesterov: true, weight_decay: 0.01 };
        let mut opt = Optimizer::new(spec, vec![quadratic_param(&[1.0])]);
        loss_step(&mut opt, 0.1);
        assert!((opt.params()[0].tensor.double_value(&[0]) - 0.6181).abs() < 1e-6);
        loss_step(&mut opt, 0.1);
        let w = opt.params()[0].tensor.double_value(&[0]);
        assert!((w - 0.21923761).abs() < 1e-6, "{w}");
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // Adam's first bias-corrected step is lr * sign(grad) (up to eps).
        let spec = OptimizerSpec::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = Optimizer::new(spec, vec![quadratic_param(&[3.0, -2.0])]);
        loss_step(&mut opt, 0.01);
        let w = Vec::<f32>::try_from(&opt.params()[0].tensor.detach()).unwrap();
        assert!((w[0] - 2.99).abs() < 1e-5 && (w[1] + 1.99).abs() < 1e-5, "{w:?}");
    }

    #[test]
    fn frozen_parameters_are_skipped_and_state_round_trips() {
        let spec = OptimizerSpec::Sgd { momentum: 0.9, nesterov: true, weight_decay: 1e-4 };
        let frozen = Param { name: "f".into(), tensor: Tensor::from_slice(&[5.0f32]), group: 1 };
        let mut a = Optimizer::new(spec, vec![quadratic_param(&[1.0]), frozen]);
        loss_step(&mut a, 0.1);
        assert_eq!(a.params()[1].tensor.double_value(&[0]), 5.0);
        let saved: HashMap<String, Tensor> = a.state_tensors().into_iter().collect();
        assert!(saved.contains_key("w.momentum_buffer") && !saved.contains_key("f.momentum_buffer"));

        // A fresh optimizer with the restored state continues exactly like the original.
        let mut b = Optimizer::new(spec, vec![quadratic_param(&[0.0])]);
        tch::no_grad(|| b.params()[0].tensor.shallow_clone().copy_(&a.params()[0].tensor));
        b.load_state(&saved);
        loss_step(&mut a, 0.1);
        loss_step(&mut b, 0.1);
        assert_eq!(a.params()[0].tensor.double_value(&[0]), b.params()[0].tensor.double_value(&[0]));
    }
}
