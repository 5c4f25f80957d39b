//! `[tls]` of every role's file, validated into mesh TLS [`Settings`].

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::config::reference::{FileKey, Section, Value};
use crate::config::{ConfigError, Source, file_only, relative_to};

/// The keys of `[tls]` (every role): mesh TLS between the proxies (see `tls`).
pub const TLS_KEYS: &[FileKey] = &[
    file_only(
        "mode",
        "`off`, `permissive` or `strict`",
        Value::Default("\"off\""),
        "mTLS between the proxies. `strict`: listeners of other proxies (inbound, gateway, bridge host port) take only TLS with a certificate of the mesh CA; `permissive` (for a rollout): they also take plain connections, counted in `skyline_mesh_connections_total`. With either, this proxy dials other proxies over mTLS. Needs a restart.",
    ),
    file_only(
        "ca",
        "path",
        Value::Example {
            toml: "\"/etc/skyline/tls/ca.crt\"",
            default: "required unless `mode` is `off`",
        },
        "The mesh CA's certificate (`skyline ca init`): peers must present a certificate it issued. Relative to the config file.",
    ),
    file_only(
        "cert",
        "path",
        Value::Example {
            toml: "\"/etc/skyline/tls/node.crt\"",
            default: "required unless `mode` is `off`",
        },
        "This proxy's certificate (`skyline ca issue`). Read again every 2 s: a changed certificate is used for new connections, open ones keep theirs.",
    ),
    file_only(
        "key",
        "path",
        Value::Example {
            toml: "\"/etc/skyline/tls/node.key\"",
            default: "required unless `mode` is `off`",
        },
        "The certificate's private key (PEM), reloaded with it.",
    ),
];

/// The `[tls]` section of every role's file.
pub const TLS_SECTION: Section = Section {
    table: "tls",
    sample: "",
    doc: "Mesh TLS: mTLS between the proxies with certificates of the mesh CA. Applications keep speaking plain HTTP to the outbound listener, and instances are called over plain HTTP.",
    defaults_from: None,
    keys: TLS_KEYS,
};

/// `[tls]` as users write it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    mode: Option<Spanned<String>>,
    ca: Option<Spanned<PathBuf>>,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
}

/// The validated `[tls]` section: `None` when mesh TLS is off.
pub(crate) fn mesh_tls(
    src: &Source,
    section: &TlsSection,
) -> Result<Option<crate::tls::Settings>, ConfigError> {
    let mode = match &section.mode {
        None => crate::tls::Mode::Off,
        Some(m) => m
            .get_ref()
            .parse()
            .map_err(|e: String| src.at(Some(m.span().start), "tls.mode", e))?,
    };
    if mode == crate::tls::Mode::Off {
        return Ok(None);
    }
    let at = section.mode.as_ref().map(|m| m.span().start);
    let path = |key: &str, field: &Option<Spanned<PathBuf>>| match field {
        Some(p) => Ok(relative_to(src, p.get_ref().clone())),
        None => Err(src.at(
            at,
            key,
            "required when tls.mode is \"permissive\" or \"strict\"",
        )),
    };
    Ok(Some(crate::tls::Settings {
        mode,
        ca: path("tls.ca", &section.ca)?,
        cert: path("tls.cert", &section.cert)?,
        key: path("tls.key", &section.key)?,
    }))
}
