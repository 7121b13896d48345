//! rx-platform: what every function needs around its handler.
//!
//! * [`services`]: the ports a handler works over (vault, clock, rules, reference data) and the
//!   embedded wiring (SQLite file, local key files) in a data directory.
//! * [`event`]: the events between steps (ids and versions only, never PHI).
//! * [`error`]: the one step error type, mapped to HTTP status and FHIR OperationOutcome.
//! * [`clock`]: system time, or a set time for replays.
//! * [`config`]: configuration from the environment, in one place.
//! * [`http`]: the shared HTTP layer (caller extractor, FHIR error responses, middleware stack).
//! * [`pages`]: walking the audit trail with reading and checking overlapped.
//! * [`login`]: refused sign-ins in the audit trail, at most so many per source and minute.
//! * [`break_glass`]: emergency access sessions (open, store sealed, audit, alert, look up).

pub mod break_glass;
pub mod clock;
pub mod config;
pub mod error;
pub mod event;
pub mod flow;
pub mod http;
pub mod login;
pub mod pages;
pub mod services;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::StepError;
pub use event::{EventKind, PipelineEvent};
pub use services::Services;
