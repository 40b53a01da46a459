use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The id stored beside each ciphertext: `[A-Za-z0-9_-]{1,32}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a key ring specification was refused. Never quotes key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyRingError {
    #[error("no key given; expected comma-separated `id:base64key` entries")]
    Empty,
    #[error("entry {0} is not of the form `id:base64key`")]
    NotIdColonKey(usize),
    #[error("entry {0}: the key id must be 1 to 32 characters of A-Z, a-z, 0-9, '_' or '-'")]
    BadId(usize),
    #[error("entry {0} (id {1:?}): the key is not valid base64")]
    NotBase64(usize, String),
    #[error("entry {0} (id {1:?}): the key must be 32 bytes, found {2}")]
    WrongLength(usize, String, usize),
    #[error("key id {0:?} appears twice")]
    DuplicateId(String),
}

/// Every AES-256-GCM key we can decrypt with; the first one given encrypts.
/// `Debug` shows key ids only: key bytes never reach a log.
pub struct KeyRing {
    primary: KeyId,
    ids: Vec<KeyId>,
    ciphers: HashMap<KeyId, Aes256Gcm>,
}

impl KeyRing {
    /// Parses `id:base64key[,id:base64key...]`, the format of `TOKENVAULT_ENCRYPTION_KEYS`.
    pub fn parse(spec: &str) -> Result<Self, KeyRingError> {
        let mut ids = Vec::new();
        let mut ciphers = HashMap::new();
        for (index, entry) in spec.split(',').map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            let position = index + 1;
            let (id, encoded) = entry.split_once(':').ok_or(KeyRingError::NotIdColonKey(position))?;
            let id_ok =
                (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !id_ok {
                return Err(KeyRingError::BadId(position));
            }
            let bytes = zeroize::Zeroizing::new(
                STANDARD.decode(encoded.trim()).map_err(|_| KeyRingError::NotBase64(position, id.to_owned()))?,
            );
            if bytes.len() != 32 {
                return Err(KeyRingError::WrongLength(position, id.to_owned(), bytes.len()));
            }
            let key_id = KeyId(id.to_owned());
            let cipher = Aes256Gcm::new_from_slice(&bytes).expect("length checked above");
            if ciphers.insert(key_id.clone(), cipher).is_some() {
                return Err(KeyRingError::DuplicateId(id.to_owned()));
            }
            ids.push(key_id);
        }
        let primary = ids.first().cloned().ok_or(KeyRingError::Empty)?;
        Ok(Self { primary, ids, ciphers })
    }

    /// The key that seals new values.
    pub fn primary(&self) -> (&KeyId, &Aes256Gcm) {
        (&self.primary, &self.ciphers[&self.primary])
    }

    pub fn primary_id(&self) -> &KeyId {
        &self.primary
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ciphers.contains_key(&KeyId(id.to_owned()))
    }

    pub fn ids(&self) -> &[KeyId] {
        &self.ids
    }

    pub(super) fn get(&self, id: &str) -> Option<&Aes256Gcm> {
        self.ciphers.get(&KeyId(id.to_owned()))
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing").field("primary", &self.primary).field("ids", &self.ids).finish_non_exhaustive()
    }
}

/// 32 random bytes from the OS, base64: the key half of a `TOKENVAULT_ENCRYPTION_KEYS` entry.
pub fn generate_key() -> String {
    let mut bytes = zeroize::Zeroizing::new([0_u8; 32]);
    OsRng.fill_bytes(bytes.as_mut());
    STANDARD.encode(bytes.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_key_is_primary_and_debug_shows_no_key_bytes() {
        let key = generate_key();
        let ring = KeyRing::parse(&format!("a:{key}, b:{}", generate_key())).unwrap();
        assert_eq!(ring.primary_id().as_str(), "a");
        assert!(ring.contains("b"));
        let debug = format!("{ring:?}");
        assert!(debug.contains("\"a\"") && !debug.contains(&key[..12]), "{debug}");
    }

    #[test]
    fn malformed_specs_are_refused_with_a_reason() {
        let key = generate_key();
        assert_eq!(KeyRing::parse("").unwrap_err(), KeyRingError::Empty);
        assert_eq!(KeyRing::parse("nocolon").unwrap_err(), KeyRingError::NotIdColonKey(1));
        assert_eq!(KeyRing::parse(&format!("bad id:{key}")).unwrap_err(), KeyRingError::BadId(1));
        assert_eq!(KeyRing::parse("a:!!!").unwrap_err(), KeyRingError::NotBase64(1, "a".into()));
        assert_eq!(KeyRing::parse("a:AAAA").unwrap_err(), KeyRingError::WrongLength(1, "a".into(), 3));
        assert_eq!(KeyRing::parse(&format!("a:{key},a:{key}")).unwrap_err(), KeyRingError::DuplicateId("a".into()));
    }
}
