//! The structure resolver on the tensor names and configs that transformers 5.x actually writes
//! for every supported family (`tests/data/structure/*.json`, dumped from `save_pretrained`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use forgetscope_core::layout::{resolve, Attention, Family, ModelConfig, Module, TensorDesc};

fn load(variant: &str) -> (ModelConfig, Vec<(String, Vec<u64>)>) {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/structure")
        .join(format!("{variant}.json"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let cfg = ModelConfig::from_value(&v["config"]).unwrap();
    let tensors = v["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let shape = s
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (k.clone(), shape)
        })
        .collect();
    (cfg, tensors)
}

struct Expect {
    family: Family,
    moe: Vec<u32>,
    n_layers: usize,
    mla: bool,
    /// (module, count) checks.
    counts: Vec<(Module, usize)>,
    /// Fused tensors: (transposed, interleaved) for gate_up.
    fused_gate_up: Option<(bool, bool)>,
}

fn check(variant: &str, e: Expect) {
    let (cfg, tensors) = load(variant);
    let descs: Vec<TensorDesc<'_>> = tensors
        .iter()
        .map(|(n, s)| TensorDesc {
            name: n,
            shape: s,
            mxfp4: false,
        })
        .collect();
    let s = resolve(Some(&cfg), &descs);
    assert_eq!(s.family, e.family, "{variant}");
    assert!(s.warnings.is_empty(), "{variant}: {:?}", s.warnings);
    assert_eq!(s.moe_layers, e.moe, "{variant}");
    assert_eq!(s.n_layers, e.n_layers, "{variant}");
    assert_eq!(
        matches!(s.attention, Attention::Mla { .. }),
        e.mla,
        "{variant}"
    );
    if let Attention::Gqa {
        n_heads,
        n_kv_heads,
        head_dim,
    } = s.attention
    {
        assert_eq!(Some(n_heads), cfg.n_heads);
        assert_eq!(Some(n_kv_heads), cfg.n_kv_heads);
        // q_proj rows = H·d_h for every layer.
        for (i, (n, shape)) in tensors.iter().enumerate() {
            if s.roles[i].module == Module::Q && !s.roles[i].bias {
                assert_eq!(shape[0] as usize, n_heads * head_dim, "{variant} {n}");
            }
        }
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &s.roles {
        *counts.entry(r.module.name()).or_default() += 1;
    }
    for (m, c) in &e.counts {
        assert_eq!(
            counts.get(m.name()).copied().unwrap_or(0),
            *c,
            "{variant}: {} in {counts:?}",
            m.name()
        );
    }
    // Nothing inside a decoder layer of the language model is left unexplained.
    for (i, (n, _)) in tensors.iter().enumerate() {
        if s.roles[i].layer.is_some() {
            assert_ne!(s.roles[i].module, Module::Other, "{variant}: {n}");
        }
    }
    if let Some((tr, il)) = e.fused_gate_up {
        let f: Vec<_> = s
            .roles
            .iter()
            .filter(|r| r.module == Module::ExpertsGateUp && !r.bias)
            .map(|r| r.fused.unwrap())
            .collect();
        assert!(!f.is_empty());
        assert!(
            f.iter().all(|f| f.transposed == tr && f.interleaved == il),
            "{variant}: {f:?}"
        );
    }
}

#[test]
fn dense_families() {
    for v in ["llama", "mistral", "qwen2", "qwen3"] {
        let family = match v {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            _ => Family::Qwen3,
        };
        check(
            v,
            Expect {
                family,
                moe: vec![],
                n_layers: 2,
                mla: false,
                counts: vec![
                    (Module::Router, 0),
                    (Module::Embedding, 1),
                    (Module::LmHead, 1),
                    (Module::MlpDown, 2),
                ],
                fused_gate_up: None,
            },
        );
    }
}

#[test]
fn moe_families() {
    check(
        "mixtral",
        Expect {
            family: Family::Mixtral,
            moe: vec![0, 1],
            n_layers: 2,
            mla: false,
            counts: vec![
                (Module::Router, 2),
                (Module::ExpertGate, 8),
                (Module::ExpertDown, 8),
                (Module::ExpertUp, 8),
            ],
            fused_gate_up: None,
        },
    );
    check(
        "qwen2_moe",
        Expect {
            family: Family::Qwen2Moe,
            moe: vec![1],
            n_layers: 2,
            mla: false,
            counts: vec![
                (Module::Router, 1),
                (Module::SharedExpertGate, 1),
                (Module::SharedDown, 1),
                (Module::MlpDown, 1),
                (Module::ExpertUp, 4),
            ],
            fused_gate_up: None,
        },
    );
    check(
        "qwen3_moe",
        Expect {
            family: Family::Qwen3Moe,
            moe: vec![0, 1],
            n_layers: 2,
            mla: false,
            counts: vec![(Module::Router, 2), (Module::AttnNorm, 4)],
            fused_gate_up: None,
        },
    );
    check(
        "olmoe",
        Expect {
            family: Family::Olmoe,
            moe: vec![0, 1],
            n_layers: 2,
            mla: false,
            counts: vec![(Module::Router, 2), (Module::ExpertDown, 8)],
            fused_gate_up: None,
        },
    );
    check(
        "deepseek_v2",
        Expect {
            family: Family::DeepseekV2,
            moe: vec![1, 2],
            n_layers: 3,
            mla: true,
            counts: vec![
                (Module::Router, 2),
                (Module::Q, 3),
                (Module::KvB, 3),
                (Module::KvA, 3),
                (Module::SharedDown, 2),
                (Module::MlpGate, 1),
            ],
            fused_gate_up: None,
        },
    );
    check(
        "deepseek_v3",
        Expect {
            family: Family::DeepseekV3,
            moe: vec![1],
            n_layers: 2,
            mla: true,
            counts: vec![
                (Module::Router, 1),
                (Module::ScoreCorrectionBias, 1),
                (Module::QA, 2),
                (Module::QB, 2),
            ],
            fused_gate_up: None,
        },
    );
    check(
        "gpt_oss",
        Expect {
            family: Family::GptOss,
            moe: vec![0, 1],
            n_layers: 2,
            mla: false,
            counts: vec![
                (Module::Router, 2),
                (Module::RouterBias, 2),
                (Module::Sinks, 2),
                (Module::ExpertsGateUp, 4),
                (Module::ExpertsDown, 4),
            ],
            fused_gate_up: Some((true, true)),
        },
    );
    for v in ["llama4_text", "llama4_multimodal"] {
        check(
            v,
            Expect {
                family: Family::Llama4,
                moe: vec![1, 3],
                n_layers: 4,
                mla: false,
                counts: vec![
                    (Module::Router, 2),
                    (Module::ExpertsGateUp, 2),
                    (Module::SharedUp, 2),
                    (Module::MlpUp, 2),
                    (Module::Embedding, 1),
                    (Module::LmHead, 1),
                    (Module::FinalNorm, 1),
                ],
                fused_gate_up: Some((true, false)),
            },
        );
    }
}
