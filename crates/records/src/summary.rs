//! `summary.json` and `metrics.jsonl`: how a run ended and what it measured, and the
//! exit codes of `tau-resnet`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Reads an `f64` that serde_json may have written as `null`: JSON has no NaN or
/// infinity, so a non-finite number is written as `null`, and it reads back as NaN.
/// (Writing is unchanged: this only lets the records of a diverged run be read.)
fn nan_if_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Reads the per-block scalars of a record, where a non-finite value was written as
/// `null` (as [`nan_if_null`] does for one number).
fn scales_nan_if_null<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, f32>>, D::Error> {
    let map = Option::<BTreeMap<String, Option<f32>>>::deserialize(deserializer)?;
    Ok(map.map(|m| {
        m.into_iter()
            .map(|(k, v)| (k, v.unwrap_or(f32::NAN)))
            .collect()
    }))
}

/// The gradient norm of one layer (a block, or a named module outside the blocks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerNorm {
    /// The layer's name: a block (`layer2.3`, `blocks.7`) or a module (`conv1`, `fc`).
    pub name: String,
    /// Euclidean norm of the gradient of all the layer's trained parameters.
    #[serde(deserialize_with = "nan_if_null")]
    pub norm: f64,
}

/// One line of `metrics.jsonl`.
///
/// Non-finite numbers are written as `null` (JSON has no NaN or infinity); a `null` in a
/// field that is not optional reads back as NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MetricsRecord {
    /// Optimizer steps taken when the record was written.
    pub step: u64,
    /// Epoch (0-based) the last step belonged to; a record at the end of epoch `e` has
    /// `epoch = e` and `epoch_end = true`.
    pub epoch: u64,
    /// Whether this record closes an epoch.
    pub epoch_end: bool,
    /// The base learning rate of the last step.
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Training loss: for full-batch GD, exact over the whole set at the last step's
    /// parameters; for SGD, the mean over the batches since the previous record.
    pub train_loss: Option<f64>,
    /// Training accuracy, measured as `train_loss` is (classification data only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_acc: Option<f64>,
    /// Test loss, when the test set was evaluated at this record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    /// Test accuracy, when evaluated (classification data only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_acc: Option<f64>,
    /// Norm of the whole gradient of the last step (before weight decay).
    pub grad_norm: Option<f64>,
    /// Gradient norm of each layer at the last step.
    pub layer_grad_norms: Vec<LayerNorm>,
    /// The current τ, when it is learnable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// The learnable per-block scalars of the residual-scaling schemes, by parameter name:
    /// SkipInit's and ReZero's α (`layer2.3.alpha`) and Fixup's branch multiplier
    /// (`layer2.3.scale`), one entry per block, in f32 (the parameters' own precision in
    /// the default f32 models). Absent for models without such scalars (τ, fixed or
    /// learnable: see `tau`) and in records written before the field existed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "scales_nan_if_null"
    )]
    pub branch_scales: Option<BTreeMap<String, f32>>,
    /// Theory network: mean over (up to one chunk of) the training points of
    /// ‖h_L(x)‖ / ‖h_0(x)‖ at the current parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h_ratio: Option<f64>,
    /// Training examples per second since the previous record (wall-clock; differs
    /// between runs).
    #[serde(deserialize_with = "nan_if_null")]
    pub examples_per_s: f64,
    /// Seconds since the run started, counting earlier sessions of a resumed run
    /// (wall-clock; differs between runs).
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_s: f64,
}

impl MetricsRecord {
    /// The record without its wall-clock fields, for comparing runs.
    pub fn without_timing(&self) -> MetricsRecord {
        MetricsRecord {
            examples_per_s: 0.0,
            wall_s: 0.0,
            ..self.clone()
        }
    }
}

/// The exit codes of the `tau-resnet` binary, as a calling script or sweep reads them.
///
/// A run that ends with a result (finished, or diverged: divergence is data) is not a
/// failure; errors (bad config, I/O) are.
pub mod exit_code {
    /// The command did its work (a run finished).
    pub const FINISHED: u8 = 0;
    /// An error: a bad config, data or checkpoint, an I/O error.
    pub const ERROR: u8 = 1;
    /// A command-line mistake (clap's own usage errors exit with 2 too).
    pub const USAGE: u8 = 2;
    /// The run diverged: a result, recorded in `summary.json`.
    pub const DIVERGED: u8 = 3;
    /// The run was interrupted (Ctrl-C, 128 + SIGINT) after writing a checkpoint.
    pub const INTERRUPTED: u8 = 130;
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// All epochs or steps done.
    Finished,
    /// A non-finite loss or gradient stopped the run.
    Diverged,
    /// Ctrl-C (or a requested stop): a checkpoint was written and the run can be resumed.
    Interrupted,
}

impl RunStatus {
    /// Every status, in declaration order.
    pub const ALL: [RunStatus; 3] = [
        RunStatus::Finished,
        RunStatus::Diverged,
        RunStatus::Interrupted,
    ];

    /// The name written in `summary.json`: `finished`, `diverged` or `interrupted`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RunStatus::Finished => "finished",
            RunStatus::Diverged => "diverged",
            RunStatus::Interrupted => "interrupted",
        }
    }

    /// The exit code `tau-resnet` ends with for a run that ended so: 0 finished,
    /// 3 diverged, 130 interrupted (see [`exit_code`]).
    pub const fn exit_code(self) -> u8 {
        match self {
            RunStatus::Finished => exit_code::FINISHED,
            RunStatus::Diverged => exit_code::DIVERGED,
            RunStatus::Interrupted => exit_code::INTERRUPTED,
        }
    }

    /// The status an exit code of `tau-resnet` stands for, `None` for an error (1), a
    /// usage error (2) or any other code.
    pub fn from_exit_code(code: i32) -> Option<RunStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|s| i32::from(s.exit_code()) == code)
    }

    /// Whether the run ended with a result (finished or diverged), so that it is not run
    /// again; an interrupted run is resumed instead.
    pub const fn is_result(self) -> bool {
        matches!(self, RunStatus::Finished | RunStatus::Diverged)
    }
}

/// The exact version of the code that produced a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeVersion {
    /// The `tau-train` crate version.
    pub crate_version: String,
    /// The git commit the binary was built from, when known. (Uncommitted changes in
    /// the working tree at build time are not recorded.)
    pub git_commit: Option<String>,
}

impl CodeVersion {
    /// The version from build-time values: the crate version and the git commit, where an
    /// absent or empty commit means unknown.
    pub fn from_build(crate_version: &str, git_commit: Option<&str>) -> CodeVersion {
        CodeVersion {
            crate_version: crate_version.to_string(),
            git_commit: git_commit.filter(|s| !s.is_empty()).map(str::to_string),
        }
    }
}

/// `summary.json`: the run's status and numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The run's name.
    pub name: String,
    /// `finished`, `diverged` or `interrupted`.
    pub status: RunStatus,
    /// The step whose loss or gradient was non-finite (0-based: the number of updates
    /// applied before it).
    pub diverged_at_step: Option<u64>,
    /// What went non-finite.
    pub divergence_reason: Option<String>,
    /// Optimizer steps applied.
    pub steps: u64,
    /// Epochs completed.
    pub epochs_completed: u64,
    /// The number of steps after which the training loss fell below the config's
    /// `target_loss` (the run stops there).
    pub reached_target_at_step: Option<u64>,
    /// The last record written.
    pub final_metrics: Option<MetricsRecord>,
    /// Lowest training loss seen in a record.
    pub best_train_loss: Option<f64>,
    /// Lowest test loss seen.
    pub best_test_loss: Option<f64>,
    /// Highest test accuracy seen.
    pub best_test_acc: Option<f64>,
    /// Total wall time in seconds, over all sessions of the run.
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_s: f64,
    /// The device the run used (last session).
    pub device: String,
    /// The code that produced the run.
    pub version: CodeVersion,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            name: "theory-gd".into(),
            status: RunStatus::Diverged,
            diverged_at_step: Some(7),
            divergence_reason: Some("non-finite loss".into()),
            steps: 7,
            epochs_completed: 7,
            reached_target_at_step: None,
            final_metrics: Some(MetricsRecord {
                step: 7,
                epoch: 6,
                epoch_end: true,
                lr: 0.05,
                train_loss: Some(0.25),
                train_acc: None,
                test_loss: Some(0.5),
                test_acc: Some(0.875),
                grad_norm: Some(1.5),
                layer_grad_norms: vec![LayerNorm {
                    name: "blocks.0".into(),
                    norm: 0.75,
                }],
                tau: None,
                branch_scales: None,
                h_ratio: Some(2.0),
                examples_per_s: 1000.0,
                wall_s: 1.25,
            }),
            best_train_loss: Some(0.25),
            best_test_loss: None,
            best_test_acc: Some(0.875),
            wall_s: 1.5,
            device: "cpu".into(),
            version: CodeVersion::from_build("0.1.0", Some("abc123")),
        }
    }

    #[test]
    fn summary_json_round_trips_in_its_on_disk_form() {
        let s = summary();
        let text = serde_json::to_string(&s).unwrap();
        // The format on disk: field order, snake_case status, `null` for an absent
        // number, optional metrics left out.
        assert_eq!(
            text,
            "{\"name\":\"theory-gd\",\"status\":\"diverged\",\"diverged_at_step\":7,\
             \"divergence_reason\":\"non-finite loss\",\"steps\":7,\"epochs_completed\":7,\
             \"reached_target_at_step\":null,\"final_metrics\":{\"step\":7,\"epoch\":6,\
             \"epoch_end\":true,\"lr\":0.05,\"train_loss\":0.25,\"test_loss\":0.5,\
             \"test_acc\":0.875,\"grad_norm\":1.5,\"layer_grad_norms\":[{\"name\":\"blocks.0\",\
             \"norm\":0.75}],\"h_ratio\":2.0,\"examples_per_s\":1000.0,\"wall_s\":1.25},\
             \"best_train_loss\":0.25,\"best_test_loss\":null,\"best_test_acc\":0.875,\
             \"wall_s\":1.5,\"device\":\"cpu\",\"version\":{\"crate_version\":\"0.1.0\",\
             \"git_commit\":\"abc123\"}}"
        );
        let back: Summary = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        let pretty = serde_json::to_string_pretty(&s).unwrap();
        assert_eq!(serde_json::from_str::<Summary>(&pretty).unwrap(), s);
    }

    #[test]
    fn metrics_records_write_non_finite_numbers_as_null() {
        let r = MetricsRecord {
            step: 2,
            train_loss: Some(f64::NAN),
            ..Default::default()
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"train_loss\":null"), "{line}");
        let back: MetricsRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back.train_loss, None);
        assert_eq!(back.without_timing(), back);
    }

    #[test]
    fn the_summary_of_a_diverged_run_reads_back_with_nan_for_null() {
        // What a diverged run writes: every number of its last step non-finite.
        let mut s = summary();
        let m = s.final_metrics.as_mut().unwrap();
        m.lr = f64::INFINITY;
        m.train_loss = Some(f64::NAN);
        m.layer_grad_norms[0].norm = f64::NAN;
        m.examples_per_s = f64::NAN;
        m.wall_s = f64::NAN;
        s.wall_s = f64::NEG_INFINITY;
        let text = serde_json::to_string_pretty(&s).unwrap();
        assert!(text.contains("\"norm\": null"), "{text}");
        let back: Summary = serde_json::from_str(&text).unwrap();
        let m = back.final_metrics.unwrap();
        assert_eq!(m.train_loss, None);
        for x in [
            m.lr,
            m.layer_grad_norms[0].norm,
            m.examples_per_s,
            m.wall_s,
            back.wall_s,
        ] {
            assert!(x.is_nan(), "{x}");
        }
        // A missing number is still an error.
        let err = serde_json::from_str::<LayerNorm>("{\"name\": \"fc\"}").unwrap_err();
        assert!(err.to_string().contains("norm"), "{err}");
    }

    /// Records of models with per-block scalars carry them by name, compactly (the f32
    /// values in their shortest form), and a non-finite one reads back as NaN; records
    /// without them (τ models, and every record written before the field) write nothing
    /// new and read back with `None`.
    #[test]
    fn branch_scales_are_written_by_name_and_absent_when_there_are_none() {
        let r = MetricsRecord {
            step: 25,
            branch_scales: Some(BTreeMap::from([
                ("layer1.0.alpha".to_string(), 0.0125f32),
                ("layer1.1.alpha".to_string(), -0.5),
                ("layer2.0.alpha".to_string(), f32::INFINITY),
            ])),
            ..Default::default()
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.contains(
                "\"branch_scales\":{\"layer1.0.alpha\":0.0125,\"layer1.1.alpha\":-0.5,\"layer2.0.alpha\":null}"
            ),
            "{line}"
        );
        let back: MetricsRecord = serde_json::from_str(&line).unwrap();
        let scales = back.branch_scales.unwrap();
        assert_eq!(scales["layer1.0.alpha"], 0.0125);
        assert_eq!(scales["layer1.1.alpha"], -0.5);
        assert!(scales["layer2.0.alpha"].is_nan());

        let plain = MetricsRecord {
            step: 25,
            tau: Some(0.25),
            ..Default::default()
        };
        let line = serde_json::to_string(&plain).unwrap();
        assert!(!line.contains("branch_scales"), "{line}");
        // A line written before the field existed.
        let old = "{\"step\":10,\"epoch\":0,\"epoch_end\":false,\"lr\":0.1,\"train_loss\":0.5,\
                   \"grad_norm\":1.0,\"layer_grad_norms\":[],\"examples_per_s\":1.0,\"wall_s\":1.0}";
        let back: MetricsRecord = serde_json::from_str(old).unwrap();
        assert_eq!((back.step, back.branch_scales), (10, None));
    }

    #[test]
    fn statuses_and_exit_codes_correspond() {
        for s in RunStatus::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
            assert_eq!(RunStatus::from_exit_code(i32::from(s.exit_code())), Some(s));
        }
        assert_eq!(RunStatus::Finished.exit_code(), 0);
        assert_eq!(RunStatus::Diverged.exit_code(), 3);
        assert_eq!(RunStatus::Interrupted.exit_code(), 130);
        for code in [
            i32::from(exit_code::ERROR),
            i32::from(exit_code::USAGE),
            -1,
            255,
        ] {
            assert_eq!(RunStatus::from_exit_code(code), None, "{code}");
        }
        assert!(RunStatus::Diverged.is_result() && !RunStatus::Interrupted.is_result());
    }

    #[test]
    fn code_version_treats_an_empty_commit_as_unknown() {
        assert_eq!(CodeVersion::from_build("0.1.0", Some("")).git_commit, None);
        assert_eq!(CodeVersion::from_build("0.1.0", None).git_commit, None);
    }
}
