//! Events between steps. They carry ids and versions only: the PHI stays in the store, sealed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "rxflow.prescription.received")]
    Received,
    #[serde(rename = "rxflow.prescription.validated")]
    Validated,
    #[serde(rename = "rxflow.prescription.rejected")]
    Rejected,
    #[serde(rename = "rxflow.prescription.needs-clarification")]
    NeedsClarification,
    #[serde(rename = "rxflow.prescription.reviewed")]
    Reviewed,
    #[serde(rename = "rxflow.prescription.verified")]
    Verified,
    #[serde(rename = "rxflow.prescription.dispensed")]
    Dispensed,
    #[serde(rename = "rxflow.prescription.cancelled")]
    Cancelled,
}

impl EventKind {
    /// The CloudEvents `type` attribute.
    pub fn type_name(self) -> &'static str {
        match self {
            EventKind::Received => "rxflow.prescription.received",
            EventKind::Validated => "rxflow.prescription.validated",
            EventKind::Rejected => "rxflow.prescription.rejected",
            EventKind::NeedsClarification => "rxflow.prescription.needs-clarification",
            EventKind::Reviewed => "rxflow.prescription.reviewed",
            EventKind::Verified => "rxflow.prescription.verified",
            EventKind::Dispensed => "rxflow.prescription.dispensed",
            EventKind::Cancelled => "rxflow.prescription.cancelled",
        }
    }
}

/// One event: which prescription, in which tenant, at which version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub rx_id: String,
    pub tenant: String,
    pub version: u64,
}

impl PipelineEvent {
    pub fn new(kind: EventKind, rx_id: &str, tenant: &str, version: u64) -> Self {
        PipelineEvent {
            kind,
            rx_id: rx_id.to_string(),
            tenant: tenant.to_string(),
            version,
        }
    }
}
