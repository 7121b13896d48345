//! Configuration: one place, read from the environment; the CLI's flags override it.

use std::path::PathBuf;

use rx_domain::dur::DurConfig;
use rx_domain::validate::Rules;

/// Default data directory of the embedded runner, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "rxflow-data";
/// The tenant (pharmacy organisation) used when none is given.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone)]
pub struct Config {
    /// RXFLOW_DATA_DIR: where the embedded store, key files and audit signing key live.
    pub data_dir: PathBuf,
    /// RXFLOW_TENANT
    pub tenant: String,
    /// RXFLOW_EXPIRY_DAYS (non-controlled orders expire this long after they were written).
    pub rules: Rules,
    /// RXFLOW_DEFAULT_ACTIVE_DAYS (orders with no supply duration count as active this long).
    pub dur: DurConfig,
}

#[derive(Debug, thiserror::Error)]
#[error("environment variable {name} is '{value}', expected {expected}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl Config {
    /// Read the configuration from the environment (defaults where unset).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read the configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut rules = Rules::default();
        let mut dur = DurConfig::default();
        if let Some(v) = get("RXFLOW_EXPIRY_DAYS") {
            rules.non_controlled_expiry_days = parse_days("RXFLOW_EXPIRY_DAYS", &v)?;
        }
        if let Some(v) = get("RXFLOW_DEFAULT_ACTIVE_DAYS") {
            dur.default_active_days = parse_days("RXFLOW_DEFAULT_ACTIVE_DAYS", &v)?;
        }
        Ok(Config {
            data_dir: get("RXFLOW_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            tenant: get("RXFLOW_TENANT").unwrap_or_else(|| DEFAULT_TENANT.to_string()),
            rules,
            dur,
        })
    }
}

fn parse_days(name: &'static str, v: &str) -> Result<u32, ConfigError> {
    match v.trim().parse::<u32>() {
        Ok(d) if d > 0 => Ok(d),
        _ => Err(ConfigError {
            name,
            value: v.to_string(),
            expected: "a whole number of days above 0",
        }),
    }
}
