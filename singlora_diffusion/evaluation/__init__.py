"""DreamBench evaluation: DINO, CLIP-I and CLIP-T as the DreamBooth paper defines them (Sec. 4.1).

    config.py      EvalConfig (flags derive from it), parse_config
    protocol.py    DreamBench prompts and classes, CLIP-T's text (Prompt, DreamBench)
    plan.py     1. subjects, photos, prompts, adapters: checked before any model loads (Subject, Plan)
    scorer.py      where DINO / CLIP weights come from (file, hub, random), loading them, the
                   protocol's preprocessing, the Scorer: one decode -> DINO + CLIP embeddings
    generation.py 2. the images: names, manifests, --images_dir folders, settings, generation
                   sharded over processes (GeneratedImage)
    scoring.py  3. embeddings cached on disk (nothing is scored twice), per-image scores
                   (ImageScore, SubjectScores)
    metrics.py     the math: pure functions of embeddings
    report.py   4. scores.json / .csv, report.md, grid.png, per_prompt.png (Pillow)
    run.py         evaluate(cfg): the phases in order, sharded with accelerate; main()

The web UI and other callers use this package's surface:

    from singlora_diffusion.evaluation import EvalConfig, evaluate, MissingWeightsError
"""
from .config import EvalConfig, parse_config
from .run import evaluate, main
from .scorer import MissingWeightsError

__all__ = ["EvalConfig", "MissingWeightsError", "evaluate", "main", "parse_config"]
