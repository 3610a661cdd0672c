//! GPU checks of the dense attention kernels against `reference::attention` (f64): fresh random q and cache,
//! the cache slots past the context poisoned with NaN (a read past the end shows), outputs poisoned.
//! Pass: rel-L2 of out <= 1e-2 (bf16 inputs and output) and |lse - ref| <= 1e-3 everywhere; NaN never passes.
//! Decode paths run the decode kernel and the merge (`hga_attention_decode_v3_s3`, `hga_attention_merge_v2`) with
//! the split partials poisoned too; the device-start path also checks the merge's fused FP8 quantization bit for
//! bit against `hga_fp8_quant` of the bf16 output, and the decode path `hga_attention_merge_v2` bit for bit against
//! `hga_attention_merge` (the routed attention's bench compares with it) on the same partials.
use super::{poison_bf16, Outcome};
use crate::kernels::attention::{
    decode_kernel_auto, hga_attention_decode_kernel, hga_attention_decode_upto_quant, hga_attention_prefill,
    AttentionShape, DecodeWorkspace, MergeKernel,
};
use crate::kernels::hga_fp8_quant;
use crate::runtime::{Gpu, RuntimeError};
use half::bf16;
use rand::Rng;

/// Which kernel path to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Prefill,
    Decode,
    /// Decode as a recorded (CUDA graph) step launches it: `start` read from the device, the split sized for a
    /// random context bound between the real context and the capacity, so trailing splits are empty.
    DecodeUpTo,
}

/// Random q [tokens, n_heads, 128] and a cache of `capacity` slots whose first `start + tokens` hold random
/// values (magnitude drawn per case, so softmaxes range from flat to peaked) and the rest NaN.
fn inputs(s: &AttentionShape, rng: &mut impl Rng) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>, bool) {
    const D: usize = 128;
    let a = rng.gen_range(0.3f32..2.5);
    // Now and then keys grow along the context (up to 5x), so the running max keeps rising and the kernels'
    // rescaling path is exercised well past the first tile.
    let growth = if rng.gen_ratio(1, 3) { 4.0 } else { 0.0 };
    let q = super::bf16_vec(s.tokens * s.n_heads * D, -a, a, rng);
    let mut k = poison_bf16(s.n_kv_heads * s.capacity * D);
    let mut v = poison_bf16(s.n_kv_heads * s.capacity * D);
    for h in 0..s.n_kv_heads {
        for j in 0..s.ctx() {
            let o = (h * s.capacity + j) * D;
            let ka = a * (1.0 + growth * j as f32 / s.ctx() as f32);
            for d in 0..D {
                k[o + d] = bf16::from_f32(rng.gen_range(-ka..ka));
                v[o + d] = bf16::from_f32(rng.gen_range(-1.0f32..1.0));
            }
        }
    }
    (q, k, v, growth > 0.0)
}

/// Compares (out, lse) with the f64 reference.
fn judge(out: &[bf16], lse: &[f32], want: &(Vec<f64>, Vec<f64>), n_heads: usize) -> (f64, Option<String>) {
    let (wo, wl) = want;
    let (mut num, mut den) = (0f64, 0f64);
    let mut bad = None;
    for (i, (g, w)) in out.iter().zip(wo).enumerate() {
        let g = g.to_f32() as f64;
        if g.is_nan() {
            bad.get_or_insert(format!("out[{i}] (token {}, head {}) is NaN", i / 128 / n_heads, i / 128 % n_heads));
        }
        num += (g - w).powi(2);
        den += w * w;
    }
    let rel = if bad.is_some() { f64::INFINITY } else { (num / den.max(1e-300)).sqrt() };
    if bad.is_none() && rel > 1e-2 {
        bad = Some(format!("relative L2 error of out {rel:.3e} > 1e-2"));
    }
    if bad.is_none() {
        for (i, (g, w)) in lse.iter().zip(wl).enumerate() {
            let e = (*g as f64 - w).abs();
            if g.is_nan() || e > 1e-3 {
                bad = Some(format!("lse[{i}] (token {}, head {}): got {g}, expected {w:.6}", i / n_heads, i % n_heads));
                break;
            }
        }
    }
    (rel, bad)
}

/// One check of `path` on a fresh random case of shape `s` (capacity is grown by a random margin here).
pub fn attention(gpu: &Gpu, path: Path, s: AttentionShape, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let st = gpu.stream();
    let margin = if path == Path::DecodeUpTo { rng.gen_range(0..3000) } else { rng.gen_range(0..100) };
    let s = AttentionShape { capacity: s.ctx() + margin, ..s };
    let (q, k, v, growing) = inputs(&s, rng);
    let dq = st.clone_htod(&q)?;
    let dk = st.clone_htod(&k)?;
    let dv = st.clone_htod(&v)?;
    let mut dout = st.clone_htod(&poison_bf16(q.len()))?;
    let mut dlse = st.clone_htod(&vec![f32::NAN; s.tokens * s.n_heads])?;
    let extra: String;
    // The fused FP8 quantization (device-start path): (merge's q, scale, hga_fp8_quant's q, scale).
    let mut quant = None;
    // The decode kernel's partials merged by `hga_attention_merge` (v1) instead of v2: (out, lse).
    let mut merge_v1 = None;
    let max_splits = rng.gen_range(1..=256);
    let auto = decode_kernel_auto(gpu)?;
    match path {
        Path::Prefill => {
            hga_attention_prefill(gpu, &dq, &dk, &dv, &mut dout, &mut dlse, &s)?;
            extra = String::new();
        }
        Path::Decode => {
            let mut ws = DecodeWorkspace::new(gpu, s.tokens, s.n_heads, max_splits)?;
            // Poison the partials too: every slot the merge reads must have been written.
            st.memcpy_htod(&vec![f32::NAN; ws.lens().0], ws.part_o_mut())?;
            let m = MergeKernel::V2;
            let n = hga_attention_decode_kernel(gpu, auto, m, &dq, &dk, &dv, &mut ws, &mut dout, &mut dlse, &s, None)?;
            // The first merge kernel on the same partials: the same numbers, bit for bit.
            let mut eo = st.clone_htod(&poison_bf16(q.len()))?;
            let mut el = st.clone_htod(&vec![f32::NAN; s.tokens * s.n_heads])?;
            let m1 = MergeKernel::V1;
            hga_attention_decode_kernel(gpu, auto, m1, &dq, &dk, &dv, &mut ws, &mut eo, &mut el, &s, None)?;
            merge_v1 = Some((st.clone_dtoh(&eo)?, st.clone_dtoh(&el)?));
            gpu.synchronize()?; // the workspace is freed at the end of the block
            extra = format!(" splits={n} kernel={auto:?}");
        }
        Path::DecodeUpTo => {
            let bound = rng.gen_range(s.ctx()..=s.capacity);
            let start_dev = st.clone_htod(&[s.start as u32])?;
            let launch = AttentionShape { start: bound - s.tokens, ..s };
            let rows = s.tokens * s.n_heads;
            let mut ws = DecodeWorkspace::new(gpu, s.tokens, s.n_heads, max_splits)?;
            st.memcpy_htod(&vec![f32::NAN; ws.lens().0], ws.part_o_mut())?;
            // The default kernel with the fused FP8 quantization (outputs poisoned: 0x7f is e4m3 NaN).
            let mut q8 = st.clone_htod(&vec![0x7fu8; rows * 128])?;
            let mut sc = st.clone_htod(&vec![f32::NAN; rows])?;
            let n = hga_attention_decode_upto_quant(
                gpu, &dq, &dk, &dv, &mut ws, &mut dout, &mut dlse, &mut q8, &mut sc, &launch, &start_dev,
            )?;
            let mut rq8 = st.clone_htod(&vec![0x7fu8; rows * 128])?;
            let mut rsc = st.clone_htod(&vec![f32::NAN; rows])?;
            hga_fp8_quant(gpu, &dout, &mut rq8, &mut rsc, s.tokens, s.n_heads * 128)?;
            quant = Some((st.clone_dtoh(&q8)?, st.clone_dtoh(&sc)?, st.clone_dtoh(&rq8)?, st.clone_dtoh(&rsc)?));
            gpu.synchronize()?;
            extra = format!(" bound={bound} splits={n} kernel={auto:?}+fp8");
        }
    }
    let out = st.clone_dtoh(&dout)?;
    let lse = st.clone_dtoh(&dlse)?;
    gpu.synchronize()?;
    let want = crate::reference::attention::hga_attention(&q, &k, &v, &s);
    let (rel, mut bad) = judge(&out, &lse, &want, s.n_heads);
    if let Some((o1, l1)) = merge_v1 {
        let same = o1.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits())
            && l1.iter().zip(&lse).all(|(a, b)| a.to_bits() == b.to_bits());
        if bad.is_none() && !same {
            bad = Some("hga_attention_merge (v1) and hga_attention_merge_v2 differ on the same partials".into());
        }
    }
    if let Some((q8, sc, rq8, rsc)) = quant {
        if bad.is_none() {
            bad = quant_mismatch(&q8, &sc, &rq8, &rsc, s.n_heads);
        }
    }
    let name = match path {
        Path::Prefill => "hga_attention_prefill",
        Path::Decode => "hga_attention_decode+merge",
        Path::DecodeUpTo => "hga_attention_decode+merge+fp8 (start on the device)",
    };
    let shape = format!(
        "tokens={} heads={}/{} start={} ctx={} capacity={}{extra}{}",
        s.tokens,
        s.n_heads,
        s.n_kv_heads,
        s.start,
        s.ctx(),
        s.capacity,
        if growing { " growing-keys" } else { "" }
    );
    Ok(Outcome::new(name, shape, rel, bad))
}

/// The first difference between the merge's fused FP8 quantization (q8, sc) and `hga_fp8_quant`'s (rq8, rsc):
/// bytes and scale bits must be identical.
fn quant_mismatch(q8: &[u8], sc: &[f32], rq8: &[u8], rsc: &[f32], n_heads: usize) -> Option<String> {
    if let Some(i) = (0..sc.len()).find(|&i| sc[i].to_bits() != rsc[i].to_bits()) {
        return Some(format!(
            "fused FP8 scale[{i}] (token {}, head {}) = {:e}, hga_fp8_quant gives {:e}",
            i / n_heads,
            i % n_heads,
            sc[i],
            rsc[i]
        ));
    }
    (0..q8.len()).find(|&i| q8[i] != rq8[i]).map(|i| {
        format!(
            "fused FP8 q[{i}] (token {}, head {}, dim {}) = {:#04x}, hga_fp8_quant gives {:#04x}",
            i / 128 / n_heads,
            i / 128 % n_heads,
            i % 128,
            q8[i],
            rq8[i]
        )
    })
}
