// Small-anchor decode + class-aware NMS for one image, in five launches.
//
// Same contract as smearsight.runtime.postprocess.decode_nms (the NumPy reference):
//   1. threshold_kernel   sigmoid in float32, score > threshold -> per-class candidate keys
//   2. select_topk_kernel per class: radix-select the pre_nms_topk best keys, bitonic sort them
//   3. decode_kernel      float32 decode against the anchors (+ clip), same operation order as NumPy
//   4. nms_mask_kernel    64x64 tiles of IoU > threshold bits (torchvision's bitmask scheme)
//      nms_reduce_kernel  one warp per class walks the boxes in order (greedy, exact)
//   5. finalize_kernel + merge_kernel: global order (score desc, class asc, anchor asc) by rank
//      counting, fixed [max_det, 6] output, unused rows (0,0,0,0,0,-1).
//
// Keys are 64-bit and unique, so every step is deterministic whatever the thread schedule:
//   candidate key = (0x7FFFFFFF - float_bits(score)) << 32 | anchor   (smaller = better)
//   final key     = (0x7FFFFFFF - float_bits(score)) << 32 | class << 24 | anchor
// Arithmetic uses explicit round-to-nearest intrinsics so nvcc cannot contract it into FMAs: boxes
// and IoUs follow the NumPy reference's operation order. Scores are the sigmoid evaluated in double and
// rounded once to float on both sides, so they (and hence every ordering) are bit-identical. The box
// decode uses float expf like NumPy's float32 exp; the two may differ in the last bit of a box size,
// which can only change an NMS decision for an IoU within ~1e-7 of the threshold.

#ifndef SORT_CAP
#define SORT_CAP 4096            // max pre_nms_topk handled on the GPU (shared-memory sort)
#endif
#define MAX_COL_BLOCKS (SORT_CAP / 64)
#define TILE 64

typedef unsigned long long u64;

struct Box {
    float x1, y1, x2, y2;
};

__device__ __forceinline__ bool iou_above(const Box a, const Box b, float thr) {
    // torchvision order: inter / ((area_a + area_b) - inter), all float32
    float iw = fmaxf(__fsub_rn(fminf(a.x2, b.x2), fmaxf(a.x1, b.x1)), 0.0f);
    float ih = fmaxf(__fsub_rn(fminf(a.y2, b.y2), fmaxf(a.y1, b.y1)), 0.0f);
    float inter = __fmul_rn(iw, ih);
    float area_a = __fmul_rn(__fsub_rn(a.x2, a.x1), __fsub_rn(a.y2, a.y1));
    float area_b = __fmul_rn(__fsub_rn(b.x2, b.x1), __fsub_rn(b.y2, b.y1));
    float uni = __fsub_rn(__fadd_rn(area_a, area_b), inter);
    return __fdiv_rn(inter, uni) > thr;  // NaN (empty boxes) compares false
}

extern "C" {

// One thread per (anchor, class) logit. cand_counts must be zeroed before the launch.
__global__ void threshold_kernel(const float* __restrict__ logits, int num_anchors, int num_classes,
                                 float score_threshold, float logit_floor,
                                 u64* __restrict__ cand_keys, int* __restrict__ cand_counts) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)num_anchors * num_classes;
    if (i >= total) return;
    float x = logits[i];
    if (!(x > logit_floor)) return;  // cheap logit-space pre-filter (conservative)
    // sigmoid in double, rounded once to float: bit-identical to the NumPy reference (see header)
    float s = (float)__ddiv_rn(1.0, __dadd_rn(1.0, exp(-(double)x)));
    if (!(s > score_threshold)) return;
    int a = (int)(i / num_classes);
    int c = (int)(i - (long long)a * num_classes);
    int slot = atomicAdd(&cand_counts[c], 1);
    unsigned int inv = 0x7FFFFFFFu - __float_as_uint(s);
    cand_keys[(long long)c * num_anchors + slot] = ((u64)inv << 32) | (u64)(unsigned int)a;
}

// One block per class (blockDim a power of two, <= 1024). Keeps the k smallest keys, sorted.
__global__ void select_topk_kernel(const u64* __restrict__ cand_keys, const int* __restrict__ cand_counts,
                                   int num_anchors, int topk,
                                   u64* __restrict__ sel_keys, int* __restrict__ sel_counts) {
    __shared__ u64 s_keys[SORT_CAP];
    __shared__ unsigned int hist[256];
    __shared__ u64 s_prefix;
    __shared__ int s_remaining;
    __shared__ int s_count;

    const int c = blockIdx.x;
    const int tid = threadIdx.x;
    const int bd = blockDim.x;
    const u64* keys = cand_keys + (long long)c * num_anchors;
    const int n = cand_counts[c];
    const int k = min(n, topk);
    u64 cutoff = ~0ull;

    if (n > topk) {
        // radix select of the topk-th smallest key, most significant byte first
        u64 prefix = 0, mask = 0;
        int remaining = topk;
        for (int shift = 56; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += bd) hist[i] = 0;
            __syncthreads();
            for (int i = tid; i < n; i += bd) {
                u64 key = keys[i];
                if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255ull], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                int cum = 0, d = 0;
                for (; d < 255; ++d) {
                    if (cum + (int)hist[d] >= remaining) break;
                    cum += hist[d];
                }
                s_prefix = prefix | ((u64)d << shift);
                s_remaining = remaining - cum;
            }
            __syncthreads();
            prefix = s_prefix;
            remaining = s_remaining;
            mask |= (255ull << shift);
            __syncthreads();
        }
        cutoff = prefix;  // keys are unique: exactly topk keys are <= cutoff
    }

    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int i = tid; i < n; i += bd) {
        u64 key = keys[i];
        if (key <= cutoff) s_keys[atomicAdd(&s_count, 1)] = key;
    }
    __syncthreads();

    int m = 1;
    while (m < k) m <<= 1;
    for (int i = k + tid; i < m; i += bd) s_keys[i] = ~0ull;
    __syncthreads();
    // ascending bitonic sort of s_keys[0, m)
    for (int size = 2; size <= m; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < m; i += bd) {
                int j = i ^ stride;
                if (j > i) {
                    u64 a = s_keys[i], b = s_keys[j];
                    bool ascending = (i & size) == 0;
                    if ((a > b) == ascending) {
                        s_keys[i] = b;
                        s_keys[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int i = tid; i < k; i += bd) sel_keys[(long long)c * topk + i] = s_keys[i];
    if (tid == 0) sel_counts[c] = k;
}

// One thread per selected (class, rank). Same float32 operations as smearsight.anchors.decode_boxes.
__global__ void decode_kernel(const u64* __restrict__ sel_keys, const int* __restrict__ sel_counts,
                              const float* __restrict__ deltas, const float* __restrict__ anchors,
                              int num_classes, int topk, float log_clamp, int clip, float img_h, float img_w,
                              float* __restrict__ boxes) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= num_classes * topk) return;
    int c = t / topk, r = t - c * topk;
    if (r >= sel_counts[c]) return;
    int a = (int)(sel_keys[t] & 0xFFFFFFFFull);
    const float* an = anchors + 4ll * a;
    const float* d = deltas + 4ll * a;
    float aw = __fsub_rn(an[2], an[0]);
    float ah = __fsub_rn(an[3], an[1]);
    float acx = __fadd_rn(an[0], __fmul_rn(0.5f, aw));
    float acy = __fadd_rn(an[1], __fmul_rn(0.5f, ah));
    float cx = __fadd_rn(acx, __fmul_rn(d[0], aw));
    float cy = __fadd_rn(acy, __fmul_rn(d[1], ah));
    float w = __fmul_rn(aw, expf(fminf(d[2], log_clamp)));
    float h = __fmul_rn(ah, expf(fminf(d[3], log_clamp)));
    float hw = __fmul_rn(0.5f, w), hh = __fmul_rn(0.5f, h);
    float x1 = __fsub_rn(cx, hw), y1 = __fsub_rn(cy, hh);
    float x2 = __fadd_rn(cx, hw), y2 = __fadd_rn(cy, hh);
    if (clip) {
        x1 = fminf(fmaxf(x1, 0.0f), img_w);
        x2 = fminf(fmaxf(x2, 0.0f), img_w);
        y1 = fminf(fmaxf(y1, 0.0f), img_h);
        y2 = fminf(fmaxf(y2, 0.0f), img_h);
    }
    float* b = boxes + 4ll * t;
    b[0] = x1;
    b[1] = y1;
    b[2] = x2;
    b[3] = y2;
}

// grid (col_blocks, col_blocks, num_classes), block TILE. mask[c][i][col_block] bit j: IoU(i, j) > thr, j > i.
__global__ void nms_mask_kernel(const float* __restrict__ boxes, const int* __restrict__ sel_counts, int topk,
                                int col_blocks, float iou_threshold, u64* __restrict__ mask) {
    const int c = blockIdx.z;
    const int row_block = blockIdx.y, col_block = blockIdx.x;
    if (row_block > col_block) return;  // only the upper triangle is ever read
    const int n = sel_counts[c];
    const int row_size = min(n - row_block * TILE, TILE);
    const int col_size = min(n - col_block * TILE, TILE);
    if (row_size <= 0 || col_size <= 0) return;
    __shared__ Box cols[TILE];
    const float* cb = boxes + 4ll * ((long long)c * topk + col_block * TILE);
    if (threadIdx.x < col_size) {
        const float* p = cb + 4 * threadIdx.x;
        cols[threadIdx.x] = Box{p[0], p[1], p[2], p[3]};
    }
    __syncthreads();
    if (threadIdx.x < row_size) {
        const int i = row_block * TILE + threadIdx.x;
        const float* p = boxes + 4ll * ((long long)c * topk + i);
        const Box bi = Box{p[0], p[1], p[2], p[3]};
        u64 bits = 0;
        for (int j = (row_block == col_block) ? threadIdx.x + 1 : 0; j < col_size; ++j) {
            if (iou_above(bi, cols[j], iou_threshold)) bits |= 1ull << j;
        }
        mask[((long long)c * topk + i) * col_blocks + col_block] = bits;
    }
}

// One warp per class (blockDim 32): greedy walk in score order; kept[c][0..kept_counts[c]) = kept ranks.
__global__ void nms_reduce_kernel(const u64* __restrict__ mask, const int* __restrict__ sel_counts, int topk,
                                  int col_blocks, int* __restrict__ kept, int* __restrict__ kept_counts) {
    __shared__ u64 removed[MAX_COL_BLOCKS];
    const int c = blockIdx.x;
    const int lane = threadIdx.x;
    const int n = sel_counts[c];
    const int nb = (n + TILE - 1) / TILE;
    for (int j = lane; j < nb; j += 32) removed[j] = 0;
    __syncwarp();
    int nk = 0;
    for (int i = 0; i < n; ++i) {
        const int blk = i / TILE;
        const bool keep = !((removed[blk] >> (i % TILE)) & 1ull);
        __syncwarp();
        if (keep) {
            if (lane == 0) kept[(long long)c * topk + nk] = i;
            ++nk;
            const u64* p = mask + ((long long)c * topk + i) * col_blocks;
            for (int j = blk + lane; j < nb; j += 32) removed[j] |= p[j];
        }
        __syncwarp();
    }
    if (lane == 0) kept_counts[c] = nk;
}

__device__ __forceinline__ u64 final_key(const u64* sel_keys, const int* kept, int topk, int c, int r) {
    u64 key = sel_keys[(long long)c * topk + kept[(long long)c * topk + r]];
    return (key & 0xFFFFFFFF00000000ull) | ((u64)c << 24) | (key & 0xFFFFFFull);
}

// One block: count = min(sum kept, max_det); rows [count, max_det) = (0,0,0,0,0,-1).
__global__ void finalize_kernel(const int* __restrict__ kept_counts, int num_classes, int max_det,
                                float* __restrict__ out, int* __restrict__ out_count) {
    int total = 0;
    for (int c = 0; c < num_classes; ++c) total += kept_counts[c];
    const int count = min(total, max_det);
    for (int r = count + threadIdx.x; r < max_det; r += blockDim.x) {
        float* o = out + 6ll * r;
        o[0] = 0.0f; o[1] = 0.0f; o[2] = 0.0f; o[3] = 0.0f; o[4] = 0.0f; o[5] = -1.0f;
    }
    if (threadIdx.x == 0) *out_count = count;
}

// One thread per (class, kept rank): output row = rank among all kept by final key (merge by counting).
__global__ void merge_kernel(const u64* __restrict__ sel_keys, const float* __restrict__ boxes,
                             const int* __restrict__ kept, const int* __restrict__ kept_counts,
                             int num_classes, int topk, int max_det, float* __restrict__ out) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= num_classes * topk) return;
    const int c = t / topk, r = t - c * topk;
    if (r >= kept_counts[c]) return;
    const u64 key = final_key(sel_keys, kept, topk, c, r);
    int rank = r;  // kept lists are already in ascending final-key order within a class
    for (int c2 = 0; c2 < num_classes && rank < max_det; ++c2) {
        if (c2 == c) continue;
        int lo = 0, hi = kept_counts[c2];  // count of keys in class c2 smaller than key
        while (lo < hi) {
            int mid = (lo + hi) >> 1;
            if (final_key(sel_keys, kept, topk, c2, mid) < key) lo = mid + 1; else hi = mid;
        }
        rank += lo;
    }
    if (rank >= max_det) return;
    const int sel = kept[(long long)c * topk + r];
    const float* b = boxes + 4ll * ((long long)c * topk + sel);
    float* o = out + 6ll * rank;
    o[0] = b[0];
    o[1] = b[1];
    o[2] = b[2];
    o[3] = b[3];
    o[4] = __uint_as_float(0x7FFFFFFFu - (unsigned int)(key >> 32));
    o[5] = (float)c;
}

}  // extern "C"
