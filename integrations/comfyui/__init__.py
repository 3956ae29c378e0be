"""ComfyUI custom nodes for SingLoRA adapters: copy or link this folder into ComfyUI's custom_nodes/.

ComfyUI imports this package and reads the two tables below. The node itself lives in
nodes.py; README.md says how it finds the singlora_diffusion package.
"""
from .nodes import LoadSingLoRA

NODE_CLASS_MAPPINGS = {"LoadSingLoRA": LoadSingLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadSingLoRA": "Load SingLoRA"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
