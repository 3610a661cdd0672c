//! Every bad input the checkpoint reader must refuse, each with the error message it must give (naming the key, the
//! tensor, the file, expected and found). Checkpoints are written by our generator, then rewritten with the
//! safetensors crate (a different writer) with one defect each.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hga::model::checkpoint::{Checkpoint, Dtype};
use hga::model::config::Qwen3MoeConfig;
use hga::model::generate::{write_checkpoint, WriteOptions};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::{json, Value};

/// An in-memory tensor: dtype, shape, bytes.
#[derive(Clone, Debug)]
struct T {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn st_dtype(d: Dtype) -> StDtype {
    match d {
        Dtype::F8_E4M3 => StDtype::F8_E4M3,
        Dtype::BF16 => StDtype::BF16,
        Dtype::F16 => StDtype::F16,
        Dtype::F32 => StDtype::F32,
        Dtype::I32 => StDtype::I32,
        other => panic!("test helper: {other}"),
    }
}

struct Fixture {
    dir: PathBuf,
    config: Value,
    tensors: BTreeMap<String, T>,
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hga-ckerr-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A valid tiny checkpoint loaded into memory, to be broken and written back.
fn fixture(tag: &str) -> Fixture {
    let dir = tmpdir(tag);
    let cfg = Qwen3MoeConfig::preset("tiny").unwrap();
    write_checkpoint(&dir, &cfg, 3, &WriteOptions::default()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let tensors = ck
        .tensor_names()
        .map(|n| {
            let r = ck.raw(n).unwrap();
            (n.to_string(), T { dtype: st_dtype(r.dtype), shape: r.shape.to_vec(), data: r.data.to_vec() })
        })
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    Fixture { dir, config: cfg.to_json(), tensors }
}

fn write_st(path: &Path, tensors: &BTreeMap<String, T>) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, t)| (n.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    safetensors::tensor::serialize_to_file(views, &None, path).unwrap();
}

impl Fixture {
    /// Writes config.json and a single model.safetensors.
    fn write_single(&self) -> &Path {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).unwrap();
        std::fs::write(self.dir.join("config.json"), self.config.to_string()).unwrap();
        write_st(&self.dir.join("model.safetensors"), &self.tensors);
        &self.dir
    }
    /// Writes config.json, two shards (split by name) and an index.
    fn write_sharded(&self) -> &Path {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).unwrap();
        std::fs::write(self.dir.join("config.json"), self.config.to_string()).unwrap();
        let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
        let mut map = serde_json::Map::new();
        for (i, (n, t)) in self.tensors.iter().enumerate() {
            let (dst, f) = if i % 2 == 0 { (&mut a, "a.safetensors") } else { (&mut b, "b.safetensors") };
            dst.insert(n.clone(), t.clone());
            map.insert(n.clone(), json!(f));
        }
        write_st(&self.dir.join("a.safetensors"), &a);
        write_st(&self.dir.join("b.safetensors"), &b);
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(self.dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        &self.dir
    }
    fn open_err(&self, dir: &Path) -> String {
        let e = Checkpoint::open(dir).expect_err("the reader must refuse this checkpoint").to_string();
        let _ = std::fs::remove_dir_all(&self.dir);
        e
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message {msg:?} lacks {p:?}");
    }
}

fn config_err(mutate: impl FnOnce(&mut Value)) -> String {
    let mut v = Qwen3MoeConfig::preset("tiny").unwrap().to_json();
    mutate(&mut v);
    Qwen3MoeConfig::from_json_str(&v.to_string()).expect_err("config must be refused").to_string()
}

// ---- config ----------------------------------------------------------------------------------------------------

#[test]
fn config_missing_key_names_it() {
    for key in ["vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "num_experts", "rms_norm_eps"] {
        let e = config_err(|v| {
            v.as_object_mut().unwrap().remove(key);
        });
        assert_has(&e, &["missing required key", &format!("`{key}`")]);
    }
    let e = config_err(|v| {
        v["quantization_config"].as_object_mut().unwrap().remove("weight_block_size");
    });
    assert_has(&e, &["missing required key `quantization_config.weight_block_size`"]);
    // intermediate_size is required only when a layer is dense.
    let e = config_err(|v| {
        v.as_object_mut().unwrap().remove("intermediate_size");
        v["mlp_only_layers"] = json!([1]);
    });
    assert_has(&e, &["missing required key `intermediate_size`"]);
}

#[test]
fn config_contradictions_name_the_key() {
    let e = config_err(|v| v["num_key_value_heads"] = json!(3));
    assert_has(&e, &["`num_key_value_heads`", "3 does not divide num_attention_heads = 4"]);
    let e = config_err(|v| v["num_experts_per_tok"] = json!(5));
    assert_has(&e, &["`num_experts_per_tok`", "5 is not in 1..=num_experts = 4"]);
    let e = config_err(|v| v["mlp_only_layers"] = json!([0, 3]));
    assert_has(&e, &["`mlp_only_layers`", "layer 3 is out of range (num_hidden_layers = 3)"]);
    let e = config_err(|v| v["decoder_sparse_step"] = json!(0));
    assert_has(&e, &["`decoder_sparse_step`", "expected a positive integer, found 0"]);
    let e = config_err(|v| v["head_dim"] = json!(47));
    assert_has(&e, &["`head_dim`", "even"]);
    let e = config_err(|v| v["hidden_size"] = json!("192"));
    assert_has(&e, &["`hidden_size`", "expected a non-negative integer, found \"192\""]);
    let e = config_err(|v| v["rms_norm_eps"] = json!(-1.0));
    assert_has(&e, &["`rms_norm_eps`", "positive finite"]);
    let e = config_err(|v| v["model_type"] = json!("llama"));
    assert_has(&e, &["`model_type`", "\"qwen3_moe\"", "\"llama\""]);
    let e = config_err(|v| v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0}));
    assert_has(&e, &["`rope_scaling`", "not supported"]);
    let e = config_err(|v| v["quantization_config"]["quant_method"] = json!("gptq"));
    assert_has(&e, &["`quantization_config.quant_method`", "\"gptq\""]);
    let e = config_err(|v| v["quantization_config"]["activation_scheme"] = json!("static"));
    assert_has(&e, &["`quantization_config.activation_scheme`", "\"static\""]);
    let e = config_err(|v| v["quantization_config"]["weight_block_size"] = json!([128]));
    assert_has(&e, &["`quantization_config.weight_block_size`", "two positive integers"]);
}

#[test]
fn config_bad_json_and_unknown_keys() {
    let e = Qwen3MoeConfig::from_json_str("{\"vocab_size\": 3,").unwrap_err().to_string();
    assert_has(&e, &["config.json: invalid JSON"]);
    let e = Qwen3MoeConfig::from_json_str("[1, 2]").unwrap_err().to_string();
    assert_has(&e, &["config.json: invalid JSON", "expected an object"]);
    let mut v = Qwen3MoeConfig::preset("tiny").unwrap().to_json();
    v["some_future_key"] = json!({"nested": [1, 2, 3]});
    v["transformers_version"] = json!("4.99.0");
    assert_eq!(Qwen3MoeConfig::from_json_str(&v.to_string()).unwrap(), Qwen3MoeConfig::preset("tiny").unwrap());
}

#[test]
fn open_reports_bad_config_json_file() {
    let f = fixture("badcfgjson");
    let dir = f.write_single();
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert_has(&f.open_err(dir), &["config.json: invalid JSON"]);
}

// ---- tensors ---------------------------------------------------------------------------------------------------

#[test]
fn missing_tensor() {
    let mut f = fixture("missing");
    f.tensors.remove("model.layers.1.self_attn.k_norm.weight");
    let dir = f.write_single();
    assert_has(&f.open_err(dir), &["missing tensor `model.layers.1.self_attn.k_norm.weight`", "[48]"]);
    let mut f = fixture("missing-scale");
    f.tensors.remove("model.layers.2.mlp.experts.3.down_proj.weight_scale_inv");
    let dir = f.write_single();
    assert_has(&f.open_err(dir), &["missing tensor `model.layers.2.mlp.experts.3.down_proj.weight_scale_inv`"]);
}

#[test]
fn unexpected_extra_tensor_is_an_error() {
    let mut f = fixture("extra");
    let t = T { dtype: StDtype::BF16, shape: vec![192], data: vec![0; 384] };
    f.tensors.insert("model.layers.0.self_attn.o_proj.bias".into(), t.clone());
    let dir = f.write_single();
    assert_has(&f.open_err(dir), &["model.safetensors: unexpected tensor `model.layers.0.self_attn.o_proj.bias`"]);
    // Expert index out of range, and a non-canonical layer index.
    let mut f = fixture("extra2");
    let e = f.tensors["model.layers.0.mlp.experts.0.up_proj.weight"].clone();
    f.tensors.insert("model.layers.0.mlp.experts.4.up_proj.weight".into(), e);
    let dir = f.write_single();
    assert_has(&f.open_err(dir), &["unexpected tensor `model.layers.0.mlp.experts.4.up_proj.weight`"]);
    let mut f = fixture("extra3");
    f.tensors.insert("model.layers.01.input_layernorm.weight".into(), t);
    let dir = f.write_single();
    assert_has(&f.open_err(dir), &["unexpected tensor `model.layers.01.input_layernorm.weight`"]);
}

#[test]
fn wrong_dtype() {
    let mut f = fixture("dtype");
    let name = "model.layers.0.self_attn.q_proj.weight";
    let t = f.tensors.get_mut(name).unwrap();
    t.dtype = StDtype::I32;
    t.shape = vec![48, 192]; // same byte count as F8 [192, 192]
    let dir = f.write_single();
    let e = f.open_err(dir);
    assert_has(&e, &["model.safetensors: tensor `model.layers.0.self_attn.q_proj.weight`", "wrong dtype"]);
    // A Linear the config calls FP8 may also be stored in float (tests/checkpoint_compat.rs), not as an integer.
    assert_has(&e, &["expected F8_E4M3 (with block scales) or BF16|F16|F32, found I32"]);
    let mut f = fixture("dtype2");
    let t = f.tensors.get_mut("model.norm.weight").unwrap();
    t.dtype = StDtype::I32;
    t.shape = vec![96];
    let dir = f.write_single();
    assert_has(&f.open_err(dir), &["tensor `model.norm.weight`: wrong dtype: expected BF16|F16|F32, found I32"]);
    let mut f = fixture("dtype3");
    // A router: float, or F8_E4M3 with its block scales (dequantized at load, tests/checkpoint_compat.rs).
    let t = f.tensors.get_mut("model.layers.1.mlp.gate.weight").unwrap();
    t.dtype = StDtype::I32;
    t.shape = vec![2, 192];
    let dir = f.write_single();
    assert_has(
        &f.open_err(dir),
        &["`model.layers.1.mlp.gate.weight`: wrong dtype: expected BF16|F16|F32 or F8_E4M3 (with block scales), found I32"],
    );
}

#[test]
fn wrong_shape() {
    let mut f = fixture("shape");
    let t = f.tensors.get_mut("model.layers.2.self_attn.k_proj.weight").unwrap();
    t.shape = vec![192, 96]; // transposed
    let dir = f.write_single();
    assert_has(
        &f.open_err(dir),
        &["tensor `model.layers.2.self_attn.k_proj.weight`: wrong shape: expected [96, 192], found [192, 96]"],
    );
}

#[test]
fn wrong_block_scale_shape() {
    let mut f = fixture("scale");
    let t = f.tensors.get_mut("model.layers.0.self_attn.q_proj.weight_scale_inv").unwrap();
    assert_eq!(t.shape, vec![2, 2]);
    t.shape = vec![4, 1];
    let dir = f.write_single();
    assert_has(
        &f.open_err(dir),
        &[
            "tensor `model.layers.0.self_attn.q_proj.weight_scale_inv`: wrong block-scale shape",
            "expected [2, 2] (weight [192, 192], blocks [128, 128]), found [4, 1]",
        ],
    );
}

#[test]
fn bad_scale_value() {
    let mut f = fixture("scalenan");
    let t = f.tensors.get_mut("model.layers.1.self_attn.o_proj.weight_scale_inv").unwrap();
    t.data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    let dir = f.write_single();
    assert_has(
        &f.open_err(dir),
        &["`model.layers.1.self_attn.o_proj.weight_scale_inv`: bad block scale NaN at element 1"],
    );
}

#[test]
fn truncated_file() {
    let f = fixture("trunc");
    let dir = f.write_single();
    let p = dir.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    file.set_len(len - 1000).unwrap();
    let e = f.open_err(dir);
    assert_has(&e, &["model.safetensors: truncated: the header describes", "bytes of tensor data, the file holds"]);
    // Cut inside the header.
    let f = fixture("trunc2");
    let dir = f.write_single();
    let file = std::fs::OpenOptions::new().write(true).open(dir.join("model.safetensors")).unwrap();
    file.set_len(100).unwrap();
    assert_has(&f.open_err(dir), &["model.safetensors: truncated"]);
    // Shorter than the length prefix.
    let f = fixture("trunc3");
    let dir = f.write_single();
    std::fs::write(dir.join("model.safetensors"), [1u8, 2, 3]).unwrap();
    assert_has(
        &f.open_err(dir),
        &["model.safetensors: bad safetensors header", "shorter than the 8-byte header length"],
    );
}

#[test]
fn broken_header_json() {
    let f = fixture("hdr");
    let dir = f.write_single();
    let p = dir.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b[8] = b'['; // header starts with '{'
    std::fs::write(&p, &b).unwrap();
    assert_has(&f.open_err(dir), &["model.safetensors: bad safetensors header: header is not valid JSON"]);
    // Valid JSON, bad entry.
    let f = fixture("hdr2");
    let dir = f.write_single();
    let p = dir.join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&b[8..8 + n]).unwrap().replacen("\"F32\"", "\"F31\"", 1);
    let mut out = b[..8].to_vec();
    out.extend(text.as_bytes());
    out.extend(&b[8 + n..]);
    std::fs::write(&p, &out).unwrap();
    assert_has(&f.open_err(dir), &["bad safetensors header: tensor `", "unknown variant `F31`, expected one of"]);
    // Overlapping offsets.
    let f = fixture("hdr3");
    let dir = f.write_single();
    let p = dir.join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let o = h.as_object_mut().unwrap();
    let first = o.keys().find(|k| *k != "__metadata__").unwrap().clone();
    let e = o[&first]["data_offsets"].as_array().unwrap().clone();
    let (s, t) = (e[0].as_u64().unwrap(), e[1].as_u64().unwrap());
    o[&first]["data_offsets"] = json!([s + 1, t + 1]);
    let text = h.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out.extend(&b[8 + n..]);
    std::fs::write(&p, &out).unwrap();
    assert_has(&f.open_err(dir), &["bad safetensors header: tensor `", "expected the data to start at"]);
}

/// Header defects in hand-made files (the safetensors crate validates; our messages add file, tensor and numbers).
#[test]
fn header_layout_errors_name_file_and_tensor() {
    let cfg = Qwen3MoeConfig::preset("tiny").unwrap().to_json().to_string();
    let open = |header: &str, data: usize| {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend(header.as_bytes());
        f.extend(vec![0x3Cu8; data]);
        Checkpoint::from_memory(&cfg, None, vec![("model.safetensors".into(), f)]).unwrap_err().to_string()
    };
    let t = |dtype: &str, shape: &str, b: u64, e: u64| {
        format!(
            r#"{{"__metadata__": {{"format": "pt"}}, "w": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": [{b}, {e}]}}}}"#
        )
    };
    // Offsets that do not match dtype x shape.
    let e = open(&t("F32", "[2]", 0, 4), 4);
    assert_has(&e, &["model.safetensors: bad safetensors header: tensor `w`", "span 4 bytes, but F32 [2] needs 8"]);
    // A gap before the first tensor.
    let e = open(&t("F32", "[1]", 4, 8), 8);
    assert_has(&e, &["tensor `w`: data_offsets [4, 8]: expected the data to start at 0"]);
    // Data section shorter than the header says, and longer.
    let e = open(&t("F32", "[2]", 0, 8), 5);
    assert_has(&e, &["model.safetensors: truncated: the header describes 8 bytes of tensor data, the file holds 5"]);
    let e = open(&t("F32", "[2]", 0, 8), 9);
    assert_has(
        &e,
        &["model.safetensors: bad safetensors header: 1 trailing bytes after the last tensor (data ends at 8)"],
    );
    // An end offset near u64::MAX (the crate's own size check would overflow): truncated, no panic.
    let big = u64::MAX - 5;
    let e = open(&t("U8", &format!("[{big}]"), 0, big), 0);
    assert_has(&e, &["model.safetensors: truncated", &format!("describes {big} bytes")]);
    // A shape whose byte count overflows.
    let e = open(&t("F32", &format!("[{}, 8]", 1u64 << 62), 0, 0), 0);
    assert_has(&e, &["tensor `w`: F32 [4611686018427387904, 8] overflows the byte count"]);
    // Entry and __metadata__ problems, JSON that is not an object.
    let e = open(r#"{"w": {"dtype": "F32", "shape": [1]}}"#, 0);
    assert_has(&e, &["bad safetensors header: tensor `w`: missing field `data_offsets`"]);
    let e = open(r#"{"__metadata__": {"format": 1}}"#, 0);
    assert_has(&e, &["bad safetensors header: `__metadata__` is not a map of strings"]);
    let e = open("[1]", 0);
    assert_has(&e, &["model.safetensors: bad safetensors header: header is not a JSON object"]);
    // A header length beyond the crate's 100 MB limit.
    let mut f = (200_000_000u64).to_le_bytes().to_vec();
    f.extend(b"{}");
    let e = Checkpoint::from_memory(&cfg, None, vec![("model.safetensors".into(), f)]).unwrap_err().to_string();
    assert_has(
        &e,
        &["model.safetensors: bad safetensors header: header length 200000000 exceeds the 100000000-byte limit"],
    );
}

#[test]
fn index_names_missing_shard() {
    let f = fixture("noshard");
    let dir = f.write_sharded();
    std::fs::remove_file(dir.join("b.safetensors")).unwrap();
    assert_has(
        &f.open_err(dir),
        &["model.safetensors.index.json: weight_map names shard `b.safetensors`, which does not exist"],
    );
}

#[test]
fn index_points_to_file_lacking_tensor() {
    let f = fixture("wrongshard");
    let dir = f.write_sharded();
    let p = dir.join("model.safetensors.index.json");
    let mut idx: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let name = "model.embed_tokens.weight";
    let was = idx["weight_map"][name].as_str().unwrap().to_string();
    let other = if was == "a.safetensors" { "b.safetensors" } else { "a.safetensors" };
    idx["weight_map"][name] = json!(other);
    std::fs::write(&p, idx.to_string()).unwrap();
    assert_has(
        &f.open_err(dir),
        &[&format!("weight_map puts tensor `{name}` in `{other}`, but that file has no such tensor")],
    );
}

#[test]
fn index_problems() {
    // A tensor in a shard but not in the weight_map.
    let f = fixture("unlisted");
    let dir = f.write_sharded();
    let p = dir.join("model.safetensors.index.json");
    let mut idx: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let file = idx["weight_map"]["model.norm.weight"].as_str().unwrap().to_string();
    idx["weight_map"].as_object_mut().unwrap().remove("model.norm.weight");
    std::fs::write(&p, idx.to_string()).unwrap();
    assert_has(&f.open_err(dir), &[&format!("{file}: tensor `model.norm.weight` is not listed for this file")]);
    // Path escapes and bad JSON.
    let f = fixture("escape");
    let dir = f.write_sharded();
    let p = dir.join("model.safetensors.index.json");
    std::fs::write(&p, json!({"weight_map": {"model.norm.weight": "../x.safetensors"}}).to_string()).unwrap();
    assert_has(&f.open_err(dir), &["bad index", "`../x.safetensors` is not a plain file name"]);
    let f = fixture("idxjson");
    let dir = f.write_sharded();
    std::fs::write(dir.join("model.safetensors.index.json"), "{\"weight_map\": ").unwrap();
    assert_has(&f.open_err(dir), &["model.safetensors.index.json: invalid JSON"]);
    // The same tensor in two shards.
    let f = fixture("dup");
    let dir = f.write_sharded();
    let mut extra = BTreeMap::new();
    extra.insert("model.norm.weight".to_string(), f.tensors["model.norm.weight"].clone());
    write_st(&dir.join("c.safetensors"), &extra);
    let p = dir.join("model.safetensors.index.json");
    let mut idx: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    idx["weight_map"]["zz.dummy"] = json!("c.safetensors");
    std::fs::write(&p, idx.to_string()).unwrap();
    assert_has(&f.open_err(dir), &["tensor `model.norm.weight` appears in both"]);
}

#[test]
fn no_weights_at_all() {
    let f = fixture("noweights");
    let dir = f.write_single();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_has(&f.open_err(dir), &["no model.safetensors and no model.safetensors.index.json"]);
}

// ---- accepted variants -----------------------------------------------------------------------------------------

#[test]
fn tied_embeddings_lm_head_optional() {
    let mut f = fixture("tied");
    f.config["tie_word_embeddings"] = json!(true);
    let lm = f.tensors.remove("lm_head.weight").unwrap();
    f.tensors.remove("lm_head.weight_scale_inv");
    let dir = f.write_single();
    let ck = Checkpoint::open(dir).unwrap();
    assert!(!ck.contains("lm_head.weight") && ck.warnings().is_empty());
    // Present anyway (as bf16): accepted with a warning.
    f.tensors.insert(
        "lm_head.weight".into(),
        T { dtype: StDtype::BF16, shape: lm.shape.clone(), data: vec![0; lm.shape.iter().product::<usize>() * 2] },
    );
    let dir = f.write_single();
    let ck = Checkpoint::open(dir).unwrap();
    assert_eq!(ck.warnings().len(), 1, "{:?}", ck.warnings());
    assert!(ck.warnings()[0].contains("tie_word_embeddings"));
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[test]
fn bf16_checkpoint_without_quantization_config() {
    let dir = tmpdir("bf16");
    let mut cfg = Qwen3MoeConfig::preset("tiny").unwrap();
    cfg.quantization = None;
    write_checkpoint(&dir, &cfg, 1, &WriteOptions::default()).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(!text.contains("quantization_config"));
    let ck = Checkpoint::open(&dir).unwrap();
    assert!(ck.tensor_names().all(|n| ck.dtype(n).unwrap() == Dtype::BF16 && !n.ends_with("_scale_inv")));
    // An FP8 tensor in a bf16 checkpoint is a wrong dtype.
    std::fs::remove_dir_all(&dir).unwrap();
    let f = fixture("bf16-fp8");
    let mut f = f;
    f.config.as_object_mut().unwrap().remove("quantization_config");
    let dir = f.write_single();
    assert_has(&f.open_err(dir), &["wrong dtype: expected BF16|F16|F32, found F8_E4M3"]);
}

#[test]
fn float_tensors_in_any_float_dtype() {
    // The embedding as F32 and F16, a norm as F16: accepted and converted.
    let mut f = fixture("f32emb");
    let e = f.tensors.get_mut("model.embed_tokens.weight").unwrap();
    let vals: Vec<f32> = e.data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    e.dtype = StDtype::F32;
    e.data = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n = f.tensors.get_mut("model.norm.weight").unwrap();
    let nv: Vec<f32> = n.data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    n.dtype = StDtype::F16;
    n.data = nv.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let dir = f.write_single();
    let ck = Checkpoint::open(dir).unwrap();
    assert_eq!(ck.tensor_f32("model.embed_tokens.weight").unwrap(), vals);
    let got = ck.tensor_f32("model.norm.weight").unwrap();
    for (g, w) in got.iter().zip(&nv) {
        assert!((g - w).abs() <= 1e-3 * w.abs());
    }
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[test]
fn no_tensor_asked() {
    let dir = tmpdir("asked");
    write_checkpoint(&dir, &Qwen3MoeConfig::preset("tiny").unwrap(), 1, &WriteOptions::default()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_has(&ck.tensor_f32("model.nope").unwrap_err().to_string(), &["no tensor `model.nope`"]);
    assert!(ck.rows_f32("model.embed_tokens.weight", 319, 2).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_tensor_names_are_just_unexpected() {
    let cfg = Qwen3MoeConfig::preset("tiny").unwrap();
    let deep = format!("model.layers.0.self_attn.q_proj.weight{}", "_scale_inv".repeat(200_000));
    assert!(hga::model::checkpoint::spec_for(&cfg, &deep).is_none());
    for n in [
        "model.layers.+1.input_layernorm.weight",
        "model.layers.99999999999999999999.input_layernorm.weight",
        "model.layers..input_layernorm.weight",
        "lm_head.weight_scale_inv",
    ] {
        assert!(hga::model::checkpoint::spec_for(&cfg, n).is_none(), "{n}");
    }
    let e = config_err(|v| v["mlp_only_layers"] = json!(vec![0; 5000]));
    assert_has(&e, &["`mlp_only_layers`", "at most 4096 entries"]);
}
