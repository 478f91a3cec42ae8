//! Atomic file writes: the one place where the crate replaces a file so that readers (a
//! viewer, a resumed run, a process that mapped the old file) never see it half written.
//!
//! [`write_atomic_with`] streams into a temporary file beside the target (same
//! directory, so the rename cannot cross file systems), flushes and fsyncs it, renames
//! it over the target and fsyncs the directory; on any error the temporary file is
//! removed and an existing target is left untouched. [`write_atomic`] is the in-memory
//! form, which also creates missing parent directories.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{bail, Error, Result, ResultExt};

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]), creating missing
/// parent directories first. Errors name `path`.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let dir = parent_dir(path);
    fs::create_dir_all(&dir).with_ctx(|| format!("cannot create directory {}", dir.display()))?;
    write_atomic_with(path, |w| w.write_all(bytes).ctx("writing"))
        .map_err(|e| e.context(format!("cannot write {}", path.display())))
}

/// Replaces `path` atomically with what `write` writes: `write` gets a buffered writer on
/// a fresh temporary file in the same directory (`.NAME.PID-N.tmp`, unique across threads
/// and processes); the file is then flushed, fsynced and renamed over `path`, and the
/// directory is fsynced so the rename persists (a file system that refuses to fsync a
/// directory is not an error: the new file is complete and in place by then).
///
/// On any error, from `write` or from the file system, the temporary file is removed and
/// an existing file at `path` is left as it was. The parent directory must exist (it is
/// not created). Errors name the temporary file; callers add the target as context.
pub fn write_atomic_with(path: impl AsRef<Path>, write: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let path = path.as_ref();
    let Some(file_name) = path.file_name() else {
        bail!("cannot write {}: the path has no file name", path.display());
    };
    let dir = parent_dir(path);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(".{}.{}-{n}.tmp", file_name.to_string_lossy(), std::process::id()));
    let written = write_and_rename(&temp, path, write);
    if let Err(e) = written {
        // The temporary file may not exist (creation failed); nothing else to clean.
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn write_and_rename(temp: &Path, path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let io_err = |what: &str, e: std::io::Error| Error::msg(format!("{what} {}: {e}", temp.display()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| io_err("cannot create temporary file", e))?;
    let mut out = BufWriter::new(file);
    write(&mut out).map_err(|e| e.context(format!("temporary file {}", temp.display())))?;
    let file = out.into_inner().map_err(|e| io_err("cannot write", e.into_error()))?;
    file.sync_all().map_err(|e| io_err("cannot fsync", e))?;
    fs::rename(temp, path)
        .map_err(|e| Error::msg(format!("cannot rename {} over {}: {e}", temp.display(), path.display())))
}
