//! Parsed values the rest of the service can trust: once a value of these types exists it has been checked
//! ("parse, don't validate"). Nothing here does I/O.

mod field;
mod scope;
pub mod service_key;

pub use field::{FieldError, TextField};
pub use scope::{Scope, ScopeError, ScopeSet};
pub use service_key::ServiceKey;

/// The two identifiers Trackunit puts in a callback, with the same rules as every other text field.
pub type AppId = TextField;
/// See [`AppId`].
pub type AccountId = TextField;
