//! A `dynexec serve` process driven over HTTP, for the server's test files.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `dynexec serve` process on a free loopback port, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub log: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dynexec"))
            .args(["--device", "cpu", "--quiet", "serve", "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dynexec serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let line = log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the server printed no address in time (or exited)");
            if let Some(rest) = line.split("on http://").nth(1) {
                let addr = rest.split_whitespace().next().expect("address");
                return Self {
                    child,
                    base: format!("http://{addr}"),
                    log: std::sync::Mutex::new(log),
                };
            }
            assert!(!line.contains("error"), "serve failed: {line}");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs a JSON body; any status comes back with its JSON body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string())
    }

    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let response = ureq::post(&self.url(path))
            .set("content-type", "application/json")
            .send_string(body);
        into_json(response)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&self.url(path)).call() {
            Ok(r) => (r.status(), r.into_string().expect("body")),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().expect("body")),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// POSTs with `"stream": true` and returns the parsed `data:` events (without `[DONE]`)
    /// and whether `[DONE]` ended the stream.
    pub fn stream(&self, path: &str, body: &Value) -> (Vec<Value>, bool) {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let response = ureq::post(&self.url(path))
            .set("content-type", "application/json")
            .send_string(&body.to_string())
            .expect("streaming request");
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        read_events(response.into_reader())
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    /// Sends SIGTERM, as a service manager would.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn into_json(response: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let (code, r) = match response {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("request failed: {e}"),
    };
    let text = r.into_string().expect("body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {code}: body is not JSON ({e}): {text}"));
    (code, value)
}

pub fn read_events(reader: impl Read) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.expect("stream line");
        let Some(data) = line.strip_prefix("data: ") else {
            assert!(line.is_empty(), "unexpected stream line: {line}");
            continue;
        };
        if data == "[DONE]" {
            return (events, true);
        }
        events.push(serde_json::from_str(data).expect("event JSON"));
    }
    (events, false)
}

/// The OpenAI error of a failed request: its status, type and message.
pub fn assert_api_error(response: (u16, Value), status: u16, needle: &str) -> Value {
    let (code, body) = response;
    assert_eq!(code, status, "{body}");
    let error = &body["error"];
    assert!(error["type"].is_string(), "{body}");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.to_lowercase().contains(&needle.to_lowercase()),
        "expected `{needle}` in: {message}"
    );
    error.clone()
}
