use std::fmt;

/// Longest text field (in characters) accepted from a callback or a token request.
pub const MAX_FIELD_CHARS: usize = 256;

/// Why a text field was refused. The messages never quote the value: it may be a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_FIELD_CHARS} characters")]
    TooLong,
    #[error("must not contain control characters")]
    ControlCharacter,
}

/// A non-empty string of at most [`MAX_FIELD_CHARS`] characters without control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TextField(String);

impl TextField {
    pub fn parse(value: impl Into<String>) -> Result<Self, FieldError> {
        let value = value.into();
        Self::check(&value)?;
        Ok(Self(value))
    }

    fn check(value: &str) -> Result<(), FieldError> {
        if value.is_empty() {
            return Err(FieldError::Empty);
        }
        // Identifiers are ASCII in practice, and a byte scan is much cheaper than decoding characters.
        if value.is_ascii() {
            if value.len() > MAX_FIELD_CHARS {
                return Err(FieldError::TooLong);
            }
            return if value.bytes().any(|b| b.is_ascii_control()) {
                Err(FieldError::ControlCharacter)
            } else {
                Ok(())
            };
        }
        if value.chars().count() > MAX_FIELD_CHARS {
            return Err(FieldError::TooLong);
        }
        if value.chars().any(char::is_control) {
            return Err(FieldError::ControlCharacter);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TextField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for TextField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_identifiers() {
        assert_eq!(TextField::parse("@org/app").unwrap().as_str(), "@org/app");
    }

    #[test]
    fn refuses_empty_long_and_control_characters() {
        assert_eq!(TextField::parse(""), Err(FieldError::Empty));
        assert_eq!(TextField::parse("a".repeat(257)), Err(FieldError::TooLong));
        assert_eq!(TextField::parse("a\0b"), Err(FieldError::ControlCharacter));
        assert_eq!(TextField::parse("a\nb"), Err(FieldError::ControlCharacter));
        assert!(TextField::parse("é".repeat(256)).is_ok(), "the limit counts characters, not bytes");
    }

    proptest::proptest! {
        /// The ASCII fast path decides exactly as the character-by-character rule does.
        #[test]
        fn the_ascii_fast_path_agrees_with_the_character_rule(value in "(?s).{0,300}|[\\x00-\\x7f]{0,300}") {
            let by_chars = if value.is_empty() {
                Err(FieldError::Empty)
            } else if value.chars().count() > MAX_FIELD_CHARS {
                Err(FieldError::TooLong)
            } else if value.chars().any(char::is_control) {
                Err(FieldError::ControlCharacter)
            } else {
                Ok(())
            };
            proptest::prop_assert_eq!(TextField::check(&value), by_chars);
        }
    }
}
