"""kernels/_config.py: per-shape shortlists, on-disk tuned picks, VHIST_AUTOTUNE=0."""
import json
import types
import warnings

import pytest
import torch
import triton
import triton.language as tl

import vhist.kernels._config as config


def _gemm_configs():
    rows = [(64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (32, 64, 32, 4, 3),
            (128, 256, 64, 8, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in rows]


def _fwd_args(n, oh, ow, cg_out):
    return {"N": n, "OH": oh, "OW": ow, "CG_OUT": cg_out, "CG_IN": 64, "H": oh, "W": ow}


def _tiles(c, m, n):
    return triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"])


def test_shortlist_drops_oversized_idle_and_unlaunchable_configs():
    configs = _gemm_configs()
    # ResNet-50 layer1 (M = 128*56*56, C_out 64): no tile wider than the 64 channels,
    # never the 128x256x64 s4 config, at most SHORTLIST, in the list's order.
    picked = config.shortlist("_conv2d_fwd_kernel", configs, _fwd_args(128, 56, 56, 64))
    assert 1 <= len(picked) <= config.SHORTLIST
    assert all(c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_M"] >= 64 for c in picked)
    assert [configs.index(c) for c in picked] == sorted(configs.index(c) for c in picked)
    # layer4 at batch 8 (M = 392, C_out 512): only tilings with >= 66 programs remain.
    picked = config.shortlist("_conv2d_fwd_kernel", configs, _fwd_args(8, 7, 7, 512))
    assert picked and all(_tiles(c, 392, 512) >= 66 for c in picked)
    assert all((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
               not in config.EXCLUDED for c in picked)
    # A kernel without a GEMM shape keeps its configs (up to SHORTLIST).
    assert config.shortlist("_bn_fwd_apply_kernel", configs[:3], {}) == configs[:3]


def test_shortlist_drops_depthwise_forward_tiles_that_spill_on_fp32():
    """32 output elements per thread spill on fp32 inputs (static, sm_90 compile): the
    shortlist keeps them for bf16 only; the config list's order is kept."""
    from vhist.kernels.depthwise import FWD_CONFIGS

    def picked(dtype):
        args = {"X": torch.empty(0, dtype=dtype), "BLOCK_P": 64}
        return [(c.kwargs["BLOCK_C"], c.num_warps) for c in config.shortlist("_depthwise_fwd_kernel", FWD_CONFIGS,
                                                                              args)]

    per_thread = {(c.kwargs["BLOCK_C"], c.num_warps): 64 * c.kwargs["BLOCK_C"] // (32 * c.num_warps)
                  for c in FWD_CONFIGS}
    assert picked(torch.float32) == [k for k in per_thread if per_thread[k] <= 16][:config.SHORTLIST]
    assert (64, 4) not in picked(torch.float32) and (128, 8) not in picked(torch.float64)
    assert picked(torch.bfloat16) == list(per_thread)[:config.SHORTLIST]
    # With the BN-statistics epilogue 32 per thread spill on bf16 too (triton 3.6: BLOCK_C=128
    # at 8 warps, a 32-byte stack frame), and so does BLOCK_C=16 at 2 warps (triton 3.9, an
    # 8-byte frame; issue 22 item 3).
    args = {"X": torch.empty(0, dtype=torch.bfloat16), "BLOCK_P": 64, "STATS": True}
    stats = [(c.kwargs["BLOCK_C"], c.num_warps) for c in config.shortlist("_depthwise_fwd_kernel", FWD_CONFIGS, args)]
    # and the statistics' bits must not depend on a pick: the first fitting config alone.
    # With the activations of issue 23 in the epilogue, 16 per thread at 4 warps gave an
    # 8-byte frame at MobileNetV1's first depthwise layer (triton 3.9): 8 per thread.
    assert stats == [k for k in per_thread if per_thread[k] <= 8 and k[1] >= 4][:1] == [(32, 8)]


def test_shortlist_counts_programs_off_the_launch_grid():
    configs = _gemm_configs()
    args = {**_fwd_args(128, 7, 7, 64), "CG_IN": 64, "CG_OUT": 64,
            "grid": lambda meta: (triton.cdiv(64, meta["BLOCK_M"]) * triton.cdiv(64, meta["BLOCK_N"]), 9, 59)}
    picked = config.shortlist("_conv2d_bwd_wgrad_kernel", configs, args)
    assert picked[0].kwargs == {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}  # 531 programs: split-K fills


def test_no_autotune_launches_the_first_shortlisted_config(monkeypatch):
    monkeypatch.setattr(config, "AUTOTUNE", False)
    configs = _gemm_configs()
    assert config.shortlist("_conv2d_fwd_kernel", configs, _fwd_args(128, 56, 56, 64)) == [configs[0]]


class _Tuner:
    """The parts of triton's Autotuner that TunedKernel uses."""

    def __init__(self, configs):
        self.configs, self.keys, self.arg_names = configs, ["M"], ["X", "M"]
        self.base_fn = types.SimpleNamespace(__name__="_stub_kernel")
        self.tuned, self.direct = 0, []
        self.fn = types.SimpleNamespace(run=lambda *a, **kw: self.direct.append(kw))

    def prune_configs(self, kwargs):
        return self.configs

    def run(self, *args, **kwargs):
        self.tuned += 1
        self.best_config = self.configs[1]


@pytest.fixture
def tuning_on_h200(tmp_path, monkeypatch):
    """TunedKernel as on a GPU: tuning on, launches seen on cuda:0 of an H200, picks
    stored under ``tmp_path``."""
    monkeypatch.setenv("VHIST_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(config, "AUTOTUNE", True)
    monkeypatch.setattr(config, "launch_device", lambda args: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    config._cache_path.cache_clear()
    yield
    config._cache_path.cache_clear()


def test_tuned_picks_persist_across_processes(tmp_path, tuning_on_h200):
    x = torch.empty(4)
    first = config.TunedKernel(_Tuner(_gemm_configs()))
    first.run(x, 4096, grid=(1,), warmup=False)
    assert first.tuned == 1
    (path,) = tmp_path.iterdir()
    assert "NVIDIA_H200" in path.name and f"triton{triton.__version__}" in path.name
    assert list(json.loads(path.read_text()).values()) == [
        {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, "num_warps": 8, "num_stages": 3}]
    # A new process (a new kernel object) launches the stored pick without tuning.
    second = config.TunedKernel(_Tuner(_gemm_configs()))
    second.run(x, 4096, grid=(1,), warmup=False)
    assert second.tuned == 0 and second.best_config.kwargs["BLOCK_M"] == 128
    assert second.direct[0]["BLOCK_M"] == 128 and second.direct[0]["num_warps"] == 8
    # Another shape is tuned again.
    second.run(x, 8192, grid=(1,), warmup=False)
    assert second.tuned == 1


def test_launch_runs_the_resolved_pick_after_the_first_call(tuning_on_h200):
    """vhist.ops.launch_cache.Launch: the first call goes through TunedKernel.run (tuning,
    the pick stored); every later call launches the kernel with the pick's constexprs
    directly, without the per-call tuning-key lookup, and with the same arguments."""
    from vhist.ops.launch_cache import Launch

    x = torch.empty(4)
    kernel = config.TunedKernel(_Tuner(_gemm_configs()))
    runs = []
    original_run = kernel.run
    kernel.run = lambda *a, **kw: runs.append(a) or original_run(*a, **kw)
    launch = Launch(kernel, (3,), (4096,), ACTIVATION=1)
    for _ in range(3):
        launch(x)
    assert kernel.tuned == 1 and len(runs) == 1  # only the first call went through TunedKernel.run
    assert runs[0] == (x, 4096)
    assert len(kernel.direct) == 2
    for options in kernel.direct:
        assert options["grid"] == (3,) and options["warmup"] is False and options["ACTIVATION"] == 1
        assert options["BLOCK_M"] == 128 and options["num_warps"] == 8


def test_launch_without_tuning_goes_through_the_autotuner():
    """Where the autotuner decides (no tuning, or not a CUDA device), a Launch calls it
    with the fixed arguments every time (the launch recorder patches that entry point)."""
    from vhist.ops.launch_cache import Launch

    tuner = _Tuner(_gemm_configs())
    calls = []
    tuner.run = lambda *a, **kw: calls.append((a, kw))
    launch = Launch(config.TunedKernel(tuner), (2, 1), (7, 8), HAS_BIAS=True)
    x = torch.empty(2)
    launch(x)
    launch(x)
    assert [a for a, _ in calls] == [(x, 7, 8)] * 2
    assert all(kw == {"grid": (2, 1), "warmup": False, "HAS_BIAS": True} for _, kw in calls)


# --- Benchmark calls of Triton's own autotuner path (triton 3.6 and 3.9 differ there) ---

@triton.jit
def _tile_kernel(X, Y, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Y = X * BLOCK_N + BLOCK_K: the output says which config ran.
    offs = tl.arange(0, BLOCK_M)
    mask = offs < M
    tl.store(Y + offs, tl.load(X + offs, mask=mask) * BLOCK_N + BLOCK_K, mask=mask)


def _tile_config(m, n, k, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): A and D are shortlisted; B and C are in EXCLUDED.
_A, _B, _C, _D = (64, 2, 1, 4, 3), (128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (64, 3, 5, 4, 2)


def _counted_kernel(monkeypatch, specs):
    """Triton's real Autotuner over ``_tile_kernel`` (interpreted) with vhist's shortlist,
    as ``_config.autotune`` builds it on a GPU, wrapped in a TunedKernel; the second value
    lists the configs Triton's ``_bench`` was called with."""
    tuner = triton.autotune(configs=[_tile_config(*s) for s in specs], key=["M"],
                            prune_configs_by={"early_config_prune": lambda configs, named, **kw: config.shortlist(
                                "_tile_kernel", configs, {**named, **kw})})(_tile_kernel)
    benched = []
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **kw: benched.append(config) or float(len(benched)))
    return config.TunedKernel(tuner), benched


def _ran(kernel, spec, m=40):
    """Launches ``kernel`` and checks that the config ``spec`` computed the output."""
    x = torch.arange(m, dtype=torch.float32)
    y = torch.full_like(x, float("nan"))
    kernel.run(x, y, m, grid=(1,), warmup=False)
    torch.testing.assert_close(y, x * spec[1] + spec[2], rtol=0, atol=0)


def test_no_autotune_never_benchmarks(tuning_on_h200, monkeypatch):
    """VHIST_AUTOTUNE=0: the first shortlisted config runs directly; Triton's autotuner
    is never asked to benchmark (triton 3.6's Autotuner.run would, once per key, even for
    the single config the shortlist leaves)."""
    monkeypatch.setattr(config, "AUTOTUNE", False)
    kernel, benched = _counted_kernel(monkeypatch, [_B, _A, _D])
    for m in (40, 40, 33):
        _ran(kernel, _A, m)
    assert benched == []
    assert kernel.best_config.kwargs == _tile_config(*_A).kwargs


def test_one_shortlisted_config_is_not_benchmarked(tuning_on_h200, monkeypatch):
    kernel, benched = _counted_kernel(monkeypatch, [_B, _A, _C])
    _ran(kernel, _A)
    assert benched == []


def test_tuning_benchmarks_the_shortlist_once_per_key(tuning_on_h200, monkeypatch):
    """With tuning on and two shortlisted configs, each new key costs one benchmark of each
    (the count both tritons give), then runs the pick (the lowest stub timing: A)."""
    kernel, benched = _counted_kernel(monkeypatch, [_A, _B, _D])
    _ran(kernel, _A)
    assert [c.kwargs for c in benched] == [_tile_config(*_A).kwargs, _tile_config(*_D).kwargs]
    _ran(kernel, _A)
    assert len(benched) == 2
    _ran(kernel, _A, 33)  # another key
    assert len(benched) == 4


def test_capture_never_benchmarks(tuning_on_h200, monkeypatch):
    """Under CUDA-graph capture an untuned key runs the heuristic config with one warning
    (per key) and no benchmark; its first launch outside a capture tunes it."""
    kernel, benched = _counted_kernel(monkeypatch, [_D, _A])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.warns(UserWarning, match="CUDA-graph capture"):
        _ran(kernel, _D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ran(kernel, _D)
    assert benched == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _ran(kernel, _D)
    assert len(benched) == 2
    # A tuned key launches its pick under capture, silently.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ran(kernel, _D)
    assert len(benched) == 2


def test_launch_without_tuning_runs_the_kernel_directly(tuning_on_h200, monkeypatch):
    """A Launch plan of an untuned kernel on a GPU resolves, after its first call, to the
    kernel with the heuristic config's constexprs; nothing is benchmarked."""
    from vhist.ops.launch_cache import Launch

    monkeypatch.setattr(config, "AUTOTUNE", False)
    kernel, benched = _counted_kernel(monkeypatch, [_D, _A])
    x = torch.arange(40, dtype=torch.float32)
    y = torch.empty_like(x)
    launch = Launch(kernel, (1,), (40,))
    for _ in range(3):
        y.fill_(float("nan"))
        launch(x, y)
        torch.testing.assert_close(y, x * _D[1] + _D[2], rtol=0, atol=0)
    assert launch.runner is kernel.autotuner.fn and launch.runner_options["BLOCK_N"] == _D[1]
    assert benched == []


def test_shortlist_drops_gemm_tiles_over_the_shared_memory_of_a_block():
    """fp32 (TF32) 128x128x64 at 4 stages holds 256 KB of pipeline buffers (227 KB per
    block on sm_90; the compile report measures 256-330 KB): dropped for fp32, kept for
    bf16 (128 KB), where it is listed first."""
    from vhist.kernels.conv import GEMM_CONFIGS

    big = next(c for c in GEMM_CONFIGS if c.num_stages == 4)
    assert config.gemm_pipeline_smem(big, 4) == 256 * 1024 and config.gemm_pipeline_smem(big, 2) == 128 * 1024
    configs = [big] + [c for c in GEMM_CONFIGS if c is not big]
    split_k = {"grid": lambda meta: (triton.cdiv(512, meta["BLOCK_M"]) * triton.cdiv(512, meta["BLOCK_N"]), 1, 59)}
    for kernel, extra in (("_conv2d_fwd_kernel", {}), ("_conv2d_bwd_dgrad_kernel", {}),
                          ("_conv2d_bwd_wgrad_kernel", split_k)):
        def picked(dtype):
            return config.shortlist(kernel, configs, {**_fwd_args(128, 28, 28, 512), "CG_IN": 512, **extra,
                                                      "X": torch.empty(0, dtype=dtype)})

        assert picked(torch.bfloat16)[0] is big
        fp32 = picked(torch.float32)
        assert big not in fp32 and len(fp32) == config.SHORTLIST
        assert all(config.gemm_pipeline_smem(c, 4) <= config.SMEM_PER_BLOCK for c in fp32)
