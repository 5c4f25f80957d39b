//! The file backend: a TOML catalog on disk, hot-reloaded when it changes (the fsconsul /
//! consul-template way, without the reload).
//!
//! ```toml
//! [[node]]
//! name = "mesos-1"
//! address = "10.0.0.11"
//! inbound_port = 5041          # optional, default 5041
//!
//! [[service]]
//! name = "giphy"
//! node = "mesos-1"
//! port = 31000
//! address = "10.0.0.11"        # optional, default: the node's address
//! id = "giphy-1"               # optional, default: "<name>-<node>-<port>"
//! tags = ["v2"]
//! meta = { platform = "mesos" }
//! health = "passing"           # passing | warning | critical, default passing
//! weight = 1                   # optional, default 1
//! ```
//!
//! A broken file is refused with its path, line and reason; the last good catalog stays in force.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use toml::Spanned;

use super::{
    DEFAULT_INBOUND_PORT, Discovery, Health, Instance, Interner, Node, Nodes, Publisher,
    ServiceName, Snapshot,
};

/// How often the gateway's and the bridge's config files are checked for a change.
pub const FILE_ROUTES_POLL: Duration = Duration::from_millis(250);

/// How often the file's metadata is checked for a change. A `stat` costs microseconds.
pub const DEFAULT_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
#[error("{}:{}: {reason}", path.display(), line.map_or_else(|| "-".to_owned(), |l| l.to_string()))]
pub struct CatalogFileError {
    pub path: PathBuf,
    /// 1-based line of the offending entry, when known.
    pub line: Option<usize>,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    node: Vec<NodeEntry>,
    #[serde(default)]
    service: Vec<ServiceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: Spanned<String>,
    address: Spanned<String>,
    inbound_port: Option<u16>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: Spanned<String>,
    node: Spanned<String>,
    port: u16,
    id: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    #[serde(default = "passing")]
    health: Health,
    weight: Option<Spanned<u32>>,
}

fn passing() -> Health {
    Health::Passing
}

/// Reads and validates a catalog file.
pub fn load(path: &Path) -> Result<Snapshot, CatalogFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| CatalogFileError {
        path: path.to_owned(),
        line: None,
        reason: format!("cannot read: {e}"),
    })?;
    parse(&text, path)
}

/// Parses catalog text; `path` is only used in errors.
pub fn parse(text: &str, path: &Path) -> Result<Snapshot, CatalogFileError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let err = |offset: Option<usize>, reason: String| CatalogFileError {
        path: path.to_owned(),
        line: offset.map(line_of),
        reason,
    };
    let file: CatalogFile = toml::from_str(text)
        .map_err(|e| err(e.span().map(|s| s.start), e.message().trim().to_owned()))?;

    let mut interner = Interner::default();
    let mut nodes = Nodes::new();
    for node in file.node {
        let address = node.address.get_ref().parse::<IpAddr>().map_err(|_| {
            err(
                Some(node.address.span().start),
                format!(
                    "node.address: {:?} is not an IP address",
                    node.address.get_ref()
                ),
            )
        })?;
        let name = interner.node(node.name.get_ref());
        if name.is_empty() {
            return Err(err(Some(node.name.span().start), "node.name: empty".into()));
        }
        let entry = Node {
            name: name.clone(),
            address,
            inbound_port: node.inbound_port.unwrap_or(DEFAULT_INBOUND_PORT),
            meta: interner.meta(node.meta),
        };
        if nodes.insert(name.clone(), entry).is_some() {
            return Err(err(
                Some(node.name.span().start),
                format!("node.name: {name:?} is listed twice"),
            ));
        }
    }

    let mut ids = HashSet::new();
    let mut services: BTreeMap<ServiceName, Vec<Instance>> = BTreeMap::new();
    for svc in file.service {
        let at = Some(svc.name.span().start);
        let service = ServiceName::parse(svc.name.get_ref())
            .map_err(|e| err(at, format!("service.name: {e}")))?;
        let Some(node) = nodes.get(svc.node.get_ref().as_str()) else {
            return Err(err(
                Some(svc.node.span().start),
                format!("service.node: no [[node]] named {:?}", svc.node.get_ref()),
            ));
        };
        let address = match &svc.address {
            None => node.address,
            Some(a) => a.get_ref().parse().map_err(|_| {
                err(
                    Some(a.span().start),
                    format!("service.address: {:?} is not an IP address", a.get_ref()),
                )
            })?,
        };
        if svc.port == 0 {
            return Err(err(at, "service.port: must be 1-65535".into()));
        }
        let weight = match svc.weight {
            None => 1,
            Some(w) if *w.get_ref() >= 1 => *w.get_ref(),
            Some(w) => {
                return Err(err(
                    Some(w.span().start),
                    "service.weight: must be at least 1".into(),
                ));
            }
        };
        let id = match &svc.id {
            Some(id) => id.get_ref().clone(),
            None => format!("{service}-{}-{}", node.name, svc.port),
        };
        if !ids.insert(id.clone()) {
            let at = svc.id.as_ref().map_or(at, |id| Some(id.span().start));
            return Err(err(at, format!("service.id: {id:?} is listed twice")));
        }
        let instance = Instance {
            id,
            service: service.clone(),
            node: node.name.clone(),
            address,
            port: svc.port,
            tags: interner.tags(svc.tags),
            meta: interner.meta(svc.meta),
            health: svc.health,
            weight,
        };
        services.entry(service).or_default().push(instance);
    }
    Ok(Snapshot {
        nodes: nodes.into(),
        services: services
            .into_iter()
            .map(|(service, instances)| (service, instances.into()))
            .collect(),
    })
}

/// Renders a snapshot back into the file format (used by `skyline up` and tests).
pub fn render(snapshot: &Snapshot) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for node in snapshot.nodes.values() {
        let _ = writeln!(
            out,
            "[[node]]\nname = {:?}\naddress = \"{}\"\ninbound_port = {}\n",
            node.name, node.address, node.inbound_port
        );
    }
    for i in snapshot.services.values().flat_map(|i| i.iter()) {
        let _ = writeln!(
            out,
            "[[service]]\nname = \"{}\"\nnode = {:?}\nid = {:?}\naddress = \"{}\"\nport = {}\nhealth = \"{}\"\nweight = {}",
            i.service,
            i.node,
            i.id,
            i.address,
            i.port,
            i.health.as_str(),
            i.weight
        );
        if !i.meta.is_empty() {
            let meta: Vec<String> = i
                .meta
                .iter()
                .map(|(k, v)| format!("{k:?} = {v:?}"))
                .collect();
            let _ = writeln!(out, "meta = {{ {} }}", meta.join(", "));
        }
        if !i.tags.is_empty() {
            let _ = writeln!(out, "tags = {:?}", i.tags);
        }
        out.push('\n');
    }
    out
}

/// Watches a catalog file and publishes it on every change.
#[derive(Clone, Debug)]
pub struct FileDiscovery {
    pub path: PathBuf,
    pub poll: Duration,
}

impl FileDiscovery {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            poll: DEFAULT_POLL,
        }
    }
}

/// What identifies one version of the file without reading it.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

pub(crate) fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// A file watched for changes by polling its [`Stamp`]: the gateway's and the bridge's config
/// files, whose policies apply without a restart.
pub(crate) struct Watched<'a> {
    path: &'a Path,
    seen: Option<Stamp>,
}

impl<'a> Watched<'a> {
    /// Starts from the file as it is now.
    pub(crate) fn new(path: &'a Path) -> Self {
        Watched {
            path,
            seen: stamp(path).ok(),
        }
    }

    /// Waits until the file is there and differs from when last seen, looking every `every`;
    /// `false` once `shutdown` is cancelled.
    pub(crate) async fn changed(&mut self, every: Duration, shutdown: &CancellationToken) -> bool {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(every) => {}
            }
            let now = stamp(self.path).ok();
            if now.is_some() && now != self.seen {
                self.seen = now;
                return true;
            }
        }
    }
}

impl Discovery for FileDiscovery {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn run(self, publisher: Publisher, shutdown: CancellationToken) {
        let mut seen: Option<Stamp> = None;
        let mut last_error: Option<String> = None;
        loop {
            match stamp(&self.path) {
                Ok(now) if seen == Some(now) => {}
                Ok(now) => {
                    seen = Some(now);
                    match load(&self.path) {
                        Ok(snapshot) => {
                            tracing::info!(
                                path = %self.path.display(),
                                services = snapshot.services.len(),
                                instances = snapshot.instance_count(),
                                "catalog loaded"
                            );
                            last_error = None;
                            publisher.publish(snapshot);
                        }
                        Err(e) => report(&publisher, &mut last_error, e.to_string()),
                    }
                }
                Err(e) => {
                    seen = None;
                    let error = format!("{}: cannot read: {e}", self.path.display());
                    report(&publisher, &mut last_error, error);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }
}

/// Logs an error once (not on every poll) and marks the catalog stale.
fn report(publisher: &Publisher, last: &mut Option<String>, error: String) {
    if last.as_deref() != Some(error.as_str()) {
        tracing::error!(%error, "catalog refused; keeping the last good one");
        publisher.fail(&error);
        *last = Some(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const GOOD: &str = r#"
[[node]]
name = "n1"
address = "127.0.0.2"

[[node]]
name = "n2"
address = "127.0.0.3"
inbound_port = 6041

[[service]]
name = "giphy"
node = "n1"
port = 8080
meta = { platform = "mesos" }

[[service]]
name = "giphy"
node = "n2"
port = 8081
health = "critical"
weight = 3
"#;

    fn parse_err(text: &str) -> CatalogFileError {
        match parse(text, Path::new("c.toml")) {
            Ok(_) => panic!("expected an error for {text}"),
            Err(e) => e,
        }
    }

    const NODE_A: &str = "[[node]]\nname = \"a\"\naddress = \"127.0.0.1\"\n";

    #[test]
    fn parses_nodes_and_instances_with_defaults() {
        let snap = parse(GOOD, Path::new("c.toml")).unwrap();
        assert_eq!(snap.nodes["n2"].inbound_port, 6041);
        assert_eq!(snap.nodes["n1"].inbound_port, DEFAULT_INBOUND_PORT);
        let giphy = &snap.services[&ServiceName::parse("giphy").unwrap()];
        assert_eq!(giphy.len(), 2);
        assert_eq!(giphy[0].address, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(giphy[0].id, "giphy-n1-8080");
        assert_eq!(giphy[0].health, Health::Passing);
        assert_eq!(giphy[0].meta["platform"], "mesos");
        assert_eq!(giphy[1].health, Health::Critical);
        assert_eq!(giphy[1].weight, 3);
    }

    #[test]
    fn render_round_trips() {
        let snap = parse(GOOD, Path::new("c.toml")).unwrap();
        assert_eq!(parse(&render(&snap), Path::new("r.toml")).unwrap(), snap);
    }

    #[test]
    fn syntax_errors_name_path_and_line() {
        let e = parse_err("[[node]]\nname = \"a\"\naddress = \n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().starts_with("c.toml:3: "), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_key_and_line() {
        let e = parse_err("[[node]]\nname = \"a\"\naddress = \"nope\"\n");
        assert_eq!(e.line, Some(3));
        assert!(e.reason.contains("node.address"), "{e}");

        let e = parse_err("[[service]]\nname = \"x\"\nnode = \"ghost\"\nport = 1\n");
        assert_eq!(e.line, Some(3));
        assert!(e.reason.contains("no [[node]] named \"ghost\""), "{e}");

        let e = parse_err(&format!(
            "{NODE_A}[[service]]\nname = \"Bad!\"\nnode = \"a\"\nport = 1\n"
        ));
        assert_eq!(e.line, Some(5));
        assert!(e.reason.contains("service.name"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = parse_err(&format!("{NODE_A}adress = \"x\"\n"));
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.reason.contains("adress"), "{e}");
    }

    #[test]
    fn duplicate_ids_and_nodes_are_refused() {
        let e = parse_err(&format!("{NODE_A}{NODE_A}"));
        assert!(e.reason.contains("twice"), "{e}");
        let svc = "[[service]]\nname = \"s\"\nnode = \"a\"\nport = 1\n";
        let e = parse_err(&format!("{NODE_A}{svc}{svc}"));
        assert!(e.reason.contains("service.id"), "{e}");
    }

    /// Follows the catalog file `path`, polled every 5 ms: its catalog, the shutdown, the task.
    fn follow(
        path: &Path,
    ) -> (
        super::super::Subscriber,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (publisher, rx) = super::super::channel();
        let shutdown = CancellationToken::new();
        let discovery = FileDiscovery {
            path: path.to_owned(),
            poll: Duration::from_millis(5),
        };
        let task = tokio::spawn(discovery.run(publisher, shutdown.clone()));
        (rx, shutdown, task)
    }

    #[tokio::test]
    async fn a_reload_keeps_the_instances_of_services_it_did_not_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.toml");
        let other = "[[service]]\nname = \"db\"\nnode = \"n1\"\nport = 5432\n";
        std::fs::write(&path, format!("{GOOD}{other}")).unwrap();
        let (mut rx, shutdown, task) = follow(&path);
        let first = rx
            .wait_for(|s| s.snapshot.is_some())
            .await
            .unwrap()
            .snapshot
            .clone()
            .unwrap();
        let changed = GOOD.replace("port = 8081", "port = 8082");
        std::fs::write(&path, format!("{changed}{other}")).unwrap();
        let second = rx
            .wait_for(|s| {
                s.snapshot
                    .as_ref()
                    .is_some_and(|s| s.services["giphy"][1].port == 8082)
            })
            .await
            .unwrap()
            .snapshot
            .clone()
            .unwrap();
        assert!(Arc::ptr_eq(&first.services["db"], &second.services["db"]));
        assert!(Arc::ptr_eq(&first.nodes, &second.nodes));
        assert!(!Arc::ptr_eq(
            &first.services["giphy"],
            &second.services["giphy"]
        ));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn keeps_the_last_good_catalog_when_the_file_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.toml");
        std::fs::write(&path, GOOD).unwrap();
        let (mut rx, shutdown, task) = follow(&path);
        rx.wait_for(|s| s.snapshot.is_some()).await.unwrap();
        let good = rx.borrow().snapshot.clone().unwrap();

        std::fs::write(&path, "[[node]]\nname = 1\n").unwrap();
        let state = rx.wait_for(|s| s.error.is_some()).await.unwrap().clone();
        assert_eq!(
            state.snapshot.as_deref(),
            Some(&*good),
            "last good catalog must stay"
        );
        assert!(state.error.unwrap().contains("catalog.toml:2"));

        std::fs::write(&path, "").unwrap();
        let state = rx.wait_for(|s| s.error.is_none()).await.unwrap().clone();
        assert_eq!(state.snapshot.unwrap().services.len(), 0);
        shutdown.cancel();
        task.await.unwrap();
    }
}
