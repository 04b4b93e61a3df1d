"""Cross-process BatchNorm: 2 CPU processes over gloo must reproduce single-process batch
norm over the same global batch (forward, running statistics, input and parameter
gradients), through the op, the module conversion with DDP, and `vhist train --sync-bn`."""
import gc
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vhist
from vhist.nn import ConvBNAct, SyncBatchNorm, convert_sync_batchnorm
from vhist.ops.sync_batch_norm import merge_stats, sync_batch_norm

import train_helpers  # noqa: F401  (registers tiny_train_net)
from train_helpers import free_port
from utils import assert_close

WORLD = 2
# (local N, C, H, W, channels_last, mean shift, dtype)
CASES = [
    (2, 3, 4, 5, False, 0.0, torch.float64),    # minimal, NCHW
    (1, 5, 3, 3, True, 100.0, torch.float64),   # N=1 per rank, channels_last, |mean| >> std
    (3, 4, 2, 3, False, 1.0, torch.float32),    # fp32, non-power-of-two
    (1, 3, 1, 1, False, 0.0, torch.float64),    # one value per channel per rank: allowed with 2 ranks, as in torch
]


def _case_tensors(case):
    n, c, h, w, cl, shift, dtype = case
    g = torch.Generator().manual_seed(n * 100 + c)
    x = (torch.randn(WORLD * n, c, h, w, generator=g, dtype=torch.float64) * 0.5 + shift).to(dtype)
    dy = torch.randn(WORLD * n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    if cl:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    return x, dy, weight, bias


def _tiny_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        vhist.nn.Conv2d(3, 4, 3, padding=1, bias=False), vhist.nn.BatchNorm2d(4), torch.nn.ReLU(),
        vhist.nn.ConvBNAct(4, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 3))


def _worker(rank, port, out_dir, data_spec, train_port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    # 1. the op, on both backends with kernels (triton through the interpreter)
    for backend in ("torch", "triton"):
        for i, case in enumerate(CASES):
            n = case[0]
            x, dy, weight, bias = _case_tensors(case)
            local = x[rank * n:(rank + 1) * n].clone().requires_grad_()
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            rm = torch.zeros(case[1], dtype=x.dtype)
            rv = torch.ones(case[1], dtype=x.dtype)
            with vhist.use_backend(backend):
                y = sync_batch_norm(local, rm, rv, w, b, True, 0.1, 1e-5)
            y.backward(dy[rank * n:(rank + 1) * n])
            dw, db = w.grad.clone(), b.grad.clone()
            dist.all_reduce(dw)
            dist.all_reduce(db)
            results[(backend, i)] = {"y": y.detach(), "dx": local.grad, "dw": dw, "db": db, "rm": rm, "rv": rv}
    results["empty_rank"] = _empty_rank_results(rank)
    # 2. convert_sync_batchnorm + DistributedDataParallel: one SGD step on half the batch
    model = convert_sync_batchnorm(_tiny_model())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4 * WORLD, 3, 5, 5, generator=g) * 2 + 1
    target = torch.arange(4 * WORLD) % 3
    loss = F.cross_entropy(ddp(x[rank * 4:(rank + 1) * 4]), target[rank * 4:(rank + 1) * 4])
    loss.backward()
    opt.step()
    results["ddp_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # The DDP reducer holds the process group: free it while both ranks are alive (a
    # reducer collected later joins gloo threads that wait on a peer that has exited).
    del ddp, model, opt, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    # 3. the training engine under a torchrun-like environment, with --sync-bn
    os.environ["MASTER_PORT"] = str(train_port)
    from vhist.train import TrainConfig, train

    train(TrainConfig(model="tiny_train_net", data=data_spec, recipe="modern",
                      overrides={"epochs": 2, "batch_size": 4, "lr": 0.05, "warmup_epochs": 0},
                      out_dir=out_dir, run_name="ddp", sync_bn=True, workers=0))


def test_sync_batch_norm_two_processes(tmp_path):
    data_spec = "synthetic:classes=3,size=8,train=40,test=12"
    mp.spawn(_worker, args=(free_port(), str(tmp_path), data_spec, free_port()), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for backend in ("torch", "triton"):
        for i, case in enumerate(CASES):
            n, c, dtype = case[0], case[1], case[6]
            tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
            x, dy, weight, bias = _case_tensors(case)
            x, weight, bias = x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
            rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
            y = F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)
            y.backward(dy)
            tag = f"{backend} case {case}"
            for r, res in enumerate(ranks):
                got = res[(backend, i)]
                sl = slice(r * n, (r + 1) * n)
                assert_close(got["y"], y.detach()[sl], name=f"{tag} rank {r} output", **tol)
                assert_close(got["dx"], x.grad[sl], name=f"{tag} rank {r} grad_input", **tol)
                assert_close(got["dw"], weight.grad, name=f"{tag} rank {r} grad_weight", **tol)
                assert_close(got["db"], bias.grad, name=f"{tag} rank {r} grad_bias", **tol)
                assert_close(got["rm"], rm, name=f"{tag} rank {r} running_mean", **tol)
                assert_close(got["rv"], rv, name=f"{tag} rank {r} running_var", **tol)
            # every rank holds bitwise the same statistics
            assert torch.equal(ranks[0][(backend, i)]["rv"], ranks[1][(backend, i)]["rv"])
    _check_empty_rank(ranks)

    # DDP + SyncBatchNorm on 2 x 4 images == one process on the 8 images
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4 * WORLD, 3, 5, 5, generator=g) * 2 + 1
    F.cross_entropy(model(x), torch.arange(4 * WORLD) % 3).backward()
    opt.step()
    for key, ref in model.state_dict().items():
        for r in range(WORLD):
            got = ranks[r]["ddp_state"][key]
            if ref.is_floating_point():
                assert_close(got, ref, atol=2e-5, rtol=2e-5, name=f"DDP rank {r} {key}")
            else:
                assert torch.equal(got, ref), key

    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["test_top1"] is not None
    for artifact in ("config.json", "metrics.jsonl", "metrics.csv", "curves.png", "best.pt", "last.pt"):
        assert (tmp_path / "ddp" / artifact).is_file(), artifact


def _empty_rank_case():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64) + 2, torch.randn(3, 4, 2, 3, generator=g,
                                                                                     dtype=torch.float64)


def _empty_rank_results(rank):
    """Rank 1 holds an empty batch (as DDP's uneven last batch can leave), rank 0 three
    images."""
    x, dy = _empty_rank_case()
    results = {}
    for backend in ("torch", "triton"):
        local = (x if rank == 0 else x[:0]).clone().requires_grad_()
        w, b = torch.ones(4, dtype=x.dtype, requires_grad=True), torch.zeros(4, dtype=x.dtype, requires_grad=True)
        rm, rv = torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype)
        with vhist.use_backend(backend):
            y = sync_batch_norm(local, rm, rv, w, b, True, 0.1, 1e-5)
        y.backward(dy if rank == 0 else dy[:0])
        dw, db = w.grad.clone(), b.grad.clone()
        dist.all_reduce(dw)
        dist.all_reduce(db)
        results[backend] = {"y": y.detach(), "dx": local.grad, "dw": dw, "db": db, "rm": rm, "rv": rv}
    return results


def _check_empty_rank(ranks):
    """The process with an empty batch sends a zero row, as PyTorch's SyncBatchNorm does:
    the result is batch norm over the other process's batch, on every rank."""
    x, dy = _empty_rank_case()
    x = x.requires_grad_()
    w, b = torch.ones(4, dtype=x.dtype, requires_grad=True), torch.zeros(4, dtype=x.dtype, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype)
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    tol = dict(atol=1e-10, rtol=1e-10)
    for backend in ("torch", "triton"):
        for r, res in enumerate(ranks):
            got = res["empty_rank"][backend]
            assert got["y"].shape == (3 if r == 0 else 0, 4, 2, 3) and got["dx"].shape == got["y"].shape
            if r == 0:
                assert_close(got["y"], y.detach(), name=f"{backend} output", **tol)
                assert_close(got["dx"], dx, name=f"{backend} grad_input", **tol)
            for name, want in (("dw", dw), ("db", db), ("rm", rm), ("rv", rv)):
                assert_close(got[name], want, name=f"{backend} empty rank: rank {r} {name}", **tol)


def test_convert_sync_batchnorm_keeps_state_dict():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm) and isinstance(converted[3], ConvBNAct)
    assert isinstance(converted[3].bn, SyncBatchNorm)
    after = converted.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    # without a process group it is plain batch norm, module for module
    ref = _tiny_model().train()
    converted.train()
    x = torch.randn(3, 3, 6, 6)
    assert_close(converted(x), ref(x), atol=1e-5, rtol=1e-5, name="converted output")
    assert_close(converted[1].running_var, ref[1].running_var, atol=1e-6, rtol=1e-6, name="running_var")


def test_merge_stats_is_stable():
    # |mean| >> std: E[x^2] - E[x]^2 cancels catastrophically; Chan's merge does not.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=g, dtype=torch.float64) + 1e8
    counts = torch.full((3,), 50.0, dtype=torch.float64)
    means = x.mean(1)
    m2s = ((x - means[:, None]) ** 2).sum(1)
    count, mean, m2 = merge_stats(counts, means[:, None], m2s[:, None])
    ref_var = (x.flatten() - x.flatten().mean()).pow(2).mean()
    naive_var = (x.flatten() ** 2).mean() - x.flatten().mean() ** 2
    assert count.item() == 150
    assert abs(m2.item() / 150 - ref_var.item()) / ref_var.item() < 1e-6
    assert abs(naive_var.item() - ref_var.item()) / ref_var.item() > 1e-3  # what the merge avoids


def test_sync_batch_norm_bad_input():
    with pytest.raises(ValueError, match="channels"):
        sync_batch_norm(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="more than 1 value"):
        sync_batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True)
    with vhist.use_backend("cuda"), pytest.raises(NotImplementedError, match="cuda"):
        sync_batch_norm(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), training=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sync_batch_norm_determinism_and_single_process(backend):
    # Without a process group: bitwise reproducible, and equal to plain batch norm.
    x = (torch.randn(3, 4, 3, 5) * 3 + 2).requires_grad_()
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    dy = torch.randn(3, 4, 3, 5)
    results = []
    for _ in range(2):
        rm, rv = torch.zeros(4), torch.ones(4)
        with vhist.use_backend(backend):
            y = sync_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        results.append((y.detach(), *grads, rm, rv))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)
    rm, rv = torch.zeros(4), torch.ones(4)
    ref = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    ref_grads = torch.autograd.grad(ref, (x, w, b), dy)
    for name, got, want in zip(("output", "dx", "dw", "db", "running_mean", "running_var"), results[0],
                               (ref.detach(), *ref_grads, rm, rv)):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"{backend} {name}")
