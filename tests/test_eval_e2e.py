"""eval/evaluate.py end to end on a tiny pipeline with random scoring weights (CPU, offline)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from singlora_diffusion.bundled import bundled_subject
from singlora_diffusion.evaluation import generation, run
from singlora_diffusion.evaluation.scorer import RANDOM_STAMP, Scorer, Weights, load_scorer
from singlora_diffusion.format import save_adapter

from .helpers import adapted_pipeline, free_port

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted(bundled_subject().glob("*.jpg"))
TEXTS = ["a sks dog in the jungle", "a sks dog on the beach"]
# batch 1: an image regenerated alone (the resume test) is then computed exactly as it was the first
# time; in a batch of 4 its float rounding may differ by a bit on some CPUs (seen on an AMD EPYC).
FAST = ["--num_images", "1", "--steps", "2", "--resolution", "64", "--allow_random_weights", "--batch_size", "1"]


def _cos(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float(u @ v / np.sqrt((u @ u) * (v @ v)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def prompts_file(workdir):
    path = workdir / "prompts.txt"
    path.write_text("a {0} {1} in the jungle\na {identifier} {class} on the beach\n")
    return path


@pytest.fixture(scope="module")
def adapter_file(tiny_pipeline_dir, workdir):
    _, components, _ = adapted_pipeline(tiny_pipeline_dir(), text_encoders=False)
    return save_adapter(workdir / "adapter.safetensors", components, base_model=str(tiny_pipeline_dir()))


@pytest.fixture(scope="module")
def scorer():
    return load_scorer(Weights("dino", "random"), Weights("clip", "random"), "cpu", True)


def count_calls(mp) -> dict:
    """Count images rendered, pipelines loaded, images and texts embedded."""
    calls = {"render_batch": 0, "load_base": 0, "embed_images": 0, "embed_texts": 0}

    def wrap(owner, name, count=lambda *a, **k: 1):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            calls[name] += count(*args, **kwargs)
            return original(*args, **kwargs)
        mp.setattr(owner, name, counted)

    wrap(generation, "render_batch", lambda pipe, images, cfg: len(images))
    wrap(run, "load_base")
    wrap(Scorer, "embed_images", lambda self, sources, *a, **k: len(list(sources)))
    wrap(Scorer, "embed_texts", lambda self, texts, *a, **k: len(texts))
    return calls


def evaluate(args, mp=None) -> tuple[int, dict]:
    with pytest.MonkeyPatch.context() as patch:
        calls = count_calls(mp or patch)
        code = run.main([str(a) for a in args])
    return code, calls


@pytest.fixture(scope="module")
def report(adapter_file, prompts_file, workdir):
    out = workdir / "report"
    code, calls = evaluate(["--adapter", adapter_file, "--subject_dir", bundled_subject(), "--prompts", prompts_file,
                            "--baseline", "--out", out, *FAST])
    assert code == 0
    return out, calls


def test_report_files_exist_and_parse(report):
    out, calls = report
    assert calls == {"render_batch": 4, "load_base": 1, "embed_images": 6 + 4, "embed_texts": 2}
    scores = json.loads((out / "scores.json").read_text())
    assert scores["stamp"] == RANDOM_STAMP and scores["random_weights"] is True
    assert set(scores["overall"]["methods"]) == {"base", "adapter"}
    assert scores["overall"]["methods"]["adapter"]["images"] == 2
    assert scores["options"]["clip_t_identifier"] == "remove" and scores["options"]["seeds"] == [0]
    assert "CLS token" in scores["models"]["dino"]["embedding"] and "256" in scores["models"]["dino"]["preprocessing"]
    dog = scores["subjects"]["dog3"]
    assert dog["class"] == "dog" and len(dog["photos"]) == 6
    assert set(dog["methods"]["adapter"]["prompts"]) == set(TEXTS)
    assert {im["clip_t_text"] for im in scores["images"]} == {"a dog in the jungle", "a dog on the beach"}
    for im in scores["images"]:
        assert all(-1 <= im[k] <= 1 for k in ("dino", "clip_i", "clip_t"))
    rows = list(csv.DictReader((out / "scores.csv").open(encoding="utf-8")))
    assert len(rows) == 4 and {r["weights"] for r in rows} == {RANDOM_STAMP}
    assert {float(r["dino"]) for r in rows} == {im["dino"] for im in scores["images"]}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f"**{RANDOM_STAMP}**" in md
    real = scores["overall"]["real_vs_real"]
    assert f"| real images (real vs real) | {real['dino']:.3f} | {real['clip_i']:.3f} | — |" in md
    assert "| adapter |" in md and "| base model (no adapter) |" in md
    for name in ("grid.png", "per_prompt.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.width > 200 and image.height > 100


def test_scores_match_embeddings_computed_afresh(report, scorer):
    out, _ = report
    scores = json.loads((out / "scores.json").read_text())
    real = scorer.embed_images(PHOTOS)
    for key, model in (("dino", "dino"), ("clip_i", "clip")):
        r = real[model].numpy()
        expected = np.mean([_cos(r[j], r[k]) for j in range(6) for k in range(6) if j != k])
        assert scores["subjects"]["dog3"]["real_vs_real"][key] == pytest.approx(expected, abs=1e-6)
    image = next(im for im in scores["images"] if im["method"] == "adapter")
    gen = scorer.embed_images([image["file"]])
    assert image["dino"] == pytest.approx(np.mean([_cos(gen["dino"][0], r) for r in real["dino"]]), abs=1e-6)
    assert image["clip_i"] == pytest.approx(np.mean([_cos(gen["clip"][0], r) for r in real["clip"]]), abs=1e-6)
    text = scorer.embed_texts([image["clip_t_text"]])[0]
    assert image["clip_t"] == pytest.approx(_cos(gen["clip"][0], text), abs=1e-6)


def test_images_are_saved_with_prompt_and_seed_and_the_adapter_changes_them(report):
    out, _ = report
    for method in ("base", "adapter"):
        folder = out / "images" / "dog3" / method
        manifest = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
        assert [(m["file"], m["prompt"], m["seed"]) for m in manifest] == [(f"{t}_0.png", t, 0) for t in TEXTS]
        with Image.open(folder / f"{TEXTS[1]}_0.png") as image:
            assert image.text["prompt"] == TEXTS[1] and image.text["seed"] == "0"
            assert image.text["method"] == method
    base = np.asarray(Image.open(out / "images/dog3/base" / f"{TEXTS[0]}_0.png"), np.int16)
    adapted = np.asarray(Image.open(out / "images/dog3/adapter" / f"{TEXTS[0]}_0.png"), np.int16)
    assert np.abs(base - adapted).mean() > 1  # same seed, the adapter made a difference


def test_resume_does_not_redo_images_or_scores(report, adapter_file, prompts_file, tmp_path):
    out = tmp_path / "report"
    shutil.copytree(report[0], out)
    args = ["--adapter", adapter_file, "--subject_dir", bundled_subject(), "--prompts", prompts_file, "--baseline",
            "--out", out, *FAST]
    code, calls = evaluate(args)
    assert code == 0 and calls == {"render_batch": 0, "load_base": 0, "embed_images": 0, "embed_texts": 0}
    before = json.loads((out / "scores.json").read_text())
    (out / "images/dog3/adapter" / f"{TEXTS[1]}_0.png").unlink()  # as if killed before this image
    code, calls = evaluate(args)
    # regenerated from the same seed, byte for byte: its cached embedding (keyed by content) still holds
    assert code == 0 and calls == {"render_batch": 1, "load_base": 1, "embed_images": 0, "embed_texts": 0}
    assert json.loads((out / "scores.json").read_text())["overall"] == before["overall"]
    # an image replaced by another one is scored again, and only that one
    shutil.copy(out / "images/dog3/base" / f"{TEXTS[0]}_0.png", out / "images/dog3/adapter" / f"{TEXTS[0]}_0.png")
    code, calls = evaluate(args)
    assert code == 0 and calls == {"render_batch": 0, "load_base": 0, "embed_images": 1, "embed_texts": 0}
    after = json.loads((out / "scores.json").read_text())
    replaced = [im for im in after["images"] if im["prompt"] == TEXTS[0]]
    assert replaced[0]["dino"] == replaced[1]["dino"]  # the base image's score, now under both methods


def test_resuming_with_other_generation_settings_is_refused(report, adapter_file, prompts_file, tmp_path, capsys):
    out = tmp_path / "report"
    shutil.copytree(report[0], out)
    code, calls = evaluate(["--adapter", adapter_file, "--subject_dir", bundled_subject(), "--prompts", prompts_file,
                            "--baseline", "--out", out, *FAST, "--steps", "3"])
    assert code == 2 and calls["load_base"] == 0
    assert "holds images made with other settings (steps: 2 on disk, 3 now)" in capsys.readouterr().err


def test_images_dir_by_manifest_or_by_file_names(report, tmp_path):
    out, _ = report
    scores = json.loads((out / "scores.json").read_text())
    expected = {im["prompt"]: im for im in scores["images"] if im["method"] == "adapter"}
    by_names = tmp_path / "by_names"
    shutil.copytree(out / "images/dog3/adapter", by_names, ignore=shutil.ignore_patterns("*.json*"))
    by_manifest = tmp_path / "by_manifest"
    by_manifest.mkdir()
    with (by_manifest / "manifest.jsonl").open("w") as f:
        for i, text in enumerate(TEXTS):
            shutil.copy(out / "images/dog3/adapter" / f"{text}_0.png", by_manifest / f"img{i}.png")
            f.write(json.dumps({"file": f"img{i}.png", "prompt": text}) + "\n")
    for folder in (by_names, by_manifest):
        code, calls = evaluate(["--images_dir", folder, "--subject_dir", bundled_subject(), "--out",
                                tmp_path / f"r_{folder.name}", "--allow_random_weights"])
        assert code == 0 and calls["render_batch"] == 0 and calls["load_base"] == 0
        got = json.loads((tmp_path / f"r_{folder.name}" / "scores.json").read_text())
        assert list(got["overall"]["methods"]) == ["images"]
        for im in got["images"]:
            for key in ("dino", "clip_i", "clip_t"):
                assert im[key] == pytest.approx(expected[im["prompt"]][key], abs=1e-6)
        assert (tmp_path / f"r_{folder.name}" / "grid.png").is_file()
    # many subjects: --images_dir holds one folder per subject of --dreambench_dir
    bench, generated = tmp_path / "bench", tmp_path / "generated"
    shutil.copytree(bundled_subject(), bench / "dog3")
    shutil.copytree(by_names, generated / "dog3")
    code, _ = evaluate(["--images_dir", generated, "--dreambench_dir", bench, "--out", tmp_path / "r_bench",
                        "--allow_random_weights"])
    got = json.loads((tmp_path / "r_bench" / "scores.json").read_text())
    assert code == 0 and got["subjects"]["dog3"]["class"] == "dog"
    assert {im["prompt"]: im["dino"] for im in got["images"]} == pytest.approx(
        {t: im["dino"] for t, im in expected.items()}, abs=1e-6)


@pytest.mark.parametrize("kind", ["singlora", "diffusers lora"])
def test_the_base_model_is_exact_again_after_an_adapter(kind, adapter_file, tiny_pipeline_dir, tmp_path):
    """Base images of a later subject are made after an earlier subject's adapter came off."""
    from singlora_diffusion.export import export_diffusers
    from singlora_diffusion.pipelines import load_pipeline

    path = adapter_file if kind == "singlora" else export_diffusers(adapter_file, tmp_path / "lora")
    pipe = load_pipeline(tiny_pipeline_dir())
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with generation.adapter_applied(pipe, Path(path), 1.0):
        assert set(pipe.unet.state_dict()) != set(before)  # the adapter is in
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_an_image_identical_to_the_real_one_scores_exactly_one(scorer, tmp_path):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    subject, images = tmp_path / "dog3", tmp_path / "generated"
    subject.mkdir()
    images.mkdir()
    shutil.copy(PHOTOS[0], subject / PHOTOS[0].name)
    shutil.copy(PHOTOS[0], images / "a sks dog_0.jpg")                  # identical to the only real photo
    shutil.copy(PHOTOS[1], images / "a sks dog on the beach_3.jpg")     # another photo of the same dog
    for option, text in (("remove", "a dog"), ("keep", "a sks dog")):
        out = tmp_path / option
        assert run.main(["--images_dir", str(images), "--subject_dir", str(subject), "--out", str(out),
                         "--allow_random_weights", "--clip_t_identifier", option]) == 0
        scores = json.loads((out / "scores.json").read_text())
        same, other = sorted(scores["images"], key=lambda im: im["seed"])
        assert (same["prompt"], same["seed"], same["clip_t_text"]) == ("a sks dog", 0, text)
        assert same["dino"] == pytest.approx(1.0, abs=1e-5) and same["clip_i"] == pytest.approx(1.0, abs=1e-5)
        assert other["dino"] < 0.999 and other["clip_i"] < 0.999
        assert scores["subjects"]["dog3"]["real_vs_real"] == {"dino": None, "clip_i": None}  # one photo, no pair
        # CLIP-T as open_clip computes it for that pair, with its own transform and tokenizer
        model = scorer.clip
        preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        with torch.no_grad():
            i = model.encode_image(preprocess(Image.open(images / "a sks dog_0.jpg")).unsqueeze(0))[0]
            t = model.encode_text(open_clip.get_tokenizer("ViT-B-32")([text]))[0]
        assert same["clip_t"] == pytest.approx(_cos(i, t), abs=1e-5)


def test_offline_without_weights_stops_before_any_diffusion_model(adapter_file, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("load_base", "load_scorer"):
        monkeypatch.setattr(run, name, lambda *a, **k: pytest.fail("a model was loaded"))
    code = run.main(["--adapter", str(adapter_file), "--subject_dir", str(bundled_subject()), "--out",
                     str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "evaluate.py: error: the weights of 2 scoring model(s) are missing" in err
    assert "--dino_weights FILE" in err and "--clip_weights FILE" in err and "--allow_random_weights" in err


@pytest.mark.parametrize("args, message", [
    (["--out", "X"], "exactly one of --subject_dir"),
    (["--out", "X", "--subject_dir", "NOPE"], "--subject_dir NOPE: no such folder"),
    (["--out", "X", "--subject_dir", "PHOTOS", "--adapter", "NOPE.safetensors"], "no adapter at NOPE.safetensors"),
    (["--out", "X", "--subject_dir", "PHOTOS", "--images_dir", "PHOTOS", "--baseline"], "does not combine"),
    (["--out", "X", "--subject_dir", "PHOTOS", "--subject_name", "mine", "--base", "B"], "its class is unknown"),
])
def test_bad_inputs_stop_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [str(bundled_subject()) if a == "PHOTOS" else a for a in args]
    monkeypatch.setattr(run, "load_scorer", lambda *a, **k: pytest.fail("a model was loaded"))
    assert run.main(args) == 2
    assert message in capsys.readouterr().err


def test_two_processes_share_the_work_and_cover_every_image_once(adapter_file, prompts_file, tmp_path):
    bench, adapters = tmp_path / "dreambench", tmp_path / "adapters"
    for subject, photos in (("dog3", PHOTOS[:3]), ("rc_car", PHOTOS[3:])):
        (bench / subject).mkdir(parents=True)
        for p in photos:
            shutil.copy(p, bench / subject / p.name)
    adapters.mkdir()
    shutil.copy(adapter_file, adapters / "dog3.safetensors")
    (adapters / "rc_car").mkdir()
    shutil.copy(adapter_file, adapters / "rc_car" / "singlora_weights.safetensors")  # a training output folder
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "eval/evaluate.py"),
           "--dreambench_dir", str(bench), "--adapters_dir", str(adapters), "--prompts", str(prompts_file),
           "--baseline", "--out", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = [json.loads(line) for rank in (0, 1)
            for line in (out / "logs" / f"generated.{rank}.jsonl").read_text().splitlines()]
    made = [(e["subject"], e["method"], e["prompt"], e["seed"]) for e in logs]
    expected = {(s, m, t.replace("dog", c), 0) for s, c in (("dog3", "dog"), ("rc_car", "toy"))
                for m in ("base", "adapter") for t in TEXTS}
    assert len(made) == len(set(made)) == 8 and set(made) == expected
    assert {e["process"][0] for e in logs} == {0, 1} and all(e["process"][1] == 2 for e in logs)
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["subjects"]) == {"dog3", "rc_car"} and scores["subjects"]["rc_car"]["class"] == "toy"
    assert scores["overall"]["methods"]["adapter"]["subjects"] == 2
    assert "a [V] [class] in the jungle" in scores["prompts"]
    assert (out / "grids" / "rc_car.png").is_file() and (out / "grid.png").is_file()
    assert done.stdout.count("real images (real vs real)") == 1  # the summary, printed by the main process


def test_embedding_cache_reuses_rows_only_under_the_same_identity(tmp_path):
    from singlora_diffusion.evaluation.scoring import cached_embeddings

    computed = []

    def compute(missing):
        computed.append(list(missing))
        return {"text": torch.tensor([[float(i), 1.0] for i in missing])}

    path = tmp_path / "texts.safetensors"
    first = cached_embeddings(path, "models A", ["x", "y"], compute)
    again = cached_embeddings(path, "models A", ["y", "z", "x"], compute)   # only z is new
    assert computed == [[0, 1], [1]]
    assert torch.equal(again["text"][0], first["text"][1]) and torch.equal(again["text"][2], first["text"][0])
    cached_embeddings(path, "models B", ["x"], compute)                     # other weights: recomputed
    assert computed[-1] == [0]
    with pytest.raises(KeyError, match="no embedding for 'w'"):
        cached_embeddings(path, "models B", ["w"])                          # reading never computes


def test_an_images_dir_keeps_quiet_about_our_own_files_and_names_the_others(tmp_path):
    from singlora_diffusion.evaluation.generation import IMAGES, GeneratedImage, read_images_dir
    from singlora_diffusion.evaluation.protocol import Prompt

    folder = tmp_path / "generated"
    folder.mkdir()
    shutil.copy(PHOTOS[0], folder / "a sks dog_0.jpg")
    (folder / "settings.json").write_text("{}")       # written by the evaluation beside its images
    (folder / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="notes.txt") as caught:
        images = read_images_dir(folder, "dog3")
    assert not any("settings.json" in str(w.message) for w in caught)
    assert images == [GeneratedImage("dog3", IMAGES, Prompt("a sks dog"), 0, folder / "a sks dog_0.jpg")]


def test_the_evaluation_uses_the_core_not_the_trainer_and_imports_cheaply():
    import ast

    for path in (ROOT / "singlora_diffusion" / "evaluation").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                assert not module.startswith(("..training", "singlora_diffusion.training")), (path.name, module)
    # the web UI imports the public surface; the heavy libraries load only when a phase runs
    code = ("import sys; from singlora_diffusion.evaluation import EvalConfig, evaluate, MissingWeightsError, main, "
            "parse_config; heavy = [m for m in ('timm', 'open_clip', 'diffusers', 'accelerate') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
