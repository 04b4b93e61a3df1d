// Torch binding of the Local Response Normalization CUDA kernels: checks the tensors,
// allocates the outputs in the input's memory format, works out the (N, C, S) view and
// launches the extern "C" launchers of local_response_norm_kernel.cu on the current
// stream. Built just-in-time by vhist/ops/_cuda_ext.py; exposed as the cuda backend of
// vhist.ops.local_response_norm (custom ops vhist::local_response_norm_cuda_fwd/_bwd).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

extern "C" int vhist_lrn_fwd_launch(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t S,
                                    int64_t stride_n, int64_t stride_c, int64_t stride_s, int size, double alpha,
                                    double beta, double k, cudaStream_t stream);
extern "C" int vhist_lrn_bwd_launch(int dtype, const void* x, const void* dy, void* dx, int64_t N, int64_t C,
                                    int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s, int size,
                                    double alpha, double beta, double k, cudaStream_t stream);

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define CHECK_DENSE(x) \
  TORCH_CHECK((x).is_contiguous() || channels_last_dense(x), #x " must be contiguous or channels-last dense")
#define CHECK_INPUT(x) \
  CHECK_CUDA(x);       \
  CHECK_DENSE(x)

namespace {

// Dense with channels innermost: (N, *spatial, C) in memory, for any rank.
bool channels_last_dense(const at::Tensor& x) {
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "local_response_norm: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

struct Geometry {
  int64_t n, c, s, stride_n, stride_c, stride_s;
};

// The (N, C, S) view; with channels innermost (channels-last, or S == 1) N folds into
// S. Must match vhist.ops.local_response_norm.lrn_geometry.
Geometry geometry(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), s = x.numel() / (n * c);
  if (s == 1 || !x.is_contiguous()) return {1, c, n * s, 0, 1, c};
  return {n, c, s, c * s, s, 1};
}

// Channels a block's tile holds at most (vhist.ops.local_response_norm.MAX_CHANNELS).
constexpr int64_t kMaxChannels = 4096;

void check_args(const at::Tensor& x, int64_t size) {
  CHECK_INPUT(x);
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, "local_response_norm: expected a 3-D to 5-D input, got ", x.dim(), "-D");
  TORCH_CHECK(size >= 1, "local_response_norm: size must be >= 1, got ", size);
  TORCH_CHECK(x.size(1) <= kMaxChannels, "local_response_norm: the cuda kernels take at most ", kMaxChannels,
              " channels, got ", x.size(1));
  TORCH_CHECK(x.numel() > 0, "local_response_norm: empty input");
}

void check_launch(int err) {
  TORCH_CHECK(err == 0, "local_response_norm: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor lrn_fwd(const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  check_args(x, size);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  const Geometry g = geometry(x);
  check_launch(vhist_lrn_fwd_launch(dtype_code(x), x.data_ptr(), y.data_ptr(), g.n, g.c, g.s, g.stride_n, g.stride_c,
                                    g.stride_s, static_cast<int>(size), alpha, beta, k,
                                    c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor lrn_bwd(const at::Tensor& dy, const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  check_args(x, size);
  CHECK_INPUT(dy);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.strides() == x.strides(),
              "local_response_norm: grad_output must have the input's shape and strides");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "local_response_norm: grad_output dtype differs from input's");
  TORCH_CHECK(dy.device() == x.device(), "local_response_norm: grad_output and input on different devices");
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  const Geometry g = geometry(x);
  check_launch(vhist_lrn_bwd_launch(dtype_code(x), x.data_ptr(), dy.data_ptr(), dx.data_ptr(), g.n, g.c, g.s,
                                    g.stride_n, g.stride_c, g.stride_s, static_cast<int>(size), alpha, beta, k,
                                    c10::cuda::getCurrentCUDAStream()));
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vhist Local Response Normalization CUDA kernels";
  m.def("fwd", &lrn_fwd, "LRN forward (CUDA)", py::arg("input"), py::arg("size"), py::arg("alpha"),
        py::arg("beta"), py::arg("k"));
  m.def("bwd", &lrn_bwd, "LRN input gradient (CUDA)", py::arg("grad_output"), py::arg("input"), py::arg("size"),
        py::arg("alpha"), py::arg("beta"), py::arg("k"));
}
