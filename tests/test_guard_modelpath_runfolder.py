"""Direct tests of three small modules the commands lean on: guard (what the services refuse),
modelpath (what a MODEL argument points at) and runfolder (a run's files, in order)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest
import torch
from conftest import DEMO_DATA

from fruitnet.errors import UsageError
from fruitnet.guard import Guard, host_name, page_csp, raw_json_response
from fruitnet.modelpath import check_model_argument, peek_metadata
from fruitnet.runfolder import RunFolder, new_output_folder, output_folder, read_run


# --- guard ----------------------------------------------------------------------------------------------

async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def ask(app, method: str = "GET", host: str = "127.0.0.1:8000", **headers) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}") as c:
            return await c.request(method, "/", headers=headers)

    return asyncio.run(go())


def test_host_names_are_read_as_a_browser_sends_them():
    assert host_name("localhost:8000") == "localhost" and host_name("[::1]:8000") == "::1"
    assert host_name("Example.COM") == "example.com" and host_name("::1") == "::1"


def test_guard_refuses_foreign_hosts_and_origins_and_marks_every_answer():
    app = Guard(hello, csp="default-src 'none'", allowed_hosts={"127.0.0.1", "localhost"})
    ok = ask(app)
    assert ok.status_code == 200 and ok.text == "hello"
    assert ok.headers["x-frame-options"] == "DENY" and ok.headers["content-security-policy"] == "default-src 'none'"
    rebinding = ask(app, host="evil.example:8000")
    assert rebinding.status_code == 400 and "DNS rebinding" in rebinding.json()["error"]
    forged = ask(app, "POST", Origin="http://evil.example")
    assert forged.status_code == 403 and forged.headers["x-content-type-options"] == "nosniff"
    assert ask(app, "POST", Origin="http://127.0.0.1:8000").status_code == 200  # its own page
    assert ask(app, "POST").status_code == 200  # a client that sends no Origin (curl, scripts)


def test_guard_answers_503_beyond_its_limit():
    app = Guard(hello, csp="default-src 'none'", limit=0)
    busy = ask(app)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]


def test_the_page_policy_admits_exactly_its_own_inline_script_and_style():
    page = "<style>b{}</style><script>go()</script>"
    csp = page_csp(page)
    for body in ("b{}", "go()"):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src 'none'" in page_csp("<p>no script</p>")


def test_a_raw_answer_is_complete_json_that_closes_the_connection():
    raw = raw_json_response(408, "too slow")
    head, body = raw.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout") and b"connection: close" in head
    assert json.loads(body) == {"error": "too slow"} and f"content-length: {len(body)}".encode() in head


# --- modelpath ------------------------------------------------------------------------------------------------

def test_what_users_pass_instead_of_a_model_file_is_named(trained_model, tmp_path):
    run = trained_model.parent
    cases = [
        (run, [], f"{run} is a run folder; pass {run / 'best.safetensors'}"),
        (run / "checkpoint.pt", [], "a training checkpoint (for fruitnet train --resume)"),
        (DEMO_DATA / "test", [trained_model], "the model comes first"),
        (next((DEMO_DATA / "test" / "cherry").iterdir()), [], "is an image, not a model file"),
        (tmp_path, [], "is a folder, not a model file"),
    ]
    for given, others, words in cases:
        with pytest.raises(UsageError, match=re.escape(words)):
            check_model_argument(given, others)
    check_model_argument(trained_model, [DEMO_DATA / "test"])  # the right way round: no complaint
    check_model_argument(tmp_path / "missing.safetensors")  # left to the loader, which says "not found"


def test_the_header_is_read_without_torch_and_garbage_is_not_metadata(trained_model, tmp_path):
    meta = peek_metadata(trained_model)
    assert meta["classes"] == ["cherry", "strawberry", "tomato"] and meta["preprocessing"]["input_size"] == 224
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes((10**9).to_bytes(8, "little") + b"{")
    assert peek_metadata(junk) is None and peek_metadata(tmp_path / "nothing") is None


# --- runfolder ------------------------------------------------------------------------------------------------

def test_new_output_folders_are_marked_and_never_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = new_output_folder(None, "eval-"), new_output_folder(None, "eval-")
    assert first != second and second.name.endswith("-2") and first.parent == Path("runs")
    assert json.loads((first / "fruitnet-run.json").read_text())["fruitnet"] == "output folder"
    (first / "report.txt").write_text("mine")
    with pytest.raises(UsageError):
        new_output_folder(first, "eval-")


def test_a_failed_job_takes_its_folder_with_it_but_leaves_a_given_empty_folder(tmp_path):
    for out, leaves in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if leaves:
            out.mkdir()
        with pytest.raises(RuntimeError):
            with output_folder(out, "x-") as path:
                (path / "half.csv").write_text("1,2")
                raise RuntimeError("the job failed")
        assert out.exists() == leaves and (not leaves or not any(out.iterdir()))


def test_read_run_says_what_is_wrong_with_a_run_folder(trained_model, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_model.parent, run)
    saved = read_run(run)
    assert saved.config["classes"] == ["cherry", "strawberry", "tomato"] and saved.train_items and saved.val_items
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not a fruitnet checkpoint"):
        read_run(run)
    (run / "split.csv").unlink()
    with pytest.raises(UsageError, match="split.csv is missing"):
        read_run(run)
    (run / "config.json").write_text("{")
    with pytest.raises(UsageError, match="unreadable"):
        read_run(run)
    with pytest.raises(UsageError, match="not a fruitnet run folder"):
        read_run(tmp_path)


def test_end_epoch_writes_the_checkpoint_first_and_an_inactive_folder_writes_nothing(tmp_path):
    from quick_model import make_quick_model

    from fruitnet.model import load_model

    model, meta = load_model(make_quick_model(tmp_path / "m.safetensors"))
    meta = {k: meta[k] for k in ("classes", "backbone", "preprocessing")}
    row = {"epoch": 1, "seconds": 1.0, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0,
           "val_accuracy": 0.5, "lr": 0.1}
    quiet = RunFolder(tmp_path / "rank1", active=False)
    quiet.end_epoch({"rows": [row]}, model, meta, improved=True)
    assert not (tmp_path / "rank1").exists()
    run = RunFolder(tmp_path)
    run.write_metrics([])
    run.end_epoch({"rows": [row], "epoch": 1}, model, meta, improved=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("1,1.0,1.0,0.5")
    assert (tmp_path / "last.safetensors").is_file() and not (tmp_path / "best.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))
