// Host entry points for the block code of the LRN CUDA kernels, so that
// tests/test_local_response_norm_cuda_host.py checks their numerics on a machine
// without a GPU. Built with nvcc as a shared library and called through ctypes; the
// loops below play the kernels' blocks, each phase run by one "thread" (tid 0 of 1)
// in the order the __syncthreads() impose, with the launchers' tile sizes and vector
// widths.
#include "../../csrc/local_response_norm/local_response_norm_kernel.cu"

#include <vector>

namespace {

template <typename T, typename A, int V>
void host_fwd(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s,
              int64_t p_full, int size, A alpha_over_n, A beta, A k) {
  const int64_t elems = p_full * (C + 1);
  std::vector<A> smem(kFwdTiles * elems);
  A *a = smem.data(), *out = a + elems;
  for (int64_t b = 0; b < N * ((S + p_full - 1) / p_full); ++b) {
    const Tile t = make_tile(b, C, S, stride_n, stride_c, stride_s, p_full);
    tile_load<T, A, V>(x, a, t, 0, 1);
    lrn_fwd_compute(a, out, t, size / 2, (size - 1) / 2, alpha_over_n, beta, k, 0, 1);
    tile_store<T, A, V>(out, y, t, 0, 1);
  }
}

template <typename T, typename A, int V>
void host_bwd(const T* x, const T* dy, T* dx, int64_t N, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c,
              int64_t stride_s, int64_t p_full, int size, A alpha_over_n, A beta, A k) {
  const int64_t elems = p_full * (C + 1);
  std::vector<A> smem(kBwdTiles * elems);
  A *a = smem.data(), *g = a + elems, *tt = g + elems;
  for (int64_t b = 0; b < N * ((S + p_full - 1) / p_full); ++b) {
    const Tile t = make_tile(b, C, S, stride_n, stride_c, stride_s, p_full);
    tile_load<T, A, V>(x, a, t, 0, 1);
    tile_load<T, A, V>(dy, g, t, 0, 1);
    lrn_bwd_terms(a, g, tt, t, size / 2, (size - 1) / 2, alpha_over_n, beta, k, 0, 1);
    lrn_bwd_compute(a, g, tt, t, size / 2, (size - 1) / 2, alpha_over_n, beta, 0, 1);
    tile_store<T, A, V>(g, dx, t, 0, 1);
  }
}

template <typename T, typename A>
int run(const void* x, const void* dy, void* out, int64_t N, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c,
        int64_t stride_s, int size, double alpha, double beta, double k) {
  constexpr int V = 16 / sizeof(T);
  const void* ptrs[] = {x, out, dy != nullptr ? dy : x};
  const int vec = vector_width<T>(ptrs, 3, C, S, stride_c);
  const int64_t p = tile_positions(C, S, stride_c == 1, vec);
  const A an = static_cast<A>(alpha / size), b = static_cast<A>(beta), kk = static_cast<A>(k);
  const T* xt = static_cast<const T*>(x);
  T* o = static_cast<T*>(out);
  if (dy == nullptr) {
    if (vec == V) host_fwd<T, A, V>(xt, o, N, C, S, stride_n, stride_c, stride_s, p, size, an, b, kk);
    else host_fwd<T, A, 1>(xt, o, N, C, S, stride_n, stride_c, stride_s, p, size, an, b, kk);
  } else {
    const T* g = static_cast<const T*>(dy);
    if (vec == V) host_bwd<T, A, V>(xt, g, o, N, C, S, stride_n, stride_c, stride_s, p, size, an, b, kk);
    else host_bwd<T, A, 1>(xt, g, o, N, C, S, stride_n, stride_c, stride_s, p, size, an, b, kk);
  }
  return vec;
}

}  // namespace

// dtype: 0 fp32, 3 fp64 (the codes of the CUDA launchers). Returns the vector width the
// launcher would use (1 or 16 bytes' worth), or -1 for an unknown dtype.
extern "C" int vhist_lrn_fwd_host(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t S,
                                  int64_t stride_n, int64_t stride_c, int64_t stride_s, int size, double alpha,
                                  double beta, double k) {
  if (dtype == 0) return run<float, float>(x, nullptr, y, N, C, S, stride_n, stride_c, stride_s, size, alpha, beta, k);
  if (dtype == 3) return run<double, double>(x, nullptr, y, N, C, S, stride_n, stride_c, stride_s, size, alpha, beta, k);
  return -1;
}

extern "C" int vhist_lrn_bwd_host(int dtype, const void* x, const void* dy, void* dx, int64_t N, int64_t C,
                                  int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s, int size,
                                  double alpha, double beta, double k) {
  if (dtype == 0) return run<float, float>(x, dy, dx, N, C, S, stride_n, stride_c, stride_s, size, alpha, beta, k);
  if (dtype == 3) return run<double, double>(x, dy, dx, N, C, S, stride_n, stride_c, stride_s, size, alpha, beta, k);
  return -1;
}
