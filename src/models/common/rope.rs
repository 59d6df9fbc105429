//! Rotary position embeddings: the cos/sin tables, with Llama 3, linear and LongRoPE frequency
//! scaling as in transformers' `ROPE_INIT_FUNCTIONS`.

use candle_core::{DType, Device, Result, Tensor};

use crate::models::config::{ModelConfig, RopeScaling};

/// cos and sin for every position up to `max_positions`, `(positions, head_dim)`; with LongRoPE
/// the short-context rows come first and the long-context rows after them.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
    /// LongRoPE: a forward whose longest sequence exceeds this many tokens uses the long rows.
    short_up_to: Option<usize>,
}

impl RopeTables {
    pub fn new(config: &ModelConfig, max_positions: usize, device: &Device) -> Result<Self> {
        Self::with(config.head_dim, config.rope_theta, &config.rope_scaling, max_positions, device)
    }

    /// Gemma 3's tables for its sliding layers, when they have their own settings.
    pub fn local(config: &ModelConfig, max_positions: usize, device: &Device) -> Result<Option<Self>> {
        let Some((theta, scaling)) = config.gemma.as_ref().and_then(|g| g.local_rope.as_ref()) else { return Ok(None) };
        Self::with(config.head_dim, *theta, scaling, max_positions, device).map(Some)
    }

    fn with(dim: usize, theta: f64, scaling: &RopeScaling, max_positions: usize, device: &Device) -> Result<Self> {
        let frequencies = |divisors: Option<&[f64]>| inverse_frequencies(dim, theta, scaling, divisors);
        let (sets, scale, short_up_to) = match scaling {
            RopeScaling::LongRope { short, long, original_max_position_embeddings, attention_factor } => (
                vec![frequencies(Some(short)), frequencies(Some(long))],
                *attention_factor as f32,
                Some(*original_max_position_embeddings),
            ),
            _ => (vec![frequencies(None)], 1.0, None),
        };
        let half = sets[0].len();
        let mut cos = Vec::with_capacity(sets.len() * max_positions * half * 2);
        let mut sin = Vec::with_capacity(sets.len() * max_positions * half * 2);
        for inv_freq in &sets {
            for position in 0..max_positions {
                // Like transformers: the angle is position × inv_freq in f32, duplicated for both
                // halves; cos and sin then times the attention factor.
                let angles: Vec<f32> = inv_freq.iter().map(|f| position as f32 * f).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos() * scale));
                    sin.extend(angles.iter().map(|a| a.sin() * scale));
                }
            }
        }
        let shape = (sets.len() * max_positions, half * 2);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
            max_positions,
            short_up_to,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The table row of `position` in a forward whose longest sequence has `seq_len` tokens
    /// (transformers switches LongRoPE's frequencies on the forward's largest position).
    pub fn row(&self, position: usize, seq_len: usize) -> u32 {
        match self.short_up_to {
            Some(limit) if seq_len > limit => (self.max_positions + position) as u32,
            _ => position as u32,
        }
    }

    /// cos and sin at `positions (b, t)` as `(b, 1, t, head_dim)`, in `dtype`.
    pub fn at(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        if self.short_up_to.is_none() {
            return self.at_rows(positions, dtype);
        }
        let longest = positions.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize + 1;
        match self.row(0, longest) {
            0 => self.at_rows(positions, dtype),
            offset => self.at_rows(&positions.broadcast_add(&Tensor::new(offset, positions.device())?)?, dtype),
        }
    }

    /// cos and sin at table rows `rows (b, t)` (see [`RopeTables::row`]) as `(b, 1, t, head_dim)`.
    pub fn at_rows(&self, rows: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = rows.dims2()?;
        let flat = rows.flatten_all()?;
        let pick = |table: &Tensor| -> Result<Tensor> {
            let d = table.dim(1)?;
            table.index_select(&flat, 0)?.reshape((b, 1, t, d))?.to_dtype(dtype)
        };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }
}

/// `1 / theta^(2i/d)` for i in 0..d/2, then scaled (LongRoPE's `divisors` for its set); computed
/// in f32 as transformers does.
fn inverse_frequencies(dim: usize, theta: f64, scaling: &RopeScaling, divisors: Option<&[f64]>) -> Vec<f32> {
    let base = theta as f32;
    let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
    if let Some(divisors) = divisors {
        // transformers: 1 / (factor · base^(2i/d)).
        return (0..dim / 2).map(|i| 1.0 / (divisors[i] as f32 * base.powf((2 * i) as f32 / dim as f32))).collect();
    }
    match *scaling {
        RopeScaling::None | RopeScaling::LongRope { .. } => inv,
        RopeScaling::Linear { factor } => inv.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            inv.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}
