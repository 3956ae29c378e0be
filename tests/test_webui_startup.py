"""The web UI's start: analytics off, the exposure warning, and the starting values on the toy base
(no server: the app is built, not launched)."""
import subprocess
import sys

from singlora_diffusion.webui.requests import GenerateRequest


def test_analytics_off_and_exposure_warning(tmp_path):
    code = ("import os; os.environ.pop('GRADIO_ANALYTICS_ENABLED', None); "
            "import singlora_diffusion.webui.app; print(os.environ['GRADIO_ANALYTICS_ENABLED'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    from singlora_diffusion.webui.app import exposure_warning

    assert exposure_warning("127.0.0.1", False) is None
    assert "reachable from other machines" in exposure_warning("0.0.0.0", False)
    assert "--share" in exposure_warning("127.0.0.1", True)


def values_by_label(app) -> dict:
    """{label: starting value} of the app's form controls (the first control of each label: the Generate tab's)."""
    found = {}
    for block in app.blocks.values():
        label = getattr(block, "label", None)
        if isinstance(label, str) and hasattr(block, "value"):
            found.setdefault(label, block.value)
    return found


def test_the_web_ui_starts_on_the_toy_base(monkeypatch):
    import inspect

    from singlora_diffusion.pipelines import TOY_BASE
    from singlora_diffusion.webui import app as app_module

    assert inspect.signature(app_module.build_app).parameters["base"].default == TOY_BASE
    assert app_module.build_parser().parse_args([]).base == TOY_BASE
    seen = []

    class Launched:  # what main builds, without a server
        def launch(self, **settings):
            seen.append("launched")
    monkeypatch.setattr(app_module, "build_app", lambda base, *args, **kwargs: seen.append(base) or Launched())
    assert app_module.main([]) == 0 and seen == [TOY_BASE, "launched"]


def test_the_toy_base_app_starts_with_toy_prompts_its_32_px_and_the_toy_subject(tmp_path):
    """Built on toy:shapes: the toy defaults reach the controls, and a 32 px image renders."""
    from PIL import Image

    from singlora_diffusion.pipelines import TOY_BASE
    from singlora_diffusion.toy import world
    from singlora_diffusion.webui import handlers
    from singlora_diffusion.webui.app import build_app
    from singlora_diffusion.webui.defaults import profile

    app = build_app(base=TOY_BASE, adapters_dir=tmp_path / "adapters")
    values, toy = values_by_label(app), profile(TOY_BASE)
    assert values["Prompt"] == toy.prompt and values["Guidance"] == 4.0 and values["Steps"] == 20
    assert values["Width"] == values["Height"] == world.SIZE  # the toy base's own 32 px
    examples = next(b for b in app.blocks.values() if type(b).__name__ == "Dataset")
    assert [row[0] for row in examples.samples] == [toy.prompt, world.subject_caption("blue")]
    evaluate_subject = next(v for k, v in values.items() if k.startswith("Subject photos: a folder"))
    assert evaluate_subject == "bundled:toy_subject"
    assert values["Instance prompt"] == "" and values["Preset"] == "demo"  # blank: the demo's own "a sks shape"
    req = GenerateRequest(toy.prompt, steps=2, guidance=toy.guidance, width=world.SIZE, height=world.SIZE)
    (path, _), = handlers.generate(app.app_state, req)
    assert Image.open(path).size == (32, 32)
