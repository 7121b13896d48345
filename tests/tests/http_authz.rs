//! The authorization matrix over HTTP: every role against every endpoint, allowed and denied,
//! from one table; then the attribute rules (tenant isolation, prescriber's own orders, MFA on a
//! controlled order, separation of duties). Every denial must leave an audit event.

mod http_support;

use http_support::*;
use rx_domain::Status;
use rx_guard::access::Role;
use rx_guard::audit::Action as AuditAction;
use rx_platform::flow::load_rx;
use rx_store::repo::AuditCtx;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ep {
    Submit,
    Read,
    ListPatient,
    Cancel,
    Queue,
    Verify,
    Dispense,
    BreakGlass,
    AuditEvents,
    AuditDisclosures,
    AuditExport,
}

const ROLES: [Role; 6] = [
    Role::Prescriber,
    Role::Pharmacist,
    Role::Technician,
    Role::Auditor,
    Role::Admin,
    Role::Service,
];

const Y: bool = true;
const N: bool = false;

/// Who may call what (the prescriber acts on orders they wrote; nobody holds break-glass).
#[rustfmt::skip]
const MATRIX: [(Ep, [bool; 6]); 11] = [
    //                        prescriber pharmacist technician auditor admin service
    (Ep::Submit,           [Y,         N,         N,         N,      N,    Y]),
    (Ep::Read,             [Y,         Y,         Y,         Y,      N,    Y]),
    (Ep::ListPatient,      [Y,         Y,         N,         Y,      N,    Y]),
    (Ep::Cancel,           [Y,         Y,         N,         N,      N,    N]),
    (Ep::Queue,            [N,         Y,         Y,         N,      N,    Y]),
    (Ep::Verify,           [N,         Y,         N,         N,      N,    N]),
    (Ep::Dispense,         [N,         Y,         N,         N,      N,    N]),
    (Ep::BreakGlass,       [Y,         Y,         Y,         N,      N,    N]),
    (Ep::AuditEvents,      [N,         N,         N,         Y,      N,    N]),
    (Ep::AuditDisclosures, [N,         N,         N,         Y,      N,    N]),
    (Ep::AuditExport,      [N,         N,         N,         Y,      N,    N]),
];

const PATIENT: &str = "pat-matrix";

fn caller(role: Role, ep: Ep) -> Who {
    let subject = format!("{role}-{ep:?}").to_lowercase();
    match role {
        Role::Prescriber => Who::prescriber(&subject, DR_PUMP),
        _ => Who::new(role, &subject),
    }
}

/// Call `ep` as `who`, with the fixture the endpoint needs (a fresh order where the call
/// changes one); the response and the status an allowed call answers with.
async fn hit(s: &TestServer, who: &Who, ep: Ep, shared_rx: &str) -> (Resp, u16) {
    match ep {
        Ep::Submit => {
            let r = s
                .as_who(
                    who,
                    "POST",
                    "/prescriptions",
                    Some(&lisinopril(PATIENT, DR_PUMP)),
                )
                .await;
            (r, 201)
        }
        Ep::Read => (
            s.as_who(who, "GET", &format!("/prescriptions/{shared_rx}"), None)
                .await,
            200,
        ),
        Ep::ListPatient => (
            s.as_who(
                who,
                "GET",
                &format!("/patients/{PATIENT}/prescriptions"),
                None,
            )
            .await,
            200,
        ),
        Ep::Cancel => {
            let id = s.queued(PATIENT).await;
            let body = json!({"reason": "entered twice by mistake"});
            (
                s.as_who(
                    who,
                    "POST",
                    &format!("/prescriptions/{id}/cancel"),
                    Some(&body),
                )
                .await,
                200,
            )
        }
        Ep::Queue => (s.as_who(who, "GET", "/queue", None).await, 200),
        Ep::Verify => {
            let id = s.queued(PATIENT).await;
            let body = json!({"decision": "approve"});
            (
                s.as_who(
                    who,
                    "POST",
                    &format!("/prescriptions/{id}/verification"),
                    Some(&body),
                )
                .await,
                200,
            )
        }
        Ep::Dispense => {
            let id = s.queued(PATIENT).await;
            s.verified(&id).await;
            (
                s.as_who(
                    who,
                    "POST",
                    &format!("/prescriptions/{id}/dispenses"),
                    Some(&json!({})),
                )
                .await,
                201,
            )
        }
        Ep::BreakGlass => {
            let body = json!({"reason": "patient unconscious in the emergency department"});
            (
                s.as_who(who, "POST", "/break-glass", Some(&body)).await,
                201,
            )
        }
        Ep::AuditEvents => (s.as_who(who, "GET", "/audit/events", None).await, 200),
        Ep::AuditDisclosures => (
            s.as_who(
                who,
                "GET",
                &format!("/audit/disclosures?patient={PATIENT}"),
                None,
            )
            .await,
            200,
        ),
        Ep::AuditExport => (s.as_who(who, "GET", "/audit/export", None).await, 200),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_endpoint_matches_the_policy_and_every_denial_is_audited() {
    let s = TestServer::start().await;
    let shared = s.queued(PATIENT).await;
    let mut failures = Vec::new();
    for (ep, allowed) in MATRIX {
        for (role, allow) in ROLES.into_iter().zip(allowed) {
            let who = caller(role, ep);
            let (r, ok_status) = hit(&s, &who, ep, &shared).await;
            if allow {
                if r.status != ok_status {
                    failures.push(format!(
                        "{role} × {ep:?}: expected {ok_status}, got {} {}",
                        r.status, r.text
                    ));
                }
            } else {
                if r.status != 403 {
                    failures.push(format!(
                        "{role} × {ep:?}: expected 403, got {} {}",
                        r.status, r.text
                    ));
                    continue;
                }
                r.assert_outcome(403);
                if s.denials(&who.subject).await.is_empty() {
                    failures.push(format!("{role} × {ep:?}: denied without an audit event"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    s.stop().await;
    assert_logs_free_of_phi();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_order_reaches_the_pharmacist_queue_in_the_background() {
    let s = TestServer::start().await;
    let rph = Who::pharmacist("rph-queue");
    let id = s
        .submit(
            &Who::prescriber("dr-pump", DR_PUMP),
            &lisinopril("pat-q", DR_PUMP),
        )
        .await;
    s.wait_for(TENANT, &id, Status::AwaitingVerification).await;
    let q = s.as_who(&rph, "GET", "/queue", None).await;
    assert_eq!(q.status, 200, "{}", q.text);
    let ids: Vec<&str> = q.json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["rxId"].as_str())
        .collect();
    assert!(ids.contains(&id.as_str()), "{ids:?}");
    for needle in PHI {
        assert!(!q.text.contains(needle), "the queue shows PHI: {}", q.text);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_submitted_twice_is_stored_once() {
    let s = TestServer::start().await;
    let who = Who::prescriber("dr-pump", DR_PUMP);
    let b = lisinopril("pat-dup", DR_PUMP);
    let first = s.as_who(&who, "POST", "/prescriptions", Some(&b)).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = s.as_who(&who, "POST", "/prescriptions", Some(&b)).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(first.header("location"), again.header("location"));
    assert_eq!(again.json["entry"][0]["response"]["status"], "200 OK");
    s.stop().await;
}

/// The Bundle's Patient is the prescriber system's latest demographics: resubmitting the same
/// order with a new address and phone answers it as the stored order (200) and applies the new
/// details to the patient's file, audited as an update of the Patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmitted_order_applies_the_patients_new_details() {
    let s = TestServer::start().await;
    let who = Who::prescriber("dr-pump", DR_PUMP);
    let mut b = lisinopril("pat-moved", DR_PUMP);
    let id = s.submit(&who, &b).await;
    s.wait_for(TENANT, &id, Status::AwaitingVerification).await;
    let before = s.events_of("dr-pump").await.len();

    let patient = &mut b["entry"][0]["resource"];
    patient["address"] =
        json!([{"use": "home", "line": ["7 Birch Lane"], "city": "Salina", "state": "KS"}]);
    patient["telecom"] = json!([{"system": "phone", "value": "555-0142"}]);
    let again = s.as_who(&who, "POST", "/prescriptions", Some(&b)).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(
        again.header("location"),
        Some(format!("/prescriptions/{id}").as_str())
    );

    let read = s
        .as_who(
            &Who::pharmacist("rph-moved"),
            "GET",
            &format!("/prescriptions/{id}"),
            None,
        )
        .await;
    assert_eq!(read.status, 200, "{}", read.text);
    let contained = &read.json["contained"][0];
    assert_eq!(contained["resourceType"], "Patient", "{}", read.text);
    let address = contained["address"][0]["text"].as_str().unwrap_or("");
    assert!(address.contains("7 Birch Lane"), "{}", read.text);
    assert!(
        !read.text.contains(STREET),
        "the old street is gone: {}",
        read.text
    );
    assert_eq!(
        contained["telecom"][0]["value"], "555-0142",
        "{}",
        read.text
    );

    let updates: Vec<_> = s.events_of("dr-pump").await[before..]
        .iter()
        .filter(|e| e.action == AuditAction::Update && e.resource.kind == "Patient")
        .cloned()
        .collect();
    assert_eq!(updates.len(), 1, "one update of the patient: {updates:?}");
    assert_eq!(updates[0].function, "intake");
    s.stop().await;
}

/// The kinds of the alerts the queue shows for `rx_id`.
async fn queue_alert_kinds(s: &TestServer, rx_id: &str) -> Vec<String> {
    let q = s
        .as_who(&Who::pharmacist("rph-alerts"), "GET", "/queue", None)
        .await;
    assert_eq!(q.status, 200, "{}", q.text);
    let entry = q.json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["rxId"] == rx_id)
        .unwrap_or_else(|| panic!("{rx_id} is not in the queue: {}", q.text))
        .clone();
    entry["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .filter_map(|a| a["kind"].as_str().map(str::to_string))
        .collect()
}

/// An AllergyIntolerance sent again with the same id is the prescriber system's latest word on
/// it: resubmitting the order with the allergy now resolved replaces the one on file, so the
/// next order is reviewed without it (it used to stay on file as first sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmitted_allergy_replaces_the_one_on_file() {
    let s = TestServer::start().await;
    let who = Who::prescriber("dr-pump", DR_PUMP);
    let allergy = |status: &str| {
        json!({"resource": {
            "resourceType": "AllergyIntolerance", "id": "alg-ace",
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                "code": status}]},
            "code": {"text": "lisinopril"},
            "patient": {"reference": "Patient/pat-alg"}
        }})
    };
    let mut b = lisinopril("pat-alg", DR_PUMP);
    b["entry"]
        .as_array_mut()
        .expect("entries")
        .insert(2, allergy("active"));
    let first = s.submit(&who, &b).await;
    s.wait_for(TENANT, &first, Status::AwaitingVerification)
        .await;
    let kinds = queue_alert_kinds(&s, &first).await;
    assert!(kinds.iter().any(|k| k == "allergy"), "{kinds:?}");

    b["entry"][2] = allergy("resolved");
    let again = s.as_who(&who, "POST", "/prescriptions", Some(&b)).await;
    assert_eq!(again.status, 200, "{}", again.text);

    let next = s.submit(&who, &lisinopril("pat-alg", DR_PUMP)).await;
    s.wait_for(TENANT, &next, Status::AwaitingVerification)
        .await;
    let kinds = queue_alert_kinds(&s, &next).await;
    assert!(
        !kinds.iter().any(|k| k == "allergy"),
        "the resolved allergy still raised an alert: {kinds:?}"
    );
    s.stop().await;
}

fn allergy_entry(id: &str, patient: &str, substance: &str, status: &str) -> Value {
    json!({"resource": {
        "resourceType": "AllergyIntolerance", "id": id,
        "clinicalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
            "code": status}]},
        "code": {"text": substance},
        "patient": {"reference": format!("Patient/{patient}")}
    }})
}

fn entries(b: &mut Value) -> &mut Vec<Value> {
    b["entry"].as_array_mut().expect("entries")
}

/// The writes `subject` made to Patient records since the trail had `since` of their events.
/// Records of any kind `subject` created or updated since their `since`-th event.
async fn writes(s: &TestServer, subject: &str, since: usize) -> usize {
    s.events_of(subject).await[since..]
        .iter()
        .filter(|e| matches!(e.action, AuditAction::Create | AuditAction::Update))
        .count()
}

async fn patient_writes(s: &TestServer, subject: &str, since: usize) -> usize {
    s.events_of(subject).await[since..]
        .iter()
        .filter(|e| {
            e.resource.kind == "Patient"
                && matches!(e.action, AuditAction::Create | AuditAction::Update)
        })
        .count()
}

/// A Bundle carries the records of the orders it sends, no other: a prescriber who sends another
/// prescriber's patient (new details, the allergy marked resolved) beside an order of their own
/// for someone else is refused, and the patient's file stays as it was (before, the allergy
/// alert was gone from the patient's next order and the new name was on file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_cannot_carry_a_patient_or_allergy_its_orders_do_not_name() {
    let s = TestServer::start().await;
    let pump = Who::prescriber("dr-pump", DR_PUMP);
    let mut b = lisinopril("pat-victim", DR_PUMP);
    entries(&mut b).insert(
        2,
        allergy_entry("alg-v", "pat-victim", "lisinopril", "active"),
    );
    let first = s.submit(&pump, &b).await;
    s.wait_for(TENANT, &first, Status::AwaitingVerification)
        .await;

    let smith = Who::prescriber("dr-smith", DR_SMITH);
    let before = s.events_of("dr-smith").await.len();
    let mut victim = b["entry"][0].clone();
    victim["resource"]["name"] = json!([{"given": ["Malvolio"], "family": "Spoofington"}]);
    let attempts = [
        // the other patient's Patient and allergy beside smith's own order
        vec![
            victim.clone(),
            allergy_entry("alg-v", "pat-victim", "lisinopril", "resolved"),
        ],
        // the allergy alone
        vec![allergy_entry(
            "alg-v",
            "pat-victim",
            "lisinopril",
            "resolved",
        )],
        // the Patient alone
        vec![victim],
    ];
    for extra in attempts {
        let mut own = lisinopril("pat-smiths", DR_SMITH);
        entries(&mut own).remove(0);
        entries(&mut own).extend(extra);
        let r = s.as_who(&smith, "POST", "/prescriptions", Some(&own)).await;
        r.assert_outcome(400);
        assert!(r.text.contains("orders it sends"), "{}", r.text);
    }
    assert_eq!(patient_writes(&s, "dr-smith", before).await, 0);

    let next = s.submit(&pump, &lisinopril("pat-victim", DR_PUMP)).await;
    s.wait_for(TENANT, &next, Status::AwaitingVerification)
        .await;
    let kinds = queue_alert_kinds(&s, &next).await;
    assert!(kinds.iter().any(|k| k == "allergy"), "{kinds:?}");
    let read = s
        .as_who(
            &Who::pharmacist("rph-v"),
            "GET",
            &format!("/prescriptions/{next}"),
            None,
        )
        .await;
    assert!(!read.text.contains("Spoofington"), "{}", read.text);
    s.stop().await;
}

/// Nor a Practitioner that none of its orders names as requester (a prescriber could otherwise
/// rewrite another prescriber's NPI and DEA record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_cannot_carry_a_practitioner_its_orders_do_not_name() {
    let s = TestServer::start().await;
    let pump = Who::prescriber("dr-pump", DR_PUMP);
    let mut b = lisinopril("pat-pr", DR_PUMP);
    let smiths = lisinopril("pat-pr", DR_SMITH)["entry"][1].clone();
    entries(&mut b).push(smiths);
    let r = s.as_who(&pump, "POST", "/prescriptions", Some(&b)).await;
    r.assert_outcome(400);
    assert!(r.text.contains("Practitioner"), "{}", r.text);

    // A twin of one's own Practitioner (the same id) carrying another prescriber's NPI: it
    // matched the requester by id and rewrote Smith's record (no DEA: his next controlled
    // order was rejected).
    let before = s.events_of("dr-pump").await.len();
    let mut b = lisinopril("pat-pr", DR_PUMP);
    b["entry"][1]["resource"]["id"] = json!("shared-id");
    let mut twin = lisinopril("pat-pr", DR_SMITH)["entry"][1].clone();
    twin["resource"]["id"] = json!("shared-id");
    twin["resource"]["identifier"] =
        json!([{"system": "http://hl7.org/fhir/sid/us-npi", "value": DR_SMITH.npi}]);
    entries(&mut b).push(twin);
    let r = s.as_who(&pump, "POST", "/prescriptions", Some(&b)).await;
    r.assert_outcome(400);
    assert!(r.text.contains("share"), "{}", r.text);
    assert_eq!(writes(&s, "dr-pump", before).await, 0);

    // The same Patient and Practitioner twice, each copy under its own fullUrl (an integration
    // engine joining per-order Bundles): one entry each, accepted.
    let mut b = lisinopril("pat-pr", DR_PUMP);
    let mut second = lisinopril("pat-pr", DR_PUMP);
    let extra: Vec<Value> = entries(&mut second).drain(..).collect();
    entries(&mut b).extend(extra);
    let r = s.as_who(&pump, "POST", "/prescriptions", Some(&b)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.json["entry"].as_array().map(Vec::len),
        Some(2),
        "{}",
        r.text
    );
    s.stop().await;
}

/// A submission that is refused leaves nothing behind: not its Patient's new details, not the
/// orders before the refused one (a transaction Bundle is all or nothing for what intake
/// checks). Before, the Patient was rewritten and the first order stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_submission_writes_nothing() {
    let s = TestServer::start().await;
    let pump = Who::prescriber("dr-pump", DR_PUMP);
    let mut b = lisinopril("pat-atomic", DR_PUMP);
    b["type"] = json!("transaction");
    let mut bad = b["entry"][2].clone();
    bad["resource"]["id"] = json!("mr-zero-qty");
    bad["resource"]["dispenseRequest"]["quantity"]["value"] = json!(0);
    entries(&mut b).push(bad);
    let before = s.events_of("dr-pump").await.len();
    let r = s.as_who(&pump, "POST", "/prescriptions", Some(&b)).await;
    r.assert_outcome(400);
    let rph = Who::pharmacist("rph-atomic");
    let list = s
        .as_who(&rph, "GET", "/patients/pat-atomic/prescriptions", None)
        .await;
    assert_eq!(list.json["total"], 0, "{}", list.text);
    assert_eq!(patient_writes(&s, "dr-pump", before).await, 0);

    // An order id reused with other content (409): the Bundle's new patient details are not
    // applied either.
    let mut ok = lisinopril("pat-atomic", DR_PUMP);
    let id = s.submit(&pump, &ok).await;
    s.wait_for(TENANT, &id, Status::AwaitingVerification).await;
    let before = s.events_of("dr-pump").await.len();
    ok["entry"][0]["resource"]["address"][0]["line"] = json!(["9 Elsewhere Road"]);
    ok["entry"][2]["resource"]["dispenseRequest"]["quantity"]["value"] = json!(60);
    let r = s.as_who(&pump, "POST", "/prescriptions", Some(&ok)).await;
    r.assert_outcome(409);
    assert_eq!(patient_writes(&s, "dr-pump", before).await, 0);
    s.stop().await;
}

/// The same MedicationRequest twice in one Bundle is one order: stored once, taken on through
/// validation and review. Before, the repeat's insert lost on the order's own key: 409, with the
/// first copy already stored and never announced (left `received`). Two different orders under
/// one id are refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_twice_in_a_bundle_is_taken_once() {
    let s = TestServer::start().await;
    let pump = Who::prescriber("dr-pump", DR_PUMP);
    let mut b = lisinopril("pat-twice", DR_PUMP);
    let repeat = b["entry"][2].clone();
    entries(&mut b).push(repeat.clone());
    let r = s.as_who(&pump, "POST", "/prescriptions", Some(&b)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let locations: Vec<&Value> = r.json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["response"]["location"])
        .collect();
    assert_eq!(locations.len(), 2, "{}", r.text);
    assert_eq!(locations[0], locations[1], "{}", r.text);
    let id = locations[0]
        .as_str()
        .and_then(|l| l.rsplit('/').next())
        .unwrap()
        .to_string();
    s.wait_for(TENANT, &id, Status::AwaitingVerification).await;
    let rph = Who::pharmacist("rph-twice");
    let list = s
        .as_who(&rph, "GET", "/patients/pat-twice/prescriptions", None)
        .await;
    assert_eq!(list.json["total"], 1, "{}", list.text);

    let before = s.events_of("dr-pump").await.len();
    let mut b = lisinopril("pat-twice-2", DR_PUMP);
    let mut other = b["entry"][2].clone();
    other["resource"]["dispenseRequest"]["quantity"]["value"] = json!(60);
    entries(&mut b).push(other);
    let r = s.as_who(&pump, "POST", "/prescriptions", Some(&b)).await;
    r.assert_outcome(400);
    assert!(r.text.contains("MedicationRequest"), "{}", r.text);
    assert_eq!(writes(&s, "dr-pump", before).await, 0);
    s.stop().await;
}

/// A submission carries at most rx_fn_intake::MAX_ENTRIES entries: a Bundle of thousands of
/// allergies (each rewrites the patient's file) is refused before any is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_with_too_many_entries_is_refused_before_anything_is_written() {
    let s = TestServer::start().await;
    let pump = Who::prescriber("dr-pump", DR_PUMP);
    let mut b = lisinopril("pat-many", DR_PUMP);
    for i in 0..rx_fn_intake::MAX_ENTRIES {
        entries(&mut b).push(allergy_entry(
            &format!("alg-{i}"),
            "pat-many",
            "dust",
            "active",
        ));
    }
    let r = s.as_who(&pump, "POST", "/prescriptions", Some(&b)).await;
    r.assert_outcome(400);
    assert_eq!(r.json["issue"][0]["code"], "too-costly", "{}", r.text);
    assert!(s.events_of("dr-pump").await.is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_sees_nothing_and_each_attempt_is_audited() {
    let s = TestServer::start().await;
    let id = s.queued("pat-t").await;
    let outsider = Who::pharmacist("rph-b").in_tenant(OTHER_TENANT);
    let read = s
        .as_who(&outsider, "GET", &format!("/prescriptions/{id}"), None)
        .await;
    read.assert_outcome(404);
    let verify = s
        .as_who(
            &outsider,
            "POST",
            &format!("/prescriptions/{id}/verification"),
            Some(&json!({"decision": "approve"})),
        )
        .await;
    verify.assert_outcome(404);
    let list = s
        .as_who(&outsider, "GET", "/patients/pat-t/prescriptions", None)
        .await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.json["total"], 0, "{}", list.text);
    let queue = s.as_who(&outsider, "GET", "/queue", None).await;
    assert_eq!(queue.json["count"], 0, "{}", queue.text);
    let denials = s.denials("rph-b").await;
    assert!(denials.len() >= 2, "{denials:?}");
    assert!(denials.iter().all(|e| e.resource.id == id));
    // Untouched: still waiting for its own pharmacy.
    assert_eq!(s.status(TENANT, &id).await, Status::AwaitingVerification);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prescribers_reach_only_orders_they_wrote() {
    let s = TestServer::start().await;
    let id = s.queued("pat-own").await;
    let smith = Who::prescriber("dr-smith", DR_SMITH);
    let read = s
        .as_who(&smith, "GET", &format!("/prescriptions/{id}"), None)
        .await;
    read.assert_outcome(403);
    let cancel = s
        .as_who(
            &smith,
            "POST",
            &format!("/prescriptions/{id}/cancel"),
            Some(&json!({"reason": "not my patient anyway"})),
        )
        .await;
    cancel.assert_outcome(403);
    // Submitting an order in another prescriber's name.
    let forged = s
        .as_who(
            &smith,
            "POST",
            "/prescriptions",
            Some(&lisinopril("pat-own", DR_PUMP)),
        )
        .await;
    forged.assert_outcome(403);
    let list = s
        .as_who(&smith, "GET", "/patients/pat-own/prescriptions", None)
        .await;
    assert_eq!(list.json["total"], 0, "{}", list.text);
    let details: Vec<String> = s
        .denials("dr-smith")
        .await
        .into_iter()
        .filter_map(|e| e.detail)
        .collect();
    for want in [
        "read-prescription:not-own-patient-order",
        "cancel-prescription:not-own-patient-order",
        "submit-prescription:not-own-patient-order",
        "list-patient-prescriptions:not-own-patient-order",
    ] {
        assert!(
            details.iter().any(|d| d == want),
            "{want} missing from {details:?}"
        );
    }
    // The author still can.
    let own = s
        .as_who(
            &Who::prescriber("dr-pump", DR_PUMP),
            "GET",
            &format!("/prescriptions/{id}"),
            None,
        )
        .await;
    assert_eq!(own.status, 200, "{}", own.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlled_order_needs_mfa_to_verify_and_dispense() {
    let s = TestServer::start().await;
    let id = s
        .submit(
            &Who::prescriber("dr-pump", DR_PUMP),
            &oxycodone("pat-cs", DR_PUMP),
        )
        .await;
    s.wait_for(TENANT, &id, Status::AwaitingVerification).await;
    let no_mfa = Who::pharmacist("rph-nomfa").without_mfa();
    let approve = json!({"decision": "approve", "overrides": overrides(&s, &id).await});
    let r = s
        .as_who(
            &no_mfa,
            "POST",
            &format!("/prescriptions/{id}/verification"),
            Some(&approve),
        )
        .await;
    r.assert_outcome(403);
    assert!(s
        .denials("rph-nomfa")
        .await
        .iter()
        .any(|e| e.detail.as_deref() == Some("verify-prescription:mfa-required")));
    let with_mfa = Who::pharmacist("rph-mfa");
    let r = s
        .as_who(
            &with_mfa,
            "POST",
            &format!("/prescriptions/{id}/verification"),
            Some(&approve),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .as_who(
            &no_mfa,
            "POST",
            &format!("/prescriptions/{id}/dispenses"),
            Some(&json!({})),
        )
        .await;
    r.assert_outcome(403);
    let r = s
        .as_who(
            &Who::pharmacist("rph-fill"),
            "POST",
            &format!("/prescriptions/{id}/dispenses"),
            Some(&json!({})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["resourceType"], "MedicationDispense", "{}", r.text);
    s.stop().await;
}

/// Overrides for every alert the queue shows on `rx_id`.
async fn overrides(s: &TestServer, rx_id: &str) -> Vec<Value> {
    let q = s
        .as_who(&Who::pharmacist("rph-look"), "GET", "/queue", None)
        .await;
    q.json["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["rxId"] == rx_id)
        .flat_map(|e| e["alerts"].as_array().cloned().unwrap_or_default())
        .map(|a| json!({"alert": a["kind"], "reason": "discussed with the prescriber"}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoever_wrote_an_order_cannot_verify_it() {
    let s = TestServer::start().await;
    // One person, two roles: submits as a prescriber, then signs in as a pharmacist.
    let id = s
        .submit(
            &Who::prescriber("pat-dual", DR_PUMP),
            &lisinopril("pat-sod", DR_PUMP),
        )
        .await;
    s.wait_for(TENANT, &id, Status::AwaitingVerification).await;
    let same_person = Who::pharmacist("pat-dual");
    let r = s
        .as_who(
            &same_person,
            "POST",
            &format!("/prescriptions/{id}/verification"),
            Some(&json!({"decision": "approve"})),
        )
        .await;
    r.assert_outcome(403);
    assert!(s
        .denials("pat-dual")
        .await
        .iter()
        .any(|e| e.detail.as_deref() == Some("verify-prescription:separation-of-duties")));
    assert_eq!(s.status(TENANT, &id).await, Status::AwaitingVerification);
    let other = s
        .as_who(
            &Who::pharmacist("rph-other"),
            "POST",
            &format!("/prescriptions/{id}/verification"),
            Some(&json!({"decision": "approve"})),
        )
        .await;
    assert_eq!(other.status, 200, "{}", other.text);
    s.stop().await;
}

/// `n` pharmacists (`<prefix>-0`…) POST `body` to `path` at once; each one's subject, status and
/// body.
async fn at_once(
    s: &TestServer,
    prefix: &str,
    n: usize,
    path: &str,
    body: &Value,
) -> Vec<(String, u16, Value)> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let subject = format!("{prefix}-{i}");
        let req = s
            .client
            .post(format!("{}{path}", s.base))
            .bearer_auth(s.token(&Who::pharmacist(&subject)))
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
        set.spawn(async move {
            let r = req.send().await.expect("request sent");
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            let v = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
            (subject, status, v)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("task"));
    }
    out
}

/// Of 24 pharmacists approving one order at once, one verified it; the other 23 verified
/// nothing and are told so (409), not answered 200 `duplicate: true` as if their request had.
/// The pharmacist who did verify it may send it again (a redelivery); a late one gets 409 too.
/// Dispense, likewise: of 8 pharmacists filling the whole order at once, one filled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_pharmacists_deciding_an_order_at_once_only_the_one_who_did_is_told_so() {
    let s = TestServer::start().await;
    let id = s.queued("pat-race").await;
    let path = format!("/prescriptions/{id}/verification");
    let approve = json!({"decision": "approve"});
    let answers = at_once(&s, "rph-race", 24, &path, &approve).await;
    let won: Vec<_> = answers.iter().filter(|(_, st, _)| *st == 200).collect();
    assert_eq!(won.len(), 1, "{answers:?}");
    assert_eq!(won[0].2["duplicate"], false, "{answers:?}");
    for (who, status, v) in &answers {
        if *status != 200 {
            assert_eq!(*status, 409, "{who}: {v}");
            assert_eq!(v["resourceType"], "OperationOutcome", "{who}: {v}");
            assert_eq!(v["issue"][0]["code"], "conflict", "{who}: {v}");
            assert!(
                !v.to_string().contains(&won[0].0),
                "names the verifier: {v}"
            );
        }
    }
    let winner = Who::pharmacist(&won[0].0);
    let again = s.as_who(&winner, "POST", &path, Some(&approve)).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["duplicate"], true, "{}", again.text);
    let late = s
        .as_who(&Who::pharmacist("rph-late"), "POST", &path, Some(&approve))
        .await;
    late.assert_outcome(409);
    assert!(
        late.text.contains("already verified by another pharmacist"),
        "{}",
        late.text
    );
    let verifications = s
        .svc
        .vault
        .store
        .transitions(TENANT, &id)
        .await
        .expect("transitions")
        .into_iter()
        .filter(|t| t.to == Status::Verified.as_str())
        .count();
    assert_eq!(verifications, 1);

    let answers = at_once(
        &s,
        "rph-fill",
        8,
        &format!("/prescriptions/{id}/dispenses"),
        &json!({}),
    )
    .await;
    let filled = answers.iter().filter(|(_, st, _)| *st == 201).count();
    assert_eq!(filled, 1, "{answers:?}");
    for (who, status, v) in &answers {
        if *status != 201 {
            assert!(matches!(status, 409 | 422), "{who}: {status} {v}");
            assert_eq!(v["resourceType"], "OperationOutcome", "{who}: {v}");
        }
    }
    let stored = load_rx(&s.svc, &AuditCtx::system("test", TENANT), TENANT, &id)
        .await
        .expect("stored");
    assert_eq!(stored.record.fills.len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_reads_are_audited_with_the_caller_and_source_ip() {
    let s = TestServer::start().await;
    let id = s.queued("pat-read").await;
    let r = s
        .as_who(
            &Who::pharmacist("rph-reader"),
            "GET",
            &format!("/prescriptions/{id}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let reads: Vec<_> = s
        .events_of("rph-reader")
        .await
        .into_iter()
        .filter(|e| e.action == AuditAction::Read && e.resource.id == id)
        .collect();
    assert!(!reads.is_empty());
    assert!(
        reads
            .iter()
            .all(|e| e.source_ip.as_deref() == Some("127.0.0.1")),
        "{reads:?}"
    );
    assert!(reads.iter().all(|e| !e.break_glass));
    s.stop().await;
}

/// The queue pages: a full page names the id to continue `after`; the pages together hold each
/// waiting order once; the last page names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_pages_with_after() {
    let s = TestServer::start().await;
    let rph = Who::pharmacist("rph-pages");
    let mut queued = Vec::new();
    for i in 0..5 {
        queued.push(s.queued(&format!("pat-page-{i}")).await);
    }
    let mut seen = Vec::new();
    let mut path = "/queue?limit=2".to_string();
    let mut pages = 0;
    loop {
        let q = s.as_who(&rph, "GET", &path, None).await;
        assert_eq!(q.status, 200, "{}", q.text);
        pages += 1;
        seen.extend(
            q.json["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .filter_map(|e| e["rxId"].as_str().map(str::to_string)),
        );
        match q.json["next"].as_str() {
            Some(next) => {
                assert_eq!(q.json["count"], 2);
                path = format!("/queue?limit=2&after={next}");
            }
            None => break,
        }
        assert!(pages < 10, "the pages do not end");
    }
    assert_eq!(pages, 3);
    let mut want = queued.clone();
    want.sort();
    let mut got = seen.clone();
    got.sort();
    assert_eq!(got, want, "each waiting order once");
    s.stop().await;
}

/// `after` takes only a `next` the server gave (an order id of the caller's pharmacy): anything
/// else is a 400 naming `after`, never an empty or meaningless page; a `limit` that is no number
/// is a 400 naming `limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_cursor_the_server_never_gave_is_a_400_naming_after() {
    let s = TestServer::start().await;
    let rph = Who::pharmacist("rph-cursor");
    let mine = s.queued("pat-cursor").await;
    let elsewhere = Who::prescriber("dr-pump", DR_PUMP).in_tenant(OTHER_TENANT);
    let theirs = s
        .submit(&elsewhere, &lisinopril("pat-cursor-b", DR_PUMP))
        .await;
    let never = uuid::Uuid::now_v7().to_string();
    let shouted = mine.to_uppercase();
    for after in [
        "bogus",
        "",
        "zzzz",
        never.as_str(),
        theirs.as_str(),
        shouted.as_str(),
    ] {
        let r = s
            .as_who(&rph, "GET", &format!("/queue?after={after}"), None)
            .await;
        r.assert_outcome(400);
        assert_eq!(r.json["issue"][0]["expression"][0], "after", "{}", r.text);
        assert!(r.text.contains("`after`"), "{}", r.text);
    }
    for limit in ["many", "-1", "1.5", ""] {
        let r = s
            .as_who(&rph, "GET", &format!("/queue?limit={limit}"), None)
            .await;
        r.assert_outcome(400);
        assert_eq!(r.json["issue"][0]["expression"][0], "limit", "{}", r.text);
    }
    // A cursor it gave is taken, and still is once that order has left the queue.
    let r = s
        .as_who(&rph, "GET", &format!("/queue?after={mine}"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.verified(&mine).await;
    let r = s
        .as_who(&rph, "GET", &format!("/queue?after={mine}&limit=5"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["count"], 0, "{}", r.text);
    s.stop().await;
}

/// `POST /dispenses` with an `Idempotency-Key` (or a `requestId` in the body) sent again by the
/// same pharmacist is answered 200 with the fill it made, not a second fill (a retry after a
/// 504 or a lost answer would otherwise dispense twice); a header that disagrees with the body
/// is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispense_retried_with_its_idempotency_key_records_one_fill() {
    let s = TestServer::start().await;
    let id = s.queued("pat-idem").await;
    let rph = Who::pharmacist("rph-idem");
    let r = s
        .as_who(
            &rph,
            "POST",
            &format!("/prescriptions/{id}/verification"),
            Some(&json!({"decision": "approve"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let url = format!("{}/prescriptions/{id}/dispenses", s.base);
    let send = |key: &str, body: Value| {
        s.client
            .post(&url)
            .bearer_auth(s.token(&rph))
            .header("content-type", "application/fhir+json")
            .header("idempotency-key", key)
            .body(serde_json::to_vec(&body).expect("body"))
    };
    let first = s.raw(send("k-1", json!({"quantity": 10}))).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = s.raw(send("k-1", json!({"quantity": 10}))).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["id"], first.json["id"]);
    let odd = s
        .raw(send("k-2", json!({"quantity": 1, "requestId": "k-3"})))
        .await;
    odd.assert_outcome(400);
    let two = s
        .raw(send("k-4", json!({"quantity": 1})).header("idempotency-key", "k-5"))
        .await;
    two.assert_outcome(400);
    let fills = s
        .events_of("rph-idem")
        .await
        .iter()
        .filter(|e| e.function == "dispense" && e.action == AuditAction::Update)
        .filter(|e| e.resource.kind == "MedicationRequest")
        .count();
    assert_eq!(fills, 1, "one fill recorded");
    s.stop().await;
}
