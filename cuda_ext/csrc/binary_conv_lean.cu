// bmma_lean: the `bmma` kernel's main loop (warp_agreements, bmma_common.cuh) with the lean
// epilogue (lean_epilogue.cuh: an epilogue built for the options of the call at compile time, issue
// 25's "V1"), and the table of border classes that epilogue's zero-padding correction reads.
// bmma_lean1: the same with one AND-popc MMA per tile and k-step (bmma_halo's counts and
// dots_from_and_counts) instead of two, on bmma's tiles of 128 consecutive pixels, which leave no
// rows idle on small images (bmma_halo's 8 x 16 tiles use 49 of 128 at 7 x 7).
//
// Border classes. An output pixel whose top-left tap is at (ih0, iw0) has a = max(0, -ih0) tap rows
// above the image, b = max(0, ih0 + KH - H) below, c = max(0, -iw0) tap columns left of it and
// d = max(0, iw0 + KW - W) right of it, and each is at most `padding` (ih0 >= -padding, and the
// last output row's taps end at most `padding` past the image). So P^4 classes (P = padding + 1)
// cover every pixel, and the correction of class (a, b, c, d) for channel o is the sum of the +-1
// weights of channel o over the taps with kh < a, kh >= KH - b, kw < c or kw >= KW - d: one table of
// P^4 x O integers (16 x O at padding 1, 81 x O at padding 2). A packed model makes it once per
// weight tensor at load (cuda_ext.ops.border_classes, passed to the op); otherwise (training, whose
// weights change every step) one small kernel makes it per call. Class 0 is the interior: no
// correction.
#include "lean_epilogue.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

namespace bireal {
namespace {

// table[class][o] for the P^4 classes: the sum of channel o's +-1 weights over that class's outside taps.
__global__ void border_classes_kernel(const ConvParams p, int P, int in_channels, int32_t* table) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int classes = P * P * P * P;
  if (i >= int64_t(classes) * p.O) return;
  const int cls = static_cast<int>(i / p.O), o = static_cast<int>(i % p.O);
  const int d = cls % P, c = cls / P % P, b = cls / (P * P) % P, a = cls / (P * P * P);
  int sum = 0;
  for (int kh = 0; kh < p.KH; ++kh)
    for (int kw = 0; kw < p.KW; ++kw) {
      if (!(kh < a || kh >= p.KH - b || kw < c || kw >= p.KW - d)) continue;
      const uint64_t* word = p.w + (int64_t(o) * p.KH * p.KW + kh * p.KW + kw) * p.Cw;
      int ones = 0;
      for (int cw = 0; cw < p.Cw; ++cw) ones += __popcll(word[cw] & valid_mask(p, cw));
      sum += 2 * ones - in_channels;
    }
  table[i] = sum;
}

// At most 168 registers, so that 3 blocks (12 warps) fit per SM as they do for bmma (162).
constexpr int kMinBlocksPerSM = 3;

template <int kOpts, bool kOneMma>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kMinBlocksPerSM)
binary_conv2d_bmma_lean_kernel(const ConvParams p, const BorderClasses border) {
  wait_for_previous_kernel();  // (with programmatic dependent launch) before any read
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t warp_row0 = (int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) * kWarpRows;
  const int warp_col0 = blockIdx.y * kWarpCols;
  PixelOrigin pix[2][2];
  ThreadRows rows;
  set_consecutive_rows(p, border, warp_row0, g, pix, rows);
  WarpAcc acc;
  if constexpr (kOneMma) {
    PlusOnes ones;
    warp_agreements</*kOneMma=*/true>(p, pix, warp_col0, g, t, acc, &ones);
    dots_from_and_counts(acc, ones, p.K, t);
  } else {
    warp_agreements(p, pix, warp_col0, g, t, acc);
    dots_from_agreements(acc, p.K);
  }
  let_next_kernel_launch();  // its blocks may be scheduled during this epilogue
  // The warp's 32 rows are consecutive pixels; set after the main loop, so that the base does not
  // hold registers across it (set before it, bmma_lean spills at its 168-register bound).
  rows.base = warp_row0 + g, rows.mt_stride = 16;
  store_lean<kOpts>(p, border, acc, rows, warp_col0, t);
}

}  // namespace

bool lean_supports(const ConvParams& p) { return lean_epilogue_supports(p); }

void fill_border_classes(const ConvParams& p, int32_t* table, int in_channels, cudaStream_t stream) {
  const int P = p.padding + 1;
  const int64_t entries = int64_t(P) * P * P * P * p.O;
  border_classes_kernel<<<(entries + 255) / 256, 256, 0, stream>>>(p, P, in_channels, table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bmma_lean(const ConvParams& p, const int32_t* table, dim3 grid, cudaStream_t stream, bool one_mma) {
  TORCH_CHECK(lean_supports(p), "bmma_lean: called for a conv it does not support (lean_supports)");
  const BorderClasses border{table, p.padding + 1};
  const int device = c10::cuda::current_device();
  auto launch = [&](auto options) {
    constexpr int kOpts = decltype(options)::value;
    auto* kernel = one_mma ? binary_conv2d_bmma_lean_kernel<kOpts, true> : binary_conv2d_bmma_lean_kernel<kOpts, false>;
    launch_kernel(kernel, grid, kWarpsPerBlock * 32, 0, stream, device, p, border);
  };
  const bool launched = with_lean_options(options_of(p), launch, LeanOptionSets{});
  TORCH_CHECK(launched, "bmma_lean: no kernel instantiated for options ", options_of(p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bireal
