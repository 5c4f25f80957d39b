//! The configuration tools through the shipped binary: `skyline --version`, `skyline config
//! reference` (and `docs/configuration.md`), `skyline config example` and `skyline config check`.

use crate::support::SKYLINE;
use std::process::{Command, Output};

#[path = "../../build/civil_date.rs"]
mod civil_date;

fn skyline(args: &[&str]) -> Output {
    Command::new(SKYLINE).args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn version_names_the_release_the_commit_and_the_build_date() {
    let out = skyline(&["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let rest = text
        .trim_end()
        .strip_prefix(&format!("skyline {} (commit ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("{text:?}"));
    let (commit, rest) = rest
        .split_once(", built ")
        .unwrap_or_else(|| panic!("{text:?}"));
    let date = rest.strip_suffix(')').unwrap_or_else(|| panic!("{text:?}"));
    // Built from this checkout: the commit is HEAD's when the build script ran.
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    let head = if head.is_empty() { "unknown" } else { &head };
    assert_eq!(commit, head, "{text:?}");
    // YYYY-MM-DD, not after today.
    let bytes = date.as_bytes();
    assert!(
        date.len() == 10 && bytes[4] == b'-' && bytes[7] == b'-',
        "{text:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(date <= civil_date::civil_date(now).as_str(), "{text:?}");
    assert!(date >= "2026-01-01", "{text:?}");
}

#[test]
fn the_build_date_is_the_utc_calendar_date_of_the_epoch() {
    for (secs, date) in [
        (0, "1970-01-01"),
        (86_399, "1970-01-01"),
        (86_400, "1970-01-02"),
        (951_782_400, "2000-02-29"),
        (951_868_800, "2000-03-01"),
        (1_709_164_800, "2024-02-29"),
        (1_798_761_599, "2026-12-31"),
        (4_107_542_400, "2100-03-01"),
    ] {
        assert_eq!(civil_date::civil_date(secs), date, "{secs}");
    }
}

#[test]
fn the_configuration_reference_in_docs_is_the_one_the_code_generates() {
    let out = skyline(&["config", "reference"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let generated = stdout(&out);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    let written = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == written,
        "docs/configuration.md is stale: regenerate it with \
         `cargo run -- config reference > docs/configuration.md`"
    );
}

#[test]
fn the_reference_lists_every_flag_variable_and_file_key_of_every_role() {
    let text = stdout(&skyline(&["config", "reference"]));
    for expected in [
        "## skyline agent",
        "## skyline gateway",
        "## skyline bridge",
        "## skyline registry",
        "## skyline up",
        "| `--node-name` | `SKYLINE_NODE_NAME` | `NAME` | `local` | `node.name` |",
        "| `--log-format` | `SKYLINE_LOG_FORMAT` |",
        "`SKYLINE_MAX_HOPS`",
        "#### `[[service]]`",
        "#### `[routes.<service>]`",
        "| `outlier.max_ejection` |",
        "| `cluster_domain` |",
        "| `tiers[].min_healthy` |",
    ] {
        assert!(text.contains(expected), "missing {expected:?}");
    }
}

#[test]
fn the_example_of_every_role_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    for role in ["agent", "gateway", "bridge"] {
        let out = skyline(&["config", "example", role]);
        assert!(out.status.success(), "{role}: {}", stderr(&out));
        let example = stdout(&out);
        assert!(example.contains(" = "), "{example}");
        let path = dir.path().join(format!("{role}.toml"));
        std::fs::write(&path, &example).unwrap();
        let out = skyline(&["config", "check", path.to_str().unwrap(), "--role", role]);
        assert_eq!(out.status.code(), Some(0), "{role}: {}", stderr(&out));
        assert_eq!(stdout(&out), "ok\n");
    }
}

#[test]
fn check_refuses_a_bad_file_with_its_line_and_key_and_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    for (role, text, line, key) in [
        (
            "agent",
            "[node]\nname = \"n\"\n\n[listen]\noutbound = \"127.0.0.1:99999\"\n",
            5,
            "listen.outbound",
        ),
        ("agent", "[proxy]\nworkerz = 3\n", 2, "proxy.workerz"),
        (
            "agent",
            "[resilience]\noutlier = { max_ejection = 5 }\n",
            2,
            "resilience.outlier.max_ejection",
        ),
        (
            "agent",
            "[resilience]\nrequest_timeout = \"soon\"\n",
            2,
            "resilience.request_timeout",
        ),
        (
            "gateway",
            "[gateway]\n\nmax_hops = 0\n",
            3,
            "gateway.max_hops",
        ),
        (
            "gateway",
            "[routes.giphy]\ntiers = [{ upstream = \"vms\" }]\n",
            1,
            "routes.giphy.tiers[0].upstream",
        ),
        (
            "bridge",
            "[bridge]\nnamespace = \"x\"\ntemplate = \"{namespace}\"\n",
            3,
            "bridge.template",
        ),
        (
            "bridge",
            "[bridge]\n\nadmin = \"nowhere\"\n",
            3,
            "bridge.admin",
        ),
        ("bridge", "[bridge]\nmax_hops = 0\n", 2, "bridge.max_hops"),
        ("bridge", "[bridge]\nport = \"http\"\n", 2, "bridge.port"),
        (
            "bridge",
            "[services.giphy]\n\nprotocol = \"spdy\"\n",
            3,
            "services.giphy.protocol",
        ),
        (
            "agent",
            "[[service]]\nname = \"a\"\nport = 1\nmeta = { protocol = \"grpc\" }\n",
            4,
            "service.meta.protocol",
        ),
    ] {
        let path = dir.path().join(format!("{role}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = skyline(&["config", "check", path.to_str().unwrap(), "--role", role]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{role}: {text}: {err}");
        let want = format!("{}:{line}: key `{key}`: ", path.display());
        assert!(
            err.starts_with(&want),
            "{role}: {text}: want {want:?}, got {err:?}"
        );
        assert!(stdout(&out).is_empty());
    }

    let out = skyline(&["config", "check", "/nonexistent/skyline.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}
