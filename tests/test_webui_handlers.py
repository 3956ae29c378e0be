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
    # the smallest bucket: the demo's 32 px scaled range (16) rounded to the given step
    expected = dict(adapter="loraplus", loraplus_lr_ratio=4.5, optimizer="prodigy", learning_rate=1.0,
                    enable_bucket=True, min_bucket_reso=32, max_bucket_reso=512, bucket_reso_steps=32,
                    caption_dropout_rate=0.25, use_ema=True, ema_decay=0.99, caption_extension=".txt",
                    max_train_steps=7, instance_prompt="a photo of sks dog", resolution=32,  # the demo preset's
                    pretrained_model_name_or_path="toy:shapes", rank=4)
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
    assert (cfg.enable_bucket, cfg.use_ema, cfg.caption_dropout_rate) == (False, False, 0)
    assert "--caption_extension" not in Recorder.started[0].args  # no captions uploaded: the preset's setting stands
    assert cfg.caption_extension == demo["caption_extension"]
    assert cfg.loraplus_lr_ratio == 16.0  # the ratio field is sent only with loraplus


def test_a_typed_folder_with_captions_trains_on_them(train_state, tmp_path):
    data = train_state.adapters_dir / "subject"
    data.mkdir(parents=True)
    for name, colour in (("a.png", "red"), ("b.png", "green")):
        Image.new("RGB", (8, 8), colour).save(data / name)
    handlers.start_training(train_state, None, "subject", TrainRequest("a photo of sks dog", steps=3))
    assert "--caption_extension" not in Recorder.started[0].args  # no captions: the UI asks for none
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
    """Ticked boxes, advanced fields at 0: the trainer's defaults, the buckets scaled to the demo's 32 px."""
    photos = upload(tmp_path / "gradio", {"a.png": "red"})
    handlers.start_training(train_state, photos, "", TrainRequest(
        "a photo of sks dog", steps=3, learning_rate=0, enable_bucket=True, min_bucket_reso=0, max_bucket_reso=0,
        bucket_reso_steps=0, use_ema=True, ema_decay=0))
    cfg = trainer_config(Recorder.started[0])
    assert (cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps) == (True, 16, 64, 8)
    assert (cfg.use_ema, cfg.ema_decay, cfg.learning_rate) == (True, 0.9999, 3e-3)  # lr 0: the demo preset's


# -- the demo preset: the toy base on the bundled toy subject -----------------------------
@pytest.mark.parametrize("enable_bucket", [False, True])
def test_the_demo_preset_with_no_photos_trains_the_bundled_toy_subject(train_state, tmp_path, enable_bucket):
    """No photos, no folder, a blank prompt: the preset's own subject, prompt and captions, as the
    trainer takes the YAML's values when no flag overrides them; the trainer's validate accepts them."""
    from singlora_diffusion.bundled import bundled_subject
    from singlora_diffusion.pipelines import TOY_BASE
    from singlora_diffusion.toy import world
    from singlora_diffusion.training import validate

    message = handlers.start_training(train_state, None, "", TrainRequest(steps=3, enable_bucket=enable_bucket))
    assert "the demo preset's own subject (bundled:toy_subject)" in message and message.endswith("(5 captions)")
    (job,) = Recorder.started
    assert job.args[job.args.index("--instance_data_dir") + 1] == "bundled:toy_subject"
    cfg = trainer_config(job)
    assert (cfg.pretrained_model_name_or_path, cfg.resolution, cfg.caption_extension) == (TOY_BASE, 32, ".txt")
    assert cfg.instance_data_dir == str(bundled_subject("toy_subject"))
    assert cfg.instance_prompt == world.INSTANCE_PROMPT  # the preset's, the prompt field left blank
    inputs = validate(cfg)  # images, captions, buckets, the base: every check that needs no model
    prompts = sorted(item.prompt for item in inputs.items)
    assert prompts == sorted(world.subject_caption(bg) for bg in world.SUBJECT_BACKGROUNDS)
    assert {item.size for item in inputs.items} == {(32, 32)}


def test_a_shipped_subject_can_be_named_and_others_are_refused(train_state):
    from singlora_diffusion.bundled import bundled_subject

    handlers.start_training(train_state, None, "bundled:toy_subject", TrainRequest("a sks shape", steps=3))
    assert trainer_config(Recorder.started[0]).instance_data_dir == str(bundled_subject("toy_subject").resolve())
    for name in ("bundled:../..", "bundled:", "bundled:nothere"):
        with pytest.raises(BadRequest, match="outside the allowed folder|no subject shipped with the package"):
            handlers.start_training(train_state, None, name, TrainRequest("a sks shape", steps=3))
    with pytest.raises(BadRequest, match="the sd15 preset ships no subject of its own"):
        handlers.start_training(train_state, None, "", TrainRequest(preset="sd15", class_name="dog"))
    assert len(Recorder.started) == 1 and not any((train_state.adapters_dir / "runs").glob("*/photos"))


def test_small_presets_get_buckets_that_hold_their_resolution():
    from singlora_diffusion.training import TrainConfig
    from singlora_diffusion.webui.jobs import small_preset_buckets

    assert small_preset_buckets(512) == small_preset_buckets(256) == {}  # the trainer's own defaults hold them
    assert small_preset_buckets(32) == {"min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 8}
    for resolution in (8, 32, 64, 96, 200, 248):
        for step in (None, 8, 16)[:None if resolution >= 16 else 2]:  # a step the resolution can hold
            buckets = small_preset_buckets(resolution, step)
            TrainConfig(instance_data_dir="x", instance_prompt="x", pretrained_model_name_or_path="x",
                        resolution=resolution, enable_bucket=True, **buckets)  # the trainer's bucket checks


# -- what suits the base: the toy base's defaults and scorer ------------------------------
def test_the_toy_base_has_its_own_defaults_and_a_real_base_keeps_the_real_ones():
    from singlora_diffusion.pipelines import TOY_BASE
    from singlora_diffusion.toy import world
    from singlora_diffusion.webui.defaults import REAL, profile

    toy = profile(TOY_BASE)
    assert world.named_background(toy.prompt) and "sks" not in toy.prompt  # a shape the base knows
    assert toy.subject_prompt == world.subject_caption("blue")
    assert (toy.steps, toy.guidance, toy.scorer, toy.eval_subject, toy.eval_class) == (
        20, 4.0, "toy", "bundled:toy_subject", "shape")
    for base in ("tiny:sd15", "runwayml/stable-diffusion-v1-5", "toy"):
        assert profile(base) == REAL
    assert (REAL.prompt, REAL.guidance, REAL.scorer) == ("a photo of sks dog", 7.5, "dreambench")


@pytest.mark.parametrize("base,scorer,guidance", [("toy:shapes", "toy", 4.0), ("tiny:sd15", "dreambench", 7.5)])
def test_the_evaluate_tab_scores_the_toy_base_with_the_toy_scorer(tmp_path, monkeypatch, base, scorer, guidance):
    from types import SimpleNamespace

    from singlora_diffusion import evaluation
    from singlora_diffusion.bundled import bundled_subject

    seen = []

    def fake_evaluate(cfg):
        seen.append(cfg)
        (tmp_path / "report.md").write_text("report")
        return {"report.md": tmp_path / "report.md", "per_prompt.png": "p.png", "grid.png": "g.png"}
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    state = handlers.AppState(engine=SimpleNamespace(base=base), adapters_dir=tmp_path / "adapters",
                              server_threads=1, trainer_threads=1)
    assert handlers.run_evaluation(state, "a.safetensors", "bundled:toy_subject", "", "", 1, 2, False)[0] == "report"
    (cfg,) = seen
    assert (cfg.scorer, cfg.guidance, cfg.base) == (scorer, guidance, base)
    assert cfg.subject_dir == str(bundled_subject("toy_subject").resolve())
    assert cfg.prompts == ("toy" if scorer == "toy" else "dreambench")  # EvalConfig's own default list per scorer


def test_the_evaluate_tab_on_the_toy_base_runs_the_toy_scorer_on_the_bundled_subject(tmp_path):
    """The whole path on toy:shapes: its profile's subject and class, toy prompts, the toy extractor."""
    from singlora_diffusion.pipelines import TOY_BASE
    from singlora_diffusion.webui.defaults import profile

    _, components, cfg = adapted_pipeline(TOY_BASE)
    save_adapter(tmp_path / "toy.safetensors", components, TOY_BASE, cfg.target_modules,
                 cfg.text_encoder_target_modules)
    state = handlers.open_state(TOY_BASE, tmp_path)
    toy = profile(TOY_BASE)
    table, plot, grid = handlers.run_evaluation(state, "toy.safetensors", toy.eval_subject, toy.eval_class, "", 1, 2,
                                                False)
    assert "TOY-WORLD SCORES" in table and "a sks shape on a white background" in table
    assert os.path.isfile(plot) and os.path.isfile(grid)
