"""One loaded pipeline, reused between requests; adapters swap without reloading the base."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ..format import read_metadata
from ..generate import adapters_off, apply_adapter, remove_adapter, render
from ..inject import set_scale
from ..pipelines import inference_dtype, load_pipeline, pipeline_components
from .requests import BadRequest, GenerateRequest

MAX_UPLOAD_BYTES = 512 * 2 ** 20  # an SDXL rank-128 LoRA is ~900 MB; adapters this UI makes are far smaller


class Engine:
    def __init__(self, base: str, out_dir: str | Path, device: str | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lock = threading.Lock()  # the queue serialises jobs; this guards direct callers too
        self.base = self.pipe = None
        self.adapter: Path | None = None
        self.kind: str | None = None  # "singlora" | "lora" | None
        self.load_base(base)

    # -- model state ---------------------------------------------------------------------
    def load_base(self, base: str) -> None:
        from ..training.build import resolve_base

        if base == self.base and self.pipe is not None:
            return
        try:
            pipe = load_pipeline(resolve_base(base), dtype=inference_dtype(self.device), device=self.device)
        except (OSError, ValueError) as e:
            raise BadRequest(f"Could not load base model {base!r}: {e}") from None
        self.base, self.pipe, self.adapter, self.kind = base, pipe, None, None

    def _unload(self) -> None:
        remove_adapter(self.pipe)  # also clears whatever part a failed load left behind
        self.adapter, self.kind = None, None

    def _load(self, path: Path) -> None:
        self.kind = apply_adapter(self.pipe, path, 1.0).kind
        self.adapter = path

    def set_adapter(self, path: str | Path | None) -> None:
        """Swap adapters on the loaded base; a file that does not fit keeps the previous one."""
        path = Path(path) if path else None
        if path == self.adapter:
            return
        previous = self.adapter
        self._unload()
        if path is None:
            return
        try:
            check_adapter_file(path)
            self._load(path)
        except Exception as e:  # any failure: undo whatever part was loaded, report, keep serving
            self._unload()
            if previous is not None:
                self._load(previous)
            raise BadRequest(f"{path.name} is not an adapter for this base model: {e}") from None

    def _strength(self, scale: float) -> None:
        if self.kind == "singlora":
            for model in pipeline_components(self.pipe).values():
                set_scale(model, scale)
        elif self.kind == "lora":
            self.pipe.set_adapters(["default"], adapter_weights=[scale])

    # -- rendering -----------------------------------------------------------------------
    def _render(self, req: GenerateRequest, tag: str) -> list[Path]:
        images = render(self.pipe, req.prompt, seed=req.seed, steps=req.steps, guidance=req.guidance,
                        negative_prompt=req.negative_prompt or None, width=req.width, height=req.height,
                        num_images=req.num_images)
        return [self._save(image, req, tag, i) for i, image in enumerate(images)]

    def _save(self, image, req: GenerateRequest, tag: str, i: int) -> Path:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()  # the settings travel with the downloaded PNG
        info.add_text("parameters", req.metadata(base=self.base, adapter=self.adapter and self.adapter.name,
                                                 image=tag, index=i))
        path = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{req.seed}-{tag}-{i}-{time.monotonic_ns()}.png"
        image.save(path, pnginfo=info)
        return path

    def generate(self, req: GenerateRequest) -> list[Path]:
        with self.lock:
            self._strength(req.strength)
            return self._render(req, "adapted" if self.kind else "base")

    def compare(self, req: GenerateRequest) -> tuple[list[Path], list[Path]]:
        """Base and adapted images with the same seed and settings."""
        with self.lock:
            if self.kind is None:
                raise BadRequest("Pick an adapter to compare against the base model.")
            with adapters_off(self.pipe):
                base = self._render(req, "base")
            self._strength(req.strength)
            return base, self._render(req, "adapted")


def check_adapter_file(path: Path) -> None:
    """Only .safetensors files of reasonable size; their header must parse (never unpickled)."""
    if path.suffix != ".safetensors":
        raise BadRequest(f"{path.name}: only .safetensors adapters are accepted (pickled .bin/.pt/.ckpt never are).")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise BadRequest(f"{path.name} is {path.stat().st_size / 2**20:.0f} MB; the limit is "
                         f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB.")
    read_metadata(path)  # raises a readable error for bytes that are not safetensors
