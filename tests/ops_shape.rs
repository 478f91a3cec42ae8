//! Shape ops: reshape, permute/transpose, concat, narrow, split. Round trips, values
//! against direct indexing, gradients, bad inputs, and the GPU copies against the CPU.
mod common;
use common::*;
use synthos_engine::{autograd, ops, DType, Device, Result, Rng, Tensor};

#[test]
fn reshape_is_zero_copy_and_differentiable() {
    let mut rng = Rng::new(31);
    let x = randn(&[3, 5, 7], &mut rng);
    let y = ops::reshape(&x, &[15, 7]).unwrap();
    assert_eq!(y.shape(), &[15, 7]);
    assert!(y.same_storage(&x), "reshape copies nothing");
    assert_eq!(y.to_vec().unwrap(), x.to_vec().unwrap());
    gradcheck(
        "reshape",
        |t| ops::mul(&ops::reshape(&t[0], &[7, 15]).unwrap(), &t[1]),
        &[x.clone(), randn(&[7, 15], &mut rng)],
        1e-2,
        1e-2,
    );
    let e = ops::reshape(&x, &[4, 26]).unwrap_err().to_string();
    assert!(e.contains("reshape") && e.contains("[3, 5, 7]") && e.contains("[4, 26]"), "{e}");
}

#[test]
fn permute_matches_direct_indexing() {
    let mut rng = Rng::new(32);
    let s = [3, 5, 2, 7];
    let x = randn(&s, &mut rng);
    let v = x.to_vec().unwrap();
    let perm = [2, 0, 3, 1];
    let y = ops::permute(&x, &perm).unwrap();
    assert_eq!(y.shape(), &[2, 3, 7, 5]);
    let yv = y.to_vec().unwrap();
    for a in 0..3 {
        for b in 0..5 {
            for c in 0..2 {
                for d in 0..7 {
                    // y[c, a, d, b] = x[a, b, c, d]
                    let yi = ((c * 3 + a) * 7 + d) * 5 + b;
                    let xi = ((a * 5 + b) * 2 + c) * 7 + d;
                    assert_eq!(yv[yi], v[xi]);
                }
            }
        }
    }
    // The inverse permutation restores x exactly.
    let back = ops::permute(&y, &[1, 3, 0, 2]).unwrap();
    assert_eq!(back.shape(), &s);
    assert_eq!(back.to_vec().unwrap(), v);
    let t = ops::transpose(&x, 1, 3).unwrap();
    assert_eq!(t.shape(), &[3, 7, 2, 5]);
    assert_eq!(ops::transpose(&t, 3, 1).unwrap().to_vec().unwrap(), v);
}

#[test]
fn permute_gradients_and_errors() {
    let mut rng = Rng::new(33);
    let x = randn(&[3, 5, 7], &mut rng);
    let one = std::slice::from_ref(&x);
    gradcheck("permute", |t| ops::permute(&t[0], &[2, 0, 1]), one, 1e-2, 1e-2);
    gradcheck("transpose", |t| ops::transpose(&t[0], 0, 2), one, 1e-2, 1e-2);
    for bad in [&[0, 1][..], &[0, 1, 1], &[0, 1, 3], &[0, 1, 2, 3]] {
        let e = ops::permute(&x, bad).unwrap_err().to_string();
        assert!(e.contains("permute") && e.contains(&format!("{bad:?}")) && e.contains("[3, 5, 7]"), "{e}");
    }
    let e = ops::transpose(&x, 0, 3).unwrap_err().to_string();
    assert!(e.contains("transpose") && e.contains('3') && e.contains("[3, 5, 7]"), "{e}");
    let deep = randn(&[1, 2, 1, 2, 1, 2, 3], &mut rng);
    let e = ops::permute(&deep, &[6, 5, 4, 3, 2, 1, 0]).unwrap_err().to_string();
    assert!(e.contains("rank 7"), "{e}");
}

#[test]
fn concat_of_splits_is_the_original() {
    let mut rng = Rng::new(34);
    let x = randn(&[3, 5, 7], &mut rng);
    for (dim, sizes) in [(0, vec![1, 2]), (1, vec![2, 0, 3]), (2, vec![3, 1, 3])] {
        let parts = ops::split(&x, dim, &sizes).unwrap();
        for (p, &len) in parts.iter().zip(&sizes) {
            assert_eq!(p.shape()[dim], len);
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        let back = ops::concat(&refs, dim).unwrap();
        assert_eq!(back.shape(), x.shape());
        assert_eq!(back.to_vec().unwrap(), x.to_vec().unwrap(), "dim {dim}");
    }
    // narrow picks the right elements: x[:, 1:4, :] by direct indexing.
    let n = ops::narrow(&x, 1, 1, 3).unwrap();
    let (v, nv) = (x.to_vec().unwrap(), n.to_vec().unwrap());
    for a in 0..3 {
        for b in 0..3 {
            for c in 0..7 {
                assert_eq!(nv[(a * 3 + b) * 7 + c], v[(a * 5 + b + 1) * 7 + c]);
            }
        }
    }
}

#[test]
fn concat_narrow_split_gradients() {
    let mut rng = Rng::new(35);
    let (a, b) = (randn(&[3, 2, 7], &mut rng), randn(&[3, 5, 7], &mut rng));
    gradcheck("concat", |t| ops::concat(&[&t[0], &t[1]], 1), &[a, b.clone()], 1e-2, 1e-2);
    let one = std::slice::from_ref(&b);
    gradcheck("narrow", |t| ops::narrow(&t[0], 2, 2, 3), one, 1e-2, 1e-2);
    // Each piece weighted differently, so a mixed-up piece gradient shows.
    gradcheck(
        "split",
        |t| {
            let p = ops::split(&t[0], 1, &[1, 3, 1])?;
            let q = [ops::scale(&p[0], 2.0)?, ops::scale(&p[1], -0.5)?, p[2].clone()];
            ops::concat(&[&q[2], &q[0], &q[1]], 1)
        },
        one,
        1e-2,
        1e-2,
    );
}

#[test]
fn concat_narrow_split_errors() {
    let mut rng = Rng::new(36);
    let (a, b) = (randn(&[3, 2, 7], &mut rng), randn(&[3, 5, 6], &mut rng));
    let e = ops::concat(&[&a, &b], 1).unwrap_err().to_string();
    assert!(e.contains("concat") && e.contains("[3, 2, 7]") && e.contains("[3, 5, 6]"), "{e}");
    let e = ops::concat(&[&a, &a], 3).unwrap_err().to_string();
    assert!(e.contains("concat") && e.contains('3'), "{e}");
    assert!(ops::concat(&[], 0).unwrap_err().to_string().contains("concat"));
    let e = ops::narrow(&b, 1, 3, 3).unwrap_err().to_string();
    assert!(e.contains("narrow") && e.contains("3..6") && e.contains("[3, 5, 6]"), "{e}");
    let e = ops::narrow(&b, 3, 0, 1).unwrap_err().to_string();
    assert!(e.contains("narrow") && e.contains("dimension 3"), "{e}");
    let e = ops::split(&b, 2, &[2, 2]).unwrap_err().to_string();
    assert!(e.contains("split") && e.contains("[2, 2]") && e.contains("[3, 5, 6]"), "{e}");
}

// ---------------------------------------------------------------------------------
// GPU parity: pure copies, so the GPU must match the CPU exactly in both dtypes.

#[test]
fn gather_rows_picks_rows_and_scatters_gradients() {
    let mut rng = Rng::new(71);
    let table = randn(&[9, 5], &mut rng);
    let ids = [4usize, 0, 4, 8, 4, 2];
    let tv = table.to_vec().unwrap();
    let out = ops::gather_rows(&table, &ids).unwrap();
    assert_eq!(out.shape(), &[6, 5]);
    let ov = out.to_vec().unwrap();
    for (i, &r) in ids.iter().enumerate() {
        assert_eq!(&ov[i * 5..(i + 1) * 5], &tv[r * 5..(r + 1) * 5], "row {i}");
    }
    // The gradient: each table row receives the sum of the gradients of the rows that read it.
    let t = table.clone().requires_grad();
    let seed = randn(&[6, 5], &mut rng);
    let sv = seed.to_vec().unwrap();
    let g = autograd::backward_with(&ops::gather_rows(&t, &ids).unwrap(), seed).unwrap();
    let gv = g.get(&t).unwrap().to_vec().unwrap();
    for r in 0..9 {
        for c in 0..5 {
            let want: f32 = ids.iter().enumerate().filter(|(_, &x)| x == r).map(|(i, _)| sv[i * 5 + c]).sum();
            assert!((gv[r * 5 + c] - want).abs() <= 1e-6, "d table[{r}, {c}] = {} vs {want}", gv[r * 5 + c]);
        }
    }
    gradcheck("gather_rows", |t| ops::gather_rows(&t[0], &ids), std::slice::from_ref(&table), 1e-2, 1e-2);
    // No ids: an empty output, and an all-zero gradient.
    assert_eq!(ops::gather_rows(&table, &[]).unwrap().shape(), &[0, 5]);

    let e = ops::gather_rows(&table, &[1, 9]).unwrap_err().to_string();
    assert!(e.contains("gather_rows") && e.contains("index 9 (position 1)") && e.contains("9 rows"), "{e}");
    let e = ops::gather_rows(&randn(&[2, 3, 4], &mut rng), &[0]).unwrap_err().to_string();
    assert!(e.contains("gather_rows") && e.contains("2-D"), "{e}");
}

#[test]
fn gather_rows_at_takes_indices_made_beforehand() {
    let mut rng = Rng::new(73);
    let table = randn(&[9, 5], &mut rng);
    for ids in [vec![4usize, 0, 4, 8, 4, 2], vec![], vec![3], (0..40).map(|i| (i * 7) % 9).collect()] {
        let idx = ops::RowIndices::new(&ids, 9, Device::Cpu).unwrap();
        assert_eq!((idx.len(), idx.rows(), idx.tensor().shape()), (ids.len(), 9, &[4 * ids.len() + 1][..]));
        // Inside the rule of recorded functions (the index tensor was made before): the rows
        // by direct indexing, and each table row's gradient the sum of its readers'.
        let t = table.clone().requires_grad();
        let seed = randn(&[ids.len(), 5], &mut rng);
        let (tv, sv) = (table.to_vec().unwrap(), seed.to_vec().unwrap());
        let b = synthos_engine::forbid_host_transfers("a test", || ops::gather_rows_at(&t, &idx)).unwrap();
        let want: Vec<f32> = ids.iter().flat_map(|&r| tv[r * 5..(r + 1) * 5].to_vec()).collect();
        assert_eq!(b.to_vec().unwrap(), want, "ids {ids:?}");
        let gb = autograd::backward_with(&b, seed).unwrap().get(&t).unwrap().to_vec().unwrap();
        for (k, g) in gb.iter().enumerate() {
            let (r, c) = (k / 5, k % 5);
            let want: f32 = ids.iter().enumerate().filter(|(_, &x)| x == r).map(|(i, _)| sv[i * 5 + c]).sum();
            assert!((g - want).abs() <= 1e-6, "ids {ids:?}: d table[{r}, {c}] = {g} vs {want}");
        }
        // A copy of the tensor (a recorded step's input) serves as well.
        let again = ops::RowIndices::from_tensor(&idx.tensor().deep_copy().unwrap(), 9).unwrap();
        assert_eq!(ops::gather_rows_at(&table, &again).unwrap().to_vec().unwrap(), want);
    }
    let idx = ops::RowIndices::new(&[1, 8, 8], 9, Device::Cpu).unwrap();
    gradcheck("gather_rows_at", |t| ops::gather_rows_at(&t[0], &idx), std::slice::from_ref(&table), 1e-2, 1e-2);

    // The host-index op is refused where a recorded function runs; its errors name the index.
    let e = synthos_engine::forbid_host_transfers("a test", || ops::gather_rows(&table, &[1])).unwrap_err().to_string();
    assert!(e.contains("gather_rows") && e.contains("a test") && e.contains("gather_rows_at"), "{e}");
    let e = ops::RowIndices::new(&[1, 9], 9, Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("index 9 (position 1)") && e.contains("9 rows"), "{e}");
    let e = ops::gather_rows_at(&randn(&[8, 5], &mut rng), &idx).unwrap_err().to_string();
    assert!(e.contains("gather_rows_at") && e.contains("9 rows") && e.contains("[8, 5]"), "{e}");
    let e = ops::RowIndices::from_tensor(&randn(&[6], &mut rng), 9).err().unwrap().to_string();
    assert!(e.contains("[6]") && e.contains("[4n + 1]"), "{e}");
}

/// Runs `f` on the CPU and on the GPU (inputs in `dtype`) and checks that the output and
/// the gradients of every input for one random output gradient are identical.
fn exact_parity(name: &str, dev: Device, dtype: DType, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let gin: Vec<Tensor> = inputs.iter().map(|t| t.to_device(dev, dtype).unwrap().requires_grad()).collect();
    let cin: Vec<Tensor> = gin.iter().map(|t| t.to_device(Device::Cpu, DType::F32).unwrap().requires_grad()).collect();
    // CPU forward + backward first: a backward pass drains this thread's whole tape.
    let yc = f(&cin).unwrap_or_else(|e| panic!("{name}: CPU forward: {e}"));
    let mut rng = Rng::new(77);
    let seed_gpu = Tensor::randn(yc.shape(), 1.0, &mut rng, Device::Cpu).unwrap().to_device(dev, dtype).unwrap();
    let gc = autograd::backward_with(&yc, seed_gpu.to_device(Device::Cpu, DType::F32).unwrap()).unwrap();
    let yg = f(&gin).unwrap_or_else(|e| panic!("{name}: GPU forward: {e}"));
    assert_eq!((yg.shape(), yg.dtype()), (yc.shape(), dtype), "{name}: output");
    assert_close(&yg.to_vec().unwrap(), &yc.to_vec().unwrap(), 0.0, 0.0, &format!("{name} {dtype} forward"));
    let gg = autograd::backward_with(&yg, seed_gpu).unwrap_or_else(|e| panic!("{name}: GPU backward: {e}"));
    for k in 0..inputs.len() {
        let a = gg.get(&gin[k]).unwrap_or_else(|| panic!("{name}: no GPU gradient for input {k}"));
        assert_eq!(a.dtype(), dtype, "{name}: gradient {k} dtype");
        let want = gc.get(&cin[k]).unwrap().to_vec().unwrap();
        assert_close(&a.to_vec().unwrap(), &want, 0.0, 0.0, &format!("{name} {dtype} d input {k}"));
    }
}

#[test]
fn gpu_permute_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(41);
    // Each path of the launcher: element-wise, 16-byte rows, tiled transposes (one with
    // more batch entries than a grid has rows of blocks), an identity after simplification.
    let cases: [(&[usize], &[usize]); 10] = [
        (&[3, 5, 7], &[2, 0, 1]),
        (&[2, 37, 5, 13], &[0, 2, 1, 3]),
        (&[3, 5, 2, 7], &[3, 1, 0, 2]),
        (&[2, 3, 1, 5, 3, 7], &[5, 3, 1, 4, 0, 2]),
        (&[1, 1013, 67], &[0, 2, 1]),
        (&[2, 37, 5, 16], &[0, 2, 1, 3]),
        (&[2, 9, 12, 128], &[0, 2, 1, 3]),
        (&[2, 3, 33, 35], &[0, 2, 3, 1]),
        (&[70_000, 3, 2], &[0, 2, 1]),
        (&[4, 1, 6], &[1, 0, 2]),
    ];
    for dt in [DType::F32, DType::BF16] {
        for (shape, perm) in cases {
            let x = randn(shape, &mut rng);
            exact_parity(&format!("permute {shape:?} {perm:?}"), dev, dt, std::slice::from_ref(&x), |t| {
                ops::permute(&t[0], perm)
            });
        }
        let x = randn(&[3, 5, 7], &mut rng);
        exact_parity("transpose", dev, dt, std::slice::from_ref(&x), |t| ops::transpose(&t[0], 1, 2));
        exact_parity("reshape", dev, dt, std::slice::from_ref(&x), |t| ops::reshape(&t[0], &[5, 21]));
    }
}

#[test]
fn gpu_concat_narrow_split_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(42);
    for dt in [DType::F32, DType::BF16] {
        for dim in 0..3 {
            let mut sa = vec![3, 5, 7];
            sa[dim] = 2;
            let (a, b, c) = (randn(&sa, &mut rng), randn(&[3, 5, 7], &mut rng), randn(&sa, &mut rng));
            exact_parity(&format!("concat dim {dim}"), dev, dt, &[a, b.clone(), c], |t| {
                ops::concat(&[&t[0], &t[1], &t[2]], dim)
            });
            exact_parity(&format!("narrow dim {dim}"), dev, dt, std::slice::from_ref(&b), |t| {
                ops::narrow(&t[0], dim, 1, 2)
            });
            exact_parity(&format!("split dim {dim}"), dev, dt, std::slice::from_ref(&b), |t| {
                let p = ops::split(&t[0], dim, &[1, 1, b.shape()[dim] - 2])?;
                ops::concat(&[&p[2], &p[0]], dim)
            });
        }
        let big = randn(&[3, 100_003], &mut rng);
        exact_parity("narrow big", dev, dt, std::slice::from_ref(&big), |t| ops::narrow(&t[0], 1, 7, 99_001));
        // 16-byte words, and more runs than a grid has rows of blocks.
        let tall = randn(&[70_000, 24], &mut rng);
        exact_parity("narrow tall", dev, dt, std::slice::from_ref(&tall), |t| ops::narrow(&t[0], 1, 8, 16));
    }
}

#[test]
fn gpu_concat_mixes_dtypes() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(43);
    let (a, b) = (randn(&[3, 2, 7], &mut rng), randn(&[3, 5, 7], &mut rng));
    let ag = a.to_device(dev, DType::F32).unwrap().requires_grad();
    let bg = b.to_device(dev, DType::BF16).unwrap().requires_grad();
    let y = ops::concat(&[&ag, &bg], 1).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let ab = ag.to_device(dev, DType::BF16).unwrap().to_device(Device::Cpu, DType::F32).unwrap();
    let bc = bg.to_device(Device::Cpu, DType::F32).unwrap();
    let want = ops::concat(&[&ab, &bc], 1).unwrap();
    assert_close(&y.to_vec().unwrap(), &want.to_vec().unwrap(), 0.0, 0.0, "mixed concat");
    let g = autograd::backward_with(&y, Tensor::full(y.shape(), 1.0, DType::BF16, dev).unwrap()).unwrap();
    assert_eq!(g.get(&ag).unwrap().dtype(), DType::F32);
    assert_eq!(g.get(&ag).unwrap().to_vec().unwrap(), vec![1.0; 42]);
    assert_eq!(g.get(&bg).unwrap().to_vec().unwrap(), vec![1.0; 105]);
}

#[test]
fn gpu_gather_rows_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(72);
    // Repeated ids (the scatter sums them), unused rows, and several blocks.
    let ids: Vec<usize> = (0..600).map(|i| (i * 7919) % 97).chain([100, 0, 0]).collect();
    let table = randn(&[101, 40], &mut rng);
    // f32: the same sums in the same order, bit for bit; bf16: the fp32 sums rounded once.
    exact_parity("gather_rows", dev, DType::F32, std::slice::from_ref(&table), |t| ops::gather_rows(&t[0], &ids));
    let (_, atol, rtol) = PARITY_DTYPES[1];
    parity(
        "gather_rows",
        dev,
        DType::BF16,
        std::slice::from_ref(&table),
        |t| ops::gather_rows(&t[0], &ids),
        atol,
        rtol,
    );
    // The scatter is deterministic: two backward passes give the same bits.
    let t = table.to_device(dev, DType::BF16).unwrap().requires_grad();
    let seed = randn(&[ids.len(), 40], &mut rng).to_device(dev, DType::BF16).unwrap();
    let a = autograd::backward_with(&ops::gather_rows(&t, &ids).unwrap(), seed.clone()).unwrap();
    let b = autograd::backward_with(&ops::gather_rows(&t, &ids).unwrap(), seed).unwrap();
    assert_eq!(a.get(&t).unwrap().to_vec().unwrap(), b.get(&t).unwrap().to_vec().unwrap());
}
