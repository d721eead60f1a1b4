//! Plain HTTP GETs against jetci-web and the processes' `--metrics-addr`.
//!
//! HTTP/1.0 is spoken by hand over a `TcpStream`, so the server closes the connection after the
//! response and sends no chunked encoding: the tests need GET only, and this keeps an HTTP client
//! out of the build. The calls block their thread (like [`super::processes::Proc::wait_for_log`]); inside a
//! `#[tokio::test(flavor = "multi_thread")]` that is the test's own thread, so servers the test
//! runs as tokio tasks keep answering meanwhile.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::waiting::wait_until;

/// How long one GET may wait for the server to send its response.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A response: status code, headers (names in lower case) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The value of header `name` (lower case), if it was sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET path` on `addr` (`127.0.0.1:PORT`), once. `Err` says why there is no response: nothing
/// listens, the server did not answer within 30 s, or what came back is not HTTP.
pub fn http_get(addr: &str, path: &str) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Asks `GET path` on `addr` until the response is a `200` for which `done` holds, and returns
/// it. Nothing listening yet counts as "not yet" (a process may still be starting). Panics after
/// `bound` with the last response or error.
pub fn wait_http(
    addr: &str,
    path: &str,
    bound: Duration,
    done: impl Fn(&Response) -> bool,
) -> Response {
    let what = format!("GET {path} at {addr} to answer as expected");
    wait_until(&what, bound, || match http_get(addr, path) {
        Ok(r) if r.status == 200 && done(&r) => Ok(r),
        Ok(r) => Err(format!("{} {}", r.status, r.body)),
        Err(e) => Err(e),
    })
}
