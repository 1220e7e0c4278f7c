"""Paper reference numbers (``references.yaml`` beside this file, read at run time):
what the papers report on the real streams, shown below our tables of those streams."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml

__all__ = ["REFERENCES_FILE", "load_references", "references_for"]

REFERENCES_FILE = Path(__file__).with_name("references.yaml")


@lru_cache(maxsize=None)
def load_references(path: Path = REFERENCES_FILE) -> dict[str, dict[str, Any]]:
    """``{stream: {"title": str, "rows": [(method, backbone, {metric: value}), ...]}}``."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: dict[str, dict[str, Any]] = {}
    for stream, block in data.items():
        rows = []
        for row in block["rows"]:
            row = dict(row)
            method, backbone = str(row.pop("method")), str(row.pop("backbone"))
            rows.append((method, backbone, {k: float(v) for k, v in row.items()}))
        out[str(stream)] = {"title": str(block["title"]), "rows": rows}
    return out


def references_for(stream: str) -> Optional[dict[str, Any]]:
    """The paper anchors for a real stream name (``xtail``, ``x-tail``, ``mtil``,
    ``mtil-i``, ``trace``, ...), or ``None`` (embedded, synthetic and other streams)."""
    refs = load_references()
    norm = re.sub(r"[^a-z0-9]", "", stream.lower())
    if any(word in norm for word in ("mini", "tiny", "synthetic", "toy")):
        return None
    if norm.startswith("xtail"):
        return refs["xtail"]
    if norm.startswith("mtil") and norm[4:] in ("", "1", "i", "order1", "orderi"):
        return refs["mtil"]
    if norm.startswith("trace"):
        return refs["trace"]
    return None
