// The CPU harness: runs mod_kernels.h's kernel bodies over the whole index space on the host,
// so CI tests the kernels' own source (gammamod.engines.kernels.run_cpu loads this with ctypes).
// A block runs its lanes one after another within each step: the steps only share data across
// barriers, so this is one of the schedules a GPU may pick. Not part of the plugin library.
#include "mod_kernels.h"

#include <memory>
#include <new>

namespace gammamod
{
namespace
{

struct SerialBlock
{
    template <class F>
    void lanes(F const& f)
    {
        for (uint32_t lane = 0; lane < kLanes; ++lane)
            f(lane);
    }

    uint32_t exclusive_scan(uint32_t const* in, uint32_t* out)
    {
        uint32_t sum = 0;
        for (uint32_t lane = 0; lane < kLanes; ++lane)
        {
            uint32_t const value = in[lane];
            out[lane] = sum;
            sum += value;
        }
        return sum;
    }

    void count(uint32_t* bins, uint32_t bin)
    {
        if (bin != kNoBin)
            ++bins[bin];
    }
};

template <class Score>
int select_rows(SelectArgs<Score> const& args)
{
    std::unique_ptr<SelectShared> shared(new (std::nothrow) SelectShared);
    if (!shared)
        return 1;
    SerialBlock block;
    for (int64_t row = 0; row < args.batch; ++row) // the grid: one block per row
        select_row(block, *shared, args, row);
    return 0;
}

template <class Rows>
int copy_rows(Rows const& rows, void* out, int64_t row_count, int64_t row_bytes, uintptr_t addresses)
{
    if (row_bytes % 2 != 0)
        return 1;
    int const unit = copy_unit_bytes(row_bytes, addresses);
    int64_t const units = row_bytes / unit;
    for (int64_t row = 0; row < row_count; ++row)
        switch (unit)
        {
        case 16: copy_row<Bytes16>(rows, out, units, row, 0, 1); break;
        case 8: copy_row<Bytes8>(rows, out, units, row, 0, 1); break;
        case 4: copy_row<uint32_t>(rows, out, units, row, 0, 1); break;
        default: copy_row<uint16_t>(rows, out, units, row, 0, 1); break;
        }
    return 0;
}

} // namespace
} // namespace gammamod

using namespace gammamod;

extern "C"
{

char const* gm_kernels_version()
{
    return GAMMAMOD_KERNELS_VERSION;
}

// score_type: 0 fp32, 1 fp16 bits, 2 bf16 bits. kept_count may be null (MoDSelect).
int gm_select(int score_type, void const* scores, int64_t const* span_start, int64_t span_length, int64_t capacity,
    int64_t* kept, int64_t* kept_count, int64_t batch, int64_t tokens, int64_t width, int has_threshold,
    float threshold)
{
    switch (score_type)
    {
    case 0:
        return select_rows(SelectArgs<float>{static_cast<float const*>(scores), span_start, &span_length, &capacity,
            kept, kept_count, batch, tokens, width, threshold, has_threshold != 0});
    case 1:
        return select_rows(SelectArgs<Half>{static_cast<Half const*>(scores), span_start, &span_length, &capacity,
            kept, kept_count, batch, tokens, width, threshold, has_threshold != 0});
    case 2:
        return select_rows(SelectArgs<BFloat16>{static_cast<BFloat16 const*>(scores), span_start, &span_length,
            &capacity, kept, kept_count, batch, tokens, width, threshold, has_threshold != 0});
    default: return 1;
    }
}

int gm_gather(void const* x, int64_t const* kept, void* y, int64_t batch, int64_t tokens, int64_t kept_width,
    int64_t row_bytes)
{
    GatherRows const rows{x, kept, tokens, kept_width};
    return copy_rows(rows, y, batch * kept_width, row_bytes,
        reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y));
}

// workspace: batch * tokens int32 (the inverse map, as on the GPU)
int gm_scatter(void const* x, int64_t const* kept, void const* y, void* out, int32_t* workspace, int64_t batch,
    int64_t tokens, int64_t kept_width, int64_t row_bytes)
{
    SerialBlock block;
    for (int64_t b = 0; b < batch; ++b)
        scatter_inverse_row(block, kept, workspace, tokens, kept_width, b);
    ScatterRows const rows{x, y, workspace, tokens, kept_width};
    return copy_rows(rows, out, batch * tokens, row_bytes,
        reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y) | reinterpret_cast<uintptr_t>(out));
}

} // extern "C"
