"""`python -m singlora_diffusion.training`: the trainer of an installed package (= train_dreambooth.py)."""
import sys

from .run import main

sys.exit(main())
