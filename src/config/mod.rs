//! The YAML policy (DESIGN section 4): plain serde types, defaults in one
//! place, and validation that reports every problem with its location.
//! This module knows nothing about sockets, SQL rewriting or keys.

mod load;
mod types;
mod upstream;

pub use load::{load_policy, parse_policy, split_table_name, ConfigError, ConfigProblem};
pub use types::*;
pub use upstream::{UpstreamAddr, UpstreamAddrError};
