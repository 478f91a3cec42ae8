//! The CUDA kernels run on the CPU (the "kernel emulation tier", see docs/NOTES.md).
//!
//! Each kernel family's harness, `tests/kernel_emu/<family>.cpp`, includes the unmodified
//! `kernels/<family>.cu` and compiles with g++ (12 or newer) against the CUDA
//! emulation headers in `tests/kernel_emu/include`. It launches every kernel exactly as
//! `src/cuda/<family>.rs` does, compares the results with double-precision references and
//! prints one summary line. Every family is built with AddressSanitizer and
//! UndefinedBehaviorSanitizer; the families whose kernels synchronise are also built with
//! ThreadSanitizer. Binaries are cached in the target directory under a hash of the
//! sources, the compiler version and the flags, so reruns only run them.
//!
//! Without g++ 12 or newer these tests print why they were skipped, unless the variable
//! `CI` is set: then they fail.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

mod emu_build;
use emu_build::CXX;

/// A sanitizer build of a harness.
#[derive(Clone, Copy, Debug)]
enum Build {
    /// AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds accesses (device
    /// arrays and shared memory are exactly sized), misaligned vector accesses, overflow.
    Address,
    /// ThreadSanitizer: every CUDA thread is a thread to it, so a missing barrier is a race.
    Thread,
}

impl Build {
    fn name(self) -> &'static str {
        match self {
            Build::Address => "asan",
            Build::Thread => "tsan",
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Build::Address => &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
            Build::Thread => &["-fsanitize=thread"],
        }
    }

    /// Runtime options: leak checking needs ptrace, which containers often forbid.
    fn env(self) -> (&'static str, &'static str) {
        match self {
            Build::Address => ("ASAN_OPTIONS", "detect_leaks=0"),
            Build::Thread => ("TSAN_OPTIONS", "halt_on_error=1"),
        }
    }
}

/// Compiles (unless cached) and runs one build of a family's harness; panics with its
/// output when it fails.
fn run_build(family: &str, opt: &str, build: Build, version: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let emu_dir = root.join("tests/kernel_emu");
    let kernels = root.join("kernels");
    let source = emu_dir.join(format!("{family}.cpp"));
    let mut flags: Vec<String> =
        emu_build::FLAGS.iter().chain(&["-g1"]).chain(build.flags()).map(|s| s.to_string()).collect();
    flags.push(opt.to_string());

    // The key covers everything the harness can include: the emulation, all kernels.
    let key = emu_build::key(&[version, &flags.join(" ")], &["tests/kernel_emu", "kernels"]);
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emu");
    fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("cannot create {}: {e}", cache.display()));
    let stem = format!("{family}-{}-", build.name());
    let binary = cache.join(format!("{stem}{key:016x}"));

    let started = Instant::now();
    if !binary.exists() {
        // Build under a temporary name and rename, so that a concurrent or interrupted
        // run never sees half a binary.
        let partial = cache.join(format!("{stem}{key:016x}.{}.partial", std::process::id()));
        let out = Command::new(CXX)
            .args(&flags)
            .arg("-I")
            .arg(emu_dir.join("include"))
            .arg("-I")
            .arg(&kernels)
            .arg(&source)
            .arg("-o")
            .arg(&partial)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {CXX}: {e}"));
        assert!(
            out.status.success(),
            "compiling {} ({} build) failed:\n{}{}",
            source.display(),
            build.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        fs::rename(&partial, &binary).unwrap_or_else(|e| panic!("cannot move {}: {e}", partial.display()));
        // Binaries of earlier versions of the sources.
        for old in fs::read_dir(&cache).into_iter().flatten().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if name.starts_with(&stem) && old.path() != binary && !name.ends_with(".partial") {
                let _ = fs::remove_file(old.path());
            }
        }
    }
    let compiled = started.elapsed();

    let (var, value) = build.env();
    let out = Command::new(&binary)
        .env(var, value)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("checks match"),
        "kernel emulation of {family} ({} build) failed with {}:\n{stdout}{stderr}",
        build.name(),
        out.status
    );
    println!(
        "{} (build {:.1} s, run {:.1} s)",
        stdout.lines().last().unwrap_or_default(),
        compiled.as_secs_f64(),
        (started.elapsed() - compiled).as_secs_f64()
    );
}

/// Runs the harness of `family` in each of `builds`, compiled at optimisation `opt`.
fn emulate(family: &str, opt: &str, builds: &[Build]) {
    let Some(version) = emu_build::compiler_or_skip(&format!("kernel emulation tier ({family})")) else {
        return;
    };
    for &build in builds {
        run_build(family, opt, build, &version);
    }
}

// -O0 compiles fastest and is fast enough, except for the reductions, whose many blocks
// of 256 synchronising threads run four times faster at -O1, and the mma and wgmma
// attention, whose warp-collective tensor-core instructions run three to four times faster
// at -O1.

#[test]
fn emulator_checks() {
    emulate("emulator", "-O0", &[Build::Address]);
}

#[test]
fn elementwise() {
    emulate("elementwise", "-O0", &[Build::Address]);
}

#[test]
fn shape() {
    emulate("shape", "-O0", &[Build::Address, Build::Thread]);
}

#[test]
fn rope() {
    emulate("rope", "-O0", &[Build::Address]);
}

#[test]
fn reduce() {
    emulate("reduce", "-O1", &[Build::Address, Build::Thread]);
}

#[test]
fn loss() {
    emulate("loss", "-O0", &[Build::Address, Build::Thread]);
}

#[test]
fn norm() {
    emulate("norm", "-O0", &[Build::Address, Build::Thread]);
}

#[test]
fn adamw() {
    emulate("adamw", "-O0", &[Build::Address, Build::Thread]);
}

#[test]
fn attention() {
    emulate("attention", "-O0", &[Build::Address, Build::Thread]);
}

#[test]
fn conv() {
    emulate("conv", "-O1", &[Build::Address, Build::Thread]);
}

#[test]
fn softmax() {
    emulate("softmax", "-O1", &[Build::Address, Build::Thread]);
}

#[test]
fn attention_mma() {
    emulate("attention_mma", "-O1", &[Build::Address, Build::Thread]);
}

#[test]
fn attention_wgmma() {
    emulate("attention_wgmma", "-O1", &[Build::Address, Build::Thread]);
}
