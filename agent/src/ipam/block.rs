//! Aligned IPv4 CIDR blocks as plain integers: the unit the ring, routes and hand-overs
//! deal in. Pure arithmetic, no allocation.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// `start/prefix`, with `start` aligned to the prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub start: u32,
    pub prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("{0:?} is not a CIDR like 10.32.0.0/12")]
    Syntax(String),
    #[error("prefix /{0} is out of range (0..=32)")]
    Prefix(u8),
    #[error("{addr}/{prefix} is not aligned: the network address is {aligned}/{prefix}")]
    Unaligned {
        addr: Ipv4Addr,
        prefix: u8,
        aligned: Ipv4Addr,
    },
}

impl Block {
    pub fn new(start: u32, prefix: u8) -> Result<Block, BlockError> {
        if prefix > 32 {
            return Err(BlockError::Prefix(prefix));
        }
        let b = Block { start, prefix };
        if start & !b.mask() != 0 {
            return Err(BlockError::Unaligned {
                addr: Ipv4Addr::from(start),
                prefix,
                aligned: Ipv4Addr::from(start & b.mask()),
            });
        }
        Ok(b)
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Number of addresses, as u64 so a /0 fits.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// One past the last address, as u64 so the top of the space fits.
    pub fn end(&self) -> u64 {
        u64::from(self.start) + self.size()
    }

    pub fn last(&self) -> u32 {
        (self.end() - 1) as u32
    }

    pub fn contains_addr(&self, addr: u32) -> bool {
        addr & self.mask() == self.start
    }

    pub fn contains(&self, other: &Block) -> bool {
        other.prefix >= self.prefix && self.contains_addr(other.start)
    }

    pub fn overlaps(&self, other: &Block) -> bool {
        self.contains(other) || other.contains(self)
    }

    /// The two halves, or `None` for a /32.
    pub fn halves(&self) -> Option<(Block, Block)> {
        if self.prefix >= 32 {
            return None;
        }
        let p = self.prefix + 1;
        let half = 1u32 << (32 - u32::from(p));
        Some((
            Block {
                start: self.start,
                prefix: p,
            },
            Block {
                start: self.start + half,
                prefix: p,
            },
        ))
    }

    /// The block this one is a half of, or `None` for a /0.
    pub fn parent(&self) -> Option<Block> {
        if self.prefix == 0 {
            return None;
        }
        let p = self.prefix - 1;
        let parent = Block {
            start: 0,
            prefix: p,
        };
        Some(Block {
            start: self.start & parent.mask(),
            prefix: p,
        })
    }

    /// The other half of this block's parent.
    pub fn buddy(&self) -> Option<Block> {
        if self.prefix == 0 {
            return None;
        }
        Some(Block {
            start: self.start ^ (1u32 << (32 - u32::from(self.prefix))),
            prefix: self.prefix,
        })
    }

    /// Splits `[start, end)` (aligned to nothing in particular) into the fewest aligned blocks.
    pub fn cover(start: u64, end: u64) -> Vec<Block> {
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            // Largest block aligned at `at` that fits before `end`.
            let align = if at == 0 {
                32
            } else {
                at.trailing_zeros().min(32)
            };
            let mut bits = align;
            while bits > 0 && at + (1u64 << bits) > end {
                bits -= 1;
            }
            out.push(Block {
                start: at as u32,
                prefix: (32 - bits) as u8,
            });
            at += 1u64 << bits;
        }
        out
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.start), self.prefix)
    }
}

impl FromStr for Block {
    type Err = BlockError;
    fn from_str(s: &str) -> Result<Block, BlockError> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| BlockError::Syntax(s.to_string()))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| BlockError::Syntax(s.to_string()))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| BlockError::Syntax(s.to_string()))?;
        Block::new(u32::from(addr), prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_and_alignment() {
        let b: Block = "10.32.0.0/12".parse().unwrap();
        assert_eq!(b.to_string(), "10.32.0.0/12");
        assert_eq!(b.size(), 1 << 20);
        assert!(matches!(
            "10.32.0.1/12".parse::<Block>(),
            Err(BlockError::Unaligned { .. })
        ));
        assert!("10.32.0.0/33".parse::<Block>().is_err());
        assert!("nonsense".parse::<Block>().is_err());
        let all: Block = "0.0.0.0/0".parse().unwrap();
        assert_eq!(all.end(), 1 << 32);
    }

    #[test]
    fn halves_parent_buddy() {
        let b: Block = "10.32.0.0/12".parse().unwrap();
        let (l, r) = b.halves().unwrap();
        assert_eq!(
            (l.to_string(), r.to_string()),
            ("10.32.0.0/13".into(), "10.40.0.0/13".into())
        );
        assert_eq!(l.parent(), Some(b));
        assert_eq!(l.buddy(), Some(r));
        assert!(b.contains(&r) && !r.contains(&b) && b.overlaps(&r));
    }

    #[test]
    fn cover_is_exact_and_aligned() {
        let base = u64::from(u32::from(Ipv4Addr::new(10, 32, 0, 0)));
        for (len, expect) in [(1u64 << 20, 1usize), (3 << 18, 2), (100, 3)] {
            let blocks = Block::cover(base, base + len);
            assert_eq!(blocks.len(), expect, "{blocks:?}");
            assert_eq!(blocks.iter().map(Block::size).sum::<u64>(), len);
            for w in blocks.windows(2) {
                assert_eq!(w[0].end(), u64::from(w[1].start));
            }
        }
    }
}
