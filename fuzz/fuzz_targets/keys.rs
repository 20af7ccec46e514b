//! The key codecs: any two identifiers round-trip through output keys, and the store keys of
//! different entries never collide; any bytes given as a key decode or are refused cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marquee::record::{key_part, resume_key, split_key, split_resume_key};
use marquee::state::keys;

fuzz_target!(|data: &[u8]| {
    // Arbitrary keys read back from a topic or a store.
    let _ = split_key(&String::from_utf8_lossy(data));
    let _ = keys::decode(data);

    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let a = String::from_utf8_lossy(&data[..split]).into_owned();
    let b = String::from_utf8_lossy(data.get(split + 1..).unwrap_or_default()).into_owned();
    let t = i64::from_le_bytes(
        data.get(..8)
            .and_then(|s| s.try_into().ok())
            .unwrap_or_default(),
    );

    assert_eq!(
        split_resume_key(&resume_key(&a, &b)),
        Some((a.clone(), b.clone()))
    );
    let group = format!("cdn/{}/{t}", key_part(&a));
    assert_eq!(
        split_key(&group),
        Some(vec!["cdn".into(), a.clone(), t.to_string()])
    );

    let table = keys::table_key(3, &a, &b);
    assert!(table.starts_with(&keys::table_profile_prefix(3, &a)));
    // Another split of the same bytes is another entry, with another key.
    if !a.is_empty() {
        let (a2, b2) = (
            &a[..a.len() - a.chars().last().map_or(1, char::len_utf8)],
            format!("{}{b}", a.chars().last().unwrap_or_default()),
        );
        assert_ne!(keys::table_key(3, a2, &b2), table);
    }
    let recent = keys::recent_key(3, &a, t, &b);
    assert_eq!(
        keys::table_key_of_recent(&keys::table_profile_prefix(3, &a), &recent),
        Some(table)
    );
    let group_key = keys::group_key(3, t, 1, &a);
    assert_eq!(
        keys::decode(&group_key),
        Some(keys::GroupKey {
            partition: 3,
            start: t,
            slot: 1,
            value: a
        })
    );
});
