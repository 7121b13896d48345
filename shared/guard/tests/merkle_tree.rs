//! The streaming Merkle tree against a straightforward recursive RFC 6962 implementation, at
//! sizes around powers of two and at a size with many levels.

use aws_lc_rs::digest::{digest, SHA256};
use rx_guard::merkle::{
    empty_root, leaf_hash, node_hash, path_ranges, verify_inclusion, Hash, PathBuilder, TreeBuilder,
};

fn h(i: u64) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, &i.to_be_bytes()).as_ref());
    out
}

/// RFC 6962 §2.1 MTH, recursive, over event hashes.
fn mth(events: &[Hash]) -> Hash {
    match events.len() {
        0 => empty_root(),
        1 => leaf_hash(&events[0]),
        n => {
            let k = n.next_power_of_two() / 2;
            node_hash(&mth(&events[..k]), &mth(&events[k..]))
        }
    }
}

#[test]
fn roots_match_the_recursive_definition_around_powers_of_two() {
    for size in [1u64, 2, 3, 255, 256, 257, 1023, 1024, 1025, 4097] {
        let events: Vec<Hash> = (0..size).map(h).collect();
        let mut tree = TreeBuilder::new();
        events.iter().for_each(|e| tree.push_event(e));
        assert_eq!(tree.root(), mth(&events), "size {size}");
    }
}

#[test]
fn a_deep_tree_streams_and_every_sampled_path_verifies() {
    let size = 100_003u64;
    let events: Vec<Hash> = (0..size).map(h).collect();
    let root = mth(&events);
    let mut tree = TreeBuilder::new();
    events.iter().for_each(|e| tree.push_event(e));
    assert_eq!(tree.root(), root);
    for index in [0, 1, 65_535, 65_536, 99_999, size - 1] {
        let mut path = PathBuilder::new(index, size);
        events.iter().for_each(|e| path.push_event(e));
        let (leaf, audit_path) = path.finish().unwrap();
        assert_eq!(leaf, leaf_hash(&events[index as usize]));
        assert_eq!(audit_path.len(), path_ranges(index, size).len());
        verify_inclusion(index, size, &leaf, &audit_path, &root).unwrap();
        // The same path does not prove a neighbour.
        let other = leaf_hash(&events[((index + 1) % size) as usize]);
        assert!(verify_inclusion(index, size, &other, &audit_path, &root).is_err());
    }
}
