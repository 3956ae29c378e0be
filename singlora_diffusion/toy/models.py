"""The toy world's networks: a small SD1.x-architecture pipeline and its feature extractor.

The pipeline has SD's parts and layer names (AutoencoderKL, CLIP text encoder with the real
CLIP BPE tokenizer, UNet2DConditionModel whose CrossAttn blocks have to_q/to_k/to_v/to_out.0),
so the trainer adapts it exactly as it adapts SD1.5. Sizes are chosen so a DreamBooth run
takes a few minutes on two CPU cores.
"""
from __future__ import annotations

import torch
from torch import nn

from . import world

MAX_TOKENS = 16  # captions are ~10 CLIP tokens; padding to 77 would only cost time
TEXT_WIDTH = 64


def build_pipeline(seed: int = 0):
    """The untrained toy pipeline (random weights from `seed`).

    One RNG stream, seeded once and drawn by the text encoder, the VAE and the UNet in
    that order (seed=None tells tiny's factories to continue it).
    """
    from .. import tiny

    torch.manual_seed(seed)
    tokenizer = tiny.clip_tokenizer()
    tokenizer.model_max_length = MAX_TOKENS
    text_encoder = tiny.text_encoder(TEXT_WIDTH, None, layers=2, intermediate=128, max_tokens=MAX_TOKENS)
    # 32 px images -> 16x16x4 latents (one downsampling), as SD's 8x is too much for 32 px.
    vae = tiny.vae(None, sample_size=world.SIZE)
    unet = tiny.sd_unet(TEXT_WIDTH, None, layers_per_block=1, sample_size=world.SIZE // 2)
    return tiny.sd_pipeline(unet, vae, text_encoder, tokenizer)  # SD1.x's noise schedule, epsilon prediction


class FeatureNet(nn.Module):
    """A small CNN trained inside the toy world to name shape, colour and background.

    Its pooled features stand in for DINO's embedding: random-weight DINO/CLIP would
    measure nothing, and real ones cannot be downloaded here.
    """
    def __init__(self, width: int = 64):
        super().__init__()
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())
        self.body = nn.Sequential(conv(3, 32), conv(32, 32), nn.MaxPool2d(2), conv(32, width), conv(width, width),
                                  nn.MaxPool2d(2), conv(width, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList([nn.Linear(width, n) for n in
                                    (len(world.ALL_SHAPES), len(world.ALL_COLOURS), len(world.COLOURS))])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], (N, 3, 32, 32) -> (N, width)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of (shape, colour, background); colour indexes world.ALL_COLOURS, background world.COLOURS."""
        f = self.features(x)
        return [head(f) for head in self.heads]


@torch.no_grad()
def called_subject(extractor: FeatureNet, images: torch.Tensor) -> torch.Tensor:
    """Which images the extractor names as the subject's shape in the subject's colour (bool, N)."""
    shape_logits, colour_logits, _ = extractor(images)
    return ((shape_logits.argmax(-1) == world.ALL_SHAPES.index(world.SUBJECT_SHAPE))
            & (colour_logits.argmax(-1) == world.ALL_COLOURS.index(world.SUBJECT_COLOUR_NAME)))
