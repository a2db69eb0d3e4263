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

/// Writes `bytes` to `path` atomically with mode 0600 ([`write_atomic`]).
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, bytes, 0o600)
}

/// Writes `bytes` to `path` atomically, created with `mode` (narrowed by the umask): a temp
/// file beside it, fsync, rename, fsync of the directory; a crash leaves either the old file
/// or the new one. The temp file's name is unpredictable and it is created exclusively
/// without following links, so nothing another user planted under that name (a file of
/// theirs, a link) is written through: opening an existing file keeps its owner and mode,
/// and a private key written into it would be theirs to read.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut nonce = [0u8; 8];
    crate::entropy::fill(&mut nonce)
        .map_err(|_| std::io::Error::other("the system random source failed"))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        hex::encode(nonce)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
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

/// The data directory's lock, held until dropped (the kernel drops it when the process
/// ends, `kill -9` included).
#[derive(Debug)]
pub struct DirLock {
    _dir: fs::File,
    _pid_file: fs::File,
}

/// Locks `dir` exclusively for as long as the returned lock lives, so that one daemon at a
/// time uses a data directory. A second would generate a CA beside the first, or open the
/// live store and audit file (and cut what it takes for a torn last record) before failing
/// on a socket; two serving one directory each keep their own kill list and break the audit
/// chain between them.
///
/// The lock is on the directory itself: a lock file can be deleted (by a cleanup script, or
/// an operator "removing a stale lock") and a new file at its path is a new lock, which let
/// a second daemon in beside the first. `dir/tesserad.lock` is still locked too (daemons
/// before this one lock only that file) and holds the holder's pid, for the message the
/// next one gives.
pub fn lock_dir(dir: &Path) -> std::io::Result<DirLock> {
    use std::io::{Read, Seek};
    let dir_file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    let mut pid_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join("tesserad.lock"))?;
    let locked = flock_exclusive(&dir_file).and_then(|()| flock_exclusive(&pid_file));
    if let Err(e) = locked {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(e);
        }
        let mut holder = String::new();
        let _ = pid_file.read_to_string(&mut holder);
        let holder = holder.trim();
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "is in use by another tesserad{}: one daemon per data directory",
                if holder.is_empty() || !holder.bytes().all(|b| b.is_ascii_digit()) {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            ),
        ));
    }
    pid_file.set_len(0)?;
    pid_file.rewind()?;
    writeln!(pid_file, "{}", std::process::id())?;
    Ok(DirLock {
        _dir: dir_file,
        _pid_file: pid_file,
    })
}

/// `flock(LOCK_EX | LOCK_NB)`: `WouldBlock` when another open file holds the lock.
fn flock_exclusive(f: &fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Largest key or certificate file read: a chain of a dozen certificates is a few KiB.
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// Reads an operator-supplied key or certificate file through one descriptor: a regular file
/// (a FIFO would block start-up for good, a device could be read without end), at most
/// [`MAX_PEM_FILE`] bytes, and with `private`, readable by its owner only, judged on the file
/// that is read rather than on a second lookup of the path.
pub fn read_pem_file(path: &Path, private: bool) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that opening a FIFO with no writer returns at once.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.mode();
    if private && mode & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} has mode {:o}; a private key must be readable by its owner only (chmod 600 {})",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(std::io::Error::other(format!(
            "{} is {} bytes; a key or certificate file is at most {MAX_PEM_FILE}",
            path.display(),
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&mut f).take(MAX_PEM_FILE + 1).read_to_end(&mut bytes)?;
    String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not PEM text", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_files_are_read_only_when_regular_small_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        fs::write(&key, "x").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_pem_file(&key, false).is_ok());
        let e = read_pem_file(&key, true).unwrap_err().to_string();
        assert!(e.contains("mode 644"), "{e}");
        // A FIFO would block a plain read until someone writes to it.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_pem_file(&fifo, true).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big.pem");
        fs::write(&big, vec![b'a'; MAX_PEM_FILE as usize + 1]).unwrap();
        let e = read_pem_file(&big, false).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn the_data_directory_stays_locked_when_its_lock_file_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path()).unwrap();
        let again = lock_dir(dir.path()).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::WouldBlock);
        assert!(
            again
                .to_string()
                .contains(&format!("(pid {})", std::process::id()))
        );
        // A cleanup script or an operator removes the "stale" lock file.
        fs::remove_file(dir.path().join("tesserad.lock")).unwrap();
        let err = lock_dir(dir.path()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
        drop(held);
        lock_dir(dir.path()).unwrap();
    }

    #[test]
    fn atomic_writes_never_write_through_what_is_already_there() {
        let d = tempfile::tempdir().unwrap();
        // A link planted at the final name: replaced, not followed.
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"theirs").unwrap();
        let path = d.path().join("svid.key");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"theirs");
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_file());
        assert_eq!(m.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        // No temp file is left, and the old fixed temp name is not used.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A file planted under the old fixed temp name is left alone.
        let planted = d.path().join("svid.tmp");
        std::fs::write(&planted, b"").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&path, b"secret2", 0o600).unwrap();
        assert_eq!(std::fs::read(&planted).unwrap(), b"");
    }
}
