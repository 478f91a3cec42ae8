//! AdamW against the textbook formulas in f64, state save/restore, the global gradient
//! norm and clipping coefficient, and (with a GPU) the fused kernel against the CPU.
mod common;
use common::*;
use synthos_engine::optim::{clip_coefficient, grad_norm, AdamW, AdamWConfig};
use synthos_engine::{autograd, DType, Device, Gradients, Rng, Tensor};

/// Gradients holding exactly the given tensors for the given parameters (injected
/// through one recorded node, so any dtype or shape can be handed to the optimizer).
fn inject(pairs: &[(&Tensor, Tensor)]) -> Gradients {
    let params: Vec<&Tensor> = pairs.iter().map(|(p, _)| *p).collect();
    let grads: Vec<Tensor> = pairs.iter().map(|(_, g)| g.clone()).collect();
    let out = Tensor::scalar(0.0, Device::Cpu).unwrap();
    let out = autograd::record("inject", out, &params, Box::new(move |_| Ok(grads.into_iter().map(Some).collect())));
    autograd::backward_with(&out, Tensor::scalar(1.0, Device::Cpu).unwrap()).unwrap()
}

/// AdamW for one tensor from the formulas (PyTorch's algorithm), in f64.
struct Reference {
    w: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Reference {
    fn new(w: &[f32]) -> Self {
        Reference { w: w.iter().map(|&x| x as f64).collect(), m: vec![0.0; w.len()], v: vec![0.0; w.len()], t: 0 }
    }

    fn step(&mut self, g: &[f32], cfg: &AdamWConfig, lr: f32, decay: bool, scale: f32) {
        let (b1, b2, eps, lr) = (cfg.beta1 as f64, cfg.beta2 as f64, cfg.eps as f64, lr as f64);
        let wd = if decay { cfg.weight_decay as f64 } else { 0.0 };
        self.t += 1;
        for i in 0..self.w.len() {
            let g = g[i] as f64 * scale as f64;
            self.w[i] *= 1.0 - lr * wd;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let m_hat = self.m[i] / (1.0 - b1.powi(self.t));
            let v_hat = self.v[i] / (1.0 - b2.powi(self.t));
            self.w[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn state_of(opt: &AdamW, key: &str) -> Vec<f32> {
    let st = opt.state_tensors().unwrap();
    st.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no state {key}")).1.to_vec().unwrap()
}

#[test]
fn adamw_matches_the_formulas() {
    for wd in [0.0, 0.1] {
        // eps comparable to the gradients, so that a wrong grad_scale would show in the
        // weights and not only in the moments.
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-3, weight_decay: wd };
        let mut rng = Rng::new(31);
        let shapes: [&[usize]; 4] = [&[7, 13], &[13], &[5], &[3, 3]];
        let decays = [true, false, true, true];
        let params: Vec<Tensor> = shapes.iter().map(|s| randn(s, &mut rng).requires_grad()).collect();
        let initial: Vec<Vec<f32>> = params.iter().map(|p| p.to_vec().unwrap()).collect();
        let mut opt = AdamW::new(cfg);
        for (i, p) in params.iter().enumerate() {
            opt.add_param(&format!("p{i}"), p, decays[i]).unwrap();
        }
        let mut refs: Vec<Reference> = initial.iter().map(|w| Reference::new(w)).collect();
        let scale = 0.37;
        for step in 0..5 {
            let lr = 1e-2 * (1.0 + 0.25 * step as f32);
            // p2 never has a gradient; p3 only on even steps (its own bias correction).
            let mut pairs = Vec::new();
            for (i, p) in params.iter().enumerate() {
                if i == 2 || (i == 3 && step % 2 == 1) {
                    continue;
                }
                let g = Tensor::randn(p.shape(), 2e-3, &mut rng, Device::Cpu).unwrap();
                refs[i].step(&g.to_vec().unwrap(), &cfg, lr, decays[i], scale);
                pairs.push((p, g));
            }
            opt.step(&inject(&pairs), lr, scale).unwrap();
        }
        assert_eq!(opt.step_count(), 5);
        for (i, p) in params.iter().enumerate() {
            let what = format!("wd={wd} p{i}");
            assert_close(&p.to_vec().unwrap(), &f32s(&refs[i].w), 1e-6, 1e-5, &format!("{what} weights"));
            assert_close(
                &state_of(&opt, &format!("p{i}.exp_avg")),
                &f32s(&refs[i].m),
                1e-9,
                1e-5,
                &format!("{what} m"),
            );
            assert_close(
                &state_of(&opt, &format!("p{i}.exp_avg_sq")),
                &f32s(&refs[i].v),
                1e-12,
                1e-5,
                &format!("{what} v"),
            );
            assert_eq!(state_of(&opt, &format!("p{i}.step")), [refs[i].t as f32], "{what} step count");
        }
        assert_eq!(params[2].to_vec().unwrap(), initial[2], "a parameter without gradient is untouched");
        assert!(state_of(&opt, "p2.exp_avg").iter().all(|&x| x == 0.0));
        // f32 parameters are their own masters.
        assert!(opt.state_tensors().unwrap().iter().all(|(k, _)| !k.ends_with(".master")));
    }
}

#[test]
fn state_round_trip_continues_identically() {
    let cfg = AdamWConfig { weight_decay: 0.05, ..Default::default() };
    let mut rng = Rng::new(32);
    let shapes: [&[usize]; 3] = [&[11, 7], &[7], &[3]];
    let pa: Vec<Tensor> = shapes.iter().map(|s| randn(s, &mut rng).requires_grad()).collect();
    let mut a = AdamW::new(cfg);
    for (i, p) in pa.iter().enumerate() {
        a.add_param(&format!("w{i}"), p, i == 0).unwrap();
    }
    let grads: Vec<Vec<Tensor>> = (0..5).map(|_| shapes.iter().map(|s| randn(s, &mut rng)).collect()).collect();
    let step = |opt: &mut AdamW, ps: &[Tensor], gs: &[Tensor], with_last: bool| {
        let n = if with_last { ps.len() } else { ps.len() - 1 };
        let pairs: Vec<(&Tensor, Tensor)> = ps.iter().zip(gs).take(n).map(|(p, g)| (p, g.clone())).collect();
        opt.step(&inject(&pairs), 3e-3, 0.5).unwrap();
    };
    for (k, gs) in grads[..3].iter().enumerate() {
        step(&mut a, &pa, gs, k != 1);
    }
    // Save (copied, as a checkpoint would) and restore into a fresh optimizer over
    // fresh copies of the parameters.
    let saved: Vec<(String, Tensor)> =
        a.state_tensors().unwrap().into_iter().map(|(k, t)| (k, t.deep_copy().unwrap())).collect();
    let pb: Vec<Tensor> = pa.iter().map(|p| p.deep_copy().unwrap().requires_grad()).collect();
    let mut b = AdamW::new(cfg);
    for (i, p) in pb.iter().enumerate() {
        b.add_param(&format!("w{i}"), p, i == 0).unwrap();
    }
    b.load_state(&saved).unwrap();
    assert_eq!(b.step_count(), 3);
    for gs in &grads[3..] {
        step(&mut a, &pa, gs, true);
        step(&mut b, &pb, gs, true);
    }
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap(), "restored run diverged");
    }
    for ((ka, ta), (kb, tb)) in a.state_tensors().unwrap().iter().zip(&b.state_tensors().unwrap()) {
        assert_eq!(ka, kb);
        assert_eq!(ta.to_vec().unwrap(), tb.to_vec().unwrap(), "state {ka}");
    }
}

#[test]
fn bad_state_and_parameters_are_errors() {
    let mut rng = Rng::new(33);
    let p = randn(&[4, 3], &mut rng).requires_grad();
    let q = randn(&[5], &mut rng).requires_grad();
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_param("p", &p, true).unwrap();
    opt.add_param("q", &q, false).unwrap();
    let e = opt.add_param("p", &randn(&[2], &mut rng), true).unwrap_err().to_string();
    assert!(e.contains("\"p\"") && e.contains("already"), "{e}");
    let e = opt.add_param("p2", &p, true).unwrap_err().to_string();
    assert!(e.contains("same tensor"), "{e}");

    opt.step(&inject(&[(&p, randn(&[4, 3], &mut rng)), (&q, randn(&[5], &mut rng))]), 1e-3, 1.0).unwrap();
    let good = opt.state_tensors().unwrap();
    let before: Vec<Vec<f32>> = good.iter().map(|(_, t)| t.to_vec().unwrap()).collect();
    let missing: Vec<_> = good.iter().filter(|(k, _)| k != "q.exp_avg_sq").cloned().collect();
    let e = opt.load_state(&missing).unwrap_err().to_string();
    assert!(e.contains("missing") && e.contains("q.exp_avg_sq"), "{e}");
    let mut extra = good.clone();
    extra.push(("r.exp_avg".into(), randn(&[2], &mut rng)));
    let e = opt.load_state(&extra).unwrap_err().to_string();
    assert!(e.contains("unexpected") && e.contains("r.exp_avg"), "{e}");
    let mut misshaped: Vec<_> = good.iter().filter(|(k, _)| k != "p.exp_avg").cloned().collect();
    misshaped.push(("p.exp_avg".into(), Tensor::zeros(&[3, 4], DType::F32, Device::Cpu).unwrap()));
    let e = opt.load_state(&misshaped).unwrap_err().to_string();
    assert!(e.contains("p.exp_avg") && e.contains("[3, 4]") && e.contains("[4, 3]"), "{e}");
    let after: Vec<Vec<f32>> = opt.state_tensors().unwrap().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
    assert_eq!(before, after, "failed loads change nothing");

    let pv = p.to_vec().unwrap();
    let e = opt.step(&inject(&[(&p, randn(&[12], &mut rng))]), 1e-3, 1.0).unwrap_err().to_string();
    assert!(e.contains("gradient of p") && e.contains("[12]") && e.contains("[4, 3]"), "{e}");
    assert_eq!(p.to_vec().unwrap(), pv, "a rejected step changes nothing");
    assert_eq!(opt.step_count(), 1);
}

/// The batched update refuses items that share a tensor (the GPU path would lock it twice),
/// naming the item, and changes nothing.
#[test]
fn batched_update_rejects_shared_tensors() {
    use synthos_engine::desc::AdamWStep;
    use synthos_engine::ops::{adamw_update_many, AdamWItem, AdamWWeights};
    let mut rng = Rng::new(36);
    let (w0, w1) = (randn(&[6], &mut rng), randn(&[6], &mut rng));
    let zeros = || Tensor::zeros(&[6], DType::F32, Device::Cpu).unwrap();
    let (m0, v0, m1, v1) = (zeros(), zeros(), zeros(), zeros());
    let g = randn(&[6], &mut rng);
    let s = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        decay: 1.0,
        bias_correction1: 0.1,
        bias_correction2_sqrt: 0.03,
        grad_scale: 1.0,
    };
    let item = |w, m, v, g| AdamWItem { weights: AdamWWeights::Plain(w), exp_avg: m, exp_avg_sq: v, grad: g, s };
    let before = w0.to_vec().unwrap();
    let e = adamw_update_many(&[item(&w0, &m0, &v0, &g), item(&w1, &m1, &v1, &g)]).unwrap_err().to_string();
    assert!(e.contains("item 1"), "{e}");
    assert_eq!(w0.to_vec().unwrap(), before, "nothing changes");
    // Distinct tensors: the same results as one update each.
    let (g1, w0c, w1c) = (randn(&[6], &mut rng), w0.deep_copy().unwrap(), w1.deep_copy().unwrap());
    adamw_update_many(&[item(&w0, &m0, &v0, &g), item(&w1, &m1, &v1, &g1)]).unwrap();
    let (m2, v2, m3, v3) = (zeros(), zeros(), zeros(), zeros());
    synthos_engine::ops::adamw_update(&item(&w0c, &m2, &v2, &g)).unwrap();
    synthos_engine::ops::adamw_update(&item(&w1c, &m3, &v3, &g1)).unwrap();
    assert_eq!(w0.to_vec().unwrap(), w0c.to_vec().unwrap());
    assert_eq!(w1.to_vec().unwrap(), w1c.to_vec().unwrap());
}

#[test]
fn grad_norm_and_clipping() {
    let mut rng = Rng::new(34);
    let params: Vec<Tensor> = [&[7, 13][..], &[5], &[3]].iter().map(|s| randn(s, &mut rng).requires_grad()).collect();
    let g0 = randn(&[7, 13], &mut rng);
    let g1 = randn(&[5], &mut rng);
    let grads = inject(&[(&params[0], g0.clone()), (&params[1], g1.clone())]);
    let direct: f64 =
        g0.to_vec().unwrap().iter().chain(&g1.to_vec().unwrap()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    let norm = grad_norm(&grads, &params).unwrap();
    assert!((norm as f64 - direct).abs() <= 1e-6 * direct, "{norm} vs {direct}");
    assert_eq!(grad_norm(&grads, &params[2..]).unwrap(), 0.0, "no gradients: norm 0");
    let mut opt = AdamW::new(AdamWConfig::default());
    for (i, p) in params.iter().enumerate() {
        opt.add_param(&format!("p{i}"), p, true).unwrap();
    }
    assert_eq!(opt.grad_norm(&grads).unwrap(), norm);

    let c = clip_coefficient(norm, 1.0);
    assert!((c as f64 - 1.0 / (direct + 1e-6)).abs() < 1e-6, "{c}");
    assert_eq!(clip_coefficient(0.5, 1.0), 1.0, "small norms are not scaled up");
    assert!(clip_coefficient(f32::NAN, 1.0).is_nan());
}

/// The update queued behind a step's gate (`ops::step_gate` on the device, then
/// `AdamW::update_params_gated`) equals, bit for bit, the update with the clip coefficient
/// computed on the host from the same norm, with clipping and without; a loss or a
/// gradient that is not finite makes the gate NaN and leaves every weight and moment as
/// it was, and after `rewind_params` the next step is the one the other optimizer takes.
/// On `dev` in `dtype` (bf16 parameters keep fp32 or split masters on a GPU).
fn check_gated_update(dev: Device, dtype: DType) {
    use synthos_engine::ops::{step_gate, sum_squares_tensor};
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.995, eps: 1e-6, weight_decay: 0.1 };
    let mut rng = Rng::new(47);
    let shapes: [&[usize]; 3] = [&[7, 13], &[1003], &[3]];
    let (mut gated, mut plain) = (AdamW::new(cfg), AdamW::new(cfg));
    let mut params = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let a = randn(shape, &mut rng).to_device(dev, dtype).unwrap();
        let b = a.deep_copy().unwrap();
        gated.add_param(&format!("p{i}"), &a, i != 1).unwrap();
        plain.add_param(&format!("p{i}"), &b, i != 1).unwrap();
        params.push((a, b));
    }
    let snapshot = |o: &AdamW| -> Vec<(String, Vec<u32>)> {
        let mut v: Vec<(String, Vec<u32>)> = o
            .state_tensors()
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect()))
            .collect();
        v.extend(
            o.params()
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("param {i}"), p.to_vec().unwrap().iter().map(|x| x.to_bits()).collect())),
        );
        v
    };
    let scalar = |x: f32| Tensor::scalar(x, dev).unwrap().to_device(dev, DType::F32).unwrap();
    let indices = [0usize, 1, 2];
    for (step, (max_norm, loss, bad_grad)) in [
        (Some(0.5f32), 1.5f32, false),
        (None, 2.0, false),
        (Some(0.5), f32::NAN, false),
        (Some(1e6), 0.5, true),
        (Some(3.0), 0.25, false),
    ]
    .into_iter()
    .enumerate()
    {
        let grads: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let mut g = randn(s, &mut rng).to_vec().unwrap();
                if bad_grad && k == 1 {
                    g[17] = f32::INFINITY;
                }
                Tensor::from_vec(g, s, Device::Cpu).unwrap().to_device(dev, dtype).unwrap()
            })
            .collect();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let squares = sum_squares_tensor(&refs).unwrap();
        let gate = step_gate(&squares, &scalar(loss), max_norm).unwrap();
        let norm = squares.item().unwrap().sqrt();
        let finite = loss.is_finite() && norm.is_finite();
        let want = max_norm.map_or(1.0, |m| clip_coefficient(norm, m));
        let what = format!("{dev} {dtype} step {step} (max_norm {max_norm:?}, loss {loss}, bad grad {bad_grad})");
        let g = gate.item().unwrap();
        if finite {
            assert_eq!(g.to_bits(), want.to_bits(), "{what}: gate {g}, clip coefficient {want}");
        } else {
            assert!(g.is_nan(), "{what}: gate {g}");
        }
        let items: Vec<(usize, &Tensor)> = indices.iter().copied().zip(&grads).collect();
        let before = snapshot(&gated);
        gated.update_params_gated(&items, 1e-2, &gate).unwrap();
        if !finite {
            gated.rewind_params(&indices);
            for ((k, a), (_, b)) in snapshot(&gated).iter().zip(&before) {
                assert!(a == b, "{what}: a NaN gate changed {k}");
            }
            continue;
        }
        plain.update_params(&items, 1e-2, want).unwrap();
        gated.end_step();
        plain.end_step();
        let (a, b) = (snapshot(&gated), snapshot(&plain));
        for ((ka, va), (_, vb)) in a.iter().zip(&b) {
            assert!(va == vb, "{what}: {ka} differs from the host-scaled update");
        }
        assert!(a != before, "{what}: the step updated nothing");
    }
}

#[test]
fn gated_update_is_the_host_scaled_update() {
    check_gated_update(Device::Cpu, DType::F32);
    // The gate's own errors.
    let one = Tensor::scalar(1.0, Device::Cpu).unwrap();
    let e = synthos_engine::ops::step_gate(&one, &one, Some(0.0)).unwrap_err().to_string();
    assert!(e.contains("clipping norm 0"), "{e}");
    let two = Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
    let e = synthos_engine::ops::step_gate(&two, &one, None).unwrap_err().to_string();
    assert!(e.contains("one value each"), "{e}");
}

#[test]
fn gpu_gated_update_is_the_host_scaled_update() {
    let Some(dev) = gpu() else { return };
    use synthos_engine::cuda::adamw::{with_multi_tensor, with_split_masters};
    for multi in [false, true] {
        with_multi_tensor(multi, || {
            check_gated_update(dev, DType::F32);
            check_gated_update(dev, DType::BF16);
            with_split_masters(true, || check_gated_update(dev, DType::BF16));
        });
    }
}

// ---------------------------------------------------------------- GPU vs CPU

/// One GPU parameter and its CPU mirror holding the same initial values.
fn gpu_param(shape: &[usize], dtype: DType, dev: Device, rng: &mut Rng) -> (Tensor, Tensor) {
    let g = randn(shape, rng).to_device(dev, dtype).unwrap().requires_grad();
    let c = g.to_device(Device::Cpu, DType::F32).unwrap().requires_grad();
    (g, c)
}

#[test]
fn gpu_adamw_matches_cpu() {
    let Some(dev) = gpu() else { return };
    check_adamw_matches_cpu(dev);
}

/// [`gpu_adamw_matches_cpu`] with the multi-tensor launches (`SYNTHOS_CUDA_MULTI_TENSOR=1`).
#[test]
fn gpu_adamw_matches_cpu_multi_tensor() {
    let Some(dev) = gpu() else { return };
    synthos_engine::cuda::adamw::with_multi_tensor(true, || check_adamw_matches_cpu(dev));
}

fn check_adamw_matches_cpu(dev: Device) {
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.995, eps: 1e-6, weight_decay: 0.1 };
    let mut rng = Rng::new(41);
    // (parameter dtype, gradient dtype, shape): sizes with a scalar tail, below one
    // vector, and several blocks.
    let cases: [(DType, DType, &[usize]); 6] = [
        (DType::BF16, DType::BF16, &[77, 131]),
        (DType::BF16, DType::F32, &[1003]),
        (DType::F32, DType::F32, &[77, 131]),
        (DType::F32, DType::BF16, &[5]),
        (DType::BF16, DType::BF16, &[3]),
        (DType::F32, DType::F32, &[8 * 4099 + 5]),
    ];
    let (mut gpu_opt, mut cpu_opt) = (AdamW::new(cfg), AdamW::new(cfg));
    let mut pairs = Vec::new();
    for (i, (pd, _, shape)) in cases.iter().enumerate() {
        let (g, c) = gpu_param(shape, *pd, dev, &mut rng);
        gpu_opt.add_param(&format!("p{i}"), &g, i % 2 == 0).unwrap();
        cpu_opt.add_param(&format!("p{i}"), &c, i % 2 == 0).unwrap();
        pairs.push((g, c));
    }
    let (frozen_g, frozen_c) = gpu_param(&[9, 9], DType::BF16, dev, &mut rng);
    gpu_opt.add_param("frozen", &frozen_g, true).unwrap();
    cpu_opt.add_param("frozen", &frozen_c, true).unwrap();
    let frozen_before = frozen_g.to_vec().unwrap();
    for step in 0..5 {
        let lr = 1e-2 / (1.0 + step as f32);
        let mut gg = Vec::new();
        let mut gc = Vec::new();
        for ((g, c), (_, gd, shape)) in pairs.iter().zip(&cases) {
            let grad = Tensor::randn(shape, 0.1, &mut rng, Device::Cpu).unwrap().to_device(dev, *gd).unwrap();
            gc.push((c, grad.to_device(Device::Cpu, DType::F32).unwrap()));
            gg.push((g, grad));
        }
        gpu_opt.step(&inject(&gg), lr, 0.7).unwrap();
        cpu_opt.step(&inject(&gc), lr, 0.7).unwrap();
    }
    let gst = gpu_opt.state_tensors().unwrap();
    let get = |k: &str| gst.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone());
    for (i, ((g, c), (pd, gd, _))) in pairs.iter().zip(&cases).enumerate() {
        let what = format!("p{i} ({pd} param, {gd} grad)");
        let want = c.to_vec().unwrap();
        let master = match pd {
            DType::BF16 => get(&format!("p{i}.master")).expect("bf16 parameters have a master"),
            DType::F32 => {
                assert!(get(&format!("p{i}.master")).is_none(), "{what}: f32 is its own master");
                g.clone()
            }
        };
        assert_eq!(master.dtype(), DType::F32);
        let mv = master.to_vec().unwrap();
        assert_close(&mv, &want, 1e-6, 1e-5, &format!("{what}: master"));
        for k in ["exp_avg", "exp_avg_sq"] {
            let key = format!("p{i}.{k}");
            let cpu_state = cpu_opt.state_tensors().unwrap().into_iter().find(|(n, _)| *n == key).unwrap().1;
            // The moments sum terms of either sign over the steps, so a value can be far
            // smaller than its terms: the allowed error scales with the state's magnitude
            // (fp32 rounding of terms that size, in another order and with FMA on the GPU).
            let want_state = cpu_state.to_vec().unwrap();
            let scale = want_state.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(
                &get(&key).unwrap().to_vec().unwrap(),
                &want_state,
                1e-6 * scale,
                1e-5,
                &format!("{what}: {k}"),
            );
        }
        if *pd == DType::BF16 {
            let rounded: Vec<f32> = mv.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
            assert_eq!(g.to_vec().unwrap(), rounded, "{what}: the bf16 copy is the rounded master");
        }
    }
    assert_eq!(frozen_g.to_vec().unwrap(), frozen_before, "a parameter without gradient is untouched");
    assert_eq!(get("frozen.master").unwrap().to_vec().unwrap(), frozen_before);

    // Restoring the state into a fresh GPU optimizer rewrites the bf16 copy from the master.
    let saved: Vec<(String, Tensor)> =
        gst.iter().map(|(k, t)| (k.clone(), t.to_device(Device::Cpu, DType::F32).unwrap())).collect();
    let mut restored = AdamW::new(cfg);
    let fresh: Vec<Tensor> =
        pairs.iter().map(|(g, _)| Tensor::zeros(g.shape(), g.dtype(), dev).unwrap().requires_grad()).collect();
    for (i, p) in fresh.iter().enumerate() {
        restored.add_param(&format!("p{i}"), p, i % 2 == 0).unwrap();
    }
    restored.add_param("frozen", &Tensor::zeros(&[9, 9], DType::BF16, dev).unwrap().requires_grad(), true).unwrap();
    restored.load_state(&saved).unwrap();
    assert_eq!(fresh[0].to_vec().unwrap(), pairs[0].0.to_vec().unwrap(), "restored bf16 parameter");
}

#[test]
fn gpu_grad_norm_matches_cpu() {
    let Some(dev) = gpu() else { return };
    check_grad_norm_matches_cpu(dev);
}

/// [`gpu_grad_norm_matches_cpu`] with the multi-tensor launches (`SYNTHOS_CUDA_MULTI_TENSOR=1`).
#[test]
fn gpu_grad_norm_matches_cpu_multi_tensor() {
    let Some(dev) = gpu() else { return };
    synthos_engine::cuda::adamw::with_multi_tensor(true, || check_grad_norm_matches_cpu(dev));
}

fn check_grad_norm_matches_cpu(dev: Device) {
    let mut rng = Rng::new(42);
    let specs: [(&[usize], DType); 4] =
        [(&[1_000_003], DType::BF16), (&[77, 131], DType::F32), (&[5], DType::BF16), (&[300], DType::F32)];
    let params: Vec<Tensor> = specs
        .iter()
        .map(|(s, d)| Tensor::zeros(s, *d, dev).unwrap().requires_grad())
        .chain([Tensor::zeros(&[4], DType::BF16, dev).unwrap().requires_grad()])
        .collect();
    let grads: Vec<Tensor> = specs.iter().map(|(s, d)| randn(s, &mut rng).to_device(dev, *d).unwrap()).collect();
    let pairs: Vec<(&Tensor, Tensor)> = params.iter().zip(grads.iter().cloned()).collect();
    let g = inject(&pairs);
    let direct: f64 =
        grads.iter().flat_map(|t| t.to_vec().unwrap()).map(|x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    let norm = grad_norm(&g, &params).unwrap();
    assert!((norm as f64 - direct).abs() <= 1e-5 * direct, "GPU norm {norm} vs {direct}");
    assert_eq!(grad_norm(&g, &params).unwrap().to_bits(), norm.to_bits(), "deterministic");
}

/// The split of fp32 master bits: the high half rounded to nearest with ties away from
/// zero (a NaN keeps a NaN high half), as kernels/adamw.cu defines it.
fn split_high_half(master: f32) -> u16 {
    let m = master.to_bits();
    if master.is_nan() {
        ((m >> 16) | 0x40) as u16
    } else {
        ((m >> 16) + u32::from(m & 0xFFFF >= 0x8000)) as u16
    }
}

/// Split masters (`SYNTHOS_CUDA_SPLIT_MASTER=1`) make the same updates as fp32 masters:
/// after several steps the masters and moments are equal bit for bit, each bf16 parameter
/// is its master's high half rounded, and a saved state restores into a fresh optimizer.
#[test]
fn gpu_split_masters_match_fp32_masters() {
    let Some(dev) = gpu() else { return };
    for multi in [false, true] {
        synthos_engine::cuda::adamw::with_multi_tensor(multi, || check_split_masters(dev));
    }
}

fn check_split_masters(dev: Device) {
    use synthos_engine::cuda::adamw::with_split_masters;
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.995, eps: 1e-6, weight_decay: 0.1 };
    let mut rng = Rng::new(43);
    let cases: [(DType, &[usize]); 4] =
        [(DType::BF16, &[77, 131]), (DType::F32, &[1003]), (DType::BF16, &[8 * 4099 + 5]), (DType::BF16, &[3])];
    let (mut full, mut split) = (AdamW::new(cfg), AdamW::new(cfg));
    let mut params = Vec::new();
    for (i, (gd, shape)) in cases.iter().enumerate() {
        let a = randn(shape, &mut rng).to_device(dev, DType::BF16).unwrap().requires_grad();
        let b = a.deep_copy().unwrap().requires_grad();
        full.add_param(&format!("p{i}"), &a, i % 2 == 0).unwrap();
        with_split_masters(true, || split.add_param(&format!("p{i}"), &b, i % 2 == 0)).unwrap();
        params.push((a, b, *gd));
    }
    for step in 0..6 {
        let lr = 3e-2 / (1.0 + step as f32);
        let (mut ga, mut gb) = (Vec::new(), Vec::new());
        for (a, b, gd) in &params {
            let g = Tensor::randn(a.shape(), 0.1, &mut rng, Device::Cpu).unwrap().to_device(dev, *gd).unwrap();
            ga.push((a, g.clone()));
            gb.push((b, g));
        }
        full.step(&inject(&ga), lr, 0.7).unwrap();
        split.step(&inject(&gb), lr, 0.7).unwrap();
    }
    let (sf, ss) = (full.state_tensors().unwrap(), split.state_tensors().unwrap());
    let bits = |t: &Tensor| t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for ((kf, tf), (ks, ts)) in sf.iter().zip(&ss) {
        assert_eq!(kf, ks);
        assert_eq!(bits(tf), bits(ts), "{kf}: equal bit for bit (multi-tensor {})", cuda_multi());
    }
    for (i, (_, b, _)) in params.iter().enumerate() {
        let master = ss.iter().find(|(k, _)| *k == format!("p{i}.master")).unwrap().1.to_vec().unwrap();
        let want: Vec<u32> = master.iter().map(|&m| (split_high_half(m) as u32) << 16).collect();
        assert_eq!(bits(b), want, "p{i}: the parameter is the master's rounded high half");
    }
    // A restored split optimizer rewrites each parameter from its master.
    let saved: Vec<(String, Tensor)> =
        ss.iter().map(|(k, t)| (k.clone(), t.to_device(Device::Cpu, DType::F32).unwrap())).collect();
    let fresh: Vec<Tensor> =
        params.iter().map(|(a, _, _)| Tensor::zeros(a.shape(), DType::BF16, dev).unwrap().requires_grad()).collect();
    let mut restored = AdamW::new(cfg);
    for (i, p) in fresh.iter().enumerate() {
        with_split_masters(true, || restored.add_param(&format!("p{i}"), p, i % 2 == 0)).unwrap();
    }
    restored.load_state(&saved).unwrap();
    for (i, (p, (_, b, _))) in fresh.iter().zip(&params).enumerate() {
        assert_eq!(bits(p), bits(b), "p{i}: restored parameter");
    }
    let rs = restored.state_tensors().unwrap();
    for ((k, a), (_, b)) in ss.iter().zip(&rs) {
        assert_eq!(bits(a), bits(b), "{k}: restored state");
    }
    // Clamping goes through the joined master and splits the result back.
    restored.clamp_param("p3", -0.05, 0.05).unwrap();
    let master = restored.state_tensors().unwrap().into_iter().find(|(k, _)| k == "p3.master").unwrap().1;
    let mv = master.to_vec().unwrap();
    assert!(mv.iter().all(|v| (-0.05..=0.05).contains(v)), "clamped master {mv:?}");
    let want: Vec<u32> = mv.iter().map(|&m| (split_high_half(m) as u32) << 16).collect();
    assert_eq!(bits(&fresh[3]), want, "the clamped parameter is its master's high half");
}

fn cuda_multi() -> bool {
    synthos_engine::cuda::adamw::multi_tensor().unwrap()
}

/// Split masters are a GPU form: the CPU's parameters are f32, their own masters, and the
/// ops that join and split say so.
#[test]
fn split_masters_live_on_gpus_only() {
    assert!(!synthos_engine::ops::split_masters(Device::Cpu).unwrap());
    let p = Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
    let e = synthos_engine::ops::master_join(&p, &p).unwrap_err().to_string();
    assert!(e.contains("master_join") && e.contains("bf16"), "{e}");
    let e = synthos_engine::ops::master_split(&p, &p, &p).unwrap_err().to_string();
    assert!(e.contains("master_split"), "{e}");
    assert_eq!(split_high_half(f32::from_bits(0x3F80_8000)), 0x3F81, "a tie rounds away from zero");
    assert_eq!(split_high_half(f32::from_bits(0xBF80_7FFF)), 0xBF80);
    assert_eq!(split_high_half(f32::from_bits(0x7F7F_FFFF)), 0x7F80, "past the largest bf16: inf");
}
