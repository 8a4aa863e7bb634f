// torch glue of the fused policy-loss kernels: argument checks, output allocation, dtype dispatch.
//
// Deliberately free of CUDA and c10/cuda headers (a CPU wheel of torch cannot compile them), so CI can
// syntax-check this file with g++ on machines without a GPU.  The caller (megaprorl/kernels/cuda_ext.py)
// passes the current CUDA stream as an integer handle (torch.cuda.current_stream(dev).cuda_stream); the
// launchers in policy_loss.cu make the tensor's device current themselves.

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "policy_loss.h"

namespace {

megaprorl::LogitsDType logits_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return megaprorl::LogitsDType::kFloat32;
    case at::kHalf:
      return megaprorl::LogitsDType::kFloat16;
    case at::kBFloat16:
      return megaprorl::LogitsDType::kBFloat16;
    default:
      TORCH_CHECK(false, "megaprorl policy_loss: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "megaprorl policy_loss: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "megaprorl policy_loss: logits must be [T, V_local], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "megaprorl policy_loss: logits must be contiguous");
  TORCH_CHECK(logits.size(1) > 0, "megaprorl policy_loss: empty vocabulary");
}

void check_rowvec(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), "megaprorl policy_loss: ", name, " is on ", t.device(),
              ", logits on ", logits.device());
  TORCH_CHECK(t.scalar_type() == dtype, "megaprorl policy_loss: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(), "megaprorl policy_loss: ", name,
              " must be contiguous [", logits.size(0), "], got ", t.sizes());
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "megaprorl policy_loss: ", what, " kernel launch failed: ",
              megaprorl::policy_loss_error_string(err));
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// Pass 1: returns (part_max, part_sum, part_cent) [T, C] fp32 and target [T] fp32 (see policy_loss.h).
std::vector<at::Tensor> stats(const at::Tensor& logits, const at::Tensor& tokens, int64_t vocab_start,
                              int64_t num_chunks, int64_t stream) {
  check_logits(logits);
  check_rowvec(tokens, logits, at::kLong, "tokens");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  int64_t chunk_len = 0, chunks = 1;
  megaprorl::policy_loss_chunk_geometry(vocab, num_chunks, &chunk_len, &chunks);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor part_max = at::empty({rows, chunks}, opts);
  at::Tensor part_sum = at::empty({rows, chunks}, opts);
  at::Tensor part_cent = at::empty({rows, chunks}, opts);
  at::Tensor target = at::empty({rows}, opts);
  check_launch(megaprorl::policy_loss_stats(logits_dtype(logits), logits.data_ptr(), rows, vocab,
                                            tokens.data_ptr<int64_t>(), vocab_start, num_chunks,
                                            part_max.data_ptr<float>(), part_sum.data_ptr<float>(),
                                            part_cent.data_ptr<float>(), target.data_ptr<float>(),
                                            logits.get_device(), as_stream(stream)),
               "stats");
  return {part_max, part_sum, part_cent, target};
}

// Pass 2: writes the gradient into dlogits (same shape and dtype as logits; may alias logits).
void grad(const at::Tensor& logits, const at::Tensor& dlogits, const at::Tensor& tokens, int64_t vocab_start,
          const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& mean_cent, const at::Tensor& g_lp,
          const c10::optional<at::Tensor>& g_h, int64_t num_chunks, int64_t stream) {
  check_logits(logits);
  TORCH_CHECK(dlogits.device() == logits.device() && dlogits.scalar_type() == logits.scalar_type() &&
                  dlogits.sizes() == logits.sizes() && dlogits.is_contiguous(),
              "megaprorl policy_loss: dlogits must be a contiguous tensor like logits");
  check_rowvec(tokens, logits, at::kLong, "tokens");
  check_rowvec(row_max, logits, at::kFloat, "row_max");
  check_rowvec(log_sum, logits, at::kFloat, "log_sum");
  check_rowvec(mean_cent, logits, at::kFloat, "mean_cent");
  check_rowvec(g_lp, logits, at::kFloat, "g_lp");
  const float* g_h_ptr = nullptr;
  if (g_h.has_value() && g_h->defined()) {
    check_rowvec(*g_h, logits, at::kFloat, "g_h");
    g_h_ptr = g_h->data_ptr<float>();
  }
  check_launch(megaprorl::policy_loss_grad(logits_dtype(logits), logits.data_ptr(), dlogits.data_ptr(),
                                           logits.size(0), logits.size(1), tokens.data_ptr<int64_t>(), vocab_start,
                                           row_max.data_ptr<float>(), log_sum.data_ptr<float>(),
                                           mean_cent.data_ptr<float>(), g_lp.data_ptr<float>(), g_h_ptr, num_chunks,
                                           logits.get_device(), as_stream(stream)),
               "grad");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megaprorl fused per-token policy loss (CUDA): row statistics and gradient passes";
  m.def("stats", &stats, "Pass 1: per-row (max, sum exp, centred sum exp*z) partials and the target logit",
        py::arg("logits"), py::arg("tokens"), py::arg("vocab_start"), py::arg("num_chunks"), py::arg("stream"));
  m.def("grad", &grad, "Pass 2: dlogits = g_lp*(onehot - p) - g_h*p*(z - E_p[z])", py::arg("logits"),
        py::arg("dlogits"), py::arg("tokens"), py::arg("vocab_start"), py::arg("row_max"), py::arg("log_sum"),
        py::arg("mean_cent"), py::arg("g_lp"), py::arg("g_h"), py::arg("num_chunks"), py::arg("stream"));
  m.attr("BLOCK") = megaprorl::kPolicyLossBlock;
}
