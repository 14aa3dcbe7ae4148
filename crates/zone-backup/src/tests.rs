use super::*;
use zone_proto::v1::BackupBatch;

fn kv(i: u32) -> KeyValue {
    KeyValue {
        key: format!("k{i:05}").into_bytes(),
        value: vec![b'v'; 100],
        create_revision: i.into(),
        mod_revision: i.into(),
        version: 1,
    }
}

/// What a server sends for `n` keys in batches of `per`.
fn stream(n: u32, per: usize) -> Vec<BackupChunk> {
    let header = BackupChunk {
        part: Some(Part::Header(BackupHeader {
            format: FORMAT,
            zone_id: "z".repeat(32),
            revision: 99,
            key_count: n.into(),
            server_id: 2,
            ..Default::default()
        })),
    };
    let mut sealer = Sealer::default();
    let mut out = vec![header];
    let kvs: Vec<KeyValue> = (0..n).map(kv).collect();
    for c in kvs.chunks(per) {
        out.push(BackupChunk {
            part: Some(Part::Batch(BackupBatch { kvs: c.to_vec() })),
        });
    }
    for c in &out {
        sealer.add(c);
    }
    out.push(sealer.trailer());
    out
}

fn written(chunks: &[BackupChunk]) -> Vec<u8> {
    let mut w = Writer::new(Vec::new()).unwrap();
    for c in chunks {
        w.push(c).unwrap();
    }
    w.finish().unwrap().0
}

#[test]
fn a_backup_written_reads_back_whole_with_its_summary() {
    let file = written(&stream(250, 100));
    let mut seen = Vec::new();
    let s = read(&file[..], |kvs| seen.extend(kvs.iter().cloned())).unwrap();
    assert_eq!(s.keys, 250);
    assert_eq!(s.header.revision, 99);
    assert_eq!(s.bytes, file.len() as u64);
    assert_eq!(s.sha256.len(), 64);
    assert_eq!(seen, (0..250).map(kv).collect::<Vec<_>>());
    // An empty store is a backup too.
    let empty = written(&stream(0, 100));
    assert_eq!(read(&empty[..], |_| {}).unwrap().keys, 0);
}

#[test]
fn every_truncation_is_refused_as_truncated() {
    let file = written(&stream(30, 7));
    for cut in MAGIC.len()..file.len() {
        match read(&file[..cut], |_| {}) {
            Err(BackupError::Truncated { .. }) => {}
            other => panic!("cut at {cut} of {}: {other:?}", file.len()),
        }
    }
    assert!(matches!(
        read(&file[..5], |_| {}),
        Err(BackupError::NotABackup)
    ));
}

#[test]
fn every_flipped_byte_is_refused() {
    let file = written(&stream(20, 6));
    for i in 0..file.len() {
        let mut bad = file.clone();
        bad[i] ^= 0x01;
        assert!(
            read(&bad[..], |_| {}).is_err(),
            "a flipped bit at byte {i} of {} went unnoticed",
            file.len()
        );
    }
}

#[test]
fn a_stream_out_of_order_or_with_a_wrong_trailer_is_not_written() {
    // The server's trailer must match what the writer hashed.
    let mut chunks = stream(10, 4);
    if let Some(Part::Trailer(t)) = &mut chunks.last_mut().unwrap().part {
        t.sha256[0] ^= 1;
    }
    let mut w = Writer::new(Vec::new()).unwrap();
    let last = chunks.len() - 1;
    for c in &chunks[..last] {
        w.push(c).unwrap();
    }
    assert!(matches!(
        w.push(&chunks[last]),
        Err(BackupError::Checksum { .. })
    ));
    // A batch before the header, keys going back, a stream cut short.
    let chunks = stream(10, 4);
    let mut w = Writer::new(Vec::new()).unwrap();
    assert!(w.push(&chunks[1]).is_err(), "a batch first");
    let mut w = Writer::new(Vec::new()).unwrap();
    w.push(&chunks[0]).unwrap();
    w.push(&chunks[2]).unwrap();
    let e = w.push(&chunks[1]).unwrap_err();
    assert!(e.to_string().contains("not after"), "{e}");
    let mut w = Writer::new(Vec::new()).unwrap();
    w.push(&chunks[0]).unwrap();
    assert!(matches!(w.finish(), Err(BackupError::Truncated { .. })));
    // Anything after the trailer.
    let mut file = written(&stream(3, 2));
    file.extend_from_slice(&frame(&chunks[1]));
    let e = read(&file[..], |_| {}).unwrap_err();
    assert!(e.to_string().contains("follows the trailer"), "{e}");
}

#[test]
fn another_format_is_named() {
    let mut chunks = stream(1, 1);
    if let Some(Part::Header(h)) = &mut chunks[0].part {
        h.format = 7;
    }
    let mut w = Writer::new(Vec::new()).unwrap();
    let e = w.push(&chunks[0]).unwrap_err();
    assert!(e.to_string().contains("format 7"), "{e}");
}
