// bmma_halo and bmma_halo_w: issue 25's fused-block kernel. A block computes an 8 x 16 rectangle
// of one image's output pixels (its 4 warps 2 output rows each: an m16 tile is 16 adjacent pixels of
// one row) for 64 output channels.
// - The halo: the block first copies the input its pixels' taps touch, ((8 - 1) * stride + KH) rows
//   x ((16 - 1) * stride + KW) pixels x Cw words, into shared memory, border pixels as fill words,
//   each halo row one contiguous, coalesced run of global memory. The main loop then reads its A
//   operands from there: no bounds checks, one offset per k-step, and every input word read from
//   global memory about 1.4 times per block (stride 1, 3x3) instead of once per tap.
// - One AND-popc MMA per tile and k-step instead of bmma's two (a & b, then ~a & ~b): the k-steps
//   also count the +1 inputs of each row (P_a) and the +1 weights of each column (P_b), and
//   dot = 4 * popc(a & b) - 2 * P_a - 2 * P_b + K (dots_from_and_counts, bmma_common.cuh). Exact
//   for every pad value: P_a counts the fill words the MMA sees.
// - The residual tile staged ahead (with a residual): the block's first instructions start
//   cp.async copies of its 128 pixels x 64 channels of residual into shared memory, which land while
//   the halo is filled and the MMAs run; the epilogue reads them from there instead of waiting on
//   global memory per pair. (The residual is half the bytes a fused block moves.)
// - bf16 outputs stored 16 bytes at a time: the epilogue writes its pairs into the same tile (each
//   thread where its residual pair was), and after a barrier the block copies the tile out, each
//   pixel's 64 channels one 128-byte run, instead of 4-byte stores of 8 rows per instruction.
// - bmma_halo_w (the second template argument): the block's 64 weight columns copied into shared
//   memory too, as the first cp.async group, which the main loop waits for alone; bmma_halo reads
//   them through the read-only cache.
// - bmma_halo_p (binary_conv2d_bmma_halo_p_kernel): persistent blocks, as many as fit on the device
//   at once, each looping over work items (a tile and its 64 channels, channels fastest, so blocks
//   running together read the same input from L2), with two buffers of halo + staged tile: while
//   a block computes one item from buffer b, cp.async copies fill buffer b ^ 1 with the next item's
//   halo and residuals (one group per item), so no item waits for its input the way a freshly
//   launched block does.
// - Programmatic dependent launch (ops.programmatic_launch): the kernel waits for the one before it
//   first thing, and lets the next one launch after its (last) main loop.
// The epilogue is the lean one (lean_epilogue.cuh), so the outputs equal bmma's bit for bit.
//
// Shapes:
//   halo    (HR, HC, Cw) words in dynamic shared memory, HR = 7 * stride + KH, HC = 15 * stride + KW
//   weights (64, WS) words after the halo (bmma_halo_w), WS = K_words padded to 4 mod 16
//   staged  (128, RS) residuals and bf16 outputs after those (16-byte aligned), RS = 72 (bf16) or
//           68 (float32)
//   grid   (N * ceil(Ho / 8) * ceil(Wo / 16), ceil(O / 64)): x the image and tile, y the channel word
//   bmma_halo_p: two buffers of (halo, staged); grid (resident blocks), item i = tile * ceil(O / 64)
//           + channel word, block x taking items x, x + grid, x + 2 * grid, ...
// Pixel (r, c) of the tile (r = 2 * warp + mt, c = 8 * h + g) reads tap (kh, kw), word w of its
// input pixel at halo[((r * stride + kh) * HC + c * stride + kw) * Cw + w].
#include "binary_conv.h"
#include "lean_epilogue.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace bireal {
namespace {

constexpr int kTileRows = 8, kTileCols = 16;  // output pixels of a block: 4 warps x 2 rows of 16
static_assert(kTileRows * kTileCols == kBlockRows, "a block's tile is its 4 warps' 32 pixels each");
constexpr int64_t kMaxSharedBytes = 48 * 1024;  // dynamic shared memory without an opt-in; 3 blocks per SM fit
// bmma_halo_w, which also holds the block's weights, and bmma_halo_p, with two buffers, opt in to
// more (up to what the device allows): 100 KB still lets 2 blocks run per SM on an A100 (164 KB) and
// 2-3 on an H100 (228 KB).
constexpr int64_t kMaxSharedBytesOptIn = 100 * 1024;

// threadIdx.x, read where it is called: a volatile read, which the compiler does not move out of a
// loop. bmma_halo_p's loop over work items uses it (in its copies too): nvcc hoisted what threadIdx.x
// gives (each thread's copy offsets, the staged tile's rows) out of that loop, and sm_80 spilled at
// the 168-register bound.
__device__ __forceinline__ int thread_index_now() {
  int index;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(index));
  return index;
}

struct HaloShape {
  int rows, cols;        // input pixels: HR, HC
  int tiles_h, tiles_w;  // tiles per image
  int64_t words;         // of the halo, rounded up to 16 bytes: where the weights (or the staged tile) start
  int w_stride;          // bmma_halo_w: words per weight column in shared memory (K_words padded); else 0
  int64_t w_words;       // bmma_halo_w: 64 * w_stride, after the halo; else 0
  int buffer_words;      // bmma_halo_p: one buffer, the halo and the staged tile
};

// A column of weights in shared memory takes K_words words padded to 4 mod 16: the 16 threads of a
// half warp read columns g, g + 1, g + 2, g + 3 at words t = 0..3 of a k-step, and with the columns
// 4 mod 16 words (8 banks) apart those 16 8-byte words fall in 32 different banks.
int weight_stride(int k_words) { return k_words + ((4 - k_words) % 16 + 16) % 16; }

// A staged residual pixel's row, in elements: 64 channels and 8 (bf16) or 4 (float32) more, so that
// consecutive pixels start 4 banks apart and a warp's reads (8 pixels x 4 column pairs) do not
// conflict; 144 or 272 bytes, multiples of 16 for the copies.
template <class Elem>
constexpr int staged_stride() {
  return sizeof(Elem) == 2 ? kWarpCols + 8 : kWarpCols + 4;
}

// The staged tile (the residuals, and bf16 outputs for 16-byte stores): 128 pixels x stride elements.
bool stages_a_tile(const ConvParams& p) { return p.residual != nullptr || p.out_bf16; }

int64_t staged_tile_bytes(const ConvParams& p) {
  if (!stages_a_tile(p)) return 0;
  return p.out_bf16 ? int64_t(kBlockRows) * staged_stride<__nv_bfloat16>() * 2
                    : int64_t(kBlockRows) * staged_stride<float>() * 4;
}

HaloShape halo_shape(const ConvParams& p, HaloKind kind) {
  const int rows = (kTileRows - 1) * p.stride + p.KH, cols = (kTileCols - 1) * p.stride + p.KW;
  const int w_stride = kind == HaloKind::kSharedWeights ? weight_stride(p.K_words) : 0;
  const int64_t words = (int64_t(rows) * cols * p.Cw + 1) / 2 * 2;
  return {rows, cols, (p.Ho + kTileRows - 1) / kTileRows, (p.Wo + kTileCols - 1) / kTileCols,
          words, w_stride, int64_t(kWarpCols) * w_stride,
          static_cast<int>(std::min<int64_t>(words + staged_tile_bytes(p) / int64_t(sizeof(uint64_t)), INT_MAX))};
}

int64_t shared_bytes(const ConvParams& p, HaloKind kind) {
  const HaloShape s = halo_shape(p, kind);
  if (kind == HaloKind::kPersistent) return 2 * s.buffer_words * int64_t(sizeof(uint64_t));
  return (s.words + s.w_words) * int64_t(sizeof(uint64_t)) + staged_tile_bytes(p);
}

// Starts the copies of the block's 64 weight columns (col0 on) into `weights` (64, w_stride), 8
// bytes each: the columns are one contiguous run of memory; columns past O are zeros. One group.
__device__ __forceinline__ void stage_weights(const ConvParams& p, uint64_t* weights, int w_stride, int col0) {
  const uint64_t* w = p.w + int64_t(col0) * p.K_words;
  const int words = min(kWarpCols, p.O - col0) * p.K_words;
  for (int i = threadIdx.x; i < kWarpCols * p.K_words; i += kWarpsPerBlock * 32) {
    const int col = i / p.K_words, kword = i - col * p.K_words;
    if (i < words)
      cp_async_8(weights + col * w_stride + kword, w + i);
    else
      weights[col * w_stride + kword] = 0;
  }
  cp_async_commit();
}

// Copy i of the block's residual tile, 16 bytes: tile pixel i / copies per pixel (output row
// oh0 + pixel / 16, column ow0 + pixel % 16), from channel col0 + (i % copies per pixel) * elements
// per copy; `inside` the output or not (O % 8 == 0: a copy is all in or all out).
struct TileCopy {
  int first;       // its first element in the tile
  bool inside;
  int64_t offset;  // its first element in the residual tensor (0 outside)
};

template <class Elem>
__device__ __forceinline__ TileCopy tile_copy(const ConvParams& p, int i, int n, int oh0, int ow0, int col0) {
  constexpr int kPerCopy = 16 / sizeof(Elem), kCopies = kWarpCols / kPerCopy;  // per pixel: 8 or 16
  const int pixel = i / kCopies, copy = i - pixel * kCopies;
  const int oh = oh0 + pixel / kTileCols, ow = ow0 + pixel % kTileCols, col = col0 + copy * kPerCopy;
  const bool inside = oh < p.Ho && ow < p.Wo && col < p.O;
  return {pixel * staged_stride<Elem>() + copy * kPerCopy, inside,
          inside ? ((int64_t(n) * p.Ho + oh) * p.Wo + ow) * p.O + col : 0};
}

template <class Elem>
constexpr int copies_per_tile() {
  return kBlockRows * kWarpCols * int(sizeof(Elem)) / 16;
}

// Starts the copies of the block's residuals into `tile`, zeros outside the output (the caller
// commits them as a group).
template <class Elem>
__device__ __forceinline__ void stage_residual(const ConvParams& p, Elem* tile, int n, int oh0, int ow0, int col0) {
  const Elem* residual = static_cast<const Elem*>(p.residual);
  for (int i = thread_index_now(); i < copies_per_tile<Elem>(); i += kWarpsPerBlock * 32) {
    const TileCopy c = tile_copy<Elem>(p, i, n, oh0, ow0, col0);
    cp_async_16_or_zeros(tile + c.first, residual + c.offset, c.inside);
  }
}

// Writes the block's staged bf16 outputs to the output tensor, 16 bytes a store: thread (column,
// copy) stores channels col0 + 8 * copy .. + 7 of tile column `column`, row after row, so 8 consecutive
// threads store one pixel's 64 channels (128 contiguous bytes, read from 128 contiguous bytes of the
// tile) and a thread's offsets step by one output row.
__device__ __forceinline__ void store_staged_outputs(const ConvParams& p, const __nv_bfloat16* tile, int n, int oh0,
                                                     int ow0, int col0) {
  constexpr int kPerCopy = 8, kCopies = kWarpCols / kPerCopy;
  static_assert(kWarpsPerBlock * 32 == kTileCols * kCopies, "a thread per (tile column, copy)");
  const int column = threadIdx.x / kCopies, copy = threadIdx.x % kCopies;
  const int ow = ow0 + column, col = col0 + copy * kPerCopy;
  if (ow >= p.Wo || col >= p.O) return;  // O % 8 == 0: a copy is all in or all out
  auto* out = static_cast<__nv_bfloat16*>(p.out) + ((int64_t(n) * p.Ho + oh0) * p.Wo + ow) * p.O + col;
  const __nv_bfloat16* from = tile + column * staged_stride<__nv_bfloat16>() + copy * kPerCopy;
  const int rows = min(kTileRows, p.Ho - oh0);
  for (int r = 0; r < rows; ++r, out += int64_t(p.Wo) * p.O, from += kTileCols * staged_stride<__nv_bfloat16>())
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(from);
}

// Where a block's work item is: image n, output rows from oh0, columns from ow0, channels from col0.
struct TilePlace {
  int n, oh0, ow0, col0;
};

__device__ __forceinline__ TilePlace tile_place(const HaloShape& s, int image_tile, int col_block) {
  const int tiles = s.tiles_h * s.tiles_w;
  const int n = image_tile / tiles, tile = image_tile - n * tiles;
  return {n, tile / s.tiles_w * kTileRows, tile % s.tiles_w * kTileCols, col_block * kWarpCols};
}

// The halo of the tile at (n, oh0, ow0): word i is (row i / (HC * Cw), pixel, word) of the input from
// (oh0 * stride - padding, ow0 * stride - padding) on; outside the image, the fill word of the pad
// value. kAsync: the words inside the image by cp.async (the caller commits them), else loaded now.
template <bool kAsync>
__device__ __forceinline__ void fill_halo(const ConvParams& p, const HaloShape& s, uint64_t* halo, int n, int oh0,
                                          int ow0) {
  const int row_words = s.cols * p.Cw, ih0 = oh0 * p.stride - p.padding, iw0 = ow0 * p.stride - p.padding;
  const uint64_t* image = p.x + int64_t(n) * p.H * p.W * p.Cw;
  for (int i = thread_index_now(); i < s.rows * row_words; i += kWarpsPerBlock * 32) {
    const int r = i / row_words, j = i - r * row_words;
    const int col = j / p.Cw, c = j - col * p.Cw;
    const int ih = ih0 + r, iw = iw0 + col;
    const bool inside = ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
    const uint64_t* word = image + (int64_t(ih) * p.W + iw) * p.Cw + c;
    const uint64_t fill = c == p.Cw - 1 ? p.fill_tail : p.fill_full;
    if constexpr (kAsync) {
      if (inside)
        cp_async_8(halo + i, word);
      else
        halo[i] = fill;
    } else {
      halo[i] = inside ? __ldg(reinterpret_cast<const unsigned long long*>(word)) : fill;
    }
  }
}

// A thread's output rows in the tile (pixel (2 * warp + mt, 8 * h + g)) and, per row, the halo word of
// tap (0, 0), word 0 of its input window.
struct HaloRows {
  ThreadRows rows;
  int a_base[2][2];
};

__device__ __forceinline__ void set_halo_rows(HaloRows& hr, const ConvParams& p, const BorderClasses& border,
                                              const HaloShape& s, int warp, int g, int oh0, int ow0) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 2 * warp + mt, c = 8 * h + g;
      const int oh = oh0 + r, ow = ow0 + c;
      const PixelOrigin o{0, oh * p.stride - p.padding, ow * p.stride - p.padding, oh < p.Ho && ow < p.Wo};
      set_thread_row(hr.rows, mt, h, p, border, o);
      hr.a_base[mt][h] = (r * p.stride * s.cols + c * p.stride) * p.Cw;
    }
}

// The warp's dot products, A from the halo, one AND-popc MMA per tile and k-step; the weights from
// `weights` in shared memory (kSharedWeights) or through the read-only cache.
template <bool kSharedWeights>
__device__ __forceinline__ void halo_dots(const ConvParams& p, const HaloShape& s, const uint64_t* halo,
                                          const uint64_t* weights, const int (&a_base)[2][2], int warp_col0, int g,
                                          int t, WarpAcc& acc) {
  auto from_halo = [&](const KWord& k, uint64_t (&a)[2][2]) {
    const int kh = k.tap / p.KW, kw = k.tap - kh * p.KW;
    const int offset = (kh * s.cols + kw) * p.Cw + k.c;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) a[mt][h] = k.in_k ? halo[a_base[mt][h] + offset] : 0;
  };
  PlusOnes ones;
  if constexpr (kSharedWeights) {
    auto from_shared = [&](int col, int kword) { return weights[col * s.w_stride + kword]; };
    warp_agreements_with</*kOneMma=*/true>(p, from_halo, from_shared, g, t, acc, &ones);
  } else {
    warp_agreements_with</*kOneMma=*/true>(p, from_halo, WeightsFromGlobal{p, warp_col0}, g, t, acc, &ones);
  }
  dots_from_and_counts(acc, ones, p.K, t);
}

// The lean epilogue of the tile at `at`: residuals from the staged tile (kStageResidual; with
// kAwaitResidual this waits for their copies first), bf16 outputs through it with 16-byte stores.
template <int kOpts, bool kAwaitResidual>
__device__ __forceinline__ void store_halo_tile(const ConvParams& p, const BorderClasses& border, const WarpAcc& acc,
                                                ThreadRows& rows, const TilePlace& at, void* staged, int warp, int g,
                                                int t) {
  using Elem = std::conditional_t<(kOpts & kOutBf16) != 0, __nv_bfloat16, float>;  // an output, a residual
  constexpr bool kStageResidual = (kOpts & kResidual) != 0, kStageOutput = (kOpts & kOutBf16) != 0;
  // Tile pixel (2 * warp + mt, 8 * h + g): one output row per mt (set after the main loop, as bmma_lean).
  rows.base = (int64_t(at.n) * p.Ho + at.oh0 + 2 * warp) * p.Wo + at.ow0 + g, rows.mt_stride = p.Wo;
  if constexpr (kStageResidual || kStageOutput) {
    if constexpr (kStageResidual && kAwaitResidual) {
      cp_async_wait_all();  // this thread's copies of the residual tile have landed
      __syncthreads();      // and every thread's
    }
    // tile pixel (2 * warp + mt, 8 * h + g) = 32 * warp + g + 16 * mt + 8 * h
    const StagedTile tile{staged, 32 * warp + g, staged_stride<Elem>()};
    store_lean<kOpts, kStageResidual, kStageOutput>(p, border, acc, rows, at.col0, t, tile);
    if constexpr (kStageOutput) {
      __syncthreads();  // every output of the tile is in it
      store_staged_outputs(p, static_cast<const __nv_bfloat16*>(staged), at.n, at.oh0, at.ow0, at.col0);
    }
  } else {
    store_lean<kOpts>(p, border, acc, rows, at.col0, t);
  }
}

// At most 168 registers, so that 3 blocks (12 warps) fit per SM as they do for bmma and bmma_lean.
constexpr int kMinBlocksPerSM = 3;

template <int kOpts, bool kSharedWeights>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kMinBlocksPerSM)
binary_conv2d_bmma_halo_kernel(const ConvParams p, const BorderClasses border, const HaloShape s) {
  wait_for_previous_kernel();  // (with programmatic dependent launch) before any read
  using Elem = std::conditional_t<(kOpts & kOutBf16) != 0, __nv_bfloat16, float>;  // an output, a residual
  constexpr bool kStageResidual = (kOpts & kResidual) != 0;
  extern __shared__ uint64_t halo[];  // (HR, HC, Cw), then the staged tile
  const TilePlace at = tile_place(s, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y));
  uint64_t* weights = halo + s.words;  // (64, w_stride) with kSharedWeights
  Elem* staged = reinterpret_cast<Elem*>(halo + s.words + s.w_words);
  // The copies in flight while the halo is filled: the weights (needed by the main loop), then the
  // residuals (needed by the epilogue), each one group, so the main loop waits for the first only.
  if constexpr (kSharedWeights) stage_weights(p, weights, s.w_stride, at.col0);
  if constexpr (kStageResidual) {
    stage_residual(p, staged, at.n, at.oh0, at.ow0, at.col0);
    cp_async_commit();
  }
  fill_halo</*kAsync=*/false>(p, s, halo, at.n, at.oh0, at.ow0);

  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x >> 5;
  HaloRows hr;
  set_halo_rows(hr, p, border, s, warp, g, at.oh0, at.ow0);
  if constexpr (kSharedWeights) {  // this thread's weight copies have landed (the residuals may not have)
    if constexpr (kStageResidual)
      cp_async_wait_all_but_one();
    else
      cp_async_wait_all();
  }
  __syncthreads();  // the halo (and the weights) are complete

  WarpAcc acc;
  halo_dots<kSharedWeights>(p, s, halo, weights, hr.a_base, at.col0, g, t, acc);
  let_next_kernel_launch();  // its blocks may be scheduled during this epilogue
  store_halo_tile<kOpts, /*kAwaitResidual=*/true>(p, border, acc, hr.rows, at, staged, warp, g, t);
}

// bmma_halo_p: persistent blocks, each taking work items blockIdx.x, + gridDim.x, ... of `items`
// (item = image tile * col_blocks + channel word), the next item's halo and residuals copied into
// the other of two buffers while this one's are used.
template <int kOpts>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kMinBlocksPerSM)
binary_conv2d_bmma_halo_p_kernel(const ConvParams p, const BorderClasses border, const HaloShape s, int items) {
  wait_for_previous_kernel();  // (with programmatic dependent launch) before any read
  using Elem = std::conditional_t<(kOpts & kOutBf16) != 0, __nv_bfloat16, float>;  // an output, a residual
  constexpr bool kStageResidual = (kOpts & kResidual) != 0;
  extern __shared__ uint64_t buffers[];  // 2 x (halo (HR, HC, Cw), staged tile): buffer_words each
  const int col_blocks = (p.O + kWarpCols - 1) / kWarpCols;
  auto place_of = [&](int item) { return tile_place(s, item / col_blocks, item % col_blocks); };
  // Starts the copies of `item`'s halo and residuals into buffer b, one group.
  auto stage = [&](int item, int b) {
    const TilePlace at = place_of(item);
    uint64_t* halo = buffers + b * s.buffer_words;
    fill_halo</*kAsync=*/true>(p, s, halo, at.n, at.oh0, at.ow0);
    if constexpr (kStageResidual) stage_residual(p, reinterpret_cast<Elem*>(halo + s.words), at.n, at.oh0, at.ow0, at.col0);
    cp_async_commit();
  };

  int item = blockIdx.x;  // < items: the grid is at most the items
  stage(item, 0);
  for (int b = 0;; b ^= 1) {
    if (item + gridDim.x < items) {  // items + grid < 2^31 (halo_supports)
      stage(item + gridDim.x, b ^ 1);  // buffer b ^ 1 was last read before the barrier that ended the previous item
      cp_async_wait_all_but_one();     // this thread's copies of `item` have landed
    } else {
      cp_async_wait_all();
    }
    // The thread's lane and warp read anew per item (thread_index_now).
    const int lane = thread_index_now() & 31, g = lane >> 2, t = lane & 3, warp = thread_index_now() >> 5;
    HaloRows hr;
    {
      const TilePlace at = place_of(item);
      set_halo_rows(hr, p, border, s, warp, g, at.oh0, at.ow0);
    }
    __syncthreads();  // every thread's copies of `item` (halo and residuals) have landed
    WarpAcc acc;
    halo_dots</*kSharedWeights=*/false>(p, s, buffers + b * s.buffer_words, nullptr, hr.a_base,
                                        item % col_blocks * kWarpCols, g, t, acc);
    const bool last = item + gridDim.x >= items;
    if (last) let_next_kernel_launch();  // the last item's epilogue is left
    // The item's place found again after the main loop, not kept in registers across it (kept,
    // sm_80 spilled at the 168-register bound).
    const TilePlace at = place_of(item);
    store_halo_tile<kOpts, /*kAwaitResidual=*/false>(p, border, acc, hr.rows, at, buffers + b * s.buffer_words + s.words,
                                                     warp, g, t);
    if (last) break;
    __syncthreads();  // every thread is done with buffer b before the next item's copies refill it
    item += gridDim.x;
  }
}

// The dynamic shared memory a block may use on this device with an opt-in.
int64_t opt_in_shared_bytes() {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device());
}

// Lets `kernel` take `bytes` of dynamic shared memory: over 48 KB a kernel needs an opt-in, set per
// kernel and device, here once for the largest size asked so far. (A shape's first call is made
// before a CUDA graph captures it: the benchmarks and the model warm up first.)
void allow_dynamic_shared_bytes(const void* kernel, int bytes) {
  if (bytes <= kMaxSharedBytes) return;
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> allowed;  // (device, kernel) -> bytes
  std::lock_guard<std::mutex> lock(mutex);
  int& set = allowed[{c10::cuda::current_device(), kernel}];
  if (bytes <= set) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  set = bytes;
}

// How many blocks of `kernel` (4 warps, `shared` bytes of dynamic shared memory each) run on the
// device at once: bmma_halo_p's grid. Asked once per (device, kernel, bytes), after the opt-in.
int64_t resident_blocks(const void* kernel, int shared, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int>, int64_t> found;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, kernel, shared);
  auto it = found.find(key);
  if (it == found.end()) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarpsPerBlock * 32, shared));
    const int64_t blocks = int64_t(std::max(per_sm, 1)) * device_attribute(cudaDevAttrMultiProcessorCount, device);
    it = found.emplace(key, blocks).first;
  }
  return it->second;
}

}  // namespace

bool halo_supports(const ConvParams& p, HaloKind kind) {
  const HaloShape s = halo_shape(p, kind);
  const int64_t max_bytes =
      kind == HaloKind::kPlain ? kMaxSharedBytes : std::min(kMaxSharedBytesOptIn, opt_in_shared_bytes());
  // grid.x (the image tiles) fits an int, and bmma_halo_p's work items with a grid more fit one too
  const int64_t image_tiles = p.M / (int64_t(p.Ho) * p.Wo) * s.tiles_h * s.tiles_w;
  const int64_t items = kind == HaloKind::kPersistent ? 2 * image_tiles * ((p.O + kWarpCols - 1) / kWarpCols) : image_tiles;
  return lean_epilogue_supports(p) && shared_bytes(p, kind) <= max_bytes && aligned(p.residual, 16) &&
         (!p.out_bf16 || aligned(p.out, 16)) && items < (int64_t(1) << 31);
}

void launch_bmma_halo(const ConvParams& p, const int32_t* table, cudaStream_t stream, HaloKind kind) {
  TORCH_CHECK(halo_supports(p, kind), "bmma_halo: called for a conv it does not support (halo_supports)");
  const BorderClasses border{table, p.padding + 1};
  const HaloShape s = halo_shape(p, kind);
  const int64_t image_tiles = p.M / (int64_t(p.Ho) * p.Wo) * s.tiles_h * s.tiles_w;
  const int col_blocks = (p.O + kWarpCols - 1) / kWarpCols;
  const int shared = static_cast<int>(shared_bytes(p, kind));
  const int device = c10::cuda::current_device();
  auto launch = [&](auto options) {
    constexpr int kOpts = decltype(options)::value;
    if (kind == HaloKind::kPersistent) {
      auto* kernel = binary_conv2d_bmma_halo_p_kernel<kOpts>;
      allow_dynamic_shared_bytes(reinterpret_cast<const void*>(kernel), shared);  // (two buffers: often over 48 KB)
      const int items = static_cast<int>(image_tiles * col_blocks);
      int64_t blocks = std::min<int64_t>(items, resident_blocks(reinterpret_cast<const void*>(kernel), shared, device));
      if (persistent_blocks() > 0) blocks = std::min<int64_t>(blocks, persistent_blocks());
      launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), kWarpsPerBlock * 32, shared, stream, device, p,
                    border, s, items);
    } else {
      auto* kernel = kind == HaloKind::kSharedWeights ? binary_conv2d_bmma_halo_kernel<kOpts, true>
                                                      : binary_conv2d_bmma_halo_kernel<kOpts, false>;
      allow_dynamic_shared_bytes(reinterpret_cast<const void*>(kernel), shared);  // (over 48 KB: bmma_halo_w)
      const dim3 grid(static_cast<unsigned>(image_tiles), col_blocks);
      launch_kernel(kernel, grid, kWarpsPerBlock * 32, shared, stream, device, p, border, s);
    }
  };
  const bool launched = with_lean_options(options_of(p), launch, LeanOptionSets{});
  TORCH_CHECK(launched, "bmma_halo: no kernel instantiated for options ", options_of(p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bireal
