//! A small lab of Linux network namespaces: a bridge in the root namespace, one namespace per
//! node with a veth into the bridge and its own address on a private test subnet, loopback up.
//! Processes run inside with `ip netns exec`. Everything — processes, namespaces, the bridge —
//! is torn down on drop, panics included.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

/// The lab: its subnet `10.213.<octet>.0/24`, its bridge, its namespaces and processes.
pub struct Lab {
    pid: u32,
    octet: u8,
    bridge: String,
    namespaces: Mutex<Vec<String>>,
    procs: Mutex<Vec<Proc>>,
    pub dir: tempfile::TempDir,
}

/// A process the lab started; its stderr goes to a log file in the lab's folder.
struct Proc {
    child: Child,
}

/// A handle on a lab process.
#[derive(Clone, Copy, Debug)]
pub struct ProcId(usize);

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// Creates the bridge. Fails (never skips) when namespaces cannot be made, with the reason.
    pub fn new() -> Result<Self, String> {
        let pid = std::process::id();
        // A subnet per run, so two runs on one machine do not meet.
        let octet = (pid % 200 + 20) as u8;
        let bridge = format!("skb{pid}");
        let lab = Self {
            pid,
            octet,
            bridge: bridge.clone(),
            namespaces: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
        };
        run(&["ip", "link", "add", &bridge, "type", "bridge"])
            .map_err(|e| format!("cannot create a bridge (root and CAP_NET_ADMIN needed): {e}"))?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        Ok(lab)
    }

    /// The address of host `host` on the lab's subnet.
    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, self.octet, host))
    }

    /// The namespace name of node `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("sky-{}-{name}", self.pid)
    }

    /// Creates node `name` (a namespace) with address `ip(host)`, wired into the bridge.
    pub fn node(&self, name: &str, host: u8) -> Result<(), String> {
        let ns = self.ns(name);
        run(&["ip", "netns", "add", &ns])
            .map_err(|e| format!("cannot create network namespace {ns}: {e}"))?;
        self.namespaces.lock().unwrap().push(ns.clone());
        let outside = format!("sv{}{host}", self.pid);
        let inside = format!("sp{}{host}", self.pid);
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

    /// Starts `program args` in node `node`'s namespace with `envs`; stderr goes to
    /// `<dir>/<name>.log`, stdout is returned line by line through the receiver.
    pub fn spawn(
        &self,
        name: &str,
        node: &str,
        program: &str,
        args: &[&str],
        envs: &[(&str, String)],
    ) -> (ProcId, mpsc::Receiver<String>) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(node), program])
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut procs = self.procs.lock().unwrap();
        procs.push(Proc { child });
        (ProcId(procs.len() - 1), rx)
    }

    /// Runs `program args` in node `node` to completion (at most `timeout`) and returns stdout.
    pub fn output(&self, node: &str, program: &str, args: &[&str], timeout: Duration) -> String {
        let mut cmd = Command::new("timeout");
        cmd.arg(format!("{}", timeout.as_secs().max(1)))
            .args(["ip", "netns", "exec", &self.ns(node), program])
            .args(args);
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends SIGTERM to a process and waits (at most 15 s) for it to drain and exit.
    pub fn stop(&self, id: ProcId) {
        let mut procs = self.procs.lock().unwrap();
        let proc = &mut procs[id.0];
        let pid = proc.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..150 {
            if let Ok(Some(_)) = proc.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = proc.child.kill();
        let _ = proc.child.wait();
    }

    /// Closes a process's stdin (the load generator stops on it).
    pub fn close_stdin(&self, id: ProcId) {
        self.procs.lock().unwrap()[id.0].child.stdin.take();
    }

    /// Waits (at most `timeout`) for a process to exit by itself.
    pub fn wait(&self, id: ProcId, timeout: Duration) -> bool {
        for _ in 0..(timeout.as_millis() / 50).max(1) {
            if let Ok(Some(_)) = self.procs.lock().unwrap()[id.0].child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The log of process `name`, for failure messages.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(mut procs) = self.procs.lock() {
            for proc in procs.iter_mut() {
                if let Ok(None) = proc.child.try_wait() {
                    let _ = proc.child.kill();
                    let _ = proc.child.wait();
                }
            }
        }
        if let Ok(namespaces) = self.namespaces.lock() {
            for ns in namespaces.iter() {
                let _ = run(&["ip", "netns", "del", ns]);
            }
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
