//! Routed-attention benchmark rows (Qwen3-30B-A3B: 32 query heads on 4 KV heads, head_dim 128), all inside CUDA
//! graphs (device time, `time_graph_ms`), each against anchors measured in the same run:
//! - the copy bandwidth of a 256 MiB device-to-device copy (bytes read + written), which gives the bytes floor of
//!   the routed decode (the listed group blocks, K + V, read once);
//! - the dense decode (`hga_attention_decode_upto`: v3 ring + merge v2) at 64K context.
//!
//! Routed decode: one layer, every KV head's list of 128 entries = 2048 tokens at position 65535 (64K context):
//! the sink (groups 0..3, 64 tokens), the local window (the last 16 groups, 256 tokens) and 108 selected groups
//! (1728 tokens) drawn at random, in random order, each in a random slot of the pool. 24 pools' worth of slots
//! (96 MiB, past the L2) with one entry list each; graph replay i uses list i mod 24, so every replay reads group
//! blocks that are not in L2. Rows: the default kernel and split, then the variants (ring depth, tiles per split,
//! merge kernel, a list capacity above the list length as a recorded step with a fixed budget has).
//! Routed prefill: a block of 64 query tokens at positions 65472..65535 over the same lists (the window holds the
//! block), against the dense prefill of the same 64 queries over the 64K context.
use crate::common::{rand_bf16, time_graph_ms, time_ms};
use half::bf16;
use hga::kernels::attention::{hga_attention_decode_upto, AttentionShape, DecodeWorkspace, MergeKernel};
use hga::kernels::hga_attend::{hga_attend, RoutedCall, RoutedKernel, RoutedShape};
use hga::runtime::Gpu;

const NH: usize = 32;
const NKV: usize = 4;
const D: usize = 128;
const GROUP: usize = 16;
const CTX: usize = 65536;
const ENTRIES: usize = 128;
const SETS: usize = 24;

/// Entry lists of one benchmark: per set, entry_slot [NKV][max_entries]; shared entry_pos and n_entries.
fn lists(max_entries: usize, seed: u64) -> (Vec<Vec<u32>>, Vec<u32>, Vec<u32>) {
    let mut s = seed | 1;
    let mut next = move |n: usize| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % n as u64) as usize
    };
    let n_groups = CTX / GROUP;
    let mut pos = vec![0u32; NKV * max_entries];
    for h in 0..NKV {
        // Sink 4 groups, window 16 groups, 108 selected among the rest.
        let mut gs: Vec<usize> = (0..4).chain(n_groups - 16..n_groups).collect();
        while gs.len() < ENTRIES {
            let g = 4 + next(n_groups - 20);
            if !gs.contains(&g) {
                gs.push(g);
            }
        }
        for i in (1..gs.len()).rev() {
            gs.swap(i, next(i + 1));
        }
        for (e, g) in gs.iter().enumerate() {
            pos[h * max_entries + e] = (g * GROUP) as u32;
        }
    }
    let per_set = NKV * ENTRIES;
    let slots = (0..SETS)
        .map(|set| {
            let mut perm: Vec<usize> = (0..per_set).collect();
            for i in (1..per_set).rev() {
                perm.swap(i, next(i + 1));
            }
            let mut sl = vec![0u32; NKV * max_entries];
            for h in 0..NKV {
                for e in 0..ENTRIES {
                    sl[h * max_entries + e] = (set * per_set + perm[h * ENTRIES + e]) as u32;
                }
            }
            sl
        })
        .collect();
    (slots, pos, vec![ENTRIES as u32; NKV])
}

pub fn run(gpu: &Gpu) {
    let s = gpu.stream().clone();
    let n_copy = 128 << 20; // bf16 elements: 256 MiB
    let src = s.clone_htod(&rand_bf16(n_copy, 1, 1.0)).unwrap();
    let mut dst = s.alloc_zeros::<bf16>(n_copy).unwrap();
    let ms = time_ms(gpu, 30, 1, |_| s.memcpy_dtod(&src, &mut dst).unwrap());
    let copy_gbs = 2.0 * (n_copy * 2) as f64 / ms / 1e6;
    drop((src, dst));
    println!("RESULT copy 256MiB {:.3} us {copy_gbs:.1} GB/s", ms * 1e3);

    // Anchor: dense decode at 64K (device start, as a recorded step launches it).
    let dense_us = {
        let cache = NKV * CTX * D;
        let sets = 2;
        let ks: Vec<_> = (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 100 + i as u64, 1.0)).unwrap()).collect();
        let vs: Vec<_> = (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 200 + i as u64, 1.0)).unwrap()).collect();
        let q = s.clone_htod(&rand_bf16(NH * D, 7, 1.0)).unwrap();
        let mut out = s.alloc_zeros::<bf16>(NH * D).unwrap();
        let mut lse = s.alloc_zeros::<f32>(NH).unwrap();
        let start = s.clone_htod(&[(CTX - 1) as u32]).unwrap();
        let mut ws = DecodeWorkspace::new(gpu, 1, NH, 256).unwrap();
        let shape = AttentionShape { tokens: 1, n_heads: NH, n_kv_heads: NKV, capacity: CTX, start: CTX - 1 };
        let mut splits = 0;
        let ms = time_graph_ms(gpu, 8, 20, |i| {
            let j = i % sets;
            splits = hga_attention_decode_upto(gpu, &q, &ks[j], &vs[j], &mut ws, &mut out, &mut lse, &shape, &start)
                .unwrap();
        });
        let bytes = 2 * cache * 2;
        println!(
            "RESULT dense_decode ctx=65536 {:.3} us {:.1} GB/s splits={splits} (floor {:.2} us)",
            ms * 1e3,
            bytes as f64 / ms / 1e6,
            bytes as f64 / copy_gbs / 1e3
        );
        ms * 1e3
    };

    // The pool: SETS x 4 KV heads x 128 group blocks of random K/V.
    let n_slots = SETS * NKV * ENTRIES;
    let pool = s.clone_htod(&rand_bf16(n_slots * 2 * GROUP * D, 300, 1.0)).unwrap();
    let bytes = NKV * ENTRIES * 2 * GROUP * D * 2;
    let floor_us = bytes as f64 / copy_gbs / 1e3;
    let pos_dev = s.clone_htod(&[(CTX - 1) as u32]).unwrap();
    let q = s.clone_htod(&rand_bf16(NH * D, 8, 1.0)).unwrap();
    let mut ws = DecodeWorkspace::new(gpu, 64, NH, 256).unwrap();
    let mut out = s.alloc_zeros::<bf16>(NH * D).unwrap();
    let mut lse = s.alloc_zeros::<f32>(NH).unwrap();
    println!(
        "routed decode: {ENTRIES} entries (2048 tokens) per KV head, {NKV} KV heads, {} KiB per step, floor {floor_us:.2} us",
        bytes / 1024
    );
    let dec = RoutedCall::DECODE;
    let variants: Vec<(&str, RoutedCall, usize)> = vec![
        ("default", dec, ENTRIES),
        ("s2", RoutedCall { kernel: RoutedKernel::Decode(2), ..dec }, ENTRIES),
        ("s3 2 tiles/split", RoutedCall { tiles_per_split: Some(2), ..dec }, ENTRIES),
        ("s3 4 tiles/split", RoutedCall { tiles_per_split: Some(4), ..dec }, ENTRIES),
        ("s3 8 tiles/split", RoutedCall { tiles_per_split: Some(8), ..dec }, ENTRIES),
        ("merge v1", RoutedCall { merge: MergeKernel::V1, ..dec }, ENTRIES),
        ("max_entries 160", dec, 160),
        ("max_entries 256", dec, 256),
        ("kernel alone", RoutedCall { partials_only: true, ..dec }, ENTRIES),
        ("2 tiles alone", RoutedCall { partials_only: true, tiles_per_split: Some(2), ..dec }, ENTRIES),
        ("empty lists", dec, 0),
    ];
    for (label, call, max_entries) in variants {
        // max_entries 0 here: the 128-entry lists with n_entries = 0 (every split empty: the fixed cost).
        let empty = max_entries == 0;
        let max_entries = if empty { ENTRIES } else { max_entries };
        let (slots, epos, ne) = lists(max_entries, 0x5eed + max_entries as u64);
        let ne = if empty { vec![0; NKV] } else { ne };
        let dslots: Vec<_> = slots.iter().map(|v| s.clone_htod(v).unwrap()).collect();
        let depos = s.clone_htod(&epos).unwrap();
        let dne = s.clone_htod(&ne).unwrap();
        let shape = RoutedShape { tokens: 1, n_heads: NH, n_kv_heads: NKV, n_slots, max_entries };
        let mut splits = 0;
        let ms = time_graph_ms(gpu, 2 * SETS, 20, |i| {
            let j = i % SETS;
            splits = hga_attend(
                gpu, call, &q, &pool, &dslots[j], &depos, &dne, &pos_dev, &mut ws, &mut out, &mut lse, &shape,
            )
            .unwrap();
        });
        let us = ms * 1e3;
        println!(
            "RESULT routed_decode {label:<18} {us:.3} us {:.1} GB/s {:.2}x floor ({floor_us:.2} us) {:.3}x dense64K ({dense_us:.2} us) splits={splits}",
            bytes as f64 / ms / 1e6,
            us / floor_us,
            us / dense_us
        );
    }

    // Prefill block of 64 tokens at the end of the 64K context, against the dense prefill of the same queries.
    {
        let tokens = 64;
        let (slots, epos, ne) = lists(ENTRIES, 0xb10c);
        let dslots: Vec<_> = slots.iter().map(|v| s.clone_htod(v).unwrap()).collect();
        let depos = s.clone_htod(&epos).unwrap();
        let dne = s.clone_htod(&ne).unwrap();
        let b0 = s.clone_htod(&[(CTX - tokens) as u32]).unwrap();
        let qp = s.clone_htod(&rand_bf16(tokens * NH * D, 9, 1.0)).unwrap();
        let mut op = s.alloc_zeros::<bf16>(tokens * NH * D).unwrap();
        let mut lp = s.alloc_zeros::<f32>(tokens * NH).unwrap();
        let shape = RoutedShape { tokens, n_heads: NH, n_kv_heads: NKV, n_slots, max_entries: ENTRIES };
        let flops = 4.0 * (tokens * NH * ENTRIES * GROUP * D) as f64;
        let mut best = f64::INFINITY;
        for tps in [None, Some(4), Some(2), Some(1)] {
            let call = RoutedCall { tiles_per_split: tps, ..RoutedCall::PREFILL };
            let mut splits = 0;
            let ms = time_graph_ms(gpu, SETS, 20, |i| {
                let j = i % SETS;
                splits =
                    hga_attend(gpu, call, &qp, &pool, &dslots[j], &depos, &dne, &b0, &mut ws, &mut op, &mut lp, &shape)
                        .unwrap();
            });
            best = best.min(ms);
            println!(
                "RESULT routed_prefill tokens=64 tiles/split={tps:?} {:.3} us {:.1} TFLOP/s splits={splits}",
                ms * 1e3,
                flops / ms / 1e9
            );
        }
        let ms = best;
        let cache = NKV * CTX * D;
        let kc = s.clone_htod(&rand_bf16(cache, 400, 1.0)).unwrap();
        let vc = s.clone_htod(&rand_bf16(cache, 401, 1.0)).unwrap();
        let ds = AttentionShape { tokens, n_heads: NH, n_kv_heads: NKV, capacity: CTX, start: CTX - tokens };
        let dms = time_graph_ms(gpu, 4, 10, |_| {
            hga::kernels::hga_attention_prefill(gpu, &qp, &kc, &vc, &mut op, &mut lp, &ds).unwrap();
        });
        println!(
            "RESULT routed_prefill best {:.3} us; dense prefill of the same 64 queries at 64K {:.3} us ({:.3}x)",
            ms * 1e3,
            dms * 1e3,
            ms / dms
        );
    }
}
