//! Epoch plans: which sample each rank trains on at each step of an epoch — a `DistributedSampler`
//! without its traps.
//!
//! An [`EpochPlan`] is five numbers (seed, epoch, number of samples, world size, batch size) and a
//! few derived constants. From them any rank computes its own batches on its own, in O(1) memory,
//! and all ranks agree without talking:
//!
//! - **Order.** The epoch's order is a pseudo-random permutation of `0..num_samples` that depends on
//!   (seed, epoch) only; position `p` of the order holds sample [`EpochPlan::sample_at`]`(p)`. The
//!   permutation is never materialized (see [`Permutation`] for the construction): element `p` costs
//!   a few hash rounds, whatever the dataset size.
//! - **Layout.** With `W` ranks and batch `B` per rank, global step `k` covers positions
//!   `[k·W·B, (k+1)·W·B)` and rank `r` takes the `B` positions `[k·W·B + r·B, k·W·B + (r+1)·B)`.
//!   Positions at or past `num_samples` are [`Slot::Pad`]: masked entries with zero loss weight.
//! - **Coverage.** Every sample is at exactly one position, hence in exactly one rank's batch at
//!   exactly one step: nothing is duplicated to even out the ranks (the trap of padding by
//!   repeating samples, which counts them twice) and nothing is dropped (the trap of `drop_last`).
//! - **Equal steps.** Every rank takes `ceil(num_samples / (W·B))` steps, so no rank waits forever
//!   in a collective for a peer that has run out of data; a rank whose share runs short gets pads.
//! - **Same global batches as one worker.** The global batch of step `k` (the concatenation of the
//!   ranks' batches in rank order) is the positions `[k·W·B, (k+1)·W·B)`, which depend on `W·B`
//!   only. So `W` workers with batch `B` see, step by step, exactly the global batches of one worker
//!   with batch `W·B` (pads included, in the same order); with the loss normalized by the global
//!   count of real samples of the step ([`EpochPlan::step_real_count`]) their summed gradients are
//!   those of the single worker.
//! - **Prefix progress.** After `k` global steps the samples done are exactly the positions
//!   `[0, k·W·B)`, whatever the rank count: a cursor is one step number (in the blocked layout
//!   below, each rank's first `k·B` slots: still one step number).
//! - **Affinity** ([`EpochPlan::with_affinity`]), for stages that cache per-sample features of a
//!   frozen prefix: each rank keeps, epoch after epoch, the samples the stage's first (anchor)
//!   epoch gave it, in a new order every epoch (a per-rank permutation of its real slots, keyed by
//!   the epoch). Coverage, equal steps and the pads' places are the anchor's; what is given up is
//!   "the same global batches as one worker", since samples no longer move between ranks. This is
//!   what makes a rank's cache hit from the second epoch on.
//!
//! - **Blocked layout** ([`EpochPlan::with_blocks`]), for packed shards, where what matters is that
//!   each rank reads long sequential runs. The order is made of *blocks* of `block` consecutive
//!   sample indices (consecutive indices are consecutive bytes in the shards), the blocks in a
//!   pseudo-random order keyed by (seed, epoch). Rank `r` takes the contiguous range
//!   `[⌊r·N/W⌋, ⌊(r+1)·N/W⌋)` of that order: block granularity wherever it can, sample granularity
//!   at the `W - 1` rank boundaries, which is what makes the shares equal to within one sample.
//!   Within its range a rank trains in windows of `window` positions (a few blocks), each window in
//!   a keyed random order: a shuffle buffer whose reads are still runs of `block` samples. Every
//!   rank takes `⌈⌈N/W⌉/B⌉` steps, pads trail in each rank's last step, and every sample is still
//!   in exactly one rank's batch at one step. What is given up is "the same global batches as one
//!   worker" (a rank's batches come from its own range); the loss is still normalized by the
//!   step's global count of real samples ([`EpochPlan::step_real_count`]).
//!
//! - **The rest of an epoch after a change of world** ([`EpochPlan::with_cut`]). When ranks are lost
//!   or added mid-epoch, the epoch goes on from a [`Cut`]: the epoch's plan as laid out for
//!   `base_world` ranks, cut after `base_steps` of its global steps, then `offset` samples of what
//!   was left. What is left is a sequence `R` of the samples not yet trained: for the interleaved
//!   layout, the order's suffix from position `base_steps·W·B` (so the same world with the same
//!   batch sees exactly the batches it would have seen); for the blocked and affinity layouts, each
//!   base rank's remaining real slots, rank after rank. The current world lays `R[offset..]` out
//!   interleaved: global step `k` is `R[offset + k·W'·B ..][..W'·B]`. A second change of world only
//!   moves `offset` on, so any history of failures is still three numbers, and every sample of the
//!   epoch is still trained exactly once. [`EpochCursor`] is where an epoch stands in these terms.
//!
//! This module never reads the clock, never touches the network or the disk, and never allocates
//! in proportion to the dataset.

use std::iter::FusedIterator;

use serde::{Deserialize, Serialize};

/// Keys the block order of a blocked plan apart from the sample order of the same seed.
const BLOCKS_KEY: u64 = 0xB10C_5EED_0F5A_4D11;

/// Feistel rounds of the permutation. Four rounds of a good round function already make a strong
/// pseudo-random permutation (Luby–Rackoff); eight leave a margin for the cheap hash used here.
const ROUNDS: usize = 8;

/// A rejected plan or an out-of-range request: names the field or value and the valid range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid epoch plan: `{field}` = {value}: {reason}")]
    Invalid { field: &'static str, value: u64, reason: &'static str },
    #[error("invalid epoch plan: {num_samples} samples padded to whole global batches of {global_batch} overflow u64")]
    TooLarge { num_samples: u64, global_batch: u64 },
    #[error("rank {rank} out of range for world_size {world_size} (ranks are 0..{world_size})")]
    RankOutOfRange { rank: u32, world_size: u32 },
    #[error("step {step} out of range: the epoch has {steps} steps per rank (0..{steps})")]
    StepOutOfRange { step: u64, steps: u64 },
    #[error("position {position} out of range: the epoch has {num_samples} samples")]
    PositionOutOfRange { position: u64, num_samples: u64 },
    #[error("sample {sample} out of range: the dataset has {num_samples} samples")]
    SampleOutOfRange { sample: u64, num_samples: u64 },
    #[error("sample {sample} was trained before the cut; the rest of the epoch does not hold it")]
    DoneBeforeCut { sample: u64 },
}

/// The rest of an epoch after its world changed: the epoch's plan for `base_world` ranks, cut
/// after `base_steps` global steps, then `offset` samples of the remainder done by later groups.
/// See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    pub base_world: u32,
    pub base_steps: u64,
    pub offset: u64,
}

/// Where an epoch stands, whatever the world did: `step` global steps done of the plan laid out for
/// `world` ranks (after `cut`, when the world changed during the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochCursor {
    pub epoch: u32,
    pub world: u32,
    pub step: u64,
    #[serde(default)]
    pub cut: Option<Cut>,
}

impl Default for EpochCursor {
    fn default() -> Self {
        EpochCursor { epoch: 0, world: 1, step: 0, cut: None }
    }
}

impl EpochCursor {
    /// The same point of the epoch for a group of `world` ranks with `batch` per rank. The same
    /// world keeps the plan and the step, so a group that comes back at its size trains exactly
    /// the batches it would have; another world continues from a [`Cut`].
    pub fn for_world(self, world: u32, batch: u32) -> EpochCursor {
        if world == self.world || (self.step == 0 && self.cut.is_none()) {
            return EpochCursor { world, ..self };
        }
        let done = self.step.saturating_mul(u64::from(self.world) * u64::from(batch));
        let cut = match self.cut {
            None => Cut { base_world: self.world, base_steps: self.step, offset: 0 },
            Some(c) => Cut { offset: c.offset.saturating_add(done), ..c },
        };
        EpochCursor { epoch: self.epoch, world, step: 0, cut: Some(cut) }
    }
}

/// A plan's cut and what it leaves (see [`EpochPlan::with_cut`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rest {
    cut: Cut,
    /// Samples of the remainder sequence `R`, before `offset`.
    total: u64,
}

/// One entry of a rank's batch: a real sample index, or a masked pad that carries zero loss weight.
///
/// A worker should not feed pads through the model at all (they would skew BatchNorm batch
/// statistics); it trains on the real samples of its batch, possibly none, and still takes part in
/// the step's collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Sample(u64),
    Pad,
}

impl Slot {
    /// The sample index, or `None` for a pad.
    pub fn sample(self) -> Option<u64> {
        match self {
            Slot::Sample(i) => Some(i),
            Slot::Pad => None,
        }
    }

    pub fn is_pad(self) -> bool {
        self == Slot::Pad
    }

    /// The loss weight of this entry: 1 for a sample, 0 for a pad.
    pub fn weight(self) -> f32 {
        match self {
            Slot::Sample(_) => 1.0,
            Slot::Pad => 0.0,
        }
    }
}

/// SplitMix64's finalizer (Stafford's mix 13): a bijective, well-avalanching 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn low_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// A keyed pseudo-random permutation of `0..n`, evaluated element by element in O(1) memory.
///
/// Construction (format-preserving encryption in the style of NIST FF1, with a hash instead of AES):
///
/// 1. **Domain.** Let `k` be the number of bits of `n - 1` (at least 2), so `2^(k-1) < n ≤ 2^k`.
///    A `k`-bit value `x` is split into a high part `a` of `u = ⌊k/2⌋` bits and a low part `b` of
///    `v = k - u` bits.
/// 2. **Unbalanced Feistel network.** Each of eight rounds computes
///    `c = (a + F(key_i, b)) mod 2^u`, then `(a, b) ← (b, c)` and swaps the widths `u` and `v`.
///    Each round is invertible (`a = (c - F(key_i, b)) mod 2^u`), so the network is a bijection of
///    `0..2^k` whatever `F` is. `F(key, b)` is SplitMix64's finalizer of `b XOR key`; the eight round
///    keys are a SplitMix64 sequence seeded from (seed, stream).
/// 3. **Cycle walking.** To map `x < n`, apply the network until the result is below `n`. The
///    result is a bijection of `0..n`: the network's cycle through `x` returns to `x < n`, so the
///    walk ends, and walks from different starting points end at different points. Since
///    `2^k < 2n`, a walk takes fewer than two network evaluations on average.
///
/// The keys depend on (seed, stream) only: the same pair always gives the same permutation, and
/// for a given seed different streams (epochs) give different keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permutation {
    n: u64,
    /// Width of the high part `a` at the first round; the low part has `bits - hi_bits`.
    hi_bits: u32,
    lo_bits: u32,
    keys: [u64; ROUNDS],
}

impl Permutation {
    /// The permutation of `0..n` keyed by (seed, stream). `n = 0` gives the empty permutation.
    pub fn new(n: u64, seed: u64, stream: u64) -> Permutation {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let hi_bits = bits / 2;
        // Injective in `stream` for a given seed: both the add and the mix are bijections.
        let mut state = mix64(mix64(seed).wrapping_add(stream));
        let mut keys = [0u64; ROUNDS];
        for key in &mut keys {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *key = mix64(state);
        }
        Permutation { n, hi_bits, lo_bits: bits - hi_bits, keys }
    }

    /// The size of the permuted range `0..n`.
    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn encrypt(&self, x: u64) -> u64 {
        let (mut u, mut v) = (self.hi_bits, self.lo_bits);
        let (mut a, mut b) = (x >> v, x & low_mask(v));
        for &key in &self.keys {
            let c = a.wrapping_add(mix64(b ^ key)) & low_mask(u);
            a = b;
            b = c;
            std::mem::swap(&mut u, &mut v);
        }
        (a << v) | b
    }

    fn decrypt(&self, y: u64) -> u64 {
        // After an even number of rounds the widths are back to (hi_bits, lo_bits).
        let (mut u, mut v) = if ROUNDS & 1 == 0 { (self.hi_bits, self.lo_bits) } else { (self.lo_bits, self.hi_bits) };
        let (mut a, mut b) = (y >> v, y & low_mask(v));
        for &key in self.keys.iter().rev() {
            // Undo one round: the previous (a, b) had widths (v, u) and was (c - F(a), a).
            std::mem::swap(&mut u, &mut v);
            let prev_a = b.wrapping_sub(mix64(a ^ key)) & low_mask(u);
            b = a;
            a = prev_a;
        }
        (a << v) | b
    }

    /// The element at index `i`; `None` if `i >= n`.
    pub fn get(&self, i: u64) -> Option<u64> {
        if i >= self.n {
            return None;
        }
        let mut x = self.encrypt(i);
        while x >= self.n {
            x = self.encrypt(x);
        }
        Some(x)
    }

    /// The index at which `value` appears (the inverse permutation); `None` if `value >= n`.
    pub fn index_of(&self, value: u64) -> Option<u64> {
        if value >= self.n {
            return None;
        }
        let mut x = self.decrypt(value);
        while x >= self.n {
            x = self.decrypt(x);
        }
        Some(x)
    }
}

/// The plan of one epoch: see the module documentation for the order, layout and guarantees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochPlan {
    seed: u64,
    epoch: u32,
    world_size: u32,
    batch_size: u32,
    steps: u64,
    perm: Permutation,
    /// The anchor epoch whose rank shares this epoch keeps (see the module documentation).
    affinity: Option<u32>,
    /// The blocked layout, if any (see the module documentation).
    blocks: Option<Blocks>,
    /// The rest of the epoch after a cut, if the world changed (see the module documentation).
    rest: Option<Rest>,
}

/// The blocked layout: runs of `block` samples in the order of `order` (a permutation of the
/// blocks), each rank a contiguous range, shuffled within windows of `window` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Blocks {
    block: u64,
    window: u64,
    order: Permutation,
}

impl EpochPlan {
    /// A validated plan: `num_samples`, `world_size` and `batch_size` must each be at least 1.
    pub fn new(seed: u64, epoch: u32, num_samples: u64, world_size: u32, batch_size: u32) -> Result<Self, PlanError> {
        if num_samples == 0 {
            return Err(PlanError::Invalid {
                field: "num_samples",
                value: 0,
                reason: "an epoch needs at least 1 sample",
            });
        }
        if world_size == 0 {
            return Err(PlanError::Invalid { field: "world_size", value: 0, reason: "must be at least 1 rank" });
        }
        if batch_size == 0 {
            return Err(PlanError::Invalid {
                field: "batch_size",
                value: 0,
                reason: "must be at least 1 sample per rank",
            });
        }
        let global_batch = u64::from(world_size) * u64::from(batch_size);
        let steps = num_samples.div_ceil(global_batch);
        if steps.checked_mul(global_batch).is_none() {
            return Err(PlanError::TooLarge { num_samples, global_batch });
        }
        Ok(EpochPlan {
            seed,
            epoch,
            world_size,
            batch_size,
            steps,
            perm: Permutation::new(num_samples, seed, epoch.into()),
            affinity: None,
            blocks: None,
            rest: None,
        })
    }

    /// This plan in the blocked layout: runs of `block` consecutive samples, each rank a contiguous
    /// range of them, shuffled within windows of `window` positions (see the module
    /// documentation). Apply before [`EpochPlan::with_affinity`].
    pub fn with_blocks(self, block: u32, window: u32) -> Result<Self, PlanError> {
        if block == 0 {
            return Err(PlanError::Invalid { field: "block", value: 0, reason: "a block holds at least 1 sample" });
        }
        if window == 0 {
            return Err(PlanError::Invalid { field: "window", value: 0, reason: "a window holds at least 1 sample" });
        }
        let n = self.num_samples();
        let w = u64::from(self.world_size);
        let per_rank = n.div_ceil(w);
        let steps = per_rank.div_ceil(u64::from(self.batch_size));
        let block = u64::from(block);
        let stream = self.affinity.unwrap_or(self.epoch);
        Ok(EpochPlan {
            steps,
            blocks: Some(Blocks {
                block,
                window: u64::from(window),
                order: Permutation::new(n.div_ceil(block), self.seed ^ BLOCKS_KEY, stream.into()),
            }),
            ..self
        })
    }

    /// The block size and window of a blocked plan.
    pub fn blocks(&self) -> Option<(u32, u32)> {
        // Both came in as u32.
        self.blocks.map(|b| (b.block as u32, b.window as u32))
    }

    /// This plan with rank affinity to `anchor` (an epoch at or before this one): every rank trains
    /// on the samples `anchor`'s plan gave it, in an order that depends on this epoch.
    pub fn with_affinity(self, anchor: u32) -> Result<Self, PlanError> {
        if anchor > self.epoch {
            return Err(PlanError::Invalid {
                field: "affinity_epoch",
                value: anchor.into(),
                reason: "must not come after the planned epoch",
            });
        }
        let blocks = self
            .blocks
            .map(|b| Blocks { order: Permutation::new(b.order.len(), self.seed ^ BLOCKS_KEY, anchor.into()), ..b });
        Ok(EpochPlan {
            perm: Permutation::new(self.num_samples(), self.seed, anchor.into()),
            affinity: Some(anchor),
            blocks,
            ..self
        })
    }

    /// First position of `rank`'s range in a blocked plan: `⌊rank·N/W⌋`.
    fn range_start(&self, rank: u32) -> u64 {
        // rank <= world_size, so the product fits u128 and the quotient fits u64.
        (u128::from(rank) * u128::from(self.num_samples()) / u128::from(self.world_size)) as u64
    }

    /// Length of `rank`'s range in a blocked plan (its real samples).
    fn range_len(&self, rank: u32) -> u64 {
        self.range_start(rank + 1) - self.range_start(rank)
    }

    /// The window size of `rank`'s range, given its length: a blocked plan's window, or the whole
    /// range after the anchor epoch of an affinity plan (the cache serves those epochs, so there is
    /// no read order to keep).
    fn window_of(&self, b: &Blocks, len: u64) -> u64 {
        if self.affinity.is_some_and(|a| a != self.epoch) {
            len.max(1)
        } else {
            b.window
        }
    }

    /// The keyed shuffle of window `w` (of `len` positions) of `rank`'s range.
    fn window_perm(&self, rank: u32, w: u64, len: u64) -> Permutation {
        let key = self.seed ^ mix64((u64::from(rank) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix64(w));
        Permutation::new(len, key, self.epoch.into())
    }

    /// A blocked plan's slot `t` of `rank`'s range (rank-relative, in training order).
    fn blocked_slot(&self, b: &Blocks, rank: u32, t: u64) -> Slot {
        let (start, len) = (self.range_start(rank), self.range_len(rank));
        if t >= len {
            return Slot::Pad;
        }
        let m = self.window_of(b, len);
        let (w, u) = (t / m, t % m);
        let wlen = m.min(len - w * m);
        let u2 = self.window_perm(rank, w, wlen).get(u).unwrap_or(u);
        Slot::Sample(self.blocked_sample(b, start + w * m + u2))
    }

    /// The sample at `position` of a blocked plan's order: blocks of `block` samples in the order
    /// of `b.order`; the last block (short when `block` does not divide N) takes its place in it.
    fn blocked_sample(&self, b: &Blocks, position: u64) -> u64 {
        let n = self.num_samples();
        let nb = b.order.len();
        let short = n - (nb - 1) * b.block;
        let cut = b.order.index_of(nb - 1).unwrap_or(0) * b.block;
        let p = if position < cut {
            position
        } else if position < cut + short {
            return (nb - 1) * b.block + (position - cut);
        } else {
            position + (b.block - short)
        };
        b.order.get(p / b.block).unwrap_or(0) * b.block + p % b.block
    }

    /// The inverse of [`EpochPlan::blocked_sample`].
    fn blocked_position(&self, b: &Blocks, sample: u64) -> u64 {
        let n = self.num_samples();
        let nb = b.order.len();
        let short = n - (nb - 1) * b.block;
        let (id, o) = (sample / b.block, sample % b.block);
        let q = b.order.index_of(id).unwrap_or(0);
        let q_short = b.order.index_of(nb - 1).unwrap_or(0);
        if q <= q_short {
            q * b.block + o
        } else {
            q * b.block + o - (b.block - short)
        }
    }

    /// The rest of this epoch after `cut`, laid out for this plan's world (see the module
    /// documentation). Apply after [`EpochPlan::with_blocks`] and [`EpochPlan::with_affinity`]: the
    /// cut is taken from the same layout for `cut.base_world` ranks. An offset past the remainder
    /// is clamped (the epoch is done: no steps).
    pub fn with_cut(self, cut: Cut) -> Result<Self, PlanError> {
        if cut.base_world == 0 {
            return Err(PlanError::Invalid { field: "cut.base_world", value: 0, reason: "must be at least 1 rank" });
        }
        let base = self.rebased(cut.base_world);
        if cut.base_steps > base.steps {
            return Err(PlanError::StepOutOfRange { step: cut.base_steps, steps: base.steps });
        }
        let total = self.num_samples() - base.samples_done_after(cut.base_steps);
        let cut = Cut { offset: cut.offset.min(total), ..cut };
        let steps = (total - cut.offset).div_ceil(self.global_batch());
        Ok(EpochPlan { steps, rest: Some(Rest { cut, total }), ..self })
    }

    /// The cut of a plan for the rest of an epoch.
    pub fn cut(&self) -> Option<Cut> {
        self.rest.map(|r| r.cut)
    }

    /// The global step of the uncut epoch (for `cut.base_world` ranks) that step `step` of this
    /// plan stands for: the unit of the learning-rate schedule, so a change of world neither
    /// restarts nor skips it.
    pub fn schedule_step(&self, step: u64) -> u64 {
        match self.rest {
            None => step,
            Some(r) => {
                let base_batch = u64::from(r.cut.base_world) * u64::from(self.batch_size);
                r.cut.base_steps + (r.cut.offset + step * self.global_batch()) / base_batch
            }
        }
    }

    /// Steps of the uncut epoch for `cut.base_world` ranks (this plan's own steps when uncut).
    pub fn schedule_steps(&self) -> u64 {
        match self.rest {
            None => self.steps,
            Some(r) => self.rebased(r.cut.base_world).steps,
        }
    }

    /// This plan's layout for `world` ranks, uncut.
    fn rebased(&self, world: u32) -> EpochPlan {
        let (n, w, b) = (self.num_samples(), u64::from(world), u64::from(self.batch_size));
        let steps = if self.blocks.is_some() { n.div_ceil(w).div_ceil(b) } else { n.div_ceil(w * b) };
        EpochPlan { world_size: world, steps, rest: None, ..*self }
    }

    /// Real samples of ranks `0..rank` over the whole epoch (an uncut plan).
    fn count_before(&self, rank: u32) -> u64 {
        if self.blocks.is_some() {
            return self.range_start(rank);
        }
        let (g, b) = (self.global_batch(), u64::from(self.batch_size));
        let (full, tail) = (self.num_samples() / g, self.num_samples() % g);
        u64::from(rank) * full * b + tail.min(u64::from(rank) * b)
    }

    /// Whether the remainder is the order's suffix (the plain interleaved layout).
    fn suffix_rest(&self) -> bool {
        self.blocks.is_none() && self.affinity.is_none()
    }

    /// Element `i` of the remainder sequence of `rest` (`i < rest.total`).
    fn rest_sample(&self, rest: &Rest, i: u64) -> u64 {
        let base = self.rebased(rest.cut.base_world);
        let k = rest.cut.base_steps;
        if self.suffix_rest() {
            return base.perm.get(k * base.global_batch() + i).unwrap_or(0);
        }
        // Rank-major: each base rank's real slots from k·B on. Every rank has at least
        // (steps - 1)·B real slots and k < steps here, so rank r has `count(r) - k·B` left.
        let kb = k * u64::from(self.batch_size);
        let before = |r: u32| base.count_before(r) - u64::from(r) * kb;
        let (mut lo, mut hi) = (0u32, base.world_size - 1);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if before(mid) <= i {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let t = kb + (i - before(lo));
        let b = u64::from(self.batch_size);
        base.rank_slot(lo, t / b, (t % b) as u32).sample().unwrap_or(0)
    }

    /// The index in the remainder sequence of `rest` of `sample`.
    fn rest_index(&self, rest: &Rest, sample: u64) -> Result<u64, PlanError> {
        let base = self.rebased(rest.cut.base_world);
        let k = rest.cut.base_steps;
        let i = if self.suffix_rest() {
            base.position_of(sample)?.checked_sub(k * base.global_batch())
        } else {
            let (r, s, j) = base.locate(sample)?;
            let b = u64::from(self.batch_size);
            (s * b + u64::from(j)).checked_sub(k * b).map(|left| base.count_before(r) - u64::from(r) * k * b + left)
        };
        i.and_then(|i| i.checked_sub(rest.cut.offset)).ok_or(PlanError::DoneBeforeCut { sample })
    }

    /// Samples of the remainder left for this plan's world (after the offset).
    fn rest_len(rest: &Rest) -> u64 {
        rest.total - rest.cut.offset
    }

    /// The anchor epoch of an affinity plan.
    pub fn affinity(&self) -> Option<u32> {
        self.affinity
    }

    /// The slot at index `j` of `rank`'s batch at `step`; callers have checked all three.
    fn rank_slot(&self, rank: u32, step: u64, j: u32) -> Slot {
        let b = u64::from(self.batch_size);
        if let Some(rest) = &self.rest {
            let i = step * self.global_batch() + u64::from(rank) * b + u64::from(j);
            return if i < Self::rest_len(rest) {
                Slot::Sample(self.rest_sample(rest, rest.cut.offset + i))
            } else {
                Slot::Pad
            };
        }
        if let Some(blocks) = &self.blocks {
            return self.blocked_slot(blocks, rank, step * b + u64::from(j));
        }
        let Some(_) = self.affinity else { return self.slot(self.batch_start(rank, step) + u64::from(j)) };
        // The rank's real slots are its first `real` (pads only ever trail); they are permuted
        // among themselves, and slot t' stands for the anchor's slot t' of the same rank.
        let t = step * b + u64::from(j);
        let real = self.rank_sample_count(rank).unwrap_or(0);
        if t >= real {
            return Slot::Pad;
        }
        let shuffle = Permutation::new(
            real,
            self.seed ^ (u64::from(rank) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            self.epoch.into(),
        );
        let t2 = shuffle.get(t).unwrap_or(t);
        self.slot(self.batch_start(rank, t2 / b) + t2 % b)
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn num_samples(&self) -> u64 {
        self.perm.len()
    }

    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// Slots per rank per step (real samples and pads).
    pub fn batch_size(&self) -> u32 {
        self.batch_size
    }

    /// Slots per global step: `world_size * batch_size`.
    pub fn global_batch(&self) -> u64 {
        u64::from(self.world_size) * u64::from(self.batch_size)
    }

    /// Steps every rank takes this epoch: `ceil(num_samples / (world_size * batch_size))`.
    pub fn steps_per_rank(&self) -> u64 {
        self.steps
    }

    /// The sample at position `position` of the epoch's order (of the anchor epoch's, in an
    /// affinity plan).
    pub fn sample_at(&self, position: u64) -> Result<u64, PlanError> {
        if let Some(b) = &self.blocks {
            if position < self.num_samples() {
                return Ok(self.blocked_sample(b, position));
            }
        }
        self.perm.get(position).ok_or(PlanError::PositionOutOfRange { position, num_samples: self.num_samples() })
    }

    /// The position of `sample` in the epoch's order (the inverse of [`EpochPlan::sample_at`]).
    pub fn position_of(&self, sample: u64) -> Result<u64, PlanError> {
        if let Some(b) = &self.blocks {
            if sample < self.num_samples() {
                return Ok(self.blocked_position(b, sample));
            }
        }
        self.perm.index_of(sample).ok_or(PlanError::SampleOutOfRange { sample, num_samples: self.num_samples() })
    }

    /// Where `sample` is trained this epoch: (rank, step, index within the rank's batch).
    pub fn locate(&self, sample: u64) -> Result<(u32, u64, u32), PlanError> {
        if let Some(rest) = &self.rest {
            let i = self.rest_index(rest, sample)?;
            let (g, b) = (self.global_batch(), u64::from(self.batch_size));
            return Ok((((i % g) / b) as u32, i / g, (i % b) as u32));
        }
        let position = self.position_of(sample)?;
        if let Some(b) = &self.blocks {
            // The rank whose range holds the position: ⌊p·W/N⌋ or the next one.
            let mut rank = (u128::from(position) * u128::from(self.world_size) / u128::from(self.num_samples())) as u32;
            while self.range_start(rank + 1) <= position {
                rank += 1;
            }
            while self.range_start(rank) > position {
                rank -= 1;
            }
            let len = self.range_len(rank);
            let m = self.window_of(b, len);
            let rel = position - self.range_start(rank);
            let (w, u) = (rel / m, rel % m);
            let wlen = m.min(len - w * m);
            let t = w * m + self.window_perm(rank, w, wlen).index_of(u).unwrap_or(u);
            let bs = u64::from(self.batch_size);
            return Ok((rank, t / bs, (t % bs) as u32));
        }
        let (step, within) = (position / self.global_batch(), position % self.global_batch());
        let b = u64::from(self.batch_size);
        // `within < world_size * batch_size`, so both quotients fit their u32 inputs' ranges.
        let (rank, j) = ((within / b) as u32, within % b);
        if self.affinity.is_none() {
            return Ok((rank, step, j as u32));
        }
        let real = self.rank_sample_count(rank)?;
        let shuffle = Permutation::new(
            real,
            self.seed ^ (u64::from(rank) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            self.epoch.into(),
        );
        let t = shuffle.index_of(step * b + j).unwrap_or(step * b + j);
        Ok((rank, t / b, (t % b) as u32))
    }

    fn check_rank(&self, rank: u32) -> Result<(), PlanError> {
        if rank >= self.world_size {
            return Err(PlanError::RankOutOfRange { rank, world_size: self.world_size });
        }
        Ok(())
    }

    fn check_step(&self, step: u64) -> Result<(), PlanError> {
        if step >= self.steps {
            return Err(PlanError::StepOutOfRange { step, steps: self.steps });
        }
        Ok(())
    }

    /// First position of `rank`'s batch at `step`; callers have checked both.
    fn batch_start(&self, rank: u32, step: u64) -> u64 {
        step * self.global_batch() + u64::from(rank) * u64::from(self.batch_size)
    }

    fn slot(&self, position: u64) -> Slot {
        match self.perm.get(position) {
            Some(sample) => Slot::Sample(sample),
            None => Slot::Pad,
        }
    }

    /// `rank`'s batch at `step`: `batch_size` slots, real samples first, then pads if the epoch ran
    /// out.
    pub fn rank_batch(&self, rank: u32, step: u64) -> Result<Vec<Slot>, PlanError> {
        self.check_rank(rank)?;
        self.check_step(step)?;
        Ok((0..self.batch_size).map(|j| self.rank_slot(rank, step, j)).collect())
    }

    /// Real samples in `rank`'s batch at `step` (the rest are pads).
    pub fn rank_real_count(&self, rank: u32, step: u64) -> Result<u32, PlanError> {
        self.check_rank(rank)?;
        self.check_step(step)?;
        if let Some(rest) = &self.rest {
            let start = step * self.global_batch() + u64::from(rank) * u64::from(self.batch_size);
            return Ok(Self::rest_len(rest).saturating_sub(start).min(u64::from(self.batch_size)) as u32);
        }
        if self.blocks.is_some() {
            let b = u64::from(self.batch_size);
            return Ok(self.range_len(rank).saturating_sub(step * b).min(b) as u32);
        }
        let start = self.batch_start(rank, step);
        // At most batch_size, so it fits u32.
        Ok(self.num_samples().saturating_sub(start).min(u64::from(self.batch_size)) as u32)
    }

    /// Real samples in the global batch of `step`, over all ranks: the divisor of a summed loss
    /// that makes `W` workers with batch `B` match one worker with batch `W·B`.
    pub fn step_real_count(&self, step: u64) -> Result<u64, PlanError> {
        self.check_step(step)?;
        if let Some(rest) = &self.rest {
            return Ok(Self::rest_len(rest).saturating_sub(step * self.global_batch()).min(self.global_batch()));
        }
        if self.blocks.is_some() {
            return (0..self.world_size).map(|r| self.rank_real_count(r, step).map(u64::from)).sum();
        }
        Ok(self.num_samples().saturating_sub(step * self.global_batch()).min(self.global_batch()))
    }

    /// Real samples done by all ranks together after `steps_done` global steps (pads excluded).
    pub fn samples_done_after(&self, steps_done: u64) -> u64 {
        if let Some(rest) = &self.rest {
            return steps_done.saturating_mul(self.global_batch()).min(Self::rest_len(rest));
        }
        if self.blocks.is_some() {
            let done = steps_done.saturating_mul(u64::from(self.batch_size));
            return (0..self.world_size).map(|r| self.range_len(r).min(done)).sum();
        }
        steps_done.saturating_mul(self.global_batch()).min(self.num_samples())
    }

    /// Real samples `rank` trains on over the whole epoch.
    pub fn rank_sample_count(&self, rank: u32) -> Result<u64, PlanError> {
        self.check_rank(rank)?;
        if self.rest.is_none() && self.blocks.is_some() {
            return Ok(self.range_len(rank));
        }
        let n = self.rest.as_ref().map_or(self.num_samples(), Self::rest_len);
        let (g, b) = (self.global_batch(), u64::from(self.batch_size));
        let full_steps = n / g;
        let tail = n % g;
        let in_tail = tail.saturating_sub(u64::from(rank) * b).min(b);
        Ok(full_steps * b + in_tail)
    }

    /// Every slot of `rank`'s epoch, step by step: `steps_per_rank() * batch_size()` items, without
    /// allocating.
    pub fn rank_slots(&self, rank: u32) -> Result<RankSlots, PlanError> {
        self.check_rank(rank)?;
        Ok(RankSlots { plan: *self, rank, step: 0, index: 0 })
    }

    /// The real samples of `rank`'s epoch in training order (pads skipped).
    pub fn rank_samples(&self, rank: u32) -> Result<impl Iterator<Item = u64>, PlanError> {
        Ok(self.rank_slots(rank)?.filter_map(Slot::sample))
    }

    /// `rank`'s batches of the whole epoch, one `Vec<Slot>` per step.
    pub fn rank_batches(&self, rank: u32) -> Result<RankBatches, PlanError> {
        self.resume(rank, 0)
    }

    /// The remaining work of `rank` when `steps_done` steps of the epoch are done (the cursor of a
    /// checkpoint): its batches from step `steps_done` on. `steps_done == steps_per_rank()` is an
    /// epoch already finished and yields nothing.
    pub fn resume(&self, rank: u32, steps_done: u64) -> Result<RankBatches, PlanError> {
        self.check_rank(rank)?;
        if steps_done > self.steps {
            return Err(PlanError::StepOutOfRange { step: steps_done, steps: self.steps });
        }
        Ok(RankBatches { plan: *self, rank, step: steps_done })
    }
}

/// Iterator over every slot of one rank's epoch; see [`EpochPlan::rank_slots`].
#[derive(Clone, Debug)]
pub struct RankSlots {
    plan: EpochPlan,
    rank: u32,
    step: u64,
    index: u32,
}

impl Iterator for RankSlots {
    type Item = Slot;

    fn next(&mut self) -> Option<Slot> {
        if self.step >= self.plan.steps {
            return None;
        }
        let slot = self.plan.rank_slot(self.rank, self.step, self.index);
        self.index += 1;
        if self.index == self.plan.batch_size {
            self.index = 0;
            self.step += 1;
        }
        Some(slot)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.plan.steps - self.step) * u64::from(self.plan.batch_size) - u64::from(self.index);
        let left = usize::try_from(left).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

impl ExactSizeIterator for RankSlots {}
impl FusedIterator for RankSlots {}

/// Iterator over one rank's batches from a given step; see [`EpochPlan::resume`].
#[derive(Clone, Debug)]
pub struct RankBatches {
    plan: EpochPlan,
    rank: u32,
    step: u64,
}

impl RankBatches {
    /// The step of the next batch this iterator yields.
    pub fn next_step(&self) -> u64 {
        self.step
    }
}

impl Iterator for RankBatches {
    type Item = Vec<Slot>;

    fn next(&mut self) -> Option<Vec<Slot>> {
        let batch = self.plan.rank_batch(self.rank, self.step).ok()?;
        self.step += 1;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.plan.steps - self.step).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

impl ExactSizeIterator for RankBatches {}
impl FusedIterator for RankBatches {}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(n: u64, w: u32, b: u32) -> EpochPlan {
        EpochPlan::new(42, 3, n, w, b).unwrap()
    }

    /// Every slot of every rank, indexed [rank][step] -> batch.
    fn all_batches(p: &EpochPlan) -> Vec<Vec<Vec<Slot>>> {
        (0..p.world_size()).map(|r| p.rank_batches(r).unwrap().collect()).collect()
    }

    fn blocked(n: u64, w: u32, b: u32, block: u32, window: u32) -> EpochPlan {
        EpochPlan::new(7, 2, n, w, b).unwrap().with_blocks(block, window).unwrap()
    }

    /// Checks coverage, equal steps, balanced shares, `locate`, the counts and the read pattern of
    /// a blocked plan.
    fn check_blocked(p: &EpochPlan) {
        let (n, w, b) = (p.num_samples(), p.world_size(), u64::from(p.batch_size()));
        let (block, _) = p.blocks().unwrap();
        let mut seen = vec![false; n as usize];
        let per_rank: Vec<u64> = (0..w).map(|r| p.rank_sample_count(r).unwrap()).collect();
        assert!(per_rank.iter().max().unwrap() - per_rank.iter().min().unwrap() <= 1, "{per_rank:?}");
        for r in 0..w {
            let batches: Vec<Vec<Slot>> = p.rank_batches(r).unwrap().collect();
            assert_eq!(batches.len() as u64, p.steps_per_rank());
            let mut mine = Vec::new();
            for (s, batch) in batches.iter().enumerate() {
                let real: Vec<u64> = batch.iter().filter_map(|x| x.sample()).collect();
                assert_eq!(real.len() as u32, p.rank_real_count(r, s as u64).unwrap());
                assert!(batch.iter().skip(real.len()).all(|x| x.is_pad()), "pads trail");
                for (j, &x) in real.iter().enumerate() {
                    assert!(!seen[x as usize], "sample {x} twice");
                    seen[x as usize] = true;
                    assert_eq!(p.locate(x).unwrap(), (r, s as u64, j as u32));
                    assert_eq!(p.sample_at(p.position_of(x).unwrap()).unwrap(), x);
                }
                mine.extend(real);
            }
            assert_eq!(mine.len() as u64, per_rank[r as usize]);
            // Sequential reads: the rank's samples, sorted, are few runs of consecutive indices:
            // at most one per block it touches plus the two split at its range's ends.
            mine.sort_unstable();
            let runs = 1 + mine.windows(2).filter(|x| x[1] != x[0] + 1).count() as u64;
            assert!(runs <= mine.len() as u64 / u64::from(block) + 2, "rank {r}: {runs} runs of {}", mine.len());
        }
        assert!(seen.iter().all(|&x| x), "every sample is covered");
        for s in 0..p.steps_per_rank() {
            let sum: u64 = (0..w).map(|r| u64::from(p.rank_real_count(r, s).unwrap())).sum();
            assert_eq!(p.step_real_count(s).unwrap(), sum);
        }
        assert_eq!(p.samples_done_after(p.steps_per_rank()), n);
        assert_eq!(p.steps_per_rank(), n.div_ceil(u64::from(w)).div_ceil(b));
    }

    #[test]
    fn blocked_plans_cover_every_sample_once_in_long_runs() {
        for (n, w, b, block, window) in [
            (1, 1, 1, 1, 1),
            (10, 3, 2, 4, 8),
            (1000, 4, 16, 64, 256),
            (1001, 3, 7, 50, 100),
            (999, 2, 32, 1000, 10),
            (4097, 5, 8, 256, 1024),
            (37, 8, 4, 3, 5),
        ] {
            check_blocked(&blocked(n, w, b, block, window));
        }
    }

    #[test]
    fn blocked_plans_are_keyed_by_seed_and_epoch_and_affinity_keeps_rank_sets() {
        let a = blocked(5000, 3, 16, 100, 400);
        assert_eq!(
            a.rank_batches(1).unwrap().collect::<Vec<_>>(),
            blocked(5000, 3, 16, 100, 400).rank_batches(1).unwrap().collect::<Vec<_>>()
        );
        let next = EpochPlan::new(7, 3, 5000, 3, 16).unwrap().with_blocks(100, 400).unwrap();
        let set = |p: &EpochPlan, r| {
            let mut v: Vec<u64> = p.rank_samples(r).unwrap().collect();
            v.sort_unstable();
            v
        };
        assert_ne!(set(&a, 1), set(&next, 1), "another epoch, other blocks");
        let sticky = next.with_affinity(2).unwrap();
        check_blocked(&sticky);
        for r in 0..3 {
            assert_eq!(set(&sticky, r), set(&a, r), "rank {r} keeps its anchor samples");
        }
        let order = |p: &EpochPlan| p.rank_samples(0).unwrap().collect::<Vec<_>>();
        assert_ne!(order(&sticky), order(&a), "in a new order");
        // The anchor epoch itself reads as a plain blocked plan does.
        assert_eq!(order(&a.with_affinity(2).unwrap()), order(&a));
        assert!(EpochPlan::new(1, 0, 10, 1, 1).unwrap().with_blocks(0, 4).is_err());
        assert!(EpochPlan::new(1, 0, 10, 1, 1).unwrap().with_blocks(4, 0).is_err());
    }

    #[test]
    fn blocked_windows_mix_blocks() {
        // A window of four blocks draws each batch from several of them.
        let p = blocked(100_000, 2, 32, 250, 1000);
        let batch: Vec<u64> = p.rank_batch(0, 0).unwrap().iter().filter_map(|x| x.sample()).collect();
        let blocks: std::collections::BTreeSet<u64> = batch.iter().map(|x| x / 250).collect();
        assert!(blocks.len() >= 3, "{blocks:?}");
    }

    #[test]
    fn permutation_is_a_bijection() {
        for n in (1..=70).chain([127, 128, 129, 1000, 1023, 1024, 1025, 4097, 65_536, 99_991, 100_000]) {
            let perm = Permutation::new(n, 9, 1);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let x = perm.get(i).unwrap();
                assert!(!seen[x as usize], "n={n}: {x} appears twice");
                seen[x as usize] = true;
                assert_eq!(perm.index_of(x), Some(i), "n={n}: inverse of {x}");
            }
            assert_eq!(perm.get(n), None);
            assert_eq!(perm.index_of(n), None);
        }
    }

    #[test]
    fn permutation_looks_random() {
        let n = 10_000u64;
        let perm = Permutation::new(n, 1, 0);
        let xs: Vec<u64> = (0..n).map(|i| perm.get(i).unwrap()).collect();
        // For a uniform random permutation E|p(i) - i| = (n² - 1) / 3n ≈ n / 3.
        let mean_disp = xs.iter().enumerate().map(|(i, &x)| x.abs_diff(i as u64)).sum::<u64>() as f64 / n as f64;
        assert!((mean_disp / (n as f64 / 3.0) - 1.0).abs() < 0.05, "mean displacement {mean_disp}");
        // Ascents of a random permutation: (n - 1) / 2 on average.
        let ascents = xs.windows(2).filter(|w| w[0] < w[1]).count() as f64;
        assert!((ascents / ((n - 1) as f64 / 2.0) - 1.0).abs() < 0.05, "ascents {ascents}");
        let fixed = xs.iter().enumerate().filter(|&(i, &x)| i as u64 == x).count();
        assert!(fixed < 10, "{fixed} fixed points");
    }

    #[test]
    fn every_sample_exactly_once_with_equal_steps() {
        let cases = [
            (1u64, 1u32, 1u32),
            (1, 4, 3),
            (10, 1, 1),
            (10, 3, 1),
            (10, 20, 2),
            (100, 7, 5),
            (101, 4, 25),
            (1000, 8, 32),
            (1000, 1, 1000),
            (1000, 1, 1001),
            (4096, 16, 16),
            (4097, 16, 16),
            (12_345, 13, 7),
        ];
        for (n, w, b) in cases {
            let p = plan(n, w, b);
            let expected_steps = n.div_ceil(u64::from(w) * u64::from(b));
            assert_eq!(p.steps_per_rank(), expected_steps, "(n, w, b) = {:?}", (n, w, b));
            let mut seen = vec![0u32; n as usize];
            let mut pads = 0u64;
            for (r, batches) in all_batches(&p).into_iter().enumerate() {
                assert_eq!(batches.len() as u64, expected_steps, "rank {r} of {:?}", (n, w, b));
                let mut real = 0;
                for (step, batch) in batches.iter().enumerate() {
                    assert_eq!(batch.len(), b as usize);
                    // Real samples first, pads after.
                    let k = batch.iter().take_while(|s| !s.is_pad()).count();
                    assert!(batch[k..].iter().all(|s| s.is_pad()));
                    assert_eq!(p.rank_real_count(r as u32, step as u64).unwrap() as usize, k);
                    real += k as u64;
                    for slot in batch {
                        match slot {
                            Slot::Sample(i) => seen[*i as usize] += 1,
                            Slot::Pad => pads += 1,
                        }
                    }
                }
                assert_eq!(p.rank_sample_count(r as u32).unwrap(), real);
                let flat: Vec<Slot> = batches.concat();
                assert_eq!(p.rank_slots(r as u32).unwrap().collect::<Vec<_>>(), flat);
                assert_eq!(p.rank_slots(r as u32).unwrap().len(), flat.len());
            }
            assert!(seen.iter().all(|&c| c == 1), "{:?}: a sample is missing or repeated", (n, w, b));
            assert_eq!(pads, expected_steps * u64::from(w) * u64::from(b) - n);
        }
    }

    #[test]
    fn more_ranks_than_samples_pads_the_extra_ranks() {
        let p = plan(3, 5, 1);
        assert_eq!(p.steps_per_rank(), 1);
        let batches = all_batches(&p);
        let real: Vec<usize> = batches.iter().map(|b| b[0].iter().filter(|s| !s.is_pad()).count()).collect();
        assert_eq!(real, vec![1, 1, 1, 0, 0]);
        assert_eq!(p.rank_samples(4).unwrap().count(), 0);
        assert_eq!(p.rank_batch(4, 0).unwrap(), vec![Slot::Pad]);
    }

    #[test]
    fn same_seed_and_epoch_same_plan_other_epoch_other_order() {
        let a: Vec<u64> = plan(5000, 4, 8).rank_samples(2).unwrap().collect();
        let b: Vec<u64> = plan(5000, 4, 8).rank_samples(2).unwrap().collect();
        assert_eq!(a, b);
        let order = |seed, epoch| -> Vec<u64> {
            let p = EpochPlan::new(seed, epoch, 5000, 1, 5000).unwrap();
            p.rank_samples(0).unwrap().collect()
        };
        let e3 = order(42, 3);
        for other in [order(42, 4), order(42, 0), order(43, 3)] {
            let same_place = e3.iter().zip(&other).filter(|(x, y)| x == y).count();
            assert!(same_place < 20, "{same_place} of 5000 samples at the same position");
        }
    }

    #[test]
    fn two_ranks_batch_b_match_one_rank_batch_2b() {
        for (n, b) in [(1u64, 1u32), (7, 1), (10, 3), (64, 8), (1001, 16), (999, 50)] {
            let two = EpochPlan::new(5, 1, n, 2, b).unwrap();
            let one = EpochPlan::new(5, 1, n, 1, 2 * b).unwrap();
            assert_eq!(two.steps_per_rank(), one.steps_per_rank());
            for step in 0..one.steps_per_rank() {
                let mut union = two.rank_batch(0, step).unwrap();
                union.extend(two.rank_batch(1, step).unwrap());
                assert_eq!(union, one.rank_batch(0, step).unwrap(), "n={n} b={b} step {step}");
                assert_eq!(two.step_real_count(step), one.step_real_count(step));
            }
        }
        // The same holds for any split of the global batch W·B.
        let four = EpochPlan::new(5, 1, 1001, 4, 6).unwrap();
        let three = EpochPlan::new(5, 1, 1001, 3, 8).unwrap();
        for step in 0..four.steps_per_rank() {
            let global = |p: &EpochPlan| -> Vec<Slot> {
                (0..p.world_size()).flat_map(|r| p.rank_batch(r, step).unwrap()).collect()
            };
            assert_eq!(global(&four), global(&three));
        }
    }

    #[test]
    fn resume_continues_where_the_epoch_stopped() {
        let p = plan(1000, 3, 16);
        let whole: Vec<Vec<Slot>> = p.rank_batches(1).unwrap().collect();
        for done in 0..=p.steps_per_rank() {
            let rest = p.resume(1, done).unwrap();
            assert_eq!(rest.next_step(), done);
            assert_eq!(rest.len() as u64, p.steps_per_rank() - done);
            assert_eq!(rest.collect::<Vec<_>>(), whole[done as usize..].to_vec());
        }
        let steps = p.steps_per_rank();
        assert_eq!(p.resume(1, steps + 1).unwrap_err(), PlanError::StepOutOfRange { step: steps + 1, steps });
    }

    #[test]
    fn counts_and_locate_agree_with_batches() {
        let p = plan(1000, 3, 16);
        let mut done = 0;
        for step in 0..p.steps_per_rank() {
            let real: u64 = (0..3).map(|r| u64::from(p.rank_real_count(r, step).unwrap())).sum();
            assert_eq!(p.step_real_count(step).unwrap(), real);
            done += real;
            assert_eq!(p.samples_done_after(step + 1), done);
        }
        assert_eq!(done, 1000);
        assert_eq!(p.samples_done_after(u64::MAX), 1000);
        for sample in [0, 1, 500, 999] {
            let (rank, step, index) = p.locate(sample).unwrap();
            assert_eq!(p.rank_batch(rank, step).unwrap()[index as usize], Slot::Sample(sample));
            assert_eq!(p.sample_at(p.position_of(sample).unwrap()).unwrap(), sample);
        }
    }

    #[test]
    fn invalid_plans_and_requests_are_named() {
        let err = |n, w, b| EpochPlan::new(1, 0, n, w, b).unwrap_err().to_string();
        assert_eq!(err(0, 1, 1), "invalid epoch plan: `num_samples` = 0: an epoch needs at least 1 sample");
        assert_eq!(err(10, 0, 1), "invalid epoch plan: `world_size` = 0: must be at least 1 rank");
        assert_eq!(err(10, 1, 0), "invalid epoch plan: `batch_size` = 0: must be at least 1 sample per rank");
        assert!(err(u64::MAX - 3, 3, 7).contains("overflow u64"));
        let p = plan(100, 4, 8);
        assert_eq!(
            p.rank_batch(4, 0).unwrap_err().to_string(),
            "rank 4 out of range for world_size 4 (ranks are 0..4)"
        );
        assert_eq!(
            p.rank_batch(0, 4).unwrap_err().to_string(),
            "step 4 out of range: the epoch has 4 steps per rank (0..4)"
        );
        assert!(p.rank_slots(9).is_err());
        assert!(p.rank_samples(9).is_err());
        assert_eq!(p.sample_at(100).unwrap_err().to_string(), "position 100 out of range: the epoch has 100 samples");
        assert_eq!(p.position_of(100).unwrap_err().to_string(), "sample 100 out of range: the dataset has 100 samples");
    }

    #[test]
    fn huge_datasets_need_no_memory() {
        // Two billion samples: nothing proportional to the dataset is ever allocated.
        let p = EpochPlan::new(7, 2, 2_000_000_000, 1024, 32).unwrap();
        assert_eq!(p.steps_per_rank(), 2_000_000_000u64.div_ceil(32_768));
        let last = p.steps_per_rank() - 1;
        let batch = p.rank_batch(1023, last).unwrap();
        assert_eq!(batch.len(), 32);
        for slot in p.rank_batch(0, 12_345).unwrap() {
            let sample = slot.sample().unwrap();
            assert!(sample < 2_000_000_000);
            assert_eq!(p.locate(sample).unwrap().1, 12_345);
        }
        // Blocked, at ImageNet scale and beyond: still O(1).
        let p = p.with_blocks(256, 1024).unwrap();
        for slot in p.rank_batch(17, 999).unwrap() {
            let sample = slot.sample().unwrap();
            assert_eq!(p.locate(sample).unwrap(), (17, 999, p.locate(sample).unwrap().2));
        }
        // A few dozen words whatever the dataset: layout, blocks and a cut.
        assert!(std::mem::size_of::<EpochPlan>() <= 320, "{}", std::mem::size_of::<EpochPlan>());
    }

    #[test]
    fn affinity_keeps_each_ranks_samples_and_reshuffles_them() {
        // 1003 samples, 3 ranks of batch 16: 21 steps, the last one partly pads.
        let (n, world, batch) = (1003u64, 3u32, 16u32);
        let anchor = EpochPlan::new(7, 2, n, world, batch).unwrap();
        let share = |p: &EpochPlan, r: u32| {
            let mut v: Vec<u64> = p.rank_samples(r).unwrap().collect();
            v.sort_unstable();
            v
        };
        for epoch in [2u32, 3, 9] {
            let p = EpochPlan::new(7, epoch, n, world, batch).unwrap().with_affinity(2).unwrap();
            let mut all = Vec::new();
            for r in 0..world {
                // The same samples as the anchor gave the rank, every epoch.
                assert_eq!(share(&p, r), share(&anchor, r), "epoch {epoch} rank {r}");
                for step in 0..p.steps_per_rank() {
                    let b = p.rank_batch(r, step).unwrap();
                    // Pads stay where the anchor has them, so the step counts agree.
                    assert_eq!(
                        b.iter().filter(|s| !s.is_pad()).count() as u32,
                        anchor.rank_real_count(r, step).unwrap()
                    );
                    for (j, s) in b.iter().enumerate() {
                        if let Some(x) = s.sample() {
                            assert_eq!(p.locate(x).unwrap(), (r, step, j as u32));
                            all.push(x);
                        }
                    }
                }
            }
            all.sort_unstable();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "every sample exactly once in epoch {epoch}");
        }
        // A later epoch trains the rank's samples in another order.
        let a = EpochPlan::new(7, 3, n, world, batch).unwrap().with_affinity(2).unwrap();
        let b = EpochPlan::new(7, 4, n, world, batch).unwrap().with_affinity(2).unwrap();
        assert_ne!(a.rank_batch(0, 0).unwrap(), b.rank_batch(0, 0).unwrap());
        assert!(EpochPlan::new(7, 1, n, world, batch).unwrap().with_affinity(2).is_err());
    }

    /// The four layouts of a plan of `n` samples for `w` ranks.
    fn layouts(n: u64, w: u32, b: u32) -> Vec<(&'static str, EpochPlan)> {
        let base = EpochPlan::new(5, 2, n, w, b).unwrap();
        vec![
            ("interleaved", base),
            ("blocked", base.with_blocks(4, 6).unwrap()),
            ("affinity", base.with_affinity(1).unwrap()),
            ("blocked affinity", base.with_blocks(3, 5).unwrap().with_affinity(1).unwrap()),
        ]
    }

    /// The samples of the first `steps` global steps of `p`, every rank, with each slot's place.
    fn trained(p: &EpochPlan, from: u64, to: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for s in from..to.min(p.steps_per_rank()) {
            for r in 0..p.world_size() {
                let batch = p.rank_batch(r, s).unwrap();
                assert_eq!(batch.iter().filter(|x| !x.is_pad()).count() as u32, p.rank_real_count(r, s).unwrap());
                for (j, slot) in batch.iter().enumerate() {
                    if let Slot::Sample(x) = slot {
                        assert_eq!(p.locate(*x).unwrap(), (r, s, j as u32), "locate inverts the plan");
                        out.push(*x);
                    }
                }
            }
            let real: u64 = (0..p.world_size()).map(|r| u64::from(p.rank_real_count(r, s).unwrap())).sum();
            assert_eq!(p.step_real_count(s).unwrap(), real);
        }
        out
    }

    #[test]
    fn every_sample_once_across_any_history_of_world_changes() {
        for n in [1u64, 7, 40, 53] {
            for (w0, w1, w2) in [(2u32, 1u32, 3u32), (3, 2, 2), (1, 4, 1), (4, 3, 5)] {
                for (name, p0) in layouts(n, w0, 4) {
                    // The plan a group at cursor `c` trains from.
                    let plan_at = |c: EpochCursor| {
                        let p = p0.rebased(c.world);
                        c.cut.map_or(p, |cut| p.with_cut(cut).unwrap())
                    };
                    for k0 in 0..=p0.steps_per_rank() {
                        let mut seen = trained(&p0, 0, k0);
                        let c0 = EpochCursor { epoch: 2, world: w0, step: k0, cut: None };
                        let c1 = c0.for_world(w1, 4);
                        let p1 = plan_at(c1);
                        let k1 = c1.step + (p1.steps_per_rank() - c1.step) / 2;
                        seen.extend(trained(&p1, c1.step, k1));
                        let c2 = EpochCursor { step: k1, ..c1 }.for_world(w2, 4);
                        let p2 = plan_at(c2);
                        seen.extend(trained(&p2, c2.step, u64::MAX));
                        seen.sort_unstable();
                        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "{name}: n {n}, worlds {w0} {w1} {w2}, k0 {k0}");
                        // Samples done before the last cut are not in its plan.
                        if k0 > 0 && c2.cut.is_some() {
                            let first = trained(&p0, 0, 1)[0];
                            assert_eq!(p2.locate(first), Err(PlanError::DoneBeforeCut { sample: first }));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_same_world_after_a_cut_trains_the_batches_it_would_have() {
        let p = plan(103, 3, 5);
        for k in 0..=p.steps_per_rank() {
            let cut = Cut { base_world: 3, base_steps: k, offset: 0 };
            let q = p.with_cut(cut).unwrap();
            assert_eq!(q.steps_per_rank(), p.steps_per_rank() - k);
            for s in 0..q.steps_per_rank() {
                assert_eq!(q.schedule_step(s), k + s);
                assert_eq!(q.step_real_count(s), p.step_real_count(k + s));
                for r in 0..3 {
                    assert_eq!(q.rank_batch(r, s), p.rank_batch(r, k + s));
                }
            }
            assert_eq!(q.schedule_steps(), p.steps_per_rank());
        }
        // And a cursor that stays at its world keeps its plan and step.
        let c = EpochCursor { epoch: 1, world: 3, step: 4, cut: None };
        assert_eq!(c.for_world(3, 5), c);
        assert_eq!(
            c.for_world(2, 5),
            EpochCursor { epoch: 1, world: 2, step: 0, cut: Some(Cut { base_world: 3, base_steps: 4, offset: 0 }) }
        );
        let again = EpochCursor { step: 2, ..c.for_world(2, 5) }.for_world(4, 5);
        assert_eq!(again.cut, Some(Cut { base_world: 3, base_steps: 4, offset: 20 }));
        // An offset past the remainder is an epoch with nothing left.
        let done = p.with_cut(Cut { base_world: 2, base_steps: 3, offset: 1_000 }).unwrap();
        assert_eq!(done.steps_per_rank(), 0);
        assert!(p.with_cut(Cut { base_world: 0, base_steps: 0, offset: 0 }).is_err());
        assert!(p.with_cut(Cut { base_world: 1, base_steps: 10_000, offset: 0 }).is_err());
    }
}
