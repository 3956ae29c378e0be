"""The web UI through its API (gradio_client) with the app launched in this process."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from singlora_diffusion.format import save_adapter
from singlora_diffusion.webui.requests import GenerateRequest

from .helpers import adapted_pipeline
from .test_webui_startup import values_by_label

ARGS = dict(negative="", steps=3, guidance=7.5, seed=5, n=1, width=64, height=64, strength=1.0)


def call(client, prompt="a photo of sks dog", api="/generate", **overrides):
    v = {**ARGS, **overrides}
    return client.predict(prompt, v["negative"], v["steps"], v["guidance"], v["seed"], v["n"], v["width"],
                          v["height"], v["strength"], api_name=api)


def train(client, photos=None, folder="subject", steps=2, submit=False, **settings):
    """/train with the Train tab's fields: the form's defaults (TrainRequest's), then `settings`."""
    from dataclasses import fields

    from singlora_diffusion.webui.requests import TrainRequest

    given = {"instance_prompt": "a photo of sks dog", "class_name": "dog", "preset": "demo", "steps": steps, **settings}
    values = [given.get(f.name, f.default) for f in fields(TrainRequest)]
    return (client.submit if submit else client.predict)(photos, folder, *values, api_name="/train")


def pixels(item) -> torch.Tensor:
    return torch.tensor(list(Image.open(item["image"]).convert("RGB").getdata()), dtype=torch.float32)


@pytest.fixture(scope="module")
def ui(tiny_pipeline_dir, tmp_path_factory):
    from gradio_client import Client

    from singlora_diffusion.webui.app import build_app

    root = tmp_path_factory.mktemp("ui")
    adapters = root / "adapters"
    adapters.mkdir()
    base = tiny_pipeline_dir("sd15")
    _, components, cfg = adapted_pipeline(base)
    save_adapter(adapters / "dog.safetensors", components, str(base), cfg.target_modules,
                 cfg.text_encoder_target_modules)
    os.environ["SINGLORA_CACHE"] = str(root / "cache")
    app = build_app(base=str(base), adapters_dir=adapters)
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False), app, adapters, root
    app.close()
    job = app.app_state.job
    if job is not None and job.proc.poll() is None:  # a failed test must not leave its trainer on the cores
        job.proc.kill()
        job.proc.wait()


def test_generate_writes_png_with_settings(ui):
    client, app, _, _ = ui
    client.predict("", api_name="/choose_adapter")
    result = call(client, seed=7)
    assert len(result) == 1
    image = Image.open(result[0]["image"])
    assert image.size == (64, 64)
    settings = json.loads(image.text["parameters"])
    assert settings["seed"] == 7 and settings["prompt"] == "a photo of sks dog" and settings["steps"] == 3


def test_compare_base_equals_plain_base_run(ui):
    client, _, _, _ = ui
    client.predict("", api_name="/choose_adapter")
    plain = call(client)
    client.predict("dog.safetensors", api_name="/choose_adapter")
    base, adapted = call(client, api="/compare")
    assert base["caption"] == "base" and adapted["caption"] == "adapter"
    assert torch.equal(pixels(base), pixels(plain[0]))  # same seed, adapter at scale 0 = the base model
    assert (pixels(adapted) - pixels(base)).abs().mean() > 1  # the adapter changes the image


def test_strength_zero_is_the_base_model(ui):
    client, _, _, _ = ui
    client.predict("", api_name="/choose_adapter")
    plain = call(client)
    client.predict("dog.safetensors", api_name="/choose_adapter")
    assert torch.equal(pixels(call(client, strength=0.0)[0]), pixels(plain[0]))


def status_after_upload(client, path, partial=False):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), partial, api_name="/upload_adapter")[1]


def uploads_of(adapters) -> dict[str, bytes]:
    folder = adapters / "uploads"
    return {p.name: p.read_bytes() for p in folder.glob("*.safetensors")} if folder.is_dir() else {}


def test_same_name_uploads_never_overwrite(ui, tmp_path):
    from singlora_diffusion.export import export_kohya

    client, app, adapters, _ = ui
    first, second = tmp_path / "a" / "mine.safetensors", tmp_path / "b" / "mine.safetensors"
    first.parent.mkdir()
    second.parent.mkdir()
    shutil.copyfile(adapters / "dog.safetensors", first)
    export_kohya(adapters / "dog.safetensors", second)  # other bytes, same name (a standard LoRA file)
    status = status_after_upload(client, first)
    assert "uploads/mine-" in status
    image_first = pixels(call(client)[0])
    status = status_after_upload(client, second)
    kept = uploads_of(adapters)
    assert len([n for n in kept if n.startswith("mine-")]) == 2  # both files, each under its own name
    loaded = app.engine.adapter
    assert loaded.read_bytes() == second.read_bytes() and loaded.name in status
    # a broken file under the same name: refused, every earlier file and the loaded adapter as they were
    broken = tmp_path / "c" / "mine.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(first.read_bytes()[:1000])
    with pytest.raises(Exception, match="not an adapter"):
        status_after_upload(client, broken)
    assert uploads_of(adapters) == kept and app.engine.adapter == loaded
    assert not [p.name for p in (adapters / "uploads").iterdir() if p.name.startswith(".")]  # no temporary left
    # uploading the first file again loads it again (same bytes: the same stored file)
    status_after_upload(client, first)
    assert uploads_of(adapters) == kept
    assert torch.equal(pixels(call(client)[0]), image_first)


def test_bad_files_are_refused_with_the_previous_adapter_kept(ui, tmp_path):
    from .bad_files import LORA, SINGLORA, write_bad_files

    client, app, adapters, root = ui
    bad = write_bad_files(adapters / "dog.safetensors", tmp_path / "bad")
    client.predict("dog.safetensors", api_name="/choose_adapter")
    reference = pixels(call(client)[0])
    before = uploads_of(adapters)
    for name, fragment in {**SINGLORA, **LORA}.items():
        with pytest.raises(Exception) as e:
            status_after_upload(client, bad[name])
        message = str(e.value)
        expected = "keys fit no layer" if name == "wrong_arch" else fragment
        assert expected in message, (name, message)
        assert str(root) not in message and str(tmp_path) not in message and "/tmp" not in message, message
        assert uploads_of(adapters) == before and app.engine.adapter == adapters / "dog.safetensors", name
    assert torch.equal(pixels(call(client)[0]), reference)  # still the same adapter, really loaded
    for name, count in (("wrong_arch", "64 of 108"), ("kohya_partial", "76 of 108")):  # on request, with counts
        assert f"partial load: {count}" in status_after_upload(client, bad[name], partial=True)
    pickle = tmp_path / "evil.safetensors"
    torch.save({"x": 1}, pickle)  # pickled bytes under a safetensors name: never unpickled
    with pytest.raises(Exception, match="not an adapter"):
        status_after_upload(client, pickle)
    client.predict("dog.safetensors", api_name="/choose_adapter")


def test_over_budget_request_is_refused_at_once(ui, monkeypatch):
    import psutil

    client, app, _, _ = ui
    rendered = []
    monkeypatch.setattr(app.engine, "_render", lambda *a, **k: rendered.append(a))
    rss = psutil.Process().memory_info().rss
    with pytest.raises(Exception, match="the limit is 600 s per request"):  # the UI's own maxima
        client.predict("a dog", "", 1, 7.5, 0, 8, 2048, 2048, 1.0, api_name="/generate")
    assert not rendered and psutil.Process().memory_info().rss - rss < 200 * 2 ** 20
    cost = app.engine.cost(GenerateRequest("a dog", steps=1, num_images=8, width=2048, height=2048))
    small = app.engine.cost(GenerateRequest("a dog", steps=1, num_images=1, width=64, height=64))
    assert cost.flops > 1e5 * small.flops  # 1024x the pixels, 8x the images, attention quadratic in pixels


def test_cost_model_counts_what_the_unet_really_computes(ui):
    """FLOPs of one UNet step on the meta device against torch's counter on the real model."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from singlora_diffusion.webui.budget import count_on_meta

    client, app, _, _ = ui
    client.predict("", api_name="/choose_adapter")  # the base UNet, as the cost model has it
    engine = app.engine
    unet = engine.pipe.unet
    counted, _ = count_on_meta(engine.cost_model.step_of(engine.cost_model.denoiser, 2, 16, 16))
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, unet.config.cross_attention_dim)
    counter = FlopCounterMode(display=False)
    # the math kernel: attention as plain matmuls, each counted (the fused CPU kernel is not)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        unet(x, torch.tensor(10), text)
    assert counted == pytest.approx(counter.get_total_flops(), rel=1e-6)


def wait_until(condition, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline
        time.sleep(0.02)


def test_cancel_stops_a_running_generation(ui):
    client, app, _, _ = ui
    client.predict("", api_name="/choose_adapter")
    job = client.submit("a dog", "", 150, 7.5, 0, 1, 128, 128, 1.0, api_name="/generate")
    wait_until(lambda: app.engine.progress[0] >= 2)
    assert client.predict(api_name="/cancel_generation") == "Cancelling after this step."
    with pytest.raises(Exception, match=r"Cancelled after step \d+ of 150"):
        job.result(timeout=120)
    assert app.engine.progress == (0, 0)
    assert len(call(client)) == 1  # the next request runs normally


def test_a_switch_during_a_generation_does_not_change_its_image(ui):
    client, app, _, _ = ui
    client.predict("", api_name="/choose_adapter")
    args = ("a dog", "", 40, 7.5, 3, 1, 128, 128, 1.0)
    reference = pixels(client.predict(*args, api_name="/generate")[0])
    job = client.submit(*args, api_name="/generate")
    wait_until(lambda: app.engine.progress[0] >= 1)
    switch = client.submit("dog.safetensors", api_name="/choose_adapter")  # waits in the same line
    image = pixels(job.result(timeout=300)[0])
    assert "dog.safetensors" in switch.result(timeout=300)
    assert torch.equal(image, reference)  # rendered from start to end with the base model
    assert app.engine.adapter.name == "dog.safetensors"
    client.predict("", api_name="/choose_adapter")


def test_generated_images_are_pruned(ui):
    client, app, _, _ = ui
    keep = app.engine.keep_images
    app.engine.keep_images = 2
    try:
        for seed in (1, 2, 3):
            call(client, seed=seed)
        assert len(list(app.engine.out_dir.glob("*.png"))) == 2
    finally:
        app.engine.keep_images = keep


def test_path_traversal_is_refused(ui):
    client, _, _, _ = ui
    for path in ("../../etc", "/etc", "subject/../../.."):  # the typed training-photo folder
        with pytest.raises(Exception, match="outside the allowed folder"):
            train(client, folder=path)
    with pytest.raises(Exception, match="not in the list of choices"):  # the picker only offers listed files
        client.predict("../../etc/passwd", api_name="/choose_adapter")


@pytest.mark.parametrize("overrides,message", [
    (dict(steps=0), "steps must be a whole number from 1"),
    (dict(steps=1e9), "steps must be a whole number from 1 to 150"),
    (dict(n=1e9), "num images must be a whole number from 1 to 8"),
    (dict(guidance=31), "guidance must be between 0 and 30"),
    (dict(width=70), "width must be divisible by 8"),
    (dict(height=100000), "height must be a whole number from 32 to 2048"),
    (dict(strength=3.0), "greater than maximum value 1.5"),  # the slider itself refuses
])
def test_bad_input_gets_a_message(ui, overrides, message):
    client, _, _, _ = ui
    with pytest.raises(Exception, match=message):
        call(client, **overrides)


@pytest.mark.parametrize("field", ["steps", "num_images", "width", "guidance", "strength", "seed"])
def test_nan_and_inf_fields_are_refused(field):
    from singlora_diffusion.webui.requests import BadRequest

    for value in (float("nan"), float("inf"), None):  # what a script (not the browser) can send
        with pytest.raises(BadRequest, match=field.split("_")[0]):
            GenerateRequest("a dog", **{field: value})


def test_empty_prompt(ui):
    client, _, _, _ = ui
    with pytest.raises(Exception, match="Type a prompt first"):
        call(client, prompt="   ")


def test_concurrent_requests_run_one_at_a_time(ui, monkeypatch):
    """A probe records when each render starts and ends: the intervals must not overlap."""
    client, app, _, _ = ui
    client.predict("", api_name="/choose_adapter")
    intervals, real = [], app.engine._render

    def probe(req, tag, report=None):
        start = time.monotonic()
        try:
            return real(req, tag, report)
        finally:
            intervals.append((start, time.monotonic()))
    monkeypatch.setattr(app.engine, "_render", probe)
    jobs = [client.submit("a photo of sks dog", "", 3, 7.5, seed, 1, 64, 64, 1.0, api_name="/generate")
            for seed in (11, 12, 13)]
    results = [job.result(timeout=300) for job in jobs]
    assert len(intervals) == 3 and all(len(r) == 1 for r in results)
    intervals.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:])), intervals
    seeds = sorted(json.loads(Image.open(r[0]["image"]).text["parameters"])["seed"] for r in results)
    assert seeds == [11, 12, 13]


def test_adapter_list_holds_adapter_files_only(ui):
    from singlora_diffusion.webui.handlers import list_adapters

    _, _, adapters, _ = ui
    cache = adapters / "evaluations" / "run1" / "embeddings"
    cache.mkdir(parents=True)
    save_file({"dino": torch.zeros(2, 4)}, str(cache / "real.safetensors"))  # an evaluation embedding cache
    (adapters / "broken.safetensors").write_bytes(b"not a safetensors file")
    listed = list_adapters(adapters)
    assert "dog.safetensors" in listed
    assert not any(name.startswith("evaluations/") or name == "broken.safetensors" for name in listed)


def test_train_and_evaluate_fields_are_bounded_and_failed_starts_leave_no_folder(ui):
    client, _, adapters, _ = ui
    runs = lambda: sorted((adapters / "runs").iterdir()) if (adapters / "runs").is_dir() else []  # noqa: E731
    before = runs()
    with pytest.raises(Exception, match="steps must be a whole number from 1 to 100000"):
        train(client, steps=1e9)
    with pytest.raises(Exception, match="Upload 3-10 photos or give a folder"):  # the demo's: its own subject
        train(client, folder="", preset="sd15")
    assert runs() == before
    with pytest.raises(Exception, match="images per prompt must be a whole number from 1 to 8"):
        client.predict("dog.safetensors", "eval_subject", "dog", "", 1e9, 2, True, api_name="/evaluate")
    with pytest.raises(Exception, match="steps must be a whole number from 1 to 150"):
        client.predict("dog.safetensors", "eval_subject", "dog", "", 1, -3, True, api_name="/evaluate")


def test_train_tab_refuses_a_caption_without_its_image(ui, tmp_path):
    from gradio_client import handle_file

    client, _, adapters, _ = ui
    runs = lambda: sorted((adapters / "runs").iterdir()) if (adapters / "runs").is_dir() else []  # noqa: E731
    before = runs()
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    (tmp_path / "b.txt").write_text("a dog")
    with pytest.raises(Exception, match=r"b\.txt names no uploaded image"):  # the .txt passed Gradio's file types
        train(client, photos=[handle_file(str(tmp_path / "a.png")), handle_file(str(tmp_path / "b.txt"))], folder="")
    assert runs() == before


def test_train_tab_offers_every_adapter_and_the_runnable_optimizers(ui):
    from singlora_diffusion.config import ADAPTERS
    from singlora_diffusion.webui.jobs import offered_optimizers

    _, app, _, _ = ui
    dropdowns = {c["props"].get("elem_id"): [v for v, _ in c["props"]["choices"]]
                 for c in app.config["components"] if c["type"] == "dropdown"}
    assert dropdowns["train_adapter"] == list(ADAPTERS) and "loraplus" in dropdowns["train_adapter"]
    assert dropdowns["train_optimizer"] == offered_optimizers()


def test_folders_made_in_the_same_second_are_distinct(tmp_path):
    from singlora_diffusion.webui.requests import unique_dir

    made = [unique_dir(tmp_path, "20261201-120000") for _ in range(3)]
    assert [p.name for p in made] == ["20261201-120000", "20261201-120000-2", "20261201-120000-3"]
    assert all(p.is_dir() for p in made)


def test_train_tab_class_sets_prompt_and_folder_for_every_preset(tmp_path):
    from singlora_diffusion.webui.jobs import class_args
    from singlora_diffusion.webui.requests import BadRequest

    for preset in ("demo", "sd15", "sdxl", "paper"):
        args = class_args(preset, "cat", tmp_path)
        assert args == ["--class_prompt", "a photo of cat", "--class_data_dir", str(tmp_path / "class_images" / "cat")]
    with pytest.raises(BadRequest, match="sd15 preset uses prior preservation"):
        class_args("sd15", "", tmp_path)
    assert class_args("demo", "", tmp_path) == []  # the demo trains without class images


def test_train_tab_trains_cancels_and_lists_the_adapter(ui, monkeypatch, tmp_path):
    from gradio_client import handle_file

    client, app, adapters, root = ui
    dog3 = Path(__file__).resolve().parents[1] / "singlora_diffusion/assets/dog3"
    subject = adapters / "subject"
    shutil.copytree(dog3, subject)
    # the first run from uploaded photos and one caption, through Gradio's own upload
    (tmp_path / "00.txt").write_text("a photo of sks dog on the grass")
    uploads = [handle_file(str(p)) for p in sorted(dog3.glob("*.jpg"))] + [handle_file(str(tmp_path / "00.txt"))]
    assert "(1 caption)" in train(client, photos=uploads, folder="")
    run = max((adapters / "runs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert (run / "photos" / "00.txt").read_text() == "a photo of sks dog on the grass\n"
    assert "--caption_extension" in app.app_state.job.args
    from singlora_diffusion.webui.handlers import list_adapters

    deadline = time.time() + 300
    while not client.predict(api_name="/training_status")[0].startswith("finished"):
        assert time.time() < deadline
        time.sleep(1)
    assert any(a.startswith("runs/") and a.endswith("singlora_weights.safetensors") for a in list_adapters(adapters))
    # cancelling a long run keeps a checkpoint
    train(client, steps=100000)
    run = max((adapters / "runs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    while not (run / "progress.json").exists():
        assert time.time() < deadline
        time.sleep(0.5)
    # while it trains, the server and the trainer each use their share of the cores
    from singlora_diffusion.webui.jobs import thread_share

    server, trainer = thread_share(os.cpu_count())
    environ = Path(f"/proc/{app.app_state.job.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"OMP_NUM_THREADS={trainer}".encode() in environ
    from singlora_diffusion.webui import engine as engine_module

    seen, real_render = [], engine_module.render

    def probe(*args, **kwargs):
        seen.append(torch.get_num_threads())  # in the thread that renders (OpenMP's count is per thread)
        return real_render(*args, **kwargs)
    monkeypatch.setattr(engine_module, "render", probe)
    call(client)
    assert seen == [server]
    monkeypatch.undo()
    client.predict(api_name="/cancel_training")
    while not client.predict(api_name="/training_status")[0].startswith("cancelled"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert list(run.glob("checkpoint-*/trainer_state.json"))  # Cancel saved a checkpoint


def test_evaluate_tab_shows_the_metric_table_and_plot(ui):
    client, _, adapters, _ = ui
    subject = adapters / "eval_subject"
    if not subject.exists():
        shutil.copytree(Path(__file__).resolve().parents[1] / "singlora_diffusion/assets/dog3", subject)
    table, plot, grid = client.predict("dog.safetensors", "eval_subject", "dog", "a {0} {1} on the beach", 1, 2, True,
                                       api_name="/evaluate")
    assert "RANDOM WEIGHTS" in table and "real" in table.lower() and "DINO" in table
    assert Image.open(plot["path"] if isinstance(plot, dict) else plot).size[0] > 0
    with pytest.raises(Exception, match="outside the allowed folder"):
        client.predict("dog.safetensors", "../..", "dog", "", 1, 2, True, api_name="/evaluate")
    with pytest.raises(Exception, match="(?i)weights"):  # offline without real scoring weights: a clear message
        client.predict("dog.safetensors", "eval_subject", "dog", "a {0} {1}", 1, 2, False, api_name="/evaluate")


# -- the default base: the toy base, with the defaults that suit it ----------------------
def test_a_real_base_keeps_the_real_defaults(ui):
    _, app, _, _ = ui  # tiny:sd15's folder: no toy defaults
    values = values_by_label(app)
    assert (values["Prompt"], values["Guidance"], values["Width"]) == ("a photo of sks dog", 7.5, 64)
    assert values["Class"] == "dog"
