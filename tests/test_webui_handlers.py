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
