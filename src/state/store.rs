//! The RocksDB database and its stores (see the [module docs](super)).

use super::keys;

use std::collections::BTreeMap;
use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    Options, WriteBatch, WriteBufferManager, DB,
};

use crate::daily::{self, Active, DayPartial};
use crate::error::StateError;
use crate::session::Session;
use crate::table::Entry;
use crate::window::{GroupAgg, GroupDelta, PartitionWindows, Qoe, Startup};

/// Column family of the QoS window store.
pub const CF_WINDOWS: &str = "qos_windows";
/// Column family of the resume-position table.
pub const CF_RESUME: &str = "resume_table";
/// Column family of the continue-watching index: the table's unfinished entries by profile,
/// newest first (see [`keys::recent_key`]); values are empty.
pub const CF_RESUME_RECENT: &str = "resume_recent";
/// Column family of the windows' QoE aggregates, keyed like [`CF_WINDOWS`].
pub const CF_QOE: &str = "qos_qoe";
/// Column family of the session lifecycle: partition, then `session_id`.
pub const CF_SESSIONS: &str = "qos_sessions";
/// Column family of the DAU days, keyed like [`CF_WINDOWS`] (the day start as the window).
pub const CF_DAILY: &str = "daily_active";
/// Reserved column family of offsets, watermarks and the emitted-window frontier.
pub const CF_META: &str = "__marquee_meta";
/// Reserved column family of exactly-once outputs between the state commit and their
/// transaction: `<task>`, NUL, checkpoint number, index.
pub const CF_OUTBOX: &str = "__marquee_outbox";

/// Every column family, opened together.
const COLUMN_FAMILIES: [&str; 8] = [
    CF_WINDOWS,
    CF_QOE,
    CF_SESSIONS,
    CF_DAILY,
    CF_OUTBOX,
    CF_RESUME,
    CF_RESUME_RECENT,
    CF_META,
];

/// Meta key of the QoS windows' emitted frontier.
pub const QOS_FRONTIER: &str = "closed_through";
/// Meta key of the DAU days' emitted frontier.
pub const DAU_FRONTIER: &str = "dau/closed_through";

/// A resume-table entry as stored: the entry and whether its output record is still owed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredEntry {
    pub entry: Entry,
    /// Updated but not yet written to the output topic (rate limit); re-queued after a restart.
    pub pending: bool,
}

/// What a checkpoint recorded about one input partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMeta {
    /// The next offset to process: everything before it is in the state.
    pub next_offset: i64,
    /// Largest trusted event time processed (the partition watermark's source).
    pub max_event_time: Option<i64>,
}

/// Name of the changelogged store of input positions: each partition's next offset and
/// watermark source, kept in [`CF_META`].
pub const POSITIONS: &str = "positions";

/// The stores whose changes go to changelog topics, in the order their records are written.
pub const CHANGELOGGED: [&str; 6] = [
    CF_WINDOWS,
    CF_QOE,
    CF_SESSIONS,
    CF_DAILY,
    POSITIONS,
    CF_RESUME,
];

/// A key of a changelogged store touched by a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Change {
    /// The store: one of [`CHANGELOGGED`].
    pub store: &'static str,
    pub partition: i32,
    pub key: Vec<u8>,
}

/// One checkpoint's writes, and the keys of changelogged stores they touch: after the
/// commit, the changelog gets each touched key's new value (or a tombstone).
#[derive(Default)]
pub struct Batch {
    inner: WriteBatch,
    changes: Vec<Change>,
}

impl Batch {
    /// Records that `key` of `store` (partition `partition`) changes.
    fn touch(&mut self, store: &'static str, partition: i32, key: &[u8]) {
        self.changes.push(Change {
            store,
            partition,
            key: key.to_vec(),
        });
    }

    /// The changelogged keys this batch touches, each once.
    pub fn take_changes(&mut self) -> Vec<Change> {
        let mut changes = std::mem::take(&mut self.changes);
        changes.sort_unstable_by(|a, b| {
            (a.store, a.partition, &a.key).cmp(&(b.store, b.partition, &b.key))
        });
        changes.dedup();
        changes
    }
}

impl std::ops::Deref for Batch {
    type Target = WriteBatch;
    fn deref(&self) -> &WriteBatch {
        &self.inner
    }
}

impl std::ops::DerefMut for Batch {
    fn deref_mut(&mut self) -> &mut WriteBatch {
        &mut self.inner
    }
}

/// The instance's RocksDB database.
pub struct Store {
    db: DB,
}

impl Store {
    /// Opens (or creates) the database in `dir` with a shared cache and write-buffer budget.
    pub fn open(
        dir: &Path,
        block_cache_mib: usize,
        write_buffer_mib: usize,
    ) -> Result<Self, StateError> {
        let cache = Cache::new_lru_cache(block_cache_mib << 20);
        let buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            write_buffer_mib << 20,
            false,
            cache.clone(),
        );
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&table);
        cf_opts.set_compression_type(DBCompressionType::Lz4);
        let mut db_opts = cf_opts.clone();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_write_buffer_manager(&buffers);
        let cfs = COLUMN_FAMILIES.map(|name| {
            let mut options = cf_opts.clone();
            if name == CF_WINDOWS {
                options.set_merge_operator_associative("marquee_window_group_v1", merge_groups);
            }
            if name == CF_QOE {
                options.set_merge_operator_associative("marquee_qoe_group_v1", merge_qoe);
            }
            if name == CF_DAILY {
                options.set_merge_operator_associative("marquee_daily_group_v1", |_, e, ops| {
                    daily::merge_values(e, ops.iter())
                });
            }
            ColumnFamilyDescriptor::new(name, options)
        });
        let db =
            DB::open_cf_descriptors(&db_opts, dir, cfs).map_err(|source| StateError::Open {
                dir: dir.to_path_buf(),
                source,
            })?;
        Ok(Self { db })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// The checkpoint of `partition` of `stage`'s input, if one was ever written.
    pub fn partition_meta(
        &self,
        stage: &str,
        partition: i32,
    ) -> Result<Option<PartitionMeta>, StateError> {
        let key = meta_key(stage, partition);
        let Some(bytes) = self.db.get_cf(self.cf(CF_META), key)? else {
            return Ok(None);
        };
        let corrupt = || StateError::Corrupt {
            key: format!("{CF_META}/partition {partition}"),
            message: format!("expected 17 bytes, found {}", bytes.len()),
        };
        let arr: [u8; 17] = bytes.as_slice().try_into().map_err(|_| corrupt())?;
        let next_offset = i64::from_le_bytes(arr[0..8].try_into().expect("8 bytes"));
        let max = i64::from_le_bytes(arr[9..17].try_into().expect("8 bytes"));
        Ok(Some(PartitionMeta {
            next_offset,
            max_event_time: (arr[8] == 1).then_some(max),
        }))
    }

    /// The operator watermark up to which an operator's windows (its `frontier` meta key)
    /// were emitted, if any were.
    pub fn closed_through(&self, frontier: &str) -> Result<Option<i64>, StateError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META), frontier)?
            .and_then(|b| b.try_into().ok())
            .map(i64::from_le_bytes))
    }

    /// Calls `visit` with the key and value of every entry under `prefix` in `cf`, in key
    /// order.
    fn scan(
        &self,
        cf: &str,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let mode = IteratorMode::From(prefix, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(cf), mode) {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            visit(&key, &value)?;
        }
        Ok(())
    }

    /// Every group entry (window or day, slot, value) of `partition` in `cf`, its value read
    /// by `decode` and handed to `put`, which says whether it fits; `expected` says what an
    /// entry must be when it cannot be read or does not fit.
    fn scan_groups<T>(
        &self,
        cf: &'static str,
        partition: i32,
        expected: &str,
        decode: impl Fn(&[u8]) -> Option<T>,
        mut put: impl FnMut(keys::GroupKey, T) -> bool,
    ) -> Result<(), StateError> {
        self.scan(cf, &keys::partition_prefix(partition), |key, value| {
            let corrupt = |message: &str| StateError::Corrupt {
                key: format!("{cf}/{key:?}"),
                message: message.to_string(),
            };
            let group = keys::decode(key).ok_or_else(|| corrupt("undecodable key"))?;
            let value = decode(value).ok_or_else(|| corrupt(expected))?;
            if put(group, value) {
                Ok(())
            } else {
                Err(corrupt(expected))
            }
        })
    }

    /// Rebuilds the open windows of `partition` (counters, viewers, QoE) from the store.
    pub fn load_windows(&self, partition: i32) -> Result<PartitionWindows, StateError> {
        let mut windows = PartitionWindows::default();
        self.scan_groups(
            CF_WINDOWS,
            partition,
            "expected 24 bytes of counters and 8 bytes per viewer",
            decode_group,
            |g, agg| {
                *group_of(&mut windows, g.start, g.slot, &g.value) = agg;
                true
            },
        )?;
        self.scan_groups(
            CF_QOE,
            partition,
            "expected 48 bytes of counters and a DDSketch in its Java encoding",
            decode_qoe,
            |g, qoe| {
                group_of(&mut windows, g.start, g.slot, &g.value).qoe = qoe;
                true
            },
        )?;
        Ok(windows)
    }

    /// The sessions of `partition`.
    pub fn load_sessions(&self, partition: i32) -> Result<Vec<(String, Session)>, StateError> {
        let prefix = keys::partition_prefix(partition);
        let mut sessions = Vec::new();
        self.scan(CF_SESSIONS, &prefix, |key, value| {
            let corrupt = |message: &str| StateError::Corrupt {
                key: format!("{CF_SESSIONS}/{}", String::from_utf8_lossy(key)),
                message: message.to_string(),
            };
            let id = std::str::from_utf8(&key[prefix.len()..])
                .map_err(|_| corrupt("the session id is not UTF-8"))?;
            let session = Session::decode(value)
                .ok_or_else(|| corrupt("undecodable session state (version 1 expected)"))?;
            sessions.push((id.to_string(), session));
            Ok(())
        })?;
        Ok(sessions)
    }

    /// Stages `session` of `partition` (`None` deletes it).
    pub fn stage_session(
        &self,
        batch: &mut Batch,
        partition: i32,
        id: &str,
        session: Option<&Session>,
        buf: &mut Vec<u8>,
    ) {
        let mut key = keys::partition_prefix(partition).to_vec();
        key.extend_from_slice(id.as_bytes());
        batch.touch(CF_SESSIONS, partition, &key);
        match session {
            Some(s) => {
                s.encode(buf);
                batch.put_cf(self.cf(CF_SESSIONS), key, &buf);
            }
            None => batch.delete_cf(self.cf(CF_SESSIONS), key),
        }
    }

    /// Stages what changed in `windows` since the last checkpoint, and clears the change marks.
    pub fn stage_windows(&self, batch: &mut Batch, partition: i32, windows: &mut PartitionWindows) {
        let (cf, qoe) = (self.cf(CF_WINDOWS), self.cf(CF_QOE));
        let mut value = Vec::new();
        for (&start, window) in windows.windows.iter_mut() {
            for (slot, groups) in window.groups.iter_mut().enumerate() {
                let changed = groups
                    .iter_mut()
                    .filter(|(_, a)| a.unsaved.changed || a.unsaved.qoe.changed);
                for (group, agg) in changed {
                    let delta = std::mem::take(&mut agg.unsaved);
                    let key = keys::group_key(partition, start, slot as u8, group);
                    if delta.qoe.changed {
                        batch.touch(CF_QOE, partition, &key);
                        batch.merge_cf(qoe, &key, encode_qoe(&delta.qoe));
                    }
                    if delta.changed {
                        batch.touch(CF_WINDOWS, partition, &key);
                        encode_delta(&delta, &mut value);
                        batch.merge_cf(cf, key, &value);
                    }
                }
            }
        }
    }

    /// Stages the deletion of an emitted window of `partition`.
    pub fn stage_window_delete(
        &self,
        batch: &mut Batch,
        partition: i32,
        start: i64,
    ) -> Result<(), StateError> {
        for cf in [CF_WINDOWS, CF_QOE] {
            self.stage_range_delete(batch, cf, partition, start)?;
        }
        Ok(())
    }

    /// Stages the deletion of every entry of one window (or day) of `partition` in `cf`,
    /// each key recorded for the changelog's tombstones.
    fn stage_range_delete(
        &self,
        batch: &mut Batch,
        cf: &'static str,
        partition: i32,
        start: i64,
    ) -> Result<(), StateError> {
        let from = keys::window_prefix(partition, start);
        let to = keys::window_prefix(partition, start + 1);
        self.scan(cf, &from, |key, _| {
            batch.touch(cf, partition, key);
            Ok(())
        })?;
        batch.delete_range_cf(self.cf(cf), from, to);
        Ok(())
    }

    /// Stages the offset and watermark of `partition`.
    pub fn stage_meta(&self, batch: &mut Batch, stage: &str, partition: i32, meta: PartitionMeta) {
        let mut value = [0u8; 17];
        value[0..8].copy_from_slice(&meta.next_offset.to_le_bytes());
        value[8] = u8::from(meta.max_event_time.is_some());
        value[9..17].copy_from_slice(&meta.max_event_time.unwrap_or(0).to_le_bytes());
        let key = meta_key(stage, partition);
        batch.touch(POSITIONS, partition, &key);
        batch.put_cf(self.cf(CF_META), key, value);
    }

    /// Stages the outputs of `task`'s checkpoint `number` (encoded records), replacing any
    /// earlier ones, and the number itself.
    pub fn stage_outbox(&self, batch: &mut Batch, task: &str, number: u64, records: &[Vec<u8>]) {
        self.stage_outbox_clear(batch, task);
        for (i, record) in records.iter().enumerate() {
            let mut key = outbox_prefix(task);
            key.extend_from_slice(&number.to_be_bytes());
            key.extend_from_slice(&(i as u32).to_be_bytes());
            batch.put_cf(self.cf(CF_OUTBOX), key, record);
        }
        batch.put_cf(
            self.cf(CF_META),
            format!("{task}/checkpoint"),
            number.to_le_bytes(),
        );
    }

    /// Stages the removal of `task`'s outbox (its transaction committed).
    pub fn stage_outbox_clear(&self, batch: &mut Batch, task: &str) {
        let from = outbox_prefix(task);
        let mut to = from.clone();
        *to.last_mut().expect("a NUL ends the prefix") = 1;
        batch.delete_range_cf(self.cf(CF_OUTBOX), from, to);
    }

    /// `task`'s last checkpoint number and the outputs still waiting for its transaction.
    pub fn load_outbox(&self, task: &str) -> Result<(u64, Vec<Vec<u8>>), StateError> {
        let number = self
            .db
            .get_cf(self.cf(CF_META), format!("{task}/checkpoint"))?
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        let prefix = outbox_prefix(task);
        let mut records = Vec::new();
        let mode = IteratorMode::From(&prefix, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_OUTBOX), mode) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            records.push(value.to_vec());
        }
        Ok((number, records))
    }

    /// The watermark through which an operator (its `frontier` meta key) closed the windows
    /// of `partition`, if it did.
    pub fn partition_frontier(
        &self,
        frontier: &str,
        partition: i32,
    ) -> Result<Option<i64>, StateError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META), meta_key(frontier, partition))?
            .and_then(|b| b.try_into().ok())
            .map(i64::from_le_bytes))
    }

    /// Stages the watermark through which an operator closed the windows of `partition`; it
    /// moves with the partition (the positions changelog).
    pub fn stage_partition_frontier(
        &self,
        batch: &mut Batch,
        frontier: &str,
        partition: i32,
        watermark: i64,
    ) {
        let key = meta_key(frontier, partition);
        batch.touch(POSITIONS, partition, &key);
        batch.put_cf(self.cf(CF_META), key, watermark.to_le_bytes());
    }

    /// Stages an operator's emitted-window frontier.
    pub fn stage_closed_through(&self, batch: &mut Batch, frontier: &str, watermark: i64) {
        batch.put_cf(self.cf(CF_META), frontier, watermark.to_le_bytes());
    }

    /// The open days of `partition` of the DAU store.
    pub fn load_days(&self, partition: i32) -> Result<BTreeMap<i64, DayPartial>, StateError> {
        let mut days: BTreeMap<i64, DayPartial> = BTreeMap::new();
        self.scan_groups(
            CF_DAILY,
            partition,
            "expected exact id hashes or two sketches, in a known slot",
            Active::decode,
            |g, active| {
                let Some(groups) = days
                    .entry(g.start)
                    .or_default()
                    .groups
                    .get_mut(usize::from(g.slot))
                else {
                    return false;
                };
                groups.insert(g.value.into_boxed_str(), active);
                true
            },
        )?;
        Ok(days)
    }

    /// Stages what each day of `partition` gained since the last checkpoint.
    pub fn stage_days(
        &self,
        batch: &mut Batch,
        partition: i32,
        days: &mut BTreeMap<i64, DayPartial>,
    ) {
        let cf = self.cf(CF_DAILY);
        for (&day, partial) in days.iter_mut() {
            for (slot, groups) in partial.groups.iter_mut().enumerate() {
                for (value, active) in groups.iter_mut().filter(|(_, a)| a.changed) {
                    let key = keys::group_key(partition, day, slot as u8, value);
                    batch.touch(CF_DAILY, partition, &key);
                    batch.merge_cf(cf, key, active.take_delta());
                }
            }
        }
    }

    /// Stages the deletion of an emitted day of `partition`.
    pub fn stage_day_delete(
        &self,
        batch: &mut Batch,
        partition: i32,
        day: i64,
    ) -> Result<(), StateError> {
        self.stage_range_delete(batch, CF_DAILY, partition, day)
    }

    /// The column family of a changelogged store.
    fn store_cf(&self, store: &str) -> &rocksdb::ColumnFamily {
        self.cf(if store == POSITIONS { CF_META } else { store })
    }

    /// The current value of each changed key (`None`: deleted).
    pub fn current_values(&self, changes: &[Change]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        self.db
            .multi_get_cf(
                changes
                    .iter()
                    .map(|c| (self.store_cf(c.store), c.key.as_slice())),
            )
            .into_iter()
            .map(|v| v.map_err(StateError::from))
            .collect()
    }

    /// Stages the removal of everything `task` holds of `partition` in its changelogged
    /// `stores` (before a restore replaces it).
    pub fn stage_partition_clear(
        &self,
        batch: &mut Batch,
        task: &str,
        partition: i32,
        stores: &[&str],
    ) {
        let from = keys::partition_prefix(partition);
        let to = keys::partition_prefix(partition.saturating_add(1));
        for &store in stores {
            match store {
                POSITIONS => {
                    batch.delete_cf(self.cf(CF_META), meta_key(task, partition));
                    for (frontier, store) in [(QOS_FRONTIER, CF_WINDOWS), (DAU_FRONTIER, CF_DAILY)]
                    {
                        if stores.contains(&store) {
                            batch.delete_cf(self.cf(CF_META), meta_key(frontier, partition));
                        }
                    }
                }
                CF_RESUME => {
                    for cf in [CF_RESUME, CF_RESUME_RECENT] {
                        batch.delete_range_cf(self.cf(cf), from, to);
                    }
                }
                cf => batch.delete_range_cf(self.cf(cf), from, to),
            }
        }
    }

    /// Rebuilds the recency index of table `partition` from its entries (after a restore,
    /// which writes entries only).
    pub fn rebuild_recent_index(&self, partition: i32) -> Result<(), StateError> {
        let recent = self.cf(CF_RESUME_RECENT);
        let mut batch = Batch::default();
        batch.delete_range_cf(
            recent,
            keys::partition_prefix(partition),
            keys::partition_prefix(partition.saturating_add(1)),
        );
        for stored in self.table_partition(partition)? {
            stage_index(&mut batch, recent, partition, &stored.entry.position);
            if batch.len() >= 10_000 {
                self.commit(std::mem::take(&mut batch))?;
            }
        }
        self.commit(batch)
    }

    /// Stages one restored changelog record of `store` (`None`: a tombstone).
    pub fn stage_restored(&self, batch: &mut Batch, store: &str, key: &[u8], value: Option<&[u8]>) {
        let cf = self.store_cf(store);
        match value {
            Some(v) => batch.put_cf(cf, key, v),
            None => batch.delete_cf(cf, key),
        }
    }

    /// Where the standby copy of `task`'s `partition` has read each changelog topic to: the
    /// next offset per store (of [`CHANGELOGGED`]). `None`: the partition's local state is
    /// not a standby copy (it is this instance's own, or absent).
    pub fn standby_offsets(
        &self,
        task: &str,
        partition: i32,
    ) -> Result<Option<Vec<(&'static str, i64)>>, StateError> {
        let Some(value) = self
            .db
            .get_cf(self.cf(CF_META), standby_key(task, partition))?
        else {
            return Ok(None);
        };
        let corrupt = || StateError::Corrupt {
            key: format!("{CF_META}/{task}/standby/{partition}"),
            message: format!(
                "expected (store, offset) entries of 9 bytes, found {} bytes",
                value.len()
            ),
        };
        if value.len() % 9 != 0 {
            return Err(corrupt());
        }
        value
            .chunks_exact(9)
            .map(|entry| {
                let store = *CHANGELOGGED
                    .get(usize::from(entry[0]))
                    .ok_or_else(corrupt)?;
                let offset = i64::from_le_bytes(entry[1..9].try_into().expect("8 bytes"));
                Ok((store, offset))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Stages where the standby copy of `task`'s `partition` has read each store's changelog
    /// to, in the batch that applies those records.
    pub fn stage_standby_offsets(
        &self,
        batch: &mut Batch,
        task: &str,
        partition: i32,
        offsets: &[(&'static str, i64)],
    ) {
        let mut value = Vec::with_capacity(offsets.len() * 9);
        for (store, offset) in offsets {
            let index = CHANGELOGGED
                .iter()
                .position(|s| s == store)
                .expect("a changelogged store");
            value.push(index as u8);
            value.extend_from_slice(&offset.to_le_bytes());
        }
        batch.put_cf(self.cf(CF_META), standby_key(task, partition), value);
    }

    /// Stages the end of `task`'s standby copy of `partition`: its state becomes the active
    /// one's (caught up), or is dropped (with [`Store::stage_partition_clear`]).
    pub fn stage_standby_end(&self, batch: &mut Batch, task: &str, partition: i32) {
        batch.delete_cf(self.cf(CF_META), standby_key(task, partition));
    }

    /// Stages the list of `task`'s changelogged keys this checkpoint touches: if the process
    /// dies before their changelog records are delivered, they are sent again on restart.
    pub fn stage_changelog_pending(&self, batch: &mut Batch, task: &str, changes: &[Change]) {
        let mut value = Vec::new();
        for c in changes {
            let store = CHANGELOGGED
                .iter()
                .position(|s| *s == c.store)
                .expect("a changelogged store");
            value.push(store as u8);
            value.extend_from_slice(&c.partition.to_be_bytes());
            value.extend_from_slice(&(c.key.len() as u32).to_be_bytes());
            value.extend_from_slice(&c.key);
        }
        batch.put_cf(self.cf(CF_META), format!("{task}/changelog"), value);
    }

    /// The keys [`Store::stage_changelog_pending`] last recorded for `task`.
    pub fn load_changelog_pending(&self, task: &str) -> Result<Vec<Change>, StateError> {
        let Some(value) = self
            .db
            .get_cf(self.cf(CF_META), format!("{task}/changelog"))?
        else {
            return Ok(Vec::new());
        };
        let corrupt = || StateError::Corrupt {
            key: format!("{CF_META}/{task}/changelog"),
            message: "expected (store, partition, key length, key) entries".into(),
        };
        let mut rest = value.as_slice();
        let mut changes = Vec::new();
        while let Some((&store, tail)) = rest.split_first() {
            let store = *CHANGELOGGED.get(usize::from(store)).ok_or_else(corrupt)?;
            let partition = i32::from_be_bytes(
                tail.get(0..4)
                    .ok_or_else(corrupt)?
                    .try_into()
                    .expect("4 bytes"),
            );
            let len = u32::from_be_bytes(
                tail.get(4..8)
                    .ok_or_else(corrupt)?
                    .try_into()
                    .expect("4 bytes"),
            ) as usize;
            let key = tail.get(8..8 + len).ok_or_else(corrupt)?.to_vec();
            changes.push(Change {
                store,
                partition,
                key,
            });
            rest = &tail[8 + len..];
        }
        Ok(changes)
    }

    /// Writes a batch atomically and durably (WAL synced: it survives a killed process and a host crash).
    pub fn commit(&self, batch: Batch) -> Result<(), StateError> {
        // Synced: offsets are committed to Kafka only after this returns, and a host crash
        // must not leave Kafka's offsets ahead of the state they stand for.
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        Ok(self.db.write_opt(batch.inner, &options)?)
    }

    /// The table entry `profile`/`title` of `partition`.
    pub fn table_get(
        &self,
        partition: i32,
        profile: &str,
        title: &str,
    ) -> Result<Option<StoredEntry>, StateError> {
        let key = keys::table_key(partition, profile, title);
        self.db
            .get_cf(self.cf(CF_RESUME), &key)?
            .map(|bytes| decode_entry(&key, &bytes))
            .transpose()
    }

    /// The `limit` newest unfinished entries of `profile` (newest first, ties by title): reads
    /// `limit` index keys and `limit` entries, however many titles the profile has.
    pub fn table_recent(
        &self,
        partition: i32,
        profile: &str,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StateError> {
        let prefix = keys::table_profile_prefix(partition, profile);
        let mut table_keys = Vec::with_capacity(limit.min(1_024));
        let mode = IteratorMode::From(&prefix, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_RESUME_RECENT), mode) {
            let (key, _) = item?;
            if table_keys.len() >= limit || !key.starts_with(&prefix) {
                break;
            }
            table_keys.extend(keys::table_key_of_recent(&prefix, &key));
            if table_keys.len() >= limit {
                break;
            }
        }
        let table = self.cf(CF_RESUME);
        let values = self
            .db
            .multi_get_cf(table_keys.iter().map(|k| (table, k.as_slice())));
        let mut out = Vec::with_capacity(table_keys.len());
        for (key, value) in table_keys.iter().zip(values) {
            if let Some(bytes) = value? {
                out.push(decode_entry(key, &bytes)?);
            }
        }
        Ok(out)
    }

    /// Every entry of `partition`.
    pub fn table_partition(&self, partition: i32) -> Result<Vec<StoredEntry>, StateError> {
        self.table_scan(&keys::partition_prefix(partition))
    }

    fn table_scan(&self, prefix: &[u8]) -> Result<Vec<StoredEntry>, StateError> {
        let mut out = Vec::new();
        self.scan(CF_RESUME, prefix, |key, value| {
            out.push(decode_entry(key, value)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Stages a table entry and its index entry. At most one put or delete per entry per
    /// batch: the index entry of the stored version is found by reading it.
    pub fn stage_table_put(
        &self,
        batch: &mut Batch,
        partition: i32,
        stored: &StoredEntry,
    ) -> Result<(), StateError> {
        let p = &stored.entry.position;
        let key = keys::table_key(partition, &p.profile_id, &p.title_id);
        self.stage_unindex(batch, partition, &key)?;
        stage_index(batch, self.cf(CF_RESUME_RECENT), partition, p);
        let value = serde_json::to_vec(stored).expect("entries serialize");
        batch.touch(CF_RESUME, partition, &key);
        batch.put_cf(self.cf(CF_RESUME), key, value);
        Ok(())
    }

    /// Stages the deletion of a table entry and its index entry (one per entry per batch).
    pub fn stage_table_delete(
        &self,
        batch: &mut Batch,
        partition: i32,
        profile: &str,
        title: &str,
    ) -> Result<(), StateError> {
        let key = keys::table_key(partition, profile, title);
        self.stage_unindex(batch, partition, &key)?;
        batch.touch(CF_RESUME, partition, &key);
        batch.delete_cf(self.cf(CF_RESUME), key);
        Ok(())
    }

    /// Stages the deletion of the index entry of the stored version of `key`, if any.
    fn stage_unindex(
        &self,
        batch: &mut Batch,
        partition: i32,
        key: &[u8],
    ) -> Result<(), StateError> {
        if let Some(bytes) = self.db.get_pinned_cf(self.cf(CF_RESUME), key)? {
            let old = decode_entry(key, &bytes)?.entry.position;
            if !old.completed {
                batch.delete_cf(
                    self.cf(CF_RESUME_RECENT),
                    keys::recent_key(partition, &old.profile_id, old.updated_at, &old.title_id),
                );
            }
        }
        Ok(())
    }

    /// Approximate number of table entries.
    pub fn table_len(&self) -> u64 {
        self.db
            .property_int_value_cf(self.cf(CF_RESUME), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Approximate bytes held: SST files plus memtables, all column families.
    pub fn size_bytes(&self) -> u64 {
        COLUMN_FAMILIES
            .iter()
            .flat_map(|cf| {
                [
                    "rocksdb.total-sst-files-size",
                    "rocksdb.size-all-mem-tables",
                ]
                .map(|p| {
                    self.db
                        .property_int_value_cf(self.cf(cf), p)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                })
            })
            .sum()
    }
}

fn outbox_prefix(task: &str) -> Vec<u8> {
    let mut key = task.as_bytes().to_vec();
    key.push(0);
    key
}

/// Meta key of a stage's input partition: each stage reads its own topic.
/// Key of the standby offsets of `task`'s `partition`.
fn standby_key(task: &str, partition: i32) -> Vec<u8> {
    meta_key(&format!("{task}/standby"), partition)
}

fn meta_key(stage: &str, partition: i32) -> Vec<u8> {
    let mut key = format!("{stage}/").into_bytes();
    key.extend_from_slice(&keys::partition_prefix(partition));
    key
}

/// A group's value: play, rebuffer and rebuffer-event counters, then the viewer hashes. A
/// checkpoint writes only what changed, as a merge operand of the same shape (counter deltas
/// and new viewers); [`merge_groups`] sums the counters and joins the viewer lists.
fn encode_delta(delta: &GroupDelta, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(24 + 8 * delta.viewers.len());
    for counter in [delta.play_ms, delta.rebuffer_ms, delta.rebuffer_events] {
        out.extend_from_slice(&counter.to_le_bytes());
    }
    for session in &delta.viewers {
        out.extend_from_slice(&session.to_le_bytes());
    }
}

/// The merge operator of the window store (associative: operands and values share a shape).
/// A malformed operand makes the read fail rather than guess.
fn merge_groups(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut counters = [0i64; 3];
    let mut viewers = Vec::new();
    for value in existing.into_iter().chain(operands.iter()) {
        if value.len() < 24 || value.len() % 8 != 0 {
            return None;
        }
        for (i, counter) in counters.iter_mut().enumerate() {
            let bytes = value[i * 8..i * 8 + 8].try_into().expect("8 bytes");
            *counter = counter.wrapping_add(i64::from_le_bytes(bytes));
        }
        viewers.extend_from_slice(&value[24..]);
    }
    let mut out = Vec::with_capacity(24 + viewers.len());
    for counter in counters {
        out.extend_from_slice(&counter.to_le_bytes());
    }
    out.extend_from_slice(&viewers);
    Some(out)
}

/// A group's QoE value: attempts, start failures, exits before start, Σ bitrate × play_ms
/// (i128), Σ play_ms with a rendition, then the startup DDSketch in its Java encoding. Merge
/// operands have the same shape: [`merge_qoe`] adds the counters and merges the sketches.
pub fn encode_qoe(qoe: &Qoe) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for counter in [qoe.attempts, qoe.start_failures, qoe.exits_before_start] {
        out.extend_from_slice(&counter.to_le_bytes());
    }
    out.extend_from_slice(&qoe.bitrate_kbps_ms.to_le_bytes());
    out.extend_from_slice(&qoe.bitrate_play_ms.to_le_bytes());
    out.extend_from_slice(&qoe.startup.encode());
    out
}

/// Decodes [`encode_qoe`].
pub fn decode_qoe(bytes: &[u8]) -> Option<Qoe> {
    let word = |i: usize| Some(i64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
    Some(Qoe {
        attempts: word(0)?,
        start_failures: word(8)?,
        exits_before_start: word(16)?,
        bitrate_kbps_ms: i128::from_le_bytes(bytes.get(24..40)?.try_into().ok()?),
        bitrate_play_ms: word(40)?,
        startup: Startup::decode(bytes.get(48..)?)?,
        changed: false,
    })
}

/// The merge operator of the QoE store. A malformed operand makes the read fail.
fn merge_qoe(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut total = Qoe::default();
    for value in existing.into_iter().chain(operands.iter()) {
        total.merge(&decode_qoe(value)?);
    }
    Some(encode_qoe(&total))
}

/// A whole group aggregate in the window store's value shape (counters, then viewers).
pub fn encode_group(agg: &GroupAgg, out: &mut Vec<u8>) {
    out.reserve(24 + 8 * agg.viewers.len());
    for counter in [agg.play_ms, agg.rebuffer_ms, agg.rebuffer_events] {
        out.extend_from_slice(&counter.to_le_bytes());
    }
    for session in &agg.viewers {
        out.extend_from_slice(&session.to_le_bytes());
    }
}

/// Decodes a window-store value ([`encode_group`]); the QoE part is left empty.
pub fn decode_group(bytes: &[u8]) -> Option<GroupAgg> {
    if bytes.len() < 24 || bytes.len() % 8 != 0 {
        return None;
    }
    let mut words = bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8-byte chunks")));
    let mut next = || words.next().map(|w| w as i64);
    let (play_ms, rebuffer_ms, rebuffer_events) = (next()?, next()?, next()?);
    Some(GroupAgg {
        play_ms,
        rebuffer_ms,
        rebuffer_events,
        viewers: words.collect(),
        ..GroupAgg::default()
    })
}

/// Stages the index entry of `position` when it is unfinished.
fn stage_index(
    batch: &mut Batch,
    recent: &rocksdb::ColumnFamily,
    partition: i32,
    position: &crate::record::ResumePosition,
) {
    if !position.completed {
        let key = keys::recent_key(
            partition,
            &position.profile_id,
            position.updated_at,
            &position.title_id,
        );
        batch.put_cf(recent, key, []);
    }
}

fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<StoredEntry, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: format!("{CF_RESUME}/{}", String::from_utf8_lossy(key)),
        message: e.to_string(),
    })
}

fn group_of<'w>(
    windows: &'w mut PartitionWindows,
    start: i64,
    slot: u8,
    group: &str,
) -> &'w mut GroupAgg {
    windows
        .windows
        .entry(start)
        .or_default()
        .group_mut(slot, group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dimension;
    use crate::record::{EventType, PlaybackEvent};
    use crate::session::{Dims, Fact};
    use crate::window::WindowSpec;
    use proptest::prelude::*;

    fn event(i: u32, t: i64) -> PlaybackEvent {
        PlaybackEvent {
            event_id: format!("e{i}"),
            session_id: format!("s{}", i % 7),
            account_id: "a".into(),
            profile_id: "p".into(),
            device_id: "d".into(),
            device_type: ["tv", "web"][i as usize % 2].into(),
            title_id: "t".into(),
            country: ["NL", "US", "BR"][i as usize % 3].into(),
            cdn: "c".into(),
            event_type: [
                EventType::Heartbeat,
                EventType::RebufferStart,
                EventType::Play,
            ][i as usize % 3],
            event_time: t,
            position_ms: 0,
            duration_ms: None,
            play_ms: i64::from(i % 100),
            rebuffer_ms: i64::from(i % 13),
            startup_ms: None,
            bitrate_kbps: None,
            error_code: None,
        }
    }

    /// One new viewer in a group of 100,000 costs a checkpoint a few dozen bytes, not the set
    /// (800 KB when the whole value was rewritten); after a restart the group holds every
    /// viewer and every counter once.
    #[test]
    fn a_checkpoint_writes_what_changed_not_the_whole_viewer_set() {
        let dir = tempfile::tempdir().unwrap();
        let spec = WindowSpec::tumbling(10_000, 0);
        let viewer = |i: u32| PlaybackEvent {
            session_id: format!("v{i}"),
            event_type: EventType::Play,
            ..event(i, 1_000)
        };
        let mut windows = PartitionWindows::default();
        let expected = {
            let store = Store::open(dir.path(), 8, 64).unwrap();
            for i in 0..100_000 {
                windows.add(&spec, &[], &viewer(i));
            }
            let mut batch = Batch::default();
            store.stage_windows(&mut batch, 7, &mut windows);
            store.commit(batch).unwrap();
            windows.add(&spec, &[], &viewer(100_000));
            windows.add(&spec, &[], &viewer(5));
            let mut batch = Batch::default();
            store.stage_windows(&mut batch, 7, &mut windows);
            assert!(
                batch.size_in_bytes() < 200,
                "{} bytes for one new viewer",
                batch.size_in_bytes()
            );
            store.commit(batch).unwrap();
            windows
        };
        let store = Store::open(dir.path(), 8, 64).unwrap();
        let restored = store.load_windows(7).unwrap();
        let all = &restored.windows[&0].groups[0]["all"];
        assert_eq!(all.viewers.len(), 100_001);
        assert_eq!(restored, expected);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The store, checkpointed at random points and with windows closing, always restores
        /// exactly the in-memory model.
        #[test]
        fn restore_equals_the_in_memory_model(times in prop::collection::vec((0i64..100_000, any::<bool>(), any::<bool>()), 1..150)) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), 8, 8).unwrap();
            let spec = WindowSpec::tumbling(10_000, 0);
            let dims = [Dimension::Country, Dimension::DeviceType];
            let mut model = PartitionWindows::default();
            let mut other = PartitionWindows::default();
            let mut days = BTreeMap::<i64, DayPartial>::new();
            let facts = [Fact::Attempt, Fact::StartFailure, Fact::ExitBeforeStart, Fact::Startup(Some(700)), Fact::Played { play_ms: 900, bitrate_kbps: 3_000 }];
            for (i, (t, checkpoint, close)) in times.into_iter().enumerate() {
                let e = event(i as u32, t);
                model.add(&spec, &dims, &e);
                let group = Dims { cdn: e.cdn.as_str().into(), country: e.country.as_str().into(), device_type: e.device_type.as_str().into(), title_id: e.title_id.as_str().into() };
                model.add_fact(&spec, &dims, i64::MIN, (t, &group, facts[i % facts.len()]));
                days.entry(t / 50_000).or_default().add(&e, i % 2 == 0);
                other.add(&spec, &dims, &event(i as u32 + 1, t));
                if close {
                    let mut batch = Batch::default();
                    for (start, _) in model.take_closed(&spec, t - 20_000) {
                        store.stage_window_delete(&mut batch, 7, start).unwrap();
                    }
                    store.commit(batch).unwrap();
                }
                if checkpoint {
                    let mut batch = Batch::default();
                    store.stage_windows(&mut batch, 7, &mut model);
                    store.stage_windows(&mut batch, 8, &mut other);
                    store.stage_days(&mut batch, 7, &mut days);
                    store.stage_meta(&mut batch, "qos", 7, PartitionMeta { next_offset: i as i64, max_event_time: Some(t) });
                    store.commit(batch).unwrap();
                }
            }
            let mut batch = Batch::default();
            store.stage_windows(&mut batch, 7, &mut model);
            store.stage_days(&mut batch, 7, &mut days);
            store.commit(batch).unwrap();
            let restored = store.load_windows(7).unwrap();
            let strip = |w: &PartitionWindows| {
                let mut w = w.clone();
                for p in w.windows.values_mut() { for g in p.groups.iter_mut() { for a in g.values_mut() { a.unsaved = Default::default(); a.qoe.changed = false; } } }
                w
            };
            prop_assert_eq!(strip(&restored), strip(&model));
            let results = |d: &BTreeMap<i64, DayPartial>| d.iter().flat_map(|(day, p)| p.results(*day, false)).collect::<Vec<_>>();
            prop_assert_eq!(results(&store.load_days(7).unwrap()), results(&days));
        }
    }

    fn stored(profile: &str, title: &str, updated_at: i64, completed: bool) -> StoredEntry {
        StoredEntry {
            entry: Entry {
                position: crate::record::ResumePosition {
                    profile_id: profile.into(),
                    title_id: title.into(),
                    position_ms: 1,
                    duration_ms: None,
                    progress: None,
                    completed,
                    updated_at,
                    device_type: "tv".into(),
                },
                event_id: "e".into(),
            },
            pending: false,
        }
    }

    /// The continue-watching row as the query API defines it, from every entry.
    fn row_of(
        model: &std::collections::BTreeMap<(String, String), (i64, bool)>,
        profile: &str,
        limit: usize,
    ) -> Vec<(String, i64)> {
        let mut row: Vec<(String, i64)> = model
            .iter()
            .filter(|((p, _), (_, completed))| p == profile && !completed)
            .map(|((_, t), (at, _))| (t.clone(), *at))
            .collect();
        row.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        row.truncate(limit);
        row
    }

    proptest! {
        /// Whatever sequence of updates, completions and deletions, the index gives exactly the
        /// row a full scan would, and holds no stale entry.
        #[test]
        fn the_recency_index_agrees_with_the_table(
            batches in prop::collection::vec(
                prop::collection::vec((0u8..2, 0u8..6, prop::option::of((0i64..20, any::<bool>()))), 1..8),
                1..12,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), 8, 8).unwrap();
            let mut model = std::collections::BTreeMap::new();
            for ops in batches {
                // One write per entry per batch, the newest winning, as the table operator does.
                let ops: std::collections::BTreeMap<_, _> =
                    ops.into_iter().map(|(p, t, v)| ((format!("p/{p}"), format!("t\0{t}")), v)).collect();
                let mut batch = Batch::default();
                for ((profile, title), op) in ops {
                    match op {
                        Some((at, completed)) => {
                            store.stage_table_put(&mut batch, 0, &stored(&profile, &title, at, completed)).unwrap();
                            model.insert((profile, title), (at, completed));
                        }
                        None => {
                            store.stage_table_delete(&mut batch, 0, &profile, &title).unwrap();
                            model.remove(&(profile, title));
                        }
                    }
                }
                store.commit(batch).unwrap();
                for profile in ["p/0", "p/1"] {
                    for limit in [1, 3, 100] {
                        let got: Vec<(String, i64)> = store
                            .table_recent(0, profile, limit)
                            .unwrap()
                            .into_iter()
                            .map(|s| (s.entry.position.title_id, s.entry.position.updated_at))
                            .collect();
                        prop_assert_eq!(got, row_of(&model, profile, limit));
                    }
                }
                let indexed = store.db.iterator_cf(store.cf(CF_RESUME_RECENT), IteratorMode::Start).count();
                prop_assert_eq!(indexed, model.values().filter(|(_, completed)| !completed).count());
            }
        }
    }

    /// A row of 20 from a profile of 10,000 unfinished titles steps over about 20 keys, not
    /// 10,000 (RocksDB's own count of iterator steps in the memtable).
    #[test]
    fn continue_watching_reads_only_what_the_limit_needs() {
        use rocksdb::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8, 64).unwrap();
        let mut batch = Batch::default();
        for t in 0..10_000 {
            let entry = stored("binge", &format!("t{t:05}"), t, false);
            store.stage_table_put(&mut batch, 0, &entry).unwrap();
        }
        store.commit(batch).unwrap();
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut perf = PerfContext::default();
        perf.reset();
        let row = store.table_recent(0, "binge", 20).unwrap();
        let steps = perf.metric(PerfMetric::NextOnMemtableCount);
        set_perf_stats(PerfStatsLevel::Disable);
        assert_eq!(row.len(), 20);
        assert_eq!(row[0].entry.position.title_id, "t09999");
        assert!(steps <= 40, "{steps} iterator steps for a row of 20");
    }

    #[test]
    fn a_restored_table_partition_gets_its_recency_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8, 8).unwrap();
        let mut batch = Batch::default();
        for (title, at, completed) in [("a", 5, false), ("b", 9, false), ("c", 7, true)] {
            let entry = stored("p", title, at, completed);
            let key = keys::table_key(2, "p", title);
            let value = serde_json::to_vec(&entry).unwrap();
            store.stage_restored(&mut batch, CF_RESUME, &key, Some(&value));
        }
        store.commit(batch).unwrap();
        assert!(store.table_recent(2, "p", 10).unwrap().is_empty());
        store.rebuild_recent_index(2).unwrap();
        let titles: Vec<String> = store
            .table_recent(2, "p", 10)
            .unwrap()
            .into_iter()
            .map(|s| s.entry.position.title_id)
            .collect();
        assert_eq!(titles, ["b", "a"], "unfinished titles, newest first");
    }

    #[test]
    fn meta_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8, 8).unwrap();
        assert_eq!(store.partition_meta("qos", 3).unwrap(), None);
        let meta = PartitionMeta {
            next_offset: 42,
            max_event_time: Some(-5),
        };
        let mut batch = Batch::default();
        store.stage_meta(&mut batch, "qos", 3, meta);
        store.stage_closed_through(&mut batch, QOS_FRONTIER, 99);
        store.commit(batch).unwrap();
        drop(store);
        let store = Store::open(dir.path(), 8, 8).unwrap();
        assert_eq!(store.partition_meta("qos", 3).unwrap(), Some(meta));
        assert_eq!(store.partition_meta("resume", 3).unwrap(), None);
        assert_eq!(store.closed_through(QOS_FRONTIER).unwrap(), Some(99));
    }
}
