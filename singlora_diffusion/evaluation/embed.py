"""Scorer: images -> DINO and CLIP image embeddings, texts -> CLIP text embeddings.

Each image is decoded once for both models, by a pool of threads (Pillow releases the GIL).
On a GPU they decode the next batch while the models run on this one; on the CPU they run
between forward passes (bench/eval_throughput.py measures the cost).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch

from .models import CLIP_MODEL, CLIP_TAG, DINO_MODEL, Weights, load_clip, load_dino
from .preprocess import dino_preprocessing_description, dino_transform, prepare


@dataclass
class Scorer:
    dino: torch.nn.Module
    clip: torch.nn.Module
    clip_preprocess: object
    tokenizer: object
    dino_weights: Weights
    clip_weights: Weights
    device: torch.device

    def __post_init__(self):
        self.dino_preprocess = dino_transform()

    @property
    def random_weights(self) -> bool:
        return self.dino_weights.random or self.clip_weights.random

    def identity(self) -> str:
        """Embeddings cached under another identity (weights, preprocessing) are recomputed."""
        return (f"dino={DINO_MODEL}@{self.dino_weights.identity()};{dino_preprocessing_description()}|"
                f"clip={CLIP_MODEL}@{self.clip_weights.identity()};{self.clip_preprocess!r}")

    def describe(self) -> dict:
        return {
            "dino": {"model": f"timm {DINO_MODEL}", "embedding": "CLS token after the final norm (384)",
                     "weights": self.dino_weights.describe(), "preprocessing": dino_preprocessing_description()},
            "clip": {"model": f"open_clip {CLIP_MODEL} ({CLIP_TAG} weights, QuickGELU)",
                     "embedding": "encode_image / encode_text (512)", "weights": self.clip_weights.describe(),
                     "preprocessing": " -> ".join(repr(t) for t in self.clip_preprocess.transforms)},
        }

    @torch.no_grad()
    def _forward(self, dino_in: torch.Tensor, clip_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dino = self.dino(dino_in.to(self.device))
        clip = self.clip.encode_image(clip_in.to(self.device))
        return dino.float().cpu(), clip.float().cpu()

    def embed_images(self, sources, batch_size: int = 32, progress=None) -> dict[str, torch.Tensor]:
        """{"dino": (N, 384), "clip": (N, 512)} float32 on the CPU, in the order of `sources`
        (paths or PIL images). `progress` (a tqdm bar) advances per image."""
        sources = list(sources)
        batches = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
        # On a GPU, threads decode the next batch while the models run on this one. On the
        # CPU the forward already uses every core torch has: decoding beside it only makes
        # the two fight (measured slower), so the same threads decode between forwards.
        overlap = self.device.type != "cpu"
        workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if overlap else torch.get_num_threads()
        dino, clip = [], []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def submit(batch):
                return [pool.submit(prepare, s, self.dino_preprocess, self.clip_preprocess) for s in batch]

            pending = submit(batches[0]) if batches else []
            for k in range(len(batches)):
                pairs = [f.result() for f in pending]
                pending = submit(batches[k + 1]) if overlap and k + 1 < len(batches) else []
                d, c = self._forward(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
                if not overlap and k + 1 < len(batches):
                    pending = submit(batches[k + 1])
                dino.append(d)
                clip.append(c)
                if progress is not None:
                    progress.update(len(batches[k]))
        if not dino:
            return {"dino": torch.empty(0, self.dino.num_features), "clip": torch.empty(0, self.clip.visual.output_dim)}
        return {"dino": torch.cat(dino), "clip": torch.cat(clip)}

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, 512) CLIP text embeddings, float32 on the CPU."""
        out = [self.clip.encode_text(self.tokenizer(texts[i:i + batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.clip.text_projection.shape[1])


@lru_cache(maxsize=2)
def load_scorer(dino_weights: Weights, clip_weights: Weights, device: str = "cpu",
                allow_random: bool = False) -> Scorer:
    """Both models on `device`, float32; loaded once per process for the same weights."""
    dino, dino_weights = load_dino(dino_weights, allow_random)
    clip, preprocess, tokenizer, clip_weights = load_clip(clip_weights, allow_random)
    device = torch.device(device)
    return Scorer(dino.to(device), clip.to(device), preprocess, tokenizer, dino_weights, clip_weights, device)
