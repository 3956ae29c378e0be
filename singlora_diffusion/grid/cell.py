"""Phase 2: one cell = the trainer on one subject with one method and seed, then the evaluation.

Folder of a cell, cells/<subject>__<method>__s<seed>/:
    lock          held while a process runs the cell (claims.py)
    work/         train/ (the trainer's output folder: adapter files, config.yaml), eval/ (the
                  evaluation's report: images, scores.json), log.txt (both tools' output)
    result.json   written last and atomically: the cell is done when it exists

A half-finished cell (work/ without result.json: a crash, kill -9, Ctrl-C) is started again
from nothing: its work/ is removed when the next process claims it.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import time
from pathlib import Path

from ..files import write_json
from .claims import RESULT
from .plan import METRICS, Cell, GridPlan


def train_values(plan: GridPlan, cell: Cell, output_dir: Path) -> dict:
    """The trainer's settings of one cell: what a user would pass to train_dreambooth.py."""
    return plan.train | cell.method.train | dict(
        pretrained_model_name_or_path=plan.base, instance_data_dir=str(cell.subject.folder),
        instance_prompt=instance_prompt(plan, cell), output_dir=str(output_dir), seed=cell.seed, init_seed=cell.seed,
        adapter=cell.method.adapter, rank=cell.method.rank)


def instance_prompt(plan: GridPlan, cell: Cell) -> str:
    return plan.instance_prompt.format(identifier=plan.identifier, **{"class": cell.subject.class_name})


def eval_values(plan: GridPlan, cell: Cell, adapter: Path, out: Path) -> dict:
    """eval/evaluate.py's settings of one cell: the same prompts and image seeds in every cell (paired)."""
    return plan.evaluation | dict(out=str(out), subject_dir=str(cell.subject.folder), subject_name=cell.subject.name,
                                  class_name=cell.subject.class_name, adapter=str(adapter), base=plan.base,
                                  identifier=plan.identifier)


def parameters(adapter_file: Path) -> int:
    """Trainable parameters = the tensors of the native adapter file (A for SingLoRA; A, B and
    DoRA's magnitudes for PEFT), counted from the file so a row's count is what users download."""
    from safetensors import safe_open

    with safe_open(str(adapter_file), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def free_memory() -> None:
    """The cell's models go before the next cell loads its own (a long grid must not creep to OOM)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cell(plan: GridPlan, cell: Cell, folder: Path, fingerprint: str) -> dict:
    """Train and evaluate `cell` into `folder` (claimed by the caller); returns what result.json holds.

    fingerprint: of the cell's settings (run.fingerprint), kept so a changed plan cannot reuse it."""
    from ..evaluation import EvalConfig, evaluate
    from ..training import TrainConfig, TrainingDiverged, train

    work = folder / "work"
    shutil.rmtree(work, ignore_errors=True)  # a half-finished earlier attempt starts again from nothing
    work.mkdir(parents=True)
    result = dict(cell=cell.key, subject=cell.subject.name, class_name=cell.subject.class_name,
                  method=cell.method.name, adapter=cell.method.adapter, rank=cell.method.rank, seed=cell.seed,
                  fingerprint=fingerprint, host=socket.gethostname())
    started = time.perf_counter()
    with open(work / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            files = train(TrainConfig(**train_values(plan, cell, work / "train")), model_card=False)
        except TrainingDiverged as e:
            files = None
            result.update(diverged=True, error=str(e))
        result["train_seconds"] = time.perf_counter() - started
        if files is not None:
            native = files.get("adapter") or files["diffusers"]
            result.update(diverged=False, params=parameters(native))
            evaluate(EvalConfig(**eval_values(plan, cell, native, work / "eval")))
            overall = json.loads((work / "eval" / "scores.json").read_text())["overall"]["methods"]["adapter"]
            result.update({m: overall[m] for m in METRICS}, images=overall["images"])
            result["eval_seconds"] = time.perf_counter() - started - result["train_seconds"]
    for checkpoint in (work / "train").glob("checkpoint-*"):  # optimizer states: restarts begin from nothing
        shutil.rmtree(checkpoint, ignore_errors=True)
    free_memory()
    result["finished"] = time.time()
    write_json(folder / RESULT, result, indent=1)
    return result
