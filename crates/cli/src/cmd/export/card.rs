//! The model card (`README.md`) of an exported folder: the hub's YAML front matter, what
//! the model is, the run's results, the preprocessing and how to load it.

use std::fmt::Write as _;

use tau_model::{CheckpointConfig, ModelConfig, Norm, Scaling, Shortcut};
use tau_records::Summary;
use tau_train::config::{RunConfig, SourceKind};

use super::hub_dataset;

/// A YAML string scalar (double-quoted, escaped as JSON, which YAML reads).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// What the shortcut of a CIFAR ResNet's two shape-changing blocks computes from the
/// block input x.
fn describe_shortcut(shortcut: Shortcut) -> &'static str {
    match shortcut {
        Shortcut::ZeroPad => "x at every other pixel with zero channels appended (option A)",
        Shortcut::SubsampleBn => "BatchNorm of x at every other pixel, with zero channels appended",
        Shortcut::ConvBn => "BatchNorm of a 1×1 stride-2 convolution of x (option B)",
    }
}

/// A branch-scaling scheme other than τ, as the card describes it.
struct Scheme {
    /// Its name (`Fixup`).
    title: &'static str,
    /// The paper it comes from.
    source: &'static str,
    /// The per-block scalar's parameter name (`scale`, `alpha`).
    param: &'static str,
    /// That scalar's initial value.
    init: f64,
    /// The block, as a formula in the card's notation.
    block: &'static str,
    /// What a PyTorch block must return.
    pytorch: &'static str,
}

/// The card's description of `scaling`; `None` for τ.
fn scheme(scaling: Scaling) -> Option<Scheme> {
    match scaling {
        Scaling::Tau => None,
        Scaling::Fixup => Some(Scheme {
            title: "Fixup",
            source: "Zhang, Dauphin & Ma, \"Fixup Initialization: Residual Learning Without \
                     Normalization\", 2019",
            param: "scale",
            init: 1.0,
            block: "`x_(l+1) = relu(x_l + s_l·F(x_l) + b_l)`, the branch's last convolution \
                    and the classifier initialized at zero",
            pytorch: "relu(shortcut(x) + scale * branch(x) + bias2b)",
        }),
        Scaling::SkipInit => Some(Scheme {
            title: "SkipInit",
            source: "De & Smith, \"Batch Normalization Biases Residual Blocks Towards the \
                     Identity Function in Deep Networks\", 2020",
            param: "alpha",
            init: 0.0,
            block: "`x_(l+1) = relu(x_l + α_l·F(x_l))`",
            pytorch: "relu(shortcut(x) + alpha * branch(x))",
        }),
        Scaling::ReZero => Some(Scheme {
            title: "ReZero",
            source: "Bachlechner et al., \"ReZero is All You Need: Fast Convergence at Large \
                     Depth\", 2020",
            param: "alpha",
            init: 0.0,
            block: "`x_(l+1) = x_l + α_l·F(x_l)`, without a ReLU after the sum",
            pytorch: "shortcut(x) + alpha * branch(x)",
        }),
    }
}

/// The model card: YAML front matter for the hub, then what the model is, its results,
/// its preprocessing, how to load it, and the training config.
pub(super) fn model_card(
    name: &str,
    repo_id: &str,
    checkpoint: &CheckpointConfig,
    learned_tau: Option<f64>,
    cfg: &RunConfig,
    config_toml: &str,
    summary: &Summary,
) -> String {
    let model = &checkpoint.model;
    let metrics = summary.final_metrics.as_ref();
    let m = CardMetrics {
        test_acc: metrics.and_then(|m| m.test_acc).filter(|v| v.is_finite()),
        test_loss: metrics.and_then(|m| m.test_loss).filter(|v| v.is_finite()),
        train_loss: metrics.and_then(|m| m.train_loss).filter(|v| v.is_finite()),
        loss_name: match cfg.loss.kind {
            tau_train::config::LossKind::Squared => "squared",
            tau_train::config::LossKind::CrossEntropy => "cross_entropy",
        },
    };
    let mut md = front_matter(name, model, cfg, &m);
    card_intro(&mut md, name, checkpoint, learned_tau, cfg, summary);
    card_results(&mut md, &m, summary);
    if let Some(p) = &checkpoint.preprocessing {
        card_preprocessing(&mut md, p);
    }
    card_usage(&mut md, repo_id, checkpoint, cfg);
    md.push_str("\n## Training config\n\n```toml\n");
    md.push_str(config_toml.trim_end());
    md.push_str("\n```\n");
    md
}

/// The final metrics a card reports (finite ones only) and the loss's name.
struct CardMetrics {
    test_acc: Option<f64>,
    test_loss: Option<f64>,
    train_loss: Option<f64>,
    loss_name: &'static str,
}

/// The card's YAML front matter: library, tags, data set and the model index.
fn front_matter(name: &str, model: &ModelConfig, cfg: &RunConfig, m: &CardMetrics) -> String {
    let dataset = hub_dataset(cfg.data.source);
    let (test_acc, test_loss, loss_name) = (m.test_acc, m.test_loss, m.loss_name);
    let mut y = String::from("---\n");
    y.push_str("library_name: tau-model\n");
    y.push_str("tags:\n- tau-resnet\n- candle\n- resnet\n");
    if model.in_channels().is_some() {
        y.push_str("- image-classification\n");
        y.push_str("pipeline_tag: image-classification\n");
    }
    if let Some(d) = dataset {
        let _ = writeln!(y, "datasets:\n- {d}");
    }
    let mut results = Vec::new();
    if let Some(a) = test_acc {
        results.push(("accuracy", a, "Test accuracy".to_string()));
    }
    if let Some(l) = test_loss {
        results.push(("loss", l, format!("Test loss ({loss_name})")));
    }
    if !results.is_empty() {
        y.push_str("metrics:\n");
        for (kind, _, _) in &results {
            let _ = writeln!(y, "- {kind}");
        }
        let _ = writeln!(y, "model-index:\n- name: {}\n  results:", yaml_str(name));
        y.push_str(
            "  - task:\n      type: image-classification\n      name: Image Classification\n",
        );
        let _ = writeln!(
            y,
            "    dataset:\n      name: {}\n      type: {}\n      split: test",
            yaml_str(&cfg.data.source.to_string()),
            yaml_str(dataset.unwrap_or("custom"))
        );
        y.push_str("    metrics:\n");
        for (kind, value, label) in &results {
            let _ = writeln!(
                y,
                "    - type: {kind}\n      value: {value}\n      name: {}",
                yaml_str(label)
            );
        }
    }
    y.push_str("---\n\n");

    y
}

/// The card's title and what the model is: family, data, τ, parameters, the run.
fn card_intro(
    md: &mut String,
    name: &str,
    checkpoint: &CheckpointConfig,
    learned_tau: Option<f64>,
    cfg: &RunConfig,
    summary: &Summary,
) {
    let model = &checkpoint.model;
    let _ = writeln!(md, "# {name}\n");
    let data = checkpoint
        .dataset
        .as_deref()
        .unwrap_or(match cfg.data.source {
            SourceKind::Folder => "an image folder",
            _ => "its data set",
        });
    let trained = format!(
        "{} trained with [tau-resnet](https://github.com/tau-resnet/tau-resnet) on {data}.",
        capitalize(&model.as_family().description())
    );
    match scheme(model.scaling()) {
        None => {
            let _ = writeln!(
                md,
                "{trained} Each residual branch is scaled by τ before it is added to the \
                 shortcut, `x_(l+1) = x_l + τ·F(x_l)` (Zhang et al., \"Stabilize Deep ResNet \
                 with A Sharp Scaling Factor τ\", 2022).\n"
            );
            let _ = writeln!(
                md,
                "- τ rule: `{}`, at L = {} residual blocks τ = {:.6}{}",
                model.tau_rule(),
                model.n_blocks(),
                model.tau_init(),
                match learned_tau {
                    Some(t) =>
                        format!(" at initialization; τ is learned, its trained value is {t:.6}"),
                    None => String::new(),
                }
            );
        }
        Some(s) => {
            let _ = writeln!(
                md,
                "{trained} Its residual branches are scaled by {} ({}), not by τ: each \
                 block multiplies its branch by a learnable scalar of its own, {}.\n",
                s.title, s.source, s.block
            );
            let _ = writeln!(
                md,
                "- branch scaling: {}, one learnable `{}` per residual block \
                 (`layer1.0.{}`, …), initialized at {}, at L = {} residual blocks; no τ",
                s.title,
                s.param,
                s.param,
                s.init,
                model.n_blocks()
            );
        }
    }
    let _ = writeln!(
        md,
        "- parameters: {} (plus BatchNorm running statistics, if any)",
        model.num_parameters()
    );
    let _ = writeln!(
        md,
        "- run: `{}`, status {}, {} steps, {} epochs",
        summary.name,
        summary.status.as_str(),
        summary.steps,
        summary.epochs_completed
    );
}

/// The card's results table.
fn card_results(md: &mut String, m: &CardMetrics, summary: &Summary) {
    let (test_acc, test_loss, train_loss, loss_name) =
        (m.test_acc, m.test_loss, m.train_loss, m.loss_name);
    md.push_str("\n## Results\n\n| metric | value |\n| --- | --- |\n");
    if let Some(a) = test_acc {
        let _ = writeln!(md, "| test accuracy | {:.2}% |", 100.0 * a);
    }
    if let Some(l) = test_loss {
        let _ = writeln!(md, "| test loss ({loss_name}) | {l:.6} |");
    }
    if let Some(l) = train_loss {
        let _ = writeln!(md, "| training loss ({loss_name}) | {l:.6} |");
    }
    if let Some(a) = summary.best_test_acc.filter(|v| v.is_finite()) {
        let _ = writeln!(
            md,
            "| best test accuracy during training | {:.2}% |",
            100.0 * a
        );
    }
    let _ = writeln!(
        md,
        "| training time | {:.0} s on {} |",
        summary.wall_s, summary.device
    );
}

/// What the model expects of its input.
fn card_preprocessing(md: &mut String, p: &tau_model::Preprocessing) {
    md.push_str("\n## Preprocessing\n\n");
    let _ = writeln!(
        md,
        "Inputs are {}×{} images with {} channel(s), pixels scaled to [0, 1], then \
         normalized per channel with mean {:?} and std {:?}. Images of another size are \
         resized ({}) so that the shorter side is {} and center-cropped (`crop_pct` {}). \
         `config.json` records this under `preprocessing`; tau-model applies it.",
        p.input_size[1],
        p.input_size[2],
        p.input_size[0],
        p.mean,
        p.std,
        p.interpolation.name(),
        p.resize_size().0,
        p.crop_pct
    );
}

/// How to load the model with tau-model and with PyTorch.
fn card_usage(md: &mut String, repo_id: &str, checkpoint: &CheckpointConfig, cfg: &RunConfig) {
    let model = &checkpoint.model;
    md.push_str("\n## Use it with tau-model (Rust)\n\n```sh\n");
    if model.in_channels().is_some() {
        let _ = writeln!(md, "tau-resnet predict --checkpoint {repo_id} image.png");
    }
    let _ = writeln!(
        md,
        "tau-resnet eval --checkpoint {repo_id} --data {}",
        cfg.data.source
    );
    md.push_str("```\n\n```rust\n");
    md.push_str("use candle::Device;\n");
    md.push_str("use tau_model::hub::{HubOptions, LoadSpec, load_pretrained};\n\n");
    let _ = writeln!(
        md,
        "let p = load_pretrained({}, &LoadSpec::default(), &HubOptions::default(), &Device::Cpu)?;",
        yaml_str(repo_id)
    );
    md.push_str("let model = p.model(&Device::Cpu)?;\n");
    if checkpoint.preprocessing.is_some() {
        md.push_str("let prep = p.config.preprocessing.clone().expect(\"recorded\");\n");
        md.push_str("let img = tau_model::preprocess::image::open(\"image.png\")?;\n");
        md.push_str("let x = prep.image_to_tensor(&img, &Device::Cpu)?.unsqueeze(0)?;\n");
        md.push_str("let logits = model.forward_t(&x, /* train */ false)?;\n");
    }
    md.push_str("```\n\n## Use it with PyTorch\n\n");
    md.push_str(
        "`model.safetensors` holds every parameter and BatchNorm buffer under PyTorch \
         `state_dict` names (`conv1.weight`, `bn1.running_mean`, `layer2.0.conv1.weight`, \
         `fc.bias`, …):\n\n```python\nfrom safetensors.torch import load_file\n\n\
         state_dict = load_file(\"model.safetensors\")\n",
    );
    match model {
        ModelConfig::BottleneckResnet(c)
            if c.norm == Norm::BatchNorm && !c.learnable_tau && model.tau_init() == 1.0 =>
        {
            let _ = writeln!(
                md,
                "import torchvision\n\nmodel = torchvision.models.resnet{}(num_classes={})\n\
                 model.load_state_dict(state_dict, strict=False)  # no num_batches_tracked\n\
                 model.eval()\n```\n\nWith τ = 1 this is torchvision's ResNet-{} exactly.",
                c.depth, c.num_classes, c.depth
            );
        }
        _ => {
            let block = match scheme(model.scaling()) {
                None => format!(
                    "`relu(shortcut(x) + tau * branch(x))` with τ = {:.9} (the `tau` tensor \
                     when τ is learned)",
                    model.tau_init()
                ),
                Some(s) => format!(
                    "`{}` with that block's own `{}` tensor (`layer1.0.{}`, …)",
                    s.pytorch, s.param, s.param
                ),
            };
            let shortcut = match model {
                ModelConfig::CifarResnet(c) => format!(
                    " In the first block of stages 2 and 3 `shortcut(x)` is {}; in the others \
                     it is x.",
                    describe_shortcut(c.shortcut)
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                md,
                "```\n\nA PyTorch module with these names computes the same function if each \
                 residual block returns {block}.{shortcut} The architecture is \
                 `config.json`'s `model`, documented in tau-model's crate docs."
            );
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
