//! Rotary position embeddings: the cos/sin tables, with Llama 3 and linear frequency scaling as in
//! transformers' `ROPE_INIT_FUNCTIONS`.

use candle_core::{DType, Device, Result, Tensor};

use super::config::{ModelConfig, RopeScaling};

/// cos and sin for every position up to `max_positions`, `(positions, head_dim)`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    pub fn new(config: &ModelConfig, max_positions: usize, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(config);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half * 2);
        let mut sin = Vec::with_capacity(max_positions * half * 2);
        for position in 0..max_positions {
            // Like transformers: the angle is position × inv_freq in f32, duplicated for both halves.
            let angles: Vec<f32> = inv_freq.iter().map(|f| position as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let shape = (max_positions, half * 2);
        Ok(Self { cos: Tensor::from_vec(cos, shape, device)?, sin: Tensor::from_vec(sin, shape, device)? })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// cos and sin at `positions (b, t)` as `(b, 1, t, head_dim)`, in `dtype`.
    pub fn at(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let pick = |table: &Tensor| -> Result<Tensor> {
            let d = table.dim(1)?;
            table.index_select(&flat, 0)?.reshape((b, 1, t, d))?.to_dtype(dtype)
        };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }
}

/// `1 / theta^(2i/d)` for i in 0..d/2, then scaled; computed in f32 as transformers does.
fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base = config.rope_theta as f32;
    let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
    match config.rope_scaling {
        RopeScaling::None => inv,
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
