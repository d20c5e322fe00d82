//! trellis-bench: side-by-side benchmarks against real peers (work in progress).
fn main() {
    eprintln!("trellis-bench: no scenario is implemented yet");
    std::process::exit(2);
}
