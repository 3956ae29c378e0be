#!/usr/bin/env python
"""DreamBooth with SingLoRA (or PEFT LoRA / DoRA) adapters.

    python train_dreambooth.py --config demo [--flag value ...]
    accelerate launch train_dreambooth.py --config sd15 ...
    python -m singlora_diffusion.training ...     (the same, from an installed package)

--config takes a shipped preset's name (singlora_diffusion/configs/) or any YAML file.
All the work is in singlora_diffusion.training (config -> validate -> build -> fit -> save).
"""
import sys

from singlora_diffusion.training import main

if __name__ == "__main__":
    sys.exit(main())
