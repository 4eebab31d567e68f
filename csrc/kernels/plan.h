// Tiling of the depthwise-block kernels: tile shapes, shared-memory carve-up, grid sizes.
//
// Host-only plain C++ (no CUDA, no torch headers). The binding asks for a plan to size the
// float32 side outputs it allocates (statistics partials, dW/dB partials); the launchers pass
// the same plan to the kernels, so the shared-memory layout is computed in exactly one place.
#pragma once

#include <algorithm>
#include <cstdint>

#include "params.h"

namespace cmk {

// ------------------------------------------------------------------ tile shapes
//
// A conv kernel's block computes an output tile of TH x TW positions for CB channels.
// Each thread owns one channel and a strip of RW outputs along W of one row, which it
// computes from a sliding window of the shared-memory input tile (register blocking).
//   channels_last: lanes = channels (conflict-free shared memory, coalesced global access along C)
//   NCHW:          lanes = strips of one channel plane (the row stride is padded to 1 mod RW,
//                  which makes the 32 lanes' windows fall into 32 different banks)
template <bool CL, int CB_, int TH_, int TW_, int RW_>
struct Tile {
  static constexpr bool kChannelsLast = CL;
  static constexpr int CB = CB_;  // channels per block
  static constexpr int TH = TH_;  // output rows per tile
  static constexpr int TW = TW_;  // output columns per tile
  static constexpr int RW = RW_;  // outputs per thread along W
  static constexpr int S = TW / RW;          // strips per row
  static constexpr int STRIPS = TH * S;      // threads per channel
  static constexpr int THREADS = CB * STRIPS;
  static_assert(TW % RW == 0, "a row of the tile is a whole number of strips");
  static_assert((TH & (TH - 1)) == 0, "row groups of the dW reduction divide TH");
};

// Backward: the da halo tile (what dx needs) also serves the weight gradient, re-indexed over
// the x positions of the tile (see depthwise_conv.cuh), so x is staged without a halo and every
// supported kernel runs in one pass on the channels_last path:
//   ClBackwardTile       16 channels, 16x16: k up to 15 within kSmemBudget (a 2.25x da halo,
//                        against 3x for 32 channels x 8x16);
//   ClBackwardLargeTile  8 channels, 16x16: larger k (up to 31) within kSmemBudgetLarge; 8
//                        channels are 16 (bf16/f16) or 32 (f32) contiguous bytes per position.
using ClForwardTile = Tile<true, 32, 8, 16, 16>;      // 256 threads
using ClBackwardTile = Tile<true, 16, 16, 16, 16>;    // 256 threads
using ClBackwardLargeTile = Tile<true, 8, 16, 16, 8>; // 256 threads
using NchwForwardTile = Tile<false, 2, 32, 32, 16>;   // 128 threads
using NchwBackwardTile = Tile<false, 2, 16, 32, 8>;   // 128 threads
static_assert(ClForwardTile::THREADS == 256 && ClBackwardTile::THREADS == 256, "");
static_assert(ClBackwardLargeTile::THREADS == 256, "");
static_assert(NchwForwardTile::THREADS == 128 && NchwBackwardTile::THREADS == 128, "");

constexpr int64_t kSmemBudget = 99 * 1024;       // per block: two blocks fit an H100 SM (228 KB)
constexpr int64_t kSmemBudgetLarge = 113 * 1024; // the large-k backward tile: still two blocks (1 KB reserved each)
constexpr int kTapBlock = 8;                // taps per register window on the general (any k) path
constexpr int kSpecializedK[] = {3, 5, 7, 9};

// Elementwise kernels (apply, gradient reduction): 256 threads as channel slots x position lanes.
constexpr int kElementwiseThreads = 256;
constexpr int kPositionsPerBlock = 1024;

// Floats per shared-memory tile row holding `cols` columns.
//   channels_last: a warp holds 32 / cb strips in consecutive rows; a row width = 1 (mod 32 / cb)
//                  puts their cb-channel runs into different banks (no padding when cb = 32);
//   NCHW:          lanes are strips along W; a width = 1 (mod rw) spreads them over the banks.
inline int smem_row_width(bool channels_last, int cols, int rw, int cb) {
  const int m = channels_last ? (cb >= 32 ? 1 : 32 / cb) : rw;
  return cols + ((1 - cols) % m + m) % m;
}

// Floats of a [CB][kc][KW] weight tile: channels_last pads the channel stride to CB + 1, so that
// lanes over consecutive taps (coalesced global loads) store into different banks.
inline int64_t weight_tile_floats(bool channels_last, int cb, int kc, int KW) {
  return int64_t(kc) * KW * (channels_last ? cb + 1 : cb);
}

// Row groups of the backward's weight-gradient work items (channel x kernel row x tap block x
// row group): the best balance over the threads with at most kMaxDwItems items per thread (the
// compile-time kernels keep each item's dW in registers), the fewest row groups on ties.
// constexpr: those kernels size their register arrays with it.
inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

constexpr int kMaxDwItems = 3;
// The general (any k) path keeps up to this many dW items per thread in registers when the kernel
// fits one pass (the large tile at k = 31: 8 channels x 4 tap blocks x 31 rows = 992 <= 4 x 256);
// 0 (partials added per tile) for tiles with 16-output strips: 3 items already spill there.
template <class Tile>
constexpr int kDwRegItems = Tile::RW >= 16 ? 0 : 4;
constexpr int dw_row_groups(int cb, int th, int jg, int kc, int threads) {
  int best = 1;
  int64_t best_items = 0, best_slots = 1;
  for (int rg = 1; rg <= th; rg *= 2) {
    const int64_t items = int64_t(cb) * rg * jg * kc;
    const int64_t per = (items + threads - 1) / threads;
    if (per > kMaxDwItems && rg > 1) break;
    if (items * best_slots > best_items * per * threads) {  // items / slots is a better balance
      best = rg;
      best_items = items;
      best_slots = per * threads;
    }
  }
  return best;
}

struct ConvPlan {
  const char* error = nullptr;  // set when this configuration cannot run (reason in words)
  int kernel_k = 0;             // 3, 5, 7, 9: compile-time specialization; 0: general path
  bool large_tile = false;      // backward, channels_last: ClBackwardLargeTile
  bool dw_in_registers = false; // backward, general path in one pass: dW/dB items in registers (kDwRegItems<Tile>)
  int threads = 0;
  int tile_h = 0, tile_w = 0, tiles_h = 0, tiles_w = 0;
  int64_t tiles = 0;            // N * tiles_h * tiles_w, index = (n * tiles_h + th) * tiles_w + tw
  int channel_groups = 0;       // ceil(C / CB)
  int64_t blocks = 0;
  int row_chunk = 0;            // kernel rows per shared-memory pass (KH when it fits)
  int rows_alloc = 0;           // TH + row_chunk - 1
  int smem_width = 0;           // floats per halo-tile row (x, da)
  int dac_width = 0;            // floats per row of the backward's x tile (no halo)
  // shared-memory carve-up, in floats
  int off_da = 0, off_w = 0, off_dac = 0, off_stats = 0;  // backward: da halo at 0, weights, x tile,
  int off_coef = 0;                                        // per-channel da coefficients [4][CB]
  int64_t smem_floats = 0;
  int64_t smem_bytes = 0;
  // backward only: blocks loop over `tiles_per_group` consecutive tiles; dW/dB partials are
  // kept per (group, row group) so that every partial has exactly one writer (deterministic)
  int groups = 0, tiles_per_group = 0, row_groups = 0;
};

// The compile-time kernel size to use (3, 5, 7, 9), or 0 for the general path: square kernels
// of those sizes whose rows all fit one shared-memory pass.
inline int specialization(const DepthwiseParams& p, int row_chunk) {
  if (p.KH != p.KW || row_chunk != p.KH) return 0;
  for (int k : kSpecializedK)
    if (k == p.KH) return k;
  return 0;
}

template <class Tile>
inline void plan_tiles(const DepthwiseParams& p, ConvPlan& plan) {
  plan.threads = Tile::THREADS;
  plan.tile_h = Tile::TH;
  plan.tile_w = Tile::TW;
  plan.tiles_h = ceil_div(p.H, Tile::TH);
  plan.tiles_w = ceil_div(p.W, Tile::TW);
  plan.tiles = static_cast<int64_t>(p.N) * plan.tiles_h * plan.tiles_w;
  plan.channel_groups = ceil_div(p.C, Tile::CB);
  plan.smem_width = smem_row_width(Tile::kChannelsLast, Tile::TW + p.KW - 1, Tile::RW, Tile::CB);
}

// Largest kernel-row chunk whose shared memory fits the budget; 0 when not even one row fits.
template <class Fn>
inline int largest_chunk(int KH, int64_t budget, Fn floats_for_chunk) {
  for (int kc = KH; kc >= 1; --kc)
    if (floats_for_chunk(kc) * 4 <= budget) return kc;
  return 0;
}

template <class Tile>
inline ConvPlan plan_forward_tile(const DepthwiseParams& p) {
  ConvPlan plan;
  plan_tiles<Tile>(p, plan);
  const int64_t cb = Tile::CB, sw = plan.smem_width, stats = int64_t(Tile::STRIPS) * cb * 3;
  auto floats = [&](int kc) {
    return cb * (Tile::TH + kc - 1) * sw + weight_tile_floats(Tile::kChannelsLast, Tile::CB, kc, p.KW) + stats;
  };
  plan.row_chunk = largest_chunk(p.KH, kSmemBudget, floats);
  if (plan.row_chunk == 0) {
    plan.error = "the kernel is too wide for the forward kernel's shared-memory tile";
    return plan;
  }
  plan.rows_alloc = Tile::TH + plan.row_chunk - 1;
  plan.off_w = static_cast<int>(cb * plan.rows_alloc * sw);
  plan.off_stats = static_cast<int>(plan.off_w + weight_tile_floats(Tile::kChannelsLast, Tile::CB, plan.row_chunk, p.KW));
  plan.smem_floats = floats(plan.row_chunk);
  plan.smem_bytes = plan.smem_floats * 4;
  plan.kernel_k = specialization(p, plan.row_chunk);
  plan.blocks = plan.tiles * plan.channel_groups;
  if (plan.blocks > 0x7fffffff) plan.error = "too many tiles for one grid (N*H*W*C is too large)";
  return plan;
}

// `one_pass`: refuse plans that split the kernel rows into several passes.
template <class Tile>
inline ConvPlan plan_backward_tile(const DepthwiseParams& p, int num_sms, int64_t budget, bool one_pass) {
  ConvPlan plan;
  plan_tiles<Tile>(p, plan);
  // channels_last: the lanes of a warp that share a channel read the same x element (broadcast)
  plan.dac_width = Tile::kChannelsLast ? Tile::TW : Tile::TW + 1;
  const int64_t cb = Tile::CB, sw = plan.smem_width, xt = int64_t(Tile::TH) * plan.dac_width;
  auto floats = [&](int kc) {
    // + 3: room to align the coefficient table (off_coef) to 16 bytes
    return cb * ((Tile::TH + kc - 1) * sw + xt + 4) + weight_tile_floats(Tile::kChannelsLast, Tile::CB, kc, p.KW) + 3;
  };
  plan.row_chunk = largest_chunk(p.KH, budget, floats);
  if (plan.row_chunk == 0 || (one_pass && plan.row_chunk < p.KH)) {
    plan.row_chunk = 0;
    plan.error = "the kernel is too wide for the backward kernel's shared-memory tiles";
    return plan;
  }
  plan.rows_alloc = Tile::TH + plan.row_chunk - 1;
  plan.off_da = 0;
  plan.off_w = static_cast<int>(cb * plan.rows_alloc * sw);
  plan.off_dac = static_cast<int>(plan.off_w + weight_tile_floats(Tile::kChannelsLast, Tile::CB, plan.row_chunk, p.KW));
  plan.off_coef = static_cast<int>((plan.off_dac + xt * cb + 3) / 4 * 4);  // 16-byte aligned: GradPreactValue's vector reads
  plan.smem_floats = floats(plan.row_chunk);
  plan.smem_bytes = plan.smem_floats * 4;
  plan.kernel_k = specialization(p, plan.row_chunk);

  // Enough blocks to fill the GPU a few times over; each loops over its group of tiles.
  const int64_t target_blocks = 4 * static_cast<int64_t>(std::max(num_sms, 1));
  int64_t groups = std::min<int64_t>(std::max<int64_t>(1, (target_blocks + plan.channel_groups - 1) / plan.channel_groups),
                                     std::max<int64_t>(plan.tiles, 1));
  plan.tiles_per_group = ceil_div(std::max<int64_t>(plan.tiles, 1), groups);
  plan.groups = ceil_div(std::max<int64_t>(plan.tiles, 1), plan.tiles_per_group);  // no empty group
  const int jg = plan.kernel_k ? 1 : ceil_div(p.KW, kTapBlock);
  plan.row_groups = dw_row_groups(Tile::CB, Tile::TH, jg, plan.row_chunk, Tile::THREADS);
  const int64_t items = int64_t(Tile::CB) * plan.row_groups * jg * p.KH;
  plan.dw_in_registers = plan.kernel_k == 0 && plan.row_chunk == p.KH && kDwRegItems<Tile> > 0 &&
                         items <= int64_t(kDwRegItems<Tile>) * Tile::THREADS;
  plan.blocks = static_cast<int64_t>(plan.groups) * plan.channel_groups;
  if (plan.blocks > 0x7fffffff) plan.error = "too many tiles for one grid (N*H*W*C is too large)";
  return plan;
}

inline ConvPlan plan_forward(const DepthwiseParams& p) {
  return p.channels_last ? plan_forward_tile<ClForwardTile>(p) : plan_forward_tile<NchwForwardTile>(p);
}

// channels_last never chunks kernel rows (each pass would recompute the da halo): the 32-channel
// tile when the whole kernel fits, else the 8-channel tile, else the kernel is too wide.
inline ConvPlan plan_backward(const DepthwiseParams& p, int num_sms) {
  if (!p.channels_last) return plan_backward_tile<NchwBackwardTile>(p, num_sms, kSmemBudget, false);
  ConvPlan plan = plan_backward_tile<ClBackwardTile>(p, num_sms, kSmemBudget, true);
  if (plan.error == nullptr) return plan;
  plan = plan_backward_tile<ClBackwardLargeTile>(p, num_sms, kSmemBudgetLarge, true);
  plan.large_tile = true;
  return plan;
}

// ------------------------------------------------------------------ elementwise kernels
//
// Block = channel slots x position lanes. channels_last: 32 slots of `vec` channels (16-byte
// loads) x 8 lanes over positions; NCHW: 8 slots of one channel x 32 lanes along W.
// n / d as a multiply and a shift, exact for 0 <= n < 2^30 (positions; the binding checks the
// bound): mul = ceil(2^shift / d) with shift = 30 + ceil(log2 d), so the error n * (mul * d -
// 2^shift) / (d * 2^shift) stays below 1 / d. mul <= 2^31 fits 32 bits; n * mul < 2^61.
struct FastDiv {
  uint32_t mul = 1;
  int shift = 0;
};

inline FastDiv fast_div(int d) {
  int log2d = 0;
  while ((int64_t(1) << log2d) < d) ++log2d;
  FastDiv f;
  f.shift = 30 + log2d;
  f.mul = static_cast<uint32_t>(((uint64_t(1) << f.shift) + d - 1) / d);
  return f;
}

struct ElementwisePlan {
  int vec = 1;                // channels per slot
  int slots = 0, lanes = 0;   // slots * lanes = kElementwiseThreads
  int channels_per_block = 0;
  int channel_groups = 0;
  int positions_per_block = kPositionsPerBlock;
  int64_t tiles = 0;          // position chunks: the T of the [2, T, C] reduction partials
  int64_t blocks = 0;
  int64_t smem_bytes = 0;     // the reduction's [lanes][channels_per_block][2] floats
  FastDiv div_hw, div_w;      // position -> (n, h, w) without runtime divisions
};

inline ElementwisePlan plan_elementwise(const DepthwiseParams& p, int vec_elems) {
  ElementwisePlan plan;
  plan.vec = p.channels_last && p.vec_ok ? vec_elems : 1;
  plan.slots = p.channels_last ? 32 : 8;
  plan.lanes = kElementwiseThreads / plan.slots;
  plan.channels_per_block = plan.slots * plan.vec;
  plan.channel_groups = ceil_div(p.C, plan.channels_per_block);
  const int64_t positions = static_cast<int64_t>(p.N) * p.H * p.W;
  plan.tiles = (positions + plan.positions_per_block - 1) / plan.positions_per_block;
  plan.blocks = plan.tiles * plan.channel_groups;
  plan.smem_bytes = int64_t(plan.lanes) * plan.channels_per_block * 2 * 4;
  plan.div_hw = fast_div(std::max(p.H * p.W, 1));
  plan.div_w = fast_div(std::max(p.W, 1));
  return plan;
}

inline int vector_elems(DType t) { return t == DType::F32 ? 4 : 8; }  // 16 bytes

}  // namespace cmk
