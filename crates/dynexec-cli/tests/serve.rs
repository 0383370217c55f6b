//! `dynexec serve` end to end: the real server on a loopback port, driven over HTTP, on
//! SmolLM2 (`dynexec models pull smollm2-135m-instruct smollm2-135m-instruct-exits`).

mod common;

use common::server::{assert_api_error, into_json, read_events, Server};
use common::{dynexec, stdout_json};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::{Duration, Instant};

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}]})
}

fn text_of(body: &Value) -> String {
    let choice = &body["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {body}"))
        .to_string()
}

#[test]
fn serves_chat_and_completions_like_generate_streamed_or_whole() {
    let server = Server::start(&["--draft", "ngram"]);
    let (status, health) = server.get("/health");
    assert_eq!((status, health.contains("ok")), (200, true));
    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2-135m-instruct");

    // The served greedy answer is the one `generate` gives (one code path, no drift).
    let question = "Give me three colours.";
    let (code, whole) = server.post("/v1/chat/completions", &chat(question, 24));
    assert_eq!(code, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let text = text_of(&whole);
    let reference = stdout_json(&dynexec(&[
        "--json", "generate", "--chat", "--prompt", question, "-n", "24",
    ]));
    assert_eq!(text, reference["text"].as_str().unwrap());
    let usage = &whole["usage"];
    assert_eq!(usage["completion_tokens"], reference["generated_tokens"]);
    assert_eq!(usage["prompt_tokens"], reference["prompt_tokens"]);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    // A server with a draft drafts by default, losslessly, and says so.
    let spec = &whole["dynexec"]["speculative"];
    assert_eq!(spec["draft"], "ngram:3,10", "{whole}");

    // Streamed: the deltas add up to the same text; role first, finish reason and usage last.
    let mut request = chat(question, 24);
    request["stream_options"] = json!({"include_usage": true});
    request["speculative"] = json!(false);
    let (events, done) = server.stream("/v1/chat/completions", &request);
    assert!(done, "the stream must end with [DONE]");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(events
        .iter()
        .all(|e| e["object"] == "chat.completion.chunk"));
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let (last, usage_chunk) = (&events[events.len() - 2], &events[events.len() - 1]);
    assert_eq!(
        last["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert!(last["dynexec"]["speculative"].is_null(), "{last}");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);

    // Completions: max_tokens ends with "length"; a stop string is cut and never sent.
    let (code, completion) = server.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(code, 200, "{completion}");
    assert_eq!(completion["object"], "text_completion");
    let full = text_of(&completion);
    assert_eq!(completion["usage"]["completion_tokens"], 12);
    assert_eq!(completion["choices"][0]["finish_reason"], "length");
    let cut_at = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop = full[cut_at..].chars().take(3).collect::<String>();
    let expected = &full[..full.find(&stop).unwrap()];
    let body = json!({"prompt": "The capital of France is", "max_tokens": 12,
        "temperature": 0, "stop": [stop]});
    let (_, stopped) = server.post("/v1/completions", &body);
    assert_eq!(text_of(&stopped), expected);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    let (events, done) = server.stream("/v1/completions", &body);
    assert!(done);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, expected);

    // Early exit per request: reported, at a mean depth within the model's.
    let mut early = chat(question, 16);
    early["early_exit"] = json!("confidence:0.5");
    let (code, body) = server.post("/v1/chat/completions", &early);
    assert_eq!(code, 200, "{body}");
    let exit = &body["dynexec"]["early_exit"];
    let mean = exit["mean_exit_layer"].as_f64().unwrap();
    assert!(mean > 0.0 && mean <= 30.0, "{exit}");
    assert!(body["dynexec"]["speculative"].is_null());
    // The committed adapters carry exit classifiers: CALM's cheap measure, per request.
    early["early_exit"] = json!("classifier:0.9");
    let (code, body) = server.post("/v1/chat/completions", &early);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["dynexec"]["early_exit"]["policy"], "classifier:0.9");
    let models: Value = serde_json::from_str(&server.get("/v1/models").1).unwrap();
    assert_eq!(models["data"][0]["dynexec"]["exit_classifiers"], true);

    let metrics = server.get("/metrics").1;
    for name in [
        "dynexec_requests_total{outcome=\"ok\"}",
        "dynexec_queue_depth",
        "dynexec_acceptance_rate",
        "dynexec_time_to_first_token_seconds_bucket",
        "dynexec_time_per_output_token_seconds_count",
    ] {
        assert!(metrics.contains(name), "no {name} in /metrics");
    }
    assert!(server.metric("dynexec_requests_total{outcome=\"ok\"}") >= 6.0);
}

/// Posts every body to /v1/completions at once; each answer's text and `dynexec` report.
fn all_at_once(server: &Server, bodies: &[Value]) -> Vec<(String, Value)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|body| {
                s.spawn(move || {
                    let (code, out) = server.post("/v1/completions", body);
                    assert_eq!(code, 200, "{out}");
                    (text_of(&out), out["dynexec"].clone())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn concurrent_requests_batch_and_match_their_solo_answers() {
    let server = Server::start(&["--draft", "ngram", "--max-batch", "8"]);
    let prompts = [
        "Once upon a time",
        "The three laws of motion are",
        "def fibonacci(n):",
        "My favourite recipe for soup",
        "The history of Rome",
        "Photosynthesis is",
    ];
    let body = |p: &str, speculative: bool| json!({"prompt": p, "max_tokens": 20, "temperature": 0, "speculative": speculative});
    let solo: Vec<String> = prompts
        .iter()
        .map(|p| text_of(&server.post("/v1/completions", &body(p, false)).1))
        .collect();
    // All at once, plain (batched) and speculative (stepped alongside): the same answers.
    let bodies: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| body(p, i % 3 == 0))
        .collect();
    let answers = all_at_once(&server, &bodies);
    for ((answer, report), expected) in answers.iter().zip(&solo) {
        assert_eq!(answer, expected, "{report}");
    }
    assert!(
        answers
            .iter()
            .any(|(_, r)| r["batch_size"].as_u64() > Some(1)),
        "no request was decoded in a batch: {answers:?}"
    );
    assert!(server.metric("dynexec_batch_size_sum") > server.metric("dynexec_batch_size_count"));

    // A client that disconnects mid-stream has its sequence dropped.
    let cancelled_before = server.metric("dynexec_requests_total{outcome=\"cancelled\"}");
    let response = ureq::post(&server.url("/v1/completions"))
        .set("content-type", "application/json")
        .send_string(
            &json!({"prompt": "List every prime number:", "max_tokens": 400,
                "temperature": 0, "stream": true, "speculative": false})
            .to_string(),
        )
        .expect("stream");
    let mut reader = BufReader::new(response.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("dynexec_requests_total{outcome=\"cancelled\"}") <= cancelled_before {
        assert!(
            Instant::now() < deadline,
            "the disconnected request was never cancelled"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    while server.metric("dynexec_active_sequences") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the cancelled sequence is still decoding"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Speculative sequences share the target's forward with plain ones (several rows each) and
/// their draft model's forwards with each other; above --spec-max-batch they decode one token
/// a step. Every answer stays what plain greedy decoding gives.
#[test]
fn speculative_requests_batch_their_drafts_and_verifications() {
    let prompts = [
        "Once upon a time",
        "The three laws of motion are",
        "def fibonacci(n):",
        "My favourite recipe for soup",
    ];
    let body = |p: &str, speculative: bool| json!({"prompt": p, "max_tokens": 16, "temperature": 0, "speculative": speculative});
    for (spec_max_batch, disabled) in [("8", false), ("1", true)] {
        let server = Server::start(&[
            "--draft",
            "self-quant:q4_0",
            "--lookahead",
            "fixed:3",
            "--max-batch",
            "8",
            "--spec-max-batch",
            spec_max_batch,
        ]);
        let solo: Vec<String> = prompts
            .iter()
            .map(|p| text_of(&server.post("/v1/completions", &body(p, false)).1))
            .collect();
        // Three speculative requests and a plain one, all at once.
        let bodies: Vec<Value> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| body(p, i != 1))
            .collect();
        let answers = all_at_once(&server, &bodies);
        for ((answer, report), expected) in answers.iter().zip(&solo) {
            assert_eq!(
                answer, expected,
                "--spec-max-batch {spec_max_batch}: {report}"
            );
        }
        assert!(
            answers
                .iter()
                .any(|(_, r)| r["batch_size"].as_u64() > Some(1)),
            "no request was decoded in a batch: {answers:?}"
        );
        // Drafting ran where allowed (with the limit at 1, maybe never: all may end together).
        assert!(disabled || server.metric("dynexec_drafts_total") > 0.0);
        assert!(
            server.metric("dynexec_draft_tokens_accepted_total")
                <= server.metric("dynexec_draft_tokens_proposed_total")
        );
        let off = server.metric("dynexec_speculation_disabled_steps_total");
        assert_eq!(
            off > 0.0,
            disabled,
            "--spec-max-batch {spec_max_batch}: {off} steps without drafts"
        );
    }
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let server = Server::start(&["--max-tokens", "64", "--exit-adapters", "none"]);
    let path = "/v1/chat/completions";
    assert_api_error(
        server.post_raw(path, "{\"messages\": ["),
        400,
        "not valid JSON",
    );
    assert_api_error(server.post_raw(path, ""), 400, "empty");
    assert_api_error(server.post_raw(path, "[1, 2]"), 400, "JSON object");
    assert_api_error(
        server.post(path, &json!({"messages": "hi"})),
        400,
        "`messages` must be a list",
    );
    assert_api_error(server.post(path, &json!({"messages": []})), 400, "messages");
    let mut bad = chat("hi", 8);
    bad["model"] = json!("gpt-4o");
    let error = assert_api_error(server.post(path, &bad), 404, "does not exist");
    assert_eq!(error["code"], "model_not_found");
    for (field, value, needle) in [
        ("temperature", json!(3.5), "temperature"),
        (
            "temperature",
            json!("hot"),
            "`temperature` must be a number",
        ),
        ("top_p", json!(0), "top_p"),
        ("max_tokens", json!(0), "at least 1"),
        ("max_tokens", json!(65), "at most 64"),
        ("n", json!(2), "`n` must be 1"),
        ("stop", json!(5), "stop"),
        ("speculative", json!(true), "no draft"),
        ("early_exit", json!("confidence:0.9"), "no exit adapters"),
    ] {
        let mut body = chat("hi", 8);
        body[field] = value;
        let error = assert_api_error(server.post(path, &body), 400, needle);
        assert_eq!(error["type"], "invalid_request_error");
    }
    let mut roles = chat("hi", 8);
    roles["messages"][0]["role"] = json!("wizard");
    assert_api_error(server.post(path, &roles), 400, "role");
    // A prompt longer than the context (8192 tokens).
    let long = "word ".repeat(9000);
    let error = assert_api_error(server.post(path, &chat(&long, 8)), 400, "context");
    assert_eq!(error["code"], "context_length_exceeded");
    assert_api_error(
        server.post("/v1/completions", &json!({"prompt": [1, 99999999]})),
        400,
        "vocabulary",
    );
    assert_api_error(
        server.post("/v1/completions", &json!({"prompt": ["a", "b"]})),
        400,
        "one prompt",
    );
    let (code, body) = server.get("/v1/nothing");
    assert_eq!(code, 404, "{body}");
    let (code, _) = server.get("/v1/chat/completions");
    assert_eq!(code, 405);
    // After all that, it still answers.
    let (code, body) = server.post(path, &chat("Say hi.", 4));
    assert_eq!(code, 200, "{body}");
    assert!(server.metric("dynexec_requests_total{outcome=\"client_error\"}") >= 18.0);
}

#[test]
fn a_full_queue_answers_503_and_shutdown_finishes_streams_in_flight() {
    // A shutdown timeout long enough for a busy test machine to finish the stream.
    let server = Server::start(&[
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--shutdown-timeout",
        "900",
    ]);
    let long = json!({"prompt": "Count from one to one hundred:", "max_tokens": 96,
        "temperature": 0, "stream": true});
    // One request decoding, one waiting: a third has no room.
    let response = ureq::post(&server.url("/v1/completions"))
        .set("content-type", "application/json")
        .send_string(&long.to_string())
        .expect("first request");
    let mut first = BufReader::new(response.into_reader());
    let mut line = String::new();
    first.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    let waiting = std::thread::spawn({
        let url = server.url("/v1/completions");
        move || {
            into_json(
                ureq::post(&url)
                    .set("content-type", "application/json")
                    .send_string(&json!({"prompt": "Hello", "max_tokens": 4}).to_string()),
            )
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("dynexec_queue_depth") < 1.0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let error = assert_api_error(
        server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4})),
        503,
        "queue is full",
    );
    assert_eq!(error["code"], "server_overloaded");
    // Alive but full: /health says busy (200); /health?ready tells a balancer to go elsewhere.
    let (code, health) = server.get("/health");
    assert_eq!(code, 200, "{health}");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "busy", "{health}");
    assert_eq!(
        (health["queue_depth"].as_u64(), health["ready"].as_bool()),
        (Some(1), Some(false))
    );
    let ready = ureq::get(&server.url("/health?ready")).call();
    match ready {
        Err(ureq::Error::Status(503, r)) => {
            assert!(r.header("retry-after").is_some());
        }
        other => panic!("/health?ready with a full queue: {other:?}"),
    }

    // SIGTERM while streaming: the stream still ends properly, then the process exits cleanly.
    server.terminate();
    let (events, done) = read_events(first);
    assert!(done, "the in-flight stream was cut off");
    let last = events.last().expect("events");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    let (code, queued) = waiting.join().unwrap();
    assert_eq!(
        code, 200,
        "the queued request must still be answered: {queued}"
    );
    let mut server = server;
    let status = server.child.wait().expect("wait");
    assert!(status.success(), "serve exited with {status}");
    let log: Vec<String> = server.log.lock().unwrap().try_iter().collect();
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");
}

#[test]
fn a_dropped_request_is_cancelled_and_shutdown_ends_overlong_streams_cleanly() {
    let server = Server::start(&["--shutdown-timeout", "1", "--exit-adapters", "none"]);
    // A whole (non-streaming) request whose client gives up.
    let impatient = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(500))
        .build();
    let gone = impatient
        .post(&server.url("/v1/completions"))
        .send_json(json!({"prompt": "All the primes:", "max_tokens": 500, "ignore_eos": true}));
    assert!(gone.is_err(), "the request should have timed out");
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("dynexec_requests_total{outcome=\"cancelled\"}") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned request was never cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A stream still running when the shutdown timeout passes ends with an error event and
    // [DONE], and the process still exits cleanly.
    let response = ureq::post(&server.url("/v1/completions"))
        .send_json(json!({"prompt": "All the primes:", "max_tokens": 500,
            "ignore_eos": true, "stream": true}))
        .expect("stream");
    let mut reader = BufReader::new(response.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    server.terminate();
    let (events, done) = read_events(reader);
    assert!(done, "the stream must still end with [DONE]");
    let last = events.last().expect("events");
    assert_eq!(last["error"]["code"], "shutting_down", "{last}");
    let mut server = server;
    let status = server.child.wait().expect("wait");
    assert!(status.success(), "serve exited with {status}");
}

/// The official `openai` Python package (CI installs it from PyPI) talks to the server.
#[test]
fn the_official_openai_python_client_works() {
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        assert!(
            std::env::var_os("DYNEXEC_REQUIRE_OPENAI").is_none(),
            "DYNEXEC_REQUIRE_OPENAI is set but the openai package is missing: pip install openai"
        );
        eprintln!("skipped: the openai Python package is not installed (pip install openai)");
        return;
    }
    let server = Server::start(&[
        "--draft",
        "ngram",
        "--api-key",
        "sk-dynexec-test",
        "--embedding",
        "minilm-l6",
    ]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new("python3")
        .args([
            script,
            &server.base,
            "smollm2-135m-instruct",
            "sk-dynexec-test",
            "minilm-l6",
        ])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(
        report["models"],
        json!(["smollm2-135m-instruct", "minilm-l6"])
    );
    assert_cosines(&report["cosines"]);
    assert_eq!(report["streamed"], report["chat"]);
    assert_eq!(report["speculative"], report["chat"]);
    assert!(!report["chat"].as_str().unwrap().is_empty());
    assert_eq!(report["errors"], json!([404, 400, 401]));
}

/// sentence-transformers' cosines for all-MiniLM-L6-v2 on three pairs (the cat, the movie,
/// pasta and pizza), in the order `the_embedding_pairs` lists them.
const REFERENCE_COSINES: [f64; 3] = [0.6788, 0.8939, 0.5096];

fn the_embedding_pairs() -> Vec<&'static str> {
    vec![
        "The cat sits outside",
        "The cat plays in the garden",
        "The new movie is awesome",
        "The new movie is so great",
        "I love pasta",
        "Do you like pizza?",
    ]
}

/// Standard base64 of little-endian f32s, decoded.
fn decode_base64_f32(text: &str) -> Vec<f32> {
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let (mut count, mut bytes) = (0, Vec::new());
    for c in text.chars().filter(|&c| c != '=') {
        bits = bits << 6 | alphabet.find(c).expect("a base64 character") as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            bytes.push((bits >> count) as u8);
        }
    }
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn assert_cosines(cosines: &Value) {
    let cosines = cosines.as_array().expect("cosines");
    for (cos, expected) in cosines.iter().zip(REFERENCE_COSINES) {
        let cos = cos.as_f64().unwrap();
        assert!(
            (cos - expected).abs() < 1e-3,
            "cosine {cos}, sentence-transformers {expected}"
        );
    }
    assert_eq!(cosines.len(), 3);
}

/// `/v1/embeddings` in OpenAI's shape from a BERT encoder beside the decoder: the reference
/// cosines, base64 equal to floats, and clear errors.
#[test]
fn embeddings_match_sentence_transformers() {
    let server = Server::start(&["--exit-adapters", "none", "--embedding", "minilm-l6"]);
    let texts = the_embedding_pairs();
    let (code, out) = server.post(
        "/v1/embeddings",
        &json!({"model": "minilm-l6", "input": texts}),
    );
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["object"], "list");
    let vectors: Vec<Vec<f64>> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(
                (d["index"].as_u64(), d["object"].as_str()),
                (Some(i as u64), Some("embedding"))
            );
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vectors[0].len(), 384);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let cosines: Vec<f64> = (0..3)
        .map(|i| dot(&vectors[2 * i], &vectors[2 * i + 1]))
        .collect();
    assert_cosines(&json!(cosines));
    assert!(out["usage"]["prompt_tokens"].as_u64().unwrap() > 6, "{out}");

    // base64 carries the same little-endian f32s.
    let (_, b64) = server.post(
        "/v1/embeddings",
        &json!({"input": texts[0], "encoding_format": "base64", "dimensions": 384}),
    );
    let encoded = b64["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string");
    let decoded = decode_base64_f32(encoded);
    assert_eq!(decoded.len(), 384);
    let worst = decoded
        .iter()
        .zip(&vectors[0])
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-6,
        "base64 and float embeddings differ by {worst}"
    );
    let (code, models) = server.get("/v1/models");
    assert_eq!(code, 200);
    assert!(
        models.contains("\"minilm-l6\"") && models.contains("\"embedding\""),
        "{models}"
    );

    for (body, status, needle) in [
        (
            json!({"input": [[1, 2, 3]]}),
            400,
            "token-id inputs are not supported",
        ),
        (json!({"input": []}), 400, "1 to 2048"),
        (json!({"input": ""}), 400, "empty string"),
        (
            json!({"input": "x", "model": "text-embedding-3-small"}),
            404,
            "does not exist",
        ),
        (
            json!({"input": "x", "dimensions": 128}),
            400,
            "384 dimensions",
        ),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            400,
            "float or base64",
        ),
        (
            json!({"input": "x", "truncate": true}),
            400,
            "unknown field `truncate`",
        ),
        (
            json!({"input": "word ".repeat(200)}),
            400,
            "takes at most 128",
        ),
    ] {
        assert_api_error(server.post("/v1/embeddings", &body), status, needle);
    }
}

/// llama-server's `/tokenize` and `/detokenize`, and the KV-cache gauge.
#[test]
fn tokenize_and_detokenize_like_llama_server() {
    let server = Server::start(&["--exit-adapters", "none"]);
    let text = "Hello world, 你好";
    let (code, out) = server.post("/tokenize", &json!({"content": text}));
    assert_eq!(code, 200, "{out}");
    let ids = out["tokens"].as_array().expect("tokens").clone();
    assert!(!ids.is_empty() && ids.iter().all(Value::is_u64), "{out}");
    let (_, pieces) = server.post("/tokenize", &json!({"content": text, "with_pieces": true}));
    let pieces = pieces["tokens"].as_array().unwrap();
    assert_eq!(pieces.len(), ids.len());
    assert_eq!(pieces[0]["id"], ids[0]);
    let (code, back) = server.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(code, 200, "{back}");
    assert_eq!(back["content"], text);
    // With the model's own specials, the count is what a completion's prompt costs.
    let (_, special) = server.post("/tokenize", &json!({"content": text, "add_special": true}));
    let (_, completion) = server.post(
        "/v1/completions",
        &json!({"prompt": text, "max_tokens": 1, "temperature": 0}),
    );
    assert_eq!(
        completion["usage"]["prompt_tokens"].as_u64(),
        Some(special["tokens"].as_array().unwrap().len() as u64)
    );
    assert_api_error(server.post("/tokenize", &json!({})), 400, "content");
    assert_api_error(
        server.post("/tokenize", &json!({"content": "x", "pieces": true})),
        400,
        "unknown field",
    );
    assert_api_error(
        server.post("/detokenize", &json!({"tokens": [1, 99999999]})),
        400,
        "vocabulary",
    );
    assert!(server.metric("dynexec_kv_cache_usage_ratio") >= 0.0);
}

/// `serve -c N` caps the context every request must fit in.
#[test]
fn a_capped_context_is_served_and_enforced() {
    let server = Server::start(&["-c", "64", "--exit-adapters", "none"]);
    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["context_length"], 64);
    let long = "word ".repeat(80);
    let error = assert_api_error(
        server.post("/v1/completions", &json!({"prompt": long, "max_tokens": 2})),
        400,
        "context",
    );
    assert_eq!(error["code"], "context_length_exceeded");
    let (code, body) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(code, 200, "{body}");
}

/// A stream waiting in the queue behind a long prefill gets SSE keep-alive comments before
/// its first event, then its answer as usual.
#[test]
fn a_queued_stream_gets_keep_alive_comments() {
    let server = Server::start(&[
        "--exit-adapters",
        "none",
        "--max-batch",
        "1",
        "--sse-keep-alive",
        "1",
    ]);
    let long =
        json!({"prompt": "the river runs far ".repeat(500), "max_tokens": 32, "temperature": 0});
    let url = server.url("/v1/completions");
    let first = std::thread::spawn(move || {
        ureq::post(&url)
            .set("content-type", "application/json")
            .send_string(&long.to_string())
            .map(|r| r.status())
    });
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "stream": true});
    let raw = ureq::post(&server.url("/v1/completions"))
        .set("content-type", "application/json")
        .send_string(&body.to_string())
        .expect("the stream starts")
        .into_string()
        .expect("the stream's body");
    let waited = started.elapsed();
    assert_eq!(first.join().unwrap().expect("the long request"), 200);
    let comment = raw.find(": keep-alive").unwrap_or_else(|| {
        panic!("no keep-alive comment in a stream that waited {waited:?}: {raw}")
    });
    assert!(comment < raw.find("data:").expect("events"), "{raw}");
    assert!(raw.trim_end().ends_with("data: [DONE]"), "{raw}");
}

/// A multi-turn chat reuses the previous turn's KV cache: each turn after the first reports
/// cached prompt tokens, prefills only the rest, and answers exactly as a cold request
/// (`cache_prompt: false`) does; a shared system prompt is reused across conversations.
#[test]
fn prefix_reuse_answers_as_a_cold_request_does() {
    let server = Server::start(&["--exit-adapters", "none", "--max-batch", "2"]);
    let system = json!({"role": "system", "content": "You are a terse assistant. Answer in one short sentence."});
    let mut messages = vec![system.clone()];
    let questions = [
        "Name a planet.",
        "How far is it from the Sun?",
        "And its largest moon?",
    ];
    let (_, before) = server.get("/metrics");
    for (turn, question) in questions.iter().enumerate() {
        messages.push(json!({"role": "user", "content": question}));
        let body = |cache: bool| json!({"messages": messages, "max_tokens": 24, "temperature": 0, "cache_prompt": cache});
        let (code, warm) = server.post("/v1/chat/completions", &body(true));
        assert_eq!(code, 200, "{warm}");
        let (_, cold) = server.post("/v1/chat/completions", &body(false));
        assert_eq!(text_of(&warm), text_of(&cold), "turn {turn}");
        let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
        assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        if turn > 0 {
            // Everything up to the new user turn was cached (the template closes the
            // previous answer the way the model ended it, or close to it).
            assert!(
                cached > prompt / 2 && cached < prompt,
                "turn {turn}: {cached} of {prompt}"
            );
        }
        messages.push(json!({"role": "assistant", "content": text_of(&warm)}));
    }
    // Another client (another cache_salt, as another API key would be) reuses nothing of it,
    // and learns nothing from `cached_tokens`; its own next request reuses what it left.
    let mut salted = json!({"messages": messages, "max_tokens": 4, "temperature": 0,
        "cache_salt": "another tenant"});
    let (_, stranger) = server.post("/v1/chat/completions", &salted);
    assert_eq!(
        stranger["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{stranger}"
    );
    salted["max_tokens"] = json!(2);
    let (_, again) = server.post("/v1/chat/completions", &salted);
    let reused = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert!(reused.unwrap() > 30, "{again}");
    // Another conversation with the same system prompt reuses at least that.
    let other = json!({"messages": [system, {"role": "user", "content": "Name a colour."}],
        "max_tokens": 8, "temperature": 0});
    let (_, answer) = server.post("/v1/chat/completions", &other);
    assert!(
        answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 15,
        "{answer}"
    );
    let (_, after) = server.get("/metrics");
    let counter = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let hits = counter(&after, "dynexec_prefix_cache_hits_total")
        - counter(&before, "dynexec_prefix_cache_hits_total");
    assert!(hits > 30, "{after}");
}

/// A saved trace's files: the states (safetensors bytes) and the sidecar without its
/// `model` field (the server names the model it serves, `generate` the name it was given).
fn trace_files(path: &std::path::Path) -> (Vec<u8>, Value) {
    let states = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sidecar = format!("{}.json", path.display());
    let mut info: Value =
        serde_json::from_str(&std::fs::read_to_string(&sidecar).unwrap()).unwrap();
    info.as_object_mut().unwrap().remove("model");
    (states, info)
}

fn traced_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn served_traces_equal_generate_traces_and_never_change_the_answer() {
    let question = "Name two rivers.";
    let mut traced = chat(question, 10);
    traced["dynexec"] = json!({"trace": {"layers": [0, 7, 30]}});

    // Off by default: a server without --trace-dir refuses the opt-in and says how.
    let plain = Server::start(&["--exit-adapters", "none"]);
    assert_api_error(
        plain.post("/v1/chat/completions", &traced),
        400,
        "--trace-dir",
    );
    drop(plain);

    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    // A self-layer draft proposes every step and is often rejected: the trace must drop the
    // rows of rejected drafts as the cache does.
    let server = Server::start(&[
        "--exit-adapters",
        "none",
        "--draft",
        "self-layers:10",
        "--trace-dir",
        traces.to_str().unwrap(),
    ]);
    let (_, untraced) = server.post("/v1/chat/completions", &chat(question, 10));
    assert!(
        traced_files(&traces).is_empty(),
        "an untraced request saved a trace"
    );
    let reference = dir.path().join("generate.safetensors");
    let out = dynexec(&[
        "--json",
        "generate",
        "--chat",
        "--prompt",
        question,
        "-n",
        "10",
        "--trace",
        reference.to_str().unwrap(),
        "--trace-layers",
        "0,7,30",
    ]);
    let generated = stdout_json(&out);
    let (expected_states, expected_info) = trace_files(&reference);
    for speculative in [true, false] {
        traced["speculative"] = json!(speculative);
        let (code, answer) = server.post("/v1/chat/completions", &traced);
        assert_eq!(code, 200, "{answer}");
        assert_eq!(
            text_of(&answer),
            text_of(&untraced),
            "tracing changed the answer"
        );
        assert_eq!(text_of(&answer), generated["text"].as_str().unwrap());
        assert_eq!(
            answer["dynexec"]["speculative"].is_object(),
            speculative,
            "{answer}"
        );
        let report = &answer["dynexec"]["trace"];
        let file = report["file"].as_str().unwrap();
        assert_eq!(
            file,
            format!("{}.safetensors", answer["id"].as_str().unwrap())
        );
        let path = traces.join(file);
        assert_eq!(report["layers"], json!([0, 7, 30]));
        let (states, info) = trace_files(&path);
        assert_eq!(info, expected_info, "speculative: {speculative}");
        assert!(
            states == expected_states,
            "the served trace's states differ from generate --trace's (speculative: {speculative})"
        );
        // The saved trace is analysed without the model.
        let analysis = dir.path().join(format!("analysis-{speculative}"));
        let out = dynexec(&[
            "--json",
            "analyze",
            "--trace",
            path.to_str().unwrap(),
            "--metric",
            "cka",
            "--no-plots",
            "--out",
            analysis.to_str().unwrap(),
        ]);
        let first = stdout_json(&out);
        assert_eq!(first["layers"], json!([0, 7, 30]));
        // And again: the same numbers, from the file alone.
        let again = stdout_json(&dynexec(&[
            "--json",
            "analyze",
            "--trace",
            path.to_str().unwrap(),
            "--metric",
            "cka",
            "--no-plots",
            "--out",
            analysis.to_str().unwrap(),
        ]));
        assert_eq!(first["matrices"], again["matrices"]);
    }
    // Bad requests for a trace are refused by name.
    let mut bad = traced.clone();
    bad["dynexec"] = json!({"trace": {"layers": [31]}});
    assert_api_error(server.post("/v1/chat/completions", &bad), 400, "layer 31");
    bad["dynexec"] = json!({"trace": {"layer": [3]}});
    assert_api_error(
        server.post("/v1/chat/completions", &bad),
        400,
        "dynexec.trace.layer",
    );
    bad["dynexec"] = json!({"trace": "yes"});
    assert_api_error(
        server.post("/v1/chat/completions", &bad),
        400,
        "dynexec.trace",
    );
}

#[test]
fn the_trace_folder_stays_under_its_quota_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let quota: u64 = 400 << 10;
    let server = Server::start(&[
        "--exit-adapters",
        "none",
        "--trace-dir",
        dir.path().to_str().unwrap(),
        "--trace-quota",
        "400K",
    ]);
    let mut ids = Vec::new();
    for question in ["Name a fruit.", "Name a tree.", "Name a bird."] {
        let mut body = chat(question, 6);
        body["dynexec"] = json!({"trace": {"layers": [0, 30]}});
        let (code, answer) = server.post("/v1/chat/completions", &body);
        assert_eq!(code, 200, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_string());
        let report = &answer["dynexec"]["trace"];
        assert!(report["file"].is_string(), "{answer}");
        // No client learns which other responses' traces went.
        assert!(report.get("dropped").is_none(), "{report}");
        let total: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            total <= quota,
            "{total} bytes in the trace folder, quota {quota}"
        );
    }
    // Two traces of ~40 positions x 2 layers x 576 features fit in 400 KiB, not three:
    // the first one went.
    let left = traced_files(dir.path());
    assert!(!left.iter().any(|f| f.starts_with(&ids[0])), "{left:?}");
    assert!(
        left.contains(&format!("{}.safetensors", ids[2])),
        "{left:?}"
    );
    // A request whose trace could never fit is refused before it runs.
    let mut huge = chat("Name a fish.", 200);
    huge["dynexec"] = json!({"trace": true});
    assert_api_error(
        server.post("/v1/chat/completions", &huge),
        400,
        "trace quota",
    );
}
