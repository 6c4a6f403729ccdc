"""Load test of `fruitnet serve` against `fruitnet predict` on the same photos, in the same run.

    .venv/bin/python bench/bench_serve.py [--data ../shared/data/webfruit] [--model FILE]
                                          [--requests 500] [--clients 16] [--no-onnx]

Starts `fruitnet serve` (uvicorn) as a subprocess on a free loopback port, sends --requests
single-photo POST /predict requests from --clients concurrent clients (photos taken in order from
--data, cycling), checks every answer is 200, and reports p50/p95 latency and throughput; then runs
Predictor.predict_paths (what `fruitnet predict` runs, batch 32) on the same photos.  With ONNX
(default) it also exports the model and serves the .onnx file.  Prints a markdown table and writes
it to bench/results/serve.md.  Without --model it uses EfficientNet-Lite0 with an untrained head:
the speed is the same as for a trained one.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "webfruit"
sys.path.insert(0, str(ROOT / "tests"))
from quick_model import make_quick_model, serving  # noqa: E402 (the helpers the tests use)


def load_test(url: str, photos: list[tuple[str, bytes]], n: int, clients: int) -> dict:
    """n single-photo requests from `clients` threads; returns latencies, statuses and wall time."""
    latencies, statuses, lock, counter = [], [], threading.Lock(), iter(range(n))

    def client():
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = photos[i % len(photos)]
                t = time.perf_counter()
                r = c.post("/predict", files=[("files", (name, data))])
                elapsed = time.perf_counter() - t
                with lock:
                    latencies.append(elapsed)
                    statuses.append(r.status_code)

    with httpx.Client(base_url=url, timeout=120) as c:  # warm-up: first pass allocations
        for name, data in photos[:4]:
            c.post("/predict", files=[("files", (name, data))])
        before = c.get("/health").json()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/health").json()
    passes = after["forward_passes"] - before["forward_passes"]
    return {"n": n, "wall": wall, "latencies": np.array(latencies) * 1000, "statuses": statuses,
            "mean_batch": (after["images"] - before["images"]) / max(passes, 1)}


def serve_row(label: str, model: Path, photos, args, log_path: Path) -> tuple[str, dict]:
    with serving(model, log_path=log_path) as served:
        result = load_test(served.url, photos, args.requests, args.clients)
    lat, ok = result["latencies"], sum(s == 200 for s in result["statuses"])
    if ok != args.requests:
        sys.exit(f"{label}: only {ok} of {args.requests} requests answered 200: {sorted(set(result['statuses']))}")
    row = (f"| {label} | {args.requests} | {ok}/{args.requests} | {result['wall']:.1f} | "
           f"{args.requests / result['wall']:.1f} | {np.percentile(lat, 50):.0f} | {np.percentile(lat, 95):.0f} | "
           f"{result['mean_batch']:.1f} |")
    print(row, flush=True)
    return row, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a folder of photos (default ../shared/data/webfruit)")
    parser.add_argument("--model", help="a fruitnet model file (default: Lite0 with an untrained head)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--no-onnx", action="store_true", help="skip exporting and serving the ONNX file")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.md"))
    args = parser.parse_args()

    from fruitnet.predictors import TorchPredictor, expand_paths

    data = Path(args.data)
    if not data.is_dir():
        print(f"SKIPPED: {data} is absent; this benchmark needs a folder of photos (--data DIR, "
              "by default ../shared/data/webfruit)")
        return 0
    paths, _ = expand_paths([str(data)])
    paths = paths[: args.requests]  # the photos the requests cycle through: the same set for both sides
    photos = [(Path(p).name, Path(p).read_bytes()) for p in paths]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.model:
        model = Path(args.model)
    else:
        model = make_quick_model(work / "lite0.safetensors")
    load = os.getloadavg()[0]
    header = "| run | requests | answered 200 | wall s | images/s | p50 ms | p95 ms | images per forward pass |"
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(rows), flush=True)
    log = work / "server.log"
    row, _ = serve_row(f"serve, pytorch, {args.clients} clients", model, photos, args, log)
    rows.append(row)
    if not args.no_onnx:
        from fruitnet.export import export_onnx

        onnx_model = work / "model.onnx"
        export_onnx(model, onnx_model, check=paths[:16], log=lambda *a: None)
        row, _ = serve_row(f"serve, onnxruntime, {args.clients} clients", onnx_model, photos, args, log)
        rows.append(row)

    predictor = TorchPredictor(model, device="cpu", precision="auto")  # as `fruitnet predict` runs by default
    predictor.predict_paths(paths[:4])  # warm-up, as for the server
    n = args.requests
    sequence = [paths[i % len(paths)] for i in range(n)]
    t = time.perf_counter()
    results = predictor.predict_paths(sequence, batch_size=32)
    wall = time.perf_counter() - t
    good = sum("error" not in r for r in results)
    row = f"| fruitnet predict (Predictor.predict_paths, batch 32) | {n} | {good}/{n} ok | {wall:.1f} | {n / wall:.1f} | – | – | 32 |"
    print(row)
    rows.append(row)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    import torch

    text = "\n".join([
        "# fruitnet serve: load test", "",
        f"{datetime.now():%Y-%m-%d %H:%M}; {os.cpu_count()} CPU cores ({cpu}), no GPU; torch {torch.__version__}; "
        f"load average {load:.1f} at the start (other work on the machine makes these numbers noisy).",
        f"Model: {predictor.meta['backbone']} ({model.name}); photos: {len(paths)} from {data} "
        f"(sizes as found, about 120-960 px), each request one photo (multipart field `files`).", "",
        *rows, "",
        "Latency is per request as the client sees it (upload, decoding, queueing, forward pass, JSON). "
        "`images per forward pass`: the server batches photos that wait together into one pass.",
        "",
    ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
