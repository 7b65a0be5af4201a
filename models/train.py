#!/usr/bin/env python3
"""Train Sedge's Fashion-MNIST edge and cloud classifiers and export them as ONNX.

Run once, by hand (torch is a multi-gigabyte CUDA build on PyPI; neither CI nor `make test` needs it):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch onnx onnxscript onnxruntime numpy
    /tmp/torchvenv/bin/python models/train.py

Reads the gzipped IDX files installed by Debian's `dataset-fashion-mnist` (or --data DIR) and writes
`models/fashion-mnist/{edge,cloud}-cnn.onnx`: single files, no external data, input `x` of shape
[N,1,28,28] (pixels / 255), output `logits` of shape [N,10]. The accuracies in models/README.md are
measured afterwards by the Rust loader (`sedge infer`), not taken from this script's log.
"""
import argparse
import gzip
import os
import struct
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, 1, rows, cols)
    if magic == 0x801:
        return np.frombuffer(data, np.uint8, offset=8)
    raise ValueError(f"{path}: bad IDX magic {magic:#x}")


def edge_cnn():
    """Tiny CNN for the edge: about 52k parameters (BatchNorm is folded into Conv on export)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def cloud_cnn():
    """Bigger CNN for the cloud: about 0.83M parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(256, 10),
    )


def train(model, x, y, xt, yt, epochs, lr, flip):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        t0 = time.time()
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            if flip:
                mask = torch.rand(len(xb)) < 0.5
                xb = torch.where(mask[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, xt, yt)
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} test acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return model


@torch.no_grad()
def evaluate(model, xt, yt):
    model.eval()
    correct = sum((model(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum().item() for i in range(0, len(xt), 1000))
    return correct / len(xt)


def export(model, path):
    model.eval()
    example = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(
        model, (example,), path, input_names=["x"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("N")},), dynamo=True, external_data=False,
    )
    import onnx
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    print(f"  wrote {path} ({os.path.getsize(path)} bytes, inputs {[i.name for i in m.graph.input]}, "
          f"outputs {[o.name for o in m.graph.output]})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default=os.path.join(HERE, "fashion-mnist"))
    ap.add_argument("--edge-epochs", type=int, default=15)
    ap.add_argument("--cloud-epochs", type=int, default=12)
    ap.add_argument("--only", choices=["edge", "cloud"])
    args = ap.parse_args()
    torch.manual_seed(0)
    # One thread: with two cores, more threads thrash (measured 3x slower per batch).
    torch.set_num_threads(1)
    load = lambda name: read_idx(os.path.join(args.data, name))
    x = torch.from_numpy(load("train-images-idx3-ubyte.gz").astype(np.float32) / 255.0)
    y = torch.from_numpy(load("train-labels-idx1-ubyte.gz").astype(np.int64))
    xt = torch.from_numpy(load("t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0)
    yt = torch.from_numpy(load("t10k-labels-idx1-ubyte.gz").astype(np.int64))
    os.makedirs(args.out, exist_ok=True)
    for name, build, epochs, lr, flip in [
        ("edge", edge_cnn, args.edge_epochs, 3e-3, False),
        ("cloud", cloud_cnn, args.cloud_epochs, 2e-3, True),
    ]:
        if args.only and args.only != name:
            continue
        model = build()
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params} trainable parameters, {epochs} epochs", flush=True)
        train(model, x, y, xt, yt, epochs, lr, flip)
        export(model, os.path.join(args.out, f"{name}-cnn.onnx"))


if __name__ == "__main__":
    main()
