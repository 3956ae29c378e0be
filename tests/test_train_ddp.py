"""Two processes on CPU (gloo) through accelerate launch; resume with one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from singlora_diffusion.format import read_adapter
from singlora_diffusion.training.run import train

from .helpers import free_port
from .train_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _photos(folder: Path) -> Path:
    """Five photos of three aspect ratios: with --enable_bucket, three buckets."""
    from PIL import Image

    folder.mkdir()
    for i, size in enumerate([(200, 100), (100, 200), (96, 96), (120, 60), (64, 64)]):
        Image.new("RGB", size, (50 * i, 100, 150)).save(folder / f"{i}.png")
    return folder


BUCKETS = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def test_two_processes_shard_bucketed_batches_then_resume_with_one(tiny_pipeline_dir, tmp_path):
    """Process p takes batch k + p of the stream, and the adapter gradients are averaged: 2 processes ×
    batch 1 train exactly what 1 process × batch 1 × 2 accumulated micro-batches trains (both: batches
    2t and 2t + 1, each of one bucket). Without buckets the stream is the plain sample stream
    (test_train_data_features), where this also equals 1 process × batch 2."""
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path",
           str(tiny_pipeline_dir()), "--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks dog",
           "--output_dir", str(out), "--resolution", "64", "--center_crop", "--rank", "2", "--max_train_steps", "4",
           "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--seed", "0", "--report_to", "none",
           *[f for k, v in BUCKETS.items() for f in (f"--{k}", str(v))]]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout  # the summary, printed once by the main process
    assert run.stdout.count("files written:") == 1
    assert read_adapter(out / "singlora_weights.safetensors").step == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["samples_seen"], state["num_processes"]) == (8, 2)  # 4 steps x batch 1 x 2 shards
    # without the all-reduce (or with both ranks on one batch) each rank keeps its own update
    single = tmp_path / "single"
    train(tiny_config(tiny_pipeline_dir(), single, instance_data_dir=str(photos), max_train_steps=4,
                      checkpointing_steps=2, gradient_accumulation_steps=2, **BUCKETS))
    a, b = (load_file(str(p / "singlora_weights.safetensors")) for p in (out, single))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - load_file(str(out / "checkpoint-2" / "singlora_weights.safetensors"))[k]).abs().max().item()
               for k in a) > 1e-4  # and they did train
    # the checkpoint of a 2-process run resumes in a single process
    train(tiny_config(tiny_pipeline_dir(), out, instance_data_dir=str(photos), max_train_steps=6,
                      checkpointing_steps=2, resume_from_checkpoint="latest", **BUCKETS))
    assert read_adapter(out / "singlora_weights.safetensors").step == 6
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["samples_seen"] == 10


def test_two_processes_train_flux_as_one_process_accumulating_two(tiny_pipeline_dir, tmp_path):
    """The same sharding and all-reduce on a transformer base (tiny:flux): 2 processes × batch 1 equal
    1 process × 2 accumulated micro-batches."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path",
           str(tiny_pipeline_dir("flux")), "--instance_data_dir", str(ROOT / "singlora_diffusion/assets/dog3"),
           "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "32", "--center_crop",
           "--rank", "2", "--max_train_steps", "3", "--checkpointing_steps", "3", "--learning_rate", "1e-3",
           "--seed", "0", "--report_to", "none", "--max_sequence_length", "16"]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    single = tmp_path / "single"
    train(tiny_config(tiny_pipeline_dir("flux"), single, resolution=32, max_train_steps=3, checkpointing_steps=3,
                      gradient_accumulation_steps=2, max_sequence_length=16))
    a, b = (load_file(str(p / "singlora_weights.safetensors")) for p in (out, single))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert read_adapter(out / "singlora_weights.safetensors").metadata["base_arch"] == "flux"
