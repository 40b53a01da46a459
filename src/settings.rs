//! Typed settings, read once at start from environment variables, `NAME_FILE` files (container secrets)
//! and an optional TOML file with the same names in lower case. Precedence: variable, then `_FILE`,
//! then the TOML file, then the default. Keys are parsed here, so a bad key stops the process at start
//! with a message that names the variable, never at the first request.
//! Every setting is documented in README.md and `tokenvault.example.toml`; keep the three in step.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::crypto::KeyRing;
use crate::provider::{Provider, Providers};

mod providers;
pub use providers::valid_name as valid_provider_name;

/// When a rejected installation is probed again: 1 min after the rejection, then 10 min after that probe,
/// 1 h after the next, and every 6 h from then on (each wait counts from the one before).
pub const DEFAULT_PROBE_SCHEDULE_SECS: [u64; 4] = [60, 600, 3600, 6 * 3600];

/// Every asymmetric JWS algorithm (RFC 7518 §3.1, RFC 8037). `none` and HMAC are never accepted:
/// HMAC with a public key as the secret is the classic key-confusion attack (RFC 8725 §2.1).
pub const ASYMMETRIC_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{0} is not set (set it, or {0}_FILE to a file holding it)")]
    Missing(&'static str),
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("cannot read {name}_FILE {path:?}: {source}")]
    UnreadableFile {
        name: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read config file {path:?}: {reason}")]
    ConfigFile { path: String, reason: String },
    #[error("the config file has an unknown key {0:?} (a typo would silently turn a setting off)")]
    UnknownKey(String),
    #[error("providers.{name}{}: {reason}", if key.is_empty() { String::new() } else { format!(".{key}") })]
    Provider { name: String, key: String, reason: String },
}

/// Every setting, by its variable name. The TOML file may use only these (in lower case): an unknown key
/// stops the process, because a misspelt `tokenvault_apps` would otherwise turn the app allow-list off.
pub const KNOWN_SETTINGS: &[&str] = &[
    "DATABASE_URL",
    "TOKENVAULT_ENCRYPTION_KEYS",
    "TOKENVAULT_PUBLIC_ADDR",
    "TOKENVAULT_INTERNAL_ADDR",
    "TOKENVAULT_PUBLIC_MAX_CONNECTIONS",
    "TOKENVAULT_INTERNAL_MAX_CONNECTIONS",
    "TOKENVAULT_TRACKUNIT_JWKS_URL",
    "TOKENVAULT_TRACKUNIT_TOKEN_URL",
    "TOKENVAULT_TRACKUNIT_ISSUER",
    "TOKENVAULT_TRACKUNIT_AUDIENCE",
    "TOKENVAULT_TRACKUNIT_TYPE",
    "TOKENVAULT_TRACKUNIT_ALGORITHMS",
    "TOKENVAULT_TRACKUNIT_LEEWAY_SECS",
    "TOKENVAULT_TRACKUNIT_JWKS_MIN_REFRESH_SECS",
    "TOKENVAULT_TRACKUNIT_MAX_TOKEN_LIFETIME_SECS",
    "TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS",
    "TOKENVAULT_APPS",
    "TOKENVAULT_UPSTREAM_TIMEOUT_SECS",
    "TOKENVAULT_UPSTREAM_MAX_ATTEMPTS",
    "TOKENVAULT_UPSTREAM_BACKOFF_MS",
    "TOKENVAULT_REJECTED_PROBE_SCHEDULE_SECS",
    "TOKENVAULT_DATABASE_MAX_CONNECTIONS",
    "TOKENVAULT_TOKEN_CACHE_CAPACITY",
    "TOKENVAULT_LISTENER_HEARTBEAT_SECS",
    "TOKENVAULT_LOG_FORMAT",
    "TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS",
    "TOKENVAULT_SHUTDOWN_GRACE_SECS",
    "TOKENVAULT_AUDIT_RETENTION_DAYS",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Where the callback's identity JWT is checked against, and how strictly.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub jwks_url: Url,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The `typ` header the token must carry (RFC 8725 §3.11), when Trackunit documents one.
    pub token_type: Option<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    /// Least time between two JWKS fetches, for unknown `kid`s and for `max-age` refreshes alike.
    pub jwks_min_refresh: Duration,
    /// Longest `exp − iat` accepted (or `exp − now` without `iat`).
    pub max_token_lifetime: Duration,
    /// Claims every identity token must carry.
    pub required_claims: Vec<String>,
}

impl IdentitySettings {
    /// Whether anything binds an identity token to this deployment beyond the signature: an expected
    /// issuer or audience, or required claims. Without any, a token Trackunit signed for another app
    /// passes too (see docs/SECURITY.md).
    pub fn binds_tokens(&self) -> bool {
        self.issuer.is_some() || self.audience.is_some() || !self.required_claims.is_empty()
    }
}

/// How patiently token endpoints are called (every provider's alike).
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
}

pub struct Settings {
    pub database_url: SecretString,
    pub database_max_connections: u32,
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    pub encryption_keys: Arc<KeyRing>,
    pub identity: IdentitySettings,
    pub upstream: UpstreamSettings,
    /// Every provider: the built-in `trackunit` and the settings file's `[providers.NAME]` tables.
    pub providers: Providers,
    /// Plain http to hosts other than loopback allowed for upstreams (development only: a sandbox in
    /// another container). `serve` warns while it is on.
    pub insecure_http_upstreams: bool,
    /// irisAppIds we accept installs for; `None` accepts any.
    pub apps: Option<HashSet<String>>,
    pub log_format: LogFormat,
    /// Most access tokens one replica keeps in memory.
    pub token_cache_capacity: u64,
    /// Most connections each listener holds open at once.
    pub public_max_connections: usize,
    pub internal_max_connections: usize,
    /// When a rejected installation is probed again: the waits after the rejection, then after each probe;
    /// the last one repeats.
    pub rejected_probe_schedule: Vec<Duration>,
    /// How often the change listener proves its connection alive with a NOTIFY round trip.
    pub listener_heartbeat: Duration,
    /// How long in-flight requests get to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Audit records older than this many days are pruned; 0 keeps them for ever.
    pub audit_retention_days: u32,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &mask_url(self.database_url.expose_secret()))
            .field("database_max_connections", &self.database_max_connections)
            .field("public_addr", &self.public_addr)
            .field("internal_addr", &self.internal_addr)
            .field("encryption_keys", &self.encryption_keys)
            .field("identity", &self.identity)
            .field("upstream", &self.upstream)
            .field("providers", &self.providers)
            .field("insecure_http_upstreams", &self.insecure_http_upstreams)
            .field("apps", &self.apps)
            .field("log_format", &self.log_format)
            .field("token_cache_capacity", &self.token_cache_capacity)
            .field("public_max_connections", &self.public_max_connections)
            .field("internal_max_connections", &self.internal_max_connections)
            .field("rejected_probe_schedule", &self.rejected_probe_schedule)
            .field("listener_heartbeat", &self.listener_heartbeat)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("audit_retention_days", &self.audit_retention_days)
            .finish()
    }
}

/// A connection string with its password replaced, safe to log.
pub fn mask_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("REDACTED"));
            }
            if url.query().is_some_and(|q| q.contains("password")) {
                url.set_query(Some("REDACTED"));
            }
            url.to_string()
        }
        Err(_) => "[unparseable, hidden]".to_owned(),
    }
}

/// Where settings come from; a function so tests can hand in a map instead of the process environment.
/// Reads one variable by name.
type Lookup = Box<dyn Fn(&str) -> Option<String>>;

pub struct Source {
    lookup: Lookup,
    file: HashMap<String, String>,
    /// The file's `providers` table.
    providers: toml::Table,
}

impl Source {
    /// The process environment, plus `config_file` when given.
    pub fn environment(config_file: Option<&Path>) -> Result<Self, SettingsError> {
        let (file, providers) = match config_file {
            Some(path) => read_config_file(path)?,
            None => (HashMap::new(), toml::Table::new()),
        };
        Ok(Self { lookup: Box::new(|name| std::env::var(name).ok()), file, providers })
    }

    /// Only the given pairs (tests).
    pub fn from_pairs<const N: usize>(pairs: [(&str, &str); N]) -> Self {
        Self::from_map(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// Only the given variables (tests).
    pub fn from_map(map: HashMap<String, String>) -> Self {
        Self {
            lookup: Box::new(move |name| map.get(name).cloned()),
            file: HashMap::new(),
            providers: toml::Table::new(),
        }
    }

    /// These variables, and a settings file's text (tests).
    pub fn from_map_and_file(map: HashMap<String, String>, toml_text: &str) -> Result<Self, SettingsError> {
        let (file, providers) = parse_config_text(toml_text, "(text)")?;
        Ok(Self { lookup: Box::new(move |name| map.get(name).cloned()), file, providers })
    }

    fn get(&self, name: &'static str) -> Result<Option<String>, SettingsError> {
        if let Some(value) = (self.lookup)(name) {
            return Ok(Some(value));
        }
        if let Some(path) = (self.lookup)(&format!("{name}_FILE")) {
            let value = std::fs::read_to_string(&path).map_err(|source| SettingsError::UnreadableFile {
                name,
                path,
                source,
            })?;
            return Ok(Some(value.trim_end_matches(['\n', '\r']).to_owned()));
        }
        Ok(self.file.get(&name.to_ascii_lowercase()).cloned())
    }

    /// Refuses a TOML key that names no setting.
    fn check_file_keys(&self) -> Result<(), SettingsError> {
        let mut keys: Vec<&String> = self.file.keys().collect();
        keys.sort();
        match keys.into_iter().find(|key| !KNOWN_SETTINGS.iter().any(|known| known.eq_ignore_ascii_case(key))) {
            Some(unknown) => Err(SettingsError::UnknownKey(unknown.clone())),
            None => Ok(()),
        }
    }

    fn required(&self, name: &'static str) -> Result<String, SettingsError> {
        self.get(name)?.filter(|v| !v.trim().is_empty()).ok_or(SettingsError::Missing(name))
    }

    /// A whole number of seconds within `range`, or `default`.
    fn seconds(
        &self,
        name: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Duration, SettingsError> {
        let secs: u64 = self.parsed(name, default)?;
        if !range.contains(&secs) {
            return Err(invalid(name, format!("must be from {} to {} seconds", range.start(), range.end())));
        }
        Ok(Duration::from_secs(secs))
    }

    fn parsed<T>(&self, name: &'static str, default: T) -> Result<T, SettingsError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.get(name)? {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|e: T::Err| invalid(name, e.to_string())),
        }
    }
}

fn invalid(name: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { name, reason: reason.into() }
}

/// The flat settings of a TOML file, and its `providers` table.
type ConfigFile = (HashMap<String, String>, toml::Table);

fn read_config_file(path: &Path) -> Result<ConfigFile, SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError::ConfigFile { path: path.display().to_string(), reason: e.to_string() })?;
    parse_config_text(&text, &path.display().to_string())
}

fn parse_config_text(text: &str, path: &str) -> Result<ConfigFile, SettingsError> {
    let fail = |reason: String| SettingsError::ConfigFile { path: path.to_owned(), reason };
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| fail(e.message().to_owned()))?;
    let providers = match table.remove("providers") {
        None => toml::Table::new(),
        Some(toml::Value::Table(providers)) => providers,
        Some(_) => return Err(fail("`providers` must be a table of [providers.NAME] tables".into())),
    };
    let flat = table
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| item.as_str().map(str::to_owned).unwrap_or_else(|| item.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                other => return Err(fail(format!("{key}: unsupported value {other}"))),
            };
            Ok((key.to_ascii_lowercase(), text))
        })
        .collect::<Result<_, _>>()?;
    Ok((flat, providers))
}

/// A URL we send secrets to or trust keys from: https, or http only to this machine (tests, local fakes),
/// or anywhere when `allow_insecure_http` (TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS, development only).
pub(crate) fn checked_url(raw: &str, allow_insecure_http: bool) -> Result<Url, String> {
    let url = Url::parse(raw.trim()).map_err(|e| e.to_string())?;
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback || allow_insecure_http => Ok(url),
        _ => Err("must be an https URL (plain http is allowed only to localhost, unless \
                  TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS is on)"
            .into()),
    }
}

fn endpoint_url(
    source: &Source,
    name: &'static str,
    default: &str,
    allow_insecure_http: bool,
) -> Result<Url, SettingsError> {
    let raw = source.get(name)?.unwrap_or_else(|| default.to_owned());
    checked_url(&raw, allow_insecure_http).map_err(|reason| invalid(name, reason))
}

fn optional_text(source: &Source, name: &'static str) -> Result<Option<String>, SettingsError> {
    Ok(source.get(name)?.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()))
}

fn comma_list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// TOKENVAULT_LOG_FORMAT: `json`, `pretty`, or by default pretty on a terminal and JSON otherwise.
pub fn log_format(source: &Source) -> Result<LogFormat, SettingsError> {
    use std::io::IsTerminal;
    match source.get("TOKENVAULT_LOG_FORMAT")?.as_deref().map(str::trim) {
        None if std::io::stderr().is_terminal() => Ok(LogFormat::Pretty),
        None | Some("json") => Ok(LogFormat::Json),
        Some("pretty") => Ok(LogFormat::Pretty),
        Some(other) => Err(invalid("TOKENVAULT_LOG_FORMAT", format!("{other:?} is not json or pretty"))),
    }
}

/// DATABASE_URL alone, for the commands that need nothing else (`migrate`).
pub fn database_url(source: &Source) -> Result<SecretString, SettingsError> {
    source.check_file_keys()?;
    Ok(SecretString::from(source.required("DATABASE_URL")?))
}

/// The two listeners' addresses alone, for `healthcheck`.
pub fn listener_addresses(source: &Source) -> Result<(SocketAddr, SocketAddr), SettingsError> {
    Ok((
        source.parsed("TOKENVAULT_PUBLIC_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
        source.parsed("TOKENVAULT_INTERNAL_ADDR", SocketAddr::from(([127, 0, 0, 1], 8081)))?,
    ))
}

impl Settings {
    pub fn load(source: &Source) -> Result<Self, SettingsError> {
        source.check_file_keys()?;
        let insecure_http_upstreams =
            match optional_text(source, "TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS")?.as_deref() {
                None | Some("false" | "0" | "no") => false,
                Some("true" | "1" | "yes") => true,
                Some(other) => {
                    return Err(invalid(
                        "TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS",
                        format!("{other:?} is not true or false"),
                    ));
                }
            };
        let database_url = SecretString::from(source.required("DATABASE_URL")?);
        let keys_spec = SecretString::from(source.required("TOKENVAULT_ENCRYPTION_KEYS")?);
        let encryption_keys = KeyRing::parse(keys_spec.expose_secret())
            .map_err(|e| invalid("TOKENVAULT_ENCRYPTION_KEYS", e.to_string()))?;

        let algorithms = match optional_text(source, "TOKENVAULT_TRACKUNIT_ALGORITHMS")? {
            None => ASYMMETRIC_ALGORITHMS.to_vec(),
            Some(raw) => comma_list(&raw)
                .map(|name| {
                    Algorithm::from_str(name).ok().filter(|alg| ASYMMETRIC_ALGORITHMS.contains(alg)).ok_or_else(|| {
                        invalid(
                            "TOKENVAULT_TRACKUNIT_ALGORITHMS",
                            format!("{name:?} is not an accepted asymmetric JWS algorithm"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if algorithms.is_empty() {
            return Err(invalid("TOKENVAULT_TRACKUNIT_ALGORITHMS", "names no algorithm"));
        }

        let apps = optional_text(source, "TOKENVAULT_APPS")?
            .map(|raw| comma_list(&raw).map(str::to_owned).collect::<HashSet<_>>())
            .filter(|apps| !apps.is_empty());

        let log_format = log_format(source)?;

        let max_attempts: u32 = source.parsed("TOKENVAULT_UPSTREAM_MAX_ATTEMPTS", 3)?;
        if !(1..=10).contains(&max_attempts) {
            return Err(invalid("TOKENVAULT_UPSTREAM_MAX_ATTEMPTS", "must be between 1 and 10"));
        }
        let max_connections: u32 = source.parsed("TOKENVAULT_DATABASE_MAX_CONNECTIONS", 20)?;
        if max_connections < 4 {
            return Err(invalid("TOKENVAULT_DATABASE_MAX_CONNECTIONS", "must be at least 4"));
        }
        let listener_limit = |name: &'static str, default: usize| -> Result<usize, SettingsError> {
            let limit: usize = source.parsed(name, default)?;
            if !(16..=1_000_000).contains(&limit) {
                return Err(invalid(name, "must be from 16 to 1000000"));
            }
            Ok(limit)
        };
        let rejected_probe_schedule = match optional_text(source, "TOKENVAULT_REJECTED_PROBE_SCHEDULE_SECS")? {
            None => DEFAULT_PROBE_SCHEDULE_SECS.iter().copied().map(Duration::from_secs).collect(),
            Some(raw) => comma_list(&raw)
                .map(|step| match step.parse::<u64>() {
                    Ok(secs) if (1..=7 * 24 * 3600).contains(&secs) => Ok(Duration::from_secs(secs)),
                    _ => Err(invalid(
                        "TOKENVAULT_REJECTED_PROBE_SCHEDULE_SECS",
                        format!("{step:?} is not a whole number of seconds from 1 to 604800"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if rejected_probe_schedule.is_empty() {
            return Err(invalid("TOKENVAULT_REJECTED_PROBE_SCHEDULE_SECS", "names no wait"));
        }
        let required_claims: Vec<String> = optional_text(source, "TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS")?
            .map(|raw| comma_list(&raw).map(str::to_owned).collect())
            .unwrap_or_default();

        Ok(Self {
            database_url,
            database_max_connections: max_connections,
            public_addr: source.parsed("TOKENVAULT_PUBLIC_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            internal_addr: source.parsed("TOKENVAULT_INTERNAL_ADDR", SocketAddr::from(([127, 0, 0, 1], 8081)))?,
            encryption_keys: Arc::new(encryption_keys),
            identity: IdentitySettings {
                jwks_url: endpoint_url(
                    source,
                    "TOKENVAULT_TRACKUNIT_JWKS_URL",
                    "https://iris.trackunit.com/api/marketplace/jwks",
                    insecure_http_upstreams,
                )?,
                issuer: optional_text(source, "TOKENVAULT_TRACKUNIT_ISSUER")?,
                audience: optional_text(source, "TOKENVAULT_TRACKUNIT_AUDIENCE")?,
                token_type: optional_text(source, "TOKENVAULT_TRACKUNIT_TYPE")?,
                algorithms,
                leeway: source.seconds("TOKENVAULT_TRACKUNIT_LEEWAY_SECS", 60, 0..=300)?,
                jwks_min_refresh: source.seconds("TOKENVAULT_TRACKUNIT_JWKS_MIN_REFRESH_SECS", 30, 1..=86_400)?,
                max_token_lifetime: source.seconds(
                    "TOKENVAULT_TRACKUNIT_MAX_TOKEN_LIFETIME_SECS",
                    3600,
                    1..=30 * 24 * 3600,
                )?,
                required_claims,
            },
            providers: Providers::new(
                std::iter::once(Provider::trackunit(endpoint_url(
                    source,
                    "TOKENVAULT_TRACKUNIT_TOKEN_URL",
                    "https://auth.trackunit.com/apptoken",
                    insecure_http_upstreams,
                )?))
                .chain(providers::parse(source.providers.clone(), insecure_http_upstreams)?),
            ),
            insecure_http_upstreams,
            upstream: UpstreamSettings {
                timeout: Duration::from_secs(source.parsed("TOKENVAULT_UPSTREAM_TIMEOUT_SECS", 10)?),
                max_attempts,
                backoff_base: Duration::from_millis(source.parsed("TOKENVAULT_UPSTREAM_BACKOFF_MS", 200)?),
            },
            apps,
            log_format,
            token_cache_capacity: source.parsed("TOKENVAULT_TOKEN_CACHE_CAPACITY", 200_000)?,
            public_max_connections: listener_limit("TOKENVAULT_PUBLIC_MAX_CONNECTIONS", 1024)?,
            internal_max_connections: listener_limit("TOKENVAULT_INTERNAL_MAX_CONNECTIONS", 4096)?,
            rejected_probe_schedule,
            listener_heartbeat: source.seconds("TOKENVAULT_LISTENER_HEARTBEAT_SECS", 10, 1..=3600)?,
            shutdown_grace: source.seconds("TOKENVAULT_SHUTDOWN_GRACE_SECS", 30, 0..=3600)?,
            audit_retention_days: source.parsed("TOKENVAULT_AUDIT_RETENTION_DAYS", 90)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::generate_key;

    fn keys() -> String {
        format!("k1:{}", generate_key())
    }

    #[test]
    fn defaults_apply_when_only_the_required_settings_are_given() {
        let keys = keys();
        let source =
            Source::from_pairs([("DATABASE_URL", "postgres://u:pw@db/x"), ("TOKENVAULT_ENCRYPTION_KEYS", &keys)]);
        let settings = Settings::load(&source).unwrap();
        assert_eq!(settings.public_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(settings.internal_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(settings.identity.jwks_url.as_str(), "https://iris.trackunit.com/api/marketplace/jwks");
        let trackunit = settings.providers.get("trackunit").unwrap();
        assert_eq!(trackunit.token_url.as_str(), "https://auth.trackunit.com/apptoken");
        assert_eq!(settings.identity.leeway, Duration::from_secs(60));
        assert!(settings.apps.is_none());
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(settings.token_cache_capacity, 200_000);
        assert_eq!(settings.identity.max_token_lifetime, Duration::from_secs(3600));
        assert!(!settings.identity.binds_tokens());
        assert_eq!(settings.rejected_probe_schedule.len(), 4);
    }

    /// tokenvault.example.toml with every commented-out setting and the example provider switched on.
    fn example_file_with_every_setting_on() -> String {
        let text = include_str!("../tokenvault.example.toml");
        let mut in_providers = false;
        let mut lines = Vec::new();
        for line in text.lines() {
            in_providers |= line == "# [providers.example]";
            let setting = line.strip_prefix("# ").filter(|rest| {
                rest.split_once(" = ").is_some_and(|(key, _)| {
                    !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                })
            });
            let table = line.strip_prefix("# ").filter(|rest| in_providers && rest.starts_with('['));
            lines.push(setting.or(table).unwrap_or(line));
        }
        lines.join("\n")
    }

    #[test]
    fn the_example_file_names_every_setting_and_its_shown_values_load() {
        let text = example_file_with_every_setting_on();
        for name in KNOWN_SETTINGS {
            let key = format!("\n{} = ", name.to_ascii_lowercase());
            assert!(text.contains(&key), "tokenvault.example.toml lacks {name}");
        }
        assert!(text.contains("\n[providers.example]\n"), "the provider example is switched on");
        // The placeholder key is not a key: the environment wins over the file, as documented.
        let env = HashMap::from([("TOKENVAULT_ENCRYPTION_KEYS".to_owned(), keys())]);
        let settings = Settings::load(&Source::from_map_and_file(env, &text).unwrap()).unwrap();
        assert_eq!(settings.apps.as_ref().map(|apps| apps.len()), Some(1));
        assert!(settings.providers.get("example").is_some(), "the example provider loads");
    }

    #[test]
    fn a_missing_or_malformed_setting_names_the_variable() {
        let keys = keys();
        let error = Settings::load(&Source::from_pairs([("TOKENVAULT_ENCRYPTION_KEYS", keys.as_str())])).unwrap_err();
        assert!(error.to_string().starts_with("DATABASE_URL is not set"), "{error}");
        let error = Settings::load(&Source::from_pairs([
            ("DATABASE_URL", "postgres://x"),
            ("TOKENVAULT_ENCRYPTION_KEYS", "k1:short"),
        ]))
        .unwrap_err();
        assert!(error.to_string().starts_with("TOKENVAULT_ENCRYPTION_KEYS:"), "{error}");
        let error = Settings::load(&Source::from_pairs([
            ("DATABASE_URL", "postgres://x"),
            ("TOKENVAULT_ENCRYPTION_KEYS", keys.as_str()),
            ("TOKENVAULT_PUBLIC_ADDR", "nope"),
        ]))
        .unwrap_err();
        assert!(error.to_string().starts_with("TOKENVAULT_PUBLIC_ADDR:"), "{error}");
        let error = Settings::load(&Source::from_pairs([
            ("DATABASE_URL", "postgres://x"),
            ("TOKENVAULT_ENCRYPTION_KEYS", keys.as_str()),
            ("TOKENVAULT_TOKEN_CACHE_CAPACITY", "lots"),
        ]))
        .unwrap_err();
        assert!(error.to_string().starts_with("TOKENVAULT_TOKEN_CACHE_CAPACITY:"), "{error}");
    }

    #[test]
    fn hmac_and_plain_http_to_remote_hosts_are_refused() {
        let keys = keys();
        let base = |name, value| {
            Settings::load(&Source::from_pairs([
                ("DATABASE_URL", "postgres://x"),
                ("TOKENVAULT_ENCRYPTION_KEYS", keys.as_str()),
                (name, value),
            ]))
        };
        assert!(base("TOKENVAULT_TRACKUNIT_ALGORITHMS", "HS256").is_err());
        assert!(base("TOKENVAULT_TRACKUNIT_ALGORITHMS", "none").is_err());
        assert!(base("TOKENVAULT_TRACKUNIT_TOKEN_URL", "http://auth.example.com/token").is_err());
        assert!(base("TOKENVAULT_TRACKUNIT_TOKEN_URL", "http://127.0.0.1:9/token").is_ok());
        let insecure = Settings::load(&Source::from_pairs([
            ("DATABASE_URL", "postgres://x"),
            ("TOKENVAULT_ENCRYPTION_KEYS", keys.as_str()),
            ("TOKENVAULT_TRACKUNIT_TOKEN_URL", "http://sandbox:8090/apptoken"),
            ("TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS", "true"),
        ]))
        .unwrap();
        assert!(insecure.insecure_http_upstreams, "only when explicitly allowed");
    }

    #[test]
    fn provider_tables_of_the_settings_file_are_loaded_beside_the_built_in_trackunit() {
        let keys = keys();
        let vars = HashMap::from([
            ("DATABASE_URL".to_owned(), "postgres://x".to_owned()),
            ("TOKENVAULT_ENCRYPTION_KEYS".to_owned(), keys),
        ]);
        let text = "tokenvault_apps = \"@a/b\"\n[providers.trulioo]\ntoken_url = \"https://auth-api.trulioo.com/connect/token\"\n";
        let settings = Settings::load(&Source::from_map_and_file(vars.clone(), text).unwrap()).unwrap();
        let names: Vec<&str> = settings.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["trackunit", "trulioo"]);
        let bad = "[providers.trulioo]\ntoken_url = \"https://a/t\"\nexpiry_margin = 30\n";
        let error = Settings::load(&Source::from_map_and_file(vars, bad).unwrap()).err().unwrap().to_string();
        assert!(error.starts_with("providers.trulioo.expiry_margin: unknown field"), "{error}");
    }

    #[test]
    fn an_unknown_key_in_the_config_file_stops_the_process_naming_it() {
        let dir = std::env::temp_dir().join(format!("tv-settings-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("tokenvault.toml");
        std::fs::write(&config, "database_url = \"postgres://x/y\"\ntokenvault_app = [\"@a/b\"]\n").unwrap();
        let keys = keys();
        let mut source = Source::environment(Some(&config)).unwrap();
        source.lookup = Box::new(move |name| (name == "TOKENVAULT_ENCRYPTION_KEYS").then(|| keys.clone()));
        let error = Settings::load(&source).unwrap_err();
        assert!(matches!(&error, SettingsError::UnknownKey(key) if key == "tokenvault_app"), "{error}");
        assert!(error.to_string().contains("tokenvault_app"), "{error}");
    }

    #[test]
    fn refresh_interval_and_leeway_are_bounded() {
        let keys = keys();
        let load = |name, value| {
            Settings::load(&Source::from_pairs([
                ("DATABASE_URL", "postgres://x"),
                ("TOKENVAULT_ENCRYPTION_KEYS", keys.as_str()),
                (name, value),
            ]))
        };
        let error = load("TOKENVAULT_TRACKUNIT_JWKS_MIN_REFRESH_SECS", "0").unwrap_err();
        assert!(error.to_string().starts_with("TOKENVAULT_TRACKUNIT_JWKS_MIN_REFRESH_SECS:"), "{error}");
        assert!(load("TOKENVAULT_TRACKUNIT_JWKS_MIN_REFRESH_SECS", "1").is_ok());
        let error = load("TOKENVAULT_TRACKUNIT_LEEWAY_SECS", "301").unwrap_err();
        assert!(error.to_string().starts_with("TOKENVAULT_TRACKUNIT_LEEWAY_SECS:"), "{error}");
        assert!(load("TOKENVAULT_TRACKUNIT_LEEWAY_SECS", "300").is_ok());
        assert!(load("TOKENVAULT_REJECTED_PROBE_SCHEDULE_SECS", "60,0").is_err());
        let schedule = load("TOKENVAULT_REJECTED_PROBE_SCHEDULE_SECS", "1, 2").unwrap().rejected_probe_schedule;
        assert_eq!(schedule, [Duration::from_secs(1), Duration::from_secs(2)]);
        let claims = load("TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS", "irisAppId, accountId").unwrap();
        assert_eq!(claims.identity.required_claims, ["irisAppId", "accountId"]);
        assert!(claims.identity.binds_tokens());
    }

    #[test]
    fn debug_masks_the_database_password_and_the_keys() {
        let keys = keys();
        let source =
            Source::from_pairs([("DATABASE_URL", "postgres://u:hunter2@db/x"), ("TOKENVAULT_ENCRYPTION_KEYS", &keys)]);
        let debug = format!("{:?}", Settings::load(&source).unwrap());
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains(&keys[3..15]), "{debug}");
    }

    #[test]
    fn file_variants_and_the_config_file_are_read() {
        let dir = std::env::temp_dir().join(format!("tv-settings-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("keys");
        std::fs::write(&key_file, format!("{}\n", keys())).unwrap();
        let config = dir.join("tokenvault.toml");
        std::fs::write(&config, "database_url = \"postgres://from-file/x\"\ntokenvault_apps = [\"@a/b\", \"@c/d\"]\n")
            .unwrap();
        let mut source = Source::environment(Some(&config)).unwrap();
        let key_path = key_file.display().to_string();
        source.lookup = Box::new(move |name| (name == "TOKENVAULT_ENCRYPTION_KEYS_FILE").then(|| key_path.clone()));
        let settings = Settings::load(&source).unwrap();
        assert_eq!(settings.database_url.expose_secret(), "postgres://from-file/x");
        assert_eq!(settings.apps.unwrap().len(), 2);
        assert_eq!(settings.encryption_keys.primary_id().as_str(), "k1");
    }
}
