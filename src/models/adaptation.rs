//! What a model trains or carries: nothing, every weight, or one kind of adapter over a frozen
//! base. Shared by every architecture.

use super::bottleneck::BottleneckPlan;
use super::prefix::PrefixPlan;
use crate::peft::lora::LoraPlan;

/// What to train.
#[derive(Debug, Clone, Copy)]
pub enum Adaptation<'a> {
    /// Nothing: inference with the base weights.
    None,
    /// Every weight.
    Full,
    /// LoRA adapters (trained or loaded) over a frozen base.
    Lora(&'a LoraPlan),
    /// Bottleneck adapters after attention and MLP (trained or loaded) over a frozen base.
    Bottleneck(&'a BottleneckPlan),
    /// Prefix tuning: trained (or loaded) key/value vectors before every input, base frozen.
    Prefix(&'a PrefixPlan),
}
