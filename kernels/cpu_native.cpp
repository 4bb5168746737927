// qlab::gemv_int8dot_native: the int8-dot decode kernel of cpu.c as a torch operator with a C++ kernel.
//
// torch.ops.qlab.gemv_int8dot (cpu_ops.py) runs its checks and its ctypes call in Python: about 10 us
// a call, on a kernel that takes 10-20 us at SmolLM2's sizes. Inside an AOTInductor step
// (qlab.aot) that Python is all that is left between the kernels, so the step calls this operator
// instead: the same C function, the same checks, no Python. The C library is built by
// cpu_library.py; its qlab_gemv_i8 is handed to qlab_native_bind once, at load.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

using GemvI8 = int (*)(int, long, long, int, long, int, const float *, const uint8_t *, const float *,
                       const float *, const uint8_t *, float *, void *, int);
GemvI8 gemv_i8 = nullptr;

// The C kernel reads prod(shape) elements from each pointer: only a contiguous CPU tensor of exactly
// that shape and dtype is safe (the checks of cpu_ops._int8dot_shapes; bad arguments raise ValueError
// there and here).
void check(const char *name, const at::Tensor &t, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.sizes() == shape && t.device().is_cpu() && t.is_contiguous(),
              name, " must be a contiguous CPU ", dtype, " tensor of shape ", shape, ", got ",
              t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

at::Tensor gemv_int8dot(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scale_t,
                        const std::optional<at::Tensor> &zero_t, const std::optional<at::Tensor> &levels,
                        int64_t bits, int64_t group_size, int64_t planes) {
  TORCH_CHECK(gemv_i8 != nullptr, "qlab's C kernels are not bound (qlab.kernels.cpu_native.load)");
  TORCH_CHECK_VALUE((bits == 2 || bits == 4 || bits == 8) && codes.dim() == 4,
              "codes must be a 4-D rows16 layout of 2-, 4- or 8-bit codes, got bits=", bits);
  const int64_t n = codes.size(0) * 16, k = codes.size(1) * (32 / bits);
  TORCH_CHECK_VALUE(group_size >= 1 && k % group_size == 0 && group_size % (32 / bits) == 0,
              "group_size=", group_size, " does not fit K=", k, " in ", bits, "-bit rows16 chunks");
  TORCH_CHECK_VALUE((planes == 1 || planes == 2) && !(planes == 1 && (bits != 8 || levels.has_value())),
              "planes must be 2, or 1 for 8-bit affine codes; got planes=", planes, ", bits=", bits);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == k && x.device().is_cpu(), "x must be a CPU tensor of shape [M, ",
              k, "], got ", x.sizes(), " on ", x.device());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", x.scalar_type());
  check("codes", codes, {n / 16, k * bits / 32, 16, 4}, at::kByte);
  check("scale_t", scale_t, {n / 16, k / group_size, 16}, at::kFloat);
  if (zero_t) check("zero_t", *zero_t, {n / 16, k / group_size, 16}, at::kFloat);
  if (levels) {
    check("levels", *levels, {32}, at::kByte);
    TORCH_CHECK_VALUE(bits == 4, "codebook levels need 4-bit codes, got bits=", bits);
  }
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0) return y;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  // scratch for the C side: two int8 planes of x, then per row its group sums X and its scale sx
  at::Tensor work = at::empty({2 * m * k + 4 * m * (k / group_size + 1)}, x.options().dtype(at::kByte));
  const int rc = gemv_i8(static_cast<int>(m), n, k, static_cast<int>(bits), group_size, static_cast<int>(planes),
                         xf.data_ptr<float>(), codes.data_ptr<uint8_t>(), scale_t.data_ptr<float>(),
                         zero_t ? zero_t->data_ptr<float>() : nullptr,
                         levels ? levels->data_ptr<uint8_t>() : nullptr, y.data_ptr<float>(), work.data_ptr(),
                         at::get_num_threads());
  TORCH_CHECK(rc == 0, "qlab_gemv_i8 rejected M=", m, " N=", n, " K=", k, " bits=", bits, " g=", group_size);
  return y;
}

}  // namespace

// Not an operator: a raw address must never be reachable from torch.ops.
extern "C" void qlab_native_bind(void *fn) { gemv_i8 = reinterpret_cast<GemvI8>(fn); }

TORCH_LIBRARY_FRAGMENT(qlab, m) {
  m.def(
      "gemv_int8dot_native(Tensor x, Tensor codes, Tensor scale_t, Tensor? zero_t, Tensor? levels, "
      "int bits, int group_size, int planes) -> Tensor");
}

TORCH_LIBRARY_IMPL(qlab, CPU, m) { m.impl("gemv_int8dot_native", &gemv_int8dot); }
