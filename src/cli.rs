//! The command line: `relay`, `agent`, `demo` and `status` subcommands, and how their flags merge with
//! a TOML `--config` file (flags win) into [`RelayConfig`] / [`AgentConfig`]; and the shell
//! completions and man pages generated from the same definitions (`completions`, `man`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    self, AgentConfig, AgentFile, BackendKind, ConfigError, FrontConfig, Heartbeat, HttpsConfig,
    PortRange, RelayConfig, RelayFile, Secret, ServiceConfig, Toggle, DEFAULT_CONTROL_PORT,
    DEFAULT_POOL,
};
use crate::protocol::proxy::ProxyVersion;
use crate::protocol::ServiceKind;
use crate::tls::Fingerprint;

/// `--version`: the crate version, the commit it was built from, and the backends built in.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RINGTUNNEL_COMMIT"),
    "; backends: uring (io_uring, needs Linux 5.11+), tokio)"
);

const RELAY_EXAMPLES: &str = "Examples:
  # A relay for tcp services (the secret from a file keeps it out of `ps`):
  ringtunnel relay --secret-file /etc/ringtunnel/secret

  # Also web apps on ports 80/443, routed by host name under example.com:
  ringtunnel relay --secret-file /etc/ringtunnel/secret --http 0.0.0.0:80 --tls 0.0.0.0:443 --domain example.com

  # Everything from a file (see examples/relay.toml), metrics on loopback:
  ringtunnel relay --config /etc/ringtunnel/relay.toml --admin 127.0.0.1:7844";

const AGENT_EXAMPLES: &str = "Examples:
  # Publish a local port; the relay picks the public one:
  ringtunnel agent --relay 203.0.113.7 --relay-fingerprint 6f0c... --secret-file ~/.ringtunnel-secret --local 127.0.0.1:8000

  # A web app as blog.example.com on the relay's shared HTTP port:
  ringtunnel agent --relay 203.0.113.7 --relay-fingerprint 6f0c... --secret-file ~/.ringtunnel-secret --local 127.0.0.1:3000 --name blog --http-host blog

  # Several services from a file (see examples/agent.toml):
  ringtunnel agent --config agent.toml";

/// ringtunnel: expose services behind NAT through a public relay.
#[derive(Debug, Parser)]
#[command(name = "ringtunnel", version = VERSION, about)]
pub struct Cli {
    /// Log filter, e.g. `info` or `ringtunnel=debug,warn`; over the relay config's `log`
    /// [default: info].
    #[arg(long, global = true, env = "RINGTUNNEL_LOG")]
    pub log: Option<String>,
    /// Log lines as human-readable text or as one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "RINGTUNNEL_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: crate::logging::LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Heartbeat flags, the same for relay and agent: how fast a silent peer (a cut link, a
/// frozen process) is noticed.
#[derive(Debug, Clone, Args)]
pub struct HeartbeatArgs {
    /// Seconds of quiet after which a heartbeat is sent on the control connection
    /// (heartbeat_interval_secs) [default: 5].
    #[arg(long = "heartbeat", value_name = "SECS")]
    pub interval: Option<u64>,
    /// Seconds of silence from the peer after which the control connection is dropped
    /// (heartbeat_timeout_secs); more than --heartbeat; raise it on links that lose more than
    /// a tenth of their packets [default: 15].
    #[arg(long = "heartbeat-timeout", value_name = "SECS")]
    pub timeout: Option<u64>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the public relay (on the VPS).
    #[command(after_help = RELAY_EXAMPLES)]
    Relay(Box<RelayArgs>),
    /// Run an agent next to a service (behind NAT).
    #[command(after_help = AGENT_EXAMPLES)]
    Agent(Box<AgentArgs>),
    /// Run relay, agent and a small origin on loopback, and print the public address.
    Demo(DemoArgs),
    /// Print a running relay's services and agents (from its admin endpoint).
    #[command(after_help = STATUS_EXAMPLES)]
    Status(StatusArgs),
    /// Print a shell completion script.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions(CompletionsArgs),
    /// Print the man page, or write one per command into a directory.
    #[command(after_help = MAN_EXAMPLES)]
    Man(ManArgs),
    /// Hash a password for basic auth in relay.toml (asked twice at a terminal, without echo;
    /// otherwise the first line of stdin).
    #[command(after_help = HASH_PASSWORD_EXAMPLES)]
    HashPassword,
}

const HASH_PASSWORD_EXAMPLES: &str = "Examples:
  ringtunnel hash-password            # asks twice, without echo
  printf '%s\\n' \"$PASSWORD\" | ringtunnel hash-password
Put the printed hash in relay.toml:
  [[service]]
  name = \"web\"
  [service.access.basic_auth]
  users = { alice = \"$argon2id$v=19$m=19456,t=2,p=1$...\" }";

const COMPLETIONS_EXAMPLES: &str = "Examples:
  ringtunnel completions bash > /etc/bash_completion.d/ringtunnel
  ringtunnel completions zsh > \"${fpath[1]}/_ringtunnel\"
  ringtunnel completions fish > ~/.config/fish/completions/ringtunnel.fish";

const MAN_EXAMPLES: &str = "Examples:
  ringtunnel man | man -l -
  ringtunnel man --dir /usr/local/share/man/man1   # ringtunnel.1, ringtunnel-relay.1, ...";

/// `ringtunnel completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `ringtunnel man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write `ringtunnel.1` and one page per subcommand (`ringtunnel-relay.1`, ...) here
    /// instead of printing `ringtunnel.1`.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "ringtunnel", out);
}

/// Writes the man pages: `ringtunnel.1` to `out`, or, with `dir`, every page into `dir`.
pub fn man_pages(
    dir: Option<&std::path::Path>,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    match dir {
        Some(dir) => clap_mangen::generate_to(cmd, dir),
        None => clap_mangen::Man::new(cmd).render(out),
    }
}

const STATUS_EXAMPLES: &str = "Examples:
  # On the VPS, with the relay started with --admin 127.0.0.1:7844:
  ringtunnel status

  # An admin endpoint behind a token:
  RINGTUNNEL_ADMIN_TOKEN=... ringtunnel status --admin 127.0.0.1:9000

  # Take service web out of rotation (visitors in flight finish), then put it back:
  ringtunnel status --drain web
  ringtunnel status --resume web

  # A health check (exit status 0 when the relay serves):
  ringtunnel status --health";

/// `ringtunnel status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The relay's admin endpoint (its --admin).
    #[arg(long, default_value = "127.0.0.1:7844")]
    pub admin: SocketAddr,
    /// The admin endpoint's bearer token (its --admin-token).
    #[arg(long, env = "RINGTUNNEL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// First drain this service: new visitors are refused, those in flight finish.
    #[arg(long, value_name = "SERVICE", conflicts_with = "resume")]
    pub drain: Option<String>,
    /// First end the drain of this service.
    #[arg(long, value_name = "SERVICE")]
    pub resume: Option<String>,
    /// Only ask `/health`: print `ok` and exit 0 if the relay serves, else say why and exit 1
    /// (a container's or a supervisor's health check).
    #[arg(long, conflicts_with_all = ["drain", "resume"])]
    pub health: bool,
}

/// `ringtunnel relay`.
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// Address agents connect to (control and data connections) [default: 0.0.0.0:7843].
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// Shared secret agents authenticate with (never sent over the wire). Visible in `ps`:
    /// prefer RINGTUNNEL_SECRET or --secret-file.
    #[arg(long, env = "RINGTUNNEL_SECRET", hide_env_values = true)]
    pub secret: Option<Secret>,
    /// Read the shared secret from this file's first line.
    #[arg(long, conflicts_with = "secret")]
    pub secret_file: Option<PathBuf>,
    /// Address public service ports bind to [default: 0.0.0.0].
    #[arg(long)]
    pub bind_addr: Option<IpAddr>,
    /// Public ports the relay may hand out, START-END [default: 20000-29999].
    #[arg(long)]
    pub port_range: Option<PortRange>,
    /// TLS on data connections; `off` only on a private network or for end-to-end TLS traffic
    /// [default: on].
    #[arg(long, value_enum)]
    pub data_tls: Option<Toggle>,
    /// Where the self-signed certificate is kept [default: $XDG_STATE_HOME/ringtunnel or
    /// ~/.local/state/ringtunnel].
    #[arg(long, env = "RINGTUNNEL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// PEM certificate chain to use instead of a self-signed one (needs --key).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Data-plane backend [default: auto: uring where io_uring works, else tokio].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Data-plane worker threads [default: one per core].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Control-connection liveness.
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// Shared HTTP port: `http` services are routed here by Host header.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Shared TLS port: `tls` services are routed here by SNI, without decrypting.
    #[arg(long)]
    pub tls: Option<SocketAddr>,
    /// The shared TLS port, also terminating HTTPS for `http` services with certificates
    /// from an ACME CA; `tls` services still pass through.
    #[arg(long)]
    pub https: Option<SocketAddr>,
    /// ACME directory URL [default: Let's Encrypt's].
    #[arg(long, requires = "https")]
    pub acme_directory: Option<String>,
    /// Contact address for the ACME account (expiry notices).
    #[arg(long, requires = "https")]
    pub acme_email: Option<String>,
    /// Extra root certificate (PEM) the ACME directory's own certificate is checked against
    /// (a private or test CA).
    #[arg(long, requires = "https")]
    pub acme_ca_file: Option<PathBuf>,
    /// The ACME challenge answered: http-01 (on --http; the default with it) or tls-alpn-01
    /// (on the --https port itself; the default without --http).
    #[arg(long, requires = "https", value_parser = ["http-01", "tls-alpn-01"])]
    pub acme_challenge: Option<String>,
    /// Domain for bare host names: `--http-host blog` becomes `blog.DOMAIN`.
    #[arg(long)]
    pub domain: Option<String>,
    /// Join a fleet of relays sharing one namespace: etcd://HOST:PORT[,HOST:PORT...], or
    /// etcds://... for etcd over TLS.
    #[arg(long, value_name = "URL")]
    pub registry: Option<String>,
    /// Extra CA certificates (PEM) to check an etcds:// registry's certificate against.
    #[arg(long, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd started with --client-cert-auth.
    #[arg(long, value_name = "FILE", requires = "registry_key")]
    pub registry_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "registry_cert")]
    pub registry_key: Option<PathBuf>,
    /// etcd user, when etcd's authentication is on (password: RINGTUNNEL_REGISTRY_PASSWORD
    /// or --registry-password-file).
    #[arg(long, value_name = "NAME")]
    pub registry_user: Option<String>,
    /// The etcd user's password. Visible in `ps`: prefer --registry-password-file.
    #[arg(
        long,
        env = "RINGTUNNEL_REGISTRY_PASSWORD",
        hide_env_values = true,
        hide = true
    )]
    pub registry_password: Option<Secret>,
    /// Read the etcd user's password from this file's first line.
    #[arg(long, value_name = "FILE", conflicts_with = "registry_password")]
    pub registry_password_file: Option<PathBuf>,
    /// This relay's name in the fleet [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub relay_id: Option<String>,
    /// Where agents reach this relay's control port, as the fleet records it
    /// [default: the control address].
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Key prefix in etcd [default: /ringtunnel/].
    #[arg(long, value_name = "PREFIX")]
    pub registry_prefix: Option<String>,
    /// Seconds a fleet claim outlives the last relay renewing it [default: 10].
    #[arg(long, value_name = "SECS")]
    pub registry_ttl: Option<u64>,
    /// Admin endpoint (`/health`, `/metrics`), e.g. 127.0.0.1:7844; off unless given.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Bearer token the admin endpoint requires (required beyond loopback).
    #[arg(long, env = "RINGTUNNEL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// Seconds a stopping relay (SIGTERM, SIGINT) lets visitors in flight finish before it
    /// cuts them; a second signal cuts them at once (drain_timeout_secs) [default: 30].
    #[arg(long = "drain-timeout", value_name = "SECS")]
    pub drain_timeout: Option<u64>,
    /// Log one line per visitor: service, address, bytes each way, duration, how it ended
    /// (access_log; or name the target in the filter: --log info,access=info).
    #[arg(long)]
    pub access_log: bool,
    /// TOML config file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl RelayArgs {
    /// Merges flags over the config file over defaults, and validates the result.
    pub fn into_config(self) -> Result<RelayConfig, ConfigError> {
        let file: RelayFile = match &self.config {
            Some(p) => config::load_file(p)?,
            None => RelayFile::default(),
        };
        let cert = match (self.cert.or(file.cert), self.key.or(file.key)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "cert and key must be given together".into(),
                ))
            }
        };
        let http = self.http.or(file.http);
        let (tls, https) = HttpsConfig::from_parts(
            self.https.or(file.https),
            self.tls.or(file.tls),
            http,
            self.acme_directory.or(file.acme_directory),
            self.acme_email.or(file.acme_email),
            self.acme_ca_file.or(file.acme_ca_file),
            self.acme_challenge.or(file.acme_challenge),
        )?;
        let control = self
            .control
            .or(file.control)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], DEFAULT_CONTROL_PORT)));
        let fleet = match self.registry.or(file.registry) {
            None => None,
            Some(registry) => Some(config::FleetConfig {
                registry,
                relay_id: match self.relay_id.or(file.relay_id) {
                    Some(id) => id,
                    None => config::fleet::host_name()?,
                },
                advertise: self
                    .advertise
                    .or(file.advertise)
                    .unwrap_or_else(|| control.to_string()),
                prefix: self
                    .registry_prefix
                    .or(file.registry_prefix)
                    .unwrap_or_else(|| config::fleet::DEFAULT_PREFIX.to_string()),
                ttl: self
                    .registry_ttl
                    .or(file.registry_ttl_secs)
                    .map_or(config::fleet::DEFAULT_TTL, std::time::Duration::from_secs),
                access: config::fleet::RegistryAccess {
                    ca: self.registry_ca.or(file.registry_ca),
                    cert: self.registry_cert.or(file.registry_cert),
                    key: self.registry_key.or(file.registry_key),
                    user: self.registry_user.or(file.registry_user),
                    password: match (self.registry_password, &self.registry_password_file) {
                        (Some(p), _) => Some(p),
                        (None, Some(path)) => Some(Secret::from_file(path)?),
                        (None, None) => file.registry_password,
                    },
                },
            }),
        };
        let cfg = RelayConfig {
            control,
            secret: match (self.secret, &self.secret_file) {
                (Some(s), _) => Some(s),
                (None, Some(path)) => Some(Secret::from_file(path)?),
                (None, None) => file.secret,
            },
            service_secrets: file.services,
            bind_addr: self
                .bind_addr
                .or(file.bind_addr)
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port_range: self.port_range.or(file.port_range).unwrap_or_default(),
            data_tls: self
                .data_tls
                .or(file.data_tls)
                .unwrap_or(Toggle::On)
                .enabled(),
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(config::default_state_dir),
            cert,
            backend: self.backend.or(file.backend).unwrap_or_default(),
            workers: self.workers.or(file.workers),
            heartbeat: Heartbeat::from_secs(
                self.heartbeat.interval.or(file.heartbeat_interval_secs),
                self.heartbeat.timeout.or(file.heartbeat_timeout_secs),
            )?,
            front: FrontConfig::from_parts(
                http,
                tls,
                self.domain.or(file.domain),
                file.max_head_bytes,
                file.head_timeout_secs,
                file.agent_wait_secs,
                file.trusted_proxies,
            )?,
            limits: file.limits.over(&config::Limits::public_defaults()),
            access: file.access,
            admin: self.admin.or(file.admin),
            admin_token: self.admin_token.or(file.admin_token),
            drain_timeout: self.drain_timeout.or(file.drain_timeout_secs).map_or(
                config::DEFAULT_DRAIN_TIMEOUT,
                std::time::Duration::from_secs,
            ),
            log: file.log,
            access_log: self.access_log || file.access_log.unwrap_or(false),
            https,
            fleet,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `ringtunnel agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Relay control address, HOST[:PORT] (default port 7843); several, comma-separated,
    /// for a fleet of relays: the agent keeps a session with each. Required unless --config
    /// names it.
    #[arg(long, required_unless_present = "config")]
    pub relay: Option<String>,
    /// Shared secret (never sent over the wire). Visible in `ps`: prefer RINGTUNNEL_SECRET or
    /// --secret-file.
    #[arg(long, env = "RINGTUNNEL_SECRET", hide_env_values = true)]
    pub secret: Option<Secret>,
    /// Read the shared secret from this file's first line.
    #[arg(long, conflicts_with = "secret")]
    pub secret_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the relay certificate, as the relay printed it.
    #[arg(long, env = "RINGTUNNEL_RELAY_FINGERPRINT")]
    pub relay_fingerprint: Option<Fingerprint>,
    /// Extra CA certificates (PEM) to trust for a CA-signed relay certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Reach the relay through this HTTP proxy (CONNECT), http://[USER:PASSWORD@]HOST[:PORT].
    /// Default: HTTPS_PROXY, unless NO_PROXY names the relay's host.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// Local service to publish, HOST:PORT. Required unless --config lists services.
    #[arg(long, required_unless_present = "config")]
    pub local: Option<String>,
    /// Public port to ask for (default: the relay picks one from its range).
    #[arg(long, requires = "local", conflicts_with_all = ["http_host", "tls_host"])]
    pub remote_port: Option<u16>,
    /// Publish as a `udp` service: a public UDP port (--remote-port, or one the relay picks)
    /// whose datagrams reach the local UDP service at --local, a flow per visitor address.
    #[arg(long, requires = "local", conflicts_with_all = ["http_host", "tls_host", "proxy_protocol"])]
    pub udp: bool,
    /// Publish as an `http` service on the relay's shared HTTP port under this host name
    /// (repeatable; a name without a dot is a subdomain of the relay's --domain).
    #[arg(long, requires = "local", conflicts_with = "tls_host")]
    pub http_host: Vec<String>,
    /// Publish as a `tls` service on the relay's shared TLS port for this SNI name
    /// (repeatable); the local service terminates TLS itself.
    #[arg(long, requires = "local")]
    pub tls_host: Vec<String>,
    /// With --http-host: only requests under this path prefix (longest prefix wins).
    #[arg(long, requires = "http_host")]
    pub path: Option<String>,
    /// PROXY protocol header sent to the local service before each visitor's bytes.
    #[arg(long, value_enum, requires = "local")]
    pub proxy_protocol: Option<ProxyArg>,
    /// With --http-host: do not add X-Forwarded-For / X-Forwarded-Proto / Forwarded.
    #[arg(long, requires = "http_host")]
    pub no_forwarded_headers: bool,
    /// Service name (default: HOSTNAME-LOCALPORT).
    #[arg(long, requires = "local")]
    pub name: Option<String>,
    /// Idle data connections to keep open for the service [default: 4].
    #[arg(long, requires = "local")]
    pub pool: Option<u8>,
    /// Serve the service together with every other agent started with the same --group
    /// (and secret): the relay spreads visitors over them, fewest visitors first, and moves
    /// new ones to the rest when one goes. Without it, a second agent takes the service over.
    #[arg(long, value_name = "NAME", requires = "local")]
    pub group: Option<String>,
    /// Data-plane backend [default: auto].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// io_uring worker threads carrying data connections (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Control-connection liveness.
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// Seconds a stopping agent (SIGTERM, SIGINT) lets the visitors it serves finish, after
    /// telling the relay to route it no new ones; a second signal stops it at once
    /// (drain_timeout_secs) [default: 30].
    #[arg(long = "drain-timeout", value_name = "SECS")]
    pub drain_timeout: Option<u64>,
    /// TOML config file with `[[service]]` tables; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl AgentArgs {
    /// Merges flags over the config file over defaults, and validates the result: the
    /// settings for the first relay given.
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        self.into_config_for(0)
    }

    /// How many relays are given (`--relay A,B,C`: three).
    pub fn relay_count(&self) -> Result<usize, ConfigError> {
        Ok(self.relays()?.len())
    }

    fn relays(&self) -> Result<Vec<String>, ConfigError> {
        let file: AgentFile = match &self.config {
            Some(p) => config::load_file(p)?,
            None => AgentFile::default(),
        };
        let relay = self.relay.clone().or(file.relay).ok_or_else(|| {
            ConfigError::Invalid("no relay given: pass --relay HOST[:PORT]".into())
        })?;
        let list: Vec<String> = relay
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if list.is_empty() {
            return Err(ConfigError::Invalid(
                "no relay given: pass --relay HOST[:PORT]".into(),
            ));
        }
        for (i, r) in list.iter().enumerate() {
            if list[..i].contains(r) {
                return Err(ConfigError::Invalid(format!("relay {r} is given twice")));
            }
        }
        Ok(list)
    }

    /// [`Self::into_config`] for the `index`th relay given.
    pub fn into_config_for(self, index: usize) -> Result<AgentConfig, ConfigError> {
        let relays = self.relays()?;
        let relay = relays.get(index).ok_or_else(|| {
            ConfigError::Invalid(format!("relay number {} is no longer given", index + 1))
        })?;
        let file: AgentFile = match &self.config {
            Some(p) => config::load_file(p)?,
            None => AgentFile::default(),
        };
        let (relay_host, relay_port) = config::parse_host_port(relay, Some(DEFAULT_CONTROL_PORT))?;
        let relay_fingerprint = match (self.relay_fingerprint, file.relay_fingerprint) {
            (Some(fp), _) => Some(fp),
            (None, Some(s)) => Some(s.parse().map_err(
                |e: crate::tls::fingerprint::BadFingerprint| ConfigError::Invalid(e.to_string()),
            )?),
            (None, None) => None,
        };
        let mut services = file.services;
        if let Some(local) = self.local {
            let name = match self.name {
                Some(n) => n,
                None => default_name(&local),
            };
            let mut svc = ServiceConfig::tcp(name, local);
            svc.remote_port = self.remote_port;
            svc.pool = self.pool.unwrap_or(DEFAULT_POOL);
            svc.group = self.group;
            if self.udp {
                svc.kind = ServiceKind::Udp;
            } else if !self.http_host.is_empty() {
                svc.kind = ServiceKind::Http;
                svc.hosts = self.http_host;
            } else if !self.tls_host.is_empty() {
                svc.kind = ServiceKind::Tls;
                svc.hosts = self.tls_host;
            }
            svc.path = self.path;
            svc.forwarded_headers = !self.no_forwarded_headers;
            svc.proxy_protocol = match self.proxy_protocol {
                None | Some(ProxyArg::Off) => ProxyVersion::Off,
                Some(ProxyArg::V1) => ProxyVersion::V1,
                Some(ProxyArg::V2) => ProxyVersion::V2,
            };
            services.push(svc);
        }
        let proxy = AgentConfig::pick_proxy(self.proxy.or(file.proxy), &relay_host, |k| {
            std::env::var(k).ok()
        })?;
        let cfg = AgentConfig {
            relay_host,
            relay_port,
            secret: match (self.secret, &self.secret_file) {
                (Some(s), _) => Some(s),
                (None, Some(path)) => Some(Secret::from_file(path)?),
                (None, None) => file.secret,
            },
            relay_fingerprint,
            ca: self.ca.or(file.ca),
            proxy,
            services,
            backend: self.backend.or(file.backend).unwrap_or_default(),
            workers: self.workers.or(file.workers),
            heartbeat: Heartbeat::from_secs(
                self.heartbeat.interval.or(file.heartbeat_interval_secs),
                self.heartbeat.timeout.or(file.heartbeat_timeout_secs),
            )?,
            drain_timeout: self.drain_timeout.or(file.drain_timeout_secs).map_or(
                config::DEFAULT_DRAIN_TIMEOUT,
                std::time::Duration::from_secs,
            ),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `--proxy-protocol` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyArg {
    /// No header.
    Off,
    /// PROXY protocol version 1 (text).
    V1,
    /// PROXY protocol version 2 (binary).
    V2,
}

/// `HOSTNAME-PORT` from the machine's host name and the local port, reduced to the characters
/// service names allow. Unique per machine and port, so two agents rarely collide by default.
fn default_name(local: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let port = local.rsplit(':').next().unwrap_or("0");
    if host.is_empty() {
        format!("svc-{port}")
    } else {
        format!("{host}-{port}")
    }
}

/// `ringtunnel demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Make one request through the tunnel, print the answer, and exit (a self-check).
    #[arg(long)]
    pub once: bool,
    /// Plain TCP data connections instead of TLS.
    #[arg(long, value_enum, default_value = "on")]
    pub data_tls: Toggle,
}
