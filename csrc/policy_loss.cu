// Fused per-token policy loss: row-statistics and gradient kernels (see policy_loss.h for the math).
//
// Depends on CUDA headers only (no torch), so CI compiles it with nvcc on machines without a GPU.
// Both kernels stream one row (or one vocab chunk of a row) per CTA with 16-byte vector loads and
// fp32 accumulation; the per-token loss math in between runs in torch ([T]-sized), see
// megaprorl/kernels/cuda_ext.py.

#include "policy_loss.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace megaprorl {
namespace {

constexpr int kBlock = kPolicyLossBlock;
constexpr int kWarps = kBlock / 32;
constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread per loop iteration
// 2 CTAs of 512 threads per SM: <= 64 registers per thread, 2048 x 16 B loads in flight per SM.
constexpr int kMinBlocksPerSm = 2;

// ---------------------------------------------------------------------------------------------------
// dtype helpers (explicit conversions only: torch builds with -D__CUDA_NO_HALF_CONVERSIONS__ etc.)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One 16-byte vector of T.
template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
  __device__ __forceinline__ Vec() {}
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&z)[Vec<T>::N]) {
  Vec<T> x;
  x.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) z[i] = to_float(x.v[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&g)[Vec<T>::N]) {
  Vec<T> x;
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) x.v[i] = from_float<T>(g[i]);
  *reinterpret_cast<uint4*>(p) = x.raw;
}

// Splits elements [begin, end) of row x into a scalar head up to the first 16-byte boundary, aligned
// 16-byte vectors [vbeg, vbeg + nvec * N) and a scalar tail.  vectorize == false: all scalars.
template <typename T>
__device__ __forceinline__ void split_range(const T* x, int64_t begin, int64_t end, bool vectorize, int64_t* vbeg,
                                            int64_t* nvec) {
  const int64_t n = end - begin;
  int64_t head = n;
  if (vectorize) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(x + begin);
    head = static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));
    if (head > n) head = n;
  }
  *vbeg = begin + head;
  *nvec = (end - *vbeg) / Vec<T>::N;
}

// Visits elements [begin, end) of row x (see split_range), kUnroll vectors per thread per iteration with
// all loads issued before use.  vec_fn(j, z[N]) gets the N values starting at element j; scalar_fn(j, z)
// one value.  vectorize == false (output row not aligned like the input row): scalars only.
template <typename T, typename VecFn, typename ScalarFn>
__device__ __forceinline__ void for_each_in_range(const T* x, int64_t begin, int64_t end, bool vectorize,
                                                  VecFn vec_fn, ScalarFn scalar_fn) {
  constexpr int N = Vec<T>::N;
  if (end <= begin) return;
  int64_t vbeg, nvec;
  split_range(x, begin, end, vectorize, &vbeg, &nvec);
  const int64_t tail = vbeg + nvec * N;

  for (int64_t j = begin + threadIdx.x; j < vbeg; j += kBlock) scalar_fn(j, to_float(x[j]));

  int64_t v = threadIdx.x;
  for (; v + (kUnroll - 1) * kBlock < nvec; v += kUnroll * kBlock) {
    float z[kUnroll][N];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec<T>(x + vbeg + (v + u * kBlock) * N, z[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vec_fn(vbeg + (v + u * kBlock) * N, z[u]);
  }
  for (; v < nvec; v += kBlock) {
    float z[N];
    load_vec<T>(x + vbeg + v * N, z);
    vec_fn(vbeg + v * N, z);
  }

  for (int64_t j = tail + threadIdx.x; j < end; j += kBlock) scalar_fn(j, to_float(x[j]));
}

// Writes zeros to elements [begin, end) of row y (no loads).
template <typename T>
__device__ __forceinline__ void zero_range(T* y, int64_t begin, int64_t end, bool vectorize) {
  constexpr int N = Vec<T>::N;
  if (end <= begin) return;
  int64_t vbeg, nvec;
  split_range(y, begin, end, vectorize, &vbeg, &nvec);
  const int64_t tail = vbeg + nvec * N;
  const T zero = from_float<T>(0.f);
  const uint4 zeros = make_uint4(0u, 0u, 0u, 0u);  // +0.0 in every dtype
  for (int64_t j = begin + threadIdx.x; j < vbeg; j += kBlock) y[j] = zero;
  for (int64_t v = threadIdx.x; v < nvec; v += kBlock) *reinterpret_cast<uint4*>(y + vbeg + v * N) = zeros;
  for (int64_t j = tail + threadIdx.x; j < end; j += kBlock) y[j] = zero;
}

// ---------------------------------------------------------------------------------------------------
// Online softmax statistics: m = max, s = sum exp(z - m), a = sum exp(z - m) (z - m).
// Empty state: m = -inf, s = a = 0.

struct Stats {
  float m, s, a;
};

__device__ __forceinline__ Stats empty_stats() { return Stats{-INFINITY, 0.f, 0.f}; }

// Move the reference point to new_m > st.m.  With d = m_old - m_new:
//   s' = e^d s,   a' = e^d (a + d s).
// Rare after the first few vectors, so precise expf.
__device__ __forceinline__ void rescale(Stats& st, float new_m) {
  const float d = st.m - new_m;
  const float e = expf(d);
  st.a = st.s > 0.f ? e * fmaf(d, st.s, st.a) : 0.f;  // s == 0: empty (d may be -inf)
  st.s *= e;
  st.m = new_m;
}

template <int N>
__device__ __forceinline__ void accumulate(Stats& st, const float (&z)[N]) {
  float vmax = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) vmax = fmaxf(vmax, z[i]);
  if (vmax > st.m) rescale(st, vmax);
  if (st.m == -INFINITY) return;  // only -inf logits so far: nothing to add
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = z[i] - st.m;
    // __expf (ex2.approx): ~2 ulp near 0, where the terms that matter are; see docs/cuda_kernel.md.
    const float e = __expf(d);
    st.s += e;
    st.a += e > 0.f ? e * d : 0.f;  // e == 0 also for z = -inf, where e * d would be NaN
  }
}

__device__ __forceinline__ Stats merge(const Stats& x, const Stats& y) {
  const float m = fmaxf(x.m, y.m);
  if (m == -INFINITY) return x;  // both empty
  const float dx = x.m - m, dy = y.m - m;
  const float ex = expf(dx), ey = expf(dy);
  Stats r;
  r.m = m;
  r.s = x.s * ex + y.s * ey;
  r.a = (x.s > 0.f ? ex * fmaf(dx, x.s, x.a) : 0.f) + (y.s > 0.f ? ey * fmaf(dy, y.s, y.a) : 0.f);
  return r;
}

__device__ __forceinline__ Stats warp_reduce(Stats st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.a = __shfl_xor_sync(0xffffffffu, st.a, off);
    st = merge(st, o);
  }
  return st;
}

// Result valid in thread 0.
__device__ __forceinline__ Stats block_reduce(Stats st) {
  __shared__ Stats smem[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? smem[lane] : empty_stats();
    st = warp_reduce(st);
  }
  return st;
}

// ---------------------------------------------------------------------------------------------------
// Kernels.  grid = (rows, chunks), one CTA per (row, vocab chunk).

template <typename T>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm)
    stats_kernel(const T* __restrict__ logits, int64_t vocab, int64_t chunk_len, const int64_t* __restrict__ tokens,
                 int64_t vocab_start, float* __restrict__ part_max, float* __restrict__ part_sum,
                 float* __restrict__ part_cent, float* __restrict__ target) {
  const int64_t row = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const T* x = logits + row * vocab;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = begin + chunk_len < vocab ? begin + chunk_len : vocab;

  Stats st = empty_stats();
  for_each_in_range<T>(
      x, begin, end, /*vectorize=*/true, [&](int64_t, const float(&z)[Vec<T>::N]) { accumulate(st, z); },
      [&](int64_t, float z) {
        const float zz[1] = {z};
        accumulate(st, zz);
      });
  st = block_reduce(st);

  if (threadIdx.x == 0) {
    const int64_t out = row * gridDim.y + chunk;
    part_max[out] = st.m;
    part_sum[out] = st.s;
    part_cent[out] = st.a;
    if (chunk == 0) {
      const int64_t local = tokens[row] - vocab_start;
      target[row] = (local >= 0 && local < vocab) ? to_float(x[local]) : 0.f;
    }
  }
}

// logits and dlogits may be the same buffer (in-place backward): every element is read and then written
// by the same thread, and nothing is read twice, so no __restrict__ / read-only cache on these two.
template <typename T>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm)
    grad_kernel(const T* logits, T* dlogits, int64_t vocab, int64_t chunk_len, const int64_t* __restrict__ tokens,
                int64_t vocab_start, const float* __restrict__ row_max, const float* __restrict__ log_sum,
                const float* __restrict__ mean_cent, const float* __restrict__ g_lp, const float* __restrict__ g_h) {
  constexpr int N = Vec<T>::N;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  T* dx = dlogits + row * vocab;
  const int64_t begin = blockIdx.y * chunk_len;
  const int64_t end = begin + chunk_len < vocab ? begin + chunk_len : vocab;
  // Vector path when the output row has the same 16-byte phase as the input row.
  const bool vectorize = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(dx)) & 15) == 0;

  const float glp = g_lp[row];
  const float gh = g_h != nullptr ? g_h[row] : 0.f;

  if (glp == 0.f && gh == 0.f) {  // masked token: zero gradient, without reading the logits
    zero_range<T>(dx, begin, end, /*vectorize=*/true);  // only dx is touched: its own alignment decides
    return;
  }

  const float m = row_max[row];
  const float ls = log_sum[row];
  const float mu = mean_cent[row];
  const int64_t tgt = tokens[row] - vocab_start;  // outside [0, vocab) when another shard holds it

  auto grad_of = [&](int64_t j, float z) -> float {
    const float zc = z - m;
    const float p = __expf(zc - ls);
    const float g = -p * fmaf(gh, zc - mu, glp);
    return j == tgt ? g + glp : g;
  };
  for_each_in_range<T>(
      x, begin, end, vectorize,
      [&](int64_t j, const float(&z)[N]) {
        float g[N];
#pragma unroll
        for (int i = 0; i < N; ++i) g[i] = grad_of(j + i, z[i]);
        store_vec<T>(dx + j, g);
      },
      [&](int64_t j, float z) { dx[j] = from_float<T>(grad_of(j, z)); });
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// Makes `device` current for the lifetime of the guard (kernels must launch on the stream's device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) == cudaSuccess && prev_ != device) {
      if (cudaSetDevice(device) == cudaSuccess) switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  bool switched_ = false;
};

template <typename T>
int launch_stats(const void* logits, int64_t rows, int64_t vocab, const int64_t* tokens, int64_t vocab_start,
                 int64_t requested_chunks, float* part_max, float* part_sum, float* part_cent, float* target,
                 cudaStream_t stream) {
  int64_t chunk_len, chunks;
  policy_loss_chunk_geometry(vocab, requested_chunks, &chunk_len, &chunks);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  stats_kernel<T><<<grid, kBlock, 0, stream>>>(static_cast<const T*>(logits), vocab, chunk_len, tokens, vocab_start,
                                                part_max, part_sum, part_cent, target);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_grad(const void* logits, void* dlogits, int64_t rows, int64_t vocab, const int64_t* tokens,
                int64_t vocab_start, const float* row_max, const float* log_sum, const float* mean_cent,
                const float* g_lp, const float* g_h, int64_t requested_chunks, cudaStream_t stream) {
  int64_t chunk_len, chunks;
  policy_loss_chunk_geometry(vocab, requested_chunks, &chunk_len, &chunks);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  grad_kernel<T><<<grid, kBlock, 0, stream>>>(static_cast<const T*>(logits), static_cast<T*>(dlogits), vocab,
                                               chunk_len, tokens, vocab_start, row_max, log_sum, mean_cent, g_lp,
                                               g_h);
  return static_cast<int>(cudaGetLastError());
}

bool bad_shape(int64_t rows, int64_t vocab) { return rows < 0 || rows > INT_MAX || vocab <= 0; }

}  // namespace

int policy_loss_stats(LogitsDType dtype, const void* logits, int64_t rows, int64_t vocab, const int64_t* tokens,
                      int64_t vocab_start, int64_t requested_chunks, float* part_max, float* part_sum,
                      float* part_cent, float* target, int device, void* stream) {
  if (bad_shape(rows, vocab)) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  DeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case LogitsDType::kFloat32:
      return launch_stats<float>(logits, rows, vocab, tokens, vocab_start, requested_chunks, part_max, part_sum,
                                 part_cent, target, s);
    case LogitsDType::kFloat16:
      return launch_stats<__half>(logits, rows, vocab, tokens, vocab_start, requested_chunks, part_max, part_sum,
                                  part_cent, target, s);
    case LogitsDType::kBFloat16:
      return launch_stats<__nv_bfloat16>(logits, rows, vocab, tokens, vocab_start, requested_chunks, part_max,
                                         part_sum, part_cent, target, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int policy_loss_grad(LogitsDType dtype, const void* logits, void* dlogits, int64_t rows, int64_t vocab,
                     const int64_t* tokens, int64_t vocab_start, const float* row_max, const float* log_sum,
                     const float* mean_cent, const float* g_lp, const float* g_h, int64_t requested_chunks,
                     int device, void* stream) {
  if (bad_shape(rows, vocab)) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  DeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case LogitsDType::kFloat32:
      return launch_grad<float>(logits, dlogits, rows, vocab, tokens, vocab_start, row_max, log_sum, mean_cent,
                                g_lp, g_h, requested_chunks, s);
    case LogitsDType::kFloat16:
      return launch_grad<__half>(logits, dlogits, rows, vocab, tokens, vocab_start, row_max, log_sum, mean_cent,
                                 g_lp, g_h, requested_chunks, s);
    case LogitsDType::kBFloat16:
      return launch_grad<__nv_bfloat16>(logits, dlogits, rows, vocab, tokens, vocab_start, row_max, log_sum,
                                        mean_cent, g_lp, g_h, requested_chunks, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* policy_loss_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace megaprorl
