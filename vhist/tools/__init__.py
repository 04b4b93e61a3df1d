"""Developer tools that look at what vhist's kernels will do without running them.

* :mod:`vhist.tools.launches`: records every Triton launch the launchers make (kernel,
  grid, arguments, constexprs, autotune candidates) instead of running it, so that real
  shapes can be inspected on a machine without a GPU.
* :mod:`vhist.tools.compile_report`: compiles recorded launches for sm_90 with Triton's
  runtime specialization and reads registers, spills, shared memory, occupancy, the
  matrix instruction and the global-memory access widths off the compiled code.
"""
