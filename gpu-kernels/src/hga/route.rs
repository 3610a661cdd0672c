//! Routing kernels: summary maintenance ([`summary`]), the normalization ([`base`]: each query row's sink + window
//! log-sum-exp), stage 1 ([`stage1`]: chunk bounds + top n_c) and stage 2 ([`stage2`]: int4-sketch group scores +
//! top n_g, or every candidate group with no chunk stage). They implement
//! `host/src/hga`'s default (`HgaParams::default()`: chunk 64, group 16, min/max chunk summaries, int4-sketch group
//! score as the log-sum-exp of a group's estimated scaled scores, scores normalized by each query row's sink +
//! window log-sum-exp, GQA max); `host/src/reference/hga_route.rs` is their CPU reference.
//!
//! Shared here: the routing geometry evaluated on the device ([`geometry`], `host/src/hga::Geometry::new` line
//! for line, in f64), the key source ([`key_row`]) and the last-CTA top-k ([`select_top_k`], fed by a histogram
//! that the scoring CTAs count in global memory).
//!
//! Tie and NaN rule of every selection (the one of `host/src/hga::top_k`): candidates are ranked by score, a NaN
//! score counts as -inf, equal scores go to the lower candidate index (stage 1: the lower chunk; stage 2: the lower
//! absolute group, since candidates are enumerated in ascending group order). Scores are aggregated over query rows
//! with a NaN-ignoring max from -inf (as host/src/hga's `fold(-inf, f64::max)`), so a candidate whose every row
//! score is NaN scores -inf; `stats` counts the candidates that scored -inf or NaN.
pub mod base;
pub mod stage1;
pub mod stage2;
pub mod summary;

use crate::arch::*;
use crate::kv::{ballot, lanemask_lt};
use crate::moe::{last_block_arrives, ld_cg_f32, unroll};
use crate::params::{RouteParams, HGA_CHUNK, HGA_GROUP, ROUTE_HIST_BINS, ROUTE_HIST_BITS, ROUTE_THREADS};

/// The routing geometry of the launch's query block (fields as `host/src/hga::Geometry`).
#[derive(Clone, Copy)]
pub(crate) struct Geo {
    pub sink_end: usize,
    pub local_start: usize,
    pub first_chunk: usize,
    pub end_chunk: usize,
    pub n_groups: usize,
    pub n_chunks: usize,
    pub b0: usize,
    /// `b0 + q_len <= max_ctx` (else nothing is routed).
    pub ok: bool,
}

#[inline(always)]
fn ceil_f64(x: f64) -> f64 {
    let r: f64;
    unsafe { core::arch::asm!("cvt.rpi.f64.f64 {0}, {1};", out(reg64) r, in(reg64) x, options(pure, nomem, nostack)) };
    r
}

/// The query block's first position: `*p.pos` when set (device-resident), else `p.b0`.
#[inline(always)]
pub(crate) unsafe fn block_start(p: &RouteParams) -> usize {
    if p.pos != 0 {
        *(p.pos as *const u32) as usize
    } else {
        p.b0 as usize
    }
}

/// `host/src/hga::Geometry::new(params, b0, q_len)`, then n_g capped by `max_groups` and n_c (computed from the
/// capped n_g as host/src/hga computes it from n_g) capped by `max_kept`. With no chunk stage n_c is every chunk.
#[inline(always)]
pub(crate) unsafe fn geometry(p: &RouteParams) -> Geo {
    let c = HGA_CHUNK;
    let b0 = block_start(p);
    let sink_end = (p.sink as usize).div_ceil(c) * c;
    let ls = b0.saturating_sub(p.local as usize) / c * c;
    let local_start = if ls > sink_end.min(b0) { ls } else { sink_end.min(b0) };
    let first_chunk = sink_end / c;
    let end_chunk = if local_start / c > first_chunk { local_start / c } else { first_chunk };
    let ctx = b0 + p.q_len as usize;
    let budget =
        if p.budget_tokens != 0 { p.budget_tokens as usize } else { ceil_f64(p.budget_frac * ctx as f64) as usize };
    let always = sink_end.min(ctx) + (ctx - local_start.min(ctx));
    let n_cand_chunks = end_chunk - first_chunk;
    let candidates = n_cand_chunks * (c / HGA_GROUP);
    let mut n_groups = budget.saturating_sub(always) / HGA_GROUP;
    if n_groups > candidates {
        n_groups = candidates;
    }
    if n_groups > p.max_groups as usize {
        n_groups = p.max_groups as usize;
    }
    let mut n_chunks = n_cand_chunks;
    if p.chunk_stage != 0 {
        let want = ceil_f64(p.shortlist * (n_groups * HGA_GROUP) as f64 / c as f64);
        if want.is_finite() && want < n_cand_chunks as f64 {
            n_chunks = want as usize;
        }
        if n_chunks > p.max_kept as usize {
            n_chunks = p.max_kept as usize;
        }
    }
    Geo { sink_end, local_start, first_chunk, end_chunk, n_groups, n_chunks, b0, ok: ctx <= p.max_ctx as usize }
}

impl Geo {
    /// Sink positions of the normalization set (`[0, min(sink_end, local_start))`).
    #[inline(always)]
    pub fn n_sink(&self) -> usize {
        self.sink_end.min(self.local_start)
    }
    /// Size of the normalization set (host/src/hga's `Geometry::always`: the sink and the window up to `b0`).
    #[inline(always)]
    pub fn n_always(&self) -> usize {
        self.n_sink() + self.b0.saturating_sub(self.local_start.max(self.sink_end))
    }
    /// Position of the `j`-th element of the normalization set.
    #[inline(always)]
    pub fn always_pos(&self, j: usize) -> usize {
        let s = self.n_sink();
        if j < s {
            j
        } else {
            self.local_start.max(self.sink_end) + (j - s)
        }
    }
}

/// Address of the bf16 key row of position `j`, KV head `h` (see [`RouteParams`]).
#[inline(always)]
pub(crate) unsafe fn key_row(p: &RouteParams, h: usize, j: usize) -> *const u16 {
    if p.k_table != 0 {
        let t = *(p.k_table as *const u64).add(h * p.k_table_len as usize + j / HGA_GROUP);
        (t as *const u16).add((j % HGA_GROUP) * p.k_row_stride as usize)
    } else {
        (p.k as *const u16).add(h * p.k_head_stride as usize + j * p.k_row_stride as usize)
    }
}

/// The q row `r` of KV head `h` (rows query-major: token `r / per_kv`, query head `h * per_kv + r % per_kv`).
#[inline(always)]
pub(crate) unsafe fn q_row(p: &RouteParams, h: usize, r: usize) -> *const f32 {
    let per_kv = (p.n_heads / p.n_kv_heads) as usize;
    (p.q as *const f32).add(((r / per_kv) * p.n_heads as usize + h * per_kv + r % per_kv) * 128)
}

/// `min.f32` (NaN-ignoring, as f32::min).
#[inline(always)]
pub(crate) fn fmin(a: f32, b: f32) -> f32 {
    let r: f32;
    unsafe {
        core::arch::asm!("min.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) a, in(reg32) b, options(pure, nomem, nostack))
    };
    r
}

/// Natural log (lg2.approx).
#[inline(always)]
pub(crate) fn ln(x: f32) -> f32 {
    lg2(x) * core::f32::consts::LN_2
}

/// `ln sum exp` of two-pass form as host/src/hga's `log_sum_exp`: -inf when the max is -inf.
#[inline(always)]
pub(crate) fn lse_finish(m: f32, sum: f32) -> f32 {
    if m == f32::NEG_INFINITY {
        f32::NEG_INFINITY
    } else {
        m + ln(sum)
    }
}

/// One step of an online log-sum-exp `(m, s)` (max and sum of `exp(x - m)`): the same value as host/src/hga's
/// two-pass `log_sum_exp` up to rounding, and the same NaN/inf behaviour (a NaN or a +inf term gives NaN, -inf
/// terms count 0, all -inf gives -inf through [`lse_finish`]).
#[inline(always)]
pub(crate) fn lse_push(m: f32, s: f32, x: f32) -> (f32, f32) {
    if x == f32::NEG_INFINITY {
        return (m, s);
    }
    let mn = fmax(m, x);
    let l2e = core::f32::consts::LOG2_E;
    (mn, s * ex2((m - mn) * l2e) + ex2((x - mn) * l2e))
}

/// Merges two online log-sum-exp states.
#[inline(always)]
pub(crate) fn lse_merge(a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    let mn = fmax(a.0, b.0);
    if mn == f32::NEG_INFINITY {
        return (mn, 0.0);
    }
    let l2e = core::f32::consts::LOG2_E;
    (mn, a.1 * ex2((a.0 - mn) * l2e) + b.1 * ex2((b.0 - mn) * l2e))
}

/// Monotone u32 key of a score: larger score, larger key; NaN ranks as -inf (host/src/hga's `top_k`).
#[inline(always)]
pub(crate) fn order_key(s: f32) -> u32 {
    let s = if s != s { f32::NEG_INFINITY } else { s };
    let b = s.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The key of -inf (the lowest a score can have).
pub(crate) const NEG_INF_KEY: u32 = !0xFF80_0000u32;

/// `ld.global.cg.u32` (L2: data written by this CTA before a barrier).
#[inline(always)]
unsafe fn ld_cg_u32(p: *const u32) -> u32 {
    let r: u32;
    core::arch::asm!("ld.global.cg.u32 {0}, [{1}];", out(reg32) r, in(reg64) p, options(nostack, readonly));
    r
}

/// `ld.global.cg.v4.u32` (16-byte aligned; data other CTAs of the launch wrote).
#[inline(always)]
unsafe fn ld_cg_v4_u32(p: *const u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    core::arch::asm!("ld.global.cg.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg64) p, options(nostack, readonly));
    [a, b, c, d]
}

/// Generic 16-byte load of 4 f32 (`ld.v4.f32`; shared or global, 16-byte aligned). A `*const [f32; 4]` load
/// would be 4 scalar loads: the array type is only 4-byte aligned.
#[inline(always)]
pub(crate) unsafe fn ld_v4_f32(p: *const f32) -> [f32; 4] {
    let (a, b, c, d): (f32, f32, f32, f32);
    core::arch::asm!("ld.v4.f32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg64) p, options(nostack, readonly));
    [a, b, c, d]
}

/// Generic 16-byte store of 4 words (16-byte aligned).
#[inline(always)]
pub(crate) unsafe fn st_v4_u32(p: *mut u32, v: [u32; 4]) {
    core::arch::asm!("st.v4.u32 [{0}], {{{1}, {2}, {3}, {4}}};",
        in(reg64) p, in(reg32) v[0], in(reg32) v[1], in(reg32) v[2], in(reg32) v[3], options(nostack));
}

/// `red.global.add.u32` (no result: nothing waits for it).
#[inline(always)]
pub(crate) unsafe fn red_global_add(p: *mut u32, v: u32) {
    core::arch::asm!("red.global.add.u32 [{0}], {1};", in(reg64) p, in(reg32) v, options(nostack));
}

/// `red.shared.max.u32` through a generic pointer into shared memory.
#[inline(always)]
pub(crate) unsafe fn red_shared_max(p: *mut u32, v: u32) {
    core::arch::asm!("red.shared.max.u32 [{0}], {1};", in(reg64) cvta_to_shared(p), in(reg32) v, options(nostack));
}

/// The score of an order key (the inverse of [`order_key`]; a NaN score came back as -inf).
#[inline(always)]
pub(crate) fn key_score(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 { k & 0x7FFF_FFFF } else { !k })
}

/// The first-level histogram bin of an order key.
#[inline(always)]
pub(crate) fn hist_bin(k: u32) -> usize {
    (k >> (32 - ROUTE_HIST_BITS)) as usize
}

#[inline(always)]
fn shfl_up_u32(v: u32, d: u32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("shfl.sync.up.b32 {0}, {1}, {2}, 0, 0xffffffff;", out(reg32) r, in(reg32) v, in(reg32) d, options(nostack))
    };
    r
}

/// `redux.sync.min.u32` / `redux.sync.max.u32` over the full warp.
#[inline(always)]
fn redux_min(v: u32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("redux.sync.min.u32 {0}, {1}, 0xffffffff;", out(reg32) r, in(reg32) v, options(nostack))
    };
    r
}

#[inline(always)]
fn redux_max(v: u32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("redux.sync.max.u32 {0}, {1}, 0xffffffff;", out(reg32) r, in(reg32) v, options(nostack))
    };
    r
}

#[inline(always)]
fn redux_add(v: u32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("redux.sync.add.u32 {0}, {1}, 0xffffffff;", out(reg32) r, in(reg32) v, options(nostack))
    };
    r
}

#[inline(always)]
unsafe fn atom_shared_add(p: *mut u32, v: u32) {
    core::arch::asm!("red.shared.add.u32 [{0}], {1};", in(reg64) cvta_to_shared(p), in(reg32) v, options(nostack));
}

#[inline(always)]
fn cvta_to_shared(p: *mut u32) -> u64 {
    let r: u64;
    unsafe {
        core::arch::asm!("cvta.to.shared.u64 {0}, {1};", out(reg64) r, in(reg64) p, options(pure, nomem, nostack))
    };
    r
}

/// Block-wide exclusive prefix sum of one u32 per thread (ROUTE_THREADS threads), its total, and the total of a
/// second value `w`; `scan` is 16 words of shared memory. Every thread must call it (two barriers).
#[inline(always)]
unsafe fn block_scan2(v: u32, w: u32, scan: *mut u32) -> (u32, u32, u32) {
    let tid = thread_x() as usize;
    let (warp, lane) = (tid / 32, tid % 32);
    let mut x = v;
    let mut d = 1;
    while d < 32 {
        let y = shfl_up_u32(x, d);
        if lane as u32 >= d {
            x += y;
        }
        d <<= 1;
    }
    let ws = redux_add(w);
    if lane == 31 {
        *scan.add(warp) = x;
    }
    if lane == 0 {
        *scan.add(8 + warp) = ws;
    }
    sync_threads();
    let (mut before, mut total, mut wtotal) = (0, 0, 0);
    unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
        let t = *scan.add(j);
        if j < warp {
            before += t;
        }
        total += t;
        wtotal += *scan.add(8 + j);
    });
    sync_threads();
    (before + x - v, total, wtotal)
}

/// The last CTA's top-k: among the `n` scores at `scores` (global, written by the CTAs of this launch, read with
/// `ld.global.cg`), selects the `k` best (rule in the module docs; all `n` when `k >= n`) and writes `map(i)` for
/// the selected `i` in ascending `i` to `out[0..]`, then `u32::MAX` up to `out_len`. Returns the number of scores
/// that are -inf or NaN.
///
/// `hist` (global, [`ROUTE_HIST_BINS`] words) holds the first-level histogram of the scores' order keys (their top
/// [`ROUTE_HIST_BITS`] bits), counted by the scoring CTAs; it is read and reset to zero here. One block scan over
/// it finds the bin of the k-th key; if that bin is not taken whole, radix passes of 8 bits over the keys of that
/// bin (bits 19-12, 11-4, 3-0; a 256-bin shared histogram each, one barrier per pass) resolve the threshold. A
/// histogram whose total is not `n` (impossible unless a launch was cut short) falls back to 4 passes over all
/// the keys. Then an ordered compaction by warp ballots (each warp a contiguous segment: a counting pass, one
/// barrier, a writing pass). `map_loads`: `map` reads memory (then the indices are written first and mapped in a
/// parallel pass). Shared memory: `route_select_smem(n)`. Every thread of the CTA must call it.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn select_top_k(
    scores: *const f32,
    n: usize,
    k: usize,
    hist_g: *mut u32,
    out: *mut u32,
    out_len: usize,
    map_loads: bool,
    map: impl Fn(usize) -> u32,
) -> u32 {
    let tid = thread_x() as usize;
    let nt = ROUTE_THREADS;
    let lane = (tid % 32) as u32;
    let keys = dyn_smem_ptr::<u32>();
    // One 256-bin histogram per refinement pass, all zeroed here (the barriers of the block scan order the
    // zeroing before any count), so that a pass needs a single barrier.
    let hist = keys.add(n);
    let scan = hist.add(1024);
    unroll!(u in [0, 1, 2, 3] {
        *hist.add(u * nt + tid) = 0;
    });
    // First-level counts: thread t owns the 16 bins 4095 - 16 t down to 4080 - 16 t (thread 0 the highest), read
    // and reset in 4 + 4 16-byte accesses.
    let hb = hist_g.add(ROUTE_HIST_BINS - 16 * (tid + 1));
    let mut c = [0u32; 16];
    unroll!(j in [0, 1, 2, 3] {
        let v = ld_cg_v4_u32(hb.add(4 * j));
        c[4 * j] = v[0];
        c[4 * j + 1] = v[1];
        c[4 * j + 2] = v[2];
        c[4 * j + 3] = v[3];
    });
    unroll!(j in [0, 1, 2, 3] {
        st_v4_u32(hb.add(4 * j), [0; 4]);
    });
    let mut lost = 0u32;
    // Eight independent loads in flight per thread (the scores sit in L2): one round trip up to 2048 scores.
    let mut i0 = 0;
    while i0 < n {
        let mut v = [0f32; 8];
        unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
            let i = i0 + u * nt + tid;
            v[u] = if i < n { ld_cg_f32(scores.add(i)) } else { 0.0 };
        });
        unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
            let i = i0 + u * nt + tid;
            if i < n {
                let key = order_key(v[u]);
                *keys.add(i) = key;
                lost += (key <= NEG_INF_KEY) as u32;
            }
        });
        i0 += 8 * nt;
    }
    let mut s = 0u32;
    unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
        s += c[j];
    });
    let (excl, total, lost) = block_scan2(s, lost, scan);
    // Threshold: the masked key `thr` (bits `mask`) and how many candidates whose masked key equals it are taken
    // (the lowest indices); candidates with a larger masked key are all taken.
    let (mut thr, mut mask, mut need) = (0u32, u32::MAX, 0u32);
    if k == 0 {
        thr = u32::MAX;
    } else if k < n {
        let kk0 = k as u32;
        // The bin of the kk0-th key: found by the one thread whose bins hold it, broadcast through `scan`.
        if total as usize == n && excl < kk0 && kk0 <= excl + s {
            let (mut cum, mut found) = (excl, false);
            let (mut b, mut kb, mut cb) = (0u32, 0u32, 0u32);
            unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                let cj = c[15 - j];
                if !found && cum + cj >= kk0 {
                    found = true;
                    b = (ROUTE_HIST_BINS - 1 - 16 * tid - j) as u32;
                    kb = kk0 - cum;
                    cb = cj;
                }
                cum += cj;
            });
            let _ = (cum, found);
            *scan.add(20) = b;
            *scan.add(21) = kb;
            *scan.add(22) = cb;
        }
        sync_threads();
        let top = 32 - ROUTE_HIST_BITS as u32;
        let (mut prefix, mut kk, mut shift, mut whole) = if total as usize == n {
            let (b, kb, cb) = (*scan.add(20), *scan.add(21), *scan.add(22));
            (b << top, kb, top as i32 - 8, kb == cb)
        } else {
            (0, kk0, 24, false)
        };
        mask = if total as usize == n { !0u32 << top } else { 0 };
        let mut pass = 0;
        while !whole && shift >= 0 {
            let sh = shift as u32;
            let hist = hist.add(256 * pass);
            // Counts: a warp whose active lanes share one bin (equal scores, a narrow bin) adds once, through its
            // first active lane; otherwise each active lane adds (the bins of a refinement pass are spread).
            let mut i = tid;
            while i - (lane as usize) < n {
                let key = if i < n { *keys.add(i) } else { 0 };
                let active = i < n && key & mask == prefix;
                let bin = (key >> sh) & 255;
                let act = ballot(active);
                if act != 0 {
                    let lo = redux_min(if active { bin } else { u32::MAX });
                    let hi = redux_max(if active { bin } else { 0 });
                    if lo == hi {
                        if lane == act.trailing_zeros() {
                            atom_shared_add(hist.add(bin as usize), act.count_ones());
                        }
                    } else if active {
                        atom_shared_add(hist.add(bin as usize), 1);
                    }
                }
                i += nt;
            }
            sync_threads();
            // Every warp finds the threshold bin itself (the same result in each: no hand-off, no barrier).
            // Lane l owns bins 255 - 8l down to 248 - 8l; counts are accumulated from the top bin down.
            let top = 255 - 8 * lane as usize;
            let mut c = [0u32; 8];
            unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
                c[j] = *hist.add(top - j);
            });
            let s = c[0] + c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7];
            let mut incl = s;
            let mut d = 1;
            while d < 32 {
                let y = shfl_up_u32(incl, d);
                if lane >= d {
                    incl += y;
                }
                d <<= 1;
            }
            let excl = incl - s;
            // The lane whose range holds the kk-th key (exactly one) finds the bin, then broadcasts.
            let (mut bl, mut kl, mut wl) = (0u32, 0u32, 0u32);
            if excl < kk && kk <= incl {
                let mut cum = excl;
                let mut j = 0;
                while j < 8 {
                    if cum + c[j] >= kk {
                        bl = (top - j) as u32;
                        kl = kk - cum;
                        // Every candidate of the bin is taken: the lower bits need not be resolved.
                        wl = (cum + c[j] == kk) as u32;
                        break;
                    }
                    cum += c[j];
                    j += 1;
                }
            }
            let src = ballot(excl < kk && kk <= incl).trailing_zeros();
            let b = shfl_idx_u32(bl, src);
            kk = shfl_idx_u32(kl, src);
            whole = shfl_idx_u32(wl, src) != 0;
            prefix |= b << sh;
            mask |= 255 << sh;
            pass += 1;
            shift = if shift >= 8 {
                shift - 8
            } else if shift > 0 {
                0
            } else {
                -1
            };
        }
        thr = prefix;
        need = kk;
    }
    // Ordered compaction by warp ballots: warp w owns the candidates [w * seg, (w + 1) * seg) (seg a multiple of
    // 32, read lane-strided: no bank conflicts); a counting pass, one exchange of the 8 warps' counts, a writing
    // pass. Taken: masked key > thr, or == thr among the first `need` of those (in index order).
    let (warp, lane) = (tid / 32, tid % 32);
    let nw = nt / 32;
    let seg = n.div_ceil(nw * 32) * 32;
    let w_lo = (warp * seg).min(n);
    let w_hi = (w_lo + seg).min(n);
    let (mut gt_n, mut eq_n) = (0u32, 0u32);
    let mut i0 = w_lo;
    while i0 < w_hi {
        let i = i0 + lane;
        let key = if i < w_hi { *keys.add(i) & mask } else { 0 };
        gt_n += ballot(i < w_hi && key > thr).count_ones();
        eq_n += ballot(i < w_hi && key == thr).count_ones();
        i0 += 32;
    }
    if lane == 0 {
        *scan.add(2 * warp) = gt_n;
        *scan.add(2 * warp + 1) = eq_n;
    }
    sync_threads();
    // eq_before / at: the tied / taken candidates of the warps before this one; eq_run: of the warps before w.
    let (mut eq_before, mut at, mut total, mut eq_run) = (0u32, 0u32, 0u32, 0u32);
    let mut w = 0;
    while w < nw {
        let (g, e) = (*scan.add(2 * w), *scan.add(2 * w + 1));
        let left = need.saturating_sub(eq_run);
        let taken = g + if e < left { e } else { left };
        if w < warp {
            at += taken;
            eq_before += e;
        }
        total += taken;
        eq_run += e;
        w += 1;
    }
    let lt = lanemask_lt();
    let mut i0 = w_lo;
    while i0 < w_hi {
        let i = i0 + lane;
        let key = if i < w_hi { *keys.add(i) & mask } else { 0 };
        let eqb = ballot(i < w_hi && key == thr);
        let rank = eq_before + (eqb & lt).count_ones();
        let take = i < w_hi && (key > thr || (key == thr && rank < need));
        let tb = ballot(take);
        if take {
            *out.add((at + (tb & lt).count_ones()) as usize) = if map_loads { i as u32 } else { map(i) };
        }
        at += tb.count_ones();
        eq_before += eqb.count_ones();
        i0 += 32;
    }
    if map_loads {
        // A map that loads: the candidate indices were written first; here every thread maps up to 4 of them at
        // a time (independent loads), not a chain of load-then-store per candidate in one warp. The CTA's global
        // writes are visible to its threads after the barrier.
        sync_threads();
        let mut j0 = 0;
        while j0 < total as usize {
            let mut v = [0u32; 4];
            unroll!(u in [0, 1, 2, 3] {
                let j = j0 + u * nt + tid;
                if j < total as usize {
                    v[u] = ld_cg_u32(out.add(j));
                }
            });
            unroll!(u in [0, 1, 2, 3] {
                let j = j0 + u * nt + tid;
                if j < total as usize {
                    v[u] = map(v[u] as usize);
                }
            });
            unroll!(u in [0, 1, 2, 3] {
                let j = j0 + u * nt + tid;
                if j < total as usize {
                    *out.add(j) = v[u];
                }
            });
            j0 += 4 * nt;
        }
    }
    let mut i = total as usize + tid;
    while i < out_len {
        *out.add(i) = u32::MAX;
        i += nt;
    }
    lost
}

/// [`last_block_arrives`] for the CTAs of one KV head (grid.x of them); `flag` is a word of shared memory.
#[inline(always)]
pub(crate) unsafe fn last_of_head(counter: *mut u32, ctas: u32) -> bool {
    let flag = dyn_smem_ptr::<u32>();
    let last = last_block_arrives(counter, ctas, flag);
    sync_threads(); // every thread has read the flag before shared memory is reused
    last
}
