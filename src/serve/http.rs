//! HTTP at the side of the pipeline: `/metrics` (Prometheus), `/healthz`, `/readyz`, the live
//! dashboard (`/dashboard`, fed by `/dashboard/stream`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::collections::BTreeMap;
use std::time::Instant;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::record::ResumePosition;
use crate::resume::TableView;
use crate::serve::query::{check_id, parse_row_query, RowQuery};

/// Liveness and readiness of one instance, shared by the operators and the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    /// Readiness per operator: the instance is ready once every declared operator is.
    operators: Mutex<BTreeMap<&'static str, bool>>,
    /// Input records processed so far (drives the throughput benchmark's stop condition).
    processed: AtomicU64,
    failure: Mutex<Option<String>>,
    /// What each operator that is not ready is doing (a restore's progress).
    progress: Mutex<BTreeMap<&'static str, String>>,
}

impl Health {
    /// Declares `operator`: the instance is not ready until it is.
    pub fn expect(&self, operator: &'static str) {
        self.lock_operators().entry(operator).or_insert(false);
    }

    /// Marks `operator` ready (state restored, consuming) or not.
    pub fn set_ready(&self, operator: &'static str, ready: bool) {
        self.lock_operators().insert(operator, ready);
    }

    /// Records what `operator` is doing while it is not ready (`None`: nothing to report).
    pub fn set_progress(&self, operator: &'static str, progress: Option<String>) {
        let mut map = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match progress {
            Some(line) => map.insert(operator, line),
            None => map.remove(operator),
        };
    }

    /// The progress lines of operators that are not ready, one per line.
    fn progress(&self) -> String {
        let map = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(op, line)| format!("{op}: {line}\n"))
            .collect()
    }

    /// Every declared operator is ready and nothing has failed.
    pub fn is_ready(&self) -> bool {
        let operators = self.lock_operators();
        !operators.is_empty() && operators.values().all(|r| *r) && self.failure().is_none()
    }

    fn lock_operators(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        self.operators.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `n` processed input records.
    pub fn add_processed(&self, n: u64) {
        self.processed.fetch_add(n, Ordering::Relaxed);
    }

    /// Input records processed so far.
    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Records why the pipeline stopped; `/healthz` then fails.
    pub fn fail(&self, reason: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Clone)]
struct AppState {
    prometheus: PrometheusHandle,
    health: Arc<Health>,
    /// Caps the dashboard streams open at once (each renders the metrics every second).
    streams: Arc<tokio::sync::Semaphore>,
}

/// Dashboard streams served at once; more get 503.
const MAX_STREAMS: usize = 32;

/// Binds `addr` (port 0 picks a free port) and serves `/metrics`, `/healthz`, `/readyz` and,
/// with a `table`, the resume-position queries.
pub fn start(
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    health: Arc<Health>,
    table: Option<Arc<TableView>>,
) -> std::io::Result<BackgroundServer> {
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/dashboard", get(dashboard_page))
        .route("/dashboard/stream", get(dashboard_stream))
        .with_state(AppState {
            prometheus,
            health,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        });
    if let Some(table) = table {
        app = app.merge(
            Router::new()
                .route(
                    "/profiles/{profile_id}/continue-watching",
                    get(continue_watching),
                )
                .route(
                    "/profiles/{profile_id}/titles/{title_id}",
                    get(title_position),
                )
                .with_state(table),
        );
    }
    let server = BackgroundServer::spawn(std::net::TcpListener::bind(addr)?, app)?;
    tracing::info!(
        addr = %server.addr(),
        dashboard = %format!("http://{}/dashboard", server.addr()),
        "serving /metrics, /healthz, /readyz and the dashboard"
    );
    Ok(server)
}

/// An axum app served from its own thread (so the pipeline thread never blocks it) until dropped.
pub struct BackgroundServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundServer {
    /// Serves `app` on an already bound `listener`.
    pub fn spawn(listener: std::net::TcpListener, app: Router) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("http-{addr}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let serve = async {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        axum::serve(listener, app)
                            .with_graceful_shutdown(async {
                                let _ = rx.await;
                            })
                            .await
                    };
                    if let Err(e) = serve.await {
                        tracing::error!(%addr, error = %e, "HTTP server failed");
                    }
                })
            })?;
        Ok(Self {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
}

async fn dashboard_page() -> impl IntoResponse {
    (
        [("content-type", "text/html; charset=utf-8")],
        crate::serve::dashboard::PAGE,
    )
}

/// A snapshot of the metrics every second as server-sent events, while the client listens.
async fn dashboard_stream(State(state): State<AppState>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let Ok(permit) = Arc::clone(&state.streams).try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} dashboard streams are open already\n"),
        )
            .into_response();
    };
    let stream =
        futures_util::stream::unfold((state, permit, true), |(state, permit, first)| async move {
            if !first {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            let snapshot = crate::serve::dashboard::snapshot(
                &state.prometheus.render(),
                state.health.is_ready(),
                crate::runtime::wall_clock_ms(),
            );
            let event = Event::default()
                .event("snapshot")
                .data(snapshot.to_string());
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (state, permit, false),
            ))
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.health.failure() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("pipeline stopped: {reason}\n"),
        ),
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: restoring state or not consuming\n{}",
                state.health.progress()
            ),
        )
    }
}

/// Queries read at once (about the cores of a small machine, so the reads never starve the
/// reactor that serves `/healthz` and `/metrics`); more get 503 rather than queue unbounded.
pub const MAX_CONCURRENT_QUERIES: usize = 4;
/// Longest a query may take before it gets 503.
const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// 421 with the partition, so a router in front of several instances can forward the query.
fn not_owned(table: &TableView, profile: &str) -> Option<Response> {
    let partition = table.partition_of(profile);
    (!table.owns(partition)).then(|| {
        let body = json!({
            "error": format!("profile {profile} is in table partition {partition}, which this instance does not own"),
            "partition": partition,
            "partitions": table.partitions,
        });
        (StatusCode::MISDIRECTED_REQUEST, Json(body)).into_response()
    })
}

/// Runs a RocksDB read on the blocking pool, so `/healthz` and `/metrics` keep answering while
/// queries run; at most `MAX_CONCURRENT_QUERIES` at once and `QUERY_TIMEOUT` each, 503 beyond.
async fn off_the_reactor<T: Send + 'static>(
    table: &TableView,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    let busy = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("more than {MAX_CONCURRENT_QUERIES} queries at once or one slower than {QUERY_TIMEOUT:?}; retry"),
        )
    };
    let Ok(_permit) = table.queries.try_acquire() else {
        return Err(busy());
    };
    match tokio::time::timeout(QUERY_TIMEOUT, tokio::task::spawn_blocking(read)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(_) => Err(busy()),
    }
}

async fn continue_watching(
    State(table): State<Arc<TableView>>,
    Path(profile): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let started = Instant::now();
    let parsed = check_id("profile_id", &profile).and_then(|()| parse_row_query(raw.as_deref()));
    let limit = match parsed {
        Ok(RowQuery { limit }) => limit,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(response) = not_owned(&table, &profile) {
        return response;
    }
    let read = {
        let (table, profile) = (Arc::clone(&table), profile.clone());
        move || {
            table
                .store
                .table_recent(table.partition_of(&profile), &profile, limit)
        }
    };
    let response = match off_the_reactor(&table, read).await {
        Err(response) => response,
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Ok(Ok(entries)) => {
            let row: Vec<ResumePosition> = entries.into_iter().map(|s| s.entry.position).collect();
            Json(row).into_response()
        }
    };
    crate::metrics::query("continue_watching", started.elapsed());
    response
}

async fn title_position(
    State(table): State<Arc<TableView>>,
    Path((profile, title)): Path<(String, String)>,
) -> Response {
    let started = Instant::now();
    if let Err(e) = check_id("profile_id", &profile).and_then(|()| check_id("title_id", &title)) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    if let Some(response) = not_owned(&table, &profile) {
        return response;
    }
    let read = {
        let (table, profile, title) = (Arc::clone(&table), profile.clone(), title.clone());
        move || {
            table
                .store
                .table_get(table.partition_of(&profile), &profile, &title)
        }
    };
    let response = match off_the_reactor(&table, read).await {
        Err(response) => response,
        Ok(Ok(Some(stored))) => Json(stored.entry.position).into_response(),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            format!("no position for profile {profile} and title {title}"),
        ),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    crate::metrics::query("title", started.elapsed());
    response
}
