//! Key codec of the window store. Integers are big-endian (event times with the sign bit
//! flipped) so that entries sort by partition, then window start, then group: a partition's
//! state is one contiguous range, and a closed window is one range delete.

/// Entry holding a group's counters.
pub const TAG_COUNTERS: u8 = 0;
/// Entry recording one viewer (session hash) of a group.
pub const TAG_VIEWER: u8 = 1;

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

/// Key of a group's counters.
pub fn counters_key(partition: i32, start: i64, slot: u8, value: &str) -> Vec<u8> {
    let mut key = window_prefix(partition, start);
    key.extend_from_slice(&[TAG_COUNTERS, slot]);
    key.extend_from_slice(value.as_bytes());
    key
}

/// Key of one viewer of a group.
pub fn viewer_key(partition: i32, start: i64, slot: u8, value: &str, session: u64) -> Vec<u8> {
    let mut key = window_prefix(partition, start);
    key.extend_from_slice(&[TAG_VIEWER, slot]);
    key.extend_from_slice(&session.to_be_bytes());
    key.extend_from_slice(value.as_bytes());
    key
}

/// A decoded window-store key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowKey {
    Counters {
        partition: i32,
        start: i64,
        slot: u8,
        value: String,
    },
    Viewer {
        partition: i32,
        start: i64,
        slot: u8,
        value: String,
        session: u64,
    },
}

/// Decodes a window-store key; `None` when it is malformed.
pub fn decode(key: &[u8]) -> Option<WindowKey> {
    let partition = u32::from_be_bytes(key.get(0..4)?.try_into().ok()?) as i32;
    let start = time_from(key.get(4..12)?.try_into().ok()?);
    let (tag, slot) = (*key.get(12)?, *key.get(13)?);
    match tag {
        TAG_COUNTERS => Some(WindowKey::Counters {
            partition,
            start,
            slot,
            value: String::from_utf8(key[14..].to_vec()).ok()?,
        }),
        TAG_VIEWER => Some(WindowKey::Viewer {
            partition,
            start,
            slot,
            session: u64::from_be_bytes(key.get(14..22)?.try_into().ok()?),
            value: String::from_utf8(key[22..].to_vec()).ok()?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn keys_round_trip(p in 0i32..10_000, start in any::<i64>(), slot in 0u8..5, value in "[a-z/]{0,12}", session in any::<u64>()) {
            prop_assert_eq!(decode(&counters_key(p, start, slot, &value)),
                Some(WindowKey::Counters { partition: p, start, slot, value: value.clone() }));
            prop_assert_eq!(decode(&viewer_key(p, start, slot, &value, session)),
                Some(WindowKey::Viewer { partition: p, start, slot, value, session }));
        }

        #[test]
        fn keys_sort_by_partition_then_time(a in (0i32..100, any::<i64>()), b in (0i32..100, any::<i64>())) {
            let (ka, kb) = (counters_key(a.0, a.1, 0, "x"), counters_key(b.0, b.1, 0, "x"));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }
    }
}
