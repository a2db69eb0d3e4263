//! Baseline: fresh certificates per second from a conventional Go CA server, cfssl's HTTP API
//! (`cfssl serve`, Debian package `golang-cfssl`), on the same machine as Tessera.
//!
//! The work per certificate matches what Tessera does per X.509-SVID: a fresh ECDSA P-256 key
//! pair and a leaf certificate signed by an ECDSA P-256 CA. `POST /api/v1/cfssl/newcert`
//! is the cfssl endpoint that does both server-side, so we drive that. The comparison leans
//! in cfssl's favour on everything except crypto: plaintext HTTP/1.1 on loopback with
//! keep-alive, no caller authentication or attestation, no policy, no persistence. It leans
//! slightly against cfssl on crypto: `newcert` builds and self-signs a CSR for the new key and
//! verifies that CSR before signing the certificate, so each certificate costs one key
//! generation, two signatures and one verification instead of one key generation and one
//! signature. cfssl 1.2 also has no URI SANs: the SPIFFE ID we put in `hosts` comes back as a
//! DNS name, which is irrelevant to cost but means its output is not a valid X.509-SVID.

use std::fs::File;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};

/// Figures from one run against `cfssl serve`.
pub struct CfsslResult {
    /// First line of `cfssl version`.
    pub version: String,
    /// Successful certificates per second.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-200 or malformed responses, and connection failures.
    pub errors: u64,
    /// At least one returned certificate chained to the CA (signature verified) and carried a
    /// P-256 key. `run` returns an error rather than measure a cfssl that fails this check.
    pub verified: bool,
}

const PATH: &str = "/api/v1/cfssl/newcert";
/// Long enough for a saturated server on a busy 2-core machine; short enough that a wedged
/// server fails the phase instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// cfssl's responses are about 2 KiB; anything far larger is not a `newcert` answer.
const MAX_BODY: usize = 1 << 20;

/// Kills `cfssl serve` however `run` ends, so a failed phase never leaves it holding a core.
struct Server {
    child: Child,
    log: std::path::PathBuf,
}

impl Server {
    /// The tail of cfssl's log, for error messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cfssl serve` on a free loopback port with a fresh ECDSA P-256 CA in a temp dir,
/// checks two of its certificates, drives `newcert` from `clients` concurrent keep-alive
/// HTTP/1.1 connections for `secs` seconds after a short warm-up, and stops the server (also
/// on an early return or panic).
pub async fn run(secs: f64, clients: usize) -> Result<CfsslResult, String> {
    let version = cfssl_version()?;
    let dir = tempfile::tempdir().map_err(|e| format!("cfssl: temp dir: {e}"))?;
    let ca_key = write_ca(dir.path())?;
    let addr = free_port()?;
    let mut server = start(dir.path(), addr)?;
    wait_ready(&mut server, addr).await?;

    // Check the output before measuring, so a misconfigured cfssl fails loudly instead of
    // producing a rate for something other than P-256 certificates from our CA.
    let mut conn = Conn::connect(addr)
        .await
        .map_err(|e| format!("cfssl: connect to {addr}: {e}"))?;
    let mut spkis = Vec::new();
    for n in 0..2 {
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, conn.post(addr, &request_body(0, n)))
            .await
            .map_err(|_| format!("cfssl: first newcert timed out\n{}", server.log_tail()))?
            .and_then(|resp| certificate(&resp))
            .map_err(|e| format!("cfssl: first newcert: {e}\n{}", server.log_tail()))?;
        let spki =
            verify(&resp, &ca_key).map_err(|e| format!("cfssl: returned certificate: {e}"))?;
        spkis.push(spki);
    }
    // newcert is only a fair match if every certificate gets its own key.
    if spkis[0] == spkis[1] {
        return Err("cfssl: two newcert calls returned the same public key".into());
    }
    drop(conn);

    let warmup = Duration::from_secs_f64((secs * 0.2).clamp(0.2, 1.0));
    let measure_from = Instant::now() + warmup;
    let until = measure_from + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|id| tokio::spawn(client(addr, id, measure_from, until)))
        .collect();
    let mut lat_us = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (lat, errs) = task.await.map_err(|e| format!("cfssl: client task: {e}"))?;
        lat_us.extend(lat);
        errors += errs;
    }
    drop(server);

    lat_us.sort_unstable();
    let pct = |p: f64| {
        lat_us
            .get(((lat_us.len() as f64 * p) as usize).min(lat_us.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    Ok(CfsslResult {
        version,
        rate: lat_us.len() as f64 / secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
        verified: true,
    })
}

fn cfssl_version() -> Result<String, String> {
    let out = Command::new("cfssl").arg("version").output().map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            "cfssl not found on PATH: install the Debian package golang-cfssl \
             (apt-get install golang-cfssl)"
                .to_string()
        } else {
            format!("cfssl version: {e}")
        }
    })?;
    if !out.status.success() {
        return Err(format!(
            "cfssl version: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Writes a fresh P-256 CA and a signing policy shaped like an X.509-SVID (short-lived,
/// client and server auth) into `dir`; returns the CA's public key for verification.
fn write_ca(dir: &Path) -> Result<Vec<u8>, String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cfssl: CA key: {e}"))?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("cfssl: CA params: {e}"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Tessera bench cfssl CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cfssl: CA cert: {e}"))?;
    let config = json!({"signing": {"default": {
        "expiry": "1h",
        "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
    }}});
    let files = [
        ("ca.pem", cert.pem()),
        ("ca-key.pem", key.serialize_pem()),
        ("config.json", config.to_string()),
    ];
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents)
            .map_err(|e| format!("cfssl: write {name}: {e}"))?;
    }
    Ok(key.public_key_raw().to_vec())
}

/// The OS picks a free port; it stays free long enough for cfssl to bind it on a quiet loopback.
fn free_port() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("cfssl: free port: {e}"))?;
    listener
        .local_addr()
        .map_err(|e| format!("cfssl: free port: {e}"))
}

fn start(dir: &Path, addr: SocketAddr) -> Result<Server, String> {
    let log = dir.join("cfssl.log");
    let out = File::create(&log).map_err(|e| format!("cfssl: log file: {e}"))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("cfssl: log file: {e}"))?;
    let child = Command::new("cfssl")
        .arg("serve")
        .args(["-address", &addr.ip().to_string()])
        .args(["-port", &addr.port().to_string()])
        .arg("-ca")
        .arg(dir.join("ca.pem"))
        .arg("-ca-key")
        .arg(dir.join("ca-key.pem"))
        .arg("-config")
        .arg(dir.join("config.json"))
        // 2 = warnings: at the default (info) cfssl logs every request, which would cost it
        // time the other engines do not spend.
        .args(["-loglevel", "2"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cfssl serve: {e}"))?;
    Ok(Server { child, log })
}

async fn wait_ready(server: &mut Server, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(format!(
                "cfssl serve exited ({status}):\n{}",
                server.log_tail()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "cfssl serve did not accept connections on {addr} within {STARTUP_TIMEOUT:?}:\n{}",
                server.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request_body(client: usize, n: u64) -> Vec<u8> {
    let id = format!("spiffe://bench.test/cfssl/{client}/{n}");
    json!({"request": {"CN": id, "hosts": [id], "key": {"algo": "ecdsa", "size": 256}}})
        .to_string()
        .into_bytes()
}

/// One client: its own keep-alive connection, reopened after any failure. Returns the
/// latencies (µs) of successes and the number of failures among requests started inside
/// the measured window and, for successes, also finished inside it.
async fn client(
    addr: SocketAddr,
    id: usize,
    measure_from: Instant,
    until: Instant,
) -> (Vec<u64>, u64) {
    let mut lat_us = Vec::new();
    let mut errors = 0;
    let mut conn: Option<Conn> = None;
    let mut n = 0;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match Conn::connect(addr).await {
                Ok(c) => c,
                Err(_) => {
                    errors += u64::from(now >= measure_from);
                    // Avoid spinning on a dead server.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let body = request_body(id, n);
        n += 1;
        // Time the request alone, not a reconnect before it (rare: only after a failure).
        let start = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, c.post(addr, &body)).await;
        let end = Instant::now();
        let ok = match result {
            Ok(Ok(resp)) => {
                let ok = certificate(&resp).is_ok();
                if resp.keep_alive {
                    conn = Some(c);
                }
                ok
            }
            // Framing errors and timeouts leave the stream in an unknown state: drop it.
            Ok(Err(_)) | Err(_) => false,
        };
        if start >= measure_from {
            if !ok {
                errors += 1;
            } else if end <= until {
                lat_us.push((end - start).as_micros() as u64);
            }
        }
    }
    (lat_us, errors)
}

struct Response {
    status: u16,
    body: Vec<u8>,
    keep_alive: bool,
}

/// A minimal HTTP/1.1 client: enough for cfssl's Go `net/http` server, without pulling a
/// client library into the bench for one endpoint.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::new(stream),
        })
    }

    async fn post(&mut self, addr: SocketAddr, body: &[u8]) -> Result<Response, String> {
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        let io = |e: std::io::Error| e.to_string();
        self.stream.get_mut().write_all(&req).await.map_err(io)?;

        let mut line = String::new();
        self.read_line(&mut line).await?;
        let status = line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| format!("bad status line {:?}", line.trim_end()))?;
        let (mut length, mut chunked, mut keep_alive) = (None, false, true);
        loop {
            self.read_line(&mut line).await?;
            if line == "\r\n" {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header {:?}", line.trim_end()))?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| format!("bad Content-Length {value:?}"))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
                if !chunked {
                    return Err(format!("unsupported Transfer-Encoding {value:?}"));
                }
            } else if name.eq_ignore_ascii_case("connection") {
                keep_alive = !value.eq_ignore_ascii_case("close");
            }
        }

        let mut body = Vec::new();
        if chunked {
            loop {
                self.read_line(&mut line).await?;
                let size = line.trim_end().split(';').next().unwrap_or_default();
                let size = usize::from_str_radix(size.trim(), 16)
                    .map_err(|_| format!("bad chunk size {size:?}"))?;
                if size == 0 {
                    // Skip trailers up to the blank line that ends the message.
                    loop {
                        self.read_line(&mut line).await?;
                        if line == "\r\n" {
                            break;
                        }
                    }
                    break;
                }
                if body.len() + size > MAX_BODY {
                    return Err("response body too large".into());
                }
                let at = body.len();
                body.resize(at + size, 0);
                self.stream.read_exact(&mut body[at..]).await.map_err(io)?;
                let mut crlf = [0; 2];
                self.stream.read_exact(&mut crlf).await.map_err(io)?;
            }
        } else {
            let length =
                length.ok_or("response has neither Content-Length nor chunked encoding")?;
            if length > MAX_BODY {
                return Err("response body too large".into());
            }
            body.resize(length, 0);
            self.stream.read_exact(&mut body).await.map_err(io)?;
        }
        Ok(Response {
            status,
            body,
            keep_alive,
        })
    }

    /// Reads one CRLF-terminated line into `line` (replacing its contents).
    async fn read_line(&mut self, line: &mut String) -> Result<(), String> {
        line.clear();
        match self.stream.read_line(line).await {
            Ok(0) => Err("connection closed".into()),
            Ok(_) if !line.ends_with("\r\n") => Err(format!("truncated line {line:?}")),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The PEM certificate from a successful `newcert` answer.
fn certificate(resp: &Response) -> Result<String, String> {
    let text = || {
        String::from_utf8_lossy(&resp.body)
            .chars()
            .take(300)
            .collect::<String>()
    };
    if resp.status != 200 {
        return Err(format!("HTTP {}: {}", resp.status, text()));
    }
    let v: Value =
        serde_json::from_slice(&resp.body).map_err(|e| format!("bad JSON ({e}): {}", text()))?;
    if v["success"] != Value::Bool(true) {
        return Err(format!("cfssl reported failure: {}", text()));
    }
    // The key is generated server-side; its absence would mean this is not the newcert we meant.
    if v["result"]["private_key"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        return Err("no private_key in the answer".into());
    }
    v["result"]["certificate"]
        .as_str()
        .filter(|pem| pem.starts_with("-----BEGIN CERTIFICATE-----"))
        .map(str::to_string)
        .ok_or_else(|| format!("no certificate in the answer: {}", text()))
}

/// Checks that `pem` is signed by the CA key (ECDSA P-256 with SHA-256) and carries a P-256
/// public key; returns its SubjectPublicKeyInfo so callers can tell keys apart.
fn verify(pem: &str, ca_public_key: &[u8]) -> Result<Vec<u8>, String> {
    let der = pem::parse(pem).map_err(|e| format!("PEM: {e}"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.contents()).map_err(|e| format!("X.509: {e}"))?;
    if cert.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(format!(
            "signature algorithm {}, want ecdsa-with-SHA256",
            cert.signature_algorithm.algorithm
        ));
    }
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        ca_public_key,
    )
    .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
    .map_err(|_| "signature does not verify with the CA key")?;
    let spki = cert.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(format!(
            "public key {} {curve:?}, want EC P-256",
            spki.algorithm.algorithm
        ));
    }
    Ok(spki.raw.to_vec())
}
