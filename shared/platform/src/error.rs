//! The one step error type. Every client error becomes a FHIR OperationOutcome with a code and a
//! human sentence; infrastructure failures become 503 (fail closed). No message carries PHI.

use rx_domain::fhir::{operation_outcome_issues, FhirError};
use rx_domain::TransitionError;
use rx_guard::GuardError;
use rx_store::repo::RepoError;
use rx_store::StoreError;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The input is not acceptable FHIR or misses something required.
    #[error("{message}")]
    Invalid {
        /// OperationOutcome issue code: structure, required, value, invalid, not-supported.
        code: &'static str,
        message: String,
        /// FHIRPath of the offending element.
        expression: Option<String>,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The prescription is not in a state that allows this, or changed meanwhile.
    #[error("{0}")]
    Conflict(String),
    /// A business rule refuses the request (e.g. a fill outside the allowed window).
    #[error("{0}")]
    Refused(String),
    /// A key service, the store or the audit sink failed: nothing was done, try again.
    #[error("{0}")]
    Unavailable(String),
}

impl StepError {
    pub fn invalid(message: impl Into<String>) -> Self {
        StepError::Invalid {
            code: "invalid",
            message: message.into(),
            expression: None,
        }
    }

    /// HTTP status for the error.
    pub fn status(&self) -> u16 {
        match self {
            StepError::Invalid { .. } => 400,
            StepError::Unauthenticated(_) => 401,
            StepError::Forbidden(_) => 403,
            StepError::NotFound(_) => 404,
            StepError::Conflict(_) => 409,
            StepError::Refused(_) => 422,
            StepError::Unavailable(_) => 503,
        }
    }

    /// The OperationOutcome issue code.
    pub fn issue_code(&self) -> &'static str {
        match self {
            StepError::Invalid { code, .. } => code,
            StepError::Unauthenticated(_) => "login",
            StepError::Forbidden(_) => "forbidden",
            StepError::NotFound(_) => "not-found",
            StepError::Conflict(_) => "conflict",
            StepError::Refused(_) => "business-rule",
            StepError::Unavailable(_) => "transient",
        }
    }

    /// The FHIR R4 OperationOutcome for this error.
    pub fn operation_outcome(&self) -> Value {
        let severity = if self.status() >= 500 {
            "fatal"
        } else {
            "error"
        };
        let expression = match self {
            StepError::Invalid { expression, .. } => expression.clone(),
            _ => None,
        };
        operation_outcome_issues(&[(severity, self.issue_code(), self.to_string(), expression)])
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StepError::Unavailable(_))
    }
}

impl From<FhirError> for StepError {
    fn from(e: FhirError) -> Self {
        StepError::Invalid {
            code: "structure",
            message: e.to_string(),
            expression: Some(e.path.clone()),
        }
    }
}

impl From<TransitionError> for StepError {
    fn from(e: TransitionError) -> Self {
        StepError::Conflict(e.to_string())
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => StepError::Conflict(format!(
                "the record changed while this request ran ({m}); read it again and retry"
            )),
            StoreError::Unavailable(_) | StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "store failure");
                StepError::Unavailable(
                    "the record store is unavailable; nothing was changed, retry later".into(),
                )
            }
        }
    }
}

impl From<GuardError> for StepError {
    fn from(e: GuardError) -> Self {
        match e {
            GuardError::Unauthenticated(m) => StepError::Unauthenticated(m),
            GuardError::Forbidden(m) => StepError::Forbidden(m),
            GuardError::KeyUnavailable(_)
            | GuardError::AuditUnavailable(_)
            | GuardError::Io { .. }
            | GuardError::Config(_) => {
                tracing::error!(error = %e, "security service failure");
                StepError::Unavailable(format!(
                    "a security service is unavailable ({}); nothing was changed, retry later",
                    guard_kind(&e)
                ))
            }
            GuardError::Integrity(_) | GuardError::Format(_) => {
                tracing::error!(error = %e, "sealed record failed its integrity check");
                StepError::Unavailable(
                    "a stored record failed its integrity check; the incident is logged".into(),
                )
            }
        }
    }
}

impl From<RepoError> for StepError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Store(s) => s.into(),
            RepoError::Guard(g) => g.into(),
            RepoError::Decode { .. } => {
                tracing::error!(error = %e, "stored record does not decode");
                StepError::Unavailable(
                    "a stored record could not be read; the incident is logged".into(),
                )
            }
        }
    }
}

fn guard_kind(e: &GuardError) -> &'static str {
    match e {
        GuardError::KeyUnavailable(_) => "key service",
        GuardError::AuditUnavailable(_) => "audit trail",
        GuardError::Io { .. } | GuardError::Config(_) => "key material",
        _ => "guard",
    }
}
