//! raft-rs as this server configures it ([`super::raft_config`]), driven
//! directly over raft-rs's in-memory storage: what its settings make the
//! leader send.

use raft::eraftpb::{Entry, Message, MessageType};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};

use crate::config::{Config, Voter};

fn config(id: u64) -> Config {
    let mut c = Config::default();
    c.node.id = id;
    c.node.client_listen = ([127, 0, 0, 1], 1).into();
    c.node.peer_listen = ([127, 0, 0, 1], 2).into();
    c.voters = (1..=3)
        .map(|v| Voter {
            id: v,
            peer: format!("n{v}:1"),
            name: String::new(),
        })
        .collect();
    c.finish().unwrap();
    c
}

fn msg(t: MessageType, from: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(t);
    m.from = from;
    m.to = 1;
    m.term = term;
    m
}

/// Persists what the node has ready and returns every message it sends.
fn settle(raw: &mut RawNode<MemStorage>) -> Vec<Message> {
    let mut out = Vec::new();
    while raw.has_ready() {
        let mut ready = raw.ready();
        out.extend(ready.take_messages());
        let mut store = raw.mut_store().wl();
        store.append(ready.entries()).unwrap();
        if let Some(hs) = ready.hs() {
            store.set_hardstate(hs.clone());
        }
        drop(store);
        out.extend(ready.take_persisted_messages());
        let mut light = raw.advance(ready);
        out.extend(light.take_messages());
        raw.advance_apply();
    }
    out
}

/// Server 1 leading servers 2 and 3, all holding its first entry.
fn leader() -> RawNode<MemStorage> {
    let c = config(1);
    let store = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
    let logger = crate::logging::raft_logger(1);
    let mut raw = RawNode::new(&super::raft_config(&c, 0), store, &logger).unwrap();
    raw.campaign().unwrap();
    settle(&mut raw);
    let pre = msg(MessageType::MsgRequestPreVoteResponse, 2, raw.raft.term + 1);
    raw.step(pre).unwrap();
    settle(&mut raw);
    raw.step(msg(MessageType::MsgRequestVoteResponse, 2, raw.raft.term))
        .unwrap();
    settle(&mut raw);
    assert_eq!(raw.raft.state, StateRole::Leader);
    ack(&mut raw, 2);
    ack(&mut raw, 3);
    settle(&mut raw);
    raw
}

/// `from` acknowledges the leader's whole log.
fn ack(raw: &mut RawNode<MemStorage>, from: u64) {
    let mut m = msg(MessageType::MsgAppendResponse, from, raw.raft.term);
    m.index = raw.raft.raft_log.last_index();
    raw.step(m).unwrap();
}

fn propose(raw: &mut RawNode<MemStorage>) {
    let mut m = msg(MessageType::MsgPropose, 1, 0);
    m.set_entries(vec![Entry::default()].into());
    raw.step(m).unwrap();
}

/// Every append says where its entries go: the first right after the
/// entry it names. Before, with `batch_append`, a probe that fell back
/// after a commit notice was queued went out inside that notice, naming
/// the last index with the older entries after it (this test, before:
/// "an append naming entry 3 carries entries from 2"), and a follower
/// holding them acknowledged index 5.
#[test]
fn appends_name_the_entry_before_their_first() {
    let mut raw = leader();
    // Two entries that server 3 acknowledges and server 2 does not (they
    // are in flight to it).
    propose(&mut raw);
    propose(&mut raw);
    settle(&mut raw);
    ack(&mut raw, 3);
    settle(&mut raw);
    let last = raw.raft.raft_log.last_index();
    assert_eq!(raw.raft.raft_log.committed, last);
    // The whole log committed: the commit is told to every follower with
    // an empty append naming the last entry (`Driver::tell_commit`).
    raw.raft.bcast_append();
    // Then server 2's rejection of the next-to-last entry arrives (it
    // missed the one before): the leader probes it from there.
    let mut reject = msg(MessageType::MsgAppendResponse, 2, raw.raft.term);
    reject.index = last - 1;
    reject.reject = true;
    reject.reject_hint = last - 2;
    raw.step(reject).unwrap();
    let sent = settle(&mut raw);
    let appends: Vec<&Message> = sent
        .iter()
        .filter(|m| m.to == 2 && m.get_msg_type() == MessageType::MsgAppend)
        .collect();
    assert!(
        appends.iter().any(|m| !m.entries.is_empty()),
        "the leader probed server 2 with entries: {appends:?}"
    );
    for m in appends {
        if let Some(first) = m.entries.first() {
            assert_eq!(
                first.index,
                m.index + 1,
                "an append naming entry {} carries entries from {}",
                m.index,
                first.index
            );
        }
    }
}
