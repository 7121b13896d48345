//! The end-of-run report: counts per final status, top rejection reasons, DUR alerts by kind,
//! controlled-substance orders and their outcome, throughput and the audit trail's state.
//! Printed for a person, or as one JSON object with `--json`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::pipeline::OrderOutcome;

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Encryption {
    pub seals: u64,
    pub opens: u64,
    pub seconds: f64,
    /// Percent of the run's elapsed time.
    pub share_percent: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub orders_total: u64,
    pub by_status: BTreeMap<String, u64>,
    /// Reason code → orders (rejections, clarifications, refusals).
    pub reasons: BTreeMap<String, u64>,
    pub alerts_by_kind: BTreeMap<String, u64>,
    pub alerts_by_severity: BTreeMap<String, u64>,
    /// Schedule → final status → orders.
    pub controlled: BTreeMap<String, BTreeMap<String, u64>>,
    /// Lines or resources that could not be used (kept sealed in the inputs table).
    pub input_errors: u64,
    /// Resource types in the input the pipeline does not use, with counts.
    pub skipped_resources: BTreeMap<String, u64>,
    pub elapsed_seconds: f64,
    /// Orders processed by this run (not those an earlier run had stored) per second.
    pub orders_per_second: f64,
    /// Values sealed and opened, and the share of the run's wall time spent doing it.
    pub encryption: Encryption,
    /// Events in the data directory's trail after the run.
    pub audit_events: u64,
    /// Events this run added.
    pub audit_events_written: u64,
    pub audit_verified: bool,
    /// Orders an earlier run had already stored in this data directory (not processed again).
    pub already_stored: u64,
    /// Advice for the operator, when the figures suggest a mistake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_problem: Option<String>,
    pub data_dir: String,
    /// One entry per input order (kept only when asked for: `--json`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub orders: Vec<OrderOutcome>,
    /// The pharmacist who verified and dispensed (bulk runs with one named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_as: Option<String>,
    #[serde(skip)]
    keep_orders: bool,
    /// Reason code → the final statuses of the orders that carry it (for the human report).
    #[serde(skip)]
    reason_statuses: BTreeMap<String, std::collections::BTreeSet<String>>,
}

/// Reason codes the human report lists (more than the demo's planned cases give).
const TOP_REASONS: usize = 20;

/// What a final status means, for the human report.
fn gloss(status: &str) -> &'static str {
    match status {
        "dispensed" => "filled; nothing left on the order",
        "partially-dispensed" => "filled once; refills (or the rest) remain on the order",
        "verified" => "approved by the pharmacist, not filled (see its note)",
        "awaiting-verification" => "held for a pharmacist: a blocking alert",
        "needs-clarification" => "sent back to the prescriber to complete",
        "rejected" => "not dispensable as written (see the reasons)",
        "refused-at-intake" => "intake refused it (kept sealed, named above)",
        "reviewed" | "validated" | "received" => "waiting for the next step",
        _ => "",
    }
}

impl Report {
    pub fn new(keep_orders: bool, data_dir: String) -> Self {
        Report {
            keep_orders,
            data_dir,
            ..Default::default()
        }
    }

    pub fn add(&mut self, o: OrderOutcome) {
        self.orders_total += 1;
        self.already_stored += u64::from(o.already_stored);
        *self.by_status.entry(o.status.clone()).or_default() += 1;
        for r in &o.reasons {
            *self.reasons.entry(r.code.clone()).or_default() += 1;
            self.reason_statuses
                .entry(r.code.clone())
                .or_default()
                .insert(o.status.clone());
        }
        for a in &o.alerts {
            *self
                .alerts_by_kind
                .entry(a.kind.as_str().to_string())
                .or_default() += 1;
            *self
                .alerts_by_severity
                .entry(a.severity.as_str().to_string())
                .or_default() += 1;
        }
        if let Some(s) = o.schedule {
            *self
                .controlled
                .entry(s.to_string())
                .or_default()
                .entry(o.status.clone())
                .or_default() += 1;
        }
        if self.keep_orders {
            self.orders.push(o);
        }
    }

    pub fn finish(&mut self, elapsed: Duration, sealing: rx_guard::envelope::SealStats) {
        self.elapsed_seconds = elapsed.as_secs_f64();
        let seconds = sealing.nanos as f64 / 1e9;
        self.encryption = Encryption {
            seals: sealing.seals,
            opens: sealing.opens,
            seconds,
            share_percent: if self.elapsed_seconds > 0.0 {
                100.0 * seconds / self.elapsed_seconds
            } else {
                0.0
            },
        };
        // Orders an earlier run had stored are only looked up: they do not count as throughput.
        self.orders_per_second = if self.elapsed_seconds > 0.0 {
            self.orders_total.saturating_sub(self.already_stored) as f64 / self.elapsed_seconds
        } else {
            0.0
        };
    }

    /// The report for a person.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, t: String| {
            s.push_str(&t);
            s.push('\n');
        };
        line(
            &mut s,
            format!(
                "\n{} orders in {:.2} s ({:.0} orders/s{})",
                self.orders_total,
                self.elapsed_seconds,
                self.orders_per_second,
                if self.already_stored > 0 {
                    format!(
                        " over the {} processed; {} were already stored",
                        self.orders_total.saturating_sub(self.already_stored),
                        self.already_stored
                    )
                } else {
                    String::new()
                }
            ),
        );
        line(
            &mut s,
            format!(
                "encryption: {} seals, {} opens, {:.3} s ({:.2}% of the run)",
                self.encryption.seals,
                self.encryption.opens,
                self.encryption.seconds,
                self.encryption.share_percent
            ),
        );
        line(&mut s, "\nFinal status".into());
        for (k, v) in &self.by_status {
            line(&mut s, format!("  {k:<24} {v:>8}   {}", gloss(k)));
        }
        if let Some(p) = &self.verified_as {
            line(
                &mut s,
                format!("  (orders without a blocking alert were verified and dispensed as {p})"),
            );
        }
        if !self.reasons.is_empty() {
            line(
                &mut s,
                "\nTop reasons (rejected, needs clarification, refused; notes on orders left with the pharmacist)".into(),
            );
            let mut top: Vec<_> = self.reasons.iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let shown = top.len().min(TOP_REASONS);
            let left = top.len() - shown;
            for (k, v) in top.into_iter().take(shown) {
                let statuses = self
                    .reason_statuses
                    .get(k)
                    .map(|set| set.iter().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                line(&mut s, format!("  {k:<32} {v:>8}   {statuses}"));
            }
            if left > 0 {
                line(
                    &mut s,
                    format!("  ({left} more reason codes: --json lists them all)"),
                );
            }
        }
        if !self.alerts_by_kind.is_empty() {
            line(&mut s, "\nDrug-utilization review alerts".into());
            for (k, v) in &self.alerts_by_kind {
                line(&mut s, format!("  {k:<32} {v:>8}"));
            }
            let sev: Vec<String> = self
                .alerts_by_severity
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            line(&mut s, format!("  by severity: {}", sev.join(", ")));
        }
        if !self.controlled.is_empty() {
            line(&mut s, "\nControlled-substance orders".into());
            for (sched, by) in &self.controlled {
                let total: u64 = by.values().sum();
                let parts: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v}")).collect();
                line(
                    &mut s,
                    format!("  {sched:<14} {total:>6}: {}", parts.join(", ")),
                );
            }
        }
        if self.input_errors > 0 {
            line(&mut s, format!("\n{} input line(s) could not be used; they are kept sealed in the data dir (inputs table) and named above", self.input_errors));
        }
        if !self.skipped_resources.is_empty() {
            let parts: Vec<String> = self
                .skipped_resources
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            line(
                &mut s,
                format!("\nNot used by the pipeline: {}", parts.join(", ")),
            );
        }
        if self.already_stored > 0 {
            line(&mut s, format!("\n{} order(s) were already in this data directory (an earlier run stored them) and were not processed again; use a new --data-dir to process them afresh", self.already_stored));
        }
        if let Some(h) = &self.hint {
            line(&mut s, format!("\nhint: {h}"));
        }
        line(
            &mut s,
            format!(
                "\nAudit trail: {} events written by this run, {} in the data directory, {}",
                self.audit_events_written,
                self.audit_events,
                if self.audit_verified {
                    "verified intact".to_string()
                } else {
                    format!(
                        "NOT intact: {}",
                        self.audit_problem.as_deref().unwrap_or("unknown")
                    )
                }
            ),
        );
        line(&mut s, format!("Data directory: {}", self.data_dir));
        s
    }
}
