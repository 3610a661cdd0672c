//! `hga_moe_router`: the fused router for a batch of tokens: `logits = x W^T` (bf16 `mma.sync m16n8k16`, f32
//! accumulation), f32 softmax over the experts, top-k (ties: lower expert index), renormalised when `norm_topk`.
//!
//! Shapes: x bf16 [tokens, hidden], W bf16 [experts, hidden] -> ids u32 [tokens, top_k], weights f32 [tokens,
//! top_k]. See [`MoeRouterParams`] (`logits` and `counter` unused here).
//! Grid: one block per 32-token tile (grid.x = ceil(tokens / 32)); block = 256 threads (8 warps). Warp w computes
//! tokens 16 (w / 4) .. +16 of the tile against experts 32 (w % 4) .. +32 of each 128-expert pass (k-permuted
//! fragments straight from global, see the module docs), over the whole hidden dimension.
//! Shared memory: the tile's logits, 32 * experts f32 (<= 32 KB). Then warp w does the softmax and top-k of tokens
//! w, w + 8, ... ([`super::warp_topk_softmax`]).
//! Assumes hidden % 128 == 0, experts <= 256, top_k <= experts (the launcher checks). Rows past `tokens` and
//! experts past `experts` are clamped to valid rows and their results dropped.
//! Cost: x is read once (L1 shares it between the 4 warps of a row tile), W once per block from L2.
use super::{router_product, warp_topk_softmax};
use crate::arch::*;
use crate::params::MoeRouterParams;

const TILE: usize = 32;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_router(p: MoeRouterParams) {
    entry_prologue();
    let (nt, h, ne, k) = (p.tokens as usize, p.hidden as usize, p.experts as usize, p.top_k as usize);
    let tok0 = block_x() as usize * TILE;
    let warp = (thread_x() / 32) as usize;
    let lane = lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let (mt, wn) = (warp / 4, warp % 4);
    let x = p.x as *const u16;
    let w = p.w as *const u16;
    let sl = dyn_smem_ptr::<f32>();
    let ra = (tok0 + 16 * mt + g).min(nt - 1);
    let rb = (tok0 + 16 * mt + g + 8).min(nt - 1);
    let xa = x.add(ra * h) as *const u8;
    let xb = x.add(rb * h) as *const u8;
    let chunks = h / 32;
    let mut e0 = 0;
    while e0 < ne {
        let mut wr = [core::ptr::null::<u8>(); 4];
        for (j, r) in wr.iter_mut().enumerate() {
            let e = (e0 + 32 * wn + 8 * j + g).min(ne - 1);
            *r = w.add(e * h) as *const u8;
        }
        let acc = router_product::<4>(xa, xb, &wr, 0, 1, chunks, t);
        let r0 = 16 * mt + g;
        for (j, a) in acc.iter().enumerate() {
            let col = e0 + 32 * wn + 8 * j + 2 * t;
            if col < ne {
                *sl.add(r0 * ne + col) = a[0];
                *sl.add((r0 + 8) * ne + col) = a[2];
            }
            if col + 1 < ne {
                *sl.add(r0 * ne + col + 1) = a[1];
                *sl.add((r0 + 8) * ne + col + 1) = a[3];
            }
        }
        e0 += 128;
    }
    sync_threads();
    let mut i = warp;
    while i < TILE {
        let tok = tok0 + i;
        if tok < nt {
            let row = sl.add(i * ne);
            warp_topk_softmax(
                |e| *row.add(e),
                ne,
                k,
                p.norm_topk != 0,
                (p.ids as *mut u32).add(tok * k),
                (p.weights as *mut f32).add(tok * k),
            );
        }
        i += 8;
    }
}
