//! A prefetching batch loader: worker threads build the batches of a fixed plan ahead of
//! the consumer, which receives them in plan order.
//!
//! - A [`BatchPlan`] names one batch: its epoch, its position in the epoch and the dataset
//!   indices it holds; [`epoch_plan`] cuts an epoch (shuffled with [`epoch_order`] or in
//!   file order) into batches. Plans for several epochs can be concatenated.
//! - A [`BatchSource`] turns a plan into a batch. It must be a function of the plan alone
//!   (randomness derived from the plan's epoch and indices, never from a shared generator),
//!   so the batches are the same for any number of workers.
//! - [`Loader`] runs the source on `workers` threads. Workers claim batches in plan order
//!   and never more than `prefetch` ahead of the consumer (claimed but not yet handed
//!   out), so memory stays bounded by `prefetch` batches; results travel through a
//!   channel of that capacity and are put back in order on the consumer side. An error
//!   (or a panic in the source) is handed to the consumer in its place in the order, after
//!   which the loader ends. Dropping the loader stops the workers and joins them (each
//!   finishes the batch it is building).
//!
//! ```
//! use std::sync::Arc;
//! use synthos_engine::data::loader::{epoch_plan, BatchPlan, BatchSource, Loader, LoaderOptions};
//!
//! struct Squares;
//! impl BatchSource for Squares {
//!     type Batch = Vec<usize>;
//!     fn make_batch(&self, plan: &BatchPlan) -> synthos_engine::Result<Vec<usize>> {
//!         Ok(plan.indices.iter().map(|i| i * i).collect())
//!     }
//! }
//! # fn main() -> synthos_engine::Result<()> {
//! let plans = epoch_plan(10, 0, 42, 4, true, false)?; // 3 batches: 4, 4, 2
//! let loader = Loader::new(Arc::new(Squares), plans, LoaderOptions { workers: 2, prefetch: 3 })?;
//! let mut seen = 0;
//! for batch in loader {
//!     seen += batch?.len();
//! }
//! assert_eq!(seen, 10);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::epoch_order;
use crate::{ensure, Error, Result};

/// One batch to build: where it sits and which samples it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    /// The epoch it belongs to (feeds per-sample randomness).
    pub epoch: u64,
    /// Its 0-based position within the epoch.
    pub position: usize,
    /// The dataset indices, in batch order.
    pub indices: Vec<usize>,
}

/// The batches of one epoch over `len` samples: the order is [`epoch_order`]`(len, epoch,
/// seed)` when `shuffle`, else `0..len`; it is cut into batches of `batch_size`, the last
/// one shorter unless `drop_last` drops it (SynthCLIP trains with shuffle and
/// `drop_last`, evaluates with neither). `batch_size` must be positive.
pub fn epoch_plan(
    len: usize,
    epoch: u64,
    seed: u64,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
) -> Result<Vec<BatchPlan>> {
    ensure!(batch_size > 0, "epoch_plan: the batch size must be positive");
    let order = if shuffle { epoch_order(len, epoch, seed) } else { (0..len).collect() };
    Ok(order
        .chunks(batch_size)
        .filter(|c| !drop_last || c.len() == batch_size)
        .enumerate()
        .map(|(position, c)| BatchPlan { epoch, position, indices: c.to_vec() })
        .collect())
}

/// Builds batches from plans; shared by the loader's worker threads.
pub trait BatchSource: Send + Sync + 'static {
    /// What one batch is.
    type Batch: Send + 'static;

    /// The batch for `plan`. Must depend on the plan only (not on which thread asks, or
    /// when), so that a loader gives the same batches for any number of workers.
    fn make_batch(&self, plan: &BatchPlan) -> Result<Self::Batch>;
}

/// How a [`Loader`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Worker threads. 0 builds each batch on the consumer's thread when it is asked for
    /// (no prefetch), like PyTorch's `num_workers=0`.
    pub workers: usize,
    /// How many batches may be claimed by workers and not yet handed to the consumer
    /// (at least 1; more than `workers` lets finished batches wait while a slow one is
    /// built). Default 4.
    pub prefetch: usize,
}

impl Default for LoaderOptions {
    /// 2 workers (this project's development machines have 2 cores), 4 batches ahead.
    fn default() -> Self {
        LoaderOptions { workers: 2, prefetch: 4 }
    }
}

/// The most worker threads a [`Loader`] starts.
pub const MAX_WORKERS: usize = 256;

/// The most batches a [`Loader`] lets its workers build ahead.
pub const MAX_PREFETCH: usize = 4096;

/// Claim bookkeeping shared by the workers and the consumer.
struct State {
    /// The next plan a worker may claim.
    next_claim: usize,
    /// Plans handed to the consumer so far.
    handed: usize,
    /// Set when the loader is dropped or has failed: workers stop claiming.
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    /// The state, also after a panic elsewhere poisoned the lock (the counters stay
    /// consistent: every update is a single assignment).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }
}

/// Runs `source` on `plan`, turning a panic into an error.
fn build<S: BatchSource>(source: &S, plan: &BatchPlan) -> Result<S::Batch> {
    match catch_unwind(AssertUnwindSafe(|| source.make_batch(plan))) {
        Ok(r) => r,
        Err(p) => Err(Error::msg(format!(
            "data loader: building batch {} of epoch {} panicked: {}",
            plan.position,
            plan.epoch,
            crate::error::panic_message(p.as_ref())
        ))),
    }
}

/// The work loop of one worker thread.
fn worker<S: BatchSource>(
    source: Arc<S>,
    plans: Arc<Vec<BatchPlan>>,
    shared: Arc<Shared>,
    prefetch: usize,
    tx: SyncSender<(usize, Result<S::Batch>)>,
) {
    loop {
        let k = {
            let mut st = shared.lock();
            loop {
                if st.stop || st.next_claim >= plans.len() {
                    return;
                }
                if st.next_claim < st.handed + prefetch {
                    break;
                }
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.next_claim += 1;
            st.next_claim - 1
        };
        let result = build(source.as_ref(), &plans[k]);
        // At most `prefetch` results are outstanding, so this never blocks; it fails only
        // when the loader is gone.
        if tx.send((k, result)).is_err() {
            return;
        }
    }
}

/// A batch source behind a function, for building batches on the consumer's thread.
type InlineSource<B> = Box<dyn Fn(&BatchPlan) -> Result<B> + Send>;

/// Batches of a plan built ahead on worker threads and handed out in plan order: an
/// iterator of `Result<B>` (see the module documentation).
pub struct Loader<B: Send + 'static> {
    plans: Arc<Vec<BatchPlan>>,
    /// The source, kept here only for `workers == 0`.
    inline: Option<InlineSource<B>>,
    shared: Arc<Shared>,
    rx: Option<Receiver<(usize, Result<B>)>>,
    /// Finished batches that arrived ahead of their turn.
    ready: BTreeMap<usize, Result<B>>,
    /// The next plan to hand out.
    next: usize,
    threads: Vec<JoinHandle<()>>,
    /// Set after an error was handed out.
    failed: bool,
}

impl<B: Send + 'static> Loader<B> {
    /// Starts `options.workers` threads building the batches of `plans` from `source`.
    /// Errors: `options.prefetch` of 0 or above [`MAX_PREFETCH`], more workers than
    /// [`MAX_WORKERS`], or a thread that cannot be started.
    pub fn new<S: BatchSource<Batch = B>>(
        source: Arc<S>,
        plans: Vec<BatchPlan>,
        options: LoaderOptions,
    ) -> Result<Self> {
        ensure!(
            (1..=MAX_PREFETCH).contains(&options.prefetch),
            "data loader: prefetch must be 1 to {MAX_PREFETCH} batches, got {}",
            options.prefetch
        );
        ensure!(
            options.workers <= MAX_WORKERS,
            "data loader: at most {MAX_WORKERS} worker threads, got {}",
            options.workers
        );
        let plans = Arc::new(plans);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { next_claim: 0, handed: 0, stop: false }),
            wake: Condvar::new(),
        });
        let mut loader = Loader {
            plans: plans.clone(),
            inline: None,
            shared: shared.clone(),
            rx: None,
            ready: BTreeMap::new(),
            next: 0,
            threads: Vec::new(),
            failed: false,
        };
        if options.workers == 0 {
            loader.inline = Some(Box::new(move |plan: &BatchPlan| build(source.as_ref(), plan)));
            return Ok(loader);
        }
        let (tx, rx) = sync_channel(options.prefetch);
        loader.rx = Some(rx);
        for i in 0..options.workers {
            let (source, plans, shared, tx) = (source.clone(), plans.clone(), shared.clone(), tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("data-loader-{i}"))
                .spawn(move || worker(source, plans, shared, options.prefetch, tx));
            match spawned {
                Ok(handle) => loader.threads.push(handle),
                // Dropping `loader` stops and joins the threads already started.
                Err(e) => return Err(Error::msg(format!("data loader: cannot start worker thread {i}: {e}"))),
            }
        }
        Ok(loader)
    }

    /// The number of batches in the plan.
    pub fn len(&self) -> usize {
        self.plans.len()
    }

    /// Whether the plan has no batch.
    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// The plans, in the order the batches come out.
    pub fn plans(&self) -> &[BatchPlan] {
        &self.plans
    }

    /// Batches not handed out yet (0 after an error).
    pub fn remaining(&self) -> usize {
        if self.failed {
            0
        } else {
            self.plans.len() - self.next
        }
    }

    /// Marks batch `self.next` handed out and lets the workers claim one more.
    fn advance(&mut self) {
        self.next += 1;
        self.shared.lock().handed = self.next;
        self.shared.wake.notify_all();
    }

    /// Stops the workers and joins them.
    fn shut_down(&mut self) {
        self.shared.stop();
        // Workers never block on the channel (at most `prefetch` results are outstanding),
        // so they all reach their stop check after the batch in hand.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<B: Send + 'static> Iterator for Loader<B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        if self.failed || self.next >= self.plans.len() {
            return None;
        }
        let k = self.next;
        let result = if let Some(inline) = &self.inline {
            inline(&self.plans[k])
        } else {
            loop {
                if let Some(r) = self.ready.remove(&k) {
                    break r;
                }
                let received = match &self.rx {
                    Some(rx) => rx.recv().ok(),
                    None => None,
                };
                match received {
                    Some((i, r)) => {
                        self.ready.insert(i, r);
                    }
                    None => break Err(Error::msg(format!("data loader: the workers stopped before batch {k}"))),
                }
            }
        };
        self.advance();
        if result.is_err() {
            self.failed = true;
            self.ready.clear();
            self.shut_down();
        }
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining()))
    }
}

impl<B: Send + 'static> Drop for Loader<B> {
    fn drop(&mut self) {
        self.shut_down();
    }
}
