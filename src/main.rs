//! The `slb` command line: `run`, `check`, `status`. Parses arguments, sets up logging
//! and the runtime, and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use slb::config::{self, Config, Protocol};

/// mimalloc rather than glibc malloc: tokio aligns every task and every
/// socket registration to 128 bytes, and glibc's aligned allocations waste
/// about 40% on top of them (measured with massif and RSS: 1.8 KB per idle
/// connection for 1.3 KB asked for); mimalloc's size classes are aligned.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "slb", version, about = "A layer-4 (TCP and UDP) load balancer", long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer. Logs go to stderr; the filter comes from
    /// RUST_LOG (default "info"; e.g. "info,slb::access=off" silences the access log).
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "conf/slb.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration file and print a summary, like `nginx -t`.
    /// Exits 0 if it is valid, 1 with the error if not.
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = "conf/slb.yaml")]
        config: PathBuf,
    },
    /// Show every listener and its backends with live counters, like
    /// `ipvsadm -ln --stats`, from a running slb's admin server.
    Status {
        /// The admin server (`admin.listen` in the configuration).
        #[arg(long, default_value = config::DEFAULT_ADMIN)]
        admin: String,
        /// Refresh every second, like `watch`.
        #[arg(long)]
        watch: bool,
        /// Print the raw `/status` JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Status { admin, watch, json } => slb::status::cli::run(&admin, watch, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(path: &std::path::Path) -> Result<()> {
    let config = config::load(path)?;
    print!("{}", summary(&config));
    println!("configuration file {} is valid", path.display());
    Ok(())
}

/// A one-screen summary of listeners and their groups.
fn summary(c: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "admin: {}", c.admin.listen);
    for l in &c.listeners {
        let proto = match l.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let health = match &l.health_check {
            Some(h) => format!(
                "health {:?} every {} (timeout {}, rise {}, fall {}{})",
                h.kind,
                humantime::format_duration(h.interval),
                humantime::format_duration(h.timeout),
                h.healthy_threshold,
                h.unhealthy_threshold,
                h.port.map(|p| format!(", port {p}")).unwrap_or_default()
            ),
            None => "health off".into(),
        };
        let persist = match &l.session_persistence {
            Some(p) => format!("persistence {}", humantime::format_duration(p.timeout)),
            None => "persistence off".into(),
        };
        let mut capacity = String::new();
        if let Some(q) = &l.queue {
            let t = humantime::format_duration(q.timeout);
            let _ = write!(capacity, ", queue {} (timeout {t})", q.size);
        }
        if let Some(d) = l.slow_start {
            let _ = write!(capacity, ", slow start {}", humantime::format_duration(d));
        }
        let _ = writeln!(
            s,
            "listener {:?}: {proto} {} -> group {:?}, scheduler {}, {health}, {persist}, max {} connections{capacity}",
            l.name,
            l.listen,
            l.backend_group,
            l.scheduler.as_str(),
            l.max_connections
        );
        for b in &l.backends {
            let slots = b
                .max_connections
                .map(|m| format!(", {m} slots"))
                .unwrap_or_default();
            let _ = writeln!(s, "    backend {} weight {}{slots}", b.address, b.weight);
        }
        if l.backends.is_empty() {
            let _ = writeln!(s, "    (no backends)");
        }
    }
    for g in &c.empty_groups {
        let _ = writeln!(s, "warning: backend group {g:?} is empty");
    }
    s
}

fn run(path: &std::path::Path) -> Result<()> {
    let config = config::load(path)?;
    for g in &config.empty_groups {
        warn!(group = %g, "backend group is empty");
    }
    raise_fd_limit();
    // One worker: tokio's current-thread scheduler, which runs everything on
    // this thread with less bookkeeping per wake-up than a one-worker
    // multi-thread runtime. Two A/B runs of scripts/bench-compare (5 and 7
    // repetitions, medians of per-repetition ratios): CPU per request 0.89x
    // and 0.99x on 50 connections, 0.96x and 0.95x on one; per connection
    // 0.98x and 0.92x; per UDP round trip 0.94x and 0.98x; latency no worse.
    let mut rt = match config.runtime.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.worker_threads(n);
            rt
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt.enable_all().build().context("cannot start the runtime")?;
    rt.block_on(async {
        let server = slb::Server::bind(&config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(wait_for_signals(shutdown.clone()));
        info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "slb started");
        server.run(shutdown).await
    })
}

/// Cancel `shutdown` on the first SIGINT/SIGTERM; exit at once on the second.
async fn wait_for_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
    info!("signal received: shutting down (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
    warn!("second signal: exiting now");
    std::process::exit(1);
}

/// Raise the soft open-file limit to the hard limit and log the ceiling
/// (two descriptors per proxied TCP connection).
fn raise_fd_limit() {
    let open_files = slb::sys::raise_fd_limit();
    info!(
        open_files,
        max_tcp_connections = open_files.saturating_sub(64) / 2,
        "file descriptor limit"
    );
}
