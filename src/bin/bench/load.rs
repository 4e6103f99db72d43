//! Load generators. Every loop is bounded twice: by time (its window) and by count.
//!
//! - [`closed_loop`]: N clients, each with one event in flight: send, wait for the ack, send
//!   the next. Throughput and ack latency at N concurrent clients.
//! - [`pipelined`]: N NDJSON clients, each keeping up to `window` events in flight (the
//!   protocol answers in order, so a reply is matched to its send time by position).
//! - [`steady`]: open loop at a fixed rate, spread over a few connections, each send on its own
//!   schedule; latency is measured from the actual send, and sends that started more than one
//!   period late are counted (the schedule slipped: the rate was not held).
//! - [`paced_blocking`]: one synchronous caller, as an app's logging call sees it.
//!
//! Latency samples are kept whole (nanoseconds, one `u64` each) and sorted once at the end,
//! so percentiles are exact, not bucketed. Only what completes inside the measurement window
//! (after a warm-up) counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{self, Addr, Http, Ndjson};

/// What a client sends.
#[derive(Clone)]
pub enum Proto {
    /// Pre-formatted HTTP requests, cycled through; success is any 2xx.
    Http(Arc<Vec<Bytes>>),
    /// NDJSON lines (each ending in `\n`), cycled through; success is `{"ok":true`.
    Ndjson(Arc<Vec<Bytes>>),
}

impl Proto {
    fn pool_len(&self) -> usize {
        match self {
            Proto::Http(v) | Proto::Ndjson(v) => v.len(),
        }
    }
}

/// When to count.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn after(warmup: Duration, measure: Duration) -> Window {
        let start = Instant::now() + warmup;
        Window {
            start,
            end: start + measure,
        }
    }

    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }

    pub fn len(&self) -> Duration {
        self.end - self.start
    }
}

/// What a cell measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Acks completed inside the window.
    pub acked: u64,
    /// Replies that were not acks (4xx/5xx, `"ok":false`), anywhere in the run.
    pub refused: u64,
    /// Ack latencies (ns) of the acks inside the window.
    pub latencies: Vec<u64>,
    /// Open loop only: sends that started more than one period late.
    pub late: u64,
    /// The first refusal seen, for the report.
    pub first_refusal: Option<String>,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.acked += o.acked;
        self.refused += o.refused;
        self.late += o.late;
        self.latencies.extend(o.latencies);
        if self.first_refusal.is_none() {
            self.first_refusal = o.first_refusal;
        }
    }

    pub fn rate(&self, w: &Window) -> f64 {
        self.acked as f64 / w.len().as_secs_f64()
    }
}

/// One connection of either protocol, one event in flight.
enum Conn {
    Http(Http),
    Ndjson(Ndjson),
}

impl Conn {
    async fn open(addr: &Addr, proto: &Proto) -> std::io::Result<Conn> {
        Ok(match proto {
            Proto::Http(_) => Conn::Http(Http::connect(addr).await?),
            Proto::Ndjson(_) => Conn::Ndjson(Ndjson::connect(addr).await?),
        })
    }

    /// Sends item `i` of the pool; Ok(None) on an ack, Ok(Some(what)) on a refusal.
    async fn send(&mut self, proto: &Proto, i: usize) -> std::io::Result<Option<String>> {
        match (self, proto) {
            (Conn::Http(c), Proto::Http(reqs)) => {
                let status = c.send(&reqs[i]).await?;
                Ok((!(200..300).contains(&status)).then(|| format!("HTTP {status}")))
            }
            (Conn::Ndjson(c), Proto::Ndjson(lines)) => {
                let ok = c.send(&lines[i]).await?;
                Ok((!ok).then(|| "NDJSON reply without \"ok\":true".to_string()))
            }
            _ => Err(std::io::Error::other("connection and protocol differ")),
        }
    }
}

/// One client per entry of `quotas`: each sends, waits for the ack, sends again, until the
/// window ends or it sent its quota.
pub async fn closed_loop(
    addr: &Addr,
    proto: &Proto,
    quotas: &[u64],
    w: Window,
) -> anyhow::Result<Outcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for (c, &max_per_client) in quotas.iter().enumerate() {
        let (addr, proto) = (addr.clone(), proto.clone());
        tasks.spawn(async move {
            let mut conn = Conn::open(&addr, &proto).await?;
            let mut out = Outcome::default();
            for k in 0..max_per_client {
                let t = Instant::now();
                if t >= w.end {
                    break;
                }
                let refused = conn.send(&proto, pick(c, k, proto.pool_len())).await?;
                let done = Instant::now();
                if let Some(r) = refused {
                    out.refused += 1;
                    out.first_refusal.get_or_insert(r);
                } else if w.contains(done) {
                    out.acked += 1;
                    out.latencies.push((done - t).as_nanos() as u64);
                }
            }
            Ok::<_, std::io::Error>(out)
        });
    }
    join(tasks).await
}

/// NDJSON connections, each keeping up to `window` events in flight; connection `c` sends at
/// most `quotas[c]` events.
pub async fn pipelined(
    addr: &Addr,
    lines: Arc<Vec<Bytes>>,
    quotas: &[u64],
    window: usize,
    w: Window,
) -> anyhow::Result<Outcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for (c, &max_per_client) in quotas.iter().enumerate() {
        let (addr, lines) = (addr.clone(), lines.clone());
        tasks.spawn(async move {
            let conn = Ndjson::connect(&addr).await?;
            let (mut rd, mut wr) = conn.into_split();
            // The channel's capacity is the window: a slot is taken before a line is written
            // and freed when its reply is read.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(window.max(1));
            let writer = tokio::spawn(async move {
                let mut sent = 0u64;
                for k in 0..max_per_client {
                    let Ok(permit) = tx.reserve().await else {
                        break;
                    };
                    let t = Instant::now();
                    if t >= w.end {
                        break;
                    }
                    permit.send(t);
                    wr.write_all(&lines[pick(c, k, lines.len())]).await?;
                    sent += 1;
                }
                // Tell the daemon we are done: it answers what it read, then closes.
                wr.shutdown().await?;
                Ok::<u64, std::io::Error>(sent)
            });
            let mut out = Outcome::default();
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut received = 0u64;
            'read: loop {
                buf.reserve(8192);
                if rd.read_buf(&mut buf).await? == 0 {
                    break;
                }
                let done = Instant::now();
                let mut lines_seen = Vec::new();
                client::take_lines(&mut buf, |l| lines_seen.push(client::is_ack(l)));
                for ok in lines_seen {
                    let Some(t) = rx.recv().await else {
                        break 'read;
                    };
                    received += 1;
                    if !ok {
                        out.refused += 1;
                        out.first_refusal
                            .get_or_insert_with(|| "NDJSON reply without \"ok\":true".into());
                    } else if w.contains(done) {
                        out.acked += 1;
                        out.latencies.push((done - t).as_nanos() as u64);
                    }
                }
            }
            let sent = writer.await.map_err(std::io::Error::other)??;
            if received != sent {
                return Err(std::io::Error::other(format!(
                    "sent {sent} lines but got {received} replies"
                )));
            }
            Ok(out)
        });
    }
    join(tasks).await
}

/// Open loop: `rate` events/s in total over `conns` connections, each on its own schedule.
pub async fn steady(
    addr: &Addr,
    proto: &Proto,
    rate: f64,
    conns: usize,
    w: Window,
) -> anyhow::Result<Outcome> {
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let t0 = Instant::now();
    let max = ((w.end - t0).as_secs_f64() * rate / conns as f64).ceil() as u64 + 1;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let (addr, proto) = (addr.clone(), proto.clone());
        tasks.spawn(async move {
            let mut conn = Conn::open(&addr, &proto).await?;
            let mut out = Outcome::default();
            let mut next = t0 + Duration::from_secs_f64(c as f64 / rate);
            for k in 0..max {
                if next >= w.end {
                    break;
                }
                tokio::time::sleep_until(next.into()).await;
                let t = Instant::now();
                if t > next + period {
                    out.late += 1;
                }
                let refused = conn.send(&proto, pick(c, k, proto.pool_len())).await?;
                let done = Instant::now();
                if let Some(r) = refused {
                    out.refused += 1;
                    out.first_refusal.get_or_insert(r);
                } else if w.contains(t) {
                    out.acked += 1;
                    out.latencies.push((done - t).as_nanos() as u64);
                }
                next += period;
            }
            Ok::<_, std::io::Error>(out)
        });
    }
    join(tasks).await
}

/// Which item of a pool of `len` client `c` sends as its `k`-th event: clients start at
/// different places, so concurrent requests carry different events.
pub fn pick(c: usize, k: u64, len: usize) -> usize {
    (c.wrapping_mul(7919).wrapping_add(k as usize)) % len.max(1)
}

/// `total` events split over `clients` (the first ones take the remainder).
pub fn quotas(total: u64, clients: usize) -> Vec<u64> {
    let c = clients.max(1) as u64;
    (0..c)
        .map(|i| total / c + u64::from(i < total % c))
        .collect()
}

async fn join(
    mut tasks: tokio::task::JoinSet<std::io::Result<Outcome>>,
) -> anyhow::Result<Outcome> {
    let mut total = Outcome::default();
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(o)) => total.merge(o),
            Ok(Err(e)) => {
                first_err.get_or_insert_with(|| anyhow!("a client failed: {e}"));
            }
            Err(e) => {
                first_err.get_or_insert_with(|| anyhow!("a client task failed: {e}"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// A synchronous caller: `count` calls, one every `pace` (or back to back when a call takes
/// longer), stopping after `max_time`. Returns each call's duration (ns).
pub fn paced_blocking(
    count: usize,
    pace: Duration,
    max_time: Duration,
    mut call: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<u64>> {
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(count);
    for k in 0..count {
        let due = t0 + pace * k as u32;
        let now = Instant::now();
        if now - t0 > max_time {
            break;
        }
        if due > now {
            std::thread::sleep(due - now);
        }
        let t = Instant::now();
        call(k)?;
        out.push(t.elapsed().as_nanos() as u64);
    }
    if out.is_empty() {
        bail!("no call completed");
    }
    Ok(out)
}

/// Latency percentiles of a set of samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

pub fn summarize(samples: &mut [u64]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_unstable();
    let at = |q: f64| {
        // Nearest rank: the smallest sample with at least q of all samples at or below it.
        let rank = (q * samples.len() as f64).ceil() as usize;
        Duration::from_nanos(samples[rank.clamp(1, samples.len()) - 1])
    };
    Summary {
        count: samples.len(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: Duration::from_nanos(samples[samples.len() - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        let s = summarize(&mut v);
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50, Duration::from_nanos(500));
        assert_eq!(s.p99, Duration::from_nanos(990));
        assert_eq!(s.p999, Duration::from_nanos(999));
        assert_eq!(s.max, Duration::from_nanos(1000));
        assert_eq!(summarize(&mut [7]).p999, Duration::from_nanos(7));
    }
}
