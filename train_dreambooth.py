#!/usr/bin/env python
"""DreamBooth with SingLoRA (or PEFT LoRA / DoRA) adapters.

    python train_dreambooth.py --config configs/demo.yaml [--flag value ...]
    accelerate launch train_dreambooth.py --config configs/sd15.yaml ...

All the work is in singlora_diffusion.training (config -> validate -> build -> fit -> save).
"""
import sys

from singlora_diffusion.training.run import main

if __name__ == "__main__":
    sys.exit(main())
