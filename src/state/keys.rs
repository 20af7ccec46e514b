//! Key codec of the window store. Integers are big-endian (event times with the sign bit
//! flipped) so that entries sort by partition, then window start, then group: a partition's
//! state is one contiguous range, and a closed window is one range delete.

/// Encodes an event time so that byte order is numeric order.
pub fn time_bytes(t: i64) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

/// Decodes [`time_bytes`].
pub fn time_from(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

/// Prefix of every entry of `partition`.
pub fn partition_prefix(partition: i32) -> [u8; 4] {
    (partition as u32).to_be_bytes()
}

/// Prefix of every entry of one window of `partition`.
pub fn window_prefix(partition: i32, start: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(12);
    key.extend_from_slice(&partition_prefix(partition));
    key.extend_from_slice(&time_bytes(start));
    key
}

/// Key of one group of one window of `partition`.
pub fn group_key(partition: i32, start: i64, slot: u8, value: &str) -> Vec<u8> {
    let mut key = window_prefix(partition, start);
    key.push(slot);
    key.extend_from_slice(value.as_bytes());
    key
}

/// Key of a resume-table entry: the profile, length-prefixed, then the title, so that any
/// bytes in either (`/`, NUL) keep entries apart and one profile's titles are one prefix.
pub fn table_key(partition: i32, profile: &str, title: &str) -> Vec<u8> {
    let mut key = table_profile_prefix(partition, profile);
    key.extend_from_slice(title.as_bytes());
    key
}

/// Prefix of every table entry of `profile`.
pub fn table_profile_prefix(partition: i32, profile: &str) -> Vec<u8> {
    let mut key = partition_prefix(partition).to_vec();
    key.extend_from_slice(&(profile.len() as u32).to_be_bytes());
    key.extend_from_slice(profile.as_bytes());
    key
}

/// Key of a continue-watching index entry: the profile prefix, `updated_at` descending, then
/// the title, so one profile's unfinished titles are one prefix in the order the row shows.
pub fn recent_key(partition: i32, profile: &str, updated_at: i64, title: &str) -> Vec<u8> {
    let mut key = table_profile_prefix(partition, profile);
    key.extend(time_bytes(updated_at).map(|b| !b));
    key.extend_from_slice(title.as_bytes());
    key
}

/// The table key a [`recent_key`] under `profile_prefix` points at; `None` when malformed.
pub fn table_key_of_recent(profile_prefix: &[u8], recent: &[u8]) -> Option<Vec<u8>> {
    let title = recent.get(profile_prefix.len() + 8..)?;
    Some([profile_prefix, title].concat())
}

/// A decoded window-store key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKey {
    pub partition: i32,
    pub start: i64,
    pub slot: u8,
    pub value: String,
}

/// The partition a store key starts with; `None` when it is too short.
pub fn decode_partition(key: &[u8]) -> Option<i32> {
    Some(u32::from_be_bytes(key.get(0..4)?.try_into().ok()?) as i32)
}

/// Decodes a [`group_key`]; `None` when it is malformed.
pub fn decode(key: &[u8]) -> Option<GroupKey> {
    Some(GroupKey {
        partition: decode_partition(key)?,
        start: time_from(key.get(4..12)?.try_into().ok()?),
        slot: *key.get(12)?,
        value: String::from_utf8(key.get(13..)?.to_vec()).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn keys_round_trip(p in 0i32..10_000, start in any::<i64>(), slot in 0u8..5, value in "[a-z/]{0,12}") {
            prop_assert_eq!(decode(&group_key(p, start, slot, &value)),
                Some(GroupKey { partition: p, start, slot, value }));
        }

        #[test]
        fn table_keys_never_collide_and_profiles_are_prefixes(
            a in ("[a/\\x00]{0,4}", "[a/\\x00]{0,4}"),
            b in ("[a/\\x00]{0,4}", "[a/\\x00]{0,4}"),
        ) {
            let (ka, kb) = (table_key(1, &a.0, &a.1), table_key(1, &b.0, &b.1));
            prop_assert_eq!(ka == kb, a == b);
            prop_assert_eq!(kb.starts_with(&table_profile_prefix(1, &a.0)), a.0 == b.0);
        }

        #[test]
        fn recent_keys_sort_newest_first_then_by_title_within_a_profile(
            a in (any::<i64>(), "[a/\\x00]{0,4}"),
            b in (any::<i64>(), "[a/\\x00]{0,4}"),
        ) {
            let (ka, kb) = (recent_key(1, "p", a.0, &a.1), recent_key(1, "p", b.0, &b.1));
            prop_assert_eq!(ka.cmp(&kb), b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            let prefix = table_profile_prefix(1, "p");
            prop_assert!(ka.starts_with(&prefix));
            prop_assert_eq!(table_key_of_recent(&prefix, &ka), Some(table_key(1, "p", &a.1)));
        }

        #[test]
        fn keys_sort_by_partition_then_time(a in (0i32..100, any::<i64>()), b in (0i32..100, any::<i64>())) {
            let (ka, kb) = (group_key(a.0, a.1, 0, "x"), group_key(b.0, b.1, 0, "x"));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }
    }
}
