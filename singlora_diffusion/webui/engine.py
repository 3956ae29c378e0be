"""One loaded pipeline, reused between requests; adapters swap without reloading the base.

One writer at a time: a generation holds the engine's lock from its budget check
to its last image, and loading a base, switching adapter or adding an upload take
the same lock, so they wait for a running generation and never change it midway
(the web UI also queues them all in one line). Only cancel() and progress are
read without it.

The engine owns the model's state (base, adapter, strength), renders, the request
budget's check, cancelling, the PNGs it writes and uploaded adapter files.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import torch

from ..adapters import adapters_off, apply_adapter, check_adapter_file, remove_adapter, set_strength
from ..errors import UserError
from ..files import atomic_path, sha256
from ..generate import render
from ..pipelines import compile_denoiser, inference_dtype, load_pipeline, side_multiple
from . import budget
from .requests import BadRequest, GenerateRequest

MAX_UPLOAD_BYTES = 512 * 2 ** 20  # an SDXL rank-128 LoRA is ~900 MB; adapters this UI makes are far smaller
MAX_REQUEST_SECONDS = 600         # estimated, at the measured speed of this machine (budget.py)
KEEP_IMAGES = 200                 # generated PNGs kept in the images folder; older ones are deleted


class Cancelled(BadRequest):
    """The user pressed Cancel; the render stopped after its current step."""


class Engine:
    def __init__(self, base: str, out_dir: str | Path, device: str | None = None,
                 max_seconds: float = MAX_REQUEST_SECONDS, keep_images: int = KEEP_IMAGES, compile: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lock = threading.RLock()
        self.cancel_requested = threading.Event()
        self.progress: tuple[int, int] = (0, 0)  # steps done / total of the running render
        self.max_seconds, self.keep_images = max_seconds, keep_images
        self.compile = compile  # every base loaded gets its denoiser compiled (pipelines.compile_denoiser)
        self.threads: int | None = None  # CPU threads for renders; None: all (the UI lowers it during training)
        self.all_threads = torch.get_num_threads()
        dtype = inference_dtype(self.device)
        self.speed = budget.measure_speed(self.device, dtype) * budget.EFFICIENCY  # once: the machine's speed
        self.base = self.pipe = self.cost_model = None
        self.adapter: Path | None = None
        self._adapter_id: tuple | None = None  # (path, mtime, size): a file rewritten on disk is loaded again
        self.kind: str | None = None  # "singlora" | "lora" | None
        self.note: str | None = None  # what a partial load left out
        self.load_base(base)

    # -- model state (writers: hold the lock) --------------------------------------------
    def load_base(self, base: str) -> None:
        """A hub id, a local folder or a test name (tiny:sd15); one that does not load raises a UserError."""
        with self.lock:
            if base == self.base and self.pipe is not None:
                return
            pipe = load_pipeline(base, dtype=inference_dtype(self.device), device=self.device)
            pipe.vae.enable_slicing()  # decode one image at a time: the budget counts one decode's memory
            if self.compile:
                compile_denoiser(getattr(pipe, "unet", None) or pipe.transformer)
            self.base, self.pipe, self.cost_model = base, pipe, budget.CostModel(pipe)
            self.adapter = self._adapter_id = self.kind = self.note = None

    def _unload(self) -> None:
        remove_adapter(self.pipe)  # also clears whatever part a failed load left behind
        self.adapter = self._adapter_id = self.kind = self.note = None

    def _load(self, path: Path, allow_partial: bool) -> None:
        loaded = apply_adapter(self.pipe, path, 1.0, allow_partial)
        self.adapter, self._adapter_id, self.kind, self.note = path, _identity(path), loaded.kind, loaded.note

    def set_adapter(self, path: str | Path | None, allow_partial: bool = False) -> None:
        """Swap adapters on the loaded base; a file that does not fit keeps the previous one."""
        path = Path(path) if path else None
        with self.lock:
            if path is not None and _identity(path) == self._adapter_id:
                return
            previous, previous_partial = self.adapter, self.note is not None
            self._unload()
            if path is None:
                return
            try:
                check_upload_size(path)
                self._load(path, allow_partial)  # apply_adapter checks the file before it touches the model
            except Exception as e:  # any failure: undo whatever part was loaded, keep serving
                self._unload()
                if previous is not None and previous.is_file():
                    self._load(previous, previous_partial)
                if not isinstance(e, UserError):
                    raise  # a bug or a machine failure keeps its traceback
                raise BadRequest(f"{path.name} is not an adapter for this base model: {e}") from None

    def add_upload(self, src: Path, uploads: Path, allow_partial: bool = False) -> Path:
        """Store an uploaded file under a name of its own and load it; a failure changes nothing.

        The name carries the content's hash, so an upload never replaces another file
        (same name, other bytes: another file; same bytes: the same file). The bytes
        are checked in full (in the server's own copy of the upload, which is what was
        hashed) before a hidden temporary copy is renamed to that name.
        """
        check_upload_size(src)
        digest = sha256(src)
        dest = uploads / f"{Path(src.name).stem}-{digest[:12]}.safetensors"
        existed = dest.is_file()
        if not existed:
            try:
                check_adapter_file(src)
            except UserError as e:
                raise BadRequest(f"{src.name} is not an adapter for this base model: {e}") from None
            uploads.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        try:
            self.set_adapter(dest, allow_partial)
        except BadRequest:
            if not existed:
                dest.unlink(missing_ok=True)  # only the file this upload created
            raise
        return dest

    # -- rendering -----------------------------------------------------------------------
    def limits(self) -> budget.Limits:
        return budget.Limits(self.device, self.speed, self.max_seconds, budget.free_bytes(self.device))

    def cost(self, req: GenerateRequest, renders: int = 1) -> budget.Cost:
        step = side_multiple(self.pipe)  # SD3 / Flux: 16 with their real VAEs (requests.py checks 8)
        for name in ("width", "height"):
            if getattr(req, name) % step:
                raise BadRequest(f"{name} must be divisible by {step} for this {type(self.pipe).__name__} (its "
                                 f"VAE's factor x the transformer's 2x2 patches), got {getattr(req, name)}.")
        c = self.cost_model.cost(req.width, req.height, req.num_images, req.steps, req.guidance)
        return budget.Cost(renders * c.flops, c.peak_bytes)

    def cancel(self) -> bool:
        """Stop the running render after its current step; False if none is running."""
        if self.progress[1] == 0:
            return False
        self.cancel_requested.set()
        return True

    def _on_step(self, done: int, total: int, report=None) -> None:
        self.progress = (done, total)
        if report is not None:
            report(done, total)
        if self.cancel_requested.is_set():
            raise Cancelled(f"Cancelled after step {done} of {total}.")

    def _render(self, req: GenerateRequest, tag: str, report=None) -> list[Path]:
        torch.set_num_threads(self.threads or self.all_threads)
        self.cancel_requested.clear()
        self.progress = (0, req.steps)
        try:
            images = render(self.pipe, req.prompt, seed=req.seed, steps=req.steps, guidance=req.guidance,
                            negative_prompt=req.negative_prompt or None, width=req.width, height=req.height,
                            num_images=req.num_images, on_step=lambda d, t: self._on_step(d, t, report))
        finally:
            self.progress = (0, 0)
            self.cancel_requested.clear()
        paths = [self._save(image, req, tag, i) for i, image in enumerate(images)]
        self._prune()
        return paths

    def _save(self, image, req: GenerateRequest, tag: str, i: int) -> Path:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()  # the settings travel with the downloaded PNG
        info.add_text("parameters", req.metadata(base=self.base, adapter=self.adapter and self.adapter.name,
                                                 image=tag, index=i))
        path = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{req.seed}-{tag}-{i}-{time.monotonic_ns()}.png"
        with atomic_path(path) as tmp:  # Gradio serves the file: never half of it
            image.save(tmp, format="PNG", pnginfo=info)  # the temporary's name ends .tmp: say the format
        return path

    def _prune(self) -> None:
        """Keep the newest keep_images PNGs: a UI left running for weeks does not fill the disk."""
        images = sorted(self.out_dir.glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
        for old in images[: max(0, len(images) - self.keep_images)]:
            old.unlink(missing_ok=True)

    def generate(self, req: GenerateRequest, report=None) -> list[Path]:
        with self.lock:
            budget.check(self.cost(req), self.limits())  # before any work
            set_strength(self.pipe, req.strength)
            return self._render(req, "adapted" if self.kind else "base", report)

    def compare(self, req: GenerateRequest, report=None) -> tuple[list[Path], list[Path]]:
        """Base and adapted images with the same seed and settings."""
        with self.lock:
            if self.kind is None:
                raise BadRequest("Pick an adapter to compare against the base model.")
            budget.check(self.cost(req, renders=2), self.limits())
            with adapters_off(self.pipe):
                base = self._render(req, "base", report)
            set_strength(self.pipe, req.strength)
            return base, self._render(req, "adapted", report)


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (path.resolve(), st.st_mtime_ns, st.st_size)




def check_upload_size(path: Path) -> None:
    """Only .safetensors files of reasonable size (never unpickled), checked before they are read or copied."""
    if path.suffix != ".safetensors":
        raise BadRequest(f"{path.name}: only .safetensors adapters are accepted (pickled .bin/.pt/.ckpt never are).")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise BadRequest(f"{path.name} is {path.stat().st_size / 2**20:.0f} MB; the limit is "
                         f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB.")
