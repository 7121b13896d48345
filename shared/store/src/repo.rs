//! The PHI repository: the only way a function reads or writes PHI.
//!
//! Every body is sealed with rx-guard before it reaches the store, identifiers are replaced by
//! blind indexes, and every read, write or disclosure appends exactly one audit event. Reads are
//! audited before the opened value is returned (a read whose audit event cannot be stored fails);
//! writes carry their audit events in the same atomic change set as the data. Under group commit
//! both become durable at the next sync, which every HTTP answer waits for.

use std::sync::Arc;

use chrono::Utc;
use rx_domain::{MedicationOrder, PatientRecord, PrescriberRecord, PrescriptionRecord};
use rx_guard::audit::{Action, Actor, AuditEvent, Outcome, Purpose, ResourceRef};
use rx_guard::blind::{self, BlindIndex};
use rx_guard::envelope::{Aad, Sealer};
use rx_guard::GuardError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::port::{Changes, RecordStore, Row, StoreError, Table, TransitionRow, Write};

/// Blind-index domains: the same value in two domains gives unrelated indexes.
pub mod domains {
    pub const PATIENT: &str = "patient";
    pub const NPI: &str = "npi";
    pub const PRACTITIONER: &str = "practitioner";
    pub const SOURCE_ORDER: &str = "source-order";
    /// An input kept for follow-up: where it came from and what it said.
    pub const INPUT: &str = "quarantined-input";
}

/// The field name bound into every sealed body's associated data.
const BODY: &str = "body";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// A body opened but is not the record this version expects (no contents in the message).
    #[error("stored {table} record {id} does not decode: {kind}")]
    Decode {
        table: &'static str,
        id: String,
        kind: String,
    },
}

pub type RepoResult<T> = Result<T, RepoError>;

/// Who is acting, for the audit trail.
#[derive(Debug, Clone)]
pub struct AuditCtx {
    pub actor: Actor,
    /// The step acting: intake, validate, review, verify, dispense, records, audit, cli.
    pub function: &'static str,
    pub purpose: Purpose,
    pub source_ip: Option<String>,
    pub break_glass: bool,
}

impl AuditCtx {
    /// A pipeline step acting on its own (queue-triggered), for treatment.
    pub fn system(function: &'static str, tenant: &str) -> Self {
        AuditCtx {
            actor: Actor {
                subject: format!("system:{function}"),
                role: "service".to_string(),
                tenant: tenant.to_string(),
            },
            function,
            purpose: Purpose::Treatment,
            source_ip: None,
            break_glass: false,
        }
    }

    /// An audit event by this actor.
    pub fn event(
        &self,
        action: Action,
        kind: &str,
        id: &str,
        patient: Option<&[u8]>,
        outcome: Outcome,
    ) -> AuditEvent {
        let mut e = AuditEvent::new(
            self.actor.clone(),
            action,
            ResourceRef {
                kind: kind.to_string(),
                id: id.to_string(),
            },
            self.function,
            self.purpose,
        );
        e.patient = patient.map(hex::encode);
        e.source_ip = self.source_ip.clone();
        e.outcome = outcome;
        e.break_glass = self.break_glass;
        e
    }
}

/// A record read from the store: its workflow row and its opened body.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    pub row: Row,
    pub body: T,
}

/// What a patient's row holds, sealed: demographics and allergies, plus the medication profile
/// that drug-utilization review reads (one sealed record per patient instead of one read per
/// past order).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PatientFile {
    pub patient: PatientRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<ProfileEntry>,
}

impl PatientFile {
    /// The empty file of a patient known so far only by the reference orders use.
    pub fn new(patient_ref: &str) -> Self {
        PatientFile {
            patient: PatientRecord {
                source_id: patient_ref.to_string(),
                ..Default::default()
            },
            profile: Vec::new(),
        }
    }
}

/// One of the patient's orders that review has seen, with its last fill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    pub rx_id: String,
    pub order: MedicationOrder,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fill: Option<rx_domain::Fill>,
}

impl ProfileEntry {
    /// The entry for one of the patient's orders: what drug-utilization review reads of it
    /// (product, quantity, supply, refills, structured dose, when written, the last fill's
    /// id, time and supply) and no more. The prescriber, status, source ids, note, units,
    /// dosage text and who filled it stay in the order's own record; the file is opened and
    /// sealed again at every review and fill, so it carries nothing it does not use.
    pub fn new(rx_id: &str, order: &MedicationOrder, last_fill: Option<&rx_domain::Fill>) -> Self {
        let mut order = order.clone();
        order.source_id = None;
        order.status = String::new();
        order.intent = String::new();
        order.patient_ref = String::new();
        order.requester = rx_domain::PrescriberRef::Missing;
        order.note = None;
        order.valid_until = None;
        order.quantity_unit = None;
        order.medication.ndc = None;
        for d in &mut order.dosage {
            d.text = None;
            d.dose_unit = None;
        }
        ProfileEntry {
            rx_id: rx_id.to_string(),
            order,
            last_fill: last_fill.map(Self::fill),
        }
    }

    /// What the profile keeps of a fill (see [`ProfileEntry::new`]).
    pub fn fill(fill: &rx_domain::Fill) -> rx_domain::Fill {
        rx_domain::Fill {
            by: String::new(),
            request_id: None,
            ..fill.clone()
        }
    }
}

/// Sealed, indexed, audited access to records.
#[derive(Clone)]
pub struct Vault {
    pub store: Arc<dyn RecordStore>,
    pub sealer: Arc<Sealer>,
    pub index: Arc<BlindIndex>,
}

impl Vault {
    pub fn new(store: Arc<dyn RecordStore>, sealer: Arc<Sealer>, index: Arc<BlindIndex>) -> Self {
        Vault {
            store,
            sealer,
            index,
        }
    }

    /// Blind index of a value in a domain.
    pub fn blind(&self, domain: &str, value: &str) -> Vec<u8> {
        self.index.index(domain, value).to_vec()
    }

    /// Blind index of a patient reference, hex, as audit events carry it.
    pub fn patient_hex(&self, patient_ref: &str) -> String {
        blind::to_hex(&self.index.index(domains::PATIENT, patient_ref))
    }

    /// Seal a body for a row of `table`.
    pub async fn seal<T: Serialize>(
        &self,
        table: Table,
        tenant: &str,
        id: &str,
        body: &T,
    ) -> RepoResult<Vec<u8>> {
        let plain = Zeroizing::new(serde_json::to_vec(body).map_err(|e| RepoError::Decode {
            table: table.as_str(),
            id: id.to_string(),
            kind: e.classify_name(),
        })?);
        let aad = Aad {
            tenant,
            table: table.as_str(),
            record_id: id,
            field: BODY,
        };
        Ok(self.sealer.seal(&aad, &plain).await?)
    }

    /// Open a row's body (no audit: callers audit through [`Vault::read`] and friends).
    async fn open<T: DeserializeOwned>(&self, row: &Row) -> RepoResult<T> {
        let aad = Aad {
            tenant: &row.tenant,
            table: row.table.as_str(),
            record_id: &row.id,
            field: BODY,
        };
        let plain = self.sealer.open(&aad, &row.sealed).await?;
        serde_json::from_slice(&plain).map_err(|e| RepoError::Decode {
            table: row.table.as_str(),
            id: row.id.clone(),
            kind: e.classify_name(),
        })
    }

    /// Open a row and append its read event first; the value is returned only if the audit
    /// event was stored.
    pub async fn open_audited<T: DeserializeOwned>(
        &self,
        cx: &AuditCtx,
        row: Row,
        kind: &str,
    ) -> RepoResult<Stored<T>> {
        let body = match self.open::<T>(&row).await {
            Ok(b) => b,
            Err(e) => {
                // A failed open is audited too; if even that fails the original error stands.
                let ev = cx.event(
                    Action::Read,
                    kind,
                    &row.id,
                    patient_of(row.table, row.index.as_deref()),
                    Outcome::Failed,
                );
                let _ = self.store.append(&[ev]).await;
                return Err(e);
            }
        };
        let ev = cx.event(
            Action::Read,
            kind,
            &row.id,
            patient_of(row.table, row.index.as_deref()),
            Outcome::Success,
        );
        self.store.append(&[ev]).await?;
        Ok(Stored { row, body })
    }

    /// Read one record by id.
    pub async fn read<T: DeserializeOwned>(
        &self,
        cx: &AuditCtx,
        table: Table,
        tenant: &str,
        id: &str,
    ) -> RepoResult<Option<Stored<T>>> {
        match self.store.get(table, tenant, id).await? {
            Some(row) => Ok(Some(self.open_audited(cx, row, kind_of(table)).await?)),
            None => Ok(None),
        }
    }

    /// Read one record by its unique key (blind index of a source identifier).
    pub async fn read_by_key<T: DeserializeOwned>(
        &self,
        cx: &AuditCtx,
        table: Table,
        tenant: &str,
        key: &[u8],
    ) -> RepoResult<Option<Stored<T>>> {
        match self.store.get_by_key(table, tenant, key).await? {
            Some(row) => Ok(Some(self.open_audited(cx, row, kind_of(table)).await?)),
            None => Ok(None),
        }
    }

    /// Read every record with the given blind index (one audit event per record).
    pub async fn read_by_index<T: DeserializeOwned>(
        &self,
        cx: &AuditCtx,
        table: Table,
        tenant: &str,
        index: &[u8],
    ) -> RepoResult<Vec<Stored<T>>> {
        let rows = self.store.find_by_index(table, tenant, index).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(self.open_audited(cx, row, kind_of(table)).await?);
        }
        Ok(out)
    }

    /// A new row sealed from `body`, with its create audit event, ready for a change set.
    #[allow(clippy::too_many_arguments)]
    pub async fn new_row<T: Serialize>(
        &self,
        cx: &AuditCtx,
        table: Table,
        tenant: &str,
        id: &str,
        status: &str,
        index: Option<Vec<u8>>,
        key: Option<Vec<u8>>,
        body: &T,
    ) -> RepoResult<(Write, AuditEvent)> {
        let now = Utc::now();
        let sealed = self.seal(table, tenant, id, body).await?;
        let ev = cx.event(
            Action::Create,
            kind_of(table),
            id,
            patient_of(table, index.as_deref()),
            Outcome::Success,
        );
        let row = Row {
            table,
            id: id.to_string(),
            tenant: tenant.to_string(),
            status: status.to_string(),
            version: 1,
            created_at: now,
            updated_at: now,
            index,
            key,
            sealed,
        };
        Ok((Write::Insert(row), ev))
    }

    /// The next version of `current` with a new status and body, and its update audit event.
    pub async fn updated_row<T: Serialize>(
        &self,
        cx: &AuditCtx,
        current: &Row,
        status: &str,
        body: &T,
    ) -> RepoResult<(Write, AuditEvent)> {
        let sealed = self
            .seal(current.table, &current.tenant, &current.id, body)
            .await?;
        let ev = cx.event(
            Action::Update,
            kind_of(current.table),
            &current.id,
            patient_of(current.table, current.index.as_deref()),
            Outcome::Success,
        );
        let mut row = current.clone();
        row.status = status.to_string();
        row.version = current.version + 1;
        row.updated_at = Utc::now();
        row.sealed = sealed;
        Ok((
            Write::Update {
                row,
                expected_version: current.version,
            },
            ev,
        ))
    }

    /// The write that stores a patient's file: the next version of `current`, or a new row
    /// found by the patient's blind index. Returns the row id with the write and its event.
    pub async fn patient_write(
        &self,
        cx: &AuditCtx,
        tenant: &str,
        patient_ref: &str,
        current: Option<&Row>,
        file: &PatientFile,
    ) -> RepoResult<(Write, AuditEvent, String)> {
        match current {
            Some(row) => {
                let (w, e) = self.updated_row(cx, row, "active", file).await?;
                Ok((w, e, row.id.clone()))
            }
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                let idx = self.blind(domains::PATIENT, patient_ref);
                let (w, e) = self
                    .new_row(
                        cx,
                        Table::Patients,
                        tenant,
                        &id,
                        "active",
                        Some(idx.clone()),
                        Some(idx),
                        file,
                    )
                    .await?;
                Ok((w, e, id))
            }
        }
    }

    /// Commit a change set atomically.
    pub async fn commit(&self, changes: Changes) -> RepoResult<()> {
        Ok(self.store.commit(changes).await?)
    }

    /// Append a PHI-free audit event on its own (denials, disclosures, break-glass).
    pub async fn audit(&self, events: &[AuditEvent]) -> RepoResult<()> {
        Ok(self.store.append(events).await?)
    }
}

/// A transition row for a prescription change.
pub fn transition(
    cx: &AuditCtx,
    row: &Row,
    from: Option<&str>,
    to: &str,
    version: u64,
) -> TransitionRow {
    TransitionRow {
        rx_id: row.id.clone(),
        tenant: row.tenant.clone(),
        version,
        from: from.map(str::to_string),
        to: to.to_string(),
        at: Utc::now(),
        actor: cx.actor.subject.clone(),
        function: cx.function.to_string(),
    }
}

/// The patient an audit event names: a row's blind index is the patient's only in the tables
/// whose index is a patient's (a prescriber's is their NPI's, a break-glass session's its user's).
pub fn patient_of(table: Table, index: Option<&[u8]>) -> Option<&[u8]> {
    match table {
        Table::Prescriptions | Table::Patients => index,
        Table::Prescribers | Table::Inputs | Table::BreakGlass => None,
    }
}

/// The FHIR-ish resource kind of a table, as audit events name it.
pub fn kind_of(table: Table) -> &'static str {
    match table {
        Table::Prescriptions => "MedicationRequest",
        Table::Patients => "Patient",
        Table::Prescribers => "Practitioner",
        Table::Inputs => "Input",
        Table::BreakGlass => "BreakGlass",
    }
}

/// Typed shorthands for the record kinds.
pub type PrescriptionDoc = Stored<PrescriptionRecord>;
pub type PatientDoc = Stored<PatientFile>;
pub type PrescriberDoc = Stored<PrescriberRecord>;

trait ClassifyName {
    fn classify_name(&self) -> String;
}

impl ClassifyName for serde_json::Error {
    /// The error's category and position, never the offending text.
    fn classify_name(&self) -> String {
        format!(
            "{:?} error at line {} column {}",
            self.classify(),
            self.line(),
            self.column()
        )
    }
}
