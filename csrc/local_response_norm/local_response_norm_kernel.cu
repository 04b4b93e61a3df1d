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
// One thread owns one (n, s) position and walks the channels, sliding q_c in O(1) and
// re-summing it exactly every `resync` channels, or sooner when the running sum's peak
// dwarfs its current value (a running sum that subtracts a large square keeps that
// square's rounding error). Accumulation is in fp32, fp64 for fp64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;

template <typename A> __host__ __device__ __forceinline__ A load_acc(const float* p) { return static_cast<A>(*p); }
template <typename A> __host__ __device__ __forceinline__ A load_acc(const double* p) { return static_cast<A>(*p); }
template <typename A> __host__ __device__ __forceinline__ A load_acc(const __half* p) { return static_cast<A>(__half2float(*p)); }
template <typename A> __host__ __device__ __forceinline__ A load_acc(const __nv_bfloat16* p) {
  return static_cast<A>(__bfloat162float(*p));
}

__host__ __device__ __forceinline__ void store(float* p, float v) { *p = v; }
__host__ __device__ __forceinline__ void store(double* p, double v) { *p = v; }
__host__ __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__host__ __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__host__ __device__ __forceinline__ float exp_(float v) { return expf(v); }
__host__ __device__ __forceinline__ double exp_(double v) { return exp(v); }
__host__ __device__ __forceinline__ float log_(float v) { return logf(v); }
__host__ __device__ __forceinline__ double log_(double v) { return log(v); }
__host__ __device__ __forceinline__ float abs_(float v) { return fabsf(v); }
__host__ __device__ __forceinline__ double abs_(double v) { return fabs(v); }

// One position's column of channels: base offset, channel stride and count.
template <typename T, typename A>
struct Column {
  const T* x;
  int64_t base, stride_c, C;

  // Channel c, zero outside [0, C) (F.local_response_norm's zero padding).
  __host__ __device__ __forceinline__ A operator()(int64_t c) const {
    return (c >= 0 && c < C) ? load_acc<A>(x + base + c * stride_c) : A(0);
  }
};

template <typename T, typename A>
__host__ __device__ A window_sumsq(const Column<T, A>& a, int64_t c, int lo, int hi) {
  A q = 0;
  const int64_t j1 = c + hi + 1 < a.C ? c + hi + 1 : a.C;
  for (int64_t j = c - lo > 0 ? c - lo : 0; j < j1; ++j) {
    const A v = a(j);
    q += v * v;
  }
  return q;
}

// Drift bound of a running sum: re-sum once its peak since the last exact re-sum
// exceeds kDrift times the current value (see kernels/local_response_norm.py).
constexpr float kDrift = 4.0f;

// A running window sum of squares and the largest partial sum since its last re-sum
// (its rounding error is a few ulps of that peak).
template <typename A>
struct Running {
  A q = 0, peak = 0;
};

// q_c from q_{c-1}: one square enters, one leaves. Re-summed exactly at step 0, every
// resync steps, and when (alpha/n) * peak exceeds kDrift times the scale s_c.
template <typename T, typename A>
__host__ __device__ __forceinline__ void slide_sumsq(Running<A>& r, const Column<T, A>& a, int64_t c, int64_t step, int lo,
                                            int hi, int resync, A alpha_over_n, A k) {
  const A in = a(c + hi), out = a(c - lo - 1);
  const A q_up = r.q + in * in;
  const A q = q_up - out * out;
  r.q = q > A(0) ? q : A(0);  // rounding can leave a tiny negative remainder
  r.peak = r.peak > q_up ? r.peak : q_up;
  if (step % resync == 0 || alpha_over_n * r.peak > A(kDrift) * (k + alpha_over_n * r.q)) {
    r.q = window_sumsq(a, c, lo, hi);
    r.peak = r.q;
  }
}

// t_c = dy_c a_c s_c^(-beta-1): what output c sends back to every input in its window.
template <typename T, typename A>
__host__ __device__ __forceinline__ A lrn_t(const Column<T, A>& a, const Column<T, A>& dy, int64_t c, A q, A alpha_over_n,
                                   A beta, A k) {
  if (c < 0 || c >= a.C) return A(0);
  return dy(c) * a(c) * exp_((-beta - A(1)) * log_(k + alpha_over_n * q));
}

// The forward of one position's column of channels. __host__ too, so that the
// numerics can be tested on a machine without a GPU (tests/test_local_response_norm_cuda_host.py).
template <typename T, typename A>
__host__ __device__ void lrn_fwd_column(const T* x, T* y, int64_t base, int64_t C, int64_t stride_c, int lo, int hi,
                                        int resync, A alpha_over_n, A beta, A k) {
  const Column<T, A> a{x, base, stride_c, C};
  Running<A> r;
  for (int64_t c = 0; c < C; ++c) {
    slide_sumsq(r, a, c, c, lo, hi, resync, alpha_over_n, k);
    store(y + base + c * stride_c, a(c) * exp_(-beta * log_(k + alpha_over_n * r.q)));
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
lrn_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t N, int64_t C, int64_t S, int64_t stride_n,
               int64_t stride_c, int64_t stride_s, int lo, int hi, int resync, A alpha_over_n, A beta, A k) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= N * S) return;
  lrn_fwd_column(x, y, (p / S) * stride_n + (p % S) * stride_s, C, stride_c, lo, hi, resync, alpha_over_n, beta, k);
}

// dx_i = dy_i s_i^(-beta) - (2 alpha beta / n) a_i T_i,  T_i = sum_{c = i-HI}^{i+LO} t_c
// (the transposed window). Step m computes t_m at the leading channel, keeps T as the
// sum of the last n t's (= T_i for i = m - LO) by removing t_{m-n}, and slides three
// window sums (at m, at i and at m - n). T is re-summed exactly every resync steps or
// when its drift bound says so, like the window sums.
template <typename T, typename A>
__host__ __device__ void lrn_bwd_column(const T* x, const T* dy, T* dx, int64_t base, int64_t C, int64_t stride_c,
                                        int size, int lo, int hi, int resync, A alpha_over_n, A beta, A k) {
  const Column<T, A> a{x, base, stride_c, C};
  const Column<T, A> g{dy, base, stride_c, C};
  Running<A> lead, mid, trail;
  A t_sum = 0, t_abs = 0, t_peak = 0;  // T, the sum of |t| over the same window, its peak
  for (int64_t m = 0; m < C + lo; ++m) {
    slide_sumsq(lead, a, m, m, lo, hi, resync, alpha_over_n, k);
    slide_sumsq(trail, a, m - size, m, lo, hi, resync, alpha_over_n, k);
    const A t_in = lrn_t(a, g, m, lead.q, alpha_over_n, beta, k);
    const A t_out = lrn_t(a, g, m - size, trail.q, alpha_over_n, beta, k);
    const A abs_up = t_abs + abs_(t_in);
    t_sum += t_in - t_out;
    t_abs = abs_up - abs_(t_out) > A(0) ? abs_up - abs_(t_out) : A(0);
    t_peak = t_peak > abs_up ? t_peak : abs_up;
    // T's rounding error is a few ulps of t_peak; a direct sum's, of t_abs.
    if (m % resync == 0 || t_peak > A(kDrift) * t_abs) {
      t_sum = 0;
      t_abs = 0;
      const int64_t c1 = m + 1 < C ? m + 1 : C;
      for (int64_t c = m - size + 1 > 0 ? m - size + 1 : 0; c < c1; ++c) {
        const A t = lrn_t(a, g, c, window_sumsq(a, c, lo, hi), alpha_over_n, beta, k);
        t_sum += t;
        t_abs += abs_(t);
      }
      t_peak = t_abs;
    }
    const int64_t i = m - lo;
    slide_sumsq(mid, a, i, m, lo, hi, resync, alpha_over_n, k);
    if (i >= 0) {
      const A grad = g(i) * exp_(-beta * log_(k + alpha_over_n * mid.q)) - A(2) * alpha_over_n * beta * a(i) * t_sum;
      store(dx + base + i * stride_c, grad);
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
lrn_bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int64_t N, int64_t C,
               int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s, int size, int lo, int hi, int resync,
               A alpha_over_n, A beta, A k) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= N * S) return;
  lrn_bwd_column(x, dy, dx, (p / S) * stride_n + (p % S) * stride_s, C, stride_c, size, lo, hi, resync,
                 alpha_over_n, beta, k);
}

unsigned int num_blocks(int64_t N, int64_t S) { return static_cast<unsigned int>((N * S + kThreads - 1) / kThreads); }

}  // namespace

// dtype codes shared with the binding: 0 fp32, 1 fp16, 2 bf16, 3 fp64.
// Returns a cudaError_t (0 on success); the binding turns it into an exception.
extern "C" int vhist_lrn_fwd_launch(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t S,
                                    int64_t stride_n, int64_t stride_c, int64_t stride_s, int size, int resync,
                                    double alpha, double beta, double k, cudaStream_t stream) {
  if (N * S == 0) return 0;
  const int lo = size / 2, hi = (size - 1) / 2;
  const dim3 grid(num_blocks(N, S)), block(kThreads);
  const float a32 = static_cast<float>(alpha / size), b32 = static_cast<float>(beta), k32 = static_cast<float>(k);
  switch (dtype) {
    case 0:
      lrn_fwd_kernel<float, float><<<grid, block, 0, stream>>>(static_cast<const float*>(x), static_cast<float*>(y),
          N, C, S, stride_n, stride_c, stride_s, lo, hi, resync, a32, b32, k32);
      break;
    case 1:
      lrn_fwd_kernel<__half, float><<<grid, block, 0, stream>>>(static_cast<const __half*>(x), static_cast<__half*>(y),
          N, C, S, stride_n, stride_c, stride_s, lo, hi, resync, a32, b32, k32);
      break;
    case 2:
      lrn_fwd_kernel<__nv_bfloat16, float><<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(x),
          static_cast<__nv_bfloat16*>(y), N, C, S, stride_n, stride_c, stride_s, lo, hi, resync, a32, b32, k32);
      break;
    case 3:
      lrn_fwd_kernel<double, double><<<grid, block, 0, stream>>>(static_cast<const double*>(x), static_cast<double*>(y),
          N, C, S, stride_n, stride_c, stride_s, lo, hi, resync, alpha / size, beta, k);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int vhist_lrn_bwd_launch(int dtype, const void* x, const void* dy, void* dx, int64_t N, int64_t C,
                                    int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s, int size,
                                    int resync, double alpha, double beta, double k, cudaStream_t stream) {
  if (N * S == 0) return 0;
  const int lo = size / 2, hi = (size - 1) / 2;
  const dim3 grid(num_blocks(N, S)), block(kThreads);
  const float a32 = static_cast<float>(alpha / size), b32 = static_cast<float>(beta), k32 = static_cast<float>(k);
  switch (dtype) {
    case 0:
      lrn_bwd_kernel<float, float><<<grid, block, 0, stream>>>(static_cast<const float*>(x),
          static_cast<const float*>(dy), static_cast<float*>(dx), N, C, S, stride_n, stride_c, stride_s, size, lo, hi,
          resync, a32, b32, k32);
      break;
    case 1:
      lrn_bwd_kernel<__half, float><<<grid, block, 0, stream>>>(static_cast<const __half*>(x),
          static_cast<const __half*>(dy), static_cast<__half*>(dx), N, C, S, stride_n, stride_c, stride_s, size, lo,
          hi, resync, a32, b32, k32);
      break;
    case 2:
      lrn_bwd_kernel<__nv_bfloat16, float><<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(x),
          static_cast<const __nv_bfloat16*>(dy), static_cast<__nv_bfloat16*>(dx), N, C, S, stride_n, stride_c,
          stride_s, size, lo, hi, resync, a32, b32, k32);
      break;
    case 3:
      lrn_bwd_kernel<double, double><<<grid, block, 0, stream>>>(static_cast<const double*>(x),
          static_cast<const double*>(dy), static_cast<double*>(dx), N, C, S, stride_n, stride_c, stride_s, size, lo,
          hi, resync, alpha / size, beta, k);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}
