//! Schema registries: the Confluent REST client used in production, an in-memory one for unit
//! tests and benches, and an embedded HTTP registry (the Confluent subset Marquee uses) for the
//! demo and integration tests, where no registry server can be installed.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::RegistryError;
#[cfg(feature = "runtime")]
pub use served::{EmbeddedRegistry, HttpRegistry};

/// Looks up writer schemas by id and registers the schemas Marquee writes.
///
/// Calls block; they are made from the pipeline thread (never from inside an async task).
pub trait SchemaRegistry: Send + Sync {
    /// The schema text registered under `id`.
    fn schema_by_id(&self, id: u32) -> Result<String, RegistryError>;
    /// Registers `schema` under `subject` (idempotent) and returns its id.
    fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError>;
}

/// Schemas by id and subject, in memory.
#[derive(Default)]
pub struct MemoryRegistry {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    schemas: Vec<String>,
    subjects: HashMap<String, Vec<u32>>,
}

impl SchemaRegistry for MemoryRegistry {
    fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        id.checked_sub(1)
            .and_then(|i| inner.schemas.get(i as usize))
            .cloned()
            .ok_or_else(|| RegistryError::NotFound {
                id,
                url: "memory".into(),
                message: "no such id".into(),
            })
    }

    fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Ids start at 1 and identical schema text shares one id, as in Confluent's registry.
        let id = match inner.schemas.iter().position(|s| s == schema) {
            Some(i) => i as u32 + 1,
            None => {
                inner.schemas.push(schema.to_string());
                inner.schemas.len() as u32
            }
        };
        let versions = inner.subjects.entry(subject.to_string()).or_default();
        if !versions.contains(&id) {
            versions.push(id);
        }
        Ok(id)
    }
}

/// The registries that need the runtime: a REST client and an embedded HTTP server.
#[cfg(feature = "runtime")]
mod served {
    use std::sync::Arc;

    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use schema_registry_converter::async_impl::schema_registry::{
        get_schema_by_id, post_schema, SrSettings,
    };
    use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
    use serde_json::json;

    use super::{MemoryRegistry, SchemaRegistry};
    use crate::error::RegistryError;
    use crate::serve::http::BackgroundServer;

    /// A Confluent-API registry (Confluent, Redpanda, Karapace, Apicurio) over HTTP.
    pub struct HttpRegistry {
        settings: SrSettings,
        url: String,
        runtime: tokio::runtime::Runtime,
    }

    impl HttpRegistry {
        /// A client for the registry at `url`, e.g. `http://localhost:8081`.
        pub fn new(url: &str) -> Result<Self, RegistryError> {
            let unavailable = |message: String| RegistryError::Unavailable {
                url: url.to_string(),
                message,
            };
            // Its own small runtime, so blocking callers never need to be inside (or outside) ours.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| unavailable(e.to_string()))?;
            let settings = SrSettings::new_builder(url.trim_end_matches('/').to_string())
                .set_timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| unavailable(e.to_string()))?;
            Ok(Self {
                settings,
                url: url.to_string(),
                runtime,
            })
        }
    }

    impl SchemaRegistry for HttpRegistry {
        fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
            match self.runtime.block_on(get_schema_by_id(id, &self.settings)) {
                Ok(schema) => Ok(schema.schema),
                // The converter reports a 404 as a non-retryable error, an outage as retryable.
                Err(e) if !e.retriable => Err(RegistryError::NotFound {
                    id,
                    url: self.url.clone(),
                    message: e.to_string(),
                }),
                Err(e) => Err(RegistryError::Unavailable {
                    url: self.url.clone(),
                    message: e.to_string(),
                }),
            }
        }

        fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
            let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
            self.runtime
                .block_on(post_schema(&self.settings, subject.to_string(), supplied))
                .map(|registered| registered.id)
                .map_err(|e| RegistryError::Unavailable {
                    url: self.url.clone(),
                    message: format!("registering subject {subject}: {e}"),
                })
        }
    }

    /// A Confluent-compatible registry (the REST subset Marquee uses) served on loopback from a
    /// background thread, for the demo and tests.
    pub struct EmbeddedRegistry {
        server: BackgroundServer,
    }

    impl EmbeddedRegistry {
        /// Starts serving on `127.0.0.1` at a free port.
        pub fn start() -> std::io::Result<Self> {
            let app = Router::new()
                .route("/subjects/{subject}/versions", post(register))
                .route("/schemas/ids/{id}", get(by_id))
                .with_state(Arc::new(MemoryRegistry::default()));
            let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            Ok(Self {
                server: BackgroundServer::spawn(listener, app)?,
            })
        }

        /// Base URL, e.g. `http://127.0.0.1:40123`.
        pub fn url(&self) -> String {
            format!("http://{}", self.server.addr())
        }
    }

    #[derive(serde::Deserialize)]
    struct RegisterBody {
        schema: String,
    }

    async fn register(
        State(registry): State<Arc<MemoryRegistry>>,
        Path(subject): Path<String>,
        Json(body): Json<RegisterBody>,
    ) -> Response {
        if let Err(e) = apache_avro::Schema::parse_str(&body.schema) {
            let body = json!({"error_code": 42201, "message": format!("Invalid schema: {e}")});
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
        }
        match registry.register(&subject, &body.schema) {
            Ok(id) => Json(json!({ "id": id })).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    }

    async fn by_id(State(registry): State<Arc<MemoryRegistry>>, Path(id): Path<u32>) -> Response {
        match registry.schema_by_id(id) {
            Ok(schema) => Json(json!({ "schema": schema })).into_response(),
            Err(_) => {
                let body = json!({"error_code": 40403, "message": "Schema not found"});
                (StatusCode::NOT_FOUND, Json(body)).into_response()
            }
        }
    }
}
