//! Running a probe: a [`ProbePlan`] on freshly drawn weights or on a checkpoint's, into a
//! [`ProbeRecord`]; writing it.

use std::time::Instant;

use crate::error::Context;
use tau_records::{CONFIG_FILE, PROBE_FILE, write_atomic};

use super::*;

/// The trained weights a probe runs on.
pub struct Trained {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Every tensor of the checkpoint.
    pub varmap: candle_nn::VarMap,
    /// The steps of training behind it (its `state.json`), when it is a run's checkpoint.
    pub step: Option<u64>,
    /// The input's `[C, H, W]` the checkpoint records.
    pub input_size: Option<[usize; 3]>,
}

impl std::fmt::Debug for Trained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trained")
            .field("dir", &self.dir)
            .field("step", &self.step)
            .field("input_size", &self.input_size)
            .finish_non_exhaustive()
    }
}

impl Trained {
    /// Loads the checkpoint in `dir` onto the CPU, its weights in f32 when they are in
    /// half precision (the CPU computes in f32 and f64 only; widening is exact).
    ///
    /// # Errors
    /// A missing or invalid checkpoint (one with NaN or infinite weights too).
    pub fn load(dir: &Path) -> crate::Result<Trained> {
        let (record, varmap) = tau_model::checkpoint::load_checkpoint(dir, &Device::Cpu)
            .and_then(|(record, varmap)| {
                Ok((record, tau_model::checkpoint::widen_to_f32(&varmap)?))
            })
            .with_context(|| format!("loading checkpoint {}", dir.display()))?;
        let step = std::fs::read_to_string(dir.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
        Ok(Trained {
            dir: dir.to_path_buf(),
            varmap,
            step,
            input_size: record.preprocessing.map(|p| p.input_size),
        })
    }
}

/// A probe's result: the record, and the trained weights it ran on, if any.
#[derive(Debug)]
pub struct ProbeRun {
    /// The `probe.json` record.
    pub record: ProbeRecord,
    /// The checkpoint probed (`probe.checkpoint`), loaded.
    pub trained: Option<Trained>,
}

/// The memory a probe of `plan` needs, about, in bytes; `image` is the ResNets' image
/// side (see [`crate::memory::resnet`]).
fn needed_memory(plan: &ProbePlan, image: usize) -> f64 {
    match plan.model.as_theory() {
        Some(c) => {
            let rows = (c.width as u64)
                * (plan.settings.n_inputs.unwrap_or(64) as u64)
                * plan.rules.len() as u64;
            // The weights in f32, drawn once and kept for the backward pass, two working
            // matrices of all (τ, input) rows, and per block the ReLU mask bits and
            // log-norms of the rows.
            (4 * plan.model.num_parameters() as u64
                + 2 * 4 * rows
                + (c.depth as u64) * (rows / 8 + rows / c.width.max(1) as u64 * 8))
                as f64
        }
        None => crate::memory::resnet(
            &plan.model,
            plan.settings.n_inputs.unwrap_or(RESNET_INPUTS),
            (image, image),
        ),
    }
}

/// Inputs per seed of a ResNet probe without `probe.n_inputs`.
const RESNET_INPUTS: usize = 8;

/// Refuses a probe of `plan` on images of side `image` (ResNets) that needs more memory
/// than is available, naming the settings that size it.
fn check_memory(plan: &ProbePlan, image: usize) -> crate::Result<()> {
    let lower = match plan.model.as_theory() {
        Some(_) => "model.depth or model.width".to_string(),
        None => format!(
            "probe.image_size ({image}), probe.n_inputs ({}) or model.depth",
            plan.settings.n_inputs.unwrap_or(RESNET_INPUTS)
        ),
    };
    crate::memory::check(needed_memory(plan, image), "this probe", &lower)
}

/// Probes `plan`: per τ rule, ‖h_L‖/‖h_0‖ and the gradient ratios over the seeds'
/// inputs, on each seed's initialization or on the checkpoint's weights.
///
/// # Errors
/// A probe too large for the available memory, a checkpoint that does not load, or
/// device errors.
pub fn run_probe(plan: &ProbePlan) -> crate::Result<ProbeRun> {
    let start = Instant::now();
    let r = plan;
    let trained = r.checkpoint.as_deref().map(Trained::load).transpose()?;
    let seeds: Vec<u64> = (0..r.settings.n_seeds as u64).map(|k| r.seed + k).collect();
    let n_blocks = r.model.n_blocks();
    // The ResNets' image side: `probe.image_size`, else the checkpoint's input size, else
    // the family's default (unused by the theory network).
    let image = r.settings.image_size.unwrap_or(match &trained {
        Some(Trained {
            input_size: Some([_, h, _]),
            ..
        }) => *h,
        _ => r.model.as_family().probe_image_size().unwrap_or(32),
    });
    check_memory(r, image)?;
    let (family, n_inputs, taus) = match r.model.as_theory() {
        Some(c) => {
            let n = r.settings.n_inputs.unwrap_or(64);
            let taus = match &trained {
                None => probe_theory(c, &r.rules, &seeds, n)?,
                Some(t) => {
                    let dtype =
                        tau_model::checkpoint::varmap_dtype(&t.varmap).unwrap_or(DType::F32);
                    let vb = VarBuilder::from_varmap(&t.varmap, dtype, &Device::Cpu);
                    let model = Model::new(&r.model, vb)?;
                    let net = model
                        .as_theory()
                        .context("the checkpoint's model is not the theory network")?;
                    let weights = TheoryWeights::from_net(net)?;
                    probe_theory_weights(c, &r.rules, &seeds, n, Some(&weights))?
                }
            };
            ("theory", n, taus)
        }
        None => {
            let other = &r.model;
            let n = r.settings.n_inputs.unwrap_or(RESNET_INPUTS);
            (
                other.family(),
                n,
                probe_resnet(other, &r.rules, &seeds, n, image, trained.as_ref())?,
            )
        }
    };
    let record = ProbeRecord {
        format: PROBE_FORMAT.into(),
        family: family.into(),
        n_blocks,
        seeds: seeds.clone(),
        n_inputs,
        blocks: sample_blocks(chain_len(&r.model)),
        taus,
        wall_s: start.elapsed().as_secs_f64(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok(ProbeRun { record, trained })
}

/// Writes `probe.json` and the resolved `config.toml` into `dir` (created if missing),
/// each atomically.
///
/// # Errors
/// I/O errors.
pub fn write_probe(dir: &Path, plan: &ProbePlan, record: &ProbeRecord) -> crate::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg_text = toml::to_string(&plan.table).context("serializing the resolved config")?;
    write_atomic(&dir.join(CONFIG_FILE), cfg_text.as_bytes())?;
    let json = serde_json::to_string(record).context("serializing the probe record")?;
    write_atomic(&dir.join(PROBE_FILE), json.as_bytes())?;
    Ok(())
}
