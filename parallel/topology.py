"""The process topology: tensor x pipeline x data parallel, with expert parallelism inside data parallelism.

``Topology`` is a small frozen dataclass that validates itself on creation, before any process group
exists; every error is one line naming all degrees and the world size. Rank order (fastest first):
tp, then dp (whose fastest part is ep), then pp. It is the order of megatron-core's default
``order="tp-cp-ep-dp-pp"`` and of DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model,
the last varying fastest), so the pipeline engine, ZeRO and megatron-core's layers agree on who is who:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank,      dp_rank = edp_rank * ep + ep_rank

Experts are sharded over the ``ep`` consecutive data-parallel ranks of an expert-parallel group and
replicated over the expert-data-parallel group (the data-parallel ranks holding the same expert shard).

``initialize_parallel(topo)`` creates the groups with ``megatron.core.parallel_state.initialize_model_parallel``
(it runs on CPU with gloo: it only calls ``torch.distributed.new_group``) and registers the expert groups in
``deepspeed.utils.groups`` under DeepSpeed's name ``ep_size_{ep}`` so ZeRO reduces expert gradients over
the expert-data-parallel group only (see ``parallel.expert.mark_expert_params``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pretrain.config import Config, ConfigError


@dataclass(frozen=True)
class Topology:
    """A validated parallel layout (degrees) and this process's coordinates in it. Whether a model and a batch fit
    the layout is ``check_layout``'s question (``pretrain.preflight`` asks both)."""

    world_size: int
    """Number of processes."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    ep: int = 1
    """Expert-parallel degree (divides the data-parallel degree)."""
    rank: int = 0
    """This process's global rank."""

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ construction and validation

    @classmethod
    def from_config(cls, cfg: Config, world_size: int, rank: int | None = None) -> "Topology":
        """The layout of ``cfg.parallel`` on ``world_size`` processes; ``rank`` defaults to $RANK (or 0)."""
        if rank is None:
            rank = int(os.environ.get("RANK", 0))
        return cls(world_size=world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep, rank=rank)

    def describe(self) -> str:
        dp = f"{self.world_size // (self.tp * self.pp)}" if self.world_size % (self.tp * self.pp) == 0 else "?"
        return f"tp={self.tp} pp={self.pp} ep={self.ep} dp={dp} world={self.world_size}"

    def fail(self, problem: str, fix: str) -> None:
        """One line naming every degree and the world size, the problem and the fix."""
        raise ConfigError(f"parallel layout {self.describe()}: {problem}; {fix}")

    def _validate(self) -> None:
        tp, pp, ep, world = self.tp, self.pp, self.ep, self.world_size
        if min(world, tp, pp, ep) < 1:
            self.fail("every degree and the world size must be >= 1", "set parallel.tp/pp/ep to positive integers")
        if world % (tp * pp) != 0:
            self.fail(f"tp={tp} x pp={pp} x dp=? != world {world} (tp x pp = {tp * pp} does not divide it)",
                      "launch a multiple of tp*pp processes or change parallel.tp/parallel.pp")
        dp = world // (tp * pp)
        if dp % ep != 0:
            self.fail(f"ep={ep} does not divide dp={dp}", "set parallel.ep to a divisor of world/(tp*pp)")
        if not 0 <= self.rank < world:
            self.fail(f"rank {self.rank} is outside [0, {world})", "check the launcher's RANK")

    # ------------------------------------------------------------------------ degrees and coordinates

    @property
    def dp(self) -> int:
        """Data-parallel degree: world / (tp * pp)."""
        return self.world_size // (self.tp * self.pp)

    @property
    def dp_size(self) -> int:
        return self.dp

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: data-parallel ranks holding the same expert shard."""
        return self.dp // self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def is_trivial(self) -> bool:
        """True when nothing is sharded: tp = pp = ep = 1 (pure data parallelism or one process)."""
        return self.tp == 1 and self.pp == 1 and self.ep == 1

    def with_rank(self, rank: int) -> "Topology":
        """The same layout seen from another rank."""
        return Topology(**{**self.__dict__, "rank": rank})

    def _global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    # ------------------------------------------------------- the ranks of this process's groups

    def tp_group_ranks(self) -> list[int]:
        return [self._global_rank(t, self.dp_rank, self.pp_rank) for t in range(self.tp)]

    def pp_group_ranks(self) -> list[int]:
        return [self._global_rank(self.tp_rank, self.dp_rank, p) for p in range(self.pp)]

    def dp_group_ranks(self) -> list[int]:
        return [self._global_rank(self.tp_rank, d, self.pp_rank) for d in range(self.dp)]

    def ep_group_ranks(self) -> list[int]:
        base = self.edp_rank * self.ep
        return [self._global_rank(self.tp_rank, base + e, self.pp_rank) for e in range(self.ep)]

    def edp_group_ranks(self) -> list[int]:
        return [self._global_rank(self.tp_rank, d * self.ep + self.ep_rank, self.pp_rank) for d in range(self.edp)]

    # ------------------------------------------------ process groups (after initialize_parallel)

    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_pipeline_model_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_data_parallel_group()

    @property
    def ep_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_expert_model_parallel_group()

    @property
    def edp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_expert_data_parallel_group()

    @property
    def model_parallel_group(self):
        """tp x pp: the group over which DeepSpeed sums gradient norms of sharded parameters."""
        from megatron.core import parallel_state as ps
        return ps.get_model_parallel_group()

    @property
    def expert_group_name(self) -> str:
        """DeepSpeed's name for the expert groups (``deepspeed.utils.groups``; params' ``group_name``)."""
        return f"ep_size_{self.ep}"

    def deepspeed_mpu(self):
        """The ``mpu`` for ``deepspeed.initialize(mpu=...)``; None when tp = pp = 1 (DeepSpeed's defaults fit)."""
        if self.tp == 1 and self.pp == 1:
            return None
        return DeepSpeedMPU(self)


def _ffn_sizes(m) -> tuple:
    """(key, width) of every SwiGLU that tensor parallelism splits: dense layers and the shared experts."""
    sizes = []
    if not m.is_moe or m.first_k_dense_replace > 0:
        sizes.append(("model.intermediate_size", m.intermediate_size))
    if m.is_moe and m.n_shared_experts > 0:
        sizes.append(("model.moe_intermediate_size x model.n_shared_experts",
                      m.moe_intermediate_size * m.n_shared_experts))
    return tuple(sizes)


def check_layout(m, topo: Topology, micro_batch_size: int | None = None, global_batch_size: int | None = None
                 ) -> None:
    """Whether the model ``m`` (a ModelConfig) and the batch fit the layout: one ConfigError line naming every
    degree, the key and the fix. Shared by the trainer (``pretrain.preflight``) and ``pretrain.info``."""
    tp, pp, ep, dp = topo.tp, topo.pp, topo.ep, topo.dp
    if m.num_attention_heads % tp:
        topo.fail(f"model.num_attention_heads={m.num_attention_heads} is not divisible by tp={tp}",
                  "choose parallel.tp dividing the number of heads")
    if m.attention != "mla" and m.kv_heads % tp:  # MLA's key/value heads are its query heads
        topo.fail(f"model.num_key_value_heads={m.kv_heads} is not divisible by tp={tp}",
                  "choose parallel.tp dividing the number of key/value heads")
    if m.vocab_size is not None and m.vocab_size % tp:
        topo.fail(f"model.vocab_size={m.vocab_size} is not divisible by tp={tp}", "pad model.vocab_size to a "
                  "multiple of tp (or leave it null: it is then taken from the tokenizer, padded)")
    for name, size in _ffn_sizes(m):
        if size % tp:
            topo.fail(f"{name}={size} is not divisible by tp={tp}", "choose parallel.tp dividing it")
    if ep > 1 and not m.is_moe:
        topo.fail(f"ep={ep} on a dense model (model.n_routed_experts=0)", "set parallel.ep=1")
    if m.is_moe and m.n_routed_experts % ep:
        topo.fail(f"model.n_routed_experts={m.n_routed_experts} is not divisible by ep={ep}",
                  "choose parallel.ep dividing the number of experts")
    if m.num_hidden_layers < pp:
        topo.fail(f"model.num_hidden_layers={m.num_hidden_layers} < pp={pp}", "use at most one pipeline stage per layer")
    if global_batch_size is not None and micro_batch_size is not None and global_batch_size % (micro_batch_size * dp):
        topo.fail(f"train.global_batch_size={global_batch_size} is not a multiple of train.micro_batch_size="
                  f"{micro_batch_size} x dp={dp} = {micro_batch_size * dp}", "change the batch sizes or the layout")


def check_pipeline_layout(cfg: Config) -> None:
    """One-line ConfigError when ``parallel.pipeline_layout`` does not describe ``parallel.pp`` stages."""
    layout, pp, layers = cfg.parallel.pipeline_layout, cfg.parallel.pp, cfg.model.num_hidden_layers
    if layout is None:
        return
    valid = (isinstance(layout, (list, tuple)) and len(layout) == pp and all(isinstance(n, int) for n in layout)
             and sum(layout) == layers and min(layout) >= 0 and all(n >= 1 for n in layout[1:-1]))
    if not valid:
        raise ConfigError(f"parallel.pipeline_layout={list(layout)}: give pp={pp} layer counts summing to "
                          f"model.num_hidden_layers={layers} (>= 1 for inner stages, >= 0 for the first and last), "
                          f"or null to balance stages by parameters")


class DeepSpeedMPU:
    """The Megatron-style ``mpu`` object DeepSpeed queries (``deepspeed/utils/bwc.py``, ``runtime/engine.py``).

    "Model parallel" is tp x pp for groups (gradient norms are summed over it) but its rank is the tp rank:
    DeepSpeed counts a replicated parameter's norm only where ``get_model_parallel_rank() == 0``.
    """

    def __init__(self, topo: Topology):
        self.topo = topo

    def get_model_parallel_group(self):
        return self.topo.model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.tp

    def get_tensor_model_parallel_group(self):
        return self.topo.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.topo.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.topo.tp_group_ranks()[0]

    def get_pipeline_model_parallel_group(self):
        return self.topo.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.topo.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.topo.pp

    def get_data_parallel_group(self):
        return self.topo.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topo.dp_group_ranks()


def initialize_parallel(topo: Topology) -> None:
    """Create the TP/PP/DP/EP/expert-DP groups (megatron-core) and register the expert groups with DeepSpeed.

    Call on every rank after ``torch.distributed`` (or ``deepspeed.init_distributed``) is initialised;
    works with gloo (CPU) and NCCL. Idempotent for the same layout.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel: torch.distributed is not initialised; call "
                           "deepspeed.init_distributed() (or torch.distributed.init_process_group) first")
    if dist.get_world_size() != topo.world_size or dist.get_rank() != topo.rank:
        raise ConfigError(f"parallel layout {topo.describe()}: built for rank {topo.rank} of {topo.world_size} but "
                          f"this process is rank {dist.get_rank()} of {dist.get_world_size()}; "
                          f"pass the real world size and rank")
    if not ps.model_parallel_is_initialized():
        # No gloo side-groups: they serve megatron's distributed optimizer, which we do not use (ZeRO instead).
        ps.initialize_model_parallel(tensor_model_parallel_size=topo.tp, pipeline_model_parallel_size=topo.pp,
                                     expert_model_parallel_size=topo.ep, create_gloo_process_groups=False,
                                     order="tp-cp-ep-dp-pp")
    _check_group_ranks(topo)
    if topo.ep > 1:
        _register_expert_groups_with_deepspeed(topo)


def _check_group_ranks(topo: Topology) -> None:
    """megatron-core's groups must be the ones our (and DeepSpeed's pipeline) rank arithmetic predicts."""
    import torch.distributed as dist

    for name, group, expected in [("tp", topo.tp_group, topo.tp_group_ranks()),
                                  ("pp", topo.pp_group, topo.pp_group_ranks()),
                                  ("dp", topo.dp_group, topo.dp_group_ranks()),
                                  ("ep", topo.ep_group, topo.ep_group_ranks()),
                                  ("edp", topo.edp_group, topo.edp_group_ranks())]:
        got = dist.get_process_group_ranks(group)
        assert got == expected, f"megatron-core {name} group {got} != expected {expected} ({topo.describe()})"


def _register_expert_groups_with_deepspeed(topo: Topology) -> None:
    """Put megatron-core's EP / expert-DP groups where DeepSpeed's MoE code looks them up.

    ZeRO-1/2 (``runtime/zero/stage_1_and_2.py``) reduces a parameter with ``allreduce=False`` over
    ``expert_data_parallel_group[param.group_name]`` (and divides by the full DP size, which is right: each
    expert's gradient already sums the tokens of its whole EP group); ``engine._broadcast_model`` broadcasts
    it from the first rank of that group. Registering here means DeepSpeed never builds its own groups.
    """
    from deepspeed.utils import groups

    name = topo.expert_group_name
    groups._EXPERT_PARALLEL_GROUP[name] = topo.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = topo.ep_group_ranks()
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = topo.edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = topo.edp_group_ranks()
