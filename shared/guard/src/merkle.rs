//! Merkle trees, signed checkpoints and inclusion proofs over the audit trail.
//!
//! The tree is the one of RFC 6962 (Certificate Transparency) §2.1, built over the chain hashes
//! of the audit events a checkpoint covers, in seq order:
//!
//! * leaf: `SHA-256(0x00 || event chain hash)`
//! * node: `SHA-256(0x01 || left || right)`
//! * a tree of `n > 1` leaves splits at `k`, the largest power of two below `n`: the left subtree
//!   holds the first `k` leaves, the right one the rest.
//!
//! [`TreeBuilder`] computes the root streaming, holding one hash per level (O(log n) memory);
//! [`PathBuilder`] computes one leaf's audit path in the same single pass; [`verify_inclusion`]
//! checks a path (RFC 9162 §2.1.3.2). A [`Checkpoint`] signs a root with a
//! [`CheckpointSigner`] and chains to the checkpoint before it. `docs/audit-trail.md` gives the
//! byte formats for an outside verifier.

mod checkpoint;
mod signer;

pub use checkpoint::{checkpoint_hash, Checkpoint, CheckpointError, CHECKPOINT_VERSION};
pub use signer::{
    ed25519_public_key_pem, parse_public_key, CheckpointSigner, LocalSigner, ED25519,
    SIGNING_INPUT_PREFIX,
};

use aws_lc_rs::digest;

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// Domain-separation byte of a leaf hash.
pub const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation byte of an interior node hash.
pub const NODE_PREFIX: u8 = 0x01;

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The leaf hash of an audit event, from its chain hash.
pub fn leaf_hash(event_hash: &Hash) -> Hash {
    sha256(&[&[LEAF_PREFIX], event_hash])
}

/// The hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[NODE_PREFIX], left, right])
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// Computes the root of a tree from its leaves, given one at a time, in memory O(log n).
///
/// The stack holds the roots of the complete subtrees the leaves so far form, largest first, as
/// the set bits of the leaf count: pushing a leaf merges equal-sized subtrees like a binary carry.
#[derive(Debug, Clone, Default)]
pub struct TreeBuilder {
    /// (height, subtree root); heights strictly decrease from bottom to top.
    stack: Vec<(u32, Hash)>,
    size: u64,
}

impl TreeBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the leaf of the event whose chain hash is `event_hash`.
    pub fn push_event(&mut self, event_hash: &Hash) {
        self.push_leaf(leaf_hash(event_hash));
    }

    /// Adds a leaf hash.
    pub fn push_leaf(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(height, left)) = self.stack.last() {
            if height != node.0 {
                break;
            }
            self.stack.pop();
            node = (height + 1, node_hash(&left, &node.1));
        }
        self.stack.push(node);
        self.size += 1;
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RFC 6962 root of the leaves so far ([`empty_root`] when there are none).
    pub fn root(&self) -> Hash {
        let mut iter = self.stack.iter().rev();
        let Some(&(_, mut root)) = iter.next() else {
            return empty_root();
        };
        // The smaller subtrees are on the right: fold them in from the top of the stack down.
        for (_, left) in iter {
            root = node_hash(left, &root);
        }
        root
    }
}

/// The leaf ranges `[start, end)` whose subtree hashes make the audit path of leaf `index` in a
/// tree of `size` leaves, in path order (from the leaf up to the root). Empty when
/// `index >= size`.
pub fn path_ranges(index: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    if index >= size {
        return out;
    }
    // Walk down from the root, collecting the sibling of each subtree the leaf is in.
    let (mut lo, mut hi) = (0u64, size);
    while hi - lo > 1 {
        let k = split(hi - lo);
        if index < lo + k {
            out.push((lo + k, hi));
            hi = lo + k;
        } else {
            out.push((lo, lo + k));
            lo += k;
        }
    }
    out.reverse();
    out
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Computes the audit path of one leaf while the leaves stream past once, holding one
/// [`TreeBuilder`] per path element (O(log² n) hashes at most, in practice O(log n)).
#[derive(Debug, Clone)]
pub struct PathBuilder {
    index: u64,
    size: u64,
    /// Path ranges sorted by start, with the builder of each and its slot in the path.
    ranges: Vec<(u64, u64, usize, TreeBuilder)>,
    cursor: usize,
    pushed: u64,
    leaf: Option<Hash>,
}

impl PathBuilder {
    /// For leaf `index` of a tree that will have `size` leaves.
    pub fn new(index: u64, size: u64) -> Self {
        let mut ranges: Vec<_> = path_ranges(index, size)
            .into_iter()
            .enumerate()
            .map(|(slot, (s, e))| (s, e, slot, TreeBuilder::new()))
            .collect();
        ranges.sort_by_key(|r| r.0);
        PathBuilder {
            index,
            size,
            ranges,
            cursor: 0,
            pushed: 0,
            leaf: None,
        }
    }

    /// Adds the next leaf (leaves must come in order, `size` of them).
    pub fn push_leaf(&mut self, leaf: Hash) {
        let i = self.pushed;
        self.pushed += 1;
        if i == self.index {
            self.leaf = Some(leaf);
            return;
        }
        while let Some(r) = self.ranges.get(self.cursor) {
            if i >= r.1 {
                self.cursor += 1;
            } else {
                break;
            }
        }
        if let Some(r) = self.ranges.get_mut(self.cursor) {
            if r.0 <= i && i < r.1 {
                r.3.push_leaf(leaf);
            }
        }
    }

    /// Adds the leaf of the next event.
    pub fn push_event(&mut self, event_hash: &Hash) {
        self.push_leaf(leaf_hash(event_hash));
    }

    /// The leaf at `index` and its audit path, once all `size` leaves were pushed.
    pub fn finish(self) -> Option<(Hash, Vec<Hash>)> {
        if self.pushed != self.size {
            return None;
        }
        let leaf = self.leaf?;
        let mut path = vec![[0u8; 32]; self.ranges.len()];
        for (_, _, slot, tree) in &self.ranges {
            path[*slot] = tree.root();
        }
        Some((leaf, path))
    }
}

/// Why an audit path does not prove inclusion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InclusionError {
    #[error("leaf index {index} is outside a tree of {size} leaves")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error(
        "the audit path has {got} hashes, a tree of {size} leaves needs {want} for leaf {index}"
    )]
    WrongLength {
        index: u64,
        size: u64,
        got: usize,
        want: usize,
    },
    #[error("the audit path does not lead to the checkpoint's root")]
    RootMismatch,
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves whose root is `root`, with
/// the audit path `path` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    path: &[Hash],
    root: &Hash,
) -> Result<(), InclusionError> {
    if index >= size {
        return Err(InclusionError::IndexOutOfRange { index, size });
    }
    let want = path_ranges(index, size).len();
    if path.len() != want {
        return Err(InclusionError::WrongLength {
            index,
            size,
            got: path.len(),
            want,
        });
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if snode == 0 {
            return Err(InclusionError::RootMismatch);
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode == 0 && r == *root {
        Ok(())
    } else {
        Err(InclusionError::RootMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MTH straight from RFC 6962 §2.1, recursive, as the reference.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    /// PATH straight from RFC 6962 §2.1.1.
    fn path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
        let n = leaves.len();
        if n <= 1 {
            return vec![];
        }
        let k = split(n as u64) as usize;
        if m < k {
            let mut p = path(m, &leaves[..k]);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = path(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&sha256(&[&(i as u64).to_be_bytes()])))
            .collect()
    }

    #[test]
    fn streaming_root_matches_the_rfc_definition() {
        for n in 0..70 {
            let ls = leaves(n);
            let mut t = TreeBuilder::new();
            for l in &ls {
                t.push_leaf(*l);
            }
            assert_eq!(t.size(), n as u64);
            assert_eq!(t.root(), mth(&ls), "size {n}");
        }
    }

    #[test]
    fn rfc6962_known_answer_for_empty_and_one_leaf() {
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // The CT test vector: the leaf hash of the empty entry is SHA-256(0x00).
        assert_eq!(
            hex::encode(sha256(&[&[LEAF_PREFIX]])),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn streamed_paths_match_the_rfc_definition_and_verify() {
        for n in 1..40 {
            let ls = leaves(n);
            let root = mth(&ls);
            for m in 0..n {
                let mut b = PathBuilder::new(m as u64, n as u64);
                for l in &ls {
                    b.push_leaf(*l);
                }
                let (leaf, p) = b.finish().unwrap();
                assert_eq!(leaf, ls[m]);
                assert_eq!(p, path(m, &ls), "leaf {m} of {n}");
                assert_eq!(
                    verify_inclusion(m as u64, n as u64, &leaf, &p, &root),
                    Ok(())
                );
            }
        }
    }

    #[test]
    fn altered_paths_leaves_indexes_and_sizes_fail() {
        let n = 13;
        let ls = leaves(n);
        let root = mth(&ls);
        let p = path(5, &ls);
        let mut bad = p.clone();
        bad[1][0] ^= 1;
        assert_eq!(
            verify_inclusion(5, 13, &ls[5], &bad, &root),
            Err(InclusionError::RootMismatch)
        );
        assert!(verify_inclusion(5, 13, &ls[6], &p, &root).is_err());
        assert!(verify_inclusion(4, 13, &ls[5], &p, &root).is_err());
        assert!(verify_inclusion(5, 7, &ls[5], &p, &root).is_err());
        // Sizes with the same shape around the leaf (13 and 14 here) verify alike: the size is
        // bound by the signed checkpoint, not by the path.
        assert!(verify_inclusion(13, 13, &ls[5], &p, &root).is_err());
        assert!(verify_inclusion(5, 13, &ls[5], &p[..p.len() - 1], &root).is_err());
    }

    #[test]
    fn a_path_builder_fed_too_few_leaves_gives_nothing() {
        let mut b = PathBuilder::new(2, 5);
        for l in leaves(4) {
            b.push_leaf(l);
        }
        assert!(b.finish().is_none());
    }
}
