"""EvalConfig: the one source of the evaluation's settings; eval/evaluate.py's flags derive from it.

Three ways in (one is required):
  --subject_dir PHOTOS [--adapter A] [--baseline]     one subject, images generated
  --subject_dir PHOTOS --images_dir GENERATED         one subject, images that already exist
  --dreambench_dir DIR [--adapters_dir DIR | --images_dir DIR]   many subjects (one folder each)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BadInput
from ..pipelines import PRECISIONS

CLIP_T_IDENTIFIER = ("remove", "keep")
SCORERS = ("dreambench", "toy")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EvalConfig:
    # -- what to evaluate
    out: str | None = _f(None, "report folder (images, embeddings, scores.json, report.md, plots); required")
    subject_dir: str | None = _f(None, "folder of the subject's real photos (one subject)")
    class_name: str | None = _f(None, "class of the subject, e.g. dog (default: from the DreamBench table when "
                                      "the folder is named like a DreamBench subject)")
    subject_name: str | None = _f(None, "name of the subject in reports (default: the folder name)")
    adapter: str | None = _f(None, "adapter file, or a training output folder holding one")
    base: str | None = _f(None, "base model: hub id, local diffusers folder or tiny:sd15 (default: the "
                                "adapter's base_model metadata)")
    baseline: bool = _f(False, "also score the base model without adapter on the same prompts and seeds")
    images_dir: str | None = _f(None, "score existing images instead of generating (manifest.jsonl or "
                                      "'<prompt>_<seed>.png' names; with --dreambench_dir one folder per subject)")
    dreambench_dir: str | None = _f(None, "many subjects: one folder of photos per subject "
                                          "(+ prompts_and_classes.txt, else the bundled copy)")
    adapters_dir: str | None = _f(None, "with --dreambench_dir: <subject>/ (training output) or "
                                        "<subject>.safetensors per subject")
    subjects: str | None = _f(None, "with --dreambench_dir: comma-separated subjects to evaluate (default: all "
                                    "with photos, and with an adapter when --adapters_dir is given)")
    # -- prompts and generation
    prompts: str = _f("dreambench", "'dreambench' (25 prompts, object or live list by class), 'toy' (the subject on "
                                    "each toy-world background; the default with --scorer toy) or a text file, "
                                    "one prompt per line, {0}/{identifier} and {1}/{class} placeholders")
    identifier: str = _f("sks", "the subject's identifier token in the prompts")
    clip_t_identifier: str = _f("remove", "remove: CLIP-T compares images with the prompt without the identifier "
                                          "('a dog in the jungle'); keep: with the full prompt",
                                choices=CLIP_T_IDENTIFIER)
    num_images: int = _f(4, "images per prompt (seeds seed .. seed+num_images-1, the same for every prompt)")
    seed: int = _f(0, "first seed")
    steps: int = _f(50, "denoising steps")
    guidance: float = _f(7.5, "classifier-free guidance scale")
    negative_prompt: str | None = _f(None, "negative prompt for every image")
    resolution: int | None = _f(None, "image side in pixels (default: the base model's)")
    scale: float = _f(1.0, "adapter strength")
    batch_size: int = _f(4, "images generated per forward pass")
    mixed_precision: str = _f("no", "no | fp16 | bf16: dtype of the diffusion model (scoring stays float32)",
                              choices=PRECISIONS)
    # -- scoring models
    scorer: str = _f("dreambench", "dreambench: DINO, CLIP-I and CLIP-T with the real scoring models; toy: images of "
                                   "the toy base (toy:shapes) scored with the toy world's feature extractor "
                                   "(subject similarity, subject classified, background as prompted), toy-world "
                                   "scores, not DreamBench's", choices=SCORERS)
    dino_weights: str | None = _f(None, "local DINO ViT-S/16 weights file (default: timm downloads "
                                        "vit_small_patch16_224.dino)")
    clip_weights: str | None = _f(None, "local CLIP ViT-B/32 OpenAI weights file (default: open_clip downloads "
                                        "ViT-B-32 'openai')")
    allow_random_weights: bool = _f(False, "smoke test: use random scoring weights when real ones are missing; "
                                           "every report is stamped 'RANDOM WEIGHTS'")
    score_batch_size: int = _f(32, "images per scoring forward pass")

    def __post_init__(self):
        if not self.out:
            raise BadInput("--out is required: the folder the report goes to")
        if (self.subject_dir is None) == (self.dreambench_dir is None):
            raise BadInput("pass exactly one of --subject_dir (one subject) and --dreambench_dir (many subjects)")
        if self.subject_dir is not None and self.adapters_dir is not None:
            raise BadInput("--adapters_dir goes with --dreambench_dir; for one subject pass --adapter")
        if self.dreambench_dir is not None and self.adapter is not None:
            raise BadInput("--adapter is for one subject; with --dreambench_dir pass --adapters_dir")
        if self.images_dir is not None and (self.adapter or self.adapters_dir or self.baseline):
            raise BadInput("--images_dir scores existing images; it does not combine with --adapter, "
                           "--adapters_dir or --baseline (which generate)")
        if self.subjects is not None and self.dreambench_dir is None:
            raise BadInput("--subjects selects among --dreambench_dir subjects")
        for name in ("num_images", "steps", "batch_size", "score_batch_size"):
            if int(getattr(self, name)) < 1:
                raise BadInput(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution is not None and self.resolution % 8:
            raise BadInput(f"--resolution must be a multiple of 8, got {self.resolution}")
        if self.mixed_precision not in PRECISIONS:
            raise BadInput(f"--mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.scorer not in SCORERS:
            raise BadInput(f"--scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if self.scorer == "toy":
            if self.prompts == "dreambench":
                self.prompts = "toy"  # DreamBench's prompts name no toy background
            self.class_name = self.class_name or "shape"
            if self.dino_weights or self.clip_weights:
                raise BadInput("--dino_weights / --clip_weights are DreamBench's scoring models; --scorer toy "
                               "uses the toy world's own extractor")
        elif self.prompts == "toy":
            raise BadInput("--prompts toy goes with --scorer toy (toy-world images)")
        if self.clip_t_identifier not in CLIP_T_IDENTIFIER:
            raise BadInput(f"--clip_t_identifier must be remove or keep, got {self.clip_t_identifier!r}")

    @property
    def generates(self) -> bool:
        return self.images_dir is None

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_images))


# -- CLI, derived from the dataclass -----------------------------------------------------------

def build_parser():
    from ..dataclass_cli import dataclass_parser

    return dataclass_parser(EvalConfig, "eval/evaluate.py",
                            "DreamBench evaluation (DINO, CLIP-I, CLIP-T; DreamBooth Sec. 4.1) of adapters or of "
                            "existing images. Shard with accelerate launch --num_processes N.")


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    return EvalConfig(**vars(build_parser().parse_args(argv)))
