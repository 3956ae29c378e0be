"""Aspect-ratio buckets, captions, caption dropout and several concepts in one run."""
import json
import shutil
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from singlora_diffusion.bundled import bundled_subject
from singlora_diffusion.errors import BadInput, NotFound
from singlora_diffusion.images import scan_images
from singlora_diffusion.training import TrainConfig, train, validate
from singlora_diffusion.training.batches import BatchPlan, TrainingData, sample_indices
from singlora_diffusion.training.data import make_buckets, nearest_bucket

from .train_helpers import tiny_config

def draw_t():  # a DDPM timestep, as objective.DDPMObjective draws it
    return torch.randint(0, 1000, ())


BUCKETS = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def _pictures(folder, sizes):
    """Images of the given (w, h) sizes, each a different colour, as PNGs in `folder`."""
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i % 256, 90, 200 - 20 * i)).save(folder / f"img{i}.png")
    return folder


# -- buckets --------------------------------------------------------------------------------

def test_bucket_sizes_follow_kohyas_rule():
    # worked by hand for 64 px, 32..128, steps of 16: per width the tallest height within 64² pixels
    assert make_buckets(64, 32, 128, 16) == [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48),
                                             (96, 32), (112, 32), (128, 32)]
    buckets = make_buckets(64, 32, 128, 16)
    assert nearest_bucket((200, 100), buckets) == (80, 48)  # 2:1 -> 1.67 is nearer than 3.0
    assert nearest_bucket((100, 300), buckets) == (32, 96)
    assert nearest_bucket((500, 500), buckets) == (64, 64)


def test_one_bucket_is_the_plain_sample_stream():
    plan = BatchPlan([(64, 64)] * 5, batch=2, seed=7)
    for k in range(9):
        assert plan.batch_of(k) == ((64, 64), sample_indices(5, 2 * k, 2, 7))


def test_batches_hold_one_bucket_and_every_image_is_seen_alike():
    sizes = [(64, 64)] * 5 + [(80, 48)] * 3 + [(48, 80)]
    plan = BatchPlan(sizes, batch=2, seed=0)
    seen = torch.zeros(len(sizes))
    rounds = 20
    for k in range(rounds * 6):  # a round: 3 + 2 + 1 batches
        size, members = plan.batch_of(k)
        assert len(members) == 2 and all(sizes[m] == size for m in members)
        for m in members:  # a batch at an epoch's end may hold an image twice
            seen[m] += 1
    # each bucket gets ceil(n/2) batches a round: 6, 4 and 2 samples for 5, 3 and 1 images
    assert seen[:5].sum() == 6 * rounds and seen[5:8].sum() == 4 * rounds and seen[8] == 2 * rounds
    assert seen[:5].max() - seen[:5].min() <= 2
    # two processes take batches k and k+1: disjoint, and together the one-process stream
    assert [plan.batch_of(k) for k in range(6)] == [BatchPlan(sizes, 2, 0).batch_of(k) for k in range(6)]


def test_training_batches_keep_the_images_aspect_ratios(tiny_pipeline_dir, tmp_path, monkeypatch):
    """The UNet sees latents of each batch's bucket; SDXL's time ids carry the bucket geometry."""
    from diffusers import UNet2DConditionModel

    photos = _pictures(tmp_path / "photos", [(200, 100), (210, 105), (100, 200), (96, 96)])
    seen = []
    real_forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, **kw):
        if self.training:
            seen.append((tuple(sample.shape[-2:]), kw["added_cond_kwargs"]["time_ids"].tolist()))
        return real_forward(self, sample, timestep, encoder_hidden_states, **kw)
    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    train(tiny_config(tiny_pipeline_dir("sdxl"), tmp_path / "out", instance_data_dir=str(photos), max_train_steps=6,
                      train_batch_size=2, **BUCKETS))
    f = _vae_factor(tiny_pipeline_dir("sdxl"))
    shapes = {(h * f, w * f) for (h, w), _ in seen}  # back in pixels, (height, width)
    assert shapes <= {(48, 80), (80, 48), (64, 64)} and (48, 80) in shapes  # 80x48 for the 2:1 pair
    for (h, w), time_ids in seen:
        h, w = h * f, w * f
        for ids in time_ids:
            assert ids[4:] == [h, w]  # target size = the bucket's (height, width)
            original_h, original_w = ids[:2]
            assert (original_w > original_h) == (w > h) or w == h


def test_bucketed_resume_equals_a_straight_run(tiny_pipeline_dir, tmp_path):
    photos = _pictures(tmp_path / "photos", [(200, 100), (100, 200), (96, 96), (120, 60), (64, 64)])
    common = dict(instance_data_dir=str(photos), max_train_steps=6, checkpointing_steps=3, train_batch_size=2,
                  **BUCKETS)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(tiny_pipeline_dir(), straight, **common))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    train(tiny_config(tiny_pipeline_dir(), resumed, resume_from_checkpoint="latest", **common))
    a, b = (load_file(str(d / "singlora_weights.safetensors")) for d in (straight, resumed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_class_images_join_the_bucket_of_their_batch(tiny_pipeline_dir, tmp_path):
    photos = _pictures(tmp_path / "photos", [(200, 100), (220, 110)])
    classes = _pictures(tmp_path / "class", [(64, 64)])
    cfg = tiny_config(tiny_pipeline_dir(), tmp_path / "out", instance_data_dir=str(photos), train_batch_size=2,
                      with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a photo of dog",
                      num_class_images=1, **BUCKETS)
    inputs = validate(cfg)
    vae = _vae(tiny_pipeline_dir())
    batch = TrainingData(cfg, vae, inputs.concepts, inputs.items, inputs.class_images, True).micro_batch(0, draw_t)
    f = _vae_factor(tiny_pipeline_dir())
    assert batch.latents.shape == (4, 4, 48 // f, 80 // f) and batch.n_instance == 2
    assert batch.prompts[2:] == ["a photo of dog"] * 2


def _vae_factor(base) -> int:
    """Pixels per latent: 8 for real VAEs, less for the tiny ones."""
    return 2 ** (len(_vae(base).config.block_out_channels) - 1)


def _vae(base):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(base, subfolder="vae")


# -- captions -------------------------------------------------------------------------------

def _captioned(tmp_path, captions: dict[str, str]):
    folder = tmp_path / "photos"
    shutil.copytree(bundled_subject(), folder)
    for stem, text in captions.items():
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def test_each_image_trains_on_its_own_caption(tiny_pipeline_dir, tmp_path, monkeypatch):
    """The UNet's text conditioning per step is the encoding of the drawn image's caption (the instance
    prompt for an image without one), encoded independently by the pipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from singlora_diffusion.training import batches

    stems = sorted(p.stem for p in bundled_subject().iterdir() if p.suffix.lower() in (".jpg", ".png", ".jpeg"))
    captions = {stem: f"a photo of sks dog number {i}" for i, stem in enumerate(stems[:-1])}  # the last has none
    photos = _captioned(tmp_path, captions)
    loaded, conditioning = [], []
    real_load, real_forward = batches.load_image, UNet2DConditionModel.forward
    monkeypatch.setattr(batches, "load_image", lambda path: loaded.append(path.stem) or real_load(path))

    def spy(self, sample, timestep, encoder_hidden_states, **kw):
        if self.training:
            conditioning.append(encoder_hidden_states.detach().clone())
        return real_forward(self, sample, timestep, encoder_hidden_states, **kw)
    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    train(tiny_config(tiny_pipeline_dir(), tmp_path / "out", instance_data_dir=str(photos), caption_extension="txt",
                      cache_latents=False, max_train_steps=8))  # uncached: each step loads its image
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir())
    assert len(loaded) == len(conditioning) == 8
    for stem, embeds in zip(loaded, conditioning):
        expected = pipe.encode_prompt(captions.get(stem, "a photo of sks dog"), "cpu", 1, False)[0]
        torch.testing.assert_close(embeds, expected)
    assert stems[-1] in loaded or len(set(loaded)) < len(stems)


def test_caption_dropout_trains_that_share_of_samples_on_the_empty_prompt(tiny_pipeline_dir, tmp_path):
    photos = _captioned(tmp_path, {})
    vae = _vae(tiny_pipeline_dir())
    for rate, low, high in ((0.0, 0, 0), (0.3, 0.2, 0.4), (1.0, 1, 1)):
        cfg = tiny_config(tiny_pipeline_dir(), tmp_path / "out", instance_data_dir=str(photos),
                          caption_dropout_rate=rate, train_batch_size=4)
        inputs = validate(cfg)
        data = TrainingData(cfg, vae, inputs.concepts, inputs.items, [], False)
        prompts = [p for k in range(50) for p in data.micro_batch(k, draw_t).prompts]
        assert set(prompts) <= {"", "a photo of sks dog"}
        assert low <= prompts.count("") / len(prompts) <= high


def test_a_caption_without_the_identifier_is_warned_about_once(tiny_pipeline_dir, tmp_path):
    stems = sorted(p.stem for p in bundled_subject().iterdir())[:3]
    photos = _captioned(tmp_path, {stems[0]: "a dog on a beach", stems[1]: "a sks dog", stems[2]: "a dog"})
    cfg = tiny_config(tiny_pipeline_dir(), tmp_path / "out", instance_data_dir=str(photos), caption_extension=".txt",
                      class_prompt="a photo of dog")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate(cfg)
    assert not [w for w in caught if "skipped" in str(w.message)]  # caption files are not skipped images
    said = [str(w.message) for w in caught if "identifier" in str(w.message)]
    assert len(said) == 1 and "2 caption(s)" in said[0] and f"{stems[0]}.txt" in said[0] and "sks" in said[0]


@pytest.mark.parametrize("content,expected", [(b"\xff\xfe caption", "is not UTF-8"), (b"  \n ", "is empty")])
def test_a_broken_caption_stops_the_run_naming_the_file(content, expected, tiny_pipeline_dir, tmp_path):
    photos = _captioned(tmp_path, {})
    victim = sorted(photos.iterdir())[0].with_suffix(".txt")
    victim.write_bytes(content)
    with pytest.raises(BadInput, match=expected) as e:
        validate(tiny_config(tiny_pipeline_dir(), tmp_path / "out", instance_data_dir=str(photos),
                             caption_extension=".txt"))
    assert str(victim) in str(e.value)


# -- several concepts -----------------------------------------------------------------------

def _concepts_file(tmp_path, entries, suffix=".yaml"):
    import yaml

    path = tmp_path / f"concepts{suffix}"
    path.write_text(json.dumps(entries) if suffix == ".json" else yaml.safe_dump(entries))
    return str(path)


def _two_concepts(tmp_path):
    cats = _pictures(tmp_path / "cat", [(64, 64), (72, 72)])
    return [{"instance_data_dir": "bundled:dog3", "instance_prompt": "a photo of sks dog",
             "class_prompt": "a photo of dog", "class_data_dir": str(tmp_path / "class_dog")},
            {"instance_data_dir": str(cats), "instance_prompt": "a photo of zwx cat", "repeats": 3,
             "class_prompt": "a photo of cat", "class_data_dir": str(tmp_path / "class_cat"),
             "validation_prompt": "zwx cat on a sofa"}]


def _config(base, out, concepts, **kw):
    settings = dict(pretrained_model_name_or_path=str(base), concepts_list=concepts, output_dir=str(out),
                    resolution=64, center_crop=True, rank=2, learning_rate=1e-3, max_train_steps=2,
                    checkpointing_steps=100, report_to="none", seed=0, num_validation_images=1,
                    validation_inference_steps=2)
    return TrainConfig(**{**settings, **kw})


def test_concepts_each_train_on_their_prompt_with_their_class_images(tiny_pipeline_dir, tmp_path):
    concepts = _concepts_file(tmp_path, _two_concepts(tmp_path), ".json")
    cfg = _config(tiny_pipeline_dir(), tmp_path / "out", concepts, with_prior_preservation=True, num_class_images=1,
                  validation_prompt="a sks dog in the snow", validation_steps=2, train_batch_size=2)
    inputs = validate(cfg)
    dogs = len(scan_images(bundled_subject(), "dogs"))
    assert len(inputs.items) == dogs + 2 * 3  # repeats count each cat image three times
    files = train(cfg)
    for name in ("class_dog", "class_cat"):  # each concept's prior, generated from its class prompt
        assert len(scan_images(tmp_path / name, name)) == 1
    card = files["model_card"].read_text()
    assert "a photo of sks dog" in card and "a photo of zwx cat" in card
    # validation: the prompt, the dog's instance prompt, the cat's validation prompt
    assert len(list((tmp_path / "out" / "validation").glob("step-000002-*.png"))) == 3
    inputs.class_images = [scan_images(tmp_path / "class_dog", "d"), scan_images(tmp_path / "class_cat", "c")]
    data = TrainingData(cfg, _vae(tiny_pipeline_dir()), inputs.concepts, inputs.items, inputs.class_images, True)
    pairs = {"a photo of sks dog": "a photo of dog", "a photo of zwx cat": "a photo of cat"}
    for k in range(12):
        batch = data.micro_batch(k, draw_t)
        for instance, prior in zip(batch.prompts[:2], batch.prompts[2:]):
            assert pairs[instance] == prior  # a class sample of the instance sample's own concept


@pytest.mark.parametrize("entries,expected", [
    ([{"instance_prompt": "a sks dog"}], "'instance_data_dir' is missing"),
    ([{"instance_data_dir": "bundled:dog3", "instance_prompt": "x", "color": "red"}], "unknown key 'color'"),
    ([{"instance_data_dir": "bundled:dog3", "instance_prompt": "x", "repeats": 0}], "repeats must be"),
    ({"instance_data_dir": "bundled:dog3"}, "expected a non-empty list"),
    (["bundled:dog3"], "expected a mapping"),
])
def test_a_bad_concepts_file_gets_one_line_naming_the_file(entries, expected, tiny_pipeline_dir, tmp_path):
    path = _concepts_file(tmp_path, entries)
    with pytest.raises(BadInput, match=expected) as e:
        validate(_config(tiny_pipeline_dir(), tmp_path / "out", path))
    assert path in str(e.value)


def test_contradictory_or_missing_concept_flags_are_refused(tiny_pipeline_dir, tmp_path):
    path = _concepts_file(tmp_path, _two_concepts(tmp_path))
    with pytest.raises(BadInput, match="--concepts_list and --instance_prompt contradict"):
        _config(tiny_pipeline_dir(), tmp_path / "out", path, instance_prompt="a sks dog")
    with pytest.raises(NotFound, match="no-such.yaml: no such file"):
        validate(_config(tiny_pipeline_dir(), tmp_path / "out", str(tmp_path / "no-such.yaml")))
    missing_class = _concepts_file(tmp_path, [{"instance_data_dir": "bundled:dog3", "instance_prompt": "x"}])
    with pytest.raises(BadInput, match="concept 1: --with_prior_preservation needs class_prompt"):
        validate(_config(tiny_pipeline_dir(), tmp_path / "out", missing_class, with_prior_preservation=True))


@pytest.mark.parametrize("settings,expected", [
    (dict(min_bucket_reso=128, max_bucket_reso=256), "cannot hold --resolution 64"),
    (dict(min_bucket_reso=40), "min_bucket_reso 40 is not a multiple of --bucket_reso_steps 16"),
    (dict(bucket_reso_steps=12), "multiple of 8"),
])
def test_a_bucket_range_that_cannot_hold_the_resolution_is_refused(settings, expected, tiny_pipeline_dir, tmp_path):
    with pytest.raises(BadInput, match=expected):
        tiny_config(tiny_pipeline_dir(), tmp_path, **{**BUCKETS, **settings})


def test_small_image_warning_measures_against_the_bucket(tiny_pipeline_dir, tmp_path):
    photos = _pictures(tmp_path / "photos", [(100, 50), (100, 100)])  # 2:1 trains at 80x48 in a bucket
    for buckets, warned in (({}, True), (BUCKETS, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            validate(tiny_config(tiny_pipeline_dir(), tmp_path / "out", instance_data_dir=str(photos), **buckets))
        said = [str(w.message) for w in caught if "upscaled" in str(w.message)]
        assert bool(said) == warned and all("img0.png upscaled from 100x50" in m for m in said)
