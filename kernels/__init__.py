"""vhist's Triton kernels (installed as ``vhist.kernels``).

Kernels only: no torch allocation happens here. The launchers in :mod:`vhist.ops`
check inputs, allocate outputs and pick grids.
"""
