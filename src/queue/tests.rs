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
    let recs = (0..10)
        .map(|i| q.prepare(&ev(&format!("{{\"i\":{i}}}")), &[a, b]))
        .collect();
    rt.block_on(q.append(recs)).unwrap();
    q.set_cursor(a, 10).unwrap();
    q.set_cursor(b, 4).unwrap();
    assert_eq!(q.gc(&[a, b]).unwrap(), 4);
    let r = q.read(b, 0, 100, 1 << 20, 100).unwrap();
    assert_eq!(r.items.len(), 6);
}

#[test]
fn large_payloads_round_trip_through_chunks_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    let a = q.sink_id("a").unwrap();
    // ~300 KB of poorly compressible JSON string.
    let mut s = String::from("{\"blob\":\"");
    let mut x: u64 = 1;
    for _ in 0..300_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push((b'a' + ((x >> 33) % 26) as u8) as char);
    }
    s.push_str("\"}");
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
}

#[test]
fn corrupt_records_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let q = Queue::open(&cfg(dir.path())).unwrap();
    rt.block_on(q.append(vec![q.prepare(&ev("{}"), &[0]), q.prepare(&ev("{}"), &[0])]))
        .unwrap();
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
    let r = q.read(a, 0, 100, 1 << 30, 100_000).unwrap();
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
    assert_eq!(q.read(a, 0, 100, 1 << 30, 100_000).unwrap().items.len(), 11);
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
    rt.block_on(q.append(vec![q.prepare(&ev("{}"), &[a]), q.prepare(&ev("{}"), &[a])]))
        .unwrap();
    assert!(q.fsck(false).unwrap().is_clean());
    {
        let t = q.shared.trees().unwrap();
        // Record 1: valid header naming sink a, garbage payload flag.
        let mut bad = t.log.get(1u64.to_be_bytes()).unwrap().unwrap().to_vec();
        bad[2] |= 1; // claims zstd
        t.log.insert(1u64.to_be_bytes(), bad).unwrap();
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
    assert_eq!(r.records, 1);
    let dl = q.dead_letters(Some(a), 10).unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].seq, 1);
    assert!(dl[0].event.is_err(), "kept as unreadable, not lost");
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
