//! Structure from tensor names. This version parses names only (layer index, expert index, module
//! kind); the config-driven resolver for heads, experts and routers builds on it.

mod names;

pub use names::{parse_name, NameInfo};
