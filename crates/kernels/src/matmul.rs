//! The theory network's block product for the stability probe: many hidden states times
//! one m × m weight, into a caller's buffer, with the `gemm` crate.

use candle::Result;

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
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Element (k, j) of the right-hand side is w[j][k] for xs · wᵀ, w[k][j] for xs · w.
    let (rhs_cs, rhs_rs) = if transpose_w { (m, 1) } else { (1, m) };
    // SAFETY: every slice holds exactly the elements the sizes and strides address
    // (checked above), and `out` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            rows,
            m,
            m,
            out.as_mut_ptr(),
            1,
            m as isize,
            false,
            xs.as_ptr(),
            1,
            m as isize,
            w.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
