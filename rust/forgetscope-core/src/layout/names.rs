//! Layer, expert and module kind from a Hugging Face-style tensor name.
//!
//! `model.layers.3.self_attn.q_proj.weight` → layer 3, kind `attention`, component `q_proj`.
//! Layer containers recognised: `layers`, `layer`, `h`, `blocks`, `block` followed by an integer
//! (Llama/Qwen/Mixtral/DeepSeek/GPT-OSS/Llama 4, BERT, GPT-2, ...).

/// What a tensor name says about its place in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameInfo {
    /// Transformer block index, if the name has one.
    pub layer: Option<u32>,
    /// Expert index for per-expert tensors (`experts.{e}.`).
    pub expert: Option<u32>,
    /// Coarse kind: embedding, lm_head, attention, mlp, expert, shared_expert, router, norm, other.
    pub kind: &'static str,
    /// The module's own name (`q_proj`, `down_proj`, `w1`, `gate`, `input_layernorm`, ...).
    pub component: String,
}

const LAYER_CONTAINERS: [&str; 5] = ["layers", "layer", "h", "blocks", "block"];
const PARAM_SUFFIXES: [&str; 6] = [
    "weight",
    "bias",
    "e_score_correction_bias",
    "sinks",
    "scale",
    "g",
];

/// Parse a tensor name.
pub fn parse_name(name: &str) -> NameInfo {
    let parts: Vec<&str> = name.split('.').collect();
    let mut layer = None;
    let mut expert = None;
    for w in parts.windows(2) {
        if layer.is_none() && LAYER_CONTAINERS.contains(&w[0]) {
            layer = w[1].parse::<u32>().ok();
        }
        if w[0] == "experts" {
            expert = w[1].parse::<u32>().ok();
        }
    }
    // The component is the last part that is neither a parameter name nor a number.
    let mut comp_parts: &[&str] = &parts;
    if let Some((last, rest)) = parts.split_last() {
        if PARAM_SUFFIXES.contains(last) {
            comp_parts = rest;
        }
    }
    let component = comp_parts
        .iter()
        .rev()
        .find(|p| p.parse::<u64>().is_err())
        .map(|p| p.to_string())
        .unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    let has = |s: &str| parts.contains(&s);
    let comp = component.as_str();
    let kind =
        if lower.contains("embed") || comp == "wte" || comp == "wpe" || comp == "word_embeddings" {
            "embedding"
        } else if comp == "lm_head" || comp == "output" && layer.is_none() {
            "lm_head"
        } else if comp.contains("norm") || comp.starts_with("ln") {
            "norm"
        } else if has("shared_expert") || has("shared_experts") {
            if comp == "shared_expert_gate" {
                "router"
            } else {
                "shared_expert"
            }
        } else if comp == "shared_expert_gate"
            || comp == "router"
            || (comp == "gate" && (has("mlp") || has("block_sparse_moe") || has("feed_forward")))
        {
            "router"
        } else if has("experts") {
            "expert"
        } else if has("self_attn")
            || has("attn")
            || has("attention")
            || comp.ends_with("_proj")
                && (comp.starts_with('q')
                    || comp.starts_with('k')
                    || comp.starts_with("o_")
                    || comp.starts_with("v_"))
        {
            "attention"
        } else if has("mlp")
            || has("feed_forward")
            || has("ffn")
            || has("block_sparse_moe")
            || has("intermediate")
        {
            "mlp"
        } else {
            "other"
        };
    NameInfo {
        layer,
        expert,
        kind,
        component,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: &str) -> (Option<u32>, Option<u32>, &'static str, String) {
        let i = parse_name(n);
        (i.layer, i.expert, i.kind, i.component)
    }

    #[test]
    fn families() {
        assert_eq!(
            k("model.layers.3.self_attn.q_proj.weight"),
            (Some(3), None, "attention", "q_proj".into())
        );
        assert_eq!(
            k("model.layers.1.block_sparse_moe.experts.7.w2.weight"),
            (Some(1), Some(7), "expert", "w2".into())
        );
        assert_eq!(
            k("model.layers.1.block_sparse_moe.gate.weight"),
            (Some(1), None, "router", "gate".into())
        );
        assert_eq!(
            k("model.layers.2.mlp.gate.e_score_correction_bias"),
            (Some(2), None, "router", "gate".into())
        );
        assert_eq!(
            k("model.layers.0.mlp.gate_proj.weight"),
            (Some(0), None, "mlp", "gate_proj".into())
        );
        assert_eq!(
            k("model.layers.4.mlp.shared_experts.down_proj.weight"),
            (Some(4), None, "shared_expert", "down_proj".into())
        );
        assert_eq!(
            k("model.layers.4.mlp.shared_expert_gate.weight"),
            (Some(4), None, "router", "shared_expert_gate".into())
        );
        assert_eq!(
            k("model.layers.0.mlp.experts.gate_up_proj_blocks"),
            (Some(0), None, "expert", "gate_up_proj_blocks".into())
        );
        assert_eq!(
            k("model.layers.0.mlp.experts.gate_up_proj"),
            (Some(0), None, "expert", "gate_up_proj".into())
        );
        assert_eq!(
            k("model.layers.0.mlp.router.weight"),
            (Some(0), None, "router", "router".into())
        );
        assert_eq!(
            k("model.embed_tokens.weight"),
            (None, None, "embedding", "embed_tokens".into())
        );
        assert_eq!(
            k("lm_head.weight"),
            (None, None, "lm_head", "lm_head".into())
        );
        assert_eq!(k("model.norm.weight"), (None, None, "norm", "norm".into()));
        assert_eq!(
            k("model.layers.0.input_layernorm.weight"),
            (Some(0), None, "norm", "input_layernorm".into())
        );
        assert_eq!(k("encoder.layer.5.attention.self.query.weight").0, Some(5));
        assert_eq!(
            k("encoder.layer.5.attention.self.query.weight").2,
            "attention"
        );
    }
}
