//! What a model expects of its input: the per-channel mean and standard deviation, the
//! input size and channels, and how an image of another size is brought to it (timm's
//! `crop_pct` convention). A checkpoint's `config.json` records it next to the
//! architecture ([`crate::checkpoint::CheckpointConfig::preprocessing`]), so an image is
//! prepared the way the model was trained, whoever loads it.
//!
//! An image becomes an input in four steps, as timm's and torchvision's evaluation
//! transforms do:
//!
//! 1. Resize with [`Preprocessing::interpolation`] so that the shorter side is
//!    `floor(H / crop_pct)` (a square input; for a non-square one, each side to
//!    `floor(side / crop_pct)`), keeping the aspect ratio (torchvision's `Resize(int)`:
//!    the longer side is `floor(size × long / short)`).
//! 2. Center-crop to `H × W` (the offsets rounded as Python's `round`).
//! 3. Convert to grayscale (C = 1) or RGB (C = 3), scale the bytes to `[0, 1]`.
//! 4. Subtract `mean[c]`, divide by `std[c]` (in `f32`, as `torchvision`'s `Normalize`).
//!
//! # Example
//!
//! ```
//! use candle::Device;
//! use tau_model::preprocess::{Preprocessing, image};
//!
//! # fn main() -> candle::Result<()> {
//! let prep = Preprocessing::imagenet(); // 224×224, crop_pct 0.875: resize to 256, crop 224
//! assert_eq!(prep.resize_size(), (256, 256));
//! let img = image::DynamicImage::new_rgb8(640, 480);
//! let x = prep.image_to_tensor(&img, &Device::Cpu)?;
//! assert_eq!(x.dims(), [3, 224, 224]);
//! # Ok(()) }
//! ```

use candle::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// The `image` crate, whose [`image::DynamicImage`] [`Preprocessing::image_to_tensor`]
/// takes (re-exported so that callers name the same version).
pub use image;

/// Largest input side accepted (the same bound as decoded images). See the
/// [example](Preprocessing#example).
pub const MAX_INPUT_SIDE: usize = 1 << 14;

/// Largest image the resize step produces, in pixels (an extreme aspect ratio would ask
/// for more).
const MAX_RESIZED_PIXELS: u128 = 1 << 25;

/// How an image is resampled when resized (timm's and PIL's names).
///
/// # Example
///
/// ```
/// use tau_model::preprocess::{Interpolation, Preprocessing};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// assert_eq!(Interpolation::default(), Interpolation::Bilinear);
/// for i in [Interpolation::Nearest, Interpolation::Bicubic, Interpolation::Lanczos] {
///     assert_eq!(Interpolation::from_name(i.name())?, i);
/// }
/// // In config.json, by the same name; bilinear when left out.
/// let prep: Preprocessing = serde_json::from_str(
///     r#"{"mean": [0.5], "std": [0.5], "input_size": [1, 28, 28], "interpolation": "bicubic"}"#,
/// )?;
/// assert_eq!(prep.interpolation, Interpolation::Bicubic);
/// assert_eq!(serde_json::to_string(&Interpolation::Lanczos)?, r#""lanczos""#);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear (a triangle filter, widened when shrinking, as PIL does).
    #[default]
    Bilinear,
    /// Bicubic (Catmull-Rom).
    Bicubic,
    /// Lanczos with a window of 3.
    Lanczos,
}

impl Interpolation {
    /// Parses timm's and PIL's names (`nearest`, `bilinear`, `bicubic`, `lanczos`).
    ///
    /// # Errors
    /// Any other name, with the accepted ones.
    ///
    /// ```
    /// # use tau_model::preprocess::Interpolation;
    /// assert_eq!(Interpolation::from_name("bicubic"), Ok(Interpolation::Bicubic));
    /// assert!(Interpolation::from_name("random").is_err());
    /// ```
    pub fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "nearest" => Ok(Self::Nearest),
            "bilinear" => Ok(Self::Bilinear),
            "bicubic" => Ok(Self::Bicubic),
            "lanczos" => Ok(Self::Lanczos),
            other => Err(format!(
                "interpolation {other:?} is not supported (nearest, bilinear, bicubic, lanczos)"
            )),
        }
    }

    /// The name, as in `config.json`. See the [example](Interpolation#example).
    pub fn name(self) -> &'static str {
        match self {
            Self::Nearest => "nearest",
            Self::Bilinear => "bilinear",
            Self::Bicubic => "bicubic",
            Self::Lanczos => "lanczos",
        }
    }

    fn filter(self) -> image::imageops::FilterType {
        use image::imageops::FilterType;
        match self {
            Self::Nearest => FilterType::Nearest,
            Self::Bilinear => FilterType::Triangle,
            Self::Bicubic => FilterType::CatmullRom,
            Self::Lanczos => FilterType::Lanczos3,
        }
    }
}

fn one() -> f64 {
    1.0
}

/// What a model expects of its input (see the [module docs](self) for how it is applied).
///
/// In `config.json`:
/// `{"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.201], "input_size": [3, 32, 32],
/// "crop_pct": 1.0, "interpolation": "bilinear"}` (the last two optional).
///
/// # Example
///
/// ```
/// use candle::{Device, IndexOp};
/// use tau_model::preprocess::{MAX_INPUT_SIDE, Preprocessing, image};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let prep = Preprocessing::cifar10();
/// prep.validate()?;
/// assert_eq!((prep.channels(), prep.resize_size()), (3, (32, 32)));
///
/// // One color: every pixel is ((255, 0, 51) / 255 − mean) / std, channel by channel.
/// let img = image::RgbImage::from_pixel(32, 32, image::Rgb([255, 0, 51]));
/// let xs = prep.image_to_tensor(&img.into(), &dev)?;
/// assert_eq!(xs.dims(), [3, 32, 32]);
/// let want = [(1.0 - 0.4914) / 0.2023, (0.0 - 0.4822) / 0.1994, (0.2 - 0.4465) / 0.2010];
/// for (got, want) in xs.i((.., 5, 7))?.to_vec1::<f32>()?.into_iter().zip(want) {
///     assert!((got - want as f32).abs() < 1e-5, "{got} vs {want}");
/// }
///
/// // Images of any size, as one batch: each resized so that the shorter side is 32,
/// // then center-cropped.
/// let images = [image::DynamicImage::new_rgb8(64, 48), image::DynamicImage::new_rgb8(20, 20)];
/// assert_eq!(prep.images_to_tensor(&images, &dev)?.dims(), [2, 3, 32, 32]);
/// // torchvision's Resize(256) of a 640×480 image for ImageNet: 341×256 (H, W = 256, 341).
/// assert_eq!(Preprocessing::imagenet().resized_dims(480, 640), (256, 341));
///
/// // Grayscale, pixels scaled to [0, 1] only.
/// let gray = image::GrayImage::from_raw(2, 2, vec![0, 51, 204, 255]).unwrap();
/// let xs = Preprocessing::identity([1, 2, 2]).image_to_tensor(&gray.into(), &dev)?;
/// assert_eq!(xs.flatten_all()?.to_vec1::<f32>()?, [0.0, 0.2, 0.8, 1.0]);
/// assert_eq!(Preprocessing::mnist().channels(), 1);
///
/// // A setting out of range is one error naming it.
/// let huge = Preprocessing { input_size: [3, 32, MAX_INPUT_SIDE + 1], ..prep };
/// assert!(huge.validate().unwrap_err().to_string().contains("outside 1..=16384"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// Per-channel mean of the pixels scaled to `[0, 1]`, subtracted.
    pub mean: Vec<f64>,
    /// Per-channel standard deviation, divided by.
    pub std: Vec<f64>,
    /// The input's `[C, H, W]` (C: channels, 1 or 3).
    pub input_size: [usize; 3],
    /// The fraction of the resized image the center crop keeps (timm's `crop_pct`, in
    /// `(0, 1]`; default 1: resize to the input size, no border cut).
    #[serde(default = "one")]
    pub crop_pct: f64,
    /// The resampling filter (default bilinear).
    #[serde(default)]
    pub interpolation: Interpolation,
}

impl Preprocessing {
    /// ImageNet as torchvision and timm evaluate it: mean (0.485, 0.456, 0.406), std
    /// (0.229, 0.224, 0.225), 3×224×224, `crop_pct` 0.875 (resize to 256, crop 224),
    /// bilinear. See the [example](Preprocessing#example).
    pub fn imagenet() -> Self {
        Preprocessing {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            input_size: [3, 224, 224],
            crop_pct: 0.875,
            interpolation: Interpolation::Bilinear,
        }
    }

    /// CIFAR-10 at 3×32×32, with the per-channel mean (0.4914, 0.4822, 0.4465) and std
    /// (0.2023, 0.1994, 0.2010) that `tau-resnet` trains with.
    /// See the [example](Preprocessing#example).
    pub fn cifar10() -> Self {
        Preprocessing {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2023, 0.1994, 0.2010],
            input_size: [3, 32, 32],
            crop_pct: 1.0,
            interpolation: Interpolation::Bilinear,
        }
    }

    /// MNIST at 1×28×28, mean 0.1307, std 0.3081. See the [example](Preprocessing#example).
    pub fn mnist() -> Self {
        Preprocessing {
            mean: vec![0.1307],
            std: vec![0.3081],
            input_size: [1, 28, 28],
            crop_pct: 1.0,
            interpolation: Interpolation::Bilinear,
        }
    }

    /// Pixels scaled to `[0, 1]` only (mean 0, std 1), at `[C, H, W]`.
    /// See the [example](Preprocessing#example).
    pub fn identity(input_size: [usize; 3]) -> Self {
        Preprocessing {
            mean: vec![0.0; input_size[0]],
            std: vec![1.0; input_size[0]],
            input_size,
            crop_pct: 1.0,
            interpolation: Interpolation::Bilinear,
        }
    }

    /// The number of channels, `input_size[0]`. See the [example](Preprocessing#example).
    pub fn channels(&self) -> usize {
        self.input_size[0]
    }

    /// Checks the settings: C is 1 or 3 with one mean and one std per channel, the std
    /// positive and everything finite, H and W in `1..=16384`, `crop_pct` in `(0, 1]`.
    /// See the [example](Preprocessing#example).
    ///
    /// # Errors
    /// One message naming the bad setting.
    pub fn validate(&self) -> candle::Result<()> {
        let [c, h, w] = self.input_size;
        if c != 1 && c != 3 {
            candle::bail!("preprocessing: input_size has {c} channels, expected 1 or 3")
        }
        if !(1..=MAX_INPUT_SIDE).contains(&h) || !(1..=MAX_INPUT_SIDE).contains(&w) {
            candle::bail!(
                "preprocessing: input_size {h}×{w} is outside 1..={MAX_INPUT_SIDE} pixels a side"
            )
        }
        if self.mean.len() != c || self.std.len() != c {
            candle::bail!(
                "preprocessing: {} means and {} stds for {c} channels",
                self.mean.len(),
                self.std.len()
            )
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            candle::bail!("preprocessing: mean {:?} is not finite", self.mean)
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            candle::bail!(
                "preprocessing: std {:?} must be finite and positive",
                self.std
            )
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            candle::bail!(
                "preprocessing: crop_pct {} must be in (0, 1]",
                self.crop_pct
            )
        }
        Ok(())
    }

    /// The size images are resized to before the center crop: `floor(side / crop_pct)`,
    /// as (height, width). For a square input the shorter side of the image goes to it
    /// (see [`Self::resized_dims`]). See the [example](Preprocessing#example).
    pub fn resize_size(&self) -> (usize, usize) {
        let scale = |s: usize| ((s as f64 / self.crop_pct).floor() as usize).max(s);
        (scale(self.input_size[1]), scale(self.input_size[2]))
    }

    /// The (height, width) an image of `height × width` is resized to: for a square input,
    /// the shorter side to [`Self::resize_size`] and the longer one to
    /// `floor(size × long / short)` (torchvision's `Resize(int)`); for a non-square input,
    /// exactly [`Self::resize_size`]. See the [example](Preprocessing#example).
    pub fn resized_dims(&self, height: usize, width: usize) -> (usize, usize) {
        let (rh, rw) = self.resize_size();
        if self.input_size[1] != self.input_size[2] || height == 0 || width == 0 {
            return (rh, rw);
        }
        let size = rh;
        let long = |l: usize, s: usize| ((size as u128 * l as u128) / s as u128) as usize;
        if width <= height {
            (long(height, width).max(size), size)
        } else {
            (size, long(width, height).max(size))
        }
    }

    /// An image as a `[C, H, W]` `f32` tensor on `device`: resized, center-cropped,
    /// converted to the input's channels and normalized (the [module docs](self) give the
    /// steps). See the [example](Preprocessing#example).
    ///
    /// # Errors
    /// An invalid [`Preprocessing`] (see [`Self::validate`]), an empty image.
    pub fn image_to_tensor(
        &self,
        img: &image::DynamicImage,
        device: &Device,
    ) -> candle::Result<Tensor> {
        let pixels = self.image_pixels(img)?;
        let [c, h, w] = self.input_size;
        Tensor::from_vec(pixels, (c, h, w), device)
    }

    /// Several images as one `[N, C, H, W]` batch (see [`Self::image_to_tensor`]).
    /// See the [example](Preprocessing#example).
    ///
    /// # Errors
    /// As [`Self::image_to_tensor`].
    pub fn images_to_tensor(
        &self,
        images: &[image::DynamicImage],
        device: &Device,
    ) -> candle::Result<Tensor> {
        let [c, h, w] = self.input_size;
        let mut all = Vec::with_capacity(images.len() * c * h * w);
        for img in images {
            all.extend(self.image_pixels(img)?);
        }
        Tensor::from_vec(all, (images.len(), c, h, w), device)
    }

    /// The normalized (C, H, W) values of one image.
    fn image_pixels(&self, img: &image::DynamicImage) -> candle::Result<Vec<f32>> {
        self.validate()?;
        let [c, h, w] = self.input_size;
        let (ih, iw) = (img.height() as usize, img.width() as usize);
        if ih == 0 || iw == 0 {
            candle::bail!("preprocessing: the image is empty ({iw}×{ih})")
        }
        let (rh, rw) = self.resized_dims(ih, iw);
        if rh as u128 * rw as u128 > MAX_RESIZED_PIXELS {
            candle::bail!(
                "preprocessing: a {iw}×{ih} image would be resized to {rw}×{rh}, too many pixels (aspect ratio too extreme)"
            )
        }
        let resized;
        let img = if (rh, rw) == (ih, iw) {
            img
        } else {
            resized = img.resize_exact(rw as u32, rh as u32, self.interpolation.filter());
            &resized
        };
        let (top, left) = (center_offset(rh, h), center_offset(rw, w));
        let cropped = img.crop_imm(left as u32, top as u32, w as u32, h as u32);
        let raw: Vec<u8> = if c == 1 {
            cropped.to_luma8().into_raw()
        } else {
            cropped.to_rgb8().into_raw()
        };
        let tables: Vec<[f32; 256]> = self
            .mean
            .iter()
            .zip(&self.std)
            .map(|(&m, &s)| {
                let (m, s) = (m as f32, s as f32);
                std::array::from_fn(|p| (p as f32 / 255.0 - m) / s)
            })
            .collect();
        let mut out = vec![0f32; c * h * w];
        for (i, px) in raw.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                out[ch * h * w + i] = tables[ch][v as usize];
            }
        }
        Ok(out)
    }
}

/// The offset of a centered crop of `crop` in `size`: `round((size - crop) / 2)` with
/// Python's round-half-to-even, as torchvision's `CenterCrop`.
fn center_offset(size: usize, crop: usize) -> usize {
    let d = size.saturating_sub(crop);
    let half = d / 2;
    if d.is_multiple_of(2) || half.is_multiple_of(2) {
        half
    } else {
        half + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_offsets_round_half_to_even() {
        // Python: [round(d / 2) for d in range(8)] == [0, 0, 1, 2, 2, 2, 3, 4]
        let got: Vec<usize> = (0..8).map(|d| center_offset(10 + d, 10)).collect();
        assert_eq!(got, [0, 0, 1, 2, 2, 2, 3, 4]);
    }

    #[test]
    fn resize_follows_torchvision_shorter_side() {
        let p = Preprocessing::imagenet();
        // 256 = floor(224 / 0.875); 640×480 → 341×256 (int(256 * 640 / 480) = 341).
        assert_eq!(p.resized_dims(480, 640), (256, 341));
        assert_eq!(p.resized_dims(640, 480), (341, 256));
        assert_eq!(p.resized_dims(100, 100), (256, 256));
        // timm's a1_in1k: crop_pct 0.95 → floor(235.78) = 235.
        let a1 = Preprocessing {
            crop_pct: 0.95,
            ..Preprocessing::imagenet()
        };
        assert_eq!(a1.resize_size(), (235, 235));
    }

    #[test]
    fn an_image_of_the_input_size_is_only_normalized() {
        let p = Preprocessing::cifar10();
        let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8, 200]));
        let x = p
            .image_to_tensor(&image::DynamicImage::ImageRgb8(img.clone()), &Device::Cpu)
            .unwrap();
        let v = x.to_vec3::<f32>().unwrap();
        for (yy, xx) in [(0usize, 0usize), (5, 31), (31, 7)] {
            let px = img.get_pixel(xx as u32, yy as u32).0;
            for c in 0..3 {
                let want = (px[c] as f32 / 255.0 - p.mean[c] as f32) / p.std[c] as f32;
                assert_eq!(v[c][yy][xx], want);
            }
        }
    }

    #[test]
    fn invalid_settings_are_named() {
        for (p, needle) in [
            (
                Preprocessing {
                    crop_pct: 1.5,
                    ..Preprocessing::imagenet()
                },
                "crop_pct",
            ),
            (
                Preprocessing {
                    std: vec![0.2, 0.0, 0.2],
                    ..Preprocessing::imagenet()
                },
                "std",
            ),
            (
                Preprocessing {
                    input_size: [4, 8, 8],
                    ..Preprocessing::imagenet()
                },
                "channels",
            ),
            (
                Preprocessing {
                    mean: vec![0.5],
                    ..Preprocessing::imagenet()
                },
                "means",
            ),
        ] {
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg}");
        }
    }
}
