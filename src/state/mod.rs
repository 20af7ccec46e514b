//! RocksDB state: one database per instance, one column family per store, every store's
//! entries prefixed by input partition so a partition's state is one contiguous range.
//!
//! All stores share one block cache and one write-buffer budget, so memory is capped however
//! many stores and partitions there are. Input offsets and watermarks live in the reserved
//! meta column family and are written in the same [`rocksdb::WriteBatch`] as the state they
//! produced: after a crash, state and offsets agree, so nothing is counted twice or lost.

pub mod keys;
#[cfg(feature = "runtime")]
mod store;

#[cfg(feature = "runtime")]
pub use store::*;
