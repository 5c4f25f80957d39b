//! Build steps that run before the crate compiles, one function each: the commit and build date
//! for `skyline --version`, the etcd v3 API's gRPC client code, and the order of functions in a
//! release binary's code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

#[path = "build/civil_date.rs"]
mod civil_date;

fn main() {
    version_info();
    symbol_order();
    if let Err(error) = compile_etcd_proto() {
        // A build script reports failure by panicking; the message is what cargo prints.
        panic!("cannot compile proto/etcd: {error}");
    }
}

/// Sets `SKYLINE_COMMIT` (the short hash of HEAD, or `unknown` outside a git checkout, as when
/// building from a release tarball) and `SKYLINE_BUILD_DATE` (`YYYY-MM-DD`, UTC: the date of
/// `SOURCE_DATE_EPOCH` when it is set, for reproducible builds, otherwise today).
fn version_info() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/civil_date.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let commit = git_commit().unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SKYLINE_COMMIT={commit}");
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(secs) => secs,
            Err(_) => {
                println!("cargo:warning=SOURCE_DATE_EPOCH={text:?} is not a Unix time; using now");
                now()
            }
        },
        Err(_) => now(),
    };
    println!(
        "cargo:rustc-env=SKYLINE_BUILD_DATE={}",
        civil_date::civil_date(epoch)
    );
}

/// Release builds for x86-64 Linux linked by rust-lld (Rust's default there since 1.90, see
/// [`links_with_rust_lld`]): the functions listed in `build/symbol-order.txt` (the ones a proxy
/// hop runs, hottest first; made by `bench/symbol-order.sh`) go first and together in `.text`. The kernel maps a binary's code in
/// 64 KiB windows around each page a process touches, so the code that runs, scattered over all
/// of `.text`, kept most of the binary resident (docs/benchmarks.md, "Resident memory"). Names
/// the file lists that a build lacks are skipped silently: a stale file costs memory, not
/// correctness. Left out when RUSTFLAGS pick another linker (GNU ld has no such option).
fn symbol_order() {
    println!("cargo:rerun-if-changed=build/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let var = |name| std::env::var(name).unwrap_or_default();
    let rustflags = var("CARGO_ENCODED_RUSTFLAGS");
    if var("PROFILE") != "release"
        || var("TARGET") != "x86_64-unknown-linux-gnu"
        || rustflags.contains("linker")
        || rustflags.contains("fuse-ld")
        || !links_with_rust_lld()
    {
        return;
    }
    let file = Path::new(&var("CARGO_MANIFEST_DIR")).join("build/symbol-order.txt");
    if file.is_file() {
        let file = file.display();
        println!("cargo:rustc-link-arg-bin=skyline=-Wl,--symbol-ordering-file={file}");
        println!("cargo:rustc-link-arg-bin=skyline=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether rustc links x86-64 Linux binaries with its own lld: Rust 1.90 or later, with
/// `gcc-ld/ld.lld` in its sysroot (rustup's toolchains). An older rustc (the crate builds from
/// 1.85), or one a distribution built without it, links with the system's `ld`, which has no
/// `--symbol-ordering-file`: the release binary is then linked without the order.
fn links_with_rust_lld() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let output = |args: &[&str]| {
        Command::new(&rustc)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let minor = output(&["--version"]).and_then(|v| {
        let number = v.split_whitespace().nth(1)?.to_owned();
        number.split('.').nth(1)?.parse::<u32>().ok()
    });
    if minor.is_none_or(|m| m < 90) {
        return false;
    }
    output(&["--print", "sysroot"]).is_some_and(|sysroot| {
        Path::new(&sysroot)
            .join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld/ld.lld")
            .is_file()
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The short hash of HEAD when this package is the top of a git checkout (a tarball unpacked
/// inside some other repository must not take that repository's commit), and the files to watch
/// so that a new commit or checkout re-runs this script.
fn git_commit() -> Option<String> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = PathBuf::from(git(&manifest_dir, &["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != manifest_dir.canonicalize().ok()? {
        return None;
    }
    // In a worktree `.git` is a file: ask git where HEAD and the branch's ref really are.
    let mut watch = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(&manifest_dir, &["rev-parse", "--git-path", &name]) {
            let path = manifest_dir.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    git(&manifest_dir, &["rev-parse", "--short", "HEAD"])
}

/// Runs git in `dir`; its trimmed output when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

/// Compiles the vendored etcd v3 API (`proto/etcd/`) into gRPC client code in `OUT_DIR`, with
/// the pure-Rust `protox` compiler: no `protoc` and no system protobuf includes needed.
/// `src/catalog/etcd/client.rs` includes the generated `etcdserverpb.rs` and `mvccpb.rs`.
fn compile_etcd_proto() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/etcd");
    let files = protox::compile(["etcd/rpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .compile_fds(files)?;
    // The gRPC test service of tests/it/grpc.rs (client and server); only the tests include it.
    println!("cargo:rerun-if-changed=proto/test");
    let files = protox::compile(["test/echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .compile_fds(files)?;
    Ok(())
}
