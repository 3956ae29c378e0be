"""`sweep` (learning-rate stability, paper Fig. 2) and `ramp` (ramp/init ablation, App. A.1).

Each run is our DreamBooth trainer's own phases (validate -> build -> fit,
singlora_diffusion.training) on a pretrained toy base (the shipped toy:shapes, or a
folder made by `python -m singlora_diffusion.toy pretrain --out DIR`), trained on the
bundled toy subject and its captions, then the metrics of evaluate.py on the adapted
pipeline in memory. Results are written to <out>/<command>.json after every run, and
runs already there are skipped, so an interrupted sweep resumes.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from singlora_diffusion.bundled import BUNDLED_PREFIX
from singlora_diffusion.errors import BadInput
from singlora_diffusion.pipelines import TOY_BASE
from singlora_diffusion.toy import base, world

from .evaluate import EvalSizes, Evaluator


@dataclass
class Grid:
    methods: list[tuple[str, int]]                 # (adapter, rank)
    lrs: list[float]
    seeds: list[int]
    steps: int
    batch: int
    ramp_fracs: list[float | None] = field(default_factory=lambda: [None])  # None = the trainer's default (1 %)
    inits: list[str] = field(default_factory=lambda: ["ours"])
    eval: EvalSizes = field(default_factory=EvalSizes)
    instance_data_dir: str = f"{BUNDLED_PREFIX}toy_subject"  # 5 images of the subject, one caption file each
    caption_extension: str | None = ".txt"                     # "a sks shape on a red background"


# Equal rank: every method at r = 4. Equal parameters: SingLoRA r = 8 has as many
# as LoRA r = 4 on square layers (n·8 vs 2n·4); run-time counts are in the JSON.
# LoRA+ is LoRA with B at the trainer's --loraplus_lr_ratio (default 16) times the lr.
GRIDS = {
    ("sweep", False): Grid([("singlora", 4), ("singlora", 8), ("lora", 4), ("dora", 4), ("loraplus", 4)],
                           [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [0, 1, 2], steps=300, batch=4),
    ("sweep", True): Grid([("singlora", 4), ("lora", 4), ("loraplus", 4)], [1e-3, 1e-2], [0], steps=12, batch=2,
                          eval=EvalSizes(subject=4, classes=4, timesteps=2, generated=2, inference_steps=3)),
    ("ramp", False): Grid([("singlora", 4)], [1e-3], [0, 1, 2], steps=300, batch=4,
                          ramp_fracs=[0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.25], inits=["ours", "fan_in_r"]),
    ("ramp", True): Grid([("singlora", 4)], [1e-3], [0], steps=12, batch=2, ramp_fracs=[0.0, 0.25],
                         inits=["ours", "fan_in_r"],
                         eval=EvalSizes(subject=4, classes=4, timesteps=2, generated=2, inference_steps=3)),
}


@dataclass(frozen=True)
class World:
    """The pretrained toy base the runs fine-tune, and whose extractor scores them."""
    folder: Path   # its files (toy.base): pipeline.safetensors, extractor.safetensors, record.json
    model: str     # what the trainer and the base metrics load: toy:shapes, or a diffusers folder saved from it
    id: str        # its fingerprint: cached runs of another world are void


def world_id(folder: Path) -> str:
    """Fingerprint of the pretrained weights and extractor (toy.base.fingerprint)."""
    return base.fingerprint(folder)[:16]


def open_world(folder: Path | None, out: Path) -> World:
    """The shipped toy:shapes (folder None), or a pretrained folder saved once as <out>/model."""
    shipped = folder is None or Path(folder).resolve() == base.world_folder().resolve()
    folder = base.world_folder() if shipped else Path(folder)
    base.read_record(folder)  # a missing base is an error naming the command that makes it
    wid = world_id(folder)
    if shipped:
        return World(folder, TOY_BASE, wid)  # resolve_base builds its diffusers folder once
    return World(folder, str(save_model(folder, out / "model", wid)), wid)


def save_model(folder: Path, model: Path, wid: str) -> Path:
    """The toy base of `folder` as a diffusers folder, written again when the base has changed."""
    from singlora_diffusion.files import atomic_path

    stamp = model / "toy_world.txt"  # the fingerprint it was saved from
    if not stamp.is_file() or stamp.read_text() != wid:
        with atomic_path(model, replace_folder=True) as tmp:
            base.load_pipeline(folder).save_pretrained(tmp)
            (tmp / stamp.name).write_text(wid)
    return model


def runs_of(grid: Grid):
    for adapter, rank in grid.methods:
        for lr in grid.lrs:
            method = dict(adapter=adapter, rank=rank, lr=lr)
            for frac in grid.ramp_fracs:
                for seed in grid.seeds:
                    yield dict(method, ramp_frac=frac, init="ours", seed=seed)
            for init in grid.inits[1:]:  # other initialisations: at the trainer's default ramp
                for seed in grid.seeds:
                    yield dict(method, ramp_frac=None, init=init, seed=seed)


def key(run: dict) -> str:
    return "{adapter}-r{rank}-lr{lr:g}-T{ramp_frac}-{init}-s{seed}".format(**run)


def reinit_fan_in_r(model) -> int:
    """PyTorch's default init of an (n, r) tensor (kaiming_uniform, fan_in = r): the failure mode."""
    from singlora_diffusion.layer import SingLoRALinear

    layers = [m for m in model.modules() if isinstance(m, SingLoRALinear)]
    for m in layers:
        torch.nn.init.kaiming_uniform_(m.singlora_A, a=math.sqrt(5))
    return len(layers)


def train_config(toy: World, run: dict, grid: Grid, output_dir: Path):
    """The trainer's settings of one run: what a user would pass to train_dreambooth.py."""
    from singlora_diffusion.training import TrainConfig

    ramp = None if run["ramp_frac"] is None else round(run["ramp_frac"] * grid.steps)
    return TrainConfig(
        pretrained_model_name_or_path=toy.model, instance_data_dir=grid.instance_data_dir,
        caption_extension=grid.caption_extension, instance_prompt=world.INSTANCE_PROMPT, output_dir=str(output_dir),
        seed=run["seed"], init_seed=run["seed"], resolution=world.SIZE, train_batch_size=grid.batch,
        max_train_steps=grid.steps, learning_rate=run["lr"], adapter=run["adapter"], rank=run["rank"],
        ramp_up_steps=ramp, report_to="none", checkpointing_steps=10 ** 9)


def train_and_measure(toy: World, run: dict, grid: Grid, evaluator: Evaluator, out: Path) -> dict:
    from singlora_diffusion.training import TrainingDiverged, build, fit, make_accelerator, validate

    workdir = Path(tempfile.mkdtemp(prefix="toy-run-"))
    cfg = train_config(toy, run, grid, workdir)
    started = time.perf_counter()
    try:
        inputs = validate(cfg)
        accelerator = make_accelerator(cfg)
        trainee = build(cfg, inputs, accelerator.device)
        if run["init"] == "fan_in_r":
            reinit_fan_in_r(trainee.pipe.unet)
        result = dict(run, params=sum(p.numel() for p in trainee.parameters()), ramp_up_steps=trainee.ramp_up_steps)
        if run["adapter"] == "loraplus":
            result["loraplus_lr_ratio"] = cfg.loraplus_lr_ratio
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress bar, once per run
                fit(cfg, trainee, inputs, accelerator, log=lambda *a, **k: None)
            generated = []
            result.update(evaluator.metrics(trainee.pipe, keep=generated), diverged=False)
            if run["seed"] == grid.seeds[0]:  # a few generated images per setting, for the figures
                save_grid(generated[0][:8], out / "samples" / f"{key(run)}.png")
        except TrainingDiverged:
            result.update(diverged=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = time.perf_counter() - started
    return result


def save_grid(images: torch.Tensor, path: Path) -> None:
    """(N, 3, H, W) in [-1, 1] -> one PNG row."""
    from diffusers.utils import make_image_grid
    from torchvision.transforms.functional import to_pil_image

    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid([to_pil_image((im.clamp(-1, 1) + 1) / 2) for im in images], rows=1, cols=len(images)).save(path)


def base_metrics(toy: World, evaluator: Evaluator, out: Path) -> dict:
    from singlora_diffusion.pipelines import load_pipeline

    generated = []
    metrics = evaluator.metrics(load_pipeline(toy.model), keep=generated)
    save_grid(generated[0][:8], out / "samples" / "base.png")
    return metrics


def init_metrics(toy: World, evaluator: Evaluator, rank: int, seed: int) -> dict:
    """The base plus a fresh SingLoRA adapter at full ramp (u = 1), untrained.

    Unlike LoRA's B = 0, SingLoRA's A·Aᵀ is not zero at initialisation: with
    entries U(±n^-1/2), AᵀA ≈ I/3, so each adapted layer starts moved by a random
    positive semi-definite matrix with r eigenvalues near 1/3.
    """
    from singlora_diffusion.inject import inject_singlora
    from singlora_diffusion.pipelines import load_pipeline

    pipe = load_pipeline(toy.model)
    inject_singlora(pipe.unet, "attn", rank=rank, ramp_up_steps=0, seed=seed)
    return evaluator.metrics(pipe)


def main(command: str, folder: Path | None, out: Path, quick: bool, plots: Path) -> int:
    """Run (or resume) one grid on the toy base of `folder` (None: the shipped toy:shapes) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        toy = open_world(folder, out)
    except BadInput as e:
        raise SystemExit(str(e)) from None
    grid = GRIDS[(command, quick)]
    path = out / f"{command}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("grid") != json.loads(json.dumps(asdict(grid))) or data.get("world") != toy.id:
        # another grid or model: start over
        data = {"grid": asdict(grid), "world": toy.id, "base_model": str(folder or TOY_BASE), "runs": {}}
    evaluator = Evaluator(toy.folder, grid.eval)
    data.setdefault("reference", evaluator.reference())
    if "base" not in data:
        data["base"] = base_metrics(toy, evaluator, out)
    if command == "sweep" and "singlora_at_init" not in data:
        data["singlora_at_init"] = {f"r{rank}-s{seed}": init_metrics(toy, evaluator, rank, seed)
                                    for adapter, rank in grid.methods if adapter == "singlora" for seed in grid.seeds}
    todo = [r for r in runs_of(grid) if key(r) not in data["runs"]]
    print(f"{command} on {data['base_model']}: {len(todo)} runs to do, {len(data['runs'])} cached in {path}")
    for i, run in enumerate(todo):
        result = train_and_measure(toy, run, grid, evaluator, out)
        data["runs"][key(run)] = result
        path.write_text(json.dumps(data, indent=1))
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result.items()}
        print(f"[{i + 1}/{len(todo)}] {shown}", flush=True)
    from .report import report

    report(command, data, out, plots)
    return 0
