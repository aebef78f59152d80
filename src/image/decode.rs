//! # Safe image decoding
//!
//! Takes the encoded bytes of one untrusted image and gives back a [`DecodedImage`]: the small
//! pictures the later stages need — one 224×224 RGB picture per classified frame (the model's
//! input, resized exactly like the Python reference `PIL.Image.resize((224, 224), BILINEAR)`)
//! and a 32×32 grayscale picture of the first frame (the perceptual hash's input, as in
//! `imagehash.phash`). Called by [`super::ImageStage`] on the blocking pool, never on the async
//! runtime, and by benches/tests directly.
//!
//! Defences, in order:
//! 1. the encoded size is checked (`image.max_encoded_bytes`);
//! 2. the format is sniffed from the magic bytes (JPEG, PNG, WebP, GIF; nothing else is parsed);
//! 3. a JPEG must reach its end-of-image marker (a truncated JPEG is an error, as in PIL, not a
//!    grey-filled picture);
//! 4. the header's dimensions are checked against `image.max_pixels` and `image.max_side_px`
//!    *before* any pixel buffer is allocated (decompression bombs, lying headers), and the
//!    decoder gets [`image::Limits`] as a second line;
//! 5. the decode has a deadline (`image.decode_timeout_ms`): the decoder reads through a reader
//!    that fails once it has passed (PNG and GIF read incrementally, so a slow decode stops at
//!    its next read; JPEG and WebP read the whole input first, so for them the pixel limit is
//!    what bounds the time), and it is checked between frames and stages;
//! 6. a decoder panic is caught and reported like any corrupt file.
//!
//! EXIF orientation (JPEG, PNG, WebP) is applied to the small pictures. Large images are
//! downscaled with the reference's antialiasing filter, so nothing within the limits is refused
//! for being big. Animated GIF/WebP: the first frame plus up to `image.sampled_frames` frames
//! spread over the animation (at most `image.max_decoded_frames` frames are decoded).

use std::io::{BufRead, Cursor, Read, Seek, SeekFrom};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use image::codecs::gif::GifDecoder;
use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::error::LimitErrorKind;
use image::metadata::Orientation;
use image::{AnimationDecoder, DynamicImage, ImageDecoder, ImageError, Limits};

/// Side of the model's square input, in pixels.
pub const MODEL_INPUT_PX: usize = 224;
/// Side of the perceptual hash's square grayscale input, in pixels.
pub const HASH_INPUT_PX: usize = 32;
/// Most bytes one read of the deadline reader returns, so the deadline is checked often.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// The image formats accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// JPEG (baseline and progressive).
    Jpeg,
    /// PNG (an APNG's default image only).
    Png,
    /// WebP, lossy or lossless, still or animated.
    Webp,
    /// GIF, still or animated.
    Gif,
}

impl ImageFormat {
    /// Lower-case name, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::Webp => "webp",
            ImageFormat::Gif => "gif",
        }
    }

    /// Sniffs the format from the first bytes; `None` for anything else.
    pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(ImageFormat::Gif)
        } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::Webp)
        } else {
            None
        }
    }
}

/// Limits applied to one decode.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeLimits {
    /// Largest encoded image, in bytes.
    pub max_encoded_bytes: usize,
    /// Most pixels (width × height) of one frame, as declared by the header.
    pub max_pixels: u64,
    /// Largest width or height, in pixels.
    pub max_side_px: u32,
    /// Most pixels decoded over all frames of an animation (canvas pixels × frames).
    pub max_animation_pixels: u64,
    /// Most frames of an animation decoded; later frames are ignored.
    pub max_decoded_frames: usize,
    /// Frames classified besides the first one, spread over the animation.
    pub sampled_frames: usize,
    /// Wall-clock budget of one decode.
    pub timeout: Duration,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_encoded_bytes: 10 << 20,
            max_pixels: 40_000_000,
            max_side_px: 16_384,
            max_animation_pixels: 100_000_000,
            max_decoded_frames: 100,
            sampled_frames: 3,
            timeout: Duration::from_millis(2_000),
        }
    }
}

/// Why an image could not be decoded. The message is what the verdict's `images[].error` says.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty image")]
    Empty,
    /// Over `image.max_encoded_bytes`.
    #[error("image is {bytes} bytes; the limit is {limit} (image.max_encoded_bytes)")]
    TooManyBytes {
        /// The image's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Not one of the accepted formats.
    #[error("unsupported image format (expected JPEG, PNG, WebP or GIF; file starts with {magic})")]
    UnsupportedFormat {
        /// The first bytes in hex, to tell what was sent.
        magic: String,
    },
    /// The header declares more pixels than allowed (decompression bomb or lying header).
    #[error(
        "image declares {width}x{height} pixels; the limits are {max_pixels} pixels and \
         {max_side_px} per side (image.max_pixels, image.max_side_px)"
    )]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The pixel limit.
        max_pixels: u64,
        /// The per-side limit.
        max_side_px: u32,
    },
    /// The file ends early.
    #[error("truncated {format} image: {reason}")]
    Truncated {
        /// Format name.
        format: &'static str,
        /// What was missing.
        reason: String,
    },
    /// The bytes are not a valid image of the sniffed format.
    #[error("corrupt {format} image: {reason}")]
    Corrupt {
        /// Format name.
        format: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// A valid file using a feature the decoder lacks (e.g. arithmetic-coded JPEG).
    #[error("unsupported {format} feature: {reason}")]
    Unsupported {
        /// Format name.
        format: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// The decode ran past `image.decode_timeout_ms`.
    #[error("decoding took longer than {limit_ms} ms (image.decode_timeout_ms)")]
    Timeout {
        /// The limit.
        limit_ms: u64,
    },
}

impl DecodeError {
    /// Whether the same bytes would fail the same way again (so the failure may be cached).
    pub fn is_deterministic(&self) -> bool {
        !matches!(self, DecodeError::Timeout { .. })
    }
}

/// One decoded image, reduced to what the later stages need.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    /// The sniffed format.
    pub format: ImageFormat,
    /// Width after EXIF orientation, in pixels.
    pub width: u32,
    /// Height after EXIF orientation, in pixels.
    pub height: u32,
    /// Frames decoded (1 for a still image).
    pub frames_decoded: usize,
    /// Model inputs: the first frame, then the sampled frames in order. Each is
    /// [`MODEL_INPUT_PX`]² RGB pixels, row-major, 3 bytes per pixel.
    pub model_frames: Vec<Vec<u8>>,
    /// The first frame as [`HASH_INPUT_PX`]² grayscale pixels (PIL "L", Lanczos), row-major.
    pub hash_gray: Vec<u8>,
    /// The same for each crop asked of [`decode_with_crops`] (oriented, in that order).
    pub hash_gray_crops: Vec<Vec<u8>>,
}

/// A crop of the displayed (oriented) picture: the fraction of the width/height cut from each
/// side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crop {
    /// Fraction cut from the left.
    pub left: f32,
    /// Fraction cut from the top.
    pub top: f32,
    /// Fraction cut from the right.
    pub right: f32,
    /// Fraction cut from the bottom.
    pub bottom: f32,
}

/// Decodes `bytes` within `limits`. Never panics; blocks for up to `limits.timeout` (plus one
/// uninterruptible JPEG/WebP decode, bounded by the pixel limit): call off the async runtime.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DecodedImage, DecodeError> {
    decode_with_crops(bytes, limits, &[])
}

/// [`decode`], plus the hash picture of each of `crops` of the first frame (for hash lists that
/// also match cropped copies).
pub fn decode_with_crops(
    bytes: &[u8],
    limits: &DecodeLimits,
    crops: &[Crop],
) -> Result<DecodedImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > limits.max_encoded_bytes {
        return Err(DecodeError::TooManyBytes {
            bytes: bytes.len(),
            limit: limits.max_encoded_bytes,
        });
    }
    let Some(format) = ImageFormat::sniff(bytes) else {
        let magic: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(DecodeError::UnsupportedFormat {
            magic: magic.join(" "),
        });
    };
    if format == ImageFormat::Jpeg {
        check_jpeg_structure(bytes)?;
    }
    let deadline = Instant::now() + limits.timeout;
    let ctx = Ctx {
        format,
        limits,
        deadline,
        crops,
    };
    match catch_unwind(AssertUnwindSafe(|| ctx.decode(bytes))) {
        Ok(result) => result,
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(DecodeError::Corrupt {
                format: format.as_str(),
                reason: format!("decoder panicked: {reason}"),
            })
        }
    }
}

/// Reads the header only: the format and the declared (unoriented) dimensions. Cheap; used by
/// tests and tools.
pub fn probe(bytes: &[u8]) -> Result<(ImageFormat, u32, u32), DecodeError> {
    let Some(format) = ImageFormat::sniff(bytes) else {
        return Err(DecodeError::UnsupportedFormat {
            magic: String::new(),
        });
    };
    let limits = DecodeLimits::default();
    let ctx = Ctx {
        format,
        limits: &limits,
        deadline: Instant::now() + limits.timeout,
        crops: &[],
    };
    let reader = ctx.reader(bytes);
    let dims = match format {
        ImageFormat::Jpeg => JpegDecoder::new(reader).map(|d| d.dimensions()),
        ImageFormat::Png => PngDecoder::new(reader).map(|d| d.dimensions()),
        ImageFormat::Webp => WebPDecoder::new(reader).map(|d| d.dimensions()),
        ImageFormat::Gif => GifDecoder::new(reader).map(|d| d.dimensions()),
    }
    .map_err(|e| ctx.error(e))?;
    Ok((format, dims.0, dims.1))
}

/// One decode's fixed parameters.
struct Ctx<'a> {
    /// The sniffed format.
    format: ImageFormat,
    /// The limits.
    limits: &'a DecodeLimits,
    /// When the decode must stop.
    deadline: Instant,
    /// Crops of the first frame to make hash pictures of.
    crops: &'a [Crop],
}

impl Ctx<'_> {
    fn reader<'b>(&self, bytes: &'b [u8]) -> DeadlineReader<'b> {
        DeadlineReader {
            inner: Cursor::new(bytes),
            deadline: self.deadline,
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<DecodedImage, DecodeError> {
        let reader = self.reader(bytes);
        let e = |e| self.error(e);
        match self.format {
            ImageFormat::Jpeg => self.still(JpegDecoder::new(reader).map_err(e)?),
            ImageFormat::Png => {
                // Dimensions are checked by `still` with our own message; the allocation limit
                // already applies to the chunks read before the first IDAT.
                let mut limits = self.image_limits();
                limits.max_image_width = None;
                limits.max_image_height = None;
                self.still(PngDecoder::with_limits(reader, limits).map_err(e)?)
            }
            ImageFormat::Webp => {
                let decoder = WebPDecoder::new(reader).map_err(e)?;
                if decoder.has_animation() {
                    let (w, h) = decoder.dimensions();
                    self.check_dimensions(w, h)?;
                    self.animated(w, h, decoder.into_frames())
                } else {
                    self.still(decoder)
                }
            }
            ImageFormat::Gif => {
                let mut decoder = GifDecoder::new(reader).map_err(e)?;
                let (w, h) = decoder.dimensions();
                self.check_dimensions(w, h)?;
                decoder.set_limits(self.image_limits()).map_err(e)?;
                self.animated(w, h, decoder.into_frames())
            }
        }
    }

    /// The decoder's own limits: a second line behind [`Ctx::check_dimensions`].
    fn image_limits(&self) -> Limits {
        let side = self.limits.max_side_px;
        let mut limits = Limits::default();
        limits.max_image_width = Some(side);
        limits.max_image_height = Some(side);
        // The largest frame at 16 bits per RGBA channel, plus the decoders' working buffers.
        limits.max_alloc = Some(self.limits.max_pixels.saturating_mul(8) + (64 << 20));
        limits
    }

    fn check_dimensions(&self, width: u32, height: u32) -> Result<(), DecodeError> {
        let l = self.limits;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > l.max_pixels || width > l.max_side_px || height > l.max_side_px {
            return Err(DecodeError::TooLarge {
                width,
                height,
                max_pixels: l.max_pixels,
                max_side_px: l.max_side_px,
            });
        }
        if pixels == 0 {
            return Err(self.corrupt(format!("image declares {width}x{height} pixels")));
        }
        Ok(())
    }

    fn check_deadline(&self) -> Result<(), DecodeError> {
        if Instant::now() > self.deadline {
            Err(self.timeout())
        } else {
            Ok(())
        }
    }

    fn timeout(&self) -> DecodeError {
        DecodeError::Timeout {
            limit_ms: self.limits.timeout.as_millis() as u64,
        }
    }

    fn corrupt(&self, reason: String) -> DecodeError {
        DecodeError::Corrupt {
            format: self.format.as_str(),
            reason,
        }
    }

    /// Maps a decoder error to ours.
    fn error(&self, e: ImageError) -> DecodeError {
        if Instant::now() > self.deadline {
            return self.timeout();
        }
        let format = self.format.as_str();
        match e {
            ImageError::Limits(l) => match l.kind() {
                LimitErrorKind::DimensionError => {
                    self.corrupt("dimensions over the decoder limit".into())
                }
                LimitErrorKind::InsufficientMemory => {
                    self.corrupt("decoding needs more memory than image.max_pixels allows".into())
                }
                _ => self.corrupt(l.to_string()),
            },
            ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                DecodeError::Truncated {
                    format,
                    reason: "unexpected end of file".into(),
                }
            }
            ImageError::Unsupported(u) => DecodeError::Unsupported {
                format,
                reason: u.to_string(),
            },
            other => {
                let reason = other.to_string();
                let lower = reason.to_ascii_lowercase();
                if lower.contains("end of file")
                    || lower.contains("eof")
                    || lower.contains("truncated")
                {
                    DecodeError::Truncated { format, reason }
                } else {
                    self.corrupt(reason)
                }
            }
        }
    }

    /// A single-frame image (JPEG, PNG, still WebP).
    fn still(&self, mut decoder: impl ImageDecoder) -> Result<DecodedImage, DecodeError> {
        let (w, h) = decoder.dimensions();
        self.check_dimensions(w, h)?;
        decoder
            .set_limits(self.image_limits())
            .map_err(|e| self.error(e))?;
        // A broken metadata block must not cost the picture: orientation is best effort.
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        let image = DynamicImage::from_decoder(decoder).map_err(|e| self.error(e))?;
        self.check_deadline()?;
        let (model, gray) = thumbnails(&image);
        let hash_gray_crops = crop_pictures(&image, orientation, self.crops);
        drop(image);
        let (model, gray, width, height) = orient(model, gray, w, h, orientation);
        Ok(DecodedImage {
            format: self.format,
            width,
            height,
            frames_decoded: 1,
            model_frames: vec![model],
            hash_gray: gray,
            hash_gray_crops,
        })
    }

    /// An animation (GIF, animated WebP): the first frame plus sampled frames.
    fn animated(
        &self,
        width: u32,
        height: u32,
        frames: image::Frames<'_>,
    ) -> Result<DecodedImage, DecodeError> {
        let canvas_pixels = u64::from(width) * u64::from(height);
        let extra = self.limits.sampled_frames;
        // Candidates at indices that are multiples of `stride`; when there are more than
        // `capacity`, every other one is dropped and the stride doubles, so the survivors stay
        // spread over the whole (unknown-length) animation.
        let capacity = (2 * extra).max(2);
        let mut stride = 1usize;
        let mut candidates: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut first: Option<(Vec<u8>, Vec<u8>)> = None;
        let mut hash_gray_crops = Vec::new();
        let mut decoded = 0usize;
        let mut frames = frames;
        loop {
            let over_budget = decoded >= self.limits.max_decoded_frames.max(1)
                || (decoded as u64 + 1).saturating_mul(canvas_pixels)
                    > self.limits.max_animation_pixels.max(canvas_pixels);
            if over_budget || (decoded > 0 && (extra == 0 || Instant::now() > self.deadline)) {
                break;
            }
            let Some(frame) = frames.next() else { break };
            let frame = match frame {
                Ok(f) => f,
                // Viewers show the frames before a broken one; so do we.
                Err(_) if decoded > 0 => break,
                Err(e) => return Err(self.error(e)),
            };
            let buffer = frame.into_buffer();
            if decoded == 0 {
                self.check_deadline()?;
                let image = DynamicImage::ImageRgba8(buffer);
                first = Some(thumbnails(&image));
                hash_gray_crops = crop_pictures(&image, Orientation::NoTransforms, self.crops);
            } else if decoded.is_multiple_of(stride) {
                let (w, h) = buffer.dimensions();
                candidates.push((decoded, model_thumbnail_rgba(buffer.as_raw(), w, h)));
                if candidates.len() > capacity {
                    stride *= 2;
                    candidates.retain(|(i, _)| i.is_multiple_of(stride));
                }
            }
            decoded += 1;
        }
        let Some((model, gray)) = first else {
            return Err(self.corrupt("animation has no frames".into()));
        };
        let mut model_frames = Vec::with_capacity(1 + extra);
        model_frames.push(model);
        model_frames.extend(pick_evenly(candidates, extra));
        Ok(DecodedImage {
            format: self.format,
            width,
            height,
            frames_decoded: decoded,
            model_frames,
            hash_gray: gray,
            hash_gray_crops,
        })
    }
}

/// The hash picture of each crop of the oriented `image` (PIL `crop` box rounding: the cut is
/// `int(size × fraction)` pixels).
fn crop_pictures(image: &DynamicImage, orientation: Orientation, crops: &[Crop]) -> Vec<Vec<u8>> {
    if crops.is_empty() {
        return Vec::new();
    }
    let (w, h) = (image.width(), image.height());
    let luma = match image {
        DynamicImage::ImageRgb8(b) => luma_from(b.as_raw(), 3),
        DynamicImage::ImageRgba8(b) => luma_from(b.as_raw(), 4),
        DynamicImage::ImageLuma8(b) => b.as_raw().clone(),
        other => luma_from(other.to_rgb8().as_raw(), 3),
    };
    let Some(gray) = image::GrayImage::from_raw(w, h, luma) else {
        return Vec::new();
    };
    let mut oriented = DynamicImage::ImageLuma8(gray);
    oriented.apply_orientation(orientation);
    let gray = oriented.into_luma8();
    let (w, h) = gray.dimensions();
    crops
        .iter()
        .filter_map(|c| {
            let cut = |size: u32, f: f32| (f64::from(size) * f64::from(f.clamp(0.0, 0.45))) as u32;
            let (x0, y0) = (cut(w, c.left), cut(h, c.top));
            let (x1, y1) = (w - cut(w, c.right), h - cut(h, c.bottom));
            if x1 <= x0 || y1 <= y0 {
                return None;
            }
            let part = image::imageops::crop_imm(&gray, x0, y0, x1 - x0, y1 - y0).to_image();
            Some(hash_thumbnail(part.as_raw(), x1 - x0, y1 - y0))
        })
        .collect()
}

/// Keeps `n` of `candidates`, evenly spread, the last one included.
fn pick_evenly(candidates: Vec<(usize, Vec<u8>)>, n: usize) -> Vec<Vec<u8>> {
    let len = candidates.len();
    if len <= n {
        return candidates.into_iter().map(|(_, f)| f).collect();
    }
    let wanted: Vec<usize> = (1..=n).map(|j| (j * len).div_ceil(n) - 1).collect();
    candidates
        .into_iter()
        .enumerate()
        .filter(|(pos, _)| wanted.contains(pos))
        .map(|(_, (_, f))| f)
        .collect()
}

/// Applies an EXIF orientation to the small pictures; returns them with the oriented size.
fn orient(
    model: Vec<u8>,
    gray: Vec<u8>,
    width: u32,
    height: u32,
    orientation: Orientation,
) -> (Vec<u8>, Vec<u8>, u32, u32) {
    if orientation == Orientation::NoTransforms {
        return (model, gray, width, height);
    }
    let side = MODEL_INPUT_PX as u32;
    let hside = HASH_INPUT_PX as u32;
    const SIZE: &str = "thumbnails are always side² × channels bytes. This is a bug.";
    let mut model =
        DynamicImage::ImageRgb8(image::RgbImage::from_raw(side, side, model).expect(SIZE));
    model.apply_orientation(orientation);
    let mut gray =
        DynamicImage::ImageLuma8(image::GrayImage::from_raw(hside, hside, gray).expect(SIZE));
    gray.apply_orientation(orientation);
    let (model, gray) = (model.into_rgb8().into_raw(), gray.into_luma8().into_raw());
    let swaps = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let (width, height) = if swaps {
        (height, width)
    } else {
        (width, height)
    };
    (model, gray, width, height)
}

/// The model picture and the hash picture of one decoded frame, as PIL would make them:
/// `convert("RGB").resize((224, 224), BILINEAR)` and `convert("L").resize((32, 32), LANCZOS)`.
/// Alpha is dropped, not composited (PIL's `convert("RGB")` does the same).
fn thumbnails(image: &DynamicImage) -> (Vec<u8>, Vec<u8>) {
    let (w, h) = (image.width(), image.height());
    match image {
        DynamicImage::ImageRgb8(buf) => (
            model_thumbnail(buf.as_raw(), w, h, 3),
            hash_thumbnail(&luma_from(buf.as_raw(), 3), w, h),
        ),
        DynamicImage::ImageRgba8(buf) => (
            model_thumbnail_rgba(buf.as_raw(), w, h),
            hash_thumbnail(&luma_from(buf.as_raw(), 4), w, h),
        ),
        DynamicImage::ImageLuma8(buf) => (
            model_thumbnail(buf.as_raw(), w, h, 1),
            hash_thumbnail(buf.as_raw(), w, h),
        ),
        DynamicImage::ImageLumaA8(buf) => {
            let luma: Vec<u8> = buf.as_raw().chunks_exact(2).map(|p| p[0]).collect();
            (model_thumbnail(&luma, w, h, 1), hash_thumbnail(&luma, w, h))
        }
        // 16-bit and float images: convert to 8-bit RGB first (rare in chat).
        other => {
            let rgb = other.to_rgb8();
            (
                model_thumbnail(rgb.as_raw(), w, h, 3),
                hash_thumbnail(&luma_from(rgb.as_raw(), 3), w, h),
            )
        }
    }
}

/// Resizes to the model's input with `channels` = 1 (grey, replicated to RGB) or 3 (RGB).
fn model_thumbnail(pixels: &[u8], w: u32, h: u32, channels: usize) -> Vec<u8> {
    let side = MODEL_INPUT_PX;
    let small = resize(
        pixels,
        w as usize,
        h as usize,
        channels,
        side,
        side,
        Filter::Bilinear,
    );
    match channels {
        1 => small.iter().flat_map(|&v| [v, v, v]).collect(),
        _ => small,
    }
}

/// Resizes RGBA to the model's input, dropping alpha (channels are independent, so resizing
/// then dropping equals PIL's dropping then resizing).
fn model_thumbnail_rgba(pixels: &[u8], w: u32, h: u32) -> Vec<u8> {
    let side = MODEL_INPUT_PX;
    let small = resize(
        pixels,
        w as usize,
        h as usize,
        4,
        side,
        side,
        Filter::Bilinear,
    );
    small
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect()
}

fn hash_thumbnail(luma: &[u8], w: u32, h: u32) -> Vec<u8> {
    let side = HASH_INPUT_PX;
    resize(luma, w as usize, h as usize, 1, side, side, Filter::Lanczos)
}

/// PIL's RGB → L: `(r·19595 + g·38470 + b·7471 + 0x8000) >> 16` (ITU-R 601-2 luma).
fn luma_from(pixels: &[u8], channels: usize) -> Vec<u8> {
    pixels
        .chunks_exact(channels)
        .map(|p| {
            let v = u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471;
            ((v + 0x8000) >> 16) as u8
        })
        .collect()
}

/// Resampling filters of PIL's `Image.resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR`: triangle, support 1 (scaled by the reduction factor).
    Bilinear,
    /// `Image.LANCZOS`: Lanczos-3.
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point precision of PIL's 8-bit resampler.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel taps along one axis (PIL `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct Taps {
    /// Coefficients per output pixel (`ksize` each, zero-padded).
    ksize: usize,
    /// `(first input index, tap count)` per output pixel.
    bounds: Vec<(usize, usize)>,
    /// Fixed-point coefficients, `ksize` per output pixel.
    coeffs: Vec<i32>,
}

impl Taps {
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Taps {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut coeffs = vec![0i32; out_size * ksize];
        let mut weights = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin).min(ksize);
            let mut total = 0.0;
            for (x, w) in weights.iter_mut().enumerate().take(count) {
                *w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
                total += *w;
            }
            let k = &mut coeffs[xx * ksize..xx * ksize + ksize];
            for (c, &w) in k.iter_mut().zip(&weights).take(count) {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                *c = if w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            bounds.push((xmin, count));
        }
        Taps {
            ksize,
            bounds,
            coeffs,
        }
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an 8-bit image with `channels` interleaved channels exactly like PIL's
/// `ImagingResample` (two passes, horizontal first, each rounded to 8 bits).
pub fn resize(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_width: usize,
    out_height: usize,
    filter: Filter,
) -> Vec<u8> {
    debug_assert_eq!(pixels.len(), width * height * channels);
    let half = 1i32 << (PRECISION_BITS - 1);
    let vertical = Taps::new(height, out_height, filter);
    let need_horizontal = out_width != width;
    let need_vertical = out_height != height;

    // Horizontal pass over the rows the vertical pass will read.
    let (row0, row1) = match (vertical.bounds.first(), vertical.bounds.last()) {
        (Some(&(first, _)), Some(&(last, n))) => (first, last + n),
        _ => (0, 0),
    };
    let owned;
    let (src, src_width, src_row0): (&[u8], usize, usize) = if need_horizontal {
        let taps = Taps::new(width, out_width, filter);
        let rows = row1 - row0;
        let mut out = vec![0u8; out_width * rows * channels];
        let in_stride = width * channels;
        let out_stride = out_width * channels;
        for (r, out_row) in out.chunks_exact_mut(out_stride).enumerate() {
            let in_row = &pixels[(row0 + r) * in_stride..(row0 + r + 1) * in_stride];
            for (xx, &(xmin, count)) in taps.bounds.iter().enumerate() {
                let k = &taps.coeffs[xx * taps.ksize..xx * taps.ksize + count];
                let window = &in_row[xmin * channels..(xmin + count) * channels];
                for c in 0..channels {
                    let mut acc = half;
                    for (tap, &coef) in k.iter().enumerate() {
                        acc += i32::from(window[tap * channels + c]) * coef;
                    }
                    out_row[xx * channels + c] = clip8(acc);
                }
            }
        }
        owned = out;
        (&owned[..], out_width, row0)
    } else {
        (pixels, width, 0)
    };
    if !need_vertical {
        return src.to_vec();
    }

    let stride = src_width * channels;
    let mut out = vec![0u8; out_height * stride];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, count) = vertical.bounds[yy];
        let k = &vertical.coeffs[yy * vertical.ksize..yy * vertical.ksize + count];
        acc.fill(half);
        for (tap, &coef) in k.iter().enumerate() {
            let y = ymin + tap - src_row0;
            let row = &src[y * stride..(y + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += i32::from(v) * coef;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Walks a JPEG's marker segments and entropy-coded data; fails unless the end-of-image marker
/// is reached (zune-jpeg would grey-fill a truncated file instead of failing).
fn check_jpeg_structure(bytes: &[u8]) -> Result<(), DecodeError> {
    let truncated = |reason: &str| DecodeError::Truncated {
        format: "jpeg",
        reason: reason.into(),
    };
    let mut i = 2; // after SOI
    loop {
        // Next marker: skip anything up to an 0xFF, then fill bytes.
        match bytes[i.min(bytes.len())..].iter().position(|&b| b == 0xFF) {
            Some(p) => i += p,
            None => return Err(truncated("no end-of-image marker")),
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else {
            return Err(truncated("no end-of-image marker"));
        };
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let Some(len) = bytes
            .get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return Err(truncated("ends inside a segment header"));
        };
        if len < 2 {
            return Err(DecodeError::Corrupt {
                format: "jpeg",
                reason: format!("segment 0xFF{marker:02X} has length {len}"),
            });
        }
        i += len;
        if i > bytes.len() {
            return Err(truncated("ends inside a segment"));
        }
        if marker == 0xDA {
            // Entropy-coded data: runs until a marker other than stuffing (FF00) or RSTn.
            loop {
                match bytes[i..].iter().position(|&b| b == 0xFF) {
                    Some(p) => i += p,
                    None => return Err(truncated("ends inside the scan data")),
                }
                match bytes.get(i + 1) {
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                    None => return Err(truncated("ends inside the scan data")),
                }
            }
        }
    }
}

/// A reader over an in-memory image that fails once the decode deadline has passed, and hands
/// out at most [`READ_CHUNK_BYTES`] per call so the deadline is checked often.
struct DeadlineReader<'a> {
    /// The encoded image.
    inner: Cursor<&'a [u8]>,
    /// When reads start failing.
    deadline: Instant,
}

impl DeadlineReader<'_> {
    fn check(&self) -> std::io::Result<()> {
        if Instant::now() > self.deadline {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "image decode deadline passed",
            ))
        } else {
            Ok(())
        }
    }
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        let n = buf.len().min(READ_CHUNK_BYTES);
        self.inner.read(&mut buf[..n])
    }
}

impl BufRead for DeadlineReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.check()?;
        let buf = self.inner.fill_buf()?;
        Ok(&buf[..buf.len().min(READ_CHUNK_BYTES)])
    }

    fn consume(&mut self, amount: usize) {
        self.inner.consume(amount);
    }
}

impl Seek for DeadlineReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_identity_and_constant() {
        let px: Vec<u8> = (0..(5 * 4 * 3)).map(|v| v as u8).collect();
        assert_eq!(resize(&px, 5, 4, 3, 5, 4, Filter::Bilinear), px);
        let flat = vec![77u8; 300 * 200 * 3];
        let small = resize(&flat, 300, 200, 3, 224, 224, Filter::Bilinear);
        assert!(small.iter().all(|&v| v == 77));
        let small = resize(&flat, 300, 200, 3, 32, 32, Filter::Lanczos);
        assert!(small.iter().all(|&v| v == 77));
    }

    #[test]
    fn jpeg_structure_walk() {
        // SOI, APP0 (len 4), SOS (len 2), data with stuffing and RST, EOI.
        let ok = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x01, 0x02, 0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF,
            0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF, 0xD9,
        ];
        assert_eq!(check_jpeg_structure(&ok), Ok(()));
        for cut in 3..ok.len() - 1 {
            assert!(
                check_jpeg_structure(&ok[..cut]).is_err(),
                "cut at {cut} must be truncated"
            );
        }
    }

    #[test]
    fn pick_evenly_keeps_the_last() {
        let c: Vec<(usize, Vec<u8>)> = (0..10).map(|i| (i, vec![i as u8])).collect();
        let picked = pick_evenly(c, 3);
        assert_eq!(picked, vec![vec![3], vec![6], vec![9]]);
    }
}
