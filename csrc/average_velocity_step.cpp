// The average-velocity step on CPU, fused into one pass over memory.
//
//   ubar   = (z - z_anchor) / (sigma - sigma_anchor)
//   jvp    = (ubar - v_anchor) / (sigma - sigma_anchor)
//   u_hat  = v_last + (sigma_next - sigma) * jvp
//   z_next = z + (sigma_next - sigma) * u_hat
//
// Each input element is read once and both outputs written once; the math runs in float32 (float64 for
// float64 inputs) whatever the storage dtype. Registered as torch.ops.meancache.average_velocity_step.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <cmath>
#include <tuple>

namespace meancache {
namespace {

constexpr int64_t kGrainSize = 1 << 14;

void check_inputs(const at::Tensor& z, const at::Tensor& v_last, const at::Tensor& z_anchor,
                  const at::Tensor& v_anchor, double sigma_anchor, double sigma, double sigma_next) {
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"v_last", &v_last}, {"z_anchor", &z_anchor}, {"v_anchor", &v_anchor}};
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "z must have a floating dtype, got ", z.scalar_type());
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->sizes() == z.sizes(), name, " has shape ", t->sizes(), " but z has shape ", z.sizes());
    TORCH_CHECK(t->device() == z.device(), name, " is on ", t->device(), " but z is on ", z.device());
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), name, " has dtype ", t->scalar_type(), " but z has ",
                z.scalar_type());
  }
  TORCH_CHECK(std::isfinite(sigma_anchor) && std::isfinite(sigma) && std::isfinite(sigma_next),
              "sigmas must be finite, got sigma_anchor=", sigma_anchor, " sigma=", sigma, " sigma_next=", sigma_next);
  TORCH_CHECK(sigma != sigma_anchor, "sigma (", sigma, ") must differ from sigma_anchor");
}

std::tuple<at::Tensor, at::Tensor> average_velocity_step_cpu(const at::Tensor& z, const at::Tensor& v_last,
                                                             const at::Tensor& z_anchor, const at::Tensor& v_anchor,
                                                             double sigma_anchor, double sigma, double sigma_next) {
  check_inputs(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next);
  TORCH_CHECK(z.device().is_cpu(), "average_velocity_step_cpu takes CPU tensors, got ", z.device());
  const at::Tensor zc = z.contiguous(), vlc = v_last.contiguous(), zac = z_anchor.contiguous(),
                   vac = v_anchor.contiguous();
  at::Tensor z_next = at::empty_like(zc);
  at::Tensor u_hat = at::empty_like(zc);
  const int64_t n = zc.numel();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zc.scalar_type(), "average_velocity_step_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const math_t d = static_cast<math_t>(sigma - sigma_anchor);
    const math_t h = static_cast<math_t>(sigma_next - sigma);
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* vlp = vlc.const_data_ptr<scalar_t>();
    const scalar_t* zap = zac.const_data_ptr<scalar_t>();
    const scalar_t* vap = vac.const_data_ptr<scalar_t>();
    scalar_t* znp = z_next.mutable_data_ptr<scalar_t>();
    scalar_t* up = u_hat.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const math_t zi = static_cast<math_t>(zp[i]);
        const math_t ubar = (zi - static_cast<math_t>(zap[i])) / d;
        const math_t jvp = (ubar - static_cast<math_t>(vap[i])) / d;
        const math_t u = static_cast<math_t>(vlp[i]) + h * jvp;
        up[i] = static_cast<scalar_t>(u);
        znp[i] = static_cast<scalar_t>(zi + h * u);
      }
    });
  });
  return {z_next, u_hat};
}

std::tuple<at::Tensor, at::Tensor> average_velocity_step_meta(const at::Tensor& z, const at::Tensor& v_last,
                                                              const at::Tensor& z_anchor, const at::Tensor& v_anchor,
                                                              double sigma_anchor, double sigma, double sigma_next) {
  check_inputs(z, v_last, z_anchor, v_anchor, sigma_anchor, sigma, sigma_next);
  return {at::empty_like(z, at::MemoryFormat::Contiguous), at::empty_like(z, at::MemoryFormat::Contiguous)};
}

}  // namespace

TORCH_LIBRARY(meancache, m) {
  m.def(
      "average_velocity_step(Tensor z, Tensor v_last, Tensor z_anchor, Tensor v_anchor, float sigma_anchor, "
      "float sigma, float sigma_next) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(meancache, CPU, m) { m.impl("average_velocity_step", &average_velocity_step_cpu); }

TORCH_LIBRARY_IMPL(meancache, Meta, m) { m.impl("average_velocity_step", &average_velocity_step_meta); }

}  // namespace meancache

// An importable module, so `import meancache._C` runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
