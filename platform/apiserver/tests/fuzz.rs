//! The API server's body decoders under mutated input, through the real server: JSON, YAML and
//! protobuf bodies. Every answer is a 2xx or a 4xx naming the problem, never a 5xx, and what
//! was stored before is unchanged. The protobuf decoder is also run directly (it is cheap).

mod common;

use common::*;

const YAML: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: seed\n  labels: {app: web}\ndata:\n  mode: fast\n  list: \"[1, 2]\"\n";

fn field(n: u32, b: &[u8]) -> Vec<u8> {
    let mut out = vec![((n << 3) | 2) as u8];
    let mut len = b.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(b);
    out
}

fn protobuf_config_map() -> Vec<u8> {
    let meta = [
        field(1, b"seed"),
        field(11, &[field(1, b"app"), field(2, b"web")].concat()),
    ]
    .concat();
    let data = [field(1, b"mode"), field(2, b"fast")].concat();
    let raw = [field(1, &meta), field(2, &data)].concat();
    let tm = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
    let unknown = [field(1, &tm), field(2, &raw)].concat();
    [b"k8s\0".to_vec(), unknown].concat()
}

#[test]
fn protobuf_decoder() {
    let seed = protobuf_config_map();
    assert!(sedge_apiserver::protobuf::to_json(&seed).is_ok());
    let stats = sedge_testkit::fuzz::run(&[&seed], 50_000, |b| {
        sedge_apiserver::protobuf::to_json(b).is_ok()
    });
    eprintln!("{stats:?}");
    assert!(stats.accepted > 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_bodies_through_the_server() {
    let t = start().await;
    let client = t.client().await;
    let post = |ct: &str, body: &[u8]| {
        http::Request::post("/api/v1/namespaces/default/configmaps")
            .header("content-type", ct)
            .body(body.to_vec())
            .unwrap()
    };
    client
        .request_text(post("application/yaml", YAML.as_bytes()))
        .await
        .unwrap();
    let seed = || {
        http::Request::get("/api/v1/namespaces/default/configmaps/seed")
            .body(Vec::new())
            .unwrap()
    };
    let before = client.request_text(seed()).await.unwrap();
    let json = serde_json::to_vec(&serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "seed2"}, "data": {"a": "b"}})).unwrap();
    let proto = protobuf_config_map();
    let rt = tokio::runtime::Handle::current();
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    let stats = tokio::task::block_in_place(|| {
        sedge_testkit::fuzz::run(&[YAML.as_bytes(), &json, &proto], 1500, |b| {
            let ct = match b.first() {
                Some(b'{') => "application/json",
                Some(b'k') => "application/vnd.kubernetes.protobuf",
                _ => "application/yaml",
            };
            let code = match rt.block_on(client.request_text(post(ct, b))) {
                Ok(_) => 201,
                Err(kube::Error::Api(s)) => s.code,
                Err(e) => panic!("no Status for a {} byte body: {e}", b.len()),
            };
            *codes.entry(code).or_default() += 1;
            assert!(code < 500, "{code} for a {} byte {ct} body", b.len());
            code == 201
        })
    });
    eprintln!("{stats:?} {codes:?}");
    let after = client.request_text(seed()).await.unwrap();
    assert_eq!(before, after, "a stored object changed");
    t.server.shutdown().await;
}
