//! `dynexec serve` under traffic an operator meets: a long prompt next to short ones, clients
//! that stall, huge bodies, strangers, options it does not implement, bursts beyond its
//! queue, and many requests in a row. Loopback only, each test bounded.

mod common;

use common::server::{assert_api_error, into_json, Server};
use common::{dynexec, stdout_json};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({"temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}]})
}

/// Sends raw bytes on a new connection and returns the answer (until the server closes the
/// connection or `wait` passes). It reads while it writes: a server that refuses a body
/// early answers and closes before the rest is sent, and the answer must be read before the
/// connection is reset.
fn raw(server: &Server, request: &[u8], wait: Duration) -> String {
    let addr = server.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut writer = stream.try_clone().expect("clone the socket");
    let request = request.to_vec();
    let writing = std::thread::spawn(move || {
        // The server may close before taking it all (an early refusal).
        let _ = writer.write_all(&request);
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let _ = writing.join();
    String::from_utf8_lossy(&answer).to_string()
}

/// The JSON body of a raw HTTP answer, with its status.
fn raw_json(answer: &str) -> (u16, Value) {
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in: {answer:?}"));
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {answer:?}"));
    (status, body)
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 1000 + (i * 7919) % 20_000).collect()
}

/// Chunked prefill: while a long prompt is prefilled a piece per step, a short request
/// gets its first token long before the long one does, and /health answers meanwhile.
#[test]
fn a_long_prompt_does_not_stall_a_short_one() {
    let server = Server::start(&["--batch-size", "64", "--exit-adapters", "none"]);
    let long = json!({"prompt": ids(1500), "max_tokens": 2, "temperature": 0});
    let started = Instant::now();
    std::thread::scope(|s| {
        let long_request = s.spawn(|| {
            let (code, body) = server.post("/v1/completions", &long);
            assert_eq!(code, 200, "{body}");
            Instant::now()
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.metric("dynexec_prefilling_sequences") < 1.0 {
            assert!(Instant::now() < deadline, "the long prompt never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        // /health is not held up by the prefill and says what the engine is doing.
        let asked = Instant::now();
        let (code, health) = server.get("/health");
        let health_latency = asked.elapsed();
        assert_eq!(code, 200, "{health}");
        let health: Value = serde_json::from_str(&health).unwrap();
        assert!(
            health["prefilling_sequences"].as_u64() >= Some(1),
            "{health}"
        );
        let (code, body) = server.post("/v1/chat/completions", &chat("Say hi.", 4));
        let short_done = Instant::now();
        assert_eq!(code, 200, "{body}");
        let short_ttft = body["dynexec"]["ttft_ms"].as_f64().unwrap() / 1000.0;
        let long_done = long_request.join().unwrap();
        let long_took = long_done - started;
        eprintln!(
            "long prompt {long_took:?}; short request TTFT {short_ttft:.2}s; /health {health_latency:?}"
        );
        // The bound: the short request is answered while the long prompt is still being
        // prefilled, and waits for at most a third of that prefill.
        assert!(
            short_done < long_done,
            "the short request ended after the long one ({long_took:?})"
        );
        assert!(
            short_ttft < long_took.as_secs_f64() / 3.0,
            "short TTFT {short_ttft:.2}s against a {long_took:?} prefill"
        );
        assert!(
            health_latency < Duration::from_secs(2),
            "{health_latency:?}"
        );
    });
    assert!(server.metric("dynexec_prefill_pieces_total") >= 1500.0 / 64.0);
}

/// A long prompt prefilled in pieces gives the answer a one-piece prefill gives.
#[test]
fn a_prompt_prefilled_in_pieces_answers_as_in_one() {
    let prompt = "The history of the Roman Empire spans many centuries. ".repeat(12);
    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
    let answers: Vec<String> = ["16", "100000"]
        .iter()
        .map(|size| {
            let server = Server::start(&["--batch-size", size, "--exit-adapters", "none"]);
            let (code, out) = server.post("/v1/completions", &body);
            assert_eq!(code, 200, "{out}");
            assert!(out["usage"]["prompt_tokens"].as_u64() > Some(100));
            out["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(answers[0], answers[1]);
}

/// Neither a client that stops halfway through its headers nor one that stops halfway
/// through its body keeps the server from shutting down; the read timeout closes the first
/// and answers the second with a 408.
#[test]
fn a_half_sent_request_does_not_stop_shutdown() {
    let server = Server::start(&["--timeout", "2", "--shutdown-timeout", "3"]);
    let body_first = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":";
    let started = Instant::now();
    let answer = raw(&server, body_first, Duration::from_secs(20));
    let (status, error) = raw_json(&answer);
    assert_eq!(status, 408, "{error}");
    assert_eq!(error["error"]["code"], "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(10));
    let started = Instant::now();
    let answer = raw(
        &server,
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
        Duration::from_secs(20),
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a stalled header was kept {:?}",
        started.elapsed()
    );

    // Now stalled clients at shutdown: half a header, and half a body.
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stalled_head = TcpStream::connect(&addr).unwrap();
    stalled_head
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        .unwrap();
    let mut stalled_body = TcpStream::connect(&addr).unwrap();
    stalled_body.write_all(&body_first[..]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    server.terminate();
    let mut server = server;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "serve exited with {status}");
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "shutdown hung with stalled clients"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "shutdown with two stalled clients took {:?}",
        asked.elapsed()
    );
}

/// Oversized requests are refused before any expensive work, in OpenAI's error shape, and
/// the server keeps answering meanwhile.
#[test]
fn huge_bodies_and_prompts_are_rejected_fast() {
    let server = Server::start(&["--max-body-bytes", "3000000", "--exit-adapters", "none"]);
    let huge = "word ".repeat(400_000); // 2 MB of text
    let started = Instant::now();
    let error = assert_api_error(
        server.post("/v1/completions", &json!({"prompt": huge, "max_tokens": 4})),
        400,
        "context",
    );
    let rejected_in = started.elapsed();
    assert_eq!(error["code"], "context_length_exceeded");
    // Refused on its length in bytes, without tokenizing it.
    assert!(
        error["message"].as_str().unwrap().contains("bytes"),
        "{error}"
    );
    assert_eq!(error["param"], "prompt");
    let error = assert_api_error(
        server.post("/v1/chat/completions", &chat(&huge, 4)),
        400,
        "context",
    );
    assert_eq!(error["param"], "messages");
    // Eight at once, and /health answers in the meantime.
    std::thread::scope(|s| {
        let posts: Vec<_> = (0..8)
            .map(|_| s.spawn(|| server.post("/v1/completions", &json!({"prompt": huge}))))
            .collect();
        let asked = Instant::now();
        let (code, _) = server.get("/health");
        assert_eq!(code, 200);
        let health = asked.elapsed();
        for post in posts {
            assert_eq!(post.join().unwrap().0, 400);
        }
        eprintln!("2 MB prompt rejected in {rejected_in:?}; /health during eight: {health:?}");
        assert!(health < Duration::from_secs(2), "{health:?}");
    });
    assert!(rejected_in < Duration::from_secs(3), "{rejected_in:?}");

    // Bodies over the limit, URIs and headers too long, broken chunked bodies: JSON errors.
    // Refused on its declared length, before a byte of it is read.
    let declared = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 3100000\r\n\r\n{";
    let (status, error) = raw_json(&raw(&server, declared, Duration::from_secs(10)));
    assert_eq!(status, 413, "{error}");
    assert_eq!(error["error"]["code"], "body_too_large");
    // Refused as it arrives, when no length was declared.
    let mut chunked = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..40 {
        chunked
            .extend_from_slice(format!("{:x}\r\n{}\r\n", 100_000, "x".repeat(100_000)).as_bytes());
    }
    let (status, error) = raw_json(&raw(&server, &chunked, Duration::from_secs(10)));
    assert_eq!(status, 413, "{error}");
    let (code, body) = server.get(&format!("/v1/models?{}", "q".repeat(9000)));
    assert_eq!(code, 414, "{body}");
    assert!(serde_json::from_str::<Value>(&body).is_ok(), "{body}");
    let headers = format!(
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "h".repeat(40_000)
    );
    let (status, error) = raw_json(&raw(&server, headers.as_bytes(), Duration::from_secs(10)));
    assert_eq!(status, 431, "{error}");
    let chunked = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nZZ\r\nnot a chunk\r\n0\r\n\r\n";
    let (status, error) = raw_json(&raw(&server, chunked, Duration::from_secs(10)));
    assert_eq!(status, 400, "{error}");
    let (code, body) = server.post("/v1/chat/completions", &chat("Say hi.", 4));
    assert_eq!(code, 200, "{body}");
}

/// API keys, Content-Type, Origin and Host.
#[test]
fn strangers_are_refused_and_keys_let_clients_in() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, "sk-first\n\nsk-second\n").unwrap();
    let server = Server::start(&[
        "--api-key-file",
        key_file.to_str().unwrap(),
        "--cors-origins",
        "http://app.example",
        "--exit-adapters",
        "none",
    ]);
    let models = server.url("/v1/models");
    let status = |r: Result<ureq::Response, ureq::Error>| into_json(r);
    let error = assert_api_error(status(ureq::get(&models).call()), 401, "API key");
    assert_eq!(error["code"], "invalid_api_key");
    assert_api_error(
        status(
            ureq::get(&models)
                .set("Authorization", "Bearer sk-wrong")
                .call(),
        ),
        401,
        "not valid",
    );
    for key in ["sk-first", "sk-second"] {
        let (code, _) = status(
            ureq::get(&models)
                .set("Authorization", &format!("Bearer {key}"))
                .call(),
        );
        assert_eq!(code, 200);
    }
    // Probes and scrapers need no key.
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get("/metrics").0, 200);
    let authorized =
        |path: &str| ureq::post(&server.url(path)).set("Authorization", "Bearer sk-first");
    // A simple cross-origin POST (text/plain, no preflight) is refused for its type...
    let error = assert_api_error(
        status(
            authorized("/v1/chat/completions")
                .set("Content-Type", "text/plain")
                .send_string(&chat("hi", 2).to_string()),
        ),
        415,
        "application/json",
    );
    assert_eq!(error["code"], "unsupported_media_type");
    // ...and for its origin, unless the origin is allowed.
    let error = assert_api_error(
        status(
            authorized("/v1/chat/completions")
                .set("Content-Type", "application/json")
                .set("Origin", "http://evil.example")
                .send_string(&chat("hi", 2).to_string()),
        ),
        403,
        "cross-origin",
    );
    assert_eq!(error["code"], "origin_not_allowed");
    let preflight = ureq::request("OPTIONS", &server.url("/v1/chat/completions"))
        .set("Origin", "http://app.example")
        .set("Access-Control-Request-Method", "POST")
        .set(
            "Access-Control-Request-Headers",
            "authorization, content-type, x-stainless-os",
        )
        .call()
        .expect("preflight");
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    assert_eq!(
        preflight.header("access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-os")
    );
    // The scheme is case-insensitive; an allowed page can read a refusal too.
    let (code, _) = status(
        ureq::get(&models)
            .set("Authorization", "bearer sk-first")
            .call(),
    );
    assert_eq!(code, 200);
    let refused = ureq::get(&models)
        .set("Origin", "http://app.example")
        .call();
    match refused {
        Err(ureq::Error::Status(401, r)) => assert_eq!(
            r.header("access-control-allow-origin"),
            Some("http://app.example")
        ),
        other => panic!("expected a 401 an allowed origin can read: {other:?}"),
    }
    let allowed = authorized("/v1/chat/completions")
        .set("Content-Type", "application/json")
        .set("Origin", "http://app.example")
        .send_string(&chat("hi", 2).to_string())
        .expect("allowed origin");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    // DNS rebinding: a name that resolves here but is not ours.
    let error = assert_api_error(
        status(
            ureq::get(&server.url("/health"))
                .set("Host", "attacker.example")
                .call(),
        ),
        403,
        "attacker.example",
    );
    assert_eq!(error["code"], "host_not_allowed");
}

/// Every option that used to be accepted and ignored is now honoured or refused.
#[test]
fn every_option_is_honoured_or_refused() {
    // With a draft, so penalized requests also show they fall back to plain decoding.
    let server = Server::start(&["--draft", "ngram", "--exit-adapters", "none"]);
    let path = "/v1/chat/completions";
    for (field, value) in [
        ("response_format", json!({"type": "json_object"})),
        ("tool_choice", json!("auto")),
        ("functions", json!([{"name": "f"}])),
        ("echo", json!(true)),
        ("best_of", json!(2)),
        ("logprobs", json!(true)),
        ("suffix", json!("end")),
        ("min_p", json!(0.1)),
        ("made_up_option", json!(1)),
    ] {
        let mut body = chat("hi", 4);
        body[field] = value;
        let error = assert_api_error(server.post(path, &body), 400, field);
        assert_eq!(error["param"], field, "{error}");
    }
    // Their neutral values are fine.
    let mut body = chat("Say hi.", 4);
    for (field, value) in [
        ("response_format", json!({"type": "text"})),
        ("tool_choice", json!("none")),
        ("echo", json!(false)),
        ("best_of", json!(1)),
        ("user", json!("someone")),
    ] {
        body[field] = value;
    }
    assert_eq!(server.post(path, &body).0, 200);
    for (field, value) in [
        ("top_p", json!(1.5)),
        ("early_exit", json!("confidence:-5")),
        ("frequency_penalty", json!(3)),
        ("logit_bias", json!({"5": 200})),
        ("logit_bias", json!({"99999999": 1})),
        // A request may not make the server read a file.
        ("lookahead", json!("disco:/etc/passwd")),
    ] {
        let mut body = chat("hi", 4);
        body[field] = value;
        assert_api_error(server.post(path, &body), 400, field);
    }
    // A temperature too small to divide by is greedy, not empty.
    let question = "Name a colour.";
    let greedy = server.post(path, &chat(question, 8)).1;
    let mut tiny = chat(question, 8);
    tiny["temperature"] = json!(1e-46);
    assert_eq!(
        server.post(path, &tiny).1["choices"][0]["message"],
        greedy["choices"][0]["message"]
    );
    // Penalties change the answer exactly as `generate` applies them.
    let prompt = "Repeat after me: the cat, the cat, the cat, the cat,";
    for (field, flag) in [
        ("frequency_penalty", "--frequency-penalty"),
        ("presence_penalty", "--presence-penalty"),
    ] {
        let body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, field: 1.5});
        let (code, served) = server.post("/v1/completions", &body);
        assert_eq!(code, 200, "{served}");
        let reference = stdout_json(&dynexec(&[
            "--json", "generate", "--prompt", prompt, "-n", "16", flag, "1.5",
        ]));
        assert_eq!(served["choices"][0]["text"], reference["text"], "{field}");
        let plain = server
            .post(
                "/v1/completions",
                &json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}),
            )
            .1;
        assert_ne!(
            served["choices"][0]["text"], plain["choices"][0]["text"],
            "{field} changed nothing"
        );
    }
    // logit_bias forces a token, as `generate --logit-bias` does.
    let prompt = "The capital of France is";
    let body =
        json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "logit_bias": {"28": 100}});
    let (code, biased) = server.post("/v1/completions", &body);
    assert_eq!(code, 200, "{biased}");
    let reference = stdout_json(&dynexec(&[
        "--json",
        "generate",
        "--prompt",
        prompt,
        "-n",
        "3",
        "--logit-bias",
        "28=100",
    ]));
    assert_eq!(biased["choices"][0]["text"], reference["text"]);
    let plain = server
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 3, "temperature": 0}),
        )
        .1;
    assert_ne!(biased["choices"][0]["text"], plain["choices"][0]["text"]);
}

/// More requests than slots and queue: the extra ones get 503 with Retry-After, every other
/// one is answered, and nothing else fails.
#[test]
fn a_burst_beyond_the_queue_gets_503_with_retry_after() {
    let server = Server::start(&[
        "--max-batch",
        "1",
        "--max-queue",
        "2",
        "--exit-adapters",
        "none",
    ]);
    let body = json!({"prompt": "Count to twenty:", "max_tokens": 24, "temperature": 0,
        "ignore_eos": true});
    let outcomes: Vec<(u16, Option<String>, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|_| {
                s.spawn(|| {
                    let response = ureq::post(&server.url("/v1/completions"))
                        .set("Content-Type", "application/json")
                        .send_string(&body.to_string());
                    let (code, r) = match response {
                        Ok(r) => (r.status(), r),
                        Err(ureq::Error::Status(code, r)) => (code, r),
                        Err(e) => panic!("request failed: {e}"),
                    };
                    let retry = r.header("retry-after").map(str::to_string);
                    (code, retry, r.into_json().expect("JSON body"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = outcomes.iter().filter(|o| o.0 == 200).count();
    let busy: Vec<_> = outcomes.iter().filter(|o| o.0 == 503).collect();
    assert_eq!(ok + busy.len(), 12, "{outcomes:?}");
    // At least the queue's two are answered (the slot's request may have come through the
    // queue too, when all arrived before the engine took the first).
    assert!(
        ok >= 2 && !busy.is_empty(),
        "{ok} answered, {} refused",
        busy.len()
    );
    for (_, retry, body) in busy {
        assert!(
            retry.as_deref().is_some_and(|r| r.parse::<u64>().is_ok()),
            "{body}"
        );
        assert_eq!(body["error"]["code"], "server_overloaded");
    }
}

/// The resident memory of the server does not grow over 200 requests (after warming up).
#[test]
fn memory_does_not_grow_over_200_requests() {
    let server = Server::start(&["--exit-adapters", "none"]);
    let rss = || {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .to_string();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            / 1024
    };
    let server = &server;
    let run = |n: usize| {
        std::thread::scope(|s| {
            for client in 0..4 {
                s.spawn(move || {
                    for i in (client..n).step_by(4) {
                        let body = json!({"prompt": format!("Request number {i}: say"),
                            "max_tokens": 3, "temperature": 0, "stream": i % 2 == 0});
                        let r = ureq::post(&server.url("/v1/completions"))
                            .set("Content-Type", "application/json")
                            .send_string(&body.to_string())
                            .expect("request");
                        let _ = r.into_string();
                    }
                });
            }
        })
    };
    run(40);
    let before = rss();
    run(200);
    let after = rss();
    eprintln!("RSS {before} MiB before 200 requests, {after} MiB after");
    assert!(after < before + 40, "RSS grew from {before} to {after} MiB");
}
