"""Shared fixtures: where the real data lives, a small trained model, a CLI runner, a headless browser."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FRUITNET_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_DATA = REPO / "src" / "fruitnet" / "demo_data"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def shared_folder(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: this test needs the real photos in ../shared/data/{name} "
                    "(set FRUITNET_SHARED_DATA to their parent folder)")
    return path


@pytest.fixture(scope="session")
def webfruit() -> Path:
    return shared_folder("webfruit")


@pytest.fixture(scope="session")
def comp309() -> Path:
    return shared_folder("comp309-sample")


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A real EfficientNet-Lite0 with its head trained on the bundled demo sample (seconds)."""
    from fruitnet.training import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "run"
    summary = train(TrainConfig(data=str(DEMO_DATA / "train"), out=str(out), backbone="efficientnet_lite0",
                                mode="freeze", recipe="fast", epochs=5, lr=0.01, batch_size=16, workers=0),
                    log=lambda *a: None)
    return Path(summary["model"])


def run_cli(*args, timeout=900, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m fruitnet ARGS` as a user would; returns the completed process (text)."""
    return subprocess.run([sys.executable, "-m", "fruitnet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through selenium, for the web page's tests (skipped where absent)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium or chromedriver is absent: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see Content-Security-Policy reports
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def tree_state(root: Path) -> dict:
    """Every entry under root, root itself as ".": its kind, link target, size, mtime and content
    hash.  Equal before and after a command: nothing in the folder was written, moved or added."""
    def entry(p: Path) -> tuple:
        st = p.lstat()
        kept = (st.st_mode, st.st_size, st.st_mtime_ns, os.readlink(p) if p.is_symlink() else None)
        return kept + (hashlib.sha256(p.read_bytes()).hexdigest(),) if p.is_file() else kept

    state = {".": entry(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            state[str(p.relative_to(root))] = entry(p)
    return state
