//! Certificate serial numbers: 128 random bits, shown as lowercase hex.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;

use crate::error::CaError;

/// A 128-bit certificate serial number (the first byte is never zero, so the DER encoding is
/// always 16 or 17 bytes and the hex form is stable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial([u8; 16]);

impl Serial {
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        rand::rng().fill_bytes(&mut b);
        if b[0] == 0 {
            b[0] = 1;
        }
        Serial(b)
    }
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
    /// From the big-endian bytes as a parser returns them (leading zero bytes allowed).
    pub fn from_be_bytes(bytes: &[u8]) -> Option<Self> {
        let trimmed: &[u8] = {
            let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
            &bytes[start..]
        };
        let arr: [u8; 16] = trimmed.try_into().ok()?;
        Some(Serial(arr))
    }
    /// `aa:bb:...`, the form AWS Private CA uses in `CertificateSerial`.
    pub fn to_colon_hex(&self) -> String {
        self.0
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for Serial {
    type Err = CaError;
    /// Accepts hex with or without `:` separators, any case.
    fn from_str(s: &str) -> Result<Self, CaError> {
        let clean: String = s.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(clean.trim())
            .map_err(|_| CaError::InvalidRequest(format!("serial {s:?} is not hex")))?;
        Serial::from_be_bytes(&bytes).ok_or_else(|| CaError::UnknownSerial(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = Serial::random();
        assert_eq!(s.to_string().parse::<Serial>().unwrap(), s);
        assert_eq!(s.to_colon_hex().parse::<Serial>().unwrap(), s);
        assert_eq!(s.to_string().to_uppercase().parse::<Serial>().unwrap(), s);
        assert!("zz".parse::<Serial>().is_err());
        assert!("01".parse::<Serial>().is_err());
    }
}
