//! JOSE: JWS compact serialization, JSON Web Keys and signature verification.
//!
//! Owns: the bytes-and-algorithms layer under JWT-SVIDs (and, later, OIDC ID tokens). It knows
//! nothing of SPIFFE claims. Only the asymmetric algorithms the JWT-SVID standard allows are
//! accepted (RS/ES/PS 256/384/512); `none`, HS* and anything unknown are refused before any
//! key is looked at, which closes the classic algorithm-confusion attacks.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey};
use serde_json::{Map, Value};

/// Largest token accepted. Real JWT-SVIDs are well under 2 KiB; this bounds the work a hostile
/// caller can cause.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token was refused. Messages are safe to show to the caller: they never include the
/// token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoseError {
    /// Not `header.payload.signature` of base64url, or larger than [`MAX_TOKEN_LEN`].
    #[error("token is not a JWS in compact serialization: {0}")]
    Malformed(&'static str),
    /// `alg` is missing, `none`, symmetric or unknown.
    #[error("algorithm {0:?} is not allowed (expected RS/ES/PS 256/384/512)")]
    Algorithm(String),
    /// A header the token requires us to understand (`crit`), or a bad `typ`.
    #[error("unsupported header: {0}")]
    Header(String),
    /// No key with that `kid` in the bundle.
    #[error("no key with kid {0:?} in the trust bundle")]
    UnknownKey(String),
    /// The key's type does not fit the algorithm.
    #[error("key {kid:?} cannot verify {alg}")]
    KeyMismatch {
        /// Key id.
        kid: String,
        /// Algorithm.
        alg: String,
    },
    /// Signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
}

/// Signature algorithms allowed for JWT-SVIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// ECDSA P-384 with SHA-384.
    Es384,
    /// ECDSA P-521 with SHA-512 (allowed by the standard; no verifier here, so refused).
    Es512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
}

impl Alg {
    /// Parses a JOSE `alg` value; case-sensitive as RFC 7515 requires.
    pub fn parse(s: &str) -> Result<Self, JoseError> {
        Ok(match s {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "ES512" => Self::Es512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            other => return Err(JoseError::Algorithm(other.chars().take(32).collect())),
        })
    }

    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Es512 => "ES512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
        }
    }
}

/// A public key from a JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// EC P-256, uncompressed point `04 || X || Y`.
    P256(Vec<u8>),
    /// EC P-384, uncompressed point.
    P384(Vec<u8>),
    /// RSA modulus and exponent, big-endian.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
}

/// A verification key with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    /// `kid`.
    pub kid: String,
    /// The key.
    pub key: PublicKey,
    /// The one algorithm the key is for, when its JWK names one (RFC 7517 §4.4): a token
    /// under any other is refused even if the key type would fit (RFC 8725 §3.1).
    pub alg: Option<Alg>,
}

fn b64(s: &str) -> Result<Vec<u8>, JoseError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JoseError::Malformed("bad base64url"))
}

/// Base64url without padding.
pub fn b64_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Jwk {
    /// Parses one JWK object. Returns `None` for key types we do not verify with (they are
    /// then simply not in the key set).
    pub fn from_json(v: &Value) -> Option<Self> {
        let kid = v.get("kid")?.as_str()?.to_owned();
        let field = |k: &str| v.get(k).and_then(Value::as_str).and_then(|s| b64(s).ok());
        let key = match v.get("kty")?.as_str()? {
            "EC" => {
                let (x, y) = (field("x")?, field("y")?);
                let (len, make): (usize, fn(Vec<u8>) -> PublicKey) = match v.get("crv")?.as_str()? {
                    "P-256" => (32, PublicKey::P256),
                    "P-384" => (48, PublicKey::P384),
                    _ => return None,
                };
                if x.len() != len || y.len() != len {
                    return None;
                }
                let mut p = Vec::with_capacity(1 + 2 * len);
                p.push(4);
                p.extend_from_slice(&x);
                p.extend_from_slice(&y);
                make(p)
            }
            "RSA" => PublicKey::Rsa {
                n: field("n")?,
                e: field("e")?,
            },
            _ => return None,
        };
        // A key published for an algorithm we do not verify with is not in the set at all.
        let alg = match v.get("alg") {
            None => None,
            Some(Value::String(a)) => Some(Alg::parse(a).ok()?),
            Some(_) => return None,
        };
        Some(Self { kid, key, alg })
    }

    /// The public JWK members (no `use`, `alg` or `kid`), for JWKS documents and thumbprints.
    pub fn public_members(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match &self.key {
            PublicKey::P256(p) | PublicKey::P384(p) => {
                let half = (p.len() - 1) / 2;
                let crv = if half == 32 { "P-256" } else { "P-384" };
                m.insert("kty".into(), "EC".into());
                m.insert("crv".into(), crv.into());
                m.insert("x".into(), b64_encode(&p[1..1 + half]).into());
                m.insert("y".into(), b64_encode(&p[1 + half..]).into());
            }
            PublicKey::Rsa { n, e } => {
                m.insert("kty".into(), "RSA".into());
                m.insert("n".into(), b64_encode(n).into());
                m.insert("e".into(), b64_encode(e).into());
            }
        }
        m
    }

    /// RFC 7638 thumbprint (SHA-256, base64url): a stable `kid` for a key.
    pub fn thumbprint(key: &PublicKey) -> String {
        // RFC 7638 §3: the required members only, in lexicographic order, no whitespace.
        // Written out by hand: serde_json's map order depends on crate features.
        let json = match key {
            PublicKey::P256(p) | PublicKey::P384(p) => {
                let half = (p.len() - 1) / 2;
                let crv = if half == 32 { "P-256" } else { "P-384" };
                format!(
                    r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
                    b64_encode(&p[1..1 + half]),
                    b64_encode(&p[1 + half..])
                )
            }
            PublicKey::Rsa { n, e } => format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                b64_encode(e),
                b64_encode(n)
            ),
        };
        b64_encode(ring::digest::digest(&ring::digest::SHA256, json.as_bytes()).as_ref())
    }

    /// Verifies `sig` over `input` with this key under `alg`.
    pub fn verify(&self, alg: Alg, input: &[u8], sig: &[u8]) -> Result<(), JoseError> {
        let mismatch = || JoseError::KeyMismatch {
            kid: self.kid.clone(),
            alg: alg.as_str().into(),
        };
        if self.alg.is_some_and(|a| a != alg) {
            return Err(mismatch());
        }
        let ok = match (&self.key, alg) {
            (PublicKey::P256(p), Alg::Es256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, p).verify(input, sig)
            }
            (PublicKey::P384(p), Alg::Es384) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, p).verify(input, sig)
            }
            (PublicKey::Rsa { n, e }, a) => {
                let params: &signature::RsaParameters = match a {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return Err(mismatch()),
                };
                signature::RsaPublicKeyComponents { n, e }.verify(params, input, sig)
            }
            _ => return Err(mismatch()),
        };
        ok.map_err(|_| JoseError::BadSignature)
    }
}

/// A JWS split and decoded, not yet verified.
pub struct Jws<'a> {
    /// Protected header.
    pub header: Map<String, Value>,
    /// Decoded payload as a JSON object.
    pub claims: Map<String, Value>,
    /// `alg`, already checked against the allowed set.
    pub alg: Alg,
    /// `kid`, if present.
    pub kid: Option<String>,
    /// `header.payload`, the bytes the signature covers.
    pub signing_input: &'a str,
    /// Decoded signature.
    pub signature: Vec<u8>,
}

/// Without the signing input and signature: together they are the bearer token itself.
impl std::fmt::Debug for Jws<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jws")
            .field("header", &self.header)
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// `typ` of Tessera's task tokens: JWT access tokens (RFC 9068 §2.1). Explicit typing
/// (RFC 8725 §3.11) keeps them apart from JWT-SVIDs signed with the same key: a JWT-SVID
/// verifier accepts only `JWT` or `JOSE`, so a task token never passes for one.
pub const TYP_ACCESS_TOKEN: &str = "at+jwt";

/// Splits and decodes a compact JWS and checks the header (`typ`, when present, `JWT` or
/// `JOSE`). The signature is NOT verified: call [`Jwk::verify`] with `signing_input` and
/// `signature` before trusting `claims`.
pub fn decode(token: &str) -> Result<Jws<'_>, JoseError> {
    decode_typed(token, false)
}

/// As [`decode`], also accepting `typ` [`TYP_ACCESS_TOKEN`]: for the checks that take both
/// kinds of token Tessera signs (introspection, revocation), and for subject tokens, which
/// may be an issuer's RFC 9068 access tokens.
pub fn decode_own(token: &str) -> Result<Jws<'_>, JoseError> {
    decode_typed(token, true)
}

fn decode_typed(token: &str, access_token_ok: bool) -> Result<Jws<'_>, JoseError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JoseError::Malformed("token is too large"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JoseError::Malformed("expected three dot-separated parts"));
    };
    let header: Map<String, Value> = serde_json::from_slice(&b64(h)?)
        .map_err(|_| JoseError::Malformed("header is not a JSON object"))?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => Alg::parse(a)?,
        _ => return Err(JoseError::Algorithm("<missing>".into())),
    };
    if header.contains_key("crit") {
        return Err(JoseError::Header("crit".into()));
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        // RFC 7515 §4.1.9: "application/" may be left out, and media types are compared
        // without regard to case.
        Some(Value::String(t))
            if access_token_ok
                && (t.eq_ignore_ascii_case(TYP_ACCESS_TOKEN)
                    || t.eq_ignore_ascii_case("application/at+jwt")) => {}
        Some(_) if access_token_ok => {
            return Err(JoseError::Header("typ must be JWT, JOSE or at+jwt".into()));
        }
        Some(_) => return Err(JoseError::Header("typ must be JWT or JOSE".into())),
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JoseError::Header("kid must be a string".into())),
    };
    let claims: Map<String, Value> = serde_json::from_slice(&b64(p)?)
        .map_err(|_| JoseError::Malformed("payload is not a JSON object"))?;
    Ok(Jws {
        header,
        claims,
        alg,
        kid,
        signing_input: &token[..h.len() + 1 + p.len()],
        signature: b64(s)?,
    })
}

/// Signs compact JWS tokens with an ES256 key.
pub struct Es256Signer {
    key: signature::EcdsaKeyPair,
    kid: String,
    /// The encoded protected header is the same for every token, so it is built once.
    header_b64: String,
    /// The same with `typ` [`TYP_ACCESS_TOKEN`], for task tokens.
    access_header_b64: String,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Es256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Es256Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Es256Signer {
    /// Wraps a P-256 key (PKCS#8); the `kid` is the key's RFC 7638 thumbprint.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, JoseError> {
        let rng = ring::rand::SystemRandom::new();
        let key = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &rng,
        )
        .map_err(|_| JoseError::Malformed("not a P-256 PKCS#8 key"))?;
        use signature::KeyPair;
        let kid = Jwk::thumbprint(&PublicKey::P256(key.public_key().as_ref().to_vec()));
        let header = serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let access = serde_json::json!({"alg": "ES256", "kid": kid, "typ": TYP_ACCESS_TOKEN});
        Ok(Self {
            header_b64: b64_encode(header.to_string().as_bytes()),
            access_header_b64: b64_encode(access.to_string().as_bytes()),
            key,
            kid,
            rng,
        })
    }

    /// The key id in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Jwk {
        use signature::KeyPair;
        Jwk {
            kid: self.kid.clone(),
            key: PublicKey::P256(self.key.public_key().as_ref().to_vec()),
            alg: None,
        }
    }

    /// Serializes `claims` and signs them as a JWT (`typ` `JWT`: JWT-SVIDs). Any `Serialize`
    /// type: a struct of claims goes straight to JSON, without building a `Value` first.
    pub fn sign<C: serde::Serialize + ?Sized>(&self, claims: &C) -> Result<String, JoseError> {
        self.sign_with(&self.header_b64, claims)
    }

    /// Serializes `claims` and signs them as a JWT access token (`typ` `at+jwt`: task tokens).
    pub fn sign_access_token(&self, claims: &Value) -> Result<String, JoseError> {
        self.sign_with(&self.access_header_b64, claims)
    }

    fn sign_with<C: serde::Serialize + ?Sized>(
        &self,
        header_b64: &str,
        claims: &C,
    ) -> Result<String, JoseError> {
        // Claims are a struct or a `Value` with string keys: serializing them cannot fail.
        let json = serde_json::to_vec(claims).expect("JWT claims serialize");
        // header.payload.signature, the signature's 64 bytes being 86 characters.
        let mut token = String::with_capacity(header_b64.len() + json.len() * 4 / 3 + 92);
        token.push_str(header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&json, &mut token);
        let sig = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| JoseError::BadSignature)?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signer() -> Es256Signer {
        let rng = ring::rand::SystemRandom::new();
        let doc = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        Es256Signer::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn forge(header: Value, claims: Value, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64_encode(header.to_string().as_bytes()),
            b64_encode(claims.to_string().as_bytes()),
            b64_encode(sig)
        )
    }

    #[test]
    fn access_tokens_are_typed_apart_from_jwts() {
        let s = signer();
        let t = s.sign_access_token(&json!({"sub": "x"})).unwrap();
        // A JWT-SVID check refuses it; the check for Tessera's own tokens takes it.
        assert!(matches!(decode(&t), Err(JoseError::Header(_))));
        let jws = decode_own(&t).unwrap();
        assert_eq!(jws.header["typ"], TYP_ACCESS_TOKEN);
        s.jwk()
            .verify(jws.alg, jws.signing_input.as_bytes(), &jws.signature)
            .unwrap();
        let jwt = s.sign(&json!({"sub": "x"})).unwrap();
        assert_eq!(decode(&jwt).unwrap().header["typ"], "JWT");
        assert!(decode_own(&jwt).is_ok());
    }

    #[test]
    fn sign_then_verify() {
        let s = signer();
        let t = s.sign(&json!({"sub": "x"})).unwrap();
        let jws = decode(&t).unwrap();
        assert_eq!(jws.alg, Alg::Es256);
        assert_eq!(jws.kid.as_deref(), Some(s.kid()));
        s.jwk()
            .verify(jws.alg, jws.signing_input.as_bytes(), &jws.signature)
            .unwrap();
        // Any change to the payload breaks the signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = b64_encode(br#"{"sub":"y"}"#);
        parts[1] = &other;
        let tampered = parts.join(".");
        let jws = decode(&tampered).unwrap();
        assert_eq!(
            s.jwk()
                .verify(jws.alg, jws.signing_input.as_bytes(), &jws.signature),
            Err(JoseError::BadSignature)
        );
    }

    #[test]
    fn refuses_dangerous_algorithms_and_headers() {
        for alg in ["none", "None", "HS256", "HS512", "EdDSA", "es256", ""] {
            let t = forge(json!({"alg": alg, "kid": "k"}), json!({}), b"");
            assert!(matches!(decode(&t), Err(JoseError::Algorithm(_))), "{alg}");
        }
        let t = forge(json!({"kid": "k"}), json!({}), b"");
        assert!(matches!(decode(&t), Err(JoseError::Algorithm(_))));
        let t = forge(json!({"alg": "ES256", "crit": ["exp"]}), json!({}), b"");
        assert!(matches!(decode(&t), Err(JoseError::Header(_))));
        let t = forge(json!({"alg": "ES256", "typ": "at+jwt"}), json!({}), b"");
        assert!(matches!(decode(&t), Err(JoseError::Header(_))));
    }

    #[test]
    fn refuses_malformed_tokens() {
        for t in [
            "",
            "a",
            "a.b",
            "a.b.c.d",
            "!!.??.**",
            "e30.e30.e30=",
            &"a".repeat(MAX_TOKEN_LEN + 1),
            &format!("{}.W10.", b64_encode(br#"{"alg":"ES256"}"#)),
        ] {
            assert!(decode(t).is_err(), "{t:.40}");
        }
    }

    #[test]
    fn es256_key_cannot_verify_rs256() {
        let s = signer();
        assert!(matches!(
            s.jwk().verify(Alg::Rs256, b"x", b"y"),
            Err(JoseError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn jwk_round_trip_and_thumbprint() {
        let s = signer();
        let mut m = s.jwk().public_members();
        m.insert("kid".into(), s.kid().into());
        let back = Jwk::from_json(&Value::Object(m)).unwrap();
        assert_eq!(back, s.jwk());
        // RFC 7638 section 3.1 example key and thumbprint.
        let rfc = json!({"kty":"RSA","e":"AQAB","kid":"x","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        let k = Jwk::from_json(&rfc).unwrap();
        assert_eq!(
            Jwk::thumbprint(&k.key),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        // Published for RS256: PS256 under the same key is refused before any verification,
        // RS256 gets as far as the signature.
        let mut pinned = rfc.clone();
        pinned["alg"] = "RS256".into();
        let k = Jwk::from_json(&pinned).unwrap();
        assert_eq!(k.alg, Some(Alg::Rs256));
        assert!(matches!(
            k.verify(Alg::Ps256, b"x", &[0; 256]),
            Err(JoseError::KeyMismatch { .. })
        ));
        assert!(matches!(
            k.verify(Alg::Rs256, b"x", &[0; 256]),
            Err(JoseError::BadSignature)
        ));
        // A key for an algorithm we do not verify with is left out of the set.
        pinned["alg"] = "RSA-OAEP".into();
        assert_eq!(Jwk::from_json(&pinned), None);
    }
}
