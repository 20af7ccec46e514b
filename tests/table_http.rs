//! The table query API over real HTTP on a real RocksDB store, without a broker: rows,
//! single entries, malformed requests and partitions this instance does not own.

mod common;

use std::sync::Arc;

use common::http_get;
use marquee::record::ResumePosition;
use marquee::resume::TableView;
use marquee::serve::http::Health;
use marquee::state::{Store, StoredEntry};
use marquee::table::Entry;

fn entry(profile: &str, title: &str, updated_at: i64, position_ms: i64) -> StoredEntry {
    let progress = position_ms as f64 / 1_000.0;
    StoredEntry {
        entry: Entry {
            position: ResumePosition {
                profile_id: profile.into(),
                title_id: title.into(),
                position_ms,
                duration_ms: Some(1_000),
                progress: Some(progress),
                completed: progress >= 0.95,
                updated_at,
                device_type: "tv".into(),
            },
            event_id: format!("{title}-{updated_at}"),
        },
        pending: false,
    }
}

/// Serves the table queries of `view` on a free port.
fn serve(view: Arc<TableView>) -> (marquee::serve::http::BackgroundServer, String) {
    let server = marquee::serve::http::start(
        "127.0.0.1:0".parse().unwrap(),
        marquee::metrics::install(),
        Arc::new(Health::default()),
        Some(view),
    )
    .unwrap();
    let addr = server.addr().to_string();
    (server, addr)
}

#[test]
fn queries_answer_for_owned_partitions_and_redirect_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 8, 8).unwrap());
    let view = Arc::new(TableView::new(Arc::clone(&store), 2));
    // Two profiles in different partitions; only the first partition is owned.
    let mine = (0..)
        .map(|i| format!("p{i}"))
        .find(|p| view.partition_of(p) == 0)
        .unwrap();
    let theirs = (0..)
        .map(|i| format!("p{i}"))
        .find(|p| view.partition_of(p) == 1)
        .unwrap();
    view.set_owned_for_bench(0);
    let mut batch = marquee::state::Batch::default();
    for stored in [
        entry(&mine, "a", 100, 100),
        entry(&mine, "b", 300, 500),
        entry(&mine, "c", 200, 990), // completed: not in the row
        entry(&mine, "d", 50, 10),
    ] {
        store.stage_table_put(&mut batch, 0, &stored).unwrap();
    }
    store.commit(batch).unwrap();
    let (_server, addr) = serve(view);

    let (status, body) = http_get(
        &addr,
        &format!("/profiles/{mine}/continue-watching?limit=2"),
    );
    assert_eq!(status, 200);
    let row: Vec<ResumePosition> = serde_json::from_str(&body).unwrap();
    let titles: Vec<_> = row.iter().map(|p| p.title_id.as_str()).collect();
    assert_eq!(titles, ["b", "a"], "unfinished, newest first, limited");

    let (status, body) = http_get(&addr, &format!("/profiles/{mine}/titles/c"));
    assert_eq!(status, 200);
    assert!(
        serde_json::from_str::<ResumePosition>(&body)
            .unwrap()
            .completed
    );
    assert_eq!(
        http_get(&addr, &format!("/profiles/{mine}/titles/zzz")).0,
        404
    );

    let long = "p".repeat(257);
    for path in [
        "limit=0",
        "limit=-3",
        "limit=abc",
        "limit=5000",
        "lmit=2",
        "limit=1&limit=2",
    ]
    .map(|q| format!("/profiles/{mine}/continue-watching?{q}"))
    .into_iter()
    .chain([
        format!("/profiles/{long}/continue-watching"),
        format!("/profiles/{mine}/titles/{long}"),
    ]) {
        let (status, body) = http_get(&addr, &path);
        assert_eq!(status, 400, "{path}");
        assert!(body.contains("error"), "{path}: {body}");
    }

    let (status, body) = http_get(&addr, &format!("/profiles/{theirs}/continue-watching"));
    assert_eq!(status, 421, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["partition"], 1);
    assert_eq!(body["partitions"], 2);

    let unknown = (0..)
        .map(|i| format!("nobody{i}"))
        .find(|p| marquee::tools::gen::partition_for(p, 2) == 0)
        .unwrap();
    let (status, body) = http_get(&addr, &format!("/profiles/{unknown}/continue-watching"));
    assert_eq!(
        (status, body.as_str()),
        (200, "[]"),
        "an unknown profile has an empty row"
    );
}

/// 64 clients query a profile with 10,000 titles at once: the reads run off the HTTP reactor,
/// so `/healthz` and `/metrics` keep answering; queries beyond the cap get 503, never a hang.
#[test]
fn heavy_queries_do_not_stall_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 8, 8).unwrap());
    let view = Arc::new(TableView::new(Arc::clone(&store), 1));
    view.set_owned_for_bench(0);
    let mut batch = marquee::state::Batch::default();
    for t in 0..10_000 {
        store
            .stage_table_put(&mut batch, 0, &entry("binge", &format!("t{t}"), t, 100))
            .unwrap();
    }
    store.commit(batch).unwrap();
    let (_server, addr) = serve(view);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (addr, stop) = (addr.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    statuses.push(http_get(&addr, "/profiles/binge/continue-watching?limit=5").0);
                }
                statuses
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut latencies = Vec::new();
    for path in ["/healthz", "/metrics"].repeat(50) {
        let started = std::time::Instant::now();
        let (status, _) = http_get(&addr, path);
        latencies.push(started.elapsed());
        assert!(
            status == 200 || (path == "/healthz" && status == 503),
            "{path}: {status}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses: Vec<u16> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "queries are answered");
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    eprintln!(
        "/healthz and /metrics under 64 concurrent heavy queries: p99 {p99:?}, {} queries answered",
        statuses.len()
    );
    // A blocked reactor queues them behind every query (seconds); the bound is 50 ms.
    assert!(p99 < std::time::Duration::from_millis(50), "p99 {p99:?}");
}
