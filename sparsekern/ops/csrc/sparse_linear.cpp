// Sparse training kernels for an unstructured linear layer (CPU, fp32, OpenMP + AVX-512).
//
// Layout (as SparseProp): activations are stored transposed, batch contiguous: X^T [K, M],
// dY^T [N, M], so each kept weight multiplies or dots one contiguous length-M vector and the
// batch dimension is what the SIMD lanes run over. Threads split the sparse rows.
//
//   spmm(row_ptr, col_idx, values, B, out):  out[r, :] = sum_j values[j] * B[col_idx[j], :]
//       forward: A = W (CSR), B = X^T  -> Y^T;   dX: A = W^T (CSR of W^T), B = dY^T -> dX^T
//   sddmm(row_ptr, col_idx, A, B, out):      out[j] = dot(A[row(j), :], B[col_idx[j], :])
//       dW at the kept entries only: A = dY^T, B = X^T.
//
// Every kernel reads its index once and writes each output element once (no atomics).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

int threads() { return std::max(1, at::get_num_threads()); }

// Below this many multiply-adds a call runs on one thread: waking a second thread costs more
// than the work (and far more on a loaded machine, where a barrier waits for a time slice).
constexpr int64_t kParallelGrain = 1 << 16;

#if defined(__AVX512F__)
// out[0:len] = sum_j v[j] * B[col[j]*ld + 0:len], len <= 64 (4 zmm accumulators, masked tail).
template <int NV>
inline void axpy_block(const int32_t* col, const float* val, int64_t b, int64_t e,
                       const float* B, int64_t ld, float* out, __mmask16 last) {
  __m512 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm512_setzero_ps();
  int64_t j = b;
  // two kept weights per iteration: independent loads in flight while the FMAs retire
  for (; j + 1 < e; j += 2) {
    const float* p0 = B + (int64_t)col[j] * ld;
    const float* p1 = B + (int64_t)col[j + 1] * ld;
    const __m512 v0 = _mm512_set1_ps(val[j]);
    const __m512 v1 = _mm512_set1_ps(val[j + 1]);
    for (int i = 0; i < NV - 1; ++i) {
      acc[i] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 16 * i), acc[i]);
      acc[i] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(p1 + 16 * i), acc[i]);
    }
    acc[NV - 1] = _mm512_fmadd_ps(v0, _mm512_maskz_loadu_ps(last, p0 + 16 * (NV - 1)),
                                  acc[NV - 1]);
    acc[NV - 1] = _mm512_fmadd_ps(v1, _mm512_maskz_loadu_ps(last, p1 + 16 * (NV - 1)),
                                  acc[NV - 1]);
  }
  for (; j < e; ++j) {
    const float* p0 = B + (int64_t)col[j] * ld;
    const __m512 v0 = _mm512_set1_ps(val[j]);
    for (int i = 0; i < NV - 1; ++i)
      acc[i] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(p0 + 16 * i), acc[i]);
    acc[NV - 1] = _mm512_fmadd_ps(v0, _mm512_maskz_loadu_ps(last, p0 + 16 * (NV - 1)),
                                  acc[NV - 1]);
  }
  for (int i = 0; i < NV - 1; ++i) _mm512_storeu_ps(out + 16 * i, acc[i]);
  _mm512_mask_storeu_ps(out + 16 * (NV - 1), last, acc[NV - 1]);
}

inline void spmm_row(const int32_t* col, const float* val, int64_t b, int64_t e,
                     const float* B, int64_t M, float* out) {
  for (int64_t m0 = 0; m0 < M; m0 += 64) {
    const int64_t len = std::min<int64_t>(64, M - m0);
    const int nv = (int)((len + 15) / 16);
    const int rem = (int)(len - 16 * (nv - 1));
    const __mmask16 last = (__mmask16)((rem == 16) ? 0xFFFF : ((1u << rem) - 1));
    switch (nv) {
      case 4: axpy_block<4>(col, val, b, e, B + m0, M, out + m0, last); break;
      case 3: axpy_block<3>(col, val, b, e, B + m0, M, out + m0, last); break;
      case 2: axpy_block<2>(col, val, b, e, B + m0, M, out + m0, last); break;
      default: axpy_block<1>(col, val, b, e, B + m0, M, out + m0, last); break;
    }
  }
}

inline float dot(const float* a, const float* b, int64_t M) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t m = 0;
  for (; m + 32 <= M; m += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + m), _mm512_loadu_ps(b + m), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + m + 16), _mm512_loadu_ps(b + m + 16), s1);
  }
  for (; m < M; m += 16) {
    const int rem = (int)std::min<int64_t>(16, M - m);
    const __mmask16 k = (__mmask16)((rem == 16) ? 0xFFFF : ((1u << rem) - 1));
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + m), _mm512_maskz_loadu_ps(k, b + m), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#else
// Portable code: the compiler vectorises the inner loops over the contiguous batch.
inline void spmm_row(const int32_t* col, const float* val, int64_t b, int64_t e,
                     const float* B, int64_t M, float* out) {
  for (int64_t m = 0; m < M; ++m) out[m] = 0.f;
  for (int64_t j = b; j < e; ++j) {
    const float v = val[j];
    const float* p = B + (int64_t)col[j] * M;
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) out[m] += v * p[m];
  }
}

inline float dot(const float* a, const float* b, int64_t M) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t m = 0; m < M; ++m) s += a[m] * b[m];
  return s;
}
#endif

}  // namespace

// out [R, M] = CSR(row_ptr [R+1], col_idx [nnz], values [nnz]) @ B [C, M]
torch::Tensor spmm(const torch::Tensor& row_ptr, const torch::Tensor& col_idx,
                   const torch::Tensor& values, const torch::Tensor& B, torch::Tensor out) {
  check(row_ptr, "row_ptr", torch::kInt32, 1);
  check(col_idx, "col_idx", torch::kInt32, 1);
  check(values, "values", torch::kFloat32, 1);
  check(B, "B", torch::kFloat32, 2);
  check(out, "out", torch::kFloat32, 2);
  const int64_t R = row_ptr.numel() - 1, M = B.size(1);
  TORCH_CHECK(out.size(0) == R && out.size(1) == M, "out: expected shape [", R, ", ", M,
              "], got ", out.sizes());
  TORCH_CHECK(values.numel() == col_idx.numel(), "values: expected ", col_idx.numel(),
              " entries, got ", values.numel());
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const float* v = values.data_ptr<float>();
  const float* b = B.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (M == 0) return out;
  const bool par = col_idx.numel() * M >= kParallelGrain;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads()) if (par)
  for (int64_t r = 0; r < R; ++r) spmm_row(ci, v, rp[r], rp[r + 1], b, M, o + r * M);
  return out;
}

// out [nnz] = for each kept (r, c): dot(A[r, :], B[c, :]);  A [R, M], B [C, M]
torch::Tensor sddmm(const torch::Tensor& row_ptr, const torch::Tensor& col_idx,
                    const torch::Tensor& A, const torch::Tensor& B, torch::Tensor out) {
  check(row_ptr, "row_ptr", torch::kInt32, 1);
  check(col_idx, "col_idx", torch::kInt32, 1);
  check(A, "A", torch::kFloat32, 2);
  check(B, "B", torch::kFloat32, 2);
  check(out, "out", torch::kFloat32, 1);
  const int64_t R = row_ptr.numel() - 1, M = A.size(1);
  TORCH_CHECK(A.size(0) == R, "A: expected ", R, " rows, got ", A.size(0));
  TORCH_CHECK(B.size(1) == M, "B: expected ", M, " columns, got ", B.size(1));
  TORCH_CHECK(out.numel() == col_idx.numel(), "out: expected ", col_idx.numel(),
              " entries, got ", out.numel());
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const float* a = A.data_ptr<float>();
  const float* b = B.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const bool par = col_idx.numel() * M >= kParallelGrain;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads()) if (par)
  for (int64_t r = 0; r < R; ++r) {
    const float* ar = a + r * M;
    for (int64_t j = rp[r]; j < rp[r + 1]; ++j) o[j] = dot(ar, b + (int64_t)ci[j] * M, M);
  }
  return out;
}

// scatter values [nnz] into a zeroed dense [numel] tensor at flat positions (the dense-storage
// weight gradient); parallel over chunks of the flat index (ascending, so writes stream).
torch::Tensor scatter_dense(const torch::Tensor& flat_idx, const torch::Tensor& values,
                            torch::Tensor out) {
  check(flat_idx, "flat_idx", torch::kInt64, 1);
  check(values, "values", torch::kFloat32, 1);
  check(out, "out", torch::kFloat32, 1);
  TORCH_CHECK(values.numel() == flat_idx.numel(), "values: expected ", flat_idx.numel(),
              " entries, got ", values.numel());
  const int64_t* fi = flat_idx.data_ptr<int64_t>();
  const float* v = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = out.numel(), nnz = values.numel();
  // zero and fill in one pass per thread over its slice of the dense output
#pragma omp parallel num_threads(threads()) if (n >= 4 * kParallelGrain)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int t = 0, T = 1;
#endif
    const int64_t lo = n * t / T, hi = n * (t + 1) / T;
    std::fill(o + lo, o + hi, 0.f);
    int64_t j = std::lower_bound(fi, fi + nnz, lo) - fi;
    for (; j < nnz && fi[j] < hi; ++j) o[fi[j]] = v[j];
  }
  return out;
}

namespace {

// Large CPU weight gradients (sparsekern/ops/_fresh.py) live in 2 MiB-aligned anonymous mappings
// advised MADV_HUGEPAGE, and a freed one is kept for the next gradient of its size class. Why:
// torch's allocator hands a 151 MB gradient straight from mmap every step, and each first touch
// of a 4 KiB page faults (36,864 faults; on this project's VM a fresh 67 MB gradient's faults
// cost 6 to 90 ms, measured). A reused mapping takes no
// fault at all; a new one takes 2 MiB faults. At most kPoolBytes stay mapped while unused
// (release_pool() unmaps them), the way torch's CUDA caching allocator keeps freed blocks.
constexpr size_t kHuge = size_t(1) << 21;
constexpr size_t kPoolBytes = size_t(2) << 30;

struct Pool {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free;  // mapping length -> mapping bases
  size_t bytes = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed after static teardown
  return *p;
}

float* aligned(void* base) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  return reinterpret_cast<float*>((b + kHuge - 1) & ~(uintptr_t(kHuge) - 1));
}

#if defined(__linux__)
void give_back(void* base, size_t len) {
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.bytes + len <= kPoolBytes) {
      p.free[len].push_back(base);
      p.bytes += len;
      return;
    }
  }
  munmap(base, len);
}
#endif

// A [numel] fp32 CPU tensor on a pooled or new mapping; zero=true: exactly zero (a new mapping
// reads as zeros; a reused one is cleared by the threads). Undefined where mmap fails.
torch::Tensor pooled(int64_t numel, bool zero) {
#if defined(__linux__)
  TORCH_CHECK(numel >= 0, "numel: expected >= 0, got ", numel);
  const size_t bytes = std::max<size_t>(size_t(numel) * sizeof(float), 1);
  const size_t span = (bytes + kHuge - 1) & ~(kHuge - 1);
  const size_t len = span + kHuge;  // room to start on a 2 MiB boundary
  void* base = nullptr;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free.find(len);
    if (it != p.free.end() && !it->second.empty()) {
      base = it->second.back();
      it->second.pop_back();
      p.bytes -= len;
    }
  }
  float* o;
  if (base != nullptr) {
    o = aligned(base);
    if (zero) {
      const int64_t n = numel, chunk = int64_t(1) << 18;
#pragma omp parallel for schedule(static) num_threads(threads()) if (n >= 4 * chunk)
      for (int64_t lo = 0; lo < n; lo += chunk)
        std::fill(o + lo, o + std::min(n, lo + chunk), 0.f);
    }
  } else {
    base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return torch::Tensor();
    o = aligned(base);
#ifdef MADV_HUGEPAGE
    madvise(o, span, MADV_HUGEPAGE);  // advice: failure is harmless
#endif
  }
  return torch::from_blob(
      o, {numel}, [base, len](void*) { give_back(base, len); },
      torch::TensorOptions().dtype(torch::kFloat32));
#else
  return torch::Tensor();
#endif
}

torch::Tensor zeros_fresh_or_filled(int64_t numel) {
  torch::Tensor out = pooled(numel, true);
  return out.defined() ? out : torch::zeros({numel}, torch::kFloat32);
}

torch::Tensor empty_pooled(int64_t numel) {
  torch::Tensor out = pooled(numel, false);
  return out.defined() ? out : torch::empty({numel}, torch::kFloat32);
}

// Unmaps every kept mapping; returns the bytes released.
int64_t release_pool() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  int64_t released = 0;
#if defined(__linux__)
  for (auto& [len, bases] : p.free) {
    for (void* base : bases) munmap(base, len);
    released += int64_t(len * bases.size());
  }
#endif
  p.free.clear();
  p.bytes = 0;
  return released;
}

int64_t pool_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return int64_t(p.bytes);
}

}  // namespace

// A zero [numel] tensor (pooled, as above) with values scattered at flat positions.
torch::Tensor scatter_fresh(const torch::Tensor& flat_idx, const torch::Tensor& values,
                            int64_t numel) {
  check(flat_idx, "flat_idx", torch::kInt64, 1);
  check(values, "values", torch::kFloat32, 1);
  TORCH_CHECK(values.numel() == flat_idx.numel(), "values: expected ", flat_idx.numel(),
              " entries, got ", values.numel());
  torch::Tensor out = zeros_fresh_or_filled(numel);
  const int64_t* fi = flat_idx.data_ptr<int64_t>();
  const float* v = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t nnz = values.numel();
  // threads split the (ascending) flat index, so each faults in its own pages
#pragma omp parallel for schedule(static) num_threads(threads()) if (nnz >= 4 * kParallelGrain)
  for (int64_t j = 0; j < nnz; ++j) o[fi[j]] = v[j];
  return out;
}

// t [n] (fp32, contiguous, viewed as its bits) := where(mask [n], t, +0.0), in place: the mask pass
// of a weight gradient, reading the bool mask as stored (1 byte per weight). Exact where-semantics
// (kept entries keep their bits, NaN included; pruned ones become +0.0). No int32 copy of the
// mask (torch's bitwise_and_ needs one: 4 bytes per weight, cached); a 4096x9216 gradient on 2
// threads of the AVX-512 Xeon: 7.5 ms, against 12.4 ms for numpy's multiply on its bits.
torch::Tensor zero_pruned_f32_(torch::Tensor t, const torch::Tensor& mask) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              "t: expected a contiguous CPU float32 tensor, got ", t.scalar_type(), " on ",
              t.device());
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == torch::kBool &&
                  mask.is_contiguous() && mask.numel() == t.numel(),
              "mask: expected a contiguous CPU bool tensor of ", t.numel(), " entries, got ",
              mask.scalar_type(), " with ", mask.numel());
  uint32_t* bits = reinterpret_cast<uint32_t*>(t.data_ptr<float>());
  const uint8_t* keep = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const int64_t n = t.numel();
  constexpr int64_t kChunk = 1 << 14;  // 64 KiB of gradient per task
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(threads()) if (n >= 4 * kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    int64_t i = lo;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    for (; i + 16 <= hi; i += 16) {
      const __m128i k8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + i));
      const __mmask16 k = _mm_test_epi8_mask(k8, k8);
      _mm512_storeu_si512(bits + i, _mm512_maskz_loadu_epi32(k, bits + i));
    }
#endif
    for (; i < hi; ++i) bits[i] &= 0u - (uint32_t)(keep[i] != 0);
  }
  return t;
}

// values [nnz] = dense [numel] at flat positions
torch::Tensor gather_dense(const torch::Tensor& flat_idx, const torch::Tensor& dense,
                           torch::Tensor out) {
  check(flat_idx, "flat_idx", torch::kInt64, 1);
  check(dense, "dense", torch::kFloat32, 1);
  check(out, "out", torch::kFloat32, 1);
  TORCH_CHECK(out.numel() == flat_idx.numel(), "out: expected ", flat_idx.numel(),
              " entries, got ", out.numel());
  const int64_t* fi = flat_idx.data_ptr<int64_t>();
  const float* d = dense.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t nnz = out.numel();
#pragma omp parallel for schedule(static) num_threads(threads()) if (nnz >= 4 * kParallelGrain)
  for (int64_t j = 0; j < nnz; ++j) o[j] = d[fi[j]];
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("spmm", &spmm, "out = CSR @ B (batch-contiguous B)");
  m.def("sddmm", &sddmm, "out[j] = dot(A[row j], B[col j])");
  m.def("scatter_dense", &scatter_dense, "zero out, then out[flat_idx] = values");
  m.def("gather_dense", &gather_dense, "out = dense[flat_idx]");
  m.def("scatter_fresh", &scatter_fresh, "a zero tensor (pooled mapping), values at flat_idx");
  m.def("fresh_zeros", &zeros_fresh_or_filled, "a zero fp32 tensor [numel] (pooled mapping)");
  m.def("fresh_empty", &empty_pooled, "an uninitialised fp32 tensor [numel] (pooled mapping)");
  m.def("release_pool", &release_pool, "unmap the kept gradient mappings; bytes released");
  m.def("pool_bytes", &pool_bytes, "bytes of gradient mappings kept for reuse");
  m.def("zero_pruned_f32_", &zero_pruned_f32_, "t = where(mask, t, 0) in place (fp32 bits)");
}
