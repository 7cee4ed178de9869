"""One validation entry point for a run: config, layout and data together, before any process exists.

    python -m pretrain.preflight --config PRESET_OR_YAML --world-size N [section.key=value ...]

prints one line (``preflight ok: ...``, exit 0, or ``error: ...`` naming the key or file and the fix, exit 2). The
launch scripts run it once in a single process before starting any rank, so a bad config is one line with no
launcher traceback, and a slurm job fails before ``srun``. ``pretrain.train`` calls :func:`preflight` on every rank
too (the same checks, before ``torch.distributed`` is initialised).

The checks, in order: the config on its own (``pretrain.config.validate``), the degrees (``parallel.Topology``), the
data (paths, shard integrity, the tokenizer the shards were built with, ``model.vocab_size`` null = taken from it,
an eos id when ``data.reset_attention_at_eos``), the model and batch against the layout
(``parallel.topology.check_layout``), the pipeline layout, the schedule, the fault-handling keys.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import Config, ConfigError, load_config, validate

VOCAB_MULTIPLE = 128
"""A vocabulary taken from the tokenizer is padded to a multiple of this x tp (GEMM-friendly, divisible by tp)."""


@dataclass
class Preflight:
    """What the checks resolved: the run starts from these."""

    topo: object
    """parallel.Topology of this rank."""
    tokenizer: str | None
    """Path of the sentencepiece model the shards were built with (None for synthetic shards)."""
    fingerprint: list
    """[[shard file name, .bin bytes, .idx sha256], ...]: a resume refuses other shards."""
    eos_id: int | None
    """The tokenizer's eos id (document boundaries)."""


def check_data_paths(paths: list, key: str) -> None:
    """One line naming the missing shard prefix or directory."""
    for p in paths:
        if not (Path(p).is_dir() or Path(f"{p}.idx").is_file()):
            raise ConfigError(f"{key}: {p} is neither a shard directory nor a prefix with {p}.idx; build shards "
                              f"with `python -m data_pipeline.build` or fix the path")


def manifest_tokenizer(cfg: Config) -> tuple[dict, Path | None]:
    """The ``tokenizer`` entry of the first shard directory's manifest.json ({} when there is none)."""
    first = Path(cfg.data.paths[0])
    manifest = (first if first.is_dir() else first.parent) / "manifest.json"
    if not manifest.is_file():
        return {}, None
    entry = json.loads(manifest.read_text()).get("tokenizer")
    return (entry if isinstance(entry, dict) else {"path": entry}), manifest


def resolve_vocab(cfg: Config, entry: dict, manifest: Path | None, tp: int) -> None:
    """``model.vocab_size``: null = the tokenizer's vocabulary padded to a multiple of 128 x tp; an explicit value
    smaller than the tokenizer's is refused (token ids would index past the embedding)."""
    vocab = int(entry.get("vocab_size") or 0)
    where = manifest.parent if manifest else cfg.data.paths[0]
    if cfg.model.vocab_size is None:
        if not vocab:
            raise ConfigError(f"model.vocab_size is null and the shards in {where} name no tokenizer vocabulary; "
                              f"set model.vocab_size")
        multiple = VOCAB_MULTIPLE * tp
        cfg.model.vocab_size = -(-vocab // multiple) * multiple
    elif vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of the tokenizer "
                          f"({vocab}) the shards in {where} were built with; set model.vocab_size={vocab} or null")


def resolve_tokenizer(cfg: Config, entry: dict) -> str | None:
    """``data.tokenizer``, else the tokenizer named in the shards' manifest (when the file exists)."""
    if cfg.data.tokenizer:
        if not Path(cfg.data.tokenizer).is_file():
            raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer} does not exist")
        return cfg.data.tokenizer
    path = entry.get("path")
    return path if path and Path(path).is_file() else None


def data_fingerprint(paths: list) -> list:
    """[[shard file name, .bin bytes, .idx sha256], ...] over ``paths`` in order: cheap (the .bin is not read)
    yet any rebuild changes it (document lengths live in the .idx). Also checks every shard's files."""
    from data_pipeline.dataset import resolve_path

    out = []
    for path in paths:
        for shard in resolve_path(str(path)):
            prefix = shard["prefix"]
            digest = hashlib.sha256(Path(prefix + ".idx").read_bytes()).hexdigest()
            out.append([Path(prefix).name, Path(prefix + ".bin").stat().st_size, digest])
    return out


def check_reliability_config(cfg: Config, topo) -> None:
    """One line per bad value of the fault-handling keys."""
    t = cfg.train
    checks = [(t.dist_timeout_s > 0, f"train.dist_timeout_s={t.dist_timeout_s}: must be positive"),
              (t.step_timeout_s is None or t.step_timeout_s > 0,
               f"train.step_timeout_s={t.step_timeout_s}: must be positive or null"),
              (t.max_skipped_steps >= 1, f"train.max_skipped_steps={t.max_skipped_steps}: must be >= 1"),
              (t.loss_spike_sigma >= 0, f"train.loss_spike_sigma={t.loss_spike_sigma}: must be >= 0 (0 = off)"),
              (t.loss_spike_window >= 2, f"train.loss_spike_window={t.loss_spike_window}: must be >= 2"),
              (not (t.loss_spike_sigma and topo.pp > 1),
               "train.loss_spike_sigma needs the loss on every rank, which parallel.pp > 1 keeps on the last "
               "stage only; set train.loss_spike_sigma=0")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_precision_layout(cfg: Config, topo) -> None:
    """DeepSpeed's bf16 optimizer at ZeRO stage 0 computes the gradient norm (and so the clipping) wrongly across
    tensor- and expert-parallel ranks (measured on tiny, step 1: tp2 0.72 and dp2-ep2 0.967 against one process's
    0.973; at ZeRO 1 all three agree): refuse it rather than train with a wrong clip."""
    if cfg.train.precision == "bf16" and cfg.parallel.zero_stage == 0 and (topo.tp > 1 or topo.ep > 1):
        raise ConfigError(f"parallel.zero_stage=0 with train.precision=bf16 and {topo.describe()}: DeepSpeed's bf16 "
                          f"optimizer gets the gradient norm wrong across tensor/expert-parallel ranks; use "
                          f"parallel.zero_stage=1 (or train.precision=fp32)")


def preflight(cfg: Config, world_size: int, rank: int | None = None) -> Preflight:
    """Check the run ``cfg`` on ``world_size`` processes; fills ``cfg.model.vocab_size`` when null. Raises
    ``ConfigError`` / ``DataError`` / ``FileNotFoundError`` with one line naming the key or file and the fix."""
    from parallel.topology import Topology, check_layout, check_pipeline_layout
    from pretrain.schedule import validate_schedule

    validate(cfg)
    topo = Topology.from_config(cfg, world_size, rank)
    d = cfg.data
    if not d.paths:
        raise ConfigError("data.paths is empty: give shard directories or prefixes built by data_pipeline.build")
    check_data_paths(d.paths, "data.paths")
    check_data_paths(d.eval_paths, "data.eval_paths")
    fingerprint = data_fingerprint(d.paths)
    entry, manifest = manifest_tokenizer(cfg)
    resolve_vocab(cfg, entry, manifest, topo.tp)
    eos_id = entry.get("eos_id")
    if d.reset_attention_at_eos and eos_id is None:
        raise ConfigError(f"data.reset_attention_at_eos=true but the shards in {d.paths[0]} record no eos id "
                          f"(manifest.json tokenizer.eos_id); rebuild them with data_pipeline.build or set it false")
    check_layout(cfg.model, topo, cfg.train.micro_batch_size, cfg.train.global_batch_size)
    check_pipeline_layout(cfg)
    validate_schedule(cfg, topo.dp_size)
    check_reliability_config(cfg, topo)
    check_precision_layout(cfg, topo)
    return Preflight(topo, resolve_tokenizer(cfg, entry), fingerprint, eos_id)


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.readers import DataError

    p = argparse.ArgumentParser(prog="python -m pretrain.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="preset name or YAML path")
    p.add_argument("--world-size", type=int, required=True, help="processes the run will start (all nodes)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        checked = preflight(cfg, args.world_size, rank=0)
    except (ConfigError, DataError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    t = checked.topo
    print(f"preflight ok: {args.config} on {t.describe()}, model.vocab_size={cfg.model.vocab_size}, "
          f"{len(checked.fingerprint)} shard(s), tokenizer {checked.tokenizer or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
