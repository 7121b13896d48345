//! `rxflow serve` killed (SIGKILL) while orders pour in: every order it answered `201 Created`
//! is there after a restart, and the audit trail verifies. Group commit makes change sets
//! durable together; no answer may leave before its own are.

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
    let mut child = rxflow()
        .env("RUST_LOG", "warn")
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
    let token = run(&[
        "token",
        "--role",
        "prescriber",
        "--sub",
        "dr-kill",
        "--npi",
        "1234567893",
        "--data-dir",
        data.to_str().expect("path"),
    ]);
    assert!(token.status.success(), "{}", text(&token.stderr));
    let token = text(&token.stdout).trim().to_string();
    let bundle: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(
                &std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
            )
            .join("../events/bundle-order.json"),
        )
        .expect("events/bundle-order.json"),
    )
    .expect("bundle");

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
