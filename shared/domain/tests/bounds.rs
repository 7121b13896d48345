//! The bounds of what a prescription can say and of when a fill may be dispensed: quantities,
//! refills, days supply and written dates no prescriber's system sends are refused at validation
//! and again at dispense; a refill waits until enough of the previous fill's supply is used.

use chrono::{DateTime, Duration, TimeZone, Utc};
use rx_domain::drugs::DrugTable;
use rx_domain::dur::DurConfig;
use rx_domain::validate::{
    check_fill, check_fill_days_supply, check_fill_quantity, validate, Rules, MIN_QUANTITY,
};
use rx_domain::{
    Fill, MedicationCode, MedicationOrder, PrescriberRecord, PrescriberRef, PrescriptionRecord,
    Reason, Validation,
};

const LISINOPRIL: &str = "314076";
const DIAZEPAM: &str = "197591";
const OXY_10: &str = "1049683";

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
        quantity: Some(30.0),
        quantity_unit: Some("tablet".into()),
        days_supply: Some(30),
        refills: Some(3),
        valid_until: None,
        dosage: vec![],
        note: None,
    }
}

fn doctor() -> PrescriberRecord {
    PrescriberRecord {
        source_id: Some("pr-1".into()),
        npi: Some("1234567893".into()),
        dea: Some("AP5836727".into()),
        name: None,
    }
}

fn validate_at(o: &MedicationOrder, now: DateTime<Utc>) -> Validation {
    validate(
        o,
        Some(&doctor()),
        DrugTable::embedded(),
        &Rules::default(),
        now,
    )
}

fn run(o: &MedicationOrder) -> Validation {
    validate_at(o, t0())
}

fn rejected(v: &Validation) -> Vec<&str> {
    match v {
        Validation::Rejected(r) => r.iter().map(|r| r.code.as_str()).collect(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn clarification(v: &Validation) -> Vec<&str> {
    match v {
        Validation::NeedsClarification(r) => r.iter().map(|r| r.code.as_str()).collect(),
        other => panic!("expected a clarification, got {other:?}"),
    }
}

fn messages(v: &Validation) -> Vec<&str> {
    match v {
        Validation::Valid => vec![],
        Validation::Rejected(r) | Validation::NeedsClarification(r) => {
            r.iter().map(|r| r.message.as_str()).collect()
        }
    }
}

// --- Validation -------------------------------------------------------------------------------

#[test]
fn quantity_above_bound_is_rejected() {
    let mut o = order(LISINOPRIL);
    o.quantity = Some(10_000.0);
    assert_eq!(run(&o), Validation::Valid, "the bound itself is allowed");
    for q in [10_000.5, 1.23e29, 1e308, f64::INFINITY] {
        o.quantity = Some(q);
        let v = run(&o);
        assert_eq!(rejected(&v), ["quantity-implausible"], "{q}");
        assert!(messages(&v)[0].contains("10000 units"), "{v:?}");
    }
}

#[test]
fn quantity_below_a_thousandth_of_a_unit_needs_clarification() {
    let mut o = order(LISINOPRIL);
    o.quantity = Some(0.001);
    assert_eq!(run(&o), Validation::Valid);
    for q in [1e-320, 0.0009, 0.0, f64::NAN] {
        o.quantity = Some(q);
        assert_eq!(clarification(&run(&o)), ["quantity-invalid"], "{q}");
    }
}

#[test]
fn refills_above_99_are_rejected_for_a_non_controlled_order() {
    let mut o = order(LISINOPRIL);
    o.refills = Some(99);
    assert_eq!(run(&o), Validation::Valid);
    for n in [100, 1_000_000_000] {
        o.refills = Some(n);
        let v = run(&o);
        assert_eq!(rejected(&v), ["refills-exceed-limit"], "{n}");
        assert!(messages(&v)[0].contains("at most 99"), "{v:?}");
    }
}

#[test]
fn controlled_order_with_a_billion_refills_is_rejected_once_under_its_own_limit() {
    let mut o = order(DIAZEPAM);
    o.refills = Some(1_000_000_000);
    let v = run(&o);
    assert_eq!(rejected(&v), ["refills-exceed-limit"]);
    assert!(messages(&v)[0].contains("at most 5 times"), "{v:?}");

    let mut o = order(OXY_10);
    o.refills = Some(1_000_000_000);
    assert_eq!(rejected(&run(&o)), ["schedule-ii-refills"]);
}

#[test]
fn days_supply_over_a_year_is_rejected() {
    let mut o = order(LISINOPRIL);
    o.days_supply = Some(365);
    assert_eq!(run(&o), Validation::Valid);
    for d in [366, u32::MAX] {
        o.days_supply = Some(d);
        assert_eq!(rejected(&run(&o)), ["days-supply-implausible"], "{d}");
    }
}

#[test]
fn zero_days_supply_needs_clarification() {
    let mut o = order(LISINOPRIL);
    o.days_supply = Some(0);
    assert_eq!(clarification(&run(&o)), ["days-supply-invalid"]);
}

#[test]
fn written_date_more_than_a_day_in_the_future_is_rejected() {
    let mut o = order(LISINOPRIL);
    // Up to a day of clock skew between the prescriber's system and ours is tolerated.
    o.authored_on = Some(t0() + Duration::hours(23));
    assert_eq!(run(&o), Validation::Valid);
    for written in [
        t0() + Duration::hours(25),
        Utc.with_ymd_and_hms(9999, 12, 31, 0, 0, 0).unwrap(),
    ] {
        o.authored_on = Some(written);
        let v = run(&o);
        assert_eq!(rejected(&v), ["written-date-in-future"], "{written}");
        assert!(!messages(&v)[0].contains("9999"), "no date in the sentence");
    }
}

#[test]
fn written_date_before_1900_is_rejected_even_in_a_replay() {
    let mut o = order(LISINOPRIL);
    let year_one = Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap();
    o.authored_on = Some(year_one);
    // A replay judges the order as of its written date, so expiry alone would not catch it.
    assert_eq!(
        rejected(&validate_at(&o, year_one)),
        ["written-date-implausible"]
    );
    let first_day = Utc.with_ymd_and_hms(1900, 1, 1, 0, 0, 0).unwrap();
    o.authored_on = Some(first_day);
    assert_eq!(validate_at(&o, first_day), Validation::Valid);
}

#[test]
fn the_oldest_synthea_order_is_still_plausible() {
    // The real export's oldest order was written in 1957.
    let mut o = order(LISINOPRIL);
    let written = Utc.with_ymd_and_hms(1957, 6, 16, 5, 15, 44).unwrap();
    o.authored_on = Some(written);
    assert_eq!(validate_at(&o, written), Validation::Valid);
}

// --- Dispense ---------------------------------------------------------------------------------

fn fill(n: u32, at: DateTime<Utc>, quantity: f64, days: Option<u32>, partial: bool) -> Fill {
    Fill {
        id: format!("f-{n}-{}", at.timestamp()),
        at,
        quantity,
        days_supply: days,
        by: "rph".into(),
        refill_number: n,
        partial,
        request_id: None,
    }
}

fn record(o: MedicationOrder, fills: Vec<Fill>) -> PrescriptionRecord {
    let mut r = PrescriptionRecord::new(o, "tester");
    r.fills = fills;
    r
}

fn check_at(r: &PrescriptionRecord, now: DateTime<Utc>) -> Result<(), Reason> {
    check_fill(
        r,
        DrugTable::embedded(),
        &Rules::default(),
        &DurConfig::default(),
        now,
    )
}

fn code_at(r: &PrescriptionRecord, now: DateTime<Utc>) -> Result<(), String> {
    check_at(r, now).map_err(|e| e.code)
}

#[test]
fn refill_before_75_percent_of_supply_is_refused() {
    // A 30-day fill: the refill is due after 22.5 days.
    let r = record(
        order(LISINOPRIL),
        vec![fill(0, t0(), 30.0, Some(30), false)],
    );
    assert_eq!(code_at(&r, t0()), Err("refill-too-soon".into()));
    assert_eq!(
        code_at(&r, t0() + Duration::hours(22 * 24 + 11)),
        Err("refill-too-soon".into())
    );
    assert_eq!(code_at(&r, t0() + Duration::hours(22 * 24 + 12)), Ok(()));
    assert_eq!(code_at(&r, t0() + Duration::days(30)), Ok(()));
}

#[test]
fn refill_too_soon_says_how_much_is_used_and_when_it_is_due() {
    let r = record(
        order(LISINOPRIL),
        vec![fill(0, t0(), 30.0, Some(30), false)],
    );
    let e = check_at(&r, t0() + Duration::days(15)).unwrap_err();
    assert_eq!(
        e.message,
        "This would be refill 1, but only 50% of the previous fill's 30-day supply has been used; a refill may be dispensed once 75% of it is used. It is due in 8 day(s). If the patient needs more sooner, confirm with the prescriber."
    );
}

#[test]
fn three_fills_within_a_second_are_refused() {
    // The tester's case: a full 30-day fill, then refills a second apart.
    let r = record(
        order(LISINOPRIL),
        vec![fill(0, t0(), 30.0, Some(30), false)],
    );
    assert_eq!(
        code_at(&r, t0() + Duration::seconds(1)),
        Err("refill-too-soon".into())
    );
}

#[test]
fn refill_threshold_is_the_early_refill_dur_threshold() {
    let r = record(
        order(LISINOPRIL),
        vec![fill(0, t0(), 30.0, Some(30), false)],
    );
    let half = DurConfig {
        early_refill_threshold: 0.5,
        ..DurConfig::default()
    };
    let at = |days| {
        check_fill(
            &r,
            DrugTable::embedded(),
            &Rules::default(),
            &half,
            t0() + Duration::days(days),
        )
        .map_err(|e| e.code)
    };
    assert_eq!(at(14), Err("refill-too-soon".into()));
    assert_eq!(at(15), Ok(()));
}

#[test]
fn completing_a_partial_fill_is_not_a_refill() {
    let r = record(order(LISINOPRIL), vec![fill(0, t0(), 10.0, Some(10), true)]);
    assert_eq!(code_at(&r, t0() + Duration::seconds(1)), Ok(()));

    // The same for a partial refill: its completion is not another refill.
    let r = record(
        order(LISINOPRIL),
        vec![
            fill(0, t0(), 30.0, Some(30), false),
            fill(1, t0() + Duration::days(25), 10.0, Some(10), true),
        ],
    );
    assert_eq!(code_at(&r, t0() + Duration::days(26)), Ok(()));
}

#[test]
fn refill_after_a_partial_and_its_completion_counts_the_whole_fill() {
    // 10 tablets for 10 days, then the other 20 for 20 days the next day: 30 days from the
    // first part; due after 22.5.
    let r = record(
        order(LISINOPRIL),
        vec![
            fill(0, t0(), 10.0, Some(10), true),
            fill(0, t0() + Duration::days(1), 20.0, Some(20), false),
        ],
    );
    assert_eq!(
        code_at(&r, t0() + Duration::days(22)),
        Err("refill-too-soon".into())
    );
    assert_eq!(code_at(&r, t0() + Duration::days(23)), Ok(()));
}

#[test]
fn a_part_dispensed_after_the_first_ran_out_starts_its_supply_anew() {
    // 10 days, then the rest (20 days) only on day 15: supply lasts to day 35; due on day 27.5.
    let r = record(
        order(LISINOPRIL),
        vec![
            fill(0, t0(), 10.0, Some(10), true),
            fill(0, t0() + Duration::days(15), 20.0, Some(20), false),
        ],
    );
    assert_eq!(
        code_at(&r, t0() + Duration::days(27)),
        Err("refill-too-soon".into())
    );
    assert_eq!(code_at(&r, t0() + Duration::days(28)), Ok(()));
}

#[test]
fn refill_with_no_days_supply_counts_dur_default_active_days() {
    let mut o = order(LISINOPRIL);
    o.days_supply = None;
    let r = record(o, vec![fill(0, t0(), 30.0, None, false)]);
    // DurConfig's default: 30 days, so due after 22.5.
    assert_eq!(
        code_at(&r, t0() + Duration::days(22)),
        Err("refill-too-soon".into())
    );
    assert_eq!(code_at(&r, t0() + Duration::days(23)), Ok(()));
}

#[test]
fn a_stored_fill_with_an_endless_supply_never_panics_and_is_never_due() {
    let r = record(
        order(LISINOPRIL),
        vec![fill(0, t0(), 30.0, Some(u32::MAX), false)],
    );
    let e = check_at(&r, t0() + Duration::days(300)).unwrap_err();
    assert_eq!(e.code, "refill-too-soon");
}

#[test]
fn an_implausible_order_stored_before_these_rules_is_refused_at_dispense() {
    type Spoil = fn(&mut MedicationOrder);
    let cases: [(Spoil, &str); 4] = [
        (|o| o.quantity = Some(1e308), "quantity-implausible"),
        (|o| o.refills = Some(1_000_000_000), "refills-exceed-limit"),
        (|o| o.days_supply = Some(10_000), "days-supply-implausible"),
        (
            |o| o.authored_on = Some(Utc.with_ymd_and_hms(9999, 12, 31, 0, 0, 0).unwrap()),
            "written-date-in-future",
        ),
    ];
    for (spoil, code) in cases {
        let mut o = order(LISINOPRIL);
        spoil(&mut o);
        assert_eq!(
            code_at(&record(o, vec![]), t0()),
            Err(code.into()),
            "{code}"
        );
    }
}

#[test]
fn fill_quantity_must_be_a_measurable_plausible_amount() {
    let code = |q: f64| check_fill_quantity(q).map_err(|e| e.code);
    assert_eq!(code(MIN_QUANTITY), Ok(()));
    assert_eq!(code(10_000.0), Ok(()));
    assert_eq!(code(0.5), Ok(()));
    assert_eq!(code(1e-320), Err("quantity-too-small".into()));
    assert_eq!(code(0.0009), Err("quantity-too-small".into()));
    for q in [0.0, -2.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert_eq!(code(q), Err("quantity-invalid".into()), "{q}");
    }
    for q in [10_000.01, 1.23e29, 1e308] {
        assert_eq!(code(q), Err("quantity-implausible".into()), "{q}");
    }
}

#[test]
fn fill_days_supply_is_one_day_to_a_year() {
    let code = |d: u32| check_fill_days_supply(d).map_err(|e| e.code);
    assert_eq!(code(1), Ok(()));
    assert_eq!(code(365), Ok(()));
    assert_eq!(code(0), Err("days-supply-invalid".into()));
    assert_eq!(code(366), Err("days-supply-implausible".into()));
    assert_eq!(code(u32::MAX), Err("days-supply-implausible".into()));
}
