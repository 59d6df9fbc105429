//! Preference tuning: DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) and the reference-free
//! SimPO (Meng et al. 2024), with RPO's NLL term on the chosen answer (Pang et al. 2024) and
//! label smoothing (conservative DPO), and the reward metrics TRL reports under the same names.
//!
//! A pair's two answers go through the model in one batch (chosen rows first, then rejected),
//! each trained only on its answer tokens. The reference policy's log-probabilities are computed
//! once before the first step with the same weights and the adapters switched off (for full
//! fine-tuning: the weights before training), kept per example and saved with checkpoints, so no
//! second model is ever held (TRL's `precompute_ref_log_probs`).

use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::batch::{make_batch, trained_logits, Batch};
use crate::data::packing::Sequence;
use crate::models::common::fused::label_log_probs;
use crate::models::llama::CausalLm;
use crate::models::ForwardCtx;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceLoss {
    /// DPO: `−log σ(β·Δ)`, Δ the policy's log-ratio margin over the reference's.
    #[default]
    Sigmoid,
    /// IPO: `(Δ − 1/(2β))²` on per-token average log-probabilities.
    Ipo,
    /// SimPO: `−log σ(β·(avg_c − avg_r) − γ)`, no reference model.
    Simpo,
}

impl PreferenceLoss {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Ipo => "ipo",
            Self::Simpo => "simpo",
        }
    }

    /// Whether log-probabilities are averaged over the answer's tokens (IPO, SimPO) or summed.
    fn averaged(self) -> bool {
        self != Self::Sigmoid
    }

    /// β when none is given: 0.1 for DPO and IPO (OpenAI's and TRL's default), 2.0 for SimPO
    /// (the SimPO paper's setting).
    pub fn default_beta(self) -> f64 {
        if self == Self::Simpo {
            2.0
        } else {
            0.1
        }
    }
}

/// What `dpo:` in a train config (and a job's `dpo` method) sets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DpoSettings {
    #[serde(default)]
    pub loss: PreferenceLoss,
    /// The strength of the pull towards the reference (default per `loss`).
    #[serde(default)]
    pub beta: Option<f64>,
    /// SimPO's target reward margin γ (default 0.5).
    #[serde(default)]
    pub simpo_gamma: Option<f64>,
    /// Adds `rpo_alpha ×` the mean NLL of the chosen answers' tokens (RPO).
    #[serde(default)]
    pub rpo_alpha: Option<f64>,
    /// The assumed share of flipped labels ε (sigmoid and SimPO).
    #[serde(default)]
    pub label_smoothing: f64,
}

impl DpoSettings {
    pub fn beta(&self) -> f64 {
        self.beta.unwrap_or_else(|| self.loss.default_beta())
    }

    pub fn gamma(&self) -> f64 {
        self.simpo_gamma.unwrap_or(0.5)
    }

    /// Whether the loss needs the reference policy's log-probabilities.
    pub fn needs_reference(&self) -> bool {
        self.loss != PreferenceLoss::Simpo
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let beta = self.beta();
        if !(beta.is_finite() && beta > 0.0 && beta <= 100.0) {
            return Err("dpo.beta must be in (0, 100]".into());
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err("dpo.label_smoothing must be in [0, 0.5)".into());
        }
        if self.label_smoothing > 0.0 && self.loss == PreferenceLoss::Ipo {
            return Err("dpo.label_smoothing applies to the sigmoid and simpo losses, not ipo".into());
        }
        if self.simpo_gamma.is_some() && self.loss != PreferenceLoss::Simpo {
            return Err("dpo.simpo_gamma applies to loss simpo only".into());
        }
        if !(self.gamma().is_finite() && (0.0..=100.0).contains(&self.gamma())) {
            return Err("dpo.simpo_gamma must be in [0, 100]".into());
        }
        if self.rpo_alpha.is_some_and(|a| !(a.is_finite() && (0.0..=100.0).contains(&a))) {
            return Err("dpo.rpo_alpha must be in [0, 100]".into());
        }
        Ok(())
    }
}

/// TRL's preference metrics, averaged over pairs (`loss` is the full objective, NLL included).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PreferenceMetrics {
    pub loss: f64,
    /// β·(log π(chosen) − log π_ref(chosen)); for SimPO β·avg log π(chosen).
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    /// Share of pairs whose chosen reward exceeds the rejected one.
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    /// The policy's log-probability of each answer (summed over its tokens; averaged for IPO
    /// and SimPO, as the loss uses it).
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    /// Mean cross-entropy of the chosen answers' tokens (RPO's term, reported always).
    pub nll_chosen: f64,
    pub pairs: usize,
}

/// Sums over pairs, turned into means by [`MetricSums::means`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricSums {
    loss: f64,
    rewards_chosen: f64,
    rewards_rejected: f64,
    correct: usize,
    logps_chosen: f64,
    logps_rejected: f64,
    nll: f64,
    chosen_tokens: usize,
    pairs: usize,
}

impl MetricSums {
    pub fn add(&mut self, other: &Self) {
        self.loss += other.loss;
        self.rewards_chosen += other.rewards_chosen;
        self.rewards_rejected += other.rewards_rejected;
        self.correct += other.correct;
        self.logps_chosen += other.logps_chosen;
        self.logps_rejected += other.logps_rejected;
        self.nll += other.nll;
        self.chosen_tokens += other.chosen_tokens;
        self.pairs += other.pairs;
    }

    pub fn means(&self, settings: &DpoSettings) -> PreferenceMetrics {
        let n = self.pairs.max(1) as f64;
        let nll = self.nll / self.chosen_tokens.max(1) as f64;
        let (chosen, rejected) = (self.rewards_chosen / n, self.rewards_rejected / n);
        PreferenceMetrics {
            loss: self.loss / n + settings.rpo_alpha.unwrap_or(0.0) * nll,
            rewards_chosen: chosen,
            rewards_rejected: rejected,
            rewards_accuracies: self.correct as f64 / n,
            rewards_margins: chosen - rejected,
            logps_chosen: self.logps_chosen / n,
            logps_rejected: self.logps_rejected / n,
            nll_chosen: nll,
            pairs: self.pairs,
        }
    }
}

/// The rows of a micro-batch of pairs: every chosen answer, then every rejected one.
pub fn pair_rows<'a>(sequences: &'a [Sequence], pairs: &[usize]) -> Vec<&'a Sequence> {
    let chosen = pairs.iter().map(|&i| &sequences[2 * i]);
    chosen.chain(pairs.iter().map(|&i| &sequences[2 * i + 1])).collect()
}

/// Each row's summed log-probability of its trained tokens, `(rows)`, differentiable; with the
/// number of trained tokens per row and how many of the first `chosen_rows` rows' tokens the
/// argmax predicts right.
pub fn sequence_log_probs(
    model: &CausalLm,
    hidden: &Tensor,
    batch: &Batch,
    chosen_rows: usize,
    ctx: &ForwardCtx,
) -> Result<(Tensor, Vec<f32>, usize)> {
    let (rows, t, _) = hidden.dims3()?;
    let (logits, targets, index) = trained_logits(model, hidden, batch, ctx)?;
    let row_of: Vec<usize> = index.iter().map(|&i| i as usize / (t - 1)).collect();
    let token_logps = label_log_probs(&logits, &targets)?;
    let mut counts = vec![0f32; rows];
    let mut membership = vec![0f32; rows * index.len()];
    for (k, &row) in row_of.iter().enumerate() {
        counts[row] += 1.0;
        membership[row * index.len() + k] = 1.0;
    }
    let membership = Tensor::from_vec(membership, (rows, index.len()), model.device())?;
    let sums = membership.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?;
    let predicted: Vec<u32> = logits.detach().argmax(D::Minus1)?.to_vec1()?;
    let host_targets: Vec<u32> = index.iter().map(|&i| batch.host_targets[i as usize]).collect();
    let correct = (0..index.len()).filter(|&k| row_of[k] < chosen_rows && predicted[k] == host_targets[k]).count();
    Ok((sums, counts, correct))
}

/// `log σ(z)`, stable for large |z|: `min(z, 0) − log(1 + e^−|z|)`.
fn log_sigmoid(z: &Tensor) -> Result<Tensor> {
    z.minimum(0f64)? - (z.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// The objective over one micro-batch of `pairs` pairs: `policy` and `reference` hold each row's
/// summed log-probability (chosen rows first), `counts` its trained tokens. The loss is scaled
/// for accumulation: the pair losses are divided by `group_pairs`, the NLL term by the chosen
/// tokens of the whole optimizer step, `group_chosen_tokens`.
pub fn preference_loss(
    settings: &DpoSettings,
    policy: &Tensor,
    reference: &[f32],
    counts: &[f32],
    group_pairs: usize,
    group_chosen_tokens: usize,
) -> Result<(Tensor, MetricSums)> {
    let device = policy.device();
    let rows = counts.len();
    let b = rows / 2;
    let beta = settings.beta();
    let eps = settings.label_smoothing;
    let counts_t = Tensor::from_vec(counts.to_vec(), rows, device)?;
    let averaged = settings.loss.averaged();
    let used = if averaged { (policy / &counts_t)? } else { policy.clone() };
    let reference_used: Vec<f32> =
        reference.iter().zip(counts).map(|(&r, &n)| if averaged { r / n } else { r }).collect();
    let reference_t = Tensor::new(reference_used.as_slice(), device)?;
    let (chosen, rejected) = (used.narrow(0, 0, b)?, used.narrow(0, b, b)?);
    let sigmoid_loss = |z: &Tensor| -> Result<Tensor> {
        let loss = (log_sigmoid(z)? * -(1.0 - eps))?;
        if eps > 0.0 {
            loss - (log_sigmoid(&z.neg()?)? * eps)?
        } else {
            Ok(loss)
        }
    };
    let losses = match settings.loss {
        PreferenceLoss::Sigmoid | PreferenceLoss::Ipo => {
            let ratio = (&chosen - &rejected)?;
            let reference_ratio = (reference_t.narrow(0, 0, b)? - reference_t.narrow(0, b, b)?)?;
            let margin = (ratio - reference_ratio)?;
            if settings.loss == PreferenceLoss::Sigmoid {
                sigmoid_loss(&(margin * beta)?)?
            } else {
                (margin - 1.0 / (2.0 * beta))?.sqr()?
            }
        }
        PreferenceLoss::Simpo => sigmoid_loss(&(((&chosen - &rejected)? * beta)? - settings.gamma())?)?,
    };
    let chosen_logps = policy.narrow(0, 0, b)?.sum_all()?;
    let mut loss = (losses.sum_all()? / group_pairs.max(1) as f64)?;
    if let Some(alpha) = settings.rpo_alpha.filter(|&a| a > 0.0) {
        loss = (loss - (chosen_logps.clone() * (alpha / group_chosen_tokens.max(1) as f64))?)?;
    }
    // The metrics, on the host.
    let used: Vec<f32> = used.detach().to_vec1()?;
    let losses: Vec<f32> = losses.detach().to_vec1()?;
    let mut sums = MetricSums { pairs: b, ..Default::default() };
    for i in 0..b {
        let (c, r) = (f64::from(used[i]), f64::from(used[b + i]));
        let (rc, rr) = match settings.loss {
            PreferenceLoss::Simpo => (beta * c, beta * r),
            _ => (beta * (c - f64::from(reference_used[i])), beta * (r - f64::from(reference_used[b + i]))),
        };
        sums.loss += f64::from(losses[i]);
        sums.rewards_chosen += rc;
        sums.rewards_rejected += rr;
        sums.correct += usize::from(rc > rr);
        sums.logps_chosen += c;
        sums.logps_rejected += r;
    }
    sums.nll = -f64::from(chosen_logps.detach().to_scalar::<f32>()?);
    sums.chosen_tokens = counts[..b].iter().map(|&n| n as usize).sum();
    Ok((loss, sums))
}

/// The reference policy's summed log-probability of every sequence's trained tokens: the same
/// weights with the adapters off (for full fine-tuning, the weights as they are now).
pub fn reference_log_probs(model: &CausalLm, sequences: &[Sequence], batch_size: usize) -> Result<Vec<f32>> {
    log_probs(model, sequences, batch_size, &ForwardCtx::base_only())
}

/// Every sequence's summed log-probability of its trained tokens under `model` as `ctx` runs it
/// (no gradient), `batch_size` pairs (twice as many rows) at a time.
pub fn log_probs(model: &CausalLm, sequences: &[Sequence], batch_size: usize, ctx: &ForwardCtx) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(batch_size.max(1) * 2) {
        let rows: Vec<&Sequence> = chunk.iter().collect();
        let batch = make_batch(&rows, model.config.sliding_window, model.device(), model.dtype())?;
        let hidden = model.forward_hidden(&batch.input_ids, &batch.positions, &batch.mask, ctx)?;
        let (sums, _, _) = sequence_log_probs(model, &hidden.detach(), &batch, 0, ctx)?;
        out.extend(sums.detach().to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The preference metrics over held-out pairs (no dropout, no gradient).
pub fn evaluate_pairs(
    model: &CausalLm,
    sequences: &[Sequence],
    reference: &[f32],
    settings: &DpoSettings,
    batch_size: usize,
) -> Result<(PreferenceMetrics, usize, usize)> {
    let ctx = ForwardCtx::inference();
    let pairs: Vec<usize> = (0..sequences.len() / 2).collect();
    let (mut sums, mut correct, mut tokens) = (MetricSums::default(), 0usize, 0usize);
    for chunk in pairs.chunks(batch_size.max(1)) {
        let rows = pair_rows(sequences, chunk);
        let batch = make_batch(&rows, model.config.sliding_window, model.device(), model.dtype())?;
        let hidden = model.forward_hidden(&batch.input_ids, &batch.positions, &batch.mask, &ctx)?.detach();
        let (logps, counts, right) = sequence_log_probs(model, &hidden, &batch, chunk.len(), &ctx)?;
        let reference = pair_reference(reference, chunk);
        let (_, part) = preference_loss(settings, &logps, &reference, &counts, 1, 1)?;
        sums.add(&part);
        correct += right;
        tokens += counts[..chunk.len()].iter().map(|&n| n as usize).sum::<usize>();
    }
    Ok((sums.means(settings), correct, tokens))
}

/// The reference log-probabilities of `pairs`' rows in [`pair_rows`]' order.
pub fn pair_reference(reference: &[f32], pairs: &[usize]) -> Vec<f32> {
    if reference.is_empty() {
        return vec![0.0; 2 * pairs.len()];
    }
    let chosen = pairs.iter().map(|&i| reference[2 * i]);
    chosen.chain(pairs.iter().map(|&i| reference[2 * i + 1])).collect()
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn loss_of(settings: DpoSettings, policy: &[f32], reference: &[f32], counts: &[f32]) -> (f64, MetricSums) {
        let policy = Tensor::new(policy, &Device::Cpu).unwrap();
        let (loss, sums) = preference_loss(&settings, &policy, reference, counts, counts.len() / 2, 10).unwrap();
        (f64::from(loss.to_scalar::<f32>().unwrap()), sums)
    }

    fn log_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn each_loss_follows_its_paper_s_formula() {
        let (policy, reference, counts) = ([-4.0, -9.0, -6.0, -7.5], [-5.0, -8.0, -5.5, -8.5], [4.0, 6.0, 3.0, 5.0]);
        // Pairs: (row 0, row 2) and (row 1, row 3).
        let margin = |c: usize, r: usize, avg: bool| {
            let v = |x: &[f32; 4], i: usize| f64::from(x[i]) / if avg { f64::from(counts[i]) } else { 1.0 };
            (v(&policy, c) - v(&policy, r)) - (v(&reference, c) - v(&reference, r))
        };
        let sigmoid = DpoSettings { beta: Some(0.5), ..Default::default() };
        let expected = -(log_sigmoid(0.5 * margin(0, 2, false)) + log_sigmoid(0.5 * margin(1, 3, false))) / 2.0;
        let (loss, sums) = loss_of(sigmoid, &policy, &reference, &counts);
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        let metrics = sums.means(&sigmoid);
        let chosen = 0.5 * ((-4.0 + 5.0) + (-9.0 + 8.0)) / 2.0;
        assert!((metrics.rewards_chosen - chosen).abs() < 1e-6);
        assert_eq!(metrics.rewards_accuracies, 0.5, "pair 1 prefers the chosen answer, pair 2 does not");

        let ipo = DpoSettings { loss: PreferenceLoss::Ipo, beta: Some(0.5), ..Default::default() };
        let expected = ((margin(0, 2, true) - 1.0).powi(2) + (margin(1, 3, true) - 1.0).powi(2)) / 2.0;
        let (loss, _) = loss_of(ipo, &policy, &reference, &counts);
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");

        let simpo = DpoSettings {
            loss: PreferenceLoss::Simpo,
            simpo_gamma: Some(0.3),
            label_smoothing: 0.1,
            ..Default::default()
        };
        let z = |c: usize, r: usize| {
            2.0 * (f64::from(policy[c]) / f64::from(counts[c]) - f64::from(policy[r]) / f64::from(counts[r])) - 0.3
        };
        let one = |z: f64| -0.9 * log_sigmoid(z) - 0.1 * log_sigmoid(-z);
        let expected = (one(z(0, 2)) + one(z(1, 3))) / 2.0;
        let (loss, _) = loss_of(simpo, &policy, &reference, &counts);
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");

        let rpo = DpoSettings { rpo_alpha: Some(2.0), ..sigmoid };
        let (with_nll, _) = loss_of(rpo, &policy, &reference, &counts);
        let (without, _) = loss_of(sigmoid, &policy, &reference, &counts);
        // 10 chosen tokens in the step (the test passes 10): NLL = 13/10.
        assert!((with_nll - without - 2.0 * 13.0 / 10.0).abs() < 1e-5, "{with_nll} vs {without}");
    }

    #[test]
    fn settings_out_of_range_are_named() {
        let bad = |s: DpoSettings| s.validate().unwrap_err();
        assert!(bad(DpoSettings { beta: Some(0.0), ..Default::default() }).contains("beta"));
        assert!(bad(DpoSettings { label_smoothing: 0.5, ..Default::default() }).contains("label_smoothing"));
        assert!(bad(DpoSettings { simpo_gamma: Some(1.0), ..Default::default() }).contains("simpo_gamma"));
        let ipo = DpoSettings { loss: PreferenceLoss::Ipo, label_smoothing: 0.1, ..Default::default() };
        assert!(bad(ipo).contains("ipo"));
        assert!(DpoSettings { loss: PreferenceLoss::Simpo, simpo_gamma: Some(1.0), ..Default::default() }
            .validate()
            .is_ok());
    }
}
