//! `AllocationTable`: which address each pod interface holds on this node.
//!
//! Keyed by (network name, container id, interface name) as the CNI spec asks of IPAM
//! plugins, so a retried CNI ADD gets the same answer and a GC of one network never touches
//! another's addresses; indexed by address so an address is never handed out twice. Pure
//! bookkeeping: the caller persists every change before it answers.
//!
//! Addresses are handed out round-robin from the last one given (as the reference
//! `host-local` plugin does): a just-freed address is the last to be reused, so stale
//! neighbour entries and conntrack state for it have time to age out.

use std::collections::{BTreeMap, BTreeSet};

use super::block::Block;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttachmentKey {
    /// The CNI network name; empty for allocations made before keys carried it (state
    /// written by an older agent, or a request from an older plugin).
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    /// Whether a request for `self` may use the allocation held under `held`: the same
    /// key, or the same attachment where one side predates network names (one network per
    /// agent was the only setup then, so the attachment is the same one).
    fn matches(&self, held: &AttachmentKey) -> bool {
        self.container_id == held.container_id
            && self.ifname == held.ifname
            && (self.network == held.network || self.network.is_empty() || held.network.is_empty())
    }

    /// Whether a garbage collection of `network` is about `self`.
    pub fn in_network(&self, network: &str) -> bool {
        network.is_empty() || self.network.is_empty() || self.network == network
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub key: AttachmentKey,
    pub addr: u32,
    pub pod: Option<(String, String)>,
    pub netns: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("no free address in this node's blocks")]
    NoSpace,
}

#[derive(Clone, Debug, Default)]
pub struct AllocationTable {
    by_key: BTreeMap<AttachmentKey, Allocation>,
    by_addr: BTreeMap<u32, AttachmentKey>,
    /// The address handed out last (kept in the store): the next search starts after it.
    last: Option<u32>,
}

impl AllocationTable {
    /// The allocation a request for `key` refers to: its own, or the same attachment's made
    /// before network names were recorded (see `AttachmentKey::matches`).
    pub fn get(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.by_key
            .get(key)
            .or_else(|| self.by_key.values().find(|a| key.matches(&a.key)))
    }

    /// The address handed out last, for the store.
    pub fn last_allocated(&self) -> Option<u32> {
        self.last
    }

    /// Restores the round-robin cursor read back from the store.
    pub fn restore_last(&mut self, last: Option<u32>) {
        self.last = last;
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Allocation> {
        self.by_key.values()
    }

    pub fn holds(&self, addr: u32) -> bool {
        self.by_addr.contains_key(&addr)
    }

    /// Restores an allocation read back from the store. Refuses a second holder of one
    /// address (returns false) so a corrupt store cannot create a duplicate.
    pub fn restore(&mut self, a: Allocation) -> bool {
        if self.by_addr.contains_key(&a.addr) || self.by_key.contains_key(&a.key) {
            return false;
        }
        self.by_addr.insert(a.addr, a.key.clone());
        self.by_key.insert(a.key.clone(), a);
        true
    }

    /// Picks the next free address in `blocks` after the last one handed out, wrapping
    /// around (never one in `reserved`), for `key`; or returns the existing allocation for
    /// a repeated key.
    pub fn allocate(
        &mut self,
        key: AttachmentKey,
        blocks: &[Block],
        reserved: &BTreeSet<u32>,
        pod: Option<(String, String)>,
        netns: Option<String>,
    ) -> Result<(Allocation, bool), AllocError> {
        if let Some(a) = self.get(&key) {
            return Ok((a.clone(), false));
        }
        let after = self.last.map_or(0, |l| u64::from(l) + 1);
        let addr = self
            .first_free(blocks, reserved, after)
            .or_else(|| self.first_free(blocks, reserved, 0))
            .ok_or(AllocError::NoSpace)?;
        self.last = Some(addr);
        let a = Allocation {
            key: key.clone(),
            addr,
            pod,
            netns,
        };
        self.by_addr.insert(addr, key.clone());
        self.by_key.insert(key, a.clone());
        Ok((a, true))
    }

    /// The lowest free address at or above `from` in `blocks`.
    fn first_free(&self, blocks: &[Block], reserved: &BTreeSet<u32>, from: u64) -> Option<u32> {
        let mut blocks: Vec<&Block> = blocks.iter().filter(|b| b.end() > from).collect();
        blocks.sort_by_key(|b| b.start);
        for b in blocks {
            let (start, end) = (u64::from(b.start).max(from), b.end());
            if start >= end {
                continue;
            }
            let first = start as u32;
            // Walk the allocated addresses inside the block to find the first gap.
            let mut candidate = start;
            let used = self
                .by_addr
                .range(first..=b.last())
                .map(|(a, _)| u64::from(*a));
            let reserved_in = reserved.range(first..=b.last()).map(|a| u64::from(*a));
            let mut taken: Vec<u64> = used.chain(reserved_in).collect();
            taken.sort_unstable();
            taken.dedup();
            for t in taken {
                if t > candidate {
                    break;
                }
                candidate = t + 1;
            }
            if candidate < end {
                return Some(candidate as u32);
            }
        }
        None
    }

    /// Releases the allocation a request for `key` refers to (see `get`).
    pub fn release(&mut self, key: &AttachmentKey) -> Option<Allocation> {
        let held = self.get(key)?.key.clone();
        let a = self.by_key.remove(&held)?;
        self.by_addr.remove(&a.addr);
        Some(a)
    }

    /// Addresses in use inside `block`.
    pub fn used_in(&self, block: Block) -> u64 {
        self.by_addr.range(block.start..=block.last()).count() as u64
    }

    /// The allocations of `network` whose attachment (container id, interface) is not in
    /// `valid`: what a CNI GC of that network releases.
    ///
    /// An allocation from before keys carried the network (network empty) may belong to
    /// another network of a live container (a second interface): it is stale only when its
    /// container is not listed at all.
    pub fn stale_in(&self, network: &str, valid: &BTreeSet<(String, String)>) -> Vec<Allocation> {
        let live: BTreeSet<&str> = valid.iter().map(|(c, _)| c.as_str()).collect();
        self.by_key
            .values()
            .filter(|a| a.key.in_network(network))
            .filter(|a| !valid.contains(&(a.key.container_id.clone(), a.key.ifname.clone())))
            .filter(|a| !(a.key.network.is_empty() && live.contains(a.key.container_id.as_str())))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key_in(network: &str, c: &str) -> AttachmentKey {
        AttachmentKey {
            network: network.into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn key(c: &str) -> AttachmentKey {
        key_in("mesh", c)
    }

    fn ip(a: u32) -> String {
        Ipv4Addr::from(a).to_string()
    }

    #[test]
    fn idempotent_round_robin_and_never_twice() {
        let blocks: Vec<Block> = vec![
            "10.32.1.0/31".parse().unwrap(),
            "10.32.0.0/30".parse().unwrap(),
        ];
        let reserved = BTreeSet::from([u32::from(Ipv4Addr::new(10, 32, 0, 0))]);
        let mut t = AllocationTable::default();
        let (a, fresh) = t
            .allocate(key("a"), &blocks, &reserved, None, None)
            .unwrap();
        assert!(fresh);
        assert_eq!(
            ip(a.addr),
            "10.32.0.1",
            "blocks are searched in address order"
        );
        let (again, fresh) = t
            .allocate(key("a"), &blocks, &reserved, None, None)
            .unwrap();
        assert!(!fresh);
        assert_eq!(again.addr, a.addr);
        let mut seen = BTreeSet::from([a.addr]);
        for c in ["b", "c", "d", "e"] {
            let (x, _) = t.allocate(key(c), &blocks, &reserved, None, None).unwrap();
            assert!(seen.insert(x.addr), "address handed out twice");
        }
        assert_eq!(
            t.allocate(key("f"), &blocks, &reserved, None, None),
            Err(AllocError::NoSpace)
        );
        assert!(t.release(&key("c")).is_some());
        assert!(t.release(&key("c")).is_none());
        assert!(t.allocate(key("f"), &blocks, &reserved, None, None).is_ok());
    }

    #[test]
    fn a_freed_address_is_reused_last() {
        let blocks: Vec<Block> = vec!["10.32.0.0/29".parse().unwrap()];
        let mut t = AllocationTable::default();
        let first = t
            .allocate(key("a"), &blocks, &BTreeSet::new(), None, None)
            .unwrap()
            .0;
        t.release(&key("a")).unwrap();
        // Lowest-free would give the same address straight back; round-robin walks on
        // through the block and wraps around only when everything after it is taken.
        let mut order = Vec::new();
        for c in ["b", "c", "d", "e", "f", "g", "h", "i"] {
            order.push(
                t.allocate(key(c), &blocks, &BTreeSet::new(), None, None)
                    .unwrap()
                    .0
                    .addr,
            );
        }
        assert_eq!(ip(order[0]), "10.32.0.1");
        assert_eq!(
            *order.last().unwrap(),
            first.addr,
            "reused only after a full lap"
        );
        // The cursor survives a restart through the store.
        let mut back = AllocationTable::default();
        back.restore_last(t.last_allocated());
        assert_eq!(back.last_allocated(), Some(first.addr));
    }

    #[test]
    fn networks_are_separate_and_old_allocations_still_match() {
        let blocks: Vec<Block> = vec!["10.32.0.0/28".parse().unwrap()];
        let none = BTreeSet::new();
        let mut t = AllocationTable::default();
        let a = t
            .allocate(key_in("one", "c"), &blocks, &none, None, None)
            .unwrap()
            .0;
        let b = t
            .allocate(key_in("two", "c"), &blocks, &none, None, None)
            .unwrap()
            .0;
        assert_ne!(
            a.addr, b.addr,
            "same container and ifname, two networks: two addresses"
        );
        let legacy = Allocation {
            key: key_in("", "old"),
            addr: u32::from(Ipv4Addr::new(10, 32, 0, 9)),
            pod: None,
            netns: None,
        };
        assert!(t.restore(legacy.clone()));
        // A request naming its network finds the attachment made before names were kept.
        assert_eq!(t.get(&key_in("one", "old")), Some(&legacy));
        // GC of "one" with only "c" valid releases the legacy entry, never network two's.
        let valid = BTreeSet::from([("c".to_string(), "eth0".to_string())]);
        assert_eq!(t.stale_in("one", &valid), vec![legacy.clone()]);
        // ...but not when its container is alive under another interface: it may be that
        // container's attachment to another network.
        let alive = BTreeSet::from([("old".to_string(), "net1".to_string())]);
        assert!(!t.stale_in("one", &alive).contains(&legacy));
        let nothing_valid = BTreeSet::new();
        let stale: Vec<String> = t
            .stale_in("one", &nothing_valid)
            .into_iter()
            .map(|a| a.key.network)
            .collect();
        assert_eq!(stale, vec!["".to_string(), "one".to_string()]);
        assert!(t.release(&key_in("one", "old")).is_some());
        assert!(t.get(&key_in("two", "c")).is_some());
    }

    #[test]
    fn restore_refuses_a_second_holder() {
        let blocks: Vec<Block> = vec!["10.32.0.0/28".parse().unwrap()];
        let mut t = AllocationTable::default();
        let a = t
            .allocate(key("a"), &blocks, &BTreeSet::new(), None, None)
            .unwrap()
            .0;
        assert!(!t.restore(a.clone()), "restore must refuse a duplicate key");
        let other = Allocation { key: key("b"), ..a };
        assert!(!t.restore(other), "restore must refuse a duplicate address");
    }
}
