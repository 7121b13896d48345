//! `rxflow audit …`: the compliance officer's commands over the embedded trail.
//!
//! The trail is sealed into signed checkpoints with the data directory's Ed25519 key
//! (`keys/audit-signing.pk8`); `verify` trusts the public key given with `--public-key` (keep a
//! copy away from the data directory: whoever can rewrite the data directory can also replace the
//! key file in it), else the one in `keys/audit-signing.pub`; once the trail has checkpoints it
//! refuses to run with neither. `anchor` prints the latest checkpoint's anchor for the operator to
//! keep outside the data directory, and `verify --anchor` checks the trail still holds it.

use std::path::Path;

use rx_fn_audit::{Anchor, AuditError, TrailReport};
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
    #[error(
        "the trail has {checkpoints} signed checkpoints but no public key to check them with \
         ({path} is missing); pass --public-key <file> with the copy of the public key you keep \
         outside the data directory"
    )]
    NoPublicKey { checkpoints: usize, path: String },
    #[error("cannot use {path}: {reason}")]
    SealedMarker { path: String, reason: String },
    #[error(
        "cannot read the anchor file {path}: {reason}; give the file `rxflow audit anchor` printed"
    )]
    AnchorFile { path: String, reason: String },
    #[error(
        "no anchor was taken: the audit trail does not verify ({0}); an anchor must come from an \
         intact trail"
    )]
    NotAnchored(String),
}

/// Seal the events since the last checkpoint; `None` when there were none. Refuses to make a
/// new signing key for a trail whose checkpoints were signed with one that is now missing.
pub async fn seal(emb: &Embedded) -> Result<Option<Checkpoint>, AuditCmdError> {
    seal_from(&emb.data_dir, emb.store.as_ref(), emb.store.as_ref()).await
}

/// [`seal`] over the store of `data_dir`, reading the events through `events` (see
/// [`rx_fn_seal::seal_from`]).
pub async fn seal_from(
    data_dir: &Path,
    events: &dyn RecordStore,
    store: &dyn RecordStore,
) -> Result<Option<Checkpoint>, AuditCmdError> {
    let key = DataDir(data_dir).audit_signing_key();
    if !key.exists()
        && !store
            .checkpoints()
            .await
            .map_err(AuditError::from)?
            .is_empty()
    {
        return Err(AuditCmdError::SigningKeyMissing(key.display().to_string()));
    }
    let signer = rx_fn_seal::local_signer(data_dir)?;
    let sealed = rx_fn_seal::seal_from(events, store, &signer).await?;
    if let Some(cp) = &sealed {
        // The checkpoint is committed before the marker says it exists (a store that groups
        // change sets into commits holds it in the open group until then).
        store.durable().await.map_err(AuditError::from)?;
        record_sealed(data_dir, cp.number)?;
    }
    Ok(sealed)
}

/// `keys/audit-sealed`: the number of the latest checkpoint sealed here, kept beside the keys
/// (outside the database), so that checkpoints deleted from the database with their events are
/// caught by a plain `verify`. (Whoever can also rewrite this file is what `--anchor`, kept
/// outside the data directory, is for.)
fn sealed_marker(data_dir: &Path) -> std::path::PathBuf {
    DataDir(data_dir).keys().join("audit-sealed")
}

fn record_sealed(data_dir: &Path, number: u64) -> Result<(), AuditCmdError> {
    let path = sealed_marker(data_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{number}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| AuditCmdError::SealedMarker {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}

/// The checkpoint number `keys/audit-sealed` records, if the file is there.
fn recorded_sealed(emb: &Embedded) -> Result<Option<u64>, AuditCmdError> {
    let path = sealed_marker(&emb.data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| AuditCmdError::SealedMarker {
                path: path.display().to_string(),
                reason: "it does not hold a checkpoint number".into(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuditCmdError::SealedMarker {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
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

/// [`trusted_key`], required once the trail has checkpoints: without it their signatures, the
/// only thing a rewritten chain cannot fake, would go unchecked.
async fn required_key(
    emb: &Embedded,
    given: Option<&Path>,
) -> Result<Option<Vec<u8>>, AuditCmdError> {
    let key = trusted_key(emb, given)?;
    if key.is_none() {
        let checkpoints = emb
            .store
            .checkpoints()
            .await
            .map_err(AuditError::from)?
            .len();
        if checkpoints > 0 {
            let path = DataDir(&emb.data_dir)
                .audit_signing_key()
                .with_extension("pub");
            return Err(AuditCmdError::NoPublicKey {
                checkpoints,
                path: path.display().to_string(),
            });
        }
    }
    Ok(key)
}

/// Check the whole trail: every event's chain link and searchable columns, every signed
/// checkpoint, and that the records are accounted for.
pub async fn verify(
    emb: &Embedded,
    public_key: Option<&Path>,
) -> Result<TrailReport, AuditCmdError> {
    verify_anchored(emb, public_key, None).await
}

/// [`verify`], and with `anchor` (a file `rxflow audit anchor` printed) that the trail still holds
/// the anchored checkpoint unchanged and every event it covers.
pub async fn verify_anchored(
    emb: &Embedded,
    public_key: Option<&Path>,
    anchor: Option<&Path>,
) -> Result<TrailReport, AuditCmdError> {
    let key = required_key(emb, public_key).await?;
    // The marker is read before the trail: a server sealing meanwhile commits its checkpoint
    // before it updates the marker, so a checkpoint the marker names is already in the trail
    // this walk reads (read after, a seal in between looked like a removed checkpoint).
    let recorded = recorded_sealed(emb)?;
    let store = emb.store.as_ref();
    let mut report = match anchor {
        None => rx_fn_audit::verify_trail(store, key.as_deref()).await?,
        Some(path) => {
            let anchor = read_anchor(path)?;
            rx_fn_audit::verify_trail_anchored(store, key.as_deref(), &anchor).await?
        }
    };
    // What the trail holds is checked first (its own break is the more precise one); an intact
    // trail with fewer checkpoints than this directory sealed lost them, events and all.
    if let Some(recorded) = recorded {
        if report.ok && report.checkpoints < recorded {
            report.ok = false;
            report.first_break = Some(rx_fn_audit::Break {
                seq: None,
                checkpoint: Some(recorded),
                kind: rx_fn_audit::BreakKind::CheckpointsMissing,
                sentence: format!(
                    "this data directory sealed checkpoint {recorded} (keys/audit-sealed) but the \
                     trail holds {} checkpoint(s): checkpoints were removed, perhaps with the \
                     events they covered",
                    report.checkpoints
                ),
            });
        }
    }
    Ok(report)
}

/// Reads an anchor file.
pub fn read_anchor(path: &Path) -> Result<Anchor, AuditCmdError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuditCmdError::AnchorFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Anchor::from_json(&text)?)
}

/// Seals the pending events, verifies the whole trail (the data directory's public key) and
/// returns the anchor of its latest checkpoint; refuses when the trail does not verify.
pub async fn anchor(emb: &Embedded) -> Result<Anchor, AuditCmdError> {
    seal(emb).await?;
    let report = verify(emb, None).await?;
    if let Some(b) = report.first_break {
        return Err(AuditCmdError::NotAnchored(b.sentence));
    }
    rx_fn_audit::latest_anchor(emb.store.as_ref())
        .await?
        .ok_or(AuditCmdError::Audit(AuditError::NothingToAnchor))
}
