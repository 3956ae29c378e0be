"""The scoring models and their preprocessing: what the protocol says, checked against the libraries."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from singlora_diffusion.bundled import bundled_subject
from singlora_diffusion.evaluation import MissingWeightsError
from singlora_diffusion.evaluation.scorer import (DINO_MODEL, Weights, dino_transform, load_dino, load_scorer, prepare,
                                                  resolve_weights)

PHOTOS = sorted(bundled_subject().glob("*.jpg"))


@pytest.fixture(scope="module")
def scorer():
    return load_scorer(Weights("dino", "random"), Weights("clip", "random"), "cpu", True)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """No cached weights, whatever this machine's real cache holds."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_dino_preprocessing_is_resize_256_bicubic_crop_224_imagenet():
    from torchvision import transforms as T

    resize, crop, _, normalize = dino_transform().transforms
    assert (resize.size, resize.interpolation, resize.antialias) == (256, T.InterpolationMode.BICUBIC, True)
    assert tuple(crop.size) == (224, 224)
    assert normalize.mean == (0.485, 0.456, 0.406) and normalize.std == (0.229, 0.224, 0.225)
    # the same numbers by hand with Pillow: shorter side 256 (bicubic), centre 224, /255, ImageNet stats
    image = Image.open(PHOTOS[0]).convert("RGB").resize((300, 200), Image.Resampling.BILINEAR)
    w, h = round(300 * 256 / 200), 256
    big = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC), np.float64) / 255
    left, top = int(round((w - 224) / 2)), int(round((h - 224) / 2))
    expected = (big[top:top + 224, left:left + 224] - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    got = dino_transform()(image).permute(1, 2, 0).numpy()
    assert got.shape == (224, 224, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_clip_preprocessing_is_open_clips_own(scorer):
    from torchvision import transforms as T

    resize, crop, *_, normalize = scorer.clip_preprocess.transforms
    assert (resize.size, resize.interpolation) == (224, T.InterpolationMode.BICUBIC)
    assert tuple(crop.size) == (224, 224)
    assert normalize.mean == (0.48145466, 0.4578275, 0.40821073)
    assert normalize.std == (0.26862954, 0.26130258, 0.27577711)


def test_dino_embedding_is_the_cls_token_after_the_final_norm(scorer):
    model = scorer.dino
    assert model.global_pool == "token" and model.num_classes == 0 and model.num_features == 384
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = model.blocks(model.norm_pre(model._pos_embed(tokens)))
        by_hand = model.norm(tokens)[:, 0]
        np.testing.assert_allclose(model(x).numpy(), by_hand.numpy(), atol=1e-5)


def test_one_decode_feeds_both_models(scorer):
    dino_in, clip_in = prepare(PHOTOS[0], scorer.dino_preprocess, scorer.clip_preprocess)
    assert dino_in.shape == clip_in.shape == (3, 224, 224)
    assert not torch.equal(dino_in, clip_in)  # different resize and statistics


def test_offline_without_weights_is_one_clear_error(empty_hf_cache):
    with pytest.raises(MissingWeightsError) as err:
        resolve_weights(None, None, allow_random=False)
    text = str(err.value)
    for needed in ("vit_small_patch16_224.dino", "--dino_weights", "ViT-B-32", "--clip_weights", "HF_HUB_OFFLINE=1",
                   "--allow_random_weights", "https://huggingface.co/timm/vit_small_patch16_224.dino"):
        assert needed in text
    assert resolve_weights(None, None, allow_random=True) == (Weights("dino", "random"), Weights("clip", "random"))


def test_a_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip_weights .*nope.safetensors: no such file"):
        resolve_weights(None, str(tmp_path / "nope.safetensors"), allow_random=True)


def _random_dino_state(seed):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(DINO_MODEL, pretrained=False, num_classes=0).state_dict()


def test_local_and_cached_dino_weights_are_the_ones_loaded(tmp_path, empty_hf_cache):
    from safetensors.torch import save_file

    state = _random_dino_state(123)
    file = tmp_path / "dino.safetensors"
    save_file(state, str(file))
    dino, _ = resolve_weights(str(file), None, allow_random=True)
    assert dino == Weights("dino", "file", str(file))
    model, used = load_dino(dino)
    assert used == dino and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    # the by-name path offline: timm finds the weights in the Hugging Face cache
    snapshot = empty_hf_cache / "models--timm--vit_small_patch16_224.dino"  # huggingface_hub's cache layout
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc")
    (snapshot / "snapshots" / "abc").mkdir(parents=True)
    save_file(state, str(snapshot / "snapshots" / "abc" / "model.safetensors"))
    dino, clip = resolve_weights(None, None, allow_random=True)
    assert dino == Weights("dino", "hub", "timm/vit_small_patch16_224.dino") and clip.random
    model, used = load_dino(dino)
    assert used == dino and torch.equal(model.state_dict()["cls_token"], state["cls_token"])


def test_random_weights_are_seeded_and_say_so(scorer):
    assert scorer.random_weights and "RANDOM WEIGHTS — scores meaningless" in scorer.dino_weights.describe()
    again, _ = load_dino(Weights("dino", "random"))
    assert torch.equal(again.cls_token, scorer.dino.cls_token)  # same weights in every process


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "between-forwards"])
def test_scoring_equals_the_models_on_the_same_batches_in_order(scorer, tmp_path, overlap):
    # batch 2 over 3 images: the second batch is prepared while the first runs (an accelerator's
    # way) or after it (the CPU's), and is short
    sources = [PHOTOS[2], PHOTOS[0], PHOTOS[1]]
    threads = torch.get_num_threads()
    got = scorer.embed_images(sources, batch_size=2, overlap=overlap)
    later = ThreadPoolExecutor(1).submit(torch.get_num_threads).result()
    assert later == threads  # the workers' one torch thread stays theirs, not every later thread's
    inputs = [prepare(s, dino_transform(), scorer.clip_preprocess) for s in sources]
    with torch.no_grad():
        for start in (0, 2):
            batch = inputs[start:start + 2]
            dino, clip = torch.stack([d for d, _ in batch]), torch.stack([c for _, c in batch])
            assert torch.equal(got["dino"][start:start + 2], scorer.dino(dino))
            assert torch.equal(got["clip"][start:start + 2], scorer.clip.encode_image(clip))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(Image.UnidentifiedImageError, match="bad.png"):
        scorer.embed_images([PHOTOS[0], bad], batch_size=1, overlap=overlap)
