use std::fmt;
use std::sync::Arc;

/// Most scopes one token request may name. Trackunit's scopes number in the tens; a thousand is an attack.
pub const MAX_SCOPES: usize = 64;
const MAX_SCOPE_CHARS: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScopeError {
    #[error("a scope must not be empty")]
    Empty,
    #[error("a scope must be at most {MAX_SCOPE_CHARS} characters")]
    TooLong,
    #[error("a scope may only hold printable ASCII other than space, ',', '\"' and '\\' (RFC 6749 section 3.3)")]
    InvalidCharacter,
    #[error("at least one scope is required")]
    NoScopes,
    #[error("at most {MAX_SCOPES} scopes may be requested")]
    TooMany,
}

/// One OAuth2 scope-token (RFC 6749 §3.3): `1*( %x21 / %x23-5B / %x5D-7E )`, minus the comma. A scope
/// holding a space would silently become two scopes in the space-joined form upstream; a comma would at
/// providers that split on commas. Either way one granted scope could smuggle in another, so both are refused.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

impl Scope {
    pub fn parse(value: &str) -> Result<Self, ScopeError> {
        check(value)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

fn check(value: &str) -> Result<(), ScopeError> {
    if value.is_empty() {
        return Err(ScopeError::Empty);
    }
    if value.len() > MAX_SCOPE_CHARS {
        return Err(ScopeError::TooLong);
    }
    let allowed = |b: u8| b != b',' && (b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b));
    if !value.bytes().all(allowed) {
        return Err(ScopeError::InvalidCharacter);
    }
    Ok(())
}

/// A sorted, de-duplicated set of scopes: non-empty when parsed from a request, empty only for a provider
/// that is asked for no scope ([`ScopeSet::empty`]). Its [`key`](Self::key) is the same for every order
/// and repetition of the same scopes, so `["b","a","a"]` and `["a","b"]` share one cached token.
///
/// The set is kept as that key alone: no scope holds a space, so the key splits back into the scopes, and
/// every token request looks its token up by the key. One shared string, joined once, instead of a tree
/// of strings per request.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScopeSet {
    key: Arc<str>,
}

impl ScopeSet {
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self, ScopeError> {
        let mut scopes: Vec<&str> = Vec::new();
        for (count, value) in values.into_iter().enumerate() {
            if count >= MAX_SCOPES {
                return Err(ScopeError::TooMany);
            }
            check(value)?;
            scopes.push(value);
        }
        if scopes.is_empty() {
            return Err(ScopeError::NoScopes);
        }
        scopes.sort_unstable();
        scopes.dedup();
        Ok(Self { key: scopes.join(" ").into() })
    }

    /// No scope: for a provider whose token requests carry none (its key is the empty string).
    pub fn empty() -> Self {
        Self { key: Arc::from("") }
    }

    pub fn is_empty(&self) -> bool {
        self.key.is_empty()
    }

    /// The scopes space-joined in sorted order: the cache key (and, joined with the provider's
    /// separator, the `scope` form parameter).
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.key.split(' ').filter(|scope| !scope.is_empty())
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_is_sorted_and_deduplicated() {
        let set = ScopeSet::parse(["b", "a", "b"]).unwrap();
        assert_eq!(&**set.key(), "a b");
        assert_eq!(set.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(format!("{set:?}"), r#"{"a", "b"}"#);
    }

    #[test]
    fn the_empty_set_has_no_scopes_and_an_empty_key() {
        let empty = ScopeSet::empty();
        assert!(empty.is_empty() && empty.iter().next().is_none() && empty.key().is_empty());
        assert!(!ScopeSet::parse(["a"]).unwrap().is_empty());
    }

    #[test]
    fn refuses_separators_inside_one_scope() {
        for bad in ["a b", "a\nb", "a\tb", "a\"b", "a\\b", "é", "a,b"] {
            assert_eq!(Scope::parse(bad), Err(ScopeError::InvalidCharacter), "{bad:?}");
        }
    }

    #[test]
    fn refuses_empty_and_oversized_sets() {
        assert_eq!(ScopeSet::parse([]), Err(ScopeError::NoScopes));
        let many: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
        assert_eq!(ScopeSet::parse(many.iter().map(String::as_str)), Err(ScopeError::TooMany));
    }

    proptest! {
        #[test]
        fn key_never_depends_on_order(mut scopes in proptest::collection::vec("[a-z.]{1,8}", 1..10)) {
            let forward = ScopeSet::parse(scopes.iter().map(String::as_str)).unwrap().key().clone();
            scopes.reverse();
            let backward = ScopeSet::parse(scopes.iter().map(String::as_str)).unwrap().key().clone();
            prop_assert_eq!(forward, backward);
        }

        #[test]
        fn iter_gives_back_the_distinct_scopes_sorted(scopes in proptest::collection::vec("[!#-+--\\[\\]-~]{1,8}", 1..10)) {
            let set = ScopeSet::parse(scopes.iter().map(String::as_str)).unwrap();
            let mut expected: Vec<&str> = scopes.iter().map(String::as_str).collect();
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), expected);
        }
    }
}
