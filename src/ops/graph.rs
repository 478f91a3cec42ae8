//! Functions of tensors that run as CUDA graphs: the sampler's DiT forward issues about
//! a thousand launches per step, and a small model's step is nothing but launches, so
//! replaying them with one call removes the host's share of the time.

use crate::cuda::graph::Recorded;
use crate::tensor::Storage;
use crate::{autograd, bail, cuda, DType, Device, Result, Tensor};

/// A function of tensors that, on a GPU with `SYNTHOS_CUDA_GRAPHS=1`, runs plainly once
/// and is replayed as a recorded CUDA graph from its second call on. Elsewhere (the CPU,
/// graphs off, or while the tape records, since a replay has no backward) every call
/// runs the function.
///
/// The function must give the same launches for inputs of the same shapes: the same
/// shapes and element types at every call, no host reads or writes of device values,
/// and nothing kept beyond the call (a replay reuses the recorded pointers, so values
/// the function reads besides its inputs, such as weights or a cached context, are read
/// from where they were when it was recorded and must stay there). A replay gives the
/// same result as running the function, bit for bit.
///
/// ```
/// use synthos_engine::{ops, Device, Tensor};
/// let w = Tensor::from_vec(vec![2.0, 3.0], &[2], Device::Cpu)?;
/// let mut scaled = ops::GraphedFn::new("scale", |xs: &[Tensor]| ops::mul(&xs[0], &w));
/// let x = Tensor::from_vec(vec![1.0, 1.0], &[2], Device::Cpu)?;
/// for _ in 0..3 {
///     assert_eq!(scaled.call(&[&x])?.to_vec()?, vec![2.0, 3.0]);
/// }
/// # Ok::<(), synthos_engine::Error>(())
/// ```
pub struct GraphedFn<'a> {
    what: &'static str,
    f: Box<TensorFn<'a>>,
    state: State,
}

/// A function of tensors to one tensor.
type TensorFn<'a> = dyn Fn(&[Tensor]) -> Result<Tensor> + 'a;

enum State {
    /// Not yet run on a GPU with graphs on.
    Fresh,
    /// Run once plainly (caches filled, modules loaded): the next call records. The
    /// output's shape and type.
    WarmedUp(Vec<usize>, DType),
    /// Recorded: the graph reads its inputs from, and writes its output to, these.
    Recorded { inputs: Vec<Tensor>, output: Tensor, graph: Recorded },
}

impl<'a> GraphedFn<'a> {
    /// Wraps `f`; `what` names it in errors.
    pub fn new(what: &'static str, f: impl Fn(&[Tensor]) -> Result<Tensor> + 'a) -> Self {
        GraphedFn { what, f: Box::new(f), state: State::Fresh }
    }

    /// True once a graph has been recorded (later calls replay it).
    pub fn is_recorded(&self) -> bool {
        matches!(self.state, State::Recorded { .. })
    }

    /// `f(inputs)`: run, or replayed with the new input values (then the result is a
    /// fresh tensor, not the graph's own output buffer).
    pub fn call(&mut self, inputs: &[&Tensor]) -> Result<Tensor> {
        if inputs.is_empty() {
            bail!("{}: called without inputs", self.what);
        }
        let device = super::same_device(self.what, inputs)?;
        let Device::Cuda(ordinal) = device else { return self.run(inputs) };
        if autograd::is_recording() || !cuda::graph::graphs_enabled()? {
            return self.run(inputs);
        }
        match std::mem::replace(&mut self.state, State::Fresh) {
            State::Fresh => {
                let y = self.run(inputs)?;
                self.state = State::WarmedUp(y.shape().to_vec(), y.dtype());
                Ok(y)
            }
            State::WarmedUp(shape, dtype) => {
                let dev = cuda::device(ordinal)?;
                let statics = inputs.iter().map(|t| t.deep_copy()).collect::<Result<Vec<_>>>()?;
                let output = Tensor::from_storage(
                    Storage::Cuda(cuda::CudaStorage {
                        buf: dev.alloc(crate::tensor::numel(&shape), dtype)?,
                        dev: dev.clone(),
                    }),
                    &shape,
                )?;
                let graph = dev.record(|| {
                    let y = (self.f)(&statics)?;
                    if y.shape() != output.shape() || y.dtype() != output.dtype() {
                        bail!(
                            "{}: gave {:?} {} when recorded, {:?} {} when run",
                            self.what,
                            y.shape(),
                            y.dtype(),
                            output.shape(),
                            output.dtype()
                        );
                    }
                    output.assign(&y)
                })?;
                self.state = State::Recorded { inputs: statics, output, graph };
                self.replay(inputs)
            }
            recorded => {
                self.state = recorded;
                self.replay(inputs)
            }
        }
    }

    fn run(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let owned: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        (self.f)(&owned)
    }

    fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let State::Recorded { inputs: statics, output, graph } = &self.state else {
            bail!("{}: replayed before it was recorded", self.what);
        };
        if statics.len() != inputs.len()
            || statics.iter().zip(inputs).any(|(s, t)| s.shape() != t.shape() || s.dtype() != t.dtype())
        {
            let had: Vec<_> = statics.iter().map(|t| (t.shape().to_vec(), t.dtype())).collect();
            let got: Vec<_> = inputs.iter().map(|t| (t.shape().to_vec(), t.dtype())).collect();
            bail!("{}: recorded for inputs {had:?}, called with {got:?}", self.what);
        }
        for (s, t) in statics.iter().zip(inputs) {
            s.assign(t)?;
        }
        graph.replay()?;
        output.deep_copy()
    }
}
