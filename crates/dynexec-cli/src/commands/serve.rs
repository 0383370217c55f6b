//! `dynexec serve`: the OpenAI-compatible HTTP server.

use super::common::{
    build_drafter, load_exit_adapters, own_exit_adapters, resolve_lookahead, DraftBoundsArgs,
    DraftCostArgs, ModelArgs, DEFAULT_DECODER,
};
use crate::options::GlobalOptions;
use anyhow::{Context, Result};
use clap::Args;
use dynexec_models::bert::EncoderFiles;
use dynexec_server::{
    serve, Access, Embedder, Engine, EngineConfig, Limits, Metrics, ServeOptions, ServedModel,
    TraceStore,
};
use dynexec_spec::draft_spec::DraftSpec;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone)]
#[command(
    after_help = "Examples:\n  dynexec serve --port 8080\n  dynexec serve smollm2-135m-instruct --draft ngram --max-batch 16\n  dynexec serve --host 0.0.0.0 --api-key-file keys.txt --cors-origins https://app.example\n  curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Name three fruits.\"}], \"max_tokens\": 32}'\n\nPer-request options (extra JSON fields): \"speculative\": true|false, \"lookahead\": \"fixed:4\",\n\"early_exit\": \"confidence:0.9\", \"dynexec\": {\"trace\": true} (with --trace-dir). Responses report what was used under \"dynexec\". Fields,\nerrors, security and scheduling: docs/serving.md."
)]
pub struct ServeArgs {
    /// Model: a manifest name, hf:ORG/REPO[@REV][:FILE], or a local GGUF file / folder
    /// (also as `-m/--model MODEL`).
    #[arg(default_value = DEFAULT_DECODER)]
    pub model: String,

    /// The model, as llama-server and the other commands take it; overrides MODEL.
    #[arg(long = "model", short = 'm', value_name = "MODEL")]
    pub model_flag: Option<String>,

    /// Use this tokenizer.json instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    /// Render chat requests with this Jinja chat template instead of the model's own.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,

    /// Cap the context at N tokens (llama-server's `-c`; default: the model's own): the
    /// prompt and generation of every request must fit, and each slot's KV cache stays
    /// within N.
    #[arg(long = "ctx-size", short = 'c', value_name = "N")]
    pub ctx_size: Option<usize>,

    /// The model name clients send and /v1/models lists (default: MODEL as given;
    /// llama-server's `-a/--alias`, vLLM's `--served-model-name`).
    #[arg(long, short = 'a', aliases = ["alias", "served-model-name"])]
    pub served_name: Option<String>,

    /// Also serve OpenAI's `/v1/embeddings` with this BERT-family sentence encoder (a
    /// manifest name, hf: reference or folder; `--embedding` alone: minilm-l6). Embeddings
    /// are mean-pooled and L2-normalized, as sentence-transformers makes them.
    #[arg(long, alias = "embeddings", value_name = "ENCODER", num_args = 0..=1, default_missing_value = "minilm-l6")]
    pub embedding: Option<String>,

    /// Send a streaming request an SSE comment (`: keep-alive`) whenever it waits this many
    /// seconds for its next event (queued, or behind long prefills), so clients and proxies
    /// with idle timeouts keep it open; 0 never sends one.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub sse_keep_alive: u64,

    /// Keep no finished sequence's KV cache: every request prefills its whole prompt
    /// (by default a plain request starts from the longest prefix an earlier request of the
    /// same client left; see docs/serving.md).
    #[arg(long)]
    pub no_cache_prompt: bool,

    /// Save hidden-state traces of the requests that ask for one (`"dynexec": {"trace":
    /// {"layers": [0, 14, 28]}}`, every layer when none are named) in DIR, named by the
    /// response id, in `generate --trace`'s format; `dynexec analyze --trace DIR/ID.safetensors`
    /// reads them. Off by default.
    #[arg(long, value_name = "DIR")]
    pub trace_dir: Option<PathBuf>,

    /// The most bytes the traces in --trace-dir may take together (e.g. 512M, 4G); the
    /// oldest are deleted to make room, with a warning. A request whose trace could not fit
    /// is refused up front.
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = dynexec_server::traces::parse_size)]
    pub trace_quota: u64,

    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// A draft for speculative decoding, as for `generate --draft` (a model,
    /// `self-quant[:TYPE]`, `self-layers:E`, `ngram[:N,K]`). Requests then decode
    /// speculatively unless they send "speculative": false. (llama-server's
    /// `-md/--model-draft` for a model.)
    #[arg(long, alias = "model-draft")]
    pub draft: Option<String>,

    #[command(flatten)]
    pub draft_cost: DraftCostArgs,

    #[command(flatten)]
    pub draft_bounds: DraftBoundsArgs,

    /// The lookahead speculative requests use unless they send their own, as `generate
    /// --lookahead` takes it (`disco[:MODEL]` included; requests may name a DISCO card by path).
    #[arg(long, default_value = "heuristic")]
    pub lookahead: String,

    /// Exit adapters for requests with "early_exit" (default: the manifest's MODEL-exits
    /// when it has them, e.g. smollm2-135m-instruct-exits for the default model; `none` to
    /// serve without).
    #[arg(long)]
    pub exit_adapters: Option<String>,

    /// Sequences decoded together in one batched step; 1 serves one request at a time
    /// (llama-server's slots, `-np/--parallel`).
    #[arg(long, alias = "parallel", default_value_t = 16)]
    pub max_batch: usize,

    /// Speculative requests draft only while at most this many sequences decode together;
    /// above it every sequence decodes one token per step, as vLLM's
    /// `speculative_disable_by_batch_size`. The default suits a few CPU cores, where batching
    /// already uses the compute that extra rows need: with the Qwen2.5-Coder pair on 2 cores,
    /// speculation gained 4% alone and lost 38% at 4 sequences (`bench serve`). Raise it on
    /// GPUs and many-core machines.
    #[arg(long, default_value_t = 1)]
    pub spec_max_batch: usize,

    /// Tokens one step may run, decoding rows and prompt pieces together (llama-server's
    /// `--batch-size`, vLLM's `--max-num-batched-tokens`), each row counted at its cost: deep
    /// in a long context a row's attention reads every earlier position, so it counts for
    /// more (3.6 rows at the end of SmolLM2's 8K context). Prompts are prefilled in pieces
    /// that fit, between other requests' decoding steps, so a long prompt delays a short
    /// request by about one piece, and short prompts go several to a step. Smaller: lower
    /// latency for others; larger: a long prompt finishes sooner. The default keeps a step
    /// near half a second on SmolLM2 on 2 cores (scripts/bench-prefill.sh); raise it on GPUs
    /// and many-core machines.
    #[arg(
        long,
        short = 'b',
        alias = "max-num-batched-tokens",
        default_value_t = 256
    )]
    pub batch_size: usize,

    /// Requests that may wait for a decoding slot; more get HTTP 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,

    /// The most tokens one request may generate (also the default for requests that give
    /// no max_tokens).
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,

    /// On Ctrl-C or SIGTERM, how many seconds requests in flight may run before they are
    /// ended and every connection left is closed.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Seconds a client may take to send a request's headers, and then its body; also how
    /// long an idle kept-alive connection stays open.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,

    /// Largest request body accepted, in bytes (larger ones get HTTP 413).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,

    /// Require `Authorization: Bearer KEY` on every endpoint (repeatable; /health and /metrics stay
    /// open). Prefer --api-key-file: a key on the command line is visible to other users.
    #[arg(long, value_name = "KEY")]
    pub api_key: Vec<String>,

    /// Read API keys from FILE, one per line.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,

    /// Origins whose web pages may call the server, comma-separated (`*` for any); by
    /// default none: browsers' cross-origin requests are refused.
    #[arg(long, value_name = "ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Host names requests may be addressed to, comma-separated, with or without a port
    /// (which is not checked; `*` for any). Default: the
    /// loopback names when listening on loopback (against DNS rebinding), any otherwise.
    #[arg(long, value_name = "HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
}

pub fn run(global: &GlobalOptions, mut args: ServeArgs) -> Result<()> {
    anyhow::ensure!(args.max_batch >= 1, "--max-batch must be at least 1");
    anyhow::ensure!(args.max_queue >= 1, "--max-queue must be at least 1");
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    anyhow::ensure!(args.timeout >= 1, "--timeout must be at least 1 second");
    if let Some(model) = args.model_flag.take() {
        args.model = model;
    }
    args.lookahead = resolve_lookahead(global, &args.draft_bounds.apply(&args.lookahead))?;
    dynexec_spec::lookahead::parse(&args.lookahead)?;
    let addr = format!("{}:{}", args.host, args.port);
    let addr: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .with_context(|| {
            format!(
                "--host {} --port {} is not an address to listen on",
                args.host, args.port
            )
        })?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;

    let embedder = args
        .embedding
        .as_deref()
        .map(|reference| load_embedder(global, reference))
        .transpose()?;
    let access = access(&args, &addr)?;
    let metrics = Arc::new(Metrics::default());
    let traces = args
        .trace_dir
        .as_deref()
        .map(|dir| TraceStore::open(dir, args.trace_quota))
        .transpose()
        .with_context(|| "--trace-dir: cannot use it for traces")?;
    let config = EngineConfig {
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        spec_max_batch: args.spec_max_batch,
        step_tokens: args.batch_size,
        prefix_cache: !args.no_cache_prompt,
        traces,
    };
    let (load_global, load_args) = (global.clone(), args.clone());
    // The model is loaded on the engine thread, which keeps it; errors come back here.
    let engine = Engine::start(
        move || load_served(&load_global, &load_args).map_err(|e| format!("{e:#}")),
        config,
        metrics.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let info = engine.info().clone();
    let options = ServeOptions {
        addr,
        limits: Limits {
            max_tokens: args.max_tokens,
            trace_quota: args.trace_dir.as_ref().map(|_| args.trace_quota),
        },
        access,
        header_timeout: Duration::from_secs(args.timeout),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        http_threads: 2,
        embedder,
        sse_keep_alive: (args.sse_keep_alive > 0).then(|| Duration::from_secs(args.sse_keep_alive)),
    };
    serve(engine, metrics, options, |bound| {
        eprintln!(
            "dynexec serve: `{}` ({} layers, context {}) on http://{bound} | batch {} | {} tokens a step | queue {} | draft {} | early exit {} | traces {}",
            info.name,
            info.num_layers,
            info.context_length,
            args.max_batch,
            args.batch_size,
            args.max_queue,
            info.draft.as_deref().unwrap_or("none"),
            info.exit_layers
                .as_ref()
                .map_or("none".to_string(), |l| format!("exits after layers {l:?}")),
            args.trace_dir
                .as_ref()
                .map_or("off".to_string(), |d| format!("to {} (quota {} bytes)", d.display(), args.trace_quota)),
        );
    })?;
    eprintln!("dynexec serve: stopped");
    Ok(())
}

/// Who may call: API keys, CORS origins, Host names, body limits.
fn access(args: &ServeArgs, addr: &std::net::SocketAddr) -> Result<Access> {
    let mut api_keys: Vec<String> = args.api_key.iter().map(|k| k.trim().to_string()).collect();
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--api-key-file {}: cannot read it", path.display()))?;
        let keys: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        anyhow::ensure!(
            !keys.is_empty(),
            "--api-key-file {} holds no key (one per line)",
            path.display()
        );
        api_keys.extend(keys);
    }
    anyhow::ensure!(
        api_keys.iter().all(|k| !k.trim().is_empty()),
        "--api-key must not be empty"
    );
    let allowed_hosts = match args.allowed_hosts.as_slice() {
        [] if addr.ip().is_loopback() => Some(Access::loopback_hosts()),
        [] => None,
        hosts if hosts.iter().any(|h| h == "*") => None,
        hosts => Some(hosts.to_vec()),
    };
    if !addr.ip().is_loopback() && api_keys.is_empty() {
        eprintln!(
            "dynexec serve: warning: listening on {} with no --api-key: anyone who can reach this address can use the server",
            addr.ip()
        );
    }
    Ok(Access {
        api_keys,
        cors_origins: args.cors_origins.clone(),
        allowed_hosts,
        max_body_bytes: args.max_body_bytes,
        body_timeout: Duration::from_secs(args.timeout),
    })
}

fn load_served(global: &GlobalOptions, args: &ServeArgs) -> Result<ServedModel> {
    let loaded = ModelArgs {
        model: args.model.clone(),
        tokenizer: args.tokenizer.clone(),
        chat_template: args.chat_template.clone(),
        ctx_size: args.ctx_size,
    }
    .load(global)?;
    let exit_adapters = match args.exit_adapters.as_deref() {
        Some("none") => None,
        Some(reference) => Some(load_exit_adapters(global, reference, &loaded.model)?),
        None => {
            // The manifest's own adapters for the model, when it has them.
            match own_exit_adapters(global, &args.model)? {
                None => None,
                Some(own) => match load_exit_adapters(global, &own, &loaded.model) {
                    Ok(adapters) => Some(adapters),
                    Err(e) => {
                        eprintln!("dynexec serve: serving without early exit ({e:#}); `dynexec models pull {own}` enables it");
                        None
                    }
                },
            }
        }
    };
    args.draft_cost.check_drafting(args.draft.is_some())?;
    let drafter = match args.draft.as_deref().map(str::parse::<DraftSpec>) {
        Some(spec) => {
            let spec = spec?;
            let adapters = exit_adapters.as_ref().filter(|_| spec.uses_exit_adapters());
            Some(build_drafter(
                global,
                &spec,
                &args.draft_cost,
                (&args.model, &loaded),
                adapters,
            )?)
        }
        None => None,
    };
    Ok(ServedModel {
        name: args.served_name.clone().unwrap_or(args.model.clone()),
        model: loaded.model,
        tokenizer: loaded.tokenizer,
        drafter,
        lookahead: args.lookahead.clone(),
        exit_adapters,
    })
}

/// The sentence encoder behind `/v1/embeddings`, served under the name it was given by.
fn load_embedder(global: &GlobalOptions, reference: &str) -> Result<Arc<Embedder>> {
    let files = global.hub()?.resolve(reference)?;
    anyhow::ensure!(
        EncoderFiles::is_encoder(&files),
        "--embedding {reference} is not a BERT-family encoder (its config.json must say model_type \"bert\"), e.g. --embedding minilm-l6"
    );
    let (bert, tokenizer) = EncoderFiles::find(&files, None)?.load(&global.open_device()?)?;
    Ok(Arc::new(Embedder::new(
        reference.to_string(),
        bert,
        tokenizer,
    )))
}
