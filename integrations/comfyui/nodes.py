"""Load SingLoRA: ComfyUI's Load LoRA node for native SingLoRA files.

A SingLoRA update ΔW = (α/r)·u·A[:d_out]·A[:d_in]ᵀ is exactly a LoRA pair, so the node converts
the file to the kohya layout in memory (singlora_diffusion.export.kohya_state_dict) and hands it
to ComfyUI's own comfy.sd.load_lora_for_models: strength, unloading, stacking and ComfyUI's
key map work as for any LoRA. No file is written to models/loras/.

ComfyUI's modules (folder_paths, comfy.sd) are imported where they are used, so this file
imports outside ComfyUI too (the tests give it stand-ins).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def _singlora_package():
    """singlora_diffusion: the checkout this folder belongs to, else the installed package.

    When custom_nodes/ holds a link to <checkout>/integrations/comfyui, the package of that same
    checkout is loaded (the node and the converter come from one commit). Only that package is
    loaded from the checkout: putting the checkout root on sys.path would expose its tests/,
    webui/ and eval/ to every other custom node.
    """
    if "singlora_diffusion" in sys.modules:
        return sys.modules["singlora_diffusion"]
    package = Path(__file__).resolve().parents[2] / "singlora_diffusion"
    if (package / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(
            "singlora_diffusion", package / "__init__.py", submodule_search_locations=[str(package)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["singlora_diffusion"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["singlora_diffusion"]
            raise
        return module
    try:
        import singlora_diffusion
    except ImportError as e:
        raise ImportError(
            "Load SingLoRA needs the singlora_diffusion package: install it into ComfyUI's Python with "
            "`python -m pip install --no-deps /path/to/singlora-diffusion`, or link this folder from a "
            "checkout instead of copying it (see integrations/comfyui/README.md)") from e
    return singlora_diffusion


_singlora_package()
from singlora_diffusion.errors import BadInput  # noqa: E402 - after the package is found
from singlora_diffusion.export import kohya_state_dict  # noqa: E402
from singlora_diffusion.format import FORMAT, read_adapter, read_metadata  # noqa: E402


def singlora_lora_state_dict(path: str | os.PathLike) -> dict:
    """The exact LoRA pairs of the SingLoRA file at `path`, keyed as ComfyUI's key map expects.

    Refuses anything else in one line: a standard LoRA file goes to ComfyUI's own Load LoRA node,
    and a pickle (.ckpt, .pt) is never opened.
    """
    name = Path(path).name
    if Path(path).suffix != ".safetensors":
        raise BadInput(f"{name}: Load SingLoRA reads SingLoRA .safetensors files only (never pickles); "
                       f"load other LoRA files with ComfyUI's Load LoRA node")
    found = read_metadata(path).get("format")
    if found != FORMAT:
        raise BadInput(f"{name} is not a SingLoRA file (metadata format={found!r}); a standard LoRA file "
                       f"(kohya, diffusers, or a SingLoRA adapter already exported as one) loads with "
                       f"ComfyUI's own Load LoRA node")
    tensors, _ = kohya_state_dict(read_adapter(path))
    return tensors


def _full_path(lora_name: str) -> str:
    import folder_paths

    if hasattr(folder_paths, "get_full_path_or_raise"):
        return folder_paths.get_full_path_or_raise("loras", lora_name)
    path = folder_paths.get_full_path("loras", lora_name)  # ComfyUI before get_full_path_or_raise
    if path is None:
        raise FileNotFoundError(f"Model in folder 'loras' with filename '{lora_name}' not found.")
    return path


class LoadSingLoRA:
    """The inputs and outputs of ComfyUI's LoraLoader, for SingLoRA files."""

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_singlora"
    CATEGORY = "loaders"
    DESCRIPTION = ("Apply a SingLoRA adapter (a native singlora_weights.safetensors file, or one written by "
                   "`singlora import`) as its exactly equivalent LoRA. Strength, stacking and unloading "
                   "behave as for any LoRA.")

    def __init__(self):
        self.loaded = None  # (path, file stat, state dict): a re-queued prompt does not convert again

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the SingLoRA adapter will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the SingLoRA adapter will be applied to."}),
            "lora_name": (folder_paths.get_filename_list("loras"),
                          {"tooltip": "A SingLoRA file in models/loras."}),
            "strength_model": ("FLOAT", {**strength, "tooltip": "How strongly to modify the diffusion model. "
                                                                "This value can be negative."}),
            "strength_clip": ("FLOAT", {**strength, "tooltip": "How strongly to modify the CLIP model. "
                                                               "This value can be negative."}),
        }}

    def load_singlora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        import comfy.sd

        path = _full_path(lora_name)
        stat = os.stat(path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self.loaded is None or self.loaded[:2] != (path, stamp):
            self.loaded = None  # free the previous file's tensors before converting the next
            self.loaded = (path, stamp, singlora_lora_state_dict(path))
        model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, self.loaded[2],
                                                              strength_model, strength_clip)
        return (model_lora, clip_lora)
