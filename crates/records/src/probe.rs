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
    #[serde(deserialize_with = "non_finite_as_null::vec")]
    pub log10_ratio: Vec<f64>,
    /// log10 ‖∂ℓ/∂W_1‖/‖∂ℓ/∂W_L‖ per (seed, input) (empty for families without a
    /// per-input backward probe).
    #[serde(deserialize_with = "non_finite_as_null::vec")]
    pub log10_grad_ratio: Vec<f64>,
    /// Median over inputs and seeds of log10 ‖h_l‖/‖h_0‖ at the blocks of
    /// [`ProbeRecord::blocks`].
    #[serde(deserialize_with = "non_finite_as_null::vec")]
    pub block_log10_ratio_median: Vec<f64>,
    /// Median over inputs and seeds of log10 ‖∂ℓ/∂W_l‖/‖∂ℓ/∂W_L‖ at those blocks (theory
    /// network), or log10 of the gradient norm of each block's parameters relative to the
    /// last block's (ResNets, whole batch).
    #[serde(deserialize_with = "non_finite_as_null::vec")]
    pub block_log10_grad_median: Vec<f64>,
}

/// JSON has no NaN or ±∞: serde_json writes them as `null`, and they read back as NaN (a
/// probe of a scheme whose blocks start as the identity has 0/0 gradient ratios, a
/// blown-up network infinite ones).
mod non_finite_as_null {
    use serde::{Deserialize, Deserializer};

    pub(super) fn vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let values = Vec::<Option<f64>>::deserialize(d)?;
        Ok(values.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    }
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
    fn non_finite_values_written_as_null_read_back_as_nan() {
        let mut rec: ProbeRecord = serde_json::from_str(
            r#"{"format": "tau-resnet-probe/1", "family": "cifar_resnet", "n_blocks": 3,
                "seeds": [0], "n_inputs": 2, "blocks": [1, 2, 3],
                "taus": [{"rule": "fixup", "alpha": null, "tau": 1.0,
                          "log10_ratio": [0.0, 0.0], "log10_grad_ratio": [],
                          "block_log10_ratio_median": [0.0, 0.0, 0.0],
                          "block_log10_grad_median": [null, null, 0.0]}],
                "wall_s": 0.1, "version": "0.1.0"}"#,
        )
        .unwrap();
        let g = &rec.taus[0].block_log10_grad_median;
        assert!(g[0].is_nan() && g[1].is_nan() && g[2] == 0.0, "{g:?}");
        // What the writer makes of NaN and ∞ reads back.
        rec.taus[0].log10_ratio = vec![f64::INFINITY, 1.0];
        let again: ProbeRecord =
            serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert!(again.taus[0].log10_ratio[0].is_nan());
        assert_eq!(again.taus[0].log10_ratio[1], 1.0);
    }

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
