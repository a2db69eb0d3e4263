//! Unix-socket listeners for gRPC: binding safely and carrying the kernel's peer credentials
//! of each connection into every request.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

pub use crate::fsutil::{check_above, check_above_data, check_private_dir};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::api::authority::AuthorityFix;
use crate::api::limits::{PerUid, Slot};
use crate::attest::PeerInfo;

/// Connection info put into each request's extensions: the peer, if the kernel told us.
#[derive(Debug, Clone)]
pub struct PeerConn(pub Option<Arc<PeerInfo>>);

/// An accepted connection with its peer credentials.
#[derive(Debug)]
pub struct UdsConn {
    stream: UnixStream,
    peer: PeerConn,
    /// Counted against the peer's uid while the connection is open.
    _slot: Slot,
    /// The client's bytes on their way to the HTTP/2 server, until the connection is known
    /// to need no `:authority` rewriting ([`AuthorityFix`]); then `None`.
    fix: Option<Box<Rewriting>>,
    /// Bytes the client may still send, for a connection the listener's admission check
    /// refused ([`UNADMITTED_READ_BYTES`]); `None`: no limit.
    budget: Option<usize>,
}

/// Bytes a connection that its listener's admission check refuses may send before it is
/// closed. Enough for a few small requests, so the caller still hears `PermissionDenied` from
/// the service (and the probe is audited there), while no such connection can make the HTTP/2
/// server hold more: it would otherwise buffer a message body per stream, 16 MiB per
/// connection on the admin socket, for any local user once `[admin]` grants open the socket.
pub const UNADMITTED_READ_BYTES: usize = 16 * 1024;

/// A listener's admission check on a connection's peer credentials and socket.
pub type Admit = Arc<dyn Fn(&PeerInfo, std::os::fd::RawFd) -> bool + Send + Sync>;

/// The supplementary groups the peer held when it connected (`SO_PEERGROUPS`).
pub fn peer_groups(fd: std::os::fd::RawFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`' buffer and sets `len`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // Too small: the kernel said how much it needs.
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// A connection's rewriter with what it produced and the server has not read yet.
#[derive(Default)]
struct Rewriting {
    fix: AuthorityFix,
    /// What the rewriter produced, and how much of it the server has read.
    out: Vec<u8>,
    taken: usize,
    /// What was read from the client and the rewriter has not taken yet (it stops once
    /// [`crate::api::authority::MAX_PENDING_OUT`] waits), and how much of it it took.
    input: Vec<u8>,
    used: usize,
}

impl std::fmt::Debug for Rewriting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriting")
            .field("pending", &(self.out.len() - self.taken))
            .finish_non_exhaustive()
    }
}

impl Connected for UdsConn {
    type ConnectInfo = PeerConn;
    fn connect_info(&self) -> PeerConn {
        self.peer.clone()
    }
}

impl AsyncRead for UdsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(left) = self.budget else {
            return self.poll_read_unlimited(cx, buf);
        };
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "a connection refused by the admission check sent more than it may",
            )));
        }
        let mut chunk = [0u8; 4096];
        let room = left.min(chunk.len()).min(buf.remaining());
        let mut limited = ReadBuf::new(&mut chunk[..room]);
        std::task::ready!(self.as_mut().poll_read_unlimited(cx, &mut limited))?;
        buf.put_slice(limited.filled());
        self.budget = Some(left - limited.filled().len());
        Poll::Ready(Ok(()))
    }
}

impl UdsConn {
    fn poll_read_unlimited(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let Some(r) = this.fix.as_mut() else {
                return Pin::new(&mut this.stream).poll_read(cx, buf);
            };
            if r.taken < r.out.len() {
                let n = (r.out.len() - r.taken).min(buf.remaining());
                buf.put_slice(&r.out[r.taken..r.taken + n]);
                r.taken += n;
                return Poll::Ready(Ok(()));
            }
            r.out.clear();
            r.taken = 0;
            // A burst of rewritten blocks must not stay allocated for the connection's life.
            if r.out.capacity() > 2 * crate::api::authority::MAX_PENDING_OUT {
                r.out = Vec::new();
            }
            if r.used < r.input.len() {
                let n = r.fix.process(&r.input[r.used..], &mut r.out)?;
                r.used += n;
                if r.used == r.input.len() {
                    r.input.clear();
                    r.used = 0;
                }
                continue;
            }
            if r.fix.passthrough() {
                this.fix = None;
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            r.input.extend_from_slice(read.filled());
        }
    }
}

impl AsyncWrite for UdsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Checks that nobody but `owner` (or root) can replace `dir` or anything in it: `dir` is a
/// real directory (not a symbolic link) owned by `owner` or root and not writable by group or
/// others, and every directory above it is owned by `owner` or root and either not writable by
/// others or sticky (as `/tmp` is: then only the owner of `dir` can rename it). Otherwise
/// another local user could swap the directory for one holding a socket of their own, and
/// serve a fake Workload API to workloads and the CLI. With `owner` `None` (a client that does
/// not know which uid the daemon runs as) ownership is not checked, the rest is.
pub fn check_socket_dir(dir: &Path, owner: Option<u32>) -> io::Result<()> {
    check_private_dir(dir, owner, "socket directory")
}

/// Binds a Unix socket at `path` with file mode `mode`.
///
/// The directory is created (0755) if missing and must pass [`check_socket_dir`], so nobody
/// else can swap the socket. A stale socket from a crashed run is replaced; a live one
/// (another daemon answers) or a non-socket file is an error.
pub fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| io::Error::other(format!("{} has no parent directory", path.display())))?;
    if std::fs::symlink_metadata(dir).is_err() {
        use std::os::unix::fs::DirBuilderExt;
        // Created with its mode (not chmod'ed after): an existing directory, or a link
        // planted meanwhile, is not touched here and fails the check below.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
        // The umask may have narrowed it (0700 under UMask=0077 would shut workloads of other
        // users out). fchmod on the directory opened without following links: never on
        // whatever a link planted meanwhile points at.
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(dir)?
            .set_permissions(std::fs::Permissions::from_mode(0o755))?;
    }
    check_socket_dir(dir, Some(nix::unistd::geteuid().as_raw()))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket_like() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "{} is in use by a running process (another tesserad?)",
                            path.display()
                        ),
                    ));
                }
                // Nobody listens: left by a crashed run.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                }
                // Anything else (a full backlog, no permission) says nothing about whether a
                // daemon is there: do not take its socket away.
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "{} exists and cannot be probed ({e}); remove it if no tesserad uses it",
                            path.display()
                        ),
                    ));
                }
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bound under a temporary name, given its mode, and only then renamed into place: bound
    // at `path` directly, the socket would sit there with the umask's mode (0777 under
    // UMask=0000) until the chmod. The directory was checked above to be writable by this
    // user alone, so nobody else can take or swap the temporary name.
    let tmp = dir.join(format!(".tesserad.{}.tmp", std::process::id()));
    // Unix socket paths hold at most 107 bytes: should the temporary name not fit where the
    // configured one does, bind in place and chmod right after, as before.
    if tmp.as_os_str().len() > 107 {
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        return Ok(listener);
    }
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| rename_no_replace(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Renames `from` to `to` unless `to` exists: a socket another daemon bound at `to` after the
/// probe above is not taken away (bind at `to` itself would have failed with EADDRINUSE).
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} appeared while binding (another tesserad starting?)",
                to.display()
            ),
        ));
    }
    Err(e)
}

trait IsSocket {
    fn is_socket_like(&self) -> bool;
}

impl IsSocket for std::fs::FileType {
    fn is_socket_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_socket()
    }
}

/// A gRPC client channel to a Unix socket (used by the CLI, tests and benchmarks).
pub async fn channel(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let p = path.to_owned();
    // The URI is required by tonic but unused: the connector decides where we go.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                UnixStream::connect(p)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

/// The accepted connections of `listener`, each with its peer credentials read at accept.
/// With `admit`, a connection whose peer it refuses (or whose peer is unknown) may send only
/// [`UNADMITTED_READ_BYTES`].
pub fn incoming(
    listener: UnixListener,
    limits: Arc<PerUid>,
    admit: Option<Admit>,
) -> impl Stream<Item = io::Result<UdsConn>> {
    let warned = crate::api::limits::Throttle::new(Duration::from_secs(10));
    futures_util::stream::unfold(
        (listener, limits, warned, admit),
        |(listener, limits, warned, admit)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let peer = match PeerInfo::from_socket(stream.as_raw_fd()) {
                            Ok(p) => Some(Arc::new(p)),
                            // The connecting process exited (and was reaped) before the
                            // accept: routine, and any caller can cause it, so not a warning.
                            Err(e)
                                if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EINVAL)) =>
                            {
                                tracing::debug!(error = %e, "the peer exited before its connection was accepted; the connection gets no identity");
                                None
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read peer credentials; the connection gets no identity");
                                None
                            }
                        };
                        // Without credentials the connection counts against one shared uid.
                        let uid = peer.as_ref().map_or(u32::MAX, |p| p.uid);
                        let Ok(slot) = limits.take(uid) else {
                            // Closed at once; one warning per 10 s is enough to be seen.
                            if warned.ready() {
                                tracing::warn!(
                                    uid,
                                    counted_as = crate::api::limits::principal(uid),
                                    held = limits.held(uid),
                                    "connection refused: too many open connections for this uid (or in all)"
                                );
                            }
                            continue;
                        };
                        let budget = admit.as_ref().and_then(|admit| {
                            let admitted = peer
                                .as_deref()
                                .is_some_and(|p| admit(p, stream.as_raw_fd()));
                            if let Some(p) = peer.as_deref() {
                                p.admitted
                                    .store(admitted, std::sync::atomic::Ordering::Release);
                            }
                            (!admitted).then_some(UNADMITTED_READ_BYTES)
                        });
                        return Some((
                            Ok(UdsConn {
                                stream,
                                budget,
                                peer: PeerConn(peer),
                                _slot: slot,
                                fix: Some(Box::default()),
                            }),
                            (listener, limits, warned, admit),
                        ));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_data_directory_may_sit_under_its_users_own_group_writable_parent_only() {
        let d = tempfile::tempdir().unwrap();
        let me = Some(nix::unistd::geteuid().as_raw());
        let dir = d.path().join("p");
        std::fs::create_dir(&dir).unwrap();
        // `umask 0002` makes ~/.local so, in the user's own group (this process's, with no
        // other member when it is root's, as here).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2775)).unwrap();
        let own = nix::unistd::getegid().as_raw();
        assert_eq!(
            check_above_data(&dir, me, "data directory").is_ok(),
            crate::fsutil::is_private_group(own),
            "passes only if this user's group has no other member"
        );
        // A group shared with other users is as good as others.
        let other_gid = nix::unistd::getegid().as_raw() + 4242;
        if nix::unistd::chown(&dir, None, Some(nix::unistd::Gid::from_raw(other_gid))).is_ok() {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2775)).unwrap();
            assert!(check_above_data(&dir, me, "data directory").is_err());
        }
        assert!(
            check_above(&dir, me, "socket directory").is_err(),
            "sockets stay strict"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_above_data(&dir, me, "data directory").unwrap_err();
        assert!(e.to_string().contains("or others"), "{e}");
    }

    #[tokio::test]
    async fn binds_in_a_new_directory_and_refuses_a_directory_others_can_swap() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("run/workload.sock");
        drop(bind(&sock, 0o666).unwrap());
        let m = std::fs::metadata(d.path().join("run")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o755);

        // A symbolic link to a directory that would pass the checks itself.
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        let e = bind(&d.path().join("link/workload.sock"), 0o666).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!real.join("workload.sock").exists());

        // A good directory inside one anybody can write to (and so rename it).
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir(open.join("run")).unwrap();
        let e = bind(&open.join("run/workload.sock"), 0o666).unwrap_err();
        assert!(e.to_string().contains("unless sticky"), "{e}");
        // Sticky, as /tmp is: only the owner of `run` can rename it.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        drop(bind(&open.join("run/workload.sock"), 0o666).unwrap());
    }

    /// Reads what `conn` yields until an error or the end: (bytes, error kind).
    async fn drain(mut conn: UdsConn) -> (usize, Option<io::ErrorKind>) {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0;
        loop {
            match conn.read(&mut buf).await {
                Ok(0) => return (n, None),
                Ok(k) => n += k,
                Err(e) => return (n, Some(e.kind())),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_the_admission_check_refuses_may_send_only_a_little() {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("a.sock");
        for (admitted, expect) in [(false, UNADMITTED_READ_BYTES), (true, 100_000)] {
            let admit: Admit = Arc::new(move |_, fd| {
                // The peer's groups are readable where the check runs.
                assert!(peer_groups(fd).is_ok());
                admitted
            });
            let listener = bind(&sock, 0o600).unwrap();
            let mut conns = Box::pin(incoming(listener, PerUid::new(8, 8), Some(admit)));
            let mut client = UnixStream::connect(&sock).await.unwrap();
            let conn = conns.next().await.unwrap().unwrap();
            let writer = tokio::spawn(async move {
                let _ = client.write_all(&[7u8; 100_000]).await;
            });
            let (n, err) = drain(conn).await;
            assert_eq!(n, expect);
            assert_eq!(err, (!admitted).then_some(io::ErrorKind::ConnectionAborted));
            writer.abort();
            drop(conns);
            let _ = std::fs::remove_file(&sock);
        }
    }

    #[test]
    fn peer_groups_are_those_of_the_connecting_process() {
        // Root gives the connecting process groups of its own (more than the first guess of
        // the buffer's size); anyone else checks the groups it holds itself.
        let want: Vec<u32> = if nix::unistd::geteuid().is_root() {
            (5000..5100).collect()
        } else {
            nix::unistd::getgroups()
                .unwrap()
                .into_iter()
                .map(|g| g.as_raw())
                .collect()
        };
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("g.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut cmd = std::process::Command::new("python3");
        cmd.args([
            "-c",
            "import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);s.recv(1)",
        ])
        .arg(&sock);
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::process::CommandExt;
            let groups = want.clone();
            // SAFETY: setgroups(2) only, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(groups.len(), groups.as_ptr()) == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut seen = peer_groups(conn.as_raw_fd()).unwrap();
        drop(conn);
        child.wait().unwrap();
        seen.sort_unstable();
        let mut want = want;
        want.sort_unstable();
        assert_eq!(seen, want);
    }

    #[test]
    fn the_rename_into_place_never_replaces_what_appeared_there() {
        let d = tempfile::tempdir().unwrap();
        let (from, to) = (d.path().join("from"), d.path().join("to"));
        std::fs::write(&from, b"ours").unwrap();
        std::fs::write(&to, b"theirs").unwrap();
        let e = rename_no_replace(&from, &to).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(std::fs::read(&to).unwrap(), b"theirs");
        std::fs::remove_file(&to).unwrap();
        rename_no_replace(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"ours");
    }

    #[tokio::test]
    async fn the_socket_appears_with_its_mode_and_no_temporary_is_left() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("a.sock");
        let l = bind(&sock, 0o600).unwrap();
        assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("a.sock")]);
        // The renamed socket is the one listening.
        let _c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        drop(l);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("w.sock");
        let live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = bind(&sock, 0o666).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(live); // the file stays; nobody listens
        assert!(sock.exists());
        drop(bind(&sock, 0o666).unwrap());
    }
}
