"""`singlora grid`: the plan's checks, the dry run's counts, the intervals' math, and a 2-cell grid
on the toy base in two processes, killed with -9 mid-cell and resumed without redoing the finished cell."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from singlora_diffusion.errors import BadInput
from singlora_diffusion.grid import load_plan
from singlora_diffusion.grid.claims import held, try_claim
from singlora_diffusion.grid.estimate import dry_run
from singlora_diffusion.grid.run import check_done_cells, detach_from_launcher, fingerprint
from singlora_diffusion.grid.table import bootstrap

ROOT = Path(__file__).resolve().parents[1]
TWO_CELLS = {
    "name": "two cells", "base": "toy:shapes", "subjects": {"magenta_cross": "bundled:toy_subject"},
    "class_name": "shape", "instance_prompt": "a {identifier} {class}", "seeds": [0], "baseline": "LoRA r4",
    "train": {"config": "demo", "alpha": None, "train_batch_size": 2},
    "evaluation": {"scorer": "toy", "num_images": 1, "steps": 3, "guidance": 4.0},
    # the first cell ends long before the second: the kill lands while the second is mid-training
    "methods": [{"name": "LoRA r4", "adapter": "lora", "rank": 4, "train": {"max_train_steps": 4}},
                {"name": "SingLoRA r4", "adapter": "singlora", "rank": 4, "train": {"max_train_steps": 250},
                 "paper": {"dino": 0.141}}],
}


def write_plan(folder: Path, plan: dict) -> Path:
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(sneaky=1), "unknown setting(s) sneaky"),
    (lambda p: p["train"].update(learning_rat=1e-3), "train: unknown setting(s) learning_rat"),
    (lambda p: p["train"].update(rank=8), "rank set per cell by the grid"),
    (lambda p: p["evaluation"].update(adapter="x"), "adapter set per cell by the grid"),
    (lambda p: p["methods"][0].update(adapter="lokr"), "adapter must be one of"),
    (lambda p: p["methods"][0].update(rank=0), "rank must be an integer >= 1"),
    (lambda p: p["methods"][1].update(name="LoRA r4"), "appear twice"),
    (lambda p: p.update(baseline="LoRA r16"), "baseline 'LoRA r16' is not a method name"),
    (lambda p: p.update(seeds=[0, 0]), "seeds must be a list of distinct integers"),
    (lambda p: p.update(subjects={"mystery": "somewhere"}, class_name=None), "its class is unknown"),
    (lambda p: p.update(instance_prompt="a {name}"), "may use only {identifier} and {class}"),
])
def test_a_wrong_plan_is_one_line_naming_the_key(tmp_path, change, message):
    plan = json.loads(json.dumps(TWO_CELLS))
    change(plan)
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")
                       .replace("}", r"\}").replace("+", r"\+")):
        load_plan(write_plan(tmp_path, plan))


def test_the_paper_plan_dry_run_counts_every_run_and_image(capsys):
    plan = load_plan("grid_paper_table3")
    assert [(m.adapter, m.rank) for m in plan.methods] == [("lora", 8), ("loraplus", 8), ("dora", 8),
                                                            ("singlora", 8), ("singlora", 16)]
    assert {m.name: m.paper["dino"] for m in plan.methods}["SingLoRA r16"] == 0.151
    total = dry_run(plan, gpu_check="/nonexistent.json")
    out = capsys.readouterr().out
    # 30 DreamBench subjects x 5 rows x 3 seeds; 25 prompts x 4 images each; the paper's 400 steps
    assert (total["runs"], total["images"], total["steps"]) == (30 * 5 * 3, 30 * 5 * 3 * 25 * 4, 30 * 5 * 3 * 400)
    assert "450 training runs" in out and "45,000 images" in out and "assumed" in out
    cells = plan.cells
    assert len({c.key for c in cells}) == 450
    assert {c.method.rank for c in cells if c.method.name == "SingLoRA r16"} == {16}


def test_the_dry_run_uses_the_gpu_checks_measured_rates(tmp_path, capsys):
    check = {"device": "NVIDIA H200", "settings": {"infer_steps": 20}, "bases": {"sd15": "random:sd15 512 px fp16"},
             "training": {"sd15": {"ours singlora": {"steps_per_s": 8.0}, "ours lora": {"steps_per_s": 10.0}}},
             "inference": {"sd15": {"unmerged": 1.0, "merged": 0.9}}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(check))
    plan = load_plan("grid_paper_table3")
    total = dry_run(plan, gpu_check=str(tmp_path / "gpu_check.json"))
    # by hand: per subject and seed, 2 SingLoRA rows at 8 steps/s, 3 PEFT rows at 10; 100 images of
    # 50 steps at 1/20 s a step; 30 s of loading per cell
    per_subject_seed = 2 * 400 / 8 + 3 * 400 / 10 + 5 * (100 * 50 / 20 + 30)
    assert total["gpu_hours"] == pytest.approx(30 * 3 * per_subject_seed / 3600)
    assert "measured by bench/gpu_check.sh on NVIDIA H200" in capsys.readouterr().out


def test_the_interval_resamples_subjects_then_seeds_as_exact_enumeration_does():
    """Reference: the exact distribution of the two-level bootstrap mean, every outcome enumerated
    (3 subjects x 3 seeds: 27 subject draws x 27^3 seed draws)."""
    rng = np.random.default_rng(1)
    table = rng.normal(size=(3, 3)) + np.array([[0.0], [1.0], [2.5]])  # subjects differ, seeds vary within
    values = {(f"s{i}", k): float(table[i, k]) for i in range(3) for k in range(3)}
    seed_means = np.array([[table[s, list(d)].mean() for d in itertools.product(range(3), repeat=3)]
                           for s in range(3)])                                   # (subject, 27 seed draws)
    outcomes = []
    for subjects in itertools.product(range(3), repeat=3):
        a, b, c = (seed_means[s] for s in subjects)
        outcomes.append((a[:, None, None] + b[None, :, None] + c[None, None, :]).ravel() / 3)
    exact = np.percentile(np.concatenate(outcomes), [2.5, 97.5])
    mean, low, high = bootstrap(values, draws=40_000)
    assert mean == pytest.approx(table.mean())
    assert (low, high) == pytest.approx(tuple(exact), abs=0.03 * (exact[1] - exact[0]))


def test_a_claim_is_exclusive_and_a_dead_holder_frees_it(tmp_path):
    folder = tmp_path / "cell"
    first = try_claim(folder)
    assert first is not None and try_claim(folder) is None and held(folder)
    first.release()
    assert not held(folder)
    # a process that dies holding the claim (kill -9): the kernel frees it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from singlora_diffusion.grid.claims import try_claim; c = try_claim(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert try_claim(folder) is None
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert try_claim(folder) is not None


def test_a_launchers_rank_variables_are_read_then_cleared(monkeypatch):
    for name, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
                            CUDA_VISIBLE_DEVICES="4,5").items():
        monkeypatch.setenv(name, value)
    assert detach_from_launcher() == (3, 4)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"  # this node's second device, the only one this process sees
    assert not any(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _grid(plan: Path, out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "singlora_diffusion", "grid", str(plan), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, **kw)


def test_two_processes_share_the_grid_and_a_kill_9_resumes_without_redoing_a_finished_cell(tmp_path):
    plan_path = write_plan(tmp_path, TWO_CELLS)
    plan, out = load_plan(plan_path), tmp_path / "out"
    quick, slow = (out / "cells" / c.key for c in plan.cells)
    procs = [_grid(plan_path, out) for _ in range(2)]
    deadline = time.time() + 300
    while not (quick / "result.json").is_file():
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.2)
    assert held(slow) and not (slow / "result.json").is_file()  # the other process is inside the second cell
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (slow / "result.json").is_file() and (slow / "work" / "log.txt").is_file()  # half-finished
    (slow / "work" / "left-by-the-killed-run").write_text("")
    finished = (quick / "result.json").read_bytes(), (quick / "result.json").stat().st_mtime_ns

    resumed = _grid(plan_path, out)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "2 cells, 1 done" in log and f"{plan.cells[0].key}: training" not in log, log
    assert finished == ((quick / "result.json").read_bytes(), (quick / "result.json").stat().st_mtime_ns)
    assert not (slow / "work" / "left-by-the-killed-run").exists()  # restarted from nothing
    # the table against the cells' own evaluation reports (scores.json), not against the grid's code
    scores = [json.loads((c / "work" / "eval" / "scores.json").read_text())["overall"]["methods"]["adapter"]
              for c in (quick, slow)]
    rows = {r["method"]: r for r in __import__("csv").DictReader((out / "table.csv").open())}
    assert float(rows["LoRA r4"]["dino"]) == pytest.approx(scores[0]["dino"])
    assert float(rows["SingLoRA r4"]["clip_i"]) == pytest.approx(scores[1]["clip_i"])
    assert float(rows["SingLoRA r4"]["dino_diff"]) == pytest.approx(scores[1]["dino"] - scores[0]["dino"])
    assert rows["SingLoRA r4"]["paper_dino"] == "0.141"
    # the parameter counts: SingLoRA's n x r per layer against LoRA's (d_in + d_out) x r
    result = [json.loads((c / "result.json").read_text()) for c in (quick, slow)]
    assert 0 < result[1]["params"] < result[0]["params"]
    assert (out / "table.png").is_file() and "2 of 2 cells" in (out / "table.md").read_text()

    # a changed plan may not reuse the finished cells
    changed = json.loads(json.dumps(TWO_CELLS))
    changed["evaluation"]["steps"] = 4
    with pytest.raises(BadInput, match="run with other settings"):
        check_done_cells(load_plan(write_plan(tmp_path, changed)), out)
    assert fingerprint(plan, plan.cells[0]) == result[0]["fingerprint"]


@pytest.mark.parametrize("change, message", [
    # DreamBench's scorer without DINO / CLIP weights offline: said before the first training, not after it
    (lambda p: p.update(base="tiny:sd15", subjects={"dog3": "bundled:dog3"}, instance_prompt="a photo of sks dog",
                        evaluation={"num_images": 1}), "DINO"),
    (lambda p: p.update(subjects={"ghost": {"dir": "no/such/folder", "class": "shape"}}), "no photo folder"),
])
def test_a_grid_that_cannot_finish_stops_with_one_line_before_any_cell(tmp_path, capsys, change, message):
    from singlora_diffusion.cli import main

    plan = json.loads(json.dumps(TWO_CELLS))
    change(plan)
    assert main(["grid", str(write_plan(tmp_path, plan)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    # one message (the evaluation's missing-weights one lists each model on its own line), no traceback
    assert err.startswith("singlora grid: error:") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "cells").exists()
