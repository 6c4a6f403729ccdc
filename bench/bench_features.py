"""Which pretrained body travels best: each offline backbone's frozen features, a plain
logistic-regression head (scikit-learn, C=1), trained on one source and tested on the others.

    .venv/bin/python bench/bench_features.py            # efficientnet_lite0/1/2, seeds 0 1 2

The same tasks as bench_transfer.py (train webfruit -> webfruit validation, fruits360, grocery/tomato
recall, comp309-sample; train fruits360 -> webfruit), with fruitnet's own split, preprocessing and
feature extraction, but the head fitted by scikit-learn: a quick way to compare bodies before
training anything through fruitnet.  Writes bench/results/features.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, machine, mean_spread, stamp, table  # noqa: E402

CLASSES = ["cherry", "strawberry", "tomato"]


def features(backbone: str, items) -> tuple:
    import torch

    from fruitnet.arithmetic import choose_arithmetic
    from fruitnet.backbones import create_body, get_backbone
    from fruitnet.features import from_dataset
    from fruitnet.pipeline import Photos
    from fruitnet.transforms import TensorTransform

    pre = get_backbone(backbone).preprocessing
    body = create_body(backbone)[0]
    data = Photos(items, CLASSES, pre, TensorTransform(pre), progress=False)
    out = from_dataset(body, data, 64, torch.device("cpu"), choose_arithmetic("auto", torch.device("cpu")))
    return out.tensors[0].numpy(), out.tensors[1].numpy()


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    from fruitnet.dataset import scan, split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "features.md")
    args = ap.parse_args()
    header = machine()
    catalogs = {name: scan(SHARED / name, progress=False) for name in ("webfruit", "fruits360", "comp309-sample")}
    tomatoes = [it for it in scan(SHARED / "grocery", progress=False).usable if it.label == "tomato"]
    rows = []
    for backbone in args.backbones:
        t = time.perf_counter()
        x = {name: features(backbone, c.usable) for name, c in catalogs.items()}
        x["grocery-tomato"] = features(backbone, tomatoes)
        seconds = time.perf_counter() - t
        results = []
        for seed in args.seeds:
            fitted = {}
            for source in ("webfruit", "fruits360"):
                train, _ = split(catalogs[source], seed=seed)
                index = {it.path: i for i, it in enumerate(catalogs[source].usable)}
                rows_ = [index[it.path] for it in train]
                features_, targets = x[source]
                fitted[source] = LogisticRegression(C=1.0, max_iter=3000).fit(features_[rows_], targets[rows_])
            _, val = split(catalogs["webfruit"], seed=seed)
            index = {it.path: i for i, it in enumerate(catalogs["webfruit"].usable)}
            vx, vy = x["webfruit"][0][[index[it.path] for it in val]], x["webfruit"][1][[index[it.path] for it in val]]
            web = fitted["webfruit"]
            results.append({"val": web.score(vx, vy), "f360": web.score(*x["fruits360"]),
                            "tomato": float((web.predict(x["grocery-tomato"][0]) == CLASSES.index("tomato")).mean()),
                            "comp309": web.score(*x["comp309-sample"]),
                            "f360_to_web": fitted["fruits360"].score(*x["webfruit"])})
            print(backbone, seed, {k: round(v, 3) for k, v in results[-1].items()}, file=sys.stderr, flush=True)
        rows.append([backbone] + [mean_spread([r[k] for r in results]) for k in results[0]] + [f"{seconds:.0f}"])
    text = "\n\n".join([f"Machine: {header}.", stamp(), f"Seeds: {args.seeds} (mean ± standard deviation).",
                        table(["backbone (frozen) + logistic regression", "webfruit val (in-source)",
                               "webfruit -> fruits360", "webfruit -> grocery/tomato recall", "webfruit -> comp309",
                               "fruits360 -> webfruit", "feature extraction, s (all sources)"], rows)])
    print(text)
    args.out.write_text("# Frozen features compared (bench/bench_features.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
