//! Rotary embedding: the 3D angle table against hand-computed angles (Wan2.1's channel
//! split), the rotation's invariants and gradient, bad inputs, and (with a GPU) the CUDA
//! kernel against the CPU reference.
mod common;
use common::*;
use synthos_engine::cpu::rope::axis_pairs;
use synthos_engine::{autograd, ops, DType, Device, Rng, Tensor};

const THETA: f64 = 10000.0;

/// Asserts that the table's pair `j` of token `t` has angle `angle`.
fn assert_angle(table: &ops::RopeTable, t: usize, j: usize, angle: f64) {
    let k = t * table.pairs() + j;
    let (c, s) = (table.cos[k] as f64, table.sin[k] as f64);
    assert!(
        (c - angle.cos()).abs() < 1e-6 && (s - angle.sin()).abs() < 1e-6,
        "token {t} pair {j}: cos {c} sin {s}, expected angle {angle} (cos {}, sin {})",
        angle.cos(),
        angle.sin()
    );
}

#[test]
fn wan_channel_split() {
    // Wan2.1, head_dim 128: 44/42/42 channels = 22/21/21 pairs for frame/row/column.
    assert_eq!(axis_pairs(128), [22, 21, 21]);
    assert_eq!(axis_pairs(12), [2, 2, 2]);
    assert_eq!(axis_pairs(10), [3, 1, 1]);
    for d in (2..=256).step_by(2) {
        let p = axis_pairs(d);
        assert_eq!(p.iter().sum::<usize>(), d / 2);
        // In channels: d − 4·(d/6), 2·(d/6), 2·(d/6).
        assert_eq!([2 * p[0], 2 * p[1], 2 * p[2]], [d - 4 * (d / 6), 2 * (d / 6), 2 * (d / 6)], "head_dim {d}");
    }
}

#[test]
fn table_angles_by_hand() {
    // head_dim 12: two pairs per axis, frequencies θ^0 = 1 and θ^(−2/4) = 0.01.
    let t = ops::rope_table_3d(2, 3, 4, 12, THETA).unwrap();
    assert_eq!((t.tokens(), t.pairs()), (24, 6));
    assert_eq!((t.cos.len(), t.sin.len()), (24 * 6, 24 * 6));
    // Token (f, h, w) = (1, 2, 3) is (1·3 + 2)·4 + 3 = 23.
    for (j, angle) in [1.0, 0.01, 2.0, 0.02, 3.0, 0.03].into_iter().enumerate() {
        assert_angle(&t, 23, j, angle);
    }
    // Token (0, 1, 0) = 4: only the row pairs turn.
    for (j, angle) in [0.0, 0.0, 1.0, 0.01, 0.0, 0.0].into_iter().enumerate() {
        assert_angle(&t, 4, j, angle);
    }

    // head_dim 128: frame pairs 0..22 with θ^(−2j/44), row 22..43 and column 43..64
    // with θ^(−2j/42).
    let t = ops::rope_table_3d(2, 2, 3, 128, THETA).unwrap();
    let tok = |f: usize, h: usize, w: usize| (f * 2 + h) * 3 + w;
    assert_angle(&t, tok(1, 0, 0), 0, 1.0);
    assert_angle(&t, tok(1, 0, 0), 1, THETA.powf(-2.0 / 44.0));
    assert_angle(&t, tok(1, 0, 0), 21, THETA.powf(-42.0 / 44.0));
    assert_angle(&t, tok(1, 0, 0), 22, 0.0);
    assert_angle(&t, tok(0, 1, 0), 21, 0.0);
    assert_angle(&t, tok(0, 1, 0), 22, 1.0);
    assert_angle(&t, tok(0, 1, 0), 23, THETA.powf(-2.0 / 42.0));
    assert_angle(&t, tok(0, 1, 0), 42, THETA.powf(-40.0 / 42.0));
    assert_angle(&t, tok(0, 1, 0), 43, 0.0);
    assert_angle(&t, tok(1, 1, 2), 43, 2.0);
    assert_angle(&t, tok(1, 1, 2), 63, 2.0 * THETA.powf(-40.0 / 42.0));
    assert_angle(&t, tok(1, 1, 2), 10, THETA.powf(-20.0 / 44.0));
    // Position 0 on every axis: no rotation at all.
    assert!(t.cos[..64].iter().all(|&c| c == 1.0) && t.sin[..64].iter().all(|&s| s == 0.0));
}

fn table_tensors(f: usize, h: usize, w: usize, dh: usize) -> (Tensor, Tensor) {
    ops::rope_table_3d(f, h, w, dh, THETA).unwrap().to_tensors(Device::Cpu).unwrap()
}

#[test]
fn rope_is_a_complex_multiply() {
    let mut rng = Rng::new(21);
    let (b, n, h, dh) = (3, 5, 3, 10);
    let x = randn(&[b, n, h, dh], &mut rng);
    let (cos, sin) = table_tensors(1, 5, 1, dh);
    let y = ops::rope(&x, &cos, &sin).unwrap();
    assert_eq!(y.shape(), &[b, n, h, dh]);
    let (xv, yv, cv, sv) = (x.to_vec().unwrap(), y.to_vec().unwrap(), cos.to_vec().unwrap(), sin.to_vec().unwrap());
    let half = dh / 2;
    let mut want = vec![0f32; xv.len()];
    for i in 0..xv.len() / 2 {
        let (j, tok) = (i % half, (i / (half * h)) % n);
        let (re, im) = (xv[2 * i] as f64, xv[2 * i + 1] as f64);
        let (c, s) = (cv[tok * half + j] as f64, sv[tok * half + j] as f64);
        want[2 * i] = (re * c - im * s) as f32;
        want[2 * i + 1] = (re * s + im * c) as f32;
    }
    assert_close(&yv, &want, 1e-6, 1e-6, "rope vs (a + ib)(cos + i sin)");
    // Token 0 is at position 0 on every axis: unchanged.
    assert_eq!(&yv[..h * dh], &xv[..h * dh]);
}

#[test]
fn rope_preserves_pair_norms_and_inverts() {
    let mut rng = Rng::new(22);
    let (b, n, h, dh) = (3, 12, 2, 128);
    let x = randn(&[b, n, h, dh], &mut rng);
    let (cos, sin) = table_tensors(2, 2, 3, dh);
    let y = ops::rope(&x, &cos, &sin).unwrap();
    let (xv, yv) = (x.to_vec().unwrap(), y.to_vec().unwrap());
    for (p, q) in xv.chunks(2).zip(yv.chunks(2)) {
        let (nx, ny) = (p[0].hypot(p[1]), q[0].hypot(q[1]));
        assert!((nx - ny).abs() <= 1e-5 * (1.0 + nx), "pair norm {nx} became {ny}");
    }
    assert!(rel_err(&yv, &xv) > 0.1, "the rotation must change x");
    // Rotating by the negative angles (sin → −sin) recovers x.
    let neg_sin = ops::scale(&sin, -1.0).unwrap();
    let back = ops::rope(&y, &cos, &neg_sin).unwrap();
    assert_close(&back.to_vec().unwrap(), &xv, 1e-5, 1e-5, "rope inverse");
}

#[test]
fn rope_gradient() {
    let mut rng = Rng::new(23);
    let (cos, sin) = table_tensors(1, 5, 1, 10);
    let x = randn(&[3, 5, 3, 10], &mut rng);
    gradcheck("rope", |t| ops::rope(&t[0], &cos, &sin), &[x], 1e-2, 1e-3);
    // The backward is the inverse rotation: d/dx <rope(x), g> = rope⁻¹(g).
    let x = randn(&[2, 5, 1, 10], &mut rng).requires_grad();
    let g = randn(&[2, 5, 1, 10], &mut rng);
    let y = ops::rope(&x, &cos, &sin).unwrap();
    let grads = autograd::backward_with(&y, g.clone()).unwrap();
    let inv = ops::rope(&g, &cos, &ops::scale(&sin, -1.0).unwrap()).unwrap();
    assert_close(&grads.get(&x).unwrap().to_vec().unwrap(), &inv.to_vec().unwrap(), 1e-6, 1e-6, "rope backward");
}

#[test]
fn bad_inputs_are_errors() {
    let e = ops::rope_table_3d(1, 2, 2, 13, THETA).unwrap_err().to_string();
    assert!(e.contains("rope_table_3d") && e.contains("13") && e.contains("even"), "{e}");
    assert!(ops::rope_table_3d(0, 2, 2, 12, THETA).is_err());
    assert!(ops::rope_table_3d(1, 2, 2, 12, -1.0).is_err());

    let mut rng = Rng::new(24);
    let (cos, sin) = table_tensors(1, 5, 1, 10);
    let odd = randn(&[1, 5, 2, 9], &mut rng);
    let e = ops::rope(&odd, &cos, &sin).unwrap_err().to_string();
    assert!(e.contains("rope") && e.contains("even") && e.contains("[1, 5, 2, 9]"), "{e}");
    let wrong_n = randn(&[1, 4, 2, 10], &mut rng);
    let e = ops::rope(&wrong_n, &cos, &sin).unwrap_err().to_string();
    assert!(e.contains("cos") && e.contains("[5, 5]") && e.contains("[4, 5]"), "{e}");
    let rank3 = randn(&[5, 2, 10], &mut rng);
    let e = ops::rope(&rank3, &cos, &sin).unwrap_err().to_string();
    assert!(e.contains("[B, N, H, head_dim]"), "{e}");
    let tracked = cos.deep_copy().unwrap().requires_grad();
    let x = randn(&[1, 5, 2, 10], &mut rng);
    let e = ops::rope(&x, &tracked, &sin).unwrap_err().to_string();
    assert!(e.contains("no gradient"), "{e}");
}

// ---------------------------------------------------------------------------------------
// GPU parity

/// Runs rope on the GPU with x in `dtype` and on the CPU on the same rounded values;
/// compares forward and backward.
fn gpu_parity(dev: Device, (b, h): (usize, usize), (f, gh, gw): (usize, usize, usize), dh: usize, dtype: DType) {
    let mut rng = Rng::new((b * 1000 + h * 100 + dh) as u64);
    let n = f * gh * gw;
    let table = ops::rope_table_3d(f, gh, gw, dh, THETA).unwrap();
    let (cos_g, sin_g) = table.to_tensors(dev).unwrap();
    assert_eq!(cos_g.dtype(), DType::F32);
    let (cos_c, sin_c) = table.to_tensors(Device::Cpu).unwrap();
    let host = Tensor::randn(&[b, n, h, dh], 1.0, &mut rng, Device::Cpu).unwrap();
    let xg = host.to_device(dev, dtype).unwrap().requires_grad();
    let xc = xg.to_device(Device::Cpu, DType::F32).unwrap().requires_grad();
    let what = format!("rope [{b}, {n}, {h}, {dh}] {dtype}");
    let (atol, rtol) = match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::BF16 => (1e-2, 1e-2),
    };

    let yg = ops::rope(&xg, &cos_g, &sin_g).unwrap();
    assert_eq!(yg.dtype(), dtype);
    let yc = ops::rope(&xc, &cos_c, &sin_c).unwrap();
    assert_close(&yg.to_vec().unwrap(), &yc.to_vec().unwrap(), atol, rtol, &format!("{what}: forward"));

    let g = Tensor::randn(&[b, n, h, dh], 1.0, &mut rng, Device::Cpu).unwrap().to_device(dev, dtype).unwrap();
    let gc = g.to_device(Device::Cpu, DType::F32).unwrap();
    let dg = autograd::backward_with(&yg, g).unwrap();
    let dc = autograd::backward_with(&yc, gc).unwrap();
    let dxg = dg.get(&xg).unwrap();
    assert_eq!(dxg.dtype(), dtype);
    assert_close(
        &dxg.to_vec().unwrap(),
        &dc.get(&xc).unwrap().to_vec().unwrap(),
        atol,
        rtol,
        &format!("{what}: backward"),
    );
}

#[test]
fn gpu_rope_matches_cpu() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::F32, DType::BF16] {
        // head_dim 10: 5 pairs per head (one pair per thread).
        gpu_parity(dev, (3, 3), (1, 5, 7), 10, dtype);
        // head_dim 128 (four pairs per thread), odd grid and head count.
        gpu_parity(dev, (3, 5), (3, 5, 7), 128, dtype);
        // The real model: 12 heads of 128, a 480×832 image = 30×52 tokens.
        gpu_parity(dev, (1, 12), (1, 30, 52), 128, dtype);
    }
}

/// `rms_norm_rope` on the CPU is `rope(rms_norm(x) as heads)` to the bit, gradients
/// included; bad head sizes are errors naming the op.
#[test]
fn rms_norm_rope_is_norm_then_rope() {
    let mut rng = Rng::new(77);
    let (b, n, heads, dh) = (2, 6, 3, 8);
    let (cos, sin) = table_tensors(1, 2, 3, dh);
    let x = randn(&[b, n, heads * dh], &mut rng).requires_grad();
    let w = randn(&[heads * dh], &mut rng).requires_grad();
    let fused = ops::rms_norm_rope(&x, &w, &cos, &sin, dh, 1e-6).unwrap();
    let g1 = autograd::backward(&ops::sum_all(&ops::mul(&fused, &fused).unwrap()).unwrap()).unwrap();
    let normed = ops::reshape(&ops::rms_norm(&x, &w, 1e-6).unwrap(), &[b, n, heads, dh]).unwrap();
    let plain = ops::rope(&normed, &cos, &sin).unwrap();
    let g2 = autograd::backward(&ops::sum_all(&ops::mul(&plain, &plain).unwrap()).unwrap()).unwrap();
    assert_eq!(fused.shape(), [b, n, heads, dh]);
    assert_eq!(fused.to_vec().unwrap(), plain.to_vec().unwrap());
    for t in [&x, &w] {
        assert_eq!(g1.get(t).unwrap().to_vec().unwrap(), g2.get(t).unwrap().to_vec().unwrap());
    }
    for bad in [0, 5, 7] {
        let e = ops::rms_norm_rope(&x, &w, &cos, &sin, bad, 1e-6).unwrap_err().to_string();
        assert!(e.contains("rms_norm_rope") && e.contains("head_dim"), "{e}");
    }
}

/// On a GPU with the one-warp-per-row norm forward on, `rms_norm_rope` runs one fused
/// kernel (its backward rotates back, then the RMSNorm backward): output and gradients
/// agree with the CPU's two ops, for Wan's heads of 128 and small odd shapes.
#[test]
fn gpu_rms_norm_rope_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let cases = [((2, 7), (1, 1, 7), 3, 16), ((1, 12), (1, 5, 6), 12, 128), ((3, 5), (1, 1, 5), 2, 64)];
    synthos_engine::cuda::norm::with_warp_forward(true, || {
        for ((b, _), (f, gh, gw), heads, dh) in cases {
            let n = f * gh * gw;
            let table = ops::rope_table_3d(f, gh, gw, dh, THETA).unwrap();
            let mut rng = Rng::new(78);
            let inputs =
                [randn(&[b, n, heads * dh], &mut rng), ops::add_scalar(&randn(&[heads * dh], &mut rng), 1.0).unwrap()];
            for (dtype, atol, rtol) in PARITY_DTYPES {
                parity(
                    &format!("rms_norm_rope {b}x{n}x{heads}x{dh}"),
                    dev,
                    dtype,
                    &inputs,
                    |t| {
                        let (cos, sin) = table.to_tensors(t[0].device())?;
                        ops::rms_norm_rope(&t[0], &t[1], &cos, &sin, dh, 1e-6)
                    },
                    atol,
                    rtol,
                );
            }
        }
    });
}
