//! The live dashboard at `/dashboard`: one page, embedded in the binary (no build step, no
//! external assets), fed by server-sent events from `/dashboard/stream`. Each event is a
//! snapshot of what this instance's metrics say: the newest window's QoS and QoE overall and
//! per CDN, country and device type, today's DAU, and Marquee's own health. The page keeps
//! the history it has seen and draws it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::serve::exposition::Samples;

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");

/// Dimensions shown per value (the gauge dimensions Marquee publishes by default).
const DIMENSIONS: [&str; 3] = ["cdn", "country", "device_type"];

/// What the dashboard shows, from a `/metrics` page; `ready` is the instance's readiness.
pub fn snapshot(page: &str, ready: bool, now_ms: i64) -> Value {
    let m = Samples::parse(page);
    let overall = |name: &str| {
        m.matching(name, &[("dimension", "all"), ("value", "all")])
            .next()
    };
    let startup = |quantile: &str| {
        m.matching(
            "marquee_qos_startup_ms",
            &[
                ("dimension", "all"),
                ("value", "all"),
                ("quantile", quantile),
            ],
        )
        .next()
    };
    let mut by = serde_json::Map::new();
    for dimension in DIMENSIONS {
        let of = |name: &str| m.by_label(name, &[("dimension", dimension)], "value");
        let (viewers, rebuffer) = (
            of("marquee_qos_concurrent_viewers"),
            of("marquee_qos_rebuffer_ratio"),
        );
        let values: BTreeMap<&String, Value> = viewers
            .keys()
            .chain(rebuffer.keys())
            .map(|v| {
                (
                    v,
                    json!({ "viewers": viewers.get(v), "rebuffer_ratio": rebuffer.get(v) }),
                )
            })
            .collect();
        by.insert(dimension.to_string(), json!(values));
    }
    // Idle partitions are left out: their watermark waits for records by design.
    let idle: Vec<&[(String, String)]> = m
        .series("marquee_partition_idle")
        .filter(|(_, v)| *v > 0.0)
        .map(|(labels, _)| labels)
        .collect();
    let watermark_lag = m
        .series("marquee_watermark_lag_seconds")
        .filter(|(labels, _)| !idle.contains(labels))
        .map(|(_, v)| v)
        .reduce(f64::max);
    json!({
        "time_ms": now_ms,
        "ready": ready,
        "qos": {
            "viewers": overall("marquee_qos_concurrent_viewers"),
            "rebuffer_ratio": overall("marquee_qos_rebuffer_ratio"),
            "attempts": overall("marquee_qos_attempts"),
            "start_failures": overall("marquee_qos_video_start_failures"),
            "exits_before_start": overall("marquee_qos_exits_before_video_start"),
            "avg_bitrate_kbps": overall("marquee_qos_avg_bitrate_kbps"),
            "startup_ms": { "p50": startup("0.5"), "p90": startup("0.9"), "p99": startup("0.99") },
            "by": by,
        },
        "dau": {
            "accounts": overall("marquee_daily_active_accounts"),
            "profiles": overall("marquee_daily_active_profiles"),
        },
        "health": {
            "consumer_lag": m.total("marquee_consumer_lag_records"),
            "watermark_lag_seconds": watermark_lag,
            "records_consumed": m.total("marquee_records_consumed_total"),
            "late_records": m.total("marquee_records_late_total"),
            "dead_lettered_records": m.total("marquee_records_dead_lettered_total"),
            "restore_remaining": m.total("marquee_restore_remaining_records"),
            "windows_closed": m.total("marquee_windows_closed_total"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_carries_the_newest_window_and_the_health() {
        let page = "\
marquee_qos_concurrent_viewers{dimension=\"all\",value=\"all\"} 120
marquee_qos_rebuffer_ratio{dimension=\"all\",value=\"all\"} 0.02
marquee_qos_concurrent_viewers{dimension=\"cdn\",value=\"akamai\"} 70
marquee_qos_rebuffer_ratio{dimension=\"cdn\",value=\"akamai\"} 0.01
marquee_qos_startup_ms{dimension=\"all\",value=\"all\",quantile=\"0.9\"} 1800
marquee_daily_active_accounts{dimension=\"all\",value=\"all\"} 42
marquee_consumer_lag_records{topic=\"plays\",partition=\"0\"} 5
marquee_consumer_lag_records{topic=\"plays\",partition=\"1\"} 7
marquee_watermark_lag_seconds{topic=\"plays\",partition=\"0\"} 3
marquee_watermark_lag_seconds{topic=\"plays\",partition=\"1\"} 900
marquee_partition_idle{topic=\"plays\",partition=\"1\"} 1
marquee_records_late_total{topic=\"plays\",partition=\"0\"} 4
";
        let s = snapshot(page, true, 1000);
        assert_eq!(s["qos"]["viewers"], 120.0);
        assert_eq!(s["qos"]["rebuffer_ratio"], 0.02);
        assert_eq!(s["qos"]["startup_ms"]["p90"], 1800.0);
        assert_eq!(s["qos"]["startup_ms"]["p50"], Value::Null);
        assert_eq!(s["qos"]["by"]["cdn"]["akamai"]["viewers"], 70.0);
        assert_eq!(s["dau"]["accounts"], 42.0);
        assert_eq!(s["health"]["consumer_lag"], 12.0);
        assert_eq!(
            s["health"]["watermark_lag_seconds"], 3.0,
            "the idle partition is left out"
        );
        assert_eq!(s["health"]["late_records"], 4.0);
        assert_eq!(s["ready"], true);
    }
}
