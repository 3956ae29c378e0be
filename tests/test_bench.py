"""Benchmarks stay runnable: their --quick paths run end to end (no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adapter_overhead_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.adapter_overhead", "--quick", "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "singlora" in out.stdout and "x LoRA" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())
