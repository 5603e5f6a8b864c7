// Frame -> model input on the GPU (TensorRT path): letterbox/stretch/pad + colour + normalisation.
//
// One thread per output pixel. Input: RGB uint8 HWC frame. Output: float NCHW (batch 1) written straight
// into the engine's input buffer. Resizing is bilinear with half-pixel centres (OpenCV INTER_LINEAR's
// geometry; values are rounded to uint8 like OpenCV before normalising, so they match the CPU path to
// within a grey level when enlarging; when shrinking the CPU path uses INTER_AREA and this one samples
// the 2x2 neighbourhood). Normalisation uses the same per-channel 256-entry tables as the CPU path.

extern "C" __global__ void preprocess_kernel(const unsigned char* __restrict__ frame, int fh, int fw,
                                             float* __restrict__ out, int out_h, int out_w, int nh, int nw,
                                             float inv_scale_y, float inv_scale_x, int color_mode,
                                             const float* __restrict__ lut, int pad_index) {
    // color_mode: 0 rgb, 1 bgr, 2 gray (one output channel)
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= out_w || y >= out_h) return;
    const int channels = color_mode == 2 ? 1 : 3;
    const long long plane = (long long)out_h * out_w;
    const long long o = (long long)y * out_w + x;
    if (x >= nw || y >= nh) {
        for (int c = 0; c < channels; ++c) out[c * plane + o] = lut[c * 256 + pad_index];
        return;
    }
    float sx = ((float)x + 0.5f) * inv_scale_x - 0.5f;
    float sy = ((float)y + 0.5f) * inv_scale_y - 0.5f;
    sx = fminf(fmaxf(sx, 0.0f), (float)(fw - 1));
    sy = fminf(fmaxf(sy, 0.0f), (float)(fh - 1));
    const int x0 = (int)sx, y0 = (int)sy;
    const int x1 = min(x0 + 1, fw - 1), y1 = min(y0 + 1, fh - 1);
    const float ax = sx - (float)x0, ay = sy - (float)y0;
    float rgb[3];
    for (int c = 0; c < 3; ++c) {
        const float p00 = frame[((long long)y0 * fw + x0) * 3 + c];
        const float p01 = frame[((long long)y0 * fw + x1) * 3 + c];
        const float p10 = frame[((long long)y1 * fw + x0) * 3 + c];
        const float p11 = frame[((long long)y1 * fw + x1) * 3 + c];
        const float top = p00 + (p01 - p00) * ax;
        const float bottom = p10 + (p11 - p10) * ax;
        rgb[c] = fminf(fmaxf(rintf(top + (bottom - top) * ay), 0.0f), 255.0f);
    }
    if (color_mode == 2) {
        // OpenCV's RGB2GRAY weights, rounded
        const int g = (int)rintf(0.299f * rgb[0] + 0.587f * rgb[1] + 0.114f * rgb[2]);
        out[o] = lut[min(max(g, 0), 255)];
        return;
    }
    for (int c = 0; c < 3; ++c) {
        const int src = color_mode == 1 ? 2 - c : c;
        out[c * plane + o] = lut[c * 256 + (int)rgb[src]];
    }
}
