// Fused elementwise kernels of tau-kernels on CUDA (the `cuda` feature): ReLU and the end of
// a residual block, forward and backward, one pass over memory each. build.rs compiles this
// file to PTX with nvcc (virtual architecture compute_75, so the driver JIT-compiles it for
// any GPU CUDA 13 supports); crates/kernels/src/cuda.rs launches the kernels.
//
// Every kernel handles one element per thread: i = blockIdx.x * blockDim.x + threadIdx.x,
// nothing past n.

// max(v, 0) keeping a NaN, as PyTorch's ReLU and the CPU kernels do (fmaxf would return 0).
__device__ __forceinline__ float tau_relu(const float v) { return 0.0f > v ? 0.0f : v; }

// y = max(x, 0)
extern "C" __global__ void tau_relu_fwd(const unsigned int n, const float *x, float *y) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = tau_relu(x[i]);
    }
}

// dx = dy where y > 0, else 0 (the gradient of ReLU at 0 is 0, as on the CPU and in PyTorch)
extern "C" __global__ void tau_relu_bwd(const unsigned int n, const float *dy, const float *y,
                                        float *dx) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
    }
}

// y = max(tau * (x + b) + s, 0), where ab = [tau] (has_b = 0) or [tau, b] (has_b = 1)
extern "C" __global__ void tau_residual_relu_fwd(const unsigned int n, const float *x,
                                                 const float *ab, const int has_b,
                                                 const float *s, float *y) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float tau = ab[0];
        const float b = has_b ? ab[1] : 0.0f;
        y[i] = tau_relu(tau * (x[i] + b) + s[i]);
    }
}

// With m = dy where y > 0 (else 0): dx = tau * m into out[0, n), ds = m into out[n, 2n).
extern "C" __global__ void tau_residual_relu_bwd(const unsigned int n, const float *dy,
                                                 const float *y, const float *ab, float *out) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float m = y[i] > 0.0f ? dy[i] : 0.0f;
        out[i] = ab[0] * m;
        out[n + i] = m;
    }
}

// y = max(x + bc[0], 0) + bc[1]: the middle of a no-BN basic block
extern "C" __global__ void tau_bias_relu_bias_fwd(const unsigned int n, const float *x,
                                                  const float *bc, float *y) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = tau_relu(x[i] + bc[0]) + bc[1];
    }
}

// dx = dy where x + b > 0, else 0
extern "C" __global__ void tau_bias_relu_bias_bwd(const unsigned int n, const float *dy,
                                                  const float *x, const float *bc, float *dx) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        dx[i] = x[i] + bc[0] > 0.0f ? dy[i] : 0.0f;
    }
}

// One SGD step of one parameter, as tau_kernels::sgd computes it on the CPU (its module docs
// give the update), in the same f32 operations: __fmul_rn / __fadd_rn are never contracted
// into a multiply-add, and the `+ 0.0f` terms are those of candle's affine (v * a + b).
// d = g·s (use_scale) + w·λ (use_coupled)
__device__ __forceinline__ float sgd_direction(float g, float w, int use_scale, float scale,
                                               int use_coupled, float coupled) {
    float d = use_scale ? __fadd_rn(__fmul_rn(g, scale), 0.0f) : g;
    if (use_coupled) {
        d = __fadd_rn(d, __fadd_rn(__fmul_rn(w, coupled), 0.0f));
    }
    return d;
}

// b = d (first) or b·μ + d
extern "C" __global__ void tau_sgd_buffer(const unsigned int n, float *b, const float *g,
                                          const float *w, const int use_scale, const float scale,
                                          const int use_coupled, const float coupled,
                                          const float mu, const int first) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float d = sgd_direction(g[i], w[i], use_scale, scale, use_coupled, coupled);
        b[i] = first ? d : __fadd_rn(__fadd_rn(__fmul_rn(b[i], mu), 0.0f), d);
    }
}

// w = w·k (use_decay) − step·η, step = d (no buffer), b (momentum) or d + b·μ (Nesterov);
// b is the new buffer (read only when has_buf).
extern "C" __global__ void tau_sgd_weight(const unsigned int n, float *w, const float *g,
                                          const float *b, const int has_buf,
                                          const int use_scale, const float scale,
                                          const int use_coupled, const float coupled,
                                          const int use_decay, const float decay,
                                          const float mu, const int nesterov, const float lr) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float wi = w[i];
        const float d = sgd_direction(g[i], wi, use_scale, scale, use_coupled, coupled);
        float step = d;
        if (has_buf) {
            step = nesterov ? __fadd_rn(d, __fadd_rn(__fmul_rn(b[i], mu), 0.0f)) : b[i];
        }
        const float wd = use_decay ? __fadd_rn(__fmul_rn(wi, decay), 0.0f) : wi;
        w[i] = __fsub_rn(wd, __fadd_rn(__fmul_rn(step, lr), 0.0f));
    }
}
