//! Commands built on the library: the event generator, the demo and the benchmarks.

pub mod bench;
pub mod demo;
pub mod gen;
