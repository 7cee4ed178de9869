"""Checkpoints of a run directory: save, automatic resume, and loading the weights back for export.

Layout of ``train.output_dir``::

    config.yaml                 resolved config of the run
    tokenizer.model             copy of the sentencepiece model the data was built with (when known)
    latest                      name of the newest *complete* checkpoint (written last, atomically, by rank 0)
    step_0000100/
        mp_rank_00_model_states.pt, zero_pp_rank_R_mp_rank_00_optim_states.pt   DeepSpeed engine state
        trainer_state.json      step, samples consumed, tokens seen, schedule state (LR, lambda, gamma)
        rng_rank_00000.pt ...   RNG states (python, numpy, torch, cuda) of every rank
        config.yaml             resolved config (the architecture check and export read it)

A checkpoint counts only once ``latest`` names it: ``latest`` is written after a barrier (every rank has
finished writing), to a temporary file renamed over the old one, so a crash mid-save leaves the previous
checkpoint as the resume point. The ``latest`` format (the tag on one line) is DeepSpeed's own, so its
``zero_to_fp32`` utilities read our run directories directly.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import Config, ConfigError, load_config, save_config

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where the run is: everything besides the engine needed to continue exactly."""

    step: int = 0
    """Optimizer steps completed."""
    consumed_samples: int = 0
    """Global samples consumed (the data position)."""
    tokens_seen: int = 0
    """Training tokens consumed (drives the LR, lambda and gamma schedules)."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run_files(cfg: Config, run_dir: Path, tokenizer: str | None) -> str | None:
    """Rank 0: the resolved config and a copy of the tokenizer in the run directory; returns the copy's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if tokenizer is None:
        return None
    target = run_dir / "tokenizer.model"
    if Path(tokenizer).resolve() != target.resolve():
        shutil.copyfile(tokenizer, target)
    return str(target)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, cfg: Config, state: TrainState, schedule_state: dict) -> Path:
    """Collective: every rank writes its engine shard and RNG state; rank 0 then publishes ``latest``."""
    run_dir = Path(cfg.train.output_dir)
    tag = tag_for(state.step)
    step_dir = run_dir / tag
    # save_latest=False: DeepSpeed would write `latest` before the other ranks are known to be done.
    engine.save_checkpoint(str(run_dir), tag=tag, save_latest=False)
    torch.save(_rng_state(), step_dir / f"rng_rank_{_rank():05d}.pt")
    if _rank() == 0:
        save_config(cfg, step_dir / "config.yaml")
        (step_dir / STATE_FILE).write_text(json.dumps({**asdict(state), "schedule": schedule_state}, indent=1))
    _barrier()  # every rank's files are on disk
    if _rank() == 0:
        _atomic_write(run_dir / "latest", tag)
        prune_checkpoints(run_dir, cfg.train.keep_last)
    _barrier()
    return step_dir


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step directories (never the one ``latest`` names)."""
    latest = read_latest(run_dir)
    steps = sorted(p for p in run_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def read_latest(run_dir: Path) -> str | None:
    """The tag named by ``run_dir/latest`` if that checkpoint exists, else None."""
    latest = Path(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (Path(run_dir) / tag / STATE_FILE).is_file() else None


def check_architecture(cfg: Config, step_dir: Path) -> None:
    """Refuse a checkpoint whose ``model`` section differs from ``cfg.model``: one line naming the key."""
    saved = load_config(step_dir / "config.yaml").model
    for key, value in asdict(cfg.model).items():
        old = getattr(saved, key)
        if old != value:
            raise ConfigError(f"model.{key}={value!r} but checkpoint {step_dir} was trained with {old!r}; "
                              f"use the checkpoint's architecture or a new train.output_dir")


def resume(engine, cfg: Config) -> TrainState:
    """Load the newest complete checkpoint of ``train.output_dir`` into ``engine`` and this rank's RNG.

    Returns the restored TrainState, or a fresh one when the directory holds no complete checkpoint.
    """
    run_dir = Path(cfg.train.output_dir)
    tag = read_latest(run_dir)
    if tag is None:
        return TrainState()
    step_dir = run_dir / tag
    check_architecture(cfg, step_dir)
    load_path, _ = engine.load_checkpoint(str(run_dir), tag=tag)
    if load_path is None:
        raise ConfigError(f"checkpoint {step_dir}: DeepSpeed could not load it; remove it or `latest` to start over")
    if cfg.parallel.ep > 1 and cfg.parallel.pp == 1 and hasattr(engine.optimizer, "update_lp_params"):
        # DeepSpeed writes the module states from data-parallel rank 0 only, so every EP rank has just loaded
        # rank 0's experts; the ZeRO fp32 partitions hold each rank's own experts: copy them back.
        engine.optimizer.update_lp_params()
    saved = json.loads((step_dir / STATE_FILE).read_text())
    rng_file = step_dir / f"rng_rank_{_rank():05d}.pt"
    if rng_file.is_file():  # absent when the run is resumed on more ranks than it was saved with
        _set_rng_state(torch.load(rng_file, weights_only=False))
    if _rank() == 0:
        print(f"[train] resumed from {step_dir} (step {saved['step']}, {saved['tokens_seen']:,} tokens seen)",
              flush=True)
    return TrainState(step=saved["step"], consumed_samples=saved["consumed_samples"],
                      tokens_seen=saved["tokens_seen"])


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """A run directory (uses ``latest``) or a step directory -> (run_dir, tag)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path.parent, path.name
    if path.is_dir():
        tag = read_latest(path)
        if tag is not None:
            return path, tag
    raise FileNotFoundError(f"{path}: not a run directory with a complete checkpoint (no `latest`) nor a "
                            f"step_NNNNNNN directory; pass train.output_dir of a run or one of its step_* folders")


def consolidated_state_dict(run_dir: Path, tag: str) -> dict:
    """Full fp32 weights (and buffers) of a checkpoint, merging ZeRO shards with DeepSpeed's zero_to_fp32."""
    step_dir = run_dir / tag
    if any(step_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag)
    # ZeRO stage 0: DeepSpeed keeps the whole module in the model-states file.
    states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def load_model_from_checkpoint(path: str | os.PathLike):
    """(model, config, tokenizer path or None) from a run directory or a step directory, on the CPU in fp32."""
    from pretrain.model import build_model

    run_dir, tag = resolve_checkpoint(path)
    cfg = load_config(run_dir / tag / "config.yaml")
    model = build_model(cfg.model)
    from parallel.pipeline import gather_pipeline_state_dict, is_pipeline_checkpoint
    if is_pipeline_checkpoint(run_dir / tag):  # parallel.pp > 1: per-layer files, TP and expert shards merged
        state = gather_pipeline_state_dict(run_dir / tag, model)
    else:
        state = consolidated_state_dict(run_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = set(model.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise ValueError(f"checkpoint {run_dir / tag}: weights do not match the model "
                         f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    tokenizer = run_dir / "tokenizer.model"
    if tokenizer.is_file():
        return model.eval(), cfg, str(tokenizer)
    return model.eval(), cfg, cfg.data.tokenizer
