//! An exponential moving average of a network's weights (`train.ema_decay`): after every step
//! each floating-point variable's average moves towards it, `avg += (1 - d) * (w - avg)`, with
//! BatchNorm's running statistics averaged like the weights (as timm's `ModelEmaV2` does).
//! Evaluations score the average; training continues from the weights themselves.
//!
//! The decay warms up as `min(d, (1 + n) / (10 + n))` after `n` updates, so the first steps are
//! not averaged with the weights the run started from for thousands of steps. Every rank applies
//! the same updates to the same weights, so the averages stay identical replicas. The averages
//! travel in a checkpoint's optimizer state as `ema.<variable>` (and `ema.updates`): a run resumes
//! with them, a re-formed group broadcasts them, and `thaw predict` scores with them.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::zoo::Network;

/// The prefix of the averages in a checkpoint's optimizer state.
pub const PREFIX: &str = "ema.";

pub struct Ema {
    decay: f64,
    updates: u64,
    /// Every variable of the network (name, the variable, its average), sorted by name.
    vars: Vec<(String, Tensor, Tensor)>,
}

impl Ema {
    /// Averages starting at `net`'s current weights.
    pub fn new(net: &Network, decay: f64) -> Ema {
        let mut vars: Vec<(String, Tensor, Tensor)> = net
            .vs
            .variables()
            .into_iter()
            .map(|(name, var)| {
                let avg = var.detach().copy();
                (name, var, avg)
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ema { decay, updates: 0, vars }
    }

    /// The decay the next update uses.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// Moves every average towards its variable (integer buffers are copied).
    pub fn update(&mut self) {
        let w = 1.0 - self.current_decay();
        tch::no_grad(|| {
            for (_, var, avg) in &mut self.vars {
                if avg.is_floating_point() {
                    let _ = avg.lerp_(&*var, w);
                } else {
                    avg.copy_(var);
                }
            }
        });
        self.updates += 1;
    }

    /// Runs `f` with the averages in the network, then puts the trained weights back.
    pub fn with_average<T>(&mut self, f: impl FnOnce() -> T) -> T {
        self.swap();
        let out = f();
        self.swap();
        out
    }

    /// Runs `f` on the weights a run scores: the average where it keeps one
    /// ([`Ema::with_average`]), else the weights as trained.
    pub fn scored<T>(ema: Option<&mut Ema>, f: impl FnOnce() -> T) -> T {
        match ema {
            Some(e) => e.with_average(f),
            None => f(),
        }
    }

    fn swap(&mut self) {
        tch::no_grad(|| {
            for (_, var, avg) in &mut self.vars {
                let held = var.copy();
                var.copy_(avg);
                avg.copy_(&held);
            }
        });
    }

    /// The averages and the update count, for a checkpoint's optimizer state.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.vars.iter().map(|(name, _, avg)| (format!("{PREFIX}{name}"), avg.shallow_clone())).collect();
        out.push((format!("{PREFIX}updates"), Tensor::from_slice(&[self.updates as f64])));
        out
    }

    /// Restores [`Ema::state_tensors`]; a variable without a saved average (a checkpoint of a run
    /// without EMA) keeps the one it has, the current weights. Returns how many were restored.
    pub fn load_state(&mut self, saved: &HashMap<String, Tensor>) -> usize {
        let mut restored = 0;
        tch::no_grad(|| {
            for (name, _, avg) in &mut self.vars {
                if let Some(t) = saved.get(&format!("{PREFIX}{name}")).filter(|t| t.size() == avg.size()) {
                    avg.copy_(t);
                    restored += 1;
                }
            }
        });
        if let Some(n) = saved.get(&format!("{PREFIX}updates")) {
            self.updates = n.to_kind(Kind::Double).double_value(&[0]) as u64;
        }
        restored
    }
}

/// Copies the averages saved in a checkpoint's optimizer state `optim` (when it has them) into
/// `net`, whose weights were restored from the checkpoint's model: what inference should score.
/// Returns how many variables were replaced.
pub fn overlay(net: &Network, optim: &HashMap<String, Tensor>) -> usize {
    let mut replaced = 0;
    tch::no_grad(|| {
        for (name, mut var) in net.vs.variables() {
            if let Some(t) = optim.get(&format!("{PREFIX}{name}")).filter(|t| t.size() == var.size()) {
                var.copy_(t);
                replaced += 1;
            }
        }
    });
    replaced
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::zoo::Arch;

    fn first_weight(net: &Network) -> (String, Tensor) {
        let mut vars: Vec<_> = net.vs.variables().into_iter().filter(|(_, t)| t.is_floating_point()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.swap_remove(0)
    }

    #[test]
    fn the_average_follows_the_weights_with_the_warmed_up_decay() {
        let net = Network::new(Arch::Lenet5, 10, Device::Cpu);
        let mut ema = Ema::new(&net, 0.99);
        let (name, mut w) = first_weight(&net);
        let start = w.detach().copy();
        // First update: decay min(0.99, 1/10) = 0.1, so the average moves 90% of the way.
        tch::no_grad(|| {
            let _ = w.g_add_scalar_(1.0);
        });
        assert!((ema.current_decay() - 0.1).abs() < 1e-12);
        ema.update();
        let avg = ema.state_tensors().into_iter().find(|(n, _)| *n == format!("{PREFIX}{name}")).unwrap().1;
        let want = &start + 0.9;
        assert!((&avg - &want).abs().max().double_value(&[]) < 1e-5, "average after one update");
        // Evaluation sees the average; training gets its weights back.
        let trained = w.detach().copy();
        ema.with_average(|| assert!((&w - &want).abs().max().double_value(&[]) < 1e-5));
        assert!((&w - &trained).abs().max().double_value(&[]) == 0.0);
        // The state round-trips, and inference can take it from a checkpoint's optimizer map.
        let saved: HashMap<String, Tensor> = ema.state_tensors().into_iter().collect();
        let other = Network::new(Arch::Lenet5, 10, Device::Cpu);
        let mut restored = Ema::new(&other, 0.99);
        assert_eq!(restored.load_state(&saved), net.vs.variables().len());
        assert!((restored.current_decay() - 2.0 / 11.0).abs() < 1e-12, "the update count is restored");
        assert_eq!(overlay(&other, &saved), net.vs.variables().len());
        let (_, w2) = first_weight(&other);
        assert!((&w2 - &want).abs().max().double_value(&[]) < 1e-5);
    }
}
