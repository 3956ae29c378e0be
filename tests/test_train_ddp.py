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


def test_two_processes_then_resume_with_one(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path", str(tiny_pipeline_dir()),
           "--instance_data_dir", str(ROOT / "singlora_diffusion/assets/dog3"), "--instance_prompt",
           "a photo of sks dog", "--output_dir", str(out), "--resolution", "64", "--center_crop", "--rank", "2",
           "--max_train_steps", "4", "--checkpointing_steps", "2", "--seed", "0", "--report_to", "none",
           "--num_validation_images", "1", "--validation_inference_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd[cmd.index("--num_machines"):cmd.index("--num_machines")] = ["--main_process_port", str(free_port())]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout  # the summary, printed once by the main process
    assert run.stdout.count("files written:") == 1
    assert read_adapter(out / "singlora_weights.safetensors").step == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["samples_seen"], state["num_processes"]) == (8, 2)  # 4 steps x batch 1 x 2 shards
    # 2 processes x batch 1 = 1 process x batch 2: the same samples with the same draws, and the
    # gradients averaged across processes (without the all-reduce each rank keeps its own half)
    single = tmp_path / "single"
    train(tiny_config(tiny_pipeline_dir(), single, max_train_steps=4, checkpointing_steps=2, train_batch_size=2,
                      learning_rate=1e-4))  # the command line above leaves --learning_rate at its default
    a, b = (load_file(str(p / "singlora_weights.safetensors")) for p in (out, single))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - load_file(str(out / "checkpoint-2" / "singlora_weights.safetensors"))[k]).abs().max().item()
               for k in a) > 1e-4  # and they did train
    # the checkpoint of a 2-process run resumes in a single process
    train(tiny_config(tiny_pipeline_dir(), out, max_train_steps=6, checkpointing_steps=2,
                      resume_from_checkpoint="latest"))
    assert read_adapter(out / "singlora_weights.safetensors").step == 6
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["samples_seen"] == 10


def test_two_processes_shard_bucketed_batches(tiny_pipeline_dir, tmp_path):
    """With buckets, process p takes batch k + p of the stream: 2 processes × batch 1 train exactly
    what 1 process × batch 1 × 2 accumulated micro-batches trains (both: batches 2t and 2t + 1)."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, size in enumerate([(200, 100), (100, 200), (96, 96), (120, 60), (64, 64)]):
        Image.new("RGB", size, (50 * i, 100, 150)).save(photos / f"{i}.png")
    buckets = ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16"]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path",
           str(tiny_pipeline_dir()), "--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks dog",
           "--output_dir", str(out), "--resolution", "64", "--center_crop", "--rank", "2", "--max_train_steps", "3",
           "--learning_rate", "1e-3", "--seed", "0", "--report_to", "none", *buckets]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    single = tmp_path / "single"
    train(tiny_config(tiny_pipeline_dir(), single, instance_data_dir=str(photos), max_train_steps=3,
                      gradient_accumulation_steps=2, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                      bucket_reso_steps=16))
    a, b = (load_file(str(p / "singlora_weights.safetensors")) for p in (out, single))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
