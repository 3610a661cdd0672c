//! Launcher of the self-test kernels (gpu-kernels/src/selftest/): one safe function for the family, each kernel's
//! shape rules in [`SelfTest::layout`]. Host buffers in, host buffer out (these are tests, not hot paths).
use super::{dim_u32, launch};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::LaunchConfig;
use gpu_kernels::params::SelfTestParams;

/// The self-test kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfTest {
    /// n f32 (n <= 1024) -> 2n f32.
    Smem,
    /// n f32 (n a multiple of 32) -> 5n f32.
    Warp,
    /// n f32 -> 4n f32.
    Math,
    /// n f32 -> 5n u32.
    Convert,
    /// 32x8 bf16 (n = 1) -> 32 x 14 u32.
    Ldmatrix,
    /// n products of 1280 bytes -> n x 128 f32.
    MmaBf16,
    /// n products of 1280 bytes -> n x 128 f32.
    MmaE4m3,
    /// n 16-byte chunks (n <= 128) -> the same bytes.
    CpAsync,
}

pub const ALL_SELFTESTS: [SelfTest; 8] = [
    SelfTest::Smem,
    SelfTest::Warp,
    SelfTest::Math,
    SelfTest::Convert,
    SelfTest::Ldmatrix,
    SelfTest::MmaBf16,
    SelfTest::MmaE4m3,
    SelfTest::CpAsync,
];

struct Layout {
    kernel: &'static str,
    in_bytes: usize,
    out_bytes: usize,
    cfg: LaunchConfig,
}

fn cfg(grid: u32, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

impl SelfTest {
    /// The kernel's name.
    pub fn name(self) -> &'static str {
        match self {
            SelfTest::Smem => "hga_selftest_smem",
            SelfTest::Warp => "hga_selftest_warp",
            SelfTest::Math => "hga_selftest_math",
            SelfTest::Convert => "hga_selftest_convert",
            SelfTest::Ldmatrix => "hga_selftest_ldmatrix",
            SelfTest::MmaBf16 => "hga_selftest_mma_bf16",
            SelfTest::MmaE4m3 => "hga_selftest_mma_e4m3",
            SelfTest::CpAsync => "hga_selftest_cp_async",
        }
    }

    fn layout(self, n: usize) -> Result<Layout, RuntimeError> {
        let bad = |why: &str| Err(RuntimeError::Shape(format!("{self:?}: {why}, n = {n}")));
        if n == 0 {
            return bad("n must be > 0");
        }
        let n32 = dim_u32("selftest n", n)?;
        let elementwise = |kernel, outw: usize| Layout {
            kernel,
            in_bytes: 4 * n,
            out_bytes: 4 * outw * n,
            cfg: cfg(n32.div_ceil(128), 128, 0),
        };
        Ok(match self {
            SelfTest::Smem if n > 1024 => return bad("at most 1024"),
            SelfTest::Smem => {
                Layout { kernel: self.name(), in_bytes: 4 * n, out_bytes: 8 * n, cfg: cfg(1, n32, 8 * n32) }
            }
            SelfTest::Warp if !n.is_multiple_of(32) => return bad("must be a multiple of 32"),
            SelfTest::Warp => {
                Layout { kernel: self.name(), in_bytes: 4 * n, out_bytes: 20 * n, cfg: cfg(n32.div_ceil(64), 64, 0) }
            }
            SelfTest::Math => elementwise(self.name(), 4),
            SelfTest::Convert => elementwise(self.name(), 5),
            SelfTest::Ldmatrix if n != 1 => return bad("must be 1"),
            SelfTest::Ldmatrix => {
                Layout { kernel: self.name(), in_bytes: 512, out_bytes: 32 * 14 * 4, cfg: cfg(1, 32, 512) }
            }
            SelfTest::MmaBf16 => {
                Layout { kernel: self.name(), in_bytes: 1280 * n, out_bytes: 512 * n, cfg: cfg(n32, 32, 0) }
            }
            SelfTest::MmaE4m3 => {
                Layout { kernel: self.name(), in_bytes: 1280 * n, out_bytes: 512 * n, cfg: cfg(n32, 32, 0) }
            }
            SelfTest::CpAsync if n > 128 => return bad("at most 128"),
            SelfTest::CpAsync => {
                Layout { kernel: self.name(), in_bytes: 16 * n, out_bytes: 16 * n, cfg: cfg(1, 64, 16 * n32) }
            }
        })
    }
}

/// Runs self-test kernel `t` over `input` (its layout in [`SelfTest`]) and returns the output bytes. The output
/// buffer is poisoned (0xFF bytes: NaN as f32) before the launch, so unwritten elements show.
pub fn hga_selftest(gpu: &Gpu, t: SelfTest, input: &[u8], n: usize) -> Result<Vec<u8>, RuntimeError> {
    let l = t.layout(n)?;
    if input.len() != l.in_bytes {
        return Err(RuntimeError::Shape(format!("{t:?}: input is {} bytes, expected {}", input.len(), l.in_bytes)));
    }
    let s = gpu.stream();
    let din = s.clone_htod(input)?;
    let mut dout = s.clone_htod(&vec![0xFFu8; l.out_bytes])?;
    {
        let (pi, _a) = super::dptr(gpu, &din);
        let (po, _b) = super::dptr_mut(gpu, &mut dout);
        let p = SelfTestParams { input: pi, output: po, n: n as u32, _pad: 0 };
        // SAFETY: buffer sizes match the kernel's layout (checked above).
        unsafe { launch(gpu, l.kernel, l.cfg, p)? };
    }
    let out = s.clone_dtoh(&dout)?;
    gpu.synchronize()?;
    Ok(out)
}
