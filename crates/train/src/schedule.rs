//! Learning-rate schedules: constant, step at milestones (PyTorch `MultiStepLR`), cosine
//! annealing (`CosineAnnealingLR` with `eta_min = 0`), each with an optional linear warm-up.
//!
//! The schedule is a pure function of the step, so a resumed run needs no schedule state.

use crate::config::ScheduleConfig;

/// A learning-rate schedule resolved to steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    base_lr: f64,
    kind: Kind,
    warmup_steps: f64,
    total_steps: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Constant,
    Step { milestones: Vec<u64>, gamma: f64 },
    Cosine,
}

impl Schedule {
    /// Resolves a schedule config. `unit_steps` is the number of steps in one unit of the
    /// config (steps per epoch for a run counted in epochs, 1 for a run counted in steps),
    /// `total_steps` the length of the run.
    pub fn new(
        base_lr: f64,
        cfg: &ScheduleConfig,
        warmup: f64,
        unit_steps: u64,
        total_steps: u64,
    ) -> Schedule {
        let kind = match cfg {
            ScheduleConfig::Constant => Kind::Constant,
            ScheduleConfig::Cosine => Kind::Cosine,
            ScheduleConfig::Step { milestones, gamma } => Kind::Step {
                milestones: milestones
                    .iter()
                    .map(|m| m.saturating_mul(unit_steps))
                    .collect(),
                gamma: *gamma,
            },
        };
        Schedule {
            base_lr,
            kind,
            warmup_steps: warmup * unit_steps as f64,
            total_steps: total_steps.max(1),
        }
    }

    /// The learning rate of the update at 0-based `step` (the number of updates before it).
    pub fn lr_at(&self, step: u64) -> f64 {
        let decay = match &self.kind {
            Kind::Constant => 1.0,
            Kind::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| m <= step).count();
                gamma.powi(passed as i32)
            }
            Kind::Cosine => {
                let t = (step as f64 / self.total_steps as f64).min(1.0);
                0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        };
        let warm = if self.warmup_steps > 0.0 {
            ((step + 1) as f64 / self.warmup_steps).min(1.0)
        } else {
            1.0
        };
        self.base_lr * decay * warm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_schedule_drops_at_epoch_milestones() {
        // The reference CIFAR schedule: lr 0.1, ÷10 at epochs 100 and 150, 391 steps/epoch.
        let cfg = ScheduleConfig::Step {
            milestones: vec![100, 150],
            gamma: 0.1,
        };
        let s = Schedule::new(0.1, &cfg, 0.0, 391, 200 * 391);
        assert_eq!(s.lr_at(0), 0.1);
        assert_eq!(s.lr_at(100 * 391 - 1), 0.1);
        assert!((s.lr_at(100 * 391) - 0.01).abs() < 1e-15);
        assert!((s.lr_at(150 * 391) - 0.001).abs() < 1e-15);
    }

    #[test]
    fn cosine_goes_from_base_to_zero() {
        let s = Schedule::new(1.0, &ScheduleConfig::Cosine, 0.0, 1, 100);
        assert_eq!(s.lr_at(0), 1.0);
        assert!((s.lr_at(50) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(100).abs() < 1e-12);
    }

    #[test]
    fn warmup_is_linear_then_flat() {
        let s = Schedule::new(0.4, &ScheduleConfig::Constant, 2.0, 2, 100);
        // 4 warm-up steps: 0.1, 0.2, 0.3, 0.4, then 0.4.
        let lrs: Vec<f64> = (0..6).map(|k| s.lr_at(k)).collect();
        for (got, want) in lrs.iter().zip([0.1, 0.2, 0.3, 0.4, 0.4, 0.4]) {
            assert!((got - want).abs() < 1e-12, "{lrs:?}");
        }
    }
}
