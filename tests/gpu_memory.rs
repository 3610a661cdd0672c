//! GPU test of the memory accountant (`hga::memory`) behind `Gpu::alloc_zeros` / `Gpu::upload`: a limit too small
//! for a workspace makes its constructor fail with `RuntimeError::OverCap` naming it (and a constructor that fails
//! half way gives back what it had taken), a generous limit lets it through with its bytes booked under its label,
//! dropping it gives them back, the peak samples the device, an upload round-trips, and an allocation the driver
//! cannot satisfy becomes `RuntimeError::OutOfMemory` naming what. One test function: the limit is a property of
//! the binary's one shared `Gpu`.
//! Without a CUDA device: one SKIP line.
mod common;
use common::gpu;

use hga::kernels::moe::{MoeWorkspace, MOE_WORKSPACE};
use hga::kernels::DecodeWorkspace;
use hga::reference::moe::MoeDims;
use hga::runtime::RuntimeError;

#[test]
fn gpu_memory_limit_is_enforced_and_reported() {
    let Some(gpu) = gpu("gpu_memory_limit_is_enforced_and_reported") else { return };
    let mem = gpu.memory();
    let base = mem.live();
    // DecodeWorkspace::new(1 token, 32 heads, 256 splits): part_o f32 [256][32][128], part_lse f32 [256][32].
    let (part_o, part_lse) = (256 * 32 * 128 * 4u64, 256 * 32 * 4u64);

    // Too small for the first buffer: refused before the driver is asked, nothing held.
    gpu.set_memory_limit(Some(base + 4096));
    match DecodeWorkspace::new(gpu, 1, 32, 256) {
        Err(RuntimeError::OverCap(e)) => {
            assert_eq!((e.what, e.bytes, e.limit), ("attention workspace", part_o, base + 4096));
            let m = e.to_string();
            eprintln!("refused as expected: {m}");
            assert!(m.contains("attention workspace of 4.0 MiB (4194304 bytes) does not fit"), "{m}");
        }
        Err(e) => panic!("expected OverCap, got {e}"),
        Ok(_) => panic!("a 4 MiB workspace fit under a limit of 4 KiB above {base} bytes"),
    }
    assert_eq!(mem.live(), base);

    // Room for part_o but not part_lse: the constructor fails and part_o is given back.
    gpu.set_memory_limit(Some(base + part_o + 100));
    let Err(RuntimeError::OverCap(e)) = DecodeWorkspace::new(gpu, 1, 32, 256) else {
        panic!("expected OverCap for part_lse")
    };
    assert_eq!((e.bytes, e.live), (part_lse, base + part_o));
    assert_eq!(mem.live(), base, "a failed constructor kept memory booked");

    // Generous: granted and booked under its label; dropping gives it back.
    gpu.set_memory_limit(Some(base + (64 << 20)));
    let ws = DecodeWorkspace::new(gpu, 1, 32, 256).expect("a 4 MiB workspace under a 64 MiB limit");
    assert_eq!(ws.lens(), (256 * 32 * 128, 256 * 32));
    assert_eq!(mem.live(), base + part_o + part_lse);
    assert_eq!(mem.live_of("attention workspace"), part_o + part_lse);
    let d = MoeDims { tokens: 1, hidden: 256, inter: 128, experts: 8, top_k: 2, norm_topk: true };
    let moe = MoeWorkspace::new(gpu, &d, 4, true).expect("a small MoE workspace under a 64 MiB limit");
    assert!(mem.live_of(MOE_WORKSPACE) > 0);
    let r = mem.report();
    eprintln!("{r}");
    assert!(r.peak >= base + part_o + part_lse + mem.live_of(MOE_WORKSPACE));
    let used = r.device_used_at_peak.expect("the peak samples cuMemGetInfo on a device");
    assert!(used >= r.peak && r.device_total.is_some_and(|t| t >= used), "{r}");
    drop((ws, moe));
    assert_eq!(mem.live(), base);
    assert_eq!(mem.live_of("attention workspace"), 0);

    // An upload round-trips through the DeviceBuf (DevicePtr by delegation) and is booked.
    let v: Vec<u32> = (0..1000).map(|i| i * 7 + 3).collect();
    let buf = gpu.upload("test upload", &v).unwrap();
    assert_eq!(mem.live_of("test upload"), 4000);
    assert_eq!(gpu.stream().clone_dtoh(&buf).unwrap(), v);
    drop(buf);

    // No limit, but more than the device has: the driver's out-of-memory names what.
    gpu.set_memory_limit(None);
    let (_, total) = mem.device_now().expect("cuMemGetInfo");
    match gpu.alloc_zeros::<u8>("impossible buffer", 2 * total as usize) {
        Err(e @ RuntimeError::OutOfMemory { .. }) => {
            let m = e.to_string();
            eprintln!("driver refused as expected: {m}");
            assert!(m.contains("impossible buffer") && m.contains(&format!("{} bytes", 2 * total)), "{m}");
        }
        Err(e) => panic!("expected OutOfMemory, got {e}"),
        Ok(_) => panic!("allocated twice the device's memory"),
    }
    assert_eq!(mem.live(), base);
}
