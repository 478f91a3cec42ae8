//! The CPU single-precision GEMM (`cpu::sgemm`) against a plain f64 triple loop: every
//! combination of transposed operands, the three ways of combining with C (overwrite,
//! bias, accumulate), `alpha`, padded rows of C, depths that are not a multiple of the
//! packing block, and sizes that leave partial register tiles on both edges. Where the CPU
//! has AVX-512 this tests the engine's packed kernel; `fallback_path_agrees` runs the
//! `matrixmultiply` path in a child process (`SYNTHOS_CPU_GEMM=fallback`) on the same cases,
//! and `sgemm_uninit` (a fresh output buffer) is checked to write every element.

use std::mem::MaybeUninit;

use synthos_engine::cpu::sgemm::{sgemm, sgemm_uninit, Init, Mat, KC, MR, NR};
use synthos_engine::Rng;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, 1.0)
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Zero,
    Bias,
    Accumulate,
}

/// Runs one case and returns the largest error relative to the size of the terms.
#[allow(clippy::too_many_arguments)]
fn check(m: usize, k: usize, n: usize, ta: bool, tb: bool, mode: Mode, alpha: f32, parallel: bool) -> f64 {
    let ldc = n + 3;
    let seed = (m * 131 + k * 17 + n) as u64;
    let a = randn(m * k, seed);
    let b = randn(k * n, seed + 1);
    let bias = randn(n, seed + 2);
    let c0 = randn(m * ldc, seed + 3);
    let am = if ta { Mat::rows(&a, m).t() } else { Mat::rows(&a, k) };
    let bm = if tb { Mat::rows(&b, k).t() } else { Mat::rows(&b, n) };
    let init = match mode {
        Mode::Zero => Init::Zero,
        Mode::Bias => Init::Bias(&bias),
        Mode::Accumulate => Init::Accumulate,
    };
    let mut c = c0.clone();
    sgemm(m, k, n, alpha, am, bm, init, &mut c, ldc, parallel);
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..ldc {
            let got = c[i * ldc + j] as f64;
            if j >= n {
                assert_eq!(got, c0[i * ldc + j] as f64, "{m}x{k}x{n}: padding column {j} of row {i} was written");
                continue;
            }
            let (mut sum, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let x = a[if ta { p * m + i } else { i * k + p }] as f64;
                let y = b[if tb { j * k + p } else { p * n + j }] as f64;
                sum += x * y;
                mag += (x * y).abs();
            }
            let mut want = alpha as f64 * sum;
            match mode {
                Mode::Zero => {}
                Mode::Bias => want += bias[j] as f64,
                Mode::Accumulate => want += c0[i * ldc + j] as f64,
            }
            let err = (got - want).abs() / (alpha.abs() as f64 * mag + 1.0);
            worst = worst.max(err);
        }
    }
    worst
}

/// Sizes around the tile and block edges.
fn shapes() -> Vec<(usize, usize, usize)> {
    vec![
        (1, 1, 1),
        (MR - 1, 3, NR - 1),
        (MR + 1, 17, NR + 1),
        (2 * MR + 5, 33, 3 * NR + 7),
        (37, KC + 5, 45),
        (70, 2 * KC + 33, 65),
        (130, 64, 300),
        (257, 129, 97),
        (5, 700, 3),
    ]
}

#[test]
fn sgemm_matches_f64_on_odd_shapes_transposes_and_modes() {
    for (m, k, n) in shapes() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for (mode, alpha) in [(Mode::Zero, 1.0), (Mode::Bias, 1.0), (Mode::Accumulate, 0.37), (Mode::Zero, -2.5)] {
                for parallel in [false, true] {
                    let err = check(m, k, n, ta, tb, mode, alpha, parallel);
                    assert!(
                        err < 1e-6,
                        "{m}x{k}x{n} ta {ta} tb {tb} {mode:?} alpha {alpha} parallel {parallel}: error {err:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn zero_depth_leaves_only_the_init() {
    let (m, n, ldc) = (3, 5, 6);
    let bias = [1.0, 2.0, 3.0, 4.0, 5.0];
    let empty: [f32; 0] = [];
    for (init, want) in [(Init::Zero, 0.0f32), (Init::Bias(&bias), f32::NAN), (Init::Accumulate, 7.0)] {
        let mut c = vec![7.0f32; m * ldc];
        sgemm(m, 0, n, 1.0, Mat::rows(&empty, 0), Mat::rows(&empty, n), init, &mut c, ldc, true);
        for i in 0..m {
            for j in 0..n {
                let expect = if want.is_nan() { bias[j] } else { want };
                assert_eq!(c[i * ldc + j], expect, "{init:?} ({i}, {j})");
            }
            assert_eq!(c[i * ldc + n], 7.0, "padding");
        }
    }
}

#[test]
fn results_do_not_depend_on_the_pool_size() {
    let (m, k, n) = (301, 2 * KC + 9, 203);
    let (a, b, bias) = (randn(m * k, 1), randn(k * n, 2), randn(n, 3));
    let run = || {
        let mut c = vec![0f32; m * n];
        sgemm(m, k, n, 1.0, Mat::rows(&a, k), Mat::rows(&b, k).t(), Init::Bias(&bias), &mut c, n, true);
        c
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
    for threads in [2, 3, 5] {
        let many = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(run);
        let differ = one.iter().zip(&many).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "{threads} threads: {differ} elements differ from 1 thread");
    }
}

/// `sgemm_uninit` writes every element of its window (a buffer poisoned with NaN comes
/// back free of them, equal to `sgemm`'s result) and nothing outside it.
#[test]
fn uninit_output_is_fully_written() {
    for (m, k, n) in [(1, 1, 1), (MR + 1, 0, NR + 3), (29, 37, 41), (130, KC + 1, 70)] {
        let (a, b, bias) = (randn(m * k, 4), randn(k * n, 5), randn(n, 6));
        let ldc = n + 2;
        for parallel in [false, true] {
            for init in [Init::Zero, Init::Bias(&bias)] {
                let mut want = vec![0f32; m * ldc];
                sgemm(m, k, n, 1.0, Mat::rows(&a, k), Mat::rows(&b, n), init, &mut want, ldc, parallel);
                let mut c = vec![MaybeUninit::new(f32::NAN); m * ldc];
                sgemm_uninit(m, k, n, Mat::rows(&a, k), Mat::rows(&b, n), init, &mut c, ldc, parallel);
                for (i, (got, want)) in c.iter().zip(&want).enumerate() {
                    // SAFETY: every element was initialised (to NaN) before the call.
                    let got = unsafe { got.assume_init() };
                    if i % ldc < n {
                        assert_eq!(got.to_bits(), want.to_bits(), "{m}x{k}x{n} {init:?}: element {i}");
                    } else {
                        assert!(got.is_nan(), "{m}x{k}x{n}: padding element {i} was written");
                    }
                }
            }
        }
    }
}

#[test]
#[should_panic(expected = "cannot be accumulated")]
fn uninit_output_refuses_accumulate() {
    let (a, b) = (vec![1f32; 4], vec![1f32; 4]);
    let mut c = vec![MaybeUninit::new(0f32); 4];
    sgemm_uninit(2, 2, 2, Mat::rows(&a, 2), Mat::rows(&b, 2), Init::Accumulate, &mut c, 2, false);
}

#[test]
#[should_panic(expected = "does not lie inside")]
fn an_operand_outside_its_slice_is_refused() {
    let a = vec![0f32; 10];
    let b = vec![0f32; 12];
    let mut c = vec![0f32; 12];
    sgemm(3, 4, 4, 1.0, Mat::rows(&a, 4), Mat::rows(&b, 4), Init::Zero, &mut c, 4, false);
}

/// The `matrixmultiply` path passes the same checks (run in a child process, since the
/// path is chosen once per process).
#[test]
fn fallback_path_agrees() {
    if std::env::var("SYNTHOS_CPU_GEMM").is_ok() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "sgemm_matches_f64_on_odd_shapes_transposes_and_modes",
            "uninit_output_is_fully_written",
            "--test-threads",
            "1",
        ])
        .env("SYNTHOS_CPU_GEMM", "fallback")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fallback run failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("2 passed"), "the fallback run did not run both tests:\n{text}");
}
