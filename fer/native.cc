// CPU kernels for fer, as XLA FFI calls (built and registered by fer/native.py).
//
// 1. Patch extraction (im2col) for the bf16 convolutions of fer/models/layers.py.
// XLA:CPU builds patches from a pad, nine shifted slices and a concatenate, plus bitcasts that it
// turns into copies when they change the element width; these kernels write the patches in one
// pass at memory speed (3-4x faster per layer, the whole training step ~1.25x on a 2-core CPU:
// experiments/benchmark_conv.py). They only move 16-bit words, so the result is bit-identical to
// the XLA version (tests/native_test.py).
//
// x: [B..., N, H, W, C] of 16-bit words (leading dims B... come from jax.vmap, "broadcast_all").
// fer_patches:   out [B..., N*H*W, kh*kw*C]   (row (n, y, x), column (i, j, c) like HWIO)
// fer_patches_t: out [B..., kh*kw*C, N*H*W]   (the transposed patches: a row-major matmul operand)
// Stride 1; zero padding `pt` rows above and `pl` columns left, the rest below/right so that the
// output keeps H x W.
//
// 2. Bilinear resampling for fer/augment.py's random affine transforms, in place of XLA:CPU's
// four gathers: about as fast alone (0.4 ms for 64 faces), ~4 ms less inside the training step
// (experiments/results/benchmark_conv.md). Same formula, same fp32 operation order (built with
// -ffp-contract=off, so no fused multiply-adds).
// fer_bilinear: images [B..., H, W, C] f32, src_y, src_x [B..., H, W] f32 (where each output
// pixel samples; clamped to the image) -> out [B..., H, W, C] f32.
//
// 3. The first layer's convolution (one input channel: a grayscale face), fp32, SAME, stride 1,
// and its weight gradient. XLA:CPU runs this layer as a 1-channel convolution plus transposes
// for its gradient, ~4.7 ms of the reference CNN's 61 ms step; here each output pixel's
// channels stay in vector registers across the kh*kw taps, and the weight gradient sums
// per-image partials in image order (deterministic whatever the threads do).
// fer_conv_c1:       x [B..., N, H, W, 1], w [B..., kh, kw, 1, O], b [B..., O]
//                    -> y [B..., N, H, W, O] (the convolution plus the bias b)
// fer_conv_c1_wgrad: x [B..., N, H, W, 1], g [B..., N, H, W, O]
//                    -> dw [B..., kh, kw, 1, O], db [B..., O] (the sums of g over pixels)
// Each B... index uses its own w and b (vmapped models). Taps are summed in row-major order from
// 0, then b is added (no fused multiply-adds): equal to XLA's convolution + bias to float
// rounding.
//
// 4. The first block of a CNN without batch norm, fused: the convolution above, 2x2/stride-2 max
// pooling (VALID: an odd last row/column is dropped) and the ReLU, fp32. Unfused, the first
// layer's 64x48x48x32 activation is written, pooled, and its gradient (zeros but for one pixel
// per window) written and read again: ~5 ms of the reference CNN's 55 ms step. Here the forward
// pass writes the pooled values and, per output, the position of the window's first maximum
// (row-major 0..3, the tie rule of nn.max_pool's select-and-scatter), or 4 where no gradient
// flows (a NaN maximum, or one <= 0 under the ReLU); the weight gradient routes the output
// gradient through those positions pixel by pixel. Bit for bit the same as fer_conv_c1, the
// reshape max pool and fer_conv_c1_wgrad of the routed gradient.
// fer_conv_c1_pool:       x, w, b as fer_conv_c1 -> y [B..., N, H/2, W/2, O] f32 and pos (same
//                         shape) s8; attr relu: y = max(maximum, 0), no gradient at 0
// fer_conv_c1_pool_wgrad: x, pos, g [B..., N, H/2, W/2, O] -> dw, db as fer_conv_c1_wgrad

// 5. Direct bf16 convolution (stride 1, size-keeping padding) for CPUs with AVX-512 BF16: the
// forward pass and input gradient of layers.conv_gemm_bf16 without building patches. Each block
// of MR output pixels x OB output channels lives in AVX-512 registers across all kh*kw*C taps,
// which vdpbf16ps consumes two input channels at a time (bf16 products summed in fp32): each of
// the reference CNN's 1.36-GFLOP layers runs forward in 3.4-4.6 ms on 2 cores, against 3.8-5.7
// ms for the patches + YNNPACK's matmul of these narrow shapes (benchmark_conv.md). Same inputs
// as the patch matmul (bf16), fp32 sums in another order (~1e-6 relative apart).
// The weight gradient likewise sums pixels two at a time (pairs of pixels interleaved per image
// in cache, instead of the transposed patches in memory).
// fer_conv_bf16:       x [B..., N, H, W, C] bf16 (C even), w [B..., kh, kw, C, O] bf16 (O a
//                      multiple of 16) -> y [B..., N, H, W, O] f32
// fer_conv_bf16_wgrad: x [B..., N, H, W, C], g [B..., N, H, W, O] bf16 (C, O multiples of 16)
//                      -> dw [B..., kh, kw, C, O] f32 (partial sums per thread's fixed range of
//                      images, added in range order)
// FerBf16ConvSupported() (a plain C function) says whether the CPU can run them; the callers
// keep the patch path where it can't.
//
// 6. Winograd F(2x2, 3x3) bf16 convolution (same CPUs): the forward pass and input gradient of
// layers.conv_gemm_bf16's 3x3 layers for conv_impl=winograd_bf16, 0.45x the multiplications of
// the direct kernel above, 1.4-2.1x faster per layer of the strong config; the rounding of the
// transformed tiles and kernels to bf16 adds error (relative 4e-3 against exact fp32, the
// direct kernel's 2.4e-3). Details above ConvWinoBf16.
// fer_conv_wino_bf16: x [B..., N, H, W, C] bf16 (H, W even; C a multiple of 16), w [B..., 3, 3,
//                     C, O] bf16 (O a multiple of 16) -> y [B..., N, H, W, O] f32 (SAME)

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Runs body(lo, hi) over [0, n) in chunks on XLA's intra-op pool and the calling thread. Chunks
// are claimed from a shared counter, so the caller finishes the work alone when the pool is busy
// (no deadlock when every pool thread is itself inside such a call).
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t bytes,
                 const std::function<void(int64_t, int64_t)>& body) {
  const int64_t by_size = std::max<int64_t>(1, bytes / (256 << 10));
  const int64_t parts = std::min({n, by_size, std::max<int64_t>(1, pool.num_threads())});
  if (parts <= 1) {
    body(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const int64_t per = (n + parts - 1) / parts;
  // Workers only touch `body` (the caller's frame) for chunks they claimed, and the caller
  // waits for every claimed chunk, so a worker that starts late finds nothing and just exits.
  auto work = [state, parts, per, n, &body]() {
    for (int64_t p; (p = state->next.fetch_add(1)) < parts;) {
      body(p * per, std::min(n, (p + 1) * per));
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == parts) state->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < parts; ++t) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == parts; });
}

using dims_t = ffi::Span<const int64_t>;

struct Geometry {
  int64_t images, h, w, c;  // images = B... x N
};

ffi::Error Check(const ffi::AnyBuffer& x, const ffi::AnyBuffer& out, int64_t kh, int64_t kw,
                 int64_t pt, int64_t pl, Geometry& g) {
  auto d = x.dimensions();
  if (d.size() < 4)
    return ffi::Error::InvalidArgument("fer patches: x must be [..., N, H, W, C]");
  if (ffi::ByteWidth(x.element_type()) != 2 || ffi::ByteWidth(out.element_type()) != 2)
    return ffi::Error::InvalidArgument("fer patches: x and the output must be 16-bit");
  if (kh < 1 || kw < 1 || pt < 0 || pl < 0 || pt >= kh || pl >= kw)
    return ffi::Error::InvalidArgument("fer patches: bad kernel size or padding");
  g = Geometry{1, d[d.size() - 3], d[d.size() - 2], d[d.size() - 1]};
  for (size_t k = 0; k + 3 < d.size(); ++k) g.images *= d[k];
  if (static_cast<int64_t>(out.element_count()) != g.images * g.h * g.w * kh * kw * g.c)
    return ffi::Error::InvalidArgument("fer patches: output size does not match x");
  return ffi::Error::Success();
}

ffi::Error Patches(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out,
                   int64_t kh, int64_t kw, int64_t pt, int64_t pl) {
  Geometry g;
  if (ffi::Error e = Check(x, *out, kh, kw, pt, pl, g); e.failure()) return e;
  const auto [images, H, W, C] = g;
  const int64_t K = kh * kw * C;
  const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
  uint16_t* dst = static_cast<uint16_t*>(out->untyped_data());
  ParallelFor(pool, images, images * H * W * K * 2, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* s = src + n * H * W * C;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) {
          uint16_t* o = dst + ((n * H + y) * W + xx) * K;
          const bool inside_x = xx - pl >= 0 && xx - pl + kw <= W;
          for (int64_t i = 0; i < kh; ++i, o += kw * C) {
            const int64_t yy = y + i - pt;
            if (yy < 0 || yy >= H) {
              std::fill(o, o + kw * C, uint16_t{0});
            } else if (inside_x) {  // the kw pixels of this kernel row are adjacent in x
              const uint16_t* row = s + (yy * W + xx - pl) * C;
              std::copy(row, row + kw * C, o);
            } else {
              for (int64_t j = 0; j < kw; ++j) {
                const int64_t x2 = xx + j - pl;
                if (x2 < 0 || x2 >= W)
                  std::fill(o + j * C, o + (j + 1) * C, uint16_t{0});
                else
                  std::copy(s + (yy * W + x2) * C, s + (yy * W + x2 + 1) * C, o + j * C);
              }
            }
          }
        }
    }
  });
  return ffi::Error::Success();
}

// H rows of W words, read at a stride of Wp, written back to back.
template <int64_t W>
inline void CopyRows(uint16_t* o, const uint16_t* q, int64_t H, int64_t Wp) {
  for (int64_t y = 0; y < H; ++y, o += W, q += Wp) std::memcpy(o, q, W * sizeof(uint16_t));
}

ffi::Error PatchesT(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out,
                    int64_t kh, int64_t kw, int64_t pt, int64_t pl) {
  Geometry g;
  if (ffi::Error e = Check(x, *out, kh, kw, pt, pl, g); e.failure()) return e;
  const auto [images, H, W, C] = g;
  const int64_t N = x.dimensions()[x.dimensions().size() - 4];
  const int64_t Hp = H + kh - 1, Wp = W + kw - 1, HW = H * W, NHW = N * HW, K = kh * kw * C;
  const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
  uint16_t* dst = static_cast<uint16_t*>(out->untyped_data());
  ParallelFor(pool, images, images * HW * K * 2, [&](int64_t n0, int64_t n1) {
    // One image at a time: transpose it to a zero-padded [C, Hp, Wp] plane stack, then copy
    // each (i, j, c) window into its output row.
    std::vector<uint16_t> t(C * Hp * Wp, 0);
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* s = src + n * HW * C;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t y = 0; y < H; ++y) {
          const uint16_t* p = s + y * W * C + c;
          uint16_t* q = t.data() + (c * Hp + y + pt) * Wp + pl;
          for (int64_t xx = 0; xx < W; ++xx) q[xx] = p[xx * C];
        }
      // Output [b, k, n', y, x] with images = (b, n').
      uint16_t* base = dst + (n / N) * K * NHW + (n % N) * HW;
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j)
          for (int64_t c = 0; c < C; ++c) {
            uint16_t* o = base + ((i * kw + j) * C + c) * NHW;
            const uint16_t* q = t.data() + c * Hp * Wp + i * Wp + j;
            // Many short rows: a compile-time width for the usual sizes (the pyramid of a
            // 48x48 face) turns each row into a few straight vector moves.
            switch (W) {
              case 48: CopyRows<48>(o, q, H, Wp); break;
              case 24: CopyRows<24>(o, q, H, Wp); break;
              case 12: CopyRows<12>(o, q, H, Wp); break;
              case 6: CopyRows<6>(o, q, H, Wp); break;
              case 3: CopyRows<3>(o, q, H, Wp); break;
              default:
                for (int64_t y = 0; y < H; ++y, o += W, q += Wp) std::copy(q, q + W, o);
            }
          }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Bilinear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images,
                    ffi::Buffer<ffi::F32> src_y, ffi::Buffer<ffi::F32> src_x,
                    ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto d = images.dimensions();
  if (d.size() < 3 || src_y.element_count() != src_x.element_count() ||
      src_y.element_count() * d[d.size() - 1] != images.element_count() ||
      out->element_count() != images.element_count())
    return ffi::Error::InvalidArgument(
        "fer bilinear: expected images [..., H, W, C] and src_y, src_x [..., H, W]");
  const int64_t H = d[d.size() - 3], W = d[d.size() - 2], C = d[d.size() - 1];
  const int64_t images_n = images.element_count() / (H * W * C);
  const float* img = images.typed_data();
  const float* sy = src_y.typed_data();
  const float* sx = src_x.typed_data();
  float* dst = out->typed_data();
  ParallelFor(pool, images_n, images.element_count() * 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* im = img + n * H * W * C;
      for (int64_t p = n * H * W; p < (n + 1) * H * W; ++p) {
        const float y = std::min(std::max(sy[p], 0.0f), H - 1.0f);
        const float x = std::min(std::max(sx[p], 0.0f), W - 1.0f);
        // y, x >= 0, so truncation is floor (and needs no libm call).
        const int64_t iy0 = static_cast<int64_t>(y), ix0 = static_cast<int64_t>(x);
        const float wy = y - static_cast<float>(iy0), wx = x - static_cast<float>(ix0);
        const int64_t iy1 = std::min(iy0 + 1, H - 1), ix1 = std::min(ix0 + 1, W - 1);
        const float* g00 = im + (iy0 * W + ix0) * C;
        const float* g01 = im + (iy0 * W + ix1) * C;
        const float* g10 = im + (iy1 * W + ix0) * C;
        const float* g11 = im + (iy1 * W + ix1) * C;
        float* o = dst + p * C;
        for (int64_t c = 0; c < C; ++c) {
          const float top = g00[c] * (1 - wx) + g01[c] * wx;
          const float bottom = g10[c] * (1 - wx) + g11[c] * wx;
          o[c] = top * (1 - wy) + bottom * wy;
        }
      }
    }
  });
  return ffi::Error::Success();
}

// The hot loops, compiled for AVX-512, AVX2 and the baseline; the loader picks one per CPU.
// Vector lanes run over output channels only, so every version does the same float operations
// in the same order (and -ffp-contract=off rules out fused multiply-adds).
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    !defined(__clang__)  // target_clones needs ifunc (glibc)
#define FER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FER_CLONES
#endif

// The 2x2 max pool of four same-size channel vectors (the window's pixels in row-major order)
// into y, and into pos the position (0..3) of the first maximum: nn.max_pool's tie rule. A NaN
// anywhere wins, as in XLA's max (then no position equals it: pos 4, no gradient). With relu,
// y = max(maximum, 0) and pos 4 where the maximum is <= 0 (jax.nn.relu's gradient rule).
// Branch-free selects, so the channel loop vectorises (built with -fno-trapping-math).
__attribute__((always_inline)) inline void PoolSelect(
    const float* __restrict p0, const float* __restrict p1, const float* __restrict p2,
    const float* __restrict p3, float* __restrict y, int8_t* __restrict pos, int64_t C,
    bool relu) {
  for (int64_t ch = 0; ch < C; ++ch) {
    const float v0 = p0[ch], v1 = p1[ch], v2 = p2[ch], v3 = p3[ch];
    float m = v1 > v0 ? v1 : v0;
    m = v2 > m ? v2 : m;
    m = v3 > m ? v3 : m;
    const bool nan = (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3);
    const float any = v0 + v1 + v2 + v3;  // NaN where nan
    m = nan ? any : m;
    int32_t k = v3 == m ? 3 : 4;
    k = v2 == m ? 2 : k;
    k = v1 == m ? 1 : k;
    k = v0 == m ? 0 : k;
    if (relu) {
      const bool positive = m > 0.0f;
      k = positive ? k : 4;
      m = positive | nan ? m : 0.0f;
    }
    y[ch] = m;
    pos[ch] = static_cast<int8_t>(k);
  }
}

// One output pixel (r, c) of an image's convolution: out[o] = b[o] + sum_{i,j}
// xp[(r+i)*Wp + c+j] * w[(i*kw + j)*O + o], xp the zero-padded image [H+kh-1, W+kw-1]. With KH,
// KW, O known at compile time the whole kernel can stay in vector registers across pixels; else
// (0, 0, 0) the sizes come at run time.
template <int64_t O, int64_t KH, int64_t KW>
__attribute__((always_inline)) inline void ConvC1Pixel(const float* xp, const float* w,
                                                       const float* b, float* out, int64_t r,
                                                       int64_t c, int64_t Wp, int64_t kh_dyn,
                                                       int64_t kw_dyn, int64_t o_dyn) {
  constexpr bool kFixed = O > 0 && KH > 0 && KW > 0;
  const int64_t n_out = kFixed ? O : o_dyn, kh = kFixed ? KH : kh_dyn, kw = kFixed ? KW : kw_dyn;
  float acc[kFixed ? O : 1024];
  for (int64_t o = 0; o < n_out; ++o) acc[o] = 0.0f;
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) {
      const float v = xp[(r + i) * Wp + c + j];
      const float* wt = w + (i * kw + j) * n_out;
      for (int64_t o = 0; o < n_out; ++o) acc[o] += v * wt[o];
    }
  for (int64_t o = 0; o < n_out; ++o) out[o] = acc[o] + b[o];
}

// One image's convolution y [H, W, O].
template <int64_t O, int64_t KH, int64_t KW>
FER_CLONES void ConvC1Image(const float* xp, const float* w, const float* b, float* y, int64_t H,
                            int64_t W, int64_t kh, int64_t kw, int64_t n_out) {
  for (int64_t r = 0; r < H; ++r)
    for (int64_t c = 0; c < W; ++c)
      ConvC1Pixel<O, KH, KW>(xp, w, b, y + (r * W + c) * n_out, r, c, W + kw - 1, kh, kw, n_out);
}

// One image's convolution, 2x2 max pool (and relu): y, pos [H/2, W/2, O]. The same pixel values
// as ConvC1Image (bit for bit), pooled like layers.max_pool_2x2, without writing the full-size
// activation.
template <int64_t O, int64_t KH, int64_t KW>
FER_CLONES void ConvC1PoolImage(const float* xp, const float* w, const float* b, float* y,
                                int8_t* pos, int64_t H, int64_t W, int64_t kh, int64_t kw,
                                int64_t n_out, bool relu) {
  constexpr bool kFixed = O > 0 && KH > 0 && KW > 0;
  const int64_t Ho = H / 2, Wo = W / 2, Wp = W + kw - 1;
  float q[4][kFixed ? O : 1024];
  for (int64_t r2 = 0; r2 < Ho; ++r2)
    for (int64_t c2 = 0; c2 < Wo; ++c2) {
      for (int64_t k = 0; k < 4; ++k)
        ConvC1Pixel<O, KH, KW>(xp, w, b, q[k], 2 * r2 + k / 2, 2 * c2 + k % 2, Wp, kh, kw, n_out);
      const int64_t at = (r2 * Wo + c2) * n_out;
      PoolSelect(q[0], q[1], q[2], q[3], y + at, pos + at, n_out, relu);
    }
}

// One image's weight gradient: dw[(i*kw + j)*O + o] = sum_{r,c} xp[(r+i)*Wp + c+j] * d[(r*W+c)*O+o]
// and bias gradient db[o] = sum_{r,c} d[(r*W+c)*O+o] (pixels in row-major order), where d, the
// convolution's output gradient, is g [H, W, O] (Pooled false) or comes from a fused 2x2 max pool:
// g [H/2, W/2, O] routed by pos (d = the pool's input gradient, bit for bit, never written out).
// With the kernel size and O known at compile time (KH, KW, O > 0) the sums live in local arrays
// that the compiler keeps in vector registers; else (0, 0, 0) they accumulate in dw and db.
template <int64_t O, int64_t KH, int64_t KW, bool Pooled>
FER_CLONES void ConvC1WgradImage(const float* xp, const float* g, const int8_t* pos, float* dw,
                                 float* db, int64_t H, int64_t W, int64_t kh_dyn, int64_t kw_dyn,
                                 int64_t o_dyn) {
  constexpr bool kFixed = O > 0 && KH > 0 && KW > 0;
  const int64_t n_out = kFixed ? O : o_dyn, kh = kFixed ? KH : kh_dyn, kw = kFixed ? KW : kw_dyn;
  const int64_t Wp = W + kw - 1, Ho = H / 2, Wo = W / 2;
  float acc_local[kFixed ? KH * KW * O : 1], bacc_local[kFixed ? O : 1];
  float* acc = kFixed ? acc_local : dw;
  float* bacc = kFixed ? bacc_local : db;
  float routed[kFixed ? O : 1024];
  for (int64_t t = 0; t < kh * kw * n_out; ++t) acc[t] = 0.0f;
  for (int64_t o = 0; o < n_out; ++o) bacc[o] = 0.0f;
  for (int64_t r = 0; r < H; ++r)
    for (int64_t c = 0; c < W; ++c) {
      const float* gp;
      if (!Pooled) {
        gp = g + (r * W + c) * n_out;
      } else {
        if (r < 2 * Ho && c < 2 * Wo) {
          const int8_t k = static_cast<int8_t>(2 * (r % 2) + c % 2);
          const int64_t at = ((r / 2) * Wo + c / 2) * n_out;
          for (int64_t o = 0; o < n_out; ++o) routed[o] = pos[at + o] == k ? g[at + o] : 0.0f;
        } else {  // an odd last row or column: outside every window
          for (int64_t o = 0; o < n_out; ++o) routed[o] = 0.0f;
        }
        gp = routed;
      }
      for (int64_t o = 0; o < n_out; ++o) bacc[o] += gp[o];
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) {
          const float v = xp[(r + i) * Wp + c + j];
          float* d = acc + (i * kw + j) * n_out;
          for (int64_t o = 0; o < n_out; ++o) d[o] += v * gp[o];
        }
    }
  if (kFixed) {
    std::copy(acc, acc + kh * kw * n_out, dw);
    std::copy(bacc, bacc + n_out, db);
  }
}

// x [images, H, W] into a zero-padded [H+kh-1, W+kw-1] plane.
void PadImage(const float* x, float* xp, int64_t H, int64_t W, int64_t kh, int64_t kw,
              int64_t pt, int64_t pl) {
  const int64_t Wp = W + kw - 1;
  std::fill(xp, xp + (H + kh - 1) * Wp, 0.0f);
  for (int64_t r = 0; r < H; ++r) std::copy(x + r * W, x + (r + 1) * W, xp + (r + pt) * Wp + pl);
}

struct ConvC1Shape {
  int64_t batches, images, h, w, kh, kw, o;  // images per batch (B... x N = batches x images)
};

// Calls f(O, KH, KW) with the compile-time sizes of a specialised shape (3x3 kernels to 32 or 64
// channels: the study's first layers), else with (0, 0, 0): the kernels' run-time-size path.
template <typename F>
void WithFixedShape(const ConvC1Shape& s, F&& f) {
  using Fixed = std::integral_constant<int64_t, 0>;
  using Three = std::integral_constant<int64_t, 3>;
  if (s.kh == 3 && s.kw == 3 && s.o == 32)
    f(std::integral_constant<int64_t, 32>(), Three(), Three());
  else if (s.kh == 3 && s.kw == 3 && s.o == 64)
    f(std::integral_constant<int64_t, 64>(), Three(), Three());
  else
    f(Fixed(), Fixed(), Fixed());
}

ffi::Error CheckConvC1(const ffi::Buffer<ffi::F32>& x, dims_t w_dims, int64_t w_count,
                       int64_t pt, int64_t pl, ConvC1Shape& s, const char* what) {
  auto xd = x.dimensions();
  const size_t nb = w_dims.size() < 4 ? 0 : w_dims.size() - 4;
  if (xd.size() != nb + 4 || w_dims.size() != nb + 4 || xd[xd.size() - 1] != 1 ||
      w_dims[nb + 2] != 1)
    return ffi::Error::InvalidArgument(
        std::string(what) + ": expected x [..., N, H, W, 1] and w [..., kh, kw, 1, O]");
  s.batches = 1;
  for (size_t k = 0; k < nb; ++k) {
    if (xd[k] != w_dims[k])
      return ffi::Error::InvalidArgument(std::string(what) + ": x and w batch dims differ");
    s.batches *= xd[k];
  }
  s.images = xd[nb];
  s.h = xd[nb + 1];
  s.w = xd[nb + 2];
  s.kh = w_dims[nb];
  s.kw = w_dims[nb + 1];
  s.o = w_dims[nb + 3];
  if (s.kh < 1 || s.kw < 1 || pt < 0 || pl < 0 || pt >= s.kh || pl >= s.kw || s.o < 1 ||
      s.o > 1024 || w_count != s.batches * s.kh * s.kw * s.o)
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": bad kernel size, padding or channel count (1..1024)");
  return ffi::Error::Success();
}

// The forward pass, plain (pos null: y [..., N, H, W, O]) or with the 2x2 max pool (and relu)
// fused in (y, pos [..., N, H/2, W/2, O]).
ffi::Error ConvC1Forward(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                         const ffi::Buffer<ffi::F32>& w, const ffi::Buffer<ffi::F32>& b,
                         float* ys, int64_t y_count, int8_t* ps, int64_t p_count, int64_t pt,
                         int64_t pl, bool relu, const char* what) {
  ConvC1Shape s;
  if (ffi::Error e = CheckConvC1(x, w.dimensions(), w.element_count(), pt, pl, s, what);
      e.failure())
    return e;
  const int64_t total = s.batches * s.images, HW = s.h * s.w;
  const int64_t out_pixels = ps == nullptr ? HW : (s.h / 2) * (s.w / 2);
  if (y_count != total * out_pixels * s.o || (ps != nullptr && p_count != y_count) ||
      static_cast<int64_t>(b.element_count()) != s.batches * s.o)
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": bias or output size does not match x and w");
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  const float* bs = b.typed_data();
  ParallelFor(pool, total, total * HW * s.o * 4, [&](int64_t n0, int64_t n1) {
    std::vector<float> xp((s.h + s.kh - 1) * (s.w + s.kw - 1));
    for (int64_t n = n0; n < n1; ++n) {
      PadImage(xs + n * HW, xp.data(), s.h, s.w, s.kh, s.kw, pt, pl);
      const int64_t batch = n / s.images;
      const float* wb = ws + batch * s.kh * s.kw * s.o;
      const float* bb = bs + batch * s.o;
      float* yn = ys + n * out_pixels * s.o;
      WithFixedShape(s, [&](auto O, auto KH, auto KW) {
        if (ps == nullptr)
          ConvC1Image<O(), KH(), KW()>(xp.data(), wb, bb, yn, s.h, s.w, s.kh, s.kw, s.o);
        else
          ConvC1PoolImage<O(), KH(), KW()>(xp.data(), wb, bb, yn, ps + n * out_pixels * s.o,
                                           s.h, s.w, s.kh, s.kw, s.o, relu);
      });
    }
  });
  return ffi::Error::Success();
}

ffi::Error ConvC1(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::Buffer<ffi::F32> b, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t pt,
                  int64_t pl) {
  return ConvC1Forward(pool, x, w, b, y->typed_data(), y->element_count(), nullptr, 0, pt, pl,
                       false, "fer conv_c1");
}

ffi::Error ConvC1Pool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::F32> b, ffi::Result<ffi::Buffer<ffi::F32>> y,
                      ffi::Result<ffi::Buffer<ffi::S8>> pos, int64_t pt, int64_t pl,
                      bool relu) {
  return ConvC1Forward(pool, x, w, b, y->typed_data(), y->element_count(), pos->typed_data(),
                       pos->element_count(), pt, pl, relu, "fer conv_c1_pool");
}

// The weight and bias gradients for the output gradient g, of the plain convolution (pos null,
// g [..., N, H, W, O]) or of the fused pool (g, pos [..., N, H/2, W/2, O]).
ffi::Error ConvC1Grads(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                       const ffi::Buffer<ffi::F32>& g, const int8_t* ps, int64_t p_count,
                       ffi::Buffer<ffi::F32>& dw, ffi::Buffer<ffi::F32>& db, int64_t pt,
                       int64_t pl, const char* what) {
  ConvC1Shape s;
  if (ffi::Error e = CheckConvC1(x, dw.dimensions(), dw.element_count(), pt, pl, s, what);
      e.failure())
    return e;
  const int64_t total = s.batches * s.images, HW = s.h * s.w, K = s.kh * s.kw * s.o;
  const int64_t g_pixels = ps == nullptr ? HW : (s.h / 2) * (s.w / 2);
  if (static_cast<int64_t>(g.element_count()) != total * g_pixels * s.o ||
      (ps != nullptr && p_count != static_cast<int64_t>(g.element_count())) ||
      static_cast<int64_t>(db.element_count()) != s.batches * s.o)
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": g, pos or db's size does not match x and dw");
  const float* xs = x.typed_data();
  const float* gs = g.typed_data();
  // One weight and bias gradient per image, [dw | db], summed in image order below.
  const int64_t KB = K + s.o;
  std::vector<float> partial(total * KB);
  ParallelFor(pool, total, total * HW * s.o * 4, [&](int64_t n0, int64_t n1) {
    std::vector<float> xp((s.h + s.kh - 1) * (s.w + s.kw - 1));
    for (int64_t n = n0; n < n1; ++n) {
      PadImage(xs + n * HW, xp.data(), s.h, s.w, s.kh, s.kw, pt, pl);
      float* dwn = partial.data() + n * KB;
      const int8_t* pn = ps == nullptr ? nullptr : ps + n * g_pixels * s.o;
      WithFixedShape(s, [&](auto O, auto KH, auto KW) {
        if (pn == nullptr)
          ConvC1WgradImage<O(), KH(), KW(), false>(xp.data(), gs + n * g_pixels * s.o, pn, dwn,
                                                   dwn + K, s.h, s.w, s.kh, s.kw, s.o);
        else
          ConvC1WgradImage<O(), KH(), KW(), true>(xp.data(), gs + n * g_pixels * s.o, pn, dwn,
                                                  dwn + K, s.h, s.w, s.kh, s.kw, s.o);
      });
    }
  });
  for (int64_t b = 0; b < s.batches; ++b) {
    float* d = dw.typed_data() + b * K;
    float* e = db.typed_data() + b * s.o;
    std::fill(d, d + K, 0.0f);
    std::fill(e, e + s.o, 0.0f);
    for (int64_t n = b * s.images; n < (b + 1) * s.images; ++n) {
      for (int64_t k = 0; k < K; ++k) d[k] += partial[n * KB + k];
      for (int64_t o = 0; o < s.o; ++o) e[o] += partial[n * KB + K + o];
    }
  }
  return ffi::Error::Success();
}

ffi::Error ConvC1Wgrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                       ffi::Result<ffi::Buffer<ffi::F32>> dw,
                       ffi::Result<ffi::Buffer<ffi::F32>> db, int64_t pt, int64_t pl) {
  return ConvC1Grads(pool, x, g, nullptr, 0, *dw, *db, pt, pl, "fer conv_c1_wgrad");
}

ffi::Error ConvC1PoolWgrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::S8> pos, ffi::Buffer<ffi::F32> g,
                           ffi::Result<ffi::Buffer<ffi::F32>> dw,
                           ffi::Result<ffi::Buffer<ffi::F32>> db, int64_t pt, int64_t pl) {
  return ConvC1Grads(pool, x, g, pos.typed_data(), pos.element_count(), *dw, *db, pt, pl,
                     "fer conv_c1_pool_wgrad");
}

#if defined(__x86_64__) && ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || \
                            (defined(__clang__) && __clang_major__ >= 14))
#define FER_BF16_KERNELS 1
#define FER_BF16_TARGET __attribute__((target("avx512f,avx512bf16")))

// One image: y [H, W, O] from the zero-padded image xp [H+kh-1, wpd, C] (wpd covers whole
// MR-pixel blocks) and the packed kernel wpk [kh*kw, C/2, O, 2] (two input channels per pair).
template <int OB, int MR>
FER_BF16_TARGET void ConvBf16Image(const uint16_t* xp, const uint16_t* wpk, float* y, int64_t H,
                                   int64_t W, int64_t C, int64_t O, int64_t kh, int64_t kw,
                                   int64_t wpd) {
  constexpr int Q = OB / 16;
  const int64_t pairs = C / 2;
  for (int64_t ob = 0; ob < O; ob += OB)
    for (int64_t r = 0; r < H; ++r)
      for (int64_t x0 = 0; x0 < W; x0 += MR) {
        __m512 acc[MR][Q];
        for (int m = 0; m < MR; ++m)
          for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_setzero_ps();
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const uint16_t* xrow = xp + ((r + i) * wpd + x0 + j) * C;
            const uint16_t* wt = wpk + (i * kw + j) * pairs * O * 2 + ob * 2;
            for (int64_t cp = 0; cp < pairs; ++cp) {
              __m512bh b[Q];
              for (int q = 0; q < Q; ++q)
                b[q] = (__m512bh)_mm512_loadu_si512(wt + (cp * O + q * 16) * 2);
              for (int m = 0; m < MR; ++m) {
                uint32_t pair;
                std::memcpy(&pair, xrow + m * C + 2 * cp, sizeof(pair));
                const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
                for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], a, b[q]);
              }
            }
          }
        const int64_t valid = std::min<int64_t>(MR, W - x0);
        for (int m = 0; m < MR; ++m)
          if (m < valid)
            for (int q = 0; q < Q; ++q)
              _mm512_storeu_ps(y + (r * W + x0 + m) * O + ob + q * 16, acc[m][q]);
      }
}

// Output-channel block and pixel block: 4 x 6, 2 x 12 or 1 x 24 accumulators (24 of the 32
// vector registers), the widest block that divides O.
template <typename F>
void WithBlocking(int64_t O, F&& f) {
  if (O % 64 == 0)
    f(std::integral_constant<int, 64>(), std::integral_constant<int, 6>());
  else if (O % 32 == 0)
    f(std::integral_constant<int, 32>(), std::integral_constant<int, 12>());
  else
    f(std::integral_constant<int, 16>(), std::integral_constant<int, 24>());
}

// The weight gradients' blocks: 8 input channels x 32 output channels where O allows, else x 16.
template <typename F>
void WithWgradBlocking(int64_t O, F&& f) {
  if (O % 32 == 0)
    f(std::integral_constant<int, 32>());
  else
    f(std::integral_constant<int, 16>());
}

// out[2k] = a[k], out[2k+1] = b[k] for k < n (n a multiple of 16): two rows of bf16 as pairs.
FER_BF16_TARGET inline void Interleave(const uint16_t* a, const uint16_t* b, uint16_t* out,
                                       int64_t n) {
  for (int64_t k = 0; k < n; k += 16) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(a + k)));
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(b + k)));
    _mm512_storeu_si512(out + 2 * k, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// The weight gradient of `count` consecutive images added into dw [kh*kw, C, O] (f32): x
// [count, H, W, C] and the output gradient g [count, H, W, O] (bf16). The sum over pixels runs
// two pixels at a time: gi holds g's rows as pixel pairs [P, O, 2] and, per tap, xt the tap's
// input pixels for the same pairs [P, C, 2] (zeros outside the image, and for the missing
// partner of an odd last pixel). Small images go several at a time, so the register-resident
// sums run over enough pairs to pay for loading and storing them.
template <int OB, int MR>
FER_BF16_TARGET void WgradBf16Images(const uint16_t* x, const uint16_t* g, float* dw,
                                     int64_t count, int64_t H, int64_t W, int64_t C, int64_t O,
                                     int64_t kh, int64_t kw, int64_t pt, int64_t pl, uint16_t* gi,
                                     uint16_t* xt, const uint16_t* zeros) {
  constexpr int Q = OB / 16;
  const int64_t HW = H * W, pixels = count * HW, P = (pixels + 1) / 2;
  for (int64_t pp = 0; pp < P; ++pp)
    Interleave(g + 2 * pp * O, 2 * pp + 1 < pixels ? g + (2 * pp + 1) * O : zeros,
               gi + pp * O * 2, O);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) {
      for (int64_t pp = 0; pp < P; ++pp) {
        const uint16_t* src[2];
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t p = 2 * pp + e, q = p % HW, y = q / W + i - pt, xx = q % W + j - pl;
          src[e] = p < pixels && y >= 0 && y < H && xx >= 0 && xx < W
                       ? x + ((p / HW) * HW + y * W + xx) * C
                       : zeros;
        }
        Interleave(src[0], src[1], xt + pp * C * 2, C);
      }
      float* dwt = dw + (i * kw + j) * C * O;
      for (int64_t ob = 0; ob < O; ob += OB)
        for (int64_t c0 = 0; c0 < C; c0 += MR) {
          __m512 acc[MR][Q];
          for (int m = 0; m < MR; ++m)
            for (int q = 0; q < Q; ++q)
              acc[m][q] = _mm512_loadu_ps(dwt + (c0 + m) * O + ob + q * 16);
          for (int64_t pp = 0; pp < P; ++pp) {
            __m512bh b[Q];
            for (int q = 0; q < Q; ++q)
              b[q] = (__m512bh)_mm512_loadu_si512(gi + (pp * O + ob + q * 16) * 2);
            const uint16_t* xa = xt + (pp * C + c0) * 2;
            for (int m = 0; m < MR; ++m) {
              uint32_t pair;
              std::memcpy(&pair, xa + 2 * m, sizeof(pair));
              const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
              for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], a, b[q]);
            }
          }
          for (int m = 0; m < MR; ++m)
            for (int q = 0; q < Q; ++q)
              _mm512_storeu_ps(dwt + (c0 + m) * O + ob + q * 16, acc[m][q]);
        }
    }
}
#endif

bool Bf16ConvSupported() {
#ifdef FER_BF16_KERNELS
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

struct Bf16ConvShape {
  int64_t batches, n, h, w, c, kh, kw, o;  // x [batches, n, h, w, c], kernel [kh, kw, c, o]
};

// The checks both direct bf16 kernels share: the CPU runs them; x [B..., N, H, W, C] and `other`
// (the kernel, or the output gradient) are bf16 with x's rank; the kernel's dims k_dims
// [B..., kh, kw, C, O] match x's batch dims and C; C is a multiple of c_multiple, O of 16; the
// padding lies inside the kernel.
ffi::Error CheckBf16Conv(const ffi::AnyBuffer& x, const ffi::AnyBuffer& other, dims_t k_dims,
                         int64_t c_multiple, int64_t pt, int64_t pl, Bf16ConvShape& s,
                         const char* what) {
  if (!Bf16ConvSupported())
    return ffi::Error::InvalidArgument(std::string(what) + ": this CPU has no AVX-512 BF16");
  auto xd = x.dimensions();
  if (x.element_type() != ffi::BF16 || other.element_type() != ffi::BF16 || xd.size() < 4 ||
      other.dimensions().size() != xd.size() || k_dims.size() != xd.size())
    return ffi::Error::InvalidArgument(
        std::string(what) + ": expected bf16 x [..., N, H, W, C] and kernel [..., kh, kw, C, O] "
        "(and g [..., N, H, W, O] for the weight gradient)");
  const size_t nb = xd.size() - 4;
  s.batches = 1;
  for (size_t k = 0; k < nb; ++k) {
    if (xd[k] != k_dims[k] || xd[k] != other.dimensions()[k])
      return ffi::Error::InvalidArgument(std::string(what) + ": batch dims differ");
    s.batches *= xd[k];
  }
  s.n = xd[nb];
  s.h = xd[nb + 1];
  s.w = xd[nb + 2];
  s.c = xd[nb + 3];
  s.kh = k_dims[nb];
  s.kw = k_dims[nb + 1];
  s.o = k_dims[nb + 3];
  if (k_dims[nb + 2] != s.c || s.c % c_multiple != 0 || s.o % 16 != 0 || s.kh < 1 || s.kw < 1 ||
      pt < 0 || pl < 0 || pt >= s.kh || pl >= s.kw)
    return ffi::Error::InvalidArgument(
        std::string(what) + ": need matching shapes, C a multiple of " +
        std::to_string(c_multiple) + ", O a multiple of 16, padding inside the kernel");
  return ffi::Error::Success();
}

// The weight gradients' output gradient g [..., N, H, W, O] matches x and dw (shape s).
ffi::Error CheckGradShape(const ffi::AnyBuffer& g, const Bf16ConvShape& s, const char* what) {
  auto gd = g.dimensions();
  const size_t nb = gd.size() - 4;
  if (gd[nb] != s.n || gd[nb + 1] != s.h || gd[nb + 2] != s.w || gd[nb + 3] != s.o)
    return ffi::Error::InvalidArgument(
        std::string(what) + ": need matching shapes: g [..., N, H, W, O] for x and dw");
  return ffi::Error::Success();
}

// dst = partial[0] + partial[1] + ... (`parts` arrays of K floats), added in that order;
// dst may be partial itself.
void SumPartials(const float* partial, int64_t parts, int64_t K, float* dst) {
  if (dst != partial) std::copy(partial, partial + K, dst);
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t k = 0; k < K; ++k) dst[k] += partial[p * K + k];
}

// The Winograd kernels' constraints beyond CheckBf16Conv's.
ffi::Error CheckWinograd(const Bf16ConvShape& s, int64_t pt, int64_t pl, const char* what) {
  if (s.kh != 3 || s.kw != 3 || pt != 1 || pl != 1 || s.h % 2 || s.w % 2)
    return ffi::Error::InvalidArgument(
        std::string(what) + ": needs a 3x3 kernel, SAME padding and an even height and width");
  return ffi::Error::Success();
}

ffi::Error ConvBf16(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                    ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t pt, int64_t pl) {
#ifdef FER_BF16_KERNELS
  Bf16ConvShape s;
  if (ffi::Error e = CheckBf16Conv(x, w, w.dimensions(), 2, pt, pl, s, "fer conv_bf16");
      e.failure())
    return e;
  const auto [batches, N, H, W, C, kh, kw, O] = s;
  if (static_cast<int64_t>(y->element_count()) != batches * N * H * W * O)
    return ffi::Error::InvalidArgument("fer conv_bf16: output size does not match x and w");
  const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* ws = static_cast<const uint16_t*>(w.untyped_data());
  float* ys = y->typed_data();
  // Kernels packed [batch][kh*kw][C/2][O][2]: the two channels of a pair side by side.
  const int64_t K = kh * kw * C * O, taps = kh * kw;
  std::unique_ptr<uint16_t[]> wpk(new uint16_t[batches * K]);
  for (int64_t b = 0; b < batches; ++b)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t o = 0; o < O; ++o)
          wpk[b * K + ((t * (C / 2) + c / 2) * O + o) * 2 + c % 2] =
              ws[b * K + (t * C + c) * O + o];
  WithBlocking(O, [&](auto OB, auto MR) {
    const int64_t blocks = (W + MR() - 1) / MR();
    const int64_t wpd = blocks * MR() + kw - 1, hp = H + kh - 1;
    const int64_t images = batches * N;
    ParallelFor(pool, images, images * H * W * O * 4, [&](int64_t n0, int64_t n1) {
      std::unique_ptr<uint16_t[]> xp(new uint16_t[hp * wpd * C]);
      std::fill(xp.get(), xp.get() + hp * wpd * C, uint16_t{0});
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t r = 0; r < H; ++r)  // borders stay zero: only the interior is rewritten
          std::memcpy(xp.get() + ((r + pt) * wpd + pl) * C, xs + (n * H + r) * W * C,
                      W * C * sizeof(uint16_t));
        ConvBf16Image<OB(), MR()>(xp.get(), wpk.get() + (n / N) * K, ys + n * H * W * O, H, W, C,
                                  O, kh, kw, wpd);
      }
    });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("fer conv_bf16: not built for this CPU or compiler");
#endif
}

ffi::Error ConvBf16Wgrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                         ffi::Result<ffi::Buffer<ffi::F32>> dw, int64_t pt, int64_t pl) {
#ifdef FER_BF16_KERNELS
  Bf16ConvShape s;
  if (ffi::Error e = CheckBf16Conv(x, g, dw->dimensions(), 16, pt, pl, s, "fer conv_bf16_wgrad");
      e.failure())
    return e;
  const auto [batches, N, H, W, C, kh, kw, O] = s;
  if (ffi::Error e = CheckGradShape(g, s, "fer conv_bf16_wgrad"); e.failure()) return e;
  const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* gs = static_cast<const uint16_t*>(g.untyped_data());
  float* out = dw->typed_data();
  // Images per pass: at least ~256 pixel pairs (one image of 24x24, 15 of 6x6).
  const int64_t group =
      std::max<int64_t>(1, std::min<int64_t>(N, 512 / std::max<int64_t>(1, H * W)));
  const int64_t K = kh * kw * C * O, P = (group * H * W + 1) / 2;
  // The images of a batch in `parts` fixed ranges, each summed into its own partial gradient,
  // then the partials in range order: the same result for a given thread count.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(N, pool.num_threads()));
  const int64_t per = (N + parts - 1) / parts;
  std::unique_ptr<float[]> partial(new float[parts * K]);
  std::vector<uint16_t> zeros(std::max(C, O), 0);
  for (int64_t b = 0; b < batches; ++b) {
    WithWgradBlocking(O, [&](auto OB) {
      ParallelFor(pool, parts, int64_t{1} << 40, [&](int64_t p0, int64_t p1) {
        std::unique_ptr<uint16_t[]> gi(new uint16_t[P * O * 2]), xt(new uint16_t[P * C * 2]);
        for (int64_t p = p0; p < p1; ++p) {
          float* acc = partial.get() + p * K;
          std::fill(acc, acc + K, 0.0f);
          const int64_t end = b * N + std::min(N, (p + 1) * per);
          for (int64_t n = b * N + p * per; n < end; n += group)
            WgradBf16Images<OB(), 8>(xs + n * H * W * C, gs + n * H * W * O, acc,
                                     std::min(group, end - n), H, W, C, O, kh, kw, pt, pl,
                                     gi.get(), xt.get(), zeros.data());
        }
      });
    });
    SumPartials(partial.get(), parts, K, out + b * K);
  }
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("fer conv_bf16_wgrad: not built for this CPU or compiler");
#endif
}

#ifdef FER_BF16_KERNELS
// Winograd F(2x2, 3x3) (Lavin & Gray 2016): each 2x2 block of output pixels ("tile") from the
// 4x4 input window around it, with 16 products per input/output channel pair instead of 36.
// V = B^T d B (the window, 16 values per channel), U = G g G^T (the 3x3 kernel, 16 values per
// channel pair), M = sum over input channels of U * V (16 matmuls: tiles x C times C x O),
// y = A^T M A. The transforms run in fp32 and round V and U to bf16 for vdpbf16ps; the
// relative error against exact fp32 is ~1.8x that of the direct bf16 convolution's (4e-3 vs
// 2.4e-3, tests/native_test.py), the work ~0.45x.
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].

FER_BF16_TARGET inline __m512 LoadBf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

FER_BF16_TARGET inline void StoreBf16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
}

// V = B^T d B for tile t of x [N, H, W, C] (bf16): d is the 4x4 input window around output
// pixels (2ty..2ty+1, 2tx..2tx+1), zeros outside the image; value k (0..15) of channel c goes to
// out[k * stride + c], rounded to bf16.
FER_BF16_TARGET void WinoInputTile(const uint16_t* x, int64_t t, int64_t H, int64_t W, int64_t C,
                                   uint16_t* out, int64_t stride) {
  const int64_t tw = W / 2, per_image = (H / 2) * tw;
  const int64_t n = t / per_image, ty = t % per_image / tw, tx = t % tw;
  const uint16_t* src[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) {
      const int64_t yy = 2 * ty - 1 + r, xx = 2 * tx - 1 + c;
      src[r][c] = yy >= 0 && yy < H && xx >= 0 && xx < W ? x + ((n * H + yy) * W + xx) * C
                                                         : nullptr;
    }
  for (int64_t k = 0; k < C; k += 16) {
    __m512 d[4][4], b[4][4];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c)
        d[r][c] = src[r][c] ? LoadBf16(src[r][c] + k) : _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      b[0][c] = _mm512_sub_ps(d[0][c], d[2][c]);
      b[1][c] = _mm512_add_ps(d[1][c], d[2][c]);
      b[2][c] = _mm512_sub_ps(d[2][c], d[1][c]);
      b[3][c] = _mm512_sub_ps(d[1][c], d[3][c]);
    }
    for (int r = 0; r < 4; ++r) {
      uint16_t* v = out + r * 4 * stride + k;
      StoreBf16(v, _mm512_sub_ps(b[r][0], b[r][2]));
      StoreBf16(v + stride, _mm512_add_ps(b[r][1], b[r][2]));
      StoreBf16(v + 2 * stride, _mm512_sub_ps(b[r][2], b[r][1]));
      StoreBf16(v + 3 * stride, _mm512_sub_ps(b[r][1], b[r][3]));
    }
  }
}

// U [16][C/2][O][2] (bf16, the two channels of a pair side by side) from one kernel w
// [3, 3, C, O] (bf16), for input channels [c0, c1) (even bounds).
FER_BF16_TARGET void WinoKernel(const uint16_t* w, uint16_t* U, int64_t C, int64_t O, int64_t c0,
                                int64_t c1) {
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t c = c0; c < c1; c += 2)
    for (int64_t o = 0; o < O; o += 16) {
      __m512 u[2][16];
      for (int64_t e = 0; e < 2; ++e) {
        __m512 g[3][3], gg[4][3];
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) g[i][j] = LoadBf16(w + ((i * 3 + j) * C + c + e) * O + o);
        for (int j = 0; j < 3; ++j) {
          gg[0][j] = g[0][j];
          gg[1][j] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(g[0][j], g[1][j]), g[2][j]));
          gg[2][j] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(g[0][j], g[1][j]), g[2][j]));
          gg[3][j] = g[2][j];
        }
        for (int i = 0; i < 4; ++i) {
          u[e][i * 4 + 0] = gg[i][0];
          u[e][i * 4 + 1] =
              _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(gg[i][0], gg[i][1]), gg[i][2]));
          u[e][i * 4 + 2] =
              _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(gg[i][0], gg[i][1]), gg[i][2]));
          u[e][i * 4 + 3] = gg[i][2];
        }
      }
      for (int k = 0; k < 16; ++k) {
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(u[0][k]));
        const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(u[1][k]));
        _mm512_storeu_si512(U + ((k * (C / 2) + c / 2) * O + o) * 2,
                            _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
}

// Tiles [t0, t0 + nt) (nt <= TB) of the images x [N, H, W, C] (bf16) into y [N, H, W, O] (f32),
// with U from WinoKernel. V [16][TB][C] (bf16) and M [16][TB][OB] (f32) are scratch.
template <int OB, int MR>
FER_BF16_TARGET void WinoTiles(const uint16_t* x, const uint16_t* U, float* y, int64_t t0,
                               int64_t nt, int64_t TB, int64_t H, int64_t W, int64_t C, int64_t O,
                               uint16_t* V, float* M) {
  constexpr int Q = OB / 16;
  const int64_t tw = W / 2, per_image = (H / 2) * tw;
  for (int64_t i = 0; i < TB; ++i) {
    if (i >= nt) {  // the block's unused tiles: zeros (their sums are never stored)
      for (int k = 0; k < 16; ++k) std::fill_n(V + (k * TB + i) * C, C, uint16_t{0});
      continue;
    }
    WinoInputTile(x, t0 + i, H, W, C, V + i * C, TB * C);
  }
  const int64_t pairs = C / 2;
  for (int64_t ob = 0; ob < O; ob += OB) {
    for (int k = 0; k < 16; ++k) {
      const uint16_t* u = U + k * pairs * O * 2 + ob * 2;
      for (int64_t m0 = 0; m0 < TB; m0 += MR) {
        __m512 acc[MR][Q];
        for (int m = 0; m < MR; ++m)
          for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_setzero_ps();
        const uint16_t* v = V + (k * TB + m0) * C;
        for (int64_t cp = 0; cp < pairs; ++cp) {
          __m512bh b[Q];
          for (int q = 0; q < Q; ++q)
            b[q] = (__m512bh)_mm512_loadu_si512(u + (cp * O + q * 16) * 2);
          for (int m = 0; m < MR; ++m) {
            uint32_t pair;
            std::memcpy(&pair, v + m * C + 2 * cp, sizeof(pair));
            const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], a, b[q]);
          }
        }
        for (int m = 0; m < MR; ++m)
          for (int q = 0; q < Q; ++q)
            _mm512_storeu_ps(M + ((k * TB + m0 + m) * OB + q * 16), acc[m][q]);
      }
    }
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t t = t0 + i, n = t / per_image, ty = t % per_image / tw, tx = t % tw;
      float* out = y + ((n * H + 2 * ty) * W + 2 * tx) * O + ob;
      for (int q = 0; q < Q; ++q) {
        __m512 m[4][4], s[2][4];
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) m[r][c] = _mm512_loadu_ps(M + ((r * 4 + c) * TB + i) * OB + q * 16);
        for (int c = 0; c < 4; ++c) {
          s[0][c] = _mm512_add_ps(_mm512_add_ps(m[0][c], m[1][c]), m[2][c]);
          s[1][c] = _mm512_sub_ps(_mm512_sub_ps(m[1][c], m[2][c]), m[3][c]);
        }
        for (int r = 0; r < 2; ++r) {
          float* row = out + r * W * O + q * 16;
          _mm512_storeu_ps(row, _mm512_add_ps(_mm512_add_ps(s[r][0], s[r][1]), s[r][2]));
          _mm512_storeu_ps(row + O, _mm512_sub_ps(_mm512_sub_ps(s[r][1], s[r][2]), s[r][3]));
        }
      }
    }
  }
}

// The weight gradient as F(3x3, 2x2): per tile, the 4x4 input window d and the 2x2 output
// gradient e give dW += G^T [(A e A^T) * (B^T d B)] G, so M = sum over tiles of E * V (16
// matmuls C x tiles times tiles x O, the tiles two at a time for vdpbf16ps) and dW = G^T M G.
// Tiles [t0, t0 + nt) of x [N, H, W, C] and g [N, H, W, O] (bf16) are added into Mp [16][C][O]
// (f32); V [16][P][C][2] and E [16][P][O][2] (P = pairs of tiles, the last one padded with a
// zero tile) and ta, tb [16][max(C, O)] are scratch.
template <int OB, int MR>
FER_BF16_TARGET void WinoWgradTiles(const uint16_t* x, const uint16_t* g, float* Mp, int64_t t0,
                                    int64_t nt, int64_t H, int64_t W, int64_t C, int64_t O,
                                    uint16_t* V, uint16_t* E, uint16_t* ta, uint16_t* tb) {
  constexpr int Q = OB / 16;
  const int64_t tw = W / 2, per_image = (H / 2) * tw, P = (nt + 1) / 2, L = std::max(C, O);
  for (int64_t pp = 0; pp < P; ++pp) {
    for (int64_t e = 0; e < 2; ++e) {
      uint16_t* tmp = e ? tb : ta;
      const int64_t i = 2 * pp + e;
      if (i >= nt) {
        std::fill_n(tmp, 16 * L, uint16_t{0});
        continue;
      }
      WinoInputTile(x, t0 + i, H, W, C, tmp, L);
    }
    for (int k = 0; k < 16; ++k) Interleave(ta + k * L, tb + k * L, V + (k * P + pp) * C * 2, C);
    for (int64_t e = 0; e < 2; ++e) {
      uint16_t* tmp = e ? tb : ta;
      const int64_t i = 2 * pp + e;
      if (i >= nt) {
        std::fill_n(tmp, 16 * L, uint16_t{0});
        continue;
      }
      const int64_t t = t0 + i, n = t / per_image, ty = t % per_image / tw, tx = t % tw;
      const uint16_t* src = g + ((n * H + 2 * ty) * W + 2 * tx) * O;
      for (int64_t k = 0; k < O; k += 16) {  // A e A^T: rows (e0, e0 + e1, e0 - e1, -e1)
        __m512 r[4][2];
        for (int c = 0; c < 2; ++c) {
          const __m512 e0 = LoadBf16(src + c * O + k), e1 = LoadBf16(src + (W + c) * O + k);
          r[0][c] = e0;
          r[1][c] = _mm512_add_ps(e0, e1);
          r[2][c] = _mm512_sub_ps(e0, e1);
          r[3][c] = _mm512_sub_ps(_mm512_setzero_ps(), e1);
        }
        for (int q = 0; q < 4; ++q) {
          StoreBf16(tmp + (q * 4 + 0) * L + k, r[q][0]);
          StoreBf16(tmp + (q * 4 + 1) * L + k, _mm512_add_ps(r[q][0], r[q][1]));
          StoreBf16(tmp + (q * 4 + 2) * L + k, _mm512_sub_ps(r[q][0], r[q][1]));
          StoreBf16(tmp + (q * 4 + 3) * L + k, _mm512_sub_ps(_mm512_setzero_ps(), r[q][1]));
        }
      }
    }
    for (int k = 0; k < 16; ++k) Interleave(ta + k * L, tb + k * L, E + (k * P + pp) * O * 2, O);
  }
  for (int k = 0; k < 16; ++k) {
    float* mk = Mp + k * C * O;
    for (int64_t ob = 0; ob < O; ob += OB)
      for (int64_t c0 = 0; c0 < C; c0 += MR) {
        __m512 acc[MR][Q];
        for (int m = 0; m < MR; ++m)
          for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_loadu_ps(mk + (c0 + m) * O + ob + q * 16);
        for (int64_t pp = 0; pp < P; ++pp) {
          __m512bh b[Q];
          for (int q = 0; q < Q; ++q)
            b[q] = (__m512bh)_mm512_loadu_si512(E + ((k * P + pp) * O + ob + q * 16) * 2);
          const uint16_t* va = V + ((k * P + pp) * C + c0) * 2;
          for (int m = 0; m < MR; ++m) {
            uint32_t pair;
            std::memcpy(&pair, va + 2 * m, sizeof(pair));
            const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            for (int q = 0; q < Q; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], a, b[q]);
          }
        }
        for (int m = 0; m < MR; ++m)
          for (int q = 0; q < Q; ++q) _mm512_storeu_ps(mk + (c0 + m) * O + ob + q * 16, acc[m][q]);
      }
  }
}

// dw [3, 3, C, O] = G^T M G for input channels [c0, c1), from M [16][C][O].
FER_BF16_TARGET void WinoWgradOut(const float* M, float* dw, int64_t C, int64_t O, int64_t c0,
                                  int64_t c1) {
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t o = 0; o < O; o += 16) {
      __m512 m[4][4], s[3][4];
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 4; ++j) m[r][j] = _mm512_loadu_ps(M + ((r * 4 + j) * C + c) * O + o);
      for (int j = 0; j < 4; ++j) {
        const __m512 sum = _mm512_mul_ps(half, _mm512_add_ps(m[1][j], m[2][j]));
        s[0][j] = _mm512_add_ps(m[0][j], sum);
        s[1][j] = _mm512_mul_ps(half, _mm512_sub_ps(m[1][j], m[2][j]));
        s[2][j] = _mm512_add_ps(sum, m[3][j]);
      }
      for (int i = 0; i < 3; ++i) {
        const __m512 sum = _mm512_mul_ps(half, _mm512_add_ps(s[i][1], s[i][2]));
        float* out = dw + (i * 3 * C + c) * O + o;
        _mm512_storeu_ps(out, _mm512_add_ps(s[i][0], sum));
        _mm512_storeu_ps(out + C * O, _mm512_mul_ps(half, _mm512_sub_ps(s[i][1], s[i][2])));
        _mm512_storeu_ps(out + 2 * C * O, _mm512_add_ps(sum, s[i][3]));
      }
    }
}
#endif

ffi::Error ConvWinoBf16(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                        ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t pt, int64_t pl) {
#ifdef FER_BF16_KERNELS
  Bf16ConvShape s;
  if (ffi::Error e = CheckBf16Conv(x, w, w.dimensions(), 16, pt, pl, s, "fer conv_wino_bf16");
      e.failure())
    return e;
  const auto [batches, N, H, W, C, kh, kw, O] = s;
  if (ffi::Error e = CheckWinograd(s, pt, pl, "fer conv_wino_bf16"); e.failure()) return e;
  if (static_cast<int64_t>(y->element_count()) != batches * N * H * W * O)
    return ffi::Error::InvalidArgument("fer conv_wino_bf16: output size does not match x and w");
  const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* ws = static_cast<const uint16_t*>(w.untyped_data());
  float* ys = y->typed_data();
  const int64_t KU = 16 * C * O;  // one transformed kernel
  std::unique_ptr<uint16_t[]> U(new uint16_t[batches * KU]);
  for (int64_t b = 0; b < batches; ++b)
    ParallelFor(pool, C / 2, C * O * 64, [&](int64_t p0, int64_t p1) {
      WinoKernel(ws + b * 9 * C * O, U.get() + b * KU, C, O, 2 * p0, 2 * p1);
    });
  // Blocks of TB tiles, whose transformed inputs V (16 x TB x C bf16, <= 384 KB) and sums M stay
  // in cache between the transform, the 16 matmuls and the output transform.
  const int64_t tiles = N * (H / 2) * (W / 2), TB = C >= 256 ? 24 : 48;
  const int64_t blocks = (tiles + TB - 1) / TB;
  WithBlocking(O, [&](auto OB, auto MR) {
    for (int64_t b = 0; b < batches; ++b)
      ParallelFor(pool, blocks, tiles * 16 * (C + O) * 4, [&](int64_t k0, int64_t k1) {
        std::unique_ptr<uint16_t[]> V(new uint16_t[16 * TB * C]);
        std::unique_ptr<float[]> M(new float[16 * TB * OB()]);
        for (int64_t k = k0; k < k1; ++k)
          WinoTiles<OB(), MR()>(xs + b * N * H * W * C, U.get() + b * KU,
                                ys + b * N * H * W * O, k * TB, std::min(TB, tiles - k * TB), TB,
                                H, W, C, O, V.get(), M.get());
      });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("fer conv_wino_bf16: not built for this CPU or compiler");
#endif
}

ffi::Error ConvWinoBf16Wgrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                             ffi::Result<ffi::Buffer<ffi::F32>> dw, int64_t pt, int64_t pl) {
#ifdef FER_BF16_KERNELS
  Bf16ConvShape s;
  if (ffi::Error e = CheckBf16Conv(x, g, dw->dimensions(), 16, pt, pl, s,
                                   "fer conv_wino_bf16_wgrad");
      e.failure())
    return e;
  const auto [batches, N, H, W, C, kh, kw, O] = s;
  if (ffi::Error e = CheckGradShape(g, s, "fer conv_wino_bf16_wgrad"); e.failure()) return e;
  if (ffi::Error e = CheckWinograd(s, pt, pl, "fer conv_wino_bf16_wgrad"); e.failure())
    return e;
  const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* gs = static_cast<const uint16_t*>(g.untyped_data());
  float* out = dw->typed_data();
  const int64_t tiles = N * (H / 2) * (W / 2), KM = 16 * C * O, L = std::max(C, O);
  // Fixed tile ranges, one partial M each, summed in range order: the same result for a given
  // thread count. Passes of TB tiles: ~256 KB of transformed tiles where M is small (they stay
  // in cache), as many tiles as M has channel pairs where it is large (M is read and written
  // once per pass).
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(tiles, pool.num_threads()));
  const int64_t per = (tiles + parts - 1) / parts;
  const int64_t want = std::max<int64_t>((256 << 10) / (32 * (C + O)), 2 * C * O / (C + O));
  const int64_t passes = std::max<int64_t>(1, (per + want - 1) / want);
  const int64_t TB = ((per + passes - 1) / passes + 1) / 2 * 2;
  std::unique_ptr<float[]> partial(new float[parts * KM]);
  for (int64_t b = 0; b < batches; ++b) {
    WithWgradBlocking(O, [&](auto OB) {
      ParallelFor(pool, parts, int64_t{1} << 40, [&](int64_t p0, int64_t p1) {
        const int64_t P = TB / 2;
        std::unique_ptr<uint16_t[]> V(new uint16_t[16 * P * C * 2]), E(new uint16_t[16 * P * O * 2]),
            ta(new uint16_t[16 * L]), tb(new uint16_t[16 * L]);
        for (int64_t p = p0; p < p1; ++p) {
          float* Mp = partial.get() + p * KM;
          std::fill(Mp, Mp + KM, 0.0f);
          const int64_t end = std::min(tiles, (p + 1) * per);
          for (int64_t t = p * per; t < end; t += TB)
            WinoWgradTiles<OB(), 8>(xs + b * N * H * W * C, gs + b * N * H * W * O, Mp, t,
                                    std::min(TB, end - t), H, W, C, O, V.get(), E.get(),
                                    ta.get(), tb.get());
        }
      });
    });
    SumPartials(partial.get(), parts, KM, partial.get());  // M, in the first partial
    ParallelFor(pool, C, C * O * 64, [&](int64_t c0, int64_t c1) {
      WinoWgradOut(partial.get(), out + b * 9 * C * O, C, O, c0, c1);
    });
  }
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument(
      "fer conv_wino_bf16_wgrad: not built for this CPU or compiler");
#endif
}

}  // namespace

extern "C" int FerBf16ConvSupported() { return Bf16ConvSupported() ? 1 : 0; }

#define FER_PATCHES_BINDING                                                       \
  ffi::Ffi::Bind()                                                                \
      .Ctx<ffi::ThreadPool>()                                                     \
      .Arg<ffi::AnyBuffer>()                                                      \
      .Ret<ffi::AnyBuffer>()                                                      \
      .Attr<int64_t>("kh")                                                        \
      .Attr<int64_t>("kw")                                                        \
      .Attr<int64_t>("pt")                                                        \
      .Attr<int64_t>("pl")

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerPatches, Patches, FER_PATCHES_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FerPatchesT, PatchesT, FER_PATCHES_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FerBilinear, Bilinear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerConvC1, ConvC1,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FerConvC1Wgrad, ConvC1Wgrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FerConvC1Pool, ConvC1Pool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FerConvC1PoolWgrad, ConvC1PoolWgrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));
// Both direct bf16 kernels: (x, kernel or output gradient) -> f32, with the padding.
#define FER_BF16_BINDING                                                          \
  ffi::Ffi::Bind()                                                                \
      .Ctx<ffi::ThreadPool>()                                                     \
      .Arg<ffi::AnyBuffer>()                                                      \
      .Arg<ffi::AnyBuffer>()                                                      \
      .Ret<ffi::Buffer<ffi::F32>>()                                               \
      .Attr<int64_t>("pt")                                                        \
      .Attr<int64_t>("pl")

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerConvBf16, ConvBf16, FER_BF16_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FerConvBf16Wgrad, ConvBf16Wgrad, FER_BF16_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FerConvWinoBf16, ConvWinoBf16, FER_BF16_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FerConvWinoBf16Wgrad, ConvWinoBf16Wgrad, FER_BF16_BINDING);
