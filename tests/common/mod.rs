//! Test helpers shared by the integration tests: finite-difference gradient checks,
//! closeness assertions, and the GPU gate.
#![allow(dead_code)]

use synthos_engine::{autograd, DType, Device, Result, Rng, Tensor};

/// A CPU tensor of standard normal values.
pub fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 1.0, rng, Device::Cpu).unwrap()
}

/// Asserts `|a-b| <= atol + rtol·|b|` elementwise; the message names `what` and the
/// worst element.
pub fn assert_close(a: &[f32], b: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length {} vs {}", a.len(), b.len());
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite(), "{what}: non-finite value {x} at {i}");
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}: element {i}: got {} expected {} (atol {atol}, rtol {rtol})", a[i], b[i]);
}

/// Relative L2 error ‖a−b‖/‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Checks the tape's gradients of `f` w.r.t. every input in `inputs` against central
/// finite differences of the scalar `Σ f(x)·R` (R a fixed random projection), on the CPU.
///
/// Every element is checked for inputs up to `max_elems` elements; larger inputs are
/// checked on `max_elems` random positions.
pub fn gradcheck(name: &str, f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], eps: f32, tol: f32) {
    let mut rng = Rng::new(0xC0FFEE);
    let leaves: Vec<Tensor> = inputs.iter().map(|t| t.deep_copy().unwrap().requires_grad()).collect();
    let out = f(&leaves).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let proj = Tensor::randn(out.shape(), 1.0, &mut rng, Device::Cpu).unwrap();
    let pv = proj.to_vec().unwrap();
    let grads = autograd::backward_with(&out, proj).unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));
    let loss_at = |xs: &[Tensor]| -> f64 {
        let y = autograd::no_grad(|| f(xs)).unwrap().to_vec().unwrap();
        y.iter().zip(&pv).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let max_elems = 64;
    for (k, leaf) in leaves.iter().enumerate() {
        let g = grads.get(leaf).unwrap_or_else(|| panic!("{name}: no gradient for input {k}")).to_vec().unwrap();
        let base = inputs[k].to_vec().unwrap();
        let positions: Vec<usize> = if base.len() <= max_elems {
            (0..base.len()).collect()
        } else {
            (0..max_elems).map(|_| rng.below(base.len())).collect()
        };
        let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for &i in &positions {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let mut xs: Vec<Tensor> = inputs.iter().map(|t| t.deep_copy().unwrap()).collect();
            xs[k] = Tensor::from_vec(plus, inputs[k].shape(), Device::Cpu).unwrap();
            let lp = loss_at(&xs);
            xs[k] = Tensor::from_vec(minus, inputs[k].shape(), Device::Cpu).unwrap();
            let lm = loss_at(&xs);
            let num = ((lp - lm) / (2.0 * eps as f64)) as f32;
            let err = (num - g[i]).abs();
            assert!(
                err <= tol * scale,
                "{name}: d/d input{k}[{i}]: analytic {} vs numeric {num} (err {err}, allowed {})",
                g[i],
                tol * scale
            );
        }
    }
}

/// The device has one stream: while a test records a CUDA graph on it, work that another
/// thread of the same test executable issues there joins the recording or breaks it (a
/// free of an older buffer, an upload). Tests that record hold this alone
/// ([`recording_alone`]); the other GPU tests of their executables share it
/// ([`beside_recordings`]).
static RECORDING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by a GPU test that records CUDA graphs, for its whole run.
pub fn recording_alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    RECORDING.write().unwrap_or_else(|e| e.into_inner())
}

/// Held by the other GPU tests of an executable with tests that record CUDA graphs.
pub fn beside_recordings() -> std::sync::RwLockReadGuard<'static, ()> {
    RECORDING.read().unwrap_or_else(|e| e.into_inner())
}

/// The GPU to test on (with output poisoning switched on), or `None` (test prints that it
/// skipped) when none is usable; with `SYNTHOS_REQUIRE_GPU=1` (the device emulation tier
/// sets it) a missing GPU is a failure.
pub fn gpu() -> Option<Device> {
    if synthos_engine::cuda::is_usable(0) {
        synthos_engine::cuda::set_poison(true);
        Some(Device::Cuda(0))
    } else {
        assert!(
            std::env::var("SYNTHOS_REQUIRE_GPU").as_deref() != Ok("1"),
            "SYNTHOS_REQUIRE_GPU=1 but no usable CUDA device"
        );
        eprintln!("no usable CUDA device: GPU check skipped");
        None
    }
}

/// GPU-vs-CPU parity of one differentiable function: runs `f` on GPU copies of `inputs`
/// (input `k` in `dtypes[k]`) and on CPU f32 copies of the *same* rounded values, then
/// back-propagates one random output gradient (rounded to `seed_dtype`, or to the GPU
/// output's dtype) through both. Checks the output shape, the GPU output's dtype when
/// `out_dtype` is given, that every input's gradient comes back in that input's dtype,
/// and hands each (GPU values, CPU values, GPU output dtype, label) — the output, then
/// every input gradient — to `check`, which holds the tolerance.
#[allow(clippy::too_many_arguments)]
pub fn gpu_parity(
    name: &str,
    dev: Device,
    inputs: &[Tensor],
    dtypes: &[DType],
    seed_dtype: Option<DType>,
    out_dtype: Option<DType>,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    check: impl Fn(&[f32], &[f32], DType, &str),
) {
    assert_eq!(inputs.len(), dtypes.len(), "{name}: one dtype per input");
    let gin: Vec<Tensor> =
        inputs.iter().zip(dtypes).map(|(t, d)| t.to_device(dev, *d).unwrap().requires_grad()).collect();
    let cin: Vec<Tensor> = gin.iter().map(|t| t.to_device(Device::Cpu, DType::F32).unwrap().requires_grad()).collect();
    let yg = f(&gin).unwrap_or_else(|e| panic!("{name}: GPU forward: {e}"));
    let yc = f(&cin).unwrap_or_else(|e| panic!("{name}: CPU forward: {e}"));
    assert_eq!(yg.shape(), yc.shape(), "{name}: output shape");
    assert_eq!(yg.device(), dev, "{name}: output device");
    if let Some(dt) = out_dtype {
        assert_eq!(yg.dtype(), dt, "{name}: output dtype");
    }
    check(&yg.to_vec().unwrap(), &yc.to_vec().unwrap(), yg.dtype(), "forward");
    let mut rng = Rng::new(99);
    let seed = Tensor::randn(yc.shape(), 1.0, &mut rng, Device::Cpu).unwrap();
    let seed_gpu = seed.to_device(dev, seed_dtype.unwrap_or(yg.dtype())).unwrap();
    let seed_cpu = seed_gpu.to_device(Device::Cpu, DType::F32).unwrap();
    // Each backward consumes only its own graph, so the order does not matter.
    let gc = autograd::backward_with(&yc, seed_cpu).unwrap_or_else(|e| panic!("{name}: CPU backward: {e}"));
    let gg = autograd::backward_with(&yg, seed_gpu).unwrap_or_else(|e| panic!("{name}: GPU backward: {e}"));
    for (k, (tg, tc)) in gin.iter().zip(&cin).enumerate() {
        let a = gg.get(tg).unwrap_or_else(|| panic!("{name}: no GPU gradient for input {k}"));
        assert_eq!(a.dtype(), tg.dtype(), "{name}: gradient {k} comes back in its input's dtype");
        let want = gc.get(tc).unwrap_or_else(|| panic!("{name}: no CPU gradient for input {k}")).to_vec().unwrap();
        check(&a.to_vec().unwrap(), &want, yg.dtype(), &format!("d input {k}"));
    }
}

/// [`gpu_parity`] with every input in `dtype` and the tolerance of the op tests: per
/// element `|gpu − cpu| ≤ atol·max|cpu| + rtol·|cpu|`. The output gradient is rounded to
/// `seed_dtype`; `out_dtype`, when given, is asserted.
#[allow(clippy::too_many_arguments)]
pub fn parity_scaled(
    name: &str,
    dev: Device,
    dtype: DType,
    inputs: &[Tensor],
    seed_dtype: DType,
    out_dtype: Option<DType>,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    atol: f32,
    rtol: f32,
) {
    gpu_parity(name, dev, inputs, &vec![dtype; inputs.len()], Some(seed_dtype), out_dtype, f, |got, want, _, what| {
        let tol = atol * want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        assert_close(got, want, tol, rtol, &format!("{name} {dtype} {what}"));
    });
}

/// [`parity_scaled`] with the output gradient in the inputs' dtype (the elementwise and
/// reduction tests).
pub fn parity(
    name: &str,
    dev: Device,
    dtype: DType,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    atol: f32,
    rtol: f32,
) {
    parity_scaled(name, dev, dtype, inputs, dtype, None, f, atol, rtol);
}

/// (dtype, atol, rtol) of the op parity tests: f32 to 1e-5 of the largest value, bf16 to
/// its rounding.
pub const PARITY_DTYPES: [(DType, f32, f32); 2] = [(DType::F32, 1e-5, 1e-4), (DType::BF16, 1.0 / 128.0, 1.0 / 64.0)];

/// GPU-vs-CPU agreement of a whole bf16 model's output: relative L2 error ≤ 3e-2 and every
/// element within 0.08 + 0.08·|cpu|.
pub fn assert_bf16_close(gpu: &[f32], cpu: &[f32], what: &str) {
    let err = rel_err(gpu, cpu);
    assert!(err <= 3e-2, "{what}: GPU vs CPU relative error {err:e}");
    assert_close(gpu, cpu, 0.08, 0.08, what);
}

/// Poisons a fresh GPU output check: returns a CUDA copy of `t` in bf16.
pub fn to_gpu_bf16(t: &Tensor, dev: Device) -> Tensor {
    t.to_device(dev, synthos_engine::DType::BF16).unwrap()
}

/// A fresh empty directory under the system temp dir, unique per test and process.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("synthos-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two runs from the same `start` (named weights before, and after each run) agree: every
/// weight moved, and all but 1% of each tensor's values agree to `rel` of its largest.
/// Adam turns a gradient near zero into an update of ±lr, so the rounding the attention
/// backward's atomics leave run to run may flip a few elements by up to 2·lr a step; a run
/// that read stale inputs, weights or gradients would move most of them away.
pub fn assert_same_run(
    start: &[(String, Vec<f32>)],
    a: &[(String, Vec<f32>)],
    b: &[(String, Vec<f32>)],
    rel: f32,
    what: &str,
) {
    for (((name, s), (_, a)), (_, b)) in start.iter().zip(a).zip(b) {
        assert!(a != s && b != s, "{what}, {name}: not updated");
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let off = a.iter().zip(b).filter(|(x, y)| (*x - *y).abs() > rel * scale).count();
        assert!(
            off <= (a.len() / 100).max(1),
            "{what}, {name}: {off} of {} values differ by more than {:.1e}",
            a.len(),
            rel * scale
        );
    }
}
