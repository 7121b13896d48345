//! Access control: who the caller is (a verified JWT), what their role may do (a policy table
//! kept as data), the attribute rules around it (tenant, own orders, MFA, separation of duties),
//! break-glass, and the minimum-necessary view each role gets.
//!
//! * [`JwtVerifier`] turns a bearer token into a [`Principal`], or refuses it.
//! * [`DevIssuer`] signs tokens with a local key for `rxflow token` and tests.
//! * [`Policy::decide`] answers allow / deny (with a reason code and a sentence).
//! * [`grant_break_glass`] opens a time-limited emergency grant.

mod break_glass;
mod dev;
mod jwt;
mod policy;

pub use break_glass::{
    grant_break_glass, BreakGlassGrant, BREAK_GLASS_DEFAULT_MINUTES, BREAK_GLASS_MAX_MINUTES,
    BREAK_GLASS_MIN_REASON_CHARS,
};
pub use dev::{DevClaims, DevIssuer, DEV_AUDIENCE, DEV_ISSUER};
pub use jwt::{JwksSource, JwtConfig, JwtVerifier, DEFAULT_JWKS_REFRESH_INTERVAL};
pub use policy::{view_for, Decision, DenyReason, Policy, Resource, View};

use serde::{Deserialize, Serialize};

/// The roles of rxflow. A token names one in its `role` claim (or the first recognized entry of
/// a `roles` array).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Prescriber,
    Pharmacist,
    Technician,
    Auditor,
    Admin,
    /// A trusted system: a pipeline step or a partner integration.
    Service,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Prescriber,
        Role::Pharmacist,
        Role::Technician,
        Role::Auditor,
        Role::Admin,
        Role::Service,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prescriber => "prescriber",
            Role::Pharmacist => "pharmacist",
            Role::Technician => "technician",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }

    /// Parses a role name, ignoring ASCII case. `None` for anything else.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = crate::GuardError;
    fn from_str(s: &str) -> crate::Result<Role> {
        Role::parse(s).ok_or_else(|| {
            crate::GuardError::Config(
                "unknown role: use prescriber, pharmacist, technician, auditor, admin or service"
                    .to_string(),
            )
        })
    }
}

/// What a principal asks to do. Each is a row of the policy table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    SubmitPrescription,
    ReadPrescription,
    ListPatientPrescriptions,
    VerifyPrescription,
    DispensePrescription,
    CancelPrescription,
    ReadAuditEvents,
    ReadDisclosures,
    ExportAudit,
    BreakGlass,
    SealAudit,
    ReadQueue,
}

impl Action {
    pub const ALL: [Action; 12] = [
        Action::SubmitPrescription,
        Action::ReadPrescription,
        Action::ListPatientPrescriptions,
        Action::VerifyPrescription,
        Action::DispensePrescription,
        Action::CancelPrescription,
        Action::ReadAuditEvents,
        Action::ReadDisclosures,
        Action::ExportAudit,
        Action::BreakGlass,
        Action::SealAudit,
        Action::ReadQueue,
    ];

    /// The name used in the policy file and in deny sentences.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::SubmitPrescription => "submit-prescription",
            Action::ReadPrescription => "read-prescription",
            Action::ListPatientPrescriptions => "list-patient-prescriptions",
            Action::VerifyPrescription => "verify-prescription",
            Action::DispensePrescription => "dispense-prescription",
            Action::CancelPrescription => "cancel-prescription",
            Action::ReadAuditEvents => "read-audit-events",
            Action::ReadDisclosures => "read-disclosures",
            Action::ExportAudit => "export-audit",
            Action::BreakGlass => "break-glass",
            Action::SealAudit => "seal-audit",
            Action::ReadQueue => "read-queue",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s.trim())
    }

    /// Actions on one prescription: deciding them without the record would skip the tenant,
    /// own-order, MFA and separation-of-duties checks, so they are denied without one.
    pub fn needs_resource(self) -> bool {
        matches!(
            self,
            Action::SubmitPrescription
                | Action::ReadPrescription
                | Action::VerifyPrescription
                | Action::DispensePrescription
                | Action::CancelPrescription
        )
    }

    /// The audit action an access of this kind records.
    pub fn audit_action(self) -> crate::audit::Action {
        use crate::audit::Action as A;
        match self {
            Action::SubmitPrescription => A::Create,
            Action::VerifyPrescription | Action::DispensePrescription => A::Update,
            Action::CancelPrescription => A::Update,
            Action::ExportAudit => A::Disclose,
            Action::BreakGlass => A::BreakGlass,
            Action::ReadPrescription
            | Action::ListPatientPrescriptions
            | Action::ReadAuditEvents
            | Action::ReadDisclosures
            | Action::SealAudit
            | Action::ReadQueue => A::Read,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller: built only by [`JwtVerifier::verify`] (or by trusted local code such
/// as the CLI acting as a named user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// JWT `sub`.
    pub subject: String,
    pub role: Role,
    /// JWT `tenant`: the pharmacy organisation the caller works for.
    pub tenant: String,
    /// The token's `amr` shows a second factor (`mfa`, `otp` or `hwk`).
    pub mfa: bool,
    /// JWT `npi`, kept for prescribers only (matches orders they wrote).
    pub npi: Option<String>,
    /// An emergency grant attached by the server from its store; never taken from a token.
    pub break_glass: Option<BreakGlassGrant>,
}

impl Principal {
    /// The audit trail's view of this caller.
    pub fn actor(&self) -> crate::audit::Actor {
        crate::audit::Actor {
            subject: self.subject.clone(),
            role: self.role.as_str().to_string(),
            tenant: self.tenant.clone(),
        }
    }

    /// The same principal holding `grant`.
    pub fn with_break_glass(mut self, grant: BreakGlassGrant) -> Principal {
        self.break_glass = Some(grant);
        self
    }
}

/// The audit event recording `decision` on `action` by `p`: on allow the access itself (flagged
/// when under break-glass, purpose ETREAT), on deny an [`audit::Action::Deny`] with the reason
/// code as detail, so every denial lands in the trail. The caller adds patient and source ip.
///
/// [`audit::Action::Deny`]: crate::audit::Action::Deny
pub fn audit_event(
    p: &Principal,
    action: Action,
    decision: &Decision,
    resource: crate::audit::ResourceRef,
    function: &str,
) -> crate::audit::AuditEvent {
    use crate::audit::{AuditEvent, Outcome, Purpose};
    let routine = match p.role {
        Role::Auditor | Role::Admin => Purpose::SystemAdministration,
        Role::Service => Purpose::Operations,
        _ => Purpose::Treatment,
    };
    match decision {
        Decision::Allow { via_break_glass } => {
            let purpose = if *via_break_glass {
                Purpose::Emergency
            } else {
                routine
            };
            let mut e = AuditEvent::new(
                p.actor(),
                action.audit_action(),
                resource,
                function,
                purpose,
            );
            e.break_glass = *via_break_glass;
            e
        }
        Decision::Deny(reason) => {
            let mut e = AuditEvent::new(
                p.actor(),
                crate::audit::Action::Deny,
                resource,
                function,
                routine,
            );
            e.outcome = Outcome::Denied;
            e.detail = Some(format!("{}:{}", action.as_str(), reason.code()));
            e
        }
    }
}
