"""Post-training on the pretraining machinery (engine, layouts, checkpoints, metrics, launchers).

    python -m posttrain.sft --config PRESET_OR_YAML train.init_from=RUN|STEP|HF data.paths=[FILE.jsonl ...]
    python -m posttrain.rm  ...   # reward model: scalar value head, Bradley-Terry loss
    python -m posttrain.dpo ...   # direct preference optimisation against the frozen init weights

Each stage is a ``pretrain.train.Objective`` run by ``pretrain.train``'s loop: ``posttrain.chat`` (template),
``posttrain.data`` (jsonl records -> packed SFT rows and preference pairs), ``posttrain.objectives`` (losses).
"""
