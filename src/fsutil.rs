//! Filesystem helpers for secrets and sockets: private directories, atomic 0600 writes.
//!
//! Owns: the one way Tessera writes a file that must not be read by others, so that a key is
//! never visible with looser permissions, not even for an instant between create and chmod.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and parents) if missing and makes sure it is 0700 and owned by us.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::other(format!(
            "{} is owned by uid {}, not by the daemon's uid; refusing to keep secrets there",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically with mode 0600: temp file created 0600, fsync, rename,
/// fsync of the directory. A crash leaves either the old file or the new one.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Fails unless `path` is readable by its owner only (0600 or stricter).
pub fn check_private_mode(path: &Path) -> std::io::Result<()> {
    let mode = fs::metadata(path)?.mode();
    if mode & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} has mode {:o}; a private key must be readable by its owner only (chmod 600 {})",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}
