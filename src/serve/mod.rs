//! The HTTP side: `/metrics`, `/healthz`, `/readyz` and the table queries, and the parsing of
//! query requests.

#[cfg(feature = "runtime")]
pub mod http;
pub mod query;
