"""`fruitnet demo`: train, evaluate and predict on the bundled Fruits-360 sample, offline."""

from __future__ import annotations

from datetime import datetime
from importlib.resources import files
from pathlib import Path

from fruitnet.evaluate import evaluate
from fruitnet.metrics import format_classification_report
from fruitnet.formats import write_grid
from fruitnet.predictors import expand_paths, load_predictor
from fruitnet.config import TrainConfig, resolve
from fruitnet.training import train

DEMO_DATA = Path(str(files("fruitnet") / "demo_data"))


def run_demo(out: Path | None = None) -> dict:
    """The default training (no options: what `fruitnet train DATA` does), on the bundled sample."""
    out = out or Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    config = resolve(TrainConfig(data=str(DEMO_DATA / "train"), out=str(out / "run")))
    print(f"fruitnet demo: {config.backbone} (ImageNet weights, offline; {config.mode}, recipe {config.recipe}) "
          f"on {DEMO_DATA}\n"
          "  (90 Fruits-360 studio shots, CC BY-SA 4.0; see ATTRIBUTION.md there)\n"
          f"  the same as: fruitnet train {config.data} --out {config.out}\n")
    summary = train(config)
    print("\nevaluating on the 30 held-out test images ...")
    report = evaluate(summary["model"], DEMO_DATA / "test", out / "evaluation")
    print(format_classification_report(report))
    predictor = load_predictor(summary["model"])
    paths, _ = expand_paths([str(DEMO_DATA / "test")])
    sample = paths[::3]
    write_grid(predictor.predict_paths(sample), predictor.classes, out / "predictions.png", {})  # as predict --grid
    print(f"\ndemo outputs in {out}/:\n"
          f"  run/curves.png             how the fit converged\n"
          f"  run/best.safetensors       the model (try: fruitnet predict {summary['model']} PHOTO.jpg)\n"
          f"  evaluation/confusion.png   confusion matrix on the held-out images\n"
          f"  evaluation/mistakes.png    the most confident mistakes\n"
          f"  predictions.png            a grid of predictions\n"
          "Note: studio shots are easy; real photos are harder (see docs/results.md).")
    return {"summary": summary, "report": report, "out": str(out)}
