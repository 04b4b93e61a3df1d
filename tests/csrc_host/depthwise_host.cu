// Host entry points for the per-thread code of the depthwise CUDA kernels, so that
// tests/test_depthwise_cuda_host.py checks their numerics on a machine without a GPU.
// Built with nvcc as a shared library and called through ctypes; the loops below play
// the role of the kernels' threads and blocks (the weight gradient's lanes, lane-order
// block sum and chunk-order finalize included). fp32 only.
#include "../../csrc/depthwise/depthwise_kernel.cu"

#include <vector>

// The forward and input-gradient tile kernels' threads (kInputGrad selects the kernel):
// out[n, c, h, w] = the kernel's point function at (n, h, w, c) for every pixel of the
// output grid (the input grid for the input gradient) and every channel c. src is x or
// dy; the input gradient has no bias.
template <bool kInputGrad>
int host_tiles(const float* src, const float* wt, const float* bias, float* out, const int64_t* sizes,
               const int64_t* src_strides, const int64_t* w_strides, const int64_t* out_strides, const int* conv) {
  const Shape s = make_shape(sizes);
  const ConvArgs a = make_conv(conv);
  const Strides4 ss = make_strides(src_strides), ws = make_strides(w_strides), os = make_strides(out_strides);
  const int64_t H = kInputGrad ? s.H : s.OH, W = kInputGrad ? s.W : s.OW, C = kInputGrad ? s.C_in : s.C_out;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) {
          float v;
          if constexpr (kInputGrad) {
            VHIST_DW_KERNEL_SIZE(a.KH, a.KW,
                                 v = (depthwise_bwd_input_point<float, float, KH_, KW_>(src, wt, s, ss, ws, a, n, h, w,
                                                                                        c)));
          } else {
            VHIST_DW_KERNEL_SIZE(a.KH, a.KW,
                                 v = (depthwise_fwd_point<float, float, KH_, KW_>(src, wt, bias, s, ss, ws, a, n, h, w,
                                                                                  c)));
          }
          out[n * os.n + c * os.c + h * os.h + w * os.w] = v;
        }
  return 0;
}

extern "C" int vhist_depthwise_fwd_host(const float* x, const float* w, const float* bias, float* y,
                                        const int64_t* sizes, const int64_t* x_strides, const int64_t* w_strides,
                                        const int64_t* y_strides, const int* conv) {
  return host_tiles<false>(x, w, bias, y, sizes, x_strides, w_strides, y_strides, conv);
}

extern "C" int vhist_depthwise_bwd_input_host(const float* dy, const float* w, float* dx, const int64_t* sizes,
                                              const int64_t* dy_strides, const int64_t* w_strides,
                                              const int64_t* dx_strides, const int* conv) {
  return host_tiles<true>(dy, w, nullptr, dx, sizes, dy_strides, w_strides, dx_strides, conv);
}

// The weight gradient as the reduce kernel's blocks compute it: each (channel, lane)
// thread's tap sums over its pixels, added in lane order, then the chunks in order (the
// finalize kernel). Taps run in the groups the kernel uses: all at once for 3x3, 5x5 and
// 7x7, kWgradTapGroup at a time otherwise.
template <int KH_, int KW_>
void host_bwd_weight(const float* dy, const float* x, float* dw, float* db, const Shape& s, const Strides4& dys,
                     const Strides4& xs, const Strides4& ws, const ConvArgs& a, int64_t chunk_len, int64_t chunks,
                     int has_bias) {
  constexpr int kMaxTaps = KH_ > 0 ? KH_ * KW_ : kWgradTapGroup;
  const int weight_taps = a.KH * a.KW;
  const int64_t total = s.N * s.OH * s.OW;
  std::vector<float> sums((weight_taps + 1) * s.C_out, 0.0f);  // stage 2: chunks in order
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t p_start = chunk * chunk_len;
    const int64_t p_end = p_start + chunk_len < total ? p_start + chunk_len : total;
    for (int64_t co = 0; co < s.C_out; ++co)
      for (int tap0 = 0; tap0 < weight_taps; tap0 += kMaxTaps) {
        const int group = weight_taps - tap0 < kMaxTaps ? weight_taps - tap0 : kMaxTaps;
        float block[kMaxTaps + 1];  // stage 1: lanes in order
        for (int lane = 0; lane < kWgradLanes; ++lane) {
          float acc[kMaxTaps], bias = 0;
          depthwise_bwd_weight_lane<float, float, kMaxTaps, KW_>(dy, x, s, dys, xs, a, co, tap0, group, p_start,
                                                                  p_end, lane, acc, bias);
          for (int t = 0; t < group; ++t) block[t] = lane == 0 ? acc[t] : block[t] + acc[t];
          block[kMaxTaps] = lane == 0 ? bias : block[kMaxTaps] + bias;
        }
        for (int t = 0; t < group; ++t) sums[(tap0 + t) * s.C_out + co] += block[t];
        if (has_bias && tap0 == 0) sums[weight_taps * s.C_out + co] += block[kMaxTaps];
      }
  }
  for (int64_t co = 0; co < s.C_out; ++co) {
    for (int tap = 0; tap < weight_taps; ++tap)
      dw[co * ws.n + (tap / a.KW) * ws.h + (tap % a.KW) * ws.w] = sums[tap * s.C_out + co];
    if (has_bias) db[co] = sums[weight_taps * s.C_out + co];
  }
}

extern "C" int vhist_depthwise_bwd_weight_host(const float* dy, const float* x, float* dw, float* db,
                                               const int64_t* sizes, const int64_t* dy_strides,
                                               const int64_t* x_strides, const int64_t* dw_strides, const int* conv,
                                               int64_t chunk_len, int64_t chunks, int has_bias) {
  const Shape s = make_shape(sizes);
  const ConvArgs a = make_conv(conv);
  const Strides4 dys = make_strides(dy_strides), xs = make_strides(x_strides), ws = make_strides(dw_strides);
  VHIST_DW_KERNEL_SIZE(a.KH, a.KW,
                       (host_bwd_weight<KH_, KW_>(dy, x, dw, db, s, dys, xs, ws, a, chunk_len, chunks, has_bias)));
  return 0;
}
