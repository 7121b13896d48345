//! The auditor's reads: search, the accounting of disclosures, the FHIR export and the review of
//! break-glass sessions. Each reads the trail through the store port; none opens PHI.

use std::io::Write;

use chrono::{DateTime, Duration, Utc};
use rx_guard::access::BREAK_GLASS_MAX_MINUTES;
use rx_guard::audit::fhir::to_fhir;
use rx_guard::audit::{
    Action, AuditEvent, AuditQuery, ChainedEvent, Outcome, Purpose, ResourceRef,
};
use rx_store::{RecordStore, Table};
use serde::{Deserialize, Serialize};

use crate::verify::PAGE;
use crate::{AuditError, Result};

/// One event as found in the trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// The event's chain hash (hex), to quote it or ask for its inclusion proof.
    pub hash: String,
    pub event: AuditEvent,
}

fn parse(ev: &ChainedEvent) -> Result<AuditEvent> {
    serde_json::from_slice(&ev.body).map_err(|e| AuditError::UnreadableEvent {
        seq: ev.seq,
        reason: e.to_string(),
    })
}

fn entry(ev: &ChainedEvent) -> Result<Entry> {
    Ok(Entry {
        seq: ev.seq,
        hash: hex::encode(ev.hash),
        event: parse(ev)?,
    })
}

/// Events matching `query`, in trail order (criteria ANDed; a `limit` of 0 means no limit).
pub async fn search(store: &dyn RecordStore, query: &AuditQuery) -> Result<Vec<Entry>> {
    store.audit_search(query).await?.iter().map(entry).collect()
}

/// One line of an accounting of disclosures (45 CFR 164.528(b)(2)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disclosure {
    pub seq: u64,
    /// Date of the disclosure.
    pub date: DateTime<Utc>,
    /// Who received the PHI (the event's `detail`), when the event names them.
    pub recipient: Option<String>,
    /// What was disclosed: the record, by kind and rxflow id.
    pub what: ResourceRef,
    /// The purpose of the disclosure (HL7 PurposeOfUse code).
    pub purpose: Purpose,
    /// Who made the disclosure (JWT subject).
    pub by: String,
    pub outcome: Outcome,
    pub event_id: String,
}

/// The accounting of disclosures of one patient, named by blind index (hex), oldest first:
/// every `disclose` event of that patient.
pub async fn disclosures(
    store: &dyn RecordStore,
    patient_blind_hex: &str,
) -> Result<Vec<Disclosure>> {
    let query = AuditQuery {
        patient: Some(patient_blind_hex.to_ascii_lowercase()),
        action: Some(Action::Disclose),
        ..AuditQuery::default()
    };
    store
        .audit_search(&query)
        .await?
        .iter()
        .map(|ev| {
            let e = parse(ev)?;
            Ok(Disclosure {
                seq: ev.seq,
                date: e.at,
                recipient: e.detail,
                what: e.resource,
                purpose: e.purpose,
                by: e.actor.subject,
                outcome: e.outcome,
                event_id: e.id,
            })
        })
        .collect()
}

/// Writes every event as one FHIR R4 AuditEvent per line (NDJSON), in trail order, paging
/// through the trail. Returns the number written.
pub async fn export_fhir_ndjson<W: Write + Send>(
    store: &dyn RecordStore,
    writer: &mut W,
) -> Result<u64> {
    let mut written = 0u64;
    let mut next = 1u64;
    loop {
        let page = store.audit_range(next, PAGE).await?;
        let Some(last) = page.last() else { break };
        next = last.seq.saturating_add(1);
        for ev in &page {
            let resource = to_fhir(&parse(ev)?, ev.seq);
            serde_json::to_writer(&mut *writer, &resource).map_err(std::io::Error::from)?;
            writer.write_all(b"\n")?;
            written += 1;
        }
    }
    writer.flush()?;
    Ok(written)
}

/// What a break-glass session touched: one access flagged break-glass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Touch {
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub action: Action,
    pub resource: ResourceRef,
    /// Blind index of the patient, when the record has one.
    pub patient: Option<String>,
    pub outcome: Outcome,
    pub function: String,
}

/// One opened break-glass session and every access it granted, for review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakGlassSession {
    /// The grant id (the `break-glass` event's resource id).
    pub grant_id: String,
    /// Seq of the `break-glass` event that opened it.
    pub seq: u64,
    pub subject: String,
    pub role: String,
    pub tenant: String,
    pub opened_at: DateTime<Utc>,
    /// End of the window (exclusive).
    pub expires_at: DateTime<Utc>,
    /// True when `expires_at` is the stored grant's; false when the grant row was not found and
    /// the longest window a grant can have was assumed.
    pub window_from_grant: bool,
    pub touched: Vec<Touch>,
}

/// The window of a stored grant: its row's status is `<granted_at>/<expires_at>`.
async fn grant_window(
    store: &dyn RecordStore,
    tenant: &str,
    grant_id: &str,
) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>> {
    let Some(row) = store.get(Table::BreakGlass, tenant, grant_id).await? else {
        return Ok(None);
    };
    let parsed = row.status.split_once('/').and_then(|(from, to)| {
        let from = DateTime::parse_from_rfc3339(from).ok()?.with_timezone(&Utc);
        let to = DateTime::parse_from_rfc3339(to).ok()?.with_timezone(&Utc);
        Some((from, to))
    });
    Ok(parsed)
}

/// Every `break-glass` event (a session opened), oldest first, with the events flagged
/// break-glass by the same subject inside the grant's window.
pub async fn break_glass_sessions(store: &dyn RecordStore) -> Result<Vec<BreakGlassSession>> {
    let opened = store
        .audit_search(&AuditQuery {
            action: Some(Action::BreakGlass),
            ..AuditQuery::default()
        })
        .await?;
    let mut sessions = Vec::with_capacity(opened.len());
    for ev in &opened {
        let e = parse(ev)?;
        let window = grant_window(store, &e.actor.tenant, &e.resource.id).await?;
        let window_from_grant = window.is_some();
        let (from, to) =
            window.unwrap_or((e.at, e.at + Duration::minutes(BREAK_GLASS_MAX_MINUTES)));
        let flagged = store
            .audit_search(&AuditQuery {
                subject: Some(e.actor.subject.clone()),
                from: Some(from.min(e.at)),
                to: Some(to),
                break_glass_only: true,
                ..AuditQuery::default()
            })
            .await?;
        let mut touched = Vec::new();
        for f in &flagged {
            let t = parse(f)?;
            if t.action == Action::BreakGlass || t.actor.tenant != e.actor.tenant || t.at >= to {
                continue;
            }
            touched.push(Touch {
                seq: f.seq,
                at: t.at,
                action: t.action,
                resource: t.resource,
                patient: t.patient,
                outcome: t.outcome,
                function: t.function,
            });
        }
        sessions.push(BreakGlassSession {
            grant_id: e.resource.id,
            seq: ev.seq,
            subject: e.actor.subject,
            role: e.actor.role,
            tenant: e.actor.tenant,
            opened_at: e.at,
            expires_at: to,
            window_from_grant,
            touched,
        });
    }
    Ok(sessions)
}
