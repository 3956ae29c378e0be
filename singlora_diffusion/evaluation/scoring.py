"""Phase 3: embeddings (models, cached on disk) and scores (pure math on the cached embeddings).

embed_subject() runs the models on what is not cached yet: the subject's real photos once,
each method's images, the CLIP-T texts. collect() reads the caches back (no model runs) and
turns them into per-image scores with metrics.py. With several processes each subject is
embedded by one process (subject i goes to process i mod N); the main process collects.

The cache: one .safetensors file per (subject, set): the real photos (`reference`), each
method's generated images, the CLIP-T texts. It holds one row per key (an image's
`name:sha1`, or a text) for every field ("dino", "clip" or "text"), and in its metadata the
keys and the identity of the models and preprocessing that made it. Rows made under another
identity are never reused. Only one process writes a given file (scoring is sharded by subject).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import metrics
from .config import EvalConfig
from .generation import GeneratedImage, file_digest
from .plan import Plan, Subject
from .protocol import clip_t_text

REFERENCE, TEXTS = "reference", "texts"


@dataclass
class ImageScore:
    image: GeneratedImage
    clip_t_text: str     # what CLIP-T compared the image with (the prompt, maybe without the identifier)
    dino: float
    clip_i: float
    clip_t: float


@dataclass
class SubjectScores:
    subject: Subject
    real_vs_real: dict[str, float | None]                        # {"dino": .., "clip_i": ..}
    images: dict[str, list[ImageScore]] = field(default_factory=dict)  # method -> per-image scores


# -- embeddings on disk -----------------------------------------------------------------------

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

    from ..files import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in fields.items()}, str(tmp),
                  metadata={"identity": identity, "keys": json.dumps(keys)})


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
        # keep the rows of other keys too: another caller may ask for them
        everything = list(rows)
        _write(Path(path), identity, everything,
               {name: torch.stack([rows[k][name] for k in everything]) for name in rows[everything[0]]})
    if not keys:
        return {}
    return {name: torch.stack([rows[key][name] for key in keys]) for name in rows[keys[0]]}


# -- filling the caches (models run) ----------------------------------------------------------

def embeddings_folder(out: Path, subject: str) -> Path:
    return Path(out) / "embeddings" / subject


def _image_keys(paths) -> list[str]:
    return [f"{Path(p).name}:{file_digest(p)}" for p in paths]


def _texts(images: list[GeneratedImage], cfg: EvalConfig) -> list[str]:
    return [clip_t_text(im.prompt.text, cfg.identifier, cfg.clip_t_identifier == "remove") for im in images]


def _embed_files(scorer, cache: Path, paths: list[Path], cfg: EvalConfig, progress=None) -> int:
    """Embed the files missing from `cache`; returns how many the models ran on."""
    ran = 0

    def compute(missing: list[int]) -> dict[str, torch.Tensor]:
        nonlocal ran
        ran = len(missing)
        return scorer.embed_images([paths[i] for i in missing], cfg.score_batch_size, progress)

    cached_embeddings(cache, scorer.identity(), _image_keys(paths), compute)
    if progress is not None:
        progress.update(len(paths) - ran)  # cache hits count as done
    return ran


def embed_subject(scorer, subject: Subject, images: dict[str, list[GeneratedImage]], cfg: EvalConfig,
                  progress=None) -> int:
    """Fill this subject's caches; returns the number of images the models ran on."""
    folder, identity = embeddings_folder(cfg.out, subject.name), scorer.identity()
    ran = _embed_files(scorer, folder / f"{REFERENCE}.safetensors", list(subject.photos), cfg, progress)
    texts: list[str] = []
    for method, method_images in images.items():
        ran += _embed_files(scorer, folder / f"{method}.safetensors", [im.path for im in method_images], cfg,
                            progress)
        texts += _texts(method_images, cfg)
    unique = sorted(set(texts))
    cached_embeddings(folder / f"{TEXTS}.safetensors", identity, unique,
                      lambda missing: {"text": scorer.embed_texts([unique[i] for i in missing])})
    return ran


# -- scores from the caches (no model runs) ---------------------------------------------------

def _method_scores(folder: Path, identity: str, method: str, images: list[GeneratedImage],
                   real: dict[str, torch.Tensor], cfg: EvalConfig, text_field: str = "clip") -> list[ImageScore]:
    gen = cached_embeddings(folder / f"{method}.safetensors", identity, _image_keys([im.path for im in images]))
    texts = _texts(images, cfg)
    unique = sorted(set(texts))
    text_emb = cached_embeddings(folder / f"{TEXTS}.safetensors", identity, unique)["text"]
    rows = text_emb[[unique.index(t) for t in texts]]
    dino = metrics.image_similarity(gen["dino"], real["dino"])
    clip_i = metrics.image_similarity(gen["clip"], real["clip"])
    clip_t = metrics.text_similarity(gen[text_field], rows)
    return [ImageScore(im, text, float(d), float(ci), float(ct))
            for im, text, d, ci, ct in zip(images, texts, dino, clip_i, clip_t)]


def collect(plan: Plan, cfg: EvalConfig, images: dict[tuple[str, str], list[GeneratedImage]],
            identity: str, text_field: str = "clip") -> list[SubjectScores]:
    """Per-image scores of every subject from the caches (raises KeyError if one is incomplete).

    text_field: the image embedding CLIP-T compares with the texts' ("clip"; the toy scorer's
    "background")."""
    results = []
    for subject in plan.subjects:
        folder = embeddings_folder(cfg.out, subject.name)
        real = cached_embeddings(folder / f"{REFERENCE}.safetensors", identity, _image_keys(subject.photos))
        scores = SubjectScores(subject, {"dino": metrics.real_vs_real(real["dino"]),
                                         "clip_i": metrics.real_vs_real(real["clip"])})
        for method in subject.methods(cfg.baseline):
            scores.images[method] = _method_scores(folder, identity, method, images[(subject.name, method)], real,
                                                   cfg, text_field)
        results.append(scores)
    return results
