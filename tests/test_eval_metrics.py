"""The metric math against an independent float64 numpy computation, and the protocol's text side."""
import math

import numpy as np
import pytest
import torch

from singlora_diffusion.evaluation import metrics
from singlora_diffusion.evaluation.protocol import (LIVE_CLASSES, clip_t_text, fill, make_prompts, read_dreambench,
                                                    read_prompt_file, remove_identifier)


def _np_cos(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float(u @ v / (math.sqrt(u @ u) * math.sqrt(v @ v)))


@pytest.fixture
def emb():
    g = torch.Generator().manual_seed(3)
    # float32 inputs of different norms and a shared offset, so normalisation matters
    generated = torch.randn(5, 16, generator=g) * torch.linspace(0.1, 10, 5)[:, None] + 0.3
    real = torch.randn(4, 16, generator=g) * 3 + 0.3
    texts = torch.randn(5, 16, generator=g)
    return generated.float(), real.float(), texts.float()


def test_image_similarity_is_the_mean_over_every_generated_real_pair(emb):
    generated, real, _ = emb
    per_image = metrics.image_similarity(generated, real)
    expected = [np.mean([_np_cos(g, r) for r in real.numpy()]) for g in generated.numpy()]
    np.testing.assert_allclose(per_image.numpy(), expected, rtol=0, atol=1e-12)
    all_pairs = np.mean([_np_cos(g, r) for g in generated.numpy() for r in real.numpy()])
    assert metrics.mean(per_image.tolist()) == pytest.approx(all_pairs, abs=1e-12)
    assert per_image.dtype == torch.float64


def test_text_similarity_pairs_row_i_with_row_i(emb):
    generated, _, texts = emb
    expected = [_np_cos(g, t) for g, t in zip(generated.numpy(), texts.numpy())]
    np.testing.assert_allclose(metrics.text_similarity(generated, texts).numpy(), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="5 images but 4 texts"):
        metrics.text_similarity(generated, texts[:4])


def test_real_vs_real_averages_distinct_ordered_pairs(emb):
    _, real, _ = emb
    r = real.numpy()
    expected = np.mean([_np_cos(r[j], r[k]) for j in range(4) for k in range(4) if j != k])
    assert metrics.real_vs_real(real) == pytest.approx(expected, abs=1e-12)
    assert metrics.real_vs_real(real[:1]) is None  # one photo: no pair


def test_scores_are_raw_cosines_not_rescaled():
    a = torch.tensor([[1.0, 0.0]])
    assert metrics.image_similarity(a, torch.tensor([[-1.0, 0.0]])).item() == -1.0  # not clipped at 0
    assert metrics.image_similarity(a, torch.tensor([[3.0, 0.0]])).item() == 1.0    # not x100, not x2.5
    assert metrics.text_similarity(a, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(math.sqrt(0.5), abs=1e-15)


def test_mismatched_embedding_sizes_are_refused():
    with pytest.raises(ValueError, match="embedding sizes differ: 3 vs 4"):
        metrics.cosine_matrix(torch.ones(2, 3), torch.ones(2, 4))


def test_dreambench_file_parses_to_the_protocol():
    bench = read_dreambench()
    assert len(bench.classes) == 30 and bench.classes["dog3"] == "dog" and bench.classes["rc_car"] == "toy"
    assert sum(c in LIVE_CLASSES for c in bench.classes.values()) == 9  # "9 live subjects (dogs and cats)"
    assert len(bench.object_prompts) == len(bench.live_prompts) == 25
    assert bench.templates_for("dog")[10] == "a {0} {1} wearing a red hat"
    assert bench.templates_for("toy")[10] == "a {0} {1} with a wheat field in the background"
    prompts = make_prompts(bench.templates_for("dog"), "sks", "dog")
    assert prompts[0].text == "a sks dog in the jungle" and prompts[0].template == "a {0} {1} in the jungle"


def test_identifier_removal_for_clip_t():
    assert remove_identifier("a sks dog in the jungle", "sks") == "a dog in the jungle"
    assert remove_identifier("a V* dog", "V*") == "a dog"
    assert remove_identifier("tasks for a sks dog", "sks") == "tasks for a dog"  # whole tokens only
    assert clip_t_text("a sks dog", "sks", remove=False) == "a sks dog"
    assert clip_t_text("a sks dog", "sks", remove=True) == "a dog"


def test_prompt_files_and_placeholders(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\na {identifier} {class} on a boat\na {0} {1} in space\nplain text\n")
    templates = read_prompt_file(path)
    assert [fill(t, "zwx", "cat") for t in templates] == ["a zwx cat on a boat", "a zwx cat in space", "plain text"]
    with pytest.raises(ValueError, match="file name"):
        make_prompts(["a {0} {1} on 1/2 of a table"], "sks", "dog")
    with pytest.raises(ValueError, match="repeat"):
        make_prompts(["a {0} {1}", "a  {0} {1}"], "sks", "dog")
