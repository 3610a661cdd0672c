//! The host arena: every group block of the K/V history in extents of host memory (the RAM tier).
//!
//! ## Layout
//! [`ArenaLayout`] (see `super`): the arena grows by whole **extents**, each holding `groups_per_extent` groups of
//! every (layer, KV head); group `g` of (layer `l`, KV head `h`) is one contiguous block in extent
//! `g / groups_per_extent`. A new extent is allocated when the context reaches it, and nothing stored moves, so the
//! device pointers of the extents ([`Arena::device_ptrs`], in extent order) stay valid for the life of the arena: a
//! GPU gather finds a block with `ptrs[e] + ArenaLayout::locate(l, h, g).1` and nothing else.
//!
//! A **block** ([`BlockFormat`]) is the K rows `[16][head_dim]` then the V rows `[16][head_dim]` of 16 consecutive
//! positions. [`BlockFormat::STANDARD`] (head_dim 128, bf16) is exactly the group block of
//! `gpu-kernels/src/params/hga.rs` (8192 bytes); the other formats exist so that the CPU reference forward can keep
//! any model shape (the tiny preset has head_dim 48) and its f32 activation modes in the same store without losing a
//! bit: the CPU forward stores bf16 when its K/V are bf16 (the `fp8-bf16` mode, what the GPU stores: the same bytes),
//! f32 otherwise. A non-standard block of `B` bytes sits where `ArenaLayout` puts the standard one, scaled by
//! `B / KV_GROUP_BYTES` (the block index is the same).
//!
//! The **open group** (the last, partially filled one) is stored too: a token's K and V are written in place at its
//! row (`pos % 16`); rows past the history's length are never read.
//!
//! ## Bytes per token
//! `layers * kv_heads * 2 * head_dim * elem_bytes` (the model's K+V, no overhead but the unfilled rows of the open
//! group and the unused groups of the last extent): 96 KB per token for Qwen3-30B-A3B in bf16, 6.3 GB at 64K.
//!
//! ## Why
//! Extents rather than one growing buffer: growth never copies (a realloc of GBs of mapped pinned memory would
//! stall a step and invalidate every device pointer). One contiguous block per (layer, KV head, group): a gather
//! moves whole 8 KB blocks, the unit the GPU cache and the disk tier also move. Extents of every (layer, KV head)
//! rather than one per (layer, KV head): a few large allocations (pinned allocations are slow and the GPU needs a
//! short table of pointers).
//!
//! ## Measured
//! Appends of the Qwen3-30B-A3B shape into heap extents, on the 2-core build machine (docs/perf-kv.md, "Host arena",
//! 2026-12-03): 13.5K tokens/s (1.33 GB/s) one token at a time over 48 layers, 28.9K tokens/s (2.84 GB/s) over
//! extents already touched, 18.3K tokens/s (1.80 GB/s) in prefill calls of 1024 tokens (first touch included).
use gpu_kernels::params::{HGA_GROUP, HGA_HEAD_DIM, KV_GROUP_BYTES};

use super::store::KvError;
use super::{ArenaLayout, Extent, ExtentMemory};

/// Positions per group (the shared format's group).
pub const GROUP: usize = HGA_GROUP;

/// Element type of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// bf16 (the shared format). Values must be exactly representable: storing is lossless or an error.
    Bf16,
    /// f32 (the CPU forward's unrounded activation modes).
    F32,
}

impl Elem {
    pub fn bytes(self) -> usize {
        match self {
            Elem::Bf16 => 2,
            Elem::F32 => 4,
        }
    }
}

/// The shape of one group block: K `[16][head_dim]` then V `[16][head_dim]` of `elem`, little endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockFormat {
    pub head_dim: usize,
    pub elem: Elem,
}

impl BlockFormat {
    /// The shared group block of `gpu-kernels/src/params/hga.rs`.
    pub const STANDARD: BlockFormat = BlockFormat { head_dim: HGA_HEAD_DIM, elem: Elem::Bf16 };

    /// Bytes of one K (or V) row.
    pub fn row_bytes(&self) -> usize {
        self.head_dim * self.elem.bytes()
    }

    /// Bytes of the K half (then the V half) of a block.
    pub fn half_bytes(&self) -> usize {
        GROUP * self.row_bytes()
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        2 * self.half_bytes()
    }

    /// Byte range of K row `r` inside a block.
    pub fn k_row(&self, r: usize) -> std::ops::Range<usize> {
        r * self.row_bytes()..(r + 1) * self.row_bytes()
    }

    /// Byte range of V row `r` inside a block.
    pub fn v_row(&self, r: usize) -> std::ops::Range<usize> {
        let o = self.half_bytes() + r * self.row_bytes();
        o..o + self.row_bytes()
    }

    /// Encodes `src` (`head_dim` values) into `dst` (`row_bytes`). In bf16 a value that bf16 cannot hold exactly is
    /// an error (the store never rounds: what is read back is what was given).
    pub fn encode_row(&self, src: &[f32], dst: &mut [u8]) -> Result<(), KvError> {
        debug_assert_eq!(src.len(), self.head_dim);
        match self.elem {
            Elem::F32 => {
                for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                    d.copy_from_slice(&s.to_le_bytes());
                }
            }
            Elem::Bf16 => {
                // bf16 is the top half of an f32: exact iff the low half is zero (NaN and inf included).
                let mut low = 0u32;
                for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
                    let b = s.to_bits();
                    low |= b & 0xFFFF;
                    d.copy_from_slice(&((b >> 16) as u16).to_le_bytes());
                }
                if low != 0 {
                    let s = src.iter().find(|s| s.to_bits() & 0xFFFF != 0).copied().unwrap_or_default();
                    return Err(KvError::Format(format!(
                        "value {s:e} is not exactly representable in bf16: a bf16 store would round it (use an \
                         f32 block format for unrounded activations)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Decodes a row written by [`Self::encode_row`].
    pub fn decode_row(&self, src: &[u8], dst: &mut [f32]) {
        match self.elem {
            Elem::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            Elem::Bf16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                }
            }
        }
    }
}

/// Checks the rows of an append: `k` and `v` are `[t, kv_heads * head_dim]`.
pub(crate) fn check_rows(kv_heads: usize, f: &BlockFormat, k: &[f32], v: &[f32]) -> Result<usize, KvError> {
    let w = kv_heads * f.head_dim;
    if k.len() != v.len() || !k.len().is_multiple_of(w) {
        return Err(KvError::Usage(format!(
            "append: K ({}) and V ({}) must both be [tokens, {w}] (kv_heads {kv_heads} x head_dim {})",
            k.len(),
            v.len(),
            f.head_dim
        )));
    }
    Ok(k.len() / w)
}

/// The host arena, generic over the memory of its extents ([`super::HeapMemory`] for the CPU, mapped pinned memory
/// for a GPU backend). See the module docs for the layout.
pub struct Arena<M: ExtentMemory> {
    mem: M,
    layout: ArenaLayout,
    format: BlockFormat,
    extents: Vec<Extent>,
    /// Positions stored per layer.
    lens: Vec<usize>,
}

impl<M: ExtentMemory> Arena<M> {
    /// An empty arena (no extent allocated yet).
    pub fn new(
        mem: M,
        layers: usize,
        kv_heads: usize,
        format: BlockFormat,
        groups_per_extent: usize,
    ) -> Result<Self, KvError> {
        if layers == 0 || kv_heads == 0 || groups_per_extent == 0 || format.head_dim == 0 {
            return Err(KvError::Usage(format!(
                "arena: layers ({layers}), kv_heads ({kv_heads}), groups_per_extent ({groups_per_extent}) and \
                 head_dim ({}) must be > 0",
                format.head_dim
            )));
        }
        let layout = ArenaLayout { layers, kv_heads, groups_per_extent };
        Ok(Arena { mem, layout, format, extents: Vec::new(), lens: vec![0; layers] })
    }

    /// Groups per extent so that an extent is about `target_bytes` (at least one group).
    pub fn groups_per_extent_for(layers: usize, kv_heads: usize, format: BlockFormat, target_bytes: usize) -> usize {
        (target_bytes / (layers * kv_heads * format.block_bytes()).max(1)).max(1)
    }

    pub fn layout(&self) -> ArenaLayout {
        self.layout
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// What the extents are (`heap`, `mapped pinned`).
    pub fn memory_name(&self) -> &'static str {
        self.mem.name()
    }

    /// The extents, in order (extent `e` holds groups `e * groups_per_extent ..`).
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The device pointers of the extents in order, when every extent is mapped for the GPU (the table a gather
    /// kernel reads); `None` for unmapped memory.
    pub fn device_ptrs(&self) -> Option<Vec<u64>> {
        self.extents.iter().map(|e| e.device_ptr()).collect()
    }

    /// Bytes of one extent.
    pub fn extent_bytes(&self) -> usize {
        self.layout.extent_bytes() / KV_GROUP_BYTES * self.format.block_bytes()
    }

    /// Bytes allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.extents.len() * self.extent_bytes()
    }

    /// Groups (per layer and KV head) the allocated extents hold.
    pub fn capacity_groups(&self) -> usize {
        self.extents.len() * self.layout.groups_per_extent
    }

    /// Positions stored in `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&n| n == 0)
    }

    /// Allocates extents until `groups` groups fit (never moves what is stored).
    pub fn reserve_groups(&mut self, groups: usize) -> Result<(), KvError> {
        while self.capacity_groups() < groups {
            let bytes = self.extent_bytes();
            let e = self.mem.alloc(bytes).map_err(|e| {
                KvError::Alloc(format!(
                    "host K/V arena: extent {} of {bytes} bytes ({} memory): {e}",
                    self.extents.len(),
                    self.mem.name()
                ))
            })?;
            self.extents.push(e);
        }
        Ok(())
    }

    /// `(extent, byte offset)` of a block.
    fn at(&self, layer: usize, kv_head: usize, group: usize) -> (usize, usize) {
        let (e, off) = self.layout.locate(layer, kv_head, group);
        (e, off / KV_GROUP_BYTES * self.format.block_bytes())
    }

    /// Block `group` of (`layer`, `kv_head`); it must be allocated (`group < capacity_groups()`).
    pub fn block(&self, layer: usize, kv_head: usize, group: usize) -> &[u8] {
        let (e, off) = self.at(layer, kv_head, group);
        &self.extents[e].as_slice()[off..off + self.format.block_bytes()]
    }

    /// Mutable [`Self::block`].
    pub fn block_mut(&mut self, layer: usize, kv_head: usize, group: usize) -> &mut [u8] {
        let (e, off) = self.at(layer, kv_head, group);
        let b = self.format.block_bytes();
        &mut self.extents[e].as_mut_slice()[off..off + b]
    }

    /// Records that positions `..len` of `layer` are stored, for a writer that fills the blocks itself (a GPU
    /// writing the mapped extents, or [`Self::block_mut`]); the groups must be allocated ([`Self::reserve_groups`]).
    pub fn set_len(&mut self, layer: usize, len: usize) -> Result<(), KvError> {
        if layer >= self.layout.layers || len.div_ceil(GROUP) > self.capacity_groups() {
            return Err(KvError::Usage(format!(
                "set_len({layer}, {len}): the arena has {} layers and room for {} positions",
                self.layout.layers,
                self.capacity_groups() * GROUP
            )));
        }
        self.lens[layer] = len;
        Ok(())
    }

    /// Writes the K/V rows of positions `pos0..pos0 + t` of `layer` (`k`, `v`: `[t, kv_heads * head_dim]`), each in
    /// place at its row of its group; the layer's length becomes `pos0 + t`. `pos0` must not be past the length
    /// (no holes; a smaller `pos0` rewrites).
    pub fn append(&mut self, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        let f = self.format;
        let heads = self.layout.kv_heads;
        let t = check_rows(heads, &f, k, v)?;
        if layer >= self.layout.layers || pos0 > self.lens[layer] {
            return Err(KvError::Usage(format!(
                "append at layer {layer} position {pos0}: the arena has {} layers and {} positions there",
                self.layout.layers,
                self.lens.get(layer).copied().unwrap_or(0)
            )));
        }
        self.reserve_groups((pos0 + t).div_ceil(GROUP))?;
        let d = f.head_dim;
        for i in 0..t {
            let pos = pos0 + i;
            for h in 0..heads {
                let row = (i * heads + h) * d..(i * heads + h + 1) * d;
                let r = pos % GROUP;
                let blk = self.block_mut(layer, h, pos / GROUP);
                f.encode_row(&k[row.clone()], &mut blk[f.k_row(r)])?;
                f.encode_row(&v[row], &mut blk[f.v_row(r)])?;
            }
        }
        self.lens[layer] = pos0 + t;
        Ok(())
    }

    /// Calls `f(group, block)` for each of `groups` of (`layer`, `kv_head`) (every group must hold a stored
    /// position). All hits: the arena holds everything.
    pub fn read_groups(
        &self,
        layer: usize,
        kv_head: usize,
        groups: &[usize],
        f: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), KvError> {
        check_read(layer, kv_head, groups, self.layout.layers, self.layout.kv_heads, self.lens.get(layer).copied())?;
        for &g in groups {
            f(g, self.block(layer, kv_head, g));
        }
        Ok(())
    }
}

/// Checks a read: the layer and head exist and every group holds a stored position.
pub(crate) fn check_read(
    layer: usize,
    kv_head: usize,
    groups: &[usize],
    layers: usize,
    kv_heads: usize,
    len: Option<usize>,
) -> Result<(), KvError> {
    let len = len.unwrap_or(0);
    if layer >= layers || kv_head >= kv_heads {
        return Err(KvError::Usage(format!(
            "read of layer {layer} KV head {kv_head}: the store has {layers} layers and {kv_heads} KV heads"
        )));
    }
    if let Some(&g) = groups.iter().find(|&&g| g * GROUP >= len) {
        return Err(KvError::Usage(format!(
            "read of group {g} of layer {layer}: only {len} positions ({} groups) are stored",
            len.div_ceil(GROUP)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::HeapMemory;

    #[test]
    fn standard_format_is_the_shared_group_block() {
        assert_eq!(BlockFormat::STANDARD.block_bytes(), KV_GROUP_BYTES);
        assert_eq!(BlockFormat::STANDARD.half_bytes(), gpu_kernels::params::KV_GROUP_K_BYTES);
    }

    #[test]
    fn bf16_refuses_to_round() {
        let f = BlockFormat { head_dim: 2, elem: Elem::Bf16 };
        let mut d = [0u8; 4];
        f.encode_row(&[1.0, -2.5], &mut d).unwrap();
        let mut back = [0f32; 2];
        f.decode_row(&d, &mut back);
        assert_eq!(back, [1.0, -2.5]);
        let e = f.encode_row(&[1.0 + f32::EPSILON, 0.0], &mut d).unwrap_err().to_string();
        assert!(e.contains("not exactly representable in bf16"), "{e}");
    }

    #[test]
    fn grows_by_extents_without_moving_and_reads_back() {
        let f = BlockFormat { head_dim: 4, elem: Elem::F32 };
        let mut a = Arena::new(HeapMemory, 2, 3, f, 2).unwrap();
        let w = 3 * 4;
        let rows = |t: usize, s: f32| (0..t * w).map(|i| i as f32 * 0.5 + s).collect::<Vec<f32>>();
        a.append(1, 0, &rows(20, 0.0), &rows(20, 1000.0)).unwrap();
        assert_eq!(a.extents().len(), 1);
        let p0 = a.extents()[0].as_slice().as_ptr();
        a.append(1, 20, &rows(50, 7.0), &rows(50, 9.0)).unwrap();
        assert_eq!(a.extents().len(), 3);
        assert_eq!(a.extents()[0].as_slice().as_ptr(), p0, "an extent moved");
        assert_eq!(a.len(1), 70);
        assert_eq!(a.device_ptrs(), None);
        // Position 33 of head 2: written by the second append (row 13 there).
        let mut got = [0f32; 4];
        a.read_groups(1, 2, &[2], &mut |g, b| {
            assert_eq!(g, 2);
            f.decode_row(&b[f.k_row(1)], &mut got);
        })
        .unwrap();
        let want: Vec<f32> = rows(50, 7.0)[13 * w + 8..13 * w + 12].to_vec();
        assert_eq!(got.to_vec(), want);
        let e = a.read_groups(1, 0, &[5], &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("only 70 positions"), "{e}");
        assert!(a.append(0, 3, &rows(1, 0.0), &rows(1, 0.0)).is_err(), "a hole");
        // A writer that fills blocks itself (a GPU) records the length; beyond the allocated extents is refused.
        a.block_mut(0, 1, 0)[f.k_row(0)].copy_from_slice(&[0u8; 16]);
        a.set_len(0, 96).unwrap();
        assert_eq!(a.len(0), 96);
        assert!(a.set_len(0, 97).unwrap_err().to_string().contains("room for 96 positions"));
    }
}
