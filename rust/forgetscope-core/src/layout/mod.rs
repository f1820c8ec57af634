//! Structure from tensor names and `config.json`: [`parse_name`] reads layer / expert / coarse
//! kind from a name alone; [`resolve`] adds the model's geometry (heads, kv heads, MLA, experts,
//! fused expert orientation, routers) for the supported families.

mod config;
mod names;
mod structure;

pub use config::{MlaConfig, ModelConfig};
pub use names::{parse_name, NameInfo};
pub use structure::{
    fused_orientation, is_fused_expert_weight, resolve, Attention, Family, FusedLayout, Module,
    Structure, TensorDesc, TensorRole, SUPPORTED_FAMILIES,
};
