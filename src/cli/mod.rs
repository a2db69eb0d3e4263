//! The `tessera` command: a client of Tessera's APIs like any other.
//!
//! Owns: argument parsing, finding the sockets (flags, then `SPIFFE_ENDPOINT_SOCKET` /
//! `TESSERA_ADMIN_SOCKET`, then the same defaults the daemon uses), and output formatting:
//! human tables by default, `--json` for machines.

mod admin;
mod workload;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use tonic::transport::Channel;

use crate::config::Defaults;

/// Tessera command-line client.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about = "Tessera workload-identity CLI")]
pub struct Cli {
    /// Workload API socket: a path or unix:///abs/path.
    #[arg(long, global = true, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: Option<String>,
    /// Admin API socket path.
    #[arg(long, global = true, env = "TESSERA_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// Print JSON instead of human-readable text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch or validate SVIDs (Workload API).
    #[command(subcommand)]
    Svid(SvidCommand),
    /// Show trust bundles (Workload API).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Daemon status (admin API).
    Status,
    /// Registration entries: the inventory (admin API).
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Leases: every credential handed out (admin API).
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Task-scoped credentials: exchange and complete (Workload API, as the agent); complete
    /// --operator and revoke (admin API).
    #[command(subcommand)]
    Task(TaskCommand),
    /// High-risk token exchanges: pending, and decided until used or expired (admin API).
    Approvals,
    /// Approve a pending request; the agent's next identical exchange gets its token, once.
    Approve {
        /// Request id (from `tessera approvals`).
        id: String,
    },
    /// Deny a pending request.
    Deny {
        /// Request id.
        id: String,
    },
    /// Kill switch: revoke everything an identity holds and refuse it new credentials.
    Kill {
        /// The identity; identities under its path are killed too.
        spiffe_id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "killed by operator")]
        reason: String,
    },
    /// Take an identity off the kill list (its revoked credentials stay revoked).
    Restore {
        /// The identity.
        spiffe_id: String,
    },
    /// List killed identities.
    Killed,
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum LeaseCommand {
    /// List leases (active and revoked; expired leases are gone, but a revoked certificate's
    /// stays a day past its expiry, off the CRL from about a minute after it: see EXPIRES).
    List {
        /// Only this identity.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// With --spiffe-id: identities under its path too.
        #[arg(long)]
        prefix: bool,
        /// Only this task: a task id (that id of every agent), or a task's full name
        /// (<agent SPIFFE ID>/task/<task id>).
        #[arg(long)]
        task: Option<String>,
        /// active or revoked.
        #[arg(long)]
        state: Option<String>,
        /// x509-svid, jwt-svid or task-token.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many (default: all).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one lease.
    Show {
        /// Lease id.
        id: String,
    },
    /// Revoke one lease.
    Revoke {
        /// Lease id.
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Exchange a user's or pipeline's OIDC token for a task token, as the calling agent
    /// (tessera.v1.Tasks on the Workload API socket).
    Exchange {
        /// The subject token (or `-` to read it from stdin).
        #[arg(long)]
        subject_token: String,
        /// Its type.
        #[arg(long, default_value = crate::exchange::TOKEN_TYPE_ID_TOKEN)]
        subject_token_type: String,
        /// The tool or API the token is for.
        #[arg(long)]
        audience: String,
        /// A scope; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Task id ([A-Za-z0-9_-], 1 to 128 characters); the agent's own: another agent's
        /// task of the same id is another task.
        #[arg(long)]
        task: String,
        /// Lifetime in seconds, 1 or more (can only shorten the default).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        expires_in: Option<u64>,
        /// Also fetch a task X.509-SVID and write svid.pem, svid.key, bundle.pem here.
        #[arg(long)]
        x509_out: Option<std::path::PathBuf>,
        /// Act as this one of the caller's identities.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Complete a task: revoke all its credentials and refuse it more. As an agent (the
    /// task's owner) over the Workload API, or with --operator over the admin API.
    Complete {
        /// Task id; with --operator, or the task's full name (<agent SPIFFE ID>/task/<task
        /// id>) when several agents used the id.
        task_id: String,
        /// Use the admin API (operators).
        #[arg(long)]
        operator: bool,
        /// As an agent with several identities: which one's task (without --operator).
        #[arg(long, conflicts_with = "operator")]
        spiffe_id: Option<String>,
    },
    /// Revoke every credential of a task.
    Revoke {
        /// Task id, or the task's full name (<agent SPIFFE ID>/task/<task id>) when several
        /// agents used the id.
        task_id: String,
        /// Why.
        #[arg(long, default_value = "task revoked by operator")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain; exits non-zero naming the first bad line.
    Verify {
        /// The audit file (default: the daemon's, in its default data directory). The live
        /// `audit.jsonl` stands for the whole chain, rotated files included; a rotated file
        /// is checked on its own.
        file: Option<PathBuf>,
        /// Check the chain without the head the store recorded (when `tessera.db` cannot be
        /// read): a deleted tail then goes unnoticed.
        #[arg(long)]
        no_store: bool,
        /// A head the daemon logged (`audit chain head`: RECORDS:HASH, from `records=` and
        /// `head=`), kept off the host: the chain must hold it, so a history rewritten in
        /// both the file and the store is caught. Repeatable.
        #[arg(long, value_name = "RECORDS:HASH")]
        anchor: Vec<String>,
    },
}

/// Fields of an entry, for create and update.
#[derive(Debug, Clone, clap::Args)]
struct EntryArgs {
    /// SPIFFE ID granted.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Selector, repeatable (e.g. unix:uid:1000); all must match.
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X.509-SVID lifetime (e.g. 10m).
    #[arg(long)]
    x509_ttl: Option<String>,
    /// JWT-SVID lifetime.
    #[arg(long)]
    jwt_ttl: Option<String>,
    /// Accountable owner.
    #[arg(long)]
    owner: Option<String>,
    /// Purpose.
    #[arg(long)]
    purpose: Option<String>,
    /// low, medium or high.
    #[arg(long)]
    risk: Option<String>,
    /// RFC 3339 time after which the entry grants nothing.
    #[arg(long)]
    expires_at: Option<String>,
    /// Workload API hint.
    #[arg(long)]
    hint: Option<String>,
    /// Longest lifetime of this agent's task credentials (e.g. 10m).
    #[arg(long)]
    max_task_ttl: Option<String>,
}

#[derive(Debug, Subcommand)]
enum SvidCommand {
    /// Fetch X.509-SVIDs; print them, or write svid.pem, svid.key (0600) and bundle.pem to --out.
    X509 {
        /// Directory to write the files to (created if missing).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Fetch a JWT-SVID and print the token on stdout.
    Jwt {
        /// Audience (repeatable).
        #[arg(long, short = 'a', required = true)]
        audience: Vec<String>,
        /// Only this identity.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Validate a JWT-SVID through the daemon.
    Validate {
        /// The audience of the validating party.
        #[arg(long, short = 'a')]
        audience: String,
        /// The token, or `-` to read it from stdin (an argument is visible to every local
        /// user in the process list).
        token: String,
    },
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Print the X.509 bundle (PEM) and the JWT bundle (JWKS).
    Show,
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
    /// List registration entries.
    List,
    /// Create an entry (stored by the daemon; survives restarts).
    Create(EntryArgs),
    /// Change a stored entry: given fields replace the current ones.
    Update {
        /// Entry id.
        id: String,
        #[command(flatten)]
        args: EntryArgs,
    },
    /// Delete a stored entry.
    Delete {
        /// Entry id.
        id: String,
    },
    /// Mark an entry reviewed: its idle clock restarts.
    Review {
        /// Entry id.
        id: String,
    },
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let result = match &cli.command {
        Command::Svid(SvidCommand::X509 { out }) => workload::x509(&cli, out.as_deref()).await,
        Command::Svid(SvidCommand::Jwt {
            audience,
            spiffe_id,
        }) => workload::jwt(&cli, audience, spiffe_id.as_deref()).await,
        Command::Svid(SvidCommand::Validate { audience, token }) => {
            workload::validate(&cli, audience, token).await
        }
        Command::Bundle(BundleCommand::Show) => workload::bundle_show(&cli).await,
        Command::Status => admin::status(&cli).await,
        Command::Entry(EntryCommand::List) => admin::entry_list(&cli).await,
        Command::Entry(EntryCommand::Create(a)) => admin::entry_create(&cli, a).await,
        Command::Entry(EntryCommand::Update { id, args }) => {
            admin::entry_update(&cli, id, args).await
        }
        Command::Entry(EntryCommand::Delete { id }) => admin::entry_delete(&cli, id).await,
        Command::Entry(EntryCommand::Review { id }) => admin::entry_review(&cli, id).await,
        Command::Approvals => admin::approvals(&cli).await,
        Command::Approve { id } => admin::decide(&cli, id, true).await,
        Command::Deny { id } => admin::decide(&cli, id, false).await,
        Command::Task(TaskCommand::Complete {
            task_id,
            operator: true,
            ..
        }) => admin::task_complete(&cli, task_id).await,
        Command::Task(TaskCommand::Complete {
            task_id,
            operator: false,
            spiffe_id,
        }) => workload::task_complete(&cli, task_id, spiffe_id.as_deref()).await,
        Command::Task(TaskCommand::Exchange {
            subject_token,
            subject_token_type,
            audience,
            scopes,
            task,
            expires_in,
            x509_out,
            spiffe_id,
        }) => {
            workload::task_exchange(
                &cli,
                workload::ExchangeArgs {
                    subject_token,
                    subject_token_type,
                    audience,
                    scopes,
                    task,
                    expires_in: *expires_in,
                    x509_out: x509_out.as_deref(),
                    spiffe_id: spiffe_id.as_deref(),
                },
            )
            .await
        }
        Command::Lease(LeaseCommand::List {
            spiffe_id,
            prefix,
            task,
            state,
            kind,
            limit,
        }) => {
            let req = crate::proto::tessera::v1::ListLeasesRequest {
                spiffe_id: spiffe_id.clone().unwrap_or_default(),
                prefix: *prefix,
                task_id: task.clone().unwrap_or_default(),
                state: state.clone().unwrap_or_default(),
                kind: kind.clone().unwrap_or_default(),
                page_size: 1000,
                page_token: String::new(),
            };
            admin::lease_list(&cli, req, *limit).await
        }
        Command::Lease(LeaseCommand::Show { id }) => admin::lease_show(&cli, id).await,
        Command::Lease(LeaseCommand::Revoke { id, reason }) => {
            admin::lease_revoke(&cli, id, reason).await
        }
        Command::Task(TaskCommand::Revoke { task_id, reason }) => {
            admin::task_revoke(&cli, task_id, reason).await
        }
        Command::Kill { spiffe_id, reason } => admin::kill(&cli, spiffe_id, reason).await,
        Command::Restore { spiffe_id } => admin::restore(&cli, spiffe_id).await,
        Command::Killed => admin::killed(&cli).await,
        Command::Audit(AuditCommand::Verify {
            file,
            no_store,
            anchor,
        }) => admin::audit_verify(&cli, file.as_deref(), *no_store, anchor),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            1
        }
    }
}

impl Cli {
    /// The workload socket if one was given (`--socket` or `SPIFFE_ENDPOINT_SOCKET`).
    fn explicit_workload_socket(&self) -> anyhow::Result<Option<PathBuf>> {
        self.socket.as_deref().map(parse_socket_addr).transpose()
    }

    fn workload_socket(&self) -> anyhow::Result<PathBuf> {
        match &self.socket {
            None => Ok(Defaults::for_current_user().workload_socket),
            Some(s) => parse_socket_addr(s),
        }
    }

    fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| Defaults::for_current_user().admin_socket)
    }
}

/// Accepts `unix:///abs/path`, `unix:/abs/path` or a plain absolute path.
fn parse_socket_addr(s: &str) -> anyhow::Result<PathBuf> {
    let path = s
        .strip_prefix("unix://")
        .or_else(|| s.strip_prefix("unix:"))
        .unwrap_or(s);
    anyhow::ensure!(
        path.starts_with('/'),
        "socket {s:?} must be an absolute path or unix:///absolute/path (TCP endpoints are not supported)"
    );
    Ok(PathBuf::from(path))
}

/// A gRPC channel over a Unix socket, with an error that says what to check.
async fn connect(path: &Path, admin: bool) -> anyhow::Result<Channel> {
    // The same check the daemon makes before it binds: a directory someone else controls
    // could hold their socket, not tesserad's.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The default paths are this user's own (`/tmp/tessera-<uid>` is where a planted
        // directory would be): they must be ours or root's. A path given explicitly may
        // belong to a daemon running as another user.
        let d = Defaults::for_current_user();
        let ours = path == d.workload_socket || path == d.admin_socket;
        let owner = ours.then(|| nix::unistd::geteuid().as_raw());
        match crate::api::uds::check_socket_dir(dir, owner) {
            Ok(()) => {}
            // Refused all the same: a directory missing now may be someone's by the connect.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "cannot connect to {}: {} does not exist (is tesserad running?){}",
                path.display(),
                dir.display(),
                system_socket_hint(path)
            ),
            Err(e) => anyhow::bail!("refusing to connect to {}: {e}", path.display()),
        }
    }
    crate::api::uds::channel(path).await.map_err(|e| {
        // tonic's transport error hides the cause; the one that matters most is this user
        // not being let in.
        let io = std::iter::successors(std::error::Error::source(&e), |c| c.source())
            .find_map(|c| c.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind);
        match io {
            Some(std::io::ErrorKind::PermissionDenied) if admin => anyhow::anyhow!(
                "cannot connect to {}: permission denied. The admin socket admits root, the \
                 daemon's user and [admin] allowed_uids/allowed_gids only: ask an operator to add \
                 you, or use sudo",
                path.display()
            ),
            Some(std::io::ErrorKind::PermissionDenied) => anyhow::anyhow!(
                "cannot connect to {}: permission denied (the socket's directory or the socket \
                 shuts this user out; the workload socket is normally 0666 in a 0755 directory)",
                path.display()
            ),
            Some(std::io::ErrorKind::ConnectionRefused) => anyhow::anyhow!(
                "cannot connect to {}: nothing listens there (is tesserad running?)",
                path.display()
            ),
            Some(std::io::ErrorKind::NotFound) => anyhow::anyhow!(
                "cannot connect to {}: no socket there (is tesserad running, and is this the \
                 path it logged at start?){}",
                path.display(),
                system_socket_hint(path)
            ),
            _ => anyhow::anyhow!(
                "cannot connect to {}: {e} (is tesserad running?)",
                path.display()
            ),
        }
    })
}

/// Where a user's own default Workload API socket is missing but the system daemon's is
/// there (the systemd unit's path), how to reach that one: a workload user of a deployed
/// daemon would otherwise be told to start one.
fn system_socket_hint(path: &Path) -> String {
    const SYSTEM: &str = "/run/tessera/workload.sock";
    let own_default = nix::unistd::geteuid().as_raw() != 0
        && path == Defaults::for_current_user().workload_socket;
    if own_default && Path::new(SYSTEM).exists() {
        format!(
            "; there is a system tesserad's socket at {SYSTEM}: use --socket unix://{SYSTEM} \
             or SPIFFE_ENDPOINT_SOCKET=unix://{SYSTEM}"
        )
    } else {
        String::new()
    }
}

/// Formats a gRPC status for people.
fn status_err(s: tonic::Status) -> anyhow::Error {
    // An unknown method comes with no message; the daemon's own refusals (WIT-SVIDs) say why.
    if s.code() == tonic::Code::Unimplemented && s.message().is_empty() {
        // tesserad serves every method of its two APIs, each on its own socket: an
        // unknown method means the other socket was named.
        return anyhow::anyhow!(
            "Unimplemented: that socket does not serve this API; is it tesserad's other socket? \
             The Workload API is --socket (SPIFFE_ENDPOINT_SOCKET), the admin API \
             --admin-socket (TESSERA_ADMIN_SOCKET)"
        );
    }
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(
            parse_socket_addr("unix:///run/t.sock").unwrap(),
            PathBuf::from("/run/t.sock")
        );
        assert_eq!(
            parse_socket_addr("unix:/run/t.sock").unwrap(),
            PathBuf::from("/run/t.sock")
        );
        assert_eq!(
            parse_socket_addr("/run/t.sock").unwrap(),
            PathBuf::from("/run/t.sock")
        );
        assert!(parse_socket_addr("tcp://127.0.0.1:1").is_err());
        assert!(parse_socket_addr("relative.sock").is_err());
    }

    #[test]
    fn operator_commands_parse() {
        let c = Cli::try_parse_from([
            "tessera",
            "lease",
            "list",
            "--spiffe-id",
            "spiffe://td/a",
            "--state",
            "active",
            "--json",
        ])
        .unwrap();
        assert!(c.json);
        let c = Cli::try_parse_from([
            "tessera",
            "kill",
            "spiffe://td/a",
            "--reason",
            "compromised",
            "--admin-socket",
            "/s",
        ])
        .unwrap();
        assert!(matches!(c.command, Command::Kill { ref reason, .. } if reason == "compromised"));
        let c = Cli::try_parse_from([
            "tessera",
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://td/a",
            "--selector",
            "unix:uid:1",
            "--selector",
            "unix:gid:2",
        ])
        .unwrap();
        let Command::Entry(EntryCommand::Create(a)) = c.command else {
            panic!()
        };
        assert_eq!(a.selectors.len(), 2);
    }

    #[test]
    fn global_flags_go_anywhere() {
        let a = Cli::try_parse_from(["tessera", "--json", "entry", "list"]).unwrap();
        let b = Cli::try_parse_from(["tessera", "entry", "list", "--json", "--admin-socket", "/x"])
            .unwrap();
        assert!(a.json && b.json);
        assert_eq!(b.admin_socket.as_deref(), Some(Path::new("/x")));
    }
}
