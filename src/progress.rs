//! Progress of long work (a restore, a backfill): how much is done, the share, the rate and
//! the time left, as one line every [`REPORT_EVERY`].

use std::time::{Duration, Instant};

/// How often a line is due.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Tracks one piece of long work.
pub struct Progress {
    /// What is being done and to what, e.g. "restoring partitions [0, 3]".
    what: String,
    /// The unit counted, e.g. "changelog records".
    unit: &'static str,
    /// How much there is in all, when known.
    total: Option<u64>,
    started: Instant,
    last: Instant,
}

impl Progress {
    /// Starts counting `unit`s of `what`, `total` of them when known.
    pub fn new(what: impl Into<String>, unit: &'static str, total: Option<u64>) -> Self {
        let now = Instant::now();
        Self {
            what: what.into(),
            unit,
            total,
            started: now,
            last: now,
        }
    }

    /// A line when one is due (every [`REPORT_EVERY`]), with `done` so far.
    pub fn due(&mut self, done: u64) -> Option<String> {
        (self.last.elapsed() >= REPORT_EVERY).then(|| {
            self.last = Instant::now();
            self.line(done)
        })
    }

    /// The line for `done` so far: "what: done of about total unit (P%), R/s, about T left".
    pub fn line(&self, done: u64) -> String {
        self.line_after(done, self.started.elapsed())
    }

    fn line_after(&self, done: u64, took: Duration) -> String {
        let took = took.as_secs_f64().max(0.001);
        let rate = done as f64 / took;
        let Some(total) = self.total else {
            return format!("{}: {done} {}, {rate:.0}/s", self.what, self.unit);
        };
        let left = total.saturating_sub(done) as f64;
        let eta = Duration::from_secs((left / rate.max(1.0)).ceil() as u64);
        let percent = if total > 0 {
            (100.0 * done as f64 / total as f64).min(100.0)
        } else {
            100.0
        };
        format!(
            "{}: {done} of about {total} {} ({percent:.0}%), {rate:.0}/s, about {} left",
            self.what,
            self.unit,
            humantime::format_duration(eta)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_the_share_the_rate_and_the_time_left() {
        let mut p = Progress::new("restoring partitions [1]", "changelog records", Some(1000));
        let line = p.line_after(250, Duration::from_secs(10));
        assert!(
            line.starts_with(
                "restoring partitions [1]: 250 of about 1000 changelog records (25%), "
            ),
            "{line}"
        );
        assert!(line.ends_with("about 30s left"), "{line}");
        let open = Progress::new("sending", "events", None).line(5);
        assert!(open.starts_with("sending: 5 events, "), "{open}");
        p.last = Instant::now() - REPORT_EVERY;
        assert!(p.due(300).is_some(), "a line is due after 2 s");
        assert!(p.due(300).is_none(), "and then not again at once");
    }
}
