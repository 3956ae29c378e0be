"""`python webui/app.py` / `singlora webui`: generate, compare, train and evaluate in the browser.

This file owns the page's layout (build_app and one function per tab, wiring each control
to a callback in callbacks.py) and the command line (main).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..pipelines import TOY_BASE, native_size

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_app(base: str = TOY_BASE, adapters_dir: str | Path = "outputs", work_dir: str | Path | None = None,
              max_request_seconds: float | None = None, compile: bool = False):
    """The Gradio app; app.engine is the loaded model, app.app_state what every handler shares (handlers.AppState).

    The forms start at values that suit `base` (defaults.py: the toy base's shapes, or a real base's dog).
    """
    import gradio as gr

    from .callbacks import Callbacks
    from .handlers import open_state

    state = open_state(base, adapters_dir, work_dir, max_request_seconds, compile)
    cb = Callbacks(state)
    # Everything that uses or changes the loaded model waits in one line ("engine"): a
    # switch or an upload never lands in the middle of a generation.
    one_line = dict(concurrency_id="engine", concurrency_limit=1)
    # Gradio's own copies of served images: files older than a day go, checked hourly.
    with gr.Blocks(title="singlora-diffusion", delete_cache=(3600, 86400)) as app:
        gr.Markdown("# singlora-diffusion\nGenerate with SingLoRA (or any LoRA) adapters, compare with the base "
                    "model, train a new adapter.")
        with gr.Tab("Generate"):
            _generate_tab(gr, cb, one_line)
        with gr.Tab("Train"):
            _train_tab(gr, cb)
        with gr.Tab("Evaluate"):
            _evaluate_tab(gr, cb, one_line)
    app.queue(default_concurrency_limit=1)  # one job per event at a time; the engine's events share one line
    app.engine, app.app_state = state.engine, state  # for tests and scripts
    return app


def _generate_tab(gr, cb, one_line: dict) -> None:
    from .defaults import profile
    from .handlers import picker_choices

    engine = cb.state.engine
    suited = profile(engine.base)
    native = native_size(engine.pipe)
    with gr.Row():
        base_box = gr.Textbox(value=engine.base, label=f"Base model (hub id, local folder, single-file checkpoint, "
                                                       f"or {TOY_BASE})")
        base_btn = gr.Button("Load base")
    with gr.Row():
        adapter = gr.Dropdown(choices=picker_choices(cb.state), value="", label="Adapter", allow_custom_value=False)
        refresh_btn = gr.Button("Refresh list")
        upload = gr.File(label="Upload adapter (.safetensors)", file_types=[".safetensors"])
        partial = gr.Checkbox(label="Load files that fit this base only in part", value=False)
    status = gr.Markdown(cb.status())
    strength = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Adapter strength")
    prompt = gr.Textbox(label="Prompt", value=suited.prompt)
    gr.Examples([[suited.prompt], [suited.subject_prompt]], inputs=[prompt], api_visibility="private",
                label="Prompts to try (with an adapter picked, Compare with base shows what it adds)")
    negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        steps = gr.Number(value=suited.steps, label="Steps", precision=0)
        guidance = gr.Number(value=suited.guidance, label="Guidance")
        seed = gr.Number(value=0, label="Seed", precision=0)
        dice = gr.Button("Random seed")
        n = gr.Number(value=1, label="Images", precision=0)
        width = gr.Number(value=native, label="Width", precision=0)
        height = gr.Number(value=native, label="Height", precision=0)
    with gr.Row():
        gen_btn = gr.Button("Generate", variant="primary")
        cmp_btn = gr.Button("Compare with base")
        stop_btn = gr.Button("Cancel")
    gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gallery")
    inputs = [prompt, negative, steps, guidance, seed, n, width, height, strength]
    base_btn.click(cb.choose_base, base_box, [adapter, status], api_name="load_base", **one_line)
    adapter.change(cb.choose_adapter, [adapter, partial], status, api_name="choose_adapter", **one_line)
    refresh_btn.click(cb.refresh_picker, None, adapter, api_name=False)
    upload.upload(cb.upload_adapter, [upload, partial], [adapter, status], api_name="upload_adapter", **one_line)
    dice.click(cb.random_seed, None, seed, api_name=False)
    gen_btn.click(cb.generate, inputs, gallery, api_name="generate", **one_line)
    cmp_btn.click(cb.compare, inputs, gallery, api_name="compare", **one_line)
    # outside the queue: it must run while a generation holds the line
    stop_btn.click(cb.cancel_generation, None, status, api_name="cancel_generation", queue=False)


def _train_tab(gr, cb) -> None:
    import dataclasses

    from ..config import ADAPTERS
    from .handlers import optimizer_note
    from .jobs import bucket_default, offered_optimizers, preset_setting, preset_subject, trainer_default
    from .requests import MAX_CAPTION_BYTES, TrainRequest

    photos = gr.File(label=f"Subject photos (3-10), and captions if you like: a.txt (UTF-8, up to "
                           f"{MAX_CAPTION_BYTES // 2**10} KB) describes a.jpg. None, and no folder: the preset's "
                           f"own subject (demo: {preset_subject('demo')})", file_count="multiple",
                     file_types=["image", ".txt"])
    folder = gr.Textbox(label="...or a folder inside the adapters folder, or a shipped one (bundled:toy_subject); "
                              "a.txt beside a.jpg is its caption")
    s = {}  # TrainRequest's fields -> their controls
    with gr.Row():
        s["instance_prompt"] = gr.Textbox(label="Instance prompt", value="", placeholder=(
            f"blank: the preset's (demo: {preset_setting('demo', 'instance_prompt')})"))
        s["class_name"] = gr.Textbox(label="Class (for class images; the demo trains without)", value="")
        s["preset"] = gr.Dropdown(["demo", "sd15", "sdxl", "paper"], value="demo", label="Preset")
        s["steps"] = gr.Number(value=300, label="Steps", precision=0)
    with gr.Row():
        s["adapter"] = gr.Dropdown(list(ADAPTERS), value="singlora", label="Adapter to train",
                                   elem_id="train_adapter")
        s["loraplus_lr_ratio"] = gr.Number(value=trainer_default("loraplus_lr_ratio"), visible=False,
                                           label="LoRA+ ratio: B's learning rate over A's")
        s["optimizer"] = gr.Dropdown(offered_optimizers(), value="adamw", label="Optimizer",
                                     elem_id="train_optimizer")
        s["learning_rate"] = gr.Number(value=None, label="Learning rate (0: the preset's)")
    note = gr.Markdown(optimizer_note())
    with gr.Row():
        s["enable_bucket"] = gr.Checkbox(label="Buckets: keep each photo's aspect ratio (no square crop)")
        s["caption_dropout_rate"] = gr.Number(value=trainer_default("caption_dropout_rate"), minimum=0, maximum=1,
                                              label="Caption dropout rate (share of steps on the empty prompt)")
        s["use_ema"] = gr.Checkbox(label="EMA of the adapter weights (validation and the saved adapter use it)")
    with gr.Accordion("Advanced: buckets and EMA (0: the trainer's defaults)", open=False):
        with gr.Row():
            s["min_bucket_reso"] = gr.Number(value=None, precision=0,
                                             label=f"Smallest bucket side (0: {bucket_default('min_bucket_reso')})")
            s["max_bucket_reso"] = gr.Number(value=None, precision=0,
                                             label=f"Largest bucket side (0: {bucket_default('max_bucket_reso')})")
            s["bucket_reso_steps"] = gr.Number(value=None, precision=0, label=(
                f"Bucket sides are multiples of (0: {bucket_default('bucket_reso_steps')})"))
            s["ema_decay"] = gr.Number(value=None, label=f"EMA decay (0: {trainer_default('ema_decay')})")
    with gr.Row():
        train_btn = gr.Button("Train", variant="primary")
        cancel_btn = gr.Button("Cancel")
    progress_bar = gr.HTML()
    progress = gr.Textbox(label="Progress", lines=3)
    latest = gr.Image(label="Latest validation image", type="filepath")
    fields = [f.name for f in dataclasses.fields(TrainRequest)]
    assert sorted(fields) == sorted(s), "every TrainRequest field needs its control"
    # the API's order: photos, folder, then TrainRequest's fields (Callbacks.start_training builds it so)
    train_btn.click(cb.start_training, [photos, folder, *(s[name] for name in fields)], progress, api_name="train")
    s["adapter"].change(cb.adapter_changed, s["adapter"], s["loraplus_lr_ratio"], api_name=False)
    s["optimizer"].change(cb.optimizer_changed, [s["optimizer"], s["learning_rate"]], [s["learning_rate"], note],
                          api_name=False)
    cancel_btn.click(cb.cancel_training, None, progress, api_name="cancel_training")
    gr.Timer(1.0).tick(cb.training_status, None, [progress, progress_bar, latest], api_name="training_status",
                       queue=False)


def _evaluate_tab(gr, cb, one_line: dict) -> None:
    from .defaults import profile
    from .handlers import list_adapters

    suited = profile(cb.state.engine.base)
    gr.Markdown("DINO, CLIP-I and CLIP-T as the DreamBench protocol defines them (see docs/evaluation.md). "
                "Real scoring weights come from timm/open_clip (downloaded once, or local files via "
                "eval/evaluate.py); offline, only a smoke test with random weights can run. "
                f"On the toy base ({TOY_BASE}) the toy world's own scorer measures subject similarity, subject "
                "classified and background as prompted: toy-world scores, not DreamBench's.")
    with gr.Row():
        eval_adapter = gr.Dropdown(choices=list_adapters(cb.state.adapters_dir), label="Adapter")
        eval_refresh = gr.Button("Refresh list")
        eval_subject = gr.Textbox(label="Subject photos: a folder inside the adapters folder, or a shipped one "
                                        "(bundled:toy_subject)", value=suited.eval_subject)
        eval_class = gr.Textbox(label="Class", value=suited.eval_class)
    eval_prompts = gr.Textbox(label="Prompts, one per line with {0} = identifier, {1} = class "
                                    "(empty: the 25 DreamBench prompts; on the toy base the subject on each "
                                    "toy background)", lines=3)
    with gr.Row():
        eval_n = gr.Number(value=1, label="Images per prompt", precision=0)
        eval_steps = gr.Number(value=20, label="Steps", precision=0)
        eval_random = gr.Checkbox(label="Allow random scoring weights (smoke test: scores meaningless)")
        eval_btn = gr.Button("Evaluate", variant="primary")
    eval_table = gr.Markdown()
    with gr.Row():
        eval_plot = gr.Image(label="Per-prompt scores", type="filepath")
        eval_grid = gr.Image(label="Real (left) and generated images", type="filepath")
    eval_refresh.click(cb.refresh_eval_list, None, eval_adapter, api_name=False)
    eval_btn.click(cb.run_evaluation, [eval_adapter, eval_subject, eval_class, eval_prompts, eval_n, eval_steps,
                                       eval_random], [eval_table, eval_plot, eval_grid], api_name="evaluate",
                   **one_line)


def exposure_warning(host: str, share: bool) -> str | None:
    if share or host not in LOOPBACK:
        return (f"WARNING: the UI will be reachable from other machines ({'--share' if share else host}); "
                f"anyone who reaches it can run models on this machine.")
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="webui/app.py", description=__doc__.splitlines()[0])
    p.add_argument("--base", default=TOY_BASE, help=f"hub id, local diffusers folder, single-file checkpoint, or a "
                   f"test name; default {TOY_BASE}, the pretrained toy base shipped in the package (offline)")
    p.add_argument("--adapters_dir", default="outputs", help="where adapters are listed from and runs go")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="public gradio.live link (opt-in)")
    p.add_argument("--max_request_seconds", type=float, default=None,
                   help="refuse a generation estimated to run longer (default 600, at this machine's measured speed)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet / transformer (regional where "
                   "diffusers allows): the first render after start and after each adapter change compiles")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warning = exposure_warning(args.host, args.share)
    if warning:
        print(warning, file=sys.stderr)
    app = build_app(args.base, args.adapters_dir, max_request_seconds=args.max_request_seconds, compile=args.compile)
    from .engine import MAX_UPLOAD_BYTES

    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               allowed_paths=[str(Path(args.adapters_dir).resolve())],
               max_file_size=MAX_UPLOAD_BYTES)  # refused while it streams in, not after the copy
    return 0
