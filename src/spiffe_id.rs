//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE-ID standard says.
//!
//! Owns: the `spiffe://<trust-domain>/<path>` grammar. Everything that accepts an ID from
//! outside (config, admin API, JWT `sub`, certificate SANs) goes through [`SpiffeId::parse`],
//! so there is one place where the rules live.

use std::fmt;

const SCHEME: &str = "spiffe://";
/// The standard asks implementations to support IDs of at least 2048 bytes; we refuse longer
/// ones so a hostile input cannot make us allocate without bound.
pub const MAX_ID_LEN: usize = 2048;
/// Trust domain names are limited to 255 bytes (a DNS name's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input was empty.
    #[error("is empty")]
    Empty,
    /// The input does not start with `spiffe://` (the scheme is case-sensitive).
    #[error("must start with \"spiffe://\"")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("has no trust domain")]
    MissingTrustDomain,
    /// A character outside `[a-z0-9.-_]` in the trust domain (upper case is not allowed).
    #[error(
        "trust domain may contain only lower-case letters, digits, '.', '-' and '_' (found {0:?})"
    )]
    BadTrustDomainChar(char),
    /// Trust domain longer than 255 bytes.
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// A character outside `[a-zA-Z0-9.-_]` in a path segment; this also catches query,
    /// fragment, port, userinfo and percent-encoding.
    #[error("path may contain only letters, digits, '.', '-', '_' and '/' (found {0:?})")]
    BadPathChar(char),
    /// `//` in the path.
    #[error("path has an empty segment")]
    EmptySegment,
    /// A `.` or `..` path segment.
    #[error("path segments '.' and '..' are not allowed")]
    DotSegment,
    /// The path ends in `/`.
    #[error("path must not end with '/'")]
    TrailingSlash,
    /// More than [`MAX_ID_LEN`] bytes.
    #[error("is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

/// A SPIFFE trust domain name, such as `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or its SPIFFE ID form
    /// (`spiffe://example.org`, no path).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`: the key for bundles in the
    /// Workload API.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE ID: trust domain plus path (path may be empty only for a trust domain's own ID).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, kept once so that display and comparison cost nothing.
    full: String,
    /// Byte offset where the path starts (the first `/` after the trust domain), or `full.len()`.
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            full: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Builds `spiffe://<td><path>`; `path` must be empty or start with `/`.
    pub fn new(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{SCHEME}{}{path}", td.as_str()))
    }

    /// The trust domain name (borrowed).
    pub fn trust_domain_name(&self) -> &str {
        &self.full[SCHEME.len()..self.path_start]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.path_start..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// True when `self` is `other` or lies under it by whole path segments
    /// (`/a/agent` covers `/a/agent/task/1` but not `/a/agent2`).
    pub fn is_within(&self, other: &SpiffeId) -> bool {
        within(&self.full, &other.full)
    }
}

/// [`SpiffeId::is_within`] for IDs held as strings (leases keep theirs so): true when `id`
/// is `of` or lies under it by whole path segments.
pub fn within(id: &str, of: &str) -> bool {
    match id.strip_prefix(of) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(IdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/' by construction; each following segment must be non-empty.
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err(if path.ends_with('/') {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        if seg == "." || seg == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(IdError::BadPathChar(c));
        }
    }
    Ok(())
}

/// Validates one path segment (for building IDs from parts such as task ids).
pub fn validate_segment(seg: &str) -> Result<(), IdError> {
    validate_path(&format!("/{seg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://a-b_c.d/x/Y/z.1-2_3",
            "spiffe://1.2.3.4/x",
            "spiffe://td/..a/.b/c..",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let id = SpiffeId::parse("spiffe://example.org/a/b").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/a/b");
    }

    #[test]
    fn rejects_hostile_ids() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("spiffe://", IdError::MissingTrustDomain),
            ("spiffe:///path", IdError::MissingTrustDomain),
            ("SPIFFE://example.org/a", IdError::WrongScheme),
            ("http://example.org/a", IdError::WrongScheme),
            ("spiffe:/example.org", IdError::WrongScheme),
            (" spiffe://example.org", IdError::WrongScheme),
            ("spiffe://Example.org/a", IdError::BadTrustDomainChar('E')),
            (
                "spiffe://example.org:443/a",
                IdError::BadTrustDomainChar(':'),
            ),
            (
                "spiffe://user@example.org/a",
                IdError::BadTrustDomainChar('@'),
            ),
            ("spiffe://exa%6dple.org/a", IdError::BadTrustDomainChar('%')),
            ("spiffe://example.org/a/", IdError::TrailingSlash),
            ("spiffe://example.org/", IdError::TrailingSlash),
            ("spiffe://example.org//a", IdError::EmptySegment),
            ("spiffe://example.org/a/./b", IdError::DotSegment),
            ("spiffe://example.org/a/..", IdError::DotSegment),
            ("spiffe://example.org/a?x=1", IdError::BadPathChar('?')),
            ("spiffe://example.org/a#f", IdError::BadPathChar('#')),
            ("spiffe://example.org/a%20b", IdError::BadPathChar('%')),
            ("spiffe://example.org/a b", IdError::BadPathChar(' ')),
            ("spiffe://example.org/a\0b", IdError::BadPathChar('\0')),
            (
                "spiffe://example.org/\u{e9}",
                IdError::BadPathChar('\u{e9}'),
            ),
            ("spiffe://example.org/a\nb", IdError::BadPathChar('\n')),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::parse(s).as_ref().err(), Some(want), "{s:?}");
        }
    }

    #[test]
    fn length_limits() {
        let td = "a".repeat(255);
        assert!(SpiffeId::parse(&format!("spiffe://{td}/x")).is_ok());
        let td = "a".repeat(256);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{td}/x")),
            Err(IdError::TrustDomainTooLong)
        );
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - 12));
        assert_eq!(long.len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&long).is_ok());
        assert_eq!(SpiffeId::parse(&format!("{long}a")), Err(IdError::TooLong));
        // A huge input is refused on length before any per-character work.
        assert_eq!(
            SpiffeId::parse(&"spiffe://x/".repeat(100_000)),
            Err(IdError::TooLong)
        );
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::parse("example.org").unwrap().as_str(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::parse("spiffe://example.org")
                .unwrap()
                .id_string(),
            "spiffe://example.org"
        );
        assert!(TrustDomain::parse("spiffe://example.org/path").is_err());
        assert!(TrustDomain::parse("").is_err());
        assert!(TrustDomain::parse("UPPER").is_err());
    }

    #[test]
    fn within_matches_whole_segments() {
        let agent = SpiffeId::parse("spiffe://td/a/agent").unwrap();
        let task = SpiffeId::parse("spiffe://td/a/agent/task/1").unwrap();
        let agent2 = SpiffeId::parse("spiffe://td/a/agent2").unwrap();
        let other_td = SpiffeId::parse("spiffe://td2/a/agent").unwrap();
        assert!(agent.is_within(&agent));
        assert!(task.is_within(&agent));
        assert!(!agent2.is_within(&agent));
        assert!(!agent.is_within(&task));
        assert!(!other_td.is_within(&agent));
    }
}
