"""Rollouts for GRPO on the live training model: RL prompts, sampling, rewards, the rollout's global tensors, the
per-rank files that make a resume mid-rollout exact, and the MoE route recorder.

A rollout (index r) is ``rl.prompts_per_step`` (P) prompts x ``rl.group_size`` (G) outputs, prompt-major. Each
data-parallel rank samples P / dp of the prompts (G times each) with ``pretrain.generate.generate`` on the sharded
policy, seeded from (train.seed, r, round, dp rank), TP ranks of a DP rank alike; it scores its own outputs, and the
tokens, lengths and rewards are all-gathered over the data-parallel group, so every rank holds the same global
rollout (N = P x G rows of ``data.seq_length`` tokens: prompt, response, padding). Mini-batch k is global rows
[k B, (k + 1) B) (B = ``train.global_batch_size``), data-parallel rank d trains the d-th slice of it: the split is the
same in every layout, and only the per-token tensors of a rank's own rows (pi_old and pi_ref log-probs, routes) are
computed on that rank.

Files: ``train.output_dir/rollouts/rollout_RRRRRR_dpDDD.pt`` (written by the TP rank 0 of each DP rank when the
rollout is made: the global rollout plus this rank's per-token tensors) and ``rollout_RRRRRR.json`` (the prompt
cursor after it). A resumed run reloads the rollout its next step belongs to (any layout: rows are found by global
index across the files), so a run stopped after mini-batch k continues bit-exactly; files no checkpoint can need are
pruned.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from posttrain.data import IGNORE_INDEX, Skipped, _epoch_order, _messages, read_records


# ----------------------------------------------------------------------------------------------- prompts

@dataclass
class Prompt:
    ids: list
    """The rendered prompt (chat template, generation prompt appended)."""
    prompt: object
    """The record's "prompt" as given (str or messages): the reward functions' first argument."""
    sample: dict
    """The whole jsonl record: the reward functions' third argument."""


def load_prompts(paths: list, tok, seq_length: int, max_new_tokens: int, skipped: dict) -> list[Prompt]:
    """``{"prompt": str | messages, ...}`` records -> Prompts whose ids + ``max_new_tokens`` fit ``seq_length``."""
    from posttrain.chat import render

    def parse(obj: dict) -> list:
        if "prompt" not in obj:
            raise Skipped("missing_key")
        return [(obj["prompt"], _messages(obj["prompt"], "user"), obj)]

    out = []
    for prompt, messages, obj in read_records(paths, parse, skipped):
        ids = render(tok, messages, add_generation_prompt=True)[0]
        if len(ids) + max_new_tokens > seq_length:
            skipped["longer_than_seq_length"] = skipped.get("longer_than_seq_length", 0) + 1
            continue
        out.append(Prompt(ids, prompt, obj))
    return out


@functools.lru_cache(maxsize=4)
def _order(num_prompts: int, seed: int, epoch: int) -> np.ndarray:
    return _epoch_order(num_prompts, seed, epoch)


def prompt_at(cursor: int, num_prompts: int, seed: int) -> int:
    """The prompt index at position ``cursor`` of the stream of shuffled epochs (posttrain.data's epoch order)."""
    return int(_order(num_prompts, seed, cursor // num_prompts)[cursor % num_prompts])


class PromptEpochs:
    """``PosttrainObjective.dataset`` for RL: an epoch is every prompt's G samples, each trained mu times (so
    ``train.epochs`` sizes the run in optimizer steps of ``train.global_batch_size`` sequences)."""

    def __init__(self, num_prompts: int, rows_per_prompt: int):
        self.num_rows = num_prompts * rows_per_prompt

    def rows_of(self, epoch: int) -> range:
        return range(self.num_rows)


def sample_seed(seed: int, rollout: int, round_: int, dp_rank: int) -> int:
    """The generation seed of one rank's share of one round of a rollout (the same on its TP ranks)."""
    return int(np.random.SeedSequence([seed, rollout, round_, dp_rank]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ rollout rows

def response_mask(prompt_len: torch.Tensor, resp_len: torch.Tensor, width: int) -> torch.Tensor:
    """(N,), (N,) -> (N, width) bool over label positions: True where the label is a response token (label t is
    token t + 1, so the response's j-th token is label prompt_len - 1 + j)."""
    t = torch.arange(width)
    start = (prompt_len - 1)[:, None]
    return (t >= start) & (t < start + resp_len[:, None])


def rows_tensor(prompts: list[list[int]], responses: list[list[int]], seq_length: int) -> torch.Tensor:
    """Prompt + response of each output, right-padded with 0 to ``seq_length``: (N, seq_length) long."""
    rows = torch.zeros(len(prompts), seq_length, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        rows[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
    return rows


def labels_of(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows (B, S) and the response mask (B, S - 1) -> labels (B, S - 1): the next token, -100 off the response."""
    return tokens[:, 1:].masked_fill(~mask, IGNORE_INDEX)


def local_rows(num_rows: int, global_batch: int, dp_size: int, dp_rank: int) -> torch.Tensor:
    """The global rows data-parallel rank ``dp_rank`` trains, in mini-batch order: slice d of every mini-batch."""
    share = global_batch // dp_size
    return torch.cat([torch.arange(k * global_batch + dp_rank * share, k * global_batch + (dp_rank + 1) * share)
                      for k in range(num_rows // global_batch)])


def dp_all_gather(tensor: torch.Tensor, topo) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) over the data-parallel group, in dp-rank order."""
    if not dist.is_initialized() or topo.dp_size == 1:
        return tensor
    group = None if topo.is_trivial else topo.dp_group
    parts = [torch.empty_like(tensor) for _ in range(topo.dp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


@dataclass
class Rollout:
    """One rollout: the global rows (identical on every rank) and this rank's per-token tensors."""

    index: int
    cursor_end: int
    """Prompt cursor after this rollout (the next rollout's first prompt)."""
    tokens: torch.Tensor
    """(N, S) long: prompt + response + padding, prompt-major (rows p G ... p G + G - 1: prompt p's group)."""
    prompt_len: torch.Tensor
    resp_len: torch.Tensor
    """(N,) long each."""
    loss_mask: torch.Tensor
    """(N, S - 1) bool: the response tokens the loss sees (overlong filtering removes truncated outputs)."""
    advantages: torch.Tensor
    """(N,) fp32 group advantages."""
    metrics: dict
    """Rollout statistics, identical on every rank (rl/reward_mean, ...)."""
    rows: torch.Tensor
    """(n,) global indices of this rank's rows, in mini-batch order."""
    logp_old: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None
    """(n, S - 1) fp32 per-token log-probs of this rank's rows (0 off the response)."""
    routes: torch.Tensor | None = None
    """(n, L, S - 1, K) int16 experts routed at the pi_old forward (MoE), for replay and the flip rate."""
    token_advantages: torch.Tensor | None = None
    values_old: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    """PPO: (n, S - 1) fp32 GAE advantages (whitened), the critic's values at rollout time, the value targets."""

    LOCAL = ("logp_old", "logp_ref", "routes", "token_advantages", "values_old", "returns")

    def state(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def rollout_dir(cfg) -> Path:
    return Path(cfg.train.output_dir) / "rollouts"


def stage_suffix(topo) -> str:
    """A pipeline stage's own rollout files (its routers' routes): ``_ppNN`` under parallel.pp > 1, else ''."""
    return f"_pp{topo.pp_rank:02d}" if topo.pp > 1 else ""


def save_rollout(rollout: Rollout, cfg, topo) -> None:
    """This DP rank's file (its TP rank 0 writes; one per pipeline stage) and the cursor json (global rank 0)."""
    d = rollout_dir(cfg)
    if topo.tp_rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"rollout_{rollout.index:06d}_dp{topo.dp_rank:03d}{stage_suffix(topo)}.pt.tmp"
        torch.save(rollout.state(), tmp)
        tmp.replace(tmp.with_suffix(""))
    if dist.get_rank() == 0:
        (d / f"rollout_{rollout.index:06d}.json").write_text(json.dumps({"cursor_end": rollout.cursor_end}))


def load_cursor(cfg, index: int) -> int:
    path = rollout_dir(cfg) / f"rollout_{index:06d}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run directory lost the rollout files its checkpoint needs; "
                                f"resume from a checkpoint at a rollout boundary or start a new train.output_dir")
    return json.loads(path.read_text())["cursor_end"]


def load_rollout(cfg, index: int, rows: torch.Tensor, suffix: str = "") -> Rollout:
    """Rollout ``index`` from its files, with the per-token tensors of the global ``rows`` this rank trains (saved by
    whichever DP rank held them, in any data-parallel size); ``suffix``: this pipeline stage's files
    (``stage_suffix``; a mid-rollout resume keeps the pipeline layout, whose stages hold different routers)."""
    import re

    pattern = re.compile(rf"rollout_{index:06d}_dp\d+{suffix}\.pt")
    files = sorted(f for f in rollout_dir(cfg).glob(f"rollout_{index:06d}_dp*.pt") if pattern.fullmatch(f.name))
    if not files:
        raise FileNotFoundError(f"{rollout_dir(cfg)}/rollout_{index:06d}_dp*{suffix}.pt is missing: the resumed step "
                                f"is in the middle of rollout {index}, whose pi_old cannot be recomputed (or was made "
                                f"with another parallel.pp); resume from a checkpoint at a rollout boundary")
    states = [torch.load(f, weights_only=True) for f in files]
    state = dict(states[0])
    held = torch.cat([s["rows"] for s in states])
    where = torch.full((int(held.max()) + 1,), -1, dtype=torch.long)
    where[held] = torch.arange(len(held))
    pick = where[rows]
    if (pick < 0).any():
        raise FileNotFoundError(f"rollout {index}: rows {rows[pick < 0][:4].tolist()} are in no file of "
                                f"{rollout_dir(cfg)}")
    for key in Rollout.LOCAL:
        if state[key] is not None:
            state[key] = torch.cat([s[key] for s in states])[pick]
    state["rows"] = rows
    return Rollout(**state)


def _reference_file(cfg, index: int) -> Path:
    return rollout_dir(cfg) / f"reference_{index:06d}_rank{dist.get_rank():05d}.pt"


def save_reference(reference, cfg, index: int) -> None:
    """``rl.ref_reset_interval``: the reference just copied from the policy at rollout ``index``, this rank's shard
    (a resumed run must continue against it)."""
    rollout_dir(cfg).mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), _reference_file(cfg, index))


def restore_reference(reference, cfg, index: int) -> None:
    """The reference as it was during rollout ``index``: the last reset's weights (the init weights before any)."""
    every = cfg.rl.ref_reset_interval
    if reference is None or not every or index < every:
        return
    path = _reference_file(cfg, index // every * every)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the reference reset at rollout {index // every * every} "
                                f"(rl.ref_reset_interval={every}) was saved by another layout or deleted; resume "
                                f"with the layout that saved it")
    reference.load_state_dict(torch.load(path, weights_only=True))


def prune_rollouts(cfg, steps_per_rollout: int, ref_every: int = 0) -> None:
    """Delete rollout files no complete checkpoint can need (rank 0): a checkpoint at step s needs rollout
    q = s // steps_per_rollout (mid-rollout) or the cursor of the one before it, and the last reference reset."""
    from pretrain.checkpoint import complete_tags

    tags = complete_tags(Path(cfg.train.output_dir))
    if not tags:
        return
    oldest = min(int(t.split("_")[1]) for t in tags) // steps_per_rollout
    for f in rollout_dir(cfg).glob("r*_*"):
        index = int(f.name.split("_")[1].split(".")[0])
        if f.name.startswith("reference"):
            keep_from = (oldest - 1) // ref_every * ref_every if ref_every else 0
        else:
            keep_from = oldest - 1
        if index < keep_from:
            f.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ routes

class RouteHook:
    """``Router.routes`` for RL. Record mode (``recorded`` None): keeps each router's first top-k choice of the
    forward (an activation-checkpointing recompute calls the router again). Compare/replay mode: also keeps the
    natural choice (for the flip rate) and, with ``replay``, hands the router the recorded experts instead."""

    def __init__(self, routers: list, recorded: list | None = None, replay: bool = False):
        self.index = {id(r): i for i, r in enumerate(routers)}
        self.recorded, self.replay, self.seen = recorded, replay, {}

    def route(self, router, topk_idx: torch.Tensor) -> torch.Tensor:
        i = self.index[id(router)]
        self.seen.setdefault(i, topk_idx)
        return self.recorded[i].to(topk_idx) if self.replay else topk_idx

    def stacked(self, batch: int) -> torch.Tensor:
        """The recorded choices as (B, L, T, K) int16."""
        routes = [self.seen[i].view(batch, -1, self.seen[i].shape[-1]) for i in range(len(self.index))]
        return torch.stack(routes, dim=1).to(torch.int16)

    def flips(self, mask: torch.Tensor) -> tuple[float, float]:
        """(changed, total) routed (token, layer, slot) over the tokens of ``mask`` (B, T): a slot has changed when
        its expert is not among the recorded experts of that token and layer."""
        changed, total = 0.0, 0.0
        keep = mask.reshape(-1)
        for i, now in self.seen.items():
            before = self.recorded[i].to(now.device)
            member = (now[:, :, None] == before[:, None, :]).any(-1)  # (N, K)
            changed += float((~member[keep]).sum())
            total += float(keep.sum()) * now.shape[1]
        return changed, total
