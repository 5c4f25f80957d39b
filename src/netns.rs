//! A lab of Linux network namespaces on one machine: a bridge in the root namespace, one
//! namespace per node with a veth into the bridge and its own address on a private subnet
//! (`10.213.<octet>.0/24`), loopback up. Processes run inside with `ip netns exec`.
//! `skyline demo migration` and the integration tests build their nodes with it.
//!
//! Everything a lab made — its processes, namespaces, bridge and folder — is removed when it is
//! dropped, panics included (when they unwind). What a lab left behind because its process died
//! without dropping it (SIGKILL, `panic = "abort"`) is removed by the next lab made on the
//! machine: names carry the owner's pid, and a lab whose owner no longer runs is swept.
//!
//! Needs root (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN`) and iproute2's `ip`.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

/// Prefix of a lab's namespaces: `sky-<pid><seq>-<node>`.
const NETNS_PREFIX: &str = "sky-";
/// Prefix of a lab's bridge: `skb<pid><seq>`.
const BRIDGE_PREFIX: &str = "skb";
/// Prefix of a lab's folder under the system temp dir: `skyline-lab-<pid><seq>`.
const DIR_PREFIX: &str = "skyline-lab-";

/// Labs made by this process so far: tells apart two labs of one process.
static LABS_MADE: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot run `{command}`")]
    Run {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot prepare the lab folder {}", path.display())]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no process {0} in this lab")]
    NoProcess(usize),
}

/// The lab: its subnet, its bridge, its namespaces and processes, and a folder for their logs
/// and data.
#[derive(Debug)]
pub struct Lab {
    /// `<pid><seq>`, in every name the lab gives, so that labs on one machine never meet.
    tag: String,
    octet: u8,
    bridge: String,
    dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
    procs: Mutex<Vec<Child>>,
}

/// A handle on a lab process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId(usize);

// === impl Lab ===

impl Lab {
    /// Sweeps what dead labs left behind, then creates the bridge. Fails (never skips) when
    /// namespaces cannot be made, with the reason.
    pub fn new() -> Result<Self, LabError> {
        sweep_stale();
        let pid = std::process::id();
        let seq = LABS_MADE.fetch_add(1, Ordering::Relaxed);
        // A letter, so that the pid can be read back from a name (`skb1234b`).
        let tag = format!("{pid}{}", char::from(b'a' + (seq % 26) as u8));
        let octet = free_octet(pid);
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{tag}"));
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Folder {
            path: dir.clone(),
            source,
        })?;
        let lab = Self {
            bridge: format!("{BRIDGE_PREFIX}{tag}"),
            tag,
            octet,
            dir,
            namespaces: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
        };
        // From here on, dropping `lab` removes whatever was made.
        run(&["ip", "link", "add", &lab.bridge, "type", "bridge"])?;
        run(&["ip", "link", "set", &lab.bridge, "up"])?;
        Ok(lab)
    }

    /// The address of host `host` on the lab's subnet.
    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, self.octet, host))
    }

    /// The lab's folder: logs (`<name>.log`) and whatever its processes store. Removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The namespace name of node `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("{NETNS_PREFIX}{}-{name}", self.tag)
    }

    /// Creates node `name` (a namespace) with address `ip(host)`, wired into the bridge.
    pub fn node(&self, name: &str, host: u8) -> Result<(), LabError> {
        let ns = self.ns(name);
        run(&["ip", "netns", "add", &ns])?;
        lock(&self.namespaces).push(ns.clone());
        let outside = format!("sv{}{host}", self.tag);
        let inside = format!("sp{}{host}", self.tag);
        run(&[
            "ip", "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &ns,
        ])?;
        run(&["ip", "link", "set", &outside, "master", &self.bridge, "up"])?;
        let addr = format!("{}/24", self.ip(host));
        run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", &inside])?;
        run(&["ip", "-n", &ns, "link", "set", &inside, "up"])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Gives the root namespace (this process) address `ip(host)` on the bridge, so that it can
    /// reach the nodes directly. Goes away with the bridge.
    pub fn attach_host(&self, host: u8) -> Result<(), LabError> {
        let addr = format!("{}/24", self.ip(host));
        run(&["ip", "addr", "add", &addr, "dev", &self.bridge])
    }

    /// Starts `program args` in node `node`'s namespace with `envs`; stderr goes to
    /// `<dir>/<name>.log`, stdout is returned line by line through the receiver. Its stdin is
    /// a pipe, closed by [`Lab::close_stdin`] or when this process exits.
    pub fn spawn(
        &self,
        name: &str,
        node: &str,
        program: &str,
        args: &[&str],
        envs: &[(&str, String)],
    ) -> Result<(ProcId, mpsc::Receiver<String>), LabError> {
        let path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&path).map_err(|source| LabError::Folder {
            path: path.clone(),
            source,
        })?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(node), program])
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|source| LabError::Run {
                command: format!("ip netns exec {} {program}", self.ns(node)),
                source,
            })?;
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut procs = lock(&self.procs);
        procs.push(child);
        Ok((ProcId(procs.len() - 1), rx))
    }

    /// Runs `program args` in node `node` to completion (at most `timeout`) and returns stdout.
    pub fn output(
        &self,
        node: &str,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<String, LabError> {
        let out = Command::new("timeout")
            .arg(format!("{}", timeout.as_secs().max(1)))
            .args(["ip", "netns", "exec", &self.ns(node), program])
            .args(args)
            .output()
            .map_err(|source| LabError::Run {
                command: format!("ip netns exec {} {program}", self.ns(node)),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends SIGTERM to a process and waits (at most 15 s) for it to drain and exit; kills it
    /// if it does not.
    pub fn stop(&self, id: ProcId) -> Result<(), LabError> {
        let mut procs = lock(&self.procs);
        let child = procs.get_mut(id.0).ok_or(LabError::NoProcess(id.0))?;
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(());
        }
        let _ = signal("TERM", child.id());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// Kills a process with SIGKILL (no drain: its sockets close at once) and reaps it.
    pub fn kill(&self, id: ProcId) -> Result<(), LabError> {
        let mut procs = lock(&self.procs);
        let child = procs.get_mut(id.0).ok_or(LabError::NoProcess(id.0))?;
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// Closes a process's stdin (the demo's load generator stops on it).
    pub fn close_stdin(&self, id: ProcId) {
        if let Some(child) = lock(&self.procs).get_mut(id.0) {
            child.stdin.take();
        }
    }

    /// Waits (at most `timeout`) for a process to exit by itself; whether it did.
    pub fn wait(&self, id: ProcId, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.running(id) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether a process still runs.
    pub fn running(&self, id: ProcId) -> bool {
        lock(&self.procs)
            .get_mut(id.0)
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The log of process `name`, for error messages.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in lock(&self.procs).iter_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for ns in lock(&self.namespaces).iter() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lock's data even when a panicking thread held it: teardown must go on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run(args: &[&str]) -> Result<(), LabError> {
    let command = args.join(" ");
    let (program, rest) = args.split_first().ok_or_else(|| LabError::Failed {
        command: String::new(),
        stderr: "empty command".into(),
    })?;
    let out = Command::new(program)
        .args(rest)
        .output()
        .map_err(|source| LabError::Run {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn stdout_of(args: &[&str]) -> String {
    let Some((program, rest)) = args.split_first() else {
        return String::new();
    };
    Command::new(program)
        .args(rest)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

fn signal(name: &str, pid: u32) -> Result<(), LabError> {
    run(&["kill", &format!("-{name}"), &pid.to_string()])
}

/// A subnet octet no route of this machine uses yet, starting from one derived from `pid`, so
/// that an attached host address never shadows another network.
fn free_octet(pid: u32) -> u8 {
    let routes = stdout_of(&["ip", "-4", "route", "show"]);
    let start = pid % 200;
    (0..200)
        .map(|i| ((start + i) % 200 + 20) as u8)
        .find(|octet| !routes.contains(&format!("10.213.{octet}.")))
        .unwrap_or((start + 20) as u8)
}

// === Sweeping dead labs ===

/// The pid in a lab name after `prefix` (`sky-1234b-m1` → 1234), if it is one.
fn owner(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let after = rest.as_bytes().get(digits)?;
    if digits == 0 || !after.is_ascii_lowercase() {
        return None;
    }
    rest[..digits].parse().ok()
}

/// Whether `pid` is a running process (a reused pid only delays a sweep).
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn dead_owner(name: &str, prefix: &str) -> bool {
    owner(name, prefix).is_some_and(|pid| !alive(pid))
}

/// Removes the namespaces (and the processes in them), bridges and folders of labs whose
/// process no longer runs. Best effort: a lab that cannot be swept does not stop a new one.
fn sweep_stale() {
    for line in stdout_of(&["ip", "netns", "list"]).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        if !dead_owner(ns, NETNS_PREFIX) {
            continue;
        }
        for pid in stdout_of(&["ip", "netns", "pids", ns]).split_whitespace() {
            if let Ok(pid) = pid.parse() {
                let _ = signal("KILL", pid);
            }
        }
        let _ = run(&["ip", "netns", "del", ns]);
    }
    for line in stdout_of(&["ip", "-o", "link", "show", "type", "bridge"]).lines() {
        // `12: skb1234a: <BROADCAST,...> ...`
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        if dead_owner(name, BRIDGE_PREFIX) {
            let _ = run(&["ip", "link", "del", name]);
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if dead_owner(&name.to_string_lossy(), DIR_PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_name_tells_its_owner_pid() {
        assert_eq!(owner("sky-1234b-m1", NETNS_PREFIX), Some(1234));
        assert_eq!(owner("skb77a", BRIDGE_PREFIX), Some(77));
        assert_eq!(owner("skyline-lab-42c", DIR_PREFIX), Some(42));
        // Not a lab's name: left alone.
        assert_eq!(owner("sky-m1", NETNS_PREFIX), None);
        assert_eq!(owner("skb1234", BRIDGE_PREFIX), None);
        assert_eq!(owner("docker0", BRIDGE_PREFIX), None);
        assert_eq!(owner("skyline-lab-", DIR_PREFIX), None);
    }

    #[test]
    fn only_labs_of_dead_processes_are_swept() {
        let me = std::process::id();
        assert!(!dead_owner(&format!("sky-{me}a-m1"), NETNS_PREFIX));
        // Past the kernel's largest pid (2^22): no such process.
        assert!(dead_owner("sky-4194305a-m1", NETNS_PREFIX));
        assert!(!dead_owner("sky-m1", NETNS_PREFIX));
    }
}
