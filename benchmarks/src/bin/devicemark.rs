//! Device twins: round trips and a node with many devices, on the embedded MQTT broker and on a
//! mosquitto in the same run.
//!
//! For each broker, one stack in this process (the embedded API server, the cloud core, one edge
//! agent with its device twin on that broker) and `--devices` KubeEdge Devices bound to the node:
//! 1. MQTT round trip: `twin/update` -> its `/result`, p50/p99;
//! 2. device -> cloud: `twin/update` -> the value in the Device's status (read back through the
//!    API), p50/p99;
//! 3. cloud -> device: a desired value patched in the cloud -> `/twin/update/delta` on MQTT;
//! 4. load: every device updated once a second for `--seconds`, reporting messages/s through the
//!    broker, the lag until every device's last value is in the cloud, and this process's CPU and
//!    RSS growth (everything runs here, so they are the whole stack's).
//!
//! With `--agent <sedge-edge>` the edge agent runs as its own process instead (joined with a
//! token, its embedded broker on a free port, or the mosquitto), and the table adds the agent's
//! own CPU under the load and its RSS idle (devices held) and at the end of the load.
//!
//! `make bench-devices` runs it with the slim agent as shipped (needs `mosquitto`: `make mqtt`).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sedge_devices::twin::{DeviceTwin, DeviceTwinConfig};
use sedge_devices::{Device, DeviceModel};
use sedge_edgecore::{EdgeCore, EdgeCoreConfig, EdgeModule};
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Devices on the node for the load run.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Round trips per measurement.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Run the edge agent as its own process from this binary (`sedge-edge`, e.g.
    /// target/edge/sedge-edge), to measure it alone.
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

struct Row {
    broker: String,
    round_trip: (f64, f64),
    to_cloud: (f64, f64),
    to_device: (f64, f64),
    msgs_per_s: f64,
    lag_s: f64,
    cpu_per_s: f64,
    rss_mib: f64,
    /// The agent alone, when it ran as its own process: CPU per second under the load, RSS
    /// idle (devices held) and after the load (MiB).
    agent: Option<(f64, f64, f64)>,
}

/// Where the edge agent runs.
enum Agent {
    InProcess(EdgeCore),
    Process(Child),
}

/// The broker for a run: the agent's embedded one (on `port`) or an external one.
enum Broker {
    Embedded(u16),
    External(String),
}

/// An MQTT client whose incoming publishes arrive on a channel.
async fn client(
    broker: &str,
    id: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let (h, p) = broker.rsplit_once(':').unwrap();
    let mut o = MqttOptions::new(id, h, p.parse().unwrap());
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    let (c, mut ev) = AsyncClient::new(o, 10_000);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    ev.set_network_options(net);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (c, rx)
}

fn update(value: &str) -> String {
    json!({"event_id": "b", "twin": {"temperature": {"actual": {"value": value}}}}).to_string()
}

async fn reported(devices: &Api<Device>, name: &str) -> Option<String> {
    devices
        .get_status(name)
        .await
        .ok()?
        .status?
        .twins
        .into_iter()
        .find(|t| t.property_name == "temperature")?
        .reported
        .map(|r| r.value)
}

async fn run_one(label: &str, broker: Broker, a: &Args, dir: &Path) -> Result<Row> {
    let server = sedge_apiserver::ApiServer::start(sedge_apiserver::ApiServerConfig {
        data_dir: dir.join("apiserver"),
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await?;
    let kc = kube::config::Kubeconfig::read_from(&server.kubeconfig)?;
    let client_k = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?;
    sedge_devices::install_crds(&client_k).await?;
    let mut cc = sedge_cloudcore::CloudCoreConfig::default();
    cc.hub.data_dir = dir.join("cloudhub");
    cc.hub.pki_dir = dir.join("apiserver/pki");
    cc.hub.listen = "127.0.0.1:0".into();
    cc.hub.listen_quic = String::new();
    let cloud = sedge_cloudcore::CloudCore::start(client_k.clone(), cc, Vec::new()).await?;
    let yaml = format!(
        "metaserver_listen: ''\nmetrics_listen: ''\nnode_ip: 127.0.0.1\ntunnel:\n  node_name: edge-1\n  cloud: {}\n  data_dir: {}\n",
        cloud.hub.addr(),
        dir.join("edge-1").display()
    );
    let (token, _) = cloud
        .hub
        .tokens()
        .create(Duration::from_secs(300), "devicemark")?;
    let (agent, broker) = match &a.agent {
        None => {
            let cfg: EdgeCoreConfig = serde_yaml::from_str(&yaml)?;
            sedge_tunnel::join(&cfg.tunnel, &token).await?;
            let twin = Arc::new(DeviceTwin::new(match &broker {
                Broker::Embedded(port) => DeviceTwinConfig {
                    mqtt_listen: format!("127.0.0.1:{port}"),
                    ..Default::default()
                },
                Broker::External(b) => DeviceTwinConfig {
                    mqtt_broker: b.clone(),
                    ..Default::default()
                },
            }));
            let core = EdgeCore::start(cfg, vec![twin.clone() as Arc<dyn EdgeModule>]).await?;
            let addr = twin
                .mqtt_address()
                .context("the device twin has no broker")?
                .to_string();
            (Agent::InProcess(core), addr)
        }
        Some(bin) => {
            std::fs::create_dir_all(dir)?;
            let cfg = dir.join("edge-1.yaml");
            std::fs::write(&cfg, &yaml)?;
            let (flag, addr) = match &broker {
                Broker::Embedded(port) => ("--mqtt-listen", format!("127.0.0.1:{port}")),
                Broker::External(b) => ("--mqtt-broker", b.clone()),
            };
            let child = Command::new(bin)
                .args(["--token", &token, "--lc-listen", "127.0.0.1:0", flag, &addr])
                .arg("--config")
                .arg(&cfg)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting the agent {}", bin.display()))?;
            // Its broker (or the external one) takes connections once it is up.
            let t0 = Instant::now();
            while tokio::net::TcpStream::connect(&addr).await.is_err() {
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("the agent's broker {addr} never came up");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (Agent::Process(child), addr)
        }
    };

    let models = Api::<DeviceModel>::namespaced(client_k.clone(), "default");
    let devices = Api::<Device>::namespaced(client_k.clone(), "default");
    models
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
                "metadata": {"name": "thermo"},
                "spec": {"protocol": "modbus", "properties": [
                    {"name": "temperature", "type": "INT", "accessMode": "ReadOnly"},
                    {"name": "enable", "type": "BOOLEAN", "accessMode": "ReadWrite"}]}
            }))?,
        )
        .await?;
    let n = a.devices.max(1);
    for i in 0..n {
        let d: Device = serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": format!("d{i}")},
            "spec": {"deviceModelRef": {"name": "thermo"}, "nodeName": "edge-1",
                     "protocol": {"protocolName": "modbus"},
                     "properties": [{"name": "temperature"}, {"name": "enable", "desired": {"value": "true"}}]}
        }))?;
        devices.create(&PostParams::default(), &d).await?;
    }
    let (mq, mut rx) = client(&broker, &format!("bench-{label}")).await;
    mq.subscribe("$hw/events/device/+/+/twin/update/result", QoS::AtMostOnce)
        .await?;
    mq.subscribe("$hw/events/device/+/+/twin/update/delta", QoS::AtMostOnce)
        .await?;
    let topic = |i: usize| format!("$hw/events/device/default/d{i}/twin/update");
    // Wait until the node holds the last device (its update is answered without an error).
    let t0 = Instant::now();
    loop {
        mq.publish(topic(n - 1), QoS::AtMostOnce, false, update("0"))
            .await?;
        let got = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        if let Ok(Some((_, body))) = got
            && !String::from_utf8_lossy(&body).contains("\"code\"")
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the node never got its devices");
        }
    }
    while rx.try_recv().is_ok() {}

    // 1. MQTT round trip.
    let mut rt = Vec::new();
    for s in 0..a.samples {
        let t = Instant::now();
        mq.publish(topic(0), QoS::AtMostOnce, false, update(&s.to_string()))
            .await?;
        loop {
            let (tp, _) = rx.recv().await.context("bus closed")?;
            if tp.ends_with("/result") && tp.contains("/d0/") {
                break;
            }
        }
        rt.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // 2. Device -> cloud.
    let mut up = Vec::new();
    for s in 0..a.samples.min(100) {
        let v = format!("{}", 1000 + s);
        let t = Instant::now();
        mq.publish(topic(1 % n), QoS::AtMostOnce, false, update(&v))
            .await?;
        while reported(&devices, &format!("d{}", 1 % n)).await.as_deref() != Some(v.as_str()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
            if t.elapsed() > Duration::from_secs(30) {
                bail!("a report never reached the cloud");
            }
        }
        up.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // 3. Cloud -> device (a delta on MQTT).
    let mut down = Vec::new();
    while rx.try_recv().is_ok() {}
    for s in 0..a.samples.min(50) {
        let v = if s % 2 == 0 { "false" } else { "true" };
        let t = Instant::now();
        devices
            .patch(
                "d0",
                &PatchParams::default(),
                &Patch::Json::<()>(serde_json::from_value(json!([
                    {"op": "replace", "path": "/spec/properties/1/desired/value", "value": v}
                ]))?),
            )
            .await?;
        loop {
            let (tp, body) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("no delta")?
                .context("bus closed")?;
            if tp.ends_with("/delta")
                && tp.contains("/d0/")
                && String::from_utf8_lossy(&body).contains(&format!("\"enable\":\"{v}\""))
            {
                break;
            }
        }
        down.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // 4. Load: every device once a second.
    let agent_pid = match &agent {
        Agent::Process(c) => Some(c.id()),
        Agent::InProcess(_) => None,
    };
    let agent_cpu0 = agent_pid.map(|p| sedge_benchmarks::cpu_seconds(Some(p)));
    let agent_idle = agent_pid.map(|p| sedge_benchmarks::rss_kib(Some(p)));
    let (cpu0, rss0) = (
        sedge_benchmarks::cpu_seconds(None),
        sedge_benchmarks::rss_kib(None),
    );
    let t_load = Instant::now();
    let mut results = 0usize;
    let mut last: HashMap<usize, String> = HashMap::new();
    for sec in 0..a.seconds {
        let tick = Instant::now();
        for i in 0..n {
            let v = format!("{}", sec * 10 + (i as u64 % 10));
            mq.publish(topic(i), QoS::AtMostOnce, false, update(&v))
                .await?;
            last.insert(i, v);
        }
        while tick.elapsed() < Duration::from_secs(1) {
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
                results += 1;
            }
        }
    }
    let load_s = t_load.elapsed().as_secs_f64();
    // Lag: until every device's last value is in the cloud.
    let t_lag = Instant::now();
    for (i, v) in &last {
        while reported(&devices, &format!("d{i}")).await.as_deref() != Some(v.as_str()) {
            if t_lag.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{label}: d{i}'s last value {v} never reached the cloud (it shows {:?})",
                    reported(&devices, &format!("d{i}")).await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let lag = t_lag.elapsed().as_secs_f64();
    let (cpu1, rss1) = (
        sedge_benchmarks::cpu_seconds(None),
        sedge_benchmarks::rss_kib(None),
    );
    let agent_row = match (agent_pid, agent_cpu0, agent_idle) {
        (Some(p), Some(c0), Some(idle)) => Some((
            (sedge_benchmarks::cpu_seconds(Some(p)) - c0) / (load_s + lag),
            idle as f64 / 1024.0,
            sedge_benchmarks::rss_kib(Some(p)) as f64 / 1024.0,
        )),
        _ => None,
    };
    match agent {
        Agent::InProcess(core) => core.shutdown(false).await,
        Agent::Process(mut c) => {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    cloud.shutdown().await;
    server.shutdown().await;
    Ok(Row {
        broker: label.into(),
        round_trip: (pct(&mut rt.clone(), 0.5), pct(&mut rt, 0.99)),
        to_cloud: (pct(&mut up.clone(), 0.5), pct(&mut up, 0.99)),
        to_device: (pct(&mut down.clone(), 0.5), pct(&mut down, 0.99)),
        msgs_per_s: results as f64 / load_s,
        lag_s: lag,
        cpu_per_s: (cpu1 - cpu0) / (load_s + lag),
        rss_mib: (rss1 as f64 - rss0 as f64) / 1024.0,
        agent: agent_row,
    })
}

fn mosquitto(port: u16) -> Result<Child> {
    let program = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto");
    // As the embedded broker and the clients do: no Nagle delay on small messages.
    let conf = std::env::temp_dir().join(format!("devicemark-mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"),
    )?;
    Command::new(program)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (make mqtt installs it)")
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let mut rows = Vec::new();
    let dir = tempfile::tempdir()?;
    rows.push(
        run_one(
            "embedded",
            Broker::Embedded(sedge_benchmarks::free_port()?),
            &a,
            &dir.path().join("embedded"),
        )
        .await?,
    );
    let port = sedge_benchmarks::free_port()?;
    let mut m = mosquitto(port)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = run_one(
        "mosquitto",
        Broker::External(format!("127.0.0.1:{port}")),
        &a,
        &dir.path().join("mosquitto"),
    )
    .await;
    let _ = m.kill();
    let _ = m.wait();
    rows.push(r?);
    println!(
        "\nDevice twins: {} devices on one node, each updated once a second for {} s ({} round trips per measurement)\n",
        a.devices, a.seconds, a.samples
    );
    let alone = a.agent.is_some();
    let (what, stack) = if alone {
        (
            " | agent CPU under load | agent RSS idle / after load",
            "API server + cloud core",
        )
    } else {
        ("", "whole stack")
    };
    println!(
        "| broker | MQTT update -> result p50 / p99 | device -> cloud status p50 / p99 | cloud desired -> MQTT delta p50 / p99 | answers received/s under load | last value in the cloud after load | CPU ({stack}) | RSS growth ({stack}){what} |"
    );
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:{}|",
        if alone { "|---:|---:" } else { "" }
    );
    for r in &rows {
        let agent = match r.agent {
            Some((cpu, idle, end)) => format!(
                " | {:.0}% of a core | {idle:.1} / {end:.1} MiB",
                cpu * 100.0
            ),
            None => String::new(),
        };
        println!(
            "| {} | {:.2} / {:.2} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.0} | {:.2} s | {:.0}% of a core | {:.1} MiB{agent} |",
            r.broker,
            r.round_trip.0,
            r.round_trip.1,
            r.to_cloud.0,
            r.to_cloud.1,
            r.to_device.0,
            r.to_device.1,
            r.msgs_per_s,
            r.lag_s,
            r.cpu_per_s * 100.0,
            r.rss_mib
        );
    }
    Ok(())
}
