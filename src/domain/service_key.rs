use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// Every service key starts with this, so secret scanners can recognise a leaked one.
/// Changing this prefix breaks every issued key.
pub const SERVICE_KEY_PREFIX: &str = "tvk_";

/// A freshly generated service key. Shown once to the operator; only its SHA-256 is stored.
pub struct ServiceKey(SecretString);

impl ServiceKey {
    /// 32 random bytes from the OS, base64url: 256 bits, so hashing without a salt is safe.
    pub fn generate() -> Self {
        let mut bytes = zeroize::Zeroizing::new([0_u8; 32]);
        OsRng.fill_bytes(bytes.as_mut());
        Self(SecretString::from(format!("{SERVICE_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes.as_ref()))))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn sha256(&self) -> [u8; 32] {
        Self::digest(self.expose())
    }

    /// The digest a presented key is looked up by.
    pub fn digest(presented: &str) -> [u8; 32] {
        Sha256::digest(presented.as_bytes()).into()
    }
}

impl std::fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_unique_and_masked_in_debug() {
        let a = ServiceKey::generate();
        let b = ServiceKey::generate();
        assert!(a.expose().starts_with(SERVICE_KEY_PREFIX));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.sha256(), ServiceKey::digest(a.expose()));
        assert!(!format!("{a:?}").contains(&a.expose()[4..]));
    }
}
