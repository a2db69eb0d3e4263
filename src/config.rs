//! Typed daemon configuration.
//!
//! Owns: the TOML file format (the key names are a contract with operators, tests and deploy
//! files), the built-in defaults that make a zero-config start work for root and non-root
//! users alike, and validation. A bad config never gets past [`Config::load`]; every error
//! names the key and what is wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;

use crate::attest::Selector;
use crate::registry::{Entry, Risk};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "tessera.internal";
/// HTTP listener used when none is configured.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8780";
/// X.509-SVID lifetime when neither the entry nor `[ca]` sets one.
pub const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(15 * 60);
/// JWT-SVID lifetime when neither the entry nor `[ca]` sets one.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(5 * 60);
/// Default `[tasks] token_ttl`.
pub const DEFAULT_TASK_TTL: Duration = Duration::from_secs(5 * 60);
/// Default `[tasks] max_ttl`.
pub const DEFAULT_TASK_MAX_TTL: Duration = Duration::from_secs(3600);
/// Default `[tasks] approval_ttl`.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(15 * 60);
/// Default `[tasks] retention`: how long a task record outlives its first use.
pub const DEFAULT_TASK_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default `[inventory] idle_after`.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);
/// Lifetime of a CA that Tessera generates itself.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default `[workload_api] crl_update_splay`.
pub const DEFAULT_CRL_UPDATE_SPLAY: Duration = Duration::from_secs(5);
/// Longest `[workload_api] crl_update_splay`: a CRL is re-signed at least every 20 minutes and
/// valid for an hour, and a revocation should reach relying parties well within either.
pub const MAX_CRL_UPDATE_SPLAY: Duration = Duration::from_secs(5 * 60);
/// Longest registration entry `hint` (Workload API §8).
pub const MAX_HINT_BYTES: usize = 1024;

/// Longest lifetime for a CA the daemon generates: 100 years, as the config's `"100y"` reads
/// them (humantime's year is 365.25 days), so that `"100y"` itself is accepted.
pub const MAX_CA_TTL: Duration = Duration::from_secs(3_155_760_000);
/// Shortest SVID lifetime accepted: rotation at half-life needs room for clock skew.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(2);

/// A config error: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a wrong type (the message carries line and key).
    #[error("config file {path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `entries[2].selectors`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// ---- File format (serde) -------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    workload_api: RawWorkloadApi,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    ca: RawCa,
    #[serde(default)]
    attestation: RawAttestation,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    entries: Vec<EntrySpec>,
    #[serde(default)]
    oidc_issuers: Vec<RawOidcIssuer>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    tasks: RawTasks,
    #[serde(default)]
    inventory: RawInventory,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidcIssuer {
    issuer: Option<String>,
    #[serde(default)]
    audiences: Vec<String>,
    jwks_uri: Option<String>,
    jwks_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    file: Option<PathBuf>,
    schema: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTasks {
    token_ttl: Option<String>,
    max_ttl: Option<String>,
    approval_ttl: Option<String>,
    retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    idle_after: Option<String>,
    refuse_idle: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkloadApi {
    socket: Option<PathBuf>,
    allow_unauthenticated_verifiers: Option<bool>,
    crl_update_splay: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    #[serde(default)]
    allowed_gids: Vec<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    issuer: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_svid: Option<bool>,
    allow_plaintext: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCa {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    x509_svid_ttl: Option<String>,
    jwt_svid_ttl: Option<String>,
    ca_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    max_file_mib: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    max_exe_hash_mib: Option<u64>,
}

/// A registration entry as written by people: in the config file, through the admin API, and
/// as stored. [`EntrySpec::validate`] turns it into an [`Entry`] or says which field is wrong.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// The identity granted.
    pub spiffe_id: Option<String>,
    /// `unix:...` selectors; all must match. Never empty.
    #[serde(default)]
    pub selectors: Vec<String>,
    /// Duration such as `"10m"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509_svid_ttl: Option<String>,
    /// Duration such as `"5m"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_svid_ttl: Option<String>,
    /// Who is accountable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// What it is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// `low`, `medium` or `high`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<String>,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Workload API hint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Longest lifetime of this agent's task credentials, e.g. `"10m"` (the daemon's
    /// `[tasks] max_ttl` still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_task_ttl: Option<String>,
}

// ---- Validated config ----------------------------------------------------------------------

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Trust domain of every SVID issued.
    pub trust_domain: TrustDomain,
    /// State directory (CA keys, later leases and audit log). Created 0700.
    pub data_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log_level: String,
    /// Workload API socket path.
    pub workload_socket: PathBuf,
    /// Serve bundles and validation to callers with no identity.
    pub allow_unauthenticated_verifiers: bool,
    /// Streams send a change that is only a re-signed CRL after a random delay up to this, each
    /// its own, so the workloads that reload on every message do not all reload at once
    /// (Workload API §4.3). Zero sends at once.
    pub crl_update_splay: Duration,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Extra uids allowed on the admin socket (root and the daemon's uid always are).
    pub admin_uids: Vec<u32>,
    /// Extra gids allowed on the admin socket.
    pub admin_gids: Vec<u32>,
    /// HTTP listen address.
    pub http_listen: SocketAddr,
    /// Operator-supplied CA certificate (PEM chain) and key, if any.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// Lifetime of a generated CA.
    pub ca_ttl: Duration,
    /// Default X.509-SVID lifetime.
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub jwt_svid_ttl: Duration,
    /// Executables larger than this are not hashed.
    pub max_exe_hash_bytes: u64,
    /// Registration entries from the file, in match order (entries created through the admin
    /// API are stored in the lease store and follow these).
    pub entries: Vec<Entry>,
    /// Largest audit file before it is rotated.
    pub audit_max_bytes: u64,
    /// Tessera's OAuth issuer URL (`[http] issuer`); `None` = derived from the bound address.
    pub http_issuer: Option<String>,
    /// TLS on the HTTP listener.
    pub http_tls: Option<HttpTls>,
    /// OIDC issuers whose tokens may be exchanged.
    pub oidc_issuers: Vec<OidcIssuerConfig>,
    /// Cedar policy file; `None` = no policy, so every exchange is denied.
    pub policy_file: Option<PathBuf>,
    /// Cedar schema the policies are validated against; `None` = the built-in one.
    pub policy_schema: Option<PathBuf>,
    /// Task token lifetime when the request does not ask for less.
    pub task_ttl: Duration,
    /// No task credential lives longer than this.
    pub task_max_ttl: Duration,
    /// How long a pending or approved high-risk request waits.
    pub approval_ttl: Duration,
    /// A task record (its owner, whether it is complete) is forgotten this long after the
    /// task's first use, once none of its credentials exists (active, or revoked and not yet
    /// expired).
    pub task_retention: Duration,
    /// An entry with no issuance for this long is idle.
    pub idle_after: Duration,
    /// Idle entries get nothing until an operator reviews them.
    pub refuse_idle: bool,
}

/// TLS for the HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpTls {
    /// Operator-supplied certificate chain and key (PEM).
    Files {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// Private key (0600).
        key: PathBuf,
    },
    /// The daemon's own X.509-SVID (`spiffe://<td>/tesserad`), rotated automatically.
    Svid,
}

/// Where an OIDC issuer's signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `<issuer>/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery,
    /// A configured JWKS URL.
    JwksUri(String),
    /// A local JWKS file (air-gapped sites).
    JwksFile(PathBuf),
}

/// One `[[oidc_issuers]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIssuerConfig {
    /// Exact `iss` value.
    pub issuer: String,
    /// Accepted `aud` values: every `aud` of a token must be one of them (OIDC Core
    /// §3.1.3.7: a token also meant for parties Tessera does not trust is refused).
    pub audiences: Vec<String>,
    /// Key source.
    pub keys: KeySource,
}

/// Is `url` acceptable for fetching keys: `https`, or `http` to a loopback host.
pub fn url_allowed(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    let loopback = host_is_loopback(&u).ok_or_else(|| format!("{url:?} has no host"))?;
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "{url:?} must use https (plain http is allowed only for loopback hosts)"
        )),
        other => Err(format!("{url:?}: scheme {other:?} is not https")),
    }
}

/// Whether the URL's host names this machine: `localhost` and its subdomains (RFC 6761
/// §6.3), 127.0.0.0/8, ::1, the unspecified addresses (a connection to 0.0.0.0 or :: reaches
/// this host) and their IPv4-mapped IPv6 forms; `None` without a host. Names are not
/// resolved, so one that a DNS server maps to a loopback address is not caught.
fn host_is_loopback(u: &reqwest::Url) -> Option<bool> {
    let v4 = |ip: std::net::Ipv4Addr| ip.is_loopback() || ip.is_unspecified();
    Some(match u.host()? {
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        url::Host::Ipv4(ip) => v4(ip),
        url::Host::Ipv6(ip) => {
            ip.is_loopback() || ip.is_unspecified() || ip.to_ipv4_mapped().is_some_and(v4)
        }
    })
}

/// Checks a `jwks_uri` that `issuer`'s discovery document named: as [`url_allowed`], and
/// pointing at a loopback host only if the issuer itself is one. A remote issuer must not
/// be able to aim the daemon at services listening on its own loopback interface.
pub fn jwks_uri_allowed(issuer: &str, jwks_uri: &str) -> Result<(), String> {
    url_allowed(jwks_uri)?;
    let local = |s: &str| {
        reqwest::Url::parse(s)
            .ok()
            .and_then(|u| host_is_loopback(&u))
            .unwrap_or(false)
    };
    if local(jwks_uri) && !local(issuer) {
        return Err(format!(
            "jwks_uri {jwks_uri:?} is on a loopback host but the issuer is not; refused"
        ));
    }
    Ok(())
}

/// Default locations, chosen so that a newcomer can start the daemon without root:
/// root uses the FHS system paths; anyone else uses XDG directories under their home.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// State directory.
    pub data_dir: PathBuf,
    /// Workload API socket.
    pub workload_socket: PathBuf,
    /// Admin socket.
    pub admin_socket: PathBuf,
}

impl Defaults {
    /// Defaults for the current user. The CLI uses the same function to find the daemon.
    pub fn for_current_user() -> Self {
        let uid = nix::unistd::geteuid().as_raw();
        if uid == 0 {
            return Self {
                data_dir: "/var/lib/tessera".into(),
                workload_socket: "/run/tessera/workload.sock".into(),
                admin_socket: "/run/tessera/admin.sock".into(),
            };
        }
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let data_dir = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| home.map(|h| h.join(".local/share")))
            .unwrap_or_else(|| std::env::temp_dir().join(format!("tessera-{uid}-data")))
            .join("tessera");
        let run_dir = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|p| p.join("tessera"))
            .unwrap_or_else(|| std::env::temp_dir().join(format!("tessera-{uid}")));
        Self {
            data_dir,
            workload_socket: run_dir.join("workload.sock"),
            admin_socket: run_dir.join("admin.sock"),
        }
    }
}

/// Largest config file read: a few thousand registration entries fit in well under it.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

impl Config {
    /// Loads and validates a config file; `None` means built-in defaults only. The file must
    /// be one only the daemon's user or root can change ([`crate::fsutil::read_trusted_file`]).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_toml("", Path::new("<defaults>")),
            Some(p) => {
                let text = crate::fsutil::read_trusted_text(p, MAX_CONFIG_BYTES, "config file")
                    .map_err(|source| ConfigError::Read {
                        path: p.to_owned(),
                        source,
                    })?;
                Self::from_toml(&text, p)
            }
        }
    }

    /// Parses and validates TOML text; `origin` is used in messages.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Self::validate(raw, &Defaults::for_current_user())
    }

    fn validate(raw: RawConfig, defaults: &Defaults) -> Result<Self, ConfigError> {
        let trust_domain =
            TrustDomain::parse(raw.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN))
                .map_err(|e| invalid("trust_domain", e.to_string()))?;

        let data_dir = absolute("data_dir", raw.data_dir, &defaults.data_dir)?;
        let workload_socket = absolute(
            "workload_api.socket",
            raw.workload_api.socket,
            &defaults.workload_socket,
        )?;
        let admin_socket = absolute("admin.socket", raw.admin.socket, &defaults.admin_socket)?;
        // As paths, not as text: `/run/t/../t/w.sock` is `/run/t/w.sock`. (A directory
        // reached through a symbolic link is refused when the socket is bound.)
        if lexical(&workload_socket) == lexical(&admin_socket) {
            return Err(invalid(
                "admin.socket",
                "must differ from workload_api.socket: the admin API must not be reachable by workloads",
            ));
        }
        // tesserad makes data_dir 0700 at every start: a socket under it would be out of
        // reach of every other uid while the daemon reported serving.
        let data = lexical(&data_dir);
        // The admin socket may be, unless other operators are named: only the daemon's own
        // user reaches it there.
        if lexical(&admin_socket).starts_with(&data)
            && !(raw.admin.allowed_uids.is_empty() && raw.admin.allowed_gids.is_empty())
        {
            return Err(invalid(
                "admin.socket",
                format!(
                    "must not be inside data_dir ({}) when [admin] allowed_uids or allowed_gids \
                     name other operators: the directory is private to the daemon's user",
                    data_dir.display()
                ),
            ));
        }
        if lexical(&workload_socket).starts_with(&data) {
            return Err(invalid(
                "workload_api.socket",
                format!(
                    "must not be inside data_dir ({}), which is private to the daemon: \
                     workloads of other users could not reach it",
                    data_dir.display()
                ),
            ));
        }

        let log_format = match raw.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                ));
            }
        };
        let log_level = raw.log.level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid("log.level", e.to_string()))?;

        let listen = raw.http.listen.as_deref().unwrap_or(DEFAULT_HTTP_LISTEN);
        let http_listen: SocketAddr = listen.parse().map_err(|_| {
            invalid(
                "http.listen",
                format!("{listen:?} is not an IP:port address such as \"127.0.0.1:8780\""),
            )
        })?;

        let ca_files = match (raw.ca.cert, raw.ca.key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((
                absolute("ca.cert", Some(c), Path::new(""))?,
                absolute("ca.key", Some(k), Path::new(""))?,
            )),
            (Some(_), None) => {
                return Err(invalid("ca.key", "ca.cert is set, so ca.key is required"));
            }
            (None, Some(_)) => {
                return Err(invalid("ca.cert", "ca.key is set, so ca.cert is required"));
            }
        };
        if ca_files.is_some() && raw.ca.ca_ttl.is_some() {
            return Err(invalid(
                "ca.ca_ttl",
                "applies only to a CA that tesserad generates; with ca.cert and ca.key set, \
                 the certificate's own dates count. Remove ca.ca_ttl",
            ));
        }
        let ca_ttl = duration("ca.ca_ttl", raw.ca.ca_ttl.as_deref(), DEFAULT_CA_TTL)?;
        if ca_ttl < Duration::from_secs(3600) {
            return Err(invalid("ca.ca_ttl", "must be at least 1h"));
        }
        // A certificate cannot say a date past 9999 (RFC 5280 §4.1.2.5.2), and a root that
        // outlives its operators is a key nobody rotates.
        if ca_ttl > MAX_CA_TTL {
            return Err(invalid("ca.ca_ttl", "must be at most 100y"));
        }
        let x509_svid_ttl = svid_ttl(
            "ca.x509_svid_ttl",
            raw.ca.x509_svid_ttl.as_deref(),
            DEFAULT_X509_SVID_TTL,
        )?;
        let jwt_svid_ttl = svid_ttl(
            "ca.jwt_svid_ttl",
            raw.ca.jwt_svid_ttl.as_deref(),
            DEFAULT_JWT_SVID_TTL,
        )?;

        // 0 would rotate at every record; far above 1 TiB, `<< 20` would wrap to that.
        let audit_max_bytes = match raw.audit.max_file_mib.unwrap_or(256) {
            m @ 1..=1_048_576 => m << 20,
            _ => {
                return Err(invalid(
                    "audit.max_file_mib",
                    "must be between 1 and 1048576 (1 TiB)",
                ));
            }
        };
        let max_exe_hash_bytes = match raw.attestation.max_exe_hash_mib {
            None => 512 << 20,
            Some(0) => {
                return Err(invalid(
                    "attestation.max_exe_hash_mib",
                    "must be at least 1",
                ));
            }
            Some(m) if m > 64 << 10 => {
                return Err(invalid(
                    "attestation.max_exe_hash_mib",
                    "must be at most 65536",
                ));
            }
            Some(m) => m << 20,
        };

        let http_issuer = match raw.http.issuer {
            None => None,
            Some(i) => {
                let u = reqwest::Url::parse(&i)
                    .map_err(|e| invalid("http.issuer", format!("{i:?} is not a URL ({e})")))?;
                // RFC 8414 §3: with no path in the issuer, metadata and endpoints live at the
                // host root, which is where Tessera serves them.
                if !matches!(u.scheme(), "http" | "https")
                    || u.query().is_some()
                    || u.fragment().is_some()
                    || !u.path().trim_end_matches('/').is_empty()
                {
                    return Err(invalid(
                        "http.issuer",
                        "must be an http(s) URL with no path, query or fragment, e.g. \"https://tessera.example:8780\"",
                    ));
                }
                // Kept as written: relying parties compare issuers as strings, and a trailing
                // slash is a different issuer to them (endpoints are built without it).
                Some(i)
            }
        };
        let http_tls = match (raw.http.tls_cert, raw.http.tls_key, raw.http.tls_svid) {
            (None, None, None | Some(false)) => None,
            (None, None, Some(true)) => Some(HttpTls::Svid),
            (Some(c), Some(k), None | Some(false)) => Some(HttpTls::Files {
                cert: absolute("http.tls_cert", Some(c), Path::new(""))?,
                key: absolute("http.tls_key", Some(k), Path::new(""))?,
            }),
            (Some(_), Some(_), Some(true)) => {
                return Err(invalid(
                    "http.tls_svid",
                    "cannot be combined with http.tls_cert/tls_key; choose one",
                ));
            }
            (Some(_), None, _) => {
                return Err(invalid(
                    "http.tls_key",
                    "http.tls_cert is set, so tls_key is required",
                ));
            }
            (None, Some(_), _) => {
                return Err(invalid(
                    "http.tls_cert",
                    "http.tls_key is set, so tls_cert is required",
                ));
            }
        };

        // RFC 6749 §3.2, RFC 7009 §2 and RFC 7662 §4 require TLS: beyond loopback, the
        // listener carries users' ID tokens, agents' JWT-SVIDs and task tokens. Behind a
        // TLS-terminating proxy the operator says so.
        if http_tls.is_none() && raw.http.allow_plaintext != Some(true) {
            if !http_listen.ip().is_loopback() {
                return Err(invalid(
                    "http.listen",
                    format!(
                        "{http_listen} is not a loopback address, and without TLS tokens would cross the network in cleartext; set http.tls_svid = true (or tls_cert/tls_key), or http.allow_plaintext = true behind a TLS-terminating proxy"
                    ),
                ));
            }
            // Parsed, so that HTTP:// is caught too.
            if let Some(u) = http_issuer
                .as_deref()
                .and_then(|i| reqwest::Url::parse(i).ok())
                && u.scheme() == "http"
                && host_is_loopback(&u) != Some(true)
            {
                return Err(invalid(
                    "http.issuer",
                    "an http:// issuer beyond loopback sends tokens in cleartext; use https://, or set http.allow_plaintext = true behind a TLS-terminating proxy",
                ));
            }
        }
        // The issuer goes into task tokens, discovery and the JWKS URL; derived from an
        // unspecified address it would be https://0.0.0.0:8780, which nobody can reach.
        if http_issuer.is_none() && http_listen.ip().is_unspecified() {
            return Err(invalid(
                "http.issuer",
                format!(
                    "is required when http.listen is {http_listen}: task tokens, discovery and the JWKS URL name it, so it must be a URL relying parties reach, e.g. \"https://tessera.example:8780\""
                ),
            ));
        }
        let mut oidc_issuers = Vec::with_capacity(raw.oidc_issuers.len());
        for (i, o) in raw.oidc_issuers.into_iter().enumerate() {
            let k = |f: &str| format!("oidc_issuers[{i}].{f}");
            let issuer = o
                .issuer
                .ok_or_else(|| invalid(k("issuer"), "is required"))?;
            url_allowed(&issuer).map_err(|m| invalid(k("issuer"), m))?;
            if oidc_issuers
                .iter()
                .any(|x: &OidcIssuerConfig| x.issuer == issuer)
            {
                return Err(invalid(k("issuer"), format!("{issuer} is listed twice")));
            }
            if o.audiences.is_empty() || o.audiences.iter().any(String::is_empty) {
                return Err(invalid(
                    k("audiences"),
                    "list at least one audience; tokens must be meant for Tessera (e.g. [\"tessera\"])",
                ));
            }
            let keys = match (o.jwks_uri, o.jwks_file) {
                (None, None) => KeySource::Discovery,
                (Some(u), None) => {
                    url_allowed(&u).map_err(|m| invalid(k("jwks_uri"), m))?;
                    KeySource::JwksUri(u)
                }
                (None, Some(f)) => {
                    KeySource::JwksFile(absolute(&k("jwks_file"), Some(f), Path::new(""))?)
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        k("jwks_file"),
                        "set jwks_uri or jwks_file, not both",
                    ));
                }
            };
            oidc_issuers.push(OidcIssuerConfig {
                issuer,
                audiences: o.audiences,
                keys,
            });
        }
        let policy_file = raw
            .policy
            .file
            .map(|f| absolute("policy.file", Some(f), Path::new("")))
            .transpose()?;
        let policy_schema = raw
            .policy
            .schema
            .map(|f| absolute("policy.schema", Some(f), Path::new("")))
            .transpose()?;
        let task_ttl = duration(
            "tasks.token_ttl",
            raw.tasks.token_ttl.as_deref(),
            DEFAULT_TASK_TTL,
        )?;
        let task_max_ttl = duration(
            "tasks.max_ttl",
            raw.tasks.max_ttl.as_deref(),
            DEFAULT_TASK_MAX_TTL,
        )?;
        for (key, ttl) in [
            ("tasks.token_ttl", task_ttl),
            ("tasks.max_ttl", task_max_ttl),
        ] {
            if ttl < Duration::from_secs(10) {
                return Err(invalid(key, "task lifetimes must be at least 10s"));
            }
        }
        if task_ttl > task_max_ttl {
            return Err(invalid("tasks.token_ttl", "must not exceed tasks.max_ttl"));
        }
        if task_max_ttl > Duration::from_secs(24 * 3600) {
            return Err(invalid(
                "tasks.max_ttl",
                "must be at most 24h: task credentials are short-lived by design",
            ));
        }
        let approval_ttl = duration_at_least(
            "tasks.approval_ttl",
            raw.tasks.approval_ttl.as_deref(),
            DEFAULT_APPROVAL_TTL,
            Duration::from_secs(10),
        )?;
        let task_retention = duration_at_least(
            "tasks.retention",
            raw.tasks.retention.as_deref(),
            DEFAULT_TASK_RETENTION,
            Duration::from_secs(1),
        )?;
        let idle_after = duration_at_least(
            "inventory.idle_after",
            raw.inventory.idle_after.as_deref(),
            DEFAULT_IDLE_AFTER,
            Duration::from_secs(1),
        )?;
        // Beyond that, milliseconds no longer fit the i64 the activity times are kept in.
        if idle_after > MAX_CA_TTL {
            return Err(invalid(
                "inventory.idle_after",
                "must be at most 100y (an entry unused for longer than it is never idle)",
            ));
        }

        let crl_update_splay = duration(
            "workload_api.crl_update_splay",
            raw.workload_api.crl_update_splay.as_deref(),
            DEFAULT_CRL_UPDATE_SPLAY,
        )?;
        if crl_update_splay > MAX_CRL_UPDATE_SPLAY {
            return Err(invalid(
                "workload_api.crl_update_splay",
                "must be at most 5m (a revocation should reach relying parties within minutes; \
                 CRLs are re-signed every 20m)",
            ));
        }

        let mut entries: Vec<Entry> = Vec::with_capacity(raw.entries.len());
        for (i, e) in raw.entries.into_iter().enumerate() {
            // Before the entry's own checks, whose bounds for it are stored entries' (wider).
            check_task_cap(
                &format!("entries[{i}].max_task_ttl"),
                e.max_task_ttl.as_deref(),
            )?;
            let mut entry = e.validate("", &format!("entries[{i}]."), &trust_domain)?;
            let id = config_entry_id(&entry);
            // Entries granting the same identity to the same callers (say, with other
            // hints) are told apart by their order among themselves.
            let same = entries
                .iter()
                .filter(|o| o.id.split('.').next() == Some(id.as_str()))
                .count();
            entry.id = match same {
                0 => id.into(),
                n => format!("{id}.{}", n + 1).into(),
            };
            entries.push(entry);
        }

        Ok(Self {
            trust_domain,
            data_dir,
            log_format,
            log_level,
            workload_socket,
            allow_unauthenticated_verifiers: raw
                .workload_api
                .allow_unauthenticated_verifiers
                .unwrap_or(false),
            crl_update_splay,
            admin_socket,
            admin_uids: raw.admin.allowed_uids,
            admin_gids: raw.admin.allowed_gids,
            http_listen,
            ca_files,
            ca_ttl,
            x509_svid_ttl,
            jwt_svid_ttl,
            max_exe_hash_bytes,
            entries,
            audit_max_bytes,
            http_issuer,
            http_tls,
            oidc_issuers,
            policy_file,
            policy_schema,
            task_ttl,
            task_max_ttl,
            approval_ttl,
            task_retention,
            idle_after,
            refuse_idle: raw.inventory.refuse_idle.unwrap_or(false),
        })
    }
}

/// The entry served when none are configured (in the file or through the admin API): the uid
/// that started the daemon gets `spiffe://<td>/unix/uid/<uid>`, so `tessera svid x509` works
/// right after start.
pub fn default_entry_for_current_user(td: &TrustDomain) -> Entry {
    let uid = nix::unistd::geteuid().as_raw();
    Entry {
        id: "default".into(),
        spiffe_id: SpiffeId::new(td, &format!("/unix/uid/{uid}"))
            .expect("a decimal uid is a valid path segment"),
        selectors: vec![Selector::Uid(uid)],
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        owner: Some(
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map_or_else(|| format!("uid {uid}"), |u| u.name),
        ),
        purpose: Some("built-in default entry for the user who started tesserad".into()),
        risk: Some(Risk::Low),
        expires_at: None,
        hint: None,
        max_task_ttl: None,
    }
}

/// `p` with `.` and `..` resolved by their names alone (nothing is read from the disk).
fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn absolute(key: &str, v: Option<PathBuf>, default: &Path) -> Result<PathBuf, ConfigError> {
    let p = v.unwrap_or_else(|| default.to_owned());
    if p.as_os_str().is_empty() {
        return Err(invalid(key, "is empty"));
    }
    if !p.is_absolute() {
        return Err(invalid(
            key,
            format!("{} is not an absolute path", p.display()),
        ));
    }
    Ok(p)
}

/// Parses a duration such as `"10m"`, `"30s"` or `"1h 30m"`.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| {
        invalid(
            key,
            format!("{s:?} is not a duration like \"30s\", \"10m\" or \"1h\" ({e})"),
        )
    })
}

fn duration(key: &str, v: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    v.map_or(Ok(default), |s| parse_duration(key, s))
}

fn duration_at_least(
    key: &str,
    v: Option<&str>,
    default: Duration,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let d = duration(key, v, default)?;
    if d < min {
        return Err(invalid(
            key,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(d)
}

/// An entry's cap on its task credentials, as new input (the config file, `entry create` and
/// `update`) must give it: within the bounds `[tasks]` lifetimes have. Entries stored before
/// this bound are loaded as they were (2s to 30d): their cap is only ever applied below
/// `[tasks] max_ttl`, and refusing them would stop all their credentials, not only tasks'.
pub fn check_task_cap(key: &str, cap: Option<&str>) -> Result<(), ConfigError> {
    match cap.map(|v| parse_duration(key, v)).transpose()? {
        Some(d) if d < Duration::from_secs(10) => {
            Err(invalid(key, "must be at least 10s, as task lifetimes are"))
        }
        Some(d) if d > Duration::from_secs(24 * 3600) => Err(invalid(
            key,
            "must be at most 24h: task credentials are short-lived by design",
        )),
        _ => Ok(()),
    }
}

fn svid_ttl(key: &str, v: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    let d = duration_at_least(key, v, default, MIN_SVID_TTL)?;
    if d > Duration::from_secs(30 * 24 * 3600) {
        return Err(invalid(
            key,
            "must be at most 30d: SVIDs are meant to be short-lived",
        ));
    }
    Ok(d)
}

fn non_empty(key: String, v: Option<String>) -> Result<Option<String>, ConfigError> {
    match v {
        Some(s) if s.trim().is_empty() => Err(invalid(key, "is empty; omit the key instead")),
        Some(s) if s.chars().any(char::is_control) => {
            Err(invalid(key, "contains a control character"))
        }
        other => Ok(other),
    }
}

impl EntrySpec {
    /// Validates into an entry with id `id`; error keys are prefixed with `key_prefix`
    /// (`entries[2].` in the config file, empty for the admin API).
    pub fn validate(
        &self,
        id: &str,
        key_prefix: &str,
        td: &TrustDomain,
    ) -> Result<Entry, ConfigError> {
        validate_entry(id, key_prefix, self.clone(), td)
    }
}

/// The id of an entry from the file: derived from what it grants to whom (its SPIFFE ID and
/// its selectors), not from its place in the file. Leases, idle clocks and reviews are kept
/// by entry id; by position (`config-N`), adding, removing or reordering entries moved them
/// onto other entries, and an idle entry refused under `refuse_idle` could inherit a busy
/// one's clock. Changing an entry's identity or selectors makes it another entry.
fn config_entry_id(e: &Entry) -> String {
    let mut selectors: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
    selectors.sort();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(e.spiffe_id.as_str().as_bytes());
    for s in &selectors {
        ctx.update(b"\n");
        ctx.update(s.as_bytes());
    }
    format!("config-{}", hex::encode(&ctx.finish().as_ref()[..6]))
}

fn validate_entry(
    id: &str,
    key_prefix: &str,
    e: EntrySpec,
    td: &TrustDomain,
) -> Result<Entry, ConfigError> {
    let k = |field: &str| format!("{key_prefix}{field}");
    let raw_id = e
        .spiffe_id
        .ok_or_else(|| invalid(k("spiffe_id"), "is required"))?;
    let spiffe_id = SpiffeId::parse(&raw_id)
        .map_err(|err| invalid(k("spiffe_id"), format!("{raw_id:?} {err}")))?;
    if spiffe_id.trust_domain_name() != td.as_str() {
        return Err(invalid(
            k("spiffe_id"),
            format!(
                "{raw_id} is not in this daemon's trust domain {}; it cannot be issued",
                td.as_str()
            ),
        ));
    }
    if spiffe_id.path().is_empty() {
        return Err(invalid(
            k("spiffe_id"),
            "an SVID's SPIFFE ID must have a path (the bare trust domain ID is reserved for the CA)",
        ));
    }
    // IDs the daemon mints itself: an entry holding one would give a workload a certificate
    // relying parties take for the daemon's HTTPS listener, or for another agent's task.
    if spiffe_id.path() == "/tesserad" {
        return Err(invalid(
            k("spiffe_id"),
            format!("{raw_id} is reserved for tesserad's own HTTPS identity"),
        ));
    }
    let segments: Vec<&str> = spiffe_id.path().split('/').skip(1).collect();
    if let Some(i) = (1..segments.len().saturating_sub(1)).find(|&i| segments[i] == "task") {
        return Err(invalid(
            k("spiffe_id"),
            format!(
                "{raw_id} has the form of a task X.509-SVID of spiffe://{}/{} (…/task/<task id>), \
                 which that agent could mint for itself; choose another path",
                td.as_str(),
                segments[..i].join("/")
            ),
        ));
    }
    if e.selectors.is_empty() {
        return Err(invalid(
            k("selectors"),
            "is empty; an entry with no selectors would match every caller. Add at least one, e.g. \"unix:uid:1000\"",
        ));
    }
    let mut selectors = Vec::with_capacity(e.selectors.len());
    for (j, s) in e.selectors.iter().enumerate() {
        let sel = Selector::parse(s)
            .map_err(|err| invalid(format!("{key_prefix}selectors[{j}]"), err.to_string()))?;
        if !selectors.contains(&sel) {
            selectors.push(sel);
        }
    }
    let x509_svid_ttl = e
        .x509_svid_ttl
        .as_deref()
        .map(|s| svid_ttl(&k("x509_svid_ttl"), Some(s), DEFAULT_X509_SVID_TTL))
        .transpose()?;
    let jwt_svid_ttl = e
        .jwt_svid_ttl
        .as_deref()
        .map(|s| svid_ttl(&k("jwt_svid_ttl"), Some(s), DEFAULT_JWT_SVID_TTL))
        .transpose()?;
    let risk = e
        .risk
        .as_deref()
        .map(|r| {
            Risk::parse(r).ok_or_else(|| {
                invalid(
                    k("risk"),
                    format!("{r:?} is not \"low\", \"medium\" or \"high\""),
                )
            })
        })
        .transpose()?;
    let expires_at = e
        .expires_at
        .as_deref()
        .map(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(
                |err| {
                    invalid(
                        k("expires_at"),
                        format!(
                            "{s:?} is not an RFC 3339 time like \"2027-01-31T00:00:00Z\" ({err})"
                        ),
                    )
                },
            )
        })
        .transpose()?;
    let hint = non_empty(k("hint"), e.hint)?;
    // Workload API §8: implementations SHOULD NOT support hints over 1024 bytes; SPIRE refuses
    // them (review BG-5).
    if hint.as_ref().is_some_and(|h| h.len() > MAX_HINT_BYTES) {
        return Err(invalid(
            k("hint"),
            format!("is longer than {MAX_HINT_BYTES} bytes, the Workload API's bound for hints"),
        ));
    }
    let max_task_ttl = e
        .max_task_ttl
        .as_deref()
        .map(|s| svid_ttl(&k("max_task_ttl"), Some(s), DEFAULT_TASK_TTL))
        .transpose()?;
    Ok(Entry {
        id: id.into(),
        spiffe_id,
        selectors,
        x509_svid_ttl,
        jwt_svid_ttl,
        owner: non_empty(k("owner"), e.owner)?,
        purpose: non_empty(k("purpose"), e.purpose)?,
        risk,
        expires_at,
        hint,
        max_task_ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_config_gives_working_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.trust_domain.as_str(), DEFAULT_TRUST_DOMAIN);
        assert!(c.entries.is_empty());
        let d = default_entry_for_current_user(&c.trust_domain);
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(d.selectors, vec![Selector::Uid(uid)]);
        assert!(d.spiffe_id.as_str().ends_with(&format!("/unix/uid/{uid}")));
        assert_eq!(c.x509_svid_ttl, DEFAULT_X509_SVID_TTL);
        assert_eq!(c.crl_update_splay, DEFAULT_CRL_UPDATE_SPLAY);
        assert!(c.workload_socket.is_absolute() && c.data_dir.is_absolute());
    }

    #[test]
    fn full_config_parses() {
        let c = load(
            r#"
            trust_domain = "example.org"
            data_dir = "/tmp/x/data"
            [workload_api]
            socket = "/tmp/x/w.sock"
            crl_update_splay = "0s"
            [admin]
            socket = "/tmp/x/a.sock"
            allowed_uids = [1000]
            [http]
            listen = "127.0.0.1:0"
            [ca]
            x509_svid_ttl = "10m"
            jwt_svid_ttl = "30s"
            [[entries]]
            spiffe_id = "spiffe://example.org/agent"
            selectors = ["unix:uid:1000", "unix:path:/usr/bin/agent"]
            x509_svid_ttl = "1m"
            owner = "team"
            purpose = "ci"
            risk = "high"
            expires_at = "2030-01-01T00:00:00Z"
            hint = "internal"
            "#,
        )
        .unwrap();
        let id = c.entries[0].id.clone();
        assert!(id.starts_with("config-") && id.len() == 19, "{id}");
        // The same entry elsewhere in the file, its selectors in another order: the same id.
        let moved = load(
            r#"
            trust_domain = "example.org"
            [[entries]]
            spiffe_id = "spiffe://example.org/first"
            selectors = ["unix:uid:1"]
            [[entries]]
            spiffe_id = "spiffe://example.org/agent"
            selectors = ["unix:path:/usr/bin/agent", "unix:uid:1000"]
            "#,
        )
        .unwrap();
        assert_eq!(moved.entries[1].id, id);
        assert_ne!(moved.entries[0].id, id);
        // The same identity for the same callers twice: told apart by their order.
        let twice = load(
            r#"
            [[entries]]
            spiffe_id = "spiffe://tessera.internal/a"
            selectors = ["unix:uid:1"]
            [[entries]]
            spiffe_id = "spiffe://tessera.internal/a"
            selectors = ["unix:uid:1"]
            hint = "other"
            "#,
        )
        .unwrap();
        assert_eq!(*twice.entries[1].id, format!("{}.2", twice.entries[0].id));
        assert_eq!(c.jwt_svid_ttl, Duration::from_secs(30));
        assert_eq!(c.crl_update_splay, Duration::ZERO);
        let e = &c.entries[0];
        assert_eq!(e.x509_svid_ttl, Some(Duration::from_secs(60)));
        assert_eq!(e.risk, Some(Risk::High));
        assert_eq!(e.selectors.len(), 2);
    }

    #[test]
    fn plain_http_beyond_loopback_needs_tls_or_an_explicit_opt_in() {
        for ok in [
            "[http]\nlisten = \"0.0.0.0:8780\"\ntls_svid = true\nissuer = \"https://t.example:8780\"",
            "[http]\nlisten = \"0.0.0.0:8780\"\nallow_plaintext = true\nissuer = \"https://t.example\"",
            "[http]\nlisten = \"[::1]:8780\"\nissuer = \"http://localhost:8780\"",
        ] {
            Config::from_toml(ok, Path::new("t.toml")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn the_issuer_is_kept_as_written() {
        // Relying parties compare issuers as strings: a trailing slash stays.
        for issuer in ["https://t.example/", "https://t.example"] {
            let c = Config::from_toml(
                &format!(
                    "[http]\nlisten = \"0.0.0.0:8780\"\ntls_svid = true\nissuer = \"{issuer}\""
                ),
                Path::new("t.toml"),
            )
            .unwrap();
            assert_eq!(c.http_issuer.as_deref(), Some(issuer));
        }
    }

    #[test]
    fn a_config_file_others_could_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tesserad.toml");
        std::fs::write(&p, "trust_domain = \"example.org\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            Config::load(Some(&p)).unwrap().trust_domain.as_str(),
            "example.org"
        );
        // Whoever could write it could map their uid to any identity at the next start.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o646)).unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("not writable by"),
            "{e}"
        );
    }

    #[test]
    fn a_hint_longer_than_the_workload_api_allows_is_refused() {
        let entry = |hint: &str| {
            format!(
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/a\"\nselectors = \
                 [\"unix:uid:1\"]\nhint = \"{hint}\"\n"
            )
        };
        load(&entry(&"h".repeat(MAX_HINT_BYTES))).unwrap();
        let e = load(&entry(&"h".repeat(MAX_HINT_BYTES + 1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`entries[0].hint`") && e.contains("1024"), "{e}");
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("trust_domain = \"Bad Domain\"", "`trust_domain`"),
            ("bogus = 1", "unknown field `bogus`"),
            ("[ca]\nx509_svid_ttl = \"soon\"", "`ca.x509_svid_ttl`"),
            ("[ca]\nx509_svid_ttl = \"1s\"", "at least"),
            (
                "[ca]\nca_ttl = \"20000y\"",
                "`ca.ca_ttl`: must be at most 100y",
            ),
            ("[ca]\nca_ttl = \"30m\"", "`ca.ca_ttl`: must be at least 1h"),
            ("[ca]\ncert = \"/a.pem\"", "`ca.key`"),
            (
                "[ca]\ncert = \"/a.pem\"\nkey = \"/a.key\"\nca_ttl = \"2y\"",
                "`ca.ca_ttl`: applies only to a CA that tesserad generates",
            ),
            (
                "data_dir = \"/srv/t\"\n[workload_api]\nsocket = \"/srv/t/w.sock\"",
                "`workload_api.socket`: must not be inside data_dir",
            ),
            (
                "data_dir = \"/srv/t\"\n[admin]\nsocket = \"/srv/t/a.sock\"\nallowed_uids = [1000]",
                "`admin.socket`: must not be inside data_dir",
            ),
            ("[http]\nlisten = \"localhost\"", "`http.listen`"),
            (
                "[http]\nlisten = \"0.0.0.0:8780\"",
                "`http.listen`: 0.0.0.0:8780 is not a loopback address",
            ),
            (
                "[http]\nlisten = \"[::]:8780\"\ntls_svid = true",
                "`http.issuer`: is required when http.listen is [::]:8780",
            ),
            (
                "[http]\nissuer = \"http://tessera.example:8780\"",
                "`http.issuer`: an http:// issuer beyond loopback",
            ),
            (
                "[http]\nissuer = \"HTTP://tessera.example:8780\"",
                "`http.issuer`: an http:// issuer beyond loopback",
            ),
            ("data_dir = \"relative\"", "`data_dir`"),
            (
                "workload_api.socket = \"/run/t/w.sock\"\nadmin.socket = \"/run/t/../t/./w.sock\"",
                "`admin.socket`: must differ from workload_api.socket",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/tesserad\"\nselectors = [\"unix:uid:1\"]",
                "`entries[0].spiffe_id`: spiffe://tessera.internal/tesserad is reserved",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/ci/task/deploy\"\nselectors = [\"unix:uid:1\"]",
                "task X.509-SVID of spiffe://tessera.internal/ci ",
            ),
            (
                "[audit]\nmax_file_mib = 0",
                "`audit.max_file_mib`: must be between",
            ),
            (
                "[audit]\nmax_file_mib = 17592186044416",
                "`audit.max_file_mib`: must be between",
            ),
            (
                "[tasks]\nmax_ttl = \"5s\"",
                "`tasks.max_ttl`: task lifetimes",
            ),
            ("[log]\nformat = \"xml\"", "`log.format`"),
            (
                "[workload_api]\ncrl_update_splay = \"6m\"",
                "`workload_api.crl_update_splay`: must be at most 5m",
            ),
            (
                "[workload_api]\ncrl_update_splay = \"soon\"",
                "`workload_api.crl_update_splay`: \"soon\" is not a duration",
            ),
            (
                "[inventory]\nidle_after = \"300000000y\"",
                "`inventory.idle_after`: must be at most 100y",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/a\"\nselectors = [\"unix:uid:1\"]\nmax_task_ttl = \"1s\"",
                "`entries[0].max_task_ttl`: must be at least 10s, as task lifetimes are",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/a\"\nselectors = [\"unix:uid:1\"]\nmax_task_ttl = \"40d\"",
                "`entries[0].max_task_ttl`: must be at most 24h",
            ),
            (
                "[tasks]\nretention = \"500ms\"",
                "`tasks.retention`: must be at least 1s",
            ),
            ("[tasks]\nretention = \"a week\"", "`tasks.retention`"),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/a\"",
                "`entries[0].selectors`: is empty; an entry with no selectors would match every caller",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/a\"\nselectors = []",
                "would match every caller",
            ),
            (
                "[[entries]]\nselectors = [\"unix:uid:1\"]",
                "`entries[0].spiffe_id`: is required",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://other.org/a\"\nselectors = [\"unix:uid:1\"]",
                "not in this daemon's trust domain",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal\"\nselectors = [\"unix:uid:1\"]",
                "must have a path",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/a\"\nselectors = [\"unix:uid:x\"]",
                "`entries[0].selectors[0]`",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/a\"\nselectors = [\"unix:uid:1\"]\nrisk = \"extreme\"",
                "`entries[0].risk`",
            ),
            (
                "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/a\"\nselectors = [\"unix:uid:1\"]\nexpires_at = \"tomorrow\"",
                "`entries[0].expires_at`",
            ),
            (
                "[workload_api]\nsocket = \"/tmp/s\"\n[admin]\nsocket = \"/tmp/s\"",
                "`admin.socket`",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(
                e.contains(want),
                "config {text:?}\n  error {e:?}\n  wanted {want:?}"
            );
        }
    }

    #[test]
    fn shipped_systemd_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/tesserad.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        let c = Config::from_toml(&text, &p).unwrap();
        assert_eq!(c.oidc_issuers.len(), 2);
        assert_eq!(c.oidc_issuers[0].keys, KeySource::Discovery);
        assert!(c.policy_file.is_some());
        assert_eq!(c.task_retention, DEFAULT_TASK_RETENTION);
        // The example policy installed beside it is for this config: its pinned issuer is
        // one the config trusts, and the agents it names are of this trust domain.
        let policy = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policy/tessera.cedar"),
        )
        .unwrap();
        let pinned = format!("context.subject.iss == {:?}", c.oidc_issuers[0].issuer);
        assert!(policy.contains(&pinned), "{pinned}");
        for agent in policy.split("Tessera::Agent::\"").skip(1) {
            assert!(
                agent.starts_with(&format!("spiffe://{}/", c.trust_domain.as_str())),
                "{agent}"
            );
        }
    }

    #[test]
    fn shipped_kubernetes_config_is_valid_and_keeps_the_admin_socket_apart() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/configmap.yaml");
        let yaml = std::fs::read_to_string(&p).unwrap();
        // The TOML is the ConfigMap's block scalar, indented by four spaces.
        let text: String = yaml
            .lines()
            .skip_while(|l| !l.contains("tesserad.toml: |"))
            .skip(1)
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let c = Config::from_toml(&text, &p).unwrap();
        // Workloads mount the workload socket's directory; the admin socket is not in it.
        assert_ne!(c.admin_socket.parent(), c.workload_socket.parent());
        assert!(
            !c.admin_socket
                .starts_with(c.workload_socket.parent().unwrap())
        );
        assert!(c.http_issuer.is_some());
        // The CLI in the daemon's pod is pointed at the same sockets.
        let ds = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/daemonset.yaml"),
        )
        .unwrap();
        assert!(ds.contains(&format!(
            "{{name: TESSERA_ADMIN_SOCKET, value: {}}}",
            c.admin_socket.display()
        )));
        assert!(ds.contains(&format!(
            "{{name: SPIFFE_ENDPOINT_SOCKET, value: \"unix://{}\"}}",
            c.workload_socket.display()
        )));
    }

    #[test]
    fn a_remote_issuer_cannot_point_its_keys_at_loopback() {
        let remote = "https://idp.example.com";
        assert!(jwks_uri_allowed(remote, "https://keys.example.net/jwks").is_ok());
        for local in [
            "https://127.0.0.1/jwks",
            "https://localhost:8443/keys",
            "https://[::1]/jwks",
            "http://127.0.0.1:8780/jwks",
            // Other spellings of this host (review AA).
            "https://0.0.0.0:8443/jwks",
            "https://[::]/jwks",
            "https://[::ffff:127.0.0.1]/jwks",
            "https://[::ffff:0.0.0.0]/jwks",
            "https://keys.localhost/jwks",
            "https://LOCALHOST./jwks",
        ] {
            assert!(jwks_uri_allowed(remote, local).is_err(), "{local}");
        }
        assert!(jwks_uri_allowed(remote, "http://keys.example.net/jwks").is_err());
        // A loopback issuer (tests, a local IdP) may keep its keys on loopback.
        assert!(jwks_uri_allowed("http://127.0.0.1:9000", "http://127.0.0.1:9000/jwks").is_ok());
    }

    #[test]
    fn oidc_issuers_must_use_https_except_loopback() {
        let bad = "[[oidc_issuers]]\nissuer = \"http://idp.example.com\"\naudiences = [\"t\"]\n";
        let e = Config::from_toml(bad, Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("oidc_issuers[0].issuer") && e.contains("https"),
            "{e}"
        );
        let ok = "[[oidc_issuers]]\nissuer = \"http://127.0.0.1:9000\"\naudiences = [\"t\"]\n";
        Config::from_toml(ok, Path::new("t")).unwrap();
        let no_aud = "[[oidc_issuers]]\nissuer = \"https://idp.example.com\"\n";
        let e = Config::from_toml(no_aud, Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("audiences"), "{e}");
        let both = "[[oidc_issuers]]\nissuer = \"https://i.example\"\naudiences = [\"t\"]\njwks_uri = \"https://i.example/k\"\njwks_file = \"/k.json\"\n";
        assert!(Config::from_toml(both, Path::new("t")).is_err());
        let ttl = "[tasks]\ntoken_ttl = \"2h\"\n";
        assert!(Config::from_toml(ttl, Path::new("t")).is_err());
    }
}
