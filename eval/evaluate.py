"""DreamBench evaluation (DINO, CLIP-I, CLIP-T) of SingLoRA / LoRA adapters or of existing images.

    python eval/evaluate.py --adapter OUT_DIR --subject_dir PHOTOS --class_name dog --out REPORT_DIR
    python eval/evaluate.py --images_dir GENERATED --subject_dir PHOTOS --out REPORT_DIR
    accelerate launch --num_processes N eval/evaluate.py --dreambench_dir DIR --adapters_dir DIR --out REPORT_DIR

Every flag: `python eval/evaluate.py --help`; the protocol and the decisions: docs/evaluation.md.
"""
import sys

from singlora_diffusion.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
