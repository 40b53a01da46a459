use uuid::Uuid;

/// Which secret a ciphertext holds; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretField {
    ClientId,
    ClientSecret,
    RefreshToken,
}

impl SecretField {
    fn label(self) -> &'static str {
        match self {
            SecretField::ClientId => "client_id",
            SecretField::ClientSecret => "client_secret",
            SecretField::RefreshToken => "refresh_token",
        }
    }
}

/// The format of the associated data, stored beside each ciphertext (`aad_version`), so rows sealed under
/// an older format stay readable until `tokenvault keys rotate` re-seals them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AadVersion {
    /// Credentials bound to app, account and field; cached tokens to installation, credentials version and
    /// scope set.
    V1,
    /// Also binds credentials to their provider, installation id and credentials version, and cached
    /// tokens to their type, granted scope and expiry: a row rolled back to older credentials, or a token
    /// whose expiry was edited, does not open.
    V2,
}

impl AadVersion {
    /// What new values are sealed with.
    pub const CURRENT: AadVersion = AadVersion::V2;

    pub fn from_column(value: i16) -> Option<Self> {
        match value {
            1 => Some(AadVersion::V1),
            2 => Some(AadVersion::V2),
            _ => None,
        }
    }

    pub fn as_column(self) -> i16 {
        match self {
            AadVersion::V1 => 1,
            AadVersion::V2 => 2,
        }
    }
}

/// The row a credential ciphertext belongs to.
#[derive(Debug, Clone, Copy)]
pub struct CredentialRow<'a> {
    pub provider: &'a str,
    /// The Trackunit app; empty for other providers.
    pub app_id: &'a str,
    pub account_id: &'a str,
    pub installation_id: Uuid,
    pub credentials_version: i64,
}

/// The row and contents a cached access token ciphertext belongs to.
#[derive(Debug, Clone, Copy)]
pub struct TokenRow<'a> {
    pub installation_id: Uuid,
    pub credentials_version: i64,
    pub scope_key: &'a str,
    pub token_type: &'a str,
    pub granted_scope: &'a str,
    pub expires_at_ms: i64,
}

/// Associated data for AES-GCM: a length-prefixed list of strings naming the row and field a ciphertext
/// belongs to. Length prefixes keep `("a:b", "c")` and `("a", "b:c")` apart whatever the strings hold.
/// Changing an existing version's encoding makes every ciphertext sealed with it unreadable: add a
/// version instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aad(Vec<u8>);

impl Aad {
    /// For a client credential or refresh token of an installation.
    pub fn credential(version: AadVersion, row: &CredentialRow<'_>, field: SecretField) -> Self {
        match version {
            AadVersion::V1 => {
                Self::from_parts(&["tokenvault/v1", "installation", field.label(), row.app_id, row.account_id])
            }
            AadVersion::V2 => Self::from_parts(&[
                "tokenvault/v2",
                "credential",
                field.label(),
                row.provider,
                row.app_id,
                row.account_id,
                &row.installation_id.to_string(),
                &row.credentials_version.to_string(),
            ]),
        }
    }

    /// For the refresh token of user-delegated credentials at its `generation` (bumped at each rotation,
    /// so a spent token written back does not open). Version 2 only: refresh tokens came with it.
    pub fn refresh_token(row: &CredentialRow<'_>, generation: i64) -> Self {
        Self::from_parts(&[
            "tokenvault/v2",
            "refresh_token",
            row.provider,
            row.app_id,
            row.account_id,
            &row.installation_id.to_string(),
            &row.credentials_version.to_string(),
            &generation.to_string(),
        ])
    }

    /// For a cached access token (or the refresh token that came with it: `field`).
    pub fn cached_token(version: AadVersion, row: &TokenRow<'_>, field: Option<SecretField>) -> Self {
        let (installation, credentials_version) =
            (row.installation_id.to_string(), row.credentials_version.to_string());
        match version {
            AadVersion::V1 => {
                Self::from_parts(&["tokenvault/v1", "token_cache", &installation, &credentials_version, row.scope_key])
            }
            AadVersion::V2 => Self::from_parts(&[
                "tokenvault/v2",
                "token_cache",
                field.map_or("access_token", SecretField::label),
                &installation,
                &credentials_version,
                row.scope_key,
                row.token_type,
                row.granted_scope,
                &row.expires_at_ms.to_string(),
            ]),
        }
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

    fn row(app_id: &str, account_id: &str) -> CredentialRow<'static> {
        let (app_id, account_id) = (app_id.to_owned().leak(), account_id.to_owned().leak());
        CredentialRow {
            provider: "trackunit",
            app_id,
            account_id,
            installation_id: Uuid::nil(),
            credentials_version: 1,
        }
    }

    #[test]
    fn separators_inside_parts_cannot_forge_another_row() {
        for version in [AadVersion::V1, AadVersion::V2] {
            let a = Aad::credential(version, &row("a:b", "c"), SecretField::ClientId);
            let b = Aad::credential(version, &row("a", "b:c"), SecretField::ClientId);
            assert_ne!(a, b);
        }
    }

    #[test]
    fn version_two_binds_the_installation_id_and_credentials_version() {
        let base = row("@o/a", "acc");
        let aad = |row: &CredentialRow<'_>| Aad::credential(AadVersion::V2, row, SecretField::ClientSecret);
        assert_ne!(aad(&base), aad(&CredentialRow { credentials_version: 2, ..base }));
        assert_ne!(aad(&base), aad(&CredentialRow { installation_id: Uuid::from_u128(1), ..base }));
        assert_ne!(aad(&base), aad(&CredentialRow { provider: "other", ..base }));
        // Version 1 did not: that is why it was replaced.
        let v1 = |row: &CredentialRow<'_>| Aad::credential(AadVersion::V1, row, SecretField::ClientSecret);
        assert_eq!(v1(&base), v1(&CredentialRow { credentials_version: 2, ..base }));
    }

    #[test]
    fn version_two_binds_a_cached_tokens_expiry_type_and_scope() {
        let base = TokenRow {
            installation_id: Uuid::nil(),
            credentials_version: 1,
            scope_key: "a",
            token_type: "Bearer",
            granted_scope: "a",
            expires_at_ms: 1,
        };
        let aad = |row: &TokenRow<'_>| Aad::cached_token(AadVersion::V2, row, None);
        assert_ne!(aad(&base), aad(&TokenRow { expires_at_ms: 2, ..base }));
        assert_ne!(aad(&base), aad(&TokenRow { token_type: "DPoP", ..base }));
        assert_ne!(aad(&base), aad(&TokenRow { granted_scope: "a b", ..base }));
        assert_ne!(aad(&base), Aad::cached_token(AadVersion::V2, &base, Some(SecretField::RefreshToken)));
    }
}
