"""parallel.topology: validation before any process group, rank arithmetic, megatron-core / DeepSpeed groups."""
import pytest

from helpers import run_distributed
from parallel import Topology, initialize_parallel
from parallel.topology import check_layout
from pretrain.config import ConfigError, load_config


def _topo(world, overrides=(), rank=0):
    """The degrees (Topology) and the model and batch against them (check_layout), as pretrain.preflight asks."""
    cfg = load_config("tiny", list(overrides))
    topo = Topology.from_config(cfg, world, rank=rank)
    check_layout(cfg.model, topo, cfg.train.micro_batch_size, cfg.train.global_batch_size)
    return topo


@pytest.mark.parametrize("world, overrides, message", [
    (6, ["parallel.tp=2", "parallel.pp=2"], "tp=2 x pp=2 x dp=? != world 6"),
    (4, ["parallel.tp=2", "parallel.ep=4"], "ep=4 does not divide dp=2"),
    (8, ["parallel.tp=8"], "model.num_attention_heads=4 is not divisible by tp=8"),
    (4, ["parallel.ep=4", "model.n_routed_experts=6", "model.n_group=1", "model.topk_group=1"],
     "model.n_routed_experts=6 is not divisible by ep=4"),
    (4, ["parallel.pp=4"], "model.num_hidden_layers=2 < pp=4"),
    (4, ["train.global_batch_size=6"],
     "train.global_batch_size=6 is not a multiple of train.micro_batch_size=2 x dp=4"),
    (2, ["parallel.ep=2", "model.n_routed_experts=0"], "ep=2 on a dense model"),
    (2, ["parallel.tp=2", "model.vocab_size=511"], "model.vocab_size=511 is not divisible by tp=2"),
    (2, ["parallel.tp=2", "model.intermediate_size=127"], "model.intermediate_size=127 is not divisible by tp=2"),
    (4, ["model.attention=gqa", "model.num_key_value_heads=2", "parallel.tp=4"],
     "model.num_key_value_heads=2 is not divisible by tp=4"),
])
def test_bad_layouts_fail_with_one_line_naming_every_degree(world, overrides, message):
    with pytest.raises(ConfigError) as err:
        _topo(world, overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    for key in ("tp=", "pp=", "ep=", "dp=", f"world={world}"):
        assert key in text


def test_rank_arithmetic_matches_deepspeed_pipeline_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    topo = _topo(8, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "train.global_batch_size=4"])
    assert (topo.dp, topo.edp) == (2, 1)
    ds = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    for rank in range(8):
        t = topo.with_rank(rank)
        coord = ds.get_coord(rank)
        assert (t.pp_rank, t.dp_rank, t.tp_rank) == (coord.pipe, coord.data, coord.model)
        assert t.dp_group_ranks() == [g for g in ds.get_axis_comm_lists("data") if rank in g][0]
        assert t.tp_group_ranks() == [g for g in ds.get_axis_comm_lists("model") if rank in g][0]
        assert t.pp_group_ranks() == [g for g in ds.get_axis_comm_lists("pipe") if rank in g][0]


def test_expert_groups_are_consecutive_data_parallel_ranks():
    topo = _topo(4, ["parallel.ep=2"], rank=3)
    assert (topo.dp_rank, topo.ep_rank, topo.edp_rank) == (3, 1, 1)
    assert topo.ep_group_ranks() == [2, 3]
    assert topo.edp_group_ranks() == [1, 3]
    assert topo.is_trivial is False and topo.deepspeed_mpu() is None
    assert _topo(1).is_trivial and _topo(1).deepspeed_mpu() is None


def _check_groups(rank, world, overrides):
    import torch.distributed as dist
    from deepspeed.utils import groups

    topo = _topo(world, overrides, rank=rank)
    initialize_parallel(topo)  # asserts megatron-core's groups equal the predicted rank lists
    assert dist.get_process_group_ranks(topo.ep_group) == topo.ep_group_ranks()
    name = topo.expert_group_name
    assert groups._get_expert_data_parallel_group(name) is topo.edp_group
    assert list(groups._get_expert_data_parallel_group_ranks(name)) == topo.edp_group_ranks()
    with pytest.raises(ConfigError, match=f"built for rank {rank} of 8 but this process is rank {rank} of 4"):
        initialize_parallel(Topology(world_size=8, tp=2, rank=rank))
    mpu = topo.deepspeed_mpu()
    assert mpu.get_data_parallel_world_size() == topo.dp and mpu.get_tensor_model_parallel_rank() == rank % 2
    assert mpu.get_model_parallel_world_size() == 2


def test_megatron_groups_match_layout_and_are_registered_with_deepspeed():
    # tp2 x dp2 with ep2: the expert group of rank r is {r % 2, r % 2 + 2}, one expert-DP rank each
    run_distributed(_check_groups, 4, ["parallel.tp=2", "parallel.ep=2", "train.global_batch_size=4"])
