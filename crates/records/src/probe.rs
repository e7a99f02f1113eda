//! `probe.json`: forward/backward stability of one model at initialization, the record of
//! `tau-resnet probe --out DIR`.

use serde::{Deserialize, Serialize};

/// The value of [`ProbeRecord::format`] that this version writes.
pub const PROBE_FORMAT: &str = "tau-resnet-probe/1";

/// The results for one τ, pooled over seeds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeTau {
    /// The rule as written.
    pub rule: String,
    /// α when the rule is L^-α.
    pub alpha: Option<f64>,
    /// τ resolved at this depth.
    pub tau: f64,
    /// log10 ‖h_L‖/‖h_0‖ per (seed, input), seeds outermost. Inputs whose h_0 is zero are
    /// left out.
    pub log10_ratio: Vec<f64>,
    /// log10 ‖∂ℓ/∂W_1‖/‖∂ℓ/∂W_L‖ per (seed, input) (empty for families without a
    /// per-input backward probe).
    pub log10_grad_ratio: Vec<f64>,
    /// Median over inputs and seeds of log10 ‖h_l‖/‖h_0‖ at the blocks of
    /// [`ProbeRecord::blocks`].
    pub block_log10_ratio_median: Vec<f64>,
    /// Median over inputs and seeds of log10 ‖∂ℓ/∂W_l‖/‖∂ℓ/∂W_L‖ at those blocks (theory
    /// network), or log10 of the gradient norm of each block's parameters relative to the
    /// last block's (ResNets, whole batch).
    pub block_log10_grad_median: Vec<f64>,
}

/// `probe.json`: the whole probe of one model config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeRecord {
    /// Record format tag.
    pub format: String,
    /// Model family.
    pub family: String,
    /// L, the number of residual blocks.
    pub n_blocks: usize,
    /// The seeds, in the order of the per-input arrays.
    pub seeds: Vec<u64>,
    /// Inputs per seed.
    pub n_inputs: usize,
    /// Blocks (1-based) at which per-block values are reported: the powers of two and the
    /// last block of the residual chain. The chain is L blocks long for the theory network
    /// and the CIFAR ResNets; for the bottleneck ResNets it runs through every stage (16
    /// blocks for ResNet-50), while L is the longest stage.
    pub blocks: Vec<usize>,
    /// One entry per τ rule.
    pub taus: Vec<ProbeTau>,
    /// Wall time of the probe, seconds.
    pub wall_s: f64,
    /// The crate version that wrote the record.
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_record_json_round_trips() {
        let rec = ProbeRecord {
            format: PROBE_FORMAT.into(),
            family: "theory".into(),
            n_blocks: 4,
            seeds: vec![0, 1],
            n_inputs: 1,
            blocks: vec![1, 2, 4],
            taus: vec![ProbeTau {
                rule: "1/sqrt(L)".into(),
                alpha: Some(0.5),
                tau: 0.5,
                log10_ratio: vec![0.125, 0.25],
                log10_grad_ratio: vec![],
                block_log10_ratio_median: vec![0.0, 0.0625, 0.1875],
                block_log10_grad_median: vec![0.5, 0.25, 0.0],
            }],
            wall_s: 0.75,
            version: "0.1.0".into(),
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert_eq!(
            text,
            "{\"format\":\"tau-resnet-probe/1\",\"family\":\"theory\",\"n_blocks\":4,\
             \"seeds\":[0,1],\"n_inputs\":1,\"blocks\":[1,2,4],\"taus\":[{\"rule\":\"1/sqrt(L)\",\
             \"alpha\":0.5,\"tau\":0.5,\"log10_ratio\":[0.125,0.25],\"log10_grad_ratio\":[],\
             \"block_log10_ratio_median\":[0.0,0.0625,0.1875],\
             \"block_log10_grad_median\":[0.5,0.25,0.0]}],\"wall_s\":0.75,\"version\":\"0.1.0\"}"
        );
        assert_eq!(serde_json::from_str::<ProbeRecord>(&text).unwrap(), rec);
    }
}
