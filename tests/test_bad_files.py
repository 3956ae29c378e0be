"""Every command refuses a bad adapter file in one line naming the key, before loading the base."""
import pytest

from singlora_diffusion import cli
from singlora_diffusion.format import save_adapter

from .bad_files import LORA, PARTIAL, SINGLORA, write_bad_files
from .helpers import adapted_pipeline


@pytest.fixture(scope="module")
def files(tiny_pipeline_dir, tmp_path_factory):
    base = tiny_pipeline_dir("sd15")
    _, components, cfg = adapted_pipeline(base)
    root = tmp_path_factory.mktemp("bad")
    good = save_adapter(root / "good.safetensors", components, str(base), cfg.target_modules,
                        cfg.text_encoder_target_modules)
    return base, root, write_bad_files(good, root / "files")


def commands(base, adapter, out):
    return {
        "inspect": ["inspect", str(adapter)],
        "export-diffusers": ["export", str(adapter), "--to", "diffusers", str(out / "d")],
        "export-kohya": ["export", str(adapter), "--to", "kohya", str(out / "k.safetensors")],
        "merge": ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out / "m")],
        "generate": ["generate", "--base", str(base), "--adapter", str(adapter), "--prompt", "x", "--steps", "1",
                     "--width", "64", "--height", "64", "--out", str(out / "g.png")],
    }


def run(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # our lines only: diffusers' loading progress bars share stderr
    return code, [line for line in err.splitlines() if line.startswith(("singlora", "/"))]


@pytest.mark.parametrize("name", sorted(SINGLORA))
def test_every_command_refuses_a_bad_singlora_file(name, files, tmp_path, capsys, monkeypatch):
    base, _, bad = files
    for command, argv in commands(base, bad[name], tmp_path).items():
        if name == "wrong_arch" and command in ("inspect", "export-diffusers", "export-kohya"):
            continue  # a well-formed file for some other model: only a base can tell
        if name != "wrong_arch":  # file-level faults are refused before any base model loads
            monkeypatch.setattr("singlora_diffusion.pipelines.load_pipeline",
                                lambda *a, **k: pytest.fail(f"{command} loaded the base for {name}"))
        code, err = run(argv, capsys)
        assert code == 2 and len(err) == 1, (command, err)
        assert SINGLORA[name] in err[0] and str(bad[name]) in err[0], (command, err)
        assert not any(tmp_path.iterdir()), f"{command} wrote output for {name}"
        monkeypatch.undo()


@pytest.mark.parametrize("name", sorted(LORA))
def test_generate_refuses_a_bad_lora_file(name, files, tmp_path, capsys):
    base, _, bad = files
    code, err = run(commands(base, bad[name], tmp_path)["generate"], capsys)
    assert code == 2 and len(err) == 1 and LORA[name] in err[0], err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("name", PARTIAL)
def test_partial_files_load_on_request_with_counts(name, files, tmp_path, capsys):
    base, _, bad = files
    code, err = run(commands(base, bad[name], tmp_path)["generate"] + ["--allow_partial"], capsys)
    assert code == 0 and (tmp_path / "g.png").is_file()
    assert any("partial load: 64 of 108 modules fit this base; 44 skipped" in line for line in err) \
        if name == "wrong_arch" else any("partial load: 76 of 108" in line for line in err), err


def test_good_files_pass(files, tmp_path, capsys):
    base, root, bad = files
    for adapter in (root / "good.safetensors", bad["kohya"]):
        code, err = run(commands(base, adapter, tmp_path)["generate"], capsys)
        assert code == 0 and not [line for line in err if "partial" in line], err


def test_merge_refuses_an_overflow_and_keeps_the_earlier_folder(files, tmp_path, capsys):
    base, root, _ = files
    good = root / "good.safetensors"
    argv = commands(base, good, tmp_path)["merge"]
    assert run(argv, capsys)[0] == 0
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "m").rglob("*"))
    code, err = run(argv + ["--scale", "1e30", "--save_precision", "fp16"], capsys)
    assert code == 2 and "is not finite in torch.float16" in err[0]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "m").rglob("*")) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    code, err = run(argv[:-1] + [str(tmp_path / "notes")], capsys)
    assert code == 2 and "is not a pipeline folder" in err[0] and (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["nan", "rank_lie", "empty", "kohya_nan", "kohya_empty"])
def test_evaluate_refuses_a_bad_adapter_before_any_model(name, files, tmp_path, monkeypatch, capsys):
    from singlora_diffusion.bundled import bundled_subject
    from singlora_diffusion.evaluation import run as evaluation

    _, _, bad = files
    for loader in ("load_base", "load_scorer"):
        monkeypatch.setattr(evaluation, loader, lambda *a, **k: pytest.fail("a model was loaded"))
    code = evaluation.main(["--adapter", str(bad[name]), "--subject_dir", str(bundled_subject()), "--out",
                            str(tmp_path / "r"), "--allow_random_weights"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate.py")]
    assert code == 2 and len(err) == 1 and {**SINGLORA, **LORA}[name] in err[0], err
