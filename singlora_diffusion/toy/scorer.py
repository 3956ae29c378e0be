"""The toy scorer (eval/evaluate.py --scorer toy): toy-world images scored with the toy
world's own feature extractor, through the evaluation's DreamBench code path.

Each image gets three embeddings, which the evaluation's pairwise-cosine metrics
(evaluation/metrics.py) turn into the three toy scores:

    field        image embedding                      score (mean cosine)
    "dino"       FeatureNet's pooled features (64)    subject similarity: toy DINO vs the real photos
    "clip"       one-hot of the predicted             subject classified: the fraction of real photos
                 (shape, colour) pair (5 x 7)         given the same shape and colour
    "background" one-hot of the predicted background  prompt fidelity: 1 when it is the background
                 (6); texts: one-hot of the           colour the prompt names, else 0
                 background the prompt names

These are toy-world scores, not DreamBench's: reports say so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..errors import BadInput
from . import world

TEXT_FIELD = "background"
STAMP = "TOY-WORLD SCORES (toy:shapes' feature extractor), not DreamBench's DINO / CLIP"


def toy_templates() -> tuple[str, ...]:
    """The toy prompt list: the subject on each known background ({0} identifier, {1} class)."""
    return tuple(f"a {{0}} {{1}} on a {bg} background" for bg in world.COLOURS)


def check_prompts(prompts) -> None:
    """Every prompt must name a known background colour, or prompt fidelity has nothing to compare."""
    missing = [p for p in prompts if world.named_background(p) is None]
    if missing:
        raise BadInput(f"--scorer toy: prompt {missing[0]!r} names no background colour; toy prompts end in "
                       f"'on a <colour> background' with a colour among {', '.join(world.COLOURS)}")


def to_input(image, side: int = world.SIZE) -> torch.Tensor:
    """A PIL image -> the extractor's input (3, 32, 32) in [-1, 1] (resized with a box filter if needed)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BOX)
    return torch.from_numpy(world.to_array([image])[0]).float() / 127.5 - 1.0


@dataclass
class ToyScorer:
    extractor: torch.nn.Module
    fingerprint: str
    device: torch.device = torch.device("cpu")
    random_weights: bool = False
    text_field: str = TEXT_FIELD

    def identity(self) -> str:
        return f"toy-extractor@{self.fingerprint}"

    def describe(self) -> dict:
        return {"kind": "toy", "stamp": STAMP,
                "toy": {"model": "toy:shapes' FeatureNet (singlora_diffusion/toy/models.py)",
                        "weights": f"shipped with the package, fingerprint {self.fingerprint[:16]}",
                        "embeddings": "pooled features (64); one-hot (shape, colour); one-hot background"}}

    @torch.no_grad()
    def embed_images(self, sources, batch_size: int = 32, progress=None) -> dict[str, torch.Tensor]:
        from ..images import load_image

        open_image = lambda s: s if hasattr(s, "convert") else load_image(s)  # a PIL image or a path
        fields = {"dino": [], "clip": [], TEXT_FIELD: []}
        sources = list(sources)
        n_colours = len(world.ALL_COLOURS)
        for i in range(0, len(sources), batch_size):
            batch = torch.stack([to_input(open_image(s)) for s in sources[i:i + batch_size]]).to(self.device)
            shape, colour, background = self.extractor(batch)
            fields["dino"].append(self.extractor.features(batch).float().cpu())
            pair = shape.argmax(-1) * n_colours + colour.argmax(-1)
            fields["clip"].append(F.one_hot(pair, len(world.ALL_SHAPES) * n_colours).double().cpu())
            fields[TEXT_FIELD].append(F.one_hot(background.argmax(-1), len(world.COLOURS)).double().cpu())
            if progress is not None:
                progress.update(len(batch))
        if not sources:
            return {"dino": torch.empty(0, 64), "clip": torch.empty(0, len(world.ALL_SHAPES) * n_colours),
                    TEXT_FIELD: torch.empty(0, len(world.COLOURS))}
        return {k: torch.cat(v) for k, v in fields.items()}

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """One-hot of the background colour each text names."""
        check_prompts(texts)
        names = list(world.COLOURS)
        index = torch.tensor([names.index(world.named_background(t)) for t in texts], dtype=torch.long)
        return F.one_hot(index, len(names)).double() if texts else torch.empty(0, len(names))


def load_toy_scorer(device: str = "cpu") -> ToyScorer:
    from .base import fingerprint, load_extractor

    return ToyScorer(load_extractor().to(device), fingerprint(), torch.device(device))
