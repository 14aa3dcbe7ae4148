//! Porcupine's lists of events, with dancing links.
//!
//! Acknowledged operations have a call node and a return node in the known
//! list, in time order (calls before returns at equal times: an operation
//! returning when another is called is concurrent with it). Unknown
//! operations have only a call node, in the unknown list (their return, at
//! +infinity, would never be reached). Linearizing an operation unlinks its
//! nodes; backtracking relinks them in the reverse order (an unlinked node
//! keeps its neighbours).

use crate::model::History;

/// The known list's head (a sentinel).
pub(crate) const KNOWN_HEAD: usize = 0;
/// The unknown list's head (a sentinel).
pub(crate) const UNKNOWN_HEAD: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    KnownHead,
    UnknownHead,
    Call,
    Return,
    UnknownCall,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    /// The operation (index into the prepared history); unused for heads.
    pub(crate) op: usize,
    /// Rank in the time order of all events; heads are at +infinity.
    pub(crate) pos: usize,
}

#[derive(Debug)]
pub(crate) struct Lists {
    nodes: Vec<Node>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per operation: its call node, and its return node if acknowledged.
    call_node: Vec<usize>,
    return_node: Vec<Option<usize>>,
}

impl Lists {
    pub(crate) fn new(history: &History) -> Lists {
        let mut events: Vec<(u64, bool, usize)> = Vec::new();
        for (i, p) in history.ops.iter().enumerate() {
            events.push((p.call, false, i));
            if i < history.known {
                events.push((p.ret.unwrap_or(u64::MAX), true, i));
            }
        }
        // `false < true`: calls before returns at equal times.
        events.sort_unstable();

        let head = |kind| Node {
            kind,
            op: usize::MAX,
            pos: usize::MAX,
        };
        let mut nodes = vec![head(Kind::KnownHead), head(Kind::UnknownHead)];
        let n = history.ops.len();
        let mut call_node = vec![0; n];
        let mut return_node = vec![None; n];
        for (pos, &(_, is_return, op)) in events.iter().enumerate() {
            let kind = match (is_return, op < history.known) {
                (true, _) => Kind::Return,
                (false, true) => Kind::Call,
                (false, false) => Kind::UnknownCall,
            };
            if is_return {
                return_node[op] = Some(nodes.len());
            } else {
                call_node[op] = nodes.len();
            }
            nodes.push(Node { kind, op, pos });
        }

        // Two circular lists through the heads, in time order.
        let mut next = vec![0; nodes.len()];
        let mut prev = vec![0; nodes.len()];
        for head in [KNOWN_HEAD, UNKNOWN_HEAD] {
            let mut last = head;
            for (i, node) in nodes.iter().enumerate().skip(2) {
                if (node.kind != Kind::UnknownCall) == (head == KNOWN_HEAD) {
                    next[last] = i;
                    prev[i] = last;
                    last = i;
                }
            }
            next[last] = head;
            prev[head] = last;
        }
        Lists {
            nodes,
            next,
            prev,
            call_node,
            return_node,
        }
    }

    pub(crate) fn node(&self, n: usize) -> Node {
        self.nodes[n]
    }

    pub(crate) fn next(&self, n: usize) -> usize {
        self.next[n]
    }

    /// Where operation `op` was called, in the time order of events.
    pub(crate) fn call_pos(&self, op: usize) -> usize {
        self.nodes[self.call_node[op]].pos
    }

    /// Takes `op`'s nodes out of the lists.
    pub(crate) fn lift(&mut self, op: usize) {
        self.unlink(self.call_node[op]);
        if let Some(ret) = self.return_node[op] {
            self.unlink(ret);
        }
    }

    /// Puts back the nodes of `op`, the last operation lifted.
    pub(crate) fn unlift(&mut self, op: usize) {
        if let Some(ret) = self.return_node[op] {
            self.relink(ret);
        }
        self.relink(self.call_node[op]);
    }

    fn unlink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = q;
        self.prev[q] = p;
    }

    fn relink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = n;
        self.prev[q] = n;
    }

    /// The call nodes of the acknowledged operations that could go next:
    /// those before the first return in the known list.
    pub(crate) fn known_window(&self) -> impl Iterator<Item = usize> + '_ {
        let mut n = self.next[KNOWN_HEAD];
        std::iter::from_fn(move || {
            let here = n;
            (self.nodes[here].kind == Kind::Call).then(|| {
                n = self.next[here];
                here
            })
        })
    }

    /// The first return node still in the known list.
    pub(crate) fn first_return(&self) -> Option<usize> {
        let mut n = self.next[KNOWN_HEAD];
        while n != KNOWN_HEAD {
            if self.nodes[n].kind == Kind::Return {
                return Some(n);
            }
            n = self.next[n];
        }
        None
    }

    /// The position of the first return still in the known list: only
    /// operations called before it can go next.
    pub(crate) fn window_end(&self) -> usize {
        self.first_return()
            .map_or(usize::MAX, |n| self.nodes[n].pos)
    }

    /// The unknown call nodes from the head up to `until` (excluded).
    pub(crate) fn unknown_before(&self, until: usize) -> impl Iterator<Item = usize> + '_ {
        let mut n = self.next[UNKNOWN_HEAD];
        std::iter::from_fn(move || {
            let here = n;
            (here != until && here != UNKNOWN_HEAD).then(|| {
                n = self.next[here];
                here
            })
        })
    }
}
