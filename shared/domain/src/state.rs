//! The one prescription state machine. Every change of status goes through [`Status::apply`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a prescription is in the pipeline. Stored in clear (it says nothing about the patient).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Received,
    Validated,
    Rejected,
    NeedsClarification,
    Reviewed,
    AwaitingVerification,
    Verified,
    PartiallyDispensed,
    Dispensed,
    Cancelled,
}

/// What happens to a prescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transition {
    /// validate: all rules pass
    Validate,
    /// validate or verify: a rule or a pharmacist rejects the order
    Reject,
    /// validate: the order lacks something a prescriber must supply
    AskClarification,
    /// the prescriber supplied what was missing: validate again
    Resubmit,
    /// review: DUR done, alerts attached
    Review,
    /// review: queued for a pharmacist
    Queue,
    /// verify: a pharmacist approves
    Verify,
    /// dispense: a fill that leaves quantity or refills for later
    DispensePartial,
    /// dispense: the last fill
    DispenseComplete,
    /// records: the prescriber or pharmacy cancels
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a prescription that is {from} cannot be {transition}")]
pub struct TransitionError {
    pub from: Status,
    pub transition: &'static str,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::Received,
        Status::Validated,
        Status::Rejected,
        Status::NeedsClarification,
        Status::Reviewed,
        Status::AwaitingVerification,
        Status::Verified,
        Status::PartiallyDispensed,
        Status::Dispensed,
        Status::Cancelled,
    ];

    /// The status after `t`, or why `t` is not allowed from here.
    pub fn apply(self, t: Transition) -> Result<Status, TransitionError> {
        use Status::*;
        use Transition as T;
        let next = match (self, t) {
            (Received, T::Validate) => Some(Validated),
            (Received, T::Reject) => Some(Rejected),
            (Received, T::AskClarification) => Some(NeedsClarification),
            (NeedsClarification, T::Resubmit) => Some(Received),
            (Validated, T::Review) => Some(Reviewed),
            (Reviewed, T::Queue) => Some(AwaitingVerification),
            (AwaitingVerification, T::Verify) => Some(Verified),
            (AwaitingVerification, T::Reject) => Some(Rejected),
            (Verified | PartiallyDispensed, T::DispensePartial) => Some(PartiallyDispensed),
            (Verified | PartiallyDispensed, T::DispenseComplete) => Some(Dispensed),
            (
                Received | Validated | NeedsClarification | Reviewed | AwaitingVerification
                | Verified | PartiallyDispensed,
                T::Cancel,
            ) => Some(Cancelled),
            _ => None,
        };
        next.ok_or(TransitionError {
            from: self,
            transition: t.as_str(),
        })
    }

    /// No further transition is possible.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Rejected | Status::Dispensed | Status::Cancelled
        )
    }

    /// Waiting on a person (pharmacist, prescriber) or on a later fill.
    pub fn is_waiting(self) -> bool {
        matches!(
            self,
            Status::NeedsClarification
                | Status::AwaitingVerification
                | Status::Verified
                | Status::PartiallyDispensed
        )
    }

    /// Counts as an active medication of the patient for drug-utilization review.
    pub fn is_active_therapy(self) -> bool {
        matches!(
            self,
            Status::Validated
                | Status::Reviewed
                | Status::AwaitingVerification
                | Status::Verified
                | Status::PartiallyDispensed
                | Status::Dispensed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Received => "received",
            Status::Validated => "validated",
            Status::Rejected => "rejected",
            Status::NeedsClarification => "needs-clarification",
            Status::Reviewed => "reviewed",
            Status::AwaitingVerification => "awaiting-verification",
            Status::Verified => "verified",
            Status::PartiallyDispensed => "partially-dispensed",
            Status::Dispensed => "dispensed",
            Status::Cancelled => "cancelled",
        }
    }
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Validate => "validated",
            Transition::Reject => "rejected",
            Transition::AskClarification => "sent back for clarification",
            Transition::Resubmit => "resubmitted",
            Transition::Review => "reviewed",
            Transition::Queue => "queued for verification",
            Transition::Verify => "verified",
            Transition::DispensePartial => "partially dispensed",
            Transition::DispenseComplete => "dispensed",
            Transition::Cancel => "cancelled",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown prescription status '{s}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_reaches_dispensed() {
        let s = Status::Received
            .apply(Transition::Validate)
            .and_then(|s| s.apply(Transition::Review))
            .and_then(|s| s.apply(Transition::Queue))
            .and_then(|s| s.apply(Transition::Verify))
            .and_then(|s| s.apply(Transition::DispensePartial))
            .and_then(|s| s.apply(Transition::DispenseComplete))
            .unwrap();
        assert_eq!(s, Status::Dispensed);
    }

    #[test]
    fn final_states_accept_no_transition() {
        for s in Status::ALL.into_iter().filter(|s| s.is_final()) {
            assert!(s.apply(Transition::Cancel).is_err(), "{s} cancelled");
            assert!(s.apply(Transition::Validate).is_err(), "{s} validated");
        }
    }

    #[test]
    fn dispensing_requires_verification() {
        assert!(Status::AwaitingVerification
            .apply(Transition::DispenseComplete)
            .is_err());
        assert!(Status::Reviewed.apply(Transition::Verify).is_err());
    }

    #[test]
    fn status_round_trips_through_its_name() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
    }
}
