//! `ferrotune train` and `ferrotune merge`: the training core from the command line, no server.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::train::{spawn_training, Observer, Progress, StopReason, TrainConfig};

/// Shows a progress bar with loss, learning rate and ETA, and prints evaluations.
struct ProgressBarObserver {
    bar: ProgressBar,
}

impl Observer for ProgressBarObserver {
    fn progress(&mut self, p: &Progress) {
        self.bar.set_length(p.total_steps);
        self.bar.set_position(p.step);
        self.bar.set_message(format!(
            "epoch {:.2} loss {:.4} lr {:.2e} {:.0} tok/s ETA {}",
            p.epoch,
            p.loss,
            p.learning_rate,
            p.tokens_per_second,
            format_duration(p.eta_seconds)
        ));
        if let Some(pairs) = &p.preference {
            self.bar.set_message(format!(
                "epoch {:.2} loss {:.4} reward accuracy {:.2} margin {:.3} lr {:.2e} ETA {}",
                p.epoch,
                p.loss,
                pairs.rewards_accuracies,
                pairs.rewards_margins,
                p.learning_rate,
                format_duration(p.eta_seconds)
            ));
        }
        if let Some(m) = &p.eval {
            let pairs = m.preference.map(|pairs| {
                format!(", reward accuracy {:.3}, margin {:.3}", pairs.rewards_accuracies, pairs.rewards_margins)
            });
            let task = m.task.map(|t| format!(", {}", task_summary(&t)));
            self.bar.println(format!(
                "step {}: validation loss {:.4}, token accuracy {:.3}, perplexity {:.2}{}",
                p.step,
                m.loss,
                m.mean_token_accuracy,
                m.perplexity,
                pairs.or(task).unwrap_or_default()
            ));
        }
    }

    fn checkpointed(&mut self, step: u64, dir: &Path) {
        self.bar.println(format!("step {step}: checkpoint {}", dir.display()));
    }
}

/// An encoder task's validation metrics as `name value` pairs.
fn task_summary(task: &crate::train::encoder::metrics::TaskMetrics) -> String {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(task) else { return String::new() };
    fields
        .iter()
        .filter_map(|(name, value)| Some(format!("{name} {:.4}", value.as_f64()?)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

pub fn train(config_path: &Path, device: Option<&str>) -> anyhow::Result<()> {
    let mut config = TrainConfig::from_file(config_path).map_err(anyhow::Error::msg)?;
    if let Some(device) = device {
        config.device = device.parse()?;
    }
    // Fail before anything loads when the device cannot be used.
    config.device.open()?;
    // A GGUF base trains through its directory form (config, tokenizer, a link to the weights),
    // which lives as long as the run.
    let _gguf_dir = if config.model.extension().is_some_and(|e| e == "gguf") {
        let dir = tempfile::tempdir()?;
        crate::models::gguf::materialize(&config.model, dir.path())?;
        config.model = dir.path().to_path_buf();
        Some(dir)
    } else {
        None
    };
    let bar = ProgressBar::new(1);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(500));
    let handle = spawn_training(config.clone(), ProgressBarObserver { bar: bar.clone() })?;
    let summary = handle.join().map_err(|_| anyhow::anyhow!("the training thread panicked"))??;
    bar.finish_and_clear();
    println!("steps:            {} of {}", summary.steps, summary.total_steps);
    println!("tokens processed: {}", summary.processed_tokens);
    println!("tokens trained on: {}", summary.trained_tokens);
    println!(
        "examples:         {} ({} truncated, {} dropped with nothing to learn)",
        summary.examples, summary.truncated, summary.dropped
    );
    if let Some(loss) = summary.final_train_loss {
        println!("final train loss: {loss:.4}");
    }
    if let Some(eval) = summary.final_eval {
        println!("final valid loss: {:.4} (token accuracy {:.3})", eval.loss, eval.mean_token_accuracy);
        if let Some(task) = eval.task {
            println!("final valid metrics: {}", task_summary(&task));
        }
    }
    if let Some(best) = summary.best_eval_loss {
        println!("best valid loss:  {best:.4}");
    }
    if summary.stop == StopReason::EarlyStopped {
        println!("stopped early: the validation loss stopped improving; the output holds the best weights");
    }
    if let Some(output) = &summary.output {
        println!("output:           {}", output.display());
    }
    Ok(())
}

/// Folds a LoRA adapter into its base model and writes a full model directory.
pub fn merge(base: &Path, adapter: &Path, output: &Path) -> anyhow::Result<()> {
    crate::train::output::merge_adapter_dir(base, adapter, output)?;
    println!("merged model written to {}", output.display());
    Ok(())
}
