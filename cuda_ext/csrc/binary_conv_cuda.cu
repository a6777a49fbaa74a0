// CUDA implementation of the bireal ops (same schemas, same packed layout, same bits as the CPU
// and the pure-torch reference; docs/packed_format.md).
//
// The fast path is an implicit GEMM on the 1-bit tensor cores, `mma.sync.m16n8k256 ... .and.popc`
// (native BMMA on sm_80 and sm_90; `.xor.popc` is emulated on Hopper and ~6x slower, see
// docs/benchmarks.md). With AND alone, the number of positions where a +-1 input and a +-1 weight
// agree is
//     agree = popc(a & b) + popc(~a & ~b)
// so every k-step issues two AND-popc MMAs into the same accumulator: (a, b) and (~a, nb), where
// nb = ~b with the bits past C cleared. Then, over K = KH * KW * C valid positions,
//     dot = agree - (K - agree) = 2 * agree - K.
// No per-pixel or per-filter side sums are needed, and garbage in the tail bits cannot count (b and
// nb are masked to the valid channels).
//
// Border taps read a fill word instead of the image: all valid bits set for pad_value +1 (exact),
// 0 (= all -1) otherwise. -1 is then exact; zero padding adds back S[tap][o] (the sum of the +-1
// weights at that tap) for each tap that falls outside the image, as on the CPU.
//
// Epilogue: out = dot * scale + bias + residual in float32, rounded in that order (__fmul_rn /
// __fadd_rn: never contracted to an FMA), so the result equals the reference bit for bit; with a
// bfloat16 output it is rounded once more, to nearest even, as torch's .to(bfloat16) does. The
// fused-block variant also writes the signs of `out` (as stored), packed, for the next block's conv.
//
// Two tensor-core kernels share the fragment layout: `bmma` (the verified default: every warp loads
// its own operands through the read-only cache, next step's loads in flight during this step's
// MMAs, the epilogue straight from the accumulator registers) and `bmma_async` (the block's A and B
// tiles staged through shared memory with cp.async, double buffered, each weight tile loaded once
// per block and read by its four warps; the epilogue staged through shared memory, a row at a time
// with coalesced stores). Their shared device code is in bmma_common.cuh. More variants compile
// the epilogue per option set (lean_epilogue.cuh): `bmma_lean` (binary_conv_lean.cu) with bmma's
// main loop, `bmma_lean1` the same with one MMA per k-step, `bmma_split` (binary_conv_split.cu)
// with the k-steps split over a cluster of blocks where a layer has few tiles, and `bmma_halo`
// (binary_conv_halo.cu), which reads its input from a halo of the block's pixels in shared memory
// (`bmma_halo_w` with the weights there too, `bmma_halo_p` with persistent blocks).
#include "binary_conv.h"
#include "bmma_common.cuh"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace bireal {
namespace {

// Zero padding: whether output pixel (oh, ow) has taps outside the image (then it needs a correction).
__device__ __forceinline__ bool needs_border_correction(const ConvParams& p, int ih0, int iw0) {
  return p.tap_sums != nullptr && !(ih0 >= 0 && ih0 + p.KH <= p.H && iw0 >= 0 && iw0 + p.KW <= p.W);
}

// The correction of such a pixel for channel o: + S[tap][o] for each tap outside the image (the
// CUDA-core kernel and bmma_async's row-wise epilogue; bmma uses to_dot_products below).
__device__ __forceinline__ int border_correction(const ConvParams& p, int ih0, int iw0, int o) {
  int corr = 0;
  for (int kh = 0; kh < p.KH; ++kh)
    for (int kw = 0; kw < p.KW; ++kw) {
      const int ih = ih0 + kh, iw = iw0 + kw;
      if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) corr += p.tap_sums[(kh * p.KW + kw) * p.O + o];
    }
  return corr;
}

// out = dot * scale + bias + residual, each rounding step as the reference does it, then rounded to
// the output type: the value exactly as it will be stored (its sign is the packed bit).
__device__ __forceinline__ float epilogue(const ConvParams& p, int64_t row, int o, int dot) {
  float v = static_cast<float>(dot);  // exact: |dot| <= K < 2^24
  if (p.scale) v = __fmul_rn(v, p.scale[o]);
  if (p.bias) v = __fadd_rn(v, p.bias[o]);
  if (p.residual) {
    const int64_t i = row * p.O + o;
    const float r = p.residual_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.residual)[i])
                                    : static_cast<const float*>(p.residual)[i];
    v = __fadd_rn(v, r);
  }
  return p.out_bf16 ? __bfloat162float(__float2bfloat16_rn(v)) : v;  // bf16 -> float is exact
}

// Stores out[row, col] (and out[row, col + 1] when `two`); v already holds representable values.
__device__ __forceinline__ void store_out(const ConvParams& p, int64_t row, int col, const float (&v)[2],
                                          bool two) {
  const int64_t i = row * p.O + col;
  const bool paired = two && p.O % 2 == 0;  // O and col even: the pair is aligned
  if (p.out_bf16) {
    auto* dst = static_cast<__nv_bfloat16*>(p.out) + i;
    if (paired) {
      *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v[0], v[1]);
    } else {
      dst[0] = __float2bfloat16_rn(v[0]);
      if (two) dst[1] = __float2bfloat16_rn(v[1]);
    }
  } else {
    float* dst = static_cast<float*>(p.out) + i;
    if (paired) {
      *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
    } else {
      dst[0] = v[0];
      if (two) dst[1] = v[1];
    }
  }
}

// acc (agreements) -> dot products in place: 2 * agree - K, plus the zero-padding correction of the
// border pixels, added by one loop over the taps that is not unrolled. (Inlined per element, the
// tap loop took 64 copies in the unrolled epilogue: on an H100 the kernel ran 5x slower than with
// +1 padding, its warps stalled on instruction fetch; docs/cuda.md.)
__device__ __forceinline__ void to_dot_products(const ConvParams& p, WarpAcc& acc, const PixelOrigin (&pix)[2][2],
                                                int warp_col0, int t) {
  bool border[2][2], any = false;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      border[mt][h] = pix[mt][h].valid && needs_border_correction(p, pix[mt][h].ih0, pix[mt][h].iw0);
      any |= border[mt][h];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) acc[mt][nt][2 * h + j] = 2 * acc[mt][nt][2 * h + j] - p.K;
    }
  if (!any) return;
#pragma unroll 1
  for (int tap = 0; tap < p.KH * p.KW; ++tap) {
    const int kh = tap / p.KW, kw = tap - kh * p.KW;
    const int32_t* sums = p.tap_sums + int64_t(tap) * p.O;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ih = pix[mt][h].ih0 + kh, iw = pix[mt][h].iw0 + kw;
        if (!border[mt][h] || (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)) continue;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int col = warp_col0 + nt * 8 + 2 * t + j;
            if (col < p.O) acc[mt][nt][2 * h + j] += sums[col];
          }
      }
  }
}

// Epilogue of a warp's tile: dot products, scale / bias / residual, the stores, and (fused block)
// one packed word of signs per row: the 4 threads of a row OR their 16 bits together.
__device__ __forceinline__ void store_warp_tile(const ConvParams& p, WarpAcc& acc,
                                                const PixelOrigin (&pix)[2][2], int64_t warp_row0,
                                                int warp_col0, int g, int t) {
  to_dot_products(p, acc, pix, warp_col0, t);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = warp_row0 + mt * 16 + h * 8 + g;
      const PixelOrigin& o = pix[mt][h];
      uint64_t signs = 0;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int col = warp_col0 + nt * 8 + 2 * t;  // this thread's pair: col, col + 1
        if (!o.valid || col >= p.O) continue;
        float v[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (col + j >= p.O) break;
          v[j] = epilogue(p, row, col + j, acc[mt][nt][2 * h + j]);
          signs |= uint64_t(v[j] >= 0.0f) << (nt * 8 + 2 * t + j);
        }
        store_out(p, row, col, v, col + 1 < p.O);
      }
      if (p.packed_out != nullptr) {  // warp-uniform: every lane takes part in the shuffles
        signs |= __shfl_xor_sync(0xffffffffu, signs, 1);
        signs |= __shfl_xor_sync(0xffffffffu, signs, 2);
        if (t == 0 && o.valid) p.packed_out[row * p.Ow + warp_col0 / kWarpCols] = signs;
      }
    }
}

// One warp computes a 32 (pixels) x 64 (channels) output tile (warp_agreements); a block stacks 4
// warps along pixels.
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
binary_conv2d_bmma_kernel(const ConvParams p) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t warp_row0 = (int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) * kWarpRows;
  const int warp_col0 = blockIdx.y * kWarpCols;

  // The 4 pixels whose A words this thread loads: tile mt (0, 1), half h (row g or g + 8).
  PixelOrigin pix[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) pix[mt][h] = pixel_origin(p, warp_row0 + mt * 16 + h * 8 + g);

  WarpAcc acc;
  warp_agreements(p, pix, warp_col0, g, t, acc);
  store_warp_tile(p, acc, pix, warp_row0, warp_col0, g, t);
}

// The staged epilogue of bmma_async: the warp's 32 x 64 agreement counts go to shared memory, then
// the warp finishes one output row at a time, lane l taking channels l and l + 32: 128-byte
// coalesced stores (and residual loads), the row's packed word from two ballots, and the zero-padding
// correction as a warp-uniform branch. The loop over rows is not unrolled, so the code stays small.
constexpr int kTileStride = kWarpCols + 8;  // ints per staged row: the 8-byte fragment writes of a
                                            // half-warp then hit 16 distinct bank pairs

__device__ __forceinline__ void store_warp_tile_staged(const ConvParams& p, const WarpAcc& acc, int* tile,
                                                       int64_t warp_row0, int warp_col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        *reinterpret_cast<int2*>(&tile[(mt * 16 + h * 8 + g) * kTileStride + nt * 8 + 2 * t]) =
            make_int2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
  __syncwarp();

  // Per lane: its two channels and their scale and bias, read once for the 32 rows.
  int col[2];
  bool in_o[2];
  float scale[2] = {1.0f, 1.0f}, bias[2] = {0.0f, 0.0f};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    col[half] = warp_col0 + lane + 32 * half;
    in_o[half] = col[half] < p.O;
    if (in_o[half] && p.scale) scale[half] = p.scale[col[half]];
    if (in_o[half] && p.bias) bias[half] = p.bias[col[half]];
  }
  // The first row's (n, oh, ow), then advanced one row at a time (no division per row).
  const int64_t per_image = int64_t(p.Ho) * p.Wo;
  const int64_t rem0 = warp_row0 % per_image;
  int oh = static_cast<int>(rem0 / p.Wo), ow = static_cast<int>(rem0 % p.Wo);
#pragma unroll 1
  for (int r = 0; r < kWarpRows; ++r) {
    const int64_t row = warp_row0 + r;
    if (row >= p.M) break;  // warp-uniform
    const int ih0 = oh * p.stride - p.padding, iw0 = ow * p.stride - p.padding;
    const bool border = needs_border_correction(p, ih0, iw0);  // warp-uniform
    const int64_t base = row * p.O;
    bool sign[2] = {false, false};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (!in_o[half]) continue;
      const int dot = 2 * tile[r * kTileStride + lane + 32 * half] - p.K +
                      (border ? border_correction(p, ih0, iw0, col[half]) : 0);
      // = epilogue(), with this lane's scale and bias already in registers
      float v = static_cast<float>(dot);
      if (p.scale) v = __fmul_rn(v, scale[half]);
      if (p.bias) v = __fadd_rn(v, bias[half]);
      const int64_t i = base + col[half];
      if (p.residual)
        v = __fadd_rn(v, p.residual_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.residual)[i])
                                         : static_cast<const float*>(p.residual)[i]);
      if (p.out_bf16) {
        const __nv_bfloat16 b = __float2bfloat16_rn(v);
        static_cast<__nv_bfloat16*>(p.out)[i] = b;
        v = __bfloat162float(b);
      } else {
        static_cast<float*>(p.out)[i] = v;
      }
      sign[half] = v >= 0.0f;
    }
    if (p.packed_out != nullptr) {
      const uint32_t lo = __ballot_sync(0xffffffffu, sign[0]), hi = __ballot_sync(0xffffffffu, sign[1]);
      if (lane == 0) p.packed_out[row * p.Ow + warp_col0 / kWarpCols] = (uint64_t(hi) << 32) | lo;
    }
    if (++ow == p.Wo) {
      ow = 0;
      if (++oh == p.Ho) oh = 0;
    }
  }
}

constexpr int kStages = 2;

// The same tile and fragments as binary_conv2d_bmma_kernel, with the block's operands staged in shared
// memory: per k-step an A tile (128 pixels x 4 words) and a B tile (64 channels x 4 words), 2 stages,
// 12 KB. Thread i copies word i % 4 of A rows i / 4 + 32 r (r = 0..3) and of B columns i / 4 + 32 r
// (r = 0, 1): consecutive lanes write consecutive words (no bank conflicts), and every thread's k-word
// is the same one its MMA fragments use, so one (tap, channel) decode per step serves both.
// Border taps (the fill word) and words past K are plain shared stores; __syncthreads orders them.
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
binary_conv2d_bmma_async_kernel(const ConvParams p) {
  // The operand stages (12 KB) during the k-loop; then, reused, the warps' staged tiles (36 KB).
  constexpr int kStageBytes = kStages * (kBlockRows + kWarpCols) * kChunkWords * 8;
  constexpr int kTileBytes = kWarpsPerBlock * kWarpRows * kTileStride * 4;
  __shared__ __align__(16) unsigned char smem[kStageBytes > kTileBytes ? kStageBytes : kTileBytes];
  auto sa = reinterpret_cast<uint64_t(*)[kBlockRows][kChunkWords]>(smem);
  auto sb = reinterpret_cast<uint64_t(*)[kWarpCols][kChunkWords]>(smem + kStages * kBlockRows * kChunkWords * 8);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t block_row0 = int64_t(blockIdx.x) * kBlockRows;
  const int64_t warp_row0 = block_row0 + warp * kWarpRows;
  const int block_col0 = blockIdx.y * kWarpCols;
  const int copy_row = tid >> 2;  // + 32 r; the copied word is t

  PixelOrigin copy_pix[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) copy_pix[r] = pixel_origin(p, block_row0 + copy_row + 32 * r);

  auto issue_step = [&](int s, int stage) {
    const KWord k = k_word(p, s * kChunkWords + t);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      uint64_t* dst = &sa[stage][copy_row + 32 * r][t];
      const PixelOrigin& o = copy_pix[r];
      if (!k.in_k || !o.valid) {
        *dst = 0;
        continue;
      }
      const int kh = k.tap / p.KW, kw = k.tap - kh * p.KW;
      const int ih = o.ih0 + kh, iw = o.iw0 + kw;
      if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W)
        *dst = k.c == p.Cw - 1 ? p.fill_tail : p.fill_full;
      else
        cp_async_8(dst, p.x + o.image_base + (int64_t(ih) * p.W + iw) * p.Cw + k.c);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int col = block_col0 + copy_row + 32 * r;
      uint64_t* dst = &sb[stage][copy_row + 32 * r][t];
      if (k.in_k && col < p.O)
        cp_async_8(dst, p.w + int64_t(col) * p.K_words + s * kChunkWords + t);
      else
        *dst = 0;
    }
    cp_async_commit();  // one group per step (possibly empty), so "all but one" is the step before
  };

  WarpAcc acc;
  zero(acc);
  const int steps = (p.K_words + kChunkWords - 1) / kChunkWords;
  issue_step(0, 0);
  for (int s = 0; s < steps; ++s) {
    const int stage = s % kStages;
    if (s + 1 < steps) issue_step(s + 1, (s + 1) % kStages);
    else cp_async_commit();
    cp_async_wait_all_but_one();  // step s's copies have landed (this thread's)
    __syncthreads();              // ... and everyone's, plain stores included
    const uint64_t mask = k_word(p, s * kChunkWords + t).mask;
    uint64_t a[2][2], b[8];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) a[mt][h] = sa[stage][warp * kWarpRows + mt * 16 + h * 8 + g][t];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) b[nt] = sb[stage][nt * 8 + g][t] & mask;
    mma_step(acc, a, b, mask);
    __syncthreads();  // the stage is free for step s + 2's copies (and, after the last, for the tiles)
  }
  store_warp_tile_staged(p, acc, reinterpret_cast<int*>(smem) + warp * kWarpRows * kTileStride, warp_row0,
                         block_col0, lane);
}

// CUDA-core XOR + popcount: one thread per output element. A correctness cross-check for the
// tensor-core path (selectable with set_cuda_path("simt")), never the fast path.
// Threads run over (pixel, channel) with channels padded to whole words, so each warp covers 32
// channels of one pixel and a ballot gives half a word of the packed output.
__global__ void binary_conv2d_simt_kernel(const ConvParams p) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t cols = int64_t(p.Ow) * 64;
  const int64_t row = idx / cols;
  const int col = static_cast<int>(idx - row * cols);
  const PixelOrigin o = pixel_origin(p, row);
  const bool active = o.valid && col < p.O;
  float v[2] = {-1.0f, 0.0f};
  if (active) {
    int agree_xor = 0;  // popc(a ^ b) over valid bits = number of disagreements
    for (int tap = 0; tap < p.KH * p.KW; ++tap)
      for (int c = 0; c < p.Cw; ++c) {
        const uint64_t a = load_input_word(p, o, tap, c);
        const uint64_t b = p.w[int64_t(col) * p.K_words + tap * p.Cw + c];
        agree_xor += __popcll((a ^ b) & valid_mask(p, c));
      }
    const int corr = needs_border_correction(p, o.ih0, o.iw0) ? border_correction(p, o.ih0, o.iw0, col) : 0;
    const int dot = p.K - 2 * agree_xor + corr;
    v[0] = epilogue(p, row, col, dot);
    store_out(p, row, col, v, false);
  }
  if (p.packed_out != nullptr && row < p.M) {  // row is warp-uniform (cols is a multiple of 64)
    const uint32_t bits = __ballot_sync(0xffffffffu, active && v[0] >= 0.0f);
    if ((threadIdx.x & 31) == 0)
      reinterpret_cast<uint32_t*>(p.packed_out)[(row * p.Ow + col / 64) * 2 + (col / 32) % 2] = bits;
  }
}

// S[tap][o] = 2 * popc(w[o, tap, :]) - C: the sum of the +-1 weights of channel o at that tap.
__global__ void tap_sums_kernel(const uint64_t* w, int O, int taps, int Cw, int C, uint64_t tail_mask,
                                int32_t* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= O * taps) return;
  const int o = i / taps, tap = i % taps;
  int ones = 0;
  for (int c = 0; c < Cw; ++c)
    ones += __popcll(w[(int64_t(o) * taps + tap) * Cw + c] & (c == Cw - 1 ? tail_mask : ~uint64_t(0)));
  out[tap * O + o] = 2 * ones - C;
}

// pack_signs: one warp per (pixel, 64-channel word) of a channels-last input; two ballots make the
// word. Compared in the input's own precision (float for half / bfloat16): x >= 0 -> 1, NaN -> 0.
template <typename T>
__global__ void pack_signs_kernel(const T* __restrict__ x, int64_t pixels, int64_t C, int64_t Cw,
                                  uint64_t* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  const int lane = threadIdx.x & 31;
  const int64_t word = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (word >= pixels * Cw) return;  // warp-uniform
  const int64_t pixel = word / Cw, c0 = (word - pixel * Cw) * 64 + lane;
  const T* src = x + pixel * C;
  const bool s0 = c0 < C && static_cast<acc_t>(src[c0]) >= acc_t(0);
  const bool s1 = c0 + 32 < C && static_cast<acc_t>(src[c0 + 32]) >= acc_t(0);
  const uint32_t lo = __ballot_sync(0xffffffffu, s0), hi = __ballot_sync(0xffffffffu, s1);
  if (lane == 0) out[word] = (uint64_t(hi) << 32) | lo;
}

// max_pool_signs: one warp per (output pixel, 64-channel word) of a channels-last input, as
// pack_signs. Lane l takes channels c0 + l and c0 + 32 + l: the max over the window's taps inside
// the image (torch pads with -inf; a NaN wins, as in torch), + bias once, rounded to T once (so
// max(x) + b rounds as x + b would: rounding is monotonic), stored, and its sign voted into the word.
template <typename T>
__global__ void max_pool_signs_kernel(const T* __restrict__ x, const T* __restrict__ bias, const PoolGeometry g,
                                      T* __restrict__ out, uint64_t* __restrict__ bits) {
  using acc_t = at::opmath_type<T>;
  const int lane = threadIdx.x & 31;
  const int64_t Cw = (g.C + 63) / 64;
  const int64_t word = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (word >= g.N * g.Ho * g.Wo * Cw) return;  // warp-uniform
  const int64_t pixel = word / Cw, c0 = (word - pixel * Cw) * 64 + lane;
  const int64_t n = pixel / (g.Ho * g.Wo), oh = pixel / g.Wo % g.Ho, ow = pixel % g.Wo;
  const int64_t h0 = oh * g.stride - g.padding, w0 = ow * g.stride - g.padding;
  const int64_t hb = h0 > 0 ? h0 : 0, he = h0 + g.k < g.H ? h0 + g.k : g.H;
  const int64_t wb = w0 > 0 ? w0 : 0, we = w0 + g.k < g.W ? w0 + g.k : g.W;
  const T* image = x + n * g.H * g.W * g.C;
  bool sign[2] = {false, false};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t c = c0 + 32 * half;
    if (c >= g.C) continue;  // its bit stays 0: the tail
    acc_t m = static_cast<acc_t>(-INFINITY);
    for (int64_t h = hb; h < he; ++h)
      for (int64_t w = wb; w < we; ++w) {
        const acc_t v = static_cast<acc_t>(image[(h * g.W + w) * g.C + c]);
        m = (v > m || v != v) ? v : m;  // once m is NaN neither test passes and it stays
      }
    if (bias) m += static_cast<acc_t>(bias[c]);
    const T stored = static_cast<T>(m);
    out[pixel * g.C + c] = stored;
    sign[half] = static_cast<acc_t>(stored) >= acc_t(0);  // the sign of the value as stored; NaN -> 0
  }
  const uint32_t lo = __ballot_sync(0xffffffffu, sign[0]), hi = __ballot_sync(0xffffffffu, sign[1]);
  if (lane == 0) bits[word] = (uint64_t(hi) << 32) | lo;
}

constexpr int kThreads = 256;

int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

int compute_capability_major(int device) { return device_attribute(cudaDevAttrComputeCapabilityMajor, device); }

}  // namespace

// Read once per attribute and device (kept out of the per-call path, which may be inside a CUDA
// graph capture).
int device_attribute(cudaDeviceAttr attribute, int device) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> cached;  // (attribute, device) -> value
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(attribute), device);
  auto found = cached.find(key);
  if (found == cached.end()) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
    found = cached.emplace(key, value).first;
  }
  return found->second;
}

bool programmatic_launch_on(int device) { return programmatic_launch() && compute_capability_major(device) >= 9; }

namespace {

void check_cuda_tensor(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "binary_conv2d (CUDA): ", name, " is on ",
              t.device(), ", packed_x on ", like.device());
}

// Shared by binary_conv2d and binary_block: checks, prepares the operands, launches.
std::tuple<at::Tensor, at::Tensor> conv_cuda(const at::Tensor& packed_x, const at::Tensor& packed_w,
                                             int64_t in_channels, int64_t stride, int64_t padding,
                                             double pad_value, const std::optional<at::Tensor>& scale,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& residual,
                                             const std::optional<at::ScalarType>& out_dtype, bool pack_output,
                                             const std::optional<at::Tensor>& given_classes) {
  TORCH_CHECK(packed_x.is_cuda(), "binary_conv2d (CUDA): packed_x must be a CUDA tensor");
  check_cuda_tensor(packed_w, packed_x, "packed_w");
  const ConvGeometry g = check_conv_args(packed_x, packed_w, in_channels, stride, padding, pad_value,
                                         scale, bias, residual);
  const at::ScalarType dtype = conv_out_dtype(out_dtype);
  const int64_t taps = g.KH * g.KW, K_words = taps * g.Cw, M = g.N * g.Ho * g.Wo;
  TORCH_CHECK(taps * in_channels < (int64_t(1) << 24) && g.N * g.H * g.W * g.Cw < (int64_t(1) << 62) &&
                  g.H < (1 << 30) && g.W < (1 << 30) && g.O < (1 << 30),
              "binary_conv2d (CUDA): problem too large for 32-bit indices per image");
  const c10::cuda::CUDAGuard guard(packed_x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor x = packed_x.contiguous(), w = packed_w.contiguous();
  at::Tensor scale_c, bias_c, residual_c;
  if (scale) {
    check_cuda_tensor(*scale, packed_x, "scale");
    scale_c = scale->contiguous();
  }
  if (bias) {
    check_cuda_tensor(*bias, packed_x, "bias");
    bias_c = bias->contiguous();
  }
  if (residual) {
    check_cuda_tensor(*residual, packed_x, "residual");
    residual_c = residual->contiguous(at::MemoryFormat::ChannelsLast);  // (N, Ho, Wo, O) in memory
  }

  ConvParams p{};
  p.x = reinterpret_cast<const uint64_t*>(x.data_ptr<int64_t>());
  p.w = reinterpret_cast<const uint64_t*>(w.data_ptr<int64_t>());
  p.M = M;
  p.H = g.H, p.W = g.W, p.Cw = g.Cw, p.O = g.O, p.Ow = words_for(g.O), p.KH = g.KH, p.KW = g.KW;
  p.Ho = g.Ho, p.Wo = g.Wo, p.stride = stride, p.padding = padding, p.K_words = K_words;
  p.K = taps * in_channels;
  p.tail_mask = valid_bits(g.Cw - 1, in_channels);
  p.fill_full = pad_value == 1.0 ? ~uint64_t(0) : 0;
  p.fill_tail = pad_value == 1.0 ? p.tail_mask : 0;
  p.scale = scale ? scale_c.data_ptr<float>() : nullptr;
  p.bias = bias ? bias_c.data_ptr<float>() : nullptr;
  p.residual = residual ? residual_c.data_ptr() : nullptr;
  p.residual_bf16 = residual && residual_c.scalar_type() == at::kBFloat16;
  p.out_bf16 = dtype == at::kBFloat16;

  at::Tensor out = at::empty({g.N, g.Ho, g.Wo, g.O}, x.options().dtype(dtype));
  fill_if_debugging(out);
  p.out = out.data_ptr();
  at::Tensor packed_out;
  if (pack_output) {
    packed_out = at::empty({g.N, g.Ho, g.Wo, p.Ow}, x.options());
    fill_if_debugging(packed_out);
    p.packed_out = reinterpret_cast<uint64_t*>(packed_out.data_ptr<int64_t>());
  }
  if (M == 0 || g.O == 0) return {out.permute({0, 3, 1, 2}), packed_out};  // (a zero-block grid is a launch error)

  // bmma_halo, bmma_halo_w and bmma_halo_p run what they support, then bmma_lean what it supports,
  // then bmma the rest; bmma_lean1 and bmma_split what the lean epilogue supports, then bmma.
  const std::string path = cuda_path();
  const bool halo_path = path == "bmma_halo" || path == "bmma_halo_w" || path == "bmma_halo_p";
  const HaloKind halo_kind = path == "bmma_halo_w"   ? HaloKind::kSharedWeights
                             : path == "bmma_halo_p" ? HaloKind::kPersistent
                                                     : HaloKind::kPlain;
  const bool halo = halo_path && halo_supports(p, halo_kind);
  const bool one_mma = path == "bmma_lean1", split = path == "bmma_split";
  const bool lean = !halo && (path == "bmma_lean" || halo_path || one_mma || split) && lean_supports(p);
  const bool zero_padding = pad_value == 0.0 && padding > 0;  // then the border pixels need a correction
  at::Tensor tap_sums, border_classes;
  if (zero_padding && (halo || lean)) {  // the lean epilogue's table of border classes
    const int64_t P = padding + 1;
    if (given_classes) {  // made once for these weights (cuda_ext.ops.border_classes)
      check_cuda_tensor(*given_classes, packed_x, "border_classes");
      TORCH_CHECK(given_classes->scalar_type() == at::kInt && given_classes->dim() == 2 &&
                      given_classes->size(0) == P * P * P * P && given_classes->size(1) == g.O,
                  "binary_conv2d (CUDA): border_classes must be int32 (", P * P * P * P, ", ", g.O,
                  ") for padding ", padding, " and ", g.O, " output channels, got ", given_classes->scalar_type(),
                  " ", given_classes->sizes());
      border_classes = given_classes->contiguous();
    } else {
      border_classes = at::empty({P * P * P * P, g.O}, x.options().dtype(at::kInt));
      fill_border_classes(p, border_classes.data_ptr<int32_t>(), static_cast<int>(in_channels), stream);
    }
  } else if (zero_padding) {
    tap_sums = at::empty({taps, g.O}, x.options().dtype(at::kInt));
    tap_sums_kernel<<<blocks_for(g.O * taps), kThreads, 0, stream>>>(
        p.w, g.O, taps, g.Cw, in_channels, p.tail_mask, tap_sums.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    p.tap_sums = tap_sums.data_ptr<int32_t>();
  }

  if (path == "simt") {
    binary_conv2d_simt_kernel<<<blocks_for(M * p.Ow * 64), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out.permute({0, 3, 1, 2}), packed_out};
  }
  const int major = compute_capability_major(packed_x.get_device());
  TORCH_CHECK(major >= 8, "binary_conv2d (CUDA): the tensor-core path needs sm_80 or newer, this "
                          "device is sm_", major, "x; set_cuda_path('simt') runs on CUDA cores");
  const dim3 grid((M + kBlockRows - 1) / kBlockRows, (g.O + kWarpCols - 1) / kWarpCols);
  const int32_t* classes = border_classes.defined() ? border_classes.data_ptr<int32_t>() : nullptr;
  if (halo) {
    launch_bmma_halo(p, classes, stream, halo_kind);
  } else if (lean && split) {
    launch_bmma_split(p, classes, grid, stream);
  } else if (lean) {
    launch_bmma_lean(p, classes, grid, stream, one_mma);
  } else if (path == "bmma_async") {
    binary_conv2d_bmma_async_kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(p);
  } else {  // bmma, and the calls the lean and halo paths do not support
    binary_conv2d_bmma_kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out.permute({0, 3, 1, 2}), packed_out};  // (N, O, Ho, Wo) in channels-last memory
}

}  // namespace

at::Tensor pack_signs_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "pack_signs (CUDA): x must be a CUDA tensor");
  check_pack_args(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Cw = words_for(C);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);  // NHWC in memory
  at::Tensor out = at::empty({N, H, W, Cw}, x.options().dtype(at::kLong));
  fill_if_debugging(out);
  const int64_t words = N * H * W * Cw;
  if (words == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pack_signs_cuda", [&] {
    pack_signs_kernel<scalar_t><<<blocks_for(words * 32), kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), N * H * W, C, Cw, reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> max_pool_signs_cuda(const at::Tensor& x, int64_t kernel_size, int64_t stride,
                                                       int64_t padding, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "max_pool_signs (CUDA): x must be a CUDA tensor");
  const PoolGeometry g = check_pool_args(x, kernel_size, stride, padding, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);  // NHWC in memory
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.N, g.Ho, g.Wo, g.C}, x.options());  // NHWC; returned as an (N, C, Ho, Wo) view
  at::Tensor packed = at::empty({g.N, g.Ho, g.Wo, words_for(g.C)}, x.options().dtype(at::kLong));
  fill_if_debugging(out);
  fill_if_debugging(packed);
  const int64_t words = g.N * g.Ho * g.Wo * words_for(g.C);
  if (words > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool_signs_cuda", [&] {
      max_pool_signs_kernel<scalar_t><<<blocks_for(words * 32), kThreads, 0, stream>>>(
          xc.data_ptr<scalar_t>(), bias.has_value() ? bc.data_ptr<scalar_t>() : nullptr, g, out.data_ptr<scalar_t>(),
          reinterpret_cast<uint64_t*>(packed.data_ptr<int64_t>()));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out.permute({0, 3, 1, 2}), packed};
}

at::Tensor binary_conv2d_cuda(const at::Tensor& packed_x, const at::Tensor& packed_w,
                              int64_t in_channels, int64_t stride, int64_t padding, double pad_value,
                              const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual,
                              std::optional<at::ScalarType> out_dtype,
                              const std::optional<at::Tensor>& border_classes) {
  return std::get<0>(conv_cuda(packed_x, packed_w, in_channels, stride, padding, pad_value, scale,
                               bias, residual, out_dtype, /*pack_output=*/false, border_classes));
}

std::tuple<at::Tensor, at::Tensor> binary_block_cuda(
    const at::Tensor& packed_x, const at::Tensor& packed_w, int64_t in_channels, int64_t stride,
    int64_t padding, double pad_value, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    std::optional<at::ScalarType> out_dtype, const std::optional<at::Tensor>& border_classes) {
  return conv_cuda(packed_x, packed_w, in_channels, stride, padding, pad_value, scale, bias, residual,
                   out_dtype, /*pack_output=*/true, border_classes);
}

}  // namespace bireal

TORCH_LIBRARY_IMPL(bireal, CUDA, m) {
  m.impl("pack_signs", &bireal::pack_signs_cuda);
  m.impl("binary_conv2d", &bireal::binary_conv2d_cuda);
  m.impl("binary_block", &bireal::binary_block_cuda);
  m.impl("max_pool_signs", &bireal::max_pool_signs_cuda);
}
