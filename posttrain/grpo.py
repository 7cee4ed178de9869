"""Group relative policy optimisation: ``python -m posttrain.grpo --config PRESET_OR_YAML train.init_from=RUN|STEP|HF
data.paths=[PROMPTS.jsonl ...] rl.rewards=[{fn: accuracy, weight: 1.0}] [rl.group_size=16 rl.prompts_per_step=32
rl.max_new_tokens=256 rl.temperature=1.0 rl.kl_coef=0.001 ...]``.

The pretraining loop (every layout, pp > 1 included, ZeRO, checkpoints with exact resume mid-rollout, metrics,
launchers via ``MODULE=posttrain.grpo``) with ``posttrain.rl.trainer.GRPOObjective``: prompts ``{"prompt": str |
messages, ...}`` rendered with the chat template; each rollout samples ``rl.group_size`` outputs per prompt from the live
sharded policy and is trained in mini-batches of ``train.global_batch_size`` outputs, one optimizer step each
(R1: 32 prompts x 16 outputs, global batch 32 -> 16 steps per rollout). ``train.epochs`` counts passes over the
prompts. Metrics: ``rl/reward_mean``, ``rl/reward_std``, ``rl/reward/<name>``, ``rl/kl``, ``rl/clip_fraction``,
``rl/ratio``, ``rl/entropy``, ``rl/response_length``, ``rl/route_flip_rate``, ``rl/logprob_mismatch``,
``rl/rollout_seconds``, ``rl/update_seconds`` (the previous step's forward, backward and optimizer step). MTP
modules are dropped; the MoE expert bias is frozen unless ``rl.bias_update_speed`` > 0. Every ``rl.*`` key:
docs/CONFIG.md.
"""
from __future__ import annotations

from posttrain.rl.trainer import GRPOObjective
from posttrain.stage import exit_after, run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage(GRPOObjective(), argv)


if __name__ == "__main__":
    exit_after(main())
