//! CUDA graphs: the launches of a function recorded once and replayed with one call.
//!
//! A recorded graph replays the same kernels with the same arguments, pointers included,
//! so its inputs and output live in buffers the recording owns (the caller copies new
//! values in before each replay and the result out after it). Everything the function
//! allocates while it is recorded comes from the driver's graph memory (stream-ordered
//! allocations become graph allocation nodes) and must also be freed inside it: an
//! allocation that outlives the recording (a cache filled on first use) makes the second
//! replay fail. Hence the first call of a function runs it plainly, which fills such
//! caches, loads the kernel modules and sets the launch attributes, and only the second
//! call records it (see `ops::GraphRunner`).
//!
//! Opt-in until a GPU run has shown replays bit-identical to plain runs and faster:
//! `SYNTHOS_CUDA_GRAPHS=1`, or [`with_graphs`].

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::CudaGraph;

use super::{choice, profile_mode, sync_mode, CudaBuf, CudaDevice};
use crate::{bail, Error, Result};

const GRAPHS_VAR: &str = "SYNTHOS_CUDA_GRAPHS";

/// True when functions that can be replayed as CUDA graphs are (`SYNTHOS_CUDA_GRAPHS=1`,
/// or a [`with_graphs`] override); off by default until a GPU run has measured it.
pub fn graphs_enabled() -> Result<bool> {
    Ok(choice::get(GRAPHS_VAR, &["0", "1"])? == 1)
}

/// Runs `f` with CUDA graphs on or off on this thread (tests, bench).
pub fn with_graphs<R>(on: bool, f: impl FnOnce() -> R) -> R {
    choice::with(GRAPHS_VAR, on as usize, f)
}

/// A recorded graph, replayed on the device's stream. Dropping it returns the memory the
/// driver kept for its allocations.
pub struct Recorded {
    dev: Arc<CudaDevice>,
    graph: Option<CudaGraph>,
}

// SAFETY: a graph and its executable may be used from any thread as long as no two
// threads use them at once (the driver's rule); `Recorded` is not `Sync`, and its owner
// moves it between threads only whole (a training step run on a pool thread), so every
// use is serialised. Each driver call binds the context to the calling thread first.
unsafe impl Send for Recorded {}

impl Recorded {
    /// Issues every recorded launch again (asynchronously, in stream order).
    pub fn replay(&self) -> Result<()> {
        self.dev.note_launch("cuda graph replay")?;
        let Some(graph) = &self.graph else { bail!("replaying a CUDA graph that was dropped") };
        graph.launch().map_err(|e| Error::msg(format!("replaying a CUDA graph failed: {e:?}")))
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        drop(self.graph.take());
        // Graph allocations stay reserved for the next replay until trimmed. Best effort:
        // a failure here leaves the memory reserved, nothing else.
        // SAFETY: the device handle comes from a live context; the call only returns
        // memory no graph uses.
        let _ = self.dev.ctx.bind_to_thread();
        let _ = unsafe { sys::cuDeviceGraphMemTrim(self.dev.ctx.cu_device()) };
    }
}

impl CudaDevice {
    /// Records the launches `f` issues on this device's stream into a graph, without
    /// running them. `f` must not synchronise or copy to or from the host (the error
    /// says so), and must free whatever it allocates. No other thread may use the device
    /// meanwhile: the device has one stream, and work issued there from another thread
    /// (a launch, an upload, the free of a dropped buffer) would join the recording or
    /// break it.
    pub fn record(self: &Arc<Self>, f: impl FnOnce() -> Result<()>) -> Result<Recorded> {
        if sync_mode() || profile_mode() {
            bail!(
                "CUDA graphs cannot be recorded with SYNTHOS_CUDA_SYNC=1 or SYNTHOS_CUDA_PROFILE=1 (each launch \
                 synchronises); unset SYNTHOS_CUDA_GRAPHS or those"
            );
        }
        // Nothing of earlier work may be pending in a way the recording would wait on.
        self.synchronize()?;
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::msg(format!("cannot start recording a CUDA graph: {e:?}")))?;
        let body = f();
        // The recording ends whatever happened, so that the stream runs work again. A
        // failed call inside it may have left an error for the next driver call (frees of
        // dropped buffers are reported that way); it is taken first, so that it cannot
        // stop the recording from ending.
        let pending = self.ctx.check_err().err();
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        const RULES: &str = "a recorded function must not synchronise, copy to or from the host, or use another stream";
        let graph = match (body, ended) {
            (Err(e), _) => bail!("recording a CUDA graph failed: {e} ({RULES})"),
            (Ok(()), Err(e)) => bail!("recording a CUDA graph failed: {:?} ({RULES})", pending.unwrap_or(e)),
            (Ok(()), Ok(None)) => bail!("recording a CUDA graph gave an empty graph"),
            (Ok(()), Ok(Some(g))) => g,
        };
        graph.upload().map_err(|e| Error::msg(format!("cannot upload a recorded CUDA graph: {e:?}")))?;
        Ok(Recorded { dev: self.clone(), graph: Some(graph) })
    }

    /// Copies every element of `src` into `dst` on the stream (same type and length).
    pub fn copy_buf(&self, src: &CudaBuf, dst: &mut CudaBuf) -> Result<()> {
        match (src, dst) {
            (CudaBuf::F32(s), CudaBuf::F32(d)) if s.len() == d.len() => self.stream.memcpy_dtod(s, d)?,
            (CudaBuf::BF16(s), CudaBuf::BF16(d)) if s.len() == d.len() => self.stream.memcpy_dtod(s, d)?,
            (s, d) => {
                bail!("device copy of {} {} elements into {} {} elements", s.len(), s.dtype(), d.len(), d.dtype())
            }
        }
        Ok(())
    }

    /// The most bytes the driver has reserved for graph allocations at once since the
    /// last [`reset_graph_memory_peak`](Self::reset_graph_memory_peak): memory the device's
    /// pool does not count, kept while a recorded graph exists.
    pub fn graph_memory_peak(&self) -> Result<u64> {
        self.graph_mem_attr(sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH, false)
    }

    /// Restarts [`graph_memory_peak`](Self::graph_memory_peak) from what is reserved now.
    pub fn reset_graph_memory_peak(&self) -> Result<()> {
        self.graph_mem_attr(sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH, true).map(|_| ())
    }

    fn graph_mem_attr(&self, attr: sys::CUgraphMem_attribute, reset: bool) -> Result<u64> {
        self.ctx.bind_to_thread()?;
        let mut v: u64 = 0;
        // SAFETY: the context is current, the device comes from it, and the graph memory
        // attributes are u64 values (the high-water marks can only be set to zero).
        let r = unsafe {
            if reset {
                sys::cuDeviceSetGraphMemAttribute(self.ctx.cu_device(), attr, (&mut v as *mut u64).cast())
            } else {
                sys::cuDeviceGetGraphMemAttribute(self.ctx.cu_device(), attr, (&mut v as *mut u64).cast())
            }
        };
        r.result().map_err(|e| Error::msg(format!("CUDA graph memory attribute {attr:?}: {e:?}")))?;
        Ok(v)
    }
}
