#!/usr/bin/env bash
# The incremental-learning part of `make demo`: `sedge up`, a cloud model server labelling hard
# examples (`sedge worker cloud` on 127.0.0.1:5070), the manifests in this directory applied
# with kubectl, and `kubectl get il` as the job goes round Train -> Eval -> Deploy: hard
# examples collected on the node, a train pod fine-tuning the edge model in Rust, an eval pod
# scoring it against the deployed one, and the new model swapped into the running worker.
# The before/after accuracy under a camera shift is `make bench-learning`'s table.
# Usage: demo.sh <sedge> [rounds]
set -euo pipefail
SEDGE=${1:-target/release/sedge}
ROUNDS=${2:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
DIR=$(mktemp -d)
cleanup() {
  kill -INT "${UP:-}" 2>/dev/null || true; wait "${UP:-}" 2>/dev/null || true
  kill "${CLOUD:-}" 2>/dev/null || true; wait "${CLOUD:-}" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
DEMO=/tmp/sedge-il-demo
rm -rf "$DEMO"
mkdir -p "$DEMO"/{initial,deployed,hard}
for d in initial deployed; do cp "$ROOT"/models/fashion-mnist/edge-cnn.{onnx,json} "$DEMO/$d/"; done
"$SEDGE" worker cloud --model "$ROOT/models/fashion-mnist/cloud-cnn.onnx" --listen 127.0.0.1:5070 2> "$DIR/cloud.log" &
CLOUD=$!
"$SEDGE" up --edges 1 --listen 127.0.0.1:0 --metaserver-port 0 --metrics-port 0 --mqtt-port 0 --data-dir "$DIR/up" \
  --host-path-allow /tmp 2> "$DIR/up.log" &
UP=$!
for _ in $(seq 100); do [ -f "$DIR/up/up.json" ] && break; sleep 0.2; done
[ -f "$DIR/up/up.json" ] || { cat "$DIR/up.log"; echo "sedge up did not start" >&2; exit 1; }
export KUBECONFIG="$DIR/up/kubeconfig"
k() { echo "\$ kubectl $*"; kubectl "$@"; }
kubectl wait --for=condition=Ready node/edge-1 --timeout=60s >/dev/null
k apply -f "$HERE"
version() { kubectl get il fashion-mnist -o jsonpath='{.status.modelVersion}'; }
echo "waiting for $ROUNDS deployed rounds (kubectl get il every 5 s)..."
for _ in $(seq 240); do
  kubectl get il fashion-mnist --no-headers
  v=$(version); n=${v#round-}
  if [ "$v" != "initial" ] && [ -n "$v" ] && [ "$n" -ge "$ROUNDS" ] 2>/dev/null; then break; fi
  sleep 5
done
v=$(version); n=${v#round-}
if ! { [ "$v" != initial ] && [ "$n" -ge "$ROUNDS" ] 2>/dev/null; }; then
  k get il fashion-mnist -o yaml | tail -40; tail -30 "$DIR/up.log"
  echo "the job did not deploy $ROUNDS rounds" >&2; exit 1
fi
k get il fashion-mnist -o wide
echo
echo "the stages the job went through (its conditions):"
kubectl get il fashion-mnist -o jsonpath='{range .status.conditions[*]}{.stage}/{.type}{"\t"}{.reason}{"\t"}{.message}{"\n"}{end}' | tail -16
echo
echo "the last eval (new model, and new minus deployed, on the round's pseudo-labelled eval split):"
kubectl get il fashion-mnist -o jsonpath='{.status.lastEval}'; echo
echo
echo "the inference worker swapped models without restarting:"
kubectl logs -l incrementallearningjob.sedna.io/worker-type=inference --tail=-1 | grep "hot update" | sed 's/^.*INFO //'
k get pods
k delete -f "$HERE"
