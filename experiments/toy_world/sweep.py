"""`sweep` (learning-rate stability, paper Fig. 2) and `ramp` (ramp/init ablation, App. A.1).

Each run is our DreamBooth trainer's own phases (validate -> build -> fit,
singlora_diffusion.training) on the pretrained toy model, then the metrics of
evaluate.py on the adapted pipeline in memory. Results are written to
<world>/<command>.json after every run, and runs already there are skipped,
so an interrupted sweep resumes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import shapes
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


# Equal rank: every method at r = 4. Equal parameters: SingLoRA r = 8 has as many
# as LoRA r = 4 on square layers (n·8 vs 2n·4); run-time counts are in the JSON.
GRIDS = {
    ("sweep", False): Grid([("singlora", 4), ("singlora", 8), ("lora", 4), ("dora", 4)],
                           [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [0, 1, 2], steps=300, batch=4),
    ("sweep", True): Grid([("singlora", 4), ("lora", 4)], [1e-3, 1e-2], [0], steps=12, batch=2,
                          eval=EvalSizes(subject=4, classes=4, timesteps=2, generated=2, inference_steps=3)),
    ("ramp", False): Grid([("singlora", 4)], [1e-3], [0, 1, 2], steps=300, batch=4,
                          ramp_fracs=[0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.25], inits=["ours", "fan_in_r"]),
    ("ramp", True): Grid([("singlora", 4)], [1e-3], [0], steps=12, batch=2, ramp_fracs=[0.0, 0.25],
                         inits=["ours", "fan_in_r"],
                         eval=EvalSizes(subject=4, classes=4, timesteps=2, generated=2, inference_steps=3)),
}
N_INSTANCE = 5


def instance_folder(world: Path) -> Path:
    """The 5 subject photos of the toy DreamBooth (drawn once, fixed seed)."""
    folder = world / "instance"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        rng = random.Random(2024)
        for i in range(N_INSTANCE):
            shapes.subject_sample(rng)[0].save(folder / f"sks-{i}.png")
    return folder


def runs_of(grid: Grid):
    for adapter, rank in grid.methods:
        for lr in grid.lrs:
            base = dict(adapter=adapter, rank=rank, lr=lr)
            for frac in grid.ramp_fracs:
                for seed in grid.seeds:
                    yield dict(base, ramp_frac=frac, init="ours", seed=seed)
            for init in grid.inits[1:]:  # other initialisations: at the trainer's default ramp
                for seed in grid.seeds:
                    yield dict(base, ramp_frac=None, init=init, seed=seed)


def key(run: dict) -> str:
    return "{adapter}-r{rank}-lr{lr:g}-T{ramp_frac}-{init}-s{seed}".format(**run)


def reinit_fan_in_r(model) -> int:
    """PyTorch's default init of an (n, r) tensor (kaiming_uniform, fan_in = r): the failure mode."""
    from singlora_diffusion.layer import SingLoRALinear

    layers = [m for m in model.modules() if isinstance(m, SingLoRALinear)]
    for m in layers:
        torch.nn.init.kaiming_uniform_(m.singlora_A, a=math.sqrt(5))
    return len(layers)


def train_and_measure(world: Path, run: dict, grid: Grid, evaluator: Evaluator) -> dict:
    from singlora_diffusion.training import TrainConfig, TrainingDiverged, build, fit, make_accelerator, validate

    workdir = Path(tempfile.mkdtemp(prefix="toy-run-"))
    ramp = None if run["ramp_frac"] is None else round(run["ramp_frac"] * grid.steps)
    cfg = TrainConfig(
        pretrained_model_name_or_path=str(world / "model"), instance_data_dir=str(instance_folder(world)),
        instance_prompt=shapes.INSTANCE_PROMPT, output_dir=str(workdir), seed=run["seed"], init_seed=run["seed"],
        resolution=shapes.SIZE, train_batch_size=grid.batch, max_train_steps=grid.steps, learning_rate=run["lr"],
        adapter=run["adapter"], rank=run["rank"], ramp_up_steps=ramp, report_to="none",
        checkpointing_steps=10 ** 9)
    started = time.perf_counter()
    try:
        inputs = validate(cfg)
        accelerator = make_accelerator(cfg)
        trainee = build(cfg, inputs, accelerator.device)
        if run["init"] == "fan_in_r":
            reinit_fan_in_r(trainee.pipe.unet)
        result = dict(run, params=sum(p.numel() for p in trainee.parameters()), ramp_up_steps=trainee.ramp_up_steps)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress bar, once per run
                fit(cfg, trainee, inputs, accelerator, log=lambda *a, **k: None)
            generated = []
            result.update(evaluator.metrics(trainee.pipe, keep=generated), diverged=False)
            if run["seed"] == grid.seeds[0]:  # a few generated images per setting, for the figures
                save_grid(generated[0][:8], world / "samples" / f"{key(run)}.png")
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


def base_metrics(world: Path, evaluator: Evaluator) -> dict:
    from singlora_diffusion.pipelines import load_pipeline

    generated = []
    metrics = evaluator.metrics(load_pipeline(str(world / "model")), keep=generated)
    save_grid(generated[0][:8], world / "samples" / "base.png")
    return metrics


def init_metrics(world: Path, evaluator: Evaluator, rank: int, seed: int) -> dict:
    """The base plus a fresh SingLoRA adapter at full ramp (u = 1), untrained.

    Unlike LoRA's B = 0, SingLoRA's A·Aᵀ is not zero at initialisation: with
    entries U(±n^-1/2), AᵀA ≈ I/3, so each adapted layer starts moved by a random
    positive semi-definite matrix with r eigenvalues near 1/3.
    """
    from singlora_diffusion.inject import inject_singlora
    from singlora_diffusion.pipelines import load_pipeline

    pipe = load_pipeline(str(world / "model"))
    inject_singlora(pipe.unet, "attn", rank=rank, ramp_up_steps=0, seed=seed)
    return evaluator.metrics(pipe)


def world_id(world: Path) -> str:
    """Fingerprint of the pretrained weights and extractor: cached runs of another world are void."""
    digest = hashlib.sha256()
    for f in sorted((world / "model").rglob("*.safetensors")) + [world / "extractor.pt"]:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def main(command: str, world: Path, quick: bool, plots: Path) -> int:
    if not (world / "model" / "model_index.json").is_file() or not (world / "extractor.pt").is_file():
        raise SystemExit(f"no pretrained toy world in {world}: run `python -m experiments.toy_world pretrain"
                         f"{' --quick' if quick else ''} --out {world}` first")
    grid = GRIDS[(command, quick)]
    out = world / f"{command}.json"
    data = json.loads(out.read_text()) if out.is_file() else {}
    wid = world_id(world)
    if data.get("grid") != json.loads(json.dumps(asdict(grid))) or data.get("world") != wid:
        data = {"grid": asdict(grid), "world": wid, "runs": {}}  # another grid or model: start over
    evaluator = Evaluator(world, grid.eval)
    data.setdefault("reference", evaluator.reference())
    if "base" not in data:
        data["base"] = base_metrics(world, evaluator)
    if command == "sweep" and "singlora_at_init" not in data:
        data["singlora_at_init"] = {f"r{rank}-s{seed}": init_metrics(world, evaluator, rank, seed)
                                    for adapter, rank in grid.methods if adapter == "singlora" for seed in grid.seeds}
    todo = [r for r in runs_of(grid) if key(r) not in data["runs"]]
    print(f"{command}: {len(todo)} runs to do, {len(data['runs'])} cached in {out}")
    for i, run in enumerate(todo):
        result = train_and_measure(world, run, grid, evaluator)
        data["runs"][key(run)] = result
        out.write_text(json.dumps(data, indent=1))
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result.items()}
        print(f"[{i + 1}/{len(todo)}] {shown}", flush=True)
    from .report import report

    report(command, data, world, plots)
    return 0
