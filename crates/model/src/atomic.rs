//! Writing a file so that a kill or a crash at any moment leaves the old
//! file or the new one, never half of one. Every stage's outputs go through
//! here: weights, mining state, training logs, evaluation summaries, data.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same
/// directory, flushed to disk, then renamed over `path`; the directory is
/// flushed too, so the rename itself survives a power cut.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// [`write_atomic`] for content produced by `write` into the file.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    write(tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // Not every file system lets a directory be opened for syncing.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a whole directory at `out`, all or nothing: `fill` writes into a
/// fresh directory beside `out` that this call creates under a unique name,
/// which is flushed and renamed to `out` only when `fill` succeeds. No path
/// that this call did not create is ever removed: a user's `out.tmp` stays.
pub fn write_dir_atomic<E: From<std::io::Error>>(
    out: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.as_deref().unwrap_or("out")))
        .suffix(".partial")
        .tempdir_in(parent)?;
    fill(tmp.path())?;
    for entry in std::fs::read_dir(tmp.path())? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    if out.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} appeared while it was being written", out.display()),
        )
        .into());
    }
    std::fs::rename(tmp.path(), out)?;
    // The directory is `out` now: nothing is left for the guard to remove.
    let _ = tmp.keep();
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_written_whole_and_nothing_else_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("project.new");
        let theirs = dir.path().join("project.tmp");
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::write(theirs.join("thesis.txt"), "mine").unwrap();
        // A failing fill leaves nothing behind.
        let failed = write_dir_atomic(&out, |tmp| {
            std::fs::write(tmp.join("half"), "x")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err() && !out.exists());
        write_dir_atomic(&out, |tmp| std::fs::write(tmp.join("config.json"), "{}")).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("config.json")).unwrap(),
            "{}"
        );
        assert!(theirs.join("thesis.txt").exists());
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 2, "only the user's directory and the new one");
        // An existing output is never replaced.
        let again = write_dir_atomic(&out, |tmp| std::fs::write(tmp.join("other"), "y"));
        assert!(again.is_err() && !out.join("other").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
