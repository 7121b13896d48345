//! Running the real `rxflow` binary the way a user does, and checking what it leaves behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn rxflow() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rxflow"));
    // As much logging as there is: whatever the binary logs is scanned for PHI.
    c.env("RUST_LOG", "debug").env_remove("RXFLOW_DATA_DIR");
    c
}

/// Run `rxflow <args>`, keeping stdout and stderr.
pub fn run(args: &[&str]) -> Output {
    rxflow().args(args).output().expect("start rxflow")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The JSON report a `--json` run printed.
pub fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}); stderr:\n{}",
            text(&out.stderr)
        )
    })
}

/// `../shared/data/<sub>` beside the repository, or None (skip, or fail under RXFLOW_STRICT).
pub fn shared_data(sub: &str) -> Option<PathBuf> {
    let d = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("../../shared/data")
    .join(sub);
    if d.is_dir() {
        return Some(d);
    }
    if std::env::var_os("RXFLOW_STRICT").is_some() {
        panic!("RXFLOW_STRICT is set but {} is absent", d.display());
    }
    eprintln!(
        "skipped: {} is absent (the team's shared data folder)",
        d.display()
    );
    None
}

pub fn phi_scanner() -> Option<PathBuf> {
    let p = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("../../shared/tools/phi_scan.py");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("RXFLOW_STRICT").is_some() {
        panic!("RXFLOW_STRICT is set but {} is absent", p.display());
    }
    eprintln!("skipped: {} is absent", p.display());
    None
}

/// Run the team's PHI scanner over `paths` with the export's patients as the PHI list; panics
/// with its findings on any hit.
pub fn assert_no_phi(export: &Path, paths: &[&Path]) {
    let Some(scanner) = phi_scanner() else { return };
    let out = Command::new("python3")
        .arg(scanner)
        .arg("--export")
        .arg(export)
        .args(paths)
        .output()
        .expect("run phi_scan.py");
    assert!(
        out.status.success(),
        "PHI found in clear:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Write what a run printed to files in `dir`, so the scanner can read them.
pub fn keep_output(dir: &Path, name: &str, out: &Output) -> PathBuf {
    let d = dir.join(format!("{name}-output"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("stdout"), &out.stdout).unwrap();
    std::fs::write(d.join("stderr.log"), &out.stderr).unwrap();
    d
}

/// Orders per final status in a report.
pub fn by_status(report: &Value, status: &str) -> u64 {
    report["by_status"][status].as_u64().unwrap_or(0)
}

/// Copy a data directory (to tamper with the copy).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// The attacker with file access: drops the append-only triggers, then runs `sql`.
pub fn tamper(dir: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(dir.join("rxflow.db")).unwrap();
    conn.execute_batch(
        "DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete;
         DROP TRIGGER IF EXISTS checkpoints_no_update; DROP TRIGGER IF EXISTS checkpoints_no_delete;",
    )
    .unwrap();
    conn.execute_batch(sql).unwrap();
}
