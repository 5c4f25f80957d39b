//! `skyline explain <url>`: asks an agent's, a gateway's or a bridge's admin listener
//! (`/explain`) why a request to `url` would go where it goes, and prints the answer for a
//! person (or as JSON).

use std::io::Write;
use std::net::SocketAddr;

use serde_json::Value;

use super::CliError;
use crate::registry::client::{ClientError, RegistryClient};

/// Explain where a request would go.
#[derive(clap::Args, Clone, Debug)]
pub struct ExplainArgs {
    /// The request's URL: /service/<name>/<path>, http://localhost:5040/service/..., or a
    /// cluster-DNS URL such as http://giphy.default.svc.cluster.local/media
    pub url: String,

    #[command(flatten)]
    pub agent: AgentAdmin,
}

/// Which agent's admin listener a command asks, and how it prints the answer.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentAdmin {
    /// The agent's admin listener
    #[arg(
        long,
        env = "SKYLINE_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:5050"
    )]
    pub admin: SocketAddr,

    /// Print the agent's JSON answer instead
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &ExplainArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut query = String::from("/explain?url=");
    for b in args.url.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            query.push(char::from(b));
        } else {
            query.push_str(&format!("%{b:02X}"));
        }
    }
    let body = match admin_get(args.agent.admin, &query).await {
        Err(CliError::Registry(ClientError::Refused { message, .. })) => {
            let detail = serde_json::from_str::<Value>(&message)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_owned))
                .unwrap_or(message);
            return Err(CliError::Usage(format!(
                "the admin listener refused the URL: {detail}"
            )));
        }
        other => other?,
    };
    let answer: Value = serde_json::from_slice(&body)?;
    if args.agent.json {
        let _ = writeln!(out, "{answer}");
        return Ok(());
    }
    let _ = write!(out, "{}", render(&answer));
    Ok(())
}

/// `GET path` on the admin listener at `admin` (an agent's): the body of a 2xx answer; a
/// listener that does not answer is a usage error that names `--admin`.
pub(super) async fn admin_get(admin: SocketAddr, path: &str) -> Result<Vec<u8>, CliError> {
    match RegistryClient::new(admin).get(path).await {
        Ok(body) => Ok(body.to_vec()),
        Err(ClientError::Unreachable { addr, .. } | ClientError::Timeout { addr }) => {
            Err(CliError::Usage(format!(
                "no agent's admin listener answers at {addr} (--admin)"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// The explanation for a person: an agent's, a gateway's or a bridge's.
fn render(a: &Value) -> String {
    match a["role"].as_str() {
        Some("gateway") => return render_gateway(a),
        Some("bridge") => return render_bridge(a),
        _ => {}
    }
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let decision = &a["decision"];
    let mut out = format!(
        "{}: {}\n  catalog: {}\n",
        text(&a["service"]),
        text(&decision["why"]),
        text(&a["catalog"])
    );
    if let Some(answer) = decision["answer"].as_u64() {
        out += &format!("  answer: {answer} {}\n", text(&decision["error"]));
        return out;
    }
    let mut routes = vec![("route", &a["route"], text(&decision["route"]))];
    if !a["catch_all"].is_null() {
        routes.push(("then", &a["catch_all"], "catch-all".to_owned()));
    }
    if !a["service_route"].is_null() {
        routes.push(("skipped", &a["service_route"], "service".to_owned()));
    }
    for (label, route, kind) in routes {
        out += &format!(
            "  {label}: {kind} (reach: {}, retry budget left: {})\n",
            text(&route["reach"]),
            text(&route["retry_budget_left"])
        );
        for e in route["endpoints"].as_array().into_iter().flatten() {
            let state = &e["state"];
            out += &format!(
                "    {:<22} weight {:<3} {:<40} latency {:.2} ms, {} in flight, {} failures in a row\n",
                text(&e["addr"]),
                text(&e["weight"]),
                text(&e["why"]),
                state["latency_ms"].as_f64().unwrap_or(0.0),
                text(&state["pending"]),
                text(&state["failures"]),
            );
        }
    }
    if let Some(pick) = a["next_pick"]["addr"].as_str() {
        let panic = if a["next_pick"]["panic"] == true {
            " (panic: no endpoint is healthy, all are used)"
        } else {
            ""
        };
        out += &format!("  next pick: {pick}{panic}\n");
    }
    let p = &a["policy"];
    out += &format!(
        "  policy: request timeout {}, connect timeout {}, retries {}, balance {}\n",
        text(&p["request_timeout"]),
        text(&p["connect_timeout"]),
        text(&p["retries"]),
        text(&p["balance"])
    );
    out
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// A route's endpoints, one line each.
fn endpoints(route: &Value) -> String {
    let mut out = String::new();
    for e in route["endpoints"].as_array().into_iter().flatten() {
        let state = &e["state"];
        out += &format!(
            "      {:<22} weight {:<3} {:<40} latency {:.2} ms, {} in flight, {} failures in a row\n",
            text(&e["addr"]),
            text(&e["weight"]),
            text(&e["why"]),
            state["latency_ms"].as_f64().unwrap_or(0.0),
            text(&state["pending"]),
            text(&state["failures"]),
        );
    }
    out
}

/// A gateway's explanation: the decision, then every tier with why it takes the request or not.
fn render_gateway(a: &Value) -> String {
    let decision = &a["decision"];
    let mut out = format!(
        "{} (gateway): {}\n  catalog: {}\n",
        text(&a["service"]),
        text(&decision["why"]),
        text(&a["catalog"])
    );
    match decision["tier"].as_str() {
        Some(tier) => out += &format!("  tier: {tier}\n"),
        None => {
            out += &format!(
                "  answer: {} {}\n",
                text(&decision["answer"]),
                text(&decision["error"])
            )
        }
    }
    for t in a["tiers"].as_array().into_iter().flatten() {
        let share = t["split_share"]
            .as_f64()
            .map_or_else(String::new, |s| format!(", split share {:.0}%", s * 100.0));
        out += &format!(
            "  {} {}: {} ({} of {} passing, reach {}{share})\n",
            if t["chosen"] == true { "*" } else { "-" },
            text(&t["name"]),
            text(&t["why"]),
            text(&t["passing"]),
            text(&t["total"]),
            text(&t["route"]["reach"]),
        );
        out += &endpoints(&t["route"]);
    }
    let p = &a["policy"];
    let calls = &p["calls"];
    out += &format!(
        "  policy: hold {}s, split {}, shadow {}; request timeout {}, connect timeout {}, retries {}, balance {}\n",
        p["hold_seconds"].as_f64().unwrap_or(0.0),
        if p["split"].is_null() {
            "none".to_owned()
        } else {
            text(&p["split"])
        },
        if p["shadow"].is_null() {
            "none".to_owned()
        } else {
            text(&p["shadow"])
        },
        text(&calls["request_timeout"]),
        text(&calls["connect_timeout"]),
        text(&calls["retries"]),
        text(&calls["balance"])
    );
    out
}

/// A bridge's explanation: the direction, the cluster DNS name and the rewritten URL.
fn render_bridge(a: &Value) -> String {
    let decision = &a["decision"];
    let mut out = format!(
        "{} (bridge, {}): {}\n  cluster dns name: {}\n  rewritten: {}\n",
        text(&a["service"]),
        text(&a["direction"]),
        text(&decision["why"]),
        text(&a["cluster_dns_name"]),
        text(&a["rewritten_url"]),
    );
    if let Some(answer) = decision["answer"].as_u64() {
        out += &format!("  answer: {answer} {}\n", text(&decision["error"]));
    }
    if !a["speaks"].is_null() {
        out += &format!("  speaks: {}\n", text(&a["speaks"]));
    }
    if let Some(ips) = a["resolves_to"].as_array() {
        let ips: Vec<String> = ips.iter().map(text).collect();
        out += &format!(
            "  cluster dns answers: {}\n",
            if ips.is_empty() {
                "nothing".to_owned()
            } else {
                ips.join(", ")
            }
        );
    }
    if !a["gateways"].is_null() {
        out += &format!("  gateways: {}\n", text(&a["gateways"]["source"]));
        out += &endpoints(&a["gateways"]["route"]);
    }
    out
}
