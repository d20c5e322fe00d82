fn main() {
    eprintln!("trellis-proxy: not implemented yet");
    std::process::exit(2);
}
