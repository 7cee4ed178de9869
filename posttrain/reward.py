"""A trained reward model (``posttrain.rm``): scores in Python and export to transformers.

    rm = RewardModel.load("runs/rm")               # a run directory (its `latest`) or a step directory
    rm.score(["<｜User｜>2+3=<｜Assistant｜>5<｜end_of_turn｜>", [{"role": "user", ...}, ...]])  # -> [float, ...]

    python -m posttrain.reward --checkpoint RUN_OR_STEP --output HF_DIR

The export writes transformers' ``DeepseekV3ForSequenceClassification`` / ``DeepseekV2ForSequenceClassification`` /
``LlamaForSequenceClassification`` (num_labels = 1): the trunk as ``pretrain.export.to_hf`` writes it (MTP dropped)
and the value row of the LM head (``posttrain.objectives.VALUE_ROW``) as ``score.weight``; transformers reads the
score at the last non-pad token, as ``score`` does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from posttrain.chat import ChatTokenizer, render
from posttrain.objectives import VALUE_ROW

_FAMILY_CLASS = {"deepseek_v3": "DeepseekV3", "deepseek_v2": "DeepseekV2", "llama": "Llama"}


class RewardModel:
    """A reward model on the CPU (or ``device``) with its chat tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: ChatTokenizer, device="cpu"):
        self.model, self.tok, self.device = model.to(device).eval(), tokenizer, torch.device(device)

    @classmethod
    def load(cls, path, device="cpu") -> "RewardModel":
        from pretrain.checkpoint import load_model_from_checkpoint

        model, _, tokenizer = load_model_from_checkpoint(path)
        return cls(model, ChatTokenizer(tokenizer), device)

    def ids(self, text) -> list[int]:
        """A string is tokenized as it is (chat pieces included); a messages list is rendered with the template."""
        return self.tok.encode(text) if isinstance(text, str) else render(self.tok, text)[0]

    @torch.no_grad()
    def score(self, texts: list, batch_size: int = 16) -> list[float]:
        """The reward of each text or conversation: the value head at its last token."""
        out = []
        for first in range(0, len(texts), batch_size):
            seqs = [self.ids(t) for t in texts[first:first + batch_size]]
            width = max(len(s) for s in seqs)
            batch = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
            for i, s in enumerate(seqs):  # right padding: causal attention keeps it out of the real tokens
                batch[i, :len(s)] = torch.tensor(s)
            logits = self.model(batch.to(self.device))  # (B, T, V)
            lengths = torch.tensor([len(s) for s in seqs], device=self.device)
            out += logits[torch.arange(len(seqs)), lengths - 1, VALUE_ROW].float().tolist()
        return out


def to_hf_reward(model: torch.nn.Module, model_cfg, output_dir, tokenizer=None, pad_token_id: int | None = None
                 ) -> Path:
    """Write ``model`` as transformers' ``*ForSequenceClassification`` with one label (the reward)."""
    from huggingface_hub import save_torch_state_dict

    from pretrain.export import _read_safetensors, hf_config, hf_family, to_hf

    out = to_hf(model, model_cfg, output_dir, tokenizer)
    state = _read_safetensors(out)
    head = model.lm_head.weight if "lm_head.weight" in dict(model.named_parameters()) else model.embed_tokens.weight
    state.pop("lm_head.weight", None)
    state["score.weight"] = head.detach()[VALUE_ROW:VALUE_ROW + 1].to(next(iter(state.values())).dtype).cpu().clone()
    for f in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        f.unlink()
    save_torch_state_dict(state, out)
    config = hf_config(model_cfg)
    config.architectures = [f"{_FAMILY_CLASS[hf_family(model_cfg)]}ForSequenceClassification"]
    config.num_labels, config.pad_token_id = 1, pad_token_id
    config.dtype = state["score.weight"].dtype
    config.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    from pretrain.checkpoint import load_model_from_checkpoint

    p = argparse.ArgumentParser(prog="python -m posttrain.reward",
                                description="Export a posttrain.rm run as transformers' *ForSequenceClassification.")
    p.add_argument("--checkpoint", required=True, help="run directory (uses `latest`) or a step_NNNNNNN directory")
    p.add_argument("--output", required=True, help="output folder")
    args = p.parse_args(argv)
    try:
        model, cfg, tokenizer = load_model_from_checkpoint(args.checkpoint)
        pad = ChatTokenizer(tokenizer).pad_id if tokenizer else None
        out = to_hf_reward(model, cfg.model, args.output, tokenizer, pad)
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(json.dumps({"output": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
