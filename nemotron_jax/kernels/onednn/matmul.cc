// XLA FFI handler: one 2-D matrix product on the CPU through oneDNN's matmul primitive.
//
//   c[M, N] = op(a) @ op(b),  op(a) [M, K], op(b) [K, N],  op = identity or transpose
//
// or the same for each index of a shared leading batch axis (a, b, c all rank 3).
//
// The second handler, NemotronOnednnMatmulSiluMul, computes SwiGLU's hidden activation in one
// pass: c = silu(op(a) @ op(b)) * m, with m shaped like c. silu and the product are oneDNN
// post-ops, applied to the float32 accumulators before the one rounding to c's dtype, so the
// [M, N] pre-activation is never written to memory.
//
// a and b share one dtype (f32 or bf16); c is f32 or bf16; accumulation is always f32.
// Transposed operands are described to oneDNN by their strides, so nothing is copied. oneDNN
// picks the kernel for the machine (AMX or AVX-512 bf16 on recent Xeons).
//
// Threads: oneDNN runs each product on its own OpenMP team of all cores. Products run one at a
// time (a mutex): XLA executes independent thunks concurrently, and two teams on the same cores
// stall in their barriers.
//
// Built on first use by nemotron_jax/kernels/onednn/__init__.py; see that file.

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dt = dnnl::memory::data_type;
// batch, M, K, N, transpose_a, transpose_b, dtype in, dtype out, dtype of m (-1: no silu * m)
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, int, int, int>;

struct State {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::mutex mu;
  std::map<Key, dnnl::matmul> primitives;
  std::mutex run_mu;  // one product at a time (see the top of this file)
};

State& state() {
  static State* s = new State();  // never destroyed: XLA may run handlers during exit
  return *s;
}

bool ToDnnl(ffi::DataType t, dt* out) {
  switch (t) {
    case ffi::DataType::F32: *out = dt::f32; return true;
    case ffi::DataType::BF16: *out = dt::bf16; return true;
    default: return false;
  }
}

struct Problem {
  const char* a;  // bytes
  const char* b;
  char* c;
  const char* mul;  // silu(a @ b) * mul when not null ([M, N], dtype mul_dt)
  int64_t batch, m, k, n;
  bool ta, tb;
  dt in, out, mul_dt;
};

void Run(const Problem& p) {
  using dims = dnnl::memory::dims;
  // op(a)[z, r, j] is a[z, r, j] (strides MK, K, 1), or a[z, j, r] (strides MK, 1, M) when
  // transposed; the same for op(b) with N in place of M.
  const int64_t mk = p.m * p.k, kn = p.k * p.n, mn = p.m * p.n;
  dnnl::memory::desc a_md(dims{p.batch, p.m, p.k}, p.in,
                          p.ta ? dims{mk, 1, p.m} : dims{mk, p.k, 1});
  dnnl::memory::desc b_md(dims{p.batch, p.k, p.n}, p.in,
                          p.tb ? dims{kn, 1, p.k} : dims{kn, p.n, 1});
  dnnl::memory::desc c_md(dims{p.batch, p.m, p.n}, p.out, dims{mn, p.n, 1});
  dnnl::memory::desc mul_md(dims{p.batch, p.m, p.n}, p.mul_dt, dims{mn, p.n, 1});
  State& s = state();
  dnnl::matmul primitive;
  {
    const Key key{p.batch, p.m, p.k, p.n, p.ta, p.tb, static_cast<int>(p.in),
                  static_cast<int>(p.out), p.mul ? static_cast<int>(p.mul_dt) : -1};
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.primitives.find(key);
    if (it == s.primitives.end()) {
      dnnl::primitive_attr attr;
      if (p.mul) {
        dnnl::post_ops ops;
        ops.append_eltwise(dnnl::algorithm::eltwise_swish, 1.0f, 0.0f);  // x * sigmoid(1 * x)
        ops.append_binary(dnnl::algorithm::binary_mul, mul_md);
        attr.set_post_ops(ops);
      }
      dnnl::matmul::primitive_desc pd(s.engine, a_md, b_md, c_md, attr);
      it = s.primitives.emplace(key, dnnl::matmul(pd)).first;
    }
    primitive = it->second;
  }
  std::lock_guard<std::mutex> run_lock(s.run_mu);
  dnnl::stream stream(s.engine);
  dnnl::memory am(a_md, s.engine, const_cast<char*>(p.a));
  dnnl::memory bm(b_md, s.engine, const_cast<char*>(p.b));
  dnnl::memory cm(c_md, s.engine, p.c);
  std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
  if (p.mul) {  // the binary post-op is the second (index 1)
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1,
                 dnnl::memory(mul_md, s.engine, const_cast<char*>(p.mul)));
  }
  primitive.execute(stream, args);
  stream.wait();
}

// c = op(a) @ op(b), or silu(op(a) @ op(b)) * mul when `mul` is given.
ffi::Error Product(ffi::AnyBuffer a, ffi::AnyBuffer b, const ffi::AnyBuffer* mul,
                   ffi::Result<ffi::AnyBuffer> c, bool transpose_a, bool transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const size_t rank = ad.size();
  if ((rank != 2 && rank != 3) || bd.size() != rank || cd.size() != rank) {
    return ffi::Error::InvalidArgument("onednn matmul: operands must all be 2-D or all 3-D");
  }
  const size_t r = rank - 2;  // the matrix axes are r, r + 1
  const int64_t batch = rank == 3 ? ad[0] : 1;
  if (rank == 3 && (bd[0] != batch || cd[0] != batch)) {
    return ffi::Error::InvalidArgument("onednn matmul: batch sizes differ");
  }
  const int64_t m = transpose_a ? ad[r + 1] : ad[r], k = transpose_a ? ad[r] : ad[r + 1];
  const int64_t kb = transpose_b ? bd[r + 1] : bd[r], n = transpose_b ? bd[r] : bd[r + 1];
  if (k != kb || cd[r] != m || cd[r + 1] != n) {
    return ffi::Error::InvalidArgument("onednn matmul: shapes do not agree");
  }
  dt in_a, in_b, out;
  if (!ToDnnl(a.element_type(), &in_a) || !ToDnnl(b.element_type(), &in_b) ||
      !ToDnnl(c->element_type(), &out) || in_a != in_b) {
    return ffi::Error::InvalidArgument(
        "onednn matmul: operands must both be f32 or both bf16, and the result f32 or bf16");
  }
  dt mul_dt = out;
  if (mul != nullptr) {
    auto md = mul->dimensions();
    if (md.size() != rank || md[r] != m || md[r + 1] != n || (rank == 3 && md[0] != batch)) {
      return ffi::Error::InvalidArgument("onednn matmul: the multiplier must have the shape of the result");
    }
    if (!ToDnnl(mul->element_type(), &mul_dt)) {
      return ffi::Error::InvalidArgument("onednn matmul: the multiplier must be f32 or bf16");
    }
  }
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum: 0, and silu(0) * m = 0 too
    std::memset(c->untyped_data(), 0, c->size_bytes());
    return ffi::Error::Success();
  }
  try {
    Run(Problem{static_cast<const char*>(a.untyped_data()),
                static_cast<const char*>(b.untyped_data()),
                static_cast<char*>(c->untyped_data()),
                mul ? static_cast<const char*>(mul->untyped_data()) : nullptr, batch, m, k, n,
                transpose_a, transpose_b, in_a, out, mul_dt});
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn matmul: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c,
                  bool transpose_a, bool transpose_b) {
  return Product(a, b, nullptr, c, transpose_a, transpose_b);
}

ffi::Error MatmulSiluMul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer mul,
                         ffi::Result<ffi::AnyBuffer> c, bool transpose_a, bool transpose_b) {
  return Product(a, b, &mul, c, transpose_a, transpose_b);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NemotronOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NemotronOnednnMatmulSiluMul, MatmulSiluMul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Arg<ffi::AnyBuffer>()  // the multiplier m
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
