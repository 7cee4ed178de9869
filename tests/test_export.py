"""HuggingFace export/import: logits parity with transformers (fp32) and exact round trips."""
import json
from pathlib import Path

import pytest
import torch

from helpers import CONFIGS, make_model
from pretrain.config import ModelConfig
from pretrain.export import from_hf, hf_family, main, to_hf

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

def hf_logits(path, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf, hf(ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_parity_with_transformers(name, tmp_path):
    model, cfg = make_model(name)
    to_hf(model, cfg, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    hf, theirs = hf_logits(tmp_path, ids)
    expected_class = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                      "llama": "LlamaForCausalLM"}[hf_family(cfg)]
    assert type(hf).__name__ == expected_class
    with torch.no_grad():
        ours = model(ids)
    assert (ours - theirs).abs().max().item() < 1e-4
    # the checkpoint really carries what makes the logits differ: the correction bias (V3)
    if cfg.scoring_func == "sigmoid" and cfg.is_moe:
        bias = hf.model.layers[cfg.first_k_dense_replace].mlp.gate.e_score_correction_bias
        assert bias.abs().sum() > 0


def test_mtp_not_exported_and_sharded_index(tmp_path):
    model, cfg = make_model("v3_groups_mtp")
    assert len(model.mtp) == 1
    to_hf(model, cfg, tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    keys = []
    for shard in shards:
        with safe_open(str(tmp_path / shard), "pt") as f:
            keys += list(f.keys())
    assert sorted(keys) == sorted(index["weight_map"])
    assert not [k for k in keys if "mtp" in k or "eh_proj" in k or "enorm" in k or ".layers.3." in k]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize("name", ["v3_groups_mtp", "v2_softmax_groups", "v3_dense_mla", "llama_gqa"])
def test_from_hf_round_trip_is_exact(name, tmp_path):
    model, cfg = make_model(name)
    to_hf(model, cfg, tmp_path)
    loaded, loaded_cfg = from_hf(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded.eval()(ids))
    for key in ("attention", "n_group", "topk_group", "scoring_func", "q_lora_rank", "rope_scaling", "kv_heads"):
        assert getattr(loaded_cfg, key) == getattr(cfg, key), key


def test_from_hf_reads_transformers_fused_expert_layout(tmp_path):
    """A folder written by transformers' own save_pretrained (fused gate_up_proj or not) loads back exactly."""
    model, cfg = make_model("v3_yarn_dense2")
    to_hf(model, cfg, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "theirs")
    loaded, _ = from_hf(tmp_path / "theirs")
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded.eval()(ids))


def test_export_errors_are_one_line():
    with pytest.raises(ValueError, match="model.n_routed_experts=4"):
        hf_family(ModelConfig(attention="gqa", num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=1))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        hf_family(ModelConfig(**dict(CONFIGS["v2_lite_greedy"], norm_topk_prob=True)))


def test_cli_reports_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretrain.export: error:") and "\n" not in err


def test_tokenizer_is_exported_and_loads_with_autotokenizer(tmp_path):
    tok_mod = pytest.importorskip("data_pipeline.tokenizer")
    import glob
    corpus = tmp_path / "corpus.txt"
    stdlib_json = sorted(glob.glob(str(Path(json.__file__).parent / "*.py")))
    corpus.write_text("\n".join(Path(f).read_text() for f in stdlib_json))
    ours_tok = tok_mod.train_tokenizer([str(corpus)], 600, str(tmp_path / "tok.model"))
    model, cfg = make_model("llama_gqa")
    to_hf(model, cfg, tmp_path / "hf", tokenizer=ours_tok)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (tmp_path / "tok.model").read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["def f(x):\n    return x + 12345\n", "  héllo  wörld ✓ 你好\n\n\tend", "text with <eos> inside"]:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ours_tok.encode(text)
        assert hf_tok.decode(ids) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        ours_tok.bos_id, ours_tok.eos_id, ours_tok.pad_id)
    with pytest.raises(FileNotFoundError, match="no such sentencepiece"):
        to_hf(model, cfg, tmp_path / "hf2", tokenizer=tmp_path / "missing.model")


def test_cli_exports_what_the_checkpoint_loader_returns(tmp_path, monkeypatch, capsys):
    checkpoint = pytest.importorskip("pretrain.checkpoint")
    model, cfg = make_model("v3_groups_mtp")

    class RunConfig:  # load_model_from_checkpoint returns the full run config; export uses its .model
        pass

    run_cfg = RunConfig()
    run_cfg.model = cfg
    seen = []
    monkeypatch.setattr(checkpoint, "load_model_from_checkpoint",
                        lambda p, trust_unverified: (seen.append((p, trust_unverified)), (model, run_cfg, None))[1])
    assert main(["--checkpoint", "RUN", "--output", str(tmp_path / "out")]) == 0
    assert seen == [("RUN", False)] and "deepseek_v3" in capsys.readouterr().out
    assert main(["--checkpoint", "RUN", "--output", str(tmp_path / "out2"), "--trust-unverified"]) == 0
    assert seen[-1] == ("RUN", True)
    loaded, _ = from_hf(tmp_path / "out")
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), loaded.eval()(ids))
