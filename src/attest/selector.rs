//! Selectors: the facts about a caller that registration entries match on.
//!
//! Owns the `unix:<type>:<value>` grammar. Parsing is strict so that a selector written in
//! config can only ever equal a fact the attestor really produces (canonical paths, lower-case
//! hashes, plain decimal ids).

use std::fmt;

/// One fact about a caller, as produced by attestation or written in an entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Selector {
    /// Effective uid at connect time (kernel peer credentials).
    Uid(u32),
    /// Effective gid at connect time (kernel peer credentials).
    Gid(u32),
    /// User name of the uid.
    User(String),
    /// Group name of the gid.
    Group(String),
    /// A supplementary group id of the process.
    SupplementaryGid(u32),
    /// A supplementary group name of the process.
    SupplementaryGroup(String),
    /// Canonical absolute path of the executable.
    Path(String),
    /// Lower-case hex SHA-256 of the executable's contents.
    Sha256(String),
}

/// Why a selector string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// Not of the form `unix:<type>:<value>`.
    #[error("{0:?} is not of the form \"unix:<type>:<value>\"")]
    Malformed(String),
    /// Unknown selector type.
    #[error(
        "unknown selector type {0:?} (known: uid, gid, user, group, supplementary_gid, supplementary_group, path, sha256)"
    )]
    UnknownType(String),
    /// The value does not fit the type.
    #[error("bad value for unix:{kind}: {why}")]
    BadValue {
        /// The selector type.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
}

const MAX_NAME: usize = 256;
const MAX_PATH: usize = 4096;

impl Selector {
    /// Parses `unix:<type>:<value>`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let rest = s
            .strip_prefix("unix:")
            .ok_or_else(|| SelectorError::Malformed(truncate(s)))?;
        let (kind, value) = rest
            .split_once(':')
            .ok_or_else(|| SelectorError::Malformed(truncate(s)))?;
        match kind {
            "uid" => parse_id("uid", value).map(Self::Uid),
            "gid" => parse_id("gid", value).map(Self::Gid),
            "supplementary_gid" => parse_id("supplementary_gid", value).map(Self::SupplementaryGid),
            "user" => parse_name("user", value).map(Self::User),
            "group" => parse_name("group", value).map(Self::Group),
            "supplementary_group" => {
                parse_name("supplementary_group", value).map(Self::SupplementaryGroup)
            }
            "path" => parse_path(value).map(Self::Path),
            "sha256" => parse_sha256(value).map(Self::Sha256),
            other => Err(SelectorError::UnknownType(truncate(other))),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(v) => write!(f, "unix:uid:{v}"),
            Self::Gid(v) => write!(f, "unix:gid:{v}"),
            Self::User(v) => write!(f, "unix:user:{v}"),
            Self::Group(v) => write!(f, "unix:group:{v}"),
            Self::SupplementaryGid(v) => write!(f, "unix:supplementary_gid:{v}"),
            Self::SupplementaryGroup(v) => write!(f, "unix:supplementary_group:{v}"),
            Self::Path(v) => write!(f, "unix:path:{v}"),
            Self::Sha256(v) => write!(f, "unix:sha256:{v}"),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

fn bad(kind: &'static str, why: impl Into<String>) -> SelectorError {
    SelectorError::BadValue {
        kind,
        why: why.into(),
    }
}

fn parse_id(kind: &'static str, v: &str) -> Result<u32, SelectorError> {
    // Plain decimal only: "+1", "01" or " 1" would parse to a number but would never be
    // what the kernel reports as text, so they are refused to avoid surprises.
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || (v.len() > 1 && v.starts_with('0'))
    {
        return Err(bad(
            kind,
            format!("{:?} is not a plain decimal number", truncate(v)),
        ));
    }
    v.parse::<u32>()
        .map_err(|_| bad(kind, format!("{v} is larger than 4294967295")))
}

fn parse_name(kind: &'static str, v: &str) -> Result<String, SelectorError> {
    if v.is_empty() {
        return Err(bad(kind, "name is empty"));
    }
    if v.len() > MAX_NAME {
        return Err(bad(kind, format!("name is longer than {MAX_NAME} bytes")));
    }
    if v.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ':' || c == '/')
    {
        return Err(bad(
            kind,
            "name contains whitespace, a control character, ':' or '/'",
        ));
    }
    Ok(v.to_owned())
}

fn parse_path(v: &str) -> Result<String, SelectorError> {
    if !v.starts_with('/') {
        return Err(bad(
            "path",
            format!("{:?} is not an absolute path", truncate(v)),
        ));
    }
    if v.len() > MAX_PATH {
        return Err(bad("path", format!("longer than {MAX_PATH} bytes")));
    }
    if v.contains('\0') {
        return Err(bad("path", "contains a NUL byte"));
    }
    // The kernel reports canonical paths; a non-canonical one in config could never match.
    if v.len() > 1
        && (v.ends_with('/')
            || v.split('/')
                .skip(1)
                .any(|s| s.is_empty() || s == "." || s == ".."))
    {
        return Err(bad(
            "path",
            format!(
                "{:?} is not canonical (no '//', '.', '..' or trailing '/')",
                truncate(v)
            ),
        ));
    }
    Ok(v.to_owned())
}

fn parse_sha256(v: &str) -> Result<String, SelectorError> {
    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("sha256", "expected 64 hexadecimal characters"));
    }
    Ok(v.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        for s in [
            "unix:uid:0",
            "unix:uid:1000",
            "unix:gid:4294967295",
            "unix:user:alice",
            "unix:group:build-bots",
            "unix:supplementary_gid:27",
            "unix:supplementary_group:docker",
            "unix:path:/usr/bin/agent",
            "unix:path:/",
            "unix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let sel = Selector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(sel.to_string(), s);
        }
        let upper = "unix:sha256:0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF";
        assert_eq!(
            Selector::parse(upper).unwrap().to_string(),
            upper.to_ascii_lowercase()
        );
    }

    #[test]
    fn rejects_hostile_selectors() {
        for s in [
            "",
            "unix",
            "unix:",
            "unix:uid",
            "uid:1000",
            "k8s:ns:default",
            "UNIX:uid:1",
            "unix:uid:",
            "unix:uid:-1",
            "unix:uid:+1",
            "unix:uid: 1",
            "unix:uid:01",
            "unix:uid:4294967296",
            "unix:uid:99999999999999999999999",
            "unix:uid:1a",
            "unix:user:",
            "unix:user:a b",
            "unix:user:a\nb",
            "unix:user:a:b",
            "unix:group:\u{0}",
            "unix:path:relative/bin",
            "unix:path:",
            "unix:path:/usr/bin/",
            "unix:path:/usr//bin",
            "unix:path:/usr/../bin/sh",
            "unix:path:/usr/./bin",
            "unix:path:/a\0b",
            "unix:sha256:abc",
            "unix:sha256:zz23456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "unix:exe:/bin/sh",
        ] {
            assert!(Selector::parse(s).is_err(), "accepted {s:?}");
        }
        let long_name = format!("unix:user:{}", "a".repeat(300));
        assert!(Selector::parse(&long_name).is_err());
        let long_path = format!("unix:path:/{}", "a".repeat(5000));
        assert!(Selector::parse(&long_path).is_err());
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Selector::parse("unix:exe:/bin/sh").unwrap_err().to_string();
        assert!(e.contains("unknown selector type \"exe\""), "{e}");
        let e = Selector::parse("unix:path:bin").unwrap_err().to_string();
        assert!(e.contains("not an absolute path"), "{e}");
    }
}
