//! Command line and environment: one typed struct per command, whose `///` docs are the `--help`.
//!
//! Every setting has a flag and a `FERROTUNE_*` environment variable. Values are turned into the
//! plain settings structs of `startup`, `db` and `storage`; nothing here opens a connection.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::domain::dataset::Limits;
use crate::storage::StorageSettings;

#[derive(Debug, Parser)]
#[command(name = "ferrotune", version, about = "Self-hosted fine-tuning service with an OpenAI-compatible API")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API (and, by default, one training executor).
    Serve(ServeArgs),
    /// Run training executors only, against the same database and storage as `serve`.
    Worker {
        /// Executors in this process, on the CPU (see `--devices` for GPUs).
        #[arg(long, env = "FERROTUNE_EXECUTORS", default_value_t = 1)]
        executors: usize,
        /// One executor per device instead: GPU numbers (`0,1`), `cuda:N` or `cpu`; each job
        /// trains on its executor's device.
        #[arg(long, env = "FERROTUNE_DEVICES")]
        devices: Option<String>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Fine-tune a model locally, without a server, from a YAML or JSON config file.
    Train {
        /// The run's configuration (see the README for the fields).
        #[arg(long)]
        config: PathBuf,
        /// Where to train (`cpu`, `cuda`, `cuda:N`); overrides the config's `device`.
        #[arg(long)]
        device: Option<String>,
    },
    /// Benchmarks that print one JSON line (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fold a LoRA adapter into its base model and write a full model directory.
    Merge {
        /// The base model directory (Hugging Face layout).
        #[arg(long)]
        base: PathBuf,
        /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model.
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Timed training steps on synthetic batches.
    Train(crate::bench::train::BenchTrainArgs),
    /// Timed greedy decoding (batch 1, KV cache) from a synthetic prompt.
    Generate(crate::bench::generate::BenchGenerateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Directory for the embedded defaults: the SQLite database and local artifacts.
    #[arg(long, env = "FERROTUNE_DATA_DIR", default_value = "./ferrotune-data", global = true)]
    pub data_dir: PathBuf,
    /// Database URL: `sqlite://PATH` or `postgres://USER@HOST/DB`. Default: SQLite at `<data-dir>/ferrotune.db`.
    #[arg(long, env = "FERROTUNE_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Maximum number of pooled database connections.
    #[arg(long, env = "FERROTUNE_DATABASE_MAX_CONNECTIONS", default_value_t = 16, global = true)]
    pub database_max_connections: u32,
    /// Artifact storage: a directory (`file:///PATH` or a plain path) or `s3://BUCKET/PREFIX`.
    /// Default: `<data-dir>/artifacts`.
    #[arg(long, env = "FERROTUNE_STORAGE_URL", global = true)]
    pub storage_url: Option<String>,
    /// S3 endpoint for S3-compatible servers (MinIO, SeaweedFS, R2...). Credentials come from the
    /// standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles).
    #[arg(long, env = "FERROTUNE_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: from the AWS chain, else us-east-1).
    #[arg(long, env = "FERROTUNE_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Address buckets by path (`endpoint/bucket/key`), as most self-hosted S3 servers need.
    #[arg(long, env = "FERROTUNE_S3_FORCE_PATH_STYLE", global = true)]
    pub s3_force_path_style: bool,
    /// A YAML file listing base models: `models: [{name, path | gguf | storage | hub}]`.
    #[arg(long, env = "FERROTUNE_MODELS_FILE", global = true)]
    pub models_file: Option<PathBuf>,
    /// A base model as NAME=PATH (a Hugging Face directory or a .gguf file); repeatable.
    #[arg(long = "base-model", env = "FERROTUNE_BASE_MODELS", value_delimiter = ',', global = true)]
    pub base_models: Vec<String>,
    /// Seconds an executor's claim on a job lasts without a heartbeat; a job whose executor died
    /// goes back to the queue after this long.
    #[arg(long, env = "FERROTUNE_LEASE_SECS", default_value_t = 30, global = true)]
    pub lease_secs: u64,
    /// How often idle executors look for work, in milliseconds.
    #[arg(long, env = "FERROTUNE_POLL_INTERVAL_MS", default_value_t = 1000, global = true)]
    pub poll_interval_ms: u64,
    /// Log format.
    #[arg(long, env = "FERROTUNE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax, e.g. `info` or `ferrotune=debug,tower_http=info`.
    #[arg(long, env = "FERROTUNE_LOG", default_value = "info", global = true)]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on. Without API keys the server only accepts a loopback address.
    #[arg(long, env = "FERROTUNE_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// Largest accepted file upload (bytes; suffixes K, M, G, KiB, MiB, GiB allowed).
    #[arg(long, env = "FERROTUNE_MAX_UPLOAD_SIZE", default_value = "8GiB", value_parser = parse_byte_size)]
    pub max_upload_size: u64,
    /// Longest accepted line in a fine-tuning dataset (bytes; suffixes allowed).
    #[arg(long, env = "FERROTUNE_MAX_LINE_SIZE", default_value = "16MiB", value_parser = parse_byte_size)]
    pub max_line_size: u64,
    /// Fewest examples a fine-tuning dataset may hold.
    #[arg(long, env = "FERROTUNE_MIN_EXAMPLES", default_value_t = 10)]
    pub min_examples: u64,
    /// Largest accepted JSON request body (bytes; suffixes allowed).
    #[arg(long, env = "FERROTUNE_MAX_JSON_BODY", default_value = "2MiB", value_parser = parse_byte_size)]
    pub max_json_body: u64,
    /// Seconds that in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "FERROTUNE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Training executors in this process, on the CPU (0: API only; run `ferrotune worker`
    /// elsewhere).
    #[arg(long, env = "FERROTUNE_EXECUTORS", default_value_t = 1)]
    pub executors: usize,
    /// One training executor per device instead of `--executors`: GPU numbers (`0,1`),
    /// `cuda:N` or `cpu`.
    #[arg(long, env = "FERROTUNE_DEVICES")]
    pub devices: Option<String>,
    /// Inference: sequences one model decodes together at most (also the largest `n`).
    #[arg(long, env = "FERROTUNE_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// Inference: requests waiting per model before new ones get 429.
    #[arg(long, env = "FERROTUNE_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Inference: memory for loaded LoRA adapters (bytes; suffixes allowed); least recently used go first.
    #[arg(long, env = "FERROTUNE_ADAPTER_CACHE", default_value = "1GiB", value_parser = parse_byte_size)]
    pub adapter_cache: u64,
    /// Inference: models (bases and fully fine-tuned models) kept loaded at once.
    #[arg(long, env = "FERROTUNE_MAX_LOADED_MODELS", default_value_t = 2)]
    pub max_loaded_models: usize,
    /// Inference: where models are served (`cpu`, `cuda`, `cuda:N`).
    #[arg(long, env = "FERROTUNE_SERVE_DEVICE", default_value = "cpu")]
    pub serve_device: crate::device::DeviceSpec,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once; it cannot be shown again.
    Create {
        /// Project the key belongs to (created if new).
        #[arg(long, default_value = "default")]
        project: String,
        /// A label for the key.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (never the secret itself).
    List,
    /// Revoke a key by its id (`key-...`).
    Revoke { id: String },
}

impl GlobalArgs {
    /// The database URL, defaulting to SQLite in the data directory.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("ferrotune.db").display()))
    }

    /// The base-model catalog from `--models-file` and `--base-model`.
    pub fn catalog(&self) -> anyhow::Result<crate::catalog::Catalog> {
        let mut catalog = match &self.models_file {
            Some(path) => crate::catalog::Catalog::from_file(path)?,
            None => crate::catalog::Catalog::default(),
        };
        for flag in &self.base_models {
            catalog.add_flag(flag)?;
        }
        Ok(catalog)
    }

    /// The artifact storage settings, defaulting to a directory in the data directory.
    pub fn storage_settings(&self) -> anyhow::Result<StorageSettings> {
        let url = self.storage_url.clone().unwrap_or_else(|| self.data_dir.join("artifacts").display().to_string());
        StorageSettings::parse(&url, self.s3_endpoint.clone(), self.s3_region.clone(), self.s3_force_path_style)
    }
}

impl ServeArgs {
    pub fn dataset_limits(&self) -> Limits {
        Limits { max_line_bytes: self.max_line_size as usize, min_examples: self.min_examples }
    }

    pub fn inference_settings(&self, data_dir: &std::path::Path) -> crate::serving::InferenceSettings {
        crate::serving::InferenceSettings {
            engine: crate::infer::engine::EngineSettings { max_batch: self.max_batch, max_queue: self.max_queue },
            adapter_cache_bytes: usize::try_from(self.adapter_cache).unwrap_or(usize::MAX),
            max_models: self.max_loaded_models,
            work_dir: data_dir.join("work").join("serving"),
            device: self.serve_device,
        }
    }
}

/// Parses `1024`, `512K`, `8MiB`, `2G`... (K/M/G are powers of 1000, KiB/MiB/GiB of 1024).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("`{text}` is not a size"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use K, M, G, KiB, MiB or GiB)")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_byte_size("1024"), Ok(1024));
        assert_eq!(parse_byte_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_byte_size("2G"), Ok(2_000_000_000));
        assert!(parse_byte_size("12 parsecs").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
