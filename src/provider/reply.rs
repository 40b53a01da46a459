//! Reading a successful token reply the provider's way: its member names (dotted paths), a number or a
//! numeric string for lifetimes, the JWT's own `exp` when configured, and the margin before expiry.
//! Errors name the member that is missing or ill-typed, never its value.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::Value;

use super::{ExpiryFromJwt, MintedToken, Provider};

/// A year: no real token lives longer, and bounding it keeps date arithmetic safe.
const LONGEST_LIFETIME_SECS: i64 = 365 * 24 * 3600;

/// The member at a dotted `path` (`data.token`), if every step is an object holding the next.
fn member<'a>(reply: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(reply, |value, step| value.get(step)).filter(|value| !value.is_null())
}

/// A lifetime in whole seconds: a number or a numeric string.
fn seconds(reply: &Value, path: &str) -> Result<Option<i64>, String> {
    let ill_typed = || format!("the token reply's `{path}` is not a whole number of seconds");
    match member(reply, path) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(ill_typed),
        Some(Value::String(s)) => s.trim().parse::<i64>().map(Some).map_err(|_| ill_typed()),
        Some(_) => Err(ill_typed()),
    }
}

fn text<'a>(reply: &'a Value, path: &str) -> Result<Option<&'a str>, String> {
    match member(reply, path) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("the token reply's `{path}` is not a string")),
    }
}

fn after(now: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    now + chrono::Duration::seconds(secs.clamp(0, LONGEST_LIFETIME_SECS))
}

/// Reads a successful token reply of `provider` received at `now`.
///
/// Expiry: the reply's lifetime member and the access token's JWT `exp` as `expiry_from_jwt` says, else
/// `default_lifetime`; then `expiry_margin` earlier. A margin as long as the token's life would leave
/// nothing to serve, so the token then counts as living half its life.
pub fn parse_reply(body: &[u8], provider: &Provider, now: DateTime<Utc>) -> Result<MintedToken, String> {
    let fields = &provider.reply;
    let reply = crate::strict_json::from_slice(body).map_err(|_| "the token reply is not JSON".to_owned())?;
    if !reply.is_object() {
        return Err("the token reply is not a JSON object".into());
    }
    let access_token = text(&reply, &fields.access_token)?
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("the token reply has no `{}`", fields.access_token))?;
    let token_type = text(&reply, &fields.token_type)?.unwrap_or("Bearer").to_owned();
    let scope = text(&reply, &fields.scope)?.map(str::to_owned);

    let from_reply = match seconds(&reply, &fields.expires_in)? {
        Some(secs) if secs > 0 => Some(after(now, secs)),
        Some(_) => return Err(format!("the token reply's `{}` is not positive", fields.expires_in)),
        None => None,
    };
    let from_jwt = || jwt_expiry(access_token).filter(|exp| *exp > now);
    let expires_at = match provider.expiry_from_jwt {
        ExpiryFromJwt::Never => from_reply,
        ExpiryFromJwt::Fallback => from_reply.or_else(from_jwt),
        ExpiryFromJwt::Earliest => match (from_reply, from_jwt()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    }
    .unwrap_or_else(|| now + chrono::Duration::from_std(provider.default_lifetime).unwrap_or_default());
    let lifetime = expires_at - now;
    let margin = chrono::Duration::from_std(provider.expiry_margin).unwrap_or_default();
    let expires_at = if margin < lifetime { expires_at - margin } else { now + lifetime / 2 };

    let refresh_token = text(&reply, &fields.refresh_token)?.filter(|t| !t.is_empty());
    let refresh_expires_at = match seconds(&reply, &fields.refresh_expires_in)? {
        // Keycloak says 0 for a refresh token without an expiry of its own.
        Some(secs) if secs > 0 => Some(after(now, secs)),
        _ => None,
    };
    Ok(MintedToken {
        access_token: SecretString::from(access_token.to_owned()),
        token_type,
        scope,
        issued_at: now,
        expires_at,
        refresh_token: refresh_token.map(|t| SecretString::from(t.to_owned())),
        refresh_expires_at,
    })
}

/// The `exp` of a JWT access token, read without verifying it: it came straight from the token endpoint
/// over TLS, and we only use it to know when to mint again.
fn jwt_expiry(token: &str) -> Option<DateTime<Utc>> {
    let payload = token.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    DateTime::from_timestamp(claims.get("exp")?.as_i64()?, 0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use secrecy::ExposeSecret;

    use super::*;
    use crate::provider::ReplyFields;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn standard() -> Provider {
        Provider::trackunit("https://auth.example.com/token".parse().unwrap())
    }

    fn jwt(exp: i64) -> String {
        format!("h.{}.s", URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#)))
    }

    #[test]
    fn reads_a_standard_reply_with_a_refresh_token() {
        let body = br#"{"access_token":"tok","token_type":"Bearer","expires_in":300,"scope":"a b",
                        "refresh_token":"rt","refresh_expires_in":1800}"#;
        let token = parse_reply(body, &standard(), now()).unwrap();
        assert_eq!(token.access_token.expose_secret(), "tok");
        assert_eq!((token.expires_at - now()).num_seconds(), 300);
        assert_eq!(token.scope.as_deref(), Some("a b"));
        assert_eq!(token.refresh_token.unwrap().expose_secret(), "rt");
        assert_eq!((token.refresh_expires_at.unwrap() - now()).num_seconds(), 1800);
    }

    #[test]
    fn falls_back_to_the_jwt_exp_then_to_the_default_lifetime() {
        let body = format!(r#"{{"access_token":"{}"}}"#, jwt(1_800_000_900));
        let token = parse_reply(body.as_bytes(), &standard(), now()).unwrap();
        assert_eq!((token.expires_at - now()).num_seconds(), 900);
        let opaque = parse_reply(br#"{"access_token":"opaque"}"#, &standard(), now()).unwrap();
        assert_eq!((opaque.expires_at - now()).num_seconds(), 300);
    }

    #[test]
    fn trulioo_style_member_names_a_string_lifetime_the_earliest_expiry_and_a_margin() {
        let provider = Provider {
            reply: ReplyFields {
                access_token: "Token".into(),
                token_type: "TokenType".into(),
                expires_in: "ExpiresIn".into(),
                ..ReplyFields::default()
            },
            expiry_from_jwt: ExpiryFromJwt::Earliest,
            expiry_margin: Duration::from_secs(30),
            ..standard()
        };
        let body =
            format!(r#"{{"Token":"{}","TokenType":"Bearer","ExpiresIn":"3600","scope":"x"}}"#, jwt(1_800_000_600));
        let token = parse_reply(body.as_bytes(), &provider, now()).unwrap();
        assert_eq!((token.expires_at - now()).num_seconds(), 570, "the JWT's exp (600 s) was earlier, less 30 s");
        let never = Provider { expiry_from_jwt: ExpiryFromJwt::Never, ..provider.clone() };
        let token = parse_reply(body.as_bytes(), &never, now()).unwrap();
        assert_eq!((token.expires_at - now()).num_seconds(), 3570);
    }

    #[test]
    fn a_dotted_path_reaches_a_nested_member() {
        let provider = Provider {
            reply: ReplyFields {
                access_token: "data.token".into(),
                expires_in: "data.ttl".into(),
                ..ReplyFields::default()
            },
            ..standard()
        };
        let token = parse_reply(br#"{"data":{"token":"nested","ttl":60}}"#, &provider, now()).unwrap();
        assert_eq!(token.access_token.expose_secret(), "nested");
        assert_eq!((token.expires_at - now()).num_seconds(), 60);
    }

    #[test]
    fn a_margin_as_long_as_the_token_lives_leaves_half_its_life() {
        let provider = Provider { expiry_margin: Duration::from_secs(600), ..standard() };
        let token = parse_reply(br#"{"access_token":"t","expires_in":300}"#, &provider, now()).unwrap();
        assert_eq!((token.expires_at - now()).num_seconds(), 150);
    }

    #[test]
    fn bad_replies_name_the_member_never_the_value() {
        let provider =
            Provider { reply: ReplyFields { access_token: "Token".into(), ..ReplyFields::default() }, ..standard() };
        for (body, expected) in [
            (&br#"{"access_token":"s3cret"}"#[..], "`Token`"),
            (br#"{"Token":42}"#, "`Token` is not a string"),
            (br#"{"Token":"t","expires_in":"soon-s3cret"}"#, "`expires_in`"),
            (br#"{"Token":"t","expires_in":-5}"#, "not positive"),
            (br#"{"Token":"t","expires_in":1.5}"#, "`expires_in`"),
            (b"not json s3cret", "not JSON"),
            (b"[]", "not a JSON object"),
        ] {
            let error = parse_reply(body, &provider, now()).err().unwrap();
            assert!(error.contains(expected), "{error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    proptest::proptest! {
        #[test]
        fn fuzz_any_reply_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_reply(&bytes, &standard(), now());
        }
    }
}
