"""The teach page's HTTP service: `fruitnet teach MODEL NEW...` without --labels or --rank.

GET  /                  the page (src/fruitnet/web/teach.html: no external assets, works offline)
GET  /api/state         the classes, how many photos are labelled, the ranking (the new photos not
                        labelled yet, most useful first, each with the model's answer) and the
                        numbers of the last refit
GET  /api/photo/SHA256  a new photo, as a JPEG at most ?size= pixels on its longer side (by its
                        content's hash: no path from the page is ever opened)
GET  /api/explain/SHA256  its Grad-CAM heat map over the model's view (PNG), for the best class
POST /api/label         {"sha256": ..., "label": CLASS or "none"}: copy it into --into, log it
POST /api/undo          take the last label back (its copy is removed)
POST /api/retrain       refit, write the new model file, answer the numbers and the new ranking
GET  /health            {"status": "ok", "labelled": n, "refits": n}

The same hardening as `fruitnet serve` (server.harden): loopback Host names only, no posts from
other origins, a small body limit, a strict Content-Security-Policy, JSON errors.  One lock
guards the session: a label waits for nothing longer than a file copy, and a refit runs in a
worker thread, holding the lock only to read the labels and to store its result.
"""

from __future__ import annotations

import io
import threading
from importlib import resources

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from fruitnet.errors import FruitnetError
from fruitnet.images import thumbnail_jpeg
from fruitnet.server import MB, _error, harden
from fruitnet.teach import Teacher

RANKED = 200  # photos the page's queue holds at once
MAX_SIDE = 1024


def create_teach_app(teacher: Teacher, strategy: str = "coverage", retrain_every: int = 5,
                     limit_concurrency: int | None = 64, allowed_hosts: set[str] | None = None) -> FastAPI:
    page = (resources.files("fruitnet") / "web" / "teach.html").read_text(encoding="utf-8")
    app = FastAPI(title="fruitnet teach", docs_url=None, redoc_url=None)
    harden(app, page, MB, limit_concurrency, allowed_hosts)
    lock = threading.Lock()

    def ranking() -> list[dict]:
        with lock:
            ranked = teacher.ranking(strategy)[:RANKED]
        return [{**r, "name": r["path"].rsplit("/", 1)[-1]} for r in ranked]

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "labelled": len(teacher.labels), "refits": len(teacher.history)}

    @app.get("/api/state")
    async def state():
        ranked = await anyio.to_thread.run_sync(ranking)
        return {"model": teacher.model_path.name, "classes": teacher.classes, "labelled": len(teacher.labels),
                "retrain_every": retrain_every, "ranking": ranked,
                "numbers": teacher.history[-1] if teacher.history else None}

    _photo_routes(app, teacher, lock)
    _label_routes(app, teacher, lock, ranking)
    return app


def _photo_routes(app: FastAPI, teacher: Teacher, lock: threading.Lock) -> None:
    """The new photos, by content hash only: a path from the page is never opened."""
    pool = {sha: path for path, sha in teacher.pool}

    @app.get("/api/photo/{sha256}")
    async def photo(sha256: str, size: int = 640):
        if sha256 not in pool:
            return _error(404, "no such photo")
        data = await anyio.to_thread.run_sync(thumbnail_jpeg, pool[sha256], max(32, min(size, MAX_SIDE)), 85)
        return Response(data, media_type="image/jpeg") if data else _error(415, "cannot be shown")

    @app.get("/api/explain/{sha256}")
    async def explain(sha256: str):
        if sha256 not in pool:
            return _error(404, "no such photo")
        return Response(await anyio.to_thread.run_sync(_heat_map, teacher, lock, pool[sha256]),
                        media_type="image/png")


def _label_routes(app: FastAPI, teacher: Teacher, lock: threading.Lock, ranking) -> None:
    @app.post("/api/label")
    async def label(request: Request):
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("sha256"), str) or not isinstance(body.get("label"), str):
            return _error(422, 'send {"sha256": ..., "label": ...}')
        try:
            with lock:
                entry = teacher.label(body["sha256"], body["label"])
        except FruitnetError as exc:
            return _error(400, str(exc))
        return {"labelled": len(teacher.labels), "copy": entry.copy}

    @app.post("/api/undo")
    async def undo():
        with lock:
            gone = teacher.undo()
        return {"undone": {"path": gone.source, "label": gone.label} if gone else None, "labelled": len(teacher.labels)}

    @app.post("/api/retrain")
    async def retrain():
        numbers = await anyio.to_thread.run_sync(teacher.retrain, lock)
        return {"numbers": numbers, "ranking": await anyio.to_thread.run_sync(ranking)}


def _heat_map(teacher: Teacher, lock: threading.Lock, path: str) -> bytes:
    """The model's view of the photo with the heat map of its best class (the current head's)."""
    from fruitnet.explain import GradCam, model_view, overlay
    from fruitnet.images import load_image
    from fruitnet.transforms import eval_transform

    pre = teacher.meta["preprocessing"]
    image = load_image(path)
    x = eval_transform(pre)(image)[None]
    with lock:
        cam = GradCam(teacher.model, pre)
        with torch.no_grad():
            best = int(teacher.model(x).argmax(1))
        heat = cam.heat(x, [best])[0]
    buffer = io.BytesIO()
    overlay(model_view(image, pre), heat).save(buffer, format="PNG")
    return buffer.getvalue()
