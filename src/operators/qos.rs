//! QoS windows, phase one: per owned input partition, window (tumbling or hopping) and group,
//! concurrent viewers, play and rebuffer time, rebuffer events and the session lifecycle's
//! QoE. Each partition's aggregate of a window goes to the internal partials topic when the
//! window closes here (and, with the `early` policy, every `early_interval` while it changes),
//! followed by the partition's progress; the merge ([`crate::runtime::merge`]) adds the
//! partitions up and emits the results. A record whose window its partition's watermark (or a
//! window closed here) has passed is late: it changes nothing, and the runtime writes it
//! unchanged to the late topic.
//!
//! Windows close here at the operator watermark of the owned partitions; once all of them are
//! idle, at the global watermark the merge computes from every partition's progress when that
//! is further: an instance whose partitions are all quiet still closes windows, and a record
//! its idle partition receives for a window the others have closed is late here, never a
//! partial the merge would have to refuse.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::Batch;
use rustc_hash::FxHashMap;

use crate::config::{Dimension, EmitPolicy, QosConfig};
use crate::error::PipelineError;
use crate::metrics;
use crate::operators::partials::{
    partition_of, send_progress, PartialRecord, PartialsTopic, SentProgress,
};
use crate::record::{PlaybackEvent, QosWindow};
use crate::runtime::{Context, Handled, Operator, Record};
use crate::session::{Dims, Fact, Session};
use crate::state::PartitionMeta;
use crate::state::{Store, QOS_FRONTIER};
use crate::window::{PartitionWindows, WindowPartial, WindowSpec};

/// Called with every final result as it is emitted (the demo prints them).
pub type ResultHook = Box<dyn FnMut(&QosWindow) + Send>;

/// The global watermark the merge computes from every input partition's progress, shared
/// with phase one; `i64::MIN` while unknown.
pub type GlobalWatermark = Arc<AtomicI64>;

/// The QoS window operator (phase one).
pub struct QosWindows {
    spec: WindowSpec,
    dimensions: Vec<Dimension>,
    store: Arc<Store>,
    partials: PartialsTopic,
    global: GlobalWatermark,
    /// Open windows per owned input partition.
    parts: BTreeMap<i32, PartitionWindows>,
    /// Per owned partition, the highest watermark at which its windows were closed: anything
    /// at or below is final. Per partition, as a partition that moves here may lag behind
    /// the others, and its records are late against its own progress only.
    closed: BTreeMap<i32, i64>,
    /// The frontier of each partition the last checkpoint wrote: an unchanged one is not
    /// written (nor sent to the changelog) again.
    written: BTreeMap<i32, i64>,
    /// The frontier of an earlier version, kept for all partitions in one key.
    legacy_closed: i64,
    /// Emitted windows whose state is deleted at the next checkpoint.
    emitted: Vec<(i32, i64)>,
    /// The progress last written for each owned partition.
    progress: SentProgress,
    /// The `early` policy's interval; `None` for `final`.
    early_interval: Option<Duration>,
    /// When early results were last written.
    last_early: Instant,
    /// Open windows changed since early results were last written.
    changed: BTreeSet<i64>,
    /// The session lifecycle behind the QoE fields, when `qos.qoe` is on.
    qoe: Option<Sessions>,
}

/// Every owned session, by partition, with the horizon each partition's facts are decided
/// through (per partition: one that moves here may be behind the others).
struct Sessions {
    timeout: i64,
    /// Facts before this event time are decided.
    horizon: BTreeMap<i32, i64>,
    /// Each session and whether it changed since the last checkpoint.
    parts: BTreeMap<i32, FxHashMap<Box<str>, (Session, bool)>>,
    /// Expired sessions to delete at the next checkpoint.
    expired: Vec<(i32, Box<str>)>,
}

impl Sessions {
    /// The event time before which every fact can be decided at operator watermark
    /// `watermark`: the end of the newest slice of `advance` whose oldest window is closed.
    fn horizon(spec: &WindowSpec, watermark: i64) -> i64 {
        watermark
            .saturating_sub(spec.grace)
            .div_euclid(spec.advance)
            .saturating_mul(spec.advance)
    }

    /// Adds an on-time event of `partition` to its session. A gap longer than the timeout
    /// ends the previous session: its remaining facts go to `add` here.
    fn observe(
        &mut self,
        partition: i32,
        event: &PlaybackEvent,
        add: &mut impl FnMut(i64, &Dims, Fact),
    ) {
        let Some(sessions) = self.parts.get_mut(&partition) else {
            return;
        };
        let (session, dirty) = match sessions.get_mut(event.session_id.as_str()) {
            Some(entry) => entry,
            None => sessions
                .entry(event.session_id.as_str().into())
                .or_default(),
        };
        *dirty = true;
        session.observe(event, self.timeout, add);
    }
}

impl QosWindows {
    /// The operator of `qos`, writing partials to `partials`, closing windows no earlier
    /// than the `global` watermark.
    pub fn new(
        qos: &QosConfig,
        store: Arc<Store>,
        partials: PartialsTopic,
        global: GlobalWatermark,
    ) -> Result<Self, PipelineError> {
        Ok(Self {
            spec: WindowSpec::new(qos.window, qos.advance.unwrap_or(qos.window), qos.grace),
            dimensions: qos.dimensions.clone(),
            closed: BTreeMap::new(),
            written: BTreeMap::new(),
            legacy_closed: store.closed_through(QOS_FRONTIER)?.unwrap_or(i64::MIN),
            store,
            partials,
            global,
            parts: BTreeMap::new(),
            emitted: Vec::new(),
            progress: BTreeMap::new(),
            early_interval: (qos.emit == EmitPolicy::Early).then_some(qos.early_interval),
            last_early: Instant::now(),
            changed: BTreeSet::new(),
            qoe: qos.qoe.then(|| Sessions {
                timeout: qos.session_timeout.as_millis() as i64,
                horizon: BTreeMap::new(),
                parts: BTreeMap::new(),
                expired: Vec::new(),
            }),
        })
    }

    /// Writes partition `partition`'s aggregate of each window in `windows` to the partials
    /// topic.
    fn send_partials<'w>(
        &self,
        ctx: &Context<'_>,
        partition: i32,
        windows: impl Iterator<Item = (i64, &'w WindowPartial)>,
    ) -> Result<u64, PipelineError> {
        let mut sent = 0;
        for (start, partial) in windows {
            for (slot, groups) in partial.groups.iter().enumerate() {
                for (group, agg) in groups {
                    let record = PartialRecord::Partial {
                        start,
                        slot: slot as u8,
                        group: group.to_string(),
                        source: partition,
                        agg: Some(Box::new(agg.clone())),
                    };
                    let to = partition_of(start, slot as u8, group, self.partials.partitions);
                    let (key, value) = record.encode();
                    ctx.sink
                        .send_raw(&self.partials.topic, &key, value.as_deref(), to, None)?;
                    sent += 1;
                }
            }
        }
        Ok(sent)
    }

    /// Decides the session facts that the windows closing at `watermark` need, adds them to
    /// their windows, and drops sessions idle past the timeout.
    fn decide_sessions(&mut self, watermark: i64) {
        let Some(qoe) = &mut self.qoe else {
            return;
        };
        let horizon = Sessions::horizon(&self.spec, watermark);
        let (spec, dims) = (&self.spec, &self.dimensions);
        let early = self.early_interval.is_some();
        for (&p, sessions) in qoe.parts.iter_mut() {
            let Some(windows) = self.parts.get_mut(&p) else {
                continue;
            };
            let decided = qoe.horizon.entry(p).or_insert(i64::MIN);
            if horizon <= *decided {
                continue;
            }
            *decided = horizon;
            let closed = self.closed.get(&p).copied().unwrap_or(i64::MIN);
            let changed = &mut self.changed;
            let timeout = qoe.timeout;
            let expired = &mut qoe.expired;
            sessions.retain(|id, (session, dirty)| {
                if !session.settled() {
                    *dirty = true;
                    session.decide(horizon, spec.advance, &mut |t, d, f| {
                        if early {
                            changed.extend(spec.starts(t));
                        }
                        windows.add_fact(spec, dims, closed, (t, d, f))
                    });
                }
                let keep =
                    !session.settled() || session.last_time.saturating_add(timeout) >= horizon;
                if !keep {
                    expired.push((p, id.clone()));
                }
                keep
            });
        }
        let open: usize = qoe.parts.values().map(FxHashMap::len).sum();
        metrics::sessions_open(open);
    }
}

impl Operator for QosWindows {
    fn name(&self) -> &'static str {
        "qos"
    }

    fn assign(
        &mut self,
        partition: i32,
        _checkpoint: Option<&PartitionMeta>,
    ) -> Result<(), PipelineError> {
        let windows = self.store.load_windows(partition)?;
        let closed = self
            .store
            .partition_frontier(QOS_FRONTIER, partition)?
            .unwrap_or(self.legacy_closed);
        self.closed.insert(partition, closed);
        self.written.insert(partition, closed);
        tracing::debug!(
            partition,
            open_windows = windows.windows.len(),
            "QoS windows restored"
        );
        self.parts.insert(partition, windows);
        if let Some(qoe) = &mut self.qoe {
            let sessions = self.store.load_sessions(partition)?;
            // Facts before the emitted frontier were decided before the checkpoint.
            let restored = Sessions::horizon(&self.spec, closed);
            qoe.horizon.insert(partition, restored);
            let map = sessions
                .into_iter()
                .map(|(id, s)| (id.into_boxed_str(), (s, false)))
                .collect();
            qoe.parts.insert(partition, map);
        }
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.parts.remove(&partition);
        self.progress.remove(&partition);
        self.closed.remove(&partition);
        self.written.remove(&partition);
        if let Some(qoe) = &mut self.qoe {
            qoe.parts.remove(&partition);
            qoe.horizon.remove(&partition);
        }
    }

    fn on_record(
        &mut self,
        _ctx: &Context<'_>,
        record: &Record<'_>,
    ) -> Result<Handled, PipelineError> {
        let start = self.spec.first_start(record.event.event_time);
        let partition = record.origin.partition;
        let closed = self.closed.get(&partition).copied().unwrap_or(i64::MIN);
        let watermark = record.watermark.max(closed);
        if self.spec.is_closed(start, watermark) {
            return Ok(Handled::Late {
                window_start: start,
                watermark,
            });
        }
        if let Some(windows) = self.parts.get_mut(&partition) {
            let event = record.event;
            windows.add(&self.spec, &self.dimensions, event);
            if self.early_interval.is_some() {
                self.changed.extend(self.spec.starts(event.event_time));
            }
            if let Some(qoe) = &mut self.qoe {
                let (spec, dims) = (&self.spec, &self.dimensions);
                qoe.observe(partition, event, &mut |t, d, f| {
                    windows.add_fact(spec, dims, closed, (t, d, f))
                });
            }
        }
        Ok(Handled::Applied)
    }

    /// Closes every window closed at operator watermark `watermark` (or the global one, when
    /// further), writes each partition's aggregate of it, then the partitions' progress.
    fn on_watermark(&mut self, ctx: &Context<'_>, watermark: i64) -> Result<(), PipelineError> {
        // The global watermark only counts once every owned partition is quiet: until then the
        // owned partitions' own watermark is the bound (and a replay after a crash must not
        // close at a global watermark that its own earlier progress raised).
        let quiet = ctx.partitions.iter().all(|m| m.idle);
        let watermark = if quiet {
            watermark.max(self.global.load(Ordering::Acquire))
        } else {
            watermark
        };
        self.decide_sessions(watermark);
        let mut closed = Vec::new();
        for (&p, windows) in self.parts.iter_mut() {
            for (start, partial) in windows.take_closed(&self.spec, watermark) {
                closed.push((p, start, partial));
            }
            let frontier = self.closed.entry(p).or_insert(i64::MIN);
            *frontier = (*frontier).max(watermark);
        }
        let open: usize = self.parts.values().map(|w| w.windows.len()).sum();
        metrics::windows_open(open);
        for (p, start, partial) in &closed {
            self.changed.remove(start);
            self.send_partials(ctx, *p, std::iter::once((*start, partial)))?;
            self.emitted.push((*p, *start));
        }
        send_progress(
            ctx,
            &self.partials,
            &self.closed,
            &mut self.progress,
            |source, watermark, idle, closed_through| PartialRecord::Progress {
                source,
                watermark,
                idle,
                closed_through,
            },
        )
    }

    /// With the `early` policy, writes not-final results of the open windows that changed.
    fn on_tick(&mut self, ctx: &Context<'_>) -> Result<(), PipelineError> {
        let Some(interval) = self.early_interval else {
            return Ok(());
        };
        if ctx.now.saturating_duration_since(self.last_early) < interval {
            return Ok(());
        }
        self.last_early = ctx.now;
        for (&p, windows) in &self.parts {
            let changed = self
                .changed
                .iter()
                .filter_map(|start| Some((*start, windows.windows.get(start)?)));
            self.send_partials(ctx, p, changed)?;
        }
        self.changed.clear();
        Ok(())
    }

    fn stage(&mut self, batch: &mut Batch) -> Result<(), PipelineError> {
        for (p, start) in self.emitted.drain(..) {
            self.store.stage_window_delete(batch, p, start)?;
        }
        for (&p, windows) in self.parts.iter_mut() {
            self.store.stage_windows(batch, p, windows);
        }
        if let Some(qoe) = &mut self.qoe {
            let mut buf = Vec::new();
            for (p, id) in qoe.expired.drain(..) {
                self.store.stage_session(batch, p, &id, None, &mut buf);
            }
            for (&p, sessions) in qoe.parts.iter_mut() {
                for (id, (session, dirty)) in sessions.iter_mut().filter(|(_, (_, d))| *d) {
                    self.store
                        .stage_session(batch, p, id, Some(session), &mut buf);
                    *dirty = false;
                }
            }
        }
        for (&p, &closed) in self.closed.iter().filter(|(_, c)| **c != i64::MIN) {
            if self.written.insert(p, closed) != Some(closed) {
                self.store
                    .stage_partition_frontier(batch, QOS_FRONTIER, p, closed);
            }
        }
        Ok(())
    }
}
