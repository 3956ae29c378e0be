"""The two scoring models: where their weights come from, loading them, the protocol's
preprocessing, and the Scorer that turns images and texts into embeddings.

DINO: timm `vit_small_patch16_224.dino` with num_classes=0 and global_pool='token', whose
forward() returns the CLS token after the final LayerNorm (384 values), the embedding the
protocol names. CLIP: open_clip `ViT-B-32` with OpenAI's weights (QuickGELU, as OpenAI
trained it), image embeddings from encode_image and text embeddings from encode_text.

Weights come, in this order of preference, from a local file (--dino_weights /
--clip_weights), from the Hugging Face cache or hub through timm / open_clip, or, only with
--allow_random_weights, from a seeded random initialisation (smoke tests; every report
is then stamped). resolve_weights() decides without loading anything, so a missing
weight stops the run before any Stable Diffusion model is loaded.

Preprocessing. DINO (DreamBooth Sec. 4.1, as in DINO's own evaluation): shorter side to 256
with bicubic interpolation, centre crop 224, ImageNet mean/std. timm's pretrained config for
`vit_small_patch16_224.dino` says crop_pct 0.9 (resize to 249); the protocol's 256 -> 224
(crop_pct 0.875) is used instead, so it is written out here rather than resolved from timm.
CLIP: the model's own transform from open_clip (resize 224 bicubic, centre crop 224, OpenAI
mean/std), taken from open_clip unchanged. One decode of each image feeds both models.

The Scorer decodes and preprocesses images in worker threads (Pillow releases the GIL), on
one torch intra-op thread each. On an accelerator they prepare the next batch while the models
run on this one; on the CPU, whose cores the forward holds, between forward passes
(bench/eval_throughput.py measures the cost).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from ..errors import BadInput, NotFound, UserError

DINO_MODEL = "vit_small_patch16_224.dino"
CLIP_MODEL, CLIP_TAG = "ViT-B-32", "openai"
RANDOM_STAMP = "RANDOM WEIGHTS — scores meaningless"
_RANDOM_SEED = 0
# Files timm / open_clip look for in the hub repos of these weights (safetensors first).
_HUB_FILES = {"dino": ("model.safetensors", "pytorch_model.bin"),
              "clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")}
_FLAGS = {"dino": "--dino_weights", "clip": "--clip_weights"}
_NAMES = {"dino": f"DINO ViT-S/16 (timm {DINO_MODEL})", "clip": f"CLIP ViT-B/32 (open_clip {CLIP_MODEL}, {CLIP_TAG})"}
DINO_RESIZE, DINO_CROP = 256, 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(UserError, RuntimeError):
    """Real weights of a scoring model cannot be found and random ones were not allowed."""


# -- where the weights come from ------------------------------------------------------------

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
    from ..pipelines import hub_offline

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


# -- loading the models ---------------------------------------------------------------------

def _fallback(weights: Weights, error: Exception, allow_random: bool) -> Weights:
    """A hub download failed (no network): random if allowed, else the clear error."""
    if not allow_random:
        raise _missing_error([weights.model], f"download failed: {type(error).__name__}: {error}") from error
    warnings.warn(f"{_NAMES[weights.model]}: download failed ({error}); using random weights", stacklevel=3)
    return Weights(weights.model, "random")


def _bad_file(model: str, weights: Weights, library: str, architecture: str, error: Exception) -> BadInput:
    return BadInput(f"{_FLAGS[model]} {weights.location}: {library} could not load it as {architecture} "
                    f"weights ({error})")


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
            raise _bad_file("dino", weights, "timm", DINO_MODEL, e) from e
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
            raise _bad_file("clip", weights, "open_clip", CLIP_MODEL, e) from e
        return load_clip(_fallback(weights, e, allow_random))
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(CLIP_MODEL), weights


# -- the protocol's preprocessing -----------------------------------------------------------

def dino_transform():
    from torchvision import transforms as T

    # Resize on the PIL image (antialiased bicubic, rounded to uint8), as torchvision's
    # ImageNet evaluation and DINO's eval_linear.py do.
    return T.Compose([
        T.Resize(DINO_RESIZE, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(DINO_CROP),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def dino_preprocessing_description() -> str:
    return (f"resize shorter side {DINO_RESIZE} (bicubic, antialiased), center crop {DINO_CROP}, "
            f"ImageNet mean {IMAGENET_MEAN} std {IMAGENET_STD}")


def open_image(source: str | Path | Image.Image) -> Image.Image:
    """Upright 8-bit RGB (EXIF rotation applied; CMYK, 16-bit, alpha handled as for training)."""
    from ..images import load_image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    return load_image(source)


def prepare(source, dino_tf, clip_tf) -> tuple[torch.Tensor, torch.Tensor]:
    """One image decoded once -> (DINO input (3, 224, 224), CLIP input (3, 224, 224))."""
    image = open_image(source)
    return dino_tf(image), clip_tf(image)


# -- the Scorer -----------------------------------------------------------------------------

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

    def embed_images(self, sources, batch_size: int = 32, progress=None,
                     overlap: bool | None = None) -> dict[str, torch.Tensor]:
        """{"dino": (N, 384), "clip": (N, 512)} float32 on the CPU, in the order of `sources`
        (paths or PIL images). `progress` (a tqdm bar) advances per image. A file that cannot be
        decoded raises Pillow's own error, at its batch. `overlap`: prepare the next batch during
        the forward (default: on an accelerator, not on the CPU; see below)."""
        sources = list(sources)
        batches = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
        # On an accelerator the workers prepare batch k + 1 while the models run on k. On the
        # CPU the forward holds every core torch has: a worker beside it takes cores from it
        # (measured: 0.80x of the raw forward overlapped, 0.88-0.98x between forwards), so
        # there they prepare between forwards, one per torch thread. Each worker runs torch
        # on one thread: ToTensor and Normalize are tiny ops, and a team of threads per worker
        # oversubscribes the cores (bench/eval_throughput.py measures both).
        overlap = self.device.type != "cpu" if overlap is None else overlap
        threads = torch.get_num_threads()  # also fixes this thread's team before a worker changes the default
        workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if overlap else threads
        dino, clip = [], []
        try:
            with ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                def submit(batch):
                    return [pool.submit(prepare, s, self.dino_preprocess, self.clip_preprocess) for s in batch]

                pending = submit(batches[0]) if batches else []
                for k in range(len(batches)):
                    pairs = [f.result() for f in pending]  # re-raises a worker's error, in order
                    pending = submit(batches[k + 1]) if overlap and k + 1 < len(batches) else []
                    d, c = self._forward(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
                    if not overlap and k + 1 < len(batches):
                        pending = submit(batches[k + 1])
                    dino.append(d)
                    clip.append(c)
                    if progress is not None:
                        progress.update(len(batches[k]))
        finally:
            # set_num_threads(1) in a worker sets that thread's OpenMP team only, and torch's
            # default for threads that start later: give that default back.
            torch.set_num_threads(threads)
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
