//! Image stage throughput and memory: decode + preprocess vs inference for 640×480 JPEGs, the
//! whole stage end to end under concurrent requesters, and the peak memory of a 10k×10k PNG
//! decompression-bomb attempt.
//!
//! ```text
//! cargo bench --bench image                    # 200 images
//! cargo bench --bench image -- --quick         # 60 images
//! cargo bench --bench image -- --images 400 --concurrency 32 --batch 8 --intra-threads 2
//! ```
//! Needs `make models`. Prints, per phase, images/s and ms/image:
//! - `decode+preprocess`: [`decode::decode`] (JPEG decode, PIL-exact resize to 224×224 and 32×32,
//!   pHash) plus the planar f32 conversion, one thread;
//! - `inference`: the ONNX session alone on prepared batches;
//! - `end to end`: [`ImageStage::analyze`] (content hash, cache miss, decode on the blocking
//!   pool, pHash, lists, batcher, model) with `--concurrency` requesters, and p50/p99 latency;
//! - `bomb`: in a fresh child process, VmHWM (peak resident memory) before and after decoding a
//!   real 10000×10000 PNG (rejected from its header) and the largest allowed picture (40 MP).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatguard::image::classifier::{ImageClassifier, to_planar};
use chatguard::image::decode::{self, DecodeLimits};
use chatguard::image::hashlist;
use chatguard::image::{ImageConfig, ImageInput, ImageModel, ImageStage};
use image::RgbImage;

/// Command-line knobs.
struct Args {
    /// Distinct images per phase.
    images: usize,
    /// Concurrent requesters in the end-to-end phase.
    concurrency: usize,
    /// Model batch size.
    batch: usize,
    /// ONNX Runtime intra-op threads.
    intra_threads: usize,
    /// Run only the memory measurement of this file (child process).
    bomb_child: Option<PathBuf>,
}

fn parse_args() -> Args {
    let defaults = ImageConfig::default();
    let mut args = Args {
        images: 200,
        concurrency: 16,
        batch: defaults.max_batch_size,
        intra_threads: defaults.intra_threads,
        bomb_child: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--quick" => args.images = 60,
            "--images" => args.images = value("--images"),
            "--concurrency" => args.concurrency = value("--concurrency"),
            "--batch" => args.batch = value("--batch"),
            "--intra-threads" => args.intra_threads = value("--intra-threads"),
            "--bomb-child" => args.bomb_child = it.next().map(PathBuf::from),
            _ => {} // `--bench` and other harness flags
        }
    }
    args
}

/// `n` distinct 640×480 JPEGs (q85) cut from the sample photos.
fn chat_photos(n: usize) -> Vec<Vec<u8>> {
    let sources: Vec<RgbImage> = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
        .iter()
        .map(|name| {
            let path = Path::new("models/testdata").join(name);
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run `make models`)", path.display()));
            image::load_from_memory(&bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .to_rgb8()
        })
        .collect();
    (0..n)
        .map(|i| {
            let src = &sources[i % sources.len()];
            let mut img =
                image::imageops::resize(src, 640, 480, image::imageops::FilterType::Triangle);
            // Make every image's bytes distinct so the verdict cache never answers.
            let px = img.get_pixel_mut((i % 640) as u32, (i / 640 % 480) as u32);
            px.0[0] = px.0[0].wrapping_add(128);
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
                .encode_image(&img)
                .unwrap_or_else(|e| panic!("jpeg encode: {e}"));
            out
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(phase: &str, n: usize, took: Duration) {
    println!(
        "{phase:<28} {:>8.1} images/s  {:>7.2} ms/image  ({n} images in {:.2} s)",
        n as f64 / took.as_secs_f64(),
        ms(took) / n as f64,
        took.as_secs_f64()
    );
}

/// The process's peak and current resident memory (VmHWM, VmRSS) in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Writes an all-black `w`×`h` RGB PNG row by row (never holding the pixels in memory).
fn write_black_png(path: &Path, w: u32, h: u32) {
    let file = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder
        .write_header()
        .unwrap_or_else(|e| panic!("png header: {e}"));
    let mut stream = writer
        .stream_writer()
        .unwrap_or_else(|e| panic!("png stream: {e}"));
    let row = vec![0u8; w as usize * 3];
    for _ in 0..h {
        std::io::Write::write_all(&mut stream, &row).unwrap_or_else(|e| panic!("png row: {e}"));
    }
    stream
        .finish()
        .unwrap_or_else(|e| panic!("png finish: {e}"));
}

/// Child process: decode one file and print the memory around it.
fn bomb_child(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let limits = DecodeLimits {
        timeout: Duration::from_secs(60),
        ..DecodeLimits::default()
    };
    let (hwm_before, _) = memory_kib();
    let started = Instant::now();
    let result = decode::decode(&bytes, &limits);
    let took = started.elapsed();
    let (hwm_after, rss_after) = memory_kib();
    let outcome = match &result {
        Ok(d) => format!("decoded {}x{}", d.width, d.height),
        Err(e) => format!("refused: {e}"),
    };
    println!(
        "{} ({} KiB encoded): VmHWM {} -> {} KiB (+{} KiB), VmRSS after {} KiB, {:.1} ms; {outcome}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        bytes.len() / 1024,
        hwm_before,
        hwm_after,
        hwm_after.saturating_sub(hwm_before),
        rss_after,
        ms(took),
    );
}

fn memory_phase() {
    let dir = std::env::temp_dir().join(format!("chatguard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    for (name, w, h) in [
        ("bomb-10000x10000.png", 10_000, 10_000),
        ("largest-allowed-6400x6250.png", 6_400, 6_250),
    ] {
        let path = dir.join(name);
        write_black_png(&path, w, h);
        let out = std::process::Command::new(&exe)
            .arg("--bomb-child")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("child: {e}"));
        print!("memory: {}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            println!("  child failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let args = parse_args();
    if let Some(path) = &args.bomb_child {
        bomb_child(path);
        return;
    }
    let cfg = ImageConfig {
        max_batch_size: args.batch,
        intra_threads: args.intra_threads,
        ..ImageConfig::default()
    };
    println!(
        "image bench: {} distinct 640x480 JPEGs, batch {}, intra-threads {}, concurrency {}, {} cores",
        args.images,
        args.batch,
        args.intra_threads,
        args.concurrency,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let photos = chat_photos(args.images);
    let limits = cfg.decode_limits();

    // Phase 1: decode + preprocess, one thread.
    let started = Instant::now();
    let mut planar = Vec::with_capacity(photos.len());
    for bytes in &photos {
        let decoded = decode::decode(bytes, &limits).unwrap_or_else(|e| panic!("decode: {e}"));
        let _ = hashlist::phash(&decoded.hash_gray);
        planar.push(to_planar(&decoded.model_frames[0]).unwrap_or_else(|e| panic!("{e}")));
    }
    report(
        "decode+preprocess (1 thread)",
        photos.len(),
        started.elapsed(),
    );

    // Phase 2: inference alone on prepared batches.
    let classifier = ImageClassifier::load(&cfg)
        .unwrap_or_else(|e| panic!("image model: {e} (run `make models`)"));
    classifier
        .run_planar_blocking(&planar[..args.batch.min(planar.len())])
        .unwrap_or_else(|e| panic!("warm-up: {e}"));
    let started = Instant::now();
    classifier
        .run_planar_blocking(&planar)
        .unwrap_or_else(|e| panic!("inference: {e}"));
    report(
        &format!("inference (batch {})", args.batch),
        planar.len(),
        started.elapsed(),
    );
    let single: Vec<Vec<f32>> = planar.iter().take(20).cloned().collect();
    let started = Instant::now();
    for row in &single {
        classifier
            .run_planar_blocking(std::slice::from_ref(row))
            .unwrap_or_else(|e| panic!("inference: {e}"));
    }
    report("inference (batch 1)", single.len(), started.elapsed());
    drop(planar);

    // Phase 3: the whole stage, concurrent requesters.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let stage = ImageStage::new(&cfg, ImageModel::Ready(classifier))
        .unwrap_or_else(|e| panic!("stage: {e}"));
    let photos: Vec<tokio_tungstenite::tungstenite::Bytes> =
        photos.into_iter().map(Into::into).collect();
    let (took, mut latencies, degraded) = runtime.block_on(async {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let photos = Arc::new(photos);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency {
            let (stage, next, photos) = (stage.clone(), next.clone(), photos.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut degraded = 0;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(bytes) = photos.get(i) else { break };
                    let t = Instant::now();
                    let report = stage.analyze(ImageInput::Bytes(bytes.clone())).await;
                    lat.push(t.elapsed());
                    if report.model_degraded || report.error.is_some() || report.cached {
                        degraded += 1;
                    }
                }
                (lat, degraded)
            }));
        }
        let mut all = Vec::new();
        let mut degraded = 0;
        for t in tasks {
            let (lat, d) = t.await.unwrap_or_else(|e| panic!("requester: {e}"));
            all.extend(lat);
            degraded += d;
        }
        (started.elapsed(), all, degraded)
    });
    latencies.sort();
    report(
        &format!("end to end (x{})", args.concurrency),
        latencies.len(),
        took,
    );
    println!(
        "{:<28} p50 {:.1} ms  p99 {:.1} ms  ({degraded} degraded/error/cached, want 0)",
        "  latency",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );

    // Phase 4: memory of a decompression-bomb attempt, in fresh processes.
    memory_phase();
}
