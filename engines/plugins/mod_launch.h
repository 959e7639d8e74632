// Host entry points of the MoD kernels on the GPU (mod_kernels.cu), for the TensorRT plugins.
// Each enqueues on the given stream and returns the launch status: no synchronisation, no
// allocation (MoDScatter's inverse map lives in the workspace the caller passes).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace gammamod
{

enum class ScoreType
{
    kFloat,
    kHalf,
    kBFloat16
};

// MoDSelect (kept_count null, has_threshold false) and MoDSelectThreshold. span_length and
// capacity point to one int64 each in device memory.
cudaError_t launch_select(ScoreType type, void const* scores, int64_t const* span_start, int64_t const* span_length,
    int64_t const* capacity, int64_t* kept, int64_t* kept_count, int64_t batch, int64_t tokens, int64_t width,
    bool has_threshold, float threshold, cudaStream_t stream);

cudaError_t launch_gather(void const* x, int64_t const* kept, void* y, int64_t batch, int64_t tokens,
    int64_t kept_width, int64_t row_bytes, cudaStream_t stream);

// Workspace MoDScatter needs for `batch` rows of `tokens` tokens.
size_t scatter_workspace_bytes(int64_t batch, int64_t tokens);

cudaError_t launch_scatter(void const* x, int64_t const* kept, void const* y, void* out, void* workspace,
    int64_t batch, int64_t tokens, int64_t kept_width, int64_t row_bytes, cudaStream_t stream);

} // namespace gammamod
