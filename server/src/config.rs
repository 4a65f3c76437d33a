use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::{Perm, Secret};

/// The `collab` command line: the server's options, and subcommands for operators.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "collab",
    version,
    about = "Yjs-compatible collaboration server: speaks the y-websocket protocol at \
             ws://HOST:PORT/<document-name> and stores documents durably in sled.",
    args_conflicts_with_subcommands = false
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print a document token signed with the configured secret (--auth-secret or
    /// --auth-secret-file, or their environment variables).
    Token(TokenArgs),
    /// List, export, import or delete stored documents (with the server stopped: the data
    /// folder is locked while a server runs).
    #[command(subcommand)]
    Docs(DocsCommand),
    /// Write every document as a Yjs update file plus `manifest.json` (names, sizes, sha256)
    /// into DIR, which must be empty or not exist. A running server: POST /api/backup.
    Backup(BackupArgs),
    /// Load a backup written by `collab backup` or POST /api/backup into an empty data folder,
    /// after verifying every file's sha256 (exit 1 naming the document on a mismatch).
    Restore(RestoreArgs),
    /// Verify every stored document: the write-ahead log's records, each snapshot, and that
    /// each document loads. Prints the damaged ones by name; exit code 1 if there are any.
    Check,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DocsCommand {
    /// Name, stored size, updates in the log and last change of every stored document.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a document's whole state as one Yjs v1 update (stdout, or -o FILE).
    Export {
        /// Document name (as in the URL path).
        name: String,
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Merge a Yjs v1 update from FILE (`-` for stdin) into a document, creating it if needed.
    Import {
        /// Document name (as in the URL path).
        name: String,
        /// File holding the update.
        file: PathBuf,
    },
    /// Remove a document, its versions included.
    Delete {
        /// Document name (as in the URL path).
        name: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// Folder to write the backup into (created; must be empty if it exists).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// Folder holding a backup (`manifest.json` and one file per document).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Document name (as in the URL path), or a prefix ending in `*` (`team-42/*`).
    #[arg(long)]
    pub doc: String,

    /// `read-write` or `read-only`.
    #[arg(long, default_value = "read-write")]
    pub perm: Perm,

    /// Lifetime, e.g. `90s`, `15m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// User id carried in the token (`sub`), shown in the server's logs.
    #[arg(long)]
    pub sub: Option<String>,
}

/// Command-line and environment configuration of the `collab` server.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// TOML file with any of these settings as top-level keys named like the flags with `_`
    /// for `-` (see collab.example.toml). Precedence: flag > environment > file > default.
    #[arg(long, env = "COLLAB_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "COLLAB_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,

    /// Storage folder: the sled database (metadata), `snapshots/`, `versions/` and the
    /// write-ahead log `wal/` (also the folder the data tools `docs`, `backup`, `restore` and
    /// `check` work on).
    #[arg(long, env = "COLLAB_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    /// Largest accepted WebSocket message in bytes; bigger ones close the connection with 1009.
    #[arg(long, env = "COLLAB_MAX_MESSAGE_SIZE", default_value_t = 32 * 1024 * 1024)]
    pub max_message_size: usize,

    /// Seconds a document stays in memory after its last connection leaves.
    #[arg(long, env = "COLLAB_GRACE_PERIOD_SECS", default_value_t = 30)]
    pub grace_period_secs: u64,

    /// Seconds without a change after which a loaded document keeps only its encoded bytes,
    /// freeing its yrs document until the next change (0: never).
    #[arg(long, env = "COLLAB_HIBERNATE_AFTER_SECS", default_value_t = 30)]
    pub hibernate_after_secs: u64,

    /// Compact a document once its update log holds this many entries.
    #[arg(long, env = "COLLAB_COMPACT_AFTER_UPDATES", default_value_t = 1000)]
    pub compact_after_updates: u64,

    /// Compact a document once its update log holds this many bytes.
    #[arg(long, env = "COLLAB_COMPACT_AFTER_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub compact_after_bytes: u64,

    /// Messages queued for one connection before it is considered too slow and disconnected
    /// (close code 1013; the client reconnects and resyncs).
    #[arg(long, env = "COLLAB_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Seconds between WebSocket pings; a connection that missed the previous pong is closed.
    #[arg(long, env = "COLLAB_HEARTBEAT_SECS", default_value_t = 30)]
    pub heartbeat_secs: u64,

    /// Open WebSocket connections the server accepts; further upgrades get HTTP 503, so a flood
    /// of sockets cannot grow memory without bound (each idle connection costs about 9 KiB).
    #[arg(long, env = "COLLAB_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Awareness client ids one connection may announce (a browser tab announces one).
    #[arg(
        long,
        env = "COLLAB_MAX_AWARENESS_PER_CONNECTION",
        default_value_t = 64
    )]
    pub max_awareness_per_connection: usize,

    /// Awareness (presence) batching window in milliseconds: a change after a quiet window is
    /// relayed at once, further changes within the window go out merged at its end. 0 relays
    /// every change immediately, as the reference server does. 100 ms is the presence throttle
    /// Liveblocks ships by default; measured with 500 clients each moving once per second, it
    /// takes the server from 13.5 % (50 ms) to 8.1 % of one core.
    #[arg(long, env = "COLLAB_AWARENESS_BATCH_MS", default_value_t = 100)]
    pub awareness_batch_ms: u64,

    /// While several documents ask for storage flushes (fsyncs), each starts no sooner than
    /// this many microseconds after the previous one, and edits arriving meanwhile share it:
    /// under edits spread over many documents one fsync covers many. An edit after a quiet
    /// spell waits for nothing, nor does one document asking alone (8 flushes in a row: it
    /// gathers its own edits while a flush runs, and flushes on its own thread while that
    /// idles at least as long as it spends sending). 0 flushes as soon as anything is waiting. Measured in bench/RESULTS.md.
    #[arg(long, env = "COLLAB_FLUSH_INTERVAL_US", default_value_t = 2000)]
    pub flush_interval_us: u64,

    /// The most of its worker thread's time (percent) one document's broadcasts may take,
    /// counted in CPU time (wall time below 16 connections), with 5 ms in hand for bursts. A
    /// document over it holds its next broadcast back (20 ms at most) and sends the updates
    /// arriving meanwhile merged, one message per reader. Only a document with many readers
    /// and fast edits ever waits (here: 200 readers at 1,000 edits/s, not 50). 100 never waits.
    #[arg(long, env = "COLLAB_MAX_SEND_SHARE", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub max_send_share: u8,

    /// Fault injection for tests: delay every storage flush by this many milliseconds, which
    /// widens the window in which an update is written but not yet durable.
    #[arg(long, hide = true, default_value_t = 0)]
    pub debug_flush_delay_ms: u64,

    /// Worker threads (default: one per core). Each document runs on one of them, with its
    /// plain WebSocket connections; documents spread over the workers.
    #[arg(long, env = "COLLAB_WORKERS")]
    pub workers: Option<usize>,

    /// Seconds a new TCP connection has to send its whole HTTP request (the WebSocket upgrade
    /// included; with TLS, also the TLS handshake). Slower ones are closed (slowloris).
    #[arg(long, env = "COLLAB_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,

    /// WebSocket connections one client IP may hold; further upgrades get HTTP 429. 0 is no
    /// limit (the default: a whole office behind one NAT address is normal).
    #[arg(long, env = "COLLAB_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// WebSocket connections one document may have; further upgrades get HTTP 503.
    #[arg(long, env = "COLLAB_MAX_CONNECTIONS_PER_DOC", default_value_t = 5000)]
    pub max_connections_per_doc: usize,

    /// Comma-separated CIDRs of reverse proxies whose `X-Forwarded-For` names the client IP
    /// (for --max-connections-per-ip and logs). From any other peer the header is ignored.
    #[arg(long, env = "COLLAB_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Messages per second one connection may send (a burst of --rate-limit-burst-secs
    /// seconds' worth is allowed). Over it, the server stops reading from the socket.
    #[arg(long, env = "COLLAB_RATE_LIMIT_MESSAGES", default_value_t = 200)]
    pub rate_limit_messages: u64,

    /// Bytes per second one connection may send, plus the bytes of the sync answers its
    /// requests cause (so a small request stream cannot make the server send gigabytes).
    #[arg(long, env = "COLLAB_RATE_LIMIT_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub rate_limit_bytes: u64,

    /// Seconds of rate a connection may spend at once before it is slowed down.
    #[arg(long, env = "COLLAB_RATE_LIMIT_BURST_SECS", default_value_t = 4)]
    pub rate_limit_burst_secs: u64,

    /// A connection that stays over its rate for this long is closed with 1008.
    #[arg(long, env = "COLLAB_RATE_LIMIT_GRACE_SECS", default_value_t = 10)]
    pub rate_limit_grace_secs: u64,

    /// Largest encoded size of one document in bytes; an update that would take it past this
    /// is refused (connection closed with 1009) and the document stays as it was.
    #[arg(long, env = "COLLAB_MAX_DOCUMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_document_bytes: u64,

    /// Documents kept in memory at once. When reached, idle documents (no connections) are
    /// unloaded first, oldest first; if none is idle, joining another document gets 1013.
    #[arg(long, env = "COLLAB_MAX_LOADED_DOCUMENTS", default_value_t = 10_000)]
    pub max_loaded_documents: usize,

    /// Largest awareness (presence) state of one client in bytes; larger closes with 1009.
    #[arg(long, env = "COLLAB_MAX_AWARENESS_BYTES", default_value_t = 64 * 1024)]
    pub max_awareness_bytes: usize,

    /// Bytes all connections together may hold in partly received large messages (over
    /// 64 KiB each). Beyond it, further large messages wait; one that waits over 10 s is
    /// refused with 1013.
    #[arg(long, env = "COLLAB_MAX_INCOMING_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_incoming_bytes: u64,

    /// Serve `/metrics` on this separate address (e.g. `127.0.0.1:9090`) instead of --addr,
    /// so it need not be exposed publicly.
    #[arg(long, env = "COLLAB_METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// Seconds between SIGTERM and closing the sockets, during which `/readyz` answers 503 so a
    /// load balancer stops sending new clients.
    #[arg(long, env = "COLLAB_SHUTDOWN_DRAIN_SECS", default_value_t = 0)]
    pub shutdown_drain_secs: u64,

    /// Log format on stderr: `text`, or `json` (one object per line, with the span fields:
    /// document, connection id, user).
    #[arg(long, env = "COLLAB_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Extra URL paths that speak the Hocuspocus provider protocol (`@hocuspocus/provider`,
    /// Tiptap's), besides the root path `/`. Every other path is a y-websocket document.
    #[arg(long, env = "COLLAB_HOCUSPOCUS_PATH", value_delimiter = ',')]
    pub hocuspocus_path: Vec<String>,

    /// Shared secret for document tokens (JWT, HS256). With a secret every WebSocket needs a
    /// token; without one the server runs open. Prefer --auth-secret-file: a flag shows in the
    /// process list.
    #[arg(
        long,
        env = "COLLAB_AUTH_SECRET",
        hide_env_values = true,
        global = true,
        conflicts_with = "auth_secret_file"
    )]
    pub auth_secret: Option<Secret>,

    /// File holding the token secret (its contents, trimmed).
    #[arg(long, env = "COLLAB_AUTH_SECRET_FILE", global = true)]
    pub auth_secret_file: Option<PathBuf>,

    /// Key for the admin endpoints (POST /api/tokens, POST /api/backup), sent as
    /// `Authorization: Bearer <key>`.
    /// Without one those endpoints answer 404.
    #[arg(
        long,
        env = "COLLAB_ADMIN_KEY",
        hide_env_values = true,
        conflicts_with = "admin_key_file"
    )]
    pub admin_key: Option<Secret>,

    /// File holding the admin key (its contents, trimmed).
    #[arg(long, env = "COLLAB_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<PathBuf>,

    /// Run open (no token secret) on an address other than loopback. Without it the server
    /// refuses to start there (exit code 2), so a forgotten secret never exposes every document.
    #[arg(long, env = "COLLAB_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// With a secret: let clients without a token in, read-only (public documents). A token
    /// that is presented but invalid is still refused (401).
    #[arg(long, env = "COLLAB_ALLOW_ANONYMOUS_READ")]
    pub allow_anonymous_read: bool,

    /// Comma-separated origins allowed to open WebSockets: exact (`https://app.example.com`)
    /// or subdomain patterns (`https://*.example.com`). An upgrade with another `Origin` gets
    /// 403; requests without the header (non-browser clients) pass. Unset: every origin.
    #[arg(long, env = "COLLAB_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Store a version of a document after this many seconds of activity (labelled "auto");
    /// 0 turns automatic versions off.
    #[arg(long, env = "COLLAB_AUTO_VERSION_SECS", default_value_t = 0)]
    pub auto_version_secs: u64,

    /// URL that receives signed webhooks (`document.updated`, `document.deleted`) as JSON
    /// POSTs. Repeat the flag (or separate with commas) for several receivers.
    #[arg(
        long = "webhook-url",
        env = "COLLAB_WEBHOOK_URL",
        value_delimiter = ','
    )]
    pub webhook_urls: Vec<String>,

    /// Secret for the webhooks' `X-Collab-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    #[arg(long, env = "COLLAB_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<Secret>,

    /// Quiet time after a document's last change before `document.updated` is sent; a document
    /// edited without pause is reported every 5 windows.
    #[arg(long, env = "COLLAB_WEBHOOK_DEBOUNCE_MS", default_value_t = 2000)]
    pub webhook_debounce_ms: u64,

    /// PEM certificate chain: serve HTTPS and wss:// on --addr (needs --tls-key).
    #[arg(long, env = "COLLAB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "COLLAB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Cluster mode: Redis holds every document (`redis://[:PASSWORD@]HOST:PORT[/DB]`), so
    /// several instances behind a load balancer serve the same documents. Redis should run with
    /// `appendonly yes` and `appendfsync always` (a warning is logged otherwise).
    #[arg(long, env = "COLLAB_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
}

/// Settings that cannot work together, or a secret that cannot be read. The binary exits with
/// code 2 on these, like clap does on a bad flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {flag} file {path}: {source}")]
    SecretFile {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is empty")]
    EmptySecret(&'static str),
    #[error(
        "no --auth-secret is set and {addr} is not a loopback address: anyone who reaches it \
         could read and overwrite every document. Set --auth-secret-file (or --auth-secret), \
         or pass --allow-anonymous to run open on purpose"
    )]
    OpenOnPublicAddress { addr: String },
    #[error("--allow-anonymous-read needs --auth-secret (without a secret everyone may write)")]
    AnonymousReadWithoutSecret,
    #[error("--webhook-url {0:?} is not an http:// or https:// URL")]
    WebhookUrl(String),
    #[error("--webhook-secret is empty")]
    EmptyWebhookSecret,
    #[error("cannot resolve --addr {addr}: {source}")]
    Addr {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The secrets a server runs with, read once at start-up.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    pub auth: Option<Secret>,
    pub admin: Option<Secret>,
}

fn read_secret(
    value: &Option<Secret>,
    file: &Option<PathBuf>,
    flag: &'static str,
) -> Result<Option<Secret>, ConfigError> {
    let secret = match (value, file) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(path)) => {
            Some(
                Secret::from_file(path).map_err(|source| ConfigError::SecretFile {
                    flag,
                    path: path.clone(),
                    source,
                })?,
            )
        }
        (None, None) => None,
    };
    match secret {
        Some(s) if s.is_empty() => Err(ConfigError::EmptySecret(flag)),
        other => Ok(other),
    }
}

impl Config {
    /// Reads the secrets (files included) and checks the access settings fit together.
    pub fn secrets(&self) -> Result<Secrets, ConfigError> {
        let secrets = Secrets {
            auth: read_secret(&self.auth_secret, &self.auth_secret_file, "--auth-secret")?,
            admin: read_secret(&self.admin_key, &self.admin_key_file, "--admin-key")?,
        };
        for url in &self.webhook_urls {
            let ok = url.parse::<actix_web::http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return Err(ConfigError::WebhookUrl(url.clone()));
            }
        }
        if self.webhook_secret.as_ref().is_some_and(Secret::is_empty) {
            return Err(ConfigError::EmptyWebhookSecret);
        }
        if secrets.auth.is_none() {
            if self.allow_anonymous_read {
                return Err(ConfigError::AnonymousReadWithoutSecret);
            }
            if !self.allow_anonymous && !self.is_loopback()? {
                return Err(ConfigError::OpenOnPublicAddress {
                    addr: self.addr.clone(),
                });
            }
        }
        Ok(secrets)
    }

    /// Whether every address `--addr` resolves to is a loopback address.
    pub fn is_loopback(&self) -> Result<bool, ConfigError> {
        use std::net::ToSocketAddrs;
        let addrs: Vec<_> = self
            .addr
            .to_socket_addrs()
            .map_err(|source| ConfigError::Addr {
                addr: self.addr.clone(),
                source,
            })?
            .collect();
        Ok(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()))
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }

    pub fn hibernate_after(&self) -> Duration {
        Duration::from_secs(self.hibernate_after_secs)
    }

    pub fn awareness_batch(&self) -> Duration {
        Duration::from_millis(self.awareness_batch_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs.max(1))
    }

    /// `--auto-version-secs`, `None` when off.
    pub fn auto_version(&self) -> Option<Duration> {
        (self.auto_version_secs > 0).then(|| Duration::from_secs(self.auto_version_secs))
    }

    pub fn webhooks(&self) -> crate::webhooks::WebhookConfig {
        crate::webhooks::WebhookConfig {
            urls: self.webhook_urls.clone(),
            secret: self.webhook_secret.clone(),
            debounce: Duration::from_millis(self.webhook_debounce_ms),
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }
}

/// Longest accepted document name, in bytes.
pub const MAX_DOC_NAME_LEN: usize = 512;
