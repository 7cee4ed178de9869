"""Packed, blended, data-parallel sample stream on megatron-core's GPT datasets (CPU, no process group)."""
import os
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.dataset import SampleStream, build_dataset, document_boundaries
from data_pipeline.readers import DataError
from helpers import write_token_dir


def unique_docs(num_docs, first_token, seed):
    """Documents whose tokens are globally unique consecutive ids, so any window can be traced back."""
    rng = np.random.default_rng(seed)
    docs, nxt = [], first_token
    for n in rng.integers(1, 60, size=num_docs):
        docs.append(np.arange(nxt, nxt + n))
        nxt += n
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    docs_a = unique_docs(300, 1, seed=0)         # tokens 1 .. ~9000
    docs_b = unique_docs(200, 30000, seed=1)     # tokens 30000 .. ~36000, spread over several shards
    a = write_token_dir(str(root / "a"), docs_a)
    b = write_token_dir(str(root / "b"), docs_b, shard_size_tokens=1500)
    return {"a": a, "b": b, "docs_a": docs_a, "root": root}


def test_windows_are_cut_from_the_concatenated_stream(corpus):
    docs, seq = corpus["docs_a"], 32
    total = sum(map(len, docs))
    per_epoch = (total - 1) // seq
    ds = build_dataset([corpus["a"]], None, seq, seed=3, num_samples=per_epoch)
    firsts, lasts = {int(d[0]) for d in docs}, {int(d[-1]) for d in docs}
    seen = []
    for i in range(len(ds)):
        w = ds[i]
        assert w.dtype == np.int64 and w.shape == (seq + 1,)
        for a, b in zip(w[:-1].tolist(), w[1:].tolist()):  # consecutive in a document, or a document boundary
            assert (a not in lasts and b == a + 1) or (a in lasts and b in firsts)
        seen += w[:-1].tolist()
    # one epoch: windows overlap by exactly one token, so w[:-1] never repeats a token and nothing is padded
    assert len(seen) == len(set(seen)) == per_epoch * seq
    assert len(set(ds[i][0] for i in range(len(ds)))) == len(ds)


def test_several_epochs_when_num_samples_exceeds_one_pass(corpus):
    docs, seq = corpus["docs_a"], 32
    total = sum(map(len, docs))
    ds = build_dataset([corpus["a"]], None, seq, seed=3, num_samples=int(3.5 * total / seq))
    counts = Counter(t for i in range(len(ds)) for t in ds[i][:-1].tolist())
    assert set(counts) == set(np.concatenate(docs).tolist())
    assert min(counts.values()) == 3 and max(counts.values()) == 4


def test_blend_hits_weights_within_one_percent(corpus):
    ds = build_dataset([corpus["a"], corpus["b"]], [0.3, 0.7], 16, seed=5, num_samples=10_000)
    from_a = np.array([ds[i][0] < 30000 for i in range(len(ds))])
    assert all(ds[i].max() < 30000 or ds[i].min() >= 30000 for i in range(0, 10_000, 7))  # no mixed windows
    assert abs(from_a.mean() - 0.3) <= 0.01
    assert abs(from_a[:1000].mean() - 0.3) <= 0.01  # megatron's greedy blend is on target at every prefix
    # weights=None: in proportion to the tokens of each path
    tokens_a = sum(map(len, corpus["docs_a"]))
    tokens_b = sum(len(np.fromfile(os.path.join(corpus["b"], f), dtype=np.uint16))
                   for f in os.listdir(corpus["b"]) if f.endswith(".bin"))
    ds = build_dataset([corpus["a"], corpus["b"]], None, 16, seed=5, num_samples=10_000)
    share_a = np.mean([ds[i][0] < 30000 for i in range(len(ds))])
    assert abs(share_a - tokens_a / (tokens_a + tokens_b)) <= 0.01


def test_order_is_deterministic_from_the_seed(corpus):
    paths, weights = [corpus["a"], corpus["b"]], [1.0, 2.0]
    ds1 = build_dataset(paths, weights, 16, seed=11, num_samples=500)
    ds2 = build_dataset(paths, weights, 16, seed=11, num_samples=500)
    ds3 = build_dataset(paths, weights, 16, seed=12, num_samples=500)
    same = [np.array_equal(ds1[i], ds2[i]) for i in range(500)]
    other = [np.array_equal(ds1[i], ds3[i]) for i in range(500)]
    assert all(same) and sum(other) < 50


def test_global_order_does_not_depend_on_dp_size(corpus):
    ds = build_dataset([corpus["a"], corpus["b"]], [0.5, 0.5], 16, seed=1, num_samples=400)
    gbs, steps = 8, 6
    reference = SampleStream(ds, 0, 1, micro_batch_size=2)
    expected = [torch.cat(reference.next_batch(gbs)) for _ in range(steps)]
    for dp, mbs in ((2, 2), (4, 1), (2, 4)):
        ranks = [SampleStream(ds, r, dp, micro_batch_size=mbs) for r in range(dp)]
        for step in range(steps):
            per_rank = [rank.next_batch(gbs) for rank in ranks]
            assert all(len(mb) == gbs // dp // mbs and mb[0].shape == (mbs, 17) for mb in per_rank)
            got = torch.cat([torch.cat(mb) for mb in per_rank])
            assert got.dtype == torch.int64 and torch.equal(got, expected[step])
        assert ranks[0].consumed_samples == steps * gbs


def test_resume_at_sample_k_continues_exactly(corpus):
    def make():
        return build_dataset([corpus["a"], corpus["b"]], [0.4, 0.6], 16, seed=9, num_samples=300)
    run = SampleStream(make(), 1, 2, micro_batch_size=2)
    for _ in range(3):
        run.next_batch(8)
    state = run.state_dict()
    assert state == {"consumed_samples": 24}
    continued = [run.next_batch(8) for _ in range(4)]
    resumed = SampleStream(make(), 1, 2, micro_batch_size=2, consumed_samples=state["consumed_samples"])
    fresh = SampleStream(make(), 1, 2, micro_batch_size=2)
    fresh.load_state_dict(state)
    for stream in (resumed, fresh):
        for want in continued:
            got = stream.next_batch(8)
            assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA device")
def test_pinned_batches_on_gpu_hosts(corpus):
    def batches(pin):
        ds = build_dataset([corpus["a"]], None, 16, seed=1, num_samples=16)
        return SampleStream(ds, 0, 1, 4, pin_memory=pin).next_batch(8)
    pinned, plain = batches(True), batches(False)
    assert all(b.is_pinned() for b in pinned) and not any(b.is_pinned() for b in plain)
    assert all(torch.equal(a, b) for a, b in zip(pinned, plain))


def test_stream_errors(corpus):
    ds = build_dataset([corpus["a"]], None, 16, seed=1, num_samples=16)
    with pytest.raises(ValueError, match="not a multiple"):
        SampleStream(ds, 0, 2, 3).next_batch(8)
    stream = SampleStream(ds, 0, 1, 4)
    stream.next_batch(16)
    with pytest.raises(DataError, match="built for 16 samples"):
        stream.next_batch(16)


def test_clear_errors_before_training(corpus, tmp_path):
    docs = unique_docs(50, 1, seed=2)
    broken = write_token_dir(str(tmp_path / "broken"), docs, shard_size_tokens=400)
    cases = []
    os.remove(os.path.join(broken, "shard_00001.bin"))
    cases.append(([broken], "missing shard file"))
    trunc = write_token_dir(str(tmp_path / "trunc"), docs)
    with open(os.path.join(trunc, "shard_00000.bin"), "r+b") as f:
        f.truncate(100)
    cases.append(([trunc], "mismatched or truncated"))
    os.makedirs(tmp_path / "plain")
    cases.append(([str(tmp_path / "plain")], "has no manifest.json"))
    cases.append(([str(tmp_path / "nowhere")], "not found"))
    other = write_token_dir(str(tmp_path / "other"), docs, sha256="another-tokenizer")
    cases.append(([corpus["a"], other], "different tokenizers"))
    for paths, message in cases:
        with pytest.raises(DataError, match=message) as err:
            build_dataset(paths, None, 16, seed=1, num_samples=10)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="data.weights has 1 entries"):
        build_dataset([corpus["a"], corpus["b"]], [1.0], 16, seed=1, num_samples=10)


def test_shard_prefix_paths_are_accepted(corpus):
    prefix = os.path.join(corpus["b"], "shard_00001")
    ds = build_dataset([prefix], None, 8, seed=1, num_samples=20)
    assert len(ds) == 20 and all(ds[i].min() >= 30000 for i in range(20))


def test_document_boundaries():
    tokens = torch.tensor([[5, 2, 7, 8, 2, 9], [2, 2, 4, 4, 4, 2]])
    from pretrain.model.transformer import positions_in_documents

    document_ids = document_boundaries(tokens, eos_id=2)
    assert document_ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    assert positions_in_documents(document_ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]
