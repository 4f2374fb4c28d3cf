//! Host-port bookkeeping: every host port poolkeeper hands out is unique across all pools and
//! deployments, and a port found taken by something else is skipped, never reused blindly.

use std::collections::{BTreeMap, BTreeSet};

use poolkeeper_kinds::PortRange;

#[derive(Debug, Default, Clone)]
pub struct PortBook {
    /// Port -> owner (instance id) for every port held by a managed instance.
    held: BTreeMap<u16, String>,
    /// Ports that a foreign process holds (learned when the runtime failed to bind them).
    foreign: BTreeSet<u16>,
}

impl PortBook {
    pub fn is_free(&self, port: u16) -> bool {
        !self.held.contains_key(&port) && !self.foreign.contains(&port)
    }

    pub fn owner(&self, port: u16) -> Option<&str> {
        self.held.get(&port).map(String::as_str)
    }

    /// Records that `owner` holds `port`. Returns the previous owner when it was someone else,
    /// which the caller must treat as a conflict (never silently overwritten).
    pub fn hold(&mut self, port: u16, owner: &str) -> Result<(), String> {
        match self.held.get(&port) {
            Some(prev) if prev != owner => Err(prev.clone()),
            _ => {
                self.held.insert(port, owner.to_owned());
                self.foreign.remove(&port);
                Ok(())
            }
        }
    }

    /// Releases every port `owner` holds among `ports`.
    pub fn release(&mut self, ports: impl IntoIterator<Item = u16>, owner: &str) {
        for p in ports {
            if self.held.get(&p).is_some_and(|o| o == owner) {
                self.held.remove(&p);
            }
        }
    }

    pub fn mark_foreign(&mut self, port: u16) {
        if !self.held.contains_key(&port) {
            self.foreign.insert(port);
        }
    }

    /// Forget every foreign mark, so that a periodic retry can find ports that were freed.
    pub fn clear_all_foreign(&mut self) {
        self.foreign.clear();
    }

    pub fn foreign_in(&self, range: PortRange) -> Vec<u16> {
        self.foreign
            .range(range.start..=range.end)
            .copied()
            .collect()
    }

    /// Picks `n` free ports from `range`, lowest first, and holds them for `owner`.
    /// Returns `None` (holding nothing) when the range has fewer than `n` free ports.
    pub fn allocate(&mut self, range: PortRange, n: usize, owner: &str) -> Option<Vec<u16>> {
        let picked: Vec<u16> = (range.start..=range.end)
            .filter(|p| self.is_free(*p))
            .take(n)
            .collect();
        if picked.len() < n {
            return None;
        }
        for p in &picked {
            self.held.insert(*p, owner.to_owned());
        }
        Some(picked)
    }

    pub fn held_count(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    #[test]
    fn allocation_takes_the_lowest_free_ports_and_holds_them() {
        let mut b = PortBook::default();
        assert_eq!(b.allocate(r(8000, 8009), 2, "a"), Some(vec![8000, 8001]));
        assert_eq!(b.allocate(r(8000, 8009), 1, "b"), Some(vec![8002]));
        assert_eq!(b.owner(8001), Some("a"));
    }

    #[test]
    fn foreign_ports_are_skipped() {
        let mut b = PortBook::default();
        b.mark_foreign(8000);
        assert_eq!(b.allocate(r(8000, 8009), 1, "a"), Some(vec![8001]));
        assert_eq!(b.foreign_in(r(8000, 8009)), vec![8000]);
    }

    #[test]
    fn foreign_marks_are_forgotten_at_resync_so_freed_ports_are_used_again() {
        let mut b = PortBook::default();
        b.mark_foreign(8000);
        b.clear_all_foreign();
        assert_eq!(b.allocate(r(8000, 8009), 1, "a"), Some(vec![8000]));
    }

    #[test]
    fn an_exhausted_range_allocates_nothing() {
        let mut b = PortBook::default();
        assert!(b.allocate(r(8000, 8001), 2, "a").is_some());
        assert_eq!(b.allocate(r(8000, 8001), 1, "b"), None);
        assert_eq!(b.held_count(), 2);
    }

    #[test]
    fn a_port_is_never_held_by_two_owners() {
        let mut b = PortBook::default();
        assert!(b.hold(8000, "a").is_ok());
        assert!(b.hold(8000, "a").is_ok());
        assert_eq!(b.hold(8000, "b"), Err("a".to_owned()));
        b.release([8000], "b");
        assert_eq!(b.owner(8000), Some("a"));
        b.release([8000], "a");
        assert!(b.is_free(8000));
    }
}
