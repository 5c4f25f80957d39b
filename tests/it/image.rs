//! The container image: `packaging/build-image` builds a statically linked `skyline` and puts it
//! alone in a FROM scratch image. The binary is built with the `image-test` profile (nothing
//! optimised: these tests check that it starts and routes, not how fast) into `target/static`,
//! apart from the test build's own target directory. When `SKYLINE_STATIC_BINARY` names a binary
//! that `build-image` built before (as `scripts/test` does, to delete the static build's 400 MB
//! of dependencies before the test build starts), the script is given that binary instead and
//! checks it the same way.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::*;

/// An image tag of this test process's own, so that parallel runs do not share an image; the
/// image is removed on drop, whether the test passed or not.
struct TestImage(String);

impl TestImage {
    fn new() -> Self {
        Self(format!(
            "localhost/skyline-image-test:{}",
            std::process::id()
        ))
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(["image", "rm", "--force", &self.0])
            .output();
    }
}

/// Runs `packaging/build-image --profile image-test` (or `--binary $SKYLINE_STATIC_BINARY`)
/// with `args`; the static binary's path.
fn build_image(args: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = match std::env::var("SKYLINE_STATIC_BINARY") {
        Ok(binary) if !binary.is_empty() => ["--binary".to_string(), binary],
        _ => ["--profile".to_string(), "image-test".to_string()],
    };
    let output = std::process::Command::new(root.join("packaging/build-image"))
        .args(source)
        .args(args)
        .env("CARGO_TARGET_DIR", root.join("target/static"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "packaging/build-image failed");
    let stdout = String::from_utf8(output.stdout).unwrap();
    PathBuf::from(stdout.lines().last().unwrap())
}

/// Waits for `skyline up`'s banner on `child`'s stdout (bounded: 60 s, the unoptimised binary
/// on a busy machine); the outbound address it prints.
async fn up_outbound(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("Skyline is up") {
                return line;
            }
        }
        panic!("skyline up exited before its banner");
    })
    .await
    .expect("skyline up prints its banner");
    // The rest of stdout is read to its end: a pipe closed behind the banner would fail the
    // next line written to it (podman's attach then exits 126 with "broken pipe").
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    banner
        .split("outbound ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned()
}

/// A request to the demo service `hello` through the outbound proxy at `outbound`.
async fn hello_through(outbound: &str) {
    let reply = Client::new()
        .get(&format!("http://{outbound}/service/hello/"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.body.starts_with("hello from skyline"),
        "{}",
        reply.body
    );
}

/// `skyline up`'s flags for a run on loopback ports the kernel picks, its state in `dir`.
fn up_args(dir: &str) -> Vec<String> {
    [
        "up",
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--registry",
        "127.0.0.1:0",
        "--dir",
        dir,
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_binary_runs_skyline_up_alone_in_an_empty_root_with_an_empty_environment() {
    let binary = build_image(&["--no-image"]);
    let described = std::process::Command::new("file")
        .arg("-b")
        .arg(&binary)
        .output()
        .unwrap();
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(
        described.contains("statically linked") || described.contains("static-pie linked"),
        "{described}"
    );
    // What FROM scratch gives the binary: a root holding only itself, no /etc, no /proc, no
    // libraries, no variables; and a user without a name.
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(&binary, root.path().join("skyline")).unwrap();
    let state = root.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::process::Command::new("chown")
        .args(["65532:65532"])
        .arg(&state)
        .status()
        .unwrap();
    let chroot = |args: &[String]| {
        let mut command = Command::new("env");
        command
            .args(["-i", "/usr/sbin/chroot", "--userspec=65532:65532"])
            .arg(root.path())
            .arg("/skyline")
            .args(args)
            .kill_on_drop(true);
        command
    };
    let version = chroot(&["--version".to_owned()]).output().await.unwrap();
    assert!(version.status.success(), "{version:?}");
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("skyline "),
        "{version:?}"
    );
    let mut up = chroot(&up_args("/state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let outbound = up_outbound(&mut up).await;
    hello_through(&outbound).await;
    // The registry wrote its state where it was told, as the unnamed user.
    assert!(state.join("registry").join("FORMAT").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_image_runs_skyline_up_from_scratch_as_a_non_root_user() {
    let podman = std::process::Command::new("podman")
        .arg("--version")
        .output();
    assert!(
        podman.is_ok_and(|o| o.status.success()),
        "podman is missing: scripts/install-deps installs it"
    );
    let image = TestImage::new();
    let tag = image.0.clone();
    build_image(&["--tag", &tag]);
    let inspect = std::process::Command::new("podman")
        .args([
            "image",
            "inspect",
            "--format",
            "{{.Config.User}} {{len .RootFS.Layers}} {{json .Config.ExposedPorts}}",
            &tag,
        ])
        .output()
        .unwrap();
    let inspect = String::from_utf8_lossy(&inspect.stdout).trim().to_owned();
    assert!(inspect.starts_with("65532:65532 1 "), "{inspect}");
    for port in ["5040/tcp", "5041/tcp", "5050/tcp", "8500/tcp"] {
        assert!(inspect.contains(port), "{inspect}");
    }
    // On this machine crun refuses the hybrid cgroup hierarchy ("cgroups in hybrid mode not
    // supported") and podman's default limits (1,048,576 open files) exceed the hard limits,
    // which a process without CAP_SYS_RESOURCE cannot raise: runc, and limits within reach.
    // The host's network, as a pod's loopback: the test reaches the ports the process picks.
    let run = |args: &[String]| {
        let mut command = Command::new("podman");
        command
            .args([
                "--runtime",
                "runc",
                "run",
                "--rm",
                "--network",
                "host",
                "--read-only",
                "--tmpfs",
                "/state:rw,mode=1777",
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=1024:1024",
                &tag,
            ])
            .args(args)
            .kill_on_drop(true);
        command
    };
    let version = run(&["--version".to_owned()]).output().await.unwrap();
    assert!(version.status.success(), "{version:?}");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("skyline "));
    let mut up = run(&up_args("/state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let outbound = up_outbound(&mut up).await;
    hello_through(&outbound).await;
    // SIGTERM reaches skyline as the container's first process, which stops cleanly.
    let pid = up.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .expect("the container stops")
        .unwrap();
    assert!(status.success(), "{status}");
}
