fn main() {
    eprintln!("trellis-ca: not implemented yet");
    std::process::exit(2);
}
