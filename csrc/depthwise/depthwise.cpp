// Torch binding of the depthwise conv2d CUDA kernels: checks the tensors, allocates the
// outputs (in the input's memory format) and the weight-gradient workspace, and launches
// the extern "C" launchers of depthwise_kernel.cu on the current stream. Built
// just-in-time by vhist/ops/_cuda_ext.py; exposed as the cuda backend of
// vhist.ops.depthwise_conv2d (custom ops vhist::depthwise_conv2d_cuda_fwd / _bwd_input /
// _bwd_weight). Argument validation with clear messages happens in Python before this.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <vector>

extern "C" int vhist_depthwise_fwd_launch(int dtype, const void* x, const void* w, const void* bias, void* y,
                                          const int64_t* sizes, const int64_t* x_strides, const int64_t* w_strides,
                                          const int64_t* y_strides, const int* conv, cudaStream_t stream);
extern "C" int vhist_depthwise_bwd_input_launch(int dtype, const void* dy, const void* w, void* dx,
                                                const int64_t* sizes, const int64_t* dy_strides,
                                                const int64_t* w_strides, const int64_t* dx_strides, const int* conv,
                                                cudaStream_t stream);
extern "C" int vhist_depthwise_bwd_weight_launch(int dtype, const void* dy, const void* x, void* part, void* dw,
                                                 void* db, const int64_t* sizes, const int64_t* dy_strides,
                                                 const int64_t* x_strides, const int64_t* dw_strides,
                                                 const int* conv, int64_t chunk_len, int64_t chunks, int has_bias,
                                                 cudaStream_t stream);

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), "depthwise_conv2d: " #x " must be a CUDA tensor")
#define CHECK_4D(x) TORCH_CHECK((x).dim() == 4, "depthwise_conv2d: " #x " must be 4-D")
#define CHECK_INPUT(x) \
  CHECK_CUDA(x);       \
  CHECK_4D(x)

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "depthwise_conv2d: the cuda kernels take float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

struct Conv {
  std::vector<int64_t> sizes;  // N, C_in, H, W, C_out, OH, OW, M
  std::vector<int> args;       // KH, KW, sh, sw, ph, pw, dh, dw
};

// stride (sh, sw), padding (top, bottom, left, right), dilation (dh, dw), as the Python
// geometry (vhist.ops.depthwise.DepthwiseGeometry).
Conv make_conv(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input_size.size() == 4 && weight_size.size() == 4, "depthwise_conv2d: 4-D input and weight expected");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2,
              "depthwise_conv2d: stride (2), padding (4) and dilation (2) expected");
  const int64_t n = input_size[0], c_in = input_size[1], h = input_size[2], w = input_size[3];
  const int64_t c_out = weight_size[0], kh = weight_size[2], kw = weight_size[3];
  TORCH_CHECK(weight_size[1] == 1 && c_in > 0 && c_out % c_in == 0, "depthwise_conv2d: weight ", weight_size,
              " is not depthwise for ", c_in, " input channels");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1,
              "depthwise_conv2d: stride and dilation must be >= 1");
  const int64_t oh = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t ow = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(oh >= 1 && ow >= 1, "depthwise_conv2d: empty output");
  // The kernels split a pixel index into (n, h, w) with 32-bit divisions.
  TORCH_CHECK(n * h * w < (int64_t(1) << 32) && n * oh * ow < (int64_t(1) << 32),
              "depthwise_conv2d: the cuda kernels take at most 2^32 - 1 pixels (N*H*W)");
  return Conv{{n, c_in, h, w, c_out, oh, ow, c_out / c_in},
              {static_cast<int>(kh), static_cast<int>(kw), static_cast<int>(stride[0]), static_cast<int>(stride[1]),
               static_cast<int>(padding[0]), static_cast<int>(padding[2]), static_cast<int>(dilation[0]),
               static_cast<int>(dilation[1])}};
}

at::MemoryFormat format_of(const at::Tensor& x) {
  return (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous;
}

// The weight (C_out, 1, KH, KW) reordered once per call to (KH*KW, C_out), channels
// innermost, and the {c_out, unused, kh, kw} strides the kernels index it with: the
// threads of a warp own consecutive channels, so their weight loads become one
// coalesced 128-byte request per tap instead of 32 loads KH*KW elements apart.
struct TapMajorWeight {
  at::Tensor w;
  std::vector<int64_t> strides;
};

TapMajorWeight tap_major(const at::Tensor& weight) {
  const int64_t c_out = weight.size(0), kw = weight.size(3);
  return {weight.permute({2, 3, 0, 1}).contiguous(), {1, 0, kw * c_out, c_out}};
}

void check_launch(int err) {
  TORCH_CHECK(err == 0, "depthwise_conv2d: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor dw_fwd(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  CHECK_INPUT(input);
  CHECK_INPUT(weight);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "depthwise_conv2d: input and weight dtypes differ");
  const Conv c = make_conv(input.sizes(), weight.sizes(), stride, padding, dilation);
  if (bias.has_value()) {
    CHECK_CUDA(*bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c.sizes[4] && bias->is_contiguous(),
                "depthwise_conv2d: bias must be a contiguous (C_out,) tensor");
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "depthwise_conv2d: bias dtype differs from input's");
  }
  const c10::cuda::CUDAGuard guard(input.device());
  auto y = at::empty({c.sizes[0], c.sizes[4], c.sizes[5], c.sizes[6]}, input.options().memory_format(format_of(input)));
  const TapMajorWeight w = tap_major(weight);
  check_launch(vhist_depthwise_fwd_launch(dtype_code(input), input.data_ptr(), w.w.data_ptr(),
                                          bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), c.sizes.data(),
                                          input.strides().data(), w.strides.data(), y.strides().data(),
                                          c.args.data(), c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor dw_bwd_input(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                        bool channels_last, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  CHECK_INPUT(grad_output);
  CHECK_INPUT(weight);
  TORCH_CHECK(grad_output.scalar_type() == weight.scalar_type(), "depthwise_conv2d: grad_output dtype differs");
  const Conv c = make_conv(input_size, weight.sizes(), stride, padding, dilation);
  TORCH_CHECK(grad_output.size(0) == c.sizes[0] && grad_output.size(1) == c.sizes[4] &&
                  grad_output.size(2) == c.sizes[5] && grad_output.size(3) == c.sizes[6],
              "depthwise_conv2d: grad_output has the wrong shape");
  const c10::cuda::CUDAGuard guard(weight.device());
  auto dx = at::empty(input_size, weight.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous));
  const TapMajorWeight w = tap_major(weight);
  check_launch(vhist_depthwise_bwd_input_launch(dtype_code(weight), grad_output.data_ptr(), w.w.data_ptr(),
                                                dx.data_ptr(), c.sizes.data(), grad_output.strides().data(),
                                                w.strides.data(), dx.strides().data(), c.args.data(),
                                                c10::cuda::getCurrentCUDAStream()));
  return dx;
}

std::vector<at::Tensor> dw_bwd_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                      at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, bool has_bias, int64_t chunk_len, int64_t chunks) {
  CHECK_INPUT(grad_output);
  CHECK_INPUT(input);
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "depthwise_conv2d: grad_output dtype differs");
  const Conv c = make_conv(input.sizes(), weight_size, stride, padding, dilation);
  TORCH_CHECK(grad_output.size(0) == c.sizes[0] && grad_output.size(1) == c.sizes[4] &&
                  grad_output.size(2) == c.sizes[5] && grad_output.size(3) == c.sizes[6],
              "depthwise_conv2d: grad_output has the wrong shape");
  TORCH_CHECK(chunk_len >= 1 && chunks >= 1 && chunk_len * chunks >= c.sizes[0] * c.sizes[5] * c.sizes[6],
              "depthwise_conv2d: the chunks must cover N*OH*OW");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = at::kFloat;
  const int64_t taps = weight_size[2] * weight_size[3] + (has_bias ? 1 : 0);
  auto part = at::empty({chunks, taps, c.sizes[4]}, input.options().dtype(acc));
  auto dw = at::empty(weight_size, input.options());
  auto db = at::empty({has_bias ? c.sizes[4] : 0}, input.options());
  check_launch(vhist_depthwise_bwd_weight_launch(
      dtype_code(input), grad_output.data_ptr(), input.data_ptr(), part.data_ptr(), dw.data_ptr(),
      has_bias ? db.data_ptr() : nullptr, c.sizes.data(), grad_output.strides().data(), input.strides().data(),
      dw.strides().data(), c.args.data(), chunk_len, chunks, has_bias ? 1 : 0, c10::cuda::getCurrentCUDAStream()));
  return {dw, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vhist depthwise conv2d CUDA kernels";
  m.def("fwd", &dw_fwd, "depthwise conv2d forward (CUDA)", py::arg("input"), py::arg("weight"), py::arg("bias"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"));
  m.def("bwd_input", &dw_bwd_input, "depthwise conv2d input gradient (CUDA)", py::arg("grad_output"),
        py::arg("weight"), py::arg("input_size"), py::arg("channels_last"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"));
  m.def("bwd_weight", &dw_bwd_weight, "depthwise conv2d weight and bias gradients (CUDA, deterministic)",
        py::arg("grad_output"), py::arg("input"), py::arg("weight_size"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("has_bias"), py::arg("chunk_len"), py::arg("chunks"));
}
