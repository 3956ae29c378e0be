"""DreamBench metrics as pure functions of embeddings (DreamBooth, arXiv 2208.12242, Sec. 4.1).

    generated g_1..g_N        real r_1..r_M            prompt text t(g)
          |                        |                        |
     embed (DINO or CLIP)    embed (same model)        CLIP text tower
          |                        |                        |
    DINO / CLIP-I = mean_{i,j} cos(g_i, r_j)     CLIP-T = mean_i cos(g_i, t(g_i))
    real vs real  = mean_{j != k} cos(r_j, r_k)  (the upper bound the paper reports)

Every score is a raw cosine similarity in [-1, 1]: never scaled by 100, never clipped at 0,
never multiplied by 2.5. All math runs in float64 whatever the embeddings' dtype.
Per-image scores are means over the real images, so the mean of per-image scores over any
set of generated images is exactly the mean over all its (generated, real) pairs.
"""
from __future__ import annotations

import math

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a (count, dim) matrix, got shape {tuple(x.shape)}")
    return x / x.norm(dim=1, keepdim=True)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities between the rows of `a` (n, d) and of `b` (m, d), float64."""
    a, b = _unit(a), _unit(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]} (different models?)")
    return a @ b.T


def image_similarity(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """DINO / CLIP-I per generated image: its mean cosine with every real image, shape (n,)."""
    return cosine_matrix(generated, real).mean(dim=1)


def text_similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP-T per image: cosine of row i of `images` with row i of `texts`, shape (n,)."""
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {texts.shape[0]} texts; pair each image with its prompt")
    return (_unit(images) * _unit(texts)).sum(dim=1)


def real_vs_real(real: torch.Tensor) -> float | None:
    """Mean cosine over ordered pairs of distinct real images; None with fewer than two."""
    m = real.shape[0]
    if m < 2:
        return None
    sims = cosine_matrix(real, real)
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    return float(sims[off_diagonal].mean())


def mean(values) -> float | None:
    """Plain average of per-image scores (None for none), float64."""
    values = [float(v) for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None
