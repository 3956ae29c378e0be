"""bench/gpu_check.sh --dry-run (the GPU script's code path on the CPU) and bench/memory.py --quick stay runnable.

No timing or memory value is asserted, only that every measure was taken and reported.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from .test_bench_trainer import FAKE_DIFFUSERS_SCRIPT

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SINGLORA_CACHE": str(tmp_path / "cache")}


def test_gpu_check_dry_run_measures_everything(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("train_dreambooth_lora.py", "train_dreambooth_lora_sdxl.py"):
        (scripts / name).write_text(FAKE_DIFFUSERS_SCRIPT)  # stands in for diffusers' scripts
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out"),
                          "--diffusers_scripts", str(scripts)], cwd=tmp_path, capture_output=True, text=True,
                         env={**_env(tmp_path), "PYTHON": sys.executable}, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["device"] == "CPU (dry run)"
    for arch in ("sd15", "sdxl"):
        rows = report["training"][arch]
        assert set(rows) == {"ours singlora", "ours lora", "ours singlora compile", "diffusers"}
        assert "GPU only" in rows.pop("ours singlora compile")["skipped"]
        assert all(r["steps_per_s"] > 0 and r["memory_gb"] > 0 for r in rows.values()), rows
        assert rows["ours singlora"]["first_step_s"] > 0
        inference = report["inference"][arch]
        assert inference["unmerged"] > 0 and inference["merged"] > 0
    assert report["evaluation"]["images_per_s"] > 0
    assert set(report["dit"]) == {"tiny:sd3 32 px", "tiny:flux 32 px"}
    for rows in report["dit"].values():
        assert set(rows) == {"singlora", "lora"}
        assert all(r["steps_per_s"] > 0 and r["predicted_gb"] > 0 for r in rows.values()), rows
        assert rows["lora"]["trainable"] == 2 * rows["singlora"]["trainable"]  # square attention layers
    assert all("GPU-only" in r["skipped"] for r in report["quantized"].values())
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| base | trainer | steps/s |" in table and "unmerged / merged" in table and "embed_subject" in table
    assert "| tiny:flux 32 px | singlora |" in table and "--quantize_base nf4" in table


def test_memory_bench_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--quick", "--json", str(tmp_path / "m.json")],
                         cwd=ROOT, capture_output=True, text=True, env=_env(tmp_path), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| base | configuration | trainer | peak RSS through step 2 (GB) |" in out.stdout
    rows = json.loads((tmp_path / "m.json").read_text())
    ours = [r for r in rows if r["trainer"] == "ours" and "skipped" not in r]
    assert {r["arch"] for r in ours} == {"sd15", "sdxl"} and len(ours) >= 7
    assert all(r["training"] > 0 and r["peak"] >= r["training"] and r["loaded"] > 0 and r["steps"] == 2 for r in ours)
