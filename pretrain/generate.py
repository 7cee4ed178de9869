"""Text generation with the KV cache: batched prefill, incremental decoding, MTP self-speculative decoding; the CLI.

    python -m pretrain.generate --checkpoint RUN_DIR|STEP_DIR|HF_DIR (--prompt TEXT ... | --prompts FILE.jsonl)
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--speculative mtp]
        [--output FILE.jsonl]

Under ``torchrun`` on a run or step directory the model is laid out as the checkpoint was trained (tp/pp/ep from its
config.yaml, each rank loading only its own slices, nothing consolidated) and the prompts are split over the
data-parallel ranks. With pp > 1 each rank builds its pipeline stage (``PipelineStage.cut``, training's stage
bounds) with its own KV cache; per step stage 0 embeds and runs its layers, sends h point to point to the next
stage, the last stage computes the logits and decides (tokens, kept drafts, MTP drafts, log-probs), and that is
broadcast over the pp group, so every stage keeps the same slots and stop state (tp works inside each stage).

One decoding loop serves plain and speculative decoding. Each step feeds, per row, the last committed token plus
D drafts (D = 0 without speculation) at the row's next slots (pretrain/model/kv_cache.py), and the main model's
logits at those T = 1 + D positions decide how many drafts the row keeps (m in [0, D]) and its next token. The
MTP modules then propose the next D drafts from the main model's hidden states at the kept positions: module k
at position i sees h^{k-1}_i and the embedding of token i + k, as in training. The prefill is the same step with
the prompt as the fed tokens (right-padded; row b keeps n_b - 1 "drafts").

Speculative sampling (temperature > 0) keeps the output distribution exact: a greedy draft d (a point mass) is
accepted with probability p(d) under the main model's (filtered) distribution; on rejection the token is drawn
from p with d removed, renormalised (Leviathan et al., 2023, with q = one-hot).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.model.kv_cache import KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (N, V) fp32 -> the same with everything outside the top-k and the top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches p (always at least one)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


class Sampler:
    """Token choice: greedy at temperature 0, else softmax(filtered logits / T) drawn with a seeded generator."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int | None, device: torch.device):
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"temperature={temperature}, top_p={top_p}, top_k={top_k}: need temperature >= 0, "
                             f"0 < top_p <= 1, top_k >= 0")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) -> sampling distribution (..., V) fp32."""
        return (filter_logits(logits.float(), self.top_k, self.top_p) / self.temperature).softmax(dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (N, V) -> (N,) long."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def uniform(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=device)

    def verify(self, logits: torch.Tensor, drafts: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """logits (B, 1 + D, V) at the fed positions, drafts (B, D) -> (kept drafts m (B,), tokens (B, 1 + D)).

        ``tokens[:, :m + 1]`` are the row's new tokens: the m kept drafts, then the main model's own choice after
        them. Inactive rows (finished) keep nothing."""
        B, D = drafts.shape
        rows = torch.arange(B, device=logits.device)
        if self.greedy:
            choice = logits.argmax(dim=-1)  # (B, 1 + D)
            keep = drafts == choice[:, :D]
        else:
            probs = self.probs(logits)  # (B, 1 + D, V)
            p_draft = probs[:, :D].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, D)
            keep = self.uniform((B, D), logits.device) < p_draft
        kept = (keep.long().cumprod(dim=1).sum(dim=1) if D else torch.zeros(B, dtype=torch.long,
                                                                              device=logits.device))
        kept = torch.where(active, kept, torch.zeros_like(kept))
        if self.greedy:
            last = choice[rows, kept]
        else:
            residual = probs[rows, kept]  # (B, V): where a draft was rejected, p without that draft
            rejected = (kept < D) & active  # an inactive row's kept = 0 is no rejection: its p(draft) may be 1
            if D:
                rejected_draft = drafts[rows, kept.clamp(max=D - 1)]
                residual[rows[rejected], rejected_draft[rejected]] = 0.0
            last = self.draw(residual / residual.sum(dim=-1, keepdim=True))
        tokens = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)
        tokens[rows, kept] = last
        return kept, tokens


def _gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits of a tensor-parallel ``lm_head`` (vocab shard on each TP rank) -> the full vocabulary."""
    if logits.shape[-1] == vocab_size:
        return logits
    from megatron.core.parallel_state import get_tensor_model_parallel_group
    group = get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` holds on any rank: every rank must run the same number of forwards (expert-parallel
    all-to-alls and tensor-parallel all-reduces inside them are collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _pipe_link(model):
    """``parallel.pipeline.pipe_link`` (imported only for a pipeline stage: one-process generation stays free of
    DeepSpeed's import)."""
    if getattr(model, "is_last", None) is None or (model.is_first and model.is_last):
        return None
    from parallel.pipeline import PipeLink
    return PipeLink()


class _Decoder:
    """One batch's caches and the two forwards of a step: the main model, then the MTP drafts.

    Under pipeline parallelism (``model`` a ``PipelineStage``) each stage runs its own layers on its own cache;
    ``main`` returns the logits on the last stage only (None elsewhere) and ``share`` hands the last stage's
    decisions to every stage."""

    def __init__(self, model, batch: int, capacity: int, depth: int, sampler: Sampler):
        self.model, self.depth, self.sampler = model, depth, sampler
        self.pipe = _pipe_link(model)
        self.cache = KVCache.for_model(model, batch, capacity)
        self.mtp_cache = self.cache.mtp_caches(model)[:depth]
        self.hidden: torch.Tensor | None = None

    @property
    def is_last(self) -> bool:
        return self.pipe is None or self.pipe.next is None

    def main(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """tokens (B, T) at each row's next slots -> logits (B, T, V) (None on a pipeline stage before the last);
        keeps the final norm's input (B, T, H) when drafting."""
        positions = self.cache.state.slots(tokens.shape[1])
        hook = (self.model.norm.register_forward_hook(lambda m, args, out: setattr(self, "hidden", args[0]))
                if self.depth and self.is_last else None)
        try:
            if self.pipe is None:
                return self.model(tokens, position_ids=positions, cache=self.cache)
            return self._stage(tokens, positions)
        finally:
            if hook is not None:
                hook.remove()

    def _stage(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """This pipeline stage's part of the forward: receive h, run the stage's layers, send h on or return the
        logits (the whole vocabulary under tensor parallelism)."""
        from pretrain.model.transformer import DeepSeekModel
        h = None
        if self.pipe.prev is not None:
            ref = next(self.model.parameters())
            h = torch.empty(*tokens.shape, self.model.config.hidden_size, dtype=ref.dtype, device=ref.device)
            dist.recv(h, self.pipe.prev)
        out = DeepSeekModel.forward(self.model, tokens, position_ids=positions, hidden_states=h, cache=self.cache)
        if self.pipe.next is not None:
            dist.send(out.hidden_states.contiguous(), self.pipe.next)
            return None
        return _gather_vocab(out, self.model.config.vocab_size)

    def share(self, decide, *shapes, dtype: torch.dtype = torch.long):
        """``decide()`` -> tensor(s) of ``shapes`` and ``dtype``, run on the last stage and broadcast to the pp
        group's other stages (without pipeline parallelism just ``decide()``)."""
        if self.pipe is None:
            return decide()
        if self.pipe.next is None:
            out = decide()
            out = tuple(t.contiguous() for t in (out if isinstance(out, tuple) else (out,)))
        else:
            device = self.cache.state.lengths.device
            out = tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes)
        for t in out:
            dist.broadcast(t, self.pipe.last, group=self.pipe.group)
        return out if len(out) > 1 else out[0]

    def drafts(self, following: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Run the MTP modules on the slots just fed -> greedy drafts (B, D) (on the last pipeline stage, which
        holds the MTP modules; shared with the others).

        following (B, T + D): following[:, j] is the token after fed position j (valid for j <= kept), the rest
        filled here with the drafts as they come; kept (B,): the last fed position each row keeps."""
        return self.share(lambda: self._mtp_drafts(following, kept), (kept.shape[0], self.depth))

    def _mtp_drafts(self, following: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        model, T = self.model, self.hidden.shape[1]
        rows = torch.arange(kept.shape[0], device=kept.device)
        cos, sin = model.rotary(self.cache.state.slots(T), self.hidden.dtype)
        h, drafts = self.hidden, []
        for k, (module, cache) in enumerate(zip(model.mtp, self.mtp_cache), start=1):
            emb = model.embed_tokens(following[:, k - 1:k - 1 + T])  # module k at position i sees token i + k
            h, _ = module(h, emb, cos, sin, None, cache)
            logits = _gather_vocab(model.lm_head(module.norm(h[rows, kept])), model.config.vocab_size)
            draft = logits.argmax(dim=-1)  # (B,)
            following[rows, kept + k] = draft
            drafts.append(draft)
        return torch.stack(drafts, dim=1)


def _right_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p, device=device)
    return ids, lengths


def _check_args(model, prompts, max_new_tokens: int, speculative) -> int:
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative={speculative!r}: use None or 'mtp'")
    held = model.config.num_nextn_predict_layers if _pipe_link(model) is not None else len(model.mtp)
    depth = held if speculative == "mtp" else 0
    if speculative == "mtp" and depth == 0:
        raise ValueError("speculative='mtp' needs MTP modules (model.num_nextn_predict_layers > 0); the model has "
                         "none (HuggingFace exports drop them)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: need at least 1")
    bad = [i for i, p in enumerate(prompts) if not p]
    if bad:
        raise ValueError(f"prompt {bad[0]} is empty: every prompt needs at least one token")
    return depth


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop_ids=None, speculative: str | None = None,
             stats: dict | None = None, logprobs: list | None = None) -> list[list[int]]:
    """The new tokens of each prompt (a stop token, when met, is the last one kept).

    model: a ``DeepSeekModel`` (plain, or parallelized by ``parallel.parallelize_model``: then every rank of the
    model-parallel group must call this, tensor-parallel ranks with the same prompts); prompts: token ids, any
    lengths (an empty list is allowed under torch.distributed: the rank still steps with the others); greedy at
    temperature 0; ``seed`` makes sampling reproducible; ``speculative="mtp"`` drafts with the MTP modules and
    verifies in one forward (greedy: the same tokens as without). ``stats``, if given, receives
    forwards / tokens / seconds / tokens_per_s and, with speculation, the draft acceptance rate. ``logprobs``, if
    given (a list, without speculation), receives one list per prompt: each new token's log-probability under
    softmax(logits / temperature) (unfiltered; temperature 1 when greedy), the sampler's own logits (RL's rollout
    log-probs).
    """
    depth = _check_args(model, prompts, max_new_tokens, speculative)
    device = next(model.parameters()).device
    num_real = len(prompts)
    prompts = [list(p) for p in prompts] or [[0]]  # a rank without prompts still runs every collective forward
    sampler = Sampler(temperature, top_k, top_p, seed, device)
    stops = set(stop_ids or ())
    start = time.perf_counter()
    ids, lengths = _right_pad(prompts, device)
    B, T = ids.shape
    rows = torch.arange(B, device=device)
    dec = _Decoder(model, B, T + max_new_tokens + 2 * depth + 1, depth, sampler)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = rows < num_real
    counts = {"forwards": 1, "proposed": 0, "accepted": 0}

    # Prefill: one forward of all prompts; row b keeps its n_b slots and draws its first token at n_b - 1.
    logits = dec.main(ids)  # None on a pipeline stage before the last
    last_logits = logits[rows, lengths - 1] if logits is not None else None  # (B, V)
    last = dec.share(lambda: _first_token(last_logits, sampler), (B,))  # (B,): the last stage's choice
    record = logprobs is not None and not depth
    if record:
        logprobs[:] = [[] for _ in range(num_real)]
        step_lp = dec.share(lambda: _token_logprob(last_logits, last, temperature), (B,), dtype=torch.float32)
    kept, new_tokens = lengths - 1, last.unsqueeze(1)
    following = torch.cat([ids[:, 1:], torch.zeros(B, depth + 1, dtype=torch.long, device=device)], dim=1)
    following[rows, kept] = last  # the token after each prompt position
    while True:
        before = [len(o) for o in outputs]
        running = _commit(outputs, new_tokens, active, max_new_tokens, stops)
        if record:
            for b, lp in enumerate(step_lp.tolist()[:num_real]):
                logprobs[b].extend([lp] * (len(outputs[b]) - before[b]))
        drafts = dec.drafts(following, kept) if depth else None  # (B, D) before the slots are kept
        dec.cache.state.advance(torch.where(active, kept + 1, torch.zeros_like(kept)))
        active &= running
        if not _any_rank(bool(active.any()), device):
            break
        # Verify: the newest token (not yet in the cache) and the drafts, in one forward.
        fed = last.unsqueeze(1) if drafts is None else torch.cat([last.unsqueeze(1), drafts], dim=1)
        logits = dec.main(fed)
        kept, tokens = dec.share(lambda: sampler.verify(logits, fed[:, 1:], active), (B,), fed.shape)
        if record:
            step_lp = dec.share(lambda: _token_logprob(logits[:, 0], tokens[:, 0], temperature), (B,),
                                dtype=torch.float32)
        counts["forwards"] += 1
        counts["proposed"] += depth * int(active.sum())
        counts["accepted"] += int(kept.sum())
        last = tokens[rows, kept]
        new_tokens = tokens.masked_fill(torch.arange(tokens.shape[1], device=device) > kept.unsqueeze(1), -1)
        following = torch.cat([tokens, torch.zeros(B, depth, dtype=torch.long, device=device)], dim=1)
    _fill_stats(stats, outputs[:num_real], counts, time.perf_counter() - start)
    return outputs[:num_real]


def _token_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, V), (B,) -> log softmax(logits / temperature)[token] (B,) fp32."""
    scaled = logits.float() / (temperature or 1.0)
    return scaled.log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _first_token(logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """The prompts' last logits (B, V) -> each row's first new token (B,)."""
    return logits.argmax(dim=-1) if sampler.greedy else sampler.draw(sampler.probs(logits))


def _commit(outputs: list[list[int]], new_tokens: torch.Tensor, active: torch.Tensor, max_new_tokens: int,
            stops: set) -> torch.Tensor:
    """Append each active row's new tokens (B, N) (-1 = none), stopping at a stop id or at max_new_tokens
    -> (B,) bool: rows still running."""
    running = []
    for out, row, on in zip(outputs, new_tokens.tolist(), active.tolist()):
        for t in row if on else ():
            if t < 0:
                break
            out.append(t)
            if t in stops or len(out) >= max_new_tokens:
                on = False
                break
        running.append(on)
    return torch.tensor(running, device=new_tokens.device)


def _fill_stats(stats: dict | None, outputs, counts: dict, seconds: float) -> None:
    if stats is None:
        return
    tokens = sum(len(o) for o in outputs)
    stats.update(forwards=counts["forwards"], tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                 proposed_drafts=counts["proposed"], accepted_drafts=counts["accepted"],
                 acceptance_rate=counts["accepted"] / counts["proposed"] if counts["proposed"] else None)


# ----------------------------------------------------------------------------------------------- loading

def _load_sharded(run_dir: Path, tag: str, topo, trust_unverified: bool, layout: dict | None = None):
    """This rank's part of a run's model in the run's own tp/pp/ep layout, from its files only (no consolidation).

    The model is built, parallelized and, with pp > 1, cut to this rank's pipeline stage (``PipelineStage.cut``,
    the stage bounds of training), and each rank reads only its own slices of the checkpoint's layout-free fp32
    state (pretrain/checkpoint_format.py; async saves write nothing else), or, for older tp/ep checkpoints, its TP
    rank's module shard file and its EP rank's experts (parallel/shards.py). A tp = pp = ep = 1 run is one model on
    every rank (data-parallel generation). ``layout`` ({"tp", "pp", "ep", "pipeline_layout"}, absent = 1 / None)
    generates in another layout than the run's: the layout-free state reads into any."""
    import dataclasses
    from parallel import initialize_parallel, parallelize_model
    from parallel.shards import needs_model_shards, slice_box
    from pretrain.checkpoint import CheckpointError, consolidated_state_dict, verify_checksums
    from pretrain.checkpoint_format import INDEX, STATE_DIR, StateReader
    from pretrain.config import load_config
    from pretrain.model import build_model

    step_dir = run_dir / tag
    problems = verify_checksums(step_dir, collective=True)
    if problems and not trust_unverified:
        raise CheckpointError(f"{problems[0]}; refusing to unpickle an unverified checkpoint (--trust-unverified "
                              f"only for checkpoints you produced)")
    cfg = load_config(step_dir / "config.yaml")
    layout_free = (step_dir / STATE_DIR / INDEX).is_file()
    if layout is not None:
        if not layout_free:
            raise ValueError(f"{step_dir}: no layout-free state ({STATE_DIR}/{INDEX}), so it is generated from only "
                             f"in its own layout: drop the layout {layout}")
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, tp=layout.get("tp", 1), pp=layout.get("pp", 1), ep=layout.get("ep", 1),
            pipeline_layout=layout.get("pipeline_layout")))
    if cfg.parallel.pp > 1 and not layout_free:
        raise ValueError(f"{step_dir}: a pipeline-parallel checkpoint without the layout-free state ({STATE_DIR}/"
                         f"{INDEX}; written before it existed): export it (python -m pretrain.export) and pass the "
                         f"HuggingFace folder")
    topo = type(topo).from_config(cfg, topo.world_size, topo.rank)
    model = build_model(cfg.model)
    if needs_model_shards(cfg) or cfg.parallel.pp > 1:
        initialize_parallel(topo)
        model = parallelize_model(model, topo)  # no capacity factor: generation is dropless
    if cfg.parallel.pp > 1:
        from parallel.pipeline import cut_stage
        model = cut_stage(model, cfg, topo)
    if layout_free:  # the layout-free fp32 state: read only this rank's slices
        reader = StateReader(step_dir / STATE_DIR)
        state = {name: reader.region(name, "", *slice_box(name, reader.tensors[name]["shape"], topo.tp, topo.tp_rank,
                                                          topo.ep, topo.ep_rank))
                 for name in model.state_dict() if name in reader.tensors}
    elif needs_model_shards(cfg):  # checkpoints written before the layout-free state: the module shard files
        state = torch.load(step_dir / f"layer_00-model_{topo.tp_rank:02d}-model_states.pt", map_location="cpu",
                           weights_only=True)
        if topo.ep_rank > 0:  # that file holds EP rank 0's experts: take this rank's own
            state.update(torch.load(step_dir / f"layer_00-model_{topo.tp_rank:02d}-expert_{topo.ep_rank:02d}"
                                    f"-model_states.pt", map_location="cpu", weights_only=True))
    else:
        state = consolidated_state_dict(run_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in set(model.state_dict())]
    if missing or unexpected:
        raise ValueError(f"checkpoint {step_dir}: weights do not match the model (missing {missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")
    return model.eval(), cfg, topo


def load_for_generation(path: str, trust_unverified: bool = False):
    """(model, tokenizer path or None, (dp_rank, dp_size)) from a run, step or HuggingFace directory.

    One process: the whole model. Under torchrun on a run/step directory: the run's own tp/ep layout
    (``_load_sharded``); on a HuggingFace folder: the whole model on every rank (data parallel)."""
    from pretrain.checkpoint import load_model_from_checkpoint, resolve_checkpoint
    from pretrain.engine import init_distributed, launcher_env

    path_ = Path(path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local_rank, world = launcher_env()
        device = init_distributed(local_rank)
    else:
        rank, device = 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (path_ / "config.json").is_file():
        from pretrain.export import from_hf
        model, _ = from_hf(path_)
        tokenizer = path_ / "tokenizer.model"
        return model.eval().float().to(device), str(tokenizer) if tokenizer.is_file() else None, (rank, world)
    if world == 1:
        model, cfg, tokenizer = load_model_from_checkpoint(path_, trust_unverified=trust_unverified)
        return model.to(device), tokenizer, (0, 1)
    from parallel import Topology
    run_dir, tag = resolve_checkpoint(path_)
    model, cfg, topo = _load_sharded(run_dir, tag, Topology(world_size=world, rank=rank), trust_unverified)
    tokenizer = run_dir / "tokenizer.model"
    return model.to(device), str(tokenizer) if tokenizer.is_file() else cfg.data.tokenizer, (topo.dp_rank,
                                                                                              topo.dp_size)


# --------------------------------------------------------------------------------------------------- CLI

def read_prompts(args) -> list[str]:
    """--prompt texts, or the "prompt" strings of a .jsonl file (one line each; an error names file and line)."""
    if args.prompt:
        return list(args.prompt)
    prompts = []
    try:
        lines = Path(args.prompts).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"--prompts {args.prompts}: cannot read ({e.strerror})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            prompt = None
        if not isinstance(prompt, str):
            raise ValueError(f"--prompts {args.prompts}:{n}: need a JSON object with a string \"prompt\"")
        prompts.append(prompt)
    return prompts


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run directory (uses `latest`), step_NNNNNNN or HF folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="one or more prompt texts")
    src.add_argument("--prompts", help="a .jsonl file with one {\"prompt\": str} per line")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--speculative", choices=["mtp"], default=None, help="MTP self-speculative decoding")
    ap.add_argument("--output", help="write {\"prompt\", \"completion\", \"completion_ids\"} per line here")
    ap.add_argument("--trust-unverified", action="store_true",
                    help="load a checkpoint without (or failing) its checksums.json (only checkpoints you produced)")
    return ap


def _gather_outputs(mine: list[int], outputs: list[list[int]], total: int) -> list[list[int]] | None:
    """Every rank's (prompt indices, outputs) -> all outputs in prompt order on rank 0 (None elsewhere)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return outputs
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (mine, outputs))
    if dist.get_rank() != 0:
        return None
    result: list = [None] * total
    for indices, outs in parts:
        for i, out in zip(indices, outs):
            result[i] = out
    return result


def run(args) -> int:
    from data_pipeline.tokenizer import load_tokenizer

    prompts = read_prompts(args)
    model, tokenizer_path, (dp_rank, dp_size) = load_for_generation(args.checkpoint, args.trust_unverified)
    if tokenizer_path is None:
        raise ValueError(f"--checkpoint {args.checkpoint}: no tokenizer.model next to the weights (nor "
                         f"data.tokenizer in its config.yaml)")
    tok = load_tokenizer(tokenizer_path)
    mine = list(range(len(prompts)))[dp_rank::dp_size]  # tensor-parallel peers share a dp rank: same prompts
    stats: dict = {}
    outputs = generate(model, [tok.encode(prompts[i]) for i in mine], args.max_new_tokens, args.temperature,
                       args.top_p, args.top_k, args.seed, stop_ids=[tok.eos_id], speculative=args.speculative,
                       stats=stats)
    outputs = _gather_outputs(mine, outputs, len(prompts))
    if outputs is None:
        return 0
    rows = [{"prompt": p, "completion": tok.decode([t for t in o if t != tok.eos_id]), "completion_ids": o}
            for p, o in zip(prompts, outputs)]
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        for r in rows:
            print(f"--- {r['prompt']!r} ->\n{r['prompt']}{r['completion']}")
    accept = stats.get("acceptance_rate")
    print(f"rank 0: {stats['tokens']} tokens in {stats['seconds']:.2f} s ({stats['tokens_per_s']:.1f} tokens/s, "
          f"{stats['forwards']} forwards" + (f", MTP draft acceptance {accept:.1%}" if accept is not None else "")
          + ")", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pretrain.config import ConfigError
    try:
        return run(args)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"pretrain.generate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from pretrain.engine import exit_process

    exit_process(main())  # under torchrun: process group destroyed, no finalisation abort
