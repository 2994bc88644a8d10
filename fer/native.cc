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

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

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

}  // namespace

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
