//! Stage 4: schema-versioned records. Front ends turn these into JSON, tables and summaries; the
//! metric conventions travel with the numbers.

pub mod analysis;

use serde::Serialize;

use crate::metrics::drift::{BaseStats, StepMetrics};
use crate::source::Skipped;

/// Version of the result layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// One checkpoint of a run.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    /// Path as given.
    pub path: String,
    /// `single_file`, `directory` or `sharded`.
    pub layout: String,
    /// Number of shard files.
    pub n_files: usize,
    /// Total size of the shard files in bytes.
    pub total_bytes: u64,
    /// Analysable tensors.
    pub n_tensors: usize,
    /// Tensors listed but not analysed.
    pub skipped: Vec<Skipped>,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// A difference between checkpoints that prevents (or qualifies) a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// Tensor name.
    pub tensor: String,
    /// Checkpoint index (0 = base) where the difference shows.
    pub checkpoint: usize,
    /// `missing` (in the base, not here), `extra` (here, not in the base), `shape`, `dtype`,
    /// `skipped` (analysable in one checkpoint, not in another).
    pub kind: String,
    /// Human-readable detail.
    pub detail: String,
}

/// Trajectory of one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorTrajectory {
    /// Tensor name.
    pub name: String,
    /// Layer index parsed from the name.
    pub layer: Option<u32>,
    /// Expert index parsed from the name.
    pub expert: Option<u32>,
    /// Coarse module kind.
    pub kind: String,
    /// Module name.
    pub component: String,
    /// Shape (identical in every checkpoint).
    pub shape: Vec<u64>,
    /// Element count.
    pub numel: u64,
    /// Stored format per checkpoint (e.g. `BF16`, `MXFP4`).
    pub formats: Vec<String>,
    /// Base statistics.
    pub base: BaseStats,
    /// Metrics for checkpoints 1..=k.
    pub steps: Vec<StepMetrics>,
}

/// Run statistics.
#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    /// Bytes of tensor data read (all checkpoints).
    pub bytes_read: u64,
    /// Wall time of the streaming pass.
    pub seconds: f64,
    /// Worker threads used.
    pub threads: usize,
    /// Memory budget for buffers, in bytes.
    pub memory_budget: u64,
    /// Bytes per checkpoint read in one chunk.
    pub chunk_bytes: u64,
}

/// Result of `trajectory`.
#[derive(Debug, Clone, Serialize)]
pub struct TrajectoryReport {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// forgetscope-core version.
    pub core_version: String,
    /// The checkpoints, base first.
    pub checkpoints: Vec<CheckpointInfo>,
    /// Per-tensor trajectories, in base file order.
    pub tensors: Vec<TensorTrajectory>,
    /// Differences between checkpoints.
    pub mismatches: Vec<Mismatch>,
    /// Metric conventions (name → definition), recorded with every result.
    pub conventions: Vec<(String, String)>,
    /// Run statistics.
    pub stats: RunStats,
}

/// The conventions recorded with trajectory results.
pub fn trajectory_conventions() -> Vec<(String, String)> {
    [
        ("decode", "every stored dtype decoded to f32 (FP8 × its scale, MXFP4 × its E8M0 scale); sums in f64"),
        ("fro_delta", "||W_t - W_0||_F"),
        ("rel_delta", "||W_t - W_0||_F / ||W_0||_F; NaN when ||W_0|| = 0"),
        ("one_minus_cos", "1 - <W_0,W_t>/(||W_0|| ||W_t||), computed as (D^2 - (||W_t||-||W_0||)^2)/(2||W_0|| ||W_t||); NaN when a norm is 0"),
        ("step_drift", "||W_t - W_(t-1)||_F"),
        ("path_length", "sum of step_drift up to t"),
        ("straightness", "fro_delta / path_length; NaN when path_length = 0"),
        ("step_cos", "cos(W_t - W_(t-1), W_(t+1) - W_t); NaN for the last checkpoint or a zero step"),
        ("frac_unchanged", "fraction of elements exactly equal to the base; above 0.5 drift is dominated by storage rounding"),
        ("nonfinite", "any NaN/Inf element makes the tensor's sums NaN; counts in n_nan/n_inf"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

impl TrajectoryReport {
    /// Everything but the per-tensor rows, as JSON (the rows travel as a [`crate::table`]).
    pub fn meta_json(&self) -> String {
        serde_json::json!({
            "schema_version": self.schema_version,
            "core_version": self.core_version,
            "checkpoints": self.checkpoints,
            "mismatches": self.mismatches,
            "conventions": self.conventions.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "stats": self.stats,
        })
        .to_string()
    }
}

/// Summary of an opened checkpoint, as JSON (the tensor listing travels as a [`crate::table`]).
pub fn inspect_meta_json(c: &crate::source::Checkpoint) -> String {
    let layout = match &c.layout {
        crate::source::Layout::SingleFile => serde_json::json!({"kind": "single_file"}),
        crate::source::Layout::Directory => serde_json::json!({"kind": "directory"}),
        crate::source::Layout::Sharded { index } => {
            serde_json::json!({"kind": "sharded", "index": index.display().to_string()})
        }
    };
    let formats: std::collections::BTreeMap<String, usize> =
        c.tensors.iter().fold(Default::default(), |mut m, t| {
            *m.entry(t.format()).or_default() += 1;
            m
        });
    serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "path": c.path.display().to_string(),
        "layout": layout,
        "files": c.shards.iter().map(|s| serde_json::json!({"path": s.path.display().to_string(), "bytes": s.identity.len()})).collect::<Vec<_>>(),
        "total_bytes": c.total_bytes,
        "n_tensors": c.tensors.len(),
        "n_stored": c.stored.len(),
        "formats": formats,
        "skipped": c.skipped,
        "warnings": c.warnings,
        "metadata": c.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    })
    .to_string()
}
