"""Phase 1: a grid plan (YAML) -> the cells subjects x methods x seeds, checked before any model loads.

A plan (configs/grids/grid_paper_table3.yaml is the paper's Table 3):

    name: ...                          # the table's title
    base: runwayml/stable-diffusion-v1-5
    subjects: dreambench               # DreamBench's 30 subjects (classes from prompts_and_classes.txt),
                                       # or a list of names, or a mapping name: folder | {dir, class}
    subjects_dir: dreambooth/dataset   # the folder holding one photo folder per subject (names); relative
                                       # folders: beside the plan when they exist there, else from the cwd
    class_name: shape                  # the class of subjects whose class the table does not know
    instance_prompt: a photo of {identifier} {class}
    identifier: sks                    # in the training prompt and the evaluation's prompts
    seeds: [0, 1, 2]                   # training seeds (the trainer's --seed and --init_seed)
    baseline: LoRA r8                  # the row the paired differences are taken against
    train: {config: paper_sd15, ...}   # the trainer's settings for every cell: a preset or YAML, then keys
    evaluation: {num_images: 4, ...}   # eval/evaluate.py's settings for every cell
    methods:                           # the rows: any of singlora / lora / loraplus / dora at any rank
      - {name: SingLoRA r8, adapter: singlora, rank: 8, paper: {dino: 0.141}, train: {...}}

The grid owns what varies per cell (base, photos, prompt, adapter, rank, seed, output folders):
those keys are refused in `train:` and `evaluation:`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, NotFound

PLAN_KEYS = {"name", "base", "subjects", "subjects_dir", "class_name", "instance_prompt", "identifier", "seeds",
             "baseline", "train", "evaluation", "methods"}
METHOD_KEYS = {"name", "adapter", "rank", "paper", "train"}
METRICS = ("dino", "clip_i", "clip_t")
# Set per cell by the grid, never by the plan's train: / evaluation: blocks.
GRID_TRAIN_KEYS = {"pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "output_dir", "seed",
                   "init_seed", "adapter", "rank", "resume_from_checkpoint", "concepts_list"}
# Grid defaults over the trainer's, and over a preset's (a plan's train: block may set them again):
# validation renders and tracker logs per cell cost GPU time and say nothing the evaluation does
# not; the final adapter is all a cell keeps.
GRID_TRAIN_DEFAULTS = {"validation_prompt": None, "report_to": "none", "checkpointing_steps": 10 ** 9}
GRID_EVAL_KEYS = {"out", "subject_dir", "class_name", "subject_name", "adapter", "base", "images_dir",
                  "dreambench_dir", "adapters_dir", "subjects", "identifier"}


@dataclass(frozen=True)
class Method:
    name: str
    adapter: str
    rank: int
    train: dict = field(default_factory=dict)   # this row's trainer settings over the plan's
    paper: dict = field(default_factory=dict)   # the paper's numbers of this row (dino, clip_i, clip_t)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower().replace("+", "plus")).strip("-")


@dataclass(frozen=True)
class Subject:
    name: str
    folder: Path
    class_name: str


@dataclass(frozen=True)
class Cell:
    subject: Subject
    method: Method
    seed: int

    @property
    def key(self) -> str:
        return f"{self.subject.name}__{self.method.slug}__s{self.seed}"


@dataclass(frozen=True)
class GridPlan:
    path: Path
    name: str
    base: str
    subjects: tuple[Subject, ...]
    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    baseline: str
    instance_prompt: str
    identifier: str
    train: dict       # the trainer's settings: grid defaults < the preset's < the plan's keys
    evaluation: dict  # EvalConfig keys

    @property
    def cells(self) -> list[Cell]:
        """Subject-major: a stopped grid has whole subjects, the unit the intervals resample."""
        return [Cell(s, m, seed) for s in self.subjects for seed in self.seeds for m in self.methods]


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"{where}: expected a mapping of setting: value, got {type(value).__name__}")
    return dict(value)


def _check_keys(given: dict, known: set[str], owned: set[str], where: str, fix: str) -> None:
    if bad := sorted(set(given) & owned):
        raise BadInput(f"{where}: {', '.join(bad)} set per cell by the grid; remove them from the plan")
    if unknown := sorted(set(given) - known):
        raise BadInput(f"{where}: unknown setting(s) {', '.join(unknown)}; {fix}")


def _train_keys() -> set[str]:
    from ..training.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def _train_settings(plan_path: Path, raw: dict) -> dict:
    """`train:`: an optional `config:` (a preset name or a YAML path beside the plan), then its keys."""
    from ..training.config import load_yaml

    raw = _mapping(raw, f"{plan_path}: train")
    values = {}
    if "config" in raw:
        ref = str(raw.pop("config"))
        beside = plan_path.parent / ref
        values = load_yaml(beside if beside.is_file() else ref)
        for key in GRID_TRAIN_KEYS | set(GRID_TRAIN_DEFAULTS):
            values.pop(key, None)  # a preset's own base / photos / seed / extras give way to the grid's
    _check_keys(raw, _train_keys(), GRID_TRAIN_KEYS, f"{plan_path}: train", "run train_dreambooth.py --help for the list")
    return GRID_TRAIN_DEFAULTS | values | raw


def _subjects(plan_path: Path, raw: dict) -> tuple[Subject, ...]:
    from ..bundled import resolve_data_dir
    from ..evaluation.protocol import read_dreambench

    classes = read_dreambench().classes
    root = Path(resolve_data_dir(str(raw["subjects_dir"]))) if raw.get("subjects_dir") else None
    spec = raw.get("subjects")
    if spec == "dreambench":
        spec = list(classes)
    if isinstance(spec, list):
        if root is None:
            raise BadInput(f"{plan_path}: subjects is a list of names; set subjects_dir, the folder holding them")
        spec = {str(name): str(root / str(name)) for name in spec}
    if not isinstance(spec, dict) or not spec:
        raise BadInput(f"{plan_path}: subjects must be 'dreambench', a list of names or a mapping name: folder")
    subjects = []
    for name, entry in spec.items():
        if not re.fullmatch(r"[\w.-]+", str(name)):
            raise BadInput(f"{plan_path}: subject name {name!r}: use letters, digits, '_', '.' and '-' (it names a folder)")
        entry = entry if isinstance(entry, dict) else {"dir": entry}
        if set(entry) - {"dir", "class"} or "dir" not in entry:
            raise BadInput(f"{plan_path}: subject {name!r}: expected a folder or {{dir: FOLDER, class: CLASS}}")
        folder = Path(resolve_data_dir(str(entry["dir"])))
        if not folder.is_absolute() and not str(entry["dir"]).startswith("bundled:"):
            folder = (plan_path.parent / folder) if (plan_path.parent / folder).exists() else folder
        class_name = entry.get("class") or classes.get(str(name)) or raw.get("class_name")
        if not class_name:
            raise BadInput(f"{plan_path}: subject {name!r}: its class is unknown (not a DreamBench subject); give it "
                           f"as {{dir: ..., class: dog}} or set class_name")
        subjects.append(Subject(str(name), folder, str(class_name)))
    return tuple(subjects)


def _methods(plan_path: Path, raw) -> tuple[Method, ...]:
    from ..config import ADAPTERS

    if not isinstance(raw, list) or not raw:
        raise BadInput(f"{plan_path}: methods must be a list of {{name, adapter, rank}} rows")
    methods = []
    for i, row in enumerate(raw):
        where = f"{plan_path}: methods[{i}]"
        row = _mapping(row, where)
        _check_keys(row, METHOD_KEYS, set(), where, f"a row has {', '.join(sorted(METHOD_KEYS))}")
        if row.get("adapter") not in ADAPTERS:
            raise BadInput(f"{where}: adapter must be one of {', '.join(ADAPTERS)}, got {row.get('adapter')!r}")
        rank = row.get("rank")
        if not isinstance(rank, int) or rank < 1:
            raise BadInput(f"{where}: rank must be an integer >= 1, got {rank!r}")
        train = _mapping(row.get("train"), f"{where}.train")
        _check_keys(train, _train_keys(), GRID_TRAIN_KEYS, f"{where}.train",
                    "run train_dreambooth.py --help for the list")
        paper = _mapping(row.get("paper"), f"{where}.paper")
        if bad := sorted(set(paper) - set(METRICS)):
            raise BadInput(f"{where}.paper: unknown metric(s) {', '.join(bad)}; expected {', '.join(METRICS)}")
        methods.append(Method(str(row.get("name") or f"{row['adapter']} r{rank}"), row["adapter"], rank, train,
                              {k: float(v) for k, v in paper.items() if v is not None}))
    names = [m.name for m in methods]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise BadInput(f"{plan_path}: method name(s) {', '.join(dupes)} appear twice; names must be unique")
    if len({m.slug for m in methods}) < len(methods):
        raise BadInput(f"{plan_path}: two method names give the same folder name; make them differ in letters or digits")
    return tuple(methods)


def _evaluation(plan_path: Path, raw) -> dict:
    from ..evaluation.config import EvalConfig

    raw = _mapping(raw, f"{plan_path}: evaluation")
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    _check_keys(raw, known, GRID_EVAL_KEYS, f"{plan_path}: evaluation", "run eval/evaluate.py --help for the list")
    return raw


def load_plan(path: str | Path) -> GridPlan:
    """The plan, every key checked; nothing is loaded and no subject folder needs to exist yet."""
    import yaml

    from ..bundled import grid_plan_path

    path = Path(path)
    if not path.is_file() and grid_plan_path(str(path)).is_file():
        path = grid_plan_path(str(path))  # a shipped plan by name: grid_paper_table3, grid_toy
    if not path.is_file():
        raise NotFound(f"grid plan {path} does not exist; pass a YAML file (or a shipped one by name: grid_paper_table3, grid_toy)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({e})") from None
    raw = _mapping(raw, str(path))
    _check_keys(raw, PLAN_KEYS, set(), str(path), f"a plan has {', '.join(sorted(PLAN_KEYS))}")
    for key in ("base", "subjects", "methods"):
        if key not in raw:
            raise BadInput(f"{path}: {key} is required")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) < len(seeds):
        raise BadInput(f"{path}: seeds must be a list of distinct integers, got {seeds!r}")
    methods = _methods(path, raw["methods"])
    baseline = str(raw.get("baseline") or methods[0].name)
    if baseline not in [m.name for m in methods]:
        raise BadInput(f"{path}: baseline {baseline!r} is not a method name ({', '.join(m.name for m in methods)})")
    prompt = str(raw.get("instance_prompt", "a photo of {identifier} {class}"))
    try:
        prompt.format(identifier="sks", **{"class": "dog"})
    except (KeyError, IndexError, ValueError):
        raise BadInput(f"{path}: instance_prompt {prompt!r} may use only {{identifier}} and {{class}}") from None
    return GridPlan(path, str(raw.get("name") or path.stem), str(raw["base"]), _subjects(path, raw), methods,
                    tuple(seeds), baseline, prompt, str(raw.get("identifier", "sks")),
                    _train_settings(path, raw.get("train")), _evaluation(path, raw.get("evaluation")))


def check_subjects(plan: GridPlan) -> None:
    """Before a real run: every subject's photo folder exists and holds images."""
    from ..images import scan_images

    missing = [s for s in plan.subjects if not s.folder.is_dir()]
    if missing:
        raise NotFound(f"{plan.path}: no photo folder for {len(missing)} subject(s), e.g. {missing[0].folder}; "
                       f"point subjects_dir at the DreamBench dataset (github.com/google/dreambooth, dataset/)")
    for s in plan.subjects:
        scan_images(s.folder, f"subject {s.name}", "subject photos", ignore=tuple(p.name for p in s.folder.glob("*.txt")))
