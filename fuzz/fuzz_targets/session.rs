//! Session lifecycle state read back from the store: any bytes decode or are refused cleanly;
//! what decodes encodes back to the same state, and deciding its facts never panics and
//! decides each at most once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marquee::session::Session;

fuzz_target!(|data: &[u8]| {
    let Some(mut session) = Session::decode(data) else {
        return;
    };
    let mut bytes = Vec::new();
    session.encode(&mut bytes);
    assert_eq!(Session::decode(&bytes).as_ref(), Some(&session));
    let horizon = session.last_time.wrapping_sub(i64::from(data[0]) * 1_000);
    let mut facts = 0;
    session.decide(horizon, 10_000, &mut |_, _, _| facts += 1);
    session.decide(i64::MAX, 10_000, &mut |_, _, _| facts += 1);
    assert!(session.settled());
    let mut again = 0;
    session.decide(i64::MAX, 10_000, &mut |_, _, _| again += 1);
    assert_eq!(again, 0, "a decided fact is never passed on twice");
});
