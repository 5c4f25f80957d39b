//! `skyline routes`: asks an agent's admin listener (`/routes`) for the route table it routes
//! with now, and prints it for a person (or as JSON): per service, the endpoints each side
//! sends to, with their weight and what the proxy observed of them.

use std::io::Write;

use serde_json::Value;

use super::CliError;
use super::explain::{AgentAdmin, admin_get};

/// Print an agent's route table.
#[derive(clap::Args, Clone, Debug)]
pub struct RoutesArgs {
    #[command(flatten)]
    pub agent: AgentAdmin,
}

pub async fn run(args: &RoutesArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let body = admin_get(args.agent.admin, "/routes").await?;
    let table: Value = serde_json::from_slice(&body)?;
    if args.agent.json {
        let _ = writeln!(out, "{table}");
        return Ok(());
    }
    if table.get("outbound").is_none() {
        return Err(CliError::Usage(format!(
            "{} is not an agent's admin listener (its /routes has no outbound table)",
            args.agent.admin
        )));
    }
    let _ = write!(out, "{}", render(&table));
    Ok(())
}

/// The table for a person: one block per side, a line per service and endpoint.
fn render(table: &Value) -> String {
    let mut out = format!(
        "route table version {}\n",
        table["version"].as_u64().unwrap_or(0)
    );
    let sides = [
        (
            "outbound",
            "outbound: this node's applications → the nodes that run the service",
        ),
        (
            "inbound",
            "inbound: other nodes → the instances on this node",
        ),
        (
            "retired",
            "retired: left the catalog, still served for requests on their way",
        ),
    ];
    for (key, title) in sides {
        out += &format!("\n{title}\n");
        let services = table[key].as_object().filter(|s| !s.is_empty());
        let Some(services) = services else {
            out += "  (none)\n";
            continue;
        };
        let mut names: Vec<&String> = services.keys().collect();
        names.sort();
        out += &format!(
            "  {:<24} {:<22} {:<6} STATE\n",
            "SERVICE", "ENDPOINT", "WEIGHT"
        );
        for name in names {
            let route = &services[name];
            // A retired route nests its route.
            let route = if key == "retired" {
                &route["route"]
            } else {
                route
            };
            route_lines(&mut out, name, route);
        }
    }
    out += "\ngateways (the catalog's skyline-gateway instances: where unknown services go)\n";
    let gateways = &table["gateways"];
    if gateways["endpoints"].as_array().is_none_or(Vec::is_empty) {
        out += "  (none)\n";
    } else {
        route_lines(&mut out, "*", gateways);
    }
    out
}

/// A service's endpoints, one line each; a route without endpoints is one line that says so.
fn route_lines(out: &mut String, name: &str, route: &Value) {
    let observed = route["observed"].as_str().unwrap_or("up");
    let endpoints = route["endpoints"].as_array().map_or(&[][..], |e| &e[..]);
    if endpoints.is_empty() {
        *out += &format!("  {name:<24} {:<22} {:<6} no healthy endpoint\n", "-", "-");
        return;
    }
    for (i, e) in endpoints.iter().enumerate() {
        let shown = if i == 0 { name } else { "" };
        let mut state = Vec::new();
        if i == 0 && observed != "up" {
            state.push(format!("route {observed}"));
        }
        let s = &e["state"];
        if s["ejected"] == true {
            state.push("ejected".to_owned());
        }
        if s["probe_down"] == true {
            state.push("probe down".to_owned());
        }
        if let Some(failures) = s["failures"].as_u64().filter(|&f| f > 0) {
            state.push(format!("{failures} failures in a row"));
        }
        if let Some(pending) = s["pending"].as_u64().filter(|&p| p > 0) {
            state.push(format!("{pending} in flight"));
        }
        if let Some(latency) = s["latency_ms"].as_f64().filter(|&l| l > 0.0) {
            state.push(format!("latency {latency:.2} ms"));
        }
        if e["h2c"] == true {
            state.push("h2c".to_owned());
        }
        if state.is_empty() {
            state.push("ok".to_owned());
        }
        *out += &format!(
            "  {shown:<24} {:<22} {:<6} {}\n",
            e["addr"].as_str().unwrap_or("?"),
            e["weight"].as_u64().unwrap_or(1),
            state.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_printed_per_side_with_each_endpoints_state() {
        let table = serde_json::json!({
            "version": 3,
            "outbound": {
                "web": {"observed": "up", "endpoints": [
                    {"addr": "10.0.0.2:5041", "weight": 1, "h2c": true, "state": {"ejected": false, "failures": 0, "pending": 0, "latency_ms": 0.5, "probe_down": false}},
                    {"addr": "10.0.0.3:5041", "weight": 2, "state": {"ejected": true, "failures": 5, "pending": 0, "latency_ms": 0.0, "probe_down": false}}
                ]},
                "idle": {"observed": "unreachable", "endpoints": []}
            },
            "inbound": {},
            "retired": {"old": {"route": {"observed": "up", "endpoints": [{"addr": "127.0.0.1:31000", "weight": 1, "state": {}}]}}},
            "gateways": {"observed": "up", "endpoints": []}
        });
        let text = render(&table);
        assert!(text.starts_with("route table version 3\n"), "{text}");
        assert!(
            text.contains(
                "  web                      10.0.0.2:5041          1      latency 0.50 ms, h2c\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("                           10.0.0.3:5041          2      ejected, 5 failures in a row\n"),
            "{text}"
        );
        assert!(text.contains("  idle  "), "{text}");
        assert!(text.contains("no healthy endpoint"), "{text}");
        assert!(
            text.contains("inbound: other nodes → the instances on this node\n  (none)\n"),
            "{text}"
        );
        assert!(
            text.contains("  old                      127.0.0.1:31000        1      ok\n"),
            "{text}"
        );
        // `idle` sorts before `web`.
        assert!(text.find("idle").unwrap() < text.find("web").unwrap());
    }
}
