//! AES-256-GCM sealing of everything secret we store: client credentials and cached access tokens.
//!
//! Each ciphertext is `nonce (12 bytes) || ciphertext || tag (16 bytes)`, stored beside the id of the key
//! that sealed it. The associated data ([`Aad`]) names the row and field a ciphertext belongs to, so a
//! ciphertext copied into another row, or into another column of the same row, fails to open.
//! This module knows nothing of the database; it never logs and never formats key material.

mod aad;
mod key_ring;

pub use aad::{Aad, AadVersion, CredentialRow, SecretField, TokenRow};
pub use key_ring::{KeyId, KeyRing, KeyRingError, generate_key};

use aes_gcm::aead::{Aead, AeadCore, OsRng, Payload};
use secrecy::SecretBox;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A sealed secret and the id of the key that sealed it.
#[derive(Clone)]
pub struct Sealed {
    pub key_id: KeyId,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed").field("key_id", &self.key_id).field("len", &self.bytes.len()).finish()
    }
}

/// Why a ciphertext could not be opened. Deliberately coarse: the caller can only log it and give up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("the key {0:?} that sealed this value is not in the key ring")]
    UnknownKey(String),
    #[error("the ciphertext is too short to hold a nonce and a tag")]
    Truncated,
    #[error("the ciphertext does not authenticate (wrong key, row or field, or tampered)")]
    Unauthentic,
}

impl KeyRing {
    /// Seals `plaintext` under the primary key with a fresh random 96-bit nonce.
    pub fn seal(&self, plaintext: &[u8], aad: &Aad) -> Sealed {
        let (key_id, cipher) = self.primary();
        let nonce = aes_gcm::Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad: aad.as_bytes() })
            // AES-GCM encryption only fails for plaintexts over 64 GiB; ours are a few hundred bytes.
            .unwrap_or_else(|_| unreachable!("AES-GCM refused a plaintext of {} bytes", plaintext.len()));
        let mut bytes = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&ciphertext);
        Sealed { key_id: key_id.clone(), bytes }
    }

    /// Opens a value sealed by [`seal`](Self::seal) under any key of the ring. The plaintext is zeroized on drop.
    pub fn open(&self, key_id: &str, sealed: &[u8], aad: &Aad) -> Result<SecretBox<Vec<u8>>, OpenError> {
        let cipher = self.get(key_id).ok_or_else(|| OpenError::UnknownKey(key_id.to_owned()))?;
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Truncated);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        cipher
            .decrypt(nonce.into(), Payload { msg: ciphertext, aad: aad.as_bytes() })
            .map(|plain| SecretBox::new(Box::new(plain)))
            .map_err(|_| OpenError::Unauthentic)
    }

    /// Opens a sealed UTF-8 string (a client id, secret or access token).
    pub fn open_string(&self, key_id: &str, sealed: &[u8], aad: &Aad) -> Result<secrecy::SecretString, OpenError> {
        use secrecy::ExposeSecret;
        let plain = self.open(key_id, sealed, aad)?;
        let text = std::str::from_utf8(plain.expose_secret()).map_err(|_| OpenError::Unauthentic)?;
        Ok(secrecy::SecretString::from(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use secrecy::ExposeSecret;

    fn ring(spec: &str) -> KeyRing {
        KeyRing::parse(spec).unwrap()
    }

    fn two_key_spec() -> String {
        format!("new:{},old:{}", generate_key(), generate_key())
    }

    fn aad_for(account: &str, field: SecretField) -> Aad {
        let row = CredentialRow {
            provider: "trackunit",
            app_id: "@org/app",
            account_id: account,
            installation_id: uuid::Uuid::nil(),
            credentials_version: 1,
        };
        Aad::credential(AadVersion::CURRENT, &row, field)
    }

    fn aad(account: &str) -> Aad {
        aad_for(account, SecretField::ClientSecret)
    }

    #[test]
    fn round_trips_and_uses_a_fresh_nonce_each_time() {
        let keys = ring(&two_key_spec());
        let a = keys.seal(b"s3cret", &aad("acc-1"));
        let b = keys.seal(b"s3cret", &aad("acc-1"));
        assert_eq!(a.key_id.as_str(), "new");
        assert_ne!(a.bytes, b.bytes, "two seals of one plaintext must differ");
        assert_eq!(keys.open("new", &a.bytes, &aad("acc-1")).unwrap().expose_secret(), b"s3cret");
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_or_field_does_not_open() {
        let keys = ring(&two_key_spec());
        let sealed = keys.seal(b"s3cret", &aad("acc-1"));
        assert_eq!(keys.open("new", &sealed.bytes, &aad("acc-2")).unwrap_err(), OpenError::Unauthentic);
        let other_field = aad_for("acc-1", SecretField::ClientId);
        assert_eq!(keys.open("new", &sealed.bytes, &other_field).unwrap_err(), OpenError::Unauthentic);
    }

    #[test]
    fn the_wrong_key_an_unknown_key_and_truncation_fail() {
        let spec = two_key_spec();
        let keys = ring(&spec);
        let sealed = keys.seal(b"s3cret", &aad("acc-1"));
        assert_eq!(keys.open("old", &sealed.bytes, &aad("acc-1")).unwrap_err(), OpenError::Unauthentic);
        assert_eq!(keys.open("gone", &sealed.bytes, &aad("acc-1")).unwrap_err(), OpenError::UnknownKey("gone".into()));
        assert_eq!(keys.open("new", &sealed.bytes[..20], &aad("acc-1")).unwrap_err(), OpenError::Truncated);
    }

    #[test]
    fn a_value_sealed_under_an_old_key_still_opens_after_rotation() {
        let old_first = format!("old:{},new:{}", generate_key(), generate_key());
        let before = ring(&old_first);
        let sealed = before.seal(b"s3cret", &aad("acc-1"));
        let (old, new) = old_first.split_once(',').unwrap();
        let after = ring(&format!("{new},{old}"));
        assert_eq!(after.open("old", &sealed.bytes, &aad("acc-1")).unwrap().expose_secret(), b"s3cret");
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(plain in proptest::collection::vec(any::<u8>(), 0..512), account in "[a-z0-9-]{1,40}") {
            let keys = ring(&format!("k:{}", generate_key()));
            let sealed = keys.seal(&plain, &aad(&account));
            let opened = keys.open("k", &sealed.bytes, &aad(&account)).unwrap();
            prop_assert_eq!(opened.expose_secret(), &plain);
        }

        #[test]
        fn any_single_bit_flip_fails_to_open(plain in proptest::collection::vec(any::<u8>(), 1..64), bit in any::<usize>()) {
            let keys = ring(&format!("k:{}", generate_key()));
            let mut sealed = keys.seal(&plain, &aad("acc")).bytes;
            let bit = bit % (sealed.len() * 8);
            sealed[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(keys.open("k", &sealed, &aad("acc")).is_err());
        }

        #[test]
        fn any_other_associated_data_fails_to_open(account in "[a-z0-9-]{1,40}", other in "[a-z0-9-]{1,40}") {
            prop_assume!(account != other);
            let keys = ring(&format!("k:{}", generate_key()));
            let sealed = keys.seal(b"s3cret", &aad(&account));
            prop_assert!(keys.open("k", &sealed.bytes, &aad(&other)).is_err());
        }
    }
}
