//! The optimizer inside the backward pass frees each gradient as it is used, measured by
//! a counting allocator (this test binary's own, so nothing else runs here): the peak of a
//! training step falls by most of the model's gradient bytes.
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use synthos_engine::pipeline::SynthosPipeline;
use synthos_engine::train::{TrainConfig, Trainer};
use synthos_engine::{DType, Device};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only
// observe the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The peak of live heap bytes above the level before, over the third of three steps
/// (the first two fill the encoder cache and warm the pools); and the trainable bytes.
fn step_peak(inside: bool) -> (usize, usize) {
    let dir = common::temp_dir(if inside { "mem-inside" } else { "mem-after" });
    let cfg = TrainConfig {
        output: dir.clone(),
        demo_images: 16,
        batch_size: 2,
        width: 32,
        height: 32,
        max_steps: Some(3),
        log_metrics: false,
        demo_quality: false,
        optimizer_in_backward: inside,
        ..TrainConfig::demo()
    };
    let mut t = Trainer::new(SynthosPipeline::demo(Device::Cpu, DType::F32, &[]).unwrap(), cfg).unwrap();
    t.set_quiet(true);
    let weights: usize = t.params().iter().map(|(_, p)| p.numel() * 4).sum();
    t.train_step().unwrap();
    t.train_step().unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    t.train_step().unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    drop(t);
    std::fs::remove_dir_all(dir).unwrap();
    (peak, weights)
}

#[test]
fn the_optimizer_inside_the_backward_pass_lowers_the_peak_by_the_gradients() {
    let (after, grads) = step_peak(false);
    let (inside, _) = step_peak(true);
    eprintln!(
        "step peak above the resting heap: {:.2} MB with the update after the pass, {:.2} MB inside it; \
         gradients {:.2} MB",
        after as f64 / 1e6,
        inside as f64 / 1e6,
        grads as f64 / 1e6
    );
    // Inside the pass at most about an eighth of the gradients (one group) is held at a
    // time: the peak falls by well over half of them.
    assert!(after >= inside + grads / 2, "peak {after} after the pass vs {inside} inside it, gradients {grads}");
}
