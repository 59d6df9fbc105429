//! Choosing the next token from logits, as OpenAI's parameters describe it: presence and
//! frequency penalties, temperature (0 = greedy), nucleus (top-p) sampling, seeded; plus the
//! log-probabilities of the chosen token and of the most likely alternatives.

use std::collections::HashMap;

use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Report log-probabilities, with this many alternatives per position (`None`: none at all).
    pub top_logprobs: Option<usize>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            top_logprobs: None,
            seed: 0,
        }
    }
}

/// A chosen token and, when asked for, its log-probability and the top alternatives. Reported
/// log-probabilities are the model's own (log-softmax of the raw logits), before penalties and
/// temperature, as vLLM reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// The sampling state of one sequence (its generator and what it has generated so far).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// `stream` tells apart sequences that share a seed (the choices of one request).
    pub fn new(params: SamplingParams, stream: usize) -> Self {
        let rng = Rng::derive(params.seed, &format!("sample-{stream}"));
        Self { params, rng, counts: HashMap::new() }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let (logprob, top) = match self.params.top_logprobs {
            Some(k) => {
                let lp = log_softmax(logits);
                let top = top_k(&lp, k);
                (Some(lp), top)
            }
            None => (None, Vec::new()),
        };
        let mut adjusted = logits.to_vec();
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            for (&token, &count) in &self.counts {
                if let Some(l) = adjusted.get_mut(token as usize) {
                    *l -= self.params.presence_penalty + self.params.frequency_penalty * count as f32;
                }
            }
        }
        let token = if self.params.temperature <= 0.0 { argmax(&adjusted) } else { self.draw(&mut adjusted) };
        *self.counts.entry(token).or_default() += 1;
        Sampled { token, logprob: logprob.map(|lp| lp[token as usize]), top }
    }

    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())).collect();
        let sum: f32 = probs.iter().map(|p| p.1).sum();
        if self.params.top_p < 1.0 {
            // Most likely first; ties by id so the order (and so the draw) is deterministic.
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept = 0.0;
            let mut len = 0;
            for p in &probs {
                kept += p.1 / sum;
                len += 1;
                if kept >= self.params.top_p {
                    break;
                }
            }
            probs.truncate(len.max(1));
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut target = self.rng.next_f32() * total;
        for &(token, p) in &probs {
            target -= p;
            if target <= 0.0 {
                return token;
            }
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}

pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}

/// The `k` largest values with their indices, largest first (ties: lower index first).
fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && v <= best[k - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_p, seed: 7, ..SamplingParams::default() }
    }

    #[test]
    fn temperature_zero_is_argmax_and_penalties_move_it() {
        let logits = [0.0, 3.0, 2.9];
        let mut greedy = Sampler::new(params(0.0, 1.0), 0);
        assert_eq!(greedy.sample(&logits).token, 1);
        assert_eq!(greedy.sample(&logits).token, 1);
        let mut penalised = Sampler::new(SamplingParams { presence_penalty: 0.5, ..params(0.0, 1.0) }, 0);
        assert_eq!(penalised.sample(&logits).token, 1);
        assert_eq!(penalised.sample(&logits).token, 2, "the presence penalty makes the repeat less likely");
        let mut frequency = Sampler::new(SamplingParams { frequency_penalty: 0.04, ..params(0.0, 1.0) }, 0);
        let picks: Vec<u32> = (0..6).map(|_| frequency.sample(&logits).token).collect();
        assert_eq!(picks, vec![1, 1, 1, 2, 1, 2], "each repeat costs 0.04 more");
    }

    #[test]
    fn same_seed_same_draws_and_streams_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |stream| {
            let mut s = Sampler::new(params(1.0, 1.0), stream);
            (0..40).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn sampling_follows_the_distribution_and_top_p_cuts_the_tail() {
        // probabilities 0.5, 0.3, 0.2 (logits are their logs)
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(params(1.0, 1.0), 0);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[s.sample(&logits).token as usize] += 1;
        }
        let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / 20_000.0).collect();
        for (f, p) in freq.iter().zip([0.5, 0.3, 0.2]) {
            assert!((f - p).abs() < 0.02, "frequency {f} vs probability {p}");
        }
        let mut nucleus = Sampler::new(params(1.0, 0.75), 0);
        let tokens: std::collections::HashSet<u32> = (0..2000).map(|_| nucleus.sample(&logits).token).collect();
        assert_eq!(tokens, [0, 1].into_iter().collect(), "top_p 0.75 keeps 0.5 + 0.3 only");
    }

    #[test]
    fn logprobs_are_the_models_and_top_alternatives_are_ordered() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let mut s = Sampler::new(SamplingParams { top_logprobs: Some(2), ..params(0.0, 1.0) }, 0);
        let out = s.sample(&logits);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert_eq!(out.token, 1);
        assert!((out.logprob.unwrap() - (3f32.exp() / z).ln()).abs() < 1e-5);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((out.top[1].1 - (2f32.exp() / z).ln()).abs() < 1e-5);
    }
}
