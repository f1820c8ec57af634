//! Records of `analyze`: the per-tensor trajectory plus per-head, per-expert, per-router,
//! spectral, subspace and per-layer rows. `checkpoint` is the index into the run's checkpoints
//! (0 = base); drift rows have checkpoint ≥ 1.

use serde::Serialize;

use super::TrajectoryReport;
use crate::layout::Structure;
use crate::metrics::experts::ExpertDrift;
use crate::metrics::heads::HeadDrift;
use crate::metrics::router::{BiasDrift, ExpertRouterDrift};
use crate::metrics::spectral::{SpectralStats, SubspaceStats};

/// `head_drift` of one attention head at one checkpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeadRecord {
    /// Checkpoint index (≥ 1).
    pub checkpoint: usize,
    /// Layer.
    pub layer: u32,
    /// The head's drift.
    #[serde(flatten)]
    pub drift: HeadDrift,
    /// Robust z-score of `drift` over all heads of the model at this checkpoint.
    pub z_score: f64,
    /// `z_score` above the threshold.
    pub severe: bool,
}

/// `expert_drift` of one expert (or a shared expert) at one checkpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpertRecord {
    /// Checkpoint index (≥ 1).
    pub checkpoint: usize,
    /// Layer.
    pub layer: u32,
    /// Expert index (−1 for the shared expert).
    pub expert: i64,
    /// A shared (always-on) expert.
    pub shared: bool,
    /// The drift.
    #[serde(flatten)]
    pub drift: ExpertDrift,
}

/// `router_drift` of one expert's router row at one checkpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouterRecord {
    /// Checkpoint index (≥ 1).
    pub checkpoint: usize,
    /// Layer.
    pub layer: u32,
    /// The row's drift.
    #[serde(flatten)]
    pub drift: ExpertRouterDrift,
}

/// Router summary of one MoE layer at one checkpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouterLayerRecord {
    /// Checkpoint index (≥ 1).
    pub checkpoint: usize,
    /// Layer.
    pub layer: u32,
    /// Max over experts of the row rel_drift.
    pub rel_drift_max: f64,
    /// Mean over experts.
    pub rel_drift_mean: f64,
    /// Gini over experts.
    pub rel_drift_gini: f64,
    /// Router bias drift (GPT-OSS).
    pub bias: Option<BiasDrift>,
    /// `e_score_correction_bias` drift (DeepSeek-V3).
    pub score_correction_bias: Option<BiasDrift>,
}

/// `spectra` of one matrix (a weight at a checkpoint, or a checkpoint's ΔW).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpectraRecord {
    /// Tensor name (`name[e]` for one expert of a fused tensor).
    pub tensor: String,
    /// Layer.
    pub layer: Option<u32>,
    /// Expert.
    pub expert: Option<u32>,
    /// Checkpoint index (0 = base; for `delta`, ≥ 1).
    pub checkpoint: usize,
    /// `weight` (W_t) or `delta` (W_t − W₀).
    pub matrix: &'static str,
    /// Summary.
    #[serde(flatten)]
    pub stats: SpectralStats,
    /// σ₁(ΔW)/σ₁(W₀) for `delta` rows, NaN otherwise.
    pub rel_sigma1: f64,
}

/// `subspace_overlap` of the top-k singular subspaces of W₀ and W_t.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubspaceRecord {
    /// Tensor name.
    pub tensor: String,
    /// Layer.
    pub layer: Option<u32>,
    /// Expert.
    pub expert: Option<u32>,
    /// Checkpoint index (≥ 1).
    pub checkpoint: usize,
    /// `left` (output space) or `right` (input space), in torch `Linear` orientation.
    pub side: &'static str,
    /// Summary.
    #[serde(flatten)]
    pub stats: SubspaceStats,
}

/// Per-layer summary at one checkpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LayerRecord {
    /// Checkpoint index (≥ 1).
    pub checkpoint: usize,
    /// Layer.
    pub layer: u32,
    /// The layer has a router.
    pub is_moe: bool,
    /// √(Σ‖ΔW‖²)/√(Σ‖W₀‖²) over every tensor of the layer.
    pub rel_drift: f64,
    /// Same over attention tensors.
    pub attn_rel_drift: f64,
    /// Same over MLP / expert / router tensors.
    pub mlp_rel_drift: f64,
    /// Heads analysed.
    pub n_heads: usize,
    /// Heads with z above the threshold.
    pub n_heads_severe: usize,
    /// `n_heads_severe / n_heads`.
    pub frac_heads_severe: f64,
    /// Max head `drift`.
    pub head_drift_max: f64,
    /// Max head `rel_drift`.
    pub head_rel_drift_max: f64,
    /// Max routed-expert ρ_e.
    pub expert_rel_drift_max: f64,
    /// Mean routed-expert ρ_e.
    pub expert_rel_drift_mean: f64,
    /// Gini of routed-expert ρ_e ("localised" change).
    pub expert_rel_drift_gini: f64,
    /// Router row rel_drift max.
    pub router_rel_drift_max: f64,
    /// Router row rel_drift mean.
    pub router_rel_drift_mean: f64,
    /// Router row rel_drift Gini.
    pub router_rel_drift_gini: f64,
    /// ‖Δb‖ of the router bias.
    pub router_bias_drift: f64,
    /// ‖Δ‖ of DeepSeek-V3's `e_score_correction_bias` (a pipeline signal: it is not trained by
    /// gradients).
    pub score_correction_bias_drift: f64,
}

/// A metric that was not computed for a tensor, and why.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AnalysisSkip {
    /// Tensor (or layer) concerned.
    pub tensor: String,
    /// Metric id.
    pub metric: String,
    /// Why.
    pub reason: String,
}

/// Result of `analyze`.
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisReport {
    /// Per-tensor trajectory (every tensor, as `trajectory` reports it).
    pub trajectory: TrajectoryReport,
    /// The resolved structure.
    pub structure: Structure,
    /// Per head.
    pub heads: Vec<HeadRecord>,
    /// Per expert.
    pub experts: Vec<ExpertRecord>,
    /// Per router row.
    pub routers: Vec<RouterRecord>,
    /// Per MoE layer router summary.
    pub router_layers: Vec<RouterLayerRecord>,
    /// Spectra.
    pub spectra: Vec<SpectraRecord>,
    /// Subspace overlaps.
    pub subspaces: Vec<SubspaceRecord>,
    /// Per layer.
    pub layers: Vec<LayerRecord>,
    /// Metrics not computed, with reasons.
    pub skipped: Vec<AnalysisSkip>,
    /// Options and conventions (metric → definition).
    pub conventions: Vec<(String, String)>,
}

impl AnalysisReport {
    /// Everything but the table rows, as JSON.
    pub fn meta_json(&self) -> String {
        let traj: serde_json::Value =
            serde_json::from_str(&self.trajectory.meta_json()).unwrap_or_default();
        serde_json::json!({
            "schema_version": super::SCHEMA_VERSION,
            "trajectory": traj,
            "structure": self.structure,
            "skipped": self.skipped,
            "conventions": self.conventions.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        })
        .to_string()
    }
}
