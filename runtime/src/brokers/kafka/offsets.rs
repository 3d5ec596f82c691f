//! Which offset of a partition may be committed: the first one not yet
//! settled. A commit promises that everything before it is done, so it never
//! passes a record still being handled, waiting for a retry, or not yet taken
//! by a worker.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Offsets received and not settled.
    pending: BTreeMap<i64, Pending>,
    /// One past the highest offset received.
    next: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// A worker holds it.
    taken: bool,
    /// The record's timestamp (Unix ms; 0 when it has none).
    timestamp_ms: u64,
}

impl OffsetTracker {
    /// A record was received from the broker.
    pub fn received(&mut self, offset: i64, timestamp_ms: u64) {
        self.pending.insert(
            offset,
            Pending {
                taken: false,
                timestamp_ms,
            },
        );
        let after = offset.saturating_add(1);
        self.next = Some(self.next.map_or(after, |n| n.max(after)));
    }

    /// A worker took it.
    pub fn taken(&mut self, offset: i64) {
        if let Some(p) = self.pending.get_mut(&offset) {
            p.taken = true;
        }
    }

    /// A worker gave it back (to be handed out again).
    pub fn untaken(&mut self, offset: i64) {
        if let Some(p) = self.pending.get_mut(&offset) {
            p.taken = false;
        }
    }

    /// Its outcome is durable.
    pub fn settled(&mut self, offset: i64) {
        self.pending.remove(&offset);
    }

    /// The offset to commit (the next record to read after a restart), if
    /// anything was received.
    pub fn committable(&self) -> Option<i64> {
        match self.pending.keys().next() {
            Some(first) => Some(*first),
            None => self.next,
        }
    }

    /// Records received and not settled.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Records a worker holds and has not settled.
    pub fn taken_unsettled(&self) -> usize {
        self.pending.values().filter(|p| p.taken).count()
    }

    /// The timestamp of the first unsettled record (what the next commit
    /// waits for), when it has one.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.pending.values().next().map(|p| p.timestamp_ms).filter(|t| *t > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_settled_prefix() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.committable(), None);
        for o in 10..15 {
            t.received(o, 0);
        }
        assert_eq!(t.committable(), Some(10));
        t.settled(11);
        t.settled(12);
        assert_eq!(t.committable(), Some(10), "10 is still in flight");
        t.settled(10);
        assert_eq!(t.committable(), Some(13));
        t.settled(14);
        assert_eq!(t.committable(), Some(13));
        t.settled(13);
        assert_eq!(t.committable(), Some(15), "all done: the next one");
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn counts_taken_records_separately() {
        let mut t = OffsetTracker::default();
        t.received(0, 1_000);
        t.received(1, 2_000);
        t.taken(0);
        assert_eq!((t.pending(), t.taken_unsettled()), (2, 1));
        assert_eq!(t.oldest_ms(), Some(1_000));
        t.settled(0);
        assert_eq!((t.pending(), t.taken_unsettled()), (1, 0));
        assert_eq!(t.oldest_ms(), Some(2_000), "the first unsettled one's");
        t.settled(1);
        assert_eq!(t.oldest_ms(), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, failure_persistence: None, ..Default::default() })]

        /// Whatever order records are received, taken and settled in, the
        /// commit never passes a record that is not settled, and never
        /// moves back.
        #[test]
        fn never_commits_past_an_unsettled_offset(
            gaps in proptest::collection::vec(1i64..4, 1..40),
            settle_order in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..60),
        ) {
            let mut t = OffsetTracker::default();
            let mut offset = 0i64;
            let mut unsettled = std::collections::BTreeSet::new();
            let mut last_commit = None;
            let mut settles = settle_order.into_iter();
            for gap in gaps {
                offset += gap;
                t.received(offset, 0);
                t.taken(offset);
                unsettled.insert(offset);
                if let Some(i) = settles.next() {
                    let pick = *i.get(&unsettled.iter().copied().collect::<Vec<_>>());
                    t.settled(pick);
                    unsettled.remove(&pick);
                }
                let commit = t.committable().expect("something was received");
                if let Some(first) = unsettled.first() {
                    proptest::prop_assert!(commit <= *first);
                } else {
                    proptest::prop_assert_eq!(commit, offset + 1);
                }
                proptest::prop_assert!(last_commit.is_none_or(|c| c <= commit));
                last_commit = Some(commit);
                proptest::prop_assert_eq!(t.pending(), unsettled.len());
            }
        }
    }
}
