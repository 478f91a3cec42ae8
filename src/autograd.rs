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
/// by, the state of the first.
pub fn isolated<R>(recording: bool, f: impl FnOnce() -> R) -> R {
    struct PopFrame;
    impl Drop for PopFrame {
        fn drop(&mut self) {
            FRAMES.with(|fr| fr.borrow_mut().pop());
        }
    }
    FRAMES.with(|fr| fr.borrow_mut().push(Vec::new()));
    let _pop = PopFrame;
    with_recording(recording, f)
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

fn run_reverse(nodes: Vec<Node>, seed_id: TensorId, seed: Tensor) -> Result<Gradients> {
    let mut grads = Gradients::default();
    grads.map.insert(seed_id, seed);
    for node in nodes.into_iter().rev() {
        let Some(g) = grads.map.remove(&node.output) else {
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
    with_recording(false, || run_reverse(reached, out.id(), grad))
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
    let all: Vec<&Tensor> = inputs.iter().chain(params.iter()).collect();
    if !needs_grad(&all) {
        return f(inputs);
    }
    let out = no_grad(|| f(inputs))?;
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
            let recomputed = with_recording(true, || f(&leaves));
            let nodes = FRAMES.with(|fr| fr.borrow_mut().pop().unwrap_or_default());
            let y = recomputed?;
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
