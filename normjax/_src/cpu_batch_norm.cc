// BatchNorm's training statistics and normalization for XLA:CPU, as XLA FFI custom calls.
//
// x is (groups, rows, C), features last and contiguous (row-major); each group (a ghost batch, or the
// whole batch) has its own statistics. Per group: pass 1 sums x - K and (x - K)^2 per feature with K
// the mean of the first valid rows (at most 16) of x, in float32 blocks of 16 and 512 rows added into
// double accumulators (the 16-row sums held in vector registers, up to 128 features at a time); when any feature's
// mean lies more than 3 standard deviations from its K (where the shifted sums could lose digits) a
// second pass computes the mean squared deviation from the mean, exactly as a two-pass algorithm.
// The rows are split over XLA's intra-op thread pool.
//
// NormjaxBatchNormForward: the statistics, then y = (x - mean) * (scale * rsqrt(var + epsilon)) + bias
// rounded once to y's dtype (a second read of x; y's pages mapped in one call where malloc handed
// back fresh memory); with Batch Renormalization's corrections r and d folded into the scale and
// bias when the running statistics and limits are given.
// NormjaxBatchNormMoments: the statistics only, over the rows flagged valid (BatchNorm's masks; a
// masked row is never read), for steps whose normalization XLA computes (masks, axis_name).
//
// Built on first use by normjax/_src/cpu_kernel.py (g++ -O3, the XLA FFI headers shipped with jaxlib).
// Reference: Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <sys/mman.h>
#include <unistd.h>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSubRows = 16;     // float32 sums of this many rows,
constexpr int64_t kBlockRows = 512;  // added in float32 over this many, then into doubles
constexpr int64_t kProbeRows = 16;      // K: the mean of at most this many leading rows
constexpr int64_t kMinShard = 1 << 15;  // elements per thread below which one thread runs it all
constexpr double kShiftLimit = 9.0;     // second pass when (mean - K)^2 > 9 var for a feature
#ifdef __AVX512F__  // features whose partial sums (and K) the vector registers hold: 3 x 8 of 32
constexpr int64_t kRegisterTile = 128;
#else  // 3 x 4 of AVX2's 16
constexpr int64_t kRegisterTile = 32;
#endif

inline float Load(const float* p, int64_t i) { return p[i]; }

inline float Load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline void Store(float* p, int64_t i, float value) { p[i] = value; }

inline void Store(uint16_t* p, int64_t i, float value) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  uint32_t quiet = (bits >> 16) | 0x40u;
  p[i] = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

// Runs shard(t) for t in [0, shards) on the calling thread and on XLA's intra-op pool; returns when
// all are done. Shards are claimed from a counter, so the caller never waits for a task that has not
// started: inside a concurrent XLA:CPU program this kernel itself runs on a pool thread, and a task
// queued behind other waiting kernels may start late (it then finds nothing left and returns).
template <typename F>
void ForEachShard(ffi::ThreadPool& pool, int64_t shards, const F& shard) {
  struct Progress {
    std::atomic<int64_t> next{0}, finished{0};
  };
  auto progress = std::make_shared<Progress>();
  auto run = [progress, shards, &shard] {  // `shard` is only used while the caller waits
    for (int64_t t; (t = progress->next.fetch_add(1)) < shards;) {
      shard(t);
      progress->finished.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < shards; ++t) pool.Schedule([run] { run(); });
  run();
  while (progress->finished.load(std::memory_order_acquire) < shards) std::this_thread::yield();
}

// Sums of rows [s0, s1) of the feature columns [j0, j0 + w) (w <= W) of x - K, and of their squares,
// added into m1, m2 (C entries). Inlined with w == W (a compile-time tile), the compiler keeps the
// tile's partial sums in vector registers, so each element costs one load.
template <int64_t W, typename T>
__attribute__((always_inline)) inline void TileSums(const T* __restrict x, const uint8_t* valid,
                                                    int64_t s0, int64_t s1, int64_t c, int64_t j0,
                                                    int64_t w, const float* __restrict k,
                                                    float* __restrict m1, float* __restrict m2) {
  float shift[W], b1[W] = {}, b2[W] = {};
  for (int64_t j = 0; j < w; ++j) shift[j] = k[j0 + j];
  for (int64_t r = s0; r < s1; ++r) {
    if (valid != nullptr && !valid[r]) continue;  // a masked row: skipped, whatever it holds
    const T* row = x + r * c + j0;
    for (int64_t j = 0; j < w; ++j) {
      const float d = Load(row, j) - shift[j];
      b1[j] += d;
      b2[j] += d * d;
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    m1[j0 + j] += b1[j];
    m2[j0 + j] += b2[j];
  }
}

// TileSums over the features [j0, C) of rows [s0, s1): tiles of W features while that many are left,
// then of W / 2, ..., 32, then the rest. With W the most partial sums the registers hold, the rows of
// up to W features are read in order (which the hardware prefetcher streams best).
template <int64_t W, typename T>
void SubBlockSums(const T* x, const uint8_t* valid, int64_t s0, int64_t s1, int64_t c, int64_t j0,
                  const float* k, float* m1, float* m2) {
  for (; c - j0 >= W; j0 += W) TileSums<W>(x, valid, s0, s1, c, j0, W, k, m1, m2);
  if constexpr (W > 32) {
    SubBlockSums<W / 2>(x, valid, s0, s1, c, j0, k, m1, m2);
  } else if (j0 < c) {
    TileSums<W>(x, valid, s0, s1, c, j0, c - j0, k, m1, m2);
  }
}

// Per-feature sums over the valid rows (all when `valid` is null) of [begin, end) of x - K and
// (x - K)^2 added into acc1, acc2 (C entries):
// float32 sums of 16 rows, added in float32 over 512 rows, then into the double accumulators (a
// blocked summation: its rounding error grows with 16 + 32 terms, not with the row count).
template <typename T>
void ShiftedSums(const T* x, const uint8_t* valid, int64_t begin, int64_t end, int64_t c,
                 const float* k, double* acc1, double* acc2) {
  std::vector<float> m1(c), m2(c);
  for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
    std::fill(m1.begin(), m1.end(), 0.0f);
    std::fill(m2.begin(), m2.end(), 0.0f);
    const int64_t r1 = std::min(end, r0 + kBlockRows);
    for (int64_t s0 = r0; s0 < r1; s0 += kSubRows) {
      SubBlockSums<kRegisterTile>(x, valid, s0, std::min(r1, s0 + kSubRows), c, 0, k, m1.data(),
                                  m2.data());
    }
    for (int64_t j = 0; j < c; ++j) {
      acc1[j] += m1[j];
      acc2[j] += m2[j];
    }
  }
}

// How Forward and Moments split a group's rows over the pool's threads.
struct Shards {
  int64_t count, per_shard, rows;
  Shards(ffi::ThreadPool& pool, int64_t rows, int64_t c) : rows(rows) {
    const int64_t threads = std::max<int64_t>(1, pool.num_threads());
    count = std::max<int64_t>(1, std::min<int64_t>(threads, rows * c / kMinShard));
    per_shard = (rows + count - 1) / count;
  }
  std::pair<int64_t, int64_t> Bounds(int64_t t) const {
    return {std::min(rows, t * per_shard), std::min(rows, (t + 1) * per_shard)};
  }
};

// The mean and biased variance of each feature of x (rows, C) over its valid rows (all when `valid` is
// null; none: mean 0, variance 0) into mean, var: shifted sums, and a second pass shifted by the mean
// where the first could have lost digits (see the file's comment).
template <typename TX>
void Statistics(ffi::ThreadPool& pool, const Shards& shards, const TX* x, const uint8_t* valid,
                int64_t rows, int64_t c, float* mean, float* var) {
  std::vector<float> k(c, 0.0f);
  int64_t count = 0;
  {
    std::vector<double> s(c, 0.0);
    int64_t probe = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (valid != nullptr && !valid[r]) continue;
      ++count;
      if (probe == kProbeRows) continue;
      ++probe;
      for (int64_t j = 0; j < c; ++j) s[j] += Load(x, r * c + j);
    }
    for (int64_t j = 0; j < c; ++j) k[j] = probe ? static_cast<float>(s[j] / probe) : 0.0f;
  }
  if (count == 0) {
    std::fill(mean, mean + c, 0.0f);
    std::fill(var, var + c, 0.0f);
    return;
  }
  std::vector<double> acc(2 * c * shards.count), m(c), v(c);
  const double n = static_cast<double>(count);
  auto moments = [&]() {  // m, v from the sums of x - k; whether every feature kept its digits
    std::fill(acc.begin(), acc.end(), 0.0);
    ForEachShard(pool, shards.count, [&](int64_t t) {
      auto [b, e] = shards.Bounds(t);
      ShiftedSums(x, valid, b, e, c, k.data(), &acc[2 * c * t], &acc[2 * c * t + c]);
    });
    for (int64_t t = 1; t < shards.count; ++t)
      for (int64_t j = 0; j < 2 * c; ++j) acc[j] += acc[2 * c * t + j];
    bool precise = true;
    for (int64_t j = 0; j < c; ++j) {
      const double offset = acc[j] / n;
      m[j] = k[j] + offset;
      v[j] = std::max(acc[c + j] / n - offset * offset, 0.0);
      precise = precise && offset * offset <= kShiftLimit * v[j];  // false for NaN too
    }
    return precise;
  };
  if (!moments()) {  // a second pass, shifted by the mean just computed: the two-pass result
    for (int64_t j = 0; j < c; ++j) k[j] = static_cast<float>(m[j]);
    moments();
  }
  for (int64_t j = 0; j < c; ++j) {
    mean[j] = static_cast<float>(m[j]);
    var[j] = static_cast<float>(v[j]);
  }
}

// Batch Renormalization's reference statistics (Ioffe 2017): the running mean and variance and the
// limits r_max, d_max; null pointers for a plain step.
struct Renorm {
  const float *mean = nullptr, *var = nullptr, *limits = nullptr;
};

// y = (x - mean) * a + b per feature: a = scale * rsqrt(var + epsilon), b = bias; with renorm
// a = scale * r * rsqrt(var + epsilon), b = bias + scale * d, where r = clip(sqrt((var + epsilon) /
// (running var + epsilon)), 1 / r_max, r_max) and d = clip((mean - running mean) * rsqrt(running
// var + epsilon), -d_max, d_max): the corrections of normjax/_src/renorm.py, held constant.
void Affine(const float* scale, const float* bias, const Renorm& renorm, float epsilon,
            const float* mean, const float* var, int64_t c, float* a, float* b) {
  for (int64_t j = 0; j < c; ++j) {
    const float rstd = 1.0f / std::sqrt(var[j] + epsilon);
    if (renorm.mean == nullptr) {
      a[j] = rstd * scale[j];
      b[j] = bias[j];
      continue;
    }
    const float r_max = renorm.limits[0], d_max = renorm.limits[1];
    const float reference = renorm.var[j] + epsilon;
    const float r = std::min(std::max(std::sqrt((var[j] + epsilon) / reference), 1.0f / r_max), r_max);
    const float d =
        std::min(std::max((mean[j] - renorm.mean[j]) * (1.0f / std::sqrt(reference)), -d_max), d_max);
    a[j] = rstd * (scale[j] * r);
    b[j] = bias[j] + scale[j] * d;
  }
}

// y = (x - mean) * a + b per feature for rows [begin, end) of x (rows, C); y never overlaps x or the
// per-feature vectors (restrict: no alias checks in the loop).
template <typename TX, typename TY>
void Normalize(const TX* __restrict x, int64_t begin, int64_t end, int64_t c,
               const float* __restrict mean, const float* __restrict a, const float* __restrict b,
               TY* __restrict y) {
  for (int64_t r = begin; r < end; ++r) {
    const TX* __restrict xr = x + r * c;
    TY* __restrict yr = y + r * c;
    for (int64_t j = 0; j < c; ++j) Store(yr, j, (Load(xr, j) - mean[j]) * a[j] + b[j]);
  }
}

// Maps the whole pages of [first, last) in one system call (MADV_POPULATE_WRITE, Linux 5.14+) rather
// than one page fault each, when its first page is not mapped yet: XLA:CPU's buffers come from
// malloc, which may hand back freshly mapped memory (see BENCHMARKS.md, "Page faults"). One
// `mincore` call otherwise. A no-op where the kernel lacks either or the range holds no whole page.
template <typename T>
void Populate(T* first, T* last) {
#ifdef MADV_POPULATE_WRITE
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(first) + page - 1) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(last) & ~(page - 1);
  unsigned char resident = 1;
  if (end <= begin || mincore(reinterpret_cast<void*>(begin), page, &resident) != 0 || resident & 1)
    return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
#endif
}

template <typename TX, typename TY>
void Forward(ffi::ThreadPool& pool, const TX* x, const float* scale, const float* bias,
             const Renorm& renorm, float epsilon, int64_t rows, int64_t c, TY* y, float* mean,
             float* var) {
  const Shards shards(pool, rows, c);
  Statistics(pool, shards, x, nullptr, rows, c, mean, var);
  std::vector<float> a(c), b(c);
  Affine(scale, bias, renorm, epsilon, mean, var, c, a.data(), b.data());
  ForEachShard(pool, shards.count, [&](int64_t t) {
    auto [begin, end] = shards.Bounds(t);
    Populate(y + begin * c, y + end * c);
    Normalize(x, begin, end, c, mean, a.data(), b.data(), y);
  });
}

// (groups, rows, C) from x's shape and `groups`, or an error naming what does not fit.
ffi::Error Layout(ffi::AnyBuffer& x, int64_t groups, int64_t* rows, int64_t* c) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("x must be at least 1-D");
  *c = dims.back();
  const int64_t size = static_cast<int64_t>(x.element_count());
  if (*c <= 0 || groups <= 0 || size % (*c * groups) != 0)
    return ffi::Error::InvalidArgument("x's size must be a multiple of groups * features");
  const auto tx = x.element_type();
  if (tx != ffi::DataType::F32 && tx != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  *rows = size / (*c * groups);  // per group
  return ffi::Error::Success();
}

// `valid`: one flag per row of each group (groups * rows), or empty (every row valid).
ffi::Error DispatchMoments(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> valid,
                           int64_t groups, ffi::ResultBuffer<ffi::F32> mean,
                           ffi::ResultBuffer<ffi::F32> var) {
  int64_t rows, c;
  if (auto error = Layout(x, groups, &rows, &c); error.failure()) return error;
  const bool masked = valid.element_count() != 0;
  if (masked && valid.element_count() != static_cast<size_t>(groups * rows))
    return ffi::Error::InvalidArgument("valid must hold one flag per row of x (or none)");
  if (mean->element_count() != static_cast<size_t>(groups * c) ||
      var->element_count() != static_cast<size_t>(groups * c))
    return ffi::Error::InvalidArgument("mean or var do not match x's shape");
  const bool f32 = x.element_type() == ffi::DataType::F32;
  const Shards shards(pool, rows, c);
  for (int64_t g = 0; g < groups; ++g) {
    float *m = mean->typed_data() + g * c, *v = var->typed_data() + g * c;
    const uint8_t* flags = masked ? valid.typed_data() + g * rows : nullptr;
    if (f32)
      Statistics(pool, shards, static_cast<const float*>(x.untyped_data()) + g * rows * c, flags,
                 rows, c, m, v);
    else
      Statistics(pool, shards, static_cast<const uint16_t*>(x.untyped_data()) + g * rows * c,
                 flags, rows, c, m, v);
  }
  return ffi::Error::Success();
}

// `reference_mean`, `reference_var` (C each) and `limits` (r_max, d_max): Batch Renormalization's
// inputs, or all three empty for a plain step.
ffi::Error Dispatch(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> reference_mean,
                    ffi::Buffer<ffi::F32> reference_var, ffi::Buffer<ffi::F32> limits,
                    float epsilon, int64_t groups,
                    ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean,
                    ffi::ResultBuffer<ffi::F32> var) {
  int64_t rows, c;
  if (auto error = Layout(x, groups, &rows, &c); error.failure()) return error;
  if (scale.element_count() != static_cast<size_t>(c) ||
      bias.element_count() != static_cast<size_t>(c) || y->element_count() != x.element_count() ||
      mean->element_count() != static_cast<size_t>(groups * c) ||
      var->element_count() != static_cast<size_t>(groups * c))
    return ffi::Error::InvalidArgument("scale, bias, y, mean or var do not match x's shape");
  Renorm renorm;
  if (limits.element_count() != 0) {
    if (limits.element_count() != 2 || reference_mean.element_count() != static_cast<size_t>(c) ||
        reference_var.element_count() != static_cast<size_t>(c))
      return ffi::Error::InvalidArgument("renorm needs C reference means and variances, 2 limits");
    renorm = {reference_mean.typed_data(), reference_var.typed_data(), limits.typed_data()};
  }
  const auto tx = x.element_type(), ty = y->element_type();
  if ((tx != ffi::DataType::F32 && tx != ffi::DataType::BF16) ||
      (ty != ffi::DataType::F32 && ty != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("x and y must be float32 or bfloat16");
  const int64_t in_size = tx == ffi::DataType::F32 ? 4 : 2, out_size = ty == ffi::DataType::F32 ? 4 : 2;
  for (int64_t g = 0; g < groups; ++g) {  // each group: its own statistics and normalization
    const char* in = static_cast<const char*>(x.untyped_data()) + g * rows * c * in_size;
    char* out = static_cast<char*>(y->untyped_data()) + g * rows * c * out_size;
    const float *s = scale.typed_data(), *b = bias.typed_data();
    float *m = mean->typed_data() + g * c, *v = var->typed_data() + g * c;
    using BF = uint16_t;
    if (tx == ffi::DataType::F32 && ty == ffi::DataType::F32)
      Forward(pool, reinterpret_cast<const float*>(in), s, b, renorm, epsilon, rows, c,
              reinterpret_cast<float*>(out), m, v);
    else if (tx == ffi::DataType::BF16 && ty == ffi::DataType::BF16)
      Forward(pool, reinterpret_cast<const BF*>(in), s, b, renorm, epsilon, rows, c,
              reinterpret_cast<BF*>(out), m, v);
    else if (tx == ffi::DataType::BF16)
      Forward(pool, reinterpret_cast<const BF*>(in), s, b, renorm, epsilon, rows, c,
              reinterpret_cast<float*>(out), m, v);
    else
      Forward(pool, reinterpret_cast<const float*>(in), s, b, renorm, epsilon, rows, c,
              reinterpret_cast<BF*>(out), m, v);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxBatchNormForward, Dispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("groups")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxBatchNormMoments, DispatchMoments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("groups")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
