//! The live dashboard in a real browser (headless Chromium) against an instance on Apache
//! Kafka: the numbers on the page equal the newest results in the output topic and
//! `/metrics`, and they follow new windows as they close.

mod common;

use std::process::Command;
use std::time::Duration;

use common::kafka::kafka;
use common::qos::{dataset, dataset_from, expected, read_outputs, topology_toml, Feeder};
use common::{http_get, metric_sum, unique, Running};
use marquee::record::QosWindow;

/// The page as Chromium renders it after `frames` updates from the stream.
fn rendered(http: &str, frames: u32) -> String {
    let url = format!("http://{http}/dashboard?frames={frames}");
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        // Virtual time waits while the stream is open, then lets the page settle.
        .args(["--virtual-time-budget=10000", &url])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "headless Chromium is needed for the dashboard test ({e}): install Debian's \
                 chromium package (sudo apt-get install --no-install-recommends chromium), as \
                 scripts/test.sh does"
            )
        });
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An attribute of the element with `id` in `dom`.
fn attribute(dom: &str, id: &str, name: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let tag = &dom[at..at + dom[at..].find('>').unwrap()];
    let start = tag
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("#{id} has no {name}: {tag}"))
        + name.len()
        + 2;
    tag[start..start + tag[start..].find('"').unwrap()].to_string()
}

fn shown(dom: &str, id: &str) -> f64 {
    let value = attribute(dom, id, "data-value");
    value
        .parse()
        .unwrap_or_else(|_| panic!("#{id} shows {value:?}"))
}

/// The newest window's overall result in the output topic.
fn newest_overall(results: &[common::Consumed]) -> QosWindow {
    common::qos::results_by_key(results)
        .into_values()
        .filter(|w| w.dimension == "all")
        .max_by_key(|w| w.window_start)
        .expect("overall results")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

#[test]
fn the_dashboard_shows_the_newest_results_and_follows_new_windows() {
    let brokers = kafka().addr.clone();
    let input = unique("dashboard");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let toml = topology_toml(&input, &dir.path().join("state"))
        + &format!("[dau]\ntopic = \"{input}-dau\"\ninterval = \"1s\"\ngrace = \"5s\"\n");
    let topology =
        marquee::config::Topology::parse(&toml, std::path::Path::new("dashboard.toml")).unwrap();
    let http = format!("127.0.0.1:{}", common::free_port());
    let running = Running::start(&topology, &brokers, Some(http.parse().unwrap()));
    let feeder = Feeder::new(&brokers, &input);
    let first = dataset(113, 4_000);
    let start = first.iter().map(|(_, e)| e.event_time).max().unwrap() + 3_600_000;
    let second = dataset_from(127, 4_000, start);
    let mut sent: Vec<_> = Vec::new();
    let mut previous_window = i64::MIN;
    for batch in [first, second] {
        for (i, (p, e)) in batch.iter().enumerate() {
            feeder.event(*p, e, sent.len() + i);
        }
        feeder.flush();
        sent.extend(batch);
        let (results, _) = read_outputs(
            &brokers,
            &topology,
            &expected(&sent),
            Duration::from_secs(120),
        );
        let newest = newest_overall(&results);
        assert!(
            newest.window_start > previous_window,
            "a newer window closed"
        );
        previous_window = newest.window_start;
        // The gauges follow the newest results; then the page must show what they say.
        let metric = |name: &str| {
            let (_, page) = http_get(&http, "/metrics");
            metric_sum(&page, name, "dimension=\"all\",value=\"all\"")
        };
        common::wait_for(
            "the gauges on the newest window",
            Duration::from_secs(30),
            || {
                (metric("marquee_qos_concurrent_viewers") == newest.concurrent_viewers as f64)
                    .then_some(())
            },
        );
        let dom = rendered(&http, 3);
        assert_eq!(
            shown(&dom, "viewers"),
            newest.concurrent_viewers as f64,
            "the page shows the newest window's viewers"
        );
        let ratio = newest.rebuffer_ratio.unwrap_or(0.0);
        assert!(
            close(shown(&dom, "rebuffer"), ratio),
            "rebuffer ratio {} on the page, {ratio} in the topic",
            shown(&dom, "rebuffer")
        );
        assert!(close(
            shown(&dom, "dau-accounts"),
            metric("marquee_daily_active_accounts")
        ));
        assert_eq!(attribute(&dom, "ready", "data-value"), "true");
        assert!(shown(&dom, "lag") >= 0.0);
        // Three updates, three points: the charts draw what the stream sends.
        assert_eq!(attribute(&dom, "chart-viewers", "data-points"), "3");
    }
    let (status, page) = http_get(&http, "/dashboard");
    assert_eq!(status, 200);
    assert!(
        page.contains("<title>Marquee"),
        "the page is served from the binary"
    );
    running.stop();
}
