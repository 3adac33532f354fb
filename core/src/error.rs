//! Errors from validating input and applying table changes.
//!
//! Every error names what is wrong: the service, the field (as a path such as
//! `ports[1].target_port` or `endpoints[3].address`) and the problem. A batch that fails
//! leaves the published table exactly as it was.

use std::borrow::Cow;
use std::fmt;

use crate::model::ServicePortKey;

/// Longest text that error messages repeat in full.
pub const CLIP: usize = 64;

/// `text` as error messages show it: up to [`CLIP`] bytes, then how long it really is (a value
/// from the input can be of any length; a message must not be).
pub fn clip(text: &str) -> Cow<'_, str> {
    if text.len() <= CLIP {
        return Cow::Borrowed(text);
    }
    let mut end = CLIP;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}... ({} bytes)", &text[..end], text.len()))
}

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The field must not be empty.
    #[error("must not be empty")]
    Empty,
    /// The text is longer than allowed.
    #[error("is {len} bytes long, at most {max} are allowed")]
    TooLong {
        /// Length given.
        len: usize,
        /// Longest allowed.
        max: usize,
    },
    /// The text holds a character that is not allowed.
    #[error("contains {0:?}, allowed are letters, digits and - . _ /")]
    InvalidChar(char),
    /// Port 0 is not a port.
    #[error("must not be 0")]
    ZeroPort,
    /// The same value appears twice where values must be unique.
    #[error("{} appears more than once", clip(.0))]
    Duplicate(String),
    /// The address cannot be used here.
    #[error("{} cannot be used here ({})", clip(.0), .1)]
    BadAddress(String, &'static str),
    /// A number outside its range.
    #[error("is {got}, must be between {min} and {max}")]
    OutOfRange {
        /// Value given.
        got: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// Maglev tables need a prime size.
    #[error("{0} is not a prime number")]
    NotPrime(u64),
    /// Services with several ports must name each of them (as Kubernetes requires).
    #[error("must be set when a service has more than one port")]
    Unnamed,
    /// No port of the service resolves to this endpoint.
    #[error(
        "no port of the service reaches it: give ip:port, or a named port that a target_port names"
    )]
    NoPort,
    /// The service has nothing a client could connect to.
    #[error("the service has no address, external address or node port")]
    NoFrontend,
}

/// A field of one object that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    /// Path of the field inside the object, e.g. `ports[1].target_port`.
    pub field: String,
    /// What is wrong with it.
    pub problem: Problem,
}

impl ValidationError {
    pub(crate) fn new(field: impl Into<String>, problem: Problem) -> Self {
        Self {
            field: field.into(),
            problem,
        }
    }

    /// Prefixes the field path, e.g. `ports[1]` + `.port`.
    pub fn within(mut self, parent: impl fmt::Display) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

/// Why a batch of table changes was rejected. Nothing of the batch was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// A service or one of its endpoints failed validation.
    #[error("service {:?}: {error}", clip(service))]
    Invalid {
        /// Name of the service, as given.
        service: String,
        /// The offending field.
        error: ValidationError,
    },
    /// The change names a service that is not in the table.
    #[error("service {:?} does not exist", clip(.0))]
    UnknownService(String),
    /// Two services claim the same address, port and protocol.
    #[error(
        "service {:?}: {key} is already used by service {:?}",
        clip(service),
        clip(other)
    )]
    Conflict {
        /// The service whose change was rejected.
        service: String,
        /// The frontend both claim.
        key: ServicePortKey,
        /// The service that holds it.
        other: String,
    },
}
