// Multi-scale deformable attention on the CPU: an XLA FFI custom call, forward and backward.
//
// Same function as ms_deform_attn(impl="xla") (see ms_deform_attn.py for the maths): bilinear
// sampling with zeros outside the map, align_corners=False, pixel x = loc_x * W - 0.5.
//
// Shapes (row-major; any number of leading batch dimensions, flattened to B):
//   value (B, S, M, D), loc (B, Q, M, L, P, 2), attn (B, Q, M, L, P),
//   out / grad_out (B, Q, M, D); attribute `shapes` = [H_0, W_0, ..., H_{L-1}, W_{L-1}].
//
// Work is split into B * M units, one per (batch element, head). A unit owns every output
// element of its head, including the value-gradient rows value[b, :, m, :], so the backward
// scatter needs no atomics (a unit may still work on contiguous copies of its rows, for the
// caches: see WorthCopying). Units run on XLA's intra-op thread pool;
// the calling thread takes units too, so the call finishes even when no pool thread is free.
//
// Built on first use by ms_deform_attn_cpu.py (c++ -O3 -shared); not compiled elsewhere.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
constexpr int64_t kFloatsPerLine = 64 / sizeof(T);  // a 64-byte cache line

struct Geometry {
  int64_t batch = 0, S = 0, Q = 0, M = 0, D = 0, L = 0, P = 0;
  std::vector<int64_t> height, width, start;
};

// Bilinear corner of one sampling point: row offset of the pixel inside its level (or -1 when
// the corner is outside the map), weight and the weight's derivative w.r.t. pixel x and y.
template <typename T>
struct Corner {
  int64_t pixel;
  T weight, dweight_dx, dweight_dy;
};

// The four corners of normalized (lx, ly) on an (h, w) map. Returns false for a NaN location;
// callers then make the point's output and gradients NaN, as impl="xla" does. Clipping to [-2, size + 1] changes no result (every corner of
// a clipped point is outside) and keeps the integer conversion defined. Forced inline: GCC
// left it out of line in the backward's corner pass, 10% of the backward's time there.
template <typename T>
__attribute__((always_inline)) inline bool Corners(T lx, T ly, int64_t h, int64_t w,
                                                   Corner<T> out[4]) {
  if (std::isnan(lx) || std::isnan(ly)) return false;
  const T x = std::min(std::max(lx * static_cast<T>(w) - T(0.5), T(-2)), static_cast<T>(w + 1));
  const T y = std::min(std::max(ly * static_cast<T>(h) - T(0.5), T(-2)), static_cast<T>(h + 1));
  const T x0f = std::floor(x), y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  const T fx = x - x0f, fy = y - y0f;
  int k = 0;
  for (int dy = 0; dy < 2; ++dy) {
    for (int dx = 0; dx < 2; ++dx, ++k) {
      const int64_t xi = x0 + dx, yi = y0 + dy;
      const T wx = dx ? fx : T(1) - fx;
      const T wy = dy ? fy : T(1) - fy;
      if (xi < 0 || xi >= w || yi < 0 || yi >= h) {
        out[k] = {-1, T(0), T(0), T(0)};
      } else {
        out[k] = {yi * w + xi, wx * wy, (dx ? T(1) : T(-1)) * wy, (dy ? T(1) : T(-1)) * wx};
      }
    }
  }
  return true;
}

// Runs fn(unit) for every unit in [0, n): on the calling thread and on up to
// pool.num_threads() pool tasks, which take units from a shared counter. Returns when all
// units are done; false when a unit threw. A task that starts after the last unit was taken
// touches nothing but the shared state it co-owns, so the caller never waits for tasks that
// have not started.
bool ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<bool> failed{false};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = &fn;
  auto work = [](const std::shared_ptr<State>& st) {
    int64_t mine = 0;
    for (int64_t i = st->next.fetch_add(1); i < st->n; i = st->next.fetch_add(1)) {
      try {
        (*st->fn)(i);
      } catch (...) {  // never let an exception cross the pool thread or the C FFI boundary
        st->failed.store(true);
      }
      ++mine;
    }
    if (mine > 0 && st->done.fetch_add(mine) + mine == st->n) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t k = 0; k < helpers; ++k) {
    pool.Schedule([state, work]() { work(state); });
  }
  work(state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->n; });
  return !state->failed.load();
}

ffi::Error ReadGeometry(ffi::AnyBuffer value, ffi::AnyBuffer loc, ffi::AnyBuffer attn,
                        ffi::Span<const int64_t> shapes, Geometry* g) {
  const auto vd = value.dimensions();
  const auto ld = loc.dimensions();
  if (vd.size() < 4 || ld.size() != vd.size() + 2 || attn.dimensions().size() != vd.size() + 1) {
    return ffi::Error::InvalidArgument("ms_deform_attn_cpu: ranks of value/loc/attn do not fit");
  }
  const size_t r = vd.size();
  g->S = vd[r - 3];
  g->M = vd[r - 2];
  g->D = vd[r - 1];
  g->Q = ld[r - 3];
  g->L = ld[r - 1];
  g->P = ld[r];
  g->batch = 1;
  for (size_t i = 0; i + 3 < r; ++i) {
    if (ld[i] != vd[i]) {
      return ffi::Error::InvalidArgument("ms_deform_attn_cpu: batch dims of value and loc differ");
    }
    g->batch *= vd[i];
  }
  if (ld[r - 2] != g->M || ld[r + 1] != 2) {
    return ffi::Error::InvalidArgument("ms_deform_attn_cpu: loc is not (..., Q, M, L, P, 2)");
  }
  const auto ad = attn.dimensions();
  for (size_t i = 0; i <= r; ++i) {
    if (ad[i] != ld[i]) {
      return ffi::Error::InvalidArgument("ms_deform_attn_cpu: attn is not loc's shape without "
                                         "the last axis");
    }
  }
  if (static_cast<int64_t>(shapes.size()) != 2 * g->L) {
    return ffi::Error::InvalidArgument("ms_deform_attn_cpu: `shapes` must hold 2 * L ints");
  }
  int64_t acc = 0;
  for (int64_t l = 0; l < g->L; ++l) {
    if (shapes[2 * l] < 1 || shapes[2 * l + 1] < 1 || shapes[2 * l] > g->S ||
        shapes[2 * l + 1] > g->S || shapes[2 * l] * shapes[2 * l + 1] > g->S - acc) {
      return ffi::Error::InvalidArgument("ms_deform_attn_cpu: `shapes` do not fit S");
    }
    g->height.push_back(shapes[2 * l]);
    g->width.push_back(shapes[2 * l + 1]);
    g->start.push_back(acc);
    acc += shapes[2 * l] * shapes[2 * l + 1];
  }
  if (acc != g->S) {
    return ffi::Error::InvalidArgument("ms_deform_attn_cpu: `shapes` do not sum to S");
  }
  return ffi::Error::Success();
}

// Sampled rows are scattered over the map, so overlapping their cache misses is what these
// loops gain most from. Measured at the 800x1066 encoder shapes (benchmarks/msda.py), with
// uniform locations: the forward prefetches the next query's rows while it sums the current
// one's (1.2-1.3x faster than no prefetch; collecting the corners first as the backward does
// was 1.5x slower), the backward collects the current query's corners and prefetches their
// value and gradient rows before using any (1.5x faster than no prefetch; prefetching one
// query ahead instead was 2x slower). When a unit's rows fit in L2 (the training shapes,
// 1360 rows of 32 floats, 174 KB), prefetching them only costs instructions, so the units
// prefetch rows only above kPrefetchBytes. The per-query inputs (loc, attn, grad_out: a
// few lines each, M * row apart) are prefetched kQueriesAhead queries ahead at every size.
constexpr int64_t kPrefetchBytes = 512 * 1024;
constexpr int64_t kQueriesAhead = 4;

// Whether `arrays` arrays of S rows of D elements (whole cache lines) are worth prefetching.
template <typename T>
bool WorthPrefetching(const Geometry& g, int64_t arrays) {
  const int64_t lines = (g.D + kFloatsPerLine<T> - 1) / kFloatsPerLine<T>;
  return arrays * g.S * lines * 64 > kPrefetchBytes;
}

// Prefetches the n elements at p.
template <typename T>
void PrefetchSpan(const T* p, int64_t n) {
  for (int64_t off = 0; off < n; off += kFloatsPerLine<T>) __builtin_prefetch(p + off, 0, 3);
}

// A head's rows are M * D apart in value, so with M * D * sizeof(T) a power of two (1 KB at
// 8 heads x 32 floats) they fall in only one in M of the L1 and L2 sets: one head's value and
// gradient rows (348 KB at the training shapes) thrash an L2 they would fit in several times
// over. A unit that reads its rows often enough works on a contiguous (S, D) copy instead:
// 1.5-1.8x faster forward and backward, at the training and the 800x1066 shapes. "Often
// enough": at least two sampled corners per row on average, so the copy (S rows) costs
// little next to the sampling; a decoder on a large map (300 queries, 18k rows) reads too
// few of its rows for a copy to pay.
inline bool WorthCopying(const Geometry& g, int64_t queries) {
  return g.M > 1 && queries * g.L * g.P * 4 >= 2 * g.S;  // one head: already contiguous
}

// Uninitialised scratch starting on a cache line (std::vector's storage is only 16-byte
// aligned, so a 128-byte row of a copy would straddle three lines).
struct FreeLineAligned {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t{64}); }
};
template <typename T>
using LineAligned = std::unique_ptr<T[], FreeLineAligned>;

template <typename T>
LineAligned<T> AllocLineAligned(int64_t n) {
  return LineAligned<T>(static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t{64})));
}

// The D elements of each of the S rows at src, rows src_stride apart, to dst, rows
// dst_stride apart.
template <typename T>
void CopyRows(const Geometry& g, const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
  for (int64_t s = 0; s < g.S; ++s) {
    std::copy(src + s * src_stride, src + s * src_stride + g.D, dst + s * dst_stride);
  }
}

// Prefetches the value rows (row_stride apart) that the L * P sampling points at lq ((x, y)
// pairs) will read.
template <typename T>
void PrefetchValueRows(const Geometry& g, const T* lq, const T* vb, int64_t row_stride) {
  for (int64_t l = 0; l < g.L; ++l) {
    for (int64_t p = 0; p < g.P; ++p) {
      const int64_t lp = l * g.P + p;
      Corner<T> c[4];
      if (!Corners(lq[2 * lp], lq[2 * lp + 1], g.height[l], g.width[l], c)) continue;
      for (int k = 0; k < 4; ++k) {
        if (c[k].pixel < 0) continue;
        PrefetchSpan(vb + (g.start[l] + c[k].pixel) * row_stride, g.D);
      }
    }
  }
}

// Queries per forward unit: the forward has no scatter, so its units are (b, m, query chunk),
// enough of them to keep every pool thread busy at batch 1.
constexpr int64_t kForwardChunk = 1024;

// out[b, q, m, :] = sum_{l, p, corner} attn * weight * value[b, start_l + pixel, m, :], for
// the queries of one (b, m, chunk) unit. kD > 0 is the head dim D known at compile time: the
// output row then accumulates in a fixed-size local array, which the compiler can keep in
// vector registers instead of loading and storing the row for every corner; kD == 0 reads D
// from g and accumulates in the output.
template <typename T, int kD>
void ForwardUnit(const Geometry& g, int64_t unit, const T* __restrict value,
                 const T* __restrict loc, const T* __restrict attn, T* __restrict out) {
  const int64_t chunks = (g.Q + kForwardChunk - 1) / kForwardChunk;
  const int64_t bm = unit / chunks, chunk = unit % chunks;
  const int64_t b = bm / g.M, m = bm % g.M, D = kD > 0 ? kD : g.D, LP = g.L * g.P;
  const int64_t q_begin = chunk * kForwardChunk, q_end = std::min(g.Q, q_begin + kForwardChunk);
  const T* vb = value + b * g.S * g.M * D + m * D;  // + (start_l + pixel) * stride
  int64_t stride = g.M * D;
  LineAligned<T> rows;  // the contiguous copy, when WorthCopying
  if (WorthCopying(g, q_end - q_begin)) {
    rows = AllocLineAligned<T>(g.S * D);
    CopyRows(g, vb, stride, rows.get(), D);
    vb = rows.get();
    stride = D;
  }
  const bool prefetch = WorthPrefetching<T>(g, 1);
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t bqm = (b * g.Q + q) * g.M + m;
    const T* lq = loc + bqm * LP * 2;
    const T* aq = attn + bqm * LP;
    if (q + kQueriesAhead < q_end) {
      PrefetchSpan(lq + kQueriesAhead * g.M * LP * 2, LP * 2);
      PrefetchSpan(aq + kQueriesAhead * g.M * LP, LP);
    }
    if (prefetch && q + 1 < q_end) {
      PrefetchValueRows<T>(g, lq + g.M * LP * 2, vb, stride);  // the next query's
    }
    T local[kD > 0 ? kD : 1];
    T* __restrict o = kD > 0 ? local : out + bqm * D;
    std::fill(o, o + D, T(0));
    for (int64_t l = 0; l < g.L; ++l) {
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t lp = l * g.P + p;
        Corner<T> c[4];
        if (!Corners(lq[2 * lp], lq[2 * lp + 1], g.height[l], g.width[l], c)) {
          std::fill(o, o + D, std::numeric_limits<T>::quiet_NaN());  // a NaN location
          continue;
        }
        for (int k = 0; k < 4; ++k) {
          if (c[k].pixel < 0) continue;
          const T coef = aq[lp] * c[k].weight;
          const T* __restrict v = vb + (g.start[l] + c[k].pixel) * stride;
          for (int64_t d = 0; d < D; ++d) o[d] += coef * v[d];
        }
      }
    }
    if (kD > 0) std::copy(o, o + D, out + bqm * D);
  }
}

// The sum of part[0, kLanes), added pairwise (the halves, then their halves, ...): GCC turns
// this into a few vector shuffles and adds without -ffast-math (an in-place loop over one
// array went through the stack instead). Forced inline: left out of line, the array is
// stored to the stack for the call.
template <typename T, int kLanes>
__attribute__((always_inline)) inline T SumLanes(const T* part) {
  if constexpr (kLanes == 1) {
    return part[0];
  } else {
    T half[kLanes / 2];
    for (int j = 0; j < kLanes / 2; ++j) half[j] = part[j] + part[j + kLanes / 2];
    return SumLanes<T, kLanes / 2>(half);
  }
}

// One corner row of the backward: gv += coef * go, and returns go . v. kD as in ForwardUnit.
// With kD a multiple of kLanes (one vector register's worth), the dot product sums kLanes
// partial sums, then adds them pairwise, so that it vectorizes without -ffast-math; otherwise
// it sums element by element.
template <typename T, int kD>
__attribute__((always_inline)) inline T DotAndAccumulate(int64_t D, const T* __restrict go,
                                                          const T* __restrict v,
                                                          T* __restrict gv, T coef) {
  constexpr int kLanes = kFloatsPerLine<T>;
  if constexpr (kD > 0 && kD % kLanes == 0) {
    T part[kLanes] = {};
    for (int64_t d = 0; d < kD; d += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        part[j] += go[d + j] * v[d + j];
        gv[d + j] += coef * go[d + j];
      }
    }
    return SumLanes<T, kLanes>(part);
  } else {
    T dot = 0;
    for (int64_t d = 0; d < D; ++d) {
      dot += go[d] * v[d];
      gv[d] += coef * go[d];
    }
    return dot;
  }
}

// Gradients of one (b, m) unit given grad_out g: value (rows of head m), loc and attn.
// kD as in ForwardUnit; the output-gradient row is then copied to a local array, which stays
// in registers. Per query, a first pass finds the corners of all L * P points (and, above
// kPrefetchBytes, prefetches their value and gradient rows, so that their misses overlap);
// the second reads each corner row once for its dot product with the output gradient and
// adds into the same row of the value gradient, summing each point's gradients in locals.
template <typename T, int kD>
void BackwardUnit(const Geometry& g, int64_t unit, const T* __restrict value,
                  const T* __restrict loc, const T* __restrict attn, const T* __restrict gout,
                  T* __restrict gvalue, T* __restrict gloc, T* __restrict gattn) {
  const int64_t b = unit / g.M, m = unit % g.M, D = kD > 0 ? kD : g.D, LP = g.L * g.P;
  const int64_t offset = b * g.S * g.M * D + m * D;  // + (start_l + pixel) * stride
  const T* vb = value + offset;
  T* gvb = gvalue + offset;
  int64_t stride = g.M * D;
  LineAligned<T> rows, grad_rows;  // the contiguous copies, when WorthCopying
  const bool copy = WorthCopying(g, g.Q);
  if (copy) {
    rows = AllocLineAligned<T>(g.S * D);
    grad_rows = AllocLineAligned<T>(g.S * D);
    CopyRows(g, vb, stride, rows.get(), D);
    std::fill(grad_rows.get(), grad_rows.get() + g.S * D, T(0));
    vb = rows.get();
    gvb = grad_rows.get();
    stride = D;
  } else {
    for (int64_t s = 0; s < g.S; ++s) std::fill(gvb + s * stride, gvb + s * stride + D, T(0));
  }
  const bool prefetch = WorthPrefetching<T>(g, 2);
  std::vector<Corner<T>> corners(4 * LP);
  std::vector<char> nan_point(LP);  // char, not bool: plain bytes
  T go_local[kD > 0 ? kD : 1];
  for (int64_t q = 0; q < g.Q; ++q) {
    const int64_t bqm = (b * g.Q + q) * g.M + m;
    const T* lq = loc + bqm * LP * 2;
    const T* aq = attn + bqm * LP;
    const T* __restrict go = gout + bqm * D;
    if (q + kQueriesAhead < g.Q) {
      PrefetchSpan(lq + kQueriesAhead * g.M * LP * 2, LP * 2);
      PrefetchSpan(aq + kQueriesAhead * g.M * LP, LP);
      PrefetchSpan(go + kQueriesAhead * g.M * D, D);
    }
    for (int64_t l = 0; l < g.L; ++l) {
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t lp = l * g.P + p;
        Corner<T>* c = &corners[4 * lp];
        nan_point[lp] = !Corners(lq[2 * lp], lq[2 * lp + 1], g.height[l], g.width[l], c);
        if (!prefetch || nan_point[lp]) continue;
        for (int k = 0; k < 4; ++k) {
          if (c[k].pixel < 0) continue;
          const int64_t row = (g.start[l] + c[k].pixel) * stride;
          for (int64_t off = 0; off < D; off += kFloatsPerLine<T>) {
            __builtin_prefetch(vb + row + off, 0, 3);
            __builtin_prefetch(gvb + row + off, 1, 3);
          }
        }
      }
    }
    if constexpr (kD > 0) {
      std::copy(go, go + kD, go_local);
      go = go_local;
    }
    T* glq = gloc + bqm * LP * 2;
    T* gaq = gattn + bqm * LP;
    for (int64_t l = 0; l < g.L; ++l) {
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t lp = l * g.P + p;
        if (nan_point[lp]) {  // a NaN location has NaN gradients, as in impl="xla"
          gaq[lp] = glq[2 * lp] = glq[2 * lp + 1] = std::numeric_limits<T>::quiet_NaN();
          continue;
        }
        T grad_a = 0, grad_x = 0, grad_y = 0;
        for (int k = 0; k < 4; ++k) {
          const Corner<T>& c = corners[4 * lp + k];
          if (c.pixel < 0) continue;
          const int64_t row = (g.start[l] + c.pixel) * stride;
          const T dot = DotAndAccumulate<T, kD>(D, go, vb + row, gvb + row, aq[lp] * c.weight);
          grad_a += c.weight * dot;
          grad_x += c.dweight_dx * dot;
          grad_y += c.dweight_dy * dot;
        }
        // d x / d loc_x = W, d y / d loc_y = H.
        gaq[lp] = grad_a;
        glq[2 * lp] = grad_x * aq[lp] * static_cast<T>(g.width[l]);
        glq[2 * lp + 1] = grad_y * aq[lp] * static_cast<T>(g.height[l]);
      }
    }
  }
  if (copy) CopyRows(g, gvb, D, gvalue + offset, g.M * D);
}

// Calls fn(std::integral_constant<int, kD>) with kD = d for the head dims compiled for (32:
// the official 256 / 8 heads; 64), else kD = 0 (any D). Not 16 (the shapes demo's 128 / 8):
// there the specialised units measured slower than the generic ones (benchmarks/RESULTS.md,
// "README sampler table as of session 19").
template <typename Fn>
bool WithHeadDim(int64_t d, Fn&& fn) {
  switch (d) {
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

// All buffers share one float type, float32 or float64 (the Python side casts bf16/f16 up).
ffi::Error CheckTypes(ffi::DataType t, std::initializer_list<ffi::DataType> others) {
  for (ffi::DataType o : others) {
    if (o != t) return ffi::Error::InvalidArgument("ms_deform_attn_cpu: mixed dtypes");
  }
  if (t != ffi::DataType::F32 && t != ffi::DataType::F64) {
    return ffi::Error::InvalidArgument("ms_deform_attn_cpu: only float32 and float64");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer value, ffi::AnyBuffer loc,
                       ffi::AnyBuffer attn, ffi::Span<const int64_t> shapes,
                       ffi::Result<ffi::AnyBuffer> out) {
  Geometry g;
  if (auto e = ReadGeometry(value, loc, attn, shapes, &g); e.failure()) return e;
  const ffi::DataType t = value.element_type();
  if (auto e = CheckTypes(t, {loc.element_type(), attn.element_type(), out->element_type()});
      e.failure()) {
    return e;
  }
  if (out->element_count() != g.batch * g.Q * g.M * g.D) {
    return ffi::Error::InvalidArgument("ms_deform_attn_cpu: output is not (B, Q, M, D)");
  }
  const int64_t chunks = (g.Q + kForwardChunk - 1) / kForwardChunk;
  auto run = [&](auto type_tag) {  // the same loop for float and double
    using T = decltype(type_tag);
    return WithHeadDim(g.D, [&](auto head_dim) {
      return ParallelFor(pool, g.batch * g.M * chunks, [&](int64_t u) {
        ForwardUnit<T, decltype(head_dim)::value>(g, u, value.typed_data<T>(),
                                                  loc.typed_data<T>(), attn.typed_data<T>(),
                                                  out->typed_data<T>());
      });
    });
  };
  if (!(t == ffi::DataType::F32 ? run(float{}) : run(double{}))) {
    return ffi::Error::Internal("ms_deform_attn_cpu: the forward kernel failed");
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer value, ffi::AnyBuffer loc,
                        ffi::AnyBuffer attn, ffi::AnyBuffer gout, ffi::Span<const int64_t> shapes,
                        ffi::Result<ffi::AnyBuffer> gvalue, ffi::Result<ffi::AnyBuffer> gloc,
                        ffi::Result<ffi::AnyBuffer> gattn) {
  Geometry g;
  if (auto e = ReadGeometry(value, loc, attn, shapes, &g); e.failure()) return e;
  const ffi::DataType t = value.element_type();
  if (auto e = CheckTypes(t, {loc.element_type(), attn.element_type(), gout.element_type(),
                                  gvalue->element_type(), gloc->element_type(),
                                  gattn->element_type()});
      e.failure()) {
    return e;
  }
  if (gout.element_count() != g.batch * g.Q * g.M * g.D ||
      gvalue->element_count() != value.element_count() ||
      gloc->element_count() != loc.element_count() ||
      gattn->element_count() != attn.element_count()) {
    return ffi::Error::InvalidArgument("ms_deform_attn_cpu: gradient buffers do not fit");
  }
  auto run = [&](auto type_tag) {  // the same loop for float and double
    using T = decltype(type_tag);
    return WithHeadDim(g.D, [&](auto head_dim) {
      return ParallelFor(pool, g.batch * g.M, [&](int64_t u) {
        BackwardUnit<T, decltype(head_dim)::value>(
            g, u, value.typed_data<T>(), loc.typed_data<T>(), attn.typed_data<T>(),
            gout.typed_data<T>(), gvalue->typed_data<T>(), gloc->typed_data<T>(),
            gattn->typed_data<T>());
      });
    });
  };
  if (!(t == ffi::DataType::F32 ? run(float{}) : run(double{}))) {
    return ffi::Error::Internal("ms_deform_attn_cpu: the backward kernel failed");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdetrMsdaForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("shapes")
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdetrMsdaBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("shapes")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
