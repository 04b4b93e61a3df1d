// Local Response Normalization (Krizhevsky et al., 2012, section 3.3): CUDA kernels.
//
// No torch header here: CI compiles this file with nvcc alone (sm_80, sm_90), and the
// torch binding (local_response_norm.cpp) calls the extern "C" launchers at the bottom
// with raw pointers, the (N, C, S) geometry, strides and a stream.
//
// The algorithm is the one of kernels/local_response_norm.py (the Triton backend), with
// PyTorch's convention: window(c) = [c - LO, c + HI], LO = n / 2, HI = (n - 1) / 2,
// clipped at the edges and still divided by n;
//   q_c = sum_{j in window(c)} a_j^2,  s_c = k + (alpha / n) q_c,  b_c = a_c s_c^(-beta).
// A block owns a tile of P positions x all C channels of one row n of the (N, C, S)
// view. It copies the tile into shared memory along the contiguous axis (channels for
// channels-last, positions for NCHW): coalesced, and 128-bit wide when that axis is a
// multiple of 16 bytes. The window sums are direct n-term sums read from shared memory
// (no running sum, so nothing cancels), one element per thread; the results go back to
// shared memory and leave along the same axis, with the same vectors.
// Accumulation is in fp32, fp64 for fp64.
//
// Each phase is a __host__ __device__ function of (thread, thread count) over the tile,
// so that tests/csrc_host/local_response_norm_host.cu runs the very same code on the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileElems = 2048;  // positions x channels per block (at least one position)
constexpr int kFwdTiles = 2;          // shared tiles of the forward: a, y
constexpr int kBwdTiles = 3;          // shared tiles of the backward: a, dy s^(-beta) (then dx), t

__host__ __device__ __forceinline__ float to_acc(float v) { return v; }
__host__ __device__ __forceinline__ double to_acc(double v) { return v; }
__host__ __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __host__ __device__ __forceinline__ T from_acc(float v);
template <> __host__ __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __host__ __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __host__ __device__ __forceinline__ T from_acc(double v) { return v; }

__host__ __device__ __forceinline__ float exp_(float v) { return expf(v); }
__host__ __device__ __forceinline__ double exp_(double v) { return exp(v); }
__host__ __device__ __forceinline__ float log_(float v) { return logf(v); }
__host__ __device__ __forceinline__ double log_(double v) { return log(v); }

// V consecutive elements, aligned to their size: one 128-bit access when V * sizeof(T) == 16.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// The block's tile: positions [s0, s0 + P) of row n, every channel. Element (p, c) lives
// at global offset base + p * stride_s + c * stride_c and at tile[p * ldc + c] in shared
// memory (ldc = C + 1: the NCHW copy walks p, an odd row pitch keeps its banks apart).
struct Tile {
  int64_t base, C, P, stride_c, stride_s;
  int64_t ldc;
  bool inner_c;  // channels are the contiguous axis (channels-last)

  __host__ __device__ int64_t inner() const { return inner_c ? C : P; }
  __host__ __device__ int64_t offset(int64_t p, int64_t c) const { return base + p * stride_s + c * stride_c; }
  __host__ __device__ int64_t at(int64_t p, int64_t c) const { return p * ldc + c; }

  // f(p, c) for the elements first, first + step, ... of the tile in the order of its
  // contiguous axis; (p, c) advance by additions (one division per thread, not per
  // element). step and first are multiples of V when inner() is.
  template <typename F>
  __host__ __device__ __forceinline__ void walk(int64_t first, int64_t step, F f) const {
    const int64_t n_inner = inner(), d_outer = step / n_inner, d_in = step - d_outer * n_inner;
    int64_t outer = first / n_inner, in = first - outer * n_inner;
    for (int64_t e = first; e < C * P; e += step) {
      f(inner_c ? outer : in, inner_c ? in : outer);
      in += d_in;
      outer += d_outer;
      if (in >= n_inner) {
        in -= n_inner;
        ++outer;
      }
    }
  }
};

// (n, s0, P) of block b, with blocks_per_row blocks per row n and P_full positions per block.
__host__ __device__ inline Tile make_tile(int64_t b, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c,
                                          int64_t stride_s, int64_t p_full) {
  const int64_t blocks_per_row = (S + p_full - 1) / p_full;
  const int64_t n = b / blocks_per_row, s0 = (b - n * blocks_per_row) * p_full;
  const int64_t p = S - s0 < p_full ? S - s0 : p_full;
  return Tile{n * stride_n + s0 * stride_s, C, p, stride_c, stride_s, C + 1, stride_c == 1};
}

// Global -> shared, V elements of the contiguous axis per access; the caller guarantees
// that the contiguous axis is a multiple of V and its rows are V-element aligned.
template <typename T, typename A, int V>
__host__ __device__ void tile_load(const T* __restrict__ x, A* __restrict__ tile, const Tile& t, int tid, int threads) {
  t.walk(int64_t(tid) * V, int64_t(threads) * V, [&](int64_t p, int64_t c) {
    const Vec<T, V> v = *reinterpret_cast<const Vec<T, V>*>(x + t.offset(p, c));
    for (int j = 0; j < V; ++j) tile[t.inner_c ? t.at(p, c + j) : t.at(p + j, c)] = to_acc(v.v[j]);
  });
}

// q_c of position p: the direct sum over the clipped window, from the shared tile.
template <typename A>
__host__ __device__ __forceinline__ A window_sumsq(const A* tile, const Tile& t, int64_t p, int64_t c, int lo,
                                                   int hi) {
  const A* row = tile + t.at(p, 0);
  const int64_t j1 = c + hi + 1 < t.C ? c + hi + 1 : t.C;
  A q = 0;
  for (int64_t j = c - lo > 0 ? c - lo : 0; j < j1; ++j) q += row[j] * row[j];
  return q;
}

// Shared -> global, V elements of the contiguous axis per access (as tile_load).
template <typename T, typename A, int V>
__host__ __device__ void tile_store(const A* __restrict__ tile, T* __restrict__ out, const Tile& t, int tid,
                                    int threads) {
  t.walk(int64_t(tid) * V, int64_t(threads) * V, [&](int64_t p, int64_t c) {
    Vec<T, V> v;
    for (int j = 0; j < V; ++j) v.v[j] = from_acc<T>(tile[t.inner_c ? t.at(p, c + j) : t.at(p + j, c)]);
    *reinterpret_cast<Vec<T, V>*>(out + t.offset(p, c)) = v;
  });
}

// The compute phases give consecutive threads consecutive elements of the contiguous
// axis, one each: their window reads from shared memory are consecutive words (or, on
// NCHW, words an odd pitch apart), free of bank conflicts; only the vector copies touch
// a thread's V neighbouring elements.

// Forward, phase 2: y = a s^(-beta) into the shared tile y.
template <typename A>
__host__ __device__ void lrn_fwd_compute(const A* a, A* y, const Tile& t, int lo, int hi, A alpha_over_n, A beta,
                                         A k, int tid, int threads) {
  t.walk(tid, threads, [&](int64_t p, int64_t c) {
    const int64_t i = t.at(p, c);
    y[i] = a[i] * exp_(-beta * log_(k + alpha_over_n * window_sumsq(a, t, p, c, lo, hi)));
  });
}

// Backward, phase 2, per element of the shared tiles: t_c = dy_c a_c s_c^(-beta-1) (what
// output c sends back through its window) into tt, and dy_c s_c^(-beta) over dy in place
// (only this element reads it again).
template <typename A>
__host__ __device__ void lrn_bwd_terms(const A* a, A* dy, A* tt, const Tile& t, int lo, int hi, A alpha_over_n,
                                       A beta, A k, int tid, int threads) {
  t.walk(tid, threads, [&](int64_t p, int64_t c) {
    const A log_s = log_(k + alpha_over_n * window_sumsq(a, t, p, c, lo, hi));
    const int64_t i = t.at(p, c);
    tt[i] = dy[i] * a[i] * exp_((-beta - A(1)) * log_s);
    dy[i] = dy[i] * exp_(-beta * log_s);
  });
}

// Backward, phase 3: dx_i = dy_i s_i^(-beta) - (2 alpha beta / n) a_i T_i with
// T_i = sum_{c = i-HI}^{i+LO} t_c (the transposed window), over g = dy s^(-beta) in place.
template <typename A>
__host__ __device__ void lrn_bwd_compute(const A* a, A* g, const A* tt, const Tile& t, int lo, int hi, A alpha_over_n,
                                         A beta, int tid, int threads) {
  t.walk(tid, threads, [&](int64_t p, int64_t c) {
    const A* row = tt + t.at(p, 0);
    const int64_t c1 = c + lo + 1 < t.C ? c + lo + 1 : t.C;
    A sum = 0;
    for (int64_t m = c - hi > 0 ? c - hi : 0; m < c1; ++m) sum += row[m];
    const int64_t i = t.at(p, c);
    g[i] -= A(2) * alpha_over_n * beta * a[i] * sum;
  });
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
lrn_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c,
               int64_t stride_s, int64_t p_full, int lo, int hi, A alpha_over_n, A beta, A k) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tile t = make_tile(blockIdx.x, C, S, stride_n, stride_c, stride_s, p_full);
  A* a = reinterpret_cast<A*>(smem);
  A* out = a + p_full * t.ldc;
  tile_load<T, A, V>(x, a, t, threadIdx.x, blockDim.x);
  __syncthreads();
  lrn_fwd_compute(a, out, t, lo, hi, alpha_over_n, beta, k, threadIdx.x, blockDim.x);
  __syncthreads();
  tile_store<T, A, V>(out, y, t, threadIdx.x, blockDim.x);
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
lrn_bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int64_t C, int64_t S,
               int64_t stride_n, int64_t stride_c, int64_t stride_s, int64_t p_full, int lo, int hi, A alpha_over_n,
               A beta, A k) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tile t = make_tile(blockIdx.x, C, S, stride_n, stride_c, stride_s, p_full);
  A* a = reinterpret_cast<A*>(smem);
  A* g = a + p_full * t.ldc;
  A* tt = g + p_full * t.ldc;
  tile_load<T, A, V>(x, a, t, threadIdx.x, blockDim.x);
  tile_load<T, A, V>(dy, g, t, threadIdx.x, blockDim.x);
  __syncthreads();
  lrn_bwd_terms(a, g, tt, t, lo, hi, alpha_over_n, beta, k, threadIdx.x, blockDim.x);
  __syncthreads();
  lrn_bwd_compute(a, g, tt, t, lo, hi, alpha_over_n, beta, threadIdx.x, blockDim.x);
  __syncthreads();
  tile_store<T, A, V>(g, dx, t, threadIdx.x, blockDim.x);
}

// Positions per block: kTileElems / C (at least 1); on NCHW a multiple of the vector
// width, so that every block's rows start aligned.
__host__ __device__ inline int64_t tile_positions(int64_t C, int64_t S, bool inner_c, int vec) {
  int64_t p = kTileElems / C > 0 ? kTileElems / C : 1;
  if (!inner_c) p = p < vec ? vec : p - p % vec;
  return p < S ? p : S;
}

// The vector width V the tile can use: 16 bytes of T when the contiguous axis is a
// multiple of it and every pointer is 16-byte aligned; else 1.
template <typename T>
int vector_width(const void* const* ptrs, int n_ptrs, int64_t C, int64_t S, int64_t stride_c) {
  constexpr int V = 16 / sizeof(T);
  const int64_t inner = stride_c == 1 ? C : S;
  if (inner % V != 0) return 1;
  for (int i = 0; i < n_ptrs; ++i)
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return 1;
  return V;
}

// A block's tile and launch: vector width, positions per block, grid, shared bytes.
struct Plan {
  int vec;
  int64_t p;
  dim3 grid;
  size_t smem;
};

template <typename T, typename A>
Plan plan(const void* const* ptrs, int n_ptrs, int64_t N, int64_t C, int64_t S, int64_t stride_c, int tiles) {
  const int vec = vector_width<T>(ptrs, n_ptrs, C, S, stride_c);
  const int64_t p = tile_positions(C, S, stride_c == 1, vec);
  return Plan{vec, p, dim3(static_cast<unsigned>(N * ((S + p - 1) / p))),
              static_cast<size_t>(tiles * p * (C + 1)) * sizeof(A)};
}

// Above 48 KB a kernel must opt in to its dynamic shared memory (C up to 4096, fp64).
template <typename K>
cudaError_t opt_in(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <typename T, typename A>
int launch_fwd(const void* x, void* y, int64_t N, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c,
               int64_t stride_s, int size, A alpha_over_n, A beta, A k, cudaStream_t stream) {
  const void* ptrs[] = {x, y};
  const Plan pl = plan<T, A>(ptrs, 2, N, C, S, stride_c, kFwdTiles);
  auto kernel = pl.vec > 1 ? lrn_fwd_kernel<T, A, 16 / sizeof(T)> : lrn_fwd_kernel<T, A, 1>;
  if (const cudaError_t err = opt_in(kernel, pl.smem)) return static_cast<int>(err);
  kernel<<<pl.grid, kThreads, pl.smem, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), C, S, stride_n,
                                                 stride_c, stride_s, pl.p, size / 2, (size - 1) / 2, alpha_over_n,
                                                 beta, k);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename A>
int launch_bwd(const void* x, const void* dy, void* dx, int64_t N, int64_t C, int64_t S, int64_t stride_n,
               int64_t stride_c, int64_t stride_s, int size, A alpha_over_n, A beta, A k, cudaStream_t stream) {
  const void* ptrs[] = {x, dy, dx};
  const Plan pl = plan<T, A>(ptrs, 3, N, C, S, stride_c, kBwdTiles);
  auto kernel = pl.vec > 1 ? lrn_bwd_kernel<T, A, 16 / sizeof(T)> : lrn_bwd_kernel<T, A, 1>;
  if (const cudaError_t err = opt_in(kernel, pl.smem)) return static_cast<int>(err);
  kernel<<<pl.grid, kThreads, pl.smem, stream>>>(static_cast<const T*>(x), static_cast<const T*>(dy),
                                                 static_cast<T*>(dx), C, S, stride_n, stride_c, stride_s, pl.p,
                                                 size / 2, (size - 1) / 2, alpha_over_n, beta, k);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// dtype codes shared with the binding: 0 fp32, 1 fp16, 2 bf16, 3 fp64. The binding
// passes a dense tensor (contiguous or channels-last) of at most 4096 channels.
// Returns a cudaError_t (0 on success); the binding turns it into an exception.
extern "C" int vhist_lrn_fwd_launch(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t S,
                                    int64_t stride_n, int64_t stride_c, int64_t stride_s, int size, double alpha,
                                    double beta, double k, cudaStream_t stream) {
  if (N * S == 0) return 0;
  const float a32 = static_cast<float>(alpha / size), b32 = static_cast<float>(beta), k32 = static_cast<float>(k);
  switch (dtype) {
    case 0: return launch_fwd<float, float>(x, y, N, C, S, stride_n, stride_c, stride_s, size, a32, b32, k32, stream);
    case 1: return launch_fwd<__half, float>(x, y, N, C, S, stride_n, stride_c, stride_s, size, a32, b32, k32, stream);
    case 2:
      return launch_fwd<__nv_bfloat16, float>(x, y, N, C, S, stride_n, stride_c, stride_s, size, a32, b32, k32, stream);
    case 3:
      return launch_fwd<double, double>(x, y, N, C, S, stride_n, stride_c, stride_s, size, alpha / size, beta, k,
                                        stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int vhist_lrn_bwd_launch(int dtype, const void* x, const void* dy, void* dx, int64_t N, int64_t C,
                                    int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s, int size,
                                    double alpha, double beta, double k, cudaStream_t stream) {
  if (N * S == 0) return 0;
  const float a32 = static_cast<float>(alpha / size), b32 = static_cast<float>(beta), k32 = static_cast<float>(k);
  switch (dtype) {
    case 0:
      return launch_bwd<float, float>(x, dy, dx, N, C, S, stride_n, stride_c, stride_s, size, a32, b32, k32, stream);
    case 1:
      return launch_bwd<__half, float>(x, dy, dx, N, C, S, stride_n, stride_c, stride_s, size, a32, b32, k32, stream);
    case 2:
      return launch_bwd<__nv_bfloat16, float>(x, dy, dx, N, C, S, stride_n, stride_c, stride_s, size, a32, b32, k32,
                                              stream);
    case 3:
      return launch_bwd<double, double>(x, dy, dx, N, C, S, stride_n, stride_c, stride_s, size, alpha / size, beta,
                                        k, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
