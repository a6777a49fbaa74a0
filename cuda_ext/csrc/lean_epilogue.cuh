// The lean epilogue (issue 25's "V1") that bmma_lean (binary_conv_lean.cu) and bmma_halo
// (binary_conv_halo.cu) share: the option sets compiled, which calls they support, and the store of a
// warp's 32 x 64 accumulator tile. What it changes, output for output, against store_warp_tile in
// binary_conv_cuda.cu:
// - scale, bias, residual, bf16 output and the packed signs are template options, not run-time
//   branches on the parameters; a combination that is not instantiated runs `bmma` instead;
// - scale and bias are loaded once per column pair and used for the thread's 4 rows (the loop over
//   columns is outside the loop over rows), the rows' offsets computed once;
// - every store and residual load is a pair (O % 8 == 0 makes each n8 tile whole and each pair
//   aligned), with no per-element bounds checks;
// - the sign bits go to constant positions (nt * 8 + j) and are shifted by 2t once per row;
// - zero padding adds one precomputed integer per output from a table of border classes
//   (binary_conv_lean.cu explains them), instead of looping over the taps, and only for the pixels
//   on the border.
// The arithmetic is the reference's, rounding step by rounding step (__fmul_rn, __fadd_rn, one round
// to bf16), so the output equals bmma's bit for bit; tests/test_cuda.py checks every path.
#pragma once

#include "bmma_common.cuh"

#include <cuda_bf16.h>

#include <type_traits>
#include <utility>

namespace bireal {
namespace {

// The options of one instantiation (a bit set).
constexpr int kScale = 1, kBias = 2, kResidual = 4, kOutBf16 = 8, kPackSigns = 16;

// The combinations instantiated: the bare conv of the benchmarks, the training convs (alpha only,
// float32 or under bf16 autocast), and the packed model's blocks (folded batch norm, packed signs,
// with and without a residual of the output's type).
using LeanOptionSets = std::integer_sequence<int,
    0, kOutBf16,                                                                    // bare conv
    kScale, kScale | kOutBf16,                                                      // training: alpha
    kScale | kBias | kPackSigns, kScale | kBias | kPackSigns | kOutBf16,            // block, no residual
    kScale | kBias | kResidual | kPackSigns, kScale | kBias | kResidual | kPackSigns | kOutBf16>;  // block

constexpr int kMaxBorderClasses = 256;  // P^4 at padding 3

inline int options_of(const ConvParams& p) {
  return (p.scale ? kScale : 0) | (p.bias ? kBias : 0) | (p.residual ? kResidual : 0) |
         (p.out_bf16 ? kOutBf16 : 0) | (p.packed_out ? kPackSigns : 0);
}

// Calls launch(std::integral_constant<int, options>{}) if `options` is an instantiated set; whether it did.
template <class Launch, int... kOpts>
bool with_lean_options(int options, Launch&& launch, std::integer_sequence<int, kOpts...>) {
  return ((options == kOpts ? (launch(std::integral_constant<int, kOpts>{}), true) : false) || ...);
}

inline bool aligned(const void* ptr, uintptr_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Whether the lean epilogue computes this call: an instantiated option set, whole n8 tiles, a border
// table that fits, a residual of the output's type, pairs aligned.
inline bool lean_epilogue_supports(const ConvParams& p) {
  const int P = p.padding + 1;
  auto nothing = [](auto) {};
  return with_lean_options(options_of(p), nothing, LeanOptionSets{}) && p.O % 8 == 0 &&
         P * P * P * P <= kMaxBorderClasses &&
         int64_t(kMaxBorderClasses) * p.O < (int64_t(1) << 31) &&  // a class's table offset is an int
         (p.residual == nullptr || p.residual_bf16 == p.out_bf16) &&
         aligned(p.scale, 8) && aligned(p.bias, 8) && aligned(p.residual, p.out_bf16 ? 4 : 8) &&
         aligned(p.out, 8);
}

// The border class of a pixel (binary_conv_lean.cu), 0 for the interior.
__device__ __forceinline__ int border_class(const ConvParams& p, int P, const PixelOrigin& o) {
  const int a = max(0, -o.ih0), b = max(0, o.ih0 + p.KH - p.H);
  const int c = max(0, -o.iw0), d = max(0, o.iw0 + p.KW - p.W);
  return ((a * P + b) * P + c) * P + d;
}

// The output rows (pixels) of a thread's accumulators, tile mt (0, 1) and half h (row g or g + 8):
// row base + mt * mt_stride + 8 * h, kept as one base (few registers live across the main loop).
struct ThreadRows {
  int64_t base;        // the row of (0, 0): the pixel's index in (N, Ho, Wo)
  int mt_stride;       // 16 (bmma_lean: 32 consecutive pixels) or Wo (bmma_halo: 2 output rows of 16)
  bool valid[2][2];    // the pixel exists (stores are predicated on it)
  int corr_row[2][2];  // where its border class's row of the table starts; -1: none (interior)

  // A missing pixel's row is 0: its residual loads stay in bounds and it stores nothing.
  __device__ __forceinline__ int64_t row(int mt, int h) const {
    return valid[mt][h] ? base + mt * mt_stride + 8 * h : 0;
  }
};

// Sets rows.valid and rows.corr_row of one pixel; found before the main loop, while its position is
// at hand.
__device__ __forceinline__ void set_thread_row(ThreadRows& rows, int mt, int h, const ConvParams& p,
                                               const BorderClasses& border, const PixelOrigin& o) {
  rows.valid[mt][h] = o.valid;
  const int cls = border.table != nullptr && o.valid ? border_class(p, border.P, o) : 0;
  rows.corr_row[mt][h] = cls != 0 ? cls * p.O : -1;  // < 256 * O: fits
}

// The origins and ThreadRows entries of a thread's 4 pixels among a warp's 32 consecutive ones from
// warp_row0 (bmma_lean, bmma_split): tile mt, half h is pixel warp_row0 + 16 * mt + 8 * h + g.
__device__ __forceinline__ void set_consecutive_rows(const ConvParams& p, const BorderClasses& border, int64_t warp_row0,
                                                     int g, PixelOrigin (&pix)[2][2], ThreadRows& rows) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      pix[mt][h] = pixel_origin(p, warp_row0 + mt * 16 + h * 8 + g);
      set_thread_row(rows, mt, h, p, border, pix[mt][h]);
    }
}

// Bits s and s + 1 set to the signs of a bf16 pair as stored (.x at s, .y at s + 1), from its
// __hge2_mask against zero: 0xFFFF in the low half where .x >= 0, in the high half where .y >= 0 (one
// HSET2 on sm_90 for two outputs, against an unpack, a compare and a select for each). s is a
// constant (0, 8, 16 or 24), so this is a shift and two LOP3s.
__host__ __device__ constexpr uint32_t pair_sign_bits(uint32_t mask, int s) {
  return s < 16 ? (mask & (1u << s)) | ((mask >> 15) & (2u << s))   // .y's bit 16 down to s + 1
                : ((mask << 16) & (1u << s)) | (mask & (2u << s));  // .x's bit s - 16 up to s
}
static_assert(pair_sign_bits(0x0000FFFFu, 0) == 1 && pair_sign_bits(0xFFFF0000u, 0) == 2 &&
                  pair_sign_bits(0x0000FFFFu, 8) == 1u << 8 && pair_sign_bits(0xFFFF0000u, 8) == 2u << 8 &&
                  pair_sign_bits(0x0000FFFFu, 16) == 1u << 16 && pair_sign_bits(0xFFFF0000u, 16) == 2u << 16 &&
                  pair_sign_bits(0x0000FFFFu, 24) == 1u << 24 && pair_sign_bits(0xFFFF0000u, 24) == 2u << 24 &&
                  pair_sign_bits(0xFFFFFFFFu, 24) == 3u << 24 && pair_sign_bits(0u, 8) == 0,
              "pair_sign_bits: .x's sign at bit s, .y's at s + 1, nothing else");

// A tile of the block's outputs in shared memory (bmma_halo stages its residuals there, and its bf16
// outputs for 16-byte stores): tile pixel i's elements of columns warp_col0 .. warp_col0 + 63 start
// at data + i * stride elements, and a thread's row (mt, h) is tile pixel first + mt * 16 + 8 * h.
struct StagedTile {
  void* data;
  int first, stride;
};

// Writes a warp's 32 x 64 tile: out = (dot + border correction) * scale + bias + residual, rounded as
// the reference rounds, and (kPackSigns) the signs of out as stored, one word per row. `dots`: the
// dot products with every border tap read as the fill word (dots_from_agreements or
// dots_from_and_counts, bmma_common.cuh). The residuals come from global memory, or with
// kStagedResidual from `staged`; the outputs go to global memory, or with kStagedOutput to `staged`
// (each thread's pair where its residual pair was), for the kernel to copy out.
template <int kOpts, bool kStagedResidual = false, bool kStagedOutput = false>
__device__ __forceinline__ void store_lean(const ConvParams& p, const BorderClasses& border, const WarpAcc& dots,
                                           const ThreadRows& rows, int warp_col0, int t,
                                           const StagedTile& staged = {nullptr, 0, 0}) {
  constexpr bool kHasScale = kOpts & kScale, kHasBias = kOpts & kBias, kHasResidual = kOpts & kResidual;
  constexpr bool kBf16 = kOpts & kOutBf16, kPack = kOpts & kPackSigns;
  using Elem = std::conditional_t<kBf16, __nv_bfloat16, float>;     // an output (and a residual)
  using Pair = std::conditional_t<kBf16, __nv_bfloat162, float2>;  // two adjacent ones
  const int thread_col0 = warp_col0 + 2 * t;

  // Where the row's first pair of outputs and residuals is (every later pair is a constant offset
  // away); a missing row reads the residuals of a valid one and stores nothing.
  Elem* out[2][2];
  const Elem* res[2][2] = {};
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = rows.row(mt, h);
      Elem* tile_row = nullptr;  // the row's first pair in the staged tile
      if constexpr (kStagedResidual || kStagedOutput)
        tile_row = static_cast<Elem*>(staged.data) + (staged.first + mt * 16 + 8 * h) * staged.stride + 2 * t;
      out[mt][h] = kStagedOutput ? tile_row : static_cast<Elem*>(p.out) + row * p.O + thread_col0;
      if constexpr (kHasResidual)
        res[mt][h] = kStagedResidual ? tile_row : static_cast<const Elem*>(p.residual) + row * p.O + thread_col0;
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
        // Missing rows compute garbage that is neither loaded for nor stored: predicated loads and
        // stores instead of a branch per pair.
        int dot0 = dots[mt][nt][2 * h], dot1 = dots[mt][nt][2 * h + 1];
        const int2 corr = rows.corr_row[mt][h] >= 0
                              ? *reinterpret_cast<const int2*>(border.table + rows.corr_row[mt][h] + thread_col0 + nt * 8)
                              : make_int2(0, 0);
        dot0 += corr.x, dot1 += corr.y;
        float v0 = static_cast<float>(dot0), v1 = static_cast<float>(dot1);  // exact: |dot| <= K < 2^24
        if constexpr (kHasScale) v0 = __fmul_rn(v0, scale.x), v1 = __fmul_rn(v1, scale.y);
        if constexpr (kHasBias) v0 = __fadd_rn(v0, bias.x), v1 = __fadd_rn(v1, bias.y);
        if constexpr (kHasResidual) {
          if constexpr (kBf16) {
            // a bf16 is the top half of its float: one shift and one AND widen the pair (what
            // __low2float and __high2float compute, in one instruction each instead of two)
            const uint32_t r = *reinterpret_cast<const uint32_t*>(res[mt][h] + nt * 8);
            v0 = __fadd_rn(v0, __uint_as_float(r << 16)), v1 = __fadd_rn(v1, __uint_as_float(r & 0xFFFF0000u));
          } else {
            const float2 r = *reinterpret_cast<const float2*>(res[mt][h] + nt * 8);
            v0 = __fadd_rn(v0, r.x), v1 = __fadd_rn(v1, r.y);
          }
        }
        if constexpr (kBf16) {
          const __nv_bfloat162 pair = __floats2bfloat162_rn(v0, v1);  // .x = col, .y = col + 1
          if (rows.valid[mt][h]) *reinterpret_cast<Pair*>(out[mt][h] + nt * 8) = pair;
          if constexpr (kPack)  // the signs of the values as stored
            signs[mt][h][nt / 4] |= pair_sign_bits(__hge2_mask(pair, __float2bfloat162_rn(0.0f)), nt % 4 * 8);
        } else {
          if (rows.valid[mt][h]) *reinterpret_cast<Pair*>(out[mt][h] + nt * 8) = make_float2(v0, v1);
          if constexpr (kPack)
            signs[mt][h][nt / 4] |= (uint32_t(v0 >= 0.0f) << (nt % 4 * 8)) | (uint32_t(v1 >= 0.0f) << (nt % 4 * 8 + 1));
        }
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
        if (t == 0 && rows.valid[mt][h]) p.packed_out[rows.row(mt, h) * p.Ow + warp_col0 / kWarpCols] = word;
      }
  }
}

}  // namespace
}  // namespace bireal
