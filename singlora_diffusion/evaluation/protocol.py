"""The DreamBench protocol's text side: subjects' classes, the 25 prompts, CLIP-T's text.

DreamBooth (Ruiz et al., arXiv 2208.12242, Sec. 4.1): 30 subjects; 25 prompts per subject,
one list for objects and one for live subjects (the 9 dogs and cats of the dataset), each
prompt written as `'a {0} {1} in the jungle'.format(unique_token, class_token)`. The lists
and the classes are read from the dataset's own prompts_and_classes.txt (a copy ships in
assets/dreambench/), never retyped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import BadInput, NotFound

# The dataset README: "9 out of these subjects are live subjects (dogs and cats)".
LIVE_CLASSES = ("dog", "cat")
PROMPTS_FILE = "prompts_and_classes.txt"
_PROMPT_LINE = re.compile(r"""^'(?P<template>.*)'\.format\(unique_token, class_token\),?$""")
_MAX_PROMPT_BYTES = 200  # the prompt is part of an image file name (255 bytes at most)


@dataclass(frozen=True)
class Prompt:
    text: str                    # what the diffusion model sees, e.g. "a sks dog in the jungle"
    template: str | None = None  # "a {0} {1} in the jungle": the same prompt across subjects


@dataclass(frozen=True)
class DreamBench:
    classes: dict[str, str]         # subject -> class, e.g. dog3 -> dog
    object_prompts: tuple[str, ...]  # 25 templates with {0} = identifier, {1} = class
    live_prompts: tuple[str, ...]

    def templates_for(self, class_name: str) -> tuple[str, ...]:
        return self.live_prompts if class_name in LIVE_CLASSES else self.object_prompts


def bundled_prompts_file() -> Path:
    return Path(str(resources.files("singlora_diffusion") / "assets" / "dreambench" / PROMPTS_FILE))


@lru_cache(maxsize=8)
def read_dreambench(path: str | Path | None = None) -> DreamBench:
    """Parse prompts_and_classes.txt (the bundled copy when `path` is None)."""
    path = Path(path) if path is not None else bundled_prompts_file()
    classes: dict[str, str] = {}
    lists: list[list[str]] = []
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line == "Classes":
            section = "classes"
        elif line.startswith("prompt_list"):
            section = "prompts"
            lists.append([])
        elif section == "classes" and "," in line and line != "subject_name,class":
            subject, _, class_name = line.partition(",")
            classes[subject.strip()] = class_name.strip()
        elif section == "prompts" and (m := _PROMPT_LINE.match(line)):
            lists[-1].append(m["template"])
    if len(lists) != 2 or not classes or any(len(prompts) != 25 for prompts in lists):
        raise BadInput(f"{path}: expected the DreamBench layout (a Classes table, then the object and the "
                       f"live prompt_list of 25 prompts each); found {len(classes)} classes and prompt lists "
                       f"of {[len(p) for p in lists]}")
    return DreamBench(classes, tuple(lists[0]), tuple(lists[1]))


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """One prompt (template) per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"--prompts {path}: no such file; pass 'dreambench' or a text file with one "
                       f"prompt per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    templates = tuple(line for line in lines if line and not line.startswith("#"))
    if not templates:
        raise BadInput(f"--prompts {path}: the file holds no prompt")
    return templates


def fill(template: str, identifier: str, class_name: str) -> str:
    """`{0}`/`{identifier}` -> identifier, `{1}`/`{class}` -> class (DreamBench's own notation works)."""
    try:
        text = template.format(identifier, class_name, identifier=identifier, **{"class": class_name})
    except (IndexError, KeyError, ValueError) as e:
        raise BadInput(f"prompt template {template!r}: {e!r}; use {{0}} or {{identifier}} for the identifier "
                       f"and {{1}} or {{class}} for the class name (double other braces)") from None
    return " ".join(text.split())


def make_prompts(templates, identifier: str, class_name: str) -> tuple[Prompt, ...]:
    prompts = tuple(Prompt(fill(t, identifier, class_name), t) for t in templates)
    for p in prompts:
        check_prompt_text(p.text)
    if len({p.text for p in prompts}) != len(prompts):
        raise BadInput(f"prompts repeat: {[p.text for p in prompts]}; each prompt must be distinct")
    return prompts


def check_prompt_text(text: str) -> None:
    """A prompt must be usable as an image file name (`<prompt>_<seed>.png`)."""
    if not text or "/" in text or "\\" in text or "\0" in text or text.startswith("."):
        raise BadInput(f"prompt {text!r} cannot be part of an image file name (empty, a leading '.', or a "
                       f"'/', '\\' or NUL character); rephrase it")
    if len(text.encode("utf-8")) > _MAX_PROMPT_BYTES:
        raise BadInput(f"prompt {text[:40]!r}... is longer than {_MAX_PROMPT_BYTES} bytes, too long for an "
                       f"image file name; shorten it")


def remove_identifier(text: str, identifier: str) -> str:
    """`text` without the whitespace-separated tokens equal to `identifier`.

    "a sks dog in the jungle" -> "a dog in the jungle". Whole tokens only, so an identifier
    like "V*" or "<sks>" works and the "sks" inside "tasks" stays.
    """
    if not identifier:
        return text
    return " ".join(token for token in text.split() if token != identifier)


def clip_t_text(text: str, identifier: str, remove: bool) -> str:
    """The text CLIP-T compares with: the prompt, with the identifier removed if `remove`."""
    return remove_identifier(text, identifier) if remove else " ".join(text.split())
