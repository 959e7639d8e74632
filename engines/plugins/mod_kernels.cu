// The MoD kernels on the GPU: the bodies of mod_kernels.h run by CUDA thread blocks.
#include "mod_kernels.h"
#include "mod_launch.h"

namespace gammamod
{
namespace
{

// A thread block as mod_kernels.h's Block: a lane is a thread.
struct GpuBlock
{
    uint32_t* warp_totals; // kWarps slots of shared memory

    template <class F>
    __device__ void lanes(F const& f)
    {
        f(threadIdx.x);
        __syncthreads();
    }

    // Warp-shuffle scans of each warp, then of the warp totals.
    __device__ uint32_t exclusive_scan(uint32_t const* in, uint32_t* out)
    {
        uint32_t const lane = threadIdx.x, warp = lane / 32, slot = lane % 32;
        uint32_t const value = in[lane];
        uint32_t sum = value;
        for (uint32_t offset = 1; offset < 32; offset *= 2)
        {
            uint32_t const below = __shfl_up_sync(0xFFFFFFFFu, sum, offset);
            sum += slot >= offset ? below : 0u;
        }
        if (slot == 31)
            warp_totals[warp] = sum;
        __syncthreads(); // every lane has read `in` (it may be `out`)
        if (warp == 0)
        {
            uint32_t total = slot < kWarps ? warp_totals[slot] : 0u;
            for (uint32_t offset = 1; offset < 32; offset *= 2)
            {
                uint32_t const below = __shfl_up_sync(0xFFFFFFFFu, total, offset);
                total += slot >= offset ? below : 0u;
            }
            if (slot < kWarps)
                warp_totals[slot] = total;
        }
        __syncthreads();
        out[lane] = (warp ? warp_totals[warp - 1] : 0u) + sum - value;
        uint32_t const total = warp_totals[kWarps - 1];
        __syncthreads(); // `out` is complete and warp_totals free for the next scan
        return total;
    }

    // Lanes of a warp that count into the same bin add once, together: a saturated router gives
    // every token the same score, and 512 atomics on one address would serialise.
    __device__ void count(uint32_t* bins, uint32_t bin)
    {
        uint32_t const peers = __match_any_sync(0xFFFFFFFFu, bin);
        if (bin != kNoBin && static_cast<int>(threadIdx.x % 32) == __ffs(peers) - 1)
            atomicAdd(&bins[bin], static_cast<uint32_t>(__popc(peers)));
    }
};

template <class Score>
__global__ void __launch_bounds__(kLanes) select_kernel(SelectArgs<Score> args)
{
    __shared__ SelectShared shared;
    GpuBlock block{shared.warp_totals};
    select_row(block, shared, args, blockIdx.x);
}

__global__ void __launch_bounds__(kLanes)
    scatter_inverse_kernel(int64_t const* kept, int32_t* inverse, int64_t tokens, int64_t kept_width)
{
    GpuBlock block{nullptr};
    scatter_inverse_row(block, kept, inverse, tokens, kept_width, blockIdx.x);
}

template <class Unit, class Rows>
__global__ void copy_rows_kernel(Rows rows, void* out, int64_t row_count, int64_t units)
{
    for (int64_t row = blockIdx.x; row < row_count; row += gridDim.x)
        copy_row<Unit>(rows, out, units, row, threadIdx.x, blockDim.x);
}

template <class Score>
cudaError_t select_as(void const* scores, SelectArgs<Score> args, cudaStream_t stream)
{
    args.scores = static_cast<Score const*>(scores);
    select_kernel<Score><<<static_cast<unsigned>(args.batch), kLanes, 0, stream>>>(args);
    return cudaGetLastError();
}

template <class Rows>
cudaError_t copy_rows(Rows const& rows, void* out, int64_t row_count, int64_t row_bytes, uintptr_t addresses,
    cudaStream_t stream)
{
    if (row_count == 0 || row_bytes == 0)
        return cudaSuccess;
    if (row_bytes % 2 != 0)
        return cudaErrorInvalidValue;
    int const unit = copy_unit_bytes(row_bytes, addresses);
    int64_t const units = row_bytes / unit;
    // a warp per 32 units up to 256 threads; blocks loop over rows beyond the grid's size
    unsigned const threads = static_cast<unsigned>(units >= 256 ? 256 : (units + 31) / 32 * 32);
    unsigned const blocks = static_cast<unsigned>(row_count < 65535 ? row_count : 65535);
    switch (unit)
    {
    case 16: copy_rows_kernel<Bytes16><<<blocks, threads, 0, stream>>>(rows, out, row_count, units); break;
    case 8: copy_rows_kernel<Bytes8><<<blocks, threads, 0, stream>>>(rows, out, row_count, units); break;
    case 4: copy_rows_kernel<uint32_t><<<blocks, threads, 0, stream>>>(rows, out, row_count, units); break;
    default: copy_rows_kernel<uint16_t><<<blocks, threads, 0, stream>>>(rows, out, row_count, units); break;
    }
    return cudaGetLastError();
}

} // namespace

cudaError_t launch_select(ScoreType type, void const* scores, int64_t const* span_start, int64_t const* span_length,
    int64_t const* capacity, int64_t* kept, int64_t* kept_count, int64_t batch, int64_t tokens, int64_t width,
    bool has_threshold, float threshold, cudaStream_t stream)
{
    if (batch == 0 || (width == 0 && kept_count == nullptr))
        return cudaSuccess;
    switch (type)
    {
    case ScoreType::kFloat:
        return select_as<float>(scores,
            SelectArgs<float>{nullptr, span_start, span_length, capacity, kept, kept_count, batch, tokens, width,
                threshold, has_threshold},
            stream);
    case ScoreType::kHalf:
        return select_as<Half>(scores,
            SelectArgs<Half>{nullptr, span_start, span_length, capacity, kept, kept_count, batch, tokens, width,
                threshold, has_threshold},
            stream);
    case ScoreType::kBFloat16:
        return select_as<BFloat16>(scores,
            SelectArgs<BFloat16>{nullptr, span_start, span_length, capacity, kept, kept_count, batch, tokens, width,
                threshold, has_threshold},
            stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t launch_gather(void const* x, int64_t const* kept, void* y, int64_t batch, int64_t tokens,
    int64_t kept_width, int64_t row_bytes, cudaStream_t stream)
{
    GatherRows const rows{x, kept, tokens, kept_width};
    return copy_rows(rows, y, batch * kept_width, row_bytes,
        reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y), stream);
}

size_t scatter_workspace_bytes(int64_t batch, int64_t tokens)
{
    return static_cast<size_t>(batch * tokens) * sizeof(int32_t);
}

cudaError_t launch_scatter(void const* x, int64_t const* kept, void const* y, void* out, void* workspace,
    int64_t batch, int64_t tokens, int64_t kept_width, int64_t row_bytes, cudaStream_t stream)
{
    if (batch == 0 || tokens == 0)
        return cudaSuccess;
    auto* inverse = static_cast<int32_t*>(workspace);
    scatter_inverse_kernel<<<static_cast<unsigned>(batch), kLanes, 0, stream>>>(kept, inverse, tokens, kept_width);
    cudaError_t const status = cudaGetLastError();
    if (status != cudaSuccess)
        return status;
    ScatterRows const rows{x, y, inverse, tokens, kept_width};
    return copy_rows(rows, out, batch * tokens, row_bytes,
        reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y) | reinterpret_cast<uintptr_t>(out), stream);
}

} // namespace gammamod
