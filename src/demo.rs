//! Demo applications for `skyline up`: `hello` answers in plain text, `echo` returns what it
//! received (method, path, query, headers and body) as JSON.

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::proxy::{Body, full};
use crate::serve::{Conn, Handler};

pub mod migration;

/// The largest body `echo` reads back.
pub const ECHO_MAX_BODY: usize = 1024 * 1024;

#[derive(Clone, Debug)]
pub struct Hello {
    pub greeting: String,
}

impl Handler for Hello {
    type Body = Body;

    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Body> {
        let text = format!("{} (you asked for {})\n", self.greeting, req.uri().path());
        let mut response = Response::new(full(text));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    type Body = Body;

    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let mut headers = serde_json::Map::new();
        for (name, value) in &parts.headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            match headers.get_mut(name.as_str()) {
                Some(serde_json::Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(&value);
                }
                _ => {
                    headers.insert(name.as_str().to_owned(), value.into());
                }
            }
        }
        let (status, body) = match Limited::new(body, ECHO_MAX_BODY).collect().await {
            Ok(collected) => (
                StatusCode::OK,
                String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            ),
            Err(_) => (StatusCode::PAYLOAD_TOO_LARGE, String::new()),
        };
        let json = serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": body,
        });
        let mut response = Response::new(full(format!("{json}\n")));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}
