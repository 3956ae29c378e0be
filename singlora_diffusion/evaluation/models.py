"""The two scoring models: where their weights come from, and loading them.

DINO: timm `vit_small_patch16_224.dino` with num_classes=0 and global_pool='token', whose
forward() returns the CLS token after the final LayerNorm (384 values), the embedding the
protocol names. CLIP: open_clip `ViT-B-32` with OpenAI's weights (QuickGELU, as OpenAI
trained it), image embeddings from encode_image and text embeddings from encode_text.

Weights come, in this order of preference, from a local file (--dino_weights /
--clip_weights), from the Hugging Face cache or hub through timm / open_clip, or, only with
--allow_random_weights, from a seeded random initialisation (smoke tests; every report
is then stamped). resolve_weights() decides without loading anything, so a missing
weight stops the run before any Stable Diffusion model is loaded.
"""
from __future__ import annotations
from ..errors import BadInput, NotFound, UserError

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DINO_MODEL = "vit_small_patch16_224.dino"
CLIP_MODEL, CLIP_TAG = "ViT-B-32", "openai"
RANDOM_STAMP = "RANDOM WEIGHTS — scores meaningless"
_RANDOM_SEED = 0
# Files timm / open_clip look for in the hub repos of these weights (safetensors first).
_HUB_FILES = {"dino": ("model.safetensors", "pytorch_model.bin"),
              "clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")}
_FLAGS = {"dino": "--dino_weights", "clip": "--clip_weights"}
_NAMES = {"dino": f"DINO ViT-S/16 (timm {DINO_MODEL})", "clip": f"CLIP ViT-B/32 (open_clip {CLIP_MODEL}, {CLIP_TAG})"}


class MissingWeightsError(UserError, RuntimeError):
    """Real weights of a scoring model cannot be found and random ones were not allowed."""


@dataclass(frozen=True)
class Weights:
    model: str      # "dino" or "clip"
    source: str     # "file", "hub" or "random"
    location: str = ""  # the file, or the hub repo id

    @property
    def random(self) -> bool:
        return self.source == "random"

    def describe(self) -> str:
        if self.source == "file":
            return f"local file {self.location}"
        if self.source == "hub":
            return f"Hugging Face hub {self.location}"
        return f"{RANDOM_STAMP} (seeded random initialisation, seed {_RANDOM_SEED})"

    def identity(self) -> str:
        """Changes when the weights may have changed; embedding caches are keyed by it."""
        if self.source == "file":
            stat = Path(self.location).stat()
            return f"file:{Path(self.location).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return f"{self.source}:{self.location or _RANDOM_SEED}"


def hub_repo(model: str) -> str:
    """The hub repo timm / open_clip download these weights from (read from the libraries)."""
    if model == "dino":
        from timm.models import get_pretrained_cfg

        return get_pretrained_cfg(DINO_MODEL).hf_hub_id
    import open_clip

    return open_clip.get_pretrained_cfg(CLIP_MODEL, CLIP_TAG)["hf_hub"].rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _in_hf_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo = hub_repo(model)
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in _HUB_FILES[model])


def how_to_provide(model: str) -> str:
    repo = hub_repo(model)
    return (f"{_NAMES[model]}: run once with network access (timm / open_clip download them to the Hugging "
            f"Face cache), or pass {_FLAGS[model]} FILE (e.g. {_HUB_FILES[model][0]} from "
            f"https://huggingface.co/{repo})")


def _missing_error(models: list[str], why: str) -> MissingWeightsError:
    lines = [f"the weights of {len(models)} scoring model(s) are missing ({why}):"]
    lines += [f"  - {how_to_provide(m)}" for m in models]
    lines.append("  or pass --allow_random_weights for a smoke test (every report is then stamped "
                 f"'{RANDOM_STAMP}').")
    return MissingWeightsError("\n".join(lines))


def resolve_weights(dino_file: str | None, clip_file: str | None, allow_random: bool) -> tuple[Weights, Weights]:
    """Where each model's weights will come from; loads nothing. Raises MissingWeightsError."""
    resolved, missing = {}, []
    for model, file in (("dino", dino_file), ("clip", clip_file)):
        if file is not None:
            if not Path(file).is_file():
                raise NotFound(f"{_FLAGS[model]} {file}: no such file; pass the {_NAMES[model]} weights "
                                        f"file (.safetensors, .bin or .pth)")
            resolved[model] = Weights(model, "file", str(file))
        elif not hub_offline() or _in_hf_cache(model):
            resolved[model] = Weights(model, "hub", hub_repo(model))
        elif allow_random:
            resolved[model] = Weights(model, "random")
        else:
            missing.append(model)
    if missing:
        raise _missing_error(missing, "HF_HUB_OFFLINE=1 and they are not in the Hugging Face cache")
    return resolved["dino"], resolved["clip"]


def _fallback(weights: Weights, error: Exception, allow_random: bool) -> Weights:
    """A hub download failed (no network): random if allowed, else the clear error."""
    if not allow_random:
        raise _missing_error([weights.model], f"download failed: {type(error).__name__}: {error}") from error
    warnings.warn(f"{_NAMES[weights.model]}: download failed ({error}); using random weights", stacklevel=3)
    return Weights(weights.model, "random")


def load_dino(weights: Weights, allow_random: bool = False):
    """(model, the weights actually used): CLS token after the final norm, (N, 384)."""
    import timm

    kwargs = dict(num_classes=0, global_pool="token")
    if weights.source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            model = timm.create_model(DINO_MODEL, pretrained=False, **kwargs)
    elif weights.source == "file":
        try:
            model = timm.create_model(DINO_MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=weights.location),
                                      **kwargs)
        except Exception as e:  # wrong file: missing or unexpected keys, not a checkpoint at all
            raise BadInput(f"{_FLAGS['dino']} {weights.location}: timm could not load it as {DINO_MODEL} "
                             f"weights ({e})") from e
    else:
        try:
            model = timm.create_model(DINO_MODEL, pretrained=True, **kwargs)
        except Exception as e:  # hub errors come as OSError, RuntimeError, HTTP errors...
            return load_dino(_fallback(weights, e, allow_random))
    return model.eval().requires_grad_(False), weights


def load_clip(weights: Weights, allow_random: bool = False):
    """(model, its evaluation transform, its tokenizer, the weights actually used)."""
    import open_clip

    # force_quick_gelu: OpenAI trained ViT-B/32 with QuickGELU; the same architecture for
    # a local copy of those weights and for random ones.
    pretrained = {"random": None, "file": weights.location, "hub": CLIP_TAG}[weights.source]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=pretrained,
                                                                         force_quick_gelu=True)
    except Exception as e:
        if weights.source != "hub":
            raise BadInput(f"{_FLAGS['clip']} {weights.location}: open_clip could not load it as {CLIP_MODEL} "
                             f"weights ({e})") from e
        return load_clip(_fallback(weights, e, allow_random))
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(CLIP_MODEL), weights
