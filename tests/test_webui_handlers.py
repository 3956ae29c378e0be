"""The web UI's handlers are plain functions: called here without Gradio ever being imported."""
import json
import os
import subprocess
import sys
import textwrap

from singlora_diffusion.format import save_adapter

from .helpers import adapted_pipeline

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from PIL import Image
    from singlora_diffusion.webui import handlers
    from singlora_diffusion.webui.requests import BadRequest, GenerateRequest

    state = handlers.open_state(sys.argv[1], sys.argv[2])
    req = GenerateRequest("a photo of sks dog", steps=2, width=64, height=64, seed=3)
    plain = handlers.generate(state, req)
    print(handlers.choose_adapter(state, "dog.safetensors"), file=sys.stderr)
    (base, _), (adapted, _) = handlers.compare(state, req)
    pixels = lambda p: np.asarray(Image.open(p), dtype=np.int16)
    try:
        handlers.choose_adapter(state, "../outside.safetensors")
        refused = None
    except BadRequest as e:
        refused = str(e)
    print(json.dumps({"gradio": "gradio" in sys.modules, "choices": handlers.picker_choices(state),
                      "status": handlers.status_line(state), "refused": refused,
                      "base_is_plain": bool((pixels(base) == pixels(plain[0][0])).all()),
                      "adapter_changes": float(np.abs(pixels(adapted) - pixels(base)).mean()),
                      "training": handlers.training_status(state)[0]}))
""")


def test_handlers_run_without_gradio(tiny_pipeline_dir, tmp_path):
    base = tiny_pipeline_dir("sd15")
    _, components, cfg = adapted_pipeline(base)
    save_adapter(tmp_path / "dog.safetensors", components, str(base), cfg.target_modules,
                 cfg.text_encoder_target_modules)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SINGLORA_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(base), str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["gradio"] is False  # the handlers module and everything it reached never imported gradio
    assert got["choices"] == ["", "dog.safetensors"]
    assert got["status"] == "Adapter: dog.safetensors"
    assert got["refused"] and "outside" in got["refused"]
    assert got["base_is_plain"] and got["adapter_changes"] > 1
    assert got["training"] == "No training run yet."


# -- Train tab: the form's settings reach the trainer's TrainConfig ------------------------
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from singlora_diffusion.webui import handlers  # noqa: E402
from singlora_diffusion.webui.requests import BadRequest, TrainRequest  # noqa: E402


class Recorder:
    """Stands in for TrainingJob: keeps the trainer's command line instead of starting a process."""
    started: list = []

    def __init__(self, output_dir, args, threads=None):
        self.output_dir, self.args = output_dir, args
        Recorder.started.append(self)

    def status(self):
        from singlora_diffusion.webui.jobs import Status

        return Status("finished")


@pytest.fixture
def train_state(tmp_path, monkeypatch):
    monkeypatch.setattr(handlers, "TrainingJob", Recorder)
    Recorder.started = []
    return handlers.AppState(engine=None, adapters_dir=tmp_path / "adapters", server_threads=1, trainer_threads=1)


def upload(folder, files: dict):
    """Files as Gradio hands them over: each in a temporary folder of its own, under its own name."""
    paths = []
    for i, (name, content) in enumerate(files.items()):
        path = folder / f"upload{i}" / name
        path.parent.mkdir(parents=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            Image.new("RGB", (8 + i, 8), content).save(path)
        paths.append(str(path))
    return paths


def trainer_config(job):
    """What the trainer process will build from the job's command line: its own parser, as `-m` runs it."""
    from singlora_diffusion.training import parse_config

    return parse_config([*job.args, "--output_dir", str(job.output_dir)])


def test_train_tab_settings_reach_the_trainer_config_and_captions_land_beside_their_images(train_state, tmp_path):
    photos = upload(tmp_path / "gradio", {"a.png": "red", "b.jpg": "green", "c.png": "blue",
                                          "a.txt": "\ufeffa photo of sks dog on a red sofa\n".encode(),
                                          "c.TXT": "  sks dog, blue hour  ".encode()})
    req = TrainRequest("a photo of sks dog", class_name="", preset="demo", steps=7, adapter="loraplus",
                       loraplus_lr_ratio=4.5, optimizer="prodigy", learning_rate=None, enable_bucket=True,
                       min_bucket_reso=None, max_bucket_reso=512, bucket_reso_steps=32, caption_dropout_rate=0.25,
                       use_ema=True, ema_decay=0.99)
    assert handlers.start_training(train_state, photos, "", req).endswith("(2 captions)")
    (job,) = Recorder.started
    cfg = trainer_config(job)
    expected = dict(adapter="loraplus", loraplus_lr_ratio=4.5, optimizer="prodigy", learning_rate=1.0,
                    enable_bucket=True, min_bucket_reso=64, max_bucket_reso=512, bucket_reso_steps=32,
                    caption_dropout_rate=0.25, use_ema=True, ema_decay=0.99, caption_extension=".txt",
                    max_train_steps=7, instance_prompt="a photo of sks dog", resolution=64,  # the demo preset's
                    pretrained_model_name_or_path="tiny:sd15", rank=4)
    assert {k: getattr(cfg, k) for k in expected} == expected
    photo_dir = job.output_dir / "photos"
    assert cfg.instance_data_dir == str(photo_dir)
    assert sorted(p.name for p in photo_dir.iterdir()) == ["a.png", "a.txt", "b.jpg", "c.png", "c.txt"]
    assert (photo_dir / "a.txt").read_bytes() == b"a photo of sks dog on a red sofa\n"  # the BOM dropped, UTF-8
    assert (photo_dir / "c.txt").read_text() == "sks dog, blue hour\n"  # the extension the trainer looks for


@pytest.mark.parametrize("blank", [None, 0])  # a blank field; the browser shows it as 0
def test_train_tab_defaults_keep_the_preset(train_state, tmp_path, blank):
    """Nothing changed on the form: the preset's values stand and no new flag is on."""
    from singlora_diffusion.training import load_yaml

    photos = upload(tmp_path / "gradio", {"a.png": "red", "b.png": "green"})
    handlers.start_training(train_state, photos, "", TrainRequest(
        "a photo of sks dog", steps=3, learning_rate=blank, min_bucket_reso=blank, max_bucket_reso=blank,
        bucket_reso_steps=blank, ema_decay=blank))
    cfg = trainer_config(Recorder.started[0])
    demo = load_yaml("demo")
    assert (cfg.adapter, cfg.optimizer, cfg.learning_rate) == (demo["adapter"], "adamw", demo["learning_rate"])
    assert (cfg.enable_bucket, cfg.use_ema, cfg.caption_extension, cfg.caption_dropout_rate) == (False, False, None, 0)
    assert cfg.loraplus_lr_ratio == 16.0  # the ratio field is sent only with loraplus


def test_a_typed_folder_with_captions_trains_on_them(train_state, tmp_path):
    data = train_state.adapters_dir / "subject"
    data.mkdir(parents=True)
    for name, colour in (("a.png", "red"), ("b.png", "green")):
        Image.new("RGB", (8, 8), colour).save(data / name)
    handlers.start_training(train_state, None, "subject", TrainRequest("a photo of sks dog", steps=3))
    assert trainer_config(Recorder.started[0]).caption_extension is None  # no captions: none read
    (data / "a.txt").write_text("sks dog")
    (data / "notes.txt").write_text("")  # beside no image: not a caption, not checked
    handlers.start_training(train_state, None, "subject", TrainRequest("a photo of sks dog", steps=3))
    assert trainer_config(Recorder.started[1]).caption_extension == ".txt"
    (data / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(BadRequest, match=r"^caption b\.txt is not UTF-8 text"):
        handlers.start_training(train_state, None, "subject", TrainRequest("a photo of sks dog", steps=3))


@pytest.mark.parametrize("files,message", [
    ({"a.png": "red", "b.txt": b"a dog"}, r"^b\.txt names no uploaded image: .*\(b\.jpg \+ b\.txt\)"),
    ({"a.png": "red", "a.txt": b"\xff\xfe\x00d"}, r"^caption a\.txt is not UTF-8 text"),
    ({"a.png": "red", "a.txt": b" \n\t"}, r"^caption a\.txt is empty"),
    ({"a.png": "red", "a.txt": b"x" * (64 * 1024 + 1)}, r"^a\.txt is 64 KB; a caption file may hold at most 64 KB"),
    ({"a.txt": b"a dog"}, "names no uploaded image"),
])
def test_a_bad_caption_is_named_and_no_run_starts(train_state, tmp_path, files, message):
    photos = upload(tmp_path / "gradio", files)
    with pytest.raises(BadRequest, match=message):
        handlers.start_training(train_state, photos, "", TrainRequest("a photo of sks dog", steps=3))
    assert not Recorder.started and not (train_state.adapters_dir / "runs").exists()


def test_the_same_name_uploaded_twice_is_refused(train_state, tmp_path):
    photos = upload(tmp_path / "one", {"a.png": "red"}) + upload(tmp_path / "two", {"a.png": "blue"})
    with pytest.raises(BadRequest, match="Two uploaded files are named a.png"):
        handlers.start_training(train_state, photos, "", TrainRequest("a photo of sks dog", steps=3))


def test_the_trainer_config_checks_run_before_a_run_folder(train_state, tmp_path):
    photos = upload(tmp_path / "gradio", {"a.png": "red"})
    req = TrainRequest("a photo of sks dog", preset="sd15", class_name="dog", enable_bucket=True,
                       bucket_reso_steps=60)
    with pytest.raises(Exception, match="bucket_reso_steps must be a multiple of 8"):  # TrainConfig's own check
        handlers.start_training(train_state, photos, "", req)
    assert not Recorder.started and not (train_state.adapters_dir / "runs").exists()


@pytest.mark.parametrize("fields,message", [
    (dict(adapter="lokr"), "Pick an adapter: singlora, lora, dora, loraplus"),
    (dict(caption_dropout_rate=1.5), "caption dropout rate must be between 0 and 1"),
    (dict(learning_rate=float("nan")), "learning rate must be between"),
    (dict(loraplus_lr_ratio=0), "loraplus lr ratio must be between"),
    (dict(min_bucket_reso=100.5), "min bucket reso must be a whole number"),
    (dict(instance_prompt="  "), "Give an instance prompt"),
])
def test_train_request_refuses_bad_fields(fields, message):
    with pytest.raises(BadRequest, match=message):
        TrainRequest(**{"instance_prompt": "a photo of sks dog", **fields})


def test_optimizers_offered_only_where_they_run(train_state, tmp_path, monkeypatch):
    import importlib.util

    import torch

    from singlora_diffusion.webui import jobs

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    assert jobs.offered_optimizers() == ["adamw"]
    note = handlers.optimizer_note()
    assert "adamw8bit needs a CUDA GPU" in note and "pip install prodigyopt" in note
    photos = upload(tmp_path / "gradio", {"a.png": "red"})
    with pytest.raises(BadRequest, match=r"pip install prodigyopt\); pick another optimizer"):
        handlers.start_training(train_state, photos, "", TrainRequest("a photo of sks dog", optimizer="prodigy"))
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert "prodigy" in jobs.offered_optimizers() or real("prodigyopt") is None


def test_choosing_prodigy_sets_the_learning_rate_and_says_why():
    lr, note = handlers.optimizer_changed("prodigy", 1e-4)
    assert lr == 1.0 and "Prodigy estimates its step size itself" in note
    assert handlers.optimizer_changed("adamw", 1.0)[0] is None  # back to the preset's, not Prodigy's 1.0
    assert handlers.optimizer_changed("adamw", 3e-4) == (3e-4, "")


def test_a_prompt_that_starts_with_a_dash_stays_the_prompt(train_state, tmp_path):
    photos = upload(tmp_path / "gradio", {"a.png": "red"})
    handlers.start_training(train_state, photos, "", TrainRequest("--sks", steps=3))
    assert trainer_config(Recorder.started[0]).instance_prompt == "--sks"


def test_buckets_and_ema_from_a_browser_form_left_at_zero(train_state, tmp_path):
    """Ticked boxes, advanced fields at 0: the trainer's defaults, the smallest bucket fitted to the demo's 64 px."""
    photos = upload(tmp_path / "gradio", {"a.png": "red"})
    handlers.start_training(train_state, photos, "", TrainRequest(
        "a photo of sks dog", steps=3, learning_rate=0, enable_bucket=True, min_bucket_reso=0, max_bucket_reso=0,
        bucket_reso_steps=0, use_ema=True, ema_decay=0))
    cfg = trainer_config(Recorder.started[0])
    assert (cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps) == (True, 64, 1024, 64)
    assert (cfg.use_ema, cfg.ema_decay, cfg.learning_rate) == (True, 0.9999, 1e-3)
