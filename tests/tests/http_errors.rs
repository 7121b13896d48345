//! Error shapes over HTTP: every refusal is a FHIR OperationOutcome as application/fhir+json
//! with the right status (400, 401 with a Bearer challenge, 404, 413, 415), request ids are set
//! and echoed, and neither a response nor a log line carries the patient's name.

mod http_support;

use http_support::*;
use rx_guard::access::{DevClaims, DevIssuer, Role};
use rx_guard::audit::Outcome;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_a_400_operation_outcome() {
    let s = TestServer::start().await;
    let t = s.token(&Who::prescriber("dr-pump", DR_PUMP));
    let req = s
        .client
        .post(format!("{}/prescriptions", s.base))
        .bearer_auth(&t)
        .header("content-type", "application/fhir+json")
        .body(format!(
            "{{\"resourceType\": \"Bundle\", \"entry\": [{{\"name\": \"{PATIENT_FAMILY}\""
        ));
    let r = s.raw(req).await;
    r.assert_outcome(400);
    assert!(!r.text.contains(PATIENT_FAMILY), "{}", r.text);

    // Valid JSON that is not a prescription: a FHIR structure error, naming no value.
    let mut b = lisinopril("pat-bad", DR_PUMP);
    b["entry"][2]["resource"]["subject"] = json!({"reference": 42});
    let r = s.call("POST", "/prescriptions", Some(&t), Some(&b)).await;
    r.assert_outcome(400);
    for needle in PHI {
        assert!(!r.text.contains(needle), "{}", r.text);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_type_is_415_and_oversize_body_is_413() {
    let s = TestServer::start().await;
    let t = s.token(&Who::prescriber("dr-pump", DR_PUMP));
    let req = s
        .client
        .post(format!("{}/prescriptions", s.base))
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body("{}");
    s.raw(req).await.assert_outcome(415);

    // A body declared larger than the limit is refused from its headers: the server answers 413
    // without reading it (and may close before a client could send it all, so the head goes
    // over a raw socket and the answer is read back).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /prescriptions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {t}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{\"pad\": \"",
        1024 * 1024 + 16
    );
    sock.write_all(head.as_bytes()).await.expect("head");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        sock.read_to_end(&mut answer),
    )
    .await
    .expect("the server answers before the body is sent");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("OperationOutcome"), "{answer}");
    s.stop().await;
}

/// Reads `sock` until the server closes it (EOF), for at most `within`: what it sent, and
/// whether it closed in time.
async fn read_until_closed(
    sock: &mut tokio::net::tcp::OwnedReadHalf,
    within: std::time::Duration,
) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(within, sock.read_to_end(&mut answer))
        .await
        .is_ok_and(|r| r.is_ok());
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

/// Sends `head` on a new kept-alive connection, then one byte of the body every 50 ms (the
/// whole body would take minutes); returns the read half and the trickling task.
async fn trickle(
    addr: &str,
    head: String,
) -> (tokio::net::tcp::OwnedReadHalf, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (read, mut write) = sock.into_split();
    write.write_all(head.as_bytes()).await.expect("head");
    let task = tokio::spawn(async move {
        for _ in 0..4000 {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    (read, task)
}

/// A client that trickles its body past the request timeout gets its 504 OperationOutcome, and
/// then loses the connection at once: it cannot hold the connection (and the handler's thread)
/// open by sending a byte now and then. The same for a body refused as too large (413).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_past_the_request_timeout_gets_504_and_the_connection_is_closed() {
    let s = TestServer::start_with(rx_platform::http::Limits {
        request_timeout: std::time::Duration::from_secs(1),
        ..rx_platform::http::Limits::default()
    })
    .await;
    let t = s.token(&Who::prescriber("dr-pump", DR_PUMP));
    let addr = s.base.trim_start_matches("http://").to_string();
    let head = |length: usize| {
        format!(
            "POST /prescriptions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {t}\r\n\
             Content-Type: application/fhir+json\r\nContent-Length: {length}\r\n\r\n"
        )
    };

    let started = std::time::Instant::now();
    let (mut read, task) = trickle(&addr, head(4000)).await;
    let (answer, closed) = read_until_closed(&mut read, std::time::Duration::from_secs(8)).await;
    task.abort();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("OperationOutcome"), "{answer}");
    assert!(
        closed,
        "the connection was still open {:?} after it started trickling: {answer}",
        started.elapsed()
    );
    assert!(answer.contains("connection: close"), "{answer}");

    // Declared too large, on a kept-alive connection: 413, then closed too.
    let (mut read, task) = trickle(&addr, head(1024 * 1024 + 16)).await;
    let (answer, closed) = read_until_closed(&mut read, std::time::Duration::from_secs(8)).await;
    task.abort();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("OperationOutcome"), "{answer}");
    assert!(closed, "the connection stayed open after the 413: {answer}");

    // The server goes on serving, and stops cleanly (no connection left hanging).
    let r = s.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    s.stop().await;
}

/// A role that may never submit orders (an auditor) is refused at once, audited, before its body
/// is read: it cannot hold a connection and an in-flight place for the request timeout by
/// trickling a Bundle to `POST /prescriptions` (it could, until the timeout, before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_never_submit_is_refused_before_its_body_is_read() {
    let s = TestServer::start().await;
    let t = s.token(&Who::new(rx_guard::access::Role::Auditor, "au-trickle"));
    let addr = s.base.trim_start_matches("http://").to_string();
    let head = format!(
        "POST /prescriptions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {t}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: 4000\r\n\r\n"
    );
    let started = std::time::Instant::now();
    let (mut read, task) = trickle(&addr, head).await;
    let (answer, _) = read_until_closed(&mut read, std::time::Duration::from_secs(3)).await;
    task.abort();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("OperationOutcome"), "{answer}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "answered only after {:?}",
        started.elapsed()
    );
    assert!(
        !s.denials("au-trickle").await.is_empty(),
        "the denial is audited"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_bad_tokens_are_401_with_a_bearer_challenge() {
    let s = TestServer::start().await;
    let no_token = s.call("GET", "/queue", None, None).await;
    no_token.assert_outcome(401);
    assert!(no_token
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Bearer")));

    let garbage = s.call("GET", "/queue", Some("not.a.token"), None).await;
    garbage.assert_outcome(401);
    assert!(garbage
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Bearer") && h.contains("invalid_token")));

    // Signed by another issuer's key (same claims, same kid scheme): refused.
    let elsewhere = tempfile::tempdir().expect("dir");
    let stranger = DevIssuer::open_or_create(elsewhere.path()).expect("issuer");
    let forged = stranger
        .issue(
            &DevClaims {
                subject: "rph-forged".into(),
                role: Role::Pharmacist,
                tenant: TENANT.into(),
                mfa: true,
                npi: None,
            },
            std::time::Duration::from_secs(600),
        )
        .expect("token");
    s.call("GET", "/queue", Some(&forged), None)
        .await
        .assert_outcome(401);

    // Expired.
    let now = chrono::Utc::now().timestamp();
    let expired = s
        .issuer
        .sign_json(
            &json!({"iss": s.issuer.issuer(), "aud": s.issuer.audience(), "sub": "rph-old",
            "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600, "role": "pharmacist",
            "tenant": TENANT}),
        )
        .expect("token");
    let r = s.call("GET", "/queue", Some(&expired), None).await;
    r.assert_outcome(401);
    assert!(r.text.contains("expired"), "{}", r.text);

    // Another scheme is no bearer token.
    let req = s
        .client
        .get(format!("{}/queue", s.base))
        .header("authorization", "Basic cnBoOnNlY3JldA==");
    s.raw(req).await.assert_outcome(401);

    // Each refusal is a `login` event: denied, the route template, the peer, the reason; never
    // the token nor any of its (unverified) claims.
    let logins = s.logins().await;
    assert_eq!(logins.len(), 5, "{logins:?}");
    for ev in &logins {
        assert_eq!(ev.outcome, Outcome::Denied);
        assert_eq!(ev.actor.subject, "unauthenticated");
        assert_eq!(ev.resource.id, "/queue");
        assert_eq!(ev.source_ip.as_deref(), Some("127.0.0.1"));
        let body = serde_json::to_string(ev).expect("event json");
        for secret in [
            "not.a.token",
            forged.as_str(),
            expired.as_str(),
            "rph-forged",
            "rph-old",
        ] {
            assert!(!body.contains(secret), "the event quotes the token: {body}");
        }
    }
    assert!(logins[3]
        .detail
        .as_deref()
        .is_some_and(|d| d.contains("expired")));
    s.stop().await;
}

/// A flood of bad tokens from one network leaves at most the per-minute limit of `login`
/// events, the last of which says that further refusals are counted instead; when the server
/// stops, the count is recorded as one summary event, so the trail tells how many there were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_is_audited_up_to_the_limit_and_the_rest_counted() {
    let mut s = TestServer::start().await;
    let limit = rx_platform::login::DEFAULT_LIMIT as usize;
    for _ in 0..limit + 15 {
        s.call("GET", "/queue", Some("not.a.token"), None)
            .await
            .assert_outcome(401);
    }
    let logins = s.logins().await;
    assert_eq!(logins.len(), limit);
    let last = logins
        .last()
        .and_then(|e| e.detail.clone())
        .unwrap_or_default();
    assert!(
        last.contains("further ones in this window are counted"),
        "{last}"
    );
    s.stop_here().await;
    let logins = s.logins().await;
    assert_eq!(logins.len(), limit + 1, "one summary at stop");
    let summary = logins
        .last()
        .and_then(|e| e.detail.clone())
        .unwrap_or_default();
    assert!(
        summary.starts_with("15 more refused sign-ins from 127.0.0.0/24"),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_are_operation_outcomes() {
    let s = TestServer::start().await;
    let r = s
        .call(
            "GET",
            &format!("/patients/{PATIENT_FAMILY}/records"),
            None,
            None,
        )
        .await;
    r.assert_outcome(404);
    assert!(!r.text.contains(PATIENT_FAMILY));
    let r = s.call("DELETE", "/prescriptions", None, None).await;
    r.assert_outcome(405);
    let t = s.token(&Who::pharmacist("rph-1"));
    let r = s
        .call("GET", "/prescriptions/not-a-uuid", Some(&t), None)
        .await;
    r.assert_outcome(400);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_set_and_propagated() {
    let s = TestServer::start().await;
    let r = s.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    let generated = r.header("x-request-id").expect("request id").to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let req = s
        .client
        .get(format!("{}/queue", s.base))
        .header("x-request-id", "client-req-42");
    let r = s.raw(req).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-request-id"), Some("client-req-42"));
    s.stop().await;
    assert!(
        logs()
            .lines()
            .any(|l| l.contains("client-req-42") && l.contains("\"route\":\"/queue\"")),
        "the request id and route template are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_response_outside_a_clinical_view_and_no_log_line_carries_the_patient_name() {
    let s = TestServer::start().await;
    let dr = Who::prescriber("dr-pump", DR_PUMP);
    let submit = s
        .as_who(
            &dr,
            "POST",
            "/prescriptions",
            Some(&lisinopril("pat-phi", DR_PUMP)),
        )
        .await;
    assert_eq!(submit.status, 201, "{}", submit.text);
    let id = submit
        .header("location")
        .expect("location")
        .trim_start_matches("/prescriptions/")
        .to_string();
    s.wait_for(TENANT, &id, rx_domain::Status::AwaitingVerification)
        .await;
    let mut bodies = vec![submit.text.clone()];
    let auditor = Who::new(Role::Auditor, "auditor-phi");
    let admin = Who::new(Role::Admin, "admin-phi");
    for (who, method, path) in [
        (&auditor, "GET", format!("/prescriptions/{id}")),
        (&admin, "GET", format!("/prescriptions/{id}")),
        (&admin, "GET", "/patients/pat-phi/prescriptions".to_string()),
        (&Who::pharmacist("rph-phi"), "GET", "/queue".to_string()),
        (
            &Who::new(Role::Technician, "tech-phi"),
            "GET",
            "/patients/pat-phi/prescriptions".to_string(),
        ),
    ] {
        bodies.push(s.as_who(who, method, &path, None).await.text);
    }
    // The pharmacist's full view does show the patient (that is what it is for).
    let full = s
        .as_who(
            &Who::pharmacist("rph-phi"),
            "GET",
            &format!("/prescriptions/{id}"),
            None,
        )
        .await;
    assert_eq!(full.status, 200, "{}", full.text);
    for body in &bodies {
        for needle in PHI {
            assert!(
                !body.contains(needle),
                "a response carries PHI ({needle}): {body}"
            );
        }
    }
    s.stop().await;
    assert_logs_free_of_phi();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_without_a_token() {
    let s = TestServer::start().await;
    let r = s.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/fhir+json"));
    s.stop().await;
}

/// A key file removed or replaced under a running server: its keys live on in memory, so it
/// would go on sealing what no later process can open. `/healthz` fails from then on, and the
/// server's stop ends in an error instead of success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_once_a_key_file_is_removed() {
    let mut s = TestServer::start().await;
    let kek = s.data_dir().join("keys/kek.key");
    let saved = std::fs::read(&kek).unwrap();
    std::fs::remove_file(&kek).unwrap();
    let r = s.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json["status"], "fail");
    assert!(
        r.json["output"].as_str().unwrap().contains("was removed"),
        "{}",
        r.text
    );
    // Another key in its place is no better.
    let private = |path: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let mut other = saved.clone();
    other[0] ^= 1;
    std::fs::write(&kek, &other).unwrap();
    private(&kek);
    let r = s.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(
        r.json["output"].as_str().unwrap().contains("was replaced"),
        "{}",
        r.text
    );
    // The original back: healthy again.
    std::fs::write(&kek, &saved).unwrap();
    private(&kek);
    let r = s.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    std::fs::remove_file(&kek).unwrap();
    let ended = s.stop_result().await;
    assert!(
        ended
            .as_ref()
            .is_err_and(|e| e.to_string().contains("was removed")),
        "{ended:?}"
    );
}

/// A client that sends its headers a little at a time is cut off once the header-read timeout
/// (10 s) has passed, instead of holding its connection (and a graceful stop) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_to_send_its_headers_is_cut_off() {
    let s = TestServer::start().await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();
    let cut = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        c.write_all(b"GET /queue HTTP/1.1\r\nHost: x\r\n")
            .expect("start");
        c.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        for _ in 0..40 {
            // One more header line every half second, never the blank line that ends them.
            if c.write_all(b"X-Slow: 1\r\n").is_err() {
                return true;
            }
            match c.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => return true, // an error answer, then the close
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    })
    .await
    .expect("client");
    assert!(cut, "the slow client was still connected after 20 s");
    let after = started.elapsed();
    assert!(
        after >= std::time::Duration::from_secs(9),
        "cut too early: {after:?}"
    );
    // Others are served meanwhile and after.
    let r = s.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    s.stop().await;
}
