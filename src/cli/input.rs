//! What `llmlogd send` makes of its input: the events, one line each, and their names.
//!
//! NDJSON, input whose first line holds a whole JSON value, is read and sent as it goes
//! ([`Events`]), so memory stays small however large the input (a 1 GB file of events, a
//! `tail -f`): it holds a line at a time, and a document that spans lines (what `jq` prints
//! after an NDJSON line) until it closes. Input whose first line opens a document it does not
//! finish is pretty-printed JSON: it is read whole, up to [`WHOLE_MAX`], and refused whole if
//! it does not parse ([`split_input`]). That guarantee needs all of it: sent line for line, a
//! broken document's lines would be refused one by one, and any that is a JSON object on its
//! own (an element of a broken array, a `{}` inside it) stored as an event.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};

use serde_json::value::RawValue;

/// The most pretty-printed input `send` reads before sending (it is checked whole first), and
/// the most a document spanning lines inside NDJSON input may take.
pub(super) const WHOLE_MAX: usize = 64 << 20;
/// The longest line sent: the longest any daemon takes (`server.max_line_bytes` at most).
const LINE_MAX: usize = crate::config::MAX_RECORD_PAYLOAD as usize;
/// A UTF-8 byte order mark: a file saved "UTF-8 with BOM" starts with one.
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// How much of the input is read at once.
const READ_BUFFER: usize = 64 << 10;

/// Why the input cannot be sent.
#[derive(Debug, thiserror::Error)]
pub(super) enum InputError {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    /// Pretty-printed JSON that does not parse: refused whole, nothing sent.
    #[error("not valid JSON: {0}")]
    Json(serde_json::Error),
    /// Pretty-printed JSON larger than [`WHOLE_MAX`]: it cannot be checked whole.
    #[error(
        "pretty-printed JSON over {} MiB: it is checked whole before anything is sent, and this is more than that holds (one event per line, e.g. from `jq -c`, has no limit)",
        WHOLE_MAX >> 20
    )]
    TooLarge,
}

/// One event of the input, in order.
#[derive(Debug, PartialEq)]
pub(super) enum Item {
    /// One line to send (without its newline), and how to name the event.
    Send { line: Vec<u8>, label: String },
    /// A line longer than any daemon takes: refused here, not sent.
    Refuse { label: String, reason: String },
}

/// The events of `send`'s input, read as they are taken.
pub(super) struct Events<R> {
    ready: VecDeque<Item>,
    source: Source<R>,
    /// Events named so far.
    count: usize,
}

enum Source<R> {
    /// Read and split already (pretty-printed input, or one document on one line).
    Whole {
        stream: Vec<u8>,
        pos: usize,
        labels: std::vec::IntoIter<OutEvent>,
    },
    /// NDJSON, read on as events are taken.
    Lines(Lines<R>),
}

struct Lines<R> {
    r: BufReader<R>,
    /// The last line read (reused).
    buf: Vec<u8>,
    /// Lines read so far.
    line_no: usize,
    /// A document that spans lines, until it closes.
    doc: Option<Doc>,
}

/// A document spanning lines inside NDJSON input.
struct Doc {
    /// Its lines so far, each with its `\n`.
    text: Vec<u8>,
    first_line: usize,
    scan: Scan,
}

/// Where a document spanning lines stands, from a scan of its brackets and strings (linear;
/// parsing it anew at each line would be quadratic).
#[derive(Debug, Default)]
struct Scan {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A closing bracket with none open, or a string still open at a line's end (a JSON
    /// string cannot hold a line break).
    broken: bool,
}

impl Scan {
    fn feed(&mut self, line: &[u8]) {
        for &b in line {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => match self.depth.checked_sub(1) {
                    Some(d) => self.depth = d,
                    None => self.broken = true,
                },
                _ => {}
            }
        }
        if self.in_string {
            self.broken = true;
        }
    }
}

/// Reads one line (with its `\n`, if any) into `buf`. A line longer than `LINE_MAX` is skipped
/// to its end and comes back empty with `Some(true)`; `None` is the end of the input.
fn read_line<R: Read>(r: &mut BufReader<R>, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let n = r
        .by_ref()
        .take(LINE_MAX as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.ends_with(b"\n") || n <= LINE_MAX {
        return Ok(Some(false));
    }
    buf.clear();
    buf.shrink_to(READ_BUFFER);
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            break;
        }
        if let Some(i) = memchr::memchr(b'\n', avail) {
            r.consume(i + 1);
            break;
        }
        let n = avail.len();
        r.consume(n);
    }
    Ok(Some(true))
}

/// Reads the start of the input: enough to tell NDJSON from pretty-printed JSON (and to read
/// and check the latter whole). Nothing is sent yet, so an error here means nothing was.
pub(super) fn open<R: Read>(input: R) -> Result<Events<R>, InputError> {
    let mut lines = Lines {
        r: BufReader::with_capacity(READ_BUFFER, input),
        buf: Vec::new(),
        line_no: 0,
        doc: None,
    };
    let Some(too_long) = lines.next_content()? else {
        return Ok(Events::whole(Outgoing::default()));
    };
    let first_line = lines.line_no;
    let first = std::mem::take(&mut lines.buf);
    let first_value = serde_json::from_slice::<&RawValue>(first.trim_ascii()).map(|_| ());
    if !too_long && first_value.as_ref().is_err_and(|e| e.is_eof()) {
        // Pretty-printed: read whole, then split (or refused) as a whole. The blank lines
        // before it are kept as line breaks, so the parser's line numbers are the input's.
        if first_line > WHOLE_MAX {
            return Err(InputError::TooLarge);
        }
        let mut whole = vec![b'\n'; first_line - 1];
        whole.extend_from_slice(&first);
        let room = (WHOLE_MAX + 1).saturating_sub(whole.len());
        lines.r.take(room as u64).read_to_end(&mut whole)?;
        if whole.len() > WHOLE_MAX {
            return Err(InputError::TooLarge);
        }
        return split_input(&whole)
            .map(Events::whole)
            .map_err(InputError::Json);
    }
    // An array on its own line, and nothing after it: the input is that one document, one
    // event per element. Only an array needs the look at the next line (which may wait on the
    // input, a `tail -f`): any other value on the first line is its first event either way.
    let array = !too_long && first_value.is_ok() && first.trim_ascii().starts_with(b"[");
    let next = if array {
        match lines.next_content()? {
            None => {
                return split_input(&first)
                    .map(Events::whole)
                    .map_err(InputError::Json)
            }
            next => next,
        }
    } else {
        None
    };
    let mut events = Events {
        ready: VecDeque::new(),
        source: Source::Lines(lines),
        count: 0,
    };
    events.take_line(&first, first_line, too_long);
    if let Some(too_long) = next {
        events.take_read_line(too_long);
    }
    Ok(events)
}

impl<R: Read> Lines<R> {
    /// Reads on to the next line with something on it (or too long to read), into `buf`;
    /// `None` at the end of the input. A byte order mark at the very start goes (it marks the
    /// file's encoding and is no part of the first event).
    fn next_content(&mut self) -> std::io::Result<Option<bool>> {
        loop {
            let Some(too_long) = read_line(&mut self.r, &mut self.buf)? else {
                return Ok(None);
            };
            self.line_no += 1;
            if self.line_no == 1 && self.buf.starts_with(BOM) {
                self.buf.drain(..BOM.len());
            }
            if too_long || !self.buf.trim_ascii().is_empty() {
                return Ok(Some(too_long));
            }
        }
    }
}

impl<R: Read> Events<R> {
    fn whole(out: Outgoing) -> Events<R> {
        Events {
            ready: VecDeque::new(),
            count: out.events.len(),
            source: Source::Whole {
                stream: out.stream,
                pos: 0,
                labels: out.events.into_iter(),
            },
        }
    }

    /// True when the input holds no event at all (asked right after [`open`]).
    pub(super) fn is_empty(&self) -> bool {
        match &self.source {
            Source::Whole { labels, .. } => labels.len() == 0,
            Source::Lines(l) => self.ready.is_empty() && l.doc.is_none(),
        }
    }

    /// True when the next event may have to wait for the input (what is sent so far should
    /// then go out first: the input may be a `tail -f`).
    pub(super) fn may_wait(&self) -> bool {
        match &self.source {
            Source::Lines(l) => self.ready.is_empty() && l.r.buffer().is_empty(),
            Source::Whole { .. } => false,
        }
    }

    /// The next event, or `None` at the end of the input.
    pub(super) fn next(&mut self) -> Result<Option<Item>, InputError> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Ok(Some(item));
            }
            let lines = match &mut self.source {
                Source::Whole {
                    stream,
                    pos,
                    labels,
                } => {
                    // One line of `stream` per event here (see `open`).
                    let Some(ev) = labels.next() else {
                        return Ok(None);
                    };
                    let rest = &stream[*pos..];
                    let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
                    let line = rest[..end].to_vec();
                    *pos += end + 1;
                    return Ok(Some(Item::Send {
                        line,
                        label: ev.label,
                    }));
                }
                Source::Lines(l) => l,
            };
            match read_line(&mut lines.r, &mut lines.buf) {
                Ok(Some(too_long)) => {
                    lines.line_no += 1;
                    self.take_read_line(too_long);
                }
                Ok(None) => {
                    // A document still open at the end is broken: its lines go as they are.
                    if !self.flush_doc() {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes the line just read into `Lines::buf`.
    fn take_read_line(&mut self, too_long: bool) {
        let Source::Lines(l) = &mut self.source else {
            return;
        };
        let buf = std::mem::take(&mut l.buf);
        let at = l.line_no;
        self.take_line(&buf, at, too_long);
        if let Source::Lines(l) = &mut self.source {
            l.buf = buf;
        }
    }

    fn name(&mut self, line_no: usize) -> String {
        self.count += 1;
        format!("event {} (line {line_no})", self.count)
    }

    fn send(&mut self, text: &[u8], line_no: usize) {
        let label = self.name(line_no);
        self.ready.push_back(Item::Send {
            // Line breaks in valid JSON are only ever whitespace between tokens.
            line: text
                .iter()
                .copied()
                .filter(|b| *b != b'\n' && *b != b'\r')
                .collect(),
            label,
        });
    }

    /// Sends a line as it is: the daemon judges it (and names the problem).
    fn send_raw(&mut self, line: &[u8], line_no: usize) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if line.trim_ascii().is_empty() {
            return;
        }
        let label = self.name(line_no);
        self.ready.push_back(Item::Send {
            line: line.to_vec(),
            label,
        });
    }

    /// One line of NDJSON input (with its `\n`, if any).
    fn take_line(&mut self, line: &[u8], line_no: usize, too_long: bool) {
        let Source::Lines(l) = &mut self.source else {
            return;
        };
        if let Some(doc) = &mut l.doc {
            // A line that opens an object or array at its very start begins a new document
            // (the lines inside a pretty-printed one are indented): the one open is broken.
            if too_long || matches!(line.first(), Some(b'{' | b'[')) {
                self.flush_doc();
            } else {
                doc.scan.feed(line.strip_suffix(b"\n").unwrap_or(line));
                doc.text.extend_from_slice(line);
                if !line.ends_with(b"\n") {
                    doc.text.push(b'\n');
                }
                self.doc_step();
                return;
            }
        }
        if too_long {
            let label = self.name(line_no);
            self.ready.push_back(Item::Refuse {
                label,
                reason: format!(
                    "the line is longer than {} MiB, more than llmlogd takes",
                    LINE_MAX >> 20
                ),
            });
            return;
        }
        let content = line.trim_ascii();
        if content.is_empty() {
            return;
        }
        match serde_json::from_slice::<&RawValue>(content) {
            Ok(v) => self.send(v.get().as_bytes(), line_no),
            Err(e) if e.is_eof() => {
                // It opens a document that goes on in the next lines.
                let mut scan = Scan::default();
                scan.feed(line.strip_suffix(b"\n").unwrap_or(line));
                let mut text = line.to_vec();
                if !text.ends_with(b"\n") {
                    text.push(b'\n');
                }
                if let Source::Lines(l) = &mut self.source {
                    l.doc = Some(Doc {
                        text,
                        first_line: line_no,
                        scan,
                    });
                }
                self.doc_step();
            }
            Err(_) => {
                // Values one after another on one line are one event each, as in a file.
                let values: Result<Vec<&RawValue>, _> =
                    serde_json::Deserializer::from_slice(content)
                        .into_iter::<&RawValue>()
                        .collect();
                match values {
                    Ok(values) => {
                        for v in values {
                            self.send(v.get().as_bytes(), line_no);
                        }
                    }
                    Err(_) => self.send_raw(line, line_no),
                }
            }
        }
    }

    /// After a line went into the open document: sends it once it closes, or its lines as
    /// they are once it is broken or too large.
    fn doc_step(&mut self) {
        let Source::Lines(l) = &mut self.source else {
            return;
        };
        let Some(doc) = &l.doc else {
            return;
        };
        if doc.scan.broken || doc.text.len() > WHOLE_MAX {
            self.flush_doc();
            return;
        }
        if doc.scan.depth > 0 {
            return;
        }
        let Some(doc) = l.doc.take() else {
            return;
        };
        let values: Result<Vec<&RawValue>, _> = serde_json::Deserializer::from_slice(&doc.text)
            .into_iter::<&RawValue>()
            .collect();
        match values {
            Ok(values) => {
                let (mut counted, mut line) = (0usize, doc.first_line);
                for v in values {
                    let at = v.get().as_ptr() as usize - doc.text.as_ptr() as usize;
                    line += memchr::memchr_iter(b'\n', &doc.text[counted..at]).count();
                    counted = at;
                    self.send(v.get().as_bytes(), line);
                }
            }
            Err(_) => self.send_lines(&doc),
        }
    }

    /// Sends the open document's lines as they are; false if none was open.
    fn flush_doc(&mut self) -> bool {
        let doc = match &mut self.source {
            Source::Lines(l) => l.doc.take(),
            Source::Whole { .. } => None,
        };
        match doc {
            Some(doc) => {
                self.send_lines(&doc);
                true
            }
            None => false,
        }
    }

    fn send_lines(&mut self, doc: &Doc) {
        let body = doc.text.strip_suffix(b"\n").unwrap_or(&doc.text);
        for (i, line) in body.split(|b| *b == b'\n').enumerate() {
            self.send_raw(line, doc.first_line + i);
        }
    }
}

/// What `send` writes, and the events in it (each line that gets a reply).
#[derive(Debug, Default)]
pub(super) struct Outgoing {
    /// NDJSON, newline-terminated.
    pub(super) stream: Vec<u8>,
    pub(super) events: Vec<OutEvent>,
}

#[derive(Debug, PartialEq)]
pub(super) struct OutEvent {
    /// How to name it to the user: "event 2", or "event 2 (line 3)" for NDJSON input.
    pub(super) label: String,
    /// Its line number in `stream`, as the daemon counts (it names lines in its errors).
    pub(super) sent_line: usize,
}

/// Splits `send` input into NDJSON. A whole JSON document (an object, or an array of them) is
/// sent one event per line, each element's bytes as written except for its line breaks; so is
/// a series of JSON values (NDJSON, or documents one after another as `jq` prints them), each
/// one event. Other input whose first line is a whole JSON value (or not JSON at all) is
/// NDJSON with bad lines: it is sent line for line, so the daemon judges each line and its
/// "line N" is the input's own line N (blank lines get no reply, as on the socket).
///
/// Input whose first line opens a document it does not finish is pretty-printed JSON: if it
/// does not parse, it is refused whole, with the parser's error. Sent line for line, its lines
/// would be refused one by one, and any that happened to be a JSON object on its own (an
/// element of a broken array, a `{}` inside a document) stored as an event.
pub(super) fn split_input(input: &[u8]) -> Result<Outgoing, serde_json::Error> {
    // A file saved "UTF-8 with BOM" (Windows editors, PowerShell 5's `Out-File`) starts with
    // one: it marks the file's encoding and is no part of the first event.
    let input = input.strip_prefix(BOM).unwrap_or(input);
    let trimmed = input.trim_ascii();
    if let Ok(doc) = serde_json::from_slice::<&RawValue>(trimmed) {
        let text = doc.get();
        let items: Vec<&str> = if text.starts_with('[') {
            serde_json::from_str::<Vec<&RawValue>>(text)
                .map(|v| v.iter().map(|r| r.get()).collect())
                .unwrap_or_default()
        } else {
            vec![text]
        };
        return Ok(one_line_each(items.iter().map(|item| (*item, None))));
    }
    // A series of JSON values: NDJSON, or documents one after another.
    let mut items = Vec::new();
    let mut broken = None;
    // The input line a value starts on, counted on from the previous value's start.
    let (mut counted, mut line) = (0usize, 1usize);
    for value in serde_json::Deserializer::from_slice(input).into_iter::<&RawValue>() {
        match value {
            Ok(v) => {
                let text = v.get();
                let at = text.as_ptr() as usize - input.as_ptr() as usize;
                line += memchr::memchr_iter(b'\n', &input[counted..at]).count();
                counted = at;
                items.push((text, Some(line)));
            }
            Err(e) => {
                broken = Some(e);
                break;
            }
        }
    }
    let Some(error) = broken else {
        return Ok(one_line_each(items));
    };
    let first_line = trimmed.split(|b| *b == b'\n').next().unwrap_or_default();
    if serde_json::from_slice::<&RawValue>(first_line.trim_ascii()).is_err_and(|e| e.is_eof()) {
        return Err(error);
    }
    let mut stream = Vec::with_capacity(input.len() + 1);
    let mut events = Vec::new();
    let body = input.strip_suffix(b"\n").unwrap_or(input);
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        stream.extend_from_slice(line);
        stream.push(b'\n');
        if !line.trim_ascii().is_empty() {
            events.push(OutEvent {
                label: format!("event {} (line {})", events.len() + 1, i + 1),
                sent_line: i + 1,
            });
        }
    }
    Ok(Outgoing { stream, events })
}

/// Each JSON value (with the input line it starts on, if worth naming) as one line of its own.
fn one_line_each<'a>(items: impl IntoIterator<Item = (&'a str, Option<usize>)>) -> Outgoing {
    let mut stream = Vec::new();
    let mut events = Vec::new();
    for (i, (item, line)) in items.into_iter().enumerate() {
        // Line breaks in valid JSON are only ever whitespace between tokens.
        stream.extend(item.bytes().filter(|b| *b != b'\n' && *b != b'\r'));
        stream.push(b'\n');
        events.push(OutEvent {
            label: match line {
                Some(l) => format!("event {} (line {l})", i + 1),
                None => format!("event {}", i + 1),
            },
            sent_line: i + 1,
        });
    }
    Outgoing { stream, events }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `send` makes of `input`: each event's name and the line sent for it.
    fn sent(input: &[u8]) -> Vec<(String, String)> {
        let mut events = open(input).unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        while let Some(item) = events.next().unwrap() {
            out.push(match item {
                Item::Send { line, label } => (label, String::from_utf8(line).unwrap()),
                Item::Refuse { label, reason } => (label, format!("REFUSED {reason}")),
            });
        }
        out
    }

    fn pairs(want: &[(&str, &str)]) -> Vec<(String, String)> {
        want.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn ndjson_streams_one_event_per_line_named_by_its_line() {
        let got =
            sent(b"\xEF\xBB\xBF{\"a\":1}\r\n\n  \r\n{\"b\"\r\n{\"c\":3} {\"d\":4}\n[1]\n{\"e\":5}");
        assert_eq!(
            got,
            pairs(&[
                ("event 1 (line 1)", "{\"a\":1}"),
                ("event 2 (line 4)", "{\"b\"\r"),
                ("event 3 (line 5)", "{\"c\":3}"),
                ("event 4 (line 5)", "{\"d\":4}"),
                ("event 5 (line 6)", "[1]"),
                ("event 6 (line 7)", "{\"e\":5}"),
            ])
        );
    }

    #[test]
    fn a_document_spanning_lines_after_ndjson_is_one_event_and_a_broken_one_goes_as_is() {
        // What `jq` prints after an NDJSON line: one event, its line breaks gone.
        let got = sent(b"{\"a\":1}\n{\n  \"t\": [\n    {}\n  ]\n}\n{\"b\":2}\n");
        assert_eq!(
            got,
            pairs(&[
                ("event 1 (line 1)", "{\"a\":1}"),
                ("event 2 (line 2)", "{  \"t\": [    {}  ]}"),
                ("event 3 (line 7)", "{\"b\":2}"),
            ])
        );
        // A broken one is sent line for line, for the daemon to judge, as soon as the next
        // line starts a new object (the lines after it are not held back).
        let got = sent(b"{\"a\":1}\n{\"cut\":\n{\"b\":2}\n{\"s\": \"open\n  {}\n");
        assert_eq!(
            got,
            pairs(&[
                ("event 1 (line 1)", "{\"a\":1}"),
                ("event 2 (line 2)", "{\"cut\":"),
                ("event 3 (line 3)", "{\"b\":2}"),
                ("event 4 (line 4)", "{\"s\": \"open"),
                ("event 5 (line 5)", "{}"),
            ])
        );
    }

    #[test]
    fn one_document_on_one_line_is_split_as_a_whole() {
        let got = sent(b"\n[{\"a\":1}, {\"b\":2}]\n\n");
        assert_eq!(
            got,
            pairs(&[("event 1", "{\"a\":1}"), ("event 2", "{\"b\":2}")])
        );
        // An array followed by more is one event (which the daemon refuses), as in a file of
        // values one after another.
        let got = sent(b"[{\"a\":1}]\n{\"b\":2}\n");
        assert_eq!(
            got,
            pairs(&[
                ("event 1 (line 1)", "[{\"a\":1}]"),
                ("event 2 (line 2)", "{\"b\":2}")
            ])
        );
        assert!(open(&b"[]\n"[..]).unwrap().is_empty());
        assert!(open(&b" \n\n"[..]).unwrap().is_empty());
        assert!(!open(&b"x\n"[..]).unwrap().is_empty());
    }

    #[test]
    fn pretty_printed_input_is_read_whole_and_refused_whole() {
        let got = sent(b"\n[\n {\"a\": 1.50},\n {\"b\":\n  2}\n]\n");
        assert_eq!(
            got,
            pairs(&[("event 1", "{\"a\": 1.50}"), ("event 2", "{\"b\":  2}")])
        );
        let Err(InputError::Json(e)) = open(&b"\n[\n  {\"a\": 1}\n  {\"b\": 2}\n]\n"[..]) else {
            panic!("a broken document is refused");
        };
        assert_eq!((e.line(), e.column()), (4, 3), "the input's own line: {e}");
        let mut big = b"[\n".to_vec();
        big.resize(WHOLE_MAX + 10, b' ');
        assert!(matches!(open(&big[..]), Err(InputError::TooLarge)));
    }

    #[test]
    fn ndjson_is_read_as_it_is_taken() {
        // An input that has not ended (a `tail -f`): each event comes out once its line is
        // in, without waiting for the next one.
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        struct Pipe(std::sync::mpsc::Receiver<Vec<u8>>, Vec<u8>);
        impl Read for Pipe {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                if self.1.is_empty() {
                    // Blocks like a pipe; a test that waits here for more fails on its own.
                    match self.0.recv_timeout(std::time::Duration::from_secs(5)) {
                        Ok(more) => self.1 = more,
                        Err(_) => panic!("read on past the events given"),
                    }
                }
                let n = out.len().min(self.1.len());
                out[..n].copy_from_slice(&self.1[..n]);
                self.1.drain(..n);
                Ok(n)
            }
        }
        tx.send(b"{\"n\":1}\n".to_vec()).unwrap();
        let mut events = open(Pipe(rx, Vec::new())).unwrap();
        assert!(matches!(events.next(), Ok(Some(Item::Send { .. }))));
        assert!(events.may_wait(), "nothing more to send without reading");
        tx.send(b"{\"n\":2}\n".to_vec()).unwrap();
        assert!(matches!(events.next(), Ok(Some(Item::Send { .. }))));
    }

    fn labels(o: &Outgoing) -> Vec<(&str, usize)> {
        o.events
            .iter()
            .map(|e| (e.label.as_str(), e.sent_line))
            .collect()
    }

    #[test]
    fn ndjson_goes_line_for_line_keeping_blank_lines_for_the_numbering() {
        let o = split_input(b"{\"a\":1}\n\n  \r\n{\"b\"\r\n{\"c\":3}").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\n\n  \r\n{\"b\"\r\n{\"c\":3}\n");
        assert_eq!(
            labels(&o),
            [
                ("event 1 (line 1)", 1),
                ("event 2 (line 4)", 4),
                ("event 3 (line 5)", 5)
            ]
        );
    }

    #[test]
    fn a_document_keeps_its_bytes_but_its_line_breaks() {
        let o = split_input(b"\n[\n {\"a\": 1.50},\n {\"b\":\n  \"\\u00e9\"}, 7\n]\n").unwrap();
        assert_eq!(o.stream, b"{\"a\": 1.50}\n{\"b\":  \"\\u00e9\"}\n7\n");
        assert_eq!(labels(&o), [("event 1", 1), ("event 2", 2), ("event 3", 3)]);
        let o = split_input(b"{\n  \"one\": true\n}\n").unwrap();
        assert_eq!(o.stream, b"{  \"one\": true}\n");
        assert_eq!(labels(&o), [("event 1", 1)]);
        assert!(split_input(b"[]").unwrap().events.is_empty());
        assert!(split_input(b" \n\n").unwrap().events.is_empty());
    }

    #[test]
    fn documents_one_after_another_are_one_event_each_named_by_their_line() {
        // What `jq . a.json b.json` prints.
        let o =
            split_input(b"{\n  \"a\": 1,\n  \"t\": [\n    {}\n  ]\n}\n\n{\r\n  \"b\": 2\r\n}\n")
                .unwrap();
        assert_eq!(
            o.stream,
            b"{  \"a\": 1,  \"t\": [    {}  ]}\n{  \"b\": 2}\n"
        );
        assert_eq!(
            labels(&o),
            [("event 1 (line 1)", 1), ("event 2 (line 8)", 2)]
        );
        // NDJSON that parses goes the same way, and names the same lines.
        let o = split_input(b"{\"a\":1}\n\n{\"b\":2}\n").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(
            labels(&o),
            [("event 1 (line 1)", 1), ("event 2 (line 3)", 2)]
        );
    }

    #[test]
    fn a_broken_pretty_printed_document_is_refused_whole_not_sent_line_by_line() {
        // A missing comma: line by line, its two elements would be stored.
        let e = split_input(b"[\n  {\"a\": 1}\n  {\"b\": 2}\n]\n").unwrap_err();
        assert_eq!((e.line(), e.column()), (3, 3), "{e}");
        // A `{}` inside a broken document would have been stored as an event.
        let e = split_input(b"{\n  \"t\": [\n    {}\n  ],\n}\n").unwrap_err();
        assert_eq!(e.line(), 5, "{e}");
        // NDJSON whose first line is whole is still judged line by line.
        let o = split_input(b"{\"a\":1}\n{\n{}\n").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\n{\n{}\n");
        assert_eq!(o.events.len(), 3);
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_not_part_of_the_first_event() {
        let o = split_input(b"\xEF\xBB\xBF[{\"a\":1},{\"b\":2}]").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\n{\"b\":2}\n");
        let o = split_input(b"\xEF\xBB\xBF{\"a\":1}\r\n{\"b\":2}\r\n{\"c\"\r\n").unwrap();
        assert_eq!(o.stream, b"{\"a\":1}\r\n{\"b\":2}\r\n{\"c\"\r\n");
        assert_eq!(
            labels(&o),
            [
                ("event 1 (line 1)", 1),
                ("event 2 (line 2)", 2),
                ("event 3 (line 3)", 3)
            ]
        );
    }
}
