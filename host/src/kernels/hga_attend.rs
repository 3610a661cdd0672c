//! Launchers of the routed-attention kernels (gpu-kernels/src/hga/attend/): `hga_attend_decode_s{2,3}` (a few query
//! tokens, split-K over the attention entry list) and `hga_attend_prefill` (a block of up to 64 query tokens routed
//! jointly), each followed by the dense decode's merge of the split partials (`hga_attention_merge_v2` by default)
//! into out bf16 [tokens, n_heads, 128] and the LSE f32 [tokens, n_heads] (natural log), in the
//! [`DecodeWorkspace`] of the dense decode.
//!
//! Buffers (formats of `gpu_kernels::params::hga`): q bf16 [tokens, n_heads, 128]; the layer's slot pool bf16
//! [n_slots][2][16][128]; entry_slot / entry_pos u32 [n_kv_heads][max_entries]; n_entries u32 [n_kv_heads];
//! pos_dev u32 [1] (the position of query token 0). The entry count and the position are read on the device, and
//! the launch shape depends only on the [`RoutedShape`] and the split: one recorded launch (a CUDA graph) serves
//! every step. What cannot be checked here (device-resident data) the kernels clamp: n_entries to max_entries, a
//! slot index to n_slots - 1. The caller guarantees that every query sees at least one listed key (the sink group
//! at position 0 does), that listed entries are disjoint groups, and that pos + tokens < 2^32.
use super::attention::{DecodeWorkspace, MergeKernel};
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::params::{
    hga_attend_decode_smem, AttentionParams, HgaAttendParams, HGA_ATTEND_DECODE_STAGES, HGA_ATTEND_ENTRIES_PER_TILE,
    HGA_ATTEND_PREFILL_MAX_TOKENS, HGA_ATTEND_PREFILL_ROWS, HGA_ATTEND_PREFILL_SMEM, HGA_GROUP, HGA_HEAD_DIM,
};
use half::bf16;

/// Shapes of one routed-attention call (all KV heads of one layer).
#[derive(Clone, Copy, Debug)]
pub struct RoutedShape {
    /// Query tokens (consecutive positions pos .. pos + tokens - 1); prefill: at most 64.
    pub tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Group blocks in the layer's slot pool.
    pub n_slots: usize,
    /// Capacity of each KV head's entry list (the launch shape is fixed by it).
    pub max_entries: usize,
}

/// Which routed kernel a call launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutedKernel {
    /// `hga_attend_decode_s{N}` with the deepest ring (N in 2, 3) that the device's shared memory allows.
    DecodeAuto,
    /// `hga_attend_decode_s{N}`, N in `HGA_ATTEND_DECODE_STAGES` (2, 3).
    Decode(usize),
    /// `hga_attend_prefill` (64 query rows per CTA).
    Prefill,
}

impl RoutedKernel {
    /// (entry point, dynamic shared memory, query rows per CTA); `DecodeAuto` resolved for `smem_optin` bytes.
    fn entry(self, smem_optin: usize) -> Result<(&'static str, usize, usize), RuntimeError> {
        match self {
            RoutedKernel::DecodeAuto => {
                let n = if hga_attend_decode_smem(3) <= smem_optin { 3 } else { 2 };
                RoutedKernel::Decode(n).entry(smem_optin)
            }
            RoutedKernel::Decode(2) => Ok(("hga_attend_decode_s2", hga_attend_decode_smem(2), 16)),
            RoutedKernel::Decode(3) => Ok(("hga_attend_decode_s3", hga_attend_decode_smem(3), 16)),
            RoutedKernel::Prefill => Ok(("hga_attend_prefill", HGA_ATTEND_PREFILL_SMEM, HGA_ATTEND_PREFILL_ROWS)),
            k => Err(RuntimeError::Shape(format!(
                "hga_attend: no kernel {k:?} (decode stages: {HGA_ATTEND_DECODE_STAGES:?})"
            ))),
        }
    }
}

/// The choices of one routed launch besides its buffers.
#[derive(Clone, Copy, Debug)]
pub struct RoutedCall {
    pub kernel: RoutedKernel,
    pub merge: MergeKernel,
    /// Tiles of 4 entries per split; None: [`routed_splits`]' default.
    pub tiles_per_split: Option<usize>,
    /// Launch the routed kernel only, not the merge (for timing the two apart; `out` and `lse` are not written).
    pub partials_only: bool,
    /// Device addresses of (out_q u8 [rows][128], out_scale f32 [rows]): the merge also writes the FP8 (e4m3)
    /// quantization of `out`, exactly as `hga_fp8_quant` would ([`hga_attend_decode_quant`] checks them).
    pub quant: Option<(u64, u64)>,
}

impl RoutedCall {
    /// The default decode call (deepest ring, merge v2, default split).
    pub const DECODE: RoutedCall = RoutedCall {
        kernel: RoutedKernel::DecodeAuto,
        merge: MergeKernel::V2,
        tiles_per_split: None,
        partials_only: false,
        quant: None,
    };
    /// The default prefill call.
    pub const PREFILL: RoutedCall = RoutedCall {
        kernel: RoutedKernel::Prefill,
        merge: MergeKernel::V2,
        tiles_per_split: None,
        partials_only: false,
        quant: None,
    };
}

/// CTAs of one split: KV heads x groups of `rows_per_cta` query rows.
fn base_ctas(s: &RoutedShape, rows_per_cta: usize) -> usize {
    let g = s.n_heads / s.n_kv_heads.max(1);
    (s.n_kv_heads * (s.tokens * g).div_ceil(rows_per_cta)).max(1)
}

/// The default split of a routed call: (n_splits, tiles of 4 entries per split). Aims at one decode CTA per SM
/// (`sms`), as the dense decode (each CTA's tiles are requested at once while its ring allows), or two prefill
/// CTAs per SM; at most `max_splits` splits, every split non-empty when the list is full. Depends only on the
/// shape: fixed for a given max_entries. Measured on an H200 (docs/perf-hga.md): Qwen3-30B decode at 2K tokens
/// per KV head (128 entries, 4 KV heads): 32 splits of 1 tile (128 CTAs) 7.48 us, 16 of 2 tiles 7.39, 8 of 4
/// tiles 8.66; the 64-token prefill block: 8 splits of 4 tiles (256 CTAs) 26.2 us, 5 of 7 tiles 31.0, 16 of 2
/// tiles 33.7.
pub fn routed_splits(sms: usize, s: &RoutedShape, rows_per_cta: usize, max_splits: usize) -> (usize, usize) {
    let tiles = s.max_entries.div_ceil(HGA_ATTEND_ENTRIES_PER_TILE).max(1);
    // Prefill CTAs (200 registers, 80 KB) fit two per SM, and two per SM measured fastest (module docs).
    let per_sm = if rows_per_cta == HGA_ATTEND_PREFILL_ROWS { 2 } else { 1 };
    let want = (per_sm * sms.max(1)).div_ceil(base_ctas(s, rows_per_cta)).clamp(1, tiles.min(max_splits.max(1)));
    let tps = tiles.div_ceil(want);
    (tiles.div_ceil(tps), tps)
}

/// Routed decode attention (default kernel, merge v2 and split); returns the number of splits.
#[allow(clippy::too_many_arguments)]
pub fn hga_attend_decode(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    pool: &impl DevicePtr<bf16>,
    entry_slot: &impl DevicePtr<u32>,
    entry_pos: &impl DevicePtr<u32>,
    n_entries: &impl DevicePtr<u32>,
    pos_dev: &impl DevicePtr<u32>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &RoutedShape,
) -> Result<usize, RuntimeError> {
    hga_attend(gpu, RoutedCall::DECODE, q, pool, entry_slot, entry_pos, n_entries, pos_dev, ws, out, lse, s)
}

/// [`hga_attend_decode`] whose merge also writes the FP8 (e4m3) quantization of `out` for the next FP8 linear:
/// `out_q: u8 [n_heads][128]`, `out_scale: f32 [n_heads]` (one scale per row of 128), the values `hga_fp8_quant`
/// gives, bit for bit, one launch fewer.
#[allow(clippy::too_many_arguments)]
pub fn hga_attend_decode_quant(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    pool: &impl DevicePtr<bf16>,
    entry_slot: &impl DevicePtr<u32>,
    entry_pos: &impl DevicePtr<u32>,
    n_entries: &impl DevicePtr<u32>,
    pos_dev: &impl DevicePtr<u32>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    out_q: &mut impl DevicePtrMut<u8>,
    out_scale: &mut impl DevicePtrMut<f32>,
    s: &RoutedShape,
) -> Result<usize, RuntimeError> {
    let rows = s.tokens * s.n_heads;
    check_len("hga_attend out_q", out_q.len(), rows * HGA_HEAD_DIM)?;
    check_len("hga_attend out_scale", out_scale.len(), rows)?;
    let (pq, _g0) = dptr_mut(gpu, out_q);
    let (ps, _g1) = dptr_mut(gpu, out_scale);
    let call = RoutedCall { quant: Some((pq, ps)), ..RoutedCall::DECODE };
    hga_attend(gpu, call, q, pool, entry_slot, entry_pos, n_entries, pos_dev, ws, out, lse, s)
}

/// Routed attention of a prefill block of up to 64 query tokens sharing one entry list per KV head (default
/// split, merge v2); returns the number of splits.
#[allow(clippy::too_many_arguments)]
pub fn hga_attend_prefill(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    pool: &impl DevicePtr<bf16>,
    entry_slot: &impl DevicePtr<u32>,
    entry_pos: &impl DevicePtr<u32>,
    n_entries: &impl DevicePtr<u32>,
    pos_dev: &impl DevicePtr<u32>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &RoutedShape,
) -> Result<usize, RuntimeError> {
    hga_attend(gpu, RoutedCall::PREFILL, q, pool, entry_slot, entry_pos, n_entries, pos_dev, ws, out, lse, s)
}

/// Routed attention with a chosen kernel, merge and split (for tests and benchmarks): the routed kernel writes
/// the split partials into `ws`, the merge combines them into `out` and `lse`. Returns the number of splits.
#[allow(clippy::too_many_arguments)]
pub fn hga_attend(
    gpu: &Gpu,
    call: RoutedCall,
    q: &impl DevicePtr<bf16>,
    pool: &impl DevicePtr<bf16>,
    entry_slot: &impl DevicePtr<u32>,
    entry_pos: &impl DevicePtr<u32>,
    n_entries: &impl DevicePtr<u32>,
    pos_dev: &impl DevicePtr<u32>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &RoutedShape,
) -> Result<usize, RuntimeError> {
    let bad = |m: String| Err(RuntimeError::Shape(format!("hga_attend: {m}")));
    if s.n_heads == 0 || s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return bad(format!("n_heads {} must be a positive multiple of n_kv_heads {}", s.n_heads, s.n_kv_heads));
    }
    if s.tokens == 0 || s.n_slots == 0 || s.max_entries == 0 {
        return bad(format!("tokens {}, n_slots {}, max_entries {} must be >= 1", s.tokens, s.n_slots, s.max_entries));
    }
    if call.kernel == RoutedKernel::Prefill && s.tokens > HGA_ATTEND_PREFILL_MAX_TOKENS {
        return bad(format!("a prefill block has at most {HGA_ATTEND_PREFILL_MAX_TOKENS} tokens, got {}", s.tokens));
    }
    let d = HGA_HEAD_DIM;
    let rows = s.tokens * s.n_heads;
    check_len("hga_attend q", q.len(), rows * d)?;
    check_len("hga_attend out", out.len(), rows * d)?;
    check_len("hga_attend lse", lse.len(), rows)?;
    let pool_len = s.n_slots.checked_mul(2 * HGA_GROUP * d);
    let pool_len = pool_len.ok_or_else(|| RuntimeError::Shape("hga_attend: pool size overflows".into()))?;
    check_len("hga_attend pool", pool.len(), pool_len)?;
    check_len("hga_attend entry_slot", entry_slot.len(), s.n_kv_heads * s.max_entries)?;
    check_len("hga_attend entry_pos", entry_pos.len(), s.n_kv_heads * s.max_entries)?;
    check_len("hga_attend n_entries", n_entries.len(), s.n_kv_heads)?;
    check_len("hga_attend pos_dev", pos_dev.len(), 1)?;
    dim_u32("hga_attend n_slots", s.n_slots)?;
    dim_u32("hga_attend n_kv_heads * max_entries", s.n_kv_heads * s.max_entries)?;
    dim_u32("hga_attend tokens * n_heads", rows)?;
    if rows > ws.rows {
        return bad(format!("workspace holds {} query rows, call has {rows}", ws.rows));
    }
    let (name, smem, rows_per_cta) = call.kernel.entry(gpu.smem_per_block_optin())?;
    if smem > gpu.smem_per_block_optin() {
        return bad(format!(
            "{name} needs {smem} bytes of shared memory, the device allows {}",
            gpu.smem_per_block_optin()
        ));
    }
    let (n_splits, tps) = match call.tiles_per_split {
        None => routed_splits(gpu.sm_count(), s, rows_per_cta, ws.max_splits),
        Some(t) => {
            let tiles = s.max_entries.div_ceil(HGA_ATTEND_ENTRIES_PER_TILE);
            let t = t.max(1);
            (tiles.div_ceil(t), t)
        }
    };
    if n_splits > ws.max_splits {
        return bad(format!("{n_splits} splits, the workspace holds {}", ws.max_splits));
    }
    let (pq, _g1) = dptr(gpu, q);
    let (pp, _g2) = dptr(gpu, pool);
    let (ps, _g3) = dptr(gpu, entry_slot);
    let (pe, _g4) = dptr(gpu, entry_pos);
    let (pn, _g5) = dptr(gpu, n_entries);
    let (pd, _g6) = dptr(gpu, pos_dev);
    let (po, _g7) = dptr_mut(gpu, out);
    let (pl, _g8) = dptr_mut(gpu, lse);
    let (ppo, _g9) = dptr_mut(gpu, &mut ws.part_o);
    let (ppl, _g10) = dptr_mut(gpu, &mut ws.part_lse);
    let p = HgaAttendParams {
        q: pq,
        pool: pp,
        entry_slot: ps,
        entry_pos: pe,
        n_entries: pn,
        pos_dev: pd,
        part_o: ppo,
        part_lse: ppl,
        tokens: s.tokens as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        n_slots: s.n_slots as u32,
        max_entries: s.max_entries as u32,
        tiles_per_split: tps as u32,
        n_splits: n_splits as u32,
        pos: 0,
        scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
        _pad: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (n_splits as u32, base_ctas(s, rows_per_cta) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: lengths checked above; the kernel reads entries < min(n_entries, max_entries) of each list, slots
    // clamped to n_slots - 1, q rows < tokens * n_heads, and writes n_splits <= max_splits partial slots of
    // tokens * n_heads <= ws.rows rows.
    unsafe { launch(gpu, name, cfg, p)? };
    if call.partials_only {
        return Ok(n_splits);
    }
    let mp = AttentionParams {
        q: 0,
        k_cache: 0,
        v_cache: 0,
        out: po,
        lse: pl,
        part_o: ppo,
        part_lse: ppl,
        start_dev: 0,
        out_q: call.quant.map_or(0, |q| q.0),
        out_scale: call.quant.map_or(0, |q| q.1),
        tokens: s.tokens as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        capacity: 0,
        start: 0,
        n_splits: n_splits as u32,
        tiles_per_split: tps as u32,
        scale_log2: p.scale_log2,
    };
    let (merge, cfg) = call.merge.launch_config(rows, n_splits);
    // SAFETY: the merge reads the n_splits partials of tokens * n_heads rows the routed kernel wrote (same stream)
    // and writes out / lse, whose lengths were checked.
    unsafe { launch(gpu, merge, cfg, mp)? };
    Ok(n_splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_splits_are_fixed_by_the_shape() {
        let at = |tokens: usize, max_entries: usize| RoutedShape {
            tokens,
            n_heads: 32,
            n_kv_heads: 4,
            n_slots: 1000,
            max_entries,
        };
        assert_eq!(routed_splits(132, &at(1, 128), 16, 256), (32, 1)); // 2K tokens per KV head: 128 CTAs
        assert_eq!(routed_splits(132, &at(1, 4096), 16, 256), (32, 32)); // 64K: one CTA per SM
        assert_eq!(routed_splits(132, &at(1, 1), 16, 256), (1, 1));
        assert_eq!(routed_splits(132, &at(1, 4096), 16, 8), (8, 128)); // the workspace's limit
        assert_eq!(routed_splits(132, &at(64, 128), 64, 256), (8, 4)); // prefill: 32 CTAs per split, 2 per SM
        assert_eq!(RoutedKernel::DecodeAuto.entry(232_448).unwrap().0, "hga_attend_decode_s3");
        assert_eq!(RoutedKernel::DecodeAuto.entry(70_000).unwrap().0, "hga_attend_decode_s2");
        assert!(RoutedKernel::Decode(4).entry(232_448).is_err());
    }
}
