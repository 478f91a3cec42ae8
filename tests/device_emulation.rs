//! The GPU tests on the CPU (the "device emulation tier", see `tests/device_emu/README.md`).
//!
//! Builds an emulated CUDA driver (`libcuda.so`), an emulated cuBLASLt
//! (`libcublasLt.so`) and every kernel family of `kernels/` for the CPU
//! (`libemu_<family>.so`, through the kernel emulation of `tests/kernel_emu/include`),
//! then runs the `gpu` tests of every other test executable of this build with those
//! libraries first on the library path. The engine's host code runs unchanged: every
//! launcher, the memory pool, cuBLASLt plans, CUDA graph recording and replay, TMA tensor
//! maps. Tests whose models are too large to emulate in minutes are skipped by name
//! (`TOO_LARGE`); every other GPU test must pass.
//!
//! The executables must carry kernels (nvcc at build time) and g++ 12 or newer must be
//! present; otherwise this prints why it was skipped, unless `CI` is set: then it fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

mod emu_build;
use emu_build::CXX;

/// GPU tests of full-size models: minutes to hours each under the emulation. They run on
/// real GPUs (`scripts/gpu-check.sh`).
const TOO_LARGE: &[&str] = &[
    "gpu_vit_h14_encodes_a_reference_image",
    "gpu_umt5_xxl_encodes_a_batch_of_8",
    "gpu_full_config_decode_timing_and_memory",
    "gpu_full_1_3b_forward_backward_480",
    "gpu_1_3b_sample_and_train_step_480",
];

/// Flags of every library besides [`emu_build::FLAGS`]: optimised (the emulated threads
/// are fibers; -O1 runs the tensor-core emulation several times faster than -O0),
/// position independent, and exporting only the entry points.
const LIBRARY_FLAGS: &[&str] = &["-O1", "-g0", "-fPIC", "-shared", "-fvisibility=hidden"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The include folders of every compilation: the kernel emulation's headers, the kernels
/// and this tier's own.
fn includes() -> Vec<String> {
    ["tests/kernel_emu/include", "kernels", "tests/device_emu"]
        .iter()
        .flat_map(|dir| ["-I".to_string(), root().join(dir).to_string_lossy().into_owned()])
        .collect()
}

/// Runs g++ with the flags of every library and `args`; panics with its output when it
/// fails.
fn compile(args: &[String], what: &str) {
    let out = Command::new(CXX)
        .args(emu_build::FLAGS)
        .args(LIBRARY_FLAGS)
        .args(includes())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {CXX}: {e}"));
    assert!(
        out.status.success(),
        "compiling {what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `extern "C"` functions of a kernel file, as g++ sees it under the emulation
/// (macros expanded), without the emulation's own.
fn kernel_names(file: &Path) -> Vec<String> {
    let out = Command::new(CXX)
        .args(["-std=c++20", "-x", "c++", "-E", "-P", "-DSYNTHOS_EMU"])
        .args(includes())
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {CXX}: {e}"));
    assert!(out.status.success(), "preprocessing {} failed:\n{}", file.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    let mut names = Vec::new();
    for part in text.split("extern \"C\" ").skip(1) {
        let Some(rest) = part.strip_prefix("void ") else { continue };
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && !name.starts_with("emu_") && rest[name.len()..].trim_start().starts_with('(') {
            names.push(name);
        }
    }
    names
}

/// Builds (unless cached) the driver, cuBLASLt and kernel libraries; returns their folder.
fn build_libraries(version: &str) -> PathBuf {
    let key = emu_build::key(
        &[version, &emu_build::FLAGS.join(" "), &LIBRARY_FLAGS.join(" ")],
        &["tests/kernel_emu/include", "tests/device_emu", "kernels"],
    );
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("device_emu");
    let dir = cache.join(format!("{key:016x}"));
    if dir.join("complete").exists() {
        return dir;
    }
    let partial = cache.join(format!("{key:016x}.{}.partial", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).unwrap_or_else(|e| panic!("cannot create {}: {e}", partial.display()));
    let emu = root().join("tests/device_emu");
    let out = |name: &str| partial.join(name).to_string_lossy().into_owned();

    // The driver first: cuBLASLt links against it.
    compile(
        &[
            "-Wl,-soname,libcuda.so".into(),
            emu.join("driver.cpp").to_string_lossy().into_owned(),
            "-o".into(),
            out("libcuda.so"),
            "-ldl".into(),
        ],
        "the emulated driver",
    );
    compile(
        &[
            emu.join("cublaslt.cpp").to_string_lossy().into_owned(),
            "-o".into(),
            out("libcublasLt.so"),
            format!("-L{}", partial.display()),
            "-lcuda".into(),
            "-Wl,-rpath,$ORIGIN".into(),
        ],
        "the emulated cuBLASLt",
    );
    compile(
        &[emu.join("tma.cpp").to_string_lossy().into_owned(), "-o".into(), out("libemu_tma.so")],
        "the emulated TMA encoder",
    );

    // Every kernel family, in parallel; kernel names must be unique across families
    // (the driver finds a kernel by name alone).
    let mut families: Vec<PathBuf> = fs::read_dir(root().join("kernels"))
        .unwrap_or_else(|e| panic!("cannot list kernels/: {e}"))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    families.sort();
    let mut seen = std::collections::HashMap::new();
    let mut jobs = Vec::new();
    for file in families {
        let family = file.file_stem().unwrap().to_string_lossy().into_owned();
        let names = kernel_names(&file);
        for n in &names {
            if let Some(other) = seen.insert(n.clone(), family.clone()) {
                panic!("kernel {n} is defined in both kernels/{other}.cu and kernels/{family}.cu");
            }
        }
        let list = partial.join(format!("{family}.names"));
        let text: String = names.iter().map(|n| format!("K({n})\n")).collect();
        fs::write(&list, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", list.display()));
        let args = vec![
            format!("-DEMU_FAMILY_FILE=\"{family}.cu\""),
            format!("-DEMU_FAMILY_NAMES=\"{}\"", list.display()),
            emu.join("family.cpp").to_string_lossy().into_owned(),
            "-o".into(),
            out(&format!("libemu_{family}.so")),
        ];
        jobs.push(std::thread::spawn(move || compile(&args, &format!("kernels/{family}.cu for the emulated driver"))));
    }
    for job in jobs {
        if let Err(e) = job.join() {
            std::panic::resume_unwind(e);
        }
    }
    fs::write(partial.join("complete"), "").unwrap();
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&partial, &dir).unwrap_or_else(|e| panic!("cannot move {}: {e}", partial.display()));
    // Libraries of earlier versions of the sources.
    for old in fs::read_dir(&cache).into_iter().flatten().flatten() {
        if old.path() != dir && !old.file_name().to_string_lossy().ends_with(".partial") {
            let _ = fs::remove_dir_all(old.path());
        }
    }
    dir
}

/// The newest executable of each integration test of this build (cargo names them
/// `<test>-<16 hex digits>` beside this one), except this test's own.
fn test_executables() -> Vec<(String, PathBuf)> {
    let me = std::env::current_exe().expect("the test's own path");
    let deps = me.parent().expect("the test's folder");
    let mut tests: Vec<String> = fs::read_dir(root().join("tests"))
        .unwrap_or_else(|e| panic!("cannot list tests/: {e}"))
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension().is_some_and(|x| x == "rs")).then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .filter(|name| name != "device_emulation")
        .collect();
    tests.sort();
    let mut out = Vec::new();
    for test in tests {
        let mut newest: Option<(SystemTime, PathBuf)> = None;
        for entry in fs::read_dir(deps).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hash) = name.strip_prefix(&format!("{test}-")) else { continue };
            if hash.len() != 16 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if meta.is_file() && newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, entry.path()));
            }
        }
        if let Some((_, path)) = newest {
            out.push((test, path));
        }
    }
    out
}

#[test]
fn gpu_tests_on_the_emulated_device() {
    if synthos_engine::cuda::KERNEL_MODULES.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this build carries no CUDA kernels (nvcc was not found) and CI is set"
        );
        eprintln!(
            "device emulation tier skipped: this build carries no CUDA kernels (nvcc was not found at build time)"
        );
        return;
    }
    let Some(version) = emu_build::compiler_or_skip("device emulation tier") else { return };
    let started = Instant::now();
    let libs = build_libraries(&version);
    println!("emulated driver, cuBLASLt and kernels built in {:.1} s", started.elapsed().as_secs_f64());

    let mut library_path = libs.to_string_lossy().into_owned();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        library_path = format!("{library_path}:{}", old.to_string_lossy());
    }
    let mut failures = Vec::new();
    let mut total = 0;
    for (test, exe) in test_executables() {
        let listed = Command::new(&exe).args(["--list", "gpu"]).output();
        let Ok(listed) = listed else { continue };
        let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .filter(|n| !TOO_LARGE.contains(n))
            .map(str::to_string)
            .collect();
        if names.is_empty() {
            continue;
        }
        let t0 = Instant::now();
        let mut cmd = Command::new(&exe);
        // (`SYNTHOS_REQUIRE_GPU`: a test that finds no usable GPU fails instead of skipping)
        cmd.arg("gpu").env("LD_LIBRARY_PATH", &library_path).env("SYNTHOS_REQUIRE_GPU", "1");
        for skip in TOO_LARGE {
            cmd.args(["--skip", skip]);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let passed = stdout
            .lines()
            .find_map(|l| l.strip_prefix("test result: ok. "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok());
        println!(
            "{test}: {} of {} GPU tests passed in {:.1} s",
            passed.unwrap_or(0),
            names.len(),
            t0.elapsed().as_secs_f64()
        );
        if !out.status.success() || passed != Some(names.len()) {
            failures.push(format!("{test} ({}):\n{stdout}{stderr}", out.status));
        }
        total += names.len();
    }
    assert!(failures.is_empty(), "GPU tests failed on the emulated device:\n{}", failures.join("\n"));
    assert!(total > 0, "no GPU test was found beside {}", std::env::current_exe().unwrap().display());
    println!("{total} GPU tests passed on the emulated device in {:.1} s", started.elapsed().as_secs_f64());
}

/// Not a check: builds the emulated libraries (or finds them built) and prints their
/// folder and the tests too large to emulate, for `scripts/gpu-check-emulated.sh`, which
/// rehearses the GPU machine's script on the emulated device. Run it with
/// `cargo test --test device_emulation -- --ignored emulated_libraries --nocapture`.
#[test]
#[ignore = "a tool for scripts/gpu-check-emulated.sh, not a check"]
fn emulated_libraries() {
    let version = emu_build::compiler_or_skip("device emulation tier").expect("g++ 12 or newer is needed");
    println!("emulated libraries: {}", build_libraries(&version).display());
    println!("too large to emulate: {}", TOO_LARGE.join(" "));
}
