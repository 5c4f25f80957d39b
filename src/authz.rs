//! Authorization: which service may call which, enforced on the destination's side by the
//! inbound proxy of the node that runs the called instance, by the gateway, and by the bridge
//! for Kubernetes Services (each with [`enforce`] or [`Compiled::check`], over the same
//! rules); and the calling service's identity, established by the caller's agent and asserted
//! over the mTLS link (see docs/security.md).
//!
//! - Identity. The outbound proxy names the calling service from a per-service credential
//!   (header `x-skyline-caller-token`, compared in constant time with the token files of
//!   `[[authz.caller]]`), else from the client's source address when it is the address of
//!   exactly one routable local instance with an address of its own (not the node's). It
//!   always removes the `x-skyline-caller*` headers the application sent, and on mTLS hops
//!   sends `x-skyline-caller: <service>`. A mesh listener believes `x-skyline-caller` only
//!   from a peer that presented a mesh certificate; from any other peer it is removed.
//! - Policies. `[authz]` in the agent's file and `skyline/policies/<name>` in the registry KV
//!   (JSON or TOML, the same shape), both reloaded without a restart. Rules match the caller
//!   (`from`), the called service (`to`), optionally methods and a path prefix (whole
//!   segments); a matching `deny` wins over any `allow` (deny-overrides), then a matching
//!   `allow`, then the default (`allow`, or `deny` when the file or any KV entry says so).
//! - Paths are normalised ([`path`]) before matching, and the normalised path is the one
//!   forwarded. With no rule and default `allow` nothing is checked or rewritten.

pub mod config;
pub mod kv;
pub mod path;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::HeaderName;
use serde::Deserialize;

use crate::catalog::ServiceName;
use crate::config::token::Token;
use crate::routing::Table;

/// The caller's service, as its agent asserts it over an mTLS hop.
pub static X_SKYLINE_CALLER: HeaderName = HeaderName::from_static("x-skyline-caller");
/// A per-service credential an application presents to its outbound proxy; never forwarded.
pub static X_SKYLINE_CALLER_TOKEN: HeaderName = HeaderName::from_static("x-skyline-caller-token");
/// The KV prefix of authorization policies: `skyline/policies/<name>`.
pub const KV_POLICIES_PREFIX: &str = "skyline/policies/";

// === What users write ===

/// `[authz]` as written in TOML, or a KV entry as JSON or TOML (without `caller`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    /// `"allow"` or `"deny"`: what happens to a request no rule matches [default: allow].
    pub default: Option<String>,
    /// The rules; a matching `deny` wins over a matching `allow`.
    #[serde(default)]
    pub rule: Vec<RuleConfig>,
    /// Per-service credentials (file only).
    #[serde(default)]
    pub caller: Vec<CallerConfig>,
}

/// `[authz]` of a gateway's or bridge's file: the agent's keys without `caller` (these roles
/// name no caller; they check the one a mesh peer asserts).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `"allow"` or `"deny"`: what happens to a request no rule matches [default: allow].
    pub default: Option<String>,
    /// The rules; a matching `deny` wins over a matching `allow`.
    #[serde(default)]
    pub rule: Vec<RuleConfig>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub from: Option<String>,
    pub to: Option<String>,
    pub methods: Option<Vec<String>>,
    pub path_prefix: Option<String>,
    pub action: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    pub service: Option<String>,
    pub token_file: Option<std::path::PathBuf>,
}

// === Validated ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            other => Err(format!("{other:?} is not \"allow\" or \"deny\"")),
        }
    }
}

/// A service name, or `*` (any, including an unknown caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    Any,
    Service(ServiceName),
}

impl Party {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Party::Any);
        }
        ServiceName::parse(text)
            .map(Party::Service)
            .map_err(|_| format!("{text:?} is not a service name or *"))
    }

    fn matches(&self, name: Option<&str>) -> bool {
        match self {
            Party::Any => true,
            Party::Service(s) => name == Some(s.as_str()),
        }
    }
}

/// One validated rule; `id` names it in the audit log (`file:rule[0]`, `kv:<name>:rule[1]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub from: Party,
    pub to: Party,
    pub methods: Option<Vec<String>>,
    /// Normalised, without a trailing `/` (the root is "").
    pub path_prefix: Option<String>,
    pub action: Action,
}

impl Rule {
    fn matches(&self, caller: Option<&str>, to: &str, method: &str, path: &str) -> bool {
        self.to.matches(Some(to))
            && self.from.matches(caller)
            && self
                .methods
                .as_ref()
                .is_none_or(|m| m.iter().any(|m| m == method))
            && self.path_prefix.as_deref().is_none_or(|p| {
                p.is_empty()
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    }
}

/// A validated policy (the file's, or one KV entry's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `None`: the entry does not say (allow unless another says deny).
    pub default: Option<Action>,
    pub rules: Vec<Rule>,
}

/// A per-service credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub service: ServiceName,
    pub token: Token,
}

/// The validated `[authz]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub policy: Policy,
    pub callers: Vec<Caller>,
}

impl Policy {
    /// Validates a policy; errors name the key (`rule[1].from`) and the reason. `source`
    /// prefixes the rules' ids.
    pub fn from_config(config: &AuthzConfig, source: &str) -> Result<Self, (String, String)> {
        let default = config
            .default
            .as_deref()
            .map(Action::parse)
            .transpose()
            .map_err(|e| ("default".to_owned(), e))?;
        let mut rules = Vec::with_capacity(config.rule.len());
        for (i, r) in config.rule.iter().enumerate() {
            let key = |k: &str| format!("rule[{i}].{k}");
            let required = |k: &str, v: &Option<String>| {
                v.clone().ok_or_else(|| (key(k), "required".to_owned()))
            };
            let from = Party::parse(&required("from", &r.from)?).map_err(|e| (key("from"), e))?;
            let to = Party::parse(&required("to", &r.to)?).map_err(|e| (key("to"), e))?;
            let action =
                Action::parse(&required("action", &r.action)?).map_err(|e| (key("action"), e))?;
            let methods = match &r.methods {
                None => None,
                Some(list) => {
                    for m in list {
                        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                            return Err((
                                key("methods"),
                                format!("{m:?} is not a method in upper case, such as \"GET\""),
                            ));
                        }
                    }
                    Some(list.clone())
                }
            };
            let path_prefix = match &r.path_prefix {
                None => None,
                Some(p) => {
                    let normal =
                        path::normalise(p).map_err(|e| (key("path_prefix"), e.to_string()))?;
                    if !p.starts_with('/') || *normal != **p {
                        return Err((
                            key("path_prefix"),
                            format!(
                                "{p:?} is not a normalised path starting with / (it would be {normal:?})"
                            ),
                        ));
                    }
                    Some(p.trim_end_matches('/').to_owned())
                }
            };
            rules.push(Rule {
                id: format!("{source}rule[{i}]"),
                from,
                to,
                methods,
                path_prefix,
                action,
            });
        }
        Ok(Policy { default, rules })
    }

    /// A KV entry's text (JSON, or TOML) as a policy; `name` is the entry's key after the
    /// prefix. Errors give the reason.
    pub fn parse_kv(name: &str, text: &str) -> Result<Self, String> {
        let config: AuthzConfig = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            toml::from_str(text).map_err(|e| e.message().to_owned())?
        };
        if !config.caller.is_empty() {
            return Err("caller credentials belong in the agent's file, not in the KV".into());
        }
        Self::from_config(&config, &format!("kv:{name}:"))
            .map_err(|(key, reason)| format!("{key}: {reason}"))
    }
}

// === Authz ===

/// Why [`Compiled::check`] refuses a request: a policy denies it (`forbidden`, 403), or its
/// path does not normalise (`bad-request`, 400, with the reason). The proxies answer it as a
/// mesh error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Forbidden,
    BadPath(&'static str),
}

/// The policies in force: the file's and the KV's, combined. Cheap to clone.
#[derive(Clone, Default)]
pub struct Authz {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    sources: Mutex<Sources>,
    compiled: ArcSwap<Compiled>,
}

#[derive(Default)]
struct Sources {
    file: Settings,
    kv: BTreeMap<String, Policy>,
}

/// The combined policies, as requests read them.
#[derive(Debug, Default)]
pub struct Compiled {
    /// No rule and default allow: nothing to check.
    pub open: bool,
    pub default: Option<Action>,
    pub rules: Vec<Rule>,
    pub callers: Vec<Caller>,
}

impl std::fmt::Debug for Authz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authz")
            .field("rules", &self.load().rules.len())
            .finish()
    }
}

impl Authz {
    pub fn new(file: Settings) -> Self {
        let authz = Self::default();
        authz.set_file(file);
        authz
    }

    /// The policies in force now.
    pub fn load(&self) -> arc_swap::Guard<Arc<Compiled>> {
        self.inner.compiled.load()
    }

    /// Whether `settings` are the file's policies in force.
    pub fn file_is(&self, settings: &Settings) -> bool {
        self.lock().file == *settings
    }

    /// Puts the file's policies and callers in force (a reload).
    pub fn set_file(&self, file: Settings) {
        let mut sources = self.lock();
        sources.file = file;
        self.compile(&sources);
    }

    /// Puts the KV's policies in force.
    pub fn set_kv(&self, kv: BTreeMap<String, Policy>) {
        let mut sources = self.lock();
        sources.kv = kv;
        self.compile(&sources);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.inner
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn compile(&self, sources: &Sources) {
        let policies = std::iter::once(&sources.file.policy).chain(sources.kv.values());
        let mut default = None;
        let mut rules = Vec::new();
        for p in policies {
            default = match (default, p.default) {
                (Some(Action::Deny), _) | (_, Some(Action::Deny)) => Some(Action::Deny),
                (d, None) => d,
                (_, Some(Action::Allow)) => Some(Action::Allow),
            };
            rules.extend(p.rules.iter().cloned());
        }
        let open = rules.is_empty() && default != Some(Action::Deny);
        self.inner.compiled.store(Arc::new(Compiled {
            open,
            default,
            rules,
            callers: sources.file.callers.clone(),
        }));
    }
}

impl Compiled {
    /// `Err(rule id)` when a request is denied: a matching deny rule, or the default.
    pub fn decide(
        &self,
        caller: Option<&str>,
        to: &str,
        method: &str,
        path: &str,
    ) -> Result<(), &str> {
        let mut allowed = false;
        for rule in &self.rules {
            if rule.matches(caller, to, method, path) {
                match rule.action {
                    Action::Deny => return Err(&rule.id),
                    Action::Allow => allowed = true,
                }
            }
        }
        if allowed || self.default != Some(Action::Deny) {
            Ok(())
        } else {
            Err("default")
        }
    }

    /// Checks a request to `service` for `path` (the part after `/service/<name>`, possibly
    /// empty): `Ok` with the normalised path to forward, or the mesh error to answer (400 for
    /// a path that does not normalise, 403 denied, with an audit line; see [`Refused`]). Call only when not
    /// [`open`](Self::open).
    pub fn check<'p>(
        &self,
        caller: Option<&str>,
        service: &str,
        method: &str,
        path: &'p str,
    ) -> Result<Cow<'p, str>, Refused> {
        let normal = path::normalise(path).map_err(|e| Refused::BadPath(e.detail()))?;
        match self.decide(caller, service, method, &normal) {
            Ok(()) => Ok(normal),
            Err(rule) => {
                tracing::info!(
                    target: "skyline::audit",
                    caller = caller.unwrap_or("none"),
                    destination = service,
                    method,
                    path = %normal,
                    rule,
                    "request denied"
                );
                Err(Refused::Forbidden)
            }
        }
    }

    /// The service an application's credential names: the value of `x-skyline-caller-token`
    /// compared in constant time with every caller's token.
    pub fn caller_by_token(&self, presented: &[u8]) -> Option<&ServiceName> {
        let mut found = None;
        for c in &self.callers {
            if c.token.matches(presented) && found.is_none() {
                found = Some(&c.service);
            }
        }
        found
    }
}

/// The service of the one routable local instance at `ip`, when that is an address of its
/// own (not `node`'s) and no other local service has it.
pub fn caller_by_address(table: &Table, node: IpAddr, ip: IpAddr) -> Option<ServiceName> {
    if ip == node {
        return None;
    }
    let mut found: Option<&ServiceName> = None;
    for (service, route) in &table.inbound {
        if route.endpoints.iter().any(|e| e.addr.ip() == ip) {
            if found.is_some_and(|f| f != service) {
                return None;
            }
            found = Some(service);
        }
    }
    found.cloned()
}

/// The caller a mesh listener believes: `x-skyline-caller` from a peer with a mesh
/// certificate, when it is a service name.
pub fn asserted_caller(trusted: bool, value: Option<&[u8]>) -> Option<&str> {
    let value = std::str::from_utf8(value?).ok()?;
    (trusted && ServiceName::is_valid(value)).then_some(value)
}

impl From<Refused> for crate::error::MeshError {
    fn from(refused: crate::authz::Refused) -> Self {
        match refused {
            Refused::Forbidden => crate::error::MeshError::Forbidden,
            Refused::BadPath(detail) => crate::error::MeshError::bad_request(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str) -> Policy {
        let config: AuthzConfig = toml::from_str(toml_text).unwrap();
        Policy::from_config(&config, "file:").unwrap()
    }

    fn compiled(p: Policy) -> Arc<Compiled> {
        let authz = Authz::new(Settings {
            policy: p,
            callers: vec![],
        });
        authz.load().clone()
    }

    #[test]
    fn deny_overrides_allow_and_the_default_decides_the_rest() {
        let c = compiled(policy(
            r#"
            default = "deny"
            [[rule]]
            from = "web"
            to = "api"
            action = "allow"
            [[rule]]
            from = "*"
            to = "api"
            path_prefix = "/admin"
            action = "deny"
            [[rule]]
            from = "ops"
            to = "api"
            methods = ["GET"]
            action = "allow"
            "#,
        ));
        assert!(!c.open);
        assert_eq!(c.decide(Some("web"), "api", "GET", "/x"), Ok(()));
        assert_eq!(
            c.decide(Some("web"), "api", "GET", "/admin"),
            Err("file:rule[1]")
        );
        assert_eq!(
            c.decide(Some("web"), "api", "GET", "/admin/x"),
            Err("file:rule[1]")
        );
        // Whole segments: /administrator is not under /admin.
        assert_eq!(
            c.decide(Some("web"), "api", "GET", "/administrator"),
            Ok(())
        );
        assert_eq!(c.decide(Some("ops"), "api", "GET", "/x"), Ok(()));
        assert_eq!(c.decide(Some("ops"), "api", "POST", "/x"), Err("default"));
        assert_eq!(c.decide(None, "api", "GET", "/x"), Err("default"));
        assert_eq!(c.decide(Some("web"), "db", "GET", "/x"), Err("default"));
    }

    #[test]
    fn no_policy_is_open_and_a_kv_entry_can_close_it() {
        let authz = Authz::new(Settings::default());
        assert!(authz.load().open);
        let kv = Policy::parse_kv("lock", r#"{"default":"deny"}"#).unwrap();
        authz.set_kv(BTreeMap::from([("lock".to_owned(), kv)]));
        assert!(!authz.load().open);
        assert_eq!(
            authz.load().decide(Some("a"), "b", "GET", "/"),
            Err("default")
        );
    }

    #[test]
    fn checked_paths_are_normalised_before_matching() {
        let c = compiled(policy(
            "[[rule]]\nfrom = \"*\"\nto = \"api\"\npath_prefix = \"/admin\"\naction = \"deny\"\n",
        ));
        for p in ["/admin", "/%61dmin", "//admin", "/x/../admin", "/admin;x=1"] {
            assert!(
                matches!(
                    c.check(Some("web"), "api", "GET", p),
                    Err(Refused::Forbidden)
                ),
                "{p}"
            );
        }
        assert_eq!(
            c.check(Some("web"), "api", "GET", "//a/./b").unwrap(),
            "/a/b"
        );
        assert!(matches!(
            c.check(Some("web"), "api", "GET", "/../x"),
            Err(Refused::BadPath(_))
        ));
    }

    #[test]
    fn bad_policies_are_refused_with_key_and_reason() {
        for (text, key) in [
            (
                r#"{"rule":[{"from":"Web","to":"a","action":"allow"}]}"#,
                "rule[0].from",
            ),
            (r#"{"rule":[{"from":"a","action":"allow"}]}"#, "rule[0].to"),
            (
                r#"{"rule":[{"from":"a","to":"b","action":"maybe"}]}"#,
                "rule[0].action",
            ),
            (
                r#"{"rule":[{"from":"a","to":"b","action":"deny","path_prefix":"/x/../y"}]}"#,
                "rule[0].path_prefix",
            ),
            (
                r#"{"rule":[{"from":"a","to":"b","action":"deny","methods":["get"]}]}"#,
                "rule[0].methods",
            ),
            (r#"{"default":"no"}"#, "default"),
        ] {
            let e = Policy::parse_kv("x", text).unwrap_err();
            assert!(e.starts_with(key), "{text}: {e}");
        }
        assert!(Policy::parse_kv("x", r#"{"rule":[],"extra":1}"#).is_err());
        assert!(Policy::parse_kv("x", "not json").is_err());
    }

    #[test]
    fn an_address_names_the_one_local_service_whose_own_address_it_is() {
        let text = r#"
[[node]]
name = "a"
address = "10.0.0.1"
[[service]]
name = "web"
node = "a"
address = "10.0.0.5"
port = 80
[[service]]
name = "web"
node = "a"
address = "10.0.0.5"
port = 81
[[service]]
name = "api"
node = "a"
address = "10.0.0.6"
port = 80
[[service]]
name = "db"
node = "a"
address = "10.0.0.6"
port = 81
[[service]]
name = "cache"
node = "a"
port = 82
"#;
        let snapshot = crate::catalog::file::parse(text, std::path::Path::new("t.toml")).unwrap();
        let table = Table::build(&snapshot, "a", crate::routing::Policy::default());
        let node: IpAddr = "10.0.0.1".parse().unwrap();
        let at = |ip: &str| caller_by_address(&table, node, ip.parse().unwrap());
        assert_eq!(
            at("10.0.0.5").map(|s| s.as_str().to_owned()).as_deref(),
            Some("web")
        );
        // Two services on one address, or the node's own address: nobody in particular.
        assert_eq!(at("10.0.0.6"), None);
        assert_eq!(at("10.0.0.1"), None);
        assert_eq!(at("10.0.0.9"), None);
    }

    #[test]
    fn tokens_name_their_service_and_forged_assertions_are_not_believed() {
        let c = Compiled {
            callers: vec![Caller {
                service: ServiceName::parse("web").unwrap(),
                token: Token::new("s3cret").unwrap(),
            }],
            ..Compiled::default()
        };
        assert_eq!(
            c.caller_by_token(b"s3cret").map(|s| s.as_str()),
            Some("web")
        );
        assert_eq!(c.caller_by_token(b"s3cre"), None);
        assert_eq!(asserted_caller(true, Some(b"web")), Some("web"));
        assert_eq!(asserted_caller(false, Some(b"web")), None);
        assert_eq!(asserted_caller(true, Some(b"Not A Name")), None);
    }
}
