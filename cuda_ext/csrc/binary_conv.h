// Shared declarations of the bireal binary-conv ops (format: docs/packed_format.md).
//
// Packed activations: int64 tensor (N, H, W, Cw), Cw = ceil(C / 64). Bit j (LSB = 0) of word k holds
// the sign of channel 64k + j: 1 = +1 (x >= 0, so sign(0) = +1), 0 = -1. Tail bits past C are 0.
// Packed weights: int64 tensor (O, KH, KW, Cw), same bit order.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace bireal {

constexpr int64_t kWordBits = 64;

inline int64_t words_for(int64_t channels) { return (channels + kWordBits - 1) / kWordBits; }

// Mask of the valid bits of word k when the packed tensor holds `channels` channels.
inline uint64_t valid_bits(int64_t k, int64_t channels) {
  const int64_t rem = channels - k * kWordBits;
  return rem >= kWordBits ? ~uint64_t(0) : ((uint64_t(1) << rem) - 1);
}

// CPU code paths, chosen at run time from what the CPU supports (or forced for testing).
std::vector<std::string> cpu_paths();
std::string cpu_path();
void set_cpu_path(const std::string& name);
double cpu_micro_kernel_rate(int64_t words, double seconds);

// CUDA code paths: "bmma" (1-bit tensor cores, sm_80+, the default), "simt" (CUDA-core popcount, a
// cross-check), "bmma_async" (bmma with the operand tiles staged through shared memory by
// cp.async, double buffered), "bmma_lean" (bmma's main loop with an epilogue compiled for the
// call's options, binary_conv_lean.cu; "bmma_lean1" with one MMA per k-step; "bmma_split" with
// its k-steps split over a cluster of blocks where a layer has few tiles, binary_conv_split.cu) and
// "bmma_halo" (that epilogue, the input read from a halo in shared memory, binary_conv_halo.cu;
// "bmma_halo_w" with the weights there too, "bmma_halo_p" with persistent blocks that copy the next
// tile's halo and residuals in while they compute one); the last seven are variants under test.
std::vector<std::string> cuda_paths();
std::string cuda_path();
void set_cuda_path(const std::string& name);

// Split-K for bmma_split: a conv whose grid has `blocks` blocks of 128 pixels x 64 channels, each
// summing `steps` k-steps of 256 bits, on a device with `sms` multiprocessors, runs `splits` blocks
// per tile (a cluster, sm_90+), each summing `steps_per_split` consecutive k-steps (the last one
// what remains, never none), so that about one block per multiprocessor runs: batch 1's 7 x 7 and
// 14 x 14 layers have 8 tiles for 132 SMs, and 18 or 9 k-steps each. splits is 1 where the tiles
// alone fill the device, and at most kMaxSplits (the portable cluster size).
constexpr int kMaxSplits = 8;
struct SplitPlan {
  int splits, steps_per_split;
};
SplitPlan split_k_plan(int64_t blocks, int steps, int sms);

// Debug switch: when on, every op fills its freshly allocated outputs with 0xFF bytes before the
// kernels run (NaN floats, packed words that break the zero-tail rule), so that an element a kernel
// never writes cannot pass a test by inheriting a correct value from earlier memory.
bool debug_fill();
void set_debug_fill(bool on);
void fill_if_debugging(at::Tensor& t);

// Programmatic dependent launch (sm_90 and newer; off by default until a GPU run measures it): the
// lean and halo kernels are launched so that they may start while the kernel before them in the
// stream finishes (they wait for it before reading anything), and they let the next one start
// once their main loop is done. Hides the launch gaps of a batch-1 forward's ~20 kernels.
bool programmatic_launch();
void set_programmatic_launch(bool on);

// bmma_halo_p's grid: at most this many persistent blocks (0, the default: as many as fit on the
// device at once). A smaller grid makes every block loop over many work items on a small conv, which
// is how the tests and the sanitizers reach its prefetching loop.
int persistent_blocks();
void set_persistent_blocks(int blocks);

// The output dtype of binary_conv2d / binary_block: float32 (default) or bfloat16.
at::ScalarType conv_out_dtype(const std::optional<at::ScalarType>& out_dtype);

at::Tensor pack_signs_cpu(const at::Tensor& x);
at::Tensor binary_conv2d_cpu(const at::Tensor& packed_x, const at::Tensor& packed_w,
                             int64_t in_channels, int64_t stride, int64_t padding, double pad_value,
                             const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual,
                             std::optional<at::ScalarType> out_dtype,
                             const std::optional<at::Tensor>& border_classes);
std::tuple<at::Tensor, at::Tensor> binary_block_cpu(
    const at::Tensor& packed_x, const at::Tensor& packed_w, int64_t in_channels, int64_t stride,
    int64_t padding, double pad_value, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    std::optional<at::ScalarType> out_dtype, const std::optional<at::Tensor>& border_classes);

// max_pool2d (kernel_size, stride, padding; dilation 1, floor mode) of x (N, C, H, W) + bias (C,)
// per channel if given, and the packed signs of that output: (out channels_last, pack_signs(out)).
// The bias is added after the max, once per output (max(x) + b == max(x + b) in floating point:
// rounding is monotonic), so a conv's bias moves here from its own elementwise pass.
std::tuple<at::Tensor, at::Tensor> max_pool_signs_cpu(const at::Tensor& x, int64_t kernel_size, int64_t stride,
                                                      int64_t padding, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> max_pool_signs_cuda(const at::Tensor& x, int64_t kernel_size, int64_t stride,
                                                       int64_t padding, const std::optional<at::Tensor>& bias);

// Shape and argument checks shared by the CPU and CUDA implementations.
void check_pack_args(const at::Tensor& x);
struct ConvGeometry {
  int64_t N, H, W, Cw, O, KH, KW, Ho, Wo;
};
ConvGeometry check_conv_args(const at::Tensor& packed_x, const at::Tensor& packed_w,
                             int64_t in_channels, int64_t stride, int64_t padding, double pad_value,
                             const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual);
struct PoolGeometry {
  int64_t N, C, H, W, Ho, Wo, k, stride, padding;
};
PoolGeometry check_pool_args(const at::Tensor& x, int64_t kernel_size, int64_t stride, int64_t padding,
                             const std::optional<at::Tensor>& bias);

}  // namespace bireal
