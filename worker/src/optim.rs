//! Optimizers over named parameters with per-group learning rates: SGD with momentum and AdamW,
//! with PyTorch's update rules.
//!
//! Written here rather than using tch's `nn::Optimizer` because a checkpoint must hold the
//! optimizer state (momentum and moment buffers) so a run resumes exactly, and tch's C++ optimizers
//! do not expose it. Parameters whose gradient is undefined (frozen groups) are skipped, as in
//! PyTorch, and their state is left as it was.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};
use thaw_coordinator::spec::OptimizerSpec;

/// libtorch's fused SGD kernel (`torch.optim.SGD(fused=True)` on CPUs): one vectorized pass per
/// parameter that reads the weight, gradient and momentum buffer and writes the weight and the
/// buffer, instead of the four or five passes of the per-parameter loop. tch does not wrap it, so
/// it is called by its symbol (as `amp.rs` calls autocast's), on CPU `f32` parameters only.
///
/// The kernel walks each tensor's memory flat, so the weight, its gradient and its buffer must be
/// laid out alike; it is handed flat views (`as_strided` over the dense memory) of all three,
/// which also keeps it from copying channels-last gradients to contiguous ones. Everything it
/// checks (list lengths, the buffers' presence) is checked here first, so it cannot throw.
mod fused {
    use std::ffi::c_void;

    use tch::Tensor;

    /// `c10::ArrayRef<at::Tensor>`: a pointer and a length, passed by value.
    #[repr(C)]
    struct TensorList {
        data: *const *mut c_void,
        len: usize,
    }

    /// A disengaged `std::optional<at::Tensor>` (the tensor's pointer, then the flag).
    #[repr(C)]
    struct NoTensor {
        value: *mut c_void,
        engaged: bool,
    }

    extern "C-unwind" {
        /// `at::cpu::_fused_sgd_(params, grads, momentum_buffer_list, weight_decay, momentum, lr,
        /// dampening, nesterov, maximize, is_first_step, grad_scale, found_inf)`.
        #[link_name = "_ZN2at3cpu11_fused_sgd_EN3c108ArrayRefINS_6TensorEEES4_S4_ddddbbbRKSt8optionalIS3_ES8_"]
        fn at_cpu_fused_sgd_(
            params: TensorList,
            grads: TensorList,
            bufs: TensorList,
            weight_decay: f64,
            momentum: f64,
            lr: f64,
            dampening: f64,
            nesterov: bool,
            maximize: bool,
            is_first_step: bool,
            grad_scale: *const NoTensor,
            found_inf: *const NoTensor,
        );
    }

    /// The `at::Tensor` behind a tch tensor: tch holds a pointer to a heap `at::Tensor`, whose
    /// one field is the `TensorImpl` pointer. Copied without touching the reference count, so
    /// the array only borrows the tensors.
    fn raw(t: &Tensor) -> *mut c_void {
        // SAFETY: `as_ptr` points to a live `at::Tensor` (an intrusive pointer, one word).
        unsafe { *(t.as_ptr() as *const *mut c_void) }
    }

    /// One fused step over `params` (with `grads` and, when `momentum` is not 0, `bufs`, one per
    /// parameter, laid out alike). `first`: the buffers are set to the gradients (PyTorch's
    /// first step) instead of being decayed into.
    #[allow(clippy::too_many_arguments)]
    pub fn sgd(
        params: &[Tensor],
        grads: &[Tensor],
        bufs: &[Tensor],
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        nesterov: bool,
        first: bool,
    ) {
        assert_eq!(params.len(), grads.len());
        assert_eq!(bufs.len(), if momentum == 0.0 { 0 } else { params.len() });
        let list = |ts: &[Tensor]| ts.iter().map(raw).collect::<Vec<_>>();
        let (p, g, b) = (list(params), list(grads), list(bufs));
        let arr = |v: &Vec<*mut c_void>| TensorList { data: v.as_ptr(), len: v.len() };
        let none = NoTensor { value: std::ptr::null_mut(), engaged: false };
        // SAFETY: the lists borrow tensors that outlive the call; the kernel's checks (lengths,
        // buffers present iff momentum) hold by the asserts above, so it does not throw.
        unsafe {
            at_cpu_fused_sgd_(
                arr(&p),
                arr(&g),
                arr(&b),
                weight_decay,
                momentum,
                lr,
                0.0,
                nesterov,
                false,
                first,
                &none,
                &none,
            )
        }
    }
}

/// `t`'s memory as one flat view, when it is dense (every element once, no gaps) in any
/// layout, channels-last included; `None` otherwise.
fn flat_view(t: &Tensor) -> Option<Tensor> {
    let (sizes, strides) = (t.size(), t.stride());
    let mut dims: Vec<(i64, i64)> =
        sizes.iter().copied().zip(strides.iter().copied()).filter(|(n, _)| *n != 1).collect();
    dims.sort_by_key(|&(_, st)| st);
    let mut expect = 1;
    for (n, st) in dims {
        if st != expect {
            return None;
        }
        expect *= n;
    }
    Some(t.as_strided([t.numel() as i64], [1], Some(t.storage_offset())))
}

/// Whether weight `w` and gradient `g` can go through the fused kernel together.
fn fusable(w: &Tensor, g: &Tensor) -> bool {
    w.device() == Device::Cpu
        && w.kind() == Kind::Float
        && g.kind() == Kind::Float
        && g.device() == Device::Cpu
        && w.size() == g.size()
        && w.stride() == g.stride()
        && !w.is_sparse()
        && flat_view(w).is_some()
}

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
    /// SGD through libtorch's fused kernel (on by default; `THAW_FUSED_SGD=0` keeps the loop).
    fused: bool,
    /// Flat views of each parameter and its momentum buffer, for the fused kernel.
    flat: Vec<Option<(Tensor, Option<Tensor>)>>,
    /// Parameters the fused kernel updated in the last step.
    fused_last: usize,
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec, params: Vec<Param>) -> Self {
        let fused = std::env::var("THAW_FUSED_SGD").map_or(true, |v| v != "0");
        Optimizer { spec, params, state: HashMap::new(), steps: HashMap::new(), fused, flat: Vec::new(), fused_last: 0 }
    }

    /// How many parameters the fused kernel updated in the last step (the others took the loop).
    pub fn fused_last_step(&self) -> usize {
        self.fused_last
    }

    /// Chooses the fused SGD kernel (default) or the per-parameter loop; the two agree to
    /// rounding (tests), so this is for measuring.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
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
        self.flat.clear();
    }

    /// Clears the gradients of every parameter.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// One update; `lr(group)` gives the learning rate of a layer group.
    ///
    /// SGD goes through libtorch's fused kernel where it can (CPU `f32` parameters, see
    /// [`fused`]): the parameters of each learning rate in one call, one pass over each.
    /// Elsewhere it works in place, as torch's foreach implementation does: the weight decay and
    /// the Nesterov term are added into the gradient (which the next step clears anyway) and the
    /// update is one `addcmul_` with a scalar tensor, so a step allocates nothing the size of a
    /// parameter (the first step's momentum buffers aside).
    pub fn step(&mut self, lr: &dyn Fn(usize) -> f64) {
        tch::no_grad(|| {
            let mut rest = Vec::new();
            self.fused_last = 0;
            match self.spec {
                OptimizerSpec::Sgd { momentum, nesterov, weight_decay } if self.fused => {
                    rest = self.fused_sgd_step(lr, momentum, nesterov, weight_decay);
                }
                _ => rest.extend(0..self.params.len()),
            }
            for i in rest {
                self.step_one(i, lr);
            }
        });
    }

    /// The fused SGD step of every parameter it can take; returns the others.
    fn fused_sgd_step(
        &mut self,
        lr: &dyn Fn(usize) -> f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> Vec<usize> {
        if self.flat.len() != self.params.len() {
            self.flat = self.params.iter().map(|_| None).collect();
        }
        let mut rest = Vec::new();
        // (lr, first step) -> (weights, gradients, buffers), flat views.
        let mut calls: Vec<(f64, bool, Vec<Tensor>, Vec<Tensor>, Vec<Tensor>)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            if !fusable(&p.tensor, &grad) {
                rest.push(i);
                continue;
            }
            let Some(g) = flat_view(&grad) else {
                rest.push(i);
                continue;
            };
            match self.steps.get_mut(&p.name) {
                Some(c) => *c += 1,
                None => {
                    self.steps.insert(p.name.clone(), 1);
                }
            }
            let first = momentum != 0.0 && !self.state.contains_key(&p.name);
            if first {
                // Laid out like the gradient (and so like the weight); the kernel fills it.
                self.state.insert(p.name.clone(), vec![grad.empty_like()]);
                self.flat[i] = None;
            }
            let (w, b) = &*self.flat[i].get_or_insert_with(|| {
                let w = flat_view(&p.tensor).expect("fusable weights are dense");
                let b = self
                    .state
                    .get(&p.name)
                    .and_then(|s| s.first())
                    .filter(|b| b.size() == p.tensor.size() && b.stride() == p.tensor.stride())
                    .and_then(flat_view);
                (w, b)
            });
            let (w, b) = (w.shallow_clone(), b.as_ref().map(Tensor::shallow_clone));
            let lr = lr(p.group);
            let at = match calls.iter().position(|c| c.0 == lr && c.1 == first) {
                Some(at) => at,
                None => {
                    calls.push((lr, first, Vec::new(), Vec::new(), Vec::new()));
                    calls.len() - 1
                }
            };
            let call = &mut calls[at];
            call.2.push(w);
            call.3.push(g);
            if momentum != 0.0 {
                match b {
                    Some(b) => call.4.push(b),
                    None => {
                        // A restored buffer laid out unlike the weight: this one takes the loop.
                        call.2.pop();
                        call.3.pop();
                        rest.push(i);
                    }
                }
            }
        }
        for (lr, first, w, g, b) in calls {
            if !w.is_empty() {
                self.fused_last += w.len();
                fused::sgd(&w, &g, &b, weight_decay, momentum, lr, nesterov, first);
            }
        }
        rest
    }

    /// The update of parameter `i` alone (every optimizer; SGD where the fused kernel cannot go).
    fn step_one(&mut self, i: usize, lr: &dyn Fn(usize) -> f64) {
        let p = &self.params[i];
        let mut grad = p.tensor.grad();
        if !grad.defined() {
            return;
        }
        let lr = lr(p.group);
        let mut w = p.tensor.shallow_clone();
        let count = match self.steps.get_mut(&p.name) {
            Some(c) => c,
            None => self.steps.entry(p.name.clone()).or_insert(0),
        };
        *count += 1;
        let count = *count;
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
                let t = count as i32;
                let bc1 = 1.0 - beta1.powi(t);
                let bc2 = 1.0 - beta2.powi(t);
                let denom = (&state[1] / bc2).sqrt() + eps;
                let _ = w.g_sub_(&((&state[0] / &denom) * (lr / bc1)));
            }
        }
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
                .map(|n| {
                    // Laid out like the parameter (checkpoints store contiguous tensors), as the
                    // fused kernel needs.
                    saved.get(&format!("{}.{n}", p.name)).filter(|t| t.size() == p.tensor.size()).map(|t| {
                        let mut b = p.tensor.detach().empty_like();
                        tch::no_grad(|| b.copy_(t));
                        b
                    })
                })
                .collect();
            if let Some(bufs) = bufs {
                self.state.insert(p.name.clone(), bufs);
            }
            if let Some(s) = saved.get(&format!("{}.step", p.name)) {
                self.steps.insert(p.name.clone(), s.int64_value(&[0]));
            }
        }
        self.flat.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Parameters like a network's: a channels-last convolution weight, a matrix, a bias, in two
    /// groups; the same values for every `seed`.
    fn net_like(seed: i64) -> Vec<Param> {
        tch::manual_seed(seed);
        let conv = crate::zoo::to_channels_last(&Tensor::randn([8, 4, 3, 3], (Kind::Float, Device::Cpu)));
        let fc = Tensor::randn([10, 5], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([10], (Kind::Float, Device::Cpu));
        [("conv", conv, 0), ("fc", fc, 1), ("bias", bias, 1)]
            .into_iter()
            .map(|(n, t, group)| Param { name: n.into(), tensor: t.set_requires_grad(true), group })
            .collect()
    }

    /// A loss whose gradient depends on the weights (so momentum and decay matter).
    fn net_loss(opt: &mut Optimizer, lrs: [f64; 2]) {
        opt.zero_grad();
        let loss = opt.params().iter().fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |acc, p| {
            acc + (&p.tensor * &p.tensor).sum(Kind::Float) + p.tensor.sin().sum(Kind::Float)
        });
        loss.backward();
        opt.step(&|g| lrs[g]);
    }

    #[test]
    fn fused_sgd_matches_the_loop_in_every_layout() {
        let specs = [(0.9, true, 1e-2), (0.9, false, 0.0), (0.0, false, 1e-3)];
        for (momentum, nesterov, weight_decay) in specs {
            let spec = OptimizerSpec::Sgd { momentum, nesterov, weight_decay };
            let mut fused = Optimizer::new(spec, net_like(7));
            fused.set_fused(true);
            let mut looped = Optimizer::new(spec, net_like(7));
            looped.set_fused(false);
            for _ in 0..4 {
                net_loss(&mut fused, [0.1, 0.03]);
                net_loss(&mut looped, [0.1, 0.03]);
                assert_eq!((fused.fused_last_step(), looped.fused_last_step()), (3, 0));
            }
            assert!(fused.params()[0].tensor.stride() != fused.params()[0].tensor.contiguous().stride());
            for (a, b) in fused.params().iter().zip(looped.params()) {
                let diff = (&a.tensor - &b.tensor).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{spec:?} {}: fused and loop differ by {diff}", a.name);
            }
            let (sa, sb): (HashMap<_, _>, HashMap<_, _>) =
                (fused.state_tensors().into_iter().collect(), looped.state_tensors().into_iter().collect());
            assert_eq!(sa.len(), sb.len());
            for (k, v) in &sa {
                let diff = (v.to_kind(Kind::Double) - sb[k].to_kind(Kind::Double)).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{spec:?} state {k} differs by {diff}");
            }
            // A fused run resumed from the loop's state continues like the loop.
            let mut resumed = Optimizer::new(spec, net_like(0));
            for (p, q) in resumed.params().iter().zip(looped.params()) {
                tch::no_grad(|| p.tensor.shallow_clone().copy_(&q.tensor));
            }
            resumed.load_state(&sb);
            net_loss(&mut resumed, [0.1, 0.03]);
            assert_eq!(resumed.fused_last_step(), 3, "restored buffers are laid out like the weights");
            net_loss(&mut looped, [0.1, 0.03]);
            for (a, b) in resumed.params().iter().zip(looped.params()) {
                let diff = (&a.tensor - &b.tensor).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{spec:?} {} after resuming: {diff}", a.name);
            }
        }
    }
}
