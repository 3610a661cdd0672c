//! moe kernel benchmarks (in progress: issue 4).
fn main() {
    eprintln!("SKIP moe benchmarks: not written yet");
}
