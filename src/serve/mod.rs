//! The HTTP side: `/metrics`, `/healthz`, `/readyz`, the live dashboard and the table
//! queries, the parsing of query requests, and reading metrics pages back.

#[cfg(feature = "runtime")]
pub mod dashboard;
pub mod exposition;
#[cfg(feature = "runtime")]
pub mod http;
pub mod query;
