//! Command line: `serve` (default) and `check-config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use smart_fhir_proxy::authz::CompartmentIndex;
use smart_fhir_proxy::cursor::{self, CursorKey};
use smart_fhir_proxy::server::{self, Limits};
use smart_fhir_proxy::stack::{self, Shared};
use smart_fhir_proxy::tenant::TenantRegistry;
use smart_fhir_proxy::{config, discovery};

/// Exit code for invalid configuration (EX_CONFIG-like, sysexits' EX_USAGE = 64).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(version, about = "SMART-on-FHIR authorization reverse proxy")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Serve(ServeArgs),
    /// Validate a tenants file and explain it, without starting.
    CheckConfig {
        #[arg(long, env = "SFP_TENANTS", default_value = "tenants.json")]
        tenants: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Path of tenants.json. Environment overrides: SFP__TENANTS__<id>__<key>=...
    #[arg(long, env = "SFP_TENANTS", default_value = "tenants.json")]
    tenants: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "SFP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "SFP_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// How often tenants.json is checked for changes, in seconds (SIGHUP reloads at once).
    #[arg(long, env = "SFP_RELOAD_POLL_SECONDS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    reload_poll_seconds: u64,
    /// Log format.
    #[arg(long, env = "SFP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Name of the environment variable holding the paging-cursor key (base64, at least
    /// 32 bytes). Unset: a random key per process, so cursors do not survive a restart
    /// and are not accepted by other instances.
    #[arg(long, env = "SFP_CURSOR_KEY_ENV", default_value = "SFP_CURSOR_KEY")]
    cursor_key_env: String,
    /// Lifetime of paging cursors, in seconds.
    #[arg(long, env = "SFP_CURSOR_TTL_SECONDS", default_value_t = cursor::DEFAULT_TTL_SECONDS)]
    cursor_ttl_seconds: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { tenants }) => check_config(&tenants),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(tenants) => {
            println!("{}: {} tenant(s), valid", path.display(), tenants.len());
            for t in &tenants {
                println!("- {} at {}", t.id, t.public_base);
                println!("    upstream     {}", t.upstream.base);
                println!("    issuers      {}", t.token.issuers.join(", "));
                println!("    audience     {}", t.token.audience);
                println!("    jwks         {}", t.token.jwks_uri);
                let algs: Vec<String> = t
                    .token
                    .algorithms
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect();
                println!("    algorithms   {}", algs.join(", "));
                println!("    authz        {:?}", t.authorization);
                let doc = discovery::smart_configuration(t);
                println!(
                    "    capabilities {}",
                    doc.get("capabilities")
                        .map(|c| c.to_string())
                        .unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    // The same instance config validation uses: built once per process.
    let compartments = match CompartmentIndex::official_shared() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "compartment definitions are broken");
            return ExitCode::FAILURE;
        }
    };
    let registry = match TenantRegistry::from_file(&args.tenants, compartments) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            tracing::error!(error = %e, "invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cursors = match cursor_key(&args) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            tracing::error!(error = %e, "invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shared = match Shared::new() {
            Ok(s) => Shared { cursors, ..s },
            Err(e) => {
                tracing::error!(error = %e, "start-up failed");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = %args.listen, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        registry.watch(Duration::from_secs(args.reload_poll_seconds.max(1)));
        tracing::info!(listen = %local, tenants = ?registry.ids(), "smart-fhir-proxy listening");
        let app = stack::build(Arc::clone(&registry), shared);
        let limits = Limits {
            max_body_bytes: args.max_body_bytes,
            ..Limits::default()
        };
        server::serve(
            listener,
            app,
            limits,
            shutdown_signal(),
            Duration::from_secs(10),
        )
        .await;
        ExitCode::SUCCESS
    })
}

/// The paging-cursor key from the environment variable `--cursor-key-env` names, or a
/// random one when it is unset.
fn cursor_key(args: &ServeArgs) -> Result<CursorKey, String> {
    let name = &args.cursor_key_env;
    let ttl = args.cursor_ttl_seconds;
    match std::env::var(name) {
        Ok(text) => CursorKey::from_base64(&text, ttl).map_err(|e| format!("`{name}`: {e}")),
        Err(std::env::VarError::NotPresent) => {
            tracing::warn!(
                cursor.key_env = %name,
                "no paging-cursor key configured; using a random one (cursors do not survive a restart and are not accepted by other instances)"
            );
            CursorKey::generate(ttl)
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("`{name}`: the cursor key is not valid base64"))
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
