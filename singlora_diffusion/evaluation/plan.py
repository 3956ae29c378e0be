"""Phase 1: from an EvalConfig to the subjects to evaluate, checking every input before any model loads."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, NotFound
from .config import EvalConfig
from .generation import ADAPTER, BASE, IMAGES, GeneratedImage, read_images_dir
from .protocol import PROMPTS_FILE, DreamBench, Prompt, make_prompts, read_dreambench, read_prompt_file


@dataclass(frozen=True)
class Subject:
    name: str
    class_name: str | None
    photos: tuple[Path, ...]
    prompts: tuple[Prompt, ...] = ()      # to generate; empty when scoring existing images
    adapter: Path | None = None
    existing: tuple[GeneratedImage, ...] = ()  # --images_dir: images to score as they are

    def methods(self, baseline: bool) -> tuple[str, ...]:
        if self.existing:
            return (IMAGES,)
        return ((BASE,) if baseline or self.adapter is None else ()) + ((ADAPTER,) if self.adapter else ())


@dataclass(frozen=True)
class Plan:
    subjects: tuple[Subject, ...]
    base: str | None                 # None when only existing images are scored
    dreambench_file: Path | None     # --dreambench_dir's prompts_and_classes.txt; None: the bundled copy


def _adapter_in(adapters_dir: Path, subject: str) -> Path | None:
    from ..format import find_adapter_file

    for candidate in (adapters_dir / subject, adapters_dir / f"{subject}.safetensors"):
        if candidate.exists():
            return find_adapter_file(candidate)
    return None


def _trainer_config(adapter: Path) -> dict:
    """The trainer's config.yaml beside the adapter ({} when the adapter is a lone file)."""
    import yaml

    config = adapter.parent / "config.yaml"
    return (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}


def _warn_identifier(adapter: Path, identifier: str) -> None:
    """A training output folder says which prompt the adapter learned; warn if the identifier is not in it."""
    prompt = _trainer_config(adapter).get("instance_prompt")
    if prompt and identifier not in prompt.split():
        warnings.warn(f"{adapter.parent}: the adapter was trained with instance_prompt {prompt!r}, which does not "
                      f"contain --identifier {identifier!r}; pass the identifier it was trained with", UserWarning,
                      stacklevel=3)


def _default_base(adapters: list[Path]) -> str | None:
    """The base model written in the adapters (native metadata, else the trainer's config.yaml)."""
    from ..format import read_metadata

    bases = set()
    for adapter in adapters:
        base = read_metadata(adapter).get("base_model") or _trainer_config(adapter).get(
            "pretrained_model_name_or_path")
        if base:
            bases.add(base)
    if len(bases) > 1:
        raise BadInput(f"the adapters were trained on different bases {sorted(bases)}; pass --base")
    return bases.pop() if bases else None


def _subject(cfg: EvalConfig, name: str, photos_dir: Path, bench: DreamBench, templates, adapter: Path | None,
             images_dir: Path | None) -> Subject:
    from ..images import scan_images

    flag = "--subject_dir" if cfg.subject_dir else "--dreambench_dir"
    # caption files beside a training folder's photos belong there (--caption_extension)
    captions = tuple(p.name for p in photos_dir.glob("*.txt")) if photos_dir.is_dir() else ()
    photos = tuple(scan_images(photos_dir, flag, "subject photos", ignore=captions))
    class_name = cfg.class_name if cfg.subject_dir and cfg.class_name else bench.classes.get(name)
    if images_dir is not None:
        return Subject(name, class_name, photos, existing=tuple(read_images_dir(images_dir, name)))
    needs_class = cfg.prompts == "dreambench" or any("{1}" in t or "{class}" in t for t in templates)
    if needs_class and not class_name:
        raise BadInput(f"subject {name!r}: its class is unknown (not a DreamBench subject name); pass "
                       f"--class_name (e.g. dog, backpack)")
    if cfg.prompts == "dreambench":
        templates = bench.templates_for(class_name)
    if adapter is not None:
        from ..adapters import check_adapter_file

        check_adapter_file(adapter)  # NaN, a lying header, an empty file: refused before any model loads
        _warn_identifier(adapter, cfg.identifier)
    prompts = make_prompts(templates, cfg.identifier, class_name or "")
    if cfg.scorer == "toy":
        from ..toy.scorer import check_prompts

        check_prompts([p.text for p in prompts])
    return Subject(name, class_name, photos, prompts, adapter)


def _one_subject(cfg: EvalConfig, templates) -> list[Subject]:
    """--subject_dir: one folder of photos, with an adapter or existing images."""
    from ..format import find_adapter_file

    from ..bundled import resolve_data_dir

    photos_dir = Path(resolve_data_dir(cfg.subject_dir))
    name = cfg.subject_name or photos_dir.resolve().name
    adapter = find_adapter_file(cfg.adapter) if cfg.adapter else None
    images_dir = Path(cfg.images_dir) if cfg.images_dir else None
    return [_subject(cfg, name, photos_dir, read_dreambench(), templates, adapter, images_dir)]


def _chosen_names(cfg: EvalConfig, root: Path, folders: dict, adapters: dict, images_root: Path | None) -> list[str]:
    """--subjects, else every subject with an adapter (--adapters_dir) or images (--images_dir), else all."""
    if cfg.subjects:
        names = [s.strip() for s in cfg.subjects.split(",") if s.strip()]
        unknown = [n for n in names if n not in folders]
        if unknown:
            raise BadInput(f"--subjects {', '.join(unknown)}: no such folder in {root} "
                           f"(it has {', '.join(folders) or 'none'})")
        return names
    if cfg.adapters_dir is not None:
        return list(adapters)
    if images_root is not None:
        return [n for n in folders if (images_root / n).is_dir()]
    return list(folders)


def _many_subjects(cfg: EvalConfig, templates) -> tuple[list[Subject], Path | None]:
    """--dreambench_dir: one folder of photos per subject; (subjects, its prompts_and_classes.txt)."""
    root = Path(cfg.dreambench_dir)
    if not root.is_dir():
        raise NotFound(f"--dreambench_dir {root}: no such folder")
    dreambench_file = root / PROMPTS_FILE if (root / PROMPTS_FILE).is_file() else None
    bench = read_dreambench(dreambench_file)
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    adapters_dir = Path(cfg.adapters_dir) if cfg.adapters_dir else None
    images_root = Path(cfg.images_dir) if cfg.images_dir else None
    for flag, folder in (("--adapters_dir", adapters_dir), ("--images_dir", images_root)):
        if folder is not None and not folder.is_dir():
            raise NotFound(f"{flag} {folder}: no such folder")
    adapters = {n: a for n in folders if adapters_dir and (a := _adapter_in(adapters_dir, n))}
    names = _chosen_names(cfg, root, folders, adapters, images_root)
    if not names:
        raise BadInput(f"no subject to evaluate: {root} has subject folders {', '.join(folders) or 'none'}"
                       + (f", {adapters_dir} has adapters for none of them (expected <subject>/ or "
                          f"<subject>.safetensors)" if adapters_dir else ""))
    if adapters_dir is not None and (lacking := [n for n in names if n not in adapters]):
        raise NotFound(f"--adapters_dir {adapters_dir}: no adapter for {', '.join(lacking)} "
                       f"(expected <subject>/ holding one, or <subject>.safetensors)")
    if images_root is not None and (lacking := [n for n in names if not (images_root / n).is_dir()]):
        raise NotFound(f"--images_dir {images_root}: no folder for {', '.join(lacking)}")
    subjects = [_subject(cfg, n, folders[n], bench, templates, adapters.get(n),
                         images_root / n if images_root else None) for n in names]
    return subjects, dreambench_file


def make_plan(cfg: EvalConfig) -> Plan:
    """Subjects, adapters, prompts and photos, all checked; nothing heavy is loaded."""
    from ..files import check_writable
    from ..pipelines import check_base_exists

    check_writable(cfg.out, "--out")
    if cfg.prompts == "toy":
        from ..toy.scorer import toy_templates

        templates = toy_templates()
    else:
        templates = () if cfg.prompts == "dreambench" else read_prompt_file(cfg.prompts)
    if cfg.subject_dir is not None:
        subjects, dreambench_file = _one_subject(cfg, templates), None
    else:
        subjects, dreambench_file = _many_subjects(cfg, templates)
    base = None
    if cfg.generates:
        base = cfg.base or _default_base([s.adapter for s in subjects if s.adapter])
        if base is None:
            raise BadInput("--base is required to generate images (the adapter does not name its base model)")
        check_base_exists(base)  # test names (tiny:sd15) are accepted: built on first use
    return Plan(tuple(subjects), base, dreambench_file)
