//! `skyline migrate`, the migration autopilot, through the shipped binary: a registry and a
//! gateway as processes, `giphy` on a Mesos node (a real HTTP app standing for the node's
//! inbound proxy) and a Kubernetes tier (a real HTTP app standing for the bridges), under about
//! 200 requests a second through the gateway while `skyline migrate` moves the split.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::*;
use skyline::registry::client::RegistryClient;

/// Load workers and the pause of each between requests: about 200 requests a second on an
/// idle machine, fewer on a loaded one (never more).
const WORKERS: usize = 4;
const PAUSE: Duration = Duration::from_millis(20);
/// Whatever happens, the load stops after this long.
const LOAD_MAX: Duration = Duration::from_secs(120);

struct Setup {
    registry: String,
    gateway: String,
    gateway_args: Vec<String>,
    gateway_process: Option<Skyline>,
    _processes: Vec<Skyline>,
    _apps: Vec<TestApp>,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// A registry, `giphy` on Mesos node m1, a Kubernetes tier that behaves as `kubernetes`
    /// says, and a gateway following the registry (and its KV).
    async fn start(kubernetes: Behaviour) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (registry_process, registry) = Skyline::registry(dir.path()).await;
        let mesos = TestApp::spawn("mesos", ip("127.0.0.1"));
        let k8s = TestApp::spawn_with("kubernetes", ip("127.0.0.1"), kubernetes);
        let body = json!({
            "Node": "m1", "Address": "127.0.0.1",
            "NodeMeta": {"skyline-inbound-port": mesos.addr.port().to_string()},
            "Service": {"ID": "giphy-m1", "Service": "giphy", "Port": 9, "Meta": {"platform": "mesos"}},
        });
        RegistryClient::new(registry.parse().unwrap())
            .put_json("/v1/catalog/register", &body)
            .await
            .unwrap();
        let admin = free_addr("127.0.0.1");
        let gateway = free_addr("127.0.0.1");
        let gateway_args = vec![
            "gateway".to_owned(),
            format!("--listen={gateway}"),
            format!("--admin={admin}"),
            format!("--consul={registry}"),
            format!("--bridges={}", k8s.addr),
            "--hold=500ms".to_owned(),
        ];
        let gateway_process = start_gateway(&gateway_args).await;
        let s = Self {
            registry,
            gateway,
            gateway_args,
            gateway_process: Some(gateway_process),
            _processes: vec![registry_process],
            _apps: vec![mesos, k8s],
            _dir: dir,
        };
        s.wait_all_on("mesos").await;
        s
    }

    /// Starts a second gateway on the same registry and Kubernetes tier (its own ports);
    /// returns it and the giphy URL through it.
    async fn second_gateway(&self) -> (Skyline, String) {
        let listen = free_addr("127.0.0.1");
        let mut args = self.gateway_args.clone();
        args[1] = format!("--listen={listen}");
        args[2] = format!("--admin={}", free_addr("127.0.0.1"));
        let gateway = start_gateway(&args).await;
        (gateway, format!("http://{listen}/service/giphy/media"))
    }

    /// Stops the gateway (SIGTERM) and starts it again with the same arguments.
    async fn restart_gateway(&mut self) {
        let old = self.gateway_process.take().unwrap();
        old.sigterm();
        old.exited_cleanly().await;
        self.gateway_process = Some(start_gateway(&self.gateway_args).await);
    }

    fn url(&self) -> String {
        format!("http://{}/service/giphy/media", self.gateway)
    }

    /// Waits (bounded: 20 s) until 20 requests in a row are served by `tier`.
    async fn wait_all_on(&self, tier: &str) {
        let client = Client::new();
        let mut in_a_row = 0;
        for _ in 0..2000 {
            let reply = client.get(&self.url()).await;
            let served = reply
                .headers
                .get("x-skyline-tier")
                .map_or("", |v| v.to_str().unwrap());
            in_a_row = if served == tier { in_a_row + 1 } else { 0 };
            if in_a_row == 20 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("giphy never went all to {tier}");
    }

    fn migrate(&self, args: &[&str]) -> tokio::process::Child {
        tokio::process::Command::new(SKYLINE)
            .arg("migrate")
            .args(args)
            .arg(format!("--registry={}", self.registry))
            .env("SKYLINE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// `skyline migrate <args>` to its end (bounded: 60 s): success, stdout, stderr.
    async fn migrate_output(&self, args: &[&str]) -> (bool, String, String) {
        let child = self.migrate(args);
        finish(child, Duration::from_secs(60)).await
    }

    async fn status(&self) -> String {
        let (ok, out, err) = self.migrate_output(&["status", "giphy"]).await;
        assert!(ok, "status: {err}");
        out
    }

    /// Waits (bounded: 20 s) until `skyline migrate status` says `text`.
    async fn status_until(&self, text: &str) -> String {
        let mut last = String::new();
        for _ in 0..100 {
            let (ok, out, _) = self.migrate_output(&["status", "giphy"]).await;
            if ok && out.contains(text) {
                return out;
            }
            last = out;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("status never said {text:?}; last:\n{last}");
    }
}

/// A `skyline migrate` driver whose stdout is read line by line as it comes.
struct Driver {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    out: String,
}

impl Driver {
    fn follow(mut child: tokio::process::Child) -> Self {
        use tokio::io::AsyncBufReadExt;
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            out: String::new(),
        }
    }

    /// Waits (bounded: 20 s) for a line that contains `text`.
    async fn wait_line(&mut self, text: &str) {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = self.lines.recv().await {
                self.out.push_str(&line);
                self.out.push('\n');
                if line.contains(text) {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            found == Ok(true),
            "the driver never printed {text:?}:\n{}",
            self.out
        );
    }

    fn sigterm(&self) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
    }

    /// Waits (bounded: 20 s) for the driver to exit: success, all of stdout, stderr.
    async fn finish(mut self) -> (bool, String, String) {
        use tokio::io::AsyncReadExt;
        let mut stderr = String::new();
        let mut pipe = self.child.stderr.take().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), async {
            pipe.read_to_string(&mut stderr).await.unwrap();
            self.child.wait().await.unwrap()
        })
        .await
        .expect("the driver exits in time");
        while let Some(line) = self.lines.recv().await {
            self.out.push_str(&line);
            self.out.push('\n');
        }
        (status.success(), self.out, stderr)
    }
}

async fn start_gateway(args: &[String]) -> Skyline {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut gateway = Skyline::start(&args, &[]);
    gateway.log.wait_for("gateway started").await;
    gateway
}

async fn finish(child: tokio::process::Child, limit: Duration) -> (bool, String, String) {
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("skyline migrate ends in time")
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

// === Load ===

/// What the load saw: per tier the answers, failures with their time since the start.
#[derive(Debug, Default)]
struct Seen {
    sent: u64,
    tiers: BTreeMap<String, u64>,
    /// Times (since the load started) of requests that did not get a 2xx.
    failures: Vec<Duration>,
    /// Times of every request sent, to count those in a window.
    sent_at: Vec<Duration>,
    /// How long the load ran, in seconds.
    secs: f64,
}

struct Load {
    stop: CancellationToken,
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    /// About 200 requests a second to `url` until stopped (bounded: [`LOAD_MAX`]).
    fn start(url: String) -> Self {
        let stop = CancellationToken::new();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let started = Instant::now();
        let tasks = (0..WORKERS)
            .map(|_| {
                let (stop, seen, url) = (stop.clone(), seen.clone(), url.clone());
                tokio::spawn(async move {
                    let client = Client::new();
                    while !stop.is_cancelled() && started.elapsed() < LOAD_MAX {
                        let at = started.elapsed();
                        let reply = client.get_result(&url).await;
                        {
                            let mut seen = seen.lock().unwrap();
                            seen.sent += 1;
                            seen.sent_at.push(at);
                            match reply {
                                Ok(r) if (200..300).contains(&r.status) => {
                                    let tier = r
                                        .headers
                                        .get("x-skyline-tier")
                                        .map_or("", |v| v.to_str().unwrap());
                                    *seen.tiers.entry(tier.to_owned()).or_default() += 1;
                                }
                                _ => seen.failures.push(at),
                            }
                        }
                        tokio::time::sleep(PAUSE).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            seen,
            tasks,
            started,
        }
    }

    async fn finish(self) -> Seen {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
        let mut seen = std::mem::take(&mut *self.seen.lock().unwrap());
        let secs = self.started.elapsed().as_secs_f64();
        seen.secs = secs;
        println!(
            "load: {} requests in {secs:.1} s ({:.0}/s), {} failed, by tier {:?}",
            seen.sent,
            seen.sent as f64 / secs,
            seen.failures.len(),
            seen.tiers
        );
        seen
    }
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autopilot_moves_a_healthy_service_through_a_shadow_and_every_step_without_a_failed_request()
 {
    let s = Setup::start(Behaviour::Healthy).await;
    let load = Load::start(s.url());
    let started = Instant::now();
    let (ok, out, err) = s
        .migrate_output(&[
            "giphy",
            "--to=kubernetes",
            "--steps=10,50,100",
            "--step-time=1s",
            "--min-requests=10",
            "--shadow=20%",
            // Loopback latencies on a shared machine are noise; this test is about the steps.
            "--max-p99-ratio=1000",
        ])
        .await;
    let took = started.elapsed();
    print!("{out}");
    assert!(ok, "the migration failed:\n{out}\n{err}");
    for step in [
        "step 1/4: shadow: 20% of GET and HEAD requests of giphy copied to kubernetes",
        "step 2/4: 10%",
        "step 3/4: 50%",
        "step 4/4: 100%",
        "done",
    ] {
        assert!(out.contains(step), "no {step:?} in:\n{out}");
    }
    // The shadow step compared copies, and none differed from a healthy tier.
    assert!(out.contains(" 0 differed"), "{out}");
    s.wait_all_on("kubernetes").await;
    let seen = load.finish().await;
    println!("migration took {:.1} s", took.as_secs_f64());
    assert!(seen.failures.is_empty(), "{} failed", seen.failures.len());
    assert!(
        seen.tiers.get("kubernetes").copied().unwrap_or(0) > 50,
        "{seen:?}"
    );
    let status = s.status().await;
    assert!(status.contains("done"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autopilot_rolls_back_a_failing_new_tier_within_one_step_and_says_why() {
    let s = Setup::start(Behaviour::Fail503Every(1)).await;
    let load = Load::start(s.url());
    let step_time = Duration::from_secs(3);
    let (ok, out, err) = s
        .migrate_output(&[
            "giphy",
            "--to=kubernetes",
            "--steps=10,50,100",
            "--step-time=3s",
            "--min-requests=10",
        ])
        .await;
    print!("{out}");
    assert!(!ok, "the migration of a failing tier succeeded:\n{out}");
    assert!(
        out.contains("ROLLBACK at step 1/3 (10% to kubernetes): error rate of kubernetes"),
        "{out}"
    );
    assert!(err.contains("rolled back"), "{err}");
    assert!(!out.contains("step 2/3"), "{out}");
    // Traffic is back on Mesos, and the load sees no failure from then on.
    s.wait_all_on("mesos").await;
    let seen = load.finish().await;
    let (first, last) = (seen.failures[0], *seen.failures.last().unwrap());
    let window = last - first;
    let sent_in_window = seen
        .sent_at
        .iter()
        .filter(|&&t| t >= first && t <= last)
        .count();
    println!(
        "failed: {} of {sent_in_window} sent between the first failure and the last, {:.2} s \
         apart (step time {step_time:?})",
        seen.failures.len(),
        window.as_secs_f64()
    );
    // Within one step time at the planned rate. The guard judges once the new tier answered
    // `--min-requests` (10) requests: on a machine too busy to send even half the planned rate,
    // that takes longer than a step, and only the bound on errors below is checked.
    let rate = seen.sent as f64 / seen.secs;
    if rate >= 100.0 {
        assert!(
            window <= step_time,
            "rollback took {window:?} at {rate:.0}/s"
        );
    } else {
        println!("the load ran at {rate:.0}/s, too slow to judge the rollback's time");
    }
    // Errors are bounded by the step's share (10%), with room for the split's randomness.
    let bound = sent_in_window as f64 * 0.2 + 10.0;
    assert!(
        (seen.failures.len() as f64) <= bound,
        "{} failures, more than {bound}",
        seen.failures.len()
    );
    let status = s.status().await;
    assert!(status.contains("rolled_back"), "{status}");
    assert!(
        status.contains("reason: at step 1/3 (10% to kubernetes): error rate of kubernetes"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_driver_at_a_time_and_pause_resume_rollback_and_restart_work_from_the_command_line() {
    let s = Setup::start(Behaviour::Healthy).await;
    let load = Load::start(s.url());
    let args = [
        "giphy",
        "--to=kubernetes",
        "--steps=10,100",
        "--step-time=60s",
        "--min-requests=10",
        "--max-p99-ratio=1000",
    ];
    let mut driver = Driver::follow(s.migrate(&args));
    driver
        .wait_line("step 1/2: 10% of giphy to kubernetes")
        .await;
    // A second driver is refused while the first holds the lock.
    let (ok, _, err) = s.migrate_output(&args).await;
    assert!(!ok);
    assert!(
        err.contains("another `skyline migrate` drives giphy"),
        "{err}"
    );
    // Pause and resume through the record; the driver follows.
    let (ok, out, err) = s.migrate_output(&["pause", "giphy"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("paused"), "{out}");
    driver.wait_line("paused at step 1/2").await;
    assert!(s.status().await.contains("paused, step 1/2"));
    let (ok, _, err) = s.migrate_output(&["pause", "giphy"]).await;
    assert!(!ok && err.contains("is paused: cannot pause"), "{err}");
    let (ok, _, err) = s.migrate_output(&["resume", "giphy"]).await;
    assert!(ok, "{err}");
    driver.wait_line("resumed: step 1/2").await;
    // The driver stops on SIGTERM, the migration stays at its step, and a new driver resumes it.
    driver.sigterm();
    let (ok, out, err) = driver.finish().await;
    assert!(!ok, "{out}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(s.status().await.contains("running, step 1/2"));
    let mut driver = Driver::follow(s.migrate(&args));
    driver
        .wait_line("resuming the migration of giphy from mesos to kubernetes at step 1/2")
        .await;
    // Rollback with a driver running: it obeys and exits, traffic back on Mesos.
    let (ok, _, err) = s.migrate_output(&["rollback", "giphy"]).await;
    assert!(ok, "{err}");
    driver
        .wait_line("rolled back: rolled back by the operator")
        .await;
    let (ok, _, err) = driver.finish().await;
    assert!(!ok && err.contains("rolled back"), "{err}");
    s.wait_all_on("mesos").await;
    let status = s.status().await;
    assert!(status.contains("rolled_back"), "{status}");
    let seen = load.finish().await;
    assert!(seen.failures.is_empty(), "{} failed", seen.failures.len());
    assert!(
        seen.tiers.get("kubernetes").copied().unwrap_or(0) > 0,
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_needs_no_driver_and_bad_arguments_are_refused() {
    let s = Setup::start(Behaviour::Healthy).await;
    let (ok, _, err) = s.migrate_output(&["giphy", "--to=vms"]).await;
    assert!(!ok && err.contains("has no tier \"vms\""), "{err}");
    let (ok, _, err) = s
        .migrate_output(&["giphy", "--to=kubernetes", "--steps=50,10"])
        .await;
    assert!(!ok && err.contains("--steps: steps must increase"), "{err}");
    let (ok, _, err) = s.migrate_output(&["rollback", "giphy"]).await;
    assert!(!ok && err.contains("no migration of giphy"), "{err}");
    let (ok, _, err) = s.migrate_output(&["status", "../giphy?recurse"]).await;
    assert!(!ok && err.contains("service \"../giphy?recurse\""), "{err}");
    // A driver killed outright (no clean exit) leaves the migration at its step.
    let mut driver = s.migrate(&[
        "giphy",
        "--to=kubernetes",
        "--steps=50,100",
        "--step-time=60s",
    ]);
    s.status_until("running, step 1/2").await;
    driver.kill().await.unwrap();
    let (ok, _, err) = s.migrate_output(&["rollback", "giphy"]).await;
    assert!(ok, "{err}");
    s.wait_all_on("mesos").await;
    let status = s.status().await;
    assert!(
        status.contains("reason: rolled back by the operator at step 1/2"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_step_changes_no_answer_and_rolls_back_a_failing_tier_before_it_takes_traffic() {
    let s = Setup::start(Behaviour::Fail503Every(1)).await;
    let load = Load::start(s.url());
    let (ok, out, err) = s
        .migrate_output(&[
            "giphy",
            "--to=kubernetes",
            "--steps=10,100",
            "--step-time=3s",
            "--min-requests=10",
            "--shadow=50%",
        ])
        .await;
    print!("{out}");
    assert!(!ok, "the migration of a failing tier succeeded:\n{out}");
    assert!(out.contains("step 1/3: shadow: 50%"), "{out}");
    assert!(
        out.contains(
            "ROLLBACK at step 1/3 (0% to kubernetes): shadow copies to kubernetes differed"
        ),
        "{out}"
    );
    assert!(err.contains("rolled back"), "{err}");
    let status = s.status().await;
    assert!(status.contains("rolled_back"), "{status}");
    assert!(status.contains("shadow copies to kubernetes"), "{status}");
    // Copies reached the failing tier, and no caller saw one of its answers.
    let seen = load.finish().await;
    assert!(seen.failures.is_empty(), "{} failed", seen.failures.len());
    assert_eq!(seen.tiers.keys().collect::<Vec<_>>(), ["mesos"], "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_mid_migration_applies_the_step_in_force_and_the_migration_completes() {
    let mut s = Setup::start(Behaviour::Healthy).await;
    let mut driver = Driver::follow(s.migrate(&[
        "giphy",
        "--to=kubernetes",
        "--steps=50,100",
        "--step-time=2s",
        "--min-requests=10",
        "--max-p99-ratio=1000",
    ]));
    driver
        .wait_line("step 1/2: 50% of giphy to kubernetes")
        .await;
    s.restart_gateway().await;
    // The new gateway process reads the step in force from the KV: both tiers answer.
    let client = Client::new();
    let mut tiers = BTreeMap::<String, u64>::new();
    for _ in 0..2000 {
        let reply = client.get(&s.url()).await;
        let tier = reply
            .headers
            .get("x-skyline-tier")
            .map_or("", |v| v.to_str().unwrap());
        *tiers.entry(tier.to_owned()).or_default() += 1;
        if tiers.get("mesos").is_some_and(|&n| n >= 5)
            && tiers.get("kubernetes").is_some_and(|&n| n >= 5)
        {
            break;
        }
    }
    assert!(
        tiers.get("kubernetes").is_some_and(|&n| n >= 5),
        "{tiers:?}"
    );
    assert!(tiers.get("mesos").is_some_and(|&n| n >= 5), "{tiers:?}");
    // Its reports start over (a new boot); the driver counts them and finishes.
    let load = Load::start(s.url());
    driver
        .wait_line("done: all traffic of giphy on kubernetes")
        .await;
    let (ok, out, err) = driver.finish().await;
    assert!(ok, "{out}\n{err}");
    s.wait_all_on("kubernetes").await;
    let seen = load.finish().await;
    assert!(seen.failures.is_empty(), "{} failed", seen.failures.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autopilot_judges_the_sum_of_every_gateways_reports_and_rolls_back_on_errors_seen_by_another_gateway()
 {
    let s = Setup::start(Behaviour::Fail503Every(1)).await;
    // Two gateways; all the traffic goes through the second one, so only its reports can show
    // the new tier failing.
    let (_second, url) = s.second_gateway().await;
    let load = Load::start(url);
    let (ok, out, err) = s
        .migrate_output(&[
            "giphy",
            "--to=kubernetes",
            "--steps=20,100",
            "--step-time=3s",
            "--min-requests=10",
        ])
        .await;
    print!("{out}");
    let seen = load.finish().await;
    assert!(!ok, "the migration of a failing tier succeeded:\n{out}");
    assert!(
        out.contains("ROLLBACK at step 1/2 (20% to kubernetes): error rate of kubernetes"),
        "{out}\n{err}"
    );
    assert!(!seen.failures.is_empty(), "the load met the failing tier");
    // Both gateways reported into the migration's record.
    let reports = RegistryClient::new(s.registry.parse().unwrap())
        .get("/v1/kv/skyline/migrate/giphy/gateways/?keys")
        .await
        .unwrap();
    let keys: Vec<String> = serde_json::from_slice(&reports).unwrap();
    assert_eq!(keys.len(), 2, "one report per gateway: {keys:?}");
}
