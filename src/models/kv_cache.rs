//! Keys and values of the tokens a sequence has seen, per layer, in buffers that grow by doubling:
//! a decode step writes its one new position in place instead of copying the whole history.

use candle_core::{Result, Tensor};

/// One layer: `(1, kv_heads, capacity, head_dim)` buffers, filled up to `len`.
#[derive(Debug)]
pub struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Appends `k` and `v` `(1, kv_heads, t, head_dim)` and returns every key and value so far
    /// (views of the buffers, valid until the next append). `max` bounds the capacity.
    pub fn append(slot: &mut Option<LayerCache>, k: &Tensor, v: &Tensor, max: usize) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let (len, capacity) = match slot {
            Some(c) => (c.len, c.k.dim(2)?),
            None => (0, 0),
        };
        if len + t > capacity {
            let capacity = (len + t).next_power_of_two().max(32).min(max.max(len + t));
            let (b, heads, _, d) = k.dims4()?;
            let grown = |old: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
                let buffer = Tensor::zeros((b, heads, capacity, d), like.dtype(), like.device())?;
                if let Some(old) = old {
                    buffer.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            let (k_old, v_old) = match slot.as_ref() {
                Some(c) => (Some(&c.k), Some(&c.v)),
                None => (None, None),
            };
            *slot = Some(LayerCache { k: grown(k_old, k)?, v: grown(v_old, v)?, len });
        }
        let cache = slot.as_mut().expect("allocated above");
        cache.k.slice_set(&k.contiguous()?, 2, cache.len)?;
        cache.v.slice_set(&v.contiguous()?, 2, cache.len)?;
        cache.len += t;
        Ok((cache.k.narrow(2, 0, cache.len)?, cache.v.narrow(2, 0, cache.len)?))
    }

    /// An independent copy (the buffers are written in place, so sharing them is not an option).
    pub fn fork(&self) -> Result<Self> {
        Ok(Self { k: self.k.copy()?, v: self.v.copy()?, len: self.len })
    }
}

/// Every layer's cache of one sequence.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerCache>>,
    pub(crate) len: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An independent copy, e.g. for the other choices of a request after their shared prefill.
    pub fn fork(&self) -> Result<Self> {
        let layers = self.layers.iter().map(|l| l.as_ref().map(LayerCache::fork).transpose()).collect::<Result<_>>()?;
        Ok(Self { layers, len: self.len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn appends_grow_the_buffer_and_keep_every_position() {
        let mut slot = None;
        let mut all = Vec::new();
        for step in 0..40u32 {
            let t = if step == 0 { 3 } else { 1 };
            let k = Tensor::arange(0f32, (2 * t * 4) as f32, &Device::Cpu).unwrap().reshape((1, 2, t, 4)).unwrap();
            let k = (k + f64::from(step) * 100.0).unwrap();
            all.push(k.clone());
            let (keys, values) = LayerCache::append(&mut slot, &k, &k, 1024).unwrap();
            let expected = Tensor::cat(&all, 2).unwrap();
            let diff: f32 = (keys - &expected).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert_eq!(diff, 0.0, "step {step}");
            let diff: f32 = (values - &expected).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert_eq!(diff, 0.0);
        }
        let forked = slot.as_ref().unwrap().fork().unwrap();
        assert_eq!(forked.len, 42);
    }
}
