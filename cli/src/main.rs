//! `rxflow`: run the pipeline on this machine with an embedded store (no cloud account).

/// mimalloc instead of the system allocator: a bulk run allocates on one thread what the store
/// thread frees and the reverse, where glibc's arenas spent a sixth of the run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's (v3) `mimalloc.h` option enum (the `extended`
/// bindings name the options of older releases only); `MIMALLOC_PURGE_DELAY` sets the same.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Its default in the mimalloc the lock file pins (the header's comment still says 10).
const PURGE_DELAY_DEFAULT_MS: std::ffi::c_long = 1_000;

/// Keep memory close to what is in use: return freed memory to the system at once instead of
/// a second later (a 100,000-order run peaked at 100 MB with the delay, 79 MB without, at the
/// same speed). Set only while the option holds its default, so a mimalloc whose enum moved is
/// left as it is (and the test below fails).
fn tune_allocator() {
    // SAFETY: plain calls into mimalloc's option table, made before any other thread exists
    // (the functions are not thread safe).
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == PURGE_DELAY_DEFAULT_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` that returns the write error instead of panicking (a closed pipe, `| head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err(CommandError::Output)?
    }};
}
use rxflow::commands::{self, CommandError, Ended, RunOptions};
use rxflow::pipeline::IN_FLIGHT;

#[derive(Parser)]
#[command(
    name = "rxflow",
    version,
    about = "Prescription processing pipeline (FHIR R4), embedded: SQLite store, local keys, signed audit trail"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct DataDirArg {
    /// Data directory (store, keys, audit trail): demo, run, serve and token create it on first
    /// use; the audit commands need an existing one. Default: ./rxflow-data
    #[arg(long, env = "RXFLOW_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
struct InFlightArg {
    /// Orders kept in flight at once, each patient's in the order given (1: one at a time).
    #[arg(long, default_value_t = IN_FLIGHT as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    in_flight: u16,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a deterministic synthetic cohort and run it through every step, verification and
    /// dispensing included.
    Demo {
        #[command(flatten)]
        data: DataDirArg,
        /// Seed of the synthetic cohort (the same seed gives the same cohort).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Number of orders to generate.
        #[arg(long, default_value_t = 2_000)]
        orders: usize,
        /// The pharmacist who verifies and dispenses orders without blocking alerts.
        #[arg(long, default_value = "demo-pharmacist")]
        verify_as: String,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        flight: InFlightArg,
    },
    /// Load a FHIR R4 bulk export (folder of .ndjson files) and send its orders through every
    /// step in authoredOn order.
    Run {
        /// The export folder.
        #[arg(long)]
        input: PathBuf,
        /// Submit every order as new, written at its authoredOn time (replays the whole history).
        #[arg(long)]
        replay: bool,
        #[command(flatten)]
        data: DataDirArg,
        /// Verify and dispense, as this pharmacist, the orders without blocking alerts. Without
        /// it the run stops at the pharmacist queue.
        #[arg(long)]
        verify_as: Option<String>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        flight: InFlightArg,
    },
    /// Write the synthetic cohort as a bulk export (NDJSON files) for `rxflow run --replay`
    /// (its orders are dated from 2025-01-06, so a run as of today finds them expired).
    Generate {
        /// Folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 2_000)]
        orders: usize,
    },
    /// Serve the HTTP API (intake, verification, dispensing, records, audit, break-glass) over
    /// the same data directory, FHIR JSON in and out.
    Serve(rxflow::serve::ServeArgs),
    /// Print a token signed by the data directory's local dev key, trusted by `rxflow serve` on
    /// the same data directory.
    Token(rxflow::token::TokenArgs),
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every event, every checkpoint's Merkle root, signature and chain; exit 0 when
    /// intact, 1 with the first break otherwise.
    Verify {
        #[command(flatten)]
        data: DataDirArg,
        /// A file holding the checkpoint signing public key to trust (PEM or hex). Default: the
        /// data directory's keys/audit-signing.pub; keep a copy elsewhere to detect a replaced
        /// key.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// An anchor file (from `rxflow audit anchor`, kept outside the data directory): fail
        /// unless the trail still holds that checkpoint unchanged and every event it covers.
        #[arg(long)]
        anchor: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seal the events since the last checkpoint into a new signed checkpoint.
    Seal {
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Seal, verify, and print the latest checkpoint's anchor (JSON: number, hash, last event,
    /// chain head, key id) to keep outside the data directory for `verify --anchor`.
    Anchor {
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Print the inclusion proof of one event (JSON), checkable with the public key alone.
    /// Events not yet in a checkpoint are sealed first.
    Prove {
        /// The audit event id.
        event_id: String,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Check an inclusion proof (from `rxflow audit prove`) against a public key.
    CheckProof {
        /// The proof file (JSON).
        #[arg(long)]
        proof: PathBuf,
        /// A file holding the signing public key (PEM or hex), e.g. keys/audit-signing.pub.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Search events (one JSON object a line): by patient, user, action, time range.
    Events {
        #[command(flatten)]
        data: DataDirArg,
        /// The patient's id as the orders reference it (`Patient/<id>` or `<id>`; matched through
        /// its blind index).
        #[arg(long)]
        patient: Option<String>,
        /// The acting user (JWT subject).
        #[arg(long)]
        user: Option<String>,
        /// create, read, update, decrypt, disclose, deny, break-glass, quarantine, login.
        #[arg(long)]
        action: Option<String>,
        /// From this time (RFC 3339, years 0000 to 9999).
        #[arg(long, value_parser = user_time)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Up to this time (RFC 3339, years 0000 to 9999).
        #[arg(long, value_parser = user_time)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// At most this many events (0: all).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Export every event as FHIR R4 AuditEvent NDJSON.
    Export {
        #[command(flatten)]
        data: DataDirArg,
        /// File to write (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List break-glass sessions and what each touched.
    BreakGlass {
        #[command(flatten)]
        data: DataDirArg,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    // `serve` sets up its own (JSON, info) logging.
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rxflow: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        // The reader went away (`| head`): nothing more to say.
        Err(CommandError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rxflow: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, warnings and up unless RUST_LOG says otherwise. They never carry PHI.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn ended(e: Ended) -> ExitCode {
    match e {
        Ended::Clean => ExitCode::SUCCESS,
        Ended::WithInputErrors => ExitCode::from(2),
        Ended::AuditBroken => ExitCode::FAILURE,
    }
}

async fn run(command: Command) -> Result<ExitCode, CommandError> {
    match command {
        Command::Demo {
            data,
            seed,
            orders,
            verify_as,
            json,
            flight,
        } => {
            let opts = RunOptions {
                config: commands::config_for(data.data_dir)?,
                verify_as: Some(verify_as),
                json,
                in_flight: flight.in_flight.into(),
            };
            commands::demo(seed, orders, opts).await.map(ended)
        }
        Command::Run {
            input,
            replay,
            data,
            verify_as,
            json,
            flight,
        } => {
            let opts = RunOptions {
                config: commands::config_for(data.data_dir)?,
                verify_as,
                json,
                in_flight: flight.in_flight.into(),
            };
            commands::run(&input, replay, opts).await.map(ended)
        }
        Command::Serve(args) => {
            rxflow::serve::run(args)
                .await
                .map_err(|e| CommandError::Usage(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(args) => {
            rxflow::token::run(args).map_err(|e| CommandError::Usage(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { out, seed, orders } => {
            commands::generate(seed, orders, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command } => audit(command).await,
    }
}

async fn audit(command: AuditCommand) -> Result<ExitCode, CommandError> {
    use rxflow::audit as a;
    let open = |data: DataDirArg| -> Result<_, CommandError> {
        commands::open_existing(&commands::config_for(data.data_dir)?)
    };
    // Sealing writes checkpoints: one writer at a time (see hold_data_dir).
    let open_to_seal = |data: DataDirArg| -> Result<_, CommandError> {
        let emb = commands::open_existing(&commands::config_for(data.data_dir)?)?;
        let lock = rx_platform::services::hold_data_dir(&emb.data_dir)?;
        Ok((emb, lock))
    };
    let json_line = |v: &dyn erased::Json| -> Result<(), CommandError> {
        out!("{}", v.json()?);
        Ok(())
    };
    match command {
        AuditCommand::Verify {
            data,
            public_key,
            anchor,
            json,
        } => {
            let emb = open(data)?;
            let report = a::verify_anchored(&emb, public_key.as_deref(), anchor.as_deref()).await?;
            if json {
                json_line(&report)?;
            } else if report.ok {
                out!(
                    "audit trail intact: {} events, {} checkpoint{} ({} events sealed), signatures {}{}",
                    report.events,
                    report.checkpoints,
                    if report.checkpoints == 1 { "" } else { "s" },
                    report.events_sealed,
                    if report.checkpoints == 0 {
                        "none to check"
                    } else if report.signatures_checked {
                        "verified"
                    } else {
                        "not checked (no public key)"
                    },
                    match report.anchored_checkpoint {
                        Some(n) => format!(", anchored checkpoint {n} unchanged"),
                        None => String::new(),
                    }
                );
            } else if let Some(b) = &report.first_break {
                out!("audit trail BROKEN: {}", b.sentence);
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Seal { data } => {
            let (emb, _lock) = open_to_seal(data)?;
            match a::seal(&emb).await? {
                Some(cp) => out!(
                    "checkpoint {} sealed: events {}..{} ({} events), root {}",
                    cp.number,
                    cp.first_seq,
                    cp.last_seq,
                    cp.tree_size,
                    hex_of(&cp.root)
                ),
                None => out!("nothing to seal: every event is in a checkpoint"),
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Anchor { data } => {
            let (emb, _lock) = open_to_seal(data)?;
            let anchor = a::anchor(&emb).await?;
            out!(
                "{}",
                serde_json::to_string_pretty(&anchor).map_err(std::io::Error::other)?
            );
            eprintln!(
                "keep this anchor outside the data directory; check the trail against it with \
                 `rxflow audit verify --anchor <file>`"
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Prove { event_id, data } => {
            let emb = open(data)?;
            a::seal(&emb).await?;
            let proof = rx_fn_audit::prove(emb.store.as_ref(), &event_id)
                .await
                .map_err(a::AuditCmdError::from)?;
            out!(
                "{}",
                serde_json::to_string_pretty(&proof).map_err(std::io::Error::other)?
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::CheckProof { proof, public_key } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p)
                    .map_err(|e| CommandError::Usage(format!("cannot read {}: {e}", p.display())))
            };
            let proof: rx_fn_audit::InclusionProof = serde_json::from_str(&read(&proof)?)
                .map_err(|e| CommandError::Usage(format!("the proof file is not a proof: {e}")))?;
            let key = rx_fn_audit::read_public_key(&public_key).map_err(a::AuditCmdError::from)?;
            match rx_fn_audit::verify_proof(&proof, &key) {
                Ok(()) => {
                    out!(
                        "proof valid: event {} (seq {}) is in checkpoint {}, signed by {}",
                        proof.event_id,
                        proof.seq,
                        proof.checkpoint.number,
                        proof.checkpoint.key_id
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    out!("proof INVALID: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::Events {
            data,
            patient,
            user,
            action,
            from,
            to,
            limit,
        } => {
            if let (Some(f), Some(t)) = (from, to) {
                if f > t {
                    return Err(CommandError::Usage(
                        "--from is later than --to: no event can match; swap them".into(),
                    ));
                }
            }
            for (flag, value) in [("--patient", &patient), ("--user", &user)] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    return Err(CommandError::Usage(format!(
                        "{flag} is empty: give a value, or leave the flag out to search every one"
                    )));
                }
            }
            let emb = open(data)?;
            let action = match action.as_deref() {
                None => None,
                Some(s) => Some(
                    serde_json::from_value::<rx_guard::audit::Action>(serde_json::Value::String(
                        s.to_string(),
                    ))
                    .map_err(|_| {
                        CommandError::Usage(format!(
                            "unknown action '{s}': use create, read, update, decrypt, disclose, deny, break-glass, quarantine or login"
                        ))
                    })?,
                ),
            };
            let query = rx_guard::audit::AuditQuery {
                patient: patient.map(|p| {
                    let id = rx_domain::fhir::reference_id(&p).unwrap_or(&p).to_string();
                    emb.services.vault.patient_hex(&id)
                }),
                subject: user,
                action,
                from,
                to,
                limit,
                ..Default::default()
            };
            let found = rx_fn_audit::search(emb.store.as_ref(), &query)
                .await
                .map_err(a::AuditCmdError::from)?;
            for e in &found {
                json_line(e)?;
            }
            if limit > 0 && found.len() == limit {
                eprintln!(
                    "showed the first {limit} matching events; pass --limit 0 for all of them"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export { data, out } => {
            let emb = open(data)?;
            let n = match out {
                Some(path) => {
                    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
                    rx_fn_audit::export_fhir_ndjson(emb.store.as_ref(), &mut f)
                        .await
                        .map_err(a::AuditCmdError::from)?
                }
                None => {
                    let mut f = std::io::BufWriter::new(std::io::stdout());
                    match rx_fn_audit::export_fhir_ndjson(emb.store.as_ref(), &mut f).await {
                        // The reader went away (`| head`), as with every other command.
                        Err(rx_fn_audit::AuditError::Write(e))
                            if e.kind() == std::io::ErrorKind::BrokenPipe =>
                        {
                            return Ok(ExitCode::SUCCESS)
                        }
                        done => done.map_err(a::AuditCmdError::from)?,
                    }
                }
            };
            eprintln!("exported {n} FHIR AuditEvents");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::BreakGlass { data } => {
            let emb = open(data)?;
            let sessions = rx_fn_audit::break_glass_sessions(emb.store.as_ref())
                .await
                .map_err(a::AuditCmdError::from)?;
            if sessions.is_empty() {
                eprintln!("no break-glass sessions");
            }
            for s in &sessions {
                json_line(s)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

mod erased {
    /// Anything printed as one JSON line.
    pub trait Json {
        fn json(&self) -> Result<String, std::io::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Result<String, std::io::Error> {
            serde_json::to_string(self).map_err(std::io::Error::other)
        }
    }
}

/// A time flag's value: the same times the HTTP API takes (`rx_platform::clock::parse_time`).
fn user_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    rx_platform::clock::parse_time(s)
        .ok_or_else(|| format!("the time {}", rx_platform::clock::TIME_EXPECTED))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mi_option_arena_eager_commit` (same enum): 0, set where mimalloc is built
    /// (`.cargo/config.toml`), since it is read before `main` runs.
    const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

    /// The option numbers still name the options meant: unset, each holds the value expected
    /// (the purge delay its default, the arena commit the build's define), and its environment
    /// variable (read when the option is first consulted) is what it reports.
    #[test]
    fn the_allocator_options_are_the_ones_meant() {
        for (option, expected, var) in [
            (
                MI_OPTION_PURGE_DELAY,
                PURGE_DELAY_DEFAULT_MS,
                "MIMALLOC_PURGE_DELAY",
            ),
            (
                MI_OPTION_ARENA_EAGER_COMMIT,
                0,
                "MIMALLOC_ARENA_EAGER_COMMIT",
            ),
        ] {
            // SAFETY: a read of mimalloc's option table.
            let got = unsafe { libmimalloc_sys::mi_option_get(option) };
            match std::env::var(var) {
                Ok(v) => assert_eq!(got.to_string(), v, "{var}"),
                Err(_) => assert_eq!(got, expected, "{var}"),
            }
        }
    }
}
