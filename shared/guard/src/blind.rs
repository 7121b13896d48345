//! Blind index: a keyed HMAC-SHA256 of a normalized identifier, so the store can find a patient's
//! prescriptions (or a prescriber by NPI, or an order by its source id) without holding the
//! identifier in clear. Without the key the index says nothing about the value; the domain is
//! part of the message, so the same value in two domains gives unrelated indexes.

use aws_lc_rs::hmac;

/// Length of an index in bytes.
pub const INDEX_LEN: usize = 32;

pub struct BlindIndex {
    key: hmac::Key,
}

impl std::fmt::Debug for BlindIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlindIndex(<key redacted>)")
    }
}

/// How a value is normalized before hashing: surrounding white space dropped, inner runs of
/// white space folded to one space, letters lower-cased. `MRN 123`, ` mrn  123 ` index alike.
pub fn normalize(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for word in value.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

impl BlindIndex {
    pub fn new(key: &[u8; 32]) -> Self {
        BlindIndex {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// The index of `value` in `domain`.
    pub fn index(&self, domain: &str, value: &str) -> [u8; INDEX_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"rxflow-blind-index/v1\0");
        ctx.update(&(domain.len() as u32).to_be_bytes());
        ctx.update(domain.as_bytes());
        ctx.update(normalize(value).as_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; INDEX_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// Lower-case hex of an index, as audit events carry it.
pub fn to_hex(index: &[u8]) -> String {
    hex::encode(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_value_after_normalization_gives_same_index() {
        let b = BlindIndex::new(&[7u8; 32]);
        assert_eq!(
            b.index("patient", "MRN 123"),
            b.index("patient", "  mrn   123 ")
        );
        assert_ne!(b.index("patient", "MRN 123"), b.index("patient", "MRN 124"));
    }

    #[test]
    fn domains_and_keys_separate_indexes() {
        let a = BlindIndex::new(&[7u8; 32]);
        let b = BlindIndex::new(&[8u8; 32]);
        assert_ne!(a.index("patient", "x"), a.index("npi", "x"));
        assert_ne!(a.index("patient", "x"), b.index("patient", "x"));
        // domain/value boundary is unambiguous
        assert_ne!(a.index("ab", "c"), a.index("a", "bc"));
    }

    #[test]
    fn index_does_not_contain_the_value() {
        let a = BlindIndex::new(&[1u8; 32]);
        let hex = to_hex(&a.index("patient", "1234567890"));
        assert_eq!(hex.len(), 64);
        assert!(!hex.contains("1234567890"));
    }
}
