// Unstructured sparse conv2d training kernels (CPU, OpenMP, 16-float vectors: AVX-512 zmm with
// -march=native on this CPU, pairs of ymm on AVX2 hosts, plain SIMD elsewhere).
//
// The weight is read as CSR over [C_out, C_in*kH*kW]: only kept weights are touched. Activations
// are laid out "batch-last" (SparseProp's vectorisation over the batch), [C, H, W, Bp] with the
// batch padded to Bp (a multiple of 16) and the spatial borders zero-padded, so that every kept
// weight is one offset into that tensor and the inner loops have no bounds checks:
//
//   forward  (per output channel and output row, parallel): a register tile of T output positions
//            x NV batch vectors accumulates v * X[entry offset + position] over the row's kept
//            weights; the output is written once (SparseProp loads and stores it per weight).
//   backward (per input channel, parallel; no atomics): the transposed index (CSC, bucketed by
//            the stride phase of each tap) gathers dX = sum v * dO over the channel's kept
//            weights into a register tile, and in the same pass dW[entry] += <dO, X> over the
//            tile (each kept weight belongs to one input channel, so one thread owns it).
//
// The inputs' layout pass (NCHW -> padded [C, H, W, Bp]) is done here too; outputs (y, dX) are
// written NCHW directly from a thread-local batch-last row.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
inline float hsum(v16 v) {
  float s = 0.f;
  for (int k = 0; k < 16; ++k) s += v[k];
  return s;
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "sparse_conv2d: expected ", name,
              " float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "sparse_conv2d: expected ", name, " contiguous");
  TORCH_CHECK(t.device().is_cpu(), "sparse_conv2d: expected ", name, " on the CPU");
}

// ----------------------------------------------------------------------------- layout passes

// x [N, C, H, W] -> out [C, top+H+bottom, left+W+right, Bp], zero borders and batch padding.
at::Tensor to_batch_last(const at::Tensor& x, int64_t top, int64_t bottom, int64_t left,
                         int64_t right, int64_t Bp) {
  check_f32(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(Bp >= N && Bp % 16 == 0, "to_batch_last: expected Bp a multiple of 16 >= N");
  const int64_t Hp = top + H + bottom, Wp = left + W + right;
  auto out = at::empty({C, Hp, Wp, Bp}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t plane = H * W, chw = C * H * W;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t hp = 0; hp < Hp; ++hp) {
      float* row = dst + (c * Hp + hp) * Wp * Bp;
      const int64_t h = hp - top;
      if (h < 0 || h >= H) {
        std::memset(row, 0, sizeof(float) * Wp * Bp);
        continue;
      }
      std::memset(row, 0, sizeof(float) * left * Bp);
      std::memset(row + (left + W) * Bp, 0, sizeof(float) * right * Bp);
      float* body = row + left * Bp;
      for (int64_t w = 0; w < W; ++w)
        std::memset(body + w * Bp + N, 0, sizeof(float) * (Bp - N));
      const float* s0 = src + c * plane + h * W;
      for (int64_t n = 0; n < N; ++n) {
        const float* s = s0 + n * chw;
        for (int64_t w = 0; w < W; ++w) body[w * Bp + n] = s[w];
      }
    }
  }
  return out;
}

// ----------------------------------------------------------------------------- forward

// acc[t][v] = bias + sum_e val[e] * X[(off[e] + t*sx) * Bp + b0 + 16 v], t < T, v < NV
template <int T, int NV>
inline void fwd_tile(const float* __restrict__ X, const int64_t* __restrict__ off,
                     const float* __restrict__ val, int64_t e0, int64_t e1, int64_t sxBp,
                     float bias, float* __restrict__ out, int64_t Bp) {
  v16 acc[T][NV];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[t][v] = v16{} + bias;
  for (int64_t e = e0; e < e1; ++e) {
    const float* xp = X + off[e];
    const v16 w = v16{} + val[e];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[t][v] += w * load(xp + t * sxBp + 16 * v);
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(out + t * Bp + 16 * v, acc[t][v]);
}

template <int NV>
void fwd_row(const float* X, const int64_t* off, const float* val, int64_t e0, int64_t e1,
             int64_t OW, int64_t sxBp, float bias, float* out, int64_t Bp) {
  // 24 of the 32 zmm registers hold accumulators (T * NV); a tail runs one position at a time.
  constexpr int T = NV == 1 ? 16 : NV == 2 ? 12 : NV == 3 ? 8 : 6;
  int64_t q = 0;
  for (; q + T <= OW; q += T)
    fwd_tile<T, NV>(X + q * sxBp, off, val, e0, e1, sxBp, bias, out + q * Bp, Bp);
  for (; q < OW; ++q)
    fwd_tile<1, NV>(X + q * sxBp, off, val, e0, e1, sxBp, bias, out + q * Bp, Bp);
}

// A [W, Bp] batch-last row (L1-resident) -> row h of channel c of NCHW out, batches n < N.
inline void store_row_nchw(const float* __restrict__ rb, int64_t W, int64_t Bp, int64_t N,
                           float* __restrict__ dst, int64_t chw) {
  for (int64_t n = 0; n < N; ++n) {
    float* d = dst + n * chw;
    for (int64_t w = 0; w < W; ++w) d[w] = rb[w * Bp + n];
  }
}

// Xp [C_in, Hp, Wp, Bp] (padded). row_ptr [C_out+1]; off[e] = ((ic*Hp + i*dh)*Wp + j*dw)*Bp.
// Returns y [N, C_out, OH, OW]: each output row is computed batch-last in a thread-local buffer,
// then written once, transposed (no batch-last output tensor, no extra pass over it).
at::Tensor forward(const at::Tensor& Xp, const at::Tensor& row_ptr, const at::Tensor& off,
                   const at::Tensor& val, const c10::optional<at::Tensor>& bias, int64_t N,
                   int64_t OH, int64_t OW, int64_t sh, int64_t sw) {
  check_f32(Xp, "Xp");
  check_f32(val, "values");
  const int64_t Wp = Xp.size(2), Bp = Xp.size(3);
  const int64_t OC = row_ptr.size(0) - 1;
  auto out = at::empty({N, OC, OH, OW}, Xp.options());
  const float* X = Xp.data_ptr<float>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* of = off.data_ptr<int64_t>();
  const float* vl = val.data_ptr<float>();
  const float* bs = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* O = out.data_ptr<float>();
  const int64_t sxBp = sw * Bp, chw = OC * OH * OW;
#pragma omp parallel
  {
    std::vector<float> rowbuf(OW * Bp);
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t oc = 0; oc < OC; ++oc) {
      for (int64_t p = 0; p < OH; ++p) {
        const float b = bs ? bs[oc] : 0.f;
        float* orow = rowbuf.data();
        const float* xrow = X + p * sh * Wp * Bp;
        for (int64_t b0 = 0; b0 < Bp; b0 += 64) {
          const int64_t nv = std::min<int64_t>(4, (Bp - b0) / 16);
          const float* xb = xrow + b0;
          float* ob = orow + b0;
          switch (nv) {
            case 1: fwd_row<1>(xb, of, vl, rp[oc], rp[oc + 1], OW, sxBp, b, ob, Bp); break;
            case 2: fwd_row<2>(xb, of, vl, rp[oc], rp[oc + 1], OW, sxBp, b, ob, Bp); break;
            case 3: fwd_row<3>(xb, of, vl, rp[oc], rp[oc + 1], OW, sxBp, b, ob, Bp); break;
            default: fwd_row<4>(xb, of, vl, rp[oc], rp[oc + 1], OW, sxBp, b, ob, Bp); break;
          }
        }
        store_row_nchw(orow, OW, Bp, N, O + (oc * OH + p) * OW, chw);
      }
    }
  }
  return out;
}

// ----------------------------------------------------------------------------- backward

// One tile of T input positions (stride sx between them in X, consecutive in dO) x NV vectors:
//   dX[t][v] = sum_e val[e] * dO[(doff[e] + t) * Bp + 16 v]
//   dwv[e]  += sum_{t,v} dO[...] * X[t][v]                     (only when need_dw)
template <int T, int NV, bool DW>
inline void bwd_tile(const float* __restrict__ X, const float* __restrict__ dO,
                     const int64_t* __restrict__ doff, const float* __restrict__ val,
                     int64_t e0, int64_t e1, int64_t sxBp, int64_t Bp,
                     float* __restrict__ dX, int64_t dxBp, v16* __restrict__ dwv) {
  v16 acc[T][NV];
  v16 xs[DW ? T : 1][NV];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[t][v] = v16{};
      if (DW) xs[DW ? t : 0][v] = load(X + t * sxBp + 16 * v);
    }
  for (int64_t e = e0; e < e1; ++e) {
    const float* gp = dO + doff[e];
    const v16 w = v16{} + val[e];
    v16 d0 = v16{}, d1 = v16{};
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const v16 g = load(gp + t * Bp + 16 * v);
        acc[t][v] += w * g;
        if (DW) {
          if ((t * NV + v) & 1)
            d1 += g * xs[DW ? t : 0][v];
          else
            d0 += g * xs[DW ? t : 0][v];
        }
      }
    if (DW) dwv[e - e0] += d0 + d1;
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(dX + t * dxBp + 16 * v, acc[t][v]);
}

template <int NV, bool DW>
void bwd_run(const float* X, const float* dO, const int64_t* doff, const float* val, int64_t e0,
             int64_t e1, int64_t count, int64_t sxBp, int64_t Bp, float* dX, int64_t dxBp,
             v16* dwv) {
  // T * NV accumulators + T * NV kept X vectors (dW) must fit the 32 registers.
  constexpr int T = DW ? (NV == 1 ? 8 : NV == 2 ? 5 : NV == 3 ? 3 : 2)
                       : (NV == 1 ? 16 : NV == 2 ? 12 : NV == 3 ? 8 : 6);
  int64_t t = 0;
  for (; t + T <= count; t += T)
    bwd_tile<T, NV, DW>(X + t * sxBp, dO + t * Bp, doff, val, e0, e1, sxBp, Bp,
                        dX + t * dxBp, dxBp, dwv);
  for (; t < count; ++t)
    bwd_tile<1, NV, DW>(X + t * sxBp, dO + t * Bp, doff, val, e0, e1, sxBp, Bp,
                        dX + t * dxBp, dxBp, dwv);
}

// Xp [C_in, Hp, Wp, Bp] (the forward's padded input, pads ph/pw), dOp [C_out, OHp, OWp, Bp]
// (dO with Ah/Aw zero rows/cols before it, zeros after). The index is CSC (per input channel),
// bucketed by stride phase: col_ptr [C_in * sh * sw + 1] over entries sorted by
// (ic, (i*dh) % sh, (j*dw) % sw); doff[e] = ((oc*OHp + Ah - (i*dh)/sh)*OWp + Aw - (j*dw)/sw)*Bp;
// the weight of entry e is val[perm[e]] (val in CSR order), its place in the dense weight
// flat[e]. Returns dX [N, C_in, H, W] (if need_dx) and the dense dW [weight_numel] (if
// need_dw), zero except at the kept entries, the only ones computed.
std::vector<at::Tensor> backward(const at::Tensor& Xp, const at::Tensor& dOp,
                                 const at::Tensor& col_ptr, const at::Tensor& doff,
                                 const at::Tensor& perm, const at::Tensor& flat,
                                 const at::Tensor& val, int64_t N, int64_t H, int64_t W,
                                 int64_t weight_numel, int64_t ph, int64_t pw, int64_t sh,
                                 int64_t sw, bool need_dx, bool need_dw) {
  check_f32(Xp, "Xp");
  check_f32(dOp, "dOp");
  check_f32(val, "values");
  const int64_t IC = Xp.size(0), Hp = Xp.size(1), Wp = Xp.size(2), Bp = Xp.size(3);
  const int64_t OWp = dOp.size(2);
  TORCH_CHECK(dOp.size(3) == Bp, "sparse_conv2d backward: batch padding mismatch");
  auto dx = at::empty({need_dx ? N : 0, IC, H, W}, Xp.options());
  auto dw = at::zeros({need_dw ? weight_numel : 0}, Xp.options());
  const float* X = Xp.data_ptr<float>();
  const float* G = dOp.data_ptr<float>();
  const int64_t* cp = col_ptr.data_ptr<int64_t>();
  const int64_t* of = doff.data_ptr<int64_t>();
  const int64_t* pm = perm.data_ptr<int64_t>();
  const int64_t* fl = flat.data_ptr<int64_t>();
  const float* vcsr = val.data_ptr<float>();
  float* DX = need_dx ? dx.data_ptr<float>() : nullptr;
  float* DW = need_dw ? dw.data_ptr<float>() : nullptr;
  const int64_t S = sh * sw;
  const int64_t sxBp = sw * Bp, chw = IC * H * W;
#pragma omp parallel
  {
    std::vector<v16> dwv;
    std::vector<float> vals;                 // this channel's weights, CSC order
    std::vector<float> rowbuf(W * Bp + 16);  // one dX row, batch-last
#pragma omp for schedule(dynamic, 1)
    for (int64_t ic = 0; ic < IC; ++ic) {
      const int64_t c0 = cp[ic * S], c1 = cp[(ic + 1) * S];
      if (need_dw) dwv.assign(c1 - c0, v16{});
      vals.resize(c1 - c0 + 1);
      for (int64_t e = c0; e < c1; ++e) vals[e - c0] = vcsr[pm[e]];
      const float* vl = vals.data() - c0;  // indexed by e
      for (int64_t h = 0; h < H; ++h) {
        const int64_t hp = h + ph;
        const int64_t a = hp % sh, m = hp / sh;
        for (int64_t b = 0; b < sw; ++b) {
          // input columns w with (w + pw) % sw == b: w = wstart, wstart + sw, ...
          int64_t wstart = ((b - pw) % sw + sw) % sw;
          if (wstart >= W) continue;
          const int64_t count = (W - 1 - wstart) / sw + 1;
          const int64_t n0 = (wstart + pw) / sw;
          const int64_t e0 = cp[ic * S + a * sw + b], e1 = cp[ic * S + a * sw + b + 1];
          const float* xrow = X + ((ic * Hp + hp) * Wp + wstart + pw) * Bp;
          float* dxrow = rowbuf.data() + wstart * Bp;
          const float* grow = G + (m * OWp + n0) * Bp;
          v16* dwb = need_dw ? dwv.data() + (e0 - c0) : nullptr;
          for (int64_t b0 = 0; b0 < Bp; b0 += 64) {
            const int64_t nv = std::min<int64_t>(4, (Bp - b0) / 16);
            const float* xb = xrow + b0;
            const float* gb = grow + b0;
            float* db = dxrow + b0;
#define SK_BWD(NVV)                                                                         \
  if (need_dw)                                                                              \
    bwd_run<NVV, true>(xb, gb, of, vl, e0, e1, count, sxBp, Bp, db, sw * Bp, dwb);          \
  else                                                                                      \
    bwd_run<NVV, false>(xb, gb, of, vl, e0, e1, count, sxBp, Bp, db, sw * Bp, dwb);
            switch (nv) {
              case 1: SK_BWD(1) break;
              case 2: SK_BWD(2) break;
              case 3: SK_BWD(3) break;
              default: SK_BWD(4) break;
            }
#undef SK_BWD
          }
        }
        if (need_dx) store_row_nchw(rowbuf.data(), W, Bp, N, DX + (ic * H + h) * W, chw);
      }
      if (need_dw)
        for (int64_t e = c0; e < c1; ++e) DW[fl[e]] = hsum(dwv[e - c0]);
    }
  }
  (void)Hp;
  return {dx, dw};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("to_batch_last", &to_batch_last, "NCHW -> padded [C, H, W, Bp]");
  m.def("forward", &forward, "sparse conv2d forward, batch-last");
  m.def("backward", &backward, "sparse conv2d dX and dW (kept weights only), batch-last");
}
