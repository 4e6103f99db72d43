//! Realistic events: one OpenAI chat completion (a four-message request and its answer) as an
//! app would log it, about 2 KB, in each ingest format.
//!
//! The native (canonical `llmlogd.llm/v1`) event is built first; the Pezzo and PromptLayer
//! bodies are rendered from it by llmlogd's own `formats` module, so all three carry the same
//! call, and every body is checked with the validator ingest uses. The text is drawn from a
//! word list, so it compresses like prose (zstd level 1: about 2.5-3x), not like repeated
//! bytes.

use anyhow::{bail, Context as _};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use llmlogd::formats::{self, Format};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Prose vocabulary: common English plus the jargon of LLM app traffic.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "at",
    "by",
    "this",
    "had",
    "not",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "her",
    "all",
    "she",
    "there",
    "would",
    "their",
    "we",
    "him",
    "been",
    "has",
    "when",
    "who",
    "will",
    "more",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "can",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "my",
    "now",
    "such",
    "like",
    "our",
    "over",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "invoice",
    "customer",
    "order",
    "refund",
    "shipping",
    "account",
    "password",
    "summary",
    "translate",
    "French",
    "German",
    "report",
    "quarter",
    "revenue",
    "growth",
    "forecast",
    "meeting",
    "schedule",
    "Tuesday",
    "deadline",
    "project",
    "team",
    "manager",
    "review",
    "document",
    "contract",
    "clause",
    "policy",
    "support",
    "ticket",
    "error",
    "database",
    "query",
    "latency",
    "server",
    "deploy",
    "release",
    "version",
    "feature",
    "request",
    "response",
    "token",
    "model",
    "prompt",
    "context",
    "answer",
    "question",
    "explain",
    "detail",
    "example",
    "step",
    "list",
    "table",
    "chart",
    "email",
    "draft",
    "reply",
    "polite",
    "concise",
    "formal",
    "friendly",
    "please",
    "thanks",
    "regards",
    "Ada",
    "Grace",
    "Linus",
    "Margaret",
    "Dennis",
    "Barbara",
    "Paris",
    "Berlin",
    "London",
    "Tokyo",
    "Madrid",
    "Rome",
    "2024",
    "2025",
    "42",
    "17",
    "99.5",
    "12%",
];

/// The bench's events, in each format, as compact JSON (no newline inside).
pub struct Events {
    pub native: Vec<Bytes>,
    pub pezzo: Vec<Bytes>,
    pub promptlayer: Vec<Bytes>,
}

impl Events {
    pub fn of(&self, f: Format) -> &[Bytes] {
        match f {
            Format::Native => &self.native,
            Format::Pezzo => &self.pezzo,
            Format::PromptLayer => &self.promptlayer,
        }
    }

    pub fn mean_len(&self, f: Format) -> usize {
        let v = self.of(f);
        v.iter().map(Bytes::len).sum::<usize>() / v.len().max(1)
    }
}

/// `n` distinct calls, the native form of each about `target` bytes.
pub fn generate(n: usize, target: usize, seed: u64) -> anyhow::Result<Events> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Events {
        native: Vec::with_capacity(n),
        pezzo: Vec::with_capacity(n),
        promptlayer: Vec::with_capacity(n),
    };
    for i in 0..n {
        let native = native_call(&mut rng, i, target);
        check(Format::Native, &native).with_context(|| format!("native event {i}"))?;
        if !formats::native::is_canonical(&native) {
            bail!("native event {i} is not canonical");
        }
        for (to, list) in [
            (Format::Pezzo, &mut out.pezzo),
            (Format::PromptLayer, &mut out.promptlayer),
        ] {
            let body = formats::render(Format::Native, &native, to)
                .with_context(|| format!("rendering event {i} as {}", to.as_str()))?;
            check(to, &body).with_context(|| format!("{} event {i}", to.as_str()))?;
            list.push(Bytes::from(serde_json::to_vec(&body)?));
        }
        out.native.push(Bytes::from(serde_json::to_vec(&native)?));
    }
    Ok(out)
}

fn check(f: Format, body: &Value) -> anyhow::Result<()> {
    formats::validate(f, body).map_err(|errs| {
        let list: Vec<String> = errs.iter().map(ToString::to_string).collect();
        anyhow::anyhow!(
            "refused by the {} validator: {}",
            f.as_str(),
            list.join("; ")
        )
    })
}

fn words(rng: &mut StdRng, min: usize, max: usize) -> String {
    let n = rng.gen_range(min..=max);
    let mut s = String::with_capacity(n * 7);
    for i in 0..n {
        if i > 0 {
            s.push(if rng.gen_ratio(1, 12) { '.' } else { ' ' });
            if s.ends_with('.') {
                s.push(' ');
            }
        }
        s.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    s.push('.');
    s
}

fn alnum(rng: &mut StdRng, n: usize) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| A[rng.gen_range(0..A.len())] as char)
        .collect()
}

fn rfc3339_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// One native canonical event; the answer grows until the event is `target` bytes.
fn native_call(rng: &mut StdRng, i: usize, target: usize) -> Value {
    let model = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"][i % 3];
    let start_ms = 1_763_000_000_000i64 + i as i64 * 371 + rng.gen_range(0..300);
    let end_ms = start_ms + rng.gen_range(400..3000);
    let messages = json!([
        {"role": "system", "content": format!("You are a helpful assistant for an online shop. {}", words(rng, 12, 20))},
        {"role": "user", "content": words(rng, 30, 45)},
        {"role": "assistant", "content": words(rng, 20, 35)},
        {"role": "user", "content": words(rng, 8, 16)},
    ]);
    let temperature = [0.0, 0.2, 0.7, 1.0][rng.gen_range(0..4)];
    let request = json!({
        "model": model,
        "messages": messages,
        "temperature": temperature,
        "max_tokens": 512,
        "user": format!("user-{}", rng.gen_range(1..5000)),
    });
    let fingerprint = format!("fp_{}", alnum(rng, 10).to_lowercase());
    let completion_id = format!("chatcmpl-{}", alnum(rng, 29));
    let user = rng.gen_range(1..5000);
    let session = alnum(rng, 12);
    let build = |answer: &str, prompt_tokens: u64, completion_tokens: u64| {
        json!({
            "schema": "llmlogd.llm/v1",
            "provider": "openai",
            "model": model,
            "api_type": "chat-completions",
            "request": {"start_time": rfc3339_ms(start_ms), "body": request},
            "response": {
                "end_time": rfc3339_ms(end_ms),
                "body": {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": start_ms / 1000,
                    "model": format!("{model}-2024-07-18"),
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": answer, "refusal": null},
                        "logprobs": null,
                        "finish_reason": "stop"
                    }],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens
                    },
                    "system_fingerprint": fingerprint
                },
                "http_status": 200
            },
            "status": "success",
            "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
            "tags": ["bench", "chat"],
            "metadata": {"user_id": format!("user-{user}"), "session_id": format!("sess-{session}")},
            "environment": "production",
            "function_name": "openai.chat.completions.create"
        })
    };
    let base = serde_json::to_vec(&build("", 0, 0)).map_or(0, |v| v.len());
    let mut answer = String::new();
    while base + answer.len() + 8 < target {
        if !answer.is_empty() {
            answer.push(' ');
        }
        answer.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    answer.push('.');
    let prompt_tokens = 60 + rng.gen_range(0..80);
    let completion_tokens = (answer.len() / 4) as u64;
    build(&answer, prompt_tokens, completion_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_valid_and_near_the_target_size() {
        let ev = generate(20, 2048, 7).unwrap();
        for f in [Format::Native, Format::Pezzo, Format::PromptLayer] {
            let mean = ev.mean_len(f);
            assert!((1500..3000).contains(&mean), "{} mean {mean}", f.as_str());
            assert!(ev.of(f).iter().all(|b| !b.contains(&b'\n')));
        }
        let n = ev.mean_len(Format::Native);
        assert!((2000..2100).contains(&n), "native mean {n}");
    }
}
