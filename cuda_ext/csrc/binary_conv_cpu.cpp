// CPU implementation of the bireal ops: AVX-512 VPOPCNTDQ, AVX2 and portable code paths chosen
// at run time, multithreaded with at::parallel_for.
//
// binary_conv2d, direct (no im2col): the packed input is copied once into a border-padded buffer
// whose border words encode pad_value (+1: all valid bits set; -1 and 0: all clear), so every
// output pixel runs the same branch-free tap loop. For +-1 vectors of K valid bits,
//     dot = K - 2 * popcount(x XOR w)
// and tail bits past C are 0 in both operands, so they never count. Zero padding (pad_value 0)
// is then corrected exactly: a border tap filled with -1 contributed -S[o, tap], where
// S = sum of the +-1 weights at that tap, so border pixels add back +S for each such tap.
//
// Work is split into tasks of one output row x one block of 16 output channels. On AVX-512 a task
// is one call (row_avx512): groups of 8 pixels accumulate in 16 zmm registers and are finished
// from them (int32 dot, scale, bias, residual, store, and for the fused block the 16 sign bits
// from one compare, written into the block's 16-bit slice of the packed word). AVX2 and
// portable: the micro-kernel fills an int64 tile, then an epilogue (finish_*) finishes it; on AVX2
// from registers (finish_avx2_full), the weights split into nibbles for its popcount. On AVX-512
// and AVX2, outputs of 8 MiB and more are written with non-temporal stores, and the residual of
// the next row is prefetched. docs/kernels_cpu.md.
#include "binary_conv.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace bireal {
namespace {

enum class Path : int { Portable = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kOutBlock = 16;  // output channels per micro-kernel call

const char* path_name(Path p) {
  switch (p) {
    case Path::Avx512: return "avx512";
    case Path::Avx2: return "avx2";
    default: return "portable";
  }
}

bool supported(Path p) {
  switch (p) {
    case Path::Avx512:
      // every extension the avx512 functions are compiled for (BIREAL_AVX512)
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
    case Path::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    default: return true;
  }
}

Path best_path() {
  for (Path p : {Path::Avx512, Path::Avx2}) {
    if (supported(p)) return p;
  }
  return Path::Portable;
}

std::atomic<int> g_path{-1};  // -1 = not chosen yet

Path active_path() {
  int p = g_path.load();
  if (p < 0) {
    p = static_cast<int>(best_path());
    g_path.store(p);
  }
  return static_cast<Path>(p);
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels: acc[p * 16 + j] = sum over taps (kh, kw) and words cw of
//   popcount(x[p] at tap, word cw  XOR  w[j] at tap, word cw)
// for P consecutive output pixels of one row and one block of 16 output channels.
// x points at the top-left tap of pixel 0; pixel p starts pix_step words later; a tap row is
// row_step words below the previous. w is the blocked weight layout [KH][KW][Cw][16] (AVX2:
// [KH][KW][Cw][2][16], split_nibbles).
struct Tile {
  const uint64_t* x;
  int64_t pix_step, row_step;
  const uint64_t* w;
  int64_t KH, KW, Cw;
};

void micro_portable(const Tile& t, int P, int64_t* acc) {
  std::fill(acc, acc + P * kOutBlock, 0);
  for (int64_t kh = 0; kh < t.KH; ++kh)
    for (int64_t kw = 0; kw < t.KW; ++kw) {
      const uint64_t* xt = t.x + kh * t.row_step + kw * t.Cw;
      const uint64_t* wt = t.w + (kh * t.KW + kw) * t.Cw * kOutBlock;
      for (int p = 0; p < P; ++p)
        for (int64_t c = 0; c < t.Cw; ++c) {
          const uint64_t xv = xt[p * t.pix_step + c];
          for (int j = 0; j < kOutBlock; ++j)
            acc[p * kOutBlock + j] += __builtin_popcountll(xv ^ wt[c * kOutBlock + j]);
        }
    }
}

// AVX2 has no vector popcount: count nibbles with a shuffle table (Mula's method). Since
// (x ^ w) & 0x0f.. = (x & 0x0f..) ^ (w & 0x0f..), the weights come split into their low and high
// nibbles (split_nibbles, once per call) and each input word is split once for all 16 channels:
// per 4 channels x 64 bits that leaves 2 XORs, 2 shuffles and 2 byte adds. The byte counters
// (at most 8 per step) are summed into the int64 tile with SAD every kFlushSteps steps.
constexpr int kFlushSteps = 31;  // 31 * 8 = 248 fits a byte

// The weight layout of the AVX2 path: blocked [O/16][KH][KW][Cw][2][16], each (tap, word) as the
// 16 channels' low nibbles (w & 0x0f..) then their high nibbles ((w >> 4) & 0x0f..).
constexpr uint64_t kLowNibbles = 0x0f0f0f0f0f0f0f0full;

std::vector<uint64_t> split_nibbles(const std::vector<uint64_t>& blocked) {
  std::vector<uint64_t> out(2 * blocked.size());
  const int64_t steps = static_cast<int64_t>(blocked.size()) / kOutBlock;
  at::parallel_for(0, steps, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s)
      for (int j = 0; j < kOutBlock; ++j) {
        const uint64_t w = blocked[s * kOutBlock + j];
        out[(2 * s) * kOutBlock + j] = w & kLowNibbles;
        out[(2 * s + 1) * kOutBlock + j] = (w >> 4) & kLowNibbles;
      }
  });
  return out;
}

// The blocked weights [O/16][KH][KW][Cw][16] in the layout path p's micro-kernel reads.
std::vector<uint64_t> path_weights(Path p, std::vector<uint64_t> blocked) {
  return p == Path::Avx2 ? split_nibbles(blocked) : blocked;
}

int64_t weight_words_per_step(Path p) { return p == Path::Avx2 ? 2 * kOutBlock : kOutBlock; }

// One pixel x 16 channels: 4 byte counters and 4 int64 sums (channels 4q..4q+3 each) stay in
// registers beside the table, the mask and the split input word (two pixels' would spill).
__attribute__((target("avx2"))) void micro_avx2_pixel(const Tile& t, int64_t* acc) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  __m256i bytes[4], sums[4];
  for (int q = 0; q < 4; ++q) bytes[q] = sums[q] = zero;
  int steps = 0;
  for (int64_t kh = 0; kh < t.KH; ++kh)
    for (int64_t kw = 0; kw < t.KW; ++kw) {
      const uint64_t* xt = t.x + kh * t.row_step + kw * t.Cw;
      const uint64_t* wt = t.w + (kh * t.KW + kw) * t.Cw * 2 * kOutBlock;
      for (int64_t c = 0; c < t.Cw; ++c) {
        const __m256i xv = _mm256_set1_epi64x(static_cast<int64_t>(xt[c]));
        const __m256i x_lo = _mm256_and_si256(xv, low);
        const __m256i x_hi = _mm256_and_si256(_mm256_srli_epi16(xv, 4), low);
        const auto* w_lo = reinterpret_cast<const __m256i*>(wt + c * 2 * kOutBlock);
        const auto* w_hi = reinterpret_cast<const __m256i*>(wt + c * 2 * kOutBlock + kOutBlock);
        for (int q = 0; q < 4; ++q) {
          const __m256i n_lo = _mm256_shuffle_epi8(lut, _mm256_xor_si256(x_lo, _mm256_loadu_si256(w_lo + q)));
          const __m256i n_hi = _mm256_shuffle_epi8(lut, _mm256_xor_si256(x_hi, _mm256_loadu_si256(w_hi + q)));
          bytes[q] = _mm256_add_epi8(bytes[q], _mm256_add_epi8(n_lo, n_hi));
        }
        if (++steps == kFlushSteps) {
          for (int q = 0; q < 4; ++q) {
            sums[q] = _mm256_add_epi64(sums[q], _mm256_sad_epu8(bytes[q], zero));
            bytes[q] = zero;
          }
          steps = 0;
        }
      }
    }
  for (int q = 0; q < 4; ++q) {
    sums[q] = _mm256_add_epi64(sums[q], _mm256_sad_epu8(bytes[q], zero));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 4 * q), sums[q]);
  }
}

constexpr int kMaxPixels = 8;  // pixels per micro-kernel call (16 zmm accumulators on AVX-512)

void micro_avx2(const Tile& t, int P, int64_t* acc) {
  for (int p = 0; p < P; ++p) {
    Tile s = t;
    s.x = t.x + p * t.pix_step;
    micro_avx2_pixel(s, acc + p * kOutBlock);
  }
}

#define BIREAL_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vpopcntdq")))

// AVX-512 accumulators of P pixels x 16 channels: a0[p] holds channels 0-7, a1[p] channels 8-15.
template <int P>
BIREAL_AVX512 inline void accumulate_generic(const Tile& t, __m512i (&a0)[P], __m512i (&a1)[P]) {
  for (int p = 0; p < P; ++p) a0[p] = a1[p] = _mm512_setzero_si512();
  for (int64_t kh = 0; kh < t.KH; ++kh)
    for (int64_t kw = 0; kw < t.KW; ++kw) {
      const uint64_t* xt = t.x + kh * t.row_step + kw * t.Cw;
      const uint64_t* wt = t.w + (kh * t.KW + kw) * t.Cw * kOutBlock;
      for (int64_t c = 0; c < t.Cw; ++c) {
        const __m512i w0 = _mm512_loadu_si512(wt + c * kOutBlock);
        const __m512i w1 = _mm512_loadu_si512(wt + c * kOutBlock + 8);
        for (int p = 0; p < P; ++p) {
          const __m512i xv = _mm512_set1_epi64(static_cast<int64_t>(xt[p * t.pix_step + c]));
          a0[p] = _mm512_add_epi64(a0[p], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w0)));
          a1[p] = _mm512_add_epi64(a1[p], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w1)));
        }
      }
    }
}

// C <= 64 (one word per pixel): taps fully unrolled at compile time; the generic loop's
// bookkeeping costs about a quarter of the throughput when each tap is a single word.
template <int P, int KH, int KW>
BIREAL_AVX512 inline void accumulate_one_word(const Tile& t, __m512i (&a0)[P], __m512i (&a1)[P]) {
  for (int p = 0; p < P; ++p) a0[p] = a1[p] = _mm512_setzero_si512();
#pragma GCC unroll 9
  for (int tap = 0; tap < KH * KW; ++tap) {
    const uint64_t* xt = t.x + (tap / KW) * t.row_step + (tap % KW);
    const __m512i w0 = _mm512_loadu_si512(t.w + tap * kOutBlock);
    const __m512i w1 = _mm512_loadu_si512(t.w + tap * kOutBlock + 8);
    for (int p = 0; p < P; ++p) {
      const __m512i xv = _mm512_set1_epi64(static_cast<int64_t>(xt[p * t.pix_step]));
      a0[p] = _mm512_add_epi64(a0[p], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w0)));
      a1[p] = _mm512_add_epi64(a1[p], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w1)));
    }
  }
}

template <int P>
BIREAL_AVX512 inline void accumulate_avx512(const Tile& t, __m512i (&a0)[P], __m512i (&a1)[P]) {
  if (t.Cw == 1 && t.KH == 3 && t.KW == 3) return accumulate_one_word<P, 3, 3>(t, a0, a1);
  if (t.Cw == 1 && t.KH == 1 && t.KW == 1) return accumulate_one_word<P, 1, 1>(t, a0, a1);
  accumulate_generic<P>(t, a0, a1);
}

template <int P>
BIREAL_AVX512 void micro_avx512_p(const Tile& t, int64_t* acc) {
  __m512i a0[P], a1[P];
  accumulate_avx512<P>(t, a0, a1);
  for (int p = 0; p < P; ++p) {
    _mm512_storeu_si512(acc + p * kOutBlock, a0[p]);
    _mm512_storeu_si512(acc + p * kOutBlock + 8, a1[p]);
  }
}

void micro_avx512(const Tile& t, int P, int64_t* acc) {
  switch (P) {
    case 8: return micro_avx512_p<8>(t, acc);
    case 7: return micro_avx512_p<7>(t, acc);
    case 6: return micro_avx512_p<6>(t, acc);
    case 5: return micro_avx512_p<5>(t, acc);
    case 4: return micro_avx512_p<4>(t, acc);
    case 3: return micro_avx512_p<3>(t, acc);
    case 2: return micro_avx512_p<2>(t, acc);
    default: return micro_avx512_p<1>(t, acc);
  }
}

using MicroKernel = void (*)(const Tile&, int, int64_t*);

MicroKernel micro_kernel(Path p) {
  switch (p) {
    case Path::Avx512: return micro_avx512;
    case Path::Avx2: return micro_avx2;
    default: return micro_portable;
  }
}

// ---------------------------------------------------------------------------------------------
// Epilogue for P pixels of one row and one block of 16 output channels, branch-free in the inner
// loop so that it vectorizes:
//   dot = K - 2 * acc + corr;  out = dot * scale + bias + residual
// Absent terms are passed as 1 / 0 vectors, which leave every value unchanged (x * 1 = x, x + 0 = x),
// so the rounding sequence equals the reference's mul, add, add.
// The fused block also writes the 16 sign bits of each pixel's outputs (out >= 0; NaN -> 0) into
// that block's 16-bit slice of the packed output word, in the same pass: no second read of `out`.
// Tasks own distinct slices (distinct uint16 objects), so no two threads write the same memory.
struct Epilogue {
  const int64_t* acc;          // [P][16]
  int P;
  const int32_t* corr_row;     // this row's border class: [col class][O_pad], offset by o0
  const int32_t* col_class;    // border class of each of the P output columns
  int64_t O_pad;
  const float *scale, *bias;   // offset by o0
  const float* residual;       // pixel 0 (offset by o0), res_stride floats per pixel
  int64_t res_stride;
  float* out;                  // pixel 0 (offset by o0), out_stride floats per pixel
  int64_t out_stride;
  int64_t K;
  uint16_t* signs = nullptr;   // fused block: pixel 0's 16-bit slice of the packed output, or null
  int64_t signs_stride = 0;    // uint16 slices per pixel (4 per packed word)
  uint16_t sign_mask = 0xffff; // the block's valid channels (a partial last block has fewer)
  const float* residual_next = nullptr;  // pixel 0's residual one output row on (prefetched), or null
};

// The sign bits (v >= 0; NaN -> 0) of 16 floats, bit j for v[j]: one compare on AVX-512, two on AVX2.
inline uint16_t signs16_portable(const float* v) {
  uint32_t bits = 0;
  for (int j = 0; j < kOutBlock; ++j) bits |= uint32_t(v[j] >= 0.0f) << j;
  return static_cast<uint16_t>(bits);
}

__attribute__((target("avx2"))) inline uint16_t signs16_avx2(const float* v) {
  const __m256 zero = _mm256_setzero_ps();
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v), zero, _CMP_GE_OQ));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + 8), zero, _CMP_GE_OQ));
  return static_cast<uint16_t>(lo | (hi << 8));
}

BIREAL_AVX512 inline uint16_t signs16_avx512(const float* v) {
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(v), _mm512_setzero_ps(), _CMP_GE_OQ);
}

template <uint16_t (*Signs16)(const float*)>
inline __attribute__((always_inline)) void finish_block(const Epilogue& e) {
  for (int p = 0; p < e.P; ++p) {
    const int64_t* acc = e.acc + p * kOutBlock;
    const int32_t* corr = e.corr_row + e.col_class[p] * e.O_pad;
    const float* res = e.residual + p * e.res_stride;
    float* out = e.out + p * e.out_stride;
    // The residual's lines, O * 4 bytes apart, are a stride the hardware prefetcher follows
    // poorly (as in row_avx512): ask for the next row's line, about a row of work ahead.
    if (e.residual_next != nullptr) __builtin_prefetch(e.residual_next + p * e.res_stride, 0, 2);
    for (int j = 0; j < kOutBlock; ++j) {
      float v = static_cast<float>(e.K - 2 * acc[j] + corr[j]);
      v = v * e.scale[j];
      v = v + e.bias[j];
      out[j] = v + res[j];
    }
    if (e.signs != nullptr) e.signs[p * e.signs_stride] = Signs16(out) & e.sign_mask;
  }
}

void finish_portable(const Epilogue& e) { finish_block<signs16_portable>(e); }
__attribute__((target("avx2"))) void finish_avx2(const Epilogue& e) { finish_block<signs16_avx2>(e); }
BIREAL_AVX512 void finish_avx512(const Epilogue& e) {
  finish_block<signs16_avx512>(e);
}

// AVX2, a whole block of 16 channels: the epilogue in registers (the reference's order: int32 dot
// converted exactly, * scale, + bias, + residual), the sign bits from those registers, and the
// output stored once, or streamed past the caches (Stream: outputs of 8 MiB and more, 32-byte
// aligned; reading a streamed line back for the signs would stall on the write-combining buffer).
// 8 int64 counts -> 8 int32 (each < 2^31): the low word of each lane, gathered.
__attribute__((target("avx2"))) inline __m256i counts8_avx2(const int64_t* acc) {
  const __m256i low_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i a = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc)), low_words);
  const __m256i b =
      _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 4)), low_words);
  return _mm256_permute2x128_si256(a, b, 0x20);
}

// 8 channels of one pixel: float(K - 2 * count + corr) * scale + bias + residual.
__attribute__((target("avx2"))) inline __m256 finish8_avx2(const int64_t* acc, const int32_t* corr, __m256i K,
                                                           __m256 scale, __m256 bias, const float* res) {
  const __m256i corr8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr));
  const __m256i dot = _mm256_add_epi32(_mm256_sub_epi32(K, _mm256_slli_epi32(counts8_avx2(acc), 1)), corr8);
  const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale), bias);
  return _mm256_add_ps(v, _mm256_loadu_ps(res));
}

template <bool Stream>
__attribute__((target("avx2"))) void finish_avx2_full(const Epilogue& e) {
  const __m256 scale0 = _mm256_loadu_ps(e.scale), scale1 = _mm256_loadu_ps(e.scale + 8);
  const __m256 bias0 = _mm256_loadu_ps(e.bias), bias1 = _mm256_loadu_ps(e.bias + 8);
  const __m256i K = _mm256_set1_epi32(static_cast<int32_t>(e.K));
  const __m256 zero = _mm256_setzero_ps();
  for (int p = 0; p < e.P; ++p) {
    const int64_t* acc = e.acc + p * kOutBlock;
    const int32_t* corr = e.corr_row + e.col_class[p] * e.O_pad;
    const float* res = e.residual + p * e.res_stride;
    float* out = e.out + p * e.out_stride;
    if (e.residual_next != nullptr)  // the next row's line, as in finish_block
      _mm_prefetch(reinterpret_cast<const char*>(e.residual_next + p * e.res_stride), _MM_HINT_T1);
    const __m256 v0 = finish8_avx2(acc, corr, K, scale0, bias0, res);
    const __m256 v1 = finish8_avx2(acc + 8, corr + 8, K, scale1, bias1, res + 8);
    if constexpr (Stream) {
      _mm256_stream_ps(out, v0);
      _mm256_stream_ps(out + 8, v1);
    } else {
      _mm256_storeu_ps(out, v0);
      _mm256_storeu_ps(out + 8, v1);
    }
    if (e.signs != nullptr) {
      const int lo = _mm256_movemask_ps(_mm256_cmp_ps(v0, zero, _CMP_GE_OQ));
      const int hi = _mm256_movemask_ps(_mm256_cmp_ps(v1, zero, _CMP_GE_OQ));
      e.signs[p * e.signs_stride] = static_cast<uint16_t>(lo | (hi << 8)) & e.sign_mask;
    }
  }
}

using FinishFn = void (*)(const Epilogue&);

FinishFn finisher(Path p) {
  switch (p) {
    case Path::Avx512: return finish_avx512;
    case Path::Avx2: return finish_avx2;
    default: return finish_portable;
  }
}

// The finisher of a whole block of 16 channels (a partial one is staged and takes finisher(p)).
FinishFn full_block_finisher(Path p, bool stream) {
  if (p == Path::Avx2) return stream ? finish_avx2_full<true> : finish_avx2_full<false>;
  return finisher(p);
}

// AVX-512: one output row of one 16-channel block in one call, each group of 8 pixels finished
// straight from the accumulator registers: the counts narrowed to int32, dot = K - 2 * count + corr,
// converted exactly (|dot| < 2^24), * scale + bias + residual in the reference's order, a masked
// store (partial blocks need no staging), and the sign bits from one compare. Against micro_avx512 +
// finish_avx512 per group this saves the int64 round trip through memory and two indirect calls
// per 8 pixels, which cost as much as the binary work itself when C = 64.
struct RowJob {
  Tile t;                      // x at the row's first output pixel
  int64_t Wo;
  const int32_t* corr_row;     // [col class][O_pad] of this row's class, offset by o0
  const int32_t* col_class;    // border class of each output column
  int64_t O_pad;
  const float *scale, *bias;   // 16 values each (padded with 1 / 0)
  const float* residual;       // pixel 0, res_stride floats per pixel; null: none
  const float* residual_next;  // the same block's residual one row on (prefetched); null: none
  int64_t res_stride;
  float* out;                  // pixel 0, out_stride floats per pixel
  int64_t out_stride;
  uint16_t* signs;             // fused block: pixel 0's slice of the packed output, or null
  int64_t signs_stride;
  uint16_t mask;               // valid channels of the block
  int32_t K;
  bool stream;                 // non-temporal stores for full blocks (large outputs, aligned)
};

template <int P>
BIREAL_AVX512 inline void row_group_avx512(const RowJob& j, int64_t ow0) {
  Tile t = j.t;
  t.x += ow0 * t.pix_step;
  __m512i a0[P], a1[P];
  accumulate_avx512<P>(t, a0, a1);
  const __mmask16 m = j.mask;
  const __m512 scale = _mm512_loadu_ps(j.scale), bias = _mm512_loadu_ps(j.bias), zero = _mm512_setzero_ps();
  const __m512i k = _mm512_set1_epi32(j.K);
  for (int p = 0; p < P; ++p) {
    const int64_t ow = ow0 + p;
    const __m512i count = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a0[p])),
                                             _mm512_cvtepi64_epi32(a1[p]), 1);
    const __m512i corr = _mm512_loadu_si512(j.corr_row + j.col_class[ow] * j.O_pad);
    const __m512i dot = _mm512_add_epi32(_mm512_sub_epi32(k, _mm512_slli_epi32(count, 1)), corr);
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), scale);
    v = _mm512_add_ps(v, bias);
    // Full blocks use plain loads and stores: masked ones are much slower on some CPUs.
    const float* res = j.residual + ow * j.res_stride;
    // The residual is read one 16-channel block (one 64-byte line) per pixel, O * 4 bytes apart: a
    // pattern the hardware prefetcher follows poorly. Out of cache (in the network it is the
    // previous block's output, streamed to memory) that read ran at ~9 GB/s and took a layer-1 block
    // (64x56x56, batch 16) from 1.0-1.2 ms to 2.7-2.9 ms; asking for the same pixel's line one row
    // on, about a row of work ahead, brings it back to 1.1-1.2 ms (docs/benchmarks.md).
    if (j.residual_next)
      _mm_prefetch(reinterpret_cast<const char*>(j.residual_next + ow * j.res_stride), _MM_HINT_T1);
    v = _mm512_add_ps(v, !j.residual ? zero : m == 0xffff ? _mm512_loadu_ps(res) : _mm512_maskz_loadu_ps(m, res));
    if (m == 0xffff && j.stream)
      _mm512_stream_ps(j.out + ow * j.out_stride, v);  // 64-byte aligned (checked by the caller)
    else if (m == 0xffff)
      _mm512_storeu_ps(j.out + ow * j.out_stride, v);
    else
      _mm512_mask_storeu_ps(j.out + ow * j.out_stride, m, v);
    if (j.signs) j.signs[ow * j.signs_stride] = _mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ) & m;
  }
}

BIREAL_AVX512 void row_avx512(const RowJob& j) {
  int64_t ow0 = 0;
  for (; ow0 + kMaxPixels <= j.Wo; ow0 += kMaxPixels) row_group_avx512<kMaxPixels>(j, ow0);
  switch (j.Wo - ow0) {
    case 7: return row_group_avx512<7>(j, ow0);
    case 6: return row_group_avx512<6>(j, ow0);
    case 5: return row_group_avx512<5>(j, ow0);
    case 4: return row_group_avx512<4>(j, ow0);
    case 3: return row_group_avx512<3>(j, ow0);
    case 2: return row_group_avx512<2>(j, ow0);
    case 1: return row_group_avx512<1>(j, ow0);
    default: return;
  }
}

// Output size from which the conv streams its output (BIREAL_STREAM_BYTES overrides; default 8 MiB).
int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("BIREAL_STREAM_BYTES");
    return env ? std::atoll(env) : (int64_t(8) << 20);
  }();
  return bytes;
}

// Zero-padding correction per border class. The taps of output row oh that fall inside the image
// are kh in [first, last); a row class is one distinct (first, last) pair (3 classes for a 3x3
// conv with padding 1: top, middle, bottom). corr[row class][col class][o] = sum of S[o][tap]
// over the taps outside the image, 0 for interior pixels.
struct BorderClasses {
  std::vector<int32_t> row_class, col_class;
  std::vector<std::pair<int64_t, int64_t>> rows, cols;
};

void classify(int64_t out_size, int64_t in_size, int64_t k, int64_t stride, int64_t padding,
              std::vector<int32_t>& cls, std::vector<std::pair<int64_t, int64_t>>& ranges) {
  cls.resize(out_size);
  for (int64_t i = 0; i < out_size; ++i) {
    const int64_t start = i * stride - padding;
    const std::pair<int64_t, int64_t> r{std::max<int64_t>(0, -start), std::min<int64_t>(k, in_size - start)};
    auto it = std::find(ranges.begin(), ranges.end(), r);
    cls[i] = static_cast<int32_t>(it - ranges.begin());
    if (it == ranges.end()) ranges.push_back(r);
  }
}

std::vector<int32_t> border_corrections(const BorderClasses& b, const std::vector<int32_t>& tap_sums,
                                        int64_t O, int64_t O_pad, int64_t KH, int64_t KW) {
  std::vector<int32_t> corr(b.rows.size() * b.cols.size() * O_pad, 0);
  for (size_t r = 0; r < b.rows.size(); ++r)
    for (size_t c = 0; c < b.cols.size(); ++c) {
      int32_t* dst = corr.data() + (r * b.cols.size() + c) * O_pad;
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw) {
          const bool inside = kh >= b.rows[r].first && kh < b.rows[r].second &&
                              kw >= b.cols[c].first && kw < b.cols[c].second;
          if (inside) continue;
          const int32_t* src = tap_sums.data() + (kh * KW + kw) * O;
          for (int64_t o = 0; o < O; ++o) dst[o] += src[o];
        }
    }
  return corr;
}

// ---------------------------------------------------------------------------------------------
// Packing: one pixel's C contiguous channels (NHWC) -> Cw words.

// Compared in the input's own precision (float for half / bfloat16): a tiny negative double must
// not round to -0.0 and pack as +1.
template <typename T>
void pack_pixel_portable(const T* x, int64_t C, uint64_t* out) {
  using acc_t = at::opmath_type<T>;
  for (int64_t k = 0; k * kWordBits < C; ++k) {
    uint64_t word = 0;
    const int64_t n = std::min<int64_t>(kWordBits, C - k * kWordBits);
    for (int64_t j = 0; j < n; ++j)
      word |= uint64_t(static_cast<acc_t>(x[k * kWordBits + j]) >= acc_t(0)) << j;
    out[k] = word;
  }
}

__attribute__((target("avx512f"))) void pack_pixel_avx512(const float* x, int64_t C, uint64_t* out) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k * kWordBits < C; ++k) {
    uint64_t word = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t base = k * kWordBits + q * 16;
      const int64_t n = std::min<int64_t>(16, C - base);
      if (n <= 0) break;
      const __mmask16 m = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(m, x + base);
      word |= uint64_t(_mm512_mask_cmp_ps_mask(m, v, zero, _CMP_GE_OQ)) << (q * 16);
    }
    out[k] = word;
  }
}

__attribute__((target("avx2"))) void pack_pixel_avx2(const float* x, int64_t C, uint64_t* out) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t k = 0; k * kWordBits < C; ++k) {
    uint64_t word = 0;
    int64_t j = 0;
    const int64_t n = std::min<int64_t>(kWordBits, C - k * kWordBits);
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + k * kWordBits + j);
      word |= uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ))) << j;
    }
    for (; j < n; ++j) word |= uint64_t(x[k * kWordBits + j] >= 0.0f) << j;
    out[k] = word;
  }
}

// float32 has vector paths; other dtypes (half, bfloat16, double) use the portable loop.
template <typename T>
void pack_pixel(Path, const T* x, int64_t C, uint64_t* out) { pack_pixel_portable(x, C, out); }

void pack_pixel(Path path, const float* x, int64_t C, uint64_t* out) {
  if (path == Path::Avx512) return pack_pixel_avx512(x, C, out);
  if (path == Path::Avx2) return pack_pixel_avx2(x, C, out);
  pack_pixel_portable(x, C, out);
}

// Weights (O, KH, KW, Cw) -> blocked [O/16][KH][KW][Cw][16], zero-filled past O.
std::vector<uint64_t> block_weights(const uint64_t* w, int64_t O, int64_t taps, int64_t Cw) {
  const int64_t blocks = (O + kOutBlock - 1) / kOutBlock;
  std::vector<uint64_t> out(blocks * taps * Cw * kOutBlock);
  // One output block per task (large layers: ~300 KB of words): each channel's row of taps * Cw
  // words is read contiguously and scattered with stride 16 into the block, which stays in L1.
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      uint64_t* dst = out.data() + b * taps * Cw * kOutBlock;
      for (int64_t j = 0; j < kOutBlock; ++j) {
        const int64_t o = b * kOutBlock + j;
        const uint64_t* src = w + o * taps * Cw;
        for (int64_t tc = 0; tc < taps * Cw; ++tc) dst[tc * kOutBlock + j] = o < O ? src[tc] : 0;
      }
    }
  });
  return out;
}

// S[tap][o] = sum of the +-1 weights of output channel o at that tap = 2 * popcount - C.
inline __attribute__((always_inline)) void tap_sums_body(const uint64_t* w, int64_t groups, int64_t Cw,
                                                         int64_t C, int32_t* s) {
  for (int64_t g = 0; g < groups; ++g) {
    int64_t ones = 0;
    for (int64_t c = 0; c < Cw; ++c) ones += __builtin_popcountll(w[g * Cw + c]);
    s[g] = static_cast<int32_t>(2 * ones - C);
  }
}
void tap_sums_portable(const uint64_t* w, int64_t g, int64_t Cw, int64_t C, int32_t* s) {
  tap_sums_body(w, g, Cw, C, s);
}
__attribute__((target("popcnt"))) void tap_sums_popcnt(const uint64_t* w, int64_t g, int64_t Cw,
                                                       int64_t C, int32_t* s) {
  tap_sums_body(w, g, Cw, C, s);  // one POPCNT instruction per word instead of a libgcc call
}

std::vector<int32_t> tap_weight_sums(Path path, const uint64_t* w, int64_t O, int64_t taps,
                                     int64_t Cw, int64_t C) {
  std::vector<int32_t> s(O * taps), by_tap(taps * O);
  (path == Path::Portable ? tap_sums_portable : tap_sums_popcnt)(w, O * taps, Cw, C, s.data());
  for (int64_t o = 0; o < O; ++o)
    for (int64_t t = 0; t < taps; ++t) by_tap[t * O + o] = s[o * taps + t];
  return by_tap;  // [tap][O]: contiguous over O for the correction sums
}

}  // namespace

// Binary MACs per second of the active path's micro-kernel on all of torch's threads at once, each
// with its working set in L1: 8 pixels x 16 output channels x a 3x3 tap window of `words` words per
// pixel. The compute ceiling that `bireal bench kernels --device cpu` prints each row's bound from.
double cpu_micro_kernel_rate(int64_t words, double seconds) {
  TORCH_CHECK(words >= 1 && words <= 64, "cpu_micro_kernel_rate: words must be in [1, 64], got ", words);
  constexpr int P = kMaxPixels;
  const MicroKernel micro = micro_kernel(active_path());
  const int64_t threads = at::get_num_threads();
  std::vector<double> rates(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      const int64_t row = (P + 2) * words;  // one input row of the window
      std::vector<uint64_t> x(3 * row), blocked(9 * words * kOutBlock);
      for (size_t i = 0; i < x.size(); ++i) x[i] = 0x9E3779B97F4A7C15ull * (i + 1 + th);
      for (size_t i = 0; i < blocked.size(); ++i) blocked[i] = 0xC2B2AE3D27D4EB4Full * (i + 7);
      const std::vector<uint64_t> w = path_weights(active_path(), std::move(blocked));
      const Tile t{x.data(), words, row, w.data(), 3, 3, words};
      int64_t acc[P * kOutBlock];
      int64_t calls = 0, sink = 0;
      const auto start = std::chrono::steady_clock::now();
      double elapsed = 0.0;
      do {
        for (int i = 0; i < 64; ++i, ++calls) {
          micro(t, P, acc);
          sink += acc[calls % (P * kOutBlock)];
        }
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      } while (elapsed < seconds);
      TORCH_CHECK(sink != -1, "unreachable");  // keeps the calls from being optimised away
      rates[th] = double(calls) * P * kOutBlock * 9 * words * 64 / elapsed;
    }
  });
  double total = 0.0;
  for (double r : rates) total += r;
  return total;
}

std::vector<std::string> cpu_paths() {
  std::vector<std::string> out;
  for (Path p : {Path::Avx512, Path::Avx2, Path::Portable})
    if (supported(p)) out.emplace_back(path_name(p));
  return out;
}

std::string cpu_path() { return path_name(active_path()); }

void set_cpu_path(const std::string& name) {
  if (name == "auto") {
    g_path.store(static_cast<int>(best_path()));
    return;
  }
  for (Path p : {Path::Avx512, Path::Avx2, Path::Portable}) {
    if (name == path_name(p)) {
      TORCH_CHECK(supported(p), "set_cpu_path: this CPU cannot run the '", name, "' path");
      g_path.store(static_cast<int>(p));
      return;
    }
  }
  TORCH_CHECK(false, "set_cpu_path: unknown path '", name, "' (auto, avx512, avx2, portable)");
}

at::Tensor pack_signs_cpu(const at::Tensor& x) {
  check_pack_args(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Cw = words_for(C);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);  // NHWC in memory
  at::Tensor out = at::empty({N, H, W, Cw}, x.options().dtype(at::kLong));
  fill_if_debugging(out);
  auto* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const Path path = active_path();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pack_signs", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    at::parallel_for(0, N * H * W, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) pack_pixel(path, src + i * C, C, dst + i * Cw);
    });
  });
  return out;
}

namespace {

// The float32 conv; `residual` (if any) is float32 here.
// `packed_out` (N, Ho, Wo, Ow) int64, if given, receives the packed signs of the output (fused block).
at::Tensor conv_f32(const at::Tensor& packed_x, const at::Tensor& packed_w, int64_t in_channels,
                    int64_t stride, int64_t padding, double pad_value, const ConvGeometry& g,
                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& residual, at::Tensor* packed_out = nullptr) {
  const int64_t C = in_channels, Cw = g.Cw, taps = g.KH * g.KW;
  const int64_t Hp = g.H + 2 * padding, Wp = g.W + 2 * padding;

  // Border-padded copy of the input: (N, Hp, Wp, Cw); border words encode pad_value.
  const at::Tensor xs = packed_x.contiguous();
  const auto* x_src = reinterpret_cast<const uint64_t*>(xs.data_ptr<int64_t>());
  std::vector<uint64_t> xpad;
  const uint64_t* xp = x_src;
  if (padding > 0) {
    std::vector<uint64_t> border(Cw);
    for (int64_t k = 0; k < Cw; ++k) border[k] = pad_value == 1.0 ? valid_bits(k, C) : 0;
    xpad.resize(g.N * Hp * Wp * Cw);
    // Per padded row: border pixels, then (inside the image) the whole image row in one copy.
    auto fill_border = [&](uint64_t* dst, int64_t pixels) {
      for (int64_t w = 0; w < pixels; ++w) std::memcpy(dst + w * Cw, border.data(), Cw * sizeof(uint64_t));
    };
    at::parallel_for(0, g.N * Hp, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / Hp, h = r % Hp - padding;
        uint64_t* row = xpad.data() + r * Wp * Cw;
        if (h < 0 || h >= g.H) {
          fill_border(row, Wp);
          continue;
        }
        fill_border(row, padding);
        std::memcpy(row + padding * Cw, x_src + (n * g.H + h) * g.W * Cw, g.W * Cw * sizeof(uint64_t));
        fill_border(row + (padding + g.W) * Cw, padding);
      }
    });
    xp = xpad.data();
  }

  const at::Tensor ws = packed_w.contiguous();
  const auto* w_src = reinterpret_cast<const uint64_t*>(ws.data_ptr<int64_t>());
  const Path path = active_path();
  const std::vector<uint64_t> wblk = path_weights(path, block_weights(w_src, g.O, taps, Cw));
  const int64_t w_step = weight_words_per_step(path);
  const int64_t out_blocks = (g.O + kOutBlock - 1) / kOutBlock, O_pad = out_blocks * kOutBlock;

  // Border correction table (zero padding only); a single all-zero class otherwise.
  BorderClasses bc;
  std::vector<int32_t> corr(O_pad, 0);
  if (pad_value == 0.0 && padding > 0) {
    classify(g.Ho, g.H, g.KH, stride, padding, bc.row_class, bc.rows);
    classify(g.Wo, g.W, g.KW, stride, padding, bc.col_class, bc.cols);
    corr = border_corrections(bc, tap_weight_sums(path, w_src, g.O, taps, Cw, C), g.O, O_pad, g.KH, g.KW);
  } else {
    bc.row_class.assign(g.Ho, 0);
    bc.col_class.assign(g.Wo, 0);
    bc.cols.resize(1);
  }
  const int64_t col_classes = static_cast<int64_t>(bc.cols.size());

  // Absent epilogue terms become 1 / 0 vectors (padded to whole blocks of 16 channels).
  std::vector<float> scale_v(O_pad, 1.0f), bias_v(O_pad, 0.0f), zeros(kOutBlock, 0.0f);
  if (scale.has_value()) std::memcpy(scale_v.data(), scale->contiguous().data_ptr<float>(), g.O * sizeof(float));
  if (bias.has_value()) std::memcpy(bias_v.data(), bias->contiguous().data_ptr<float>(), g.O * sizeof(float));
  at::Tensor res_c;
  const float* res_p = nullptr;
  if (residual.has_value()) {
    res_c = residual->contiguous(at::MemoryFormat::ChannelsLast);  // (N, Ho, Wo, O) in memory
    res_p = res_c.data_ptr<float>();
  }

  at::Tensor out = at::empty({g.N, g.Ho, g.Wo, g.O}, packed_x.options().dtype(at::kFloat));
  fill_if_debugging(out);
  float* out_p = out.data_ptr<float>();
  const MicroKernel micro = micro_kernel(path);
  const FinishFn finish = finisher(path);  // a partial block, staged through buffers
  const int64_t K = taps * C;
  // Fused block: 16-bit slices of the packed words; slices past the last block (O % 64 <= 48) are
  // never written by a task, so those are zeroed here (the tail bits must be 0).
  uint16_t* signs_p = nullptr;
  const int64_t Ow = words_for(g.O), slices = Ow * 4;
  if (packed_out != nullptr) {
    *packed_out = at::empty({g.N, g.Ho, g.Wo, Ow}, packed_x.options().dtype(at::kLong));
    fill_if_debugging(*packed_out);
    signs_p = reinterpret_cast<uint16_t*>(packed_out->data_ptr<int64_t>());
    if (slices > out_blocks) {
      for (int64_t pix = 0; pix < g.N * g.Ho * g.Wo; ++pix)
        std::memset(signs_p + pix * slices + out_blocks, 0, (slices - out_blocks) * sizeof(uint16_t));
    }
  }

  // Outputs larger than the caches are written with non-temporal stores: the lines are overwritten
  // whole, so reading them first from memory (what a regular store does) is wasted traffic.
  const bool stream_out = (path == Path::Avx512 || path == Path::Avx2) && g.O % kOutBlock == 0 &&
                          reinterpret_cast<uintptr_t>(out_p) % 64 == 0 &&
                          int64_t(out.numel() * sizeof(float)) >= stream_threshold_bytes();
  const FinishFn finish_full = full_block_finisher(path, stream_out);
  // One task = one output row of one image for one block of 16 output channels.
  at::parallel_for(0, g.N * g.Ho * out_blocks, 1, [&](int64_t begin, int64_t end) {
    int64_t acc[kMaxPixels * kOutBlock];
    float res_tail[kMaxPixels * kOutBlock], out_tail[kMaxPixels * kOutBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ob = task % out_blocks, row = task / out_blocks;
      const int64_t n = row / g.Ho, oh = row % g.Ho;
      const int64_t o0 = ob * kOutBlock, o_count = std::min<int64_t>(kOutBlock, g.O - o0);
      const bool full = o_count == kOutBlock;  // else: a partial block, staged through buffers
      const auto block_mask = static_cast<uint16_t>((uint32_t(1) << o_count) - 1);  // valid channels
      Tile t{nullptr, stride * Cw, Wp * Cw, wblk.data() + ob * taps * Cw * w_step, g.KH, g.KW, Cw};
      if (path == Path::Avx512) {
        const int64_t pix0 = (n * g.Ho + oh) * g.Wo;
        t.x = xp + (n * Hp + oh * stride) * Wp * Cw;
        const RowJob job{t, g.Wo, corr.data() + bc.row_class[oh] * col_classes * O_pad + o0,
                         bc.col_class.data(), O_pad, scale_v.data() + o0, bias_v.data() + o0,
                         res_p ? res_p + pix0 * g.O + o0 : nullptr,
                         res_p && row + 1 < g.N * g.Ho ? res_p + (pix0 + g.Wo) * g.O + o0 : nullptr, g.O,
                         out_p + pix0 * g.O + o0, g.O,
                         signs_p ? signs_p + pix0 * slices + ob : nullptr, slices,
                         block_mask, static_cast<int32_t>(K),
                         stream_out};
        row_avx512(job);
        continue;
      }
      for (int64_t ow0 = 0; ow0 < g.Wo; ow0 += kMaxPixels) {
        const int P = static_cast<int>(std::min<int64_t>(kMaxPixels, g.Wo - ow0));
        t.x = xp + ((n * Hp + oh * stride) * Wp + ow0 * stride) * Cw;
        micro(t, P, acc);
        const int64_t pix0 = (n * g.Ho + oh) * g.Wo + ow0;
        Epilogue e{acc, P, corr.data() + bc.row_class[oh] * col_classes * O_pad + o0,
                   bc.col_class.data() + ow0, O_pad, scale_v.data() + o0, bias_v.data() + o0,
                   zeros.data(), 0, out_p + pix0 * g.O + o0, g.O, K};
        if (signs_p != nullptr) {
          e.signs = signs_p + pix0 * slices + ob;
          e.signs_stride = slices;
          e.sign_mask = block_mask;
        }
        if (res_p) {
          e.residual = res_p + pix0 * g.O + o0;
          e.res_stride = g.O;
          if (full && row + 1 < g.N * g.Ho) e.residual_next = e.residual + g.Wo * g.O;
          if (!full) {
            for (int p = 0; p < P; ++p)
              std::memcpy(res_tail + p * kOutBlock, e.residual + p * g.O, o_count * sizeof(float));
            e.residual = res_tail;
            e.res_stride = kOutBlock;
          }
        }
        if (full) {
          finish_full(e);
        } else {
          e.out = out_tail;
          e.out_stride = kOutBlock;
          finish(e);
          for (int p = 0; p < P; ++p)
            std::memcpy(out_p + (pix0 + p) * g.O + o0, out_tail + p * kOutBlock, o_count * sizeof(float));
        }
      }
    }
    if (stream_out) _mm_sfence();  // the streamed stores are ordered before the tasks end
  });
  return out.permute({0, 3, 1, 2});  // (N, O, Ho, Wo), channels_last memory
}

// Shared by binary_conv2d and binary_block (as conv_cuda is on the GPU): checks, the float32 conv,
// the output dtype, and for the block the packed signs. A float32 output gets its signs from the
// conv's own epilogue; a bfloat16 one is packed after the rounding (the signs of the stored values).
std::tuple<at::Tensor, at::Tensor> conv_cpu(const at::Tensor& packed_x, const at::Tensor& packed_w,
                                            int64_t in_channels, int64_t stride, int64_t padding,
                                            double pad_value, const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& residual,
                                            const std::optional<at::ScalarType>& out_dtype, bool pack_output) {
  const ConvGeometry g = check_conv_args(packed_x, packed_w, in_channels, stride, padding,
                                         pad_value, scale, bias, residual);
  TORCH_CHECK(packed_x.device().is_cpu(), "binary_conv2d_cpu: tensors must be on the CPU");
  const at::ScalarType dtype = conv_out_dtype(out_dtype);
  std::optional<at::Tensor> residual_f32;  // a bf16 residual converts exactly
  if (residual.has_value()) residual_f32 = residual->to(at::kFloat);
  const bool fused = pack_output && dtype == at::kFloat;
  at::Tensor packed;
  at::Tensor out = conv_f32(packed_x, packed_w, in_channels, stride, padding, pad_value, g, scale,
                            bias, residual_f32, fused ? &packed : nullptr);
  if (dtype != at::kFloat) out = out.to(dtype);  // rounded once; keeps the channels_last strides
  if (pack_output && !fused)  // (pack_signs rejects C = 0: no output channels, no words)
    packed = g.O == 0 ? at::empty({g.N, g.Ho, g.Wo, 0}, packed_x.options()) : pack_signs_cpu(out);
  return {out, packed};
}

}  // namespace

at::Tensor binary_conv2d_cpu(const at::Tensor& packed_x, const at::Tensor& packed_w,
                             int64_t in_channels, int64_t stride, int64_t padding, double pad_value,
                             const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual,
                             std::optional<at::ScalarType> out_dtype,
                             const std::optional<at::Tensor>& /*border_classes: bmma_lean's (CUDA)*/) {
  return std::get<0>(conv_cpu(packed_x, packed_w, in_channels, stride, padding, pad_value, scale, bias,
                              residual, out_dtype, /*pack_output=*/false));
}

std::tuple<at::Tensor, at::Tensor> binary_block_cpu(
    const at::Tensor& packed_x, const at::Tensor& packed_w, int64_t in_channels, int64_t stride,
    int64_t padding, double pad_value, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    std::optional<at::ScalarType> out_dtype, const std::optional<at::Tensor>& /*border_classes: CUDA's*/) {
  return conv_cpu(packed_x, packed_w, in_channels, stride, padding, pad_value, scale, bias, residual,
                  out_dtype, /*pack_output=*/true);
}


// ---------------------------------------------------------------------------------------------
// The ImageNet stem's max-pool and the packed signs of its output in one pass (the first binary
// conv's input): torch's channels_last max-pool also writes int64 indices (2x the output's bytes)
// and a separate pack_signs reads the output again. Out of range taps are skipped (torch pads with
// -inf); a NaN in the window wins, as in torch.

PoolGeometry check_pool_args(const at::Tensor& x, int64_t kernel_size, int64_t stride, int64_t padding,
                             const std::optional<at::Tensor>& bias) {
  check_pack_args(x);
  TORCH_CHECK(kernel_size >= 1 && stride >= 1 && padding >= 0 && 2 * padding <= kernel_size,
              "max_pool_signs: needs kernel_size >= 1, stride >= 1 and 0 <= padding <= kernel_size / 2 (as "
              "torch's max_pool2d), got kernel_size=", kernel_size, " stride=", stride, " padding=", padding);
  PoolGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, kernel_size, stride, padding};
  g.Ho = (g.H + 2 * padding - kernel_size) / stride + 1;
  g.Wo = (g.W + 2 * padding - kernel_size) / stride + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "max_pool_signs: empty output for input ", g.H, "x", g.W);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.C, "max_pool_signs: bias must have shape (", g.C,
                ",) (one per channel of x), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "max_pool_signs: bias must have x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "max_pool_signs: bias must be on x's device ", x.device(),
                ", got ", bias->device());
  }
  return g;
}

namespace {

// float32, one output row per call, separably: the max over the window's rows for every input
// column first (each input row read front to back, a stream the hardware prefetcher follows; the
// window's taps read in place jump between rows and ran at ~17 GB/s out of cache), then the max over
// the window's columns of that buffer, in L1/L2, 64 channels (one packed word) at a time in four
// independent accumulators; the word's sign bits come from the accumulators before they are stored.
// A NaN is tracked on the side (max_ps would drop it) and written as NaN.
BIREAL_AVX512 inline void max_into(__m512& m, __mmask16& nans, __m512 v) {
  m = _mm512_max_ps(m, v);
  nans |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
}

BIREAL_AVX512 void pool_row_avx512(const float* x, const PoolGeometry& g, int64_t n, int64_t oh, const float* bias,
                                   float* out, uint64_t* bits, float* colmax) {
  const int64_t h0 = oh * g.stride - g.padding;
  const int64_t hb = std::max<int64_t>(h0, 0), he = std::min(h0 + g.k, g.H);
  const int64_t Cw = words_for(g.C), row = g.W * g.C;
  const __m512 zero = _mm512_setzero_ps(), lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  const float* image = x + n * g.H * row;
  // 1. colmax[w, c] = max over the window's rows h of x[h, w, c], 16 values at a time
  for (int64_t i = 0; i < row; i += 16) {
    const __mmask16 lanes = row - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (row - i)) - 1);
    __m512 m = lowest;
    __mmask16 nans = 0;
    for (int64_t h = hb; h < he; ++h) max_into(m, nans, _mm512_maskz_loadu_ps(lanes, image + h * row + i));
    _mm512_mask_storeu_ps(colmax + i, lanes, _mm512_mask_mov_ps(m, nans, nan));
  }
  // 2. out[ow, c] = max over the window's columns of colmax; the signs packed from the registers
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    const int64_t w0 = ow * g.stride - g.padding;
    const int64_t wb = std::max<int64_t>(w0, 0), we = std::min(w0 + g.k, g.W);
    for (int64_t c0 = 0, word = 0; c0 < g.C; c0 += kWordBits, ++word) {
      __mmask16 lanes[4];
      __m512 m[4] = {lowest, lowest, lowest, lowest};
      __mmask16 nans[4] = {0, 0, 0, 0};
      for (int j = 0; j < 4; ++j) {
        const int64_t left = std::clamp<int64_t>(g.C - c0 - 16 * j, 0, 16);
        lanes[j] = left == 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      }
      for (int64_t w = wb; w < we; ++w)
        for (int j = 0; j < 4; ++j)
          max_into(m[j], nans[j], _mm512_maskz_loadu_ps(lanes[j], colmax + w * g.C + c0 + 16 * j));
      uint64_t signs = 0;
      for (int j = 0; j < 4; ++j) {
        m[j] = _mm512_mask_mov_ps(m[j], nans[j], nan);
        if (bias) m[j] = _mm512_add_ps(m[j], _mm512_maskz_loadu_ps(lanes[j], bias + c0 + 16 * j));  // NaN stays
        _mm512_mask_storeu_ps(out + ow * g.C + c0 + 16 * j, lanes[j], m[j]);
        signs |= uint64_t(_mm512_mask_cmp_ps_mask(lanes[j], m[j], zero, _CMP_GE_OQ)) << (16 * j);
      }
      bits[ow * Cw + word] = signs;
    }
  }
}

// max(m, v) where a NaN wins, as in torch: once m is NaN neither test passes and it stays.
template <typename A>
inline A nan_max(A m, A v) {
  return (v > m || v != v) ? v : m;
}

// The same separable row in plain loops over contiguous values (the compiler vectorizes them), for
// every dtype and for CPUs without AVX-512; float maxima in `colmax` (W * C) and `acc` (C), then the
// signs packed from the stored values.
template <typename T>
void pool_row_portable(Path path, const T* x, const PoolGeometry& g, int64_t n, int64_t oh,
                       const at::opmath_type<T>* bias, T* out, uint64_t* bits, at::opmath_type<T>* colmax,
                       at::opmath_type<T>* acc) {
  using acc_t = at::opmath_type<T>;
  const int64_t h0 = oh * g.stride - g.padding;
  const int64_t hb = std::max<int64_t>(h0, 0), he = std::min(h0 + g.k, g.H);
  const int64_t row = g.W * g.C, Cw = words_for(g.C);
  const T* image = x + n * g.H * row;
  std::fill(colmax, colmax + row, -std::numeric_limits<acc_t>::infinity());
  for (int64_t h = hb; h < he; ++h) {
    const T* src = image + h * row;
    for (int64_t i = 0; i < row; ++i) colmax[i] = nan_max(colmax[i], static_cast<acc_t>(src[i]));
  }
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    const int64_t w0 = ow * g.stride - g.padding;
    std::fill(acc, acc + g.C, -std::numeric_limits<acc_t>::infinity());
    for (int64_t w = std::max<int64_t>(w0, 0); w < std::min(w0 + g.k, g.W); ++w) {
      const acc_t* col = colmax + w * g.C;
      for (int64_t c = 0; c < g.C; ++c) acc[c] = nan_max(acc[c], col[c]);
    }
    T* o = out + ow * g.C;
    if (bias) {
      for (int64_t c = 0; c < g.C; ++c) o[c] = static_cast<T>(acc[c] + bias[c]);  // one rounding, as x + bias
    } else {
      for (int64_t c = 0; c < g.C; ++c) o[c] = static_cast<T>(acc[c]);
    }
    pack_pixel(path, o, g.C, bits + ow * Cw);  // the values just stored, in L1
  }
}

// One output row: each pixel's C maxima into `out` and their packed signs into `bits` (Cw words).
template <typename T>
void pool_row(Path path, const T* x, const PoolGeometry& g, int64_t n, int64_t oh, const at::opmath_type<T>* bias,
              T* out, uint64_t* bits, at::opmath_type<T>* colmax, at::opmath_type<T>* acc) {
  if constexpr (std::is_same_v<T, float>) {
    if (path == Path::Avx512) return pool_row_avx512(x, g, n, oh, bias, out, bits, colmax);
  }
  pool_row_portable(path, x, g, n, oh, bias, out, bits, colmax, acc);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool_signs_cpu(const at::Tensor& x, int64_t kernel_size, int64_t stride,
                                                      int64_t padding, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "max_pool_signs_cpu: x must be on the CPU");
  const PoolGeometry g = check_pool_args(x, kernel_size, stride, padding, bias);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);  // NHWC in memory
  at::Tensor out = at::empty({g.N, g.Ho, g.Wo, g.C}, x.options());  // NHWC; returned as an (N, C, Ho, Wo) view
  at::Tensor packed = at::empty({g.N, g.Ho, g.Wo, words_for(g.C)}, x.options().dtype(at::kLong));
  fill_if_debugging(out);
  fill_if_debugging(packed);
  auto* bits = reinterpret_cast<uint64_t*>(packed.data_ptr<int64_t>());
  const int64_t Cw = words_for(g.C);
  const Path path = active_path();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool_signs", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    // the bias widened once (exact), for the add in the accumulator's type
    const at::Tensor wide_bias = bias.has_value() ? bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous()
                                                  : at::Tensor();
    const acc_t* b = bias.has_value() ? wide_bias.data_ptr<acc_t>() : nullptr;
    // one output row per task: its pixels' windows share input rows that stay in cache
    at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> colmax(g.W * g.C), acc(g.C);  // one input row's column maxima; one pixel's
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.Ho, oh = row % g.Ho;
        pool_row(path, src, g, n, oh, b, dst + row * g.Wo * g.C, bits + row * g.Wo * Cw, colmax.data(), acc.data());
      }
    });
  });
  return {out.permute({0, 3, 1, 2}), packed};
}

}  // namespace bireal
