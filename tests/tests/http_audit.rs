//! The auditor's endpoints over HTTP: search as FHIR AuditEvents, the NDJSON export, the
//! accounting of disclosures, the review of break-glass sessions; each scoped to the auditor's
//! organisation, each read of the trail itself audited, none carrying PHI.

mod http_support;

use http_support::*;
use rx_guard::access::Role;
use rx_guard::audit::{Action as AuditAction, AuditQuery};
use serde_json::{json, Value};

fn auditor(subject: &str) -> Who {
    Who::new(Role::Auditor, subject)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_by_user_and_action_returns_fhir_audit_events_of_the_tenant_only() {
    let s = TestServer::start().await;
    let id = s.queued("pat-audit").await;
    // A denial to find: a technician may not cancel.
    let tech = Who::new(Role::Technician, "tech-audited");
    s.as_who(
        &tech,
        "POST",
        &format!("/prescriptions/{id}/cancel"),
        Some(&json!({"reason": "no longer needed"})),
    )
    .await
    .assert_outcome(403);

    let a = auditor("auditor-a");
    let r = s
        .as_who(
            &a,
            "GET",
            "/audit/events?user=tech-audited&action=deny",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["resourceType"], "Bundle");
    assert_eq!(r.json["total"], 1, "{}", r.text);
    assert_eq!(
        r.json["entry"][0]["resource"]["resourceType"], "AuditEvent",
        "{}",
        r.text
    );
    assert!(r.text.contains("tech-audited"));

    // By patient (named as submitted; matched by blind index), within a time window.
    let from = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let path = format!("/audit/events?patient=pat-audit&from={}", urlencode(&from));
    let r = s.as_who(&a, "GET", &path, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json["total"].as_u64().unwrap_or(0) >= 3, "{}", r.text);
    // limit=1 gives one entry; limit=0 as many as a page holds (here: all of them).
    let r = s.as_who(&a, "GET", &format!("{path}&limit=1"), None).await;
    assert_eq!(
        r.json["entry"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.text
    );
    let r = s.as_who(&a, "GET", &format!("{path}&limit=0"), None).await;
    let total = r.json["total"].as_u64().unwrap_or(0) as usize;
    assert!(total >= 3, "{}", r.text);
    assert_eq!(
        r.json["entry"].as_array().map(Vec::len),
        Some(total),
        "{}",
        r.text
    );

    // An auditor of another organisation sees none of it.
    let b = auditor("auditor-b").in_tenant(OTHER_TENANT);
    let r = s
        .as_who(&b, "GET", "/audit/events?user=tech-audited", None)
        .await;
    assert_eq!(r.json["total"], 0, "{}", r.text);
    let r = s.as_who(&b, "GET", "/audit/events", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for theirs in ["tech-audited", "dr-pump", "auditor-a"] {
        assert!(
            !r.text.contains(theirs),
            "{theirs} leaked to another tenant: {}",
            r.text
        );
    }

    // Each search is itself in the trail.
    let reads = s
        .audit(AuditQuery {
            subject: Some("auditor-a".into()),
            ..AuditQuery::default()
        })
        .await;
    assert!(reads.len() >= 2, "{reads:?}");
    for needle in PHI {
        assert!(!r.text.contains(needle));
    }
    s.stop().await;
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_string_that_does_not_fit_is_a_400_operation_outcome() {
    let s = TestServer::start().await;
    let a = auditor("auditor-q");
    s.as_who(&a, "GET", "/audit/events?from=yesterday", None)
        .await
        .assert_outcome(400);
    s.as_who(&a, "GET", "/audit/events?action=peek", None)
        .await
        .assert_outcome(400);
    s.as_who(&a, "GET", "/audit/events?colour=blue", None)
        .await
        .assert_outcome(400);
    let r = s.as_who(&a, "GET", "/audit/disclosures", None).await;
    r.assert_outcome(400);
    assert!(
        r.text.contains("needs the parameter `patient`"),
        "a missing parameter is named: {}",
        r.text
    );
    let r = s.as_who(&a, "GET", "/audit/events?colour=blue", None).await;
    assert!(
        !r.text.contains("colour"),
        "an unknown one is not echoed: {}",
        r.text
    );
    s.stop().await;
}

/// Every search or paging value that does not fit is a 400 naming its parameter (never
/// quoting the value), not a search that silently drops it or cannot match anything; the list
/// endpoints that take no parameters refuse any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_value_that_does_not_fit_is_a_400_naming_its_parameter() {
    let s = TestServer::start().await;
    let a = auditor("auditor-values");
    let now = chrono::Utc::now();
    let later = urlencode(&(now + chrono::Duration::hours(1)).to_rfc3339());
    let earlier = urlencode(&(now - chrono::Duration::hours(1)).to_rfc3339());
    for (query, name) in [
        ("from=yesterday".to_string(), "from"),
        ("from=2025-01-06".to_string(), "from"),
        ("to=Avery".to_string(), "to"),
        (format!("from={later}&to={earlier}"), "from"),
        ("action=peek".to_string(), "action"),
        ("limit=all".to_string(), "limit"),
        ("limit=-5".to_string(), "limit"),
        ("user=".to_string(), "user"),
        ("patient=%20".to_string(), "patient"),
    ] {
        let r = s
            .as_who(&a, "GET", &format!("/audit/events?{query}"), None)
            .await;
        r.assert_outcome(400);
        assert_eq!(
            r.json["issue"][0]["expression"][0], name,
            "{query}: {}",
            r.text
        );
        assert!(r.text.contains(&format!("`{name}`")), "{query}: {}", r.text);
        for value in ["yesterday", "Avery", "peek", "all"] {
            assert!(
                !r.text.contains(value),
                "{query}: the value is echoed: {}",
                r.text
            );
        }
    }
    let r = s
        .as_who(&a, "GET", "/audit/events?limit=1&limit=2", None)
        .await;
    r.assert_outcome(400);
    assert!(r.text.contains("`limit`"), "{}", r.text);
    // Parameters an endpoint does not take: refused, the ones it takes named.
    let r = s
        .as_who(&a, "GET", "/audit/disclosures?patient=p-1&limit=5", None)
        .await;
    r.assert_outcome(400);
    assert!(r.text.contains("`patient`"), "{}", r.text);
    for path in [
        format!("/audit/export?from={earlier}"),
        "/audit/break-glass?user=rph-1".to_string(),
    ] {
        let r = s.as_who(&a, "GET", &path, None).await;
        r.assert_outcome(400);
        assert!(
            r.text.contains("takes no query parameters"),
            "{path}: {}",
            r.text
        );
    }
    let r = s
        .as_who(
            &Who::pharmacist("rph-values"),
            "GET",
            "/patients/pat-1/prescriptions?status=active",
            None,
        )
        .await;
    r.assert_outcome(400);
    assert!(r.text.contains("takes no query parameters"), "{}", r.text);
    s.stop().await;
}

/// A query value that is not UTF-8 once percent-decoded is a 400 naming its parameter, on every
/// endpoint that reads a query: it was decoded with U+FFFD in place of the bytes and searched
/// (200, an answer for a value nobody sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_value_that_is_not_utf8_is_a_400_naming_its_parameter() {
    let s = TestServer::start().await;
    let a = auditor("auditor-utf8");
    let rph = Who::pharmacist("rph-utf8");
    for (who, path, name) in [
        (&a, "/audit/events?patient=%FF", "patient"),
        (&a, "/audit/events?user=%FE", "user"),
        (&a, "/audit/events?user=ok&action=re%C3ad", "action"),
        (&a, "/audit/disclosures?patient=Avery%E9", "patient"),
        (&rph, "/queue?after=%FF", "after"),
    ] {
        let r = s.as_who(who, "GET", path, None).await;
        r.assert_outcome(400);
        assert_eq!(
            r.json["issue"][0]["expression"][0], name,
            "{path}: {}",
            r.text
        );
        assert!(r.text.contains(&format!("`{name}`")), "{path}: {}", r.text);
        assert!(r.text.contains("UTF-8"), "{path}: {}", r.text);
        assert!(
            !r.text.contains("Avery") && !r.text.contains('\u{FFFD}'),
            "{path}: the value is echoed: {}",
            r.text
        );
    }
    // UTF-8 percent-encoded is searched as sent.
    let r = s
        .as_who(&a, "GET", "/audit/events?user=J%C3%BCrgen", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

/// A time outside years 0000–9999 (in UTC) is a 400 naming its parameter: the store orders times
/// as fixed-width text, so a signed or five-digit year widened the search to every event or
/// emptied it, and a `to` near chrono's limit panicked computing the default window (a 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_outside_years_0000_to_9999_is_a_400_naming_its_parameter() {
    let s = TestServer::start().await;
    let a = auditor("auditor-years");
    for (query, name) in [
        ("from=%2B10000-01-01T00:00:00Z", "from"),
        (
            "from=2020-01-01T00:00:00Z&to=%2B10000-01-01T00:00:00Z",
            "to",
        ),
        ("to=-262143-01-01T00:00:00Z", "to"),
        (
            "from=-262143-01-01T00:00:00Z&to=-262143-01-01T00:00:00Z",
            "from",
        ),
        ("from=-0001-12-31T00:00:00Z", "from"),
        // in range as written, past 9999 in UTC
        ("to=9999-12-31T23:00:00-05:00", "to"),
    ] {
        let r = s
            .as_who(&a, "GET", &format!("/audit/events?{query}"), None)
            .await;
        r.assert_outcome(400);
        assert_eq!(
            r.json["issue"][0]["expression"][0], name,
            "{query}: {}",
            r.text
        );
        assert!(r.text.contains("9999-12-31"), "says the range: {}", r.text);
        assert!(
            !r.text.contains("10000") && !r.text.contains("262143"),
            "{}",
            r.text
        );
    }
    // The earliest and latest times are searched; a default window reaching before year 0000
    // starts at its first instant.
    for query in [
        "to=0000-01-01T00:00:00Z",
        "from=0000-01-01T00:00:00Z&to=9999-12-31T23:59:59Z",
    ] {
        let r = s
            .as_who(&a, "GET", &format!("/audit/events?{query}"), None)
            .await;
        assert_eq!(r.status, 200, "{query}: {}", r.text);
    }
    s.stop().await;
}

/// `to` without `from` searches the 24 hours before `to`: an event older than a day is found
/// by a `to` just after it (the window used to end before it began, so such a search was
/// always empty).
/// A successful read of a new prescription by pharmacist `subject` at `at` (appended straight
/// to the trail, to search for).
fn pharmacist_read(
    subject: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> rx_guard::audit::AuditEvent {
    use rx_guard::audit::{Actor, AuditEvent, Outcome, Purpose, ResourceRef};
    let mut e = AuditEvent::new(
        Actor {
            subject: subject.into(),
            role: "pharmacist".into(),
            tenant: TENANT.into(),
        },
        AuditAction::Read,
        ResourceRef {
            kind: "MedicationRequest".into(),
            id: uuid::Uuid::now_v7().to_string(),
        },
        "records",
        Purpose::Treatment,
    );
    e.at = at;
    e.outcome = Outcome::Success;
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_without_from_searches_the_day_before_to() {
    let s = TestServer::start().await;
    let at = chrono::Utc::now() - chrono::Duration::hours(60);
    let old = pharmacist_read("rph-long-ago", at);
    s.svc.vault.audit(&[old]).await.expect("an old event");
    let to = urlencode(&(at + chrono::Duration::hours(1)).to_rfc3339());
    let r = s
        .as_who(
            &auditor("auditor-to"),
            "GET",
            &format!("/audit/events?user=rph-long-ago&to={to}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["total"], 1, "{}", r.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_streams_the_tenants_events_as_fhir_ndjson() {
    let s = TestServer::start().await;
    s.queued("pat-export").await;
    s.as_who(
        &Who::pharmacist("rph-b").in_tenant(OTHER_TENANT),
        "GET",
        "/queue",
        None,
    )
    .await;
    let r = s
        .as_who(&auditor("auditor-x"), "GET", "/audit/export", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
    let lines: Vec<Value> = r
        .text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert!(lines.len() > 5, "{}", r.text);
    assert!(lines.iter().all(|l| l["resourceType"] == "AuditEvent"));
    assert!(
        !r.text.contains("rph-b"),
        "another tenant's events are not exported"
    );
    for needle in PHI {
        assert!(!r.text.contains(needle));
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disclosures_name_the_patient_by_blind_index_only() {
    let s = TestServer::start().await;
    s.queued("pat-disc").await;
    let r = s
        .as_who(
            &auditor("auditor-d"),
            "GET",
            "/audit/disclosures?patient=pat-disc",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let blind = r.json["patient"].as_str().expect("patient");
    assert_eq!(blind.len(), 64, "{}", r.text);
    assert!(!r.text.contains("pat-disc"), "{}", r.text);
    assert!(r.json["disclosures"].is_array());
    let logged = s
        .audit(AuditQuery {
            subject: Some("auditor-d".into()),
            ..AuditQuery::default()
        })
        .await;
    assert!(
        logged.iter().any(|e| e.patient.as_deref() == Some(blind)),
        "{logged:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_sessions_are_listed_for_review_with_what_they_touched() {
    let s = TestServer::start().await;
    s.queued("pat-review").await;
    let tech = Who::new(Role::Technician, "tech-review");
    let r = s
        .as_who(
            &tech,
            "POST",
            "/break-glass",
            Some(&json!({"reason": "covering the emergency department tonight"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let grant = r.json["id"].as_str().expect("id").to_string();
    let list = s
        .as_who(&tech, "GET", "/patients/pat-review/prescriptions", None)
        .await;
    assert_eq!(list.status, 200, "{}", list.text);

    let r = s
        .as_who(&auditor("auditor-bg"), "GET", "/audit/break-glass", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let sessions = r.json["sessions"].as_array().expect("sessions");
    let session = sessions
        .iter()
        .find(|x| x["grant_id"] == grant.as_str())
        .unwrap_or_else(|| panic!("session {grant} listed: {}", r.text));
    assert_eq!(session["subject"], "tech-review");
    assert!(
        !session["touched"].as_array().expect("touched").is_empty(),
        "{}",
        r.text
    );
    assert!(
        !r.text.contains("emergency department"),
        "the reason stays sealed"
    );

    let alerts = s
        .audit(AuditQuery {
            action: Some(AuditAction::BreakGlass),
            ..AuditQuery::default()
        })
        .await;
    assert!(alerts
        .iter()
        .any(|e| e.detail.as_deref() == Some("break-glass-alert")));
    s.stop().await;
}

/// Events of one millisecond can be more than a page holds (one queue read writes dozens): a
/// full page's `next` link starts the next page after its last event, so following the links
/// reads every match once, in trail order. (Paging by `from`, as the README said before, stuck
/// on such a millisecond for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_links_page_through_events_of_one_millisecond() {
    let s = TestServer::start().await;
    let at = chrono::Utc::now() - chrono::Duration::minutes(5);
    let events: Vec<_> = (0..25).map(|_| pharmacist_read("rph-crowd", at)).collect();
    s.svc.vault.audit(&events).await.expect("events");
    let au = auditor("auditor-pages");
    let mut path = "/audit/events?user=rph-crowd&limit=10".to_string();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = s.as_who(&au, "GET", &path, None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        pages += 1;
        for e in r.json["entry"].as_array().expect("entries") {
            seen.push(e["fullUrl"].as_str().expect("fullUrl").to_string());
        }
        match r.json["link"][0]["url"].as_str() {
            Some(next) => {
                assert_eq!(r.json["link"][0]["relation"], "next");
                assert!(
                    next.contains("user=rph-crowd") && next.contains("limit=10"),
                    "{next}"
                );
                path = next.to_string();
            }
            None => break,
        }
        assert!(pages < 10, "the pages never end: {path}");
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = events
        .iter()
        .map(|e| format!("urn:uuid:{}", e.id))
        .collect();
    assert_eq!(seen, want, "every event once, in trail order");

    let bad = s
        .as_who(&au, "GET", "/audit/events?user=rph-crowd&after=last", None)
        .await;
    bad.assert_outcome(400);
    assert!(bad.text.contains("after"), "{}", bad.text);
    s.stop().await;
}
