//! `hga_moe_router_splitk`: the router for few tokens (decode). Same math and outputs as
//! [`super::router::hga_moe_router`], but the 512 KB weight stream of Qwen3-30B-A3B is spread over many blocks.
//!
//! Grid: (ceil(experts / 8), ceil(tokens / 16)); block = 256 threads (8 warps). Block (bx, by) computes the logits
//! of tokens 16 by .. +16 against experts 8 bx .. +8 (one mma n-tile); warp w takes the 32-element chunks
//! w, w + 8, ... of hidden. The 8 partial tiles are summed in shared memory in warp order (deterministic) and
//! written to the `logits` scratch [tokens, experts]. Then each thread fences (`fence.acq_rel.gpu`), thread 0 bumps
//! `counter[by]`; the block that arrives last for its token tile reads the tile's logits back through L2
//! (`ld.global.cg`), does the softmax and top-k (warp w: tokens w, w + 8) and resets the counter to 0, so the
//! next launch finds it zeroed. The top-k reads only finished logits, so the result does not depend on which block
//! came last.
//! Shared memory: 8 * 16 * 8 f32 partials + 1 word (4100 bytes).
//! Assumes hidden % 128 == 0, experts <= 256, top_k <= experts; `counter` zero before the first launch.
use super::{last_block_arrives, ld_cg_f32, router_product, warp_topk_softmax};
use crate::arch::*;
use crate::params::MoeRouterParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_router_splitk(p: MoeRouterParams) {
    entry_prologue();
    let (nt, h, ne, k) = (p.tokens as usize, p.hidden as usize, p.experts as usize, p.top_k as usize);
    let e0 = block_x() as usize * 8;
    let tile = block_y() as usize;
    let tok0 = tile * 16;
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let x = p.x as *const u16;
    let w = p.w as *const u16;
    let part = dyn_smem_ptr::<f32>(); // [8 warps][16][8]
    let flag = part.add(8 * 128) as *mut u32;

    let xa = x.add((tok0 + g).min(nt - 1) * h) as *const u8;
    let xb = x.add((tok0 + g + 8).min(nt - 1) * h) as *const u8;
    let wr = [w.add((e0 + g).min(ne - 1) * h) as *const u8];
    let chunks = h / 32;
    let cnt = if warp < chunks { (chunks - warp).div_ceil(8) } else { 0 };
    let acc = router_product::<1>(xa, xb, &wr, warp, 8, cnt, t)[0];
    let pw = part.add(warp * 128);
    *pw.add(g * 8 + 2 * t) = acc[0];
    *pw.add(g * 8 + 2 * t + 1) = acc[1];
    *pw.add((g + 8) * 8 + 2 * t) = acc[2];
    *pw.add((g + 8) * 8 + 2 * t + 1) = acc[3];
    sync_threads();
    if tid < 128 {
        let (r, c) = (tid / 8, tid % 8);
        let mut s = 0f32;
        for wi in 0..8 {
            s += *part.add(wi * 128 + r * 8 + c);
        }
        if tok0 + r < nt && e0 + c < ne {
            *(p.logits as *mut f32).add((tok0 + r) * ne + e0 + c) = s;
        }
    }
    if !last_block_arrives((p.counter as *mut u32).add(tile), grid_dim_x(), flag) {
        return;
    }
    let mut i = warp;
    while i < 16 {
        let tok = tok0 + i;
        if tok < nt {
            let row = (p.logits as *const f32).add(tok * ne);
            warp_topk_softmax(
                |e| ld_cg_f32(row.add(e)),
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
