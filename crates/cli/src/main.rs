//! The `meridian` binary: a node (`server`), the whole planet in one process (`demo`), the
//! benchmark (`bench`), and the command-line client for the public API.

mod commands;
mod conflicts;
mod demo;
mod policy;
mod run;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Meridian: a geo-distributed data store with differential replication",
    long_about = "Meridian: a geo-distributed data store with differential replication.\n\n\
        Start here:\n  meridian demo                      # nine nodes, three regions, one process\n  \
        meridian put users u1 '{\"name\":\"Ada\"}'\n  meridian get users u1\n  meridian cluster status\n\n\
        Client commands talk to --endpoint (or $MERIDIAN_ENDPOINT), default http://127.0.0.1:7000.\n\
        They print tables or plain values, JSON with --json, and exit non-zero with the error's code on failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct ClientOpts {
    /// Base URL of any node's API.
    #[arg(long, global = true, env = "MERIDIAN_ENDPOINT", default_value = "http://127.0.0.1:7000")]
    pub endpoint: String,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up on a request after this many seconds.
    #[arg(long, global = true, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout_secs: u64,
    /// For user-homed datasets: the key's home region, when the key has no `region/` prefix.
    /// Give the same one on every request for that key (it is stored only there).
    #[arg(long, global = true)]
    pub home: Option<String>,
    /// Send this session token (the Meridian-Session of an earlier answer), so that a
    /// `--consistency session` read sees what that session wrote and read, in any region.
    /// The answer's token is printed on stderr.
    #[arg(long, global = true, env = "MERIDIAN_SESSION")]
    pub session: Option<String>,
    /// Carry the session in this file: send the token it holds (if it exists), and write
    /// the answer's token back after each get, put, delete, list and op.
    #[arg(long, global = true, conflicts_with = "session")]
    pub session_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node of a cluster described by a configuration file.
    Server {
        /// The cluster configuration (TOML): regions, nodes, WAN delays, limits.
        #[arg(long)]
        config: PathBuf,
        /// Which node of the configuration this process is.
        #[arg(long)]
        node: u64,
        /// Where this node keeps its Raft log and state (default ./data/node-ID).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Record every message body this node exchanges with other regions under this
        /// directory (DIR/node-ID.wire), for residency audits. Costs a file write per message.
        #[arg(long, value_name = "DIR")]
        wire_capture: Option<PathBuf>,
    },
    /// Run a whole demo cluster in one process: three regions of three zones, nine nodes.
    Demo {
        /// The first node's API port; the others follow in order, peers at +100.
        #[arg(long, default_value_t = 7000, value_parser = clap::value_parser!(u16).range(1024..=65000))]
        base_port: u16,
        /// Keep data here instead of a temporary directory (reused on the next start).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Record every message body crossing a region boundary under this directory (one
        /// file per node), for residency audits.
        #[arg(long, value_name = "DIR")]
        wire_capture: Option<PathBuf>,
        /// A clock-skew drill: run REGION's nodes with their wall clock moved by MS
        /// milliseconds (negative: behind), up to a minute either way. Repeatable.
        #[arg(long, value_name = "REGION=MS", value_parser = demo::parse_skew, allow_hyphen_values = true)]
        clock_skew: Vec<(String, i64)>,
    },
    /// Store a JSON value under a key.
    Put {
        dataset: String,
        key: String,
        /// The value, as JSON text (a string needs its quotes: '"text"').
        value: String,
        /// Write only if the key's current version (ETag) is this one.
        #[arg(long, conflicts_with = "create_only")]
        if_match: Option<String>,
        /// Write only if the key holds no value.
        #[arg(long)]
        create_only: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Read a key's value.
    Get {
        dataset: String,
        key: String,
        /// strong (linearizable, via a home region's leader), bounded (as stale as the dataset's
        /// max_staleness allows), session (sees what the session of --session or
        /// --session-file wrote and read), local (the node asked, if its region holds a copy,
        /// else the nearest copy) or eventual (the nearest copy). Default: the dataset's
        /// `consistency` in the policy (itself strong unless the policy says otherwise).
        #[arg(long)]
        consistency: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Delete a key.
    Delete {
        dataset: String,
        key: String,
        /// Delete only if the key's current version (ETag) is this one.
        #[arg(long)]
        if_match: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List a dataset's keys in order.
    List {
        dataset: String,
        #[arg(long)]
        prefix: Option<String>,
        /// Keys per page (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue from a previous page's cursor.
        #[arg(long)]
        cursor: Option<String>,
        /// As for `get`; default: the dataset's `consistency` in the policy.
        #[arg(long)]
        consistency: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// An operation on a counter, set or map key: increment|decrement [AMOUNT],
    /// add|remove MEMBER..., set FIELD=JSON..., delete FIELD...
    ///
    /// Datasets with kind counter, set or map merge concurrent operations from every home by
    /// their kind's laws; a plain `put` on them is refused.
    #[command(after_help = "Examples:\n  meridian op carts c1 add lamp desk\n  meridian op carts c1 remove lamp\n  \
        meridian op visits home increment 3\n  meridian op settings u1 set theme='\"dark\"' size=12")]
    Op {
        dataset: String,
        key: String,
        /// increment, decrement, add, remove, set or delete.
        op: String,
        args: Vec<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Conflict records: where concurrent versions of a key met in a region, and how its rule
    /// resolved them. List, show, and resolve them.
    Conflicts {
        #[command(subcommand)]
        command: conflicts::ConflictsCommand,
    },
    /// Cluster-wide information.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Policy documents: check them offline; against a cluster, plan, apply, list, show, roll back
    /// and explain them.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Cross-region replication: every link, how far it is acknowledged, how far behind.
    Replication {
        #[command(subcommand)]
        command: ReplicationCommand,
    },
    /// Inject faults between regions, cluster-wide: cut a pair apart, heal it, or delay it.
    ///
    /// Faults live in every node's peer transport (in memory: a restarted node has none) and
    /// touch only messages between different regions. For drills and tests.
    Chaos {
        #[command(subcommand)]
        command: ChaosCommand,
    },
    /// Region failover: which regions stand in for unreachable homes, and their history.
    /// A dataset with `failover.order` fails over by itself once every home has been down
    /// for `[failover] promote_after_ms`; these commands show it and let an operator act.
    Failover {
        #[command(subcommand)]
        command: FailoverCommand,
    },
    /// Benchmark against etcd (needs Debian's etcd-server): in-region writes against a
    /// three-member cluster, or with `lag`, cross-region lag against `etcdctl make-mirror`;
    /// with `bytes`, cross-region bytes under a selective policy against an allow-all one.
    Bench(BenchArgs),
}

#[derive(Subcommand)]
enum ReplicationCommand {
    /// One row per link (source -> destination): acknowledged sequence, lag in changes, the
    /// policy epoch backfilled; then per region what it received, repaired and purged.
    Status {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Prove convergence: compare every pair of regions' copies by digest, over what the
    /// policy lets both hold. Exits with status 1 unless every pair matched.
    Verify {
        /// Compare only this dataset.
        #[arg(long)]
        dataset: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum FailoverCommand {
    /// Every region's promotions (active and ended) and the newest entries of its history.
    Status {
        /// History entries per region (at most 1000).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=1000))]
        events: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Promote REGION (one of DATASET's failover.order) to take DATASET's writes. Without
    /// --force, every home must be marked down and REGION's lag within the dataset's rpo.
    /// An operator's promotion stays until `meridian failover end`.
    Promote {
        dataset: String,
        region: String,
        /// Promote even if a home still answers or the lag is over the rpo: writes the home
        /// took that REGION lacks will meet REGION's as conflicts when the home returns.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// End REGION's promotion for DATASET: it stops taking the dataset's writes.
    End {
        dataset: String,
        region: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum ChaosCommand {
    /// Show the faults the node asked is applying.
    Status {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cut every message between two regions (calls fail at once as unreachable).
    Partition {
        region_a: String,
        region_b: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Clear the faults between two regions, or every fault when no region is named.
    Heal {
        #[arg(requires = "region_b")]
        region_a: Option<String>,
        region_b: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Set the delay, jitter and message loss between two regions (replacing their faults).
    Delay {
        region_a: String,
        region_b: String,
        /// One-way delay in milliseconds, replacing the configured one.
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        ms: Option<u64>,
        /// Up to this much extra one-way delay per message, in milliseconds.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        jitter_ms: u64,
        /// Share of messages lost, 0 to 100.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        loss_percent: u8,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file offline (TOML, or YAML for .yaml/.yml) and print its version id.
    ///
    /// Reports every problem at once as FILE:LINE:COLUMN: error[RULE]: message, each with a
    /// hint; exits non-zero if there is any. The rules are listed in docs/policy.md.
    Check {
        /// The policy document.
        file: PathBuf,
        /// Check region names against this cluster configuration's topology (without it, names
        /// are checked for form only).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the result as JSON (problems with line, column, rule, message and hint).
        #[arg(long)]
        json: bool,
    },
    /// Show what applying a policy file would change, without changing anything.
    ///
    /// Prints the active and proposed versions, then per dataset the regions that would gain
    /// copies (with the bytes to copy) and lose them (with the bytes to purge), the replication
    /// links opened and closed, and the regions whose sizes could not be read. A document that
    /// breaks rules is reported like `check` does, as FILE:LINE:COLUMN: error[RULE]: message.
    Plan {
        /// The policy document (TOML, or YAML for .yaml/.yml).
        file: PathBuf,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Validate a policy file on the cluster and make it the active version.
    ///
    /// The new entry is recorded in the history by the authority region and copied to the
    /// others; regions not reached yet are listed as pending and catch up in the background.
    /// Run `meridian policy plan FILE` first to see what would move.
    Apply {
        /// The policy document (TOML, or YAML for .yaml/.yml).
        file: PathBuf,
        /// Apply in shadow mode: keys stay governed by the enforced version, and `explain`
        /// shows where the new one would place them.
        #[arg(long, conflicts_with = "enforce")]
        shadow: bool,
        /// Enforce the new version (the default).
        #[arg(long)]
        enforce: bool,
        /// Roll out to this share of keys (1-100, by a stable hash of dataset and key); the
        /// others stay under the enforced version.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
        percent: u8,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List the policy history, newest first: epoch, version, action, mode, share, base, time.
    History {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show the active policy entry and which epoch each region's copy holds.
    Status {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Print a stored version's document as it was written (details go to stderr).
    Show {
        /// A version id, or a unique prefix of at least 8 hex characters.
        version: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Activate an earlier version again, recorded as a new history entry.
    Rollback {
        /// A version id, or a unique prefix of at least 8 hex characters (see `policy history`).
        version: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Explain where a key's copies live under the active policy, and why.
    ///
    /// Prints the governing version and rules, each region's role (home, mirror or none) with
    /// the reason, the replication links with their schedules, and the key's consistency,
    /// conflict, failover, retention, encryption and quarantine settings. Under a shadow
    /// rollout it also shows where the shadow version would place the key.
    Explain {
        /// The dataset.
        dataset: String,
        /// The key (for user-homed keys without a `region/` prefix, add --home REGION).
        key: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Regions, their nodes, leaders, terms and applied indexes.
    Status {
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Concurrent clients per run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Warm-up seconds per run (not measured).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Rounds per concurrency level; each round runs etcd, then Meridian.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// The etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// First port of the range the benchmark's clusters use.
    #[arg(long, default_value_t = 24000)]
    base_port: u16,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A client command piped into `head` stops quietly when the reader goes away, as Unix
    // tools do, instead of panicking on a failed print. Servers, the demo and the benchmarks
    // keep Rust's default (SIGPIPE ignored): a peer closing a socket must be an error on that
    // socket, never the end of the process.
    #[cfg(unix)]
    if !matches!(cli.command, Command::Server { .. } | Command::Demo { .. } | Command::Bench(_)) {
        // SAFETY: restores a signal's default disposition before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,openraft=error,meridian=info,meridian_node=info,meridian_server=info")
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("start the async runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server { config, node, data_dir, wire_capture } => {
                run::server(config, node, data_dir, wire_capture).await
            }
            Command::Demo { base_port, data_dir, wire_capture, clock_skew } => {
                demo::run(base_port, data_dir, wire_capture, clock_skew).await
            }
            Command::Put { dataset, key, value, if_match, create_only, client } => {
                commands::put(&client, &dataset, &key, value, if_match, create_only).await
            }
            Command::Get { dataset, key, consistency, client } => {
                commands::get(&client, &dataset, &key, consistency.as_deref()).await
            }
            Command::Delete { dataset, key, if_match, client } => {
                commands::delete(&client, &dataset, &key, if_match).await
            }
            Command::List { dataset, prefix, limit, cursor, consistency, client } => {
                commands::list(&client, &dataset, prefix, limit, cursor, consistency.as_deref()).await
            }
            Command::Op { dataset, key, op, args, client } => conflicts::op(&client, &dataset, &key, &op, &args).await,
            Command::Conflicts { command } => conflicts::conflicts(command).await,
            Command::Cluster { command: ClusterCommand::Status { client } } => commands::cluster_status(&client).await,
            Command::Policy { command } => match command {
                PolicyCommand::Check { file, config, json } => policy::check(&file, config.as_deref(), json),
                PolicyCommand::Plan { file, client } => policy::plan(&client, &file).await,
                PolicyCommand::Apply { file, shadow, enforce: _, percent, client } => {
                    policy::apply(&client, &file, shadow, percent).await
                }
                PolicyCommand::History { client } => policy::history(&client).await,
                PolicyCommand::Status { client } => policy::status(&client).await,
                PolicyCommand::Show { version, client } => policy::show(&client, &version).await,
                PolicyCommand::Rollback { version, client } => policy::rollback(&client, &version).await,
                PolicyCommand::Explain { dataset, key, client } => {
                    policy::explain(&client, &dataset, &key, client.home.as_deref()).await
                }
            },
            Command::Replication { command: ReplicationCommand::Verify { dataset, client } } => {
                commands::replication_verify(&client, dataset.as_deref()).await
            }
            Command::Replication { command: ReplicationCommand::Status { client } } => {
                commands::replication_status(&client).await
            }
            Command::Chaos { command } => match command {
                ChaosCommand::Status { client } => commands::chaos(&client, commands::ChaosOp::Status).await,
                ChaosCommand::Partition { region_a, region_b, client } => {
                    commands::chaos(&client, commands::ChaosOp::Partition(region_a, region_b)).await
                }
                ChaosCommand::Heal { region_a, region_b, client } => {
                    let pair = region_a.zip(region_b);
                    commands::chaos(&client, commands::ChaosOp::Heal(pair)).await
                }
                ChaosCommand::Delay { region_a, region_b, ms, jitter_ms, loss_percent, client } => {
                    let fault = meridian_api::LinkFaultBody {
                        regions: [region_a, region_b],
                        cut: false,
                        delay_ms: ms,
                        jitter_ms,
                        loss_percent,
                    };
                    commands::chaos(&client, commands::ChaosOp::Delay(fault)).await
                }
            },
            Command::Failover { command } => match command {
                FailoverCommand::Status { events, client } => commands::failover_status(&client, events as usize).await,
                FailoverCommand::Promote { dataset, region, force, client } => {
                    commands::failover_promote(&client, &dataset, &region, force).await
                }
                FailoverCommand::End { dataset, region, client } => {
                    commands::failover_end(&client, &dataset, &region).await
                }
            },
            Command::Bench(b) => bench(b).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    Lag(meridian_bench::lag::LagArgs),
    Bytes(meridian_bench::bytes::BytesArgs),
    Merge(meridian_bench::merge::MergeArgs),
    /// In-region failover against etcd: kill -9 the leader of a fresh three-member cluster
    /// and time the first successful write through a follower, trials alternating.
    Failover(meridian_bench::failover::FailoverArgs),
}

async fn bench(b: BenchArgs) -> anyhow::Result<()> {
    match b.command {
        Some(BenchCommand::Lag(args)) => return meridian_bench::lag::run_cli(args).await,
        Some(BenchCommand::Bytes(args)) => return meridian_bench::bytes::run_cli(args).await,
        Some(BenchCommand::Merge(args)) => return meridian_bench::merge::run_cli(args).await,
        Some(BenchCommand::Failover(args)) => return meridian_bench::failover::run_cli(args).await,
        None => {}
    }
    let opts = meridian_bench::BenchOptions {
        concurrency: b.concurrency,
        duration: Duration::from_secs(b.duration_secs),
        warmup: Duration::from_secs(b.warmup_secs),
        rounds: b.rounds,
        value_bytes: b.value_bytes,
        etcd_bin: b.etcd_bin,
        base_port: b.base_port,
        json: b.json,
        ..meridian_bench::BenchOptions::default()
    };
    opts.validate()?;
    let json = opts.json;
    let report = tokio::select! {
        r = meridian_bench::run(opts) => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    };
    meridian_bench::print_report(&report, json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Clap checks argument definitions only when a command runs; this checks every one.
    #[test]
    fn every_command_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
