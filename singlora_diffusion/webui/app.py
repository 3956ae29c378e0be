"""`python webui/app.py` / `singlora webui`: generate, compare, train and evaluate in the browser."""
from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never phones home

from .requests import (MAX_IMAGES, MAX_STEPS, MAX_TRAIN_STEPS, BadRequest, GenerateRequest, confine,  # noqa: E402
                       scrub_paths, unique_dir, whole)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def list_adapters(adapters_dir: Path) -> list[str]:
    """Adapter files under adapters_dir, as paths relative to it (training outputs included).

    Only files whose header says adapter (a SingLoRA file or LoRA keys): evaluation
    caches and other tensors are .safetensors too. Checkpoints are left out.
    """
    from ..adapters import adapter_kind

    def listed(p: Path) -> bool:
        parts = p.relative_to(adapters_dir).parts
        # checkpoints, and hidden folders (uploads being checked)
        return not any(part.startswith(("checkpoint-", ".")) for part in parts) and adapter_kind(p) is not None
    found = sorted(p for p in adapters_dir.rglob("*.safetensors") if listed(p))
    return [str(p.relative_to(adapters_dir)) for p in found]


def class_args(preset: str, class_name: str | None, adapters_dir: Path) -> list[str]:
    """The Train tab's class for every preset: its prompt and its own class-image folder.

    Presets with prior preservation name a class folder of their own (dog images for
    sd15): a cat subject must not train against them, so the folder follows the class.
    Class images are generated once per class and reused by later runs.
    """
    from ..training.config import load_yaml
    from .jobs import PRESETS

    name = (class_name or "").strip()
    if not name:
        if load_yaml(PRESETS[preset]).get("with_prior_preservation"):
            raise BadRequest(f"The {preset} preset uses prior preservation: give the subject's class, e.g. 'dog'.")
        return []
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "class"
    return ["--class_prompt", f"a photo of {name}", "--class_data_dir", str(adapters_dir / "class_images" / slug)]


def build_app(base: str = "tiny:sd15", adapters_dir: str | Path = "outputs", work_dir: str | Path | None = None,
              max_request_seconds: float | None = None):
    import gradio as gr

    from .engine import MAX_REQUEST_SECONDS, Engine
    from .jobs import thread_share

    adapters_dir = Path(adapters_dir).resolve()
    adapters_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir or adapters_dir / "webui").resolve()
    engine = Engine(base, work_dir / "images", max_seconds=max_request_seconds or MAX_REQUEST_SECONDS)
    native = engine.pipe.unet.config.sample_size * engine.pipe.vae_scale_factor  # the model's own size
    state = {"job": None}
    server_threads, trainer_threads = thread_share(os.cpu_count() or 1)

    def _request(prompt, negative, steps, guidance, seed, n, width, height, strength):
        engine.threads = server_threads if _training() else None  # the trainer has the other cores
        return GenerateRequest(prompt, negative, steps, guidance, seed, n, width, height, strength)

    def _errors(fn):
        """User mistakes become a message without server paths; the handler's signature is kept (gr.Progress)."""
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except BadRequest as e:
                raise gr.Error(scrub_paths(str(e), adapters_dir)) from None
        return wrapped

    def _training() -> bool:
        return state["job"] is not None and state["job"].status().state == "running"

    def _status() -> str:
        if engine.adapter is None:
            return "Adapter: none (base model)"
        return f"Adapter: {_picked() or engine.adapter.name}" + (f" ({engine.note})" if engine.note else "")

    def _picked() -> str:
        a = engine.adapter
        return str(a.relative_to(adapters_dir)) if a is not None and adapters_dir in a.parents else ""

    @_errors
    def choose_base(base_id):
        engine.load_base((base_id or "").strip())  # waits for a running generation (engine lock)
        return gr.update(value=_picked()), _status()  # a new base drops the adapter: the picker says so

    @_errors
    def choose_adapter(name, allow_partial=False):
        engine.set_adapter(confine(adapters_dir, name) if name else None, bool(allow_partial))
        return _status()

    @_errors
    def upload_adapter(file, allow_partial=False):
        if file is None:
            return gr.update(), "No file."
        dest = engine.add_upload(Path(file if isinstance(file, str) else file.name), adapters_dir / "uploads",
                                 bool(allow_partial))
        return gr.update(choices=[""] + list_adapters(adapters_dir), value=str(dest.relative_to(adapters_dir))), _status()

    def _report(progress):
        return lambda done, total: progress((done, total), desc="denoising")

    @_errors
    def generate(prompt, negative, steps, guidance, seed, n, width, height, strength, progress=gr.Progress()):
        req = _request(prompt, negative, steps, guidance, seed, n, width, height, strength)
        return [(str(p), f"seed {req.seed}") for p in engine.generate(req, _report(progress))]

    @_errors
    def compare(prompt, negative, steps, guidance, seed, n, width, height, strength, progress=gr.Progress()):
        req = _request(prompt, negative, steps, guidance, seed, n, width, height, strength)
        base, adapted = engine.compare(req, _report(progress))
        return [(str(p), "base") for p in base] + [(str(p), "adapter") for p in adapted]

    def cancel_generation():
        return "Cancelling after this step." if engine.cancel() else "Nothing is being generated."

    def refresh():
        return gr.update(choices=[""] + list_adapters(adapters_dir))

    # -- training ------------------------------------------------------------------------
    @_errors
    def start_training(photos, folder, instance_prompt, class_name, preset, steps):
        from .jobs import PRESETS, TrainingJob

        if _training():
            raise BadRequest("A training run is already going; cancel it or wait.")
        if not (instance_prompt or "").strip():
            raise BadRequest("Give an instance prompt, e.g. 'a photo of sks dog'.")
        if preset not in PRESETS:
            raise BadRequest(f"Pick a preset: {', '.join(PRESETS)}.")
        steps = whole("steps", steps, 1, MAX_TRAIN_STEPS)
        extra = class_args(preset, class_name, adapters_dir)
        if not photos:
            if not folder:
                raise BadRequest("Upload 3-10 photos or give a folder.")
            data = confine(adapters_dir, folder)
            if not data.is_dir():
                raise BadRequest(f"{folder!r} is not a folder inside the adapters folder.")
        # everything checked: only now a run folder exists
        run = unique_dir(adapters_dir / "runs", time.strftime("%Y%m%d-%H%M%S"))
        if photos:
            data = run / "photos"
            data.mkdir()
            for f in photos:
                src = Path(f if isinstance(f, str) else f.name)
                shutil.copyfile(src, data / src.name)
        args = ["--config", PRESETS[preset], "--instance_data_dir", str(data), "--instance_prompt",
                instance_prompt.strip(), "--max_train_steps", str(steps), *extra]
        state["job"] = TrainingJob(run, args, threads=trainer_threads)
        return f"Training in {run.relative_to(adapters_dir)} ..."

    def poll():
        job = state["job"]
        if job is None:
            return "No training run yet.", "", None
        s = job.status()
        text = f"{s.state}: step {s.step}/{s.total}" + (f", loss {s.loss:.4f}" if s.loss is not None else "")
        if s.message:
            text += f"\n{scrub_paths(s.message, adapters_dir)}"
        if s.state == "finished":
            text += "\nThe adapter is in the Generate tab's list (refresh it)."
        bar = f'<progress value="{s.step}" max="{max(s.total, 1)}" style="width:100%"></progress>'
        return text, bar, s.validation_image

    # -- evaluation ----------------------------------------------------------------------
    @_errors
    def run_evaluation(adapter_name, subject, class_name, prompts_text, num_images, steps, random_weights):
        from ..evaluation.config import EvalConfig
        from ..evaluation.models import MissingWeightsError
        from ..evaluation.run import evaluate

        if not adapter_name:
            raise BadRequest("Pick an adapter to evaluate.")
        num_images = whole("images per prompt", num_images, 1, MAX_IMAGES)
        steps = whole("steps", steps, 1, MAX_STEPS)
        subject_dir = confine(adapters_dir, subject) if subject else None
        if subject_dir is None or not subject_dir.is_dir():
            raise BadRequest("Give the folder of the subject's real photos inside the adapters folder.")
        out = unique_dir(adapters_dir / "evaluations", time.strftime("%Y%m%d-%H%M%S"))
        prompts = "dreambench"
        if (prompts_text or "").strip():
            prompts = str(out / "prompts.txt")
            Path(prompts).write_text(prompts_text.strip() + "\n")
        try:
            cfg = EvalConfig(out=str(out), subject_dir=str(subject_dir), class_name=class_name or None,
                             adapter=str(confine(adapters_dir, adapter_name)), base=engine.base, prompts=prompts,
                             num_images=num_images, steps=steps, allow_random_weights=bool(random_weights))
            files = evaluate(cfg)
        except (ValueError, FileNotFoundError, MissingWeightsError) as e:
            raise BadRequest(str(e)) from None
        return files["report.md"].read_text(), str(files["per_prompt.png"]), str(files["grid.png"])

    def cancel():
        if state["job"] is not None:
            state["job"].cancel()
        return "Cancelling: a checkpoint is saved first."

    # Gradio's own copies of served images: files older than a day go, checked hourly.
    with gr.Blocks(title="singlora-diffusion", delete_cache=(3600, 86400)) as app:
        gr.Markdown("# singlora-diffusion\nGenerate with SingLoRA (or any LoRA) adapters, compare with the base "
                    "model, train a new adapter.")
        with gr.Tab("Generate"):
            with gr.Row():
                base_box = gr.Textbox(value=base, label="Base model (hub id, local folder, or tiny:sd15)")
                base_btn = gr.Button("Load base")
            with gr.Row():
                adapter = gr.Dropdown(choices=[""] + list_adapters(adapters_dir), value="", label="Adapter",
                                      allow_custom_value=False)
                refresh_btn = gr.Button("Refresh list")
                upload = gr.File(label="Upload adapter (.safetensors)", file_types=[".safetensors"])
                partial = gr.Checkbox(label="Load files that fit this base only in part", value=False)
            status = gr.Markdown(_status())
            strength = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Adapter strength")
            prompt = gr.Textbox(label="Prompt", value="a photo of sks dog")
            negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                steps = gr.Number(value=20, label="Steps", precision=0)
                guidance = gr.Number(value=7.5, label="Guidance")
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
            # Everything that uses or changes the loaded model waits in one line ("engine"): a
            # switch or an upload never lands in the middle of a generation.
            one_line = dict(concurrency_id="engine", concurrency_limit=1)
            base_btn.click(choose_base, base_box, [adapter, status], api_name="load_base", **one_line)
            adapter.change(choose_adapter, [adapter, partial], status, api_name="choose_adapter", **one_line)
            refresh_btn.click(refresh, None, adapter, api_name=False)
            upload.upload(upload_adapter, [upload, partial], [adapter, status], api_name="upload_adapter", **one_line)
            dice.click(lambda: random.randrange(2 ** 32), None, seed, api_name=False)
            gen_btn.click(generate, inputs, gallery, api_name="generate", **one_line)
            cmp_btn.click(compare, inputs, gallery, api_name="compare", **one_line)
            # outside the queue: it must run while a generation holds the line
            stop_btn.click(cancel_generation, None, status, api_name="cancel_generation", queue=False)
        with gr.Tab("Train"):
            photos = gr.File(label="Subject photos (3-10)", file_count="multiple", file_types=["image"])
            folder = gr.Textbox(label="...or a folder inside the adapters folder")
            with gr.Row():
                instance_prompt = gr.Textbox(label="Instance prompt", value="a photo of sks dog")
                class_name = gr.Textbox(label="Class", value="dog")
                preset = gr.Dropdown(["demo", "sd15", "sdxl", "paper"], value="demo", label="Preset")
                train_steps = gr.Number(value=300, label="Steps", precision=0)
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary")
                cancel_btn = gr.Button("Cancel")
            progress_bar = gr.HTML()
            progress = gr.Textbox(label="Progress", lines=3)
            latest = gr.Image(label="Latest validation image", type="filepath")
            train_btn.click(start_training, [photos, folder, instance_prompt, class_name, preset, train_steps],
                            progress, api_name="train")
            cancel_btn.click(cancel, None, progress, api_name="cancel_training")
            gr.Timer(1.0).tick(poll, None, [progress, progress_bar, latest], api_name="training_status",
                               queue=False)
        with gr.Tab("Evaluate"):
            gr.Markdown("DINO, CLIP-I and CLIP-T as the DreamBench protocol defines them (see docs/evaluation.md). "
                        "Real scoring weights come from timm/open_clip (downloaded once, or local files via "
                        "eval/evaluate.py); offline, only a smoke test with random weights can run.")
            with gr.Row():
                eval_adapter = gr.Dropdown(choices=list_adapters(adapters_dir), label="Adapter")
                eval_refresh = gr.Button("Refresh list")
                eval_subject = gr.Textbox(label="Subject photos: a folder inside the adapters folder")
                eval_class = gr.Textbox(label="Class", value="dog")
            eval_prompts = gr.Textbox(label="Prompts, one per line with {0} = identifier, {1} = class "
                                            "(empty: the 25 DreamBench prompts)", lines=3)
            with gr.Row():
                eval_n = gr.Number(value=1, label="Images per prompt", precision=0)
                eval_steps = gr.Number(value=20, label="Steps", precision=0)
                eval_random = gr.Checkbox(label="Allow random scoring weights (smoke test: scores meaningless)")
                eval_btn = gr.Button("Evaluate", variant="primary")
            eval_table = gr.Markdown()
            with gr.Row():
                eval_plot = gr.Image(label="Per-prompt scores", type="filepath")
                eval_grid = gr.Image(label="Real (left) and generated images", type="filepath")
            eval_refresh.click(lambda: gr.update(choices=list_adapters(adapters_dir)), None, eval_adapter,
                               api_name=False)
            eval_btn.click(run_evaluation, [eval_adapter, eval_subject, eval_class, eval_prompts, eval_n,
                                            eval_steps, eval_random], [eval_table, eval_plot, eval_grid],
                           api_name="evaluate", **one_line)
    app.queue(default_concurrency_limit=1)  # one job per event at a time; the engine's events share one line
    app.engine = engine
    app.training = state  # {"job": the running TrainingJob or None}, for tests and scripts
    return app


def exposure_warning(host: str, share: bool) -> str | None:
    if share or host not in LOOPBACK:
        return (f"WARNING: the UI will be reachable from other machines ({'--share' if share else host}); "
                f"anyone who reaches it can run models on this machine.")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="webui/app.py", description=__doc__)
    p.add_argument("--base", default="tiny:sd15", help="hub id, local diffusers folder, or tiny:sd15 (offline)")
    p.add_argument("--adapters_dir", default="outputs", help="where adapters are listed from and runs go")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="public gradio.live link (opt-in)")
    p.add_argument("--max_request_seconds", type=float, default=None,
                   help="refuse a generation estimated to run longer (default 600, at this machine's measured speed)")
    args = p.parse_args(argv)
    warning = exposure_warning(args.host, args.share)
    if warning:
        print(warning, file=sys.stderr)
    app = build_app(args.base, args.adapters_dir, max_request_seconds=args.max_request_seconds)
    from .engine import MAX_UPLOAD_BYTES

    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               allowed_paths=[str(Path(args.adapters_dir).resolve())],
               max_file_size=MAX_UPLOAD_BYTES)  # refused while it streams in, not after the copy
    return 0
