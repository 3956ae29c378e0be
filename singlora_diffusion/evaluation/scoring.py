"""Phase 3: embeddings (models, cached on disk) and scores (pure math on the cached embeddings).

embed_subject() runs the models on what is not cached yet: the subject's real photos once,
each method's images, the CLIP-T texts. collect() reads the caches back (no model runs) and
turns them into per-image scores with metrics.py. With several processes each subject is
embedded by one process (subject i goes to process i mod N); the main process collects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import metrics
from .cache import cached_embeddings
from .config import EvalConfig
from .images import GeneratedImage, file_digest
from .plan import Plan, Subject
from .protocol import Prompt, clip_t_text

REFERENCE, TEXTS = "reference", "texts"


@dataclass
class ImageScore:
    subject: str
    method: str
    prompt: Prompt
    clip_t_text: str
    seed: int | None
    path: Path
    dino: float
    clip_i: float
    clip_t: float


@dataclass
class SubjectScores:
    subject: Subject
    real_vs_real: dict[str, float | None]                        # {"dino": .., "clip_i": ..}
    images: dict[str, list[ImageScore]] = field(default_factory=dict)  # method -> per-image scores


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


def collect(plan: Plan, cfg: EvalConfig, images: dict[tuple[str, str], list[GeneratedImage]],
            identity: str) -> list[SubjectScores]:
    """Per-image scores of every subject from the caches (raises KeyError if one is incomplete)."""
    results = []
    for subject in plan.subjects:
        folder = embeddings_folder(cfg.out, subject.name)
        real = cached_embeddings(folder / f"{REFERENCE}.safetensors", identity, _image_keys(subject.photos))
        scores = SubjectScores(subject, {"dino": metrics.real_vs_real(real["dino"]),
                                         "clip_i": metrics.real_vs_real(real["clip"])})
        for method in subject.methods(cfg.baseline):
            method_images = images[(subject.name, method)]
            gen = cached_embeddings(folder / f"{method}.safetensors", identity,
                                    _image_keys([im.path for im in method_images]))
            texts = _texts(method_images, cfg)
            unique = sorted(set(texts))
            text_emb = cached_embeddings(folder / f"{TEXTS}.safetensors", identity, unique)["text"]
            rows = text_emb[[unique.index(t) for t in texts]]
            dino = metrics.image_similarity(gen["dino"], real["dino"])
            clip_i = metrics.image_similarity(gen["clip"], real["clip"])
            clip_t = metrics.text_similarity(gen["clip"], rows)
            scores.images[method] = [
                ImageScore(subject.name, method, im.prompt, text, im.seed, im.path, float(d), float(ci), float(ct))
                for im, text, d, ci, ct in zip(method_images, texts, dino, clip_i, clip_t)]
        results.append(scores)
    return results
