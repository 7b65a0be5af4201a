#!/usr/bin/env bash
# The platform part of `make demo`: `sedge up` with two edge nodes, a Deployment applied with
# kubectl, its pods' logs and exec through the channel, and a clean stop. Usage: platform-demo.sh <sedge>
set -euo pipefail
SEDGE=${1:-target/release/sedge}
DIR=$(mktemp -d)
trap 'kill -INT $UP 2>/dev/null || true; wait $UP 2>/dev/null || true; rm -rf "$DIR"' EXIT
"$SEDGE" up --edges 2 --listen 127.0.0.1:0 --metaserver-port 0 --metrics-port 0 --mqtt-port 0 --data-dir "$DIR/up" 2> "$DIR/up.log" &
UP=$!
for _ in $(seq 100); do [ -f "$DIR/up/up.json" ] && break; sleep 0.2; done
[ -f "$DIR/up/up.json" ] || { cat "$DIR/up.log"; echo "sedge up did not start" >&2; exit 1; }
export KUBECONFIG="$DIR/up/kubeconfig"
k() { echo "\$ kubectl $*"; kubectl "$@"; }
for _ in $(seq 50); do kubectl get node edge-2 >/dev/null 2>&1 && break; sleep 0.2; done
k get nodes -o wide
k apply -f "$(dirname "$0")/hello-edge.yaml"
k rollout status deployment/hello --timeout=60s
k get pods -o wide
sleep 2
POD=$(kubectl get pods -l app=hello -o jsonpath='{.items[0].metadata.name}')
k logs "$POD" --tail=2
k exec "$POD" -- sh -c 'echo "hello from $HOSTNAME on the edge"'
MS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['edges'][0]['metaserver'])" "$DIR/up/up.json")
echo "\$ kubectl --server $MS get pods   # edge-1's local API, served from its SQLite store"
kubectl --kubeconfig /dev/null --server "$MS" get pods -o name
k delete deployment hello
echo
