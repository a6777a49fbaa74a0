// The device code both tensor-core kernels files share (binary_conv_cuda.cu: the verified `bmma`
// and `bmma_async` kernels; binary_conv_lean.cu: `bmma_lean`): the kernel parameters, a warp's
// 32 x 64 tile of AND-popc MMAs over the implicit im2col rows, and the launch of the lean kernel.
// Layouts and the arithmetic are explained at the top of binary_conv_cuda.cu.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <utility>

namespace bireal {

struct ConvParams {
  const uint64_t* x;          // (N, H, W, Cw) packed input
  const uint64_t* w;          // (O, KH, KW, Cw) packed weights = (O, K_words)
  const int32_t* tap_sums;    // (KH * KW, O) sum of +-1 weights per tap; null: no correction
  const float* scale;         // (O,) or null
  const float* bias;          // (O,) or null
  const void* residual;       // (N, Ho, Wo, O) channels-last, float32 or bfloat16, or null
  void* out;                  // (N, Ho, Wo, O), float32 or bfloat16
  uint64_t* packed_out;       // (N, Ho, Wo, Ow) signs of out, or null
  int64_t M;                  // N * Ho * Wo output pixels
  int H, W, Cw, O, Ow, KH, KW, Ho, Wo, stride, padding, K_words;
  int K;                      // KH * KW * C valid positions per output
  uint64_t tail_mask;         // valid bits of a pixel's last word
  uint64_t fill_full, fill_tail;  // border words (pad +1: valid bits; else 0)
  bool residual_bf16, out_bf16;   // element types of residual and out (false: float32)
};

// The zero-padding correction of bmma_lean, per border class of an output pixel: how many tap rows
// fall outside the image above (a) and below (b), tap columns left (c) and right (d), each in
// [0, padding]; class ((a * P + b) * P + c) * P + d with P = padding + 1 (docs/cuda.md).
struct BorderClasses {
  const int32_t* table;  // (P^4, O): the sum of the +-1 weights of the taps outside, per class; or null
  int P;                 // padding + 1
};

// Whether bmma_lean (binary_conv_lean.cu) computes this call itself; otherwise `bmma` runs it.
bool lean_supports(const ConvParams& p);
// The bmma_halo kernels (binary_conv_halo.cu): bmma_halo, bmma_halo_w (the block's weights in shared
// memory too) and bmma_halo_p (persistent blocks, the next tile's halo and residuals copied in
// while one is computed).
enum class HaloKind { kPlain, kSharedWeights, kPersistent };
// Whether that kernel computes this call itself: what bmma_lean supports, with what it keeps in
// shared memory within what it may use.
bool halo_supports(const ConvParams& p, HaloKind kind);
// Fills `table` (P^4 * O int32) with the border classes of p.w, for bmma_lean and bmma_halo.
void fill_border_classes(const ConvParams& p, int32_t* table, int in_channels, cudaStream_t stream);
// cudaDeviceGetAttribute(attribute, device), read once per attribute and device.
int device_attribute(cudaDeviceAttr attribute, int device);

// Whether the lean and halo kernels launch with programmatic dependent launch on `device`
// (programmatic_launch() and sm_90 or newer).
bool programmatic_launch_on(int device);

// Launch bmma_lean (grid as bmma's; with one_mma, bmma_lean1: one AND-popc MMA per tile and k-step)
// and bmma_halo (its own grid); `table`: the border-class table, or null when no correction is needed.
void launch_bmma_lean(const ConvParams& p, const int32_t* table, dim3 grid, cudaStream_t stream, bool one_mma);
void launch_bmma_halo(const ConvParams& p, const int32_t* table, cudaStream_t stream, HaloKind kind);
// Launch bmma_split (grid as bmma's): bmma_lean with its k-steps split over a cluster of blocks
// where the grid has too few blocks for the device (split_k_plan), bmma_lean itself otherwise.
void launch_bmma_split(const ConvParams& p, const int32_t* table, dim3 grid, cudaStream_t stream);

namespace {

// Programmatic dependent launch, device side (sm_90+; elsewhere, and in a kernel launched without
// it, nothing happens): wait until the kernel before this one in the stream has finished and its
// writes are visible (griddepcontrol.wait; SASS ACQBULK), to be called before reading anything it
// may have written; and let the next kernel start launching (griddepcontrol.launch_dependents;
// SASS PREEXIT) once every block of this one has called it or exited.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void let_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Launches `kernel` in clusters of `cluster_z` blocks along the grid's z (bmma_split; 1: no
// clusters), with programmatic dependent launch where programmatic_launch_on(device).
template <class... Params, class... Args>
void launch_kernel_in_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                               cudaStream_t stream, int device, unsigned cluster_z, Args&&... args) {
  cudaLaunchAttribute attributes[2]{};
  unsigned count = 0;
  if (cluster_z > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = 1, attributes[count].val.clusterDim.y = 1;
    attributes[count++].val.clusterDim.z = cluster_z;
  }
  if (programmatic_launch_on(device)) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (count == 0) {
    kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
    return;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = shared_bytes, config.stream = stream;
  config.attrs = attributes, config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// Launches `kernel`, with programmatic dependent launch where programmatic_launch_on(device).
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   int device, Args&&... args) {
  launch_kernel_in_clusters(kernel, grid, block, shared_bytes, stream, device, 1, std::forward<Args>(args)...);
}

constexpr int kWarpRows = 32;                   // output pixels per warp (2 m16 tiles)
constexpr int kWarpCols = 64;                   // output channels per warp (8 n8 tiles = 1 word)
constexpr int kWarpsPerBlock = 4;               // stacked along pixels: a block is 128 x 64
constexpr int kBlockRows = kWarpRows * kWarpsPerBlock;
constexpr int kChunkWords = 4;                  // one k-step = 256 bits = 4 words of 64

__device__ __forceinline__ uint64_t valid_mask(const ConvParams& p, int c) {
  return c == p.Cw - 1 ? p.tail_mask : ~uint64_t(0);
}

// Geometry of one output pixel: its image's first input word and the top-left tap's position.
struct PixelOrigin {
  int64_t image_base;  // offset of (n, 0, 0, 0) in x
  int ih0, iw0;        // oh * stride - padding, ow * stride - padding
  bool valid;          // row < M
};

__device__ __forceinline__ PixelOrigin pixel_origin(const ConvParams& p, int64_t row) {
  PixelOrigin o{0, 0, 0, row < p.M};
  const int64_t r = o.valid ? row : 0;
  const int64_t n = r / (int64_t(p.Ho) * p.Wo);
  const int rem = static_cast<int>(r - n * p.Ho * p.Wo);
  o.image_base = n * p.H * p.W * p.Cw;
  o.ih0 = (rem / p.Wo) * p.stride - p.padding;
  o.iw0 = (rem % p.Wo) * p.stride - p.padding;
  return o;
}

// Word `kw` (tap-major, then channel word) of the implicit im2col row of pixel `o`.
__device__ __forceinline__ uint64_t load_input_word(const ConvParams& p, const PixelOrigin& o, int tap,
                                                    int c) {
  if (!o.valid) return 0;
  const int kh = tap / p.KW, kw = tap - kh * p.KW;
  const int ih = o.ih0 + kh, iw = o.iw0 + kw;
  if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) return c == p.Cw - 1 ? p.fill_tail : p.fill_full;
  return __ldg(reinterpret_cast<const unsigned long long*>(p.x) + o.image_base +
               (int64_t(ih) * p.W + iw) * p.Cw + c);
}

__device__ __forceinline__ uint32_t lo32(uint64_t v) { return static_cast<uint32_t>(v); }
__device__ __forceinline__ uint32_t hi32(uint64_t v) { return static_cast<uint32_t>(v >> 32); }

// acc += popc(A & B) over one 16 x 8 x 256 tile. Fragments (PTX ISA, m16n8k256 .b1), with
// g = lane / 4 and t = lane % 4: a0 = row g, bits [32t, 32t + 32); a1 = row g + 8, same bits;
// a2 = row g, bits [128 + 32t, ...); a3 = row g + 8, same; b0 = column g, bits [32t, ...);
// b1 = column g, bits [128 + 32t, ...); acc: rows g (c0, c1) and g + 8 (c2, c3), columns 2t, 2t + 1.
__device__ __forceinline__ void mma_and_popc(int (&acc)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the host dispatch never launches the tensor-core kernel below sm_80
#endif
}

// cp.async helpers (sm_80+): global -> shared copies that bypass the registers, committed and awaited
// as groups (bmma_async stages its operands with them, bmma_halo its residual tile).
__device__ __forceinline__ void cp_async_8(uint64_t* smem, const uint64_t* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem));
#else
  *smem = *gmem;
#endif
}

// 16 bytes, both addresses 16-byte aligned; with `valid` false the 16 bytes are zeros and nothing is
// read (src-size 0), so `gmem` only has to be a valid pointer.
__device__ __forceinline__ void cp_async_16_or_zeros(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
#else
  __trap();  // the host dispatch never launches the tensor-core kernels below sm_80
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

__device__ __forceinline__ void cp_async_wait_all_but_one() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 1;\n" ::);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// The warp's 32 x 64 accumulators: thread (g, t) holds, for tile mt (0, 1) and fragment half h (row g
// or g + 8), columns nt * 8 + 2t + {0, 1}.
using WarpAcc = int[2][8][4];

__device__ __forceinline__ void zero(WarpAcc& acc) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0;
}

// One k-step of the warp: a[mt][h] is this thread's word of row (mt, h), b[nt] its word of column nt
// (masked to the valid channels), mask the valid bits of that word (0 past K_words).
__device__ __forceinline__ void mma_step(WarpAcc& acc, const uint64_t (&a)[2][2], const uint64_t (&b)[8],
                                         uint64_t mask) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const uint64_t nb = ~b[nt] & mask;  // the -1 weights as ones
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const uint64_t x0 = a[mt][0], x1 = a[mt][1];
      mma_and_popc(acc[mt][nt], lo32(x0), lo32(x1), hi32(x0), hi32(x1), lo32(b[nt]), hi32(b[nt]));
      mma_and_popc(acc[mt][nt], ~lo32(x0), ~lo32(x1), ~hi32(x0), ~hi32(x1), lo32(nb), hi32(nb));
    }
  }
}

// One k-step of the warp with one AND-popc MMA per tile (bmma_halo): acc counts the positions where
// input and weight are both +1; b[nt] is already masked to the valid channels, so garbage past C in
// a cannot count. dots_from_and_counts turns the counts into dot products.
__device__ __forceinline__ void mma_step_and(WarpAcc& acc, const uint64_t (&a)[2][2], const uint64_t (&b)[8]) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
      mma_and_popc(acc[mt][nt], lo32(a[mt][0]), lo32(a[mt][1]), hi32(a[mt][0]), hi32(a[mt][1]), lo32(b[nt]),
                   hi32(b[nt]));
}

// What the one-MMA k-steps count besides acc, in this thread's word t of each k-step: the +1 inputs
// of each of its rows (mt, h) and the +1 weights of each of its columns nt * 8 + g, valid bits only.
struct PlusOnes {
  int a[2][2];
  int b[8];
};

// The (tap, channel word) of k-word kw of the implicit im2col row, and the valid bits of that word.
struct KWord {
  bool in_k;
  int tap, c;
  uint64_t mask;  // 0 past K_words
};

__device__ __forceinline__ KWord k_word(const ConvParams& p, int kw) {
  KWord k{kw < p.K_words, 0, 0, 0};
  if (k.in_k) {
    k.tap = kw / p.Cw;
    k.c = kw - k.tap * p.Cw;
    k.mask = valid_mask(p, k.c);
  }
  return k;
}

// The weight word of k-word `kword` for column `col` of the warp's tile (nt * 8 + g), through the
// read-only cache; 0 past O. (One 64-bit base and 32-bit offsets: the kernels run at their register
// bound, and a 64-bit product per load spilled bmma_lean1 on sm_80.)
struct WeightsFromGlobal {
  const unsigned long long* w;  // the first word of column warp_col0
  int k_words, cols;            // words per column; columns from warp_col0 to O

  __device__ __forceinline__ WeightsFromGlobal(const ConvParams& p, int warp_col0)
      : w(reinterpret_cast<const unsigned long long*>(p.w) + int64_t(warp_col0) * p.K_words),
        k_words(p.K_words),
        cols(p.O - warp_col0) {}

  __device__ __forceinline__ uint64_t operator()(int col, int kword) const {
    return col < cols ? __ldg(w + col * k_words + kword) : 0;  // < 64 * K_words: fits an int
  }
};

// The k-steps [first, end) of the reduction a warp accumulates: all of them, or with split-K
// (bmma_split) the range of its block's split.
struct StepRange {
  int first = 0, end = INT_MAX;
};

// A warp's 32 (pixels) x 64 (channels) tile of counts, accumulated over every k-step: agreements
// (two AND-popc MMAs per tile and k-step, mma_step), or with kOneMma the positions where both are
// +1 (one MMA, mma_step_and) and the +1 counts in `ones`. Each thread (g, t) owns 64-bit word t of
// every 256-bit k-step: its low half is the a0/b0 slot and its high half the a2/b1 slot, and A and B
// use the same assignment, so bit k of A meets bit k of B. `load_a(k, a)` gives the thread's input
// words of k-word k for its rows, a[mt][h] (0 past K_words): from global memory (bmma, bmma_lean)
// or from a halo in shared memory (bmma_halo); `load_b(col, kword)` the weight word of a column of
// the warp's tile: through the read-only cache (WeightsFromGlobal) or from shared memory. The next
// step's loads are in flight during this step's MMAs. `range`: the k-steps to accumulate (all by
// default).
template <bool kOneMma = false, class LoadA, class LoadB>
__device__ __forceinline__ void warp_agreements_with(const ConvParams& p, LoadA&& load_a, LoadB&& load_b, int g,
                                                     int t, WarpAcc& acc, PlusOnes* ones = nullptr,
                                                     StepRange range = {}) {
  zero(acc);
  if constexpr (kOneMma) {
#pragma unroll
    for (int i = 0; i < 4; ++i) ones->a[i / 2][i % 2] = 0;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) ones->b[nt] = 0;
  }
  const int first = range.first, end = min(range.end, (p.K_words + kChunkWords - 1) / kChunkWords);
  if (first >= end) return;
  uint64_t a[2][2], b[8];
  // Loads of k-step s into a, b (zero past K_words: contributes nothing to either MMA).
  auto load_step = [&](int s) {
    const KWord k = k_word(p, s * kChunkWords + t);
    load_a(k, a);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) b[nt] = k.in_k ? load_b(nt * 8 + g, s * kChunkWords + t) & k.mask : 0;
    return k.mask;
  };

  uint64_t mask = load_step(first);
  for (int s = first; s < end; ++s) {
    uint64_t ca[2][2], cb[8];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) ca[mt][0] = a[mt][0], ca[mt][1] = a[mt][1];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) cb[nt] = b[nt];
    const uint64_t cmask = mask;
    if (s + 1 < end) mask = load_step(s + 1);  // next step's loads overlap this step's MMAs
    if constexpr (kOneMma) {
      mma_step_and(acc, ca, cb);
#pragma unroll
      for (int i = 0; i < 4; ++i) ones->a[i / 2][i % 2] += __popcll(ca[i / 2][i % 2] & cmask);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) ones->b[nt] += __popcll(cb[nt]);
    } else {
      mma_step(acc, ca, cb, cmask);
    }
  }
}

// The dot products of the zero-padding-as--1 conv from two-MMA agreements: dot = 2 * agree - K.
__device__ __forceinline__ void dots_from_agreements(WarpAcc& acc, int K) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 2 * acc[mt][nt][i] - K;
}

// The same dot products from one-MMA counts: with input bits a and weight bits b over the K valid
// positions, sum (2a - 1)(2b - 1) = 4 * sum(ab) - 2 * P_a - 2 * P_b + K, P_a the +1 inputs of the
// row and P_b the +1 weights of the column. Every lane of the warp calls it (shuffles): a row's P_a
// is the sum of its 4 lanes' words (t = 0..3), and column nt * 8 + c's P_b, summed in quad g = c, is
// fetched by the lanes that hold its outputs (columns 2t and 2t + 1: quads 2t and 2t + 1).
__device__ __forceinline__ void dots_from_and_counts(WarpAcc& acc, const PlusOnes& ones, int K, int t) {
  int pa[2][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int v = ones.a[i / 2][i % 2];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    pa[i / 2][i % 2] = v + __shfl_xor_sync(0xffffffffu, v, 2);
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    int v = ones.b[nt];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);  // P_b of column nt * 8 + g, in every lane of quad g
    const int pb0 = __shfl_sync(0xffffffffu, v, 8 * t), pb1 = __shfl_sync(0xffffffffu, v, 8 * t + 4);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        acc[mt][nt][2 * h] = 4 * acc[mt][nt][2 * h] - 2 * pa[mt][h] - 2 * pb0 + K;
        acc[mt][nt][2 * h + 1] = 4 * acc[mt][nt][2 * h + 1] - 2 * pa[mt][h] - 2 * pb1 + K;
      }
  }
}

// warp_agreements_with the input words gathered from global memory, pixel by pixel (`pix`: the
// warp's rows); border taps read the fill word, which P_a counts as the MMA sees it (kOneMma).
template <bool kOneMma = false>
__device__ __forceinline__ void warp_agreements(const ConvParams& p, const PixelOrigin (&pix)[2][2],
                                                int warp_col0, int g, int t, WarpAcc& acc,
                                                PlusOnes* ones = nullptr, StepRange range = {}) {
  auto gather = [&](const KWord& k, uint64_t (&a)[2][2]) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) a[mt][h] = k.in_k ? load_input_word(p, pix[mt][h], k.tap, k.c) : 0;
  };
  warp_agreements_with<kOneMma>(p, gather, WeightsFromGlobal{p, warp_col0}, g, t, acc, ones, range);
}

}  // namespace
}  // namespace bireal
