// XLA FFI handlers: fused softmax attention on the CPU (attention implementation "cpu"), its
// forward and its backward, float32 or bfloat16 inputs and results, float32 arithmetic throughout.
//
//   out[b, i, n, :] = sum_j p[j] v[b, j, n / G, :],   p = softmax_j(scale * q[b, i, n] . k[b, j, n / G])
//
// over the keys j that may be attended: mask[b, i, j] (when a mask is given) and, with `causal`,
// j <= i. A row with no such key is 0. q [B, T, N, H], k and v [B, S, K, H] with N = K * G; the
// head dim H is a multiple of 16 (the Python wrapper pads it). With rotary tables cos, sin
// [B, T, R] (self-attention, S = T), q and k are first rotated by position in the rotate-half
// layout of Llama / HF, on their first R features:
//   x'[f] = x[f] cos[f] + (f < R/2 ? -x[f + R/2] : x[f - R/2]) sin[f],
// in float32 and never rounded. Semantics and masking rules are those of
// nemotron_jax/kernels/attention/reference.py (attention_reference, apply_rope), the oracle this
// is tested against.
//
// Why it exists: XLA:CPU runs the reference as some 40 small thunks per layer (two batched
// products, masking, the softmax's reductions, transposes, conversions), and its backward as
// more. Here each task keeps one kv head's keys and values in cache and never writes a [T, S]
// matrix to memory. With `causal` the keys after each query are never touched.
//
// Forward ("NemotronCpuAttention"), per query position i and the G query heads of one kv head:
//   1. scores for up to 4 heads x 64 keys at a time: up to 16 vector accumulators, the keys
//      stored transposed ([H, S]) so every load is contiguous;
//   2. max, exp and sum over the row (unnormalised probabilities stay in the score buffer);
//   3. out = P V, 4 heads x up to 64 features of accumulators, scaled by 1 / sum at the end.
// It also returns each row's log-sum-exp lse [B, T, N] (float32; +inf for a row with no key),
// which is all the backward needs to recompute P.
// Tasks: (batch, kv head, 16 query positions).
//
// Backward ("NemotronCpuAttentionBackward"), given out, its cotangent dout and lse; per query
// position i and up to 4 query heads of one kv head, with delta = dout . out per row:
//   P = exp(scale q.k - lse), dP = dout . v, dS = P (dP - delta),
//   dq = scale dS K  (written at once), dk += scale dS^T q, dv += P^T dout (kept in float32
//   accumulators for the whole task, updated 4 query rows at a time).
// Gradients of rotated q and k are rotated back (the transposed rotation) before they are written.
// Tasks: (batch, kv head), each owning its keys' dk and dv, so no two tasks write one value.
//
// Vectors are GCC/Clang vector extensions of 16 floats: one AVX-512 register, or pairs of AVX2
// registers (the library is built with -march=native; nemotron_jax/kernels/ffi_build.py).
// Threads: tasks go to XLA's intra-op thread pool (the FFI ThreadPool context); the calling
// thread takes tasks too, so the call finishes even if no pool thread is free.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kKeyBlock = 64;    // keys per score block: 4 vectors
constexpr int kRows = 4;         // query heads per block
constexpr int64_t kChunk = 16;   // query positions per forward task

inline vf Load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf Splat(float x) { return vf{} + x; }

// e^x within about 2 float32 ulp for -87 <= x <= 0: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split
// in two parts so that n ln2 is exact), e^r by its Taylor series to r^7 (truncation < 3e-9
// relative), 2^n assembled in the exponent bits. Arguments are clamped to [-87, 0]: below, the
// result is about 1e-38 instead of less; above, 1 (only masked keys go there, and the caller
// multiplies them by 0, which an overflowing 2^n would turn into NaN).
inline vf Exp(vf x) {
  x = x < -87.0f ? Splat(-87.0f) : x;
  x = x > 0.0f ? Splat(0.0f) : x;
  const vf magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * 1.44269504f + magic;
  const vf n = t - magic;
  const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vf p = Splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi two_n = ((vi)t - (vi)magic + 127) << 23;
  return p * (vf)two_n;
}

inline float MaxOf(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

inline float SumOf(vf v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// bfloat16 <-> float32: a bfloat16 is the top half of a float32; rounding to nearest even.
inline float FromBf16(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays a (quiet) NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

struct Problem {
  const void *q, *k, *v;   // float32, or bfloat16 when `bf16`
  const bool* mask;        // [B, T, S], or nullptr: every key may be attended
  const float *cos, *sin;  // [B, T, rope_dim] rotary tables; rope_dim 0: no rotation
  // Forward results: out (q's dtype) and lse [B, T, N].
  void* out;
  float* lse_out;
  // Backward inputs (the forward's out and lse, and dout, q's dtype) and results (q's dtype).
  const void *fwd_out, *dout;
  const float* lse;
  void *dq, *dk, *dv;
  bool bf16;
  int64_t batch, t, s, heads, kv_heads, h, group, s_pad, rope_dim;
  float scale;
  bool causal;
};

// Row `row` (h features) of x, as float32 in dst.
void ReadRow(const Problem& p, const void* x, int64_t row, float* dst) {
  if (p.bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(x) + row * p.h;
    for (int64_t f = 0; f < p.h; ++f) dst[f] = FromBf16(src[f]);
  } else {
    std::memcpy(dst, static_cast<const float*>(x) + row * p.h, p.h * sizeof(float));
  }
}

// dst (h float32 features) into row `row` of x, in the problem's dtype.
void WriteRow(const Problem& p, void* x, int64_t row, const float* src) {
  if (p.bf16) {
    uint16_t* dst = static_cast<uint16_t*>(x) + row * p.h;
    for (int64_t f = 0; f < p.h; ++f) dst[f] = ToBf16(src[f]);
  } else {
    std::memcpy(static_cast<float*>(x) + row * p.h, src, p.h * sizeof(float));
  }
}

// Rotates x (h features, in place) for position `pos` of batch row b; with `transposed`, by the
// transposed rotation, which takes the gradient of a rotated row to the gradient of the row.
void Rotate(const Problem& p, int64_t b, int64_t pos, bool transposed, float* x) {
  if (p.rope_dim == 0) return;
  const int64_t half = p.rope_dim / 2, at = (b * p.t + pos) * p.rope_dim;
  const float* c = p.cos + at;
  const float* sn = p.sin + at;
  for (int64_t f = 0; f < half; ++f) {  // features f and f + half rotate as a pair
    const float lo = x[f], hi = x[f + half];
    if (transposed) {
      x[f] = lo * c[f] + hi * sn[f + half];
      x[f + half] = hi * c[f + half] - lo * sn[f];
    } else {
      x[f] = lo * c[f] - hi * sn[f];
      x[f + half] = hi * c[f + half] + lo * sn[f + half];
    }
  }
}

// allowed[j] = 1.0 where query i of batch row b may attend key j (j < keys_pad), else 0.0;
// returns whether any key may be attended.
bool Allowed(const Problem& p, int64_t b, int64_t i, int64_t keys, int64_t keys_pad,
             float* allowed) {
  const bool* mask_row = p.mask ? p.mask + (b * p.t + i) * p.s : nullptr;
  bool any = false;
  for (int64_t j = 0; j < keys_pad; ++j) {
    const bool ok = j < keys && (mask_row == nullptr || mask_row[j]);
    allowed[j] = ok ? 1.0f : 0.0f;
    any |= ok;
  }
  return any;
}

// scores[r, 0:16V] = scale * q[r] . kt[:, 0:16V] for kRows query rows (kRows x V accumulators);
// kt is [H, s_pad] (keys transposed), scores [kRows, s_pad].
template <int V>
void Scores(const float* const* q, const float* kt, int64_t s_pad, int64_t h, float scale,
            float* scores) {
  vf acc[kRows][V] = {};
  for (int64_t f = 0; f < h; ++f) {
    vf kv[V];
    for (int c = 0; c < V; ++c) kv[c] = Load(kt + f * s_pad + c * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float qf = q[r][f];
      for (int c = 0; c < V; ++c) acc[r][c] += qf * kv[c];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < V; ++c) Store(scores + r * s_pad + c * kLanes, acc[r][c] * scale);
  }
}

// Scores<V> over the first keys_pad keys, kKeyBlock at a time (the last block only as many
// vectors as it needs).
void AllScores(const float* const* q, const float* kt, int64_t s_pad, int64_t h,
               int64_t keys_pad, float scale, float* scores) {
  for (int64_t j0 = 0; j0 < keys_pad; j0 += kKeyBlock) {
    switch (std::min<int64_t>(kKeyBlock, keys_pad - j0) / kLanes) {
      case 4: Scores<4>(q, kt + j0, s_pad, h, scale, scores + j0); break;
      case 3: Scores<3>(q, kt + j0, s_pad, h, scale, scores + j0); break;
      case 2: Scores<2>(q, kt + j0, s_pad, h, scale, scores + j0); break;
      default: Scores<1>(q, kt + j0, s_pad, h, scale, scores + j0);
    }
  }
}

// out[r, :] = row_scale[r] * sum_j probs[r, j] v[j, :] for the first `rows` of kRows rows and
// the first `keys` rows of v [*, H]; V vectors of features at a time (kRows x V accumulators).
template <int V>
void WeightedRows(const float* probs, int64_t s_pad, const float* v, int64_t h, int64_t keys,
                  int64_t rows, const float* row_scale, float* out) {
  for (int64_t f0 = 0; f0 < h; f0 += V * kLanes) {
    vf acc[kRows][V] = {};
    for (int64_t j = 0; j < keys; ++j) {
      vf vj[V];
      for (int c = 0; c < V; ++c) vj[c] = Load(v + j * h + f0 + c * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const float pj = probs[r * s_pad + j];
        for (int c = 0; c < V; ++c) acc[r][c] += pj * vj[c];
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < V; ++c) Store(out + r * h + f0 + c * kLanes, acc[r][c] * row_scale[r]);
    }
  }
}

// WeightedRows with 4, 2 or 1 vectors of features per pass, whichever divides H.
void AllWeightedRows(const float* probs, int64_t s_pad, const float* v, int64_t h, int64_t keys,
                     int64_t rows, const float* row_scale, float* out) {
  if (h % (4 * kLanes) == 0) {
    WeightedRows<4>(probs, s_pad, v, h, keys, rows, row_scale, out);
  } else if (h % (2 * kLanes) == 0) {
    WeightedRows<2>(probs, s_pad, v, h, keys, rows, row_scale, out);
  } else {
    WeightedRows<1>(probs, s_pad, v, h, keys, rows, row_scale, out);
  }
}

// --- forward -------------------------------------------------------------------------------

// Per-thread buffers; kt and vv hold one (batch, kv head)'s keys (rotated, transposed) and values.
struct ForwardScratch {
  // qs and outs: one block of query rows (float32, rotated) and their results in float32.
  std::vector<float> kt, vv, scores, allowed, qs, outs;
  int64_t loaded = -1;  // which (batch * K + kv head) kt and vv hold
  explicit ForwardScratch(const Problem& p)
      : kt(p.h * p.s_pad), vv(p.s_pad * p.h), scores(kRows * p.s_pad), allowed(p.s_pad),
        qs(kRows * p.h), outs(kRows * p.h) {}

  void Load(const Problem& p, int64_t bk) {
    if (bk == loaded) return;
    loaded = bk;
    const int64_t b = bk / p.kv_heads;
    std::fill(kt.begin(), kt.end(), 0.0f);  // padding keys score 0 and are masked out
    float* key = outs.data();  // a free row of h floats while no query block is in flight
    for (int64_t j = 0; j < p.s; ++j) {
      const int64_t row = (b * p.s + j) * p.kv_heads + bk % p.kv_heads;
      ReadRow(p, p.k, row, key);
      Rotate(p, b, j, false, key);
      for (int64_t f = 0; f < p.h; ++f) kt[f * p.s_pad + j] = key[f];
      ReadRow(p, p.v, row, &vv[j * p.h]);
    }
  }
};

// Steps 1-3 for one block of up to kRows query heads at one position: out [rows, H] float32 and
// each row's log-sum-exp of the allowed scaled scores.
void RowBlock(const float* const* q, ForwardScratch& w, int64_t h, int64_t s_pad, int64_t keys,
              int64_t keys_pad, int64_t rows, float scale, float* out, float* lse) {
  const float* allowed = w.allowed.data();
  AllScores(q, w.kt.data(), s_pad, h, keys_pad, scale, w.scores.data());
  // Unnormalised probabilities exp(x - max) over the allowed keys, and 1 / their sum.
  float inv_sum[kRows];
  for (int r = 0; r < kRows; ++r) {
    float* row = w.scores.data() + r * s_pad;
    vf m = Splat(-INFINITY);
    for (int64_t j = 0; j < keys_pad; j += kLanes) {
      const vf x = Load(allowed + j) != 0.0f ? Load(row + j) : Splat(-INFINITY);
      m = m > x ? m : x;
    }
    const float row_max = MaxOf(m);
    vf sum = {};
    for (int64_t j = 0; j < keys_pad; j += kLanes) {
      const vf e = Exp(Load(row + j) - row_max) * Load(allowed + j);
      Store(row + j, e);
      sum += e;
    }
    const float total = SumOf(sum);  // >= 1: the maximum's own term is exp(0)
    inv_sum[r] = 1.0f / total;
    lse[r] = row_max + std::log(total);
  }
  AllWeightedRows(w.scores.data(), s_pad, w.vv.data(), h, keys, rows, inv_sum, out);
}

// The G query heads of kv head `kh` at query position i of batch row b.
void ForwardPosition(const Problem& p, ForwardScratch& w, int64_t b, int64_t kh, int64_t i) {
  const int64_t h = p.h;
  const int64_t keys = p.causal ? std::min(i + 1, p.s) : p.s;  // keys past these are never read
  const int64_t keys_pad = (keys + kLanes - 1) / kLanes * kLanes;
  const bool any = Allowed(p, b, i, keys, keys_pad, w.allowed.data());
  for (int64_t r0 = 0; r0 < p.group; r0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, p.group - r0);
    const int64_t first = (b * p.t + i) * p.heads + kh * p.group + r0;  // row of q and out
    float lse[kRows];
    if (!any) {
      std::fill(w.outs.begin(), w.outs.end(), 0.0f);
      std::fill(lse, lse + kRows, INFINITY);  // exp(x - lse) = 0: no probability anywhere
    } else {
      const float* q[kRows];  // rows past `rows` repeat the last one; their results are dropped
      for (int64_t r = 0; r < rows; ++r) {
        ReadRow(p, p.q, first + r, &w.qs[r * h]);
        Rotate(p, b, i, false, &w.qs[r * h]);
      }
      for (int r = 0; r < kRows; ++r) q[r] = &w.qs[std::min<int64_t>(r, rows - 1) * h];
      RowBlock(q, w, h, p.s_pad, keys, keys_pad, rows, p.scale, w.outs.data(), lse);
    }
    for (int64_t r = 0; r < rows; ++r) {
      WriteRow(p, p.out, first + r, &w.outs[r * h]);
      p.lse_out[first + r] = lse[r];
    }
  }
}

// Task: (batch, kv head, chunk of kChunk query positions); the causal chunks with the most keys
// go first so that the last tasks are short.
void ForwardTask(const Problem& p, ForwardScratch& w, int64_t task) {
  const int64_t chunks = (p.t + kChunk - 1) / kChunk;
  const int64_t bk = task / chunks, chunk = chunks - 1 - task % chunks;
  w.Load(p, bk);
  const int64_t end = std::min(p.t, (chunk + 1) * kChunk);
  for (int64_t i = chunk * kChunk; i < end; ++i) {
    ForwardPosition(p, w, bk / p.kv_heads, bk % p.kv_heads, i);
  }
}

// --- backward ------------------------------------------------------------------------------

// Per-thread buffers for one (batch, kv head): its keys (rotated) transposed and as rows, its
// values transposed, float32 accumulators of dk and dv, and one block of query rows.
struct BackwardScratch {
  std::vector<float> kt, vt, kr, dk, dv, probs, dscores, allowed, qs, dos, rows;
  explicit BackwardScratch(const Problem& p)
      : kt(p.h * p.s_pad), vt(p.h * p.s_pad), kr(p.s_pad * p.h), dk(p.s_pad * p.h),
        dv(p.s_pad * p.h), probs(kRows * p.s_pad), dscores(kRows * p.s_pad), allowed(p.s_pad),
        qs(kRows * p.h), dos(kRows * p.h), rows(kRows * p.h) {}
};

// acc[j, f0:f0 + 16V] += sum_r coef[r, j] x[r, f0:f0 + 16V] for j < keys, with that block of
// the kRows rows of x held in registers (kRows x V vectors) while the keys stream past.
template <int V>
void AddOuterBlock(const float* coef, int64_t s_pad, const float* x, int64_t h, int64_t keys,
                   int64_t f0, float* acc) {
  vf xr[kRows][V];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < V; ++c) xr[r][c] = Load(x + r * h + f0 + c * kLanes);
  }
  for (int64_t j = 0; j < keys; ++j) {
    const float c0 = coef[j], c1 = coef[s_pad + j], c2 = coef[2 * s_pad + j],
                c3 = coef[3 * s_pad + j];
    if (c0 == 0.0f && c1 == 0.0f && c2 == 0.0f && c3 == 0.0f) continue;  // masked key
    float* a = acc + j * h + f0;
    for (int c = 0; c < V; ++c) {
      Store(a + c * kLanes, Load(a + c * kLanes) + c0 * xr[0][c] + c1 * xr[1][c] +
                                c2 * xr[2][c] + c3 * xr[3][c]);
    }
  }
}

// acc[j, :] += sum_r coef[r, j] x[r, :] for j < keys (coef [kRows, s_pad], x [kRows, H],
// acc [*, H]): dk and dv, updated by kRows query rows at a time.
void AddOuter(const float* coef, int64_t s_pad, const float* x, int64_t h, int64_t keys,
              float* acc) {
  const int v = h % (4 * kLanes) == 0 ? 4 : h % (2 * kLanes) == 0 ? 2 : 1;
  for (int64_t f0 = 0; f0 < h; f0 += v * kLanes) {
    switch (v) {
      case 4: AddOuterBlock<4>(coef, s_pad, x, h, keys, f0, acc); break;
      case 2: AddOuterBlock<2>(coef, s_pad, x, h, keys, f0, acc); break;
      default: AddOuterBlock<1>(coef, s_pad, x, h, keys, f0, acc);
    }
  }
}

void BackwardTask(const Problem& p, BackwardScratch& w, int64_t bk) {
  const int64_t h = p.h, s_pad = p.s_pad, b = bk / p.kv_heads, kh = bk % p.kv_heads;
  std::fill(w.kt.begin(), w.kt.end(), 0.0f);  // padding keys and values contribute 0
  std::fill(w.vt.begin(), w.vt.end(), 0.0f);
  std::fill(w.dk.begin(), w.dk.end(), 0.0f);
  std::fill(w.dv.begin(), w.dv.end(), 0.0f);
  float* row = w.rows.data();
  for (int64_t j = 0; j < p.s; ++j) {
    const int64_t at = (b * p.s + j) * p.kv_heads + kh;
    ReadRow(p, p.k, at, &w.kr[j * h]);
    Rotate(p, b, j, false, &w.kr[j * h]);
    ReadRow(p, p.v, at, row);
    for (int64_t f = 0; f < h; ++f) {
      w.kt[f * s_pad + j] = w.kr[j * h + f];
      w.vt[f * s_pad + j] = row[f];
    }
  }
  for (int64_t i = 0; i < p.t; ++i) {
    const int64_t keys = p.causal ? std::min(i + 1, p.s) : p.s;
    const int64_t keys_pad = (keys + kLanes - 1) / kLanes * kLanes;
    const bool any = Allowed(p, b, i, keys, keys_pad, w.allowed.data());
    for (int64_t r0 = 0; r0 < p.group; r0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, p.group - r0);
      const int64_t first = (b * p.t + i) * p.heads + kh * p.group + r0;
      if (!any) {  // no key: the output was 0 whatever q, k and v, so dq is 0
        std::fill(row, row + h, 0.0f);
        for (int64_t r = 0; r < rows; ++r) WriteRow(p, p.dq, first + r, row);
        continue;
      }
      float lse[kRows], delta[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        float* qr = &w.qs[r * h];
        float* dor = &w.dos[r * h];
        if (r >= rows) {  // unused rows: zero, so they add nothing to dk and dv
          std::fill(qr, qr + h, 0.0f);
          std::fill(dor, dor + h, 0.0f);
          lse[r] = INFINITY;
          delta[r] = 0.0f;
          continue;
        }
        ReadRow(p, p.q, first + r, qr);
        Rotate(p, b, i, false, qr);
        ReadRow(p, p.dout, first + r, dor);
        ReadRow(p, p.fwd_out, first + r, row);
        float d = 0.0f;
        for (int64_t f = 0; f < h; ++f) d += dor[f] * row[f];
        delta[r] = d;
        lse[r] = p.lse[first + r];
      }
      const float* q[kRows];
      const float* dout[kRows];
      for (int r = 0; r < kRows; ++r) q[r] = &w.qs[r * h], dout[r] = &w.dos[r * h];
      AllScores(q, w.kt.data(), s_pad, h, keys_pad, p.scale, w.probs.data());
      AllScores(dout, w.vt.data(), s_pad, h, keys_pad, 1.0f, w.dscores.data());
      for (int r = 0; r < kRows; ++r) {
        float* pr = &w.probs[r * s_pad];
        float* dsr = &w.dscores[r * s_pad];
        const vf row_lse = Splat(std::isinf(lse[r]) ? 0.0f : lse[r]);
        const vf live = Splat(std::isinf(lse[r]) ? 0.0f : 1.0f);
        for (int64_t j = 0; j < keys_pad; j += kLanes) {
          const vf pj = Exp(Load(pr + j) - row_lse) * Load(&w.allowed[j]) * live;
          Store(pr + j, pj);
          Store(dsr + j, pj * (Load(dsr + j) - delta[r]));
        }
      }
      // dq = scale dS K, rotated back, for the used rows.
      const float row_scale[kRows] = {p.scale, p.scale, p.scale, p.scale};
      AllWeightedRows(w.dscores.data(), s_pad, w.kr.data(), h, keys, rows, row_scale, row);
      for (int64_t r = 0; r < rows; ++r) {
        Rotate(p, b, i, true, row + r * h);
        WriteRow(p, p.dq, first + r, row + r * h);
      }
      AddOuter(w.probs.data(), s_pad, w.dos.data(), h, keys, w.dv.data());
      AddOuter(w.dscores.data(), s_pad, w.qs.data(), h, keys, w.dk.data());
    }
  }
  for (int64_t j = 0; j < p.s; ++j) {
    const int64_t at = (b * p.s + j) * p.kv_heads + kh;
    float* dkj = &w.dk[j * h];
    for (int64_t f = 0; f < h; ++f) dkj[f] *= p.scale;
    Rotate(p, b, j, true, dkj);
    WriteRow(p, p.dk, at, dkj);
    WriteRow(p, p.dv, at, &w.dv[j * h]);
  }
}

// --- threads -------------------------------------------------------------------------------

// Tasks are handed out by an atomic counter to the calling thread and the pool's threads.
struct Queue {
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::condition_variable all_done;
};

template <typename Scratch>
void Work(const Problem& p, Queue& queue, int64_t tasks,
          void (*task_fn)(const Problem&, Scratch&, int64_t)) {
  std::unique_ptr<Scratch> w;
  try {
    w = std::make_unique<Scratch>(p);
  } catch (const std::exception&) {
    queue.failed = true;
  }
  for (;;) {
    const int64_t task = queue.next.fetch_add(1);
    if (task >= tasks) break;
    if (w) task_fn(p, *w, task);
    if (queue.done.fetch_add(1) + 1 == tasks) {
      std::lock_guard<std::mutex> lock(queue.mu);
      queue.all_done.notify_all();
    }
  }
}

template <typename Scratch>
ffi::Error RunTasks(ffi::ThreadPool& pool, const Problem& p, int64_t tasks,
                    void (*task_fn)(const Problem&, Scratch&, int64_t)) {
  auto queue = std::make_shared<Queue>();  // pool tasks may start after this call returns
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([queue, p, tasks, task_fn] { Work<Scratch>(p, *queue, tasks, task_fn); });
  }
  Work<Scratch>(p, *queue, tasks, task_fn);
  {
    std::unique_lock<std::mutex> lock(queue->mu);
    queue->all_done.wait(lock, [&] { return queue->done.load() == tasks; });
  }
  if (queue->failed) return ffi::Error::Internal("cpu attention: out of memory for scratch buffers");
  return ffi::Error::Success();
}

// --- handlers ------------------------------------------------------------------------------

// Checks the operands shared by both handlers and fills the shape fields of `p`.
ffi::Error Describe(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> cos,
                    ffi::Buffer<ffi::F32> sin, bool causal, bool has_mask, bool has_rope,
                    float scale, Problem* p) {
  const ffi::DataType dtype = q.element_type();
  if ((dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16) ||
      k.element_type() != dtype || v.element_type() != dtype) {
    return ffi::Error::InvalidArgument(
        "cpu attention: q, k, v and the results must all be float32 or all bfloat16");
  }
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument("cpu attention: q, k and v must be rank 4");
  }
  const int64_t b = qd[0], t = qd[1], n = qd[2], h = qd[3], s = kd[1], kv = kd[2];
  if (kd[0] != b || kd[3] != h || vd[0] != b || vd[1] != s || vd[2] != kv || vd[3] != h ||
      kv == 0 || n % kv != 0 || h % kLanes != 0) {
    return ffi::Error::InvalidArgument("cpu attention: shapes do not agree");
  }
  if (has_mask) {
    auto md = mask.dimensions();
    if (md.size() != 3 || md[0] != b || md[1] != t || md[2] != s) {
      return ffi::Error::InvalidArgument("cpu attention: mask must be [B, T, S]");
    }
  }
  int64_t rope_dim = 0;
  if (has_rope) {
    auto cd = cos.dimensions(), sd = sin.dimensions();
    if (cd.size() != 3 || cd[0] != b || cd[1] != t || cd[2] % 2 != 0 || cd[2] > h || s != t ||
        sd.size() != 3 || sd[0] != b || sd[1] != t || sd[2] != cd[2]) {
      return ffi::Error::InvalidArgument(
          "cpu attention: cos and sin must be [B, T, R] with R even, R <= H and S = T");
    }
    rope_dim = cd[2];
  }
  *p = Problem{};
  p->q = q.untyped_data();
  p->k = k.untyped_data();
  p->v = v.untyped_data();
  p->mask = has_mask ? mask.typed_data() : nullptr;
  p->cos = has_rope ? cos.typed_data() : nullptr;
  p->sin = has_rope ? sin.typed_data() : nullptr;
  p->bf16 = dtype == ffi::DataType::BF16;
  p->batch = b, p->t = t, p->s = s, p->heads = n, p->kv_heads = kv, p->h = h;
  p->group = n / kv;
  p->s_pad = (s + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  p->rope_dim = rope_dim;
  p->scale = scale;
  p->causal = causal;
  return ffi::Error::Success();
}

bool SameAs(ffi::AnyBuffer x, ffi::AnyBuffer like) {
  auto a = x.dimensions(), b = like.dimensions();
  return x.element_type() == like.element_type() && a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin());
}

bool IsLse(ffi::Buffer<ffi::F32> lse, const Problem& p) {
  auto d = lse.dimensions();
  return d.size() == 3 && d[0] == p.batch && d[1] == p.t && d[2] == p.heads;
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> cos,
                     ffi::Buffer<ffi::F32> sin, ffi::Result<ffi::AnyBuffer> out,
                     ffi::Result<ffi::Buffer<ffi::F32>> lse, bool causal, bool has_mask,
                     bool has_rope, float scale) {
  Problem p;
  if (auto e = Describe(q, k, v, mask, cos, sin, causal, has_mask, has_rope, scale, &p);
      e.failure()) {
    return e;
  }
  if (!SameAs(*out, q) || !IsLse(*lse, p)) {
    return ffi::Error::InvalidArgument("cpu attention: results must be q's shape and [B, T, N]");
  }
  if (p.batch == 0 || p.t == 0 || p.heads == 0 || p.h == 0) return ffi::Error::Success();
  p.out = out->untyped_data();
  p.lse_out = lse->typed_data();
  const int64_t tasks = p.batch * p.kv_heads * ((p.t + kChunk - 1) / kChunk);
  return RunTasks<ForwardScratch>(pool, p, tasks, ForwardTask);
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer dout,
                             ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::PRED> mask,
                             ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                             ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                             ffi::Result<ffi::AnyBuffer> dv, bool causal, bool has_mask,
                             bool has_rope, float scale) {
  Problem p;
  if (auto e = Describe(q, k, v, mask, cos, sin, causal, has_mask, has_rope, scale, &p);
      e.failure()) {
    return e;
  }
  if (!SameAs(out, q) || !SameAs(dout, q) || !IsLse(lse, p) || !SameAs(*dq, q) ||
      !SameAs(*dk, k) || !SameAs(*dv, v)) {
    return ffi::Error::InvalidArgument(
        "cpu attention backward: out, dout and dq must be q's shape and dtype, dk and dv k's, "
        "lse [B, T, N]");
  }
  if (p.batch == 0 || p.kv_heads == 0 || p.h == 0) return ffi::Error::Success();
  p.fwd_out = out.untyped_data();
  p.dout = dout.untyped_data();
  p.lse = lse.typed_data();
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  return RunTasks<BackwardScratch>(pool, p, p.batch * p.kv_heads, BackwardTask);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NemotronCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k
                                  .Arg<ffi::AnyBuffer>()          // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask (empty if none)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos (empty if no rope)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin (empty if no rope)
                                  .Ret<ffi::AnyBuffer>()          // out, q's dtype
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse [B, T, N]
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Attr<bool>("has_rope")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NemotronCpuAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k
                                  .Arg<ffi::AnyBuffer>()          // v
                                  .Arg<ffi::AnyBuffer>()          // out (the forward's)
                                  .Arg<ffi::AnyBuffer>()          // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse (the forward's)
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask (empty if none)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos (empty if no rope)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin (empty if no rope)
                                  .Ret<ffi::AnyBuffer>()          // dq
                                  .Ret<ffi::AnyBuffer>()          // dk
                                  .Ret<ffi::AnyBuffer>()          // dv
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Attr<bool>("has_rope")
                                  .Attr<float>("scale"));
