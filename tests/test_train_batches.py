"""The sample stream: every image once per epoch, disjoint shards, resumable across process counts."""
from singlora_diffusion.training.batches import sample_indices


def test_each_epoch_is_a_permutation():
    stream = sample_indices(6, 0, 18, seed=3)
    for epoch in range(3):
        assert sorted(stream[6 * epoch: 6 * epoch + 6]) == list(range(6))
    assert stream[:6] != stream[6:12]  # a new order each epoch


def test_shards_and_batches_cut_the_same_stream():
    whole = sample_indices(5, 0, 12, seed=0)
    # two processes, batch 2: position p, rank r reads samples (p*2 + r)*2 ...
    shards = {(p, r): sample_indices(5, (p * 2 + r) * 2, 2, seed=0) for p in range(3) for r in range(2)}
    assert [i for p in range(3) for r in range(2) for i in shards[(p, r)]] == whole
