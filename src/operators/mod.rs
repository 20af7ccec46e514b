//! The operators the runtime drives: each owns its state, its update rule, what it emits and
//! when (see [`crate::runtime::Operator`]).

pub mod dau;
pub mod partials;
pub mod qos;
pub mod repartition;
pub mod table;
