// ffi.cc -- XLA FFI handlers (CPU platform) over the C ABI. Thin on purpose: check the
// buffers, call jm_linear / jm_linear_grouped / jm_moe, turn a JM_E* code into an ffi::Error with the library's
// message. Weights never cross as buffers: the handlers take a matrix or store handle
// (int64 attribute) and validate it against the registry of live objects.
#include <cstdint>
#include <cstring>
#include <string>

#include "jaxmoe_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

bool dtype_of(ffi::DataType t, int32_t* out) {
  if (t == ffi::DataType::F32) *out = JM_DT_F32;
  else if (t == ffi::DataType::BF16) *out = JM_DT_BF16;
  else return false;
  return true;
}

ffi::Error fail(const char* what) {
  return ffi::Error::InvalidArgument(std::string("jaxmoe_cpu ") + what + ": " + jm_last_error());
}

int64_t leading(const ffi::AnyBuffer& b) {
  auto d = b.dimensions();
  int64_t m = 1;
  for (size_t i = 0; i + 1 < d.size(); i++) m *= d[i];
  return m;
}

ffi::Error LinearImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t matrix) {
  jm_matrix* w = jm_matrix_from_handle(matrix);
  if (!w) return fail("linear");
  int32_t fmt, n, k;
  int64_t bytes;
  jm_matrix_info(w, &fmt, &n, &k, &bytes);
  int32_t xdt, ydt;
  if (!dtype_of(x.element_type(), &xdt) || !dtype_of(y->element_type(), &ydt))
    return ffi::Error::InvalidArgument("jaxmoe_cpu linear: x and y must be float32 or bfloat16");
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() < 1 || yd.size() != xd.size() || xd.back() != k || yd.back() != n)
    return ffi::Error::InvalidArgument("jaxmoe_cpu linear: x [..., " + std::to_string(k) +
                                       "] -> y [..., " + std::to_string(n) +
                                       "] expected by the matrix; shapes do not match");
  if (jm_linear(w, x.untyped_data(), xdt, leading(x), y->untyped_data(), ydt) != JM_OK)
    return fail("linear");
  return ffi::Error::Success();
}

ffi::Error LinearGroupedImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t group) {
  jm_group* grp = jm_group_from_handle(group);
  if (!grp) return fail("linear_grouped");
  int32_t g, n, k;
  jm_group_info(grp, &g, &n, &k);
  int32_t xdt, ydt;
  if (!dtype_of(x.element_type(), &xdt) || !dtype_of(y->element_type(), &ydt))
    return ffi::Error::InvalidArgument("jaxmoe_cpu linear_grouped: x and y must be float32 or bfloat16");
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  const size_t r = xd.size();
  if (r < 2 || yd.size() != r || xd[r - 2] != g || xd[r - 1] != k || yd[r - 2] != g || yd[r - 1] != n)
    return ffi::Error::InvalidArgument("jaxmoe_cpu linear_grouped: x [..., " + std::to_string(g) + ", " +
                                       std::to_string(k) + "] -> y [..., " + std::to_string(g) + ", " +
                                       std::to_string(n) + "] expected by the group; shapes do not match");
  int64_t m = 1;
  for (size_t i = 0; i + 2 < r; i++) m *= xd[i];
  if (jm_linear_grouped(grp, x.untyped_data(), xdt, m, y->untyped_data(), ydt) != JM_OK)
    return fail("linear_grouped");
  return ffi::Error::Success();
}

ffi::Error Moe(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> weights,
               ffi::Result<ffi::AnyBuffer> out, int64_t store, int32_t layer) {
  jm_store* s = jm_store_from_handle(store);
  if (!s) return fail("moe");
  int32_t n_experts, hidden, inter, complete;
  if (jm_store_layer_info(s, layer, &n_experts, &hidden, &inter, &complete) != JM_OK) return fail("moe");
  int32_t xdt, odt;
  if (!dtype_of(x.element_type(), &xdt) || !dtype_of(out->element_type(), &odt))
    return ffi::Error::InvalidArgument("jaxmoe_cpu moe: x and out must be float32 or bfloat16");
  auto xd = x.dimensions();
  auto idd = ids.dimensions();
  auto wd = weights.dimensions();
  if (xd.size() != 2 || xd[1] != hidden)
    return ffi::Error::InvalidArgument("jaxmoe_cpu moe: x must be [tokens, " + std::to_string(hidden) +
                                       "] for layer " + std::to_string(layer));
  if (idd.size() != 2 || idd[0] != xd[0] || wd.size() != 2 || wd[0] != idd[0] || wd[1] != idd[1])
    return ffi::Error::InvalidArgument("jaxmoe_cpu moe: ids and weights must both be [tokens, top_k]");
  auto od = out->dimensions();
  if (od.size() != 2 || od[0] != xd[0] || od[1] != xd[1])
    return ffi::Error::InvalidArgument("jaxmoe_cpu moe: out must have x's shape");
  if (jm_moe(s, layer, x.untyped_data(), xdt, xd[0], ids.typed_data(), weights.typed_data(),
             (int32_t)idd[1], out->untyped_data(), odt) != JM_OK)
    return fail("moe");
  return ffi::Error::Success();
}

// layer as an attribute (static): the usual form
ffi::Error MoeImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> weights,
                   ffi::Result<ffi::AnyBuffer> out, int64_t store, int32_t layer) {
  return Moe(x, ids, weights, out, store, layer);
}

// layer as a 0-d int32 operand: for a scan over layers, where the index is traced
ffi::Error MoeDynImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> weights,
                      ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out, int64_t store) {
  if (layer.element_count() != 1)
    return ffi::Error::InvalidArgument("jaxmoe_cpu moe: the layer operand must be a scalar");
  return Moe(x, ids, weights, out, store, layer.typed_data()[0]);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jm_ffi_linear, LinearImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("matrix"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jm_ffi_linear_grouped, LinearGroupedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("group"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jm_ffi_moe, MoeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("store")
                                  .Attr<int32_t>("layer"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jm_ffi_moe_dyn, MoeDynImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("store"));

extern "C" void* jm_ffi_handler(const char* name) {
  if (!name) return nullptr;
  if (!std::strcmp(name, "linear")) return reinterpret_cast<void*>(&jm_ffi_linear);
  if (!std::strcmp(name, "linear_grouped")) return reinterpret_cast<void*>(&jm_ffi_linear_grouped);
  if (!std::strcmp(name, "moe")) return reinterpret_cast<void*>(&jm_ffi_moe);
  if (!std::strcmp(name, "moe_dyn")) return reinterpret_cast<void*>(&jm_ffi_moe_dyn);
  return nullptr;
}
