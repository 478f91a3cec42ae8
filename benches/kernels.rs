//! Criterion benchmarks, one group per kernel family, on the best available device
//! (override with `SYNTHOS_BENCH_DEVICE=cpu|cuda:N`). Throughput is reported in bytes
//! (GB/s) for memory-bound cases and in FLOPs (as "elements") for compute-bound ones;
//! after each case the fraction of the measured device copy bandwidth / GEMM rate is
//! printed. The cases are those of `synthos-engine bench` (`synthos_engine::bench`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use synthos_engine::bench::{self, Bound, Size};
use synthos_engine::Device;

fn kernels(c: &mut Criterion) {
    let device = match std::env::var("SYNTHOS_BENCH_DEVICE") {
        Ok(s) => Device::parse(&s).expect("SYNTHOS_BENCH_DEVICE"),
        Err(_) => Device::best_available(),
    };
    let size = if device.is_cuda() { Size::Full } else { Size::Small };
    let cases = bench::cases(device, size).expect("building benchmark cases");
    let (mut copy_gbps, mut gemm_tflops) = (f64::NAN, f64::NAN);
    println!("{} on {device}", if device.is_cuda() { "GPU" } else { "CPU" });
    for mut case in cases {
        let mut group = c.benchmark_group(case.family);
        group.sample_size(10);
        match case.bound {
            Bound::Memory => group.throughput(Throughput::Bytes(case.bytes as u64)),
            Bound::Compute => group.throughput(Throughput::Elements(case.flops as u64)),
        };
        group.bench_function(&case.name, |b| {
            b.iter(|| {
                (case.run)().expect("benchmark case failed");
                bench::synchronize(device).expect("synchronize");
            })
        });
        group.finish();
        let secs = bench::time(device, 0.2, &mut case.run).expect("timing");
        let (gbps, tflops) = (case.bytes / secs / 1e9, case.flops / secs / 1e12);
        if case.family == "copy" {
            copy_gbps = gbps;
        }
        if case.name.starts_with("gemm") {
            gemm_tflops = tflops;
        }
        match case.bound {
            Bound::Memory => println!(
                "{} {}: {gbps:.1} GB/s = {:.1}% of the measured copy bandwidth ({copy_gbps:.1} GB/s)",
                if device.is_cuda() { "GPU" } else { "CPU" },
                case.name,
                100.0 * gbps / copy_gbps
            ),
            Bound::Compute => println!(
                "{} {}: {tflops:.2} TFLOP/s = {:.1}% of the measured GEMM rate ({gemm_tflops:.2} TFLOP/s)",
                if device.is_cuda() { "GPU" } else { "CPU" },
                case.name,
                100.0 * tflops / gemm_tflops
            ),
        }
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
