//! The Debian package as an operator gets it: built by `packaging/build-deb` from this test run's
//! binary (a second, fat-LTO release build would cost minutes), checked with `dpkg-deb` and
//! `systemd-analyze verify`, installed by `dpkg` into a temporary root, and every unit's
//! `ExecStart` run from that root, with the installed default configuration, on the sockets its
//! socket units name.
//!
//! `dpkg --root` needs only an empty database of its own under the root. Its maintainer scripts
//! run without chroot (`--force-script-chrootless`: the root has no shell to chroot into); they
//! see `DPKG_ROOT` and leave the host's systemd alone. `--force-depends`: libc6 is installed on
//! the host, not in the empty root.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::support::*;

const ROLES: [&str; 4] = ["agent", "gateway", "bridge", "registry"];

/// The package, built and installed once per test run.
struct Package {
    deb: PathBuf,
    root: PathBuf,
    /// Temporary state of the roles the tests start.
    state: PathBuf,
}

fn package() -> &'static Package {
    static PACKAGE: OnceLock<Package> = OnceLock::new();
    PACKAGE.get_or_init(build_and_install)
}

/// Runs `command`, asserts it succeeded, returns its stdout.
fn run(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn build_and_install() -> Package {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("package");
    let _ = std::fs::remove_dir_all(&dir);
    let built = run(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/build-deb"))
            .args(["--binary", SKYLINE, "--compress", "gzip", "--out"])
            .arg(dir.join("out")),
    );
    let deb = PathBuf::from(built.lines().last().unwrap());
    let root = dir.join("root");
    for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-depends",
            "--force-script-chrootless",
            "--force-not-root",
        ])
        // Container images often exclude man pages and docs in /etc/dpkg/dpkg.cfg.d.
        .args(["--path-include=/*", "-i"])
        .arg(&deb));
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    Package { deb, root, state }
}

/// A systemd unit file as `key -> values` (every section; the keys used here are unique).
struct Unit(BTreeMap<String, Vec<String>>);

impl Unit {
    fn read(root: &Path, name: &str) -> Self {
        let text = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(name))
            .unwrap_or_else(|e| panic!("unit {name}: {e}"));
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in text.lines() {
            if let Some((key, value)) = line.split_once('=') {
                if !line.starts_with('#') && !line.starts_with('[') {
                    keys.entry(key.to_owned())
                        .or_default()
                        .push(value.to_owned());
                }
            }
        }
        Self(keys)
    }

    fn all(&self, key: &str) -> &[String] {
        self.0.get(key).map_or(&[], Vec::as_slice)
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key) {
            [value] => value,
            other => panic!("{key}: {other:?}"),
        }
    }

    /// Every word of every `key` line (`Sockets=a b`, `SystemCallFilter=...`).
    fn words(&self, key: &str) -> Vec<&str> {
        self.all(key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .collect()
    }
}

/// An installed path for a path the units name (`/usr/bin/skyline`, `/etc/skyline/...`).
fn installed(root: &Path, word: &str) -> String {
    if word.starts_with("/usr/") || word.starts_with("/etc/skyline/") {
        root.join(&word[1..]).display().to_string()
    } else {
        word.to_owned()
    }
}

/// The installed socket units of `service`: (`FileDescriptorName`, unit name).
fn sockets_of(root: &Path, service: &str) -> Vec<(String, String)> {
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir(root.join("usr/lib/systemd/system")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".socket") {
            let unit = Unit::read(root, &name);
            if unit.one("Service") == service {
                sockets.push((unit.one("FileDescriptorName").to_owned(), name));
            }
        }
    }
    sockets.sort();
    sockets
}

/// A role started as systemd starts its unit: the `ExecStart` line and `Environment=` /
/// `EnvironmentFile=` of the installed unit, paths into the installed root, plus `overrides`,
/// on loopback sockets in place of each socket unit that names the service (the agent's
/// `registry` socket included, as its documented drop-in passes it).
struct Started {
    process: Skyline,
    /// The address of each socket, by its `FileDescriptorName`.
    at: BTreeMap<String, SocketAddr>,
}

fn start_unit(root: &Path, service: &str, overrides: &[(&str, String)]) -> Started {
    let unit = Unit::read(root, service);
    let words: Vec<String> = unit
        .one("ExecStart")
        .split_whitespace()
        .map(|w| installed(root, w))
        .collect();
    let mut command = Command::new(&words[0]);
    command.args(&words[1..]).env("SKYLINE_LOG", "info");
    for file in unit.all("EnvironmentFile") {
        let text = std::fs::read_to_string(installed(root, file.trim_start_matches('-'))).unwrap();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((key, value)) = line.split_once('=') {
                command.env(key, value);
            }
        }
    }
    for env in unit.all("Environment") {
        let (key, value) = env.split_once('=').unwrap();
        command.env(key, value);
    }
    for (key, value) in overrides {
        command.env(key, value);
    }
    let sockets: Vec<(String, std::net::TcpListener)> = sockets_of(root, service)
        .into_iter()
        .map(|(name, _)| (name, supervised_socket("127.0.0.1")))
        .collect();
    let at = sockets
        .iter()
        .map(|(name, socket)| (name.clone(), socket.local_addr().unwrap()))
        .collect();
    let passed: Vec<(&str, &std::net::TcpListener)> =
        sockets.iter().map(|(n, s)| (n.as_str(), s)).collect();
    Started {
        process: Skyline::spawn(command, &passed),
        at,
    }
}

#[test]
fn the_package_holds_the_binary_a_hardened_unit_and_sockets_per_role_configs_completions_and_man_pages()
 {
    let package = package();
    let root = &package.root;

    let info = run(Command::new("dpkg-deb").arg("-I").arg(&package.deb));
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    for field in [
        "Package: skyline".to_owned(),
        format!("Version: {}", env!("CARGO_PKG_VERSION")),
        format!("Architecture: {}", arch.trim()),
        "Depends: libc6 (>= ".to_owned(),
    ] {
        assert!(info.contains(&field), "{field}:\n{info}");
    }

    // Every file root-owned; the binary executable, nothing else.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&package.deb));
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], "root/root", "{line}");
        if !fields[0].starts_with('d') {
            files.insert(fields[5].trim_start_matches('.').to_owned(), fields[0]);
        }
    }
    assert_eq!(files["/usr/bin/skyline"], "-rwxr-xr-x");
    let mut expected = vec![
        "/usr/bin/skyline".to_owned(),
        "/usr/share/bash-completion/completions/skyline".to_owned(),
        "/usr/share/zsh/vendor-completions/_skyline".to_owned(),
        "/usr/share/fish/vendor_completions.d/skyline.fish".to_owned(),
        "/usr/share/man/man1/skyline.1.gz".to_owned(),
        "/usr/share/doc/skyline/copyright".to_owned(),
        "/usr/share/doc/skyline/changelog.gz".to_owned(),
        "/usr/share/doc/skyline/operating.md".to_owned(),
        "/etc/skyline/registry.env".to_owned(),
    ];
    for role in ROLES {
        expected.push(format!("/usr/lib/systemd/system/skyline-{role}.service"));
        expected.push(format!("/usr/share/man/man1/skyline-{role}.1.gz"));
        if role != "registry" {
            expected.push(format!("/etc/skyline/{role}.toml"));
        }
    }
    for path in &expected {
        assert!(files.contains_key(path), "{path} missing:\n{listing}");
    }
    for (path, mode) in &files {
        if path != "/usr/bin/skyline" {
            assert_eq!(*mode, "-rw-r--r--", "{path}");
        }
    }

    // dpkg recorded the configuration as conffiles, and installed what the package holds.
    let status = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--status", "skyline"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    let conffiles: Vec<&str> = status
        .split("Conffiles:\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with(' '))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        conffiles,
        [
            "/etc/skyline/agent.toml",
            "/etc/skyline/bridge.toml",
            "/etc/skyline/gateway.toml",
            "/etc/skyline/registry.env"
        ]
    );
    // The default configs pass the binary's own check.
    for role in ["agent", "gateway", "bridge"] {
        run(Command::new(root.join("usr/bin/skyline"))
            .args(["config", "check"])
            .arg(root.join(format!("etc/skyline/{role}.toml")))
            .args(["--role", role]));
    }
    let version = run(Command::new(root.join("usr/bin/skyline")).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    // Hardened units; the agent reloads on SIGHUP; each service takes its sockets.
    for role in ROLES {
        let service = format!("skyline-{role}.service");
        let unit = Unit::read(root, &service);
        for (key, value) in [
            ("DynamicUser", "yes"),
            ("ProtectSystem", "strict"),
            ("NoNewPrivileges", "yes"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(unit.one(key), value, "{service} {key}");
        }
        let named: Vec<String> = sockets_of(root, &service)
            .into_iter()
            .map(|(_, socket)| socket)
            .collect();
        for socket in unit.words("Sockets") {
            assert!(named.iter().any(|n| n == socket), "{service}: {socket}");
            assert!(unit.words("Requires").contains(&socket), "{service}");
        }
        assert!(!unit.words("Sockets").is_empty(), "{service}");
    }
    for role in ["agent", "registry"] {
        let unit = Unit::read(root, &format!("skyline-{role}.service"));
        assert_eq!(unit.one("StateDirectory"), "skyline");
    }
    let agent = Unit::read(root, "skyline-agent.service");
    assert_eq!(agent.one("ExecReload"), "/bin/kill -HUP $MAINPID");

    // Completions and man pages came from the binary's CLI definition.
    let bash = std::fs::read_to_string(root.join("usr/share/bash-completion/completions/skyline"))
        .unwrap();
    assert!(
        bash.contains("complete -F _skyline") && bash.contains("--catalog-file"),
        "{bash}"
    );
    run(Command::new("bash")
        .arg("-n")
        .arg(root.join("usr/share/bash-completion/completions/skyline")));
    let man = run(Command::new("gzip")
        .arg("-dc")
        .arg(root.join("usr/share/man/man1/skyline-agent.1.gz")));
    assert!(
        man.contains(".TH skyline-agent 1") && man.contains("SKYLINE_CATALOG"),
        "{man}"
    );
}

/// `systemd-analyze verify` runs without systemd as PID 1. With `--root` it would look for
/// systemd's own units (sysinit.target) and `/bin/kill` in the package's root, where they are not;
/// without it, for `/usr/bin/skyline` on this machine. So it checks copies of the installed units
/// whose `ExecStart` names the installed binary, against this machine's systemd, and with
/// `MANPATH` on the installed man pages, which checks every `Documentation=man:` page.
#[test]
fn systemd_analyze_verifies_every_packaged_unit_and_rates_each_service_well_sandboxed() {
    let root = &package().root;
    let copies = root.parent().unwrap().join("units");
    std::fs::create_dir_all(&copies).unwrap();
    let binary = root.join("usr/bin/skyline").display().to_string();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(root.join("usr/lib/systemd/system")).unwrap() {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let copy = copies.join(entry.file_name());
        std::fs::write(
            &copy,
            text.replace("ExecStart=/usr/bin/skyline", &format!("ExecStart={binary}")),
        )
        .unwrap();
        units.push(copy);
    }
    assert_eq!(units.len(), 13, "4 services and 9 sockets: {units:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("MANPATH", root.join("usr/share/man"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr, "", "no warning either");

    // The sandboxing stays tight: systemd's own exposure score (0 to 10) at most 2.0 for every
    // service (the packaged units score 1.4).
    let services: Vec<&PathBuf> = units
        .iter()
        .filter(|u| u.extension().is_some_and(|e| e == "service"))
        .collect();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .args(&services)
        .env("MANPATH", root.join("usr/share/man"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_packaged_unit_starts_its_role_on_its_named_sockets_and_the_agent_routes_a_request() {
    let package = package();
    let root = &package.root;
    let state = |name: &str| {
        let dir = package.state.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        dir.display().to_string()
    };
    let client = Client::new();

    // The registry, with registry.env, on skyline-registry.socket.
    let mut registry = start_unit(
        root,
        "skyline-registry.service",
        &[("SKYLINE_DATA_DIR", state("registry"))],
    );
    registry.process.log.wait_for("registry started").await;
    let consul = registry.at["registry"];
    assert_eq!(
        client
            .get(&format!("http://{consul}/v1/status/leader"))
            .await
            .status,
        200
    );

    // The agent, with agent.toml (the embedded registry) and all four of its sockets.
    let mut agent = start_unit(
        root,
        "skyline-agent.service",
        &[("SKYLINE_DATA_DIR", state("agent"))],
    );
    agent.process.log.wait_for("agent started").await;
    let app = TestApp::spawn("app", ip("127.0.0.1"));
    run(Command::new(root.join("usr/bin/skyline"))
        .arg("register")
        .arg("--registry")
        .arg(agent.at["registry"].to_string())
        .args(["--name", "app", "--ttl", "1h", "--port"])
        .arg(app.addr.port().to_string())
        // The node's inbound proxy is on the test's socket, not on 5041 as in the package.
        .args([
            "--node",
            "local",
            "--node-address",
            "127.0.0.1",
            "--inbound-port",
        ])
        .arg(agent.at["inbound"].port().to_string()));
    let url = format!("http://{}/service/app/hello", agent.at["outbound"]);
    until_ok(&url).await;
    let reply = client.get(&url).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "app /hello"));
    assert_eq!(app.seen().last().unwrap().target, "/hello");
    let healthz = format!("http://{}/healthz", agent.at["admin"]);
    assert_eq!(client.get(&healthz).await.status, 200);

    // ExecReload reaches the agent: it re-reads agent.toml.
    let pid = agent.process.child.id().unwrap().to_string();
    let reload = Unit::read(root, "skyline-agent.service")
        .one("ExecReload")
        .replace("$MAINPID", &pid);
    let words: Vec<&str> = reload.split_whitespace().collect();
    run(Command::new(words[0]).args(&words[1..]));
    agent.process.log.wait_for("configuration reloaded").await;

    // The gateway and the bridge, with their files, following the registry.
    let mut gateway = start_unit(
        root,
        "skyline-gateway.service",
        &[("SKYLINE_CONSUL", consul.to_string())],
    );
    gateway.process.log.wait_for("gateway started").await;
    let mut bridge = start_unit(
        root,
        "skyline-bridge.service",
        &[("SKYLINE_CONSUL", consul.to_string())],
    );
    bridge.process.log.wait_for("bridge started").await;
    for (role, admin) in [("gateway", &gateway.at), ("bridge", &bridge.at)] {
        let reply = client
            .get(&format!("http://{}/healthz", admin["admin"]))
            .await;
        assert_eq!(reply.status, 200, "{role}");
    }
    // The gateway's own listener answers, with the mesh's error for a service nobody serves.
    let reply = client
        .get(&format!(
            "http://{}/service/nowhere/",
            gateway.at["gateway"]
        ))
        .await;
    assert!(reply.mesh_error().is_some(), "{reply:?}");

    for started in [bridge, gateway, agent, registry] {
        started.process.sigterm();
        started.process.exited_cleanly().await;
    }
    app.stop().await;
}
