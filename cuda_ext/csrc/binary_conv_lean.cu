// bmma_lean: the `bmma` kernel's main loop (warp_agreements, bmma_common.cuh) with an epilogue built
// for the options of the call at compile time (issue 25's "V1"). What it changes, output for
// output, against store_warp_tile in binary_conv_cuda.cu:
// - scale, bias, residual, bf16 output and the packed signs are template options, not run-time
//   branches on the parameters; a combination that is not instantiated runs `bmma` instead;
// - scale and bias are loaded once per column pair and used for the thread's 4 rows (the loop over
//   columns is outside the loop over rows), the rows' offsets computed once;
// - every store and residual load is a pair (O % 8 == 0 makes each n8 tile whole and each pair
//   aligned), with no per-element bounds checks;
// - the sign bits go to constant positions (nt * 8 + j) and are shifted by 2t once per row;
// - zero padding adds one precomputed integer per output from a table of border classes (below),
//   instead of looping over the taps, and only for the pixels on the border.
// The arithmetic is the reference's, rounding step by rounding step (__fmul_rn, __fadd_rn, one
// round to bf16), so the output equals bmma's bit for bit; tests/test_cuda.py checks every path.
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
#include "bmma_common.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cuda_bf16.h>

#include <type_traits>
#include <utility>

namespace bireal {
namespace {

// The options of one instantiation (a bit set).
constexpr int kScale = 1, kBias = 2, kResidual = 4, kOutBf16 = 8, kPackSigns = 16;

// The combinations instantiated: the training convs (alpha only, float32 or under bf16 autocast),
// the bare conv of the benchmarks, and the packed model's blocks (folded batch norm, residual of
// the output's type, packed signs) with and without a residual.
constexpr int kInstantiated[] = {
    0,      kOutBf16,  // bare conv
    kScale, kScale | kOutBf16,  // training: alpha
    kScale | kBias | kPackSigns, kScale | kBias | kPackSigns | kOutBf16,  // block, no residual
    kScale | kBias | kResidual | kPackSigns, kScale | kBias | kResidual | kPackSigns | kOutBf16,  // block
};

constexpr int kMaxBorderClasses = 256;  // P^4 at padding 3

int options_of(const ConvParams& p) {
  return (p.scale ? kScale : 0) | (p.bias ? kBias : 0) | (p.residual ? kResidual : 0) |
         (p.out_bf16 ? kOutBf16 : 0) | (p.packed_out ? kPackSigns : 0);
}

bool aligned(const void* ptr, uintptr_t bytes) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The border class of a pixel (see the top of the file), 0 for the interior.
__device__ __forceinline__ int border_class(const ConvParams& p, int P, const PixelOrigin& o) {
  const int a = max(0, -o.ih0), b = max(0, o.ih0 + p.KH - p.H);
  const int c = max(0, -o.iw0), d = max(0, o.iw0 + p.KW - p.W);
  return ((a * P + b) * P + c) * P + d;
}

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

template <int kOpts>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kMinBlocksPerSM)
binary_conv2d_bmma_lean_kernel(const ConvParams p, const BorderClasses border) {
  constexpr bool kHasScale = kOpts & kScale, kHasBias = kOpts & kBias, kHasResidual = kOpts & kResidual;
  constexpr bool kBf16 = kOpts & kOutBf16, kPack = kOpts & kPackSigns;
  using Elem = std::conditional_t<kBf16, __nv_bfloat16, float>;     // an output (and a residual)
  using Pair = std::conditional_t<kBf16, __nv_bfloat162, float2>;  // two adjacent ones
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t warp_row0 = (int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) * kWarpRows;
  const int warp_col0 = blockIdx.y * kWarpCols;

  // Per row of this thread (tile mt, half h = row g or g + 8): its pixel, whether it exists, and
  // where its border class's row of the table starts (-1: the interior, or no correction needed),
  // found before the main loop, while the pixels' positions are at hand.
  const int thread_col0 = warp_col0 + 2 * t;
  PixelOrigin pix[2][2];
  bool valid[2][2];
  int corr_row[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      pix[mt][h] = pixel_origin(p, warp_row0 + mt * 16 + h * 8 + g);
      valid[mt][h] = pix[mt][h].valid;
      const int cls = border.table != nullptr && valid[mt][h] ? border_class(p, border.P, pix[mt][h]) : 0;
      corr_row[mt][h] = cls != 0 ? cls * p.O : -1;  // < 256 * O: fits
    }
  WarpAcc acc;
  warp_agreements(p, pix, warp_col0, g, t, acc);

  // Where the row's first pair of outputs and residuals is (every later pair is a constant offset
  // away); a row past M reads the residuals of row M - 1 and stores nothing.
  Elem* out[2][2];
  const Elem* res[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = warp_row0 + mt * 16 + h * 8 + g;
      out[mt][h] = static_cast<Elem*>(p.out) + row * p.O + thread_col0;
      const int64_t res_row = row < p.M ? row : p.M - 1;
      res[mt][h] = kHasResidual ? static_cast<const Elem*>(p.residual) + res_row * p.O + thread_col0 : nullptr;
    }
  // The sign bits nt * 8 + j of each row's word before the shift by 2t, in two 32-bit halves
  // (nt < 4 and nt >= 4): constant shifts within one register.
  uint32_t signs[2][2][2] = {};

#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    if (warp_col0 + nt * 8 >= p.O) break;  // warp-uniform; O % 8 == 0, so the n8 tiles are whole
    float2 scale = make_float2(1.0f, 1.0f), bias = make_float2(0.0f, 0.0f);
    if constexpr (kHasScale) scale = *reinterpret_cast<const float2*>(p.scale + thread_col0 + nt * 8);
    if constexpr (kHasBias) bias = *reinterpret_cast<const float2*>(p.bias + thread_col0 + nt * 8);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Rows past M (the last block's) compute garbage that is neither loaded for nor stored:
        // predicated loads and stores instead of a branch per pair.
        int dot0 = 2 * acc[mt][nt][2 * h] - p.K, dot1 = 2 * acc[mt][nt][2 * h + 1] - p.K;
        const int2 corr = corr_row[mt][h] >= 0 ? *reinterpret_cast<const int2*>(
                                                     border.table + corr_row[mt][h] + thread_col0 + nt * 8)
                                               : make_int2(0, 0);
        dot0 += corr.x, dot1 += corr.y;
        float v0 = static_cast<float>(dot0), v1 = static_cast<float>(dot1);  // exact: |dot| <= K < 2^24
        if constexpr (kHasScale) v0 = __fmul_rn(v0, scale.x), v1 = __fmul_rn(v1, scale.y);
        if constexpr (kHasBias) v0 = __fadd_rn(v0, bias.x), v1 = __fadd_rn(v1, bias.y);
        if constexpr (kHasResidual) {
          const Pair r = *reinterpret_cast<const Pair*>(res[mt][h] + nt * 8);
          if constexpr (kBf16) {
            v0 = __fadd_rn(v0, __low2float(r)), v1 = __fadd_rn(v1, __high2float(r));
          } else {
            v0 = __fadd_rn(v0, r.x), v1 = __fadd_rn(v1, r.y);
          }
        }
        if constexpr (kBf16) {
          const __nv_bfloat162 pair = __floats2bfloat162_rn(v0, v1);  // .x = col, .y = col + 1
          if (valid[mt][h]) *reinterpret_cast<Pair*>(out[mt][h] + nt * 8) = pair;
          v0 = __low2float(pair), v1 = __high2float(pair);  // the signs of the values as stored
        } else {
          if (valid[mt][h]) *reinterpret_cast<Pair*>(out[mt][h] + nt * 8) = make_float2(v0, v1);
        }
        if constexpr (kPack)
          signs[mt][h][nt / 4] |= (uint32_t(v0 >= 0.0f) << (nt % 4 * 8)) | (uint32_t(v1 >= 0.0f) << (nt % 4 * 8 + 1));
      }
  }
  if constexpr (kPack) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // the 4 threads of a row OR their bits into its word
        uint64_t word = ((uint64_t(signs[mt][h][1]) << 32) | signs[mt][h][0]) << (2 * t);
        word |= __shfl_xor_sync(0xffffffffu, word, 1);
        word |= __shfl_xor_sync(0xffffffffu, word, 2);
        const int64_t row = warp_row0 + mt * 16 + h * 8 + g;
        if (t == 0 && valid[mt][h]) p.packed_out[row * p.Ow + warp_col0 / kWarpCols] = word;
      }
  }
}

template <int kOpts>
void launch_with(const ConvParams& p, const BorderClasses& border, dim3 grid, cudaStream_t stream) {
  binary_conv2d_bmma_lean_kernel<kOpts><<<grid, kWarpsPerBlock * 32, 0, stream>>>(p, border);
}

template <int... kOpts>
bool launch_instantiated(int options, const ConvParams& p, const BorderClasses& border, dim3 grid,
                         cudaStream_t stream, std::integer_sequence<int, kOpts...>) {
  return ((options == kOpts ? (launch_with<kOpts>(p, border, grid, stream), true) : false) || ...);
}

using Instantiated = std::integer_sequence<int, kInstantiated[0], kInstantiated[1], kInstantiated[2],
                                           kInstantiated[3], kInstantiated[4], kInstantiated[5],
                                           kInstantiated[6], kInstantiated[7]>;

}  // namespace

bool lean_supports(const ConvParams& p) {
  const int options = options_of(p);
  bool instantiated = false;
  for (int o : kInstantiated) instantiated |= o == options;
  const int P = p.padding + 1;
  return instantiated && p.O % 8 == 0 && P * P * P * P <= kMaxBorderClasses &&
         int64_t(kMaxBorderClasses) * p.O < (int64_t(1) << 31) &&  // a class's table offset is an int
         (p.residual == nullptr || p.residual_bf16 == p.out_bf16) &&  // a residual of the output's type
         aligned(p.scale, 8) && aligned(p.bias, 8) && aligned(p.residual, p.out_bf16 ? 4 : 8) &&
         aligned(p.out, 8);
}

void launch_bmma_lean(const ConvParams& p, int32_t* table, bool fill_table, int in_channels, dim3 grid,
                      cudaStream_t stream) {
  TORCH_CHECK(lean_supports(p), "bmma_lean: called for a conv it does not support (lean_supports)");
  const BorderClasses border{table, p.padding + 1};
  if (table != nullptr && fill_table) {
    const int64_t entries = int64_t(border.P) * border.P * border.P * border.P * p.O;
    border_classes_kernel<<<(entries + 255) / 256, 256, 0, stream>>>(p, border.P, in_channels, table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const bool launched = launch_instantiated(options_of(p), p, border, grid, stream, Instantiated{});
  TORCH_CHECK(launched, "bmma_lean: no kernel instantiated for options ", options_of(p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bireal
