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
from ..pipelines import PRECISIONS, QUANTIZE_CHOICES
from ..targets import TargetSpec

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
# Prodigy estimates its own step size; its learning rate multiplies that estimate (1.0: as estimated).
PRODIGY_LR = 1.0
# diffusers.training_utils.compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig(AdapterConfig):
    # -- model and data
    pretrained_model_name_or_path: str | None = _f(None, "base: hub id, local diffusers folder, single-file "
                                                         "checkpoint, toy:shapes (the pretrained 32 px toy base "
                                                         "shipped in the package), or an offline random-weight "
                                                         "test model: tiny:sd15 / tiny:sdxl (small), "
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
    # kohya's bucketing flags: each image trains at the bucket (width x height, about
    # resolution^2 pixels) whose aspect ratio is nearest its own; a batch holds one bucket.
    enable_bucket: bool = _f(False, "aspect-ratio bucketing: images keep their aspect ratio (no square crop); "
                                    "batches are drawn within a bucket")
    min_bucket_reso: int = _f(256, "smallest bucket side in pixels (--enable_bucket)")
    max_bucket_reso: int = _f(1024, "largest bucket side in pixels (--enable_bucket)")
    bucket_reso_steps: int = _f(64, "bucket sides are multiples of this (--enable_bucket; a multiple of 8)")
    caption_extension: str | None = _f(None, "read each image's caption from the file beside it with this "
                                             "extension, e.g. .txt (photo.jpg -> photo.txt); an image without "
                                             "one trains on the instance prompt")
    caption_dropout_rate: float = _f(0.0, "probability of training a sample on the empty prompt instead of its "
                                          "caption/instance prompt")
    concepts_list: str | None = _f(None, "YAML or JSON list of concepts (several subjects in one run), each with "
                                         "instance_data_dir, instance_prompt and optionally class_prompt, "
                                         "class_data_dir, num_class_images, repeats, validation_prompt; replaces "
                                         "--instance_data_dir/--instance_prompt/--class_*")
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
    optimizer: str = _f("adamw", "adamw | adamw8bit (bitsandbytes, GPU) | prodigy (pip install prodigyopt; "
                                 "its lr is a multiplier of the learning rate it finds: keep 1.0)",
                        choices=OPTIMIZERS)
    learning_rate: float | None = _f(None, "learning rate (default 1e-4; 1.0 with --optimizer prodigy)")
    text_encoder_lr: float | None = _f(None, "learning rate of the text encoders' adapters (default: "
                                             "--learning_rate)")
    loraplus_lr_ratio: float = _f(16.0, "LoRA+ (--adapter loraplus): B's learning rate over A's")
    prodigy_d_coef: float = _f(1.0, "Prodigy's d_coef: scales the learning rate it estimates")
    prodigy_safeguard_warmup: bool = _f(False, "Prodigy's safeguard_warmup (recommended with LR warm-up)")
    prodigy_use_bias_correction: bool = _f(False, "Prodigy's use_bias_correction (Adam's bias correction)")
    use_ema: bool = _f(False, "keep an exponential moving average of the adapter weights (diffusers' EMAModel); "
                              "validation and the saved adapter use it")
    ema_decay: float = _f(0.9999, "EMA decay (diffusers' EMAModel: min(decay, n / (9 + n)) at the n-th optimizer "
                                  "step, 0 at the first)")
    lr_scheduler: str = _f("constant", "schedule: " + ", ".join(SCHEDULERS), choices=SCHEDULERS)
    lr_warmup_steps: int = _f(0, "learning-rate warm-up steps")
    lr_num_cycles: int = _f(1, "cycles of cosine_with_restarts")
    lr_power: float = _f(1.0, "power of the polynomial schedule")
    use_8bit_adam: bool = _f(False, "diffusers' spelling of --optimizer adamw8bit")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    mixed_precision: str = _f("no", "no | fp16 | bf16: the frozen base in this dtype; adapters stay fp32",
                              choices=PRECISIONS)
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet / transformer (and text encoder)")
    compile: bool = _f(False, "torch.compile the UNet / transformer with its adapters inside (diffusers' regional "
                              "compilation of its repeated blocks where it names them): the first step compiles "
                              "(seconds on a GPU, a minute or more on a CPU), the rest run faster; checkpoints, "
                              "resume and the ramp are unchanged")
    channels_last: bool = _f(False, "keep the UNet's convolution weights and activations channels-last (NHWC); "
                                    "no effect on the transformers")
    fused_adamw: bool = _f(False, "torch's fused AdamW kernel (CUDA and CPU) instead of its multi-tensor "
                                  "(foreach) one; --optimizer adamw only")
    quantize_base: str = _f("none", "none | nf4 | int8: load the frozen UNet / transformer (and T5) quantized by "
                                    "bitsandbytes (CUDA GPUs only; QLoRA-style: the adapters stay float32)",
                            choices=QUANTIZE_CHOICES)
    snr_gamma: float | None = _f(None, "min-SNR loss weighting gamma (5.0 is the paper's value) of the instance "
                                       "loss; the prior-preservation loss stays unweighted. Unset = off. "
                                       "SD1.x/2.x and SDXL only")
    noise_offset: float = _f(0.0, "offset noise strength (0.05-0.1 helps very dark/bright images)")
    prediction_type: str | None = _f(None, "epsilon | v_prediction; unset = the base scheduler's. SD1.x/2.x and "
                                           "SDXL only")
    # -- flow matching (SD3/3.5, Flux.1): diffusers' train_dreambooth_lora_sd3.py / _flux.py flags
    weighting_scheme: str | None = _f(None, "SD3/Flux: how timesteps are drawn and the loss weighted: "
                                            + " | ".join(WEIGHTING_SCHEMES) + "; unset = logit_normal (SD3) / "
                                            "none (Flux), as diffusers' scripts", choices=WEIGHTING_SCHEMES)
    logit_mean: float = _f(0.0, "SD3/Flux, logit_normal: mean of the normal whose sigmoid is σ")
    logit_std: float = _f(1.0, "SD3/Flux, logit_normal: its standard deviation")
    mode_scale: float = _f(1.29, "SD3/Flux, mode: the scale of the mode density (SD3 paper Eq. 20)")
    guidance_scale: float = _f(3.5, "Flux.1-dev: the distilled-guidance input during training (unused by "
                                    "models without guidance embeddings)")
    max_sequence_length: int | None = _f(None, "SD3/Flux: T5 prompt tokens; unset = 77 (SD3) / 512 (Flux), as "
                                               "diffusers' scripts")
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
        if self.optimizer not in OPTIMIZERS:
            raise BadInput(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.use_8bit_adam:
            if self.optimizer == "prodigy":
                raise BadInput("--use_8bit_adam and --optimizer prodigy contradict each other: drop one")
            self.optimizer = "adamw8bit"
        if self.learning_rate is None:
            self.learning_rate = PRODIGY_LR if self.optimizer == "prodigy" else 1e-4
        if self.fused_adamw and self.optimizer != "adamw":
            raise BadInput(f"--fused_adamw is torch's AdamW and --optimizer {self.optimizer} is another optimizer: "
                           f"drop one")
        if not 0.0 <= self.caption_dropout_rate <= 1.0:
            raise BadInput(f"caption_dropout_rate must be in [0, 1], got {self.caption_dropout_rate}")
        if not 0.0 < self.ema_decay < 1.0:
            raise BadInput(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.loraplus_lr_ratio <= 0:
            raise BadInput(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")
        if self.caption_extension is not None and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension
        if self.enable_bucket:
            self._check_buckets()
        if self.weighting_scheme is not None and self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise BadInput(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got "
                           f"{self.weighting_scheme!r}")
        if self.logit_std <= 0:
            raise BadInput(f"logit_std must be > 0, got {self.logit_std}")
        if self.max_sequence_length is not None and int(self.max_sequence_length) < 1:
            raise BadInput(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise BadInput(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        # One decision, two spellings: diffusers' --train_text_encoder (on our default
        # targets) or the targets themselves. From here on both fields agree, and the
        # trainer reads text_encoder_target_modules only (None: the text encoders stay frozen).
        if self.text_encoder_target_modules is not None:
            self.train_text_encoder = True
        elif self.train_text_encoder:
            self.text_encoder_target_modules = "attn"
        if self.concepts_list:
            given = [n for n in ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt")
                     if getattr(self, n)]
            if given:
                raise BadInput(f"--concepts_list and --{given[0]} contradict each other: each concept in "
                               f"{self.concepts_list} names its own; drop --{given[0]}")
        else:
            if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
                raise BadInput("--with_prior_preservation needs --class_data_dir and --class_prompt")
            for name in ("instance_data_dir", "instance_prompt"):
                if not getattr(self, name):
                    raise BadInput(f"--{name} is required (on the command line or in the --config YAML), "
                                   f"or --concepts_list")
        if not self.pretrained_model_name_or_path:
            raise BadInput("--pretrained_model_name_or_path is required (on the command line or in the --config "
                           "YAML)")
        self.instance_data_dir = resolve_data_dir(self.instance_data_dir)

    def _check_buckets(self) -> None:
        """kohya's rules: sides are multiples of bucket_reso_steps, and the range holds the resolution."""
        step, low, high = self.bucket_reso_steps, self.min_bucket_reso, self.max_bucket_reso
        if step < 8 or step % 8:
            raise BadInput(f"bucket_reso_steps must be a multiple of 8 (the VAE's factor), got {step}")
        for name, value in (("min_bucket_reso", low), ("max_bucket_reso", high)):
            if value % step:
                raise BadInput(f"{name} {value} is not a multiple of --bucket_reso_steps {step}")
        if not low <= self.resolution <= high:
            raise BadInput(f"the bucket range --min_bucket_reso {low} .. --max_bucket_reso {high} cannot hold "
                           f"--resolution {self.resolution}: widen the range or change --resolution")

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
