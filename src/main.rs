//! Command line: `serve` (default), `check-config` and `seed-openfga` (admin tool).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use smart_fhir_proxy::audit;
use smart_fhir_proxy::cursor::{self, CursorKey};
use smart_fhir_proxy::fhir::CompartmentIndex;
use smart_fhir_proxy::limits::{self, RateLimiter, RateSettings};
use smart_fhir_proxy::registry::TenantRegistry;
use smart_fhir_proxy::seed::{self, SeedConfig, StoreChoice};
use smart_fhir_proxy::server::{self, Limits};
use smart_fhir_proxy::stack::{self, Shared};
use smart_fhir_proxy::{admin, config, discovery, trace};

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

// Parsed once at start-up: the size of the serve variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Serve(Box<ServeArgs>),
    /// Validate a tenants file and explain it, without starting.
    CheckConfig {
        #[arg(long, env = "SFP_TENANTS", default_value = "tenants.json")]
        tenants: PathBuf,
    },
    /// Admin tool: prepare an OpenFGA store to try the OpenFGA mode. Writes the model, a
    /// sample hospital with wards and care teams, assigns every upstream Patient to a
    /// ward and adds a sample user who may view ward 1's patients. Prints the store and
    /// the tenant's `authorization` block as JSON.
    SeedOpenfga(Box<SeedArgs>),
}

#[derive(clap::Args)]
struct SeedArgs {
    /// OpenFGA API URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "OPENFGA_API_URL", value_parser = parse_base_url)]
    api_url: url::Url,
    /// Environment variable holding an OpenFGA pre-shared key (sent as a bearer token).
    #[arg(long, value_name = "VAR")]
    api_token_env: Option<String>,
    /// Seed this existing store instead of creating one.
    #[arg(long)]
    store_id: Option<String>,
    /// Name of the store to create.
    #[arg(long, default_value = "smart-fhir-proxy", conflicts_with = "store_id")]
    store_name: String,
    /// The authorization model, JSON form.
    #[arg(long, default_value = "fga-model/model.json")]
    model: PathBuf,
    /// Base URL of the tenant's upstream FHIR R4 server.
    #[arg(long, value_parser = parse_base_url)]
    fhir_base: url::Url,
    /// Environment variable holding a bearer token for the FHIR server.
    #[arg(long, value_name = "VAR")]
    fhir_bearer_env: Option<String>,
    /// Number of wards (organization:ward-1..N).
    #[arg(long, default_value_t = seed::DEFAULT_WARDS,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    wards: u32,
    /// `_count` of the Patient search pages.
    #[arg(long, default_value_t = seed::DEFAULT_PAGE_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    page_size: u32,
    /// Fail (writing nothing) when the upstream has more patients than this.
    #[arg(long, default_value_t = seed::DEFAULT_MAX_PATIENTS,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_patients: u64,
    /// Id of the sample user made a member of ward 1's care team (user:<id>).
    #[arg(long, default_value = "alice", value_parser = parse_fga_id)]
    sample_user: String,
    /// Bound on every HTTP call, in milliseconds.
    #[arg(long, default_value_t = seed::DEFAULT_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    timeout_ms: u64,
}

fn parse_base_url(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s).map_err(|e| format!("`{s}` is not a url: {e}"))?;
    seed::check_base_url("the url", &url)?;
    Ok(url)
}

fn parse_fga_id(s: &str) -> Result<String, String> {
    seed::check_fga_id(s).map(|()| s.to_owned())
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Path of tenants.json. Environment overrides: SFP__TENANTS__<id>__<key>=...
    #[arg(long, env = "SFP_TENANTS", default_value = "tenants.json")]
    tenants: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "SFP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Most entries of a batch or transaction Bundle (more: 413).
    #[arg(long, env = "SFP_MAX_BUNDLE_ENTRIES", default_value_t = smart_fhir_proxy::stack::bundle::DEFAULT_MAX_ENTRIES as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_bundle_entries: u64,
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
    /// Audit records waiting for the writer thread, at most.
    #[arg(long, env = "SFP_AUDIT_QUEUE", default_value_t = 16_384,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    audit_queue: u64,
    /// When the audit queue is full: `fail-closed` answers 503 (nothing is released
    /// unrecorded), `drop` answers and counts the lost record.
    #[arg(long, env = "SFP_AUDIT_OVERFLOW", value_enum, default_value_t = AuditOverflow::FailClosed)]
    audit_overflow: AuditOverflow,
    /// Address of the admin listener (/metrics, /healthz, /readyz). Off when unset.
    #[arg(long, env = "SFP_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// OTLP/HTTP endpoint to export spans to (JSON, to {URL}/v1/traces), e.g.
    /// http://collector:4318. Off when unset.
    #[arg(long, env = "SFP_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint)]
    otlp_endpoint: Option<url::Url>,
    /// The `service.name` of exported spans.
    #[arg(
        long,
        env = "SFP_OTLP_SERVICE_NAME",
        default_value = "smart-fhir-proxy"
    )]
    otlp_service_name: String,
    /// PEM certificate chain of the HTTPS listener (with `--tls-key`: `--listen` then
    /// speaks HTTPS only). Re-read when it changes and on SIGHUP.
    #[arg(long, env = "SFP_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SFP_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    audit_fhir: AuditFhirArgs,
}

/// Request limits (README, *Limits*).
#[derive(clap::Args, Clone)]
struct LimitArgs {
    /// Largest request head in bytes (HTTP/1 request line and headers, HTTP/2 header
    /// list); larger heads are refused with 431.
    #[arg(long, env = "SFP_MAX_HEADER_BYTES",
          default_value_t = server::DEFAULT_MAX_HEADER_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(server::MIN_HEADER_BYTES as u64..=16 * 1024 * 1024))]
    max_header_bytes: u64,
    /// Most header lines in a request; more are refused with 431.
    #[arg(long, env = "SFP_MAX_HEADERS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_headers: u64,
    /// Requests handled at once; beyond, a request is answered 503 with `Retry-After: 1`
    /// at once, not queued.
    #[arg(long, env = "SFP_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_concurrent_requests: u64,
    /// Per-client rate limit: `N` or `N/s`, `N/min`, `N/h` (off when unset). The client
    /// is the token's client id when the token verifies, else its address. Over it: 429.
    #[arg(long, env = "SFP_RATE_LIMIT_PER_CLIENT", value_name = "RATE",
          value_parser = limits::parse_rate)]
    rate_limit_per_client: Option<f64>,
    /// The bucket's size: requests a client may send in a burst before the rate holds
    /// it back (default: one second's worth of the rate, at least 1).
    #[arg(long, env = "SFP_RATE_BURST", requires = "rate_limit_per_client",
          value_parser = clap::value_parser!(u32).range(1..))]
    rate_burst: Option<u32>,
    /// Proxies (load balancers) in front of this one whose `X-Forwarded-For` entries
    /// are believed; 0: the peer's address is the client's.
    #[arg(long, env = "SFP_TRUST_FORWARDED_FOR", value_name = "HOPS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=16))]
    trust_forwarded_for: u64,
    /// On SIGTERM or SIGINT: seconds requests in flight may take to finish before the
    /// remaining connections are closed.
    #[arg(long, env = "SFP_SHUTDOWN_GRACE_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    shutdown_grace_seconds: u64,
}

impl LimitArgs {
    fn server_limits(&self, max_body_bytes: usize) -> Limits {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Limits {
            max_body_bytes,
            max_header_bytes: size(self.max_header_bytes),
            max_headers: size(self.max_headers),
            max_concurrent_requests: size(self.max_concurrent_requests),
            trust_forwarded_for: size(self.trust_forwarded_for),
            ..Limits::default()
        }
    }

    fn rate_limiter(&self) -> Option<Arc<RateLimiter>> {
        let per_second = self.rate_limit_per_client?;
        let burst = self
            .rate_burst
            .unwrap_or_else(|| RateSettings::default_burst(per_second));
        Some(Arc::new(RateLimiter::new(RateSettings {
            per_second,
            burst,
        })))
    }
}

fn parse_otlp_endpoint(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s).map_err(|e| format!("`{s}` is not a url: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
        return Err(format!("`{s}` is not an http(s) url without a query"));
    }
    Ok(url)
}

/// Audit records as FHIR AuditEvents, written to an audit repository.
#[derive(clap::Args, Clone)]
struct AuditFhirArgs {
    /// FHIR R4 base URL of the audit repository; every audit record is also written there
    /// as an AuditEvent (batch Bundles POSTed to the base). Unset: no AuditEvents.
    #[arg(long, env = "SFP_AUDIT_FHIR_ENDPOINT", value_name = "URL")]
    audit_fhir_endpoint: Option<String>,
    /// Environment variable holding a bearer token for the audit repository.
    #[arg(long, env = "SFP_AUDIT_FHIR_TOKEN_ENV", value_name = "VAR")]
    audit_fhir_token_env: Option<String>,
    /// Environment variable holding `user:password` (basic auth) for the audit repository.
    #[arg(
        long,
        env = "SFP_AUDIT_FHIR_BASIC_AUTH_ENV",
        value_name = "VAR",
        conflicts_with = "audit_fhir_token_env"
    )]
    audit_fhir_basic_auth_env: Option<String>,
    /// Most AuditEvents per Bundle.
    #[arg(long, env = "SFP_AUDIT_FHIR_BATCH", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    audit_fhir_batch: u64,
    /// AuditEvents waiting for the writer, at most.
    #[arg(long, env = "SFP_AUDIT_FHIR_QUEUE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    audit_fhir_queue: u64,
    /// When the AuditEvent queue is full: `fail-closed` answers 503, `drop` answers and
    /// counts the lost event.
    #[arg(long, env = "SFP_AUDIT_FHIR_OVERFLOW", value_enum, default_value_t = AuditOverflow::FailClosed)]
    audit_fhir_overflow: AuditOverflow,
    /// How long a batch may wait to fill before it is sent, in milliseconds.
    #[arg(long, env = "SFP_AUDIT_FHIR_FLUSH_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    audit_fhir_flush_ms: u64,
    /// Bound on one POST to the audit repository, in milliseconds.
    #[arg(long, env = "SFP_AUDIT_FHIR_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    audit_fhir_timeout_ms: u64,
    /// Retries of a batch after a connection error, a timeout, 408, 429 or 5xx.
    #[arg(long, env = "SFP_AUDIT_FHIR_RETRIES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=20))]
    audit_fhir_retries: u32,
    /// Name of this proxy instance in the AuditEvents (source observer, server agent).
    #[arg(
        long,
        env = "SFP_AUDIT_FHIR_SOURCE",
        default_value = "smart-fhir-proxy"
    )]
    audit_fhir_source: String,
}

/// The AuditEvent writer's configuration, when an endpoint is set.
fn audit_fhir_config(args: &AuditFhirArgs) -> Result<Option<audit::fhir::FhirAuditConfig>, String> {
    let Some(endpoint) = &args.audit_fhir_endpoint else {
        return Ok(None);
    };
    let endpoint = url::Url::parse(endpoint)
        .map_err(|e| format!("`--audit-fhir-endpoint`: `{endpoint}` is not a url: {e}"))?;
    audit::fhir::check_endpoint(&endpoint).map_err(|e| format!("`--audit-fhir-endpoint`: {e}"))?;
    let auth = audit::fhir::FhirAuth::from_env(
        args.audit_fhir_token_env.as_deref(),
        args.audit_fhir_basic_auth_env.as_deref(),
    )
    .map_err(|e| format!("audit repository credential: {e}"))?;
    if args.audit_fhir_source.trim().is_empty() {
        return Err("`--audit-fhir-source` must not be empty".to_owned());
    }
    Ok(Some(audit::fhir::FhirAuditConfig {
        endpoint,
        auth,
        batch: usize::try_from(args.audit_fhir_batch).unwrap_or(1000),
        queue: usize::try_from(args.audit_fhir_queue).unwrap_or(usize::MAX),
        overflow: match args.audit_fhir_overflow {
            AuditOverflow::FailClosed => audit::Overflow::FailClosed,
            AuditOverflow::Drop => audit::Overflow::Drop,
        },
        flush: Duration::from_millis(args.audit_fhir_flush_ms),
        timeout: Duration::from_millis(args.audit_fhir_timeout_ms),
        retries: args.audit_fhir_retries,
        observer: args.audit_fhir_source.clone(),
    }))
}

#[derive(Clone, Copy, ValueEnum)]
enum AuditOverflow {
    FailClosed,
    Drop,
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
        Some(Command::Serve(args)) => serve(*args),
        Some(Command::SeedOpenfga(args)) => seed_openfga(*args),
        None => serve(cli.serve),
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(tenants) => {
            println!("{}: {} tenant(s), valid", path.display(), tenants.len());
            for t in &tenants {
                println!("- {} at {}", t.id, t.public_base);
                let compartments = match t.upstream.compartment_search {
                    config::CompartmentSearch::Native => "compartment search (native)",
                    config::CompartmentSearch::ByParameter => "searched by linking parameter",
                };
                println!("    upstream     {} ({compartments})", t.upstream.base);
                if let Some(tls) = &t.upstream.tls {
                    println!("    upstream tls {}", tls.summary());
                }
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
                if let Some(cors) = &t.cors {
                    let origins = match &cors.origins {
                        config::CorsOrigins::Any => "*".to_owned(),
                        config::CorsOrigins::List(l) => l.join(", "),
                    };
                    let credentials = if cors.allow_credentials {
                        ", with credentials"
                    } else {
                        ""
                    };
                    println!("    cors         {origins}{credentials}");
                }
                let m = &t.patient_match;
                println!(
                    "    match        {:?}, input {}, at most {} candidates ({} per search)",
                    m.mode,
                    m.input_level.name(),
                    m.max_candidates,
                    m.search_count
                );
                if let Some(u) = &t.udap {
                    let leaf = u.identity.leaf();
                    println!(
                        "    udap         signs {} with `{}` ({}, {}), valid until {}, chain verifies to {}",
                        t.public_base,
                        leaf.subject,
                        u.identity.alg().name(),
                        u.identity.source().display(),
                        leaf.not_after_text,
                        u.anchors
                            .files()
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    for c in &u.communities {
                        let issuers: Vec<String> = u
                            .issuers
                            .iter()
                            .filter(|i| i.community == c.uri)
                            .map(|i| match &i.keys {
                                config::CommunityKeys::Jwks(j) => {
                                    format!("{} (jwks {j})", i.issuer)
                                }
                                config::CommunityKeys::X5c(_) => format!("{} (x5c)", i.issuer),
                            })
                            .collect();
                        let signer = c.identity.as_ref().map_or_else(
                            || "the tenant's certificate".to_owned(),
                            |id| format!("`{}`", id.leaf().subject),
                        );
                        println!(
                            "    udap community {} signed with {signer}; trusts issuers: {}",
                            c.uri,
                            if issuers.is_empty() {
                                "none".to_owned()
                            } else {
                                issuers.join(", ")
                            }
                        );
                    }
                }
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

fn seed_openfga(args: SeedArgs) -> ExitCode {
    let config = SeedConfig {
        api_url: args.api_url,
        api_token_env: args.api_token_env,
        store: match args.store_id {
            Some(id) => StoreChoice::Reuse(id),
            None => StoreChoice::Create(args.store_name),
        },
        model_path: args.model,
        fhir_base: args.fhir_base,
        fhir_bearer_env: args.fhir_bearer_env,
        wards: args.wards,
        page_size: args.page_size,
        max_patients: args.max_patients,
        sample_user: args.sample_user,
        timeout: Duration::from_millis(args.timeout_ms),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("seed-openfga: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(seed::seed(&config, |line| {
        eprintln!("seed-openfga: {line}");
    }));
    match result.map(|report| serde_json::to_string_pretty(&report)) {
        Ok(Ok(json)) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("seed-openfga: error: cannot print the report: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("seed-openfga: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error, filtered by `RUST_LOG`; with `otlp`, the proxy's spans are
/// also exported (whatever `RUST_LOG` lets through to the logs).
fn init_logging(format: LogFormat, otlp: Option<trace::otlp::OtlpLayer>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        // A request's lines carry its spans once (`spans`: the request span with the
        // trace and request id, and with `RUST_LOG=debug` the stage's span).
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let otlp = otlp.map(|l| l.with_filter(trace::otlp::OtlpLayer::filter()));
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otlp)
        .init();
}

fn serve(args: ServeArgs) -> ExitCode {
    let otlp = match &args.otlp_endpoint {
        Some(endpoint) => {
            let config = trace::otlp::OtlpConfig {
                endpoint: endpoint.clone(),
                service_name: args.otlp_service_name.clone(),
            };
            match trace::otlp::OtlpLayer::start(config) {
                Ok(layer) => Some(layer),
                Err(e) => {
                    eprintln!("cannot start the span exporter: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    init_logging(args.log_format, otlp);
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::info!(otlp.endpoint = %endpoint, "exporting spans over OTLP/HTTP");
    }
    let overflow = match args.audit_overflow {
        AuditOverflow::FailClosed => audit::Overflow::FailClosed,
        AuditOverflow::Drop => audit::Overflow::Drop,
    };
    let format = match args.log_format {
        LogFormat::Json => audit::LineFormat::Json,
        LogFormat::Text => audit::LineFormat::Text,
    };
    let queue = usize::try_from(args.audit_queue).unwrap_or(usize::MAX);
    if let Err(e) = audit::AuditSink::install(queue, overflow, format) {
        tracing::error!(error = %e, "cannot start the audit writer");
        return ExitCode::FAILURE;
    }
    match audit_fhir_config(&args.audit_fhir) {
        Ok(None) => {}
        Ok(Some(config)) => {
            let endpoint = config.endpoint.to_string();
            if let Err(e) = audit::fhir::FhirAuditSink::install(config) {
                tracing::error!(error = %e, "cannot start the audit event writer");
                return ExitCode::FAILURE;
            }
            tracing::info!(audit.fhir.endpoint = %endpoint, "audit events are written to a FHIR endpoint");
        }
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            tracing::error!(error = %e, "invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
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
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match server::tls::ServerTls::load(cert, key) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                eprintln!("invalid configuration: --tls-cert/--tls-key: {e}");
                tracing::error!(error = %e, "invalid tls certificate or key");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        _ => None,
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
        let rate_limit = args.limits.rate_limiter();
        let shared = match Shared::new() {
            Ok(s) => Shared {
                cursors,
                rate_limit,
                max_bundle_entries: usize::try_from(args.max_bundle_entries)
                    .unwrap_or(usize::MAX),
                ..s
            },
            Err(e) => {
                tracing::error!(error = %e, "start-up failed");
                return ExitCode::FAILURE;
            }
        };
        // The admin listener first: once the proxy answers, so does it.
        let admin = match &args.admin_listen {
            Some(addr) => match start_admin(*addr, &registry, &shared).await {
                Ok(admin) => Some(admin),
                Err(e) => {
                    tracing::error!(admin.listen = %addr, error = %e, "cannot start the admin listener");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
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
        if let Some(tls) = &tls {
            tls.watch(Duration::from_secs(args.reload_poll_seconds.max(1)));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(listen = %local, scheme, tenants = ?registry.ids(), "smart-fhir-proxy listening");
        let app = stack::build(Arc::clone(&registry), shared);
        let limits = args.limits.server_limits(args.max_body_bytes);
        let drain = Duration::from_secs(args.limits.shutdown_grace_seconds);
        let shutdown = async {
            shutdown_signal().await;
            // Orchestrators stop sending before the connections drain.
            if let Some(admin) = &admin {
                admin.set_draining();
            }
        };
        match &tls {
            Some(tls) => server::serve_tls(listener, tls, app, limits, shutdown, drain).await,
            None => server::serve(listener, app, limits, shutdown, drain).await,
        }
        // Records still queued are written before the process ends.
        audit::drain(Duration::from_secs(5));
        trace::otlp::flush(Duration::from_secs(5));
        ExitCode::SUCCESS
    })
}

/// Binds the admin listener and serves it in the background (until the process ends).
async fn start_admin(
    addr: SocketAddr,
    registry: &Arc<TenantRegistry>,
    shared: &Shared,
) -> Result<Arc<admin::Admin>, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let admin = admin::Admin::new(Arc::clone(registry), shared.upstream.clone())?;
    tokio::spawn(admin::serve(listener, Arc::clone(&admin)));
    tracing::info!(admin.listen = %local, "admin listener (/metrics, /healthz, /readyz)");
    Ok(admin)
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
