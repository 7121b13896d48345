//! The signed checkpoint: one Merkle root over a contiguous range of audit events, chained to the
//! checkpoint before it (as CloudTrail digest files carry the previous digest's signature).

use aws_lc_rs::signature::{UnparsedPublicKey, ED25519 as ED25519_VERIFY};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::signer::{ED25519, SIGNING_INPUT_PREFIX};
use super::{sha256, Hash};

/// The `version` this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;

/// One signed checkpoint. Serialized as compact JSON with the fields in declaration order; the
/// stored bytes of that JSON are the `body` of the store's checkpoint row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Always [`CHECKPOINT_VERSION`].
    pub version: u32,
    /// 1-based, consecutive.
    pub number: u64,
    /// Seq of the first event covered (the previous checkpoint's `last_seq + 1`).
    pub first_seq: u64,
    /// Seq of the last event covered.
    pub last_seq: u64,
    /// Leaves in the tree: `last_seq - first_seq + 1`.
    pub tree_size: u64,
    /// RFC 6962 root over the covered events' chain hashes.
    #[serde(with = "hex32")]
    pub root: Hash,
    /// SHA-256 of the previous checkpoint's stored JSON bytes (signature included); 32 zero bytes
    /// for checkpoint 1.
    #[serde(with = "hex32")]
    pub prev_checkpoint_hash: Hash,
    /// Chain hash of the event at `last_seq`.
    #[serde(with = "hex32")]
    pub chain_head: Hash,
    pub signed_at: DateTime<Utc>,
    /// Which key signed (`local-ed25519:<fingerprint>`, a KMS key ARN).
    pub key_id: String,
    /// The signature algorithm ([`ED25519`]).
    pub algorithm: String,
    /// Over [`Checkpoint::signing_input`].
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

/// What the signature covers: every field but the signature, in the same order.
#[derive(Serialize)]
struct Unsigned<'a> {
    version: u32,
    number: u64,
    first_seq: u64,
    last_seq: u64,
    tree_size: u64,
    #[serde(with = "hex32")]
    root: &'a Hash,
    #[serde(with = "hex32")]
    prev_checkpoint_hash: &'a Hash,
    #[serde(with = "hex32")]
    chain_head: &'a Hash,
    signed_at: &'a DateTime<Utc>,
    key_id: &'a str,
    algorithm: &'a str,
}

/// Why a checkpoint cannot be read or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint is not valid checkpoint JSON: {0}")]
    Malformed(String),
    #[error("the checkpoint has version {0}, this build reads version {CHECKPOINT_VERSION}; upgrade rxflow")]
    UnknownVersion(u32),
    #[error(
        "checkpoint {number} is signed with {algorithm}, which this build cannot verify; \
         verify it with a tool that supports that algorithm"
    )]
    UnsupportedAlgorithm { number: u64, algorithm: String },
    #[error(
        "the signature of checkpoint {number} does not verify with the trusted public key: it was \
         altered, or signed by another key"
    )]
    BadSignature { number: u64 },
    #[error("the public key is not usable: {0}")]
    BadPublicKey(String),
}

impl Checkpoint {
    /// The exact bytes signed: [`SIGNING_INPUT_PREFIX`] followed by the compact JSON of every
    /// field except `signature`, in declaration order.
    pub fn signing_input(&self) -> Vec<u8> {
        let unsigned = Unsigned {
            version: self.version,
            number: self.number,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            tree_size: self.tree_size,
            root: &self.root,
            prev_checkpoint_hash: &self.prev_checkpoint_hash,
            chain_head: &self.chain_head,
            signed_at: &self.signed_at,
            key_id: &self.key_id,
            algorithm: &self.algorithm,
        };
        let mut out = SIGNING_INPUT_PREFIX.to_vec();
        // Only integers and strings: serializing cannot fail.
        let _ = serde_json::to_writer(&mut out, &unsigned);
        out
    }

    /// The canonical JSON bytes (what is stored and what the next checkpoint hashes).
    pub fn to_json(&self) -> Vec<u8> {
        // Integers and strings only (the hashes as hex): serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses stored checkpoint JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, CheckpointError> {
        let cp: Checkpoint =
            serde_json::from_slice(bytes).map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        if cp.version != CHECKPOINT_VERSION {
            return Err(CheckpointError::UnknownVersion(cp.version));
        }
        Ok(cp)
    }

    /// Checks the signature with `public_key` (raw 32-byte Ed25519 key).
    pub fn verify_signature(&self, public_key: &[u8]) -> Result<(), CheckpointError> {
        if self.algorithm != ED25519 {
            return Err(CheckpointError::UnsupportedAlgorithm {
                number: self.number,
                algorithm: self.algorithm.clone(),
            });
        }
        if public_key.len() != 32 {
            return Err(CheckpointError::BadPublicKey(format!(
                "an Ed25519 public key has 32 bytes, this one has {}",
                public_key.len()
            )));
        }
        UnparsedPublicKey::new(&ED25519_VERIFY, public_key)
            .verify(&self.signing_input(), &self.signature)
            .map_err(|_| CheckpointError::BadSignature {
                number: self.number,
            })
    }
}

/// The value the next checkpoint's `prev_checkpoint_hash` must hold: SHA-256 of the stored
/// checkpoint bytes.
pub fn checkpoint_hash(stored_body: &[u8]) -> Hash {
    sha256(&[stored_body])
}

pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v.as_ref()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <&str>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v.as_ref()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <&str>::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}
