//! Validation: is this a prescription a pharmacy may act on? Prescriber (NPI, DEA), patient,
//! drug, quantity, refills, expiry and the controlled-substance rules of 21 CFR 1306; at dispense,
//! whether one more fill is allowed now ([`check_fill`]) and of what ([`check_fill_quantity`],
//! [`check_fill_days_supply`]).
//!
//! Impossible values (a quantity no fill holds, a date written in the future) are rejected: the
//! prescriber must send a corrected prescription. Missing or unusable values (a zero quantity)
//! need clarification: the pharmacist asks the prescriber what was meant.
//!
//! Every reason has a stable kebab-case code and a sentence that says why. The sentences name
//! no patient, no prescriber and no drug (only the schedule), so they are safe in reports.

use crate::drugs::{DrugTable, Product, Schedule};
use crate::dur::DurConfig;
use crate::ids::{normalize_ndc, npi_check, parse_dea};
use crate::{
    Fill, MedicationOrder, PrescriberRecord, PrescriberRef, PrescriptionRecord, Reason, Validation,
};
use chrono::{DateTime, Duration, NaiveDate, Utc};

/// Configurable limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// A non-controlled (and schedule II or V) prescription expires this many days after it was
    /// written. Federal law sets no limit; one year is the common state rule.
    pub non_controlled_expiry_days: u32,
    /// Schedule III–IV: no fill more than this many days after the written date (21 CFR 1306.22:
    /// six months).
    pub controlled_fill_window_days: u32,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            non_controlled_expiry_days: 365,
            controlled_fill_window_days: 180,
        }
    }
}

/// Schedule III–IV: at most five refills (21 CFR 1306.22(a)).
pub const MAX_REFILLS_III_IV: u32 = 5;

/// Any other order: at most 99 refills, the most NCPDP SCRIPT's two-digit refills field can
/// carry; a larger numberOfRepeatsAllowed cannot have come from a prescriber's system.
pub const MAX_REFILLS: u32 = 99;

/// The most units one fill may hold. The largest stock bottles hold 1,000 tablets, and a 90-day
/// supply at the highest daily counts, or litres of oral solution counted in mL, stays well
/// below this; a larger quantity is a keying or unit error, never a prescription.
pub const MAX_QUANTITY_PER_FILL: f64 = 10_000.0;

/// The least amount worth dispensing: a thousandth of a unit (0.001 mL) is the finest a syringe
/// or pharmacy balance measures. Less is a rounding remnant, not a dose.
pub const MIN_QUANTITY: f64 = 0.001;

/// The longest days supply one fill may cover: a year, the longest any prescription stays valid
/// (non-controlled orders expire a year after they are written).
pub const MAX_DAYS_SUPPLY: u32 = 365;

/// How far after now a written date may lie before it counts as dated in the future: the
/// prescriber's clock and time zone may differ from ours by up to a day.
pub const WRITTEN_DATE_SKEW: Duration = Duration::days(1);

/// No prescription still on file was written before this year: an older date is a placeholder
/// (0001-01-01) or a typo, not the date the prescriber signed.
pub const EARLIEST_WRITTEN_YEAR: i32 = 1900;

/// FHIR MedicationRequest intents that are orders a pharmacy may fill.
const ORDER_INTENTS: [&str; 5] = [
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
];

fn schedule_phrase(s: Schedule) -> &'static str {
    match s {
        Schedule::II => "a schedule II controlled substance",
        Schedule::III => "a schedule III controlled substance",
        Schedule::IV => "a schedule IV controlled substance",
        Schedule::V => "a schedule V controlled substance",
    }
}

fn intent_reason(intent: &str) -> Reason {
    let what = match intent {
        "plan" => "it records a plan of care, not an order a pharmacy may dispense",
        "proposal" => "it is a suggestion for a prescriber to consider, not an order",
        "directive" => "it is a patient directive, not an order",
        "option" => "it is one option of a request group, not an order by itself",
        "" => "the intent is missing, so it cannot be taken as an order",
        _ => "only an order (intent 'order' or 'original-order') may be dispensed",
    };
    Reason::new(
        "not-an-order",
        format!("The request's intent is '{intent}': {what}."),
    )
}

fn status_reason(status: &str) -> Reason {
    let what = match status {
        "stopped" => "it is medication history, not a prescription to dispense",
        "completed" => "the prescription has been completed and cannot be filled again",
        "cancelled" => "the prescriber cancelled it before it was filled",
        "entered-in-error" => "it was recorded by mistake and is not a prescription",
        "draft" => "the prescriber has not signed it yet",
        "on-hold" => "the prescriber has put it on hold; dispense only after it is released",
        "unknown" => {
            "the sender does not know whether it is still valid; confirm with the prescriber"
        }
        "" => "the status is missing; only an active order may be dispensed",
        _ => "only an active order may be dispensed",
    };
    Reason::new(
        "status-not-dispensable",
        format!("The order's status is '{status}': {what}."),
    )
}

/// Validates an order for dispensing. `prescriber` is the prescriber as resolved at intake (a
/// contained or Bundle Practitioner in `order.requester` is used when it is `None`). `now` is when
/// the order is validated (in a replay, the order's authoredOn).
pub fn validate(
    order: &MedicationOrder,
    prescriber: Option<&PrescriberRecord>,
    drugs: &DrugTable,
    rules: &Rules,
    now: DateTime<Utc>,
) -> Validation {
    let mut reject: Vec<Reason> = Vec::new();
    let mut clarify: Vec<Reason> = Vec::new();

    // What kind of request is this?
    let intent = order.intent.trim();
    if !ORDER_INTENTS.contains(&intent) {
        reject.push(intent_reason(intent));
    }
    let status = order.status.trim();
    if status != "active" {
        reject.push(status_reason(status));
    }

    // Patient.
    if order.patient_ref.trim().is_empty() {
        reject.push(Reason::new(
            "patient-missing",
            "The order names no patient: a prescription must identify the patient it is for.",
        ));
    }

    // Drug.
    let product = order
        .medication
        .rxnorm
        .as_deref()
        .and_then(|code| drugs.product(code));
    if let Some(ndc) = order.medication.ndc.as_deref() {
        if normalize_ndc(ndc).is_err() {
            reject.push(Reason::new(
                "ndc-invalid",
                "The product's NDC is not a valid 10-digit (4-4-2, 5-3-2, 5-4-1) or 11-digit code, so the product cannot be identified; ask the prescriber to confirm the product.",
            ));
        }
    }
    if order.medication.rxnorm.is_none()
        && order.medication.ndc.is_none()
        && order
            .medication
            .display
            .as_deref()
            .is_none_or(|d| d.trim().is_empty())
    {
        reject.push(Reason::new(
            "drug-missing",
            "The order names no medication (no RxNorm code, NDC or text).",
        ));
    }
    let schedule = product.and_then(|p| p.schedule);

    // Prescriber.
    check_prescriber(order, prescriber, schedule, &mut reject);

    // Quantity, days supply, refills and written date: values a prescription can carry.
    reject.extend(implausible_values(order, schedule, now));
    if order
        .quantity
        .is_some_and(|q| q.is_nan() || q < MIN_QUANTITY)
    {
        clarify.push(Reason::new(
            "quantity-invalid",
            format!("The quantity to dispense is zero, negative or less than {MIN_QUANTITY} of a unit; ask the prescriber for the intended quantity."),
        ));
    }
    if order.days_supply == Some(0) {
        clarify.push(Reason::new(
            "days-supply-invalid",
            "The order's days supply is zero days; ask the prescriber how many days the quantity should last.",
        ));
    }

    // Controlled-substance rules.
    if let Some(s) = schedule {
        let phrase = schedule_phrase(s);
        if order.quantity.is_none() {
            clarify.push(Reason::new(
                "quantity-required",
                format!("The order is for {phrase} but states no quantity to dispense; the prescriber must supply it (21 CFR 1306.05)."),
            ));
        }
        if order.days_supply.is_none() {
            clarify.push(Reason::new(
                "days-supply-required",
                format!("The order is for {phrase} but states no days supply; the prescriber must supply it so the fill and any early refill can be checked."),
            ));
        }
        if order.authored_on.is_none() {
            clarify.push(Reason::new(
                "written-date-required",
                format!("The order is for {phrase} but carries no date written; a controlled-substance prescription must be dated (21 CFR 1306.05)."),
            ));
        }
        let refills = order.refills.unwrap_or(0);
        match s {
            Schedule::II if refills > 0 => reject.push(Reason::new(
                "schedule-ii-refills",
                format!("The order allows {refills} refill(s), but a schedule II prescription may not be refilled (21 CFR 1306.12); the prescriber must issue a new prescription for each fill."),
            )),
            Schedule::III | Schedule::IV if refills > MAX_REFILLS_III_IV => reject.push(Reason::new(
                "refills-exceed-limit",
                format!("The order allows {refills} refills, but {phrase} may be refilled at most {MAX_REFILLS_III_IV} times (21 CFR 1306.22)."),
            )),
            _ => {}
        }
    }

    // Expiry.
    if let Some(reason) = expiry(order, product, rules, now) {
        reject.push(reason);
    }

    if !reject.is_empty() {
        reject.extend(clarify);
        Validation::Rejected(reject)
    } else if !clarify.is_empty() {
        Validation::NeedsClarification(clarify)
    } else {
        Validation::Valid
    }
}

fn check_prescriber(
    order: &MedicationOrder,
    prescriber: Option<&PrescriberRecord>,
    schedule: Option<Schedule>,
    reject: &mut Vec<Reason>,
) {
    let prescriber = prescriber.or(match &order.requester {
        PrescriberRef::Inline(p) => Some(p.as_ref()),
        _ => None,
    });
    let npi = prescriber
        .and_then(|p| p.npi.as_deref())
        .or(match &order.requester {
            PrescriberRef::Npi(n) => Some(n.as_str()),
            _ => None,
        });

    if prescriber.is_none() {
        reject.push(match order.requester {
            PrescriberRef::Missing => Reason::new(
                "prescriber-missing",
                "The order names no prescriber: a prescription must identify who wrote it.",
            ),
            _ => Reason::new(
                "prescriber-unknown",
                "The prescriber the order names is not in the prescriber directory, so their registration cannot be checked; confirm the prescriber and resubmit.",
            ),
        });
    }
    match npi {
        None if prescriber.is_some() => reject.push(Reason::new(
            "npi-missing",
            "The prescriber has no NPI on file; a prescription needs the prescriber's National Provider Identifier.",
        )),
        Some(n) => {
            if let Err(e) = npi_check(n) {
                reject.push(Reason::new(
                    "npi-invalid",
                    format!("The prescriber's NPI is not valid: {e}."),
                ));
            }
        }
        None => {}
    }

    let Some(s) = schedule else { return };
    let phrase = schedule_phrase(s);
    match prescriber.and_then(|p| p.dea.as_deref()) {
        None => reject.push(Reason::new(
            "dea-required",
            format!("The order is for {phrase}, and the prescriber has no DEA registration number on file; only a DEA-registered practitioner may prescribe it (21 CFR 1306.03)."),
        )),
        Some(dea) => match parse_dea(dea) {
            Err(e) => reject.push(Reason::new(
                "dea-invalid",
                format!("The order is for {phrase}, and the prescriber's DEA number is not valid: {e}."),
            )),
            Ok(d) if !d.registrant.may_prescribe() => reject.push(Reason::new(
                "dea-registrant-cannot-prescribe",
                format!("The prescriber's DEA number belongs to a {} registration, which may not prescribe controlled substances.", d.registrant),
            )),
            Ok(_) => {}
        },
    }
}

/// Values no real prescription carries: a quantity above what any fill holds, more refills than
/// NCPDP SCRIPT can send (schedule II–IV have their own, tighter limits), a days supply over a
/// year, and a written date in the future or before [`EARLIEST_WRITTEN_YEAR`]. Validation rejects
/// them; [`check_fill`] refuses them again for an order stored before these rules.
fn implausible_values(
    order: &MedicationOrder,
    schedule: Option<Schedule>,
    now: DateTime<Utc>,
) -> Vec<Reason> {
    let mut out = Vec::new();
    if order.quantity.is_some_and(|q| q > MAX_QUANTITY_PER_FILL) {
        out.push(Reason::new(
            "quantity-implausible",
            format!("The order's quantity per fill is more than {MAX_QUANTITY_PER_FILL} units, more than any single fill holds; the prescriber must send a corrected prescription."),
        ));
    }
    let refills = order.refills.unwrap_or(0);
    let own_limit = matches!(schedule, Some(Schedule::II | Schedule::III | Schedule::IV));
    if !own_limit && refills > MAX_REFILLS {
        out.push(Reason::new(
            "refills-exceed-limit",
            format!("The order allows {refills} refills, but a prescription may allow at most {MAX_REFILLS} (the NCPDP SCRIPT limit); the prescriber must send a corrected prescription."),
        ));
    }
    if let Some(d) = order.days_supply.filter(|&d| d > MAX_DAYS_SUPPLY) {
        out.push(Reason::new(
            "days-supply-implausible",
            format!("The order's days supply is {d} days, more than the {MAX_DAYS_SUPPLY} days any one fill may cover; the prescriber must send a corrected prescription."),
        ));
    }
    out.extend(written_date(order, now));
    out
}

/// A written date in the future (beyond [`WRITTEN_DATE_SKEW`]) or before
/// [`EARLIEST_WRITTEN_YEAR`]. The sentences give no date: the date an order was written is PHI.
fn written_date(order: &MedicationOrder, now: DateTime<Utc>) -> Option<Reason> {
    let written = order.authored_on?;
    if now
        .checked_add_signed(WRITTEN_DATE_SKEW)
        .is_some_and(|latest| written > latest)
    {
        return Some(Reason::new(
            "written-date-in-future",
            "The prescription is dated more than a day in the future; a prescription carries the date it was signed and may not be postdated, so the prescriber must send a corrected prescription.",
        ));
    }
    let earliest = NaiveDate::from_ymd_opt(EARLIEST_WRITTEN_YEAR, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc());
    if earliest.is_some_and(|e| written < e) {
        return Some(Reason::new(
            "written-date-implausible",
            format!("The prescription's date written is before {EARLIEST_WRITTEN_YEAR}, which cannot be the date it was signed; the prescriber must send a corrected prescription."),
        ));
    }
    None
}

fn days(n: u32) -> Duration {
    Duration::days(i64::from(n))
}

/// Whether the order has expired at `now`: `valid_until` passed; schedule III–IV more than the
/// fill window after the written date; anything else more than the non-controlled expiry after it.
fn expiry(
    order: &MedicationOrder,
    product: Option<&Product>,
    rules: &Rules,
    now: DateTime<Utc>,
) -> Option<Reason> {
    if let Some(until) = order.valid_until {
        if now > until {
            return Some(Reason::new(
                "expired",
                "The prescription's validity period has ended; the prescriber must issue a new prescription.",
            ));
        }
    }
    let written = order.authored_on?;
    match product.and_then(|p| p.schedule) {
        Some(s @ (Schedule::III | Schedule::IV)) => {
            (now > written + days(rules.controlled_fill_window_days)).then(|| {
                Reason::new(
                    "expired",
                    format!(
                        "The prescription was written more than {} days ago; {} may not be filled or refilled more than six months after the date written (21 CFR 1306.22).",
                        rules.controlled_fill_window_days,
                        schedule_phrase(s)
                    ),
                )
            })
        }
        _ => (now > written + days(rules.non_controlled_expiry_days)).then(|| {
            Reason::new(
                "expired",
                format!(
                    "The prescription was written more than {} days ago and has expired; the prescriber must issue a new prescription.",
                    rules.non_controlled_expiry_days
                ),
            )
        }),
    }
}

/// The refill number the next fill would carry: 0 for the first fill; a partial fill is completed
/// under its own number; after a complete fill the next is a refill.
pub fn next_refill_number(record: &PrescriptionRecord) -> u32 {
    match record.fills.iter().max_by_key(|f| (f.refill_number, f.at)) {
        None => 0,
        Some(last) if last.partial => last.refill_number,
        Some(last) => last.refill_number + 1,
    }
}

/// Checks at dispense time whether one more fill is allowed at `now`: schedule II never refilled;
/// schedule III–IV at most five refills and nothing more than six months after the written date;
/// non-controlled expiry; no implausible order values; refills remaining on the order; and no
/// refill before `dur.early_refill_threshold` of the previous fill's supply is used (the share
/// early-refill DUR uses).
pub fn check_fill(
    record: &PrescriptionRecord,
    drugs: &DrugTable,
    rules: &Rules,
    dur: &DurConfig,
    now: DateTime<Utc>,
) -> Result<(), Reason> {
    let order = &record.order;
    let product = order
        .medication
        .rxnorm
        .as_deref()
        .and_then(|c| drugs.product(c));
    let next = next_refill_number(record);
    let allowed = order.refills.unwrap_or(0);

    if let Some(reason) = expiry(order, product, rules, now) {
        return Err(reason);
    }
    let schedule = product.and_then(|p| p.schedule);
    if let Some(reason) = implausible_values(order, schedule, now).into_iter().next() {
        return Err(reason);
    }
    match schedule {
        Some(Schedule::II) if next > 0 => {
            return Err(Reason::new(
                "schedule-ii-refills",
                "A schedule II prescription may not be refilled (21 CFR 1306.12); the original fill has been dispensed, so a new prescription is needed.",
            ))
        }
        Some(s @ (Schedule::III | Schedule::IV)) if next > MAX_REFILLS_III_IV => {
            return Err(Reason::new(
                "refills-exceed-limit",
                format!(
                    "This would be refill {next}; {} may be refilled at most {MAX_REFILLS_III_IV} times (21 CFR 1306.22).",
                    schedule_phrase(s)
                ),
            ))
        }
        _ => {}
    }
    if next > allowed {
        return Err(Reason::new(
            "no-refills-remaining",
            if allowed == 0 {
                "The prescription allows no refills and has been filled; the prescriber must issue a new prescription.".to_string()
            } else {
                format!("All {allowed} refill(s) the prescriber allowed have been dispensed; the prescriber must issue a new prescription.")
            },
        ));
    }
    match refill_too_soon(record, next, dur, now) {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

/// Fill `next` as a refill before `dur.early_refill_threshold` of the previous fill's supply is
/// used. Completing a partial fill is not a refill. The previous fill's supply runs from its first
/// part for the days its parts cover (a part dispensed after the earlier parts ran out starts
/// anew); with no days supply on the fills or the order, DUR's default active days.
fn refill_too_soon(
    record: &PrescriptionRecord,
    next: u32,
    dur: &DurConfig,
    now: DateTime<Utc>,
) -> Option<Reason> {
    let previous = next.checked_sub(1)?;
    if record.fills.iter().any(|f| f.refill_number == next) {
        return None;
    }
    let mut parts: Vec<&Fill> = record
        .fills
        .iter()
        .filter(|f| f.refill_number == previous)
        .collect();
    parts.sort_by_key(|f| f.at);
    let first = parts.first()?;
    let stated: u32 = parts
        .iter()
        .filter_map(|f| f.days_supply)
        .fold(0, u32::saturating_add);
    let supply = match stated {
        0 => record.order.days_supply.unwrap_or(dur.default_active_days),
        s => s,
    }
    .max(1);
    let minutes = |d: f64| Duration::minutes((d * 24.0 * 60.0).round() as i64);
    // When the supply on hand runs out: each part adds its days from the later of its dispense
    // and the end of what was on hand. `None` beyond the calendar: never due.
    let runs_out = match stated {
        0 => first.at.checked_add_signed(days(supply)),
        _ => parts.iter().try_fold(first.at, |end, f| {
            end.max(f.at)
                .checked_add_signed(days(f.days_supply.unwrap_or(0)))
        }),
    };
    let start = runs_out.and_then(|end| end.checked_sub_signed(days(supply)));
    let due = start.and_then(|s| {
        s.checked_add_signed(minutes(f64::from(supply) * dur.early_refill_threshold))
    });
    if due.is_some_and(|due| now >= due) {
        return None;
    }
    let used = start.map_or(0.0, |s| {
        ((now - s).num_minutes() as f64 / (f64::from(supply) * 24.0 * 60.0)).max(0.0)
    });
    let wait = due.map_or(String::new(), |due| {
        let left = ((due - now).num_minutes() as f64 / (24.0 * 60.0))
            .ceil()
            .max(1.0);
        format!(" It is due in {left} day(s).")
    });
    Some(Reason::new(
        "refill-too-soon",
        format!(
            "This would be refill {next}, but only {:.0}% of the previous fill's {supply}-day supply has been used; a refill may be dispensed once {:.0}% of it is used.{wait} If the patient needs more sooner, confirm with the prescriber.",
            (used * 100.0).floor(),
            dur.early_refill_threshold * 100.0
        ),
    ))
}

/// Checks the quantity of one fill: a finite number of units from [`MIN_QUANTITY`] to
/// [`MAX_QUANTITY_PER_FILL`].
pub fn check_fill_quantity(quantity: f64) -> Result<(), Reason> {
    if !quantity.is_finite() || quantity <= 0.0 {
        return Err(Reason::new(
            "quantity-invalid",
            "The quantity to dispense must be a positive number of units.",
        ));
    }
    if quantity < MIN_QUANTITY {
        return Err(Reason::new(
            "quantity-too-small",
            format!("The quantity to dispense is less than {MIN_QUANTITY} of a unit, less than can be measured out; enter the amount actually dispensed."),
        ));
    }
    if quantity > MAX_QUANTITY_PER_FILL {
        return Err(Reason::new(
            "quantity-implausible",
            format!("The quantity to dispense is more than {MAX_QUANTITY_PER_FILL} units, more than any single fill holds; enter the amount actually dispensed."),
        ));
    }
    Ok(())
}

/// Checks the days supply of one fill: from one day to [`MAX_DAYS_SUPPLY`].
pub fn check_fill_days_supply(days: u32) -> Result<(), Reason> {
    if days == 0 {
        return Err(Reason::new(
            "days-supply-invalid",
            "The days supply of a fill must be at least one day.",
        ));
    }
    if days > MAX_DAYS_SUPPLY {
        return Err(Reason::new(
            "days-supply-implausible",
            format!("The days supply of a fill is {days} days, more than the {MAX_DAYS_SUPPLY} days any one fill may cover."),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fill, MedicationCode};
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, 1, 9, 0, 0).unwrap()
    }

    fn order(rxnorm: &str) -> MedicationOrder {
        MedicationOrder {
            source_id: Some("mr-1".into()),
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
            quantity: Some(20.0),
            quantity_unit: Some("tablet".into()),
            days_supply: Some(5),
            refills: Some(0),
            valid_until: None,
            dosage: vec![],
            note: None,
        }
    }

    fn doctor(dea: Option<&str>) -> PrescriberRecord {
        PrescriberRecord {
            source_id: Some("pr-1".into()),
            npi: Some("1234567893".into()),
            dea: dea.map(Into::into),
            name: None,
        }
    }

    fn run(o: &MedicationOrder, p: Option<&PrescriberRecord>) -> Validation {
        validate(o, p, DrugTable::embedded(), &Rules::default(), t0())
    }

    fn codes(v: &Validation) -> Vec<&str> {
        match v {
            Validation::Valid => vec![],
            Validation::Rejected(r) | Validation::NeedsClarification(r) => {
                r.iter().map(|r| r.code.as_str()).collect()
            }
        }
    }

    const OXY_10: &str = "1049683";
    const MEPERIDINE: &str = "861467";
    const DIAZEPAM: &str = "197591";
    const LISINOPRIL: &str = "314076";
    const TRAMADOL: &str = "835603";

    #[test]
    fn complete_non_controlled_order_is_valid() {
        assert_eq!(
            run(&order(LISINOPRIL), Some(&doctor(None))),
            Validation::Valid
        );
    }

    #[test]
    fn non_controlled_order_without_quantity_or_days_supply_is_valid() {
        // Like every order in the Synthea export: no dispenseRequest at all.
        let mut o = order(LISINOPRIL);
        o.quantity = None;
        o.days_supply = None;
        o.refills = None;
        assert_eq!(run(&o, Some(&doctor(None))), Validation::Valid);
    }

    #[test]
    fn complete_schedule_ii_order_from_dea_registered_prescriber_is_valid() {
        assert_eq!(
            run(&order(OXY_10), Some(&doctor(Some("AP5836727")))),
            Validation::Valid
        );
    }

    #[test]
    fn meperidine_without_dea_is_rejected() {
        let v = run(&order(MEPERIDINE), Some(&doctor(None)));
        let Validation::Rejected(r) = &v else {
            panic!("{v:?}")
        };
        assert_eq!(r[0].code, "dea-required");
        assert!(r[0].message.contains("schedule II"));
        assert!(r[0].message.contains("no DEA registration"));
    }

    #[test]
    fn synthea_style_meperidine_is_rejected_for_dea_not_only_clarification() {
        // No dispenseRequest and a prescriber with an NPI only: the missing DEA decides.
        let mut o = order(MEPERIDINE);
        o.quantity = None;
        o.days_supply = None;
        o.refills = None;
        let v = run(&o, Some(&doctor(None)));
        assert!(matches!(v, Validation::Rejected(_)), "{v:?}");
        assert_eq!(
            codes(&v),
            ["dea-required", "quantity-required", "days-supply-required"]
        );
    }

    #[test]
    fn controlled_substance_with_invalid_dea_is_rejected() {
        let v = run(&order(DIAZEPAM), Some(&doctor(Some("AP5836728"))));
        assert_eq!(codes(&v), ["dea-invalid"]);
        assert!(matches!(v, Validation::Rejected(_)));
    }

    #[test]
    fn controlled_substance_from_a_distributor_registration_is_rejected() {
        let v = run(&order(DIAZEPAM), Some(&doctor(Some("PJ1234563"))));
        assert_eq!(codes(&v), ["dea-registrant-cannot-prescribe"]);
    }

    #[test]
    fn mid_level_practitioner_may_prescribe_a_controlled_substance() {
        let v = run(&order(DIAZEPAM), Some(&doctor(Some("MJ1234563"))));
        assert_eq!(v, Validation::Valid);
    }

    #[test]
    fn invalid_npi_is_rejected() {
        let mut p = doctor(None);
        p.npi = Some("1234567890".into());
        let v = run(&order(LISINOPRIL), Some(&p));
        assert_eq!(codes(&v), ["npi-invalid"]);
        let Validation::Rejected(r) = v else { panic!() };
        assert!(r[0].message.contains("check digit"));
        assert!(!r[0].message.contains("1234567890"));
    }

    #[test]
    fn npi_from_the_order_reference_is_checked_when_the_directory_has_none() {
        let mut o = order(LISINOPRIL);
        o.requester = PrescriberRef::Npi("1234567890".into());
        let v = run(&o, None);
        assert_eq!(codes(&v), ["prescriber-unknown", "npi-invalid"]);
    }

    #[test]
    fn unknown_prescriber_is_rejected() {
        let mut o = order(LISINOPRIL);
        o.requester = PrescriberRef::Reference("pr-404".into());
        assert_eq!(codes(&run(&o, None)), ["prescriber-unknown"]);
    }

    #[test]
    fn contained_prescriber_is_used_when_none_was_resolved() {
        let mut o = order(OXY_10);
        o.requester = PrescriberRef::Inline(Box::new(doctor(Some("AP5836727"))));
        assert_eq!(run(&o, None), Validation::Valid);
    }

    #[test]
    fn order_without_prescriber_is_rejected() {
        let mut o = order(LISINOPRIL);
        o.requester = PrescriberRef::Missing;
        assert_eq!(codes(&run(&o, None)), ["prescriber-missing"]);
    }

    #[test]
    fn order_without_patient_is_rejected() {
        let mut o = order(LISINOPRIL);
        o.patient_ref = String::new();
        assert_eq!(codes(&run(&o, Some(&doctor(None)))), ["patient-missing"]);
    }

    #[test]
    fn schedule_ii_order_with_refills_is_rejected() {
        let mut o = order(OXY_10);
        o.refills = Some(2);
        let v = run(&o, Some(&doctor(Some("AP5836727"))));
        assert_eq!(codes(&v), ["schedule-ii-refills"]);
        assert!(matches!(v, Validation::Rejected(_)));
    }

    #[test]
    fn schedule_ii_order_with_zero_refills_is_valid() {
        let mut o = order(OXY_10);
        o.refills = Some(0);
        assert_eq!(run(&o, Some(&doctor(Some("AP5836727")))), Validation::Valid);
    }

    #[test]
    fn schedule_iv_order_with_six_refills_is_rejected_and_five_is_valid() {
        let mut o = order(DIAZEPAM);
        o.refills = Some(6);
        assert_eq!(
            codes(&run(&o, Some(&doctor(Some("AP5836727"))))),
            ["refills-exceed-limit"]
        );
        o.refills = Some(5);
        assert_eq!(run(&o, Some(&doctor(Some("AP5836727")))), Validation::Valid);
    }

    #[test]
    fn controlled_substance_without_quantity_needs_clarification() {
        let mut o = order(TRAMADOL);
        o.quantity = None;
        let v = run(&o, Some(&doctor(Some("AP5836727"))));
        assert!(matches!(v, Validation::NeedsClarification(_)), "{v:?}");
        assert_eq!(codes(&v), ["quantity-required"]);
    }

    #[test]
    fn controlled_substance_without_days_supply_needs_clarification() {
        let mut o = order(OXY_10);
        o.days_supply = None;
        let v = run(&o, Some(&doctor(Some("AP5836727"))));
        assert!(matches!(v, Validation::NeedsClarification(_)), "{v:?}");
        assert_eq!(codes(&v), ["days-supply-required"]);
    }

    #[test]
    fn zero_quantity_needs_clarification() {
        let mut o = order(LISINOPRIL);
        o.quantity = Some(0.0);
        let v = run(&o, Some(&doctor(None)));
        assert!(matches!(v, Validation::NeedsClarification(_)));
        assert_eq!(codes(&v), ["quantity-invalid"]);
    }

    #[test]
    fn stopped_order_is_not_dispensable_and_says_it_is_history() {
        let mut o = order(LISINOPRIL);
        o.status = "stopped".into();
        let v = run(&o, Some(&doctor(None)));
        let Validation::Rejected(r) = v else { panic!() };
        assert_eq!(r[0].code, "status-not-dispensable");
        assert_eq!(
            r[0].message,
            "The order's status is 'stopped': it is medication history, not a prescription to dispense."
        );
    }

    #[test]
    fn every_non_active_status_is_rejected() {
        for s in [
            "stopped",
            "cancelled",
            "completed",
            "entered-in-error",
            "draft",
            "on-hold",
            "unknown",
        ] {
            let mut o = order(LISINOPRIL);
            o.status = s.into();
            assert_eq!(
                codes(&run(&o, Some(&doctor(None)))),
                ["status-not-dispensable"],
                "{s}"
            );
        }
    }

    #[test]
    fn plan_and_proposal_are_not_orders() {
        for intent in ["plan", "proposal", "directive", "option"] {
            let mut o = order(LISINOPRIL);
            o.intent = intent.into();
            let v = run(&o, Some(&doctor(None)));
            assert_eq!(codes(&v), ["not-an-order"], "{intent}");
        }
        let mut o = order(LISINOPRIL);
        o.intent = "original-order".into();
        assert_eq!(run(&o, Some(&doctor(None))), Validation::Valid);
    }

    #[test]
    fn invalid_ndc_is_rejected() {
        let mut o = order(LISINOPRIL);
        o.medication.ndc = Some("0574407205".into());
        assert_eq!(codes(&run(&o, Some(&doctor(None)))), ["ndc-invalid"]);
        o.medication.ndc = Some("0574-4072-05".into());
        assert_eq!(run(&o, Some(&doctor(None))), Validation::Valid);
    }

    #[test]
    fn non_controlled_order_expires_after_365_days() {
        let o = order(LISINOPRIL);
        let rules = Rules::default();
        let day = |n| t0() + Duration::days(n);
        let v = |now| validate(&o, Some(&doctor(None)), DrugTable::embedded(), &rules, now);
        assert_eq!(v(day(365)), Validation::Valid);
        assert_eq!(codes(&v(day(366))), ["expired"]);
    }

    #[test]
    fn non_controlled_expiry_is_configurable() {
        let o = order(LISINOPRIL);
        let rules = Rules {
            non_controlled_expiry_days: 90,
            ..Rules::default()
        };
        let v = validate(
            &o,
            Some(&doctor(None)),
            DrugTable::embedded(),
            &rules,
            t0() + Duration::days(91),
        );
        assert_eq!(codes(&v), ["expired"]);
    }

    #[test]
    fn schedule_iv_order_older_than_six_months_is_expired() {
        let o = order(DIAZEPAM);
        let v = validate(
            &o,
            Some(&doctor(Some("AP5836727"))),
            DrugTable::embedded(),
            &Rules::default(),
            t0() + Duration::days(181),
        );
        let Validation::Rejected(r) = v else { panic!() };
        assert_eq!(r[0].code, "expired");
        assert!(r[0].message.contains("schedule IV"));
    }

    #[test]
    fn past_validity_period_is_expired() {
        let mut o = order(LISINOPRIL);
        o.valid_until = Some(t0() - Duration::days(1));
        assert_eq!(codes(&run(&o, Some(&doctor(None)))), ["expired"]);
    }

    #[test]
    fn unknown_product_is_not_a_validation_failure() {
        // DUR raises an unknown-product alert for the pharmacist instead.
        assert_eq!(
            run(&order("999999999"), Some(&doctor(None))),
            Validation::Valid
        );
    }

    #[test]
    fn reason_messages_name_no_drug() {
        let v = run(&order(MEPERIDINE), Some(&doctor(None)));
        let Validation::Rejected(r) = v else { panic!() };
        assert!(r
            .iter()
            .all(|r| !r.message.to_lowercase().contains("meperidine")));
    }

    fn record(rxnorm: &str, refills: u32, fills: &[(u32, bool)]) -> PrescriptionRecord {
        let mut o = order(rxnorm);
        o.refills = Some(refills);
        let mut r = PrescriptionRecord::new(o, "tester");
        for (i, &(n, partial)) in fills.iter().enumerate() {
            r.fills.push(Fill {
                id: format!("f{i}"),
                at: t0() + Duration::days(i as i64),
                quantity: 10.0,
                days_supply: Some(5),
                by: "rph".into(),
                refill_number: n,
                partial,
                request_id: None,
            });
        }
        r
    }

    fn fill(r: &PrescriptionRecord, days_after: i64) -> Result<(), String> {
        check_fill(
            r,
            DrugTable::embedded(),
            &Rules::default(),
            &DurConfig::default(),
            t0() + Duration::days(days_after),
        )
        .map_err(|e| e.code)
    }

    #[test]
    fn first_fill_is_allowed() {
        assert_eq!(fill(&record(OXY_10, 0, &[]), 1), Ok(()));
    }

    #[test]
    fn schedule_ii_cannot_be_refilled_at_dispense() {
        let r = record(OXY_10, 0, &[(0, false)]);
        assert_eq!(fill(&r, 10), Err("schedule-ii-refills".into()));
    }

    #[test]
    fn partial_fill_of_schedule_ii_may_be_completed() {
        let r = record(OXY_10, 0, &[(0, true)]);
        assert_eq!(next_refill_number(&r), 0);
        assert_eq!(fill(&r, 2), Ok(()));
    }

    #[test]
    fn schedule_iv_sixth_refill_is_refused() {
        let done: Vec<(u32, bool)> = (0..=5).map(|n| (n, false)).collect();
        // The order says 6 refills (validation would reject that; the fill check holds anyway).
        let r = record(DIAZEPAM, 6, &done);
        assert_eq!(next_refill_number(&r), 6);
        assert_eq!(fill(&r, 20), Err("refills-exceed-limit".into()));
    }

    #[test]
    fn schedule_iv_fill_more_than_six_months_after_writing_is_refused() {
        let r = record(DIAZEPAM, 5, &[(0, false)]);
        assert_eq!(fill(&r, 170), Ok(()));
        assert_eq!(fill(&r, 181), Err("expired".into()));
    }

    #[test]
    fn refill_beyond_what_the_prescriber_allowed_is_refused() {
        let r = record(LISINOPRIL, 1, &[(0, false)]);
        assert_eq!(fill(&r, 30), Ok(()));
        let r = record(LISINOPRIL, 1, &[(0, false), (1, false)]);
        assert_eq!(fill(&r, 60), Err("no-refills-remaining".into()));
    }

    #[test]
    fn non_controlled_refill_after_a_year_is_refused() {
        let r = record(LISINOPRIL, 11, &[(0, false)]);
        assert_eq!(fill(&r, 366), Err("expired".into()));
    }
}
