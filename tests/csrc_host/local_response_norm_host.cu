// Host entry points for the per-position code of the LRN CUDA kernels, so that
// tests/test_local_response_norm_cuda_host.py checks their numerics on a machine
// without a GPU. Built with nvcc as a shared library and called through ctypes; the
// loops below play the role of the kernels' threads.
#include "../../csrc/local_response_norm/local_response_norm_kernel.cu"

namespace {

template <typename T, typename A>
void host_fwd(const void* x, void* y, int64_t N, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c,
              int64_t stride_s, int size, int resync, double alpha, double beta, double k) {
  for (int64_t p = 0; p < N * S; ++p)
    lrn_fwd_column(static_cast<const T*>(x), static_cast<T*>(y), (p / S) * stride_n + (p % S) * stride_s, C,
                   stride_c, size / 2, (size - 1) / 2, resync, static_cast<A>(alpha / size), static_cast<A>(beta),
                   static_cast<A>(k));
}

template <typename T, typename A>
void host_bwd(const void* x, const void* dy, void* dx, int64_t N, int64_t C, int64_t S, int64_t stride_n,
              int64_t stride_c, int64_t stride_s, int size, int resync, double alpha, double beta, double k) {
  for (int64_t p = 0; p < N * S; ++p)
    lrn_bwd_column(static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dx),
                   (p / S) * stride_n + (p % S) * stride_s, C, stride_c, size, size / 2, (size - 1) / 2, resync,
                   static_cast<A>(alpha / size), static_cast<A>(beta), static_cast<A>(k));
}

}  // namespace

// dtype: 0 fp32, 3 fp64 (the codes of the CUDA launchers).
extern "C" int vhist_lrn_fwd_host(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t S,
                                  int64_t stride_n, int64_t stride_c, int64_t stride_s, int size, int resync,
                                  double alpha, double beta, double k) {
  if (dtype == 0) host_fwd<float, float>(x, y, N, C, S, stride_n, stride_c, stride_s, size, resync, alpha, beta, k);
  else if (dtype == 3) host_fwd<double, double>(x, y, N, C, S, stride_n, stride_c, stride_s, size, resync, alpha, beta, k);
  else return 1;
  return 0;
}

extern "C" int vhist_lrn_bwd_host(int dtype, const void* x, const void* dy, void* dx, int64_t N, int64_t C,
                                  int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s, int size,
                                  int resync, double alpha, double beta, double k) {
  if (dtype == 0) host_bwd<float, float>(x, dy, dx, N, C, S, stride_n, stride_c, stride_s, size, resync, alpha, beta, k);
  else if (dtype == 3) host_bwd<double, double>(x, dy, dx, N, C, S, stride_n, stride_c, stride_s, size, resync, alpha, beta, k);
  else return 1;
  return 0;
}
