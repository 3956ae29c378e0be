"""Embeddings on disk, so that nothing already scored is scored again.

One .safetensors file per (subject, set): the real photos (`reference`), each method's
generated images, the CLIP-T texts. It holds one row per key (an image's `name:sha1`, or a
text) for every field ("dino", "clip" or "text"), and in its metadata the keys and the
identity of the models and preprocessing that made it. Rows made under another identity
are never reused. Only one process writes a given file (scoring is sharded by subject).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch


def _read(path: Path, identity: str) -> dict[str, dict[str, torch.Tensor]]:
    """key -> {field: row}; empty when the file is absent, unreadable or from other models."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("identity") != identity:
                return {}
            keys = json.loads(meta["keys"])
            fields = {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # a damaged cache is recomputed, never trusted
        return {}
    return {key: {name: t[i] for name, t in fields.items()} for i, key in enumerate(keys)}


def _write(path: Path, identity: str, keys: list[str], fields: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in fields.items()}, str(tmp),
              metadata={"identity": identity, "keys": json.dumps(keys)})
    os.replace(tmp, path)


def cached_embeddings(path: Path, identity: str, keys: list[str],
                      compute: Callable[[list[int]], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """{field: (len(keys), dim)} in the order of `keys`.

    Rows missing from the cache are made by `compute(indices into keys)` and added to the
    file; with compute=None a missing row raises KeyError. Reading never writes.
    """
    rows = _read(Path(path), identity)
    missing = [i for i, key in enumerate(keys) if key not in rows]
    if missing:
        if compute is None:
            raise KeyError(f"{path}: no embedding for {keys[missing[0]]!r} (and {len(missing) - 1} more); "
                           f"run the scoring phase first")
        new = compute(missing)
        for j, i in enumerate(missing):
            rows[keys[i]] = {name: t[j] for name, t in new.items()}
    if missing:  # keep the rows of other keys too: another caller may ask for them
        everything = list(rows)
        _write(Path(path), identity, everything,
               {name: torch.stack([rows[k][name] for k in everything]) for name in rows[everything[0]]})
    if not keys:
        return {}
    return {name: torch.stack([rows[key][name] for key in keys]) for name in rows[keys[0]]}
