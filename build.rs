//! Compiles every `kernels/*.cu` into a fatbin (sm_80 and sm_90a machine code plus
//! compute_80 PTX) and embeds them in the crate through a generated `kernels.rs`.
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`,
//! `nvcc` on `PATH`, then the project-local toolchain installed by
//! `scripts/install-cuda-toolchain.sh` (`.cuda-toolchain/nvidia/cu13/bin/nvcc`).
//! Without nvcc the crate still builds (with a cargo warning) and the CUDA device reports
//! "built without CUDA kernels" at run time. With `SYNTHOS_REQUIRE_NVCC=1` a missing nvcc
//! or a kernel that fails to compile fails the build.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `-gencode` targets every kernel is built for.
const GENCODES: &[&str] =
    &["arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a", "arch=compute_80,code=compute_80"];

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "SYNTHOS_REQUIRE_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = env::var("SYNTHOS_REQUIRE_NVCC").map(|v| v == "1").unwrap_or(false);

    let kernel_dir = manifest.join("kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernel_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect()
        })
        .unwrap_or_default();
    sources.sort();

    let nvcc = find_nvcc(&manifest);
    let mut generated = String::new();
    generated.push_str("/// Embedded kernel fatbins: (module name, fatbin bytes).\n");
    generated.push_str("pub const KERNEL_MODULES: &[(&str, &[u8])] = &[\n");
    let archs = match nvcc {
        None => {
            let msg = "nvcc not found (set NVCC or CUDA_HOME, or run scripts/install-cuda-toolchain.sh): \
                       building without CUDA kernels; the CUDA device will report an error at run time";
            if require {
                panic!("SYNTHOS_REQUIRE_NVCC=1 but {msg}");
            }
            println!("cargo:warning={msg}");
            String::new()
        }
        Some(nvcc) => {
            let results: Vec<(PathBuf, Result<PathBuf, String>)> = std::thread::scope(|s| {
                let handles: Vec<_> = sources
                    .iter()
                    .map(|src| {
                        let nvcc = nvcc.clone();
                        let out_dir = out_dir.clone();
                        let kernel_dir = kernel_dir.clone();
                        let src = src.clone();
                        s.spawn(move || {
                            let r = compile(&nvcc, &kernel_dir, &src, &out_dir);
                            (src, r)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("nvcc thread")).collect()
            });
            let mut failures = Vec::new();
            for (src, r) in results {
                match r {
                    Ok(fatbin) => {
                        let name = src.file_stem().unwrap().to_string_lossy().to_string();
                        writeln!(generated, "    ({name:?}, include_bytes!({:?})),", fatbin.display().to_string())
                            .unwrap();
                    }
                    Err(e) => failures.push(format!("{}: {e}", src.display())),
                }
            }
            if !failures.is_empty() {
                let msg = format!("CUDA kernel compilation failed:\n{}", failures.join("\n"));
                if require {
                    panic!("{msg}");
                }
                for line in msg.lines().take(40) {
                    println!("cargo:warning={line}");
                }
            }
            "sm_80, sm_90a (+ compute_80 PTX)".to_string()
        }
    };
    generated.push_str("];\n");
    writeln!(generated, "/// Architectures the embedded kernels were built for (empty: none).").unwrap();
    writeln!(generated, "pub const KERNEL_ARCHS: &str = {archs:?};").unwrap();
    std::fs::write(out_dir.join("kernels.rs"), generated).expect("write kernels.rs");
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exe = |p: PathBuf| if p.is_file() { Some(p) } else { None };
    if let Ok(p) = env::var("NVCC") {
        if let Some(p) = exe(PathBuf::from(p)) {
            return Some(p);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            if let Some(p) = exe(PathBuf::from(home).join("bin").join("nvcc")) {
                return Some(p);
            }
        }
    }
    if let Ok(path) = env::var("PATH") {
        for dir in env::split_paths(&path) {
            if let Some(p) = exe(dir.join("nvcc")) {
                return Some(p);
            }
        }
    }
    exe(manifest.join(".cuda-toolchain/nvidia/cu13/bin/nvcc"))
}

fn compile(nvcc: &Path, include: &Path, src: &Path, out_dir: &Path) -> Result<PathBuf, String> {
    let stem = src.file_stem().unwrap().to_string_lossy().to_string();
    let out = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin").arg("-O3").arg("-std=c++17").arg("-lineinfo").arg("-I").arg(include);
    for g in GENCODES {
        cmd.arg(format!("-gencode={g}"));
    }
    // The pip toolchain keeps nvvm/ beside bin/; nvcc finds it through nvcc.profile.
    cmd.arg(src).arg("-o").arg(&out);
    let output = cmd.output().map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "nvcc exited with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // ptxas reports (as "info", without failing) when it serialises a kernel's wgmma
    // instructions, e.g. for a wgmma issued under a run-time condition: the kernel then
    // runs its tensor-core products one at a time. That is a bug in a Hopper kernel here.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let serialised: Vec<&str> =
        stderr.lines().filter(|l| l.contains("wgmma.mma_async instructions are serialized")).collect();
    if !serialised.is_empty() {
        return Err(format!("ptxas serialises wgmma (a performance bug):\n{}", serialised.join("\n")));
    }
    Ok(out)
}
