"""The package works installed from a wheel, away from the source checkout (no configs/, no train_dreambooth.py)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import sys, time
from pathlib import Path
import singlora_diffusion
assert "/fresh/" in singlora_diffusion.__file__, singlora_diffusion.__file__  # the wheel's copy, not the checkout
from singlora_diffusion.webui.jobs import TrainingJob
out = Path(sys.argv[1])
job = TrainingJob(out, ["--config", "demo", "--max_train_steps", "2", "--rank", "2"])
deadline = time.time() + 400
while job.status().state == "running":
    assert time.time() < deadline, "training did not finish"
    time.sleep(0.5)
status = job.status()
print(status.state, status.step, status.total, status.message)
"""


def test_webui_training_runs_from_an_installed_wheel(tmp_path):
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    # built from a copy: setuptools builds in the source tree (build/, *.egg-info)
    shutil.copytree(ROOT / "singlora_diffusion", src / "singlora_diffusion",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # --no-build-isolation: setuptools comes from the dev environment, so nothing is downloaded
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, timeout=300, cwd=tmp_path)
    wheel = next(wheels.glob("singlora_diffusion-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "singlora_diffusion/configs/demo.yaml" in names and "singlora_diffusion/assets/dog3/00.jpg" in names
    # the demo's toy base and subject (toy:shapes, bundled:toy_subject) ship in the wheel
    assert {"singlora_diffusion/assets/toy_shapes/pipeline.safetensors", "singlora_diffusion/assets/toy_shapes/record.json",
            "singlora_diffusion/assets/toy_subject/sks-0.txt"} <= set(names)
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    # The heavy dependencies (torch, diffusers, ...) come from this environment, read-only: a .pth entry
    # adds its site-packages after the fresh one, without running its .pth files (so not the editable install).
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", SINGLORA_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    run = subprocess.run([str(python), "-c", PROBE, str(tmp_path / "run")], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.split()[:3] == ["finished", "2", "2"], run.stdout
    assert (tmp_path / "run" / "singlora_weights.safetensors").is_file()
