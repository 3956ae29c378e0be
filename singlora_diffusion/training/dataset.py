"""What a run trains on: its concepts (subjects), their images, each image's prompt and bucket.

    --instance_data_dir/--instance_prompt/--class_*    one concept, from the flags
    --concepts_list FILE                               several (YAML or JSON list of mappings)
            |
    load_concepts ─> [Concept] ─> training_items ─> [Item(path, prompt, concept, size)]
                                   (captions beside the images, repeats, buckets)

Everything here reads only files (image headers, captions, the concepts file), so a bad
input fails with one line before any model loads (training.build.validate calls it).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..bundled import resolve_data_dir
from ..errors import BadInput, NotFound
from .data import Size, check_sizes, make_buckets, nearest_bucket, read_caption, upright_size


@dataclass(frozen=True)
class Concept:
    """One subject: the keys of a --concepts_list entry (diffusers' multi-subject names)."""
    instance_data_dir: str
    instance_prompt: str
    class_prompt: str | None = None
    class_data_dir: str | None = None
    num_class_images: int | None = None    # None: --num_class_images
    repeats: int = 1                       # kohya: each image counts this many times per epoch
    validation_prompt: str | None = None   # None: the instance prompt (with --validation_prompt set)


_FIELDS = [f.name for f in dataclasses.fields(Concept)]
_REQUIRED = [f.name for f in dataclasses.fields(Concept) if f.default is dataclasses.MISSING]


@dataclass(frozen=True)
class Item:
    """One training image of the stream: where it is, what it is called, where it trains."""
    path: Path
    prompt: str       # its caption, else its concept's instance prompt
    concept: int      # index into the run's concepts
    size: Size        # (width, height) it trains at: its bucket, or the square resolution


def load_concepts(cfg) -> list[Concept]:
    """The run's concepts: the --concepts_list file's entries, or the one the flags describe."""
    if not cfg.concepts_list:
        return [Concept(cfg.instance_data_dir, cfg.instance_prompt, cfg.class_prompt, cfg.class_data_dir,
                        cfg.num_class_images)]
    path = Path(cfg.concepts_list)
    if not path.is_file():
        raise NotFound(f"--concepts_list {path}: no such file; pass a YAML or JSON list of concepts")
    try:
        # YAML 1.2 reads JSON too; json.loads first gives JSON files JSON's own error messages.
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise BadInput(f"--concepts_list {path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'} "
                       f"({str(e).splitlines()[0]})") from None
    if not isinstance(data, list) or not data:
        raise BadInput(f"--concepts_list {path}: expected a non-empty list of concepts (mappings with "
                       f"{', '.join(_REQUIRED)}), got {type(data).__name__}")
    return [_concept(path, i, entry, cfg) for i, entry in enumerate(data)]


def _concept(path: Path, i: int, entry, cfg) -> Concept:
    where = f"--concepts_list {path}, concept {i + 1}"
    if not isinstance(entry, dict):
        raise BadInput(f"{where}: expected a mapping of {', '.join(_FIELDS)}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(_FIELDS)}")
    missing = [k for k in _REQUIRED if not entry.get(k)]
    if missing:
        raise BadInput(f"{where}: {missing[0]!r} is missing; every concept needs {' and '.join(_REQUIRED)}")
    for key in ("repeats", "num_class_images"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BadInput(f"{where}: {key} must be a whole number >= 1, got {value!r}")
    if cfg.with_prior_preservation and not (entry.get("class_prompt") and entry.get("class_data_dir")):
        raise BadInput(f"{where}: --with_prior_preservation needs class_prompt and class_data_dir in every concept")
    # YAML reads `instance_prompt: 1234` as a number: the text fields are text
    text = {k: str(v) for k, v in entry.items() if v is not None and k not in ("repeats", "num_class_images")}
    concept = Concept(**{**entry, **text})
    return dataclasses.replace(concept, instance_data_dir=resolve_data_dir(concept.instance_data_dir))


def num_class_images(cfg, concept: Concept) -> int:
    return cfg.num_class_images if concept.num_class_images is None else concept.num_class_images


STOPWORDS = {"a", "an", "the", "of", "photo", "picture", "image", "in", "on", "with", "and", "my", "this"}


def identifier_words(concept: Concept) -> set[str]:
    """The words that name the subject: the instance prompt's words the class prompt lacks (e.g. `sks`
    in "a photo of sks dog" vs "a photo of dog"); without a class prompt, its words less STOPWORDS."""
    words = set(concept.instance_prompt.lower().split())
    return words - set((concept.class_prompt or "").lower().split()) if concept.class_prompt else words - STOPWORDS


def training_items(cfg, concepts: list[Concept], images: list[list[Path]]) -> list[Item]:
    """Every (image, repeat) of every concept, with its prompt and training size.

    `images[c]`: concept c's usable image files (images.scan_images). Captions are read here,
    so a broken caption file stops the run before any model loads; captions that do not name
    their subject get one warning for the whole run.
    """
    buckets = (make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
               if cfg.enable_bucket else None)
    items, unnamed = [], []
    for c, (concept, paths) in enumerate(zip(concepts, images)):
        names = identifier_words(concept)
        for path in paths:
            caption = read_caption(path, cfg.caption_extension) if cfg.caption_extension else None
            if caption is not None and names and not names & set(caption.lower().split()):
                unnamed.append(f"{path.with_suffix(cfg.caption_extension)} (wants {' or '.join(sorted(names))})")
            size = nearest_bucket(upright_size(path), buckets) if buckets else (cfg.resolution, cfg.resolution)
            items += [Item(path, caption or concept.instance_prompt, c, size)] * concept.repeats
    distinct = {item.path: item.size for item in items}
    check_sizes(list(distinct), list(distinct.values()))
    if unnamed:
        warnings.warn(f"{len(unnamed)} caption(s) do not name their subject's identifier, so those images do not "
                      f"tie the subject to its token; add it to the captions: " + "; ".join(unnamed[:5])
                      + (" ..." if len(unnamed) > 5 else ""), UserWarning, stacklevel=2)
    return items


def validation_prompts(cfg, concepts: list[Concept]) -> list[str]:
    """What validation renders: --validation_prompt, and with --concepts_list each concept's
    validation_prompt (default, when --validation_prompt is set: its instance prompt), once each.
    Empty: no validation."""
    prompts = [cfg.validation_prompt] if cfg.validation_prompt else []
    if cfg.concepts_list:
        prompts += [c.validation_prompt or (c.instance_prompt if cfg.validation_prompt else None) for c in concepts]
    return list(dict.fromkeys(p for p in prompts if p))


def sample_prompts(cfg, concepts: list[Concept]) -> list[str]:
    """What the run renders at all: the validation prompts, and the model card's (the validation
    prompts, else each concept's instance prompt)."""
    return validation_prompts(cfg, concepts) or list(dict.fromkeys(c.instance_prompt for c in concepts))
