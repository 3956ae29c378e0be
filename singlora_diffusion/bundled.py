"""Files shipped inside the package."""
from importlib import resources
from pathlib import Path


def bundled_subject() -> Path:
    """Six downscaled photos of the DreamBench subject dog3 (CC BY 4.0, see assets/ATTRIBUTION.md)."""
    return Path(str(resources.files("singlora_diffusion") / "assets" / "dog3"))
