//! `skyline k8s services`: the Kubernetes `Service` objects that stand for the catalog's Mesos
//! services, so that nobody writes them by hand.
//!
//! A pod calls a Mesos service by its cluster DNS name, `http://giphy.default.svc.cluster.local:
//! 8080/media`. That name must exist: this command prints, for each service of the catalog, a
//! `Service` named after it, in the bridge's namespace, whose selector targets the bridge pods
//! (`app.kubernetes.io/name=skyline-bridge`) and whose port sends to the bridge's port 5041. The
//! bridge sees `Host: giphy.default.svc.cluster.local:8080` and sends `/service/giphy/media` to
//! the gateway, which routes it to the Mesos side.
//!
//! Left out, each with a line on stderr:
//! - a service with an instance whose meta says `platform=kubernetes`: it runs on Kubernetes,
//!   where its own `Service` selects its pods (ours would replace it, and send its callers to the
//!   bridge, which sends Kubernetes services back to the cluster DNS: a loop);
//! - the mesh's own services, `skyline-gateway`, `skyline-bridge` and `skyline-admin`, and
//!   Consul's `consul`;
//! - a name that cannot be a `Service` name (an RFC 1035 label: lowercase letters, digits and
//!   `-`, starting with a letter), such as `billing.v2`.
//!
//! Every object carries `app.kubernetes.io/managed-by: skyline`, so a service that left the
//! catalog is removed with `kubectl apply --prune -l app.kubernetes.io/managed-by=skyline`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;

use serde_json::{Value, json};

use super::{CliError, catalog};
use crate::config::DEFAULT_REGISTRY;
use crate::contract::BRIDGE_SERVICE;
use crate::contract::GATEWAY_SERVICE;
use crate::registry::client::RegistryClient;

/// The label every generated object carries, for `kubectl apply --prune -l`.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "skyline");
/// The label of the bridge pods in `deploy/kubernetes/`, the generated Services' default selector.
pub const BRIDGE_SELECTOR: (&str, &str) = ("app.kubernetes.io/name", "skyline-bridge");
/// The instance meta of a service that runs on Kubernetes.
pub const KUBERNETES_PLATFORM: (&str, &str) = ("platform", "kubernetes");
/// Services of the catalog that are not applications: the mesh's own, and Consul's.
const NOT_APPLICATIONS: [&str; 4] = [
    GATEWAY_SERVICE,
    BRIDGE_SERVICE,
    crate::contract::ADMIN_SERVICE,
    "consul",
];

/// Kubernetes helpers.
#[derive(clap::Args, Clone, Debug)]
pub struct K8sArgs {
    #[command(subcommand)]
    pub command: K8sCommand,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum K8sCommand {
    /// Print the Kubernetes Services that stand for the catalog's services (for `kubectl apply -f -`)
    Services(ServicesArgs),
}

/// Settings of `skyline k8s services`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServicesArgs {
    /// The registry (or Consul agent) to read the catalog from
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,

    /// The namespace of the Services: the bridge pods' namespace, since a Service selects pods
    /// of its own namespace only
    #[arg(long, value_name = "NS", default_value = "default", value_parser = namespace)]
    pub namespace: String,

    /// A label of the bridge pods, repeatable; the Services select the pods that carry them all
    /// [default: app.kubernetes.io/name=skyline-bridge]
    #[arg(long = "selector", value_name = "KEY=VALUE", value_parser = label)]
    pub selectors: Vec<(String, String)>,

    /// The port callers use, as in http://<name>.<ns>.svc.cluster.local:<port>/
    #[arg(long, default_value_t = 8080, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,

    /// The bridge pods' port that the Services send to
    #[arg(long, default_value_t = crate::catalog::DEFAULT_INBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub target_port: u16,

    /// Output format: yaml (one document per Service) or json (a v1 List)
    #[arg(long, short, value_enum, default_value = "yaml")]
    pub output: Format,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

/// `skyline k8s`.
pub async fn run(
    args: K8sArgs,
    out: &mut dyn Write,
    notes: &mut dyn Write,
) -> Result<(), CliError> {
    match args.command {
        K8sCommand::Services(args) => services(args, out, notes).await,
    }
}

/// `skyline k8s services`: the Services on `out`, what was left out and why on `notes`.
pub async fn services(
    args: ServicesArgs,
    out: &mut dyn Write,
    notes: &mut dyn Write,
) -> Result<(), CliError> {
    let client = RegistryClient::from_env(args.registry);
    let mut objects = Vec::new();
    for (name, instances) in catalog(&client).await? {
        let on_kubernetes = instances.iter().any(|e| {
            let meta = e.service.meta.as_ref();
            meta.and_then(|m| m.get(KUBERNETES_PLATFORM.0))
                .map(String::as_str)
                == Some(KUBERNETES_PLATFORM.1)
        });
        let skip = if NOT_APPLICATIONS.contains(&name.as_str()) {
            Some("not an application: the mesh's own or Consul's".to_owned())
        } else if on_kubernetes {
            Some(format!(
                "runs on kubernetes ({}={}), where its own Service selects its pods",
                KUBERNETES_PLATFORM.0, KUBERNETES_PLATFORM.1
            ))
        } else if !is_rfc1035_label(&name) {
            Some(
                "not a valid Kubernetes Service name (lowercase letters, digits and '-', \
                 starting with a letter)"
                    .to_owned(),
            )
        } else {
            None
        };
        match skip {
            Some(reason) => {
                let _ = writeln!(notes, "skipped {name}: {reason}");
            }
            None => objects.push(service_object(&name, &args)),
        }
    }
    match args.output {
        Format::Json => {
            let list = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
            let text = serde_json::to_string_pretty(&list)?;
            let _ = writeln!(out, "{text}");
        }
        Format::Yaml => {
            for object in &objects {
                let mut text = String::from("---\n");
                yaml(object, 0, &mut text);
                let _ = write!(out, "{text}");
            }
        }
    }
    if objects.is_empty() {
        let _ = writeln!(notes, "no service to print");
    }
    Ok(())
}

/// The Service that stands for catalog service `name`.
pub fn service_object(name: &str, args: &ServicesArgs) -> Value {
    let selector: BTreeMap<&str, &str> = if args.selectors.is_empty() {
        BTreeMap::from([BRIDGE_SELECTOR])
    } else {
        args.selectors
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    };
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": args.namespace,
            "labels": BTreeMap::from([MANAGED_BY]),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{
                "name": "http",
                "protocol": "TCP",
                "port": args.port,
                "targetPort": args.target_port,
            }],
        },
    })
}

/// An RFC 1035 label, as Kubernetes wants Service names: `[a-z]([-a-z0-9]*[a-z0-9])?`, at most
/// 63 characters.
pub fn is_rfc1035_label(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            b.len() <= 63 && first.is_ascii_lowercase() && *last != b'-' && b.iter().all(inner)
        }
        _ => false,
    }
}

/// An RFC 1123 label, as Kubernetes wants namespace names.
fn namespace(text: &str) -> Result<String, String> {
    let b = text.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
        ))
    }
}

/// A label `KEY=VALUE` as Kubernetes takes it: a key `[prefix/]name` (the prefix a DNS
/// subdomain), names and values at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn label(text: &str) -> Result<(String, String), String> {
    let (key, value) = super::key_value(text)?;
    let segment = |s: &str, empty_ok: bool| {
        let b = s.as_bytes();
        if b.is_empty() {
            return empty_ok;
        }
        b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key.as_str()),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            })
    });
    if !prefix_ok || !segment(name, false) {
        return Err(format!("{key:?} is not a Kubernetes label key"));
    }
    if !segment(&value, true) {
        return Err(format!("{value:?} is not a Kubernetes label value"));
    }
    Ok((key, value))
}

// === YAML ===

/// `value` as block-style YAML at `indent` spaces: mappings and sequences one entry a line,
/// strings plain when YAML reads them back as the same string, else JSON-quoted (a JSON string
/// is a YAML double-quoted scalar).
fn yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, v) in map {
                out.push_str(&pad);
                out.push_str(&scalar(&Value::String(key.clone())));
                out.push(':');
                nested(v, indent + 2, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                out.push_str(&pad);
                out.push('-');
                match item {
                    Value::Object(map) if !map.is_empty() => {
                        // The first entry on the dash's line, the others under it.
                        let mut inner = String::new();
                        yaml(item, indent + 2, &mut inner);
                        out.push(' ');
                        out.push_str(&inner[indent + 2..]);
                    }
                    _ => nested(item, indent + 2, out),
                }
            }
        }
        _ => {
            out.push_str(&pad);
            out.push_str(&scalar(value));
            out.push('\n');
        }
    }
}

/// The value of a mapping entry or a sequence item: on the same line when it is a scalar or
/// empty, else on the next lines, indented.
fn nested(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            yaml(value, indent, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            yaml(value, indent, out);
        }
        _ => {
            out.push(' ');
            out.push_str(&scalar(value));
            out.push('\n');
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) if plain(s) => s.clone(),
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        other => other.to_string(),
    }
}

/// Whether `s` reads back as the same string unquoted: it starts with a letter, holds only
/// letters, digits and `.-_/`, and is none of YAML 1.1's booleans and nulls.
fn plain(s: &str) -> bool {
    const SPECIAL: [&str; 11] = [
        "y", "n", "yes", "no", "true", "false", "on", "off", "null", "nan", "inf",
    ];
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
        && !SPECIAL.contains(&s.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServicesArgs {
        ServicesArgs {
            registry: DEFAULT_REGISTRY,
            namespace: "default".into(),
            selectors: Vec::new(),
            port: 8080,
            target_port: 5041,
            output: Format::Yaml,
        }
    }

    #[test]
    fn a_service_is_written_as_block_yaml_with_ambiguous_strings_quoted() {
        let mut text = String::new();
        yaml(&service_object("giphy", &args()), 0, &mut text);
        assert_eq!(
            text,
            "apiVersion: v1\nkind: Service\nmetadata:\n  labels:\n    app.kubernetes.io/managed-by: skyline\n  name: giphy\n  namespace: default\nspec:\n  ports:\n    - name: http\n      port: 8080\n      protocol: TCP\n      targetPort: 5041\n  selector:\n    app.kubernetes.io/name: skyline-bridge\n  type: ClusterIP\n"
        );
        let mut text = String::new();
        yaml(
            &json!({"a": ["yes", "8080", "x y", "", {}, []], "b": {}, "on": null}),
            0,
            &mut text,
        );
        assert_eq!(
            text,
            "a:\n  - \"yes\"\n  - \"8080\"\n  - \"x y\"\n  - \"\"\n  - {}\n  - []\nb: {}\n\"on\": null\n"
        );
    }

    #[test]
    fn service_names_must_be_rfc1035_labels() {
        for good in ["giphy", "a", "billing-v2", &"a".repeat(63)] {
            assert!(is_rfc1035_label(good), "{good}");
        }
        for bad in [
            "",
            "2fa",
            "billing.v2",
            "under_score",
            "end-",
            &"a".repeat(64),
        ] {
            assert!(!is_rfc1035_label(bad), "{bad}");
        }
    }

    #[test]
    fn selectors_and_namespaces_are_checked_as_kubernetes_checks_them() {
        assert!(label("app.kubernetes.io/name=skyline-bridge").is_ok());
        assert!(label("tier=").is_ok());
        for bad in ["=x", "a b=x", "Example.com/x=y", "x=-y", "x"] {
            assert!(label(bad).is_err(), "{bad}");
        }
        assert!(namespace("mesh-2").is_ok());
        for bad in ["", "Mesh", "-x", "a.b"] {
            assert!(namespace(bad).is_err(), "{bad}");
        }
    }
}
