//! rx-domain: the prescription domain, pure (no I/O).
//!
//! * [`model`]: the prescription model shared by every step.
//! * [`state`]: the one prescription state machine.
//! * [`fhir`]: FHIR R4 in (MedicationRequest, Patient, Practitioner, AllergyIntolerance, Bundle,
//!   NDJSON lines) and out (MedicationDispense, OperationOutcome).
//! * [`ids`]: NPI, DEA and NDC checks and normalization.
//! * [`drugs`]: the drug reference table (RxNorm product → ingredients, class, schedule, MME factor).
//! * [`validate`]: prescriber, patient, drug, quantity, refill, expiry and schedule rules.
//! * [`dur`]: drug-utilization review (interactions, allergies, duplicate therapy, MME, early refill).

pub mod drugs;
pub mod dur;
pub mod fhir;
pub mod ids;
pub mod model;
pub mod state;
pub mod synth;
pub mod validate;

pub use model::*;
pub use state::{Status, Transition, TransitionError};
