// Fused dropout for CPU training: deformable_detr::dropout_forward / dropout_backward.
//
// PyTorch's CPU dropout makes a float mask with bernoulli_ (a slow generator), divides it by
// 1 - p and multiplies: three passes over the tensor and a 4-byte mask kept for the backward.
// Here one pass draws the random numbers, writes the output and a 1-byte mask; the backward is
// one more pass, grad * mask * scale.
//
// Random numbers: Philox4x32-10 (the generator of ATen's at::Philox4_32 and of PyTorch's CUDA
// dropout), keyed by a 64-bit seed drawn from PyTorch's default CPU generator (so
// torch.manual_seed makes runs reproducible and successive calls differ), or by `seed` when
// given. Element i takes word (i % 64) / 16 of the Philox block at counter
// (i / 64) * 16 + i % 16 (counter words 0-1; words 2-3, the subsequence, are 0). That is a
// function of i alone, so the result does not depend on how the work is split among
// threads, and a tile of 64 elements is 16 independent Philox evaluations whose words land
// on 16 consecutive elements: the generator and the masking vectorise.
//
// An element is kept when its uint32 u >= round(p * 2^32): probability 1 - p to 2^-33. Kept
// elements are x * scale with scale = 1 / (1 - p) (in the dtype's compute type, float for
// float16/bfloat16); dropped ones are x * 0, as PyTorch's dropout computes them (NaN and inf
// stay NaN).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>

#include "cpu/isa_dispatch.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace deformable_detr {
namespace {

constexpr int64_t kLanes = 16;            // Philox blocks per tile
constexpr int64_t kTile = 4 * kLanes;     // elements per tile
constexpr int64_t kGrainTiles = 1024;     // tiles per parallel_for grain (64 Ki elements)

constexpr uint32_t kPhiloxW0 = 0x9E3779B9;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85;
constexpr uint32_t kPhiloxM0 = 0xD2511F53;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57;

// r[w * kLanes + l] = word w of Philox4x32-10(key, counter = first + l): the 64 uint32s of
// the tile whose first counter is `first`.
MSDA_ALWAYS_INLINE void philox_tile_scalar(uint64_t key, uint64_t first, uint32_t* r) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t ctr = first + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(ctr);
    c1[l] = static_cast<uint32_t>(ctr >> 32);
    c2[l] = 0;
    c3[l] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(key);
  uint32_t k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(p1);
      c3[l] = static_cast<uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    r[l] = c0[l];
    r[kLanes + l] = c1[l];
    r[2 * kLanes + l] = c2[l];
    r[3 * kLanes + l] = c3[l];
  }
}


#if MSDA_X86_DISPATCH
// The same with 32-bit lanes in vector registers; vpmuludq gives the 64-bit products of the
// even lanes, so the odd lanes are shifted down for a second multiply.
__attribute__((target("avx2,fma"))) MSDA_ALWAYS_INLINE void mulhilo_avx2(
    __m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2,fma"))) MSDA_ALWAYS_INLINE void philox_tile_avx2(
    uint64_t key, uint64_t first, uint32_t* r) {
  static_assert(kLanes == 16, "two vectors of 8 lanes");
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int h = 0; h < 2; ++h) {
    const uint64_t f = first + 8 * h;
    // Lanes f .. f + 7; the low word wraps into the high one at most once in a tile.
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(f))),
                                  iota);
    const __m256i wrapped = _mm256_cmpgt_epi32(
        _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(f))),
                         _mm256_set1_epi32(INT32_MIN)),
        _mm256_xor_si256(c0, _mm256_set1_epi32(INT32_MIN)));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(f >> 32)), wrapped);
    __m256i c2 = _mm256_setzero_si256();
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(key);
    uint32_t k1 = static_cast<uint32_t>(key >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(c0, m0, &hi0, &lo0);
      mulhilo_avx2(c2, m1, &hi1, &lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + 8 * h), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + kLanes + 8 * h), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + 2 * kLanes + 8 * h), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + 3 * kLanes + 8 * h), c3);
  }
}

__attribute__((target(MSDA_AVX512_TARGET))) MSDA_ALWAYS_INLINE void mulhilo_avx512(
    __m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target(MSDA_AVX512_TARGET))) MSDA_ALWAYS_INLINE void philox_tile_avx512(
    uint64_t key, uint64_t first, uint32_t* r) {
  static_assert(kLanes == 16, "one vector of 16 lanes");
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i f0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  __m512i c0 = _mm512_add_epi32(f0, iota);
  // Lanes whose low word wrapped around carry into the high word.
  const __mmask16 wrapped = _mm512_cmplt_epu32_mask(c0, f0);
  __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(first >> 32)), wrapped,
                                     _mm512_set1_epi32(static_cast<int>(first >> 32)),
                                     _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512();
  __m512i c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(key);
  uint32_t k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo_avx512(c0, m0, &hi0, &lo0);
    mulhilo_avx512(c2, m1, &hi1, &lo1);
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lo1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  _mm512_storeu_si512(r, c0);
  _mm512_storeu_si512(r + kLanes, c1);
  _mm512_storeu_si512(r + 2 * kLanes, c2);
  _mm512_storeu_si512(r + 3 * kLanes, c3);
}

struct PhiloxAvx2 {
  // Not inlined: forward_tiles is compiled for the default target first.
  __attribute__((target("avx2,fma"))) void operator()(
      uint64_t key, uint64_t first, uint32_t* r) const {
    philox_tile_avx2(key, first, r);
  }
};

struct PhiloxAvx512 {
  __attribute__((target(MSDA_AVX512_TARGET))) void operator()(
      uint64_t key, uint64_t first, uint32_t* r) const {
    philox_tile_avx512(key, first, r);
  }
};
#endif

struct PhiloxScalar {
  MSDA_ALWAYS_INLINE void operator()(uint64_t key, uint64_t first, uint32_t* r) const {
    philox_tile_scalar(key, first, r);
  }
};

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* x;
  scalar_t* out;
  bool* mask;
  int64_t n;
  uint64_t key;
  uint32_t threshold;
  at::opmath_type<scalar_t> scale;
};

// Tiles [tb, te).
template <typename scalar_t, typename Philox>
MSDA_ALWAYS_INLINE void forward_tiles(int64_t tb, int64_t te, const ForwardArgs<scalar_t>& a,
                                         const Philox& philox) {
  using acc_t = at::opmath_type<scalar_t>;
  alignas(64) uint32_t r[kTile];
  for (int64_t t = tb; t < te; ++t) {
    philox(a.key, static_cast<uint64_t>(t) * kLanes, r);
    const int64_t base = t * kTile;
    const scalar_t* x = a.x + base;
    scalar_t* out = a.out + base;
    bool* mask = a.mask + base;
    if (base + kTile <= a.n) {
      for (int64_t j = 0; j < kTile; ++j) {
        const bool keep = r[j] >= a.threshold;
        out[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) * (keep ? a.scale : acc_t(0)));
        mask[j] = keep;
      }
    } else {
      for (int64_t j = 0; j < a.n - base; ++j) {
        const bool keep = r[j] >= a.threshold;
        out[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) * (keep ? a.scale : acc_t(0)));
        mask[j] = keep;
      }
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad;
  const bool* mask;
  scalar_t* out;
  at::opmath_type<scalar_t> scale;
};

template <typename scalar_t>
MSDA_ALWAYS_INLINE void backward_range(int64_t b, int64_t e, const BackwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = b; i < e; ++i) {
    a.out[i] = static_cast<scalar_t>(static_cast<acc_t>(a.grad[i]) *
                                     (a.mask[i] ? a.scale : acc_t(0)));
  }
}

template <typename scalar_t>
void forward_default(int64_t tb, int64_t te, const ForwardArgs<scalar_t>& a) {
  forward_tiles(tb, te, a, PhiloxScalar{});
}

template <typename scalar_t>
void backward_default(int64_t b, int64_t e, const BackwardArgs<scalar_t>& a) {
  backward_range(b, e, a);
}

#if MSDA_X86_DISPATCH
// The build is portable (no -march flags): a second copy for AVX-512 / AVX2, picked at run
// time. The generator's 32x32->64-bit multiplies and the masking are what vectorise.
template <typename scalar_t>
__attribute__((target(MSDA_AVX512_TARGET))) void forward_avx512(int64_t tb, int64_t te,
                                                            const ForwardArgs<scalar_t>& a) {
  forward_tiles(tb, te, a, PhiloxAvx512{});
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_avx2(int64_t tb, int64_t te,
                                                      const ForwardArgs<scalar_t>& a) {
  forward_tiles(tb, te, a, PhiloxAvx2{});
}

template <typename scalar_t>
__attribute__((target(MSDA_AVX512_TARGET))) void backward_avx512(
    int64_t b, int64_t e, const BackwardArgs<scalar_t>& a) {
  backward_range(b, e, a);
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void backward_avx2(int64_t b, int64_t e,
                                                       const BackwardArgs<scalar_t>& a) {
  backward_range(b, e, a);
}
#endif

template <typename scalar_t>
using ForwardFn = void (*)(int64_t, int64_t, const ForwardArgs<scalar_t>&);
template <typename scalar_t>
using BackwardFn = void (*)(int64_t, int64_t, const BackwardArgs<scalar_t>&);

template <typename scalar_t>
ForwardFn<scalar_t> select_forward() {
#if MSDA_X86_DISPATCH
  if (cpu::cpu_has_avx512()) return &forward_avx512<scalar_t>;
  if (cpu::cpu_has_avx2_fma()) return &forward_avx2<scalar_t>;
#endif
  return &forward_default<scalar_t>;
}

template <typename scalar_t>
BackwardFn<scalar_t> select_backward() {
#if MSDA_X86_DISPATCH
  if (cpu::cpu_has_avx512()) return &backward_avx512<scalar_t>;
  if (cpu::cpu_has_avx2_fma()) return &backward_avx2<scalar_t>;
#endif
  return &backward_default<scalar_t>;
}

void check_p(double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0,
              "deformable_detr::dropout_forward: the dropout probability p must be in [0, 1], "
              "got ", p);
}

void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "deformable_detr::", op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

uint64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CPUGeneratorImpl>()->random64();
}

std::tuple<at::Tensor, at::Tensor> dropout_forward_cpu(const at::Tensor& input, double p,
                                                       std::optional<int64_t> seed) {
  check_p(p);
  check_dtype(input, "dropout_forward", "input");
  const at::Tensor x = input.contiguous();
  if (p == 0.0) {
    return {x.clone(), at::ones(x.sizes(), x.options().dtype(at::kBool))};
  }
  // Drawn even when nothing is random (p = 1, no elements), so that the default generator
  // advances once per call whatever the input.
  const uint64_t key = seed.has_value() ? static_cast<uint64_t>(*seed) : draw_seed();
  const double threshold = std::nearbyint(std::ldexp(p, 32));
  if (threshold >= 4294967296.0) {
    // p = 1 (or within 2^-33 of it): nothing kept; x * 0 as PyTorch's dropout.
    return {x * at::zeros({}, x.options()), at::zeros(x.sizes(), x.options().dtype(at::kBool))};
  }
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int64_t n = x.numel();
  if (n == 0) return {out, mask};
  cpu::advise_huge_pages(out);
  cpu::advise_huge_pages(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_forward_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    ForwardArgs<scalar_t> a{};
                                    a.x = x.const_data_ptr<scalar_t>();
                                    a.out = out.data_ptr<scalar_t>();
                                    a.mask = mask.data_ptr<bool>();
                                    a.n = n;
                                    a.key = key;
                                    a.threshold = static_cast<uint32_t>(threshold);
                                    a.scale = static_cast<acc_t>(1.0 / (1.0 - p));
                                    const auto fn = select_forward<scalar_t>();
                                    const int64_t tiles = (n + kTile - 1) / kTile;
                                    at::parallel_for(0, tiles, kGrainTiles,
                                                     [&](int64_t tb, int64_t te) { fn(tb, te, a); });
                                  });
  return {out, mask};
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& mask, double scale) {
  check_dtype(grad, "dropout_backward", "grad");
  TORCH_CHECK(mask.scalar_type() == at::kBool,
              "deformable_detr::dropout_backward: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(grad.sizes() == mask.sizes(), "deformable_detr::dropout_backward: grad ",
              grad.sizes(), " and mask ", mask.sizes(), " must have the same shape");
  TORCH_CHECK(mask.device().is_cpu(),
              "deformable_detr::dropout_backward: mask must be on the CPU, got ", mask.device());
  const at::Tensor g = grad.contiguous();
  const at::Tensor m = mask.contiguous();
  auto out = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t n = g.numel();
  if (n == 0) return out;
  cpu::advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dropout_backward_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    BackwardArgs<scalar_t> a{};
                                    a.grad = g.const_data_ptr<scalar_t>();
                                    a.mask = m.const_data_ptr<bool>();
                                    a.out = out.data_ptr<scalar_t>();
                                    a.scale = static_cast<acc_t>(scale);
                                    const auto fn = select_backward<scalar_t>();
                                    at::parallel_for(0, n, kGrainTiles * kTile,
                                                     [&](int64_t b, int64_t e) { fn(b, e, a); });
                                  });
  return out;
}

}  // namespace
}  // namespace deformable_detr

// A fragment: the namespace itself is defined with the attention ops (ms_deform_attn_op.cpp).
TORCH_LIBRARY_FRAGMENT(deformable_detr, m) {
  m.def("dropout_forward(Tensor input, float p, int? seed=None) -> (Tensor output, Tensor mask)",
        {at::Tag::nondeterministic_seeded});
  m.def("dropout_backward(Tensor grad, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("dropout_forward", &deformable_detr::dropout_forward_cpu);
  m.impl("dropout_backward", &deformable_detr::dropout_backward_cpu);
}
