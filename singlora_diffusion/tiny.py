"""Small randomly initialised pipelines of the real SD1.x, SDXL, SD3 and Flux.1 architectures.

They exist so that everything (training, export, generation, the web UI)
runs offline in seconds; their images are noise-like because no weights are
trained. Real users pass a hub id or a local diffusers folder instead.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import torch
from .errors import BadInput

# CLIP's special tokens in the 49,408-token vocabulary.
BOS_ID, EOS_ID = 49406, 49407


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE vocabulary rebuilt from the merges file open_clip ships.

    Same construction as open_clip's SimpleTokenizer, so token ids match the
    real openai/clip-vit-large-patch14 tokenizer.
    """
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    from open_clip.tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # model_max_length must be given: without it the pipeline pads to ~1e30 tokens.
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=77)


def text_encoder(width: int, seed: int | None = 0, with_projection: bool = False, layers: int = 5,
                 intermediate: int = 37, max_tokens: int = 77):
    """A random CLIP text encoder with CLIP's vocabulary and special tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=intermediate, num_attention_heads=4,
                            num_hidden_layers=layers, vocab_size=49408, max_position_embeddings=max_tokens,
                            projection_dim=32, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                            hidden_act="gelu")
    if seed is not None:  # None: continue the caller's RNG stream
        torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def vae(seed: int | None = 0, block_out_channels=(32, 64), layers_per_block: int = 1, sample_size: int = 64):
    """A random AutoencoderKL; len(block_out_channels) - 1 downsamplings (SD's real VAE has 3)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    if seed is not None:  # None: continue the caller's RNG stream
        torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=tuple(block_out_channels), in_channels=3, out_channels=3,
                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers_per_block,
                         norm_num_groups=32, sample_size=sample_size)


def sd_unet(cross_attention_dim: int, seed: int | None = 0, block_out_channels=(32, 64), layers_per_block: int = 2,
            sample_size: int = 32, attention_head_dim=(2, 4), plain_last: bool = False):
    """A random SD1.x-architecture UNet (CrossAttn blocks with to_q/to_k/to_v/to_out.0).

    plain_last: the deepest block without attention, as in SD1.5's real UNet.
    """
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    attn = n - 1 if plain_last else n
    if seed is not None:  # None: continue the caller's RNG stream
        torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block, sample_size=sample_size,
        in_channels=4, out_channels=4, cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * attn + ("DownBlock2D",) * (n - attn),
        up_block_types=("UpBlock2D",) * (n - attn) + ("CrossAttnUpBlock2D",) * attn)


def scheduler():
    from diffusers import DDIMScheduler

    # SD's noise schedule (scaled_linear 0.00085..0.012, steps_offset=1).
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sd_pipeline(unet, vae, text_encoder, tokenizer=None, noise_scheduler=None):
    """A StableDiffusionPipeline of these parts (default: SD's scheduler), no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or clip_tokenizer(),
                                   unet=unet, scheduler=noise_scheduler or scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


TINY_ARCHS = ("sd15", "sdxl", "sd3", "flux")


def t5_tokenizer():
    """A T5 tokenizer built offline: T5's special ids (pad 0, </s> 1, <unk> 2) and a Unigram
    vocabulary of single characters and word-initial letters ("▁a"), so any ASCII prompt
    tokenizes (other characters become <unk>). Real T5 has 32,100 sentencepiece pieces; no
    sentencepiece model can be downloaded here, and transformers 5's T5 tokenizer takes a
    (piece, score) list directly (docs/architecture.md, "Offline test pipelines").
    """
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


T5_VOCAB = 128  # >= len(t5_tokenizer()) = 124


def t5_encoder(width: int, seed: int | None = 0):
    """A random 2-layer T5 encoder (gated-GELU feed-forward, as T5 v1.1 / T5-XXL)."""
    from transformers import T5Config, T5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=width, d_ff=width + 8, d_kv=8, num_layers=2,
                                   num_heads=width // 8, feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def dit_vae(seed: int | None = 0, scaling_factor: float = 1.5305, shift_factor: float = 0.0609):
    """A random 16-channel AutoencoderKL (SD3's and Flux's latent width), no quant convs, with its
    family's scaling and shift (SD3: 1.5305 / 0.0609; Flux: 0.3611 / 0.1159)."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_sd3(seed: int = 0):
    """SD3.5-medium's architecture in small: joint blocks of width 32 (square attention), one with
    SD3.5's second image attention (attn2), RMS q/k norms, CLIP-L and CLIP-G (widths 16, pooled 32
    each) whose states are concatenated and padded to T5's width 32, and a shift-3 flow schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=dit_vae(seed + 1),
        text_encoder=text_encoder(16, seed + 2, True), tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder(16, seed + 3, True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(32, seed + 4), tokenizer_3=t5_tokenizer())


def build_tiny_flux(seed: int = 0):
    """FLUX.1-dev's architecture in small: one double and two single blocks of width 32 (2 heads of
    16, RoPE axes 4+6+6), guidance embedding, CLIP-L (width 32) for the pooled vector, T5 (width 32)
    for the tokens, and Flux.1-dev's resolution-dependent (dynamic) shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    # FLUX.1-dev's scheduler/scheduler_config.json
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=flow, vae=dit_vae(seed + 1, 0.3611, 0.1159),
                        text_encoder=text_encoder(32, seed + 2), tokenizer=clip_tokenizer(),
                        text_encoder_2=t5_encoder(32, seed + 3), tokenizer_2=t5_tokenizer())


def build_tiny_pipeline(arch: str = "sd15", seed: int = 0):
    """A pipeline of a few M parameters (64 px for sd15/sdxl, 32 px for sd3/flux), random weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    if arch == "sd3":
        return build_tiny_sd3(seed)
    if arch == "flux":
        return build_tiny_flux(seed)

    if arch == "sd15":
        # Text width 48 between the block widths 32 and 64: the cross-attention to_k/to_v
        # layers are non-square both ways (48 -> 32 and 48 -> 64), as in real models.
        return sd_pipeline(sd_unet(48, seed), vae(seed + 1), text_encoder(48, seed + 2))
    if arch == "sdxl":
        torch.manual_seed(seed)
        # Micro-conditioning: 6 time ids × addition_time_embed_dim + text_encoder_2's pooled projection (32).
        # Cross-attention sees both encoders' states concatenated: 32 + 48 = 80 -> 64 (non-square).
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + 48, norm_num_groups=32)
        return StableDiffusionXLPipeline(
            vae=vae(seed + 1), text_encoder=text_encoder(32, seed + 2), text_encoder_2=text_encoder(48, seed + 3, True),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler(),
            force_zeros_for_empty_prompt=False)
    raise BadInput(f"unknown tiny pipeline arch {arch!r}: choose {', '.join(TINY_ARCHS)}")


def save_tiny_pipeline(out_dir: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    out = Path(out_dir)
    build_tiny_pipeline(arch, seed).save_pretrained(out)
    return out


def build_random_pipeline(arch: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float16):
    """SD1.5 or SDXL at full size with random weights: the real component configs
    (reference_configs), the real CLIP tokenizer, built offline.

    For what tiny models hide (memory, dtype paths, the VAE upcast, attention shapes);
    the images are noise. Built in `dtype` (an SDXL in float32 would take 14 GB to build).
    """
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .reference_configs import CLIP_BIGG, CLIP_L, SCHEDULER_CONFIGS, UNET_CONFIGS, VAE_CONFIGS

    if arch not in ("sd15", "sdxl"):  # UNET_CONFIGS also has SD2.x, whose text encoder is not built here
        raise BadInput(f"unknown random pipeline arch {arch!r}: choose sd15 or sdxl")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights are created (and randomly initialised) in dtype directly
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
        vae = AutoencoderKL(**VAE_CONFIGS[arch])
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)) if arch == "sdxl" else None
    finally:
        torch.set_default_dtype(previous)
    name, config = SCHEDULER_CONFIGS[arch]
    noise_scheduler = getattr(diffusers, name)(**config)
    if arch == "sd15":
        return sd_pipeline(unet, vae, text_encoder, noise_scheduler=noise_scheduler)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=noise_scheduler)


def save_random_pipeline(out_dir: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    out = Path(out_dir)
    build_random_pipeline(arch, seed).save_pretrained(out)
    return out
