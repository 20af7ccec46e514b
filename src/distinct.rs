//! Distinct counts for DAU: exact (a set of stable 64-bit hashes) or a HyperLogLog++ sketch
//! (Cloudflare's `cardinality-estimator`, precision 14: 16,384 six-bit registers, 12 KiB,
//! standard error 1.04/√16384 ≈ 0.81%). Both merge, so partials of several partitions give
//! the count of the union; an exact set merged into a sketch is inserted into it.

use cardinality_estimator::CardinalityEstimator;
use rustc_hash::FxHashSet;

/// The HyperLogLog++ sketch: 2^14 registers of 6 bits.
type Sketch = CardinalityEstimator<u64, wyhash::WyHash, 14, 6>;

/// The standard error of the sketch's estimate.
pub const SKETCH_STANDARD_ERROR: f64 = 0.0081;

/// A set of distinct ids, exact or sketched.
#[derive(Debug, Clone, PartialEq)]
pub enum Distinct {
    /// Stable hashes of the ids (exact up to 64-bit collisions).
    Exact(FxHashSet<u64>),
    /// Estimated.
    Sketch(Box<Sketch>),
}

impl Distinct {
    /// An empty set, exact or not.
    pub fn new(exact: bool) -> Self {
        if exact {
            Distinct::Exact(FxHashSet::default())
        } else {
            Distinct::Sketch(Box::new(Sketch::new()))
        }
    }

    /// Adds the id whose stable hash is `hash`; whether it was new (a sketch always says
    /// yes: it cannot tell).
    pub fn insert(&mut self, hash: u64) -> bool {
        match self {
            Distinct::Exact(set) => set.insert(hash),
            Distinct::Sketch(sketch) => {
                sketch.insert_hash(mix(hash));
                true
            }
        }
    }

    /// Adds every id of `other`; a sketch on either side makes this a sketch.
    pub fn merge(&mut self, other: &Distinct) {
        match (&mut *self, other) {
            (Distinct::Exact(a), Distinct::Exact(b)) => a.extend(b),
            (Distinct::Sketch(a), Distinct::Sketch(b)) => a.merge(b),
            (Distinct::Sketch(a), Distinct::Exact(b)) => {
                b.iter().for_each(|h| a.insert_hash(mix(*h)));
            }
            (Distinct::Exact(_), Distinct::Sketch(b)) => {
                let mut sketch = b.clone();
                if let Distinct::Exact(a) = self {
                    a.iter().for_each(|h| sketch.insert_hash(mix(*h)));
                }
                *self = Distinct::Sketch(sketch);
            }
        }
    }

    /// The (estimated) number of distinct ids.
    pub fn count(&self) -> u64 {
        match self {
            Distinct::Exact(set) => set.len() as u64,
            Distinct::Sketch(sketch) => sketch.estimate() as u64,
        }
    }

    /// Whether the count is exact.
    pub fn is_exact(&self) -> bool {
        matches!(self, Distinct::Exact(_))
    }

    /// The sketch's stored form (the crate's serde form, as JSON); `None` for an exact set,
    /// which is stored as its hashes.
    pub fn sketch_bytes(&self) -> Option<Vec<u8>> {
        match self {
            Distinct::Sketch(s) => Some(serde_json::to_vec(s).expect("a sketch serializes")),
            Distinct::Exact(_) => None,
        }
    }

    /// Reads [`Distinct::sketch_bytes`]; `None` when malformed.
    pub fn from_sketch_bytes(bytes: &[u8]) -> Option<Distinct> {
        serde_json::from_slice::<Sketch>(bytes)
            .ok()
            .map(|s| Distinct::Sketch(Box::new(s)))
    }
}

/// Spreads a stable FNV hash over all 64 bits (the splitmix64 finalizer): the sketch takes
/// register indexes from the low bits and ranks from the high ones.
fn mix(hash: u64) -> u64 {
    let mut z = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::stable_hash;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Split over partitions and merged (through the stored form), a set counts like
        /// one set of everything: exactly when exact, within 4 standard errors as a sketch.
        #[test]
        fn partials_merge_to_the_count_of_the_union(
            n in 1usize..30_000,
            parts in 1usize..4,
            overlap in 0usize..3,
        ) {
            for exact in [true, false] {
                let mut whole = Distinct::new(exact);
                let mut split: Vec<Distinct> = (0..parts).map(|_| Distinct::new(exact)).collect();
                for i in 0..n {
                    let h = stable_hash(&format!("acc-{i}"));
                    whole.insert(h);
                    // Some ids show up in several partitions.
                    for k in 0..=overlap.min(parts - 1) {
                        split[(i + k) % parts].insert(h);
                    }
                }
                let mut merged = Distinct::new(exact);
                for p in &split {
                    let stored = p.sketch_bytes().map_or_else(|| p.clone(), |b| Distinct::from_sketch_bytes(&b).unwrap());
                    merged.merge(&stored);
                }
                prop_assert_eq!(merged.count(), whole.count());
                let error = (whole.count() as f64 - n as f64).abs() / n as f64;
                if exact {
                    prop_assert_eq!(whole.count(), n as u64);
                } else {
                    prop_assert!(error <= 4.0 * SKETCH_STANDARD_ERROR, "n={} estimate={}", n, whole.count());
                }
            }
        }
    }

    #[test]
    fn an_exact_set_merged_with_a_sketch_becomes_a_sketch_of_both() {
        let mut exact = Distinct::new(true);
        let mut sketch = Distinct::new(false);
        for i in 0..1_000 {
            exact.insert(stable_hash(&format!("a{i}")));
            sketch.insert(stable_hash(&format!("b{i}")));
        }
        exact.merge(&sketch);
        assert!(!exact.is_exact());
        let n = exact.count() as f64;
        assert!(
            (n - 2_000.0).abs() <= 2_000.0 * 4.0 * SKETCH_STANDARD_ERROR,
            "{n}"
        );
    }
}
