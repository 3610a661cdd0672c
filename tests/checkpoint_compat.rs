//! Checkpoints that transformers loads and that other tools write (issue 16, "Loader compatibility"), each written
//! here directly with the `safetensors` crate (not through `hga`'s writer), and compared through the CPU forward (and
//! the CPU emulation of the GPU forward, which uses the GPU loader's conversions) with what the same weights give when
//! written the standard way (`hga checkpoint new`'s layout):
//! - routers, norms and embeddings in BF16, F16 or F32 with `modules_to_not_convert: ["lm_head"]`: the header decides;
//! - an FP8 router with its block scales: dequantized at load;
//! - a partially quantized checkpoint (Linears the config calls FP8 stored in BF16/F32): the CPU forward uses the
//!   stored values, the GPU loader quantizes them at load (and the FP8 modes of the CPU forward model that).
//!
//! Where the arithmetic is the same the logits must be bit-identical; e4m3 codes and dequantized values are computed
//! here by an independent decoder / nearest-value encoder.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hga::model::checkpoint::{Checkpoint, Dtype};
use hga::model::config::Qwen3MoeConfig;
use hga::model::emulate::EmulatedModel;
use hga::model::forward::{ActivationMode, CpuModel};
use hga::model::generate::{write_checkpoint, WriteOptions};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::{json, Value};

const TOKENS: [u32; 8] = [1, 17, 5, 42, 42, 9, 63, 200];
const MODES: [ActivationMode; 3] = [ActivationMode::F32, ActivationMode::Fp8, ActivationMode::Fp8Bf16];

/// A stored tensor: dtype, shape, little-endian bytes.
#[derive(Clone, Debug)]
struct T {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl T {
    fn f32s(shape: &[usize], v: &[f32]) -> T {
        T { dtype: StDtype::F32, shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
    fn bf16s(shape: &[usize], v: &[f32]) -> T {
        let data = v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        T { dtype: StDtype::BF16, shape: shape.to_vec(), data }
    }
    fn f16s(shape: &[usize], v: &[f32]) -> T {
        let data = v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        T { dtype: StDtype::F16, shape: shape.to_vec(), data }
    }
    fn fp8(shape: &[usize], codes: Vec<u8>) -> T {
        T { dtype: StDtype::F8_E4M3, shape: shape.to_vec(), data: codes }
    }
    /// The values of a float tensor (decoded here with the `half` crate).
    fn values(&self) -> Vec<f32> {
        match self.dtype {
            StDtype::F32 => self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            StDtype::BF16 => {
                self.data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            StDtype::F16 => {
                self.data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            d => panic!("not a float tensor: {d:?}"),
        }
    }
}

/// e4m3 (OCP E4M3FN) decoded by its definition: bias 7, 3 mantissa bits, subnormals at exponent 0.
fn e4m3(b: u8) -> f32 {
    let s = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((b >> 3) & 0xF) as i32, (b & 7) as f32);
    if e == 0 {
        s * m / 8.0 * 2f32.powi(-6)
    } else {
        s * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// The nearest e4m3 code (ties to the even code; |x| <= 448 here), found by search over the 127 magnitudes.
fn e4m3_code(x: f32, table: &[f32; 127]) -> u8 {
    let a = x.abs();
    let mut best = 0usize;
    for (c, &g) in table.iter().enumerate().skip(1) {
        let (d, db) = ((g - a).abs(), (table[best] - a).abs());
        if d < db || (d == db && c % 2 == 0) {
            best = c;
        }
    }
    (if x.is_sign_negative() { 0x80 } else { 0 }) | best as u8
}

/// Block-FP8 quantization of [n, k] in 128 x 128 blocks: `s = absmax / 448` (f32), `q = nearest e4m3 of w / s`.
fn quantize(w: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let table: [f32; 127] = std::array::from_fn(|c| e4m3(c as u8));
    let (sr, sc) = (n.div_ceil(128), k.div_ceil(128));
    let mut scales = vec![1f32; sr * sc];
    for (i, s) in scales.iter_mut().enumerate() {
        let (br, bc) = (i / sc, i % sc);
        let mut absmax = 0f32;
        for r in br * 128..((br + 1) * 128).min(n) {
            for c in bc * 128..((bc + 1) * 128).min(k) {
                absmax = absmax.max(w[r * k + c].abs());
            }
        }
        if absmax > 0.0 {
            *s = absmax / 448.0;
        }
    }
    let q = (0..n * k).map(|i| e4m3_code(w[i] / scales[(i / k / 128) * sc + (i % k) / 128], &table)).collect();
    (q, scales)
}

/// `e4m3(q) * scale` of a stored FP8 weight and its scales.
fn dequantize(w: &T, s: &T) -> Vec<f32> {
    let (k, sv) = (w.shape[1], s.values());
    let sc = s.shape[1];
    w.data.iter().enumerate().map(|(i, &q)| e4m3(q) * sv[(i / k / 128) * sc + (i % k) / 128]).collect()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hga-compat-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn st_dtype(d: Dtype) -> StDtype {
    match d {
        Dtype::F8_E4M3 => StDtype::F8_E4M3,
        Dtype::BF16 => StDtype::BF16,
        Dtype::F16 => StDtype::F16,
        Dtype::F32 => StDtype::F32,
        other => panic!("test helper: {other}"),
    }
}

/// The standard checkpoint (`hga`'s writer) of `cfg` and its tensors as stored.
fn standard(tag: &str, cfg: &Qwen3MoeConfig, seed: u64) -> (PathBuf, BTreeMap<String, T>) {
    let dir = tmp(tag);
    write_checkpoint(&dir, cfg, seed, &WriteOptions::default()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert!(ck.warnings().is_empty(), "{:?}", ck.warnings());
    let tensors = ck
        .tensor_names()
        .map(|n| {
            let r = ck.raw(n).unwrap();
            (n.to_string(), T { dtype: st_dtype(r.dtype), shape: r.shape.to_vec(), data: r.data.to_vec() })
        })
        .collect();
    (dir, tensors)
}

/// Writes `config.json` and one `model.safetensors` with the safetensors crate.
fn write_direct(dir: &Path, config: &Value, tensors: &BTreeMap<String, T>) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, t)| (n.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    safetensors::tensor::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
}

fn open_err(dir: &Path) -> String {
    Checkpoint::open(dir).expect_err("the reader must refuse this checkpoint").to_string()
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

/// CPU forward logits of TOKENS, one run per mode.
fn cpu_logits(dir: &Path) -> Vec<Vec<f32>> {
    let ck = Checkpoint::open(dir).unwrap();
    MODES
        .iter()
        .map(|&m| {
            let model = CpuModel::load(&ck, m).unwrap();
            model.prefill(&TOKENS, &mut model.new_cache()).unwrap().data
        })
        .collect()
}

/// Logits of TOKENS from the CPU emulation of the GPU forward (loaded by the GPU loader's conversions), in chunks
/// of 4 tokens.
fn emulated_logits(dir: &Path) -> Vec<f32> {
    let ck = Checkpoint::open(dir).unwrap();
    let mut m = EmulatedModel::load(&ck, TOKENS.len(), 4).unwrap();
    m.forward(&TOKENS, true).unwrap()
}

/// The logits must be the same bits (NaN excluded: it would pass `==` on bits but is never a valid result).
fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite logits");
    let diff = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(diff, 0, "{what}: {diff} of {} logits differ", a.len());
}

fn lm_head_only(cfg: &Qwen3MoeConfig) -> Value {
    let mut v = cfg.to_json();
    v["quantization_config"]["modules_to_not_convert"] = json!(["lm_head"]);
    v
}

fn is_router(n: &str) -> bool {
    n.ends_with(".mlp.gate.weight")
}

fn tiny() -> Qwen3MoeConfig {
    Qwen3MoeConfig::preset("tiny").unwrap()
}

/// The emulation's shapes (head_dim 128, sizes multiples of 128): layer 0 MoE (4 experts, top-2), layer 1 dense.
fn gpu_shaped() -> Qwen3MoeConfig {
    let mut c = Qwen3MoeConfig::preset("small").unwrap();
    c.vocab_size = 256;
    c.hidden_size = 256;
    c.intermediate_size = 384;
    c.moe_intermediate_size = 128;
    c.num_hidden_layers = 2;
    c.mlp_only_layers = vec![1];
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    let keep = c.default_modules_to_not_convert();
    if let Some(q) = c.quantization.as_mut() {
        q.modules_to_not_convert = keep;
    }
    c
}

#[test]
fn routers_norms_embeddings_in_any_float_dtype_with_only_lm_head_not_converted() {
    let cfg = tiny();
    let (std_dir, base) = standard("float-std", &cfg, 5);
    let want = cpu_logits(&std_dir);
    let config = lm_head_only(&cfg);
    // The issue's checkpoint: routers and norms in BF16 while modules_to_not_convert lists only lm_head.
    let dir = tmp("float-bf16");
    write_direct(&dir, &config, &base);
    let ck = Checkpoint::open(&dir).unwrap();
    assert!(ck.warnings().is_empty(), "{:?}", ck.warnings());
    assert_eq!(ck.dtype("model.layers.0.mlp.gate.weight").unwrap(), Dtype::BF16);
    for (m, (g, w)) in MODES.iter().zip(cpu_logits(&dir).iter().zip(&want)) {
        assert_same(g, w, &format!("bf16 routers, {m}"));
    }
    // Every float tensor (routers, norms, embedding, lm_head) as F32 with the same values.
    let f32s: BTreeMap<String, T> = base
        .iter()
        .map(|(n, t)| (n.clone(), if t.dtype == StDtype::BF16 { T::f32s(&t.shape, &t.values()) } else { t.clone() }))
        .collect();
    write_direct(&dir, &config, &f32s);
    for (m, (g, w)) in MODES.iter().zip(cpu_logits(&dir).iter().zip(&want)) {
        assert_same(g, w, &format!("f32 routers/norms/embedding, {m}"));
    }
    // Routers and norms as F16 (values rounded to f16): the same logits as those f16 values stored as F32.
    let (mut f16s, mut f16_as_f32) = (base.clone(), base.clone());
    for (n, t) in &base {
        if is_router(n) || n.ends_with("norm.weight") {
            let v: Vec<f32> = t.values().iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
            f16s.insert(n.clone(), T::f16s(&t.shape, &v));
            f16_as_f32.insert(n.clone(), T::f32s(&t.shape, &v));
        }
    }
    write_direct(&dir, &config, &f16s);
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.dtype("model.layers.2.mlp.gate.weight").unwrap(), Dtype::F16);
    assert_eq!(ck.dtype("model.layers.2.self_attn.k_norm.weight").unwrap(), Dtype::F16);
    let got = cpu_logits(&dir);
    let dir2 = tmp("float-f16-as-f32");
    write_direct(&dir2, &config, &f16_as_f32);
    for (m, (g, w)) in MODES.iter().zip(got.iter().zip(&cpu_logits(&dir2))) {
        assert_same(g, w, &format!("f16 routers/norms, {m}"));
    }
    // `hga checkpoint inspect` accepts it and says how each kind is stored.
    write_direct(&dir, &config, &base);
    let o = Command::new(env!("CARGO_BIN_EXE_hga"))
        .args(["checkpoint", "inspect", dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["storage"]["routers"]["BF16"], 3, "{}", v["storage"]);
    assert_eq!(v["storage"]["FP8 linears"]["F8_E4M3"], 48, "{}", v["storage"]);
    for d in [std_dir, dir, dir2] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn fp8_router_with_block_scales_is_dequantized_at_load() {
    let cfg = tiny();
    let (std_dir, base) = standard("r8-std", &cfg, 6);
    let config = lm_head_only(&cfg);
    let router = "model.layers.1.mlp.gate.weight";
    let scale = format!("{router}_scale_inv");
    let (e, h) = (cfg.num_experts, cfg.hidden_size);
    // Any codes but the NaNs; BF16 scales [1, 2] (192 = one full and one partial block of columns).
    let codes: Vec<u8> =
        (0..e * h).map(|i| ((i * 37 + 11) % 251) as u8).map(|b| if b & 0x7F == 0x7F { 0x3A } else { b }).collect();
    let scales = T::bf16s(&[1, 2], &[0.00075, 0.0011]);
    let w8 = T::fp8(&[e, h], codes);
    let deq = dequantize(&w8, &scales);
    let mut fp8 = base.clone();
    fp8.insert(router.into(), w8.clone());
    fp8.insert(scale.clone(), scales.clone());
    let dir = tmp("r8");
    write_direct(&dir, &config, &fp8);
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.tensor_f32(router).unwrap(), deq);
    assert_eq!(ck.warnings().len(), 1, "{:?}", ck.warnings());
    assert_has(&ck.warnings()[0], &["1 router(s) stored as F8_E4M3", router, "dequantized at load"]);
    // The same values stored as an F32 router: the same logits, bit for bit, in every mode.
    let mut f32r = base.clone();
    f32r.insert(router.into(), T::f32s(&[e, h], &deq));
    let dir2 = tmp("r8-f32");
    write_direct(&dir2, &config, &f32r);
    for (m, (g, w)) in MODES.iter().zip(cpu_logits(&dir).iter().zip(&cpu_logits(&dir2))) {
        assert_same(g, w, &format!("fp8 router, {m}"));
    }
    // Refused: an FP8 router without its scales, scales beside a float router, scales of the wrong shape.
    let mut bad = fp8.clone();
    bad.remove(&scale);
    write_direct(&dir, &config, &bad);
    assert_has(&open_err(&dir), &[&format!("missing tensor `{scale}`"), "block scales [1, 2] of the F8_E4M3 weight"]);
    let mut bad = base.clone();
    bad.insert(scale.clone(), scales.clone());
    write_direct(&dir, &config, &bad);
    assert_has(
        &open_err(&dir),
        &[&format!("`{scale}`: block scales of `{router}`, which is stored as BF16, not F8_E4M3")],
    );
    let mut bad = fp8.clone();
    bad.insert(scale.clone(), T::bf16s(&[2, 1], &[0.00075, 0.0011]));
    write_direct(&dir, &config, &bad);
    assert_has(&open_err(&dir), &[&format!("`{scale}`: wrong block-scale shape"), "expected [1, 2]"]);
    // Without quantization_config there is no block size: an FP8 router is a wrong dtype.
    let mut plain = cfg.clone();
    plain.quantization = None;
    let (bf_dir, bf) = standard("r8-bf16", &plain, 6);
    let mut bad = bf.clone();
    bad.insert(router.into(), w8);
    bad.insert(scale.clone(), scales);
    write_direct(&dir, &plain.to_json(), &bad);
    assert_has(&open_err(&dir), &[&format!("`{router}`: wrong dtype: expected BF16|F16|F32, found F8_E4M3")]);
    for d in [std_dir, dir, dir2, bf_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn partially_quantized_linears_on_the_cpu() {
    let cfg = tiny();
    let (std_dir, base) = standard("part-std", &cfg, 7);
    let want = cpu_logits(&std_dir);
    let config = cfg.to_json();
    let names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.experts.1.down_proj.weight"];
    let scale = |n: &str| format!("{n}_scale_inv");
    // (a) Stored as F32 holding exactly what the standard FP8 weights dequantize to: the F32 forward (transformers'
    // arithmetic on the stored values) is the standard one, bit for bit.
    let mut part = base.clone();
    for n in names {
        let deq = dequantize(&base[n], &base[&scale(n)]);
        part.remove(&scale(n));
        part.insert(n.into(), T::f32s(&base[n].shape, &deq));
    }
    let dir = tmp("part-f32");
    write_direct(&dir, &config, &part);
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.warnings().len(), 1, "{:?}", ck.warnings());
    assert_has(&ck.warnings()[0], &["partially quantized: 2 weight(s)", names[0], "quantizes them to e4m3 at load"]);
    assert_same(&cpu_logits(&dir)[0], &want[0], "f32-stored linears, f32 mode");
    // (b) Stored as BF16 (other values): in the FP8 modes (the GPU's arithmetic) the same logits as the checkpoint
    // that stores this test's own block quantization of them, bit for bit; the loader's quantization is that one.
    let (mut part, mut fp8) = (base.clone(), base.clone());
    for n in names {
        let t = &base[n];
        let deq = dequantize(t, &base[&scale(n)]);
        let w: Vec<f32> = deq.iter().enumerate().map(|(i, x)| x * (1.0 + 0.05 * ((i % 7) as f32 - 3.0))).collect();
        let w = T::bf16s(&t.shape, &w);
        let (q, s) = quantize(&w.values(), t.shape[0], t.shape[1]);
        let ss = base[&scale(n)].shape.clone();
        part.remove(&scale(n));
        part.insert(n.into(), w);
        fp8.insert(n.into(), T::fp8(&t.shape, q));
        fp8.insert(scale(n), T::f32s(&ss, &s));
    }
    write_direct(&dir, &config, &part);
    let dir2 = tmp("part-fp8");
    write_direct(&dir2, &config, &fp8);
    let (ck, ck2) = (Checkpoint::open(&dir).unwrap(), Checkpoint::open(&dir2).unwrap());
    for n in names {
        let (a, b) = (ck.fp8_weight_or_quantize(n).unwrap(), ck2.fp8_weight(n).unwrap());
        assert!(a.data == b.data && a.scales == b.scales, "{n}: quantized at load != quantized here");
        assert_eq!(ck.tensor_f32(n).unwrap(), part[n].values(), "{n}: the CPU forward's values are the stored ones");
    }
    let (got, q) = (cpu_logits(&dir), cpu_logits(&dir2));
    for i in 1..MODES.len() {
        assert_same(&got[i], &q[i], &format!("bf16-stored linears, {}", MODES[i]));
    }
    // The F32 mode uses the stored values: the same as those values stored as F32.
    let f32s: BTreeMap<String, T> = part
        .iter()
        .map(|(n, t)| (n.clone(), if names.contains(&n.as_str()) { T::f32s(&t.shape, &t.values()) } else { t.clone() }))
        .collect();
    write_direct(&dir2, &config, &f32s);
    assert_same(&got[0], &cpu_logits(&dir2)[0], "bf16-stored linears, f32 mode");
    // Refused: a float weight that keeps its scales; a dtype that is neither.
    let mut bad = part.clone();
    bad.insert(scale(names[0]), base[&scale(names[0])].clone());
    write_direct(&dir, &config, &bad);
    assert_has(&open_err(&dir), &[&format!("block scales of `{}`, which is stored as BF16", names[0])]);
    let mut bad = base.clone();
    let t = bad.get_mut(names[1]).unwrap();
    t.dtype = StDtype::I32;
    t.shape = vec![t.shape[0] / 4, t.shape[1]];
    write_direct(&dir, &config, &bad);
    assert_has(
        &open_err(&dir),
        &[&format!("`{}`: wrong dtype: expected F8_E4M3 (with block scales) or BF16|F16|F32, found I32", names[1])],
    );
    for d in [std_dir, dir, dir2] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The GPU loader's conversions (`hga::model::gpu`: bf16 routers from any stored dtype, quantization at load of
/// float-stored FP8 linears), run on the CPU through the emulation of the GPU forward, which loads with them.
#[test]
fn gpu_loader_conversions_through_the_emulation() {
    let cfg = gpu_shaped();
    let (std_dir, base) = standard("gpu-std", &cfg, 11);
    let want = emulated_logits(&std_dir);
    let config = lm_head_only(&cfg);
    let router = "model.layers.0.mlp.gate.weight";
    let [e, h] = [cfg.num_experts, cfg.hidden_size];
    // Routers as stored (BF16) and as F32 of the same values, with only lm_head not converted.
    let dir = tmp("gpu-r");
    write_direct(&dir, &config, &base);
    assert_same(&emulated_logits(&dir), &want, "bf16 router, only lm_head not converted");
    let mut r = base.clone();
    r.insert(router.into(), T::f32s(&[e, h], &base[router].values()));
    write_direct(&dir, &config, &r);
    assert_same(&emulated_logits(&dir), &want, "f32 router");
    // An FP8 router with F32 scales against the same dequantized values stored as F32.
    let codes: Vec<u8> =
        (0..e * h).map(|i| ((i * 53 + 7) % 253) as u8).map(|b| if b & 0x7F == 0x7F { 0x41 } else { b }).collect();
    let (w8, s8) = (T::fp8(&[e, h], codes), T::f32s(&[1, 2], &[0.0007, 0.0009]));
    let deq = dequantize(&w8, &s8);
    let mut r8 = base.clone();
    r8.insert(router.into(), w8);
    r8.insert(format!("{router}_scale_inv"), s8);
    write_direct(&dir, &config, &r8);
    let got = emulated_logits(&dir);
    r.insert(router.into(), T::f32s(&[e, h], &deq));
    write_direct(&dir, &config, &r);
    assert_same(&got, &emulated_logits(&dir), "fp8 router");
    // Linears the config calls FP8 stored in BF16 (attention, an expert, the dense MLP): quantized at load, the same
    // logits as the checkpoint that stores this test's quantization of them; the CPU forward's FP8-BF16 mode too.
    let names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.experts.2.down_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
    ];
    let (mut part, mut fp8) = (base.clone(), base.clone());
    for n in names {
        let t = &base[n];
        let sn = format!("{n}_scale_inv");
        let w = T::bf16s(&t.shape, &dequantize(t, &base[&sn]).iter().map(|x| x * 0.9).collect::<Vec<_>>());
        let (q, s) = quantize(&w.values(), t.shape[0], t.shape[1]);
        let ss = base[&sn].shape.clone();
        part.remove(&sn);
        part.insert(n.into(), w);
        fp8.insert(n.into(), T::fp8(&t.shape, q));
        fp8.insert(sn, T::f32s(&ss, &s));
    }
    write_direct(&dir, &cfg.to_json(), &part);
    let dir2 = tmp("gpu-fp8");
    write_direct(&dir2, &cfg.to_json(), &fp8);
    assert_same(&emulated_logits(&dir), &emulated_logits(&dir2), "bf16-stored linears quantized at load");
    assert_same(&cpu_logits(&dir)[2], &cpu_logits(&dir2)[2], "bf16-stored linears, CPU fp8-bf16 mode");
    // A float Linear that the config leaves unquantized: the CPU forward runs it, the GPU loader refuses it.
    let mut plain_q = cfg.to_json();
    plain_q["quantization_config"]["modules_to_not_convert"]
        .as_array_mut()
        .unwrap()
        .push(json!("model.layers.0.self_attn.q_proj"));
    let mut only_q = base.clone();
    only_q.remove(&format!("{}_scale_inv", names[0]));
    only_q.insert(names[0].into(), part[names[0]].clone());
    write_direct(&dir, &plain_q, &only_q);
    let ck = Checkpoint::open(&dir).unwrap();
    assert!(ck.warnings().is_empty(), "{:?}", ck.warnings());
    assert!(CpuModel::load(&ck, ActivationMode::F32).is_ok());
    let err = EmulatedModel::load(&ck, 8, 4).err().expect("the GPU loader must refuse it").to_string();
    assert_has(&err, &[names[0], "leaves this weight unquantized", "block-FP8 GEMM"]);
    for d in [std_dir, dir, dir2] {
        let _ = std::fs::remove_dir_all(d);
    }
}
