//! The command line: `serve`, `migrate`, `keys`, `clients`, `installations`, `credentials`, `providers`,
//! `identity`, `healthcheck`, `sandbox`.
//! Exit codes: 0 ok, 2 usage error (clap), 1 any other failure with a one-line message naming the cause.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::crypto::generate_key;
use crate::domain::TextField;
use crate::settings::{Settings, Source};
use crate::startup::Application;
use crate::store::{self, api_client, installation};
use crate::telemetry;
use crate::trace_export::{ExportConfig, TraceExport};

#[derive(Debug, Parser)]
#[command(
    name = "tokenvault",
    version,
    about = "Keeps Trackunit app credentials encrypted and hands out per-account access tokens."
)]
#[command(long_about = "Keeps Trackunit app credentials encrypted and hands out per-account access tokens.\n\n\
Settings come from environment variables (DATABASE_URL, TOKENVAULT_ENCRYPTION_KEYS, ...; see README.md),\n\
their NAME_FILE variants, or --config FILE (TOML, the same names in lower case).")]
pub struct Cli {
    /// TOML file with settings (the environment variable names in lower case, and `[providers.NAME]`
    /// tables); variables take precedence.
    #[arg(long, global = true, value_name = "FILE", env = "TOKENVAULT_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the public and internal listeners until SIGINT/SIGTERM, then shut down gracefully.
    Serve,
    /// Apply the database migrations embedded in this binary (the files in migrations/).
    Migrate,
    /// Encryption keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Service keys for internal callers of the token API.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Installations: every account's credentials, at every provider.
    #[command(subcommand)]
    Installations(InstallationsCommand),
    /// Credentials of accounts at providers other than Trackunit (whose arrive by its callback).
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// The providers this deployment mints tokens at.
    #[command(subcommand)]
    Providers(ProvidersCommand),
    /// What the callbacks' identity tokens carry.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// The audit trail: every change of who can get what.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Exit 0 when the public listener (or with --internal the internal one) answers /readyz with 200,
    /// else 1: a container health check for images without curl. Needs only the listener addresses.
    Healthcheck {
        /// Ask the internal listener instead of the public one.
        #[arg(long)]
        internal: bool,
    },
    /// A local stand-in for Trackunit (JWKS, /apptoken, signed install callbacks), for demos and
    /// development. Needs no settings. With no subcommand, serves it.
    Sandbox(SandboxArgs),
    /// Print the OpenAPI 3.1 document the internal listener serves at /openapi.json (as committed in
    /// docs/openapi.json). Needs no settings.
    Openapi,
}

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    #[command(subcommand)]
    pub action: Option<SandboxAction>,
    /// Where to serve the sandbox.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: std::net::SocketAddr,
    /// How long the access tokens it mints live.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub token_lifetime_secs: u64,
}

#[derive(Debug, Subcommand)]
pub enum SandboxAction {
    /// Ask the running sandbox to send tokenvault a correctly signed INSTALLED callback with fresh
    /// credentials that its /apptoken accepts.
    Install(SandboxTarget),
    /// Ask the running sandbox to send tokenvault a signed UNINSTALLED callback.
    Uninstall(SandboxTarget),
}

#[derive(Debug, clap::Args)]
pub struct SandboxTarget {
    /// tokenvault's public base URL (the callback goes to URL/callbacks/trackunit).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The irisAppId.
    #[arg(long, default_value = "@sandbox/demo-app")]
    pub app: String,
    /// The account id.
    #[arg(long)]
    pub account: String,
    /// The running sandbox.
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    pub sandbox: String,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a new random key as `<id>:<base64 of 32 bytes>`, for TOKENVAULT_ENCRYPTION_KEYS.
    Generate {
        /// The key id to print (1 to 32 characters of A-Z, a-z, 0-9, '_' or '-'); defaults to a date-based id.
        #[arg(long)]
        id: Option<String>,
    },
    /// Re-encrypt every stored secret under the first key of TOKENVAULT_ENCRYPTION_KEYS, in batches.
    /// Resumable and safe while `serve` runs elsewhere (give those processes the new ring first).
    /// Exits 1 naming the rows that could not be decrypted; they are left untouched.
    Rotate {
        /// Rows re-encrypted per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch_size: i64,
        /// Only say how many rows would be re-sealed (and expired tokens deleted); change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// How many stored secrets each key id protects, so you know when an old key can be dropped.
    Status {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Create a client and print its service key once, alone on the last line. Only its SHA-256 is stored.
    Create {
        /// A unique name for the calling service.
        #[arg(long)]
        name: String,
        /// An account id the client may get tokens for, or '*' for all. Repeat for several.
        #[arg(long = "account", value_name = "ID|*")]
        accounts: Vec<String>,
        /// A scope the client may ask for, or '*' for all. Repeat for several.
        #[arg(long = "scope", value_name = "SCOPE|*")]
        scopes: Vec<String>,
        /// A Trackunit app (irisAppId) the client may get tokens of, or '*' for all. Repeat for several.
        /// Without it, every app.
        #[arg(long = "app", value_name = "APP|*")]
        apps: Vec<String>,
        /// A provider the client may get tokens of, or '*' for all. Repeat for several. Without it,
        /// trackunit only.
        #[arg(long = "provider", value_name = "PROVIDER|*")]
        providers: Vec<String>,
        /// Allow the admin API (installations, credentials, clients, audit).
        #[arg(long)]
        admin: bool,
        /// The key stops working after this long (90s, 30m, 24h, 7d, or seconds). Without it, never.
        #[arg(long = "expires-in", value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// List clients (never prints keys), with when each key was last used.
    List {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke the client named NAME: its keys stop working at once. The name can be used again.
    Revoke { name: String },
    /// Give the client named NAME a new key, printed once; its old key keeps working for the grace period,
    /// so callers can roll over.
    Rotate {
        name: String,
        /// How long the old key keeps working (90s, 30m, 24h, 7d, or seconds).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        grace: String,
    },
}

/// How list commands print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    Table,
    /// One JSON object per line, for programs.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum InstallationsCommand {
    /// List installations: provider, app, account, status, timestamps. Never a secret or a client id.
    List {
        /// Only those of this provider.
        #[arg(long)]
        provider: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Make a rejected installation (the token endpoint answered invalid_client) active again now,
    /// instead of waiting for its next probe. Use it when you know the credentials work again.
    Reactivate {
        /// The installation's id (see `installations list`).
        id: uuid::Uuid,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Register (or replace) an account's credentials at a provider. Secrets are read from files or
    /// stdin, never from the command line (which other users of the machine can see).
    Put {
        #[arg(long)]
        provider: String,
        #[arg(long)]
        account: String,
        #[arg(long = "client-id")]
        client_id: String,
        /// A file holding the client secret (trailing newlines removed).
        #[arg(long = "client-secret-file", value_name = "FILE", conflicts_with = "client_secret_stdin")]
        client_secret_file: Option<PathBuf>,
        /// Read the client secret from stdin (trailing newlines removed).
        #[arg(long = "client-secret-stdin")]
        client_secret_stdin: bool,
        /// A file holding a user's refresh token: the credentials are then user-delegated, and every
        /// token is minted with the refresh token grant.
        #[arg(long = "refresh-token-file", value_name = "FILE")]
        refresh_token_file: Option<PathBuf>,
    },
    /// Erase an account's credentials at a provider, with every cached token.
    Delete {
        #[arg(long)]
        provider: String,
        #[arg(long)]
        account: String,
    },
    /// List registered credentials (never a secret or a client id).
    List {
        /// Only those of this provider.
        #[arg(long)]
        provider: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProvidersCommand {
    /// Each provider's settings as loaded (they hold no secret), as JSON lines.
    List,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit records, newest first (never a secret).
    List(AuditFilter),
}

#[derive(Debug, clap::Args)]
pub struct AuditFilter {
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub provider: Option<String>,
    /// An action, e.g. INSTALLED, CREDENTIALS_REGISTERED, CLIENT_ROTATED.
    #[arg(long)]
    pub action: Option<String>,
    /// RFC 3339: only records at or after.
    #[arg(long)]
    pub since: Option<String>,
    /// RFC 3339: only records before.
    #[arg(long)]
    pub until: Option<String>,
    /// Only records with an id below this (the cursor of the previous page).
    #[arg(long)]
    pub before: Option<i64>,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1000))]
    pub limit: i64,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// The sets of claim names (never values) that verified Trackunit-Identity tokens carried, newest
    /// first: which claims TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS could require.
    Claims {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Each command loads only the settings it needs.
    match &cli.command {
        Command::Keys(KeysCommand::Generate { id }) => return generate(id.as_deref()),
        Command::Openapi => {
            println!("{}", crate::routes::openapi::document_pretty()?);
            return Ok(());
        }
        Command::Sandbox(args) => {
            let source = Source::environment(cli.config.as_deref())?;
            telemetry::init(crate::settings::log_format(&source)?, None);
            return match &args.action {
                None => crate::sandbox::serve(args.listen, Duration::from_secs(args.token_lifetime_secs)).await,
                Some(SandboxAction::Install(to)) => {
                    crate::sandbox::send(&to.sandbox, "install", &to.url, &to.app, &to.account).await
                }
                Some(SandboxAction::Uninstall(to)) => {
                    crate::sandbox::send(&to.sandbox, "uninstall", &to.url, &to.app, &to.account).await
                }
            };
        }
        Command::Healthcheck { internal } => {
            let source = Source::environment(cli.config.as_deref())?;
            let (public, internal_addr) = crate::settings::listener_addresses(&source)?;
            return healthcheck(if *internal { internal_addr } else { public }).await;
        }
        Command::Migrate => {
            let source = Source::environment(cli.config.as_deref())?;
            telemetry::init(crate::settings::log_format(&source)?, None);
            let pool = store::pool(&crate::settings::database_url(&source)?, 2)?;
            store::migrate(&pool).await?;
            println!("migrations applied");
            return Ok(());
        }
        _ => {}
    }
    let settings = Settings::load(&Source::environment(cli.config.as_deref())?)?;
    if let Command::Serve = cli.command {
        // Traces are exported by the server only: a CLI command's spans would be noise.
        let export = match ExportConfig::from_env()? {
            Some(config) => Some(TraceExport::start(&config)?),
            None => None,
        };
        telemetry::init(settings.log_format, export.as_ref());
        if export.is_some() {
            tracing::info!("exporting traces over OTLP (OTEL_* variables)");
        }
        return Application::build(settings).await?.run_until_stopped().await;
    }
    telemetry::init(settings.log_format, None);
    match cli.command {
        Command::Serve | Command::Migrate | Command::Sandbox(_) | Command::Healthcheck { .. } | Command::Openapi => {
            unreachable!("handled above")
        }
        Command::Clients(command) => clients(command, &settings).await,
        Command::Installations(InstallationsCommand::List { provider, output }) => {
            list_installations(&settings, provider.as_deref(), output).await
        }
        Command::Credentials(command) => credentials(command, &settings).await,
        Command::Providers(ProvidersCommand::List) => {
            for provider in settings.providers.iter() {
                println!("{}", serde_json::to_string(&**provider)?);
            }
            Ok(())
        }
        Command::Installations(InstallationsCommand::Reactivate { id }) => reactivate(&settings, id).await,
        Command::Identity(IdentityCommand::Claims { output }) => identity_claims(&settings, output).await,
        Command::Audit(AuditCommand::List(filter)) => audit_list(&settings, filter).await,
        Command::Keys(KeysCommand::Rotate { batch_size, dry_run }) => rotate(&settings, batch_size, dry_run).await,
        Command::Keys(KeysCommand::Status { output }) => key_status(&settings, output).await,
        Command::Keys(KeysCommand::Generate { .. }) => unreachable!("handled above"),
    }
}

/// Exit status of `healthcheck`: the listener at `address` answers `/readyz` with 200.
async fn healthcheck(address: std::net::SocketAddr) -> anyhow::Result<()> {
    let host = if address.ip().is_unspecified() {
        if address.is_ipv4() { "127.0.0.1".to_owned() } else { "[::1]".to_owned() }
    } else if address.is_ipv6() {
        format!("[{}]", address.ip())
    } else {
        address.ip().to_string()
    };
    let url = format!("http://{host}:{}/readyz", address.port());
    let response = crate::outbound::client(Duration::from_secs(3))
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} does not answer"))?;
    anyhow::ensure!(response.status().is_success(), "{url} answered {}", response.status());
    Ok(())
}

async fn rotate(settings: &Settings, batch_size: i64, dry_run: bool) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database_url, 2)?;
    if dry_run {
        let plan = crate::rotation::plan(&pool, &settings.encryption_keys).await?;
        println!(
            "would re-encrypt {} installation(s), {} cached token(s) and {} refresh token(s) under key {}, and \
             delete {} expired cached token(s); nothing was changed",
            plan.installations,
            plan.cached_tokens,
            plan.refresh_tokens,
            settings.encryption_keys.primary_id(),
            plan.expired_tokens
        );
        return Ok(());
    }
    // Progress on stderr, one line per batch: stdout keeps the summary alone.
    let progress = |what: &str, done: u64| eprintln!("re-encrypted {done} {what} so far");
    let report = crate::rotation::rotate(&pool, &settings.encryption_keys, batch_size, progress).await?;
    println!(
        "re-encrypted {} installation(s), {} cached token(s) and {} refresh token(s) under key {}; deleted {} \
         expired cached token(s)",
        report.installations,
        report.cached_tokens,
        report.refresh_tokens,
        settings.encryption_keys.primary_id(),
        report.expired_tokens_deleted
    );
    if report.unreadable_installations.is_empty()
        && report.unreadable_tokens.is_empty()
        && report.unreadable_refresh_tokens.is_empty()
    {
        return Ok(());
    }
    let ids: Vec<String> = report.unreadable_installations.iter().map(ToString::to_string).collect();
    let refresh: Vec<String> = report.unreadable_refresh_tokens.iter().map(ToString::to_string).collect();
    anyhow::bail!(
        "could not decrypt, left untouched: installation(s) [{}], cached token(s) [{}], refresh token(s) of [{}]",
        ids.join(", "),
        report.unreadable_tokens.join(", "),
        refresh.join(", ")
    )
}

/// One key id's line of `keys status`.
#[derive(serde::Serialize)]
struct KeyIdUsage {
    key_id: String,
    /// `primary`, `yes` (another key of the ring) or `missing` (not in the ring: those rows cannot be read).
    in_ring: &'static str,
    installations: i64,
    cached_tokens: i64,
    refresh_tokens: i64,
}

async fn key_status(settings: &Settings, output: Output) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database_url, 2)?;
    let usage = installation::key_usage(&pool).await?;
    let ring = &settings.encryption_keys;
    let mut ids: Vec<String> = ring.ids().iter().map(|id| id.as_str().to_owned()).collect();
    for (id, _, _) in &usage {
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    let lines: Vec<KeyIdUsage> = ids
        .into_iter()
        .map(|id| {
            let count = |table: &str| usage.iter().find(|(k, t, _)| *k == id && t == table).map_or(0, |(_, _, n)| *n);
            let in_ring = if ring.primary_id().as_str() == id {
                "primary"
            } else if ring.contains(&id) {
                "yes"
            } else {
                "missing"
            };
            KeyIdUsage {
                in_ring,
                installations: count("installation"),
                cached_tokens: count("token_cache"),
                refresh_tokens: count("refresh_token"),
                key_id: id,
            }
        })
        .collect();
    if output == Output::Json {
        return print_json_lines(&lines);
    }
    println!(
        "{:<34} {:<10} {:>14} {:>14} {:>15}",
        "KEY ID", "IN RING", "INSTALLATIONS", "CACHED TOKENS", "REFRESH TOKENS"
    );
    for line in lines {
        let in_ring = if line.in_ring == "missing" { "MISSING" } else { line.in_ring };
        println!(
            "{:<34} {in_ring:<10} {:>14} {:>14} {:>15}",
            line.key_id, line.installations, line.cached_tokens, line.refresh_tokens
        );
    }
    Ok(())
}

fn generate(id: Option<&str>) -> anyhow::Result<()> {
    let id = id.map_or_else(|| format!("k{}", chrono::Utc::now().format("%Y%m%d")), str::to_owned);
    let line = format!("{id}:{}", generate_key());
    // Parse what we print, so an invalid --id fails here rather than at the next start.
    crate::crypto::KeyRing::parse(&line).context("--id")?;
    println!("{line}");
    Ok(())
}

async fn clients(command: ClientsCommand, settings: &Settings) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database_url, 2)?;
    match command {
        ClientsCommand::Create { name, accounts, scopes, apps, providers, admin, expires_in } => {
            let expires_at = match expires_in {
                Some(text) => {
                    let lasts = crate::service_clients::parse_duration(&text)
                        .map_err(|e| anyhow::anyhow!("--expires-in {e}"))?;
                    Some(chrono::Utc::now() + chrono::Duration::from_std(lasts)?)
                }
                None => None,
            };
            let grants = api_client::Grants { accounts, scopes, apps, providers, admin };
            let new = crate::service_clients::NewClient::new(name, grants, expires_at)
                .map_err(|reason| anyhow::anyhow!(reason.replace('`', "")))?;
            let (client, key) = crate::service_clients::create(&pool, &new).await?;
            println!(
                "created client {} (providers: {}; accounts: {}; scopes: {}; apps: {}; admin: {}; expires: {}). Its \
                 key is shown once, below:",
                client.name,
                display_list(&client.providers),
                display_list(&client.accounts),
                display_list(&client.scopes),
                display_list(&client.apps),
                client.admin,
                client.expires_at.map_or("never".into(), |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            );
            println!("{}", key.expose());
        }
        ClientsCommand::List { output } => {
            let clients = api_client::list(&pool).await?;
            if output == Output::Json {
                return print_json_lines(&clients);
            }
            println!(
                "{:<24} {:<8} {:<6} {:<21} {:<21} {:<24} {:<24} {:<24} SCOPES",
                "NAME", "STATUS", "ADMIN", "CREATED", "LAST USED", "PROVIDERS", "ACCOUNTS", "APPS"
            );
            let time = |at: Option<chrono::DateTime<chrono::Utc>>| {
                at.map_or("-".into(), |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            };
            for client in clients {
                println!(
                    "{:<24} {:<8} {:<6} {:<21} {:<21} {:<24} {:<24} {:<24} {}",
                    client.name,
                    client.status,
                    client.admin,
                    time(Some(client.created_at)),
                    time(client.last_used_at),
                    display_list(&client.providers),
                    display_list(&client.accounts),
                    display_list(&client.apps),
                    display_list(&client.scopes)
                );
            }
        }
        ClientsCommand::Revoke { name } => {
            anyhow::ensure!(crate::service_clients::revoke(&pool, &name).await?, "no active client named {name:?}");
            println!("revoked client {name}");
        }
        ClientsCommand::Rotate { name, grace } => {
            let grace = crate::service_clients::parse_duration(&grace).map_err(|e| anyhow::anyhow!("--grace {e}"))?;
            anyhow::ensure!(grace <= crate::service_clients::LONGEST_ROTATION_GRACE, "--grace must be at most 30 days");
            let key = crate::service_clients::rotate(&pool, &name, grace).await?;
            let key = key.with_context(|| format!("no active client named {name:?}"))?;
            println!(
                "rotated the key of client {name}; the old key works for {} more second(s). The new key is shown \
                 once, below:",
                grace.as_secs()
            );
            println!("{}", key.expose());
        }
    }
    Ok(())
}

/// Prints `rows` as JSON lines (`--output json`).
fn print_json_lines<T: serde::Serialize>(rows: &[T]) -> anyhow::Result<()> {
    for row in rows {
        println!("{}", serde_json::to_string(row)?);
    }
    Ok(())
}

fn display_list(values: &[String]) -> String {
    if values.is_empty() { "(none)".into() } else { values.join(",") }
}

async fn reactivate(settings: &Settings, id: uuid::Uuid) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database_url, 2)?;
    match crate::installs::reactivate(&pool, id).await? {
        crate::installs::Reactivation::Reactivated { .. } => println!("reactivated installation {id}"),
        crate::installs::Reactivation::AlreadyActive => println!("installation {id} is already active"),
        crate::installs::Reactivation::NoCredentials => {
            anyhow::bail!("installation {id} holds no credentials (uninstalled or revoked); it needs a new INSTALLED")
        }
        crate::installs::Reactivation::NotFound => anyhow::bail!("no installation {id}"),
    }
    Ok(())
}

async fn identity_claims(settings: &Settings, output: Output) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database_url, 2)?;
    if output == Output::Json {
        return print_json_lines(&crate::store::identity_claim_set::list(&pool).await?);
    }
    println!("{:<20} {:<20} CLAIM NAMES", "FIRST SEEN", "LAST SEEN");
    for set in crate::store::identity_claim_set::list(&pool).await? {
        println!(
            "{:<20} {:<20} {}",
            set.first_seen_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            set.last_seen_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            set.names
        );
    }
    Ok(())
}

/// Reads a secret from `file`, or stdin when `stdin`; trailing newlines removed.
fn read_secret(file: Option<&std::path::Path>, stdin: bool, what: &str) -> anyhow::Result<Option<String>> {
    let text = match (file, stdin) {
        (Some(path), _) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {what} from {path:?}"))?
        }
        (None, true) => {
            std::io::read_to_string(std::io::stdin()).with_context(|| format!("cannot read {what} from stdin"))?
        }
        (None, false) => return Ok(None),
    };
    Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
}

async fn credentials(command: CredentialsCommand, settings: &Settings) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database_url, 2)?;
    let known = |provider: &str| -> anyhow::Result<()> {
        let found = settings.providers.get(provider).with_context(|| format!("no provider named {provider:?}"))?;
        anyhow::ensure!(
            !found.is_trackunit(),
            "trackunit's credentials arrive by its callback; they cannot be registered by hand"
        );
        Ok(())
    };
    match command {
        CredentialsCommand::Put {
            provider,
            account,
            client_id,
            client_secret_file,
            client_secret_stdin,
            refresh_token_file,
        } => {
            known(&provider)?;
            TextField::parse(account.as_str()).map_err(|e| anyhow::anyhow!("--account {e}"))?;
            let secret = read_secret(client_secret_file.as_deref(), client_secret_stdin, "the client secret")?;
            let refresh = read_secret(refresh_token_file.as_deref(), false, "the refresh token")?;
            let new = crate::credentials::NewCredentials::new(Some(client_id), secret, refresh)
                .map_err(|reason| anyhow::anyhow!(reason.replace('`', "")))?;
            match crate::credentials::register(&pool, &settings.encryption_keys, &provider, &account, &new).await? {
                crate::credentials::Registered::Created(_) => {
                    println!("registered credentials of {account} at {provider}")
                }
                crate::credentials::Registered::Replaced(_) => {
                    println!("replaced credentials of {account} at {provider}")
                }
            }
        }
        CredentialsCommand::Delete { provider, account } => {
            known(&provider)?;
            anyhow::ensure!(
                crate::credentials::erase(&pool, &provider, &account).await?.is_some(),
                "no credentials of {account:?} at {provider}"
            );
            println!("deleted credentials of {account} at {provider}");
        }
        CredentialsCommand::List { provider, output } => {
            let rows: Vec<_> = installation::list(&pool, provider.as_deref())
                .await?
                .into_iter()
                .filter(|row| row.provider != crate::provider::TRACKUNIT)
                .collect();
            if output == Output::Json {
                return print_json_lines(&rows);
            }
            print_installations(rows.iter());
        }
    }
    Ok(())
}

async fn list_installations(settings: &Settings, provider: Option<&str>, output: Output) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database_url, 2)?;
    let rows = installation::list(&pool, provider).await?;
    if output == Output::Json {
        return print_json_lines(&rows);
    }
    print_installations(rows.iter());
    Ok(())
}

async fn audit_list(settings: &Settings, filter: AuditFilter) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database_url, 2)?;
    let time = |text: Option<String>, flag: &str| -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
        text.map(|t| {
            chrono::DateTime::parse_from_rfc3339(&t)
                .map(|at| at.to_utc())
                .with_context(|| format!("{flag} is not RFC 3339"))
        })
        .transpose()
    };
    let query = crate::store::audit::Filter {
        account_id: filter.account,
        provider: filter.provider,
        action: filter.action,
        since: time(filter.since, "--since")?,
        until: time(filter.until, "--until")?,
        before: filter.before,
        limit: filter.limit,
    };
    let events = crate::store::audit::list(&pool, &query).await?;
    if filter.output == Output::Json {
        return print_json_lines(&events);
    }
    println!(
        "{:<8} {:<20} {:<22} {:<22} {:<14} {:<12} {:<24} TARGET",
        "ID", "AT", "ACTOR", "ACTION", "OUTCOME", "PROVIDER", "ACCOUNT"
    );
    for event in &events {
        let target = event.client_name.clone().or(event.app_id.clone()).unwrap_or_default();
        println!(
            "{:<8} {:<20} {:<22} {:<22} {:<14} {:<12} {:<24} {}",
            event.id,
            event.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            event.actor,
            event.action,
            event.outcome,
            event.provider.as_deref().unwrap_or("-"),
            event.account_id.as_deref().unwrap_or("-"),
            target
        );
    }
    if events.len() as i64 == filter.limit
        && let Some(last) = events.last()
    {
        eprintln!("(more: --before {})", last.id);
    }
    Ok(())
}

fn print_installations<'a>(rows: impl Iterator<Item = &'a installation::Summary>) {
    println!(
        "{:<36} {:<16} {:<24} {:<36} {:<11} {:<20} UPDATED",
        "ID", "PROVIDER", "APP", "ACCOUNT", "STATUS", "CREATED"
    );
    for row in rows {
        println!(
            "{:<36} {:<16} {:<24} {:<36} {:<11} {:<20} {}",
            row.id,
            row.provider,
            row.app_id.as_deref().unwrap_or("-"),
            row.account_id,
            row.status,
            row.created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            row.updated_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
    }
}
