"""HTTP API and web page for a model file: create_app(model_path, options, ...) and serve().

GET /          the web page (src/fruitnet/web/index.html: no external assets, works offline)
POST /predict  multipart form field `files` (repeatable) -> [{filename, label, probabilities}, ...]; with a
               model file that has in-distribution statistics also best_guess and in_distribution, and
               label "unknown" for a photo that looks like none of the classes
POST /explain  multipart form field `file` (one photo) -> PNG: the model's view with its Grad-CAM heat map
               for the best class (501 with the reason for an ONNX model: no gradients there)
GET /health    {"status": "ok", "images": classified so far, "forward_passes": ..., "collected": photos kept
               by --collect (None without it)}
GET /model     classes, backbone, preprocessing, validation accuracy, limits, calibration and verdict, explain,
               runtime and "tta" (whether each photo is averaged with its mirror image: serve --tta, or an
               ONNX file exported with --tta)

Bad files are judged one by one.  A request with at least one usable photo answers 200 with a
list in upload order where each unusable file has an entry {filename, error}.  A request with no
usable photo answers {error, results} with the status of its files' problem (all the same: that
one, else 400): 413 larger than --max-upload-mb, 415 not an image (content is not JPEG, PNG, GIF,
BMP, TIFF or WebP), 400 an image that cannot be decoded (truncated, corrupt, decompression bomb);
422 when no file was sent at all.  Every error body is JSON {"error": "..."}.

Refused before a request reaches the model (guard.py): unknown Host names when bound to loopback
(400), POSTs from pages on other origins (403), more than --limit-concurrency requests in progress
(503), requests that stall for --timeout-request seconds (408, connection closed).

One thread owns the model (so concurrent requests are safe); photos that arrive while it is busy
go through together in the next forward pass (up to MAX_BATCH images). A heat map holds the same
lock as a forward pass (Grad-CAM hooks a layer of the model while it runs).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import queue
import tempfile
import threading
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from fruitnet.collect import Collector
from fruitnet.config import InferenceOptions
from fruitnet.errors import ImageError
from fruitnet.guard import (LIMIT_CONCURRENCY, LOOPBACK_NAMES, TIMEOUT_KEEP_ALIVE, TIMEOUT_REQUEST, Guard,
                            guarded_protocol, host_name, page_csp)
from fruitnet.images import MAX_DECODE_BYTES, decode_cost, format_of, sniff_format
from fruitnet.predictors import load_predictor
from fruitnet.preprocess import draft_size

MAX_FILES = 32  # per request
MAX_BATCH = 32  # images per forward pass
DECODE_BUDGET = MAX_DECODE_BYTES  # bytes all decodes in progress may take together: the largest photo's
MB = 1024 * 1024

log = logging.getLogger("uvicorn.error")


class Batcher:
    """Runs every forward pass on one thread; jobs waiting together share one pass.

    A job is a list of preprocessed image tensors (decoding and preprocessing run in the request
    threads, in parallel); its answer is their (n, classes) calibrated probabilities and their
    in_distribution (None for a model file without in-distribution statistics)."""

    def __init__(self, predictor, max_batch: int = MAX_BATCH):
        self.predictor, self.max_batch = predictor, max_batch
        self.lock = threading.Lock()  # the model runs one thing at a time: a forward pass or a heat map
        self.jobs: queue.Queue = queue.Queue()
        self.passes = self.images = 0  # forward passes run, images classified
        self.thread = threading.Thread(target=self._run, name="fruitnet-model", daemon=True)
        self.thread.start()

    async def probabilities(self, tensors: list):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((tensors, loop, future))
        return await future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            batch, stop = [job], False
            while sum(len(j[0]) for j in batch) < self.max_batch:
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                x = torch.stack([t for tensors, _, _ in batch for t in tensors])
                with self.lock:
                    probs, in_dist = self.predictor.outputs(x)
                self.passes, self.images = self.passes + 1, self.images + len(probs)
                start, outcomes = 0, []
                for tensors, _, _ in batch:
                    end = start + len(tensors)
                    outcomes.append(((probs[start:end], None if in_dist is None else in_dist[start:end]), None))
                    start = end
            except Exception as exc:  # reported to each waiting request, the thread lives on
                outcomes = [(None, exc)] * len(batch)
            for (_, loop, future), (result, error) in zip(batch, outcomes):
                loop.call_soon_threadsafe(_settle, future, result, error)
            if stop:
                return


class DecodeBudget:
    """Uploads being decoded, bounded by the memory they take together (images.decode_cost, from
    each file's header) and by the cores, not by the cores alone: a 16-core host must not decode
    sixteen 359 kB TIFFs of 7999x7999 floats at once.  An upload waits until its cost fits in what
    the others leave; alone, it always runs (load_image refuses one above MAX_DECODE_BYTES)."""

    def __init__(self, total: int = DECODE_BUDGET, threads: int = 2):
        self.total, self.used = total, 0
        self.changed = asyncio.Condition()
        self.threads = anyio.CapacityLimiter(threads)

    async def run(self, cost: int, fn, *args):
        """fn(*args) in a worker thread once `cost` bytes are free."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.used == 0 or self.used + cost <= self.total)
            self.used += cost
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.threads)
        finally:
            with anyio.CancelScope(shield=True):  # a client that went away still gives its share back
                async with self.changed:
                    self.used -= cost
                    self.changed.notify_all()


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes (413) before they are spooled."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await _error(413, f"request larger than {self.limit // MB} MB")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(f"request larger than {self.limit // MB} MB")
            return message

        return await self.app(scope, counted, send)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class Unusable(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode(predictor, data: bytes):
    """Bytes of one upload -> RGB image, by the same loader as the command line.

    Raises Unusable, never anything else: whatever goes wrong with one file is that file's error."""
    with tempfile.NamedTemporaryFile(prefix="fruitnet-upload-") as f:
        f.write(data)
        f.flush()
        try:
            return predictor.load(f.name)
        except ImageError as exc:
            # The content announces no accepted format: 415; an accepted format that fails to decode: 400.
            raise Unusable(415 if sniff_format(f.name) is None else 400, exc.reason) from None
        except MemoryError:
            raise Unusable(500, "not enough memory to process it") from None
        except Exception as exc:
            log.exception("decoding an upload failed")
            raise Unusable(500, f"cannot be processed ({exc.__class__.__name__})") from None


def preprocess(predictor, data: bytes) -> torch.Tensor:
    """Bytes of one upload -> model input, by the same loader and transform as the command line.

    Raises Unusable, never anything else: whatever goes wrong with one file is that file's error."""
    image = decode(predictor, data)
    try:
        return predictor.transform(image)
    except MemoryError:
        raise Unusable(500, "not enough memory to process it") from None
    except Exception as exc:
        log.exception("preprocessing an upload failed")
        raise Unusable(500, f"cannot be processed ({exc.__class__.__name__})") from None


def explain_png(predictor, data: bytes, lock: threading.Lock) -> bytes:
    """The model's view of one upload with the heat map of its best class, as PNG bytes; Unusable
    if the upload cannot be decoded."""
    from fruitnet.explain import model_view, overlay

    image = decode(predictor, data)
    tensor = predictor.transform(image)[None]
    with lock:
        probs, _ = predictor.outputs(tensor)
        heat = predictor.heat_maps(tensor, [int(probs[0].argmax())])[0]
    buffer = io.BytesIO()
    overlay(model_view(image, predictor.preprocessing), heat).save(buffer, format="PNG")
    return buffer.getvalue()


def harden(app: FastAPI, page: str, max_body: int, limit_concurrency: int | None,
           allowed_hosts: set[str] | None) -> None:
    """What every fruitnet service refuses before a request reaches it, and how it answers errors:
    bodies over max_body bytes (413), the Host, Origin and concurrency rules of guard.Guard, a
    Content-Security-Policy that admits only `page`'s own inline script and style, JSON errors."""
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(Guard, csp=page_csp(page), limit=limit_concurrency, allowed_hosts=allowed_hosts)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error(422, "invalid request")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc):
        return _error(413, str(exc))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, exc):
        stalled = request.scope.get("fruitnet.stalled")
        log.info("%s: %s", "%s:%d" % tuple(request.client) if request.client else "a client",
                 f"request body stalled for {stalled:g}s: closed" if stalled else "disconnected before the upload ended")
        return _error(400, "client disconnected")  # nobody is listening; this only ends the request

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return _error(500, f"internal error ({exc.__class__.__name__})")


class Service:
    """One model file behind the HTTP API: its predictor, the thread that runs it (Batcher), the
    decode budget, the upload limit and, with serve --collect, the collector."""

    def __init__(self, model_path: str | Path, options: InferenceOptions, max_upload_mb: int,
                 collector: Collector | None):
        self.predictor = load_predictor(model_path, options)  # it has run once: the service never starts on a
        # model that would fail every request
        self.batcher = Batcher(self.predictor)
        self.decoding = DecodeBudget(threads=max(2, os.cpu_count() or 2))  # more decodes than cores: only memory
        self.draft = draft_size(self.predictor.preprocessing)
        self.max_upload_mb, self.limit, self.collector = max_upload_mb, max_upload_mb * MB, collector
        self.info = self._model_info(Path(model_path).name)

    def _model_info(self, name: str) -> dict:
        predictor = self.predictor
        training = predictor.meta.get("training") or {}
        return {"file": name, **predictor.runtime(), "classes": predictor.classes,
                "backbone": predictor.meta.get("backbone"), "preprocessing": predictor.meta.get("preprocessing"),
                "validation_accuracy": training.get("val_accuracy", training.get("best_val_accuracy")),
                "training": training or None, "max_upload_mb": self.max_upload_mb, "max_files": MAX_FILES,
                "trust": predictor.trust_info(),
                "explain": {"available": predictor.explain_unavailable is None,
                            "reason": predictor.explain_unavailable}}

    def cost(self, data: bytes) -> int:
        return decode_cost(io.BytesIO(data), self.draft)

    async def read(self, upload) -> bytes:
        """One upload's bytes; Unusable if it is no file or too large."""
        if not isinstance(upload, UploadFile):
            raise Unusable(422, "not a file (a text field)")
        data = await upload.read(self.limit + 1)
        if len(data) > self.limit:
            raise Unusable(413, f"file larger than the {self.max_upload_mb} MB limit")
        return data

    async def predict(self, uploads: list) -> list[dict] | JSONResponse:
        """One result per upload, in order: the answer, or the file's error (see the module docstring)."""
        results, images, kept = [], [], {}
        for i, upload in enumerate(uploads):
            name = upload.filename if isinstance(upload, UploadFile) and upload.filename else f"file {i + 1}"
            results.append({"filename": name})
            try:
                data = await self.read(upload)
                images.append((i, await self.decoding.run(self.cost(data), preprocess, self.predictor, data)))
                kept[i] = data if self.collector else b""
            except Unusable as exc:
                results[i].update(error=exc.reason, status=exc.status)
        if images:
            probs, in_dist = await self.batcher.probabilities([im for _, im in images])
            for k, (i, _) in enumerate(images):
                results[i].update(self.predictor.describe(probs[k], None if in_dist is None else in_dist[k]))
            if self.collector:
                await anyio.to_thread.run_sync(self.collector.keep, [(kept[i], format_of(kept[i][:16]), results[i])
                                                                     for i, _ in images])
        statuses = {r.pop("status") for r in results if "status" in r}
        if not images:
            status = statuses.pop() if len(statuses) == 1 else 400
            message = "no usable image: " + "; ".join(f"{r['filename']}: {r['error']}" for r in results)
            return _error(status, message, results=results)
        return results

    async def explain(self, upload) -> Response:
        """The model's view of one photo with the heat map of its best class, as PNG."""
        try:  # the decoded photo lives until its heat map is drawn: all of it inside the budget
            data = await self.read(upload)
            png = await self.decoding.run(self.cost(data), explain_png, self.predictor, data, self.batcher.lock)
        except Unusable as exc:
            return _error(exc.status, exc.reason)
        return Response(png, media_type="image/png")


def create_app(model_path: str | Path, options: InferenceOptions = InferenceOptions(), max_upload_mb: int = 10,
               limit_concurrency: int | None = None, allowed_hosts: set[str] | None = None,
               collector: Collector | None = None) -> FastAPI:
    """The service for one model file, run as `options` say (with tta, the /explain heat maps stay
    the plain model's).  ModelFileError if the file is unusable or its model does not run: the
    service never starts on a model that would fail every request.

    limit_concurrency: requests in progress beyond it are answered 503; allowed_hosts: Host names
    answered (None: any, for a service reachable under names we cannot know); collector: keeps the
    photos answered "unknown" or with low confidence (serve --collect, collect.py)."""
    service = Service(model_path, options, max_upload_mb, collector)
    page = (resources.files("fruitnet") / "web" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.batcher.close()

    app = FastAPI(title="fruitnet", lifespan=lifespan, docs_url=None, redoc_url=None)
    harden(app, page, MAX_FILES * service.limit + MB, limit_concurrency, allowed_hosts)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "images": service.batcher.images, "forward_passes": service.batcher.passes,
                "collected": collector.count if collector else None}

    @app.get("/model")
    async def model():
        return service.info

    @app.post("/predict")
    async def predict(request: Request):
        async with request.form(max_files=MAX_FILES, max_fields=MAX_FILES) as form:
            uploads = [u for u in form.getlist("files")
                       if not (isinstance(u, UploadFile) and not u.filename and not u.size)]  # empty form slot
            if not uploads:
                return _error(422, "no file: send one or more images in the multipart form field 'files'")
            return await service.predict(uploads)

    @app.post("/explain")
    async def explain(request: Request):
        if service.predictor.explain_unavailable:  # said before any upload is read
            return _error(501, service.predictor.explain_unavailable)
        async with request.form(max_files=1, max_fields=1) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile) or not (upload.filename or upload.size):
                return _error(422, "no file: send one image in the multipart form field 'file'")
            return await service.explain(upload)

    return app


def serve(model_path: str | Path, options: InferenceOptions = InferenceOptions(), host: str = "127.0.0.1",
          port: int = 8000, max_upload_mb: int = 10, timeout_keep_alive: float = TIMEOUT_KEEP_ALIVE,
          timeout_request: float = TIMEOUT_REQUEST, limit_concurrency: int = LIMIT_CONCURRENCY,
          collector: Collector | None = None) -> int:
    """Run the service until Ctrl+C (0); 1 if it could not start (e.g. the port is in use).

    timeout_keep_alive: an idle connection is closed after it; timeout_request: a request whose
    headers take longer, or whose body stops arriving for longer, is answered 408 and closed;
    limit_concurrency: requests in progress beyond it are answered 503.  Bound to loopback, only
    Host names of this machine are answered (DNS rebinding)."""
    loopback = is_loopback(host)
    app = create_app(model_path, options, max_upload_mb, limit_concurrency,
                     allowed_hosts={*LOOPBACK_NAMES, host_name(host)} if loopback else None, collector=collector)
    return run_app(app, host, port, timeout_keep_alive, timeout_request)


def is_loopback(host: str) -> bool:
    return host_name(host) in LOOPBACK_NAMES or host.startswith("127.")


def run_app(app: FastAPI, host: str, port: int, timeout_keep_alive: float = TIMEOUT_KEEP_ALIVE,
            timeout_request: float = TIMEOUT_REQUEST) -> int:
    """Serve `app` with uvicorn and guard.guarded_protocol until Ctrl+C (0); 1 if it could not start."""
    import resource

    import uvicorn

    if not is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the service "
              "(there is no authentication)", flush=True)
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    files = 1 << 20 if files == resource.RLIM_INFINITY else files
    # A quarter of the file descriptors for connections (beyond that the idlest is closed), the rest
    # for uploads' temporary files, the model and closes still pending in the event loop, which
    # accepts up to `backlog` connections before any is seen by the protocol (an eighth).  Half and
    # a quarter ran out of descriptors under a flood of 300 half-open connections at a limit of 256.
    max_connections, backlog = max(16, files // 4), max(16, min(2048, files // 8))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", http=guarded_protocol(timeout_request, max_connections),
                    timeout_keep_alive=timeout_keep_alive, backlog=backlog)
    except SystemExit as exc:  # uvicorn logged why it could not start; exit 1 (the job failed), not its 3
        return 0 if exc.code in (0, None) else 1
    return 0
