//! X.509-SVID minting: a fresh P-256 key and a leaf certificate per call.
//!
//! The leaf profile follows the X509-SVID standard: exactly one URI SAN (the SPIFFE ID),
//! basicConstraints cA=false (critical), keyUsage digitalSignature only (critical),
//! extKeyUsage serverAuth + clientAuth, a subject and authority key identifier, notBefore
//! backdated for clock skew and notAfter never past the signing CA's.
//!
//! Everything that does not change per certificate (issuer name, algorithm identifiers,
//! the static extensions) is encoded once in [`LeafTemplate::new`].

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use time::OffsetDateTime;

use super::CaError;
use super::der::{self, tag};
use crate::spiffe_id::SpiffeId;

pub(crate) mod oid {
    pub const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    pub const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pub const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    pub const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    pub const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    pub const ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
    pub const KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
    pub const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
    pub const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
    pub const SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
    pub const AUTHORITY_KEY_ID: &[u8] = &[0x55, 0x1d, 0x23];
    pub const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
    pub const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
    pub const CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
    pub const CRL_NUMBER: &[u8] = &[0x55, 0x1d, 0x14];
}

/// Clock-skew allowance: peers whose clocks are a little behind still accept a new SVID.
pub const BACKDATE: time::Duration = time::Duration::seconds(30);

/// Which ECDSA curve the CA key uses; it decides the certificate signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaCurve {
    /// P-256 with SHA-256.
    P256,
    /// P-384 with SHA-384.
    P384,
}

impl CaCurve {
    pub(crate) fn signing_alg(self) -> &'static signature::EcdsaSigningAlgorithm {
        match self {
            Self::P256 => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            Self::P384 => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        }
    }

    pub(crate) fn sig_oid(self) -> &'static [u8] {
        match self {
            Self::P256 => oid::ECDSA_SHA256,
            Self::P384 => oid::ECDSA_SHA384,
        }
    }
}

/// A freshly minted certificate and its private key.
pub struct MintedX509 {
    /// Leaf DER followed by any intermediates (the Workload API `x509_svid` field).
    pub chain_der: Vec<u8>,
    /// Length of the leaf inside `chain_der`.
    pub leaf_len: usize,
    /// Unencrypted PKCS#8 DER of the leaf key.
    pub key_pkcs8: ring::pkcs8::Document,
    /// Certificate serial number (16 bytes, positive).
    pub serial: [u8; 16],
    /// Validity start (backdated).
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for MintedX509 {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedX509")
            .field("serial", &hex::encode(self.serial))
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The precomputed parts of every leaf this CA signs.
pub struct LeafTemplate {
    key: EcdsaKeyPair,
    curve: CaCurve,
    /// AlgorithmIdentifier of the certificate signature.
    sig_alg: Vec<u8>,
    /// The CA certificate's subject, byte for byte.
    issuer: Vec<u8>,
    /// Leaf subject name.
    subject: Vec<u8>,
    /// AlgorithmIdentifier for P-256 public keys.
    spki_alg: Vec<u8>,
    /// keyUsage, extKeyUsage, basicConstraints and authorityKeyIdentifier, encoded.
    static_exts: Vec<u8>,
    /// Intermediates to append after the leaf (the signing cert when it is not the root).
    chain_tail: Vec<u8>,
    /// The CA's key identifier (authorityKeyIdentifier of leaves and CRLs).
    aki: Vec<u8>,
    ca_not_after: OffsetDateTime,
    rng: SystemRandom,
}

impl std::fmt::Debug for LeafTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafTemplate")
            .field("curve", &self.curve)
            .field("ca_not_after", &self.ca_not_after)
            .finish_non_exhaustive()
    }
}

fn extension(out: &mut Vec<u8>, id: &[u8], critical: bool, value: impl FnOnce(&mut Vec<u8>)) {
    der::nested(out, tag::SEQUENCE, |e| {
        der::tlv(e, tag::OID, id);
        if critical {
            der::tlv(e, tag::BOOLEAN, &[0xff]);
        }
        der::nested(e, tag::OCTET_STRING, value);
    });
}

impl LeafTemplate {
    /// `issuer_subject` and `authority_key_id` are taken from the CA certificate as is;
    /// `chain_tail` is the DER of certificates to send after the leaf.
    pub fn new(
        key: EcdsaKeyPair,
        curve: CaCurve,
        issuer_subject: &[u8],
        authority_key_id: &[u8],
        chain_tail: Vec<u8>,
        ca_not_after: OffsetDateTime,
    ) -> Self {
        let mut sig_alg = Vec::new();
        der::nested(&mut sig_alg, tag::SEQUENCE, |s| {
            der::tlv(s, tag::OID, curve.sig_oid())
        });
        let mut subject = Vec::new();
        der::nested(&mut subject, tag::SEQUENCE, |s| {
            der::nested(s, tag::SET, |s| {
                der::nested(s, tag::SEQUENCE, |s| {
                    der::tlv(s, tag::OID, oid::ORGANIZATION);
                    der::tlv(s, tag::UTF8_STRING, b"Tessera");
                });
            });
        });
        let mut spki_alg = Vec::new();
        der::nested(&mut spki_alg, tag::SEQUENCE, |s| {
            der::tlv(s, tag::OID, oid::EC_PUBLIC_KEY);
            der::tlv(s, tag::OID, oid::P256);
        });
        let mut static_exts = Vec::new();
        // digitalSignature only: bit 0, seven unused bits. Never keyCertSign or cRLSign.
        extension(&mut static_exts, oid::KEY_USAGE, true, |v| {
            der::tlv(v, tag::BIT_STRING, &[0x07, 0x80]);
        });
        extension(&mut static_exts, oid::EXT_KEY_USAGE, false, |v| {
            der::nested(v, tag::SEQUENCE, |s| {
                der::tlv(s, tag::OID, oid::SERVER_AUTH);
                der::tlv(s, tag::OID, oid::CLIENT_AUTH);
            });
        });
        // cA defaults to FALSE, so DER encodes it as an empty sequence.
        extension(&mut static_exts, oid::BASIC_CONSTRAINTS, true, |v| {
            der::tlv(v, tag::SEQUENCE, &[]);
        });
        extension(&mut static_exts, oid::AUTHORITY_KEY_ID, false, |v| {
            der::nested(v, tag::SEQUENCE, |s| der::tlv(s, 0x80, authority_key_id));
        });
        Self {
            key,
            curve,
            sig_alg,
            issuer: issuer_subject.to_vec(),
            subject,
            spki_alg,
            static_exts,
            chain_tail,
            aki: authority_key_id.to_vec(),
            ca_not_after,
            rng: SystemRandom::new(),
        }
    }

    /// Signs a version 2 CRL listing `revoked` (serial, revocation time), with a CRL number
    /// and the authority key identifier (RFC 5280 section 5).
    pub fn sign_crl(
        &self,
        revoked: &[([u8; 16], OffsetDateTime)],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
        number: u64,
    ) -> Result<Vec<u8>, CaError> {
        let mut tbs = Vec::with_capacity(200 + revoked.len() * 40);
        der::nested(&mut tbs, tag::SEQUENCE, |t| {
            der::uint(t, &[1]); // v2
            t.extend_from_slice(&self.sig_alg);
            t.extend_from_slice(&self.issuer);
            der::time(t, this_update);
            der::time(t, next_update);
            if !revoked.is_empty() {
                der::nested(t, tag::SEQUENCE, |list| {
                    for (serial, at) in revoked {
                        der::nested(list, tag::SEQUENCE, |e| {
                            der::uint(e, serial);
                            der::time(e, *at);
                        });
                    }
                });
            }
            der::nested(t, 0xa0, |x| {
                der::nested(x, tag::SEQUENCE, |exts| {
                    extension(exts, oid::AUTHORITY_KEY_ID, false, |v| {
                        der::nested(v, tag::SEQUENCE, |s| der::tlv(s, 0x80, &self.aki));
                    });
                    extension(exts, oid::CRL_NUMBER, false, |v| {
                        der::uint(v, &number.to_be_bytes())
                    });
                });
            });
        });
        let sig = self.sign(&tbs)?;
        let mut crl = Vec::with_capacity(tbs.len() + 100);
        der::nested(&mut crl, tag::SEQUENCE, |c| {
            c.extend_from_slice(&tbs);
            c.extend_from_slice(&self.sig_alg);
            der::bit_string(c, &sig);
        });
        Ok(crl)
    }

    /// The CA certificate's expiry; no SVID outlives it.
    pub fn ca_not_after(&self) -> OffsetDateTime {
        self.ca_not_after
    }

    /// Generates a new P-256 key and signs a leaf for `id` valid for `ttl` from `now`.
    pub fn mint(
        &self,
        id: &SpiffeId,
        ttl: std::time::Duration,
        now: OffsetDateTime,
    ) -> Result<MintedX509, CaError> {
        self.mint_named(id, &[], ttl, now)
    }

    /// [`Self::mint`], with `more_names` (DER of GeneralNames, such as a dNSName) in the
    /// subject alternative name after the SPIFFE ID: X509-SVID §2 allows other SAN types
    /// beside the one URI.
    pub fn mint_named(
        &self,
        id: &SpiffeId,
        more_names: &[u8],
        ttl: std::time::Duration,
        now: OffsetDateTime,
    ) -> Result<MintedX509, CaError> {
        if now >= self.ca_not_after {
            return Err(CaError::Expired);
        }
        let key_pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &self.rng)
                .map_err(|_| CaError::Crypto("key generation failed"))?;
        let public = p256_public_from_pkcs8(key_pkcs8.as_ref())?;

        let mut serial = [0u8; 16];
        crate::entropy::fill(&mut serial).map_err(|_| CaError::Crypto("random source failed"))?;
        // Positive and exactly 16 bytes long: top bit clear, next bit set.
        serial[0] = (serial[0] & 0x7f) | 0x40;

        let not_before = now - BACKDATE;
        let not_after = super::credential_expiry(now, ttl, self.ca_not_after);
        // Whole seconds: that is all the certificate can say, and callers compare against it.
        let not_before = not_before.replace_nanosecond(0).unwrap_or(not_before);
        let not_after = not_after.replace_nanosecond(0).unwrap_or(not_after);

        let ski_digest = ring::digest::digest(&ring::digest::SHA256, public);
        let ski = &ski_digest.as_ref()[..20];

        let mut tbs = Vec::with_capacity(512 + id.as_str().len());
        der::nested(&mut tbs, tag::SEQUENCE, |t| {
            t.extend_from_slice(&[0xa0, 0x03, 0x02, 0x01, 0x02]); // version v3
            der::uint(t, &serial);
            t.extend_from_slice(&self.sig_alg);
            t.extend_from_slice(&self.issuer);
            der::nested(t, tag::SEQUENCE, |v| {
                der::time(v, not_before);
                der::time(v, not_after);
            });
            t.extend_from_slice(&self.subject);
            der::nested(t, tag::SEQUENCE, |s| {
                s.extend_from_slice(&self.spki_alg);
                der::bit_string(s, public);
            });
            der::nested(t, 0xa3, |x| {
                der::nested(x, tag::SEQUENCE, |exts| {
                    exts.extend_from_slice(&self.static_exts);
                    extension(exts, oid::SUBJECT_KEY_ID, false, |v| {
                        der::tlv(v, tag::OCTET_STRING, ski);
                    });
                    // The subject is not empty, so the SAN need not be critical (RFC 5280).
                    extension(exts, oid::SUBJECT_ALT_NAME, false, |v| {
                        der::nested(v, tag::SEQUENCE, |s| {
                            der::tlv(s, 0x86, id.as_str().as_bytes()); // [6] URI
                            s.extend_from_slice(more_names);
                        });
                    });
                });
            });
        });
        let sig = self
            .key
            .sign(&self.rng, &tbs)
            .map_err(|_| CaError::Crypto("signing failed"))?;
        let mut cert = Vec::with_capacity(tbs.len() + 100 + self.chain_tail.len());
        der::nested(&mut cert, tag::SEQUENCE, |c| {
            c.extend_from_slice(&tbs);
            c.extend_from_slice(&self.sig_alg);
            der::bit_string(c, sig.as_ref());
        });
        let leaf_len = cert.len();
        cert.extend_from_slice(&self.chain_tail);
        Ok(MintedX509 {
            chain_der: cert,
            leaf_len,
            key_pkcs8,
            serial,
            not_before,
            not_after,
        })
    }

    /// Signs arbitrary DER (a CRL's TBS) with the CA key; returns the ASN.1 signature.
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, CaError> {
        self.key
            .sign(&self.rng, data)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| CaError::Crypto("signing failed"))
    }

    /// The CA's public key (uncompressed point).
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }
}

/// ring's P-256 PKCS#8 ends with the `[1] BIT STRING` public key: `03 42 00 04 X Y`.
/// Reading it from there avoids parsing the key pair again (a second scalar multiplication).
fn p256_public_from_pkcs8(pkcs8: &[u8]) -> Result<&[u8], CaError> {
    let n = pkcs8.len();
    if n > 68 && pkcs8[n - 68..n - 65] == [0x03, 0x42, 0x00] && pkcs8[n - 65] == 0x04 {
        Ok(&pkcs8[n - 65..])
    } else {
        Err(CaError::Crypto(
            "unexpected PKCS#8 layout from key generation",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_is_where_we_expect_it() {
        let rng = SystemRandom::new();
        let doc =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            doc.as_ref(),
            &rng,
        )
        .unwrap();
        assert_eq!(
            p256_public_from_pkcs8(doc.as_ref()).unwrap(),
            kp.public_key().as_ref()
        );
    }
}
