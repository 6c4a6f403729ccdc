"""The docs keep up with the code: every option is documented, the generated option tables are what
the parsers say now, every link leads somewhere, the README stays a front door, and its commands
are the ones CI runs.  No torch needed: these tests take a second."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from fruitnet.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
USAGE = REPO / "docs" / "usage.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200
# Linked before they exist: written on another branch (docs/results.md's GroceryStore section).
# A missing file listed here is allowed; once it exists its links and anchors are checked as any.
PENDING = {REPO / "docs" / "results-accuracy.md"}


def _usage_script():
    spec = importlib.util.spec_from_file_location("usage_script", REPO / "scripts" / "usage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


usage = _usage_script()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# --- every option, and the generated tables -----------------------------------------------------

def test_every_option_of_every_command_is_in_usage_md():
    text = USAGE.read_text()
    missing = [f"{command} {option}" for command, parser in subcommands().items() for action in parser._actions
               for option in action.option_strings
               if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)]
    assert not missing, f"options missing from docs/usage.md: {', '.join(missing)}"


def test_every_command_has_a_heading_that_is_its_anchor():
    anchors = headings(USAGE.read_text())
    assert set(subcommands()) <= anchors, "docs/usage.md needs a heading per command (docs/usage.md#teach is linked)"


def test_the_generated_option_tables_are_what_the_parsers_say_now():
    blocks = usage.generated(USAGE.read_text())
    assert set(blocks) == set(subcommands()), "one generated block per command: run scripts/usage.py"
    stale = [command for command, body in blocks.items() if body != usage.render(command)]
    assert not stale, f"docs/usage.md's tables for {', '.join(stale)} are out of date: " \
                      "run PYTHONPATH=src python scripts/usage.py"


def test_a_new_option_makes_the_tables_stale(monkeypatch):
    from fruitnet import formats

    monkeypatch.setitem(formats.WRITERS, "markdown", formats.Writer(lambda *a: None, "FILE.md", "a Markdown table"))
    assert "`--markdown FILE.md`" in usage.render("predict")
    assert usage.generated(USAGE.read_text())["predict"] != usage.render("predict")


def test_the_generator_rewrites_a_stale_block():
    text = USAGE.read_text()
    stale = text.replace("| `--tensorboard` |", "| `--tensorboard-old` |", 1)
    assert stale != text and usage.update(stale) == text


# --- links ------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without markup, lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(text: str) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", path.read_text()))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            if where not in PENDING:
                broken.append(f"{target}: no such file")
            continue
        if anchor and where.suffix == ".md" and anchor not in headings(where.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {where.name}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    assert links(doc), f"{doc.name} links nothing: is the pattern right?"
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](#nowhere) [file](missing.md) `[code](ignored.md)`\n")
    assert broken_links(page) == ["#nowhere: no heading #nowhere in page.md", "missing.md: no such file"]


# --- the front door ---------------------------------------------------------------------------------

def test_the_readme_stays_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines: move the detail into docs/"


def top_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    return block[1].strip().splitlines()


def test_the_readme_starts_with_setup_and_test_commands_that_ci_runs():
    setup, tests = top_commands()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith((".venv/", "python3 "))]
    ci_tests = [line for line in ci if " -m pytest" in line]
    assert ci_tests == [tests], f".ci/run runs {ci_tests}, the README says {tests!r}"
    # .ci/run sets up as the README's first command does (quietly), before it checks the install
    ci_setup = [re.sub(r" -q\b", "", line) for line in ci if line.startswith(("python3 -m venv", ".venv/bin/pip"))]
    assert setup.split(" && ")[:len(ci_setup)] == ci_setup
    assert setup.endswith("&& .venv/bin/fruitnet demo")


def test_the_module_map_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = sorted(p.name for p in (REPO / "src" / "fruitnet").glob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md's module map lacks {', '.join(missing)}"
