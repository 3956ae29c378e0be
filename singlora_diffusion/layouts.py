"""Adapter files written by other tools: which layout a file is, and importing SingLoRA ones.

Surgery on keys only; the update itself stays in layer.py. Layouts read here:

    native         {component}.{path}.singlora_A + our metadata (format.py)
    singlora-peft  peft-singlora 0.2.0 / SimpleTuner --peft_lora_mode singlora: one (n, r) tensor
                   per layer under a LoRA *down* name with no *up* partner
                       unet.{path}.lora_A[.weight]                 (PEFT names; SD3/Flux: transformer.{path})
                       text_encoder.{path}.lora_linear_layer.down  (diffusers' text-encoder names)
                       …lora.down[.weight], …lora_A.<adapter>, base_model.model.{path}…
                   optional step buffer {path}.training_step_<adapter> (float32, 0-d);
                   r and α only in `lora_adapter_metadata` (a LoraConfig per component)
    diffusers-lora, kohya-lora, peft-lora   standard LoRA files (down and up): named, not imported

peft-singlora's update is ours, (α/r)·u·A[:d_out]·A[:d_in]ᵀ (0.2.0's `_get_update_weight`), so
an import copies A unchanged; the file holds n = max(d_out, d_in) rows, and the base decides the
split. Its layers ramp over 1000 steps whatever the config says (SingLoRALayer's default: the
`ramp_up_steps` of SingLoRAConfig, and SimpleTuner's `--singlora_ramp_up_steps`, never reach
the layer), and that length is written nowhere in the file.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInput
from .format import FORMAT, AdapterFile, check_matrix, file_module_path, find_adapter_file, read_adapter, read_metadata
from .layer import ramp

LAYOUT_NAMES = {
    "native": "native SingLoRA (singlora-diffusion)",
    "singlora-peft": "SingLoRA, SimpleTuner / peft-singlora (PEFT keys, one matrix per layer)",
    "diffusers-lora": "diffusers LoRA (standard LoRA: down and up matrices)",
    "kohya-lora": "kohya LoRA (standard LoRA: lora_down / lora_up / alpha)",
    "peft-lora": "PEFT LoRA (standard LoRA: base_model.model.… lora_A / lora_B)",
}
STANDARD_LORA = ("diffusers-lora", "kohya-lora", "peft-lora")

# The ramp length peft-singlora 0.2.0's layers run with (SingLoRALayer's default), SimpleTuner's too.
PEFT_SINGLORA_RAMP = 1000

_COMPONENT = r"(?:(?P<component>unet|transformer|text_encoder_2|text_encoder)\.)?"
_PEFT_PREFIX = r"(?:base_model\.model\.)?"
# A down/A factor: `.lora_A`, `.lora_A.weight`, `.lora_A.<adapter>[.weight]`, `.lora.down[.weight]`,
# `.lora_linear_layer.down[.weight]`, `.lora_down[.weight]`.
_DOWN = re.compile(rf"^{_COMPONENT}{_PEFT_PREFIX}(?P<path>.+?)\.(?:lora_A|lora\.down|lora_linear_layer\.down|lora_down)"
                   r"(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")
_UP = re.compile(r"\.(?:lora_B|lora\.up|lora_linear_layer\.up|lora_up)(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")
_STEP = re.compile(rf"^{_COMPONENT}{_PEFT_PREFIX}(?P<path>.+?)\."
                   r"(?:training_step(?:_[^.]+)?|lora_training_steps\.[^.]+)$")
_KOHYA = re.compile(r"^lora_(?:unet|transformer|te\d?)_")  # lora_transformer_: OneTrainer's SD3/Flux names
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding", "add_embedding")
_DIT_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "context_embedder", "time_text_embed.", "x_embedder",
              "norm_out.", "proj_out")


@dataclass
class Layout:
    """What a file is, read from it alone (no base model)."""
    path: str
    kind: str                                       # a key of LAYOUT_NAMES
    metadata: dict[str, str]
    # SingLoRA layouts: "{component}.{module path in file form}" -> A (n, r); LoRA layouts: -> down (r, d_in)
    modules: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)   # step buffers, by module
    lora_alpha: dict[str, float] = field(default_factory=dict)  # kohya's per-module .alpha
    native: AdapterFile | None = None

    @property
    def name(self) -> str:
        return LAYOUT_NAMES[self.kind]

    @property
    def ranks(self) -> list[int]:
        if self.native is not None:
            return [self.native.rank]
        axis = 1 if self.kind == "singlora-peft" else 0  # A is (n, r); a LoRA down is (r, d_in)
        return sorted({int(t.shape[axis]) for t in self.modules.values()})


def _component(explicit: str | None, path: str) -> str:
    """The pipeline component a key belongs to: its prefix, else guessed from the path (PEFT files of one model)."""
    if explicit:
        return explicit
    if path.startswith(_UNET_ROOTS):
        return "unet"
    return "transformer" if path.startswith(_DIT_ROOTS) else "text_encoder"


def detect_layout(path: str | os.PathLike) -> Layout:
    """Read a .safetensors adapter file and say which layout it is; refuse what no layout fits."""
    from safetensors.torch import load_file

    path = find_adapter_file(path)
    metadata = read_metadata(path)
    if metadata.get("format") == FORMAT:
        adapter = read_adapter(path)  # every check of format.check_adapter
        return Layout(str(path), "native", metadata, dict(adapter.tensors), native=adapter)
    tensors = load_file(str(path))
    if any(_UP.search(k) for k in tensors):
        if any(_KOHYA.match(k) for k in tensors):
            kind = "kohya-lora"
        elif any(k.startswith("base_model.model.") for k in tensors):
            kind = "peft-lora"
        else:
            kind = "diffusers-lora"
        layout = Layout(str(path), kind, metadata)
        for key, t in tensors.items():
            if key.endswith(".alpha"):
                layout.lora_alpha[key[: -len(".alpha")]] = float(t.flatten()[0]) if t.numel() == 1 else float("nan")
            elif (m := _DOWN.match(key)) and not _KOHYA.match(key):
                layout.modules[f"{_component(m['component'], m['path'])}.{m['path']}"] = t
            elif _KOHYA.match(key) and re.search(r"\.lora_down(?:\.weight)?$", key):
                layout.modules[key.partition(".")[0]] = t
        return layout
    layout = Layout(str(path), "singlora-peft", metadata)
    unknown = []
    for key, t in tensors.items():
        if _KOHYA.match(key):
            unknown.append(key)
        elif m := _DOWN.match(key):
            component = _component(m["component"], m["path"])
            name = f"{component}.{file_module_path(component, m['path'])}"
            if name in layout.modules:
                raise BadInput(f"{path}: two tensors for module {name} (e.g. {key}); a file with several "
                               f"adapters is not read: save one adapter per file")
            layout.modules[name] = t
        elif m := _STEP.match(key):
            component = _component(m["component"], m["path"])
            layout.steps[f"{component}.{file_module_path(component, m['path'])}"] = float(t.flatten()[0]) \
                if t.numel() == 1 else float("nan")
        else:
            unknown.append(key)
    if unknown or not layout.modules:
        example = unknown[0] if unknown else "(none)"
        raise BadInput(f"{path}: not an adapter layout singlora reads ({len(tensors)} tensors, "
                       f"{len(unknown)} of them unrecognised, e.g. {example!r}); see docs/format.md, "
                       f"'SingLoRA files from other tools'")
    return layout


# ---------------------------------------------------------------------------------------------
# settings: rank, alpha, ramp, step


def _peft_configs(layout: Layout) -> dict[str, dict]:
    """component -> the LoraConfig fields diffusers / SimpleTuner write in `lora_adapter_metadata`."""
    raw = layout.metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
        if not isinstance(flat, dict):
            raise ValueError
    except ValueError:
        raise BadInput(f"{layout.path}: metadata lora_adapter_metadata is not a JSON object") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, dot, field_name = key.partition(".")
        if dot and component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
            out.setdefault(component, {})[field_name] = value
        else:  # one config without component prefixes (a PEFT adapter_config)
            out.setdefault("", {})[key] = value
    return out


def _one(layout: Layout, configs: dict[str, dict], field_name: str, flag: str):
    """The value every component's config gives for `field_name` (None when none gives one)."""
    values = {c or "file": v[field_name] for c, v in configs.items() if v.get(field_name) is not None}
    if len(set(map(str, values.values()))) > 1:
        raise BadInput(f"{layout.path}: its components differ in {field_name} ({values}); format v1 stores one "
                       f"per file: pass {flag} to choose one")
    return next(iter(values.values()), None)


@dataclass
class Settings:
    rank: int
    alpha: float
    ramp_up_steps: int
    step: int
    notes: list[str] = field(default_factory=list)

    @property
    def u(self) -> float:
        return float(ramp(self.step, self.ramp_up_steps))


def resolve_settings(layout: Layout, rank: int | None = None, alpha: float | None = None,
                     step: int | None = None, ramp_up_steps: int | None = None) -> Settings:
    """r, α, T and the step of a SingLoRA file: flags first, then the file; refused when unknown or contradictory."""
    path = layout.path
    shape_ranks = layout.ranks
    if len(shape_ranks) > 1:
        raise BadInput(f"{path}: its layers have different ranks {shape_ranks}; format v1 stores one rank per file")
    (tensor_rank,) = shape_ranks
    for name, value in (("--rank", rank), ("--step", step), ("--ramp_up_steps", ramp_up_steps)):
        if value is not None and value < (1 if name == "--rank" else 0):
            raise BadInput(f"{name} {value}: expected a whole number >= {1 if name == '--rank' else 0}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise BadInput(f"--alpha {alpha}: expected a finite number > 0")
    notes: list[str] = []
    if layout.native is not None:
        a = layout.native
        file_rank, file_alpha, file_T, file_step = a.rank, a.alpha, a.ramp_up_steps, a.step
    else:
        configs = _peft_configs(layout)
        for c, cfg in configs.items():
            for pattern in ("rank_pattern", "alpha_pattern"):
                if cfg.get(pattern):
                    raise BadInput(f"{path}: {c or 'its'} config sets {pattern} {cfg[pattern]}; format v1 stores "
                                   f"one rank and α per file")
        file_rank, file_alpha = _one(layout, configs, "r", "--rank"), _one(layout, configs, "lora_alpha", "--alpha")
        if file_alpha is not None and _one(layout, configs, "use_rslora", "--alpha"):
            # rsLoRA scales by α/√r; the same update with our α/r needs α·√r
            file_alpha = float(file_alpha) * math.sqrt(float(file_rank or tensor_rank))
            notes.append(f"use_rslora: α/√r written as α = {file_alpha:g} over r")
        file_T, file_step = None, None
    rank_from = "--rank" if rank is not None else "its metadata"
    rank = rank if rank is not None else file_rank
    alpha = alpha if alpha is not None else file_alpha
    if rank is None or alpha is None:
        missing = " and ".join(n for n, v in (("the rank", rank), ("alpha", alpha)) if v is None)
        raise BadInput(f"{path}: {missing} not in its metadata (no lora_adapter_metadata r / lora_alpha): pass "
                       f"--rank {tensor_rank} --alpha A (the tensors are rank {tensor_rank}; α is the training's)")
    try:
        rank, alpha = int(rank), float(alpha)
    except (TypeError, ValueError):
        raise BadInput(f"{path}: metadata rank {rank!r} / alpha {alpha!r} are not numbers") from None
    if rank != tensor_rank:
        raise BadInput(f"{path}: rank {rank} (from {rank_from}) contradicts its tensors, which are rank "
                       f"{tensor_rank} (shape (n, {tensor_rank}))")
    if not (math.isfinite(alpha) and alpha > 0):
        raise BadInput(f"{path}: alpha {alpha}: expected a finite number > 0")

    # the ramp: the step buffer when there is one, else the flags, else u = 1
    T = ramp_up_steps if ramp_up_steps is not None else file_T if file_T is not None else PEFT_SINGLORA_RAMP
    if step is None and file_step is not None:
        step = file_step
    elif step is None and layout.steps:
        values = sorted(set(layout.steps.values()))
        bad = [v for v in values if not (math.isfinite(v) and v >= 0 and v == int(v))]
        if bad:
            raise BadInput(f"{path}: step buffer value {bad[0]} is not a whole number >= 0; pass --step N")
        if len(values) > 1:
            raise BadInput(f"{path}: its step buffers disagree ({int(values[0])} … {int(values[-1])}); format v1 "
                           f"stores one step per file: pass --step N")
        step = int(values[0])
        notes.append(f"step {step} from the file's step buffers; ramp over T = {T} steps"
                     + (" (peft-singlora's, which its config does not change)" if ramp_up_steps is None else ""))
    elif step is None:
        step = T
        notes.append(f"no step buffer: taken as a finished training, past its ramp (u = 1: step = T = {T}); "
                     f"pass --step N [--ramp_up_steps T] to set u = N/T")
    return Settings(rank, alpha, int(T), int(step), notes)


def check_finite(layout: Layout) -> None:
    """Refuse a tensor that is not a float matrix, or holds NaN/Inf (a diverged training)."""
    for name, t in layout.modules.items():
        check_matrix(layout.path, f"for {name}", t)


# ---------------------------------------------------------------------------------------------
# import


@dataclass
class Imported:
    out: Path
    layout: Layout
    settings: Settings
    loaded: int
    skipped: list[str]


def _target_kinds(names) -> list[str]:
    """Module kinds from module paths: `to_q`, `to_out.0` (a trailing index keeps its parent)."""
    kinds = set()
    for name in names:
        parts = name.split(".")
        kinds.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return sorted(kinds)


def check_importable(layout: Layout, **flags) -> Settings:
    """Everything import_file refuses that needs no base model."""
    if layout.kind in STANDARD_LORA:
        raise BadInput(f"{layout.path} is a standard LoRA file ({layout.name}), not SingLoRA: there is nothing "
                       f"to import; `singlora generate --adapter {layout.path}` loads it directly")
    check_finite(layout)
    return resolve_settings(layout, **flags)


def import_file(path: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
                rank: int | None = None, alpha: float | None = None, step: int | None = None,
                ramp_up_steps: int | None = None, allow_partial: bool = False) -> Imported:
    """Write a SingLoRA file of another tool's layout (or our own) as a native file for `base`.

    The file is read and checked before the base loads; every key must name a Linear layer of
    the base with a shape that fits (n = max(d_out, d_in) rows), or the file is refused (with
    allow_partial, the keys that fit are kept and the rest listed in `.skipped`). The base's
    shapes decide each layer's (d_out, d_in); format.save_adapter writes the result.
    """
    from .format import load_adapter, save_adapter
    from .pipelines import check_base_exists, load_pipeline, pipeline_components

    layout = detect_layout(path)
    settings = check_importable(layout, rank=rank, alpha=alpha, step=step, ramp_up_steps=ramp_up_steps)
    check_base_exists(base)
    components = pipeline_components(load_pipeline(base))
    trained_on = layout.native.metadata.get("base_model") if layout.native else next(
        (v for c, cfg in _peft_configs(layout).items() for k, v in cfg.items() if k == "base_model_name_or_path" and v),
        "an unknown base")
    adapter = AdapterFile(layout.path, {k: t.to(torch.float32) for k, t in layout.modules.items()},
                          {"rank": str(settings.rank), "alpha": repr(settings.alpha),
                           "ramp_up_steps": str(settings.ramp_up_steps), "step": str(settings.step),
                           "base_model": str(trained_on), "module_shapes": "{}"})
    adapter = load_adapter(components, adapter, allow_partial)  # fits each key to the base, injects, sets the step
    kept = {k for k in adapter.tensors if f"{k}.singlora_A" not in adapter.skipped}
    denoiser = ("unet.", "transformer.")
    unet = [k.partition(".")[2] for k in kept if k.startswith(denoiser)]
    text = [k.partition(".")[2] for k in kept if not k.startswith(denoiser)]
    written = save_adapter(out, components, str(base), _target_kinds(unet) or None,
                           _target_kinds(text) or None)
    return Imported(written, layout, settings, len(kept), adapter.skipped)


# ---------------------------------------------------------------------------------------------
# inspect


# Width of the cross-attention context each base family feeds attn2.to_k / to_v (d_in).
_CONTEXT_WIDTH = {768: "sd15 (SD1.x)", 1024: "sd2 (SD2.x)", 2048: "sdxl"}


# Width of the attention of the diffusion transformers (to_q … add_v_proj are square there).
_DIT_WIDTH = {1536: "sd3 (attention 1536 wide: SD3 / SD3.5 medium)", 2432: "sd3 (attention 2432 wide: SD3.5 large)",
              3072: "flux (attention 3072 wide: Flux.1)"}


def _dit_fits(layout: Layout, keys: list[str]) -> str:
    """sd3 or flux for a file with transformer keys: Flux-only blocks, a second CLIP encoder (SD3's;
    Flux's text_encoder_2 is T5), or the attention width."""
    if any("single_transformer_blocks" in k or "guidance_embedder" in k for k in keys):
        return "flux (it adapts single_transformer_blocks / the guidance embedder)"
    if any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys):
        return "sd3 (a transformer and a second CLIP text encoder)"
    for key, t in layout.modules.items():
        if re.search(r"attn2?[._](?:to_[qkv]|add_[qkv]_proj)$", key):
            width = int(t.shape[0] if layout.kind == "singlora-peft" else t.shape[1])
            if width in _DIT_WIDTH:
                return _DIT_WIDTH[width]
    return "sd3 or flux (transformer keys; no Flux-only block, no full-size attention width)"


def _fits(layout: Layout) -> str:
    """Which base family the file fits, as far as its key names and shapes tell."""
    keys = list(layout.modules)
    if layout.native is not None and layout.native.metadata.get("base_arch") in ("sd3", "flux"):
        meta = layout.native.metadata
        return f"{meta['base_arch']} (its metadata: trained on {meta.get('base_model')})"
    if any(k.startswith(("transformer.", "lora_transformer_")) for k in keys):
        return _dit_fits(layout, keys)
    if any(k.startswith("text_encoder_2.") or k.startswith("lora_te2_") for k in keys):
        return "sdxl (it adapts a second text encoder)"
    widths = set()
    for key, t in layout.modules.items():
        if re.search(r"attn2[._]to_[kv]$", key):
            if layout.kind in ("native", "singlora-peft"):
                if layout.native is not None:
                    widths.add(layout.native.shapes[key][1])
                else:
                    widths.add(int(t.shape[0]) if int(t.shape[0]) in (768, 1024, 2048) else None)
            else:
                widths.add(int(t.shape[1]))
    found = sorted({_CONTEXT_WIDTH[w] for w in widths if w in _CONTEXT_WIDTH})
    if len(found) == 1:
        return f"{found[0]} (cross-attention inputs {[w for w, n in _CONTEXT_WIDTH.items() if n == found[0]][0]} wide)"
    if layout.native is not None:
        meta = layout.native.metadata
        return f"{meta.get('base_arch', '?')} (its metadata: trained on {meta.get('base_model')})"
    if any(k.startswith("lora_te1_") for k in keys) or any(".transformer_blocks.9." in k for k in keys):
        return "sdxl (from its key names)"
    return "not told by the file (no full-size cross-attention shape, no SDXL-only key)"


_KOHYA_COMPONENT = {"unet": "unet", "transformer": "transformer", "te": "text_encoder", "te1": "text_encoder",
                    "te2": "text_encoder_2"}
_KOHYA_KIND = re.compile(r"(to_[qkv]|to_out_0|to_add_out|add_[qkv]_proj|[qkv]_proj|out_proj|proj_in|proj_out|proj_mlp|"
                         r"ff_net_\d_proj|ff_net_\d|[a-z0-9]+)$")


def _config_alphas(layout: Layout) -> str:
    alphas = {float(c["lora_alpha"]) for c in _peft_configs(layout).values() if c.get("lora_alpha") is not None}
    return ", ".join(f"{a:g}" for a in sorted(alphas))


def describe(layout: Layout) -> dict[str, str]:
    """label -> value lines for `singlora inspect`: layout, rank(s), α, targets, step / u, base."""
    lines = {"layout": layout.name, "rank": ", ".join(map(str, layout.ranks))}
    if layout.kind == "native":
        a = layout.native
        lines["alpha"] = f"{a.alpha:g}"
        lines["step / u"] = f"{a.step} of ramp {a.ramp_up_steps}: u = {float(ramp(a.step, a.ramp_up_steps)):g}"
    elif layout.kind == "singlora-peft":
        lines["alpha"] = _config_alphas(layout) or "not in the file (pass --alpha to import)"
        if layout.steps:
            steps = sorted({int(v) for v in layout.steps.values() if math.isfinite(v)})
            lines["step / u"] = (f"{', '.join(map(str, steps))} (step buffers); u = "
                                 + ", ".join(f"{float(ramp(s, PEFT_SINGLORA_RAMP)):g}" for s in steps)
                                 + f" over peft-singlora's T = {PEFT_SINGLORA_RAMP}")
        else:
            lines["step / u"] = "no step buffer (import takes u = 1)"
    else:
        if layout.lora_alpha:
            lines["alpha"] = ", ".join(f"{v:g}" for v in sorted(set(layout.lora_alpha.values())))
        else:
            lines["alpha"] = _config_alphas(layout) or "not stored (loaders take α = r)"
        lines["step / u"] = "none (a standard LoRA has no ramp)"
    by_component: dict[str, list[str]] = {}
    for key in layout.modules:
        if layout.kind == "kohya-lora":  # underscores throughout: the kind is the known tail of the name
            component = _KOHYA_COMPONENT[re.match(r"lora_(unet|transformer|te\d?)_", key)[1]]
            kind = _KOHYA_KIND.search(key)[1]
        else:
            component, _, name = key.partition(".")
            kind = _target_kinds([name])[0]
        by_component.setdefault(component, []).append(kind)
    lines["targets"] = "; ".join(f"{c}: {len(kinds)} modules ({', '.join(sorted(set(kinds)))})"
                                 for c, kinds in by_component.items())
    lines["fits"] = _fits(layout)
    return lines
