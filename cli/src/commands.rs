//! `rxflow demo`, `rxflow run`, `rxflow generate`: the embedded pipeline over a synthetic cohort
//! or a real FHIR bulk export.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{TimeZone, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rx_domain::fhir::{self, Resource};
use rx_domain::synth::{self, CohortConfig};
use rx_platform::config::Config;
use rx_platform::StepError;

use crate::bulk::{BadLine, BulkError, Export};
use crate::pipeline::{Lanes, OrderOutcome, Pipeline, TimeMode};
use crate::report::Report;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Setup(#[from] rx_platform::services::SetupError),
    #[error(transparent)]
    Bulk(#[from] BulkError),
    #[error("{0}")]
    Step(#[from] StepError),
    #[error("{0}")]
    Usage(String),
    /// The store or a key service failed in the middle of a bulk run.
    #[error(
        "the run stopped: {0}. The orders of its last batch (at most 2,000) were not kept; \
         once the cause (named in the log lines above) is fixed, the same command redoes them"
    )]
    Stopped(StepError),
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditCmdError),
}

/// How a command ended, for the exit code.
pub enum Ended {
    Clean,
    /// Finished, but the audit trail does not verify (exit 1).
    AuditBroken,
    /// Finished, but some input could not be used (exit 2).
    WithInputErrors,
}

/// Options shared by `demo` and `run`.
pub struct RunOptions {
    pub config: Config,
    pub verify_as: Option<String>,
    pub json: bool,
    /// Orders kept in flight at once ([`crate::pipeline::Lanes`]).
    pub in_flight: usize,
}

fn progress(len: u64, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    // indicatif draws only when stderr is a terminal.
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} orders  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Register a directory resource (prescriber, patient, allergy).
async fn register(p: &Pipeline, r: Resource) -> Result<(), StepError> {
    let svc = p.services();
    let cx = p.operator();
    let tenant = &p.tenant;
    match r {
        Resource::Practitioner(pr) => {
            rx_fn_intake::register_prescriber(svc, cx, tenant, pr).await?;
        }
        Resource::Patient(pa) => {
            rx_fn_intake::register_patient(svc, cx, tenant, pa).await?;
        }
        Resource::AllergyIntolerance {
            patient_ref,
            allergy,
        } => {
            rx_fn_intake::add_allergy(svc, cx, tenant, &patient_ref, allergy).await?;
        }
        Resource::MedicationRequest(_) | Resource::Other(_) => {}
    }
    Ok(())
}

/// Tell the operator about a line that could not be used, and keep it sealed.
async fn quarantine(p: &Pipeline, bad: &BadLine, report: &mut Report) -> Result<(), StepError> {
    eprintln!(
        "{}: {} (kept for follow-up; the run goes on)",
        bad.origin(),
        bad.error
    );
    report.input_errors += 1;
    rx_fn_intake::quarantine(
        p.services(),
        p.operator(),
        &p.tenant,
        &rx_fn_intake::QuarantinedInput {
            origin: bad.origin(),
            raw: bad.raw.clone(),
            error: bad.error.clone(),
        },
    )
    .await?;
    Ok(())
}

/// `rxflow run --input <bulk-export dir>`.
pub async fn run(input: &Path, replay: bool, opts: RunOptions) -> Result<Ended, CommandError> {
    let time = if replay {
        TimeMode::AsWritten
    } else {
        TimeMode::Now
    };
    let started = Instant::now();
    // First pass: index the export (a missing folder stops here, before a data directory is
    // made); bad lines are kept (sealed) once the scan is done.
    let mut bad_lines = Vec::new();
    let export = Export::scan(input, |b| bad_lines.push(b))?;
    let p = Pipeline::open(&opts.config, time, "run", opts.verify_as.as_deref())?;
    let mut report = Report::new(opts.json, opts.config.data_dir.display().to_string());
    report.verified_as = opts.verify_as.clone();
    report.audit_events_written = audit_len(&p).await?;
    p.tick_batch().await?;
    for b in &bad_lines {
        quarantine(&p, b, &mut report).await?;
    }
    drop(bad_lines);
    for item in export.directory() {
        let (r, mut bad) = item?;
        match register(&p, r).await {
            Ok(()) => {}
            Err(e @ (StepError::Invalid { .. } | StepError::Conflict(_))) => {
                bad.error = e.to_string();
                quarantine(&p, &bad, &mut report).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // The directory is durable before any order is judged against it.
    p.flush().await?;
    report.skipped_resources = export.skipped.iter().cloned().collect();
    if export.order_count() == 0 {
        // Not an error of any one line, but nothing to do: said, and the exit says it too.
        eprintln!(
            "rxflow run: {} holds no MedicationRequest (no MedicationRequest.ndjson, or none in \
             it): no order to process; its other resources were registered",
            input.display()
        );
        report.input_errors += 1;
    }

    if !opts.json {
        eprintln!(
            "rxflow run: {} orders from {}{} into {}",
            export.order_count(),
            input.display(),
            if replay {
                ", each submitted as written (orders already in the data directory are not)"
            } else {
                ""
            },
            opts.config.data_dir.display()
        );
    }
    suspend_audit_search(&p, export.order_count())?;
    let bar = progress(export.order_count() as u64, opts.json);
    let mut lanes = Lanes::new(&p, opts.in_flight);
    for item in export.orders() {
        match item? {
            Ok(line) => {
                let mut order = line.order;
                let at = if replay {
                    // Submitted as a new order written at its authoredOn: whatever became of it
                    // later (stopped, completed) is not known yet.
                    order.status = "active".into();
                    order.authored_on
                } else {
                    None
                };
                let ended = lanes
                    .push(order, at, line.bad)
                    .await
                    .map_err(CommandError::Stopped)?;
                for (outcome, bad) in ended {
                    ran(&p, outcome, bad, &mut report).await?;
                    bar.inc(1);
                }
            }
            Err(bad) => {
                quarantine(&p, &bad, &mut report).await?;
                bar.inc(1);
            }
        }
    }
    for (outcome, bad) in lanes.finish().await.map_err(CommandError::Stopped)? {
        ran(&p, outcome, bad, &mut report).await?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let expired = report.reasons.get("expired").copied().unwrap_or(0);
    if !replay && expired * 2 > report.orders_total {
        report.hint = Some(format!(
            "{expired} of {} orders were rejected as expired: they were written long ago. To \
             process the export's history as it was written, run it with --replay (into a new \
             --data-dir)",
            report.orders_total
        ));
    }
    finish(p, report, started, opts.json).await
}

/// One order's outcome into the report; an order intake refused is said where it was, and its
/// line kept.
async fn ran(
    p: &Pipeline,
    outcome: OrderOutcome,
    mut bad: BadLine,
    report: &mut Report,
) -> Result<(), StepError> {
    if outcome.rx_id.is_none() {
        bad.error = outcome
            .reasons
            .first()
            .map(|r| r.message.clone())
            .unwrap_or_default();
        quarantine(p, &bad, report).await?;
    }
    report.add(outcome);
    Ok(())
}

/// Audit events a bulk run writes per order, about (each step reads and writes it).
const EVENTS_PER_ORDER: u64 = 15;

/// A bulk run that at least doubles the trail appends without the audit search indexes and
/// builds them at its end ([`finish`]), inside the timed run.
fn suspend_audit_search(p: &Pipeline, orders: usize) -> Result<(), StepError> {
    let to_come = (orders as u64).saturating_mul(EVENTS_PER_ORDER);
    if p.emb.store.suspend_audit_search(to_come)? {
        tracing::info!(orders, "audit search indexes set aside for the bulk run");
    }
    Ok(())
}

async fn audit_len(p: &Pipeline) -> Result<u64, StepError> {
    use rx_store::RecordStore;
    Ok(p.emb.store.audit_len().await?)
}

/// `rxflow demo`: a deterministic synthetic cohort through every step.
pub async fn demo(seed: u64, orders: usize, opts: RunOptions) -> Result<Ended, CommandError> {
    if orders == 0 {
        return Err(CommandError::Usage("--orders must be at least 1".into()));
    }
    let p = Pipeline::open(
        &opts.config,
        TimeMode::AsWritten,
        "demo",
        opts.verify_as.as_deref(),
    )?;
    let mut report = Report::new(opts.json, opts.config.data_dir.display().to_string());
    report.verified_as = opts.verify_as.clone();
    // What the directory held before, so the report counts this run's events alone.
    report.audit_events_written = audit_len(&p).await?;
    let cfg = cohort_config(seed, orders);
    let cohort = synth::cohort(&cfg);
    if !opts.json {
        eprintln!(
            "rxflow demo: {} synthetic orders (seed {seed}) for {} patients from {} prescribers, into {}",
            orders,
            cohort.patients.len(),
            cohort.practitioners.len(),
            opts.config.data_dir.display()
        );
    }
    let started = Instant::now();
    p.set_time(cfg.start);
    p.tick_batch().await?;
    for v in cohort
        .practitioners
        .iter()
        .chain(&cohort.patients)
        .chain(&cohort.allergies)
    {
        let r = fhir::parse_resource(v).map_err(StepError::from)?;
        register(&p, r).await?;
    }
    p.flush().await?;
    suspend_audit_search(&p, orders)?;
    let bar = progress(orders as u64, opts.json);
    let mut lanes = Lanes::new(&p, opts.in_flight);
    for v in synth::orders(&cfg, &cohort) {
        let order = fhir::parse_medication_request(&v).map_err(StepError::from)?;
        // Judged when it reaches the pharmacy (for most orders, when it was written).
        let at = synth::arrival(&v).or(order.authored_on);
        for (outcome, ()) in lanes
            .push(order, at, ())
            .await
            .map_err(CommandError::Stopped)?
        {
            report.add(outcome);
            bar.inc(1);
        }
    }
    for (outcome, ()) in lanes.finish().await.map_err(CommandError::Stopped)? {
        report.add(outcome);
        bar.inc(1);
    }
    bar.finish_and_clear();
    finish(p, report, started, opts.json).await
}

/// The synthetic cohort's settings: its orders start on a fixed day so a seed always gives the
/// same cohort.
pub fn cohort_config(seed: u64, orders: usize) -> CohortConfig {
    CohortConfig {
        seed,
        orders,
        start: Utc
            .with_ymd_and_hms(2025, 1, 6, 8, 0, 0)
            .single()
            .unwrap_or_else(Utc::now),
    }
}

/// `rxflow generate --out <dir>`: write the synthetic cohort as a bulk export (NDJSON files).
pub fn generate(seed: u64, orders: usize, out: &Path) -> Result<(), CommandError> {
    if out.join("MedicationRequest.ndjson").exists() {
        return Err(CommandError::Usage(format!(
            "{} already holds an export; pass another --out (or remove it first)",
            out.display()
        )));
    }
    let cfg = cohort_config(seed, orders);
    let cohort = synth::cohort(&cfg);
    std::fs::create_dir_all(out)?;
    let write = |name: &str,
                 items: &mut dyn Iterator<Item = serde_json::Value>|
     -> Result<u64, CommandError> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(out.join(name))?);
        let mut n = 0;
        for v in items {
            serde_json::to_writer(&mut f, &v).map_err(std::io::Error::other)?;
            f.write_all(b"\n")?;
            n += 1;
        }
        f.flush()?;
        Ok(n)
    };
    write(
        "Practitioner.ndjson",
        &mut cohort.practitioners.iter().cloned(),
    )?;
    write("Patient.ndjson", &mut cohort.patients.iter().cloned())?;
    write(
        "AllergyIntolerance.ndjson",
        &mut cohort.allergies.iter().cloned(),
    )?;
    let n = write(
        "MedicationRequest.ndjson",
        &mut synth::orders(&cfg, &cohort),
    )?;
    eprintln!(
        "wrote {n} orders (seed {seed}) to {}; they are dated from {}, so run them with \
         `rxflow run --input {} --replay`",
        out.display(),
        cfg.start.format("%Y-%m-%d"),
        out.display()
    );
    Ok(())
}

async fn finish(
    p: Pipeline,
    mut report: Report,
    started: Instant,
    json: bool,
) -> Result<Ended, CommandError> {
    p.flush().await?;
    p.stop_store_thread();
    p.emb.check_keys()?;
    p.emb.store.resume_audit_search().map_err(StepError::from)?;
    report.finish(started.elapsed(), p.services().vault.sealer.stats());
    // Seal what the run wrote into a signed checkpoint, then check the whole trail.
    crate::audit::seal(&p.emb).await?;
    let check = crate::audit::verify(&p.emb, None).await?;
    report.audit_events = check.events;
    report.audit_events_written = check.events.saturating_sub(report.audit_events_written);
    report.audit_verified = check.ok;
    report.audit_problem = check.first_break.map(|b| b.sentence);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &report).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
    } else {
        out.write_all(report.human().as_bytes())?;
    }
    Ok(if !report.audit_verified {
        Ended::AuditBroken
    } else if report.input_errors > 0 {
        Ended::WithInputErrors
    } else {
        Ended::Clean
    })
}

/// The data directory from the flag, else RXFLOW_DATA_DIR, else the default.
pub fn config_for(data_dir: Option<PathBuf>) -> Result<Config, CommandError> {
    let mut c = Config::from_env().map_err(|e| CommandError::Usage(e.to_string()))?;
    if let Some(d) = data_dir {
        c.data_dir = d;
    }
    Ok(c)
}

/// Open an existing data directory (the audit commands never create one).
pub fn open_existing(config: &Config) -> Result<rx_platform::services::Embedded, CommandError> {
    if !config.data_dir.exists() {
        return Err(CommandError::Usage(format!(
            "no data directory at {}; run `rxflow demo` or `rxflow run` first, or pass --data-dir",
            config.data_dir.display()
        )));
    }
    Ok(rx_platform::services::Embedded::open(
        config,
        std::sync::Arc::new(rx_platform::SystemClock),
    )?)
}
