//! The theory network's matrix products, with the `gemm` crate: its residual block
//! relu(h + τ·h·Wᵀ) as one op with a closed-form backward ([`residual_dense_relu`], what
//! full-batch gradient descent runs), and the block product for the stability probe (many
//! hidden states times one m × m weight, into a caller's buffer: [`block_matmul_f32`]).

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elementwise::MaskSum;
use crate::util::{f32_data, fused_f32};

/// gemm's parallelism: rayon's pool when it has more than one thread.
fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// dst (rows × cols, row-major, `read_dst`: dst + beta·lhs·rhs, else beta·lhs·rhs) for a
/// lhs of rows × depth and a rhs of depth × cols, each addressed by (column, row) strides.
///
/// # Safety
/// Every pointer addresses the elements its sizes and strides reach; `dst` aliases
/// neither input.
unsafe fn gemm_f32(
    (rows, cols, depth): (usize, usize, usize),
    dst: *mut f32,
    read_dst: bool,
    (lhs, lhs_cs, lhs_rs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
    beta: f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            depth,
            dst,
            1,
            cols as isize,
            read_dst,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// The theory network's residual block relu(`h` + τ·`h`·`w`ᵀ): rows of `h` (n × m) are
/// hidden states, `w` is one m × m W_l.
///
/// On the CPU for `f32`, one op: one GEMM for τ·w·hᵀ, then one pass that adds its
/// transpose to `h` and applies the ReLU; its backward is closed-form, with g = dy ⊙ 1(y > 0):
/// dh = g + τ·g·w and dw = τ·gᵀ·h, two GEMMs. Elsewhere (or when
/// [`crate::select`] says so) candle's composition of the same expression.
///
/// # Example
///
/// ```
/// use candle::{Device, Tensor, Var};
///
/// # fn main() -> candle::Result<()> {
/// let h = Var::randn(0f32, 1., (4, 8), &Device::Cpu)?;
/// let w = Var::randn(0f32, 0.3, (8, 8), &Device::Cpu)?;
/// let y = tau_kernels::matmul::residual_dense_relu(h.as_tensor(), w.as_tensor(), 0.5)?;
/// let composed = (h.as_tensor() + (h.matmul(&w.t()?)? * 0.5)?)?.relu()?;
/// assert!((y.sum_all()?.backward()?.get(w.as_tensor()).unwrap().dims()) == [8, 8]);
/// let diff = (y - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// # Ok(()) }
/// ```
///
/// # Errors
/// `h` not n × m or `w` not m × m, or a device error.
pub fn residual_dense_relu(h: &Tensor, w: &Tensor, tau: f64) -> Result<Tensor> {
    let (_, m) = h.dims2()?;
    if w.dims() != [m, m] {
        candle::bail!(
            "residual_dense_relu: weight {:?} for hidden states of width {m} (expected [{m}, {m}])",
            w.dims()
        )
    }
    if !fused_f32(&[h, w]) {
        return (h + (h.matmul(&w.t()?)? * tau)?)?.relu();
    }
    h.contiguous()?
        .apply_op2(&w.contiguous()?, ResidualDense { tau: tau as f32 })
}

/// Forward of [`residual_dense_relu`]: (h, w) → relu(h + τ·h·wᵀ).
struct ResidualDense {
    tau: f32,
}

impl CustomOp2 for ResidualDense {
    fn name(&self) -> &'static str {
        "residual-dense-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, m) = l1.shape().dims2()?;
        let h = f32_data(s1, l1, n * m, self.name(), "hidden states")?;
        let w = f32_data(s2, l2, m * m, self.name(), "weight")?;
        // The product as τ·W·hᵀ (m × n, row-major), then y = relu(h + its transpose):
        // the `gemm` crate runs W·hᵀ, with W as its left operand read row by row, three
        // to four times faster than h·Wᵀ, whose right operand it reads transposed (m =
        // 512, n = 32, measured), and the transpose is one pass over n × m values.
        let mut p = vec![0f32; m * n];
        if n > 0 && m > 0 {
            // SAFETY: p holds m × n elements, w m × m, h n × m; p is a fresh vector.
            // Element (k, j) of hᵀ is h[j][k]: column stride m, row stride 1.
            unsafe {
                gemm_f32(
                    (m, n, m),
                    p.as_mut_ptr(),
                    false,
                    (w.as_ptr(), 1, m),
                    (h.as_ptr(), m, 1),
                    self.tau,
                )
            };
        }
        let mut y = vec![0f32; n * m];
        y.par_chunks_mut(m.max(1))
            .zip(h.par_chunks(m.max(1)))
            .enumerate()
            .for_each(|(j, (yr, hr))| {
                for (i, (o, &hv)) in yr.iter_mut().zip(hr).enumerate() {
                    *o = (hv + p[i * n + j]).max(0.0);
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let len = dy.elem_count();
        let g = dy
            .contiguous()?
            .apply_op2_no_bwd(&y.contiguous()?, &MaskSum { relu: true })?
            .narrow(0, 0, len)?;
        let packed = g.apply_op3_no_bwd(h, w, &ResidualDenseBwd { tau: self.tau })?;
        let m2 = w.elem_count();
        let dh = packed.narrow(0, 0, len)?.reshape(h.shape())?;
        let dw = packed.narrow(0, len, m2)?.reshape(w.shape())?;
        Ok((Some(dh), Some(dw)))
    }
}

/// Backward of [`residual_dense_relu`]: (g, h, w) → [g + τ·g·w, τ·gᵀ·h], packed.
struct ResidualDenseBwd {
    tau: f32,
}

impl CustomOp3 for ResidualDenseBwd {
    fn name(&self) -> &'static str {
        "residual-dense-relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, m) = l2.shape().dims2()?;
        let g = f32_data(s1, l1, n * m, self.name(), "masked gradient")?;
        let h = f32_data(s2, l2, n * m, self.name(), "hidden states")?;
        let w = f32_data(s3, l3, m * m, self.name(), "weight")?;
        let mut out = Vec::with_capacity(n * m + m * m);
        out.extend_from_slice(g);
        out.resize(n * m + m * m, 0.0);
        if n > 0 && m > 0 {
            let (dh, dw) = out.split_at_mut(n * m);
            // SAFETY: dh holds n × m elements and dw m × m, disjoint halves of `out`; g
            // and h hold n × m, w m × m.
            unsafe {
                // dh = g + τ·g·w (w row-major: column stride 1, row stride m).
                gemm_f32(
                    (n, m, m),
                    dh.as_mut_ptr(),
                    true,
                    (g.as_ptr(), 1, m),
                    (w.as_ptr(), 1, m),
                    self.tau,
                );
                // dw = τ·gᵀ·h: element (i, k) of gᵀ is g[k][i].
                gemm_f32(
                    (m, m, n),
                    dw.as_mut_ptr(),
                    false,
                    (g.as_ptr(), m, 1),
                    (h.as_ptr(), 1, m),
                    self.tau,
                );
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n * m + m * m)))
    }
}

/// The product of many hidden states with one block weight, written into a caller's
/// buffer: `out = xs · wᵀ` (`transpose_w`, the forward pass, rows of `xs` as hidden
/// states) or `out = xs · w` (the backward pass), all row-major f32, `xs` and `out`
/// rows × m, `w` m × m (a W_l). The stability probe runs thousands of these per network
/// and reuses its buffers; on rayon's pool when it has more than one thread.
///
/// # Errors
/// Slices whose lengths do not match `rows` and `m`.
pub fn block_matmul_f32(
    xs: &[f32],
    w: &[f32],
    out: &mut [f32],
    rows: usize,
    m: usize,
    transpose_w: bool,
) -> Result<()> {
    let rm = rows.checked_mul(m);
    if rm != Some(xs.len()) || rm != Some(out.len()) || m.checked_mul(m) != Some(w.len()) {
        candle::bail!(
            "block matmul: {} and {} values for {rows} rows of width {m}, weight of {} values",
            xs.len(),
            out.len(),
            w.len()
        )
    }
    if rows == 0 || m == 0 {
        return Ok(());
    }
    // Element (k, j) of the right-hand side is w[j][k] for xs · wᵀ, w[k][j] for xs · w.
    let (rhs_cs, rhs_rs) = if transpose_w { (m, 1) } else { (1, m) };
    // SAFETY: every slice holds exactly the elements the sizes and strides address
    // (checked above), and `out` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm_f32(
            (rows, m, m),
            out.as_mut_ptr(),
            false,
            (xs.as_ptr(), 1, m),
            (w.as_ptr(), rhs_cs, rhs_rs),
            1.0,
        )
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{compare, random};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn residual_dense_relu_matches_candle_in_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Widths that are not multiples of any SIMD width, a single row, a square case.
        for (n, m, tau) in [(6, 40, 0.3), (1, 17, 1.0), (33, 33, 0.05)] {
            let h = random(&mut rng, &[n, m], -1.0, 1.0);
            let w = random(&mut rng, &[m, m], -0.5, 0.5);
            compare(
                &[h, w],
                |t| residual_dense_relu(t[0], t[1], tau).unwrap(),
                |t, _| {
                    (t[0] + (t[0].matmul(&t[1].t().unwrap()).unwrap() * tau).unwrap())
                        .unwrap()
                        .relu()
                        .unwrap()
                },
                &format!("residual_dense_relu n={n} m={m} tau={tau}"),
            );
        }
    }

    #[test]
    fn residual_dense_relu_rejects_mismatched_weights() {
        let h = Tensor::zeros((2, 3), candle::DType::F32, &candle::Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 4), candle::DType::F32, &candle::Device::Cpu).unwrap();
        let err = residual_dense_relu(&h, &w, 1.0).unwrap_err().to_string();
        assert!(err.contains("expected [3, 3]"), "{err}");
    }

    #[test]
    fn block_matmul_matches_a_float64_loop() {
        let (rows, m) = (5, 7);
        let xs: Vec<f32> = (0..rows * m)
            .map(|i| ((i * 37 % 11) as f32) - 5.0)
            .collect();
        let w: Vec<f32> = (0..m * m)
            .map(|i| ((i * 13 % 7) as f32) * 0.25 - 0.7)
            .collect();
        for transpose_w in [true, false] {
            let mut out = vec![0f32; rows * m];
            block_matmul_f32(&xs, &w, &mut out, rows, m, transpose_w).unwrap();
            for r in 0..rows {
                for j in 0..m {
                    let want: f64 = (0..m)
                        .map(|k| {
                            let wv = if transpose_w {
                                w[j * m + k]
                            } else {
                                w[k * m + j]
                            };
                            f64::from(xs[r * m + k]) * f64::from(wv)
                        })
                        .sum();
                    let got = f64::from(out[r * m + j]);
                    assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{r},{j}");
                }
            }
        }
        let mut short = vec![0f32; 3];
        assert!(block_matmul_f32(&xs, &w, &mut short, rows, m, true).is_err());
    }
}
