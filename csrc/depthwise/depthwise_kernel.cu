// Depthwise conv2d (MobileNet: Howard et al., 2017): CUDA kernels for the forward, the
// input gradient and the weight gradient.
//
// No torch header here: CI compiles this file with nvcc alone (sm_80, sm_90), and the
// torch binding (depthwise.cpp) calls the extern "C" launchers at the bottom with raw
// pointers, sizes, strides (in elements) and a stream.
//
// The algorithms are those of kernels/depthwise.py (the Triton backend). Output channel
// co reads input channel co / M (weight (C_in * M, 1, KH, KW)). Consecutive threads own
// consecutive channels of one pixel, so NHWC loads and stores are coalesced, and the
// overlapping windows of neighbouring pixels hit L1. The tap loops are unrolled for
// 3x3, 5x5 and 7x7 (template arguments); other sizes take the same code with runtime
// bounds. fp32, fp16 and bf16, accumulated in fp32.
//   forward:      y[n,oh,ow,co] = b[co] + sum_{kh,kw} w[co,kh,kw] x[n, oh*sh-ph+kh*dh, ow*sw-pw+kw*dw, co/M]
//   input grad:   a gather (the transposed conv, no atomics) over the taps where
//                 (ih + ph - kh*dh) / sh is a whole output row inside the output (and for w)
//   weight grad:  two-stage, deterministic reduction over N*OH*OW: each lane reads a pixel's
//                 dy once and accumulates every tap; per-chunk partials reduced in lane
//                 order inside a block, then summed over chunks in order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

// Unrolling hint for code that is also built for the host (where the pragma is unknown).
#ifdef __CUDA_ARCH__
#define VHIST_UNROLL _Pragma("unroll")
#else
#define VHIST_UNROLL
#endif

namespace {

constexpr int kThreads = 256;     // 1-D elementwise kernels (the weight-grad finalize)
constexpr int kTileC = 32;        // channels per forward / input-grad block (one warp wide)
constexpr int kTileP = 8;         // pixels per forward / input-grad block
constexpr int kWgradChannels = 32;  // channels per weight-grad block (one warp wide)
constexpr int kWgradLanes = 8;      // pixel lanes per weight-grad block

// __ldg on the device (read-only cache); a plain load in the host build of the per-thread
// functions (tests/csrc_host/depthwise_host.cu).
template <typename T>
__host__ __device__ __forceinline__ T ld(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}
__host__ __device__ __forceinline__ float load_f(const float* p) { return ld(p); }
__host__ __device__ __forceinline__ float load_f(const __half* p) { return __half2float(ld(p)); }
__host__ __device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(ld(p)); }

__host__ __device__ __forceinline__ void store(float* p, float v) { *p = v; }
__host__ __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__host__ __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

struct Shape {
  int64_t N, C_in, H, W, C_out, OH, OW, M;
};
struct Strides4 {
  int64_t n, c, h, w;
};
struct ConvArgs {
  int KH, KW, sh, sw, ph, pw, dh, dw;
};

// One output element: y[n, oh, ow, co] (before the store).
template <typename T, typename A, int KH_, int KW_>
__host__ __device__ __forceinline__ A depthwise_fwd_point(const T* __restrict__ x, const T* __restrict__ wt,
                                                         const T* __restrict__ bias, const Shape& s,
                                                         const Strides4& xs, const Strides4& ws, const ConvArgs& a,
                                                         int64_t n, int64_t oh, int64_t ow, int64_t co) {
  const int KH = KH_ > 0 ? KH_ : a.KH;
  const int KW = KW_ > 0 ? KW_ : a.KW;
  const T* xb = x + n * xs.n + (co / s.M) * xs.c;
  const T* wb = wt + co * ws.n;
  A acc = bias != nullptr ? static_cast<A>(load_f(bias + co)) : A(0);
VHIST_UNROLL
  for (int kh = 0; kh < KH; ++kh) {
    const int64_t ih = oh * a.sh - a.ph + int64_t(kh) * a.dh;
    if (ih < 0 || ih >= s.H) continue;
VHIST_UNROLL
    for (int kw = 0; kw < KW; ++kw) {
      const int64_t iw = ow * a.sw - a.pw + int64_t(kw) * a.dw;
      if (iw < 0 || iw >= s.W) continue;
      acc += static_cast<A>(load_f(xb + ih * xs.h + iw * xs.w)) * static_cast<A>(load_f(wb + kh * ws.h + kw * ws.w));
    }
  }
  return acc;
}

// Block = (kTileC channels) x (kTileP pixels), grid = (channel blocks, pixel blocks) with
// a grid-stride loop over pixels: the channel index needs no division, and each pixel's
// (n, h, w) comes from two 32-bit divisions (the binding keeps N*H*W below 2^32).
__host__ __device__ __forceinline__ void pixel_coords(int64_t p, int64_t H, int64_t W, int64_t& n, int64_t& h,
                                                      int64_t& w) {
  const uint32_t q = static_cast<uint32_t>(p), w32 = static_cast<uint32_t>(W);
  const uint32_t row = q / w32;
  w = q - row * w32;
  n = row / static_cast<uint32_t>(H);
  h = row - static_cast<uint32_t>(n) * static_cast<uint32_t>(H);
}

// This thread's work in a tile kernel over `channels` channels of N x H x W pixels:
// point(c, n, h, w) for its channel c (none past the last) and each of its pixels, the
// grid-stride loop included.
template <typename F>
__device__ __forceinline__ void for_each_tile_point(int64_t channels, int64_t N, int64_t H, int64_t W, F&& point) {
  const int64_t c = int64_t(blockIdx.x) * kTileC + threadIdx.x;
  if (c >= channels) return;
  const int64_t pixels = N * H * W;
  for (int64_t p = int64_t(blockIdx.y) * kTileP + threadIdx.y; p < pixels; p += int64_t(gridDim.y) * kTileP) {
    int64_t n, h, w;
    pixel_coords(p, H, W, n, h, w);
    point(c, n, h, w);
  }
}

template <typename T, typename A, int KH_, int KW_>
__global__ void __launch_bounds__(kTileC* kTileP) depthwise_fwd_kernel(
    const T* __restrict__ x, const T* __restrict__ wt, const T* __restrict__ bias, T* __restrict__ y, Shape s,
    Strides4 xs, Strides4 ws, Strides4 ys, ConvArgs a) {
  for_each_tile_point(s.C_out, s.N, s.OH, s.OW, [&](int64_t co, int64_t n, int64_t oh, int64_t ow) {
    const A acc = depthwise_fwd_point<T, A, KH_, KW_>(x, wt, bias, s, xs, ws, a, n, oh, ow, co);
    store(y + n * ys.n + co * ys.c + oh * ys.h + ow * ys.w, acc);
  });
}

// Along one axis of the input gradient (the transposed conv): tap(k, o) for each tap k of
// K_ (k_count where K_ is 0) and the output position o that reads input position i
// through it, i.e. where (i + pad - k * dil) / stride is a whole number o in [0, out).
template <int K_, typename F>
__host__ __device__ __forceinline__ void for_each_transposed_tap(int k_count, int64_t i, int pad, int stride, int dil,
                                                                 int64_t out, F&& tap) {
  const int K = K_ > 0 ? K_ : k_count;
VHIST_UNROLL
  for (int k = 0; k < K; ++k) {
    const int64_t t = i + pad - int64_t(k) * dil;
    if (t < 0 || t % stride != 0) continue;
    const int64_t o = t / stride;
    if (o >= out) continue;
    tap(k, o);
  }
}

// One input-gradient element dx[n, ih, iw, ci]: sums the multiplier's output channels over
// the taps that reach this pixel.
template <typename T, typename A, int KH_, int KW_>
__host__ __device__ __forceinline__ A depthwise_bwd_input_point(const T* __restrict__ dy, const T* __restrict__ wt,
                                                               const Shape& s, const Strides4& dys,
                                                               const Strides4& ws, const ConvArgs& a, int64_t n,
                                                               int64_t ih, int64_t iw, int64_t ci) {
  A acc = 0;
  for (int64_t m = 0; m < s.M; ++m) {
    const int64_t co = ci * s.M + m;
    const T* dyb = dy + n * dys.n + co * dys.c;
    const T* wb = wt + co * ws.n;
    for_each_transposed_tap<KH_>(a.KH, ih, a.ph, a.sh, a.dh, s.OH, [&](int kh, int64_t oh) {
      for_each_transposed_tap<KW_>(a.KW, iw, a.pw, a.sw, a.dw, s.OW, [&](int kw, int64_t ow) {
        acc += static_cast<A>(load_f(dyb + oh * dys.h + ow * dys.w)) *
               static_cast<A>(load_f(wb + kh * ws.h + kw * ws.w));
      });
    });
  }
  return acc;
}

// Same tiling as the forward, over (input channels, input pixels).
template <typename T, typename A, int KH_, int KW_>
__global__ void __launch_bounds__(kTileC* kTileP) depthwise_bwd_input_kernel(
    const T* __restrict__ dy, const T* __restrict__ wt, T* __restrict__ dx, Shape s, Strides4 dys, Strides4 ws,
    Strides4 dxs, ConvArgs a) {
  for_each_tile_point(s.C_in, s.N, s.H, s.W, [&](int64_t ci, int64_t n, int64_t ih, int64_t iw) {
    const A acc = depthwise_bwd_input_point<T, A, KH_, KW_>(dy, wt, s, dys, ws, a, n, ih, iw, ci);
    store(dx + n * dxs.n + ci * dxs.c + ih * dxs.h + iw * dxs.w, acc);
  });
}

// Weight gradient, stage 1: pixels outside, taps inside. Block = (kWgradChannels
// channels) x (kWgradLanes pixel lanes); grid = (channel blocks, chunks). Each lane walks
// every kWgradLanes-th pixel of the chunk, loads its dy once and accumulates the taps
// [tap0, tap0 + taps) of that pixel in registers (acc[t]; the x values of neighbouring
// taps and pixels come from L1). The lanes are then added in lane order through shared
// memory, and the block writes part[chunk][tap][co] (tap KH*KW is the bias: the sum of
// dy). The tap count is a template constant for 3x3, 5x5 and 7x7 (one group of taps);
// other sizes run groups of kWgradTapGroup taps, re-reading dy once per group.
constexpr int kWgradTapGroup = 16;

// One lane's sums for channel co over the pixels p_start + lane, p_start + lane +
// kWgradLanes, ... below p_end: acc[t] for tap tap0 + t (t < taps, taps <= MAX_TAPS),
// and bias the sum of dy. KW_: the kernel width if specialized, else 0.
template <typename T, typename A, int MAX_TAPS, int KW_>
__host__ __device__ __forceinline__ void depthwise_bwd_weight_lane(const T* __restrict__ dy, const T* __restrict__ x,
                                                                  const Shape& s, const Strides4& dys,
                                                                  const Strides4& xs, const ConvArgs& a, int64_t co,
                                                                  int tap0, int taps, int64_t p_start, int64_t p_end,
                                                                  int lane, A* acc, A& bias) {
  const int64_t ci = co / s.M;
  const int KW = KW_ > 0 ? KW_ : a.KW;  // a constant in the specialized sizes: (kh, kw) fold
VHIST_UNROLL
  for (int t = 0; t < MAX_TAPS; ++t) acc[t] = 0;
  A b = 0;
  for (int64_t p = p_start + lane; p < p_end; p += kWgradLanes) {
    int64_t n, oh, ow;
    pixel_coords(p, s.OH, s.OW, n, oh, ow);
    const A g = static_cast<A>(load_f(dy + n * dys.n + co * dys.c + oh * dys.h + ow * dys.w));
    b += g;
    const T* xb = x + n * xs.n + ci * xs.c;
VHIST_UNROLL
    for (int t = 0; t < MAX_TAPS; ++t) {
      if (t >= taps) break;
      const int kh = (tap0 + t) / KW, kw = (tap0 + t) - kh * KW;
      const int64_t ih = oh * a.sh - a.ph + int64_t(kh) * a.dh;
      const int64_t iw = ow * a.sw - a.pw + int64_t(kw) * a.dw;
      if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) acc[t] += g * static_cast<A>(load_f(xb + ih * xs.h + iw * xs.w));
    }
  }
  bias = b;
}

template <typename T, typename A, int KH_, int KW_>
__global__ void __launch_bounds__(kWgradChannels* kWgradLanes) depthwise_bwd_weight_reduce_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, A* __restrict__ part, Shape s, Strides4 dys, Strides4 xs,
    ConvArgs a, int64_t chunk_len, int has_bias) {
  constexpr int kMaxTaps = KH_ > 0 ? KH_ * KW_ : kWgradTapGroup;
  const int weight_taps = a.KH * a.KW;
  const int taps = weight_taps + (has_bias ? 1 : 0);
  __shared__ A lanes[kWgradLanes][kWgradChannels];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t co = int64_t(blockIdx.x) * kWgradChannels + tx;
  const bool c_ok = co < s.C_out;
  const int64_t chunk = blockIdx.y;
  const int64_t total = s.N * s.OH * s.OW;
  const int64_t p_start = chunk * chunk_len;
  const int64_t p_end = p_start + chunk_len < total ? p_start + chunk_len : total;
  A* out = part + chunk * taps * s.C_out + co;
  // Lane sums -> shared memory -> lane-order sum by the first lane row -> part.
  auto reduce_store = [&](A v, int tap) {
    lanes[ty][tx] = v;
    __syncthreads();
    if (ty == 0 && c_ok) {
      A sum = lanes[0][tx];
#pragma unroll
      for (int l = 1; l < kWgradLanes; ++l) sum += lanes[l][tx];
      out[tap * s.C_out] = sum;
    }
    __syncthreads();
  };
  for (int tap0 = 0; tap0 < weight_taps; tap0 += kMaxTaps) {
    const int group = weight_taps - tap0 < kMaxTaps ? weight_taps - tap0 : kMaxTaps;
    A acc[kMaxTaps];
    A bias = 0;
    if (c_ok) {
      depthwise_bwd_weight_lane<T, A, kMaxTaps, KW_>(dy, x, s, dys, xs, a, co, tap0, group, p_start, p_end, ty, acc,
                                                     bias);
    } else {
#pragma unroll
      for (int t = 0; t < kMaxTaps; ++t) acc[t] = 0;
    }
#pragma unroll
    for (int t = 0; t < kMaxTaps; ++t) {
      if (t < group) reduce_store(acc[t], tap0 + t);
    }
    if (has_bias && tap0 == 0) reduce_store(bias, weight_taps);
  }
}

// Weight gradient, stage 2: one thread per (tap, channel) sums the chunks in order.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) depthwise_bwd_weight_finalize_kernel(
    const A* __restrict__ part, T* __restrict__ dw, T* __restrict__ db, int64_t C_out, int64_t chunks, int KH, int KW,
    int has_bias, Strides4 ws) {
  const int64_t taps = int64_t(KH) * KW + (has_bias ? 1 : 0);
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= taps * C_out) return;
  A sum = 0;
  for (int64_t k = 0; k < chunks; ++k) sum += part[k * taps * C_out + j];
  const int64_t tap = j / C_out, co = j % C_out;
  if (tap < int64_t(KH) * KW) {
    store(dw + co * ws.n + (tap / KW) * ws.h + (tap % KW) * ws.w, sum);
  } else {
    store(db + co, sum);
  }
}

// (channel blocks, pixel blocks), the pixel blocks capped at the grid's y limit (the
// kernels loop over the rest).
dim3 tile_grid(int64_t channels, int64_t pixels) {
  const int64_t pixel_blocks = (pixels + kTileP - 1) / kTileP;
  return dim3(static_cast<unsigned>((channels + kTileC - 1) / kTileC),
              static_cast<unsigned>(pixel_blocks < 65535 ? pixel_blocks : 65535));
}

// Launches a tile kernel (the forward or the input gradient: for_each_tile_point's
// layout) over `channels` channels of `pixels` pixels.
template <typename Kernel, typename... Args>
void launch_tiles(Kernel kernel, int64_t channels, int64_t pixels, cudaStream_t stream, Args... args) {
  kernel<<<tile_grid(channels, pixels), dim3(kTileC, kTileP), 0, stream>>>(args...);
}

int grid_for(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(1) << 20;  // grid-stride loops cover the rest
  return static_cast<int>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

// Runs BODY with constexpr KH_, KW_: the specialized 3x3, 5x5, 7x7, else 0 (runtime sizes).
#define VHIST_DW_KERNEL_SIZE(KH, KW, ...)          \
  if ((KH) == 3 && (KW) == 3) {                    \
    constexpr int KH_ = 3, KW_ = 3;                \
    __VA_ARGS__;                                   \
  } else if ((KH) == 5 && (KW) == 5) {             \
    constexpr int KH_ = 5, KW_ = 5;                \
    __VA_ARGS__;                                   \
  } else if ((KH) == 7 && (KW) == 7) {             \
    constexpr int KH_ = 7, KW_ = 7;                \
    __VA_ARGS__;                                   \
  } else {                                         \
    constexpr int KH_ = 0, KW_ = 0;                \
    __VA_ARGS__;                                   \
  }

// Runs launch(T(), A(), KH_, KW_) for one kernel instance: the element type T and the
// accumulation type A of the dtype code, and the kernel size constants of
// VHIST_DW_KERNEL_SIZE for a's KH, KW (as std::integral_constant). Returns the launch's
// cudaError_t code. dtype codes: 0 float32, 1 float16, 2 bfloat16 (fp64 runs on the
// triton backend: it is only needed for gradchecks, and every extra dtype multiplies the
// instantiations).
template <typename F>
int with_instance(int dtype, const ConvArgs& a, F&& launch) {
  auto sized = [&](auto t, auto acc) {
    VHIST_DW_KERNEL_SIZE(a.KH, a.KW,
                         launch(t, acc, std::integral_constant<int, KH_>(), std::integral_constant<int, KW_>()));
  };
  switch (dtype) {
    case 0: sized(float(), float()); break;
    case 1: sized(__half(), float()); break;
    case 2: sized(__nv_bfloat16(), float()); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

Shape make_shape(const int64_t* sizes) {
  return Shape{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7]};
}
Strides4 make_strides(const int64_t* st) { return Strides4{st[0], st[1], st[2], st[3]}; }
ConvArgs make_conv(const int* conv) {
  return ConvArgs{conv[0], conv[1], conv[2], conv[3], conv[4], conv[5], conv[6], conv[7]};
}

}  // namespace

// sizes: {N, C_in, H, W, C_out, OH, OW, M}; *_strides: the tensors' four strides in
// elements, {n, c, h, w} (for a weight: {c_out, unused, kh, kw}; the binding passes it
// reordered to (KH*KW, C_out), i.e. {1, 0, KW*C_out, C_out}, so that a warp's loads of a
// tap's weights are one coalesced request);
// conv: {KH, KW, sh, sw, ph, pw, dh, dw} (ph, pw: top and left padding).
// Return 0 on success, else a cudaError_t code.
extern "C" int vhist_depthwise_fwd_launch(int dtype, const void* x, const void* w, const void* bias, void* y,
                                          const int64_t* sizes, const int64_t* x_strides, const int64_t* w_strides,
                                          const int64_t* y_strides, const int* conv, cudaStream_t stream) {
  const Shape s = make_shape(sizes);
  const ConvArgs a = make_conv(conv);
  return with_instance(dtype, a, [&](auto t, auto acc, auto kh, auto kw) {
    using T = decltype(t);
    launch_tiles(depthwise_fwd_kernel<T, decltype(acc), kh, kw>, s.C_out, s.N * s.OH * s.OW, stream,
                 static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias), static_cast<T*>(y), s,
                 make_strides(x_strides), make_strides(w_strides), make_strides(y_strides), a);
  });
}

extern "C" int vhist_depthwise_bwd_input_launch(int dtype, const void* dy, const void* w, void* dx,
                                                const int64_t* sizes, const int64_t* dy_strides,
                                                const int64_t* w_strides, const int64_t* dx_strides, const int* conv,
                                                cudaStream_t stream) {
  const Shape s = make_shape(sizes);
  const ConvArgs a = make_conv(conv);
  return with_instance(dtype, a, [&](auto t, auto acc, auto kh, auto kw) {
    using T = decltype(t);
    launch_tiles(depthwise_bwd_input_kernel<T, decltype(acc), kh, kw>, s.C_in, s.N * s.H * s.W, stream,
                 static_cast<const T*>(dy), static_cast<const T*>(w), static_cast<T*>(dx), s, make_strides(dy_strides),
                 make_strides(w_strides), make_strides(dx_strides), a);
  });
}

// part: workspace of chunks * (KH*KW + has_bias) * C_out accumulation-dtype elements
// (fp32, fp64 for fp64); chunk_len: output pixels per chunk (fixed by the caller from
// the shape, so the summation order never depends on the run).
extern "C" int vhist_depthwise_bwd_weight_launch(int dtype, const void* dy, const void* x, void* part, void* dw,
                                                 void* db, const int64_t* sizes, const int64_t* dy_strides,
                                                 const int64_t* x_strides, const int64_t* dw_strides,
                                                 const int* conv, int64_t chunk_len, int64_t chunks, int has_bias,
                                                 cudaStream_t stream) {
  const Shape s = make_shape(sizes);
  const ConvArgs a = make_conv(conv);
  const dim3 block(kWgradChannels, kWgradLanes);
  const dim3 grid(static_cast<unsigned>((s.C_out + kWgradChannels - 1) / kWgradChannels),
                  static_cast<unsigned>(chunks));
  const int64_t outputs = (int64_t(a.KH) * a.KW + (has_bias ? 1 : 0)) * s.C_out;
  return with_instance(dtype, a, [&](auto t, auto acc, auto kh, auto kw) {
    using T = decltype(t);
    using A = decltype(acc);
    depthwise_bwd_weight_reduce_kernel<T, A, kh, kw><<<grid, block, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<A*>(part), s, make_strides(dy_strides),
        make_strides(x_strides), a, chunk_len, has_bias);
    depthwise_bwd_weight_finalize_kernel<T, A><<<grid_for(outputs), kThreads, 0, stream>>>(
        static_cast<const A*>(part), static_cast<T*>(dw), static_cast<T*>(db), s.C_out, chunks, a.KH, a.KW, has_bias,
        make_strides(dw_strides));
  });
}
