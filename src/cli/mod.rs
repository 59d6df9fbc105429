//! Runs a parsed command line: `serve`, `migrate`, `keys`, `train` and `merge`.

mod train;

use std::time::Duration;

use anyhow::Context;

use crate::config::{BenchCommand, Cli, Command, GlobalArgs, KeysCommand, ServeArgs};
use crate::db::{NewApiKey, SqlStore, Store};
use crate::device::DeviceSpec;
use crate::domain::api_key::generate_key;
use crate::executor::{ExecutorContext, ExecutorPool, ExecutorSettings};
use crate::startup::{shutdown_signal, Application, Settings};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::telemetry::init(cli.global.log_format, &cli.global.log)?;
    // Training runs on its own thread and needs no async runtime.
    match &cli.command {
        Command::Train { config, device } => return train::train(config, device.as_deref()),
        Command::Merge { base, adapter, output } => return train::merge(base, adapter, output),
        Command::Bench(BenchCommand::Train(args)) => return crate::bench::train::run(args),
        Command::Bench(BenchCommand::Generate(args)) => return crate::bench::generate::run(args),
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(&cli.global, &args).await,
            Command::Migrate => {
                open_store(&cli.global).await?;
                println!("database is up to date");
                Ok(())
            }
            Command::Keys(command) => keys(&cli.global, command).await,
            Command::Worker { executors, devices } => worker(&cli.global, executors, devices.as_deref()).await,
            Command::Train { .. } | Command::Merge { .. } | Command::Bench(_) => unreachable!("handled above"),
        }
    })
}

fn serve_settings(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<Settings> {
    Ok(Settings {
        bind: args.bind,
        database_url: global.database_url(),
        database_max_connections: global.database_max_connections,
        storage: global.storage_settings()?,
        dataset_limits: args.dataset_limits(),
        max_upload_bytes: args.max_upload_size,
        max_json_body_bytes: usize::try_from(args.max_json_body).context("--max-json-body is too large")?,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        catalog: std::sync::Arc::new(global.catalog()?),
        executor: executor_settings(global, args.executors, args.devices.as_deref())?,
        inference: args.inference_settings(&global.data_dir),
    })
}

/// Executors on `--devices` (each opened now, so that an unusable GPU stops the start with its
/// reason) or `--executors` on the CPU.
fn executor_settings(global: &GlobalArgs, executors: usize, devices: Option<&str>) -> anyhow::Result<ExecutorSettings> {
    let devices = match devices {
        Some(list) => DeviceSpec::parse_list(list)?,
        None => Vec::new(),
    };
    for device in &devices {
        device.open().with_context(|| format!("--devices names {device}"))?;
    }
    Ok(ExecutorSettings {
        executors,
        devices,
        lease: Duration::from_secs(global.lease_secs.max(1)),
        poll_interval: Duration::from_millis(global.poll_interval_ms.max(10)),
        work_dir: global.data_dir.join("work"),
    })
}

/// `ferrotune worker`: executors only, until SIGTERM/SIGINT (then running jobs checkpoint and
/// return to the queue).
async fn worker(global: &GlobalArgs, executors: usize, devices: Option<&str>) -> anyhow::Result<()> {
    let settings = executor_settings(global, executors, devices)?;
    anyhow::ensure!(!settings.executor_devices().is_empty(), "--executors must be at least 1");
    let store = open_store(global).await?;
    let storage = crate::storage::open(&global.storage_settings()?).await.context("could not open artifact storage")?;
    let context = ExecutorContext {
        store: std::sync::Arc::new(store),
        storage,
        catalog: std::sync::Arc::new(global.catalog()?),
        settings,
        // No API in this process: requests arrive through the database (`CONTROL_POLL`).
        signals: Default::default(),
    };
    let devices = context.settings.executor_devices();
    let pool = ExecutorPool::start(context);
    tracing::info!(executors = ?devices, "worker running");
    shutdown_signal().await;
    tracing::info!("stopping: running jobs checkpoint and return to the queue");
    pool.shutdown().await;
    Ok(())
}

async fn serve(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<()> {
    let settings = serve_settings(global, args)?;
    let app = Application::build(settings).await?;
    app.run_until_stopped(shutdown_signal()).await
}

async fn open_store(global: &GlobalArgs) -> anyhow::Result<SqlStore> {
    let store = SqlStore::connect(&global.database_url(), global.database_max_connections)
        .await
        .context("could not open the database")?;
    store.migrate().await.context("could not migrate the database")?;
    Ok(store)
}

async fn keys(global: &GlobalArgs, command: KeysCommand) -> anyhow::Result<()> {
    use crate::db::KeyStore;
    let store = open_store(global).await?;
    match command {
        KeysCommand::Create { project, name } => {
            anyhow::ensure!(!project.trim().is_empty(), "--project must not be empty");
            let key = generate_key();
            let record = store
                .create_api_key(NewApiKey {
                    project_name: project.trim(),
                    name: &name,
                    key_hash: &key.hash,
                    display_prefix: &key.display_prefix,
                })
                .await?;
            eprintln!(
                "created key {} for project {} ({}). Store it now; it cannot be shown again:",
                record.id, record.project_name, record.project_id
            );
            println!("{}", key.secret);
        }
        KeysCommand::List => {
            println!("{:<28} {:<20} {:<16} {:<12} {:<12} STATUS", "ID", "PROJECT", "NAME", "PREFIX", "CREATED");
            for key in store.list_api_keys().await? {
                let status = match key.revoked_at {
                    Some(at) => format!("revoked at {at}"),
                    None => match key.last_used_at {
                        Some(at) => format!("active, last used at {at}"),
                        None => "active, never used".to_string(),
                    },
                };
                println!(
                    "{:<28} {:<20} {:<16} {:<12} {:<12} {status}",
                    key.id,
                    key.project_name,
                    key.name,
                    format!("{}…", key.display_prefix),
                    key.created_at
                );
            }
        }
        KeysCommand::Revoke { id } => {
            anyhow::ensure!(store.revoke_api_key(&id).await?, "no active key with id {id}");
            println!("revoked {id}");
        }
    }
    Ok(())
}
