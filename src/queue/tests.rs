use super::*;
use crate::config::Compression;
use crate::event::{ClientCredentials, EventKind};
use crate::formats::Attributes;

fn cfg(dir: &Path) -> QueueConfig {
    QueueConfig {
        data_dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        max_events: None,
        when_full: WhenFull::Reject,
        cache_bytes: 8 << 20,
        compression: Compression::Zstd,
        compact_above: 1 << 20,
        dead_letter_max_bytes: crate::config::DEFAULT_DEAD_LETTER_MAX_BYTES,
    }
}

fn ev(payload: &str) -> NewEvent {
    NewEvent {
        kind: EventKind::Native,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        attrs: Attributes::default(),
        creds: ClientCredentials::default(),
    }
}

/// A JSON object holding `len` pseudo-random letters (seeded): poorly compressible, so it is
/// stored in chunks when large.
fn incompressible_json(len: usize, seed: u64) -> String {
    let mut s = String::from("{\"blob\":\"");
    let mut x = seed;
    for _ in 0..len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push((b'a' + ((x >> 33) % 26) as u8) as char);
    }
    s.push_str("\"}");
    s
}

/// Appends `n` events (`{"i":0}`, …) routed to `routes`, one commit each.
fn append_one_by_one(q: &Queue, rt: &tokio::runtime::Runtime, n: usize, routes: &[u16]) {
    for i in 0..n {
        let rec = q.prepare(&ev(&format!("{{\"i\":{i}}}")), routes);
        rt.block_on(q.append(vec![rec])).unwrap();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn payloads(b: &ReadBatch) -> Vec<String> {
    b.items
        .iter()
        .map(|i| match i {
            ReadItem::Event(e) => String::from_utf8(e.payload.to_vec()).unwrap(),
            ReadItem::Corrupt { seq, .. } => format!("corrupt {seq}"),
        })
        .collect()
}

#[test]
fn append_read_route_and_sequence_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let a = q.sink_id("a").unwrap();
        let b = q.sink_id("b").unwrap();
        assert_ne!(a, b);
        let recs = vec![
            q.prepare(&ev(r#"{"n":1}"#), &[a, b]),
            q.prepare(&ev(r#"{"n":2}"#), &[b]),
            q.prepare(&ev(r#"{"n":3}"#), &[a]),
        ];
        let ids = rt.block_on(q.append(recs)).unwrap();
        assert_eq!(ids.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![0, 1, 2]);
        let r = q.read(a, 0, 10, 1 << 20, 100).unwrap();
        assert_eq!(payloads(&r), vec![r#"{"n":1}"#, r#"{"n":3}"#]);
        assert_eq!(r.next, 3);
        assert!(q.stats().syncs >= 1);
        q.set_cursor(a, 3).unwrap();
        q.set_cursor(b, 3).unwrap();
        assert_eq!(q.gc(&[a, b]).unwrap(), 3);
        assert_eq!(q.stats().events, 0);
        q.close().unwrap();
    }
    // Reopen with an empty log: sequence numbers keep growing, cursors persist.
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    assert_eq!(q.cursor(a).unwrap(), 3);
    let ids = rt
        .block_on(q.append(vec![q.prepare(&ev("{}"), &[a])]))
        .unwrap();
    assert_eq!(ids[0].seq, 3);
}

#[test]
fn gc_keeps_what_the_slowest_sink_needs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let (a, b) = (q.sink_id("a").unwrap(), q.sink_id("b").unwrap());
    // One commit each: ten values (records packed together go only as a whole).
    append_one_by_one(&q, &rt, 10, &[a, b]);
    q.set_cursor(a, 10).unwrap();
    q.set_cursor(b, 4).unwrap();
    assert_eq!(q.gc(&[a, b]).unwrap(), 4);
    let r = q.read(b, 0, 100, 1 << 20, 100).unwrap();
    assert_eq!(r.items.len(), 6);
}

/// The done ranges stored after a cursor survive a reopen, leave the cursor readable as it
/// was (gc, numbering), and are read back clipped to above the cursor, in order.
#[test]
fn done_ranges_persist_beside_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let (a, b) = (q.sink_id("a").unwrap(), q.sink_id("b").unwrap());
        append_one_by_one(&q, &rt, 10, &[a, b]);
        assert_eq!(q.progress(a).unwrap(), (0, vec![]));
        q.set_progress(a, 2, &[3..5, 7..10]).unwrap();
        q.set_cursor(b, 10).unwrap();
        assert_eq!(q.cursor(a).unwrap(), 2);
        assert_eq!(q.gc(&[a, b]).unwrap(), 2);
        q.close().unwrap();
    }
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let a = q.sink_id("a").unwrap();
        assert_eq!(q.progress(a).unwrap(), (2, vec![3..5, 7..10]));
        // Ranges below the cursor or out of order are dropped, never widened.
        q.set_progress(a, 4, &[1..3, 3..6, 5..8, 9..9, 8..12])
            .unwrap();
        assert_eq!(q.progress(a).unwrap(), (4, vec![4..6, 6..8, 8..12]));
        q.close().unwrap();
    }
    // Numbering never restarts below a range's end.
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    let ids = rt
        .block_on(q.append(vec![q.prepare(&ev("{}"), &[a])]))
        .unwrap();
    assert!(ids[0].seq >= 12, "{}", ids[0].seq);
}

#[test]
fn large_payloads_round_trip_through_chunks_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    // ~300 KB of poorly compressible JSON string.
    let s = incompressible_json(300_000, 1);
    let ids = rt
        .block_on(q.append(vec![q.prepare(&ev(&s), &[a])]))
        .unwrap();
    let r = q.read(a, 0, 10, 1 << 30, 10).unwrap();
    assert_eq!(payloads(&r), vec![s.clone()]);
    q.dead_letter(a, ids[0].seq, DeadLetterInfo::new("a", "test"))
        .unwrap();
    q.set_cursor(a, 1).unwrap();
    q.gc(&[a]).unwrap();
    assert_eq!(q.stats().events, 0);
    let dl = q.dead_letters(Some(a), 10).unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].info.reason, "test");
    assert_eq!(&dl[0].event.as_ref().unwrap().payload[..], s.as_bytes());
    // Replay puts it back for that sink, with its id, and removes the dead letter.
    assert_eq!(rt.block_on(q.replay(Some(a), None)).unwrap(), 1);
    assert_eq!(q.dead_letter_count(), 0);
    let r = q.read(a, 1, 10, 1 << 30, 10).unwrap();
    match &r.items[0] {
        ReadItem::Event(e) => {
            assert_eq!(e.id, ids[0].id);
            assert_eq!(&e.payload[..], s.as_bytes());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn cap_rejects_or_drops_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.max_events = Some(3);
    {
        let q = Queue::open(&c).unwrap();
        let recs = (0..3).map(|_| q.prepare(&ev("{}"), &[0])).collect();
        rt.block_on(q.append(recs)).unwrap();
        let e = rt
            .block_on(q.append(vec![q.prepare(&ev("{}"), &[0])]))
            .unwrap_err();
        assert!(matches!(e, QueueError::Full { .. }), "{e:?}");
        q.close().unwrap();
    }
    c.when_full = WhenFull::DropOldest;
    let q = Queue::open(&c).unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev(r#"{"new":1}"#), &[0])]))
        .unwrap();
    let s = q.stats();
    assert_eq!((s.events, s.evicted), (3, 1));
    let r = q.read(0, 0, 10, 1 << 20, 10).unwrap();
    assert_eq!(r.items.len(), 3);
    assert_eq!(payloads(&r)[2], r#"{"new":1}"#);
    // A write that could never fit (4 events, cap 3) is refused before anything is dropped,
    // and says that retrying cannot help.
    let recs = (0..4).map(|_| q.prepare(&ev("{}"), &[0])).collect();
    let e = rt.block_on(q.append(recs)).unwrap_err();
    assert!(matches!(e, QueueError::OverCap { .. }), "{e:?}");
    assert!(!e.to_string().contains("retry later"), "{e}");
    let s = q.stats();
    assert_eq!((s.events, s.evicted), (3, 1), "nothing more evicted");
}

#[test]
fn corrupt_records_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    // Two commits: two values.
    for _ in 0..2 {
        rt.block_on(q.append(vec![q.prepare(&ev("{}"), &[0])]))
            .unwrap();
    }
    q.shared
        .trees()
        .unwrap()
        .log
        .insert(1u64.to_be_bytes(), &b"\x01\x63garbage"[..])
        .unwrap();
    let r = q.read(0, 0, 10, 1 << 20, 10).unwrap();
    assert_eq!(
        payloads(&r),
        vec!["{}".to_string(), "corrupt 1".to_string()]
    );
}

#[test]
fn second_open_of_the_same_dir_is_refused_with_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let _q = Queue::open(&cfg(dir.path())).unwrap();
    let e = Queue::open(&cfg(dir.path())).err().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("in use") && msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
}

#[test]
fn every_ack_follows_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    for i in 0..5u64 {
        let before = q.stats().syncs;
        rt.block_on(q.append(vec![q.prepare(&ev("{}"), &[0])]))
            .unwrap();
        assert!(
            q.stats().syncs > before,
            "append {i} acknowledged without a new sync"
        );
    }
}

#[test]
fn compaction_gives_space_back_and_keeps_everything_live() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.compression = Compression::None;
    let q = Queue::open(&c).unwrap();
    let a = q.sink_id("a").unwrap();
    // ~20 MB written, then all but the last 10 events delivered.
    let big = format!("{{\"x\":\"{}\"}}", "y".repeat(2000));
    for _ in 0..100 {
        let recs = (0..100).map(|_| q.prepare(&ev(&big), &[a])).collect();
        rt.block_on(q.append(recs)).unwrap();
    }
    let seq = rt
        .block_on(q.append(vec![q.prepare(&ev("{}"), &[a])]))
        .unwrap()[0]
        .seq;
    q.dead_letter(a, seq - 5, DeadLetterInfo::new("a", "kept"))
        .unwrap();
    q.set_remote_id(a, 3, 77).unwrap();
    q.set_cursor(a, seq - 9).unwrap();
    q.gc(&[a]).unwrap();
    let before = q.disk_bytes();
    assert!(before > 15 << 20, "{before}");
    rt.block_on(q.compact_now()).unwrap();
    let after = q.disk_bytes();
    assert!(after < before / 4, "before {before}, after {after}");
    // Everything live is still there, and appends go on with growing sequence numbers.
    // (Records below the cursor may stay while their pack holds later ones.)
    let r = q.read(a, seq - 9, 100, 1 << 30, 100_000).unwrap();
    assert_eq!(r.items.len(), 10);
    assert_eq!(q.cursor(a).unwrap(), seq - 9);
    assert_eq!(q.remote_id(a, 3).unwrap(), Some(77));
    assert_eq!(q.dead_letters(Some(a), 10).unwrap()[0].info.reason, "kept");
    let next = rt
        .block_on(q.append(vec![q.prepare(&ev("{}"), &[a])]))
        .unwrap()[0]
        .seq;
    assert_eq!(next, seq + 1);
    q.close().unwrap();
    drop(q);
    let q = Queue::open(&c).unwrap();
    let r = q.read(a, seq - 9, 100, 1 << 30, 100_000).unwrap();
    assert_eq!(r.items.len(), 11);
}

#[test]
fn interrupted_compaction_is_settled_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let c = cfg(dir.path());
    {
        let q = Queue::open(&c).unwrap();
        rt.block_on(q.append(vec![q.prepare(&ev("{\"keep\":1}"), &[0])]))
            .unwrap();
        q.close().unwrap();
    }
    // A crash mid-copy leaves an incomplete queue.compact: it is discarded.
    std::fs::create_dir_all(dir.path().join("queue.compact")).unwrap();
    std::fs::write(dir.path().join("queue.compact/db"), b"partial").unwrap();
    {
        let q = Queue::open(&c).unwrap();
        assert!(!dir.path().join("queue.compact").exists());
        assert_eq!(q.read(0, 0, 10, 1 << 20, 10).unwrap().items.len(), 1);
        q.close().unwrap();
    }
    // A crash between the two renames: queue.old holds the store, no queue: it comes back.
    std::fs::rename(dir.path().join("queue"), dir.path().join("queue.old")).unwrap();
    let q = Queue::open(&c).unwrap();
    assert_eq!(q.read(0, 0, 10, 1 << 20, 10).unwrap().items.len(), 1);
}

#[test]
fn fsck_finds_and_repairs_corruption_without_losing_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    let recs = (0..3).map(|i| q.prepare(&ev(&format!("{{\"n\":{i}}}")), &[a]));
    rt.block_on(q.append(recs.collect())).unwrap();
    assert!(q.fsck(false).unwrap().is_clean());
    {
        let t = q.shared.trees().unwrap();
        // Record 1 of the pack 0..=2: valid header naming sink a, garbage payload flag.
        set_in_pack(&t, 2, 1, |rec| rec[2] |= 1); // claims zstd
        t.chunks.insert(chunk_key(99, 0), &b"orphan"[..]).unwrap();
    }
    let r = q.fsck(false).unwrap();
    assert_eq!(r.corrupt_records, vec![1]);
    assert_eq!(r.orphan_chunks, 1);
    assert!(!r.is_clean());
    let r = q.fsck(true).unwrap();
    assert!(r.repaired);
    let r = q.fsck(false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    // The pack keeps its numbering: record 1 is now routed nowhere.
    assert_eq!(r.records, 3);
    assert_eq!(
        payloads(&q.read(a, 0, 10, 1 << 20, 10).unwrap()),
        vec![r#"{"n":0}"#.to_string(), r#"{"n":2}"#.to_string()]
    );
    let dl = q.dead_letters(Some(a), 10).unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].seq, 1);
    assert!(dl[0].event.is_err(), "kept as unreadable, not lost");
}

/// Rewrites record `seq` inside the pack under `key` (uncompressed, so the damage shows).
fn set_in_pack(t: &Trees, key: u64, seq: u64, f: impl FnOnce(&mut Vec<u8>)) {
    let v = t.log.get(key.to_be_bytes()).unwrap().unwrap();
    let (first, body, spans) = open_value(key, &v).unwrap();
    let mut recs: Vec<Vec<u8>> = spans.into_iter().map(|s| body[s].to_vec()).collect();
    f(&mut recs[(seq - first) as usize]);
    let v = record::pack(recs.iter().map(Vec::as_slice), Compression::None);
    t.log.insert(key.to_be_bytes(), v).unwrap();
}

#[test]
fn small_records_are_packed_and_read_from_any_point() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    let b = q.sink_id("b").unwrap();
    // 40 events of ~1.5 KB in one commit, alternately routed; one large event in the middle
    // is stored alone (and chunked), splitting the packs around it.
    let text = "lorem ipsum dolor sit amet ".repeat(55);
    let big = format!("{{\"big\":\"{}\"}}", "z".repeat(60_000));
    let mut want = Vec::new();
    let recs = (0..40)
        .map(|i| {
            let p = if i == 17 {
                big.clone()
            } else {
                format!("{{\"i\":{i},\"t\":\"{text}\"}}")
            };
            want.push(p.clone());
            q.prepare(&ev(&p), &[if i % 2 == 0 { a } else { b }])
        })
        .collect();
    rt.block_on(q.append(recs)).unwrap();
    let values = q.shared.trees().unwrap().log.len();
    assert!((3..=12).contains(&values), "40 records in {values} values");
    assert_eq!(q.stats().events, 40);
    // Every starting point, every batch size: each sink sees exactly its records, in order.
    for (sink, parity) in [(a, 0), (b, 1)] {
        for from in 0..41u64 {
            for max in [1, 3, 50] {
                let (mut got, mut at) = (Vec::new(), from);
                loop {
                    let r = q.read(sink, at, max, 1 << 30, max).unwrap();
                    got.extend(r.items.iter().map(|i| match i {
                        ReadItem::Event(e) => e.seq,
                        other => panic!("{other:?}"),
                    }));
                    assert!(r.next > at || r.next == 40);
                    if r.next >= 40 {
                        break;
                    }
                    at = r.next;
                }
                let expect: Vec<u64> = (from..40).filter(|s| s % 2 == parity).collect();
                assert_eq!(got, expect, "sink {sink} from {from} by {max}");
            }
        }
    }
    for (seq, p) in want.iter().enumerate() {
        match q.get(seq as u64).unwrap() {
            Some(ReadItem::Event(e)) => assert_eq!(&e.payload[..], p.as_bytes()),
            other => panic!("{seq}: {other:?}"),
        }
    }
    // A packed record dead-letters on its own.
    q.dead_letter(a, 4, DeadLetterInfo::new("a", "test"))
        .unwrap();
    let dl = q.dead_letter_get(a, 4).unwrap().unwrap();
    assert_eq!(&dl.event.unwrap().payload[..], want[4].as_bytes());
    // Collecting below a cursor inside a pack keeps that pack whole; counts stay exact.
    q.set_cursor(a, 25).unwrap();
    q.set_cursor(b, 25).unwrap();
    let removed = q.gc(&[a, b]).unwrap();
    assert!(removed > 0 && removed <= 25, "{removed}");
    assert_eq!(q.stats().events, 40 - removed);
    let r = q.read(b, 25, 100, 1 << 30, 100).unwrap();
    assert_eq!(r.items.len(), 8);
    q.close().unwrap();
    drop(q);
    let q = Queue::open(&cfg(dir.path())).unwrap();
    assert_eq!(q.stats().events, 40 - removed, "recount at open agrees");
}

#[test]
fn a_pack_that_does_not_open_is_one_corrupt_item_kept_by_fsck() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    let recs = (0..3).map(|_| q.prepare(&ev("{}"), &[a])).collect();
    rt.block_on(q.append(recs)).unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev("{\"after\":1}"), &[a])]))
        .unwrap();
    {
        let t = q.shared.trees().unwrap();
        let mut v = t.log.get(2u64.to_be_bytes()).unwrap().unwrap().to_vec();
        v.truncate(v.len() - 3);
        t.log.insert(2u64.to_be_bytes(), v).unwrap();
    }
    let r = q.read(a, 0, 10, 1 << 20, 10).unwrap();
    assert_eq!(
        payloads(&r),
        vec!["corrupt 2".to_string(), r#"{"after":1}"#.into()]
    );
    assert_eq!(r.next, 4);
    let r = q.fsck(true).unwrap();
    assert_eq!(r.corrupt_records, vec![2]);
    assert!(q.fsck(false).unwrap().is_clean());
    let dl = q.dead_letters(Some(UNKNOWN_SINK), 10).unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].seq, 2);
}

#[test]
fn drop_oldest_drops_records_not_whole_packs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.max_events = Some(5);
    c.when_full = WhenFull::DropOldest;
    let q = Queue::open(&c).unwrap();
    let recs = (0..5)
        .map(|i| q.prepare(&ev(&format!("{{\"n\":{i}}}")), &[0]))
        .collect();
    rt.block_on(q.append(recs)).unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev(r#"{"n":5}"#), &[0])]))
        .unwrap();
    let s = q.stats();
    assert_eq!((s.events, s.evicted), (5, 1));
    let r = q.read(0, 0, 10, 1 << 20, 10).unwrap();
    assert_eq!(
        payloads(&r),
        (1..6).map(|i| format!("{{\"n\":{i}}}")).collect::<Vec<_>>()
    );
}

/// Readers see only what is below the head (fully written): a scan never moves past a record
/// of a group commit still being applied.
#[test]
fn reads_stop_at_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev("{}"), &[0])]))
        .unwrap();
    // A record beyond the head, as if a group commit were half applied.
    let enc = q.prepare(&ev("{\"later\":1}"), &[0]);
    q.shared
        .trees()
        .unwrap()
        .log
        .insert(5u64.to_be_bytes(), enc.enc.value)
        .unwrap();
    let r = q.read(0, 0, 10, 1 << 20, 10).unwrap();
    assert_eq!(payloads(&r), vec!["{}".to_string()]);
    assert_eq!(r.next, 1, "the cursor may not pass the head");
    assert!(q.read(0, 1, 10, 1 << 20, 10).unwrap().items.is_empty());
}

#[test]
fn a_clean_stop_leaves_the_counts_and_the_next_open_takes_them_out() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let recs = (0..3).map(|_| q.prepare(&ev("{}"), &[0])).collect();
        rt.block_on(q.append(recs)).unwrap();
        q.close().unwrap();
        let t = q.shared.trees().unwrap();
        assert!(t.meta.get(COUNTS_AT_CLOSE).unwrap().is_some());
    }
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let s = q.stats();
    assert_eq!(s.events, 3);
    // Gone once taken: after a crash from here on the log is counted again.
    let t = q.shared.trees().unwrap();
    assert!(t.meta.get(COUNTS_AT_CLOSE).unwrap().is_none());
    assert_eq!(count_log(&t).unwrap(), (s.events, s.bytes));
}

/// A store written before packs (one record per key, each payload compressed alone) reads,
/// counts and collects as before, and new packs follow it.
#[test]
fn a_store_from_before_packs_reads_on() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let old_payload =
        |i: usize| format!("{{\"old\":{i},\"t\":\"{}\"}}", "words and more ".repeat(20));
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let a = q.sink_id("a").unwrap();
        let t = q.shared.trees().unwrap();
        for i in 0..3u64 {
            // As the old writer stored it: zstd payload, its own key.
            let mut v = record::encode(
                &RecordRef {
                    kind: crate::event::EventKind::Native,
                    received_ms: 1,
                    id: uuid::Uuid::from_u128(i as u128),
                    routes: &[a],
                    creds: &ClientCredentials::default(),
                    payload: old_payload(i as usize).as_bytes(),
                },
                Compression::None,
            )
            .value;
            let body = v.split_off(28 + 2);
            let z = zstd::bulk::compress(&body, 1).unwrap();
            v[2] |= 1; // flags: zstd
            v.extend_from_slice(&z);
            t.log.insert(i.to_be_bytes(), v).unwrap();
        }
        t.meta.insert("next_seq", &3u64.to_be_bytes()).unwrap();
        let (events, bytes) = count_log(&t).unwrap();
        assert_eq!(events, 3);
        q.shared.events.store(events, Ordering::Relaxed);
        q.shared.bytes.store(bytes, Ordering::Relaxed);
        drop(t);
        q.close().unwrap();
    }
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    assert_eq!(q.stats().events, 3);
    let recs = (0..3).map(|i| q.prepare(&ev(&format!("{{\"new\":{i}}}")), &[a]));
    let ids = rt.block_on(q.append(recs.collect())).unwrap();
    assert_eq!(ids[0].seq, 3);
    let r = q.read(a, 0, 100, 1 << 20, 100).unwrap();
    let mut want: Vec<String> = (0..3).map(old_payload).collect();
    want.extend((0..3).map(|i| format!("{{\"new\":{i}}}")));
    assert_eq!(payloads(&r), want);
    q.set_cursor(a, 2).unwrap();
    assert_eq!(q.gc(&[a]).unwrap(), 2);
    assert_eq!(q.stats().events, 4);
    let r = q.read(a, 2, 100, 1 << 20, 100).unwrap();
    assert_eq!(payloads(&r), want[2..].to_vec());
}

/// Moving a cursor wakes the collector (which removes what is delivered soon after, instead of
/// on its half-second tick): `cursor_moved` resolves after `set_cursor`, and not before.
#[test]
fn moving_a_cursor_wakes_the_collector() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    rt.block_on(async {
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(50), q.cursor_moved()).await;
        assert!(quiet.is_err(), "woken with no cursor moved");
        q.set_cursor(a, 1).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), q.cursor_moved())
            .await
            .expect("set_cursor did not wake the collector");
    });
}

#[test]
fn compaction_waits_for_a_draining_backlog_to_settle() {
    const MIB: u64 = 1 << 20;
    // (live, live at the previous check, files on disk, compact_above) → compact?
    let cases = [
        // Settled and small, with the files much larger: compact.
        ((10, 10, 500, 64), true),
        ((0, 0, 500, 64), true),
        ((6, 10, 500, 64), true),
        // Still draining: less than half of what it held at the previous check.
        ((40, 600, 2000, 64), false),
        ((20, 50, 500, 64), false),
        // ... unless what is left is small: a drained backlog is compacted at the first check.
        ((0, 1000, 1100, 64), true),
        ((4, 10, 500, 64), true),
        // Too much to copy, whatever the files take.
        ((65, 65, 5000, 64), false),
        // Files not large enough: under `compact_above`, or under four times the live bytes.
        ((1, 1, 60, 64), false),
        ((30, 30, 100, 64), false),
    ];
    for ((live, before, disk, above), want) in cases {
        let got = compaction_due(live * MIB, before * MIB, || disk * MIB, above * MIB);
        assert_eq!(
            got, want,
            "live {live} MiB, before {before}, disk {disk}, above {above}"
        );
    }
}

/// A store closed in this process whose last sled handle goes a moment later (as sled's
/// deferred drops do) is reopened once the handle is gone, not refused for the lock.
#[test]
fn reopening_waits_for_a_lingering_sled_handle() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let t = store::Trees::open(dir.path(), &c).unwrap();
    t.meta.insert("k", "v").unwrap();
    let lingering = t.db.clone();
    drop(t);
    // The handle lingers for 100 ms after the store was closed: the reopen below meets the
    // lock (without the wait it failed at once).
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(lingering);
    });
    let t = store::Trees::open(dir.path(), &c).expect("reopen after the handle went");
    assert_eq!(t.meta.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    holder.join().unwrap();
}

/// sled writes a snapshot as `snap.<lsn>.generating`, then renames it. A full disk (or a kill)
/// part-way leaves the partial file; it must not stop the store from opening (before the
/// vendored sled's fix 5, every later open failed with "Read corrupted data").
#[test]
fn a_snapshot_left_half_written_does_not_stop_the_store_from_opening() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let s = q.sink_id("s").unwrap();
        let recs = vec![q.prepare(&ev(r#"{"n":1}"#), &[s])];
        rt.block_on(q.append(recs)).unwrap();
        q.close().unwrap();
    }
    // What ENOSPC left in the queue that could not be opened again: an empty file, and one
    // cut short, both named after the complete snapshot.
    let store = dir.path().join("queue");
    std::fs::write(store.join("snap.FFFFFFFFFFFFFFF0.generating"), b"").unwrap();
    std::fs::write(store.join("snap.FFFFFFFFFFFFFFFF.generating"), [7u8; 40]).unwrap();
    let q = Queue::open(&cfg(dir.path())).expect("the store opens");
    let s = q.sink_id("s").unwrap();
    assert_eq!(
        payloads(&q.read(s, 0, 10, 1 << 20, 100).unwrap()),
        vec![r#"{"n":1}"#]
    );
}

/// A store that lost acknowledged events to damage (sled reads a damaged file as a shorter
/// log, silently) opens short of its mark: that is reported, by `behind_mark` and `fsck`, and
/// numbering goes on above the mark, so no new event reuses a number.
#[test]
fn a_store_that_lost_acknowledged_events_is_reported_and_numbers_go_on_above_its_mark() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let s = q.sink_id("s").unwrap();
        let recs = (0..50)
            .map(|i| q.prepare(&ev(&format!("{{\"n\":{i}}}")), &[s]))
            .collect();
        rt.block_on(q.append(recs)).unwrap();
        assert_eq!(q.behind_mark(), None);
        q.close().unwrap();
    }
    // The damage: everything sled held is gone (what a byte flipped early in its file does).
    {
        let t = store::Trees::open(dir.path(), &cfg(dir.path())).unwrap();
        for tree in [&t.log, &t.meta, &t.cursors] {
            tree.clear().unwrap();
        }
        t.sync().unwrap();
    }
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        assert_eq!(q.behind_mark(), Some(BehindMark { found: 0, mark: 50 }));
        let report = q.fsck(false).unwrap();
        assert_eq!(report.behind_mark, Some(BehindMark { found: 0, mark: 50 }));
        assert!(!report.is_clean());
        let s = q.sink_id("s").unwrap();
        let ids = rt
            .block_on(q.append(vec![q.prepare(&ev(r#"{"n":"after"}"#), &[s])]))
            .unwrap();
        assert_eq!(ids[0].seq, 50, "numbering goes on above the mark");
        q.close().unwrap();
    }
    // Found once: the numbering that goes on is the store's own now. Still on record, so
    // the daemon goes on reporting it after a restart (and after a compaction).
    let q = Queue::open(&cfg(dir.path())).unwrap();
    assert_eq!(q.behind_mark(), None);
    let report = q.fsck(false).unwrap();
    assert!(report.is_clean());
    let loss = report.loss.expect("the loss is on record");
    assert_eq!(
        (loss.total, loss.last),
        (50, BehindMark { found: 0, mark: 50 })
    );
    rt.block_on(q.compact_now()).unwrap();
    assert_eq!(q.lost_events(), 50);
    q.close().unwrap();
    drop(q);
    let q = Queue::open(&cfg(dir.path())).unwrap();
    assert_eq!(
        q.lost_events(),
        50,
        "kept through a compaction and a restart"
    );
}

/// The open that finds a loss records it and moves the numbering past it in one synced step:
/// a store copied right after that open (what a crash then leaves) neither counts the loss
/// twice nor forgets it, and a second loss adds to the first.
#[test]
fn a_loss_is_counted_once_and_losses_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let append = |q: &Queue, n: usize| {
        let s = q.sink_id("s").unwrap();
        let recs = (0..n)
            .map(|i| q.prepare(&ev(&format!("{{\"n\":{i}}}")), &[s]))
            .collect();
        rt.block_on(q.append(recs)).unwrap();
    };
    let damage = |dir: &Path| {
        let t = store::Trees::open(dir, &cfg(dir)).unwrap();
        // Only the log and the counters: the loss record in `meta` is what must survive.
        t.log.clear().unwrap();
        t.cursors.clear().unwrap();
        t.meta.remove("next_seq").unwrap();
        t.sync().unwrap();
    };
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        append(&q, 10);
        q.close().unwrap();
    }
    damage(dir.path());
    let crashed = tempfile::tempdir().unwrap();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        assert_eq!(q.behind_mark(), Some(BehindMark { found: 0, mark: 10 }));
        assert_eq!(q.lost_events(), 10);
        // What a crash right after this open leaves: no close, no commit since.
        copy_dir(dir.path(), crashed.path());
    }
    let dir = crashed;
    let q = Queue::open(&cfg(dir.path())).unwrap();
    assert_eq!(q.behind_mark(), None, "the loss was found once");
    assert_eq!(q.lost_events(), 10);
    append(&q, 5);
    q.close().unwrap();
    drop(q);
    damage(dir.path());
    let q = Queue::open(&cfg(dir.path())).unwrap();
    assert_eq!(q.behind_mark(), Some(BehindMark { found: 0, mark: 15 }));
    let loss = q.loss().unwrap();
    assert_eq!(
        (loss.total, loss.last),
        (25, BehindMark { found: 0, mark: 15 })
    );
}

/// A copy of a data directory as it is now: what a crash at this instant leaves on disk.
/// sled's flusher may replace a snapshot file while the directory is read; a file gone between
/// the listing and its copy starts the copy over, as one listing must describe one instant.
fn copy_dir(from: &Path, to: &Path) {
    for _ in 0..100 {
        let _ = std::fs::remove_dir_all(to);
        match try_copy_dir(from, to) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("copying {}: {e}", from.display()),
        }
    }
    panic!("{} kept changing while it was copied", from.display());
}

fn try_copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            try_copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// The mark never runs ahead of what was synced: the files as a crash leaves them (copied
/// while the queue is open) open with no alarm, and a mark beside a store removed by hand is
/// ignored.
#[test]
fn a_crash_or_a_removed_store_raises_no_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let s = q.sink_id("s").unwrap();
        for i in 0..20 {
            rt.block_on(q.append(vec![q.prepare(&ev(&format!("{{\"n\":{i}}}")), &[s])]))
                .unwrap();
        }
        assert!(
            mark::read(dir.path()).is_some(),
            "the first commit wrote a mark"
        );
        copy_dir(dir.path(), crashed.path());
        q.close().unwrap();
    }
    assert_eq!(mark::read(dir.path()), Some(20));
    let q = Queue::open(&cfg(crashed.path())).unwrap();
    assert_eq!(q.behind_mark(), None);
    q.close().unwrap();
    std::fs::remove_dir_all(dir.path().join("queue")).unwrap();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    assert_eq!(q.behind_mark(), None);
}

/// A burst's tail reaches the mark once the writer has been idle for `MARK_EVERY`, not only at
/// the next event or the close: otherwise events acknowledged just after a mark could stay
/// out of it for hours, and a damage meanwhile would lose them unreported.
#[test]
fn the_mark_catches_up_with_an_idle_queue() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let s = q.sink_id("s").unwrap();
    for i in 0..5 {
        rt.block_on(q.append(vec![q.prepare(&ev(&format!("{{\"n\":{i}}}")), &[s])]))
            .unwrap();
    }
    // The first commit wrote the mark; the next four came within `MARK_EVERY` of it (unless
    // this machine is very slow, in which case the mark is already there).
    let deadline = std::time::Instant::now() + mark::MARK_EVERY * 10;
    while mark::read(dir.path()) != Some(5) {
        assert!(
            std::time::Instant::now() < deadline,
            "the mark stayed at {:?} with 5 events synced and the queue idle",
            mark::read(dir.path())
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    q.close().unwrap();
}

/// The dead letters stay under `dead_letter_max_bytes`: over it, the oldest (lowest seq, any
/// sink) are dropped for the newest; one letter larger than the cap stays alone. The count and
/// bytes kept as letters come and go match a full recount, after a clean close and after a
/// crash (counted again), and the same event given up on twice counts once.
#[test]
fn dead_letters_are_capped_oldest_first_and_counted_without_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.dead_letter_max_bytes = 20_000;
    let q = Queue::open(&c).unwrap();
    let (a, b) = (q.sink_id("a").unwrap(), q.sink_id("b").unwrap());
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(1_000));
    let recs = (0..60).map(|_| q.prepare(&ev(&body), &[a, b])).collect();
    let ids = rt.block_on(q.append(recs)).unwrap();
    let recount = |q: &Queue| dlq::count_dead_letters(&q.shared.trees().unwrap()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let sink = if i % 2 == 0 { a } else { b };
        q.dead_letter(sink, id.seq, DeadLetterInfo::new("s", "refused"))
            .unwrap();
        assert!(q.dead_letter_bytes() <= 20_000, "{}", q.dead_letter_bytes());
        assert_eq!((q.dead_letter_count(), q.dead_letter_bytes()), recount(&q));
    }
    // The same event given up on again replaces its letter.
    let last = ids.last().unwrap().seq;
    q.dead_letter(b, last, DeadLetterInfo::new("s", "refused again"))
        .unwrap();
    assert_eq!((q.dead_letter_count(), q.dead_letter_bytes()), recount(&q));
    let kept: Vec<u64> = {
        let mut v: Vec<u64> = q
            .dead_letters(None, usize::MAX)
            .unwrap()
            .iter()
            .map(|d| d.seq)
            .collect();
        v.sort();
        v
    };
    let n = kept.len();
    assert!((10..60).contains(&n), "{n} kept");
    let newest: Vec<u64> = ids[60 - n..].iter().map(|i| i.seq).collect();
    assert_eq!(kept, newest, "the newest are kept, whichever sink");
    assert_eq!(q.dead_letters_dropped(), 60 - n as u64);

    // A letter over the cap by itself (chunked) stays, alone.
    let big = incompressible_json(100_000, 7);
    let big_id = rt
        .block_on(q.append(vec![q.prepare(&ev(&big), &[a])]))
        .unwrap()[0]
        .seq;
    q.dead_letter(a, big_id, DeadLetterInfo::new("a", "too big"))
        .unwrap();
    assert_eq!(q.dead_letter_count(), 1);
    assert!(q.dead_letter_bytes() > 20_000);
    assert_eq!((q.dead_letter_count(), q.dead_letter_bytes()), recount(&q));
    let counts = (q.dead_letter_count(), q.dead_letter_bytes());

    // A clean close leaves the counts for the next open.
    q.close().unwrap();
    drop(q);
    let q = Queue::open(&c).unwrap();
    assert_eq!((q.dead_letter_count(), q.dead_letter_bytes()), counts);
    // After a crash they are counted again: the ones the close left are gone with the open
    // that read them (else the copy below would open with `counts`, not what it holds).
    let more = rt
        .block_on(q.append((0..3).map(|_| q.prepare(&ev(&body), &[b])).collect()))
        .unwrap();
    for id in &more {
        q.dead_letter(b, id.seq, DeadLetterInfo::new("b", "refused"))
            .unwrap();
    }
    // One more commit syncs them.
    rt.block_on(q.append(vec![q.prepare(&ev("{}"), &[a])]))
        .unwrap();
    let live = (q.dead_letter_count(), q.dead_letter_bytes());
    assert_ne!(live, counts);
    assert_eq!(live, recount(&q));
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crashed.path());
    assert_eq!(
        live.0, 3,
        "the big letter, now the oldest, made room for them"
    );
    assert!(q.dead_letter_remove(b, more[0].seq).unwrap());
    assert!(!q.dead_letter_remove(b, more[0].seq).unwrap());
    assert_eq!(q.dead_letter_count(), 2);
    assert_eq!((q.dead_letter_count(), q.dead_letter_bytes()), recount(&q));
    let mut c2 = cfg(crashed.path());
    c2.dead_letter_max_bytes = 20_000;
    let q2 = Queue::open(&c2).unwrap();
    assert_eq!((q2.dead_letter_count(), q2.dead_letter_bytes()), live);
}

/// The ids follow-ups refer to (remote ids of delivered PromptLayer logs, group marks) are
/// kept `FOLLOW_UP_IDS_KEEP_MS`, not for the life of the store: a pass removes those stored
/// before its cutoff, each sink's run from its start to its first younger entry. A store from
/// before they carried a time gets the time of its first open since, so none goes at once.
#[test]
fn follow_up_ids_older_than_their_keep_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let (a, b) = (q.sink_id("a").unwrap(), q.sink_id("b").unwrap());
    for seq in 0..5 {
        q.set_remote_id(a, seq, 100 + seq).unwrap();
        q.set_remote_id(b, seq, 200 + seq).unwrap();
    }
    q.mark_group(2).unwrap();
    let cut = now_ms() + 1;
    // Stored after the cutoff: kept.
    while now_ms() < cut + 1 {
        std::thread::yield_now();
    }
    q.set_remote_id(a, 10, 110).unwrap();
    q.mark_group(11).unwrap();
    assert_eq!(q.prune_follow_up_ids(0).unwrap(), 0, "nothing before 0");
    assert_eq!(q.prune_follow_up_ids(cut).unwrap(), 11);
    for seq in 0..5 {
        assert_eq!(q.remote_id(a, seq).unwrap(), None);
        assert_eq!(q.remote_id(b, seq).unwrap(), None);
    }
    assert!(!q.is_group(2).unwrap());
    assert_eq!(q.remote_id(a, 10).unwrap(), Some(110));
    assert!(q.is_group(11).unwrap());
    assert_eq!(q.prune_follow_up_ids(cut).unwrap(), 0);
    q.close().unwrap();
    drop(q);

    // A store from before: values without a time (what this code wrote until now).
    {
        let t = store::Trees::open(dir.path(), &cfg(dir.path())).unwrap();
        t.remote
            .insert(pair_key(a, 20), &120u64.to_be_bytes())
            .unwrap();
        t.meta.insert(group_key(21), &[]).unwrap();
        t.meta.remove(FOLLOW_UP_IDS_TIMED).unwrap();
        t.sync().unwrap();
    }
    let before_open = now_ms();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    assert_eq!(q.remote_id(a, 20).unwrap(), Some(120));
    assert!(q.is_group(21).unwrap());
    // Only the two stored before this open go; the two timed at it stay.
    assert_eq!(q.prune_follow_up_ids(before_open).unwrap(), 2);
    assert_eq!(q.remote_id(a, 10).unwrap(), None);
    assert_eq!(q.remote_id(a, 20).unwrap(), Some(120), "timed at open");
    assert!(q.is_group(21).unwrap(), "timed at open");
    assert_eq!(q.prune_follow_up_ids(now_ms() + 1).unwrap(), 2);
    assert_eq!(q.remote_id(a, 20).unwrap(), None);
    assert!(!q.is_group(21).unwrap());
}

/// The writer's step is timed for the watchdog: idle between steps (a commit leaves it so),
/// stalled once one step has lasted longer than the limit.
#[test]
fn a_writer_stuck_on_one_step_is_reported_stalled() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev("{}"), &[0])]))
        .unwrap();
    // The ack comes before the writer clears its step: wait for that, with a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while q.shared.writer_busy_since.load(Ordering::Relaxed) != 0 {
        assert!(std::time::Instant::now() < deadline, "the writer went idle");
        std::thread::yield_now();
    }
    assert_eq!(q.writer_stalled(std::time::Duration::ZERO), None, "idle");
    // A step under way for 40 s (what a sync that never returns looks like).
    q.shared
        .writer_busy_since
        .store(now_ms() - 40_000, Ordering::Relaxed);
    let limit = std::time::Duration::from_secs(30);
    assert!(q.writer_stalled(limit).is_some_and(|b| b >= limit));
    assert_eq!(q.writer_stalled(std::time::Duration::from_secs(60)), None);
}

/// The collector and `drop_oldest` eviction (the writer) both take the oldest records: when
/// eviction trims a pack the collector has just read, the collector must not count the pack's
/// records (and bytes) as its own as well. Counted twice, the figures the caps are checked
/// against drift below what is stored (and can wrap round, which made `drop_oldest` evict the
/// whole queue).
#[test]
fn the_collector_and_eviction_never_count_a_record_twice() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.max_events = Some(8);
    c.when_full = WhenFull::DropOldest;
    let q = Queue::open(&c).unwrap();
    let s = q.sink_id("s").unwrap();
    // One pack of eight, all delivered.
    let recs = (0..8)
        .map(|i| q.prepare(&ev(&format!("{{\"n\":{i}}}")), &[s]))
        .collect();
    rt.block_on(q.append(recs)).unwrap();
    q.set_cursor(s, 8).unwrap();
    // While the collector holds the pack it read, a ninth event goes over the cap: eviction
    // trims the pack's oldest record.
    let (q2, rec) = (q.clone(), q.prepare(&ev(r#"{"n":8}"#), &[s]));
    *q.shared.before_remove.lock().unwrap() = Some(Box::new(move || {
        std::thread::spawn(move || rt_block_on_append(&q2, rec))
            .join()
            .unwrap();
    }));
    q.gc(&[s]).unwrap();
    let t = q.shared.trees().unwrap();
    let on_disk = count_log(&t).unwrap();
    drop(t);
    let st = q.stats();
    assert_eq!((st.events, st.bytes), on_disk, "counts against the log");
    assert_eq!(on_disk.0, 1, "the ninth event is all that is left");
    assert_eq!(st.evicted, 1);
}

fn rt_block_on_append(q: &Queue, rec: Prepared) {
    rt().block_on(q.append(vec![rec])).unwrap();
}

/// A group cut short by a crash (or a full disk) can leave a large event's chunks on disk
/// without its log record or the `next_seq` that numbered it, so the number is given again
/// after the restart. The chunks left over must not be read as part of the acknowledged
/// event that now has the number: with more of them than it has, it read as corrupt and went
/// to the dead letters instead of being delivered.
#[test]
fn chunks_a_crash_left_above_the_numbering_are_not_read_into_a_new_event() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let s = q.sink_id("s").unwrap();
        rt.block_on(q.append(vec![q.prepare(&ev(r#"{"n":0}"#), &[s])]))
            .unwrap();
        // What the torn group left: ten chunks of seq 1, nothing else.
        let t = q.shared.trees().unwrap();
        for i in 0..10u32 {
            t.chunks
                .insert(&chunk_key(1, i)[..], &[b'x'; CHUNK][..])
                .unwrap();
        }
        t.sync().unwrap();
        // The files as a crash leaves them.
        copy_dir(dir.path(), crashed.path());
    }
    let q = Queue::open(&cfg(crashed.path())).unwrap();
    let s = q.sink_id("s").unwrap();
    let big = incompressible_json(40_000, 7);
    let ids = rt
        .block_on(q.append(vec![q.prepare(&ev(&big), &[s])]))
        .unwrap();
    assert_eq!(
        ids[0].seq, 1,
        "the number the torn group had is given again"
    );
    let r = q.read(s, 1, 10, 1 << 30, 10).unwrap();
    match &r.items[..] {
        [ReadItem::Event(e)] => assert!(e.payload == big.as_bytes(), "payload differs"),
        other => panic!(
            "{:?}",
            other
                .iter()
                .map(|i| match i {
                    ReadItem::Event(e) => format!("event {} ({} bytes)", e.seq, e.payload.len()),
                    ReadItem::Corrupt { seq, error, .. } => format!("corrupt {seq}: {error}"),
                })
                .collect::<Vec<_>>()
        ),
    }
    let report = q.fsck(false).unwrap();
    assert_eq!(report.orphan_chunks, 0, "{report:?}");
}

/// A dead letter is removed before its chunks (so no letter points at missing chunks); a
/// crash between the two leaves chunks of no letter. After the restart they must neither
/// count as dead-letter bytes (which the cap is checked against: a few orphaned large events
/// made every later letter look over it) nor stay on disk.
#[test]
fn chunks_of_a_dead_letter_a_crash_half_removed_are_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let s = q.sink_id("s").unwrap();
        let big = incompressible_json(100_000, 3);
        let ids = rt
            .block_on(q.append(vec![q.prepare(&ev(&big), &[s])]))
            .unwrap();
        q.dead_letter(s, ids[0].seq, DeadLetterInfo::new("s", "test"))
            .unwrap();
        assert!(q.dead_letter_bytes() > 50_000, "{}", q.dead_letter_bytes());
        // `remove_letter`'s first step, then the crash.
        let t = q.shared.trees().unwrap();
        t.dlq.remove(dlq_key_for_test(s, ids[0].seq)).unwrap();
        t.sync().unwrap();
        copy_dir(dir.path(), crashed.path());
    }
    let q = Queue::open(&cfg(crashed.path())).unwrap();
    assert_eq!(
        (q.dead_letter_count(), q.dead_letter_bytes()),
        (0, 0),
        "counted after the crash"
    );
    let t = q.shared.trees().unwrap();
    assert_eq!(t.dlq_chunks.len(), 0, "orphaned chunks left on disk");
}

/// The collector removes a large record, then its chunks: a crash between the two left the
/// chunks on disk for good (compaction copied them along). An open after a crash removes
/// chunks whose record is gone, and keeps those of records still there.
#[test]
fn chunks_a_crash_left_without_their_record_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let rt = rt();
    let (gone, kept) = {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let s = q.sink_id("s").unwrap();
        let recs = (0..2)
            .map(|i| q.prepare(&ev(&incompressible_json(100_000, 7 + i)), &[s]))
            .collect();
        let ids = rt.block_on(q.append(recs)).unwrap();
        let t = q.shared.trees().unwrap();
        // The collector's first step for the first record, then the crash.
        t.log.remove(ids[0].seq.to_be_bytes()).unwrap();
        t.sync().unwrap();
        copy_dir(dir.path(), crashed.path());
        (ids[0].seq, ids[1].seq)
    };
    let q = Queue::open(&cfg(crashed.path())).unwrap();
    let t = q.shared.trees().unwrap();
    let seqs_with_chunks: std::collections::BTreeSet<u64> = t
        .chunks
        .iter()
        .keys()
        .map(|k| key_u64(&k.unwrap()[..8]))
        .collect();
    assert!(
        !seqs_with_chunks.contains(&gone),
        "orphaned chunks left on disk"
    );
    assert!(
        seqs_with_chunks.contains(&kept),
        "a live record's chunks removed"
    );
    drop(t);
    let batch = q.read(0, 0, 10, 10 << 20, 100).unwrap();
    assert_eq!(batch.items.len(), 1);
    assert!(matches!(&batch.items[0], ReadItem::Event(e) if e.seq == kept));
}

/// A reload that lowers `dead_letter_max_bytes` applies it at once: the oldest letters go
/// until the rest fit (before, nothing changed until the next dead letter).
#[test]
fn a_lowered_dead_letter_cap_applies_at_the_reload() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let c = cfg(dir.path());
    let q = Queue::open(&c).unwrap();
    let s = q.sink_id("s").unwrap();
    let recs = (0..3)
        .map(|i| q.prepare(&ev(&incompressible_json(20_000, 11 + i)), &[s]))
        .collect();
    let ids = rt.block_on(q.append(recs)).unwrap();
    for a in &ids {
        q.dead_letter(s, a.seq, DeadLetterInfo::new("s", "test"))
            .unwrap();
    }
    let each = q.dead_letter_bytes() / 3;
    assert!(each > 10_000, "{each}");
    let mut lower = c.clone();
    lower.dead_letter_max_bytes = each * 3 / 2;
    q.set_caps(&lower);
    assert_eq!(q.dead_letter_count(), 1);
    assert!(q.dead_letter_bytes() <= lower.dead_letter_max_bytes);
    assert_eq!(q.dead_letters_dropped(), 2);
    let left = q.dead_letters(None, 10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, ids[2].seq, "the newest is kept");
}

fn dlq_key_for_test(sink: u16, seq: u64) -> [u8; 10] {
    pair_key(sink, seq)
}

/// `fsck --repair` removes what does not decode from the log; the event and byte counts must
/// follow, or the close after it leaves them in the store as they were before, and the
/// daemon takes them from there (a drained queue reported events it did not hold, and the
/// caps were checked against them) until a crash made it count again.
#[test]
fn fsck_repair_leaves_counts_that_match_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let q = Queue::open(&cfg(dir.path())).unwrap();
        let a = q.sink_id("a").unwrap();
        let recs = (0..3).map(|_| q.prepare(&ev("{}"), &[a])).collect();
        rt.block_on(q.append(recs)).unwrap();
        rt.block_on(q.append(vec![q.prepare(&ev("{\"after\":1}"), &[a])]))
            .unwrap();
        q.close().unwrap();
    }
    {
        // The damage, on disk, found by fsck (as `llmlogd fsck --repair` runs it).
        let q = Queue::open(&cfg(dir.path())).unwrap();
        {
            let t = q.shared.trees().unwrap();
            let mut v = t.log.get(2u64.to_be_bytes()).unwrap().unwrap().to_vec();
            v.truncate(v.len() - 3);
            t.log.insert(2u64.to_be_bytes(), v).unwrap();
        }
        let r = q.fsck(true).unwrap();
        assert_eq!(r.corrupt_records, vec![2]);
        q.close().unwrap();
    }
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let t = q.shared.trees().unwrap();
    let on_disk = count_log(&t).unwrap();
    drop(t);
    assert_eq!(on_disk.0, 1);
    let s = q.stats();
    assert_eq!((s.events, s.bytes), on_disk);
}

/// sled writes on to its open files after they are removed, so a data directory deleted under
/// the running daemon (by hand, by a cleaner of `/tmp` or of the state dir) took every later
/// event and acknowledged it, though none of it could survive a restart. Those appends are
/// refused now, naming why, while what the store holds is still delivered.
#[test]
fn a_store_removed_while_running_acknowledges_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let s = q.sink_id("s").unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev(r#"{"n":0}"#), &[s])]))
        .unwrap();
    std::fs::remove_dir_all(dir.path().join("queue")).unwrap();
    // The writer looks for the files at most every `PRESENT_CHECK_MS`: appends in that
    // window may still be taken, then every one is refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 1;
    let e = loop {
        let r = rt.block_on(q.append(vec![q.prepare(&ev(&format!("{{\"n\":{n}}}")), &[s])]));
        match r {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(std::time::Instant::now() < deadline, "{n} appends taken");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(
        matches!(&e, QueueError::DataDir { problem, .. } if problem.contains("removed")),
        "{e:?}"
    );
    assert!(q.refusing().is_some_and(|r| r.contains("removed")));
    // Not reopened as an empty store: what it held is still read for delivery.
    let r = q.read(s, 0, 10, 1 << 20, 10).unwrap();
    assert_eq!(payloads(&r)[0], r#"{"n":0}"#);
    // And it stays refused (no new store appears under the old one's numbering).
    let e = rt
        .block_on(q.append(vec![q.prepare(&ev(r#"{"n":2}"#), &[s])]))
        .unwrap_err();
    assert!(matches!(e, QueueError::DataDir { .. }), "{e:?}");
    assert!(!dir.path().join("queue").exists());
}

/// While the store cannot be opened again after a storage error, appends are refused with
/// the reason: only a full disk is reported as one (507). A filesystem turned read-only or a
/// broken file was answered "no space left on the device" too.
#[test]
fn a_store_that_cannot_be_reopened_says_why_instead_of_disk_full() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let s = q.sink_id("s").unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev("{}"), &[s])]))
        .unwrap();
    q.take_store_for_test();
    // Something other than space stops it from opening: its log file is now a directory.
    let db = dir.path().join("queue").join("db");
    std::fs::remove_file(&db).unwrap();
    std::fs::create_dir(&db).unwrap();
    q.reopen_store_for_test();
    assert!(q.refusing().is_some());
    let e = rt
        .block_on(q.append(vec![q.prepare(&ev("{}"), &[s])]))
        .unwrap_err();
    assert!(
        matches!(&e, QueueError::Storage(m) if m.contains("opened again")),
        "{e:?}"
    );
}

/// A store that could not be opened again after a storage error comes back by itself once it
/// can, with no append to make the writer try: delivery reads from it, and a backlog whose
/// clients were refused (a full disk) and went quiet waited for the next append to drain.
#[test]
fn an_unavailable_store_comes_back_without_an_append() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let s = q.sink_id("s").unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev(r#"{"n":1}"#), &[s])]))
        .unwrap();
    q.take_store_for_test();
    // It cannot be opened for now: its log file is out of the way.
    let db = dir.path().join("queue").join("db");
    let aside = dir.path().join("db.aside");
    std::fs::rename(&db, &aside).unwrap();
    std::fs::create_dir(&db).unwrap();
    q.reopen_store_for_test();
    assert!(q.read(s, 0, 10, 1 << 20, 10).is_err());
    // The writer tried at that append; nothing else is sent to it from here on.
    rt.block_on(q.append(vec![q.prepare(&ev(r#"{"n":2}"#), &[s])]))
        .unwrap_err();
    std::fs::remove_dir(&db).unwrap();
    std::fs::rename(&aside, &db).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let r = loop {
        if let Ok(r) = q.read(s, 0, 10, 1 << 20, 10) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the store did not come back within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert_eq!(payloads(&r), vec![r#"{"n":1}"#.to_string()]);
    assert!(q.refusing().is_none(), "{:?}", q.refusing());
}

/// The event and byte counts only ever go down by what was removed, but if they ever fall
/// behind the log (a recount that failed after a storage error set them to 0), a removal
/// must stop them at 0: wrapped round to ~2^64, the next `drop_oldest` append found the
/// queue "over its cap" by that much and evicted every record it held.
#[test]
fn counts_behind_the_log_stop_at_zero_and_evict_nothing_extra() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut c = cfg(dir.path());
    c.max_events = Some(100);
    c.when_full = WhenFull::DropOldest;
    let q = Queue::open(&c).unwrap();
    let (a, b) = (q.sink_id("a").unwrap(), q.sink_id("b").unwrap());
    append_one_by_one(&q, &rt, 10, &[a, b]);
    // The counts fell behind what the log holds.
    q.shared.events.store(2, Ordering::Relaxed);
    q.shared.bytes.store(10, Ordering::Relaxed);
    q.set_cursor(a, 5).unwrap();
    q.set_cursor(b, 5).unwrap();
    assert_eq!(q.gc(&[a, b]).unwrap(), 5);
    let s = q.stats();
    assert_eq!((s.events, s.bytes), (0, 0), "stopped at 0");
    rt.block_on(q.append(vec![q.prepare(&ev(r#"{"new":1}"#), &[a, b])]))
        .unwrap();
    let s = q.stats();
    assert_eq!(s.evicted, 0, "nothing evicted under a cap of 100");
    let r = q.read(a, 5, 100, 1 << 20, 100).unwrap();
    assert_eq!(r.items.len(), 6, "{:?}", payloads(&r));
}

/// A data directory made by hand (`mkdir`: 0755) is made private at open: the queue holds the
/// API keys apps send. Before, only a directory llmlogd created itself was 0700.
#[test]
fn an_existing_data_dir_open_to_others_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // Open to others (mkdir's 0755), or to the group only (`install -d -m 0750`).
    for open in [0o755, 0o750, 0o770, 0o705] {
        let data = dir.path().join(format!("made-by-hand-{open:o}"));
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(open)).unwrap();
        let q = Queue::open(&cfg(&data)).unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{open:o} became {mode:o}");
        drop(q);
    }
    // A new one is made private too, and a private one is left as it is.
    let fresh = dir.path().join("a/b");
    drop(Queue::open(&cfg(&fresh)).unwrap());
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o7777,
        0o700
    );
}

/// A data directory that is a file is named as such, not "File exists (os error 17)".
#[test]
fn a_data_dir_that_is_a_file_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let e = Queue::open(&cfg(&file)).err().expect("refused").to_string();
    assert!(e.contains("is not a directory"), "{e}");
}
