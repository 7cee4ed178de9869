"""Proximal policy optimisation: ``python -m posttrain.ppo --config PRESET_OR_YAML train.init_from=RUN|STEP|HF
data.paths=[PROMPTS.jsonl ...] rl.rewards=[{fn: accuracy}] [rl.critic_init=RM_RUN rl.critic_lr=... rl.gamma=1.0
rl.lam=0.95 rl.value_clip=0.2 rl.group_size=1 rl.kl_coef=0.05 rl.loss_agg=token-mean ...]``.

``posttrain.grpo``'s loop (rollouts on the live sharded policy, mini-batches of ``train.global_batch_size``, exact
resume, every layout but pp > 1) with ``posttrain.rl.ppo.PPOObjective``: a critic (value head on its own model and
DeepSpeed engine, from ``rl.critic_init`` or the policy), GAE, the clipped value loss and the per-token KL penalty
in the reward. Metrics: GRPO's plus ``rl/value_loss``, ``rl/value_clip_fraction``, ``rl/value_mean``.
"""
from __future__ import annotations

from posttrain.rl.ppo import PPOObjective
from posttrain.stage import exit_after, run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage(PPOObjective(), argv)


if __name__ == "__main__":
    exit_after(main())
