//! What waits to be sent, in order: records coalesced per tuple (a
//! connection that changes state three times while queued costs one
//! record on the wire, not three, and a queue holds at most about one
//! record per flow), and the markers that frame a bulk resync. Each slot
//! remembers when its oldest unsent change happened, for the lag.

use std::collections::VecDeque;
use std::time::Instant;

use foldhash::HashMap;
use tandem_conntrack::Tuple;

use super::wire::Record;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    Record(Record),
    BulkBegin { complete: bool },
    BulkEnd { records: u32 },
}

#[derive(Debug)]
struct Slot {
    item: Item,
    /// When the oldest change this slot carries happened.
    since: Instant,
    /// Queued by a bulk (not counted against the queue limit).
    bulk: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: VecDeque<Slot>,
    /// Absolute position (see `base`) of the newest queued record of a
    /// tuple that a later record of the tuple may fold into.
    latest: HashMap<Tuple, u64>,
    /// Absolute position of `queue[0]`.
    base: u64,
    /// Encoded size of the queued records.
    bytes: usize,
    /// Queued records (markers excluded).
    records: usize,
    /// Queued markers.
    markers: usize,
    /// Queued records that came from local events (not from a bulk).
    live: usize,
}

/// Records taken for one datagram.
pub(crate) struct Batch {
    pub records: Vec<Record>,
    /// When the oldest change among them happened.
    pub oldest: Instant,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queued records (markers excluded).
    pub fn records(&self) -> usize {
        self.records
    }

    /// Queued records from local events (a bulk's do not count).
    pub fn live_records(&self) -> usize {
        self.live
    }

    /// Queued bulk markers.
    pub fn markers(&self) -> usize {
        self.markers
    }

    /// When the oldest queued change happened (the front slot: a change
    /// folded into a queued record keeps that record's place and time).
    pub fn oldest(&self) -> Option<Instant> {
        self.queue.front().map(|s| s.since)
    }

    /// Whether the front of the queue is a marker.
    pub fn marker_first(&self) -> bool {
        matches!(self.queue.front(), Some(Slot { item, .. }) if !matches!(item, Item::Record(_)))
    }

    /// Encoded size of the records before the first marker, or at least
    /// `enough` of it (the question asked is "is there a full datagram").
    pub fn leading_bytes(&self, enough: usize) -> usize {
        let mut n = 0;
        for s in &self.queue {
            match &s.item {
                Item::Record(r) => n += r.encoded_len(),
                _ => break,
            }
            if n >= enough {
                break;
            }
        }
        n
    }

    /// Whether a record of this tuple would fold into a queued one.
    pub fn would_coalesce(&self, key: &Tuple) -> bool {
        self.latest.contains_key(key)
    }

    /// Queues a record, folding it into the tuple's newest queued record
    /// when the result tells the peer the same final state. Returns whether
    /// it was coalesced.
    ///
    /// Nothing is folded into a queued Destroy: "destroyed, then created
    /// again" must reach the peer as two steps, because a re-created entry
    /// may carry a different NAT mapping, which the kernel cannot change on
    /// an existing entry.
    pub fn push(&mut self, record: Record, now: Instant) -> bool {
        self.push_as(record, now, false)
    }

    /// Queues a record of a bulk (see [`Outbox::push`]).
    pub fn push_bulk(&mut self, record: Record, now: Instant) -> bool {
        self.push_as(record, now, true)
    }

    fn push_as(&mut self, record: Record, now: Instant, bulk: bool) -> bool {
        let key = *record.key();
        if let Some(&pos) = self.latest.get(&key) {
            let Some(slot) = usize::try_from(pos - self.base)
                .ok()
                .and_then(|i| self.queue.get_mut(i))
            else {
                // Unreachable by construction (`pop` forgets popped positions).
                self.latest.remove(&key);
                return self.push_as(record, now, bulk);
            };
            let Item::Record(queued) = &mut slot.item else {
                self.latest.remove(&key);
                return self.push_as(record, now, bulk);
            };
            let merged = match (&*queued, record) {
                (Record::Destroy(_), record) => Err(record),
                // New then Update is still a creation, with the newest state.
                (Record::New(_), Record::Update(e)) => Ok(Record::New(e)),
                (_, record) => Ok(record),
            };
            match merged {
                Ok(merged) => {
                    self.bytes = self.bytes - queued.encoded_len() + merged.encoded_len();
                    *queued = merged;
                    return true;
                }
                Err(record) => {
                    self.append(Item::Record(record), now, bulk);
                    return false;
                }
            }
        }
        self.append(Item::Record(record), now, bulk);
        false
    }

    /// Queues a bulk marker. Records queued before a BulkBegin stay before
    /// it: nothing later folds into them, so every record of the bulk (and
    /// every change after it) is sent inside or after the bulk.
    pub fn push_marker(&mut self, item: Item, now: Instant) {
        if matches!(item, Item::BulkBegin { .. }) {
            self.latest.clear();
        }
        self.append(item, now, true);
    }

    fn append(&mut self, item: Item, since: Instant, bulk: bool) {
        if let Item::Record(r) = &item {
            self.bytes += r.encoded_len();
            self.records += 1;
            if !bulk {
                self.live += 1;
            }
            self.latest
                .insert(*r.key(), self.base + self.queue.len() as u64);
        } else {
            self.markers += 1;
        }
        self.queue.push_back(Slot { item, since, bulk });
    }

    fn pop(&mut self) -> Option<Slot> {
        let slot = self.queue.pop_front()?;
        if let Item::Record(r) = &slot.item {
            if self.latest.get(r.key()) == Some(&self.base) {
                self.latest.remove(r.key());
            }
            self.bytes -= r.encoded_len();
            self.records -= 1;
            if !slot.bulk {
                self.live -= 1;
            }
        } else {
            self.markers -= 1;
        }
        self.base += 1;
        Some(slot)
    }

    /// The marker at the front, if there is one.
    pub fn take_marker(&mut self) -> Option<(Item, Instant)> {
        if !self.marker_first() {
            return None;
        }
        self.pop().map(|s| (s.item, s.since))
    }

    /// Takes records from the front, up to the first marker, while they
    /// fit in `budget` bytes (at least one, so a budget smaller than a
    /// record cannot stall the queue).
    pub fn take(&mut self, budget: usize) -> Option<Batch> {
        let mut records = Vec::new();
        let mut oldest: Option<Instant> = None;
        let mut used = 0;
        while let Some(Slot {
            item: Item::Record(front),
            ..
        }) = self.queue.front()
        {
            let len = front.encoded_len();
            if !records.is_empty() && used + len > budget {
                break;
            }
            let Some(Slot {
                item: Item::Record(record),
                since,
                ..
            }) = self.pop()
            else {
                break;
            };
            used += len;
            oldest = Some(oldest.map_or(since, |o| o.min(since)));
            records.push(record);
        }
        oldest.map(|oldest| Batch { records, oldest })
    }

    /// Drops everything queued; returns how many records that was.
    pub fn clear(&mut self) -> usize {
        let n = self.records;
        self.base += self.queue.len() as u64;
        self.queue.clear();
        self.latest.clear();
        self.bytes = 0;
        self.records = 0;
        self.markers = 0;
        self.live = 0;
        n
    }
}
