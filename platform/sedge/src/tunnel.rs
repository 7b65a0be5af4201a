//! `sedge token` (join tokens on the cloud) and `sedge join` (an edge node joining the cloud).
//!
//! With `--kubeconfig`, tokens are Secrets in the cluster's `kube-system`, shared by every cloud
//! core run with `--kubeconfig` (the way `kubeadm token` works against a cluster). Otherwise they
//! live in the cloud hub's database (`sedge up`, `sedge cloud --embedded`), which these commands
//! open directly (SQLite in WAL mode, safe next to a running hub).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use sedge_tunnel::token::TokenStore;

/// Where the cloud keeps its hub database and CA.
#[derive(Args)]
pub struct CloudDirs {
    /// The cloud hub's data directory (holds hub.db).
    #[arg(
        long,
        env = "SEDGE_CLOUDHUB_DATA_DIR",
        default_value = "sedge-data/cloudhub"
    )]
    data_dir: PathBuf,
    /// The cluster PKI directory (ca.crt, ca.key, token.key).
    #[arg(long, env = "SEDGE_PKI_DIR", default_value = "sedge-data/pki")]
    pki_dir: PathBuf,
    /// The tokens are in this cluster (cloud cores run with `sedge cloud --kubeconfig`): as
    /// Secrets in kube-system, shared by every core. `--data-dir` is not used then.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

/// `sedge token ...`
#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a join token and print it.
    Create {
        /// The cloud's data and PKI directories.
        #[command(flatten)]
        dirs: CloudDirs,
        /// Lifetime: a number with s, m, h or d (e.g. 30m, 24h, 7d).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Free text shown by `sedge token list`.
        #[arg(long, default_value = "")]
        description: String,
        /// Joins the token allows (default 1; more to enrol a fleet of new nodes with one token).
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Bind the token to this node name: the way to re-join a machine whose name joined
        /// before (its earlier certificates are revoked when it joins).
        #[arg(long)]
        node: Option<String>,
    },
    /// List the tokens that have not been revoked.
    List {
        /// The cloud's data and PKI directories.
        #[command(flatten)]
        dirs: CloudDirs,
    },
    /// Revoke a token by id or by its full text.
    Revoke {
        /// The cloud's data and PKI directories.
        #[command(flatten)]
        dirs: CloudDirs,
        /// Token id (from `sedge token list`) or the token itself.
        token: String,
    },
}

/// Parses `30s`, `15m`, `24h`, `7d`.
pub fn parse_ttl(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| {
        format!("TTL {s:?}: expected a number followed by s, m, h or d (e.g. 24h)")
    })?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("TTL {s:?}: unit {unit:?} is not one of s, m, h, d (e.g. 24h)"),
    };
    if secs == 0 {
        bail!("TTL {s:?}: must be above zero");
    }
    Ok(Duration::from_secs(secs))
}

/// Opens the join records; `certs`: with every node's certificate records (only revoking
/// needs them; in a cluster there is one Secret per node).
async fn open(dirs: &CloudDirs, certs: bool) -> Result<TokenStore> {
    let data_dir = match &dirs.kubeconfig {
        Some(_) => None,
        None => Some(&dirs.data_dir),
    };
    for d in data_dir.into_iter().chain([&dirs.pki_dir]) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let ca = sedge_pki::Ca::load_or_create(&dirs.pki_dir, "sedge-ca")?;
    let hash = sedge_tunnel::tls::ca_hash(&ca.cert_der()?);
    Ok(match &dirs.kubeconfig {
        Some(k) => {
            let client = crate::platform::client_from(k).await?;
            let records = if certs {
                sedge_cloudcore::joinrecords::ApiRecords::start(client)
                    .await
                    .with_context(|| {
                        format!("the join records in the cluster of {}", k.display())
                    })?
            } else {
                sedge_cloudcore::joinrecords::ApiRecords::for_tokens(client)
            };
            TokenStore::with_records(records, &dirs.pki_dir, &hash)?
        }
        None => TokenStore::open(&dirs.data_dir.join("hub.db"), &dirs.pki_dir, &hash)?,
    })
}

fn when(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| unix.to_string())
}

/// Runs `sedge token ...`.
pub async fn token(cmd: TokenCmd) -> Result<()> {
    let dirs = match &cmd {
        TokenCmd::Create { dirs, .. } | TokenCmd::List { dirs } | TokenCmd::Revoke { dirs, .. } => {
            dirs
        }
    };
    let store = open(dirs, matches!(cmd, TokenCmd::Revoke { .. })).await?;
    // The records may block (API calls): off the runtime's workers.
    tokio::task::spawn_blocking(move || run_token(store, cmd))
        .await
        .context("the token command panicked")?
}

fn run_token(store: TokenStore, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            dirs: _,
            ttl,
            description,
            max_uses,
            node,
        } => {
            let ttl = parse_ttl(&ttl)?;
            let (token, info) = store.create_with(ttl, &description, max_uses, node.as_deref())?;
            let scope = match &node {
                Some(n) => format!("re-joins node {n} once"),
                None => format!("joins {max_uses} new node(s)"),
            };
            eprintln!("token {} {scope}; expires {}", info.id, when(info.expires));
            println!("{token}");
        }
        TokenCmd::List { dirs: _ } => {
            let now = chrono::Utc::now().timestamp();
            println!(
                "{:<14} {:<22} {:<8} {:<7} {:<16} {:<16} DESCRIPTION",
                "ID", "EXPIRES", "STATE", "USES", "BOUND TO", "LAST NODE"
            );
            for t in store.list()? {
                let state = if t.expires <= now {
                    "expired"
                } else if t.uses >= t.max_uses {
                    "used"
                } else {
                    "valid"
                };
                println!(
                    "{:<14} {:<22} {:<8} {:<7} {:<16} {:<16} {}",
                    t.id,
                    when(t.expires),
                    state,
                    format!("{}/{}", t.uses, t.max_uses),
                    if t.node.is_empty() { "-" } else { &t.node },
                    if t.last_node.is_empty() {
                        "-"
                    } else {
                        &t.last_node
                    },
                    t.description
                );
            }
        }
        TokenCmd::Revoke { dirs: _, token } => {
            if !store.revoke(&token)? {
                bail!("no token {token:?}: see `sedge token list`");
            }
            println!("revoked (and every node certificate issued through it)");
        }
    }
    Ok(())
}

/// Flags of `sedge join`.
#[derive(Args)]
pub struct JoinArgs {
    /// The cloud hub's address, host:port (the TCP port: WebSocket and join).
    #[arg(long, env = "SEDGE_CLOUD")]
    cloud: String,
    /// A join token from `sedge token create`.
    #[arg(long, env = "SEDGE_JOIN_TOKEN")]
    token: String,
    /// This node's name (lower-case DNS name).
    #[arg(long, env = "SEDGE_NODE_NAME")]
    node_name: String,
    /// Where the node keeps its credentials.
    #[arg(long, env = "SEDGE_EDGE_DATA_DIR", default_value = "sedge-data/edge")]
    data_dir: PathBuf,
}

/// Runs `sedge join`.
pub async fn join(a: JoinArgs) -> Result<()> {
    let cfg = sedge_tunnel::EdgeConfig {
        node_name: a.node_name,
        cloud: a.cloud,
        data_dir: a.data_dir,
        ..Default::default()
    };
    let j = sedge_tunnel::join(&cfg, &a.token).await?;
    println!(
        "joined as node {} (certificate valid until {}, CA {}); credentials in {}",
        j.node,
        when(j.expires),
        &j.ca_hash[..16],
        cfg.data_dir.join("pki").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "h", "10y", "0h", "1.5h"] {
            let e = parse_ttl(bad).unwrap_err().to_string();
            assert!(e.contains("TTL"), "{bad}: {e}");
        }
    }
}
