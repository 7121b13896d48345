//! `rxflow`: run the pipeline on this machine with an embedded store (no cloud account).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rxflow::commands::{self, CommandError, Ended, RunOptions};

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
    /// Data directory (store, keys, audit trail); created on first use. Default: ./rxflow-data
    #[arg(long, env = "RXFLOW_DATA_DIR")]
    data_dir: Option<PathBuf>,
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
    },
    /// Write the synthetic cohort as a bulk export (NDJSON files) for `rxflow run`.
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
    /// Check every event and checkpoint; exit 0 when intact, 1 with the first break otherwise.
    Verify {
        #[command(flatten)]
        data: DataDirArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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
        } => {
            let opts = RunOptions {
                config: commands::config_for(data.data_dir)?,
                verify_as: Some(verify_as),
                json,
            };
            commands::demo(seed, orders, opts).await.map(ended)
        }
        Command::Run {
            input,
            replay,
            data,
            verify_as,
            json,
        } => {
            let opts = RunOptions {
                config: commands::config_for(data.data_dir)?,
                verify_as,
                json,
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
        Command::Audit {
            command: AuditCommand::Verify { data, json },
        } => {
            let config = commands::config_for(data.data_dir)?;
            let report = commands::audit_verify(&config).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(std::io::Error::other)?
                );
            } else if report.ok {
                println!(
                    "audit trail intact: {} events, {} checkpoints ({} events sealed)",
                    report.events, report.checkpoints, report.events_sealed
                );
            } else if let Some(b) = &report.first_break {
                println!("audit trail BROKEN: {}", b.sentence);
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
