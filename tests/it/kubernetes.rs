//! The Kubernetes artifacts: the manifests of `deploy/kubernetes/` and what `skyline k8s services`
//! prints, checked against the Kubernetes schemas by `kubernetes-validate` (PyPI, the version
//! pinned in `scripts/install-deps`), and the config files the manifests ship, run by the binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use http::Request;
use http_body_util::Full;
use serde_json::{Value, json};

use crate::support::*;
use skyline::registry::client::RegistryClient;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// The manifest files, in the order `kubectl apply -f deploy/kubernetes/` applies them.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// Runs `kubernetes-validate --strict` on `text` (YAML or JSON documents). `Ok(n)`: every
/// document passed, `n` of them; `Err(report)` when one failed or had no schema (a `WARN`), so a
/// document the validator skips cannot pass for a checked one.
fn validate(text: &str) -> Result<usize, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("objects.yaml");
    std::fs::write(&path, text).unwrap();
    let output = std::process::Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubernetes-validate: {e} (scripts/install-deps installs it from PyPI)")
        });
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let refused = report
        .lines()
        .any(|l| l.starts_with("ERROR") || l.starts_with("WARN"));
    if !output.status.success() || refused {
        return Err(report);
    }
    Ok(report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count())
}

/// YAML documents as JSON values, read by PyYAML (which kubernetes-validate brings).
fn yaml_documents(text: &str) -> Vec<Value> {
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "PyYAML could not read:\n{text}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Every object of the shipped manifests.
fn shipped_objects() -> Vec<Value> {
    manifest_files()
        .iter()
        .flat_map(|f| yaml_documents(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes/"))
}

/// A file of a ConfigMap of the shipped manifests, written into `dir`.
fn shipped_config(dir: &Path, configmap: &str, key: &str) -> PathBuf {
    let objects = shipped_objects();
    let text = object(&objects, "ConfigMap", configmap)["data"][key]
        .as_str()
        .unwrap()
        .to_owned();
    let path = dir.join(key);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_shipped_manifests_pass_the_kubernetes_schemas() {
    for file in manifest_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let documents = yaml_documents(&text).len();
        assert!(documents > 0, "{}", file.display());
        let passed =
            validate(&text).unwrap_or_else(|report| panic!("{}:\n{report}", file.display()));
        assert_eq!(passed, documents, "{}", file.display());
    }
}

#[test]
fn the_validator_as_these_tests_run_it_refuses_an_invalid_object_and_one_it_has_no_schema_for() {
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "giphy"},
        "spec": {"selector": {"app": "x"}, "ports": [{"port": 8080, "targetPort": 5041}]},
    });
    assert_eq!(validate(&service.to_string()), Ok(1));
    let mut wrong_type = service.clone();
    wrong_type["spec"]["ports"][0]["port"] = json!("eighty");
    let report = validate(&wrong_type.to_string()).unwrap_err();
    assert!(report.contains("did not validate"), "{report}");
    let mut unknown_field = service.clone();
    unknown_field["spec"]["selektor"] = json!({"app": "x"});
    assert!(validate(&unknown_field.to_string()).is_err());
    // A List has no schema: the validator only warns, and that must not count as passing.
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [wrong_type]});
    assert!(validate(&list.to_string()).is_err());
}

#[test]
fn the_shipped_workloads_probe_the_admin_port_and_run_unprivileged_on_the_bridge_host_port() {
    let objects = shipped_objects();
    let bridge = object(&objects, "DaemonSet", "skyline-bridge");
    let gateway = object(&objects, "Deployment", "skyline-gateway");
    for workload in [bridge, gateway] {
        let pod = &workload["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        let selector = workload["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| &labels[k] == v));
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        assert!(pod["spec"]["securityContext"]["runAsUser"].as_u64() > Some(0));
        let container = &pod["spec"]["containers"][0];
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        let port = |name: &str| {
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("no port {name}"))
                .clone()
        };
        assert_eq!(port("admin")["containerPort"], 5050);
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert!(container["resources"]["requests"]["memory"].is_string());
        assert!(container["resources"]["limits"]["memory"].is_string());
        // The config it mounts is a ConfigMap of the manifests.
        let configmap = pod["spec"]["volumes"][0]["configMap"]["name"]
            .as_str()
            .unwrap();
        object(&objects, "ConfigMap", configmap);
        // Each Service of the mesh selects pods of its workload.
        let name = workload["metadata"]["name"].as_str().unwrap();
        let service = object(&objects, "Service", name);
        let selects = service["spec"]["selector"].as_object().unwrap();
        assert!(selects.iter().all(|(k, v)| &labels[k] == v), "{name}");
    }
    let container = &bridge["spec"]["template"]["spec"]["containers"][0];
    let host_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bridge")
        .unwrap();
    assert_eq!(
        (&host_port["containerPort"], &host_port["hostPort"]),
        (&json!(5041), &json!(5041))
    );
    // The Services `skyline k8s services` prints select these pods by default.
    let (key, value) = skyline::cli::kubernetes::BRIDGE_SELECTOR;
    assert_eq!(bridge["spec"]["template"]["metadata"]["labels"][key], value);
}

/// Registers `service` instance `id` on node `node` (127.0.0.1, inbound port `inbound`).
async fn register(registry: &str, node: &str, inbound: u16, service: &str, id: &str, meta: Value) {
    let body = json!({
        "Node": node,
        "Address": "127.0.0.1",
        "NodeMeta": { "skyline-inbound-port": inbound.to_string() },
        "Service": { "ID": id, "Service": service, "Port": 31000, "Meta": meta },
    });
    RegistryClient::new(registry.parse().unwrap())
        .put_json("/v1/catalog/register", &body)
        .await
        .unwrap();
}

/// `skyline <args>`: stdout and stderr of a successful run.
async fn run(args: &[&str]) -> (String, String) {
    let output = tokio::process::Command::new(SKYLINE)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "skyline {args:?}: {stderr}");
    (stdout, stderr)
}

async fn start_registry(dir: &Path) -> (Skyline, String) {
    let addr = free_addr("127.0.0.1");
    let data = dir.join("registry");
    let args = [
        "registry",
        "--listen",
        &addr,
        "--data-dir",
        data.to_str().unwrap(),
        "--node-name",
        "registry",
    ];
    let mut registry = Skyline::start(&args, &[]);
    registry.log.wait_for("registry started").await;
    (registry, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_services_prints_a_valid_service_per_mesos_service_and_leaves_out_kubernetes_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, registry) = start_registry(dir.path()).await;
    let mesos = json!({"platform": "mesos"});
    let k8s = json!({"platform": "kubernetes"});
    register(
        &registry,
        "mesos-1",
        5041,
        "giphy",
        "giphy-1",
        mesos.clone(),
    )
    .await;
    register(
        &registry,
        "mesos-2",
        5041,
        "giphy",
        "giphy-2",
        mesos.clone(),
    )
    .await;
    register(
        &registry,
        "mesos-1",
        5041,
        "organization",
        "org-1",
        json!({}),
    )
    .await;
    // Moving: one instance on each side; its own Service exists on Kubernetes.
    register(
        &registry,
        "mesos-1",
        5041,
        "search",
        "search-1",
        mesos.clone(),
    )
    .await;
    register(&registry, "k8s-1", 5041, "search", "search-2", k8s.clone()).await;
    register(&registry, "k8s-1", 5041, "frontend", "frontend-1", k8s).await;
    register(
        &registry,
        "mesos-1",
        5041,
        "billing.v2",
        "billing-1",
        mesos.clone(),
    )
    .await;
    register(&registry, "gw", 5041, "skyline-gateway", "gw-1", json!({})).await;

    let common = [
        "k8s",
        "services",
        "--registry",
        &registry,
        "--namespace",
        "mesh",
        "--port",
        "80",
    ];
    let (json_out, notes) = run(&[&common[..], &["--output", "json"]].concat()).await;
    let list: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(
        (&list["apiVersion"], &list["kind"]),
        (&json!("v1"), &json!("List"))
    );
    let items = list["items"].as_array().unwrap();
    let names: Vec<&str> = items
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["giphy", "organization"]);
    for service in items {
        assert_eq!(service["metadata"]["namespace"], "mesh");
        assert_eq!(
            service["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "skyline"
        );
        assert_eq!(
            service["spec"]["selector"],
            json!({"app.kubernetes.io/name": "skyline-bridge"})
        );
        let port = &service["spec"]["ports"][0];
        assert_eq!(
            (&port["port"], &port["targetPort"]),
            (&json!(80), &json!(5041))
        );
    }
    for skipped in [
        "skipped search: runs on kubernetes",
        "skipped frontend: runs on kubernetes",
        "skipped billing.v2: not a valid Kubernetes Service name",
        "skipped skyline-gateway: not an application",
    ] {
        assert!(notes.contains(skipped), "{skipped:?} not in:\n{notes}");
    }
    // Each item passes the schemas (a List itself has none, so its items are checked).
    let documents: Vec<String> = items.iter().map(|i| format!("---\n{i}\n")).collect();
    assert_eq!(validate(&documents.concat()), Ok(2));

    // YAML, the default, says the same; with other selector labels.
    let selectors = [
        "--selector",
        "app=bridge",
        "--selector",
        "example.com/tier=edge",
    ];
    let (yaml_out, _) = run(&[&common[..], &selectors[..]].concat()).await;
    assert_eq!(validate(&yaml_out), Ok(2), "{yaml_out}");
    let (json_out, _) = run(&[&common[..], &selectors[..], &["-o", "json"]].concat()).await;
    let list: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(
        yaml_documents(&yaml_out),
        list["items"].as_array().unwrap().clone()
    );
    assert_eq!(
        list["items"][0]["spec"]["selector"],
        json!({"app": "bridge", "example.com/tier": "edge"})
    );

    // A selector Kubernetes would refuse is refused before the registry is asked.
    let output = tokio::process::Command::new(SKYLINE)
        .args([&common[..], &["--selector", "app=no spaces"]].concat())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a Kubernetes label value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_calling_a_generated_service_name_reaches_the_mesos_side_through_the_shipped_configs()
{
    let dir = tempfile::tempdir().unwrap();
    let (_registry, registry) = start_registry(dir.path()).await;
    // The Mesos node's inbound side: it sees what the gateway sends.
    let mesos = TestApp::spawn("mesos-1", ip("127.0.0.1"));
    let inbound = mesos.addr.port();
    register(
        &registry,
        "mesos-1",
        inbound,
        "giphy",
        "giphy-1",
        json!({"platform": "mesos"}),
    )
    .await;

    // The gateway, as its Deployment runs it, on loopback, with the registry of this test.
    let gateway_config = shipped_config(dir.path(), "skyline-gateway", "gateway.toml");
    let gateway_admin = free_addr("127.0.0.1");
    let mut gateway = Skyline::start(
        &[
            "gateway",
            &format!("--config={}", gateway_config.display()),
            "--bridges=127.0.0.1:9",
            "--listen=127.0.0.1:0",
            &format!("--admin={gateway_admin}"),
            &format!("--consul={registry}"),
        ],
        &[],
    );
    let started = gateway.log.wait_for("gateway started").await;
    let gateway_addr = started["gateway"].as_str().unwrap().to_owned();

    // The bridge, as its DaemonSet runs it: the shipped file, the variables the DaemonSet sets.
    let bridge_config = shipped_config(dir.path(), "skyline-bridge", "bridge.toml");
    let bridge_admin = free_addr("127.0.0.1");
    let mut command = std::process::Command::new(SKYLINE);
    command
        .args([
            "bridge",
            &format!("--config={}", bridge_config.display()),
            &format!("--gateways={gateway_addr}"),
            "--listen=127.0.0.1:0",
            &format!("--admin={bridge_admin}"),
            "--log-format=json",
        ])
        .env("SKYLINE_NAMESPACE", "mesh")
        .env("SKYLINE_SERVICE_PORT", "8080")
        .env("SKYLINE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut bridge = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut bridge_log = StderrLog::follow(&mut bridge);
    let started = bridge_log.wait_for("bridge started").await;
    let bridge_addr = started["listen"].as_str().unwrap().to_owned();

    // What the kubelet's probes ask, until both are ready (bounded).
    let client = Client::new();
    for admin in [&gateway_admin, &bridge_admin] {
        let mut ready = false;
        for _ in 0..100 {
            if client.get(&format!("http://{admin}/readyz")).await.status == 200 {
                ready = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(ready, "{admin}/readyz never answered 200");
        assert_eq!(
            client.get(&format!("http://{admin}/healthz")).await.status,
            200
        );
    }

    // The name `skyline k8s services --namespace mesh` gives giphy, as a pod calls it.
    let (services, _) = run(&[
        "k8s",
        "services",
        "--registry",
        &registry,
        "--namespace",
        "mesh",
        "-o",
        "json",
    ])
    .await;
    let service: Value = serde_json::from_str(&services).unwrap();
    let name = service["items"][0]["metadata"]["name"].as_str().unwrap();
    let port = &service["items"][0]["spec"]["ports"][0]["port"];
    let host = format!("{name}.mesh.svc.cluster.local:{port}");
    let req = Request::get(format!("http://{bridge_addr}/media?q=cats"))
        .header(http::header::HOST, host)
        .body(Full::default())
        .unwrap();
    let reply = client.send(req).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, "mesos-1 /service/giphy/media?q=cats");
    assert_eq!(mesos.hits(), 1);
    drop(gateway);
}
