//! The resume-position table, end to end: repartition by profile
//! ([`crate::operators::repartition`]), apply events to the table in RocksDB and publish
//! rate-limited updates and tombstones to a compacted topic ([`crate::operators::table`]);
//! here: what the HTTP side reads.
//!
//! ```text
//! input (by session) ─► repartition ─► <name>-resume-by-profile ─► table ─► resume-positions
//!                        (decode,        (key profile_id, partition    (RocksDB)   (compacted, same
//!                         dead letters)   = hash(profile) mod N)                    partitioning)
//! ```
//!
//! The table's partitions are the repartition topic's, and the output topic uses the same
//! partitioning, so a query for a profile is answered by whoever owns `hash(profile) mod N`.
//! The table task's state moves with its partitions through its changelog topics
//! (`<group>-resume-resume_table-changelog` and its positions): an instance that gains a
//! table partition without current local state restores that partition before serving it.
//!
//! Applying an event is idempotent and order-independent (see [`crate::table`]), so both hops
//! are at-least-once without duplicates in effect (exactly-once with transactions).

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::state::Store;
use crate::tools::gen::partition_for;

/// The resume schema.
pub const RESUME_POSITION_SCHEMA: &str = include_str!("../avro/resume_position.avsc");
/// Header carrying the event id that orders ties, so readers of the topic break them the
/// same way.
pub const EVENT_ID_HEADER: &str = "marquee.event_id";

/// What the HTTP side may read: the store and which table partitions this instance owns.
pub struct TableView {
    pub store: Arc<Store>,
    /// Number of table partitions (of the repartition and output topics).
    pub partitions: i32,
    owned: RwLock<BTreeSet<i32>>,
    /// Caps the queries answered at once (see `crate::serve::http`).
    pub queries: tokio::sync::Semaphore,
}

impl TableView {
    /// A view of `store` for a table of `partitions` partitions, none owned yet.
    pub fn new(store: Arc<Store>, partitions: i32) -> Self {
        Self {
            store,
            partitions,
            owned: RwLock::new(BTreeSet::new()),
            queries: tokio::sync::Semaphore::new(crate::serve::http::MAX_CONCURRENT_QUERIES),
        }
    }

    /// The table partition of `profile`.
    pub fn partition_of(&self, profile: &str) -> i32 {
        partition_for(profile, self.partitions)
    }

    /// Whether this instance owns (and has restored) `partition`.
    pub fn owns(&self, partition: i32) -> bool {
        self.owned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&partition)
    }

    /// Marks `partition` owned without a consumer group (the query benchmark).
    pub fn set_owned_for_bench(&self, partition: i32) {
        self.set_owned(partition, true);
    }

    /// Marks `partition` owned (its state restored) or not.
    pub(crate) fn set_owned(&self, partition: i32, owned: bool) {
        let mut set = self.owned.write().unwrap_or_else(|e| e.into_inner());
        if owned {
            set.insert(partition);
        } else {
            set.remove(&partition);
        }
    }
}
