"""fruitnet: fine-tune an ImageNet-pretrained CNN on a folder of photos, then evaluate, predict, export and serve it.

Exit codes: 0 success, 1 the job failed or some inputs could not be used, 2 unusable arguments or data.
"""

# Argument parsing only: every command is a call into the library, imported when the command
# runs, so `--help`, argument errors and `check` never wait for torch.

from __future__ import annotations

import argparse
import csv
import json
import sys
import typing
from dataclasses import fields
from pathlib import Path

from fruitnet.backbones import BACKBONES
from fruitnet.config import PRECISIONS, RECIPES, RESUMABLE, TrainConfig
from fruitnet.errors import FruitnetError, UsageError
from fruitnet.guard import LIMIT_CONCURRENCY, TIMEOUT_KEEP_ALIVE, TIMEOUT_REQUEST
from fruitnet.modelpath import check_model_argument
from fruitnet.outputs import check_outputs, printable, spreadsheet_row


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def _mix(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (inclusive), not {value}")
    return value


def _port(text: str) -> int:
    value = _whole_number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, not {value}")
    return value


_TYPES = {"positive_int": _positive_int, "non_negative_float": _non_negative_float, "fraction": _fraction,
          "mix": _mix, int: _whole_number}
_CHOICES = {"backbones": lambda: sorted(BACKBONES), "recipes": lambda: list(RECIPES)}


def _train_option_help(f) -> str:
    """The field's own words plus its default, taken from TrainConfig or the recipes."""
    if f.metadata.get("recipe"):
        per_recipe = ", ".join(f"{name} {getattr(recipe, f.name)}" for name, recipe in RECIPES.items())
        return f"{f.metadata['help']} (default: the recipe's: {per_recipe})"
    if isinstance(f.default, bool) or f.default is None:
        return f.metadata["help"]
    return f"{f.metadata['help']} (default: {f.default})"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, default None: None means 'not given', so the recipe (or,
    on --resume, the run) decides, and what was given can be told apart from a default."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        kw = {"dest": f.name, "default": None, "help": _train_option_help(f)}
        if isinstance(f.default, bool):  # --no-image-cache stores False; --tensorboard stores True
            kw.update(action="store_const", const=not f.default)
        else:
            args = typing.get_args(hints[f.name])  # Literal[...] or Optional[Literal[...]]
            literal = [a for a in args if isinstance(a, str)] or [
                v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
            choices = _CHOICES[f.metadata["choices"]]() if "choices" in f.metadata else literal or None
            kw.update(type=_TYPES.get(f.metadata.get("type"), str), choices=choices,
                      metavar=f.metadata.get("metavar"))
        p.add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), **kw)


def cmd_check(args) -> int:
    from fruitnet.dataset import format_report, scan

    if args.write_exclude and not args.deep:
        raise UsageError("--write-exclude needs --deep (the suspects come from the deep check)")
    check_outputs({"--out": args.out, "--write-exclude": args.write_exclude}, inputs=[args.data],
                  folders={"--out"}, replaces={"--write-exclude"})
    if not (args.deep or args.out):  # the quick report on the console, as always: nothing written
        report = scan(args.data).report()
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 1 if report["skipped"] else 0

    from fruitnet import doctor

    out = doctor.output_folder(args.out, args.data)  # the default one too is refused if inside DATA
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
    from fruitnet.training import resume_training, train

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "data" and getattr(args, f.name) is not None}
    try:  # under torchrun every process runs this; see fruitnet.distributed
        if args.resume:
            if args.data:
                raise UsageError(f"give either DATA ({args.data}) or --resume {args.resume}, not both: "
                                 "a resumed run trains on its own split")
            summary = resume_training(args.resume, **given)
        elif args.data is None:
            raise UsageError("give a DATA folder to train on (DATA/<class>/<image>), or --resume RUN")
        else:
            summary = train(TrainConfig(data=args.data, **given))
    except KeyboardInterrupt:
        return 130
    except FruitnetError as exc:
        if getattr(exc, "reported_by_main", False):
            return exc.exit_code  # the same error on every rank: rank 0 prints it
        raise
    finally:
        distributed.teardown()
    return 1 if summary["skipped"] else 0  # as check and evaluate: unusable image files are a failure


def cmd_evaluate(args) -> int:
    check_model_argument(args.model, [args.data], "evaluate")  # before torch: an argument error is instant
    from fruitnet.evaluate import evaluate, format_trust
    from fruitnet.metrics import format_report
    from fruitnet.runfolder import new_output_folder

    out = new_output_folder(args.out, "eval-", [args.data, args.unknown], "evaluation folder")
    report = evaluate(args.model, args.data, out, batch_size=args.batch_size, legacy=args.legacy or None,
                      precision=args.precision, unknown_dir=args.unknown, unknown=not args.no_unknown,
                      progress=not args.json, tta=args.tta)
    if args.json:
        print(json.dumps(report))
        for warning in report["warnings"]:  # also on stderr: a script reading the JSON may not look
            print(printable(f"fruitnet evaluate: warning: {warning}"), file=sys.stderr)
    else:
        print("\n".join(map(printable, (format_report(report) + format_trust(report)).split("\n"))))
        for s in report["skipped"]:
            print(printable(f"skipped {s['path']}: {s['reason']}"))
        print(f"{report['n']} images in {report['seconds']:.1f}s; outputs in {out}/: report.txt, report.json, "
              "confusion.png, confusion.csv, calibration.png, mistakes.png, predictions.csv")
    return 1 if report["skipped"] else 0


def _decode_early(args, paths: list[str]):
    """Start decoding the photos now, before torch loads, when the model file's header says how
    (a .safetensors file); None otherwise (ONNX, the original model.pth: decoded after loading)."""
    from fruitnet.modelpath import peek_metadata
    from fruitnet.preprocess import DecodeAhead, is_valid

    if args.runtime == "onnx" or args.legacy or str(args.model).lower().endswith(".onnx"):
        return None
    pre = (peek_metadata(args.model) or {}).get("preprocessing")
    return DecodeAhead(paths, pre) if is_valid(pre) and paths else None


def _arithmetic(predictor) -> str:
    runtime = predictor.runtime()
    arith = runtime["arithmetic"]
    tta = ""
    if runtime.get("tta"):
        tta = "; test-time augmentation: each photo averaged with its mirror image" + (
            " (in the ONNX graph: exported with --tta)" if runtime["runtime"] == "onnxruntime" else "")
    if isinstance(arith, str):
        return f"{runtime['runtime']}, {arith}{tta}"
    near_ties = f"; near-ties {arith['near_ties']}" if "near_ties" in arith else ""
    return f"{runtime['runtime']}, {arith['dtype']} ({arith['reason']}){near_ties}{tta}"


def cmd_predict(args) -> int:
    from fruitnet.images import expand_paths
    from fruitnet.progress import bar as progress_bar

    check_model_argument(args.model, args.paths, "predict")
    check_outputs({"--csv": args.csv, "--grid": args.grid, "--explain": args.explain}, inputs=args.paths,
                  model=args.model, folders={"--explain"}, replaces={"--csv", "--grid"})
    paths, problems = expand_paths(args.paths)
    early = _decode_early(args, paths)  # decodes on the cores torch's import leaves idle
    try:
        from fruitnet.predictors import load_predictor

        predictor = load_predictor(args.model, args.runtime, legacy=args.legacy or None, precision=args.precision,
                                   unknown=not args.no_unknown, tta=args.tta)
        if args.explain and predictor.explain_unavailable:
            raise UsageError(f"--explain: {predictor.explain_unavailable}")
        if early is not None and early.pre != predictor.preprocessing:  # cannot happen for a file read once
            early.close()
            early = None
        print(f"fruitnet predict: arithmetic: {_arithmetic(predictor)}", file=sys.stderr)
        with progress_bar(total=len(paths), desc="predicting", unit="img", disable=args.json or len(paths) < 2) as bar:
            results = problems + predictor.predict_paths(paths, args.batch_size, progress=bar.update, decoded=early)
    finally:
        if early is not None:
            early.close()
    good = [r for r in results if "error" not in r]
    overlays = {}
    if args.explain:
        from fruitnet.explain import write_overlays

        overlays = write_overlays(predictor, good, Path(args.explain), progress=not args.json)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_predictions(results, predictor)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(spreadsheet_row(["path", "label", "best_guess", "in_distribution", "error", "warning"]
                                       + predictor.classes))
            for r in results:
                probs = r.get("probabilities", {})
                w.writerow(spreadsheet_row([r["path"], r.get("label", ""), r.get("best_guess", r.get("label", "")),
                                            r.get("in_distribution", ""), r.get("error", ""), r.get("warning", "")]
                                           + [probs.get(c, "") for c in predictor.classes]))
    if args.grid:
        from fruitnet.images import load_image
        from fruitnet.plots import plot_prediction_grid, prediction_caption

        shown = good[:64]  # with --explain the grid shows the overlays
        captions = [prediction_caption(r) for r in shown]
        plot_prediction_grid([overlays[r["path"]] if r["path"] in overlays else load_image(r["path"]) for r in shown],
                             [text for text, _ in captions], args.grid, colors=[color for _, color in captions],
                             names=[r["path"] for r in shown])
    if not args.json and (args.csv or args.grid or args.explain):
        print("wrote " + ", ".join(str(p) for p in (args.csv, args.grid) if p)
              + (", " if (args.csv or args.grid) and args.explain else "")
              + (f"{len(overlays)} heat-map overlays in {args.explain}/" if args.explain else ""))
    warned = sum("warning" in r for r in results)
    if warned and not args.json:
        print(f"{warned} photo(s) much smaller than the model's input: their answers rest on upscaled pixels")
    return 1 if any("error" in r for r in results) else 0


def _print_predictions(results: list[dict], predictor) -> None:
    """One row per photo: label ("unknown" with the closest class), in_distribution, probabilities."""
    from fruitnet.predictors import UNKNOWN

    def label(r):
        return f"unknown ({r['best_guess']})" if r["label"] == UNKNOWN else r["label"]

    trust = any("in_distribution" in r for r in results)
    width = max([len(r["path"]) for r in results] + [4])
    lw = max([len(label(r)) for r in results if "error" not in r] + [12])
    print(printable(f"{'path':<{width}}  {'label':<{lw}} " + (f"{'in_dist':>8} " if trust else "")
                    + " ".join(f"{c[:12]:>12}" for c in predictor.classes)))
    for r in results:
        if "error" in r:
            print(printable(f"{r['path']:<{width}}  error: {r['error']}"))
        else:
            print(printable(f"{r['path']:<{width}}  {label(r):<{lw}} "
                            + (f"{r['in_distribution']:>8.2f} " if trust else "")
                            + " ".join(f"{r['probabilities'][c]:>12.4f}" for c in predictor.classes)
                            + (f"  warning: {r['warning']}" if "warning" in r else "")))


def cmd_export(args) -> int:
    check_model_argument(args.model, command="export")
    from fruitnet.export import export_onnx

    export_onnx(args.model, args.out, check=args.check, int8=args.int8, tta=args.tta)
    return 0


def cmd_serve(args) -> int:
    check_model_argument(args.model, command="serve")
    from fruitnet.server import serve

    return serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, runtime=args.runtime,
                 precision=args.precision, unknown=not args.no_unknown, timeout_keep_alive=args.timeout_keep_alive,
                 timeout_request=args.timeout_request, limit_concurrency=args.limit_concurrency, tta=args.tta)


def cmd_demo(args) -> int:
    check_outputs({"--out": args.out}, folders={"--out"})
    from fruitnet.demo import run_demo

    run_demo(Path(args.out) if args.out else None)
    return 0


def _add_model(p: argparse.ArgumentParser, what: str = "model file") -> None:
    p.add_argument("model", metavar="MODEL", help=f"the {what}: a run's best.safetensors (or last.safetensors), "
                   "an exported .onnx file, or the original project's model.pth")


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="auto: bf16 where the CPU (AVX512-BF16/AMX) or GPU runs it natively, else fp32 "
                        "(default: auto)")


def _add_no_unknown(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-unknown", action="store_true",
                   help="never answer 'unknown': always the best class (in_distribution is still given)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"],
                   help="onnx: run an exported .onnx file with onnxruntime (default: auto, by the file's suffix)")


def _add_legacy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--legacy", action="store_true",
                   help="MODEL is the original project's model.pth (detected automatically otherwise)")


def _add_tta(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--tta", action="store_true",
                   help="average each photo's prediction with its mirror image's (test-time augmentation): "
                        "twice the compute" + extra)


def _add_batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, default=32, help="photos per forward pass (default: 32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fruitnet", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[1].strip())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="data report for a class-folder tree; writes nothing into it",
                       description="Count the photos per class, find exact and near-duplicates, label conflicts and "
                                   "unusable files; --deep also finds likely mislabelled photos and outliers, "
                                   "shown in report.html.")
    p.add_argument("data", metavar="DATA", help="a folder of class folders: DATA/<class>/<image>")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--deep", action="store_true",
                   help="also find likely mislabelled photos, outliers and near-duplicates in feature space "
                        "(pretrained features, cross-validated linear head, cleanlab); writes report.html")
    p.add_argument("--out", metavar="DIR",
                   help="report folder, outside DATA (default with --deep: runs/check-<timestamp>)")
    p.add_argument("--write-exclude", metavar="FILE",
                   help="with --deep: write the likely mislabelled photos and outliers, one path a line, "
                        "for train --exclude FILE (replaces an existing FILE; never one inside DATA)")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(BACKBONES),
                   help="features for --deep (default: efficientnet_lite0, whose weights work offline)")
    p.add_argument("--folds", type=_positive_int, default=5, help="cross-validation folds for --deep (default: 5)")
    p.add_argument("--seed", type=_whole_number, default=0, help="seed of the folds (default: 0)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="fine-tune a pretrained backbone on DATA/<class>/<image>",
                       description="Fine-tune a pretrained backbone; the run folder holds the model files, "
                                   "metrics, curves and everything needed to repeat the run.")
    p.add_argument("data", nargs="?", metavar="DATA", help="a folder of class folders: DATA/<class>/<image>")
    _add_train_options(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder; only "
                   + ", ".join("--" + k for k in RESUMABLE) + " may be given again (others: exit 2)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class report, confusion matrix, mistakes gallery",
                       description="Evaluate a model on a labelled folder (DATA/<class>/<image>).")
    _add_model(p)
    p.add_argument("data", metavar="DATA", help="labelled photos: DATA/<class>/<image>")
    p.add_argument("--out", help="report folder, new or empty, outside DATA and --unknown "
                   "(default: runs/eval-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _add_batch_size(p)
    _add_legacy(p)
    p.add_argument("--unknown", metavar="DIR",
                   help="photos of none of the classes (default: DATA/unknown/ if present): AUROC, share rejected")
    _add_no_unknown(p)
    _add_precision(p)
    _add_tta(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="class and probabilities for images, folders or globs",
                       description="Predict the class of each photo: a table, or JSON, CSV and a picture grid.")
    _add_model(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="photos, folders (searched recursively) or globs")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, label, best_guess, probabilities, in_distribution}")
    p.add_argument("--csv", metavar="FILE", help="also write the predictions as CSV (replaces an existing FILE; "
                   "never a photo, the model or a file inside a PATH folder)")
    p.add_argument("--grid", metavar="FILE.png",
                   help="draw the photos (up to 64), each titled with its answer and confidence and its file name "
                        "beneath; low-confidence answers in orange with a '?', 'none of these (closest: ...)' in "
                        "purple (with --explain: the heat maps); replaces an existing FILE.png, never an input")
    p.add_argument("--explain", metavar="DIR",
                   help="write one Grad-CAM overlay per photo into DIR, a new or empty folder: where the network "
                        "looked (PyTorch models; "
                        "with --tta, the heat maps are still the plain model's, of the photo without its mirror)")
    _add_batch_size(p)
    _add_legacy(p)
    _add_no_unknown(p)
    _add_runtime(p)
    _add_precision(p)
    _add_tta(p, "; an .onnx file must have been exported with --tta (such a file always averages)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="ONNX file carrying classes and preprocessing, checked against PyTorch",
                       description="Export a model file to ONNX and check it against PyTorch on real photos.")
    _add_model(p, "model file (.safetensors)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    p.add_argument("--out", metavar="FILE", help="default: MODEL with the suffix .onnx; never overwrites a file")
    p.add_argument("--check", nargs="+", metavar="PATH",
                   help="photos (files, folders, globs) for the parity check (default: the bundled demo photos)")
    p.add_argument("--int8", action="store_true",
                   help="also write FILE.int8.onnx (static int8 quantisation); report its agreement and speed")
    _add_tta(p, "; the averaging is in the exported graph, and the parity check compares it with PyTorch's")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP API and web page for a model file (.safetensors or exported .onnx)",
                       description="Serve a model over HTTP: a web page at / and a JSON API at /predict.")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--max-upload-mb", type=_positive_int, default=10, help="largest accepted photo, in MB (default: 10)")
    p.add_argument("--timeout-keep-alive", type=_positive_float, default=TIMEOUT_KEEP_ALIVE, metavar="SECONDS",
                   help=f"close a connection idle between requests after this long (default: {TIMEOUT_KEEP_ALIVE})")
    p.add_argument("--timeout-request", type=_positive_float, default=TIMEOUT_REQUEST, metavar="SECONDS",
                   help="answer 408 and close when a request's headers take longer than this, or its upload "
                        f"stops arriving for this long (default: {TIMEOUT_REQUEST})")
    p.add_argument("--limit-concurrency", type=_positive_int, default=LIMIT_CONCURRENCY, metavar="N",
                   help=f"answer 503 (JSON, Retry-After) beyond N requests in progress (default: {LIMIT_CONCURRENCY})")
    _add_no_unknown(p)
    _add_runtime(p)
    _add_precision(p)
    _add_tta(p, "; an .onnx file must have been exported with --tta (such a file always averages)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="train, evaluate and predict on the bundled fruits360 sample",
                       description="Train, evaluate and predict on the bundled Fruits-360 sample, offline.")
    p.add_argument("--out", help="demo folder, new or empty (default: runs/demo-<timestamp>)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FruitnetError as exc:  # expected errors: one line, their own exit code; anything else is a bug
        print(printable(f"fruitnet {args.command}: error: {exc}"), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
