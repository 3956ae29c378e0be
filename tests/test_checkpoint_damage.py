"""Resume survives damaged checkpoints and full disks: `latest` falls back, a named one gets one line."""
import json
import re
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from singlora_diffusion.training.checkpoint import (CheckpointError, WriteError, list_checkpoints, resolve_resume,
                                                    save_checkpoint)
from singlora_diffusion.training.run import train

from .train_helpers import tiny_config


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_key(path, key):
    state = json.loads(path.read_text())
    del state[key]
    path.write_text(json.dumps(state))


DAMAGE = {  # what a crash, a full disk or a hand edit leaves in checkpoint-4
    "truncated optimizer.pt": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is damaged"),
    "truncated scheduler.pt": (lambda c: truncate(c / "scheduler.pt"), "scheduler.pt is damaged"),
    "0-byte rng_state.pt": (lambda c: (c / "rng_state.pt").write_bytes(b""), "rng_state.pt is damaged"),
    "truncated weights": (lambda c: truncate(c / "singlora_weights.safetensors"), "singlora_weights.safetensors is damaged"),
    "missing state key": (lambda c: drop_key(c / "trainer_state.json", "samples_seen"), "no whole-number 'samples_seen'"),
    "optimizer without param_groups": (
        lambda c: torch.save({"state": {}}, c / "optimizer.pt"), "optimizer.pt is damaged (it lacks 'param_groups')"),
}


@pytest.fixture(scope="module")
def run(tiny_pipeline_dir, tmp_path_factory):
    base = tiny_pipeline_dir()
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny_config(base, out, max_train_steps=4, checkpointing_steps=2))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    return base, out


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_latest_falls_back_past_a_damaged_checkpoint(kind, run, tmp_path):
    base, good = run
    out = tmp_path / "run"
    shutil.copytree(good, out)
    damage, reason = DAMAGE[kind]
    damage(out / "checkpoint-4")
    lines = []
    cfg = tiny_config(base, out, max_train_steps=4)
    assert resolve_resume(out, "latest", cfg, log=lines.append) == out / "checkpoint-2"
    assert len(lines) == 1 and "skipping checkpoint-4" in lines[0] and reason in lines[0], lines
    with pytest.raises(CheckpointError, match=re.escape(reason)) as e:  # named explicitly: one line, no fallback
        resolve_resume(out, str(out / "checkpoint-4"), cfg)
    assert "\n" not in str(e.value) and "pass an earlier checkpoint-N or 'latest'" in str(e.value)


def test_latest_with_every_checkpoint_damaged_stops_instead_of_starting_over(run, tmp_path):
    base, good = run
    out = tmp_path / "run"
    shutil.copytree(good, out)
    for step in (2, 4):
        (out / f"checkpoint-{step}" / "rng_state.pt").write_bytes(b"")
    lines = []
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        resolve_resume(out, "latest", tiny_config(base, out), log=lines.append)
    assert len(lines) == 2 and all("skipping" in line for line in lines)


def test_resume_latest_trains_on_from_the_last_good_checkpoint(run, tmp_path, capsys):
    base, good = run
    out = tmp_path / "run"
    shutil.copytree(good, out)
    (out / "singlora_weights.safetensors").unlink()
    truncate(out / "checkpoint-4" / "optimizer.pt")
    train(tiny_config(base, out, max_train_steps=6, checkpointing_steps=2, resume_from_checkpoint="latest"))
    printed = capsys.readouterr().out
    assert "skipping checkpoint-4" in printed and "resumed from" in printed and "checkpoint-2 at step 2" in printed
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6


def test_a_changed_rank_is_one_line(run, tmp_path):
    base, good = run
    out = tmp_path / "run"
    shutil.copytree(good, out)
    cli = [sys.executable, "-m", "singlora_diffusion.training", "--pretrained_model_name_or_path", str(base),
           "--instance_data_dir", "bundled:dog3", "--instance_prompt", "a photo of sks dog", "--output_dir", str(out),
           "--resolution", "64", "--max_train_steps", "6", "--rank", "4", "--resume_from_checkpoint", "latest"]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "was written with --rank 2, this run has --rank 4" in proc.stderr.strip().splitlines()[-1]


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses to grow a file, as on a full disk)."""
    from safetensors.torch import save_file

    params = [torch.nn.Parameter(torch.randn(64, 64))]
    optimizer = torch.optim.AdamW(params)
    params[0].grad = torch.randn(64, 64)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    weights = lambda folder: save_file({"a": params[0].detach()}, str(folder / "w.safetensors"))  # noqa: E731
    state = {"samples_seen": 2}
    save_checkpoint(tmp_path, 2, weights, optimizer, scheduler, state, total_limit=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-2").iterdir()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the weights fit; optimizer.pt (~49 kB) does not
    try:
        with pytest.raises(WriteError) as e:
            save_checkpoint(tmp_path, 4, weights, optimizer, scheduler, {"samples_seen": 4}, total_limit=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(e.value)
    assert str(tmp_path / "checkpoint-4") in message and "disk is full" in message
    assert "checkpoint-2, is kept" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no half-written folder left
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-2").iterdir()} == before
    assert resolve_resume(tmp_path, "latest", log=lambda line: None) == tmp_path / "checkpoint-2"


def test_the_trainer_reports_a_full_disk_in_one_line(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "singlora_diffusion.training", "--pretrained_model_name_or_path",
           str(tiny_pipeline_dir()), "--instance_data_dir", "bundled:dog3", "--instance_prompt", "a photo of sks dog",
           "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "4", "--rank", "2",
           "--checkpointing_steps", "2"]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # noqa: E731
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # the weights (55 kB) fit, optimizer.pt does not
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train_dreambooth.py: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    last = errors[0]
    assert f"could not write {out / 'checkpoint-2'}" in last and "the last good checkpoint, none, is kept" in last
    assert not list(out.glob("*checkpoint-*"))
