//! `skyline demo migration` end to end in network namespaces (this suite runs as root): the
//! real binary, read from its output — every step happened, no request failed where none may,
//! and nothing is left behind, whether the demo ends by itself or on Ctrl-C.

use crate::support::SKYLINE;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The demo's steps take ~30 s; setting up and tearing down namespaces a few more.
const DEMO_TIMEOUT: Duration = Duration::from_secs(240);

/// A running `skyline demo migration`, its stdout line by line.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(args: &[&str], path: Option<&str>) -> Self {
        let mut cmd = Command::new(SKYLINE);
        cmd.args(["demo", "migration"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(path) = path {
            cmd.env("PATH", path);
        }
        let mut child = cmd.spawn().expect("start skyline demo");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The lab tag of this demo's namespaces and bridge: `<pid>a`.
    /// The demo in network namespaces, past its set-up (step 1 has begun), and its lab's tag.
    fn started_in_namespaces() -> (Self, String) {
        let mut demo = Self::start(&["--mode", "netns"], None);
        let tag = demo.tag();
        assert!(
            demo.wait_for("1.", Duration::from_secs(120)),
            "the demo did not start its steps:\n{}",
            demo.seen.join("\n")
        );
        (demo, tag)
    }

    fn tag(&self) -> String {
        format!("{}a", self.child.id())
    }

    /// Reads lines until one starts with `prefix` (true) or `timeout` passes (false).
    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.trim_start().starts_with(prefix);
                    self.seen.push(line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Reads to the end and waits for the exit (at most `timeout`, else kills it and fails);
    /// the exit status and stderr.
    fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("the demo did not end in time:\n{}", self.seen.join("\n"));
                }
            }
        }
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the demo did not exit:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        let _ = std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut stderr);
        (status, self.seen, stderr)
    }
}

/// One line of traffic share: `[ 5s] mesos 100%  kubernetes   0%  errors   0   (203 requests)`.
#[derive(Debug, Clone, Copy)]
struct Share {
    mesos: u64,
    kubernetes: u64,
    errors: u64,
    requests: u64,
}

fn share(line: &str) -> Option<Share> {
    if !line.trim_start().starts_with('[') {
        return None;
    }
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let after = |word: &str| -> Option<u64> {
        let i = tokens.iter().position(|t| *t == word)?;
        tokens
            .get(i + 1)?
            .trim_matches(|c| c == '%' || c == '(')
            .parse()
            .ok()
    };
    let requests = tokens
        .iter()
        .find(|t| t.starts_with('('))?
        .trim_start_matches('(')
        .parse()
        .ok()?;
    Some(Share {
        mesos: after("mesos")?,
        kubernetes: after("kubernetes")?,
        errors: after("errors")?,
        requests,
    })
}

/// The lines of each step: `1.` to `6.` and `Done`, in that order, each once.
fn steps(lines: &[String]) -> Vec<Vec<String>> {
    let heads = ["1.", "2.", "3.", "4.", "5.", "6.", "Done"];
    let mut steps: Vec<Vec<String>> = Vec::new();
    let mut next = 0;
    for line in lines {
        if next < heads.len() && line.starts_with(heads[next]) {
            steps.push(Vec::new());
            next += 1;
        } else if let Some(step) = steps.last_mut() {
            step.push(line.clone());
        } else {
            assert!(
                heads.iter().all(|h| !line.starts_with(h)),
                "step out of order: {line}"
            );
        }
    }
    assert_eq!(
        next,
        heads.len(),
        "not every step happened:\n{}",
        lines.join("\n")
    );
    steps
}

fn shares(step: &[String]) -> Vec<Share> {
    step.iter().filter_map(|l| share(l)).collect()
}

/// Asserts that nothing of lab `tag` is left: namespaces, bridge, folder, processes.
fn assert_torn_down(tag: &str, pids: &[u32]) {
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains(&format!("sky-{tag}-")),
        "namespaces left: {namespaces}"
    );
    let bridge = Command::new("ip")
        .args(["link", "show", &format!("skb{tag}")])
        .output()
        .unwrap();
    assert!(!bridge.status.success(), "bridge skb{tag} left");
    let dir = std::env::temp_dir().join(format!("skyline-lab-{tag}"));
    assert!(!dir.exists(), "{} left", dir.display());
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} of the demo still runs"
        );
    }
}

/// The pids of the processes in the lab's namespaces now.
fn lab_pids(tag: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for node in ["gw", "m1", "m2", "k1", "kp1", "dns"] {
        let out = Command::new("ip")
            .args(["netns", "pids", &format!("sky-{tag}-{node}")])
            .output()
            .unwrap();
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    pids
}

#[test]
fn the_migration_demo_in_namespaces_narrates_every_step_without_a_failed_request() {
    let (demo, tag) = Demo::started_in_namespaces();
    let pids = lab_pids(&tag);
    assert!(pids.len() >= 8, "the nodes run as processes: {pids:?}");
    let (status, lines, stderr) = demo.finish(DEMO_TIMEOUT);
    let all = lines.join("\n");
    println!("{all}");
    assert!(status.success(), "{status}: {stderr}\n{all}");
    assert!(all.contains("in network namespaces"), "{all}");
    let steps = steps(&lines);

    // 1. Mesos only, and every second of the load answered.
    let one = shares(&steps[0]);
    assert!(one.len() >= 3, "{all}");
    for s in &one {
        assert!(
            s.mesos == 100 && s.errors == 0 && s.requests > 0,
            "{s:?}\n{all}"
        );
    }
    // 2. Over to Kubernetes, without an error.
    let two = shares(&steps[1]);
    assert!(two.iter().all(|s| s.errors == 0 && s.requests > 0), "{all}");
    assert_eq!(two.last().map(|s| s.kubernetes), Some(100), "{all}");
    // 3. Back to Mesos after the hold, without an error.
    let three = shares(&steps[2]);
    assert!(
        three.iter().all(|s| s.errors == 0 && s.requests > 0),
        "{all}"
    );
    assert!(three[0].kubernetes > 0, "held on kubernetes first: {all}");
    assert_eq!(three.last().map(|s| s.mesos), Some(100), "{all}");
    // 4. A pod reached organization on Mesos by its cluster DNS name.
    assert!(
        steps[3]
            .iter()
            .any(|l| l.trim() == "-> 200 OK: mesos organization"),
        "{all}"
    );
    // 5. The broken version's 500s are seen, then Mesos serves everything again.
    let five = shares(&steps[4]);
    assert!(five.iter().any(|s| s.errors > 0), "{all}");
    let last = five.last().copied().unwrap();
    assert!(last.mesos == 100 && last.errors == 0, "{all}");
    // 6. The autopilot rolls the broken version back at its first step, then moves the fixed
    // one through a shadow step and every step to Kubernetes, the load through the gateway
    // ending all on Kubernetes without errors.
    let six = &steps[5];
    let has = |text: &str| six.iter().any(|l| l.contains(text));
    assert!(has(">> rollback at step 1/3 (10% to kubernetes)"), "{all}");
    assert!(has(">> autopilot: step 1/4: shadow"), "{all}");
    assert!(has(">> autopilot: step 4/4: 100%"), "{all}");
    assert!(
        has(">> autopilot: done: all traffic of giphy on kubernetes"),
        "{all}"
    );
    let six = shares(six);
    let last = six.last().copied().unwrap();
    assert!(last.kubernetes == 100 && last.errors == 0, "{all}");
    // Every m1 request sent straight to Mesos meanwhile was answered.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("6. m1 load, direct") && l.ends_with(" 0 failed")),
        "{all}"
    );

    assert_torn_down(&tag, &pids);
}

#[test]
fn ctrl_c_stops_the_demo_and_removes_its_namespaces() {
    let (demo, tag) = Demo::started_in_namespaces();
    let pids = lab_pids(&tag);
    assert!(!pids.is_empty());
    let pid = demo.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, lines, stderr) = demo.finish(Duration::from_secs(60));
    let all = lines.join("\n");
    assert!(status.success(), "{status}: {stderr}\n{all}");
    assert!(all.contains("Interrupted"), "{all}");
    assert!(!all.contains("Done"), "{all}");
    assert_torn_down(&tag, &pids);
}

#[test]
fn asking_for_namespaces_without_ip_fails_with_the_reason_instead_of_falling_back() {
    let demo = Demo::start(&["--mode", "netns"], Some("/nonexistent"));
    let (status, lines, stderr) = demo.finish(Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        stderr.contains("could not run in network namespaces") && stderr.contains("`ip`"),
        "{stderr}"
    );
    assert!(lines.iter().all(|l| !l.starts_with("1.")), "{lines:?}");
}
