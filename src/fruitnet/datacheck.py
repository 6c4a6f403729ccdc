"""The data check: `fruitnet check DATA [--deep]`, shown as pictures.

Plain check (fast, no torch needed for the findings): counts, exact duplicates (same bytes) and
near-duplicates (perceptual hash, dataset.py), groups that span two classes (label conflicts),
class imbalance.  --deep adds what only a trained eye sees:
1. features of every photo from the pretrained body (the default backbone, offline weights), by
   features.from_files;
2. out-of-fold class probabilities from a linear head (logistic regression), k-fold cross-validated
   with near-duplicate groups kept inside one fold, so no photo is judged by a model that saw its copy;
3. cleanlab's Datalab on those features and probabilities: label issues (likely mislabelled photos,
   with the class the data suggests), near-duplicates in feature space, class imbalance;
4. outliers by the score the default model's "unknown" verdict uses (unknown.knn, the same features):
   a photo far from its 10th most similar other photo, beyond Tukey's fence, is unlike the rest.
Outputs go to a folder outside the data folder: report.json, photos.csv (every photo's scores) and
a self-contained report.html (thumbnails inline as data URIs).  Nothing is written into DATA.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np

from fruitnet.balance import IMBALANCE_RATIO, imbalance_ratio
from fruitnet.config import DEFAULT_BACKBONE
from fruitnet.dataset import RUN_MARKER, Catalog, Item, any_close_pair, connected_groups
from fruitnet.errors import ImageError
from fruitnet.images import thumbnail_jpeg
from fruitnet.outputs import check_outputs, printable, spreadsheet_row

# Datalab calls two photos near-duplicates when their feature distance is under this fraction of the
# median nearest-neighbour distance.  Its default, 0.13, found under half of webfruit's resized or
# cropped copies in feature space; at 0.3 it finds 25 of 30, and the extra pairs it finds in the
# unmodified webfruit are crops, flips and watermarked versions of one photo (bench_check.py).
NEAR_DUPLICATE_THRESHOLD = 0.3
HTML_LIMIT = 200  # photos or groups shown per section of report.html; report.json has them all


# --- where the outputs go ---------------------------------------------------------------------

def output_folder(out: str | None, data: str | Path) -> Path:
    """--out, or runs/check-<timestamp>; never inside the data folder, never one that holds files."""
    path = Path(out) if out else Path("runs") / f"check-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    check_outputs({"--out": path}, inputs=[data], folders={"--out"})
    return path


# --- findings ----------------------------------------------------------------------------------

def _group_entries(usable: list[Item], groups: list[list[int]], feature_pairs=()) -> list[dict]:
    entries = []
    for g, how in zip(groups, _found_by(usable, groups, feature_pairs)):
        if len(g) < 2:
            continue
        members = [usable[i] for i in g]
        entries.append({"paths": [it.path for it in members], "labels": [it.label for it in members],
                        "exact": len({it.sha256 for it in members}) == 1, "found_by": how,
                        "label_conflict": len({it.label for it in members}) > 1})
    # label conflicts first, then the larger groups
    return sorted(entries, key=lambda e: (not e["label_conflict"], -len(e["paths"]), e["paths"][0]))


def _found_by(usable: list[Item], groups: list[list[int]], feature_pairs) -> list[list[str]]:
    """For each group, what joins some two of its members: "features" (a pair of feature-space
    near-duplicates), "perceptual hash" (a pair within dataset.NEAR_DUPLICATE_BITS), "same bytes".
    Pairs are looked for inside each group, never listed: look-alike photos have n^2/2 of them."""
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    by_features = {group_of[i] for i, j in feature_pairs if group_of[i] == group_of[j]}
    found = []
    for k, g in enumerate(groups):
        members = [usable[i] for i in g]
        how = ["features"] if k in by_features else []
        how += ["perceptual hash"] if len(g) > 1 and any_close_pair([it.phash for it in members]) else []
        how += ["same bytes"] if len({it.sha256 for it in members}) < len(members) else []
        found.append(how)
    return found


def _groups(catalog: Catalog, extra_pairs: list[tuple[int, int]]) -> list[list[int]]:
    """The split's groups (identical files, perceptual-hash copies: Catalog.groups) joined by
    extra pairs (feature-space near-duplicates), as indices into catalog.usable.  Where the extra
    pairs would chain more than a tenth of the photos together, they are dropped for that chain,
    as the hash's own chains are split (dataset.hash_groups)."""
    usable = catalog.usable
    index = {it.path: i for i, it in enumerate(usable)}
    base = [[index[it.path] for it in g] for g in catalog.groups()]
    base_pairs = [(g[0], i) for g in base for i in g[1:]]
    cap = max(3, len(usable) // 10)
    groups = []
    for g in connected_groups(len(usable), base_pairs + list(extra_pairs)):
        if len(g) <= cap:
            groups.append(g)
        else:
            inside = set(g)
            groups += [b for b in base if b[0] in inside]
    return sorted(groups, key=lambda g: g[0])


def imbalance(counts: dict[str, int]) -> dict:
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    ratio = imbalance_ratio(counts)
    return {"largest": largest, "smallest": smallest, "ratio": round(ratio, 4),
            "imbalanced": ratio > IMBALANCE_RATIO, "threshold": IMBALANCE_RATIO}


def quick_findings(catalog: Catalog) -> dict:
    """What the plain check knows: counts, duplicate groups (bytes and perceptual hash), imbalance."""
    usable = catalog.usable
    groups = _groups(catalog, [])
    counts = catalog.counts()
    return {"root": catalog.root, "classes": catalog.classes, "counts": counts, "usable": len(usable),
            "skipped": catalog.skipped, "ignored": catalog.ignored, "imbalance": imbalance(counts),
            "duplicate_groups": _group_entries(usable, groups), "deep": None}


def extract_features(items: list[Item], backbone: str = DEFAULT_BACKBONE, batch_size: int = 64,
                     cache_dir: str | Path | None = None, progress: bool = True) -> np.ndarray:
    """Pooled features of the pretrained body, one row per item (float32), by features.from_files.

    cache_dir: keep each photo's features there by content (benchmarks and repeated checks re-use them)."""
    import torch

    from fruitnet.arithmetic import choose_arithmetic
    from fruitnet.backbones import create_body, get_backbone
    from fruitnet.features import FeatureCache, body_fingerprint, from_files

    body, _ = create_body(backbone, "imagenet")
    device = torch.device("cpu")
    arith = choose_arithmetic("auto", device)
    arith.prepare_model(body.eval())
    cache = FeatureCache(cache_dir, body_fingerprint(body)) if cache_dir else None
    rows, failed = from_files(body, [(it.path, it.sha256) for it in items], get_backbone(backbone).preprocessing,
                              device, arith, batch_size, cache, progress=progress)
    if failed:  # scanned as usable a moment ago: changed or removed since
        path, reason = next(iter(failed.items()))
        raise ImageError(path, f"{reason} (changed since the scan; check again)")
    return rows


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                              folds: int = 5, seed: int = 0) -> np.ndarray:
    """Class probabilities for each photo from a linear head that never saw it (or a copy of it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = max(2, min(folds, int(np.bincount(labels).min())))
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(head, features, labels, groups=groups, cv=cv, method="predict_proba")


def deep_findings(catalog: Catalog, backbone: str = DEFAULT_BACKBONE, folds: int = 5, seed: int = 0,
                  cache_dir: str | Path | None = None, progress: bool = True, log=print) -> dict:
    """quick_findings plus label issues and feature-space near-duplicates (cleanlab Datalab), and
    outliers by the unknown verdict's own score (unknown.knn on the same features): each photo's
    distance to its 10th most similar photo among the others (its own copies left out), flagged
    beyond Tukey's fence (unknown.far_out)."""
    import cleanlab

    from fruitnet.unknown import far_out

    usable = catalog.usable
    seconds = {}
    t = time.perf_counter()
    features = extract_features(usable, backbone, cache_dir=cache_dir, progress=progress)
    seconds["features"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = np.array([catalog.classes.index(it.label) for it in usable])
    group_of = _group_of(catalog)
    probs = out_of_fold_probabilities(features, labels, group_of, folds, seed)
    seconds["cross_validation"] = time.perf_counter() - t
    log(f"linear head, {folds}-fold cross-validated: out-of-fold accuracy {np.mean(probs.argmax(1) == labels):.3f}")
    t = time.perf_counter()
    lab = _datalab(usable, features, probs)
    seconds["cleanlab"] = time.perf_counter() - t
    distance = _outlier_distances(features, group_of)

    near_sets = lab.get_info("near_duplicate")["near_duplicate_sets"]
    feature_pairs = [(i, int(j)) for i, js in enumerate(near_sets) for j in js]
    groups = _groups(catalog, feature_pairs)
    findings = quick_findings(catalog)
    findings["duplicate_groups"] = _group_entries(usable, groups, feature_pairs)
    findings["imbalance"]["cleanlab_flags"] = sorted({usable[i].label for i in np.flatnonzero(
        lab.get_issues("class_imbalance")["is_class_imbalance_issue"])})
    suggested = [catalog.classes[k] for k in probs.argmax(1)]
    issues = lab.get_issues("label")
    label_score = issues["label_score"].to_numpy()
    findings["label_issues"] = [
        {"path": usable[i].path, "label": usable[i].label, "suggested": suggested[i],
         "score": round(float(label_score[i]), 4), "probability_of_label": round(float(probs[i, labels[i]]), 4)}
        for i in np.argsort(label_score, kind="stable") if issues["is_label_issue"].iloc[i]]
    findings["outliers"] = [
        {"path": usable[i].path, "label": usable[i].label, "score": round(float(distance[i]), 4)}
        for i in np.argsort(-distance, kind="stable") if far_out(distance)[i]]
    findings["deep"] = {"backbone": backbone, "folds": folds, "seed": seed, "cleanlab": cleanlab.__version__,
                        "out_of_fold_accuracy": round(float(np.mean(probs.argmax(1) == labels)), 4),
                        "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    group_index = {i: k for k, g in enumerate(g for g in groups if len(g) > 1) for i in g}
    findings["photos"] = [  # every photo's scores, for photos.csv (not report.json: it can be long)
        {"path": it.path, "label": it.label, "suggested": suggested[i], "label_score": round(float(label_score[i]), 6),
         "outlier_distance": round(float(distance[i]), 6), "duplicate_group": group_index.get(i, "")}
        for i, it in enumerate(usable)]
    return findings


def _group_of(catalog: Catalog) -> np.ndarray:
    """The split's duplicate group (identical files and perceptual-hash copies) of each usable photo."""
    position = {it.path: i for i, it in enumerate(catalog.usable)}
    group_of = np.zeros(len(position), dtype=int)
    for g, members in enumerate(catalog.groups()):
        for it in members:
            group_of[position[it.path]] = g
    return group_of


def _datalab(usable: list[Item], features: np.ndarray, probs: np.ndarray):
    """cleanlab's Datalab on the features and out-of-fold probabilities: label issues,
    near-duplicates in feature space, class imbalance."""
    from cleanlab import Datalab

    lab = Datalab(data={"label": np.array([it.label for it in usable])}, label_name="label", verbosity=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lab.find_issues(features=features, pred_probs=probs,
                        issue_types={"label": {}, "class_imbalance": {},
                                     "near_duplicate": {"threshold": NEAR_DUPLICATE_THRESHOLD}})
    return lab


def _outlier_distances(features: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """Each photo's kNN distance (unknown.knn, the unknown verdict's score) to the other photos, its
    own duplicate group left out."""
    import torch

    from fruitnet.unknown import knn_left_out, normalise

    x = torch.from_numpy(features)
    return -knn_left_out(x, normalise(x), group_of, group_of).numpy()


def suspects(findings: dict) -> list[str]:
    """The paths --write-exclude writes: likely mislabelled photos and outliers, most suspicious first."""
    return list(dict.fromkeys([e["path"] for e in findings.get("label_issues", [])]
                              + [e["path"] for e in findings.get("outliers", [])]))


def write_exclude(findings: dict, path: str | Path) -> Path:
    """One path per line, relative to the data folder; `train --exclude FILE` reads it back."""
    root = Path(findings["root"])
    path = Path(path)
    lines = ["# fruitnet check --deep: likely mislabelled photos and outliers in " + str(root),
             "# one path per line, relative to the data folder; delete the lines of photos you want to keep,",
             "# then: fruitnet train DATA --exclude " + path.name]
    lines += [Path(os.path.relpath(p, root)).as_posix() for p in suspects(findings)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- console, report.json, photos.csv, report.html ---------------------------------------------

def format_summary(findings: dict) -> str:
    lines = [f"data: {findings['root']}", f"  {len(findings['classes'])} classes, {findings['usable']} usable images"]
    width = max(len(c) for c in findings["classes"])
    lines += [f"    {c:<{width}}  {n}" for c, n in findings["counts"].items()]
    imb = findings["imbalance"]
    lines.append(f"  class balance: largest/smallest = {imb['ratio']:.2f} ({imb['largest']} / {imb['smallest']}); "
                 + (f"imbalanced (above {imb['threshold']}x): training weights the loss by class unless --balance none"
                    if imb["imbalanced"] else "balanced enough"))
    groups = findings["duplicate_groups"]
    exact = [g for g in groups if g["exact"]]
    conflicts = [g for g in groups if g["label_conflict"]]
    lines.append(f"  {len(groups)} duplicate groups ({sum(len(g['paths']) for g in groups)} files), each kept on one "
                 f"side of the split: {len(exact)} of identical files only, {len(groups) - len(exact)} with near-copies"
                 + (" (--deep also joins copies found in feature space: more, or larger, groups than check alone)"
                    if findings["deep"] is not None else ""))
    if conflicts:
        lines.append(f"  {len(conflicts)} group(s) span two classes (label conflicts):")
        lines += [f"    {' = '.join(f'{p} [{l}]' for p, l in zip(g['paths'], g['labels']))}" for g in conflicts[:10]]
        if len(conflicts) > 10:
            lines.append(f"    ... and {len(conflicts) - 10} more in report.json")
    if findings["deep"] is not None:
        lines.append(f"  {len(findings['label_issues'])} likely mislabelled photos (folder -> suggested, score):")
        lines += [f"    {e['path']}: {e['label']} -> {e['suggested']} ({e['score']:.3f})" for e in findings["label_issues"][:10]]
        if len(findings["label_issues"]) > 10:
            lines.append(f"    ... and {len(findings['label_issues']) - 10} more in report.html")
        lines.append(f"  {len(findings['outliers'])} outliers (unlike the other photos, often fine photos of an "
                     "unusual look; distance):")
        lines += [f"    {e['path']} [{e['label']}] ({e['score']:.3f})" for e in findings["outliers"][:10]]
        if len(findings["outliers"]) > 10:
            lines.append(f"    ... and {len(findings['outliers']) - 10} more in report.html")
    if findings["skipped"]:
        lines.append(f"  {len(findings['skipped'])} file(s) skipped:")
        lines += [f"    {s['path']}: {s['reason']}" for s in findings["skipped"]]
    if findings["ignored"]:
        lines.append(f"  {len(findings['ignored'])} non-image file(s) ignored")
    return "\n".join(map(printable, lines))


def write_outputs(findings: dict, out: Path) -> list[Path]:
    """report.json, report.html and (after --deep) photos.csv in `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    # the marker every fruitnet output folder carries: a scan skips the folder, never reads its pictures
    (out / RUN_MARKER).write_text(json.dumps({"fruitnet": "check report",
                                              "created": datetime.now().isoformat(timespec="seconds")}))
    photos = findings.get("photos")
    report = {k: v for k, v in findings.items() if k != "photos"}
    written = [out / "report.json", out / "report.html"]
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    if photos:
        with open(out / "photos.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(list(photos[0]))
            w.writerows(spreadsheet_row(r.values()) for r in sorted(photos, key=lambda r: r["label_score"]))
        written.append(out / "photos.csv")
    return written


def thumbnail_uri(path: str, size: int = 160) -> str | None:
    """A small JPEG of the photo as a data: URI (report.html carries its pictures inside itself)."""
    data = thumbnail_jpeg(path, size, quality=75)
    return None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em;color:#222;background:#fff}
h1{font-size:1.5em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
.grid{display:flex;flex-wrap:wrap;gap:10px}.group{border:1px solid #ccc;border-radius:6px;padding:6px;margin:8px 0;display:flex;flex-wrap:wrap;gap:8px}
.conflict{border-color:#c0392b;background:#fdf0ee}
figure{margin:0;width:170px}figure img{width:160px;height:160px;object-fit:contain;background:#f4f4f4;display:block}
figcaption{font-size:12px;word-break:break-all}.path{color:#555}.bad{color:#c0392b;font-weight:600}
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}
.bar{background:#4a7ebb;height:12px;display:inline-block}.note{color:#666}
@media (prefers-color-scheme:dark){body{background:#161616;color:#ddd}.conflict{background:#3a1f1c}
figure img{background:#222}.path{color:#aaa}}
"""


def render_html(report: dict) -> str:
    """One self-contained page: inline CSS, thumbnails as data URIs, no scripts, no external assets.
    What a user acts on comes first (likely mislabelled photos, outliers, label conflicts), then
    the duplicate groups the split already handles."""
    page = _Page(report)
    parts = page.header() + page.counts()
    if report["deep"]:
        parts += page.mislabelled() + page.outliers()
    parts += page.groups() + page.skipped()
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>fruitnet check: {html.escape(report['root'])}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


class _Page:
    """report.html's sections, each a list of HTML fragments; thumbnails made once per photo."""

    def __init__(self, report: dict):
        self.report, self.thumbs = report, {}
        self.suspect = {e["path"]: e["suggested"] for e in report.get("label_issues", [])}

    def figure(self, path: str, caption: str) -> str:
        esc = html.escape
        if path not in self.thumbs:
            self.thumbs[path] = thumbnail_uri(path)
        img = (f'<img src="{self.thumbs[path]}" alt="{esc(Path(path).name)}">' if self.thumbs[path]
               else '<div class="bad">cannot be shown</div>')
        return f'<figure>{img}<figcaption>{caption}<br><span class="path">{esc(path)}</span></figcaption></figure>'

    @staticmethod
    def more(n: int) -> list[str]:
        return [f'<p class="note">... and {n - HTML_LIMIT} more in report.json</p>'] if n > HTML_LIMIT else []

    def header(self) -> list[str]:
        report, esc = self.report, html.escape
        deep = report["deep"]
        groups = report["duplicate_groups"]
        found = ([("mislabelled", "likely mislabelled", len(report["label_issues"])),
                  ("outliers", "outliers", len(report["outliers"]))] if deep else []) + [
            ("conflicts", "label conflicts", sum(g["label_conflict"] for g in groups)),
            ("duplicates", "duplicate groups", sum(not g["label_conflict"] for g in groups))]
        return [f"<h1>fruitnet check: {esc(report['root'])}</h1>",
                f"<p>{len(report['classes'])} classes, {report['usable']} usable photos"
                + (f"; deep check with {esc(deep['backbone'])} features, {deep['folds']}-fold linear head "
                   f"(out-of-fold accuracy {deep['out_of_fold_accuracy']:.3f}), cleanlab {esc(deep['cleanlab'])}"
                   if deep else "; quick check (add --deep for likely mislabelled photos and outliers)") + "</p>",
                "<p>" + " &middot; ".join(f'<a href="#{a}">{n} {t}</a>' for a, t, n in found) + "</p>"]

    def counts(self) -> list[str]:
        counts, imb, esc = self.report["counts"], self.report["imbalance"], html.escape
        top = max(counts.values())
        return (['<h2 id="balance">Class counts and balance</h2><table>']
                + [f'<tr><td>{esc(c)}</td><td>{n}</td><td><span class="bar" style="width:{300 * n // max(top, 1)}px">'
                   "</span></td></tr>" for c, n in counts.items()]
                + [f"</table><p>largest / smallest = {imb['ratio']:.2f}: "
                   + (f'<span class="bad">imbalanced</span> (above {imb["threshold"]}x); training weights the loss '
                      "by class (<code>--balance auto</code>)" if imb["imbalanced"] else "balanced enough") + "</p>"])

    def gallery(self, anchor: str, title: str, note: str, entries: list[dict], caption) -> list[str]:
        return ([f'<h2 id="{anchor}">{title} ({len(entries)})</h2><p class="note">{note}</p><div class=\'grid\'>']
                + [self.figure(e["path"], caption(e)) for e in entries[:HTML_LIMIT]] + ["</div>"]
                + self.more(len(entries)))

    def mislabelled(self) -> list[str]:
        esc = html.escape
        return self.gallery("mislabelled", "Likely mislabelled", "Most suspicious first: move each to the class it "
                            "shows, or leave it out with --write-exclude (delete the lines of the photos you keep). "
                            "Score: cleanlab's label quality (0 = surely wrong, 1 = surely right).",
                            self.report["label_issues"], lambda e: f"<span class='bad'>{esc(e['label'])}</span> "
                            f"&rarr; <b>{esc(e['suggested'])}</b> ({e['score']:.3f})")

    def outliers(self) -> list[str]:
        return self.gallery("outliers", "Outliers", "Photos unlike the rest, most unusual first: the model would "
                            "likely answer 'unknown' for them. Often they are fine photos (a cut fruit, an unusual "
                            "angle): keep them unless they show something else. Score: distance to the 10th most "
                            "similar other photo (higher = more unusual).", self.report["outliers"],
                            lambda e: f"in <b>{html.escape(e['label'])}</b> ({e['score']:.3f})")

    def groups(self) -> list[str]:
        groups, esc, parts = self.report["duplicate_groups"], html.escape, []

        def member(path: str, label: str, how: str) -> str:
            flag = f" <span class='bad'>likely {esc(self.suspect[path])}</span>" if path in self.suspect else ""
            return self.figure(path, f"<b>{esc(label)}</b>{flag} <span class='note'>({esc(how)})</span>")

        for title, anchor, chosen, note in (
                ("Label conflicts: copies filed under different classes", "conflicts",
                 [g for g in groups if g["label_conflict"]], "At least one copy in each group is in the wrong folder."),
                ("Near-duplicate and duplicate groups", "duplicates", [g for g in groups if not g["label_conflict"]],
                 "Nothing to do: each group is kept on one side of the training split, so validation never sees "
                 "a copy of a training photo.")):
            parts.append(f'<h2 id="{anchor}">{title} ({len(chosen)})</h2><p class="note">{note}</p>')
            parts += [f'<div class="group{" conflict" if g["label_conflict"] else ""}">'
                      + "".join(member(p, lb, ", ".join(g["found_by"])) for p, lb in zip(g["paths"], g["labels"]))
                      + "</div>" for g in chosen[:HTML_LIMIT]]
            parts += self.more(len(chosen))
        return parts

    def skipped(self) -> list[str]:
        skipped, esc = self.report["skipped"], html.escape
        if not skipped:
            return []
        return ([f'<h2 id="skipped">Files that cannot be used ({len(skipped)})</h2><table>']
                + [f"<tr><td>{esc(s['path'])}</td><td>{esc(s['reason'])}</td></tr>" for s in skipped] + ["</table>"])
