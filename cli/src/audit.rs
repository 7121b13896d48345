//! `rxflow audit …`: the compliance officer's commands over the embedded trail.
//!
//! The trail is sealed into signed checkpoints with the data directory's Ed25519 key
//! (`keys/audit-signing.pk8`); `verify` trusts the public key given with `--public-key` (keep a
//! copy away from the data directory: whoever can rewrite the data directory can also replace the
//! key file in it), else the one in `keys/audit-signing.pub`.

use std::path::Path;

use rx_fn_audit::{AuditError, TrailReport};
use rx_guard::merkle::Checkpoint;
use rx_platform::services::{DataDir, Embedded};
use rx_store::RecordStore;

#[derive(Debug, thiserror::Error)]
pub enum AuditCmdError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Seal(#[from] rx_fn_seal::SealError),
    #[error(
        "the audit signing key {0} is missing but the trail has checkpoints signed with it; \
         restore the key file (a new key would leave the trail unverifiable)"
    )]
    SigningKeyMissing(String),
}

/// Seal the events since the last checkpoint; `None` when there were none. Refuses to make a
/// new signing key for a trail whose checkpoints were signed with one that is now missing.
pub async fn seal(emb: &Embedded) -> Result<Option<Checkpoint>, AuditCmdError> {
    let key = DataDir(&emb.data_dir).audit_signing_key();
    if !key.exists()
        && !emb
            .store
            .checkpoints()
            .await
            .map_err(AuditError::from)?
            .is_empty()
    {
        return Err(AuditCmdError::SigningKeyMissing(key.display().to_string()));
    }
    let signer = rx_fn_seal::local_signer(&emb.data_dir)?;
    Ok(rx_fn_seal::seal(emb.store.as_ref(), &signer).await?)
}

/// The public key `verify` trusts: `--public-key <file>`, else the data directory's.
pub fn trusted_key(emb: &Embedded, given: Option<&Path>) -> Result<Option<Vec<u8>>, AuditCmdError> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let p = DataDir(&emb.data_dir)
                .audit_signing_key()
                .with_extension("pub");
            if !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    Ok(Some(rx_fn_audit::read_public_key(&path)?))
}

/// Check the whole trail: every event's chain link and every signed checkpoint.
pub async fn verify(
    emb: &Embedded,
    public_key: Option<&Path>,
) -> Result<TrailReport, AuditCmdError> {
    let key = trusted_key(emb, public_key)?;
    Ok(rx_fn_audit::verify_trail(emb.store.as_ref(), key.as_deref()).await?)
}
