//! Listening sockets inherited from a supervisor: systemd socket activation (`LISTEN_FDS`,
//! `LISTEN_PID`, `LISTEN_FDNAMES`).
//!
//! A restart that binds anew refuses every connection that arrives between the old process
//! closing its listener and the new one binding. When a supervisor (a systemd socket unit, or a
//! test) holds the listening sockets instead, the old process stops accepting and drains, the new
//! one accepts from the same sockets, and connections that arrive in between wait in the
//! kernel's backlog: no connection is refused.
//!
//! Each socket is matched to a listener by its name (`FileDescriptorName=` in the socket unit):
//! `outbound`, `inbound`, `admin`, `registry` (the agent's embedded registry, or `skyline
//! registry`), `gateway`, `bridge`. A named socket replaces the listener's configured address,
//! even one configured `off`; a listener without a socket binds its address as usual. A socket
//! whose name no listener of the role takes is refused at start, like any bad config.

use std::io;

use listenfd::ListenFd;

/// Sockets passed by the supervisor, not yet claimed by a listener.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<(String, std::net::TcpListener)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("inherited socket {index} (LISTEN_FDS) is not a TCP listening socket")]
    NotTcp {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error(
        "LISTEN_FDNAMES names {names} sockets but LISTEN_FDS passes {fds}; name every socket \
         (FileDescriptorName= in the socket unit)"
    )]
    Names { names: usize, fds: usize },
    #[error("inherited socket {name:?} is not a listener of this role (it takes: {expected})")]
    Unclaimed { name: String, expected: String },
}

impl Inherited {
    /// No inherited sockets: every listener binds its address.
    pub fn none() -> Self {
        Self::default()
    }

    /// The sockets the supervisor passed to this process, if any.
    ///
    /// Call it once, first thing in `main`, before any thread starts: it unsets `LISTEN_FDS` and
    /// `LISTEN_PID` (so a child does not take the sockets for its own), and changing the
    /// environment is only sound while the process has one thread. A `LISTEN_PID` that is not
    /// this process's means the sockets were meant for another process; they are ignored.
    pub fn from_env() -> Result<Self, ActivationError> {
        let names = std::env::var("LISTEN_FDNAMES").ok();
        Self::take_from(ListenFd::from_env(), names.as_deref())
    }

    fn take_from(mut fds: ListenFd, names: Option<&str>) -> Result<Self, ActivationError> {
        let count = fds.len();
        if count == 0 {
            return Ok(Self::none());
        }
        let names = parse_names(names, count)?;
        let mut sockets = Vec::with_capacity(count);
        for (index, name) in names.into_iter().enumerate() {
            match fds.take_tcp_listener(index) {
                Ok(Some(listener)) => sockets.push((name, listener)),
                Ok(None) => {}
                Err(source) => return Err(ActivationError::NotTcp { index, source }),
            }
        }
        Ok(Self { sockets })
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Takes the first socket named `name`.
    pub fn take(&mut self, name: &str) -> Option<std::net::TcpListener> {
        let at = self.sockets.iter().position(|(n, _)| n == name)?;
        Some(self.sockets.remove(at).1)
    }

    /// Takes every socket named `name`, in the order the supervisor passed them.
    pub fn take_all(&mut self, name: &str) -> Vec<std::net::TcpListener> {
        let mut taken = Vec::new();
        while let Some(listener) = self.take(name) {
            taken.push(listener);
        }
        taken
    }

    /// Refuses a socket that no listener took: a misnamed socket would otherwise be silently
    /// left unserved while the listener it was meant for binds its default address.
    pub fn finish(self, expected: &[&str]) -> Result<(), ActivationError> {
        match self.sockets.into_iter().next() {
            None => Ok(()),
            Some((name, _)) => Err(ActivationError::Unclaimed {
                name,
                expected: if expected.is_empty() {
                    "none".to_owned()
                } else {
                    expected.join(", ")
                },
            }),
        }
    }
}

/// `LISTEN_FDNAMES`: one colon-separated name per socket, required (a socket is matched to its
/// listener by name, never by position).
fn parse_names(names: Option<&str>, fds: usize) -> Result<Vec<String>, ActivationError> {
    let names: Vec<String> = names
        .filter(|n| !n.is_empty())
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    if names.len() != fds {
        return Err(ActivationError::Names {
            names: names.len(),
            fds,
        });
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }

    #[test]
    fn names_must_cover_every_socket() {
        assert_eq!(
            parse_names(Some("outbound:inbound:admin"), 3).unwrap(),
            ["outbound", "inbound", "admin"]
        );
        assert!(matches!(
            parse_names(Some("outbound"), 2),
            Err(ActivationError::Names { names: 1, fds: 2 })
        ));
        assert!(matches!(
            parse_names(None, 1),
            Err(ActivationError::Names { names: 0, fds: 1 })
        ));
        assert!(matches!(
            parse_names(Some(""), 1),
            Err(ActivationError::Names { names: 0, fds: 1 })
        ));
    }

    #[test]
    fn sockets_are_taken_by_name_and_leftovers_refused() {
        let (a, b, c) = (listener(), listener(), listener());
        let (a_addr, c_addr) = (a.local_addr().unwrap(), c.local_addr().unwrap());
        let mut inherited = Inherited {
            sockets: vec![
                ("bridge".into(), a),
                ("admin".into(), b),
                ("bridge".into(), c),
            ],
        };
        let bridges = inherited.take_all("bridge");
        let addrs: Vec<_> = bridges.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(addrs, [a_addr, c_addr], "in the order passed");
        assert!(inherited.take("outbound").is_none());
        let error = inherited.finish(&["bridge"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "inherited socket \"admin\" is not a listener of this role (it takes: bridge)"
        );
        assert!(Inherited::none().finish(&[]).is_ok());
    }

    #[test]
    fn nothing_passed_means_nothing_inherited() {
        let inherited = Inherited::take_from(ListenFd::empty(), Some("outbound")).unwrap();
        assert!(inherited.is_empty());
    }
}
