//! DAU state: per UTC day and group (`all`, `country`, `device_type`), the distinct accounts
//! and profiles with any accepted event, and its stored form. A checkpoint writes only what a
//! group gained (new hashes of an exact set; a sketch, which merges idempotently, whole), as a
//! RocksDB merge operand that [`merge_values`] folds into the stored value.

use rustc_hash::FxHashMap;

use crate::distinct::Distinct;
use crate::record::{DailyActive, PlaybackEvent};
use crate::session::stable_hash;

/// One UTC day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// The dimensions of the DAU groups, by slot.
pub const DIMENSIONS: [&str; 3] = ["all", "country", "device_type"];

/// 00:00 UTC of the day containing `t`.
pub fn day_of(t: i64) -> i64 {
    t.div_euclid(DAY_MS) * DAY_MS
}

/// The distinct ids of one day and group.
#[derive(Debug, Clone, PartialEq)]
pub struct Active {
    pub accounts: Distinct,
    pub profiles: Distinct,
    /// Hashes added since the last checkpoint (exact sets only).
    new_accounts: Vec<u64>,
    new_profiles: Vec<u64>,
    /// Anything was added since the last checkpoint.
    pub changed: bool,
    /// Hashes not yet sent to the merge (exact sets only), and whether anything is owed.
    unsent_accounts: Vec<u64>,
    unsent_profiles: Vec<u64>,
    unsent: bool,
}

/// Hashes per partial record of exact ids: 256 KiB, far below Kafka's default record limit.
const HASHES_PER_RECORD: usize = 32_768;

impl Active {
    /// An empty group.
    pub fn new(exact: bool) -> Self {
        Self {
            accounts: Distinct::new(exact),
            profiles: Distinct::new(exact),
            new_accounts: Vec::new(),
            new_profiles: Vec::new(),
            changed: false,
            unsent_accounts: Vec::new(),
            unsent_profiles: Vec::new(),
            unsent: false,
        }
    }

    fn add(&mut self, account: u64, profile: u64) {
        let exact = self.accounts.is_exact();
        if self.accounts.insert(account) && exact {
            self.new_accounts.push(account);
            self.unsent_accounts.push(account);
            self.changed = true;
            self.unsent = true;
        }
        if self.profiles.insert(profile) && exact {
            self.new_profiles.push(profile);
            self.unsent_profiles.push(profile);
            self.changed = true;
            self.unsent = true;
        }
        self.changed |= !exact;
        self.unsent |= !exact;
    }

    /// Owes the merge every id (after a restore: what was sent before is not known).
    pub fn mark_all_unsent(&mut self) {
        if let (Distinct::Exact(a), Distinct::Exact(p)) = (&self.accounts, &self.profiles) {
            self.unsent_accounts = a.iter().copied().collect();
            self.unsent_profiles = p.iter().copied().collect();
        }
        self.unsent = true;
    }

    /// What the merge is owed since the last call: the new exact ids in parts of at most
    /// [`HASHES_PER_RECORD`], or the whole sketch.
    pub fn take_unsent(&mut self) -> Vec<Active> {
        if !std::mem::take(&mut self.unsent) {
            return Vec::new();
        }
        if !self.accounts.is_exact() {
            let mut whole = Active::new(false);
            whole.merge(self);
            return vec![whole];
        }
        let accounts = std::mem::take(&mut self.unsent_accounts);
        let profiles = std::mem::take(&mut self.unsent_profiles);
        let mut out = Vec::new();
        let (mut a, mut p) = (accounts.as_slice(), profiles.as_slice());
        while !a.is_empty() || !p.is_empty() {
            let take_a = a.len().min(HASHES_PER_RECORD);
            let take_p = p.len().min(HASHES_PER_RECORD - take_a);
            let mut part = Active::new(true);
            a[..take_a]
                .iter()
                .for_each(|h| _ = part.accounts.insert(*h));
            p[..take_p]
                .iter()
                .for_each(|h| _ = part.profiles.insert(*h));
            out.push(part);
            (a, p) = (&a[take_a..], &p[take_p..]);
        }
        out
    }

    /// Adds every id of another partial.
    pub fn merge(&mut self, other: &Active) {
        self.accounts.merge(&other.accounts);
        self.profiles.merge(&other.profiles);
    }

    /// The merge operand of what changed since the last checkpoint, and clears the marks.
    pub fn take_delta(&mut self) -> Vec<u8> {
        self.changed = false;
        let accounts = std::mem::take(&mut self.new_accounts);
        let profiles = std::mem::take(&mut self.new_profiles);
        match (self.accounts.sketch_bytes(), self.profiles.sketch_bytes()) {
            (Some(a), Some(p)) => encode_sketches(&a, &p),
            _ => encode_exact(accounts.iter(), profiles.iter(), accounts.len()),
        }
    }

    /// The whole stored value.
    pub fn encode(&self) -> Vec<u8> {
        match (
            &self.accounts,
            &self.profiles,
            self.accounts.sketch_bytes(),
            self.profiles.sketch_bytes(),
        ) {
            (_, _, Some(a), Some(p)) => encode_sketches(&a, &p),
            (Distinct::Exact(a), Distinct::Exact(p), _, _) => {
                encode_exact(a.iter(), p.iter(), a.len())
            }
            // One side sketched: sketch both (an exact set merges into a sketch).
            _ => {
                let mut sketched = Active::new(false);
                sketched.merge(self);
                sketched.encode()
            }
        }
    }

    /// Reads a stored value or merge operand; `None` when malformed.
    pub fn decode(bytes: &[u8]) -> Option<Active> {
        let (&tag, rest) = bytes.split_first()?;
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let rest = &rest[4..];
        let mut active = Active::new(tag == EXACT);
        match tag {
            EXACT => {
                if rest.len() % 8 != 0 || rest.len() / 8 < n {
                    return None;
                }
                let hashes = rest
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
                for (i, h) in hashes.enumerate() {
                    if i < n {
                        active.accounts.insert(h);
                    } else {
                        active.profiles.insert(h);
                    }
                }
            }
            SKETCH => {
                active.accounts = Distinct::from_sketch_bytes(rest.get(..n)?)?;
                active.profiles = Distinct::from_sketch_bytes(&rest[n..])?;
            }
            _ => return None,
        }
        Some(active)
    }
}

const EXACT: u8 = 0;
const SKETCH: u8 = 1;

fn encode_exact<'a>(
    accounts: impl Iterator<Item = &'a u64>,
    profiles: impl Iterator<Item = &'a u64>,
    n: usize,
) -> Vec<u8> {
    let mut out = vec![EXACT];
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for h in accounts.chain(profiles) {
        out.extend_from_slice(&h.to_le_bytes());
    }
    out
}

fn encode_sketches(accounts: &[u8], profiles: &[u8]) -> Vec<u8> {
    let mut out = vec![SKETCH];
    out.extend_from_slice(&(accounts.len() as u32).to_le_bytes());
    out.extend_from_slice(accounts);
    out.extend_from_slice(profiles);
    out
}

/// The merge operator of the DAU store: the union of the stored value and every operand.
/// A malformed one makes the read fail rather than guess.
pub fn merge_values<'a>(
    existing: Option<&'a [u8]>,
    operands: impl Iterator<Item = &'a [u8]>,
) -> Option<Vec<u8>> {
    let mut values = existing.into_iter().chain(operands);
    let mut total = Active::decode(values.next()?)?;
    for value in values {
        total.merge(&Active::decode(value)?);
    }
    Some(total.encode())
}

/// Every group of one day in one partition (or merged over partitions), by slot then value.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DayPartial {
    pub groups: [FxHashMap<Box<str>, Active>; 3],
}

impl DayPartial {
    /// The group `(slot, value)`, created empty (exact or not) on first use.
    pub fn group_mut(&mut self, slot: usize, value: &str, exact: bool) -> &mut Active {
        let map = &mut self.groups[slot];
        if !map.contains_key(value) {
            map.insert(value.into(), Active::new(exact));
        }
        map.get_mut(value).expect("inserted above")
    }

    /// Adds the account and profile of an accepted event to its groups.
    pub fn add(&mut self, event: &PlaybackEvent, exact: bool) {
        let (account, profile) = (
            stable_hash(&event.account_id),
            stable_hash(&event.profile_id),
        );
        for (slot, value) in [(0, "all"), (1, &event.country), (2, &event.device_type)] {
            self.group_mut(slot, value, exact).add(account, profile);
        }
    }

    /// Adds another partition's partial of the same day.
    pub fn merge(&mut self, other: &DayPartial) {
        for (slot, map) in other.groups.iter().enumerate() {
            for (value, active) in map {
                let exact = active.accounts.is_exact();
                self.group_mut(slot, value, exact).merge(active);
            }
        }
    }

    /// The results of this day, ordered by slot then value.
    pub fn results(&self, day: i64, is_final: bool) -> Vec<DailyActive> {
        let mut out = Vec::new();
        for (slot, map) in self.groups.iter().enumerate() {
            let mut values: Vec<_> = map.iter().collect();
            values.sort_by(|a, b| a.0.cmp(b.0));
            for (value, a) in values {
                out.push(DailyActive {
                    day,
                    dimension: DIMENSIONS[slot].into(),
                    value: value.to_string(),
                    accounts: a.accounts.count() as i64,
                    profiles: a.profiles.count() as i64,
                    exact: a.accounts.is_exact() && a.profiles.is_exact(),
                    is_final,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Stored deltas folded by the merge operator give the in-memory state back.
        #[test]
        fn deltas_merge_to_the_whole(ids in prop::collection::vec((0u32..200, 0u32..3, 0usize..4), 1..200), exact: bool) {
            let mut active = Active::new(exact);
            let mut operands = Vec::new();
            for (i, (account, profile, cut)) in ids.iter().enumerate() {
                active.add(stable_hash(&format!("a{account}")), stable_hash(&format!("a{account}-p{profile}")));
                if *cut == 0 || i + 1 == ids.len() {
                    operands.push(active.take_delta());
                }
            }
            let merged = merge_values(None, operands.iter().map(Vec::as_slice)).unwrap();
            let restored = Active::decode(&merged).unwrap();
            prop_assert_eq!(restored.accounts.count(), active.accounts.count());
            prop_assert_eq!(restored.profiles.count(), active.profiles.count());
            prop_assert_eq!(&restored.accounts, &active.accounts);
        }
    }

    proptest! {
        /// The parts sent to the merge, in any number of rounds, union to the whole set.
        #[test]
        fn unsent_parts_union_to_the_whole(ids in prop::collection::vec((0u32..5_000, 0u32..3, 0usize..6), 1..400), exact: bool) {
            let mut active = Active::new(exact);
            let mut merged = Active::new(exact);
            for (i, (account, profile, cut)) in ids.iter().enumerate() {
                active.add(stable_hash(&format!("a{account}")), stable_hash(&format!("a{account}-p{profile}")));
                if *cut == 0 || i + 1 == ids.len() {
                    for part in active.take_unsent() {
                        merged.merge(&Active::decode(&part.encode()).unwrap());
                    }
                }
            }
            prop_assert!(active.take_unsent().is_empty(), "nothing owed twice");
            prop_assert_eq!(&merged.accounts, &active.accounts);
            prop_assert_eq!(&merged.profiles, &active.profiles);
            active.mark_all_unsent();
            let mut again = Active::new(exact);
            for part in active.take_unsent() {
                again.merge(&part);
            }
            prop_assert_eq!(&again.accounts, &active.accounts);
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        assert!(Active::decode(&[]).is_none());
        assert!(Active::decode(&[7, 0, 0, 0, 0]).is_none());
        assert!(Active::decode(&[EXACT, 2, 0, 0, 0, 1, 2, 3]).is_none());
        assert!(merge_values(Some(&[EXACT, 9, 0, 0, 0][..]), std::iter::empty()).is_none());
    }
}
