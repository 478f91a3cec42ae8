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
/// function; on the CPU, from a layout's second call on, under
/// [`crate::forbid_host_transfers`], so that the rule below is checked where nothing is
/// recorded.
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
///   use them before calling again, or copy them;
/// - no other thread uses the GPU while a call records (the device has one stream; see
///   [`crate::cuda::CudaDevice::record`]).
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

/// The shapes and element types of tensors (a call's inputs or results).
pub(crate) type Signature = Vec<(Vec<usize>, DType)>;

struct Layout {
    signature: Signature,
    /// The shapes and types of its results (from its first call).
    results: Signature,
    /// Once recorded: the graph, the buffers it reads its inputs from, and which set of
    /// [`GraphRunner::outputs`] it writes.
    recorded: Option<(Recorded, Vec<Tensor>, usize)>,
}

/// The [`Signature`] of tensors.
pub(crate) fn signature_of<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Signature {
    ts.into_iter().map(|t| (t.shape().to_vec(), t.dtype())).collect()
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
    ///
    /// A layout's calls after its first run `f` under [`crate::forbid_host_transfers`]
    /// when recorded, and on the CPU: a function that breaks the rule of recordings then
    /// fails on the CPU too.
    pub fn call(
        &mut self,
        inputs: &[&Tensor],
        f: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        if inputs.is_empty() {
            bail!("{}: called without inputs", self.what);
        }
        let device = super::same_device(self.what, inputs)?;
        let owned: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        let signature = signature_of(inputs.iter().copied());
        let Some(at) = self.layouts.iter().position(|l| l.signature == signature) else {
            // A new layout runs plainly (filling caches); it is recorded when it comes again.
            let ys = f(&owned)?;
            if ys.is_empty() {
                bail!("{}: the function gave no result", self.what);
            }
            if self.layouts.len() < self.max_layouts {
                self.layouts.push(Layout { signature, results: signature_of(&ys), recorded: None });
            }
            return Ok(ys);
        };
        let what = self.what;
        let graphs = match device {
            Device::Cuda(ordinal) if (self.backward_inside || !autograd::is_recording()) => {
                cuda::graph::graphs_enabled()?.then_some(ordinal)
            }
            _ => None,
        };
        let Some(ordinal) = graphs else {
            // On the CPU under the recording's rule, which the CPU tests thus check; a GPU
            // running plainly needs no rule.
            return match device {
                Device::Cpu => crate::forbid_host_transfers(what, || f(&owned)),
                Device::Cuda(_) => f(&owned),
            };
        };
        if self.layouts[at].recorded.is_none() {
            let dev = cuda::device(ordinal)?;
            let out_set = self.outputs_for(at, &dev)?;
            let statics = inputs.iter().map(|t| t.deep_copy()).collect::<Result<Vec<_>>>()?;
            let outputs = &self.outputs[out_set];
            let graph = dev.record(|| {
                let ys = crate::forbid_host_transfers(what, || f(&statics))?;
                check_same(what, &ys, outputs)?;
                for (o, y) in outputs.iter().zip(&ys) {
                    o.assign(y)?;
                }
                Ok(())
            })?;
            self.layouts[at].recorded = Some((graph, statics, out_set));
        }
        let Some((graph, statics, out_set)) = &self.layouts[at].recorded else {
            bail!("{what}: replayed before it was recorded");
        };
        for (s, t) in statics.iter().zip(inputs) {
            s.assign(t)?;
        }
        graph.replay()?;
        Ok(self.outputs[*out_set].clone())
    }

    /// The index of the result buffers of layout `at` (on `dev`), made when no set has
    /// its results' shapes.
    fn outputs_for(&mut self, at: usize, dev: &std::sync::Arc<cuda::CudaDevice>) -> Result<usize> {
        let results = &self.layouts[at].results;
        if let Some(i) = self.outputs.iter().position(|o| signature_of(o) == *results) {
            return Ok(i);
        }
        let set = results
            .iter()
            .map(|(shape, dtype)| {
                let buf = dev.alloc(crate::tensor::numel(shape), *dtype)?;
                Tensor::from_storage(Storage::Cuda(cuda::CudaStorage { dev: dev.clone(), buf }), shape)
            })
            .collect::<Result<Vec<_>>>()?;
        self.outputs.push(set);
        Ok(self.outputs.len() - 1)
    }
}

/// Checks that results `ys` have the shapes and types of `outputs`.
fn check_same(what: &str, ys: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    if signature_of(ys) != signature_of(outputs) {
        bail!("{what}: first gave results {:?}, then {:?}", signature_of(outputs), signature_of(ys));
    }
    Ok(())
}
