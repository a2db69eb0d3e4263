//! The little DER encoding the leaf-certificate template needs.
//!
//! Hand-written on purpose: the template copies the CA's subject and key identifier
//! byte-for-byte (a re-encoded issuer name can break chain building) and runs on the hot
//! path of every issuance, where a general ASN.1 library's allocations show up.

/// Universal tags used by certificates and CRLs (named as in X.690).
#[allow(missing_docs)]
pub mod tag {
    pub const BOOLEAN: u8 = 0x01;
    pub const INTEGER: u8 = 0x02;
    pub const BIT_STRING: u8 = 0x03;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const UTF8_STRING: u8 = 0x0c;
    pub const UTC_TIME: u8 = 0x17;
    pub const GENERALIZED_TIME: u8 = 0x18;
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
}

/// Appends a definite length.
pub fn write_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Appends tag, length and `content`.
pub fn tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    write_len(out, content.len());
    out.extend_from_slice(content);
}

/// Appends a constructed value whose content `f` writes.
pub fn nested(out: &mut Vec<u8>, tag: u8, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::with_capacity(128);
    f(&mut inner);
    tlv(out, tag, &inner);
}

/// Appends an unsigned INTEGER from big-endian magnitude bytes (minimal, positive).
pub fn uint(out: &mut Vec<u8>, be: &[u8]) {
    let skip = be
        .iter()
        .take_while(|b| **b == 0)
        .count()
        .min(be.len().saturating_sub(1));
    let be = &be[skip..];
    out.push(tag::INTEGER);
    if be.first().is_some_and(|b| b & 0x80 != 0) {
        write_len(out, be.len() + 1);
        out.push(0);
    } else {
        write_len(out, be.len());
    }
    out.extend_from_slice(be);
}

/// Appends a BIT STRING with no unused bits.
pub fn bit_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(tag::BIT_STRING);
    write_len(out, bytes.len() + 1);
    out.push(0);
    out.extend_from_slice(bytes);
}

/// Appends a time as UTCTime before 2050 and GeneralizedTime from 2050 on (RFC 5280 4.1.2.5).
pub fn time(out: &mut Vec<u8>, t: time::OffsetDateTime) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let (y, mo, d, h, mi, s) = (
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
    );
    if (1950..2050).contains(&y) {
        let v = format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y % 100);
        tlv(out, tag::UTC_TIME, v.as_bytes());
    } else {
        let v = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z");
        tlv(out, tag::GENERALIZED_TIME, v.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_integers() {
        let mut v = Vec::new();
        write_len(&mut v, 5);
        write_len(&mut v, 200);
        write_len(&mut v, 300);
        assert_eq!(v, [5, 0x81, 200, 0x82, 1, 44]);
        let mut v = Vec::new();
        uint(&mut v, &[0, 0, 0x80]);
        assert_eq!(v, [2, 2, 0, 0x80]);
        let mut v = Vec::new();
        uint(&mut v, &[0, 0]);
        assert_eq!(v, [2, 1, 0]);
    }

    #[test]
    fn times_switch_encoding_in_2050() {
        let mut v = Vec::new();
        time(&mut v, time::macros::datetime!(2049-12-31 23:59:59 UTC));
        assert_eq!(&v[2..], b"491231235959Z");
        let mut v = Vec::new();
        time(&mut v, time::macros::datetime!(2050-01-01 00:00:00 UTC));
        assert_eq!(v[0], tag::GENERALIZED_TIME);
        assert_eq!(&v[2..], b"20500101000000Z");
    }
}
