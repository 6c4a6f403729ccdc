"""serve --collect DIR: the photos the service could not answer well are kept, capped, for teach."""

from __future__ import annotations

import csv
import io

import httpx
from conftest import DEMO_DATA, run_cli
from PIL import Image
from quick_model import serving


def square(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def post(url: str, name: str, data: bytes) -> dict:
    r = httpx.post(url + "/predict", files=[("files", (name, data, "application/octet-stream"))], timeout=120)
    assert r.status_code == 200, r.text
    return r.json()[0]


def test_collect_keeps_unknown_and_unsure_photos_up_to_its_cap(trained_model, tmp_path):
    folder = tmp_path / "collected"
    cherry = sorted((DEMO_DATA / "test" / "cherry").glob("*.jpg"))[0]
    with serving(trained_model, "--collect", folder, "--collect-max-photos", "2") as served:
        assert httpx.get(served.url + "/health").json()["collected"] == 0
        sure = post(served.url, cherry.name, cherry.read_bytes())
        greys = [post(served.url, f"=grey{v}.png", square(v)) for v in (40, 90, 140)]
        health = httpx.get(served.url + "/health").json()
        log = served.log()
    assert sure["label"] == "cherry" and all(g["label"] == "unknown" for g in greys), (sure, greys)
    kept = sorted(p.name for p in folder.iterdir() if p.suffix == ".png")
    assert len(kept) == 2 and health["collected"] == 2  # the cap: the third grey square is not kept
    rows = list(csv.DictReader(open(folder / "collected.csv")))
    assert [r["filename"] for r in rows] == ["'=grey40.png", "'=grey90.png"]  # never a spreadsheet formula
    assert [r["label"] for r in rows] == ["unknown", "unknown"] and {r["file"] for r in rows} == set(kept)
    assert (folder / rows[0]["file"]).read_bytes() == square(40)
    assert "is full (2 photos" in log
    # what was collected is where a teaching session starts
    ranked = run_cli("teach", trained_model, folder, "--rank", "--json", "--cache", tmp_path / "cache")
    assert ranked.returncode == 0, ranked.stderr


def test_collect_is_off_unless_asked_and_never_writes_over_the_model(trained_model, tmp_path):
    with serving(trained_model) as served:
        assert httpx.get(served.url + "/health").json()["collected"] is None
    refused = run_cli("serve", trained_model, "--collect", trained_model)
    assert refused.returncode == 2 and "--collect" in refused.stderr and "Traceback" not in refused.stderr
