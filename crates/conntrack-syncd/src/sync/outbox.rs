//! Records waiting to be packed into a datagram, coalesced per tuple: a
//! connection that changes state three times within the flush delay costs
//! one record on the wire, not three.

use std::collections::{HashMap, VecDeque};

use tandem_conntrack::Tuple;

use super::wire::Record;

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: VecDeque<Record>,
    /// Absolute position (see `base`) of the newest queued record of a tuple.
    latest: HashMap<Tuple, u64>,
    /// Absolute position of `queue[0]`.
    base: u64,
    /// Encoded size of everything queued.
    bytes: usize,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Queues a record, folding it into the tuple's newest queued record
    /// when the result tells the peer the same final state. Returns whether
    /// it was coalesced.
    ///
    /// Nothing is folded into a queued Destroy: "destroyed, then created
    /// again" must reach the peer as two steps, because a re-created entry
    /// may carry a different NAT mapping, which the kernel cannot change on
    /// an existing entry.
    pub fn push(&mut self, record: Record) -> bool {
        let key = *record.key();
        if let Some(&pos) = self.latest.get(&key) {
            let Some(slot) = usize::try_from(pos - self.base)
                .ok()
                .and_then(|i| self.queue.get_mut(i))
            else {
                // Unreachable by construction (`take` forgets popped positions).
                self.latest.remove(&key);
                return self.push(record);
            };
            let merged = match (&*slot, record) {
                (Record::Destroy(_), record) => Err(record),
                // New then Update is still a creation, with the newest state.
                (Record::New(_), Record::Update(e)) => Ok(Record::New(e)),
                (_, record) => Ok(record),
            };
            match merged {
                Ok(merged) => {
                    self.bytes = self.bytes - slot.encoded_len() + merged.encoded_len();
                    *slot = merged;
                    return true;
                }
                Err(record) => return self.append(key, record),
            }
        }
        self.append(key, record)
    }

    fn append(&mut self, key: Tuple, record: Record) -> bool {
        self.bytes += record.encoded_len();
        self.latest.insert(key, self.base + self.queue.len() as u64);
        self.queue.push_back(record);
        false
    }

    /// Takes records from the front while they fit in `budget` bytes (at
    /// least one, so a budget smaller than a record cannot stall the queue).
    pub fn take(&mut self, budget: usize) -> Vec<Record> {
        let mut out = Vec::new();
        let mut used = 0;
        while let Some(front) = self.queue.front() {
            let len = front.encoded_len();
            if !out.is_empty() && used + len > budget {
                break;
            }
            let Some(record) = self.queue.pop_front() else {
                break;
            };
            if self.latest.get(record.key()) == Some(&self.base) {
                self.latest.remove(record.key());
            }
            self.base += 1;
            self.bytes -= len;
            used += len;
            out.push(record);
        }
        out
    }
}
