//! `hga_kv_lookup`: one layer's selected groups against its page tables, CLOCK replacement decided on the GPU,
//! the gather's work list, the attention entry list and the counters.
//!
//! Shapes (`params/kv.rs`): `selected: u32 [n_kv][max_groups]` (`u32::MAX` = padding); per-head state `table`,
//! `slot_group`, `slot_ref`, `slot_used`, `seen`, `hand`; outputs `miss_group`, `miss_slot`, `n_miss`,
//! `entry_slot`, `entry_pos` (`[n_kv][max_entries]`), `n_entries`, `counters` (and `counters_host`).
//! Grid: `n_kv` blocks of one warp (32 threads); the warp walks its head's selection 32 entries at a time.
//! No shared memory.
//!
//! Per KV head `h`, with `p` the position, `now = p + 1`, `w0 = max(4, local_start(p) / 16)`, `pg = p / 16`:
//! 1. Entries: the sink groups `0 ..= min(3, pg)` (slots `4h'`..: `h' = h * slots_per_head`), the window groups
//!    `w0 ..= pg` (ring slot `g % 20`).
//! 2. Selection, in order: a group is taken when it is not padding, not in the sink or the window (`4 <= g < w0`,
//!    also `g < table_groups` and inside the arena's extents) and not already taken at this step (first
//!    occurrence wins: `match.any` inside a batch of 32, `seen[g] == now` across batches). A taken group with a
//!    table entry is a hit: its slot gets `slot_used = now`, `slot_ref = ref_hit` and an entry; otherwise it is
//!    appended to the miss list.
//! 3. Victims, for the misses in order: sequential CLOCK, evaluated 32 slots per warp step with identical
//!    results: at the hand, a slot used at this step is passed over, a slot with `slot_ref > 0` is decremented and
//!    passed over, a slot with `slot_ref == 0` is the victim (its old group leaves the table; the new group gets
//!    `slot_ref = ref_fill`, `slot_used = now`), and the hand moves one past it. Requires `cache_slots >=
//!    max_groups` (the launcher checks), so a victim always exists and the sweep ends within `max(ref) + 1` turns.
//! 4. `n_miss`, `n_entries`; counters `+= (hits, misses, misses * 8192, 1)`, copied to `counters_host`.
use super::{ballot, lanemask_lt, match_any, warp_sync_memory};
use crate::arch::*;
use crate::params::{kv_local_start, KvCacheParams, KV_COUNTERS, KV_GROUP_BYTES, KV_SINK_SLOTS, KV_WINDOW_SLOTS};

const ABSENT: u32 = u32::MAX;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_kv_lookup(p: KvCacheParams) {
    entry_prologue();
    let h = block_x();
    let lane = thread_x();
    if h >= p.n_kv || block_dim_x() != 32 {
        return;
    }
    let pos = *(p.pos as *const u32);
    let now = pos + 1;
    let pg = pos / 16;
    let w0 = (kv_local_start(pos) / 16).max(KV_SINK_SLOTS as u32);
    let hu = h as usize;
    let head0 = h * p.slots_per_head;
    let cache0 = head0 + (KV_SINK_SLOTS + KV_WINDOW_SLOTS) as u32;
    let me = p.max_entries as usize;
    let mg = p.max_groups as usize;
    let n_cache = p.cache_slots;
    let entry_slot = (p.entry_slot as *mut u32).add(hu * me);
    let entry_pos = (p.entry_pos as *mut u32).add(hu * me);
    let table = (p.table as *mut u32).add(hu * p.table_groups as usize);
    let seen = (p.seen as *mut u32).add(hu * p.table_groups as usize);
    let slot_group = (p.slot_group as *mut u32).add(hu * n_cache as usize);
    let slot_ref = (p.slot_ref as *mut u32).add(hu * n_cache as usize);
    let slot_used = (p.slot_used as *mut u32).add(hu * n_cache as usize);
    let sel = (p.selected as *const u32).add(hu * mg);
    let miss_group = (p.miss_group as *mut u32).add(hu * mg);
    let miss_slot = (p.miss_slot as *mut u32).add(hu * mg);
    let arena_groups = p.n_extents * p.groups_per_extent;

    // 1. The sink and the window.
    let n_sink = (pg + 1).min(KV_SINK_SLOTS as u32);
    if lane < n_sink {
        *entry_slot.add(lane as usize) = head0 + lane;
        *entry_pos.add(lane as usize) = lane * 16;
    }
    let n_win = if pg >= w0 { pg + 1 - w0 } else { 0 };
    if lane < n_win {
        let g = w0 + lane;
        *entry_slot.add((n_sink + lane) as usize) = head0 + KV_SINK_SLOTS as u32 + g % KV_WINDOW_SLOTS as u32;
        *entry_pos.add((n_sink + lane) as usize) = g * 16;
    }
    let mut n_e = n_sink + n_win;

    // 2. Hits and misses, in selection order.
    let mut n_hit = 0u32;
    let mut n_miss = 0u32;
    let mut base = 0usize;
    while base < mg {
        let i = base + lane as usize;
        let g = if i < mg { *sel.add(i) } else { ABSENT };
        let mut take = g != ABSENT && g >= KV_SINK_SLOTS as u32 && g < w0 && g < p.table_groups && g < arena_groups;
        let same = match_any(g);
        take &= (same & lanemask_lt()) == 0;
        if take {
            take = *seen.add(g as usize) != now;
        }
        let s = if take { *table.add(g as usize) } else { ABSENT };
        let hit = take && s != ABSENT;
        let miss = take && s == ABSENT;
        let hits = ballot(hit);
        let misses = ballot(miss);
        if take {
            *seen.add(g as usize) = now;
        }
        if hit {
            *slot_used.add(s as usize) = now;
            *slot_ref.add(s as usize) = p.ref_hit;
            let e = (n_e + (hits & lanemask_lt()).count_ones()) as usize;
            *entry_slot.add(e) = cache0 + s;
            *entry_pos.add(e) = g * 16;
        }
        if miss {
            *miss_group.add((n_miss + (misses & lanemask_lt()).count_ones()) as usize) = g;
        }
        n_e += hits.count_ones();
        n_hit += hits.count_ones();
        n_miss += misses.count_ones();
        base += 32;
        warp_sync_memory();
    }

    // 3. CLOCK victims for the misses.
    let mut hand = *(p.hand as *const u32).add(hu);
    let width = n_cache.min(32);
    let mut done = 0u32;
    while done < n_miss {
        let act = lane < width;
        let mut c = hand + lane;
        if c >= n_cache {
            c -= n_cache;
        }
        let (used, rf) = if act { (*slot_used.add(c as usize) == now, *slot_ref.add(c as usize)) } else { (true, 0) };
        let cand = act && !used && rf == 0;
        let cm = ballot(cand);
        let need = n_miss - done;
        // The lane of the last victim taken in this batch (or the whole batch).
        let (cut, taken_mask) = if cm.count_ones() >= need {
            let mut m = cm;
            let mut k = 1;
            while k < need {
                m &= m - 1;
                k += 1;
            }
            let last = m.trailing_zeros();
            (last + 1, cm & (u32::MAX >> (31 - last)))
        } else {
            (width, cm)
        };
        if act && lane < cut {
            if taken_mask & (1 << lane) != 0 {
                let r = done + (taken_mask & lanemask_lt()).count_ones();
                let g = *miss_group.add(r as usize);
                let old = *slot_group.add(c as usize);
                if old != ABSENT {
                    *table.add(old as usize) = ABSENT;
                }
                *table.add(g as usize) = c;
                *slot_group.add(c as usize) = g;
                *slot_ref.add(c as usize) = p.ref_fill;
                *slot_used.add(c as usize) = now;
                *miss_slot.add(r as usize) = cache0 + c;
                let e = (n_e + r) as usize;
                *entry_slot.add(e) = cache0 + c;
                *entry_pos.add(e) = g * 16;
            } else if !used && rf > 0 {
                *slot_ref.add(c as usize) = rf - 1;
            }
        }
        done += taken_mask.count_ones();
        hand += cut;
        if hand >= n_cache {
            hand -= n_cache;
        }
        warp_sync_memory();
    }
    n_e += n_miss;

    // 4. Counts.
    if lane == 0 {
        *(p.hand as *mut u32).add(hu) = hand;
        *(p.n_miss as *mut u32).add(hu) = n_miss;
        *(p.n_entries as *mut u32).add(hu) = n_e;
        let ctr = (p.counters as *mut u64).add(hu * KV_COUNTERS);
        let v = [
            *ctr + n_hit as u64,
            *ctr.add(1) + n_miss as u64,
            *ctr.add(2) + n_miss as u64 * KV_GROUP_BYTES as u64,
            *ctr.add(3) + 1,
        ];
        let mut k = 0;
        while k < KV_COUNTERS {
            *ctr.add(k) = v[k];
            if p.counters_host != 0 {
                *(p.counters_host as *mut u64).add(hu * KV_COUNTERS + k) = v[k];
            }
            k += 1;
        }
    }
}
