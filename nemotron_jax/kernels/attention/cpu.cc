// XLA FFI handler: fused softmax attention on the CPU (attention implementation "cpu"), float32
// or bfloat16 inputs and result, float32 arithmetic throughout.
//
//   out[b, i, n, :] = sum_j p[j] v[b, j, n / G, :],   p = softmax_j(scale * q[b, i, n] . k[b, j, n / G])
//
// over the keys j that may be attended: mask[b, i, j] (when a mask is given) and, with `causal`,
// j <= i. A row with no such key is 0. With rotary tables cos, sin [B, T, R] (self-attention,
// S = T), q and k are first rotated by position in the rotate-half layout of Llama / HF, on their
// first R features: x'[f] = x[f] cos[f] + (f < R/2 ? -x[f + R/2] : x[f - R/2]) sin[f]
// (nemotron_jax/kernels/attention/reference.py, apply_rope), in float32 and not rounded. q [B, T, N, H], k and v [B, S, K, H] with N = K * G; the
// head dim H is a multiple of 16 (the Python wrapper pads it). Semantics and masking rules are
// those of nemotron_jax/kernels/attention/reference.py, the oracle this is tested against.
//
// Why it exists: XLA:CPU runs the reference as some 40 small thunks per layer (two batched
// products, masking, the softmax's reductions, transposes). Here each (batch, kv head, block of
// query positions) is one task that keeps its keys and values in cache and never writes the
// [T, S] scores to memory. With `causal` the keys after the query are never touched.
//
// Layout of the work, per query position i and the G query heads of one kv head:
//   1. scores for up to 4 heads x 64 keys at a time: up to 16 vector accumulators, the keys
//      stored transposed ([H, S]) so every load is contiguous;
//   2. max, exp and sum over the row (unnormalised probabilities stay in the score buffer);
//   3. out = P V, 4 heads x up to 64 features of accumulators, scaled by 1 / sum at the end.
// Vectors are GCC/Clang vector extensions of 16 floats: one AVX-512 register, or pairs of AVX2
// registers (the library is built with -march=native; nemotron_jax/kernels/ffi_build.py).
//
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
constexpr int64_t kChunk = 16;   // query positions per task

inline vf Load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf Splat(float x) { return vf{} + x; }

// e^x for x <= 0, within about 2 float32 ulp: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two
// parts so that n ln2 is exact), e^r by its Taylor series to r^7 (truncation < 3e-9 relative),
// 2^n assembled in the exponent bits. Arguments below -87 give about 1e-38 instead of less;
// masked keys are zeroed by the caller, never by this.
inline vf Exp(vf x) {
  x = x < -87.0f ? Splat(-87.0f) : x;
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
  const void *q, *k, *v;  // float32, or bfloat16 when `bf16`
  const bool* mask;       // [B, T, S], or nullptr: every key may be attended
  const float *cos, *sin; // [B, T, rope_dim] rotary tables; rope_dim 0: no rotation
  void* out;              // q's dtype
  bool bf16;
  int64_t batch, t, s, heads, kv_heads, h, group, s_pad, rope_dim;
  float scale;
  bool causal;
};

// One row of h features of x (q or k) at element `offset`, as float32 in dst, rotated for
// position `pos` of batch row b when the problem has rotary tables.
void RowToFloat(const Problem& p, const void* x, int64_t offset, int64_t b, int64_t pos,
                float* dst) {
  if (p.bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(x) + offset;
    for (int64_t f = 0; f < p.h; ++f) dst[f] = FromBf16(src[f]);
  } else {
    std::memcpy(dst, static_cast<const float*>(x) + offset, p.h * sizeof(float));
  }
  if (p.rope_dim == 0) return;
  const int64_t r = p.rope_dim, half = r / 2, at = (b * p.t + pos) * r;
  const float* c = p.cos + at;
  const float* sn = p.sin + at;
  for (int64_t f = 0; f < half; ++f) {  // features f and f + half rotate as a pair
    const float lo = dst[f], hi = dst[f + half];
    dst[f] = lo * c[f] - hi * sn[f];
    dst[f + half] = hi * c[f + half] + lo * sn[f + half];
  }
}

// Per-thread buffers; kt and vv hold one (batch, kv head)'s keys (transposed) and values.
struct Scratch {
  // qs and outs: one block of query rows (float32, rotated) and their results in float32.
  std::vector<float> kt, vv, scores, allowed, qs, outs;
  int64_t loaded = -1;  // which (batch * K + kv head) kt and vv hold
  explicit Scratch(const Problem& p)
      : kt(p.h * p.s_pad), vv(p.s_pad * p.h), scores(kRows * p.s_pad), allowed(p.s_pad),
        qs(kRows * p.h), outs(kRows * p.h) {}

  static float At(const Problem& p, const void* x, int64_t i) {
    return p.bf16 ? FromBf16(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
  }

  void Load(const Problem& p, int64_t bk) {
    if (bk == loaded) return;
    loaded = bk;
    const int64_t b = bk / p.kv_heads, kh = bk % p.kv_heads;
    std::fill(kt.begin(), kt.end(), 0.0f);  // padding keys score 0 and are masked out
    float* key = outs.data();  // a free row of h floats while no query block is in flight
    for (int64_t j = 0; j < p.s; ++j) {
      const int64_t src = ((b * p.s + j) * p.kv_heads + kh) * p.h;
      RowToFloat(p, p.k, src, b, j, key);
      for (int64_t f = 0; f < p.h; ++f) {
        kt[f * p.s_pad + j] = key[f];
        vv[j * p.h + f] = At(p, p.v, src + f);
      }
    }
  }
};

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

// out[r, :] = inv_sum[r] * sum_j probs[r, j] v[j, :] for the first `rows` of kRows rows, V
// vectors of features at a time (kRows x V accumulators).
template <int V>
void WeightedValues(const float* probs, int64_t s_pad, const float* v, int64_t h, int64_t keys,
                    int64_t rows, const float* inv_sum, float* out) {
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
      for (int c = 0; c < V; ++c) Store(out + r * h + f0 + c * kLanes, acc[r][c] * inv_sum[r]);
    }
  }
}

// Steps 1-3 for one block of up to kRows query heads at one position; out is [rows, H] float32.
void RowBlock(const float* const* q, Scratch& w, int64_t h, int64_t s_pad, int64_t keys,
              int64_t keys_pad, int64_t rows, float scale, float* out) {
  const float* allowed = w.allowed.data();
  // 1. scale * q . k for kRows heads x kKeyBlock keys at a time; the last block only as many
  //    vectors as the keys need.
  for (int64_t j0 = 0; j0 < keys_pad; j0 += kKeyBlock) {
    switch (std::min<int64_t>(kKeyBlock, keys_pad - j0) / kLanes) {
      case 4: Scores<4>(q, w.kt.data() + j0, s_pad, h, scale, w.scores.data() + j0); break;
      case 3: Scores<3>(q, w.kt.data() + j0, s_pad, h, scale, w.scores.data() + j0); break;
      case 2: Scores<2>(q, w.kt.data() + j0, s_pad, h, scale, w.scores.data() + j0); break;
      default: Scores<1>(q, w.kt.data() + j0, s_pad, h, scale, w.scores.data() + j0);
    }
  }
  // 2. Unnormalised probabilities exp(x - max) over the allowed keys, and 1 / their sum.
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
    inv_sum[r] = 1.0f / SumOf(sum);  // >= 1: the maximum's own term is exp(0)
  }
  // 3. out = P V / sum, in blocks of 4, 2 or 1 vectors of features (whichever divides H).
  const float* probs = w.scores.data();
  if (h % (4 * kLanes) == 0) {
    WeightedValues<4>(probs, s_pad, w.vv.data(), h, keys, rows, inv_sum, out);
  } else if (h % (2 * kLanes) == 0) {
    WeightedValues<2>(probs, s_pad, w.vv.data(), h, keys, rows, inv_sum, out);
  } else {
    WeightedValues<1>(probs, s_pad, w.vv.data(), h, keys, rows, inv_sum, out);
  }
}

// The G query heads of kv head `kh` at query position i of batch row b.
void Position(const Problem& p, Scratch& w, int64_t b, int64_t kh, int64_t i) {
  const int64_t h = p.h, s_pad = p.s_pad;
  const int64_t keys = p.causal ? std::min(i + 1, p.s) : p.s;  // keys past these are never read
  const int64_t keys_pad = (keys + kLanes - 1) / kLanes * kLanes;
  const bool* mask_row = p.mask ? p.mask + (b * p.t + i) * p.s : nullptr;
  float* allowed = w.allowed.data();  // 1.0 where the key may be attended, else 0.0
  bool any = false;
  for (int64_t j = 0; j < keys_pad; ++j) {
    const bool ok = j < keys && (mask_row == nullptr || mask_row[j]);
    allowed[j] = ok ? 1.0f : 0.0f;
    any |= ok;
  }
  for (int64_t r0 = 0; r0 < p.group; r0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, p.group - r0);
    const int64_t first = ((b * p.t + i) * p.heads + kh * p.group + r0) * h;  // element offset
    float* out = p.bf16 ? w.outs.data() : static_cast<float*>(p.out) + first;
    if (!any) {
      std::fill(out, out + rows * h, 0.0f);
    } else {
      const float* q[kRows];  // rows past `rows` repeat the last one; their results are dropped
      const bool copy = p.bf16 || p.rope_dim > 0;  // else the float32 rows are read in place
      if (copy) {
        for (int64_t r = 0; r < rows; ++r) RowToFloat(p, p.q, first + r * h, b, i, &w.qs[r * h]);
      }
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = std::min<int64_t>(r, rows - 1) * h;
        q[r] = copy ? w.qs.data() + row : static_cast<const float*>(p.q) + first + row;
      }
      RowBlock(q, w, h, s_pad, keys, keys_pad, rows, p.scale, out);
    }
    if (p.bf16) {
      uint16_t* dst = static_cast<uint16_t*>(p.out) + first;
      for (int64_t e = 0; e < rows * h; ++e) dst[e] = ToBf16(out[e]);
    }
  }
}

// Tasks are (batch, kv head, chunk of kChunk query positions), handed out by an atomic counter;
// the causal chunks with the most keys go first so that the last tasks are short.
struct Queue {
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::condition_variable all_done;
};

void Work(const Problem& p, Queue& queue, int64_t chunks, int64_t tasks) {
  std::unique_ptr<Scratch> w;
  try {
    w = std::make_unique<Scratch>(p);
  } catch (const std::exception&) {
    queue.failed = true;
  }
  for (;;) {
    const int64_t task = queue.next.fetch_add(1);
    if (task >= tasks) break;
    if (w) {
      const int64_t bk = task / chunks, chunk = chunks - 1 - task % chunks;
      w->Load(p, bk);
      const int64_t end = std::min(p.t, (chunk + 1) * kChunk);
      for (int64_t i = chunk * kChunk; i < end; ++i) Position(p, *w, bk / p.kv_heads, bk % p.kv_heads, i);
    }
    if (queue.done.fetch_add(1) + 1 == tasks) {
      std::lock_guard<std::mutex> lock(queue.mu);
      queue.all_done.notify_all();
    }
  }
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> cos,
                     ffi::Buffer<ffi::F32> sin, ffi::Result<ffi::AnyBuffer> out, bool causal,
                     bool has_mask, bool has_rope, float scale) {
  const ffi::DataType dtype = q.element_type();
  if ((dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16) ||
      k.element_type() != dtype || v.element_type() != dtype || out->element_type() != dtype) {
    return ffi::Error::InvalidArgument(
        "cpu attention: q, k, v and the result must all be float32 or all bfloat16");
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
  if (b == 0 || t == 0 || n == 0 || h == 0) return ffi::Error::Success();
  const Problem p{q.untyped_data(), k.untyped_data(), v.untyped_data(),
                  has_mask ? mask.typed_data() : nullptr,
                  has_rope ? cos.typed_data() : nullptr, has_rope ? sin.typed_data() : nullptr,
                  out->untyped_data(), dtype == ffi::DataType::BF16, b, t, s, n, kv, h, n / kv,
                  (s + kKeyBlock - 1) / kKeyBlock * kKeyBlock, rope_dim, scale, causal};
  const int64_t chunks = (t + kChunk - 1) / kChunk, tasks = b * kv * chunks;
  auto queue = std::make_shared<Queue>();  // pool tasks may start after this call returns
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([queue, p, chunks, tasks] { Work(p, *queue, chunks, tasks); });
  }
  Work(p, *queue, chunks, tasks);
  {
    std::unique_lock<std::mutex> lock(queue->mu);
    queue->all_done.wait(lock, [&] { return queue->done.load() == tasks; });
  }
  if (queue->failed) return ffi::Error::Internal("cpu attention: out of memory for scratch buffers");
  return ffi::Error::Success();
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
                                  .Ret<ffi::AnyBuffer>()          // q's dtype
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Attr<bool>("has_rope")
                                  .Attr<float>("scale"));
