// Fused per-token policy loss: the interface between the CUDA kernels (policy_loss.cu) and the torch
// glue (bindings.cpp).
//
// This header is plain C++ (no CUDA, no torch): kernels take raw pointers, the CUDA stream as an
// opaque pointer and the device index, so policy_loss.cu compiles with nvcc and CUDA headers alone
// and bindings.cpp compiles against torch headers alone (a CPU wheel of torch lacks the generated
// c10/cuda headers and cuBLAS/cuSPARSE, which ATen/cuda needs).  See docs/cuda_kernel.md.
//
// Row statistics (fp32), per row t of logits z [T, V_local] and per vocab chunk c:
//   m   = max_j z_j
//   s   = sum_j exp(z_j - m)
//   a   = sum_j exp(z_j - m) * (z_j - m)           (centred: keeps H accurate at |z| ~ 1e4)
//   z_y = z[token - vocab_start] if the token falls in this shard, else 0 (written by chunk 0 only)
// so that, after merging chunks and TP ranks, lse = m + log s, logp = z_y - lse, H = log s - a / s.
//
// Gradient (second pass), with p_j = exp(z_j - m - log s) and mu = a / s = E_p[z] - m:
//   dz_j = g_lp * (onehot_j - p_j) - g_h * p_j * (z_j - m - mu)
#pragma once

#include <cstdint>

namespace megaprorl {

enum class LogitsDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Threads per CTA of both kernels.
constexpr int kPolicyLossBlock = 512;

// Split of one row of `vocab` logits into at most `requested` chunks (one CTA each).  Chunk lengths are
// multiples of 8 elements so that chunk starts keep the row's 16-byte alignment.  Always >= 1 chunk.
inline void policy_loss_chunk_geometry(int64_t vocab, int64_t requested, int64_t* chunk_len, int64_t* num_chunks) {
  if (requested < 1) requested = 1;
  if (requested > 65535) requested = 65535;  // gridDim.y limit
  int64_t len = (vocab + requested - 1) / requested;
  len = ((len + 7) / 8) * 8;
  if (len < 8) len = 8;
  *chunk_len = len;
  *num_chunks = vocab > 0 ? (vocab + len - 1) / len : 1;
}

// Pass 1.  logits: [rows, vocab] contiguous; tokens: [rows] int64 (global vocabulary ids).
// Outputs: part_max / part_sum / part_cent [rows, num_chunks] fp32 (num_chunks from
// policy_loss_chunk_geometry), target [rows] fp32.  Returns a cudaError_t value (0 = success).
int policy_loss_stats(LogitsDType dtype, const void* logits, int64_t rows, int64_t vocab, const int64_t* tokens,
                      int64_t vocab_start, int64_t requested_chunks, float* part_max, float* part_sum,
                      float* part_cent, float* target, int device, void* stream);

// Pass 2.  Writes dlogits [rows, vocab] (same dtype as logits; may be the logits buffer itself).
// row_max, log_sum, mean_cent, g_lp: [rows] fp32; g_h: [rows] fp32 or nullptr (no entropy term).
// Rows with g_lp == g_h == 0 get zeros without reading the logits.  Returns a cudaError_t value.
int policy_loss_grad(LogitsDType dtype, const void* logits, void* dlogits, int64_t rows, int64_t vocab,
                     const int64_t* tokens, int64_t vocab_start, const float* row_max, const float* log_sum,
                     const float* mean_cent, const float* g_lp, const float* g_h, int64_t requested_chunks,
                     int device, void* stream);

// cudaGetErrorString for a value returned above.
const char* policy_loss_error_string(int error);

}  // namespace megaprorl
