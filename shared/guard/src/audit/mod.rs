//! The one audit event type and the audit sink port.
//!
//! An [`AuditEvent`] says who did what to which record, when, where, why and with what outcome.
//! It never carries PHI: records are named by their rxflow id, patients by their blind index
//! (a keyed hash), people by their JWT subject.

pub mod chain;
pub mod fhir;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// JWT `sub`, or `system:<function>` for a pipeline step, or `cli:<user>`.
    pub subject: String,
    /// prescriber, pharmacist, technician, auditor, admin, service
    pub role: String,
    /// The pharmacy organisation the actor works for.
    pub tenant: String,
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// A PHI record was created.
    Create,
    /// A PHI record was read (and opened).
    Read,
    /// A PHI record was changed.
    Update,
    /// A sealed value was decrypted outside a read (e.g. an export).
    Decrypt,
    /// PHI was disclosed outside the covered entity (a partner, a report, an export).
    Disclose,
    /// Access was refused.
    Deny,
    /// A break-glass session was opened.
    BreakGlass,
    /// An input that could not be processed was recorded (sealed) for follow-up.
    Quarantine,
    /// A sign-in (a request's bearer token) was refused.
    Login,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Read => "read",
            Action::Update => "update",
            Action::Decrypt => "decrypt",
            Action::Disclose => "disclose",
            Action::Deny => "deny",
            Action::BreakGlass => "break-glass",
            Action::Quarantine => "quarantine",
            Action::Login => "login",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Success,
    Denied,
    Failed,
}

/// Purpose of use (HL7 v3 PurposeOfUse codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Purpose {
    /// treatment
    #[serde(rename = "TREAT")]
    Treatment,
    /// healthcare payment
    #[serde(rename = "HPAYMT")]
    Payment,
    /// healthcare operations
    #[serde(rename = "HOPERAT")]
    Operations,
    /// emergency treatment (break-glass)
    #[serde(rename = "ETREAT")]
    Emergency,
    /// compliance / audit
    #[serde(rename = "HSYSADMIN")]
    SystemAdministration,
}

impl Purpose {
    pub fn code(self) -> &'static str {
        match self {
            Purpose::Treatment => "TREAT",
            Purpose::Payment => "HPAYMT",
            Purpose::Operations => "HOPERAT",
            Purpose::Emergency => "ETREAT",
            Purpose::SystemAdministration => "HSYSADMIN",
        }
    }
}

/// The record acted on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRef {
    /// "MedicationRequest", "Patient", "Practitioner", "MedicationDispense", "Input", "AuditEvent"
    pub kind: String,
    /// rxflow's own id of the record (a UUID), never a source identifier.
    pub id: String,
}

/// One audit event. Serialized canonically (field order as declared) for the hash chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// UUIDv7: unique and time-ordered.
    pub id: String,
    pub at: DateTime<Utc>,
    pub actor: Actor,
    pub action: Action,
    pub resource: ResourceRef,
    /// Blind index (hex) of the patient the record belongs to, so an accounting of disclosures
    /// can find it without the patient's identifier in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// The function (step) that acted: intake, validate, review, verify, dispense, records, ...
    pub function: String,
    /// Source IP of the request, when it came over the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<String>,
    pub outcome: Outcome,
    pub purpose: Purpose,
    #[serde(default)]
    pub break_glass: bool,
    /// A PHI-free note: a rule code, an error kind, a recipient name for a disclosure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A new event stamped now with a fresh UUIDv7.
    pub fn new(
        actor: Actor,
        action: Action,
        resource: ResourceRef,
        function: &str,
        purpose: Purpose,
    ) -> Self {
        AuditEvent {
            id: uuid::Uuid::now_v7().to_string(),
            at: Utc::now(),
            actor,
            action,
            resource,
            patient: None,
            function: function.to_string(),
            source_ip: None,
            outcome: Outcome::Success,
            purpose,
            break_glass: false,
            detail: None,
        }
    }

    /// The canonical bytes hashed into the chain and the Merkle tree.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // serde_json writes struct fields in declaration order: stable for a given version.
        serde_json::to_vec(self).expect("audit event serializes")
    }
}

/// A stored audit event with its place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainedEvent {
    /// 1-based position in the trail.
    pub seq: u64,
    /// The canonical bytes as stored (what the hashes cover).
    pub body: Vec<u8>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// Search criteria for audit events.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub patient: Option<String>,
    pub subject: Option<String>,
    pub action: Option<Action>,
    pub resource_id: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub break_glass_only: bool,
    /// Only events after this position of the trail (a page's last `seq`: the next page).
    pub after_seq: Option<u64>,
    pub limit: usize,
}

/// Where audit events go. Appends are durable before they return; a failure must fail the
/// request that caused the event (fail closed).
#[async_trait]
pub trait AuditSink: Send + Sync {
    /// Append events, in order, to the chain.
    async fn append(&self, events: &[AuditEvent]) -> Result<()>;
}
