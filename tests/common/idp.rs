//! A minimal OIDC issuer for tests and benchmarks: discovery and JWKS over loopback HTTP,
//! with a real RSA key (RS256, from openssl) and a real P-256 key (ES256).
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, KeyPair};
use serde_json::{Value, json};

/// Unix seconds.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A minimal OIDC issuer: discovery and JWKS over loopback HTTP, with an RSA key (RS256) and
/// a P-256 key (ES256); signs whatever the test asks.
pub struct Idp {
    pub issuer: String,
    rsa: signature::RsaKeyPair,
    ec: signature::EcdsaKeyPair,
    /// Keys published at /jwks (tests add keys to simulate rotation).
    pub jwks: Arc<Mutex<Vec<Value>>>,
    /// How many times /jwks was fetched.
    pub fetches: Arc<AtomicUsize>,
    /// While set, /jwks answers 503 (an outage).
    pub down: Arc<std::sync::atomic::AtomicBool>,
    /// While false, /jwks holds its answers back (a slow issuer).
    pub open: Arc<tokio::sync::watch::Sender<bool>>,
    rng: ring::rand::SystemRandom,
}

fn rsa_key() -> signature::RsaKeyPair {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rsa.der");
    let st = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-outform",
            "DER",
            "-out",
        ])
        .arg(&p)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(st.success());
    // OpenSSL writes PKCS#8 or PKCS#1 DER depending on its version.
    let der = std::fs::read(&p).unwrap();
    signature::RsaKeyPair::from_pkcs8(&der)
        .or_else(|_| signature::RsaKeyPair::from_der(&der))
        .unwrap()
}

impl Idp {
    /// Starts serving on a loopback port (in the current tokio runtime).
    pub async fn start() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let rsa = rsa_key();
        let ec_doc = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let ec = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            ec_doc.as_ref(),
            &rng,
        )
        .unwrap();
        let pubkey: ring::rsa::PublicKeyComponents<Vec<u8>> = rsa.public().into();
        let rsa_jwk = json!({
            "kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
            "n": B64.encode(&pubkey.n),
            "e": B64.encode(&pubkey.e),
        });
        let p = ec.public_key().as_ref();
        let ec_jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig", "alg": "ES256",
            "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65]),
        });
        let jwks = Arc::new(Mutex::new(vec![rsa_jwk, ec_jwk]));
        let fetches = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = Arc::new(tokio::sync::watch::Sender::new(true));
        let (iss, keys, count, is_down, gate) = (
            issuer.clone(),
            Arc::clone(&jwks),
            Arc::clone(&fetches),
            Arc::clone(&down),
            Arc::clone(&open),
        );
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let iss = iss.clone();
                    async move {
                        axum::Json(json!({
                            "issuer": iss,
                            "jwks_uri": format!("{iss}/jwks"),
                            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                        }))
                    }
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || {
                    count.fetch_add(1, Ordering::SeqCst);
                    let k = keys.lock().unwrap().clone();
                    let down = is_down.load(Ordering::SeqCst);
                    let mut gate = gate.subscribe();
                    async move {
                        use axum::response::IntoResponse;
                        let _ = gate.wait_for(|open| *open).await;
                        if down {
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                        }
                        axum::Json(json!({ "keys": k })).into_response()
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            issuer,
            rsa,
            ec,
            jwks,
            fetches,
            down,
            open,
            rng,
        }
    }

    /// Claims of a fresh, valid ID token for `sub`.
    pub fn claims(&self, sub: &str) -> Value {
        json!({
            "iss": self.issuer, "sub": sub, "aud": "tessera",
            "email": format!("{sub}@example.com"), "iat": now(), "exp": now() + 600,
        })
    }

    /// Signs `claims` with `alg` (RS256, ES256, PS256 with the RS256 key, or a forgery: none,
    /// HS256).
    pub fn sign(&self, alg: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut h = json!({"alg": alg, "typ": "JWT"});
        if let Some(k) = kid {
            h["kid"] = k.into();
        }
        let input = format!(
            "{}.{}",
            B64.encode(h.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = match alg {
            "RS256" => {
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(
                        &signature::RSA_PKCS1_SHA256,
                        &self.rng,
                        input.as_bytes(),
                        &mut sig,
                    )
                    .unwrap();
                sig
            }
            // A real signature by the RSA key, under an algorithm its JWK does not name.
            "PS256" => {
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(
                        &signature::RSA_PSS_SHA256,
                        &self.rng,
                        input.as_bytes(),
                        &mut sig,
                    )
                    .unwrap();
                sig
            }
            "ES256" => self
                .ec
                .sign(&self.rng, input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            "HS256" => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"tessera");
                ring::hmac::sign(&k, input.as_bytes()).as_ref().to_vec()
            }
            _ => Vec::new(),
        };
        format!("{input}.{}", B64.encode(sig))
    }

    /// A valid RS256 ID token for `sub`.
    pub fn token(&self, sub: &str) -> String {
        self.sign("RS256", Some("rsa-1"), &self.claims(sub))
    }

    /// A valid ES256 ID token for `sub`: cheaper to sign than RS256, for load generators.
    pub fn ec_token(&self, sub: &str) -> String {
        self.sign("ES256", Some("ec-1"), &self.claims(sub))
    }
}
