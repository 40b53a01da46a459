/// Every way an identity token is refused. Messages never quote the token or attacker-chosen strings,
/// so they are safe in logs and problem bodies.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token is encrypted (JWE); only signed compact JWS is accepted")]
    Encrypted,
    #[error("unsigned tokens (alg \"none\") are refused")]
    AlgorithmNone,
    #[error("symmetric (HMAC) algorithms are refused")]
    SymmetricAlgorithm,
    #[error("the algorithm is unknown or not allowed by TOKENVAULT_TRACKUNIT_ALGORITHMS")]
    AlgorithmNotAllowed,
    #[error("the token's type (typ) is not the one TOKENVAULT_TRACKUNIT_TYPE expects")]
    WrongType,
    #[error("the token has a `crit` or `b64` header; no JWS extension is supported")]
    CriticalHeader,
    #[error("no key in the JWKS has the token's kid")]
    UnknownKey,
    #[error("the token has no kid and the JWKS holds more than one key")]
    AmbiguousKey,
    #[error("the algorithm does not match the signing key's type or declared alg")]
    KeyAlgorithmMismatch,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the token has no exp claim")]
    MissingExpiry,
    #[error("the {0} claim must be an integer NumericDate")]
    BadDate(&'static str),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("the issuer (iss) is not the expected one")]
    WrongIssuer,
    #[error("the audience (aud) is not the expected one")]
    WrongAudience,
    #[error("the token's {0} claim does not match the body")]
    ClaimMismatch(&'static str),
    #[error("the token lives longer than TOKENVAULT_TRACKUNIT_MAX_TOKEN_LIFETIME_SECS allows")]
    LifetimeTooLong,
    /// The name comes from TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS, never from the token.
    #[error("the token lacks the claim {0:?} that TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS requires")]
    MissingClaim(String),
    #[error("this identity token already delivered another message (one token, one message)")]
    ReplayedWithOtherBody,
}
