//! attention kernel benchmarks (in progress: issue 4).
fn main() {
    eprintln!("SKIP attention benchmarks: not written yet");
}
