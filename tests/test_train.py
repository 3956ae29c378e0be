"""train_dreambooth.py on the tiny pipelines: outputs, resume, faults, precision, features."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from singlora_diffusion.format import read_adapter
from singlora_diffusion.layer import delta_weight, ramp
from singlora_diffusion.pipelines import load_pipeline
from singlora_diffusion.training import build, fit, loop, main, make_accelerator, parse_config, train, validate

from .train_helpers import logged_scalars, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def A_of(out) -> dict:
    return load_file(str(Path(out) / "singlora_weights.safetensors"))  # a run's or a checkpoint's folder


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_outputs_layout_and_checkpoint_limit(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_pipeline_dir(), out, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2,
                      ramp_up_steps=None, report_to="tensorboard", alpha=6)  # α/r = 3: .alpha must be α
    files = train(cfg)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".checkpoint-*"))  # no temporary folder left behind
    adapter = read_adapter(files["adapter"])
    assert adapter.step == 4 and adapter.ramp_up_steps == 1  # default T = 1 % of 4 steps, at least 1
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["seed"] == 0 and resolved["max_train_steps"] == 4 and resolved["rank"] == 2
    card = (out / "README.md").read_text()
    assert "a photo of sks dog" in card and (out / "samples.png").is_file()
    pipe = load_pipeline(tiny_pipeline_dir())
    pipe.load_lora_weights(str(out))  # the diffusers export just works
    # the kohya file for ComfyUI / A1111: kohya's keys, and the native file's ΔW (float64)
    assert files["kohya"] == out / "run_kohya.safetensors"
    kohya = load_file(str(files["kohya"]))
    coef = adapter.alpha / adapter.rank * float(ramp(adapter.step, adapter.ramp_up_steps))
    assert len(kohya) == 3 * len(adapter.tensors) and all(k.startswith("lora_unet_") for k in kohya)
    for key, A in adapter.tensors.items():
        name = "lora_unet_" + key.partition(".")[2].replace(".", "_")
        up, down = (kohya[f"{name}.lora_{s}.weight"].double() for s in ("up", "down"))
        got = up @ down * kohya[f"{name}.alpha"].item() / down.shape[0]
        torch.testing.assert_close(got, delta_weight(A.double(), *adapter.shapes[key], coef), rtol=0, atol=1e-6)
    from safetensors import safe_open

    with safe_open(str(files["kohya"]), framework="pt") as f:  # the run's facts travel in kohya's metadata
        meta = f.metadata()
    assert meta["modelspec.title"] == "run_kohya" and "a photo of sks dog" in meta["ss_training_comment"]
    # the card says which file goes where
    assert "`run_kohya.safetensors` to `models/loras/`" in card
    assert "reads `pytorch_lora_weights.safetensors`" in card and "singlora_weights.safetensors`" in card
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    scalars = logged_scalars(out)
    assert {"loss", "lr", "u"} <= set(scalars)
    assert [e.step for e in scalars["u"]] == [1, 2, 3, 4]


def test_resume_from_checkpoint_equals_straight_run(tiny_pipeline_dir, tmp_path):
    common = dict(max_train_steps=6, checkpointing_steps=3, gradient_accumulation_steps=2, ramp_up_steps=4,
                  random_flip=True)
    straight = tmp_path / "straight"
    train(tiny_config(tiny_pipeline_dir(), straight, **common))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    train(tiny_config(tiny_pipeline_dir(), resumed, resume_from_checkpoint="latest", **common))
    assert read_adapter(resumed / "singlora_weights.safetensors").step == 6
    assert max_diff(A_of(resumed), A_of(straight)) <= 1e-5
    assert max_diff(A_of(resumed), load_file(str(straight / "checkpoint-3" / "singlora_weights.safetensors"))) > 1e-4


def _cli(base, out, *extra):
    return [sys.executable, str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path", str(base),
            "--instance_data_dir", str(ROOT / "singlora_diffusion/assets/dog3"), "--instance_prompt",
            "a photo of sks dog", "--output_dir", str(out), "--resolution", "64", "--center_crop", "--rank", "2",
            "--learning_rate", "1e-3", "--seed", "0", "--report_to", "none", "--checkpointing_steps", "2",
            "--num_validation_images", "1", "--validation_inference_steps", "2", *extra]


def _wait_for(path: Path, proc, timeout=240):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.2)


def test_kill_9_mid_run_then_resume_equals_straight_run(tiny_pipeline_dir, tmp_path):
    from singlora_diffusion.training.checkpoint import KILL_AFTER_ENV

    base = tiny_pipeline_dir()
    straight = tmp_path / "straight"
    train(tiny_config(base, straight, max_train_steps=8, checkpointing_steps=2, ramp_up_steps=4))
    out = tmp_path / "killed"
    # The trainer SIGKILLs itself right after checkpoint-4 is complete: a crash at a known point, no race.
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AFTER_ENV: "4"}
    run = subprocess.run(_cli(base, out, "--max_train_steps", "8", "--ramp_up_steps", "4"), env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stdout[-2000:] + run.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "singlora_weights.safetensors").exists()
    train(tiny_config(base, out, max_train_steps=8, checkpointing_steps=2, ramp_up_steps=4,
                      resume_from_checkpoint="latest"))
    assert max_diff(A_of(out), A_of(straight)) <= 1e-5
    assert max_diff(A_of(out), A_of(out / "checkpoint-4")) > 1e-4  # it trained on from step 4


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    # The run must stop even when this test runs with SIGINT ignored (a shell script's background job:
    # the child inherits the ignore; training/run.main restores it). If it ever does not,
    # PYTHONFAULTHANDLER + SIGABRT print its stacks, and it cannot outlive the test.
    proc = subprocess.Popen(_cli(tiny_pipeline_dir(), out, "--max_train_steps", "100000"),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(out / "checkpoint-2" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        pytest.fail("the run did not stop within 120 s of Ctrl-C; its stacks:\n" + proc.communicate()[0][-6000:])
    assert proc.returncode == 130, output
    assert "--resume_from_checkpoint latest" in output
    step = json.loads((sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
                       / "trainer_state.json").read_text())["step"]
    assert step >= 2
    assert not (out / "singlora_weights.safetensors").exists()  # final outputs only when finished


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tiny_pipeline_dir, tmp_path, monkeypatch):
    from singlora_diffusion.training import objective

    real = objective.per_sample_mse
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(objective, "per_sample_mse", poisoned)
    out = tmp_path / "run"
    with pytest.raises(loop.TrainingDiverged, match="loss became nan at step 3.*checkpoint-2"):
        train(tiny_config(tiny_pipeline_dir(), out, max_train_steps=5, checkpointing_steps=2))
    assert read_adapter(out / "checkpoint-2" / "singlora_weights.safetensors").step == 2
    assert not (out / "checkpoint-3").exists()


def test_ramp_advances_once_per_optimizer_step_with_accumulation(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir(), out, max_train_steps=3, gradient_accumulation_steps=3, ramp_up_steps=10,
                      gradient_checkpointing=True))
    assert read_adapter(out / "singlora_weights.safetensors").step == 3


def test_bf16_base_validation_keeps_dtypes_and_training_goes_on(tiny_pipeline_dir, tmp_path, monkeypatch):
    seen = []
    real = loop.validate_images

    def spy(cfg, trainee, accelerator, step, prompts):
        paths = real(cfg, trainee, accelerator, step, prompts)
        seen.append({p.dtype for p in trainee.parameters()} | {trainee.pipe.unet.conv_in.weight.dtype})
        return paths
    monkeypatch.setattr(loop, "validate_images", spy)
    out = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir(), out, mixed_precision="bf16", max_train_steps=3,
                      validation_prompt="a photo of sks dog", validation_steps=1))
    assert seen == [{torch.float32, torch.bfloat16}] * 3  # adapter fp32, base bf16, after every validation
    assert len(list((out / "validation").glob("step-*.png"))) == 3
    assert read_adapter(out / "singlora_weights.safetensors").step == 3


def test_prior_preservation_generates_missing_class_images_once(tiny_pipeline_dir, tmp_path):
    classes = tmp_path / "class"
    cfg = dict(with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a photo of dog",
               num_class_images=3, sample_batch_size=2, max_train_steps=2)
    train(tiny_config(tiny_pipeline_dir(), tmp_path / "a", **cfg))
    made = sorted(classes.glob("*.png"))
    assert len(made) == 3
    stamps = [p.stat().st_mtime_ns for p in made]
    train(tiny_config(tiny_pipeline_dir(), tmp_path / "b", **{**cfg, "num_class_images": 4}))
    assert len(list(classes.glob("*.png"))) == 4
    assert [p.stat().st_mtime_ns for p in made] == stamps  # existing ones kept


def test_text_encoder_training_sdxl(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir("sdxl"), out, train_text_encoder=True, max_train_steps=2))
    keys = A_of(out).keys()
    assert any(k.startswith("text_encoder.text_model.") for k in keys)
    assert any(k.startswith("text_encoder_2.text_model.") for k in keys)
    pipe = load_pipeline(tiny_pipeline_dir("sdxl"))
    pipe.load_lora_weights(str(out))


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_peft_baselines_write_the_same_layout(adapter, tiny_pipeline_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / adapter
    train(tiny_config(tiny_pipeline_dir(), out, adapter=adapter, alpha=4, max_train_steps=2, checkpointing_steps=1))
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 4  # alpha is not lost
    assert not list(out.glob("*_kohya.safetensors")) and "no kohya file" in (out / "README.md").read_text()
    pipe = load_pipeline(tiny_pipeline_dir())
    pipe.load_lora_weights(str(out))


@pytest.mark.parametrize("extra", [dict(snr_gamma=5.0), dict(noise_offset=0.1), dict(prediction_type="v_prediction"),
                                   dict(lr_scheduler="cosine", lr_warmup_steps=1), dict(random_flip=True,
                                                                                        center_crop=False)])
def test_loss_and_schedule_options_train(extra, tiny_pipeline_dir, tmp_path):
    files = train(tiny_config(tiny_pipeline_dir(), tmp_path, max_train_steps=2, **extra))
    assert read_adapter(files["adapter"]).step == 2


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(tiny_pipeline_dir, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed: the error path cannot be shown here")
    assert main(["--pretrained_model_name_or_path", str(tiny_pipeline_dir()), "--instance_data_dir",
                 str(ROOT / "singlora_diffusion/assets/dog3"), "--instance_prompt", "x", "--output_dir",
                 str(tmp_path), "--use_8bit_adam"]) == 2
    assert "needs bitsandbytes" in capsys.readouterr().err


@pytest.mark.parametrize("flags,targets", [(["--train_text_encoder"], "attn"),  # diffusers' spelling
                                           (["--text_encoder_target_modules", "q_proj,v_proj"], "q_proj,v_proj")])
def test_both_text_encoder_spellings_train_the_text_encoder(flags, targets, tiny_pipeline_dir, tmp_path):
    from singlora_diffusion.inject import singlora_modules

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_pipeline_dir()), "--instance_data_dir",
                        "bundled:dog3", "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path),
                        "--resolution", "64", "--rank", "2", *flags])
    assert (cfg.train_text_encoder, cfg.text_encoder_target_modules) == (True, targets)
    trainee = build(cfg, validate(cfg), torch.device("cpu"))
    assert set(trainee.trained) == {"unet", "text_encoder"} and trainee.trains_text_encoders
    adapted = {name.rsplit(".", 1)[1] for name in singlora_modules(trainee.trained["text_encoder"])}
    expected = {"q_proj", "k_proj", "v_proj", "out_proj"} if targets == "attn" else {"q_proj", "v_proj"}
    assert adapted == expected
    frozen = parse_config(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "bundled:dog3",
                           "--instance_prompt", "x"])
    assert (frozen.train_text_encoder, frozen.text_encoder_target_modules) == (False, None)


def test_dataloader_num_workers_is_accepted_and_said_to_be_ignored(tiny_pipeline_dir, tmp_path):
    from singlora_diffusion.training.config import build_parser

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_pipeline_dir("sd15")), "--instance_data_dir",
                        "bundled:dog3", "--instance_prompt", "x", "--output_dir", str(tmp_path),
                        "--dataloader_num_workers", "4"])  # diffusers' command lines pass it
    assert cfg.dataloader_num_workers == 4
    assert "ignored: this trainer has no DataLoader" in " ".join(build_parser().format_help().split())
    with pytest.warns(UserWarning, match="--dataloader_num_workers 4 is ignored"):
        validate(cfg)  # said once at the start, not silently dropped


def test_yaml_and_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pretrained_model_name_or_path: tiny:sd15\ninstance_data_dir: x\ninstance_prompt: a sks dog\n"
                      "rank: 4\nlearning_rate: 1.0e-3\n")
    cfg = parse_config(["--config", str(config), "--rank", "16", "--center_crop"])
    assert (cfg.rank, cfg.learning_rate, cfg.center_crop, cfg.alpha) == (16, 1e-3, True, 16.0)
    config.write_text("rnak: 4\n")
    with pytest.raises(ValueError, match="unknown setting.*rnak"):
        parse_config(["--config", str(config)])


@pytest.mark.parametrize("adapter,arch", [("singlora", "sd15"), ("lora", "sd15"), ("dora", "sd15"),
                                          ("singlora", "sdxl"), ("lora", "sdxl"), ("dora", "sdxl")])
def test_exported_file_in_diffusers_renders_what_the_trained_model_renders(adapter, arch, tiny_pipeline_dir,
                                                                           tmp_path):
    """pytorch_lora_weights.safetensors through diffusers' own loader = the model as trained (UNet and text encoders)."""
    from singlora_diffusion.training.weights import write_final

    from .helpers import latents

    base = tiny_pipeline_dir(arch)
    cfg = tiny_config(base, tmp_path, adapter=adapter, rank=4, alpha=12, max_train_steps=3, learning_rate=2e-2,
                      ramp_up_steps=5, train_text_encoder=True)
    inputs = validate(cfg)
    accelerator = make_accelerator(cfg)
    trainee = build(cfg, inputs, accelerator.device)
    fit(cfg, trainee, inputs, accelerator, log=lambda *_: None)
    written = write_final(trainee, tmp_path, str(base), cfg)
    for model in trainee.trained.values():
        model.eval()
    expected = latents(trainee.pipe)
    assert (expected - latents(load_pipeline(base))).abs().max() > 1e-2  # the training changed the model
    pipe = load_pipeline(base)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(latents(pipe), expected, rtol=0, atol=1e-4)
    if adapter == "singlora":  # and the kohya file A1111 / ComfyUI read, through diffusers' kohya converter
        assert any(k.startswith("lora_te") for k in load_file(str(written["kohya"])))
        pipe = load_pipeline(base)
        pipe.load_lora_weights(str(written["kohya"]))
        torch.testing.assert_close(latents(pipe), expected, rtol=0, atol=1e-4)
    else:
        assert "kohya" not in written and not list(tmp_path.glob("*_kohya.safetensors"))
