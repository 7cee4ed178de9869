"""parallel.expert: all-to-all dispatch/combine and EP MoE layers vs the single-process layer (gloo processes)."""
import copy

import torch
import torch.distributed as dist

from helpers import run_distributed
from parallel import Topology, initialize_parallel
from parallel.expert import ExpertParallelExperts, all_to_all, apply_expert_parallel, combine, dispatch
from pretrain.config import load_config
from pretrain.model import build_model
from pretrain.model.moe import GroupedExperts, set_token_dropping

H = 16


def test_dropped_copies_are_neither_sent_nor_computed_single_process():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    model = apply_expert_parallel(copy.deepcopy(ref), Topology.from_config(cfg, 1))
    experts = model.layers[1].mlp.experts
    assert isinstance(experts, ExpertParallelExperts) and experts.num_experts == 8
    x, w = torch.randn(12, 64), torch.rand(12, 2)
    idx = torch.stack([torch.arange(12) % 2, torch.full((12,), 5)], dim=1)  # experts 0, 1 and 5
    keep = torch.rand(12, 2) < 0.5
    want = ref.layers[1].mlp.experts(x, idx, w * keep)  # dropped copies weigh nothing
    torch.testing.assert_close(experts(x, idx, w, keep), want)
    torch.testing.assert_close(ref.layers[1].mlp.experts(x, idx, w, keep), want)
    torch.testing.assert_close(experts(x, idx, w), ref.layers[1].mlp.experts(x, idx, w))  # dropless


def _splits(src, dst):
    """Rows rank src sends to rank dst: uneven, and rank 1 sends nothing to rank 0."""
    return 0 if (src, dst) == (1, 0) else src + dst + 1


def _all_to_all(rank, world):
    input_splits = [_splits(rank, j) for j in range(world)]
    output_splits = [_splits(j, rank) for j in range(world)]
    # row value = 1000 * source + 10 * destination + index within the split
    x = torch.cat([1000 * rank + 10 * j + torch.arange(n, dtype=torch.float32) for j, n in enumerate(input_splits)])
    x = x.unsqueeze(1).repeat(1, 3).requires_grad_(True)
    y = all_to_all(x, output_splits, input_splits, dist.group.WORLD)
    expected = torch.cat([1000 * j + 10 * rank + torch.arange(n, dtype=torch.float32)
                          for j, n in enumerate(output_splits)])
    assert torch.equal(y[:, 0], expected)
    # backward is the reverse exchange: d/dx sum(y * (y + 1)) = 2x + 1 arrives back at each row's owner
    (y * (y + 1)).sum().backward()
    assert torch.equal(x.grad, 2 * x.detach() + 1)


def _round_trip_and_layer(rank, world):
    topo = Topology(world_size=world, ep=world, rank=rank)
    initialize_parallel(topo)
    num_experts, n, k = 8, 6, 2
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(n, H, generator=gen)
    # experts 0-3 live on rank 0, 4-7 on rank 1; nobody routes to expert 5, and rank 1's tokens all go to rank 1
    choices = [0, 1, 3] if rank == 0 else [4, 6, 7]
    topk_idx = torch.tensor(choices)[torch.randint(0, 3, (n, k), generator=gen)]
    topk_idx[:, 1] = (topk_idx[:, 0] + 1) % 8 if rank == 0 else topk_idx[:, 1]
    x_local, per_expert, ctx = dispatch(x, topk_idx, torch.full((n, k), 0.5), num_experts, topo.ep_group)
    counts = torch.bincount(topk_idx.flatten(), minlength=8)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    mine = slice(4 * rank, 4 * rank + 4)
    assert per_expert.tolist() == sum(all_counts)[mine].tolist()
    if rank == 1:
        assert per_expert[1] == 0 and ctx.input_splits[0] == 0  # expert 5 idle; rank 0 gets nothing from rank 1
    assert ctx.output_splits == [int(all_counts[j][mine].sum()) for j in range(world)]
    # received rows are sorted by local expert: the first per_expert[0] rows are copies for expert 4*rank
    # round trip with identity experts and weights 1/2 + 1/2 is the identity
    assert torch.allclose(combine(x_local, ctx), x)
    # expert e multiplies by (e + 1): checks that received rows are sorted by local expert
    scale = (torch.arange(4) + 4 * rank + 1.0).repeat_interleave(per_expert).unsqueeze(1)
    expected = x * (topk_idx + 1.0).mean(dim=1, keepdim=True)
    torch.testing.assert_close(combine(x_local * scale, ctx), expected)
    # token dropping: copies the MoE layer dropped are never sent and contribute nothing
    keep = torch.rand(n, k, generator=gen) < 0.5
    x_local, per_expert, ctx = dispatch(x, topk_idx, torch.full((n, k), 0.5), num_experts, topo.ep_group, keep)
    assert sum(ctx.input_splits) == int(keep.sum())
    torch.testing.assert_close(combine(x_local, ctx), 0.5 * x * keep.sum(dim=1, keepdim=True))
    _check_layer_equals_single_process(rank, world, topo)
    _check_model_equals_single_process(rank, world, topo)


def _check_layer_equals_single_process(rank, world, topo):
    torch.manual_seed(0)
    full = GroupedExperts(8, H, 32)
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.1)
    xs = [torch.randn(10, H, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    idx = [torch.randperm(8, generator=torch.Generator().manual_seed(20 + r))[:2].repeat(10, 1) for r in range(world)]
    idx[1][:, :] = torch.tensor([6, 7])  # rank 1 sends everything to itself, rank 0 receives nothing from it
    ws = [torch.rand(10, 2, generator=torch.Generator().manual_seed(30 + r)) for r in range(world)]

    ref = copy.deepcopy(full)
    ref_out = [ref(xs[r], idx[r], ws[r]) for r in range(world)]
    sum((o * o).sum() for o in ref_out).backward()

    ep = ExpertParallelExperts(full, topo.ep_group, topo.ep_rank, topo.ep)
    x = xs[rank].clone().requires_grad_(True)
    w = ws[rank].clone().requires_grad_(True)
    out = ep(x, idx[rank], w)
    torch.testing.assert_close(out, ref_out[rank], rtol=1e-5, atol=1e-6)
    (out * out).sum().backward()
    mine = slice(4 * rank, 4 * rank + 4)
    for name in ("gate_proj", "up_proj", "down_proj"):
        torch.testing.assert_close(getattr(ep, name).grad, getattr(ref, name).grad[mine], rtol=1e-5, atol=1e-6)


def test_all_to_all_uneven_and_empty_splits_with_backward():
    run_distributed(_all_to_all, 2)


def test_dispatch_combine_round_trip_and_layer_equal_single_process():
    run_distributed(_round_trip_and_layer, 2)


def _check_model_equals_single_process(rank, world, topo):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    set_token_dropping(ref, 0.5)  # decided before dispatch: expert parallelism drops the same copies
    model = apply_expert_parallel(copy.deepcopy(ref), topo)
    assert sum(isinstance(m, ExpertParallelExperts) for m in model.modules()) == 2  # layer 1 and the MTP block
    ids = [torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(r))
           for r in range(world)]
    ref_outs = [ref(ids[r], labels=ids[r]) for r in range(world)]
    sum(o.lm_loss + o.mtp_losses[0] for o in ref_outs).backward()
    out = model(ids[rank], labels=ids[rank])
    torch.testing.assert_close(out.lm_loss, ref_outs[rank].lm_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.mtp_losses[0], ref_outs[rank].mtp_losses[0], rtol=1e-5, atol=0)
    assert out.moe_terms["dropped"] == ref_outs[rank].moe_terms["dropped"] > 0
    (out.lm_loss + out.mtp_losses[0]).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if isinstance(model.get_submodule(name.rpartition(".")[0]), ExpertParallelExperts):
            assert (p.allreduce, p.group_name) == (False, "ep_size_2")
            # each expert's gradient sums the tokens of every rank: compare with the sum over ranks' batches
            torch.testing.assert_close(p.grad, ref_params[name].grad[4 * rank:4 * rank + 4], rtol=1e-4, atol=1e-7)
        else:  # dense parameters: this rank's batch only; the loop averages them over data parallelism
            grad = p.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-7)
