// Op schemas (defined once; CPU and CUDA implementations register separately) and the Python
// module with the code-path helpers.
#include "binary_conv.h"

#include <torch/extension.h>

#include <algorithm>
#include <atomic>

namespace bireal {

namespace {
const std::vector<std::string> kCudaPaths{"bmma",       "simt",       "bmma_async",  "bmma_lean",  "bmma_lean1",
                                          "bmma_split", "bmma_halo", "bmma_halo_w", "bmma_halo_p"};
std::atomic<int> g_cuda_path{0};
std::atomic<bool> g_debug_fill{false};
std::atomic<bool> g_programmatic_launch{false};
std::atomic<int> g_persistent_blocks{0};
}  // namespace

bool debug_fill() { return g_debug_fill.load(); }
void set_debug_fill(bool on) { g_debug_fill.store(on); }
bool programmatic_launch() { return g_programmatic_launch.load(); }
void set_programmatic_launch(bool on) { g_programmatic_launch.store(on); }

int persistent_blocks() { return g_persistent_blocks.load(); }
void set_persistent_blocks(int blocks) {
  TORCH_CHECK(blocks >= 0, "set_persistent_blocks: blocks must be >= 0 (0: as many as fit), got ", blocks);
  g_persistent_blocks.store(blocks);
}

void fill_if_debugging(at::Tensor& t) {
  // A byte view of the freshly allocated (contiguous) output; fill_ runs on its device's current
  // stream, so this stays legal inside a CUDA graph capture.
  if (debug_fill() && t.numel() > 0) t.view({-1}).view(at::kByte).fill_(0xFF);
}

at::ScalarType conv_out_dtype(const std::optional<at::ScalarType>& out_dtype) {
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "binary_conv2d: out_dtype must be torch.float32 or torch.bfloat16, got ", dtype);
  return dtype;
}

std::vector<std::string> cuda_paths() { return kCudaPaths; }
std::string cuda_path() { return kCudaPaths[g_cuda_path.load()]; }
void set_cuda_path(const std::string& name) {
  if (name == "auto") return g_cuda_path.store(0);
  for (size_t i = 0; i < kCudaPaths.size(); ++i)
    if (name == kCudaPaths[i]) return g_cuda_path.store(static_cast<int>(i));
  std::string allowed = "auto";
  for (const std::string& path : kCudaPaths) allowed += ", " + path;
  TORCH_CHECK(false, "set_cuda_path: unknown path '", name, "' (", allowed, ")");
}

SplitPlan split_k_plan(int64_t blocks, int steps, int sms) {
  TORCH_CHECK(blocks > 0 && steps > 0 && sms > 0, "split_k_plan: blocks, steps and sms must be positive, got ",
              blocks, ", ", steps, ", ", sms);
  const int64_t fill = sms / blocks;  // splits that bring the blocks to about one per multiprocessor
  const int wanted = static_cast<int>(std::min<int64_t>({fill, kMaxSplits, steps}));
  if (wanted <= 1) return {1, steps};
  // The longest split sets the time: with ceil(steps / wanted) steps each, as few splits as give that.
  const int steps_per_split = (steps + wanted - 1) / wanted;
  return {(steps + steps_per_split - 1) / steps_per_split, steps_per_split};
}

void check_pack_args(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "pack_signs: x must be (N, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "pack_signs: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, "pack_signs: x has no channels");
}

ConvGeometry check_conv_args(const at::Tensor& packed_x, const at::Tensor& packed_w,
                             int64_t in_channels, int64_t stride, int64_t padding, double pad_value,
                             const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(packed_x.dtype() == at::kLong && packed_x.dim() == 4,
              "binary_conv2d: packed_x must be an int64 tensor (N, H, W, C/64), got ",
              packed_x.dtype(), " with ", packed_x.dim(), " dims");
  TORCH_CHECK(packed_w.dtype() == at::kLong && packed_w.dim() == 4,
              "binary_conv2d: packed_w must be an int64 tensor (O, KH, KW, C/64), got ",
              packed_w.dtype(), " with ", packed_w.dim(), " dims");
  TORCH_CHECK(packed_x.device() == packed_w.device(), "binary_conv2d: packed_x on ",
              packed_x.device(), " but packed_w on ", packed_w.device());
  ConvGeometry g{packed_x.size(0), packed_x.size(1), packed_x.size(2), packed_x.size(3),
                 packed_w.size(0), packed_w.size(1), packed_w.size(2), 0, 0};
  TORCH_CHECK(in_channels > 0 && words_for(in_channels) == g.Cw,
              "binary_conv2d: in_channels=", in_channels, " needs ", words_for(in_channels),
              " words per pixel, packed_x has ", g.Cw);
  TORCH_CHECK(packed_w.size(3) == g.Cw, "binary_conv2d: packed_w has ", packed_w.size(3),
              " words per tap, packed_x has ", g.Cw);
  TORCH_CHECK(stride >= 1 && padding >= 0, "binary_conv2d: stride must be >= 1 and padding >= 0");
  TORCH_CHECK(pad_value == 0.0 || pad_value == 1.0 || pad_value == -1.0,
              "binary_conv2d: pad_value must be 0, 1 or -1, got ", pad_value);
  g.Ho = (g.H + 2 * padding - g.KH) / stride + 1;
  g.Wo = (g.W + 2 * padding - g.KW) / stride + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "binary_conv2d: empty output for input ", g.H, "x", g.W);
  for (const auto* t : {&scale, &bias}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->dtype() == at::kFloat && (*t)->dim() == 1 && (*t)->size(0) == g.O,
                  "binary_conv2d: scale and bias must be float32 vectors of length O=", g.O);
      TORCH_CHECK((*t)->device() == packed_x.device(), "binary_conv2d: scale/bias on another device");
    }
  }
  if (residual.has_value()) {
    const auto& r = *residual;
    TORCH_CHECK((r.dtype() == at::kFloat || r.dtype() == at::kBFloat16) && r.dim() == 4 &&
                    r.size(0) == g.N && r.size(1) == g.O && r.size(2) == g.Ho && r.size(3) == g.Wo,
                "binary_conv2d: residual must be float32 or bfloat16 (N, O, Ho, Wo) = (", g.N, ", ", g.O, ", ",
                g.Ho, ", ", g.Wo, "), got ", r.sizes());
    TORCH_CHECK(r.device() == packed_x.device(), "binary_conv2d: residual on another device");
  }
  return g;
}

}  // namespace bireal

TORCH_LIBRARY(bireal, m) {
  // x (N, C, H, W) real -> (N, H, W, ceil(C/64)) int64 sign bits, channels packed LSB first.
  m.def("pack_signs(Tensor x) -> Tensor");
  // out (N, O, Ho, Wo) in channels_last memory, float32 (or bfloat16 with out_dtype):
  //   dot = sum over taps and channels of (+-1 input) * (+-1 weight), border = pad_value
  //   out = dot * scale[o] + bias[o] + residual      (each term optional, computed in float32;
  //                                                   bfloat16 rounds the result once, to nearest even)
  // border_classes: border_classes(packed_w, in_channels, padding) of these weights (cuda_ext.ops),
  //   made once for weights that do not change (a packed model's); the bmma_lean and bmma_halo
  //   paths then skip making it per call. Every other path ignores it.
  m.def(
      "binary_conv2d(Tensor packed_x, Tensor packed_w, int in_channels, int stride, int padding, "
      "float pad_value, Tensor? scale, Tensor? bias, Tensor? residual, ScalarType? out_dtype=None, "
      "Tensor? border_classes=None) -> Tensor");
  // The fused Bi-Real block: binary_conv2d, and the signs of its output packed for the next block.
  //   (out, pack_signs(out)), out as binary_conv2d returns it
  m.def(
      "binary_block(Tensor packed_x, Tensor packed_w, int in_channels, int stride, int padding, "
      "float pad_value, Tensor? scale, Tensor? bias, Tensor? residual, ScalarType? out_dtype=None, "
      "Tensor? border_classes=None) -> (Tensor, Tensor)");
  // The ImageNet stem's max-pool with the first block's packed input: (out, pack_signs(out)),
  //   out = max_pool2d(x, kernel_size, stride, padding) + bias (per channel, after the max: the stem
  //   conv's bias, so cuDNN's separate bias pass goes), in channels_last memory (dilation 1, floor mode).
  m.def(
      "max_pool_signs(Tensor x, int kernel_size, int stride, int padding, Tensor? bias=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bireal, CPU, m) {
  m.impl("pack_signs", &bireal::pack_signs_cpu);
  m.impl("binary_conv2d", &bireal::binary_conv2d_cpu);
  m.impl("binary_block", &bireal::binary_block_cpu);
  m.impl("max_pool_signs", &bireal::max_pool_signs_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_paths", &bireal::cpu_paths, "CPU code paths this CPU can run, fastest first");
  m.def("cpu_path", &bireal::cpu_path, "the CPU code path in use");
  m.def("set_cpu_path", &bireal::set_cpu_path, "force a CPU code path ('auto' restores the fastest)");
  m.def("cpu_micro_kernel_rate", &bireal::cpu_micro_kernel_rate,
        "binary MACs/s of the CPU micro-kernel on one thread, data in L1 (words per pixel, seconds)");
  m.def("cuda_paths", &bireal::cuda_paths, "CUDA code paths, fastest first");
  m.def("cuda_path", &bireal::cuda_path, "the CUDA code path in use");
  m.def("set_cuda_path", &bireal::set_cuda_path, "force a CUDA code path ('auto' restores bmma)");
  m.def(
      "split_k_plan",
      [](int64_t blocks, int steps, int sms) {
        const bireal::SplitPlan plan = bireal::split_k_plan(blocks, steps, sms);
        return std::make_pair(plan.splits, plan.steps_per_split);
      },
      "bmma_split's split of a conv's k-steps (blocks of its grid, k-steps of 256 bits, the device's "
      "multiprocessors): (splits, steps_per_split)");
  m.def("debug_fill", &bireal::debug_fill, "whether outputs are pre-filled with 0xFF bytes");
  m.def("programmatic_launch", &bireal::programmatic_launch,
        "whether the lean and halo CUDA kernels use programmatic dependent launch (sm_90+)");
  m.def("set_programmatic_launch", &bireal::set_programmatic_launch,
        "launch the lean and halo CUDA kernels with programmatic dependent launch (sm_90+)");
  m.def("persistent_blocks", &bireal::persistent_blocks,
        "the most blocks bmma_halo_p launches (0: as many as fit on the device at once)");
  m.def("set_persistent_blocks", &bireal::set_persistent_blocks,
        "launch bmma_halo_p with at most this many blocks (0: as many as fit); tests make every block loop");
  m.def("set_debug_fill", &bireal::set_debug_fill,
        "pre-fill every op output with 0xFF bytes (NaN floats, bad packed tails) before the kernels run");
#ifdef BIREAL_WITH_CUDA
  m.def("cuda_built", [] { return true; }, "whether the CUDA kernels were compiled in");
#else
  m.def("cuda_built", [] { return false; }, "whether the CUDA kernels were compiled in");
#endif
}
