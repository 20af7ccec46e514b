//! HTTP at the side of the pipeline: `/metrics` (Prometheus), `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

/// Liveness and readiness of one instance, shared by the pipeline and the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    /// Input records processed so far (drives the throughput benchmark's stop condition).
    processed: AtomicU64,
    failure: Mutex<Option<String>>,
}

impl Health {
    /// Marks the instance ready (state restored, consuming) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
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
        self.set_ready(false);
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
}

/// Binds `addr` (port 0 picks a free port) and serves `/metrics`, `/healthz` and `/readyz`.
pub fn start(
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    health: Arc<Health>,
) -> std::io::Result<BackgroundServer> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { prometheus, health });
    let server = BackgroundServer::spawn(std::net::TcpListener::bind(addr)?, app)?;
    tracing::info!(addr = %server.addr(), "serving /metrics, /healthz and /readyz");
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
    if state.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: restoring state or not consuming\n",
        )
    }
}
