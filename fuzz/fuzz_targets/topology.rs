//! Topology text: any bytes parse to a valid topology or to errors naming what is wrong,
//! never a panic; a topology that parses validates clean.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use marquee::config::Topology;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Topology::parse(text, Path::new("fuzz.toml")) {
        Ok(topology) => assert!(topology.validate().is_empty()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
