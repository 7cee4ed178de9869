"""GRPO on the pretraining loop: ``GRPOObjective`` (``python -m posttrain.grpo``).

Each optimizer step trains one mini-batch of ``train.global_batch_size`` sequences of the current rollout
(posttrain.rl.rollout); a rollout of P x G outputs is M = P G / B mini-batches, passed over ``rl.updates_per_rollout``
(mu) times, so steps r mu M + 1 ... (r + 1) mu M train rollout r, which is made at the first of them:

1. generate on the live sharded policy (eval mode, no grad; back to train mode after), score, gather over DP;
   optional DAPO dynamic sampling (more rounds of P prompts until P non-uniform groups) and overlong shaping;
2. pi_old: one no-grad forward of the policy in train mode over this rank's rows, in the training micro-batches
   (so the ratio is exactly 1 on the first mini-batch), recording the MoE routes; ``rl/logprob_mismatch`` = mean
   |logp_rollout - logp_old| over the response tokens, logp_rollout taken from the sampler's own logits;
3. pi_ref from the frozen reference (the init weights in the same layout, ``_FrozenReference``; copied from the
   policy every ``rl.ref_reset_interval`` rollouts; not built when ``rl.kl_coef`` = 0);
4. rewards (minus beta sum_t KL_t with ``rl.kl_in_reward``) -> ``grpo_advantages``.

The loss of a micro-batch is ``posttrain.rl.objectives.policy_loss`` (clip-higher, KL estimator in the loss unless
``rl.kl_in_reward``) with the mini-batch's GLOBAL denominator (rows with a response token, response tokens, or
B x max_new_tokens, per ``rl.loss_agg``), times the number of (micro-batch, DP rank) pairs of the step: DeepSpeed
averages over those, so the gradient is exactly the mini-batch's in every layout; plus the MoE balance terms.
Log-probs are taken at ``rl.temperature``. The MoE expert bias moves at ``rl.bias_update_speed`` (default 0: frozen).

Under pipeline parallelism the policy is this rank's stage (``attach``): generation decodes through the pipeline,
pi_old and pi_ref run through it (``token_outputs``: ``parallel.pipeline.stage_forward``, the last stage's values
broadcast to every stage), each stage records its own routers' routes and takes them back per micro-batch through a
forward pre-hook (DeepSpeed's schedule runs the forwards in micro-batch order), the last stage computes
``output_loss`` from the batch's tensors, and ``finish_parts`` sums the route flips over the stages.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from posttrain.objectives import _FrozenReference, balance_loss, per_token_nll, per_token_nll_tp
from posttrain.rl import rollout as ro
from posttrain.rl.advantages import (dynamic_sampling_keep, grpo_advantages, overlong_filter_mask, overlong_penalty,
                                     uniform_groups)
from posttrain.rl.objectives import kl_estimate, policy_loss
from posttrain.stage import PosttrainObjective
from pretrain.config import ConfigError
from pretrain.train import dp_sum

BASE_NAMES = ("loss", "rl/reward_mean", "rl/reward_std", "rl/kl", "rl/clip_fraction", "rl/ratio", "rl/entropy",
              "rl/response_length", "rl/route_flip_rate", "rl/logprob_mismatch", "rl/rollout_seconds",
              "rl/update_seconds", "rl/informative_groups")


def tempered(loss_fn, temperature: float):
    """A per-token NLL ``loss_fn`` of logits / temperature (the rollout's sampling distribution)."""
    def fn(logits, labels):
        return loss_fn(logits.float() / temperature, labels)
    return fn


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float, tp_group=None) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position (B, T); ``tp_group``: logits are this rank's vocab shard."""
    z = logits.float() / temperature
    m = z.max(dim=-1, keepdim=True).values
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    e = torch.exp(z - m)
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
    if tp_group is not None:
        dist.all_reduce(sums, group=tp_group)
    return torch.log(sums[0]) + m.squeeze(-1) - sums[1] / sums[0]


def routers_of(model) -> list:
    from pretrain.model.moe import Router
    return [m for m in model.modules() if isinstance(m, Router)]


def set_routes(routers: list, hook) -> None:
    for r in routers:
        r.routes = hook


class GRPOObjective(PosttrainObjective):
    """Group relative policy optimisation on on-policy rollouts of the training model (``posttrain.grpo``)."""

    stage = "grpo"

    # -------------------------------------------------------------------------------------------- set-up

    def load(self, cfg, tok, skipped, paths=None):
        return ro.load_prompts(paths or cfg.data.paths, tok, cfg.data.seq_length, cfg.rl.max_new_tokens, skipped)

    def dataset(self, cfg, num_rows, records=None):
        return ro.PromptEpochs(len(records or self.records), cfg.rl.group_size * cfg.rl.updates_per_rollout)

    def preflight(self, cfg, world_size, rank):
        from posttrain.rl.rewards import load_rewards

        cfg.model.num_nextn_predict_layers = 0  # MTP is a language-modelling objective; its weights are dropped
        cfg.moe.bias_update_speed = cfg.rl.bias_update_speed  # RL's gamma (default 0: the expert bias is frozen)
        self.rewards = load_rewards(cfg.rl.rewards)
        self.names = BASE_NAMES + tuple(f"rl/reward/{r.name}" for r in self.rewards)
        t, r = cfg.train, cfg.rl
        if t.batch_size_rampup or t.batch_ramp_start is not None:
            raise ConfigError("train.batch_size_rampup / train.batch_ramp_start: a GRPO mini-batch is "
                              "train.global_batch_size sequences throughout; remove the ramp")
        if cfg.parallel.pp > 1 and r.routing_replay and t.activation_checkpointing:
            raise ConfigError("rl.routing_replay with parallel.pp > 1 and train.activation_checkpointing: the 1F1B "
                              "schedule recomputes a micro-batch after the next one's forward, with that one's routes; "
                              "turn one of them off")
        if self.stage == "grpo" and r.group_size < 2:
            raise ConfigError(f"rl.group_size={r.group_size}: GRPO's baseline is the group mean; use >= 2")
        checked = super().preflight(cfg, world_size, rank)
        dp, n = checked.topo.dp_size, r.prompts_per_step * r.group_size
        if r.prompts_per_step % dp:
            raise ConfigError(f"rl.prompts_per_step={r.prompts_per_step} must be a multiple of the data-parallel "
                              f"size {dp} (each rank samples its share of the prompts)")
        if n % t.global_batch_size:
            raise ConfigError(f"rl.prompts_per_step x rl.group_size = {n} outputs must split into mini-batches of "
                              f"train.global_batch_size={t.global_batch_size}; make it a divisor of {n}")
        self.minibatches = n // t.global_batch_size
        self.steps_per_rollout = self.minibatches * r.updates_per_rollout
        return checked

    def prepare_model(self, model, cfg, topo):
        from parallel.pipeline import cut_stage
        from pretrain.train import build_model_for

        self.cfg, self.topo = cfg, topo
        base = per_token_nll_tp if topo.tp > 1 else per_token_nll
        model.loss_fn = tempered(base, cfg.rl.temperature)
        self.reference = None
        if cfg.rl.kl_coef > 0:  # the init weights in the same layout, frozen
            # in train mode like pi_old (MoE token dropping alike; nothing else differs): the KL is 0 until the
            # policy moves
            self.reference = cut_stage(build_model_for(cfg, topo, _FrozenReference()), cfg, topo).train()
            self.reference.loss_fn = model.loss_fn
            if cfg.train.precision == "bf16":  # the policy's precision (DeepSpeed casts it); the router bias as there
                from pretrain.engine import keep_router_bias_fp32
                keep_router_bias_fp32(self.reference.to(torch.bfloat16))
        self.tp_group = None
        if topo.tp > 1:
            from megatron.core.parallel_state import get_tensor_model_parallel_group
            self.tp_group = get_tensor_model_parallel_group()
        model.varying_shapes = True  # micro-batches cut at their longest row (parallel.pipeline: dynamic shapes)
        return model

    def attach(self, engine, topo):
        """The live policy: the model, or under pipeline parallelism this rank's stage (rollouts decode through the
        pipeline, pi_old / pi_ref run through it with ``stage_forward``, each stage records and replays its own
        routers' routes)."""
        from parallel.pipeline import pipe_link

        super().attach(engine, topo)
        self.model = self.policy
        self.device = next(self.model.parameters()).device
        self.routers = routers_of(self.model)
        self.link = pipe_link(self.model)
        self.pending_routes, self.flip_counts, self.hook = [], [], None
        if self.link is not None:  # the stage's routes per micro-batch, in the schedule's order (every stage counts,
            self.model.register_forward_pre_hook(self._next_routes)  # a stage without routers zeros)
            self.model.register_forward_hook(self._count_flips)

    def _next_routes(self, module, args) -> None:
        if module.training and self.pending_routes:
            self.hook, self.hook_mask = self.pending_routes.pop(0)
            set_routes(self.routers, self.hook)

    def _count_flips(self, module, args, output) -> None:
        if module.training:
            self.flip_counts.append(self.hook.flips(self.hook_mask) if self.hook is not None else (0.0, 0.0))

    def finish_parts(self, parts: dict) -> None:
        """``rl/update_seconds``: this step's forward, backward and optimizer step (after its rollout was made).
        Under pipeline parallelism also ``rl/route_flip_rate`` from every stage's routers (each micro-batch's flipped
        / routed slots summed over the stages, averaged over micro-batches and data-parallel ranks, as the one-process
        loss computes it per micro-batch)."""
        parts["rl/update_seconds"] = time.perf_counter() - self.update_start
        if self.link is None:
            return
        counts = torch.tensor(self.flip_counts, dtype=torch.float64, device=self.device)  # (micro-batches, 2)
        self.flip_counts = []
        dist.all_reduce(counts, group=self.topo.pp_group)
        rates = torch.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1].clamp(min=1), 0.0)
        total = dp_sum(rates.sum().view(1), self.topo)
        parts["rl/route_flip_rate"] = float(total) / (len(rates) * self.topo.dp_size)

    def build_data(self, cfg, topo, state, pin_memory):
        self.rollout, self.step, self.update_start = None, state.step, None
        self.cursor = 0 if state.step < self.steps_per_rollout else None  # else read with the rollout
        return _RolloutStream(self, cfg.train.global_batch_size), None

    # ------------------------------------------------------------------------------------------- rollouts

    def sample(self, prompts: list[list[int]], seed: int) -> tuple[list[list[int]], list[list[float]] | None]:
        """Outputs of the live policy for ``prompts`` (this rank's, each repeated G times) and their per-token
        log-probs under the sampler (None when not available). Tests override this with fixed outputs."""
        from pretrain.generate import generate

        r, logprobs = self.cfg.rl, []
        self.model.eval()
        try:
            outputs = generate(self.model, prompts, r.max_new_tokens, r.temperature, r.top_p, seed=seed,
                               stop_ids=[self.tok.end_of_turn_id], logprobs=logprobs)
        finally:
            self.model.train()
        return outputs, logprobs

    def sample_round(self, index: int, round_: int, cursor: int) -> dict:
        """One round: this rank's P / dp prompts x G outputs, scored; gathered over DP into the global rows."""
        from data_pipeline.readers import DataError
        from posttrain.rl.rewards import RewardError, score

        cfg, r, topo = self.cfg, self.cfg.rl, self.topo
        share = r.prompts_per_step // topo.dp_size
        first = cursor + topo.dp_rank * share
        mine = [self.records[ro.prompt_at(c, len(self.records), cfg.train.seed)] for c in range(first, first + share)]
        prompts = [p for p in mine for _ in range(r.group_size)]
        outputs, logprobs = self.sample([p.ids for p in prompts], ro.sample_seed(cfg.train.seed, index, round_,
                                                                                topo.dp_rank))
        eot, S = self.tok.end_of_turn_id, cfg.data.seq_length
        totals, values = [], []
        for i, (p, out) in enumerate(zip(prompts, outputs)):
            text = self.tok.decode(out[:-1] if out and out[-1] == eot else out)
            try:
                total, per = score(self.rewards, p.prompt, text, p.sample, index=i)
            except RewardError as e:  # one line (exit 2) instead of a traceback on every rank
                raise DataError(str(e)) from None
            totals.append(total)
            values.append([per[w.name] for w in self.rewards])
        prompt_len = torch.tensor([len(p.ids) for p in prompts])
        resp_len = torch.tensor([len(o) for o in outputs])
        truncated = torch.tensor([len(o) >= r.max_new_tokens and o[-1] != eot for o in outputs])
        tokens = ro.rows_tensor([p.ids for p in prompts], outputs, S)
        lp = torch.full((len(prompts), S - 1), float("nan"))
        for i, (p, row) in enumerate(zip(prompts, logprobs or [])):
            lp[i, len(p.ids) - 1:len(p.ids) - 1 + len(row)] = torch.tensor(row)
        device = self.device
        local = {"tokens": tokens, "prompt_len": prompt_len, "resp_len": resp_len, "truncated": truncated.long(),
                 "rewards": torch.tensor(totals, dtype=torch.float64),
                 "values": torch.tensor(values, dtype=torch.float64).view(len(prompts), len(self.rewards)),
                 "logp_rollout": lp}
        return {k: ro.dp_all_gather(v.to(device), topo).cpu() for k, v in local.items()}

    def make_rollout(self, index: int) -> ro.Rollout:
        r, topo, G, P = self.cfg.rl, self.topo, self.cfg.rl.group_size, self.cfg.rl.prompts_per_step
        start = time.perf_counter()
        set_routes(self.routers, None)
        if self.reference is not None and r.ref_reset_interval and index and index % r.ref_reset_interval == 0:
            self.reference.load_state_dict(self.model.state_dict())
            ro.save_reference(self.reference, self.cfg, index)
        cursor, rounds = self.cursor, []
        for round_ in range(r.dynamic_sampling_max_rounds if r.dynamic_sampling else 1):
            rounds.append(self.sample_round(index, round_, cursor))
            cursor += P
            if r.dynamic_sampling:
                keep = torch.cat([dynamic_sampling_keep(x["rewards"], G) for x in rounds])
                if int(keep.sum()) >= P * G:
                    break
        glob = {k: torch.cat([x[k] for x in rounds]) for k in rounds[0]}
        glob["truncated"] = glob["truncated"].bool()
        if r.dynamic_sampling:  # the non-uniform groups first (in order), uniform ones fill a short rollout
            order = torch.cat([keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)])
            glob = {k: v[order[:P * G]] for k, v in glob.items()}
        S = self.cfg.data.seq_length
        scores = glob["rewards"].float()
        if r.overlong_cache_length:
            scores = scores + overlong_penalty(glob["resp_len"], r.max_new_tokens, r.overlong_cache_length)
        mask = ro.response_mask(glob["prompt_len"], glob["resp_len"], S - 1)
        loss_mask = overlong_filter_mask(mask, glob["truncated"]) if r.overlong_filter else mask
        rows = ro.local_rows(P * G, self.cfg.train.global_batch_size, topo.dp_size, topo.dp_rank)
        rollout = ro.Rollout(index, cursor, glob["tokens"], glob["prompt_len"], glob["resp_len"], loss_mask,
                             torch.zeros(P * G), {}, rows)
        self.forward_old_and_ref(rollout)
        local_mask = mask[rows]
        self.compute_advantages(rollout, scores, mask)
        lp_rollout = glob["logp_rollout"][rows]
        seen = local_mask & ~lp_rollout.isnan()
        mismatch = self._dp_sum(torch.stack([torch.where(seen, (lp_rollout - rollout.logp_old).abs(), 0.0).sum(),
                                             seen.sum()]).double())
        means = glob["values"].mean(0) if len(self.rewards) else []
        rollout.metrics = {"rl/reward_mean": float(glob["rewards"].mean()),
                           "rl/reward_std": float(glob["rewards"].std()),
                           "rl/response_length": float(glob["resp_len"].float().mean()),
                           "rl/logprob_mismatch": float(mismatch[0] / mismatch[1]) if mismatch[1] else 0.0,
                           "rl/rollout_seconds": time.perf_counter() - start,
                           "rl/informative_groups": 1.0 - float(uniform_groups(glob["rewards"], G).float().mean())
                           if G > 1 else 1.0,
                           **{f"rl/reward/{w.name}": float(m) for w, m in zip(self.rewards, means)}}
        ro.save_rollout(rollout, self.cfg, topo)
        if dist.get_rank() == 0:
            ro.prune_rollouts(self.cfg, self.steps_per_rollout, r.ref_reset_interval)
        self.cursor = cursor
        return rollout

    def compute_advantages(self, rollout: ro.Rollout, scores: torch.Tensor, mask: torch.Tensor) -> None:
        """GRPO: the group advantage of each output's score (N,) (minus beta sum_t KL_t with rl.kl_in_reward);
        ``mask`` (N, S - 1) the response tokens."""
        r, rows = self.cfg.rl, rollout.rows
        if r.kl_in_reward and rollout.logp_ref is not None:
            kl = kl_estimate(rollout.logp_old, rollout.logp_ref, r.kl_estimator)
            kl_sum = torch.zeros(len(scores), dtype=torch.float64)
            kl_sum[rows] = torch.where(mask[rows], kl, 0.0).sum(-1).double()
            scores = scores - r.kl_coef * self._dp_sum(kl_sum).float()
        rollout.advantages = grpo_advantages(scores, r.group_size, normalize_std=r.normalize_std, eps_std=r.eps_std)

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        return dp_sum(t.to(self.device), self.topo).cpu()

    def micro_batches(self, rollout: ro.Rollout, positions: torch.Tensor) -> list[torch.Tensor]:
        mb = self.cfg.train.micro_batch_size
        return list(positions.split(mb))

    @torch.no_grad()
    def forward_old_and_ref(self, rollout: ro.Rollout) -> None:
        """pi_old (the policy in train mode, routes recorded) and pi_ref log-probs of this rank's rows, in the
        training micro-batches."""
        old, ref, routes = [], [], []
        for pos in self.micro_batches(rollout, torch.arange(len(rollout.rows))):
            b = self._inputs(rollout, pos)
            hook = ro.RouteHook(self.routers)
            set_routes(self.routers, hook)
            pad = self.cfg.data.seq_length - 1 - b["width"]  # stored at full width
            try:
                old.append(F.pad(self.token_logps(self.model, b).cpu(), (0, pad)))
            finally:
                set_routes(self.routers, None)
            if self.routers:
                routes.append(F.pad(hook.stacked(len(pos)).cpu(), (0, 0, 0, pad)))
            if self.reference is not None:
                ref.append(F.pad(self.token_logps(self.reference, b).cpu(), (0, pad)))
        rollout.logp_old = torch.cat(old)
        rollout.logp_ref = torch.cat(ref) if ref else None
        rollout.routes = torch.cat(routes) if routes else None

    def token_logps(self, model, b: dict) -> torch.Tensor:
        """Per-token log-probs (B, T) of the batch's labels under ``model`` (the policy or the reference)."""
        return -self.token_outputs(model, b)

    def token_outputs(self, model, b: dict) -> torch.Tensor:
        """``model``'s per-token ``loss_fn`` values (B, T) on the batch (NLLs; the critic's values), no grad: the
        model whole, or this rank's pipeline stage (then through the pipeline, and on every stage)."""
        from parallel.pipeline import forward_everywhere

        return forward_everywhere(model, b["input_ids"], b["labels"], lambda out: out.lm_loss, b["labels"].shape,
                                  self.link)

    def _inputs(self, rollout: ro.Rollout, pos: torch.Tensor) -> dict:
        """The micro-batch of this rank's rows ``pos``, cut after its longest row's last token (the padding to
        data.seq_length is never computed); ``width`` = its number of label positions."""
        rows = rollout.rows[pos]
        plen, rlen = rollout.prompt_len[rows], rollout.resp_len[rows]
        width = int((plen + rlen).max())
        device = self.device
        tokens = rollout.tokens[rows, :width]
        mask = ro.response_mask(plen, rlen, width - 1)
        return {"input_ids": tokens[:, :-1].to(device), "labels": ro.labels_of(tokens, mask).to(device),
                "width": width - 1}

    def rollout_for(self, step: int) -> ro.Rollout:
        index = (step - 1) // self.steps_per_rollout
        if self.rollout is None or self.rollout.index != index:
            if self.rollout is None and (step - 1) % self.steps_per_rollout:  # resumed mid-rollout
                rows = ro.local_rows(self.cfg.rl.prompts_per_step * self.cfg.rl.group_size,
                                     self.cfg.train.global_batch_size, self.topo.dp_size, self.topo.dp_rank)
                self.rollout = ro.load_rollout(self.cfg, index, rows, ro.stage_suffix(self.topo))
                self.cursor = self.rollout.cursor_end
                ro.restore_reference(self.reference, self.cfg, index)
            else:
                if self.cursor is None:  # resumed at a rollout boundary
                    self.cursor = ro.load_cursor(self.cfg, index - 1)
                    ro.restore_reference(self.reference, self.cfg, index - 1)
                self.rollout = self.make_rollout(index)
        return self.rollout

    def step_tokens(self, padded: int) -> int:
        """The mini-batch's prompt + response tokens (every rank holds the global rows), not the padded rows."""
        return self.minibatch_tokens

    # ----------------------------------------------------------------------------------------------- loss

    def batch(self, run, pos):
        rollout = self.rollout
        b = self._inputs(rollout, pos)
        device = b["input_ids"].device
        rows, w = rollout.rows[pos], b["width"]
        b["mask"] = rollout.loss_mask[rows, :w].to(device)
        adv = rollout.advantages[rows] if rollout.token_advantages is None else rollout.token_advantages[pos, :w]
        b["advantages"] = adv.to(device)
        b["logp_old"] = rollout.logp_old[pos, :w].to(device)
        b["logp_ref"] = None if rollout.logp_ref is None else rollout.logp_ref[pos, :w].to(device)
        b["routes"] = None if rollout.routes is None else rollout.routes[pos, :, :w]
        b["denominator"] = self.denominator
        if self.link is not None:  # this stage's routes wait for its forward inside DeepSpeed's schedule
            if b["routes"] is not None:
                self.pending_routes.append((self.route_hook(b["routes"]), b["labels"] != -100))
            b["routes"] = None
        return b

    def route_hook(self, routes: torch.Tensor | None) -> ro.RouteHook | None:
        """The rollout's routes (mb, L, T, K) of a micro-batch -> the hook comparing (``rl.routing_replay``:
        replaying) them in the training forward."""
        if routes is None:
            return None
        recorded = [x.reshape(-1, x.shape[-1]).long() for x in routes.unbind(1)]  # per router (mb T, K)
        return ro.RouteHook(self.routers, recorded, replay=self.cfg.rl.routing_replay)

    def forward(self, model, batch):
        self.hook = self.route_hook(batch["routes"])
        set_routes(self.routers, self.hook)  # kept for an activation-checkpointing recompute in the backward
        return model(batch["input_ids"], labels=batch["labels"])

    def output_loss(self, out, batch, weights, carried=None):
        r, t = self.cfg.rl, self.cfg.train
        logp = -out.lm_loss.float()
        entropy = token_entropy(out.logits, r.temperature, self.tp_group)
        pl, m = policy_loss(logp, batch["logp_old"], batch["advantages"], batch["mask"], eps_low=r.clip_eps_low,
                            eps_high=r.clip_eps_high, logp_ref=batch.get("logp_ref"),
                            beta=0.0 if r.kl_in_reward else r.kl_coef, kl_estimator=r.kl_estimator,
                            kl_importance_correction=r.kl_importance_correction, aggregation=r.loss_agg,
                            generation_budget=r.max_new_tokens, denominator=float(batch["denominator"]),
                            entropy=entropy)
        # DeepSpeed averages the gradient over the step's micro-batches and DP ranks (B / mb of them): undo it, so
        # the step's gradient is that of the mini-batch's loss (the sum of the micro-batch terms).
        loss = pl * (t.global_batch_size // t.micro_batch_size) + balance_loss(out, weights, carried)
        hook = self.hook if self.link is None else None  # a pipeline's flips: finish_parts, over every stage
        changed, total = hook.flips(batch["labels"] != -100) if hook is not None else (0.0, 0.0)
        parts = {"loss": loss, "rl/kl": m.get("kl", torch.zeros(())), "rl/clip_fraction": m["clip_fraction"],
                 "rl/ratio": m["ratio"], "rl/entropy": m["entropy"],
                 "rl/route_flip_rate": torch.tensor(changed / total if total else 0.0),
                 "rl/update_seconds": torch.zeros(()),  # finish_parts: the step's own update time
                 **{k: torch.tensor(v) for k, v in self.rollout.metrics.items() if k in self.names}}
        return loss, {k: v.detach().float().reshape(()) for k, v in parts.items()}


class _RolloutStream:
    """The loop's data stream for GRPO: ``next_batch`` makes (or reloads) the rollout a step belongs to and returns
    this rank's micro-batches of its mini-batch (positions into the rank's rollout rows)."""

    def __init__(self, objective: GRPOObjective, global_batch: int):
        self.objective, self.global_batch = objective, global_batch

    @property
    def consumed_samples(self) -> int:
        return self.objective.step * self.global_batch

    def next_batch(self, global_batch: int) -> list[torch.Tensor]:
        o = self.objective
        o.step += 1
        rollout = o.rollout_for(o.step)
        k = ((o.step - 1) % o.steps_per_rollout) % o.minibatches
        share = global_batch // o.topo.dp_size
        positions = torch.arange(k * share, (k + 1) * share)
        minibatch = rollout.loss_mask[k * global_batch:(k + 1) * global_batch]
        o.denominator = denominator(o.cfg.rl.loss_agg, minibatch, global_batch)
        o.token_denominator, o.micro = denominator("token-mean", minibatch, global_batch), 0
        rows = slice(k * global_batch, (k + 1) * global_batch)
        o.minibatch_tokens = int((rollout.prompt_len[rows] + rollout.resp_len[rows]).sum())
        o.update_start = time.perf_counter()
        return o.micro_batches(rollout, positions)


def denominator(loss_agg: str, mask: torch.Tensor, rows: int) -> float:
    """The whole mini-batch's count for ``aggregate(denominator=)``: rows with a response token (seq-mean-token-mean),
    response tokens (token-mean) or every row (seq-mean-token-sum-norm). ``mask``: the mini-batch's global rows."""
    if loss_agg == "token-mean":
        return float(max(int(mask.sum()), 1))
    if loss_agg == "seq-mean-token-mean":
        return float(max(int(mask.any(-1).sum()), 1))
    return float(rows)
