//! Consul's user events (`/v1/event/fire/<name>`, `/v1/event/list`), as one agent sees them.
//!
//! Consul gossips an event to every agent; each agent keeps the last 256 it received whose
//! filters match it, in memory only (events are not persisted). Here the registry is that one
//! agent: an event is recorded when its node filter matches the registry's node name and its
//! service (and tag) filter matches one of the services registered on that node, as Consul's
//! `shouldProcessUserEvent` decides. Filters are regular expressions (RE2 syntax in Consul; the
//! `regex` crate's syntax, which agrees on everything but look-around, here).

use std::collections::VecDeque;
use std::sync::Arc;

use serde::Serialize;

/// How many events the registry remembers, as Consul's agent (`eventBuf`).
pub const EVENT_BUFFER: usize = 256;
/// The largest name plus payload accepted, in bytes: serf's default user event size limit, which
/// Consul keeps (Consul's own envelope makes its real limit somewhat lower).
pub const EVENT_SIZE_LIMIT: usize = 512;

/// A user event as Consul's API shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct UserEvent {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    /// Base64 in JSON, `null` when empty.
    #[serde(serialize_with = "payload_json")]
    pub payload: Vec<u8>,
    pub node_filter: String,
    pub service_filter: String,
    pub tag_filter: String,
    pub version: u32,
    #[serde(rename = "LTime")]
    pub ltime: u64,
}

fn payload_json<S: serde::Serializer>(payload: &[u8], s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    if payload.is_empty() {
        s.serialize_none()
    } else {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(payload))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("Missing name")]
    MissingName,
    #[error("Cannot provide tag filter without service filter")]
    TagWithoutService,
    #[error("Invalid {which} filter: {message}")]
    BadFilter {
        which: &'static str,
        message: String,
    },
    #[error("user event exceeds configured limit of {EVENT_SIZE_LIMIT} bytes before encoding")]
    TooLarge,
}

/// Compiles a filter, anchored nowhere (Go's `MatchString` finds a match anywhere).
fn filter(which: &'static str, text: &str) -> Result<Option<regex::Regex>, EventError> {
    if text.is_empty() {
        return Ok(None);
    }
    regex::Regex::new(text)
        .map(Some)
        .map_err(|e| EventError::BadFilter {
            which,
            message: e.to_string(),
        })
}

/// The events this registry received, newest last.
#[derive(Debug, Default, Clone)]
pub struct EventLog {
    events: VecDeque<Arc<UserEvent>>,
    ltime: u64,
}

impl EventLog {
    /// Checks an event as Consul's `validateUserEventParams` does and gives it an ID.
    pub fn prepare(
        name: String,
        payload: Vec<u8>,
        node_filter: String,
        service_filter: String,
        tag_filter: String,
    ) -> Result<UserEvent, EventError> {
        if name.is_empty() {
            return Err(EventError::MissingName);
        }
        if !tag_filter.is_empty() && service_filter.is_empty() {
            return Err(EventError::TagWithoutService);
        }
        filter("node", &node_filter)?;
        filter("service", &service_filter)?;
        filter("tag", &tag_filter)?;
        if name.len() + payload.len() > EVENT_SIZE_LIMIT {
            return Err(EventError::TooLarge);
        }
        Ok(UserEvent {
            id: uuid_v4(),
            name,
            payload,
            node_filter,
            service_filter,
            tag_filter,
            version: 1,
            ltime: 0,
        })
    }

    /// Records `event` if its filters match this node (`services`: the node's services as
    /// `(id, tags)`); returns whether it was recorded.
    pub fn receive<'a>(
        &mut self,
        mut event: UserEvent,
        node_name: &str,
        services: impl Iterator<Item = (&'a str, &'a [String])>,
    ) -> bool {
        if !matches(&event, node_name, services) {
            return false;
        }
        self.ltime += 1;
        event.ltime = self.ltime;
        if self.events.len() == EVENT_BUFFER {
            self.events.pop_front();
        }
        self.events.push_back(Arc::new(event));
        true
    }

    /// The events named `name` (all when `None`), oldest first.
    pub fn list(&self, name: Option<&str>) -> Vec<Arc<UserEvent>> {
        self.events
            .iter()
            .filter(|e| name.is_none_or(|n| e.name == n))
            .cloned()
            .collect()
    }
}

/// Consul's `shouldProcessUserEvent`: the node filter against the node name, the service
/// filter against the IDs of the node's services, the tag filter against their tags.
fn matches<'a>(
    event: &UserEvent,
    node_name: &str,
    mut services: impl Iterator<Item = (&'a str, &'a [String])>,
) -> bool {
    // The filters were compiled when the event was prepared; failing here means no match.
    let Ok(node) = filter("node", &event.node_filter) else {
        return false;
    };
    if node.is_some_and(|re| !re.is_match(node_name)) {
        return false;
    }
    let (Ok(service), Ok(tag)) = (
        filter("service", &event.service_filter),
        filter("tag", &event.tag_filter),
    ) else {
        return false;
    };
    let Some(service) = service else {
        return true;
    };
    services.any(|(id, tags)| {
        service.is_match(id)
            && tag
                .as_ref()
                .is_none_or(|tag| tags.iter().any(|t| tag.is_match(t)))
    })
}

/// The index Consul gives an event list: derived from the newest event's ID
/// (`uuidToUint64`), 1 when there is none. Not monotonic: a blocking list waits while the
/// index equals the client's.
pub fn list_index(events: &[Arc<UserEvent>]) -> u64 {
    let Some(last) = events.last() else {
        return 1;
    };
    let id = &last.id;
    let part = |r: std::ops::Range<usize>| id.get(r).unwrap_or("");
    let lower = format!("{}{}{}", part(0..8), part(9..13), part(14..18));
    let upper = format!("{}{}", part(19..23), part(24..36));
    let low = u64::from_str_radix(&lower, 16).unwrap_or(0);
    let high = u64::from_str_radix(&upper, 16).unwrap_or(0);
    low ^ high
}

/// A random (version 4) UUID in its text form.
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    for byte in &mut b {
        *byte = fastrand::u8(..);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(node: &str, service: &str, tag: &str) -> UserEvent {
        EventLog::prepare(
            "deploy".into(),
            b"v2".to_vec(),
            node.into(),
            service.into(),
            tag.into(),
        )
        .unwrap()
    }

    #[test]
    fn an_event_is_kept_only_when_its_filters_match_this_node_and_its_services() {
        let tags = vec!["blue".to_owned()];
        let services = || [("web-1", tags.as_slice())].into_iter();
        let mut log = EventLog::default();
        assert!(log.receive(event("", "", ""), "local", services()));
        assert!(log.receive(event("^loc", "", ""), "local", services()));
        assert!(!log.receive(event("^other$", "", ""), "local", services()));
        assert!(log.receive(event("", "web", "bl"), "local", services()));
        assert!(!log.receive(event("", "web", "green"), "local", services()));
        assert!(!log.receive(event("", "db", ""), "local", services()));
        let kept = log.list(Some("deploy"));
        assert_eq!(kept.len(), 3);
        assert_eq!(kept.iter().map(|e| e.ltime).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(log.list(Some("other")).is_empty());
    }

    #[test]
    fn bad_events_are_refused_with_consul_texts() {
        let err = |n: &str, s: &str, t: &str, p: usize| {
            EventLog::prepare("e".into(), vec![b'x'; p], n.into(), s.into(), t.into())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("", "", "t", 0),
            "Cannot provide tag filter without service filter"
        );
        assert!(err("(", "", "", 0).starts_with("Invalid node filter"));
        assert!(err("", "", "", 600).contains("512 bytes"));
    }

    #[test]
    fn the_buffer_keeps_the_last_256_events_and_the_index_follows_the_newest_id() {
        let mut log = EventLog::default();
        assert_eq!(list_index(&log.list(None)), 1);
        for _ in 0..300 {
            log.receive(event("", "", ""), "n", std::iter::empty());
        }
        let all = log.list(None);
        assert_eq!(all.len(), EVENT_BUFFER);
        assert_eq!(all[0].ltime, 45);
        let index = list_index(&all);
        assert_ne!(index, 1);
        log.receive(event("", "", ""), "n", std::iter::empty());
        assert_ne!(list_index(&log.list(None)), index);
    }

    #[test]
    fn uuids_have_the_version_4_form() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert!(matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
    }
}
