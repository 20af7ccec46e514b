//! QoS windows: per window (tumbling or hopping) and group, concurrent viewers, play and
//! rebuffer time, rebuffer events and ratio; one final result per window and group once the
//! operator watermark passes its end plus grace, and with the `early` policy an updated,
//! not-final result every `early_interval` of wall clock for each window that changed. A
//! record whose window its partition's watermark (or an emitted window) has passed is late: it
//! changes nothing, and the runtime writes it unchanged to the late topic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::Batch;
use rustc_hash::FxHashMap;

use crate::config::{Dimension, EmitPolicy, QosConfig};
use crate::error::PipelineError;
use crate::io::sink::Output;
use crate::metrics;
use crate::record::{PlaybackEvent, QosWindow};
use crate::runtime::{Context, Handled, Operator, Record};
use crate::session::{Dims, Fact, Session};
use crate::state::PartitionMeta;
use crate::state::{Store, QOS_FRONTIER};
use crate::window::{slot, slot_name, PartitionWindows, WindowPartial, WindowSpec};

/// Called with every final result as it is emitted (the demo prints them).
pub type ResultHook = Box<dyn FnMut(&QosWindow) + Send>;

/// The QoS window operator.
pub struct QosWindows {
    spec: WindowSpec,
    dimensions: Vec<Dimension>,
    gauge_slots: Vec<u8>,
    store: Arc<Store>,
    results: Output,
    /// Open windows per owned input partition.
    parts: BTreeMap<i32, PartitionWindows>,
    /// Highest operator watermark at which windows were closed: anything at or below is final.
    closed_through: i64,
    /// Emitted windows whose state is deleted at the next checkpoint.
    emitted: Vec<(i32, i64)>,
    on_result: Option<ResultHook>,
    /// Gauges of the newest window with results.
    gauges: metrics::LastWindowGauges,
    /// Start of the window the gauges show: an older window's results never replace them.
    gauge_window: i64,
    /// The `early` policy's interval; `None` for `final`.
    early_interval: Option<Duration>,
    /// When early results were last written.
    last_early: Instant,
    /// Open windows changed since early results were last written.
    changed: BTreeSet<i64>,
    /// The session lifecycle behind the QoE fields, when `qos.qoe` is on.
    qoe: Option<Sessions>,
}

/// Every owned session, by partition, with the horizon their facts are decided through.
struct Sessions {
    timeout: i64,
    /// Facts before this event time are decided.
    horizon: i64,
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
    /// The operator of `qos`, writing results to `results`.
    pub fn new(qos: &QosConfig, store: Arc<Store>, results: Output) -> Result<Self, PipelineError> {
        Ok(Self {
            spec: WindowSpec::new(qos.window, qos.advance.unwrap_or(qos.window), qos.grace),
            dimensions: qos.dimensions.clone(),
            gauge_slots: qos.gauge_dimensions.iter().map(|d| slot(*d)).collect(),
            closed_through: store.closed_through(QOS_FRONTIER)?.unwrap_or(i64::MIN),
            store,
            results,
            parts: BTreeMap::new(),
            emitted: Vec::new(),
            on_result: None,
            gauges: metrics::LastWindowGauges::default(),
            gauge_window: i64::MIN,
            early_interval: (qos.emit == EmitPolicy::Early).then_some(qos.early_interval),
            last_early: Instant::now(),
            changed: BTreeSet::new(),
            qoe: qos.qoe.then(|| Sessions {
                timeout: qos.session_timeout.as_millis() as i64,
                horizon: i64::MIN,
                parts: BTreeMap::new(),
                expired: Vec::new(),
            }),
        })
    }

    /// Calls `hook` with every final result as it is emitted.
    pub fn on_result(mut self, hook: Option<ResultHook>) -> Self {
        self.on_result = hook;
        self
    }

    fn gauge_slot(&self, dimension: &str) -> bool {
        dimension == "all" || self.gauge_slots.iter().any(|&s| slot_name(s) == dimension)
    }

    /// Sends the results of each window in `windows` (merged over partitions), and points
    /// the gauges at the newest one unless they already show a newer window.
    fn emit(
        &mut self,
        ctx: &Context<'_>,
        windows: &BTreeMap<i64, WindowPartial>,
        is_final: bool,
    ) -> Result<u64, PipelineError> {
        let mut emitted = 0;
        let newest = windows.keys().next_back().copied();
        let mut gauges = Vec::new();
        for (start, partial) in windows {
            for result in partial.results(&self.spec, *start, is_final, self.qoe.is_some()) {
                ctx.sink
                    .send_result(&self.results, &result.key(), &result, None, &[])?;
                emitted += 1;
                if let Some(hook) = self.on_result.as_mut().filter(|_| is_final) {
                    hook(&result);
                }
                if Some(*start) == newest && self.gauge_slot(&result.dimension) {
                    gauges.push(result);
                }
            }
        }
        if let Some(start) = newest.filter(|s| *s >= self.gauge_window) {
            self.gauge_window = start;
            self.gauges.publish(&gauges);
        }
        Ok(emitted)
    }

    /// Decides the session facts that the windows closing at `watermark` need, adds them to
    /// their windows, and drops sessions idle past the timeout.
    fn decide_sessions(&mut self, watermark: i64) {
        let Some(qoe) = &mut self.qoe else {
            return;
        };
        let horizon = Sessions::horizon(&self.spec, watermark);
        if horizon <= qoe.horizon {
            return;
        }
        qoe.horizon = horizon;
        let (spec, dims, closed) = (&self.spec, &self.dimensions, self.closed_through);
        let early = self.early_interval.is_some();
        for (&p, sessions) in qoe.parts.iter_mut() {
            let Some(windows) = self.parts.get_mut(&p) else {
                continue;
            };
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
        tracing::debug!(
            partition,
            open_windows = windows.windows.len(),
            "QoS windows restored"
        );
        self.parts.insert(partition, windows);
        if let Some(qoe) = &mut self.qoe {
            let sessions = self.store.load_sessions(partition)?;
            // Facts before the emitted frontier were decided before the checkpoint.
            let restored = Sessions::horizon(&self.spec, self.closed_through);
            qoe.horizon = qoe.horizon.max(restored);
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
        if let Some(qoe) = &mut self.qoe {
            qoe.parts.remove(&partition);
        }
    }

    fn on_record(
        &mut self,
        _ctx: &Context<'_>,
        record: &Record<'_>,
    ) -> Result<Handled, PipelineError> {
        let start = self.spec.first_start(record.event.event_time);
        let watermark = record.watermark.max(self.closed_through);
        if self.spec.is_closed(start, watermark) {
            return Ok(Handled::Late {
                window_start: start,
                watermark,
            });
        }
        let partition = record.origin.partition;
        if let Some(windows) = self.parts.get_mut(&partition) {
            let event = record.event;
            windows.add(&self.spec, &self.dimensions, event);
            if self.early_interval.is_some() {
                self.changed.extend(self.spec.starts(event.event_time));
            }
            if let Some(qoe) = &mut self.qoe {
                let (spec, dims, closed) = (&self.spec, &self.dimensions, self.closed_through);
                qoe.observe(partition, event, &mut |t, d, f| {
                    windows.add_fact(spec, dims, closed, (t, d, f))
                });
            }
        }
        Ok(Handled::Applied)
    }

    /// Merges and emits every window closed at operator watermark `watermark`.
    fn on_watermark(&mut self, ctx: &Context<'_>, watermark: i64) -> Result<(), PipelineError> {
        self.decide_sessions(watermark);
        let mut closed: BTreeMap<i64, WindowPartial> = BTreeMap::new();
        for (&p, windows) in self.parts.iter_mut() {
            for (start, partial) in windows.take_closed(&self.spec, watermark) {
                closed.entry(start).or_default().merge(&partial);
                self.emitted.push((p, start));
            }
        }
        self.closed_through = self.closed_through.max(watermark);
        let open: usize = self.parts.values().map(|w| w.windows.len()).sum();
        metrics::windows_open(open);
        if closed.is_empty() {
            return Ok(());
        }
        for start in closed.keys() {
            self.changed.remove(start);
        }
        let emitted = self.emit(ctx, &closed, true)?;
        metrics::windows_closed(closed.len() as u64);
        metrics::results_emitted(emitted);
        Ok(())
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
        let mut open: BTreeMap<i64, WindowPartial> = BTreeMap::new();
        for windows in self.parts.values() {
            for start in &self.changed {
                if let Some(partial) = windows.windows.get(start) {
                    open.entry(*start).or_default().merge(partial);
                }
            }
        }
        self.changed.clear();
        let emitted = self.emit(ctx, &open, false)?;
        metrics::early_results_emitted(emitted);
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
        if self.closed_through != i64::MIN {
            self.store
                .stage_closed_through(batch, QOS_FRONTIER, self.closed_through);
        }
        Ok(())
    }
}
