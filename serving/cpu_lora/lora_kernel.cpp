// Fused multi-LoRA linear op for the CPU: for every token group (the tokens of one adapter slot),
// shrink (x @ A) and expand (h @ B) in one pass, reading each present adapter's weights once per
// call, in the LoRA dtype (bf16 or float32; bf16 weights also with float32 activations) with
// float32 accumulation.
//
// Built by serving/cpu_lora/kernel.py with g++ -O3 -march=native -fopenmp and called through
// ctypes; no torch headers. The OpenMP runtime is the libgomp.so.1 torch has already loaded.
//
// Layout (S slots, R = n_slices * r, N = sum of the slices' outputs):
//   x: rows of K activations (row stride x_stride), y: rows of N outputs (row stride y_stride),
//   A: (S, K, R) contiguous: slice i's shrink is columns i*r .. (i+1)*r,
//   B: (S, r, N) contiguous: slice i's expand is columns col[i] .. col[i+1] (compact, no zeros),
//   rows: the M token rows with an adapter, grouped by slot; group g is rows[start_g, ends[g])
//   with slot slots[g].
// Rounding follows vLLM's CPU reference (lora_ops.py): the shrink is summed and scaled in float32,
// rounded to the model dtype; the expand is summed in float32, rounded, and added to y in float32,
// then rounded. Only the order of the float32 sums differs.

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

struct BF16 {
  using T = uint16_t;
  static inline float load(T v) { return bf16_to_f32(v); }
  static inline T store(float v) { return f32_to_bf16(v); }
  static inline float round(float v) { return bf16_to_f32(f32_to_bf16(v)); }
};

struct F32 {
  using T = float;
  static inline float load(T v) { return v; }
  static inline T store(float v) { return v; }
  static inline float round(float v) { return v; }
};

constexpr int64_t kRowBlock = 4;   // token rows that share one read of the weights
// Software prefetch distance on A and B. 4 KB ahead (a page) beat 0.75-2 KB by 8-10 % on the
// decode-step microbenchmark (AMD EPYC, AVX-512); the distance was in rows before, which left
// rank-16 shrinks (32-byte rows) only 768 bytes ahead.
constexpr int64_t kPrefetchBytes = 4096;
// 8-float vectors (one AVX2 register) for the register tiles: ranks are multiples of 8 in
// practice (r = 8, 16, 32, 64), so R and the slices' rank columns split into whole 8-vectors,
// and M x NC accumulators plus NC weight vectors fit AVX2's 16 registers (M = 4, NC = 3). With
// 16-float vectors a rank-8 shrink (o, down) fell to the scalar tail: 4-6 GFLOP/s, where the base
// layers' float32 GEMMs run at 90-150 on the same AVX2 machine.
constexpr int64_t kVec8 = 8;
constexpr int kMaxNC = 3;
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

inline f32x8 vload8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x8 vload8(const uint16_t* p) {  // 8 bf16 -> 8 float
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// Shrink of M rows (1..kRowBlock), register-blocked: h[i][j0 + 8c + l] for NC vectors of
// columns, summed over K in order. A is read once per tile, row after row.
template <class W, int M, int NC>
void shrink_tile(const float* xf, const typename W::T* A, int64_t K, int64_t R, int64_t j0,
                 float* h) {
  f32x8 acc[M][NC] = {};
  const int64_t row_bytes = R * static_cast<int64_t>(sizeof(typename W::T));
  const int64_t ahead = kPrefetchBytes / row_bytes > 1 ? kPrefetchBytes / row_bytes : 1;
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(A + (k + ahead) * R + j0);
    f32x8 w[NC];
    for (int c = 0; c < NC; ++c) w[c] = vload8(A + k * R + j0 + c * kVec8);
    for (int i = 0; i < M; ++i) {
      const float xv = xf[i * K + k];
      for (int c = 0; c < NC; ++c) acc[i][c] += xv * w[c];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int c = 0; c < NC; ++c) std::memcpy(h + i * R + j0 + c * kVec8, &acc[i][c], sizeof(f32x8));
}

template <class W, int M>
void shrink(const float* xf, const typename W::T* A, int64_t K, int64_t R, float* h) {
  int64_t j0 = 0;
  for (; j0 + kMaxNC * kVec8 <= R; j0 += kMaxNC * kVec8) shrink_tile<W, M, kMaxNC>(xf, A, K, R, j0, h);
  switch ((R - j0) / kVec8) {
    case 2: shrink_tile<W, M, 2>(xf, A, K, R, j0, h); j0 += 2 * kVec8; break;
    case 1: shrink_tile<W, M, 1>(xf, A, K, R, j0, h); j0 += kVec8; break;
    default: break;
  }
  if (j0 < R) {  // columns past the last full vector (ranks that are not multiples of 8)
    for (int i = 0; i < M; ++i)
      for (int64_t j = j0; j < R; ++j) h[i * R + j] = 0.f;
    for (int64_t k = 0; k < K; ++k)
      for (int i = 0; i < M; ++i)
        for (int64_t j = j0; j < R; ++j) h[i * R + j] += xf[i * K + k] * W::load(A[k * R + j]);
  }
}

// A tiled expand's NC vectors of columns n0.. of one slice: out[i][n] = sum over the slice's
// ranks j (in order) of h[i][j] * B[j][n].
template <class W, int M, int NC>
void expand_tile(const float* hs, int64_t R, const typename W::T* B, int64_t N, int64_t r,
                 int64_t n0, float* out) {
  f32x8 acc[M][NC] = {};
  for (int64_t j = 0; j < r; ++j) {
    f32x8 w[NC];
    for (int c = 0; c < NC; ++c) w[c] = vload8(B + j * N + n0 + c * kVec8);
    for (int i = 0; i < M; ++i) {
      const float hv = hs[i * R + j];
      for (int c = 0; c < NC; ++c) acc[i][c] += hv * w[c];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int c = 0; c < NC; ++c) std::memcpy(out + i * N + n0 + c * kVec8, &acc[i][c], sizeof(f32x8));
}

// Expand of M rows into out[i][col[0] .. col[n_slices]) (float32): per slice, register tiles of
// NC 8-vectors of columns summed over the slice's ranks in order. B is read once per block; the
// streaming expand this replaced (out updated in memory, rank after rank) ran at half the speed
// even for one-row groups (decode with many adapters) on AVX2.
template <class W, int M>
void expand(const float* h, int64_t R, const typename W::T* B, int64_t N, int64_t r,
            int64_t n_slices, const int64_t* col, float* out) {
  for (int64_t s = 0; s < n_slices; ++s) {
    const float* hs = h + s * r;
    int64_t n0 = col[s];
    for (; n0 + kMaxNC * kVec8 <= col[s + 1]; n0 += kMaxNC * kVec8)
      expand_tile<W, M, kMaxNC>(hs, R, B, N, r, n0, out);
    switch ((col[s + 1] - n0) / kVec8) {
      case 2: expand_tile<W, M, 2>(hs, R, B, N, r, n0, out); n0 += 2 * kVec8; break;
      case 1: expand_tile<W, M, 1>(hs, R, B, N, r, n0, out); n0 += kVec8; break;
      default: break;
    }
    for (; n0 < col[s + 1]; ++n0)  // columns past the last full vector
      for (int i = 0; i < M; ++i) {
        float sum = 0.f;
        for (int64_t j = 0; j < r; ++j) sum += hs[i * R + j] * W::load(B[j * N + n0]);
        out[i * N + n0] = sum;
      }
  }
}

// One block of M rows of one group.
template <class D, class W, int M>
void block(const typename D::T* x, int64_t x_stride, typename D::T* y, int64_t y_stride,
           const typename W::T* A, const typename W::T* B, int64_t K, int64_t r,
           int64_t n_slices, const int64_t* col, int64_t N, const int64_t* rows, float scale,
           float* xf, float* h, float* out) {
  const int64_t R = n_slices * r;
  for (int i = 0; i < M; ++i) {
    const typename D::T* xr = x + rows[i] * x_stride;
    for (int64_t k = 0; k < K; ++k) xf[i * K + k] = D::load(xr[k]);
  }
  // Shrink: h = round(scale * x @ A).
  shrink<W, M>(xf, A, K, R, h);
  for (int64_t j = 0; j < M * R; ++j) h[j] = D::round(h[j] * scale);
  // Expand: y[:, col[s]:col[s+1]] += round(h[:, s*r:(s+1)*r] @ B[:, col[s]:col[s+1]]).
  expand<W, M>(h, R, B, N, r, n_slices, col, out);
  for (int i = 0; i < M; ++i) {
    typename D::T* yr = y + rows[i] * y_stride;
    const float* oi = out + i * N;
    for (int64_t n = col[0]; n < col[n_slices]; ++n)
      yr[n] = D::store(D::load(yr[n]) + D::round(oi[n]));
  }
}

template <class D, class W>
void block_m(int64_t m, const typename D::T* x, int64_t x_stride, typename D::T* y,
             int64_t y_stride, const typename W::T* A, const typename W::T* B, int64_t K,
             int64_t r, int64_t n_slices, const int64_t* col, int64_t N, const int64_t* rows,
             float scale, float* xf, float* h, float* out) {
  switch (m) {
#define TL_BLOCK(M) \
  case M: block<D, W, M>(x, x_stride, y, y_stride, A, B, K, r, n_slices, col, N, rows, scale, xf, h, out); break;
    TL_BLOCK(1) TL_BLOCK(2) TL_BLOCK(3) TL_BLOCK(4)
#undef TL_BLOCK
    default: break;
  }
}

template <class D, class W>
void lora_linear(const typename D::T* x, int64_t x_stride, typename D::T* y, int64_t y_stride,
                 const typename W::T* A, const typename W::T* B, int64_t K, int64_t r,
                 int64_t n_slices, const int64_t* col, int64_t N, const int64_t* rows,
                 int64_t n_groups, const int64_t* slots, const int64_t* ends, float scale) {
  const int64_t R = n_slices * r;
  // Work items: (group, block of rows). Rows of one item are disjoint from every other's, so
  // the items can run on any thread in any order.
  std::vector<int64_t> item_start, item_len, item_slot;
  int64_t start = 0;
  for (int64_t g = 0; g < n_groups; ++g) {
    for (int64_t b = start; b < ends[g]; b += kRowBlock) {
      item_start.push_back(b);
      item_len.push_back(ends[g] - b < kRowBlock ? ends[g] - b : kRowBlock);
      item_slot.push_back(slots[g]);
    }
    start = ends[g];
  }
  const int64_t n_items = static_cast<int64_t>(item_start.size());
#pragma omp parallel if (n_items > 1)
  {
    std::vector<float> xf(kRowBlock * K), h(kRowBlock * R), out(kRowBlock * N);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t s = item_slot[it];
      block_m<D, W>(item_len[it], x, x_stride, y, y_stride, A + s * K * R, B + s * r * N, K, r,
                 n_slices, col, N, rows + item_start[it], scale, xf.data(), h.data(),
                 out.data());
    }
  }
}

}  // namespace

extern "C" {

int tl_lora_abi_version() { return 2; }

void tl_lora_linear_bf16(const uint16_t* x, int64_t x_stride, uint16_t* y, int64_t y_stride,
                         const uint16_t* A, const uint16_t* B, int64_t K, int64_t r,
                         int64_t n_slices, const int64_t* col, int64_t N, const int64_t* rows,
                         int64_t n_groups, const int64_t* slots, const int64_t* ends,
                         float scale) {
  lora_linear<BF16, BF16>(x, x_stride, y, y_stride, A, B, K, r, n_slices, col, N, rows, n_groups, slots,
                    ends, scale);
}

void tl_lora_linear_f32(const float* x, int64_t x_stride, float* y, int64_t y_stride,
                        const float* A, const float* B, int64_t K, int64_t r, int64_t n_slices,
                        const int64_t* col, int64_t N, const int64_t* rows, int64_t n_groups,
                        const int64_t* slots, const int64_t* ends, float scale) {
  lora_linear<F32, F32>(x, x_stride, y, y_stride, A, B, K, r, n_slices, col, N, rows, n_groups, slots,
                   ends, scale);
}

// float32 activations with bf16 weights (vLLM's --lora-dtype bfloat16 on a float32 model): half
// the weight bytes, and with many adapters in a step the kernel is bound by reading them.
void tl_lora_linear_f32_bf16w(const float* x, int64_t x_stride, float* y, int64_t y_stride,
                              const uint16_t* A, const uint16_t* B, int64_t K, int64_t r,
                              int64_t n_slices, const int64_t* col, int64_t N,
                              const int64_t* rows, int64_t n_groups, const int64_t* slots,
                              const int64_t* ends, float scale) {
  lora_linear<F32, BF16>(x, x_stride, y, y_stride, A, B, K, r, n_slices, col, N, rows, n_groups,
                         slots, ends, scale);
}

}  // extern "C"
