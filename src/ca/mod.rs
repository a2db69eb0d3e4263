//! The certificate authority: signing keys, trust bundles, and SVID minting and validation.
//!
//! Owns: the X.509 CA (generated on first start, or brought by the operator), the JWT signing
//! key, the trust bundle that publishes both, and the cryptographic halves of issuance
//! ([`Ca::mint_x509`], [`Ca::mint_jwt`]) and JWT-SVID validation. It does not decide *who*
//! gets an SVID; that is the issuer's job.
//!
//! Key material lives under `data_dir` with mode 0600 and never appears in logs or errors.

pub mod der;
pub mod x509;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::parse_x509_certificate;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::fsutil;
use crate::jose::{self, Es256Signer, JoseError, Jwk};
use crate::spiffe_id::{IdError, SpiffeId, TrustDomain};
pub use x509::{CaCurve, MintedX509};

/// CA failures. Messages name files and checks, never key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A CA or key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// An operator-supplied CA or key that does not meet the requirements.
    #[error("{path}: {message}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Generating the CA failed.
    #[error("cannot create the CA certificate: {0}")]
    Generate(String),
    /// The CA has expired; nothing can be signed.
    #[error(
        "the CA certificate has expired; configure a new one or remove the generated CA to create a fresh one"
    )]
    Expired,
    /// A cryptographic primitive failed (should not happen).
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn bad_ca(path: &Path, message: impl Into<String>) -> CaError {
    CaError::BadCa {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// One X.509 trust anchor in the bundle.
#[derive(Debug, Clone)]
pub struct X509Authority {
    /// Certificate DER.
    pub der: Vec<u8>,
    /// Subject, for display.
    pub subject: String,
    /// Validity.
    pub not_before: OffsetDateTime,
    /// Validity.
    pub not_after: OffsetDateTime,
    /// True when the operator supplied this CA.
    pub operator_supplied: bool,
}

impl X509Authority {
    /// SHA-256 of the DER, hex.
    pub fn fingerprint(&self) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &self.der))
    }
}

/// The trust bundle of our trust domain. It holds lists so that CA and key rotation can add
/// the next authority before the current one is retired.
#[derive(Debug)]
pub struct TrustBundle {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// X.509 authorities (roots).
    pub x509_authorities: Vec<X509Authority>,
    /// JWT signing keys.
    pub jwt_authorities: Vec<Jwk>,
    /// Increases with every change (`spiffe_sequence`, and the CRL number), across restarts
    /// too: see [`next_sequence`].
    pub sequence: u64,
    /// Concatenated DER of the X.509 authorities (Workload API `bundle` fields).
    pub x509_der: Vec<u8>,
    /// JWKS of the JWT authorities only, each with `use: jwt-svid` and a `kid`
    /// (Workload API `FetchJWTBundles`).
    pub jwt_jwks: Vec<u8>,
    /// The current CRL (DER), signed by the CA; empty before the first publication.
    pub crl: Vec<u8>,
    /// The CRL's `thisUpdate` and `nextUpdate`, Unix seconds.
    pub crl_window: Option<(i64, i64)>,
}

/// The bundle sequence after `previous`: the wall clock in milliseconds, or `previous + 1` if
/// that is not above it. RFC 5280 §5.2.3 wants CRL numbers to increase for as long as the CA
/// signs CRLs, restarts included; counting from 1 at each start broke that. The CRL is
/// republished at most every 5 ms, so the counter does not run ahead of the clock, and a
/// restart starts above every number issued before it unless the clock went back.
fn next_sequence(previous: u64, now: OffsetDateTime) -> u64 {
    let ms = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    ms.max(previous.saturating_add(1))
}

impl TrustBundle {
    fn new(
        trust_domain: TrustDomain,
        x509_authorities: Vec<X509Authority>,
        jwt_authorities: Vec<Jwk>,
        sequence: u64,
    ) -> Self {
        let x509_der = x509_authorities
            .iter()
            .flat_map(|a| a.der.clone())
            .collect();
        let keys: Vec<Value> = jwt_authorities.iter().map(jwt_jwk).collect();
        let jwt_jwks = serde_json::to_vec(&json!({ "keys": keys })).expect("JSON of strings");
        Self {
            trust_domain,
            x509_authorities,
            jwt_authorities,
            sequence,
            x509_der,
            jwt_jwks,
            crl: Vec::new(),
            crl_window: None,
        }
    }

    /// Whether relying parties take its CRL at `now` (`thisUpdate` ≤ now < `nextUpdate`).
    pub fn crl_in_force(&self, now: OffsetDateTime) -> bool {
        let t = now.unix_timestamp();
        self.crl_window
            .is_some_and(|(this, next)| this <= t && t < next)
    }

    /// The SPIFFE trust bundle document (federation format, served over HTTP): X.509
    /// authorities with `use: x509-svid` and one certificate in `x5c`, JWT keys with
    /// `use: jwt-svid` and a `kid`, plus `spiffe_sequence` and `spiffe_refresh_hint`.
    pub fn federation_document(&self, refresh_hint: Duration) -> Value {
        use base64::Engine;
        let mut keys = Vec::new();
        for a in &self.x509_authorities {
            // A JWK must have its `kty` (RFC 7517 §4.1): one that cannot be written is left
            // out rather than published half-formed, which would make SPIFFE clients reject
            // the whole document.
            let Some(mut m) = x509_parser::parse_x509_certificate(&a.der)
                .ok()
                .and_then(|(_, c)| spki_jwk_members(c.public_key()))
            else {
                continue;
            };
            m.insert("use".into(), "x509-svid".into());
            m.insert(
                "x5c".into(),
                json!([base64::engine::general_purpose::STANDARD.encode(&a.der)]),
            );
            keys.push(Value::Object(m));
        }
        keys.extend(self.jwt_authorities.iter().map(jwt_jwk));
        json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": refresh_hint.as_secs(),
        })
    }
}

/// When a credential issued at `now` for `ttl` expires: never after `cap` (the CA's own
/// expiry), and `cap` too if `now + ttl` is past what a date can hold, instead of panicking.
pub fn credential_expiry(
    now: OffsetDateTime,
    ttl: Duration,
    cap: OffsetDateTime,
) -> OffsetDateTime {
    time::Duration::try_from(ttl)
        .ok()
        .and_then(|d| now.checked_add(d))
        .map_or(cap, |t| t.min(cap))
}

fn jwt_jwk(k: &Jwk) -> Value {
    let mut m = k.public_members();
    m.insert("kid".into(), k.kid.clone().into());
    m.insert("use".into(), "jwt-svid".into());
    Value::Object(m)
}

/// JWK members for a certificate key: EC P-256/P-384 (what Tessera signs with), RSA (an
/// operator's offline root often is), or EC P-521 and Ed25519 (RFC 7518 §6.2, RFC 8037 §2),
/// which an operator's anchor may use although nothing here signs with them.
fn spki_jwk_members(spki: &SubjectPublicKeyInfo<'_>) -> Option<Map<String, Value>> {
    use x509_parser::oid_registry as r;
    let alg = &spki.algorithm.algorithm;
    let key_bytes = spki.subject_public_key.data.as_ref();
    // Members written here, not through `jose::PublicKey`: that type is what tokens are
    // verified with, and these curves verify no token.
    let okp = |crv: &str, len: usize| {
        (key_bytes.len() == len).then(|| {
            let mut m = Map::new();
            m.insert("kty".into(), "OKP".into());
            m.insert("crv".into(), crv.into());
            m.insert("x".into(), jose::b64_encode(key_bytes).into());
            m
        })
    };
    if *alg == r::OID_SIG_ED25519 {
        return okp("Ed25519", 32);
    }
    // Ed448 has a JWK form too (RFC 8037), but go-jose, which go-spiffe and SPIRE parse
    // bundles with, refuses an OKP key on any other curve, and with it the whole document:
    // left out (start-up warns), as Go could not verify such a chain anyway.
    if *alg == r::OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki.algorithm.parameters.as_ref()?.as_oid().ok()? == r::OID_NIST_EC_P521
    {
        // Uncompressed point, 66 octets per coordinate (RFC 7518 §6.2.1.2).
        let (x, y) = match key_bytes {
            [4, xy @ ..] if xy.len() == 132 => xy.split_at(66),
            _ => return None,
        };
        let mut m = Map::new();
        m.insert("kty".into(), "EC".into());
        m.insert("crv".into(), "P-521".into());
        m.insert("x".into(), jose::b64_encode(x).into());
        m.insert("y".into(), jose::b64_encode(y).into());
        return Some(m);
    }
    let key = if let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() {
        // Base64urlUInt: no leading zero octets (RFC 7518 §2, §6.3.1).
        let unsigned = |b: &[u8]| {
            let i = b
                .iter()
                .position(|&x| x != 0)
                .unwrap_or(b.len().saturating_sub(1));
            b[i..].to_vec()
        };
        jose::PublicKey::Rsa {
            n: unsigned(rsa.modulus),
            e: unsigned(rsa.exponent),
        }
    } else {
        let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
        let point = spki.subject_public_key.data.to_vec();
        if curve.as_bytes() == x509::oid::P256 {
            jose::PublicKey::P256(point)
        } else if curve.as_bytes() == x509::oid::P384 {
            jose::PublicKey::P384(point)
        } else {
            return None;
        }
    };
    Some(
        Jwk {
            kid: String::new(),
            key,
            alg: None,
        }
        .public_members(),
    )
}

/// Why a JWT-SVID was refused (`ValidateJWTSVID` returns the message to the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// Envelope, algorithm, header or signature problem.
    #[error(transparent)]
    Jose(#[from] JoseError),
    /// `sub` missing or not a string.
    #[error("token has no sub claim")]
    MissingSubject,
    /// `sub` is not a SPIFFE ID.
    #[error("sub is not a valid SPIFFE ID: {0}")]
    BadSubject(IdError),
    /// No bundle for the subject's trust domain.
    #[error("no JWT bundle for trust domain {0:?}")]
    UnknownTrustDomain(String),
    /// No `kid` header.
    #[error("token header has no kid")]
    MissingKeyId,
    /// `aud` missing or malformed.
    #[error("token has no valid aud claim")]
    MissingAudience,
    /// `aud` does not contain the expected audience.
    #[error("token audience does not include {0:?}")]
    AudienceMismatch(String),
    /// `exp` missing or not a number.
    #[error("token has no valid exp claim")]
    MissingExpiry,
    /// `exp` is in the past.
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
}

/// Most serials one CRL lists: 60 000 entries of about 36 bytes keep a Workload API message
/// (CRL plus SVIDs and bundle) well under the 4 MiB default gRPC message limit.
pub const MAX_CRL_ENTRIES: usize = 60_000;
/// CRL `nextUpdate` distance; the CRL is re-signed well before (see `app`).
pub const CRL_VALIDITY: time::Duration = time::Duration::hours(1);
/// How far a CRL's `thisUpdate` is dated back, for relying parties whose clocks run behind
/// (SVIDs' `notBefore` is dated back as much).
pub const CRL_BACKDATE: time::Duration = time::Duration::seconds(30);

/// Small allowance for `nbf`/`iat` of tokens signed on another host whose clock runs ahead.
pub const NBF_LEEWAY_SECS: i64 = 30;

/// The CA: X.509 leaf signer, JWT signer and the published trust bundle.
#[derive(Debug)]
pub struct Ca {
    trust_domain: TrustDomain,
    leaf: x509::LeafTemplate,
    jwt: Es256Signer,
    bundle: watch::Sender<Arc<TrustBundle>>,
    rng: SystemRandom,
    /// `data_dir/crl_number`: the highest sequence reserved on disk (see [`Ca::reserve`]).
    sequence_file: PathBuf,
    /// What the file holds. Locked across its write, so a clean stop's settling and a
    /// publication cannot interleave.
    reserved: std::sync::Mutex<u64>,
}

/// How far past the sequence in use a reservation on disk reaches (in its unit, ms). It is
/// renewed once half is used: a write every five minutes of clock and one per start; a start
/// after a crash begins at most this far ahead of the clock (a clean stop settles it).
const SEQUENCE_RESERVE: u64 = 600_000;

/// The most a reservation may run ahead of the clock before start-up calls it damaged: a
/// number there would pin every later CRL number (they saturate).
const SEQUENCE_MAX_AHEAD: u64 = 100 * 365 * 86_400_000;

/// Reads `data_dir/crl_number` (0 when absent), refusing what start-up could not use.
fn read_reservation(path: &Path, now: OffsetDateTime) -> Result<u64, CaError> {
    let way_out = "it holds the highest CRL number reserved; if this host's clock has never run \
                   ahead of now, remove it (CRL numbers then follow the clock again)";
    let n = match std::fs::read_to_string(path) {
        Ok(t) => t
            .trim()
            .parse::<u64>()
            .map_err(|_| bad_ca(path, format!("is not a number: {way_out}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(path)(e)),
    };
    let now_ms = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    if n > now_ms.saturating_add(SEQUENCE_MAX_AHEAD) {
        return Err(bad_ca(
            path,
            format!("holds {n}, a century or more ahead of the clock: {way_out}"),
        ));
    }
    Ok(n)
}

impl Ca {
    /// Loads the operator's CA (`ca_files`) or the one generated earlier under `data_dir`,
    /// creating it (and the JWT key) on first start.
    pub fn load_or_create(
        trust_domain: &TrustDomain,
        data_dir: &Path,
        ca_files: Option<&(PathBuf, PathBuf)>,
        ca_ttl: Duration,
    ) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc();
        let (chain, key_pkcs8, cert_path, key_path, not_after, operator_supplied) = match ca_files {
            Some((cert, key)) => {
                let (chain, pkcs8, not_after) = read_operator_ca(cert, key, now)?;
                (chain, pkcs8, cert.clone(), key.clone(), not_after, true)
            }
            None => {
                let dir = data_dir.join("ca");
                fsutil::ensure_private_dir(&dir).map_err(io_err(&dir))?;
                let (chain, pkcs8) = load_or_generate_root(trust_domain, &dir, ca_ttl, now)?;
                let cert_path = dir.join("root.pem");
                let not_after = check_chain(&chain, &cert_path, now)?;
                (
                    chain,
                    pkcs8,
                    cert_path,
                    dir.join("root.key"),
                    not_after,
                    false,
                )
            }
        };
        let rng = SystemRandom::new();
        let (_, cert) = parse_x509_certificate(&chain[0])
            .map_err(|_| bad_ca(&cert_path, "CA certificate does not parse"))?;
        let (key, curve) =
            signing_key(trust_domain, &cert, &key_pkcs8, &cert_path, &key_path, &rng)?;
        check_chain_for(trust_domain, &chain, &cert_path)?;
        let aki = subject_key_id(&cert).unwrap_or_else(|| {
            ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref()).as_ref()[..20]
                .to_vec()
        });

        // The last certificate is the trust anchor; everything before it, except the signing
        // certificate itself when it is that anchor, travels with every SVID.
        let anchor = chain
            .last()
            .expect("chain has at least one certificate")
            .clone();
        let chain_tail: Vec<u8> = if chain.len() > 1 {
            chain[..chain.len() - 1].concat()
        } else {
            Vec::new()
        };
        let leaf = x509::LeafTemplate::new(
            key,
            curve,
            cert.tbs_certificate.subject.as_raw(),
            &aki,
            chain_tail,
            not_after,
        );
        let authority = authority_info(&anchor, operator_supplied)
            .ok_or_else(|| bad_ca(&key_path, "trust anchor certificate does not parse"))?;
        if parse_x509_certificate(&anchor)
            .ok()
            .and_then(|(_, c)| spki_jwk_members(c.public_key()))
            .is_none()
        {
            // The gRPC bundles carry it; only the JSON bundle document has no way to.
            tracing::warn!(
                cert = %cert_path.display(),
                "the trust anchor's key type has no JWK form: /bundle leaves it out, so \
                 relying parties that fetch the trust bundle over HTTP will not trust \
                 X.509-SVIDs from this CA"
            );
        }
        let jwt = load_or_generate_jwt_key(data_dir)?;
        // Start above every number handed out before, even if the clock is now behind the
        // one that ran then (a start with a clock hours ahead, then the right one).
        let sequence_file = data_dir.join("crl_number");
        let reserved = read_reservation(&sequence_file, now)?;
        let sequence = next_sequence(reserved, OffsetDateTime::now_utc());
        let bundle = TrustBundle::new(
            trust_domain.clone(),
            vec![authority],
            vec![jwt.jwk()],
            sequence,
        );
        let ca = Self {
            trust_domain: trust_domain.clone(),
            leaf,
            jwt,
            bundle: watch::channel(Arc::new(bundle)).0,
            rng,
            sequence_file,
            reserved: std::sync::Mutex::new(reserved),
        };
        ca.reserve(
            &mut ca.reserved.lock().unwrap_or_else(|e| e.into_inner()),
            sequence,
        )?;
        Ok(ca)
    }

    /// Makes sure `sequence` is covered by the reservation on disk, writing a new one (up to
    /// [`SEQUENCE_RESERVE`] ahead) when it is not. RFC 5280 §5.2.3: CRL numbers only
    /// increase, restarts included; from the clock alone they went back after it had run
    /// ahead. Durable before the number is used.
    ///
    /// Renewed once half of it is used, so a write that fails (a full disk, a read-only
    /// file) is only warned about while what is left covers the numbers: nothing is refused
    /// until the reservation is used up.
    fn reserve(&self, reserved: &mut u64, sequence: u64) -> Result<(), CaError> {
        if sequence.saturating_add(SEQUENCE_RESERVE / 2) <= *reserved {
            return Ok(());
        }
        let next = sequence.saturating_add(SEQUENCE_RESERVE);
        match self.write_reservation(next) {
            Ok(()) => {
                *reserved = next;
                Ok(())
            }
            Err(e) if sequence <= *reserved => {
                tracing::warn!(error = %e, "cannot renew the CRL number reservation; CRLs are signed while it lasts, and it is tried again at each one");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn write_reservation(&self, n: u64) -> Result<(), CaError> {
        fsutil::write_atomic(&self.sequence_file, format!("{n}\n").as_bytes(), 0o600)
            .map_err(io_err(&self.sequence_file))
    }

    /// At a clean stop: the reservation shrinks to the last number used, so the next start
    /// goes on from the clock (or just above that number) instead of a reservation ahead.
    pub fn settle_reservation(&self) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let used = self.bundle().sequence;
        if used < *reserved {
            match self.write_reservation(used) {
                Ok(()) => *reserved = used,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot settle the CRL number reservation; the next start begins above it")
                }
            }
        }
    }

    /// Checks an operator CA's files as start-up loads them (chain, signing certificate, key
    /// mode and match), touching nothing: what `tesserad --check-config` runs.
    pub fn check_operator_files(
        trust_domain: &TrustDomain,
        (cert, key): &(PathBuf, PathBuf),
    ) -> Result<(), CaError> {
        let (chain, pkcs8, _) = read_operator_ca(cert, key, OffsetDateTime::now_utc())?;
        check_chain_for(trust_domain, &chain, cert)?;
        let (_, signer) = parse_x509_certificate(&chain[0])
            .map_err(|_| bad_ca(cert, "CA certificate does not parse"))?;
        signing_key(
            trust_domain,
            &signer,
            &pkcs8,
            cert,
            key,
            &SystemRandom::new(),
        )
        .map(|_| ())
    }

    /// For `--check-config` without `[ca]` files: a CA generated earlier in `data_dir` that
    /// start-up would refuse for `trust_domain`. Reads only.
    pub fn check_generated(trust_domain: &TrustDomain, data_dir: &Path) -> Result<(), CaError> {
        let dir = data_dir.join("ca");
        let cert_path = dir.join("root.pem");
        // As start-up judges the pair: one half alone is refused, unless it is what an
        // interrupted archive of an expired CA left (start-up finishes that).
        let (has_cert, has_key) = (cert_path.exists(), dir.join("root.key").exists());
        if has_cert != has_key && !(has_cert && archived_root(&dir, &cert_path).is_some()) {
            return Err(bad_ca(&dir, ONE_HALF));
        }
        let text = match std::fs::read_to_string(&cert_path) {
            Ok(t) => t,
            // None yet (start-up generates one), or not ours to read: start-up will say.
            Err(_) => return Ok(()),
        };
        let chain = parse_pem_certs(&cert_path, &text)?;
        let (_, cert) =
            parse_x509_certificate(&chain[0]).map_err(|_| bad_ca(&cert_path, "does not parse"))?;
        check_generated_root(&cert, trust_domain, &cert_path, &dir)?;
        let key_path = dir.join("root.key");
        if key_path.exists() {
            // As start-up takes it: the key must be the certificate's.
            let key = read_key_file(&key_path)?;
            signing_key(
                trust_domain,
                &cert,
                key.contents(),
                &cert_path,
                &key_path,
                &SystemRandom::new(),
            )?;
        }
        Ok(())
    }

    /// For `--check-config`, with any CA: the files start-up reads from `data_dir` besides
    /// the CA (the JWT signing key, the CRL number reservation). Reads only.
    pub fn check_data_files(data_dir: &Path) -> Result<(), CaError> {
        let jwt = data_dir.join("jwt").join("signing.key");
        if jwt.exists() {
            read_key_file(&jwt)?;
        }
        read_reservation(&data_dir.join("crl_number"), OffsetDateTime::now_utc()).map(|_| ())
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.borrow().clone()
    }

    /// Notified whenever the bundle changes (rotation, CRL).
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.subscribe()
    }

    /// Signs a CRL for `revoked` and publishes it in the bundle (every stream sends it).
    ///
    /// Bounded: a Workload API message must stay under a client's default 4 MiB limit, so at
    /// most [`MAX_CRL_ENTRIES`] serials (about 2.2 MB) are listed, those that expire last
    /// first. Returns how many revoked serials did not fit (0 normally).
    pub fn publish_crl(
        &self,
        revoked: &[crate::lease::RevokedSerial],
        now: OffsetDateTime,
    ) -> Result<usize, CaError> {
        // Those expiring last, whatever order the caller gave: a serial that expires sooner
        // stops mattering sooner.
        let mut by_expiry: Vec<&crate::lease::RevokedSerial> = revoked.iter().collect();
        by_expiry.sort_by_key(|r| std::cmp::Reverse(r.expires_at));
        let listed: Vec<([u8; 16], OffsetDateTime)> = by_expiry
            .into_iter()
            .take(MAX_CRL_ENTRIES)
            .map(|r| {
                (
                    r.serial,
                    OffsetDateTime::from_unix_timestamp(r.revoked_at).unwrap_or(now),
                )
            })
            .collect();
        let left_out = revoked.len() - listed.len();
        // Held until the CRL is published: a clean stop's settling then sees its number.
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.bundle();
        let sequence = next_sequence(current.sequence, now);
        self.reserve(&mut reserved, sequence)?;
        let (this_update, next_update) = (now - CRL_BACKDATE, now + CRL_VALIDITY);
        let crl = self
            .leaf
            .sign_crl(&listed, this_update, next_update, sequence)?;
        let mut next = TrustBundle::new(
            current.trust_domain.clone(),
            current.x509_authorities.clone(),
            current.jwt_authorities.clone(),
            sequence,
        );
        next.crl = crl;
        next.crl_window = Some((this_update.unix_timestamp(), next_update.unix_timestamp()));
        self.bundle.send_replace(Arc::new(next));
        Ok(left_out)
    }

    /// The CA certificate's expiry: no SVID outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.leaf.ca_not_after()
    }

    /// Key id of the current JWT signing key.
    pub fn jwt_kid(&self) -> &str {
        self.jwt.kid()
    }

    /// Mints an X.509-SVID with a fresh key.
    pub fn mint_x509(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<MintedX509, CaError> {
        self.leaf.mint(id, ttl, now)
    }

    /// Mints an X.509-SVID for serving TLS at `host` (a DNS name or an IP address, as in a
    /// URL): the SPIFFE ID and, for clients that check the name they connected to (RFC 6125),
    /// `host` as a dNSName or iPAddress.
    pub fn mint_x509_serving(
        &self,
        id: &SpiffeId,
        host: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<MintedX509, CaError> {
        let mut name = Vec::new();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => der::tlv(&mut name, 0x87, &ip.octets()), // [7]
            Ok(std::net::IpAddr::V6(ip)) => der::tlv(&mut name, 0x87, &ip.octets()),
            // [2] dNSName, an IA5String: a URL's host is ASCII (IDNA-encoded) already.
            Err(_) if host.is_ascii() && !host.is_empty() => {
                der::tlv(&mut name, 0x82, host.as_bytes());
            }
            Err(_) => {}
        }
        self.leaf.mint_named(id, &name, ttl, now)
    }

    /// Mints a JWT-SVID. `jti` must be unique (it is the lease id). Returns the token and its
    /// expiry.
    pub fn mint_jwt(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: OffsetDateTime,
        jti: &str,
    ) -> Result<(String, OffsetDateTime), CaError> {
        /// A JWT-SVID's claims (JWT-SVID §3), serialized in this order.
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            sub: &'a str,
            aud: &'a [String],
            exp: i64,
            iat: i64,
            jti: &'a str,
        }
        // As for X.509-SVIDs: past the CA's expiry every token would be expired when issued.
        if now >= self.not_after() {
            return Err(CaError::Expired);
        }
        let exp = credential_expiry(now, ttl, self.not_after());
        let claims = Claims {
            sub: id.as_str(),
            aud: audience,
            exp: exp.unix_timestamp(),
            iat: now.unix_timestamp(),
            jti,
        };
        let token = self
            .jwt
            .sign(&claims)
            .map_err(|_| CaError::Crypto("JWT signing failed"))?;
        Ok((token, exp))
    }

    /// Signs arbitrary JWT claims with the JWT key as a JWT access token (`typ` `at+jwt`:
    /// task tokens, which JWT-SVID validation then refuses). The caller sets every claim,
    /// including `exp` within the CA's validity.
    pub fn sign_jwt_claims(&self, claims: &Value) -> Result<String, CaError> {
        self.jwt
            .sign_access_token(claims)
            .map_err(|_| CaError::Crypto("JWT signing failed"))
    }

    /// A new random id, 128 bits, base64url: used for `jti` and lease ids.
    pub fn random_id(&self) -> Result<String, CaError> {
        let mut b = [0u8; 16];
        self.rng
            .fill(&mut b)
            .map_err(|_| CaError::Crypto("random source failed"))?;
        Ok(jose::b64_encode(&b))
    }

    /// Validates a JWT-SVID against the current bundle: see [`validate_jwt_svid`].
    pub fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
        now: OffsetDateTime,
    ) -> Result<(SpiffeId, Map<String, Value>), JwtSvidError> {
        let bundle = self.bundle();
        validate_jwt_svid(
            &bundle.trust_domain,
            &bundle.jwt_authorities,
            token,
            audience,
            now,
        )
    }
}

/// Validates a JWT-SVID per the JWT-SVID standard: allowed algorithm, signature by one of
/// `keys` (the JWT authorities of `trust_domain`, the subject's), `aud` containing
/// `audience`, not expired. Returns the subject and all claims. A plain function of its inputs,
/// so the fuzzer drives the very checks `ValidateJWTSVID` runs.
pub fn validate_jwt_svid(
    trust_domain: &TrustDomain,
    keys: &[Jwk],
    token: &str,
    audience: &str,
    now: OffsetDateTime,
) -> Result<(SpiffeId, Map<String, Value>), JwtSvidError> {
    let jws = jose::decode(token)?;
    let sub = match jws.claims.get("sub") {
        Some(Value::String(s)) => SpiffeId::parse(s).map_err(JwtSvidError::BadSubject)?,
        _ => return Err(JwtSvidError::MissingSubject),
    };
    if sub.trust_domain_name() != trust_domain.as_str() {
        return Err(JwtSvidError::UnknownTrustDomain(
            sub.trust_domain_name().to_owned(),
        ));
    }
    let kid = jws.kid.as_deref().ok_or(JwtSvidError::MissingKeyId)?;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| JoseError::UnknownKey(kid.chars().take(64).collect()))?;
    key.verify(jws.alg, jws.signing_input.as_bytes(), &jws.signature)?;

    let claims = jws.claims;
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(list)) if !list.is_empty() => {
            if !list.iter().all(Value::is_string) {
                return Err(JwtSvidError::MissingAudience);
            }
            list.iter().any(|a| a.as_str() == Some(audience))
        }
        _ => return Err(JwtSvidError::MissingAudience),
    };
    if !aud_ok {
        return Err(JwtSvidError::AudienceMismatch(
            audience.chars().take(128).collect(),
        ));
    }
    let now_s = now.unix_timestamp();
    match claims.get("exp").and_then(Value::as_i64) {
        Some(exp) if now_s < exp => {}
        Some(_) => return Err(JwtSvidError::Expired),
        None => return Err(JwtSvidError::MissingExpiry),
    }
    if let Some(nbf) = claims.get("nbf") {
        match nbf.as_i64() {
            Some(nbf) if nbf <= now_s + NBF_LEEWAY_SECS => {}
            _ => return Err(JwtSvidError::NotYetValid),
        }
    }
    Ok((sub, claims))
}

fn authority_info(der: &[u8], operator_supplied: bool) -> Option<X509Authority> {
    let (_, c) = parse_x509_certificate(der).ok()?;
    Some(X509Authority {
        der: der.to_vec(),
        subject: c.subject().to_string(),
        not_before: OffsetDateTime::from_unix_timestamp(c.validity().not_before.timestamp())
            .ok()?,
        not_after: OffsetDateTime::from_unix_timestamp(c.validity().not_after.timestamp()).ok()?,
        operator_supplied,
    })
}

fn curve_of(spki: &SubjectPublicKeyInfo<'_>) -> Option<CaCurve> {
    if spki.algorithm.algorithm.as_bytes() != x509::oid::EC_PUBLIC_KEY {
        return None;
    }
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    match curve.as_bytes() {
        b if b == x509::oid::P256 => Some(CaCurve::P256),
        b if b == x509::oid::P384 => Some(CaCurve::P384),
        _ => None,
    }
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

/// The signing certificate checked for its role, and its key, which must be a key of its
/// curve matching it.
fn signing_key(
    trust_domain: &TrustDomain,
    cert: &X509Certificate<'_>,
    key_pkcs8: &[u8],
    cert_path: &Path,
    key_path: &Path,
    rng: &SystemRandom,
) -> Result<(EcdsaKeyPair, CaCurve), CaError> {
    check_signing_cert(cert, trust_domain).map_err(|m| bad_ca(cert_path, m))?;
    let curve = curve_of(cert.public_key())
        .ok_or_else(|| bad_ca(key_path, "CA key must be ECDSA P-256 or P-384"))?;
    let key = EcdsaKeyPair::from_pkcs8(curve.signing_alg(), key_pkcs8, rng).map_err(|_| {
        bad_ca(
            key_path,
            "private key is not a valid key for the CA's curve",
        )
    })?;
    if key.public_key().as_ref() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(bad_ca(
            key_path,
            "private key does not match the CA certificate",
        ));
    }
    Ok((key, curve))
}

/// The X509-SVID standard's rules for a signing certificate.
fn check_signing_cert(cert: &X509Certificate<'_>, td: &TrustDomain) -> Result<(), String> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err("CA certificate must have basicConstraints cA=true".into()),
        Err(_) => return Err("CA certificate has a malformed basicConstraints extension".into()),
    }
    match cert.key_usage() {
        // X509-SVID §4.3: set on all SVIDs, signing certificates included, and critical.
        Ok(Some(ku)) if !ku.critical => {
            return Err("CA certificate keyUsage must be marked critical (X509-SVID §4.3)".into());
        }
        // cRLSign too: the CRL the daemon serves is signed with this key, and a relying party
        // that checks revocation refuses a CRL whose issuer lacks it (RFC 5280 §4.2.1.3,
        // §6.3.3 (f)), and with it every SVID.
        Ok(Some(ku)) if ku.value.key_cert_sign() && ku.value.crl_sign() => {}
        Ok(Some(ku)) if ku.value.key_cert_sign() => {
            return Err("CA certificate keyUsage must include cRLSign: tesserad signs the CRL it serves with this key, and relying parties that check revocation refuse a CRL from a certificate without it".into());
        }
        Ok(Some(_)) => return Err("CA certificate keyUsage must include keyCertSign".into()),
        Ok(None) => {
            return Err("CA certificate must have a keyUsage extension with keyCertSign".into());
        }
        Err(_) => return Err("CA certificate has a malformed keyUsage extension".into()),
    }
    check_signing_id(cert, td)
}

/// A signing certificate's SPIFFE ID, if it has one, is the trust domain's own (no path). A
/// URI SAN is a SPIFFE ID whatever the case of its scheme.
fn check_signing_id(cert: &X509Certificate<'_>, td: &TrustDomain) -> Result<(), String> {
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri
                    .get(.."spiffe://".len())
                    .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
            {
                let id = SpiffeId::parse(uri)
                    .map_err(|e| format!("CA certificate URI SAN {uri:?} {e}"))?;
                if id.trust_domain_name() != td.as_str() || !id.path().is_empty() {
                    return Err(format!(
                        "CA certificate SPIFFE ID {uri} must be the trust domain's own ID spiffe://{td} (no path)"
                    ));
                }
            }
        }
    }
    Ok(())
}

fn parse_pem_certs(path: &Path, text: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let pems = pem::parse_many(text).map_err(|e| bad_ca(path, format!("not PEM: {e}")))?;
    let certs: Vec<Vec<u8>> = pems
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(bad_ca(path, "contains no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Checks that `chain` (signing certificate first) is one: each certificate issued and signed
/// by the next, every issuer but a self-issued anchor a CA, none expired (a signature in an
/// algorithm ring cannot check is let through with a warning).
/// A file in another order, or holding a certificate of another CA, would give SVIDs that no
/// validator accepts, which would only show when relying parties refuse them. Returns the
/// earliest `notAfter`: nothing signed may outlive any link, since a path validator refuses
/// a chain with an expired one.
fn check_chain(
    chain: &[Vec<u8>],
    path: &Path,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, CaError> {
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, der)| {
            parse_x509_certificate(der).map(|(_, c)| c).map_err(|_| {
                bad_ca(
                    path,
                    format!("certificate {} of the CA chain does not parse", i + 1),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let name = |i: usize| format!("certificate {} ({})", i + 1, certs[i].subject());
    // Byte for byte, as Go (go-spiffe) and rustls chain names: a chain that matched only
    // after normalizing would start here and fail at every relying party.
    let same_name = |a: &x509_parser::x509::X509Name<'_>, b: &x509_parser::x509::X509Name<'_>| {
        a.as_raw() == b.as_raw()
    };
    let last = certs.len() - 1;
    for (i, pair) in certs.windows(2).enumerate() {
        let (child, parent) = (&pair[0], &pair[1]);
        if !same_name(child.issuer(), parent.subject()) {
            return Err(bad_ca(
                path,
                format!(
                    "{} is issued by {}, not by the next {}; list the signing certificate first, then each issuer in order",
                    name(i),
                    child.issuer(),
                    name(i + 1)
                ),
            ));
        }
        // A self-issued last certificate is a trust anchor, which may be an old v1 root with
        // no basicConstraints; an intermediate must say it is a CA.
        let anchor = i + 1 == last && same_name(parent.issuer(), parent.subject());
        if !anchor && !parent.is_ca() {
            return Err(bad_ca(
                path,
                format!("{} issues {} but is not a CA", name(i + 1), name(i)),
            ));
        }
        match child.verify_signature(Some(parent.public_key())) {
            Ok(()) => {}
            // Sound algorithms ring cannot check (P-521, Ed448, RSA-PSS with some hashes):
            // relying parties judge those, and refusing them would refuse a chain they
            // accept. Anything else (MD5, unknown) is refused below.
            Err(x509_parser::error::X509Error::SignatureUnsupportedAlgorithm)
                if sound_unverifiable(&child.signature_algorithm.algorithm) =>
            {
                tracing::warn!(
                    "cannot check the signature of {} by {} (algorithm not supported here)",
                    name(i),
                    name(i + 1)
                );
            }
            Err(_) => {
                return Err(bad_ca(
                    path,
                    format!(
                        "the signature of {} does not verify with the key of {}",
                        name(i),
                        name(i + 1)
                    ),
                ));
            }
        }
    }
    // (A trust anchor's own self-signature is not checked: path validation never uses it.)
    check_chain_constraints(&certs, &name).map_err(|why| bad_ca(path, why))?;
    let mut earliest: Option<OffsetDateTime> = None;
    for (i, c) in certs.iter().enumerate() {
        // Not valid yet: every SVID it signs fails path validation until then, at every
        // relying party. Far ahead, it is a certificate made for the future: refused. Within
        // a day, the clock is more likely behind (a boot before NTP): refusing would leave a
        // supervised daemon failed after its restarts, even once NTP put the clock right, so
        // it serves and says so, loudly.
        let ahead = c.validity().not_before.timestamp() - now.unix_timestamp();
        if ahead > NOT_YET_VALID_REFUSED_S {
            return Err(bad_ca(
                path,
                format!(
                    "{} of the CA chain is not valid until {} (now {now}); every SVID it \
                     signed would be refused until then: use a certificate valid now. (A CA \
                     tesserad generated while the clock was ahead: move its directory away to \
                     have a new one made, once the clock is right)",
                    name(i),
                    c.validity().not_before
                ),
            ));
        } else if ahead > 0 {
            tracing::error!(
                certificate = %name(i),
                path = %path.display(),
                seconds = ahead,
                "a CA certificate is not valid yet: relying parties refuse every SVID until \
                 then. The clock may be behind (it is then right once NTP has set it), or was \
                 ahead when the certificate was made"
            );
        }
        let t = OffsetDateTime::from_unix_timestamp(c.validity().not_after.timestamp())
            .map_err(|_| bad_ca(path, format!("{}: notAfter out of range", name(i))))?;
        if t <= now {
            return Err(bad_ca(
                path,
                format!(
                    "{} of the CA chain expired at {}; renew it",
                    name(i),
                    c.validity().not_after
                ),
            ));
        }
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    Ok(earliest.expect("a chain has at least one certificate"))
}

/// How far in the future a CA certificate's `notBefore` may be before start-up refuses it
/// rather than warning: past a day it is not a clock behind at boot.
const NOT_YET_VALID_REFUSED_S: i64 = 86_400;

/// What relying parties check of a chain beyond names and signatures, so that a chain they
/// would refuse is refused at start rather than in every workload (review AZ-2): the SPIFFE
/// libraries (go-, java-, rust-spiffe) require keyCertSign on every certificate that travels
/// with an SVID; path validators apply every certificate's pathLenConstraint and extended key
/// usage (Go, OpenSSL with a purpose), the anchor's included. (Name constraints need the trust
/// domain: [`check_chain_for`].)
fn check_chain_constraints(
    certs: &[X509Certificate<'_>],
    name: &dyn Fn(usize) -> String,
) -> Result<(), String> {
    use x509_parser::extensions::ExtendedKeyUsage;
    let self_issued = |c: &X509Certificate<'_>| c.issuer().as_raw() == c.subject().as_raw();
    let last = certs.len() - 1;
    for (i, c) in certs.iter().enumerate() {
        let anchor = i == last && self_issued(c);
        // The signing certificate (0) has its own, stricter check.
        if i > 0 && !anchor {
            match c.key_usage() {
                Ok(Some(ku)) if ku.value.key_cert_sign() => {}
                Ok(_) => {
                    return Err(format!(
                        "{} issues certificates but has no keyUsage with keyCertSign: the \
                         SPIFFE libraries (go-spiffe, java-spiffe, the spiffe crate) refuse \
                         every SVID whose chain holds it",
                        name(i)
                    ));
                }
                Err(_) => return Err(format!("{} has a malformed keyUsage", name(i))),
            }
        }
        // Intermediate CA certificates between this one and the leaves it covers (the leaf
        // itself does not count; self-issued ones do not either).
        let below = certs[..i].iter().filter(|c| !self_issued(c)).count() as u32;
        if let Ok(Some(bc)) = c.basic_constraints()
            && let Some(max) = bc.value.path_len_constraint
            && below > max
        {
            return Err(format!(
                "{} allows {max} CA certificate(s) below it (pathLenConstraint) but the chain \
                 has {below}; path validation refuses every SVID",
                name(i)
            ));
        }
        if let Ok(Some(eku)) = c.extended_key_usage() {
            let ExtendedKeyUsage {
                any,
                server_auth,
                client_auth,
                ..
            } = *eku.value;
            if !(any || server_auth && client_auth) {
                return Err(format!(
                    "{} restricts extended key usage to purposes without both serverAuth and \
                     clientAuth, which X.509-SVIDs carry: validators that nest key usages (Go, \
                     OpenSSL) refuse them",
                    name(i)
                ));
            }
        }
    }
    Ok(())
}

/// What start-up checks of a chain for the trust domain, and `--check-config` as well: every
/// certificate after the signing one is a signing certificate too, whose SPIFFE ID, if any,
/// has no path (X509-SVID §3.2), and no certificate's URI name constraints may exclude the
/// trust domain's SPIFFE IDs (RFC 5280 §4.2.1.10: a URI constraint is a host, or with a
/// leading dot any host under it), which validators that apply them (OpenSSL, Go) would
/// refuse.
fn check_chain_for(td: &TrustDomain, chain: &[Vec<u8>], path: &Path) -> Result<(), CaError> {
    for (i, der) in chain.iter().enumerate() {
        let Ok((_, c)) = parse_x509_certificate(der) else {
            continue;
        };
        let who = format!("certificate {} of the chain", i + 1);
        if i > 0 {
            check_signing_id(&c, td).map_err(|m| bad_ca(path, format!("{who}: {m}")))?;
        }
        if let Ok(Some(nc)) = c.name_constraints() {
            uri_constraints_allow(nc.value, td.as_str())
                .map_err(|m| bad_ca(path, format!("{who} ({}): {m}", c.subject())))?;
        }
    }
    Ok(())
}

/// Whether URI name constraints let SPIFFE IDs of trust domain `td` through.
fn uri_constraints_allow(
    nc: &x509_parser::extensions::NameConstraints<'_>,
    td: &str,
) -> Result<(), String> {
    let uris = |t: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| -> Vec<String> {
        t.iter()
            .flatten()
            .filter_map(|s| match &s.base {
                GeneralName::URI(u) => Some(u.to_ascii_lowercase()),
                _ => None,
            })
            .collect()
    };
    // RFC 5280 (and OpenSSL): a host matches only itself, and `.host` any host under it.
    // An empty constraint covers every host.
    let covers = |c: &String| match c.strip_prefix('.') {
        _ if c.is_empty() => true,
        Some(_) => td.ends_with(c.as_str()),
        None => td == c,
    };
    // Go (go-spiffe) also counts the hosts under a plain `host`: broader, so it decides
    // what is excluded (and the RFC's narrower reading what is permitted).
    let covers_go = |c: &String| covers(c) || td.ends_with(&format!(".{c}"));
    let (permitted, excluded) = (uris(&nc.permitted_subtrees), uris(&nc.excluded_subtrees));
    if !permitted.is_empty() && !permitted.iter().any(covers) {
        return Err(format!(
            "its URI name constraints permit only {permitted:?}, not trust domain {td}: path \
             validation refuses every SVID"
        ));
    }
    if let Some(c) = excluded.iter().find(|c| covers_go(c)) {
        return Err(format!(
            "its URI name constraints exclude {c:?}, which covers trust domain {td}: path \
             validation refuses every SVID"
        ));
    }
    Ok(())
}

/// The operator's chain (DER, signing certificate first), its key (PKCS#8) and the chain's
/// earliest `notAfter`.
type OperatorCa = (Vec<Vec<u8>>, Vec<u8>, OffsetDateTime);

/// Signature algorithms that are sound but that x509-parser with ring may not verify.
fn sound_unverifiable(alg: &x509_parser::der_parser::oid::Oid<'_>) -> bool {
    use x509_parser::oid_registry as r;
    [
        r::OID_SIG_ECDSA_WITH_SHA256,
        r::OID_SIG_ECDSA_WITH_SHA384,
        r::OID_SIG_ECDSA_WITH_SHA512,
        r::OID_SIG_ED448,
        r::OID_PKCS1_RSASSAPSS,
        r::OID_PKCS1_SHA256WITHRSA,
        r::OID_PKCS1_SHA384WITHRSA,
        r::OID_PKCS1_SHA512WITHRSA,
    ]
    .contains(alg)
}

/// Reads the operator's CA chain and key. Accepts PKCS#8 (`PRIVATE KEY`) and SEC1
/// (`EC PRIVATE KEY`); refuses keys others can read and chains that are not one
/// ([`check_chain`]), whose earliest `notAfter` it returns.
fn read_operator_ca(
    cert_path: &Path,
    key_path: &Path,
    now: OffsetDateTime,
) -> Result<OperatorCa, CaError> {
    let text =
        fsutil::read_pem_file(cert_path, false).map_err(|e| bad_ca(cert_path, e.to_string()))?;
    let chain = parse_pem_certs(cert_path, &text)?;
    let not_after = check_chain(&chain, cert_path, now)?;
    let key_pem = read_key_file(key_path)?;
    let pkcs8 = match key_pem.tag() {
        "PRIVATE KEY" => key_pem.into_contents(),
        "EC PRIVATE KEY" => {
            let (_, cert) = parse_x509_certificate(&chain[0])
                .map_err(|_| bad_ca(cert_path, "first certificate does not parse"))?;
            let curve = match curve_of(cert.public_key()) {
                Some(CaCurve::P256) => x509::oid::P256,
                Some(CaCurve::P384) => x509::oid::P384,
                None => return Err(bad_ca(cert_path, "CA key must be ECDSA P-256 or P-384")),
            };
            sec1_to_pkcs8(curve, key_pem.contents())
        }
        other => {
            return Err(bad_ca(
                key_path,
                format!("unsupported PEM block {other:?}; expected PRIVATE KEY or EC PRIVATE KEY"),
            ));
        }
    };
    Ok((chain, pkcs8, not_after))
}

/// Wraps a SEC1 ECPrivateKey in a PKCS#8 PrivateKeyInfo (RFC 5915 / RFC 5208).
fn sec1_to_pkcs8(curve_oid: &[u8], sec1: &[u8]) -> Vec<u8> {
    use der::tag;
    let mut out = Vec::new();
    der::nested(&mut out, tag::SEQUENCE, |s| {
        der::tlv(s, tag::INTEGER, &[0]);
        der::nested(s, tag::SEQUENCE, |a| {
            der::tlv(a, tag::OID, x509::oid::EC_PUBLIC_KEY);
            der::tlv(a, tag::OID, curve_oid);
        });
        der::tlv(s, tag::OCTET_STRING, sec1);
    });
    out
}

/// A private key file as start-up takes it: a regular file, 0600, holding one PEM private
/// key. Blocks that are not private keys are skipped: the `EC PARAMETERS` that `openssl
/// ecparam -genkey` writes before the key, a certificate or public key kept in the same file.
/// Two keys are refused: which one was meant cannot be told.
fn read_key_file(path: &Path) -> Result<pem::Pem, CaError> {
    let text = fsutil::read_pem_file(path, true).map_err(|e| bad_ca(path, e.to_string()))?;
    let mut keys: Vec<pem::Pem> = pem::parse_many(&text)
        .map_err(|_| bad_ca(path, "not a PEM private key"))?
        .into_iter()
        .filter(|p| p.tag().ends_with("PRIVATE KEY"))
        .collect();
    match keys.len() {
        0 => Err(bad_ca(path, "not a PEM private key")),
        1 => Ok(keys.remove(0)),
        n => Err(bad_ca(
            path,
            format!("holds {n} private keys; give one per file"),
        )),
    }
}

/// A generated CA directory with one of its two files.
const ONE_HALF: &str = "holds only one of root.pem and root.key; restore the missing file or \
                        remove both to generate a new CA";

/// The generated CA at `cert_path` (in `dir`) signs for `td`, or the error says what to do.
fn check_generated_root(
    cert: &X509Certificate<'_>,
    td: &TrustDomain,
    cert_path: &Path,
    dir: &Path,
) -> Result<(), CaError> {
    check_signing_cert(cert, td).map_err(|why| {
        bad_ca(
            cert_path,
            format!(
                "cannot sign for trust domain {td}: {why}. If trust_domain was changed by \
                 mistake, set it back; to start a new trust domain, move {} away (a new CA is \
                 then created, and relying parties need its bundle)",
                dir.display()
            ),
        )
    })
}

/// Loads `dir/root.pem` + `dir/root.key`, or creates them. A missing half is an error, not a
/// reason to silently replace the CA that relying parties already trust.
fn load_or_generate_root(
    td: &TrustDomain,
    dir: &Path,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<(Vec<Vec<u8>>, Vec<u8>), CaError> {
    let cert_path = dir.join("root.pem");
    let key_path = dir.join("root.key");
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let text = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            let chain = parse_pem_certs(&cert_path, &text)?;
            let key = read_key_file(&key_path)?.into_contents();
            let (_, cert) = parse_x509_certificate(&chain[0])
                .map_err(|_| bad_ca(&cert_path, "does not parse"))?;
            // Never replaced for a config change: a trust_domain typo, then its correction,
            // would otherwise have thrown away the CA every relying party trusts.
            check_generated_root(&cert, td, &cert_path, dir)?;
            if cert.validity().not_after.timestamp() > now.unix_timestamp() {
                return Ok((chain, key));
            }
            // An expired generated CA cannot sign anything: replace it, keeping the old files
            // under names no later replacement reuses.
            let archived = archive_expired_root(dir, &chain[0], &cert_path, &key_path)?;
            tracing::error!(
                path = %cert_path.display(),
                kept_as = %archived.display(),
                "the generated CA expired: replacing it; relying parties need the new bundle"
            );
        }
        // An archive interrupted after the key was unlinked (it goes first): both are in the
        // archive, so finish it.
        (true, false) if archived_root(dir, &cert_path).is_some() => {
            std::fs::remove_file(&cert_path).map_err(io_err(&cert_path))?;
            tracing::warn!(
                path = %cert_path.display(),
                "finished archiving the expired CA an interrupted start left half moved"
            );
        }
        (true, false) | (false, true) => return Err(bad_ca(dir, ONE_HALF)),
        (false, false) => {}
    }
    let (cert_pem, key_pem) = generate_root(td, ttl, now)?;
    // Key first: a crash in between leaves a key without a certificate, which is reported,
    // never a certificate whose key was lost.
    fsutil::write_private_file(&key_path, key_pem.as_bytes()).map_err(io_err(&key_path))?;
    fsutil::write_private_file(&cert_path, cert_pem.as_bytes()).map_err(io_err(&cert_path))?;
    tracing::info!(path = %cert_path.display(), trust_domain = %td, "generated a new CA");
    let chain = parse_pem_certs(&cert_path, &cert_pem)?;
    let key = pem::parse(&key_pem)
        .map_err(|_| CaError::Generate("key PEM".into()))?
        .into_contents();
    Ok((chain, key))
}

/// Moves an expired `root.pem` and `root.key` to `root.<fingerprint>.pem.old` and
/// `.key.old`, named after the certificate so that no later archive replaces them. Returns the
/// certificate's new path.
fn archive_expired_root(
    dir: &Path,
    der: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<std::path::PathBuf, CaError> {
    let (cert_old, key_old) = archive_names(dir, der);
    // Linked, then unlinked: a link never replaces an existing file (a rename would). Both
    // are linked before either goes, and the key goes first: a crash leaves both in the
    // archive, and at most the certificate behind too, which the next start removes.
    let moves = [(key_path, &key_old), (cert_path, &cert_old)];
    for (from, to) in moves {
        match std::fs::hard_link(from, to) {
            Ok(()) => {}
            // The same certificate archived before (a crash between link and unlink).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(to)(e)),
        }
    }
    for (from, _) in moves {
        std::fs::remove_file(from).map_err(io_err(from))?;
    }
    Ok(cert_old)
}

/// Where [`archive_expired_root`] keeps the CA whose first certificate is `der`.
fn archive_names(dir: &Path, der: &[u8]) -> (std::path::PathBuf, std::path::PathBuf) {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let tag = hex::encode(&digest.as_ref()[..8]);
    (
        dir.join(format!("root.{tag}.pem.old")),
        dir.join(format!("root.{tag}.key.old")),
    )
}

/// The archive of the CA at `cert_path`, if both of its files are there.
fn archived_root(dir: &Path, cert_path: &Path) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(cert_path).ok()?;
    let der = parse_pem_certs(cert_path, &text).ok()?.into_iter().next()?;
    let (cert_old, key_old) = archive_names(dir, &der);
    (cert_old.exists() && key_old.exists()).then_some(cert_old)
}

fn generate_root(
    td: &TrustDomain,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<(String, String), CaError> {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
    let g = |e: rcgen::Error| CaError::Generate(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tessera");
    dn.push(DnType::CommonName, format!("Tessera CA {td}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(td.id_string()).map_err(g)?,
    )];
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + ttl;
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| CaError::Crypto("random source failed"))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&key).map_err(g)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn load_or_generate_jwt_key(data_dir: &Path) -> Result<Es256Signer, CaError> {
    let dir = data_dir.join("jwt");
    fsutil::ensure_private_dir(&dir).map_err(io_err(&dir))?;
    let path = dir.join("signing.key");
    let pkcs8 = if path.exists() {
        read_key_file(&path)?.into_contents()
    } else {
        let doc = EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .map_err(|_| CaError::Crypto("key generation failed"))?;
        let text = pem::encode_config(
            &pem::Pem::new("PRIVATE KEY", doc.as_ref().to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        fsutil::write_private_file(&path, text.as_bytes()).map_err(io_err(&path))?;
        doc.as_ref().to_vec()
    };
    Es256Signer::from_pkcs8(&pkcs8).map_err(|_| bad_ca(&path, "not a P-256 PKCS#8 key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    fn ca(dir: &Path) -> Ca {
        Ca::load_or_create(&td(), dir, None, Duration::from_secs(86400)).unwrap()
    }

    #[test]
    fn generated_ca_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = ca(dir.path());
        for f in ["ca/root.key", "jwt/signing.key"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let b = ca(dir.path());
        assert_eq!(a.bundle().x509_der, b.bundle().x509_der);
        assert_eq!(a.jwt_kid(), b.jwt_kid());
    }

    #[test]
    fn leaf_follows_the_x509_svid_profile() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let id = SpiffeId::parse("spiffe://example.org/workload").unwrap();
        let now = OffsetDateTime::now_utc();
        let m = ca.mint_x509(&id, Duration::from_secs(600), now).unwrap();
        let (rest, cert) = parse_x509_certificate(&m.chain_der[..m.leaf_len]).unwrap();
        assert!(rest.is_empty());
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            vec![GeneralName::URI("spiffe://example.org/workload")]
        );
        assert!(cert.validity().not_before.timestamp() < now.unix_timestamp());
        // The signature verifies with the CA's key.
        let bundle = ca.bundle();
        let (_, root) = parse_x509_certificate(&bundle.x509_der).unwrap();
        cert.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(cert.issuer().as_raw(), root.subject().as_raw());
    }

    #[test]
    fn svids_never_outlive_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&td(), dir.path(), None, Duration::from_secs(7200)).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
        let now = OffsetDateTime::now_utc();
        let m = ca
            .mint_x509(&id, Duration::from_secs(30 * 86400), now)
            .unwrap();
        assert!(m.not_after <= ca.not_after());
        let (_, exp) = ca
            .mint_jwt(
                &id,
                &["a".into()],
                Duration::from_secs(30 * 86400),
                now,
                "j",
            )
            .unwrap();
        assert!(exp <= ca.not_after());
        // Once the CA has expired, nothing is signed: every credential would be expired.
        let past = ca.not_after();
        assert!(matches!(
            ca.mint_x509(&id, Duration::from_secs(60), past),
            Err(CaError::Expired)
        ));
        assert!(matches!(
            ca.mint_jwt(&id, &["a".into()], Duration::from_secs(60), past, "j"),
            Err(CaError::Expired)
        ));
    }

    #[test]
    fn jwt_validation_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
        let now = OffsetDateTime::now_utc();
        let (t, _) = ca
            .mint_jwt(&id, &["svc".into()], Duration::from_secs(60), now, "j1")
            .unwrap();
        let (sub, claims) = ca.validate_jwt(&t, "svc", now).unwrap();
        assert_eq!(sub, id);
        assert_eq!(claims["jti"], "j1");
        assert!(matches!(
            ca.validate_jwt(&t, "other", now),
            Err(JwtSvidError::AudienceMismatch(_))
        ));
        let later = now + time::Duration::seconds(61);
        assert_eq!(
            ca.validate_jwt(&t, "svc", later),
            Err(JwtSvidError::Expired)
        );
        // A token from another CA (same kid format, different key) is refused.
        let dir2 = tempfile::tempdir().unwrap();
        let other =
            Ca::load_or_create(&td(), dir2.path(), None, Duration::from_secs(86400)).unwrap();
        let (t2, _) = other
            .mint_jwt(&id, &["svc".into()], Duration::from_secs(60), now, "j")
            .unwrap();
        assert!(matches!(
            ca.validate_jwt(&t2, "svc", now),
            Err(JwtSvidError::Jose(JoseError::UnknownKey(_)))
        ));
    }

    #[test]
    fn jwt_bundle_has_only_jwt_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let jwks: Value = serde_json::from_slice(&ca.bundle().jwt_jwks).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["use"], "jwt-svid");
        assert_eq!(keys[0]["kid"], ca.jwt_kid());
        let doc = ca.bundle().federation_document(Duration::from_secs(300));
        let uses: Vec<&str> = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["use"].as_str().unwrap())
            .collect();
        assert_eq!(uses, ["x509-svid", "jwt-svid"]);
        assert!(doc["keys"][0].get("kid").is_none());
    }

    #[test]
    fn anchors_of_every_standard_key_type_reach_the_bundle_document() {
        use x509_parser::prelude::FromDer;
        // SubjectPublicKeyInfo DER: SEQUENCE { AlgorithmIdentifier, BIT STRING }.
        fn spki(alg: &[u8], key: &[u8]) -> Vec<u8> {
            // Lengths under 256 (one long-form octet past 127) are all these keys need.
            let tlv = |tag: u8, body: &[u8]| {
                let mut v = vec![tag];
                if body.len() < 128 {
                    v.push(body.len() as u8);
                } else {
                    v.extend([0x81, body.len() as u8]);
                }
                v.extend_from_slice(body);
                v
            };
            let mut bits = vec![0];
            bits.extend_from_slice(key);
            let mut body = tlv(0x30, alg);
            body.extend(tlv(0x03, &bits));
            tlv(0x30, &body)
        }
        let members = |der: &[u8]| {
            let (_, s) = SubjectPublicKeyInfo::from_der(der).unwrap();
            spki_jwk_members(&s).map(Value::Object)
        };
        let b64 = jose::b64_encode;
        // id-Ed25519, no parameters (RFC 8410 §3).
        let ed = [7u8; 32];
        assert_eq!(
            members(&spki(&[0x06, 0x03, 0x2b, 0x65, 0x70], &ed)),
            Some(json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&ed)}))
        );
        // Ed448 is left out: Go's JOSE library refuses it, and the whole document with it.
        assert_eq!(
            members(&spki(&[0x06, 0x03, 0x2b, 0x65, 0x71], &[9; 57])),
            None
        );
        // A key of the wrong length is left out, not published half-formed.
        assert_eq!(
            members(&spki(&[0x06, 0x03, 0x2b, 0x65, 0x70], &[7; 31])),
            None
        );
        // id-ecPublicKey with secp521r1.
        let p521_alg = [
            0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
            0x00, 0x23,
        ];
        let mut point = vec![4u8];
        point.extend([1u8; 66]);
        point.extend([2u8; 66]);
        assert_eq!(
            members(&spki(&p521_alg, &point)),
            Some(json!({"kty": "EC", "crv": "P-521", "x": b64(&[1; 66]), "y": b64(&[2; 66])}))
        );
        point[0] = 2;
        assert_eq!(members(&spki(&p521_alg, &point[..67])), None);
    }

    #[test]
    fn credential_expiry_is_capped_and_never_overflows() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let cap = now + time::Duration::days(365);
        let hour = Duration::from_secs(3600);
        assert_eq!(
            credential_expiry(now, hour, cap),
            now + time::Duration::hours(1)
        );
        assert_eq!(credential_expiry(now, hour * 24 * 400, cap), cap);
        // Past year 9999, and past what time::Duration holds: the cap, not a panic.
        assert_eq!(credential_expiry(now, hour * 24 * 365 * 9000, cap), cap);
        assert_eq!(credential_expiry(now, Duration::MAX, cap), cap);
    }

    #[test]
    fn crl_numbers_keep_increasing_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let crl_number = |ca: &Ca| {
            ca.publish_crl(&[], OffsetDateTime::now_utc()).unwrap();
            let b = ca.bundle();
            let (_, crl) = x509_parser::parse_x509_crl(&b.crl).unwrap();
            let n = crl.crl_number().unwrap().to_u64_digits();
            assert_eq!(n, vec![b.sequence], "the CRL number is the bundle sequence");
            b.sequence
        };
        let first = ca(dir.path());
        let a = crl_number(&first);
        let b = crl_number(&first);
        assert!(b > a);
        drop(first);
        // Two publications in one millisecond ran the counter one ahead of the clock; the
        // publisher's 5 ms pause and a real restart's duration let the clock pass it.
        std::thread::sleep(std::time::Duration::from_millis(3));
        // The same CA, loaded again as after a restart: its numbers go on increasing.
        let again = ca(dir.path());
        assert!(again.bundle().sequence >= b);
        assert!(crl_number(&again) > b);
        // A run whose clock was far ahead reserved numbers up there; with the clock right
        // again, the next start still begins above them.
        drop(again);
        let file = dir.path().join("crl_number");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let ahead = b + 86_400_000 * 365;
        std::fs::write(&file, format!("{ahead}\n")).unwrap();
        let after = ca(dir.path());
        assert!(after.bundle().sequence > ahead);
        assert!(crl_number(&after) > ahead);
        let on_disk = || -> u64 {
            std::fs::read_to_string(&file)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert!(on_disk() >= after.bundle().sequence, "durable before use");
        // A clean stop settles the reservation on the last number used.
        after.settle_reservation();
        assert_eq!(on_disk(), after.bundle().sequence);
        // A renewal that cannot be written is only warned about while the reservation
        // lasts; past it, nothing is signed.
        let now = OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(after.bundle().sequence) * 1_000_000,
        )
        .unwrap();
        after.publish_crl(&[], now).unwrap();
        let reserved = on_disk();
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let ms = |n: u64| time::Duration::milliseconds(n as i64);
        let before = after.bundle().sequence;
        after
            .publish_crl(&[], now + ms(SEQUENCE_RESERVE * 3 / 4))
            .unwrap();
        assert!(after.bundle().sequence > before && after.bundle().sequence <= reserved);
        let before = after.bundle().sequence;
        assert!(
            after
                .publish_crl(&[], now + ms(SEQUENCE_RESERVE * 2))
                .is_err()
        );
        assert_eq!(after.bundle().sequence, before, "nothing published past it");
        std::fs::remove_dir(&file).unwrap();
        // Damaged files stop start-up: not a number, or a century ahead of the clock.
        std::fs::write(&file, "garbage").unwrap();
        assert!(Ca::load_or_create(&td(), dir.path(), None, Duration::from_secs(86_400)).is_err());
        std::fs::write(&file, format!("{}", u64::MAX)).unwrap();
        assert!(Ca::load_or_create(&td(), dir.path(), None, Duration::from_secs(86_400)).is_err());
        // A clock that went back (or a burst within one millisecond) still counts up.
        let t = OffsetDateTime::from_unix_timestamp(1_000).unwrap();
        assert_eq!(next_sequence(5_000_000, t), 5_000_001);
        assert_eq!(next_sequence(0, t), 1_000_000);
    }

    #[test]
    fn crl_lists_revoked_serials_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let now = OffsetDateTime::now_utc();
        let revoked: Vec<_> = (0..3u8)
            .map(|i| crate::lease::RevokedSerial {
                serial: [0x40 | i; 16],
                revoked_at: now.unix_timestamp(),
                expires_at: 0,
            })
            .collect();
        let before = ca.bundle().sequence;
        assert_eq!(ca.publish_crl(&revoked, now).unwrap(), 0);
        let b = ca.bundle();
        assert!(b.sequence > before);
        let (rest, crl) = x509_parser::parse_x509_crl(&b.crl).unwrap();
        assert!(rest.is_empty());
        assert_eq!(crl.iter_revoked_certificates().count(), 3);
        assert_eq!(
            crl.crl_number().map(|n| n.to_string()),
            Some(b.sequence.to_string())
        );
        let (_, root) = parse_x509_certificate(&b.x509_der).unwrap();
        crl.verify_signature(root.public_key()).unwrap();
    }

    #[test]
    fn a_full_crl_lists_the_serials_that_expire_last() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let now = OffsetDateTime::now_utc();
        let serial = |i: u32| {
            let mut s = [0x40; 16];
            s[12..].copy_from_slice(&i.to_be_bytes());
            s
        };
        // One more than fits, in no particular order of expiry.
        let n = MAX_CRL_ENTRIES as u32 + 1;
        let revoked: Vec<_> = (0..n)
            .map(|i| (i * 7919) % n)
            .map(|i| crate::lease::RevokedSerial {
                serial: serial(i),
                revoked_at: now.unix_timestamp(),
                expires_at: now.unix_timestamp() + i64::from(i),
            })
            .collect();
        assert_eq!(ca.publish_crl(&revoked, now).unwrap(), 1, "one left out");
        let b = ca.bundle();
        let (_, crl) = x509_parser::parse_x509_crl(&b.crl).unwrap();
        let listed: std::collections::HashSet<Vec<u8>> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        assert_eq!(listed.len(), MAX_CRL_ENTRIES);
        assert!(
            !listed.contains(&serial(0)[..]),
            "the first to expire is left out"
        );
        assert!(listed.contains(&serial(1)[..]));
        assert!(listed.contains(&serial(n - 1)[..]));
    }

    #[test]
    fn a_generated_ca_is_never_replaced_for_another_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        let key = std::fs::read(dir.path().join("ca/root.key")).unwrap();
        let typo = TrustDomain::parse("exmaple.org").unwrap();
        let err =
            Ca::load_or_create(&typo, dir.path(), None, Duration::from_secs(86400)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("set it back") && msg.contains("move"), "{msg}");
        // The typo corrected: the same CA, nothing created or moved meanwhile.
        ca(dir.path());
        assert_eq!(std::fs::read(dir.path().join("ca/root.key")).unwrap(), key);
        let files = std::fs::read_dir(dir.path().join("ca")).unwrap().count();
        assert_eq!(files, 2, "only root.pem and root.key");
    }

    #[test]
    fn expired_generated_cas_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        fsutil::ensure_private_dir(&ca_dir).unwrap();
        let t0 = OffsetDateTime::now_utc();
        let hour = Duration::from_secs(3600);
        let mut keys = Vec::new();
        for h in [0, 2, 4] {
            let now = t0 + time::Duration::hours(h);
            let (_, key) = load_or_generate_root(&td(), &ca_dir, hour, now).unwrap();
            keys.push(key);
        }
        // Each start found the CA before expired and made a new one; both old ones are kept.
        let mut archived: Vec<Vec<u8>> = std::fs::read_dir(&ca_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".key.old"))
            .map(|p| {
                let text = fsutil::read_pem_file(&p, true).unwrap();
                pem::parse(&text).unwrap().into_contents()
            })
            .collect();
        archived.sort();
        let mut expected = keys[..2].to_vec();
        expected.sort();
        assert_eq!(archived, expected, "an expired CA's key was lost");
        assert_eq!(std::fs::read_dir(&ca_dir).unwrap().count(), 6);

        // A start that crashed between the key's unlink and the certificate's (review AB):
        // the next one finishes the archive instead of refusing.
        let now = t0 + time::Duration::hours(6);
        let der = parse_pem_certs(
            &ca_dir.join("root.pem"),
            &std::fs::read_to_string(ca_dir.join("root.pem")).unwrap(),
        )
        .unwrap()
        .remove(0);
        let (cert_old, key_old) = archive_names(&ca_dir, &der);
        std::fs::hard_link(ca_dir.join("root.pem"), cert_old).unwrap();
        std::fs::rename(ca_dir.join("root.key"), &key_old).unwrap();
        let (_, key) = load_or_generate_root(&td(), &ca_dir, hour, now).unwrap();
        assert!(!keys.contains(&key), "a new CA");
        assert_eq!(std::fs::read_dir(&ca_dir).unwrap().count(), 8);
    }

    #[test]
    fn half_a_generated_ca_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        std::fs::remove_file(dir.path().join("ca/root.key")).unwrap();
        let err =
            Ca::load_or_create(&td(), dir.path(), None, Duration::from_secs(86400)).unwrap_err();
        assert!(err.to_string().contains("only one of"), "{err}");
    }

    #[test]
    fn nothing_outlives_a_certificate_of_the_operator_chain() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let params = |cn: &str, hours: i64| {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            p.subject_alt_names = vec![rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(td().id_string()).unwrap(),
            )];
            p.not_before = now - time::Duration::minutes(5);
            p.not_after = now + time::Duration::hours(hours);
            p
        };
        // The signing certificate lives a day, under an anchor that ends in an hour (as an
        // anchor or intermediate about to expire would).
        let anchor_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let anchor_params = params("anchor", 1);
        let anchor = anchor_params.self_signed(&anchor_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signer = params("signer", 24)
            .signed_by(&key, &Issuer::from_params(&anchor_params, &anchor_key))
            .unwrap();
        let chain = format!("{}{}", signer.pem(), anchor.pem());
        let ca = load_operator_ca(dir.path(), &chain, &key.serialize_pem()).unwrap();
        assert!(
            ca.not_after() <= now + time::Duration::hours(1),
            "{}",
            ca.not_after()
        );
    }

    /// Loads an operator CA of `signer` (signed by `anchor`, whose file follows it) with
    /// `anchor_san` and, for the signer, a keyUsage marked critical or not.
    fn operator_chain(anchor_san: &str, ku_critical: bool) -> Result<Ca, CaError> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let params = |san: &str| {
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            p.subject_alt_names = vec![rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(san).unwrap(),
            )];
            p
        };
        let anchor_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let anchor_params = params(anchor_san);
        let anchor = anchor_params.self_signed(&anchor_key).unwrap();
        let mut signer_params = params(&td().id_string());
        if !ku_critical {
            // keyCertSign and cRLSign, as a BIT STRING, in an extension not marked critical.
            signer_params.key_usages = Vec::new();
            let mut ku = rcgen::CustomExtension::from_oid_content(
                &[2, 5, 29, 15],
                vec![0x03, 0x02, 0x01, 0x06],
            );
            ku.set_criticality(false);
            signer_params.custom_extensions = vec![ku];
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signer = signer_params
            .signed_by(&key, &Issuer::from_params(&anchor_params, &anchor_key))
            .unwrap();
        let chain = format!("{}{}", signer.pem(), anchor.pem());
        load_operator_ca(dir.path(), &chain, &key.serialize_pem())
    }

    /// Loads the operator CA of `chain` (PEM, signing certificate first) and `key` (PEM),
    /// written to `dir` as `[ca] cert` and `key` (0600).
    fn load_operator_ca(dir: &Path, chain: &str, key: &str) -> Result<Ca, CaError> {
        let cp = dir.join("ca.pem");
        let kp = dir.join("ca.key");
        std::fs::write(&cp, chain).unwrap();
        std::fs::write(&kp, key).unwrap();
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();
        Ca::load_or_create(&td(), dir, Some(&(cp, kp)), Duration::from_secs(1))
    }

    #[test]
    fn every_signing_certificate_of_an_operator_chain_follows_x509_svid() {
        operator_chain(&td().id_string(), true).unwrap();
        // X509-SVID §3.2: a signing certificate's SPIFFE ID has no path, the anchor's too.
        let err = operator_chain("spiffe://example.org/ca/root", true).unwrap_err();
        assert!(
            err.to_string().contains("certificate 2 of the chain"),
            "{err}"
        );
        // §4.3: keyUsage is critical.
        let err = operator_chain(&td().id_string(), false).unwrap_err();
        assert!(err.to_string().contains("critical"), "{err}");
    }

    /// Loads a three-certificate operator chain (signer, intermediate, root), each
    /// certificate's parameters changed by `edit(i, params)` (0 the signer, 2 the root).
    fn three_chain(edit: impl Fn(usize, &mut rcgen::CertificateParams)) -> Result<Ca, CaError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let params = |i: usize| {
            let mut p = CertificateParams::default();
            p.distinguished_name
                .push(DnType::CommonName, ["signer", "intermediate", "root"][i]);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            p.not_before = now - time::Duration::minutes(5);
            p.not_after = now + time::Duration::days(2);
            edit(i, &mut p);
            p
        };
        let keys: Vec<KeyPair> = (0..3)
            .map(|_| KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
            .collect();
        let (rp, ip, sp) = (params(2), params(1), params(0));
        let root = rp.self_signed(&keys[2]).unwrap();
        let int = ip
            .signed_by(&keys[1], &Issuer::from_params(&rp, &keys[2]))
            .unwrap();
        let signer = sp
            .signed_by(&keys[0], &Issuer::from_params(&ip, &keys[1]))
            .unwrap();
        let chain = format!("{}{}{}", signer.pem(), int.pem(), root.pem());
        load_operator_ca(dir.path(), &chain, &keys[0].serialize_pem())
    }

    /// A nameConstraints extension permitting (or excluding) one URI host.
    fn uri_constraint(host: &str, excluded: bool) -> rcgen::CustomExtension {
        let mut subtree = vec![0x86, host.len() as u8];
        subtree.extend(host.as_bytes());
        let mut seq = vec![0x30, subtree.len() as u8];
        seq.extend(subtree);
        let mut tagged = vec![if excluded { 0xa1 } else { 0xa0 }, seq.len() as u8];
        tagged.extend(seq);
        let mut nc = vec![0x30, tagged.len() as u8];
        nc.extend(tagged);
        let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 30], nc);
        ext.set_criticality(true);
        ext
    }

    #[test]
    fn chains_that_relying_parties_refuse_are_refused_at_start() {
        use rcgen::{BasicConstraints, IsCa};
        three_chain(|_, _| {}).unwrap();
        // Certificate `at` (0 the signer, 2 the root) changed by `edit` is refused for `want`.
        let refused = |at: usize, edit: &dyn Fn(&mut rcgen::CertificateParams), want: &str| {
            let err = three_chain(|i, p| {
                if i == at {
                    edit(p);
                }
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{want:?} not in: {err}");
        };
        // The SPIFFE libraries want keyCertSign on every certificate sent with an SVID.
        refused(1, &|p| p.key_usages.clear(), "no keyUsage with keyCertSign");
        refused(
            2,
            &|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)),
            "pathLenConstraint",
        );
        // Below the root: the intermediate and the signer, two CA certificates.
        three_chain(|i, p| {
            if i == 2 {
                p.is_ca = IsCa::Ca(BasicConstraints::Constrained(2));
            } else if i == 1 {
                p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
            }
        })
        .expect("within the path lengths");
        refused(
            1,
            &|p| p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning],
            "extended key usage",
        );
        refused(
            2,
            &|p| p.custom_extensions = vec![uri_constraint("other.example", false)],
            "permit only",
        );
        refused(
            1,
            &|p| p.custom_extensions = vec![uri_constraint(td().as_str(), true)],
            "exclude",
        );
        three_chain(|i, p| {
            if i == 2 {
                p.custom_extensions = vec![uri_constraint(td().as_str(), false)];
            }
        })
        .expect("permitted: the trust domain itself");
        // Go reads an excluded host as covering the hosts under it, and an empty one as
        // covering all.
        refused(
            1,
            &|p| p.custom_extensions = vec![uri_constraint("org", true)],
            "exclude",
        );
        refused(
            1,
            &|p| p.custom_extensions = vec![uri_constraint("", true)],
            "exclude",
        );
        // Not valid for days: refused. Within a day (a clock behind at boot) it is served,
        // with an error logged.
        refused(
            2,
            &|p| p.not_before = OffsetDateTime::now_utc() + time::Duration::days(2),
            "is not valid until",
        );
        three_chain(|i, p| {
            if i == 2 {
                p.not_before = OffsetDateTime::now_utc() + time::Duration::hours(1);
            }
        })
        .expect("an hour ahead: served");
    }

    #[test]
    fn an_operator_ca_that_may_not_sign_crls_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = p.self_signed(&key).unwrap();
        let cp = dir.path().join("ca.pem");
        let kp = dir.path().join("ca.key");
        std::fs::write(&cp, cert.pem()).unwrap();
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Ca::load_or_create(&td(), dir.path(), Some(&(cp, kp)), Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("cRLSign"), "{err}");
    }

    #[test]
    fn operator_key_must_be_private_and_match() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) =
            generate_root(&td(), Duration::from_secs(86400), OffsetDateTime::now_utc()).unwrap();
        let cp = dir.path().join("ca.pem");
        let kp = dir.path().join("ca.key");
        std::fs::write(&cp, &cert).unwrap();
        std::fs::write(&kp, &key).unwrap();
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o644)).unwrap();
        let files = (cp.clone(), kp.clone());
        let err = Ca::load_or_create(&td(), dir.path(), Some(&files), Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ca =
            Ca::load_or_create(&td(), dir.path(), Some(&files), Duration::from_secs(1)).unwrap();
        assert!(ca.bundle().x509_authorities[0].operator_supplied);
        // Other blocks beside the key are skipped (`openssl ecparam -genkey` writes EC
        // PARAMETERS first; some keep the certificate in the key's file); a second key is not.
        let params =
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n";
        std::fs::write(&kp, format!("{params}{key}{cert}")).unwrap();
        Ca::load_or_create(&td(), dir.path(), Some(&files), Duration::from_secs(1)).unwrap();
        std::fs::write(&kp, format!("{key}{key}")).unwrap();
        let err = Ca::load_or_create(&td(), dir.path(), Some(&files), Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("2 private keys"), "{err}");
        std::fs::write(&kp, &key).unwrap();
        // A key that does not belong to the certificate is refused, and never printed.
        let (_, other_key) =
            generate_root(&td(), Duration::from_secs(86400), OffsetDateTime::now_utc()).unwrap();
        std::fs::write(&kp, &other_key).unwrap();
        let err = Ca::load_or_create(&td(), dir.path(), Some(&files), Duration::from_secs(1))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("does not match"), "{msg}");
        assert!(!msg.contains("PRIVATE KEY"));
    }
}
