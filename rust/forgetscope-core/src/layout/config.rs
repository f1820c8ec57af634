//! The parts of a Hugging Face `config.json` that decide how tensors split into heads, experts and
//! routers (METRICS.md §1.4, §4.1).
//!
//! Multimodal checkpoints (Llama 4) nest the language model's settings under `text_config`; those
//! are used when present. Every field is optional here: the resolver checks the fields it needs
//! against the tensor shapes and degrades (with a warning) when they are missing or disagree.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Largest `config.json` read; real ones are a few KB, multimodal ones tens of KB.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// DeepSeek-V2/V3 multi-head latent attention sizes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MlaConfig {
    /// `q_lora_rank` (None: queries use a plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// `kv_lora_rank`.
    pub kv_lora_rank: usize,
    /// `qk_nope_head_dim`.
    pub qk_nope_head_dim: usize,
    /// `qk_rope_head_dim`.
    pub qk_rope_head_dim: usize,
    /// `v_head_dim`.
    pub v_head_dim: usize,
}

/// Model settings used by the structure resolver.
#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    /// Where it was read from (None when built in memory).
    pub path: Option<PathBuf>,
    /// `model_type` of the language model (`text_config.model_type` for multimodal checkpoints).
    pub model_type: String,
    /// Top-level `model_type` (differs from `model_type` for multimodal wrappers).
    pub outer_model_type: String,
    /// `architectures`.
    pub architectures: Vec<String>,
    /// `hidden_size`.
    pub hidden: Option<usize>,
    /// `num_hidden_layers`.
    pub n_layers: Option<usize>,
    /// `num_attention_heads`.
    pub n_heads: Option<usize>,
    /// `num_key_value_heads` (defaults to `num_attention_heads`).
    pub n_kv_heads: Option<usize>,
    /// `head_dim` when given explicitly (Qwen3, GPT-OSS, Llama 4).
    pub head_dim: Option<usize>,
    /// MLA sizes (DeepSeek-V2/V3).
    pub mla: Option<MlaConfig>,
    /// Routed experts (`num_local_experts`, `num_experts`, `n_routed_experts`).
    pub n_experts: Option<usize>,
    /// `num_experts_per_tok`.
    pub top_k: Option<usize>,
    /// The language model's own settings (the whole file, or its `text_config`).
    pub text: Value,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|x| usize::try_from(x).ok())
}

impl ModelConfig {
    /// Read and parse `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let err = |reason: String| Error::ModelConfig {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(err(format!(
                "{} bytes is larger than any real config ({} bytes at most)",
                meta.len(),
                MAX_CONFIG_BYTES
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let mut cfg = Self::from_value(&value).map_err(err)?;
        cfg.path = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parse an already-loaded config (the error is the reason only; callers add the path).
    pub fn from_value(value: &Value) -> std::result::Result<ModelConfig, String> {
        if !value.is_object() {
            return Err("the top level is not a JSON object".into());
        }
        let outer_model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let text = match value.get("text_config") {
            Some(t) if t.is_object() => t.clone(),
            _ => value.clone(),
        };
        let model_type = text
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or(&outer_model_type)
            .to_string();
        let architectures = value
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let n_heads = get_usize(&text, "num_attention_heads");
        let mla = match get_usize(&text, "kv_lora_rank") {
            Some(kv_lora_rank) => Some(MlaConfig {
                q_lora_rank: get_usize(&text, "q_lora_rank"),
                kv_lora_rank,
                qk_nope_head_dim: get_usize(&text, "qk_nope_head_dim")
                    .ok_or("kv_lora_rank is set but qk_nope_head_dim is missing")?,
                qk_rope_head_dim: get_usize(&text, "qk_rope_head_dim")
                    .ok_or("kv_lora_rank is set but qk_rope_head_dim is missing")?,
                v_head_dim: get_usize(&text, "v_head_dim")
                    .ok_or("kv_lora_rank is set but v_head_dim is missing")?,
            }),
            None => None,
        };
        let n_experts = ["num_local_experts", "num_experts", "n_routed_experts"]
            .iter()
            .find_map(|k| get_usize(&text, k));
        Ok(ModelConfig {
            path: None,
            model_type,
            outer_model_type,
            architectures,
            hidden: get_usize(&text, "hidden_size"),
            n_layers: get_usize(&text, "num_hidden_layers"),
            n_heads,
            n_kv_heads: get_usize(&text, "num_key_value_heads").or(n_heads),
            head_dim: get_usize(&text, "head_dim"),
            mla,
            n_experts,
            top_k: get_usize(&text, "num_experts_per_tok"),
            text,
        })
    }

    /// Head dimension: `head_dim` if given, else hidden / heads (METRICS.md §1.4).
    pub fn head_dim(&self) -> Option<usize> {
        self.head_dim.or_else(|| match (self.hidden, self.n_heads) {
            (Some(h), Some(n)) if n > 0 && h % n == 0 => Some(h / n),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_text_config_wins() {
        let v: Value = serde_json::json!({
            "model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": {"model_type": "llama4_text", "hidden_size": 64, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 4,
                            "num_local_experts": 4, "num_experts_per_tok": 1}
        });
        let c = ModelConfig::from_value(&v).unwrap();
        assert_eq!(c.model_type, "llama4_text");
        assert_eq!(c.outer_model_type, "llama4");
        assert_eq!(
            (c.hidden, c.n_heads, c.n_kv_heads, c.head_dim()),
            (Some(64), Some(4), Some(2), Some(16))
        );
        assert_eq!(c.n_experts, Some(4));
    }

    #[test]
    fn mla_needs_its_sizes() {
        let v = serde_json::json!({"model_type": "deepseek_v3", "kv_lora_rank": 16});
        assert!(ModelConfig::from_value(&v)
            .unwrap_err()
            .contains("qk_nope_head_dim"));
        assert!(ModelConfig::from_value(&serde_json::json!([1])).is_err());
    }

    #[test]
    fn kv_heads_default_to_heads() {
        let v =
            serde_json::json!({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4});
        let c = ModelConfig::from_value(&v).unwrap();
        assert_eq!((c.n_kv_heads, c.head_dim()), (Some(4), Some(8)));
    }
}
