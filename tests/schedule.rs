//! The flow-matching schedule against DiffSynth's scheduler (fixture made by
//! tests/reference/make_schedule_fixtures.py).
use synthos_engine::schedule::{next_sigma, sample_sigmas, TrainSchedule};

fn fixture() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedule/flow_match_wan.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: {g} vs reference {w}");
    }
}

#[test]
fn training_table_matches_the_reference() {
    let f = fixture();
    let s = TrainSchedule::new(5.0);
    // The reference computes in float32: agreement to its rounding.
    assert_close(&s.sigmas, &floats(&f["train"]["sigmas"]), 1e-6, "sigmas");
    assert_close(&s.timesteps, &floats(&f["train"]["timesteps"]), 1e-6, "timesteps");
    assert_close(&s.weights, &floats(&f["train"]["weights"]), 1e-5, "weights");
    let mean = s.weights.iter().sum::<f64>() / s.weights.len() as f64;
    assert!((mean - 1.0).abs() < 1e-9, "weights average to 1, got {mean}");
    let peak = s.weights.iter().cloned().fold(0.0, f64::max);
    assert!((peak - 2.08).abs() < 0.01, "peak {peak}");
    assert_eq!(s.at(0).0, 1.0);
}

#[test]
fn sampling_sigmas_and_euler_steps_match_the_reference() {
    let f = fixture();
    for steps in [25usize, 50] {
        let r = &f[format!("sample_{steps}")];
        let sig = sample_sigmas(steps, 5.0);
        assert_close(&sig, &floats(&r["sigmas"]), 1e-6, "sample sigmas");
        let mut x = [0.5f64, -1.25, 2.0];
        let v = [1.0f64, 0.25, -0.5];
        for (i, want) in r["euler_path"].as_array().unwrap().iter().enumerate() {
            let dt = next_sigma(&sig, i) - sig[i];
            for k in 0..3 {
                x[k] += v[k] * dt;
            }
            assert_close(&x, &floats(want), 1e-5, "euler path");
        }
        // The walk ends at sigma 0: x = x0 - v·1.
        assert!((x[0] - (0.5 - 1.0)).abs() < 1e-9);
    }
}
