//! A basic block with BatchNorm in training mode as one custom op:
//! relu(τ · BN2(conv2(relu(BN1(conv1 x)))) + shortcut(x)).

#[allow(clippy::wildcard_imports)]
use super::*;

/// relu(τ · BN2(conv2(relu(BN1(conv1(x))))) + shortcut(x)): a basic block with BatchNorm
/// (each convolution weight paired with the BatchNorm after it),
/// 3×3 convolutions with padding 1 (conv1 with `stride`, 1 or 2), a one-element `tau`; the
/// shortcut as in [`scalar_bias_block`].
///
/// In training mode on the CPU for `f32` (with the fused ops selected in [`crate::select`] and
/// affine `f32` BatchNorms), one custom op whose backward is
/// written out; it updates both BatchNorms' running statistics as [`super::batch_norm_t`]
/// does. Elsewhere (and in evaluation mode) the composition [`conv2d`],
/// [`super::batch_norm_t`] with ReLU, [`conv2d`], [`super::batch_norm_residual_relu`] with
/// [`option_a_shortcut`], which computes the same `f32` numbers.
///
/// # Errors
/// The shape errors of [`scalar_bias_block`], BatchNorms over another channel count than
/// conv1's output, a `tau` with more than one element, or a device error.
pub fn batch_norm_block(
    xs: &Tensor,
    (conv1, bn1): (&Tensor, &BatchNorm),
    (conv2, bn2): (&Tensor, &BatchNorm),
    tau: &Tensor,
    stride: usize,
    train: bool,
) -> Result<Tensor> {
    if tau.elem_count() != 1 {
        candle::bail!("batch_norm_block: tau must have one element");
    }
    let bg = BlockGeom::new("batch_norm_block", xs, conv1, conv2, stride)?;
    let fast =
        train && fused_f32(&[xs, conv1, conv2, tau]) && bn_params_f32(bn1) && bn_params_f32(bn2);
    if !fast {
        let out = conv2d(xs, conv1, stride, 1)?;
        let out = batch_norm_t(bn1, &out, train, true)?;
        let out = conv2d(&out, conv2, 1, 1)?;
        let shortcut = option_a_shortcut(xs, stride, bg.g1.c_out)?;
        return batch_norm_residual_relu(bn2, &out, train, tau, &shortcut);
    }
    let g2 = bg.g2;
    let out_dims = (g2.n, g2.c_out, g2.h, g2.w);
    let (gamma1, beta1, geom) = bn_train_parts(bn1, out_dims, "batch_norm_block")?;
    let (gamma2, beta2, _) = bn_train_parts(bn2, out_dims, "batch_norm_block")?;
    let params = Tensor::cat(
        &[
            conv1.flatten_all()?,
            conv2.flatten_all()?,
            gamma1.clone(),
            beta1.clone(),
            gamma2.clone(),
            beta2.clone(),
            tau.flatten_all()?,
        ],
        0,
    )?;
    let state = Arc::new(Mutex::new(None));
    let op = BnBlockFwd {
        bg,
        geom,
        eps: (bn1.eps(), bn2.eps()),
        state: state.clone(),
    };
    let ys = xs.contiguous()?.apply_op2(&params, op)?;
    let guard = lock_state(&state)?;
    let Some(st) = guard.as_ref() else {
        candle::bail!("batch_norm_block: the forward left no statistics");
    };
    update_running_stats(bn1, &st.bn1, geom)?;
    update_running_stats(bn2, &st.bn2, geom)?;
    Ok(ys)
}

/// The packed parameters of [`batch_norm_block`]: conv1 and conv2 weights, γ1, β1, γ2, β2
/// (C_out each), τ.
struct BnParams<'a> {
    w1: &'a [f32],
    w2: &'a [f32],
    gamma1: &'a [f32],
    beta1: &'a [f32],
    gamma2: &'a [f32],
    beta2: &'a [f32],
    tau: f32,
}

impl<'a> BnParams<'a> {
    fn len(bg: &BlockGeom) -> usize {
        let (k1, k2) = bg.weights();
        k1 + k2 + 4 * bg.g2.c_out + 1
    }

    fn split(bg: &BlockGeom, p: &'a [f32]) -> Self {
        let ((k1, k2), c) = (bg.weights(), bg.g2.c_out);
        let v = &p[k1 + k2..];
        Self {
            w1: &p[..k1],
            w2: &p[k1..k1 + k2],
            gamma1: &v[..c],
            beta1: &v[c..2 * c],
            gamma2: &v[2 * c..3 * c],
            beta2: &v[3 * c..4 * c],
            tau: v[4 * c],
        }
    }
}

/// What the backward of [`batch_norm_block`] needs from its forward.
struct BnBlockState {
    /// conv1's output (BN1's input).
    y1: Vec<f32>,
    /// relu(BN1(y1)), conv2's input.
    h: Vec<f32>,
    /// conv2's output (BN2's input).
    y2: Vec<f32>,
    bn1: BnState,
    bn2: BnState,
    tau: f32,
}

/// Forward of [`batch_norm_block`]: (x, packed parameters) → the block's output.
struct BnBlockFwd {
    bg: BlockGeom,
    geom: BnGeom,
    eps: (f64, f64),
    state: Arc<Mutex<Option<BnBlockState>>>,
}

impl CustomOp2 for BnBlockFwd {
    fn name(&self) -> &'static str {
        "batch-norm-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bg = &self.bg;
        let x = f32_data(s1, l1, bg.len_in(), self.name(), "input")?;
        let p = BnParams::split(
            bg,
            f32_data(s2, l2, BnParams::len(bg), self.name(), "parameters")?,
        );
        let y1 = forward_vec(&bg.g1, x, None, p.w1);
        let (h, bn1) = bn_forward(self.geom, &y1, p.gamma1, p.beta1, self.eps.0, true);
        let y2 = forward_vec(&bg.g2, &h, None, p.w2);
        let sc = bg.shortcut(x);
        let (out, bn2) = bn_res_forward(self.geom, &y2, p.gamma2, p.beta2, p.tau, &sc, self.eps.1);
        *lock_state(&self.state)? = Some(BnBlockState {
            y1,
            h,
            y2,
            bn1,
            bn2,
            tau: p.tau,
        });
        Ok((CpuStorage::F32(out), bg.out_shape()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = BnBlockBwd {
            bg: self.bg,
            geom: self.geom,
            params: params.to_vec1()?,
            state: self.state.clone(),
        };
        block_grads(&op, xs, params, res, grad)
    }
}

/// Backward of [`BnBlockFwd`]: (dy, y, x) → [dx, dw1, dw2, dγ1, dβ1, dγ2, dβ2, dτ].
struct BnBlockBwd {
    bg: BlockGeom,
    geom: BnGeom,
    params: Vec<f32>,
    state: Arc<Mutex<Option<BnBlockState>>>,
}

impl CustomOp3 for BnBlockBwd {
    fn name(&self) -> &'static str {
        "batch-norm-block-backward"
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
        let bg = &self.bg;
        let (len_in, len) = (bg.len_in(), bg.len_out());
        let (dy, y, x) = bg.bwd_operands(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let p = BnParams::split(bg, &self.params);
        let guard = lock_state(&self.state)?;
        let st = kept_state(&guard, self.name())?;
        // The residual end: [dy2, m (the shortcut's gradient), dγ2, dβ2, dτ].
        let end = st
            .bn2
            .res_backward(self.geom, st.tau)
            .compute(dy, &st.y2, y);
        let (dy2, rest) = end.split_at(len);
        let (m, d_end) = rest.split_at(len);
        let dw2 = backward_weight_vec(&bg.g2, dy2, &st.h, None);
        let dh = backward_input_vec(&bg.g2, dy2, p.w2, 0);
        // BN1 + ReLU: [dy1, dγ1, dβ1].
        let mut dy1 = st.bn1.backward(self.geom, true).compute(&dh, &st.y1);
        drop(dh);
        let d_bn1 = dy1.split_off(len);
        let dw1 = backward_weight_vec(&bg.g1, &dy1, x, None);
        let mut dx = backward_input_vec(&bg.g1, &dy1, p.w1, BnParams::len(bg));
        bg.add_shortcut_grad(&mut dx, m);
        dx.extend_from_slice(&dw1);
        dx.extend_from_slice(&dw2);
        dx.extend_from_slice(&d_bn1);
        dx.extend_from_slice(d_end);
        debug_assert_eq!(dx.len(), len_in + BnParams::len(bg));
        debug_assert_eq!(d_end.len(), 2 * bg.g2.c_out + 1);
        let total = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(total)))
    }
}
