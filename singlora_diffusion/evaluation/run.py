"""evaluate(cfg): plan -> weights -> generate -> score -> report. What eval/evaluate.py calls.

Ordering constraints, each for a reason:
  1. make_plan and resolve_weights load nothing: a wrong path or missing DINO/CLIP weights
     stops the run before a multi-GB Stable Diffusion model is loaded.
  2. The scoring models load before the diffusion model, so a failed download stops early too.
  3. Every process lists the missing images, then all wait, then each takes its share: no
     process can see another's new files and skip or double an image.
  4. Scoring waits for all generation; reports wait for all scoring (only the main process
     writes them, from the embedding caches).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
import yaml

from ..files import write_text
from .config import EvalConfig
from .generation import (check_settings, generate, generated_images, load_base, planned_images, write_manifests,
                         write_settings)
from .plan import Plan, make_plan
from .report import build_scores, summary_table, write_report
from .scorer import RANDOM_STAMP, load_scorer, resolve_weights
from .scoring import collect, embed_subject


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def generate_missing(plan: Plan, cfg: EvalConfig, state) -> None:
    """This process's share of the images not on disk yet; the main process then writes manifests."""
    rank, world = state.process_index, state.num_processes
    todo = [im for im in planned_images(plan, cfg) if not im.path.is_file()]
    state.wait_for_everyone()  # all have listed what is missing before anyone writes an image
    mine = todo[rank::world]
    if mine:
        pipe = load_base(plan, cfg, state.device)
        with _progress(len(mine), f"generating (process {rank + 1}/{world})", state.is_main_process) as bar:
            generate(pipe, mine, plan, cfg, (rank, world), bar)
        del pipe
    state.wait_for_everyone()
    if state.is_main_process:
        write_manifests(plan, cfg)


def embed_my_subjects(plan: Plan, cfg: EvalConfig, scorer, images, state) -> None:
    """Subject i is embedded by process i mod N (one writer per cache file)."""
    rank, world = state.process_index, state.num_processes
    mine = plan.subjects[rank::world]
    total = sum(len(s.photos) + sum(len(images[(s.name, m)]) for m in s.methods(cfg.baseline)) for s in mine)
    with _progress(total, f"scoring (process {rank + 1}/{world})", state.is_main_process) as bar:
        for subject in mine:
            embed_subject(scorer, subject, {m: images[(subject.name, m)] for m in subject.methods(cfg.baseline)},
                          cfg, bar)


def evaluate(cfg: EvalConfig) -> dict[str, Path] | None:
    """The whole evaluation; returns the report files (None on processes other than the main one)."""
    from accelerate import PartialState

    plan = make_plan(cfg)
    if cfg.scorer == "dreambench":
        dino_weights, clip_weights = resolve_weights(cfg.dino_weights, cfg.clip_weights, cfg.allow_random_weights)
    settings = check_settings(plan, cfg) if cfg.generates else {}
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(cfg.out)
    if cfg.scorer == "toy":
        from ..toy.scorer import load_toy_scorer

        scorer = load_toy_scorer(str(state.device))
    else:
        scorer = load_scorer(dino_weights, clip_weights, str(state.device), cfg.allow_random_weights)
    if state.is_main_process:
        if scorer.random_weights:
            which = [name for name, w in (("DINO", scorer.dino_weights), ("CLIP", scorer.clip_weights)) if w.random]
            warnings.warn(f"{RANDOM_STAMP}: {' and '.join(which)} run with random weights (--allow_random_weights)",
                          UserWarning, stacklevel=2)
        write_settings(out, settings)
        write_text(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True))
    if cfg.generates:
        generate_missing(plan, cfg, state)
    images = generated_images(plan, cfg)
    embed_my_subjects(plan, cfg, scorer, images, state)
    state.wait_for_everyone()  # every cache is complete before the main process reads them

    files = None
    if state.is_main_process:
        results = collect(plan, cfg, images, scorer.identity(), getattr(scorer, "text_field", "clip"))
        scores = build_scores(results, cfg, scorer.describe(), scorer.random_weights, plan)
        files = write_report(out, results, scores)
        stamp = f"\n{scores['stamp']}\n" if scores["stamp"] else ""
        print(f"{stamp}\n{summary_table(scores)}\n{stamp}\nreport: {files['report.md']}")
    state.wait_for_everyone()
    return files


def main(argv: list[str] | None = None) -> int:
    from ..dataclass_cli import run_command
    from .config import parse_config

    # images and embeddings written before an interruption are kept: run again to resume
    return run_command("evaluate.py", lambda: evaluate(parse_config(argv)))
