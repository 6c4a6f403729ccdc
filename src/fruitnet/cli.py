"""fruitnet: fine-tune an ImageNet-pretrained CNN on a folder of photos, then evaluate, predict, export, serve
and teach it.

Exit codes: 0 success, 1 the job failed or some inputs could not be used, 2 unusable arguments or data,
130 interrupted.
"""

# Argument parsing only: every command is a call into the library, imported when the command
# runs, so `--help`, argument errors and `check` never wait for torch.

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path

from fruitnet.backbones import BACKBONES
from fruitnet.config import (DEFAULT_BACKBONE, RECIPE_ALIASES, RECIPES, RESUMABLE, TEACH_STRATEGIES,
                             InferenceOptions, TrainConfig)
from fruitnet.errors import FruitnetError, UsageError
from fruitnet.guard import LIMIT_CONCURRENCY, TIMEOUT_KEEP_ALIVE, TIMEOUT_REQUEST
from fruitnet.modelpath import check_model_argument
from fruitnet.formats import EXPORTERS, WRITERS, advice, answer_summary, unknown_share
from fruitnet.outputs import check_outputs, printable


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


_TYPES = {"positive_int": _positive_int, "positive_float": _positive_float, "non_negative_float": _non_negative_float, "fraction": _fraction,
          "mix": _mix, int: _whole_number}
_CHOICES = {"backbones": lambda: sorted(BACKBONES), "recipes": lambda: [*RECIPES, *RECIPE_ALIASES]}


def _option_help(f) -> str:
    """The field's own words plus its default, taken from the dataclass or the recipes."""
    if f.metadata.get("recipe"):
        per_recipe = ", ".join(f"{name} {getattr(recipe, f.name)}" for name, recipe in RECIPES.items())
        return f"{f.metadata['help']} (default: the recipe's: {per_recipe})"
    if isinstance(f.default, bool) or f.default is None:
        return f.metadata["help"]
    return f"{f.metadata['help']} (default: {f.default})"


def _add_options(p: argparse.ArgumentParser, cls, names: tuple[str, ...] | None = None,
                 given_only: bool = False) -> None:
    """One option per field of the dataclass `cls` (TrainConfig, InferenceOptions) that has help
    text, or of those in `names`.  given_only: every default is None, meaning 'not given', so the
    recipe (or, on --resume, the run) decides, and what was given can be told apart."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "help" not in f.metadata or (names is not None and f.name not in names):
            continue
        kw = {"dest": f.name, "default": None if given_only else f.default, "help": _option_help(f)}
        if isinstance(f.default, bool):  # --no-image-cache stores False, --tensorboard True; not given: None
            kw.update(action="store_const", const=not f.default, default=None)
        else:
            args = typing.get_args(hints[f.name])  # Literal[...] or Optional[Literal[...]]
            literal = [a for a in args if isinstance(a, str)] or [
                v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
            choices = _CHOICES[f.metadata["choices"]]() if "choices" in f.metadata else literal or None
            kw.update(type=_TYPES.get(f.metadata.get("type"), str), choices=choices,
                      metavar=f.metadata.get("metavar"))
        p.add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), **kw)


def _inference_options(args) -> InferenceOptions:
    """The InferenceOptions a command was given (fields it does not offer keep their defaults)."""
    return InferenceOptions(**{f.name: getattr(args, f.name) for f in fields(InferenceOptions)
                               if getattr(args, f.name, None) is not None})


def cmd_check(args) -> int:
    from fruitnet.dataset import format_data_report, scan

    if args.write_exclude and not args.deep:
        raise UsageError("--write-exclude needs --deep (the suspects come from the deep check)")
    check_outputs({"--out": args.out, "--write-exclude": args.write_exclude}, inputs=[args.data],
                  folders={"--out"}, replaces={"--write-exclude"})
    if not (args.deep or args.out):  # the quick report on the console, as always: nothing written
        report = scan(args.data).report()
        print(json.dumps(report, indent=2) if args.json else format_data_report(report))
        return 1 if report["skipped"] else 0

    from fruitnet import datacheck

    out = datacheck.output_folder(args.out, args.data)  # the default one too is refused if inside DATA
    catalog = scan(args.data, progress=not args.json)
    log = (lambda *a: None) if args.json else print
    findings = (datacheck.deep_findings(catalog, backbone=args.backbone, folds=args.folds, seed=args.seed,
                                     progress=not args.json, log=log)
                if args.deep else datacheck.quick_findings(catalog))
    written = datacheck.write_outputs(findings, out)
    if args.write_exclude:
        written.append(datacheck.write_exclude(findings, args.write_exclude))
    if args.json:
        print(json.dumps({k: v for k, v in findings.items() if k != "photos"}, indent=2))
    else:
        print(datacheck.format_summary(findings))
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
                raise UsageError(f"give either DATA ({' '.join(args.data)}) or --resume {args.resume}, not both: "
                                 "a resumed run trains on its own split")
            summary = resume_training(args.resume, **given)
        elif not args.data:
            raise UsageError("give a DATA folder to train on (DATA/<class>/<image>), or --resume RUN")
        else:
            data = args.data[0] if len(args.data) == 1 else tuple(args.data)
            summary = train(TrainConfig(data=data, **given))
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
    from fruitnet.metrics import format_classification_report
    from fruitnet.runfolder import output_folder

    with output_folder(args.out, "eval-", [args.data, args.unknown_dir], "evaluation folder") as out:
        report = evaluate(args.model, args.data, out, _inference_options(args), unknown_dir=args.unknown_dir,
                          progress=not args.json)
    if args.json:
        print(json.dumps(report))
        for warning in report["warnings"]:  # also on stderr: a script reading the JSON may not look
            print(printable(f"fruitnet evaluate: warning: {warning}"), file=sys.stderr)
    else:
        print("\n".join(map(printable, (format_classification_report(report) + format_trust(report)).split("\n"))))
        for s in report["skipped"]:
            print(printable(f"skipped {s['path']}: {s['reason']}"))
        print(f"{report['n']} images in {report['seconds']:.1f}s; outputs in {out}/: report.txt, report.json, "
              "confusion.png, confusion.csv, calibration.png, mistakes.png, predictions.csv")
        print("\n".join(report["answers"]))
        hint = advice(args.model, [args.data], 1 - report["coverage"], wrong=1 - report["accuracy"])
        if hint:
            print(hint)
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
    check_outputs({**{f"--{name}": getattr(args, name) for name in WRITERS}, "--explain": args.explain},
                  inputs=args.paths, model=args.model, folders={"--explain"}, replaces={f"--{name}" for name in WRITERS})
    paths, problems = expand_paths(args.paths)
    early = _decode_early(args, paths)  # decodes on the cores torch's import leaves idle
    try:
        from fruitnet.predictors import load_predictor

        predictor = load_predictor(args.model, _inference_options(args))
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
    written = []
    for name, writer in WRITERS.items():
        if getattr(args, name):
            writer.write(results, predictor.classes, Path(getattr(args, name)), overlays)
            written.append(getattr(args, name))
    if args.explain:
        written.append(f"{len(overlays)} heat-map overlays in {args.explain}/")
    if written and not args.json:
        print("wrote " + ", ".join(map(str, written)))
    warned = sum("warning" in r for r in results)
    if warned and not args.json:
        print(f"{warned} photo(s) much smaller than the model's input: their answers rest on upscaled pixels")
    if not args.json and good:
        print("\n".join(answer_summary(results)))
        hint = advice(args.model, args.paths, unknown_share(results))
        if hint:
            print(hint)
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
    export = EXPORTERS[args.format].load()
    export(args.model, args.out, _inference_options(args), check=args.check, int8=args.int8)
    return 0


def cmd_serve(args) -> int:
    check_model_argument(args.model, command="serve")
    check_outputs({"--collect": args.collect}, model=args.model, adds_to={"--collect"})
    from fruitnet.collect import Collector
    from fruitnet.server import serve

    collector = Collector(args.collect, args.collect_max_photos, args.collect_max_mb << 20) if args.collect else None
    return serve(args.model, _inference_options(args), host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
                 timeout_keep_alive=args.timeout_keep_alive, timeout_request=args.timeout_request,
                 limit_concurrency=args.limit_concurrency, collector=collector)


def cmd_teach(args) -> int:
    check_model_argument(args.model, args.new, "teach")
    if args.json and not args.rank:
        raise UsageError("--json goes with --rank (the ranking as JSON)")
    if not args.rank:
        check_teach_outputs(args)
    from fruitnet.teach import Teacher, format_numbers, read_label_file

    quiet = args.rank and args.json
    teacher = Teacher(args.model, args.new, into=None if args.rank else args.into, out=args.out, cache=args.cache,
                      log=(lambda *a: None) if quiet else print, progress=not quiet)
    if args.rank:
        ranked = teacher.ranking(args.strategy)
        print(json.dumps(ranked, indent=2) if args.json else "\n".join(
            f"{r['path']}  {r['label']} ({r['best_guess']} {r['confidence']:.1%}, in_dist {r['in_distribution']:.2f})"
            for r in ranked))
        return 0
    if args.labels:
        for sha, label in read_label_file(args.labels, teacher):
            teacher.label(sha, label)
        print(format_numbers(teacher.retrain()))
        print(f"labelled copies and labels.csv in {args.into}/; train on them with: "
              f"fruitnet train DATA {args.into}")
        return 0
    from fruitnet.guard import LOOPBACK_NAMES, host_name
    from fruitnet.server import is_loopback, run_app
    from fruitnet.teach_service import create_teach_app

    app = create_teach_app(teacher, args.strategy, args.retrain_every,
                           allowed_hosts={*LOOPBACK_NAMES, host_name(args.host)} if is_loopback(args.host) else None)
    print(f"teach page: http://{args.host}:{args.port}/  (keys: 1-{min(9, len(teacher.classes))} a class, 0 none of "
          f"these, space skip, u undo, h where it looked; Ctrl+C stops)\nlabelled copies go to {args.into}/, taught "
          f"models to {teacher.out or 'runs/teach-<timestamp>'}/", flush=True)
    return run_app(app, args.host, args.port)


def check_teach_outputs(args) -> None:
    """--into (a folder added to) and --out never inside a NEW folder or the model's training data."""
    check_outputs({"--into": args.into, "--out": args.out}, inputs=[*args.new, *training_folders(args.model)],
                  model=args.model, folders={"--out"}, adds_to={"--into"})


def training_folders(model) -> list[str]:
    """The folders the model was trained on (DATA and --val, from its run's config.json)."""
    try:
        train = json.loads((Path(model).parent / "config.json").read_text())["train"]
        return [p for p in (train.get("data"), train.get("val_dir")) if p]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def cmd_demo(args) -> int:
    check_outputs({"--out": args.out}, folders={"--out"})
    from fruitnet.demo import run_demo

    run_demo(Path(args.out) if args.out else None)
    return 0


def _add_model(p: argparse.ArgumentParser, what: str = "model file") -> None:
    p.add_argument("model", metavar="MODEL", help=f"the {what}: a run's best.safetensors (or last.safetensors), "
                   "an exported .onnx file, or the original project's model.pth")


def _check_parser(sub) -> None:
    p = sub.add_parser("check", help="data report for a class-folder tree; writes nothing into it",
                       description="Count the photos per class, find exact and near-duplicates, label conflicts and "
                                   "unusable files; --deep also finds likely mislabelled photos and outliers, "
                                   "shown in report.html.")
    p.add_argument("data", metavar="DATA", help="a folder of class folders: DATA/<class>/<image>")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--deep", action="store_true",
                   help="also find likely mislabelled photos (cross-validated linear head and cleanlab), outliers "
                        "(the unknown verdict's kNN score) and near-duplicates in feature space, on the pretrained "
                        "features; writes report.html")
    p.add_argument("--out", metavar="DIR",
                   help="report folder, outside DATA (default with --deep: runs/check-<timestamp>)")
    p.add_argument("--write-exclude", metavar="FILE",
                   help="with --deep: write the likely mislabelled photos and outliers, one path a line, "
                        "for train --exclude FILE (replaces an existing FILE; never one inside DATA)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES),
                   help=f"features for --deep (default: {DEFAULT_BACKBONE}, the default model's body)")
    p.add_argument("--folds", type=_positive_int, default=5, help="cross-validation folds for --deep (default: 5)")
    p.add_argument("--seed", type=_whole_number, default=0, help="seed of the folds (default: 0)")
    p.set_defaults(func=cmd_check)

def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a pretrained backbone on DATA/<class>/<image>",
                       description="Fine-tune a pretrained backbone; the run folder holds the model files, "
                                   "metrics, curves and everything needed to repeat the run.")
    p.add_argument("data", nargs="*", metavar="DATA",
                   help="a folder of class folders, DATA/<class>/<image>; several folders merge class by class "
                        "(e.g. photos/ labelled/); photos in a DATA/unknown/ folder are of none of the classes: the "
                        "'unknown' verdict is fitted against them")
    _add_options(p, TrainConfig, given_only=True)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder; only "
                   + ", ".join("--" + k for k in RESUMABLE) + " may be given again (others: exit 2)")
    p.set_defaults(func=cmd_train)

def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class report, confusion matrix, mistakes gallery",
                       description="Evaluate a model on a labelled folder (DATA/<class>/<image>).")
    _add_model(p)
    p.add_argument("data", metavar="DATA", help="labelled photos: DATA/<class>/<image>")
    p.add_argument("--out", help="report folder, new or empty, outside DATA and --unknown "
                   "(default: runs/eval-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--unknown", dest="unknown_dir", metavar="DIR",
                   help="photos of none of the classes (default: DATA/unknown/ if present): AUROC, share rejected")
    _add_options(p, InferenceOptions)
    p.set_defaults(func=cmd_evaluate)

def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="class and probabilities for images, folders or globs",
                       description="Predict the class of each photo: a table, or JSON, CSV and a picture grid.")
    _add_model(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="photos, folders (searched recursively) or globs")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, label, best_guess, probabilities, in_distribution}")
    for name, writer in WRITERS.items():
        p.add_argument(f"--{name}", metavar=writer.metavar, help=writer.help)
    p.add_argument("--explain", metavar="DIR",
                   help="write one Grad-CAM overlay per photo into DIR, a new or empty folder: where the network "
                        "looked (PyTorch models; "
                        "with --tta, the heat maps are still the plain model's, of the photo without its mirror)")
    _add_options(p, InferenceOptions)
    p.set_defaults(func=cmd_predict)

def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="ONNX file carrying classes and preprocessing, checked against PyTorch",
                       description="Export a model file to ONNX and check it against PyTorch on real photos.")
    _add_model(p, "model file (.safetensors)")
    p.add_argument("--format", default="onnx", choices=list(EXPORTERS),
                   help="; ".join(f"{name}: {e.help}" for name, e in EXPORTERS.items()) + " (default: onnx)")
    p.add_argument("--out", metavar="FILE", help="default: MODEL with the suffix .onnx; never overwrites a file")
    p.add_argument("--check", nargs="+", metavar="PATH",
                   help="photos (files, folders, globs) for the parity check (default: the bundled demo photos)")
    p.add_argument("--int8", action="store_true",
                   help="also write FILE.int8.onnx (static int8 quantisation); report its agreement and speed")
    _add_options(p, InferenceOptions, ("tta",))
    p.set_defaults(func=cmd_export)

def _serve_parser(sub) -> None:
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
    p.add_argument("--collect", metavar="DIR",
                   help="keep a copy of each photo answered 'unknown' or with low confidence in DIR (added to), with "
                        "its answer in DIR/collected.csv: teach the model from them with fruitnet teach MODEL DIR "
                        "(off unless given)")
    p.add_argument("--collect-max-photos", type=_positive_int, default=1000, metavar="N",
                   help="stop collecting at N photos (default: 1000)")
    p.add_argument("--collect-max-mb", type=_positive_int, default=500, metavar="MB",
                   help="stop collecting at MB megabytes (default: 500)")
    _add_options(p, InferenceOptions, ("runtime", "precision", "device", "legacy", "unknown", "tta"))
    p.set_defaults(func=cmd_serve)

def _teach_parser(sub) -> None:
    p = sub.add_parser("teach", help="label the new photos it gets wrong or does not know, in a local page; "
                                     "refit in seconds",
                       description="Rank the photos of new folders by how much a label would help, label them in "
                                   "a local web page (or from a CSV), and refit the model's last layer and its "
                                   "'unknown' verdict in seconds. The taught model is a new file; the new photos "
                                   "and the training photos are never changed.")
    p.add_argument("model", metavar="MODEL", help="the model file: a run's best.safetensors (or a taught one), with "
                   "its split.csv beside it; a model with a frozen body (the default)")
    p.add_argument("new", nargs="+", metavar="NEW", help="new photos: folders (searched recursively), files or globs")
    p.add_argument("--into", metavar="DIR", default="labelled",
                   help="where labelled photos are copied: DIR/<class>/, 'none of these' into DIR/unknown/, with "
                        "DIR/labels.csv; an existing DIR is added to, and its labels carry on (default: labelled)")
    p.add_argument("--out", metavar="RUN", help="run folder for the taught model, replaced at each refit "
                                                "(default: runs/teach-<timestamp>)")
    p.add_argument("--labels", metavar="FILE.csv",
                   help="label without the page: columns path,label (a class or 'none'); refit once and stop")
    p.add_argument("--rank", action="store_true", help="print the new photos, most useful to label first, and stop")
    p.add_argument("--json", action="store_true",
                   help="with --rank: a JSON list of {path, sha256, label, best_guess, confidence, in_distribution}")
    p.add_argument("--strategy", choices=TEACH_STRATEGIES, default=TEACH_STRATEGIES[0],
                   help="coverage: photos least like anything the model knows, spread out; diverse: spread out over "
                        "the new photos; uncertainty: 'unknown' and near-tie answers first; random "
                        f"(default: {TEACH_STRATEGIES[0]}, by bench/bench_teach.py)")
    p.add_argument("--retrain-every", type=_positive_int, default=5, metavar="N",
                   help="the page refits after every N labels (default: 5)")
    p.add_argument("--cache", metavar="DIR", help="feature cache (default: ~/.cache/fruitnet/features)")
    p.add_argument("--host", default="127.0.0.1", help="address for the page (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8001, help="port for the page (default: 8001)")
    p.set_defaults(func=cmd_teach)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train, evaluate and predict on the bundled fruits360 sample",
                       description="Train, evaluate and predict on the bundled Fruits-360 sample, offline.")
    p.add_argument("--out", help="demo folder, new or empty (default: runs/demo-<timestamp>)")
    p.set_defaults(func=cmd_demo)

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage lines before an error only hide it (--help has them)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fruitnet", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1].strip())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_check_parser, _train_parser, _evaluate_parser, _predict_parser, _export_parser, _serve_parser,
                _teach_parser, _demo_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Activation maps (tens of MB a batch) in transparent huge pages: PyTorch reads this at its first
    # allocation, before any command imports it.  Measured on predict's webfruit run: the page faults
    # of maps allocated and freed every batch were a fifth of its CPU time (sys 7.4 s of 31; 2.7 s with it).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        return args.func(args)
    except FruitnetError as exc:  # expected errors: one line, their own exit code; anything else is a bug
        print(printable(f"fruitnet {args.command}: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for it (train says more: how to resume)
        print(f"\nfruitnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
