//! Timing and input helpers shared by the benchmarks.
#![allow(dead_code)]
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use hga::runtime::Gpu;

/// Median device time in ms of `f(i)` over `iters` runs (each between two events), after `warmup` runs.
pub fn time_ms(gpu: &Gpu, warmup: usize, iters: usize, mut f: impl FnMut(usize)) -> f64 {
    let ctx = gpu.context();
    for i in 0..warmup {
        f(i);
    }
    let mut t = Vec::with_capacity(iters);
    for i in 0..iters {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        a.record(gpu.stream()).unwrap();
        f(i);
        b.record(gpu.stream()).unwrap();
        b.synchronize().unwrap();
        t.push(a.elapsed_ms(&b).unwrap() as f64);
    }
    t.sort_by(|x, y| x.partial_cmp(y).unwrap());
    t[t.len() / 2]
}

/// Median device time in ms of one `f(i)` with no host launch cost in the figure: `f(0) .. f(reps - 1)` are
/// recorded into one CUDA graph ([`Gpu::capture`]) that is replayed `iters` times (after one warm-up replay)
/// between two events; each replay's time is divided by `reps`. `f` must only enqueue device work (no sync, no
/// host copy). If the capture fails, says so and falls back to [`time_ms`] (host launch cost included).
pub fn time_graph_ms(gpu: &Gpu, reps: usize, iters: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..reps {
        f(i); // warm-up, and every kernel's function handle loaded before the capture
    }
    gpu.synchronize().unwrap();
    let graph = match gpu.capture(|| {
        for i in 0..reps {
            f(i);
        }
        Ok(())
    }) {
        Ok(g) => g,
        Err(e) => {
            println!("  (graph capture failed: {e}; timing with host launches instead)");
            return time_ms(gpu, 5, iters * reps, f);
        }
    };
    graph.launch().unwrap();
    let ctx = gpu.context();
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        a.record(gpu.stream()).unwrap();
        graph.launch().unwrap();
        b.record(gpu.stream()).unwrap();
        b.synchronize().unwrap();
        t.push(a.elapsed_ms(&b).unwrap() as f64 / reps as f64);
    }
    t.sort_by(|x, y| x.partial_cmp(y).unwrap());
    t[t.len() / 2]
}

/// `n` pseudo-random bf16 values, uniform in [-amp, amp) (xorshift; never all zeros).
pub fn rand_bf16(n: usize, seed: u64, amp: f32) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 * amp - amp)
        })
        .collect()
}
