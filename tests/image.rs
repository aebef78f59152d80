//! Issue 4, image moderation: the real image model (needs `make models`) against the Python
//! reference in `tests/data/image/parity.json` (made by models/scripts/make_image_fixture.py),
//! safe decoding of hostile inputs, the perceptual-hash lists, and both image paths (inline
//! base64 and binary frames) end to end over the WebSocket. Model tests FAIL, not skip, when the
//! model files are missing.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use chatguard::image::classifier::ImageClassifier;
use chatguard::image::decode::{self, DecodeLimits, DecodedImage, ImageFormat};
use chatguard::image::hashlist::{self, ListMatch, PHash};
use chatguard::image::{ImageConfig, ImageInput, ImageModel, ImageStage};
use chatguard::policy::Policy;
use chatguard::server::protocol::Action;
use image::{DynamicImage, ImageEncoder, RgbImage, RgbaImage};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::common::{Server, recv, send, send_binary};

/// Largest allowed difference between our probabilities and the Python reference's.
const PROB_TOL: f32 = 1e-3;
/// Hamming distance within which an edited copy must still match (the default
/// `image.hash_max_distance`).
const MATCH_DISTANCE: u32 = 8;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    file: String,
    resized_crc32: u32,
    resized_channel_sums: [u64; 3],
    probabilities: [f32; 3],
    phash: String,
}

fn fixture() -> Fixture {
    let path = "tests/data/image/parity.json";
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A sample photo from `make models`; fails with the command to run when missing.
fn photo(name: &str) -> Vec<u8> {
    let path = Path::new("models/testdata").join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "sample photo {} is missing ({e}): run `make models` (bash models/setup.sh)",
            path.display()
        )
    })
}

const PHOTOS: [&str; 5] = [
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
];

/// The loaded model, shared by the tests of this binary.
fn classifier() -> ImageClassifier {
    static CLASSIFIER: OnceLock<ImageClassifier> = OnceLock::new();
    CLASSIFIER
        .get_or_init(|| {
            ImageClassifier::load(&ImageConfig::default()).unwrap_or_else(|e| {
                panic!("image model unavailable: {e}. Run `make models` (bash models/setup.sh).")
            })
        })
        .clone()
}

fn make_stage(edit: impl FnOnce(&mut ImageConfig), model: ImageModel) -> ImageStage {
    let mut cfg = ImageConfig {
        decode_timeout_ms: 60_000,
        ..Default::default()
    };
    edit(&mut cfg);
    cfg.validate().expect("test image config is valid");
    ImageStage::new(&cfg, model).expect("hash lists load")
}

/// Default limits with a decode deadline that a debug build on a busy machine meets.
fn test_limits() -> DecodeLimits {
    DecodeLimits {
        timeout: Duration::from_secs(60),
        ..DecodeLimits::default()
    }
}

fn decode_ok(bytes: &[u8]) -> DecodedImage {
    decode::decode(bytes, &test_limits()).expect("decodes")
}

/// Bitwise CRC-32 (zlib's), for PNG chunks and the fixture's pixel checksums.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn encode_jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .expect("jpeg encodes");
    out
}

fn encode_png(img: &DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png encodes");
    out.into_inner()
}

fn load(bytes: &[u8]) -> DynamicImage {
    image::load_from_memory(bytes).expect("test image loads")
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend(crc32(&body).to_be_bytes());
}

/// A valid-looking PNG header declaring `w`×`h` RGB pixels, followed by `idat` and IEND.
fn png_declaring(w: u32, h: u32, idat: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", idat);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// Mean absolute difference of two equally sized byte pictures.
fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let sum: u64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    sum as f64 / a.len() as f64
}

fn hash_of(bytes: &[u8]) -> PHash {
    chatguard::image::phash_of(bytes, &test_limits()).expect("hashable")
}

/// The resize matches PIL bit for bit on PNGs, the probabilities match Python onnxruntime
/// within 1e-3 (the JPEG decoder differs from libjpeg-turbo by rounding), and the pHash
/// matches `imagehash.phash`.
#[test]
fn parity_with_python_reference() {
    let classifier = classifier();
    let mut failures = Vec::new();
    let mut max_prob_diff = 0f32;
    for case in fixture().cases {
        let bytes = photo(&case.file);
        let decoded = decode_ok(&bytes);
        let frame = &decoded.model_frames[0];
        let crc = crc32(frame);
        let mut sums = [0u64; 3];
        for px in frame.chunks_exact(3) {
            for (sum, &v) in sums.iter_mut().zip(px) {
                *sum += u64::from(v);
            }
        }
        if decoded.format == ImageFormat::Png && crc != case.resized_crc32 {
            failures.push(format!(
                "{}: resized pixels differ from PIL (channel sums {sums:?}, PIL {:?})",
                case.file, case.resized_channel_sums
            ));
        }
        for (c, (&ours, &theirs)) in sums.iter().zip(&case.resized_channel_sums).enumerate() {
            let mean_diff = (ours as f64 - theirs as f64).abs() / (224.0 * 224.0);
            if mean_diff > 0.5 {
                failures.push(format!(
                    "{}: channel {c} mean differs by {mean_diff:.3} from PIL",
                    case.file
                ));
            }
        }
        let scores = classifier
            .classify_frames_blocking(&[frame.as_slice()])
            .expect("model runs");
        let got = scores[0].as_array();
        for (i, (g, want)) in got.iter().zip(case.probabilities).enumerate() {
            let diff = (g - want).abs();
            max_prob_diff = max_prob_diff.max(diff);
            if diff > PROB_TOL {
                failures.push(format!(
                    "{}: probability {i} = {g}, Python {want} (diff {diff})",
                    case.file
                ));
            }
        }
        let want: PHash = case.phash.parse().expect("fixture hash");
        let got = hashlist::phash(&decoded.hash_gray).expect("photo hashes");
        let distance = got.distance(want);
        println!(
            "{}: crc {} probs {got_p:?} (python {:?}) phash {got} (imagehash {want}, distance {distance})",
            case.file,
            if crc == case.resized_crc32 {
                "equal"
            } else {
                "differs"
            },
            case.probabilities,
            got_p = scores[0].as_array(),
        );
        if distance > 2 {
            failures.push(format!(
                "{}: pHash {got} is {distance} bits from imagehash's {want}",
                case.file
            ));
        }
    }
    println!("parity: max probability difference {max_prob_diff:.2e} (tolerance {PROB_TOL:e})");
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

/// A batch of several photos scores the same as one at a time.
#[test]
fn batched_scores_equal_single_scores() {
    let classifier = classifier();
    let frames: Vec<Vec<u8>> = PHOTOS
        .iter()
        .map(|p| decode_ok(&photo(p)).model_frames.remove(0))
        .collect();
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let batched = classifier
        .classify_frames_blocking(&refs)
        .expect("batch runs");
    for (frame, b) in refs.iter().zip(&batched) {
        let single = classifier
            .classify_frames_blocking(&[frame])
            .expect("single runs")[0];
        for (x, y) in single.as_array().iter().zip(b.as_array()) {
            assert!((x - y).abs() < 1e-4, "batched {b:?} vs single {single:?}");
        }
    }
}

#[tokio::test]
async fn sample_photos_are_allowed_with_model_labels() {
    let stage = make_stage(|_| {}, ImageModel::Ready(classifier()));
    let policy = Policy::default();
    for name in PHOTOS {
        let report = stage.analyze(ImageInput::Bytes(photo(name).into())).await;
        let verdict = report.verdict(name.into(), &policy);
        assert_eq!(report.error, None, "{name}");
        assert!(!report.model_degraded, "{name}");
        assert_eq!(verdict.action, Action::Allow, "{name}: {verdict:?}");
        let labels: Vec<&str> = verdict.labels.iter().map(|l| l.label).collect();
        assert!(
            labels.contains(&"porn") && labels.contains(&"gore"),
            "{name}: {verdict:?}"
        );
        assert!(verdict.phash.is_some(), "{name}");
    }
}

/// Hostile and broken inputs: a clear per-image error each, never a panic, never a verdict
/// that pretends the image was judged.
#[tokio::test]
async fn bad_inputs_get_a_clear_per_image_error() {
    let rocket = photo("rocket.jpg");
    let astronaut = photo("astronaut.png");
    // rocket.jpg with its frame header (SOF0) patched to declare 65000×65000.
    let mut huge_jpeg = rocket.clone();
    let sof = huge_jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline JPEG has SOF0");
    huge_jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    // A GIF whose logical screen claims 60000×60000 around one 1×1 frame.
    let mut huge_gif = b"GIF89a".to_vec();
    huge_gif.extend([
        0x60, 0xEA, 0x60, 0xEA, 0x80, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0, 0, 0,
    ]);
    huge_gif.extend([
        0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3B,
    ]);
    let cases: Vec<(&str, ImageInput, &str)> = vec![
        (
            "junk bytes",
            ImageInput::Bytes(b"hello, I am not an image at all".to_vec().into()),
            "unsupported image format",
        ),
        ("empty", ImageInput::Bytes(Vec::new().into()), "empty image"),
        (
            "truncated jpeg",
            ImageInput::Bytes(rocket[..rocket.len() * 6 / 10].to_vec().into()),
            "truncated jpeg",
        ),
        (
            "jpeg cut in its headers",
            ImageInput::Bytes(rocket[..300].to_vec().into()),
            "truncated jpeg",
        ),
        (
            "truncated png",
            ImageInput::Bytes(astronaut[..astronaut.len() / 2].to_vec().into()),
            "png image",
        ),
        (
            "tiny png claiming 100000x100000",
            ImageInput::Bytes(png_declaring(100_000, 100_000, b"x").into()),
            "declares 100000x100000",
        ),
        (
            "png claiming 0x10",
            ImageInput::Bytes(png_declaring(0, 10, b"x").into()),
            "png image",
        ),
        (
            "png with garbage pixels",
            ImageInput::Bytes(png_declaring(16, 16, b"\x78\x9cgarbage!!").into()),
            "png image",
        ),
        (
            "jpeg claiming 65000x65000",
            ImageInput::Bytes(huge_jpeg.into()),
            "declares 65000x65000",
        ),
        (
            "gif claiming 60000x60000",
            ImageInput::Bytes(huge_gif.into()),
            "declares 60000x60000",
        ),
        (
            "webp garbage",
            ImageInput::Bytes(
                b"RIFF\x20\0\0\0WEBPVP8 \x14\0\0\0garbage garbage!!"
                    .to_vec()
                    .into(),
            ),
            "webp image",
        ),
        (
            "bmp",
            ImageInput::Bytes(b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0".to_vec().into()),
            "unsupported image format",
        ),
        (
            "bad base64",
            ImageInput::Base64("!!not base64!!".into()),
            "not valid base64",
        ),
        (
            "missing binary frame",
            ImageInput::Missing("binary frame `m/i` did not arrive".into()),
            "did not arrive",
        ),
    ];
    let stage = make_stage(|c| c.max_encoded_bytes = 1 << 20, ImageModel::Disabled);
    let policy = Policy::default();
    let mut failures = Vec::new();
    for (name, input, want) in cases {
        let report = stage.analyze(input).await;
        let verdict = report.verdict(name.into(), &policy);
        match &report.error {
            Some(e) if e.contains(want) => {}
            other => failures.push(format!(
                "{name}: error {other:?}, want it to contain {want:?}"
            )),
        }
        if verdict.action != policy.image_error_action || !verdict.labels.is_empty() {
            failures.push(format!("{name}: verdict {verdict:?}"));
        }
    }
    let big = photo("astronaut.png");
    let small_limit = make_stage(|c| c.max_encoded_bytes = 1000, ImageModel::Disabled);
    let report = small_limit.analyze(ImageInput::Bytes(big.into())).await;
    if !report
        .error
        .as_deref()
        .unwrap_or("")
        .contains("image.max_encoded_bytes")
    {
        failures.push(format!("over max_encoded_bytes: {:?}", report.error));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every prefix of a JPEG and a PNG fails cleanly (no panic, no grey-filled picture).
#[test]
fn every_truncation_fails_cleanly() {
    let limits = test_limits();
    for name in ["rocket.jpg", "chelsea.png"] {
        let bytes = photo(name);
        for cut in (0..bytes.len()).step_by(bytes.len() / 40) {
            let result = decode::decode(&bytes[..cut], &limits);
            assert!(
                result.is_err(),
                "{name} cut at {cut} of {} decoded",
                bytes.len()
            );
        }
    }
}

#[test]
fn large_images_are_downscaled_not_rejected() {
    let chelsea = load(&photo("chelsea.png")).to_rgb8();
    let big = image::imageops::resize(&chelsea, 2255, 1500, image::imageops::FilterType::Triangle);
    let bytes = encode_jpeg(&big, 90);
    let decoded = decode_ok(&bytes);
    assert_eq!((decoded.width, decoded.height), (2255, 1500));
    let small = decode_ok(&photo("chelsea.png"));
    let diff = mean_abs_diff(&decoded.model_frames[0], &small.model_frames[0]);
    assert!(
        diff < 3.0,
        "downscaled 3.4 MP picture differs by {diff} per byte"
    );
    assert!(hash_of(&bytes).distance(hash_of(&photo("chelsea.png"))) <= 2);
    // Over the pixel limit: refused from the header, before decoding.
    let limits = DecodeLimits {
        max_pixels: 3_000_000,
        max_animation_pixels: 3_000_000,
        ..test_limits()
    };
    let err = decode::decode(&bytes, &limits).expect_err("over max_pixels");
    assert!(err.to_string().contains("image.max_pixels"), "{err}");
    // A decode past its deadline is an error, not a hang.
    let png = encode_png(&DynamicImage::ImageRgb8(big));
    let limits = DecodeLimits {
        timeout: Duration::from_millis(1),
        ..test_limits()
    };
    let err = decode::decode(&png, &limits).expect_err("past the deadline");
    assert!(err.to_string().contains("image.decode_timeout_ms"), "{err}");
}

/// A JPEG whose EXIF says "rotate 90° clockwise" is classified upright.
#[test]
fn exif_orientation_is_applied() {
    let chelsea = load(&photo("chelsea.png")).to_rgb8(); // 451×300
    let sideways = image::imageops::rotate270(&chelsea); // 300×451, as a camera stores it
    let jpeg = encode_jpeg(&sideways, 95);
    // APP1 "Exif\0\0", big-endian TIFF, one IFD entry: Orientation (0x0112) SHORT = 6.
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
    exif.extend([0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
    let mut with_exif = jpeg[..2].to_vec();
    with_exif.extend([0xFF, 0xE1]);
    with_exif.extend(((exif.len() + 2) as u16).to_be_bytes());
    with_exif.extend(&exif);
    with_exif.extend(&jpeg[2..]);

    let upright = decode_ok(&photo("chelsea.png"));
    let plain = decode_ok(&jpeg);
    let oriented = decode_ok(&with_exif);
    assert_eq!((plain.width, plain.height), (300, 451));
    assert_eq!((oriented.width, oriented.height), (451, 300));
    let fixed = mean_abs_diff(&oriented.model_frames[0], &upright.model_frames[0]);
    let unfixed = mean_abs_diff(&plain.model_frames[0], &upright.model_frames[0]);
    assert!(
        fixed < 4.0 && unfixed > 10.0,
        "oriented {fixed}, sideways {unfixed}"
    );
    let h = |d: &DecodedImage| hashlist::phash(&d.hash_gray).expect("hash");
    assert!(h(&oriented).distance(h(&upright)) <= 4);
}

#[test]
fn lossless_webp_decodes_like_the_png() {
    let png = photo("chelsea.png");
    let rgb = load(&png).to_rgb8();
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .write_image(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("webp encodes");
    let a = decode_ok(&webp);
    let b = decode_ok(&png);
    assert_eq!(a.format, ImageFormat::Webp);
    assert_eq!(a.model_frames, b.model_frames);
    assert_eq!(a.hash_gray, b.hash_gray);
}

/// An animated GIF: the first frame plus `sampled_frames` frames spread over the animation.
#[test]
fn animated_gif_classifies_first_and_sampled_frames() {
    let frames: Vec<image::Frame> = (0..12u8)
        .map(|i| {
            let img = RgbaImage::from_pixel(64, 48, image::Rgba([i * 20, 255 - i * 20, 7, 255]));
            image::Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(100, 1))
        })
        .collect();
    let mut gif = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut gif);
        encoder.encode_frames(frames).expect("gif encodes");
    }
    let decoded = decode_ok(&gif);
    assert_eq!(decoded.format, ImageFormat::Gif);
    assert_eq!(decoded.frames_decoded, 12);
    assert_eq!(decoded.model_frames.len(), 4, "first + 3 sampled");
    let reds: Vec<u8> = decoded.model_frames.iter().map(|f| f[0]).collect();
    assert_eq!(reds[0], 0, "first frame first: {reds:?}");
    assert!(
        reds.windows(2).all(|w| w[0] < w[1]),
        "distinct, in order: {reds:?}"
    );
    assert!(reds[3] >= 180, "sampled up to the end: {reds:?}");
    // A frame budget stops decoding early but keeps the first frame.
    let limits = DecodeLimits {
        max_decoded_frames: 3,
        ..test_limits()
    };
    let capped = decode::decode(&gif, &limits).expect("decodes");
    assert_eq!(capped.frames_decoded, 3);
}

/// Resized, re-encoded and slightly cropped copies stay within the match distance of what a
/// list stores for the original (its hash and its crop variants); unrelated photos do not.
#[test]
fn phash_survives_edits_and_separates_photos() {
    let limits = test_limits();
    let mut failures = Vec::new();
    let mut listed = Vec::new();
    for name in PHOTOS {
        let bytes = photo(name);
        let stored: Vec<PHash> = hashlist::list_hashes(&bytes, &limits)
            .expect("listable")
            .into_iter()
            .map(|(_, h)| h)
            .collect();
        assert!(stored.len() > 5, "{name}: crop variants stored");
        listed.push((name, stored.clone()));
        let img = load(&bytes).to_rgb8();
        let (w, h) = img.dimensions();
        let half =
            image::imageops::resize(&img, w / 2, h / 2, image::imageops::FilterType::Triangle);
        let crop = |l: f32, t: f32, r: f32, b: f32| {
            let (x0, y0) = ((w as f32 * l) as u32, (h as f32 * t) as u32);
            let (x1, y1) = (w - (w as f32 * r) as u32, h - (h as f32 * b) as u32);
            encode_jpeg(
                &image::imageops::crop_imm(&img, x0, y0, x1 - x0, y1 - y0).to_image(),
                85,
            )
        };
        let edits = [
            ("half size, JPEG q70", encode_jpeg(&half, 70)),
            ("JPEG q50", encode_jpeg(&img, 50)),
            (
                "PNG re-encode",
                encode_png(&DynamicImage::ImageRgb8(img.clone())),
            ),
            ("5% crop each side", crop(0.05, 0.05, 0.05, 0.05)),
            ("10% crop off the top", crop(0.0, 0.1, 0.0, 0.0)),
            ("5% off right and bottom", crop(0.0, 0.0, 0.05, 0.05)),
        ];
        for (edit, edited) in edits {
            let q = hash_of(&edited);
            let d = stored.iter().map(|s| s.distance(q)).min().unwrap_or(64);
            println!(
                "{name}: {edit}: distance {d} (to the whole picture {})",
                stored[0].distance(q)
            );
            if d > MATCH_DISTANCE {
                failures.push(format!("{name}: {edit}: distance {d} > {MATCH_DISTANCE}"));
            }
        }
    }
    let mut closest = u32::MAX;
    for (i, (a, ha)) in listed.iter().enumerate() {
        for (b, hb) in &listed[i + 1..] {
            // The query is a whole photo; the list holds the other photo's variants.
            for (q, stored) in [(ha[0], hb), (hb[0], ha)] {
                let d = stored.iter().map(|s| s.distance(q)).min().unwrap_or(64);
                closest = closest.min(d);
                if d <= MATCH_DISTANCE {
                    failures.push(format!("{a} and {b} are only {d} bits apart"));
                }
            }
        }
    }
    println!("closest unrelated photo to a listed one: {closest} bits");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A blocklisted image (and an edited copy) is blocked from the list without running the
/// model; an allowlisted one is allowed without it; others still go to the model.
#[tokio::test]
async fn hash_lists_decide_without_the_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let block = dir.path().join("block.txt");
    let allow = dir.path().join("allow.txt");
    let coffee = photo("coffee.png");
    let camera = photo("camera.png");
    for (variant, hash) in hashlist::list_hashes(&coffee, &test_limits()).expect("hashes") {
        hashlist::append_entry(&block, hash, "porn/known_set", variant).expect("write");
    }
    hashlist::append_entry(&allow, hash_of(&camera), "other", "camera.png").expect("write");
    let stage = make_stage(
        |c| {
            c.blocklist_path = Some(block.clone());
            c.allowlist_path = Some(allow.clone());
        },
        ImageModel::Ready(classifier()),
    );
    let policy = Policy::default();
    let img = load(&coffee).to_rgb8();
    let copy = encode_jpeg(
        &image::imageops::resize(&img, 300, 200, image::imageops::FilterType::Triangle),
        75,
    );
    let cropped = encode_jpeg(
        &image::imageops::crop_imm(&img, 36, 24, 528, 352).to_image(),
        85,
    );
    for (what, bytes) in [
        ("original", coffee.clone()),
        ("resized JPEG copy", copy),
        ("6% cropped copy", cropped),
    ] {
        let report = stage.analyze(ImageInput::Bytes(bytes.into())).await;
        assert!(
            matches!(report.list, Some(ListMatch::Blocked { .. })),
            "{what}: {report:?}"
        );
        assert_eq!(report.scores, None, "{what}: the model must not run");
        let v = report.verdict("i".into(), &policy);
        assert_eq!(v.action, Action::Block, "{what}");
        assert_eq!(v.labels[0].label, "porn");
        assert_eq!(v.labels[0].sub.as_deref(), Some("known_set"));
        assert_eq!(
            serde_json::to_value(&v.labels[0]).expect("json")["source"],
            "hashlist"
        );
    }
    let report = stage.analyze(ImageInput::Bytes(camera.into())).await;
    assert!(
        matches!(report.list, Some(ListMatch::Allowed { .. })),
        "{report:?}"
    );
    assert_eq!(report.scores, None);
    assert_eq!(report.verdict("i".into(), &policy).action, Action::Allow);
    let report = stage
        .analyze(ImageInput::Bytes(photo("rocket.jpg").into()))
        .await;
    assert_eq!(report.list, None);
    assert!(report.scores.is_some(), "unlisted images go to the model");
    // Not hashable: flat images are refused by `hashlist add`.
    let flat = encode_png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
        64,
        64,
        image::Rgb([9, 9, 9]),
    )));
    assert!(chatguard::image::phash_of(&flat, &test_limits()).is_err());
}

#[tokio::test]
async fn verdict_cache_answers_repeated_images() {
    let stage = make_stage(|_| {}, ImageModel::Ready(classifier()));
    let bytes = photo("chelsea.png");
    let first = stage.analyze(ImageInput::Bytes(bytes.clone().into())).await;
    let second = stage
        .analyze(ImageInput::Base64(
            base64::engine::general_purpose::STANDARD.encode(&bytes),
        ))
        .await;
    assert!(!first.cached && second.cached);
    assert_eq!(first.scores, second.scores);
    let junk = b"definitely not an image".to_vec();
    stage.analyze(ImageInput::Bytes(junk.clone().into())).await;
    let again = stage.analyze(ImageInput::Bytes(junk.into())).await;
    assert!(again.cached && again.error.is_some());
    let off = make_stage(|c| c.cache_entries = 0, ImageModel::Ready(classifier()));
    off.analyze(ImageInput::Bytes(bytes.clone().into())).await;
    assert!(!off.analyze(ImageInput::Bytes(bytes.into())).await.cached);
}

/// A binary image frame: 4-byte big-endian header length, JSON header, bytes.
fn image_frame(key: &str, bytes: &[u8]) -> Vec<u8> {
    let header = json!({"type": "image", "id": key}).to_string();
    let mut frame = (header.len() as u32).to_be_bytes().to_vec();
    frame.extend(header.as_bytes());
    frame.extend(bytes);
    frame
}

fn moderate_images(id: &str, images: Value) -> Value {
    json!({"type":"moderate","id":id,"user":"u1","room":"r1","images":images})
}

/// Both image paths over the real WebSocket: inline base64, binary frames before and after
/// the request, a frame that never comes, a bad frame, a broken image.
#[tokio::test]
async fn base64_and_binary_frames_end_to_end() {
    let server = Server::start(|raw| raw.image.binary_wait_ms = 1_500).await;
    let mut ws = server.connect().await;
    let chelsea = photo("chelsea.png");
    let rocket = photo("rocket.jpg");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&chelsea);

    // Inline base64, with text.
    let mut req = moderate_images("m-1", json!([{"id":"i1","data":b64}]));
    req["text"] = json!("look at my cat");
    send(&mut ws, req).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["id"], "m-1", "{v}");
    assert_eq!(v["action"], "allow", "{v}");
    assert_eq!(
        v["degraded"],
        json!([]),
        "image model must be loaded (run `make models`): {v}"
    );
    assert_eq!(v["images"][0]["id"], "i1");
    assert_eq!(v["images"][0]["action"], "allow");
    let labels = v["images"][0]["labels"].as_array().expect("labels");
    assert!(
        labels
            .iter()
            .any(|l| l["label"] == "porn" && l["source"] == "model"),
        "{v}"
    );
    assert!(v["images"][0]["phash"].is_string(), "{v}");

    // Binary frame first, then the request that lists it without data.
    send_binary(&mut ws, image_frame("m-2/a", &rocket)).await;
    send(&mut ws, moderate_images("m-2", json!([{"id":"a"}]))).await;
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["id"].as_str(), v["images"][0]["action"].as_str()),
        (Some("m-2"), Some("allow")),
        "{v}"
    );
    assert!(v["images"][0].get("error").is_none(), "{v}");

    // Request first, the frame after it (within image.binary_wait_ms); mixed with inline data.
    send(
        &mut ws,
        moderate_images("m-3", json!([{"id":"a"},{"id":"b","data":b64}])),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send_binary(&mut ws, image_frame("m-3/a", &rocket)).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["id"], "m-3", "{v}");
    assert_eq!(v["images"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(
        v["images"]
            .as_array()
            .expect("images")
            .iter()
            .all(|i| i["action"] == "allow" && i.get("error").is_none()),
        "{v}"
    );

    // A frame that never comes: a per-image error after the wait, the message goes to review.
    send(&mut ws, moderate_images("m-4", json!([{"id":"lost"}]))).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["id"], "m-4");
    let err = v["images"][0]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("did not arrive") && err.contains("image.binary_wait_ms"),
        "{v}"
    );
    assert_eq!(v["action"], "review", "{v}");

    // A broken binary frame gets an error reply addressed by what could be read; the
    // connection stays usable.
    send_binary(&mut ws, vec![0, 0, 0, 50, b'{']).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{e}"
    );
    send_binary(&mut ws, image_frame("m-5/x", b"junk")).await;
    send_binary(&mut ws, image_frame("m-5/x", b"junk")).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("m-5/x"), Some("bad_request")),
        "duplicate: {e}"
    );

    // Undecodable bytes: a per-image error, review, and the text still judged.
    let mut req = moderate_images("m-5", json!([{"id":"x"}]));
    req["text"] = json!("hello");
    send(&mut ws, req).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["id"], "m-5");
    assert!(
        v["images"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unsupported image format"),
        "{v}"
    );
    assert_eq!(v["images"][0]["action"], "review");
    assert_eq!(v["action"], "review");

    // Duplicate image ids in one request are a bad request.
    send(
        &mut ws,
        moderate_images("m-6", json!([{"id":"a","data":b64},{"id":"a","data":b64}])),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{e}"
    );
    server.stop().await;
}

/// Unclaimed binary frames are bounded per connection.
#[tokio::test]
async fn unclaimed_binary_frames_are_bounded() {
    let server = Server::start(|raw| {
        raw.image.model_enabled = false;
        raw.image.max_pending_images = 2;
    })
    .await;
    let mut ws = server.connect().await;
    for i in 0..2 {
        send_binary(&mut ws, image_frame(&format!("p/{i}"), b"x")).await;
    }
    send_binary(&mut ws, image_frame("p/2", b"x")).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("p/2"), Some("overloaded")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("image.max_pending_images"),
        "{e}"
    );
    server.stop().await;
}

/// No model files: images are still decoded and hash-matched; the verdict is degraded, not
/// an error.
#[tokio::test]
async fn missing_image_model_degrades_instead_of_failing() {
    let server = Server::start(|raw| {
        raw.image.models_dir = PathBuf::from("/nonexistent/chatguard-models");
    })
    .await;
    let mut ws = server.connect().await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(photo("coffee.png"));
    send(
        &mut ws,
        moderate_images("d-1", json!([{"id":"i1","data":b64}])),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(v["degraded"], json!(["image_model"]), "{v}");
    assert_eq!(v["images"][0]["action"], "allow", "{v}");
    assert!(v["images"][0]["phash"].is_string(), "{v}");
    server.stop().await;
}
