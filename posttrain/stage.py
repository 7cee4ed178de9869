"""What every post-training stage shares: the preflight (tokenizer with chat pieces, vocabulary, jsonl data, run
length from ``train.epochs``) and the data stream, as a ``pretrain.train.Objective`` the pretraining loop runs.

The tokenizer is, in this order: the run directory's own ``tokenizer.model`` (a resumed run), ``data.tokenizer``,
or the one of ``train.init_from`` (a run directory's copy, or a HuggingFace folder's ``tokenizer.model``); the chat
pieces are appended (``data_pipeline.tokenizer.add_chat_tokens``) and the result is the run's ``tokenizer.model``.
``model.vocab_size`` null = ``train.init_from``'s (the chat pieces must fit in it: pretraining pads the vocabulary to
a multiple of 128 x tp, which leaves room), else the tokenizer's padded as in pretraining.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from data_pipeline.readers import DataError
from posttrain.chat import ChatTokenizer
from posttrain.data import fingerprint
from pretrain.config import Config, ConfigError, validate
from pretrain.train import Objective


def init_tokenizer(path: str) -> Path | None:
    """The sentencepiece model that came with ``train.init_from`` (run, step or HuggingFace directory), or None."""
    p = Path(path)
    for candidate in (p / "tokenizer.model", p.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def init_vocab_size(path: str) -> int | None:
    """``model.vocab_size`` of ``train.init_from`` (config.json of a HuggingFace folder, else the run's config)."""
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.config import load_config

    p = Path(path)
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text()).get("vocab_size")
    run_dir, tag = resolve_checkpoint(p)
    return load_config(run_dir / tag / "config.yaml").model.vocab_size


def chat_tokenizer(cfg: Config) -> ChatTokenizer:
    """The run's tokenizer with the chat pieces (written to ``train.output_dir/tokenizer.model``)."""
    from data_pipeline.tokenizer import add_chat_tokens

    own = Path(cfg.train.output_dir) / "tokenizer.model"
    if own.is_file():
        source = own
    elif cfg.data.tokenizer:
        source = Path(cfg.data.tokenizer)
        if not source.is_file():
            raise ConfigError(f"data.tokenizer: {source} does not exist")
    else:
        source = init_tokenizer(cfg.train.init_from) if cfg.train.init_from else None
        if source is None:
            raise ConfigError("data.tokenizer is null and train.init_from brings no tokenizer.model; set "
                              "data.tokenizer to the sentencepiece model the base model was trained with")
    return ChatTokenizer(add_chat_tokens(source, own))


def resolve_vocab(cfg: Config, tok: ChatTokenizer, tp: int) -> None:
    from pretrain.preflight import VOCAB_MULTIPLE

    if cfg.model.vocab_size is None:
        if cfg.train.init_from:
            cfg.model.vocab_size = init_vocab_size(cfg.train.init_from)
        else:
            multiple = VOCAB_MULTIPLE * tp
            cfg.model.vocab_size = -(-tok.vocab_size // multiple) * multiple
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} has no room for the chat pieces (the tokenizer "
                          f"with them has {tok.vocab_size} ids); pretrain with a larger model.vocab_size")


def resolve_length(cfg: Config, num_rows: int) -> None:
    """``train.epochs`` with neither ``train.steps`` nor ``train.total_tokens``: whole global batches of epochs x
    the first epoch's rows."""
    t = cfg.train
    if t.steps is None and t.total_tokens is None:
        t.steps = max(1, int(t.epochs * num_rows) // t.global_batch_size)


class PosttrainObjective(Objective):
    """A post-training stage: ``load(cfg, tok, skipped, paths)`` reads the jsonl records, ``dataset(cfg, num_rows,
    records)`` makes the rows; subclasses add ``batch`` and ``output_loss`` (and ``output_eval_loss``), which the
    last pipeline stage also calls.

    Held-out evaluation: ``data.eval_paths`` (jsonl files of the stage's own format) with ``train.eval_interval``
    > 0 logs the mean ``eval_loss`` over ``train.eval_iters`` micro-batches per rank as ``eval/loss`` (SFT: the
    masked cross-entropy on the assistant tokens; RM: the Bradley-Terry loss; DPO: the DPO loss)."""

    stage = "posttrain"
    eval_records: list | None = None

    def load(self, cfg: Config, tok: ChatTokenizer, skipped: dict, paths: list) -> list:
        raise NotImplementedError

    def dataset(self, cfg: Config, num_rows: int, records: list | None = None):
        raise NotImplementedError

    def preflight(self, cfg: Config, world_size: int, rank: int):
        from parallel.topology import Topology, check_layout, check_pipeline_layout
        from pretrain.preflight import Preflight, check_reliability_config
        from pretrain.schedule import validate_schedule

        from pretrain.train import check_pipeline_support

        validate(cfg)
        check_pipeline_support(cfg, self)  # before the layout: one line even on one process
        topo = Topology.from_config(cfg, world_size, rank)
        if not cfg.data.paths:
            raise ConfigError(f"data.paths is empty: give the {self.stage} .jsonl files")
        self.tok = chat_tokenizer(cfg)
        resolve_vocab(cfg, self.tok, topo.tp)
        skipped: dict = {}
        self.records = self.load(cfg, self.tok, skipped, cfg.data.paths)
        if rank == 0 and skipped:
            print(f"[{self.stage}] skipped records: {skipped}", file=sys.stderr, flush=True)
        if not self.records:
            raise DataError(f"data.paths: no usable {self.stage} record (skipped: {skipped or 'none'})")
        self.skipped = skipped
        if cfg.data.eval_paths and cfg.train.eval_interval > 0:
            eval_skipped: dict = {}
            self.eval_records = self.load(cfg, self.tok, eval_skipped, cfg.data.eval_paths)
            if not self.eval_records:
                raise DataError(f"data.eval_paths: no usable {self.stage} record (skipped: {eval_skipped or 'none'})")
        resolve_length(cfg, len(self.dataset(cfg, 1).rows_of(0)))
        check_layout(cfg.model, topo, cfg.train.micro_batch_size, cfg.train.global_batch_size)
        check_pipeline_layout(cfg)
        validate_schedule(cfg, topo.dp_size)
        check_reliability_config(cfg, topo)
        return Preflight(topo, self.tok.path, fingerprint(cfg.data.paths), self.tok.tok.eos_id)

    def attach(self, engine, topo) -> None:
        """``policy``: what this rank trains, for forwards outside the training step (DPO's precomputed reference,
        RL's rollouts): the model, or its pipeline stage."""
        self.policy = engine.module.stage if topo.pp > 1 else engine.module

    def build_data(self, cfg: Config, topo, state, pin_memory: bool):
        from data_pipeline.dataset import SampleStream
        from pretrain.schedule import total_samples

        t = cfg.train
        stream = SampleStream(self.dataset(cfg, total_samples(cfg)), topo.dp_rank, topo.dp_size,
                              t.micro_batch_size, consumed_samples=state.consumed_samples, pin_memory=pin_memory)
        eval_ds = None
        if self.eval_records:
            eval_ds = self.dataset(cfg, t.eval_iters * t.micro_batch_size * topo.dp_size, self.eval_records)
        return stream, eval_ds


def run_stage(objective: PosttrainObjective, argv: list[str] | None = None) -> int:
    """``python -m posttrain.<stage>``: ``pretrain.train``'s command line and loop with ``objective``."""
    from pretrain.train import main

    return main(argv, objective, prog=f"python -m posttrain.{objective.stage}")


def exit_after(code: int) -> None:
    """As ``pretrain.train``: ``pretrain.engine.exit_process`` (process group destroyed, no interpreter
    finalisation of gloo/DeepSpeed worker threads)."""
    from pretrain.engine import exit_process

    exit_process(code)


def token_logps(nll_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihoods (B, T) (0 where ignored) -> summed log-probability per sequence (B,)."""
    return -(nll_BT * (labels_BT != -100)).sum(-1)
