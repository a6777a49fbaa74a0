// bmma_split: bmma_lean (binary_conv_lean.cu) with its k-steps split over a cluster of blocks, for
// layers with too few tiles to occupy the device (issue 25's batch 1). At batch 1 the 14 x 14 and
// 7 x 7 layers of Bi-Real-18 have 8 tiles of 128 pixels x 64 channels each, for 132 SMs, and every
// tile's warp runs 9 or 18 k-steps one after another, each waiting on loads from L2. Split-K gives
// each tile `splits` blocks (split_k_plan, ops.cpp: about one block per multiprocessor, at most 8),
// block z of a tile summing k-steps [z * steps_per_split, (z + 1) * steps_per_split).
//
// The reduction stays on chip: the blocks of a tile form one thread-block cluster (sm_90,
// cudaLaunchAttributeClusterDimension (1, 1, splits)); each writes its warps' partial counts to its
// own shared memory, the cluster synchronizes, and warp w's tile is finished by block w % splits,
// which adds the other blocks' counts for warp w through distributed shared memory and runs the lean
// epilogue (lean_epilogue.cuh) on the sum. Agreement counts are integers, so the sum is exact in any
// order and the outputs equal bmma's bit for bit. No workspace in global memory, no atomics, one
// kernel (one CUDA-graph node) per conv.
//
// Shapes:
//   grid     (ceil(M / 128), ceil(O / 64), splits): bmma's grid, one cluster per tile along z
//   partial  (4 warps, 64 accumulators, 32 lanes) int32 in static shared memory (32 KB): a
//            thread's accumulator i at [warp][i][lane], so a warp's stores and loads hit 32 banks
//
// Where the tiles already fill the device (split_k_plan gives 1 split: batch 256), and before sm_90
// (no clusters), bmma_split runs bmma_lean.
#include "binary_conv.h"
#include "lean_epilogue.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <cooperative_groups.h>

namespace bireal {
namespace {

namespace cg = cooperative_groups;

constexpr int kAccPerThread = 2 * 8 * 4;  // WarpAcc's elements

__device__ __forceinline__ int& acc_element(WarpAcc& acc, int i) { return acc[i / 32][i / 4 % 8][i % 4]; }

// One block per multiprocessor is the point (batch 1), so the bound is 1 block per SM: no spills.
template <int kOpts>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1)
binary_conv2d_bmma_split_kernel(const ConvParams p, const BorderClasses border, int steps_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ int partial[kWarpsPerBlock][kAccPerThread][32];
  const cg::cluster_group cluster = cg::this_cluster();
  const int split = static_cast<int>(cluster.block_rank()), splits = static_cast<int>(cluster.num_blocks());
  wait_for_previous_kernel();  // (with programmatic dependent launch) before any read
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t warp_row0 = (int64_t(blockIdx.x) * kWarpsPerBlock + warp) * kWarpRows;
  const int warp_col0 = blockIdx.y * kWarpCols;
  WarpAcc acc;
  ThreadRows rows;
  PixelOrigin pix[2][2];
  set_consecutive_rows(p, border, warp_row0, g, pix, rows);
  // Every warp runs the main loop and the epilogue, those past the last pixel too (reading no
  // input, storing nothing): MMAs and shuffles in a branch the compiler cannot prove warp-uniform
  // would each cost a convergence sequence.
  const StepRange range{split * steps_per_split, (split + 1) * steps_per_split};
  warp_agreements(p, pix, warp_col0, g, t, acc, nullptr, range);
#pragma unroll
  for (int i = 0; i < kAccPerThread; ++i) partial[warp][i][lane] = acc_element(acc, i);
  cluster.sync();  // every block's partial counts written, and visible to the cluster
  let_next_kernel_launch();  // its blocks may be scheduled during this reduction and epilogue
  const bool finishes = warp_row0 < p.M && warp % splits == split;  // warp's tile summed and stored here
  if (finishes) {
    for (int other = 0; other < splits; ++other) {
      if (other == split) continue;
      const int* theirs = cluster.map_shared_rank(&partial[warp][0][lane], other);
#pragma unroll
      for (int i = 0; i < kAccPerThread; ++i) acc_element(acc, i) += theirs[i * 32];
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) rows.valid[i / 2][i % 2] = false;  // stores nothing
  }
  dots_from_agreements(acc, p.K);
  rows.base = warp_row0 + g, rows.mt_stride = 16;  // 32 consecutive pixels, as bmma_lean's
  store_lean<kOpts>(p, border, acc, rows, warp_col0, t);
  cluster.sync();  // no block exits (its shared memory gone) while another may still read it
#else
  __trap();  // the host dispatch launches it on sm_90 and newer only
#endif
}

}  // namespace

void launch_bmma_split(const ConvParams& p, const int32_t* table, dim3 grid, cudaStream_t stream) {
  const int device = c10::cuda::current_device();
  const int steps = (p.K_words + kChunkWords - 1) / kChunkWords;
  const SplitPlan plan = split_k_plan(int64_t(grid.x) * grid.y, steps,
                                      device_attribute(cudaDevAttrMultiProcessorCount, device));
  const bool clusters = device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 9 &&
                        device_attribute(cudaDevAttrClusterLaunch, device) != 0;
  if (plan.splits == 1 || !clusters) return launch_bmma_lean(p, table, grid, stream, /*one_mma=*/false);
  TORCH_CHECK(lean_supports(p), "bmma_split: called for a conv it does not support (lean_supports)");
  const BorderClasses border{table, p.padding + 1};
  const dim3 split_grid(grid.x, grid.y, static_cast<unsigned>(plan.splits));
  auto launch = [&](auto options) {
    constexpr int kOpts = decltype(options)::value;
    launch_kernel_in_clusters(binary_conv2d_bmma_split_kernel<kOpts>, split_grid, kWarpsPerBlock * 32, 0, stream,
                              device, static_cast<unsigned>(plan.splits), p, border, plan.steps_per_split);
  };
  const bool launched = with_lean_options(options_of(p), launch, LeanOptionSets{});
  TORCH_CHECK(launched, "bmma_split: no kernel instantiated for options ", options_of(p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bireal
