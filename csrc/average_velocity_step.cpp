// The average-velocity step on CPU, fused into one pass over memory.
//
//   ubar   = (z - z_anchor) / (sigma - sigma_anchor)
//   jvp    = (ubar - v_anchor) / (sigma - sigma_anchor)
//   u_hat  = v_last + (sigma_next - sigma) * jvp
//   z_next = z + (sigma_next - sigma) * u_hat
//
// Each input element is read once and both outputs written once; the math runs in float32 (float64 for
// float64 inputs) whatever the storage dtype. The sigmas hold one value, or one per sample (dim 0).
// Registered as torch.ops.meancache.average_velocity_step and its .out overload (CPU and Meta here; CUDA from
// Python, Triton).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace meancache {
namespace {

constexpr int64_t kGrainSize = 1 << 14;

template <typename math_t>
struct Coefficients {
  math_t a, c, h;  // h / d^2, h / d, h
};

// One segment of elements sharing their sigmas.
template <typename scalar_t, typename math_t>
void step_segment(const scalar_t* z, const scalar_t* v_last, const scalar_t* z_anchor, const scalar_t* v_anchor,
                  scalar_t* z_next, scalar_t* u_hat, int64_t n, Coefficients<math_t> k) {
  for (int64_t i = 0; i < n; ++i) {
    const math_t zi = static_cast<math_t>(z[i]);
    const math_t u = static_cast<math_t>(v_last[i]) + k.a * (zi - static_cast<math_t>(z_anchor[i])) -
                     k.c * static_cast<math_t>(v_anchor[i]);
    u_hat[i] = static_cast<scalar_t>(u);
    z_next[i] = static_cast<scalar_t>(zi + k.h * u);
  }
}

// float32, MeanCache's history dtype: the same loop compiled for wider vector units, picked at load time.
__attribute__((target_clones("avx512f", "avx2", "default"))) void step_segment_f32(
    const float* __restrict z, const float* __restrict v_last, const float* __restrict z_anchor,
    const float* __restrict v_anchor, float* __restrict z_next, float* __restrict u_hat, int64_t n, float a, float c,
    float h) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = v_last[i] + a * (z[i] - z_anchor[i]) - c * v_anchor[i];
    u_hat[i] = u;
    z_next[i] = z[i] + h * u;
  }
}

template <>
void step_segment<float, float>(const float* z, const float* v_last, const float* z_anchor, const float* v_anchor,
                                float* z_next, float* u_hat, int64_t n, Coefficients<float> k) {
  step_segment_f32(z, v_last, z_anchor, v_anchor, z_next, u_hat, n, k.a, k.c, k.h);
}

// Shapes, devices and dtypes; the sigmas are 1-D CPU float64 tensors with one value or one per sample.
// Sizes are read as SymInts, so the Meta kernel also serves torch.compile's dynamic shapes.
void check_inputs(const at::Tensor& z, const at::Tensor& v_last, const at::Tensor& z_anchor,
                  const at::Tensor& v_anchor, const at::Tensor& sigma_anchor, const at::Tensor& sigma,
                  const at::Tensor& sigma_next) {
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"v_last", &v_last}, {"z_anchor", &z_anchor}, {"v_anchor", &v_anchor}};
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "z must have a floating dtype, got ", z.scalar_type());
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->sym_sizes() == z.sym_sizes(), name, " has shape ", t->sym_sizes(), " but z has shape ",
                z.sym_sizes());
    TORCH_CHECK(t->device() == z.device(), name, " is on ", t->device(), " but z is on ", z.device());
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), name, " has dtype ", t->scalar_type(), " but z has ",
                z.scalar_type());
  }
  const std::pair<const char*, const at::Tensor*> sigmas[] = {
      {"sigma_anchor", &sigma_anchor}, {"sigma", &sigma}, {"sigma_next", &sigma_next}};
  const c10::SymInt samples = sigma.sym_numel();
  for (const auto& [name, t] : sigmas) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kDouble, name,
                " must be a 1-D float64 tensor, got dim ", t->dim(), " and ", t->scalar_type());
    TORCH_CHECK(t->sym_numel() == samples, name, " has ", t->sym_numel(), " values but sigma has ", samples);
  }
  TORCH_CHECK(samples == 1 || (z.dim() >= 1 && z.sym_size(0) == samples),
              "per-sample sigmas need one value per sample along dim 0: got ", samples, " for z of shape ",
              z.sym_sizes());
}

void check_outputs(const at::Tensor& z, const at::Tensor& z_next, const at::Tensor& u_hat) {
  const std::pair<const char*, const at::Tensor*> named[] = {{"z_next", &z_next}, {"u_hat", &u_hat}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->sym_sizes() == z.sym_sizes() && t->scalar_type() == z.scalar_type() && t->device() == z.device(),
                "out tensor ", name, " must match z (shape ", z.sym_sizes(), ", ", z.scalar_type(), ", ", z.device(),
                "), got shape ", t->sym_sizes(), ", ", t->scalar_type(), ", ", t->device());
    TORCH_CHECK(t->is_contiguous(), "out tensor ", name, " must be contiguous");
  }
}

// [first, last + 1) byte addresses a non-empty tensor touches.
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t dim = 0; dim < t.dim(); ++dim) extent += (t.size(dim) - 1) * t.stride(dim);
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {start, start + static_cast<uintptr_t>(extent * t.element_size())};
}

bool same_elements(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

// No output shares memory with the other output or an input, except in place over exactly the same elements:
// z_next over any input, u_hat over v_last, z_anchor or v_anchor (not z, which is read again after u_hat).
void check_no_overlap(const at::Tensor& z, const at::Tensor& v_last, const at::Tensor& z_anchor,
                      const at::Tensor& v_anchor, const at::Tensor& z_next, const at::Tensor& u_hat) {
  if (z.numel() == 0) return;
  const auto overlap = [](const at::Tensor& a, const at::Tensor& b) {
    const auto [a_start, a_end] = byte_range(a);
    const auto [b_start, b_end] = byte_range(b);
    return a_start < b_end && b_start < a_end;
  };
  TORCH_CHECK_VALUE(!overlap(z_next, u_hat), "out z_next shares memory with the output u_hat");
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"z", &z}, {"v_last", &v_last}, {"z_anchor", &z_anchor}, {"v_anchor", &v_anchor}};
  for (const auto& [name, input] : inputs) {
    TORCH_CHECK_VALUE(!overlap(z_next, *input) || same_elements(z_next, *input), "out z_next shares memory with ",
                      "the input ", name, " without being exactly its elements");
    TORCH_CHECK_VALUE(!overlap(u_hat, *input) || (input != &z && same_elements(u_hat, *input)),
                      "out u_hat shares memory with the input ", name,
                      input == &z ? "" : " without being exactly its elements");
  }
}

std::tuple<at::Tensor&, at::Tensor&> average_velocity_step_cpu_out(
    const at::Tensor& z, const at::Tensor& v_last, const at::Tensor& z_anchor, const at::Tensor& v_anchor,
    const at::Tensor& sigma_anchor, const at::Tensor& sigma, const at::Tensor& sigma_next, at::Tensor& z_next,
    at::Tensor& u_hat) {
  check_inputs(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next);
  check_outputs(z, z_next, u_hat);
  check_no_overlap(z, v_last, z_anchor, v_anchor, z_next, u_hat);
  TORCH_CHECK(z.device().is_cpu(), "average_velocity_step_cpu takes CPU tensors, got ", z.device());
  const int64_t samples = sigma.numel();
  std::vector<double> d(samples), h(samples);
  for (int64_t b = 0; b < samples; ++b) {
    const double sa = sigma_anchor.const_data_ptr<double>()[b], s = sigma.const_data_ptr<double>()[b],
                 sn = sigma_next.const_data_ptr<double>()[b];
    TORCH_CHECK(std::isfinite(sa) && std::isfinite(s) && std::isfinite(sn), "sigmas must be finite, got sigma_anchor=",
                sa, " sigma=", s, " sigma_next=", sn, " for sample ", b);
    TORCH_CHECK(s != sa, "sigma (", s, ") must differ from sigma_anchor for sample ", b);
    d[b] = s - sa;
    h[b] = sn - s;
  }
  const at::Tensor zc = z.contiguous(), vlc = v_last.contiguous(), zac = z_anchor.contiguous(),
                   vac = v_anchor.contiguous();
  const int64_t n = zc.numel();
  const int64_t per_sample = samples == 1 ? std::max<int64_t>(n, 1) : n / samples;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zc.scalar_type(), "average_velocity_step_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* vlp = vlc.const_data_ptr<scalar_t>();
    const scalar_t* zap = zac.const_data_ptr<scalar_t>();
    const scalar_t* vap = vac.const_data_ptr<scalar_t>();
    scalar_t* znp = z_next.mutable_data_ptr<scalar_t>();
    scalar_t* up = u_hat.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
      // Walk the chunk one sample segment at a time so the inner loop has constant coefficients:
      // u_hat = v_last + h * ((z - z_anchor) / d - v_anchor) / d = v_last + a * (z - z_anchor) - c * v_anchor.
      for (int64_t i = begin; i < end;) {
        const int64_t b = i / per_sample;
        const int64_t segment_end = std::min(end, (b + 1) * per_sample);
        const Coefficients<math_t> k{static_cast<math_t>(h[b] / (d[b] * d[b])), static_cast<math_t>(h[b] / d[b]),
                                     static_cast<math_t>(h[b])};
        step_segment(zp + i, vlp + i, zap + i, vap + i, znp + i, up + i, segment_end - i, k);
        i = segment_end;
      }
    });
  });
  return {z_next, u_hat};
}

std::tuple<at::Tensor, at::Tensor> average_velocity_step_cpu(const at::Tensor& z, const at::Tensor& v_last,
                                                             const at::Tensor& z_anchor, const at::Tensor& v_anchor,
                                                             const at::Tensor& sigma_anchor, const at::Tensor& sigma,
                                                             const at::Tensor& sigma_next) {
  at::Tensor z_next = at::empty(z.sizes(), z.options());
  at::Tensor u_hat = at::empty(z.sizes(), z.options());
  average_velocity_step_cpu_out(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next, z_next, u_hat);
  return {z_next, u_hat};
}

std::tuple<at::Tensor, at::Tensor> average_velocity_step_meta(const at::Tensor& z, const at::Tensor& v_last,
                                                              const at::Tensor& z_anchor, const at::Tensor& v_anchor,
                                                              const at::Tensor& sigma_anchor, const at::Tensor& sigma,
                                                              const at::Tensor& sigma_next) {
  check_inputs(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next);
  return {at::empty_like(z, at::MemoryFormat::Contiguous), at::empty_like(z, at::MemoryFormat::Contiguous)};
}

std::tuple<at::Tensor&, at::Tensor&> average_velocity_step_meta_out(
    const at::Tensor& z, const at::Tensor& v_last, const at::Tensor& z_anchor, const at::Tensor& v_anchor,
    const at::Tensor& sigma_anchor, const at::Tensor& sigma, const at::Tensor& sigma_next, at::Tensor& z_next,
    at::Tensor& u_hat) {
  check_inputs(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next);
  check_outputs(z, z_next, u_hat);
  return {z_next, u_hat};
}

}  // namespace

TORCH_LIBRARY(meancache, m) {
  m.def(
      "average_velocity_step(Tensor z, Tensor v_last, Tensor z_anchor, Tensor v_anchor, Tensor sigma_anchor, "
      "Tensor sigma, Tensor sigma_next) -> (Tensor, Tensor)");
  m.def(
      "average_velocity_step.out(Tensor z, Tensor v_last, Tensor z_anchor, Tensor v_anchor, Tensor sigma_anchor, "
      "Tensor sigma, Tensor sigma_next, *, Tensor(a!) z_next, Tensor(b!) u_hat) -> (Tensor(a!), Tensor(b!))");
}

TORCH_LIBRARY_IMPL(meancache, CPU, m) {
  m.impl("average_velocity_step", &average_velocity_step_cpu);
  m.impl("average_velocity_step.out", &average_velocity_step_cpu_out);
}

TORCH_LIBRARY_IMPL(meancache, Meta, m) {
  m.impl("average_velocity_step", &average_velocity_step_meta);
  m.impl("average_velocity_step.out", &average_velocity_step_meta_out);
}

}  // namespace meancache

// An importable module, so `import meancache._C` runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
