"""`singlora grid PLAN.yaml --out DIR`: the DreamBench grid subjects x methods x seeds, one command.

    plan.py      1. the YAML plan -> subjects, methods, seeds and every cell's settings, checked
                    before any model loads (GridPlan, Cell, load_plan)
    claims.py       one flock per cell: no two processes run a cell; a dead one frees its cells
    cell.py      2. one cell: the trainer, then the evaluation; result.json written last
    table.py     3. finished cells -> means, two-level bootstrap intervals, paired differences
                    against the baseline, table.md / .csv / .png
    estimate.py     --dry-run: counts and GPU time from the GPU check's rates
    run.py          run_grid: each process takes free cells; resumable; main()
"""
from .plan import GridPlan, load_plan
from .run import main, run_grid

__all__ = ["GridPlan", "load_plan", "main", "run_grid"]
