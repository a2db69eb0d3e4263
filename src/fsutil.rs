//! Filesystem helpers for secrets and sockets: private directories, atomic 0600 writes.
//!
//! Owns: the one way Tessera writes a file that must not be read by others, so that a key is
//! never visible with looser permissions, not even for an instant between create and chmod;
//! and the rules for who may change what the daemon trusts: the directories above its data
//! and sockets, and the files it reads its config, policy and issuer keys from.

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

/// [`check_socket_dir`]'s rule for any directory whose contents others must not swap;
/// `what` names it in the messages ("socket directory", "output directory").
pub fn check_private_dir(dir: &Path, owner: Option<u32>, what: &str) -> std::io::Result<()> {
    let owned_ok = |uid: u32| owner.is_none_or(|me| uid == me || uid == 0);
    let me = owner.map_or_else(|| "the daemon's uid".to_owned(), |u| format!("uid {u}"));
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(refuse(format!(
            "{what} {} is a symbolic link; give the real directory",
            dir.display()
        )));
    }
    if !meta.is_dir() {
        return Err(refuse(format!("{} is not a directory", dir.display())));
    }
    if !owned_ok(meta.uid()) || meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "{what} {} must be owned by {me} or root and not writable by group or others (owner {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o777
        )));
    }
    // The directories above, as the kernel resolves them (a symlinked /var/run is fine if
    // its target passes).
    let real = std::fs::canonicalize(dir)?;
    match real.parent() {
        Some(up) => check_above(up, owner, &format!("{what} {}", dir.display())),
        None => Ok(()),
    }
}

/// The rule for the directories above a private one, applied to `dir` and every directory
/// above it, as the kernel resolves them: owned by `owner` or root, and not writable by group
/// or others unless sticky (then only the owner of an entry can rename it). Enough for a
/// directory about to be created in `dir`: `what` names it.
pub fn check_above(dir: &Path, owner: Option<u32>, what: &str) -> std::io::Result<()> {
    check_above_rule(
        dir,
        owner,
        what,
        &|_, m| m.mode() & 0o022 != 0,
        "group or others",
    )
}

/// [`check_above`] for the data directory, except that a directory writable by its group
/// passes when that group is the daemon's own and has no other member (a user private group:
/// `umask 0002` makes `~/.local` so on Ubuntu). A group of several users (a shared `/srv/team`,
/// a pod volume's `fsGroup`) could rename the data directory away, as others could.
pub fn check_above_data(dir: &Path, owner: Option<u32>, what: &str) -> std::io::Result<()> {
    check_above_rule(
        dir,
        owner,
        what,
        &|p, m| others_can_write(p, m).is_some(),
        DATA_WRITERS,
    )
}

/// Who [`check_above_data`] and [`read_trusted_file`] refuse as writers.
const DATA_WRITERS: &str = "group (unless it is the daemon's own, with no other member) or others";

/// Why someone other than the owner can change `p` (metadata `m`) through its mode, or `None`:
/// others' write bit, or the group's unless the group is a user private group
/// ([`shared_group`]). The one rule for the data directory's parents and for trusted files.
fn others_can_write(p: &Path, m: &fs::Metadata) -> Option<String> {
    if m.mode() & 0o002 != 0 {
        return Some("others can write it".to_owned());
    }
    // Without group write there is nothing to ask: no user database to read (review BE-6).
    if m.mode() & 0o020 == 0 {
        return None;
    }
    shared_group(p, m).map(|g| format!("its group can write it and {g}"))
}

/// `p` as a C string for the system calls that take a path (`None` if it holds a NUL).
fn c_path(p: &Path) -> Option<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).ok()
}

/// Why users other than the daemon's may write `p` (metadata `m`) through its group, or `None`
/// when that group is a user private group: the daemon's own, with no other member, neither
/// listed in the group nor having it as primary group (review BD-2), and no POSIX ACL on `p`
/// naming other users or groups (its group bits are then the ACL's mask).
fn shared_group(p: &Path, m: &fs::Metadata) -> Option<String> {
    let gid = m.gid();
    if gid != nix::unistd::getegid().as_raw() {
        return Some(format!("its group, gid {gid}, is not the daemon's"));
    }
    if let Some(who) = other_member(gid) {
        return Some(who);
    }
    has_named_acl(p).then(|| "a POSIX ACL on it names other users or groups".to_owned())
}

/// Whether `gid` is a user private group: no member but the daemon's user.
#[cfg(test)]
pub(crate) fn is_private_group(gid: u32) -> bool {
    other_member(gid).is_none()
}

/// A member of `gid` other than the daemon's user, as a reason to give, or `None`.
fn other_member(gid: u32) -> Option<String> {
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name);
    let Some(me) = me else {
        return Some("the daemon's uid has no user name to tell its group's members by".into());
    };
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g)) => {
            if let Some(n) = g.mem.iter().find(|n| **n != me) {
                return Some(format!("user {n} is a member of its group, gid {gid}"));
            }
        }
        _ => {
            return Some(format!(
                "its group, gid {gid}, has no entry to tell its members by"
            ));
        }
    }
    // Primary members are not listed in the group: they are in the user database. Read from
    // /etc/passwd; users only a directory service knows are not seen (README).
    let Ok(passwd) = fs::read_to_string("/etc/passwd") else {
        return Some("/etc/passwd cannot be read to tell its group's members by".into());
    };
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] != me && f[3].parse() == Ok(gid)).then(|| {
            format!(
                "its group, gid {gid}, is the primary group of user {}",
                f[0]
            )
        })
    })
}

/// Whether `p` (not followed if a link) carries a POSIX access ACL with entries for named
/// users or groups. A minimal ACL (owner, group, others: what `cp -a` can leave) says no more
/// than the mode (review BE-7).
fn has_named_acl(p: &Path) -> bool {
    let Some(c) = c_path(p) else {
        return true;
    };
    let name = c"system.posix_acl_access";
    // SAFETY: both strings are NUL-terminated; a null buffer of size 0 only asks the size.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return false;
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: `buf` is writable for its length, which is passed.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    // Grown or gone meanwhile, or not the kernel's format (a u32 version, then entries of a
    // u16 tag, a u16 permission set and a u32 id): counted as naming someone.
    let Ok(n) = usize::try_from(n) else {
        return true;
    };
    buf.truncate(n);
    if buf.len() < 4 || !(buf.len() - 4).is_multiple_of(8) {
        return true;
    }
    // ACL_USER_OBJ, ACL_GROUP_OBJ and ACL_OTHER are the mode's; any other tag names someone.
    buf[4..]
        .chunks_exact(8)
        .any(|e| !matches!(u16::from_le_bytes([e[0], e[1]]), 0x01 | 0x04 | 0x20))
}

/// Whether the directory `p` is a Kubernetes ConfigMap, Secret or projected volume as the
/// kubelet mounts it: the root of a read-only mount (mode 0777 whatever the volume's
/// `defaultMode`) holding the kubelet's `..data` link. Its write bits then let nobody write
/// it. Only that layout: a read-only view of a directory the host can write (systemd's
/// `ProtectSystem=strict`, `docker -v dir:ro`, a read-only `hostPath`) is judged by its modes
/// (reviews BD-1, BE-1).
fn is_kubelet_volume(p: &Path) -> bool {
    let read_only = nix::sys::statvfs::statvfs(p)
        .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    read_only
        && is_mount_root(p)
        && fs::symlink_metadata(p.join("..data")).is_ok_and(|m| m.file_type().is_symlink())
}

/// Whether the directory `p` is the root of a mount: by `statx` where the kernel says (Linux
/// 5.8 and later), else by its device differing from its parent's (review BE-2; the kubelet's
/// volumes are file systems of their own).
fn is_mount_root(p: &Path) -> bool {
    let Some(c) = c_path(p) else {
        return false;
    };
    // SAFETY: statx fills `st`, a plain struct of integers, and reads the NUL-terminated path.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            0,
            &raw mut st,
        )
    };
    let flag = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if r == 0 && st.stx_attributes_mask & flag != 0 {
        return st.stx_attributes & flag != 0;
    }
    match (fs::metadata(p), fs::metadata(p.join(".."))) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

fn check_above_rule(
    dir: &Path,
    owner: Option<u32>,
    what: &str,
    writable: &dyn Fn(&Path, &fs::Metadata) -> bool,
    writers: &str,
) -> std::io::Result<()> {
    let owned_ok = |uid: u32| owner.is_none_or(|me| uid == me || uid == 0);
    let me = owner.map_or_else(|| "the daemon's uid".to_owned(), |u| format!("uid {u}"));
    let real = std::fs::canonicalize(dir)?;
    for up in real.ancestors() {
        let m = std::fs::metadata(up)?;
        let sticky = m.mode() & 0o1000 != 0;
        if !owned_ok(m.uid()) || (writable(up, &m) && !sticky) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} (above the {what}) must be owned by {me} or root and not writable by {writers} unless sticky (owner {}, mode {:o}): otherwise another user could replace the {what}",
                    up.display(),
                    m.uid(),
                    m.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// Opens `path` for reading through one descriptor, non-blocking (opening a FIFO with no
/// writer returns at once), and refuses anything but a regular file: a FIFO would block
/// start-up for good, a device could be read without end. Errors do not name the path.
fn open_regular(path: &Path) -> std::io::Result<(fs::File, fs::Metadata)> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((f, meta))
}

/// Reads what `f` holds, at most `limit` bytes (a file that grew since `meta` was taken is cut
/// there, not read without end).
fn read_at_most(f: fs::File, meta: &fs::Metadata, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    f.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Reads a file whose content decides who gets which credential (the config, the Cedar policy
/// and schema, a `jwks_file`, an operator CA or TLS key pair), only if nobody but the daemon's
/// user or root can change it: anyone who could would grant themselves any identity (review
/// AY-6). The file must be a regular file of at most `limit` bytes, owned by the daemon's uid or
/// root and not writable by others or by a group other than a user private group
/// ([`others_can_write`]), and every directory and link the path passes through
/// must be such that nobody else can swap what follows ([`walk_trusted`]). The checks are of
/// the file that is read: its device and inode must be those the walk arrives at. `what`
/// names the file in the messages about the directories; the caller names its path.
pub fn read_trusted_file(path: &Path, limit: u64, what: &str) -> std::io::Result<Vec<u8>> {
    let (f, meta) = open_trusted(path, what)?;
    if meta.len() > limit {
        return Err(std::io::Error::other(format!(
            "{} bytes; a {what} is at most {limit}",
            meta.len()
        )));
    }
    read_at_most(f, &meta, limit)
}

/// [`read_trusted_file`] for a text file: UTF-8, or an `InvalidData` error.
pub fn read_trusted_text(path: &Path, limit: u64, what: &str) -> std::io::Result<String> {
    String::from_utf8(read_trusted_file(path, limit, what)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// [`read_trusted_file`]'s checks, on the file opened for reading.
fn open_trusted(path: &Path, what: &str) -> std::io::Result<(fs::File, fs::Metadata)> {
    let me = nix::unistd::geteuid().as_raw();
    // Walked first and opened where the walk arrived, not following a link there: nothing is
    // opened (a device, say) before it is judged (review BE-10).
    let (real, seen) = walk_trusted(path, me, what)?;
    if !seen.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let (f, meta) = open_regular(&real)?;
    // The kernel must agree with the walk: a `/proc/PID/root` or `/proc/PID/fd/N` link is
    // followed by the kernel into another process's view, where the walk read its text
    // (review BF-1).
    let kernel = fs::metadata(path)?;
    if (seen.dev(), seen.ino()) != (meta.dev(), meta.ino())
        || (kernel.dev(), kernel.ino()) != (meta.dev(), meta.ino())
    {
        return Err(std::io::Error::other(format!(
            "is not the file {} its path leads to component by component: it changed while \
             being checked (try again), or the path goes through a /proc link (give the file's \
             own path)",
            real.display()
        )));
    }
    let why = if trusted_owner(meta.uid(), me) {
        others_can_write(&real, &meta)
    } else {
        Some(format!("it is owned by uid {}", meta.uid()))
    };
    if let Some(why) = why {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "must be owned by {} and not writable by {DATA_WRITERS}, but {why} (owner uid {}, \
                 group gid {}, mode {:o}): otherwise another user could change it",
                owners(me),
                meta.uid(),
                meta.gid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok((f, meta))
}

fn trusted_owner(uid: u32, me: u32) -> bool {
    uid == me || uid == 0
}

/// "uid N or root", or "root" when the daemon runs as root.
fn owners(me: u32) -> String {
    if me == 0 {
        "root".to_owned()
    } else {
        format!("uid {me} or root")
    }
}

/// Most symbolic links followed in one path, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// Resolves `path` one component at a time, as the kernel does, and returns where it leads.
/// Every directory passed through must be owned by the daemon's uid (`me`) or root and not
/// writable by others (nor by a group other than a user private group) unless it is sticky or
/// a Kubernetes volume mounted read-only ([`is_kubelet_volume`]); an entry taken from a sticky directory others can write (a
/// link in `/tmp`) must itself be owned by `me` or root, as only its owner can replace it
/// there. A relative path is resolved from the working directory, whose own path is walked too.
/// Links are followed wherever they are in the path, so a link in the middle of a chain is
/// judged by the directory it sits in (review BD-3).
fn walk_trusted(
    path: &Path,
    me: u32,
    what: &str,
) -> std::io::Result<(std::path::PathBuf, fs::Metadata)> {
    use std::ffi::OsString;
    use std::path::{Component, PathBuf};
    let refuse = |at: &Path, m: &fs::Metadata, why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} (on the way to the {what}) {why} (owner uid {}, group gid {}, mode {:o}): \
                 otherwise another user could replace the {what}",
                at.display(),
                m.uid(),
                m.gid(),
                m.mode() & 0o7777
            ),
        )
    };
    // Components still to walk, the next one last.
    fn push(todo: &mut Vec<OsString>, p: &Path) {
        for c in p.components().rev() {
            match c {
                Component::RootDir => todo.push("/".into()),
                Component::ParentDir => todo.push("..".into()),
                Component::Normal(n) => todo.push(n.to_owned()),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
    }
    let mut todo = Vec::new();
    if path.is_absolute() {
        push(&mut todo, path);
    } else {
        push(&mut todo, &std::env::current_dir()?.join(path));
    }
    let mut cur = PathBuf::from("/");
    let mut last = fs::symlink_metadata(&cur)?;
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == "/" {
            cur = PathBuf::from("/");
            last = fs::symlink_metadata(&cur)?;
            continue;
        }
        if c == ".." {
            cur.pop();
            last = fs::symlink_metadata(&cur)?;
            continue;
        }
        // `cur` is a real directory (links are resolved as they come) and `last` its metadata:
        // judge it, then the entry taken from it.
        let dm = &last;
        let sticky = dm.mode() & 0o1000 != 0;
        let open = others_can_write(&cur, dm).is_some() && !is_kubelet_volume(&cur);
        if !trusted_owner(dm.uid(), me) {
            return Err(refuse(
                &cur,
                dm,
                &format!("must be owned by {}", owners(me)),
            ));
        }
        if open && !sticky {
            return Err(refuse(
                &cur,
                dm,
                &format!(
                    "must not be writable by {DATA_WRITERS} unless sticky (or a Kubernetes \
                     volume the kubelet mounted read-only)"
                ),
            ));
        }
        let next = cur.join(&c);
        let em = fs::symlink_metadata(&next)?;
        if open && !trusted_owner(em.uid(), me) {
            return Err(refuse(
                &next,
                &em,
                &format!(
                    "sits in a sticky directory others can write and must be owned by {}",
                    owners(me)
                ),
            ));
        }
        // There an owner can also be borrowed: a hard link to someone else's file (where
        // `fs.protected_hardlinks` is off), or a mount (FUSE) that reports any owner (review
        // BE-9).
        if open && em.dev() != dm.dev() {
            return Err(refuse(
                &next,
                &em,
                "sits in a sticky directory others can write and is on another file system (a \
                 mount point)",
            ));
        }
        if open && !em.is_dir() && em.nlink() != 1 {
            return Err(refuse(
                &next,
                &em,
                "sits in a sticky directory others can write and has other hard links",
            ));
        }
        if em.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_LINKS} symbolic links on the way to the {what}"
                )));
            }
            let target = fs::read_link(&next)?;
            // A descriptor's link under /proc (`/dev/stdin` from a pipe, process
            // substitution) names no path but `pipe:[…]`, `socket:[…]` or `anon_inode:…`:
            // say so rather than "No such file or directory" from walking that text.
            if next.starts_with("/proc") && !target.is_absolute() && {
                let t = target.as_os_str().as_encoded_bytes();
                t.starts_with(b"pipe:")
                    || t.starts_with(b"socket:")
                    || t.starts_with(b"anon_inode:")
            } {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} is {}, not a regular file: the {what} must be a file",
                        path.display(),
                        target.display()
                    ),
                ));
            }
            push(&mut todo, &target);
        } else {
            cur = next;
            last = em;
        }
    }
    Ok((cur, last))
}

/// Largest key or certificate file read: a chain of a dozen certificates is a few KiB.
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// Reads an operator-supplied key or certificate file (an operator CA, the HTTPS listener's
/// pair) through one descriptor: a file nobody but the daemon's user or root can change or
/// swap, as [`read_trusted_file`] (whoever could would have the daemon sign with their CA;
/// review BD-5), at most [`MAX_PEM_FILE`] bytes, and with `private`, readable by its owner
/// only, judged on the file that is read rather than on a second lookup of the path. Errors do
/// not name the path: the caller does.
pub fn read_pem_file(path: &Path, private: bool) -> std::io::Result<String> {
    let what = if private {
        "key file"
    } else {
        "certificate file"
    };
    let (f, meta) = open_trusted(path, what)?;
    let mode = meta.mode();
    if private && mode & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "mode {:o}; a private key must be readable by its owner only (chmod 600 {})",
            mode & 0o777,
            path.display()
        )));
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(std::io::Error::other(format!(
            "{} bytes; a key or certificate file is at most {MAX_PEM_FILE}",
            meta.len()
        )));
    }
    let bytes = read_at_most(f, &meta, MAX_PEM_FILE)?;
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not PEM text"))
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
        // A pipe's descriptor (`--config /dev/stdin` from a pipe) names no file.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&r);
        let via_fd = std::path::PathBuf::from(format!("/proc/self/fd/{fd}"));
        let e = read_trusted_file(&via_fd, 1024, "config file")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is pipe:[") && e.contains("not a regular file"),
            "{e}"
        );
        let big = dir.path().join("big.pem");
        fs::write(&big, vec![b'a'; MAX_PEM_FILE as usize + 1]).unwrap();
        let e = read_pem_file(&big, false).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn trusted_files_are_read_only_when_nobody_else_can_change_them() {
        let d = tempfile::tempdir().unwrap();
        let read = |p: &Path| read_trusted_file(p, 64, "policy file").map_err(|e| e.to_string());
        let mode =
            |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        let good = d.path().join("good");
        fs::create_dir(&good).unwrap();
        let f = good.join("p.cedar");
        fs::write(&f, "permit").unwrap();
        mode(&f, 0o644);
        assert_eq!(read(&f).unwrap(), b"permit");
        // Writable by others, or by a group the daemon's user does not have to itself.
        mode(&f, 0o666);
        let e = read(&f).unwrap_err();
        assert!(
            e.contains("not writable by") && e.contains("mode 666"),
            "{e}"
        );
        // The daemon's own group with no other member: the user private group of `umask 0002`
        // (root's group has other members on some systems: then it is as good as others).
        mode(&f, 0o664);
        let own = nix::unistd::getegid().as_raw();
        assert_eq!(read(&f).is_ok(), is_private_group(own));
        let me = nix::unistd::geteuid();
        let other_gid = nix::unistd::Gid::from_raw(nix::unistd::getegid().as_raw() + 4242);
        if nix::unistd::chown(&f, None, Some(other_gid)).is_ok() {
            mode(&f, 0o664);
            let e = read(&f).unwrap_err();
            assert!(
                e.contains("is not the daemon's"),
                "the reason is given: {e}"
            );
            mode(&f, 0o644);
            read(&f).unwrap();
            nix::unistd::chown(&f, None, Some(nix::unistd::getegid())).unwrap();
        }
        // A POSIX ACL naming another user makes the group bits its mask: refused. One with
        // only the owner, group and others entries (`cp -a` can leave it) says no more than the
        // mode (review BE-7).
        if is_private_group(own) {
            let acl = |entries: &[(u16, u16, u32)]| {
                let mut v = 2u32.to_le_bytes().to_vec();
                for (tag, perm, id) in entries {
                    v.extend(tag.to_le_bytes());
                    v.extend(perm.to_le_bytes());
                    v.extend(id.to_le_bytes());
                }
                v
            };
            let set = |v: &[u8]| {
                use std::os::unix::ffi::OsStrExt;
                let c = std::ffi::CString::new(f.as_os_str().as_bytes()).unwrap();
                // SAFETY: NUL-terminated strings and a buffer of the length passed.
                unsafe {
                    libc::lsetxattr(
                        c.as_ptr(),
                        c"system.posix_acl_access".as_ptr(),
                        v.as_ptr().cast(),
                        v.len(),
                        0,
                    ) == 0
                }
            };
            let minimal = acl(&[
                (0x01, 6, u32::MAX),
                (0x04, 6, u32::MAX),
                (0x20, 4, u32::MAX),
            ]);
            if set(&minimal) {
                mode(&f, 0o664);
                read(&f).unwrap();
                let named = acl(&[
                    (0x01, 6, u32::MAX),
                    (0x02, 6, 4242),
                    (0x04, 4, u32::MAX),
                    (0x10, 6, u32::MAX),
                    (0x20, 4, u32::MAX),
                ]);
                assert!(set(&named));
                let e = read(&f).unwrap_err();
                assert!(e.contains("POSIX ACL"), "{e}");
                mode(&f, 0o644);
                assert!(set(&minimal));
            }
        }
        // Owned by another user (only root can hand a file over, as here).
        if me.is_root() {
            nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
            let e = read(&f).unwrap_err();
            assert!(e.contains("owner uid 4242"), "{e}");
            nix::unistd::chown(&f, Some(me), None).unwrap();
        }
        mode(&f, 0o644);
        // A directory above that others can write (not sticky): the file could be swapped.
        let open = d.path().join("open");
        fs::create_dir(&open).unwrap();
        let g = open.join("p.cedar");
        fs::write(&g, "permit").unwrap();
        mode(&open, 0o777);
        let e = read(&g).unwrap_err();
        assert!(e.contains("on the way to the policy file"), "{e}");
        mode(&open, 0o1777);
        read(&g).unwrap();
        mode(&open, 0o777);
        // A link is judged where it is and where it leads.
        let to_open = good.join("link.cedar");
        std::os::unix::fs::symlink(&g, &to_open).unwrap();
        assert!(read(&to_open).is_err(), "the target's directory is open");
        let in_open = open.join("link.cedar");
        std::os::unix::fs::symlink(&f, &in_open).unwrap();
        assert!(read(&in_open).is_err(), "the link's directory is open");
        // A link in the middle of a chain, in a directory others can write (review BD-3):
        // good/chain -> open/mid -> good/p.cedar.
        let mid = open.join("mid");
        std::os::unix::fs::symlink(&f, &mid).unwrap();
        let chain = good.join("chain");
        std::os::unix::fs::symlink(&mid, &chain).unwrap();
        let e = read(&chain).unwrap_err();
        assert!(e.contains(&open.display().to_string()), "{e}");
        mode(&open, 0o755);
        read(&to_open).unwrap();
        read(&in_open).unwrap();
        read(&chain).unwrap();
        // `..` is walked as the kernel does: from where the path has got to.
        assert_eq!(read(&open.join("../good/p.cedar")).unwrap(), b"permit");
        // In a sticky directory others can write, a hard link lends any file's owner (review
        // BE-9): a file there must have no other link.
        mode(&open, 0o1777);
        let hard = open.join("hard.cedar");
        fs::hard_link(&f, &hard).unwrap();
        let e = read(&hard).unwrap_err();
        assert!(e.contains("hard links"), "{e}");
        fs::remove_file(&hard).unwrap();
        // A symbolic link too: a hard link to root's link lends root's ownership (review BF-3).
        let hard_link_to_link = open.join("hard-link.cedar");
        fs::hard_link(&to_open, &hard_link_to_link).unwrap();
        if fs::symlink_metadata(&hard_link_to_link)
            .unwrap()
            .file_type()
            .is_symlink()
        {
            let e = read(&hard_link_to_link).unwrap_err();
            assert!(e.contains("hard links"), "{e}");
        }
        fs::remove_file(&hard_link_to_link).unwrap();
        mode(&open, 0o755);
        // In a sticky directory others can write, a link must be its reader's or root's: only
        // its owner can replace it there.
        if me.is_root() {
            mode(&open, 0o1777);
            std::os::unix::fs::lchown(&in_open, Some(4242), None).unwrap();
            let e = read(&in_open).unwrap_err();
            assert!(e.contains("sticky"), "{e}");
            mode(&open, 0o755);
        }
        // Not a regular file, or too large.
        let fifo = good.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(read(&fifo).unwrap_err().contains("not a regular file"));
        fs::write(&f, [b'a'; 65]).unwrap();
        assert!(read(&f).unwrap_err().contains("at most 64"));
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
