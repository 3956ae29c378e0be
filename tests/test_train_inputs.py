"""Bad input to the trainer: one clear error before any model is loaded, nothing lost."""
import importlib
import shutil

import pytest

from singlora_diffusion import pipelines
from singlora_diffusion.bundled import bundled_subject
from singlora_diffusion.training import batches
from singlora_diffusion.training.run import main, train

from .train_helpers import tiny_config


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")
    monkeypatch.setattr(pipelines, "load_pipeline", refuse)
    # the module: `from singlora_diffusion.training import build` is the function build()
    monkeypatch.setattr(importlib.import_module("singlora_diffusion.training.build"), "load_pipeline", refuse)


def _args(base, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "64",
            "--report_to", "none", *extra]


@pytest.mark.parametrize("case", ["missing", "empty", "only_bad"])
def test_unusable_instance_folder(case, tiny_pipeline_dir, tmp_path, capsys, no_model_loading):
    data = tmp_path / "photos"
    if case != "missing":
        data.mkdir()
    if case == "only_bad":
        (data / "notes.txt").write_text("not an image")
        (data / "broken.jpg").write_bytes(b"")
    base = tiny_pipeline_dir()
    capsys.readouterr()
    assert main(_args(base, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_dir(tiny_pipeline_dir, tmp_path, capsys, no_model_loading):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert main(_args(tiny_pipeline_dir(), bundled_subject(), blocker / "out")) == 2
    assert "is not writable" in capsys.readouterr().err


def test_unknown_preset_and_missing_base(tiny_pipeline_dir, tmp_path, capsys, no_model_loading):
    assert main(_args(tiny_pipeline_dir(), bundled_subject(), tmp_path, "--target_modules", "qkv")) == 2
    assert "unknown target preset 'qkv'" in capsys.readouterr().err
    assert main(_args(tmp_path / "no_such_model", bundled_subject(), tmp_path)) == 2
    assert "no such folder" in capsys.readouterr().err


def test_rank_larger_than_a_layer_fails_before_training(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("training started before the rank was checked")
    monkeypatch.setattr(importlib.import_module("singlora_diffusion.training.run"), "fit", refuse)
    assert main(_args(tiny_pipeline_dir(), bundled_subject(), tmp_path / "out", "--rank", "40")) == 2
    err = capsys.readouterr().err
    assert "--rank 40 is larger than layer" in err and "choose --rank <= 32" in err
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_odd_files_are_skipped_with_a_warning_and_training_goes_on(tiny_pipeline_dir, tmp_path):
    data = tmp_path / "photos"
    shutil.copytree(bundled_subject(), data)
    (data / "notes.txt").write_text("hello")
    (data / ".DS_Store").write_bytes(b"\0\0")
    with pytest.warns(UserWarning, match="notes.txt"):
        files = train(tiny_config(tiny_pipeline_dir(), tmp_path / "out", instance_data_dir=str(data),
                                  max_train_steps=1))
    assert files["adapter"].is_file()


@pytest.mark.parametrize("center_crop,random_flip,cache,expected", [
    (True, False, True, 6),       # each image encoded once
    (True, True, True, 12),       # both orientations cached
    (False, False, True, 4 * 2),  # random crop: encoded every step (4 steps x batch 2)
    (True, False, False, 4 * 2),  # caching switched off
])
def test_latents_are_cached_when_augmentation_allows(center_crop, random_flip, cache, expected, tiny_pipeline_dir,
                                                    tmp_path, monkeypatch):
    calls = {"vae": 0, "text": 0}
    real_encode, real_prompt = batches.LatentSource._encode, batches.PromptEncoder._encode

    def count_vae(self, *args):
        calls["vae"] += 1
        return real_encode(self, *args)

    def count_text(self, prompt):
        calls["text"] += 1
        return real_prompt(self, prompt)
    monkeypatch.setattr(batches.LatentSource, "_encode", count_vae)
    monkeypatch.setattr(batches.PromptEncoder, "_encode", count_text)
    train(tiny_config(tiny_pipeline_dir(), tmp_path, center_crop=center_crop, random_flip=random_flip,
                      cache_latents=cache, max_train_steps=4, train_batch_size=2))
    assert calls["vae"] == expected
    assert calls["text"] == 1  # frozen text encoder: the prompt is encoded once
