"""run_grid(plan, out): every process takes free cells until none is left; the last one writes the table.

Distributed without a coordinator. Under `accelerate launch --num_processes N` (or N shells, or
several machines sharing --out) each process walks the plan's cells, starting at its own rank's
offset, and runs the ones it can lock (claims.py). Cells are independent, so the processes never
talk: each cell runs single-process (the launcher's rank variables are cleared before any
trainer or evaluation state exists, and each process keeps to the GPU of its local rank).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

from ..errors import BadInput
from .claims import RESULT, held, is_done, try_claim
from .plan import Cell, GridPlan, check_subjects, load_plan

# The launcher's variables that make accelerate / torch.distributed join a process group.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def detach_from_launcher() -> tuple[int, int]:
    """(rank, world) from the launcher's environment; then the environment of a lone process.

    The GPU is chosen here, before CUDA starts: process k of a node sees only its k-th device.
    """
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = os.environ.get("LOCAL_RANK")
    if local is not None and world > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else None
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local) % len(devices)] if devices else local
    for name in RANK_VARIABLES:
        os.environ.pop(name, None)
    return rank, world


def fingerprint(plan: GridPlan, cell: Cell) -> str:
    """What a cell's numbers depend on: its trainer and evaluation settings, folders aside."""
    from .cell import eval_values, train_values

    folders = {"output_dir", "instance_data_dir", "out", "subject_dir", "adapter"}  # a moved checkout is the same cell
    settings = {"train": train_values(plan, cell, Path("-")), "eval": eval_values(plan, cell, Path("-"), Path("-"))}
    settings = {k: {n: v for n, v in part.items() if n not in folders} for k, part in settings.items()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_done_cells(plan: GridPlan, out: Path) -> None:
    """A finished cell run with other settings would mix two experiments in one table: refused."""
    for cell in plan.cells:
        path = out / "cells" / cell.key / RESULT
        if path.is_file():
            recorded = json.loads(path.read_text()).get("fingerprint")
            if recorded != fingerprint(plan, cell):
                raise BadInput(f"{path}: this cell was run with other settings than {plan.path} gives it now; use "
                               f"another --out, or delete {path.parent} to run it again")


def preflight(plan: GridPlan, out: Path) -> None:
    """Everything a cell would refuse, refused once before any model loads."""
    from ..evaluation import EvalConfig
    from ..evaluation.plan import make_plan
    from ..evaluation.scorer import resolve_weights
    from ..files import check_writable
    from ..pipelines import check_base_exists
    from ..training import TrainConfig, validate
    from .cell import eval_values, train_values

    check_writable(out, "--out")
    check_subjects(plan)
    check_base_exists(plan.base)
    with tempfile.TemporaryDirectory(prefix="singlora-grid-") as tmp:
        for cell in plan.cells[: len(plan.methods)]:  # every method's settings, on the first subject
            validate(TrainConfig(**train_values(plan, cell, Path(tmp))))
        for subject in plan.subjects:  # its evaluation (photos, class, prompts), as the base's: no adapter yet
            cell = next(c for c in plan.cells if c.subject == subject)
            cfg = EvalConfig(**eval_values(plan, cell, Path(tmp), Path(tmp)) | {"adapter": None})
            make_plan(cfg)
        if cfg.scorer == "dreambench":  # missing DINO / CLIP weights: said now, not after the first training
            resolve_weights(cfg.dino_weights, cfg.clip_weights, cfg.allow_random_weights)
    check_done_cells(plan, out)


def run_grid(plan: GridPlan, out: Path, rank: int = 0, world: int = 1, log=print) -> int:
    """This process's share of the grid; returns the number of cells that failed here."""
    from .cell import free_memory, run_cell
    from .table import write_table

    preflight(plan, out)
    cells = plan.cells
    order = cells[rank * len(cells) // world:] + cells[: rank * len(cells) // world]  # spread the first claims
    done = sum(is_done(out / "cells" / c.key) for c in cells)
    log(f"grid {plan.name}: {len(cells)} cells, {done} done; process {rank + 1}/{world} in {out}")
    failed = 0
    for cell in order:
        folder = out / "cells" / cell.key
        claim = try_claim(folder)
        if claim is None:
            continue
        with claim:
            started = time.perf_counter()
            log(f"  {cell.key}: training and evaluating (log: {folder / 'work' / 'log.txt'})")
            try:
                result = run_cell(plan, cell, folder, fingerprint(plan, cell))
            except Exception as e:  # noqa: BLE001 - one failed cell must not stop the others
                failed += 1
                (folder / "failed.txt").write_text(traceback.format_exc())
                log(f"  {cell.key}: FAILED ({type(e).__name__}: {e}); details in {folder / 'failed.txt'}")
                free_memory()  # a CUDA out-of-memory cell must not starve the next one
                continue
            (folder / "failed.txt").unlink(missing_ok=True)
        scores = "diverged" if result.get("diverged") else ", ".join(
            f"{k} {result[k]:.3f}" for k in ("dino", "clip_i", "clip_t"))
        log(f"  {cell.key}: {scores} ({time.perf_counter() - started:.0f} s)")
    remaining = [c for c in cells if not is_done(out / "cells" / c.key)]
    if not remaining:
        files = write_table(out, plan)
        log(f"all {len(cells)} cells done; table: {files['md']}, {files['csv']}, {files['png']}")
    else:
        running = sum(held(out / "cells" / c.key) for c in remaining)
        log(f"{len(remaining)} cells not done ({running} running in other processes, {failed} failed here: see their "
            f"failed.txt; run again to retry them); the process that finishes the last cell writes the table; "
            f"`singlora grid {plan.path} --out {out} --table` writes it from the finished ones")
    return failed


def main(plan_path: str, out: str | None, dry_run: bool = False, table: bool = False,
         gpu_check: str | None = None) -> int:
    from .estimate import dry_run as print_dry_run
    from .table import write_table

    plan = load_plan(plan_path)
    if dry_run:
        print_dry_run(plan, gpu_check)
        return 0
    if out is None:
        raise BadInput("--out is required: the folder the cells and the table go to (shared by every process)")
    out = Path(out)
    if table:
        files = write_table(out, plan)
        print(f"table: {files['md']}")
        return 0
    rank, world = detach_from_launcher()
    try:
        return 1 if run_grid(plan, out, rank, world) else 0
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; the same command resumes (the cell it was in starts again)")
        return 130
