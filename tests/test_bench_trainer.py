"""bench/trainer_throughput.py stays runnable: its --quick path runs end to end (no timing is asserted)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Stands in for diffusers' train_dreambooth_lora.py (not shipped in the wheel): takes the
# same flags and takes --max_train_steps optimizer steps, which is all the benchmark times.
FAKE_DIFFUSERS_SCRIPT = textwrap.dedent("""
    import argparse
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--max_train_steps", type=int)
    p.add_argument("--center_crop", action="store_true")
    p.add_argument("--pre_compute_text_embeddings", action="store_true")
    args, _ = p.parse_known_args()
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w])
    for _ in range(args.max_train_steps):
        (w - 1).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
""")


# One configuration of each kind: ours without and with caching, kohya-style data (buckets and
# captions), diffusers' script. The others differ from these by flags only.
KINDS = ("lora", "singlora+cache", "singlora+buckets+captions+cache", "diffusers")


def test_trainer_throughput_quick(tmp_path):
    script = tmp_path / "train_dreambooth_lora.py"
    script.write_text(FAKE_DIFFUSERS_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "bench.trainer_throughput", "--quick", "--diffusers_script",
                          str(script), "--json", str(tmp_path / "r.json"), "--configs", ",".join(KINDS),
                          "--pipeline_dir", str(tmp_path / "pipe")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| configuration | trainer |" in out.stdout
    for name in KINDS:
        assert f"| {name} |" in out.stdout
    assert "| lora+cache |" not in out.stdout  # --configs is obeyed
    assert "x diffusers' steps/s" in out.stdout  # the goal's verdict is printed
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert all(row["steps_per_s"] > 0 and row["peak"] > 0 for row in rows)
