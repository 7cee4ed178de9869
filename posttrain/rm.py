"""Reward model: ``python -m posttrain.rm --config PRESET_OR_YAML train.init_from=RUN|STEP|HF
data.paths=[PREFS.jsonl ...] [rm.margin=0.0]``.

The pretraining loop with ``posttrain.objectives.RMObjective``: the LM head becomes a scalar value head read at the
last token of each sequence, trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) on
preference pairs (the ranked form expands into every pair of different ranks); metrics ``rm/accuracy``,
``rm/margin``. ``posttrain.reward`` loads the result (``RewardModel.score(texts)``) and exports it to transformers'
``*ForSequenceClassification``. MTP modules are dropped. Every layout, pp > 1 included.
"""
from __future__ import annotations

from posttrain.objectives import RMObjective
from posttrain.stage import exit_after, run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage(RMObjective(), argv)


if __name__ == "__main__":
    exit_after(main())
