//! `rxflow token`: print a bearer token signed by the data directory's dev issuer, which
//! `rxflow serve` on the same data directory trusts. For development and tests only: anyone who
//! can read the data directory can mint tokens.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rx_guard::access::{DevClaims, DevIssuer, Role};
use rx_guard::GuardError;
use rx_platform::config::{DEFAULT_DATA_DIR, DEFAULT_TENANT};

#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// prescriber, pharmacist, technician, auditor, admin or service.
    #[arg(long)]
    pub role: Role,
    /// The subject (user id) the token speaks for.
    #[arg(long)]
    pub sub: String,
    /// The pharmacy organisation (tenant) of the subject.
    #[arg(long, default_value = DEFAULT_TENANT)]
    pub tenant: String,
    /// Mark the sign-in as multi-factor (needed to verify or dispense controlled orders).
    #[arg(long)]
    pub mfa: bool,
    /// The prescriber's NPI (prescribers see and submit only their own orders).
    #[arg(long)]
    pub npi: Option<String>,
    /// Lifetime of the token in minutes.
    #[arg(long = "ttl-minutes", default_value_t = 60)]
    pub ttl_minutes: u64,
    /// Data directory holding the dev signing key (created 0600 on first use).
    #[arg(long = "data-dir", env = "RXFLOW_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("--ttl-minutes must be between 1 and 1440 (a day); mint a new token when it expires")]
    Ttl,
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the dev signing key: {0}")]
    Key(#[from] GuardError),
    #[error("--npi: {0}")]
    Npi(rx_domain::ids::IdError),
}

/// Where the dev issuer keeps its key and `jwks.json` inside a data directory.
pub fn issuer_dir(data_dir: &Path) -> PathBuf {
    rx_platform::services::DataDir(data_dir).keys()
}

/// Create `dir` (and parents) readable by its owner only, if it does not exist yet.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), TokenError> {
    if dir.exists() {
        return Ok(());
    }
    let err = |source| TokenError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Mint the token `args` describe.
pub fn mint(args: &TokenArgs) -> Result<String, TokenError> {
    if !(1..=24 * 60).contains(&args.ttl_minutes) {
        return Err(TokenError::Ttl);
    }
    if let Some(npi) = &args.npi {
        // A token naming a mistyped NPI would match no order's requester.
        rx_domain::ids::npi_check(npi).map_err(TokenError::Npi)?;
    }
    create_private_dir(&args.data_dir)?;
    create_private_dir(&issuer_dir(&args.data_dir))?;
    let issuer = DevIssuer::open_or_create(&issuer_dir(&args.data_dir))?;
    let claims = DevClaims {
        subject: args.sub.clone(),
        role: args.role,
        tenant: args.tenant.clone(),
        mfa: args.mfa,
        npi: args.npi.clone(),
    };
    Ok(issuer.issue(&claims, Duration::from_secs(args.ttl_minutes * 60))?)
}

/// `rxflow token`: print the token on stdout (nothing else, so `$(rxflow token …)` works).
pub fn run(args: TokenArgs) -> Result<(), TokenError> {
    if args.role == Role::Prescriber && args.npi.is_none() {
        eprintln!(
            "note: a prescriber token without --npi can submit and see only orders whose \
             requester it is by subject; pass --npi <the prescriber's NPI> to match the orders' \
             requester"
        );
    }
    let token = mint(&args)?;
    println!("{token}");
    Ok(())
}
