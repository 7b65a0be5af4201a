//! Device twins over MQTT with the real clients users have (`mosquitto_pub`, `mosquitto_sub`):
//! against the node's embedded broker and against an external `mosquitto` the test starts. A
//! twin update on KubeEdge's topic is answered on `/result` and `/document` and its actual value
//! reaches `kubectl get device`; bad payloads, an unknown device and an oversize value get an
//! error result naming the problem; a desired value set with kubectl comes out as a `/delta`.

mod common;

use common::kubectl_at as kubectl;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sedge::platform::{Up, UpArgs};

fn args(dir: &Path, mqtt_broker: Option<String>) -> UpArgs {
    UpArgs {
        mqtt_broker,
        ..UpArgs::local(dir)
    }
}

fn host_port(addr: &str) -> (String, String) {
    let (h, p) = addr.rsplit_once(':').unwrap();
    (h.to_string(), p.to_string())
}

/// Subscribes to `topic` with mosquitto_sub and publishes `payload` on `to` with mosquitto_pub
/// until the first message arrives on `topic` (the subscription may not be in place for the
/// first publish); returns it.
fn ask(broker: &str, to: &str, payload: &str, topic: &str) -> String {
    let (h, p) = host_port(broker);
    let sub = Command::new("mosquitto_sub")
        .args(["-h", &h, "-p", &p, "-t", topic, "-C", "1", "-W", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (make test installs mosquitto-clients)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sub = Some(sub);
    loop {
        let status = Command::new("mosquitto_pub")
            .args(["-h", &h, "-p", &p, "-t", to, "-m", payload])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success(), "mosquitto_pub to {to} failed");
        if let Some(done) = wait_exit(sub.as_mut().unwrap(), Duration::from_millis(300)) {
            let out = sub.take().unwrap().wait_with_output().unwrap();
            assert!(done, "mosquitto_sub on {topic} ended without a message");
            return String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(Instant::now() < deadline, "no message on {topic}");
    }
}

/// Waits up to `limit` for `c` to exit; `Some(success)` if it did.
fn wait_exit(c: &mut Child, limit: Duration) -> Option<bool> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s.success());
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const TWIN: &str = "$hw/events/device/default/thermometer-1/twin/update";

async fn applied(dir: &Path, mqtt_broker: Option<String>) -> (Up, PathBuf, String) {
    let (up, kc, state) = common::up_with_thermometer(&args(dir, mqtt_broker)).await;
    let broker = state["edges"][0]["mqtt"].as_str().unwrap().to_string();
    // The node holds the device once its membership lists it.
    let b = broker.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = ask(
                &b,
                "$hw/events/node/edge-1/membership/get",
                r#"{"event_id":"m1"}"#,
                "$hw/events/node/edge-1/membership/get/result",
            );
            if r.contains("thermometer-1") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "edge-1 never listed the device: {r}"
            );
        }
    })
    .await
    .unwrap();
    (up, kc, broker)
}

fn reported(kc: &Path) -> String {
    kubectl(
        kc,
        &[
            "get",
            "device",
            "thermometer-1",
            "-o",
            "jsonpath={.status.twins[?(@.propertyName==\"temperature\")].reported.value}",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_over_the_embedded_broker_with_mosquitto_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (up, kc, broker) = applied(dir.path(), None).await;
    let b = broker.clone();
    let k = kc.clone();
    tokio::task::spawn_blocking(move || {
        // An actual value: the result echoes it, the document shows last and current.
        let update = r#"{"event_id":"e1","timestamp":1,"twin":{"temperature":{"actual":{"value":"19"},"metadata":{"type":"int"}}}}"#;
        let result = ask(&b, TWIN, update, &format!("{TWIN}/result"));
        assert!(result.contains(r#""event_id":"e1""#) && result.contains(r#""19""#), "{result}");
        let doc = ask(&b, TWIN, update, &format!("{TWIN}/document"));
        assert!(doc.contains(r#""current""#) && doc.contains(r#""19""#), "{doc}");
        // ... and reaches the Device's status in the cloud.
        let deadline = Instant::now() + Duration::from_secs(30);
        while reported(&k) != "19" {
            assert!(Instant::now() < deadline, "19 never reached the status");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Bad input gets an error result naming the problem; nothing is stored.
        for (payload, want) in [
            ("not json", r#""code":400"#),
            (r#"{"event_id":"e2","twin":{"pressure":{"actual":{"value":"1"}}}}"#, "pressure"),
            (r#"{"event_id":"e3","twin":{"temperature":{"actual":{"value":7}}}}"#, "must be a string"),
            (r#"{"event_id":"e6","twin":{"temperature-enable":{"expected":{"value":false}}}}"#, "expected.value must be a string"),
            (r#"{"event_id":"e7","twin":{"pressure":{"expected":{"value":"1"}}}}"#, "pressure"),
        ] {
            let r = ask(&b, TWIN, payload, &format!("{TWIN}/result"));
            assert!(r.contains(want) && r.contains("code"), "{payload}: {r}");
        }
        let big = format!(
            r#"{{"event_id":"e4","twin":{{"temperature":{{"actual":{{"value":"{}"}}}}}}}}"#,
            "9".repeat(600)
        );
        let r = ask(&b, TWIN, &big, &format!("{TWIN}/result"));
        assert!(r.contains("at most 512"), "{r}");
        let ghost = "$hw/events/device/default/ghost/twin/update";
        let r = ask(&b, ghost, r#"{"event_id":"e5","twin":{}}"#, &format!("{ghost}/result"));
        assert!(r.contains(r#""code":404"#) && r.contains("default/ghost"), "{r}");
        assert_eq!(reported(&k), "19", "a refused update changed nothing");
        // A desired value set in the cloud comes out as a delta (and again after each report
        // of an actual value that differs, so a subscription that came late still gets one).
        let (h, p) = host_port(&b);
        let mut sub = Command::new("mosquitto_sub")
            .args(["-h", &h, "-p", &p, "-t", &format!("{TWIN}/delta"), "-C", "1", "-W", "30"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        kubectl(
            &k,
            &common::PATCH_ENABLE_OFF,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0.. {
            if wait_exit(&mut sub, Duration::from_millis(500)).is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "no delta");
            let report = format!(
                r#"{{"event_id":"p{i}","twin":{{"temperature-enable":{{"actual":{{"value":"true"}}}}}}}}"#
            );
            let sent = Command::new("mosquitto_pub")
                .args(["-h", &h, "-p", &p, "-t", TWIN, "-m", &report])
                .status()
                .unwrap();
            assert!(sent.success());
        }
        let out = sub.wait_with_output().unwrap();
        let delta = String::from_utf8_lossy(&out.stdout);
        assert!(delta.contains(r#""temperature-enable":"false""#), "{delta}");
        // With KubeEdge's versions: the cloud's change is generation 2, no local change yet.
        assert!(
            delta.contains(r#""expected_version":{"cloud":2,"edge":0}"#),
            "{delta}"
        );
    })
    .await
    .unwrap();
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_over_an_external_mosquitto() {
    let port = sedge_testkit::port::free();
    // Debian puts the broker in /usr/sbin, which a user's PATH may lack.
    let program = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto");
    let mut mosquitto = Command::new(program)
        .args(["-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (make test installs it)");
    let dir = tempfile::tempdir().unwrap();
    let (up, kc, broker) = applied(dir.path(), Some(format!("127.0.0.1:{port}"))).await;
    assert_eq!(broker, format!("127.0.0.1:{port}"));
    let k = kc.clone();
    tokio::task::spawn_blocking(move || {
        let update = r#"{"event_id":"x1","twin":{"temperature":{"actual":{"value":"31"}}}}"#;
        let r = ask(&broker, TWIN, update, &format!("{TWIN}/result"));
        assert!(r.contains(r#""31""#), "{r}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while reported(&k) != "31" {
            assert!(Instant::now() < deadline, "31 never reached the status");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    up.stop().await;
    let _ = mosquitto.kill();
    let _ = mosquitto.wait();
}
