//! Captions from an OpenAI-compatible chat-completions server (vLLM, llama.cpp's server,
//! Ollama), with SynthCLIP's prompt and sampling settings.
//!
//! For each concept of the bank that the output file does not hold yet, one request is
//! sent to `{endpoint}/v1/chat/completions` ([`chat_completions_url`]) with
//! [`seed_prompt`] as the user message (the seed wraps its prompt in Mistral's
//! `[INST] … [/INST]`, a user turn) and the seed's sampling settings (temperature 0.7,
//! top-p 0.95, presence and frequency penalties 1.0; see [`LlmOptions`]). The reply's
//! `choices[0].message.content` is cleaned with
//! [`clean_caption`]; a reply that yields no caption
//! (multi-line, empty, cut at the token limit) is asked again up to
//! [`LlmOptions::reask`] times and then left out (a later run asks again).
//!
//! Robustness:
//! - **Retries**: HTTP 429 and 5xx answers, time-outs and broken connections are retried
//!   up to [`LlmOptions::max_retries`] times per request with exponential back-off
//!   (`retry_delay · 2^k`, at most `max_retry_delay`; a `Retry-After` header in seconds
//!   takes precedence, within the same cap). Other 4xx answers, a refused connection, an
//!   unknown host and a reply that is not a chat completion stop the run with an error
//!   naming the concept.
//! - **Budget**: at most [`LlmOptions::max_requests`] HTTP requests per run, retries
//!   included; when it is spent the run stops with an error saying how far it got.
//! - **Rate**: requests start at most [`LlmOptions::requests_per_second`] per second,
//!   over all workers.
//! - **Concurrency**: [`LlmOptions::workers`] threads take concepts in bank order; the
//!   writer puts the captions in the file in bank order whatever order the replies come
//!   back in (after an interruption, the concepts captioned by the next run follow).
//! - **Resume**: each caption is appended to the output JSONL as one line and flushed
//!   (one `write` call); a rerun reads the file, skips every concept it holds and appends
//!   the rest. An incomplete last line (a kill in the middle of a write) is removed
//!   before appending; any other line that is not a caption record is an error naming
//!   the file and line.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::captions::{caption_line, clean_caption, record_fields, word_count, MultiLine, Rejection, SEED_MAX_WORDS};
use super::concepts::ConceptBank;
use super::http::{post_json, HttpError, HttpUrl, Response};
use super::text_key;
use crate::report::Progress;
use crate::{bail, ensure, Error, Result, ResultExt, Rng};

/// SynthCLIP's prompt for `concept` (`TextGen/captions_generator.py`), word for word.
pub fn seed_prompt(concept: &str) -> String {
    format!(
        "Your task is to write me an image caption that includes and visually describes a scene around a concept. \
         Your concept is: {concept}. Output one single grammatically caption that is no longer than 15 words. \
         Do not output any notes, word counts, facts, etc. Output one single sentence only."
    )
}

/// The chat-completions URL of an endpoint: a URL ending in `/chat/completions` is used
/// as it is, one ending in `/v1` gets `/chat/completions`, any other gets
/// `/v1/chat/completions` (trailing slashes are dropped first). Only `http://` URLs are
/// accepted (see the module documentation of the client).
pub fn chat_completions_url(endpoint: &str) -> Result<String> {
    let base = endpoint.trim().trim_end_matches('/');
    let url = if base.ends_with("/chat/completions") {
        base.to_string()
    } else if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    };
    HttpUrl::parse(&url)?;
    Ok(url)
}

/// Settings of [`caption_with_llm`]. [`LlmOptions::new`] gives SynthCLIP's sampling
/// settings and moderate client defaults.
#[derive(Clone, Debug)]
pub struct LlmOptions {
    /// The server: a base URL (`http://127.0.0.1:8000`) or the full chat-completions URL.
    pub endpoint: String,
    /// The model name the server knows (`"model"` of the request).
    pub model: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    /// Requests in flight at once (at least 1).
    pub workers: usize,
    /// The most HTTP requests this run sends, retries included (`None`: no limit).
    pub max_requests: Option<u64>,
    /// The most requests started per second, over all workers (`None`: no limit).
    pub requests_per_second: Option<f64>,
    /// Retries of one request after a 429/5xx answer, a time-out or a broken connection.
    pub max_retries: u32,
    /// The first back-off delay; each retry doubles it.
    pub retry_delay: Duration,
    /// The longest back-off delay (also caps `Retry-After`).
    pub max_retry_delay: Duration,
    /// Time limit for connecting and for each read or write of a request.
    pub timeout: Duration,
    /// Sampling temperature (seed: 0.7).
    pub temperature: f64,
    /// Nucleus sampling (seed: 0.95).
    pub top_p: f64,
    /// Token limit of a reply (the seed allows 2048; a 15-word caption needs ~30, and a
    /// reply cut at the limit is not a usable caption).
    pub max_tokens: u32,
    /// Presence penalty (seed: 1.0).
    pub presence_penalty: f64,
    /// Frequency penalty (seed: 1.0).
    pub frequency_penalty: f64,
    /// When set, each request carries `"seed"`: `Rng::derive(seed, &[text_key(concept),
    /// ask]).next_u64() >> 33` (servers that honour it then answer reproducibly).
    pub seed: Option<u64>,
    /// Multi-line replies: dropped (seed) or cut to the first line.
    pub multiline: MultiLine,
    /// How many times a concept is asked again after a reply that gave no caption.
    pub reask: u32,
    /// Show a progress line on stderr.
    pub progress: bool,
}

impl LlmOptions {
    /// The options for `endpoint` and `model`: seed sampling (temperature 0.7, top-p
    /// 0.95, penalties 1.0), 128 tokens, 4 workers, no budget or rate limit, 5 retries
    /// from 0.5 s up to 30 s, a 120 s time-out, multi-line replies dropped, 2 re-asks.
    pub fn new(endpoint: impl Into<String>, model: impl Into<String>) -> LlmOptions {
        LlmOptions {
            endpoint: endpoint.into(),
            model: model.into(),
            api_key: None,
            workers: 4,
            max_requests: None,
            requests_per_second: None,
            max_retries: 5,
            retry_delay: Duration::from_millis(500),
            max_retry_delay: Duration::from_secs(30),
            timeout: Duration::from_secs(120),
            temperature: 0.7,
            top_p: 0.95,
            max_tokens: 128,
            presence_penalty: 1.0,
            frequency_penalty: 1.0,
            seed: None,
            multiline: MultiLine::Drop,
            reask: 2,
            progress: false,
        }
    }
}

/// The JSON body of the request for `concept` (`ask` counts re-asks from 0).
pub fn request_body(options: &LlmOptions, concept: &str, ask: u32) -> Value {
    let mut body = json!({
        "model": options.model,
        "messages": [{"role": "user", "content": seed_prompt(concept)}],
        "temperature": options.temperature,
        "top_p": options.top_p,
        "max_tokens": options.max_tokens,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "n": 1,
        "stream": false,
    });
    if let (Some(seed), Some(obj)) = (options.seed, body.as_object_mut()) {
        let s = Rng::derive(seed, &[text_key(concept), ask as u64]).next_u64() >> 33;
        obj.insert("seed".into(), json!(s));
    }
    body
}

/// The text and `finish_reason` of a chat-completions reply
/// (`choices[0].message.content`; an `"error"` object is reported as such).
pub fn parse_chat_reply(body: &[u8]) -> Result<(String, Option<String>)> {
    let text = String::from_utf8_lossy(body);
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("the reply is not JSON ({e}): {}", snippet(body))))?;
    if let Some(err) = value.get("error") {
        let msg = err.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| err.to_string());
        bail!("the server answered with an error: {msg}");
    }
    let choice = value.get("choices").and_then(|c| c.get(0));
    let content = choice.and_then(|c| c.get("message")).and_then(|m| m.get("content")).and_then(Value::as_str);
    let Some(content) = content else {
        bail!("the reply has no choices[0].message.content string: {}", snippet(body));
    };
    let finish = choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str).map(str::to_string);
    Ok((content.to_string(), finish))
}

/// The start of a body for error messages (at most 200 characters, one line).
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut s: String = one_line.chars().take(200).collect();
    if one_line.chars().count() > 200 {
        s.push('…');
    }
    if s.is_empty() {
        "(empty body)".into()
    } else {
        s
    }
}

/// What an output file held before a run (see [`open_caption_output`]).
#[derive(Clone, Debug, Default)]
pub struct ExistingCaptions {
    /// The concepts it holds a caption for.
    pub concepts: HashSet<String>,
    /// Caption lines in it (after repair).
    pub lines: usize,
    /// What was repaired at its end, if anything (an incomplete last line removed, or a
    /// missing final line break added).
    pub repaired: Option<String>,
}

/// Opens the caption JSONL at `path` for appending (creating it and its directory), after
/// reading the captions it holds and repairing its end: an incomplete last line is
/// removed, a complete last line without `\n` gets one. A line before the last that is
/// not a caption record (`{"concept": …, "caption": …}`) is an error naming the file and
/// line.
pub fn open_caption_output(path: impl AsRef<Path>) -> Result<(File, ExistingCaptions)> {
    let path = path.as_ref();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => bail!("cannot read the caption output {}: {e}", path.display()),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_ctx(|| format!("cannot create directory {}", dir.display()))?;
    }
    let mut existing = ExistingCaptions::default();
    let parse = |line: &[u8]| -> Result<Option<String>> {
        let text = std::str::from_utf8(line).map_err(|_| Error::msg("not UTF-8 text"))?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let value: Value = serde_json::from_str(text).map_err(|e| Error::msg(format!("not JSON: {e}")))?;
        let (concept, _) = record_fields(&value)?;
        concept.map(Some).ok_or_else(|| Error::msg("no \"concept\" string"))
    };
    let mut pos = 0usize;
    let mut line_no = 0usize;
    // (truncate to, append a line break)
    let mut fix: Option<(u64, bool)> = None;
    while pos < bytes.len() {
        line_no += 1;
        match bytes[pos..].iter().position(|&b| b == b'\n') {
            Some(k) => {
                let concept = parse(&bytes[pos..pos + k]).map_err(|e| {
                    e.context(format!(
                        "{} line {line_no}: not a caption line of `synth captions` (fix or remove the line, or \
                         choose another --output)",
                        path.display()
                    ))
                })?;
                if let Some(c) = concept {
                    existing.concepts.insert(c);
                    existing.lines += 1;
                }
                pos += k + 1;
            }
            None => {
                match parse(&bytes[pos..]) {
                    Ok(Some(c)) => {
                        existing.concepts.insert(c);
                        existing.lines += 1;
                        fix = Some((bytes.len() as u64, true));
                        existing.repaired = Some(format!("line {line_no}: added the missing final line break"));
                    }
                    Ok(None) => fix = Some((pos as u64, false)),
                    Err(_) => {
                        fix = Some((pos as u64, false));
                        existing.repaired = Some(format!(
                            "line {line_no}: removed an incomplete last line ({} bytes) left by an interrupted run",
                            bytes.len() - pos
                        ));
                    }
                }
                break;
            }
        }
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_ctx(|| format!("cannot open the caption output {}", path.display()))?;
    if let Some((len, newline)) = fix {
        file.set_len(len).with_ctx(|| format!("cannot repair the end of {}", path.display()))?;
        if newline {
            file.write_all(b"\n").with_ctx(|| format!("cannot repair the end of {}", path.display()))?;
        }
    }
    Ok((file, existing))
}

/// What a [`caption_with_llm`] run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LlmSummary {
    /// Concepts in the bank.
    pub concepts: usize,
    /// Concepts the output already held a caption for (skipped).
    pub already_done: usize,
    /// Concepts captioned by this run.
    pub captioned: usize,
    /// Concepts whose replies gave no caption, by reason (`empty`, `multi-line`,
    /// `truncated`), after the re-asks.
    pub rejected: BTreeMap<String, usize>,
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Retries among them.
    pub retries: u64,
    /// Captions longer than 15 words (kept).
    pub over_max_words: usize,
    /// What was repaired at the end of the output file, if anything.
    pub repaired: Option<String>,
}

/// Why a concept's requests ended without an outcome.
enum Stop {
    /// An error that ends the run.
    Fatal(Error),
    /// The request budget is spent.
    Budget,
    /// Another worker stopped the run.
    Cancelled,
}

enum Outcome {
    Caption(String),
    Rejected(Rejection),
}

struct Client<'a> {
    options: &'a LlmOptions,
    url: HttpUrl,
    headers: Vec<(String, String)>,
    sent: AtomicU64,
    retries: AtomicU64,
    stop: AtomicBool,
    next_slot: Mutex<Option<Instant>>,
}

impl Client<'_> {
    /// Waits for the rate limiter's next slot.
    fn rate_wait(&self) {
        let Some(rps) = self.options.requests_per_second else { return };
        let interval = Duration::from_secs_f64(1.0 / rps);
        let wait = {
            let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + interval);
            start - now
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Sleeps `d`, waking early when the run is stopped.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    /// One request with retries.
    fn request(&self, concept: &str, body: &[u8]) -> std::result::Result<Response, Stop> {
        let o = self.options;
        let mut attempt = 0u32;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stop::Cancelled);
            }
            let n = self.sent.fetch_add(1, Ordering::SeqCst);
            if o.max_requests.is_some_and(|max| n >= max) {
                self.sent.fetch_sub(1, Ordering::SeqCst);
                return Err(Stop::Budget);
            }
            self.rate_wait();
            let (why, retry_after) = match post_json(&self.url, &self.headers, body, o.timeout) {
                Ok(r) if (200..300).contains(&r.status) => return Ok(r),
                Ok(r) if r.status == 429 || r.status >= 500 => {
                    let after = r.header("retry-after").and_then(|v| v.trim().parse::<f64>().ok());
                    (format!("HTTP {} {}: {}", r.status, r.reason, snippet(&r.body)), after)
                }
                Ok(r) => {
                    return Err(Stop::Fatal(Error::msg(format!(
                        "concept {concept:?}: {} answered HTTP {} {}: {}",
                        self.url.url,
                        r.status,
                        r.reason,
                        snippet(&r.body)
                    ))))
                }
                Err(e @ (HttpError::Refused(_) | HttpError::Resolve(_))) => {
                    return Err(Stop::Fatal(Error::msg(format!("concept {concept:?}: {e}"))))
                }
                Err(e @ (HttpError::Timeout(_) | HttpError::Io(_))) => (e.to_string(), None),
            };
            if attempt >= o.max_retries {
                return Err(Stop::Fatal(Error::msg(format!(
                    "concept {concept:?}: no usable answer after {} attempts ({} retries); the last: {why}",
                    attempt + 1,
                    o.max_retries
                ))));
            }
            let backoff = o.retry_delay.saturating_mul(1u32 << attempt.min(20));
            let delay = retry_after
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(1e6)))
                .unwrap_or(backoff)
                .min(o.max_retry_delay);
            self.retries.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
            self.sleep(delay);
        }
    }

    /// Captions one concept (with re-asks).
    fn caption(&self, concept: &str) -> std::result::Result<Outcome, Stop> {
        let mut last = Rejection::Empty;
        for ask in 0..=self.options.reask {
            let body = request_body(self.options, concept, ask).to_string();
            let response = self.request(concept, body.as_bytes())?;
            let (content, finish) = parse_chat_reply(&response.body).map_err(|e| {
                Stop::Fatal(e.context(format!("concept {concept:?}: unusable reply from {}", self.url.url)))
            })?;
            if finish.as_deref() == Some("length") {
                last = Rejection::Truncated;
                continue;
            }
            match clean_caption(&content, self.options.multiline) {
                Ok(caption) => return Ok(Outcome::Caption(caption)),
                Err(r) => last = r,
            }
        }
        Ok(Outcome::Rejected(last))
    }
}

/// Captions every concept of `bank` that `output` does not hold yet with the model at
/// `options.endpoint`, appending to `output` (see the module documentation). Errors (a
/// refused connection, an HTTP error answer, a malformed reply, retries or the request
/// budget spent) name the concept or the budget and come after every caption received so
/// far is in the file, so the same call resumes.
pub fn caption_with_llm(bank: &ConceptBank, options: &LlmOptions, output: impl AsRef<Path>) -> Result<LlmSummary> {
    let output = output.as_ref();
    ensure!(options.workers >= 1, "caption_with_llm: workers must be at least 1");
    ensure!(!options.model.trim().is_empty(), "caption_with_llm: the model name is empty");
    if let Some(rps) = options.requests_per_second {
        ensure!(rps.is_finite() && rps > 0.0, "caption_with_llm: requests per second must be positive, got {rps}");
    }
    let url = HttpUrl::parse(&chat_completions_url(&options.endpoint)?)?;
    let mut headers = Vec::new();
    if let Some(key) = &options.api_key {
        headers.push(("Authorization".to_string(), format!("Bearer {}", key.trim())));
    }
    let (mut file, existing) = open_caption_output(output)?;
    let todo: Vec<usize> = (0..bank.len()).filter(|&i| !existing.concepts.contains(&bank.concepts()[i])).collect();
    let mut summary = LlmSummary {
        concepts: bank.len(),
        already_done: bank.len() - todo.len(),
        repaired: existing.repaired.clone(),
        ..Default::default()
    };
    let client = Client {
        options,
        url,
        headers,
        sent: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        next_slot: Mutex::new(None),
    };
    let next = AtomicUsize::new(0);
    let mut progress = options.progress.then(|| Progress::new(todo.len() as u64, 0));
    let mut first_error: Option<Error> = None;
    let mut budget_spent = false;
    let mut handled = 0u64;

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, std::result::Result<Outcome, Stop>)>();
        for _ in 0..options.workers.min(todo.len()) {
            let tx = tx.clone();
            let (client, next, todo) = (&client, &next, &todo);
            scope.spawn(move || loop {
                if client.stop.load(Ordering::Relaxed) {
                    break;
                }
                let j = next.fetch_add(1, Ordering::SeqCst);
                let Some(&i) = todo.get(j) else { break };
                let result = client.caption(&bank.concepts()[i]);
                if matches!(result, Err(Stop::Fatal(_) | Stop::Budget)) {
                    client.stop.store(true, Ordering::SeqCst);
                }
                if tx.send((j, result)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut handle = |j: usize, result: std::result::Result<Outcome, Stop>| {
            let concept = &bank.concepts()[todo[j]];
            match result {
                Ok(Outcome::Caption(caption)) => {
                    if word_count(&caption) > SEED_MAX_WORDS {
                        summary.over_max_words += 1;
                    }
                    if let Err(e) = file.write_all(caption_line(concept, &caption).as_bytes()) {
                        client.stop.store(true, Ordering::SeqCst);
                        first_error.get_or_insert(Error::msg(format!("cannot append to {}: {e}", output.display())));
                    } else {
                        summary.captioned += 1;
                    }
                }
                Ok(Outcome::Rejected(r)) => *summary.rejected.entry(r.name().to_string()).or_default() += 1,
                Err(Stop::Fatal(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(Stop::Budget) => budget_spent = true,
                Err(Stop::Cancelled) => {}
            }
            handled += 1;
            if let Some(p) = progress.as_mut() {
                p.update(handled, None, handled);
            }
        };
        let mut pending = BTreeMap::new();
        let mut next_write = 0usize;
        for (j, result) in rx {
            pending.insert(j, result);
            while let Some(result) = pending.remove(&next_write) {
                handle(next_write, result);
                next_write += 1;
            }
        }
        // After a stop, replies beyond a gap are still written (in order).
        for (j, result) in std::mem::take(&mut pending) {
            handle(j, result);
        }
    });
    if let Some(p) = progress.as_mut() {
        p.finish();
    }
    let _ = file.sync_all();
    summary.requests = client.sent.load(Ordering::SeqCst);
    summary.retries = client.retries.load(Ordering::SeqCst);
    let left = bank.len() - summary.already_done - summary.captioned;
    if let Some(e) = first_error {
        bail!(
            "{}\ncaptioning stopped: {} concepts captioned by this run, {left} without a caption; the captions so \
             far are in {}: rerun the same command to continue",
            e.message(),
            summary.captioned,
            output.display()
        );
    }
    if budget_spent {
        bail!(
            "the request budget is spent: {} requests sent (--max-requests {}); {} concepts captioned by this run, \
             {left} without a caption; the captions so far are in {}: rerun the same command to continue",
            summary.requests,
            options.max_requests.unwrap_or(0),
            summary.captioned,
            output.display()
        );
    }
    Ok(summary)
}
