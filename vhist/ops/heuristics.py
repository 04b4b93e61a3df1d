"""Launch heuristics of the conv, depthwise and BatchNorm launchers, in one place.

Each figure here is a choice of the launchers, not of the kernels, but some assume
something of the kernels' autotune configs (which live at the top of ``kernels/*.py``);
:func:`check_kernel_configs` asserts those assumptions, and the launchers that depend
on them call it before their first launch.
"""
from __future__ import annotations

import functools

import torch

from vhist.ops.common import cdiv, next_power_of_2, sm_count

# Weight gradient of the dense conv (split-K): each split reduces a multiple of this many
# output positions, so that every BLOCK_K of the wgrad configs tiles a split exactly.
WGRAD_POSITION_ALIGN = 64
# The weight tile (C_out x C_in per group) the split count assumes per program.
WGRAD_TILE = 64
WGRAD_MIN_POSITIONS = 2048  # per split
WGRAD_MAX_SPLIT = 64
WGRAD_PROGRAMS_PER_SM = 4

# Depthwise forward: output pixels per tile (the launcher picks it, the configs tune only
# BLOCK_C), and the most BN-statistics partials (one per program) the fused op writes,
# so that the BN merge tree over them stays two levels deep at most.
DEPTHWISE_FWD_BLOCK_P = 64
DEPTHWISE_MAX_STATS_PARTIALS = 1024
# Depthwise weight gradient: the per-chunk partials are summed in a tree of this fan-in
# (merge_levels), as BatchNorm's are: no program walks more than this many in sequence
# (523 chunks at MobileNetV2's 32x112x112 layer, batch 128: 9 groups, then 9 partials).
DEPTHWISE_WGRAD_MERGE_GROUP = 64
DEPTHWISE_WGRAD_MERGE_BLOCK_J = 128  # flat (tap, channel) values per merge program
DEPTHWISE_WGRAD_MERGE_BLOCK_K = 16   # partials summed per step

# BatchNorm reductions: programs per SM, and the bounds of one chunk's length.
BN_PROGRAMS_PER_SM = 8
BN_MIN_CHUNK = 512
BN_MAX_CHUNK = 65536
# The channel tile of the BN reductions per memory format (kernels/batch_norm.py runs
# them on one fixed config each, never tuned; check_kernel_configs asserts it): with the
# chunk count below it fixes their summation order, which must not change with the tuning.
BN_CHANNELS_CONTIGUOUS_BLOCK_C = 64
BN_SPATIAL_CONTIGUOUS_BLOCK_C = 2
BN_FINALIZE_MAX_BLOCK_C = 128
BN_FINALIZE_BLOCK_K = 16  # partials merged per step
# The statistics / gradient-sum merge is a tree of this fan-in: each level's programs
# (channel blocks x groups) walk at most this many partials in sequence, and the
# finalize kernel merges the last <= BN_MERGE_GROUP. A function of the partial count only,
# so the merge order (and the bits) depend on the shape, never on the tuning.
BN_MERGE_GROUP = 64


@functools.lru_cache(maxsize=None)
def check_kernel_configs() -> None:
    """Asserts what the heuristics above assume of the kernels' autotune configs.

    Raises:
        AssertionError: a config list changed in a way the launchers do not handle.
    """
    from vhist.kernels import batch_norm, conv, depthwise

    for configs, block_c in ((batch_norm.CHANNELS_CONTIGUOUS_REDUCE_CONFIGS, BN_CHANNELS_CONTIGUOUS_BLOCK_C),
                             (batch_norm.SPATIAL_CONTIGUOUS_REDUCE_CONFIGS, BN_SPATIAL_CONTIGUOUS_BLOCK_C)):
        assert len(configs) == 1 and configs[0].kwargs["BLOCK_C"] == block_c, (
            "batch norm: the reductions run one fixed tile (its BLOCK_C the chunk count assumes), "
            f"got {configs}")
    for config in conv.GEMM_CONFIGS + conv.FP64_CONFIGS:
        block_k = config.kwargs["BLOCK_K"]
        assert WGRAD_POSITION_ALIGN % block_k == 0, (
            f"conv wgrad: BLOCK_K={block_k} does not divide WGRAD_POSITION_ALIGN={WGRAD_POSITION_ALIGN}")
    for config in depthwise.FWD_CONFIGS:
        assert "BLOCK_P" not in config.kwargs, "depthwise forward: BLOCK_P is the launcher's, not a tuned value"


def wgrad_split(positions: int, weight_tiles: int, device: torch.device) -> int:
    """Number of split-K partials for the dense conv's weight gradient: enough (weight
    tile x split) programs to fill the GPU ``WGRAD_PROGRAMS_PER_SM`` times over, each
    reducing at least ``WGRAD_MIN_POSITIONS`` positions."""
    want = cdiv(WGRAD_PROGRAMS_PER_SM * sm_count(device), weight_tiles)
    return max(1, min(want, positions // WGRAD_MIN_POSITIONS, WGRAD_MAX_SPLIT))


def wgrad_positions_per_split(positions: int, split: int) -> tuple[int, int]:
    """(positions per split, splits): ``split`` rounded so that every split but the last
    holds a multiple of ``WGRAD_POSITION_ALIGN`` positions."""
    check_kernel_configs()
    per_split = cdiv(cdiv(positions, split), WGRAD_POSITION_ALIGN) * WGRAD_POSITION_ALIGN
    return per_split, cdiv(positions, per_split)


def depthwise_fwd_tiling(pixels: int, stats: bool) -> tuple[int, int]:
    """(pixel tiles per program, programs along the pixel axis) of the depthwise forward;
    with ``stats`` a program takes several tiles, so that its partials stay few."""
    check_kernel_configs()
    tiles = cdiv(pixels, DEPTHWISE_FWD_BLOCK_P)
    per_program = cdiv(tiles, DEPTHWISE_MAX_STATS_PARTIALS) if stats else 1
    return per_program, cdiv(tiles, per_program)


def bn_chunks(total: int, channels: int, channels_contiguous: bool, device: torch.device) -> int:
    """Chunks of BatchNorm's N*S reduction: enough to give every SM several programs,
    never fewer than ``BN_MIN_CHUNK`` elements per chunk and never more than
    ``BN_MAX_CHUNK`` (which bounds one program's loop). A function of the shape, the
    memory format and the device's SM count: the BN statistics' bits are the same for a
    shape on GPUs with the same SM count (and Triton version), whatever was tuned."""
    check_kernel_configs()
    block_c = BN_CHANNELS_CONTIGUOUS_BLOCK_C if channels_contiguous else BN_SPATIAL_CONTIGUOUS_BLOCK_C
    chunks = cdiv(BN_PROGRAMS_PER_SM * sm_count(device), cdiv(channels, block_c))
    return max(min(chunks, cdiv(total, BN_MIN_CHUNK)), cdiv(total, BN_MAX_CHUNK), 1)


def bn_finalize_block_c(channels: int) -> int:
    """Channel tile of the BN finalize kernels (one program per tile)."""
    return min(next_power_of_2(channels), BN_FINALIZE_MAX_BLOCK_C)


def merge_levels(num_partials: int, group: int) -> list[int]:
    """Partial counts entering each merge level of a tree of fan-in ``group`` before its
    finalize: empty when ``num_partials <= group``; each level groups ``group`` partials
    into one. A function of the partial count only, so the order (and the bits) is too."""
    levels = []
    while num_partials > group:
        levels.append(num_partials)
        num_partials = cdiv(num_partials, group)
    return levels


def bn_merge_levels(num_partials: int) -> list[int]:
    """The BN merge tree's levels (:func:`merge_levels` of fan-in ``BN_MERGE_GROUP``)."""
    return merge_levels(num_partials, BN_MERGE_GROUP)
