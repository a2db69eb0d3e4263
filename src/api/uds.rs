//! Unix-socket listeners for gRPC: binding safely and carrying the kernel's peer credentials
//! of each connection into every request.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::attest::PeerInfo;

/// Connection info put into each request's extensions: the peer, if the kernel told us.
#[derive(Debug, Clone)]
pub struct PeerConn(pub Option<Arc<PeerInfo>>);

/// An accepted connection with its peer credentials.
#[derive(Debug)]
pub struct UdsConn {
    stream: UnixStream,
    peer: PeerConn,
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
        Pin::new(&mut self.stream).poll_read(cx, buf)
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

/// Binds a Unix socket at `path` with file mode `mode`.
///
/// The directory is created (0755) if missing and must be owned by us or root and not
/// writable by others, so nobody else can swap the socket. A stale socket from a crashed run
/// is replaced; a live one (another daemon answers) or a non-socket file is an error.
pub fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent directory", path.display())))?;
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let meta = std::fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if (meta.uid() != me && meta.uid() != 0) || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "socket directory {} must be owned by uid {me} or root and not writable by group or others (owner {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o777
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket_like() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use by a running process (another tesserad?)",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
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
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
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
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UdsConn>> {
    futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let peer = match PeerInfo::from_socket(stream.as_raw_fd()) {
                        Ok(p) => Some(Arc::new(p)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read peer credentials; the connection gets no identity");
                            None
                        }
                    };
                    return Some((
                        Ok(UdsConn {
                            stream,
                            peer: PeerConn(peer),
                        }),
                        listener,
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}
