//! `router_drift`: drift of a mixture-of-experts router between a base and a fine-tuned checkpoint
//! (METRICS.md §4). A router is R ∈ R^{E×H} (rows r_e, torch `nn.Linear(H, E)` layout), sometimes
//! with a bias b ∈ R^E (GPT-OSS `router.bias`, DeepSeek-V3 `e_score_correction_bias`).
//!
//! **Weight-only metrics (§4.2)**, per expert e, with a = r_e⁰, b = r_e^t:
//! - `one_minus_cos` 1 − cos(a, b) = (‖b − a‖² − (‖b‖ − ‖a‖)²)/(2‖a‖‖b‖), the form of `drift.rs`,
//!   with ‖b‖ − ‖a‖ = Σ(b − a)(b + a)/(‖a‖ + ‖b‖) so that neither term cancels for tiny drifts;
//! - `norm_drift` ‖b‖/‖a‖ − 1, computed as (‖b‖ − ‖a‖)/‖a‖ from the same cancellation-free gap;
//! - `rel_drift` ‖b − a‖/‖a‖;
//! - `centered_*` the same on the row-centred router R − 1r̄ᵀ (r̄ = mean row). Adding one vector to
//!   every row leaves softmax routing unchanged, so for softmax routers only the centred drift can
//!   move routing; sigmoid routers (DeepSeek-V3, Llama 4) have no such invariance and report NaN.
//!
//! Layer summaries: max, mean and Gini of `rel_drift` over experts (NaN when any expert's base row
//! is zero), ‖ΔR‖_F, ‖ΔR‖_F/‖R⁰‖_F and `frac_unchanged` (the bf16 rounding floor, §0).
//!
//! **Data-dependent metrics (§4.3)** on hidden states h at the router input: mode (i) feeds the same
//! h (from θ₀) to R⁰ and R^t, mode (ii) feeds each model its own h. Logits z = h·Rᵀ are computed in
//! f64 (h and R widened exactly, faer f64 GEMM): a product of two f32 values is exact in f64, so
//! logits carry ~1e-16 relative error and the downstream metrics can be checked against a float64
//! oracle at rtol 1e-9. Each family's exact routing rule is reproduced ([`RoutingRule`], from the
//! installed transformers source); the routing distribution is p = softmax(z) (log-softmax) for
//! softmax routers and p = σ(z)/Σσ(z) for sigmoid routers. Per token:
//! - JS(p⁰, p^t) = ½Σ_e m_e·f(d_e), m = (p⁰ + p^t)/2, d_e = (p⁰_e − p^t_e)/(p⁰_e + p^t_e)
//!   = tanh((log p⁰_e − log p^t_e)/2), f(d) = (1+d)ln(1+d) + (1−d)ln(1−d) = 2d·atanh d + ln(1 − d²).
//!   Every expert contributes ≥ 0, so nothing cancels across experts, and f is evaluated without
//!   cancellation (0·ln 0 = 0); 0 ≤ JS ≤ ln 2, = ln 2 iff the supports are disjoint;
//! - sigmoid routers also: mean over experts of the Bernoulli JS of σ(z⁰_e) and σ(z^t_e);
//! - top-k overlap |S⁰∩S^t|/k, Jaccard |S⁰∩S^t|/(2k − |S⁰∩S^t|), top-1 agreement (the first
//!   expert in selection order); ties are broken lowest index first (`torch.topk` leaves the order
//!   unspecified);
//! - `weight_l1`: Σ_e |w⁰_e − w^t_e| of the dense combine weights (0 for unselected experts).
//!
//! Over tokens: expert load f_e = #{i: e ∈ S_i}/(nk), load entropy H(f)/ln E (NaN for E = 1),
//! TV = ½‖f^t − f⁰‖₁, max-load ratio E·max f_e, Switch balance E·Σ_e f_e·P_e with P_e = mean_i p_ie
//! (HF `load_balancing_loss_func`). Qwen2-MoE shared-expert gate: mean |σ(g^t·h) − σ(g⁰·h)|.
//!
//! **Precision vs the model's own forward.** transformers computes the router in float32
//! (Mixtral/Qwen/OLMoE upcast before softmax, DeepSeek upcasts the logits) and Llama 4 / GPT-OSS
//! take top-k on logits in the model dtype (bf16 in practice). We reproduce the *rule* exactly in
//! f64, so for a token whose top-k boundary is closer than the model dtype's rounding, the
//! selection here is the exact one and may differ from what a bf16 forward picked.
//!
//! Any non-finite logit (from a NaN/Inf weight, bias or hidden state) makes every data-dependent
//! metric NaN and is counted in `n_nonfinite`: nothing is reported on silently filtered tokens.
//!
//! Complexity: weight-only O(EH); data-dependent O(nEH) for the logits plus O(nE) for the rules
//! (quickselect) and metrics; memory O(E) per accumulator plus O(bH + EH) f64 working buffers
//! (b = 256-token blocks). Measured on this machine (2 shared cores): the per-token work is ~5 µs
//! per token for E = 128 (both routers, all metrics), the f64 GEMM ~20–27 GFLOP/s per core.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

fn config_err(reason: impl Into<String>) -> Error {
    Error::Config {
        reason: reason.into(),
    }
}

fn check_matrix(what: &str, len: usize, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        Some(n) => Err(config_err(format!(
            "{what} has {len} elements but the shape [{rows}, {cols}] needs {n}"
        ))),
        None => Err(config_err(format!(
            "{what}: the shape [{rows}, {cols}] overflows"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Weight-only drift (§4.2)

/// Per-expert weight-only drift of a router R ∈ R^{E×H} (rows r_e), METRICS §4.2.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpertRouterDrift {
    /// Expert index e.
    pub expert: usize,
    /// 1 − cos(r_e⁰, r_e^t) ∈ [0, 2]; NaN when either row is zero.
    pub one_minus_cos: f64,
    /// ‖r_e^t‖/‖r_e⁰‖ − 1; NaN when the base row is zero.
    pub norm_drift: f64,
    /// ‖r_e^t − r_e⁰‖/‖r_e⁰‖; NaN when the base row is zero.
    pub rel_drift: f64,
    /// 1 − cos on the row-centred routers R − 1r̄ᵀ; NaN for sigmoid routers.
    pub centered_one_minus_cos: f64,
    /// Relative drift on the row-centred routers; NaN for sigmoid routers.
    pub centered_rel_drift: f64,
}

/// Weight-only drift of one router (METRICS §4.2).
#[derive(Debug, Clone, Serialize)]
pub struct RouterWeightDrift {
    /// One entry per expert, in expert order.
    pub per_expert: Vec<ExpertRouterDrift>,
    /// max_e rel_drift (NaN if any is NaN).
    pub rel_drift_max: f64,
    /// mean_e rel_drift.
    pub rel_drift_mean: f64,
    /// Gini coefficient of rel_drift over experts ("localised" router change), see [`gini`].
    pub rel_drift_gini: f64,
    /// ‖R^t − R⁰‖_F.
    pub fro_delta: f64,
    /// ‖R^t − R⁰‖_F / ‖R⁰‖_F (NaN when R⁰ = 0).
    pub rel_delta: f64,
    /// ‖ΔR_c‖_F/‖R⁰_c‖_F on the row-centred routers; NaN for sigmoid routers.
    pub centered_rel_delta: f64,
    /// Fraction of elements bit-equal in both checkpoints (above 0.5, bf16 rounding dominates).
    pub frac_unchanged: f64,
}

/// Sums for one pair of rows: ‖a‖², ‖b‖², ‖b − a‖², and Σ(b − a)(b + a) = ‖b‖² − ‖a‖² without
/// cancellation.
#[derive(Default, Clone, Copy)]
struct RowSums {
    sa: f64,
    sb: f64,
    dd: f64,
    gap_num: f64,
}

impl RowSums {
    fn push(&mut self, a: f64, b: f64, d: f64) {
        self.sa += a * a;
        self.sb += b * b;
        self.dd += d * d;
        self.gap_num += d * (a + b);
    }

    /// (1 − cos, ‖b‖/‖a‖ − 1, ‖b − a‖/‖a‖).
    fn metrics(&self) -> (f64, f64, f64) {
        let (na, nb) = (self.sa.sqrt(), self.sb.sqrt());
        let nan = f64::NAN;
        if na.is_nan() || na <= 0.0 {
            return (nan, nan, nan);
        }
        let gap = if na + nb > 0.0 {
            self.gap_num / (na + nb)
        } else {
            0.0
        };
        let omc = if nb > 0.0 {
            ((self.dd - gap * gap) / (2.0 * na * nb)).clamp(0.0, 2.0)
        } else {
            nan
        };
        (omc, gap / na, self.dd.sqrt() / na)
    }
}

/// Weight-only drift of a router between two checkpoints (METRICS §4.2).
///
/// `r0`, `rt`: row-major [n_experts, hidden]. `softmax_invariant`: the router's probabilities are
/// unchanged by adding one vector to every row (softmax scoring), so the row-centred drift is
/// reported; otherwise the centred fields are NaN. O(EH) time, O(H) extra memory.
///
/// Errors: [`Error::Config`] when a length does not match the shape or a dimension is zero.
pub fn router_weight_drift(
    r0: &[f32],
    rt: &[f32],
    n_experts: usize,
    hidden: usize,
    softmax_invariant: bool,
) -> Result<RouterWeightDrift> {
    if n_experts == 0 || hidden == 0 {
        return Err(config_err(format!(
            "a router needs at least one expert and one hidden unit, got [{n_experts}, {hidden}]"
        )));
    }
    check_matrix("router_base", r0.len(), n_experts, hidden)?;
    check_matrix("router_ckpt", rt.len(), n_experts, hidden)?;
    // Column means of R⁰, R^t and ΔR (ΔR's mean taken from the differences themselves, so the
    // centred delta of a pure row shift is exactly the rounding of the shift, not a difference of
    // two rounded means).
    let (mut m0, mut mt, mut md) = (vec![0f64; hidden], vec![0f64; hidden], vec![0f64; hidden]);
    if softmax_invariant {
        for (a_row, b_row) in r0.chunks_exact(hidden).zip(rt.chunks_exact(hidden)) {
            for j in 0..hidden {
                let (a, b) = (a_row[j] as f64, b_row[j] as f64);
                m0[j] += a;
                mt[j] += b;
                md[j] += b - a;
            }
        }
        // Division, not a reciprocal product: an exact mean stays exact.
        let ne = n_experts as f64;
        for v in m0.iter_mut().chain(mt.iter_mut()).chain(md.iter_mut()) {
            *v /= ne;
        }
    }
    let mut per_expert = Vec::with_capacity(n_experts);
    let (mut tot, mut tot_c) = (RowSums::default(), RowSums::default());
    let mut unchanged = 0u64;
    for (e, (a_row, b_row)) in r0
        .chunks_exact(hidden)
        .zip(rt.chunks_exact(hidden))
        .enumerate()
    {
        let (mut s, mut c) = (RowSums::default(), RowSums::default());
        for j in 0..hidden {
            let (a32, b32) = (a_row[j], b_row[j]);
            unchanged += (a32 == b32) as u64;
            let (a, b) = (a32 as f64, b32 as f64);
            // Exact: two f32 values differ by an f64-representable amount unless their exponents
            // are > 29 binades apart, where the rounding is far below the result.
            let d = b - a;
            s.push(a, b, d);
            if softmax_invariant {
                c.push(a - m0[j], b - mt[j], d - md[j]);
            }
        }
        let (omc, nd, rd) = s.metrics();
        let (comc, _, crd) = if softmax_invariant {
            c.metrics()
        } else {
            (f64::NAN, f64::NAN, f64::NAN)
        };
        for (t, x) in [(&mut tot, s), (&mut tot_c, c)] {
            t.sa += x.sa;
            t.sb += x.sb;
            t.dd += x.dd;
        }
        per_expert.push(ExpertRouterDrift {
            expert: e,
            one_minus_cos: omc,
            norm_drift: nd,
            rel_drift: rd,
            centered_one_minus_cos: comc,
            centered_rel_drift: crd,
        });
    }
    let rel: Vec<f64> = per_expert.iter().map(|x| x.rel_drift).collect();
    let rel_drift_max = if rel.iter().any(|x| x.is_nan()) {
        f64::NAN
    } else {
        rel.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    };
    let ratio = |num: f64, den: f64| {
        if den > 0.0 {
            num.sqrt() / den.sqrt()
        } else {
            f64::NAN
        }
    };
    Ok(RouterWeightDrift {
        rel_drift_max,
        rel_drift_mean: rel.iter().sum::<f64>() / n_experts as f64,
        rel_drift_gini: gini(&rel),
        fro_delta: tot.dd.sqrt(),
        rel_delta: ratio(tot.dd, tot.sa),
        centered_rel_delta: if softmax_invariant {
            ratio(tot_c.dd, tot_c.sa)
        } else {
            f64::NAN
        },
        frac_unchanged: unchanged as f64 / r0.len() as f64,
        per_expert,
    })
}

/// Drift of a router bias (GPT-OSS `router.bias`, DeepSeek-V3 `e_score_correction_bias`).
#[derive(Debug, Clone, Serialize)]
pub struct BiasDrift {
    /// ‖b^t − b⁰‖₂.
    pub l2: f64,
    /// max_e |b^t_e − b⁰_e| (NaN if any element is NaN).
    pub max_abs: f64,
    /// ‖b^t − b⁰‖₂/‖b⁰‖₂ (NaN when b⁰ = 0).
    pub rel: f64,
}

/// Bias drift (METRICS §4.2). DeepSeek-V3's correction bias is updated by aux-loss-free balancing,
/// not by gradients, so a nonzero drift there is a pipeline signal rather than learning.
///
/// Errors: [`Error::Config`] when the lengths differ.
pub fn bias_drift(b0: &[f32], bt: &[f32]) -> Result<BiasDrift> {
    if b0.len() != bt.len() {
        return Err(config_err(format!(
            "bias_base has {} elements but bias_ckpt has {}",
            b0.len(),
            bt.len()
        )));
    }
    let (mut dd, mut s0, mut max_abs) = (0f64, 0f64, 0f64);
    for (&a, &b) in b0.iter().zip(bt) {
        let d = (b as f64 - a as f64).abs();
        dd += d * d;
        s0 += a as f64 * a as f64;
        max_abs = if d.is_nan() || max_abs.is_nan() {
            f64::NAN
        } else {
            max_abs.max(d)
        };
    }
    Ok(BiasDrift {
        l2: dd.sqrt(),
        max_abs,
        rel: if s0 > 0.0 {
            dd.sqrt() / s0.sqrt()
        } else {
            f64::NAN
        },
    })
}

/// Gini coefficient of non-negative values: Σ_i Σ_j |x_i − x_j| / (2n²·mean), computed as
/// Σ_i (2i − n − 1)·x_(i) / (n·Σx) on the ascending order (i = 1..n). 0 for equal values,
/// (n − 1)/n when one value holds everything.
///
/// Returns NaN when `x` is empty, holds a NaN, an infinity or a negative value, or sums to zero
/// (the coefficient is undefined when nothing moved).
pub fn gini(x: &[f64]) -> f64 {
    if x.is_empty() || x.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return f64::NAN;
    }
    let sum: f64 = x.iter().sum();
    if sum.is_nan() || sum <= 0.0 {
        return f64::NAN;
    }
    let mut s = x.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    let num: f64 = s
        .iter()
        .enumerate()
        .map(|(i, v)| (2.0 * (i + 1) as f64 - n - 1.0) * v)
        .sum();
    (num / (n * sum)).max(0.0)
}

// ---------------------------------------------------------------------------------------------
// Routing rules (§4.1), from transformers 5.23 `models/<family>/modeling_<family>.py`

/// How a router turns logits into per-expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// softmax over all experts (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2, GPT-OSS).
    Softmax,
    /// independent sigmoids (DeepSeek-V3, Llama 4).
    Sigmoid,
}

/// How the combine weights of the selected experts are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightRule {
    /// The scores (softmax probabilities or sigmoids, without any correction bias) gathered at the
    /// selected experts.
    GatherScores,
    /// softmax over the k selected logits (GPT-OSS).
    SoftmaxOverSelected,
    /// sigmoid of each selected logit (Llama 4).
    SigmoidOfSelected,
}

/// How a group of experts is scored for group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// The largest score in the group (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of the two largest selection scores in the group (DeepSeek-V3).
    Top2Sum,
}

/// One family's exact routing rule (METRICS §4.1, verified against transformers 5.23).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutingRule {
    /// `model_type` the rule was read from.
    pub family: String,
    /// Number of routed experts E (shared experts excluded).
    pub n_experts: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Score function.
    pub scoring: Scoring,
    /// Top-k is taken on the raw logits (Llama 4, GPT-OSS). For softmax scoring, ranking by logits
    /// and by probabilities is the same order (exp is increasing), so the implementation always
    /// ranks softmax routers by logits, which cannot create ties by rounding.
    pub select_on_logits: bool,
    /// How the combine weights are formed.
    pub weights: WeightRule,
    /// Divide the selected weights by their sum (plus `renorm_eps`).
    pub renormalize: bool,
    /// Added to the renormalisation denominator (DeepSeek-V3: 1e-20; otherwise 0).
    pub renorm_eps: f64,
    /// Multiplies the weights after renormalisation (`routed_scaling_factor`).
    pub scaling: f64,
    /// Group-limited routing: (n_group, topk_group).
    pub groups: Option<(usize, usize)>,
    /// Group score (used only when `groups` is set).
    pub group_score: GroupScore,
    /// The bias is added to the scores for selection only (DeepSeek-V3 `e_score_correction_bias`).
    pub bias_for_selection: bool,
    /// The bias is added to the logits (GPT-OSS `router.bias`).
    pub has_router_bias: bool,
}

/// Read a count from the first present key, or the family default; `None` default = required.
fn cfg_usize(cfg: &Value, family: &str, keys: &[&str], default: Option<usize>) -> Result<usize> {
    for k in keys {
        match cfg.get(*k) {
            None => continue,
            Some(Value::Null) => break,
            Some(v) => {
                return v
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        config_err(format!(
                            "{family} config: {k} must be a non-negative integer, got {v}"
                        ))
                    })
            }
        }
    }
    default.ok_or_else(|| {
        config_err(format!(
            "{family} config: {} is missing or null",
            keys.join(" / ")
        ))
    })
}

fn cfg_opt_usize(
    cfg: &Value,
    family: &str,
    key: &str,
    default: Option<usize>,
) -> Result<Option<usize>> {
    match cfg.get(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(_) => cfg_usize(cfg, family, &[key], None).map(Some),
    }
}

fn cfg_bool(cfg: &Value, family: &str, key: &str, default: bool) -> Result<bool> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(config_err(format!(
            "{family} config: {key} must be true or false, got {v}"
        ))),
    }
}

fn cfg_f64(cfg: &Value, family: &str, key: &str, default: f64) -> Result<f64> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| config_err(format!("{family} config: {key} must be a number, got {v}"))),
    }
}

const FAMILIES: &[&str] = &[
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "olmoe",
    "llama4",
    "llama4_text",
    "gpt_oss",
];

impl RoutingRule {
    /// The rule of an HF `config.json` (parsed). Multimodal Llama 4 configs are read from their
    /// nested `text_config`, as is any wrapper whose own `model_type` is not a MoE family but whose
    /// `text_config.model_type` is. Missing fields take the defaults of the installed transformers
    /// configuration classes (which is what `from_pretrained` would do).
    ///
    /// Per family (transformers 5.23 `modeling_*.py`; differences from METRICS.md §4.1 noted):
    /// - `mixtral`: softmax → top-k → always renormalised (`norm_topk_prob` is not read).
    ///   E = `num_local_experts` (8), k = `num_experts_per_tok` (2).
    /// - `qwen2_moe`, `qwen3_moe`, `olmoe`: softmax → top-k → renormalised iff `norm_topk_prob`
    ///   (default false). E = `num_experts` (60 / 128 / 64), k (4 / 8 / 8).
    /// - `deepseek_v2`: softmax (`scoring_func` is not read); `topk_method` "greedy" or
    ///   "group_limited_greedy" (group score = **max** probability in the group, keep `topk_group`
    ///   of `n_group`); **never renormalised** (`norm_topk_prob` is not read by transformers,
    ///   unlike DeepSeek's own remote code); × `routed_scaling_factor` (1.0). E = `n_routed_experts`
    ///   (64); k is required (no default). transformers masks dropped groups with 0.0, not −∞;
    ///   the two agree unless an allowed probability underflows to 0.
    /// - `deepseek_v3`: sigmoid of the fp32 logits; selection on σ + `e_score_correction_bias`
    ///   with group score = sum of the top-2 per group; weights = σ gathered (no bias),
    ///   renormalised with +1e-20 iff `norm_topk_prob` (true), × `routed_scaling_factor` (2.5).
    ///   `topk_method` and `scoring_func` are not read. E = `n_routed_experts` (256), k (8),
    ///   n_group (8), topk_group (4).
    /// - `llama4` / `llama4_text`: top-k on logits, weight = σ(selected logit), no
    ///   renormalisation. E = `num_local_experts` (16), k (1).
    /// - `gpt_oss`: logits + `router.bias`, top-k on logits, softmax over the k selected logits.
    ///   E = `num_local_experts` (128), k (4).
    ///
    /// Errors: [`Error::Config`] naming the `model_type` when it is unknown or missing, or naming
    /// the field that is malformed or inconsistent.
    pub fn from_config(cfg: &Value) -> Result<RoutingRule> {
        let mt = |c: &Value| {
            c.get("model_type")
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let mut cfg = cfg;
        let mut family = mt(cfg);
        let nested = cfg.get("text_config").filter(|t| t.is_object());
        if let Some(t) = nested {
            let inner = mt(t);
            let outer_known = family.as_deref().is_some_and(|f| FAMILIES.contains(&f));
            if family.as_deref() == Some("llama4")
                || (!outer_known && inner.as_deref().is_some_and(|f| FAMILIES.contains(&f)))
            {
                cfg = t;
                family = inner.or(family);
            }
        }
        let family = family.ok_or_else(|| {
            config_err("config has no model_type (expected an HF config.json of a MoE model)")
        })?;
        let f = family.as_str();
        let softmax = |n_experts, top_k, renormalize| RoutingRule {
            family: family.clone(),
            n_experts,
            top_k,
            scoring: Scoring::Softmax,
            select_on_logits: false,
            weights: WeightRule::GatherScores,
            renormalize,
            renorm_eps: 0.0,
            scaling: 1.0,
            groups: None,
            group_score: GroupScore::Max,
            bias_for_selection: false,
            has_router_bias: false,
        };
        let k = |default| cfg_usize(cfg, f, &["num_experts_per_tok"], default);
        let rule = match f {
            "mixtral" => softmax(
                cfg_usize(cfg, f, &["num_local_experts", "num_experts"], Some(8))?,
                k(Some(2))?,
                true,
            ),
            "qwen2_moe" | "qwen3_moe" | "olmoe" => {
                let (e, kk) = match f {
                    "qwen2_moe" => (60, 4),
                    "qwen3_moe" => (128, 8),
                    _ => (64, 8),
                };
                softmax(
                    cfg_usize(cfg, f, &["num_experts", "num_local_experts"], Some(e))?,
                    k(Some(kk))?,
                    cfg_bool(cfg, f, "norm_topk_prob", false)?,
                )
            }
            "deepseek_v2" => {
                let mut r = softmax(
                    cfg_usize(cfg, f, &["n_routed_experts", "num_experts"], Some(64))?,
                    k(None)?,
                    false,
                );
                r.scaling = cfg_f64(cfg, f, "routed_scaling_factor", 1.0)?;
                let method = match cfg.get("topk_method") {
                    None | Some(Value::Null) => "greedy".to_owned(),
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => {
                        return Err(config_err(format!(
                            "deepseek_v2 config: topk_method must be a string, got {v}"
                        )))
                    }
                };
                match method.as_str() {
                    "greedy" => {}
                    "group_limited_greedy" => {
                        let g = cfg_opt_usize(cfg, f, "n_group", None)?;
                        let tg = cfg_opt_usize(cfg, f, "topk_group", None)?;
                        match (g, tg) {
                            (Some(g), Some(tg)) => r.groups = Some((g, tg)),
                            _ => {
                                return Err(config_err(
                                    "deepseek_v2 config: topk_method \"group_limited_greedy\" needs n_group and topk_group",
                                ))
                            }
                        }
                        r.group_score = GroupScore::Max;
                    }
                    other => {
                        return Err(config_err(format!(
                            "deepseek_v2 config: unsupported topk_method {other:?} (transformers knows \"greedy\" and \"group_limited_greedy\")"
                        )))
                    }
                }
                r
            }
            "deepseek_v3" => {
                let g = cfg_opt_usize(cfg, f, "n_group", Some(8))?;
                let tg = cfg_opt_usize(cfg, f, "topk_group", Some(4))?;
                let groups = match (g, tg) {
                    (Some(g), Some(tg)) => Some((g, tg)),
                    _ => {
                        return Err(config_err(
                            "deepseek_v3 config: n_group and topk_group must not be null",
                        ))
                    }
                };
                RoutingRule {
                    family: family.clone(),
                    n_experts: cfg_usize(
                        cfg,
                        f,
                        &["n_routed_experts", "num_local_experts"],
                        Some(256),
                    )?,
                    top_k: k(Some(8))?,
                    scoring: Scoring::Sigmoid,
                    select_on_logits: false,
                    weights: WeightRule::GatherScores,
                    renormalize: cfg_bool(cfg, f, "norm_topk_prob", true)?,
                    renorm_eps: 1e-20,
                    scaling: cfg_f64(cfg, f, "routed_scaling_factor", 2.5)?,
                    groups,
                    group_score: GroupScore::Top2Sum,
                    bias_for_selection: true,
                    has_router_bias: false,
                }
            }
            "llama4" | "llama4_text" => RoutingRule {
                family: family.clone(),
                n_experts: cfg_usize(cfg, f, &["num_local_experts", "num_experts"], Some(16))?,
                top_k: k(Some(1))?,
                scoring: Scoring::Sigmoid,
                select_on_logits: true,
                weights: WeightRule::SigmoidOfSelected,
                renormalize: false,
                renorm_eps: 0.0,
                scaling: 1.0,
                groups: None,
                group_score: GroupScore::Max,
                bias_for_selection: false,
                has_router_bias: false,
            },
            "gpt_oss" => RoutingRule {
                family: family.clone(),
                n_experts: cfg_usize(cfg, f, &["num_local_experts", "num_experts"], Some(128))?,
                top_k: k(Some(4))?,
                scoring: Scoring::Softmax,
                select_on_logits: true,
                weights: WeightRule::SoftmaxOverSelected,
                renormalize: false,
                renorm_eps: 0.0,
                scaling: 1.0,
                groups: None,
                group_score: GroupScore::Max,
                bias_for_selection: false,
                has_router_bias: true,
            },
            other => {
                return Err(config_err(format!(
                    "model_type {other:?} is not a supported MoE family (supported: {})",
                    FAMILIES.join(", ")
                )))
            }
        };
        rule.validate()?;
        Ok(rule)
    }

    /// Check the rule is usable: 1 ≤ k ≤ E, groups divide E, enough experts in the kept groups,
    /// DeepSeek-V3 groups hold ≥ 2 experts, a finite scaling and a finite non-negative epsilon.
    pub fn validate(&self) -> Result<()> {
        let f = &self.family;
        if self.n_experts == 0 || self.top_k == 0 || self.top_k > self.n_experts {
            return Err(config_err(format!(
                "{f}: need 1 <= top_k <= n_experts, got top_k = {} with {} experts",
                self.top_k, self.n_experts
            )));
        }
        if let Some((g, tg)) = self.groups {
            if g == 0 || !self.n_experts.is_multiple_of(g) || tg == 0 || tg > g {
                return Err(config_err(format!(
                    "{f}: n_group = {g} must divide n_experts = {} and 1 <= topk_group = {tg} <= n_group",
                    self.n_experts
                )));
            }
            let size = self.n_experts / g;
            if self.top_k > tg * size {
                return Err(config_err(format!(
                    "{f}: top_k = {} exceeds the {} experts in the kept groups",
                    self.top_k,
                    tg * size
                )));
            }
            if self.group_score == GroupScore::Top2Sum && size < 2 {
                return Err(config_err(format!(
                    "{f}: the top-2 group score needs at least 2 experts per group, got {size}"
                )));
            }
        }
        if self.bias_for_selection && self.has_router_bias {
            return Err(config_err(format!(
                "{f}: a rule has either a router bias or a selection bias, not both"
            )));
        }
        if !self.scaling.is_finite() || !self.renorm_eps.is_finite() || self.renorm_eps < 0.0 {
            return Err(config_err(format!(
                "{f}: routed_scaling_factor and renorm_eps must be finite (renorm_eps >= 0)"
            )));
        }
        Ok(())
    }

    /// Adding one vector to every router row leaves routing unchanged (softmax scoring).
    pub fn softmax_invariant(&self) -> bool {
        self.scoring == Scoring::Softmax
    }

    /// The rule reads a bias vector of length E (router bias or selection bias).
    pub fn uses_bias(&self) -> bool {
        self.bias_for_selection || self.has_router_bias
    }
}

// ---------------------------------------------------------------------------------------------
// Routing one token

/// The routing of one token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutingDecision {
    /// log p over the E experts: log-softmax of the logits (+ router bias), or log(σ(z)/Σσ(z)) for
    /// sigmoid routers.
    pub log_probs: Vec<f64>,
    /// The k selected experts in selection order (best first; ties → lowest index first).
    pub selected: Vec<usize>,
    /// Combine weight of each selected expert (same order as `selected`).
    pub weights: Vec<f64>,
}

impl RoutingDecision {
    /// p over the E experts.
    pub fn probs(&self) -> Vec<f64> {
        self.log_probs.iter().map(|l| l.exp()).collect()
    }
}

/// log σ(x) without overflow or cancellation.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// log-softmax of `v` into `out` (for tests).
#[cfg(test)]
fn log_softmax_into(v: &[f64], out: &mut Vec<f64>) {
    let mut p = Vec::new();
    softmax_into(v, out, &mut p);
}

/// log-softmax of `v` into `logp`, as (v − max) − ln Σ exp(v − max), and softmax into `p` from
/// the same exponentials. A common shift of `v` leaves both bit-identical when the shift itself
/// is exact (the row-shift invariance test relies on it).
fn softmax_into(v: &[f64], logp: &mut Vec<f64>, p: &mut Vec<f64>) {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    p.clear();
    p.extend(v.iter().map(|x| (x - m).exp()));
    let sum: f64 = p.iter().sum();
    let ls = sum.ln();
    p.iter_mut().for_each(|x| *x /= sum);
    logp.clear();
    logp.extend(v.iter().map(|x| (x - m) - ls));
}

/// Reused per-token buffers.
#[derive(Default)]
struct Workspace {
    z: Vec<f64>,
    logp: Vec<f64>,
    /// p = exp(logp), from the same exponentials.
    p: Vec<f64>,
    /// σ(z) (sigmoid routers).
    sig: Vec<f64>,
    /// log σ(z) and log σ(−z) (sigmoid routers).
    ls: Vec<f64>,
    l1s: Vec<f64>,
    key: Vec<f64>,
    gkey: Vec<f64>,
    allowed: Vec<bool>,
    idx: Vec<usize>,
    sel: Vec<usize>,
    w: Vec<f64>,
}

/// Sort `idx` so its first `k` entries are the k largest `key`s, best first, ties lowest index
/// first. Keys are finite.
fn top_k_by(key: &[f64], idx: &mut [usize], k: usize) {
    let cmp = |a: &usize, b: &usize| key[*b].total_cmp(&key[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx[..k].sort_unstable_by(cmp);
}

impl Workspace {
    /// Route the logits already in `self.z` (h·Rᵀ, without bias). Returns false when a logit or
    /// bias is not finite (nothing else is filled then).
    fn route(&mut self, bias: Option<&[f64]>, rule: &RoutingRule) -> bool {
        let e = rule.n_experts;
        let k = rule.top_k;
        if rule.has_router_bias {
            if let Some(b) = bias {
                self.z.iter_mut().zip(b).for_each(|(z, b)| *z += b);
            }
        }
        if self.z.iter().any(|z| !z.is_finite())
            || bias.is_some_and(|b| b.iter().any(|x| !x.is_finite()))
        {
            return false;
        }
        match rule.scoring {
            Scoring::Softmax => softmax_into(&self.z, &mut self.logp, &mut self.p),
            Scoring::Sigmoid => {
                self.ls.clear();
                self.ls.extend(self.z.iter().map(|&z| log_sigmoid(z)));
                self.l1s.clear();
                self.l1s.extend(self.z.iter().map(|&z| log_sigmoid(-z)));
                self.sig.clear();
                self.sig.extend(self.ls.iter().map(|l| l.exp()));
                softmax_into(&self.ls, &mut self.logp, &mut self.p);
            }
        }
        // Selection key: logits for softmax routers (same order as the probabilities) and for
        // top-k-on-logits rules; σ (+ correction bias) otherwise.
        self.key.clear();
        if rule.select_on_logits || rule.scoring == Scoring::Softmax {
            self.key.extend_from_slice(&self.z);
        } else {
            self.key.extend_from_slice(&self.sig);
            if rule.bias_for_selection {
                if let Some(b) = bias {
                    self.key.iter_mut().zip(b).for_each(|(s, b)| *s += b);
                }
            }
        }
        self.allowed.clear();
        self.allowed.resize(e, true);
        if let Some((g, tg)) = rule.groups {
            let size = e / g;
            self.gkey.clear();
            for grp in self.key.chunks_exact(size) {
                let (mut m1, mut m2) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
                for &v in grp {
                    if v > m1 {
                        m2 = m1;
                        m1 = v;
                    } else if v > m2 {
                        m2 = v;
                    }
                }
                self.gkey.push(match rule.group_score {
                    GroupScore::Max => m1,
                    GroupScore::Top2Sum => m1 + m2,
                });
            }
            self.idx.clear();
            self.idx.extend(0..g);
            top_k_by(&self.gkey, &mut self.idx, tg);
            self.allowed.iter_mut().for_each(|a| *a = false);
            for &gi in &self.idx[..tg] {
                self.allowed[gi * size..(gi + 1) * size]
                    .iter_mut()
                    .for_each(|a| *a = true);
            }
        }
        self.idx.clear();
        self.idx.extend((0..e).filter(|&i| self.allowed[i]));
        top_k_by(&self.key, &mut self.idx, k);
        self.sel.clear();
        self.sel.extend_from_slice(&self.idx[..k]);
        self.w.clear();
        match rule.weights {
            WeightRule::GatherScores => match rule.scoring {
                Scoring::Softmax => self.w.extend(self.sel.iter().map(|&i| self.p[i])),
                Scoring::Sigmoid => self.w.extend(self.sel.iter().map(|&i| self.sig[i])),
            },
            WeightRule::SoftmaxOverSelected => {
                let m = self.z[self.sel[0]];
                self.w
                    .extend(self.sel.iter().map(|&i| (self.z[i] - m).exp()));
                let s: f64 = self.w.iter().sum();
                self.w.iter_mut().for_each(|w| *w /= s);
            }
            WeightRule::SigmoidOfSelected => match rule.scoring {
                Scoring::Sigmoid => self.w.extend(self.sel.iter().map(|&i| self.sig[i])),
                Scoring::Softmax => self
                    .w
                    .extend(self.sel.iter().map(|&i| log_sigmoid(self.z[i]).exp())),
            },
        }
        if rule.renormalize {
            let s: f64 = self.w.iter().sum::<f64>() + rule.renorm_eps;
            self.w.iter_mut().for_each(|w| *w /= s);
        }
        if rule.scaling != 1.0 {
            self.w.iter_mut().for_each(|w| *w *= rule.scaling);
        }
        true
    }
}

fn check_bias(what: &str, b: Option<&[f32]>, rule: &RoutingRule) -> Result<Option<Vec<f64>>> {
    match (b, rule.uses_bias()) {
        (Some(b), true) => {
            if b.len() != rule.n_experts {
                return Err(config_err(format!(
                    "{what} has {} elements, expected n_experts = {}",
                    b.len(),
                    rule.n_experts
                )));
            }
            Ok(Some(b.iter().map(|&x| x as f64).collect()))
        }
        (None, false) => Ok(None),
        (None, true) => Err(config_err(format!(
            "{}: {what} is required ({})",
            rule.family,
            if rule.has_router_bias {
                "the router bias is added to the logits"
            } else {
                "e_score_correction_bias is added to the scores for selection"
            }
        ))),
        (Some(_), false) => Err(config_err(format!(
            "{}: this routing rule takes no bias, but {what} was given",
            rule.family
        ))),
    }
}

/// Route one token. `logits` = h·Rᵀ (length E, **without** any bias); `bias` is the GPT-OSS
/// router bias or the DeepSeek-V3 correction bias, as the rule says (`None` = zeros).
///
/// Errors: [`Error::Config`] for an invalid rule, a length mismatch, or non-finite logits/bias.
pub fn route_token(
    logits: &[f64],
    bias: Option<&[f32]>,
    rule: &RoutingRule,
) -> Result<RoutingDecision> {
    rule.validate()?;
    if logits.len() != rule.n_experts {
        return Err(config_err(format!(
            "{} logits given, expected n_experts = {}",
            logits.len(),
            rule.n_experts
        )));
    }
    let b: Option<Vec<f64>> = match bias {
        Some(b) if b.len() != rule.n_experts => {
            return Err(config_err(format!(
                "bias has {} elements, expected n_experts = {}",
                b.len(),
                rule.n_experts
            )))
        }
        Some(b) => Some(b.iter().map(|&x| x as f64).collect()),
        None => None,
    };
    let mut ws = Workspace::default();
    ws.z.extend_from_slice(logits);
    if !ws.route(b.as_deref(), rule) {
        return Err(config_err("non-finite logit or bias"));
    }
    Ok(RoutingDecision {
        log_probs: ws.logp,
        selected: ws.sel,
        weights: ws.w,
    })
}

/// The routing of n tokens by one router ([`route_tokens`]); row-major arrays.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutedTokens {
    /// Tokens n.
    pub n_tokens: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Experts E.
    pub n_experts: usize,
    /// `[n, k]` selected experts, each row in selection order (ties → lowest index first).
    pub selected: Vec<usize>,
    /// `[n, k]` combine weights, aligned with `selected`.
    pub weights: Vec<f64>,
    /// `[n, E]` log p (see [`RoutingDecision::log_probs`]).
    pub log_probs: Vec<f64>,
}

/// Route n tokens through one router (batched [`route_token`], logits by f64 GEMM): `r` `[E, H]`,
/// `bias` `[E]` when the rule uses one, `h` `[n, H]`. Memory O(nE): meant for inspection and tests;
/// the drift metrics stream through [`RoutingDriftAcc`] instead.
///
/// Errors: [`Error::Config`] for an invalid rule, a shape mismatch, a missing/unexpected bias, or
/// a token with a non-finite logit (named by its index).
pub fn route_tokens(
    rule: &RoutingRule,
    r: &[f32],
    bias: Option<&[f32]>,
    h: &[f32],
    n: usize,
    hidden: usize,
) -> Result<RoutedTokens> {
    rule.validate()?;
    let (e, k) = (rule.n_experts, rule.top_k);
    check_matrix("router", r.len(), e, hidden)?;
    check_matrix("hidden", h.len(), n, hidden)?;
    let b = check_bias("bias", bias, rule)?;
    let rw = widen(r);
    let mut out = RoutedTokens {
        n_tokens: n,
        top_k: k,
        n_experts: e,
        selected: Vec::with_capacity(n * k),
        weights: Vec::with_capacity(n * k),
        log_probs: Vec::with_capacity(n * e),
    };
    let (mut hbuf, mut z) = (Vec::new(), Vec::new());
    let mut ws = Workspace::default();
    let mut start = 0;
    while start < n {
        let rows = TOKEN_BLOCK.min(n - start);
        logits_block(
            Some(&h[start * hidden..(start + rows) * hidden]),
            rows,
            hidden,
            &rw,
            e,
            &mut hbuf,
            &mut z,
        );
        for i in 0..rows {
            ws.z.clear();
            ws.z.extend_from_slice(&z[i * e..(i + 1) * e]);
            if !ws.route(b.as_deref(), rule) {
                return Err(config_err(format!(
                    "token {} has a non-finite logit or bias",
                    start + i
                )));
            }
            out.selected.extend_from_slice(&ws.sel);
            out.weights.extend_from_slice(&ws.w);
            out.log_probs.extend_from_slice(&ws.logp);
        }
        start += rows;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Streaming data-dependent drift (§4.3)

/// f(d) = (1+d)ln(1+d) + (1−d)ln(1−d) ∈ [0, 2 ln 2] for d ∈ [−1, 1], with 0·ln 0 = 0.
///
/// This is the branch for |d| ≤ ½ given δ = atanh(d): 2d·δ ≈ 2d² and ln(1 − d²) ≈ −d², a factor-2
/// cancellation at most.
fn js_f_small(d: f64, delta: f64) -> f64 {
    2.0 * d * delta + (-d * d).ln_1p()
}

/// f(d) for ½ < |d| ≤ 1, with 0·ln 0 = 0 at |d| = 1.
fn js_f_large(a: f64) -> f64 {
    if a >= 1.0 {
        2.0 * std::f64::consts::LN_2
    } else {
        (1.0 + a) * a.ln_1p() + (1.0 - a) * (-a).ln_1p()
    }
}

/// ½·m·f(d) for one outcome given its two log-probabilities.
fn js_term(l0: f64, lt: f64) -> f64 {
    js_term_p(l0.exp(), lt.exp(), l0, lt)
}

/// [`js_term`] with the probabilities already at hand (p = exp(l)). d = tanh(δ) with
/// δ = (l0 − lt)/2, so atanh(d) = δ needs no second transcendental.
fn js_term_p(p0: f64, pt: f64, l0: f64, lt: f64) -> f64 {
    if l0 == f64::NEG_INFINITY && lt == f64::NEG_INFINITY {
        return 0.0;
    }
    let m = 0.5 * (p0 + pt);
    let f = if l0 == f64::NEG_INFINITY || lt == f64::NEG_INFINITY {
        2.0 * std::f64::consts::LN_2
    } else {
        let delta = (0.5 * (l0 - lt)).abs();
        let d = delta.tanh();
        if d <= 0.5 {
            js_f_small(d, delta)
        } else {
            js_f_large(d)
        }
    };
    0.5 * m * f
}

/// Jensen–Shannon divergence (natural log) of two distributions given as log-probabilities.
pub fn js_divergence_log(logp: &[f64], logq: &[f64]) -> f64 {
    logp.iter().zip(logq).map(|(&a, &b)| js_term(a, b)).sum()
}

/// Data-dependent routing drift (METRICS §4.3); see the module docs for definitions.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingDrift {
    /// Tokens seen (including non-finite ones).
    pub n_tokens: u64,
    /// Tokens with a non-finite logit or bias; when > 0 every metric below is NaN.
    pub n_nonfinite: u64,
    /// mean_i JS(p⁰_i, p^t_i), p = softmax, or σ/Σσ for sigmoid routers.
    pub js_mean: f64,
    /// Sigmoid routers only (else NaN): mean over tokens and experts of the Bernoulli JS.
    pub js_bernoulli_mean: f64,
    /// mean_i |S⁰∩S^t|/k.
    pub topk_overlap: f64,
    /// mean_i |S⁰∩S^t|/(2k − |S⁰∩S^t|).
    pub jaccard: f64,
    /// Fraction of tokens whose first-selected expert agrees.
    pub top1_agreement: f64,
    /// mean_i Σ_e |w⁰_ie − w^t_ie| of the dense combine weights.
    pub weight_l1_mean: f64,
    /// Expert load f⁰_e (fraction of routing slots), length E.
    pub load_base: Vec<f64>,
    /// Expert load f^t_e, length E.
    pub load_ckpt: Vec<f64>,
    /// H(f⁰)/ln E ∈ [0, 1] (NaN for E = 1).
    pub load_entropy_base: f64,
    /// H(f^t)/ln E.
    pub load_entropy_ckpt: f64,
    /// ½‖f^t − f⁰‖₁ ∈ [0, 1].
    pub load_tv: f64,
    /// E·max_e f⁰_e.
    pub max_load_ratio_base: f64,
    /// E·max_e f^t_e.
    pub max_load_ratio_ckpt: f64,
    /// E·Σ_e f⁰_e P⁰_e with P_e = mean_i p_ie (Switch / HF load-balancing loss).
    pub balance_base: f64,
    /// E·Σ_e f^t_e P^t_e.
    pub balance_ckpt: f64,
    /// Qwen2-MoE shared-expert gate: mean_i |σ(g^t·h^t_i) − σ(g⁰·h⁰_i)| (NaN when not given).
    pub shared_gate_drift: f64,
}

/// Streaming accumulator of [`RoutingDrift`] over token batches: memory O(E); accumulators over
/// disjoint token sets merge by addition.
#[derive(Debug, Clone)]
pub struct RoutingDriftAcc {
    rule: RoutingRule,
    n: u64,
    n_nonfinite: u64,
    js: f64,
    js_b: f64,
    overlap: f64,
    jaccard: f64,
    top1: f64,
    wl1: f64,
    count0: Vec<u64>,
    countt: Vec<u64>,
    psum0: Vec<f64>,
    psumt: Vec<f64>,
    sg_sum: f64,
    sg_n: u64,
}

/// Tokens per GEMM block: bounds the f64 copy of h to 256·H values.
const TOKEN_BLOCK: usize = 256;

/// Routers widened to f64 once per call.
struct Prepared {
    r0: Vec<f64>,
    rt: Vec<f64>,
    b0: Option<Vec<f64>>,
    bt: Option<Vec<f64>>,
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// z[rows×E] = h[rows×H] · R[E×H]ᵀ in f64. `h = None` reuses the f64 copy already in `hbuf`.
/// Computed as zᵀ = R·hᵀ into a column-major E×rows destination (the same bytes as row-major z):
/// faer's f64 GEMM runs this layout at about twice the rate of a row-major destination.
fn logits_block(
    h: Option<&[f32]>,
    rows: usize,
    hidden: usize,
    r: &[f64],
    e: usize,
    hbuf: &mut Vec<f64>,
    z: &mut Vec<f64>,
) {
    if let Some(h) = h {
        hbuf.clear();
        hbuf.extend(h.iter().map(|&x| x as f64));
    }
    z.clear();
    z.resize(rows * e, 0.0);
    let zt = MatMut::from_column_major_slice_mut(&mut z[..], e, rows);
    let rm = MatRef::from_row_major_slice(r, e, hidden);
    let ht = MatRef::from_column_major_slice(&hbuf[..rows * hidden], hidden, rows);
    matmul(zt, Accum::Replace, rm, ht, 1.0f64, Par::Seq);
    clear_upper_vector_state();
}

/// faer's AVX-512 GEMM kernels return with the upper halves of the vector registers dirty. On
/// this class of x86 CPU every later legacy-SSE instruction then pays a state-transition penalty,
/// and glibc's `exp`/`log1p`/`tanh` (SSE code) slowed from 8 ns to 200 ns per call, making the
/// per-token routing 25× slower than the GEMM. `vzeroupper` after each GEMM restores full speed.
#[inline]
fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx")]
        fn zeroupper() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU supports AVX (checked just above); vzeroupper only clears the upper
            // halves of vector registers, which hold no live values between Rust statements.
            unsafe { zeroupper() }
        }
    }
}

fn sigmoid_dot(g: &[f32], h: &[f32]) -> f64 {
    let s: f64 = g.iter().zip(h).map(|(&a, &b)| a as f64 * b as f64).sum();
    log_sigmoid(s).exp()
}

impl RoutingDriftAcc {
    /// Empty accumulator for `rule` (validated at the first [`Self::update`]).
    pub fn new(rule: &RoutingRule) -> Self {
        let e = rule.n_experts;
        RoutingDriftAcc {
            rule: rule.clone(),
            n: 0,
            n_nonfinite: 0,
            js: 0.0,
            js_b: 0.0,
            overlap: 0.0,
            jaccard: 0.0,
            top1: 0.0,
            wl1: 0.0,
            count0: vec![0; e],
            countt: vec![0; e],
            psum0: vec![0.0; e],
            psumt: vec![0.0; e],
            sg_sum: 0.0,
            sg_n: 0,
        }
    }

    /// The rule this accumulator applies.
    pub fn rule(&self) -> &RoutingRule {
        &self.rule
    }

    fn prepare(
        &self,
        r0: &[f32],
        b0: Option<&[f32]>,
        rt: &[f32],
        bt: Option<&[f32]>,
        hidden: usize,
    ) -> Result<Prepared> {
        self.rule.validate()?;
        let e = self.rule.n_experts;
        check_matrix("router_base", r0.len(), e, hidden)?;
        check_matrix("router_ckpt", rt.len(), e, hidden)?;
        Ok(Prepared {
            r0: widen(r0),
            rt: widen(rt),
            b0: check_bias("bias_base", b0, &self.rule)?,
            bt: check_bias("bias_ckpt", bt, &self.rule)?,
        })
    }

    /// Add n tokens. `r0`, `rt`: `[E, H]` routers; `b0`, `bt`: their biases when the rule uses one
    /// (required then, refused otherwise); `h0`: `[n, H]` hidden states for the base router, `ht`:
    /// for the checkpoint router (pass `h0` again for mode (i)).
    ///
    /// Errors: [`Error::Config`] for an invalid rule or any length/shape mismatch.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        r0: &[f32],
        b0: Option<&[f32]>,
        rt: &[f32],
        bt: Option<&[f32]>,
        h0: &[f32],
        ht: &[f32],
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        let p = self.prepare(r0, b0, rt, bt, hidden)?;
        self.update_prepared(&p, h0, ht, n, hidden)
    }

    fn update_prepared(
        &mut self,
        p: &Prepared,
        h0: &[f32],
        ht: &[f32],
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        check_matrix("hidden_base", h0.len(), n, hidden)?;
        check_matrix("hidden_ckpt", ht.len(), n, hidden)?;
        let e = self.rule.n_experts;
        let k = self.rule.top_k;
        let sigmoid = self.rule.scoring == Scoring::Sigmoid;
        let (mut hbuf, mut z0, mut zt) = (Vec::new(), Vec::new(), Vec::new());
        let (mut w0, mut wt) = (Workspace::default(), Workspace::default());
        let mut mark = vec![f64::NAN; e];
        let same = std::ptr::eq(h0, ht);
        let mut start = 0;
        while start < n {
            let rows = TOKEN_BLOCK.min(n - start);
            let span = start * hidden..(start + rows) * hidden;
            logits_block(
                Some(&h0[span.clone()]),
                rows,
                hidden,
                &p.r0,
                e,
                &mut hbuf,
                &mut z0,
            );
            // Mode (i) passes the same hidden states twice: widen them once.
            let ht_block = (!same).then(|| &ht[span]);
            logits_block(ht_block, rows, hidden, &p.rt, e, &mut hbuf, &mut zt);
            for i in 0..rows {
                self.n += 1;
                w0.z.clear();
                w0.z.extend_from_slice(&z0[i * e..(i + 1) * e]);
                wt.z.clear();
                wt.z.extend_from_slice(&zt[i * e..(i + 1) * e]);
                let ok0 = w0.route(p.b0.as_deref(), &self.rule);
                let okt = wt.route(p.bt.as_deref(), &self.rule);
                if !(ok0 && okt) {
                    self.n_nonfinite += 1;
                    continue;
                }
                self.js += (0..e)
                    .map(|j| js_term_p(w0.p[j], wt.p[j], w0.logp[j], wt.logp[j]))
                    .sum::<f64>();
                if sigmoid {
                    let s: f64 = (0..e)
                        .map(|j| js_term(w0.ls[j], wt.ls[j]) + js_term(w0.l1s[j], wt.l1s[j]))
                        .sum();
                    self.js_b += s / e as f64;
                }
                // Dense weights of the base selection in `mark` (NaN = not selected).
                for (&j, &w) in w0.sel.iter().zip(&w0.w) {
                    mark[j] = w;
                }
                let mut common = 0usize;
                let mut l1 = 0.0;
                for (&j, &w) in wt.sel.iter().zip(&wt.w) {
                    if mark[j].is_nan() {
                        l1 += w.abs();
                    } else {
                        common += 1;
                        l1 += (mark[j] - w).abs();
                        mark[j] = f64::NAN;
                    }
                }
                for &j in &w0.sel {
                    if !mark[j].is_nan() {
                        l1 += mark[j].abs();
                        mark[j] = f64::NAN;
                    }
                }
                self.wl1 += l1;
                self.overlap += common as f64 / k as f64;
                self.jaccard += common as f64 / (2 * k - common) as f64;
                self.top1 += (w0.sel[0] == wt.sel[0]) as u8 as f64;
                for &j in &w0.sel {
                    self.count0[j] += 1;
                }
                for &j in &wt.sel {
                    self.countt[j] += 1;
                }
                for j in 0..e {
                    self.psum0[j] += w0.p[j];
                    self.psumt[j] += wt.p[j];
                }
            }
            start += rows;
        }
        Ok(())
    }

    /// Add n tokens of the Qwen2-MoE shared-expert gate drift |σ(g^t·h^t) − σ(g⁰·h⁰)|; `g0`, `gt`
    /// are the [1, H] gate weights, `h0`/`ht` as in [`Self::update`].
    ///
    /// Errors: [`Error::Config`] on a length mismatch.
    pub fn update_shared_gate(
        &mut self,
        g0: &[f32],
        gt: &[f32],
        h0: &[f32],
        ht: &[f32],
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        check_matrix("shared_gate_base", g0.len(), 1, hidden)?;
        check_matrix("shared_gate_ckpt", gt.len(), 1, hidden)?;
        check_matrix("hidden_base", h0.len(), n, hidden)?;
        check_matrix("hidden_ckpt", ht.len(), n, hidden)?;
        if hidden == 0 {
            self.sg_n += n as u64;
            return Ok(());
        }
        for (a, b) in h0.chunks_exact(hidden).zip(ht.chunks_exact(hidden)) {
            self.sg_sum += (sigmoid_dot(gt, b) - sigmoid_dot(g0, a)).abs();
            self.sg_n += 1;
        }
        Ok(())
    }

    /// Add another accumulator over disjoint tokens.
    ///
    /// Errors: [`Error::Config`] when the two rules differ.
    pub fn merge(&mut self, o: &Self) -> Result<()> {
        if self.rule != o.rule {
            return Err(config_err(
                "cannot merge routing accumulators of different rules",
            ));
        }
        self.n += o.n;
        self.n_nonfinite += o.n_nonfinite;
        self.js += o.js;
        self.js_b += o.js_b;
        self.overlap += o.overlap;
        self.jaccard += o.jaccard;
        self.top1 += o.top1;
        self.wl1 += o.wl1;
        for (a, b) in self.count0.iter_mut().zip(&o.count0) {
            *a += b;
        }
        for (a, b) in self.countt.iter_mut().zip(&o.countt) {
            *a += b;
        }
        for (a, b) in self.psum0.iter_mut().zip(&o.psum0) {
            *a += b;
        }
        for (a, b) in self.psumt.iter_mut().zip(&o.psumt) {
            *a += b;
        }
        self.sg_sum += o.sg_sum;
        self.sg_n += o.sg_n;
        Ok(())
    }

    /// The metrics of everything added so far (NaN everywhere when no token, or a non-finite one).
    pub fn finish(&self) -> RoutingDrift {
        let e = self.rule.n_experts;
        let ok = self.n > 0 && self.n_nonfinite == 0;
        let nan_unless = |v: f64| if ok { v } else { f64::NAN };
        let nf = self.n as f64;
        let slots = nf * self.rule.top_k as f64;
        let load =
            |c: &[u64]| -> Vec<f64> { c.iter().map(|&x| nan_unless(x as f64 / slots)).collect() };
        let (f0, ft) = (load(&self.count0), load(&self.countt));
        let entropy = |f: &[f64]| {
            let h: f64 = f
                .iter()
                .map(|&x| if x > 0.0 { -x * x.ln() } else { 0.0 * x })
                .sum();
            h / (e as f64).ln()
        };
        let max_ratio = |f: &[f64]| {
            e as f64
                * f.iter().copied().fold(
                    f64::NEG_INFINITY,
                    |a, b| if b.is_nan() { b } else { a.max(b) },
                )
        };
        let balance = |f: &[f64], ps: &[f64]| {
            e as f64 * f.iter().zip(ps).map(|(a, p)| a * p / nf).sum::<f64>()
        };
        RoutingDrift {
            n_tokens: self.n,
            n_nonfinite: self.n_nonfinite,
            js_mean: nan_unless(self.js / nf),
            js_bernoulli_mean: if self.rule.scoring == Scoring::Sigmoid {
                nan_unless(self.js_b / nf)
            } else {
                f64::NAN
            },
            topk_overlap: nan_unless(self.overlap / nf),
            jaccard: nan_unless(self.jaccard / nf),
            top1_agreement: nan_unless(self.top1 / nf),
            weight_l1_mean: nan_unless(self.wl1 / nf),
            load_entropy_base: entropy(&f0),
            load_entropy_ckpt: entropy(&ft),
            load_tv: 0.5 * f0.iter().zip(&ft).map(|(a, b)| (a - b).abs()).sum::<f64>(),
            max_load_ratio_base: max_ratio(&f0),
            max_load_ratio_ckpt: max_ratio(&ft),
            balance_base: balance(&f0, &self.psum0),
            balance_ckpt: balance(&ft, &self.psumt),
            shared_gate_drift: if self.sg_n > 0 {
                self.sg_sum / self.sg_n as f64
            } else {
                f64::NAN
            },
            load_base: f0,
            load_ckpt: ft,
        }
    }
}

/// Options of [`routing_drift`].
#[derive(Debug, Clone, Copy)]
pub struct RoutingOptions {
    /// Tokens per work item (results depend on it only through f64 summation order).
    pub batch: usize,
    /// Worker threads; 0 = one per available core. Results do not depend on it.
    pub threads: usize,
}

impl Default for RoutingOptions {
    fn default() -> Self {
        RoutingOptions {
            batch: 2048,
            threads: 0,
        }
    }
}

/// Shared-expert gate weights of both checkpoints (`[1, H]` each).
pub type SharedGate<'a> = (&'a [f32], &'a [f32]);

/// [`RoutingDriftAcc`] over all n tokens at once: fixed batches of `opts.batch` tokens run in
/// parallel and merge in batch order, so the result does not depend on the thread count.
///
/// Errors: as [`RoutingDriftAcc::update`]; [`Error::Config`] when `opts.batch` is 0 or the worker
/// pool cannot start.
#[allow(clippy::too_many_arguments)]
pub fn routing_drift(
    rule: &RoutingRule,
    r0: &[f32],
    b0: Option<&[f32]>,
    rt: &[f32],
    bt: Option<&[f32]>,
    h0: &[f32],
    ht: &[f32],
    n: usize,
    hidden: usize,
    shared_gate: Option<SharedGate<'_>>,
    opts: &RoutingOptions,
) -> Result<RoutingDrift> {
    use rayon::prelude::*;
    if opts.batch == 0 {
        return Err(config_err("batch_size must be at least 1"));
    }
    let mut acc = RoutingDriftAcc::new(rule);
    let p = acc.prepare(r0, b0, rt, bt, hidden)?;
    check_matrix("hidden_base", h0.len(), n, hidden)?;
    check_matrix("hidden_ckpt", ht.len(), n, hidden)?;
    if let Some((g0, gt)) = shared_gate {
        // Checked here too so that a wrong gate is reported even without tokens.
        check_matrix("shared_gate_base", g0.len(), 1, hidden)?;
        check_matrix("shared_gate_ckpt", gt.len(), 1, hidden)?;
    }
    let n_batches = n.div_ceil(opts.batch);
    let work = |i: usize| -> Result<RoutingDriftAcc> {
        let (s, t) = (i * opts.batch, ((i + 1) * opts.batch).min(n));
        let span = s * hidden..t * hidden;
        let mut a = RoutingDriftAcc::new(rule);
        a.update_prepared(&p, &h0[span.clone()], &ht[span.clone()], t - s, hidden)?;
        if let Some((g0, gt)) = shared_gate {
            a.update_shared_gate(g0, gt, &h0[span.clone()], &ht[span], t - s, hidden)?;
        }
        Ok(a)
    };
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let parts: Vec<RoutingDriftAcc> = if threads <= 1 || n_batches <= 1 {
        (0..n_batches).map(work).collect::<Result<_>>()?
    } else {
        crate::pool::with_pool(threads, "forgetscope-router", |pool| {
            pool.install(|| {
                (0..n_batches)
                    .into_par_iter()
                    .map(work)
                    .collect::<Result<_>>()
            })
        })??
    };
    for part in &parts {
        acc.merge(part)?;
    }
    Ok(acc.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const LN2: f64 = std::f64::consts::LN_2;

    fn rule(cfg: Value) -> RoutingRule {
        RoutingRule::from_config(&cfg).unwrap()
    }

    fn mixtral(e: usize, k: usize) -> RoutingRule {
        rule(json!({"model_type": "mixtral", "num_local_experts": e, "num_experts_per_tok": k}))
    }

    /// Route n tokens through a router that is the identity (hidden = E): logits = h.
    fn drift_from_logits(r: &RoutingRule, z0: &[f32], zt: &[f32], n: usize) -> RoutingDrift {
        let e = r.n_experts;
        let eye: Vec<f32> = (0..e * e)
            .map(|i| if i / e == i % e { 1.0 } else { 0.0 })
            .collect();
        let mut acc = RoutingDriftAcc::new(r);
        acc.update(&eye, None, &eye, None, z0, zt, n, e).unwrap();
        acc.finish()
    }

    #[test]
    fn overlap_known_values() {
        let r = mixtral(4, 2);
        // identical
        let d = drift_from_logits(&r, &[4., 3., 0., 0.], &[4., 3., 0., 0.], 1);
        assert_eq!(
            (d.topk_overlap, d.jaccard, d.top1_agreement),
            (1.0, 1.0, 1.0)
        );
        assert_eq!(d.js_mean, 0.0);
        assert_eq!(d.weight_l1_mean, 0.0);
        // disjoint
        let d = drift_from_logits(&r, &[4., 3., 0., 0.], &[0., 0., 4., 3.], 1);
        assert_eq!(
            (d.topk_overlap, d.jaccard, d.top1_agreement),
            (0.0, 0.0, 0.0)
        );
        assert!((d.load_tv - 1.0).abs() < 1e-15);
        // k = 2 sharing one expert
        let d = drift_from_logits(&r, &[4., 3., 0., 0.], &[4., 0., 3., 0.], 1);
        assert_eq!(d.topk_overlap, 0.5);
        assert!((d.jaccard - 1.0 / 3.0).abs() < 1e-15);
        assert_eq!(d.top1_agreement, 1.0);
    }

    #[test]
    fn js_bounds_and_disjoint_one_hots() {
        assert_eq!(
            js_divergence_log(&[0.0, f64::NEG_INFINITY], &[f64::NEG_INFINITY, 0.0]),
            LN2
        );
        let l = [0.3f64.ln(), 0.7f64.ln()];
        assert_eq!(js_divergence_log(&l, &l), 0.0);
        // Numerically one-hot softmax: JS → ln 2.
        let r = mixtral(2, 1);
        let d = drift_from_logits(&r, &[800., 0.], &[0., 800.], 1);
        assert!((d.js_mean - LN2).abs() < 1e-12, "{}", d.js_mean);
        // Small drift keeps full relative precision: d_e = ±1e-9, m ≈ ½ each, JS ≈ ½Σ m d² = d²/2.
        let l = 0.5f64.ln();
        let js = js_divergence_log(&[l, l], &[l - 2e-9, l + 2e-9]);
        let approx = 0.5e-18;
        assert!((js - approx).abs() < 1e-6 * approx, "{js} vs {approx}");
    }

    #[test]
    fn softmax_row_shift_invariance() {
        let (e, h, n) = (6usize, 5usize, 40usize);
        let r0: Vec<f32> = (0..e * h)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let c: Vec<f32> = (0..h).map(|j| (j as f32 - 2.0) / 4.0).collect();
        let rt: Vec<f32> = (0..e * h).map(|i| r0[i] + c[i % h]).collect();
        let hs: Vec<f32> = (0..n * h)
            .map(|i| ((i * 29 % 23) as f32 - 11.0) / 16.0)
            .collect();
        let r = mixtral(e, 2);
        let mut acc = RoutingDriftAcc::new(&r);
        acc.update(&r0, None, &rt, None, &hs, &hs, n, h).unwrap();
        let d = acc.finish();
        assert!(d.js_mean.abs() < 1e-15, "{}", d.js_mean);
        assert_eq!(d.topk_overlap, 1.0);
        assert_eq!(d.load_tv, 0.0);
        let w = router_weight_drift(&r0, &rt, e, h, true).unwrap();
        assert!(w.rel_delta > 0.1);
        assert!(w.per_expert.iter().all(|x| x.rel_drift > 0.0));
        assert!(w.per_expert.iter().all(|x| x.centered_rel_drift == 0.0));
        assert!(w.per_expert.iter().all(|x| x.centered_one_minus_cos == 0.0));
        assert_eq!(w.centered_rel_delta, 0.0);
        let s = router_weight_drift(&r0, &rt, e, h, false).unwrap();
        assert!(s.per_expert[0].centered_rel_drift.is_nan() && s.centered_rel_delta.is_nan());
    }

    #[test]
    fn weight_drift_known_values() {
        // Row 0: rotated by 90° at equal norm; row 1: scaled by 2; row 2: unchanged.
        let r0 = [1.0f32, 0.0, 3.0, 4.0, 1.0, 1.0];
        let rt = [0.0f32, 1.0, 6.0, 8.0, 1.0, 1.0];
        let w = router_weight_drift(&r0, &rt, 3, 2, false).unwrap();
        let p = &w.per_expert;
        assert_eq!(p[0].one_minus_cos, 1.0);
        assert_eq!(p[0].norm_drift, 0.0);
        assert!((p[0].rel_drift - 2f64.sqrt()).abs() < 1e-15);
        assert_eq!(p[1].one_minus_cos, 0.0);
        assert_eq!(p[1].norm_drift, 1.0);
        assert_eq!(p[1].rel_drift, 1.0);
        assert_eq!((p[2].one_minus_cos, p[2].rel_drift), (0.0, 0.0));
        assert_eq!(w.rel_drift_max, 2f64.sqrt());
        assert_eq!(w.frac_unchanged, 2.0 / 6.0);
        // Tiny drift keeps full relative precision: r_t = r_0·(1 + ε) along one axis.
        let a = [1.0f32, 2.0];
        let b = [1.0f32, 2.0 + 2f32.powi(-22)];
        let w = router_weight_drift(&a, &b, 1, 2, false).unwrap();
        let (a64, b64) = ([1.0f64, 2.0], [1.0f64, 2.0 + 2f64.powi(-22)]);
        let dot = a64[0] * b64[0] + a64[1] * b64[1];
        let (na, nb) = (5f64.sqrt(), (b64[0] * b64[0] + b64[1] * b64[1]).sqrt());
        let exact = {
            // 1 − cos = sin²θ/(1 + cos θ) with sin θ = |a×b|/(|a||b|): cancellation-free reference.
            let cross = a64[0] * b64[1] - a64[1] * b64[0];
            let s2 = (cross / (na * nb)).powi(2);
            s2 / (1.0 + dot / (na * nb))
        };
        let got = w.per_expert[0].one_minus_cos;
        assert!((got - exact).abs() < 1e-9 * exact, "{got} vs {exact}");
        assert!(router_weight_drift(&a, &b, 2, 2, true).is_err());
        assert!(router_weight_drift(&[], &[], 0, 2, true).is_err());
        // Zero base row → NaN, not a panic.
        let w = router_weight_drift(&[0.0, 0.0], &[1.0, 0.0], 1, 2, false).unwrap();
        assert!(w.per_expert[0].rel_drift.is_nan() && w.rel_drift_max.is_nan());
    }

    #[test]
    fn bias_drift_known_values() {
        let b = bias_drift(&[3.0, 4.0], &[3.0, 4.5]).unwrap();
        assert_eq!((b.l2, b.max_abs, b.rel), (0.5, 0.5, 0.1));
        assert!(bias_drift(&[0.0, 0.0], &[0.0, 0.0]).unwrap().rel.is_nan());
        assert!(bias_drift(&[1.0], &[1.0, 2.0]).is_err());
        assert!(bias_drift(&[1.0], &[f32::NAN]).unwrap().max_abs.is_nan());
    }

    #[test]
    fn gini_known_values() {
        assert_eq!(gini(&[1.0, 1.0, 1.0, 1.0]), 0.0);
        assert_eq!(gini(&[0.0, 0.0, 0.0, 1.0]), 0.75);
        assert_eq!(gini(&[1.0, 2.0, 3.0, 4.0]), 0.25);
        assert_eq!(gini(&[5.0]), 0.0);
        assert!(gini(&[]).is_nan());
        assert!(gini(&[0.0, 0.0]).is_nan());
        assert!(gini(&[1.0, f64::NAN]).is_nan());
        assert!(gini(&[1.0, -1.0]).is_nan());
    }

    #[test]
    fn load_entropy_and_balance() {
        // 4 tokens, each to a different expert (k = 1): uniform load.
        let r = mixtral(4, 1);
        let z: Vec<f32> = (0..16)
            .map(|i| if i / 4 == i % 4 { 5.0 } else { 0.0 })
            .collect();
        let d = drift_from_logits(&r, &z, &z, 4);
        assert!((d.load_entropy_base - 1.0).abs() < 1e-15);
        assert_eq!(d.max_load_ratio_base, 1.0);
        assert_eq!(d.load_base, vec![0.25; 4]);
        // Uniform p and uniform f: balance = 1.
        let d = drift_from_logits(&r, &[0.0; 4], &[0.0; 4], 1);
        assert!((d.balance_base - 1.0).abs() < 1e-15);
        // All tokens to the same k experts: entropy = ln k / ln E.
        let r = mixtral(8, 2);
        let z: Vec<f32> = (0..24)
            .map(|i| [3.0, 2.0, 0., 0., 0., 0., 0., 0.][i % 8])
            .collect();
        let d = drift_from_logits(&r, &z, &z, 3);
        assert!((d.load_entropy_base - 2f64.ln() / 8f64.ln()).abs() < 1e-15);
        assert_eq!(d.max_load_ratio_base, 4.0);
    }

    #[test]
    fn ties_break_lowest_index_first() {
        let r = mixtral(4, 2);
        let d = route_token(&[1.0, 2.0, 2.0, 2.0], None, &r).unwrap();
        assert_eq!(d.selected, vec![1, 2]);
        let d = route_token(&[0.0; 4], None, &r).unwrap();
        assert_eq!(d.selected, vec![0, 1]);
        assert_eq!(d.weights, vec![0.5, 0.5]);
    }

    #[test]
    fn family_rules() {
        // Mixtral renormalises always; Qwen2 not by default.
        let z = [2.0f64, 1.0, 0.0, -1.0];
        let m = route_token(&z, None, &mixtral(4, 2)).unwrap();
        assert!((m.weights.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let q =
            rule(json!({"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2}));
        let d = route_token(&z, None, &q).unwrap();
        let p = m.probs();
        assert_eq!(d.selected, vec![0, 1]);
        assert!((d.weights[0] - p[0]).abs() < 1e-15);
        // GPT-OSS: bias shifts selection; softmax over the selected.
        let g = rule(
            json!({"model_type": "gpt_oss", "num_local_experts": 4, "num_experts_per_tok": 2}),
        );
        let d = route_token(&z, Some(&[0.0, 0.0, 0.0, 4.0]), &g).unwrap();
        assert_eq!(d.selected, vec![3, 0]);
        let e = (-1.0f64).exp();
        assert!((d.weights[0] - 1.0 / (1.0 + e)).abs() < 1e-15);
        // Llama 4: σ of the selected logit.
        let l = rule(
            json!({"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": 4, "num_experts_per_tok": 1}}),
        );
        assert_eq!(l.family, "llama4_text");
        let d = route_token(&z, None, &l).unwrap();
        assert_eq!(d.selected, vec![0]);
        assert!((d.weights[0] - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-15);
        // DeepSeek-V3: groups of 2, keep 1 group; the bias moves selection, not the weights.
        let v3 = rule(
            json!({"model_type": "deepseek_v3", "n_routed_experts": 4, "num_experts_per_tok": 1,
            "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.0, "norm_topk_prob": false}),
        );
        let d = route_token(&z, Some(&[0.0, 0.0, 0.0, 5.0]), &v3).unwrap();
        assert_eq!(d.selected, vec![3]);
        assert!((d.weights[0] - 2.0 / (1.0 + 1f64.exp())).abs() < 1e-15);
        // DeepSeek-V2 group-limited: group max picks group 1 = {2, 3}.
        let v2 = rule(
            json!({"model_type": "deepseek_v2", "n_routed_experts": 4, "num_experts_per_tok": 2,
            "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}),
        );
        let d = route_token(&[1.0, 1.0, 3.0, -5.0], None, &v2).unwrap();
        assert_eq!(d.selected, vec![2, 3]);
    }

    #[test]
    fn batched_routing_equals_per_token() {
        let (e, h, n) = (6usize, 5usize, 300usize);
        let g = rule(
            json!({"model_type": "gpt_oss", "num_local_experts": e, "num_experts_per_tok": 2}),
        );
        let (r, b, hs) = (lcg(10, e * h), lcg(11, e), lcg(12, n * h));
        let all = route_tokens(&g, &r, Some(&b), &hs, n, h).unwrap();
        for i in [0, 1, 255, 256, 299] {
            let z: Vec<f64> = (0..e)
                .map(|j| {
                    (0..h)
                        .map(|c| hs[i * h + c] as f64 * r[j * h + c] as f64)
                        .sum()
                })
                .collect();
            let d = route_token(&z, Some(&b), &g).unwrap();
            assert_eq!(d.selected, all.selected[i * 2..i * 2 + 2]);
            for (x, y) in d.weights.iter().zip(&all.weights[i * 2..i * 2 + 2]) {
                assert!((x - y).abs() < 1e-14);
            }
        }
        assert!(route_tokens(&g, &r, None, &hs, n, h).is_err());
    }

    #[test]
    fn config_errors() {
        let e = RoutingRule::from_config(&json!({"model_type": "llama"})).unwrap_err();
        assert!(e.to_string().contains("\"llama\""), "{e}");
        assert!(RoutingRule::from_config(&json!({})).is_err());
        assert!(RoutingRule::from_config(
            &json!({"model_type": "deepseek_v2", "n_routed_experts": 8})
        )
        .is_err());
        assert!(RoutingRule::from_config(
            &json!({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3})
        )
        .is_err());
        assert!(RoutingRule::from_config(
            &json!({"model_type": "deepseek_v3", "n_routed_experts": 6, "n_group": 4})
        )
        .is_err());
        assert!(RoutingRule::from_config(
            &json!({"model_type": "mixtral", "num_local_experts": "8"})
        )
        .is_err());
        // Bias required / refused.
        let g = rule(
            json!({"model_type": "gpt_oss", "num_local_experts": 2, "num_experts_per_tok": 1}),
        );
        let mut acc = RoutingDriftAcc::new(&g);
        assert!(acc
            .update(&[1.0, 0.0], None, &[1.0, 0.0], None, &[1.0], &[1.0], 1, 1)
            .is_err());
        let m = mixtral(2, 1);
        let mut acc = RoutingDriftAcc::new(&m);
        assert!(acc
            .update(
                &[1.0, 0.0],
                Some(&[0.0, 0.0]),
                &[1.0, 0.0],
                None,
                &[1.0],
                &[1.0],
                1,
                1
            )
            .is_err());
        assert!(acc
            .update(
                &[1.0, 0.0],
                None,
                &[1.0, 0.0],
                None,
                &[1.0, 2.0],
                &[1.0],
                1,
                1
            )
            .is_err());
    }

    #[test]
    fn nonfinite_and_empty_are_nan() {
        let r = mixtral(2, 1);
        let d = drift_from_logits(&r, &[f32::NAN, 0.0], &[0.0, 0.0], 1);
        assert_eq!(d.n_nonfinite, 1);
        assert!(d.js_mean.is_nan() && d.topk_overlap.is_nan() && d.load_base[0].is_nan());
        let d = RoutingDriftAcc::new(&r).finish();
        assert_eq!(d.n_tokens, 0);
        assert!(d.js_mean.is_nan() && d.load_entropy_base.is_nan() && d.shared_gate_drift.is_nan());
    }

    #[test]
    fn shared_gate() {
        let r = mixtral(2, 1);
        let mut acc = RoutingDriftAcc::new(&r);
        acc.update_shared_gate(&[0.0, 0.0], &[1.0, 0.0], &[2.0, 5.0], &[2.0, 5.0], 1, 2)
            .unwrap();
        let want = 1.0 / (1.0 + (-2.0f64).exp()) - 0.5;
        assert!((acc.finish().shared_gate_drift - want).abs() < 1e-15);
    }

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn batched_threads_and_merge_agree() {
        let (e, h, n) = (8usize, 16usize, 700usize);
        let v3 = rule(
            json!({"model_type": "deepseek_v3", "n_routed_experts": e, "num_experts_per_tok": 2,
            "n_group": 4, "topk_group": 2}),
        );
        let (r0, rt, hs) = (lcg(1, e * h), lcg(2, e * h), lcg(3, n * h));
        let (b0, bt) = (lcg(4, e), lcg(5, e));
        let run = |batch, threads| {
            routing_drift(
                &v3,
                &r0,
                Some(&b0),
                &rt,
                Some(&bt),
                &hs,
                &hs,
                n,
                h,
                None,
                &RoutingOptions { batch, threads },
            )
            .unwrap()
        };
        let a = run(100, 1);
        let b = run(100, 2);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let mut whole = RoutingDriftAcc::new(&v3);
        whole
            .update(&r0, Some(&b0), &rt, Some(&bt), &hs, &hs, n, h)
            .unwrap();
        let w = whole.finish();
        assert_eq!(a.load_base, w.load_base);
        assert!((a.js_mean - w.js_mean).abs() <= 1e-13 * w.js_mean);
        assert!((a.js_bernoulli_mean - w.js_bernoulli_mean).abs() <= 1e-13 * w.js_bernoulli_mean);
        assert!(a.js_mean > 0.0 && a.topk_overlap < 1.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn bounds(seed in 0u64..1000, e in 2usize..10, kk in 1usize..4, h in 1usize..9, n in 1usize..40, sig in any::<bool>()) {
            let k = kk.min(e);
            let r = if sig {
                rule(json!({"model_type": "llama4_text", "num_local_experts": e, "num_experts_per_tok": k}))
            } else {
                mixtral(e, k)
            };
            let (r0, rt, h0, ht) = (lcg(seed, e * h), lcg(seed + 1, e * h), lcg(seed + 2, n * h), lcg(seed + 3, n * h));
            let mut acc = RoutingDriftAcc::new(&r);
            acc.update(&r0, None, &rt, None, &h0, &ht, n, h).unwrap();
            let d = acc.finish();
            prop_assert!(d.js_mean >= 0.0 && d.js_mean <= LN2 + 1e-15);
            prop_assert!(d.topk_overlap >= 0.0 && d.topk_overlap <= 1.0);
            prop_assert!(d.jaccard <= d.topk_overlap + 1e-15 && d.jaccard >= 0.0);
            prop_assert!(d.top1_agreement >= 0.0 && d.top1_agreement <= 1.0);
            prop_assert!((d.load_base.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            prop_assert!(d.load_entropy_base >= -1e-15 && d.load_entropy_base <= 1.0 + 1e-12);
            prop_assert!(d.load_tv >= 0.0 && d.load_tv <= 1.0 + 1e-12);
            prop_assert!(d.max_load_ratio_ckpt >= 1.0 - 1e-12 && d.max_load_ratio_ckpt <= e as f64 / k as f64 + 1e-12);
            if sig {
                prop_assert!(d.js_bernoulli_mean >= 0.0 && d.js_bernoulli_mean <= LN2 + 1e-15);
            } else {
                prop_assert!(d.js_bernoulli_mean.is_nan());
            }
            let w = router_weight_drift(&r0, &rt, e, h, !sig).unwrap();
            for x in &w.per_expert {
                prop_assert!(x.one_minus_cos >= 0.0 && x.one_minus_cos <= 2.0);
                prop_assert!(x.rel_drift >= 0.0 && x.norm_drift >= -1.0);
            }
            let g = w.rel_drift_gini;
            prop_assert!((0.0..1.0).contains(&g));
        }

        #[test]
        fn js_matches_direct_formula(seed in 0u64..1000, e in 1usize..12) {
            let (a, b) = (lcg(seed, e), lcg(seed + 7, e));
            let lp = |x: &[f32]| { let z: Vec<f64> = x.iter().map(|&v| 3.0 * v as f64).collect(); let mut o = Vec::new(); log_softmax_into(&z, &mut o); o };
            let (la, lb) = (lp(&a), lp(&b));
            let direct: f64 = la.iter().zip(&lb).map(|(&x, &y)| {
                let (p, q) = (x.exp(), y.exp());
                let m = 0.5 * (p + q);
                0.5 * (p * (p / m).ln() + q * (q / m).ln())
            }).sum();
            let js = js_divergence_log(&la, &lb);
            prop_assert!((js - direct).abs() <= 1e-13 + 1e-10 * direct, "{} vs {}", js, direct);
        }
    }
}
