//! The K/V tiers of HGA: the full K/V history lives off the GPU (a host arena in RAM, optionally a RAM cache over
//! files on disk), and only the routed working set reaches the GPU (a cache of group slots). Backend-independent:
//! the CPU reference forward can keep its history in the same store.
//!
//! The unit everywhere is the **group block** of `gpu-kernels/src/params/hga.rs`: the K then the V of 16
//! consecutive positions of one (layer, KV head), 8192 bytes in bf16.
//!
//! ## Arena layout ([`ArenaLayout`])
//! The arena grows in **extents**, each holding `groups_per_extent` groups of every (layer, KV head), so a new
//! extent is allocated as the context grows and nothing already stored moves. Extent `e` holds groups
//! `e * E .. (e + 1) * E` (`E = groups_per_extent`); inside it, group `g` of (layer `l`, KV head `h`) is the block at
//! byte offset `((l * n_kv_heads + h) * E + (g - e * E)) * KV_GROUP_BYTES`. One group of one (layer, KV head) is
//! thus one contiguous 8 KB block, and a GPU kernel that reads mapped memory finds it from a device table of the
//! extents' device pointers (`u64 [extents]`) with the same arithmetic.
pub mod arena;
pub mod disk;
pub mod gpu_cache;
pub mod memory;
pub mod pinned;
pub mod store;

pub use gpu_cache::{ArenaTable, GpuCache, GpuCacheConfig};
pub use memory::{Extent, ExtentMemory, HeapMemory};
pub use pinned::PinnedMemory;
pub use store::{KvError, KvStore, KvTier};

use gpu_kernels::params::KV_GROUP_BYTES;

/// Where each group block lives in the arena's extents (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    pub layers: usize,
    pub kv_heads: usize,
    /// Groups of every (layer, KV head) per extent.
    pub groups_per_extent: usize,
}

impl ArenaLayout {
    /// Bytes of one extent.
    pub fn extent_bytes(&self) -> usize {
        self.layers * self.kv_heads * self.groups_per_extent * KV_GROUP_BYTES
    }

    /// `(extent, byte offset inside it)` of group `group` of (`layer`, `kv_head`).
    pub fn locate(&self, layer: usize, kv_head: usize, group: usize) -> (usize, usize) {
        debug_assert!(layer < self.layers && kv_head < self.kv_heads);
        let e = group / self.groups_per_extent;
        let g = group % self.groups_per_extent;
        (e, ((layer * self.kv_heads + kv_head) * self.groups_per_extent + g) * KV_GROUP_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_tile_each_extent_without_overlap() {
        let l = ArenaLayout { layers: 3, kv_heads: 2, groups_per_extent: 5 };
        let mut seen = std::collections::BTreeSet::new();
        for layer in 0..3 {
            for h in 0..2 {
                for g in 5..10 {
                    let (e, off) = l.locate(layer, h, g);
                    assert_eq!(e, 1);
                    assert_eq!(off % KV_GROUP_BYTES, 0);
                    assert!(off + KV_GROUP_BYTES <= l.extent_bytes());
                    assert!(seen.insert(off));
                }
            }
        }
        assert_eq!(seen.len() * KV_GROUP_BYTES, l.extent_bytes());
    }
}
