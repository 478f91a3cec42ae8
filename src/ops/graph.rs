//! Functions of tensors that run as CUDA graphs: the sampler's DiT forward issues about
//! a thousand launches per step, and a small model's training step is nothing but
//! launches, so replaying them with one call removes the host's share of the time.

use crate::cuda::graph::Recorded;
use crate::tensor::Storage;
use crate::{autograd, bail, cuda, DType, Device, Result, Tensor};

/// Runs a function of tensors, given anew at each call, as recorded CUDA graphs on a GPU
/// with `SYNTHOS_CUDA_GRAPHS=1`: each layout of inputs (their shapes and element types)
/// runs plainly the first time it is seen, is recorded the second time, and is replayed
/// with one launch from then on. Elsewhere (the CPU, graphs off) every call runs the
/// function.
///
/// The caller's side of the bargain:
/// - the function given for one runner is the same at every call: for inputs of one
///   layout it issues the same launches, reads no device value on the host, uploads
///   nothing, and keeps nothing it makes beyond the call;
/// - whatever the function reads besides its inputs (weights, a cached context) stays in
///   place while the runner lives: a replay reads the buffers that were read when it was
///   recorded (in-place updates, such as the optimizer's, are seen; a tensor replaced by
///   a new one is not);
/// - results of a replay are the runner's own buffers, overwritten by the next call:
///   use them before calling again, or copy them.
///
/// A replay gives the same results as running the function, bit for bit, for functions
/// whose kernels are deterministic.
///
/// ```
/// use synthos_engine::{ops, Device, Tensor};
/// let w = Tensor::from_vec(vec![2.0, 3.0], &[2], Device::Cpu)?;
/// let mut scaled = ops::GraphRunner::new("scale", 1);
/// let x = Tensor::from_vec(vec![1.0, 1.0], &[2], Device::Cpu)?;
/// for _ in 0..3 {
///     let y = scaled.call(&[&x], |xs| Ok(vec![ops::mul(&xs[0], &w)?]))?;
///     assert_eq!(y[0].to_vec()?, vec![2.0, 3.0]);
/// }
/// # Ok::<(), synthos_engine::Error>(())
/// ```
pub struct GraphRunner {
    what: &'static str,
    max_layouts: usize,
    backward_inside: bool,
    layouts: Vec<Layout>,
    /// The buffers recorded graphs write their results to: one set per layout of the
    /// results, shared by the input layouts that give it.
    outputs: Vec<Vec<Tensor>>,
}

/// The shapes and element types of a call's inputs.
type Signature = Vec<(Vec<usize>, DType)>;

struct Layout {
    signature: Signature,
    /// Which set of [`GraphRunner::outputs`] its graph writes.
    outputs: usize,
    /// `None` until the layout's second call records it: then the graph, and the buffers
    /// it reads its inputs from.
    recorded: Option<(Recorded, Vec<Tensor>)>,
}

impl GraphRunner {
    /// A runner for a function without a backward (inference: run under
    /// [`autograd::no_grad`]; while the tape records, calls run plainly, since a replay's
    /// results carry no backward). `what` names it in errors; at most `max_layouts` input
    /// layouts are recorded (each keeps its graph's working memory), others run plainly.
    pub fn new(what: &'static str, max_layouts: usize) -> Self {
        GraphRunner { what, max_layouts, backward_inside: false, layouts: Vec::new(), outputs: Vec::new() }
    }

    /// A runner for a function that runs its own backward pass (a training step: the loss,
    /// its backward, and the gradients among the results), recorded whether or not the
    /// tape records outside it.
    pub fn with_backward_inside(what: &'static str, max_layouts: usize) -> Self {
        GraphRunner { backward_inside: true, ..GraphRunner::new(what, max_layouts) }
    }

    /// Number of input layouts recorded so far.
    pub fn recorded_layouts(&self) -> usize {
        self.layouts.iter().filter(|l| l.recorded.is_some()).count()
    }

    /// `f(inputs)`: run plainly, recorded, or replayed with the new input values (see the
    /// type's documentation for what `f` must keep to).
    pub fn call(
        &mut self,
        inputs: &[&Tensor],
        f: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        if inputs.is_empty() {
            bail!("{}: called without inputs", self.what);
        }
        let device = super::same_device(self.what, inputs)?;
        let plain = |f: &mut dyn FnMut(&[Tensor]) -> Result<Vec<Tensor>>| {
            let owned: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
            f(&owned)
        };
        let mut f = Some(f);
        let mut run_plain = |inputs: &[Tensor]| match f.take() {
            Some(f) => f(inputs),
            None => bail!("graph runner: function called twice"),
        };
        let Device::Cuda(ordinal) = device else { return plain(&mut run_plain) };
        if (autograd::is_recording() && !self.backward_inside) || !cuda::graph::graphs_enabled()? {
            return plain(&mut run_plain);
        }
        let signature: Signature = inputs.iter().map(|t| (t.shape().to_vec(), t.dtype())).collect();
        let Some(at) = self.layouts.iter().position(|l| l.signature == signature) else {
            // A new layout runs plainly; it is recorded when it comes again.
            let ys = plain(&mut run_plain)?;
            if self.layouts.len() < self.max_layouts {
                let outputs = self.outputs_for(&ys)?;
                self.layouts.push(Layout { signature, outputs, recorded: None });
            }
            return Ok(ys);
        };
        let out_set = self.layouts[at].outputs;
        if self.layouts[at].recorded.is_none() {
            let dev = cuda::device(ordinal)?;
            let statics = inputs.iter().map(|t| t.deep_copy()).collect::<Result<Vec<_>>>()?;
            let outputs = &self.outputs[out_set];
            let what = self.what;
            let graph = dev.record(|| {
                let ys = run_plain(&statics)?;
                check_same(what, &ys, outputs)?;
                for (o, y) in outputs.iter().zip(&ys) {
                    o.assign(y)?;
                }
                Ok(())
            })?;
            self.layouts[at].recorded = Some((graph, statics));
        }
        let Some((graph, statics)) = &self.layouts[at].recorded else {
            bail!("{}: replayed before it was recorded", self.what);
        };
        for (s, t) in statics.iter().zip(inputs) {
            s.assign(t)?;
        }
        graph.replay()?;
        Ok(self.outputs[out_set].clone())
    }

    /// The index of the result buffers shaped like `ys`, made when none are.
    fn outputs_for(&mut self, ys: &[Tensor]) -> Result<usize> {
        if ys.is_empty() {
            bail!("{}: the function gave no result", self.what);
        }
        if let Some(i) = self.outputs.iter().position(|o| check_same(self.what, ys, o).is_ok()) {
            return Ok(i);
        }
        let set = ys
            .iter()
            .map(|y| {
                let st = y.storage();
                let c = st.as_cuda()?;
                let buf = c.dev.alloc(y.numel(), y.dtype())?;
                Tensor::from_storage(Storage::Cuda(cuda::CudaStorage { dev: c.dev.clone(), buf }), y.shape())
            })
            .collect::<Result<Vec<_>>>()?;
        self.outputs.push(set);
        Ok(self.outputs.len() - 1)
    }
}

/// Checks that results `ys` have the shapes and types of `outputs`.
fn check_same(what: &str, ys: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let sig = |ts: &[Tensor]| ts.iter().map(|t| (t.shape().to_vec(), t.dtype())).collect::<Vec<_>>();
    if sig(ys) != sig(outputs) {
        bail!("{what}: recorded with results {:?}, gave {:?}", sig(outputs), sig(ys));
    }
    Ok(())
}
