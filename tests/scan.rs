//! `chatguard scan DIR`: the real binary on a temp folder (lexicon-only, so no model files are
//! needed): the report's lines, the summary, `--resume`, and the exit codes.

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `chatguard scan` with `args` after the folder; panics with stderr if it cannot start.
fn scan(dir: &Path, report: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatguard"))
        .arg("scan")
        .arg(dir)
        .arg("--out")
        .arg(report)
        .args(["--lexicon-only", "--quiet", "--jobs", "3"])
        .args(extra)
        .env_remove("CHATGUARD_CONFIG")
        .output()
        .expect("run chatguard scan")
}

/// The report's lines, parsed; panics on a line that is not JSON.
fn report_lines(report: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(report).expect("read report");
    assert!(text.ends_with('\n'), "report ends with a newline: {text:?}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad report line {l:?}: {e}")))
        .collect()
}

/// Report lines by path; panics on a duplicate path.
fn by_path(lines: &[Value]) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for l in lines {
        let path = l["path"].as_str().expect("path is a string").to_string();
        assert!(
            out.insert(path.clone(), l.clone()).is_none(),
            "duplicate report line for {path}"
        );
    }
    out
}

/// A real photo from `make models` when present, else a generated 96×64 gradient PNG.
fn photo() -> Vec<u8> {
    if let Ok(bytes) = std::fs::read("models/testdata/astronaut.png") {
        return bytes;
    }
    let (w, h) = (96u32, 64u32);
    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            pixels.extend_from_slice(&[(x * 2) as u8, (y * 3) as u8, ((x + y) % 256) as u8]);
        }
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().expect("png header");
    writer.write_image_data(&pixels).expect("png data");
    writer.finish().expect("png finish");
    out
}

/// The sample folder: clean and abusive text (one nested), a photo, a corrupt JPEG, an unknown
/// binary, an oversized text file and a symlink.
fn sample_folder() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("library");
    std::fs::create_dir_all(dir.join("chats/2024")).expect("mkdir");
    let write = |rel: &str, bytes: &[u8]| std::fs::write(dir.join(rel), bytes).expect("write");
    write("clean.txt", b"hello there\n\nsee you at lunch tomorrow\n");
    write(
        "chats/2024/abuse.log",
        "good morning\n\nI will kill you, you worthless idiot\r\nhave a nice day\n".as_bytes(),
    );
    write("photo.png", &photo());
    write("broken.jpg", b"\xFF\xD8\xFF\xE0 this is not really a jpeg");
    write("blob.bin", &[0u8, 159, 146, 150, 1, 2, 3, 255]);
    write("big.txt", "word ".repeat(2_000).as_bytes());
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.join("clean.txt"), dir.join("link.txt")).expect("symlink");
    (tmp, dir)
}

#[test]
fn scan_reports_every_file_and_resumes() {
    let (tmp, dir) = sample_folder();
    let report = tmp.path().join("report.jsonl");
    let out = scan(&dir, &report, &["--max-file-bytes", "4096"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scan failed: {stderr}");

    let lines = report_lines(&report);
    let files = by_path(&lines);
    let get = |p: &str| {
        files
            .get(p)
            .unwrap_or_else(|| panic!("no line for {p} in {lines:#?}"))
    };

    let clean = get("clean.txt");
    assert_eq!(clean["kind"], "text");
    assert_eq!(clean["action"], "allow");
    assert_eq!(clean["lines"], 3);
    assert_eq!(clean["moderated_lines"], 2);
    assert_eq!(clean["hits"], serde_json::json!([]));

    let abuse = get("chats/2024/abuse.log");
    assert_eq!(abuse["kind"], "text");
    assert_eq!(abuse["action"], "block", "{abuse}");
    let hits = abuse["hits"].as_array().expect("hits");
    assert_eq!(hits.len(), 1, "{abuse}");
    assert_eq!(hits[0]["line"], 3, "1-based line number of the threat");
    assert_eq!(hits[0]["action"], "block");
    assert!(
        hits[0]["terms"].as_array().is_some_and(|t| !t.is_empty()),
        "{abuse}"
    );
    assert!(abuse["labels"].as_array().is_some_and(|l| !l.is_empty()));

    let photo = get("photo.png");
    assert_eq!(photo["kind"], "image");
    assert_eq!(photo["action"], "allow", "{photo}");
    assert!(photo.get("error").is_none(), "{photo}");
    assert_eq!(photo["phash"].as_str().map(str::len), Some(16), "{photo}");

    let broken = get("broken.jpg");
    assert_eq!(broken["kind"], "image");
    assert!(broken.get("action").is_none(), "{broken}");
    assert!(broken["error"].as_str().is_some_and(|e| !e.is_empty()));

    let blob = get("blob.bin");
    assert_eq!(blob["kind"], "other");
    assert!(blob["skipped"].is_string(), "{blob}");
    assert!(blob.get("action").is_none());

    let big = get("big.txt");
    assert_eq!(big["kind"], "text");
    assert!(
        big["error"].as_str().is_some_and(|e| e.contains("4096")),
        "{big}"
    );

    #[cfg(unix)]
    {
        let link = get("link.txt");
        assert_eq!(link["kind"], "symlink");
        assert!(link["skipped"].is_string());
    }
    for l in &lines {
        assert!(l["size"].is_u64() && l["mtime_ms"].is_u64(), "{l}");
    }

    // The summary table: kinds × actions, errors, skipped, rate.
    assert!(
        stdout.contains("kind") && stdout.contains("block"),
        "{stdout}"
    );
    let row = |kind: &str| -> Vec<u64> {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(kind))
            .unwrap_or_else(|| panic!("no `{kind}` row in {stdout}"));
        line.split_whitespace()
            .skip(1)
            .map(|n| n.parse().expect("count"))
            .collect()
    };
    // allow, review, block, error, total
    assert_eq!(row("image"), vec![1, 0, 0, 1, 2], "{stdout}");
    assert_eq!(row("text"), vec![1, 0, 1, 1, 3], "{stdout}");
    assert!(stdout.contains("files/s"), "{stdout}");
    assert!(stdout.contains("skipped:"), "{stdout}");

    // Resume: nothing new to do, so no new lines.
    let before = std::fs::read_to_string(&report).expect("read");
    let out = scan(&dir, &report, &["--max-file-bytes", "4096", "--resume"]);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&report).expect("read"), before);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("already in report: {}", lines.len())),
        "{stdout}"
    );

    // A new file is scanned and appended; the old lines stay as they were.
    std::fs::write(dir.join("chats/new.md"), "send nudes\n").expect("write");
    let out = scan(&dir, &report, &["--max-file-bytes", "4096", "--resume"]);
    assert!(out.status.success());
    let after = std::fs::read_to_string(&report).expect("read");
    assert!(after.starts_with(&before));
    let lines = report_lines(&report);
    let files = by_path(&lines);
    assert_eq!(lines.len(), before.lines().count() + 1);
    assert_eq!(files["chats/new.md"]["action"], "block");
}

#[test]
fn resume_after_a_cut_line_rescans_that_file() {
    let (tmp, dir) = sample_folder();
    let report = tmp.path().join("report.jsonl");
    assert!(scan(&dir, &report, &[]).status.success());
    let full = std::fs::read_to_string(&report).expect("read");
    // Kill mid-write: the last line is cut short.
    let keep = full.trim_end().rfind('\n').expect("several lines") + 1;
    let cut_path = report_lines(&report).last().expect("a line")["path"]
        .as_str()
        .expect("path")
        .to_string();
    std::fs::write(&report, format!("{}{{\"path\":\"{cut_path}", &full[..keep])).expect("cut");
    assert!(scan(&dir, &report, &["--resume"]).status.success());
    let lines = report_lines(&report);
    let files = by_path(&lines);
    assert_eq!(lines.len(), full.lines().count());
    assert!(files.contains_key(&cut_path));
}

#[test]
fn scan_fails_only_when_the_scan_itself_cannot_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-such-folder");
    let out = scan(&missing, &tmp.path().join("r.jsonl"), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read folder"), "{stderr}");

    let (_tmp2, dir) = sample_folder();
    let out = scan(&dir, &tmp.path().join("no-dir/r.jsonl"), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot write report"), "{stderr}");

    let out = scan(&dir, &tmp.path().join("r.jsonl"), &["--policy", "nope"]);
    assert!(!out.status.success());
}

#[test]
fn the_report_inside_the_scanned_folder_is_not_scanned() {
    let (_tmp, dir) = sample_folder();
    let report = dir.join("scan-report.jsonl");
    assert!(scan(&dir, &report, &[]).status.success());
    assert!(scan(&dir, &report, &["--resume"]).status.success());
    let files = by_path(&report_lines(&report));
    assert!(!files.contains_key("scan-report.jsonl"));
}
