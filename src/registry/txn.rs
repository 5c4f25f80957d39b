//! `PUT /v1/txn`: several KV operations applied atomically, with Consul's verbs, results and
//! errors (`agent/txn_endpoint.go`, `agent/consul/txn_endpoint.go`, `agent/consul/state/txn.go`).
//!
//! The operations run in order on a scratch copy of the state (each sees the effects of the ones
//! before it). If any fails, nothing is written and the answer is `409` with every error and the
//! index of the operation that raised it; otherwise the writes go to the log as **one** record
//! ([`Op::Txn`]) and the answer is `200` with one result per operation that returns an entry.
//! A transaction of reads only writes nothing. A body that does not decode is `400`; more than 64
//! operations is `413`.
//!
//! Only KV operations are supported; node, service, check and session operations are refused
//! with a `409` error naming them.

use base64::Engine as _;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{ApiError, Query, Resp, Shared, json_body, kv_json, submit_with};
use super::session::{self, LockRefused};
use super::store::{KvEntry, Op, Record, State, prefix_range};

/// The most operations one transaction may hold (Consul's `maxTxnOps`).
pub const MAX_OPS: usize = 64;

/// One KV operation as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvOpIn {
    #[serde(alias = "verb")]
    verb: Option<String>,
    #[serde(alias = "key")]
    key: Option<String>,
    #[serde(alias = "value")]
    value: Option<String>,
    #[serde(alias = "flags")]
    flags: Option<u64>,
    #[serde(alias = "index")]
    index: Option<u64>,
    #[serde(alias = "session")]
    session: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TxnOpIn {
    #[serde(rename = "KV", alias = "kv", alias = "Kv", alias = "KVS")]
    kv: Option<KvOpIn>,
    #[serde(rename = "Node", alias = "node")]
    node: Option<Value>,
    #[serde(rename = "Service", alias = "service")]
    service: Option<Value>,
    #[serde(rename = "Check", alias = "check")]
    check: Option<Value>,
    #[serde(rename = "Session", alias = "session")]
    session: Option<Value>,
}

/// A decoded operation: a KV one, or why it cannot run here.
#[derive(Debug)]
enum TxnOp {
    Kv(KvOp),
    Unsupported(String),
}

#[derive(Debug)]
struct KvOp {
    verb: String,
    key: String,
    value: Vec<u8>,
    flags: u64,
    index: u64,
    session: String,
}

impl KvOp {
    fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "set" | "delete" | "delete-cas" | "delete-tree" | "cas" | "lock" | "unlock"
        )
    }
}

/// An error of one operation: its position and Consul's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnError {
    pub op_index: usize,
    pub what: String,
}

/// Parses a txn body as [`handle`] does, without running it (the fuzz target
/// `registry_json`).
pub(crate) fn check_body(body: &[u8]) {
    let _ = parse(body);
}

fn parse(body: &[u8]) -> Result<Vec<TxnOp>, ApiError> {
    let raw: Vec<TxnOpIn> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Failed to parse body: {e}")))?;
    if raw.len() > MAX_OPS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {MAX_OPS})",
                raw.len()
            ),
        ));
    }
    raw.into_iter()
        .map(|op| {
            if let Some(kv) = op.kv {
                let value = match kv.value {
                    None => Vec::new(),
                    Some(v) => base64::engine::general_purpose::STANDARD
                        .decode(v.as_bytes())
                        .map_err(|e| {
                            ApiError::bad_request(format!(
                                "Failed to parse body: failed to decode value: {e}"
                            ))
                        })?,
                };
                return Ok(TxnOp::Kv(KvOp {
                    verb: kv.verb.unwrap_or_default(),
                    key: kv.key.unwrap_or_default(),
                    value,
                    flags: kv.flags.unwrap_or(0),
                    index: kv.index.unwrap_or(0),
                    session: kv.session.unwrap_or_default(),
                }));
            }
            let kind = [
                ("node", op.node.is_some()),
                ("service", op.service.is_some()),
                ("check", op.check.is_some()),
                ("session", op.session.is_some()),
            ]
            .into_iter()
            .find(|(_, given)| *given)
            .map(|(kind, _)| kind);
            Ok(TxnOp::Unsupported(match kind {
                Some(kind) => format!("{kind} operations are not supported by this registry"),
                None => "no operation specified".to_owned(),
            }))
        })
        .collect()
}

/// The outcome of running a transaction on a state: the writes to log (none for reads only)
/// and the results, or the errors.
pub struct Outcome {
    pub writes: Vec<Op>,
    pub results: Result<Vec<Value>, Vec<TxnError>>,
}

/// Runs `ops` in order on a copy of `state`, as the next write (index `state.index + 1`).
fn run(state: &State, ops: &[TxnOp]) -> Outcome {
    let index = state.index + 1;
    // Consul's pre-checks: every error found here stops the transaction before it runs.
    let mut errors = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let TxnOp::Kv(kv) = op else { continue };
        if kv.key.is_empty() && kv.verb != "delete-tree" {
            errors.push(TxnError {
                op_index: i,
                what: "Must provide key".to_owned(),
            });
        } else if kv.verb == "lock"
            && state
                .lock_delays
                .get(&kv.key)
                .is_some_and(|until| *until > session::now_ms())
        {
            errors.push(TxnError {
                op_index: i,
                what: format!("failed to lock key {:?} due to lock delay", kv.key),
            });
        }
    }
    if !errors.is_empty() {
        return Outcome {
            writes: Vec::new(),
            results: Err(errors),
        };
    }

    let mut scratch = state.clone();
    let mut writes = Vec::new();
    let mut results = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let kv = match op {
            TxnOp::Kv(kv) => kv,
            TxnOp::Unsupported(what) => {
                errors.push(TxnError {
                    op_index: i,
                    what: what.clone(),
                });
                continue;
            }
        };
        match run_kv(&scratch, kv) {
            Err(what) => errors.push(TxnError { op_index: i, what }),
            Ok(step) => {
                if let Some(write) = step.write {
                    scratch.apply(&Record {
                        index,
                        op: write.clone(),
                    });
                    writes.push(write);
                }
                match step.result {
                    Answer::None => {}
                    Answer::Entry { with_value } => {
                        if let Some(e) = scratch.kv.get(&kv.key) {
                            results.push(result(&kv.key, e, with_value));
                        }
                    }
                    Answer::Given(value) => results.push(value),
                }
            }
        }
    }
    if !errors.is_empty() {
        return Outcome {
            writes: Vec::new(),
            results: Err(errors),
        };
    }
    Outcome {
        writes,
        results: Ok(results),
    }
}

/// What one operation answers.
enum Answer {
    None,
    /// The key's entry after the operation (without its value for writes and checks).
    Entry {
        with_value: bool,
    },
    Given(Value),
}

struct Step {
    write: Option<Op>,
    result: Answer,
}

fn result(key: &str, e: &KvEntry, with_value: bool) -> Value {
    let mut kv = kv_json(key, e);
    if !with_value {
        kv["Value"] = Value::Null;
    }
    json!({ "KV": kv })
}

/// One KV operation on `state`, with Consul's error texts.
fn run_kv(state: &State, op: &KvOp) -> Result<Step, String> {
    let key = &op.key;
    let existing = state.kv.get(key);
    let put = || Op::KvPut {
        key: key.clone(),
        value: op.value.clone(),
        flags: op.flags,
    };
    let write = |write: Op| Step {
        write: Some(write),
        result: Answer::Entry { with_value: false },
    };
    let nothing = Step {
        write: None,
        result: Answer::None,
    };
    match op.verb.as_str() {
        "set" => Ok(write(put())),
        "cas" => {
            let fresh = match existing {
                None => op.index == 0,
                Some(e) => op.index != 0 && op.index == e.modify_index,
            };
            if !fresh {
                return Err(format!("failed to set key {key:?}, index is stale"));
            }
            Ok(write(put()))
        }
        "lock" => match session::lock(state, key, op.value.clone(), op.flags, &op.session) {
            Err(e) => Err(e.message),
            Ok(Err(LockRefused::NotHolder)) => {
                Err(format!("failed to lock key {key:?}, lock is already held"))
            }
            Ok(Err(LockRefused::LockDelay)) => {
                Err(format!("failed to lock key {key:?} due to lock delay"))
            }
            Ok(Ok(lock)) => Ok(write(lock)),
        },
        "unlock" => match session::unlock(state, key, op.value.clone(), op.flags, &op.session) {
            Err(e) => Err(e.message),
            Ok(Err(_)) => Err(format!(
                "failed to unlock key {key:?}, lock isn't held, or is held by another session"
            )),
            Ok(Ok(unlock)) => Ok(write(unlock)),
        },
        "get" => match existing {
            Some(_) => Ok(Step {
                write: None,
                result: Answer::Entry { with_value: true },
            }),
            None => Err(format!("key {key:?} doesn't exist")),
        },
        "get-or-empty" => Ok(Step {
            write: None,
            result: match existing {
                Some(_) => Answer::Entry { with_value: true },
                None => Answer::Given(json!({ "KV": {
                    "LockIndex": 0,
                    "Key": key,
                    "Flags": op.flags,
                    "Value": null,
                    "CreateIndex": 0,
                    "ModifyIndex": op.index,
                }})),
            },
        }),
        "get-tree" => {
            let entries: Vec<Value> = prefix_range(&state.kv, key)
                .map(|(k, e)| result(k, e, true))
                .collect();
            Ok(Step {
                write: None,
                result: Answer::Given(Value::Array(entries)),
            })
        }
        "check-index" => match existing {
            None => Err(format!("failed to check index, key {key:?} doesn't exist")),
            Some(e) if e.modify_index != op.index => Err(format!(
                "failed index check for key {key:?}, current modify index {} != {}",
                e.modify_index, op.index
            )),
            Some(_) => Ok(Step {
                write: None,
                result: Answer::Entry { with_value: false },
            }),
        },
        "check-session" => match existing {
            None => Err(format!(
                "failed to check session, key {key:?} doesn't exist"
            )),
            Some(e) if e.session.as_deref().unwrap_or_default() != op.session => Err(format!(
                "failed session check for key {key:?}, current session {:?} != {:?}",
                e.session.as_deref().unwrap_or_default(),
                op.session
            )),
            Some(_) => Ok(Step {
                write: None,
                result: Answer::Entry { with_value: false },
            }),
        },
        "check-not-exists" => match existing {
            Some(_) => Err(format!("key {key:?} exists")),
            None => Ok(nothing),
        },
        "delete" => Ok(Step {
            write: existing.map(|_| Op::KvDelete {
                key: key.clone(),
                recurse: false,
            }),
            result: Answer::None,
        }),
        "delete-tree" => Ok(Step {
            write: prefix_range(&state.kv, key).next().map(|_| Op::KvDelete {
                key: key.clone(),
                recurse: true,
            }),
            result: Answer::None,
        }),
        "delete-cas" => match existing {
            // Consul: deleting a key that is already gone succeeds.
            None => Ok(nothing),
            Some(e) if e.modify_index != op.index => {
                Err(format!("failed to delete key {key:?}, index is stale"))
            }
            Some(_) => Ok(Step {
                write: Some(Op::KvDelete {
                    key: key.clone(),
                    recurse: false,
                }),
                result: Answer::None,
            }),
        },
        other => Err(format!("unknown KV verb {other:?}")),
    }
}

/// `get-tree` answers a list of results, every other operation at most one: flattens them.
fn flatten(results: Vec<Value>) -> Vec<Value> {
    results
        .into_iter()
        .flat_map(|r| match r {
            Value::Array(items) => items,
            one => vec![one],
        })
        .collect()
}

fn answer(results: Result<Vec<Value>, Vec<TxnError>>, read_only: bool) -> Resp {
    let mut body = match results {
        Ok(results) => json!({ "Results": flatten(results), "Errors": null }),
        Err(errors) => {
            let errors: Vec<Value> = errors
                .into_iter()
                .map(|e| json!({ "OpIndex": e.op_index, "What": e.what }))
                .collect();
            json!({ "Results": null, "Errors": errors })
        }
    };
    let conflict = !body["Errors"].is_null();
    if read_only {
        // Consul answers a read-only transaction with its query metadata.
        body["Index"] = json!(0);
        body["LastContact"] = json!(0);
        body["KnownLeader"] = json!(true);
        body["ConsistencyLevel"] = json!("");
        body["NotModified"] = json!(false);
        body["Backend"] = json!(0);
    }
    let status = if conflict {
        StatusCode::CONFLICT
    } else {
        StatusCode::OK
    };
    json_body(status, &body)
}

/// Answers `PUT /v1/txn`.
pub(crate) async fn handle(shared: &Shared, _query: &Query, body: &[u8]) -> Result<Resp, ApiError> {
    let ops = parse(body)?;
    let writes = ops
        .iter()
        .any(|op| matches!(op, TxnOp::Kv(kv) if kv.is_write()));
    if !writes {
        let state = shared.state.borrow().clone();
        return Ok(answer(run(&state, &ops).results, true));
    }
    let (_, results) = submit_with(shared, move |state, _| {
        let outcome = run(state, &ops);
        let op = (outcome.results.is_ok() && !outcome.writes.is_empty())
            .then_some(Op::Txn(outcome.writes));
        Ok((op, outcome.results))
    })
    .await?;
    Ok(answer(results, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(verb: &str, key: &str) -> TxnOp {
        TxnOp::Kv(KvOp {
            verb: verb.into(),
            key: key.into(),
            value: b"v".to_vec(),
            flags: 0,
            index: 0,
            session: String::new(),
        })
    }

    fn apply(state: &mut State, outcome: &Outcome) {
        let index = state.index + 1;
        state.apply(&Record {
            index,
            op: Op::Txn(outcome.writes.clone()),
        });
    }

    #[test]
    fn a_failing_operation_fails_the_whole_transaction_and_reports_every_error() {
        let state = State::default();
        let outcome = run(
            &state,
            &[kv("set", "a"), kv("get", "missing"), kv("frobnicate", "b")],
        );
        let errors = outcome.results.unwrap_err();
        assert_eq!(
            errors,
            [
                TxnError {
                    op_index: 1,
                    what: "key \"missing\" doesn't exist".into()
                },
                TxnError {
                    op_index: 2,
                    what: "unknown KV verb \"frobnicate\"".into()
                },
            ]
        );
        assert!(outcome.writes.is_empty());
    }

    #[test]
    fn later_operations_see_the_effects_of_earlier_ones() {
        let mut state = State::default();
        let outcome = run(
            &state,
            &[kv("set", "a"), kv("check-index", "a"), kv("get", "a")],
        );
        // check-index with index 0 fails: the key was just written at index 2.
        assert_eq!(
            outcome.results.unwrap_err()[0].what,
            "failed index check for key \"a\", current modify index 2 != 0"
        );
        let outcome = run(&state, &[kv("set", "a"), kv("get", "a"), kv("delete", "b")]);
        apply(&mut state, &outcome);
        let results = outcome.results.unwrap();
        assert_eq!(results[0]["KV"]["Value"], Value::Null);
        assert_eq!(results[0]["KV"]["ModifyIndex"], 2);
        assert_eq!(results[1]["KV"]["Value"], "dg==");
        assert_eq!(state.kv["a"].modify_index, 2);
        assert_eq!(state.index, 2);
    }

    #[test]
    fn cas_and_delete_cas_follow_consuls_rules() {
        let mut state = State::default();
        let cas = |index| {
            TxnOp::Kv(KvOp {
                index,
                ..match kv("cas", "k") {
                    TxnOp::Kv(k) => k,
                    TxnOp::Unsupported(_) => unreachable!(),
                }
            })
        };
        // cas 0 creates a missing key, and only a missing one.
        let outcome = run(&state, &[cas(0)]);
        apply(&mut state, &outcome);
        assert!(outcome.results.is_ok());
        assert!(run(&state, &[cas(0)]).results.is_err());
        assert!(run(&state, &[cas(7)]).results.is_err());
        assert!(run(&state, &[cas(2)]).results.is_ok());
        // delete-cas of a missing key succeeds and writes nothing.
        let gone = run(&state, &[kv("delete-cas", "nothing")]);
        assert!(gone.results.is_ok() && gone.writes.is_empty());
    }

    #[test]
    fn refuses_a_body_that_is_not_a_list_of_operations_and_too_many_operations() {
        assert_eq!(parse(b"{}").unwrap_err().status, StatusCode::BAD_REQUEST);
        let many = format!(
            "[{}]",
            vec![r#"{"KV":{"Verb":"get","Key":"a"}}"#; 65].join(",")
        );
        assert_eq!(
            parse(many.as_bytes()).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let ops = parse(br#"[{"Node":{}},{}]"#).unwrap();
        let errors = run(&State::default(), &ops).results.unwrap_err();
        assert_eq!(
            errors[0].what,
            "node operations are not supported by this registry"
        );
        assert_eq!(errors[1].what, "no operation specified");
    }
}
