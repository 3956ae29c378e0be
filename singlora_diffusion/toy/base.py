"""The shipped toy base, toy:shapes: its files, their fingerprint, and loading them.

    singlora_diffusion/assets/toy_shapes/
        pipeline.safetensors   text_encoder.* / vae.* / unet.* in fp16 (one file, ~12 MB)
        extractor.safetensors  the toy scorer's FeatureNet
        record.json            how pretraining made them (command, seed, threads, data,
                               time, losses), the VAE's scaling factor and the files' sha256

The architecture comes from models.build_pipeline; the weights from the file, strictly
(a missing or unexpected key is an error). resolve_base("toy:shapes") saves the pipeline
once as a diffusers folder in the cache, so everything that loads a base loads it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import BadInput
from ..files import sha256

PIPELINE_FILE, EXTRACTOR_FILE, RECORD_FILE = "pipeline.safetensors", "extractor.safetensors", "record.json"
PARTS = ("text_encoder", "vae", "unet")


def world_folder() -> Path:
    from ..bundled import _package_dir

    return _package_dir("assets", "toy_shapes")


def read_record(folder: Path | None = None) -> dict:
    folder = Path(folder or world_folder())
    path = folder / RECORD_FILE
    if not path.is_file():
        raise BadInput(f"{path}: the toy base is missing; make it with `python -m singlora_diffusion.toy pretrain "
                       f"--out {folder}`")
    return json.loads(path.read_text())


def fingerprint(folder: Path | None = None) -> str:
    """sha256 of the two weight files together (what record.json's "fingerprint" must equal)."""
    folder = Path(folder or world_folder())
    return hashlib.sha256("".join(sha256(folder / f) for f in (PIPELINE_FILE, EXTRACTOR_FILE)).encode()).hexdigest()


def architecture(pipe) -> dict:
    """The components' configs, as record.json keeps them (diffusers' private "_" keys left out)."""
    configs = {part: dict(getattr(pipe, part).config) for part in ("vae", "unet")}
    configs["text_encoder"] = pipe.text_encoder.config.to_dict()
    return json.loads(json.dumps({part: {k: v for k, v in c.items() if not k.startswith("_")}
                                  for part, c in configs.items()}, default=str))


def write_world(out: Path, pipe, extractor, record: dict) -> None:
    """The shipped files of a pretrained pipeline and extractor (fp16 pipeline weights)."""
    from safetensors.torch import save_file

    from ..files import atomic_path, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {f"{part}.{k}": v.detach().to(torch.float16).contiguous()
               for part in PARTS for k, v in getattr(pipe, part).state_dict().items()}
    # Each file whole or not at all; a set left mixed by a crash between them fails the
    # fingerprint check in load_pipeline rather than loading.
    for name, tensors in ((PIPELINE_FILE, weights),
                          (EXTRACTOR_FILE, {k: v.contiguous() for k, v in extractor.state_dict().items()})):
        with atomic_path(out / name) as tmp:
            save_file(tensors, str(tmp))
    record = dict(record, scaling_factor=pipe.vae.config.scaling_factor, configs=architecture(pipe))
    record["fingerprint"] = fingerprint(out)
    write_text(out / RECORD_FILE, json.dumps(record, indent=1, default=str))


def load_pipeline(folder: Path | None = None):
    """The pretrained toy StableDiffusionPipeline in float32 (checked against its fingerprint)."""
    from safetensors.torch import load_file

    from .models import build_pipeline

    folder = Path(folder or world_folder())
    record = read_record(folder)
    if fingerprint(folder) != record["fingerprint"]:
        raise BadInput(f"{folder}: the toy base's weights do not match the fingerprint in {RECORD_FILE}; "
                       f"reinstall the package or rerun its pretraining")
    pipe = build_pipeline(0)
    weights = load_file(str(folder / PIPELINE_FILE))
    for part in PARTS:
        prefix = f"{part}."
        getattr(pipe, part).load_state_dict({k[len(prefix):]: v.float() for k, v in weights.items()
                                             if k.startswith(prefix)}, strict=True)
    pipe.vae.register_to_config(scaling_factor=record["scaling_factor"])
    return pipe


def load_extractor(folder: Path | None = None):
    from safetensors.torch import load_file

    from .models import FeatureNet

    net = FeatureNet()
    net.load_state_dict(load_file(str(Path(folder or world_folder()) / EXTRACTOR_FILE)), strict=True)
    return net.eval().requires_grad_(False)


def save_toy_pipeline(out_dir: Path) -> Path:
    """The toy base as a diffusers folder (what resolve_base("toy:shapes") builds once)."""
    load_pipeline().save_pretrained(out_dir)
    return Path(out_dir)
