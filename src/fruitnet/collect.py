"""`fruitnet serve --collect DIR`: the photos the service could not answer well, kept for teaching.

Off unless asked for.  Each uploaded photo answered "unknown" or with low confidence
(formats.is_low_confidence) is copied into DIR under its content's hash (never the client's file
name) and its answer appended to DIR/collected.csv, so that `fruitnet teach MODEL DIR` starts
from what users actually sent.  At most `max_photos` photos and `max_bytes` bytes are kept (a
later start counts what is there); beyond that nothing more is written, and the log says so once.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import threading
from datetime import datetime
from pathlib import Path

from fruitnet.formats import UNKNOWN, is_low_confidence
from fruitnet.outputs import printable, spreadsheet_row

log = logging.getLogger("uvicorn.error")
COLUMNS = ["time", "file", "filename", "label", "best_guess", "confidence", "in_distribution"]
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


class Collector:
    def __init__(self, folder: str | Path, max_photos: int = 1000, max_bytes: int = 500 << 20):
        self.folder, self.max_photos, self.max_bytes = Path(folder), max_photos, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        kept = [p for p in self.folder.iterdir() if p.is_file() and p.suffix in SUFFIX.values()]
        self.count, self.bytes, self.full = len(kept), sum(p.stat().st_size for p in kept), False

    @staticmethod
    def wants(result: dict) -> bool:
        return "probabilities" in result and (result["label"] == UNKNOWN or is_low_confidence(result))

    def keep(self, uploads: list[tuple[bytes, str, dict]]) -> None:
        """(content, kind from images.sniff_format, the answer with its "filename") of each photo
        answered; those the service could not answer well are kept."""
        for data, kind, result in uploads:
            if self.wants(result):
                with self.lock:
                    self._keep(data, kind, result)

    def _keep(self, data: bytes, kind: str, result: dict) -> None:
        if self.count >= self.max_photos or self.bytes + len(data) > self.max_bytes:
            if not self.full:
                log.warning("--collect %s is full (%d photos, %.0f MB): no more photos are kept", self.folder,
                            self.count, self.bytes / 2**20)
            self.full = True
            return
        path = self.folder / (hashlib.sha256(data).hexdigest()[:32] + SUFFIX.get(kind, ".img"))
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            self.count, self.bytes = self.count + 1, self.bytes + len(data)
        new = not (self.folder / "collected.csv").exists()
        with open(self.folder / "collected.csv", "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(COLUMNS)
            best = result.get("best_guess", result["label"])
            w.writerow(spreadsheet_row([datetime.now().isoformat(timespec="seconds"), path.name,
                                        printable(result["filename"]), result["label"], best,
                                        round(result["probabilities"][best], 4), result.get("in_distribution", "")]))
