"""Training datasets: packed ``seq_length + 1`` windows, blended by weight, sliced by data-parallel rank.

    ds = build_dataset(paths, weights, seq_length, seed, num_samples)   # ds[i] -> np.int64 (seq_length + 1,)
    stream = SampleStream(ds, dp_rank, dp_size, micro_batch_size, consumed_samples=0)
    micro_batches = stream.next_batch(global_batch_size)   # list of LongTensor (mb, seq_length + 1)

The sample stream is megatron-core's own, run on the CPU without a process group: one ``GPTDataset`` per
shard (documents shuffled per epoch from the seed, their concatenated tokens cut into windows that overlap by
one token, no padding, the windows shuffled; as many epochs as ``num_samples`` needs) and a ``BlendedDataset``
over all shards of all paths (megatron's greedy blending hits the weights to within one sample at every
prefix). A path's weight is spread over its shards in proportion to their tokens. megatron's precompiled
``helpers_cpp`` builds the indices; nothing is cached on disk (each rank builds the same indices from the same
seed), so no barrier and no writable data directory are needed.
"""
from __future__ import annotations

import logging
import math
import os
import warnings

import numpy as np
import torch

from data_pipeline.readers import DataError
from data_pipeline.shards import check_shard, read_manifest

# megatron's BlendedMegatronDatasetBuilder over-provisions each component by this fraction, so that the
# blend never asks a component for more samples than it built.
_SURPLUS = 0.005


def resolve_path(path: str) -> list[dict]:
    """Shards of one data path (a build directory or a shard prefix), each checked against its ``.idx``.

    Returns ``[{"prefix": abs prefix, "tokens": n, "manifest": dict | None}]``.
    """
    if os.path.isdir(path):
        manifest = read_manifest(path)
        shards = []
        for shard in manifest.get("shards", []):
            prefix = os.path.join(path, shard["prefix"])
            # A manifest names files inside its own directory: no absolute paths, no "..".
            if os.path.commonpath([os.path.realpath(path), os.path.realpath(prefix)]) != os.path.realpath(path):
                raise DataError(f"{path}/manifest.json: shard {shard['prefix']!r} points outside {path}; "
                                f"shard names must be file names inside the build directory")
            shards.append({"prefix": prefix, "tokens": check_shard(prefix, shard["tokens"]), "manifest": manifest})
        if not shards:
            raise DataError(f"{path}/manifest.json lists no shards (every document was skipped?)")
        return shards
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if not (os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx")):
        raise DataError(f"data path {path} not found: expected a directory written by python -m "
                        f"data_pipeline.build or a shard prefix PATH with PATH.bin and PATH.idx")
    manifest_path = os.path.join(os.path.dirname(prefix), "manifest.json")
    manifest = read_manifest(os.path.dirname(prefix) or ".") if os.path.isfile(manifest_path) else None
    return [{"prefix": prefix, "tokens": check_shard(prefix), "manifest": manifest}]


class _TokenizerShim:
    """The three attributes megatron's dataset config reads from a tokenizer."""

    def __init__(self, eod: int | None):
        self.eod = -2 if eod is None else eod  # only used for masks we do not request (-1 is megatron's pad)
        self.vocab_size = None
        self.unique_identifiers = {"class": "data_pipeline", "eod": self.eod}


def _megatron():
    # Importing megatron.core warns about Transformer Engine on CPU machines; the warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_dataset import BlendedDataset
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        from megatron.core.datasets.utils import Split
    return BlendedDataset, GPTDataset, GPTDatasetConfig, IndexedDataset, Split


class PackedDataset(torch.utils.data.Dataset):
    """``num_samples`` windows of ``seq_length + 1`` tokens; ``ds[i]`` is an ``np.int64 (seq_length + 1,)``.

    Attributes: ``eos_id`` (from the manifests, or None), ``weights`` (normalized per path),
    ``tokenizer`` (the manifests' tokenizer entry, or None).
    """

    def __init__(self, paths, weights, seq_length: int, seed: int, num_samples: int):
        if isinstance(paths, str):
            paths = [paths]
        _check_args(paths, weights, seq_length, num_samples)
        per_path = [resolve_path(p) for p in paths]
        path_tokens = [sum(s["tokens"] for s in shards) for shards in per_path]
        if weights is None:  # proportional to size, as megatron does for a blend without weights
            weights = path_tokens
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.seq_length, self.seed, self.num_samples = seq_length, seed, num_samples
        self.tokenizer = _common_tokenizer(paths, per_path)
        self.eos_id = self.tokenizer["eos_id"] if self.tokenizer else None
        components = [(s["prefix"], w * s["tokens"] / n)
                      for shards, w, n in zip(per_path, self.weights, path_tokens) for s in shards]
        self._blend = self._build(components)

    def _build(self, components):
        BlendedDataset, GPTDataset, GPTDatasetConfig, IndexedDataset, Split = _megatron()
        # blend=None makes megatron treat the config as "mock", which only means: keep the sample indices in
        # memory instead of caching them next to the shards (see module docstring).
        config = GPTDatasetConfig(
            random_seed=self.seed, sequence_length=self.seq_length, tokenizer=_TokenizerShim(self.eos_id),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, add_extra_token_to_sequence=True, path_to_cache=None)
        datasets = []
        quiet = logging.getLogger("megatron.core.datasets")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "cannot save indexes because path_to_cache is None": intended
        try:
            for prefix, weight in components:
                indexed = IndexedDataset(prefix)
                num = max(1, math.ceil(weight * self.num_samples * (1 + _SURPLUS)))
                documents = np.arange(len(indexed.sequence_lengths), dtype=np.int32)
                datasets.append(GPTDataset(indexed, prefix, documents, num, Split.train, config))
            if len(datasets) == 1:
                return datasets[0]
            return BlendedDataset(datasets, [w for _, w in components], self.num_samples, config)
        finally:
            quiet.setLevel(level)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range: the dataset was built for {self.num_samples} samples")
        sample = self._blend[int(idx)]
        # megatron returns the window as tokens = w[:-1], labels = w[1:]; put it back together.
        window = torch.cat([sample["tokens"], sample["labels"][-1:]])
        return window.numpy()


def _check_args(paths, weights, seq_length, num_samples) -> None:
    if not paths:
        raise DataError("data.paths is empty: give at least one directory written by python -m data_pipeline.build")
    if weights is not None:
        if len(weights) != len(paths):
            raise DataError(f"data.weights has {len(weights)} entries but data.paths has {len(paths)}")
        if any(not (w > 0) for w in weights):
            raise DataError(f"data.weights must all be > 0, got {list(weights)}")
    if seq_length < 1:
        raise DataError(f"data.seq_length must be >= 1, got {seq_length}")
    if num_samples < 1:
        raise DataError(f"num_samples must be >= 1, got {num_samples}")


def _common_tokenizer(paths, per_path) -> dict | None:
    """The tokenizer all manifests agree on; different tokenizers in one blend is an error."""
    seen = {}
    for path, shards in zip(paths, per_path):
        manifest = shards[0]["manifest"]
        if manifest and manifest.get("tokenizer"):
            seen[path] = manifest["tokenizer"]
    hashes = {t["sha256"] for t in seen.values()}
    if len(hashes) > 1:
        listing = ", ".join(f"{p}: {t['sha256'][:12]}" for p, t in seen.items())
        raise DataError(f"data paths were tokenized with different tokenizers ({listing}); rebuild them with one")
    return next(iter(seen.values()), None)


def build_dataset(paths, weights, seq_length: int, seed: int, num_samples: int) -> PackedDataset:
    """The global sample stream over ``paths`` (build directories or shard prefixes) blended by ``weights``
    (None = by size). Missing shards, ``.bin``/``.idx`` mismatches and directories without a manifest raise a
    one-line ``DataError`` here, before training starts."""
    return PackedDataset(paths, weights, seq_length, seed, num_samples)


class SampleStream:
    """This data-parallel rank's micro-batches of the global sample stream.

    Global batch g holds samples ``[c, c + global_batch_size)`` where ``c`` is the samples consumed before
    it; rank r takes the contiguous slice ``[c + r * B/dp, c + (r + 1) * B/dp)``, so the global order does not
    depend on the data-parallel size and ``consumed_samples`` alone is the resume state.
    """

    def __init__(self, ds, dp_rank: int, dp_size: int, micro_batch_size: int, consumed_samples: int = 0,
                 pin_memory: bool = False):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.ds, self.dp_rank, self.dp_size, self.micro_batch_size = ds, dp_rank, dp_size, micro_batch_size
        self.consumed_samples = consumed_samples
        self.pin_memory = pin_memory  # page-locked batches: asynchronous host-to-GPU copies (non_blocking=True)

    def next_batch(self, global_batch_size: int) -> list[torch.Tensor]:
        """This rank's micro-batches of the next global batch: list of LongTensor ``(mb, seq_length + 1)``."""
        per_rank = global_batch_size // self.dp_size
        if global_batch_size % (self.micro_batch_size * self.dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size} x dp {self.dp_size}")
        start = self.consumed_samples + self.dp_rank * per_rank
        if self.consumed_samples + global_batch_size > len(self.ds):
            raise DataError(f"the dataset was built for {len(self.ds)} samples and {self.consumed_samples} are "
                            f"consumed: build it with num_samples >= steps x global_batch_size")
        micro_batches = []
        for first in range(start, start + per_rank, self.micro_batch_size):
            rows = [self.ds[i] for i in range(first, first + self.micro_batch_size)]
            batch = torch.from_numpy(np.stack(rows))
            micro_batches.append(batch.pin_memory() if self.pin_memory else batch)
        self.consumed_samples += global_batch_size
        return micro_batches

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def document_boundaries(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-token document ids for ``data.reset_attention_at_eos``: ``tokens (B, T)`` -> ``document_ids (B, T)``.

    Every document ends with ``<eos>``, so a new document starts right after each one; the eos belongs to the
    document it ends. The model takes them as ``model(input_ids, document_ids=...)``: tokens attend only within their
    document and positions restart at each (``pretrain.model.transformer.positions_in_documents``).
    """
    is_eos = (tokens == eos_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos
