//! Structure resolver: `config.json` + tensor names and shapes → what every tensor is (layer,
//! attention part, expert slice, router), and the model's geometry (heads, kv heads, experts, which
//! layers are MoE). Names and layouts follow METRICS.md §1.4, §3.1 and §4.1; they were checked
//! against what transformers 5.x writes with `save_pretrained` (`tests/data/structure/*.json`).
//!
//! Supported families: Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3
//! (MLA), OLMoE, Llama 4 (text and multimodal prefixes), GPT-OSS. Anything else resolves to
//! [`Family::Unknown`]: every tensor keeps its per-tensor metrics and the structure-level metrics are
//! switched off with a warning that says why — never an error.
//!
//! Fused expert tensors (`experts.gate_up_proj` [E, ·, ·], `experts.down_proj`) come in two
//! orientations: rows = torch `Linear` layout per expert ([E, out, in]: MXFP4 GPT-OSS on disk,
//! transformers' in-memory Mixtral/Qwen) and transposed ([E, in, out]: Llama 4 and bf16 GPT-OSS on
//! disk). GPT-OSS interleaves gate and up along the `out` axis (gate = even, up = odd); everyone else
//! concatenates (gate = first half). The orientation is read from the shape (which axis equals
//! `hidden_size`), and only when both axes equal it from the family's convention.

use std::collections::BTreeSet;

use serde::Serialize;

use super::config::{MlaConfig, ModelConfig};

/// Model family, as far as the structure goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Llama 2/3 and look-alikes.
    Llama,
    /// Mistral.
    Mistral,
    /// Qwen2 / Qwen2.5 (q/k/v biases).
    Qwen2,
    /// Qwen3 (explicit head_dim, q/k norms).
    Qwen3,
    /// Mixtral.
    Mixtral,
    /// Qwen2-MoE (shared expert with a sigmoid gate).
    Qwen2Moe,
    /// Qwen3-MoE.
    Qwen3Moe,
    /// DeepSeek-V2 (MLA).
    DeepseekV2,
    /// DeepSeek-V3 (MLA, sigmoid router with a correction bias).
    DeepseekV3,
    /// OLMoE.
    Olmoe,
    /// Llama 4 (text or multimodal).
    Llama4,
    /// GPT-OSS.
    GptOss,
    /// Not recognised: per-tensor analysis only.
    Unknown,
}

impl Family {
    fn from_model_type(t: &str) -> Family {
        match t {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            "deepseek_v2" => Family::DeepseekV2,
            "deepseek_v3" => Family::DeepseekV3,
            "olmoe" => Family::Olmoe,
            "llama4" | "llama4_text" => Family::Llama4,
            "gpt_oss" => Family::GptOss,
            _ => Family::Unknown,
        }
    }

    /// snake_case name (as in results).
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::Olmoe => "olmoe",
            Family::Llama4 => "llama4",
            Family::GptOss => "gpt_oss",
            Family::Unknown => "unknown",
        }
    }

    /// Families whose router is a softmax over logits (row-shift invariant, METRICS §4.2).
    pub fn softmax_router(self) -> bool {
        !matches!(self, Family::DeepseekV3 | Family::Llama4 | Family::Unknown)
    }

    fn mla(self) -> bool {
        matches!(self, Family::DeepseekV2 | Family::DeepseekV3)
    }

    fn fused_transposed_default(self) -> bool {
        matches!(self, Family::Llama4 | Family::GptOss)
    }
}

/// Families the resolver understands (for messages).
pub const SUPPORTED_FAMILIES: &str =
    "llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, \
deepseek_v2, deepseek_v3, olmoe, llama4, gpt_oss";

/// What a tensor is, inside its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    /// Token embeddings.
    Embedding,
    /// Output projection.
    LmHead,
    /// Final norm (outside the layers).
    FinalNorm,
    /// A layer norm inside a block.
    Norm,
    /// Query projection (MLA without q_lora_rank: the whole `q_proj`).
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Output projection of attention.
    O,
    /// MLA `q_a_proj` (shared).
    QA,
    /// MLA `q_b_proj`.
    QB,
    /// MLA `kv_a_proj_with_mqa` (shared).
    KvA,
    /// MLA `kv_b_proj`.
    KvB,
    /// q/k norms and MLA low-rank norms.
    AttnNorm,
    /// GPT-OSS attention sinks [H].
    Sinks,
    /// Dense MLP gate.
    MlpGate,
    /// Dense MLP up.
    MlpUp,
    /// Dense MLP down.
    MlpDown,
    /// Per-expert gate (`w1`).
    ExpertGate,
    /// Per-expert up (`w3`).
    ExpertUp,
    /// Per-expert down (`w2`).
    ExpertDown,
    /// Fused `experts.gate_up_proj` [E, ·, ·].
    ExpertsGateUp,
    /// Fused `experts.down_proj` [E, ·, ·].
    ExpertsDown,
    /// Shared expert gate projection.
    SharedGate,
    /// Shared expert up projection.
    SharedUp,
    /// Shared expert down projection.
    SharedDown,
    /// Qwen2-MoE `shared_expert_gate` [1, H].
    SharedExpertGate,
    /// Router weight [E, H].
    Router,
    /// Router bias [E] (GPT-OSS).
    RouterBias,
    /// DeepSeek-V3 `e_score_correction_bias` [E].
    ScoreCorrectionBias,
    /// Anything else (including vision towers of multimodal checkpoints).
    Other,
}

impl Module {
    /// Part of attention (projections, MLA parts, q/k norms, sinks).
    pub fn is_attention(self) -> bool {
        matches!(
            self,
            Module::Q
                | Module::K
                | Module::V
                | Module::O
                | Module::QA
                | Module::QB
                | Module::KvA
                | Module::KvB
                | Module::AttnNorm
                | Module::Sinks
        )
    }

    /// snake_case name (as in results).
    pub fn name(self) -> &'static str {
        match self {
            Module::Embedding => "embedding",
            Module::LmHead => "lm_head",
            Module::FinalNorm => "final_norm",
            Module::Norm => "norm",
            Module::Q => "q",
            Module::K => "k",
            Module::V => "v",
            Module::O => "o",
            Module::QA => "q_a",
            Module::QB => "q_b",
            Module::KvA => "kv_a",
            Module::KvB => "kv_b",
            Module::AttnNorm => "attn_norm",
            Module::Sinks => "sinks",
            Module::MlpGate => "mlp_gate",
            Module::MlpUp => "mlp_up",
            Module::MlpDown => "mlp_down",
            Module::ExpertGate => "expert_gate",
            Module::ExpertUp => "expert_up",
            Module::ExpertDown => "expert_down",
            Module::ExpertsGateUp => "experts_gate_up",
            Module::ExpertsDown => "experts_down",
            Module::SharedGate => "shared_gate",
            Module::SharedUp => "shared_up",
            Module::SharedDown => "shared_down",
            Module::SharedExpertGate => "shared_expert_gate",
            Module::Router => "router",
            Module::RouterBias => "router_bias",
            Module::ScoreCorrectionBias => "score_correction_bias",
            Module::Other => "other",
        }
    }
}

/// Orientation of a fused expert tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FusedLayout {
    /// `[E, in, out]` instead of `[E, out, in]`.
    pub transposed: bool,
    /// gate/up interleaved along `out` (GPT-OSS) instead of concatenated halves.
    pub interleaved: bool,
}

/// The resolved role of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TensorRole {
    /// Layer, for tensors inside a block of the language model.
    pub layer: Option<u32>,
    /// Expert, for per-expert tensors.
    pub expert: Option<u32>,
    /// What it is.
    pub module: Module,
    /// A bias (of the module) rather than its weight.
    pub bias: bool,
    /// Orientation, for fused expert tensors.
    pub fused: Option<FusedLayout>,
}

/// One tensor as the resolver sees it.
#[derive(Debug, Clone)]
pub struct TensorDesc<'a> {
    /// Name as stored (MXFP4: the logical stem).
    pub name: &'a str,
    /// Logical shape.
    pub shape: &'a [u64],
    /// Stored as MXFP4 blocks (GPT-OSS originals keep the `[E, out, in]` orientation).
    pub mxfp4: bool,
}

/// Attention geometry that the per-head metrics use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Attention {
    /// Multi-head / grouped-query attention.
    Gqa {
        /// Query heads.
        n_heads: usize,
        /// Key/value heads.
        n_kv_heads: usize,
        /// Head dimension.
        head_dim: usize,
    },
    /// DeepSeek multi-head latent attention.
    Mla {
        /// Query heads.
        n_heads: usize,
        /// Sizes.
        mla: MlaConfig,
    },
    /// Heads cannot be split (unknown family or missing config).
    None,
}

/// The resolved model.
#[derive(Debug, Clone, Serialize)]
pub struct Structure {
    /// Family.
    pub family: Family,
    /// `model_type` from the config ("" without one).
    pub model_type: String,
    /// Prefix before `layers.{l}.` for the language model (e.g. `model.`).
    pub prefix: String,
    /// Layers seen in the tensor names.
    pub n_layers: usize,
    /// `hidden_size`.
    pub hidden: Option<usize>,
    /// Attention geometry.
    pub attention: Attention,
    /// Routed experts per MoE layer.
    pub n_experts: Option<usize>,
    /// Experts per token.
    pub top_k: Option<usize>,
    /// Layers with a router.
    pub moe_layers: Vec<u32>,
    /// Layers with a shared expert.
    pub shared_expert_layers: Vec<u32>,
    /// One role per input tensor, in input order.
    #[serde(skip)]
    pub roles: Vec<TensorRole>,
    /// Why some structure-level metrics are off, or anything else surprising.
    pub warnings: Vec<String>,
}

impl Structure {
    /// Whether per-head, expert and router metrics can run.
    pub fn is_known(&self) -> bool {
        self.family != Family::Unknown
    }
}

/// Split `name` into (prefix, layer, rest) around the first `layers.{l}.`.
fn split_layer(name: &str) -> Option<(&str, u32, &str)> {
    let mut search = 0;
    while let Some(pos) = name[search..].find("layers.") {
        let at = search + pos;
        let boundary = at == 0 || name.as_bytes()[at - 1] == b'.';
        let after = &name[at + 7..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if boundary && digits > 0 && after.as_bytes().get(digits) == Some(&b'.') {
            if let Ok(l) = after[..digits].parse::<u32>() {
                return Some((&name[..at], l, &after[digits + 1..]));
            }
        }
        search = at + 7;
    }
    None
}

fn attention_module(comp: &str) -> Module {
    match comp {
        "q_proj" => Module::Q,
        "k_proj" => Module::K,
        "v_proj" => Module::V,
        "o_proj" => Module::O,
        "q_a_proj" => Module::QA,
        "q_b_proj" => Module::QB,
        "kv_a_proj_with_mqa" => Module::KvA,
        "kv_b_proj" => Module::KvB,
        c if c.contains("norm") => Module::AttnNorm,
        _ => Module::Other,
    }
}

fn proj_module(comp: &str, gate: Module, up: Module, down: Module) -> Module {
    match comp {
        "gate_proj" | "w1" => gate,
        "up_proj" | "w3" => up,
        "down_proj" | "w2" => down,
        _ => Module::Other,
    }
}

/// Role of the part of a name after `layers.{l}.`.
fn layer_role(rest: &str) -> (Module, Option<u32>, bool) {
    let parts: Vec<&str> = rest.split('.').collect();
    let (last, body) = parts.split_last().expect("split gives at least one part");
    let bias = *last == "bias";
    let first = parts[0];
    if matches!(first, "self_attn" | "attention" | "attn") {
        if *last == "sinks" && body.len() == 1 {
            return (Module::Sinks, None, false);
        }
        return (
            attention_module(body.last().copied().unwrap_or("")),
            None,
            bias,
        );
    }
    if matches!(first, "mlp" | "feed_forward" | "block_sparse_moe") {
        let sub = &parts[1..];
        match sub {
            ["experts", e, comp, _param] if e.parse::<u32>().is_ok() => {
                let m = proj_module(
                    comp,
                    Module::ExpertGate,
                    Module::ExpertUp,
                    Module::ExpertDown,
                );
                return (m, e.parse().ok(), bias);
            }
            ["experts", fused] => {
                let (stem, is_bias) = match fused.strip_suffix("_bias") {
                    Some(s) => (s, true),
                    None => (*fused, false),
                };
                let m = match stem {
                    "gate_up_proj" => Module::ExpertsGateUp,
                    "down_proj" => Module::ExpertsDown,
                    _ => Module::Other,
                };
                return (m, None, is_bias);
            }
            ["shared_expert" | "shared_experts", comp, _param] => {
                return (
                    proj_module(
                        comp,
                        Module::SharedGate,
                        Module::SharedUp,
                        Module::SharedDown,
                    ),
                    None,
                    bias,
                );
            }
            ["shared_expert_gate", _param] => return (Module::SharedExpertGate, None, bias),
            ["gate", "weight"] | ["router", "weight"] => return (Module::Router, None, false),
            ["router", "bias"] | ["gate", "bias"] => return (Module::RouterBias, None, true),
            ["gate", "e_score_correction_bias"] => {
                return (Module::ScoreCorrectionBias, None, true)
            }
            [comp, _param] => {
                return (
                    proj_module(comp, Module::MlpGate, Module::MlpUp, Module::MlpDown),
                    None,
                    bias,
                )
            }
            _ => return (Module::Other, None, bias),
        }
    }
    if body.len() == 1 && body[0].contains("norm") {
        return (Module::Norm, None, bias);
    }
    (Module::Other, None, bias)
}

fn top_level_role(name: &str) -> Module {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| *p == "embed_tokens" || *p == "wte") {
        Module::Embedding
    } else if parts.contains(&"lm_head") {
        Module::LmHead
    } else if parts.len() >= 2 && parts[parts.len() - 2] == "norm" {
        Module::FinalNorm
    } else {
        Module::Other
    }
}

/// Whether `name` is the weight of a fused expert tensor (`…layers.N.mlp.experts.gate_up_proj` or
/// `…down_proj`), whatever the prefix: such tensors may be stored transposed in one checkpoint and
/// not in another (MXFP4 GPT-OSS originals vs their bf16 transformers re-saves).
pub fn is_fused_expert_weight(name: &str) -> bool {
    match split_layer(name) {
        Some((_, _, rest)) => matches!(
            layer_role(rest),
            (Module::ExpertsGateUp | Module::ExpertsDown, None, false)
        ),
        None => false,
    }
}

/// Orientation of a fused expert weight as stored in one checkpoint (None for other tensors): read
/// from the shape where `hidden_size` tells, else from the storage (MXFP4 originals are
/// `[E, out, in]`) and the family's convention.
pub fn fused_orientation(config: Option<&ModelConfig>, t: &TensorDesc<'_>) -> Option<FusedLayout> {
    let (_, _, rest) = split_layer(t.name)?;
    let (module, _, bias) = layer_role(rest);
    if bias || !matches!(module, Module::ExpertsGateUp | Module::ExpertsDown) {
        return None;
    }
    let family = config.map_or(Family::Unknown, |c| Family::from_model_type(&c.model_type));
    Some(fused_layout(
        family,
        module,
        t,
        config.and_then(|c| c.hidden),
    ))
}

/// Resolve every tensor of a checkpoint. Never fails: what cannot be resolved is reported in
/// [`Structure::warnings`] and analysed per tensor only.
pub fn resolve(config: Option<&ModelConfig>, tensors: &[TensorDesc<'_>]) -> Structure {
    let mut warnings = Vec::new();
    let mut family = match config {
        Some(c) => {
            let f = Family::from_model_type(&c.model_type);
            if f == Family::Unknown {
                warnings.push(format!(
                    "model_type {:?} is not a supported family ({SUPPORTED_FAMILIES}); per-head, expert and router metrics are off, per-tensor metrics are complete",
                    c.model_type
                ));
            }
            f
        }
        None => {
            warnings.push(
                "no config.json next to the base checkpoint (pass --model-config / model_config=): per-head, expert and router metrics are off, per-tensor metrics are complete"
                    .into(),
            );
            Family::Unknown
        }
    };

    // The language model's prefix: the one carrying the most attention tensors (multimodal
    // checkpoints also have `layers.{l}` in their vision tower).
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for t in tensors {
        if let Some((prefix, _, rest)) = split_layer(t.name) {
            let tower = ["vision", "visual", "audio", "image"]
                .iter()
                .any(|w| prefix.contains(w));
            if rest.starts_with("self_attn.") && !tower {
                match counts.iter_mut().find(|(p, _)| *p == prefix) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((prefix, 1)),
                }
            }
        }
    }
    if counts.is_empty() {
        // No attention tensors (a partial checkpoint, an experts-only shard): any layer tensor.
        for t in tensors {
            if let Some((prefix, _, _)) = split_layer(t.name) {
                match counts.iter_mut().find(|(p, _)| *p == prefix) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((prefix, 1)),
                }
            }
        }
    }
    let prefix = counts
        .iter()
        .max_by_key(|(p, n)| (*n, std::cmp::Reverse(p.len())))
        .map(|(p, _)| p.to_string())
        .unwrap_or_default();
    // Top-level tensors (embeddings, final norm, lm_head) belong to the language model when they
    // share the first component of its prefix (`language_model.` in multimodal checkpoints; the
    // head sits beside `model.` in `language_model.lm_head`).
    let lm_root = match prefix.split('.').next() {
        Some(first) if !first.is_empty() && first != "model" => format!("{first}."),
        _ => String::new(),
    };
    let hidden = config.and_then(|c| c.hidden);

    let mut roles = Vec::with_capacity(tensors.len());
    let mut layers = BTreeSet::new();
    let mut moe = BTreeSet::new();
    let mut shared = BTreeSet::new();
    for t in tensors {
        let role = match split_layer(t.name) {
            Some((p, layer, rest)) if p == prefix => {
                layers.insert(layer);
                let (module, expert, bias) = layer_role(rest);
                if module == Module::Router {
                    moe.insert(layer);
                }
                if matches!(
                    module,
                    Module::SharedGate | Module::SharedUp | Module::SharedDown
                ) {
                    shared.insert(layer);
                }
                let fused = matches!(module, Module::ExpertsGateUp | Module::ExpertsDown)
                    .then(|| fused_layout(family, module, t, hidden));
                TensorRole {
                    layer: Some(layer),
                    expert,
                    module,
                    bias,
                    fused,
                }
            }
            Some(_) => TensorRole {
                layer: None,
                expert: None,
                module: Module::Other,
                bias: false,
                fused: None,
            },
            None => {
                // Top-level tensors count only when they belong to the language model (or there
                // is no prefix to compare against).
                let module = if lm_root.is_empty() || t.name.starts_with(&lm_root) {
                    top_level_role(t.name)
                } else {
                    Module::Other
                };
                TensorRole {
                    layer: None,
                    expert: None,
                    module,
                    bias: t.name.ends_with(".bias"),
                    fused: None,
                }
            }
        };
        roles.push(role);
    }

    let attention = match (family, config) {
        (Family::Unknown, _) | (_, None) => Attention::None,
        (f, Some(c)) if f.mla() => match (&c.mla, c.n_heads) {
            (Some(mla), Some(h)) => Attention::Mla {
                n_heads: h,
                mla: mla.clone(),
            },
            _ => {
                warnings.push(format!(
                    "{}: config lacks num_attention_heads or the MLA sizes; per-head metrics are off",
                    f.name()
                ));
                Attention::None
            }
        },
        (f, Some(c)) => match (c.n_heads, c.n_kv_heads, c.head_dim()) {
            (Some(h), Some(kv), Some(d)) if kv > 0 && h % kv == 0 => Attention::Gqa {
                n_heads: h,
                n_kv_heads: kv,
                head_dim: d,
            },
            _ => {
                warnings.push(format!(
                    "{}: config lacks num_attention_heads / num_key_value_heads / head_dim (or heads are not a multiple of kv heads); per-head metrics are off",
                    f.name()
                ));
                Attention::None
            }
        },
    };
    if family != Family::Unknown && layers.is_empty() {
        warnings.push(format!(
            "{}: no tensor names of the form [prefix.]layers.N.*; structure-level metrics are off",
            family.name()
        ));
        family = Family::Unknown;
    }
    let n_experts = config.and_then(|c| c.n_experts);
    Structure {
        family,
        // The checkpoint's own model_type (`llama4` for a multimodal Llama 4, not its text part's).
        model_type: config
            .map(|c| {
                if c.outer_model_type.is_empty() {
                    c.model_type.clone()
                } else {
                    c.outer_model_type.clone()
                }
            })
            .unwrap_or_default(),
        prefix,
        n_layers: layers.iter().next_back().map_or(0, |l| *l as usize + 1),
        hidden,
        attention,
        n_experts,
        top_k: config.and_then(|c| c.top_k),
        moe_layers: moe.into_iter().collect(),
        shared_expert_layers: shared.into_iter().collect(),
        roles,
        warnings,
    }
}

fn fused_layout(
    family: Family,
    module: Module,
    t: &TensorDesc<'_>,
    hidden: Option<usize>,
) -> FusedLayout {
    let interleaved = family == Family::GptOss && module == Module::ExpertsGateUp;
    // [E, a, b] (weights) or [E, b] (biases: no orientation).
    let transposed = match (t.shape, hidden) {
        ([_, a, b], Some(h)) => {
            let (a, b, h) = (*a as usize, *b as usize, h);
            // gate_up rows: [E, 2I, H]; down rows: [E, H, I].
            let in_axis_is_last = match module {
                Module::ExpertsGateUp => b == h,
                _ => a == h,
            };
            let in_axis_is_middle = match module {
                Module::ExpertsGateUp => a == h,
                _ => b == h,
            };
            match (in_axis_is_last, in_axis_is_middle) {
                (true, false) => false,
                (false, true) => true,
                _ => !t.mxfp4 && family.fused_transposed_default(),
            }
        }
        _ => !t.mxfp4 && family.fused_transposed_default(),
    };
    FusedLayout {
        transposed,
        interleaved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc<'a>(names: &'a [(&'a str, Vec<u64>)]) -> Vec<TensorDesc<'a>> {
        names
            .iter()
            .map(|(n, s)| TensorDesc {
                name: n,
                shape: s,
                mxfp4: false,
            })
            .collect()
    }

    #[test]
    fn split_layer_needs_a_boundary_and_digits() {
        assert_eq!(
            split_layer("model.layers.12.self_attn.q_proj.weight"),
            Some(("model.", 12, "self_attn.q_proj.weight"))
        );
        assert_eq!(
            split_layer("language_model.model.layers.0.feed_forward.router.weight"),
            Some(("language_model.model.", 0, "feed_forward.router.weight"))
        );
        assert_eq!(split_layer("model.sublayers.1.x"), None);
        assert_eq!(split_layer("layers.x.y"), None);
        assert_eq!(split_layer("layers.3"), None);
    }

    #[test]
    fn layer_roles() {
        use Module::*;
        let cases: &[(&str, Module, Option<u32>, bool)] = &[
            ("self_attn.q_proj.weight", Q, None, false),
            ("self_attn.q_proj.bias", Q, None, true),
            ("self_attn.kv_b_proj.weight", KvB, None, false),
            ("self_attn.kv_a_layernorm.weight", AttnNorm, None, false),
            ("self_attn.sinks", Sinks, None, false),
            ("mlp.experts.3.down_proj.weight", ExpertDown, Some(3), false),
            (
                "block_sparse_moe.experts.1.w3.weight",
                ExpertUp,
                Some(1),
                false,
            ),
            ("block_sparse_moe.gate.weight", Router, None, false),
            (
                "mlp.gate.e_score_correction_bias",
                ScoreCorrectionBias,
                None,
                true,
            ),
            ("mlp.router.bias", RouterBias, None, true),
            ("mlp.experts.gate_up_proj", ExpertsGateUp, None, false),
            ("mlp.experts.gate_up_proj_bias", ExpertsGateUp, None, true),
            ("feed_forward.experts.down_proj", ExpertsDown, None, false),
            (
                "feed_forward.shared_expert.up_proj.weight",
                SharedUp,
                None,
                false,
            ),
            (
                "mlp.shared_experts.down_proj.weight",
                SharedDown,
                None,
                false,
            ),
            (
                "mlp.shared_expert_gate.weight",
                SharedExpertGate,
                None,
                false,
            ),
            ("mlp.gate_proj.weight", MlpGate, None, false),
            ("feed_forward.down_proj.weight", MlpDown, None, false),
            ("input_layernorm.weight", Norm, None, false),
            ("something.else.weight", Other, None, false),
        ];
        for (rest, m, e, b) in cases {
            assert_eq!(layer_role(rest), (*m, *e, *b), "{rest}");
        }
    }

    #[test]
    fn multimodal_prefix_and_vision_tower() {
        let names = vec![
            (
                "language_model.model.layers.0.self_attn.q_proj.weight",
                vec![32, 32],
            ),
            (
                "language_model.model.layers.1.self_attn.q_proj.weight",
                vec![32, 32],
            ),
            (
                "language_model.model.layers.1.feed_forward.router.weight",
                vec![4, 32],
            ),
            ("language_model.model.embed_tokens.weight", vec![128, 32]),
            ("language_model.lm_head.weight", vec![128, 32]),
            (
                "vision_model.model.layers.0.self_attn.q_proj.weight",
                vec![16, 16],
            ),
            (
                "vision_model.model.layers.0.self_attn.q_proj.weight2",
                vec![16, 16],
            ),
        ];
        let cfg = ModelConfig::from_value(&serde_json::json!({
            "model_type": "llama4",
            "text_config": {"model_type": "llama4_text", "hidden_size": 32, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 4}
        }))
        .unwrap();
        let s = resolve(Some(&cfg), &desc(&names));
        assert_eq!(s.family, Family::Llama4);
        assert_eq!(s.prefix, "language_model.model.");
        assert_eq!(s.moe_layers, vec![1]);
        assert_eq!(s.n_layers, 2);
        assert_eq!(s.roles[3].module, Module::Embedding);
        assert_eq!(s.roles[4].module, Module::LmHead);
        assert_eq!(s.roles[5].module, Module::Other);
        assert_eq!(
            s.attention,
            Attention::Gqa {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8
            }
        );
    }

    #[test]
    fn unknown_family_and_missing_config_degrade_with_a_warning() {
        let names = vec![("model.layers.0.self_attn.q_proj.weight", vec![8, 8])];
        let s = resolve(None, &desc(&names));
        assert_eq!(s.family, Family::Unknown);
        assert!(s.warnings[0].contains("no config.json"));
        let cfg = ModelConfig::from_value(&serde_json::json!({"model_type": "madeup"})).unwrap();
        let s = resolve(Some(&cfg), &desc(&names));
        assert_eq!(s.family, Family::Unknown);
        assert!(s.warnings[0].contains("\"madeup\""));
        assert_eq!(s.attention, Attention::None);
    }

    #[test]
    fn fused_orientation_from_shapes() {
        let cfg = ModelConfig::from_value(&serde_json::json!({
            "model_type": "gpt_oss", "hidden_size": 32, "num_attention_heads": 4, "head_dim": 8,
            "num_key_value_heads": 2, "num_local_experts": 4}))
        .unwrap();
        let names = vec![
            ("model.layers.0.self_attn.q_proj.weight", vec![32, 32]),
            ("model.layers.0.mlp.experts.gate_up_proj", vec![4, 32, 128]),
            ("model.layers.0.mlp.experts.down_proj", vec![4, 64, 32]),
            ("model.layers.1.mlp.experts.gate_up_proj", vec![4, 128, 32]),
            ("model.layers.1.mlp.experts.down_proj", vec![4, 32, 64]),
        ];
        let s = resolve(Some(&cfg), &desc(&names));
        let f = |i: usize| s.roles[i].fused.unwrap();
        assert!(f(1).transposed && f(1).interleaved);
        assert!(f(2).transposed && !f(2).interleaved);
        assert!(!f(3).transposed && f(3).interleaved);
        assert!(!f(4).transposed);
    }
}
