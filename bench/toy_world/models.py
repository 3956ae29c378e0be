"""The toy world's networks: a small SD1.x-architecture pipeline and a feature extractor.

The pipeline has SD's parts and layer names (AutoencoderKL, CLIP text
encoder, UNet2DConditionModel with CrossAttn blocks whose attention has
to_q/to_k/to_v/to_out.0), so our trainer adapts it exactly as it adapts
SD1.5. Sizes are chosen so pretraining fits in minutes on two CPU cores.
"""
from __future__ import annotations

import torch
from torch import nn

MAX_TOKENS = 16  # captions are ~10 CLIP tokens; padding to 77 would only cost time
TEXT_WIDTH = 64


def build_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from singlora_diffusion.tiny import BOS_ID, EOS_ID, clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = MAX_TOKENS
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_WIDTH, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=MAX_TOKENS, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=EOS_ID, hidden_act="gelu"))
    # 32 px images -> 16x16x4 latents (one downsampling), as SD's 8x is too much for 32 px.
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=(2, 4), norm_num_groups=32)
    # SD1.x's noise schedule, epsilon prediction.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


class FeatureNet(nn.Module):
    """A small CNN trained inside the toy world to name shape, colour and background.

    Its pooled features stand in for DINO: random-weight DINO/CLIP would
    measure nothing, and real ones cannot be downloaded here.
    """
    def __init__(self, n_shapes: int, n_colours: int, n_backgrounds: int, width: int = 64):
        super().__init__()
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())
        self.body = nn.Sequential(conv(3, 32), conv(32, 32), nn.MaxPool2d(2), conv(32, width), conv(width, width),
                                  nn.MaxPool2d(2), conv(width, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList([nn.Linear(width, n) for n in (n_shapes, n_colours, n_backgrounds)])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], (N, 3, 32, 32) -> (N, width)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [head(f) for head in self.heads]
