//! One IP family's pod CIDR pool (upstream `cidrset.CidrSet`): the cluster CIDR cut into blocks
//! of the node mask size, tracked by a bitmap, handed out round-robin from the last one given.

use std::net::IpAddr;

use ipnet::IpNet;

use super::metrics::SetMetrics;

/// The most bits an IPv6 node mask may be longer than the cluster CIDR's prefix: the bitmap
/// then holds at most 65536 blocks (8 KiB), as upstream's `clusterSubnetMaxDiff`.
pub const MAX_MASK_DIFF: u8 = 16;

/// The same limit for IPv4, where upstream has none: 24 bits (a 2 MiB bitmap) admits every
/// layout in use, such as /25 nodes in a /8, while a /32-per-node /0 would need 512 MiB.
pub const MAX_MASK_DIFF_IPV4: u8 = 24;

/// Why a CIDR set cannot be made or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrSetError {
    /// The node mask is shorter than the cluster CIDR's prefix.
    #[error("node CIDR mask /{node_mask} is shorter than the prefix of the cluster CIDR {cluster}")]
    MaskTooShort {
        /// The cluster CIDR.
        cluster: IpNet,
        /// The node mask size.
        node_mask: u8,
    },
    /// The node mask is more than [`MAX_MASK_DIFF`] ([`MAX_MASK_DIFF_IPV4`] for IPv4) bits longer
    /// than the cluster CIDR's prefix.
    #[error(
        "node CIDR mask /{node_mask} is more than {limit} bits longer than the prefix of the cluster CIDR {cluster} (the node CIDR size is too big)"
    )]
    MaskTooLong {
        /// The cluster CIDR.
        cluster: IpNet,
        /// The node mask size.
        node_mask: u8,
        /// The limit for the cluster CIDR's family.
        limit: u8,
    },
    /// The node mask is longer than the family's address.
    #[error("node CIDR mask /{node_mask} is longer than an address of the cluster CIDR {cluster}")]
    MaskBeyondAddress {
        /// The cluster CIDR.
        cluster: IpNet,
        /// The node mask size.
        node_mask: u8,
    },
    /// Every block is taken.
    #[error(
        "CIDR allocation failed: no CIDR left to allocate in the cluster CIDR {cluster} (all {max} /{node_mask} blocks are in use)"
    )]
    Full {
        /// The cluster CIDR.
        cluster: IpNet,
        /// How many blocks it has.
        max: usize,
        /// The node mask size.
        node_mask: u8,
    },
    /// The CIDR does not overlap the cluster CIDR.
    #[error("CIDR {cidr} is outside the cluster CIDR {cluster}")]
    OutOfRange {
        /// The CIDR given.
        cidr: IpNet,
        /// The cluster CIDR.
        cluster: IpNet,
    },
}

/// One cluster CIDR's blocks and which of them are in use.
#[derive(Debug, Clone)]
pub struct CidrSet {
    cluster: IpNet,
    node_mask: u8,
    /// How many blocks the cluster CIDR holds.
    max: usize,
    used: Vec<u64>,
    allocated: usize,
    /// Where the next round-robin search starts.
    next: usize,
    metrics: SetMetrics,
}

impl CidrSet {
    /// The blocks of `/node_mask` in `cluster` (truncated to its network), all free.
    pub fn new(cluster: IpNet, node_mask: u8, metrics: SetMetrics) -> Result<Self, CidrSetError> {
        let cluster = cluster.trunc();
        if node_mask < cluster.prefix_len() {
            return Err(CidrSetError::MaskTooShort { cluster, node_mask });
        }
        if node_mask > cluster.max_prefix_len() {
            return Err(CidrSetError::MaskBeyondAddress { cluster, node_mask });
        }
        let diff = node_mask - cluster.prefix_len();
        let limit = match cluster {
            IpNet::V4(_) => MAX_MASK_DIFF_IPV4,
            IpNet::V6(_) => MAX_MASK_DIFF,
        };
        if diff > limit {
            return Err(CidrSetError::MaskTooLong {
                cluster,
                node_mask,
                limit,
            });
        }
        let max = 1usize << diff;
        metrics.set_usage(0, max);
        Ok(Self {
            cluster,
            node_mask,
            max,
            used: vec![0; max.div_ceil(64)],
            allocated: 0,
            next: 0,
            metrics,
        })
    }

    /// The cluster CIDR.
    pub fn cluster(&self) -> IpNet {
        self.cluster
    }

    /// The node mask size.
    pub fn node_mask(&self) -> u8 {
        self.node_mask
    }

    /// How many blocks are in use.
    pub fn allocated(&self) -> usize {
        self.allocated
    }

    /// Whether `cidr` is of this set's IP family.
    pub fn same_family(&self, cidr: &IpNet) -> bool {
        matches!(cidr, IpNet::V4(_)) == matches!(self.cluster, IpNet::V4(_))
    }

    /// Takes the next free block after the last one handed out (upstream `AllocateNext`).
    pub fn allocate_next(&mut self) -> Result<IpNet, CidrSetError> {
        if self.allocated == self.max {
            return Err(CidrSetError::Full {
                cluster: self.cluster,
                max: self.max,
                node_mask: self.node_mask,
            });
        }
        let mut candidate = self.next;
        let mut tries = 0;
        while self.bit(candidate) {
            candidate = (candidate + 1) % self.max;
            tries += 1;
        }
        self.next = (candidate + 1) % self.max;
        self.set(candidate, true);
        self.metrics.observe_tries(tries);
        Ok(self.index_to_cidr(candidate))
    }

    /// Marks every block overlapping `cidr` as used; already used ones stay as they are and are
    /// not counted again (upstream `Occupy`).
    pub fn occupy(&mut self, cidr: &IpNet) -> Result<(), CidrSetError> {
        let (begin, end) = self.indices(cidr)?;
        for index in begin..=end {
            self.set(index, true);
        }
        Ok(())
    }

    /// Frees every block overlapping `cidr` (upstream `Release`).
    pub fn release(&mut self, cidr: &IpNet) -> Result<(), CidrSetError> {
        let (begin, end) = self.indices(cidr)?;
        for index in begin..=end {
            self.set(index, false);
        }
        Ok(())
    }

    /// Whether every block overlapping `cidr` is in use.
    pub fn is_occupied(&self, cidr: &IpNet) -> Result<bool, CidrSetError> {
        let (begin, end) = self.indices(cidr)?;
        Ok((begin..=end).all(|index| self.bit(index)))
    }

    /// The block at `index` (upstream `indexToCIDRBlock`).
    pub fn index_to_cidr(&self, index: usize) -> IpNet {
        let host_bits = u32::from(self.cluster.max_prefix_len() - self.node_mask);
        let offset = (index as u128).checked_shl(host_bits).unwrap_or(0);
        let base = to_bits(self.cluster.network()) | offset;
        let addr = match self.cluster {
            IpNet::V4(_) => IpAddr::from(u32::try_from(base).unwrap_or(u32::MAX).to_be_bytes()),
            IpNet::V6(_) => IpAddr::from(base.to_be_bytes()),
        };
        // The mask is checked against the family in `new`.
        IpNet::new(addr, self.node_mask).unwrap_or(self.cluster)
    }

    /// The index of the block holding `addr` (upstream `getIndexForIP`); `None` outside.
    pub fn index_of(&self, addr: IpAddr) -> Option<usize> {
        if !self.cluster.contains(&addr) {
            return None;
        }
        let host_bits = u32::from(self.cluster.max_prefix_len() - self.node_mask);
        let relative = to_bits(addr) ^ to_bits(self.cluster.network());
        usize::try_from(relative.checked_shr(host_bits).unwrap_or(0))
            .ok()
            .filter(|index| *index < self.max)
    }

    /// The first and last block overlapping `cidr` (upstream `getBeginningAndEndIndices`).
    fn indices(&self, cidr: &IpNet) -> Result<(usize, usize), CidrSetError> {
        let out_of_range = || CidrSetError::OutOfRange {
            cidr: *cidr,
            cluster: self.cluster,
        };
        if !self.same_family(cidr) {
            return Err(out_of_range());
        }
        let cidr = cidr.trunc();
        if cidr.prefix_len() <= self.cluster.prefix_len() {
            // As large as the cluster CIDR or larger: all of it, if they overlap at all.
            return if cidr.contains(&self.cluster.network()) {
                Ok((0, self.max - 1))
            } else {
                Err(out_of_range())
            };
        }
        let begin = self.index_of(cidr.network()).ok_or_else(out_of_range)?;
        let end = self.index_of(cidr.broadcast()).ok_or_else(out_of_range)?;
        Ok((begin, end))
    }

    fn bit(&self, index: usize) -> bool {
        self.used[index / 64] & (1 << (index % 64)) != 0
    }

    /// Sets a block's bit; the counters and metrics only move when the bit flips, so nothing
    /// is ever counted twice.
    fn set(&mut self, index: usize, used: bool) {
        if self.bit(index) == used {
            return;
        }
        self.used[index / 64] ^= 1 << (index % 64);
        if used {
            self.allocated += 1;
            self.metrics.count_allocation();
        } else {
            self.allocated -= 1;
            self.metrics.count_release();
        }
        self.metrics.set_usage(self.allocated, self.max);
    }
}

/// An address as an unsigned integer (IPv4 in the low 32 bits).
fn to_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

#[cfg(test)]
mod tests;
