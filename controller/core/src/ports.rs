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
    /// The ports held or foreign, as runs of consecutive ports (first -> last), so that an
    /// allocation skips a run at once instead of asking about each of its ports: a pool of
    /// thousands of instances on one range costs its next port a lookup, not a scan.
    taken: BTreeMap<u16, u16>,
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
                let was_foreign = self.foreign.remove(&port);
                if self.held.insert(port, owner.to_owned()).is_none() && !was_foreign {
                    self.take(port);
                }
                Ok(())
            }
        }
    }

    /// Releases every port `owner` holds among `ports`.
    pub fn release(&mut self, ports: impl IntoIterator<Item = u16>, owner: &str) {
        for p in ports {
            if self.held.get(&p).is_some_and(|o| o == owner) {
                self.held.remove(&p);
                self.free(p);
            }
        }
    }

    pub fn mark_foreign(&mut self, port: u16) {
        if !self.held.contains_key(&port) && self.foreign.insert(port) {
            self.take(port);
        }
    }

    /// Forget every foreign mark, so that a periodic retry can find ports that were freed.
    pub fn clear_all_foreign(&mut self) {
        for p in std::mem::take(&mut self.foreign) {
            self.free(p);
        }
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
        let picked = self.lowest_free(range, n);
        if picked.len() < n {
            return None;
        }
        for p in &picked {
            self.held.insert(*p, owner.to_owned());
            self.take(*p);
        }
        Some(picked)
    }

    /// Up to `n` free ports of `range`, lowest first: the gaps between the taken runs.
    fn lowest_free(&self, range: PortRange, n: usize) -> Vec<u16> {
        let mut picked = Vec::with_capacity(n);
        let (mut next, end) = (u32::from(range.start), u32::from(range.end));
        while picked.len() < n && next <= end {
            let p = next as u16;
            // In a taken run: go past its end.
            if let Some((_, &last)) = self.taken.range(..=p).next_back()
                && last >= p
            {
                next = u32::from(last) + 1;
                continue;
            }
            // Free up to the next run (or the range's end).
            let gap_end = self
                .taken
                .range(p..)
                .next()
                .map_or(end, |(&first, _)| (u32::from(first) - 1).min(end));
            let take = (gap_end - next + 1).min((n - picked.len()) as u32);
            picked.extend((next..next + take).map(|q| q as u16));
            next = gap_end + 1;
        }
        picked
    }

    /// `port` (free until now) is taken: it joins the runs beside it.
    fn take(&mut self, port: u16) {
        let mut first = port;
        let mut last = port;
        if let Some(p) = port.checked_sub(1)
            && let Some((&s, &e)) = self.taken.range(..=p).next_back()
            && e == p
        {
            first = s;
        }
        if let Some(p) = port.checked_add(1)
            && let Some(e) = self.taken.remove(&p)
        {
            last = e;
        }
        self.taken.insert(first, last);
    }

    /// `port` (taken until now) is free: its run is split around it.
    fn free(&mut self, port: u16) {
        let Some((&first, &last)) = self.taken.range(..=port).next_back() else {
            return;
        };
        if last < port {
            return;
        }
        self.taken.remove(&first);
        if first < port {
            self.taken.insert(first, port - 1);
        }
        if port < last {
            self.taken.insert(port + 1, last);
        }
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

    /// The runs of taken ports answer as asking each port would: against a model that scans
    /// the range port by port, over random holds, releases, foreign marks and allocations.
    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Allocate {
                start: u16,
                len: u16,
                n: usize,
                owner: u8,
            },
            Hold {
                port: u16,
                owner: u8,
            },
            Release {
                port: u16,
                owner: u8,
            },
            Foreign {
                port: u16,
            },
            ClearForeign,
        }

        fn op() -> impl Strategy<Value = Op> {
            // Ports near the top of the range too, where a run reaches 65535.
            let port = prop_oneof![0u16..40, 65500u16..=65535];
            prop_oneof![
                4 => (port.clone(), 0u16..40, 0usize..6, 0u8..4)
                    .prop_map(|(start, len, n, owner)| Op::Allocate { start, len, n, owner }),
                2 => (port.clone(), 0u8..4).prop_map(|(port, owner)| Op::Hold { port, owner }),
                3 => (port.clone(), 0u8..4).prop_map(|(port, owner)| Op::Release { port, owner }),
                1 => port.prop_map(|port| Op::Foreign { port }),
                1 => Just(Op::ClearForeign),
            ]
        }

        fn scan(b: &PortBook, range: PortRange, n: usize) -> Vec<u16> {
            (range.start..=range.end)
                .filter(|p| b.is_free(*p))
                .take(n)
                .collect()
        }

        proptest! {
            #[test]
            fn allocation_by_runs_is_allocation_by_scan(ops in proptest::collection::vec(op(), 0..80)) {
                let mut b = PortBook::default();
                for o in ops {
                    match o {
                        Op::Allocate { start, len, n, owner } => {
                            let range = r(start, start.saturating_add(len));
                            let want = scan(&b, range, n);
                            let got = b.allocate(range, n, &owner.to_string());
                            if want.len() < n {
                                prop_assert_eq!(got, None);
                            } else {
                                prop_assert_eq!(got, Some(want));
                            }
                        }
                        Op::Hold { port, owner } => {
                            let _ = b.hold(port, &owner.to_string());
                        }
                        Op::Release { port, owner } => b.release([port], &owner.to_string()),
                        Op::Foreign { port } => b.mark_foreign(port),
                        Op::ClearForeign => b.clear_all_foreign(),
                    }
                    // The runs are exactly the ports held or foreign, merged.
                    let mut taken: Vec<u16> = b.held.keys().chain(b.foreign.iter()).copied().collect();
                    taken.sort_unstable();
                    let from_runs: Vec<u16> = b
                        .taken
                        .iter()
                        .flat_map(|(&f, &l)| (u32::from(f)..=u32::from(l)).map(|p| p as u16))
                        .collect();
                    prop_assert_eq!(&from_runs, &taken);
                    let merged = b.taken.iter().zip(b.taken.iter().skip(1)).all(|((_, &l), (&f, _))| u32::from(l) + 1 < u32::from(f));
                    prop_assert!(merged, "adjacent runs are merged: {:?}", b.taken);
                }
            }
        }
    }

    #[test]
    fn a_pool_of_thousands_takes_its_next_port_from_the_end_of_the_run() {
        let mut b = PortBook::default();
        for i in 0..5000u16 {
            assert_eq!(
                b.allocate(r(20000, 30000), 1, &format!("i{i}")),
                Some(vec![20000 + i])
            );
        }
        assert_eq!(b.taken.len(), 1, "one run: {:?}", b.taken.first_key_value());
        b.release([20100], "i100");
        assert_eq!(
            b.allocate(r(20000, 30000), 2, "x"),
            Some(vec![20100, 25000])
        );
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
