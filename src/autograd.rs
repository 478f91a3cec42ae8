//! The autograd tape: a list of backward closures, drained in reverse.
//!
//! A tensor is *tracked* when it is a leaf marked with [`Tensor::requires_grad`] or the
//! output of an op that had a tracked input while recording was on. Each such op pushes
//! one node (a fused op: LayerNorm+modulate, attention, linear...) onto the current
//! thread's tape, holding the handles its backward needs. [`backward`] drains the tape in
//! reverse order — the order of execution is a valid topological order — and returns the
//! gradients of every tracked leaf it reached.
//!
//! Inference records nothing: either no input is tracked, or the code runs inside
//! [`no_grad`]. [`checkpoint`] runs a block without recording and recomputes it (with
//! recording) during the backward pass, so only the block's inputs are kept alive.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::tensor::{Tensor, TensorId};
use crate::{bail, ops, DType, Result};

/// The backward function of one node: gradient of the output → gradients of the inputs
/// (in the order they were recorded; `None` where an input gets no gradient).
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    name: &'static str,
    output: TensorId,
    inputs: Vec<Option<TensorId>>,
    backward: BackwardFn,
}

thread_local! {
    static FRAMES: RefCell<Vec<Vec<Node>>> = RefCell::new(vec![Vec::new()]);
    static RECORDING: Cell<bool> = const { Cell::new(true) };
}

/// True when ops record themselves (outside [`no_grad`] and outside a backward pass).
pub fn is_recording() -> bool {
    RECORDING.with(|r| r.get())
}

/// Runs `f` with recording switched on or off, restoring the previous state after.
fn with_recording<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RECORDING.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(RECORDING.with(|r| r.replace(on)));
    f()
}

/// Runs `f` without recording anything on the tape (inference, evaluation).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    with_recording(false, f)
}

/// Runs `f` on a tape of its own, with recording set to `recording`, and restores the
/// thread's tape and recording state after (the nodes `f` leaves unconsumed are dropped).
///
/// A job that may run on a shared thread pool needs this: the tape is per thread, and
/// a pool thread that waits inside one job (a parallel loop, a join) may run another,
/// so without a tape of its own the second job would record onto, and be switched off
/// by, the state of the first. For the same reason `f` starts outside any
/// [`crate::forbid_host_transfers`] of the job it may run inside, and outside any
/// checkpointed block of it (a block's first pass would otherwise keep, and its recompute
/// hand out, the outputs of the other job's ops).
pub fn isolated<R>(recording: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Vec<KeepFrame>, usize, usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            FRAMES.with(|fr| fr.borrow_mut().pop());
            KEEP.with(|k| *k.borrow_mut() = std::mem::take(&mut self.0));
            CHECKPOINTED.with(|c| c.set(self.1));
            UNFUSED.with(|c| c.set(self.2));
        }
    }
    FRAMES.with(|fr| fr.borrow_mut().push(Vec::new()));
    let _restore = Restore(
        KEEP.with(|k| std::mem::take(&mut *k.borrow_mut())),
        CHECKPOINTED.with(|c| c.replace(0)),
        UNFUSED.with(|c| c.replace(0)),
    );
    crate::tensor::allow_host_transfers(|| with_recording(recording, f))
}

/// True when an op with these inputs must record itself.
pub fn needs_grad(inputs: &[&Tensor]) -> bool {
    is_recording() && inputs.iter().any(|t| t.is_tracked())
}

/// Records `out` as produced by `inputs` with the given backward, when any input is
/// tracked and recording is on; marks `out` tracked in that case. Returns `out`.
///
/// `backward` must return exactly one entry per input.
pub fn record(name: &'static str, out: Tensor, inputs: &[&Tensor], backward: BackwardFn) -> Tensor {
    if !needs_grad(inputs) {
        return out;
    }
    let out = out.requires_grad();
    let node = Node {
        name,
        output: out.id(),
        inputs: inputs.iter().map(|t| t.is_tracked().then(|| t.id())).collect(),
        backward,
    };
    FRAMES.with(|f| {
        if let Some(top) = f.borrow_mut().last_mut() {
            top.push(node);
        }
    });
    out
}

/// Number of nodes on the current tape (for tests and memory diagnostics).
pub fn tape_len() -> usize {
    FRAMES.with(|f| f.borrow().last().map_or(0, |t| t.len()))
}

/// Drops every recorded node of the current tape (e.g. after a forward pass whose
/// gradient is not wanted).
pub fn clear_tape() {
    FRAMES.with(|f| {
        if let Some(top) = f.borrow_mut().last_mut() {
            top.clear();
        }
    });
}

/// Gradients by tensor identity.
#[derive(Default, Debug)]
pub struct Gradients {
    map: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// The gradient of `t`, if it was reached.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }

    /// Removes and returns the gradient of `t`.
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.map.remove(&t.id())
    }

    /// Number of gradients held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no gradient is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Adds `g` to the gradient of `id`.
    fn accumulate(&mut self, id: TensorId, g: Tensor) -> Result<()> {
        match self.map.remove(&id) {
            None => {
                self.map.insert(id, g);
            }
            Some(prev) => {
                let sum = ops::add(&prev, &g)?;
                self.map.insert(id, sum);
            }
        }
        Ok(())
    }

    /// Adds every gradient of `other` into this set (gradient accumulation over
    /// micro-batches). Sums are kept in fp32: a gradient met a second time becomes f32
    /// (bf16 gradients of a bf16 parameter included), because adding many small bf16
    /// contributions into a bf16 sum drops the low bits of each — at fine-tuning learning
    /// rates that is the signal. AdamW takes f32 gradients for bf16 parameters.
    pub fn merge(&mut self, other: Gradients) -> Result<()> {
        for (id, g) in other.map {
            match self.map.remove(&id) {
                None => {
                    self.map.insert(id, g);
                }
                Some(prev) => {
                    let sum = ops::add(&ops::cast(&prev, DType::F32)?, &ops::cast(&g, DType::F32)?)?;
                    self.map.insert(id, sum);
                }
            }
        }
        Ok(())
    }
}

/// The watched leaves of a streaming backward pass (see [`backward_streaming`]): for each,
/// its index in the caller's list and how many nodes still to run name it as an input.
struct Watch<'a> {
    pending: HashMap<TensorId, (usize, usize)>,
    ready: &'a mut dyn FnMut(usize, Tensor) -> Result<()>,
}

impl Watch<'_> {
    /// Counts the uses of each watched leaf among `nodes`.
    fn count(&mut self, nodes: &[Node]) {
        for id in nodes.iter().flat_map(|n| n.inputs.iter().flatten()) {
            if let Some((_, uses)) = self.pending.get_mut(id) {
                *uses += 1;
            }
        }
    }

    /// After `node` has run (or was skipped): hands over every watched gradient that no
    /// later node can add to.
    fn node_done(&mut self, node_inputs: &[Option<TensorId>], grads: &mut Gradients) -> Result<()> {
        for id in node_inputs.iter().flatten() {
            let Some((index, uses)) = self.pending.get_mut(id) else { continue };
            *uses -= 1;
            if *uses == 0 {
                let index = *index;
                self.pending.remove(id);
                if let Some(g) = grads.map.remove(id) {
                    (self.ready)(index, g)?;
                }
            }
        }
        Ok(())
    }
}

fn run_reverse(nodes: Vec<Node>, seed_id: TensorId, seed: Tensor) -> Result<Gradients> {
    run_reverse_watching(nodes, seed_id, seed, None)
}

fn run_reverse_watching(
    nodes: Vec<Node>,
    seed_id: TensorId,
    seed: Tensor,
    mut watch: Option<Watch<'_>>,
) -> Result<Gradients> {
    let mut grads = Gradients::default();
    grads.map.insert(seed_id, seed);
    if let Some(w) = watch.as_mut() {
        w.count(&nodes);
    }
    for node in nodes.into_iter().rev() {
        let Some(g) = grads.map.remove(&node.output) else {
            if let Some(w) = watch.as_mut() {
                w.node_done(&node.inputs, &mut grads)?;
            }
            continue;
        };
        let input_grads = (node.backward)(&g).map_err(|e| e.context(format!("backward of {}", node.name)))?;
        if input_grads.len() != node.inputs.len() {
            bail!(
                "backward of {} returned {} gradients for {} inputs",
                node.name,
                input_grads.len(),
                node.inputs.len()
            );
        }
        for (id, gi) in node.inputs.iter().zip(input_grads) {
            if let (Some(id), Some(gi)) = (id, gi) {
                grads.accumulate(*id, gi)?;
            }
        }
        if let Some(w) = watch.as_mut() {
            w.node_done(&node.inputs, &mut grads)?;
        }
    }
    // A watched tensor no node reads but that holds a gradient (the seed itself: a loss
    // that is a watched leaf) is final too.
    if let Some(w) = watch.as_mut() {
        let mut left: Vec<(usize, TensorId)> = w.pending.iter().map(|(id, (index, _))| (*index, *id)).collect();
        left.sort();
        for (index, id) in left {
            if let Some(g) = grads.map.remove(&id) {
                (w.ready)(index, g)?;
            }
        }
    }
    Ok(grads)
}

/// Back-propagates from a one-element `loss` (seeded with 1) through the current tape:
/// the operations `loss` depends on are consumed; those of other graphs stay recorded. Returns the gradients of all tracked leaves that were reached.
pub fn backward(loss: &Tensor) -> Result<Gradients> {
    if loss.numel() != 1 {
        bail!("backward() needs a one-element loss, got shape {:?}", loss.shape());
    }
    let seed = Tensor::full(loss.shape(), 1.0, loss.dtype(), loss.device())?;
    backward_with(loss, seed)
}

/// Back-propagates from `out` seeded with `grad` (same shape) through the current tape
/// (consuming the operations `out` depends on; see [`backward`]).
pub fn backward_with(out: &Tensor, grad: Tensor) -> Result<Gradients> {
    backward_watching(out, grad, None)
}

/// [`backward`] that hands the gradient of each tensor in `watched` to `ready(index in
/// watched, gradient)` as soon as it is final — when no node left in the pass names that
/// tensor as an input — and keeps no copy of it, so that the caller can use it (an
/// optimizer update) and drop it while the pass goes on. Watched tensors the loss does
/// not reach get no call. Returns the gradients of the other tracked leaves.
///
/// Every node that reads a watched tensor has run by the time its gradient is handed
/// over, so `ready` may update that tensor in place: the rest of the pass (checkpointed
/// blocks recomputed later included) reads only tensors whose gradients are still to
/// come. Error from `ready` stops the pass.
pub fn backward_streaming(
    loss: &Tensor,
    watched: &[Tensor],
    ready: &mut dyn FnMut(usize, Tensor) -> Result<()>,
) -> Result<Gradients> {
    if loss.numel() != 1 {
        bail!("backward() needs a one-element loss, got shape {:?}", loss.shape());
    }
    let mut pending = HashMap::with_capacity(watched.len());
    for (index, t) in watched.iter().enumerate() {
        if pending.insert(t.id(), (index, 0)).is_some() {
            bail!("backward_streaming: watched tensor {index} is listed twice");
        }
    }
    let seed = Tensor::full(loss.shape(), 1.0, loss.dtype(), loss.device())?;
    backward_watching(loss, seed, Some(Watch { pending, ready }))
}

fn backward_watching(out: &Tensor, grad: Tensor, watch: Option<Watch<'_>>) -> Result<Gradients> {
    if grad.shape() != out.shape() {
        bail!("backward seed of shape {:?} for an output of shape {:?}", grad.shape(), out.shape());
    }
    if !out.is_tracked() {
        bail!("backward() on a tensor that does not depend on any tracked parameter");
    }
    let nodes = FRAMES.with(|f| f.borrow_mut().last_mut().map(std::mem::take).unwrap_or_default());
    let (reached, rest) = split_reached(nodes, out.id());
    // Nodes of other graphs (another output not yet back-propagated) stay on the tape.
    FRAMES.with(|f| {
        if let Some(frame) = f.borrow_mut().last_mut() {
            let newer = std::mem::replace(frame, rest);
            frame.extend(newer);
        }
    });
    with_recording(false, || run_reverse_watching(reached, out.id(), grad, watch))
}

/// Splits the tape into the nodes `out` depends on (consumed by its backward) and the
/// others, both in recording order.
fn split_reached(nodes: Vec<Node>, out: TensorId) -> (Vec<Node>, Vec<Node>) {
    let mut needed = std::collections::HashSet::from([out]);
    let mut keep = vec![false; nodes.len()];
    for (i, node) in nodes.iter().enumerate().rev() {
        if needed.contains(&node.output) {
            keep[i] = true;
            needed.extend(node.inputs.iter().flatten().copied());
        }
    }
    let (mut reached, mut rest) = (Vec::new(), Vec::new());
    for (node, k) in nodes.into_iter().zip(keep) {
        if k {
            reached.push(node);
        } else {
            rest.push(node);
        }
    }
    (reached, rest)
}

/// Runs `f(inputs)` without keeping its intermediate activations; during the backward
/// pass the block is run again (with recording) to get the gradients of `inputs` and of
/// `params` (every tracked tensor the block reads besides its inputs must be listed in
/// `params`, else its gradient is lost).
pub fn checkpoint<F>(inputs: &[Tensor], params: &[Tensor], f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + 'static,
{
    checkpoint_keeping(inputs, params, Keep::NOTHING, f)
}

/// Which op outputs a [`checkpoint_keeping`] block keeps from its first forward pass, so
/// that the recompute in the backward pass reuses them instead of computing them again:
/// selective checkpointing, trading memory (what is kept) against time (what is not
/// recomputed). The gradients are the same whatever is kept: a kept output is the value
/// the recompute would have produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    /// Attention outputs with their row statistics: one `[tokens, heads·head_dim]` tensor
    /// per call, the costliest op per byte kept.
    pub attention: bool,
    /// Outputs of `ops::linear` (after the bias): the projections and the MLP's
    /// hidden layer, most of a transformer block's FLOPs and most of its activations.
    pub linear: bool,
}

/// The kinds of op outputs [`Keep`] chooses between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    Attention,
    Linear,
}

impl Keep {
    /// Keep nothing: the whole block is recomputed (plain checkpointing).
    pub const NOTHING: Keep = Keep { attention: false, linear: false };

    fn wants(self, kind: Kept) -> bool {
        match kind {
            Kept::Attention => self.attention,
            Kept::Linear => self.linear,
        }
    }
}

/// What the ops of a checkpointed block do with the outputs [`Keep`] selects.
enum KeepFrame {
    /// First forward pass: store them, in call order.
    Store(Keep, Vec<Vec<Tensor>>),
    /// Recompute: take them back in the same order instead of computing.
    Replay(Keep, std::collections::VecDeque<Vec<Tensor>>),
}

thread_local! {
    static KEEP: RefCell<Vec<KeepFrame>> = const { RefCell::new(Vec::new()) };
    static REUSED: Cell<usize> = const { Cell::new(0) };
    static CHECKPOINTED: Cell<usize> = const { Cell::new(0) };
    static UNFUSED: Cell<usize> = const { Cell::new(0) };
}

/// False while a checkpointed block that keeps `linear` outputs runs (either pass), and in
/// the recompute of any block whose first pass ran where this was false. There an op whose
/// tape-recording form fuses across a linear output (`ops::mlp_gelu_tanh`'s GELU in the
/// GEMM epilogue) must run unfused: a kept output is the unfused op's, and the recompute
/// must take or reproduce exactly what the first pass computed.
pub(crate) fn linear_fusion_allowed() -> bool {
    UNFUSED.with(|c| c.get() == 0)
}

/// Runs `f` with [`linear_fusion_allowed`] false when `unfused`.
fn fusion_context<R>(unfused: bool, f: impl FnOnce() -> R) -> R {
    struct Leave(bool);
    impl Drop for Leave {
        fn drop(&mut self) {
            if self.0 {
                UNFUSED.with(|c| c.set(c.get().saturating_sub(1)));
            }
        }
    }
    if unfused {
        UNFUSED.with(|c| c.set(c.get() + 1));
    }
    let _leave = Leave(unfused);
    f()
}

/// True while a checkpointed block runs on this thread, in its first pass or in its
/// recompute: an op must then compute exactly what it would in the other pass (so, for
/// instance, no epilogue fusion that only the tape-free pass could use).
pub(crate) fn inside_checkpoint() -> bool {
    CHECKPOINTED.with(|c| c.get() > 0)
}

/// Runs `f` counted as a pass of a checkpointed block ([`inside_checkpoint`]).
fn checkpointed_pass<R>(f: impl FnOnce() -> R) -> R {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            CHECKPOINTED.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
    CHECKPOINTED.with(|c| c.set(c.get() + 1));
    let _leave = Leave;
    f()
}

/// How many op outputs checkpointed blocks have reused instead of recomputing, on this
/// thread since it started (a diagnostic: what selective checkpointing saved).
pub fn kept_outputs_reused() -> usize {
    REUSED.with(|r| r.get())
}

/// Pushes a keep frame for the duration of a closure (popped even on error) and returns
/// the frame popped with the closure's result.
fn with_keep_frame<R>(frame: KeepFrame, f: impl FnOnce() -> R) -> (R, Option<KeepFrame>) {
    struct Pop(bool);
    impl Drop for Pop {
        fn drop(&mut self) {
            if self.0 {
                KEEP.with(|k| k.borrow_mut().pop());
            }
        }
    }
    KEEP.with(|k| k.borrow_mut().push(frame));
    let mut guard = Pop(true);
    let r = f();
    guard.0 = false;
    (r, KEEP.with(|k| k.borrow_mut().pop()))
}

/// Computes an op's outputs (`shapes` gives their shapes), or, inside a checkpointed
/// block whose [`Keep`] selects `kind`, stores them on the first pass and returns the
/// stored ones on the recompute. Called by the ops [`Keep`] names, around their compute.
pub(crate) fn kept_or_compute(
    kind: Kept,
    shapes: &[&[usize]],
    compute: impl FnOnce() -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let replayed = KEEP.with(|k| match k.borrow_mut().last_mut() {
        Some(KeepFrame::Replay(keep, queue)) if keep.wants(kind) => Some(queue.pop_front()),
        _ => None,
    });
    match replayed {
        Some(Some(kept)) => {
            let same = kept.len() == shapes.len() && kept.iter().zip(shapes).all(|(t, s)| t.shape() == *s);
            if !same {
                bail!(
                    "checkpointed block: the recompute asked for a {kind:?} output of shapes {shapes:?} where the first pass kept {:?}",
                    kept.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>()
                );
            }
            REUSED.with(|r| r.set(r.get() + 1));
            Ok(kept.iter().map(Tensor::detach).collect())
        }
        Some(None) => bail!("checkpointed block: the recompute made more {kind:?} calls than the first pass"),
        None => {
            let out = compute()?;
            KEEP.with(|k| {
                if let Some(KeepFrame::Store(keep, kept)) = k.borrow_mut().last_mut() {
                    if keep.wants(kind) {
                        kept.push(out.iter().map(Tensor::detach).collect());
                    }
                }
            });
            Ok(out)
        }
    }
}

/// [`checkpoint`] that keeps the op outputs `keep` selects from the first pass and reuses
/// them in the recompute (see [`Keep`]).
pub fn checkpoint_keeping<F>(inputs: &[Tensor], params: &[Tensor], keep: Keep, f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + 'static,
{
    let all: Vec<&Tensor> = inputs.iter().chain(params.iter()).collect();
    if !needs_grad(&all) {
        return f(inputs);
    }
    // A block checkpointed inside another one's recompute takes its kept outputs from the
    // outer block's store; it keeps nothing of its own.
    let nested = KEEP.with(|k| matches!(k.borrow().last(), Some(KeepFrame::Replay(..))));
    // Both passes run in the fusion context of the first (see `linear_fusion_allowed`).
    let unfused = keep.linear || !linear_fusion_allowed();
    let (out, kept) = if nested || keep == Keep::NOTHING {
        (fusion_context(unfused, || checkpointed_pass(|| no_grad(|| f(inputs))))?, std::collections::VecDeque::new())
    } else {
        let (out, frame) = with_keep_frame(KeepFrame::Store(keep, Vec::new()), || {
            fusion_context(unfused, || checkpointed_pass(|| no_grad(|| f(inputs))))
        });
        let kept = match frame {
            Some(KeepFrame::Store(_, kept)) => kept.into(),
            _ => bail!("checkpointed block: its keep frame was lost"),
        };
        (out?, kept)
    };
    let keep = if nested { Keep::NOTHING } else { keep };
    let saved_inputs: Vec<Tensor> = inputs.to_vec();
    let saved_params: Vec<Tensor> = params.to_vec();
    Ok(record(
        "checkpoint",
        out,
        &all,
        Box::new(move |g: &Tensor| {
            // Fresh leaves with the same data stand in for the inputs.
            let leaves: Vec<Tensor> = saved_inputs
                .iter()
                .map(|t| if t.is_tracked() { t.detach().requires_grad() } else { t.detach() })
                .collect();
            FRAMES.with(|fr| fr.borrow_mut().push(Vec::new()));
            let (recomputed, frame) = with_keep_frame(KeepFrame::Replay(keep, kept), || {
                fusion_context(unfused, || checkpointed_pass(|| with_recording(true, || f(&leaves))))
            });
            let nodes = FRAMES.with(|fr| fr.borrow_mut().pop().unwrap_or_default());
            let y = recomputed?;
            if let Some(KeepFrame::Replay(_, left)) = frame {
                if !left.is_empty() {
                    bail!("checkpointed block: the recompute made {} fewer kept calls than the first pass", left.len());
                }
            }
            if y.shape() != g.shape() {
                bail!("checkpointed block changed its output shape on recompute");
            }
            let mut grads = if y.is_tracked() {
                with_recording(false, || run_reverse(nodes, y.id(), g.clone()))?
            } else {
                Gradients::default()
            };
            let mut out: Vec<Option<Tensor>> = leaves.iter().map(|l| grads.remove(l)).collect();
            out.extend(saved_params.iter().map(|p| grads.remove(p)));
            Ok(out)
        }),
    ))
}

#[cfg(test)]
mod keep_tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::{backward, checkpoint_keeping, kept_or_compute, no_grad, record, BackwardFn, Keep, Kept};
    use crate::{ops, Device, Result, Tensor};

    /// y = Σ ((x·w)·x)·w through two products that can be kept, checkpointed with `keep`;
    /// returns (y, dx, dw, products computed).
    fn run(keep: Keep) -> (Vec<f32>, Vec<f32>, Vec<f32>, usize) {
        let x = Tensor::from_vec(vec![0.5, -1.25, 2.0, 0.75], &[2, 2], Device::Cpu).unwrap().requires_grad();
        let w = Tensor::from_vec(vec![1.5, -0.5, 0.25, 2.0], &[2, 2], Device::Cpu).unwrap().requires_grad();
        let computed = Rc::new(Cell::new(0));
        let (c, wc) = (computed.clone(), w.clone());
        let y =
            checkpoint_keeping(std::slice::from_ref(&x), std::slice::from_ref(&w), keep, move |xs| -> Result<Tensor> {
                // An op as the kept ones are written: the compute is wrapped, the node recorded
                // after, around whichever output came back.
                let product = |a: &Tensor, kind: Kept| -> Result<Tensor> {
                    let out = kept_or_compute(kind, &[&[2, 2]], || {
                        c.set(c.get() + 1);
                        Ok(vec![no_grad(|| ops::mul(a, &wc))?])
                    })?
                    .remove(0);
                    let (sa, sw) = (a.clone(), wc.clone());
                    let backward: BackwardFn =
                        Box::new(move |g: &Tensor| Ok(vec![Some(ops::mul(g, &sw)?), Some(ops::mul(g, &sa)?)]));
                    Ok(record("product", out, &[a, &wc], backward))
                };
                let h = product(&xs[0], Kept::Linear)?;
                let h = ops::mul(&h, &xs[0])?;
                let h = product(&h, Kept::Attention)?;
                ops::sum_all(&h)
            })
            .unwrap();
        let g = backward(&y).unwrap();
        let (dx, dw) = (g.get(&x).unwrap().to_vec().unwrap(), g.get(&w).unwrap().to_vec().unwrap());
        (y.to_vec().unwrap(), dx, dw, computed.get())
    }

    #[test]
    fn kept_outputs_are_reused_with_the_same_gradients() {
        let plain = run(Keep::NOTHING);
        assert_eq!(plain.3, 4, "two products, each computed again in the recompute");
        for (keep, computed) in [
            (Keep { attention: false, linear: true }, 3),
            (Keep { attention: true, linear: false }, 3),
            (Keep { attention: true, linear: true }, 2),
        ] {
            let r = run(keep);
            assert_eq!(r.3, computed, "{keep:?}");
            assert_eq!((&r.0, &r.1, &r.2), (&plain.0, &plain.1, &plain.2), "{keep:?}");
        }
        // Outside a checkpoint nothing is kept or replayed.
        let n = Cell::new(0);
        for _ in 0..2 {
            kept_or_compute(Kept::Linear, &[&[1]], || {
                n.set(n.get() + 1);
                Ok(vec![Tensor::from_vec(vec![1.0], &[1], Device::Cpu)?])
            })
            .unwrap();
        }
        assert_eq!(n.get(), 2);
    }

    /// Another job run inside a checkpointed block's first pass on the same thread (a pool
    /// thread that waits may take one) through `isolated` neither keeps its outputs in the
    /// block nor sees the block: the recompute gets the block's own outputs, and the job
    /// runs outside any checkpoint.
    #[test]
    fn an_isolated_job_inside_a_block_keeps_nothing_in_it() {
        let x = Tensor::from_vec(vec![1.0, 2.0], &[2], Device::Cpu).unwrap().requires_grad();
        let pass = Rc::new(Cell::new(0));
        let p = pass.clone();
        let keep = Keep { attention: true, linear: true };
        let y = checkpoint_keeping(std::slice::from_ref(&x), &[], keep, move |xs| {
            p.set(p.get() + 1);
            if p.get() == 1 {
                super::isolated(true, || -> Result<()> {
                    assert!(!super::inside_checkpoint() && super::linear_fusion_allowed());
                    let other = Tensor::from_vec(vec![5.0; 6], &[3, 2], Device::Cpu)?;
                    kept_or_compute(Kept::Linear, &[&[3, 2]], || Ok(vec![ops::scale(&other, 2.0)?]))?;
                    Ok(())
                })?;
                assert!(super::inside_checkpoint(), "the block's state is back after the job");
            }
            let h = kept_or_compute(Kept::Linear, &[&[2]], || Ok(vec![ops::scale(&xs[0], 3.0)?]))?.remove(0);
            ops::sum_all(&h)
        })
        .unwrap();
        assert_eq!(y.item().unwrap(), 9.0);
        // The recompute takes the block's own kept output (the job's would not fit).
        backward(&y).unwrap();
        assert_eq!(pass.get(), 2);
    }

    #[test]
    fn a_recompute_that_differs_is_an_error() {
        // The block's second pass asks for another shape than its first pass kept.
        let x = Tensor::from_vec(vec![1.0, 2.0], &[2], Device::Cpu).unwrap().requires_grad();
        let pass = Rc::new(Cell::new(0));
        let p = pass.clone();
        let keep = Keep { attention: false, linear: true };
        let y = checkpoint_keeping(std::slice::from_ref(&x), &[], keep, move |xs| {
            p.set(p.get() + 1);
            let shape: &[usize] = if p.get() == 1 { &[2] } else { &[1, 2] };
            let h = kept_or_compute(Kept::Linear, &[shape], || Ok(vec![ops::reshape(&xs[0], shape)?]))?.remove(0);
            ops::sum_all(&h)
        })
        .unwrap();
        let e = backward(&y).unwrap_err().to_string();
        assert!(e.contains("checkpointed block") && e.contains("[1, 2]"), "{e}");
    }
}
