"""Supervised fine-tuning: ``python -m posttrain.sft --config PRESET_OR_YAML train.init_from=RUN|STEP|HF
data.paths=[FILE.jsonl ...] [section.key=value ...]``.

The pretraining loop (``pretrain.train``: every layout, pp > 1 included, ZeRO, checkpoints and exact resume, metrics,
launchers via ``MODULE=posttrain.sft``) with ``posttrain.objectives.SFTObjective``: chat records rendered with the
chat template, packed without cross-conversation attention, loss on the assistant turns (``train.loss_on``); MTP
stays on when the model has it. Fine-tuning defaults to taste: set ``schedule.name=cosine`` (or ``constant``), a
short ``schedule.warmup_steps`` and ``train.epochs`` (DeepSeek-R1's rejection-sampling SFT: 2 epochs).
Held-out loss: ``data.eval_paths=[HELDOUT.jsonl] train.eval_interval=N`` logs ``eval/loss`` (the masked
cross-entropy on the held-out conversations' assistant tokens).
"""
from __future__ import annotations

from posttrain.objectives import SFTObjective
from posttrain.stage import exit_after, run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage(SFTObjective(), argv)


if __name__ == "__main__":
    exit_after(main())
