"""The original (LDM / sgm) single-file layout of SD1.x and SDXL: the checkpoint A1111, Forge
and ComfyUI's checkpoint loader open, and the text-encoder layout their diffusers loaders read.
Written here (`save_single_file`, for `merge --single_file`); read as a base (SD1.x, SD2.x, SDXL)
by `read_checkpoint` + `write_config_folder`, which pipelines.load_pipeline hands to diffusers'
from_single_file.

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

Reading a checkpoint as a base needs the component configs, which an A1111 file does not hold:
diffusers would fetch them from the hub. They come from the file's own `singlora_pipeline_configs`
metadata when `save_single_file` wrote it (so a tiny test pipeline's file loads at its own
shapes), else from reference_configs for the architecture detected from the keys (diffusers'
infer_diffusers_model_type, on shapes read from the header alone).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInput, NotFound

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_H_PREFIX = "cond_stage_model.model."  # SD2.x's text encoder, read by diffusers (not written here)
TEXT_MODEL = "text_model."
CONFIGS_KEY = "singlora_pipeline_configs"  # metadata: the pipeline's configs as JSON (configs_of)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

# The weights a base checkpoint of each architecture holds, by key prefix, and what they are.
_PARTS = {UNET_PREFIX: "UNet", VAE_PREFIX: "VAE", CLIP_PREFIX["sd"]: "CLIP text encoder",
          OPEN_CLIP_H_PREFIX: "OpenCLIP-H text encoder", CLIP_PREFIX["sdxl"]: "CLIP-L text encoder",
          OPEN_CLIP_PREFIX: "OpenCLIP-bigG text encoder"}
ARCH_PARTS = {"sd15": (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX["sd"]),
              "sd21": (UNET_PREFIX, VAE_PREFIX, OPEN_CLIP_H_PREFIX),
              "sd2-base": (UNET_PREFIX, VAE_PREFIX, OPEN_CLIP_H_PREFIX),
              "sdxl": (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX["sdxl"], OPEN_CLIP_PREFIX)}
ARCH_NAMES = {"sd15": "SD1.x", "sd21": "SD2.x (v-prediction, 768 px)", "sd2-base": "SD2.x base (epsilon, 512 px)",
              "sdxl": "SDXL base"}
# diffusers' infer_diffusers_model_type names -> ours; SD2.x is sd21 unless its global_step says sd2-base
_DIFFUSERS_TYPES = {"v1": "sd15", "v2": "sd21", "xl_base": "sdxl"}
_UNSUPPORTED = {"xl_refiner": "an SDXL refiner", "xl_inpaint": "an SDXL inpainting model",
                "inpainting": "an SD1.x inpainting model (9 input channels)",
                "inpainting_v2": "an SD2.x inpainting model (9 input channels)",
                "playground-v2-5": "a Playground v2.5 model (EDM)", "upscale": "the SD x4 upscaler"}
# diffusers' legacy rule: SD2.0-base (epsilon, 512 px) is the SD2 checkpoint saved at this step
_SD2_BASE_STEP = 875000

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
    from .families import base_arch, base_model_version

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
    The pipeline's configs go in the metadata (CONFIGS_KEY), so read_checkpoint loads the file at
    its own shapes; A1111 and ComfyUI ignore the key.
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
            save_file(tensors, str(tmp), metadata={"format": "pt", CONFIGS_KEY: json.dumps(configs_of(pipe)),
                                                   **(metadata or {})})
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


# ---------------------------------------------------------------------------------------------
# reading a checkpoint as a base

_LOADABLE = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def configs_of(pipe) -> dict[str, dict]:
    """The pipeline's configs in reference_configs.pipeline_configs' form (what save_single_file records).

    Only what a single file can rebuild is listed in model_index: a safety checker or feature
    extractor of the base has no weights in the file.
    """
    model_index = json.loads(pipe.to_json_string())
    for name, value in model_index.items():
        if isinstance(value, list) and len(value) == 2 and name not in _LOADABLE:
            model_index[name] = [None, None]
    if "requires_safety_checker" in model_index:
        model_index["requires_safety_checker"] = False
    out = {"model_index": model_index}
    for name in ("unet", "vae", "scheduler"):
        out[name] = json.loads(getattr(pipe, name).to_json_string())
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            out[name] = json.loads(getattr(pipe, name).config.to_json_string())
    for name in ("tokenizer", "tokenizer_2"):
        if (tokenizer := getattr(pipe, name, None)) is not None:
            out[name] = {"pad_token": str(tokenizer.pad_token), "model_max_length": int(tokenizer.model_max_length)}
    return out


@dataclass(frozen=True)
class Checkpoint:
    """A base checkpoint file, read from its header: what it is and the configs it loads with."""
    path: Path
    arch: str                 # a key of ARCH_PARTS
    configs: dict[str, dict]  # reference_configs.pipeline_configs' form
    recorded: bool            # configs from the file's metadata (save_single_file), else the reference ones

    @property
    def pipeline_class(self) -> str:
        return self.configs["model_index"]["_class_name"]

    @property
    def config_id(self) -> str:
        """A folder name for these configs: the same configs share one folder."""
        digest = hashlib.sha256(json.dumps(self.configs, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.arch}-{'recorded' if self.recorded else 'reference'}-{digest}"

    def describe(self) -> str:
        return f"{ARCH_NAMES[self.arch]}, {'configs from its metadata' if self.recorded else 'reference configs'}"


def is_single_file(base: str | os.PathLike) -> bool:
    """Whether `base` names a checkpoint file (an existing file, or a name with a checkpoint suffix)
    rather than a folder, a hub id or a test pipeline."""
    path = Path(base)
    return path.is_file() or (not path.is_dir() and path.suffix.lower() in CHECKPOINT_SUFFIXES)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint's header (no weights) and say what it is; refuse, in one line naming
    the file, what is not an SD1.x / SD2.x / SDXL base checkpoint in .safetensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"base model {path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BadInput(f"{path}: a pickled checkpoint ({path.suffix}) is not loaded, since unpickling can run code "
                       f"hidden in it; use the model's .safetensors release, or convert it once where you trust it "
                       f"(diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py writes a folder "
                       f"this accepts)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            step = f.get_tensor("global_step").flatten()[0].item() if "global_step" in shapes else None
    except Exception as e:  # safetensors' own error: not safetensors, a truncated file, a bad header
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"{path} is not a readable .safetensors checkpoint ({reason}); pass an SD1.x / SD2.x / "
                       f"SDXL .safetensors checkpoint, a diffusers folder or a hub id") from None
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        raise BadInput(f"{path} is {_what_else(shapes, metadata)}, not a base checkpoint (no {UNET_PREFIX}* "
                       f"weights); pass an SD1.x / SD2.x / SDXL .safetensors checkpoint, a diffusers folder "
                       f"or a hub id")
    if CONFIGS_KEY in metadata:
        checkpoint = _recorded(path, metadata[CONFIGS_KEY])
    else:
        checkpoint = _detected(path, shapes, step)
    missing = [p for p in ARCH_PARTS[checkpoint.arch] if not any(k.startswith(p) for k in shapes)]
    if missing:
        raise BadInput(f"{path}: an {ARCH_NAMES[checkpoint.arch]} checkpoint without its {_PARTS[missing[0]]} "
                       f"({missing[0]}* weights); pass a full checkpoint (UNet, VAE and text encoders)")
    return checkpoint


def _what_else(shapes: dict[str, tuple], metadata: dict[str, str]) -> str:
    """What a file without UNet weights probably is, for the refusal."""
    from .format import FORMAT

    if metadata.get("format") == FORMAT or any(k.endswith(".singlora_A") for k in shapes):
        return "a SingLoRA adapter file"
    if any(re.search(r"\.(lora_(up|down|A|B)|lora\.(up|down))[.]", k + ".") for k in shapes):
        return "a LoRA file"
    if any(k.startswith(("down_blocks.", "encoder.", "text_model.", "embeddings.")) for k in shapes):
        return "one diffusers component's weights (pass the pipeline folder that holds it)"
    return f"a .safetensors file of {len(shapes)} tensors of no SD checkpoint layout"


def _recorded(path: Path, text: str) -> Checkpoint:
    try:
        configs = json.loads(text)
        cls = configs["model_index"]["_class_name"]
    except (ValueError, KeyError, TypeError):
        raise BadInput(f"{path}: its {CONFIGS_KEY} metadata is not the JSON save_single_file writes; "
                       f"remove the key (the reference configs are then used) or write the file again") from None
    archs = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
    if cls not in archs:
        raise BadInput(f"{path} holds a {cls}; SD1.x / SD2.x / SDXL text-to-image checkpoints are supported")
    return Checkpoint(path, archs[cls], configs, recorded=True)


def _detected(path: Path, shapes: dict[str, tuple], step) -> Checkpoint:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from .reference_configs import pipeline_configs

    class Header(dict):  # what infer_diffusers_model_type reads of a tensor: `key in`, `.shape`
        def __getitem__(self, key):
            return _Shape(dict.__getitem__(self, key))

    try:
        model_type = infer_diffusers_model_type(Header(shapes))
    except (KeyError, IndexError, TypeError, AttributeError):  # a branch for some other model family
        model_type = "unknown"
    if model_type not in _DIFFUSERS_TYPES:
        what = _UNSUPPORTED.get(model_type, f"a {model_type!r} checkpoint (diffusers' name for it)")
        raise BadInput(f"{path} is {what}; SingLoRA bases are SD1.x, SD2.x and SDXL base text-to-image "
                       f"checkpoints")
    arch = _DIFFUSERS_TYPES[model_type]
    if arch == "sd21" and step == _SD2_BASE_STEP:
        arch = "sd2-base"
    return Checkpoint(path, arch, pipeline_configs(arch), recorded=False)


@dataclass(frozen=True)
class _Shape:
    shape: tuple


def write_config_folder(folder: str | os.PathLike, configs: dict[str, dict]) -> Path:
    """A diffusers folder without weights (model_index.json, each component's config, the
    tokenizers): the `config=` of from_single_file, so nothing is fetched from the hub.

    Every SD tokenizer is CLIP's BPE vocabulary (tiny.clip_tokenizer, offline); the configs give
    each its pad token and length.
    """
    from .tiny import clip_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        if name == "model_index":
            (folder / "model_index.json").write_text(json.dumps(config, indent=2))
        elif name.startswith("tokenizer"):
            tokenizer = clip_tokenizer()
            tokenizer.pad_token, tokenizer.model_max_length = config["pad_token"], config["model_max_length"]
            tokenizer.save_pretrained(str(folder / name))
        else:
            (folder / name).mkdir(exist_ok=True)
            file = "scheduler_config.json" if name == "scheduler" else "config.json"
            (folder / name / file).write_text(json.dumps(config, indent=2))
    return folder


def vae_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's VAE tensors alone (first_stage_model.*), read without the rest."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(VAE_PREFIX)}
