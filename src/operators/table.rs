//! The resume table as an operator: applies events to the table in RocksDB (newest by event
//! time, see [`crate::table`]), publishes rate-limited updates and tombstones to the compacted
//! output topic, expires entries without an update for the retention, and tells the HTTP side
//! which partitions it owns.
//!
//! Offsets are committed to Kafka only once every update before them has been published (they
//! lag by the emit interval): a new machine that restores from the topic and continues from
//! those offsets misses nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::Batch;
use rustc_hash::FxHashMap;

use crate::config::ResumeConfig;
use crate::error::PipelineError;
use crate::io::sink::Output;
use crate::resume::{TableView, EVENT_ID_HEADER};
use crate::runtime::{Context, Handled, Operator, Record};
use crate::state::{PartitionMeta, Store, StoredEntry};
use crate::table::{apply, Applied};

/// How often entries past the retention are looked for.
const RETENTION_SCAN: Duration = Duration::from_secs(60);

/// Entries per generation of the read cache (two generations: at most twice this many).
const CACHE_GENERATION: usize = 32_768;

/// Recently written entries, so that the next event of a session usually finds its entry
/// without a RocksDB read and a decode. Two generations: a lookup hit in the older one moves
/// the entry to the younger; when the younger is full it becomes the older and the oldest
/// entries are forgotten. Bounded, and always equal to the store for what it holds.
#[derive(Default)]
struct EntryCache {
    young: FxHashMap<String, (i32, StoredEntry)>,
    old: FxHashMap<String, (i32, StoredEntry)>,
}

impl EntryCache {
    fn get(&mut self, key: &str) -> Option<&StoredEntry> {
        if !self.young.contains_key(key) {
            let (key, value) = self.old.remove_entry(key)?;
            self.insert(key, value);
        }
        self.young.get(key).map(|(_, s)| s)
    }

    fn insert(&mut self, key: String, value: (i32, StoredEntry)) {
        if self.young.len() >= CACHE_GENERATION {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }

    fn remove(&mut self, key: &str) {
        self.young.remove(key);
        self.old.remove(key);
    }

    fn forget_partition(&mut self, partition: i32) {
        self.young.retain(|_, (p, _)| *p != partition);
        self.old.retain(|_, (p, _)| *p != partition);
    }
}

/// The resume-table operator.
pub struct ResumeTable {
    store: Arc<Store>,
    view: Arc<TableView>,
    resume: ResumeConfig,
    output: Output,
    checkpoint_interval: Duration,
    /// Largest event time applied per owned partition: the retention clock.
    parts: BTreeMap<i32, Option<i64>>,
    /// Entries changed since the last checkpoint, by key.
    dirty: FxHashMap<String, (i32, StoredEntry)>,
    /// Changed entries whose output record is owed, by key, with their partition.
    pending: BTreeMap<String, i32>,
    /// When each recently emitted key was last emitted (the rate limit).
    last_emit: HashMap<String, Instant>,
    /// Offsets per checkpoint, committed to Kafka once everything before them is published.
    commits: VecDeque<(Instant, Vec<(i32, i64)>)>,
    last_retention_scan: Instant,
    /// Entries expired (tombstones sent) whose deletion the next batch stages.
    expired: Vec<(i32, String, String)>,
    /// Entries as last written to the store.
    cache: EntryCache,
    counters: crate::metrics::TableCounters,
}

impl ResumeTable {
    /// The table of `resume` in `view`'s store, publishing to `output`.
    pub fn new(
        resume: &ResumeConfig,
        view: Arc<TableView>,
        output: Output,
        checkpoint_interval: Duration,
    ) -> Self {
        Self {
            store: Arc::clone(&view.store),
            view,
            resume: resume.clone(),
            output,
            checkpoint_interval,
            parts: BTreeMap::new(),
            dirty: FxHashMap::default(),
            pending: BTreeMap::new(),
            last_emit: HashMap::new(),
            commits: VecDeque::new(),
            last_retention_scan: Instant::now(),
            expired: Vec::new(),
            cache: EntryCache::default(),
            counters: crate::metrics::TableCounters::default(),
        }
    }

    /// Deletes entries without an update for the retention (in event time), with tombstones.
    fn expire(&mut self, ctx: &Context<'_>) -> Result<(), PipelineError> {
        let retention = self.resume.retention.as_millis() as i64;
        for (&p, max_event_time) in &self.parts {
            let Some(now) = *max_event_time else {
                continue;
            };
            for stored in self.store.table_partition(p)? {
                let position = &stored.entry.position;
                let key = position.key();
                if position.updated_at < now - retention && !self.dirty.contains_key(&key) {
                    ctx.sink.send_tombstone(&self.output, &key, p)?;
                    self.pending.remove(&key);
                    let (profile, title) = (position.profile_id.clone(), position.title_id.clone());
                    self.expired.push((p, profile, title));
                }
            }
        }
        Ok(())
    }
}

/// However the table task ends (a clean stop, an error, a panic), this instance stops
/// answering for its partitions at once: the process may take a while to exit, and another
/// instance already owns them.
impl Drop for ResumeTable {
    fn drop(&mut self) {
        for &p in self.parts.keys() {
            self.view.set_owned(p, false);
        }
    }
}

impl Operator for ResumeTable {
    fn name(&self) -> &'static str {
        "resume"
    }

    fn assign(
        &mut self,
        partition: i32,
        checkpoint: Option<&PartitionMeta>,
    ) -> Result<(), PipelineError> {
        // Output owed from before a restart.
        for stored in self
            .store
            .table_partition(partition)?
            .into_iter()
            .filter(|s| s.pending)
        {
            self.pending.insert(stored.entry.position.key(), partition);
        }
        self.parts
            .insert(partition, checkpoint.and_then(|m| m.max_event_time));
        self.view.set_owned(partition, true);
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.parts.remove(&partition);
        // Normally all sent and staged by the checkpoint before; after an aborted
        // transaction, the partition's owner (maybe this instance again) takes them up.
        self.pending.retain(|_, p| *p != partition);
        self.dirty.retain(|_, (p, _)| *p != partition);
        self.expired.retain(|(p, _, _)| *p != partition);
        self.cache.forget_partition(partition);
        self.view.set_owned(partition, false);
    }

    fn on_record(
        &mut self,
        _ctx: &Context<'_>,
        record: &Record<'_>,
    ) -> Result<Handled, PipelineError> {
        let (event, p) = (record.event, record.origin.partition);
        if let Some(max) = self.parts.get_mut(&p) {
            *max = Some(max.map_or(event.event_time, |t| t.max(event.event_time)));
        }
        let key = crate::table::key_of(event);
        let current = match self.dirty.get(&key) {
            Some((_, stored)) => Some(stored.entry.clone()),
            None => match self.cache.get(&key) {
                Some(stored) => Some(stored.entry.clone()),
                None => self
                    .store
                    .table_get(p, &event.profile_id, &event.title_id)?
                    .map(|s| s.entry),
            },
        };
        match apply(current.as_ref(), event, self.resume.completion_threshold) {
            Applied::Updated(entry) => {
                self.counters.update(true);
                if self.pending.insert(key.clone(), p).is_some() {
                    self.counters.suppressed();
                }
                let stored = StoredEntry {
                    entry,
                    pending: true,
                };
                self.dirty.insert(key, (p, stored));
            }
            Applied::OutOfDate => self.counters.update(false),
        }
        Ok(Handled::Applied)
    }

    /// Publishes what the rate limit allows (everything when `all`) and expires old entries.
    fn before_flush(&mut self, ctx: &Context<'_>, all: bool) -> Result<(), PipelineError> {
        let now = ctx.now;
        let interval = self.resume.emit_interval;
        let due: Vec<(String, i32)> = self
            .pending
            .iter()
            .filter(|(key, _)| {
                all || self
                    .last_emit
                    .get(*key)
                    .is_none_or(|t| now.duration_since(*t) >= interval)
            })
            .map(|(k, p)| (k.clone(), *p))
            .collect();
        for (key, p) in due {
            self.pending.remove(&key);
            let cached = match self.dirty.get(&key) {
                Some((_, stored)) => Some(stored.clone()),
                None => self.cache.get(&key).cloned(),
            };
            let stored = match cached {
                Some(stored) => stored,
                None => {
                    let Some((profile, title)) = crate::record::split_resume_key(&key) else {
                        continue;
                    };
                    match self.store.table_get(p, &profile, &title)? {
                        Some(stored) => stored,
                        None => continue,
                    }
                }
            };
            ctx.sink.send_result(
                &self.output,
                &key,
                &stored.entry.position,
                Some(p),
                &[(EVENT_ID_HEADER, &stored.entry.event_id)],
            )?;
            self.last_emit.insert(key.clone(), now);
            let published = StoredEntry {
                pending: false,
                ..stored
            };
            self.dirty.insert(key, (p, published));
        }
        self.last_emit
            .retain(|_, t| now.duration_since(*t) < interval);
        if all || self.last_retention_scan.elapsed() >= RETENTION_SCAN {
            self.expire(ctx)?;
            self.last_retention_scan = Instant::now();
        }
        Ok(())
    }

    fn stage(&mut self, batch: &mut Batch) -> Result<(), PipelineError> {
        for (p, profile, title) in self.expired.drain(..) {
            self.cache
                .remove(&crate::record::resume_key(&profile, &title));
            self.store.stage_table_delete(batch, p, &profile, &title)?;
        }
        for (key, (p, stored)) in self.dirty.drain() {
            self.store.stage_table_put(batch, p, &stored)?;
            self.cache.insert(key, (p, stored));
        }
        crate::metrics::table_size(self.store.table_len());
        Ok(())
    }

    fn committable(
        &mut self,
        offsets: Vec<(i32, i64)>,
        now: Instant,
        all: bool,
    ) -> Option<Vec<(i32, i64)>> {
        self.commits.push_back((now, offsets));
        // Every update older than the emit interval (plus one checkpoint) has been published.
        let safe_age = self.resume.emit_interval + self.checkpoint_interval;
        let mut commit = None;
        while self
            .commits
            .front()
            .is_some_and(|(t, _)| all || now.duration_since(*t) >= safe_age)
        {
            commit = self.commits.pop_front().map(|(_, o)| o);
        }
        commit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::registry::MemoryRegistry;
    use crate::resume::RESUME_POSITION_SCHEMA;

    #[test]
    fn a_table_that_ends_answers_for_no_partition() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8, 8).unwrap());
        let view = Arc::new(TableView::new(store, 2));
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/resume.toml");
        let topology = crate::config::Topology::load(&path).unwrap();
        let output = Output::register(
            &MemoryRegistry::default(),
            "positions",
            RESUME_POSITION_SCHEMA,
        )
        .unwrap();
        let resume = topology.resume.as_ref().unwrap();
        let mut table = ResumeTable::new(resume, Arc::clone(&view), output, Duration::from_secs(1));
        table.assign(1, None).unwrap();
        assert!(view.owns(1));
        drop(table);
        assert!(
            !view.owns(1),
            "a table that ended does not answer for partition 1"
        );
    }
}
