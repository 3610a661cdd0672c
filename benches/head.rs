//! head kernel benchmarks (in progress: issue 4).
fn main() {
    eprintln!("SKIP head benchmarks: not written yet");
}
