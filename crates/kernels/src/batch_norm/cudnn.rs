//! Training-mode BatchNorm on CUDA through cuDNN (the `cudnn` feature).
//!
//! candle-nn's `BatchNorm` composes about fifteen tensor ops forward and more backward,
//! each one kernel launch and one pass over the activation. Here the forward is one
//! `cudnnBatchNormalizationForwardTraining` (batch mean and inverse standard deviation
//! saved for the backward) and the backward one `cudnnBatchNormalizationBackward` giving
//! dx, dγ and dβ together, as PyTorch runs it. cuDNN also updates the running statistics
//! by candle-nn's rule (momentum, unbiased batch variance), on copies of them that then
//! replace `bn`'s: no copy to the host, no extra kernels.
//!
//! candle's `cudarc` bindings wrap cuDNN's convolutions but not its BatchNorm, so this
//! module calls the C API (`cudarc::cudnn::sys`) with its own handle and descriptors,
//! each released on drop.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use candle::cuda_backend::cudarc::cudnn::sys;
use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use candle::cuda_backend::{CudaDevice, DeviceId};
use candle::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor, Var,
};
use candle_nn::BatchNorm;

use super::{BnGeom, bn_train_parts};
use crate::cuda::{dim_i32, f32_view, output};
use crate::util::lock_state;

/// `bn.forward_t(xs, true)` for an `f32` (N, C, H, W) tensor on CUDA and an affine `f32`
/// `bn`, with `bn`'s running statistics updated.
pub(crate) fn batch_norm_train(bn: &BatchNorm, xs: &Tensor) -> Result<Tensor> {
    let (weight, bias, geom) = bn_train_parts(bn, xs.dims4()?, "batch_norm_t")?;
    let saved = Arc::new(Mutex::new(None));
    let op = CudnnBnFwd {
        geom,
        eps: bn.eps(),
        momentum: bn.momentum(),
        running: (bn.running_mean().clone(), bn.running_var().clone()),
        saved: saved.clone(),
    };
    let ys = xs.contiguous()?.apply_op3(weight, bias, op)?;
    for (which, running) in [
        (Stat::RunningMean, bn.running_mean()),
        (Stat::RunningVar, bn.running_var()),
    ] {
        let updated = weight.apply_op1_no_bwd(&TakeRunning {
            saved: saved.clone(),
            which,
            c: geom.c,
        })?;
        // `running` is the variable candle-nn's BatchNorm holds (`Var::from_tensor` of a
        // variable wraps the same storage).
        Var::from_tensor(running)?.set(&updated)?;
    }
    Ok(ys)
}

/// What the forward keeps: per channel, the batch mean and 1/sqrt(var + eps) for the
/// backward, and the updated running statistics until they replace `bn`'s.
struct Saved {
    mean: CudaSlice<f32>,
    invstd: CudaSlice<f32>,
    running_mean: Option<CudaSlice<f32>>,
    running_var: Option<CudaSlice<f32>>,
}

type SavedCell = Arc<Mutex<Option<Saved>>>;

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Handle>> = RefCell::new(HashMap::new());
}

/// A cuDNN handle bound to a device's stream, destroyed on drop.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `cudnnCreate` and is destroyed once.
        unsafe { sys::cudnnDestroy(self.0) };
    }
}

/// Runs `f` with the calling thread's cuDNN handle for `dev` (created on first use), the
/// device's context bound to the thread.
fn with_handle<R>(dev: &CudaDevice, f: impl FnOnce(sys::cudnnHandle_t) -> Result<R>) -> Result<R> {
    let stream = dev.cuda_stream();
    stream
        .context()
        .bind_to_thread()
        .map_err(candle::Error::wrap)?;
    let handle = HANDLES.with(|handles| -> Result<sys::cudnnHandle_t> {
        if let Some(h) = handles.borrow().get(&dev.id()) {
            return Ok(h.0);
        }
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives a new handle; the stream outlives it (the device holds it).
        unsafe {
            sys::cudnnCreate(&mut raw)
                .result()
                .map_err(candle::Error::wrap)?;
            let h = Handle(raw);
            sys::cudnnSetStream(h.0, stream.cu_stream() as sys::cudaStream_t)
                .result()
                .map_err(candle::Error::wrap)?;
            handles.borrow_mut().insert(dev.id(), h);
        }
        Ok(raw)
    })?;
    f(handle)
}

/// A 4-d `f32` NCHW tensor descriptor, destroyed on drop.
struct Desc(sys::cudnnTensorDescriptor_t);

impl Desc {
    fn nchw(dims: [usize; 4]) -> Result<Desc> {
        let mut d = [0i32; 4];
        for (o, &v) in d.iter_mut().zip(&dims) {
            *o = dim_i32(v, "batch norm (cuDNN)")?;
        }
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives a new descriptor, owned by the returned `Desc`.
        unsafe {
            sys::cudnnCreateTensorDescriptor(&mut raw)
                .result()
                .map_err(candle::Error::wrap)?;
            let desc = Desc(raw);
            sys::cudnnSetTensor4dDescriptor(
                desc.0,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                d[0],
                d[1],
                d[2],
                d[3],
            )
            .result()
            .map_err(candle::Error::wrap)?;
            Ok(desc)
        }
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `cudnnCreateTensorDescriptor`, destroyed once.
        unsafe { sys::cudnnDestroyTensorDescriptor(self.0) };
    }
}

/// The input and per-channel descriptors of a BatchNorm over `geom`.
fn descriptors(geom: BnGeom) -> Result<(Desc, Desc)> {
    let (n, c, h, w) = geom.dims;
    Ok((Desc::nchw([n, c, h, w])?, Desc::nchw([1, c, 1, 1])?))
}

/// The device address of `v` for a cuDNN call, and the guard that must outlive the call.
fn ptr<'a>(v: &'a impl DevicePtr<f32>, stream: &'a CudaStream) -> (*const c_void, SyncOnDrop<'a>) {
    let (p, guard) = v.device_ptr(stream);
    (p as usize as *const c_void, guard)
}

/// [`ptr`] for a buffer cuDNN writes.
fn ptr_mut<'a>(
    v: &'a mut impl DevicePtrMut<f32>,
    stream: &'a CudaStream,
) -> (*mut c_void, SyncOnDrop<'a>) {
    let (p, guard) = v.device_ptr_mut(stream);
    (p as usize as *mut c_void, guard)
}

/// A copy, on the device, of a running statistic (`c` contiguous `f32`s on CUDA).
fn running_copy(t: &Tensor, c: usize, stream: &Arc<CudaStream>) -> Result<CudaSlice<f32>> {
    let (storage, l) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle::bail!("batch norm (cuDNN): the running statistics are not on the CUDA device");
    };
    let view = f32_view(s, l, c, "batch norm (cuDNN)", "running statistic")?;
    stream.clone_dtod(&view).map_err(candle::Error::wrap)
}

/// Forward: (x, γ, β) → y, the batch statistics and the updated running statistics kept in
/// `saved`.
struct CudnnBnFwd {
    geom: BnGeom,
    eps: f64,
    momentum: f64,
    /// `bn`'s running mean and variance (read, never written, by the op).
    running: (Tensor, Tensor),
    saved: SavedCell,
}

impl CustomOp3 for CudnnBnFwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-cudnn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let BnGeom { n, c, hw, .. } = self.geom;
        let dev = &s1.device;
        let stream = dev.cuda_stream();
        let x_view = f32_view(s1, l1, n * c * hw, self.name(), "input")?;
        let (x, _gx) = ptr(&x_view, &stream);
        let gamma_view = f32_view(s2, l2, c, self.name(), "weight")?;
        let (gamma, _gg) = ptr(&gamma_view, &stream);
        let beta_view = f32_view(s3, l3, c, self.name(), "bias")?;
        let (beta, _gb) = ptr(&beta_view, &stream);
        // cuDNN writes every element of the three outputs.
        let (mut y, mut mean, mut invstd) =
            (output(dev, n * c * hw)?, output(dev, c)?, output(dev, c)?);
        let mut running_mean = running_copy(&self.running.0, c, &stream)?;
        let mut running_var = running_copy(&self.running.1, c, &stream)?;
        let (xd, cd) = descriptors(self.geom)?;
        {
            let (py, _gy) = ptr_mut(&mut y, &stream);
            let (pm, _gm) = ptr_mut(&mut mean, &stream);
            let (pi, _gi) = ptr_mut(&mut invstd, &stream);
            let (prm, _grm) = ptr_mut(&mut running_mean, &stream);
            let (prv, _grv) = ptr_mut(&mut running_var, &stream);
            let (one, zero) = (1f32, 0f32);
            with_handle(dev, |h| {
                // SAFETY: the pointers address buffers of the sizes the descriptors say,
                // on the handle's stream. cuDNN updates the running statistics in place:
                // running = (1 − momentum)·running + momentum·batch, the batch variance
                // unbiased, as candle-nn and PyTorch.
                unsafe {
                    sys::cudnnBatchNormalizationForwardTraining(
                        h,
                        sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                        &one as *const f32 as *const c_void,
                        &zero as *const f32 as *const c_void,
                        xd.0,
                        x,
                        xd.0,
                        py,
                        cd.0,
                        gamma,
                        beta,
                        self.momentum,
                        prm,
                        prv,
                        self.eps,
                        pm,
                        pi,
                    )
                }
                .result()
                .map_err(candle::Error::wrap)
            })?;
        }
        *lock_state(&self.saved)? = Some(Saved {
            mean,
            invstd,
            running_mean: Some(running_mean),
            running_var: Some(running_var),
        });
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from(self.geom.dims),
        ))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let BnGeom { n, c, hw, .. } = self.geom;
        let out = grad.contiguous()?.apply_op3_no_bwd(
            xs,
            weight,
            &CudnnBnBwd {
                geom: self.geom,
                eps: self.eps,
                saved: self.saved.clone(),
            },
        )?;
        let len = n * c * hw;
        let dx = out.narrow(0, 0, len)?.reshape(xs.shape())?;
        let dgamma = out.narrow(0, len, c)?;
        let dbeta = out.narrow(0, len + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Backward: (dy, x, γ) → dx, dγ, dβ in one vector (n·c·hw + 2c elements).
struct CudnnBnBwd {
    geom: BnGeom,
    eps: f64,
    saved: SavedCell,
}

impl CustomOp3 for CudnnBnBwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-cudnn-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let BnGeom { n, c, hw, .. } = self.geom;
        let len = n * c * hw;
        let dev = &s1.device;
        let stream = dev.cuda_stream();
        let dy_view = f32_view(s1, l1, len, self.name(), "output gradient")?;
        let (dy, _gdy) = ptr(&dy_view, &stream);
        let x_view = f32_view(s2, l2, len, self.name(), "input")?;
        let (x, _gx) = ptr(&x_view, &stream);
        let gamma_view = f32_view(s3, l3, c, self.name(), "weight")?;
        let (gamma, _gg) = ptr(&gamma_view, &stream);
        let guard = lock_state(&self.saved)?;
        let Some(saved) = guard.as_ref() else {
            candle::bail!("{}: the forward pass left no statistics", self.name());
        };
        let (pm, _gm) = ptr(&saved.mean, &stream);
        let (pi, _gi) = ptr(&saved.invstd, &stream);
        // cuDNN writes dx, dγ and dβ, every element.
        let mut out = output(dev, len + 2 * c)?;
        let (xd, cd) = descriptors(self.geom)?;
        {
            let (dx, _go) = ptr_mut(&mut out, &stream);
            let f32_at = |i: usize| dx.cast::<f32>().wrapping_add(i).cast::<c_void>();
            let (dgamma, dbeta) = (f32_at(len), f32_at(len + c));
            let (one, zero) = (1f32, 0f32);
            with_handle(dev, |h| {
                // SAFETY: as in the forward; dx, dγ and dβ are disjoint parts of `out`.
                unsafe {
                    sys::cudnnBatchNormalizationBackward(
                        h,
                        sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                        &one as *const f32 as *const c_void,
                        &zero as *const f32 as *const c_void,
                        &one as *const f32 as *const c_void,
                        &zero as *const f32 as *const c_void,
                        xd.0,
                        x,
                        xd.0,
                        dy,
                        xd.0,
                        dx,
                        cd.0,
                        gamma,
                        dgamma,
                        dbeta,
                        self.eps,
                        pm,
                        pi,
                    )
                }
                .result()
                .map_err(candle::Error::wrap)
            })?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(len + 2 * c),
        ))
    }
}

#[derive(Clone, Copy)]
enum Stat {
    RunningMean,
    RunningVar,
}

/// The updated running statistic the forward left, as a (c,) tensor (applied to any tensor
/// on the device; it can be taken once).
struct TakeRunning {
    saved: SavedCell,
    which: Stat,
    c: usize,
}

impl CustomOp1 for TakeRunning {
    fn name(&self) -> &'static str {
        "batch-norm-cudnn-running-statistic"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let mut guard = lock_state(&self.saved)?;
        let Some(saved) = guard.as_mut() else {
            candle::bail!("{}: the forward pass left no statistics", self.name());
        };
        let slot = match self.which {
            Stat::RunningMean => &mut saved.running_mean,
            Stat::RunningVar => &mut saved.running_var,
        };
        let Some(slice) = slot.take() else {
            candle::bail!("{}: already taken", self.name());
        };
        Ok((
            CudaStorage::wrap_cuda_slice(slice, s.device.clone()),
            Shape::from(self.c),
        ))
    }
}
