"""parallel.tensor: a tp2 model equals the single-process one (logits, losses, gradients) on gloo processes."""
import copy

import torch
import torch.distributed as dist

from helpers import run_distributed
from parallel import Topology, initialize_parallel, parallelize_model
from pretrain.config import load_config
from pretrain.model import build_model

# Parameters every TP rank holds whole; everything else is split along the dimension given.
SHARD_DIM = {"embed_tokens": 0, "lm_head": 0, "q_proj": 0, "q_b_proj": 0, "k_proj": 0, "v_proj": 0,
             "kv_b_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def _shard_dim(name: str):
    if ".experts." in name:  # routed experts are replicated over TP
        return None
    return SHARD_DIM.get(name.rsplit(".", 2)[-2])


def _compare(rank, world, overrides):
    cfg = load_config("tiny", overrides + ["parallel.tp=2", "train.global_batch_size=2"])
    topo = Topology.from_config(cfg, world, rank=rank)
    initialize_parallel(topo)
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    model = parallelize_model(copy.deepcopy(ref), topo, cfg)
    assert model.state_dict().keys() == ref.state_dict().keys()  # no megatron-core _extra_state entries
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100

    with torch.no_grad():  # eval: gathered full-vocab logits
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-5, atol=1e-6)
    ref_out, out = ref(ids, labels=labels), model(ids, labels=labels)
    torch.testing.assert_close(out.lm_loss, ref_out.lm_loss, rtol=1e-5, atol=0)
    for got, want in zip(out.mtp_losses, ref_out.mtp_losses):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    total = lambda o: o.lm_loss + sum(o.mtp_losses) + 0.01 * o.seq_aux_loss  # noqa: E731
    total(ref_out).backward()
    total(out).backward()

    ref_grads = dict((n, p.grad) for n, p in ref.named_parameters())
    for name, p in model.named_parameters():
        dim = _shard_dim(name)
        want = ref_grads[name] if dim is None else ref_grads[name].chunk(2, dim=dim)[rank]
        assert p.shape == want.shape, name
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=name)
        if dim is None:  # replicated: bit-identical on both TP ranks
            other = [torch.empty_like(p.grad) for _ in range(world)]
            dist.all_gather(other, p.grad.contiguous())
            assert torch.equal(other[0], other[1]), f"{name}: replicated gradient differs across the TP group"


def test_tp2_mla_moe_mtp_equals_single_process():
    run_distributed(_compare, 2, [])


def test_tp2_gqa_dense_equals_single_process():
    run_distributed(_compare, 2, ["model.attention=gqa", "model.num_key_value_heads=2", "model.n_routed_experts=0",
                                  "model.num_nextn_predict_layers=0", "model.n_group=1", "model.topk_group=1"])
