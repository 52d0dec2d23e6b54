// The average-velocity step on CPU, fused into one pass over memory.
//
//   ubar   = (z - z_anchor) / (sigma - sigma_anchor)
//   jvp    = (ubar - v_anchor) / (sigma - sigma_anchor)
//   u_hat  = v_last + (sigma_next - sigma) * jvp
//   z_next = z + (sigma_next - sigma) * u_hat
//
// Each input element is read once and both outputs written once; the math runs in float32 (float64 for
// float64 inputs) whatever the storage dtype. The sigmas hold one value, or one per sample (dim 0).
// Registered as torch.ops.meancache.average_velocity_step (CPU and Meta here; CUDA from Python, Triton).

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

// Shapes, devices and dtypes; the sigmas are 1-D CPU float64 tensors with one value or one per sample.
void check_inputs(const at::Tensor& z, const at::Tensor& v_last, const at::Tensor& z_anchor,
                  const at::Tensor& v_anchor, const at::Tensor& sigma_anchor, const at::Tensor& sigma,
                  const at::Tensor& sigma_next) {
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"v_last", &v_last}, {"z_anchor", &z_anchor}, {"v_anchor", &v_anchor}};
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "z must have a floating dtype, got ", z.scalar_type());
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->sizes() == z.sizes(), name, " has shape ", t->sizes(), " but z has shape ", z.sizes());
    TORCH_CHECK(t->device() == z.device(), name, " is on ", t->device(), " but z is on ", z.device());
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), name, " has dtype ", t->scalar_type(), " but z has ",
                z.scalar_type());
  }
  const std::pair<const char*, const at::Tensor*> sigmas[] = {
      {"sigma_anchor", &sigma_anchor}, {"sigma", &sigma}, {"sigma_next", &sigma_next}};
  const int64_t samples = sigma.numel();
  for (const auto& [name, t] : sigmas) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kDouble, name,
                " must be a 1-D float64 tensor, got dim ", t->dim(), " and ", t->scalar_type());
    TORCH_CHECK(t->numel() == samples, name, " has ", t->numel(), " values but sigma has ", samples);
  }
  TORCH_CHECK(samples == 1 || (z.dim() >= 1 && z.size(0) == samples),
              "per-sample sigmas need one value per sample along dim 0: got ", samples, " for z of shape ",
              z.sizes());
}

std::tuple<at::Tensor, at::Tensor> average_velocity_step_cpu(const at::Tensor& z, const at::Tensor& v_last,
                                                             const at::Tensor& z_anchor, const at::Tensor& v_anchor,
                                                             const at::Tensor& sigma_anchor, const at::Tensor& sigma,
                                                             const at::Tensor& sigma_next) {
  check_inputs(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next);
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
  at::Tensor z_next = at::empty_like(zc);
  at::Tensor u_hat = at::empty_like(zc);
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
      // Walk the chunk one sample segment at a time so the inner loop has constant coefficients.
      for (int64_t i = begin; i < end;) {
        const int64_t b = i / per_sample;
        const int64_t segment_end = std::min(end, (b + 1) * per_sample);
        const math_t db = static_cast<math_t>(d[b]), hb = static_cast<math_t>(h[b]);
        for (; i < segment_end; ++i) {
          const math_t zi = static_cast<math_t>(zp[i]);
          const math_t ubar = (zi - static_cast<math_t>(zap[i])) / db;
          const math_t jvp = (ubar - static_cast<math_t>(vap[i])) / db;
          const math_t u = static_cast<math_t>(vlp[i]) + hb * jvp;
          up[i] = static_cast<scalar_t>(u);
          znp[i] = static_cast<scalar_t>(zi + hb * u);
        }
      }
    });
  });
  return {z_next, u_hat};
}

std::tuple<at::Tensor, at::Tensor> average_velocity_step_meta(const at::Tensor& z, const at::Tensor& v_last,
                                                              const at::Tensor& z_anchor, const at::Tensor& v_anchor,
                                                              const at::Tensor& sigma_anchor, const at::Tensor& sigma,
                                                              const at::Tensor& sigma_next) {
  check_inputs(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next);
  return {at::empty_like(z, at::MemoryFormat::Contiguous), at::empty_like(z, at::MemoryFormat::Contiguous)};
}

}  // namespace

TORCH_LIBRARY(meancache, m) {
  m.def(
      "average_velocity_step(Tensor z, Tensor v_last, Tensor z_anchor, Tensor v_anchor, Tensor sigma_anchor, "
      "Tensor sigma, Tensor sigma_next) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(meancache, CPU, m) { m.impl("average_velocity_step", &average_velocity_step_cpu); }

TORCH_LIBRARY_IMPL(meancache, Meta, m) { m.impl("average_velocity_step", &average_velocity_step_meta); }

}  // namespace meancache

// An importable module, so `import meancache._C` runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
