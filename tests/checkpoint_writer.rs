//! The checkpoint writer: sharding, determinism, block scales, scale dtypes, failure handling; and a checkpoint made by
//! a different writer (the safetensors crate, sharded, f16 scales, unknown config keys) read back value by value.
use std::collections::BTreeMap;
use std::path::PathBuf;

use gpu_kernels::num::e4m3_to_f32;
use hga::model::checkpoint::{Checkpoint, Dtype};
use hga::model::config::Qwen3MoeConfig;
use hga::model::generate::{reference_values, write_checkpoint, ScaleDtype, WriteOptions};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::{json, Value};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hga-ckw-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tiny() -> Qwen3MoeConfig {
    Qwen3MoeConfig::preset("tiny").unwrap()
}

#[test]
fn sharding_does_not_change_values_and_index_is_consistent() {
    let (a, b) = (tmpdir("one"), tmpdir("many"));
    write_checkpoint(&a, &tiny(), 11, &WriteOptions::default()).unwrap();
    let opts = WriteOptions { shard_size: 150_000, ..Default::default() };
    write_checkpoint(&b, &tiny(), 11, &opts).unwrap();
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    assert_eq!(ca.files().len(), 1);
    assert!(cb.files().len() >= 5, "{:?}", cb.files());
    assert!(cb.files().iter().all(|f| f.starts_with("model-") && f.contains("-of-")));
    assert!(!a.join("model.safetensors.index.json").exists());
    let idx: Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(idx["metadata"]["total_size"].as_u64().unwrap(), cb.total_bytes());
    assert_eq!(idx["weight_map"].as_object().unwrap().len(), cb.len());
    for n in ca.tensor_names() {
        assert_eq!(ca.raw(n).unwrap().data, cb.raw(n).unwrap().data, "{n}");
    }
    // No file bigger than the shard size unless it holds a single tensor (with its scale).
    for f in cb.files() {
        let len = std::fs::metadata(b.join(f)).unwrap().len();
        let st = std::fs::read(b.join(f)).unwrap();
        let n = safetensors::SafeTensors::deserialize(&st).unwrap().len();
        assert!(len < 150_000 + 4096 || n <= 2, "{f}: {len} bytes, {n} tensors");
    }
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
fn deterministic_for_a_seed() {
    let (a, b, c) = (tmpdir("s1"), tmpdir("s1b"), tmpdir("s2"));
    write_checkpoint(&a, &tiny(), 5, &WriteOptions::default()).unwrap();
    write_checkpoint(&b, &tiny(), 5, &WriteOptions::default()).unwrap();
    write_checkpoint(&c, &tiny(), 6, &WriteOptions::default()).unwrap();
    let f = |d: &PathBuf| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(f(&a), f(&b));
    assert_ne!(f(&a), f(&c));
    assert_eq!(std::fs::read(a.join("config.json")).unwrap(), std::fs::read(b.join("config.json")).unwrap());
    for d in [a, b, c] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Per 128x128 block, the scale is absmax / 448 (rounded up to the scale dtype): the largest |e4m3| of each block is
/// 448 for f32 scales and close below it for bf16/f16 ones; dequantized values stay close to the intended ones.
#[test]
fn block_scales_follow_the_block_absmax_in_every_scale_dtype() {
    for (sd, dt, min_top) in [
        (ScaleDtype::F32, Dtype::F32, 448.0),
        (ScaleDtype::Bf16, Dtype::BF16, 384.0),
        (ScaleDtype::F16, Dtype::F16, 416.0),
    ] {
        let dir = tmpdir(&format!("sd{dt}"));
        let mut cfg = Qwen3MoeConfig::preset("small").unwrap();
        cfg.num_hidden_layers = 2; // keep the test quick
        cfg.vocab_size = 1000;
        cfg.mlp_only_layers = vec![0];
        cfg.quantization.as_mut().unwrap().modules_to_not_convert = cfg.default_modules_to_not_convert();
        write_checkpoint(&dir, &cfg, 9, &WriteOptions { scale_dtype: sd, ..Default::default() }).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        for name in [
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.mlp.experts.15.down_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
        ] {
            assert_eq!(ck.dtype(&format!("{name}_scale_inv")).unwrap(), dt);
            let w = ck.fp8_weight(name).unwrap();
            let [rows, cols] = w.shape;
            assert_eq!(w.scale_shape, [rows.div_ceil(128), cols.div_ceil(128)]);
            let want = reference_values(&cfg, 9, name).unwrap();
            for br in 0..w.scale_shape[0] {
                for bc in 0..w.scale_shape[1] {
                    let (mut top, mut absmax) = (0f32, 0f32);
                    for r in br * 128..((br + 1) * 128).min(rows) {
                        for c in bc * 128..((bc + 1) * 128).min(cols) {
                            top = top.max(e4m3_to_f32(w.data[r * cols + c]).abs());
                            absmax = absmax.max(want[r * cols + c].abs());
                        }
                    }
                    let s = w.scales[br * w.scale_shape[1] + bc];
                    assert!(top <= 448.0 && top >= min_top, "{name} block ({br},{bc}): top {top}");
                    assert!(s >= absmax / 448.0 && s <= absmax / 448.0 * 1.01, "{name}: scale {s} vs absmax {absmax}");
                }
            }
            let got = ck.tensor_f32(name).unwrap();
            let num: f64 = got.iter().zip(&want).map(|(g, w)| ((g - w) as f64).powi(2)).sum();
            let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
            assert!((num / den).sqrt() < 0.04, "{name}: rel err {}", (num / den).sqrt());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn mixed_config_with_bias_and_tied_embeddings_round_trips() {
    let mut cfg = tiny();
    cfg.num_hidden_layers = 4;
    cfg.decoder_sparse_step = 2;
    cfg.mlp_only_layers = vec![3];
    cfg.attention_bias = true;
    cfg.tie_word_embeddings = true;
    cfg.quantization.as_mut().unwrap().modules_to_not_convert = cfg.default_modules_to_not_convert();
    let moe: Vec<bool> = (0..4).map(|l| cfg.is_moe_layer(l)).collect();
    assert_eq!(moe, [false, true, false, false]);
    let dir = tmpdir("mixed");
    write_checkpoint(&dir, &cfg, 2, &WriteOptions::default()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.config, cfg);
    assert!(!ck.contains("lm_head.weight"));
    assert!(ck.contains("model.layers.0.mlp.gate_proj.weight_scale_inv"));
    assert!(ck.contains("model.layers.1.mlp.experts.3.up_proj.weight"));
    assert!(ck.contains("model.layers.2.self_attn.o_proj.bias"));
    assert_eq!(ck.shape("model.layers.3.mlp.down_proj.weight").unwrap(), vec![192, 384]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_to_overwrite_a_checkpoint() {
    let dir = tmpdir("exists");
    write_checkpoint(&dir, &tiny(), 1, &WriteOptions::default()).unwrap();
    let e = write_checkpoint(&dir, &tiny(), 1, &WriteOptions::default()).unwrap_err().to_string();
    assert!(e.contains("already holds"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A full disk (here /dev/full behind the shard's temporary name) is an error naming the file, and leaves nothing that
/// opens as a checkpoint (no config.json, no partial shard).
#[test]
fn write_error_names_the_file_and_leaves_no_valid_checkpoint() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("no /dev/full: skipped");
        return;
    }
    // Single file.
    let dir = tmpdir("full1");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.join("model.safetensors.partial")).unwrap();
    let e = write_checkpoint(&dir, &tiny(), 1, &WriteOptions::default()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors.partial") && e.contains("No space left on device"), "{e}");
    assert!(!dir.join("config.json").exists() && !dir.join("model.safetensors").exists());
    assert!(!dir.join("model.safetensors.partial").exists());
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    // Sharded: the second shard fails after the first was completed.
    let dir = tmpdir("full2");
    std::fs::create_dir_all(&dir).unwrap();
    let opts = WriteOptions { shard_size: 300_000, ..Default::default() };
    let probe = tmpdir("full2-probe");
    write_checkpoint(&probe, &tiny(), 1, &opts).unwrap();
    let n = std::fs::read_dir(&probe).unwrap().count() - 2;
    std::fs::remove_dir_all(&probe).unwrap();
    let second = format!("model-00002-of-{n:05}.safetensors.partial");
    std::os::unix::fs::symlink("/dev/full", dir.join(&second)).unwrap();
    let e = write_checkpoint(&dir, &tiny(), 1, &opts).unwrap_err().to_string();
    assert!(e.contains(&second), "{e}");
    assert!(dir.join(format!("model-00001-of-{n:05}.safetensors")).exists());
    assert!(!dir.join("config.json").exists() && !dir.join("model.safetensors.index.json").exists());
    assert!(Checkpoint::open(&dir).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- a different writer ----------------------------------------------------------------------------------------

struct Owned {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Writes, with the safetensors crate, a sharded FP8 checkpoint with f16 block scales, partial 128-blocks, a dense
/// layer, and a config.json full of keys we do not know; returns the f32 values every tensor must read back as.
fn different_writer(dir: &std::path::Path) -> BTreeMap<String, Vec<f32>> {
    let (v, h, inter, moe_i, nh, nkv, hd, ne) =
        (50usize, 160usize, 200usize, 136usize, 4usize, 2usize, 40usize, 3usize);
    let config = json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": v, "hidden_size": h,
        "intermediate_size": inter, "moe_intermediate_size": moe_i, "num_hidden_layers": 2, "num_attention_heads": nh,
        "num_key_value_heads": nkv, "head_dim": hd, "num_experts": ne, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [0], "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960, "tie_word_embeddings": false, "attention_bias": false,
        "bos_token_id": 151643, "eos_token_id": [151645, 151643], "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "qkv_bias_future": {"x": [1, 2]}, "unsloth_fixed": true,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], "some_new_option": 3,
            "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.gate"]},
    });
    let mut tensors: Vec<(String, Owned)> = Vec::new();
    let mut want = BTreeMap::new();
    let mut k = 0u32;
    let mut float = |name: String,
                     shape: Vec<usize>,
                     tensors: &mut Vec<(String, Owned)>,
                     want: &mut BTreeMap<String, Vec<f32>>| {
        k += 1;
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.37 + k as f32).sin() * 0.5 + 1.0) * 0.25).collect();
        // Alternate dtypes: bf16, f16, f32 (the values are exact in each).
        let (dtype, data, vals): (StDtype, Vec<u8>, Vec<f32>) = match k % 3 {
            0 => {
                let q: Vec<half::bf16> = vals.iter().map(|&x| half::bf16::from_f32(x)).collect();
                (
                    StDtype::BF16,
                    q.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    q.iter().map(|x| x.to_f32()).collect(),
                )
            }
            1 => {
                let q: Vec<half::f16> = vals.iter().map(|&x| half::f16::from_f32(x)).collect();
                (StDtype::F16, q.iter().flat_map(|x| x.to_le_bytes()).collect(), q.iter().map(|x| x.to_f32()).collect())
            }
            _ => (StDtype::F32, vals.iter().flat_map(|x| x.to_le_bytes()).collect(), vals),
        };
        want.insert(name.clone(), vals);
        tensors.push((name, Owned { dtype, shape, data }));
    };
    let fp8 = |name: String,
               out: usize,
               inp: usize,
               tensors: &mut Vec<(String, Owned)>,
               want: &mut BTreeMap<String, Vec<f32>>| {
        let (so, si) = (out.div_ceil(128), inp.div_ceil(128));
        // Codes: any byte but the NaNs 0x7F / 0xFF.
        let codes: Vec<u8> = (0..out * inp)
            .map(|i| ((i * 31 + out) % 255) as u8)
            .map(|b| if b & 0x7F == 0x7F { 0x10 } else { b })
            .collect();
        let scales: Vec<half::f16> = (0..so * si).map(|i| half::f16::from_f32(0.001 * (i as f32 + 1.5))).collect();
        let deq: Vec<f32> = (0..out * inp)
            .map(|i| {
                let (r, c) = (i / inp, i % inp);
                e4m3_to_f32(codes[i]) * scales[(r / 128) * si + c / 128].to_f32()
            })
            .collect();
        want.insert(name.clone(), deq);
        want.insert(format!("{name}_scale_inv"), scales.iter().map(|s| s.to_f32()).collect());
        tensors.push((
            format!("{name}_scale_inv"),
            Owned {
                dtype: StDtype::F16,
                shape: vec![so, si],
                data: scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            },
        ));
        tensors.push((name, Owned { dtype: StDtype::F8_E4M3, shape: vec![out, inp], data: codes }));
    };
    float("model.embed_tokens.weight".into(), vec![v, h], &mut tensors, &mut want);
    float("model.norm.weight".into(), vec![h], &mut tensors, &mut want);
    float("lm_head.weight".into(), vec![v, h], &mut tensors, &mut want);
    for l in 0..2 {
        let p = format!("model.layers.{l}.");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            float(format!("{p}{n}.weight"), vec![h], &mut tensors, &mut want);
        }
        for n in ["q_norm", "k_norm"] {
            float(format!("{p}self_attn.{n}.weight"), vec![hd], &mut tensors, &mut want);
        }
        fp8(format!("{p}self_attn.q_proj.weight"), nh * hd, h, &mut tensors, &mut want);
        fp8(format!("{p}self_attn.k_proj.weight"), nkv * hd, h, &mut tensors, &mut want);
        fp8(format!("{p}self_attn.v_proj.weight"), nkv * hd, h, &mut tensors, &mut want);
        fp8(format!("{p}self_attn.o_proj.weight"), h, nh * hd, &mut tensors, &mut want);
        if l == 0 {
            fp8(format!("{p}mlp.gate_proj.weight"), inter, h, &mut tensors, &mut want);
            fp8(format!("{p}mlp.up_proj.weight"), inter, h, &mut tensors, &mut want);
            fp8(format!("{p}mlp.down_proj.weight"), h, inter, &mut tensors, &mut want);
        } else {
            float(format!("{p}mlp.gate.weight"), vec![ne, h], &mut tensors, &mut want);
            for e in 0..ne {
                fp8(format!("{p}mlp.experts.{e}.gate_proj.weight"), moe_i, h, &mut tensors, &mut want);
                fp8(format!("{p}mlp.experts.{e}.up_proj.weight"), moe_i, h, &mut tensors, &mut want);
                fp8(format!("{p}mlp.experts.{e}.down_proj.weight"), h, moe_i, &mut tensors, &mut want);
            }
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    // Three shards, round robin (so that a weight and its scale often live in different files).
    let files =
        ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"];
    let mut map = serde_json::Map::new();
    let mut total = 0;
    for (s, f) in files.iter().enumerate() {
        let part: Vec<(String, TensorView)> = tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == s)
            .map(|(_, (n, t))| (n.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
            .collect();
        for (n, t) in &part {
            map.insert(n.clone(), json!(f));
            total += t.data().len();
        }
        let meta = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
        safetensors::tensor::serialize_to_file(part, &meta, &dir.join(f)).unwrap();
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    want
}

#[test]
fn checkpoint_from_a_different_writer_reads_back_exactly() {
    let dir = tmpdir("otherwriter");
    let want = different_writer(&dir);
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.files().len(), 3);
    assert_eq!(ck.len(), want.len());
    assert_eq!(ck.config.eos_token_id, Some(151645));
    assert!(!ck.config.is_moe_layer(0) && ck.config.is_moe_layer(1));
    assert!(ck.warnings().is_empty());
    for (name, w) in &want {
        let got = ck.tensor_f32(name).unwrap();
        assert_eq!(&got, w, "{name}");
    }
    // Row access agrees with whole-tensor access, also across a 128-row block boundary of an FP8 weight.
    let name = "model.layers.0.mlp.gate_proj.weight";
    let rows = ck.rows_f32(name, 120, 20).unwrap();
    assert_eq!(&rows[..], &want[name][120 * 160..140 * 160]);
    assert_eq!(ck.dtype("model.layers.1.mlp.experts.2.down_proj.weight_scale_inv").unwrap(), Dtype::F16);
    std::fs::remove_dir_all(&dir).unwrap();
}
