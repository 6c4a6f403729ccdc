"""Command line: argument parsing only; every command is a call into the library.

Exit codes: 0 success, 1 the job failed or some inputs could not be used, 2 unusable arguments or data.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime
from pathlib import Path

from fruitnet.arithmetic import PRECISIONS
from fruitnet.backbones import BACKBONES
from fruitnet.balance import BALANCE_MODES, IMBALANCE_RATIO
from fruitnet.errors import DataError, FruitnetError, UsageError
from fruitnet.training import DEFAULT_RECIPE, RECIPES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def cmd_check(args) -> int:
    from fruitnet.dataset import format_report, scan

    if args.write_exclude and not args.deep:
        raise UsageError("--write-exclude needs --deep (the suspects come from the deep check)")
    if not (args.deep or args.out):  # the quick report on the console, as always: nothing written
        report = scan(args.data).report()
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 1 if report["skipped"] else 0

    from fruitnet import doctor

    out = doctor.output_folder(args.out, args.data)  # refused before any work if inside DATA
    if args.write_exclude:
        doctor.check_exclude_target(args.write_exclude, args.data)
    catalog = scan(args.data, progress=not args.json)
    log = (lambda *a: None) if args.json else print
    findings = (doctor.deep_findings(catalog, backbone=args.backbone, folds=args.folds, seed=args.seed,
                                     progress=not args.json, log=log)
                if args.deep else doctor.quick_findings(catalog))
    written = doctor.write_outputs(findings, out)
    if args.write_exclude:
        written.append(doctor.write_exclude(findings, args.write_exclude))
    if args.json:
        print(json.dumps({k: v for k, v in findings.items() if k != "photos"}, indent=2))
    else:
        print(doctor.format_summary(findings))
        print("wrote " + ", ".join(str(p) for p in written))
    return 1 if findings["skipped"] else 0


def cmd_train(args) -> int:
    from fruitnet import distributed
    from fruitnet.training import TrainConfig, train

    if args.resume is None and args.data is None:
        raise DataError("give a DATA folder to train on, or --resume RUN")
    config = TrainConfig(data=args.data, val_dir=args.val, out=args.out, backbone=args.backbone,
                         weights=args.weights, mode=args.mode, batch_size=args.batch_size,
                         epochs=args.epochs,  # None: the recipe's, or with --resume the run's own
                         lr=args.lr, weight_decay=args.weight_decay, val_fraction=args.val_fraction,
                         seed=args.seed, recipe=args.recipe, feature_cache=not args.no_feature_cache,
                         image_cache=not args.no_image_cache, precision=args.precision,
                         workers=args.workers, device=args.device, exclude=args.exclude, balance=args.balance)
    try:  # under torchrun every process runs this; see fruitnet.distributed
        train(config, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    except FruitnetError as exc:
        if getattr(exc, "reported_by_main", False):
            return exc.exit_code  # the same error on every rank: rank 0 prints it
        raise
    finally:
        distributed.teardown()
    return 0


def _default_out(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def cmd_evaluate(args) -> int:
    from fruitnet.evaluate import evaluate
    from fruitnet.metrics import format_report

    out = Path(args.out) if args.out else _default_out("eval")
    report = evaluate(args.model, args.data, out, batch_size=args.batch_size, legacy=args.legacy or None,
                      precision=args.precision,
                      progress=not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        for s in report["skipped"]:
            print(f"skipped {s['path']}: {s['reason']}")
        print(f"{report['n']} images in {report['seconds']:.1f}s; outputs in {out}/: report.txt, report.json, "
              "confusion.png, confusion.csv, mistakes.png, predictions.csv")
    return 1 if report["skipped"] else 0


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from fruitnet.predictors import expand_paths, load_predictor

    paths, problems = expand_paths(args.paths)
    predictor = load_predictor(args.model, args.runtime, legacy=args.legacy or None, precision=args.precision)
    with tqdm(total=len(paths), desc="predicting", unit="img", disable=args.json or len(paths) < 2,
              leave=False) as bar:
        results = problems + predictor.predict_paths(paths, args.batch_size, progress=bar.update)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max([len(r["path"]) for r in results] + [4])
        print(f"{'path':<{width}}  {'label':<12} " + " ".join(f"{c[:12]:>12}" for c in predictor.classes))
        for r in results:
            if "error" in r:
                print(f"{r['path']:<{width}}  error: {r['error']}")
            else:
                print(f"{r['path']:<{width}}  {r['label']:<12} "
                      + " ".join(f"{r['probabilities'][c]:>12.4f}" for c in predictor.classes))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "error"] + predictor.classes)
            for r in results:
                probs = r.get("probabilities", {})
                w.writerow([r["path"], r.get("label", ""), r.get("error", "")] + [probs.get(c, "") for c in predictor.classes])
    if args.grid:
        from fruitnet.images import load_image
        from fruitnet.plots import plot_prediction_grid

        good = [r for r in results if "error" not in r][:64]
        plot_prediction_grid([load_image(r["path"]) for r in good],
                             [f"{r['label']} {r['probabilities'][r['label']]:.1%}" for r in good], args.grid)
    if not args.json and (args.csv or args.grid):
        print("wrote " + ", ".join(str(p) for p in (args.csv, args.grid) if p))
    return 1 if any("error" in r for r in results) else 0


def cmd_export(args) -> int:
    from fruitnet.export import export_onnx

    export_onnx(args.model, args.out, check=args.check, int8=args.int8)
    return 0


def cmd_serve(args) -> int:
    from fruitnet.server import serve

    return serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, runtime=args.runtime,
                 precision=args.precision)


def cmd_demo(args) -> int:
    from fruitnet.demo import run_demo

    run_demo(Path(args.out) if args.out else None)
    return 0


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="auto: bf16 where the CPU (AVX512-BF16/AMX) or GPU runs it natively, else fp32")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"],
                   help="onnx: use an exported .onnx file with onnxruntime (auto: by the file's suffix)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fruitnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="data report for a class-folder tree; writes nothing into it")
    p.add_argument("data")
    p.add_argument("--json", action="store_true")
    p.add_argument("--deep", action="store_true",
                   help="also find likely mislabelled photos, outliers and near-duplicates in feature space "
                        "(pretrained features, cross-validated linear head, cleanlab); writes report.html")
    p.add_argument("--out", help="report folder, outside DATA (default with --deep: runs/check-<timestamp>)")
    p.add_argument("--write-exclude", metavar="FILE",
                   help="with --deep: write the likely mislabelled photos and outliers, one path a line, "
                        "for train --exclude FILE")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(BACKBONES),
                   help="features for --deep (default efficientnet_lite0: its weights work offline)")
    p.add_argument("--folds", type=_positive_int, default=5, help="cross-validation folds for --deep")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="fine-tune a pretrained backbone on DATA/<class>/<image>")
    p.add_argument("data", nargs="?")
    p.add_argument("--val", help="a separate labelled folder for validation (instead of splitting DATA)")
    p.add_argument("--out", help="run folder (default runs/<timestamp>); never overwritten")
    p.add_argument("--backbone", default="resnet18", choices=sorted(BACKBONES))
    p.add_argument("--weights", default="imagenet", help="imagenet | none | FILE (a state dict)")
    p.add_argument("--mode", default="unfreeze", choices=["freeze", "unfreeze"])
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                   help=f"training recipe (default {DEFAULT_RECIPE}); 'seed' is the original project's exactly")
    p.add_argument("--epochs", type=_positive_int,
                   help="default: the recipe's (seed 30, fast 8); with --resume, the run's own unless given")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=_non_negative_float, help="default: the recipe's (seed 0.001, fast 0.001)")
    p.add_argument("--weight-decay", type=_non_negative_float, help="default: the recipe's (seed 0.01, fast 0.05)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    _add_precision(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="in freeze mode, run the backbone on every image every epoch (slow; for comparison)")
    p.add_argument("--no-image-cache", action="store_true",
                   help="decode every image every epoch instead of once per run")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (without the image cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--exclude", metavar="FILE",
                   help="leave the photos listed in FILE out of training and validation (one path a line, "
                        "e.g. from check --deep --write-exclude); the data folder is not touched")
    p.add_argument("--balance", default="auto", choices=list(BALANCE_MODES),
                   help=f"auto (default): class-weighted loss when the largest class has more than "
                        f"{IMBALANCE_RATIO}x the photos of the smallest; weights; sampler (class-balanced "
                        "drawing); none")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class report, confusion matrix, mistakes gallery")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--out", help="report folder (default runs/eval-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--legacy", action="store_true", help="MODEL is the original project's model.pth")
    _add_precision(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="class and probabilities for images, folders or globs")
    p.add_argument("model")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.add_argument("--csv", metavar="FILE")
    p.add_argument("--grid", metavar="FILE.png", help="draw the photos titled with prediction and confidence")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--legacy", action="store_true", help="MODEL is the original project's model.pth")
    _add_runtime(p)
    _add_precision(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="ONNX file carrying classes and preprocessing, checked against PyTorch")
    p.add_argument("model")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", metavar="FILE", help="default: MODEL with the suffix .onnx")
    p.add_argument("--check", nargs="+", metavar="PATH",
                   help="photos (files, folders, globs) for the parity check (default: the bundled demo photos)")
    p.add_argument("--int8", action="store_true",
                   help="also write FILE.int8.onnx (static int8 quantisation); report its agreement and speed")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP API and web page for a model file (.safetensors or exported .onnx)")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=_positive_int, default=10, help="largest accepted photo, in MB")
    _add_runtime(p)
    _add_precision(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="train, evaluate and predict on the bundled fruits360 sample")
    p.add_argument("--out", help="demo folder (default runs/demo-<timestamp>)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FruitnetError as exc:  # expected errors: one line, their own exit code; anything else is a bug
        print(f"fruitnet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
