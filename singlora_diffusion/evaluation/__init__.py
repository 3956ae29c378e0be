"""DreamBench evaluation: DINO, CLIP-I and CLIP-T as the DreamBooth paper defines them (Sec. 4.1).

    config.py     EvalConfig (flags derive from it)
    plan.py       1. subjects, photos, prompts, adapters: checked before any model loads
    models.py     2. where DINO / CLIP weights come from (file, hub, random) and loading them
    generation.py 3. images not on disk yet, sharded over processes (accelerate)
    embed.py      4. Scorer: one decode -> DINO + CLIP embeddings, text embeddings
    cache.py         embeddings on disk (nothing is scored twice)
    scoring.py       per-image scores from cached embeddings
    metrics.py       the math: pure functions of embeddings
    report.py     5. scores.json / .csv, report.md
    figures.py       grid.png, per_prompt.png (Pillow)
    protocol.py      DreamBench prompts and classes, CLIP-T's text
    preprocess.py    the protocol's image preprocessing
    run.py           evaluate(cfg), main()
"""
