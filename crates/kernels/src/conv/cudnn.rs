//! [`super::conv2d`] on CUDA through cuDNN (the `cudnn` feature): forward, input gradient
//! (backward data) and weight gradient (backward filter) as three candle custom ops.
//!
//! candle's `cudnn` feature runs only the forward convolution through cuDNN; its backward
//! is `conv_transpose2d` (a direct loop) for the input gradient and a convolution with an
//! image-sized kernel for the weight gradient. Here all three run cuDNN, as PyTorch does.
//!
//! - One cuDNN handle per thread and device, bound to the device's stream (cuDNN handles are
//!   neither `Send` nor `Sync`), as candle keeps its own.
//! - Descriptors are made per call (host-side structs, cheap); the algorithm of each pass is
//!   chosen once per shape by cuDNN's heuristics (`cudnnGet*Algorithm_v7`) and cached.
//! - Math type: `CUDNN_FMA_MATH` (plain `f32`, no TF32 tensor cores) unless candle's
//!   reduced-precision switch for `f32` products is on
//!   (`candle::cuda_backend::set_gemm_reduced_precision_f32(true)`), which then allows TF32
//!   here too (`CUDNN_DEFAULT_MATH`), so one switch governs every `f32` product.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle::cuda_backend::cudarc::cudnn::safe::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor,
    TensorDescriptor,
};
use candle::cuda_backend::cudarc::cudnn::sys;
use candle::cuda_backend::cudarc::driver::CudaSlice;
use candle::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle::{Layout, Result, Shape};

use super::Geom;
use crate::cuda::{dim_i32, f32_view, output};

/// The ops' name in errors.
const OP: &str = "conv2d (cuDNN)";

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static FWD_ALGOS: RefCell<HashMap<AlgoKey, sys::cudnnConvolutionFwdAlgo_t>> =
        RefCell::new(HashMap::new());
    static BWD_DATA_ALGOS: RefCell<HashMap<AlgoKey, sys::cudnnConvolutionBwdDataAlgo_t>> =
        RefCell::new(HashMap::new());
    static BWD_FILTER_ALGOS: RefCell<HashMap<AlgoKey, sys::cudnnConvolutionBwdFilterAlgo_t>> =
        RefCell::new(HashMap::new());
}

/// What an algorithm choice depends on: the device, the shapes and the math type.
type AlgoKey = (DeviceId, [usize; 8], bool);

fn algo_key(dev: &CudaDevice, g: &Geom) -> AlgoKey {
    (
        dev.id(),
        [g.n, g.c_in, g.h, g.w, g.c_out, g.k, g.stride, g.padding],
        tf32(),
    )
}

/// Whether TF32 tensor cores may serve `f32` convolutions (candle's switch for `f32` GEMMs).
fn tf32() -> bool {
    candle::cuda_backend::gemm_reduced_precision_f32()
}

/// The calling thread's cuDNN handle for `dev`, created on first use.
fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|handles| {
        if let Some(h) = handles.borrow().get(&dev.id()) {
            return Ok(h.clone());
        }
        let h = Cudnn::new(dev.cuda_stream()).map_err(candle::Error::wrap)?;
        handles.borrow_mut().insert(dev.id(), h.clone());
        Ok(h)
    })
}

/// The cached algorithm for `key`, or `pick()`'s, remembered.
fn cached<A: Copy + 'static>(
    cache: &'static std::thread::LocalKey<RefCell<HashMap<AlgoKey, A>>>,
    key: AlgoKey,
    pick: impl FnOnce() -> Result<A>,
) -> Result<A> {
    if let Some(a) = cache.with(|c| c.borrow().get(&key).copied()) {
        return Ok(a);
    }
    let a = pick()?;
    cache.with(|c| c.borrow_mut().insert(key, a));
    Ok(a)
}

/// The descriptors of one convolution: input x, weight w, output y, and the convolution.
struct Descriptors {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
}

/// The descriptors of the convolution `g` for the calling thread's handle on `dev`.
fn descriptors(dev: &CudaDevice, g: &Geom) -> Result<Descriptors> {
    use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let cudnn = handle(dev)?;
    let wrap = candle::Error::wrap;
    let d = |v| dim_i32(v, OP);
    let (n, c_in, h, w) = (d(g.n)?, d(g.c_in)?, d(g.h)?, d(g.w)?);
    let (c_out, k, h_out, w_out) = (d(g.c_out)?, d(g.k)?, d(g.h_out)?, d(g.w_out)?);
    let (pad, stride) = (d(g.padding)?, d(g.stride)?);
    let mut conv = cudnn
        .create_conv2d::<f32>(
            [pad, pad],
            [stride, stride],
            [1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(wrap)?;
    let math = if tf32() {
        sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    };
    conv.set_math_type(math).map_err(wrap)?;
    Ok(Descriptors {
        conv,
        x: cudnn
            .create_4d_tensor::<f32>(CUDNN_TENSOR_NCHW, [n, c_in, h, w])
            .map_err(wrap)?,
        w: cudnn
            .create_4d_filter::<f32>(CUDNN_TENSOR_NCHW, [c_out, c_in, k, k])
            .map_err(wrap)?,
        y: cudnn
            .create_4d_tensor::<f32>(CUDNN_TENSOR_NCHW, [n, c_out, h_out, w_out])
            .map_err(wrap)?,
    })
}

/// A workspace of `bytes` bytes on `dev` (none for zero bytes).
fn workspace(dev: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: cuDNN writes its workspace before reading it.
    Ok(Some(unsafe { dev.alloc::<u8>(bytes) }?))
}

/// conv(x, w): (n, c_in, h, w) × (c_out, c_in, k, k) → (n, c_out, h_out, w_out).
pub(super) fn forward(
    g: &Geom,
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let xv = f32_view(x, lx, g.n * g.c_in * g.h * g.w, OP, "input")?;
    let wv = f32_view(w, lw, g.c_out * g.c_in * g.k * g.k, OP, "weight")?;
    let d = descriptors(dev, g)?;
    let op = ConvForward {
        conv: &d.conv,
        x: &d.x,
        w: &d.w,
        y: &d.y,
    };
    let algo = cached(&FWD_ALGOS, algo_key(dev, g), || {
        op.pick_algorithm().map_err(candle::Error::wrap)
    })?;
    let mut ws = workspace(
        dev,
        op.get_workspace_size(algo).map_err(candle::Error::wrap)?,
    )?;
    let mut y = output(dev, g.n * g.c_out * g.h_out * g.w_out)?;
    // SAFETY: the buffers have the sizes and the layout (NCHW, contiguous) the descriptors say.
    unsafe { op.launch(algo, ws.as_mut(), (1f32, 0f32), &xv, &wv, &mut y) }
        .map_err(candle::Error::wrap)?;
    let shape = Shape::from((g.n, g.c_out, g.h_out, g.w_out));
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape))
}

/// dx from dy and w: the input gradient, (n, c_in, h, w).
pub(super) fn backward_input(
    g: &Geom,
    dy: &CudaStorage,
    ldy: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &dy.device;
    let dyv = f32_view(
        dy,
        ldy,
        g.n * g.c_out * g.h_out * g.w_out,
        OP,
        "output gradient",
    )?;
    let wv = f32_view(w, lw, g.c_out * g.c_in * g.k * g.k, OP, "weight")?;
    let d = descriptors(dev, g)?;
    let op = ConvBackwardData {
        conv: &d.conv,
        dx: &d.x,
        w: &d.w,
        dy: &d.y,
    };
    let algo = cached(&BWD_DATA_ALGOS, algo_key(dev, g), || {
        op.pick_algorithm().map_err(candle::Error::wrap)
    })?;
    let mut ws = workspace(
        dev,
        op.get_workspace_size(algo).map_err(candle::Error::wrap)?,
    )?;
    let mut dx = output(dev, g.n * g.c_in * g.h * g.w)?;
    // SAFETY: as in `forward`.
    unsafe { op.launch(algo, ws.as_mut(), (1f32, 0f32), &mut dx, &wv, &dyv) }
        .map_err(candle::Error::wrap)?;
    let shape = Shape::from((g.n, g.c_in, g.h, g.w));
    Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), shape))
}

/// dw from dy and x: the weight gradient, (c_out, c_in, k, k).
pub(super) fn backward_weight(
    g: &Geom,
    dy: &CudaStorage,
    ldy: &Layout,
    x: &CudaStorage,
    lx: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &dy.device;
    let dyv = f32_view(
        dy,
        ldy,
        g.n * g.c_out * g.h_out * g.w_out,
        OP,
        "output gradient",
    )?;
    let xv = f32_view(x, lx, g.n * g.c_in * g.h * g.w, OP, "input")?;
    let d = descriptors(dev, g)?;
    let op = ConvBackwardFilter {
        conv: &d.conv,
        x: &d.x,
        dw: &d.w,
        dy: &d.y,
    };
    let algo = cached(&BWD_FILTER_ALGOS, algo_key(dev, g), || {
        op.pick_algorithm().map_err(candle::Error::wrap)
    })?;
    let mut ws = workspace(
        dev,
        op.get_workspace_size(algo).map_err(candle::Error::wrap)?,
    )?;
    let mut dw = output(dev, g.c_out * g.c_in * g.k * g.k)?;
    // SAFETY: as in `forward`.
    unsafe { op.launch(algo, ws.as_mut(), (1f32, 0f32), &xv, &mut dw, &dyv) }
        .map_err(candle::Error::wrap)?;
    let shape = Shape::from((g.c_out, g.c_in, g.k, g.k));
    Ok((CudaStorage::wrap_cuda_slice(dw, dev.clone()), shape))
}
