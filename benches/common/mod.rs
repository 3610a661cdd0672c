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
