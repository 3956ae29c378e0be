"""Adapter weights of a run: write/read them in checkpoints, and the final outputs.

SingLoRA runs write the native file (format.py); LoRA/DoRA/LoRA+ baselines write
PEFT's tensors under "component.parameter" keys, and for the final output
diffusers' own LoRA writer, so `pipe.load_lora_weights(output_dir)` works for
every adapter. SingLoRA runs also write the kohya layout (export_kohya) that
ComfyUI / A1111 / Forge read from models/loras/: those tools do not map the
diffusers layout of an SD/SDXL UNet (for SD3/Flux it is OneTrainer's layout, export.KOHYA_PREFIX).

The baselines get no kohya file: diffusers' convert_state_dict_to_kohya writes
.alpha = rank (a run with lora_alpha != rank would load with the wrong scale),
names SD1.x's text encoder lora_te1, and has no DoRA magnitude form the UIs
agree on. They are the paper's comparison runs, read by diffusers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..baselines import PEFT_ADAPTERS
from ..export import export_diffusers, export_kohya
from ..format import WEIGHTS_NAME, diffusers_lora_name, read_adapter, save_adapter
from ..inject import set_step, singlora_modules
from ..families import DENOISERS
from ..targets import COMPONENT_KIND
from .build import Trainee
from ..errors import BadInput

PEFT_NAME = "adapter_model.safetensors"


def kohya_file_name(output_dir: Path) -> str:
    """`<run folder>_kohya.safetensors`: ComfyUI and A1111 list LoRAs by file name (`<lora:NAME:1>`),
    so each run's file needs its own name there, and the suffix keeps it apart from the other two here."""
    return f"{Path(output_dir).resolve().name or 'singlora'}_kohya.safetensors"


def write_weights(trainee: Trainee, folder: Path, base_model: str, cfg) -> Path:
    if trainee.adapter == "singlora":
        # every component, not only the trained ones: the file's base_arch is read from the denoiser
        return save_adapter(folder / WEIGHTS_NAME, trainee.components, base_model, cfg.target_modules,
                            cfg.text_encoder_target_modules)
    from safetensors.torch import save_file

    tensors = {k: p.detach().float().cpu().contiguous() for k, p in trainee.named_parameters().items()}
    save_file(tensors, str(folder / PEFT_NAME), metadata={"adapter": trainee.adapter, "base_model": base_model})
    return folder / PEFT_NAME


@torch.no_grad()
def read_weights(trainee: Trainee, folder: Path) -> None:
    """Restore adapter tensors (and the SingLoRA ramp step) into the already-injected models."""
    if trainee.adapter == "singlora":
        adapter = read_adapter(folder / WEIGHTS_NAME)
        from ..format import model_module_path

        for component, entries in adapter.by_component().items():
            model = trainee.trained[component]
            modules = singlora_modules(model)
            for path, A in entries.items():
                modules[model_module_path(model, component, path)].singlora_A.copy_(A)
            set_step(model, adapter.step)
        return
    from safetensors.torch import load_file

    saved = load_file(str(folder / PEFT_NAME))
    params = trainee.named_parameters()
    missing = sorted(set(params) - set(saved))
    if missing:
        raise BadInput(f"{folder / PEFT_NAME} lacks {len(missing)} adapter tensors, e.g. {missing[0]}; "
                         f"was it written with other --adapter/--rank/--target_modules?")
    for key, p in params.items():
        p.copy_(saved[key])


def write_final(trainee: Trainee, output_dir: Path, base_model: str, cfg) -> dict[str, Path]:
    """The native and kohya files (SingLoRA) and pytorch_lora_weights.safetensors (every adapter)."""
    if trainee.adapter == "singlora":
        native = write_weights(trainee, output_dir, base_model, cfg)
        kohya = output_dir / kohya_file_name(output_dir)
        training = {"resolution": cfg.resolution, "max_train_steps": cfg.max_train_steps,
                    "output_name": kohya.stem, "instance_prompt": cfg.instance_prompt or cfg.concepts_list}
        return {"adapter": native, "diffusers": export_diffusers(native, output_dir),
                "kohya": export_kohya(native, kohya, training=training)}
    import diffusers
    from peft.utils import get_peft_model_state_dict

    layers, metadata = {}, {}
    for component, model in trainee.trained.items():
        state = get_peft_model_state_dict(model)
        if component not in DENOISERS:
            # DoRA magnitudes as `….lora_magnitude_vector.weight`: transformers 5 loads text-encoder
            # LoRA files itself and maps only that form to its module (PEFT's loader, used for the
            # UNet and by older transformers, maps both); without it the text encoders' magnitudes
            # are silently left at their initial values.
            state = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in state.items()}
        layers[f"{component}_lora_layers"] = state
        # lora_alpha travels with the file: without it diffusers would assume alpha = r.
        metadata[f"{component}_lora_adapter_metadata"] = {
            "r": cfg.rank, "lora_alpha": cfg.alpha, "use_dora": PEFT_ADAPTERS[cfg.adapter],
            "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in state})}
    # the family's pipeline writes its own layout (unet./transformer., text_encoder./text_encoder_2.)
    writer = getattr(diffusers, trainee.family.pipeline)
    writer.save_lora_weights(str(output_dir), **layers, **metadata)
    return {"diffusers": output_dir / diffusers_lora_name()}


__all__ = ["write_weights", "read_weights", "write_final", "kohya_file_name", "COMPONENT_KIND"]
