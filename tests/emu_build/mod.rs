//! What the two emulation tiers share: the compiler check and the cache key of their
//! builds (`tests/kernel_emulation.rs`, `tests/device_emulation.rs`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The compiler; the emulation relies on GCC's sanitizer macros and builtins.
pub const CXX: &str = "g++";

/// Flags of every build of kernels for the CPU. `-fno-strict-aliasing`: kernels
/// reinterpret 16-byte words as element arrays, which nvcc compiles as intended and g++
/// may not otherwise.
pub const FLAGS: &[&str] = &[
    "-std=c++20",
    "-fno-strict-aliasing",
    "-DSYNTHOS_EMU",
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",
    "-Wno-sign-compare",
    "-Wno-unused-parameter",
    // (g++'s note that 64-byte-aligned parameters, the tensor maps, pass differently since GCC 4.6)
    "-Wno-psabi",
];

/// The oldest g++ with everything the emulation uses (C++20 `<source_location>`,
/// `std::atomic_ref`, the sanitizers' fiber interfaces).
pub const MIN_GCC: u32 = 12;

/// The compiler's version (`-dumpfullversion`), or why it cannot be used.
pub fn compiler_version() -> Result<String, String> {
    let out = Command::new(CXX).arg("-dumpfullversion").output().map_err(|e| format!("cannot run {CXX}: {e}"))?;
    if !out.status.success() {
        return Err(format!("`{CXX} -dumpfullversion` exited with {}", out.status));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match version.split('.').next().and_then(|major| major.parse::<u32>().ok()) {
        Some(major) if major >= MIN_GCC => Ok(version),
        _ => Err(format!("{CXX} {version} is older than {MIN_GCC}")),
    }
}

/// The compiler's version, or `None` after printing why `tier` is skipped; with `CI`
/// set, a missing compiler is a failure instead.
pub fn compiler_or_skip(tier: &str) -> Option<String> {
    match compiler_version() {
        Ok(v) => Some(v),
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("the {tier} needs g++ {MIN_GCC} or newer and CI is set: {why}")
        }
        Err(why) => {
            eprintln!("{tier} skipped: {why} (install g++ {MIN_GCC} or newer to run it)");
            None
        }
    }
}

/// FNV-1a, 64 bits: a stable hash for the cache key (std's hasher may change between
/// Rust releases, which would only cost a rebuild, but this one never does).
pub fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= b as u64;
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

/// Every file under `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display())).path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A cache key over `strings` (compiler version, flags) and the names and contents of
/// every file under `dirs` (relative to the crate root).
pub fn key(strings: &[&str], dirs: &[&str]) -> u64 {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut key = 0xcbf2_9ce4_8422_2325u64;
    for s in strings {
        fnv1a(&mut key, s.as_bytes());
    }
    for dir in dirs {
        for file in files_under(&root.join(dir)) {
            fnv1a(&mut key, file.strip_prefix(root).unwrap_or(&file).to_string_lossy().as_bytes());
            fnv1a(&mut key, &fs::read(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display())));
        }
    }
    key
}
