//! Query API parameters: any query string gives a row length within bounds or a reason of
//! bounded length, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marquee::serve::query::{check_id, parse_row_query, MAX_LIMIT};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_row_query(Some(&text)) {
        Ok(query) => assert!((1..=MAX_LIMIT).contains(&query.limit)),
        // At most 64 characters of the caller's text come back, escaped.
        Err(e) => assert!(e.to_string().chars().count() < 120),
    }
    let _ = check_id("profile_id", &text);
});
