//! gemm kernel benchmarks (in progress: issue 4).
fn main() {
    eprintln!("SKIP gemm benchmarks: not written yet");
}
