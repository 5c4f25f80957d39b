//! `/explain` on a gateway's and a bridge's admin listener (and `skyline explain --admin` on
//! them), as processes over a known catalog: the gateway says which tier takes a request and
//! why the others do not, with the split's shares and the endpoints; the bridge says which
//! cluster DNS name and URL a Skyline URL becomes, and the way back.

use serde_json::Value;

use crate::support::*;
use crate::upgrade::ClusterDns;

async fn explain(admin: &str, url: &str) -> Value {
    let encoded: String = url
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let reply = Client::new()
        .get(&format!("http://{admin}/explain?url={encoded}"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// `skyline explain <url> --admin <admin>`, as a person reads it.
async fn explain_text(admin: &str, url: &str) -> String {
    let out = tokio::process::Command::new(SKYLINE)
        .args(["explain", url, "--admin", admin])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_explains_which_tier_takes_a_request_and_why_the_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        "[[node]]\nname = \"mesos-1\"\naddress = \"127.0.0.1\"\ninbound_port = 31999\n\n\
         [[service]]\nname = \"giphy\"\nnode = \"mesos-1\"\nport = 31000\nmeta = { platform = \"mesos\" }\n\n\
         [[service]]\nname = \"down\"\nnode = \"mesos-1\"\nport = 31001\nmeta = { platform = \"mesos\" }\nhealth = \"critical\"\n\n\
         [[service]]\nname = \"checkout\"\nnode = \"mesos-1\"\nport = 31002\nmeta = { platform = \"mesos\" }\n",
    )
    .unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[routes.checkout]\ntiers = [{ select = \"platform=mesos\" }, { upstream = \"kubernetes\" }]\n\
         split = [75, 25]\nhold = \"0s\"\n",
    )
    .unwrap();
    let admin = free_addr("127.0.0.1");
    let mut gateway = Skyline::start(
        &[
            "gateway",
            &format!("--config={}", config.display()),
            "--listen=127.0.0.1:0",
            &format!("--admin={admin}"),
            &format!("--catalog-file={}", catalog.display()),
            "--bridges=127.0.0.1:9",
        ],
        &[],
    );
    gateway.log.wait_for("gateway started").await;

    // Mesos is healthy: it takes the request; Kubernetes is next in line.
    let giphy = explain(&admin, "/service/giphy/media?q=cats").await;
    assert_eq!(giphy["role"], "gateway");
    assert_eq!(giphy["decision"]["tier"], "mesos", "{giphy:#}");
    let tiers = giphy["tiers"].as_array().unwrap();
    assert_eq!(tiers[0]["name"], "mesos");
    assert_eq!(tiers[0]["chosen"], true);
    assert!(
        tiers[0]["why"]
            .as_str()
            .unwrap()
            .starts_with("takes the request"),
        "{giphy:#}"
    );
    assert_eq!(tiers[0]["route"]["endpoints"][0]["addr"], "127.0.0.1:31999");
    assert_eq!(tiers[1]["name"], "kubernetes");
    assert_eq!(tiers[1]["chosen"], false);
    assert!(
        tiers[1]["why"]
            .as_str()
            .unwrap()
            .contains("below the tier in use"),
        "{giphy:#}"
    );
    assert_eq!(tiers[1]["route"]["endpoints"][0]["addr"], "127.0.0.1:9");
    assert_eq!(giphy["policy"]["hold_seconds"], 3.0, "{giphy:#}");
    assert!(
        giphy["policy"]["calls"]["request_timeout"].is_string(),
        "{giphy:#}"
    );

    // Its only Mesos instance is critical: Mesos is ineligible, Kubernetes takes it.
    let down = explain(&admin, "/service/down/").await;
    assert_eq!(down["decision"]["tier"], "kubernetes", "{down:#}");
    assert_eq!(
        down["tiers"][0]["why"],
        "ineligible: 0 of 1 instances passing, below the tier's minimum"
    );
    assert_eq!(down["tiers"][1]["chosen"], true);

    // A migration split: each tier's share.
    let checkout = explain(&admin, "/service/checkout/pay").await;
    assert_eq!(checkout["policy"]["split"], serde_json::json!([75, 25]));
    assert_eq!(checkout["tiers"][0]["split_share"], 0.75, "{checkout:#}");
    assert_eq!(checkout["tiers"][1]["split_share"], 0.25, "{checkout:#}");
    assert!(
        checkout["decision"]["why"]
            .as_str()
            .unwrap()
            .contains("split")
    );

    // A service the catalog does not know: the tiers of `*`, Mesos without instances.
    let unknown = explain(&admin, "/service/nosuch/").await;
    assert!(unknown["catalog"].as_str().unwrap().starts_with("unknown"));
    assert_eq!(
        unknown["tiers"][0]["why"],
        "ineligible: no instance in the catalog"
    );
    assert_eq!(unknown["decision"]["tier"], "kubernetes");

    // A bad URL is refused with the mesh's error.
    let refused = Client::new()
        .get(&format!("http://{admin}/explain?url=/nope"))
        .await;
    assert_eq!(refused.status, 400);

    // And for a person.
    let text = explain_text(&admin, "/service/down/").await;
    assert!(text.contains("down (gateway)"), "{text}");
    assert!(text.contains("* kubernetes: takes the request"), "{text}");
    assert!(
        text.contains("- mesos: ineligible: 0 of 1 instances passing"),
        "{text}"
    );
    assert!(text.contains("policy: hold 3s"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_explains_the_cluster_dns_name_and_url_a_skyline_url_becomes_and_back() {
    let dns = ClusterDns::start(&[("giphy.default.svc.cluster.local", "127.0.0.9")]).await;
    let admin = free_addr("127.0.0.1");
    let mut bridge = Skyline::start(
        &[
            "bridge",
            "--listen=127.0.0.1:0",
            &format!("--admin={admin}"),
            &format!("--dns={}", dns.addr),
            "--gateways=127.0.0.1:9",
        ],
        &[],
    );
    bridge.log.wait_for("bridge started").await;

    let giphy = explain(&admin, "/service/giphy/media?q=cats").await;
    assert_eq!(giphy["role"], "bridge");
    assert_eq!(giphy["direction"], "skyline → kubernetes");
    assert_eq!(giphy["cluster_dns_name"], "giphy.default.svc.cluster.local");
    assert_eq!(giphy["port"], 8080);
    assert_eq!(
        giphy["rewritten_url"],
        "http://giphy.default.svc.cluster.local:8080/media?q=cats"
    );
    assert_eq!(
        giphy["resolves_to"],
        serde_json::json!(["127.0.0.9"]),
        "{giphy:#}"
    );
    assert!(giphy["decision"]["answer"].is_null(), "{giphy:#}");

    // A name the cluster DNS does not know: the bridge would answer 404 unknown-service.
    let nosuch = explain(&admin, "/service/nosuch/").await;
    assert_eq!(nosuch["resolves_to"], serde_json::json!([]));
    assert_eq!(nosuch["decision"]["answer"], 404, "{nosuch:#}");
    assert_eq!(nosuch["decision"]["error"], "unknown-service");

    // The way back: a cluster DNS host becomes a Skyline path to the gateways.
    let back = explain(&admin, "http://giphy.default.svc.cluster.local/media?q=1").await;
    assert_eq!(back["direction"], "kubernetes → skyline", "{back:#}");
    assert_eq!(back["rewritten_url"], "/service/giphy/media?q=1");
    assert_eq!(
        back["gateways"]["route"]["endpoints"][0]["addr"],
        "127.0.0.1:9"
    );

    let text = explain_text(&admin, "/service/giphy/media").await;
    assert!(
        text.contains("cluster dns name: giphy.default.svc.cluster.local"),
        "{text}"
    );
    assert!(
        text.contains("rewritten: http://giphy.default.svc.cluster.local:8080/media"),
        "{text}"
    );
    assert!(text.contains("cluster dns answers: 127.0.0.9"), "{text}");
}
