//! The theory network's matrix products, with the `gemm` crate: its residual block
//! relu(h + τ·h·Wᵀ) as one op with a closed-form backward ([`residual_dense_relu`]), the
//! forward and backward passes of a whole chain of them, which full-batch gradient descent
//! runs ([`residual_dense_relu_chain`], [`residual_dense_relu_chain_backward`]: the
//! threads work through the L small products as one team that meets between blocks), and
//! the block product for the stability probe (many hidden states times one m × m weight,
//! into a caller's buffer: [`block_matmul_f32`]).

use std::ops::Range;

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elementwise::MaskSum;
use crate::team::{self, SharedMut};
use crate::util::{f32_data, fused_f32, relu_f32};

/// gemm's parallelism: rayon's pool when it has more than one thread.
fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// dst (rows × cols, row-major, `read_dst`: dst + beta·lhs·rhs, else beta·lhs·rhs) for a
/// lhs of rows × depth and a rhs of depth × cols, each addressed by (column, row) strides.
/// On rayon's threads; see [`gemm_f32_strided`].
///
/// # Safety
/// Every pointer addresses the elements its sizes and strides reach; `dst` aliases
/// neither input.
unsafe fn gemm_f32(
    dims: (usize, usize, usize),
    dst: *mut f32,
    read_dst: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
) {
    // SAFETY: the caller's contract, with dst's rows `cols` apart.
    unsafe { gemm_f32_strided(dims, (dst, dims.1), read_dst, lhs, rhs, beta, parallelism()) }
}

/// [`gemm_f32`] into a dst whose rows are `dst_rs` elements apart (a block of columns of a
/// wider matrix), with the given parallelism.
///
/// # Safety
/// As for [`gemm_f32`].
unsafe fn gemm_f32_strided(
    (rows, cols, depth): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    read_dst: bool,
    (lhs, lhs_cs, lhs_rs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            depth,
            dst,
            1,
            dst_rs as isize,
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
            parallelism,
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
        // 512, n = 32, measured), and the transpose is one pass over n × m values. One
        // tile of columns at a time, on rayon's threads (see TILE).
        let mut y = vec![0f32; n * m];
        let y_ptr = SharedMut(y.as_mut_ptr());
        (0..m.div_ceil(TILE))
            .into_par_iter()
            .for_each_init(Vec::new, |p, t| {
                // SAFETY: h is n × m and w m × m; y (n × m) is fresh, and each tile's
                // columns of it are written by that tile's call only.
                unsafe { forward_tile(w, h.as_ptr(), y_ptr.ptr(), p, tile(t, m), (n, m), self.tau) }
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
        let (dh, dw) = out.split_at_mut(n * m);
        block_backward_f32(g, h, w, dh, dw, (n, m), self.tau);
        Ok((CpuStorage::F32(out), Shape::from(n * m + m * m)))
    }
}

/// The backward pass of a whole chain of [`residual_dense_relu`] blocks, h_l =
/// relu(h_{l−1} + τ·h_{l−1}·W_lᵀ) for l = 1..L, written out instead of left to candle's
/// autograd: given the hidden states `hs` = [h_0, …, h_L] (each n × m, as the forward pass
/// produced them), the weights `ws` = [W_1, …, W_L] (each m × m) and `dy` = ∂ℓ/∂h_L,
/// returns ∂ℓ/∂h_0 and [∂ℓ/∂W_1, …, ∂ℓ/∂W_L], with g_l = ∂ℓ/∂h_l ⊙ 1(h_l > 0):
/// ∂ℓ/∂W_l = τ·g_lᵀ·h_{l−1} and ∂ℓ/∂h_{l−1} = g_l + τ·g_l·W_l.
///
/// These are the products [`residual_dense_relu`]'s backward computes, in the same order
/// and with the same GEMM calls (tile by tile), so the gradients are the same numbers bit
/// for bit, on any number of threads; what is saved is candle's gradient bookkeeping,
/// which adds every block's m × m weight gradient to a freshly zeroed tensor (two more
/// passes over each W-sized buffer and two allocations per block — the theory network's
/// full-batch step is memory-bound at small n), and rayon's waking of its threads for
/// every product: the threads work through the chain as one team, as in
/// [`residual_dense_relu_chain`]. On the CPU for `f32` under the fused kernels; elsewhere
/// candle's composition of the same expressions.
///
/// # Example
///
/// ```
/// use candle::{Device, Tensor, Var};
/// use tau_kernels::matmul::{residual_dense_relu, residual_dense_relu_chain_backward};
///
/// # fn main() -> candle::Result<()> {
/// let (n, m, tau) = (4, 8, 0.5);
/// let h0 = Var::randn(0f32, 1., (n, m), &Device::Cpu)?;
/// let ws = [Var::randn(0f32, 0.3, (m, m), &Device::Cpu)?, Var::randn(0f32, 0.3, (m, m), &Device::Cpu)?];
/// let h1 = residual_dense_relu(h0.as_tensor(), ws[0].as_tensor(), tau)?;
/// let h2 = residual_dense_relu(&h1, ws[1].as_tensor(), tau)?;
/// let autograd = h2.sum_all()?.backward()?;
///
/// let hs = [h0.as_tensor().clone(), h1, h2.clone()];
/// let wts = [ws[0].as_tensor().clone(), ws[1].as_tensor().clone()];
/// let (dh0, dws) = residual_dense_relu_chain_backward(&hs, &wts, &h2.ones_like()?, tau)?;
/// let diff = (&dws[0] - autograd.get(ws[0].as_tensor()).unwrap())?.abs()?.max_all()?;
/// assert_eq!(diff.to_scalar::<f32>()?, 0.0);
/// let diff = (&dh0 - autograd.get(h0.as_tensor()).unwrap())?.abs()?.max_all()?;
/// assert_eq!(diff.to_scalar::<f32>()?, 0.0);
/// # Ok(()) }
/// ```
///
/// # Errors
/// `hs` not one longer than `ws`, shapes that do not match, or a device error.
pub fn residual_dense_relu_chain_backward(
    hs: &[Tensor],
    ws: &[Tensor],
    dy: &Tensor,
    tau: f64,
) -> Result<(Tensor, Vec<Tensor>)> {
    if hs.len() != ws.len() + 1 {
        candle::bail!(
            "residual_dense_relu_chain_backward: {} hidden states for {} blocks (expected {})",
            hs.len(),
            ws.len(),
            ws.len() + 1
        )
    }
    let (n, m) = hs[0].dims2()?;
    for (l, h) in hs.iter().enumerate() {
        if h.dims() != [n, m] {
            candle::bail!(
                "residual_dense_relu_chain_backward: h_{l} is {:?}, h_0 is [{n}, {m}]",
                h.dims()
            )
        }
    }
    for (l, w) in ws.iter().enumerate() {
        if w.dims() != [m, m] {
            candle::bail!(
                "residual_dense_relu_chain_backward: W_{} is {:?} (expected [{m}, {m}])",
                l + 1,
                w.dims()
            )
        }
    }
    if dy.dims() != [n, m] {
        candle::bail!(
            "residual_dense_relu_chain_backward: the output gradient is {:?} (expected [{n}, {m}])",
            dy.dims()
        )
    }
    let all: Vec<&Tensor> = hs.iter().chain(ws).chain([dy]).collect();
    if !fused_f32(&all) {
        return chain_backward_composed(hs, ws, dy, tau);
    }
    chain_backward_f32(hs, ws, dy, tau, chain_threads(n, m))
}

/// [`residual_dense_relu_chain_backward`] on the CPU in `f32`, by a team of `threads`
/// (the shapes checked).
fn chain_backward_f32(
    hs: &[Tensor],
    ws: &[Tensor],
    dy: &Tensor,
    tau: f64,
    threads: usize,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (n, m) = dy.dims2()?;
    let blocks = ws.len();
    let (hs, ws) = (contiguous(hs)?, contiguous(ws)?);
    let (h_guards, w_guards) = (guards(&hs), guards(&ws));
    let h_data = cpu_slices(&h_guards, n * m, "hidden state")?;
    let w_data = cpu_slices(&w_guards, m * m, "weight")?;
    let mut dh = cpu_f32_vec(dy)?;
    let mut dws: Vec<Vec<f32>> = (0..blocks).map(|_| Vec::with_capacity(m * m)).collect();
    if n > 0 && m > 0 {
        // g_l, double-buffered: a rank may write its columns of g_{l−1} while another
        // still multiplies by g_l.
        let mut g = [vec![0f32; n * m], vec![0f32; n * m]];
        let g_ptr = [SharedMut(g[0].as_mut_ptr()), SharedMut(g[1].as_mut_ptr())];
        let dh_ptr = SharedMut(dh.as_mut_ptr());
        let dw_ptr: Vec<SharedMut> = dws.iter_mut().map(|d| SharedMut(d.as_mut_ptr())).collect();
        let tau32 = tau as f32;
        team::run(threads, |rank, barrier| {
            let cols = team::share(m, barrier.threads(), rank, TILE);
            for l in (1..=blocks).rev() {
                let (g, dh) = (g_ptr[l % 2].ptr(), dh_ptr.ptr());
                // SAFETY: this rank writes only its columns of g_l and of dh (each n × m);
                // the other ranks read g_l after the barrier below, and g_l's buffer is
                // next written (as g_{l−2}) after the next barrier, when every rank is
                // done with it.
                unsafe {
                    let h_out = h_data[l];
                    for j in 0..n {
                        for i in cols.clone() {
                            let k = j * m + i;
                            let v = if h_out[k] > 0.0 { *dh.add(k) } else { 0.0 };
                            *g.add(k) = v;
                            *dh.add(k) = v;
                        }
                    }
                }
                barrier.wait();
                for cols in tiles_of(cols.clone()) {
                    // SAFETY: g (n × m) and W_l (m × m) are read whole; this rank writes
                    // only its columns of dh and its rows of dW_l (allocated m × m).
                    unsafe {
                        let dw = dw_ptr[l - 1].ptr();
                        backward_tile(
                            g,
                            h_data[l - 1].as_ptr(),
                            w_data[l - 1],
                            dh,
                            dw,
                            cols,
                            (n, m),
                            tau32,
                        )
                    }
                }
            }
        });
        // SAFETY: the ranks' rows cover every row of every dW_l, each written whole.
        dws.iter_mut().for_each(|d| unsafe { d.set_len(m * m) });
    } else {
        dws.iter_mut().for_each(|d| d.resize(m * m, 0.0));
    }
    drop((h_guards, w_guards));
    let dws = dws
        .into_iter()
        .zip(&ws)
        .map(|(d, w)| Tensor::from_vec(d, (m, m), w.device()))
        .collect::<Result<_>>()?;
    Ok((Tensor::from_vec(dh, (n, m), dy.device())?, dws))
}

/// The forward pass of a whole chain of [`residual_dense_relu`] blocks: from h_0 (n × m)
/// and `ws` = [W_1, …, W_L] (each m × m), the hidden states [h_1, …, h_L], h_l =
/// relu(h_{l−1} + τ·h_{l−1}·W_lᵀ), each the same numbers as [`residual_dense_relu`]'s.
///
/// On the CPU for `f32` under the fused kernels, the threads work through the chain as
/// one team (each a block of columns of every product, meeting between blocks) instead
/// of waking rayon's pool for every block's small product; elsewhere one
/// [`residual_dense_relu`] per block. [`residual_dense_relu_chain_backward`] is its
/// backward pass.
///
/// # Errors
/// `h0` not n × m, a weight not m × m, or a device error.
pub fn residual_dense_relu_chain(h0: &Tensor, ws: &[Tensor], tau: f64) -> Result<Vec<Tensor>> {
    let (n, m) = h0.dims2()?;
    for (l, w) in ws.iter().enumerate() {
        if w.dims() != [m, m] {
            candle::bail!(
                "residual_dense_relu_chain: W_{} is {:?} (expected [{m}, {m}])",
                l + 1,
                w.dims()
            )
        }
    }
    let all: Vec<&Tensor> = ws.iter().chain([h0]).collect();
    if !fused_f32(&all) || n == 0 || m == 0 {
        let mut hs: Vec<Tensor> = Vec::with_capacity(ws.len());
        for w in ws {
            let h = residual_dense_relu(hs.last().unwrap_or(h0), w, tau)?;
            hs.push(h);
        }
        return Ok(hs);
    }
    chain_forward_f32(h0, ws, tau, chain_threads(n, m))
}

/// [`residual_dense_relu_chain`] on the CPU in `f32`, by a team of `threads` (the shapes
/// checked, n and m not 0).
fn chain_forward_f32(h0: &Tensor, ws: &[Tensor], tau: f64, threads: usize) -> Result<Vec<Tensor>> {
    let (n, m) = h0.dims2()?;
    let device = h0.device().clone();
    let blocks = ws.len();
    let ws = contiguous(ws)?;
    let w_guards = guards(&ws);
    let w_data = cpu_slices(&w_guards, m * m, "weight")?;
    let h0 = cpu_f32_vec(h0)?;
    let mut outs: Vec<Vec<f32>> = (0..blocks).map(|_| Vec::with_capacity(n * m)).collect();
    let out_ptr: Vec<SharedMut> = outs.iter_mut().map(|o| SharedMut(o.as_mut_ptr())).collect();
    let tau32 = tau as f32;
    team::run(threads, |rank, barrier| {
        let cols = team::share(m, barrier.threads(), rank, TILE);
        let mut p = Vec::new();
        for l in 0..blocks {
            let h_in = if l == 0 {
                h0.as_ptr()
            } else {
                out_ptr[l - 1].ptr().cast_const()
            };
            for cols in tiles_of(cols.clone()) {
                // SAFETY: h_{l−1} (n × m, written whole before the last barrier) and W_l
                // are read; this rank writes only its columns of h_l.
                unsafe {
                    forward_tile(
                        w_data[l],
                        h_in,
                        out_ptr[l].ptr(),
                        &mut p,
                        cols,
                        (n, m),
                        tau32,
                    )
                }
            }
            barrier.wait();
        }
    });
    // SAFETY: the ranks' columns cover every column of every h_l, each written whole.
    outs.iter_mut().for_each(|o| unsafe { o.set_len(n * m) });
    drop(w_guards);
    outs.into_iter()
        .map(|o| Tensor::from_vec(o, (n, m), &device))
        .collect()
}

/// How many threads a chain's team gets: none beyond the first for products too small to
/// repay a barrier per block, and at most one per tile.
fn chain_threads(n: usize, m: usize) -> usize {
    if n * m * m < 1 << 18 {
        1
    } else {
        team::threads(m.div_ceil(TILE))
    }
}

/// The tensors, each contiguous (a cheap clone for those that are).
fn contiguous(ts: &[Tensor]) -> Result<Vec<Tensor>> {
    ts.iter().map(Tensor::contiguous).collect()
}

/// Each tensor's storage, read-locked, with its layout.
fn guards(ts: &[Tensor]) -> Vec<(impl std::ops::Deref<Target = candle::Storage> + '_, &Layout)> {
    ts.iter().map(Tensor::storage_and_layout).collect()
}

/// The `f32` values of each locked CPU storage, `len` each.
fn cpu_slices<'a, G: std::ops::Deref<Target = candle::Storage>>(
    guards: &'a [(G, &'a Layout)],
    len: usize,
    what: &str,
) -> Result<Vec<&'a [f32]>> {
    guards
        .iter()
        .map(|(s, l)| match &**s {
            candle::Storage::Cpu(c) => f32_data(c, l, len, "residual-dense-relu-chain", what),
            _ => candle::bail!("residual-dense-relu-chain: {what} not on the CPU"),
        })
        .collect()
}

/// A contiguous CPU `f32` tensor's values (one copy of n × m values: the hidden states
/// are small next to the weights).
fn cpu_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// [`residual_dense_relu_chain_backward`] from candle's ops, on any device and dtype.
fn chain_backward_composed(
    hs: &[Tensor],
    ws: &[Tensor],
    dy: &Tensor,
    tau: f64,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut dh = dy.clone();
    let mut dws = Vec::with_capacity(ws.len());
    for l in (1..hs.len()).rev() {
        let g = (&dh * hs[l].gt(0.0)?.to_dtype(dh.dtype())?)?;
        dws.push((g.t()?.matmul(&hs[l - 1])? * tau)?);
        dh = (&g + (g.matmul(&ws[l - 1])? * tau)?)?;
    }
    dws.reverse();
    Ok((dh, dws))
}

/// Columns of W per product call. Every block product is computed in tiles of this many
/// columns of W_l (rows of τ·W·hᵀ and of dW, columns of dh; the last tile narrower), each
/// by one `gemm` call, whichever thread computes it: the per-block ops and the chain's
/// team, on any number of threads, get the same bits (the `gemm` crate sums a product's
/// terms in an order that depends on the shape of the call).
const TILE: usize = 128;

/// Tile `t`'s columns, of 0..m.
fn tile(t: usize, m: usize) -> Range<usize> {
    t * TILE..((t + 1) * TILE).min(m)
}

/// The tiles of `cols` (a range whose start is a multiple of [`TILE`]).
fn tiles_of(cols: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    cols.clone()
        .step_by(TILE)
        .map(move |c| c..(c + TILE).min(cols.end))
}

/// One tile of a block's forward pass: h_out[:, cols] = relu(h_in[:, cols] + τ·(W[cols, :]·h_inᵀ)ᵀ),
/// for h_in and h_out n × m and w m × m, row-major, through `p` (resized to hold the
/// tile's cols × n product).
///
/// # Safety
/// `h_in` and `h_out` address n × m elements and do not overlap; no other thread writes
/// `h_out`'s columns `cols` or reads them during the call.
unsafe fn forward_tile(
    w: &[f32],
    h_in: *const f32,
    h_out: *mut f32,
    p: &mut Vec<f32>,
    cols: Range<usize>,
    (n, m): (usize, usize),
    tau: f32,
) {
    debug_assert!(w.len() == m * m && cols.end <= m);
    let (c0, cw) = (cols.start, cols.len());
    if n == 0 || cw == 0 {
        return;
    }
    p.resize(cw * n, 0.0);
    // SAFETY: W's rows c0.. (cw × m, row stride m) lie in w; element (k, j) of h_inᵀ is
    // h_in[j][k] (column stride m, row stride 1); p holds cw × n; the writes to h_out are
    // to this tile's columns (the caller's contract).
    unsafe {
        gemm_f32_strided(
            (cw, n, m),
            (p.as_mut_ptr(), n),
            false,
            (w.as_ptr().add(c0 * m), 1, m),
            (h_in, m, 1),
            tau,
            gemm::Parallelism::None,
        );
        for j in 0..n {
            for i in cols.clone() {
                let k = j * m + i;
                *h_out.add(k) = relu_f32(*h_in.add(k) + p[(i - c0) * n + j]);
            }
        }
    }
}

/// One tile of a block's backward products: dh[:, cols] += τ·g·W[:, cols] and
/// dW[cols, :] = τ·g[:, cols]ᵀ·h, for g, h and dh n × m and w and dw m × m, row-major.
///
/// # Safety
/// `g`, `h` and `dh` address n × m elements, `dw` m × m; `dh` and `dw` overlap nothing
/// else; no other thread touches dh's columns `cols` or dW's rows `cols` during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_tile(
    g: *const f32,
    h: *const f32,
    w: &[f32],
    dh: *mut f32,
    dw: *mut f32,
    cols: Range<usize>,
    (n, m): (usize, usize),
    tau: f32,
) {
    debug_assert!(w.len() == m * m && cols.end <= m);
    let (c0, cw) = (cols.start, cols.len());
    if n == 0 || cw == 0 {
        return;
    }
    // SAFETY: the caller's contract; W's columns c0.. with row stride m lie in w, g's
    // columns c0.. (element (i, k) of g[:, cols]ᵀ is g[k][c0 + i]) in g.
    unsafe {
        gemm_f32_strided(
            (n, cw, m),
            (dh.add(c0), m),
            true,
            (g, 1, m),
            (w.as_ptr().add(c0), 1, m),
            tau,
            gemm::Parallelism::None,
        );
        gemm_f32_strided(
            (cw, m, n),
            (dw.add(c0 * m), m),
            false,
            (g.add(c0), m, 1),
            (h, 1, m),
            tau,
            gemm::Parallelism::None,
        );
    }
}

/// One block's backward products, for [`residual_dense_relu`]'s backward op:
/// `dh` = `dh` + τ·g·w (the caller puts g in `dh` first) and `dw` = τ·gᵀ·h, for g and h
/// of n × m and w of m × m, all row-major; tile by tile on rayon's threads, as the
/// chain's team computes them.
///
/// # Panics
/// Slices whose lengths do not match `n` and `m` (the callers check their shapes first).
fn block_backward_f32(
    g: &[f32],
    h: &[f32],
    w: &[f32],
    dh: &mut [f32],
    dw: &mut [f32],
    (n, m): (usize, usize),
    tau: f32,
) {
    assert!(
        g.len() == n * m && h.len() == n * m && dh.len() == n * m,
        "block backward: n × m buffers of the wrong length"
    );
    assert!(
        w.len() == m * m && dw.len() == m * m,
        "block backward: m × m buffers of the wrong length"
    );
    let (dh, dw) = (SharedMut(dh.as_mut_ptr()), SharedMut(dw.as_mut_ptr()));
    (0..m.div_ceil(TILE)).into_par_iter().for_each(|t| {
        // SAFETY: every slice holds the elements its sizes address (asserted above); dh
        // and dw are borrowed mutably (they alias nothing), and each tile's columns of
        // dh and rows of dw are written by that tile's call only.
        unsafe {
            backward_tile(
                g.as_ptr(),
                h.as_ptr(),
                w,
                dh.ptr(),
                dw.ptr(),
                tile(t, m),
                (n, m),
                tau,
            )
        }
    });
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
    use crate::select::{KernelSet, with_kernels};
    use crate::test_util::{compare, random, rel_err};
    use candle::Var;
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

    /// An overflowed hidden state stays non-finite through the blocks, as in PyTorch: the
    /// theory network at τ = 1 and large L overflows f32 part-way, and a ReLU that turned
    /// the resulting NaNs into 0 would hand the loss an all-zero state and a finite value.
    #[test]
    fn an_overflow_stays_non_finite_through_the_chain() {
        let dev = candle::Device::Cpu;
        // Row 0 holds +inf and -inf: W h mixes them into NaN, h + NaN is NaN.
        let h0 = Tensor::new(
            &[
                [f32::INFINITY, f32::NEG_INFINITY, f32::INFINITY],
                [0.5, -0.25, 1.0],
            ],
            &dev,
        )
        .unwrap();
        let w = Tensor::new(&[[1f32, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 1.0]], &dev).unwrap();
        let ws = vec![w.clone(), w.clone(), w];
        for set in crate::select::KernelSet::available() {
            crate::select::with_kernels(set, || {
                for (what, h) in [
                    ("block op", residual_dense_relu(&h0, &ws[0], 1.0).unwrap()),
                    (
                        "chain",
                        residual_dense_relu_chain(&h0, &ws, 1.0)
                            .unwrap()
                            .pop()
                            .unwrap(),
                    ),
                ] {
                    let rows = h.to_vec2::<f32>().unwrap();
                    assert!(
                        rows[0].iter().all(|v| v.is_nan()),
                        "{what} ({set}): {rows:?}"
                    );
                    assert!(
                        rows[1].iter().all(|v| v.is_finite()),
                        "{what} ({set}): {rows:?}"
                    );
                }
            });
        }
    }

    /// A chain of blocks, its forward states and the autograd gradients of Σ r ⊙ h_L.
    fn chain_autograd(
        h0: &Tensor,
        ws: &[Tensor],
        r: &Tensor,
        tau: f64,
    ) -> (Vec<Tensor>, Vec<Var>, Var, candle::backprop::GradStore) {
        let h0 = Var::from_tensor(h0).unwrap();
        let wv: Vec<Var> = ws.iter().map(|w| Var::from_tensor(w).unwrap()).collect();
        let mut hs = vec![h0.as_tensor().clone()];
        for w in &wv {
            let h = residual_dense_relu(hs.last().unwrap(), w.as_tensor(), tau).unwrap();
            hs.push(h);
        }
        let grads = (hs.last().unwrap() * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (hs, wv, h0, grads)
    }

    /// A chain's random inputs: h_0 (n × m), L weights and the output weighting r.
    fn chain_inputs(
        rng: &mut ChaCha8Rng,
        (n, m, depth): (usize, usize, usize),
    ) -> (Tensor, Vec<Tensor>, Tensor) {
        let h0 = random(rng, &[n, m], -1.0, 1.0);
        let ws = (0..depth)
            .map(|_| random(rng, &[m, m], -0.4, 0.4))
            .collect();
        (h0, ws, random(rng, &[n, m], -1.0, 1.0))
    }

    /// Asserts that `a` and `b` hold the same `f32` values, bit for bit.
    fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(a), values(b), "{what}");
    }

    /// Asserts that a chain backward's (dh0, dws) are autograd's gradients, bit for bit.
    fn assert_autograd_grads(
        (dh0, dws): &(Tensor, Vec<Tensor>),
        h0: &Var,
        ws: &[Var],
        grads: &candle::backprop::GradStore,
        what: &str,
    ) {
        assert_same(
            dh0,
            grads.get(h0.as_tensor()).unwrap(),
            &format!("dh0 ({what})"),
        );
        assert_eq!(dws.len(), ws.len());
        for (l, (w, dw)) in ws.iter().zip(dws).enumerate() {
            let expected = grads.get(w.as_tensor()).unwrap();
            assert_same(dw, expected, &format!("dW_{} ({what})", l + 1));
        }
    }

    /// The written-out backward gives candle's autograd gradients bit for bit (the same
    /// GEMM calls; candle only adds them to zeros), under every kernel set; in f64 (the
    /// composed fallback) within rounding of the f64 autograd.
    #[test]
    fn chain_backward_equals_autograd() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        // Widths off every SIMD width, a single row; enough depth for dead ReLUs.
        for (n, m, depth, tau) in [(5, 24, 4, 0.5), (1, 17, 3, 1.0), (9, 33, 6, 0.2)] {
            let (h0, ws, r) = chain_inputs(&mut rng, (n, m, depth));
            for set in KernelSet::available() {
                with_kernels(set, || {
                    let (hs, wv, h0v, grads) = chain_autograd(&h0, &ws, &r, tau);
                    let wt: Vec<Tensor> = wv.iter().map(|w| w.as_tensor().clone()).collect();
                    let out = residual_dense_relu_chain_backward(&hs, &wt, &r, tau).unwrap();
                    let what = format!("n={n} m={m} L={depth}, {set} kernels");
                    assert_autograd_grads(&out, &h0v, &wv, &grads, &what);
                });
            }
            // f64: the composed fallback against f64 autograd of the composed block.
            let f64_of = |t: &Tensor| t.to_dtype(candle::DType::F64).unwrap();
            let (hs, wv, h0v, grads) = chain_autograd(
                &f64_of(&h0),
                &ws.iter().map(f64_of).collect::<Vec<_>>(),
                &f64_of(&r),
                tau,
            );
            let wt: Vec<Tensor> = wv.iter().map(|w| w.as_tensor().clone()).collect();
            let (dh0, dws) =
                residual_dense_relu_chain_backward(&hs, &wt, &f64_of(&r), tau).unwrap();
            assert!(rel_err(&dh0, grads.get(h0v.as_tensor()).unwrap()) < 1e-12);
            for (w, dw) in wv.iter().zip(&dws) {
                assert!(rel_err(dw, grads.get(w.as_tensor()).unwrap()) < 1e-12);
            }
        }
    }

    /// The team's forward and backward passes, for 1 to 4 threads, give the numbers of
    /// one [`residual_dense_relu`] per block and of autograd over them, bit for bit: at
    /// m = 3·TILE + 8 the tiles are TILE, TILE, TILE and 8 columns wide, shared 2-1-1 by
    /// 3 threads and 1-1-1-1 by 4; at m = TILE and m = 40 one thread gets everything.
    /// (The forward was seen failing when each thread ran one product over all its
    /// columns instead of fixed tiles.)
    #[test]
    fn chain_team_equals_the_block_ops() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for (n, m, depth, tau) in [
            (5, 3 * TILE + 8, 3, 0.5),
            (32, TILE, 2, 0.3),
            (3, 40, 2, 1.0),
        ] {
            let (h0, ws, r) = chain_inputs(&mut rng, (n, m, depth));
            let (hs, wv, h0v, grads) = chain_autograd(&h0, &ws, &r, tau);
            let wt: Vec<Tensor> = wv.iter().map(|w| w.as_tensor().clone()).collect();
            for threads in 1..=4 {
                let what = format!("n={n} m={m} L={depth}, {threads} threads");
                let chain = chain_forward_f32(&h0, &wt, tau, threads).unwrap();
                assert_eq!(chain.len(), depth);
                for (l, (a, b)) in chain.iter().zip(&hs[1..]).enumerate() {
                    assert_same(a, b, &format!("h_{} ({what})", l + 1));
                }
                let out = chain_backward_f32(&hs, &wt, &r, tau, threads).unwrap();
                assert_autograd_grads(&out, &h0v, &wv, &grads, &what);
            }
        }
    }

    #[test]
    fn chain_backward_rejects_mismatched_inputs() {
        let t = |d: &[usize]| Tensor::zeros(d, candle::DType::F32, &candle::Device::Cpu).unwrap();
        let hs = [t(&[2, 3]), t(&[2, 3])];
        let err = residual_dense_relu_chain_backward(&hs, &[], &t(&[2, 3]), 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 hidden states for 0 blocks"), "{err}");
        let err = residual_dense_relu_chain_backward(&hs, &[t(&[3, 4])], &t(&[2, 3]), 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("W_1 is [3, 4]"), "{err}");
        let err = residual_dense_relu_chain_backward(&hs, &[t(&[3, 3])], &t(&[2, 4]), 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("output gradient is [2, 4]"), "{err}");
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
