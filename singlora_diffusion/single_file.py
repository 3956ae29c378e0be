"""The original (LDM / sgm) single-file layout of SD1.x and SDXL: the checkpoint A1111, Forge
and ComfyUI's checkpoint loader open, and the text-encoder layout their diffusers loaders read.

    diffusers pipeline                      one .safetensors checkpoint
    unet.down_blocks.1.resnets.0.conv1  ──► model.diffusion_model.input_blocks.4.0.in_layers.2
    vae.encoder.mid_block.attentions.0  ──► first_stage_model.encoder.mid.attn_1 (1x1 convs)
    text_encoder.text_model.…           ──► cond_stage_model.transformer.text_model.…       (SD1.x)
                                            conditioner.embedders.0.transformer.text_model.… (SDXL)
    text_encoder_2 (q, k, v separate)   ──► conditioner.embedders.1.model.… (OpenCLIP: in_proj fused,
                                            text_projection transposed)

The maps below are the inverse of diffusers' own single-file converters
(diffusers.loaders.single_file_utils: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint); the fixed names come from its
DIFFUSERS_TO_LDM_MAPPING. `original_state_dict` runs those converters on its own result and
refuses to return anything they would not turn back into exactly the pipeline's weights, so a
mapping mistake fails loudly instead of writing a checkpoint that loads wrong.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import BadInput

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
TEXT_MODEL = "text_model."

# diffusers ResnetBlock2D names → LDM ResBlock names (the inverse of update_unet_resnet_ldm_to_diffusers).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# diffusers VAE Attention names → LDM AttnBlock names (the inverse of update_vae_attentions_ldm_to_diffusers).
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP resblock names → diffusers CLIP layer names, from DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict in the hub's layout (`text_model.embeddings…`).

    transformers 5 drops the `text_model.` level from CLIPTextModel (and adds it back on load,
    conversion_mapping's PrefixChange); transformers 4, ComfyUI and A1111 read keys with it.
    Keys that already have it are kept, so this is safe to call twice.
    """
    return {k if k.startswith(TEXT_MODEL) else TEXT_MODEL + k: v for k, v in state_dict.items()}


def _ldm_maps():
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING


def _unet_key(key: str, layers_per_block: int, up_with_attention: set[int]) -> str:
    """One diffusers UNet2DConditionModel key → its name under model.diffusion_model."""
    maps = _ldm_maps()["unet"]
    fixed = {**maps["layers"], **maps["addition_embed_type"]}
    if key in fixed:
        return fixed[key]
    per_block = layers_per_block + 1  # LDM numbers every resnet and the resampler in one sequence
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, block, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "resnets":
            rest = _rename_first(rest, _UNET_RESNET)
        if side == "down":
            if kind == "downsamplers":  # the last entry of a block: input_blocks.N.0.op
                return f"input_blocks.{1 + block * per_block + per_block - 1}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{1 + block * per_block + j}.{0 if kind == 'resnets' else 1}.{rest}"
        if kind == "upsamplers":  # after the block's last resnet and (if any) its attention
            slot = 2 if block in up_with_attention else 1
            return f"output_blocks.{block * per_block + per_block - 1}.{slot}.{rest}"
        return f"output_blocks.{block * per_block + j}.{0 if kind == 'resnets' else 1}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_rename_first(rest, _UNET_RESNET)}"  # resnet, attention, resnet
        return f"middle_block.1.{rest}"
    raise ValueError(f"unet key {key}: no place in the original SD layout")


def _rename_first(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _vae_key(key: str, n_blocks: int) -> tuple[str, bool]:
    """One diffusers AutoencoderKL key → (its LDM name, whether it is a 1x1 conv there)."""
    fixed = _ldm_maps()["vae"]
    if key in fixed:
        return fixed[key], False
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        part, side, i, kind, j, rest = m.groups()
        i = int(i) if side == "down" else n_blocks - 1 - int(i)  # LDM's decoder counts its up blocks backwards
        if kind == "resnets":
            return f"{part}.{side}.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}", False
        return f"{part}.{side}.{i}.{'downsample' if side == 'down' else 'upsample'}.{rest}", False
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, kind, j, rest = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(j) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}", False
        renamed = _rename_first(rest, _VAE_ATTENTION)
        return f"{part}.mid.attn_1.{renamed}", not renamed.startswith("norm.") and rest.endswith("weight")
    raise ValueError(f"vae key {key}: no place in the original SD layout")


def _open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict → OpenCLIP names (no prefix); q, k, v fused."""
    fixed = _ldm_maps()["openclip"]["layers"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in fixed:
            # OpenCLIP applies x @ text_projection; nn.Linear stores the transpose
            out[fixed[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            raise ValueError(f"text_encoder_2 key {key}: no place in the OpenCLIP layout")
        layer, name, kind = m.groups()
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if name == "self_attn.q_proj":  # in_proj = [q; k; v], split back by convert_open_clip_checkpoint
                base = f"text_model.encoder.layers.{layer}.self_attn."
                out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
                    [state_dict[f"{base}{p}_proj.{kind}"] for p in "qkv"])
            continue
        out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[name]}.{kind}"] = value
    return out


def single_file_arch(pipe) -> str:
    """"sd" (SD1.x) or "sdxl" (the base), or BadInput for a pipeline with no such checkpoint layout."""
    from .targets import base_arch, base_model_version

    arch = base_arch(pipe.unet)
    if getattr(pipe, "text_encoder", None) is None or (arch == "sdxl" and getattr(pipe, "text_encoder_2", None) is None):
        raise BadInput("--single_file: this base has no first text encoder (an SDXL refiner?); only SD1.x and the "
                       "SDXL base have this layout: merge into a folder instead (nothing was written)")
    if base_model_version(pipe.unet) == "sd_v2":
        raise BadInput("--single_file: SD2.x's OpenCLIP-H layout is not supported; merge into a folder instead "
                       "(nothing was written)")
    return arch


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a safetensors file in this layout (an earlier merge that may be replaced)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith(UNET_PREFIX) for k in f.keys())
    except Exception:  # not safetensors at all: a header that does not parse, a folder, no permission
        return False


def save_single_file(pipe, out_file: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the pipeline's UNet, VAE and text encoders as one checkpoint, atomically.

    The weights are written in their current dtype (the caller loads the base in the one it wants).
    """
    from safetensors.torch import save_file

    from .errors import WriteError
    from .files import atomic_path

    arch = single_file_arch(pipe)
    components = {c: getattr(pipe, c, None) for c in ("unet", "vae", "text_encoder", "text_encoder_2")}
    tensors = {k: v.detach().contiguous() for k, v in original_state_dict(components, arch).items()}
    out_file = Path(out_file)
    try:
        with atomic_path(out_file) as tmp:  # a failed write leaves an earlier file of that name as it was
            save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    except OSError as e:
        raise WriteError(f"could not write {out_file} ({e.strerror or e}); nothing at {out_file} was changed") from None
    return out_file


def original_state_dict(components: dict[str, torch.nn.Module], arch: str) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original single-file names (arch "sd" or "sdxl").

    Tensors are shared with the models where the layout allows (no copy); the fused and
    transposed text-encoder-2 tensors are new. Checked against diffusers' own converters.
    """
    out: dict[str, torch.Tensor] = {}
    unet = components["unet"]
    layers_per_block = unet.config.layers_per_block
    if not isinstance(layers_per_block, int):
        raise BadInput(f"--single_file: a UNet with layers_per_block {layers_per_block} (one per block) has no "
                       f"original SD layout; merge into a folder instead (nothing was written)")
    up_with_attention = {i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + _unet_key(key, layers_per_block, up_with_attention)] = value
    vae = components["vae"]
    n_blocks = len(vae.config.up_block_types)
    for key, value in vae.state_dict().items():
        name, conv = _vae_key(key, n_blocks)
        out[VAE_PREFIX + name] = value[..., None, None] if conv else value  # LDM's AttnBlock uses 1x1 convs
    for key, value in with_text_model_prefix(components["text_encoder"].state_dict()).items():
        out[CLIP_PREFIX[arch] + key] = value
    if arch == "sdxl":
        for key, value in _open_clip(components["text_encoder_2"].state_dict()).items():
            out[OPEN_CLIP_PREFIX + key] = value
    check_round_trip(out, components, arch)
    return out


def check_round_trip(original: dict[str, torch.Tensor], components: dict[str, torch.nn.Module], arch: str) -> None:
    """Raise (a bug, not a user error) unless diffusers' single-file converters turn `original`
    back into every weight of every component, exactly."""
    from diffusers.loaders import single_file_utils as sfu

    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(original, components["unet"].config),
        "vae": sfu.convert_ldm_vae_checkpoint(original, components["vae"].config),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(
            {k: v for k, v in original.items() if k.startswith(CLIP_PREFIX[arch])}),
    }
    expected = {"unet": components["unet"].state_dict(), "vae": components["vae"].state_dict(),
                "text_encoder": with_text_model_prefix(components["text_encoder"].state_dict())}
    if arch == "sdxl":
        back["text_encoder_2"] = sfu.convert_open_clip_checkpoint(components["text_encoder_2"], original,
                                                                  prefix=OPEN_CLIP_PREFIX)
        expected["text_encoder_2"] = components["text_encoder_2"].state_dict()
    for component, weights in expected.items():
        got = back[component]
        if set(got) != set(weights):
            diff = sorted(set(got) ^ set(weights))
            raise RuntimeError(f"single-file layout of {component}: {len(diff)} keys do not round-trip, e.g. {diff[:3]}")
        for key, value in weights.items():
            # a model on the meta device (a layout check without weights) has shapes but no values
            if got[key].shape != value.shape or not (value.is_meta or torch.equal(got[key], value)):
                raise RuntimeError(f"single-file layout of {component}: {key} does not round-trip")
