"""What the web UI suits to its base: the forms' starting values and the Evaluate tab's scorer.

The one place that tells the toy base (toy:shapes, 32 px coloured shapes) from a real one:
app.py reads the starting values, handlers.py the scorer. The image size is not here: the
Generate tab starts at the loaded model's own size (32 px for the toy base).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..pipelines import TOY_BASE
from ..toy import world


@dataclass(frozen=True)
class BaseProfile:
    prompt: str           # Generate: what the base alone draws
    subject_prompt: str   # Compare (an adapter picked): a prompt that names the subject
    steps: int
    guidance: float
    eval_subject: str     # Evaluate: the subject's real photos ("": the user names a folder)
    eval_class: str
    scorer: str           # EvalConfig.scorer: "toy" scores toy-world images, DreamBench's models cannot


TOY = BaseProfile(prompt=world.caption("circle", "red", "blue"), subject_prompt=world.subject_caption("blue"),
                  steps=world.SAMPLING["steps"], guidance=world.SAMPLING["guidance"], eval_subject=world.SUBJECT_DATA,
                  eval_class=world.CLASS_WORD, scorer="toy")


# SD's usual guidance (GenerateRequest's and EvalConfig's default too); the subject is the README's dog
REAL = BaseProfile(prompt="a photo of sks dog", subject_prompt="a photo of sks dog on the beach", steps=20,
                   guidance=7.5, eval_subject="", eval_class="dog", scorer="dreambench")


def profile(base: str) -> BaseProfile:
    """The toy base's profile for toy:shapes, the real one for any other base (tiny:sd15 included)."""
    return TOY if str(base) == TOY_BASE else REAL
