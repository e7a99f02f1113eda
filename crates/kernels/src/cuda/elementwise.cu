// Fused elementwise kernels of tau-kernels on CUDA (the `cuda` feature): ReLU and the end of
// a residual block, forward and backward, one pass over memory each. build.rs compiles this
// file to PTX with nvcc (virtual architecture compute_75, so the driver JIT-compiles it for
// any GPU CUDA 13 supports); crates/kernels/src/cuda.rs launches the kernels.
//
// Every kernel handles one element per thread: i = blockIdx.x * blockDim.x + threadIdx.x,
// nothing past n.

// y = max(x, 0)
extern "C" __global__ void tau_relu_fwd(const unsigned int n, const float *x, float *y) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = fmaxf(x[i], 0.0f);
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
        y[i] = fmaxf(tau * (x[i] + b) + s[i], 0.0f);
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
        y[i] = fmaxf(x[i] + bc[0], 0.0f) + bc[1];
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
