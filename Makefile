# Sedge: the two commands are `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ORT_VERSION := 1.32.0
ORT_DIR := target/onnxruntime
ORT_LIB := $(ORT_DIR)/libonnxruntime.so
FASHION := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CARGO ?= cargo
export ORT_DYLIB_PATH := $(abspath $(ORT_LIB))

.PHONY: help demo test lint fmt build edge-agent images bench bench-exec bench-serve bench-pareto bench-cri bench-edgemark bench-example bench-learning bench-devices bench-scale ort data fonts mqtt cri

help:
	@echo "make demo   - sedge up with two edge nodes and a Deployment through kubectl, then a Sedna"
	@echo "              JointInferenceService on Fashion-MNIST: edge pod -> channel -> cloud pod,"
	@echo "              reported against edge-only and cloud-only"
	@echo "make test   - everything CI runs: fmt check, clippy, the whole test suite (ORT included)"
	@echo "make bench  - benchmark tables: inference pipeline, API server, channel (quick), agent footprint"
	@echo "make edge-agent - the slim edge agent built for size: target/edge/sedge-edge"
	@echo "make images - Sedge's container images (worker, busybox, pause) as OCI archives in target/images,"
	@echo "              imported into the containerd at CRI_SOCKET when it is there"
	@echo "make bench-edgemark - the channel with up to 100,000 simulated QUIC edge nodes"
	@echo "make bench-scale - the whole cloud side (sedge cloud --embedded) against 1,000 hollow edge agents x 10 pods"
	@echo "make bench-example - the Ianvs-style Fashion-MNIST job on all 10,000 test images"
	@echo "make bench-exec - kubectl exec and port-forward through the channel against local spawn and loopback"
	@echo "make bench-serve - the edge worker as an inference endpoint: 1/8/64 clients, joint vs cloud-only vs edge-only"
	@echo "make bench-pareto - joint inference: the least offloading that matches the cloud model, per mining rule"
	@echo "make bench-cri - pod start-up and memory: containers through containerd against processes (root)"
	@echo "make bench-devices - device twins: MQTT and cloud round trips, 1,000 devices, embedded broker vs mosquitto"
	@echo "make bench-learning - incremental learning under a camera shift: 3 rounds, zero human labels"

# Debian's Fashion-MNIST (the demo's data; tests use the sample committed in datasets/).
data: $(FASHION)
$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi

# DejaVu Sans: plotters lays out the benchmark plots' text with it.
FONT := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
fonts: $(FONT)
$(FONT):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq fonts-dejavu-core; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq fonts-dejavu-core; fi

# mosquitto and its clients: the device tests talk MQTT with them (and start a mosquitto).
MOSQUITTO := /usr/bin/mosquitto_pub
mqtt: $(MOSQUITTO)
$(MOSQUITTO):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto mosquitto-clients; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto mosquitto-clients; fi

# containerd for CRI nodes (and the CRI tests, which start a private one as root), runc, the CNI
# plugins, and a static busybox for the busybox and pause images.
CONTAINERD := /usr/bin/containerd
cri: $(CONTAINERD) /bin/busybox
$(CONTAINERD) /bin/busybox:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq containerd runc containernetworking-plugins busybox-static; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq containerd runc containernetworking-plugins busybox-static; fi

# ONNX Runtime's shared library, unpacked from the onnxruntime wheel on PyPI (nothing is installed
# into Python). The version is pinned with the `ort` crate (rc.15 wants ONNX Runtime >= 1.31).
ort: $(ORT_LIB)
$(ORT_LIB):
	@mkdir -p $(ORT_DIR)/wheel
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	    -d $(ORT_DIR)/wheel onnxruntime==$(ORT_VERSION)
	python3 -c 'import glob, os, shutil, sys, zipfile; \
	    whl = glob.glob("$(ORT_DIR)/wheel/onnxruntime-$(ORT_VERSION)-*.whl")[0]; z = zipfile.ZipFile(whl); \
	    name = next(n for n in z.namelist() if os.path.basename(n).startswith("libonnxruntime.so.")); \
	    dst = os.path.join("$(ORT_DIR)", os.path.basename(name)); \
	    shutil.copyfileobj(z.open(name), open(dst, "wb")); os.chmod(dst, 0o755); \
	    link = "$(ORT_LIB)"; os.path.lexists(link) and os.remove(link); os.symlink(os.path.basename(dst), link); print("unpacked", dst)'
	rm -rf $(ORT_DIR)/wheel

build:
	$(CARGO) build --release -p sedge -p sedge-edge

# The slim edge agent as shipped to nodes: built for size (Cargo.toml's `edge` profile) into
# target/edge/sedge-edge; copy the `sedge` binary beside it for pods of sedge/* images.
edge-agent:
	$(CARGO) build --profile edge -p sedge-edge

# Images for CRI nodes: target/images/{worker,busybox,pause}.tar (OCI archives, no registry), imported
# into the containerd at CRI_SOCKET (namespace k8s.io) when that socket exists.
CRI_SOCKET ?= /run/containerd/containerd.sock
images: ort cri
	$(CARGO) build --release -p sedge
	target/release/sedge images build --out target/images $$([ -S $(CRI_SOCKET) ] && echo --import $(CRI_SOCKET))

demo: data ort build
	platform/sedge/examples/platform-demo.sh target/release/sedge
	ai-controller/examples/joint-inference/demo.sh target/release/sedge
	ai-controller/examples/incremental-learning/demo.sh target/release/sedge

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# As root, the CRI tests must run (they start a private containerd); elsewhere they say they skipped.
# `data`: the joint-inference example, run unchanged on CRI nodes, reads Debian's Fashion-MNIST.
test: ort fonts mqtt cri data lint
	SEDGE_REQUIRE_CRI=$$([ "$$(id -u)" = 0 ] && echo 1 || echo 0) $(CARGO) test --workspace

bench: ort
	$(CARGO) run --release -p sedge-benchmarks --bin pipeline
	$(CARGO) run --release -p sedge-benchmarks --bin apiserver
	$(CARGO) run --release -p sedge-benchmarks --bin slowwatch
	$(CARGO) run --release -p sedge-benchmarks --bin edgemark -- --suite quick
	$(CARGO) build --release -p sedge
	$(CARGO) build --profile edge -p sedge-edge
	$(CARGO) run --release -p sedge-benchmarks --bin edgefoot

# The channel at scale: 1k/10k WebSocket and 10k/100k QUIC nodes (several minutes, ~6 GB RAM).
bench-edgemark:
	$(CARGO) run --release -p sedge-benchmarks --bin edgemark -- --suite full

# The whole cloud side in its own process against 1,000 hollow edge agents (the real agent with
# containers that run nothing) in 4 processes: nodes Ready, heartbeat load, 10,000 pods at
# 50/s to Running, kubectl at that size, mass reconnect after kill -9 (a few minutes).
bench-scale:
	$(CARGO) build --release -p sedge --bin sedge
	$(CARGO) run --release -p sedge-benchmarks --bin scalemark -- --nodes 1000 --pods-per-node 10 --rate 50

bench-example: data ort fonts build
	target/release/sedge bench -f benchmarks/examples/fashion-mnist/benchmarkingjob.yaml

# Incremental learning: the edge model retrained from cloud-labelled hard examples of a shifted
# Fashion-MNIST stream, round by round (train, eval, deploy), with forgetting on the original set.
bench-devices: mqtt edge-agent
	$(CARGO) run --release -p sedge-benchmarks --bin devicemark
	$(CARGO) run --release -p sedge-benchmarks --bin devicemark -- --agent target/edge/sedge-edge

# The edge worker's OIP endpoint under 1, 8 and 64 clients: joint inference against cloud-only and
# edge-only, on loopback (ONNX Runtime for both models).
bench-serve: ort
	$(CARGO) run --release -p sedge-benchmarks --bin servemark -- --backend ort

# The joint-inference Pareto front on Debian's 10,000 test images (seconds).
bench-pareto: data ort
	$(CARGO) run --release -p sedge-benchmarks --bin pareto -- --backend ort

# kubectl exec round trips and stdout throughput, port-forward downloads, through the channel.
bench-exec: build
	$(CARGO) run --release -p sedge-benchmarks --bin execmark -- --sedge target/release/sedge

# Pods as containers (a private containerd) against pods as processes: start-up p50/p99, RSS.
bench-cri: cri
	$(CARGO) build --release -p sedge-edge
	$(CARGO) run --release -p sedge-benchmarks --bin crimark

bench-learning: data ort
	$(CARGO) run --release -p sedge-benchmarks --bin learning
