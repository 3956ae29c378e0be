"""Files shipped inside the package, so an installed copy works without the source checkout."""
from importlib import resources
from pathlib import Path

BUNDLED_PREFIX = "bundled:"  # bundled:dog3 names a subject folder shipped in assets/


def _package_dir(*parts: str) -> Path:
    return Path(str(resources.files("singlora_diffusion").joinpath(*parts)))


def bundled_subject(name: str = "dog3") -> Path:
    """Six downscaled photos of the DreamBench subject dog3 (CC BY 4.0, see assets/ATTRIBUTION.md)."""
    return _package_dir("assets", name)


def preset_names() -> list[str]:
    """The YAML presets of singlora_diffusion/configs/ (demo, sd15, sdxl, paper_sd15, ...)."""
    return sorted(p.stem for p in _package_dir("configs").glob("*.yaml"))


def preset_path(name: str) -> Path:
    return _package_dir("configs", f"{name}.yaml")


def grid_plan_path(name: str) -> Path:
    """A shipped grid plan (configs/grids/: grid_paper_table3, grid_toy), for `singlora grid NAME`."""
    return _package_dir("configs", "grids", f"{name}.yaml")


def resolve_data_dir(value: str | None) -> str | None:
    """`bundled:dog3` -> the shipped folder; anything else as given."""
    if value and value.startswith(BUNDLED_PREFIX):
        return str(bundled_subject(value[len(BUNDLED_PREFIX):]))
    return value
