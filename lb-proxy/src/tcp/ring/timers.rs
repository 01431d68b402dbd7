//! The ring engine's flow timers: one deadline per flow (its connect's, else
//! its idle timeout's, as `TcpFlow::poll_timeout` says), kept in a min-heap
//! the loop reads before each wait.
//!
//! A flow's deadline moves later on every byte it moves; re-filing it each
//! time would be a heap push per read. Instead a flow files a deadline only
//! when it is earlier than the one it has filed, and an entry that comes due
//! for a flow whose deadline has moved on (or that has ended: the slot's
//! generation changed) is dropped or filed again then. So a flow costs about
//! one push and one pop over its life, and no allocation once the heap has
//! grown to the worker's busiest moment.
//!
//! Such stale entries are dropped from the top before the loop reads the
//! next deadline ([`Deadlines::drop_stale`]): under a stream of short flows
//! every flow leaves its connect deadline behind, and a loop that took those
//! for real deadlines would wait with a timeout and submit before "firing"
//! them on nearly every turn (half an `io_uring_enter` per connection more).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// A filed deadline: when, and the slot and generation of the flow it is for.
type Entry = Reverse<(Duration, u32, u16)>;

#[derive(Default)]
pub struct Deadlines {
    heap: BinaryHeap<Entry>,
}

impl Deadlines {
    /// Files `at` for the flow in `slot` at generation `gen`.
    pub fn file(&mut self, at: Duration, slot: u32, gen: u16) {
        self.heap.push(Reverse((at, slot, gen)));
    }

    /// The earliest filed deadline.
    pub fn next(&self) -> Option<Duration> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next entry due at `now`: `(deadline, slot, generation)`.
    pub fn pop_due(&mut self, now: Duration) -> Option<(Duration, u32, u16)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// Drops entries from the top while `current(deadline, slot, generation)`
    /// says they no longer stand for a flow's deadline.
    pub fn drop_stale(&mut self, mut current: impl FnMut(Duration, u32, u16) -> bool) {
        while let Some(Reverse((at, slot, gen))) = self.heap.peek() {
            if current(*at, *slot, *gen) {
                return;
            }
            self.heap.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_due_in_deadline_order_and_not_before() {
        let mut d = Deadlines::default();
        let ms = Duration::from_millis;
        d.file(ms(30), 3, 0);
        d.file(ms(10), 1, 7);
        d.file(ms(20), 2, 0);
        assert_eq!(d.next(), Some(ms(10)));
        assert_eq!(d.pop_due(ms(9)), None);
        assert_eq!(d.pop_due(ms(20)), Some((ms(10), 1, 7)));
        assert_eq!(d.pop_due(ms(20)), Some((ms(20), 2, 0)));
        assert_eq!(d.pop_due(ms(20)), None);
        assert_eq!(d.next(), Some(ms(30)));
    }

    #[test]
    fn stale_entries_leave_the_top_until_a_current_one() {
        let mut d = Deadlines::default();
        let ms = Duration::from_millis;
        d.file(ms(10), 1, 0);
        d.file(ms(20), 2, 0);
        d.file(ms(30), 3, 0);
        d.file(ms(40), 4, 0);
        // Slots 1 and 3 have moved on: only 1 leaves, 3 is behind a current one.
        d.drop_stale(|_, slot, _| slot % 2 == 0);
        assert_eq!(d.next(), Some(ms(20)));
        assert_eq!(d.pop_due(ms(30)), Some((ms(20), 2, 0)));
        d.drop_stale(|_, slot, _| slot % 2 == 0);
        assert_eq!(d.next(), Some(ms(40)));
    }
}
