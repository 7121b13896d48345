//! Drug-utilization review: a new order against the patient's other active orders and allergies.
//!
//! Rules: ONC high-priority (and the table's clinical) drug–drug interactions; opioid with
//! benzodiazepine; allergy to an ingredient or class of the product; duplicate therapy (the same
//! ingredient on two active orders); total opioid dose in morphine milligram equivalents (CDC
//! 2022 factors, alerts at ≥ 50 and ≥ 90 MME/day); early refill; and a product missing from the
//! reference table, which the pharmacist must review by hand. Never panics on unknown data.
//!
//! Alert messages name drugs: they are PHI and are sealed with the record.

use crate::drugs::{DrugTable, Product};
use crate::{Alert, AlertKind, Allergy, Evidence, Fill, MedicationOrder, Severity};
use chrono::{DateTime, Duration, Utc};

/// Another order of the same patient, with its most recent fill if any.
#[derive(Debug, Clone, Copy)]
pub struct OtherOrder<'a> {
    /// The other order's prescription id (quoted in the evidence).
    pub id: &'a str,
    pub order: &'a MedicationOrder,
    pub last_fill: Option<&'a Fill>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DurConfig {
    /// Orders with no supply duration (no fill days supply, no order days supply) count as active
    /// this many days after they were written or last filled.
    pub default_active_days: u32,
    /// A fill of the same product is early while less than this share of the previous fill's
    /// supply has been used.
    pub early_refill_threshold: f64,
}

impl Default for DurConfig {
    fn default() -> Self {
        DurConfig {
            default_active_days: 30,
            early_refill_threshold: 0.75,
        }
    }
}

/// Opioid daily dose at or above this is a moderate alert (CDC 2022: reassess benefits and risks).
pub const MME_MODERATE: f64 = 50.0;
/// Opioid daily dose at or above this is a high alert.
pub const MME_HIGH: f64 = 90.0;

/// Whether an order counts as the patient's current therapy at `now`: from when it was last
/// filled (or written) for its days supply (the fill's, else the order's, else
/// `cfg.default_active_days`). An order with neither a fill nor a written date counts as active.
/// The order's pipeline status is the caller's filter ([`crate::Status::is_active_therapy`]).
pub fn is_active(
    order: &MedicationOrder,
    last_fill: Option<&Fill>,
    cfg: &DurConfig,
    now: DateTime<Utc>,
) -> bool {
    let start = last_fill.map(|f| f.at).or(order.authored_on);
    let Some(start) = start else { return true };
    let supply = last_fill
        .and_then(|f| f.days_supply)
        .or(order.days_supply)
        .unwrap_or(cfg.default_active_days);
    now < start + Duration::days(i64::from(supply))
}

/// Units of the product taken per day: from the structured dosage (dose × times per day), else
/// quantity ÷ days supply. `None` when the order says neither.
pub fn units_per_day(order: &MedicationOrder) -> Option<f64> {
    let from_dosage: f64 = order
        .dosage
        .iter()
        .filter_map(|d| Some(d.dose_quantity? * d.per_day?))
        .sum();
    if from_dosage > 0.0 {
        return Some(from_dosage);
    }
    match (order.quantity, order.days_supply) {
        (Some(q), Some(d)) if d > 0 && q > 0.0 => Some(q / f64::from(d)),
        _ => None,
    }
}

/// Patches applied at the same time (the dose quantity, default one).
fn patches_worn(order: &MedicationOrder) -> f64 {
    order
        .dosage
        .iter()
        .filter_map(|d| d.dose_quantity)
        .fold(0.0, f64::max)
        .max(1.0)
}

/// Daily dose of the order in morphine milligram equivalents: strength × units per day × the CDC
/// 2022 factor; for a fentanyl patch, mcg/hr × patches worn × 2.4. `None` for a product with no
/// MME factor or an order that says neither dosage nor quantity and days supply.
pub fn daily_mme(order: &MedicationOrder, product: &Product, _cfg: &DurConfig) -> Option<f64> {
    let factor = product.mme_factor?;
    let strength = product.strength_mg?;
    if product.is_patch() {
        return Some(strength * patches_worn(order) * factor);
    }
    Some(strength * units_per_day(order)? * factor)
}

fn num(x: f64) -> String {
    let r = (x * 100.0).round() / 100.0;
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r}")
    }
}

/// The arithmetic behind [`daily_mme`], for the evidence.
fn mme_arithmetic(order: &MedicationOrder, product: &Product, mme: f64) -> String {
    let factor = product.mme_factor.unwrap_or(0.0);
    let strength = product.strength_mg.unwrap_or(0.0);
    if product.is_patch() {
        format!(
            "{}: {} mcg/hr × {} patch(es) × {} = {} MME/day",
            product.name,
            num(strength),
            num(patches_worn(order)),
            num(factor),
            num(mme)
        )
    } else {
        let per_day = units_per_day(order).unwrap_or(0.0);
        format!(
            "{}: {} mg × {} {}/day × {} = {} MME/day",
            product.name,
            num(strength),
            num(per_day),
            product.unit,
            num(factor),
            num(mme)
        )
    }
}

fn order_evidence(other: &OtherOrder<'_>, detail: String) -> Evidence {
    Evidence {
        kind: "order".into(),
        reference: Some(other.id.to_string()),
        detail,
    }
}

fn product_name<'a>(order: &'a MedicationOrder, product: Option<&'a Product>) -> &'a str {
    product
        .map(|p| p.name.as_str())
        .or(order.medication.display.as_deref())
        .or(order.medication.rxnorm.as_deref())
        .unwrap_or("the ordered product")
}

/// Reviews `order` against the patient's other orders (only those [`is_active`] at `now` count)
/// and allergies.
pub fn review(
    order: &MedicationOrder,
    others: &[OtherOrder<'_>],
    allergies: &[Allergy],
    drugs: &DrugTable,
    cfg: &DurConfig,
    now: DateTime<Utc>,
) -> Vec<Alert> {
    let mut alerts = Vec::new();
    let product = order
        .medication
        .rxnorm
        .as_deref()
        .and_then(|c| drugs.product(c));
    let active: Vec<(&OtherOrder<'_>, Option<&Product>)> = others
        .iter()
        .filter(|o| is_active(o.order, o.last_fill, cfg, now))
        .map(|o| {
            let p = o
                .order
                .medication
                .rxnorm
                .as_deref()
                .and_then(|c| drugs.product(c));
            (o, p)
        })
        .collect();

    let Some(product) = product else {
        alerts.push(unknown_product(order));
        // Still catch an allergy named in the order's own text (e.g. "Aspirin 81 MG ...").
        alerts.extend(allergy_alerts_by_text(order, allergies));
        return alerts;
    };

    alerts.extend(allergy_alerts(product, allergies));
    for (other, other_product) in &active {
        let Some(op) = other_product else { continue };
        alerts.extend(interaction_alerts(product, other, op, drugs));
        if let Some(a) = opioid_benzodiazepine(product, other, op) {
            alerts.push(a);
        }
        if let Some(a) = duplicate_or_early(product, other, op, cfg, now) {
            alerts.push(a);
        }
    }
    if let Some(a) = high_mme(order, product, &active, cfg) {
        alerts.push(a);
    }
    let mut alerts = merge_duplicate_therapy(alerts);
    for a in &mut alerts {
        cap_evidence(a);
    }
    alerts
}

/// Evidence items an alert lists at most; the rest are counted in a last item. A patient with
/// thousands of active orders would otherwise make every new order's record (and its review)
/// grow with all of them.
pub const MAX_EVIDENCE: usize = 20;

fn cap_evidence(a: &mut Alert) {
    if a.evidence.len() > MAX_EVIDENCE {
        let more = a.evidence.len() - (MAX_EVIDENCE - 1);
        a.evidence.truncate(MAX_EVIDENCE - 1);
        a.evidence.push(Evidence {
            kind: "more".into(),
            reference: None,
            detail: format!("{more} more not listed"),
        });
    }
}

/// One duplicate-therapy alert per order, however many active orders share the ingredient: the
/// pharmacist reads one sentence and sees every other order in the evidence.
fn merge_duplicate_therapy(alerts: Vec<Alert>) -> Vec<Alert> {
    let (dups, mut out): (Vec<Alert>, Vec<Alert>) = alerts
        .into_iter()
        .partition(|a| a.kind == AlertKind::DuplicateTherapy);
    let mut dups = dups.into_iter();
    if let Some(mut first) = dups.next() {
        let mut others = 1;
        for d in dups {
            others += 1;
            first.evidence.extend(d.evidence);
        }
        if others > 1 {
            let listed = if first.evidence.len() > MAX_EVIDENCE {
                format!("the first {} are in the evidence", MAX_EVIDENCE - 1)
            } else {
                "each is in the evidence".to_string()
            };
            first.message = format!(
                "{} ({others} other active orders share an ingredient; {listed})",
                first.message
            );
        }
        out.push(first);
    }
    out
}

fn unknown_product(order: &MedicationOrder) -> Alert {
    let code = order.medication.rxnorm.as_deref().unwrap_or("none");
    Alert {
        kind: AlertKind::UnknownProduct,
        severity: Severity::Moderate,
        message: format!(
            "{} (RxNorm {code}) is not in the drug reference table, so interactions, allergies, duplicate therapy and dose could not be checked automatically; review the order by hand.",
            product_name(order, None)
        ),
        evidence: vec![Evidence {
            kind: "product".into(),
            reference: order.medication.rxnorm.clone(),
            detail: "no entry in the drug reference table".into(),
        }],
    }
}

fn allergy_is_current(a: &Allergy) -> bool {
    !matches!(
        a.clinical_status.as_deref().map(str::trim),
        Some("inactive" | "resolved" | "entered-in-error")
    )
}

/// The substances an allergy names: its text and code displays, lower-cased, split at "/", ",",
/// "+" and " and ", with "(substance)"-style qualifiers dropped.
fn allergy_terms(a: &Allergy) -> Vec<String> {
    let mut texts: Vec<&str> = vec![a.substance.as_str()];
    texts.extend(a.codes.iter().filter_map(|c| c.display.as_deref()));
    let mut out: Vec<String> = Vec::new();
    for t in texts {
        let lower = t.to_lowercase();
        let cleaned = match lower.find('(') {
            Some(i) => lower[..i].to_string(),
            None => lower,
        };
        for part in cleaned
            .replace(" and ", "/")
            .split(['/', ',', '+', ';'])
            .map(str::trim)
        {
            if !part.is_empty() && !out.iter().any(|x| x == part) {
                out.push(part.to_string());
            }
        }
    }
    out
}

fn contains_word(haystack: &str, word: &str) -> bool {
    haystack
        .split(|c: char| !c.is_alphanumeric())
        .collect::<Vec<_>>()
        .windows(word.split_whitespace().count().max(1))
        .any(|w| w.join(" ") == word)
}

/// What of the product an allergy term matches: an ingredient (same name, or named in the term,
/// e.g. "aspirin 81 mg") or a class (e.g. "penicillin" or "penicillins" vs amoxicillin).
fn allergy_match(term: &str, product: &Product) -> Option<String> {
    if let Some(i) = product
        .ingredients
        .iter()
        .find(|i| term == i.as_str() || contains_word(term, i))
    {
        return Some(format!("ingredient {i}"));
    }
    let singular = term.strip_suffix('s').unwrap_or(term);
    product
        .classes
        .iter()
        .find(|c| term == c.as_str() || singular == c.as_str())
        .map(|c| format!("class {c}"))
}

fn allergy_evidence(a: &Allergy, detail: String) -> Evidence {
    Evidence {
        kind: "allergy".into(),
        reference: a.source_id.clone(),
        detail,
    }
}

/// One row of `data/cross_sensitivity.tsv`.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossSensitivity {
    /// An ingredient or class as an allergy names it.
    pub allergen: String,
    /// The product class that may cross-react.
    pub class: String,
    pub severity: Severity,
    /// Why, in a clause a pharmacist reads.
    pub note: String,
}

const CROSS_SENSITIVITY_TSV: &str = include_str!("../data/cross_sensitivity.tsv");

/// Parses the cross-sensitivity table; `Err` names the line.
pub fn parse_cross_sensitivity(text: &str) -> Result<Vec<CrossSensitivity>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') || line.starts_with("allergen\t") {
            continue;
        }
        let f: Vec<&str> = line.split('\t').map(str::trim).collect();
        let severity = match f.get(2).copied() {
            Some("low") => Severity::Low,
            Some("moderate") => Severity::Moderate,
            Some("high") => Severity::High,
            _ => {
                return Err(format!(
                    "cross_sensitivity.tsv line {}: severity must be low, moderate or high",
                    i + 1
                ))
            }
        };
        if f.len() != 4 || f.iter().any(|x| x.is_empty()) {
            return Err(format!(
                "cross_sensitivity.tsv line {}: expected 4 cells",
                i + 1
            ));
        }
        out.push(CrossSensitivity {
            allergen: f[0].to_lowercase(),
            class: f[1].to_lowercase(),
            severity,
            note: f[3].to_string(),
        });
    }
    Ok(out)
}

/// The embedded cross-sensitivity table (a test pins that it parses).
pub fn cross_sensitivities() -> &'static [CrossSensitivity] {
    static TABLE: std::sync::OnceLock<Vec<CrossSensitivity>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| parse_cross_sensitivity(CROSS_SENSITIVITY_TSV).unwrap_or_default())
}

/// An allergy that does not name the product's ingredients or classes, but a related one.
fn cross_match<'t>(
    term: &str,
    product: &Product,
    table: &'t [CrossSensitivity],
) -> Option<&'t CrossSensitivity> {
    let singular = term.strip_suffix('s').unwrap_or(term);
    table.iter().find(|c| {
        (term == c.allergen || singular == c.allergen || contains_word(term, &c.allergen))
            && product.has_class(&c.class)
    })
}

fn allergy_alerts(product: &Product, allergies: &[Allergy]) -> Vec<Alert> {
    let mut out = Vec::new();
    for a in allergies.iter().filter(|a| allergy_is_current(a)) {
        let terms = allergy_terms(a);
        let found = terms
            .iter()
            .find_map(|t| allergy_match(t, product).map(|m| (t.clone(), m)));
        if found.is_none() {
            if let Some((term, c)) = terms
                .iter()
                .find_map(|t| cross_match(t, product, cross_sensitivities()).map(|c| (t, c)))
            {
                out.push(Alert {
                    kind: AlertKind::Allergy,
                    severity: c.severity,
                    message: format!(
                        "The patient has a recorded allergy to {}, and {} is a {}: {}; confirm with the patient or prescriber before dispensing.",
                        a.substance.trim(),
                        product.name,
                        c.class,
                        c.note
                    ),
                    evidence: vec![allergy_evidence(
                        a,
                        format!("allergy '{term}' cross-sensitivity with class {}", c.class),
                    )],
                });
            }
        }
        if let Some((term, what)) = found {
            out.push(Alert {
                kind: AlertKind::Allergy,
                severity: Severity::High,
                message: format!(
                    "The patient has a recorded allergy to {}, and {} contains {}; do not dispense without confirming the allergy with the patient or prescriber.",
                    a.substance.trim(),
                    product.name,
                    what.split_once(' ').map_or(what.as_str(), |(_, n)| n)
                ),
                evidence: vec![allergy_evidence(
                    a,
                    format!(
                        "allergy '{term}' (criticality {}) matches {what}",
                        a.criticality.as_deref().unwrap_or("not stated")
                    ),
                )],
            });
        }
    }
    out
}

fn allergy_alerts_by_text(order: &MedicationOrder, allergies: &[Allergy]) -> Vec<Alert> {
    let Some(display) = order.medication.display.as_deref() else {
        return Vec::new();
    };
    let text = display.to_lowercase();
    let mut out = Vec::new();
    for a in allergies.iter().filter(|a| allergy_is_current(a)) {
        if let Some(term) = allergy_terms(a)
            .into_iter()
            .find(|t| contains_word(&text, t))
        {
            out.push(Alert {
                kind: AlertKind::Allergy,
                severity: Severity::High,
                message: format!(
                    "The patient has a recorded allergy to {}, and the ordered product's name ({display}) mentions it; confirm before dispensing.",
                    a.substance.trim()
                ),
                evidence: vec![allergy_evidence(
                    a,
                    format!("allergy '{term}' appears in the product text"),
                )],
            });
        }
    }
    out
}

fn interaction_alerts(
    product: &Product,
    other: &OtherOrder<'_>,
    other_product: &Product,
    drugs: &DrugTable,
) -> Vec<Alert> {
    let mut out = Vec::new();
    for a in &product.ingredients {
        for b in &other_product.ingredients {
            if let Some(i) = drugs.interaction(a, b) {
                let source = if i.source.starts_with("onc") {
                    "ONC high-priority interaction"
                } else {
                    "interaction"
                };
                out.push(Alert {
                    kind: AlertKind::DrugInteraction,
                    severity: i.severity,
                    message: format!(
                        "{} ({a}) with {} ({b}) on another active order: {source}. {}",
                        product.name, other_product.name, i.summary
                    ),
                    evidence: vec![order_evidence(
                        other,
                        format!("{a} + {b} ({}, {})", i.source, i.severity.as_str()),
                    )],
                });
            }
        }
    }
    out
}

fn opioid_benzodiazepine(
    product: &Product,
    other: &OtherOrder<'_>,
    other_product: &Product,
) -> Option<Alert> {
    let (opioid, benzo) =
        if product.has_class("opioid") && other_product.has_class("benzodiazepine") {
            (product, other_product)
        } else if product.has_class("benzodiazepine") && other_product.has_class("opioid") {
            (other_product, product)
        } else {
            return None;
        };
    Some(Alert {
        kind: AlertKind::OpioidBenzodiazepine,
        severity: Severity::High,
        message: format!(
            "{} (opioid) and {} (benzodiazepine) together: concurrent use can cause profound sedation, respiratory depression, coma and death (FDA boxed warning); confirm with the prescriber before dispensing.",
            opioid.name, benzo.name
        ),
        evidence: vec![order_evidence(
            other,
            format!(
                "other active order: {} ({})",
                other_product.name,
                if other_product.has_class("opioid") {
                    "opioid"
                } else {
                    "benzodiazepine"
                }
            ),
        )],
    })
}

/// Same product with a recent fill → early refill when less than the threshold of its supply has
/// been used (and nothing when it has: a renewal). Otherwise a shared ingredient → duplicate
/// therapy.
fn duplicate_or_early(
    product: &Product,
    other: &OtherOrder<'_>,
    other_product: &Product,
    cfg: &DurConfig,
    now: DateTime<Utc>,
) -> Option<Alert> {
    if product.rxnorm == other_product.rxnorm {
        if let Some(fill) = other.last_fill {
            let supply = fill
                .days_supply
                .or(other.order.days_supply)
                .unwrap_or(cfg.default_active_days)
                .max(1);
            let elapsed = (now - fill.at).num_minutes() as f64 / (24.0 * 60.0);
            let used = (elapsed / f64::from(supply)).max(0.0);
            if used >= cfg.early_refill_threshold {
                return None;
            }
            let earliest = fill.at
                + Duration::minutes(
                    (f64::from(supply) * cfg.early_refill_threshold * 24.0 * 60.0).round() as i64,
                );
            return Some(Alert {
                kind: AlertKind::EarlyRefill,
                severity: Severity::Moderate,
                message: format!(
                    "{} was last filled {} day(s) ago for a {supply}-day supply; only {}% of it should be used, below the {}% expected before a refill (earliest {}).",
                    product.name,
                    num(elapsed.max(0.0).floor()),
                    num((used * 100.0).floor()),
                    num(cfg.early_refill_threshold * 100.0),
                    earliest.format("%Y-%m-%d")
                ),
                evidence: vec![Evidence {
                    kind: "fill".into(),
                    reference: Some(fill.id.clone()),
                    detail: format!(
                        "order {}: filled {} for {supply} days; {} of {supply} days elapsed = {}% used",
                        other.id,
                        fill.at.format("%Y-%m-%d"),
                        num(elapsed.max(0.0)),
                        num(used * 100.0)
                    ),
                }],
            });
        }
    }
    let shared: Vec<&String> = product
        .ingredients
        .iter()
        .filter(|i| other_product.has_ingredient(i))
        .collect();
    if shared.is_empty() {
        return None;
    }
    let names = shared
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Some(Alert {
        kind: AlertKind::DuplicateTherapy,
        severity: Severity::Moderate,
        message: format!(
            "{} duplicates {names} already on another active order ({}); check that both are intended and the combined dose is safe.",
            product.name, other_product.name
        ),
        evidence: vec![order_evidence(other, format!("shared ingredient(s): {names}"))],
    })
}

fn high_mme(
    order: &MedicationOrder,
    product: &Product,
    active: &[(&OtherOrder<'_>, Option<&Product>)],
    cfg: &DurConfig,
) -> Option<Alert> {
    if !product.has_class("opioid") {
        return None;
    }
    let own = daily_mme(order, product, cfg)?;
    let mut evidence = vec![Evidence {
        kind: "dose".into(),
        reference: None,
        detail: format!("this order: {}", mme_arithmetic(order, product, own)),
    }];
    let mut total = own;
    for (other, op) in active {
        let Some(op) = op.filter(|p| p.has_class("opioid")) else {
            continue;
        };
        if let Some(m) = daily_mme(other.order, op, cfg) {
            total += m;
            evidence.push(order_evidence(other, mme_arithmetic(other.order, op, m)));
        }
    }
    let severity = if total >= MME_HIGH {
        Severity::High
    } else if total >= MME_MODERATE {
        Severity::Moderate
    } else {
        return None;
    };
    evidence.push(Evidence {
        kind: "dose".into(),
        reference: None,
        detail: format!("total: {} MME/day", num(total)),
    });
    let threshold = if severity == Severity::High {
        MME_HIGH
    } else {
        MME_MODERATE
    };
    Some(Alert {
        kind: AlertKind::HighMme,
        severity,
        message: format!(
            "The patient's opioid dose with this order is {} morphine milligram equivalents a day, at or above {}; the CDC 2022 guideline advises reassessing benefit and risk (and offering naloxone) at this dose.",
            num(total),
            num(threshold)
        ),
        evidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Coding, Dosage, MedicationCode, PrescriberRef};
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, 1, 9, 0, 0).unwrap()
    }

    fn days(n: i64) -> Duration {
        Duration::days(n)
    }

    fn order(rxnorm: &str, per_day: Option<f64>) -> MedicationOrder {
        MedicationOrder {
            source_id: None,
            status: "active".into(),
            intent: "order".into(),
            patient_ref: "p-1".into(),
            requester: PrescriberRef::Npi("1234567893".into()),
            medication: MedicationCode {
                rxnorm: Some(rxnorm.into()),
                ndc: None,
                display: None,
            },
            authored_on: Some(t0()),
            quantity: None,
            quantity_unit: None,
            days_supply: Some(30),
            refills: Some(0),
            valid_until: None,
            dosage: per_day
                .map(|p| {
                    vec![Dosage {
                        dose_quantity: Some(1.0),
                        per_day: Some(p),
                        ..Dosage::default()
                    }]
                })
                .unwrap_or_default(),
            note: None,
        }
    }

    fn allergy(text: &str) -> Allergy {
        Allergy {
            source_id: Some("al-1".into()),
            codes: vec![],
            substance: text.into(),
            criticality: Some("high".into()),
            clinical_status: Some("active".into()),
        }
    }

    fn cfg() -> DurConfig {
        DurConfig::default()
    }

    fn run(o: &MedicationOrder, others: &[OtherOrder<'_>], allergies: &[Allergy]) -> Vec<Alert> {
        review(o, others, allergies, DrugTable::embedded(), &cfg(), t0())
    }

    fn kinds(a: &[Alert]) -> Vec<(AlertKind, Severity)> {
        a.iter().map(|a| (a.kind, a.severity)).collect()
    }

    fn product(rx: &str) -> &'static Product {
        DrugTable::embedded().product(rx).unwrap()
    }

    const OXY_10: &str = "1049683";
    const OXY_APAP: &str = "1049221";
    const FENTANYL_25: &str = "245134";
    const MORPHINE_15: &str = "892582";
    const ALPRAZOLAM: &str = "308048";
    const SIMVASTATIN_20: &str = "312961";
    const CLARITHROMYCIN: &str = "197517";
    const ASPIRIN_81: &str = "243670";
    const AMOXICILLIN: &str = "308192";
    const TYLENOL: &str = "209387";
    const LISINOPRIL: &str = "314076";
    const WARFARIN: &str = "855332";
    const IBUPROFEN_400: &str = "206905";
    const SMX_TMP: &str = "198335";

    #[test]
    fn oxycodone_10mg_four_a_day_is_60_mme() {
        let o = order(OXY_10, Some(4.0));
        assert_eq!(daily_mme(&o, product(OXY_10), &cfg()), Some(60.0));
    }

    #[test]
    fn mme_without_dosage_comes_from_quantity_over_days_supply() {
        // 120 tablets of 10 mg oxycodone for 30 days = 4 a day = 60 MME.
        let mut o = order(OXY_10, None);
        o.quantity = Some(120.0);
        assert_eq!(daily_mme(&o, product(OXY_10), &cfg()), Some(60.0));
    }

    #[test]
    fn fentanyl_25_mcg_patch_is_60_mme() {
        let o = order(FENTANYL_25, Some(1.0 / 3.0));
        assert_eq!(daily_mme(&o, product(FENTANYL_25), &cfg()), Some(60.0));
    }

    #[test]
    fn mme_is_unknown_without_dosage_or_supply_and_for_non_opioids() {
        let mut o = order(OXY_10, None);
        o.days_supply = None;
        assert_eq!(daily_mme(&o, product(OXY_10), &cfg()), None);
        let o = order(ALPRAZOLAM, Some(3.0));
        assert_eq!(daily_mme(&o, product(ALPRAZOLAM), &cfg()), None);
    }

    #[test]
    fn opioid_at_60_mme_raises_a_moderate_alert_with_the_arithmetic() {
        let alerts = run(&order(OXY_10, Some(4.0)), &[], &[]);
        assert_eq!(kinds(&alerts), [(AlertKind::HighMme, Severity::Moderate)]);
        let ev = &alerts[0].evidence;
        assert!(
            ev[0]
                .detail
                .contains("10 mg × 4 tablet/day × 1.5 = 60 MME/day"),
            "{ev:?}"
        );
        assert_eq!(ev.last().unwrap().detail, "total: 60 MME/day");
    }

    #[test]
    fn opioid_below_50_mme_raises_no_alert() {
        // Oxycodone 5 mg (with acetaminophen) × 6/day × 1.5 = 45 MME.
        assert!(run(&order(OXY_APAP, Some(6.0)), &[], &[]).is_empty());
    }

    #[test]
    fn opioids_across_active_orders_add_up_to_a_high_mme_alert() {
        // 60 (oxycodone 10 × 4 × 1.5) + 45 (morphine 15 × 3 × 1) = 105 MME/day.
        let other = order(MORPHINE_15, Some(3.0));
        let others = [OtherOrder {
            id: "rx-morphine",
            order: &other,
            last_fill: None,
        }];
        let alerts = run(&order(OXY_10, Some(4.0)), &others, &[]);
        assert_eq!(kinds(&alerts), [(AlertKind::HighMme, Severity::High)]);
        let a = &alerts[0];
        assert!(a.is_blocking());
        assert!(a.message.contains("105 morphine milligram equivalents"));
        assert!(a
            .evidence
            .iter()
            .any(|e| e.reference.as_deref() == Some("rx-morphine")
                && e.detail.contains("= 45 MME/day")));
    }

    #[test]
    fn exactly_90_mme_is_high() {
        // Oxycodone 10 mg × 6/day × 1.5 = 90.
        let alerts = run(&order(OXY_10, Some(6.0)), &[], &[]);
        assert_eq!(kinds(&alerts), [(AlertKind::HighMme, Severity::High)]);
    }

    #[test]
    fn opioid_with_active_benzodiazepine_is_high() {
        let benzo = order(ALPRAZOLAM, Some(2.0));
        let others = [OtherOrder {
            id: "rx-benzo",
            order: &benzo,
            last_fill: None,
        }];
        let alerts = run(&order(OXY_APAP, Some(2.0)), &others, &[]);
        assert_eq!(
            kinds(&alerts),
            [(AlertKind::OpioidBenzodiazepine, Severity::High)]
        );
        assert_eq!(alerts[0].evidence[0].reference.as_deref(), Some("rx-benzo"));
        assert!(alerts[0].message.contains("respiratory depression"));
    }

    #[test]
    fn benzodiazepine_with_active_opioid_is_high_too() {
        let opioid = order(OXY_APAP, Some(2.0));
        let others = [OtherOrder {
            id: "rx-opioid",
            order: &opioid,
            last_fill: None,
        }];
        let alerts = run(&order(ALPRAZOLAM, Some(2.0)), &others, &[]);
        assert_eq!(
            kinds(&alerts),
            [(AlertKind::OpioidBenzodiazepine, Severity::High)]
        );
    }

    #[test]
    fn simvastatin_with_clarithromycin_is_a_high_onc_interaction() {
        let macrolide = order(CLARITHROMYCIN, Some(2.0));
        let others = [OtherOrder {
            id: "rx-clari",
            order: &macrolide,
            last_fill: None,
        }];
        let alerts = run(&order(SIMVASTATIN_20, Some(1.0)), &others, &[]);
        assert_eq!(
            kinds(&alerts),
            [(AlertKind::DrugInteraction, Severity::High)]
        );
        assert!(alerts[0].message.contains("ONC high-priority"));
        assert!(alerts[0].message.contains("rhabdomyolysis"));
        assert_eq!(alerts[0].evidence[0].reference.as_deref(), Some("rx-clari"));
    }

    #[test]
    fn warfarin_with_ibuprofen_is_a_moderate_interaction() {
        let nsaid = order(IBUPROFEN_400, Some(3.0));
        let others = [OtherOrder {
            id: "rx-nsaid",
            order: &nsaid,
            last_fill: None,
        }];
        let alerts = run(&order(WARFARIN, Some(1.0)), &others, &[]);
        assert_eq!(
            kinds(&alerts),
            [(AlertKind::DrugInteraction, Severity::Moderate)]
        );
        assert!(!alerts[0].is_blocking());
    }

    #[test]
    fn interaction_with_an_inactive_order_is_not_raised() {
        // Written 40 days ago, no supply duration: active only for the default 30 days.
        let mut macrolide = order(CLARITHROMYCIN, Some(2.0));
        macrolide.days_supply = None;
        macrolide.authored_on = Some(t0() - days(40));
        let others = [OtherOrder {
            id: "rx-old",
            order: &macrolide,
            last_fill: None,
        }];
        assert!(run(&order(SIMVASTATIN_20, Some(1.0)), &others, &[]).is_empty());
    }

    #[test]
    fn allergy_to_an_ingredient_is_high() {
        let mut a = allergy("Aspirin");
        a.codes.push(Coding {
            system: crate::RXNORM.into(),
            code: "1191".into(),
            display: Some("Aspirin".into()),
        });
        let alerts = run(&order(ASPIRIN_81, Some(1.0)), &[], &[a]);
        assert_eq!(kinds(&alerts), [(AlertKind::Allergy, Severity::High)]);
        assert_eq!(alerts[0].evidence[0].reference.as_deref(), Some("al-1"));
        assert!(alerts[0].message.contains("allergy to Aspirin"));
    }

    #[test]
    fn allergy_match_ignores_case_and_combination_text() {
        // Synthea records "Sulfamethoxazole / Trimethoprim".
        let alerts = run(
            &order(SMX_TMP, Some(2.0)),
            &[],
            &[allergy("SULFAMETHOXAZOLE / TRIMETHOPRIM")],
        );
        assert_eq!(kinds(&alerts), [(AlertKind::Allergy, Severity::High)]);
    }

    #[test]
    fn penicillin_class_allergy_matches_amoxicillin() {
        for text in ["Penicillin", "penicillins", "Penicillin (substance)"] {
            let alerts = run(&order(AMOXICILLIN, Some(3.0)), &[], &[allergy(text)]);
            assert_eq!(
                kinds(&alerts),
                [(AlertKind::Allergy, Severity::High)],
                "{text}"
            );
            assert!(alerts[0].evidence[0].detail.contains("class penicillin"));
        }
    }

    #[test]
    fn unrelated_or_resolved_allergy_raises_nothing() {
        let mut resolved = allergy("Aspirin");
        resolved.clinical_status = Some("resolved".into());
        let alerts = run(
            &order(ASPIRIN_81, Some(1.0)),
            &[],
            &[allergy("Tree nut (substance)"), allergy("Latex"), resolved],
        );
        assert!(alerts.is_empty(), "{alerts:?}");
    }

    #[test]
    fn same_ingredient_on_two_active_orders_is_duplicate_therapy() {
        // Tylenol with acetaminophen/oxycodone: acetaminophen twice.
        let combo = order(OXY_APAP, Some(2.0));
        let others = [OtherOrder {
            id: "rx-percocet",
            order: &combo,
            last_fill: None,
        }];
        let alerts = run(&order(TYLENOL, Some(4.0)), &others, &[]);
        assert_eq!(
            kinds(&alerts),
            [(AlertKind::DuplicateTherapy, Severity::Moderate)]
        );
        assert!(alerts[0].message.contains("acetaminophen"));
        assert_eq!(
            alerts[0].evidence[0].reference.as_deref(),
            Some("rx-percocet")
        );
    }

    #[test]
    fn an_alert_lists_at_most_max_evidence_items_and_counts_the_rest() {
        let combo = order(OXY_APAP, Some(2.0));
        let ids: Vec<String> = (0..50).map(|i| format!("rx-{i}")).collect();
        let others: Vec<OtherOrder<'_>> = ids
            .iter()
            .map(|id| OtherOrder {
                id,
                order: &combo,
                last_fill: None,
            })
            .collect();
        let alerts = run(&order(TYLENOL, Some(4.0)), &others, &[]);
        let dup = alerts
            .iter()
            .find(|a| a.kind == AlertKind::DuplicateTherapy)
            .expect("duplicate therapy");
        assert_eq!(dup.evidence.len(), MAX_EVIDENCE);
        assert_eq!(dup.evidence[0].reference.as_deref(), Some("rx-0"));
        let last = dup.evidence.last().expect("last");
        assert_eq!(
            (last.kind.as_str(), last.detail.as_str()),
            ("more", "31 more not listed")
        );
        assert!(
            dup.message
                .contains("50 other active orders share an ingredient; the first 19"),
            "{}",
            dup.message
        );
    }

    #[test]
    fn cross_sensitivity_table_parses() {
        let t = parse_cross_sensitivity(CROSS_SENSITIVITY_TSV).expect("parses");
        assert!(t
            .iter()
            .any(|c| c.allergen == "aspirin" && c.class == "nsaid"));
        assert_eq!(cross_sensitivities().len(), t.len());
        assert!(parse_cross_sensitivity("aspirin\tnsaid\tsevere\tx").is_err());
    }

    #[test]
    fn aspirin_allergy_flags_another_nsaid_as_cross_sensitivity() {
        let alerts = run(&order(IBUPROFEN_400, Some(3.0)), &[], &[allergy("Aspirin")]);
        assert_eq!(kinds(&alerts), [(AlertKind::Allergy, Severity::Moderate)]);
        assert!(alerts[0].message.contains("nsaid"), "{}", alerts[0].message);
        // aspirin itself is the direct, high allergy
        let direct = run(&order(ASPIRIN_81, Some(1.0)), &[], &[allergy("Aspirin")]);
        assert_eq!(kinds(&direct), [(AlertKind::Allergy, Severity::High)]);
    }

    #[test]
    fn several_orders_sharing_an_ingredient_give_one_alert_with_all_evidence() {
        let a = order(OXY_APAP, Some(2.0));
        let b = order(OXY_APAP, Some(3.0));
        let others = [
            OtherOrder {
                id: "rx-a",
                order: &a,
                last_fill: None,
            },
            OtherOrder {
                id: "rx-b",
                order: &b,
                last_fill: None,
            },
        ];
        let alerts = run(&order(TYLENOL, Some(4.0)), &others, &[]);
        let dups: Vec<_> = alerts
            .iter()
            .filter(|a| a.kind == AlertKind::DuplicateTherapy)
            .collect();
        assert_eq!(dups.len(), 1, "{alerts:?}");
        let refs: Vec<_> = dups[0]
            .evidence
            .iter()
            .filter_map(|e| e.reference.as_deref())
            .collect();
        assert_eq!(refs, ["rx-a", "rx-b"]);
        assert!(dups[0].message.contains("2 other active orders"));
    }

    fn fill_at(at: DateTime<Utc>, supply: u32) -> Fill {
        Fill {
            id: "fill-1".into(),
            at,
            quantity: 30.0,
            days_supply: Some(supply),
            by: "rph".into(),
            refill_number: 0,
            partial: false,
            request_id: None,
        }
    }

    #[test]
    fn same_product_at_half_the_supply_is_an_early_refill() {
        let previous = order(LISINOPRIL, Some(1.0));
        let f = fill_at(t0() - days(15), 30);
        let others = [OtherOrder {
            id: "rx-prev",
            order: &previous,
            last_fill: Some(&f),
        }];
        let alerts = run(&order(LISINOPRIL, Some(1.0)), &others, &[]);
        assert_eq!(
            kinds(&alerts),
            [(AlertKind::EarlyRefill, Severity::Moderate)]
        );
        let a = &alerts[0];
        assert!(
            a.message.contains("15 day(s) ago for a 30-day supply"),
            "{}",
            a.message
        );
        assert!(a.message.contains("only 50%"), "{}", a.message);
        assert!(a.evidence[0]
            .detail
            .contains("15 of 30 days elapsed = 50% used"));
    }

    #[test]
    fn same_product_after_75_percent_of_the_supply_is_a_renewal_not_an_alert() {
        let previous = order(LISINOPRIL, Some(1.0));
        let f = fill_at(t0() - days(23), 30);
        let others = [OtherOrder {
            id: "rx-prev",
            order: &previous,
            last_fill: Some(&f),
        }];
        assert!(run(&order(LISINOPRIL, Some(1.0)), &others, &[]).is_empty());
    }

    #[test]
    fn unknown_product_is_a_moderate_alert_not_a_panic() {
        let mut o = order("99999999", Some(1.0));
        o.medication.display = Some("Mystery 10 MG Oral Tablet".into());
        let other = order(OXY_10, Some(4.0));
        let others = [OtherOrder {
            id: "rx-1",
            order: &other,
            last_fill: None,
        }];
        let alerts = run(&o, &others, &[allergy("Latex")]);
        assert_eq!(
            kinds(&alerts),
            [(AlertKind::UnknownProduct, Severity::Moderate)]
        );
        assert!(alerts[0].message.contains("review the order by hand"));
    }

    #[test]
    fn unknown_product_still_catches_an_allergy_named_in_its_text() {
        let mut o = order("99999999", None);
        o.medication.rxnorm = None;
        o.medication.display = Some("Aspirin 325 MG Enteric Coated Tablet".into());
        let alerts = run(&o, &[], &[allergy("Aspirin")]);
        assert_eq!(
            kinds(&alerts),
            [
                (AlertKind::UnknownProduct, Severity::Moderate),
                (AlertKind::Allergy, Severity::High)
            ]
        );
    }

    #[test]
    fn other_orders_with_unknown_products_are_skipped() {
        let other = order("0", Some(1.0));
        let others = [OtherOrder {
            id: "rx-x",
            order: &other,
            last_fill: None,
        }];
        assert!(run(&order(LISINOPRIL, Some(1.0)), &others, &[]).is_empty());
    }

    #[test]
    fn order_without_supply_duration_is_active_for_the_default_30_days() {
        let mut o = order(LISINOPRIL, None);
        o.days_supply = None;
        let c = cfg();
        assert!(is_active(&o, None, &c, t0() + days(29)));
        assert!(!is_active(&o, None, &c, t0() + days(30)));
    }

    #[test]
    fn order_is_active_for_its_days_supply_from_the_last_fill() {
        let o = order(LISINOPRIL, Some(1.0)); // 30-day supply written t0
        let f = fill_at(t0() + days(20), 90);
        let c = cfg();
        assert!(!is_active(&o, None, &c, t0() + days(31)));
        assert!(is_active(&o, Some(&f), &c, t0() + days(100)));
        assert!(!is_active(&o, Some(&f), &c, t0() + days(111)));
    }
}
