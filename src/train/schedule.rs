//! Learning-rate schedules with warmup, as in transformers' `get_scheduler`: the rate for
//! optimizer step `s` (0-based) is `base · factor(s)`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Constant,
    #[default]
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// The floor, as a fraction of `base_lr`, that linear and cosine decay to.
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// A run's optimizer steps per epoch and in all (`max_steps` caps them) for `items` shuffled
    /// items (examples, or preference pairs), and its schedule.
    pub fn for_run(config: &super::TrainConfig, items: usize) -> (u64, u64, Self) {
        let micro_per_epoch = items.div_ceil(config.batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(config.gradient_accumulation_steps) as u64;
        let mut total_steps = steps_per_epoch * u64::from(config.epochs);
        if let Some(max) = config.max_steps {
            total_steps = total_steps.min(max);
        }
        let warmup_steps =
            config.warmup_steps.unwrap_or_else(|| (config.warmup_ratio * total_steps as f64).ceil() as u64);
        let schedule = Self {
            kind: config.lr_scheduler,
            base_lr: config.learning_rate,
            warmup_steps,
            total_steps,
            min_lr_ratio: config.min_lr_ratio,
        };
        (steps_per_epoch, total_steps, schedule)
    }

    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let floor = self.min_lr_ratio;
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::Linear => floor + (1.0 - floor) * (1.0 - progress),
            SchedulerKind::Cosine => floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: SchedulerKind, min: f64) -> Schedule {
        Schedule { kind, base_lr: 1.0, warmup_steps: 2, total_steps: 10, min_lr_ratio: min }
    }

    #[test]
    fn warmup_then_decay_like_transformers() {
        let linear = schedule(SchedulerKind::Linear, 0.0);
        let got: Vec<f64> = (0..11).map(|s| linear.lr(s)).collect();
        let want = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        let cosine = schedule(SchedulerKind::Cosine, 0.1);
        assert!((cosine.lr(2) - 1.0).abs() < 1e-12);
        assert!((cosine.lr(6) - 0.55).abs() < 1e-12);
        assert!((cosine.lr(10) - 0.1).abs() < 1e-12);
        assert_eq!(schedule(SchedulerKind::Constant, 0.0).lr(9), 1.0);
    }
}
