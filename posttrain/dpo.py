"""Direct preference optimisation: ``python -m posttrain.dpo --config PRESET_OR_YAML train.init_from=RUN|STEP|HF
data.paths=[PREFS.jsonl ...] [dpo.beta=0.1 dpo.loss_type=sigmoid|ipo dpo.label_smoothing=0.0]``.

The pretraining loop with ``posttrain.objectives.DPOObjective``: the frozen reference is the init weights, either a
second copy in the same layout (default) or, with ``dpo.precompute_reference=true``, log-probs computed in one pass
before the first update and stored by pair index in ``train.output_dir/reference_logps.pt`` (half the memory).
Metrics under TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``). MTP modules are dropped (``model.num_nextn_predict_layers`` = 0). Every
layout, pp > 1 included (the reference cut to the policy's stages).
"""
from __future__ import annotations

from posttrain.objectives import DPOObjective
from posttrain.stage import exit_after, run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage(DPOObjective(), argv)


if __name__ == "__main__":
    exit_after(main())
