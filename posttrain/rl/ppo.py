"""PPO on the pretraining loop: ``PPOObjective`` (``python -m posttrain.ppo``), GRPO's rollout loop
(posttrain.rl.trainer) with a critic instead of the group baseline (InstructGPT's PPO; Ziegler et al. 2019):

* critic: a second model in the same layout with its own DeepSpeed engine (optimizer, ZeRO partition), its value
  head the LM head's row ``VALUE_ROW`` (``posttrain.objectives``: the reward model's trick, so an RM run's weights
  load unchanged); initialised from ``rl.critic_init`` (a ``posttrain.rm`` run: its trained value head) or the
  policy's init weights with a fresh value head; learning rate ``rl.critic_lr`` (constant; null = optim.lr);
* per-token rewards ``kl_penalized_rewards``: -beta k_t on every response token (``rl.kl_estimator`` between pi_old
  and the frozen reference; the KL is always in the reward), the rule/RM score on the last one;
* ``gae`` (``rl.gamma``, ``rl.lam``) on the critic's values at rollout time; the advantages whitened over the whole
  rollout (every rank's response tokens; ``rl.normalize_std``);
* per micro-batch: the clipped policy loss (``rl.clip_eps_low/high``, ``rl.loss_agg``; token-mean is PPO's usual) on
  the policy engine, and the clipped value loss (``value_loss``, ``rl.value_clip``, token-mean over the mini-batch's
  global token count) on the critic's engine, which steps at the same mini-batch boundary.

``rl.group_size`` may be 1 (PPO needs no group). The critic is checkpointed to ``train.output_dir/critic/step_N``
before each policy checkpoint (``Objective.before_checkpoint``): DeepSpeed's files and the layout-free state, so
a run resumes in the layout that saved it (DeepSpeed's loader) or any other (resharded, as the policy). Metrics:
GRPO's plus ``rl/value_loss``, ``rl/value_clip_fraction``, ``rl/value_mean``.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from posttrain.objectives import balance_loss, init_value_row, value_of_row, value_of_row_tp
from posttrain.rl import rollout as ro
from posttrain.rl.advantages import gae, masked_whiten
from posttrain.rl.objectives import kl_penalized_rewards, masked_mean, value_loss
from posttrain.rl.trainer import BASE_NAMES, GRPOObjective
from posttrain.stage import PosttrainObjective

PPO_NAMES = BASE_NAMES + ("rl/value_loss", "rl/value_clip_fraction", "rl/value_mean")


class _Critic(PosttrainObjective):
    """``build_model_for``'s finishing step for the critic: values from the LM head's row ``VALUE_ROW``."""

    def __init__(self, fresh_head: bool):
        self.fresh_head = fresh_head

    def prepare_model(self, model, cfg, topo):
        if self.fresh_head:
            init_value_row(model, cfg, topo, cfg.train.seed + 1)
        model.loss_fn = value_of_row_tp if topo.tp > 1 else value_of_row
        return model


class PPOObjective(GRPOObjective):
    """Proximal policy optimisation with a critic on on-policy rollouts of the training model."""

    stage = "ppo"

    def preflight(self, cfg, world_size, rank):
        cfg.rl.kl_in_reward = True  # PPO's KL penalty is per token, in the reward
        checked = super().preflight(cfg, world_size, rank)
        self.names = PPO_NAMES + tuple(f"rl/reward/{w.name}" for w in self.rewards)
        return checked

    def prepare_model(self, model, cfg, topo):
        from pretrain.engine import build_engine, set_lr
        from pretrain.train import build_model_for

        model = super().prepare_model(model, cfg, topo)
        critic_cfg = copy.deepcopy(cfg)
        if cfg.rl.critic_init:
            critic_cfg.train.init_from = cfg.rl.critic_init
        critic = build_model_for(critic_cfg, topo, _Critic(fresh_head=not cfg.rl.critic_init))
        critic.varying_shapes = True  # GRPO's micro-batches (parallel.pipeline: dynamic shapes)
        self.critic = build_engine(critic, cfg, topo, cfg.train.global_batch_size)
        set_lr(self.critic, cfg.rl.critic_lr or cfg.optim.lr)
        self.micro_per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topo.dp_size)
        return model

    def attach(self, engine, topo):
        super().attach(engine, topo)
        self.critic_model = self.critic.module.stage if topo.pp > 1 else self.critic.module
        self.step_batches = []

    def build_data(self, cfg, topo, state, pin_memory):
        if state.step:  # the critic of the resumed checkpoint (saved just before it)
            self.load_critic(cfg, topo, state.step)
        return super().build_data(cfg, topo, state, pin_memory)

    def load_critic(self, cfg, topo, step: int) -> None:
        """The critic saved with checkpoint ``step``: DeepSpeed's files in the layout that wrote them, else its
        layout-free state resharded into this layout (as the policy's ``pretrain.checkpoint.resume``)."""
        import json

        from pretrain.checkpoint import STATE_FILE, CheckpointError, _load_engine_files, _world, tag_for
        from pretrain.checkpoint_format import STATE_DIR, layout_of, load_into_engine

        step_dir = critic_dir(cfg) / tag_for(step)
        saved = json.loads((Path(cfg.train.output_dir) / tag_for(step) / STATE_FILE).read_text())
        if saved.get("engine_files", True) and saved.get("layout") in (None, layout_of(cfg, _world())):
            _load_engine_files(self.critic, cfg, critic_dir(cfg), tag_for(step))
            return
        if not (step_dir / STATE_DIR).is_dir():
            raise CheckpointError(f"{step_dir}: the critic of checkpoint {tag_for(step)} has no layout-free state "
                                  f"(written before it existed); resume PPO in the layout that saved it")
        load_into_engine(self.critic, topo, step_dir / STATE_DIR)
        self.critic.global_steps = step

    def before_checkpoint(self, step: int) -> None:
        """The critic beside checkpoint ``step``: DeepSpeed's files and the layout-free state (collective)."""
        import json

        from pretrain.checkpoint import _all_gather, _world, complete_tags, tag_for
        from pretrain.checkpoint_format import INDEX, STATE_DIR, layout_of, merge_index, snapshot, write_snapshot

        root = critic_dir(self.cfg)
        self.critic.save_checkpoint(str(root), tag=tag_for(step), save_latest=False)
        snap = snapshot(self.critic, self.cfg, self.topo)
        state_dir = root / tag_for(step) / STATE_DIR
        entries = _all_gather(write_snapshot(snap, state_dir))
        if dist.get_rank() == 0:
            state_dir.mkdir(parents=True, exist_ok=True)
            index = merge_index(entries, layout_of(self.cfg, _world()), snap.adam_step)
            (state_dir / INDEX).write_text(json.dumps(index, indent=1))
            keep = set(complete_tags(Path(self.cfg.train.output_dir))) | {tag_for(step)}
            for d in root.glob("step_*"):  # the critics of checkpoints that were pruned
                if d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)

    @torch.no_grad()
    def forward_old_and_ref(self, rollout: ro.Rollout) -> None:
        super().forward_old_and_ref(rollout)
        values = []
        for pos in self.micro_batches(rollout, torch.arange(len(rollout.rows))):
            b = self._inputs(rollout, pos)
            v = self.token_outputs(self.critic_model, b).cpu()
            values.append(F.pad(v, (0, self.cfg.data.seq_length - 1 - b["width"])))
        rollout.values_old = torch.cat(values)

    def compute_advantages(self, rollout: ro.Rollout, scores: torch.Tensor, mask: torch.Tensor) -> None:
        """Per-token KL-penalised rewards -> GAE on the rollout's values -> advantages whitened over every rank's
        response tokens (``masked_whiten`` with the data-parallel sum)."""
        r, local = self.cfg.rl, mask[rollout.rows]
        ref = rollout.logp_old if rollout.logp_ref is None else rollout.logp_ref
        rewards = kl_penalized_rewards(scores[rollout.rows], rollout.logp_old, ref, local, r.kl_coef, r.kl_estimator)
        advantages, rollout.returns = gae(rewards, rollout.values_old, local, r.gamma, r.lam)
        if r.normalize_std:
            advantages = masked_whiten(advantages, local, reduce=self._dp_sum)
        rollout.token_advantages = advantages.float()
        rollout.advantages = torch.zeros(len(scores))

    def batch(self, run, pos):
        b = super().batch(run, pos)
        device = b["input_ids"].device
        w = b["width"]
        b["values_old"] = self.rollout.values_old[pos, :w].to(device)
        b["returns"] = self.rollout.returns[pos, :w].to(device)
        if self.link is not None:  # the critic's pipeline step after the policy's (finish_parts)
            self.step_batches.append(b)
        return b

    def finish_parts(self, parts: dict) -> None:
        """Under pipeline parallelism the critic's step: its own 1F1B ``train_batch`` over the micro-batches the
        policy's step just trained (the same value loss, the same mini-batch boundary as in one process)."""
        if self.link is not None:
            from parallel.pipeline import pipeline_train_batch

            batches, self.step_batches = self.step_batches, []
            means, _, _ = pipeline_train_batch(self.critic, batches, self.policy.weights, lambda b: b, self.device,
                                               _ValueObjective(self))
            parts.update(zip(_ValueObjective.names[1:], means[1:].tolist()))
        super().finish_parts(parts)  # rl/update_seconds with the critic's step, as in one process

    def loss(self, model, batch, weights):
        """The policy's micro-batch, then the critic's on its own engine (which steps at the same boundary)."""
        loss, parts, out = super().loss(model, batch, weights)
        from parallel.expert import sync_expert_grads

        critic = self.critic
        self.micro += 1
        boundary = self.micro == self.micro_per_step
        critic.set_gradient_accumulation_boundary(boundary)
        sync_expert_grads(critic.module, boundary or self.cfg.parallel.zero_stage >= 2)
        value, value_parts = _ValueObjective(self).output_loss(critic(batch["input_ids"], labels=batch["labels"]),
                                                               batch, weights)
        critic.backward(value)
        critic.step()
        parts.update({k: v for k, v in value_parts.items() if k != "loss"})
        return loss, parts, out


class _ValueObjective:
    """The critic's loss on its output (values (B, T)): the clipped value loss (token-mean over the mini-batch's global
    token count), scaled like the policy loss (DeepSpeed averages over the step's micro-batches and ranks), plus the
    critic's MoE balance terms; as ``Objective.output_loss`` for the critic's pipeline step."""

    names = ("loss", "rl/value_loss", "rl/value_clip_fraction", "rl/value_mean")

    def __init__(self, ppo: PPOObjective):
        self.ppo = ppo

    def output_loss(self, out, batch, weights, carried=None):
        t, r = self.ppo.cfg.train, self.ppo.cfg.rl
        scale = t.global_batch_size // t.micro_batch_size
        vl, vm = value_loss(out.lm_loss, batch["values_old"], batch["returns"], batch["mask"], eps_value=r.value_clip,
                            denominator=self.ppo.token_denominator)
        loss = vl * scale + balance_loss(out, weights, carried)
        parts = {"loss": loss, "rl/value_loss": vl * scale, "rl/value_clip_fraction": vm["value_clip_fraction"],
                 "rl/value_mean": masked_mean(out.lm_loss.detach().float(), batch["mask"])}
        return loss, {k: v.detach().float().reshape(()) for k, v in parts.items()}


def critic_dir(cfg) -> Path:
    return Path(cfg.train.output_dir) / "critic"
