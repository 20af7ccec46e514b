//! Commands built on the library: the event generator, the demo, the benchmarks and the
//! status report.

pub mod bench;
pub mod demo;
pub mod gen;
pub mod status;
