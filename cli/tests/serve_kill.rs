//! `rxflow serve` as a process. Killed (SIGKILL) while orders pour in: every order it answered
//! `201 Created` is there after a restart, and the audit trail verifies (group commit makes
//! change sets durable together; no answer may leave before its own are). Left running: it seals
//! the trail into signed checkpoints on its schedule, and once more when it is stopped.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn serve(data: &std::path::Path, port: u16) -> Child {
    serve_with(data, port, &[])
}

fn serve_with(data: &std::path::Path, port: u16, envs: &[(&str, &str)]) -> Child {
    let mut child = rxflow()
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied())
        .args([
            "serve",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve");
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if let Ok((status, _)) = http(port, "GET", "/healthz", None, None) {
            if status == 200 {
                return child;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not start");
}

/// The README's example Bundle (a Practitioner, a Patient and a MedicationRequest).
fn example_bundle() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(
                &std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
            )
            .join("../events/bundle-order.json"),
        )
        .expect("events/bundle-order.json"),
    )
    .expect("bundle")
}

fn prescriber_token(data: &std::path::Path, sub: &str) -> String {
    let token = run(&[
        "token",
        "--role",
        "prescriber",
        "--sub",
        sub,
        "--npi",
        "1234567893",
        "--data-dir",
        data.to_str().expect("path"),
    ]);
    assert!(token.status.success(), "{}", text(&token.stderr));
    text(&token.stdout).trim().to_string()
}

/// `rxflow audit verify --json` over `data`: the report, and whether it passed.
fn verify_report(data: &std::path::Path) -> (Value, bool) {
    let out = run(&[
        "audit",
        "verify",
        "--json",
        "--data-dir",
        data.to_str().expect("path"),
    ]);
    (report(&out), out.status.success())
}

/// One HTTP/1.1 request over a fresh connection: the status and the Location header.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> std::io::Result<(u16, Option<String>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/fhir+json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let location = answer
        .lines()
        .find_map(|l| l.strip_prefix("location: ").map(str::to_string));
    Ok((status, location))
}

#[test]
fn every_order_answered_201_survives_a_kill_and_the_trail_verifies() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let token = prescriber_token(&data, "dr-kill");
    let bundle = example_bundle();

    let port = free_port();
    let mut server = serve(&data, port);
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (accepted, stop, token, bundle) = (
                accepted.clone(),
                stop.clone(),
                token.clone(),
                bundle.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let mut b = bundle.clone();
                    for e in b["entry"].as_array_mut().expect("entries") {
                        if e["resource"]["resourceType"] == "MedicationRequest" {
                            e["resource"]["id"] = Value::from(format!("kill-{w}-{i}"));
                        }
                    }
                    let body = serde_json::to_vec(&b).expect("body");
                    if let Ok((201, Some(loc))) =
                        http(port, "POST", "/prescriptions", Some(&token), Some(&body))
                    {
                        accepted.lock().expect("lock").push(loc);
                    }
                }
            })
        })
        .collect();
    // Kill once a good number of orders were answered (or after 20 s at most).
    let until = Instant::now() + Duration::from_secs(20);
    while accepted.lock().expect("lock").len() < 150 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill().expect("SIGKILL");
    server.wait().expect("reaped");
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().expect("worker");
    }
    let accepted = accepted.lock().expect("lock").clone();
    assert!(
        accepted.len() >= 50,
        "only {} orders answered",
        accepted.len()
    );

    let mut server = serve(&data, port);
    let mut missing = Vec::new();
    for loc in &accepted {
        match http(port, "GET", loc, Some(&token), None) {
            Ok((200, _)) => {}
            other => missing.push((loc.clone(), format!("{other:?}"))),
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        missing.is_empty(),
        "{} of {} orders answered 201 were gone after the kill: {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(5)]
    );
    let verify = run(&[
        "audit",
        "verify",
        "--data-dir",
        data.to_str().expect("path"),
    ]);
    assert!(verify.status.success(), "{}", text(&verify.stdout));
}

#[test]
fn a_running_server_seals_the_trail_on_its_schedule_and_when_it_stops() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let token = prescriber_token(&data, "dr-seal");
    let port = free_port();
    let mut server = serve_with(&data, port, &[("RXFLOW_SEAL_EVERY_SECS", "1")]);
    let submit = |id: &str| {
        let mut b = example_bundle();
        for e in b["entry"].as_array_mut().expect("entries") {
            if e["resource"]["resourceType"] == "MedicationRequest" {
                e["resource"]["id"] = Value::from(id);
            }
        }
        let body = serde_json::to_vec(&b).expect("body");
        let (status, _) =
            http(port, "POST", "/prescriptions", Some(&token), Some(&body)).expect("POST");
        assert_eq!(status, 201);
    };
    submit("seal-1");

    // While it runs, a checkpoint comes within a period or two, and it covers the order's events.
    let until = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let (r, ok) = verify_report(&data);
        assert!(ok, "{r}");
        if r["checkpoints"].as_u64().unwrap_or(0) >= 1 && r["events_sealed"].as_u64() >= Some(3) {
            break r;
        }
        assert!(Instant::now() < until, "no scheduled checkpoint: {r}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(first["signatures_checked"], true, "{first}");

    // Events written after it are sealed by a later one, at the latest when the server stops.
    submit("seal-2");
    let pid = server.id().to_string();
    // SIGTERM through the shell's own `kill` (std sends only SIGKILL; no procps needed).
    let term = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .expect("sh -c kill -TERM");
    assert!(term.success());
    let status = server.wait().expect("reaped");
    assert!(status.success(), "serve exited with {status}");
    let (last, ok) = verify_report(&data);
    assert!(ok, "{last}");
    assert_eq!(
        last["events_sealed"], last["events"],
        "every event is under a signed checkpoint after a clean stop: {last}"
    );
    assert!(
        last["checkpoints"].as_u64() > first["checkpoints"].as_u64(),
        "{last}"
    );
}

/// A token signed by `data`'s dev issuer (`rxflow token <args>`).
fn token_for(data: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    all.extend(["--data-dir", data.to_str().expect("path")]);
    let out = run(&all);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// Orders of `tenant` accepted but not yet through validate and review, read from the store
/// file (statuses are workflow columns, in clear).
fn pending_in(data: &std::path::Path, tenant: &str) -> i64 {
    let db = rusqlite::Connection::open(data.join("rxflow.db")).expect("open the store");
    db.query_row(
        "SELECT COUNT(*) FROM prescriptions WHERE tenant = ?1 AND status IN ('received', 'validated')",
        [tenant],
        |r| r.get(0),
    )
    .expect("count pending orders")
}

/// One GET over a fresh connection: the status and the body as JSON.
fn get_json(port: u16, path: &str, token: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("request");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The server takes orders for any tenant a token it trusts names, not only its own deployment
/// tenant (`default`). Killed (SIGKILL) while such orders are still on their way through validate
/// and review, it resumes them at its next start: each reaches that pharmacy's queue.
#[test]
fn orders_of_another_tenant_left_pending_by_a_kill_reach_the_queue_after_a_restart() {
    const ELSEWHERE: &str = "pharmacy-elsewhere";
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let token = token_for(
        &data,
        &[
            "--role",
            "prescriber",
            "--sub",
            "dr-elsewhere",
            "--npi",
            "1234567893",
            "--tenant",
            ELSEWHERE,
        ],
    );
    let pharmacist = token_for(
        &data,
        &[
            "--role",
            "pharmacist",
            "--sub",
            "rph-elsewhere",
            "--mfa",
            "--tenant",
            ELSEWHERE,
        ],
    );
    let port = free_port();
    let mut accepted: Vec<String> = Vec::new();
    let mut pending = 0;
    // A kill lands while some orders are still pending nearly always; a round that found the
    // pipeline done with all of them is run again (at most five).
    for round in 0..5 {
        let mut server = serve(&data, port);
        let answered = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (answered, stop, token) = (answered.clone(), stop.clone(), token.clone());
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let mut b = example_bundle();
                        for e in b["entry"].as_array_mut().expect("entries") {
                            if e["resource"]["resourceType"] == "MedicationRequest" {
                                e["resource"]["id"] =
                                    Value::from(format!("elsewhere-{round}-{w}-{i}"));
                            }
                        }
                        let body = serde_json::to_vec(&b).expect("body");
                        if let Ok((201, Some(loc))) =
                            http(port, "POST", "/prescriptions", Some(&token), Some(&body))
                        {
                            answered.lock().expect("lock").push(loc);
                        }
                    }
                })
            })
            .collect();
        let until = Instant::now() + Duration::from_secs(20);
        while answered.lock().expect("lock").len() < 30 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        server.kill().expect("SIGKILL");
        server.wait().expect("reaped");
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().expect("worker");
        }
        accepted.extend(
            answered
                .lock()
                .expect("lock")
                .iter()
                .map(|l| l.trim_start_matches("/prescriptions/").to_string()),
        );
        pending = pending_in(&data, ELSEWHERE);
        if pending > 0 {
            break;
        }
    }
    assert!(
        pending > 0,
        "every kill came after the pipeline had finished; nothing was left to resume"
    );
    assert!(!accepted.is_empty());

    let mut server = serve(&data, port);
    let until = Instant::now() + Duration::from_secs(30);
    while pending_in(&data, ELSEWHERE) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = pending_in(&data, ELSEWHERE);
    let mut queued = std::collections::BTreeSet::new();
    let mut path = "/queue?limit=0".to_string();
    loop {
        let (status, page) = get_json(port, &path, &pharmacist);
        assert_eq!(status, 200, "{page}");
        queued.extend(
            page["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .filter_map(|e| e["rxId"].as_str().map(str::to_string)),
        );
        match page["next"].as_str() {
            Some(next) => path = format!("/queue?limit=0&after={next}"),
            None => break,
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        left, 0,
        "{left} of the tenant's orders were not resumed after the restart"
    );
    let missing: Vec<_> = accepted.iter().filter(|id| !queued.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} accepted orders are not in the pharmacy's queue: {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(5)]
    );
}
