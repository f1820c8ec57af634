//! Split a run into parts that other processes or machines compute, and merge their results into
//! exactly the report a single run gives. The scheduler (Ray, in the Python package) only moves
//! tensor indices in and opaque bytes out; every decision about what a part holds and how parts
//! merge is made here.
//!
//! **Atoms.** The work is divided into atoms, sets of planned tensors that must be computed
//! together: one tensor for `trajectory`; for `analyze`, the tensors of a resident unit (an
//! attention layer's q/k/v/o and biases, a router with its biases) joined with every unit that
//! shares one of them (all expert slices of a fused tensor), and each streamed tensor alone.
//!
//! **Parts.** Atoms are sorted by where they start in the base checkpoint's files and cut into
//! contiguous runs where the running byte count crosses a multiple of total/parts, so a part reads a
//! contiguous stretch of shard files and parts carry about the same number of bytes.
//!
//! **Exactness.** A tensor is always computed wholly inside one part, with the same chunking as a
//! single run (chunk size depends on the memory budget and the checkpoint count, never on the
//! threads), so its chunk accumulators merge in the same order: per-tensor metrics are
//! bit-identical. Nothing that reduces over tensors is merged from partial sums: layer sums,
//! per-expert sums, robust head z-scores and layer summaries are computed once, by the merge, from
//! the per-tensor and per-unit results in canonical (plan, unit) order by the same code as a single
//! run, so they are bit-identical too. Partial results travel as exact bytes ([`wire`]).
//!
//! **Same files everywhere.** Every part and the merge re-open the checkpoints and re-plan (headers
//! only). A fingerprint per checkpoint (its shards' paths, sizes, mtimes and headers) plus one of the
//! options and, for `analyze`, of the resolved structure and units must equal the planner's, so a
//! part never runs against a different file than the one planned.

pub(crate) mod wire;

use std::path::{Path, PathBuf};

use super::analyze::{self, AnalyzeOptions, UnitResult};
use super::budget::Budget;
use super::driver::{resolve_threads, stream_drift, trajectory_report};
use super::plan::{plan_trajectory, Plan};
use super::{as_paths, Control, RunOptions};
use crate::error::{Error, Result};
use crate::metrics::drift::DriftAcc;
use crate::results::analysis::AnalysisReport;
use crate::results::TrajectoryReport;
use crate::source::{open_checkpoint, Checkpoint};
use wire::{Reader, Writer};

const MAGIC: &[u8; 8] = b"FSPART\x00\x01";
const KIND_TRAJECTORY: u8 = 1;
const KIND_ANALYZE: u8 = 2;

/// The run a part belongs to.
#[derive(Debug, Clone)]
pub enum Job {
    /// `trajectory`: per-tensor drift.
    Trajectory(RunOptions),
    /// `analyze`: every weight metric.
    Analyze(Box<AnalyzeOptions>),
}

impl Job {
    fn kind(&self) -> u8 {
        match self {
            Job::Trajectory(_) => KIND_TRAJECTORY,
            Job::Analyze(_) => KIND_ANALYZE,
        }
    }
}

/// One part: tensors (indices into the plan, ascending) that one worker computes.
#[derive(Debug, Clone, Default)]
pub struct Part {
    /// Planned tensor indices.
    pub tensors: Vec<usize>,
    /// Stored bytes of those tensors over every checkpoint.
    pub bytes: u64,
    /// Base-checkpoint shard files the part reads, in file order.
    pub files: Vec<PathBuf>,
}

/// How a run is split.
#[derive(Debug, Clone)]
pub struct WorkPlan {
    /// One fingerprint per checkpoint, then one of the options, structure and units.
    pub fingerprint: Vec<u64>,
    /// The parts, in base file order.
    pub parts: Vec<Part>,
    /// Stored bytes over all parts.
    pub total_bytes: u64,
    /// Planned tensors.
    pub n_tensors: usize,
}

enum Prep {
    Trajectory {
        ckpts: Vec<Checkpoint>,
        plan: Plan,
        budget: Budget,
    },
    Analyze(Box<analyze::Prepared>),
}

impl Prep {
    fn ckpts(&self) -> &[Checkpoint] {
        match self {
            Prep::Trajectory { ckpts, .. } => ckpts,
            Prep::Analyze(p) => &p.ckpts,
        }
    }
    fn plan(&self) -> &Plan {
        match self {
            Prep::Trajectory { plan, .. } => plan,
            Prep::Analyze(p) => &p.plan,
        }
    }
}

fn prepare(paths: &[PathBuf], job: &Job, control: &Control) -> Result<Prep> {
    match job {
        Job::Trajectory(opts) => {
            if paths.len() < 2 {
                return Err(Error::Config {
                    reason: "a trajectory needs a base and at least one more checkpoint".into(),
                });
            }
            let threads = resolve_threads(opts.threads);
            let budget = Budget::new(opts.memory_budget, paths.len(), threads, opts.chunk_bytes)?;
            let mut ckpts = Vec::with_capacity(paths.len());
            for p in paths {
                if control.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                ckpts.push(open_checkpoint(p, &opts.open)?);
            }
            let plan = plan_trajectory(&ckpts, &budget);
            Ok(Prep::Trajectory {
                ckpts,
                plan,
                budget,
            })
        }
        Job::Analyze(opts) => Ok(Prep::Analyze(Box::new(analyze::prepare(
            paths, opts, control,
        )?))),
    }
}

/// FNV-1a, 64 bit: stable across processes, platforms and Rust versions (std's hasher is not
/// promised to be).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        // Length first, so that ("ab", "c") and ("a", "bc") differ.
        for x in (b.len() as u64).to_le_bytes().iter().chain(b) {
            self.0 ^= u64::from(*x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

fn fingerprint(prep: &Prep, job: &Job) -> Vec<u64> {
    let mut out: Vec<u64> = prep
        .ckpts()
        .iter()
        .map(|c| {
            let mut h = Fnv::new();
            h.str(&c.path.display().to_string());
            for s in &c.shards {
                h.str(&s.path.display().to_string());
                h.u64(s.identity.len());
                h.bytes(&s.identity.mtime_ns().to_le_bytes());
            }
            for t in &c.stored {
                let s = &t.stored;
                h.str(&s.name);
                h.str(s.dtype.as_str());
                h.u64(s.shard.into());
                h.u64(s.offset);
                h.u64(s.len);
                s.shape.iter().for_each(|&d| h.u64(d));
            }
            for (k, v) in &c.metadata {
                h.str(k);
                h.str(v);
            }
            h.0
        })
        .collect();
    let mut h = Fnv::new();
    h.str(env!("CARGO_PKG_VERSION"));
    h.u64(job.kind().into());
    let plan = prep.plan();
    for pt in &plan.tensors {
        h.str(&pt.name);
        h.u64(pt.n_chunks as u64);
    }
    match (prep, job) {
        (Prep::Trajectory { budget, .. }, _) => {
            h.u64(budget.chunk_bytes);
            h.u64(budget.total);
        }
        (Prep::Analyze(p), Job::Analyze(o)) => {
            h.u64(p.budget.chunk_bytes);
            h.u64(p.budget.total);
            // Debug forms are deterministic for the same build, and the core version is hashed.
            h.str(&format!("{:?}", o.metrics));
            let s = &o.spectral;
            h.str(&format!(
                "{} {} {} {} {}",
                s.k, s.oversample, s.power_iters, s.exact_max_dim, s.seed
            ));
            h.u64(o.severe_z.to_bits());
            h.str(&serde_json::to_string(&p.structure).unwrap_or_default());
            for u in &p.units {
                h.str(&format!("{:?}", u.kind));
                for m in &u.members {
                    h.u64(m.tensor as u64);
                    h.u64(m.e0);
                    h.u64(m.e1);
                    h.u64(m.spectra.into());
                }
            }
            p.include.iter().for_each(|&i| h.u64(i.into()));
        }
        _ => unreachable!("prepared for its own job"),
    }
    out.push(h.0);
    out
}

fn check_fingerprint(paths: &[PathBuf], got: &[u64], expected: &[u64]) -> Result<()> {
    if got == expected {
        return Ok(());
    }
    for (i, p) in paths.iter().enumerate() {
        if got.get(i) != expected.get(i) {
            return Err(Error::Checkpoint {
                path: p.clone(),
                reason: "is not the same checkpoint here as where the run was planned (shard sizes, mtimes or headers differ): every node must read the same files at the same path (shared storage, or copies that keep size and mtime)".into(),
            });
        }
    }
    Err(Error::Config {
        reason: "this part was planned with other options, model config or forgetscope version than this process uses; run the same forgetscope version everywhere".into(),
    })
}

/// Stored bytes of a planned tensor over every checkpoint.
fn tensor_bytes(plan: &Plan, t: usize) -> u64 {
    plan.tensors[t]
        .per_ckpt
        .iter()
        .map(|x| x.data_range(0, x.numel).1)
        .sum()
}

/// Groups of tensors that must be computed together (see the module doc).
fn atoms(prep: &Prep) -> Vec<Vec<usize>> {
    let n = prep.plan().tensors.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    if let Prep::Analyze(p) = prep {
        for u in &p.units {
            for m in &u.members[1..] {
                let a = root(&mut parent, u.members[0].tensor);
                let b = root(&mut parent, m.tensor);
                parent[b.max(a)] = b.min(a);
            }
        }
    }
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); n];
    for t in 0..n {
        let r = root(&mut parent, t);
        groups[r].push(t);
    }
    groups.into_iter().filter(|g| !g.is_empty()).collect()
}

/// Plan a run split into about `n_parts` parts (fewer when there are fewer atoms).
pub fn plan_parts(
    paths: &[impl AsRef<Path>],
    job: &Job,
    n_parts: usize,
    control: &Control,
) -> Result<WorkPlan> {
    let paths = as_paths(paths);
    let prep = prepare(&paths, job, control)?;
    let plan = prep.plan();
    let base = &prep.ckpts()[0];
    let mut atoms: Vec<(u32, u64, u64, Vec<usize>)> = atoms(&prep)
        .into_iter()
        .map(|g| {
            let (shard, offset) = g
                .iter()
                .map(|&t| {
                    let d = &plan.tensors[t].per_ckpt[0].data;
                    (d.shard, d.offset)
                })
                .min()
                .expect("atoms are not empty");
            let bytes = g.iter().map(|&t| tensor_bytes(plan, t)).sum();
            (shard, offset, bytes, g)
        })
        .collect();
    atoms.sort_by_key(|a| (a.0, a.1));
    let total: u64 = atoms.iter().map(|a| a.2).sum();
    let n = n_parts.clamp(1, atoms.len().max(1)) as u128;
    let mut parts: Vec<Part> = Vec::new();
    let mut cur = Part::default();
    let mut running = 0u64;
    for (shard, _, bytes, tensors) in atoms {
        let file = base.shard_path(shard).to_path_buf();
        if cur.files.last() != Some(&file) {
            cur.files.push(file);
        }
        cur.tensors.extend(tensors);
        cur.bytes += bytes;
        running += bytes;
        let cut = parts.len() as u128 + 1;
        if cut < n && running as u128 * n >= total as u128 * cut {
            parts.push(std::mem::take(&mut cur));
        }
    }
    if !cur.tensors.is_empty() {
        parts.push(cur);
    }
    for p in &mut parts {
        p.tensors.sort_unstable();
    }
    Ok(WorkPlan {
        fingerprint: fingerprint(&prep, job),
        parts,
        total_bytes: total,
        n_tensors: plan.tensors.len(),
    })
}

/// Compute one part: the tensors `tensors` of the run planned with `fingerprint`. Returns its
/// partial result as bytes for [`merge_trajectory`] / [`merge_analysis`].
pub fn run_part(
    paths: &[impl AsRef<Path>],
    job: &Job,
    expected: &[u64],
    tensors: &[usize],
    control: &Control,
) -> Result<Vec<u8>> {
    let paths = as_paths(paths);
    let prep = prepare(&paths, job, control)?;
    let fp = fingerprint(&prep, job);
    check_fingerprint(&paths, &fp, expected)?;
    let n = prep.plan().tensors.len();
    let mut select = vec![false; n];
    for &t in tensors {
        if t >= n {
            return Err(Error::Config {
                reason: format!("part names tensor {t}, but the plan has {n}"),
            });
        }
        select[t] = true;
    }
    let mut w = Writer::default();
    w.buf.extend_from_slice(MAGIC);
    w.u8(job.kind());
    w.u64s(&fp);
    match &prep {
        Prep::Trajectory {
            ckpts,
            plan,
            budget,
        } => {
            let accs = stream_drift(ckpts, plan, budget, control, &select)?;
            put_accs(&mut w, accs);
        }
        Prep::Analyze(p) => {
            for u in &p.units {
                let inside = u.members.iter().filter(|m| select[m.tensor]).count();
                if inside != 0 && inside != u.members.len() {
                    return Err(Error::Config {
                        reason: format!(
                            "a part splits the analysis unit of {}; parts must come from plan_parts",
                            u.members[0].label
                        ),
                    });
                }
            }
            let (accs, units) = analyze::execute(p, Some(&select), control)?;
            put_accs(&mut w, accs);
            w.usize(units.len());
            for (i, r) in &units {
                w.usize(*i);
                w.usize(r.accs.len());
                r.accs.iter().for_each(|a| a.put(&mut w));
                wire::put_unit_out(&mut w, &r.out);
            }
        }
    }
    Ok(w.buf)
}

fn open_part<'a>(bytes: &'a [u8], kind: u8, fp: &[u64], i: usize) -> Result<Reader<'a>> {
    let mut r = Reader::new(bytes);
    let ok = bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] == MAGIC;
    if !ok {
        return Err(Error::Config {
            reason: format!(
                "part {i} is not a forgetscope partial result (or from another format version)"
            ),
        });
    }
    for _ in 0..MAGIC.len() {
        r.u8()?;
    }
    if r.u8()? != kind {
        return Err(Error::Config {
            reason: format!("part {i} belongs to another kind of run"),
        });
    }
    if r.u64s()? != fp {
        return Err(Error::Config {
            reason: format!("part {i} was computed on other checkpoints or options than this run"),
        });
    }
    Ok(r)
}

/// The counterpart of [`take_accs`]: the computed tensors' accumulators, with their plan index.
fn put_accs(w: &mut Writer, accs: Vec<Option<DriftAcc>>) {
    let done: Vec<(usize, DriftAcc)> = accs
        .into_iter()
        .enumerate()
        .filter_map(|(t, a)| a.map(|a| (t, a)))
        .collect();
    w.usize(done.len());
    for (t, a) in &done {
        w.usize(*t);
        a.put(w);
    }
}

fn take_accs(
    r: &mut Reader,
    slots: &mut [Option<DriftAcc>],
    names: &Plan,
    part: usize,
) -> Result<()> {
    let k = r.len(8)?;
    for _ in 0..k {
        let t = r.usize()?;
        let acc = DriftAcc::get(r)?;
        let Some(slot) = slots.get_mut(t) else {
            return Err(Error::Config {
                reason: format!("part {part} names tensor {t}, outside the plan"),
            });
        };
        if slot.is_some() {
            return Err(Error::Config {
                reason: format!(
                    "tensor {:?} is in two parts (part {part} and an earlier one); a result would be counted twice",
                    names.tensors[t].name
                ),
            });
        }
        *slot = Some(acc);
    }
    Ok(())
}

fn lost(plan: &Plan, t: usize) -> Error {
    Error::Config {
        reason: format!(
            "no part computed tensor {:?}; a result was lost",
            plan.tensors[t].name
        ),
    }
}

/// The trajectory report from every part's result; equal, bit for bit, to [`crate::trajectory`]
/// on the same inputs. `seconds` is the wall time of the distributed pass.
pub fn merge_trajectory(
    paths: &[impl AsRef<Path>],
    opts: &RunOptions,
    expected: &[u64],
    parts: &[&[u8]],
    seconds: f64,
) -> Result<TrajectoryReport> {
    let paths = as_paths(paths);
    let job = Job::Trajectory(opts.clone());
    let prep = prepare(&paths, &job, &Control::new())?;
    let fp = fingerprint(&prep, &job);
    check_fingerprint(&paths, &fp, expected)?;
    let Prep::Trajectory {
        ckpts,
        plan,
        budget,
    } = prep
    else {
        unreachable!("trajectory job")
    };
    let mut accs: Vec<Option<DriftAcc>> = vec![None; plan.tensors.len()];
    for (i, bytes) in parts.iter().enumerate() {
        let mut r = open_part(bytes, KIND_TRAJECTORY, &fp, i)?;
        take_accs(&mut r, &mut accs, &plan, i)?;
        r.done()?;
    }
    let accs = accs
        .into_iter()
        .enumerate()
        .map(|(t, a)| a.ok_or_else(|| lost(&plan, t)))
        .collect::<Result<Vec<_>>>()?;
    Ok(trajectory_report(&ckpts, &plan, accs, &budget, seconds))
}

/// The analysis report from every part's result; equal, bit for bit, to
/// [`crate::stream::analyze()`] on the same inputs.
pub fn merge_analysis(
    paths: &[impl AsRef<Path>],
    opts: &AnalyzeOptions,
    expected: &[u64],
    parts: &[&[u8]],
    seconds: f64,
) -> Result<AnalysisReport> {
    let paths = as_paths(paths);
    let job = Job::Analyze(Box::new(opts.clone()));
    let prep = prepare(&paths, &job, &Control::new())?;
    let fp = fingerprint(&prep, &job);
    check_fingerprint(&paths, &fp, expected)?;
    let Prep::Analyze(p) = prep else {
        unreachable!("analyze job")
    };
    let mut accs: Vec<Option<DriftAcc>> = vec![None; p.plan.tensors.len()];
    let mut results: Vec<Option<UnitResult>> = p.units.iter().map(|_| None).collect();
    for (i, bytes) in parts.iter().enumerate() {
        let mut r = open_part(bytes, KIND_ANALYZE, &fp, i)?;
        take_accs(&mut r, &mut accs, &p.plan, i)?;
        let k = r.len(8)?;
        for _ in 0..k {
            let u = r.usize()?;
            let n_acc = r.len(8)?;
            let member_accs = (0..n_acc)
                .map(|_| DriftAcc::get(&mut r))
                .collect::<Result<Vec<_>>>()?;
            let out = wire::get_unit_out(&mut r)?;
            let Some(slot) = results.get_mut(u) else {
                return Err(Error::Config {
                    reason: format!("part {i} names analysis unit {u}, outside the plan"),
                });
            };
            if slot.is_some() || member_accs.len() != p.units[u].members.len() {
                return Err(Error::Config {
                    reason: format!(
                        "analysis unit of {} is in two parts or malformed (part {i})",
                        p.units[u].members[0].label
                    ),
                });
            }
            *slot = Some(UnitResult {
                out,
                accs: member_accs,
            });
        }
        r.done()?;
    }
    for (t, a) in accs.iter().enumerate() {
        if p.include[t] != a.is_some() {
            return Err(lost(&p.plan, t));
        }
    }
    if let Some(u) = results.iter().position(Option::is_none) {
        return Err(Error::Config {
            reason: format!(
                "no part computed the analysis unit of {}; a result was lost",
                p.units[u].members[0].label
            ),
        });
    }
    analyze::finish(*p, accs, results, seconds)
}
