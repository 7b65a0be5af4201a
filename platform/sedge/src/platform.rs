//! `sedge cloud`, `sedge up` and `sedge ai-controller`: the cloud-side daemons and the
//! all-in-one (the edge agent, `sedge edge`, is the `sedge-edge` crate's).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use sedge_ai_controller::cloud::CloudAiModule;
use sedge_ai_controller::controller::ControllerConfig;
use sedge_ai_controller::edge::{EdgeAiConfig, EdgeAiModule};
use sedge_apiserver::ops::{
    PodExecRequest, PodExecSource, PodExecStream, PodLogRequest, PodLogSource,
};
use sedge_apiserver::{ApiServer, ApiServerConfig};
use sedge_cloudcore::CloudModule;
use sedge_cloudcore::{CloudCore, CloudCoreConfig, JoinRecordsAt};
use sedge_config::Loader;
use sedge_edgecore::{EdgeCore, EdgeCoreConfig, EdgeModule};
use serde::Serialize;
use serde_json::json;

/// Flags of `sedge cloud`.
#[derive(Args, Serialize)]
pub struct CloudArgs {
    /// Config file (YAML or JSON); layered as defaults < file < environment < flags.
    #[arg(long, short = 'c')]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Print the default config and exit.
    #[arg(long)]
    #[serde(skip)]
    print_default_config: bool,
    /// Kubeconfig of the cluster to run against (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    /// Not read from $KUBECONFIG by the flag itself, so a shell that has it set can still run
    /// `--embedded` (the variable is used only when neither is given).
    #[arg(long, conflicts_with = "embedded")]
    #[serde(skip)]
    kubeconfig: Option<PathBuf>,
    /// Also run the embedded API server (SQLite) in this process, with its data under --data-dir.
    #[arg(long)]
    #[serde(skip)]
    embedded: bool,
    /// Data directory for the embedded API server, the hub and the PKI.
    #[arg(long, env = "SEDGE_DATA_DIR", default_value = "sedge-data")]
    #[serde(skip)]
    data_dir: PathBuf,
    /// The hub's TCP address (WebSocket and join).
    #[arg(long)]
    #[serde(rename = "hub.listen")]
    listen: Option<String>,
    /// The hub's UDP address for QUIC (empty disables it).
    #[arg(long)]
    #[serde(rename = "hub.listen_quic")]
    listen_quic: Option<String>,
    /// Names or IPs edges dial (put in the hub certificate; repeatable).
    #[arg(long = "advertise-address")]
    #[serde(
        rename = "hub.advertise_addresses",
        skip_serializing_if = "Vec::is_empty"
    )]
    advertise: Vec<String>,
}

/// The modules the cloud core runs: the AI layer's.
fn cloud_modules() -> Vec<Arc<dyn CloudModule>> {
    vec![Arc::new(CloudAiModule::new())]
}

/// Flags of `sedge up`.
#[derive(Args)]
pub struct UpArgs {
    /// Where everything lives (API server, hub, one directory per edge).
    #[arg(long, default_value = "sedge-data/up")]
    pub data_dir: PathBuf,
    /// Edge agents to run.
    #[arg(long, default_value_t = 2)]
    pub edges: usize,
    /// The API server's address.
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: String,
    /// The hub's TCP address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub hub_listen: String,
    /// First MetaServer port (edge i gets port + i; 0 picks free ports).
    #[arg(long, default_value_t = 10550)]
    pub metaserver_port: u16,
    /// `/metrics`, `/healthz`, `/readyz` of the cloud core and the AI controller on this port,
    /// and of node agent i on port + 1 + i (0 picks free ports; all are in `up.json`).
    #[arg(long, default_value_t = 10266)]
    pub metrics_port: u16,
    /// First port of the nodes' embedded MQTT brokers for device topics (node i gets port + i; 0
    /// picks free ports; all are in `up.json`).
    #[arg(long, default_value_t = 1884)]
    pub mqtt_port: u16,
    /// Use this MQTT broker (`host:port`, e.g. a mosquitto) on every node instead of embedded ones.
    #[arg(long)]
    pub mqtt_broker: Option<String>,
    /// Edge agent config file applied to every edge (node names and directories are set per edge).
    #[arg(long)]
    pub edge_config: Option<PathBuf>,
    /// Cloud core config file.
    #[arg(long)]
    pub cloud_config: Option<PathBuf>,
    /// Node agents for cloud workloads (`cloud-1`, ...; label `sedge.io/role=cloud`), next to
    /// the edges: the cloud half of joint inference runs there.
    #[arg(long, default_value_t = 1)]
    pub cloud_nodes: usize,
    /// Do not run the AI controller (sedna.io resources).
    #[arg(long)]
    pub no_ai: bool,
    /// AI controller config file (`sedge ai-controller --print-default-config`).
    #[arg(long)]
    pub ai_config: Option<PathBuf>,
    /// Port of the local-controller endpoint workers report to (all nodes share this machine).
    #[arg(long, default_value_t = 9100)]
    pub lc_port: u16,
    /// Host directories pods' `hostPath` volumes may name, on every node (repeatable; added to
    /// the edge config's `host_path_allow`). `sedge up`'s nodes share your machine, and Models
    /// with a local path are mounted as host paths, hence the default.
    #[arg(long = "host-path-allow", default_value = "/tmp")]
    pub host_path_allow: Vec<PathBuf>,
    /// The nodes' container runtime: `process` (host processes) or `cri` (containers of the
    /// containerd at `--cri-socket`); overrides the edge config's `runtime`.
    #[arg(long)]
    pub runtime: Option<sedge_edgecore::config::RuntimeKind>,
    /// The CRI runtime's socket for `--runtime cri`.
    #[arg(long)]
    pub cri_socket: Option<PathBuf>,
}

impl UpArgs {
    /// One edge node under `dir`, every port chosen by the OS, no cloud nodes, no AI controller:
    /// what a test or a tool that starts `sedge up` in process usually wants.
    pub fn local(dir: &Path) -> UpArgs {
        UpArgs {
            data_dir: dir.to_path_buf(),
            edges: 1,
            listen: "127.0.0.1:0".into(),
            hub_listen: "127.0.0.1:0".into(),
            metaserver_port: 0,
            metrics_port: 0,
            mqtt_port: 0,
            mqtt_broker: None,
            edge_config: None,
            cloud_config: None,
            cloud_nodes: 0,
            no_ai: true,
            ai_config: None,
            lc_port: 0,
            host_path_allow: vec![],
            runtime: None,
            cri_socket: None,
        }
    }
}

/// Worker threads of the embedded API server's own runtime (apart from the hub's and the
/// controllers', so a costly request never delays a node's keepalive).
const API_SERVER_THREADS: usize = 2;

/// The label `sedge up` puts on its cloud nodes.
pub const ROLE_LABEL: &str = sedge_api::ROLE_LABEL;

/// The daemons' environment prefixes: `SEDGE_CLOUDCORE_...`, `SEDGE_EDGECORE_...`,
/// `SEDGE_AI_CONTROLLER_...` (see `sedge_config`).
const CLOUDCORE: &str = "CLOUDCORE";
use sedge_edge::EDGECORE;
const AI_CONTROLLER: &str = "AI_CONTROLLER";

fn load<T: Default + serde::Serialize + serde::de::DeserializeOwned>(
    daemon: &str,
    file: Option<&Path>,
) -> Result<T> {
    Ok(Loader::new(daemon).file(file).load(&())?)
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .with_context(|| format!("kubeconfig {}", kubeconfig.display()))?;
    Ok(kube::Client::try_from(cfg)?)
}

/// A client of the API server in this process, as `user` (its role applies), served in memory:
/// no TLS or HTTP/1 between the two (see `sedge_apiserver::local`).
fn local_client(server: &ApiServer, user: &str) -> kube::Client {
    kube::Client::new(server.local_service(user, &[]), "default")
}

// The API server splits client frames at its own constant; it must be the channel's.
const _: () = assert!(PodExecStream::MAX_FRAME == sedge_tunnel::stream::MAX_FRAME);

/// Lets the embedded API server answer `kubectl logs` and `kubectl exec` through the cloud core.
fn attach_logs(server: &ApiServer, cloud: &CloudCore, timeout: Duration) {
    let hub = cloud.hub.clone();
    let source = PodLogSource(Arc::new(move |r: PodLogRequest| {
        let hub = hub.clone();
        Box::pin(async move {
            sedge_cloudcore::edgecontroller::pod_logs(
                &hub,
                &r.node,
                &r.namespace,
                &r.pod,
                &r.log,
                timeout,
            )
            .await
        })
    }));
    let _ = server.core.pod_logs.set(source);
    let (hub, streams) = (cloud.hub.clone(), cloud.streams.clone());
    let exec = PodExecSource(Arc::new(move |r: PodExecRequest| {
        let (hub, streams) = (hub.clone(), streams.clone());
        Box::pin(async move {
            use sedge_apiserver::error::ApiError;
            use sedge_cloudcore::exec::{self, ExecError};
            let opened = if r.open.check_only() {
                // Nothing runs: the caller only wants the node's verdict.
                exec::check(&hub, &r.node, &r.open, timeout)
                    .await
                    .map(|()| exec::ExecChannels {
                        from_node: tokio::sync::mpsc::channel(1).1,
                        to_node: tokio::sync::mpsc::channel(1).0,
                    })
            } else {
                exec::open(&hub, &streams, &r.node, &r.open, timeout).await
            };
            match opened {
                Ok(c) => Ok(PodExecStream {
                    from_node: c.from_node,
                    to_node: c.to_node,
                }),
                Err(e @ ExecError::Busy { .. }) => Err(ApiError::TooManyRequests(e.to_string())),
                Err(ExecError::Refused(why)) => Err(ApiError::BadRequest(why)),
                Err(ExecError::Unavailable(why)) => Err(ApiError::Unavailable(why)),
            }
        })
    }));
    let _ = server.core.pod_exec.set(exec);
}

/// Runs `sedge cloud` until `shutdown` resolves.
pub async fn cloud(a: CloudArgs, shutdown: impl Future<Output = ()>) -> Result<()> {
    if a.print_default_config {
        print!("{}", serde_yaml::to_string(&CloudCoreConfig::default())?);
        return Ok(());
    }
    let mut cfg: CloudCoreConfig = Loader::new(CLOUDCORE).file(a.config.as_deref()).load(&a)?;
    let server = if a.embedded {
        cfg.hub.data_dir = a.data_dir.join("cloudhub");
        cfg.hub.pki_dir = a.data_dir.join("apiserver").join("pki");
        let s = ApiServer::start_isolated(
            ApiServerConfig {
                data_dir: a.data_dir.join("apiserver"),
                ..Default::default()
            },
            API_SERVER_THREADS,
        )
        .await
        .context("cannot start the embedded API server")?;
        Some(s)
    } else {
        None
    };
    let client = match (&server, &a.kubeconfig) {
        (Some(s), _) => {
            // KubeEdge's device resources, installed as the administrator (against a real
            // cluster, `kubectl apply -f platform/devices/crds/`).
            sedge_devices::install_crds(&client_from(&s.kubeconfig).await?).await?;
            // The cloud core runs as itself, with its own role, not as the administrator.
            local_client(s, sedge_apiserver::authz::CLOUDCORE_USER)
        }
        (None, Some(k)) => client_from(k).await?,
        (None, None) => kube::Client::try_default()
            .await
            .context("no kubeconfig: pass --kubeconfig or --embedded")?,
    };
    if cfg.join_records == JoinRecordsAt::Auto {
        // Against a cluster other cores may share, the tokens and revocations are in it.
        cfg.join_records = if server.is_some() {
            JoinRecordsAt::Hub
        } else {
            JoinRecordsAt::Api
        };
    }
    if server.is_none() && !is_sedge_apiserver(&client).await? {
        // A real cluster's own controllers and scheduler do that work. Sedge's API server
        // (`sedge apiserver`) has neither: there the cores run theirs, under the leader Lease.
        cfg.workloads = false;
        cfg.scheduler = false;
    }
    let core = CloudCore::start(client, cfg.clone(), cloud_modules())
        .await
        .context("cannot start the cloud core")?;
    let (hub, cache) = (core.hub.clone(), core.cache.clone());
    let ops = serve_metrics(&cfg.metrics_listen, move |e| {
        sedge_cloudcore::render_metrics(&hub, &cache, e)
    })
    .await?;
    if let Some(s) = &server {
        attach_logs(s, &core, Duration::from_millis(cfg.log_timeout_ms));
        eprintln!(
            "API server ready at {}; kubeconfig {}",
            s.url,
            s.kubeconfig.display()
        );
    }
    let records = match (cfg.join_records, &a.kubeconfig) {
        (JoinRecordsAt::Api, Some(k)) => format!("--kubeconfig {}", k.display()),
        (JoinRecordsAt::Api, None) => "--kubeconfig <yours>".to_string(),
        _ => format!("--data-dir {}", cfg.hub.data_dir.display()),
    };
    eprintln!(
        "cloud hub on {} (QUIC {:?}); join edges with:\n  sedge token create {records} --pki-dir {}\n  sedge join --cloud <this host>:{} --token <token> --node-name <name>",
        core.hub.addr(),
        core.hub.quic_addr(),
        cfg.hub.pki_dir.display(),
        core.hub.addr().port()
    );
    shutdown.await;
    if let Some((_, t)) = ops {
        t.abort();
    }
    core.shutdown().await;
    if let Some(s) = server {
        s.shutdown().await;
    }
    Ok(())
}

/// Whether the API server is Sedge's own (its `/version` says `+sedge-`); waits up to 30 s for
/// it to answer.
async fn is_sedge_apiserver(client: &kube::Client) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.apiserver_version().await {
            Ok(v) => return Ok(v.git_version.contains("+sedge-")),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(anyhow::anyhow!(
                    "the API server did not answer /version for 30 s: {e}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Serves `/metrics` (rendered by `render` at each scrape), `/healthz` and `/readyz` on
/// `listen`; none when `listen` is empty.
async fn serve_metrics(
    listen: &str,
    render: impl Fn(&mut sedge_serve::Exposition) + Send + Sync + 'static,
) -> Result<Option<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let render = Arc::new(render);
    let f: sedge_serve::MetricsFn = Arc::new(move || {
        let mut e = sedge_serve::Exposition::new();
        render(&mut e);
        e.process();
        allocator_metrics(&mut e);
        let text = e.encode();
        Box::pin(async move { text })
    });
    let (addr, t) = sedge_serve::serve_ops(listen, f, Arc::new(|| true))
        .await
        .with_context(|| format!("cannot serve /metrics on {listen}"))?;
    eprintln!("metrics on http://{addr}/metrics");
    Ok(Some((addr, t)))
}

/// jemalloc's figures (the `sedge` binary's allocator), so that an operator can tell memory the
/// program holds (`allocated`) from pages the allocator keeps for it (`active`, `resident`) and
/// address space it keeps unmapped from use (`retained`). Nothing where jemalloc is not built in.
pub fn allocator_metrics(e: &mut sedge_serve::Exposition) {
    #[cfg(not(target_env = "msvc"))]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        // The figures are a snapshot taken when the epoch advances.
        if epoch::advance().is_err() {
            return;
        }
        let figures: [(&str, &str, tikv_jemalloc_ctl::Result<usize>); 6] = [
            (
                "allocator_allocated_bytes",
                "Bytes the program holds allocated (jemalloc stats.allocated)",
                stats::allocated::read(),
            ),
            (
                "allocator_active_bytes",
                "Bytes in the allocator's active pages (stats.active)",
                stats::active::read(),
            ),
            (
                "allocator_resident_bytes",
                "Bytes in pages the allocator has resident, its metadata included (stats.resident)",
                stats::resident::read(),
            ),
            (
                "allocator_mapped_bytes",
                "Bytes in the allocator's mapped extents (stats.mapped)",
                stats::mapped::read(),
            ),
            (
                "allocator_retained_bytes",
                "Bytes of address space the allocator keeps unmapped from use (stats.retained)",
                stats::retained::read(),
            ),
            (
                "allocator_metadata_bytes",
                "Bytes of the allocator's own metadata (stats.metadata)",
                stats::metadata::read(),
            ),
        ];
        for (name, help, value) in figures {
            if let Ok(v) = value {
                e.gauge(name, help, i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
    }
    #[cfg(target_env = "msvc")]
    let _ = e;
}

/// Everything `sedge up` started.
pub struct Up {
    /// The API server.
    pub server: ApiServer,
    /// The cloud core.
    pub cloud: CloudCore,
    /// The node agents: the edges, then the cloud nodes.
    pub edges: Vec<EdgeCore>,
    ai: Option<tokio::task::JoinHandle<()>>,
    ops: Option<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>,
}

impl Up {
    /// Starts the embedded API server, the cloud core and `edges` edge agents, joined with a
    /// fresh short-lived token each.
    pub async fn start(a: &UpArgs) -> Result<Up> {
        let dir = &a.data_dir;
        let server = ApiServer::start_isolated(
            ApiServerConfig {
                data_dir: dir.join("apiserver"),
                listen: a.listen.clone(),
                kubeconfig: Some(dir.join("kubeconfig")),
                ..Default::default()
            },
            API_SERVER_THREADS,
        )
        .await
        .context("cannot start the API server")?;
        let mut cc: CloudCoreConfig = load(CLOUDCORE, a.cloud_config.as_deref())?;
        cc.hub.data_dir = dir.join("cloudhub");
        cc.hub.pki_dir = dir.join("apiserver").join("pki");
        cc.hub.listen = a.hub_listen.clone();
        cc.hub.listen_quic = String::new();
        // Each component with its own identity and role (no administrator in the process):
        // the administrator's kubeconfig is for the user.
        let client = local_client(&server, sedge_apiserver::authz::CLOUDCORE_USER);
        let admin = client_from(&server.kubeconfig).await?;
        // KubeEdge's device resources (DeviceModel, Device), so device manifests apply.
        sedge_devices::install_crds(&admin).await?;
        let cloud = CloudCore::start(client.clone(), cc.clone(), cloud_modules())
            .await
            .context("cannot start the cloud core")?;
        attach_logs(&server, &cloud, Duration::from_millis(cc.log_timeout_ms));
        let port = |offset: usize| {
            if a.metrics_port == 0 {
                "127.0.0.1:0".to_string()
            } else {
                format!("127.0.0.1:{}", a.metrics_port as usize + offset)
            }
        };
        let (hub, cache) = (cloud.hub.clone(), cloud.cache.clone());
        let ops = serve_metrics(&port(0), move |e| {
            sedge_cloudcore::render_metrics(&hub, &cache, e);
            sedge_ai_controller::metrics::render(e);
        })
        .await?;
        let ai = if a.no_ai {
            None
        } else {
            let mut cfg: ControllerConfig = load(AI_CONTROLLER, a.ai_config.as_deref())?;
            cfg.lc_port = a.lc_port;
            sedge_ai_controller::controller::install_crds(&admin)
                .await
                .context("cannot install the sedna.io CRDs")?;
            cfg.install_crds = false;
            let client = local_client(&server, sedge_apiserver::authz::AI_CONTROLLER_USER);
            Some(tokio::spawn(async move {
                if let Err(e) =
                    sedge_ai_controller::controller::run(client, cfg, std::future::pending()).await
                {
                    tracing::error!(error = %e, "AI controller stopped");
                }
            }))
        };
        let ai_module: Arc<dyn EdgeModule> = Arc::new(EdgeAiModule::new(EdgeAiConfig {
            lc_listen: if a.no_ai {
                String::new()
            } else {
                format!("127.0.0.1:{}", a.lc_port)
            },
            ..Default::default()
        }));
        let nodes = (0..a.edges)
            .map(|i| (format!("edge-{}", i + 1), None))
            .chain((0..a.cloud_nodes).map(|i| (format!("cloud-{}", i + 1), Some("cloud"))));
        let mut edges = Vec::new();
        let mut dmi = Vec::new();
        for (i, (node, role)) in nodes.enumerate() {
            let mut ec: EdgeCoreConfig = load(EDGECORE, a.edge_config.as_deref())?;
            if let Some(role) = role {
                ec.labels.insert(ROLE_LABEL.into(), role.into());
            }
            ec.tunnel.node_name = node.clone();
            ec.tunnel.cloud = cloud.hub.addr().to_string();
            ec.tunnel.data_dir = dir.join(&node);
            ec.node_ip = "127.0.0.1".into();
            ec.host_path_allow.extend(a.host_path_allow.iter().cloned());
            if let Some(r) = a.runtime {
                ec.runtime = r;
            }
            if let Some(s) = &a.cri_socket {
                ec.cri_socket = s.clone();
            }
            // One machine and its own user: `kubectl --server` on the MetaServer works.
            ec.metaserver_anonymous_reads = true;
            ec.metrics_listen = port(1 + i);
            ec.metaserver_listen = if a.metaserver_port == 0 {
                "127.0.0.1:0".into()
            } else {
                format!("127.0.0.1:{}", a.metaserver_port as usize + i)
            };
            if sedge_tunnel::edge::Identity::load(&ec.tunnel.data_dir).is_err() {
                let (token, _) = cloud
                    .hub
                    .tokens()
                    .create(Duration::from_secs(600), &format!("sedge up: {node}"))?;
                sedge_tunnel::join(&ec.tunnel, &token)
                    .await
                    .with_context(|| format!("joining {node}"))?;
            }
            let dmi_socket = sedge_devices::twin::default_dmi_socket(&ec.tunnel.data_dir);
            // Mappers run as pods mount the DMI directory.
            ec.host_path_allow
                .extend(sedge_devices::twin::dmi_dir_for_pods(
                    &ec.tunnel.data_dir,
                    &dmi_socket,
                ));
            let (mqtt_listen, mqtt_broker) = match &a.mqtt_broker {
                Some(b) => (String::new(), b.clone()),
                None if a.mqtt_port == 0 => ("127.0.0.1:0".to_string(), String::new()),
                None => (
                    format!("127.0.0.1:{}", a.mqtt_port as usize + i),
                    String::new(),
                ),
            };
            let devices = Arc::new(sedge_devices::twin::DeviceTwin::new(
                sedge_devices::twin::DeviceTwinConfig {
                    dmi_socket: dmi_socket.clone(),
                    mqtt_listen,
                    mqtt_broker,
                },
            ));
            edges.push(
                EdgeCore::start(ec, vec![ai_module.clone(), devices.clone()])
                    .await
                    .with_context(|| format!("starting {node}"))?,
            );
            let mqtt = devices.mqtt_address().unwrap_or_default().to_string();
            dmi.push((dmi_socket, mqtt));
        }
        let state = json!({
            "kubeconfig": server.kubeconfig,
            "apiserver": server.url,
            "hub": cloud.hub.addr().to_string(),
            "metrics": ops.as_ref().map(|(a, _)| format!("http://{a}/metrics")),
            "edges": edges.iter().zip(&dmi).map(|(e, (d, m))| json!({"node": e.node(), "metaserver": e.metaserver.map(|a| format!("http://{a}")), "metrics": e.metrics.map(|a| format!("http://{a}/metrics")), "dmi": d, "mqtt": m})).collect::<Vec<_>>(),
        });
        sedge_pki::write_file(
            &dir.join("up.json"),
            &serde_json::to_string_pretty(&state)?,
            false,
        )?;
        Ok(Up {
            server,
            cloud,
            edges,
            ai,
            ops,
        })
    }

    /// Stops the AI controller, the edges (and their pods), the cloud core and the API server.
    pub async fn stop(self) {
        if let Some(t) = self.ai {
            t.abort();
            let _ = t.await;
        }
        if let Some((_, t)) = self.ops {
            t.abort();
        }
        for e in self.edges {
            e.shutdown(true).await;
        }
        self.cloud.shutdown().await;
        self.server.shutdown().await;
    }
}

/// Runs `sedge up` until `shutdown` resolves.
pub async fn up(a: UpArgs, shutdown: impl Future<Output = ()>) -> Result<()> {
    let up = Up::start(&a).await?;
    let kc = up.server.kubeconfig.display().to_string();
    eprintln!(
        "sedge is up: API server {}, cloud hub {}, {} edge node(s)",
        up.server.url,
        up.cloud.hub.addr(),
        up.edges.len()
    );
    for e in &up.edges {
        eprintln!(
            "  {}: local API {}",
            e.node(),
            e.metaserver
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|| "off".into())
        );
    }
    eprintln!(
        "\n  export KUBECONFIG={kc}\n  kubectl get nodes\n  kubectl apply -f <manifest with nodeName: edge-1>\n\nCtrl-C stops everything (and the pods)."
    );
    shutdown.await;
    eprintln!("stopping...");
    up.stop().await;
    Ok(())
}

/// Flags of `sedge ai-controller`.
#[derive(Args)]
pub struct AiControllerArgs {
    /// Config file (YAML or JSON); layered as defaults < file < environment.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Print the default config and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Print the sedna.io CRDs (YAML) and exit.
    #[arg(long)]
    print_crds: bool,
    /// Kubeconfig of the cluster (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

/// Runs `sedge ai-controller` until `shutdown` resolves.
pub async fn ai_controller(
    a: AiControllerArgs,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    if a.print_default_config {
        print!("{}", serde_yaml::to_string(&ControllerConfig::default())?);
        return Ok(());
    }
    if a.print_crds {
        print!("{}", sedge_ai_controller::crd::crds_yaml());
        return Ok(());
    }
    let cfg: ControllerConfig = Loader::new(AI_CONTROLLER)
        .file(a.config.as_deref())
        .load(&())?;
    let client = match &a.kubeconfig {
        Some(p) => client_from(p).await?,
        None => kube::Client::try_default()
            .await
            .context("no kubeconfig: pass --kubeconfig or set KUBECONFIG")?,
    };
    let ops = serve_metrics(&cfg.metrics_listen, sedge_ai_controller::metrics::render).await?;
    eprintln!(
        "AI controller running (sedna.io/v1alpha1: Dataset, Model, JointInferenceService, IncrementalLearningJob)"
    );
    let r = sedge_ai_controller::controller::run(client, cfg, shutdown).await;
    if let Some((_, t)) = ops {
        t.abort();
    }
    r?;
    Ok(())
}
