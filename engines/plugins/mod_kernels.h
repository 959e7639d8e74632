// The MoD kernels: one source for the GPU and for the CPU harness that tests it.
//
// Every kernel body below is a __host__ __device__ template, written as steps over the lanes
// of a block separated by barriers, as a CUDA thread block runs them: a step reads values that
// are uniform for the block and the shared arrays, and writes only its own lane's slots (or
// counts through `count`). `Block` supplies what differs between the two platforms:
//
//   lanes(f)                  f(lane) for every lane in [0, kLanes), then a barrier
//   exclusive_scan(in, out)   out[l] = in[0] + ... + in[l-1] for every lane (in == out allowed);
//                             returns the total, the same in every lane
//   count(bins, bin)          bins[bin] += 1 for every lane that calls it (kNoBin: nothing)
//
// mod_kernels.cu implements them with threads, __syncthreads, warp shuffles and shared-memory
// atomics. cpu_harness.cpp runs the lanes of a step one after another, which is one legal
// schedule of the same program: the CPU computes what the GPU computes, from this file.
//
// Contracts (export/ops.py): MoDSelect(scores [B,T], span_start [B], N, k) -> kept [B, T-N+k]
// int64: per row the tokens before the span [s, s+N), the k highest-scoring span tokens
// (equal scores: the lower index first; NaN above everything and -0 equal to +0, as the eager
// op's stable sort), ascending, then the tokens after the span. MoDSelectThreshold reorders
// that row: the tokens outside the span and the kept ones scoring above the threshold first,
// then the kept ones at or below it (each part ascending), and counts the first part.
// MoDGather and MoDScatter move token rows.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define GM_HD __host__ __device__
#else
#define GM_HD
#endif

// Bumped whenever a kernel's results or its interface change: the manifest records it so that
// engines and plugin libraries of different kernels are not mixed.
#define GAMMAMOD_KERNELS_VERSION "1"

namespace gammamod
{

constexpr uint32_t kLanes = 512; // threads of a selection / inverse-map block
constexpr uint32_t kWarps = kLanes / 32;
constexpr uint32_t kKeyCache = 8192; // span keys held in shared memory (32 KiB)
constexpr uint32_t kNoBin = 0xFFFFFFFFu;

// ---------------------------------------------------------------------------------------------
// Scores: fp32, or fp16 / bf16 carried as their bit patterns (the same code on host and device).

struct Half
{
    uint16_t bits;
};

struct BFloat16
{
    uint16_t bits;
};

GM_HD inline float float_from_bits(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

GM_HD inline uint32_t bits_from_float(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

GM_HD inline float to_float(float v)
{
    return v;
}

GM_HD inline float to_float(BFloat16 v)
{
    return float_from_bits(static_cast<uint32_t>(v.bits) << 16);
}

// Exact: every fp16 value is an fp32 value.
GM_HD inline float to_float(Half v)
{
    uint32_t const sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
    uint32_t exponent = (v.bits >> 10) & 0x1Fu;
    uint32_t mantissa = v.bits & 0x3FFu;
    if (exponent == 0x1Fu) // inf, nan
        return float_from_bits(sign | 0x7F800000u | (mantissa << 13));
    if (exponent != 0)
        return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    if (mantissa == 0)
        return float_from_bits(sign);
    exponent = 113u; // a subnormal: shift its leading one into the implicit bit
    while ((mantissa & 0x400u) == 0)
    {
        mantissa <<= 1;
        --exponent;
    }
    return float_from_bits(sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13));
}

// An unsigned key that orders as the scores do. Every NaN maps to one key above +inf's and -0
// to +0's, so that they tie as in the eager op's sort.
GM_HD inline uint32_t score_key(float score)
{
    uint32_t const bits = score != score ? 0x7FC00000u : (score == 0.0f ? 0u : bits_from_float(score));
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

GM_HD inline float score_of_key(uint32_t key)
{
    return float_from_bits((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

GM_HD inline int64_t clamp64(int64_t v, int64_t low, int64_t high)
{
    return v < low ? low : (v > high ? high : v);
}

// ---------------------------------------------------------------------------------------------
// MoDSelect / MoDSelectThreshold: one block per row.
//
// A radix select over the span's keys, 8 bits a pass from the top: a 256-bin histogram of the
// candidates (the keys that agree with the bits decided so far) and a scan over the bins find
// the bin that holds the k-th largest key. It stops as soon as every remaining candidate is
// kept, or after the 4th pass, when the candidates are equal keys and the lowest indices are
// kept. Then each lane takes a contiguous chunk of the span; scans over the chunks' counts give
// every kept token its output position, so the kept tokens come out ascending with no sort.
// K is not limited (TensorRT's TopK needs K < 3840).
//
// Memory floor: read the span's scores once (N x 2 or 4 bytes) and write the output row once
// ((T - N + k) x 8 bytes, + 8 for the count). The kernel meets it for spans up to kKeyCache =
// 8192 tokens, whose keys stay in shared memory after one read; a longer span is read again
// on each pass (at most 5 more). For B = 1, T = 2880 the floor is ~29 KB: well under a
// microsecond of any GPU's bandwidth, so the time is the chain of dependent steps (at most 4
// passes of 2 barriers and a scan, then 3 scans), with 512 threads keeping the loads in flight.
// That chain, not bytes, is what the design keeps short: one kernel, no sort, no global atomics.

template <class Score>
struct SelectArgs
{
    Score const* scores;          // [B, T]
    int64_t const* span_start;    // [B]
    int64_t const* span_length;   // one value (device memory on the GPU)
    int64_t const* capacity;      // one value
    int64_t* kept;                // [B, width]
    int64_t* kept_count;          // [B]: MoDSelectThreshold; null for MoDSelect
    int64_t batch, tokens, width; // width: the output row's length, T - N + k
    float threshold;
    bool has_threshold;
};

struct SelectShared
{
    uint32_t keys[kKeyCache];
    uint32_t bins[kLanes]; // histogram by rank: bin 255 - digit, so a prefix counts larger keys
    uint32_t larger[kLanes];
    uint32_t rank[kLanes]; // per lane: candidates in the chunks before its own
    uint32_t high[kLanes]; // per lane: kept tokens above the threshold before its chunk
    uint32_t low[kLanes];  // ... and at or below it
    uint32_t warp_totals[kWarps];
    uint32_t prefix, mask, need, done;
};

template <class Block, class Score>
GM_HD void select_row(Block& blk, SelectShared& sh, SelectArgs<Score> const& a, int64_t row)
{
    // Values outside the contract are clamped so that nothing outside the buffers is touched;
    // the host side (run_cpu, the runtime) refuses them before they get here.
    int64_t const t_len = a.tokens, width = a.width;
    int64_t const n = clamp64(*a.span_length, 0, t_len);
    int64_t const k = clamp64(*a.capacity, 0, n);
    int64_t const start = clamp64(a.span_start[row], 0, t_len - n);
    Score const* span = a.scores + row * t_len + start;
    int64_t* out = a.kept + row * width;
    bool const cached = n <= static_cast<int64_t>(kKeyCache);
    int64_t const chunk = (n + kLanes - 1) / kLanes;

    blk.lanes([&](uint32_t lane) {
        if (cached)
            for (int64_t i = lane; i < n; i += kLanes)
                sh.keys[i] = score_key(to_float(span[i]));
        sh.bins[lane] = 0;
        if (lane == 0)
        {
            // prefix/mask: the key bits decided so far; need: how many candidates (keys equal to
            // prefix on mask) are kept, lowest index first
            sh.prefix = 0;
            sh.mask = 0;
            sh.need = static_cast<uint32_t>(k);
            sh.done = (k == 0 || k == n) ? 1u : 0u;
        }
    });

    for (int shift = 24; shift >= 0 && !sh.done; shift -= 8)
    {
        uint32_t const prefix = sh.prefix, mask = sh.mask, need = sh.need;
        blk.lanes([&](uint32_t lane) {
            for (int64_t base = 0; base < n; base += kLanes) // the same trip count in every lane
            {
                int64_t const i = base + lane;
                uint32_t bin = kNoBin;
                if (i < n)
                {
                    uint32_t const key = cached ? sh.keys[i] : score_key(to_float(span[i]));
                    if ((key & mask) == prefix)
                        bin = 255u - ((key >> shift) & 255u);
                }
                blk.count(sh.bins, bin);
            }
        });
        blk.exclusive_scan(sh.bins, sh.larger);
        blk.lanes([&](uint32_t lane) {
            uint32_t const larger = sh.larger[lane], here = sh.bins[lane];
            if (larger < need && need <= larger + here) // the one bin that holds the need-th key
            {
                sh.prefix = prefix | ((255u - lane) << shift);
                sh.mask = mask | (255u << shift);
                sh.need = need - larger;
                sh.done = (need - larger == here || shift == 0) ? 1u : 0u;
            }
            sh.bins[lane] = 0;
        });
    }

    uint32_t const prefix = sh.prefix, mask = sh.mask, need = sh.need;
    float const threshold = a.threshold;
    bool const has_threshold = a.has_threshold;
    auto key_at = [&](int64_t i) { return cached ? sh.keys[i] : score_key(to_float(span[i])); };
    auto chunk_end = [&](uint32_t lane) {
        return (lane + 1) * chunk < n ? (lane + 1) * chunk : n;
    };

    blk.lanes([&](uint32_t lane) {
        uint32_t candidates = 0;
        for (int64_t i = lane * chunk; i < chunk_end(lane); ++i)
            candidates += (key_at(i) & mask) == prefix;
        sh.rank[lane] = candidates;
    });
    blk.exclusive_scan(sh.rank, sh.rank);
    blk.lanes([&](uint32_t lane) {
        uint32_t rank = sh.rank[lane], high = 0, low = 0;
        for (int64_t i = lane * chunk; i < chunk_end(lane); ++i)
        {
            uint32_t const key = key_at(i);
            bool const kept = (key & mask) > prefix || ((key & mask) == prefix && rank++ < need);
            bool const at_or_below = has_threshold && score_of_key(key) <= threshold;
            high += kept && !at_or_below;
            low += kept && at_or_below;
        }
        sh.high[lane] = high;
        sh.low[lane] = low;
    });
    int64_t const high_total = blk.exclusive_scan(sh.high, sh.high);
    blk.exclusive_scan(sh.low, sh.low);

    // The first part, ascending: the tokens before the span, the kept span tokens above the
    // threshold, the tokens after the span; then the kept span tokens at or below it.
    int64_t const first = t_len - n + high_total;
    blk.lanes([&](uint32_t lane) {
        for (int64_t j = lane; j < start && j < width; j += kLanes)
            out[j] = j;
        for (int64_t t = start + n + lane; t < t_len; t += kLanes)
            if (start + high_total + (t - start - n) < width)
                out[start + high_total + (t - start - n)] = t;
        uint32_t rank = sh.rank[lane];
        int64_t high = start + sh.high[lane], low = first + sh.low[lane];
        for (int64_t i = lane * chunk; i < chunk_end(lane); ++i)
        {
            uint32_t const key = key_at(i);
            if (!((key & mask) > prefix || ((key & mask) == prefix && rank++ < need)))
                continue;
            int64_t& pos = (has_threshold && score_of_key(key) <= threshold) ? low : high;
            if (pos < width)
                out[pos] = start + i;
            ++pos;
        }
        if (lane == 0 && a.kept_count)
            a.kept_count[row] = first;
    });
}

// ---------------------------------------------------------------------------------------------
// MoDGather / MoDScatter: copies of whole token rows (H elements of 2 or 4 bytes), in the
// widest unit (16, 8, 4 or 2 bytes) that divides a row and both buffers' alignment.
//
// MoDGather's floor: read B*K rows of x, write B*K rows (+ 8 bytes of index a row). The kernel
// moves exactly that: one read and one write of each unit, 16-byte units on aligned rows.
// MoDScatter's output is a new buffer (TensorRT gives no aliasing here): its floor is reading
// B*T rows (each output row from x or from y, never both) and writing B*T rows. The kernel
// meets it with an inverse map, kept row of each output row (4 bytes a token, in the plugin's
// workspace, written by one small block per batch row), so it never copies x and then
// overwrites the kept rows (which would move 2*K rows more). Kept indices are distinct, as
// every MoDSelect output's are.

struct alignas(16) Bytes16
{
    uint32_t w[4];
};

struct alignas(8) Bytes8
{
    uint32_t w[2];
};

// The copy unit for rows of row_bytes at the given addresses (OR-ed together): 16, 8, 4 or 2.
GM_HD inline int copy_unit_bytes(int64_t row_bytes, uintptr_t addresses)
{
    for (int unit = 16; unit > 2; unit /= 2)
        if (row_bytes % unit == 0 && addresses % unit == 0)
            return unit;
    return 2;
}

// Output row r = b*K + j is x's row (b, kept[b, j]); an index outside [0, T) gives zeros.
struct GatherRows
{
    void const* x;
    int64_t const* kept;
    int64_t tokens, kept_width;

    template <class Unit>
    GM_HD Unit const* source(int64_t row, int64_t units) const
    {
        int64_t const t = kept[row];
        if (t < 0 || t >= tokens)
            return nullptr;
        return static_cast<Unit const*>(x) + ((row / kept_width) * tokens + t) * units;
    }
};

// Output row r = b*T + t is y's row (b, j) when t = kept[b, j], else x's row r.
struct ScatterRows
{
    void const* x;
    void const* y;
    int32_t const* inverse; // [B, T]: j, or -1
    int64_t tokens, kept_width;

    template <class Unit>
    GM_HD Unit const* source(int64_t row, int64_t units) const
    {
        int32_t const j = inverse[row];
        if (j < 0)
            return static_cast<Unit const*>(x) + row * units;
        return static_cast<Unit const*>(y) + ((row / tokens) * kept_width + j) * units;
    }
};

template <class Unit, class Rows>
GM_HD void copy_row(Rows const& rows, void* out, int64_t units, int64_t row, uint32_t lane, uint32_t lanes)
{
    Unit const* from = rows.template source<Unit>(row, units);
    Unit* to = static_cast<Unit*>(out) + row * units;
    for (int64_t c = lane; c < units; c += lanes)
        to[c] = from ? from[c] : Unit{};
}

// The inverse map of one batch row for MoDScatter: every token -1, then kept[b, j] -> j.
template <class Block>
GM_HD void scatter_inverse_row(
    Block& blk, int64_t const* kept, int32_t* inverse, int64_t tokens, int64_t kept_width, int64_t b)
{
    int32_t* inv = inverse + b * tokens;
    int64_t const* idx = kept + b * kept_width;
    blk.lanes([&](uint32_t lane) {
        for (int64_t t = lane; t < tokens; t += kLanes)
            inv[t] = -1;
    });
    blk.lanes([&](uint32_t lane) {
        for (int64_t j = lane; j < kept_width; j += kLanes)
            if (idx[j] >= 0 && idx[j] < tokens)
                inv[idx[j]] = static_cast<int32_t>(j);
    });
}

} // namespace gammamod
