//! `tau-resnet predict`: classify image files (JPEG, PNG) with a checkpoint, prepared as
//! the checkpoint records (resize, center crop, normalization), and print the top classes.

use crate::cmd::outln;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle::{DType, Device, Tensor};
use serde::Serialize;
use tau_model::preprocess::{Interpolation, Preprocessing};
use tau_model::{CheckpointConfig, Model};

use super::Outcome;
use super::load::{ModelArgs, check_stat};
use tau_train::config::DeviceSpec;

/// Arguments of `tau-resnet predict`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  tau-resnet predict --checkpoint runs/cifar10-resnet110-bn cat.png ship.jpg
  tau-resnet predict --checkpoint timm/resnet50.a1_in1k --top-k 3 --json photo.jpg
  tau-resnet predict --checkpoint lmz/candle-resnet --weights-file resnet50.safetensors --arch resnet50 photo.jpg

Each image is resized so that its shorter side is input/crop_pct, center-cropped to the
input size, and normalized with the checkpoint's mean and std (config.json
`preprocessing`, or timm's `pretrained_cfg`); the options below override them.")]
pub struct PredictArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image files (JPEG or PNG).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, short = 'k', default_value_t = 5, value_parser = super::positive())]
    pub top_k: usize,
    /// A text file of class names, one per line, overriding the checkpoint's.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Per-channel mean of the pixels in [0, 1] (comma-separated), overriding the
    /// checkpoint's.
    #[arg(long, value_delimiter = ',', value_name = "M,...")]
    pub mean: Option<Vec<f64>>,
    /// Per-channel standard deviation (comma-separated), overriding the checkpoint's.
    #[arg(long, value_delimiter = ',', value_name = "S,...")]
    pub std: Option<Vec<f64>>,
    /// Input height and width: `224` or `HxW`, overriding the checkpoint's.
    #[arg(long, value_name = "SIZE")]
    pub input_size: Option<String>,
    /// Fraction of the resized image the center crop keeps, in (0, 1].
    #[arg(long, value_name = "F")]
    pub crop_pct: Option<f64>,
    /// Resampling filter: nearest, bilinear, bicubic or lanczos.
    #[arg(long, value_name = "NAME")]
    pub interpolation: Option<String>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16, value_parser = super::positive())]
    pub batch_size: usize,
    /// Where to compute: auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One class of a prediction.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scored {
    /// The class index (the model's output).
    pub class: usize,
    /// Its name (`class N` where none is known).
    pub label: String,
    /// Its softmax probability.
    pub prob: f64,
}

/// The top classes of one image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    /// The image file.
    pub file: String,
    /// The `k` most probable classes, most probable first.
    pub top: Vec<Scored>,
}

#[derive(Debug, Serialize)]
struct PredictOutput<'a> {
    checkpoint: &'a str,
    preprocessing: &'a Preprocessing,
    predictions: &'a [Prediction],
}

/// The preprocessing `predict` applies: the checkpoint's, with the command line's
/// overrides; for a checkpoint that records none, the usual one of its family (CIFAR-10
/// or MNIST statistics for CIFAR ResNets by their channels, ImageNet's for bottleneck
/// ResNets), with a warning.
///
/// # Errors
/// A theory network (it takes vectors), overrides that do not fit the model.
pub fn preprocessing(
    args: &PredictArgs,
    checkpoint: &CheckpointConfig,
) -> anyhow::Result<Preprocessing> {
    let channels = checkpoint.model.in_channels().with_context(|| {
        format!(
            "predict classifies images; the {} network takes vectors",
            checkpoint.model.family()
        )
    })?;
    let mut p = match &checkpoint.preprocessing {
        Some(p) => p.clone(),
        None => {
            let guess = checkpoint
                .model
                .as_family()
                .default_preprocessing()
                .filter(|p| p.channels() == channels)
                .unwrap_or_else(|| Preprocessing::identity([channels, 32, 32]));
            tracing::warn!(
                "the checkpoint records no preprocessing: assuming mean {:?}, std {:?}, input {:?} (override with --mean, --std, --input-size)",
                guess.mean,
                guess.std,
                guess.input_size
            );
            guess
        }
    };
    if let Some(m) = &args.mean {
        check_stat("mean", m, channels)?;
        p.mean.clone_from(m);
    }
    if let Some(s) = &args.std {
        check_stat("std", s, channels)?;
        p.std.clone_from(s);
    }
    if let Some(size) = &args.input_size {
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|v| *v > 0)
                .with_context(|| format!("--input-size {size:?}: expected N or HxW"))
        };
        let (h, w) = match size.split_once(['x', 'X']) {
            Some((h, w)) => (parse(h)?, parse(w)?),
            None => {
                let n = parse(size)?;
                (n, n)
            }
        };
        p.input_size = [channels, h, w];
    }
    if let Some(c) = args.crop_pct {
        p.crop_pct = c;
    }
    if let Some(i) = &args.interpolation {
        p.interpolation = Interpolation::from_name(i).map_err(anyhow::Error::msg)?;
    }
    p.validate().context("the preprocessing")?;
    Ok(p)
}

/// Class names from a file of one name per line (blank lines at the end ignored): as
/// many as the model has classes.
///
/// # Errors
/// An unreadable file, another number of names than `classes`.
pub fn read_labels(path: &Path, classes: usize) -> anyhow::Result<Vec<String>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading labels {}", path.display()))?
        .len();
    if len > 16 << 20 {
        bail!(
            "{}: {len} bytes is too large for a labels file",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading labels {}", path.display()))?;
    let names: Vec<String> = text
        .trim_end()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    if names.len() != classes {
        bail!(
            "{}: {} names, the model has {classes} classes",
            path.display(),
            names.len()
        );
    }
    Ok(names)
}

/// A model ready to classify images: the network, its checkpoint config (class names),
/// the preprocessing, and the dtype and device its tensors are in.
pub struct Classifier {
    /// The network.
    pub model: Model,
    /// Its config (for the class names).
    pub checkpoint: CheckpointConfig,
    /// How images become inputs.
    pub preprocessing: Preprocessing,
    /// The dtype of the weights.
    pub dtype: DType,
    /// The device of the weights.
    pub device: Device,
}

impl Classifier {
    /// Classifies `images`: each decoded (a bad file is an error naming it), prepared by
    /// the preprocessing, run in eval mode in batches of `batch_size`; returns the `top_k`
    /// classes of each with their softmax probabilities.
    ///
    /// # Errors
    /// An unreadable or undecodable image (naming the file), device errors.
    pub fn classify(
        &self,
        images: &[PathBuf],
        top_k: usize,
        batch_size: usize,
    ) -> anyhow::Result<Vec<Prediction>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(batch_size.max(1)) {
            let mut inputs = Vec::with_capacity(chunk.len());
            for path in chunk {
                // The data crate's error names the file and what is wrong with it.
                let img = tau_data::folder::decode_image_file(path)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                inputs.push(
                    self.preprocessing
                        .image_to_tensor(&img, &self.device)
                        .with_context(|| format!("preparing image {}", path.display()))?,
                );
            }
            let xs = Tensor::stack(&inputs, 0)?.to_dtype(self.dtype)?;
            let logits = self.model.forward_t(&xs, false)?.to_dtype(DType::F64)?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f64>()?;
            for (path, p) in chunk.iter().zip(probs) {
                let mut order: Vec<usize> = (0..p.len()).collect();
                order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                out.push(Prediction {
                    file: path.display().to_string(),
                    top: order
                        .into_iter()
                        .take(top_k)
                        .map(|class| Scored {
                            class,
                            label: self.checkpoint.class_name(class),
                            prob: p[class],
                        })
                        .collect(),
                });
            }
        }
        Ok(out)
    }
}

/// Runs `tau-resnet predict`.
///
/// # Errors
/// A missing or corrupt checkpoint, a bad image file (naming it), options that do not fit
/// the model.
pub fn run(args: PredictArgs) -> anyhow::Result<Outcome> {
    let device = args.device.device()?;
    let (place, pretrained) = args.model.load(&device)?;
    let mut checkpoint = pretrained.config.clone();
    let prep = preprocessing(&args, &checkpoint)?;
    if let Some(path) = &args.labels {
        checkpoint.class_names = Some(read_labels(path, checkpoint.model.num_outputs())?);
    }
    let classifier = Classifier {
        // Without an autograd graph: each activation is freed once the next is computed.
        model: Model::inference(&pretrained.config.model, &pretrained.varmap, &device)
            .context("building the model")?,
        checkpoint,
        preprocessing: prep,
        dtype: tau_model::checkpoint::varmap_dtype(&pretrained.varmap).unwrap_or(DType::F32),
        device,
    };
    let predictions = classifier.classify(&args.images, args.top_k, args.batch_size)?;
    let prep = &classifier.preprocessing;
    if args.json {
        let out = PredictOutput {
            checkpoint: &place,
            preprocessing: prep,
            predictions: &predictions,
        };
        outln!("{}", serde_json::to_string(&out)?)?;
    } else {
        for p in &predictions {
            outln!("{}", p.file)?;
            for (rank, s) in p.top.iter().enumerate() {
                outln!(
                    "  {:>2}. {:>6.2}%  {} ({})",
                    rank + 1,
                    100.0 * s.prob,
                    s.label,
                    s.class
                )?;
            }
        }
    }
    Ok(Outcome::Finished)
}
