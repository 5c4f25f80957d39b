//! Consul's rules for decoding a JSON request body, so that a body Consul accepts is accepted
//! here with the same meaning, and a body it refuses is refused with its error text.
//!
//! Consul (1.7 and later) decodes bodies with Go's `encoding/json` and `DisallowUnknownFields`
//! (`agent/http.go` `decodeBody`, `lib.DecodeJSON`), plus `UnmarshalJSON` methods on a few
//! structs (`agent/structs`: `ServiceDefinition`, `CheckType`, `CheckDefinition`,
//! `HealthCheckDefinition`). Together:
//! - a key sets the field of the same name, else the field whose name equals it under Go's
//!   case folding: `name`, `NAME` and `Name` all set `Name`. Keys apply in document order, so of
//!   two keys naming one field the last wins;
//! - some structs also take snake_case aliases (`enable_tag_override`, `tagged_addresses`,
//!   `deregister_critical_service_after`, `service_id`, `args`, ...), also matched ignoring
//!   case; the field's own name wins over its alias;
//! - an unknown key is refused (`json: unknown field "x"`) in a strict struct (all but a
//!   catalog check's `Definition`, which ignores unknown keys);
//! - `null` leaves a field unset;
//! - a duration field takes a Go duration string (`"10s"`, `"1m30s"`, `"1.5h"`, `"500ms"`,
//!   `"-1s"`, `"0"`, see [`parse_go_duration`]) or a number of nanoseconds; any other JSON type
//!   is ignored, as Consul's `UnmarshalJSON` type switch ignores it;
//! - a value of the wrong type is refused with Go's text (`json: cannot unmarshal string into Go
//!   struct field ServiceDefinition.Port of type int`); an integer field takes integer literals
//!   only (`80`, not `80.0` or `8e1`);
//! - an empty body is `EOF`.
//!
//! One difference: Go's decoder reads the first JSON value and ignores what follows it; here
//! anything but whitespace after the value is refused as malformed.
//!
//! The entry point is [`decode`]: a body and the [`Shape`] of the Consul struct it encodes give a
//! typed value. [`normalize`] gives the intermediate [`Value`]: an object with canonical keys
//! only (aliases resolved, `null`s dropped) and durations as integer nanoseconds, which the
//! typed structs read with exact PascalCase names (use [`GoDuration`] for durations). Shapes of
//! Consul's structs are the `pub static`s below; a new endpoint declares its own.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

/// A body Consul would refuse. `Display` is the text Consul puts after `Request decode failed: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// The fields of one Consul struct as its JSON decoder sees them.
#[derive(Debug)]
pub struct Shape {
    /// The Go type's name, used in error texts (`ServiceDefinition`).
    pub name: &'static str,
    /// Unknown keys are refused (`DisallowUnknownFields`); otherwise ignored.
    pub strict: bool,
    pub fields: &'static [Field],
}

/// One field: its canonical (Go) name, its type and its snake_case aliases.
#[derive(Debug)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    /// Other keys that set this field when the field's own name is absent.
    pub aliases: &'static [&'static str],
}

/// What a field's value must be.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A string.
    Str,
    /// An integer literal that fits an `i64`.
    Int,
    /// `true` or `false`.
    Bool,
    /// A Go duration: a string or a number of nanoseconds; becomes integer nanoseconds.
    Duration,
    /// An array of strings (`null` elements become `""`).
    Strings,
    /// An object of strings (`null` values become `""`).
    StrMap,
    /// An object of the given shape.
    Obj(&'static Shape),
    /// An array of objects of the given shape.
    Objs(&'static Shape),
    /// An object whose values have the given shape.
    ObjMap(&'static Shape),
    /// Anything; passed through unchecked (fields Consul knows and this registry ignores).
    Any,
    /// A field with its own rule: gets the raw value and the field's path for error texts.
    Custom(fn(&Json, &str) -> Result<Option<Value>, DecodeError>),
}

const fn f(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        aliases: &[],
    }
}

const fn a(name: &'static str, kind: Kind, aliases: &'static [&'static str]) -> Field {
    Field {
        name,
        kind,
        aliases,
    }
}

// === Consul's shapes ===

/// `structs.Weights`.
pub static WEIGHTS: Shape = Shape {
    name: "Weights",
    strict: true,
    fields: &[f("Passing", Kind::Int), f("Warning", Kind::Int)],
};

/// `structs.ServiceAddress` (values of `TaggedAddresses` on a service).
pub static SERVICE_ADDRESS: Shape = Shape {
    name: "ServiceAddress",
    strict: true,
    fields: &[f("Address", Kind::Str), f("Port", Kind::Int)],
};

/// `structs.CheckType`: a check inside `PUT /v1/agent/service/register`.
/// Its `ServiceID` is accepted and ignored, as Consul does.
pub static CHECK_TYPE: Shape = Shape {
    name: "CheckType",
    strict: true,
    fields: &[
        f("CheckID", Kind::Str),
        f("Name", Kind::Str),
        f("Status", Kind::Str),
        f("Notes", Kind::Str),
        a("ScriptArgs", Kind::Strings, &["args", "script_args"]),
        f("HTTP", Kind::Str),
        f("H2PING", Kind::Str),
        a("H2PingUseTLS", Kind::Bool, &["h2ping_use_tls"]),
        f("Header", Kind::Any),
        f("Method", Kind::Str),
        f("Body", Kind::Str),
        f("DisableRedirects", Kind::Bool),
        f("TCP", Kind::Str),
        f("UDP", Kind::Str),
        f("Interval", Kind::Duration),
        f("AliasNode", Kind::Str),
        f("AliasService", Kind::Str),
        a("DockerContainerID", Kind::Str, &["docker_container_id"]),
        f("Shell", Kind::Str),
        f("GRPC", Kind::Str),
        a("GRPCUseTLS", Kind::Bool, &["grpc_use_tls"]),
        f("OSService", Kind::Str),
        a("TLSServerName", Kind::Str, &["tls_server_name"]),
        a("TLSSkipVerify", Kind::Bool, &["tls_skip_verify"]),
        f("Timeout", Kind::Duration),
        f("TTL", Kind::Duration),
        f("SuccessBeforePassing", Kind::Int),
        f("FailuresBeforeWarning", Kind::Int),
        f("FailuresBeforeCritical", Kind::Int),
        f("ProxyHTTP", Kind::Str),
        f("ProxyGRPC", Kind::Str),
        a(
            "DeregisterCriticalServiceAfter",
            Kind::Duration,
            &["deregister_critical_service_after"],
        ),
        f("OutputMaxSize", Kind::Int),
        a("ServiceID", Kind::Str, &["service_id"]),
    ],
};

/// `structs.ServiceDefinition`: the body of `PUT /v1/agent/service/register`.
pub static SERVICE_DEFINITION: Shape = Shape {
    name: "ServiceDefinition",
    strict: true,
    fields: &[
        f("Kind", Kind::Str),
        f("ID", Kind::Str),
        f("Name", Kind::Str),
        f("Tags", Kind::Strings),
        f("Address", Kind::Str),
        a(
            "TaggedAddresses",
            Kind::ObjMap(&SERVICE_ADDRESS),
            &["tagged_addresses"],
        ),
        f("Meta", Kind::StrMap),
        f("Port", Kind::Int),
        f("SocketPath", Kind::Str),
        f("Check", Kind::Obj(&CHECK_TYPE)),
        f("Checks", Kind::Objs(&CHECK_TYPE)),
        f("Weights", Kind::Obj(&WEIGHTS)),
        f("Token", Kind::Str),
        a("EnableTagOverride", Kind::Bool, &["enable_tag_override"]),
        f("Locality", Kind::Any),
        f("Proxy", Kind::Any),
        f("Connect", Kind::Any),
    ],
};

/// `structs.CheckDefinition`: the body of `PUT /v1/agent/check/register`.
pub static CHECK_DEFINITION: Shape = Shape {
    name: "CheckDefinition",
    strict: true,
    fields: &[
        f("ID", Kind::Str),
        f("Name", Kind::Str),
        f("Notes", Kind::Str),
        a("ServiceID", Kind::Str, &["service_id"]),
        f("Token", Kind::Str),
        f("Status", Kind::Str),
        a("ScriptArgs", Kind::Strings, &["args", "script_args"]),
        f("HTTP", Kind::Str),
        f("H2PING", Kind::Str),
        a("H2PingUseTLS", Kind::Bool, &["h2ping_use_tls"]),
        f("Header", Kind::Any),
        f("Method", Kind::Str),
        f("Body", Kind::Str),
        a("DisableRedirects", Kind::Bool, &["disable_redirects"]),
        f("TCP", Kind::Str),
        f("UDP", Kind::Str),
        f("Interval", Kind::Duration),
        a("DockerContainerID", Kind::Str, &["docker_container_id"]),
        f("Shell", Kind::Str),
        f("GRPC", Kind::Str),
        a("GRPCUseTLS", Kind::Bool, &["grpc_use_tls"]),
        f("OSService", Kind::Str),
        a("TLSServerName", Kind::Str, &["tls_server_name"]),
        a("TLSSkipVerify", Kind::Bool, &["tls_skip_verify"]),
        f("AliasNode", Kind::Str),
        f("AliasService", Kind::Str),
        f("Timeout", Kind::Duration),
        f("TTL", Kind::Duration),
        f("SuccessBeforePassing", Kind::Int),
        f("FailuresBeforeWarning", Kind::Int),
        f("FailuresBeforeCritical", Kind::Int),
        a(
            "DeregisterCriticalServiceAfter",
            Kind::Duration,
            &["deregister_critical_service_after"],
        ),
        f("OutputMaxSize", Kind::Int),
    ],
};

/// `structs.HealthCheckDefinition`: a catalog check's `Definition`. Lenient, as Consul's
/// `UnmarshalJSON` for it uses plain `json.Unmarshal`.
pub static HEALTH_CHECK_DEFINITION: Shape = Shape {
    name: "HealthCheckDefinition",
    strict: false,
    fields: &[
        f("HTTP", Kind::Str),
        f("TLSServerName", Kind::Str),
        f("TLSSkipVerify", Kind::Bool),
        f("Header", Kind::Any),
        f("Method", Kind::Str),
        f("Body", Kind::Str),
        f("DisableRedirects", Kind::Bool),
        f("TCP", Kind::Str),
        f("UDP", Kind::Str),
        f("H2PING", Kind::Str),
        f("H2PingUseTLS", Kind::Bool),
        f("OSService", Kind::Str),
        f("Interval", Kind::Duration),
        f("OutputMaxSize", Kind::Int),
        f("Timeout", Kind::Duration),
        f("DeregisterCriticalServiceAfter", Kind::Duration),
        f("ScriptArgs", Kind::Strings),
        f("DockerContainerID", Kind::Str),
        f("Shell", Kind::Str),
        f("GRPC", Kind::Str),
        f("GRPCUseTLS", Kind::Bool),
        f("AliasNode", Kind::Str),
        f("AliasService", Kind::Str),
        f("TTL", Kind::Duration),
    ],
};

/// `structs.HealthCheck`: a check in `PUT /v1/catalog/register`.
pub static HEALTH_CHECK: Shape = Shape {
    name: "HealthCheck",
    strict: true,
    fields: &[
        f("Node", Kind::Str),
        f("CheckID", Kind::Str),
        f("Name", Kind::Str),
        f("Status", Kind::Str),
        f("Notes", Kind::Str),
        f("Output", Kind::Str),
        f("ServiceID", Kind::Str),
        f("ServiceName", Kind::Str),
        f("ServiceTags", Kind::Strings),
        f("Type", Kind::Str),
        f("Interval", Kind::Str),
        f("Timeout", Kind::Str),
        f("ExposedPort", Kind::Int),
        f("PeerName", Kind::Str),
        f("Definition", Kind::Obj(&HEALTH_CHECK_DEFINITION)),
        f("CreateIndex", Kind::Int),
        f("ModifyIndex", Kind::Int),
    ],
};

/// `structs.NodeService`: the service in `PUT /v1/catalog/register`.
pub static NODE_SERVICE: Shape = Shape {
    name: "NodeService",
    strict: true,
    fields: &[
        f("Kind", Kind::Str),
        f("ID", Kind::Str),
        f("Service", Kind::Str),
        f("Tags", Kind::Strings),
        f("Address", Kind::Str),
        f("TaggedAddresses", Kind::ObjMap(&SERVICE_ADDRESS)),
        f("Meta", Kind::StrMap),
        f("Port", Kind::Int),
        f("SocketPath", Kind::Str),
        f("Weights", Kind::Obj(&WEIGHTS)),
        f("EnableTagOverride", Kind::Bool),
        f("Proxy", Kind::Any),
        f("Connect", Kind::Any),
        f("LocallyRegisteredAsSidecar", Kind::Bool),
        f("Locality", Kind::Any),
        f("PeerName", Kind::Str),
        f("CreateIndex", Kind::Int),
        f("ModifyIndex", Kind::Int),
    ],
};

/// `structs.RegisterRequest`: the body of `PUT /v1/catalog/register`.
pub static REGISTER_REQUEST: Shape = Shape {
    name: "RegisterRequest",
    strict: true,
    fields: &[
        f("Datacenter", Kind::Str),
        f("ID", Kind::Str),
        f("Node", Kind::Str),
        f("Address", Kind::Str),
        f("TaggedAddresses", Kind::StrMap),
        f("NodeMeta", Kind::StrMap),
        f("Service", Kind::Obj(&NODE_SERVICE)),
        f("Check", Kind::Obj(&HEALTH_CHECK)),
        f("Checks", Kind::Objs(&HEALTH_CHECK)),
        f("SkipNodeUpdate", Kind::Bool),
        f("PeerName", Kind::Str),
        f("Locality", Kind::Any),
        f("Token", Kind::Str),
    ],
};

/// `structs.DeregisterRequest`: the body of `PUT /v1/catalog/deregister`.
pub static DEREGISTER_REQUEST: Shape = Shape {
    name: "DeregisterRequest",
    strict: true,
    fields: &[
        f("Datacenter", Kind::Str),
        f("Node", Kind::Str),
        f("ServiceID", Kind::Str),
        f("CheckID", Kind::Str),
        f("PeerName", Kind::Str),
        f("Token", Kind::Str),
    ],
};

/// `agent.checkUpdate`: the body of `PUT /v1/agent/check/update/<id>`.
pub static CHECK_UPDATE: Shape = Shape {
    name: "checkUpdate",
    strict: true,
    fields: &[f("Status", Kind::Str), f("Output", Kind::Str)],
};

// === Entry points ===

/// Decodes `body` as Consul decodes the Go struct `shape` describes, into `T` (whose serde
/// names are the canonical field names; read durations with [`GoDuration`]).
pub fn decode<T: DeserializeOwned>(body: &[u8], shape: &'static Shape) -> Result<T, DecodeError> {
    let value = normalize(body, shape)?;
    serde_json::from_value(value)
        .map_err(|e| DecodeError(format!("json: cannot decode {}: {e}", shape.name)))
}

/// Decodes `body` as Consul would, into an object with canonical keys only.
pub fn normalize(body: &[u8], shape: &'static Shape) -> Result<Value, DecodeError> {
    let json = parse(body)?;
    match json {
        Json::Obj(pairs) => object(&pairs, shape, shape.name),
        Json::Null => Ok(Value::Object(Map::new())),
        other => Err(DecodeError(format!(
            "json: cannot unmarshal {} into Go value of type structs.{}",
            other.go_kind(),
            shape.name
        ))),
    }
}

/// Parses a JSON document keeping object keys in document order (and duplicates).
pub fn parse(body: &[u8]) -> Result<Json, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError("EOF".to_owned()));
    }
    serde_json::from_slice(body).map_err(|e| {
        let text = match e.classify() {
            serde_json::error::Category::Eof => "unexpected EOF".to_owned(),
            _ => format!("invalid JSON: {e}"),
        };
        DecodeError(text)
    })
}

// === Json ===

/// A parsed JSON value whose objects keep their keys in document order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(Number),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// How Go's `UnmarshalTypeError` names this value's JSON type.
    pub fn go_kind(&self) -> String {
        match self {
            Json::Null => "null".to_owned(),
            Json::Bool(_) => "bool".to_owned(),
            Json::Num(n) => format!("number {n}"),
            Json::Str(_) => "string".to_owned(),
            Json::Arr(_) => "array".to_owned(),
            Json::Obj(_) => "object".to_owned(),
        }
    }

    /// The value as a [`Value`] (duplicate keys: the last wins).
    pub fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Num(n) => Value::Number(n.clone()),
            Json::Str(s) => Value::String(s.clone()),
            Json::Arr(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Obj(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
                Json::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Num(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Num(v.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Json, E> {
                Number::from_f64(v)
                    .map(Json::Num)
                    .ok_or_else(|| E::custom("number out of range"))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::Str(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Arr(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Json>()? {
                    pairs.push((k, v));
                }
                Ok(Json::Obj(pairs))
            }
        }
        d.deserialize_any(V)
    }
}

// === Matching ===

/// Go's case folding for field names (`bytes.EqualFold`): simple Unicode folding, so `ſ`
/// matches `s` and the Kelvin sign matches `k`.
fn fold(s: &str) -> String {
    s.chars()
        .map(|c| {
            let mut lower = c.to_lowercase();
            let l = match (lower.next(), lower.next()) {
                (Some(l), None) => l,
                _ => c,
            };
            let mut upper = l.to_uppercase();
            match (upper.next(), upper.next()) {
                (Some(u), None) => u,
                _ => l,
            }
        })
        .collect()
}

/// Which field a key sets, and whether through an alias.
fn field_for<'s>(shape: &'s Shape, key: &str) -> Option<(&'s Field, bool)> {
    if let Some(field) = shape.fields.iter().find(|f| f.name == key) {
        return Some((field, false));
    }
    let folded = fold(key);
    if let Some(field) = shape.fields.iter().find(|f| fold(f.name) == folded) {
        return Some((field, false));
    }
    shape
        .fields
        .iter()
        .find(|f| f.aliases.iter().any(|a| fold(a) == folded))
        .map(|field| (field, true))
}

fn object(
    pairs: &[(String, Json)],
    shape: &'static Shape,
    path: &str,
) -> Result<Value, DecodeError> {
    let mut own: Map<String, Value> = Map::new();
    let mut aliased: Map<String, Value> = Map::new();
    for (key, raw) in pairs {
        let Some((field, via_alias)) = field_for(shape, key) else {
            if shape.strict {
                return Err(DecodeError(format!("json: unknown field {key:?}")));
            }
            continue;
        };
        let field_path = format!("{path}.{}", field.name);
        let slot = if via_alias { &mut aliased } else { &mut own };
        match value(raw, field.kind, &field_path)? {
            Some(v) => {
                slot.insert(field.name.to_owned(), v);
            }
            None => {
                // `null` (or an ignored type) leaves the field as it was.
            }
        }
    }
    for (name, v) in aliased {
        own.entry(name).or_insert(v);
    }
    Ok(Value::Object(own))
}

fn mismatch(raw: &Json, path: &str, go_type: &str) -> DecodeError {
    DecodeError(format!(
        "json: cannot unmarshal {} into Go struct field {path} of type {go_type}",
        raw.go_kind()
    ))
}

fn string(raw: &Json, path: &str) -> Result<Value, DecodeError> {
    match raw {
        Json::Str(s) => Ok(Value::String(s.clone())),
        Json::Null => Ok(Value::String(String::new())),
        other => Err(mismatch(other, path, "string")),
    }
}

/// The field's value in canonical form; `None` leaves the field unset.
fn value(raw: &Json, kind: Kind, path: &str) -> Result<Option<Value>, DecodeError> {
    if matches!(raw, Json::Null) && !matches!(kind, Kind::Custom(_)) {
        return Ok(None);
    }
    let v = match kind {
        Kind::Str => string(raw, path)?,
        Kind::Int => match raw {
            Json::Num(n) if n.is_i64() => Value::Number(n.clone()),
            other => return Err(mismatch(other, path, "int")),
        },
        Kind::Bool => match raw {
            Json::Bool(b) => Value::Bool(*b),
            other => return Err(mismatch(other, path, "bool")),
        },
        Kind::Duration => return duration(raw).map(|d| d.map(Value::from)),
        Kind::Strings => match raw {
            Json::Arr(items) => Value::Array(
                items
                    .iter()
                    .map(|i| string(i, path))
                    .collect::<Result<_, _>>()?,
            ),
            other => return Err(mismatch(other, path, "[]string")),
        },
        Kind::StrMap => match raw {
            Json::Obj(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), string(v, path)?)))
                    .collect::<Result<_, DecodeError>>()?,
            ),
            other => return Err(mismatch(other, path, "map[string]string")),
        },
        Kind::Obj(shape) => match raw {
            Json::Obj(pairs) => object(pairs, shape, path)?,
            other => return Err(mismatch(other, path, &format!("structs.{}", shape.name))),
        },
        Kind::Objs(shape) => match raw {
            Json::Arr(items) => Value::Array(
                items
                    .iter()
                    .filter(|i| !matches!(i, Json::Null))
                    .map(|i| match i {
                        Json::Obj(pairs) => object(pairs, shape, path),
                        other => Err(mismatch(other, path, &format!("structs.{}", shape.name))),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(mismatch(other, path, &format!("[]structs.{}", shape.name)));
            }
        },
        Kind::ObjMap(shape) => match raw {
            Json::Obj(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Json::Obj(inner) => object(inner, shape, path)?,
                            Json::Null => Value::Object(Map::new()),
                            other => {
                                return Err(mismatch(
                                    other,
                                    path,
                                    &format!("structs.{}", shape.name),
                                ));
                            }
                        };
                        Ok((k.clone(), v))
                    })
                    .collect::<Result<_, DecodeError>>()?,
            ),
            other => {
                return Err(mismatch(
                    other,
                    path,
                    &format!("map[string]structs.{}", shape.name),
                ));
            }
        },
        Kind::Any => raw.to_value(),
        Kind::Custom(rule) => return rule(raw, path),
    };
    Ok(Some(v))
}

/// A duration field as Consul's `UnmarshalJSON` reads it: a string through
/// `time.ParseDuration`, a number as nanoseconds (truncated), anything else ignored.
/// Returns signed nanoseconds.
pub fn duration(raw: &Json) -> Result<Option<i64>, DecodeError> {
    match raw {
        Json::Str(s) => parse_go_duration(s).map(Some).map_err(DecodeError),
        Json::Num(n) => Ok(Some(match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i,
            // Go's float64 → int64 conversion truncates toward zero; saturate out of range.
            (None, Some(f)) => f as i64,
            (None, None) => 0,
        })),
        _ => Ok(None),
    }
}

// === Go durations ===

pub use crate::config::parse_go_duration;

/// Go's `time.Duration.String`, as Consul writes durations in JSON: `"0s"`, `"500ms"`, `"1.5s"`,
/// `"1m30s"`, `"1h30m0s"`.
pub fn format_go_duration(d: Duration) -> String {
    /// `value / div` with its fraction, trailing zeros trimmed.
    fn decimal(value: u128, div: u128) -> String {
        let (whole, mut frac) = (value / div, value % div);
        if frac == 0 {
            return whole.to_string();
        }
        let mut digits = div.to_string().len() - 1;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        format!("{whole}.{frac:0digits$}")
    }
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_owned();
    }
    if ns < 1_000_000_000 {
        let (unit, div) = match ns {
            0..1_000 => ("ns", 1),
            1_000..1_000_000 => ("µs", 1_000),
            _ => ("ms", 1_000_000),
        };
        return format!("{}{unit}", decimal(ns, div));
    }
    let secs = ns / 1_000_000_000;
    let (h, m) = (secs / 3600, secs / 60 % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&decimal(ns % 60_000_000_000, 1_000_000_000));
    out.push('s');
    out
}

/// A duration field after [`normalize`]: integer nanoseconds; zero, negative or absent mean
/// unset (Consul treats a non-positive check duration as not given).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoDuration(pub Option<Duration>);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let nanos = Option::<i64>::deserialize(d)?;
        Ok(GoDuration(
            nanos
                .and_then(|n| u64::try_from(n).ok())
                .filter(|n| *n > 0)
                .map(Duration::from_nanos),
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn norm(body: &str, shape: &'static Shape) -> Result<Value, String> {
        normalize(body.as_bytes(), shape).map_err(|e| e.0)
    }

    #[test]
    fn lowercase_and_mixed_case_keys_set_the_pascal_case_fields() {
        let v = norm(
            r#"{"name":"web","id":"web-1","PORT":80,"tags":["a"],"check":{"ttl":"10s","status":"passing"}}"#,
            &SERVICE_DEFINITION,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"Name":"web","ID":"web-1","Port":80,"Tags":["a"],
                   "Check":{"TTL":10_000_000_000_i64,"Status":"passing"}})
        );
    }

    #[test]
    fn go_case_folding_matches_the_long_s_and_the_kelvin_sign() {
        // Go's EqualFold: U+017F folds to "s", U+212A to "k".
        let v = norm("{\"\u{17F}ocketPath\":\"/x\"}", &SERVICE_DEFINITION).unwrap();
        assert_eq!(v, json!({"SocketPath": "/x"}));
        let v = norm("{\"\u{212A}ind\":\"connect-proxy\"}", &SERVICE_DEFINITION).unwrap();
        assert_eq!(v, json!({"Kind": "connect-proxy"}));
    }

    #[test]
    fn snake_case_aliases_fill_fields_their_own_name_left_unset() {
        let v = norm(
            r#"{"Name":"w","enable_tag_override":true,"tagged_addresses":{"lan":{"address":"10.0.0.1","port":1}},
                "check":{"TTL":"1s","deregister_critical_service_after":"90s","service_id":"x"}}"#,
            &SERVICE_DEFINITION,
        )
        .unwrap();
        assert_eq!(v["EnableTagOverride"], json!(true));
        assert_eq!(
            v["TaggedAddresses"],
            json!({"lan": {"Address": "10.0.0.1", "Port": 1}})
        );
        assert_eq!(
            v["Check"]["DeregisterCriticalServiceAfter"],
            json!(90_000_000_000_i64)
        );
        let v = norm(
            r#"{"Name":"c","ServiceID":"own","service_id":"alias","TTL":"5s"}"#,
            &CHECK_DEFINITION,
        )
        .unwrap();
        assert_eq!(v["ServiceID"], json!("own"));
        let v = norm(r#"{"service_id":"alias"}"#, &CHECK_DEFINITION).unwrap();
        assert_eq!(v["ServiceID"], json!("alias"));
    }

    #[test]
    fn the_last_of_two_keys_for_one_field_wins_as_in_go() {
        let v = norm(r#"{"Name":"first","name":"second"}"#, &SERVICE_DEFINITION).unwrap();
        assert_eq!(v["Name"], json!("second"));
    }

    #[test]
    fn unknown_fields_are_refused_in_strict_structs_and_ignored_in_a_check_definition() {
        assert_eq!(
            norm(r#"{"Name":"w","Bogus":1}"#, &SERVICE_DEFINITION),
            Err(r#"json: unknown field "Bogus""#.to_owned())
        );
        assert_eq!(
            norm(r#"{"Name":"w","Check":{"ID":"x"}}"#, &SERVICE_DEFINITION),
            Err(r#"json: unknown field "ID""#.to_owned())
        );
        // Snake case is an alias only where Consul declares one.
        assert!(norm(r#"{"service_name":"w"}"#, &SERVICE_DEFINITION).is_err());
        let v = norm(
            r#"{"Node":"n","Check":{"CheckID":"c","Definition":{"HTTP":"http://x/","Whatever":1}}}"#,
            &REGISTER_REQUEST,
        )
        .unwrap();
        assert_eq!(v["Check"]["Definition"], json!({"HTTP": "http://x/"}));
    }

    #[test]
    fn wrong_types_get_go_texts_and_null_leaves_a_field_unset() {
        assert_eq!(
            norm(r#"{"Name":"w","Port":"80"}"#, &SERVICE_DEFINITION),
            Err("json: cannot unmarshal string into Go struct field ServiceDefinition.Port of type int".to_owned())
        );
        assert_eq!(
            norm(r#"{"Port":80.5}"#, &SERVICE_DEFINITION),
            Err("json: cannot unmarshal number 80.5 into Go struct field ServiceDefinition.Port of type int".to_owned())
        );
        assert!(norm(r#"{"Tags":"a"}"#, &SERVICE_DEFINITION).is_err());
        assert!(norm(r#"{"Meta":{"k":1}}"#, &SERVICE_DEFINITION).is_err());
        assert!(norm(r#"{"EnableTagOverride":"true"}"#, &SERVICE_DEFINITION).is_err());
        assert_eq!(
            norm(
                r#"{"Name":null,"Port":null,"Check":null}"#,
                &SERVICE_DEFINITION
            )
            .unwrap(),
            json!({})
        );
        assert_eq!(
            norm("[]", &SERVICE_DEFINITION),
            Err(
                "json: cannot unmarshal array into Go value of type structs.ServiceDefinition"
                    .to_owned()
            )
        );
    }

    #[test]
    fn malformed_and_empty_bodies_are_refused() {
        assert_eq!(norm("", &SERVICE_DEFINITION), Err("EOF".to_owned()));
        assert_eq!(norm("  \n", &SERVICE_DEFINITION), Err("EOF".to_owned()));
        assert_eq!(
            norm(r#"{"Name":"w""#, &SERVICE_DEFINITION),
            Err("unexpected EOF".to_owned())
        );
        assert!(norm(r#"{"Name":"w"} x"#, &SERVICE_DEFINITION).is_err());
        assert!(norm(r#"{Name:"w"}"#, &SERVICE_DEFINITION).is_err());
    }

    #[test]
    fn durations_take_go_strings_and_nanoseconds_and_ignore_other_types() {
        let v = norm(
            r#"{"TTL":"1m30s","Interval":1500000000,"Timeout":true,"DeregisterCriticalServiceAfter":"1.5h"}"#,
            &CHECK_DEFINITION,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"TTL": 90_000_000_000_i64, "Interval": 1_500_000_000_i64,
                   "DeregisterCriticalServiceAfter": 5_400_000_000_000_i64})
        );
        assert_eq!(
            norm(r#"{"TTL":"ten"}"#, &CHECK_DEFINITION),
            Err(r#"time: invalid duration "ten""#.to_owned())
        );
        assert_eq!(
            norm(r#"{"TTL":"10"}"#, &CHECK_DEFINITION),
            Err(r#"time: missing unit in duration "10""#.to_owned())
        );
        assert_eq!(
            norm(r#"{"TTL":"10x"}"#, &CHECK_DEFINITION),
            Err(r#"time: unknown unit "x" in duration "10x""#.to_owned())
        );
    }

    #[test]
    fn go_durations_parse_as_time_parse_duration_does() {
        let cases: [(&str, i64); 14] = [
            ("0", 0),
            ("-0", 0),
            ("10s", 10_000_000_000),
            ("1m30s", 90_000_000_000),
            ("1.5h", 5_400_000_000_000),
            ("500ms", 500_000_000),
            ("2h45m", 9_900_000_000_000),
            ("10us", 10_000),
            ("10µs", 10_000),
            ("7ns", 7),
            (".5s", 500_000_000),
            ("1.s", 1_000_000_000),
            ("+3s", 3_000_000_000),
            ("-1.5s", -1_500_000_000),
        ];
        for (s, want) in cases {
            assert_eq!(parse_go_duration(s), Ok(want), "{s}");
        }
        for s in [
            "",
            "5",
            "s",
            ".s",
            "1x",
            "1.s.",
            "1h-5m",
            "99999999999999999999h",
            "1 s",
            "--1s",
        ] {
            assert!(parse_go_duration(s).is_err(), "{s:?}");
        }
        assert_eq!(parse_go_duration("2562047h47m16.854775807s"), Ok(i64::MAX));
        assert!(parse_go_duration("2562047h47m16.854775808s").is_err());
    }

    #[test]
    fn durations_are_written_as_go_writes_them() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::from_nanos(1_500), "1.5µs"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1_500), "1.5s"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(5400), "1h30m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_go_duration(d), want, "{d:?}");
            let back = parse_go_duration(want).unwrap();
            assert_eq!(u128::try_from(back).unwrap(), d.as_nanos(), "{want}");
        }
    }

    #[test]
    fn a_go_duration_field_reads_nanoseconds_and_treats_non_positive_as_unset() {
        let d: GoDuration = serde_json::from_value(json!(1_000_000_000)).unwrap();
        assert_eq!(d.0, Some(Duration::from_secs(1)));
        let d: GoDuration = serde_json::from_value(json!(-5)).unwrap();
        assert_eq!(d.0, None);
        let d: GoDuration = serde_json::from_value(json!(null)).unwrap();
        assert_eq!(d.0, None);
    }
}
