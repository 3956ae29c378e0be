"""`singlora grid PLAN --dry-run`: what the grid costs, before anything runs.

Counts come from the plan (cells, optimizer steps, images to generate and score). Time comes
from measured rates when the GPU check's JSON is there (bench/gpu_check.sh: our trainer's
steps/s, seconds per generated image), else from the assumption below, said as such.
"""
from __future__ import annotations

import json
from pathlib import Path

from .plan import GridPlan

DEFAULT_GPU_CHECK = Path("outputs/gpu_check/gpu_check.json")
# Used when no GPU check was run: SD1.5 at 512 px, batch 1, on one A100-class GPU (our reading
# of diffusers' DreamBooth LoRA timings; not measured here).
ASSUMED = dict(steps_per_s=4.0, image_seconds_per_step=0.05, load_seconds=30.0)


def _eval_settings(plan: GridPlan, cell) -> tuple[int, int, int]:
    """(prompts, images per prompt, denoising steps) of one cell's evaluation."""
    from ..evaluation.config import EvalConfig
    from ..evaluation.protocol import read_dreambench, read_prompt_file
    from ..toy.scorer import toy_templates
    from .cell import eval_values

    cfg = EvalConfig(**eval_values(plan, cell, Path("-"), Path("-")))
    if cfg.prompts == "dreambench":
        prompts = len(read_dreambench().templates_for(cell.subject.class_name))
    elif cfg.prompts == "toy":
        prompts = len(toy_templates())
    else:
        prompts = len(read_prompt_file(cfg.prompts))
    return prompts, cfg.num_images, cfg.steps


def measured_rates(path: Path, arch: str) -> dict | None:
    """Rates of the GPU check's `arch` rows: steps/s per adapter, seconds per image-step."""
    report = json.loads(path.read_text())
    training, inference = report.get("training", {}).get(arch, {}), report.get("inference", {}).get(arch, {})
    steps = {a: training.get(f"ours {a}", {}).get("steps_per_s") for a in ("singlora", "lora")}
    if not all(steps.values()) or "unmerged" not in inference:
        return None
    per_step = inference["unmerged"] / report["settings"]["infer_steps"]
    return dict(steps_per_s=steps, image_seconds_per_step=per_step, load_seconds=ASSUMED["load_seconds"],
                source=f"measured by bench/gpu_check.sh on {report.get('device')} ({path}; {report['bases'][arch]}); "
                       f"dora and loraplus at lora's rate")


def dry_run(plan: GridPlan, gpu_check: str | None = None, log=print) -> dict:
    from ..training import TrainConfig
    from .cell import train_values

    cells = plan.cells
    per_cell = {}
    for cell in cells:
        steps = TrainConfig(**train_values(plan, cell, Path("-"))).max_train_steps
        prompts, num_images, eval_steps = _eval_settings(plan, cell)
        per_cell[cell.key] = dict(adapter=cell.method.adapter, steps=steps, images=prompts * num_images,
                                  eval_steps=eval_steps)
    arch = "sdxl" if "xl" in plan.base.lower() else "sd15"
    path = Path(gpu_check) if gpu_check else DEFAULT_GPU_CHECK
    rates = measured_rates(path, arch) if path.is_file() else None
    if rates is None:
        rates = dict(ASSUMED, steps_per_s={"singlora": ASSUMED["steps_per_s"], "lora": ASSUMED["steps_per_s"]},
                     source=(f"assumed (no GPU check at {path}; run bench/gpu_check.sh, or pass --gpu_check FILE): "
                             f"{ASSUMED['steps_per_s']:g} training steps/s, {ASSUMED['image_seconds_per_step']:g} s "
                             f"per image per denoising step, {ASSUMED['load_seconds']:g} s of model loading per cell"))
    seconds = 0.0
    for c in per_cell.values():
        rate = rates["steps_per_s"]["singlora" if c["adapter"] == "singlora" else "lora"]
        seconds += c["steps"] / rate + c["images"] * c["eval_steps"] * rates["image_seconds_per_step"] \
            + rates["load_seconds"]
    total = dict(runs=len(cells), steps=sum(c["steps"] for c in per_cell.values()),
                 images=sum(c["images"] for c in per_cell.values()), gpu_hours=seconds / 3600, source=rates["source"])
    log(f"grid {plan.name} ({plan.path})")
    log(f"  {len(plan.subjects)} subjects x {len(plan.methods)} methods ({', '.join(m.name for m in plan.methods)}) "
        f"x {len(plan.seeds)} seeds = {total['runs']} training runs")
    log(f"  {total['steps']:,} optimizer steps; {total['images']:,} images generated and scored")
    log(f"  estimated GPU time: {total['gpu_hours']:.1f} GPU-hours ({total['gpu_hours'] / len(cells) * 60:.1f} min "
        f"per cell); with N GPUs, about 1/N of it")
    log(f"  rates: {rates['source']}")
    if missing := [s for s in plan.subjects if not s.folder.is_dir()]:
        log(f"  note: {len(missing)} subject photo folder(s) missing (e.g. {missing[0].folder}): needed to run")
    return total
