//! `[providers.NAME]` tables of the settings file: parsed, checked and turned into [`Provider`]s. A
//! malformed table, an unknown key or a bad value stops the process at start with a message naming the
//! provider and the key (the key's path comes from serde_path_to_error).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{SettingsError, checked_url};
use crate::domain::{Scope, ScopeSet};
use crate::provider::{ClientAuth, ExpiryFromJwt, Provider, ReplyFields, TRACKUNIT};

/// Form parameters tokenvault sets itself: an `extra_params` entry may not shadow one.
const RESERVED_PARAMS: [&str; 5] = ["grant_type", "client_id", "client_secret", "scope", "refresh_token"];
const LONGEST_LIFETIME_SECS: u64 = 365 * 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderTable {
    token_url: String,
    #[serde(default)]
    client_auth: ClientAuth,
    #[serde(default)]
    default_scopes: Vec<String>,
    #[serde(default = "space")]
    scope_separator: String,
    #[serde(default = "yes")]
    send_scope: bool,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    #[serde(default = "yes")]
    use_refresh_tokens: bool,
    #[serde(default)]
    reply: ReplyTable,
    #[serde(default)]
    expiry_from_jwt: ExpiryFromJwt,
    #[serde(default = "five_minutes")]
    default_lifetime_secs: u64,
    #[serde(default)]
    expiry_margin_secs: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplyTable {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<String>,
    scope: Option<String>,
    refresh_token: Option<String>,
    refresh_expires_in: Option<String>,
}

fn space() -> String {
    " ".into()
}

fn yes() -> bool {
    true
}

fn five_minutes() -> u64 {
    300
}

/// Whether `name` may name a provider: `[a-z][a-z0-9_-]{0,31}`.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && name.len() <= 32
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The providers of the settings file's `providers` table, or the first problem, naming it.
pub fn parse(table: toml::Table, allow_insecure_http: bool) -> Result<Vec<Provider>, SettingsError> {
    table.into_iter().map(|(name, value)| parse_one(name, value, allow_insecure_http)).collect()
}

fn parse_one(name: String, value: toml::Value, allow_insecure_http: bool) -> Result<Provider, SettingsError> {
    let fail = |key: &str, reason: String| SettingsError::Provider { name: name.clone(), key: key.to_owned(), reason };
    if !valid_name(&name) {
        return Err(fail("", "the name must match [a-z][a-z0-9_-]{0,31}".into()));
    }
    if name == TRACKUNIT {
        return Err(fail(
            "",
            "trackunit is built in and may not be redefined (set TOKENVAULT_TRACKUNIT_* instead)".into(),
        ));
    }
    if !value.is_table() {
        return Err(fail("", "must be a table".into()));
    }
    let table: ProviderTable = serde_path_to_error::deserialize(value).map_err(|error| {
        let key = error.path().to_string();
        fail(if key == "." { "" } else { &key }, error.into_inner().to_string())
    })?;

    let token_url = checked_url(&table.token_url, allow_insecure_http).map_err(|reason| fail("token_url", reason))?;
    let mut scopes = Vec::with_capacity(table.default_scopes.len());
    for scope in &table.default_scopes {
        Scope::parse(scope).map_err(|error| fail("default_scopes", error.to_string()))?;
        scopes.push(scope.as_str());
    }
    let default_scopes = if scopes.is_empty() {
        ScopeSet::empty()
    } else {
        ScopeSet::parse(scopes).map_err(|error| fail("default_scopes", error.to_string()))?
    };
    if table.scope_separator.is_empty() || table.scope_separator.chars().count() > 4 {
        return Err(fail("scope_separator", "must be 1 to 4 characters".into()));
    }
    for (param, param_value) in &table.extra_params {
        if RESERVED_PARAMS.contains(&param.as_str()) {
            return Err(fail("extra_params", format!("{param:?} is set by tokenvault itself")));
        }
        if param.is_empty() || param.chars().chain(param_value.chars()).any(char::is_control) {
            return Err(fail("extra_params", format!("{param:?}: names and values must be non-empty text")));
        }
    }
    if !(1..=LONGEST_LIFETIME_SECS).contains(&table.default_lifetime_secs) {
        return Err(fail("default_lifetime_secs", format!("must be from 1 to {LONGEST_LIFETIME_SECS}")));
    }
    if table.expiry_margin_secs > 24 * 3600 {
        return Err(fail("expiry_margin_secs", "must be at most 86400".into()));
    }
    let defaults = ReplyFields::default();
    let path = |key: &'static str, given: Option<String>, default: String| -> Result<String, SettingsError> {
        match given {
            None => Ok(default),
            Some(path) if !path.is_empty() && path.split('.').all(|step| !step.is_empty()) => Ok(path),
            Some(_) => Err(fail(key, "must be a member name or a dotted path of them".into())),
        }
    };
    let reply = ReplyFields {
        access_token: path("reply.access_token", table.reply.access_token, defaults.access_token)?,
        token_type: path("reply.token_type", table.reply.token_type, defaults.token_type)?,
        expires_in: path("reply.expires_in", table.reply.expires_in, defaults.expires_in)?,
        scope: path("reply.scope", table.reply.scope, defaults.scope)?,
        refresh_token: path("reply.refresh_token", table.reply.refresh_token, defaults.refresh_token)?,
        refresh_expires_in: path(
            "reply.refresh_expires_in",
            table.reply.refresh_expires_in,
            defaults.refresh_expires_in,
        )?,
    };
    Ok(Provider {
        name,
        token_url,
        client_auth: table.client_auth,
        default_scopes,
        scope_separator: table.scope_separator,
        send_scope: table.send_scope,
        extra_params: table.extra_params,
        use_refresh_tokens: table.use_refresh_tokens,
        reply,
        expiry_from_jwt: table.expiry_from_jwt,
        default_lifetime: Duration::from_secs(table.default_lifetime_secs),
        expiry_margin: Duration::from_secs(table.expiry_margin_secs),
        credentials_from: "admin_api",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Vec<Provider>, SettingsError> {
        let document: toml::Table = text.parse().unwrap();
        parse(document["providers"].as_table().unwrap().clone(), false)
    }

    #[test]
    fn a_minimal_table_takes_the_documented_defaults() {
        let providers =
            load("[providers.triumph]\ntoken_url = \"https://intelligence.triumph.io/v1/auth/token\"\n").unwrap();
        let triumph = &providers[0];
        assert_eq!(triumph.name, "triumph");
        assert_eq!(triumph.client_auth, ClientAuth::ClientSecretPost);
        assert!(triumph.default_scopes.is_empty() && triumph.send_scope && triumph.use_refresh_tokens);
        assert_eq!(triumph.scope_separator, " ");
        assert_eq!(triumph.reply, ReplyFields::default());
        assert_eq!(triumph.expiry_from_jwt, ExpiryFromJwt::Fallback);
        assert_eq!(triumph.default_lifetime, Duration::from_secs(300));
        assert_eq!(triumph.expiry_margin, Duration::ZERO);
    }

    #[test]
    fn every_problem_names_the_provider_and_the_key() {
        let cases = [
            ("[providers.x]\ntoken_url = \"https://a/t\"\ntokne_url = 1\n", "providers.x", "tokne_url"),
            ("[providers.x]\ntoken_url = \"https://a/t\"\nsend_scope = \"no\"\n", "providers.x.send_scope", "boolean"),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\n[providers.x.reply]\naccess_tokn = \"Token\"\n",
                "providers.x",
                "access_tokn",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\n[providers.x.reply]\nexpires_in = 5\n",
                "providers.x.reply.expires_in",
                "string",
            ),
            ("[providers.x]\ntoken_url = \"http://auth.example.com/t\"\n", "providers.x.token_url", "https"),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\nclient_auth = \"private_key_jwt\"\n",
                "providers.x.client_auth",
                "client_secret_basic",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\nexpiry_from_jwt = \"always\"\n",
                "providers.x.expiry_from_jwt",
                "earliest",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\ndefault_scopes = [\"a b\"]\n",
                "providers.x.default_scopes",
                "scope",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\nextra_params = { client_secret = \"x\" }\n",
                "providers.x.extra_params",
                "client_secret",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\ndefault_lifetime_secs = 0\n",
                "providers.x.default_lifetime_secs",
                "from 1",
            ),
            ("[providers.x]\nclient_auth = \"client_secret_basic\"\n", "providers.x", "token_url"),
            ("[providers.Bad]\ntoken_url = \"https://a/t\"\n", "providers.Bad", "[a-z]"),
            ("[providers.trackunit]\ntoken_url = \"https://a/t\"\n", "providers.trackunit", "built in"),
            ("[providers]\nx = 1\n", "providers.x", "table"),
        ];
        for (text, expected_key, expected_reason) in cases {
            let error = load(text).err().unwrap_or_else(|| panic!("accepted: {text}")).to_string();
            assert!(error.starts_with(expected_key), "{error} for {text}");
            assert!(error.contains(expected_reason), "{error} for {text}");
        }
    }

    #[test]
    fn names_follow_the_documented_pattern() {
        for good in ["a", "triumph", "truphone-connect", "x_1", &"a".repeat(32)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "1a", "A", "a.b", "a b", &"a".repeat(33), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
