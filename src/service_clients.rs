//! Service keys for internal callers: create, rotate and revoke them, each audited, for the CLI and the
//! admin API alike. A key is shown once, when made; only its SHA-256 is stored.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::domain::{Scope, ServiceKey, TextField};
use crate::store::api_client::{self, ApiClient, CreateError, Grants, WILDCARD};
use crate::store::audit::{self, AuditEvent};

/// The grace period of a rotation when none is given: callers have a day to pick up the new key.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The longest grace period accepted.
pub const LONGEST_ROTATION_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A client to create, checked.
#[derive(Debug, Clone)]
pub struct NewClient {
    pub name: String,
    pub grants: Grants,
    pub expires_at: Option<DateTime<Utc>>,
}

impl NewClient {
    /// Checks a request: a text-field name; accounts and apps text fields or `*`; scopes scope-tokens or
    /// `*`; providers provider names or `*` (trackunit when none); apps `*` when none; a non-admin client
    /// must be granted an account and a scope (or it could do nothing); an expiry in the future. The error
    /// names the field.
    pub fn new(name: String, grants: Grants, expires_at: Option<DateTime<Utc>>) -> Result<Self, String> {
        TextField::parse(name.as_str()).map_err(|e| format!("`name` {e}"))?;
        let check = |values: &[String], what: &str, valid: &dyn Fn(&str) -> bool| -> Result<(), String> {
            match values.iter().find(|value| value.as_str() != WILDCARD && !valid(value)) {
                Some(bad) => Err(format!("`{what}`: {:?} is not valid", bad.chars().take(64).collect::<String>())),
                None => Ok(()),
            }
        };
        check(&grants.accounts, "accounts", &|a| TextField::parse(a).is_ok())?;
        check(&grants.scopes, "scopes", &|s| Scope::parse(s).is_ok())?;
        check(&grants.apps, "apps", &|a| TextField::parse(a).is_ok())?;
        check(&grants.providers, "providers", &crate::settings::valid_provider_name)?;
        if !grants.admin && (grants.accounts.is_empty() || grants.scopes.is_empty()) {
            return Err("give at least one account and one scope (or '*'), or make it an admin: this client could \
                        do nothing"
                .into());
        }
        if expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err("`expires_at` must be in the future".into());
        }
        let mut grants = grants;
        if grants.apps.is_empty() {
            grants.apps.push(WILDCARD.into());
        }
        if grants.providers.is_empty() {
            grants.providers.push(crate::provider::TRACKUNIT.into());
        }
        Ok(Self { name, grants, expires_at })
    }
}

/// Creates `new` with a fresh key; returns the client and its key (show it once). The change and its
/// audit entry are one transaction, as for rotate and revoke: no change without its entry.
pub async fn create(pool: &PgPool, new: &NewClient) -> Result<(ApiClient, ServiceKey), CreateError> {
    let key = ServiceKey::generate();
    let mut tx = pool.begin().await?;
    let client = api_client::create_expiring(&mut *tx, &new.name, &key.sha256(), &new.grants, new.expires_at).await?;
    audit_client(&mut tx, "CLIENT_CREATED", "created", &new.name).await?;
    tx.commit().await?;
    Ok((client, key))
}

/// Gives the client `name` a new key; its current key keeps working for `grace`. `None` when there is no
/// such (unrevoked) client.
pub async fn rotate(pool: &PgPool, name: &str, grace: Duration) -> sqlx::Result<Option<ServiceKey>> {
    let key = ServiceKey::generate();
    let mut tx = pool.begin().await?;
    if !api_client::rotate(&mut *tx, name, &key.sha256(), grace).await? {
        return Ok(None);
    }
    audit_client(&mut tx, "CLIENT_ROTATED", "rotated", name).await?;
    tx.commit().await?;
    Ok(Some(key))
}

/// Revokes the client `name`: its keys stop working on every replica within milliseconds (NOTIFY).
pub async fn revoke(pool: &PgPool, name: &str) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let revoked = api_client::revoke(&mut *tx, name).await?;
    if revoked {
        audit_client(&mut tx, "CLIENT_REVOKED", "revoked", name).await?;
    }
    tx.commit().await?;
    Ok(revoked)
}

async fn audit_client(conn: &mut PgConnection, action: &str, outcome: &str, name: &str) -> sqlx::Result<()> {
    audit::record(conn, &AuditEvent { client_name: Some(name), ..AuditEvent::new(action, outcome) }).await
}

/// A duration as operators write it: `90s`, `30m`, `24h`, `7d`, or whole seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 90s, 30m, 24h or 7d"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number.saturating_mul(60),
        "h" => number.saturating_mul(3600),
        "d" => number.saturating_mul(86_400),
        _ => return Err(format!("{text:?} is not a duration such as 90s, 30m, 24h or 7d")),
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(accounts: &[&str], scopes: &[&str]) -> Grants {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Grants { accounts: own(accounts), scopes: own(scopes), apps: vec![], providers: vec![], admin: false }
    }

    #[test]
    fn a_new_client_is_checked_and_takes_the_documented_defaults() {
        let client = NewClient::new("billing".into(), grants(&["*"], &["a"]), None).unwrap();
        assert_eq!(
            (client.grants.apps.as_slice(), client.grants.providers.as_slice()),
            (&["*".to_owned()][..], &["trackunit".to_owned()][..])
        );
        assert!(NewClient::new("billing".into(), grants(&[], &["a"]), None).unwrap_err().contains("could do nothing"));
        assert!(NewClient::new("".into(), grants(&["*"], &["a"]), None).unwrap_err().contains("`name`"));
        assert!(NewClient::new("b".into(), grants(&["*"], &["a b"]), None).unwrap_err().contains("`scopes`"));
        let past = Some(Utc::now() - chrono::Duration::seconds(1));
        assert!(NewClient::new("b".into(), grants(&["*"], &["a"]), past).unwrap_err().contains("future"));
    }

    #[test]
    fn durations_as_operators_write_them() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        for bad in ["", "h", "1w", "-1h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
