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

    /// The next entry due at `now`: `(slot, generation)`.
    pub fn pop_due(&mut self, now: Duration) -> Option<(u32, u16)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => {
                self.heap.pop().map(|Reverse((_, slot, gen))| (slot, gen))
            }
            _ => None,
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
        assert_eq!(d.pop_due(ms(20)), Some((1, 7)));
        assert_eq!(d.pop_due(ms(20)), Some((2, 0)));
        assert_eq!(d.pop_due(ms(20)), None);
        assert_eq!(d.next(), Some(ms(30)));
    }
}
