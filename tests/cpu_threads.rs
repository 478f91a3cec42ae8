//! The CPU ops give bit-identical results whatever the size of the rayon pool: each is
//! run under a 1-thread and a 3-thread pool on odd sizes large enough to be split into
//! several parallel chunks, and the outputs compared bit for bit.

use synthos_engine::cpu::{elementwise, norm, reduce, shape};
use synthos_engine::desc::RowNorm;
use synthos_engine::Rng;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a rayon pool")
}

/// Runs `f` under pools of 1 and 3 threads and asserts the results are bit-identical.
fn same_bits(what: &str, f: impl Fn() -> Vec<Vec<f32>> + Sync + Send) {
    let one = pool(1).install(&f);
    let three = pool(3).install(&f);
    assert_eq!(one.len(), three.len());
    for (k, (a, b)) in one.iter().zip(&three).enumerate() {
        assert_eq!(a.len(), b.len(), "{what}: output {k} length");
        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "{what}: output {k} differs in {differ} of {} elements", a.len());
    }
}

fn randn(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, 1.0)
}

#[test]
fn norms_are_thread_count_independent() {
    // 3 groups of 211 rows of 129: tasks end at group boundaries, not multiples of 32.
    let spec = RowNorm { rows: 633, d: 129, rows_per_group: 211, w_offset: 1.0, eps: 1e-6, rms: false };
    let (x, dy, w, b) = (randn(633 * 129, 1), randn(633 * 129, 2), randn(3 * 129, 3), randn(3 * 129, 4));
    same_bits("layer norm modulate", || {
        let (y, mean, rstd) = norm::forward(&x, Some(&w), Some(&b), &spec);
        let g = norm::backward(&x, &dy, Some(&w), &mean, &rstd, &spec);
        vec![y, mean, rstd, g.dx, g.dw, g.db]
    });
}

#[test]
fn elementwise_reductions_and_permutes_are_thread_count_independent() {
    let shape = [3usize, 67, 5, 97];
    let n: usize = shape.iter().product();
    let (x, y) = (randn(n, 5), randn(n, 6));
    let gate = randn(3 * 97, 7);
    let row = randn(97, 8);
    same_bits("elementwise", || {
        vec![
            x.iter().map(|&v| elementwise::gelu_tanh(v)).collect(),
            elementwise::binary(&x, &shape, &row, &[97], &shape, |a, b| a * b),
            elementwise::gated_residual(&x, &gate, &[3, 1, 1, 97], &y, &shape),
            reduce::sum_to(&x, &shape, &[1, 1, 1, 97]),
            reduce::sum_to(&x, &shape, &[3, 1, 5, 1]),
            reduce::sum_dim(&x, 3, 67 * 5, 97, 0.5),
            shape::permute(&x, &shape, &[0, 2, 1, 3]),
            shape::permute(&x, &shape, &[3, 1, 0, 2]),
        ]
    });
}

#[test]
fn gemm_tiles_are_thread_count_independent() {
    use synthos_engine::cpu::matmul::gemm;
    use synthos_engine::desc::Gemm;
    // Tall (cut into row bands), short and wide (cut into column bands), batched (cut by
    // batch or by rows), each with and without transposes and a bias: the tiles differ
    // between 1 and 3 threads, the results must not.
    let cases = [
        Gemm { batch: 1, m: 517, k: 129, n: 67, trans_a: false, trans_b: true },
        Gemm { batch: 1, m: 37, k: 203, n: 1031, trans_a: true, trans_b: false },
        Gemm { batch: 3, m: 301, k: 65, n: 97, trans_a: false, trans_b: false },
        Gemm { batch: 13, m: 70, k: 33, n: 71, trans_a: true, trans_b: true },
    ];
    for (i, g) in cases.iter().enumerate() {
        let (na, nb, _) = g.sizes();
        let (a, b, bias) = (randn(na, 20 + i as u64), randn(nb, 30 + i as u64), randn(g.n, 40 + i as u64));
        same_bits(&format!("gemm {g:?}"), || {
            vec![gemm(&a, &b, None, g).unwrap(), gemm(&a, &b, Some(&bias), g).unwrap()]
        });
    }
}

#[test]
fn adamw_and_sum_of_squares_are_thread_count_independent() {
    use synthos_engine::cpu::adamw;
    use synthos_engine::desc::AdamWStep;
    // Three chunks and a bit, so the update and the sum are split over the pool.
    let n = 3 * synthos_engine::cpu::par::CHUNK + 77;
    let (w0, g, m0, v0) = (randn(n, 9), randn(n, 10), randn(n, 11), randn(n, 12));
    let v0: Vec<f32> = v0.iter().map(|x| x.abs()).collect();
    let s = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        decay: 0.99,
        bias_correction1: 0.1,
        bias_correction2_sqrt: 0.05,
        grad_scale: 0.5,
    };
    same_bits("adamw", || {
        let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
        adamw::step(&mut w, &g, &mut m, &mut v, &s).unwrap();
        vec![w, m, v, vec![adamw::sum_squares(&g) as f32]]
    });
    // The parallel update equals the one-element rule applied in order.
    let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
    adamw::step(&mut w, &g, &mut m, &mut v, &s).unwrap();
    for i in (0..n).step_by(997) {
        let (mut mi, mut vi) = (m0[i], v0[i]);
        let wi = adamw::update(w0[i], &mut mi, &mut vi, g[i], &s);
        assert_eq!(
            (w[i].to_bits(), m[i].to_bits(), v[i].to_bits()),
            (wi.to_bits(), mi.to_bits(), vi.to_bits()),
            "element {i}"
        );
    }
    let exact: f64 = g.iter().map(|&x| x as f64 * x as f64).sum();
    let got = adamw::sum_squares(&g);
    assert!((got - exact).abs() <= 1e-12 * exact, "sum of squares {got} vs {exact}");
}

/// The row-at-a-time paths of the broadcast ops and the head-at-a-time path of RoPE give
/// exactly the per-element rule, on shapes of several chunks (each chunk takes the fast
/// path when it starts and ends on a row, the per-element walk otherwise).
#[test]
fn row_paths_equal_the_per_element_rule() {
    use synthos_engine::cpu::rope::rope;
    for d in [64usize, 24] {
        let shape = [3usize, 400, d];
        let n: usize = shape.iter().product();
        let (x, y) = (randn(n, 13), randn(n, 14));
        let (gate, row, col) = (randn(3 * d, 15), randn(d, 16), randn(3 * 400, 17));
        let gr = elementwise::gated_residual(&x, &gate, &[3, 1, d], &y, &shape);
        let mul = elementwise::binary(&x, &shape, &row, &[d], &shape, |a, b| a * b);
        let sub = elementwise::binary(&x, &shape, &col, &[3, 400, 1], &shape, |a, b| a - b);
        let outer = elementwise::binary(&col, &[3, 400, 1], &row, &[d], &shape, |a, b| a + b);
        for i in 0..n {
            let (b, c, r) = (i / (400 * d), i % d, i / d);
            assert_eq!(gr[i].to_bits(), (x[i] + gate[b * d + c] * y[i]).to_bits(), "gated residual d {d} at {i}");
            assert_eq!(mul[i].to_bits(), (x[i] * row[c]).to_bits(), "row product d {d} at {i}");
            assert_eq!(sub[i].to_bits(), (x[i] - col[r]).to_bits(), "column difference d {d} at {i}");
            assert_eq!(outer[i].to_bits(), (col[r] + row[c]).to_bits(), "outer sum d {d} at {i}");
        }
        // RoPE over [2, 100 tokens, 3 heads, d]: angles per (token, pair).
        let (tokens, heads, half) = (100, 3, d / 2);
        let xr = randn(2 * tokens * heads * d, 18);
        let (cos, sin) = (randn(tokens * half, 19), randn(tokens * half, 20));
        let out = rope(&xr, &cos, &sin, tokens, heads, d, -1.0);
        for e in (0..xr.len()).step_by(2) {
            let (t, j) = (e / d, (e % d) / 2);
            let tok = (t / heads) % tokens;
            let (c, s) = (cos[tok * half + j], -sin[tok * half + j]);
            let (a, b) = (xr[e], xr[e + 1]);
            assert_eq!(out[e].to_bits(), (a * c - b * s).to_bits(), "rope d {d} at {e}");
            assert_eq!(out[e + 1].to_bits(), (a * s + b * c).to_bits(), "rope d {d} at {}", e + 1);
        }
    }
}
