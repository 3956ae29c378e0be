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

from .helpers import adapted_pipeline

ARGS = dict(negative="", steps=3, guidance=7.5, seed=5, n=1, width=64, height=64, strength=1.0)


def call(client, prompt="a photo of sks dog", api="/generate", **overrides):
    v = {**ARGS, **overrides}
    return client.predict(prompt, v["negative"], v["steps"], v["guidance"], v["seed"], v["n"], v["width"],
                          v["height"], v["strength"], api_name=api)


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


def test_upload_accepted_and_rejected(ui, tmp_path):
    from gradio_client import handle_file

    client, _, adapters, _ = ui
    good = tmp_path / "uploaded_dog.safetensors"
    shutil.copyfile(adapters / "dog.safetensors", good)
    dropdown, status = client.predict(handle_file(str(good)), api_name="/upload_adapter")
    assert "uploads/uploaded_dog.safetensors" in status
    from singlora_diffusion.export import export_kohya

    kohya = export_kohya(adapters / "dog.safetensors", tmp_path / "dog_kohya.safetensors")  # a standard LoRA file
    _, status = client.predict(handle_file(str(kohya)), api_name="/upload_adapter")
    assert "uploads/dog_kohya.safetensors" in status
    assert len(call(client)) == 1
    bad = tmp_path / "not_an_adapter.safetensors"
    save_file({"some.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(Exception, match="not an adapter for this base model"):
        client.predict(handle_file(str(bad)), api_name="/upload_adapter")
    assert not (adapters / "uploads" / bad.name).exists()
    pickle = tmp_path / "evil.safetensors"
    torch.save({"x": 1}, pickle)  # pickled bytes under a safetensors name: never unpickled
    with pytest.raises(Exception, match="not an adapter"):
        client.predict(handle_file(str(pickle)), api_name="/upload_adapter")
    assert len(call(client)) == 1  # the app keeps working


def test_path_traversal_is_refused(ui):
    client, _, _, _ = ui
    for path in ("../../etc", "/etc", "subject/../../.."):  # the typed training-photo folder
        with pytest.raises(Exception, match="outside the allowed folder"):
            client.predict(None, path, "a photo of sks dog", "dog", "demo", 2, api_name="/train")
    with pytest.raises(Exception, match="not in the list of choices"):  # the picker only offers listed files
        client.predict("../../etc/passwd", api_name="/choose_adapter")


@pytest.mark.parametrize("overrides,message", [
    (dict(steps=0), "steps must be a whole number from 1"),
    (dict(width=70), "width must be divisible by 8"),
    (dict(height=100000), "height must be a whole number from 64 to 2048"),
    (dict(strength=3.0), "greater than maximum value 1.5"),  # the slider itself refuses
])
def test_bad_input_gets_a_message(ui, overrides, message):
    client, _, _, _ = ui
    with pytest.raises(Exception, match=message):
        call(client, **overrides)


def test_empty_prompt(ui):
    client, _, _, _ = ui
    with pytest.raises(Exception, match="Type a prompt first"):
        call(client, prompt="   ")


def test_concurrent_requests_run_one_at_a_time(ui, monkeypatch):
    """A probe records when each render starts and ends: the intervals must not overlap."""
    client, app, _, _ = ui
    client.predict("", api_name="/choose_adapter")
    intervals, real = [], app.engine._render

    def probe(req, tag):
        start = time.monotonic()
        try:
            return real(req, tag)
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
    from singlora_diffusion.webui.app import list_adapters

    _, _, adapters, _ = ui
    cache = adapters / "evaluations" / "run1" / "embeddings"
    cache.mkdir(parents=True)
    save_file({"dino": torch.zeros(2, 4)}, str(cache / "real.safetensors"))  # an evaluation embedding cache
    (adapters / "broken.safetensors").write_bytes(b"not a safetensors file")
    listed = list_adapters(adapters)
    assert "dog.safetensors" in listed
    assert not any(name.startswith("evaluations/") or name == "broken.safetensors" for name in listed)


def test_train_tab_class_sets_prompt_and_folder_for_every_preset(tmp_path):
    from singlora_diffusion.webui.app import class_args
    from singlora_diffusion.webui.requests import BadRequest

    for preset in ("demo", "sd15", "sdxl", "paper"):
        args = class_args(preset, "cat", tmp_path)
        assert args == ["--class_prompt", "a photo of cat", "--class_data_dir", str(tmp_path / "class_images" / "cat")]
    with pytest.raises(BadRequest, match="sd15 preset uses prior preservation"):
        class_args("sd15", "", tmp_path)
    assert class_args("demo", "", tmp_path) == []  # the demo trains without class images


def test_train_tab_trains_cancels_and_lists_the_adapter(ui):
    client, _, adapters, root = ui
    subject = adapters / "subject"
    shutil.copytree(Path(__file__).resolve().parents[1] / "singlora_diffusion/assets/dog3", subject)
    assert "Training in" in client.predict(None, "subject", "a photo of sks dog", "dog", "demo", 2, api_name="/train")
    from singlora_diffusion.webui.app import list_adapters

    deadline = time.time() + 300
    while not client.predict(api_name="/training_status")[0].startswith("finished"):
        assert time.time() < deadline
        time.sleep(1)
    assert any(a.startswith("runs/") and a.endswith("singlora_weights.safetensors") for a in list_adapters(adapters))
    # cancelling a long run keeps a checkpoint
    client.predict(None, "subject", "a photo of sks dog", "dog", "demo", 100000, api_name="/train")
    run = max((adapters / "runs").iterdir())
    while not (run / "progress.json").exists():
        assert time.time() < deadline
        time.sleep(0.5)
    client.predict(api_name="/cancel_training")
    while not client.predict(api_name="/training_status")[0].startswith("cancelled"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert list(run.glob("checkpoint-*/trainer_state.json"))  # Cancel saved a checkpoint


def test_analytics_off_and_exposure_warning(tmp_path):
    code = ("import os; os.environ.pop('GRADIO_ANALYTICS_ENABLED', None); "
            "import singlora_diffusion.webui.app; print(os.environ['GRADIO_ANALYTICS_ENABLED'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    from singlora_diffusion.webui.app import exposure_warning

    assert exposure_warning("127.0.0.1", False) is None
    assert "reachable from other machines" in exposure_warning("0.0.0.0", False)
    assert "--share" in exposure_warning("127.0.0.1", True)


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
