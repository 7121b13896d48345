//! The per-event hash chain: `hash = SHA-256("rxflow-audit-v1" | prev_hash | body)`, starting from
//! [`GENESIS`]. Changing, deleting, inserting or reordering an event breaks the chain at that
//! event; [`verify`] names the first break.

use aws_lc_rs::digest;

use super::ChainedEvent;

/// The `prev_hash` of the first event.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// The hash of an event whose canonical bytes are `body`, following `prev`.
pub fn link(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"rxflow-audit-v1");
    ctx.update(prev);
    ctx.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Where and how the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    /// The event's body no longer hashes to its stored hash: it was edited.
    #[error("audit event {seq} was altered: its contents do not match its hash")]
    Altered { seq: u64 },
    /// The event does not follow the one before it: an event was deleted, inserted or moved.
    #[error("audit event {seq} does not follow event {prev_seq}: an event was deleted, inserted or reordered")]
    Unlinked { seq: u64, prev_seq: u64 },
    /// The sequence numbers skip or repeat.
    #[error("audit sequence jumps from {prev_seq} to {seq}: events are missing or duplicated")]
    Gap { seq: u64, prev_seq: u64 },
}

impl ChainBreak {
    pub fn seq(&self) -> u64 {
        match self {
            ChainBreak::Altered { seq }
            | ChainBreak::Unlinked { seq, .. }
            | ChainBreak::Gap { seq, .. } => *seq,
        }
    }
}

/// Checks events chunk by chunk, in order, so a long trail is verified in constant memory.
#[derive(Debug, Clone)]
pub struct Verifier {
    prev_seq: u64,
    prev_hash: [u8; 32],
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            prev_seq: 0,
            prev_hash: GENESIS,
        }
    }
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Check the next event.
    pub fn push(&mut self, ev: &ChainedEvent) -> Result<(), ChainBreak> {
        if ev.seq != self.prev_seq + 1 {
            return Err(ChainBreak::Gap {
                seq: ev.seq,
                prev_seq: self.prev_seq,
            });
        }
        if link(&ev.prev_hash, &ev.body) != ev.hash {
            return Err(ChainBreak::Altered { seq: ev.seq });
        }
        if ev.prev_hash != self.prev_hash {
            return Err(ChainBreak::Unlinked {
                seq: ev.seq,
                prev_seq: self.prev_seq,
            });
        }
        self.prev_seq = ev.seq;
        self.prev_hash = ev.hash;
        Ok(())
    }

    /// Events checked so far (the last good seq).
    pub fn len(&self) -> u64 {
        self.prev_seq
    }

    pub fn is_empty(&self) -> bool {
        self.prev_seq == 0
    }

    /// The hash of the last good event.
    pub fn head(&self) -> [u8; 32] {
        self.prev_hash
    }
}

/// Verify a whole trail given in order.
pub fn verify<'a>(events: impl IntoIterator<Item = &'a ChainedEvent>) -> Result<u64, ChainBreak> {
    let mut v = Verifier::new();
    for ev in events {
        v.push(ev)?;
    }
    Ok(v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(n: u64) -> Vec<ChainedEvent> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let body = format!("{{\"event\":{seq}}}").into_bytes();
                let hash = link(&prev, &body);
                let ev = ChainedEvent {
                    seq,
                    body,
                    prev_hash: prev,
                    hash,
                };
                prev = hash;
                ev
            })
            .collect()
    }

    #[test]
    fn intact_trail_verifies() {
        assert_eq!(verify(&trail(10)), Ok(10));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn edited_body_is_detected_at_that_event() {
        let mut t = trail(10);
        t[4].body = b"{\"event\":99}".to_vec();
        assert_eq!(verify(&t), Err(ChainBreak::Altered { seq: 5 }));
    }

    #[test]
    fn edited_and_rehashed_event_breaks_the_next_link() {
        let mut t = trail(10);
        t[4].body = b"{\"event\":99}".to_vec();
        t[4].hash = link(&t[4].prev_hash, &t[4].body);
        assert_eq!(
            verify(&t),
            Err(ChainBreak::Unlinked {
                seq: 6,
                prev_seq: 5
            })
        );
    }

    #[test]
    fn deleted_event_is_detected() {
        let mut t = trail(10);
        t.remove(3);
        assert_eq!(
            verify(&t),
            Err(ChainBreak::Gap {
                seq: 5,
                prev_seq: 3
            })
        );
        // deleted and renumbered: the link breaks
        for (i, e) in t.iter_mut().enumerate() {
            e.seq = i as u64 + 1;
        }
        assert_eq!(
            verify(&t),
            Err(ChainBreak::Unlinked {
                seq: 4,
                prev_seq: 3
            })
        );
    }

    #[test]
    fn swapped_events_are_detected() {
        let mut t = trail(10);
        t.swap(2, 3);
        let (a, b) = (t[2].seq, t[3].seq);
        t[2].seq = b;
        t[3].seq = a;
        assert!(verify(&t).is_err());
        // swapped bodies, seq left in place
        let mut t = trail(10);
        let body = t[2].body.clone();
        t[2].body = t[3].body.clone();
        t[3].body = body;
        assert_eq!(verify(&t), Err(ChainBreak::Altered { seq: 3 }));
    }
}
