"""Document-aware attention (``data.reset_attention_at_eos=true``) end to end: every parallel layout gives the
single-process losses and gradient norms (relative 1e-4), and the packed documents really are separated (the
losses differ from the same run without document masking)."""
import numpy as np
import pytest

from helpers import train, write_token_dir

pytestmark = pytest.mark.slow

EOS = 1
# seq 128: the CPU blocked-attention path engages (T >= 128), windows hold several documents
DOC = ["data.reset_attention_at_eos=true", "data.seq_length=128"]


@pytest.fixture(scope="module")
def doc_data(tmp_path_factory):
    """Short documents (10-80 tokens of repeated phrases) each ending in eos: ~3 boundaries per 128-token window."""
    rng = np.random.default_rng(1)
    phrases = [rng.integers(2, 512, rng.integers(3, 10)) for _ in range(30)]
    docs = []
    for _ in range(400):
        body = np.concatenate([phrases[i] for i in rng.integers(0, 30, rng.integers(2, 10))])[:79]
        docs.append(np.concatenate([body, [EOS]]))
    return write_token_dir(str(tmp_path_factory.mktemp("docs") / "train"), docs, vocab_size=512, eos_id=EOS)


@pytest.fixture(scope="module")
def doc_reference(doc_data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("docref") / "run", doc_data, 1, *DOC)


def test_document_masking_changes_the_losses(doc_data, doc_reference, tmp_path):
    plain = train(tmp_path / "plain", doc_data, 1, "data.seq_length=128")
    assert abs(plain[0]["lm_loss"] - doc_reference[0]["lm_loss"]) > 1e-4


@pytest.mark.parametrize("nproc, layout", [
    (2, []),
    (2, ["parallel.tp=2"]),
    (2, ["parallel.ep=2"]),
    (2, ["parallel.pp=2"]),
    (4, ["parallel.tp=2", "parallel.ep=2"]),
    (4, ["parallel.pp=2", "parallel.ep=2"]),
    (4, ["parallel.tp=2", "parallel.pp=2"]),
], ids=["dp2", "tp2", "dp2-ep2", "pp2", "tp2-dp2-ep2", "pp2-dp2-ep2", "tp2-pp2"])
def test_layout_equals_single_process_with_document_masks(doc_data, doc_reference, tmp_path, nproc, layout):
    got = train(tmp_path / "run", doc_data, nproc, *DOC, *layout)
    assert [r["step"] for r in got] == [r["step"] for r in doc_reference]
    for want, have in zip(doc_reference, got):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(have[key] - want[key]) <= 1e-4 * abs(want[key]), (layout, want["step"], key, want, have)
