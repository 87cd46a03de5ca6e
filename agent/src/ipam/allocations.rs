//! `AllocationTable`: which address each pod interface holds on this node.
//!
//! Keyed by (container id, interface name) so a retried CNI ADD gets the same answer, and
//! indexed by address so an address is never handed out twice. Pure bookkeeping: the
//! caller persists every change before it answers.

use std::collections::{BTreeMap, BTreeSet};

use super::block::Block;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
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
}

impl AllocationTable {
    pub fn get(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.by_key.get(key)
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

    /// Picks the lowest free address in `blocks` (never one in `reserved`) for `key`, or
    /// returns the existing allocation for a repeated key.
    pub fn allocate(
        &mut self,
        key: AttachmentKey,
        blocks: &[Block],
        reserved: &BTreeSet<u32>,
        pod: Option<(String, String)>,
        netns: Option<String>,
    ) -> Result<(Allocation, bool), AllocError> {
        if let Some(a) = self.by_key.get(&key) {
            return Ok((a.clone(), false));
        }
        let addr = self
            .first_free(blocks, reserved)
            .ok_or(AllocError::NoSpace)?;
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

    fn first_free(&self, blocks: &[Block], reserved: &BTreeSet<u32>) -> Option<u32> {
        for b in blocks {
            let (start, end) = (u64::from(b.start), b.end());
            // Walk the allocated addresses inside the block to find the first gap.
            let mut candidate = start;
            let used = self
                .by_addr
                .range(b.start..=b.last())
                .map(|(a, _)| u64::from(*a));
            let reserved_in = reserved.range(b.start..=b.last()).map(|a| u64::from(*a));
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

    pub fn release(&mut self, key: &AttachmentKey) -> Option<Allocation> {
        let a = self.by_key.remove(key)?;
        self.by_addr.remove(&a.addr);
        Some(a)
    }

    /// Addresses in use inside `block`.
    pub fn used_in(&self, block: Block) -> u64 {
        self.by_addr.range(block.start..=block.last()).count() as u64
    }

    /// Releases every allocation whose key is not in `valid`; returns what it released.
    pub fn retain_only(&mut self, valid: &BTreeSet<AttachmentKey>) -> Vec<Allocation> {
        let stale: Vec<AttachmentKey> = self
            .by_key
            .keys()
            .filter(|k| !valid.contains(k))
            .cloned()
            .collect();
        stale.iter().filter_map(|k| self.release(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn idempotent_lowest_free_and_never_twice() {
        let blocks: Vec<Block> = vec![
            "10.32.0.0/30".parse().unwrap(),
            "10.32.1.0/31".parse().unwrap(),
        ];
        let reserved = BTreeSet::from([u32::from(std::net::Ipv4Addr::new(10, 32, 0, 0))]);
        let mut t = AllocationTable::default();
        let (a, fresh) = t
            .allocate(key("a"), &blocks, &reserved, None, None)
            .unwrap();
        assert!(fresh);
        assert_eq!(std::net::Ipv4Addr::from(a.addr).to_string(), "10.32.0.1");
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
    fn retain_only_releases_the_rest() {
        let blocks: Vec<Block> = vec!["10.32.0.0/28".parse().unwrap()];
        let mut t = AllocationTable::default();
        for c in ["a", "b", "c"] {
            t.allocate(key(c), &blocks, &BTreeSet::new(), None, None)
                .unwrap();
        }
        let gone = t.retain_only(&BTreeSet::from([key("b")]));
        assert_eq!(gone.len(), 2);
        assert_eq!(t.len(), 1);
        assert!(
            !t.restore(t.get(&key("b")).unwrap().clone()),
            "restore must refuse a duplicate"
        );
    }
}
