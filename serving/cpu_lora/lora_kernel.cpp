// Fused multi-LoRA linear op for the CPU: for every token group (the tokens of one adapter slot),
// shrink (x @ A) and expand (h @ B) in one pass, reading each present adapter's weights once per
// call, in the model's dtype (bf16 or float32) with float32 accumulation.
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
// Groups of more rows than this (prefill) expand in register tiles; smaller ones (decode) stream
// B (see expand). Measured on the decode-step microbenchmark: 8 beat 4 and 16.
constexpr int64_t kTiledRows = 2 * kRowBlock;
// Software prefetch distance on A and B. 4 KB ahead (a page) beat 0.75-2 KB by 8-10 % on the
// decode-step microbenchmark (AMD EPYC, AVX-512); the distance was in rows before, which left
// rank-16 shrinks (32-byte rows) only 768 bytes ahead.
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kVec = 16;        // floats per vector (one AVX-512 register, two AVX2 ones)

typedef float f32v __attribute__((vector_size(64)));
typedef uint32_t u32v __attribute__((vector_size(64)));
typedef uint16_t u16v __attribute__((vector_size(32)));

inline f32v vload(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32v vload(const uint16_t* p) {  // 16 bf16 -> 16 float
  u16v h;
  std::memcpy(&h, p, sizeof h);
  u32v w = __builtin_convertvector(h, u32v) << 16;
  f32v v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// Shrink of M rows (1..kRowBlock), register-blocked: h[i][j0 + 16c + l] for NC vectors of
// columns, summed over K. A is read once, row after row (one sequential stream per tile).
template <class D, int M, int NC>
void shrink_tile(const float* xf, const typename D::T* A, int64_t K, int64_t R, int64_t j0,
                 float* h) {
  f32v acc[M][NC] = {};
  const int64_t row_bytes = R * static_cast<int64_t>(sizeof(typename D::T));
  const int64_t ahead = kPrefetchBytes / row_bytes > 1 ? kPrefetchBytes / row_bytes : 1;
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(A + (k + ahead) * R + j0);
    if (NC > 2) __builtin_prefetch(A + (k + ahead) * R + j0 + 2 * kVec);
    f32v w[NC];
    for (int c = 0; c < NC; ++c) w[c] = vload(A + k * R + j0 + c * kVec);
    for (int i = 0; i < M; ++i) {
      const float xv = xf[i * K + k];
      for (int c = 0; c < NC; ++c) acc[i][c] += xv * w[c];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int c = 0; c < NC; ++c) std::memcpy(h + i * R + j0 + c * kVec, &acc[i][c], sizeof(f32v));
}

template <class D, int M>
void shrink(const float* xf, const typename D::T* A, int64_t K, int64_t R, float* h) {
  int64_t j0 = 0;
  for (; j0 + 4 * kVec <= R; j0 += 4 * kVec) shrink_tile<D, M, 4>(xf, A, K, R, j0, h);
  switch ((R - j0) / kVec) {
    case 3: shrink_tile<D, M, 3>(xf, A, K, R, j0, h); j0 += 3 * kVec; break;
    case 2: shrink_tile<D, M, 2>(xf, A, K, R, j0, h); j0 += 2 * kVec; break;
    case 1: shrink_tile<D, M, 1>(xf, A, K, R, j0, h); j0 += kVec; break;
    default: break;
  }
  if (j0 < R) {  // columns past the last full vector
    for (int i = 0; i < M; ++i)
      for (int64_t j = j0; j < R; ++j) h[i * R + j] = 0.f;
    for (int64_t k = 0; k < K; ++k)
      for (int i = 0; i < M; ++i)
        for (int64_t j = j0; j < R; ++j) h[i * R + j] += xf[i * K + k] * D::load(A[k * R + j]);
  }
}

// Expand of M rows into out[i][col[0] .. col[n_slices]) (float32).
// A group of few rows (decode: up to kTiledRows tokens of an adapter): B is read once, rank after
// rank (rank j of every slice is one contiguous run of N values), so the reads stream from memory;
// the float32 sums stay in cache. A full block of a larger group (prefill, ``tiled``): 32-column
// tiles summed in registers over the ranks, since B is in cache after the group's first block
// (on a group's only block, the tiles' strided reads of B ran 15-25 % slower than streaming).
// Both sum over the ranks in the same order, so they give the same bits.
template <class D, int M>
void expand(const float* h, int64_t R, const typename D::T* B, int64_t N, int64_t r,
            int64_t n_slices, const int64_t* col, float* out, bool tiled) {
  if (M == kRowBlock && tiled) {
    for (int64_t s = 0; s < n_slices; ++s) {
      int64_t n0 = col[s];
      for (; n0 + 2 * kVec <= col[s + 1]; n0 += 2 * kVec) {
        f32v acc[M][2] = {};
        for (int64_t j = 0; j < r; ++j) {
          const f32v w0 = vload(B + j * N + n0), w1 = vload(B + j * N + n0 + kVec);
          for (int i = 0; i < M; ++i) {
            const float hv = h[i * R + s * r + j];
            acc[i][0] += hv * w0;
            acc[i][1] += hv * w1;
          }
        }
        for (int i = 0; i < M; ++i) std::memcpy(out + i * N + n0, acc[i], sizeof acc[i]);
      }
      for (; n0 < col[s + 1]; ++n0)  // columns past the last full tile
        for (int i = 0; i < M; ++i) {
          float sum = 0.f;
          for (int64_t j = 0; j < r; ++j) sum += h[i * R + s * r + j] * D::load(B[j * N + n0]);
          out[i * N + n0] = sum;
        }
    }
    return;
  }
  std::memset(out, 0, sizeof(float) * M * N);
  for (int64_t j = 0; j < r; ++j) {
    const typename D::T* bj = B + j * N;
    for (int64_t s = 0; s < n_slices; ++s) {
      float hv[M];
      for (int i = 0; i < M; ++i) hv[i] = h[i * R + s * r + j];
      int64_t n = col[s];
      for (; n + kVec <= col[s + 1]; n += kVec) {
        __builtin_prefetch(bj + n + kPrefetchBytes / sizeof(typename D::T));
        const f32v w = vload(bj + n);
        for (int i = 0; i < M; ++i) {
          f32v o = vload(out + i * N + n);
          o += hv[i] * w;
          std::memcpy(out + i * N + n, &o, sizeof o);
        }
      }
      for (; n < col[s + 1]; ++n)
        for (int i = 0; i < M; ++i) out[i * N + n] += hv[i] * D::load(bj[n]);
    }
  }
}

// One block of M rows of one group.
template <class D, int M>
void block(const typename D::T* x, int64_t x_stride, typename D::T* y, int64_t y_stride,
           const typename D::T* A, const typename D::T* B, int64_t K, int64_t r,
           int64_t n_slices, const int64_t* col, int64_t N, const int64_t* rows, float scale,
           float* xf, float* h, float* out, bool tiled) {
  const int64_t R = n_slices * r;
  for (int i = 0; i < M; ++i) {
    const typename D::T* xr = x + rows[i] * x_stride;
    for (int64_t k = 0; k < K; ++k) xf[i * K + k] = D::load(xr[k]);
  }
  // Shrink: h = round(scale * x @ A).
  shrink<D, M>(xf, A, K, R, h);
  for (int64_t j = 0; j < M * R; ++j) h[j] = D::round(h[j] * scale);
  // Expand: y[:, col[s]:col[s+1]] += round(h[:, s*r:(s+1)*r] @ B[:, col[s]:col[s+1]]).
  expand<D, M>(h, R, B, N, r, n_slices, col, out, tiled);
  for (int i = 0; i < M; ++i) {
    typename D::T* yr = y + rows[i] * y_stride;
    const float* oi = out + i * N;
    for (int64_t n = col[0]; n < col[n_slices]; ++n)
      yr[n] = D::store(D::load(yr[n]) + D::round(oi[n]));
  }
}

template <class D>
void block_m(int64_t m, const typename D::T* x, int64_t x_stride, typename D::T* y,
             int64_t y_stride, const typename D::T* A, const typename D::T* B, int64_t K,
             int64_t r, int64_t n_slices, const int64_t* col, int64_t N, const int64_t* rows,
             float scale, float* xf, float* h, float* out, bool tiled) {
  switch (m) {
#define TL_BLOCK(M) \
  case M: block<D, M>(x, x_stride, y, y_stride, A, B, K, r, n_slices, col, N, rows, scale, xf, h, out, tiled); break;
    TL_BLOCK(1) TL_BLOCK(2) TL_BLOCK(3) TL_BLOCK(4)
#undef TL_BLOCK
    default: break;
  }
}

template <class D>
void lora_linear(const typename D::T* x, int64_t x_stride, typename D::T* y, int64_t y_stride,
                 const typename D::T* A, const typename D::T* B, int64_t K, int64_t r,
                 int64_t n_slices, const int64_t* col, int64_t N, const int64_t* rows,
                 int64_t n_groups, const int64_t* slots, const int64_t* ends, float scale) {
  const int64_t R = n_slices * r;
  // Work items: (group, block of rows). Rows of one item are disjoint from every other's, so
  // the items can run on any thread in any order.
  std::vector<int64_t> item_start, item_len, item_slot;
  std::vector<char> item_tiled;  // the item's group has more than kTiledRows rows
  int64_t start = 0;
  for (int64_t g = 0; g < n_groups; ++g) {
    for (int64_t b = start; b < ends[g]; b += kRowBlock) {
      item_start.push_back(b);
      item_len.push_back(ends[g] - b < kRowBlock ? ends[g] - b : kRowBlock);
      item_slot.push_back(slots[g]);
      item_tiled.push_back(ends[g] - start > kTiledRows);
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
      block_m<D>(item_len[it], x, x_stride, y, y_stride, A + s * K * R, B + s * r * N, K, r,
                 n_slices, col, N, rows + item_start[it], scale, xf.data(), h.data(),
                 out.data(), item_tiled[it]);
    }
  }
}

}  // namespace

extern "C" {

int tl_lora_abi_version() { return 1; }

void tl_lora_linear_bf16(const uint16_t* x, int64_t x_stride, uint16_t* y, int64_t y_stride,
                         const uint16_t* A, const uint16_t* B, int64_t K, int64_t r,
                         int64_t n_slices, const int64_t* col, int64_t N, const int64_t* rows,
                         int64_t n_groups, const int64_t* slots, const int64_t* ends,
                         float scale) {
  lora_linear<BF16>(x, x_stride, y, y_stride, A, B, K, r, n_slices, col, N, rows, n_groups, slots,
                    ends, scale);
}

void tl_lora_linear_f32(const float* x, int64_t x_stride, float* y, int64_t y_stride,
                        const float* A, const float* B, int64_t K, int64_t r, int64_t n_slices,
                        const int64_t* col, int64_t N, const int64_t* rows, int64_t n_groups,
                        const int64_t* slots, const int64_t* ends, float scale) {
  lora_linear<F32>(x, x_stride, y, y_stride, A, B, K, r, n_slices, col, N, rows, n_groups, slots,
                   ends, scale);
}

}  // extern "C"
