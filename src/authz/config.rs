//! `[authz]` of every role's file (the agent's with `[[authz.caller]]`), validated into
//! authorization [`Settings`].

use crate::catalog::ServiceName;
use crate::config::reference::{Section, Value};
use crate::config::{ConfigError, Source, file_only, relative_to, token};

/// The validated `[authz]` section: the file's policy and the callers' credentials.
pub(crate) fn authz_settings(
    src: &Source,
    section: &crate::authz::AuthzConfig,
) -> Result<crate::authz::Settings, ConfigError> {
    let policy = crate::authz::Policy::from_config(section, "file:")
        .map_err(|(key, reason)| src.at(None, &format!("authz.{key}"), reason))?;
    let mut callers = Vec::with_capacity(section.caller.len());
    for (i, caller) in section.caller.iter().enumerate() {
        let key = |k: &str| format!("authz.caller[{i}].{k}");
        let service = caller
            .service
            .as_deref()
            .ok_or_else(|| src.at(None, &key("service"), "required"))?;
        let service = ServiceName::parse(service)
            .map_err(|e| src.at(None, &key("service"), e.to_string()))?;
        let path = caller
            .token_file
            .clone()
            .ok_or_else(|| src.at(None, &key("token_file"), "required"))?;
        let token = token::Token::read(&relative_to(src, path))
            .map_err(|reason| src.at(None, &key("token_file"), reason))?;
        callers.push(crate::authz::Caller { service, token });
    }
    Ok(crate::authz::Settings { policy, callers })
}

/// The `[authz]` of a gateway's or bridge's file: the agent's keys, without `caller` (refused
/// when parsed: these roles name no caller, they check the one a mesh peer asserts).
pub(crate) fn authz_policy(
    src: &Source,
    section: &crate::authz::PolicyConfig,
) -> Result<crate::authz::Settings, ConfigError> {
    let section = crate::authz::AuthzConfig {
        default: section.default.clone(),
        rule: section.rule.clone(),
        caller: Vec::new(),
    };
    authz_settings(src, &section)
}

/// The `[authz]` sections of the agent's file (see `crate::authz`).
pub const AUTHZ_SECTION: Section = Section {
    table: "authz",
    sample: "",
    doc: "Authorization policies, enforced by the inbound proxy of the node that runs the called instance, by the gateway and by the bridge (the same rules in each; `caller` is the agent's only); more come from the registry KV under `skyline/policies/`. The agent re-reads them on SIGHUP, the gateway and the bridge within 250 ms of a change to their file. See docs/security.md.",
    defaults_from: None,
    keys: &[file_only(
        "default",
        "`allow` or `deny`",
        Value::Example {
            toml: "\"deny\"",
            default: "`allow`",
        },
        "What happens to a request no rule matches. `deny` here or in any KV policy makes the mesh deny by default.",
    )],
};

/// `[[authz.rule]]`.
pub const AUTHZ_RULE_SECTION: Section = Section {
    table: "authz.rule[]",
    sample: "",
    doc: "A rule. A matching `deny` wins over any matching `allow`; a request no rule matches gets the default. Paths are normalised before matching, and the normalised path is the one the instance receives.",
    defaults_from: None,
    keys: &[
        file_only(
            "from",
            "service name or `*`",
            Value::Example {
                toml: "\"web\"",
                default: "required",
            },
            "The calling service, as its agent asserts it over mTLS; `*` is any caller, an unknown one too.",
        ),
        file_only(
            "to",
            "service name or `*`",
            Value::Example {
                toml: "\"api\"",
                default: "required",
            },
            "The called service.",
        ),
        file_only(
            "methods",
            "array of methods",
            Value::Example {
                toml: "[\"GET\", \"HEAD\"]",
                default: "every method",
            },
            "The methods the rule applies to, in upper case.",
        ),
        file_only(
            "path_prefix",
            "normalised path",
            Value::Example {
                toml: "\"/admin\"",
                default: "every path",
            },
            "The paths (after `/service/<name>`) the rule applies to, by whole segments: `/admin` covers `/admin` and `/admin/x`, not `/administrator`.",
        ),
        file_only(
            "action",
            "`allow` or `deny`",
            Value::Example {
                toml: "\"allow\"",
                default: "required",
            },
            "What the rule does to a request it matches: `deny` answers 403 `forbidden` (gRPC: PERMISSION_DENIED) and writes an audit line (target `skyline::audit`).",
        ),
    ],
};

/// `[[authz.caller]]`.
pub const AUTHZ_CALLER_SECTION: Section = Section {
    table: "authz.caller[]",
    sample: "",
    doc: "A per-service credential: an application that sends `x-skyline-caller-token: <token>` to the outbound proxy is that service. Re-read on SIGHUP.",
    defaults_from: None,
    keys: &[
        file_only(
            "service",
            "service name",
            Value::Example {
                toml: "\"web\"",
                default: "required",
            },
            "The service the token names.",
        ),
        file_only(
            "token_file",
            "path",
            Value::Example {
                toml: "\"/etc/skyline/callers/web.token\"",
                default: "required",
            },
            "A file holding the token (printable ASCII, up to 4096 bytes). Relative to the config file.",
        ),
    ],
};
