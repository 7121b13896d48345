//! The ports a handler works over, and their embedded wiring.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rx_domain::drugs::DrugTable;
use rx_domain::dur::DurConfig;
use rx_domain::validate::Rules;
use rx_guard::blind::BlindIndex;
use rx_guard::envelope::{CacheLimits, Sealer};
use rx_guard::keys::{load_or_create_secret, LocalKeyProvider};
use rx_guard::GuardError;
use rx_store::repo::Vault;
use rx_store::sqlite::SqliteStore;
use rx_store::StoreError;

use crate::clock::Clock;
use crate::config::Config;

/// What every handler gets: sealed and audited storage, business time, rules, reference data.
#[derive(Clone)]
pub struct Services {
    pub vault: Vault,
    pub clock: Arc<dyn Clock>,
    pub rules: Rules,
    pub dur: DurConfig,
    pub drugs: &'static DrugTable,
}

/// The embedded deployment: everything in one data directory.
pub struct Embedded {
    pub services: Services,
    pub store: Arc<SqliteStore>,
    pub data_dir: PathBuf,
    /// The key files opened, with a digest of each as it was (see [`Embedded::check_keys`]).
    key_prints: KeyFiles,
}

/// The key files a deployment opened, with a digest of each as it was then.
#[derive(Clone, Debug)]
pub struct KeyFiles(Arc<Vec<(PathBuf, [u8; 32])>>);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Part of an existing data directory is gone: refuse rather than start anew beside it.
    #[error("{0}")]
    Missing(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key material in {dir}: {source}")]
    Keys {
        dir: String,
        #[source]
        source: GuardError,
    },
    #[error("the store in {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot lock the data directory {path} for writing: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Another process writes to the data directory (see [`hold_data_dir`]).
    #[error(
        "another rxflow process (demo, run, serve, audit seal or anchor) is writing to {0}; wait \
         for it to end, or use another --data-dir"
    )]
    InUse(String),
}

/// One writing process per data directory: `demo`, `run`, `serve` and the audit commands that
/// seal hold an exclusive lock on the directory itself for as long as they run (an OS file lock
/// on its handle: it goes with the process, however it ends, and no file in the directory can be
/// deleted or swapped to get around it). Two bulk runs at once would otherwise both seal the
/// trail at their end, and the second's checkpoint would not follow the first's.
pub fn hold_data_dir(data_dir: &Path) -> Result<std::fs::File, SetupError> {
    create_private_dir(data_dir)?;
    let err = |source| SetupError::Lock {
        path: data_dir.display().to_string(),
        source,
    };
    let dir = std::fs::File::open(data_dir).map_err(err)?;
    match dir.try_lock() {
        Ok(()) => Ok(dir),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(SetupError::InUse(data_dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(err(e)),
    }
}

impl Embedded {
    /// The key files this deployment opened are still in place, and still the same. The keys
    /// live on in memory, so a process goes on sealing after its key file is deleted or
    /// replaced, and leaves records no later process can open: a bulk run checks before it
    /// reports success, a server in its health check and when it stops.
    pub fn check_keys(&self) -> Result<(), SetupError> {
        self.key_prints.check()
    }

    /// The key files this deployment opened, to check later ([`KeyFiles::check`]).
    pub fn key_files(&self) -> KeyFiles {
        self.key_prints.clone()
    }
}

impl KeyFiles {
    /// Every key file is still in place and unchanged.
    pub fn check(&self) -> Result<(), SetupError> {
        for (path, print) in self.0.iter() {
            if !path.exists() {
                return Err(SetupError::Missing(format!(
                    "the key file {} was removed while this process ran: what it sealed can \
                     only be opened with that key; restore the file from backup before anything \
                     else",
                    path.display()
                )));
            }
            let now = rx_guard::keys::key_file_print(path).map_err(|source| SetupError::Keys {
                dir: path.display().to_string(),
                source,
            })?;
            if now != *print {
                return Err(SetupError::Missing(format!(
                    "the key file {} was replaced while this process ran: what it sealed can \
                     only be opened with the key it had; restore that file from backup before \
                     anything else",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

/// Paths inside a data directory.
pub struct DataDir<'a>(pub &'a Path);

impl DataDir<'_> {
    pub fn db(&self) -> PathBuf {
        self.0.join("rxflow.db")
    }
    pub fn keys(&self) -> PathBuf {
        self.0.join("keys")
    }
    pub fn blind_index_key(&self) -> PathBuf {
        self.keys().join("blind-index.key")
    }
    pub fn audit_signing_key(&self) -> PathBuf {
        self.keys().join("audit-signing.pk8")
    }
}

impl Embedded {
    /// Open (creating on first use) the embedded deployment in `config.data_dir`.
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> Result<Self, SetupError> {
        let dir = &config.data_dir;
        let paths = DataDir(dir);
        create_private_dir(dir)?;
        create_private_dir(&paths.keys())?;
        let keys_err = |source| SetupError::Keys {
            dir: paths.keys().display().to_string(),
            source,
        };
        let kek = paths.keys().join(LocalKeyProvider::KEK_FILE);
        let db_existed = paths.db().exists();
        if !db_existed && kek.exists() {
            return Err(SetupError::Missing(format!(
                "{} holds keys but no store ({}): the store was moved or deleted. Restore it \
                 from backup, or start afresh with a new --data-dir",
                dir.display(),
                paths.db().display()
            )));
        }
        let store_err = |source| SetupError::Store {
            path: paths.db().display().to_string(),
            source,
        };
        let store = Arc::new(SqliteStore::open(&paths.db()).map_err(store_err)?);
        // A store with records and a key file gone: a new key would neither open the sealed
        // records nor find them by their blind index, and would seal everything anew beside them.
        if db_existed && store.holds_records().map_err(store_err)? {
            for key in [&kek, &paths.blind_index_key()] {
                if !key.exists() {
                    return Err(SetupError::Missing(format!(
                        "the store in {} holds records but the key file {} is missing; restore \
                         it from backup (a new key can neither open nor find the records sealed \
                         with the old one)",
                        dir.display(),
                        key.display()
                    )));
                }
            }
        }
        let provider = LocalKeyProvider::open_or_create(&paths.keys()).map_err(keys_err)?;
        let index_key = load_or_create_secret(&paths.blind_index_key()).map_err(keys_err)?;
        let index = Arc::new(BlindIndex::new(&index_key));
        // The keys this store was sealed and indexed with: a key file replaced by another one
        // would neither open nor find the records, so refuse it.
        let checks = [
            (
                "kek-id",
                rx_guard::keys::KeyProvider::key_id(&provider)
                    .as_bytes()
                    .to_vec(),
                LocalKeyProvider::KEK_FILE,
            ),
            (
                "blind-index-check",
                index.index("rxflow-key-check", "v1").to_vec(),
                "blind-index.key",
            ),
        ];
        for (name, value, file) in checks {
            if let Some(stored) = store.check_value(name, &value).map_err(store_err)? {
                if stored != value {
                    return Err(SetupError::Missing(format!(
                        "the key file {} is not the one the store in {} was written with; \
                         restore the original key file (with another key the records can be \
                         neither opened nor found)",
                        paths.keys().join(file).display(),
                        dir.display()
                    )));
                }
            }
        }
        let key_prints = [kek.clone(), paths.blind_index_key()]
            .into_iter()
            .map(|path| {
                let print = rx_guard::keys::key_file_print(&path).map_err(keys_err)?;
                Ok((path, print))
            })
            .collect::<Result<Vec<_>, SetupError>>()?;
        let key_prints = KeyFiles(Arc::new(key_prints));
        let sealer = Arc::new(Sealer::new(Arc::new(provider), CacheLimits::default()));
        let vault = Vault::new(store.clone(), sealer, index);
        Ok(Embedded {
            services: Services {
                vault,
                clock,
                rules: config.rules.clone(),
                dur: config.dur.clone(),
                drugs: DrugTable::embedded(),
            },
            store,
            data_dir: dir.clone(),
            key_prints,
        })
    }
}

fn create_private_dir(dir: &Path) -> Result<(), SetupError> {
    let err = |source| SetupError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    // Only a directory we created is narrowed to the owner: never chmod a user's folder.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}
