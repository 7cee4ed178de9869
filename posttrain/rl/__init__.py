"""Reinforcement learning for post-training (issue 18): the pure parts the rollout loop builds on.

- `objectives`: GRPO/PPO clipped policy loss, KL estimators k1/k2/k3, loss aggregations, PPO value loss, the
  KL-penalised per-token reward, per-token log-probs and entropy from logits.
- `advantages`: GRPO group advantage, GAE, DAPO dynamic sampling and overlong shaping/filtering.
- `rewards`: `rl.rewards` plug-ins and the built-in accuracy, format and language-consistency rewards.
- `rollout`: RL prompts, the rollout's global rows and per-rank files (exact resume), the MoE route recorder.
- `trainer`: `GRPOObjective`, the rollout loop on the pretraining loop (`python -m posttrain.grpo`).
- `ppo`: `PPOObjective`, the same loop with a critic engine, GAE and the value loss (`python -m posttrain.ppo`).
"""
