//! Reductions — sums and means over everything and over one dimension, and `sum_to` (the
//! adjoint of broadcasting, which every bias and gate gradient goes through): values
//! against direct sums, gradients against finite differences, bad inputs, and the GPU
//! kernels against the CPU reference on every launch path.
mod common;
use common::*;
use synthos_engine::{ops, DType, Device, Rng, Tensor};

const DTYPES: [(DType, f32, f32); 2] = PARITY_DTYPES;

/// Σ over dimension `dim` of a [a, b, c] tensor, by direct indexing.
fn direct_sum_dim(v: &[f32], s: [usize; 3], dim: usize) -> Vec<f64> {
    let mut out_shape = s;
    out_shape[dim] = 1;
    let mut out = vec![0f64; out_shape.iter().product()];
    for i in 0..s[0] {
        for j in 0..s[1] {
            for k in 0..s[2] {
                let mut o = [i, j, k];
                o[dim] = 0;
                out[(o[0] * out_shape[1] + o[1]) * out_shape[2] + o[2]] += v[(i * s[1] + j) * s[2] + k] as f64;
            }
        }
    }
    out
}

#[test]
fn reductions_match_direct_sums() {
    let mut rng = Rng::new(14);
    let s = [3, 5, 7];
    let x = randn(&s, &mut rng);
    let v = x.to_vec().unwrap();
    let total: f64 = v.iter().map(|&a| a as f64).sum();
    let sum = ops::sum_all(&x).unwrap();
    assert_eq!(sum.shape(), &[] as &[usize]);
    assert!((sum.item().unwrap() as f64 - total).abs() < 1e-5);
    assert!((ops::mean_all(&x).unwrap().item().unwrap() as f64 - total / 105.0).abs() < 1e-6);
    for dim in 0..3 {
        let want = direct_sum_dim(&v, s, dim);
        let mut kept = s.to_vec();
        kept[dim] = 1;
        let mut dropped = s.to_vec();
        dropped.remove(dim);
        let a = ops::sum_dim(&x, dim, true).unwrap();
        let b = ops::mean_dim(&x, dim, false).unwrap();
        assert_eq!(a.shape(), kept.as_slice());
        assert_eq!(b.shape(), dropped.as_slice());
        let want32: Vec<f32> = want.iter().map(|&w| w as f32).collect();
        let mean32: Vec<f32> = want.iter().map(|&w| (w / s[dim] as f64) as f32).collect();
        assert_close(&a.to_vec().unwrap(), &want32, 1e-5, 1e-5, &format!("sum_dim {dim}"));
        assert_close(&b.to_vec().unwrap(), &mean32, 1e-6, 1e-5, &format!("mean_dim {dim}"));
    }
}

#[test]
fn reduction_gradients_and_errors() {
    let mut rng = Rng::new(15);
    let x = randn(&[3, 5, 7], &mut rng);
    let one = std::slice::from_ref(&x);
    gradcheck("sum_all", |t| ops::sum_all(&t[0]), one, 1e-2, 1e-2);
    gradcheck("mean_all", |t| ops::mean_all(&t[0]), one, 1e-2, 1e-2);
    for dim in 0..3 {
        gradcheck("sum_dim", |t| ops::sum_dim(&t[0], dim, false), one, 1e-2, 1e-2);
        gradcheck("mean_dim", |t| ops::mean_dim(&t[0], dim, true), one, 1e-2, 1e-2);
    }
    let e = ops::sum_dim(&x, 3, false).unwrap_err().to_string();
    assert!(e.contains("sum_dim") && e.contains('3') && e.contains("[3, 5, 7]"), "{e}");
    let e = ops::mean_dim(&x, 7, true).unwrap_err().to_string();
    assert!(e.contains("mean_dim") && e.contains("[3, 5, 7]"), "{e}");
}

#[test]
fn gpu_reductions_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(25);
    for shape in [&[3, 5, 37][..], &[7, 1001, 13], &[5, 3, 4099]] {
        let x = randn(shape, &mut rng);
        let one = std::slice::from_ref(&x);
        for (dt, atol, rtol) in DTYPES {
            parity("sum_all", dev, dt, one, |t| ops::sum_all(&t[0]), atol, rtol);
            parity("mean_all", dev, dt, one, |t| ops::mean_all(&t[0]), atol, rtol);
            for dim in 0..3 {
                parity(
                    &format!("sum_dim {dim} {shape:?}"),
                    dev,
                    dt,
                    one,
                    |t| ops::sum_dim(&t[0], dim, false),
                    atol,
                    rtol,
                );
                parity(
                    &format!("mean_dim {dim} {shape:?}"),
                    dev,
                    dt,
                    one,
                    |t| ops::mean_dim(&t[0], dim, true),
                    atol,
                    rtol,
                );
            }
            parity("sum_to", dev, dt, one, |t| ops::sum_to(&t[0], &[shape[0], 1, shape[2]]), atol, rtol);
        }
    }
}

#[test]
fn gpu_sum_to_every_launch_path_matches_cpu() {
    // One shape per path of `cuda::reduce::sum_to`: split column sums ([R, K], [K1, R, K2]:
    // bias and gate gradients, long and short columns), row sums ([K, R], [R]) and the
    // general kernel (interleaved reduced dimensions), at odd sizes.
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(27);
    let cases: [(&[usize], &[usize]); 8] = [
        (&[3121, 37], &[37]),
        (&[2, 1561, 45], &[2, 1, 45]),
        (&[3, 5000, 70], &[3, 1, 70]),
        (&[1, 9, 33], &[1, 1, 33]),
        (&[7, 300], &[7, 1]),
        (&[1, 4097, 1], &[1, 1, 1]),
        (&[2, 3, 4, 5], &[1, 3, 1, 5]),
        (&[6, 1, 5], &[1, 1, 5]),
    ];
    for (shape, to) in cases {
        let x = randn(shape, &mut rng);
        for (dt, atol, rtol) in DTYPES {
            parity(
                &format!("sum_to {shape:?} -> {to:?}"),
                dev,
                dt,
                std::slice::from_ref(&x),
                |t| ops::sum_to(&t[0], to),
                atol,
                rtol,
            );
            // The split depends only on the sizes: the same bits every time.
            let xg = x.to_device(dev, dt).unwrap();
            let a = ops::sum_to(&xg, to).unwrap().to_vec().unwrap();
            let b = ops::sum_to(&xg, to).unwrap().to_vec().unwrap();
            assert_eq!(a, b, "sum_to {shape:?} -> {to:?} {dt}: not deterministic");
        }
    }
}

/// The 16-byte vector column sums (`SYNTHOS_CUDA_COLSUM=vec`) on bias and gate gradient
/// shapes, a ragged last tile of columns, and a width that is not a multiple of the vector
/// (the scalar kernel then), against the CPU; deterministic run to run.
#[test]
fn gpu_vector_column_sums_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(28);
    let cases: [(&[usize], &[usize]); 5] = [
        (&[3121, 1536], &[1536]),
        (&[4, 1560, 1536], &[4, 1, 1536]),
        (&[2, 1561, 264], &[2, 1, 264]),
        (&[4099, 8], &[8]),
        (&[2, 1561, 45], &[2, 1, 45]),
    ];
    synthos_engine::cuda::reduce::with_vector_columns(true, || {
        for (shape, to) in cases {
            let x = randn(shape, &mut rng);
            for (dt, atol, rtol) in DTYPES {
                let what = format!("sum_to[vec] {shape:?} -> {to:?}");
                parity(&what, dev, dt, std::slice::from_ref(&x), |t| ops::sum_to(&t[0], to), atol, rtol);
                let xg = x.to_device(dev, dt).unwrap();
                let a = ops::sum_to(&xg, to).unwrap().to_vec().unwrap();
                let b = ops::sum_to(&xg, to).unwrap().to_vec().unwrap();
                assert_eq!(a, b, "{what} {dt}: not deterministic");
            }
        }
        // The row sums read 16-byte words too: one row of any length (a tail after the
        // last word), rows of whole words, and rows that are not (the scalar kernel).
        for shape in [&[3_000_007][..], &[1_048_576], &[37], &[5, 40_000], &[3, 8], &[4, 1003]] {
            let x = randn(shape, &mut rng);
            for (dt, atol, rtol) in DTYPES {
                let what = format!("sum_all[vec] {shape:?}");
                parity(&what, dev, dt, std::slice::from_ref(&x), |t| ops::sum_all(&t[0]), atol, rtol);
                let last = shape.len() - 1;
                parity(
                    &format!("mean over the last dim[vec] {shape:?}"),
                    dev,
                    dt,
                    std::slice::from_ref(&x),
                    |t| ops::mean_dim(&t[0], last, false),
                    atol,
                    rtol,
                );
                let xg = x.to_device(dev, dt).unwrap();
                let a = ops::sum_all(&xg).unwrap().item().unwrap();
                assert_eq!(a, ops::sum_all(&xg).unwrap().item().unwrap(), "{what} {dt}: not deterministic");
            }
        }
    });
}

/// `sum_to_product` is `sum_to(mul(a, b))` on the CPU: the same bits, and on the tape the
/// same gradients.
#[test]
fn sum_to_product_is_sum_to_of_mul() {
    let mut rng = Rng::new(30);
    let (a, b) = (randn(&[3, 11, 6], &mut rng).requires_grad(), randn(&[3, 11, 6], &mut rng).requires_grad());
    for to in [&[3, 1, 6][..], &[6], &[3, 11, 1]] {
        let fused = ops::sum_to_product(&a, &b, to).unwrap();
        let plain = ops::sum_to(&ops::mul(&a, &b).unwrap(), to).unwrap();
        assert_eq!(fused.to_vec().unwrap(), plain.to_vec().unwrap(), "{to:?}");
        let seed = randn(fused.shape(), &mut rng);
        let gf = synthos_engine::autograd::backward_with(&fused, seed.clone()).unwrap();
        let gp = synthos_engine::autograd::backward_with(&plain, seed).unwrap();
        for t in [&a, &b] {
            assert_eq!(gf.get(t).unwrap().to_vec().unwrap(), gp.get(t).unwrap().to_vec().unwrap(), "{to:?}");
        }
    }
}

/// The sum of a product in one pass (`ops::sum_to_product` with `SYNTHOS_CUDA_COLSUM=vec`,
/// the gate gradient `Σ g·y`): against the CPU's sum of the products of the same rounded
/// values, in f32 and bf16, through the vector kernel, the scalar one (columns not a
/// multiple of the vector width), one split, and a layout that is not a column sum (the
/// two ops); the same bits run to run. Then `gated_residual`'s gradients, whose gate
/// gradient takes this path, against the CPU.
#[test]
fn gpu_sum_of_products_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(29);
    let cases: [(&[usize], &[usize]); 6] = [
        (&[4, 1560, 1536], &[4, 1, 1536]),
        (&[2, 1561, 264], &[2, 1, 264]),
        (&[2, 1561, 45], &[2, 1, 45]),
        (&[3121, 24], &[24]),
        (&[2, 9, 16], &[2, 1, 16]),
        (&[3, 5, 7], &[3, 5, 1]),
    ];
    synthos_engine::cuda::reduce::with_vector_columns(true, || {
        for (shape, to) in cases {
            let (a, b) = (randn(shape, &mut rng), randn(shape, &mut rng));
            for (dt, atol, rtol) in DTYPES {
                let what = format!("sum_to_product {dt} {shape:?} -> {to:?}");
                let (ag, bg) = (a.to_device(dev, dt).unwrap(), b.to_device(dev, dt).unwrap());
                let cpu = |t: &Tensor| t.to_device(Device::Cpu, DType::F32).unwrap();
                let want = ops::sum_to(&ops::mul(&cpu(&ag), &cpu(&bg)).unwrap(), to).unwrap().to_vec().unwrap();
                let got = ops::sum_to_product(&ag, &bg, to).unwrap();
                assert_eq!(got.shape(), to, "{what}: shape");
                assert_eq!(got.dtype(), dt, "{what}: dtype");
                let got = got.to_vec().unwrap();
                let tol = atol * want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_close(&got, &want, tol, rtol, &what);
                let again = ops::sum_to_product(&ag, &bg, to).unwrap().to_vec().unwrap();
                assert_eq!(got, again, "{what}: not deterministic");
            }
        }
        let (a, b) = (randn(&[2, 3, 4], &mut rng), randn(&[2, 3, 4], &mut rng));
        let (ag, bg) = (a.to_device(dev, DType::BF16).unwrap(), b.to_device(dev, DType::BF16).unwrap());
        let e = ops::sum_to_product(&ag, &bg, &[5]).unwrap_err().to_string();
        assert!(e.contains("sum_to") && e.contains("[2, 3, 4]") && e.contains("[5]"), "{e}");

        let (x, gate) = (randn(&[3, 77, 264], &mut rng), randn(&[3, 1, 264], &mut rng));
        let y = randn(&[3, 77, 264], &mut rng);
        for (dt, atol, rtol) in DTYPES {
            parity(
                &format!("gated_residual[vec] {dt}"),
                dev,
                dt,
                &[x.clone(), gate.clone(), y.clone()],
                |t| ops::gated_residual(&t[0], &t[1], &t[2]),
                atol,
                rtol,
            );
        }
    });
}

#[test]
fn gpu_big_sum_is_accurate() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(26);
    let n = 3_000_007;
    // Positive values: no cancellation, so a serial fp32 sum would be visibly off.
    let v = rng.uniform_vec(n, 0.0, 1.0);
    let x = Tensor::from_vec(v, &[n], Device::Cpu).unwrap();
    for (dt, _, rtol) in DTYPES {
        let xg = x.to_device(dev, dt).unwrap();
        let exact: f64 = xg.to_vec().unwrap().iter().map(|&a| a as f64).sum();
        let s = ops::sum_all(&xg).unwrap().item().unwrap() as f64;
        let m = ops::mean_all(&xg).unwrap().item().unwrap() as f64;
        let tol = if dt == DType::F32 { 1e-6 } else { rtol as f64 };
        assert!((s - exact).abs() <= tol * exact, "{dt} sum_all {s} vs {exact}");
        assert!((m - exact / n as f64).abs() <= tol * exact / n as f64, "{dt} mean_all {m}");
        // Deterministic: the same split every time.
        assert_eq!(ops::sum_all(&xg).unwrap().item().unwrap() as f64, s);
    }
    let big = Tensor::randn(&[n], 1.0, &mut rng, Device::Cpu).unwrap();
    for (dt, atol, rtol) in DTYPES {
        parity("sum_all big", dev, dt, std::slice::from_ref(&big), |t| ops::sum_all(&t[0]), atol, rtol);
    }
}
