//! The synthetic cohort: deterministic, well-formed FHIR, and every planned case makes its rule
//! fire when the orders go through rx-domain's own validation and DUR in stream order.

use chrono::{TimeZone, Utc};
use rx_domain::drugs::DrugTable;
use rx_domain::dur::{self, DurConfig, OtherOrder};
use rx_domain::fhir;
use rx_domain::synth::{self, Case, CohortConfig, Expected, Role};
use rx_domain::validate::{self, Rules};
use rx_domain::{
    Alert, Allergy, Fill, MedicationOrder, PrescriberRecord, PrescriberRef, Validation,
};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

fn cfg(seed: u64, orders: usize) -> CohortConfig {
    CohortConfig {
        seed,
        orders,
        start: Utc.with_ymd_and_hms(2025, 1, 6, 8, 0, 0).unwrap(),
    }
}

fn all_orders(c: &CohortConfig) -> (synth::Cohort, Vec<Value>) {
    let cohort = synth::cohort(c);
    let orders = synth::orders(c, &cohort).collect();
    (cohort, orders)
}

#[test]
fn same_seed_gives_identical_output_and_another_seed_differs() {
    let (c1, o1) = all_orders(&cfg(42, 300));
    let (c2, o2) = all_orders(&cfg(42, 300));
    assert_eq!(c1, c2);
    assert_eq!(o1, o2);
    let (c3, o3) = all_orders(&cfg(43, 300));
    assert_ne!(c1.patients, c3.patients);
    assert_ne!(o1, o3);
}

#[test]
fn a_longer_stream_starts_with_the_shorter_one() {
    // Orders depend on their position, not on how many follow (the cohort is the same size here).
    let (cohort, long) = all_orders(&cfg(5, 256));
    let short: Vec<Value> = synth::orders(&cfg(5, 250), &cohort).collect();
    assert_eq!(&long[..250], &short[..]);
}

#[test]
fn counts_follow_the_config_and_orders_come_in_arrival_order() {
    let c = cfg(7, 2_000);
    let (cohort, orders) = all_orders(&c);
    assert_eq!(orders.len(), 2_000);
    assert_eq!(cohort.patients.len(), 250);
    assert_eq!(cohort.practitioners.len(), 40);
    let allergic = (0..250)
        .filter(|p| [3, 7, 11, 13].contains(&(p % 16)))
        .count();
    assert_eq!(
        cohort.allergies.len(),
        allergic,
        "four allergy groups in every sixteen patients"
    );
    let times: Vec<_> = orders.iter().map(|o| synth::arrival(o).unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    assert!(times[0] >= c.start);
    let ids: std::collections::HashSet<&str> =
        orders.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), orders.len(), "order ids are unique");
}

#[test]
fn every_generated_resource_parses_and_looks_synthetic() {
    let (cohort, orders) = all_orders(&cfg(11, 400));
    for p in &cohort.patients {
        let rec = fhir::parse_patient(p).unwrap();
        assert!(rec.ssn().unwrap().starts_with("999-"));
        assert!(rec.phone.as_deref().unwrap().starts_with("555-"));
        assert!(rec
            .name
            .as_deref()
            .unwrap()
            .chars()
            .any(|c| c.is_ascii_digit()));
        assert!(rec.birth_date.is_some() && rec.address.is_some());
    }
    let mut with_dea = 0;
    let mut bad_dea = 0;
    let mut bad_npi = 0;
    for p in &cohort.practitioners {
        let rec = fhir::parse_practitioner(p).unwrap();
        let npi = rec.npi.unwrap();
        assert!(npi.starts_with("999"));
        bad_npi += usize::from(!rx_domain::ids::npi_is_valid(&npi));
        if let Some(dea) = rec.dea {
            with_dea += 1;
            bad_dea += usize::from(rx_domain::ids::parse_dea(&dea).is_err());
        }
    }
    let n = cohort.practitioners.len();
    assert!(
        with_dea * 10 >= n * 7 && with_dea < n,
        "most, not all, hold a DEA number"
    );
    // One in ten holds a DEA number whose check digit is off (the controlled-bad-dea case).
    assert!(
        bad_dea >= 1 && bad_dea * 5 < with_dea,
        "a few bad DEA numbers ({bad_dea})"
    );
    assert!(bad_npi >= 1 && bad_npi * 5 < n, "a few bad NPIs");
    for a in &cohort.allergies {
        fhir::parse_allergy(a).unwrap();
    }
    for o in &orders {
        let order = fhir::parse_medication_request(o).unwrap();
        assert!(
            matches!(order.requester, PrescriberRef::Npi(_)),
            "Synthea-style conditional NPI requester"
        );
        assert!(synth::planned_case(o).is_some());
    }
}

/// What the simulated pipeline did with one order.
struct Outcome {
    case: Case,
    role: Role,
    validation: Validation,
    alerts: Vec<Alert>,
}

/// Validation then DUR in stream order, at each order's authoredOn, with the patient's earlier
/// validated orders as history; orders without a blocking alert are dispensed at once.
fn run_pipeline(c: &CohortConfig) -> Vec<Outcome> {
    let drugs = DrugTable::embedded();
    let cohort = synth::cohort(c);
    let prescribers: HashMap<String, PrescriberRecord> = cohort
        .practitioners
        .iter()
        .map(|p| fhir::parse_practitioner(p).unwrap())
        .map(|p| (p.npi.clone().unwrap(), p))
        .collect();
    let mut allergies: HashMap<String, Vec<Allergy>> = HashMap::new();
    for a in &cohort.allergies {
        let (patient, allergy) = fhir::parse_allergy(a).unwrap();
        allergies.entry(patient).or_default().push(allergy);
    }
    let mut history: HashMap<String, Vec<(String, MedicationOrder, Option<Fill>)>> = HashMap::new();
    let mut out = Vec::new();
    for v in synth::orders(c, &cohort) {
        let (case, role) = synth::planned_case(&v).unwrap();
        let order = fhir::parse_medication_request(&v).unwrap();
        let now = synth::arrival(&v).unwrap();
        let prescriber = match &order.requester {
            PrescriberRef::Npi(n) => prescribers.get(n),
            _ => None,
        };
        let validation = validate::validate(&order, prescriber, drugs, &Rules::default(), now);
        let mut alerts = Vec::new();
        if validation == Validation::Valid {
            let past = history.entry(order.patient_ref.clone()).or_default();
            let others: Vec<OtherOrder<'_>> = past
                .iter()
                .map(|(id, o, f)| OtherOrder {
                    id,
                    order: o,
                    last_fill: f.as_ref(),
                })
                .collect();
            let patient_allergies = allergies
                .get(&order.patient_ref)
                .map_or(&[][..], Vec::as_slice);
            alerts = dur::review(
                &order,
                &others,
                patient_allergies,
                drugs,
                &DurConfig::default(),
                now,
            );
            let fill = (!alerts.iter().any(Alert::is_blocking)).then(|| Fill {
                id: format!("fill-{}", out.len()),
                at: now,
                quantity: order.quantity.unwrap_or(0.0),
                days_supply: order.days_supply,
                by: "pharmacist".into(),
                refill_number: 0,
                partial: false,
                request_id: None,
            });
            past.push((v["id"].as_str().unwrap().to_owned(), order, fill));
        }
        out.push(Outcome {
            case,
            role,
            validation,
            alerts,
        });
    }
    out
}

fn has_reason(v: &Validation, code: &str) -> bool {
    match v {
        Validation::Rejected(r) | Validation::NeedsClarification(r) => {
            r.iter().any(|x| x.code == code)
        }
        Validation::Valid => false,
    }
}

fn check_cohort(c: &CohortConfig) {
    let outcomes = run_pipeline(c);
    let mut seen: BTreeMap<Case, usize> = BTreeMap::new();
    for (i, o) in outcomes.iter().enumerate() {
        if o.role == Role::Setup {
            continue;
        }
        *seen.entry(o.case).or_default() += 1;
        let kinds: Vec<_> = o.alerts.iter().map(|a| (a.kind, a.severity)).collect();
        match o.case.expected() {
            Expected::Dispensable => {
                assert_eq!(o.validation, Validation::Valid, "order {i} ({:?})", o.case);
                if o.case == Case::Clean {
                    assert!(o.alerts.is_empty(), "clean order {i} raised {kinds:?}");
                }
            }
            Expected::Reason(code) => {
                assert!(
                    has_reason(&o.validation, code),
                    "order {i} ({:?}): {:?}",
                    o.case,
                    o.validation
                );
            }
            Expected::Alert(kind, severity) => {
                assert_eq!(o.validation, Validation::Valid, "order {i} ({:?})", o.case);
                assert!(
                    o.alerts
                        .iter()
                        .any(|a| a.kind == kind && a.severity >= severity),
                    "order {i} ({:?}) raised {kinds:?}",
                    o.case
                );
            }
        }
    }
    for case in Case::ALL {
        assert!(
            seen.get(&case).copied().unwrap_or(0) >= 1,
            "{case:?} missing from {} orders (seed {})",
            c.orders,
            c.seed
        );
    }
    let clean = seen[&Case::Clean] as f64 / outcomes.len() as f64;
    assert!((0.75..0.9).contains(&clean), "clean share {clean}");
}

#[test]
fn every_planned_case_fires_its_rule_in_200_orders() {
    check_cohort(&cfg(1, 200));
}

#[test]
fn every_planned_case_fires_its_rule_for_other_seeds_and_sizes() {
    for (seed, n) in [(2, 211), (99, 640), (123_456_789, 1_500), (u64::MAX, 333)] {
        check_cohort(&cfg(seed, n));
    }
}

#[test]
fn controlled_orders_come_from_prescribers_with_and_without_dea() {
    let c = cfg(3, 256);
    let cohort = synth::cohort(&c);
    let deas: HashMap<String, bool> = cohort
        .practitioners
        .iter()
        .map(|p| fhir::parse_practitioner(p).unwrap())
        .map(|p| (p.npi.unwrap(), p.dea.is_some()))
        .collect();
    let drugs = DrugTable::embedded();
    let mut by_dea = (0, 0);
    for v in synth::orders(&c, &cohort) {
        let o = fhir::parse_medication_request(&v).unwrap();
        let controlled = drugs
            .product(o.medication.rxnorm.as_deref().unwrap())
            .is_some_and(|p| p.is_controlled());
        if let (true, PrescriberRef::Npi(n)) = (controlled, &o.requester) {
            if deas[n] {
                by_dea.0 += 1
            } else {
                by_dea.1 += 1
            }
        }
    }
    assert!(by_dea.0 >= 10 && by_dea.1 >= 2, "{by_dea:?}");
}

#[test]
fn each_case_appears_once_per_block_in_a_long_stream() {
    let c = cfg(17, 12_800);
    let cohort = synth::cohort(&c);
    let started = std::time::Instant::now();
    let mut counts: BTreeMap<(Case, Role), usize> = BTreeMap::new();
    let mut products: BTreeMap<Case, std::collections::BTreeSet<String>> = BTreeMap::new();
    for v in synth::orders(&c, &cohort) {
        let (case, role) = synth::planned_case(&v).unwrap();
        *counts.entry((case, role)).or_default() += 1;
        let code = v["medicationCodeableConcept"]["coding"][0]["code"]
            .as_str()
            .unwrap()
            .to_owned();
        products.entry(case).or_default().insert(code);
    }
    let elapsed = started.elapsed();
    let orders: Vec<Value> = synth::orders(&c, &cohort).collect();
    let started = std::time::Instant::now();
    for v in &orders {
        fhir::parse_medication_request(v).unwrap();
    }
    let parsed = started.elapsed();
    let blocks = 12_800 / synth::BLOCK;
    for case in Case::ALL.into_iter().filter(|c| *c != Case::Clean) {
        assert_eq!(counts[&(case, Role::Trigger)], blocks, "{case:?}");
    }
    let clean = counts[&(Case::Clean, Role::Trigger)];
    assert_eq!(clean, 12_800 - blocks * 30);
    eprintln!(
        "12,800 orders generated in {elapsed:?}, parsed in {parsed:?}; clean share {:.1}%; products per case: {:?}",
        100.0 * clean as f64 / 12_800.0,
        products
            .iter()
            .map(|(c, p)| (c.as_str(), p.len()))
            .collect::<Vec<_>>()
    );
    // The planned cases rotate through the table's candidates, not one product each.
    assert!(products[&Case::ControlledWithoutDea].len() >= 3);
    assert!(products[&Case::OncInteraction].len() >= 3);
    assert!(products[&Case::Clean].len() >= 8);
}
