//! The fuzz targets on stable: every file of the seed corpus (`fuzz/corpus/<target>/`) goes
//! through the same `skyline::fuzz` function its cargo-fuzz target calls, and none panics.
//!
//! With `SKYLINE_FUZZ_SECONDS=<n>` (and optionally `SKYLINE_FUZZ_TARGETS=a,b`), the test
//! `random_mutations_of_the_corpus_never_panic` also runs each target for `n` seconds on random
//! mutations of its corpus (bit flips, byte edits, splices, dictionary tokens; no coverage
//! feedback: a substitute for libFuzzer where only stable Rust is installed). An input that
//! panics is written to `target/fuzz-findings/` and fails the test. Without the variable it only
//! replays the corpus.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// The seed files of `target`, sorted by name.
fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

#[test]
fn every_seed_of_every_fuzz_target_runs_without_a_panic() {
    let mut folders: Vec<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    let mut names: Vec<&str> = skyline::fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    assert_eq!(folders, names, "a corpus folder per target, and no other");
    for (name, run) in skyline::fuzz::TARGETS {
        let seeds = seeds(name);
        assert!(seeds.len() >= 5, "{name}: only {} seeds", seeds.len());
        for (path, data) in seeds {
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                panic!("{name}: {} panics", path.display());
            }
        }
        // The empty input and one byte of each value, the smallest inputs of all.
        run(&[]);
        for b in 0..=255u8 {
            run(&[b]);
        }
    }
}

// === The mutation loop ===

const HTTP_WORDS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"GET / HTTP/1.1\r\n",
    b"POST /service/web/x HTTP/1.1\r\n",
    b"Host: mesh\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 18446744073709551616\r\n",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
    b"ffffffff\r\n",
    b";ext=\"x\"",
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
    b"Expect: 100-continue\r\n",
    b"HTTP/1.0",
    b"\x00",
    b"\x0b",
    b"\xff",
];

const JSON_WORDS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-",
    b"1e999",
    b"0.5",
    b"9223372036854775808",
    b"\"Name\":",
    b"\"ID\":",
    b"\"Port\":",
    b"\"Check\":",
    b"\"Checks\":",
    b"\"TTL\":\"10s\"",
    b"\"Interval\":",
    b"\"Meta\":{",
    b"\"Weights\":{",
    b"\"KV\":{",
    b"\"Verb\":\"cas\"",
    b"\"Value\":\"",
    b"\\u0000",
    b"\\ud800",
    b"\"1h\"",
    b"\"-5s\"",
];

const TEXT_WORDS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[service]]\n",
    b"=",
    b"\"",
    b"\n",
    b"{",
    b"}",
    b",",
    b"'''",
    b"\\u00e9",
    b"ms",
    b"h",
    b"1.5",
    b"-",
    b"off",
    b"0.0.0.0:0",
    b"[listen]\n",
    b"[catalog]\n",
    b"[routes.web]\n",
    b"tiers = [",
    b"split = [",
    b"min_healthy = \"",
    b"%",
    b"hold = \"",
    b"upstream = \"",
    b"/service/",
    b"/",
    b"?",
    b"%2F",
    b"%",
    b"..",
    b".svc.cluster.local",
    b":8080",
    b"\n/",
];

fn dictionary(target: &str) -> &'static [&'static [u8]] {
    match target {
        "http1_guard" => HTTP_WORDS,
        "registry_json" | "route_policy" | "authz_policy" => JSON_WORDS,
        _ => TEXT_WORDS,
    }
}

/// One random edit of `data`.
fn mutate(rng: &mut fastrand::Rng, data: &mut Vec<u8>, pool: &[Vec<u8>], words: &[&[u8]]) {
    let len = data.len();
    match rng.u8(0..10) {
        0 if len > 0 => {
            let i = rng.usize(0..len);
            data[i] ^= 1 << rng.u8(0..8);
        }
        1 if len > 0 => {
            let i = rng.usize(0..len);
            data[i] = rng.u8(..);
        }
        2 => {
            let i = rng.usize(0..=len);
            data.insert(i, rng.u8(..));
        }
        3 if len > 0 => {
            let a = rng.usize(0..len);
            let b = (a + rng.usize(1..=16)).min(len);
            data.drain(a..b);
        }
        4 if len > 0 => {
            let a = rng.usize(0..len);
            let b = (a + rng.usize(1..=64)).min(len);
            let piece = data[a..b].to_vec();
            let at = rng.usize(0..=len);
            let times = rng.usize(1..=4);
            for _ in 0..times {
                data.splice(at..at, piece.iter().copied());
            }
        }
        5 if !pool.is_empty() => {
            let other = &pool[rng.usize(0..pool.len())];
            if !other.is_empty() {
                let a = rng.usize(0..other.len());
                let b = (a + rng.usize(1..=128)).min(other.len());
                let at = rng.usize(0..=len);
                data.splice(at..at, other[a..b].iter().copied());
            }
        }
        6 if len > 0 => data.truncate(rng.usize(0..len)),
        7 if len > 2 => {
            // Interesting numbers where digits are.
            let i = rng.usize(0..len);
            if data[i].is_ascii_digit() {
                let n = [
                    "0",
                    "-1",
                    "65536",
                    "4294967296",
                    "18446744073709551615",
                    "1e308",
                ][rng.usize(0..6)];
                data.splice(i..i + 1, n.bytes());
            }
        }
        _ => {
            let word = words[rng.usize(0..words.len())];
            let at = rng.usize(0..=len);
            data.splice(at..at, word.iter().copied());
        }
    }
    // Keep inputs to a size the parsers meet (the guard's head limit is 64 KiB).
    data.truncate(96 * 1024);
}

struct Report {
    target: &'static str,
    runs: u64,
    elapsed: Duration,
    findings: Vec<(PathBuf, String)>,
}

fn fuzz_one(
    target: &'static str,
    run: fn(&[u8]),
    budget: Duration,
    seed: u64,
    last_panic: &Arc<Mutex<String>>,
) -> Report {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pool: Vec<Vec<u8>> = seeds(target).into_iter().map(|(_, d)| d).collect();
    let initial = pool.len();
    let words = dictionary(target);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-findings");
    let started = Instant::now();
    let mut runs = 0u64;
    let mut findings = Vec::new();
    while started.elapsed() < budget && findings.len() < 20 {
        let mut input = pool[rng.usize(0..pool.len())].clone();
        for _ in 0..rng.usize(1..=8) {
            mutate(&mut rng, &mut input, &pool, words);
        }
        runs += 1;
        if catch_unwind(AssertUnwindSafe(|| run(&input))).is_err() {
            let message = last_panic.lock().unwrap().clone();
            std::fs::create_dir_all(&out).unwrap();
            let path = out.join(format!("{target}-{runs}"));
            std::fs::write(&path, &input).unwrap();
            findings.push((path, message));
            continue;
        }
        // Without coverage feedback, some mutants join the pool to reach further from the
        // seeds; the pool stays bounded, and the seeds stay in it.
        if rng.u8(0..8) == 0 {
            if pool.len() < 2000 {
                pool.push(input);
            } else {
                let i = rng.usize(initial..pool.len());
                pool[i] = input;
            }
        }
    }
    Report {
        target,
        runs,
        elapsed: started.elapsed(),
        findings,
    }
}

#[test]
fn random_mutations_of_the_corpus_never_panic() {
    let seconds: u64 = match std::env::var("SKYLINE_FUZZ_SECONDS") {
        Ok(s) => s
            .parse()
            .expect("SKYLINE_FUZZ_SECONDS is a number of seconds"),
        Err(_) => 1,
    };
    let only = std::env::var("SKYLINE_FUZZ_TARGETS").ok();
    let seed: u64 = std::env::var("SKYLINE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let last_panic = Arc::new(Mutex::new(String::new()));
    let recorder = last_panic.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        *recorder.lock().unwrap() = format!("{info}");
    }));
    let mut reports = Vec::new();
    for (name, run) in skyline::fuzz::TARGETS {
        if let Some(only) = &only {
            if !only.split(',').any(|t| t == *name) {
                continue;
            }
        }
        reports.push(fuzz_one(
            name,
            *run,
            Duration::from_secs(seconds),
            seed,
            &last_panic,
        ));
    }
    std::panic::set_hook(previous);
    let mut failed = Vec::new();
    for r in &reports {
        println!(
            "fuzz {:<15} {:>9} runs in {:>6.1} s ({:>7.0}/s), seed {seed}, {} findings",
            r.target,
            r.runs,
            r.elapsed.as_secs_f64(),
            r.runs as f64 / r.elapsed.as_secs_f64().max(1e-9),
            r.findings.len()
        );
        for (path, message) in &r.findings {
            println!("  {}: {message}", path.display());
            failed.push(path.clone());
        }
    }
    assert!(failed.is_empty(), "inputs that panic: {failed:?}");
}
