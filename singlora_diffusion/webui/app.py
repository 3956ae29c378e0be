"""`python webui/app.py` / `singlora webui`: generate, compare, train and evaluate in the browser."""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never phones home

from .requests import BadRequest, GenerateRequest, confine  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def list_adapters(adapters_dir: Path) -> list[str]:
    """Adapter files under adapters_dir, as paths relative to it (training outputs included).

    Only files whose header says adapter (a SingLoRA file or LoRA keys): evaluation
    caches and other tensors are .safetensors too. Checkpoints are left out.
    """
    from ..generate import adapter_kind

    found = sorted(p for p in adapters_dir.rglob("*.safetensors")
                   if "checkpoint-" not in str(p.relative_to(adapters_dir)) and adapter_kind(p) is not None)
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


def build_app(base: str = "tiny:sd15", adapters_dir: str | Path = "outputs", work_dir: str | Path | None = None):
    import gradio as gr

    from .engine import Engine

    adapters_dir = Path(adapters_dir).resolve()
    adapters_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir or adapters_dir / "webui").resolve()
    engine = Engine(base, work_dir / "images")
    native = engine.pipe.unet.config.sample_size * engine.pipe.vae_scale_factor  # the model's own size
    state = {"job": None}

    def _request(prompt, negative, steps, guidance, seed, n, width, height, strength):
        return GenerateRequest(prompt, negative, steps, guidance, seed, n, width, height, strength)

    def _errors(fn):
        def wrapped(*args):
            try:
                return fn(*args)
            except BadRequest as e:
                raise gr.Error(str(e)) from None
        wrapped.__name__ = fn.__name__
        return wrapped

    @_errors
    def choose_base(base_id):
        engine.load_base(base_id.strip())
        return f"Loaded {engine.base}."

    @_errors
    def choose_adapter(name):
        engine.set_adapter(confine(adapters_dir, name) if name else None)
        return f"Adapter: {name or 'none (base model)'}"

    @_errors
    def upload_adapter(file):
        if file is None:
            return gr.update(), "No file."
        src = Path(file if isinstance(file, str) else file.name)
        if src.suffix != ".safetensors":
            raise BadRequest(f"{src.name}: only .safetensors adapters are accepted.")
        dest = adapters_dir / "uploads" / src.name
        dest.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dest)
        try:
            engine.set_adapter(dest)
        except BadRequest:
            dest.unlink(missing_ok=True)  # do not list a file that cannot be used
            raise
        name = str(dest.relative_to(adapters_dir))
        return gr.update(choices=[""] + list_adapters(adapters_dir), value=name), f"Adapter: {name}"

    @_errors
    def generate(*values):
        paths = engine.generate(_request(*values))
        return [(str(p), f"seed {values[4]}") for p in paths]

    @_errors
    def compare(*values):
        base, adapted = engine.compare(_request(*values))
        return [(str(p), "base") for p in base] + [(str(p), "adapter") for p in adapted]

    def refresh():
        return gr.update(choices=[""] + list_adapters(adapters_dir))

    # -- training ------------------------------------------------------------------------
    @_errors
    def start_training(photos, folder, instance_prompt, class_name, preset, steps):
        from .jobs import PRESETS, TrainingJob

        if state["job"] is not None and state["job"].status().state == "running":
            raise BadRequest("A training run is already going; cancel it or wait.")
        if not (instance_prompt or "").strip():
            raise BadRequest("Give an instance prompt, e.g. 'a photo of sks dog'.")
        run = adapters_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
        if photos:
            data = run / "photos"
            data.mkdir(parents=True)
            for f in photos:
                src = Path(f if isinstance(f, str) else f.name)
                shutil.copyfile(src, data / src.name)
        elif folder:
            data = confine(adapters_dir, folder)
        else:
            raise BadRequest("Upload 3-10 photos or give a folder.")
        args = ["--config", PRESETS[preset], "--instance_data_dir", str(data), "--instance_prompt",
                instance_prompt.strip(), "--max_train_steps", str(int(steps)),
                *class_args(preset, class_name, adapters_dir)]
        state["job"] = TrainingJob(run, args)
        return f"Training in {run} ..."

    def poll():
        job = state["job"]
        if job is None:
            return "No training run yet.", "", None
        s = job.status()
        text = f"{s.state}: step {s.step}/{s.total}" + (f", loss {s.loss:.4f}" if s.loss is not None else "")
        if s.message:
            text += f"\n{s.message}"
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
        subject_dir = confine(adapters_dir, subject) if subject else None
        if subject_dir is None or not subject_dir.is_dir():
            raise BadRequest(f"Give the folder of the subject's real photos inside {adapters_dir}.")
        out = adapters_dir / "evaluations" / time.strftime("%Y%m%d-%H%M%S")
        out.mkdir(parents=True)
        prompts = "dreambench"
        if (prompts_text or "").strip():
            prompts = str(out / "prompts.txt")
            Path(prompts).write_text(prompts_text.strip() + "\n")
        try:
            cfg = EvalConfig(out=str(out), subject_dir=str(subject_dir), class_name=class_name or None,
                             adapter=str(confine(adapters_dir, adapter_name)), base=engine.base, prompts=prompts,
                             num_images=int(num_images), steps=int(steps), allow_random_weights=bool(random_weights))
            files = evaluate(cfg)
        except (ValueError, FileNotFoundError, MissingWeightsError) as e:
            raise BadRequest(str(e)) from None
        return files["report.md"].read_text(), str(files["per_prompt.png"]), str(files["grid.png"])

    def cancel():
        if state["job"] is not None:
            state["job"].cancel()
        return "Cancelling: a checkpoint is saved first."

    with gr.Blocks(title="singlora-diffusion") as app:
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
            status = gr.Markdown("Adapter: none (base model)")
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
            gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gallery")
            inputs = [prompt, negative, steps, guidance, seed, n, width, height, strength]
            base_btn.click(choose_base, base_box, status, api_name="load_base")
            adapter.change(choose_adapter, adapter, status, api_name="choose_adapter")
            refresh_btn.click(refresh, None, adapter, api_name=False)
            upload.upload(upload_adapter, upload, [adapter, status], api_name="upload_adapter")
            dice.click(lambda: random.randrange(2 ** 32), None, seed, api_name=False)
            gen_btn.click(generate, inputs, gallery, api_name="generate")
            cmp_btn.click(compare, inputs, gallery, api_name="compare")
        with gr.Tab("Train"):
            photos = gr.File(label="Subject photos (3-10)", file_count="multiple", file_types=["image"])
            folder = gr.Textbox(label=f"...or a folder inside {adapters_dir}")
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
                eval_subject = gr.Textbox(label=f"Subject photos: a folder inside {adapters_dir}")
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
                           api_name="evaluate")
    app.queue(default_concurrency_limit=1)  # one heavy job at a time; the rest wait their turn, in order
    app.engine = engine
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
    args = p.parse_args(argv)
    warning = exposure_warning(args.host, args.share)
    if warning:
        print(warning, file=sys.stderr)
    app = build_app(args.base, args.adapters_dir)
    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               allowed_paths=[str(Path(args.adapters_dir).resolve())])
    return 0
