//! The role × action policy, read from `data/policy.tsv`, and the attribute rules applied on top
//! of it: tenant isolation, own orders, MFA for controlled substances, separation of duties,
//! break-glass.

use std::collections::HashMap;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};

use super::{Action, BreakGlassGrant, Principal, Role};
use crate::{GuardError, Result};

const EMBEDDED_POLICY: &str = include_str!("../../data/policy.tsv");

/// The record an action touches, described by the attributes the policy needs (no PHI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource<'a> {
    /// The tenant (pharmacy organisation) that holds the record.
    pub tenant: &'a str,
    /// JWT subject of whoever wrote the order, when known.
    pub prescriber_subject: Option<&'a str>,
    /// NPI of the prescriber named on the order, when known.
    pub prescriber_npi: Option<&'a str>,
    /// The order is for a DEA-scheduled (controlled) substance.
    pub controlled: bool,
}

/// What a role may see of a prescription ("minimum necessary", 45 CFR 164.502(b)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    Full,
    /// No SSN, no full address.
    Clinical,
    /// Technician: no SSN, no address, no free-text notes.
    Operational,
    /// Ids and events only, no clinical content.
    AuditOnly,
}

impl View {
    pub fn as_str(self) -> &'static str {
        match self {
            View::Full => "full",
            View::Clinical => "clinical",
            View::Operational => "operational",
            View::AuditOnly => "audit-only",
        }
    }

    fn parse(s: &str) -> Option<View> {
        [
            View::Full,
            View::Clinical,
            View::Operational,
            View::AuditOnly,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// Why access was refused. [`DenyReason::code`] is stable (for audit details and API errors);
/// the Display sentence tells the caller what would make it allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The role may not do this at all (or only under break-glass, and there is no grant).
    RoleNotAllowed { role: Role, action: Action },
    /// The record belongs to another tenant.
    OtherTenant,
    /// A prescriber asked for an order someone else wrote.
    NotOwnPatientOrder,
    /// A controlled-substance order needs a token with MFA.
    MfaRequired,
    /// The one who wrote the order asked to verify it.
    SeparationOfDuties,
    /// The break-glass grant that would have allowed this has expired.
    BreakGlassExpired,
    /// An action on one record was asked without naming the record.
    ResourceRequired { action: Action },
}

impl DenyReason {
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::RoleNotAllowed { .. } => "role-not-allowed",
            DenyReason::OtherTenant => "other-tenant",
            DenyReason::NotOwnPatientOrder => "not-own-patient-order",
            DenyReason::MfaRequired => "mfa-required",
            DenyReason::SeparationOfDuties => "separation-of-duties",
            DenyReason::BreakGlassExpired => "break-glass-expired",
            DenyReason::ResourceRequired { .. } => "resource-required",
        }
    }

    pub fn sentence(&self) -> String {
        match self {
            DenyReason::RoleNotAllowed { role, action } => format!(
                "the {role} role may not {}; ask someone with a role that may",
                action.as_str().replace('-', " ")
            ),
            DenyReason::OtherTenant => {
                "the record belongs to another pharmacy organisation; sign in under that organisation"
                    .to_string()
            }
            DenyReason::NotOwnPatientOrder => {
                "prescribers see only the orders they wrote; request break-glass access for an emergency"
                    .to_string()
            }
            DenyReason::MfaRequired => {
                "controlled-substance orders need multi-factor authentication; sign in again with a second factor"
                    .to_string()
            }
            DenyReason::SeparationOfDuties => {
                "whoever wrote an order cannot verify it; another pharmacist must verify it"
                    .to_string()
            }
            DenyReason::BreakGlassExpired => {
                "the break-glass grant has expired; request a new one with a reason".to_string()
            }
            DenyReason::ResourceRequired { action } => format!(
                "to {} the request must name the prescription",
                action.as_str().replace('-', " ")
            ),
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.sentence())
    }
}

/// The answer of [`Policy::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed. `via_break_glass` is true whenever the principal held an active break-glass
    /// grant: every access during the grant is flagged for review, not only the widened ones.
    Allow {
        via_break_glass: bool,
    },
    Deny(DenyReason),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// `Ok(via_break_glass)` when allowed, else [`GuardError::Forbidden`] with the sentence.
    pub fn into_result(self) -> Result<bool> {
        match self {
            Decision::Allow { via_break_glass } => Ok(via_break_glass),
            Decision::Deny(reason) => Err(GuardError::Forbidden(reason.sentence())),
        }
    }
}

/// How far a cell reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Deny,
    Tenant,
    Own,
    OwnOrBreakGlass,
    BreakGlassOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell {
    scope: Scope,
    mfa_for_controlled: bool,
}

impl Cell {
    const DENY: Cell = Cell {
        scope: Scope::Deny,
        mfa_for_controlled: false,
    };

    fn parse(s: &str) -> Option<Cell> {
        let (scope, mfa_for_controlled) = match s.strip_suffix("+mfa-cs") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let scope = match scope {
            "-" => Scope::Deny,
            "tenant" => Scope::Tenant,
            "own" => Scope::Own,
            "own|bg" => Scope::OwnOrBreakGlass,
            "bg" => Scope::BreakGlassOnly,
            _ => return None,
        };
        Some(Cell {
            scope,
            mfa_for_controlled,
        })
    }
}

/// The role × action table plus the view per role.
#[derive(Debug, Clone)]
pub struct Policy {
    cells: HashMap<(Role, Action), Cell>,
    views: HashMap<Role, View>,
}

/// Break-glass state of a principal at a given instant.
enum Glass {
    None,
    Active,
    Expired,
}

fn glass(grant: Option<&BreakGlassGrant>, p: &Principal, now: DateTime<Utc>) -> Glass {
    match grant {
        // A grant is personal: one attached to another subject counts for nothing.
        Some(g) if g.subject == p.subject => {
            if g.is_active(now) {
                Glass::Active
            } else {
                Glass::Expired
            }
        }
        _ => Glass::None,
    }
}

fn wrote_it(p: &Principal, res: &Resource<'_>) -> bool {
    let by_subject = res.prescriber_subject.is_some_and(|s| s == p.subject);
    let by_npi = match (p.npi.as_deref(), res.prescriber_npi) {
        (Some(mine), Some(theirs)) => !mine.is_empty() && mine == theirs,
        _ => false,
    };
    by_subject || by_npi
}

impl Policy {
    /// The policy shipped in `data/policy.tsv`. Should that file ever fail to parse, this is a
    /// deny-everything policy (fail closed) and the error is logged; a test pins that it parses.
    pub fn embedded() -> &'static Policy {
        static POLICY: OnceLock<Policy> = OnceLock::new();
        POLICY.get_or_init(|| match Policy::parse(EMBEDDED_POLICY) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "embedded access policy is unusable; denying everything");
                Policy::deny_all()
            }
        })
    }

    /// A policy that allows nothing and shows nothing clinical.
    pub fn deny_all() -> Policy {
        Policy {
            cells: HashMap::new(),
            views: Role::ALL
                .into_iter()
                .map(|r| (r, View::AuditOnly))
                .collect(),
        }
    }

    /// Parses a policy table in the format of `data/policy.tsv`. Every role must have a column,
    /// every action a row, and the `view` row a view for every role.
    pub fn parse(text: &str) -> Result<Policy> {
        let bad = |line: usize, what: String| {
            GuardError::Config(format!("access policy line {line}: {what}"))
        };
        let mut roles: Option<Vec<Role>> = None;
        let mut cells = HashMap::new();
        let mut views = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim_end();
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
            let Some(cols) = roles.as_ref() else {
                if fields.first() != Some(&"action") {
                    return Err(bad(
                        line_no,
                        "the first row must be the header `action<TAB>role…`".into(),
                    ));
                }
                let parsed = fields[1..]
                    .iter()
                    .map(|f| {
                        Role::parse(f).ok_or_else(|| bad(line_no, format!("unknown role `{f}`")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                for r in Role::ALL {
                    if !parsed.contains(&r) {
                        return Err(bad(line_no, format!("no column for role `{r}`")));
                    }
                }
                roles = Some(parsed);
                continue;
            };
            if fields.len() != cols.len() + 1 {
                return Err(bad(
                    line_no,
                    format!("expected {} cells, found {}", cols.len(), fields.len() - 1),
                ));
            }
            if fields[0] == "view" {
                for (role, f) in cols.iter().zip(&fields[1..]) {
                    let v = View::parse(f)
                        .ok_or_else(|| bad(line_no, format!("unknown view `{f}`")))?;
                    views.insert(*role, v);
                }
                continue;
            }
            let action = Action::parse(fields[0])
                .ok_or_else(|| bad(line_no, format!("unknown action `{}`", fields[0])))?;
            for (role, f) in cols.iter().zip(&fields[1..]) {
                let cell =
                    Cell::parse(f).ok_or_else(|| bad(line_no, format!("unknown cell `{f}`")))?;
                if cells.insert((*role, action), cell).is_some() {
                    return Err(bad(line_no, format!("action `{action}` appears twice")));
                }
            }
        }
        for a in Action::ALL {
            if !cells.contains_key(&(Role::Prescriber, a)) {
                return Err(GuardError::Config(format!(
                    "access policy has no row for action `{a}`"
                )));
            }
        }
        for r in Role::ALL {
            if !views.contains_key(&r) {
                return Err(GuardError::Config(format!(
                    "access policy has no view for role `{r}`"
                )));
            }
        }
        Ok(Policy { cells, views })
    }

    /// The minimum-necessary view of a prescription for `role`.
    pub fn view(&self, role: Role) -> View {
        self.views.get(&role).copied().unwrap_or(View::AuditOnly)
    }

    /// Decides whether `p` may do `action` on `res` at `now`.
    ///
    /// Without a resource only the role and break-glass checks apply (the caller scopes its query
    /// to the principal's tenant and checks each record it returns); actions on one record
    /// ([`Action::needs_resource`]) are denied without one.
    pub fn decide(
        &self,
        p: &Principal,
        action: Action,
        res: Option<&Resource<'_>>,
        now: DateTime<Utc>,
    ) -> Decision {
        let (cell, glass) = match self.gate(p, action, now) {
            Ok(x) => x,
            Err(why) => return Decision::Deny(why),
        };
        let flagged = matches!(glass, Glass::Active);
        let Some(res) = res else {
            if action.needs_resource() {
                return Decision::Deny(DenyReason::ResourceRequired { action });
            }
            return Decision::Allow {
                via_break_glass: flagged,
            };
        };
        // Tenant isolation first: nothing, break-glass included, reaches another tenant.
        if res.tenant != p.tenant {
            return Decision::Deny(DenyReason::OtherTenant);
        }
        let own = wrote_it(p, res);
        match cell.scope {
            Scope::Own if !own => return Decision::Deny(DenyReason::NotOwnPatientOrder),
            Scope::OwnOrBreakGlass if !own => match glass {
                Glass::Active => {}
                Glass::Expired => return Decision::Deny(DenyReason::BreakGlassExpired),
                Glass::None => return Decision::Deny(DenyReason::NotOwnPatientOrder),
            },
            _ => {}
        }
        if action == Action::VerifyPrescription && own {
            return Decision::Deny(DenyReason::SeparationOfDuties);
        }
        if cell.mfa_for_controlled && res.controlled && !p.mfa {
            return Decision::Deny(DenyReason::MfaRequired);
        }
        Decision::Allow {
            via_break_glass: flagged,
        }
    }
}

impl Policy {
    /// Whether `p`'s role may take `action` at all, on whatever resource: the first part of
    /// [`Policy::decide`], for refusing a request before its body is read (a role that may
    /// never submit orders is not made to wait for, or parse, a Bundle). `decide` still
    /// decides on the resource.
    pub fn role_may(&self, p: &Principal, action: Action, now: DateTime<Utc>) -> Decision {
        match self.gate(p, action, now) {
            Ok((_, glass)) => Decision::Allow {
                via_break_glass: matches!(glass, Glass::Active),
            },
            Err(why) => Decision::Deny(why),
        }
    }

    /// The role's cell for `action` and `p`'s break-glass state, unless the role may not take
    /// the action at all (its cell denies it, or allows it only under break-glass that `p` does
    /// not hold).
    fn gate(
        &self,
        p: &Principal,
        action: Action,
        now: DateTime<Utc>,
    ) -> Result<(Cell, Glass), DenyReason> {
        let cell = self
            .cells
            .get(&(p.role, action))
            .copied()
            .unwrap_or(Cell::DENY);
        let glass = glass(p.break_glass.as_ref(), p, now);
        let role_denied = DenyReason::RoleNotAllowed {
            role: p.role,
            action,
        };
        match (cell.scope, &glass) {
            (Scope::Deny, _) | (Scope::BreakGlassOnly, Glass::None) => Err(role_denied),
            (Scope::BreakGlassOnly, Glass::Expired) => Err(DenyReason::BreakGlassExpired),
            _ => Ok((cell, glass)),
        }
    }
}

/// The minimum-necessary view of a prescription for `role`, from the embedded policy.
pub fn view_for(role: Role) -> View {
    Policy::embedded().view(role)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_policy_parses_with_every_role_and_action() {
        let p = Policy::parse(EMBEDDED_POLICY).expect("embedded policy parses");
        for r in Role::ALL {
            for a in Action::ALL {
                assert!(p.cells.contains_key(&(r, a)), "{r} × {a} missing");
            }
        }
    }

    #[test]
    fn policy_with_unknown_cell_is_refused() {
        let text = EMBEDDED_POLICY.replace("tenant+mfa-cs", "maybe");
        let err = Policy::parse(&text).expect_err("bad cell refused");
        assert!(err.to_string().contains("unknown cell"), "{err}");
    }

    #[test]
    fn policy_missing_an_action_row_is_refused() {
        let text: String = EMBEDDED_POLICY
            .lines()
            .filter(|l| !l.starts_with("seal-audit"))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = Policy::parse(&text).expect_err("missing row refused");
        assert!(err.to_string().contains("seal-audit"), "{err}");
    }

    #[test]
    fn deny_all_policy_allows_nothing() {
        let p = Policy::deny_all();
        let admin = Principal {
            subject: "a".into(),
            role: Role::Admin,
            tenant: "t".into(),
            mfa: true,
            npi: None,
            break_glass: None,
        };
        for a in Action::ALL {
            assert!(!p.decide(&admin, a, None, Utc::now()).is_allowed());
        }
    }
}
