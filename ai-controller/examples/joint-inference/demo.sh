#!/usr/bin/env bash
# The joint-inference part of `make demo`: `sedge up` (one edge node, one cloud node, the AI
# controller), the Sedna manifests in this directory applied with kubectl, the edge pod working
# through Fashion-MNIST's 10,000 test images and offloading hard examples to the cloud pod through
# the cloud-edge channel, then the report (the joint row is what the edge pod measured; the
# edge-only and cloud-only rows are run in-process on the same images for comparison).
# Usage: demo.sh <sedge>
set -euo pipefail
SEDGE=${1:-target/release/sedge}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
DIR=$(mktemp -d)
trap 'kill -INT $UP 2>/dev/null || true; wait $UP 2>/dev/null || true; rm -rf "$DIR"' EXIT
# The Model manifests name /tmp/sedge-demo/models (a path on the node).
mkdir -p /tmp/sedge-demo/models
cp "$ROOT"/models/fashion-mnist/{edge,cloud}-cnn.{onnx,json} /tmp/sedge-demo/models/
# The edge worker reads Debian's Fashion-MNIST through a hostPath volume; the models are under /tmp.
"$SEDGE" up --edges 1 --listen 127.0.0.1:0 --metaserver-port 0 --metrics-port 0 --mqtt-port 0 --data-dir "$DIR/up" \
    --host-path-allow /tmp --host-path-allow /usr/share/datasets/fashion-mnist 2> "$DIR/up.log" &
UP=$!
for _ in $(seq 100); do [ -f "$DIR/up/up.json" ] && break; sleep 0.2; done
[ -f "$DIR/up/up.json" ] || { cat "$DIR/up.log"; echo "sedge up did not start" >&2; exit 1; }
export KUBECONFIG="$DIR/up/kubeconfig"
k() { echo "\$ kubectl $*"; kubectl "$@"; }
kubectl wait --for=condition=Ready node/edge-1 node/cloud-1 --timeout=60s >/dev/null
k get nodes -L sedge.io/role
k apply -f "$HERE"
k wait --for=condition=Running jointinferenceservice/fashion-mnist --timeout=120s
metric() { kubectl get ji fashion-mnist -o jsonpath="{.status.metrics[?(@.key==\"$1\")].value}"; }
echo "waiting for the edge worker to get through the 10,000 test images..."
for _ in $(seq 600); do [ "$(metric inferenceNumber)" = 10000 ] && break; sleep 0.5; done
[ "$(metric inferenceNumber)" = 10000 ] || { tail -30 "$DIR/up.log"; echo "the edge worker did not finish" >&2; exit 1; }
k get ji fashion-mnist -o wide
k get pods -o wide
echo
echo "the edge worker as a service: 12 test images sent to the edge node's port 18000 (OIP REST)"
python3 - <<'PY'
import gzip, json, urllib.request
raw = gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").read()[16:]
for i in range(12):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                   "data": list(raw[i * 784:(i + 1) * 784])}]}).encode()
    req = urllib.request.Request("http://127.0.0.1:18000/v2/models/edge-cnn/infer", body,
                                 {"Content-Type": "application/json"})
    r = json.load(urllib.request.urlopen(req, timeout=30))
    p = r["outputs"][0]["data"]
    label = max(range(len(p)), key=p.__getitem__)
    print(f"  image {i:2}: class {label} (p={p[label]:.2f}), answered by {r['parameters']['answered_by']}")
PY
SUMMARY="$DIR/joint.json"
kubectl logs -l jointinferenceservice.sedna.io/worker-type=edge --tail=-1 | sed -n 's/^summary: //p' | tail -1 > "$SUMMARY"
[ -s "$SUMMARY" ] || { echo "no summary in the edge worker's log" >&2; exit 1; }
echo
"$SEDGE" demo --joint-summary "$SUMMARY" --models "$ROOT/models/fashion-mnist" --backend tract
echo
k delete -f "$HERE"
for _ in $(seq 100); do [ -z "$(kubectl get pods -o name)" ] && break; sleep 0.2; done
k get deploy,svc,pods
