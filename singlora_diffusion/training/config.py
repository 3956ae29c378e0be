"""TrainConfig: the one source of the trainer's settings.

Every field is a `--flag` of train_dreambooth.py and a key of the YAML presets in
singlora_diffusion/configs/ (`--config demo` names one; `--config FILE` reads any);
precedence is defaults < YAML (--config) < flags. Flag names follow
diffusers' train_dreambooth_lora.py where the concept exists. The resolved
config (seed and ramp length filled in) is saved as config.yaml beside the
outputs, so a run can be repeated from it.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..bundled import preset_names, preset_path, resolve_data_dir
from ..config import AdapterConfig
from ..dataclass_cli import dataclass_parser
from ..errors import BadInput, NotFound
from ..pipelines import PRECISIONS
from ..targets import TargetSpec

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig(AdapterConfig):
    # -- model and data
    pretrained_model_name_or_path: str | None = _f(None, "base: hub id, local diffusers folder, or an offline "
                                                         "random-weight test model: tiny:sd15 / tiny:sdxl (small), "
                                                         "random:sd15 / random:sdxl (full size)")
    instance_data_dir: str | None = _f(None, "folder of subject photos (3-10 is typical); bundled:dog3 is the "
                                             "DreamBench subject shipped in the package")
    instance_prompt: str | None = _f(None, "prompt naming the subject, e.g. 'a photo of sks dog'")
    class_data_dir: str | None = _f(None, "folder of class images for prior preservation (generated if too few)")
    class_prompt: str | None = _f(None, "prompt of the class, e.g. 'a photo of dog'")
    with_prior_preservation: bool = _f(False, "add the prior-preservation loss on class images")
    prior_loss_weight: float = _f(1.0, "weight of the prior-preservation loss")
    num_class_images: int = _f(100, "class images wanted; missing ones are generated with the base model")
    sample_batch_size: int = _f(4, "batch size when generating class images")
    output_dir: str = _f("outputs/dreambooth", "where adapters, checkpoints, samples and logs go")
    seed: int | None = _f(None, "random seed (None: drawn once and written to config.yaml)")
    resolution: int = _f(512, "training resolution in pixels (multiple of 8)")
    center_crop: bool = _f(False, "center crop instead of random crop")
    random_flip: bool = _f(False, "random horizontal flips")
    # -- optimisation
    train_text_encoder: bool = _f(False, "also adapt the text encoder(s), on --text_encoder_target_modules "
                                         "(attn unless given)")
    # AdapterConfig's field, with the trainer's meaning: the targets imply the training.
    text_encoder_target_modules: TargetSpec | None = _f(None, "text-encoder layers to adapt (preset 'attn' = "
                                                              "q_proj,k_proj,v_proj,out_proj, or a list); setting "
                                                              "them trains the text encoders, as --train_text_encoder")
    train_batch_size: int = _f(1, "images per device per step")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (the ramp counts optimizer steps)")
    max_train_steps: int = _f(500, "optimizer steps to train")
    learning_rate: float = _f(1e-4, "AdamW learning rate")
    lr_scheduler: str = _f("constant", "schedule: " + ", ".join(SCHEDULERS), choices=SCHEDULERS)
    lr_warmup_steps: int = _f(0, "learning-rate warm-up steps")
    lr_num_cycles: int = _f(1, "cycles of cosine_with_restarts")
    lr_power: float = _f(1.0, "power of the polynomial schedule")
    use_8bit_adam: bool = _f(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    mixed_precision: str = _f("no", "no | fp16 | bf16: the frozen base in this dtype; adapters stay fp32",
                              choices=PRECISIONS)
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet (and text encoder)")
    snr_gamma: float | None = _f(None, "min-SNR loss weighting gamma (5.0 is the paper's value) of the instance "
                                       "loss; the prior-preservation loss stays unweighted. Unset = off")
    noise_offset: float = _f(0.0, "offset noise strength (0.05-0.1 helps very dark/bright images)")
    prediction_type: str | None = _f(None, "epsilon | v_prediction; unset = the base scheduler's")
    cache_latents: bool = _f(True, "encode images with the VAE once when augmentations are deterministic")
    cache_text_embeddings: bool = _f(True, "encode prompts once when the text encoder is frozen")
    dataloader_num_workers: int = _f(0, "accepted for diffusers' command lines, and ignored: this trainer has "
                                        "no DataLoader; the few DreamBooth photos are decoded in the main "
                                        "process (once, when latents are cached)")
    # -- checkpoints and logging
    checkpointing_steps: int = _f(500, "save checkpoint-N/ every N optimizer steps")
    checkpoints_total_limit: int | None = _f(None, "keep at most this many checkpoints (oldest deleted)")
    resume_from_checkpoint: str | None = _f(None, "path of a checkpoint-N folder, or 'latest'")
    validation_prompt: str | None = _f(None, "render this prompt every validation_steps")
    num_validation_images: int = _f(4, "images per validation")
    validation_steps: int = _f(100, "optimizer steps between validations")
    validation_inference_steps: int = _f(25, "denoising steps of validation images")
    report_to: str = _f("tensorboard", "tensorboard or none", choices=("tensorboard", "none"))

    def __post_init__(self):
        super().__post_init__()
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                     "validation_steps", "num_validation_images", "sample_batch_size"):
            if int(getattr(self, name)) < 1:
                raise BadInput(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise BadInput(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.mixed_precision not in PRECISIONS:
            raise BadInput(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise BadInput(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise BadInput(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        # One decision, two spellings: diffusers' --train_text_encoder (on our default
        # targets) or the targets themselves. From here on both fields agree, and the
        # trainer reads text_encoder_target_modules only (None: the text encoders stay frozen).
        if self.text_encoder_target_modules is not None:
            self.train_text_encoder = True
        elif self.train_text_encoder:
            self.text_encoder_target_modules = "attn"
        if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
            raise BadInput("--with_prior_preservation needs --class_data_dir and --class_prompt")
        for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt"):
            if not getattr(self, name):
                raise BadInput(f"--{name} is required (on the command line or in the --config YAML)")
        self.instance_data_dir = resolve_data_dir(self.instance_data_dir)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False, allow_unicode=True)


# -- CLI and YAML, derived from the dataclass ------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = dataclass_parser(TrainConfig, "train_dreambooth.py", "DreamBooth fine-tuning with SingLoRA (or PEFT "
                         "LoRA/DoRA) adapters. Flags override the --config YAML.")
    p.add_argument("--config", help="YAML file of settings (keys = flag names), or the name of a shipped preset: "
                                    + ", ".join(preset_names()))
    return p


def load_yaml(path: str | Path) -> dict:
    """A YAML file's settings; a shipped preset's when `path` is one of their names."""
    path = Path(path)
    if not path.is_file() and str(path) in preset_names():
        path = preset_path(str(path))
    if not path.is_file():
        raise NotFound(f"config file {path} does not exist; pass a YAML file or a preset name "
                                f"({', '.join(preset_names())})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadInput(f"{path}: unknown setting(s) {', '.join(unknown)}; run train_dreambooth.py --help for the list")
    return data


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < YAML < flags, validated."""
    args = vars(build_parser().parse_args(argv))
    values = load_yaml(args.pop("config")) if "config" in args else {}
    values.update(args)
    return TrainConfig(**values)
