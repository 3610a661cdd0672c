//! `hga selfcheck`: runs every kernel on this machine's GPU against its CPU reference on fresh random inputs and
//! prints a table (or JSON). The default job of `hga` with no arguments.
use anyhow::{bail, Context};
use clap::Args;
use hga::check::{self, Outcome};
use hga::kernels::selftest::ALL_SELFTESTS;
use rand::{rngs::StdRng, SeedableRng};

/// Options of the kernel self-check.
#[derive(Args, Debug, Default)]
pub struct SelfcheckArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Seed of the random inputs (default: from the clock; printed, so a failure can be replayed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: SelfcheckArgs) -> anyhow::Result<()> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    if hga::runtime::device_count() == 0 {
        eprintln!("hga selfcheck: no CUDA device found (no driver library, or no GPU): nothing to check here.");
        eprintln!(
            "The CPU-side tests run with `cargo test`; see the README for running the GPU tests on a GPU machine."
        );
        std::process::exit(2);
    }
    let gpu = hga::open_gpu(a.device).context("opening the GPU")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut results: Vec<Outcome> = Vec::new();
    for t in ALL_SELFTESTS {
        for n in selftest_sizes(t) {
            results.push(check::selftest(&gpu, t, n, &mut rng)?);
        }
    }
    for (rows, dim, fused) in [(1, 1, false), (7, 127, true), (3, 2048, false), (64, 2048, true), (5, 4099, true)] {
        results.push(check::rmsnorm(&gpu, rows, dim, fused, &mut rng)?);
    }
    for (rows, k) in [(1, 1), (5, 129), (16, 2048), (33, 4096), (3, 767)] {
        results.push(check::fp8_quant(&gpu, rows, k, &mut rng)?);
    }
    // The kernels of the GPU forward, at Qwen3-30B-A3B shapes and small odd ones.
    use hga::kernels::gemm::Fp8LinearKernel;
    for (kernel, m, n, k) in [
        (Fp8LinearKernel::Decode, 1, 4096, 2048),
        (Fp8LinearKernel::Decode, 5, 768, 2048),
        (Fp8LinearKernel::Prefill, 129, 2048, 768),
        (Fp8LinearKernel::Prefill, 256, 512, 2048),
        (Fp8LinearKernel::PrefillF16V3, 129, 2048, 768),
        (Fp8LinearKernel::PrefillF16V3, 256, 512, 2048),
    ] {
        results.push(check::gemm::fp8_linear(&gpu, kernel, m, n, k, &mut rng)?);
    }
    for (rows, dim, fused) in [(1, 2048, true), (37, 2048, false)] {
        results.push(check::gemm::rmsnorm_fp8_quant(&gpu, rows, dim, fused, &mut rng)?);
    }
    for (tokens, nh, nkv) in [(1, 32, 4), (77, 32, 4), (5, 8, 8)] {
        results.push(check::rope::qk_norm_rope(&gpu, tokens, nh, nkv, tokens > 1, &mut rng)?);
    }
    for (path, tokens, start) in [
        (check::attention::Path::Decode, 1, 1500),
        (check::attention::Path::DecodeUpTo, 1, 1500),
        (check::attention::Path::DecodeUpTo, 3, 700),
        (check::attention::Path::Prefill, 130, 0),
        (check::attention::Path::Prefill, 64, 300),
    ] {
        let s = hga::kernels::AttentionShape { tokens, n_heads: 32, n_kv_heads: 4, capacity: start + tokens, start };
        results.push(check::attention::attention(&gpu, path, s, &mut rng)?);
    }
    results.extend(check::hga_attend::selfcheck_rows(&gpu, &mut rng)?);
    for t in [1, 4, 37] {
        let d = hga::reference::moe::MoeDims::qwen3_30b_a3b(t);
        let path = if t <= 4 { check::moe::MoePath::Decode } else { check::moe::MoePath::Grouped };
        results.push(check::moe::moe(&gpu, &d, path, &mut rng)?);
        if t == 1 {
            let inp = check::moe::random_inputs(&d, &mut rng);
            results.push(check::moe::norm_in_router_matches_separate(&gpu, &d, &inp, &mut rng, 3)?);
        }
    }
    results.push(check::head::embed_gather(&gpu, 7, 1000, 2048, &mut rng)?);
    results.push(check::head::lm_head(&gpu, 3, 4099, 2048, &mut rng)?);
    results.push(check::head::argmax(&gpu, 4, 151936, &mut rng)?);
    results.push(check::head::sample(&gpu, 2, 32000, &mut rng)?);
    results.extend(check::hga_route::selfcheck_rows(&gpu, &mut rng)?);
    results.extend(check::kv::selfcheck_rows(&gpu, &mut rng)?);
    let failed = results.iter().filter(|r| !r.ok).count();
    if a.json {
        let rows: Vec<_> = results
            .iter()
            .map(|r| serde_json::json!({"kernel": r.kernel, "shape": r.shape, "rel_err": r.rel_err, "ok": r.ok, "detail": r.detail}))
            .collect();
        let doc = serde_json::json!({
            "device": gpu.device_name(), "image": gpu.image_name(), "pdl": gpu.pdl_enabled(), "seed": seed,
            "checks": rows, "failed": failed,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("device: {}  image: {}  PDL: {}  seed: {seed}", gpu.device_name(), gpu.image_name(), gpu.pdl_state());
        println!("{:<26} {:<26} {:>10}  result", "kernel", "shape", "rel err");
        for r in &results {
            println!(
                "{:<26} {:<26} {:>10.2e}  {}",
                r.kernel,
                r.shape,
                r.rel_err,
                if r.ok { "ok".to_string() } else { format!("FAIL: {}", r.detail) }
            );
        }
        println!("{} checks, {failed} failed", results.len());
    }
    if failed > 0 {
        bail!("{failed} kernel checks failed (seed {seed})");
    }
    Ok(())
}

fn selftest_sizes(t: hga::kernels::SelfTest) -> Vec<usize> {
    use hga::kernels::SelfTest::*;
    match t {
        Smem => vec![1, 33, 1024],
        Warp => vec![32, 256],
        Math | Convert => vec![1, 1000],
        Ldmatrix => vec![1],
        MmaBf16 | MmaE4m3 => vec![1, 5],
        CpAsync => vec![1, 2, 127, 128],
    }
}
