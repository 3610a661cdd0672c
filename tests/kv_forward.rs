//! The CPU forward with its K/V history in each tier (plain, host arena, disk tier with both io modes and a RAM
//! cache small enough to evict): the logits are bit-identical to the plain forward, in prefill and in decode, with
//! dense attention and with the HGA policy, on the tiny preset and on the committed fixture. A missing directory
//! and a disk that fills up under the forward stop it with the K/V error, the tokens accepted before staying right.
use std::path::{Path, PathBuf};
use std::process::Command;

use hga::hga::{Budget, HgaAttention, HgaParams};
use hga::kv::arena::BlockFormat;
use hga::kv::disk::page_bytes;
use hga::kv::store::IoMode;
use hga::kv::KvTier;
use hga::model::checkpoint::Checkpoint;
use hga::model::config::Qwen3MoeConfig;
use hga::model::forward::{ActivationMode, CpuModel, ForwardError, KvCache};
use hga::model::generate::{write_checkpoint, WriteOptions};

mod common;

fn tmpdir(tag: &str) -> PathBuf {
    common::tmpdir("hga-kvf", tag)
}

fn tiny(tag: &str) -> PathBuf {
    let dir = tmpdir(tag).join("model");
    write_checkpoint(&dir, &Qwen3MoeConfig::preset("tiny").unwrap(), 7, &WriteOptions::default()).unwrap();
    dir
}

/// The tiers compared with plain: host, and disk (uring, pread) with a RAM cache of `cache` bytes.
fn tiers(dir: &Path, cache: u64) -> Vec<KvTier> {
    vec![KvTier::host(), KvTier::disk(dir, cache, IoMode::Uring), KvTier::disk(dir, cache, IoMode::Pread)]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Prefill of `tokens[..split]`, then decode of the rest, in `tier`; the logits rows and the cache.
fn run(model: &CpuModel, tier: KvTier, tokens: &[u32], split: usize) -> (Vec<f32>, KvCache) {
    let mut cache = KvCache::with_tier(model.config(), tier);
    let mut out = model.prefill(&tokens[..split], &mut cache).unwrap().data;
    for &t in &tokens[split..] {
        out.extend(model.decode(t, &mut cache).unwrap());
    }
    (out, cache)
}

/// `pages`: the disk tier's RAM cache in pages of the model's format.
/// `all`: both io modes of the disk tier (else uring only).
fn check_tiers(model: &CpuModel, dir: &Path, pages: usize, tokens: &[u32], split: usize, all: bool, what: &str) {
    let cache_bytes = (pages * page_bytes(&model.kv_block_format())) as u64;
    let (want, _) = run(model, KvTier::plain(), tokens, split);
    assert!(want.iter().all(|v| v.is_finite()));
    for tier in tiers(dir, cache_bytes).into_iter().take(if all { 3 } else { 2 }) {
        let (got, cache) = run(model, tier.clone(), tokens, split);
        assert!(bits(&got) == bits(&want), "{what}: tier {} changes the logits", tier.describe());
        let st = cache.store().expect("a store").stats();
        eprintln!("{what}: {}", cache.kv_report().unwrap());
        if tier.kind == hga::kv::store::TierKind::Disk {
            assert!(st.misses > 0 && st.evictions > 0 && st.pages_written > 0, "{what}: no eviction to disk: {st:?}");
        }
    }
}

#[test]
fn tiny_logits_are_bit_identical_in_every_tier() {
    let mdir = tiny("tiny");
    let kdir = tmpdir("tiny-kv");
    let ckpt = Checkpoint::open(&mdir).unwrap();
    let tokens: Vec<u32> = (0..70).map(|i| (i * 37 % 300) as u32).collect();
    // 3 layers x 2 KV heads, head_dim 48: 6 open groups; 16 pages force evictions.
    for mode in [ActivationMode::F32, ActivationMode::Fp8Bf16] {
        let model = CpuModel::load(&ckpt, mode).unwrap();
        check_tiers(&model, &kdir, 16, &tokens, 37, true, &format!("tiny {mode} dense"));
    }
    // The HGA policy reads its history through the store too (a geometry that routes at 70 tokens).
    let p = HgaParams { chunk: 16, group: 8, sink: 8, local: 16, budget: Budget::Tokens(40), ..HgaParams::default() };
    let model = CpuModel::load(&ckpt, ActivationMode::F32)
        .unwrap()
        .with_attention_policy(Box::new(HgaAttention::new(p).unwrap()));
    check_tiers(&model, &kdir, 16, &tokens, 50, true, "tiny f32 hga");
    // Each store removed its page file.
    assert_eq!(std::fs::read_dir(&kdir).unwrap().count(), 0);
}

#[test]
fn fixture_logits_are_bit_identical_and_stored_in_the_shared_format() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes"));
    let ckpt = Checkpoint::open(&dir).expect("the committed fixture");
    let kdir = tmpdir("fixture-kv");
    let text = std::fs::read(dir.join("eval/torch.txt")).unwrap();
    let tokens: Vec<u32> = text[..20].iter().map(|&b| b as u32).collect();
    // fp8-bf16 (the GPU's oracle): K/V are bf16, head_dim 128: the shared 8 KB group block, what the GPU stores.
    let model = CpuModel::load(&ckpt, ActivationMode::Fp8Bf16).unwrap();
    assert_eq!(model.kv_block_format(), BlockFormat::STANDARD);
    // 6 layers x 2 KV heads: 12 open groups; a cache of 20 pages under 2 groups (24) evicts.
    check_tiers(&model, &kdir, 20, &tokens, 17, false, "fixture fp8-bf16");
}

#[test]
fn a_missing_directory_stops_the_forward_with_its_error() {
    let mdir = tiny("missing");
    let model = CpuModel::load(&Checkpoint::open(&mdir).unwrap(), ActivationMode::F32).unwrap();
    let gone = mdir.join("no-such-dir");
    let mut cache = KvCache::with_tier(model.config(), KvTier::disk(&gone, 1 << 20, IoMode::Pread));
    let e = model.prefill(&[1, 2, 3], &mut cache).unwrap_err();
    assert!(matches!(e, ForwardError::Kv(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("does not exist") && msg.contains("no-such-dir"), "{msg}");
    assert_eq!(cache.len(), 0);
}

/// Decoding on a tmpfs of 64 KB: the page writes fail with "disk full" at some token; every token accepted before
/// has the plain forward's logits, the failing one is not accepted, and nothing panics.
#[test]
fn a_full_disk_stops_generation_with_the_accepted_tokens_right() {
    let Some(mnt) = common::tmpfs(&tmpdir("fwd-full"), "fwd-full", "64k") else { return };
    let mdir = tiny("full");
    let model = CpuModel::load(&Checkpoint::open(&mdir).unwrap(), ActivationMode::F32).unwrap();
    let tokens: Vec<u32> = (0..120).map(|i| (i * 11 % 300) as u32).collect();
    let (want, _) = run(&model, KvTier::plain(), &tokens, 1);
    let mut cache = KvCache::with_tier(model.config(), KvTier::disk(&mnt.0, 16 * 8192, IoMode::Uring));
    let vocab = model.config().vocab_size;
    let mut err = None;
    for (i, &t) in tokens.iter().enumerate() {
        match model.decode(t, &mut cache) {
            Ok(row) => assert!(bits(&row) == bits(&want[i * vocab..(i + 1) * vocab]), "token {i} differs"),
            Err(e) => {
                err = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = err.expect("a 64 KB tmpfs holds less than 120 tokens of the tiny model");
    let msg = e.to_string();
    assert!(msg.starts_with("disk full: writing K/V page file") && msg.contains("at offset"), "{msg}");
    assert_eq!(cache.len(), i, "the failing token must not be accepted");
    eprintln!("disk full after {i} tokens: {msg}");
    drop(cache);
}

/// `hga logits --backend cpu --kv-tier disk` writes the same logits as the plain tier.
#[test]
fn cli_logits_with_the_disk_tier() {
    let mdir = tiny("cli");
    let kdir = tmpdir("cli-kv");
    let tokens = "1,5,9,200,3,3,17,42,8,1,5,9,200,3,3,17,42,8,99,100";
    let logits = |extra: &[&str], out: &str| -> Vec<u8> {
        let out = kdir.parent().unwrap().join(out);
        let st = Command::new(env!("CARGO_BIN_EXE_hga"))
            .args(["logits", "--backend", "cpu", "--incremental", "--tokens", tokens, "--model"])
            .arg(&mdir)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let bytes = std::fs::read(&out).unwrap();
        let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        t.tensor("logits").unwrap().data().to_vec()
    };
    let plain = logits(&[], "plain.safetensors");
    let k = kdir.to_str().unwrap();
    let disk = logits(&["--kv-tier", "disk", "--kv-dir", k, "--host-kv-limit", "128K", "--kv-io", "pread"], "d.st");
    assert!(plain == disk, "the disk tier changed the CLI's logits");
    let out = Command::new(env!("CARGO_BIN_EXE_hga"))
        .args(["logits", "--tokens", "1", "--kv-tier", "disk", "--out", "/dev/null", "--model"])
        .arg(&mdir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --kv-dir"));
}
