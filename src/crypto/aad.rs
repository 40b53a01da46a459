/// Which secret column a ciphertext belongs to; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretField {
    ClientId,
    ClientSecret,
}

impl SecretField {
    fn label(self) -> &'static str {
        match self {
            SecretField::ClientId => "client_id",
            SecretField::ClientSecret => "client_secret",
        }
    }
}

/// Associated data for AES-GCM: a length-prefixed list of strings naming the row and field a ciphertext
/// belongs to. Length prefixes keep `("a:b", "c")` and `("a", "b:c")` apart whatever the strings hold.
/// Changing this encoding makes every stored ciphertext unreadable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aad(Vec<u8>);

impl Aad {
    /// For a client credential of the installation `(app_id, account_id)`.
    pub fn installation(app_id: &str, account_id: &str, field: SecretField) -> Self {
        Self::from_parts(&["tokenvault/v1", "installation", field.label(), app_id, account_id])
    }

    /// For a cached access token of an installation, its credentials version and scope set.
    pub fn cached_token(installation_id: &uuid::Uuid, credentials_version: i64, scope_key: &str) -> Self {
        Self::from_parts(&[
            "tokenvault/v1",
            "token_cache",
            &installation_id.to_string(),
            &credentials_version.to_string(),
            scope_key,
        ])
    }

    fn from_parts(parts: &[&str]) -> Self {
        let mut bytes = Vec::new();
        for part in parts {
            let len = u32::try_from(part.len()).expect("associated data parts are short strings");
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(part.as_bytes());
        }
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separators_inside_parts_cannot_forge_another_row() {
        let a = Aad::installation("a:b", "c", SecretField::ClientId);
        let b = Aad::installation("a", "b:c", SecretField::ClientId);
        assert_ne!(a, b);
    }
}
