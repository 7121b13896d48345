//! The one error type of rx-guard. No variant carries PHI: messages name keys, fields and
//! records by id only.

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The key provider (local key file, KMS) could not give or unwrap a data key.
    #[error("key service unavailable: {0}")]
    KeyUnavailable(String),
    /// A sealed value did not open: wrong record, field, tenant or key, or it was altered.
    #[error("sealed value does not open for {0}: it was altered or belongs to another record")]
    Integrity(String),
    /// The sealed bytes are not in a format this version reads.
    #[error("sealed value has an unknown format: {0}")]
    Format(String),
    /// The audit sink refused or failed to take an event: the request must fail closed.
    #[error("audit trail unavailable: {0}")]
    AuditUnavailable(String),
    /// Configuration or key material on disk is missing or unusable.
    #[error("{0}")]
    Config(String),
    /// Authentication failed (token missing, malformed, expired, wrong signer ...).
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The principal is authenticated but not allowed.
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = GuardError> = std::result::Result<T, E>;
