//! The command line: `chgate proxy | ingest | cdc | config check|push|diff|pull|rollback |
//! passwd | version`.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "chgate", version, about = "A ClickHouse-aware gateway")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CHGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: ClickHouse's HTTP interface with mapped accounts in front of a cluster.
    Proxy {
        /// The config file (TOML).
        #[arg(long, short, env = "CHGATE_CONFIG")]
        config: PathBuf,
    },
    /// Run the ingest sidecar: Kafka topics into ClickHouse, one picked node per batch.
    Ingest {
        /// The ingest config file (TOML).
        #[arg(long, short, env = "CHGATE_INGEST_CONFIG")]
        config: PathBuf,
    },
    /// Capture PostgreSQL changes (logical replication: snapshot, then stream) into Kafka
    /// in Debezium's envelope.
    Cdc {
        /// The capture's config file (TOML).
        #[arg(long, short, env = "CHGATE_CDC_CONFIG")]
        config: PathBuf,
    },
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Hash a client password for a user's `password_hash`. Reads the password from the
    /// terminal (twice), or from standard input with --stdin.
    Passwd {
        /// Read the password from standard input (up to the first newline).
        #[arg(long)]
        stdin: bool,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (a proxy's, an ingest sidecar's or a CDC capture's, told
    /// apart by its sections); print every problem with its key and reason.
    Check {
        file: PathBuf,
        /// Which program the file is for, when its sections do not say.
        #[arg(long, value_enum)]
        kind: Option<ConfigKind>,
    },
    /// Validate FILE's dynamic sections (clusters, users, quotas, upstream, picker) with the
    /// bootstrap file and publish them to its ZooKeeper root as the next version, in one
    /// atomic step. Exit 1 with every problem if anything is invalid.
    Push {
        /// The bootstrap file (with [config_source]).
        #[arg(long, short, env = "CHGATE_CONFIG")]
        config: PathBuf,
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Show what `push` would change, znode by znode.
    Diff {
        #[arg(long, short, env = "CHGATE_CONFIG")]
        config: PathBuf,
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Print the active dynamic config (a file `push` accepts).
    Pull {
        #[arg(long, short, env = "CHGATE_CONFIG")]
        config: PathBuf,
    },
    /// Publish a kept earlier version again; with --list, list the kept versions.
    Rollback {
        #[arg(long, short, env = "CHGATE_CONFIG")]
        config: PathBuf,
        /// The version to restore.
        #[arg(required_unless_present = "list")]
        version: Option<u64>,
        #[arg(long)]
        list: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tune_malloc(&cli.command);
    init_logging(cli.log_format);
    match cli.command {
        Command::Version => {
            println!("chgate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Config {
            command: ConfigCommand::Check { file, kind },
        } => check_config(&file, kind),
        Command::Config { command } => config_zookeeper(command),
        Command::Passwd { stdin } => passwd(stdin),
        Command::Ingest { config } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("chgate-ingest")
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("chgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::ingest::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("chgate ingest: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cdc { config } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("chgate-cdc")
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("chgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::cdc::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("chgate cdc: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Proxy { config } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("chgate-worker")
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("chgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Validate fully (with the dynamic part from ZooKeeper, if that is the source)
            // before binding anything.
            let started = match runtime.block_on(crate::config::source::start(&config)) {
                Ok(s) => s,
                Err(problems) => {
                    print_problems(&config, &problems);
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::proxy::run(config, started)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("chgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `chgate config push | diff | pull | rollback`: one request each to ZooKeeper.
fn config_zookeeper(command: ConfigCommand) -> ExitCode {
    use crate::config::publish;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<Vec<String>, Vec<String>> = runtime.block_on(async {
        match command {
            ConfigCommand::Check { .. } => Ok(Vec::new()),
            ConfigCommand::Push { config, file } => {
                publish::push(&config, &file).await.map(|l| vec![l])
            }
            ConfigCommand::Diff { config, file } => {
                publish::diff(&config, &file).await.map(|lines| {
                    if lines.is_empty() {
                        vec!["no change".to_string()]
                    } else {
                        lines
                    }
                })
            }
            ConfigCommand::Pull { config } => publish::pull(&config).await.map(|t| vec![t]),
            ConfigCommand::Rollback {
                config, list: true, ..
            } => publish::versions(&config).await.map(|(kept, active)| {
                kept.iter()
                    .map(|v| {
                        let mark = if *v == active { "  (active)" } else { "" };
                        format!("{v}{mark}")
                    })
                    .collect()
            }),
            ConfigCommand::Rollback {
                config,
                version: Some(v),
                ..
            } => publish::rollback(&config, v).await.map(|l| vec![l]),
            ConfigCommand::Rollback { version: None, .. } => {
                Err(vec!["give the version to restore, or --list".into()])
            }
        }
    });
    match result {
        Ok(lines) => {
            for l in lines {
                println!("{}", l.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in &problems {
                eprintln!("chgate config: {p}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Which program a config file is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ConfigKind {
    Proxy,
    Ingest,
    Cdc,
}

/// Tells a file's kind by its sections: `[capture]`/`[postgres]` is a capture's, `[tasks]`/
/// `[templates]` a sidecar's, anything else a proxy's (whose check reports a syntax error
/// with its line and column).
fn kind_of(file: &std::path::Path) -> ConfigKind {
    let table = std::fs::read_to_string(file)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .unwrap_or_default();
    if table.contains_key("capture") || table.contains_key("postgres") {
        ConfigKind::Cdc
    } else if table.contains_key("tasks") || table.contains_key("templates") {
        ConfigKind::Ingest
    } else {
        ConfigKind::Proxy
    }
}

/// `chgate config check`: exit 0 with a one-line summary, or 1 with every problem.
fn check_config(file: &std::path::Path, kind: Option<ConfigKind>) -> ExitCode {
    let result = match kind.unwrap_or_else(|| kind_of(file)) {
        ConfigKind::Proxy => crate::config::check(file).map(|v| proxy_summary(&v)),
        ConfigKind::Ingest => crate::ingest::config::check(file).map(|c| {
            let source = match &c.config_source {
                Some(s) => format!(
                    "clusters from ZooKeeper {}{}",
                    s.zookeeper.join(","),
                    s.root
                ),
                None => format!("{} clusters", c.clusters.len()),
            };
            format!("an ingest sidecar's, {} tasks, {source}", c.tasks.len())
        }),
        ConfigKind::Cdc => crate::cdc::config::load(file).map(|v| {
            format!(
                "a CDC capture's, slot {}, {} table patterns",
                v.config.capture.slot,
                v.config.capture.tables.len()
            )
        }),
    };
    match result {
        Ok(summary) => {
            println!("{}: ok ({summary})", file.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            print_problems(file, &problems);
            ExitCode::FAILURE
        }
    }
}

fn proxy_summary(v: &crate::config::Validated) -> String {
    match &v.config.config_source {
        Some(s) => format!(
            "a bootstrap file: clusters and users come from ZooKeeper {}{}",
            s.zookeeper.join(","),
            s.root
        ),
        None => format!(
            "{} users, {} clusters",
            v.config.users.len(),
            v.config.clusters.len()
        ),
    }
}

fn print_problems(file: &std::path::Path, problems: &[crate::config::Problem]) {
    for p in problems {
        eprintln!("{}: {p}", file.display());
    }
    eprintln!(
        "{}: {} problem{} found",
        file.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
}

fn passwd(from_stdin: bool) -> ExitCode {
    let password = if from_stdin || !std::io::stdin().is_terminal() {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            eprintln!("chgate passwd: cannot read standard input: {e}");
            return ExitCode::FAILURE;
        }
        s.lines().next().unwrap_or("").to_string()
    } else {
        let first = rpassword::prompt_password("Password: ");
        let second = rpassword::prompt_password("Again: ");
        match (first, second) {
            (Ok(a), Ok(b)) if a == b => a,
            (Ok(_), Ok(_)) => {
                eprintln!("chgate passwd: the passwords differ");
                return ExitCode::FAILURE;
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("chgate passwd: cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    if password.is_empty() {
        eprintln!("chgate passwd: refusing to hash an empty password");
        return ExitCode::FAILURE;
    }
    match crate::auth::hash_password(&password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chgate passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,zookeeper_client=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// glibc raises its mmap threshold each time a large mmapped block is freed, after which
/// blocks of that size (Argon2's 19 MiB) come from per-thread arenas and stay resident after
/// they are freed. Measured: a burst of logins left the proxy at 650 MiB resident. Fixed
/// thresholds stop that: blocks of 4 MiB and more are always mmapped, so freeing them gives
/// the memory back, while I/O buffers (up to ~400 KiB) stay in the heap and are reused (with
/// a 128 KiB threshold every read buffer of a streamed result was a fresh mapping: ~3,300
/// mmap/munmap pairs and their page faults per GiB).
///
/// The ingest sidecar has no Argon2 but librdkafka's fetch buffers, several MiB each: as
/// fresh mappings every received page was a page fault (233,000 per million ~780-byte
/// messages, a tenth of the sidecar's CPU); kept in the heap, 29,000.
fn tune_malloc(command: &Command) {
    let (mmap, trim) = match command {
        Command::Ingest { .. } => (32 << 20, 128 << 20),
        _ => (4 << 20, 16 << 20),
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (mmap, trim);
}
