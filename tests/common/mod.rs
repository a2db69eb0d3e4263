//! Test support: start the real `tesserad` binary on temp paths and talk to it.
#![allow(dead_code)]

pub mod idp;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// A certificate serial as lease listings show it: its last 16 bytes in hex (Tessera's are
/// 16 bytes, positive, with no leading zero byte to strip).
pub fn serial_key(raw_serial: &[u8]) -> String {
    hex::encode(&raw_serial[raw_serial.len().saturating_sub(16)..])
}

/// `m` with the metadata every Workload API request must carry (`workload.spiffe.io: true`).
pub fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("static header"));
    r
}

/// A numeric knob for benchmarks, e.g. `TESSERA_BENCH_SECS`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Path of the daemon binary built by cargo for this test run.
pub fn tesserad_bin() -> PathBuf {
    // TESSERAD: another build of the daemon (the bench suite against a release to compare).
    std::env::var_os("TESSERAD")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_tesserad")),
            PathBuf::from,
        )
}

/// Path of the CLI binary.
pub fn tessera_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tessera"))
}

/// Reports a test (or part of one) this machine cannot run, and whether to go on without it.
/// Under `TESSERA_TEST_STRICT=1` (set by CI, which runs as root on a VM that can host every
/// test) a skip fails instead: a machine that lost a test's preconditions must not turn it
/// into a silent pass.
#[allow(dead_code)]
pub fn skip(why: &str) {
    assert!(
        std::env::var_os("TESSERA_TEST_STRICT").is_none_or(|v| v != "1"),
        "TESSERA_TEST_STRICT=1, yet this test would be skipped: {why}"
    );
    eprintln!("skipped: {why}");
}

/// This process's effective uid.
pub fn my_uid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

/// A running daemon with its own temp directory, stopped (SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub http: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
}

/// A temp directory that other uids can traverse (so that tests can connect as them).
/// Writes a file tesserad will read as config, policy or certificate: 0644 whatever the umask,
/// since it refuses one a shared group could change.
#[allow(dead_code)]
pub fn write_fixture(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) {
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("tessera-test")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

impl Daemon {
    /// Starts the daemon with `extra` TOML appended to a config that puts every path in a temp
    /// directory and lets the kernel pick the HTTP port. Panics if it does not become ready.
    pub fn start(extra: &str) -> Self {
        Self::start_in(open_tempdir(), extra)
    }

    /// Same, reusing an existing directory (restart with the same state).
    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Self {
        let config_path = dir.path().join("tesserad.toml");
        let socket = dir.path().join("run/workload.sock");
        let admin_socket = dir.path().join("run/admin.sock");
        let data_dir = dir.path().join("data");
        let base = format!(
            // Dotted keys, no table headers: tests add `[ca]`, `[[entries]]` or dotted keys
            // such as `admin.allowed_uids` without clashing.
            "data_dir = {data:?}\nlog.format = \"json\"\nlog.level = \"info,tessera=debug\"\nworkload_api.socket = {sock:?}\nadmin.socket = {admin:?}\nhttp.listen = \"127.0.0.1:0\"\n",
            data = data_dir,
            sock = socket,
            admin = admin_socket
        );
        // A key the test sets itself replaces the base's.
        let base: String = base
            .lines()
            .filter(|l| {
                let key = l.split('=').next().unwrap_or_default().trim();
                !extra
                    .lines()
                    .any(|e| e.split('=').next().unwrap_or_default().trim() == key)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_fixture(&config_path, merge_toml(&base, extra));
        let mut child = Command::new(tesserad_bin())
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tesserad");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tesserad serving") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "tesserad did not become ready:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let http = v["fields"]["http"].as_str().unwrap().parse().unwrap();
        Self {
            child: Some(child),
            dir,
            socket,
            admin_socket,
            data_dir,
            config_path,
            http,
            logs,
        }
    }

    /// `unix:///...` endpoint for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A connected `spiffe` crate client.
    pub async fn client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(self.endpoint())
            .await
            .expect("connect")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// True while the daemon process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// Sends a signal and waits for exit (up to `timeout`).
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> ExitStatus {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.pid(), sig) };
        self.wait_exit(timeout)
    }

    /// Waits for the daemon to exit (up to `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < timeout,
                "tesserad did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon and hands back its directory, for a restart on the same state.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
        self.child = None;
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_as(&tessera_bin(), args)
    }

    /// Runs `bin`, a copy of the CLI (which entries can tell apart by path), against this
    /// daemon.
    pub fn cli_as(&self, bin: &Path, args: &[&str]) -> std::process::Output {
        Command::new(bin)
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", self.endpoint())
            .env("TESSERA_ADMIN_SOCKET", &self.admin_socket)
            .output()
            .unwrap()
    }

    /// Creates a stored entry through the CLI; returns its id.
    pub fn create_entry(&self, spiffe_id: &str, selector: &str) -> String {
        let o = self.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--selector",
            selector,
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// All log lines so far.
    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

/// A credential that must never reach the daemon's log or its audit log.
#[derive(Debug, Clone, Copy)]
pub enum Secret<'a> {
    /// An SVID's private key: PKCS#8 DER of a P-256 key, as the Workload API hands it out.
    Key(&'a [u8]),
    /// A bearer token (JWT-SVID, task token).
    Token(&'a str),
}

impl Secret<'_> {
    /// How a leak of it would read in text, each with a label for the failure message.
    fn forms(self) -> Vec<(&'static str, String)> {
        use base64::Engine;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        match self {
            Secret::Token(t) => vec![
                ("the token", t.to_owned()),
                // The part that makes it usable, should a log split the token up.
                (
                    "the token's signature",
                    t.rsplit('.').next().unwrap().to_owned(),
                ),
            ],
            Secret::Key(der) => {
                // ECPrivateKey inside the PKCS#8: version 1, then the 32-byte scalar.
                let at = der
                    .windows(5)
                    .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
                    .expect("a P-256 PKCS#8 private key")
                    + 5;
                let scalar = &der[at..at + 32];
                assert!(
                    at + 8 <= 48,
                    "the DER's first 48 bytes hold part of the scalar"
                );
                vec![
                    // The first 48 bytes encode to the first 64 characters of the DER's base64,
                    // so a base64 or PEM dump (64-character lines) of the key shows them; they
                    // run past the header every P-256 key shares into the scalar.
                    ("the key's base64 DER", STANDARD.encode(&der[..48])),
                    (
                        "the key's base64url DER",
                        URL_SAFE_NO_PAD.encode(&der[..48]),
                    ),
                    // The scalar alone, which any hex or byte-list dump of the DER contains:
                    // `{:?}` of a protobuf message prints its bytes fields as decimal lists.
                    ("the key's scalar in hex", hex::encode(scalar)),
                    ("the key's scalar in HEX", hex::encode_upper(scalar)),
                    (
                        "the key's scalar as a byte list",
                        scalar
                            .iter()
                            .map(u8::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                ]
            }
        }
    }
}

/// Panics if any of `secrets` shows in `d`'s log so far or in its audit files (the live one and
/// any rotated ones). Call it after a few more round trips than the issuance, so that the
/// log reader has caught up with what the daemon wrote while serving it.
pub fn assert_no_secret(d: &Daemon, secrets: &[Secret<'_>]) {
    let mut places = vec![("the daemon's log".to_owned(), d.log_text())];
    for f in std::fs::read_dir(&d.data_dir).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("audit") && name.ends_with(".jsonl") {
            let text = std::fs::read_to_string(d.data_dir.join(&name)).unwrap();
            places.push((format!("data_dir/{name}"), text));
        }
    }
    assert!(
        places.len() > 1,
        "no audit file in {}",
        d.data_dir.display()
    );
    for s in secrets {
        for (what, form) in s.forms() {
            for (place, text) in &places {
                assert!(!text.contains(&form), "{what} is in {place}");
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Puts `extra`'s top-level keys before the base config's tables, so both parse as one file.
fn merge_toml(base: &str, extra: &str) -> String {
    let (top, tables): (Vec<&str>, Vec<&str>) = {
        let mut top = Vec::new();
        let mut rest = Vec::new();
        let mut in_table = false;
        for l in extra.lines() {
            if l.trim_start().starts_with('[') {
                in_table = true;
            }
            if in_table { rest.push(l) } else { top.push(l) }
        }
        (top, rest)
    };
    format!("{}\n{}\n{}\n", top.join("\n"), base, tables.join("\n"))
}

/// An entry for `uid`, as TOML.
pub fn entry_for_uid(id: &str, uid: u32, extra: &str) -> String {
    format!(
        "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/{id}\"\nselectors = [\"unix:uid:{uid}\"]\n{extra}\n"
    )
}

/// Path of the test binary that is running (its `unix:path` selector).
pub fn current_exe() -> PathBuf {
    std::env::current_exe().unwrap()
}

/// Exists so tests can pass `&Path` around without importing.
pub fn p(s: &str) -> &Path {
    Path::new(s)
}

/// A gRPC channel to a Unix socket.
pub async fn channel(path: &Path) -> tonic::transport::Channel {
    tessera::api::uds::channel(path)
        .await
        .expect("connect to the socket")
}

/// The value of the unlabelled metric `name` in a `/metrics` body.
#[allow(dead_code)]
pub fn metric<T: std::str::FromStr>(body: &str, name: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// A plain HTTP/1.1 GET on loopback: (status code, body bytes).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let code = std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap();
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |i| i + 4);
    (code, buf[at..].to_vec())
}

/// A plain HTTP/1.1 POST on loopback: (status code, headers, body bytes).
pub fn http_post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let code = std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap();
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&buf[..at]).to_string();
    (code, head, buf[at..].to_vec())
}

/// URL-encodes form fields.
pub fn form(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        s.append_pair(k, v);
    }
    s.finish().into_bytes()
}

/// Every lease the daemon holds, read page by page through the admin API.
pub async fn all_leases(admin_socket: &Path) -> Vec<tessera::proto::tessera::v1::Lease> {
    use tessera::proto::tessera::v1 as apb;
    let mut admin = apb::admin_client::AdminClient::new(channel(admin_socket).await);
    let (mut out, mut token) = (Vec::new(), String::new());
    loop {
        let r = admin
            .list_leases(apb::ListLeasesRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list leases")
            .into_inner();
        out.extend(r.leases);
        if r.next_page_token.is_empty() {
            return out;
        }
        token = r.next_page_token;
    }
}
