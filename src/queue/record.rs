//! On-disk encoding of one log record (the value under a `log` key).
//!
//! ```text
//! offset  size  field
//! 0       1     version (1)
//! 1       1     event kind code (event::EventKind::code)
//! 2       1     flags: bit 0 = payload is zstd-compressed, bit 1 = client credentials follow,
//!               bit 2 = payload is chunked (see below)
//! 3       8     received_ms, big-endian
//! 11      16    event id (UUID v7)
//! 27      1     n = number of routes
//! 28      2n    sink ids, big-endian u16
//! ..            if bit 1: u16 len + api key bytes (0xFFFF = none), u16 len + project id bytes
//! ..            payload (rest of the value), or with bit 2: u32 stored length, the bytes being
//!               in the queue's chunk tree in [`CHUNK`]-byte pieces
//! ```
//! # Packs
//! Small records (at most [`PACK_RECORD_MAX`] bytes encoded, nearly every event) are not
//! stored one per key: the writer packs the consecutive small records of a group commit into
//! values of at most [`PACK_MAX`] raw bytes and compresses each pack as one zstd frame. The key
//! of a pack is the sequence number of its *last* record, so a range scan from any `seq` finds
//! the pack holding it first.
//!
//! ```text
//! offset  size  field
//! 0       1     pack version (2), which no record starts with
//! 1       1     flags: bit 0 = body is one zstd frame
//! 2       2     n = number of records (≥ 1), big-endian; they are seq key-n+1 ..= key
//! 4       ..    body: n × (u32 BE length + a record as above, its payload never compressed)
//! ```
//! One frame per ~8 events instead of one per event: zstd level 1 compresses 2 KB LLM JSON
//! events ~3.5x instead of ~2x, at ~5 instead of ~8 µs per event (measured on the benchmark's
//! events), and sled handles one value instead of eight.
//!
//! Why chunks: sled 0.34 writes a page larger than a quarter segment as a separate blob file
//! that it never fsyncs, and a leaf page holds up to 17 values. Keeping every value at most
//! [`CHUNK`] bytes keeps every page inside the synced log (see `queue::open`).
//! A value that does not decode is reported as [`RecordError`], never a panic: the queue moves
//! such records to the dead letters and counts them.

use bytes::Bytes;

use crate::config::{Compression, Secret};
use crate::event::{ClientCredentials, EventKind, StoredEvent};

const VERSION: u8 = 1;
const PACK_VERSION: u8 = 2;
/// Records encoded in at most this many bytes are packed (see "Packs").
pub(crate) const PACK_RECORD_MAX: usize = 8 * 1024;
/// Raw bytes of one pack's body: stored uncompressed (incompressible events) it still fits
/// the [`CHUNK`] bound on sled values.
pub(crate) const PACK_MAX: usize = CHUNK;
const FLAG_ZSTD: u8 = 1;
const FLAG_CREDS: u8 = 2;
const FLAG_CHUNKED: u8 = 4;
const NONE_LEN: u16 = u16::MAX;
/// The largest value stored under one key: inline payloads and chunks alike.
pub(crate) const CHUNK: usize = 16 * 1024;
/// zstd level 1: ~3-4x on LLM JSON at several hundred MB/s, so it costs little on the ack path.
const ZSTD_LEVEL: i32 = 1;
/// Payloads smaller than this are stored raw; compression would not pay for its header.
const COMPRESS_MIN: usize = 256;

#[derive(Debug, thiserror::Error)]
#[error("corrupt record: {0}")]
pub struct RecordError(pub &'static str);

/// Everything a record stores except the sequence number (that is the key).
pub(crate) struct RecordRef<'a> {
    pub kind: EventKind,
    pub received_ms: u64,
    pub id: uuid::Uuid,
    pub routes: &'a [u16],
    pub creds: &'a ClientCredentials,
    pub payload: &'a [u8],
}

thread_local! {
    // One zstd context per thread: creating one per record cost ~40 % of compression time
    // (a large allocation each time) in the profile.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        match c.as_mut() {
            Some(c) => c.compress(payload),
            None => zstd::bulk::compress(payload, ZSTD_LEVEL),
        }
    })
}

/// Decompresses into a buffer of the frame's own recorded size (bounded by the largest
/// payload ingest admits, or a pack's body), not a worst-case one: a 64 MiB buffer per record made the drain
/// 2.6x slower and pinned that much memory per event in flight.
fn decompress(frame: &[u8], limit: u64) -> Result<Vec<u8>, RecordError> {
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n <= limit => n as usize,
        Ok(Some(_)) => return Err(RecordError("payload larger than any accepted body")),
        _ => return Err(RecordError("payload is not a zstd frame with its size")),
    };
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        let out = match d.as_mut() {
            Some(d) => d.decompress(frame, size),
            None => zstd::bulk::decompress(frame, size),
        };
        out.map_err(|_| RecordError("payload does not decompress"))
    })
}

/// An encoded record: the log value, and the stored payload when it is too large to inline.
pub(crate) struct Encoded {
    pub value: Vec<u8>,
    pub overflow: Option<Vec<u8>>,
    /// Small and uncompressed: the writer packs it (see "Packs").
    pub packable: bool,
}

impl Encoded {
    /// Bytes this record occupies in the queue (counted against `max_bytes`).
    pub fn stored_len(&self) -> usize {
        8 + self.value.len() + self.overflow.as_ref().map_or(0, |o| o.len())
    }
}

/// Encodes a record. Small ones are left uncompressed for the writer to pack; larger ones are
/// compressed here, on the caller's thread, and stored alone (chunked when large).
pub(crate) fn encode(r: &RecordRef<'_>, compression: Compression) -> Encoded {
    let creds_len = if r.creds.is_empty() {
        0
    } else {
        4 + r.creds.api_key.as_ref().map_or(0, |k| k.expose().len())
            + r.creds.project_id.as_ref().map_or(0, |p| p.len())
    };
    let raw_len = 28 + 2 * r.routes.len().min(255) + creds_len + r.payload.len();
    let packable = raw_len <= PACK_RECORD_MAX;
    let compressed = match compression {
        Compression::Zstd if !packable && r.payload.len() >= COMPRESS_MIN => {
            // zstd only fails on allocation failure or invalid parameters; fall back to raw.
            compress(r.payload)
                .ok()
                .filter(|c| c.len() < r.payload.len())
        }
        _ => None,
    };
    let payload: &[u8] = compressed.as_deref().unwrap_or(r.payload);
    let mut flags = 0;
    let chunked = payload.len() > CHUNK;
    if chunked {
        flags |= FLAG_CHUNKED;
    }
    if compressed.is_some() {
        flags |= FLAG_ZSTD;
    }
    if !r.creds.is_empty() {
        flags |= FLAG_CREDS;
    }
    let mut out = Vec::with_capacity(28 + 2 * r.routes.len() + payload.len() + 64);
    out.push(VERSION);
    out.push(r.kind.code());
    out.push(flags);
    out.extend_from_slice(&r.received_ms.to_be_bytes());
    out.extend_from_slice(r.id.as_bytes());
    // Ingest routes to at most the configured sinks; config caps sinks at 255.
    out.push(r.routes.len().min(255) as u8);
    for id in r.routes.iter().take(255) {
        out.extend_from_slice(&id.to_be_bytes());
    }
    if flags & FLAG_CREDS != 0 {
        put_opt(&mut out, r.creds.api_key.as_ref().map(|k| k.expose()));
        put_opt(&mut out, r.creds.project_id.as_deref());
    }
    if chunked {
        // Payload length is bounded by the body limit (far below 4 GiB).
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        Encoded {
            value: out,
            overflow: Some(payload.to_vec()),
            packable: false,
        }
    } else {
        out.extend_from_slice(payload);
        Encoded {
            value: out,
            overflow: None,
            packable,
        }
    }
}

/// Header of a record: `Some(stored payload length)` when its payload is chunked (never for
/// a pack).
pub(crate) fn chunked_len(value: &[u8]) -> Option<usize> {
    if value.first() != Some(&VERSION) {
        return None;
    }
    let flags = *value.get(2)?;
    if flags & FLAG_CHUNKED == 0 {
        return None;
    }
    let tail = value.get(value.len().checked_sub(4)?..)?;
    Some(u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]) as usize)
}

/// The bytes a pack's records lie in (borrowed when the body is not compressed).
pub(crate) type Body<'a> = std::borrow::Cow<'a, [u8]>;
/// Where each record of a pack lies in its [`Body`], in sequence order.
pub(crate) type Spans = Vec<std::ops::Range<usize>>;

/// Collects packable records into one pack value.
#[derive(Default)]
pub(crate) struct PackBuilder {
    body: Vec<u8>,
    count: u16,
}

impl PackBuilder {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether a record of `len` bytes still fits (the first one always does).
    pub fn fits(&self, len: usize) -> bool {
        self.count == 0 || (self.count < u16::MAX && self.body.len() + 4 + len <= PACK_MAX)
    }

    pub fn push(&mut self, record: &[u8]) {
        // Packable records are at most PACK_RECORD_MAX bytes.
        self.body
            .extend_from_slice(&(record.len() as u32).to_be_bytes());
        self.body.extend_from_slice(record);
        self.count += 1;
    }

    /// The pack's value, its body compressed as one frame when that makes it smaller.
    pub fn finish(self, compression: Compression) -> Vec<u8> {
        let compressed = match compression {
            Compression::Zstd if self.body.len() >= COMPRESS_MIN => compress(&self.body)
                .ok()
                .filter(|c| c.len() < self.body.len()),
            _ => None,
        };
        let flags = if compressed.is_some() { FLAG_ZSTD } else { 0 };
        let body = compressed.as_deref().unwrap_or(&self.body);
        let mut out = Vec::with_capacity(4 + body.len());
        out.push(PACK_VERSION);
        out.push(flags);
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(body);
        out
    }
}

/// A pack of `records`, in sequence order (rewriting an existing pack: eviction, repair).
pub(crate) fn pack<'a>(
    records: impl IntoIterator<Item = &'a [u8]>,
    compression: Compression,
) -> Vec<u8> {
    let mut p = PackBuilder::default();
    for r in records {
        p.push(r);
    }
    p.finish(compression)
}

pub(crate) fn is_pack(value: &[u8]) -> bool {
    value.first() == Some(&PACK_VERSION)
}

/// How many records a log value holds (a pack's header count; 1 for anything else).
pub(crate) fn count_of(value: &[u8]) -> u64 {
    match value {
        [PACK_VERSION, _, hi, lo, ..] => u64::from(u16::from_be_bytes([*hi, *lo])).max(1),
        _ => 1,
    }
}

/// A pack's records: the body, and where each record lies in it, in sequence order.
pub(crate) fn unpack(value: &[u8]) -> Result<(Body<'_>, Spans), RecordError> {
    let [PACK_VERSION, flags, hi, lo, rest @ ..] = value else {
        return Err(RecordError("not a pack"));
    };
    let n = u16::from_be_bytes([*hi, *lo]) as usize;
    if n == 0 {
        return Err(RecordError("empty pack"));
    }
    let body: Body<'_> = if flags & FLAG_ZSTD != 0 {
        decompress(rest, PACK_MAX as u64)?.into()
    } else {
        rest.into()
    };
    let mut spans = Vec::with_capacity(n);
    let mut r = Reader { buf: &body, pos: 0 };
    for _ in 0..n {
        let b = r.take(4)?;
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let start = r.pos;
        r.take(len)?;
        spans.push(start..r.pos);
    }
    if r.pos != body.len() {
        return Err(RecordError("trailing bytes after the pack's records"));
    }
    Ok((body, spans))
}

fn put_opt(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        // Keys longer than 64 KiB are refused at ingest; truncation here cannot happen.
        Some(s) if s.len() < NONE_LEN as usize => {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        _ => out.extend_from_slice(&NONE_LEN.to_be_bytes()),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self.pos.checked_add(n).ok_or(RecordError("length"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(RecordError("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn opt_str(&mut self) -> Result<Option<String>, RecordError> {
        let len = self.u16()?;
        if len == NONE_LEN {
            return Ok(None);
        }
        let b = self.take(len as usize)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| RecordError("credential is not UTF-8"))
    }
}

/// Decodes a record; `fetch(len)` returns the chunked payload of `len` bytes when bit 2 is set.
pub(crate) fn decode(
    seq: u64,
    value: &[u8],
    fetch: impl FnOnce(usize) -> Result<Vec<u8>, RecordError>,
) -> Result<StoredEvent, RecordError> {
    let mut r = Reader { buf: value, pos: 0 };
    if r.u8()? != VERSION {
        return Err(RecordError("unknown version"));
    }
    let kind = EventKind::from_code(r.u8()?).ok_or(RecordError("unknown event kind"))?;
    let flags = r.u8()?;
    let received_ms = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| RecordError("time"))?);
    let id = uuid::Uuid::from_slice(r.take(16)?).map_err(|_| RecordError("id"))?;
    let n = r.u8()? as usize;
    let mut routes = Vec::with_capacity(n);
    for _ in 0..n {
        routes.push(r.u16()?);
    }
    let mut creds = ClientCredentials::default();
    if flags & FLAG_CREDS != 0 {
        creds.api_key = r.opt_str()?.map(Secret::new);
        creds.project_id = r.opt_str()?;
    }
    let fetched;
    let rest: &[u8] = if flags & FLAG_CHUNKED != 0 {
        let b = r.take(4)?;
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if r.pos != value.len() {
            return Err(RecordError("trailing bytes after chunk length"));
        }
        fetched = fetch(len)?;
        if fetched.len() != len {
            return Err(RecordError("chunked payload has the wrong length"));
        }
        &fetched
    } else {
        &value[r.pos..]
    };
    let payload = if flags & FLAG_ZSTD != 0 {
        decompress(rest, crate::config::MAX_RECORD_PAYLOAD)?
    } else {
        rest.to_vec()
    };
    Ok(StoredEvent {
        seq,
        id,
        kind,
        received_ms,
        routes,
        creds,
        payload: Bytes::from(payload),
    })
}

/// Reads only the routes of a record, without touching the payload (delivery skips records
/// that are not routed to it this way).
pub(crate) fn routes_of(value: &[u8]) -> Result<impl Iterator<Item = u16> + '_, RecordError> {
    let n = *value.get(27).ok_or(RecordError("truncated"))? as usize;
    let ids = value
        .get(28..28 + 2 * n)
        .ok_or(RecordError("truncated routes"))?;
    Ok(ids
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: &[u8], creds: &ClientCredentials, c: Compression) -> Vec<u8> {
        let e = encode(
            &RecordRef {
                kind: EventKind::Pezzo,
                received_ms: 1_700_000_000_123,
                id: uuid::Uuid::from_u128(42),
                routes: &[1, 7],
                creds,
                payload,
            },
            c,
        );
        assert!(e.overflow.is_none());
        e.value
    }

    fn no_chunks(_: usize) -> Result<Vec<u8>, RecordError> {
        Err(RecordError("no chunks in this test"))
    }

    #[test]
    fn large_payloads_overflow_into_chunks() {
        // Incompressible bytes larger than one chunk.
        let mut x: u64 = 7;
        let payload: Vec<u8> = (0..40_000)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let creds = ClientCredentials::default();
        let e = encode(
            &RecordRef {
                kind: EventKind::Native,
                received_ms: 1,
                id: uuid::Uuid::from_u128(1),
                routes: &[3],
                creds: &creds,
                payload: &payload,
            },
            Compression::Zstd,
        );
        let stored = e.overflow.clone().unwrap();
        assert!(e.value.len() < 64);
        assert_eq!(chunked_len(&e.value), Some(stored.len()));
        let back = decode(5, &e.value, |len| {
            assert_eq!(len, stored.len());
            Ok(stored.clone())
        })
        .unwrap();
        assert_eq!(&back.payload[..], &payload[..]);
        assert!(decode(5, &e.value, no_chunks).is_err());
    }

    #[test]
    fn round_trips_with_and_without_compression() {
        // Larger than a packable record: compressed on its own.
        let payload = br#"{"a":"hello hello hello hello hello hello hello hello"}"#.repeat(200);
        let creds = ClientCredentials {
            api_key: Some(Secret::new("k")),
            project_id: Some("p".into()),
        };
        for c in [Compression::Zstd, Compression::None] {
            let v = sample(&payload, &creds, c);
            if c == Compression::Zstd {
                assert!(v.len() < payload.len() / 2, "compressed to {}", v.len());
            }
            let e = decode(9, &v, no_chunks).unwrap();
            assert_eq!(&e.payload[..], &payload[..]);
            assert_eq!(e.routes, vec![1, 7]);
            assert_eq!(e.creds, creds);
            assert_eq!(e.kind, EventKind::Pezzo);
            assert_eq!(e.received_ms, 1_700_000_000_123);
            assert_eq!(e.id, uuid::Uuid::from_u128(42));
            assert_eq!(routes_of(&v).unwrap().collect::<Vec<_>>(), vec![1, 7]);
        }
    }

    #[test]
    fn packs_round_trip_and_refuse_garbage() {
        let creds = ClientCredentials::default();
        let recs: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                sample(
                    format!("{{\"i\":{i}}}").as_bytes(),
                    &creds,
                    Compression::Zstd,
                )
            })
            .collect();
        for c in [Compression::Zstd, Compression::None] {
            let mut p = PackBuilder::default();
            for r in &recs {
                assert!(p.fits(r.len()));
                p.push(r);
            }
            let v = p.finish(c);
            assert!(is_pack(&v) && chunked_len(&v).is_none());
            assert_eq!(count_of(&v), 5);
            let (body, spans) = unpack(&v).unwrap();
            let back: Vec<&[u8]> = spans.into_iter().map(|s| &body[s]).collect();
            assert_eq!(back, recs.iter().map(|r| &r[..]).collect::<Vec<_>>());
            for cut in 0..v.len() {
                let _ = unpack(&v[..cut]);
            }
        }
        let mut full = PackBuilder::default();
        let big = vec![b'x'; PACK_MAX / 2 - 4];
        assert!(full.fits(big.len()));
        full.push(&big);
        assert!(full.fits(big.len()));
        full.push(&big);
        assert!(!full.fits(1), "a pack stays within PACK_MAX");
        assert!(full.finish(Compression::Zstd).len() <= PACK_MAX + 4);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = sample(b"{}", &ClientCredentials::default(), Compression::None);
        for cut in 0..good.len() {
            let _ = decode(1, &good[..cut], no_chunks);
            let _ = routes_of(&good[..cut]).map(|i| i.count());
        }
        let mut bad = good.clone();
        bad[2] = FLAG_ZSTD;
        assert!(decode(1, &bad, no_chunks).is_err());
        assert!(decode(1, &[9, 9, 9], no_chunks).is_err());
    }
}
